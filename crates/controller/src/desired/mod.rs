//! The desired state: what the node's kernel must hold, as a pure function of the Services,
//! EndpointSlices and the Node. No I/O.
//!
//! [`service_state`] computes what one Service contributes; it only needs that Service and its
//! own EndpointSlices, so a change to one Service is recomputed alone. [`Join`] joins every
//! Service's contribution and keeps the join up to date as single Services change, reporting
//! virtual servers that two Services both claim. [`desired_state`] is the same join at once,
//! for a whole set of objects.

mod endpoints;
mod join;
mod model;
mod service;
mod service_info;
mod slice;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, sync::Arc};

use ipvs_netlink::ServiceKey;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use netfilter::Elements;

pub use self::{
    join::{Delta, Join, ServiceName},
    model::{
        ByKey, DEFAULT_AFFINITY_TIMEOUT, DEFAULT_SCHEDULER, Destinations, Exposure, HEADLESS_LABEL,
        Keyed, NodeInfo, Problem, ProxyConfig, SCHEDULER_ANNOTATION, SCHEDULER_FLAGS_ANNOTATION,
        SCHEDULERS, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, ServicePortName,
        TRIGGER_TIME_ANNOTATION, VirtualServer, VirtualServers, ZONE_LABEL, node_port_addresses,
    },
    service::{
        LocalKey, LocalOnly, ServiceElements, ServiceState, Skipped, service_state, skipped,
    },
    service_info::{Parsed, ServiceInfo, ServiceInfoPort, ServiceType},
    slice::{Slice, SliceEndpoint, SlicePort},
};

/// What the node must hold for every Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Every virtual server, shared with the contribution of the Service that owns it.
    pub virtual_servers: BTreeMap<ServiceKey, Arc<VirtualServer>>,
    /// The netfilter table's elements; `elements.vips` are kube-ipvs0's addresses.
    pub elements: Elements,
    /// Objects, or parts of them, that were skipped, and why.
    pub problems: Vec<Problem>,
}

/// The first firewall mark of local-only virtual servers.
pub const LOCAL_MARK_BASE: u32 = 0x0010_0000;
/// How many marks there are. They stay below bit 14, so a marked packet never carries the
/// masquerade bit (`0x4000`) and its client address is kept.
pub const LOCAL_MARK_SPACE: u32 = 0x4000;

fn object_name(kind: &str, namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{kind} {}/{}", namespace.unwrap_or_default(), name.unwrap_or_default())
}

/// The EndpointSlices of each Service, by `namespace/name`; slices that name no Service are
/// reported.
pub fn slices_by_service<'a>(
    slices: impl IntoIterator<Item = &'a Slice>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<(String, String), Vec<&'a Slice>> {
    let mut by_service: BTreeMap<(String, String), Vec<&Slice>> = BTreeMap::new();
    for slice in slices {
        match &slice.service {
            Some(service) => by_service
                .entry((slice.namespace.clone(), service.clone()))
                .or_default()
                .push(slice),
            None => problems.push(Problem {
                object: object_name("EndpointSlice", Some(&slice.namespace), Some(&slice.name)),
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
    let mut problems = Vec::new();
    let slices: Vec<Slice> = slices.into_iter().map(Slice::from).collect();
    let mut by_service = slices_by_service(&slices, &mut problems);
    let mut join = Join::new();
    for service in services {
        let service = ServiceInfo::from(service);
        let key = (service.namespace.clone(), service.name.clone());
        let slices = by_service.remove(&key).unwrap_or_default();
        join.set(&key, Some(service_state(&service, &slices, node, config)));
    }
    join.take_delta();
    let mut desired = join.into_desired();
    desired.problems.extend(problems);
    // Slices whose Service is not (yet) known: nothing to program; they are used once it is.
    for ((namespace, name), slices) in by_service {
        for slice in slices {
            desired.problems.push(Problem {
                object: object_name("EndpointSlice", Some(&namespace), Some(&slice.name)),
                reason: format!("its Service {namespace}/{name} is unknown; waiting for it"),
            });
        }
    }
    desired.problems.sort();
    desired
}
