//! The cluster scenario: build three nodes, run every check, then change the cluster with
//! requests running the whole time (a rolling replacement of `web`'s pods, a rolling restart
//! of kube-ipvs, a SIGKILL), check again, and report.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use super::{
    API, Cluster, Node, NodePod,
    api::ApiServer,
    objects::{self, Endpoint},
    outside_client,
    traffic::{Client, Count, Traffic},
    underlay,
};
use crate::checks::cluster::{
    self as checks, Backend, Backends, NodeRef, Outcome, Transport, Workload,
};

/// The nodes: name, zone, address, pod CIDR octet.
const NODES: [(&str, &str, Ipv4Addr, u8); 3] = [
    ("node-a", "zone-1", Ipv4Addr::new(192, 168, 50, 11), 11),
    ("node-b", "zone-1", Ipv4Addr::new(192, 168, 50, 12), 12),
    ("node-c", "zone-2", Ipv4Addr::new(192, 168, 50, 13), 13),
];

/// How long a terminating pod keeps serving at most (its grace period) before it exits.
const GRACE: Duration = Duration::from_secs(30);

/// One restart of kube-ipvs on a node.
#[derive(Debug, Clone)]
pub struct Restart {
    /// The node.
    pub node: String,
    /// The signal it was stopped with.
    pub signal: &'static str,
    /// From the start to the first sync.
    pub synced_after: Duration,
    /// IPVS messages that changed the kernel, from its start until a second after its sync.
    pub ipvs_writes: f64,
}

/// What the scenario saw.
#[derive(Debug, Default)]
pub struct Report {
    /// The checks on the fresh cluster.
    pub checks_before: Vec<Outcome>,
    /// The checks after every change.
    pub checks_after: Vec<Outcome>,
    /// Requests by phase, then client.
    pub phases: Vec<(String, Vec<(String, Count)>)>,
    /// kube-ipvs restarts.
    pub restarts: Vec<Restart>,
    /// How long each old pod of the rollout served while terminating, until no node sent it
    /// new connections.
    pub drained_after: Vec<(String, Duration)>,
    /// How long the phases took.
    pub durations: Vec<(String, Duration)>,
    /// What the test did when, shown when a request failed.
    pub events: Vec<String>,
    /// Each node's kube-ipvs warnings and errors, shown when something failed.
    pub warnings: Vec<String>,
}

impl Report {
    /// Whether everything passed: every check, no failed request, no IPVS write from a
    /// restarted daemon.
    pub fn passed(&self) -> bool {
        self.checks_before.iter().chain(&self.checks_after).all(|o| o.result.is_ok())
            && self.failed_requests() == 0
            && self.restarts.iter().all(|r| r.ipvs_writes == 0.0)
            && !self.phases.is_empty()
    }

    /// Failed requests over every phase.
    pub fn failed_requests(&self) -> u64 {
        self.phases.iter().flat_map(|(_, rows)| rows).map(|(_, c)| c.failed).sum()
    }

    /// The report as text: the checks, the requests per phase, the restarts.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "checks on the fresh cluster:");
        text.push_str(&checks::table(&self.checks_before));
        let _ =
            writeln!(text, "\nrequests per phase (clients on a pod of every node, and outside):");
        let _ = writeln!(
            text,
            "  {:<40} {:>7}  {:<20} {:>8} {:>7}",
            "phase", "took", "client", "requests", "failed"
        );
        for (phase, rows) in &self.phases {
            let took = self.durations.iter().find(|(p, _)| p == phase).map(|(_, d)| *d);
            let took = took.map(|d| format!("{:.1} s", d.as_secs_f64())).unwrap_or_default();
            for (i, (client, count)) in rows.iter().enumerate() {
                let (phase, took) = if i == 0 { (phase.as_str(), took.as_str()) } else { ("", "") };
                let _ = writeln!(
                    text,
                    "  {phase:<40} {took:>7}  {client:<20} {:>8} {:>7}",
                    count.requests, count.failed
                );
                for error in &count.errors {
                    let _ = writeln!(text, "      {error}");
                }
            }
        }
        let total: u64 = self.phases.iter().flat_map(|(_, r)| r).map(|(_, c)| c.requests).sum();
        let failed = self.failed_requests();
        let _ = writeln!(text, "  {:<40} {:>7}  {:<20} {total:>8} {failed:>7}", "all", "", "");
        let _ = writeln!(
            text,
            "\nthe rollout's old pods, serving while terminating until no node sent them new connections:"
        );
        for (pod, took) in &self.drained_after {
            let _ = writeln!(text, "  {pod:<12} {:.1} s", took.as_secs_f64());
        }
        let _ = writeln!(text, "\nkube-ipvs restarts:");
        let _ = writeln!(
            text,
            "  {:<8} {:<8} {:>12} {:>24}",
            "node", "signal", "synced in", "changing IPVS messages"
        );
        for r in &self.restarts {
            let _ = writeln!(
                text,
                "  {:<8} {:<8} {:>10.1} s {:>24}",
                r.node,
                r.signal,
                r.synced_after.as_secs_f64(),
                r.ipvs_writes as u64
            );
        }
        let _ = writeln!(text, "\nchecks after the rollout and the restarts:");
        text.push_str(&checks::table(&self.checks_after));
        if !self.passed() {
            let _ = writeln!(text, "\nwhat the test did when:");
            for event in &self.events {
                let _ = writeln!(text, "  {event}");
            }
            let _ = writeln!(text, "\nkube-ipvs's warnings and errors:");
            for line in &self.warnings {
                let _ = writeln!(text, "  {line}");
            }
        }
        let _ = writeln!(text, "\ncluster: {}", if self.passed() { "PASSED" } else { "FAILED" });
        text
    }
}

/// The pods of the scenario.
struct Pods {
    /// `web`'s pods, in the order they were started.
    web: Vec<String>,
    /// `echo-<node>`: one per node.
    echo: Vec<String>,
}

fn endpoint(cluster: &Cluster, pod: &str) -> Endpoint {
    let pod = &cluster.pods[pod];
    let node = &cluster.nodes[pod.node];
    Endpoint::ready(pod.pod.ip, &pod.pod.name, &node.name, &node.zone)
}

fn endpoints(cluster: &Cluster, pods: &[&String]) -> Vec<Endpoint> {
    pods.iter().map(|p| endpoint(cluster, p)).collect()
}

fn backends(cluster: &Cluster, pods: &[String]) -> Backends {
    Backends {
        pods: pods
            .iter()
            .map(|p| Backend {
                pod: p.clone(),
                node: cluster.nodes[cluster.pods[p].node].name.clone(),
            })
            .collect(),
    }
}

fn short(node: &str) -> &str {
    node.strip_prefix("node-").unwrap_or(node)
}

/// The workload as the checks expect it.
fn workload(cluster: &Cluster, pods: &Pods) -> Workload {
    let socket = |ip: Ipv4Addr, port| SocketAddr::new(IpAddr::V4(ip), port);
    Workload {
        nodes: cluster
            .nodes
            .iter()
            .map(|n| NodeRef {
                name: n.name.clone(),
                zone: n.zone.clone(),
                ip: IpAddr::V4(n.ip),
                client: format!("client-{}", short(&n.name)),
            })
            .collect(),
        outside: (IpAddr::V4(super::OUTSIDE), IpAddr::V4(super::OUTSIDE_REFUSED)),
        web: backends(cluster, &pods.web),
        web_tcp: socket(objects::WEB, 80),
        web_udp: socket(objects::WEB, 53),
        web_node_port: objects::WEB_NODE_PORT,
        echo: backends(cluster, &pods.echo),
        sticky: socket(objects::STICKY, 80),
        local_node_port: objects::LOCAL_NODE_PORT,
        health_check_node_port: objects::HEALTH_CHECK_NODE_PORT,
        local_nodes: vec!["node-a".into(), "node-b".into()],
        internal: socket(objects::INTERNAL, 80),
        zoned: socket(objects::ZONED, 80),
        hairpin: socket(objects::HAIRPIN, 80),
        hairpin_pod: pods.echo[0].clone(),
        load_balancer: socket(objects::LB_INGRESS, 80),
    }
}

/// Builds the cluster: the underlay, the API server and its objects, three nodes with their
/// pods, the outside client, and kube-ipvs started and synced on every node.
fn build() -> (Cluster, Pods) {
    underlay(super::UNDERLAY_IP);
    let api = ApiServer::start(None, API);
    let nodes: Vec<Node> = NODES.iter().map(|(n, z, ip, o)| Node::new(n, z, *ip, *o)).collect();
    for node in &nodes {
        for other in nodes.iter().filter(|o| o.name != node.name) {
            node.route_to(other);
        }
    }
    let outside = outside_client(
        &[super::OUTSIDE, super::OUTSIDE_REFUSED],
        nodes[0].ip,
        &[super::SERVICE_CIDR, super::LB_CIDR],
    );
    let mut cluster = Cluster { nodes, pods: BTreeMap::new(), outside, api };
    let mut pods = Pods { web: vec![], echo: vec![] };
    for index in 0..cluster.nodes.len() {
        let n = short(&cluster.nodes[index].name).to_owned();
        let mut add = |name: String| {
            let pod = cluster.nodes[index].pod(index, &name);
            cluster.pods.insert(name.clone(), pod);
            name
        };
        pods.web.push(add(format!("web-{n}1")));
        pods.web.push(add(format!("web-{n}2")));
        pods.echo.push(add(format!("echo-{n}")));
        add(format!("client-{n}"));
    }
    let api = &cluster.api;
    for node in &cluster.nodes {
        api.put(&objects::node(
            &node.name,
            &node.zone,
            node.ip,
            &format!("10.244.{}.0/24", node.pod_octet),
        ));
    }
    for service in objects::services(super::OUTSIDE) {
        api.put(&service);
    }
    api.put(&objects::kubernetes_slice(API));
    put_web(&cluster, &pods.web.iter().map(|p| endpoint(&cluster, p)).collect::<Vec<_>>());
    let echo: Vec<&String> = pods.echo.iter().collect();
    let local: Vec<&String> = echo[..2].to_vec();
    for (service, members, hints) in [
        ("sticky", &echo, false),
        ("local", &local, false),
        ("internal", &local, false),
        ("zoned", &echo, true),
        ("lb", &echo, false),
        ("hairpin", &echo[..1].to_vec(), false),
    ] {
        api.put(&objects::slice(service, &endpoints(&cluster, members), hints));
    }
    let kubeconfig = cluster.api.kubeconfig();
    for node in &mut cluster.nodes {
        node.configure(&kubeconfig);
        node.start();
    }
    for node in &mut cluster.nodes {
        node.wait_synced();
    }
    (cluster, pods)
}

fn put_web(cluster: &Cluster, endpoints: &[Endpoint]) {
    cluster.api.put(&objects::slice("web", endpoints, false));
}

/// The clients that run through every change: one on a pod of every node (`web` over TCP
/// and UDP), and the outside one (`web`'s NodePorts on every node).
fn clients(cluster: &Cluster) -> Vec<Client> {
    let web = |pod: &str| pod.starts_with("web-");
    let mut clients: Vec<Client> = cluster
        .nodes
        .iter()
        .map(|node| {
            let name = format!("client-{}", short(&node.name));
            Client {
                netns: cluster.pods[&name].pod.netns.name.clone(),
                name: format!("{name} → web"),
                source: None,
                targets: vec![
                    (SocketAddr::from((objects::WEB, 80)), Transport::Tcp),
                    (SocketAddr::from((objects::WEB, 53)), Transport::Udp),
                ],
                expect: web,
            }
        })
        .collect();
    clients.push(Client {
        name: "outside → NodePorts".into(),
        netns: cluster.outside.name.clone(),
        source: Some(IpAddr::V4(super::OUTSIDE)),
        targets: cluster
            .nodes
            .iter()
            .flat_map(|n| {
                [
                    (SocketAddr::from((n.ip, objects::WEB_NODE_PORT)), Transport::Tcp),
                    (SocketAddr::from((n.ip, objects::WEB_UDP_NODE_PORT)), Transport::Udp),
                ]
            })
            .collect(),
        expect: web,
    });
    clients
}

/// Whether no node sends new connections to `address` (`ip:port`): its destination is gone
/// or has weight 0 everywhere.
fn drained(cluster: &Cluster, address: &str) -> Result<(), String> {
    for node in &cluster.nodes {
        let table = node.exec("ipvsadm", &["-Ln"])?;
        let live = table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() >= 4 && fields[0] == "->" && fields[1] == address && fields[3] != "0"
        });
        if live {
            return Err(format!("{} still sends to {address}", node.name));
        }
    }
    Ok(())
}

/// A Deployment's rolling update of `web` (maxSurge 1, maxUnavailable 0): for each old pod,
/// a new one on the same node becomes ready; then the old one terminates, serving through
/// its grace period (a preStop pause) until no node sends it new connections, exits, and
/// leaves the slice.
fn roll_web(cluster: &mut Cluster, pods: &mut Pods, report: &mut Report, traffic: &Traffic) {
    let old = pods.web.clone();
    let mut current: Vec<Endpoint> = old.iter().map(|p| endpoint(cluster, p)).collect();
    for (k, old_pod) in old.iter().enumerate() {
        let index = cluster.pods[old_pod].node;
        let name = format!("web-{}{}", short(&cluster.nodes[index].name), 3 + k % 2);
        let pod = cluster.nodes[index].pod(index, &name);
        cluster.pods.insert(name.clone(), pod);
        current.push(endpoint(cluster, &name));
        put_web(cluster, &current);
        traffic.event(&format!("{name} ready at {}", cluster.pods[&name].pod.ip));
        let at = current.iter().position(|e| &e.pod == old_pod).expect("the old pod");
        current[at] = current[at].terminating();
        put_web(cluster, &current);
        traffic.event(&format!("{old_pod} terminating"));
        let address = format!("{}:8080", current[at].ip);
        let started = Instant::now();
        while let Err(err) = drained(cluster, &address) {
            assert!(started.elapsed() < GRACE, "{old_pod} not drained in {GRACE:?}: {err}");
            std::thread::sleep(Duration::from_millis(100));
        }
        report.drained_after.push((old_pod.clone(), started.elapsed()));
        let gone: Option<NodePod> = cluster.pods.remove(old_pod);
        drop(gone);
        traffic.event(&format!("{old_pod} drained and gone"));
        current.remove(at);
        put_web(cluster, &current);
        traffic.event(&format!("{old_pod} out of the slice"));
        pods.web.retain(|p| p != old_pod);
        pods.web.push(name);
    }
}

/// Restarts kube-ipvs on node `index` after `signal`; how it went.
fn restart(
    cluster: &mut Cluster,
    index: usize,
    signal: &'static str,
    traffic: &Traffic,
) -> Restart {
    let node = &mut cluster.nodes[index];
    node.stop(signal);
    traffic.event(&format!("kube-ipvs on {} stopped (SIG{signal})", node.name));
    let started = Instant::now();
    node.start();
    node.wait_synced();
    traffic.event(&format!("kube-ipvs on {} synced", node.name));
    let synced_after = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    Restart { node: node.name.clone(), signal, synced_after, ipvs_writes: node.ipvs_writes() }
}

/// Runs the whole scenario and reports it.
pub fn run() -> Report {
    let mut report = Report::default();
    let (mut cluster, mut pods) = build();
    report.checks_before = checks::all(&cluster, &workload(&cluster, &pods));

    let traffic = Traffic::start(clients(&cluster), "steady");
    let mut marks = vec![Instant::now()];
    let mut next = |phase: &str| {
        traffic.phase(phase);
        marks.push(Instant::now());
    };
    std::thread::sleep(Duration::from_secs(3));
    next("rolling replacement of web's 6 pods");
    roll_web(&mut cluster, &mut pods, &mut report, &traffic);
    next("rolling restart of kube-ipvs (SIGTERM)");
    for index in 0..cluster.nodes.len() {
        let restarted = restart(&mut cluster, index, "TERM", &traffic);
        report.restarts.push(restarted);
    }
    next("kube-ipvs on node-b killed (SIGKILL)");
    let killed = restart(&mut cluster, 1, "KILL", &traffic);
    report.restarts.push(killed);
    next("steady again");
    std::thread::sleep(Duration::from_secs(2));
    marks.push(Instant::now());
    report.events = traffic.events();
    report.phases = traffic.finish();
    report.durations = report
        .phases
        .iter()
        .zip(marks.windows(2))
        .map(|((phase, _), mark)| (phase.clone(), mark[1] - mark[0]))
        .collect();
    report.checks_after = checks::all(&cluster, &workload(&cluster, &pods));
    for node in &cluster.nodes {
        let log = std::fs::read_to_string(&node.log).unwrap_or_default();
        let noted = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR "));
        report.warnings.extend(noted.map(|l| format!("{}: {l}", node.name)));
    }
    report
}
