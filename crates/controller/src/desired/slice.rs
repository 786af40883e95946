//! EndpointSlices as kube-ipvs keeps them: only what the desired state reads. A k8s-openapi
//! `EndpointSlice` of ten endpoints takes about 5 KiB (each `Endpoint` carries an
//! `ObjectReference`, hints and conditions inline); a [`Slice`] about a third of that. At
//! 10,000 Services the difference is tens of MiB.
//!
//! [`Slice`] implements kube-rs's `Lookup` (kind, name and namespace), which is all the change
//! tracker's cache (`changes::Cache`) needs of it: no 360 bytes of a whole `ObjectMeta`.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::model::{SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION};

/// An EndpointSlice, reduced to what the desired state reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slice {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The Service it belongs to: its `kubernetes.io/service-name` label.
    pub service: Option<String>,
    /// Its `endpoints.kubernetes.io/last-change-trigger-time` annotation, as written.
    pub trigger_time: Option<String>,
    /// Its ports.
    pub ports: Vec<SlicePort>,
    /// Its endpoints.
    pub endpoints: Vec<SliceEndpoint>,
    /// The first addresses of endpoints that are not IP addresses (empty for an endpoint
    /// with no address): those endpoints are dropped, and reported when the slice is used.
    pub invalid_addresses: Vec<String>,
}

/// A port of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlicePort {
    /// Its name (empty when unnamed).
    pub name: String,
    /// Its protocol (`TCP` when unset).
    pub protocol: String,
    /// Its number, as written (checked when used).
    pub port: Option<i32>,
}

/// An endpoint of an EndpointSlice, its conditions defaulted as the API defines them. 40
/// bytes, and nothing of its own on the heap unless it has topology hints: a cluster holds
/// one per pod behind a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its first address. The API defines no meaning for the others (the EndpointSlice
    /// controller writes exactly one), and kube-proxy reads only the first.
    pub address: IpAddr,
    /// Ready (an unknown readiness counts as ready).
    pub ready: bool,
    /// Serving (unknown: as ready).
    pub serving: bool,
    /// Terminating (unknown: not).
    pub terminating: bool,
    /// The node it runs on: one allocation per node name, shared by the endpoints on it
    /// (an `Arc<String>` is one pointer, where an `Arc<str>` is two).
    pub node_name: Option<Arc<String>>,
    /// Its topology hints, if it has any.
    pub hints: Option<Box<Hints>>,
}

/// The topology hints of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// The zones they name.
    pub zones: Vec<String>,
    /// The nodes they name.
    pub nodes: Vec<String>,
}

/// Node names, each held once and shared. A name no endpoint holds any more is forgotten
/// when a new one comes, so nodes that come and go leave nothing behind.
#[derive(Debug, Default)]
struct NodeNames(BTreeSet<Arc<String>>);

impl NodeNames {
    /// `name`, shared with every endpoint on the same node.
    fn share(&mut self, name: String) -> Arc<String> {
        if let Some(known) = self.0.get(&name) {
            return known.clone();
        }
        self.0.retain(|known| Arc::strong_count(known) > 1);
        let name = Arc::new(name);
        self.0.insert(name.clone());
        name
    }
}

/// `name` from the process's [`NodeNames`].
fn shared_node_name(name: String) -> Arc<String> {
    static NAMES: LazyLock<Mutex<NodeNames>> = LazyLock::new(Mutex::default);
    NAMES.lock().unwrap_or_else(PoisonError::into_inner).share(name)
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Self {
        let EndpointSlice { metadata, ports, endpoints, .. } = slice;
        let mut invalid_addresses = Vec::new();
        let endpoints = endpoints.unwrap_or_default();
        // Kept for long: allocated once at its size, not grown (what growing leaves behind
        // stays in the allocator's pages among the long-lived objects).
        let mut kept = Vec::with_capacity(endpoints.len());
        kept.extend(endpoints.into_iter().filter_map(|endpoint| {
            let first = endpoint.addresses.into_iter().next().unwrap_or_default();
            let Ok(address) = first.parse() else {
                invalid_addresses.push(first);
                return None;
            };
            let conditions = endpoint.conditions.unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            let hints = endpoint.hints.unwrap_or_default();
            let hints = Hints {
                zones: hints.for_zones.into_iter().flatten().map(|z| z.name).collect(),
                nodes: hints.for_nodes.into_iter().flatten().map(|n| n.name).collect(),
            };
            Some(SliceEndpoint {
                address,
                ready,
                serving: conditions.serving.unwrap_or(ready),
                terminating: conditions.terminating.unwrap_or(false),
                node_name: endpoint.node_name.map(shared_node_name),
                hints: (hints != Hints::default()).then(|| Box::new(hints)),
            })
        }));
        // No room for the endpoints that were dropped.
        kept.shrink_to_fit();
        let ports = ports
            .into_iter()
            .flatten()
            .map(|port| SlicePort {
                name: port.name.unwrap_or_default(),
                protocol: port.protocol.unwrap_or_else(|| "TCP".into()),
                port: port.port,
            })
            .collect();
        Self {
            service: metadata.labels.and_then(|mut l| l.remove(SERVICE_NAME_LABEL)),
            trigger_time: metadata.annotations.and_then(|mut a| a.remove(TRIGGER_TIME_ANNOTATION)),
            name: metadata.name.unwrap_or_default(),
            namespace: metadata.namespace.unwrap_or_default(),
            ports,
            endpoints: kept,
            invalid_addresses,
        }
    }
}

super::model::kept_api_object!(Slice, EndpointSlice);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_keeps_what_the_desired_state_reads() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "ns", "resourceVersion": "7", "uid": "u",
                         "labels": {SERVICE_NAME_LABEL: "web", "other": "x"},
                         "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-01T00:00:00Z"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"port": 53, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.0.5", "not-an-ip"], "nodeName": "node-a",
                 "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "ns"},
                 "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]}},
                {"addresses": ["fd00::5"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["not-an-ip", "10.244.0.6"]},
                {"addresses": []}
            ]
        }))
        .unwrap();
        let slice = Slice::from(slice);
        assert_eq!((slice.name.as_str(), slice.namespace.as_str()), ("web-1", "ns"));
        assert_eq!(slice.service.as_deref(), Some("web"));
        assert_eq!(slice.trigger_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(
            slice.ports,
            [
                SlicePort { name: "http".into(), protocol: "TCP".into(), port: Some(8080) },
                SlicePort { name: String::new(), protocol: "UDP".into(), port: Some(53) },
            ]
        );
        // Only first addresses count: the second of the first endpoint is not looked at, and
        // the endpoints whose first address is not one are dropped.
        assert_eq!(slice.invalid_addresses, ["not-an-ip", ""]);
        assert_eq!(
            slice.endpoints,
            [
                SliceEndpoint {
                    address: "10.244.0.5".parse().unwrap(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some(Arc::new("node-a".into())),
                    hints: Some(Box::new(Hints {
                        zones: vec!["z1".into()],
                        nodes: vec!["node-a".into()]
                    })),
                },
                SliceEndpoint {
                    address: "fd00::5".parse().unwrap(),
                    ready: false,
                    serving: false,
                    terminating: true,
                    node_name: None,
                    hints: None,
                },
            ]
        );
        assert_eq!(std::mem::size_of::<SliceEndpoint>(), 40);
    }

    #[test]
    fn endpoints_on_one_node_share_its_name() {
        // Names of its own: the process's are shared with the tests that run beside this one.
        let mut names = NodeNames::default();
        let mut shared_node_name = |name: &str| names.share(name.into());
        let a = shared_node_name("node-shared");
        let b = shared_node_name("node-shared");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.as_str(), "node-shared");
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(weak.upgrade().is_some(), "still known");
        // Forgotten once no endpoint holds it and another name comes.
        let _other = shared_node_name("node-other");
        assert!(weak.upgrade().is_none(), "forgotten");
    }
}
