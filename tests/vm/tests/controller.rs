//! From API objects to the kernel, with real traffic: `desired_state`, the reconciler,
//! kube-ipvs0 and the netfilter table together.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use controller::{
    changes::{Scope, desired_state},
    desired::{DesiredState, NodeInfo, ProxyConfig},
    node::NodeSync,
    reconcile::{Owned, Reconciler},
};
use dummy_link::{DummyLink, KUBE_IPVS0};
use ipvs_netlink::IpvsHandle;
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
    sync: NodeSync,
}

fn node_info() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        node_port_addresses: vec![NODE_IP.into()],
        local_addresses: vec![NODE_IP.into()],
    }
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
        let sync = NodeSync {
            reconciler: Reconciler::adopt(ipvs, &ownership(), Duration::from_secs(60))
                .await
                .unwrap(),
            link: DummyLink::ensure(dummy_link::connect().unwrap(), KUBE_IPVS0).await.unwrap(),
            netfilter: Netfilter::new(Config {
                cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
                ..Config::default()
            }),
        };
        Self { topology, sync }
    }

    fn desired(&self, nodes: &[&str]) -> DesiredState {
        let slice = slice(&self.topology, nodes);
        let desired = desired_state([&service()], [&slice], &node_info(), &ProxyConfig::default());
        assert!(desired.problems.is_empty(), "{:?}", desired.problems);
        desired
    }

    /// Programs the node for these endpoint placements.
    async fn program(&mut self, nodes: &[&str]) -> DesiredState {
        let desired = self.desired(nodes);
        let applied = self.sync.apply(&desired, &Scope::Everything).await.unwrap();
        assert!(applied.ipvs.failed.is_empty(), "{:?}", applied.ipvs.failed);
        desired
    }
}

fn ownership() -> Owned {
    Owned {
        service_ports: Default::default(),
        service_addresses: ["10.96.0.10".parse().unwrap(), LB_IP.into()].into(),
        node_port_addresses: [NODE_IP.into()].into(),
        node_port_range: 30000..=32767,
        exclude_cidrs: vec![],
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

#[tokio::test]
async fn drift_of_addresses_table_and_ipvs_is_healed_by_the_full_check() {
    let mut node = Node::new().await;
    let desired = node.program(&["node-a", "node-a", "node-a"]).await;
    let ask = |node: &Node| node.topology.client.run(|| tcp_ask(SocketAddr::from((LB_IP, 80))));
    assert!(ask(&node).is_ok());
    assert_eq!(
        node.sync.full_check(&desired, &ownership()).await.unwrap(),
        Default::default(),
        "nothing drifted"
    );

    // Behind our back: the load-balancer address unbound, a set flushed, the IPVS table cleared.
    sh("ip", &["addr", "del", &format!("{LB_IP}/32"), "dev", KUBE_IPVS0]);
    sh("nft", &["flush", "set", "inet", "kube-ipvs", "vips-v4"]);
    sh("ipvsadm", &["-C"]);
    assert!(ask(&node).is_err(), "the node is broken");

    let healed = node.sync.full_check(&desired, &ownership()).await.unwrap();
    assert!(healed.netfilter, "{healed:?}");
    assert_eq!(healed.addresses, 1, "{healed:?}");
    assert!(healed.virtual_servers >= 3, "{healed:?}");
    assert!(ask(&node).is_ok(), "healed");
    let listing = netfilter::listing().await.unwrap();
    assert!(listing.contains("10.96.0.10, 192.0.2.10"), "{listing}");
}

#[tokio::test]
async fn clean_up_removes_only_what_kube_ipvs_owns() {
    let mut node = Node::new().await;
    node.program(&["node-a", "node-a", "node-a"]).await;
    // Someone else's virtual servers: on an address of no Service, and on the node's address
    // outside the NodePort range.
    sh("ipvsadm", &["-A", "-t", "198.51.100.1:80", "-s", "rr"]);
    sh("ipvsadm", &["-A", "-t", &format!("{NODE_IP}:8443"), "-s", "rr"]);
    // And one kube-ipvs would own, but excluded by --ipvs-exclude-cidrs.
    sh("ip", &["addr", "add", "10.96.5.5/32", "dev", KUBE_IPVS0]);
    sh("ipvsadm", &["-A", "-t", "10.96.5.5:80", "-s", "rr"]);

    let report = controller::node::clean_up(30000..=32767, vec!["10.96.5.0/24".parse().unwrap()])
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(report.link, "kube-ipvs0 deleted");
    // The ClusterIP, the load-balancer address, the NodePort and the local fwmark one.
    assert!(report.virtual_servers >= 3, "{report:?}");
    let left: BTreeSet<String> = sh("ipvsadm", &["-Sn"]).lines().map(String::from).collect();
    let expected: BTreeSet<String> = [
        "-A -t 10.96.5.5:80 -s rr".to_owned(),
        "-A -t 198.51.100.1:80 -s rr".to_owned(),
        format!("-A -t {NODE_IP}:8443 -s rr"),
    ]
    .into();
    assert_eq!(left, expected, "only those remain");
    let links = sh("ip", &["-o", "link"]);
    assert!(!links.contains(KUBE_IPVS0), "{links}");
    let tables = sh("nft", &["list", "tables"]);
    assert!(!tables.contains("kube-ipvs"), "{tables}");

    // Cleaning a clean node is harmless.
    let again = controller::node::clean_up(30000..=32767, vec![]).await.unwrap();
    assert!(!again.link && again.virtual_servers == 0 && again.failed.is_empty(), "{again:?}");
}
