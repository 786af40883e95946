//! The desired state: what the node's kernel must hold, as a pure function of the Services,
//! EndpointSlices and the Node. No I/O.
//!
//! [`service_state`] computes what one Service contributes; it only needs that Service and its
//! own EndpointSlices, so a change to one Service is recomputed alone. [`desired_state`] joins
//! every Service's contribution, reports objects that cannot be used, and reports virtual
//! servers that two Services both claim.

mod endpoints;
mod model;
mod service;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, btree_map::Entry};

use ipvs_netlink::ServiceKey;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use netfilter::Elements;

pub use self::{
    model::{
        DEFAULT_AFFINITY_TIMEOUT, DEFAULT_SCHEDULER, Exposure, HEADLESS_LABEL, NodeInfo, Problem,
        ProxyConfig, SCHEDULER_ANNOTATION, SCHEDULER_FLAGS_ANNOTATION, SCHEDULERS,
        SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, ServicePortName, VirtualServer, ZONE_LABEL,
        node_port_addresses,
    },
    service::{LocalKey, LocalOnly, ServiceState, Skipped, service_state, skipped},
};

/// What the node must hold for every Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Every virtual server.
    pub virtual_servers: BTreeMap<ServiceKey, VirtualServer>,
    /// The netfilter table's elements; `elements.vips` are kube-ipvs0's addresses.
    pub elements: Elements,
    /// Objects, or parts of them, that were skipped, and why.
    pub problems: Vec<Problem>,
    /// Local-only virtual servers still to get their marks ([`DesiredState::finish`]).
    pub local_only: Vec<LocalOnly>,
}

/// The first firewall mark of local-only virtual servers.
pub const LOCAL_MARK_BASE: u32 = 0x0010_0000;
/// How many marks there are. They stay below bit 14, so a marked packet never carries the
/// masquerade bit (`0x4000`) and its client address is kept.
pub const LOCAL_MARK_SPACE: u32 = 0x4000;

/// A stable hash (FNV-1a): the same key gets the same mark on every start.
fn stable_hash(text: &str) -> u32 {
    text.bytes()
        .fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

impl DesiredState {
    /// Adds one Service's contribution. A virtual server another Service already claims stays
    /// with the first and is reported.
    pub fn merge(&mut self, state: ServiceState) {
        for (key, server) in state.virtual_servers {
            match self.virtual_servers.entry(key) {
                Entry::Vacant(vacant) => {
                    vacant.insert(server);
                }
                Entry::Occupied(taken) => self.problems.push(Problem {
                    object: format!("Service {}/{}", server.owner.namespace, server.owner.name),
                    reason: format!(
                        "{key} is already the virtual server of {}; skipped",
                        taken.get().owner
                    ),
                }),
            }
        }
        let e = &mut self.elements;
        let s = state.elements;
        e.cluster_ips.extend(s.cluster_ips);
        e.external_ips.extend(s.external_ips);
        e.local_external_ips.extend(s.local_external_ips);
        e.node_ports.extend(s.node_ports);
        e.vips.extend(s.vips);
        e.source_ranges.extend(s.source_ranges);
        e.health_check_node_ports.extend(s.health_check_node_ports);
        e.hairpin.extend(s.hairpin);
        e.localhost_node_ports.extend(s.localhost_node_ports);
        self.problems.extend(state.problems);
        self.local_only.extend(state.local_only);
    }

    /// Gives every local-only virtual server its firewall mark, and adds it and its mark map
    /// entry. Marks come from a stable hash of the key, probing on collision in key order, so
    /// the same Services get the same marks on every start.
    pub fn finish(&mut self) {
        let mut pending = std::mem::take(&mut self.local_only);
        pending.sort_by_key(|l| l.key);
        pending.dedup_by_key(|l| l.key);
        let mut used = BTreeSet::new();
        for local in pending {
            let mut slot = stable_hash(&format!("{:?}", local.key)) % LOCAL_MARK_SPACE;
            while !used.insert(slot) {
                slot = (slot + 1) % LOCAL_MARK_SPACE;
            }
            let mark = LOCAL_MARK_BASE + slot;
            let key = ServiceKey::Fwmark { family: local.key.family(), mark };
            let mut service = local.template.clone();
            service.key = key;
            service.netmask = ipvs_netlink::Netmask::host(local.key.family());
            self.virtual_servers.insert(
                key,
                VirtualServer {
                    service,
                    destinations: local.destinations,
                    owner: local.owner,
                    exposure: Exposure::LocalOnly,
                },
            );
            match local.key {
                LocalKey::Address(port) => {
                    self.elements.local_traffic.insert(port, mark);
                }
                LocalKey::NodePort(family, node_port) => {
                    self.elements.local_node_ports.insert((family, node_port), mark);
                }
            }
        }
    }
}

fn object_name(kind: &str, namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{kind} {}/{}", namespace.unwrap_or_default(), name.unwrap_or_default())
}

/// The EndpointSlices of each Service, by `namespace/name`; slices that name no Service are
/// reported.
pub fn slices_by_service<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<(String, String), Vec<&'a EndpointSlice>> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let meta = &slice.metadata;
        match meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            Some(service) => by_service
                .entry((meta.namespace.clone().unwrap_or_default(), service.clone()))
                .or_default()
                .push(slice),
            None => problems.push(Problem {
                object: object_name(
                    "EndpointSlice",
                    meta.namespace.as_deref(),
                    meta.name.as_deref(),
                ),
                reason: format!("has no {SERVICE_NAME_LABEL} label; skipped"),
            }),
        }
    }
    by_service
}

/// What the node must hold for all these Services and EndpointSlices.
pub fn desired_state<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    config: &ProxyConfig,
) -> DesiredState {
    let mut desired = DesiredState::default();
    let mut by_service = slices_by_service(slices, &mut desired.problems);
    for service in services {
        let key = (
            service.metadata.namespace.clone().unwrap_or_default(),
            service.metadata.name.clone().unwrap_or_default(),
        );
        let slices = by_service.remove(&key).unwrap_or_default();
        desired.merge(service_state(service, &slices, node, config));
    }
    // Slices whose Service is not (yet) known: nothing to program; they are used once it is.
    for ((namespace, name), slices) in by_service {
        for slice in slices {
            desired.problems.push(Problem {
                object: object_name(
                    "EndpointSlice",
                    Some(&namespace),
                    slice.metadata.name.as_deref(),
                ),
                reason: format!("its Service {namespace}/{name} is unknown; waiting for it"),
            });
        }
    }
    desired.finish();
    desired.problems.sort();
    desired
}
