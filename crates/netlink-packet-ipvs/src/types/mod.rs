//! The typed model of IPVS state: what callers build and what dumps return.
//!
//! These types convert to the wire attributes of [`crate::message`] and back. Conversions from
//! the wire never panic: a reply that lacks a required attribute or carries an impossible value
//! yields an [`Error`](crate::Error).

mod destination;
mod family;
mod requests;
mod service;
mod stats;

pub(crate) use self::family::{address_bytes, parse_address};
pub use self::{
    destination::{Destination, DestinationEntry, ForwardMethod, TunnelChecksum, TunnelType},
    family::{Family, Protocol},
    service::{Netmask, ServiceEntry, ServiceFlags, ServiceKey, VirtualService},
    stats::{Info, Stats, Timeouts},
};

fn missing(what: &str) -> crate::Error {
    crate::Error::Missing(what.to_owned())
}
