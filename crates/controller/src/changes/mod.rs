//! From watch events to what the node must change, without I/O.
//!
//! The [`ChangeTracker`] keeps the Services and EndpointSlices as the watch events leave them
//! ([`Cache`]), files each slice under the Service it names ([`SliceIndex`]) and marks the
//! Services an event touches dirty. [`ChangeTracker::compute`] recomputes the dirty Services
//! only (`desired::service_state`), updates the join of all of them (`desired::Join`) and says
//! what the node must compare: a [`Scope`]. Until Services and EndpointSlices have both been
//! listed once, it is not [`ready`](ChangeTracker::ready): a restart never empties a Service
//! for a moment.
//!
//! [`desired_state`] runs the same tracker over a whole set of objects at once: the golden
//! tests and the benchmarks compute the desired state as the daemon does.

mod cache;
mod index;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event;

pub use self::{cache::Cache, index::SliceIndex};
use crate::desired::{
    Delta, DesiredState, Join, NodeInfo, ObjectKey, Problem, ProxyConfig, ServiceInfo, ServiceName,
    ServiceState, ServiceType, Slice, service_state,
};

/// What the node must compare with the desired state at a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything: at the first sync, after a relist, after a change of the node that touches
    /// every Service, and after a sync that failed.
    Everything,
    /// The virtual servers and elements this delta names, and nothing else.
    Changed(Box<Delta>),
}

/// What one [`ChangeTracker::compute`] did.
#[derive(Debug)]
pub struct Computed {
    /// What the node must compare.
    pub scope: Scope,
    /// How many Services were recomputed.
    pub services: usize,
}

/// The Services and EndpointSlices, which of them changed, and the joined desired state.
#[derive(Debug)]
pub struct ChangeTracker {
    config: ProxyConfig,
    services: Cache<ServiceInfo>,
    slices: Cache<Slice>,
    index: SliceIndex,
    /// Services changed since the last [`ChangeTracker::compute`].
    dirty: BTreeSet<ServiceName>,
    /// Every Service is to be recomputed and the node compared whole.
    everything: bool,
    join: Join,
    /// The healthCheckNodePort of each LoadBalancer Service with `externalTrafficPolicy:
    /// Local`.
    health_check_ports: BTreeMap<ServiceName, u16>,
    /// Services with `internalTrafficPolicy: Local`.
    internal_local: BTreeSet<ServiceName>,
}

/// The healthCheckNodePort of a LoadBalancer Service with `externalTrafficPolicy: Local`.
fn health_check_port(service: &ServiceInfo) -> Option<u16> {
    let balanced = service.type_ == ServiceType::LoadBalancer;
    (service.external_local && balanced)
        .then_some(service.health_check_node_port?)
        .and_then(|p| u16::try_from(p).ok())
}

impl ChangeTracker {
    /// Nothing listed yet.
    pub fn new(config: ProxyConfig) -> Self {
        Self {
            config,
            services: Cache::default(),
            slices: Cache::default(),
            index: SliceIndex::default(),
            dirty: BTreeSet::new(),
            everything: true,
            join: Join::new(),
            health_check_ports: BTreeMap::new(),
            internal_local: BTreeSet::new(),
        }
    }

    /// Takes a Service event in.
    pub fn service(&mut self, event: &Event<Arc<ServiceInfo>>) {
        self.services.apply(event);
        match event {
            Event::Apply(service) | Event::Delete(service) => {
                self.dirty.insert(ObjectKey::of(service.as_ref()));
            }
            Event::InitDone => self.everything = true,
            Event::Init | Event::InitApply(_) => {}
        }
    }

    /// Takes an EndpointSlice event in: the Service it names is dirty, and so is the one it
    /// named before if that changed.
    pub fn slice(&mut self, event: &Event<Arc<Slice>>) {
        // The Service the slice belonged to, before this event.
        let before = match event {
            Event::Apply(slice) | Event::Delete(slice) => {
                self.slices.get(&ObjectKey::of(slice.as_ref())).and_then(|s| s.service.clone())
            }
            _ => None,
        };
        self.slices.apply(event);
        match event {
            Event::Apply(slice) => {
                if before.is_some()
                    && before != slice.service
                    && let Some(old) = self.index.remove(slice, before.as_deref())
                {
                    self.dirty.insert(old);
                }
                self.dirty.extend(self.index.insert(slice));
            }
            Event::Delete(slice) => self.dirty.extend(self.index.remove(slice, before.as_deref())),
            Event::InitDone => {
                self.index.rebuild(self.slices.objects().map(AsRef::as_ref));
                self.everything = true;
            }
            Event::Init | Event::InitApply(_) => {}
        }
    }

    /// Something every Service depends on changed (the node's zone or addresses): every
    /// Service is recomputed, and the node compared whole. Also after a failed sync: what it
    /// left is repaired.
    pub fn everything_changed(&mut self) {
        self.everything = true;
    }

    /// Whether Services and EndpointSlices have both been listed: before that, nothing may be
    /// synced, so nothing is removed from the kernel.
    pub fn ready(&self) -> bool {
        self.services.listed() && self.slices.listed()
    }

    /// Whether a change waits to be computed.
    pub fn pending(&self) -> bool {
        self.everything || !self.dirty.is_empty()
    }

    /// How many Services wait to be recomputed (not counting a recompute of everything).
    pub fn dirty(&self) -> usize {
        self.dirty.len()
    }

    /// The Services, as the events left them.
    pub fn services(&self) -> &Cache<ServiceInfo> {
        &self.services
    }

    /// The EndpointSlices, as the events left them.
    pub fn slices(&self) -> &Cache<Slice> {
        &self.slices
    }

    /// Recomputes the dirty Services (or all of them) for the node `node`, and says what the
    /// node must compare.
    pub fn compute(&mut self, node: &NodeInfo) -> Computed {
        let everything = std::mem::take(&mut self.everything);
        let dirty = std::mem::take(&mut self.dirty);
        let names = if everything {
            // The node compares everything; a delta would only copy it.
            self.join.discard_delta();
            // Every Service known, and every one joined (those gone since).
            let mut names: BTreeSet<ServiceName> =
                self.services.objects().map(|s| ObjectKey::of(s.as_ref())).collect();
            names.extend(self.join.states().keys().cloned());
            names.extend(self.health_check_ports.keys().cloned());
            names.extend(self.internal_local.iter().cloned());
            names
        } else {
            dirty
        };
        for name in &names {
            self.recompute(name, node);
        }
        let delta = self.join.take_delta();
        let scope = if everything { Scope::Everything } else { Scope::Changed(Box::new(delta)) };
        Computed { scope, services: names.len() }
    }

    fn recompute(&mut self, name: &ServiceName, node: &NodeInfo) {
        let service = self.services.get(name).cloned();
        let state = service.as_deref().map(|service| self.state_of(name, service, node));
        self.join.set(name, state);
        match service.as_deref().and_then(health_check_port) {
            Some(port) => self.health_check_ports.insert(name.clone(), port),
            None => self.health_check_ports.remove(name),
        };
        if service.as_ref().is_some_and(|s| s.internal_local) {
            self.internal_local.insert(name.clone());
        } else {
            self.internal_local.remove(name);
        }
    }

    fn state_of(&self, name: &ServiceName, service: &ServiceInfo, node: &NodeInfo) -> ServiceState {
        let slices: Vec<&Slice> = self
            .index
            .slices_of(name)
            .filter_map(|key| self.slices.get(&key))
            .map(AsRef::as_ref)
            .collect();
        service_state(service, &slices, node, &self.config)
    }

    /// The desired state as last computed.
    pub fn desired(&self) -> &DesiredState {
        self.join.desired()
    }

    /// One Service's contribution, as last computed.
    pub fn state(&self, name: &ServiceName) -> Option<&ServiceState> {
        self.join.state(name)
    }

    /// The healthCheckNodePort of each LoadBalancer Service with `externalTrafficPolicy:
    /// Local`, as last computed.
    pub fn health_check_ports(&self) -> &BTreeMap<ServiceName, u16> {
        &self.health_check_ports
    }

    /// The Services with `internalTrafficPolicy: Local`, as last computed.
    pub fn internal_local(&self) -> &BTreeSet<ServiceName> {
        &self.internal_local
    }

    /// What was skipped and why, sorted: the Services' problems, virtual servers claimed twice,
    /// and EndpointSlices that name no Service.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = self.desired().problems.clone();
        problems.extend(self.index.problems());
        problems.sort();
        problems
    }

    /// EndpointSlices whose Service is not known (yet): nothing is programmed for them until
    /// it is. Not a problem in a cluster, where a slice outlives its Service for a moment;
    /// reported for a set of objects read at once.
    pub fn waiting(&self) -> Vec<Problem> {
        let mut waiting = Vec::new();
        for service in self.index.services() {
            if self.services.get(service).is_some() {
                continue;
            }
            for slice in self.index.slices_of(service) {
                waiting.push(Problem {
                    object: format!("EndpointSlice {slice}"),
                    reason: format!("its Service {service} is unknown; waiting for it"),
                });
            }
        }
        waiting.sort();
        waiting
    }
}

impl ChangeTracker {
    /// A tracker that took `services` and `slices` as the watches' first lists deliver them,
    /// and computed once for `node`: as the daemon's first sync leaves it.
    pub fn listed<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        node: &NodeInfo,
        config: &ProxyConfig,
    ) -> Self {
        let mut tracker = ChangeTracker::new(config.clone());
        tracker.service(&Event::Init);
        for service in services {
            tracker.service(&Event::InitApply(Arc::new(ServiceInfo::from(service))));
        }
        tracker.service(&Event::InitDone);
        tracker.slice(&Event::Init);
        for slice in slices {
            tracker.slice(&Event::InitApply(Arc::new(Slice::from(slice))));
        }
        tracker.slice(&Event::InitDone);
        tracker.compute(node);
        tracker
    }
}

/// What the node must hold for all these Services and EndpointSlices, as the daemon computes
/// it once they are listed; its problems include the slices [waiting](ChangeTracker::waiting)
/// for their Service.
pub fn desired_state<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    config: &ProxyConfig,
) -> DesiredState {
    let tracker = ChangeTracker::listed(services, slices, node, config);
    let mut problems = tracker.problems();
    problems.extend(tracker.waiting());
    problems.sort();
    let mut desired = tracker.join.into_desired();
    desired.problems = problems;
    desired
}
