//! The inputs and outputs of the desired-state computation.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnetwork::IpNetwork;
use ipvs_netlink::{Destination, ServiceKey, VirtualService};

/// The default scheduler, as kube-proxy's `--ipvs-scheduler`.
pub const DEFAULT_SCHEDULER: &str = "rr";
/// Schedulers a Service may ask for.
pub const SCHEDULERS: &[&str] = &["rr", "wrr", "lc", "wlc", "dh", "sh", "sed", "nq", "mh"];
/// Annotation choosing a Service's scheduler.
pub const SCHEDULER_ANNOTATION: &str = "kube-ipvs.io/scheduler";
/// Annotation with the scheduler's flags: `sh-fallback`, `sh-port`, `mh-fallback`, `mh-port`.
pub const SCHEDULER_FLAGS_ANNOTATION: &str = "kube-ipvs.io/scheduler-flags";
/// The label that names an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The annotation with the time of the change an EndpointSlice reflects.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Services with this label belong to another proxy (unless it names ours).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The EndpointSlice controller puts this label on the slices of headless Services; proxies
/// do not watch such slices.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label with its zone, for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The session affinity timeout when a Service does not give one (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// What kube-ipvs is configured with, as far as the desired state goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The scheduler of Services that do not choose one.
    pub scheduler: String,
    /// `--service-proxy-name`: Services labelled with another proxy name are skipped.
    pub service_proxy_name: Option<String>,
    /// Serve NodePorts on 127.0.0.1 too.
    pub localhost_node_ports: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            scheduler: DEFAULT_SCHEDULER.to_owned(),
            service_proxy_name: None,
            localhost_node_ports: false,
        }
    }
}

/// What the desired state needs to know about this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name, as endpoints name it.
    pub name: String,
    /// Its zone (`topology.kubernetes.io/zone`), for topology hints.
    pub zone: Option<String>,
    /// The addresses NodePorts are served on (`--nodeport-addresses` applied).
    pub node_port_addresses: Vec<IpAddr>,
    /// Every address of the node outside kube-ipvs0: an external or load-balancer IP that is
    /// one of them is not bound to kube-ipvs0 (it is local already).
    pub local_addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// The node as its Node object describes it (name, zone label), with the NodePort
    /// addresses and local addresses the caller found on the host.
    pub fn from_node(
        node: &k8s_openapi::api::core::v1::Node,
        node_port_addresses: Vec<IpAddr>,
        local_addresses: Vec<IpAddr>,
    ) -> Self {
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned(),
            node_port_addresses,
            local_addresses,
        }
    }
}

/// The addresses NodePorts are served on, from the node's addresses outside kube-ipvs0 and
/// `--nodeport-addresses`: with no CIDR, every address but loopback and link-local ones (as
/// kube-proxy); otherwise those within the CIDRs, loopback excluded.
pub fn node_port_addresses(local: &[IpAddr], cidrs: &[IpNetwork]) -> Vec<IpAddr> {
    let link_local = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    let mut addresses: Vec<IpAddr> = local
        .iter()
        .filter(|ip| !ip.is_loopback())
        .filter(|ip| {
            if cidrs.is_empty() { !link_local(ip) } else { cidrs.iter().any(|c| c.contains(**ip)) }
        })
        .copied()
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// A Service port, named as kube-proxy names them: `namespace/name:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    /// The namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The port's name (empty for a single unnamed port).
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// The kind of address a virtual server is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Exposure {
    /// A ClusterIP.
    ClusterIp,
    /// An external IP (`spec.externalIPs`).
    ExternalIp,
    /// A load-balancer ingress IP.
    LoadBalancer,
    /// A NodePort on a node address.
    NodePort,
    /// The firewall-mark virtual server of external traffic with `externalTrafficPolicy: Local`.
    LocalOnly,
}

/// For `$kept`, an API object as kube-ipvs keeps it (made `From` its API type `$api`, with
/// `name` and `namespace` fields): `From<&$api>`, and kube-rs's `Lookup`, which gives the
/// change tracker's cache its key. The resourceVersion and UID are not kept (the watch tracks
/// the resourceVersion itself).
macro_rules! kept_api_object {
    ($kept:ty, $api:ty) => {
        impl From<&$api> for $kept {
            fn from(object: &$api) -> Self {
                Self::from(object.clone())
            }
        }

        impl kube::runtime::reflector::Lookup for $kept {
            type DynamicType = ();

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::KIND.into()
            }

            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::GROUP.into()
            }

            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::VERSION.into()
            }

            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                <$api as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }

            fn name(&self) -> Option<std::borrow::Cow<'_, str>> {
                Some(self.name.as_str().into())
            }

            fn namespace(&self) -> Option<std::borrow::Cow<'_, str>> {
                Some(self.namespace.as_str().into())
            }

            fn resource_version(&self) -> Option<std::borrow::Cow<'_, str>> {
                None
            }

            fn uid(&self) -> Option<std::borrow::Cow<'_, str>> {
                None
            }
        }
    };
}
pub(crate) use kept_api_object;

/// An item that carries its own key, for [`ByKey`].
pub trait Keyed {
    /// The key's type.
    type Key: Ord;
    /// The item's key.
    fn sort_key(&self) -> &Self::Key;
}

impl Keyed for Destination {
    type Key = SocketAddr;
    fn sort_key(&self) -> &SocketAddr {
        &self.address
    }
}

/// An object's namespace (empty for a cluster-scoped one) and name: the key of the objects
/// kube-ipvs keeps, in the order `kubectl` lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The namespace, empty for a cluster-scoped object.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// The key of the object `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The key of `object`.
    pub fn of<K: kube::runtime::reflector::Lookup>(object: &K) -> Self {
        let text = |part: Option<std::borrow::Cow<'_, str>>| part.unwrap_or_default().into_owned();
        Self { namespace: text(object.namespace()), name: text(object.name()) }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service's key, for the Services that claim one thing.
impl Keyed for ObjectKey {
    type Key = ObjectKey;
    fn sort_key(&self) -> &Self::Key {
        self
    }
}

/// A name, for the few objects of one kind that belong to one Service (its EndpointSlices).
impl Keyed for String {
    type Key = String;
    fn sort_key(&self) -> &String {
        self
    }
}

impl Keyed for Arc<VirtualServer> {
    type Key = ServiceKey;
    fn sort_key(&self) -> &ServiceKey {
        &self.service.key
    }
}

/// Items that carry their own keys, in a vector kept sorted by key. A virtual server has a
/// handful to a few hundred destinations, and a Service one to a few virtual servers: a map
/// would store every key twice and allocate room for eleven entries at least.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByKey<T>(Vec<T>);

/// A virtual server's destinations, by address. Cloning shares them, and a change copies
/// them first if they are shared: the reconciler's shadow of the kernel holds the very
/// destinations of the desired state wherever the kernel has exactly those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destinations(Arc<ByKey<Destination>>);

impl Default for Destinations {
    fn default() -> Self {
        Self(Arc::new(ByKey::new()))
    }
}

impl Destinations {
    /// None.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `destination`, or replaces the one at its address (returned).
    pub fn insert(&mut self, destination: Destination) -> Option<Destination> {
        Arc::make_mut(&mut self.0).insert(destination)
    }

    /// Removes the destination at `address`.
    pub fn remove(&mut self, address: &SocketAddr) -> Option<Destination> {
        Arc::make_mut(&mut self.0).remove(address)
    }

    /// Whether these are the very destinations of `other`, not a copy.
    pub fn shared_with(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for Destinations {
    type Target = ByKey<Destination>;

    fn deref(&self) -> &ByKey<Destination> {
        &self.0
    }
}

/// The last of several destinations at one address wins, as with a map.
impl FromIterator<Destination> for Destinations {
    fn from_iter<I: IntoIterator<Item = Destination>>(iter: I) -> Self {
        Self(Arc::new(iter.into_iter().collect()))
    }
}

impl<'a> IntoIterator for &'a Destinations {
    type Item = &'a Destination;
    type IntoIter = std::slice::Iter<'a, Destination>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A Service's virtual servers, by key.
pub type VirtualServers = ByKey<Arc<VirtualServer>>;

impl<T> Default for ByKey<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Keyed> ByKey<T> {
    /// None.
    pub fn new() -> Self {
        Self::default()
    }

    fn position(&self, key: &T::Key) -> Result<usize, usize> {
        self.0.binary_search_by(|item| item.sort_key().cmp(key))
    }

    /// The item with `key`.
    pub fn get(&self, key: &T::Key) -> Option<&T> {
        self.position(key).ok().map(|at| &self.0[at])
    }

    /// Whether there is an item with `key`.
    pub fn contains_key(&self, key: &T::Key) -> bool {
        self.position(key).is_ok()
    }

    /// Adds `item`, or replaces the one with its key (returned).
    pub fn insert(&mut self, item: T) -> Option<T> {
        match self.position(item.sort_key()) {
            Ok(at) => Some(std::mem::replace(&mut self.0[at], item)),
            Err(at) => {
                self.0.insert(at, item);
                None
            }
        }
    }

    /// Removes the item with `key`.
    pub fn remove(&mut self, key: &T::Key) -> Option<T> {
        self.position(key).ok().map(|at| self.0.remove(at))
    }

    /// The item with the least key.
    pub fn first(&self) -> Option<&T> {
        self.0.first()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Their keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &T::Key> {
        self.0.iter().map(Keyed::sort_key)
    }

    /// The items, in key order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

/// The last of several items with one key wins, as with a map.
impl<T: Keyed> FromIterator<T> for ByKey<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        // Kept for long: allocated once, at the most the iterator can yield, rather than grown
        // (what growing leaves behind stays in the allocator's pages beside what is kept).
        let iter = iter.into_iter();
        let (least, most) = iter.size_hint();
        let mut all: Vec<T> = Vec::with_capacity(most.unwrap_or(least));
        all.extend(iter);
        // Stable: among equal keys the last inserted stays last, and is kept.
        all.sort_by(|a, b| a.sort_key().cmp(b.sort_key()));
        all.dedup_by(|later, earlier| {
            let same = later.sort_key() == earlier.sort_key();
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        all.shrink_to_fit();
        Self(all)
    }
}

impl<'a, T> IntoIterator for &'a ByKey<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// One IPVS virtual server and the destinations it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    /// The virtual service as IPVS holds it. Shared, as the destinations are, with the
    /// reconciler's shadow of the kernel wherever the kernel has exactly this service.
    pub service: Arc<VirtualService>,
    /// Its destinations, by address.
    pub destinations: Destinations,
    /// The Service port it implements.
    pub owner: ServicePortName,
    /// What kind of address it is on.
    pub exposure: Exposure,
}

impl VirtualServer {
    /// The key IPVS knows it by.
    pub fn key(&self) -> ServiceKey {
        self.service.key
    }
}

/// Something wrong with an API object: it, or part of it, was skipped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The object, as `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    /// What was wrong, and what was done about it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(address: &str, weight: u32) -> Destination {
        Destination::new(address.parse().unwrap()).with_weight(weight)
    }

    #[test]
    fn destinations_behave_as_a_map_by_address() {
        let mut destinations: Destinations = [
            at("10.0.0.3:80", 1),
            at("10.0.0.1:80", 1),
            at("10.0.0.3:80", 5),
            at("10.0.0.3:80", 7),
        ]
        .into_iter()
        .collect();
        assert_eq!(destinations.len(), 2, "one per address");
        assert_eq!(
            destinations.get(&"10.0.0.3:80".parse().unwrap()),
            Some(&at("10.0.0.3:80", 7)),
            "the last wins"
        );
        assert_eq!(destinations.insert(at("10.0.0.2:80", 1)), None);
        assert_eq!(destinations.insert(at("10.0.0.1:80", 0)), Some(at("10.0.0.1:80", 1)));
        let keys: Vec<String> = destinations.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], "in address order");
        assert_eq!(
            destinations.remove(&"10.0.0.2:80".parse().unwrap()),
            Some(at("10.0.0.2:80", 1))
        );
        assert_eq!(destinations.remove(&"10.0.0.2:80".parse().unwrap()), None);
        assert!(destinations.contains_key(&"10.0.0.1:80".parse().unwrap()));
        assert!(!destinations.contains_key(&"10.0.0.2:80".parse().unwrap()));
        assert_eq!(destinations.iter().map(|d| d.weight).collect::<Vec<_>>(), [0, 7]);
        assert!(Destinations::new().is_empty());
    }

    #[test]
    fn destinations_are_shared_until_one_copy_changes() {
        let one: Destinations = [at("10.0.0.1:80", 1)].into_iter().collect();
        let mut other = one.clone();
        assert!(other.shared_with(&one));
        other.insert(at("10.0.0.2:80", 1));
        assert!(!other.shared_with(&one));
        assert_eq!((one.len(), other.len()), (1, 2), "the change went to the copy only");
        other.remove(&"10.0.0.2:80".parse().unwrap());
        assert_eq!(other, one, "equal again, though not shared");
        assert!(!other.shared_with(&one));
    }
}
