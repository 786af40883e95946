//! The cluster's API objects: Nodes, the Services of every type and policy, and the
//! EndpointSlices the test writes as the EndpointSlice controller would.

use std::net::{Ipv4Addr, SocketAddr};

use serde_json::{Value, json};

/// The namespace of the workloads.
pub const NAMESPACE: &str = "apps";

/// A Service address in `10.96.1.0/24`.
pub const fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 1, last)
}

/// `web`: NodePort, TCP 80 → 8080 (NodePort 30080) and UDP 53 → 5353 (NodePort 30053).
pub const WEB: Ipv4Addr = vip(10);
/// `sticky`: ClientIP session affinity.
pub const STICKY: Ipv4Addr = vip(11);
/// `local`: a LoadBalancer at [`LOCAL_INGRESS`] (NodePort 30081) with
/// `externalTrafficPolicy: Local`, health check node port 30300.
pub const LOCAL: Ipv4Addr = vip(12);
/// `internal`: `internalTrafficPolicy: Local`.
pub const INTERNAL: Ipv4Addr = vip(13);
/// `zoned`: topology-aware routing (`service.kubernetes.io/topology-mode: Auto`).
pub const ZONED: Ipv4Addr = vip(14);
/// `lb`: a LoadBalancer at [`LB_INGRESS`] admitting one source range.
pub const LB: Ipv4Addr = vip(15);
/// `hairpin`: one endpoint, which asks it.
pub const HAIRPIN: Ipv4Addr = vip(16);
/// `local`'s load-balancer address.
pub const LOCAL_INGRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
/// The load balancer's ingress address.
pub const LB_INGRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// NodePorts.
pub const WEB_NODE_PORT: u16 = 30080;
/// `web`'s UDP NodePort.
pub const WEB_UDP_NODE_PORT: u16 = 30053;
/// `local`'s NodePort.
pub const LOCAL_NODE_PORT: u16 = 30081;
/// `local`'s health check node port.
pub const HEALTH_CHECK_NODE_PORT: u16 = 30300;
/// `lb`'s NodePort.
pub const LB_NODE_PORT: u16 = 30082;

/// A Node with its zone and address.
pub fn node(name: &str, zone: &str, ip: Ipv4Addr, pod_cidr: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()},
                                 {"type": "Hostname", "address": name}]},
    })
}

fn http() -> Value {
    json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080})
}

/// A Service in [`NAMESPACE`] at `ip` with `spec` merged over a ClusterIP spec with one TCP
/// port 80 → 8080.
pub fn service(name: &str, ip: Ipv4Addr, spec: Value) -> Value {
    let mut object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "ipFamilies": ["IPv4"], "ports": [http()]},
    });
    if let (Some(base), Some(extra)) = (object["spec"].as_object_mut(), spec.as_object()) {
        for (key, value) in extra {
            base.insert(key.clone(), value.clone());
        }
    }
    object
}

/// Every Service of the workload, and the API server's own `default/kubernetes`; `lb`
/// admits `allowed` only.
pub fn services(allowed: Ipv4Addr) -> Vec<Value> {
    let mut lb = service(
        "lb",
        LB,
        json!({"type": "LoadBalancer", "loadBalancerSourceRanges": [format!("{allowed}/32")],
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": LB_NODE_PORT}]}),
    );
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": LB_INGRESS.to_string()}]}});
    // Kubernetes gives a health check node port to Local LoadBalancers only.
    let mut local = service(
        "local",
        LOCAL,
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
               "healthCheckNodePort": HEALTH_CHECK_NODE_PORT,
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": LOCAL_NODE_PORT}]}),
    );
    local["status"] = json!({"loadBalancer": {"ingress": [{"ip": LOCAL_INGRESS.to_string()}]}});
    let mut zoned = service("zoned", ZONED, json!({}));
    zoned["metadata"]["annotations"] = json!({"service.kubernetes.io/topology-mode": "Auto"});
    vec![
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "kubernetes", "namespace": "default",
                            "labels": {"component": "apiserver", "provider": "kubernetes"}},
               "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                        "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}}),
        service(
            "web",
            WEB,
            json!({"type": "NodePort", "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": WEB_NODE_PORT},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": WEB_UDP_NODE_PORT}]}),
        ),
        service(
            "sticky",
            STICKY,
            json!({"sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}}}),
        ),
        local,
        service("internal", INTERNAL, json!({"internalTrafficPolicy": "Local"})),
        zoned,
        lb,
        service("hairpin", HAIRPIN, json!({})),
    ]
}

/// One endpoint of a slice, with the conditions the EndpointSlice controller writes.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The pod's name.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// The node's zone.
    pub zone: String,
    /// Ready: serving and not terminating.
    pub ready: bool,
    /// Serving (passes its readiness probe), terminating or not.
    pub serving: bool,
    /// Being deleted.
    pub terminating: bool,
}

impl Endpoint {
    /// A ready endpoint.
    pub fn ready(ip: Ipv4Addr, pod: &str, node: &str, zone: &str) -> Self {
        Self {
            ip,
            pod: pod.to_owned(),
            node: node.to_owned(),
            zone: zone.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// The same endpoint terminating, still serving: as a pod in its grace period.
    pub fn terminating(&self) -> Self {
        Self { ready: false, serving: true, terminating: true, ..self.clone() }
    }
}

/// The EndpointSlice of Service `service` (namespace [`NAMESPACE`]) with `endpoints`, the
/// ports of `web` (TCP `http` 8080, UDP `dns` 5353), the trigger-time annotation set to now,
/// and with `hints` each endpoint hinted for its own zone.
pub fn slice(service: &str, endpoints: &[Endpoint], hints: bool) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut endpoint = json!({
                "addresses": [e.ip.to_string()], "nodeName": e.node, "zone": e.zone,
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": e.pod},
            });
            if hints {
                endpoint["hints"] = json!({"forZones": [{"name": e.zone}]});
            }
            endpoint
        })
        .collect();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints,
    })
}

/// The API server's own endpoint in `default/kubernetes`.
pub fn kubernetes_slice(api: SocketAddr) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "ports": [{"name": "https", "port": api.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": [api.ip().to_string()], "conditions": {"ready": true}}],
    })
}
