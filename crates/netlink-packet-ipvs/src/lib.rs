//! The Linux kernel's IPVS generic-netlink messages, without I/O.
//!
//! As the rust-netlink crates (netlink-packet-route, netlink-packet-generic) do for their
//! families:
//!
//! - [`message`]: the wire format. [`message::IpvsMessage`] and its attribute enums parse and
//!   emit byte for byte what the kernel sends; unknown attributes are kept, and no input makes
//!   the parser panic. The codec tests hold byte vectors the kernel produced.
//! - [`types`]: the typed model ([`VirtualService`], [`Destination`], their dump entries with
//!   counters, [`Timeouts`], [`Info`]), converting to the attributes and back; a reply the model
//!   cannot hold is an [`Error`].
//!
//! No sockets and no runtime: `ipvs-netlink` sends these messages. The crate's dependencies
//! are checked to stay so (`tests/pure.rs`).

mod error;
pub mod message;
pub mod types;

pub use self::{
    error::Error,
    types::{
        Destination, DestinationEntry, Family, ForwardMethod, Info, Netmask, Protocol,
        ServiceEntry, ServiceFlags, ServiceKey, Stats, Timeouts, TunnelChecksum, TunnelType,
        VirtualService,
    },
};
