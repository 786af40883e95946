//! Every Service's contribution joined into one [`DesiredState`], kept up to date as single
//! Services change: the cost of a change is that of the Service that changed, not of all of
//! them. Each change also yields a [`Delta`]: the virtual servers it touched and the netfilter
//! elements that came and went.
//!
//! The rules are those of a join from scratch: a virtual server (or a local-only key) claimed
//! by several Services belongs to the first by namespace and name, and the others are
//! reported; an element several Services need stays while any of them does; local-only keys
//! get their firewall marks from a stable hash, probing on collision in key order.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    sync::Arc,
};

use ipvs_netlink::ServiceKey;
use netfilter::Elements;

use super::{
    DesiredState, LOCAL_MARK_BASE, LOCAL_MARK_SPACE,
    model::{ByKey, Exposure, Problem, VirtualServer},
    service::{LocalKey, LocalOnly, ServiceElements, ServiceState},
};

/// A Service's namespace and name.
pub type ServiceName = super::model::ObjectKey;

/// What changed since the last [`Join::take_delta`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Virtual servers added, changed or removed.
    pub keys: BTreeSet<ServiceKey>,
    /// Elements no longer wanted (and, for a localhost NodePort or a marked port, the value
    /// it had).
    pub removed: Elements,
    /// Elements newly wanted (with their new value).
    pub added: Elements,
}

impl Delta {
    /// Whether kube-ipvs0's addresses changed.
    pub fn addresses_changed(&self) -> bool {
        !self.removed.vips.is_empty() || !self.added.vips.is_empty()
    }
}

/// How many Services want each element wanted by more than one, for every set of
/// [`Elements`]. An element in the joined set and not here is wanted by one Service: most
/// elements (a Service's own address, its endpoints) are kept once, not twice.
#[derive(Debug, Default)]
struct Counts {
    cluster_ips: BTreeMap<netfilter::ServicePort, u32>,
    external_ips: BTreeMap<netfilter::ServicePort, u32>,
    local_external_ips: BTreeMap<netfilter::ServicePort, u32>,
    node_ports: BTreeMap<netfilter::NodePort, u32>,
    vips: BTreeMap<std::net::IpAddr, u32>,
    source_ranges: BTreeMap<(netfilter::ServicePort, ipnetwork::IpNetwork), u32>,
    health_check_node_ports: BTreeMap<u16, u32>,
    hairpin: BTreeMap<std::net::IpAddr, u32>,
}

/// Moves one element's count up or down; when it appears or disappears, updates `current` and
/// the delta (an element that comes back within one delta is no change). `shared` holds the
/// counts of 2 and more (see [`Counts`]); being in `current` counts 1.
fn count<T: Ord + Clone>(
    shared: &mut BTreeMap<T, u32>,
    current: &mut BTreeSet<T>,
    removed: &mut BTreeSet<T>,
    added: &mut BTreeSet<T>,
    item: &T,
    up: bool,
) {
    if up {
        if current.contains(item) {
            *shared.entry(item.clone()).or_insert(1) += 1;
        } else {
            current.insert(item.clone());
            if !removed.remove(item) {
                added.insert(item.clone());
            }
        }
    } else if let Entry::Occupied(mut n) = shared.entry(item.clone()) {
        *n.get_mut() -= 1;
        if *n.get() == 1 {
            n.remove();
        }
    } else if current.remove(item) && !added.remove(item) {
        removed.insert(item.clone());
    }
}

/// Sets `key` of a map to `value` (or removes it), recording the old and new values in the
/// delta; a value that comes back within one delta is no change.
fn put<K: Ord + Clone, V: PartialEq + Clone>(
    current: &mut BTreeMap<K, V>,
    removed: &mut BTreeMap<K, V>,
    added: &mut BTreeMap<K, V>,
    key: &K,
    value: Option<V>,
) {
    let old = match &value {
        Some(v) => current.insert(key.clone(), v.clone()),
        None => current.remove(key),
    };
    if old == value {
        return;
    }
    if let Some(old) = old {
        // The value it had when the delta began is what the kernel holds.
        if added.remove(key).is_none() {
            removed.insert(key.clone(), old);
        }
    }
    if let Some(new) = value {
        if removed.get(key) == Some(&new) {
            removed.remove(key);
        } else {
            added.insert(key.clone(), new);
        }
    }
}

/// The Services that claim one thing, by namespace and name: the first owns it. Nearly always
/// one, so a sorted vector (a `BTreeSet` allocates room for eleven).
type Claimants = ByKey<ServiceName>;

/// The Services' contributions, joined.
#[derive(Debug, Default)]
pub struct Join {
    /// Each Service's contribution, boxed: a B-tree node has room for eleven entries and is
    /// often half full, and a `ServiceState` is over 200 bytes.
    states: BTreeMap<ServiceName, Box<ServiceState>>,
    /// Who claims each virtual server claimed by more than one Service; the first owns it.
    /// A virtual server claimed once is held by its owner (named by its `owner`) alone: most
    /// are, and they need no entry.
    claims: BTreeMap<ServiceKey, Claimants>,
    /// Services whose own state has problems.
    troubled: BTreeSet<ServiceName>,
    /// Who claims each local-only key; the first owns it.
    local: BTreeMap<LocalKey, Claimants>,
    /// The mark of each local-only key.
    marks: BTreeMap<LocalKey, u32>,
    /// The local-only keys changed: the marks are assigned again.
    local_keys_changed: bool,
    /// Local-only keys whose owner's contribution changed.
    local_touched: BTreeSet<LocalKey>,
    localhost_claims: BTreeMap<netfilter::NodePort, Claimants>,
    counts: Counts,
    desired: DesiredState,
    delta: Delta,
    /// The caller will not use the delta (see [`Join::discard_delta`]).
    discarding: bool,
}

impl Join {
    /// Nothing joined yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The joined state. Call [`Join::take_delta`] first after changes: it settles the
    /// local-only virtual servers.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The joined state, settled.
    pub fn into_desired(mut self) -> DesiredState {
        self.take_delta();
        self.desired
    }

    /// One Service's own contribution.
    pub fn state(&self, name: &ServiceName) -> Option<&ServiceState> {
        self.states.get(name).map(AsRef::as_ref)
    }

    /// Every Service's contribution, by name.
    pub fn states(&self) -> &BTreeMap<ServiceName, Box<ServiceState>> {
        &self.states
    }

    /// Replaces the contribution of the Service `name` (`None`: the Service is gone).
    pub fn set(&mut self, name: &ServiceName, state: Option<ServiceState>) {
        let old = self.states.remove(name).map(|old| *old).unwrap_or_default();
        let new = state.unwrap_or_default();
        self.virtual_servers(name, &old, &new);
        self.elements(&old.elements, false);
        self.elements(&new.elements, true);
        self.localhost(name, &old.elements, &new.elements);
        self.local_only(name, &old.local_only, &new.local_only);
        if new.problems.is_empty() {
            self.troubled.remove(name);
        } else {
            self.troubled.insert(name.clone());
        }
        let keep = !new.virtual_servers.is_empty()
            || !new.problems.is_empty()
            || !new.local_only.is_empty()
            || !new.elements.is_empty();
        if keep {
            self.states.insert(name.clone(), Box::new(new));
        }
        if self.discarding {
            self.delta = Delta::default();
        }
    }

    /// Drops the delta, and records none until the next [`Join::take_delta`]: for a caller
    /// that compares everything at its next sync, where the first one would otherwise hold a
    /// second copy of every element.
    pub fn discard_delta(&mut self) {
        self.delta = Delta::default();
        self.discarding = true;
    }

    /// Forgets every contribution: what was joined is removed, as in the delta.
    pub fn clear(&mut self) {
        let names: Vec<ServiceName> = self.states.keys().cloned().collect();
        for name in names {
            self.set(&name, None);
        }
    }

    fn owner_server(&self, key: &ServiceKey) -> Option<Arc<VirtualServer>> {
        let owner = self.claims.get(key)?.first()?;
        self.states.get(owner)?.virtual_servers.get(key).cloned()
    }

    fn virtual_servers(&mut self, name: &ServiceName, old: &ServiceState, new: &ServiceState) {
        for key in old.virtual_servers.keys() {
            if new.virtual_servers.contains_key(key) {
                continue;
            }
            let Some(claimants) = self.claims.get_mut(key) else {
                // Claimed by this Service alone.
                self.desired.virtual_servers.remove(key);
                self.delta.keys.insert(*key);
                continue;
            };
            let owned = claimants.first() == Some(name);
            claimants.remove(name);
            let uncontested = claimants.len() < 2;
            let next = owned.then(|| self.owner_server(key).expect("the next claimant holds it"));
            if uncontested {
                self.claims.remove(key);
            }
            if let Some(next) = next {
                self.desired.virtual_servers.insert(*key, next);
                self.delta.keys.insert(*key);
            }
        }
        for server in &new.virtual_servers {
            let key = &server.service.key;
            debug_assert!(owned_by(server, name));
            if let Some(claimants) = self.claims.get_mut(key) {
                claimants.insert(name.clone());
                if claimants.first() != Some(name) {
                    continue;
                }
            } else if let Some(held) = self.desired.virtual_servers.get(key)
                && !owned_by(held, name)
            {
                // A second claim: the virtual server becomes contested.
                let holder =
                    ServiceName::new(held.owner.namespace.clone(), held.owner.name.clone());
                let claimants: Claimants = [holder, name.clone()].into_iter().collect();
                let first = claimants.first() == Some(name);
                self.claims.insert(*key, claimants);
                if !first {
                    continue;
                }
            }
            if self.desired.virtual_servers.get(key) != Some(server) {
                self.desired.virtual_servers.insert(*key, server.clone());
                self.delta.keys.insert(*key);
            }
        }
    }

    fn elements(&mut self, elements: &ServiceElements, up: bool) {
        macro_rules! sets {
            ($($field:ident),*) => {$(
                for item in &elements.$field {
                    count(
                        &mut self.counts.$field,
                        &mut self.desired.elements.$field,
                        &mut self.delta.removed.$field,
                        &mut self.delta.added.$field,
                        item,
                        up,
                    );
                }
            )*};
        }
        netfilter::for_each_set!(sets);
    }

    fn localhost(&mut self, name: &ServiceName, old: &ServiceElements, new: &ServiceElements) {
        let ports: BTreeSet<netfilter::NodePort> = old
            .localhost_node_ports
            .keys()
            .chain(new.localhost_node_ports.keys())
            .copied()
            .collect();
        for port in ports {
            let claimants = self.localhost_claims.entry(port).or_default();
            if new.localhost_node_ports.contains_key(&port) {
                claimants.insert(name.clone());
            } else {
                claimants.remove(name);
            }
            let owner = claimants.first().cloned();
            if owner.is_none() {
                self.localhost_claims.remove(&port);
            }
            let value = owner.and_then(|owner| {
                let elements =
                    if &owner == name { new } else { &self.states.get(&owner)?.elements };
                elements.localhost_node_ports.get(&port).cloned()
            });
            put(
                &mut self.desired.elements.localhost_node_ports,
                &mut self.delta.removed.localhost_node_ports,
                &mut self.delta.added.localhost_node_ports,
                &port,
                value,
            );
        }
    }

    fn local_only(&mut self, name: &ServiceName, old: &[LocalOnly], new: &[LocalOnly]) {
        for local in old {
            if new.iter().any(|l| l.key == local.key) {
                continue;
            }
            let claimants = self.local.get_mut(&local.key).expect("claimed");
            if claimants.first() == Some(name) {
                self.local_touched.insert(local.key);
            }
            claimants.remove(name);
            if claimants.is_empty() {
                self.local.remove(&local.key);
                self.local_keys_changed = true;
            }
        }
        for local in new {
            let claimants = self.local.entry(local.key).or_default();
            if claimants.is_empty() {
                self.local_keys_changed = true;
            }
            claimants.insert(name.clone());
            let first_for_key = new.iter().find(|l| l.key == local.key) == Some(local);
            if claimants.first() == Some(name) && first_for_key {
                let before = old.iter().find(|l| l.key == local.key);
                if before != Some(local) {
                    self.local_touched.insert(local.key);
                }
            }
        }
    }

    /// The local-only virtual server of `key` with `mark`, from its owner's contribution.
    fn local_server(&self, key: &LocalKey, mark: u32) -> Option<Arc<VirtualServer>> {
        let owner = self.local.get(key)?.first()?;
        let local = self.states.get(owner)?.local_only.iter().find(|l| l.key == *key)?;
        let fwmark = ServiceKey::Fwmark { family: key.family(), mark };
        let mut service = local.template.clone();
        service.key = fwmark;
        service.netmask = ipvs_netlink::Netmask::host(key.family());
        Some(Arc::new(VirtualServer {
            service: service.into(),
            destinations: local.destinations.clone(),
            owner: local.owner.clone(),
            exposure: Exposure::LocalOnly,
        }))
    }

    /// Gives local-only keys their marks (again, if the keys changed) and brings their virtual
    /// servers and mark map entries up to date.
    fn settle_local(&mut self) {
        let mut touched = std::mem::take(&mut self.local_touched);
        if std::mem::take(&mut self.local_keys_changed) {
            let mut marks = BTreeMap::new();
            let mut used = BTreeSet::new();
            for key in self.local.keys() {
                let mut slot = stable_hash(&format!("{key:?}")) % LOCAL_MARK_SPACE;
                while !used.insert(slot) {
                    slot = (slot + 1) % LOCAL_MARK_SPACE;
                }
                marks.insert(*key, LOCAL_MARK_BASE + slot);
            }
            for (key, mark) in &self.marks {
                if marks.get(key) != Some(mark) {
                    touched.insert(*key);
                    let fwmark = ServiceKey::Fwmark { family: key.family(), mark: *mark };
                    self.desired.virtual_servers.remove(&fwmark);
                    self.delta.keys.insert(fwmark);
                }
            }
            touched.extend(marks.keys().filter(|k| self.marks.get(k) != marks.get(k)));
            self.marks = marks;
        }
        for key in touched {
            let mark = self.marks.get(&key).copied();
            if let Some(mark) = mark {
                let fwmark = ServiceKey::Fwmark { family: key.family(), mark };
                match self.local_server(&key, mark) {
                    Some(server) => self.desired.virtual_servers.insert(fwmark, server),
                    None => self.desired.virtual_servers.remove(&fwmark),
                };
                self.delta.keys.insert(fwmark);
            }
            let (e, d) = (&mut self.desired.elements, &mut self.delta);
            match key {
                LocalKey::Address(port) => put(
                    &mut e.local_traffic,
                    &mut d.removed.local_traffic,
                    &mut d.added.local_traffic,
                    &port,
                    mark,
                ),
                LocalKey::NodePort(family, node_port) => put(
                    &mut e.local_node_ports,
                    &mut d.removed.local_node_ports,
                    &mut d.added.local_node_ports,
                    &(family, node_port),
                    mark,
                ),
            }
        }
    }

    /// Settles the joined state and returns what changed since the last call.
    pub fn take_delta(&mut self) -> Delta {
        self.settle_local();
        self.desired.problems = self.problems();
        self.discarding = false;
        std::mem::take(&mut self.delta)
    }

    /// What was skipped and why: the Services' own problems, and virtual servers claimed by
    /// more than one Service. Sorted.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .troubled
            .iter()
            .filter_map(|name| self.states.get(name))
            .flat_map(|state| state.problems.iter().cloned())
            .collect();
        for (key, claimants) in &self.claims {
            let Some(owner) = self.owner_server(key) else { continue };
            for name in claimants.iter().skip(1) {
                let Some(server) = self.states.get(name).and_then(|s| s.virtual_servers.get(key))
                else {
                    continue;
                };
                problems.push(Problem {
                    object: format!("Service {}/{}", server.owner.namespace, server.owner.name),
                    reason: format!(
                        "{key} is already the virtual server of {}; skipped",
                        owner.owner
                    ),
                });
            }
        }
        problems.sort();
        problems
    }
}

/// Whether `server` is the Service `name`'s (its `owner` names it).
fn owned_by(server: &VirtualServer, name: &ServiceName) -> bool {
    server.owner.namespace == name.namespace && server.owner.name == name.name
}

/// A stable hash (FNV-1a): the same key gets the same mark on every start.
fn stable_hash(text: &str) -> u32 {
    text.bytes()
        .fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr, SocketAddrV4};

    use ipvs_netlink::{Destination, Family, Protocol, VirtualService};
    use netfilter::{NodePort, ServicePort};

    use super::*;
    use crate::desired::model::{Destinations, ServicePortName};

    /// A small deterministic generator (xorshift), so failures replay.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn name(i: u64) -> ServiceName {
        ServiceName::new("ns", format!("svc-{i}"))
    }

    fn address(i: u64) -> IpAddr {
        IpAddr::from([10, 96, 0, i as u8])
    }

    /// A random contribution drawn from small pools, so that Services share elements and
    /// collide on virtual servers and local-only keys.
    fn random_state(r: &mut Random, service: &ServiceName) -> ServiceState {
        let mut state = ServiceState::default();
        let mut elements = Elements::default();
        let owner = ServicePortName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            port: "http".into(),
        };
        for _ in 0..r.below(3) {
            let port = ServicePort::new(address(r.below(4)), Protocol::Tcp, 80);
            let key = ServiceKey::Inet {
                protocol: Protocol::Tcp,
                address: SocketAddr::new(port.address, port.port),
            };
            let mut destinations = Destinations::new();
            for _ in 0..r.below(3) {
                let endpoint = SocketAddr::from(([10, 244, 0, r.below(5) as u8], 8080));
                destinations.insert(Destination::new(endpoint));
            }
            let server = VirtualServer {
                service: VirtualService::new(key, "rr").into(),
                destinations,
                owner: owner.clone(),
                exposure: Exposure::ClusterIp,
            };
            state.virtual_servers.insert(Arc::new(server));
            elements.cluster_ips.insert(port);
            elements.vips.insert(port.address);
            if r.below(2) == 0 {
                elements.hairpin.insert(IpAddr::from([10, 244, 0, r.below(5) as u8]));
            }
        }
        if r.below(3) == 0 {
            let node_port = NodePort { protocol: Protocol::Tcp, port: 30000 + r.below(2) as u16 };
            let endpoints = (0..1 + r.below(2))
                .map(|i| SocketAddrV4::new([10, 244, 0, i as u8 + 2].into(), 8080))
                .collect();
            elements.localhost_node_ports.insert(node_port, endpoints);
            elements.node_ports.insert(node_port);
        }
        if r.below(3) == 0 {
            let port =
                ServicePort::new(IpAddr::from([192, 0, 2, r.below(3) as u8]), Protocol::Tcp, 80);
            let key = LocalKey::Address(port);
            let template = VirtualService::new(
                ServiceKey::Fwmark { family: Family::Ipv4, mark: 0 },
                if r.below(2) == 0 { "rr" } else { "lc" },
            );
            state.local_only.push(LocalOnly {
                key,
                template,
                destinations: Destinations::new(),
                owner: owner.clone(),
            });
            elements.local_external_ips.insert(port);
        }
        state.elements = elements.into();
        state
    }

    /// The join from scratch, written plainly: Services in name order, the first claimant
    /// wins, elements are unions, marks probe in key order.
    fn from_scratch(states: &BTreeMap<ServiceName, ServiceState>) -> DesiredState {
        let mut desired = DesiredState::default();
        let mut local: BTreeMap<LocalKey, LocalOnly> = BTreeMap::new();
        for state in states.values() {
            for server in &state.virtual_servers {
                let key = &server.service.key;
                desired.virtual_servers.entry(*key).or_insert_with(|| server.clone());
            }
            let (e, s) = (&mut desired.elements, &state.elements);
            e.cluster_ips.extend(s.cluster_ips.iter().copied());
            e.vips.extend(s.vips.iter().copied());
            e.hairpin.extend(s.hairpin.iter().copied());
            e.node_ports.extend(s.node_ports.iter().copied());
            e.local_external_ips.extend(s.local_external_ips.iter().copied());
            for (port, endpoints) in &s.localhost_node_ports {
                e.localhost_node_ports.entry(*port).or_insert_with(|| endpoints.clone());
            }
            for l in &state.local_only {
                local.entry(l.key).or_insert_with(|| l.clone());
            }
        }
        let mut used = BTreeSet::new();
        for (key, l) in local {
            let mut slot = stable_hash(&format!("{key:?}")) % LOCAL_MARK_SPACE;
            while !used.insert(slot) {
                slot = (slot + 1) % LOCAL_MARK_SPACE;
            }
            let mark = LOCAL_MARK_BASE + slot;
            let fwmark = ServiceKey::Fwmark { family: key.family(), mark };
            let mut service = l.template.clone();
            service.key = fwmark;
            service.netmask = ipvs_netlink::Netmask::host(key.family());
            let server = VirtualServer {
                service: service.into(),
                destinations: l.destinations,
                owner: l.owner,
                exposure: Exposure::LocalOnly,
            };
            desired.virtual_servers.insert(fwmark, Arc::new(server));
            if let LocalKey::Address(port) = key {
                desired.elements.local_traffic.insert(port, mark);
            }
        }
        desired
    }

    #[test]
    fn a_join_kept_up_to_date_equals_the_join_from_scratch_with_deltas_that_add_up() {
        for seed in 1..=40u64 {
            let mut r = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut join = Join::new();
            let mut states: BTreeMap<ServiceName, ServiceState> = BTreeMap::new();
            let mut applied = Elements::default();
            let mut before = DesiredState::default();
            for step in 0..60 {
                // Now and then, a sync that compares everything and drops the delta.
                let full = r.below(6) == 0;
                if full {
                    join.discard_delta();
                }
                // A few Services change at once, as in one sync.
                for _ in 0..1 + r.below(3) {
                    let service = name(r.below(6));
                    if r.below(4) == 0 {
                        states.remove(&service);
                        join.set(&service, None);
                    } else {
                        let state = random_state(&mut r, &service);
                        states.insert(service.clone(), state.clone());
                        join.set(&service, Some(state));
                    }
                }
                let delta = join.take_delta();
                let expected = from_scratch(&states);
                let context = format!("seed {seed}, step {step}");
                assert_eq!(join.desired().virtual_servers, expected.virtual_servers, "{context}");
                assert_eq!(join.desired().elements.vips, expected.elements.vips, "{context}");
                assert_eq!(
                    join.desired().elements,
                    {
                        let mut e = expected.elements.clone();
                        e.local_node_ports.clear();
                        e
                    },
                    "{context}"
                );
                if full {
                    // Not even the addresses were copied; the node is moved to the whole.
                    assert!(delta.added.vips.is_empty() && delta.removed.vips.is_empty());
                    applied = expected.elements.clone();
                    before = expected;
                    continue;
                }
                for (key, server) in &expected.virtual_servers {
                    if before.virtual_servers.get(key) != Some(server) {
                        assert!(delta.keys.contains(key), "{context}: {key} changed unreported");
                    }
                }
                for key in before.virtual_servers.keys() {
                    if !expected.virtual_servers.contains_key(key) {
                        assert!(delta.keys.contains(key), "{context}: {key} removal unreported");
                    }
                }
                // What goes was there, and what comes was not: the delta is exact.
                for vip in &delta.removed.vips {
                    assert!(applied.vips.contains(vip), "{context}: {vip} removed twice");
                }
                for vip in &delta.added.vips {
                    assert!(!applied.vips.contains(vip), "{context}: {vip} added twice");
                }
                applied.apply(&delta.removed, &delta.added);
                assert_eq!(applied, expected.elements, "{context}: the deltas add up");
                before = expected;
            }
        }
    }

    #[test]
    fn a_conflict_is_reported_until_the_owner_goes_and_then_the_other_takes_over() {
        let mut r = Random(7);
        let (a, b) = (name(1), name(2));
        let mut state = random_state(&mut r, &a);
        while state.virtual_servers.is_empty() {
            state = random_state(&mut r, &a);
        }
        let mut other = state.clone();
        other.virtual_servers = state
            .virtual_servers
            .iter()
            .map(|server| {
                let mut server = VirtualServer::clone(server);
                server.owner.name = b.name.clone();
                Arc::new(server)
            })
            .collect();
        let mut join = Join::new();
        join.set(&b, Some(other.clone()));
        join.set(&a, Some(state.clone()));
        join.take_delta();
        assert_eq!(join.problems().len(), state.virtual_servers.len());
        assert!(join.desired().virtual_servers.values().all(|s| s.owner.name == a.name));
        join.set(&a, None);
        let delta = join.take_delta();
        assert!(join.problems().is_empty());
        assert!(join.desired().virtual_servers.values().all(|s| s.owner.name == b.name));
        assert_eq!(delta.keys.len(), state.virtual_servers.len(), "the owner changed");
        assert_eq!(delta.removed, Elements::default(), "the other still needs every element");
    }
}
