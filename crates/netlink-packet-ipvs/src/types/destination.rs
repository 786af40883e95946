//! Destinations (real servers): forwarding, tunnels, weights and thresholds, and a destination
//! as a dump reports it.

use std::{
    hash::{Hash, Hasher},
    net::SocketAddr,
};

use super::{Family, Stats, address_bytes, missing, parse_address};
use crate::{Error, message::DestinationAttribute};

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
    pub fn from_wire(value: u32) -> Result<Self, Error> {
        match value & 0x7 {
            0 => Ok(Self::Masquerade),
            1 => Ok(Self::Local),
            2 => Ok(Self::Tunnel),
            3 => Ok(Self::DirectRoute),
            4 => Ok(Self::Bypass),
            other => Err(Error::Invalid(format!("unknown forwarding method {other}"))),
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

    fn from_wire(value: u8) -> Result<Self, Error> {
        match value {
            0 => Ok(Self::Ipip),
            1 => Ok(Self::Gue),
            2 => Ok(Self::Gre),
            other => Err(Error::Invalid(format!("unknown tunnel type {other}"))),
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

    fn from_wire(value: u16) -> Result<Self, Error> {
        match value {
            0 => Ok(Self::None),
            1 => Ok(Self::Checksum),
            2 => Ok(Self::Remote),
            other => Err(Error::Invalid(format!("unknown tunnel checksum flags {other}"))),
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
    ) -> Result<Self, Error> {
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
