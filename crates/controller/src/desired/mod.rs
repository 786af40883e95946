//! The desired state: what the node's kernel must hold, as a pure function of the Services,
//! EndpointSlices and the Node. No I/O.
//!
//! [`service_state`] computes what one Service contributes; it only needs that Service and its
//! own EndpointSlices, so a change to one Service is recomputed alone. [`Join`] joins every
//! Service's contribution and keeps the join up to date as single Services change, reporting
//! virtual servers that two Services both claim. `changes::ChangeTracker` decides which
//! Services to recompute, and `changes::desired_state` runs it over a whole set of objects.

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
use netfilter::Elements;

pub use self::{
    join::{Delta, Join, ServiceName},
    model::{
        ByKey, DEFAULT_AFFINITY_TIMEOUT, DEFAULT_SCHEDULER, Destinations, Exposure, HEADLESS_LABEL,
        Keyed, NodeInfo, ObjectKey, Problem, ProxyConfig, SCHEDULER_ANNOTATION,
        SCHEDULER_FLAGS_ANNOTATION, SCHEDULERS, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL,
        ServicePortName, TRIGGER_TIME_ANNOTATION, VirtualServer, VirtualServers, ZONE_LABEL,
        node_port_addresses,
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
