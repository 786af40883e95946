//! Address families, protocols and addresses as the kernel encodes them.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    Error,
    message::constants::{AF_INET, AF_INET6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`AF_INET`).
    Ipv4,
    /// IPv6 (`AF_INET6`).
    Ipv6,
}

impl Family {
    /// The family of an address.
    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    /// The `AF_*` number.
    pub fn to_af(self) -> u16 {
        match self {
            Self::Ipv4 => AF_INET,
            Self::Ipv6 => AF_INET6,
        }
    }

    /// The family for an `AF_*` number.
    pub fn from_af(af: u16) -> Result<Self, Error> {
        match af {
            AF_INET => Ok(Self::Ipv4),
            AF_INET6 => Ok(Self::Ipv6),
            other => Err(Error::Invalid(format!("unknown address family {other}"))),
        }
    }
}

/// The transport protocol of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u16 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
            Self::Sctp => IPPROTO_SCTP,
        }
    }

    /// The protocol for an IP protocol number.
    pub fn from_number(number: u16) -> Result<Self, Error> {
        match number {
            IPPROTO_TCP => Ok(Self::Tcp),
            IPPROTO_UDP => Ok(Self::Udp),
            IPPROTO_SCTP => Ok(Self::Sctp),
            other => Err(Error::Invalid(format!("unknown protocol {other}"))),
        }
    }

    /// The name `ipvsadm -Ln` prints: `TCP`, `UDP` or `SCTP`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 16-byte `union nf_inet_addr` form of an address, as the kernel reports it.
pub(crate) fn address_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = vec![0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub(crate) fn parse_address(family: Family, bytes: &[u8]) -> Result<IpAddr, Error> {
    match (family, bytes.len()) {
        (Family::Ipv4, 4 | 16) => {
            Ok(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])))
        }
        (Family::Ipv6, 16) => {
            let mut octets = [0; 16];
            octets.copy_from_slice(bytes);
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        (family, len) => Err(Error::Invalid(format!("a {len}-byte address cannot be {family:?}"))),
    }
}
