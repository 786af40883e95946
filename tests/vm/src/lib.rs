//! Support code for the privileged tests that run inside the VM (`cargo xtask vmtest`).
//!
//! Each test runs as its own process in a fresh network namespace with `lo` up: that namespace
//! plays the node. [`Pod`]s are further namespaces joined to it by veth pairs, with a server
//! that answers every TCP connection and UDP datagram with the pod's name.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

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

/// Runs `ipvsadm` with the given arguments and returns its output.
pub fn ipvsadm(args: &[&str]) -> String {
    sh("ipvsadm", args)
}

static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (under `/run/netns`), deleted on drop.
pub struct Netns {
    /// Its name, for `ip netns exec`.
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
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A "pod": a namespace joined to the test's own namespace (the node) by a veth pair, with the
/// address `10.244.<index>.2/24` and a route back through `10.244.<index>.1`.
pub struct Pod {
    /// The pod's namespace.
    pub netns: Netns,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The name the pod's servers answer with.
    pub name: String,
}

impl Pod {
    /// Creates pod number `index` (1 to 254).
    pub fn new(index: u8) -> Self {
        let netns = Netns::new(&format!("pod{index}"));
        let node_side = format!("vpod{index}");
        let node_ip = format!("10.244.{index}.1/24");
        let ip = Ipv4Addr::new(10, 244, index, 2);
        sh(
            "ip",
            &[
                "link",
                "add",
                &node_side,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns.name,
            ],
        );
        sh("ip", &["addr", "add", &node_ip, "dev", &node_side]);
        sh("ip", &["link", "set", &node_side, "up"]);
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        netns.ip(&["route", "add", "default", "via", &format!("10.244.{index}.1")]);
        Self { netns, ip, name: format!("pod{index}") }
    }

    /// The pod's address with a port.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// Serves TCP on `port` in the pod: every connection gets the pod's name and is closed.
    pub fn serve_tcp(&self, port: u16) {
        self.serve_tcp_with(port, false);
    }

    /// Serves TCP on `port` in the pod, holding each connection open until the client closes it.
    pub fn serve_tcp_held(&self, port: u16) {
        self.serve_tcp_with(port, true);
    }

    fn serve_tcp_with(&self, port: u16, hold: bool) {
        let listener = self.netns.run(|| TcpListener::bind(("0.0.0.0", port)).expect("bind"));
        let name = self.name.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.write_all(name.as_bytes());
                if hold {
                    thread::spawn(move || {
                        let mut sink = [0; 64];
                        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                    });
                }
            }
        });
    }

    /// Serves UDP on `port` in the pod: every datagram is answered with the pod's name.
    pub fn serve_udp(&self, port: u16) {
        let socket = self.netns.run(|| UdpSocket::bind(("0.0.0.0", port)).expect("bind"));
        let name = self.name.clone();
        thread::spawn(move || {
            let mut buf = [0; 1500];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(name.as_bytes(), peer);
            }
        });
    }
}

/// Connects over TCP and returns what the server said before closing.
pub fn tcp_ask(address: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Sends one UDP datagram and returns the answer.
pub fn udp_ask(address: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(b"who", address)?;
    let mut buf = [0; 1500];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Binds `address` to `lo` of the test's namespace so the kernel accepts packets to it, as
/// kube-ipvs0 does for Service addresses.
pub fn bind_vip(address: IpAddr) {
    let prefix = if address.is_ipv4() { 32 } else { 128 };
    sh("ip", &["addr", "add", &format!("{address}/{prefix}"), "dev", "lo"]);
}
