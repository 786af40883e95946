//! The metrics on `/metrics`: kube-proxy's, under the names its dashboards and alerts use
//! (`kubeproxy_…`), and kube-ipvs's own (`kube_ipvs_…`).

use std::{collections::HashMap, sync::Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// A label set with one label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Kind {
    /// The label's value.
    pub kind: String,
}

/// `code` of `kubeproxy_proxy_healthz_total` and `…_livez_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Code {
    /// The HTTP status code.
    pub code: String,
}

/// `traffic_policy` of `kubeproxy_sync_proxy_rules_no_local_endpoints_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrafficPolicy {
    /// `internal` or `external`.
    pub traffic_policy: String,
}

/// The kernel's counters of one virtual server, labelled with its Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct VirtualServerLabels {
    /// `namespace/name:port`.
    pub service: String,
    /// As `ipvsadm -Ln` names it: `TCP 10.96.0.1:443`.
    pub virtual_server: String,
}

/// Every metric, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: every sync.
    pub sync_duration: Histogram,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`: syncs of every Service.
    pub full_sync_duration: Histogram,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds`: syncs of the changed Services.
    pub partial_sync_duration: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`.
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`.
    pub last_queued: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `kubeproxy_network_programming_duration_seconds`: from an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` to its change in the kernel.
    pub network_programming: Histogram,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`.
    pub endpoint_changes: Counter,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_pending`.
    pub endpoint_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_service_changes_total`.
    pub service_changes: Counter,
    /// `kubeproxy_sync_proxy_rules_service_changes_pending`.
    pub service_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`: Services with a
    /// `Local` policy and no endpoint on this node.
    pub no_local_endpoints: Family<TrafficPolicy, Gauge>,
    /// `kubeproxy_proxy_healthz_total{code}`.
    pub healthz: Family<Code, Counter>,
    /// `kubeproxy_proxy_livez_total{code}`.
    pub livez: Family<Code, Counter>,
    /// `kube_ipvs_netlink_messages_total{kind}`: IPVS messages sent, by operation.
    pub netlink_messages: Family<Kind, Counter>,
    /// `kube_ipvs_netlink_errors_total{kind}`: IPVS changes the kernel refused, by error.
    pub netlink_errors: Family<Kind, Counter>,
    /// `kube_ipvs_drift_repairs_total{kind}`: state found changed behind kube-ipvs's back and
    /// repaired (`ipvs`, `address`, `netfilter`).
    pub drift_repairs: Family<Kind, Counter>,
    /// `kube_ipvs_full_checks_total`: periodic full checks of the kernel state completed.
    pub full_checks: Counter,
    /// `kube_ipvs_draining_destinations`.
    pub draining: Gauge,
    /// `kube_ipvs_skipped_objects`: objects, or parts of them, that cannot be used.
    pub skipped_objects: Gauge,
    /// `kube_ipvs_watch_errors_total{kind}`: failed watches, by resource.
    pub watch_errors: Family<Kind, Counter>,
    /// `kube_ipvs_virtual_server_{connections,packets_in,…}_total` (with
    /// `--service-traffic-metrics`).
    pub traffic: [Family<VirtualServerLabels, Counter>; 5],
    sent: Mutex<HashMap<String, u64>>,
    traffic_labels: Mutex<std::collections::BTreeSet<VirtualServerLabels>>,
}

/// The names of [`Metrics::traffic`], in order.
pub const TRAFFIC: [&str; 5] =
    ["connections", "packets_in", "packets_out", "bytes_in", "bytes_out"];

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn exponential(start: f64, factor: f64, count: u16) -> Vec<f64> {
    prometheus_client::metrics::histogram::exponential_buckets(start, factor, count).collect()
}

/// kube-proxy's buckets for network programming: 0.25 s to 5 minutes.
fn programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..=59).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sync_buckets = || exponential(0.001, 2.0, 15);
        let m = Self {
            sync_duration: Histogram::new(sync_buckets()),
            full_sync_duration: Histogram::new(sync_buckets()),
            partial_sync_duration: Histogram::new(sync_buckets()),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            network_programming: Histogram::new(programming_buckets()),
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            netlink_messages: Family::default(),
            netlink_errors: Family::default(),
            drift_repairs: Family::default(),
            full_checks: Counter::default(),
            draining: Gauge::default(),
            skipped_objects: Gauge::default(),
            watch_errors: Family::default(),
            traffic: Default::default(),
            sent: Mutex::default(),
            traffic_labels: Mutex::default(),
            registry: Registry::default(),
        };
        {
            let kp = registry.sub_registry_with_prefix("kubeproxy");
            let syncs = "SyncProxyRules latency in seconds";
            kp.register("sync_proxy_rules_duration_seconds", syncs, m.sync_duration.clone());
            kp.register(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                m.full_sync_duration.clone(),
            );
            kp.register(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                m.partial_sync_duration.clone(),
            );
            kp.register(
                "sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                m.last_sync.clone(),
            );
            kp.register(
                "sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                m.last_queued.clone(),
            );
            kp.register(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                m.network_programming.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                m.endpoint_changes.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                m.endpoint_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                m.service_changes.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                m.service_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                m.no_local_endpoints.clone(),
            );
            kp.register("proxy_healthz", "Cumulative proxy healthz HTTP status", m.healthz.clone());
            kp.register("proxy_livez", "Cumulative proxy livez HTTP status", m.livez.clone());
        }
        {
            let own = registry.sub_registry_with_prefix("kube_ipvs");
            own.register(
                "netlink_messages",
                "IPVS netlink messages sent, by operation",
                m.netlink_messages.clone(),
            );
            own.register(
                "netlink_errors",
                "IPVS changes the kernel refused, by error",
                m.netlink_errors.clone(),
            );
            own.register(
                "drift_repairs",
                "Kernel state changed behind kube-ipvs's back and repaired",
                m.drift_repairs.clone(),
            );
            own.register(
                "full_checks",
                "Periodic full checks of the kernel state completed",
                m.full_checks.clone(),
            );
            own.register(
                "draining_destinations",
                "Destinations draining (weight 0) before they are deleted",
                m.draining.clone(),
            );
            own.register(
                "skipped_objects",
                "API objects, or parts of them, that cannot be used",
                m.skipped_objects.clone(),
            );
            own.register("watch_errors", "Failed watches, by resource", m.watch_errors.clone());
            for (name, family) in TRAFFIC.iter().zip(&m.traffic) {
                own.register(
                    format!("virtual_server_{name}"),
                    format!("The kernel's {} counter of a virtual server", name.replace('_', " ")),
                    family.clone(),
                );
            }
        }
        for policy in ["internal", "external"] {
            m.no_local_endpoints
                .get_or_create_owned(&TrafficPolicy { traffic_policy: policy.into() });
        }
        Self { registry, ..m }
    }

    /// Counts the IPVS messages sent since the last call, from the handle's running totals.
    pub fn sent_messages(&self, totals: &HashMap<ipvs_netlink::Operation, u64>) {
        let mut sent = lock(&self.sent);
        for (operation, total) in totals {
            let kind = operation.kind().to_owned();
            let before = sent.insert(kind.clone(), *total).unwrap_or(0);
            self.netlink_messages
                .get_or_create(&Kind { kind })
                .inc_by(total.saturating_sub(before));
        }
    }

    /// Sets the traffic counters of a virtual server to the kernel's values; a counter that
    /// went down (the virtual server was created again) starts over.
    pub fn set_traffic(&self, labels: VirtualServerLabels, values: [u64; 5]) {
        lock(&self.traffic_labels).insert(labels.clone());
        for (family, value) in self.traffic.iter().zip(values) {
            let counter = family.get_or_create_owned(&labels);
            let current = counter.get();
            if value >= current {
                counter.inc_by(value - current);
            } else {
                family.remove(&labels);
                family.get_or_create(&labels).inc_by(value);
            }
        }
    }

    /// Forgets the traffic counters of virtual servers that are gone.
    pub fn retain_traffic(&self, keep: &std::collections::BTreeSet<VirtualServerLabels>) {
        let mut known = lock(&self.traffic_labels);
        for gone in known.iter().filter(|l| !keep.contains(*l)) {
            for family in &self.traffic {
                family.remove(gone);
            }
        }
        known.retain(|l| keep.contains(l));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxys_names_are_exposed() {
        let metrics = Metrics::new();
        metrics.endpoint_changes.inc();
        metrics.sync_duration.observe(0.002);
        metrics.healthz.get_or_create(&Code { code: "200".into() }).inc();
        let text = metrics.encode();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"300.0\"} 0",
            "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert_eq!(programming_buckets().len(), 80);
    }

    #[test]
    fn traffic_counters_follow_the_kernel_and_start_over_when_it_does() {
        let metrics = Metrics::new();
        let labels = VirtualServerLabels {
            service: "ns/web:http".into(),
            virtual_server: "TCP 10.96.0.1:80".into(),
        };
        metrics.set_traffic(labels.clone(), [5, 10, 10, 600, 900]);
        metrics.set_traffic(labels.clone(), [7, 12, 12, 700, 1000]);
        assert_eq!(metrics.traffic[0].get_or_create(&labels).get(), 7);
        metrics.set_traffic(labels.clone(), [1, 1, 1, 60, 60]);
        assert_eq!(metrics.traffic[4].get_or_create(&labels).get(), 60);
        metrics.retain_traffic(&Default::default());
        assert!(!metrics.encode().contains("ns/web:http"));
    }
}
