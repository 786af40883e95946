//! The proxy's health, as kube-proxy reports it on `/healthz` and `/livez`: unhealthy when a
//! change has been waiting longer than twice the sync period; `/healthz` also when the node
//! is being deleted (a deletion timestamp, or the cluster autoscaler's taint).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct State {
    last_updated: Option<Timestamp>,
    oldest_queued: Option<Instant>,
    node_eligible: bool,
}

/// Shared between the sync loop, which reports, and the HTTP server, which answers.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<State>,
}

/// One answer of `/healthz` or `/livez`.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// 200 or 503.
    pub healthy: bool,
    /// kube-proxy's JSON body.
    pub body: Body,
}

/// kube-proxy's JSON body, its fields in kube-proxy's order.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Body {
    /// The last sync, or now when healthy.
    pub last_updated: String,
    /// Now.
    pub current_time: String,
    /// Whether the node is not being deleted (`/healthz` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
    /// Whether healthy.
    pub healthy: bool,
    /// Per IP family.
    pub status: std::collections::BTreeMap<&'static str, FamilyStatus>,
}

/// The health of one IP family.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyStatus {
    /// Its last sync.
    pub last_updated: String,
    /// Whether nothing waits longer than the timeout.
    pub healthy: bool,
}

/// Whether a Node is not being deleted: no deletion timestamp and no autoscaler taint.
pub fn node_eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

impl ProxyHealth {
    /// Health with kube-proxy's timeout: twice the sync period.
    pub fn new(sync_period: Duration) -> Self {
        Self {
            timeout: sync_period * 2,
            state: Mutex::new(State {
                last_updated: None,
                oldest_queued: None,
                node_eligible: true,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change is waiting to be synced (only the oldest counts).
    pub fn queued(&self) {
        self.state().oldest_queued.get_or_insert_with(Instant::now);
    }

    /// Everything queued was synced.
    pub fn updated(&self) {
        let mut state = self.state();
        state.last_updated = Some(Timestamp::now());
        state.oldest_queued = None;
    }

    /// Whether the node is not being deleted.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// The answer of `/healthz` (`liveness: false`) or `/livez` (`liveness: true`).
    pub fn answer(&self, liveness: bool) -> Answer {
        let state = self.state();
        let now = Timestamp::now();
        let synced = state.oldest_queued.is_none_or(|queued| queued.elapsed() <= self.timeout);
        let healthy = synced && (liveness || state.node_eligible);
        let last = state.last_updated.map(|t| t.to_string()).unwrap_or_default();
        let family = FamilyStatus { last_updated: last.clone(), healthy: synced };
        let body = Body {
            last_updated: if synced { Timestamp::now().to_string() } else { last },
            current_time: now.to_string(),
            node_eligible: (!liveness).then_some(state.node_eligible),
            healthy,
            status: [("IPv4", family.clone()), ("IPv6", family)].into(),
        };
        Answer { healthy, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_change_waiting_longer_than_twice_the_sync_period_is_unhealthy() {
        let health = ProxyHealth::new(Duration::from_millis(5));
        assert!(health.answer(false).healthy, "nothing queued");
        health.queued();
        assert!(health.answer(false).healthy, "queued just now");
        std::thread::sleep(Duration::from_millis(20));
        let answer = health.answer(true);
        assert!(!answer.healthy);
        assert!(!answer.body.status["IPv4"].healthy);
        health.updated();
        assert!(health.answer(false).healthy);
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let health = ProxyHealth::new(Duration::from_secs(30));
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "a"},
            "spec": {"taints": [{"key": TO_BE_DELETED_TAINT, "effect": "NoSchedule"}]}
        }))
        .unwrap();
        health.set_node_eligible(node_eligible(&node));
        let healthz = health.answer(false);
        assert!(!healthz.healthy);
        let text = serde_json::to_string(&healthz.body).unwrap();
        let fields: Vec<&str> = ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"]
            .into_iter()
            .filter(|f| text.contains(&format!("\"{f}\":")))
            .collect();
        assert_eq!(fields.len(), 5, "{text}");
        assert!(
            text.contains("\"nodeEligible\":false,\"healthy\":false,\"status\":{\"IPv4\":"),
            "{text}"
        );
        let livez = serde_json::to_string(&health.answer(true).body).unwrap();
        assert!(health.answer(true).healthy);
        assert!(!livez.contains("nodeEligible"), "as kube-proxy's /livez: {livez}");
    }
}
