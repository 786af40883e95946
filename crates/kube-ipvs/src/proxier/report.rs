//! What the sync loop tells the world: the metrics, `/healthz`, the healthCheckNodePort
//! servers, and a warning for each object newly skipped.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use controller::{
    changes::ChangeTracker,
    desired::{Exposure, Problem, ServiceName, Slice},
    node::{Applied, Healed},
};
use ipvs_netlink::Operation;
use jiff::Timestamp;
use tracing::{debug, warn};

use crate::{
    health::ProxyHealth,
    metrics::{Kind, Metrics, TrafficPolicy},
    service_health::{ServiceHealth, Target},
};

/// The proxier's reports, and what they remember between syncs.
pub struct Reports {
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    service_health: ServiceHealth,
    /// The problems last reported: each is warned about once.
    reported: BTreeSet<Problem>,
    /// The EndpointSlice trigger times of the changes not synced yet.
    triggers: Vec<Timestamp>,
    /// When this proxier started: earlier trigger times are not measured (as kube-proxy).
    started: Timestamp,
}

fn trigger_time(slice: &Slice) -> Option<Timestamp> {
    slice.trigger_time.as_deref()?.parse().ok()
}

impl Reports {
    /// Reports to `metrics` and `health`.
    pub fn new(metrics: Arc<Metrics>, health: Arc<ProxyHealth>) -> Self {
        Self {
            service_health: ServiceHealth::new(health.clone()),
            metrics,
            health,
            reported: BTreeSet::new(),
            triggers: Vec::new(),
            started: Timestamp::now(),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `/healthz`'s state.
    pub fn health(&self) -> &ProxyHealth {
        &self.health
    }

    /// A change waits to be synced; `dirty` Services wait to be recomputed.
    pub fn queued(&self, dirty: usize) {
        self.health.queued();
        self.metrics.last_queued.set(Timestamp::now().as_millisecond() as f64 / 1000.0);
        self.metrics.service_changes_pending.set(dirty as i64);
    }

    /// Keeps the slice's trigger time, to measure network programming latency.
    pub fn triggered(&mut self, slice: &Slice) {
        // Trigger times have a resolution of one second.
        let since = self.started - jiff::SignedDuration::from_secs(1);
        self.triggers.extend(trigger_time(slice).filter(|t| *t >= since));
    }

    /// A watch of `kind` failed.
    pub fn watch_failed(&self, kind: &str) {
        self.metrics.watch_errors.get_or_create(&Kind { kind: kind.to_owned() }).inc();
    }

    /// The changes the kernel refused in a sync: the next full check repairs them.
    pub fn failures(&self, applied: &Applied) {
        for err in &applied.ipvs.failed {
            warn!(%err, "IPVS change failed; retried at the next full check");
            let kind = err.kind().to_owned();
            self.metrics.netlink_errors.get_or_create(&Kind { kind }).inc();
        }
        if !applied.ipvs.failed.is_empty() || !applied.addresses.failed.is_empty() {
            // The shadow knows what failed; the next full check repairs it.
            debug!("partial failures are left to the periodic full check");
        }
    }

    /// What is skipped now: each problem not reported before is warned about.
    pub fn problems(&mut self, problems: Vec<Problem>) {
        let now: BTreeSet<Problem> = problems.into_iter().collect();
        for problem in now.difference(&self.reported) {
            warn!(object = %problem.object, reason = %problem.reason, "skipped");
        }
        self.metrics.skipped_objects.set(now.len() as i64);
        self.reported = now;
    }

    /// A sync (`full`: of everything) took `took`.
    pub fn synced(&mut self, full: bool, took: Duration) {
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
        self.health.updated();
    }

    /// The node's counts: IPVS messages sent, destinations draining.
    pub fn node(&self, sent: &HashMap<Operation, u64>, draining: usize) {
        self.metrics.sent_messages(sent);
        self.metrics.draining.set(draining as i64);
    }

    /// What a full check healed.
    pub fn healed(&self, healed: &Healed) {
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
        self.metrics.full_checks.inc();
    }

    /// The Services with a traffic policy of `Local`: the healthCheckNodePort servers answer
    /// with this node's endpoints, and the metrics count those without any.
    pub async fn local_policies(&mut self, tracker: &ChangeTracker) {
        let mut no_local = 0;
        let mut wanted = BTreeMap::new();
        for (name, port) in tracker.health_check_ports() {
            // This node's endpoints: those of the Service's local-only virtual servers.
            let local: BTreeSet<IpAddr> = tracker
                .state(name)
                .into_iter()
                .flat_map(|state| &state.local_only)
                .flat_map(|local| local.destinations.keys().map(|a| a.ip()))
                .collect();
            let local_endpoints = local.len();
            if local_endpoints == 0 {
                no_local += 1;
            }
            let target = Target {
                namespace: name.namespace.clone(),
                name: name.name.clone(),
                local_endpoints,
            };
            wanted.insert(*port, target);
        }
        let served = |name: &ServiceName| {
            tracker.state(name).is_some_and(|state| {
                state
                    .virtual_servers
                    .iter()
                    .any(|s| s.exposure == Exposure::ClusterIp && !s.destinations.is_empty())
            })
        };
        let no_local_internal =
            tracker.internal_local().iter().filter(|name| !served(name)).count();
        for (policy, count) in [("external", no_local), ("internal", no_local_internal)] {
            let labels = TrafficPolicy { traffic_policy: policy.into() };
            self.metrics.no_local_endpoints.get_or_create(&labels).set(count as i64);
        }
        self.service_health.sync(wanted).await;
    }
}
