//! Where Services, EndpointSlices and the Node come from: the API server ([`api`]) or a
//! directory of manifests ([`manifests`]). Both send the same [`Input`]s, kube-rs watch
//! events, so the rest of the daemon does not know which one it runs on. The objects in them
//! are shared (`Arc`): a source that keeps its objects and the daemon's cache hold one copy.

pub mod api;
pub mod manifests;

use std::sync::Arc;

use controller::desired::{ServiceInfo, Slice};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::runtime::{reflector::Lookup, watcher::Event};

/// One event from a source.
#[derive(Debug, Clone)]
pub enum Input {
    /// A Service was listed, added, changed or deleted; kept as a [`ServiceInfo`].
    Service(Event<Arc<ServiceInfo>>),
    /// An EndpointSlice was listed, added, changed or deleted; kept as a [`Slice`].
    Slice(Event<Arc<Slice>>),
    /// The node's own Node object.
    Node(Event<Arc<Node>>),
    /// A watch failed (the API server is unreachable, say). The cache keeps what it has and
    /// the kernel keeps its state; the watch retries with backoff.
    WatchFailed {
        /// What was watched: `Service`, `EndpointSlice` or `Node`.
        kind: &'static str,
        /// The error.
        error: String,
    },
}

impl Input {
    /// A Service event, the Service reduced to what the daemon keeps of it.
    pub fn service(event: Event<Service>) -> Self {
        Self::Service(kept(event))
    }

    /// An EndpointSlice event, the slice reduced to what the daemon keeps of it.
    pub fn slice(event: Event<EndpointSlice>) -> Self {
        Self::Slice(kept(event))
    }

    /// A Node event.
    pub fn node(event: Event<Node>) -> Self {
        Self::Node(kept(event))
    }
}

/// An event of an API object turned into one of the object as kept, shared.
fn kept<A, K: From<A>>(event: Event<A>) -> Event<Arc<K>> {
    let kept = |object: A| Arc::new(K::from(object));
    match event {
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(kept(object)),
        Event::InitDone => Event::InitDone,
        Event::Apply(object) => Event::Apply(kept(object)),
        Event::Delete(object) => Event::Delete(kept(object)),
    }
}

fn describe<K: Lookup>(
    f: &mut std::fmt::Formatter<'_>,
    kind: &str,
    event: &Event<Arc<K>>,
) -> std::fmt::Result {
    let name = |k: &Arc<K>| {
        let name = k.name().unwrap_or_default();
        match k.namespace() {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.into_owned(),
        }
    };
    match event {
        Event::Init => write!(f, "{kind} init"),
        Event::InitApply(k) => write!(f, "{kind} list {}", name(k)),
        Event::InitDone => write!(f, "{kind} done"),
        Event::Apply(k) => write!(f, "{kind} apply {}", name(k)),
        Event::Delete(k) => write!(f, "{kind} delete {}", name(k)),
    }
}

/// One line per input, such as `Service apply ns/web` or `EndpointSlice done`.
impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service(event) => describe(f, "Service", event),
            Self::Slice(event) => describe(f, "EndpointSlice", event),
            Self::Node(event) => describe(f, "Node", event),
            Self::WatchFailed { kind, error } => write!(f, "{kind} failed: {error}"),
        }
    }
}

/// What a watch asks the API server for: a label selector and a field selector (either may be
/// empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selectors {
    /// The label selector.
    pub labels: String,
    /// The field selector.
    pub fields: String,
}

/// The Service watch's selectors, as kube-proxy's (`cmd/kube-proxy/app/server.go`): no
/// headless Services (`spec.clusterIP!=None`), and none labelled for another proxy. With a
/// proxy name of its own, Services labelled with a proxy name are filtered after the watch
/// (absent or equal is served), since a label selector cannot say "absent or equal".
///
/// The `service.kubernetes.io/headless` label does not keep a Service out: a Service with a
/// cluster IP that carries it is served like any other, as kube-proxy serves it.
pub fn service_selectors(service_proxy_name: Option<&str>) -> Selectors {
    let labels = match service_proxy_name {
        Some(_) => String::new(),
        None => format!("!{}", controller::desired::SERVICE_PROXY_NAME_LABEL),
    };
    Selectors { labels, fields: "spec.clusterIP!=None".into() }
}

/// The EndpointSlice watch's selectors, as kube-proxy's: none of a headless Service (the
/// EndpointSlice controller labels those `service.kubernetes.io/headless`).
pub fn slice_selectors() -> Selectors {
    Selectors { labels: format!("!{}", controller::desired::HEADLESS_LABEL), fields: String::new() }
}

/// Whether a Service is one the Service watch would send: the rule of [`service_selectors`],
/// for sources that have no API server to apply it (the proxy-name label is left to the
/// controller, as with the API server).
pub fn service_watched(service: &Service) -> bool {
    let cluster_ip = service.spec.as_ref().and_then(|spec| spec.cluster_ip.as_deref());
    cluster_ip != Some("None")
}

/// Whether an EndpointSlice is one the EndpointSlice watch would send: the rule of
/// [`slice_selectors`].
pub fn slice_watched(slice: &EndpointSlice) -> bool {
    let labels = slice.metadata.labels.as_ref();
    !labels.is_some_and(|labels| labels.contains_key(controller::desired::HEADLESS_LABEL))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::json;

    use super::*;

    #[test]
    fn selectors_are_kube_proxys() {
        assert_eq!(
            service_selectors(None),
            Selectors {
                labels: "!service.kubernetes.io/service-proxy-name".into(),
                fields: "spec.clusterIP!=None".into()
            }
        );
        assert_eq!(
            service_selectors(Some("kube-ipvs")),
            Selectors { labels: String::new(), fields: "spec.clusterIP!=None".into() }
        );
        assert_eq!(
            slice_selectors(),
            Selectors { labels: "!service.kubernetes.io/headless".into(), fields: String::new() }
        );
    }

    #[test]
    fn the_manifests_rules_are_the_selectors() {
        let service = |spec: serde_json::Value, labels: serde_json::Value| -> Service {
            serde_json::from_value(
                json!({"metadata": {"name": "s", "labels": labels}, "spec": spec}),
            )
            .unwrap()
        };
        let headless_label = json!({"service.kubernetes.io/headless": ""});
        assert!(service_watched(&service(
            json!({"clusterIP": "10.96.0.1"}),
            headless_label.clone()
        )));
        assert!(service_watched(&service(json!({}), json!({}))));
        assert!(!service_watched(&service(json!({"clusterIP": "None"}), json!({}))));
        let slice = |labels: serde_json::Value| -> EndpointSlice {
            serde_json::from_value(json!({"metadata": {"name": "s-1", "labels": labels},
                                          "addressType": "IPv4", "endpoints": []}))
            .unwrap()
        };
        assert!(slice_watched(&slice(json!({"kubernetes.io/service-name": "s"}))));
        assert!(!slice_watched(&slice(headless_label)));
    }
}
