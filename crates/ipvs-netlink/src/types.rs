//! The typed model of IPVS state: what callers build and what dumps return.
//!
//! These types convert to the wire attributes of [`crate::message`] and back. Conversions from
//! the wire never panic: a reply that lacks a required attribute or carries an impossible value
//! yields a [`ModelError`].

use std::{
    fmt,
    hash::{Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use bitflags::bitflags;

use crate::message::{
    DestinationAttribute, ServiceAttribute, StatsAttribute, StatsCounter,
    constants::{AF_INET, AF_INET6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
};

/// Why a kernel reply could not be turned into the typed model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError(pub String);

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn missing(what: &str) -> ModelError {
    ModelError(format!("the reply has no {what} attribute"))
}

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
    pub fn from_af(af: u16) -> Result<Self, ModelError> {
        match af {
            AF_INET => Ok(Self::Ipv4),
            AF_INET6 => Ok(Self::Ipv6),
            other => Err(ModelError(format!("unknown address family {other}"))),
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
    pub fn from_number(number: u16) -> Result<Self, ModelError> {
        match number {
            IPPROTO_TCP => Ok(Self::Tcp),
            IPPROTO_UDP => Ok(Self::Udp),
            IPPROTO_SCTP => Ok(Self::Sctp),
            other => Err(ModelError(format!("unknown protocol {other}"))),
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

    fn from_attributes(attrs: &[ServiceAttribute]) -> Result<Self, ModelError> {
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
    pub fn from_wire(family: Family, value: u32) -> Result<Self, ModelError> {
        match family {
            Family::Ipv4 => Ok(Self::Ipv4(Ipv4Addr::from(value.to_ne_bytes()))),
            Family::Ipv6 => {
                u8::try_from(value).ok().filter(|prefix| *prefix <= 128).map(Self::Ipv6).ok_or_else(
                    || ModelError(format!("IPv6 netmask {value} is not a prefix length")),
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
pub struct Service {
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

impl Service {
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
    pub fn same_config(&self, other: &Service) -> bool {
        self.key == other.key
            && self.scheduler == other.scheduler
            && self.flags.difference(ServiceFlags::HASHED)
                == other.flags.difference(ServiceFlags::HASHED)
            && self.timeout == other.timeout
            && self.netmask == other.netmask
            && self.persistence_engine == other.persistence_engine
    }

    /// Feeds what [`Service::same_config`] compares to `state`: services with the same
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
    pub service: Service,
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
    pub fn from_attributes(attrs: &[ServiceAttribute]) -> Result<Self, ModelError> {
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
            service: Service {
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

/// How IPVS forwards packets to a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForwardMethod {
    /// NAT (`Masq` in `ipvsadm`); the method kube-proxy uses, and the only one that can
    /// change the port.
    #[default]
    Masquerade,
    /// Local delivery (`Local`): the kernel picks it for a destination on a local address.
    Local,
    /// IP-in-IP, GUE or GRE tunnelling (`Tunnel`).
    Tunnel,
    /// Direct routing (`Route`).
    DirectRoute,
    /// Bypass (`Bypass`).
    Bypass,
}

impl ForwardMethod {
    /// The `IP_VS_CONN_F_*` value.
    pub fn to_wire(self) -> u32 {
        match self {
            Self::Masquerade => 0,
            Self::Local => 1,
            Self::Tunnel => 2,
            Self::DirectRoute => 3,
            Self::Bypass => 4,
        }
    }

    /// The method for an `IP_VS_CONN_F_*` value (other bits masked off as the kernel does).
    pub fn from_wire(value: u32) -> Result<Self, ModelError> {
        match value & 0x7 {
            0 => Ok(Self::Masquerade),
            1 => Ok(Self::Local),
            2 => Ok(Self::Tunnel),
            3 => Ok(Self::DirectRoute),
            4 => Ok(Self::Bypass),
            other => Err(ModelError(format!("unknown forwarding method {other}"))),
        }
    }

    /// The name `ipvsadm -Ln` prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::Masquerade => "Masq",
            Self::Local => "Local",
            Self::Tunnel => "Tunnel",
            Self::DirectRoute => "Route",
            Self::Bypass => "Bypass",
        }
    }
}

/// The encapsulation of a tunnelled destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TunnelType {
    /// IP in IP.
    #[default]
    Ipip,
    /// Generic UDP Encapsulation; needs a port.
    Gue,
    /// Generic Routing Encapsulation.
    Gre,
}

impl TunnelType {
    fn to_wire(self) -> u8 {
        match self {
            Self::Ipip => 0,
            Self::Gue => 1,
            Self::Gre => 2,
        }
    }

    fn from_wire(value: u8) -> Result<Self, ModelError> {
        match value {
            0 => Ok(Self::Ipip),
            1 => Ok(Self::Gue),
            2 => Ok(Self::Gre),
            other => Err(ModelError(format!("unknown tunnel type {other}"))),
        }
    }
}

/// Checksum handling of a GUE or GRE tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TunnelChecksum {
    /// No checksum.
    #[default]
    None,
    /// Checksum.
    Checksum,
    /// Remote checksum offload.
    Remote,
}

impl TunnelChecksum {
    fn to_wire(self) -> u16 {
        match self {
            Self::None => 0,
            Self::Checksum => 1,
            Self::Remote => 2,
        }
    }

    fn from_wire(value: u16) -> Result<Self, ModelError> {
        match value {
            0 => Ok(Self::None),
            1 => Ok(Self::Checksum),
            2 => Ok(Self::Remote),
            other => Err(ModelError(format!("unknown tunnel checksum flags {other}"))),
        }
    }
}

/// A destination (real server) of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The real server's address and port. Its family may differ from the service's only
    /// with [`ForwardMethod::Tunnel`].
    pub address: SocketAddr,
    /// The forwarding method.
    pub forward: ForwardMethod,
    /// The weight; 0 stops new connections (used to drain).
    pub weight: u32,
    /// Stop scheduling new connections above this many connections (0: no limit).
    pub upper_threshold: u32,
    /// Resume scheduling below this many connections (0: no limit).
    pub lower_threshold: u32,
    /// Tunnel encapsulation, used with [`ForwardMethod::Tunnel`].
    pub tunnel_type: TunnelType,
    /// Tunnel port, needed for GUE.
    pub tunnel_port: u16,
    /// Tunnel checksum handling.
    pub tunnel_checksum: TunnelChecksum,
}

impl Destination {
    /// A NAT destination with weight 1 and no thresholds, as kube-proxy programs them.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            forward: ForwardMethod::Masquerade,
            weight: 1,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel_type: TunnelType::Ipip,
            tunnel_port: 0,
            tunnel_checksum: TunnelChecksum::None,
        }
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the forwarding method.
    pub fn with_forward(mut self, forward: ForwardMethod) -> Self {
        self.forward = forward;
        self
    }

    /// Sets the connection thresholds.
    pub fn with_thresholds(mut self, lower: u32, upper: u32) -> Self {
        self.lower_threshold = lower;
        self.upper_threshold = upper;
        self
    }

    /// Forwards through a tunnel of the given type, port and checksum handling.
    pub fn with_tunnel(mut self, kind: TunnelType, port: u16, checksum: TunnelChecksum) -> Self {
        self.forward = ForwardMethod::Tunnel;
        self.tunnel_type = kind;
        self.tunnel_port = port;
        self.tunnel_checksum = checksum;
        self
    }

    /// The full attribute set of `NEW_DEST` and `SET_DEST`.
    pub fn to_attributes(&self) -> Vec<DestinationAttribute> {
        let mut attrs = vec![
            DestinationAttribute::AddressFamily(Family::of(self.address.ip()).to_af()),
            DestinationAttribute::Address(address_bytes(self.address.ip())),
            DestinationAttribute::Port(self.address.port()),
            DestinationAttribute::ForwardMethod(self.forward.to_wire()),
            DestinationAttribute::Weight(self.weight),
            DestinationAttribute::UpperThreshold(self.upper_threshold),
            DestinationAttribute::LowerThreshold(self.lower_threshold),
        ];
        if self.forward == ForwardMethod::Tunnel {
            attrs.push(DestinationAttribute::TunnelType(self.tunnel_type.to_wire()));
            attrs.push(DestinationAttribute::TunnelPort(self.tunnel_port));
            attrs.push(DestinationAttribute::TunnelFlags(self.tunnel_checksum.to_wire()));
        }
        attrs
    }

    /// The identifying attribute set of `DEL_DEST`.
    pub fn key_attributes(address: SocketAddr) -> Vec<DestinationAttribute> {
        vec![
            DestinationAttribute::AddressFamily(Family::of(address.ip()).to_af()),
            DestinationAttribute::Address(address_bytes(address.ip())),
            DestinationAttribute::Port(address.port()),
        ]
    }

    /// Whether two destinations have the same configuration. The tunnel settings only
    /// count for tunnelled destinations, as the kernel uses them for nothing else.
    pub fn same_config(&self, other: &Destination) -> bool {
        self.address == other.address
            && self.forward == other.forward
            && self.weight == other.weight
            && self.upper_threshold == other.upper_threshold
            && self.lower_threshold == other.lower_threshold
            && self.tunnel() == other.tunnel()
    }

    /// Feeds what [`Destination::same_config`] compares to `state`: destinations with the
    /// same configuration hash alike.
    pub fn hash_config<H: Hasher>(&self, state: &mut H) {
        self.address.hash(state);
        self.forward.hash(state);
        self.weight.hash(state);
        self.upper_threshold.hash(state);
        self.lower_threshold.hash(state);
        self.tunnel().hash(state);
    }

    /// The tunnel settings, which count only for a tunnelled destination.
    fn tunnel(&self) -> Option<(TunnelType, u16, TunnelChecksum)> {
        (self.forward == ForwardMethod::Tunnel).then_some((
            self.tunnel_type,
            self.tunnel_port,
            self.tunnel_checksum,
        ))
    }
}

/// A destination as a dump reports it, with its connection counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationEntry {
    /// The destination.
    pub destination: Destination,
    /// Connections in the established state.
    pub active_connections: u32,
    /// Connections in other states.
    pub inactive_connections: u32,
    /// Persistence templates pointing at this destination.
    pub persistent_connections: u32,
    /// Counters as the 32-bit statistics block reports them.
    pub stats: Option<Stats>,
    /// Counters as the 64-bit statistics block reports them (kernels since 4.14).
    pub stats64: Option<Stats>,
}

impl DestinationEntry {
    /// A destination with no connections and no counters, as a freshly added one lists.
    pub fn new(destination: Destination) -> Self {
        Self {
            destination,
            active_connections: 0,
            inactive_connections: 0,
            persistent_connections: 0,
            stats: None,
            stats64: None,
        }
    }

    /// The most precise counters the kernel reported.
    pub fn counters(&self) -> Stats {
        self.stats64.or(self.stats).unwrap_or_default()
    }

    /// Reads the attributes of a destination in a `GET_DEST` reply. `service_family` is used
    /// when the reply has no address family of its own (kernels before 3.18).
    pub fn from_attributes(
        attrs: &[DestinationAttribute],
        service_family: Family,
    ) -> Result<Self, ModelError> {
        let mut family = service_family;
        let mut address = None;
        let mut port = None;
        let mut forward = None;
        let mut weight = None;
        let mut entry = Self::new(Destination::new(SocketAddr::from(([0, 0, 0, 0], 0))));
        let d = &mut entry.destination;
        for attr in attrs {
            match attr {
                DestinationAttribute::AddressFamily(af) => family = Family::from_af(*af)?,
                DestinationAttribute::Address(bytes) => address = Some(bytes.as_slice()),
                DestinationAttribute::Port(value) => port = Some(*value),
                DestinationAttribute::ForwardMethod(value) => {
                    forward = Some(ForwardMethod::from_wire(*value)?)
                }
                DestinationAttribute::Weight(value) => weight = Some(*value),
                DestinationAttribute::UpperThreshold(value) => d.upper_threshold = *value,
                DestinationAttribute::LowerThreshold(value) => d.lower_threshold = *value,
                DestinationAttribute::TunnelType(value) => {
                    d.tunnel_type = TunnelType::from_wire(*value)?
                }
                DestinationAttribute::TunnelPort(value) => d.tunnel_port = *value,
                DestinationAttribute::TunnelFlags(value) => {
                    d.tunnel_checksum = TunnelChecksum::from_wire(*value)?
                }
                DestinationAttribute::ActiveConnections(value) => entry.active_connections = *value,
                DestinationAttribute::InactiveConnections(value) => {
                    entry.inactive_connections = *value
                }
                DestinationAttribute::PersistentConnections(value) => {
                    entry.persistent_connections = *value
                }
                DestinationAttribute::Stats(block) => {
                    entry.stats = Some(Stats::from_attributes(block))
                }
                DestinationAttribute::Stats64(block) => {
                    entry.stats64 = Some(Stats::from_attributes(block))
                }
                _ => {}
            }
        }
        let ip = parse_address(family, address.ok_or_else(|| missing("destination address"))?)?;
        let d = &mut entry.destination;
        d.address = SocketAddr::new(ip, port.ok_or_else(|| missing("destination port"))?);
        d.forward = forward.ok_or_else(|| missing("forwarding method"))?;
        d.weight = weight.ok_or_else(|| missing("weight"))?;
        Ok(entry)
    }
}

/// Traffic counters of a service or destination, and the estimator's rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stats {
    /// Connections scheduled.
    pub connections: u64,
    /// Incoming packets.
    pub in_packets: u64,
    /// Outgoing packets.
    pub out_packets: u64,
    /// Incoming bytes.
    pub in_bytes: u64,
    /// Outgoing bytes.
    pub out_bytes: u64,
    /// Connections per second.
    pub connection_rate: u64,
    /// Incoming packets per second.
    pub in_packet_rate: u64,
    /// Outgoing packets per second.
    pub out_packet_rate: u64,
    /// Incoming bytes per second.
    pub in_byte_rate: u64,
    /// Outgoing bytes per second.
    pub out_byte_rate: u64,
}

impl Stats {
    /// Reads a nested statistics block of either width.
    pub fn from_attributes(attrs: &[StatsAttribute]) -> Self {
        let mut stats = Self::default();
        for attr in attrs {
            let (counter, value) = match attr {
                StatsAttribute::U32(counter, value) => (*counter, u64::from(*value)),
                StatsAttribute::U64(counter, value) => (*counter, *value),
                StatsAttribute::Other(_) => continue,
            };
            let field = match counter {
                StatsCounter::Connections => &mut stats.connections,
                StatsCounter::InPackets => &mut stats.in_packets,
                StatsCounter::OutPackets => &mut stats.out_packets,
                StatsCounter::InBytes => &mut stats.in_bytes,
                StatsCounter::OutBytes => &mut stats.out_bytes,
                StatsCounter::ConnectionRate => &mut stats.connection_rate,
                StatsCounter::InPacketRate => &mut stats.in_packet_rate,
                StatsCounter::OutPacketRate => &mut stats.out_packet_rate,
                StatsCounter::InByteRate => &mut stats.in_byte_rate,
                StatsCounter::OutByteRate => &mut stats.out_byte_rate,
            };
            *field = value;
        }
        stats
    }
}

/// The connection timeouts of IPVS (`ipvsadm --set`), in seconds. In a request, 0 leaves a
/// value unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// TCP established.
    pub tcp: u32,
    /// TCP after a FIN.
    pub tcp_fin: u32,
    /// UDP.
    pub udp: u32,
}

/// What `GET_INFO` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Info {
    /// The IPVS version as the kernel encodes it: `0x010201` for 1.2.1.
    pub version: u32,
    /// Number of buckets of the connection hash table.
    pub connection_table_size: u32,
}

impl Info {
    /// The version as `major.minor.patch`, as `ipvsadm` prints it.
    pub fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
    }
}

/// The 16-byte `union nf_inet_addr` form of an address, as the kernel reports it.
fn address_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = vec![0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn parse_address(family: Family, bytes: &[u8]) -> Result<IpAddr, ModelError> {
    match (family, bytes.len()) {
        (Family::Ipv4, 4 | 16) => {
            Ok(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])))
        }
        (Family::Ipv6, 16) => {
            let mut octets = [0; 16];
            octets.copy_from_slice(bytes);
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        (family, len) => Err(ModelError(format!("a {len}-byte address cannot be {family:?}"))),
    }
}
