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

/// The label selector for Services and EndpointSlices, as kube-proxy's: no headless ones,
/// and none that belong to another proxy. With a proxy name of its own, Services labelled
/// with a proxy name are filtered after the watch (absent or equal is served), since a label
/// selector cannot say "absent or equal".
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    let headless = format!("!{}", controller::desired::HEADLESS_LABEL);
    match service_proxy_name {
        Some(_) => headless,
        None => format!("!{},{headless}", controller::desired::SERVICE_PROXY_NAME_LABEL),
    }
}

#[cfg(test)]
mod tests {
    use super::label_selector;

    #[test]
    fn selectors_are_kube_proxys() {
        assert_eq!(
            label_selector(None),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(label_selector(Some("kube-ipvs")), "!service.kubernetes.io/headless");
    }
}
