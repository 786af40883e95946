//! A whole cluster in one VM: three nodes, their pods, an outside client and one API server.
//!
//! The test's own network namespace is the underlay: a bridge ([`UNDERLAY`]) joining the
//! nodes, the outside client and the API server ([`API`], the `fake-apiserver` binary). Each
//! node is a network namespace with its own IPVS table, nftables, kernel parameters and
//! `kube-ipvs0`, a pod bridge with its own pod CIDR (`10.244.1<n>.0/24`), and routes to the
//! other nodes' pod CIDRs through their addresses (host-gw, as flannel does). Each node runs
//! the shipped `kube-ipvs` binary with the deploy ConfigMap's configuration, only the API
//! server's address and the node's name its own.

pub mod api;
pub mod objects;
pub mod scenario;
pub mod takeover;
pub mod traffic;

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::{
    Netns, Pod,
    checks::cluster::{ClusterView, Origin, Reply, Transport},
    daemon::{HEALTHZ, METRICS, http_get, ipvs_writes, metric},
    sh,
};

/// The underlay bridge in the test's namespace.
pub const UNDERLAY: &str = "underlay";
/// The underlay's own address: the API server's host.
pub const UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// Where the API server listens.
pub const API: SocketAddr = SocketAddr::new(IpAddr::V4(UNDERLAY_IP), 6443);
/// The outside client's address.
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
/// The outside client's second address, which no `loadBalancerSourceRanges` admits.
pub const OUTSIDE_REFUSED: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 101);
/// The range of Service addresses.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The range of load-balancer addresses.
pub const LB_CIDR: &str = "192.0.2.0/24";

/// The shipped `kube-ipvs` (the `dist` profile): `KUBE_IPVS_DIST_BIN`, else `target/dist`
/// next to the tests or programs (`cargo xtask vmtest` builds it).
pub fn shipped_binary() -> PathBuf {
    crate::built_executable(
        "KUBE_IPVS_DIST_BIN",
        "dist/kube-ipvs",
        "cargo build --profile dist -p kube-ipvs",
    )
}

/// The configuration of `deploy/configmap.yaml` with `clientConnection.kubeconfig` set.
pub fn shipped_config(kubeconfig: &Path) -> String {
    let configmap: serde_json::Value =
        serde_norway::from_str(include_str!("../../../../deploy/configmap.yaml"))
            .expect("deploy/configmap.yaml parses");
    let text = configmap["data"]["config.conf"].as_str().expect("config.conf in the ConfigMap");
    let mut config: serde_json::Value = serde_norway::from_str(text).expect("config.conf parses");
    config["clientConnection"] = serde_json::json!({"kubeconfig": kubeconfig});
    serde_norway::to_string(&config).expect("a configuration")
}

static LINKS: AtomicUsize = AtomicUsize::new(0);

/// A pod on a node; its link and namespace go on drop.
pub struct NodePod {
    /// The pod (its namespace, address and name).
    pub pod: Pod,
    /// The node it runs on (an index into [`Cluster::nodes`]).
    pub node: usize,
    link: String,
    node_netns: String,
}

impl Drop for NodePod {
    fn drop(&mut self) {
        let _ =
            Command::new("ip").args(["-n", &self.node_netns, "link", "del", &self.link]).status();
    }
}

/// A node: a network namespace on the underlay with its pod bridge, and its kube-ipvs.
pub struct Node {
    /// Its name (`node-a`, …).
    pub name: String,
    /// Its zone.
    pub zone: String,
    /// Its address on the underlay.
    pub ip: Ipv4Addr,
    /// Its pod CIDR's third octet: pods are `10.244.<octet>.x`.
    pub pod_octet: u8,
    /// Its namespace.
    pub netns: Netns,
    next_pod: Cell<u8>,
    daemon: Option<Child>,
    /// kube-ipvs's log (standard error), appended across restarts.
    pub log: PathBuf,
    config: PathBuf,
}

impl Node {
    /// A node on the underlay at `ip`, with a pod bridge for `10.244.<pod_octet>.0/24`, the
    /// kernel parameters a CNI sets, and a veth to the underlay.
    pub fn new(name: &str, zone: &str, ip: Ipv4Addr, pod_octet: u8) -> Self {
        let netns = Netns::new(name);
        let underlay_side = format!("u-{name}");
        plug(None, &underlay_side, UNDERLAY, &netns, &[&format!("{ip}/24")]);
        // A fixed address, as CNIs give their bridge: otherwise the bridge takes the lowest
        // of its ports' addresses, and a pod starting or going changes it under the other
        // pods' neighbour entries for their gateway (replies are lost until they re-learn).
        let mac = format!("02:00:00:00:{pod_octet:02x}:01");
        netns.ip(&["link", "add", "cbr0", "address", &mac, "type", "bridge"]);
        netns.ip(&["addr", "add", &format!("10.244.{pod_octet}.1/24"), "dev", "cbr0"]);
        netns.ip(&["link", "set", "cbr0", "up"]);
        // What a bridge CNI sets, and kube-proxy needs: forwarding, bridged traffic through
        // netfilter.
        for setting in ["net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"] {
            sh("ip", &["netns", "exec", &netns.name, "sysctl", "-qw", setting]);
        }
        let dir = std::env::var_os("KUBE_IPVS_CLUSTER_LOGS")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join(format!("cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the nodes' files");
        Self {
            name: name.to_owned(),
            zone: zone.to_owned(),
            ip,
            pod_octet,
            netns,
            next_pod: Cell::new(2),
            daemon: None,
            log: dir.join(format!("kube-ipvs-{name}.log")),
            config: dir.join(format!("config-{name}.yaml")),
        }
    }

    /// Routes another node's pod CIDR through its address.
    pub fn route_to(&self, other: &Node) {
        let cidr = format!("10.244.{}.0/24", other.pod_octet);
        self.netns.ip(&["route", "add", &cidr, "via", &other.ip.to_string()]);
    }

    /// Starts a pod named `name` on this node's bridge at the next free address, serving
    /// TCP on 8080 and UDP on 5353; `index` is the node's in [`Cluster::nodes`].
    pub fn pod(&self, index: usize, name: &str) -> NodePod {
        let last = self.next_pod.get();
        self.next_pod.set(last + 1);
        self.pod_at(index, name, last)
    }

    /// Starts a pod named `name` at `10.244.<pod octet>.<last>`; see [`Node::pod`]. Its
    /// TCP server holds connections open, echoing what the client sends.
    pub fn pod_at(&self, index: usize, name: &str, last: u8) -> NodePod {
        let ip = Ipv4Addr::new(10, 244, self.pod_octet, last);
        let netns = Netns::new("pod");
        let link = format!("vp{}", LINKS.fetch_add(1, Ordering::Relaxed));
        plug(Some(&self.netns), &link, "cbr0", &netns, &[&format!("{ip}/24")]);
        // As bridge CNIs do (hairpinMode): a pod's packets may come back out of its own port.
        self.netns.ip(&["link", "set", &link, "type", "bridge_slave", "hairpin", "on"]);
        netns.ip(&["route", "add", "default", "via", &format!("10.244.{}.1", self.pod_octet)]);
        let pod = Pod { netns, ip, name: name.to_owned() };
        pod.serve_tcp_held(8080);
        pod.serve_udp(5353);
        NodePod { pod, node: index, link, node_netns: self.netns.name.clone() }
    }

    /// Writes the node's kubeconfig and configuration (the deploy ConfigMap's).
    pub fn configure(&self, kubeconfig: &str) {
        let path = self.config.with_extension("kubeconfig");
        std::fs::write(&path, kubeconfig).expect("kubeconfig written");
        std::fs::write(&self.config, shipped_config(&path)).expect("configuration written");
    }

    /// Starts kube-ipvs on the node as the DaemonSet does: `run --config`, the node's name in
    /// `NODE_NAME`.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "kube-ipvs already runs on {}", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns.name])
            .arg(shipped_binary())
            .arg("run")
            .arg(format!("--config={}", self.config.display()))
            .env("NODE_NAME", &self.name)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kube-ipvs starts");
        self.daemon = Some(child);
    }

    /// Sends `signal` (`TERM` or `KILL`) to kube-ipvs and waits until it is gone.
    pub fn stop(&mut self, signal: &str) {
        let mut child = self.daemon.take().expect("kube-ipvs runs");
        sh("kill", &[&format!("-{signal}"), &child.id().to_string()]);
        let started = Instant::now();
        while child.try_wait().expect("waitable").is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "kube-ipvs on {} did not stop on SIG{signal}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether kube-ipvs runs.
    pub fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|c| c.try_wait().expect("waitable").is_none())
    }

    /// `GET path` on the node's metrics server.
    pub fn get(&self, address: &str, path: &str) -> Option<(u16, String)> {
        let address: SocketAddr = address.parse().expect("an address");
        self.netns.run(|| http_get(address, path).ok())
    }

    /// kube-ipvs's metrics.
    pub fn metrics(&self) -> String {
        self.get(METRICS, "/metrics").map(|(_, body)| body).unwrap_or_default()
    }

    /// The IPVS messages that changed the kernel, from kube-ipvs's metrics.
    pub fn ipvs_writes(&self) -> f64 {
        ipvs_writes(&self.metrics())
    }

    /// Waits until kube-ipvs has synced once and says it is healthy.
    pub fn wait_synced(&mut self) {
        let started = Instant::now();
        loop {
            assert!(self.running(), "kube-ipvs on {} exited:\n{}", self.name, self.log_tail(40));
            let synced =
                metric(&self.metrics(), "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
            let healthy = self.get(HEALTHZ, "/healthz").is_some_and(|(code, _)| code == 200);
            if synced > 0.0 && healthy {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "kube-ipvs on {} did not sync in 120 s:\n{}",
                self.name,
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of kube-ipvs's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs a command in the node's namespace; its standard output, or its error.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns.name, program])
            .args(args)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{program} {} on {}: {}\n{stdout}{}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `kube-ipvs` (the shipped binary) with `args` on this node.
    pub fn kube_ipvs(&self, args: &[&str]) -> Result<String, String> {
        self.exec(&shipped_binary().to_string_lossy(), args)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "kube-ipvs on {} ({}), last lines:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            );
        }
    }
}

/// The outside client: a namespace on the underlay at `addresses` (the first is its main
/// one), routing `ranges` to `via`.
pub fn outside_client(addresses: &[Ipv4Addr], via: Ipv4Addr, ranges: &[&str]) -> Netns {
    let client = Netns::new("outside");
    let addresses: Vec<String> = addresses.iter().map(|a| format!("{a}/24")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    plug(None, "u-outside", UNDERLAY, &client, &addresses);
    for range in ranges {
        client.ip(&["route", "add", range, "via", &via.to_string()]);
    }
    client
}

/// Joins `guest` to `bridge`: a veth pair, `name` in `host` (the test's own namespace when
/// `None`) on the bridge, and `eth0` in `guest` with `addresses`; both ends up.
fn plug(host: Option<&Netns>, name: &str, bridge: &str, guest: &Netns, addresses: &[&str]) {
    let ip = |args: &[&str]| match host {
        Some(host) => drop(host.ip(args)),
        None => drop(sh("ip", args)),
    };
    ip(&["link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", &guest.name]);
    ip(&["link", "set", name, "master", bridge, "up"]);
    for address in addresses {
        guest.ip(&["addr", "add", address, "dev", "eth0"]);
    }
    guest.ip(&["link", "set", "eth0", "up"]);
}

/// The underlay bridge in the test's namespace, with `address` (/24) of its own.
pub fn underlay(address: Ipv4Addr) {
    sh("ip", &["link", "add", UNDERLAY, "address", "02:00:00:00:ff:01", "type", "bridge"]);
    sh("ip", &["addr", "add", &format!("{address}/24"), "dev", UNDERLAY]);
    sh("ip", &["link", "set", UNDERLAY, "up"]);
}

/// The cluster: nodes, pods, the outside client and the API server.
pub struct Cluster {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Every pod, by name.
    pub pods: std::collections::BTreeMap<String, NodePod>,
    /// The outside client.
    pub outside: Netns,
    /// The API server.
    pub api: api::ApiServer,
}

/// Short timeouts for one request: a connection 1 s, its answer 2 s.
const CONNECT: Duration = Duration::from_secs(1);
const ANSWER: Duration = Duration::from_secs(2);

/// One request from the current thread's namespace, with short timeouts.
pub fn request(
    target: SocketAddr,
    transport: Transport,
    source: Option<IpAddr>,
) -> Result<Reply, String> {
    use socket2::{Domain, Socket, Type};
    use std::io::Read;
    let failed = |e: std::io::Error| format!("{target}: {e}");
    let socket = Socket::new(
        Domain::for_address(target),
        if transport == Transport::Tcp { Type::STREAM } else { Type::DGRAM },
        None,
    )
    .map_err(failed)?;
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    match (source, transport) {
        (Some(source), _) => socket.bind(&SocketAddr::new(source, 0).into()).map_err(failed)?,
        (None, Transport::Udp) => {
            socket.bind(&SocketAddr::new(unspecified, 0).into()).map_err(failed)?
        }
        (None, Transport::Tcp) => {}
    }
    let mut text = vec![0; 256];
    let n = match transport {
        Transport::Tcp => {
            socket.connect_timeout(&target.into(), CONNECT).map_err(failed)?;
            socket.set_read_timeout(Some(ANSWER)).map_err(failed)?;
            // Nothing to send: a server that holds connections open closes on this.
            socket.shutdown(std::net::Shutdown::Write).map_err(failed)?;
            let mut stream: std::net::TcpStream = socket.into();
            let mut all = Vec::new();
            stream.read_to_end(&mut all).map_err(failed)?;
            text = all;
            text.len()
        }
        Transport::Udp => {
            let socket: std::net::UdpSocket = socket.into();
            socket.set_read_timeout(Some(ANSWER)).map_err(failed)?;
            socket.send_to(b"who", target).map_err(failed)?;
            socket.recv(&mut text).map_err(failed)?
        }
    };
    Reply::parse(&String::from_utf8_lossy(&text[..n])).map_err(|e| format!("{target}: {e}"))
}

impl Cluster {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The node's namespace hosting the pod or client named `name`.
    fn netns_of(&self, pod: &str) -> &Netns {
        &self.pods.get(pod).unwrap_or_else(|| panic!("no pod {pod}")).pod.netns
    }
}

impl ClusterView for Cluster {
    fn ask(
        &self,
        origin: Origin<'_>,
        target: SocketAddr,
        transport: Transport,
    ) -> Result<Reply, String> {
        match origin {
            Origin::Pod(pod) => self.netns_of(pod).run(|| request(target, transport, None)),
            Origin::Outside(source) => {
                self.outside.run(|| request(target, transport, Some(source)))
            }
        }
    }

    fn http_status(&self, target: SocketAddr) -> Result<u16, String> {
        self.outside
            .run(|| http_get(target, "/"))
            .map(|(code, _)| code)
            .map_err(|e| format!("{target}: {e}"))
    }

    fn ipvsadm(&self, node: &str) -> Result<String, String> {
        self.node(node).exec("ipvsadm", &["-Ln"])
    }

    fn ls(&self, node: &str) -> Result<String, String> {
        self.node(node).kube_ipvs(&["ls"])
    }

    fn ls_diff(&self, node: &str) -> Result<String, String> {
        self.node(node).kube_ipvs(&["ls", "--diff"])
    }
}
