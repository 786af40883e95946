//! A client of the Linux kernel's IPVS generic-netlink family.
//!
//! The crate has two layers, as the rust-netlink crates do:
//!
//! - [`message`]: the wire format, pure and without I/O. [`message::IpvsMessage`] and its
//!   attribute enums parse and emit byte for byte what the kernel sends; unknown attributes are
//!   kept, and no input makes the parser panic.
//! - [`IpvsHandle`]: async requests on one netlink socket, built on the typed model in
//!   [`types`] ([`Service`], [`Destination`], their dump entries with counters, [`Timeouts`],
//!   [`Info`]). [`IpvsHandle::apply`] pipelines many [`Change`]s and returns one result each.
//!
//! Every failure is an [`Error`] that names the request it belongs to.
//!
//! ```no_run
//! use ipvs_netlink::{Change, Destination, IpvsHandle, Service, ServiceKey};
//!
//! # async fn example() -> Result<(), ipvs_netlink::Error> {
//! let ipvs = IpvsHandle::new()?;
//! let key = ServiceKey::tcp("10.96.0.10:53".parse().unwrap());
//! let results = ipvs
//!     .apply(&[
//!         Change::AddService(Service::new(key, "rr")),
//!         Change::AddDestination(key, Destination::new("10.244.1.5:53".parse().unwrap())),
//!         Change::AddDestination(key, Destination::new("10.244.2.7:53".parse().unwrap())),
//!     ])
//!     .await;
//! for result in results {
//!     result?;
//! }
//! for (service, destinations) in ipvs.dump().await? {
//!     println!("{} {} with {} destinations", service.service.key, service.service.scheduler,
//!         destinations.len());
//! }
//! # Ok(())
//! # }
//! ```

mod connection;
mod error;
mod handle;
pub mod listing;
pub mod message;
mod request;
pub mod types;

pub use self::{
    error::{Error, Result},
    handle::{DUMP_SOCKETS, IpvsHandle},
    request::{Change, Operation, Target},
    types::{
        Destination, DestinationEntry, Family, ForwardMethod, Info, Netmask, Protocol, Service,
        ServiceEntry, ServiceFlags, ServiceKey, Stats, Timeouts, TunnelChecksum, TunnelType,
    },
};
