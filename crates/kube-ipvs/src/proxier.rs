//! Which Services changed, and the sync that moves the node there.
//!
//! [`Proxier::handle`] feeds each [`Input`] to the object caches ([`Cache`]) and marks the
//! Services it touches dirty. [`Proxier::sync`] recomputes the desired state of the dirty
//! Services only (`controller::desired::service_state`), updates the join of all Services with
//! them (`controller::desired::Join`) and applies the difference that yields
//! (`controller::node::NodeSync`): a sync costs what changed, not the number of Services. Until Services and
//! EndpointSlices have both been listed once, nothing is synced: a restart never empties a
//! Service for a moment. [`Proxier::finish_check`] compares the whole kernel state with what was
//! programmed and repairs it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Instant,
};

use controller::{
    desired::{
        ByKey, DesiredState, Exposure, Join, NodeInfo, Problem, ProxyConfig, SERVICE_NAME_LABEL,
        ServiceInfo, ServiceState, ServiceType, Slice, node_port_addresses, service_state,
    },
    node::NodeSync,
    reconcile::{KernelDigests, Owned},
};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event;
use tracing::{debug, info, warn};

use crate::{
    Error,
    cache::{Cache, key_of},
    config::NodePortAddresses,
    health::{ProxyHealth, node_eligible},
    inspect::Snapshot,
    metrics::{Kind, Metrics, TrafficPolicy},
    service_health::{ServiceHealth, Target},
    source::Input,
};

pub use controller::desired::ServiceName;

/// What the proxier needs to know besides the objects.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The desired-state options.
    pub proxy: ProxyConfig,
    /// This node's name.
    pub node_name: String,
    /// Where NodePorts are served.
    pub node_port_addresses: NodePortAddresses,
    /// The cluster's NodePort range: virtual servers on node addresses in it are kube-ipvs's.
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// `--ipvs-exclude-cidrs`: virtual servers there are kube-ipvs's only if it created them.
    pub exclude_cidrs: Vec<ipnetwork::IpNetwork>,
}

/// The daemon's state between syncs.
pub struct Proxier {
    settings: Settings,
    services: Cache<ServiceInfo>,
    slices: Cache<Slice>,
    nodes: Cache<Node>,
    /// The EndpointSlices of each Service (each stored slice names its Service).
    service_slices: HashMap<ServiceName, ByKey<String>>,
    unlabelled: BTreeSet<ServiceName>,
    dirty: BTreeSet<ServiceName>,
    /// The EndpointSlice trigger times of the changes not synced yet.
    triggers: Vec<Timestamp>,
    /// When this proxier started: earlier trigger times are not measured (as kube-proxy).
    started: Timestamp,
    all_dirty: bool,
    join: Join,
    health_check_ports: BTreeMap<ServiceName, u16>,
    internal_local: BTreeSet<ServiceName>,
    reported: BTreeSet<Problem>,
    local_addresses: Vec<IpAddr>,
    synced_once: bool,
    node: NodeSync,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    service_health: ServiceHealth,
}

impl std::fmt::Debug for Proxier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxier")
            .field("services", &self.join.states().len())
            .field("dirty", &self.dirty.len())
            .field("all_dirty", &self.all_dirty)
            .finish_non_exhaustive()
    }
}

fn trigger_time(slice: &Slice) -> Option<Timestamp> {
    slice.trigger_time.as_deref()?.parse().ok()
}

/// The healthCheckNodePort of a LoadBalancer Service with `externalTrafficPolicy: Local`.
fn health_check_port(service: &ServiceInfo) -> Option<u16> {
    let balanced = service.type_ == ServiceType::LoadBalancer;
    (service.external_local && balanced)
        .then_some(service.health_check_node_port?)
        .and_then(|p| u16::try_from(p).ok())
}

impl Proxier {
    /// A proxier that programs the node through `node`, and reports to `metrics` and
    /// `health`. `local_addresses` are the node's addresses outside kube-ipvs0.
    pub fn new(
        settings: Settings,
        node: NodeSync,
        local_addresses: Vec<IpAddr>,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
    ) -> Self {
        Self {
            settings,
            services: Cache::default(),
            slices: Cache::default(),
            nodes: Cache::default(),
            service_slices: HashMap::new(),
            unlabelled: BTreeSet::new(),
            dirty: BTreeSet::new(),
            triggers: Vec::new(),
            started: Timestamp::now(),
            all_dirty: true,
            join: Join::new(),
            health_check_ports: BTreeMap::new(),
            internal_local: BTreeSet::new(),
            reported: BTreeSet::new(),
            local_addresses,
            synced_once: false,
            node,
            service_health: ServiceHealth::new(health.clone()),
            metrics,
            health,
        }
    }

    /// Whether Services and EndpointSlices have both been listed: before that, nothing is
    /// synced, so nothing is removed from the kernel.
    pub fn ready(&self) -> bool {
        self.services.listed() && self.slices.listed()
    }

    /// Whether a change waits to be synced.
    pub fn pending(&self) -> bool {
        self.all_dirty || !self.dirty.is_empty()
    }

    /// Whether destinations are draining (and [`Proxier::drain`] has work).
    pub fn draining(&self) -> bool {
        self.node.reconciler.draining().next().is_some()
    }

    /// The virtual servers last programmed.
    pub fn desired(&self) -> &DesiredState {
        self.join.desired()
    }

    fn mark(&mut self, service: ServiceName) {
        self.dirty.insert(service);
        self.queued();
    }

    /// Keeps the slice's trigger time, to measure network programming latency.
    fn triggered(&mut self, slice: &Slice) {
        // Trigger times have a resolution of one second.
        let since = self.started - jiff::SignedDuration::from_secs(1);
        self.triggers.extend(trigger_time(slice).filter(|t| *t >= since));
    }

    fn queued(&self) {
        self.health.queued();
        self.metrics.last_queued.set(Timestamp::now().as_millisecond() as f64 / 1000.0);
        self.metrics.service_changes_pending.set(self.dirty.len() as i64);
    }

    /// The Service the stored version of `slice` belongs to.
    fn service_of(&self, slice: &Slice) -> Option<String> {
        self.slices.get(&slice.namespace, &slice.name)?.service.clone()
    }

    /// Files `slice` under its Service; `before` is the Service it belonged to (marked dirty
    /// if that changed). Returns its Service.
    fn index_slice(&mut self, slice: &Slice, before: Option<String>) -> Option<ServiceName> {
        if before.is_some()
            && before != slice.service
            && let Some(old) = self.unindex_slice(slice, before)
        {
            self.mark(old);
        }
        let key = key_of(slice);
        match &slice.service {
            Some(service) => {
                self.unlabelled.remove(&key);
                let service = (key.0, service.clone());
                self.service_slices.entry(service.clone()).or_default().insert(key.1);
                Some(service)
            }
            None => {
                self.unlabelled.insert(key);
                None
            }
        }
    }

    /// Takes `slice` out of the slices of `before`, the Service it belonged to. Returns that
    /// Service.
    fn unindex_slice(&mut self, slice: &Slice, before: Option<String>) -> Option<ServiceName> {
        let key = key_of(slice);
        self.unlabelled.remove(&key);
        let service = (key.0, before?);
        if let Some(set) = self.service_slices.get_mut(&service) {
            set.remove(&key.1);
            if set.is_empty() {
                self.service_slices.remove(&service);
            }
        }
        Some(service)
    }

    fn reindex_slices(&mut self) {
        self.service_slices.clear();
        self.unlabelled.clear();
        let slices: Vec<Arc<Slice>> = self.slices.objects().cloned().collect();
        for slice in slices {
            self.index_slice(&slice, None);
        }
    }

    fn relisted(&mut self) {
        self.all_dirty = true;
        self.queued();
    }

    /// Takes one event into the cache and marks what it touches dirty.
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Service(event) => {
                let first = !self.services.listed();
                self.services.apply(&event);
                match &event {
                    Event::Apply(service) | Event::Delete(service) => {
                        self.metrics.service_changes.inc();
                        self.mark(key_of(service.as_ref()));
                    }
                    Event::InitDone => {
                        if first {
                            info!(services = self.services.len(), "Services listed");
                        }
                        self.relisted();
                    }
                    Event::Init | Event::InitApply(_) => {}
                }
            }
            Input::Slice(event) => {
                // The Service the slice belonged to, before this event.
                let before = match &event {
                    Event::Apply(slice) | Event::Delete(slice) => self.service_of(slice),
                    _ => None,
                };
                let first = !self.slices.listed();
                self.slices.apply(&event);
                match &event {
                    Event::Apply(slice) => {
                        self.metrics.endpoint_changes.inc();
                        self.triggered(slice);
                        if let Some(service) = self.index_slice(slice, before) {
                            self.mark(service);
                        }
                    }
                    Event::Delete(slice) => {
                        self.metrics.endpoint_changes.inc();
                        if let Some(service) = self.unindex_slice(slice, before) {
                            self.mark(service);
                        }
                    }
                    Event::InitDone => {
                        if first {
                            info!(slices = self.slices.len(), "EndpointSlices listed");
                        }
                        self.reindex_slices();
                        self.relisted();
                    }
                    Event::InitApply(slice) => self.triggered(slice),
                    Event::Init => {}
                }
                self.metrics.endpoint_changes_pending.set(self.dirty.len() as i64);
            }
            Input::Node(event) => {
                let before = self.node_info();
                self.nodes.apply(&event);
                match &event {
                    Event::Apply(_) | Event::Delete(_) | Event::InitDone => {
                        let node = self.own_node();
                        let eligible = node.as_deref().is_none_or(node_eligible);
                        self.health.set_node_eligible(eligible);
                        // The zone label and the addresses affect every Service; the Node's
                        // status updates mostly change neither.
                        if self.node_info() != before {
                            self.relisted();
                        }
                    }
                    Event::Init | Event::InitApply(_) => {}
                }
            }
            Input::WatchFailed { kind, .. } => {
                self.metrics.watch_errors.get_or_create(&Kind { kind: kind.to_owned() }).inc();
            }
        }
    }

    fn own_node(&self) -> Option<Arc<Node>> {
        self.nodes.get("", &self.settings.node_name).cloned()
    }

    fn node_info(&self) -> NodeInfo {
        let node = self.own_node();
        let addresses = match &self.settings.node_port_addresses {
            NodePortAddresses::All => node_port_addresses(&self.local_addresses, &[]),
            NodePortAddresses::Cidrs(cidrs) => node_port_addresses(&self.local_addresses, cidrs),
            NodePortAddresses::Primary => {
                let mut primary: Vec<IpAddr> = node
                    .as_deref()
                    .and_then(|n| n.status.as_ref()?.addresses.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect();
                primary.sort();
                primary.dedup();
                primary
            }
        };
        match node {
            Some(node) => NodeInfo::from_node(&node, addresses, self.local_addresses.clone()),
            None => NodeInfo {
                name: self.settings.node_name.clone(),
                zone: None,
                node_port_addresses: addresses,
                local_addresses: self.local_addresses.clone(),
            },
        }
    }

    /// Sets the node's addresses outside kube-ipvs0 (read again at every full check); a
    /// change recomputes every Service.
    pub fn set_local_addresses(&mut self, mut addresses: Vec<IpAddr>) {
        addresses.sort();
        addresses.dedup();
        if addresses != self.local_addresses {
            info!(?addresses, "the node's addresses changed");
            self.local_addresses = addresses;
            self.relisted();
        }
    }

    fn state_of(&self, name: &ServiceName, service: &ServiceInfo, node: &NodeInfo) -> ServiceState {
        let slices: Vec<&Slice> = self
            .service_slices
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(&name.0, slice))
            .map(AsRef::as_ref)
            .collect();
        service_state(service, &slices, node, &self.settings.proxy)
    }

    /// Who owns what, from the objects and the kernel.
    async fn ownership(&self, node: &NodeInfo) -> Result<Owned, Error> {
        let mut service_addresses =
            self.node.link.addresses().await.map_err(controller::Error::from)?;
        service_addresses.extend(self.join.desired().elements.vips.iter().copied());
        let mut node_port_addresses: BTreeSet<IpAddr> =
            self.local_addresses.iter().copied().collect();
        node_port_addresses.extend(node.node_port_addresses.iter().copied());
        node_port_addresses.insert(Ipv4Addr::LOCALHOST.into());
        let elements = &self.join.desired().elements;
        let service_ports =
            [&elements.cluster_ips, &elements.external_ips, &elements.local_external_ips]
                .into_iter()
                .flatten()
                .copied()
                .collect();
        Ok(Owned {
            service_ports,
            service_addresses,
            node_port_addresses,
            node_port_range: self.settings.node_port_range.clone(),
            exclude_cidrs: self.settings.exclude_cidrs.clone(),
        })
    }

    /// Recomputes the dirty Services, and applies what changed. Returns whether anything was
    /// synced (nothing is before the first lists).
    pub async fn sync(&mut self) -> Result<bool, Error> {
        if !self.ready() || !self.pending() {
            return Ok(false);
        }
        let started = Instant::now();
        let node = self.node_info();
        let full = self.all_dirty || !self.synced_once;
        let dirty = std::mem::take(&mut self.dirty);
        if full {
            // The node compares everything; a delta would only copy it.
            self.join.discard_delta();
        }
        let names: BTreeSet<ServiceName> = if full {
            // Every Service known, and every one joined (those gone since).
            let mut names: BTreeSet<ServiceName> =
                self.services.objects().map(|s| key_of(s.as_ref())).collect();
            names.extend(self.join.states().keys().cloned());
            names.extend(self.health_check_ports.keys().cloned());
            names.extend(self.internal_local.iter().cloned());
            names
        } else {
            dirty
        };
        for name in &names {
            let service = self.services.get(&name.0, &name.1).cloned();
            let state = service.as_ref().map(|service| self.state_of(name, service, &node));
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
        let delta = self.join.take_delta();
        let computed = started.elapsed();
        let desired = self.join.desired();
        let mut problems = desired.problems.clone();
        for (namespace, name) in &self.unlabelled {
            problems.push(Problem {
                object: format!("EndpointSlice {namespace}/{name}"),
                reason: format!("has no {SERVICE_NAME_LABEL} label; skipped"),
            });
        }
        problems.sort();

        // A full sync compares everything, so that it also repairs what a failed one left.
        let result = self.node.apply(desired, (!full).then_some(&delta)).await;
        let applied = match result {
            Ok(applied) => applied,
            Err(err) => {
                // Nothing is lost: everything is synced again.
                self.all_dirty = true;
                self.queued();
                return Err(err.into());
            }
        };
        for err in &applied.ipvs.failed {
            warn!(%err, "IPVS change failed; retried at the next full check");
            let kind = err.kind().to_owned();
            self.metrics.netlink_errors.get_or_create(&Kind { kind }).inc();
        }
        if !applied.ipvs.failed.is_empty() || !applied.addresses.failed.is_empty() {
            // The shadow knows what failed; the next full check repairs it.
            debug!("partial failures are left to the periodic full check");
        }
        self.report(&problems);
        self.all_dirty = false;
        self.synced_once = true;
        let applied_in = started.elapsed();
        self.after_sync(full, applied_in).await;
        debug!(
            services = names.len(),
            full,
            compute_us = computed.as_micros() as u64,
            apply_us = (applied_in - computed).as_micros() as u64,
            took_us = applied_in.as_micros() as u64,
            reported_us = started.elapsed().as_micros() as u64,
            "synced"
        );
        Ok(true)
    }

    fn report(&mut self, problems: &[Problem]) {
        let now: BTreeSet<Problem> = problems.iter().cloned().collect();
        for problem in now.difference(&self.reported) {
            warn!(object = %problem.object, reason = %problem.reason, "skipped");
        }
        self.metrics.skipped_objects.set(now.len() as i64);
        self.reported = now;
    }

    async fn after_sync(&mut self, full: bool, took: std::time::Duration) {
        let seconds = took.as_secs_f64();
        self.metrics.sync_duration.observe(seconds);
        if full {
            self.metrics.full_sync_duration.observe(seconds);
        } else {
            self.metrics.partial_sync_duration.observe(seconds);
        }
        let now = Timestamp::now();
        self.metrics.last_sync.set(now.as_millisecond() as f64 / 1000.0);
        for trigger in std::mem::take(&mut self.triggers) {
            let latency = now.duration_since(trigger).as_secs_f64();
            if latency >= 0.0 {
                self.metrics.network_programming.observe(latency);
            }
        }
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
        self.metrics.sent_messages(&self.node.reconciler.ipvs().sent_messages().await);
        self.metrics.draining.set(self.node.reconciler.draining().count() as i64);
        self.health.updated();

        let mut no_local = 0;
        let mut wanted = BTreeMap::new();
        for (name, port) in &self.health_check_ports {
            // This node's endpoints: those of the Service's local-only virtual servers.
            let local: BTreeSet<IpAddr> = self
                .join
                .state(name)
                .into_iter()
                .flat_map(|state| &state.local_only)
                .flat_map(|local| local.destinations.keys().map(|a| a.ip()))
                .collect();
            let local_endpoints = local.len();
            if local_endpoints == 0 {
                no_local += 1;
            }
            let target =
                Target { namespace: name.0.clone(), name: name.1.clone(), local_endpoints };
            wanted.insert(*port, target);
        }
        let served = |name: &ServiceName| {
            self.join.state(name).is_some_and(|state| {
                state
                    .virtual_servers
                    .iter()
                    .any(|s| s.exposure == Exposure::ClusterIp && !s.destinations.is_empty())
            })
        };
        let no_local_internal = self.internal_local.iter().filter(|name| !served(name)).count();
        for (policy, count) in [("external", no_local), ("internal", no_local_internal)] {
            let labels = TrafficPolicy { traffic_policy: policy.into() };
            self.metrics.no_local_endpoints.get_or_create(&labels).set(count as i64);
        }
        self.service_health.sync(wanted).await;
    }

    /// What was last programmed, for the HTTP server: copied only when asked.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            desired: self.join.desired().clone(),
            owned: self.node.reconciler.shadow().keys().copied().collect(),
            draining: self.node.reconciler.draining().copied().collect(),
        }
    }

    /// Starts the periodic full check, whose IPVS dump is read away from the sync loop (at
    /// 10,000 Services that takes seconds): from now on the virtual servers written are noted.
    /// False before the first sync, when there is nothing to check.
    pub fn begin_check(&mut self) -> bool {
        if self.synced_once {
            self.node.reconciler.begin_check();
        }
        self.synced_once
    }

    /// Ends the periodic full check with the dumped IPVS table: compares the kernel with what
    /// was programmed, and repairs every difference (a cleared IPVS table, removed addresses,
    /// a deleted netfilter table).
    pub async fn finish_check(&mut self, digests: KernelDigests) -> Result<(), Error> {
        let node = self.node_info();
        let owned = self.ownership(&node).await?;
        let healed = self.node.finish_check(self.join.desired(), &owned, digests).await?;
        let repairs = [
            ("ipvs", healed.virtual_servers),
            ("address", healed.addresses),
            ("netfilter", usize::from(healed.netfilter)),
        ];
        for (kind, count) in repairs {
            if count > 0 {
                let counter = self.metrics.drift_repairs.get_or_create(&Kind { kind: kind.into() });
                counter.inc_by(count as u64);
            }
        }
        self.metrics.sent_messages(&self.node.reconciler.ipvs().sent_messages().await);
        self.metrics.full_checks.inc();
        Ok(())
    }

    /// Deletes draining destinations whose connections ended or whose bound elapsed.
    pub async fn drain(&mut self) -> Result<(), Error> {
        let done = self.node.reconciler.drain().await?;
        if !done.is_empty() {
            debug!(destinations = done.len(), "drained destinations deleted");
        }
        self.metrics.draining.set(self.node.reconciler.draining().count() as i64);
        self.metrics.sent_messages(&self.node.reconciler.ipvs().sent_messages().await);
        Ok(())
    }
}
