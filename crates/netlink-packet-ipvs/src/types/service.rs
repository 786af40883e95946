//! Virtual services: their key, flags, persistence netmask and configuration, and a service as
//! a dump reports it.

use std::{
    fmt,
    hash::{Hash, Hasher},
    net::{Ipv4Addr, SocketAddr},
};

use bitflags::bitflags;

use super::{Family, Protocol, Stats, address_bytes, missing, parse_address};
use crate::{Error, message::ServiceAttribute};

/// What identifies a virtual service in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    /// A service on an address, port and protocol.
    Inet {
        /// The protocol.
        protocol: Protocol,
        /// The virtual address and port.
        address: SocketAddr,
    },
    /// A service matching packets by firewall mark.
    Fwmark {
        /// The address family the service handles.
        family: Family,
        /// The firewall mark.
        mark: u32,
    },
}

impl ServiceKey {
    /// A TCP service key.
    pub fn tcp(address: SocketAddr) -> Self {
        Self::Inet { protocol: Protocol::Tcp, address }
    }

    /// A UDP service key.
    pub fn udp(address: SocketAddr) -> Self {
        Self::Inet { protocol: Protocol::Udp, address }
    }

    /// An SCTP service key.
    pub fn sctp(address: SocketAddr) -> Self {
        Self::Inet { protocol: Protocol::Sctp, address }
    }

    /// The address family of the service.
    pub fn family(&self) -> Family {
        match self {
            Self::Inet { address, .. } => Family::of(address.ip()),
            Self::Fwmark { family, .. } => *family,
        }
    }

    /// The identifying attributes: AF and either FWMARK or PROTOCOL + ADDR + PORT.
    pub fn to_attributes(&self) -> Vec<ServiceAttribute> {
        match self {
            Self::Inet { protocol, address } => vec![
                ServiceAttribute::AddressFamily(self.family().to_af()),
                ServiceAttribute::Protocol(protocol.number()),
                ServiceAttribute::Address(address_bytes(address.ip())),
                ServiceAttribute::Port(address.port()),
            ],
            Self::Fwmark { family, mark } => vec![
                ServiceAttribute::AddressFamily(family.to_af()),
                ServiceAttribute::Fwmark(*mark),
            ],
        }
    }

    fn from_attributes(attrs: &[ServiceAttribute]) -> Result<Self, Error> {
        let mut af = None;
        let mut protocol = None;
        let mut address = None;
        let mut port = None;
        let mut fwmark = None;
        for attr in attrs {
            match attr {
                ServiceAttribute::AddressFamily(v) => af = Some(*v),
                ServiceAttribute::Protocol(v) => protocol = Some(*v),
                ServiceAttribute::Address(v) => address = Some(v.as_slice()),
                ServiceAttribute::Port(v) => port = Some(*v),
                ServiceAttribute::Fwmark(v) => fwmark = Some(*v),
                _ => {}
            }
        }
        let family = Family::from_af(af.ok_or_else(|| missing("service address family"))?)?;
        if let Some(mark) = fwmark.filter(|mark| *mark != 0) {
            return Ok(Self::Fwmark { family, mark });
        }
        let protocol = Protocol::from_number(protocol.ok_or_else(|| missing("protocol"))?)?;
        let ip = parse_address(family, address.ok_or_else(|| missing("service address"))?)?;
        let port = port.ok_or_else(|| missing("service port"))?;
        Ok(Self::Inet { protocol, address: SocketAddr::new(ip, port) })
    }
}

impl fmt::Display for ServiceKey {
    /// Formats like `ipvsadm -Ln`: `TCP  10.0.0.1:80`, `TCP  [fd00::1]:80`, `FWM  7`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet { protocol, address } => write!(f, "{protocol} {address}"),
            Self::Fwmark { family: Family::Ipv4, mark } => write!(f, "FWM {mark}"),
            Self::Fwmark { family: Family::Ipv6, mark } => write!(f, "FWM {mark} IPv6"),
        }
    }
}

bitflags! {
    /// Virtual service flags (`IP_VS_SVC_F_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ServiceFlags: u32 {
        /// Persistent service (session affinity).
        const PERSISTENT = 0x0001;
        /// Set by the kernel on every service it has hashed; ignored in requests.
        const HASHED = 0x0002;
        /// One-packet scheduling (UDP).
        const ONE_PACKET = 0x0004;
        /// Scheduler flag 1: `sh-fallback` for sh, `mh-fallback` for mh.
        const SCHED1 = 0x0008;
        /// Scheduler flag 2: `sh-port` for sh, `mh-port` for mh.
        const SCHED2 = 0x0010;
        /// Scheduler flag 3: no in-tree scheduler uses it.
        const SCHED3 = 0x0020;
        /// `sh` falls back to another destination when the chosen one is unavailable.
        const SH_FALLBACK = Self::SCHED1.bits();
        /// `sh` hashes the source port as well as the source address.
        const SH_PORT = Self::SCHED2.bits();
        /// `mh` falls back to another destination when the chosen one is unavailable.
        const MH_FALLBACK = Self::SCHED1.bits();
        /// `mh` hashes the source port as well as the source address.
        const MH_PORT = Self::SCHED2.bits();
    }
}

/// The persistence netmask of a service: which client addresses share a persistent destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Netmask {
    /// An IPv4 mask such as `255.255.255.255`.
    Ipv4(Ipv4Addr),
    /// An IPv6 prefix length, 1 to 128.
    Ipv6(u8),
}

impl Netmask {
    /// The mask covering a single address of the family (`/32` or `/128`), as kube-proxy uses.
    pub fn host(family: Family) -> Self {
        match family {
            Family::Ipv4 => Self::Ipv4(Ipv4Addr::BROADCAST),
            Family::Ipv6 => Self::Ipv6(128),
        }
    }

    /// The value of the NETMASK attribute: IPv4 masks travel in network byte order, IPv6
    /// prefix lengths as a native integer.
    pub fn to_wire(self) -> u32 {
        match self {
            Self::Ipv4(mask) => u32::from_ne_bytes(mask.octets()),
            Self::Ipv6(prefix) => u32::from(prefix),
        }
    }

    /// Reads the NETMASK attribute of a service of the given family.
    pub fn from_wire(family: Family, value: u32) -> Result<Self, Error> {
        match family {
            Family::Ipv4 => Ok(Self::Ipv4(Ipv4Addr::from(value.to_ne_bytes()))),
            Family::Ipv6 => {
                u8::try_from(value).ok().filter(|prefix| *prefix <= 128).map(Self::Ipv6).ok_or_else(
                    || Error::Invalid(format!("IPv6 netmask {value} is not a prefix length")),
                )
            }
        }
    }
}

impl fmt::Display for Netmask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ipv4(mask) => write!(f, "{mask}"),
            Self::Ipv6(prefix) => write!(f, "{prefix}"),
        }
    }
}

/// A virtual service: its key and its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtualService {
    /// What identifies the service.
    pub key: ServiceKey,
    /// Scheduler name: `rr`, `wrr`, `lc`, `wlc`, `lblc`, `lblcr`, `dh`, `sh`, `sed`, `nq`,
    /// `fo`, `ovf`, `mh`, `twos`, or `none`.
    pub scheduler: String,
    /// Flags. [`ServiceFlags::HASHED`] appears in dumps and is ignored in requests.
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds (meaningful with [`ServiceFlags::PERSISTENT`]).
    pub timeout: u32,
    /// Persistence netmask.
    pub netmask: Netmask,
    /// Persistence engine, such as `sip`.
    pub persistence_engine: Option<String>,
}

impl VirtualService {
    /// A service with the given scheduler, no flags, no persistence and a host netmask.
    pub fn new(key: ServiceKey, scheduler: impl Into<String>) -> Self {
        Self {
            netmask: Netmask::host(key.family()),
            key,
            scheduler: scheduler.into(),
            flags: ServiceFlags::empty(),
            timeout: 0,
            persistence_engine: None,
        }
    }

    /// Makes the service persistent with the given timeout in seconds.
    pub fn persistent(mut self, timeout: u32) -> Self {
        self.flags |= ServiceFlags::PERSISTENT;
        self.timeout = timeout;
        self
    }

    /// Adds flags.
    pub fn with_flags(mut self, flags: ServiceFlags) -> Self {
        self.flags |= flags;
        self
    }

    /// Sets the persistence netmask.
    pub fn with_netmask(mut self, netmask: Netmask) -> Self {
        self.netmask = netmask;
        self
    }

    /// Sets the persistence engine.
    pub fn with_persistence_engine(mut self, engine: impl Into<String>) -> Self {
        self.persistence_engine = Some(engine.into());
        self
    }

    /// The flags the kernel would report for this service once added (with `HASHED`).
    pub fn flags_in_kernel(&self) -> ServiceFlags {
        self.flags | ServiceFlags::HASHED
    }

    /// Whether two services have the same configuration as far as the kernel is concerned
    /// (the kernel-owned `HASHED` flag aside).
    pub fn same_config(&self, other: &VirtualService) -> bool {
        self.key == other.key
            && self.scheduler == other.scheduler
            && self.flags.difference(ServiceFlags::HASHED)
                == other.flags.difference(ServiceFlags::HASHED)
            && self.timeout == other.timeout
            && self.netmask == other.netmask
            && self.persistence_engine == other.persistence_engine
    }

    /// Feeds what [`VirtualService::same_config`] compares to `state`: services with the same
    /// configuration hash alike.
    pub fn hash_config<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
        self.scheduler.hash(state);
        self.flags.difference(ServiceFlags::HASHED).bits().hash(state);
        self.timeout.hash(state);
        self.netmask.hash(state);
        self.persistence_engine.hash(state);
    }

    /// The full attribute set of `NEW_SERVICE` and `SET_SERVICE`.
    pub fn to_attributes(&self) -> Vec<ServiceAttribute> {
        let mut attrs = self.key.to_attributes();
        attrs.push(ServiceAttribute::Scheduler(self.scheduler.clone()));
        if let Some(engine) = &self.persistence_engine {
            attrs.push(ServiceAttribute::PersistenceEngine(engine.clone()));
        }
        attrs.push(ServiceAttribute::Flags {
            flags: self.flags.difference(ServiceFlags::HASHED).bits(),
            mask: u32::MAX,
        });
        attrs.push(ServiceAttribute::Timeout(self.timeout));
        attrs.push(ServiceAttribute::Netmask(self.netmask.to_wire()));
        attrs
    }
}

/// A virtual service as a dump reports it, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// The service.
    pub service: VirtualService,
    /// Counters as the 32-bit statistics block reports them.
    pub stats: Option<Stats>,
    /// Counters as the 64-bit statistics block reports them (kernels since 4.14).
    pub stats64: Option<Stats>,
}

impl ServiceEntry {
    /// The most precise counters the kernel reported.
    pub fn counters(&self) -> Stats {
        self.stats64.or(self.stats).unwrap_or_default()
    }

    /// Reads the attributes of a service in a `GET_SERVICE` reply.
    pub fn from_attributes(attrs: &[ServiceAttribute]) -> Result<Self, Error> {
        let key = ServiceKey::from_attributes(attrs)?;
        let mut scheduler = None;
        let mut flags = None;
        let mut timeout = 0;
        let mut netmask = None;
        let mut persistence_engine = None;
        let mut stats = None;
        let mut stats64 = None;
        for attr in attrs {
            match attr {
                ServiceAttribute::Scheduler(name) => scheduler = Some(name.clone()),
                ServiceAttribute::Flags { flags: value, .. } => {
                    flags = Some(ServiceFlags::from_bits_retain(*value))
                }
                ServiceAttribute::Timeout(value) => timeout = *value,
                ServiceAttribute::Netmask(value) => netmask = Some(*value),
                ServiceAttribute::PersistenceEngine(name) => {
                    persistence_engine = Some(name.clone())
                }
                ServiceAttribute::Stats(block) => stats = Some(Stats::from_attributes(block)),
                ServiceAttribute::Stats64(block) => stats64 = Some(Stats::from_attributes(block)),
                _ => {}
            }
        }
        let netmask = match netmask {
            Some(value) => Netmask::from_wire(key.family(), value)?,
            None => Netmask::host(key.family()),
        };
        Ok(Self {
            service: VirtualService {
                key,
                scheduler: scheduler.ok_or_else(|| missing("scheduler"))?,
                flags: flags.ok_or_else(|| missing("flags"))?,
                timeout,
                netmask,
                persistence_engine,
            },
            stats,
            stats64,
        })
    }
}
