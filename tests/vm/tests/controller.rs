//! From API objects to the kernel, with real traffic: `desired_state`, the reconciler,
//! kube-ipvs0 and the netfilter table together.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use controller::{
    desired::{DesiredState, NodeInfo, ProxyConfig, desired_state},
    reconcile::Reconciler,
};
use dummy_link::{DummyLink, KUBE_IPVS0};
use ipvs_netlink::{IpvsHandle, ServiceKey};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use netfilter::{Config, Netfilter};
use serde_json::json;
use vm_tests::{Answer, CLIENT_IP, CLUSTER_CIDR, NODE_IP, Topology, sh, tcp_ask};

const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// A LoadBalancer Service with externalTrafficPolicy Local, NodePort 30081.
fn service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30081}]},
        "status": {"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}}
    }))
    .unwrap()
}

/// Its endpoints: the pods, with the nodes they are said to run on.
fn slice(topology: &Topology, nodes: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = topology
        .pods
        .iter()
        .zip(nodes)
        .map(|(pod, node)| json!({"addresses": [pod.ip.to_string()], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

struct Node {
    topology: Topology,
    reconciler: Reconciler,
    link: DummyLink,
    netfilter: Netfilter,
}

impl Node {
    async fn new() -> Self {
        sh("modprobe", &["br_netfilter"]);
        // Three endpoint pods, and a fourth as an in-cluster client.
        let topology = Topology::new(4);
        sh("sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"]);
        let plan = sysctl_settings::plan(
            Default::default(),
            sysctl_settings::KernelVersion::running().unwrap(),
        );
        sysctl_settings::apply(&plan).unwrap();
        let ipvs = IpvsHandle::new().unwrap();
        let owned = |_: &ServiceKey| true;
        Self {
            topology,
            reconciler: Reconciler::adopt(ipvs, &owned, Duration::from_secs(60)).await.unwrap(),
            link: DummyLink::ensure(dummy_link::connect().unwrap(), KUBE_IPVS0).await.unwrap(),
            netfilter: Netfilter::new(Config {
                cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
                ..Config::default()
            }),
        }
    }

    /// Programs the node for these endpoint placements; masquerade rules go first.
    async fn program(&mut self, nodes: &[&str]) -> DesiredState {
        let node = NodeInfo {
            name: "node-a".into(),
            zone: None,
            node_port_addresses: vec![NODE_IP.into()],
            local_addresses: vec![NODE_IP.into()],
        };
        let slice = slice(&self.topology, nodes);
        let desired = desired_state([&service()], [&slice], &node, &ProxyConfig::default());
        assert!(desired.problems.is_empty(), "{:?}", desired.problems);
        self.netfilter.update(&desired.elements).await.unwrap();
        assert!(self.link.sync(&desired.elements.vips).await.is_complete());
        let report = self.reconciler.sync(&desired.virtual_servers, None).await;
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        desired
    }
}

fn ask_many(times: usize, address: SocketAddr) -> Vec<Answer> {
    (0..times).map(|_| tcp_ask(address).unwrap()).collect()
}

fn names(answers: &[Answer]) -> BTreeSet<String> {
    answers.iter().map(|a| a.from.clone()).collect()
}

#[tokio::test]
async fn external_traffic_policy_local_for_outside_and_inside_clients() {
    let mut node = Node::new().await;
    // pod1 and pod2 on this node, pod3 elsewhere.
    node.program(&["node-a", "node-a", "node-b"]).await;
    let local: BTreeSet<String> = ["pod1".to_owned(), "pod2".to_owned()].into();

    for address in [SocketAddr::from((LB_IP, 80)), SocketAddr::from((NODE_IP, 30081))] {
        // From outside: this node's endpoints only, and the client's own address is kept.
        let outside = node.topology.client.run(|| ask_many(8, address));
        assert_eq!(names(&outside), local, "{address}");
        assert!(outside.iter().all(|a| a.peer == IpAddr::from(CLIENT_IP)), "{outside:?}");
    }
    // From a pod: every endpoint, the remote one included.
    let endpoints: BTreeSet<String> = ["pod1", "pod2", "pod3"].map(String::from).into();
    let client = &node.topology.pods[3];
    let inside = client.netns.run(|| ask_many(9, SocketAddr::from((LB_IP, 80))));
    assert_eq!(names(&inside), endpoints);

    // No endpoint on this node any more: outside clients are refused, inside ones still served.
    node.program(&["node-b", "node-b", "node-b"]).await;
    let refused = node.topology.client.run(|| tcp_ask(SocketAddr::from((LB_IP, 80))));
    assert!(refused.is_err(), "{refused:?}");
    let client = &node.topology.pods[3];
    let inside = client.netns.run(|| ask_many(6, SocketAddr::from((LB_IP, 80))));
    assert_eq!(names(&inside), endpoints);
}
