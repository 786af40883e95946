//! A live takeover from kube-proxy on one node, and the rollback, following
//! `docs/migration.md` as a script.
//!
//! The node (`virtme-ng`, 192.168.99.2, as in the golden scenario) starts from exactly the
//! kernel state kube-proxy's IPVS mode left there (`tests/vm/kube-proxy-state/`): its IPVS
//! table, `kube-ipvs0` and its addresses, its ipsets, its iptables rules and its kernel
//! parameters, replayed with `ipvsadm -R`, `ipset restore` and `iptables-restore`. Pods sit
//! at every IPv4 endpoint of the golden objects, on this node and on a second one (`node-b`,
//! 192.168.99.3, a plain router to its pods), and requests run through the Services from a
//! pod and from outside the whole time, with connections held open across every step. The
//! API server runs on the node, at the address the golden `kubernetes` Service points to.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::{Value, json};

use super::{
    Node, NodePod,
    api::ApiServer,
    outside_client,
    traffic::{Client, Count, Traffic},
    underlay,
};
use crate::checks::cluster::{Outcome, Transport};

/// The migration guide, whose marked blocks are the script.
const MIGRATION: &str = include_str!("../../../../docs/migration.md");
/// The golden objects, as the API server served them.
const OBJECTS: &str =
    include_str!("../../../../crates/controller/tests/golden/golden-objects-server.yaml");
const IPVSADM: &str = include_str!("../../kube-proxy-state/ipvsadm-Sn.txt");
const IPSETS: &str = include_str!("../../kube-proxy-state/ipset-save.txt");
const IPTABLES: &str = include_str!("../../kube-proxy-state/iptables-save.txt");
const IP6TABLES: &str = include_str!("../../kube-proxy-state/ip6tables-save.txt");
const ADDRESSES: &str = include_str!("../../kube-proxy-state/ip-d-addr-kube-ipvs0.txt");
const SYSCTL_BEFORE: &str = include_str!("../../kube-proxy-state/sysctl-before.txt");
const SYSCTL_AFTER: &str = include_str!("../../kube-proxy-state/sysctl-after.txt");

/// The golden node's name and address.
const NODE: &str = "virtme-ng";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 2);
/// The other node, whose pods are the remote endpoints.
const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 3);
/// The underlay's own address, and the outside client's.
const UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 10);
/// The node's address on its pod bridge, its pods' gateway.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The client pod on the node.
const CLIENT_POD: u8 = 200;

/// The shell block of `docs/migration.md` marked `<!-- script: NAME -->`.
///
/// # Panics
/// If the guide has no such block: the guide and this script must not drift apart.
pub fn script(name: &str) -> String {
    let marker = format!("<!-- script: {name} -->");
    let after = MIGRATION
        .split_once(&marker)
        .unwrap_or_else(|| panic!("docs/migration.md has no {marker}"))
        .1;
    let block = after.split_once("```sh\n").expect("a sh block after the marker").1;
    block.split_once("```").expect("the block ends").0.to_owned()
}

/// What the takeover saw.
#[derive(Debug, Default)]
pub struct Report {
    /// The checks, in order.
    pub checks: Vec<Outcome>,
    /// Requests by phase, then client.
    pub phases: Vec<(String, Vec<(String, Count)>)>,
    /// IPVS messages kube-ipvs sent that changed the kernel when it took over, by kind.
    pub takeover_writes: Vec<(String, f64)>,
}

impl Report {
    /// Whether every check passed and no request failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|o| o.result.is_ok())
            && self.phases.iter().flat_map(|(_, r)| r).all(|(_, c)| c.failed == 0)
            && !self.phases.is_empty()
    }

    /// The report as text.
    pub fn render(&self) -> String {
        let mut text = String::from("takeover from kube-proxy, and back:\n");
        text.push_str(&crate::checks::cluster::table(&self.checks));
        text.push_str("\nrequests per phase:\n");
        text.push_str(&format!(
            "  {:<44} {:<22} {:>8} {:>7}\n",
            "phase", "client", "requests", "failed"
        ));
        for (phase, rows) in &self.phases {
            for (i, (client, count)) in rows.iter().enumerate() {
                let shown = if i == 0 { phase.as_str() } else { "" };
                text.push_str(&format!(
                    "  {shown:<44} {client:<22} {:>8} {:>7}\n",
                    count.requests, count.failed
                ));
                for error in &count.errors {
                    text.push_str(&format!("      {error}\n"));
                }
            }
        }
        let writes: Vec<String> =
            self.takeover_writes.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
        text.push_str(&format!(
            "\nIPVS messages kube-ipvs sent when it took over: {}\n",
            if writes.is_empty() { "none".to_owned() } else { writes.join(", ") }
        ));
        text.push_str(&format!("takeover: {}\n", if self.passed() { "PASSED" } else { "FAILED" }));
        text
    }
}

/// The golden objects, the golden Node, and the API server's own Service and endpoint.
fn objects() -> Vec<Value> {
    let list: Value = serde_norway::from_str(OBJECTS).expect("the golden objects");
    let mut objects = list["items"].as_array().expect("a List").clone();
    for object in &mut objects {
        // As a client would send it: the server sets these.
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
            meta.remove("uid");
        }
    }
    objects.push(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"]},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()},
                                 {"type": "Hostname", "address": NODE}]},
    }));
    objects.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
    }));
    objects.push(super::objects::kubernetes_slice(SocketAddr::from((NODE_IP, 6443))));
    objects
}

/// Every IPv4 endpoint address of the golden slices.
fn endpoint_addresses(objects: &[Value]) -> BTreeSet<Ipv4Addr> {
    objects
        .iter()
        .filter(|o| o["kind"] == "EndpointSlice" && o["addressType"] == "IPv4")
        .flat_map(|o| o["endpoints"].as_array().cloned().unwrap_or_default())
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str()?.parse().ok())
        .filter(|a: &Ipv4Addr| a.octets()[..2] == [10, 244])
        .collect()
}

/// kube-proxy's IPVS table on this node: the golden one, whose node had one address, with
/// its NodePort virtual servers also on this node's other address, its pod gateway, as
/// kube-proxy binds NodePorts to every address of the node (`nodePortAddresses` unset).
fn kube_proxy_table() -> String {
    let mut table = String::new();
    for line in IPVSADM.lines() {
        table.push_str(line);
        table.push('\n');
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 3 && fields[2].starts_with(&format!("{NODE_IP}:")) {
            let on_gateway = fields[2].replacen(&NODE_IP.to_string(), &GATEWAY.to_string(), 1);
            table.push_str(&line.replacen(fields[2], &on_gateway, 1));
            table.push('\n');
        }
    }
    table
}

/// Runs `input` through `program args` on `node`; panics on failure.
fn feed(node: &Node, program: &str, args: &[&str], input: &str) {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &node.netns.name, program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child.stdin.take().expect("piped").write_all(input.as_bytes()).expect("written");
    let out = child.wait_with_output().expect("it ends");
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replays kube-proxy's kernel state on `node`: the kernel parameters it changed (those of
/// the network namespace: the conntrack table's limits are the host's), `kube-ipvs0` with its
/// addresses, its ipsets, its rules and its IPVS table.
fn replay_kube_proxy(node: &Node) {
    node.exec("ip", &["link", "add", "kube-ipvs0", "type", "dummy"]).expect("kube-ipvs0");
    for line in ADDRESSES.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("inet ").or_else(|| line.strip_prefix("inet6 ")) {
            let address = rest.split_whitespace().next().expect("an address");
            node.exec("ip", &["addr", "add", address, "dev", "kube-ipvs0"]).expect("an address");
        }
    }
    let before: BTreeSet<&str> = SYSCTL_BEFORE.lines().collect();
    for line in SYSCTL_AFTER.lines().filter(|l| !before.contains(l)) {
        let Some((key, value)) = line.split_once(" = ") else { continue };
        if key.starts_with("net.netfilter.") {
            continue;
        }
        node.exec("sysctl", &["-qw", &format!("{key}={value}")]).expect("a kernel parameter");
    }
    feed(node, "ipset", &["restore"], IPSETS);
    feed(node, "iptables-restore", &[], IPTABLES);
    feed(node, "ip6tables-restore", &[], IP6TABLES);
    feed(node, "ipvsadm", &["-R"], &kube_proxy_table());
}

/// What kube-proxy does to IPVS when it starts again on a node (a rollback): its table
/// becomes the golden one. Virtual servers it does not want are deleted when their address
/// is on `kube-ipvs0` or is the node's (kube-proxy's `cleanLegacyService`); others (such as
/// firewall-mark ones) it does not know and leaves.
fn kube_proxy_resyncs_ipvs(node: &Node) {
    let current = node.exec("ipvsadm", &["-Sn"]).expect("ipvsadm -Sn");
    let golden = kube_proxy_table();
    let key = |line: &str| -> Option<String> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() >= 3 && fields[0] == "-A").then(|| format!("{} {}", fields[1], fields[2]))
    };
    let wanted: BTreeSet<&str> = golden.lines().collect();
    let have: BTreeSet<&str> = current.lines().collect();
    let wanted_services: BTreeSet<String> = golden.lines().filter_map(key).collect();
    let run = |line: &str| {
        let args: Vec<&str> = line.split_whitespace().collect();
        node.exec("ipvsadm", &args).unwrap_or_else(|e| panic!("{e}"));
    };
    for line in current.lines().filter(|l| !wanted.contains(l)) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.first() {
            Some(&"-A") => {
                let service = key(line).expect("a service");
                let address = fields[2].rsplit_once(':').map(|(a, _)| a).unwrap_or_default();
                let ours = ADDRESSES.contains(&format!(" {address}/"))
                    || [NODE_IP, GATEWAY].iter().any(|a| a.to_string() == address);
                if wanted_services.contains(&service) {
                    run(&line.replacen("-A", "-E", 1));
                } else if fields[1] != "-f" && ours {
                    run(&format!("-D {service}"));
                }
            }
            Some(&"-a") if wanted_services.contains(&format!("{} {}", fields[1], fields[2])) => {
                run(&format!("-d {} {} {} {}", fields[1], fields[2], fields[3], fields[4]));
            }
            _ => {}
        }
    }
    for line in golden.lines().filter(|l| !have.contains(l)) {
        if line.starts_with("-A")
            && current.lines().filter_map(key).any(|k| Some(k.clone()) == key(line))
        {
            continue;
        }
        run(line);
    }
}

/// A TCP connection held open: it got its answer, and must echo later.
struct Held {
    what: String,
    stream: TcpStream,
}

fn hold(what: &str, netns: &crate::Netns, target: SocketAddr) -> Held {
    let stream = netns.run(|| {
        let mut stream =
            TcpStream::connect_timeout(&target, Duration::from_secs(2)).expect("held connection");
        stream.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let mut greeting = [0; 128];
        let n = stream.read(&mut greeting).expect("a greeting");
        assert!(n > 0, "{what}: no greeting");
        stream
    });
    Held { what: what.to_owned(), stream }
}

impl Held {
    /// Whether the connection still carries data both ways.
    fn echoes(&mut self) -> Result<(), String> {
        let fail = |e: std::io::Error| format!("{}: {e}", self.what);
        self.stream.write_all(b"ping").map_err(fail)?;
        let mut back = [0; 4];
        self.stream.read_exact(&mut back).map_err(fail)?;
        (&back == b"ping").then_some(()).ok_or(format!("{}: echoed {back:?}", self.what))
    }
}

/// Lines of kube-proxy's that are still in the kernel: `KUBE-*` chains in either iptables
/// back end, and `KUBE-*` ipsets.
fn kube_proxy_leftovers(node: &Node) -> Vec<String> {
    let mut left = Vec::new();
    for save in
        ["iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"]
    {
        let text = node.exec(save, &[]).unwrap_or_default();
        left.extend(text.lines().filter(|l| l.contains("KUBE-")).map(|l| format!("{save}: {l}")));
    }
    let sets = node.exec("ipset", &["list", "-n"]).unwrap_or_default();
    left.extend(sets.lines().filter(|l| l.starts_with("KUBE-")).map(|l| format!("ipset {l}")));
    left
}

fn sorted(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// Runs the takeover and the rollback; reports them.
pub fn run() -> Report {
    let mut report = Report::default();
    let check = |report: &mut Report, what: &str, result: Result<(), String>| {
        report.checks.push(Outcome { what: what.to_owned(), result });
    };
    underlay(UNDERLAY_IP);
    let mut node = Node::new(NODE, "", NODE_IP, 0);
    let node_b = Node::new("node-b", "", NODE_B_IP, 1);
    node.route_to(&node_b);
    node_b.route_to(&node);
    let outside =
        outside_client(&[OUTSIDE], NODE_IP, &["10.96.0.0/16", "192.0.2.0/24", "198.51.100.0/24"]);

    let objects = objects();
    let mut pods: Vec<NodePod> = Vec::new();
    for address in endpoint_addresses(&objects) {
        let [_, _, octet, last] = address.octets();
        let host = if octet == 0 { &node } else { &node_b };
        pods.push(host.pod_at(usize::from(octet), &format!("pod-{octet}-{last}"), last));
    }
    let client = node.pod_at(0, "client", CLIENT_POD);

    replay_kube_proxy(&node);
    let golden_table = node.exec("ipvsadm", &["-Sn"]).expect("ipvsadm -Sn");
    check(
        &mut report,
        "kube-proxy's state replayed: ipvsadm -Sn is kube-proxy's",
        (sorted(&golden_table) == sorted(&kube_proxy_table())).then_some(()).ok_or(golden_table),
    );

    let api = ApiServer::start(Some(&node.netns.name), SocketAddr::from((NODE_IP, 6443)));
    for object in &objects {
        api.put(object);
    }
    let answered = |p: &str| p.starts_with("pod-");
    let clients = vec![
        Client {
            name: "pod → ClusterIPs".into(),
            netns: client.pod.netns.name.clone(),
            source: None,
            targets: vec![
                (SocketAddr::from(([10, 96, 10, 1], 80)), Transport::Tcp),
                (SocketAddr::from(([10, 96, 10, 4], 80)), Transport::Tcp),
                (SocketAddr::from(([10, 96, 10, 3], 53)), Transport::Udp),
                (SocketAddr::from(([10, 96, 10, 9], 80)), Transport::Tcp),
            ],
            expect: answered,
        },
        Client {
            name: "outside → node, LB, ext".into(),
            netns: outside.name.clone(),
            source: Some(IpAddr::V4(OUTSIDE)),
            targets: vec![
                (SocketAddr::from((NODE_IP, 30080)), Transport::Tcp),
                (SocketAddr::from((NODE_IP, 30053)), Transport::Udp),
                (SocketAddr::from(([192, 0, 2, 10], 80)), Transport::Tcp),
                (SocketAddr::from(([198, 51, 100, 20], 80)), Transport::Tcp),
                (SocketAddr::from((NODE_IP, 30081)), Transport::Tcp),
            ],
            expect: answered,
        },
    ];
    let traffic = Traffic::start(clients, "kube-proxy's state");
    let mut held = vec![
        hold(
            "pod → 10.96.10.1:80 held",
            &client.pod.netns,
            SocketAddr::from(([10, 96, 10, 1], 80)),
        ),
        hold("outside → NodePort 30080 held", &outside, SocketAddr::from((NODE_IP, 30080))),
    ];
    std::thread::sleep(Duration::from_secs(2));

    // docs/migration.md, "Node by node", step 2: kube-ipvs starts.
    traffic.phase("kube-ipvs started");
    node.configure(&api.kubeconfig());
    node.start();
    node.wait_synced();
    report.takeover_writes = crate::daemon::ipvs_writes_by_kind(&node.metrics())
        .into_iter()
        .filter(|(_, n)| *n > 0.0)
        .map(|(kind, n)| (kind.to_owned(), n))
        .collect();
    let diff = node.kube_ipvs(&["ls", "--diff"]);
    check(
        &mut report,
        "step 2: kube-ipvs ls --diff prints nothing",
        match diff {
            Ok(text) if text.trim().is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let health = node.get(&format!("{NODE_IP}:10256"), "/healthz");
    check(
        &mut report,
        "step 2: /healthz on the node is 200 and healthy",
        match &health {
            Some((200, body)) if body.contains("\"healthy\":true") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    std::thread::sleep(Duration::from_secs(2));

    // Step 3: kube-proxy's rules and sets go, as the guide's script removes them.
    traffic.phase("kube-proxy's rules and sets removed");
    let table_before = node.exec("ipvsadm", &["-Sn"]).expect("ipvsadm");
    let removed = node.exec("sh", &["-c", &script("remove-kube-proxy-rules")]);
    check(&mut report, "step 3: the guide's script ran", removed.map(|_| ()));
    let table_after = node.exec("ipvsadm", &["-Sn"]).expect("ipvsadm");
    check(
        &mut report,
        "step 3: the IPVS table (ipvsadm -Sn) unchanged by it",
        (table_before == table_after)
            .then_some(())
            .ok_or(format!("{table_before}\nbecame\n{table_after}")),
    );
    let left = kube_proxy_leftovers(&node);
    check(
        &mut report,
        "no KUBE-* chain or ipset of kube-proxy's is left",
        left.is_empty().then_some(()).ok_or(left.join("\n")),
    );
    std::thread::sleep(Duration::from_secs(2));
    for connection in &mut held {
        let what = format!("established connection survives the takeover: {}", connection.what);
        check(&mut report, &what, connection.echoes());
    }
    let ls = node.kube_ipvs(&["ls"]);
    let ipvsadm = node.exec("ipvsadm", &["-Ln"]);
    check(
        &mut report,
        "IPVS holds exactly kube-ipvs's table: ipvsadm -Ln is kube-ipvs ls",
        ls.and_then(|ls| {
            // Requests run on: the connection counts move between the two listings.
            let ipvsadm = crate::checks::without_connection_counts(&ipvsadm?);
            crate::checks::ls_matches_ipvsadm(
                &crate::checks::without_connection_counts(&ls),
                &ipvsadm,
            )
        }),
    );

    // "Rolling back a node": kube-ipvs stops, kube-proxy starts (its rules, sets and IPVS
    // table, as it writes them), then kube-ipvs's own table goes.
    traffic.phase("rolled back to kube-proxy");
    let mut rolled_back_held = vec![hold(
        "pod → 10.96.10.4:80 held across the rollback",
        &client.pod.netns,
        SocketAddr::from(([10, 96, 10, 4], 80)),
    )];
    node.stop("TERM");
    feed(&node, "ipset", &["restore", "-exist"], IPSETS);
    feed(&node, "iptables-restore", &[], IPTABLES);
    feed(&node, "ip6tables-restore", &[], IP6TABLES);
    kube_proxy_resyncs_ipvs(&node);
    let rollback = node.exec("sh", &["-c", &script("roll-back")]);
    check(&mut report, "rollback: the guide's script ran", rollback.map(|_| ()));
    std::thread::sleep(Duration::from_secs(2));
    let table = node.exec("ipvsadm", &["-Sn"]).expect("ipvsadm -Sn");
    check(
        &mut report,
        "rollback: ipvsadm -Sn is kube-proxy's again",
        (sorted(&table) == sorted(&kube_proxy_table())).then_some(()).ok_or(table),
    );
    let nft = node.exec("nft", &["list", "tables"]).unwrap_or_default();
    check(
        &mut report,
        "rollback: kube-ipvs's nftables table is gone",
        (!nft.contains("kube-ipvs")).then_some(()).ok_or(nft),
    );
    held.append(&mut rolled_back_held);
    for connection in &mut held {
        let what = format!("established connection survives the rollback: {}", connection.what);
        check(&mut report, &what, connection.echoes());
    }
    report.phases = traffic.finish();
    drop(pods);
    report
}
