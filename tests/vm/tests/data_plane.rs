//! The node data plane with real packets: kube-ipvs0 (`dummy-link`), the nftables table
//! (`netfilter`), the kernel parameters (`sysctl-settings`) and IPVS (`ipvs-netlink`), on a node
//! with three pods on a bridge and an external client on its own link.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener},
    thread,
};

use dummy_link::{DummyLink, KUBE_IPVS0};
use ipvs_netlink::{Change, Destination, IpvsHandle, ServiceKey, VirtualService};
use netfilter::{Config, Elements, NodePort, Protocol, ServicePort, Update};
use vm_tests::{
    Answer, BRIDGE_IP, BRIDGE_IP6, CLIENT_IP, CLUSTER_CIDR, CLUSTER_CIDR6, NODE_IP, NODE_IP6,
    OTHER_CLIENT_IP, Topology, sctp_ask, sh, tcp_ask, tcp_ask_from, udp_ask,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A node with kube-ipvs0, the table and IPVS programmed for a handful of Services.
struct Node {
    topology: Topology,
    ipvs: IpvsHandle,
    link: DummyLink,
    netfilter: netfilter::Netfilter,
    elements: Elements,
}

impl Node {
    async fn new(localhost_node_ports: bool) -> Self {
        // A bridge CNI needs bridged traffic to pass through netfilter (and so through IPVS).
        sh("modprobe", &["br_netfilter"]);
        let topology = Topology::new(3);
        sh("sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"]);
        let options = sysctl_settings::Options {
            strict_arp: false,
            localhost_node_ports,
            rate_estimation: None,
        };
        let plan =
            sysctl_settings::plan(options, sysctl_settings::KernelVersion::running().unwrap());
        sysctl_settings::apply(&plan).unwrap();
        let link = DummyLink::ensure(dummy_link::connect().unwrap(), KUBE_IPVS0).await.unwrap();
        let netfilter = netfilter::Netfilter::new(Config {
            cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
            localhost_node_ports,
            ..Config::default()
        });
        Self {
            topology,
            ipvs: IpvsHandle::new().unwrap(),
            link,
            netfilter,
            elements: Elements::default(),
        }
    }

    /// A virtual server on `address` with every pod as a destination on `target_port`.
    async fn virtual_server(&self, protocol: Protocol, address: SocketAddr, target_port: u16) {
        self.virtual_server_for(ServiceKey::Inet { protocol, address }, target_port).await;
    }

    async fn virtual_server_for(&self, key: ServiceKey, target_port: u16) {
        let mut changes = vec![Change::AddService(VirtualService::new(key, "rr"))];
        for pod in &self.topology.pods {
            changes.push(Change::AddDestination(key, Destination::new(pod.addr(target_port))));
        }
        for result in self.ipvs.apply(&changes).await {
            result.unwrap();
        }
    }

    /// Binds the VIPs and writes the table for `self.elements`.
    async fn apply(&mut self) -> Update {
        let report = self.link.sync(&self.elements.vips).await;
        assert!(report.is_complete(), "{:?}", report.failed);
        self.netfilter.update(&self.elements).await.unwrap()
    }

    /// The web Service: ClusterIP 10.96.0.10:80 and UDP 10.96.0.10:53, every pod behind it.
    async fn cluster_ip(&mut self) {
        self.virtual_server(Protocol::Tcp, at(CLUSTER_IP, 80), 8080).await;
        self.virtual_server(Protocol::Udp, at(CLUSTER_IP, 53), 5353).await;
        self.elements.vips.insert(CLUSTER_IP.into());
        self.elements.cluster_ips.insert(ServicePort::new(CLUSTER_IP.into(), Protocol::Tcp, 80));
        self.elements.cluster_ips.insert(ServicePort::new(CLUSTER_IP.into(), Protocol::Udp, 53));
        for pod in &self.topology.pods {
            self.elements.hairpin.insert(pod.ip.into());
        }
    }
}

/// Asks `times` times and returns the answers.
fn ask_many(times: usize, ask: impl Fn() -> std::io::Result<Answer>) -> Vec<Answer> {
    (0..times).map(|i| ask().unwrap_or_else(|err| panic!("attempt {i}: {err}"))).collect()
}

fn names(answers: &[Answer]) -> BTreeSet<String> {
    answers.iter().map(|a| a.from.clone()).collect()
}

#[tokio::test]
async fn cluster_ip_from_the_node_from_a_pod_and_hairpin() {
    let mut node = Node::new(false).await;
    node.cluster_ip().await;
    assert_eq!(node.apply().await, Update::Installed);
    let all = node.topology.pod_names();
    let vip = at(CLUSTER_IP, 80);

    // From the node itself: every backend answers, and sees the node (masqueraded).
    let answers = ask_many(9, || tcp_ask(vip));
    assert_eq!(names(&answers), all);
    assert!(answers.iter().all(|a| a.peer == IpAddr::from(BRIDGE_IP)), "{answers:?}");

    // From another pod: every backend answers, and the others see the pod itself (no
    // masquerade); pod2's own answers are hairpin, masqueraded.
    let pod2 = &node.topology.pods[1];
    let answers = pod2.netns.run(|| ask_many(9, || tcp_ask(vip)));
    assert_eq!(names(&answers), all);
    for answer in &answers {
        let expected = if answer.from == pod2.name { BRIDGE_IP } else { pod2.ip };
        assert_eq!(answer.peer, IpAddr::from(expected), "{answers:?}");
    }

    // Hairpin: pod1 reaches its own Service and is load-balanced to itself too.
    let pod1 = &node.topology.pods[0];
    let answers = pod1.netns.run(|| ask_many(9, || tcp_ask(vip)));
    assert_eq!(names(&answers), all);
    let own: Vec<&Answer> = answers.iter().filter(|a| a.from == pod1.name).collect();
    assert!(
        !own.is_empty() && own.iter().all(|a| a.peer == IpAddr::from(BRIDGE_IP)),
        "{answers:?}"
    );
}

#[tokio::test]
async fn a_udp_service_answers_both_ways() {
    let mut node = Node::new(false).await;
    node.cluster_ip().await;
    node.apply().await;
    let pod3 = &node.topology.pods[2];
    let answers = pod3.netns.run(|| ask_many(9, || udp_ask(at(CLUSTER_IP, 53))));
    assert_eq!(names(&answers), node.topology.pod_names());
    let answers = ask_many(3, || udp_ask(at(CLUSTER_IP, 53)));
    assert_eq!(answers.len(), 3);
}

#[tokio::test]
async fn node_ports_masquerade_unless_the_policy_is_local() {
    let mut node = Node::new(false).await;
    // NodePort 30080 with externalTrafficPolicy Cluster, 30081 with Local.
    node.virtual_server(Protocol::Tcp, at(NODE_IP, 30080), 8080).await;
    node.virtual_server(Protocol::Tcp, at(NODE_IP, 30081), 8080).await;
    node.elements.node_ports.insert(NodePort { protocol: Protocol::Tcp, port: 30080 });
    node.apply().await;

    let cluster = node.topology.client.run(|| ask_many(6, || tcp_ask(at(NODE_IP, 30080))));
    assert_eq!(names(&cluster), node.topology.pod_names());
    assert!(cluster.iter().all(|a| a.peer == IpAddr::from(BRIDGE_IP)), "masqueraded: {cluster:?}");

    let local = node.topology.client.run(|| ask_many(6, || tcp_ask(at(NODE_IP, 30081))));
    assert!(local.iter().all(|a| a.peer == IpAddr::from(CLIENT_IP)), "client kept: {local:?}");
}

#[tokio::test]
async fn host_services_are_not_reachable_through_service_addresses() {
    let mut node = Node::new(false).await;
    node.cluster_ip().await;
    node.virtual_server(Protocol::Tcp, at(LB_IP, 80), 8080).await;
    node.elements.vips.insert(LB_IP.into());
    node.elements.external_ips.insert(ServicePort::new(LB_IP.into(), Protocol::Tcp, 80));
    // An sshd-like host service on every address, and a health-check server.
    let ssh = TcpListener::bind("0.0.0.0:2222").unwrap();
    let health = TcpListener::bind("0.0.0.0:32100").unwrap();
    for listener in [ssh, health] {
        thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream)
            }
        });
    }
    node.elements.health_check_node_ports.insert(32100);
    let reach = |ip: Ipv4Addr, port: u16| std::net::TcpStream::connect(at(ip, port)).is_ok();

    // Without the table, the host service answers on the Service addresses: the leak.
    node.link.sync(&node.elements.vips).await;
    assert!(reach(CLUSTER_IP, 2222) && reach(LB_IP, 2222), "the control case leaks");

    node.apply().await;
    for ip in [CLUSTER_IP, LB_IP] {
        assert!(!reach(ip, 2222), "{ip}:2222 from the node");
        let pod2 = &node.topology.pods[1];
        assert!(!pod2.netns.run(|| reach(ip, 2222)), "{ip}:2222 from a pod");
        assert!(!node.topology.client.run(|| reach(ip, 2222)), "{ip}:2222 from outside");
    }
    // Refused at once (a reject), not left to time out.
    let err = std::net::TcpStream::connect(at(CLUSTER_IP, 2222)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // The Services and the host's own addresses still work.
    assert_eq!(tcp_ask(at(CLUSTER_IP, 80)).unwrap().from.len(), 4);
    assert!(node.topology.client.run(|| tcp_ask(at(LB_IP, 80))).is_ok());
    assert!(node.topology.client.run(|| reach(NODE_IP, 2222)), "the node's own address");
    assert!(node.topology.client.run(|| reach(NODE_IP, 32100)), "the health-check port");
}

#[tokio::test]
async fn load_balancer_source_ranges_admit_only_their_sources() {
    let mut node = Node::new(false).await;
    node.virtual_server(Protocol::Tcp, at(LB_IP, 80), 8080).await;
    let lb = ServicePort::new(LB_IP.into(), Protocol::Tcp, 80);
    node.elements.vips.insert(LB_IP.into());
    node.elements.external_ips.insert(lb);
    node.elements.source_ranges.insert((lb, format!("{CLIENT_IP}/32").parse().unwrap()));
    node.apply().await;

    let allowed = node.topology.client.run(|| tcp_ask_from(Some(CLIENT_IP.into()), at(LB_IP, 80)));
    assert!(allowed.is_ok(), "{allowed:?}");
    let other =
        node.topology.client.run(|| tcp_ask_from(Some(OTHER_CLIENT_IP.into()), at(LB_IP, 80)));
    assert!(other.is_err(), "a source outside the ranges got through: {other:?}");

    // Widening the range lets the other source in: one element changed.
    node.elements.source_ranges.insert((lb, "192.168.99.0/24".parse().unwrap()));
    assert_eq!(node.apply().await, Update::Elements);
    let other =
        node.topology.client.run(|| tcp_ask_from(Some(OTHER_CLIENT_IP.into()), at(LB_IP, 80)));
    assert!(other.is_ok(), "{other:?}");
}

#[tokio::test]
async fn node_ports_on_localhost_with_the_option() {
    let mut node = Node::new(true).await;
    let node_port = NodePort { protocol: Protocol::Tcp, port: 30080 };
    node.virtual_server(Protocol::Tcp, at(NODE_IP, 30080), 8080).await;
    node.elements.node_ports.insert(node_port);
    let endpoints = node.topology.pods.iter().map(|pod| SocketAddrV4::new(pod.ip, 8080)).collect();
    node.elements.localhost_node_ports.insert(node_port, endpoints);
    node.apply().await;
    // The endpoint is drawn at random (numgen): 60 tries miss one of three pods with a
    // probability of 1e-10 (12 tries did, once in about 40 runs).
    let answers = ask_many(60, || tcp_ask(at(Ipv4Addr::LOCALHOST, 30080)));
    assert_eq!(names(&answers), node.topology.pod_names());
    assert!(answers.iter().all(|a| a.peer == IpAddr::from(BRIDGE_IP)), "masqueraded: {answers:?}");
    // On the node address too, as before; and other localhost ports are left alone.
    let answers = node.topology.client.run(|| ask_many(3, || tcp_ask(at(NODE_IP, 30080))));
    assert_eq!(answers.len(), 3);
    assert!(tcp_ask(at(Ipv4Addr::LOCALHOST, 30081)).is_err());

    // Without the option, 127.0.0.1 is not served: the rule is not there.
    let mut plain = netfilter::Netfilter::new(Config {
        cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
        ..Config::default()
    });
    plain.install(&node.elements).await.unwrap();
    assert!(tcp_ask(at(Ipv4Addr::LOCALHOST, 30080)).is_err());
}

#[tokio::test]
async fn the_table_is_updated_element_by_element_and_healed_when_changed_behind_our_back() {
    let mut node = Node::new(false).await;
    node.cluster_ip().await;
    assert_eq!(node.apply().await, Update::Installed);
    assert_eq!(node.apply().await, Update::Unchanged, "no change, no nft run");
    let runs = node.netfilter.transactions();

    // One more Service: one transaction of element additions.
    node.virtual_server(Protocol::Tcp, at(Ipv4Addr::new(10, 96, 0, 11), 443), 8080).await;
    node.elements.vips.insert(Ipv4Addr::new(10, 96, 0, 11).into());
    node.elements.cluster_ips.insert(ServicePort::new(
        Ipv4Addr::new(10, 96, 0, 11).into(),
        Protocol::Tcp,
        443,
    ));
    assert_eq!(node.apply().await, Update::Elements);
    assert_eq!(node.netfilter.transactions(), runs + 1);
    let listing = netfilter::listing().await.unwrap();
    assert!(listing.contains("10.96.0.11 . tcp . 443"), "{listing}");
    assert!(tcp_ask(at(Ipv4Addr::new(10, 96, 0, 11), 443)).is_ok());

    // Someone flushes a set; the next incremental update cannot apply and the table is rewritten.
    sh("nft", &["flush", "set", "inet", "kube-ipvs", "cluster-ips-v4"]);
    node.elements.cluster_ips.remove(&ServicePort::new(
        Ipv4Addr::new(10, 96, 0, 11).into(),
        Protocol::Tcp,
        443,
    ));
    assert_eq!(node.apply().await, Update::Installed);
    let listing = netfilter::listing().await.unwrap();
    assert!(listing.contains("10.96.0.10 . tcp . 80"), "{listing}");
    assert!(!listing.contains("10.96.0.11 . tcp . 443"), "{listing}");

    node.netfilter.remove().await.unwrap();
    assert!(netfilter::listing().await.is_err(), "the table is gone");
    node.netfilter.remove().await.expect("removing a missing table is fine");
}

/// One element of every set and map, in both families.
fn every_kind_of_element() -> Elements {
    let mut e = Elements::default();
    let v4 = |a: &str, protocol, port| ServicePort::new(a.parse().unwrap(), protocol, port);
    for (cluster, external, local, lb) in [
        ("10.96.0.10", "192.0.2.20", "192.0.2.21", "192.0.2.10"),
        ("fd00::10", "2001:db8::20", "2001:db8::21", "2001:db8::10"),
    ] {
        e.cluster_ips.insert(v4(cluster, Protocol::Tcp, 80));
        e.cluster_ips.insert(v4(cluster, Protocol::Udp, 53));
        e.cluster_ips.insert(v4(cluster, Protocol::Sctp, 9999));
        e.external_ips.insert(v4(external, Protocol::Tcp, 443));
        e.local_external_ips.insert(v4(local, Protocol::Tcp, 8443));
        e.local_traffic.insert(v4(local, Protocol::Tcp, 8443), 0x0010_0abc);
        for address in [cluster, external, local, lb] {
            e.vips.insert(address.parse().unwrap());
        }
        let range = if lb.contains(':') { "2001:db8:77::/48" } else { "203.0.113.0/24" };
        e.source_ranges.insert((v4(lb, Protocol::Tcp, 80), range.parse().unwrap()));
        let host = if lb.contains(':') { "2001:db8:78::5/128" } else { "198.51.100.5/32" };
        e.source_ranges.insert((v4(lb, Protocol::Tcp, 80), host.parse().unwrap()));
        e.hairpin
            .insert(if lb.contains(':') { "fd00:244::2" } else { "10.244.0.2" }.parse().unwrap());
    }
    let node_port = |protocol, port| NodePort { protocol, port };
    e.node_ports.insert(node_port(Protocol::Tcp, 30080));
    e.node_ports.insert(node_port(Protocol::Udp, 30053));
    e.health_check_node_ports.insert(32100);
    e.local_node_ports
        .insert((netfilter::Family::Ipv4, node_port(Protocol::Tcp, 30443)), 0x0010_0001);
    e.local_node_ports
        .insert((netfilter::Family::Ipv6, node_port(Protocol::Tcp, 30443)), 0x0010_0002);
    e.localhost_node_ports.insert(
        node_port(Protocol::Tcp, 30080),
        ["10.244.0.2:8080".parse().unwrap(), "10.244.0.3:8081".parse().unwrap()].into(),
    );
    e
}

/// The elements of every set and map as `nft -j` lists them, by set name.
fn listed_elements() -> std::collections::BTreeMap<String, serde_json::Value> {
    let out = sh("nft", &["-j", "list", "table", "inet", "kube-ipvs"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("set").or_else(|| o.get("map")))
        .map(|s| {
            (s["name"].as_str().unwrap().to_owned(), s.get("elem").cloned().unwrap_or_default())
        })
        .collect()
}

#[tokio::test]
async fn elements_written_over_netlink_are_the_ones_nft_writes() {
    let config = Config { localhost_node_ports: true, ..Config::default() };
    let elements = every_kind_of_element();

    // Written by nft, as part of the whole table (replacing a table that exists: into a new
    // one, the elements would be written over netlink).
    let mut by_nft = netfilter::Netfilter::new(config.clone());
    by_nft.install(&Elements::default()).await.unwrap();
    by_nft.install(&elements).await.unwrap();
    let expected = listed_elements();
    assert!(expected.values().filter(|e| !e.is_null()).count() >= 20, "{expected:?}");
    assert!(!by_nft.check().await.unwrap(), "the counts read back over netlink agree");

    // Written over netlink, into an empty table.
    let mut by_netlink = netfilter::Netfilter::new(config);
    by_netlink.install(&Elements::default()).await.unwrap();
    assert_eq!(by_netlink.update(&elements).await.unwrap(), Update::Elements);
    assert_eq!(listed_elements(), expected, "the kernel holds the same bytes");
    // And into a new table: its rules by nft, then its elements over netlink.
    by_netlink.remove().await.unwrap();
    by_netlink.install(&elements).await.unwrap();
    assert_eq!(listed_elements(), expected);
    assert!(!by_netlink.check().await.unwrap());

    // Deleted over netlink: every key matches exactly, or the kernel would refuse (ENOENT) and
    // the table would be installed again instead.
    assert_eq!(by_netlink.update(&Elements::default()).await.unwrap(), Update::Elements);
    assert!(listed_elements().values().all(serde_json::Value::is_null), "{:?}", listed_elements());

    // By difference: a retired hairpin element stays until the flush; one wanted again
    // meanwhile is not written twice.
    assert_eq!(by_netlink.update(&elements).await.unwrap(), Update::Elements);
    let hairpin: IpAddr = "10.244.0.2".parse().unwrap();
    let mut fewer = elements.clone();
    fewer.hairpin.remove(&hairpin);
    let removed = Elements { hairpin: [hairpin].into(), ..Elements::default() };
    let none = Elements::default();
    assert_eq!(by_netlink.apply_delta(&removed, &none, &fewer).await.unwrap(), Update::Unchanged);
    assert_eq!(listed_elements(), expected, "still in the kernel");
    assert!(!by_netlink.check().await.unwrap(), "and counted as such");
    assert_eq!(
        by_netlink.apply_delta(&none, &removed, &elements).await.unwrap(),
        Update::Unchanged
    );
    assert_eq!(by_netlink.flush().await.unwrap(), Update::Unchanged, "nothing stale any more");
    assert_eq!(by_netlink.apply_delta(&removed, &none, &fewer).await.unwrap(), Update::Unchanged);
    assert_eq!(by_netlink.flush().await.unwrap(), Update::Elements);
    assert_eq!(listed_elements()["hairpin-v4"], serde_json::Value::Null, "deleted by the flush");
    assert!(!by_netlink.check().await.unwrap());

    // A flushed set is found by the check, and the table written again.
    assert_eq!(by_netlink.update(&elements).await.unwrap(), Update::Elements);
    sh("nft", &["flush", "set", "inet", "kube-ipvs", "hairpin-v6"]);
    assert!(by_netlink.check().await.unwrap(), "drift found");
    assert_eq!(listed_elements(), expected);
    sh("nft", &["delete", "table", "inet", "kube-ipvs"]);
    assert!(by_netlink.check().await.unwrap(), "a deleted table is found too");
    assert_eq!(listed_elements(), expected);
    by_netlink.remove().await.unwrap();
}

const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

#[tokio::test]
async fn ipv6_and_dual_stack_services_carry_tcp_and_udp() {
    let mut node = Node::new(false).await;
    node.topology.add_ipv6();
    node.netfilter = netfilter::Netfilter::new(Config {
        cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap(), CLUSTER_CIDR6.parse().unwrap()],
        ..Config::default()
    });
    // A dual-stack Service: 10.96.0.10 and fd00:96::10, TCP 80 and UDP 53, every pod behind
    // each family's address; and an IPv6 NodePort.
    node.cluster_ip().await;
    let v6 = |port| SocketAddr::from((CLUSTER_IP6, port));
    let node_port6 = SocketAddr::from((NODE_IP6, 30080));
    for (protocol, address, target) in [
        (Protocol::Tcp, v6(80), 8080),
        (Protocol::Udp, v6(53), 5353),
        (Protocol::Tcp, node_port6, 8080),
    ] {
        let key = ServiceKey::Inet { protocol, address };
        let mut changes = vec![Change::AddService(VirtualService::new(key, "rr"))];
        for pod in &node.topology.pods {
            let destination = SocketAddr::from((pod.ipv6(), target));
            changes.push(Change::AddDestination(key, Destination::new(destination)));
        }
        for result in node.ipvs.apply(&changes).await {
            result.unwrap();
        }
    }
    node.elements.vips.insert(CLUSTER_IP6.into());
    node.elements.cluster_ips.insert(ServicePort::new(CLUSTER_IP6.into(), Protocol::Tcp, 80));
    node.elements.cluster_ips.insert(ServicePort::new(CLUSTER_IP6.into(), Protocol::Udp, 53));
    node.elements.node_ports.insert(NodePort { protocol: Protocol::Tcp, port: 30080 });
    for pod in &node.topology.pods {
        node.elements.hairpin.insert(pod.ipv6().into());
    }
    // An sshd-like host service on every IPv6 address of the node.
    let _ssh = thread_listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 2222)));
    node.apply().await;
    let all = node.topology.pod_names();
    let bridge6 = IpAddr::from(BRIDGE_IP6);

    // From the node: every pod, over both families of the one Service; masqueraded.
    let answers = ask_many(9, || tcp_ask(v6(80)));
    assert_eq!(names(&answers), all);
    assert!(answers.iter().all(|a| a.peer == bridge6), "{answers:?}");
    assert_eq!(names(&ask_many(9, || tcp_ask(at(CLUSTER_IP, 80)))), all, "its IPv4 half");

    // From a pod: the others see the pod itself, its own answers are hairpin (masqueraded).
    let pod2 = &node.topology.pods[1];
    let answers = pod2.netns.run(|| ask_many(9, || tcp_ask(v6(80))));
    assert_eq!(names(&answers), all);
    for answer in &answers {
        let expected = if answer.from == pod2.name { bridge6 } else { pod2.ipv6().into() };
        assert_eq!(answer.peer, expected, "{answers:?}");
    }
    // UDP, both ways.
    let pod3 = &node.topology.pods[2];
    assert_eq!(names(&pod3.netns.run(|| ask_many(9, || udp_ask(v6(53))))), all);

    // The IPv6 NodePort from outside, masqueraded (externalTrafficPolicy: Cluster).
    let answers = node.topology.client.run(|| ask_many(6, || tcp_ask(node_port6)));
    assert_eq!(names(&answers), all);
    assert!(answers.iter().all(|a| a.peer == bridge6), "masqueraded: {answers:?}");

    // The host-port filter: the host service does not answer on the IPv6 Service address,
    // refused at once; it does on the node's own address.
    let client = &node.topology.client;
    let err = client.run(|| std::net::TcpStream::connect(v6(2222))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(client.run(|| std::net::TcpStream::connect((NODE_IP6, 2222))).is_ok());
}

/// A TCP listener on `address` (IPv6 only, for an IPv6 address) that accepts and drops
/// every connection.
fn thread_listener(address: SocketAddr) -> thread::JoinHandle<()> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)
            .unwrap();
    if address.is_ipv6() {
        socket.set_only_v6(true).unwrap();
    }
    socket.bind(&address.into()).unwrap();
    socket.listen(16).unwrap();
    let listener = TcpListener::from(socket);
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream)
        }
    })
}

/// SCTP through a ClusterIP, from a pod to the other pods. An SCTP endpoint announces its
/// addresses in its INIT (multi-homing), and NAT cannot rewrite them: a client with several
/// addresses (the node) must bind one to be reachable back through IPVS, and a pod sent to
/// itself (hairpin) finds its own address among its peer's. Both are SCTP's, whatever the
/// proxy, and not tested here.
#[tokio::test]
async fn an_sctp_association_goes_through_a_cluster_ip() {
    sh("modprobe", &["sctp"]);
    let mut node = Node::new(false).await;
    // pod1 is the client; pod2 and pod3 serve.
    let servers = &node.topology.pods[1..];
    let key = ServiceKey::Inet { protocol: Protocol::Sctp, address: at(CLUSTER_IP, 7777) };
    let mut changes = vec![Change::AddService(VirtualService::new(key, "rr"))];
    for pod in servers {
        pod.serve_sctp(7777);
        changes.push(Change::AddDestination(key, Destination::new(pod.addr(7777))));
    }
    for result in node.ipvs.apply(&changes).await {
        result.unwrap();
    }
    let expected: BTreeSet<String> = servers.iter().map(|p| p.name.clone()).collect();
    node.elements.vips.insert(CLUSTER_IP.into());
    node.elements.cluster_ips.insert(ServicePort::new(CLUSTER_IP.into(), Protocol::Sctp, 7777));
    node.apply().await;
    let vip = at(CLUSTER_IP, 7777);
    // From a pod: both pods answer, and see the pod itself (no masquerade).
    let client = &node.topology.pods[0];
    let answers = client.netns.run(|| ask_many(6, || sctp_ask(vip)));
    assert_eq!(names(&answers), expected);
    assert!(answers.iter().all(|a| a.peer == IpAddr::from(client.ip)), "{answers:?}");
}
