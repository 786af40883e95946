//! A client of the Linux kernel's IPVS generic-netlink family.
//!
//! It is the I/O half of two, as the rust-netlink crates are split:
//!
//! - `netlink-packet-ipvs` (re-exported here as [`message`] and [`types`]): the wire format
//!   and the typed model ([`VirtualService`], [`Destination`], their dump entries with
//!   counters, [`Timeouts`], [`Info`]), pure and without I/O;
//! - this crate: [`IpvsHandle`], async requests on one netlink socket.
//!   [`IpvsHandle::apply`] pipelines many [`Change`]s and returns one result each.
//!
//! Every failure is an [`Error`] that names the request it belongs to.
//!
//! ```no_run
//! use ipvs_netlink::{Change, Destination, IpvsHandle, ServiceKey, VirtualService};
//!
//! # async fn example() -> Result<(), ipvs_netlink::Error> {
//! let ipvs = IpvsHandle::new()?;
//! let key = ServiceKey::tcp("10.96.0.10:53".parse().unwrap());
//! let results = ipvs
//!     .apply(&[
//!         Change::AddService(VirtualService::new(key, "rr")),
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
mod request;

pub use netlink_packet_ipvs::{
    Destination, DestinationEntry, Family, ForwardMethod, Info, Netmask, Protocol, ServiceEntry,
    ServiceFlags, ServiceKey, Stats, Timeouts, TunnelChecksum, TunnelType, VirtualService, message,
    types,
};

pub use self::{
    error::{Error, Result},
    handle::{DUMP_SOCKETS, IpvsHandle},
    request::{Change, Operation, Target},
};
