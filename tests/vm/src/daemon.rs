//! The real `kube-ipvs` binary as a process on the test's node, and the objects the tests
//! feed it. These helpers are shared by the VM end-to-end tests and `cargo xtask e2e`.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{Pod, sh, tcp_ask};

/// The `kube-ipvs` executable: `KUBE_IPVS_BIN`, else the one cargo built next to the tests
/// or programs (`cargo xtask vmtest` and `cargo xtask demo` build it).
pub fn binary() -> PathBuf {
    crate::built_executable("KUBE_IPVS_BIN", "kube-ipvs", "cargo build -p kube-ipvs")
}

/// A running `kube-ipvs run`, its output in a log file.
pub struct Daemon {
    child: Child,
    /// Its log (standard error).
    pub log: PathBuf,
}

/// The address of the metrics server the tests start kube-ipvs with.
pub const METRICS: &str = "127.0.0.1:10249";
/// The address of the health server the tests start kube-ipvs with.
pub const HEALTHZ: &str = "127.0.0.1:10256";

impl Daemon {
    /// Starts `kube-ipvs run` with the tests' defaults (this node's pod CIDR, the health and
    /// metrics servers on loopback) and `args`.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_binary(&binary(), name, args, "info")
    }

    /// [`Daemon::start`] with this executable and this `RUST_LOG`.
    pub fn start_binary(
        binary: &std::path::Path,
        name: &str,
        args: &[&str],
        log_filter: &str,
    ) -> Self {
        let log = std::env::temp_dir().join(format!("kube-ipvs-{name}-{}.log", std::process::id()));
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = Command::new(binary)
            .arg("run")
            .args(["--hostname-override", "node-a", "--cluster-cidr", crate::CLUSTER_CIDR])
            .args(["--healthz-bind-address", HEALTHZ, "--metrics-bind-address", METRICS])
            .args(args)
            .env("RUST_LOG", log_filter)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("kube-ipvs starts");
        Self { child, log }
    }

    /// Starts it against a fake API server, through a kubeconfig.
    pub fn with_api(name: &str, kubeconfig: &str, args: &[&str]) -> Self {
        let path = kubeconfig_file(name, kubeconfig);
        let mut all = vec!["--kubeconfig", path.to_str().expect("a UTF-8 path")];
        all.extend_from_slice(args);
        Self::start(name, &all)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("waitable").is_none()
    }

    /// Sends SIGTERM and waits for it to exit.
    pub fn stop(mut self) -> ExitStatus {
        sh("kill", &["-TERM", &self.child.id().to_string()]);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waitable") {
                return status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!(
                    "kube-ipvs did not stop on SIGTERM; the end of its log:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The metrics it exposes.
    pub fn metrics(&self) -> String {
        http_get(METRICS.parse().expect("an address"), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// A metric's value: the sum over the samples whose line starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        metric(&self.metrics(), prefix)
    }

    /// Waits until it has synced once (so every object was programmed).
    pub fn wait_synced(&mut self) {
        self.wait_synced_within(Duration::from_secs(120));
    }

    /// Waits up to `limit` for its first sync.
    pub fn wait_synced_within(&mut self, limit: Duration) {
        eventually(limit, || {
            assert!(self.running(), "kube-ipvs exited:\n{}", self.log());
            (self.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0.0)
                .then_some(())
                .ok_or("not synced yet")
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what the daemon said last.
        if std::thread::panicking() {
            eprintln!(
                "the daemon's log ({}), last lines:\n{}",
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}

/// Writes a kubeconfig to a file of its own and returns its path.
pub fn kubeconfig_file(name: &str, kubeconfig: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("kubeconfig-{name}-{}", std::process::id()));
    std::fs::write(&path, kubeconfig).expect("kubeconfig written");
    path
}

/// The sum of the samples in `text` whose line starts with `prefix`.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The kinds of IPVS messages that change the kernel, as kube-ipvs's
/// `kube_ipvs_netlink_messages_total` labels them.
pub const IPVS_WRITES: [&str; 7] = [
    "AddService",
    "UpdateService",
    "DeleteService",
    "AddDestination",
    "UpdateDestination",
    "DeleteDestination",
    "Flush",
];

/// IPVS messages that changed the kernel, by kind, from kube-ipvs's metrics.
pub fn ipvs_writes_by_kind(metrics: &str) -> Vec<(&'static str, f64)> {
    IPVS_WRITES
        .iter()
        .map(|kind| {
            let prefix = format!("kube_ipvs_netlink_messages_total{{kind=\"{kind}\"}}");
            (*kind, metric(metrics, &prefix))
        })
        .collect()
}

/// IPVS messages that change the kernel, from kube-ipvs's metrics.
pub fn ipvs_writes(metrics: &str) -> f64 {
    ipvs_writes_by_kind(metrics).iter().map(|(_, n)| n).sum()
}

/// `GET path` over HTTP/1.0; the status code and body.
pub fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// Calls `check` every 200 ms until it returns `Ok`, or panics with its last error after
/// `limit`.
pub fn eventually<T, E: std::fmt::Debug>(
    limit: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(err) if started.elapsed() > limit => panic!("not within {limit:?}: {err:?}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Who answers `times` connections to `address`; a failed connection is an error.
pub fn answers(address: SocketAddr, times: usize) -> Vec<Result<String, String>> {
    (0..times)
        .map(|_| tcp_ask(address).map(|a| a.from).map_err(|e| format!("{address}: {e}")))
        .collect()
}

/// The pods that answer `times` connections to `address`; a failed connection is an error.
pub fn answering(address: SocketAddr, times: usize) -> Result<BTreeSet<String>, String> {
    answers(address, times).into_iter().collect()
}

/// Whether exactly the pods `expected` answer `times` connections to `address`.
pub fn answered_by(
    address: SocketAddr,
    times: usize,
    expected: &BTreeSet<String>,
) -> Result<(), String> {
    crate::checks::spread(&address.to_string(), answers(address, times), expected)
}

/// A Service with one TCP port `port` → `8080`, named `http`; `extra` is merged into its spec.
pub fn service(name: &str, cluster_ip: Ipv4Addr, port: u16, extra: Value) -> Value {
    let mut spec = json!({
        "clusterIP": cluster_ip.to_string(), "clusterIPs": [cluster_ip.to_string()],
        "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            spec.insert(key.clone(), value.clone());
        }
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns"}, "spec": spec})
}

/// The EndpointSlice of Service `name` with these pods, ready, on `node-a`.
pub fn slice(name: &str, pods: &[&Pod]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|pod| json!({"addresses": [pod.ip.to_string()], "nodeName": "node-a", "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The addresses bound to kube-ipvs0.
pub fn vips() -> String {
    sh("ip", &["-o", "addr", "show", "dev", "kube-ipvs0"])
}

/// The netfilter table, as `nft` lists it.
pub fn nft_table() -> String {
    sh("nft", &["list", "table", "inet", "kube-ipvs"])
}
