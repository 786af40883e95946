//! Support code for the privileged tests that run inside the VM (`cargo xtask vmtest`).
//!
//! Each test runs as its own process in a fresh network namespace with `lo` up: that namespace
//! plays the node. [`Pod`]s are further namespaces joined to it by veth pairs, with servers that
//! answer every TCP connection and UDP datagram with the pod's name and the address the
//! connection came from ([`Answer`]). [`Topology`] builds a node with a bridge of pods and an
//! external client on its own link.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::Duration,
};

pub mod checks;
pub mod cluster;
pub mod daemon;

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};

/// Runs a command and returns its standard output; panics with its error output on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An executable cargo built: the path in the environment variable `variable` if set, else
/// `relative` under the directories of this test or program (tests are in
/// `target/<profile>/deps`, programs in `target/<profile>`) or under `target/`.
///
/// # Panics
/// If there is none, saying how to build it (`build`).
pub fn built_executable(variable: &str, relative: &str, build: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the executable's path");
    let candidates: Vec<std::path::PathBuf> =
        exe.ancestors().skip(1).take(3).map(|dir| dir.join(relative)).collect();
    let found = candidates.iter().find(|path| path.exists()).cloned();
    found.unwrap_or_else(|| panic!("no {relative} in {candidates:?}: build it with `{build}`"))
}

/// Runs `ipvsadm` with the given arguments and returns its output.
pub fn ipvsadm(args: &[&str]) -> String {
    sh("ipvsadm", args)
}

/// Programs `rules` (`ipvsadm -S` format) with `ipvsadm -R`; returns how long it took.
pub fn ipvsadm_restore(rules: &str) -> Duration {
    let started = std::time::Instant::now();
    let mut child = Command::new("ipvsadm")
        .arg("-R")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ipvsadm runs");
    child.stdin.take().expect("piped").write_all(rules.as_bytes()).expect("rules written");
    assert!(child.wait().expect("ipvsadm ends").success(), "ipvsadm -R failed");
    started.elapsed()
}

static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (under `/run/netns`), deleted on drop.
pub struct Netns {
    /// Its name, for `ip -n`.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with `lo` up; the name is unique to this process.
    pub fn new(role: &str) -> Self {
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{role}-{}-{n}", std::process::id());
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `f` on a thread inside this namespace. Sockets created there stay in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).expect("namespace file");
                    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("thread in namespace panicked")
        })
    }

    /// Runs `ip` with the given arguments in this namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Joins this namespace to the test's own by a veth pair: `node_side` (with `node_address`,
    /// prefix included) in the test's namespace, `eth0` (with `address`) here.
    pub fn link(&self, node_side: &str, node_address: Option<&str>, address: &str) {
        sh(
            "ip",
            &[
                "link", "add", node_side, "type", "veth", "peer", "name", "eth0", "netns",
                &self.name,
            ],
        );
        if let Some(node_address) = node_address {
            sh("ip", &["addr", "add", node_address, "dev", node_side]);
        }
        sh("ip", &["link", "set", node_side, "up"]);
        self.ip(&["addr", "add", address, "dev", "eth0"]);
        self.ip(&["link", "set", "eth0", "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// What a pod's server answered: its name, and the address it saw the client at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The pod's name.
    pub from: String,
    /// The source address of the connection as the pod saw it.
    pub peer: IpAddr,
}

impl Answer {
    fn parse(text: &str) -> std::io::Result<Self> {
        let bad =
            || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("answer {text:?}"));
        let (from, peer) = text.split_once(' ').ok_or_else(bad)?;
        Ok(Self { from: from.to_owned(), peer: peer.parse().map_err(|_| bad())? })
    }
}

/// A "pod": a namespace joined to the test's own namespace (the node) by a veth pair.
pub struct Pod {
    /// The pod's namespace.
    pub netns: Netns,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The name the pod's servers answer with.
    pub name: String,
}

impl Pod {
    /// Pod number `index` (1 to 254) on a link of its own: `10.244.<index>.2/24`, routed
    /// through `10.244.<index>.1` on the node.
    pub fn new(index: u8) -> Self {
        let netns = Netns::new(&format!("pod{index}"));
        let ip = Ipv4Addr::new(10, 244, index, 2);
        netns.link(
            &format!("vpod{index}"),
            Some(&format!("10.244.{index}.1/24")),
            &format!("{ip}/24"),
        );
        netns.ip(&["route", "add", "default", "via", &format!("10.244.{index}.1")]);
        Self { netns, ip, name: format!("pod{index}") }
    }

    /// Pod number `index` (1 to 250) on the node's bridge [`BRIDGE`]: `10.244.0.<index + 1>`.
    pub fn on_bridge(index: u8) -> Self {
        let netns = Netns::new(&format!("pod{index}"));
        let ip = Ipv4Addr::new(10, 244, 0, index + 1);
        let node_side = format!("vpod{index}");
        netns.link(&node_side, None, &format!("{ip}/24"));
        sh("ip", &["link", "set", &node_side, "master", BRIDGE]);
        // As bridge CNIs do (hairpinMode): a pod's packets may come back out of its own port.
        sh("ip", &["link", "set", &node_side, "type", "bridge_slave", "hairpin", "on"]);
        netns.ip(&["route", "add", "default", "via", &BRIDGE_IP.to_string()]);
        Self { netns, ip, name: format!("pod{index}") }
    }

    /// The pod's address with a port.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// Serves TCP on `port` in the pod: every connection gets an [`Answer`] and is closed.
    pub fn serve_tcp(&self, port: u16) {
        self.serve_tcp_with(port, false);
    }

    /// Serves TCP on `port` in the pod, holding each connection open until the client closes
    /// it and echoing whatever the client sends.
    pub fn serve_tcp_held(&self, port: u16) {
        self.serve_tcp_with(port, true);
    }

    /// The pod's IPv6 address on the bridge, `fd00:244::<index + 1>`, when it has one
    /// ([`Pod::add_ipv6`]).
    pub fn ipv6(&self) -> Ipv6Addr {
        let index = self.ip.octets()[3];
        Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, index.into())
    }

    /// Gives a bridge pod its IPv6 address ([`Pod::ipv6`], /64) and a default route through
    /// the bridge's [`BRIDGE_IP6`], and serves TCP on `tcp_port` and UDP on `udp_port` over
    /// IPv6 too, answering as over IPv4.
    pub fn add_ipv6(&self, tcp_port: u16, udp_port: u16) {
        let address = format!("{}/64", self.ipv6());
        self.netns.ip(&["addr", "add", &address, "dev", "eth0", "nodad"]);
        self.netns.ip(&["-6", "route", "add", "default", "via", &BRIDGE_IP6.to_string()]);
        let v6 = |kind: Type| {
            let socket = Socket::new(Domain::IPV6, kind, None).expect("an IPv6 socket");
            socket.set_only_v6(true).expect("IPv6 only");
            socket
        };
        let tcp = self.netns.run(|| {
            let socket = v6(Type::STREAM);
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, tcp_port)).into()).expect("bind");
            socket.listen(128).expect("listen");
            TcpListener::from(socket)
        });
        self.serve_tcp_listener(tcp, false);
        let udp = self.netns.run(|| {
            let socket = v6(Type::DGRAM);
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, udp_port)).into()).expect("bind");
            UdpSocket::from(socket)
        });
        self.serve_udp_socket(udp);
    }

    /// Serves SCTP (one-to-one style) on `port` in the pod: every association gets an
    /// [`Answer`] and is closed.
    pub fn serve_sctp(&self, port: u16) {
        let listener = self.netns.run(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(socket2::Protocol::SCTP))
                .expect("an SCTP socket (is the sctp module loaded?)");
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).expect("bind");
            socket.listen(128).expect("listen");
            socket
        });
        let name = self.name.clone();
        thread::spawn(move || {
            while let Ok((mut association, peer)) = listener.accept() {
                let peer = peer.as_socket().map(|p| p.ip().to_string()).unwrap_or_default();
                let _ = association.write_all(format!("{name} {peer}").as_bytes());
            }
        });
    }

    fn serve_tcp_with(&self, port: u16, hold: bool) {
        let listener = self.netns.run(|| TcpListener::bind(("0.0.0.0", port)).expect("bind"));
        self.serve_tcp_listener(listener, hold);
    }

    fn serve_tcp_listener(&self, listener: TcpListener, hold: bool) {
        let name = self.name.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let peer = stream.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let _ = stream.write_all(format!("{name} {peer}").as_bytes());
                if hold {
                    thread::spawn(move || {
                        let mut buf = [0; 64];
                        while let Ok(n @ 1..) = stream.read(&mut buf) {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
    }

    /// Serves UDP on `port` in the pod: every datagram is answered with an [`Answer`].
    pub fn serve_udp(&self, port: u16) {
        let socket = self.netns.run(|| UdpSocket::bind(("0.0.0.0", port)).expect("bind"));
        self.serve_udp_socket(socket);
    }

    fn serve_udp_socket(&self, socket: UdpSocket) {
        let name = self.name.clone();
        thread::spawn(move || {
            let mut buf = [0; 1500];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
            }
        });
    }
}

/// Connects over TCP and returns what the server said before closing.
pub fn tcp_ask(address: SocketAddr) -> std::io::Result<Answer> {
    tcp_ask_from(None, address)
}

/// Connects over TCP from `source` (an address of this namespace), with a 3 s timeout.
pub fn tcp_ask_from(source: Option<IpAddr>, address: SocketAddr) -> std::io::Result<Answer> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    if let Some(source) = source {
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    socket.connect_timeout(&address.into(), Duration::from_secs(3))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Answer::parse(&answer)
}

/// Opens an SCTP association (one-to-one style) and returns what the server said.
pub fn sctp_ask(address: SocketAddr) -> std::io::Result<Answer> {
    let socket =
        Socket::new(Domain::for_address(address), Type::STREAM, Some(socket2::Protocol::SCTP))?;
    socket.connect_timeout(&address.into(), Duration::from_secs(3))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = [0; 128];
    let n = std::io::Read::read(&mut &socket, &mut answer)?;
    Answer::parse(&String::from_utf8_lossy(&answer[..n]))
}

/// Sends one UDP datagram and returns the answer.
pub fn udp_ask(address: SocketAddr) -> std::io::Result<Answer> {
    let unspecified: IpAddr =
        if address.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let socket = UdpSocket::bind((unspecified, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(b"who", address)?;
    let mut buf = [0; 1500];
    let (n, _) = socket.recv_from(&mut buf)?;
    Answer::parse(&String::from_utf8_lossy(&buf[..n]))
}

/// Binds `address` to `lo` of the test's namespace so the kernel accepts packets to it, as
/// kube-ipvs0 does for Service addresses.
pub fn bind_vip(address: IpAddr) {
    let prefix = if address.is_ipv4() { 32 } else { 128 };
    sh("ip", &["addr", "add", &format!("{address}/{prefix}"), "dev", "lo"]);
}

/// The node's pod bridge.
pub const BRIDGE: &str = "cbr0";
/// The node's address on the pod bridge.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The node's IPv6 address on the pod bridge, once [`Topology::add_ipv6`] gave it one.
pub const BRIDGE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
/// The pod network's IPv6 range.
pub const CLUSTER_CIDR6: &str = "fd00:244::/64";
/// The node's IPv6 address on its external link, once [`Topology::add_ipv6`] gave it one.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);
/// The external client's IPv6 address.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10);
/// The pod network.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The node's address on its external link.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 2);
/// The external client's first address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 10);
/// The external client's second address.
pub const OTHER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 11);

/// A node: the test's namespace, with a bridge of pods and an external client that reaches
/// the node over its own link (and routes Service and load-balancer ranges through it).
pub struct Topology {
    /// The pods, `pod1` at `10.244.0.2` and so on.
    pub pods: Vec<Pod>,
    /// The external client, at [`CLIENT_IP`] and [`OTHER_CLIENT_IP`].
    pub client: Netns,
}

impl Topology {
    /// Builds the node with `pods` pods serving TCP on 8080 and UDP on 5353.
    pub fn new(pods: u8) -> Self {
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"]);
        sh("ip", &["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", BRIDGE]);
        sh("ip", &["link", "set", BRIDGE, "up"]);
        let pods: Vec<Pod> = (1..=pods).map(Pod::on_bridge).collect();
        for pod in &pods {
            pod.serve_tcp(8080);
            pod.serve_udp(5353);
        }
        let client = Netns::new("client");
        client.link("eth-node", Some(&format!("{NODE_IP}/24")), &format!("{CLIENT_IP}/24"));
        client.ip(&["addr", "add", &format!("{OTHER_CLIENT_IP}/24"), "dev", "eth0"]);
        for range in ["10.96.0.0/16", "192.0.2.0/24"] {
            client.ip(&["route", "add", range, "via", &NODE_IP.to_string()]);
        }
        Self { pods, client }
    }

    /// Makes the node dual-stack, as a dual-stack CNI does: IPv6 forwarding (and bridged IPv6
    /// through netfilter), [`BRIDGE_IP6`] on the bridge, every pod with its IPv6 address
    /// serving TCP on 8080 and UDP on 5353, [`NODE_IP6`] and [`CLIENT_IP6`] on the client's
    /// link, and the client routing the IPv6 Service range `fd00:96::/112` through the node.
    pub fn add_ipv6(&self) {
        sh("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        sh("sysctl", &["-qw", "net.bridge.bridge-nf-call-ip6tables=1"]);
        sh("ip", &["addr", "add", &format!("{BRIDGE_IP6}/64"), "dev", BRIDGE, "nodad"]);
        for pod in &self.pods {
            pod.add_ipv6(8080, 5353);
        }
        sh("ip", &["addr", "add", &format!("{NODE_IP6}/64"), "dev", "eth-node", "nodad"]);
        self.client.ip(&["addr", "add", &format!("{CLIENT_IP6}/64"), "dev", "eth0", "nodad"]);
        self.client.ip(&["-6", "route", "add", "fd00:96::/112", "via", &NODE_IP6.to_string()]);
    }

    /// The names of the pods.
    pub fn pod_names(&self) -> std::collections::BTreeSet<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }
}
