//! The daemon's loop body: events in, the node moved to what they ask for.
//!
//! [`Proxier::handle`] passes each [`Input`] to the change tracker
//! (`controller::changes::ChangeTracker`), which marks the Services it touches dirty.
//! [`Proxier::sync`] has the tracker recompute them (a sync costs what changed, not the number
//! of Services) and applies the result through the node's I/O ([`NodeIo`]): by the delta, or
//! comparing everything after a relist, a change of the node or a failed sync. Until Services
//! and EndpointSlices have both been listed once, nothing is synced: a restart never empties a
//! Service for a moment. [`Proxier::finish_check`] compares the whole kernel state with what
//! was programmed and repairs it. What happens is reported through [`Reports`]; when it
//! happens is the [`Schedule`](crate::schedule::Schedule)'s business.

mod report;
#[cfg(test)]
mod tests;

use std::{net::IpAddr, sync::Arc, time::Instant};

use controller::{
    changes::{Cache, ChangeTracker, Computed, Scope},
    desired::{DesiredState, NodeInfo, ObjectKey, ProxyConfig, node_port_addresses},
    node::NodeIo,
    reconcile::{KernelDigests, Owned},
};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event;
use tracing::{debug, info};

pub use self::report::Reports;
use crate::{
    Error,
    config::NodePortAddresses,
    health::{ProxyHealth, node_eligible},
    inspect::Snapshot,
    metrics::Metrics,
    source::Input,
};

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
pub struct Proxier<N> {
    settings: Settings,
    tracker: ChangeTracker,
    /// The node's own Node object (its zone, addresses and deletion).
    nodes: Cache<Node>,
    /// The node's addresses outside kube-ipvs0.
    local_addresses: Vec<IpAddr>,
    node: N,
    reports: Reports,
    /// A sync succeeded once: there is something to check.
    synced_once: bool,
}

impl<N> std::fmt::Debug for Proxier<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxier")
            .field("services", &self.tracker.services().len())
            .field("dirty", &self.tracker.dirty())
            .field("pending", &self.tracker.pending())
            .finish_non_exhaustive()
    }
}

impl<N: NodeIo> Proxier<N> {
    /// A proxier that programs the node through `node`, and reports to `metrics` and
    /// `health`. `local_addresses` are the node's addresses outside kube-ipvs0.
    pub fn new(
        settings: Settings,
        node: N,
        local_addresses: Vec<IpAddr>,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
    ) -> Self {
        Self {
            tracker: ChangeTracker::new(settings.proxy.clone()),
            settings,
            nodes: Cache::default(),
            local_addresses,
            node,
            reports: Reports::new(metrics, health),
            synced_once: false,
        }
    }

    /// Whether Services and EndpointSlices have both been listed: before that, nothing is
    /// synced, so nothing is removed from the kernel.
    pub fn ready(&self) -> bool {
        self.tracker.ready()
    }

    /// Whether a change waits to be synced.
    pub fn pending(&self) -> bool {
        self.tracker.pending()
    }

    /// Whether destinations are draining (and [`Proxier::drain`] has work).
    pub fn draining(&self) -> bool {
        self.node.draining() > 0
    }

    /// The virtual servers last programmed.
    pub fn desired(&self) -> &DesiredState {
        self.tracker.desired()
    }

    /// The node's I/O.
    pub fn node(&self) -> &N {
        &self.node
    }

    fn queued(&self) {
        self.reports.queued(self.tracker.dirty());
    }

    /// Takes one event in and marks what it touches dirty.
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Service(event) => {
                let first = !self.tracker.services().listed();
                self.tracker.service(&event);
                match &event {
                    Event::Apply(_) | Event::Delete(_) => {
                        self.reports.metrics().service_changes.inc();
                    }
                    Event::InitDone if first => {
                        info!(services = self.tracker.services().len(), "Services listed");
                    }
                    _ => {}
                }
                if matches!(event, Event::Apply(_) | Event::Delete(_) | Event::InitDone) {
                    self.queued();
                }
            }
            Input::Slice(event) => {
                let first = !self.tracker.slices().listed();
                self.tracker.slice(&event);
                match &event {
                    Event::Apply(slice) => {
                        self.reports.metrics().endpoint_changes.inc();
                        self.reports.triggered(slice);
                    }
                    Event::Delete(_) => {
                        self.reports.metrics().endpoint_changes.inc();
                    }
                    Event::InitDone if first => {
                        info!(slices = self.tracker.slices().len(), "EndpointSlices listed");
                    }
                    Event::InitApply(slice) => self.reports.triggered(slice),
                    _ => {}
                }
                if matches!(event, Event::Apply(_) | Event::Delete(_) | Event::InitDone) {
                    self.queued();
                }
                self.reports.metrics().endpoint_changes_pending.set(self.tracker.dirty() as i64);
            }
            Input::Node(event) => {
                let before = self.node_info();
                self.nodes.apply(&event);
                if matches!(event, Event::Apply(_) | Event::Delete(_) | Event::InitDone) {
                    let node = self.own_node();
                    let eligible = node.as_deref().is_none_or(node_eligible);
                    self.reports.health().set_node_eligible(eligible);
                    // The zone label and the addresses affect every Service; the Node's
                    // status updates mostly change neither.
                    if self.node_info() != before {
                        self.everything_changed();
                    }
                }
            }
            Input::WatchFailed { kind, .. } => self.reports.watch_failed(kind),
        }
    }

    fn everything_changed(&mut self) {
        self.tracker.everything_changed();
        self.queued();
    }

    fn own_node(&self) -> Option<Arc<Node>> {
        self.nodes.get(&ObjectKey::new("", self.settings.node_name.clone())).cloned()
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
            self.everything_changed();
        }
    }

    /// Who owns what, from the objects and the kernel.
    async fn ownership(&self, node: &NodeInfo) -> Result<Owned, Error> {
        let elements = &self.tracker.desired().elements;
        let mut service_addresses = self.node.service_addresses().await?;
        service_addresses.extend(elements.vips.iter().copied());
        let node_port_addresses =
            self.local_addresses.iter().chain(&node.node_port_addresses).copied();
        let service_ports =
            [&elements.cluster_ips, &elements.external_ips, &elements.local_external_ips]
                .into_iter()
                .flatten()
                .copied()
                .collect();
        Ok(Owned::new(
            service_ports,
            service_addresses,
            node_port_addresses,
            self.settings.node_port_range.clone(),
            self.settings.exclude_cidrs.clone(),
        ))
    }

    /// Recomputes the dirty Services, and applies what changed. Returns whether anything was
    /// synced (nothing is before the first lists).
    pub async fn sync(&mut self) -> Result<bool, Error> {
        if !self.ready() || !self.pending() {
            return Ok(false);
        }
        let started = Instant::now();
        let node = self.node_info();
        let Computed { scope, services } = self.tracker.compute(&node);
        let computed = started.elapsed();
        let applied = match self.node.apply(self.tracker.desired(), &scope).await {
            Ok(applied) => applied,
            Err(err) => {
                // Nothing is lost: everything is compared again.
                self.everything_changed();
                return Err(err.into());
            }
        };
        self.synced_once = true;
        self.reports.failures(&applied);
        self.reports.problems(self.tracker.problems());
        let full = scope == Scope::Everything;
        let applied_in = started.elapsed();
        self.reports.synced(full, applied_in);
        self.reports.node(&self.node.sent_messages().await, self.node.draining());
        self.reports.local_policies(&self.tracker).await;
        debug!(
            services,
            full,
            compute_us = computed.as_micros() as u64,
            apply_us = (applied_in - computed).as_micros() as u64,
            took_us = applied_in.as_micros() as u64,
            reported_us = started.elapsed().as_micros() as u64,
            "synced"
        );
        Ok(true)
    }

    /// What was last programmed, for the HTTP server: copied only when asked.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            desired: self.tracker.desired().clone(),
            owned: self.node.owned(),
            draining: self.node.draining_destinations(),
        }
    }

    /// Starts the periodic full check, whose IPVS dump is read away from the sync loop (at
    /// 10,000 Services that takes seconds): from now on the virtual servers written are noted.
    /// False before the first sync, when there is nothing to check.
    pub fn begin_check(&mut self) -> bool {
        if self.synced_once {
            self.node.begin_check();
        }
        self.synced_once
    }

    /// Ends the periodic full check with the dumped IPVS table: compares the kernel with what
    /// was programmed, and repairs every difference (a cleared IPVS table, removed addresses,
    /// a deleted netfilter table).
    pub async fn finish_check(&mut self, digests: KernelDigests) -> Result<(), Error> {
        let node = self.node_info();
        let owned = self.ownership(&node).await?;
        let healed = self.node.finish_check(self.tracker.desired(), &owned, digests).await?;
        self.reports.healed(&healed);
        self.reports.node(&self.node.sent_messages().await, self.node.draining());
        Ok(())
    }

    /// Deletes draining destinations whose connections ended or whose bound elapsed.
    pub async fn drain(&mut self) -> Result<(), Error> {
        let done = self.node.drain().await?;
        if done > 0 {
            debug!(destinations = done, "drained destinations deleted");
        }
        self.reports.node(&self.node.sent_messages().await, self.node.draining());
        Ok(())
    }
}
