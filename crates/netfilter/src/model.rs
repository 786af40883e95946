//! What the table must hold: its configuration (fixed rules) and its set elements (which
//! change with Services). Pure data.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddrV4},
};

use ipnetwork::IpNetwork;
pub use netlink_packet_ipvs::{Family, Protocol};

/// The name of the table kube-ipvs owns, in the `inet` family.
pub const TABLE: &str = "kube-ipvs";

/// The fixed part of the rules: changing it means installing the table again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Pod addresses (`--cluster-cidr`). Traffic to a ClusterIP from outside them is
    /// masqueraded, so replies come back through this node. With none for a family, traffic the
    /// node itself sends to a ClusterIP is masqueraded.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Masquerade all traffic to ClusterIPs (`--masquerade-all`).
    pub masquerade_all: bool,
    /// The packet-mark bit that asks for masquerade (`--iptables-masquerade-bit`, 14).
    pub masquerade_bit: u8,
    /// Serve NodePorts on `127.0.0.1` too ([`Elements::localhost_node_ports`]).
    ///
    /// IPVS never forwards a packet with a loopback source to another host, and a connection
    /// to 127.0.0.1 is confirmed by conntrack before IPVS could see it come back in through
    /// `lo`. So these connections do not go through IPVS: they are sent to an endpoint
    /// directly (DNAT, a random one of 64 buckets) and masqueraded, as kube-proxy's iptables
    /// mode does, which needs `net.ipv4.conf.all.route_localnet=1`. IPv4 only. kube-proxy's
    /// IPVS mode cannot serve localhost NodePorts at all.
    pub localhost_node_ports: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            masquerade_bit: 14,
            localhost_node_ports: false,
        }
    }
}

impl Config {
    /// The mark value with the masquerade bit set.
    pub fn masquerade_mark(&self) -> u32 {
        1 << self.masquerade_bit
    }

    /// Checks the values: the masquerade bit must leave the low 6 bits free (localhost
    /// NodePorts keep a bucket number there) and fit in 32 bits.
    pub fn validate(&self) -> Result<(), String> {
        if !(6..=31).contains(&self.masquerade_bit) {
            return Err(format!("masquerade bit {} is not between 6 and 31", self.masquerade_bit));
        }
        Ok(())
    }
}

/// An address, protocol and port: one virtual server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePort {
    /// The Service address.
    pub address: IpAddr,
    /// The protocol.
    pub protocol: Protocol,
    /// The port.
    pub port: u16,
}

impl ServicePort {
    /// A service port.
    pub fn new(address: IpAddr, protocol: Protocol, port: u16) -> Self {
        Self { address, protocol, port }
    }
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// A protocol and port on the node's own addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePort {
    /// The protocol.
    pub protocol: Protocol,
    /// The port.
    pub port: u16,
}

/// Every set element of the table: what kube-ipvs0 holds and how its traffic is treated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Elements {
    /// ClusterIP ports: reachable, masqueraded when from outside the cluster CIDR.
    pub cluster_ips: BTreeSet<ServicePort>,
    /// External IP and load-balancer ports with `externalTrafficPolicy: Cluster`: reachable,
    /// always masqueraded.
    pub external_ips: BTreeSet<ServicePort>,
    /// External IP and load-balancer ports with `externalTrafficPolicy: Local`: reachable,
    /// never masqueraded, so the backend sees the client.
    pub local_external_ips: BTreeSet<ServicePort>,
    /// NodePorts with `externalTrafficPolicy: Cluster`: masqueraded on every node address.
    pub node_ports: BTreeSet<NodePort>,
    /// Every address bound to kube-ipvs0: new connections to them are refused unless they are
    /// to one of the ports above.
    pub vips: BTreeSet<IpAddr>,
    /// Load-balancer ports restricted by `loadBalancerSourceRanges`, each with the sources
    /// allowed; other sources are dropped.
    pub source_ranges: BTreeSet<(ServicePort, IpNetwork)>,
    /// `healthCheckNodePort`s, never blocked by this table.
    pub health_check_node_ports: BTreeSet<u16>,
    /// Local endpoint addresses: a pod sent to itself through a Service is masqueraded
    /// (hairpin), or it would drop its own packets.
    pub hairpin: BTreeSet<IpAddr>,
    /// External IP and load-balancer ports with `externalTrafficPolicy: Local`, each with the
    /// firewall mark of the virtual server holding only this node's endpoints. Traffic from
    /// outside the cluster gets the mark (so IPVS picks that virtual server); traffic from pods
    /// and from the node keeps using the address's own virtual server, with every endpoint.
    pub local_traffic: BTreeMap<ServicePort, u32>,
    /// The same for NodePorts with `externalTrafficPolicy: Local`, by address family.
    pub local_node_ports: BTreeMap<(Family, NodePort), u32>,
    /// NodePorts served on `127.0.0.1` (with [`Config::localhost_node_ports`]), each with
    /// its IPv4 endpoints.
    pub localhost_node_ports: BTreeMap<NodePort, BTreeSet<SocketAddrV4>>,
}

/// A service port from its address's text, for tests.
#[cfg(test)]
pub(crate) fn port(address: &str, protocol: Protocol, port: u16) -> ServicePort {
    ServicePort::new(address.parse().unwrap(), protocol, port)
}

/// Calls the macro named `$each` with the names of the set fields of [`Elements`] (the
/// `BTreeSet`s; the maps are `local_traffic`, `local_node_ports` and `localhost_node_ports`),
/// so that code treating every set alike names them in one place.
#[macro_export]
macro_rules! for_each_set {
    ($each:ident) => {
        $each!(
            cluster_ips,
            external_ips,
            local_external_ips,
            node_ports,
            vips,
            source_ranges,
            health_check_node_ports,
            hairpin
        )
    };
}

impl Elements {
    /// Moves these elements by a difference: `removed` goes, then `added` comes (for a map,
    /// `removed` names the keys that go, `added` the entries that come).
    pub fn apply(&mut self, removed: &Elements, added: &Elements) {
        macro_rules! sets {
            ($($field:ident),*) => {$(
                for item in &removed.$field {
                    self.$field.remove(item);
                }
                self.$field.extend(added.$field.iter().cloned());
            )*};
        }
        crate::for_each_set!(sets);
        macro_rules! maps {
            ($($field:ident),*) => {$(
                for key in removed.$field.keys() {
                    self.$field.remove(key);
                }
                self.$field.extend(added.$field.iter().map(|(k, v)| (k.clone(), v.clone())));
            )*};
        }
        maps!(local_traffic, local_node_ports, localhost_node_ports);
    }
}
