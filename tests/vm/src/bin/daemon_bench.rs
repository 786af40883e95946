//! `cargo xtask bench daemon`: the `kube-ipvs` daemon at scale, fed through the API (the fake
//! API server) and through `--manifests`, against `ipvsadm -R` of the same virtual servers
//! and destinations in the same VM. Each phase runs in a fresh network namespace of its own;
//! the table is printed in Markdown.
//!
//! For N Services × M endpoints it measures: the cold start (daemon start → every virtual
//! server, destination and address programmed), one endpoint change (p50/p99 over 100
//! changes, daemon-side and until the kernel has it; again with the kernel's rate estimator
//! off), an idle periodic resync (IPVS writes and CPU time), and the daemon's peak RSS and CPU
//! time; up to 10,000 Services also a rolling update (1,000 endpoint changes a second for
//! 30 s), beside the same changes written straight to the kernel. The endpoints are spread over `--nodes` nodes (100 unless told), as in a cluster: the
//! node under test hosts every hundredth, which its hairpin set and its local-only virtual
//! servers hold; `--nodes 1` puts them all on it, more pods than any node runs.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use fake_apiserver::FakeApiServer;
use ipvs_netlink::{IpvsHandle, ServiceKey};
use serde_json::{Value, json};
use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
    set_thread_priority_and_policy, thread_native_id,
};
use vm_tests::{
    daemon::{Daemon, ipvs_writes, kubeconfig_file},
    ipvsadm_restore,
};

struct Args {
    /// Run one phase and print what it measured as JSON (in a fresh network namespace).
    phase: Option<String>,
    /// Run only these phases (all unless told).
    phases: Option<Vec<String>>,
    services: usize,
    endpoints: usize,
    /// The nodes the endpoints are spread over: this node hosts every `nodes`-th endpoint.
    nodes: usize,
    binary: PathBuf,
    /// Where to write what was measured, as JSON, for the charts.
    results: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        phase: None,
        phases: None,
        services: 10_000,
        endpoints: 10,
        nodes: 100,
        binary: PathBuf::new(),
        results: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("a value after the flag");
        match flag.as_str() {
            "--services" => args.services = value.parse().expect("a number"),
            "--endpoints" => args.endpoints = value.parse().expect("a number"),
            "--nodes" => args.nodes = value.parse().expect("a number"),
            "--kube-ipvs" => args.binary = value.into(),
            "--phase" => args.phase = Some(value),
            "--phases" => args.phases = Some(value.split(',').map(str::to_owned).collect()),
            "--results" => args.results = Some(value.into()),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(args.binary.exists(), "--kube-ipvs PATH is needed");
    assert!(args.nodes > 0, "--nodes is at least 1");
    args
}

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8 + 1, (i % 250) as u8 + 1)
}

fn endpoint(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244 + (n / 62_500) as u8, (n / 250 % 250) as u8, (n % 250) as u8 + 1)
}

/// The number of the endpoint at `address` (the inverse of [`endpoint`]).
fn endpoint_number(address: Ipv4Addr) -> usize {
    let [_, b, c, d] = address.octets();
    usize::from(b - 244) * 62_500 + usize::from(c) * 250 + usize::from(d) - 1
}

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("s{i}"), "namespace": "bench"},
           "spec": {"clusterIP": cluster_ip(i).to_string(), "clusterIPs": [cluster_ip(i).to_string()],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

/// Endpoint `n`, ready, on one of `nodes` nodes: this node (`node-a`) hosts every
/// `nodes`-th endpoint, as a node of a cluster of that many.
fn endpoint_object(n: usize, nodes: usize) -> Value {
    let node = match n % nodes {
        0 => "node-a".to_owned(),
        other => format!("node-{other}"),
    };
    json!({"addresses": [endpoint(n).to_string()], "nodeName": node, "conditions": {"ready": true}})
}

/// The EndpointSlice of Service `i`, its endpoints numbered from `first`.
fn slice(i: usize, endpoints: usize, first: usize, nodes: usize) -> Value {
    let endpoints: Vec<Value> = (0..endpoints).map(|j| endpoint_object(first + j, nodes)).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("s{i}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

/// Service `i`'s EndpointSlice with its newest endpoint replaced by the one numbered `fresh`.
fn replaced(args: &Args, i: usize, fresh: usize) -> Value {
    let m = args.endpoints;
    let mut changed = slice(i, m - 1, i * m, args.nodes);
    changed["endpoints"].as_array_mut().unwrap().push(endpoint_object(fresh, args.nodes));
    changed
}

/// A fake API server holding the N Services and their EndpointSlices.
async fn populated_api(args: &Args) -> FakeApiServer {
    let api = FakeApiServer::start().await.unwrap();
    for i in 0..args.services {
        api.apply(service(i));
        api.apply(slice(i, args.endpoints, i * args.endpoints, args.nodes));
    }
    api
}

/// From here on the calling thread yields its CPU to everything else (`SCHED_IDLE`): what
/// measures stands for no one on a real node, and must not delay what it measures.
fn yield_to_everything_else() {
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
        .expect("SCHED_IDLE for the measuring thread");
}

fn ipvsadm_rules(args: &Args) -> String {
    let mut rules = String::new();
    for i in 0..args.services {
        let vip = SocketAddr::from((cluster_ip(i), 80));
        rules.push_str(&format!("-A -t {vip} -s rr\n"));
        for j in 0..args.endpoints {
            let n = i * args.endpoints + j;
            rules.push_str(&format!("-a -t {vip} -r {}:8080 -m -w 1\n", endpoint(n)));
        }
    }
    rules
}

/// Virtual servers and destinations in the kernel.
async fn kernel_size(ipvs: &IpvsHandle) -> (usize, usize) {
    let table = ipvs.dump().await.unwrap();
    (table.len(), table.iter().map(|(_, d)| d.len()).sum())
}

/// User and system CPU time of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A process's `/proc/PID/status`.
fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

/// A memory figure of a process from its [`status`] (`VmHWM`: peak resident, `VmRSS`:
/// resident now), in MiB.
fn memory(status: &str, field: &str) -> f64 {
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else if d < Duration::from_secs(10) {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The daemon-side durations of the partial syncs in the log, in order.
fn partial_syncs(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains(" synced") && l.contains("full=false"))
        .filter_map(|l| l.split("reported_us=").nth(1)?.split_whitespace().next()?.parse().ok())
        .map(Duration::from_micros)
        .collect()
}

/// Prints where a cold start's time went: the daemon's start, the lists, and the first sync
/// (computed, then applied: netfilter, addresses, IPVS).
fn print_cold_start(log: &str) {
    let start = log.lines().filter(|l| l.contains("starting kube-ipvs")).take(1);
    let listed = log.lines().filter(|l| l.contains(" listed"));
    let first_sync =
        log.lines().filter(|l| l.contains(" applied") || l.contains(" synced")).take(2);
    for line in start.chain(listed).chain(first_sync) {
        eprintln!("bench: cold start: {line}");
    }
}

/// Prints the log lines around each partial sync slower than 5 ms: where the time went.
fn print_slow_syncs(log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    for (at, line) in lines.iter().enumerate() {
        let slow = partial_syncs(line).first().is_some_and(|d| *d > Duration::from_millis(5));
        if slow {
            for context in &lines[at.saturating_sub(3)..=at] {
                eprintln!("bench: slow change: {context}");
            }
        }
    }
}

/// How long a cold start may take: two minutes, more at 50,000 Services under emulation.
fn cold_start_limit(args: &Args) -> Duration {
    Duration::from_secs((args.services as u64 / 50).max(120))
}

/// Removes what the daemon programmed (`kube-ipvs cleanup`) before the phase ends. Left in
/// place, it would be torn down with the network namespace by a kernel worker, for seconds at
/// 10,000 Services, while the next phase runs.
fn clean_up(args: &Args) {
    let status = Command::new(&args.binary).arg("cleanup").status().unwrap();
    assert!(status.success(), "kube-ipvs cleanup failed");
}

/// The `KubeProxyConfiguration` that `deploy/configmap.yaml` ships, written to a file: the
/// API phases run the daemon with it, as a node of a cluster would.
fn shipped_config() -> PathBuf {
    let configmap: Value =
        serde_norway::from_str(include_str!("../../../../deploy/configmap.yaml")).unwrap();
    let config = configmap["data"]["config.conf"].as_str().expect("config.conf in the ConfigMap");
    let path = std::env::temp_dir().join(format!("bench-config-{}.yaml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    path
}

/// The shipped configuration's `ipvs.minSyncPeriod`.
fn shipped_min_sync_period() -> String {
    let configmap: Value =
        serde_norway::from_str(include_str!("../../../../deploy/configmap.yaml")).unwrap();
    let config: Value =
        serde_norway::from_str(configmap["data"]["config.conf"].as_str().unwrap()).unwrap();
    config["ipvs"]["minSyncPeriod"].as_str().unwrap_or("0s").to_owned()
}

/// Watches EndpointSlices on the API server as a client of its own, and notes when each
/// address first appears in an event: the API server's own write → watch-event delivery,
/// the floor under any proxy's latency.
struct Delivery {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
}

impl Delivery {
    async fn watch(api: SocketAddr, from_version: u64) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let mut stream = tokio::net::TcpStream::connect(api).await.unwrap();
        let request = format!(
            "GET /apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion={from_version}&allowWatchBookmarks=false HTTP/1.1\r\nHost: {api}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let noted = seen.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; 1 << 16];
            let mut carry = String::new();
            loop {
                let read = match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => read,
                };
                let now = Instant::now();
                carry.push_str(&String::from_utf8_lossy(&buffer[..read]));
                // Every address in the events read; the last few bytes are kept, in case
                // one is cut between two reads.
                let mut noted = noted.lock().unwrap();
                for part in carry.split("\"addresses\":[\"").skip(1) {
                    if let Some((address, _)) = part.split_once('"') {
                        noted.entry(address.to_owned()).or_insert(now);
                    }
                }
                let keep = carry.len().saturating_sub(64);
                let keep = (keep..carry.len()).find(|i| carry.is_char_boundary(*i)).unwrap_or(0);
                carry.drain(..keep);
            }
        });
        Self { seen }
    }

    /// When `address` first arrived in a watch event.
    fn arrived(&self, address: &str) -> Option<Instant> {
        self.seen.lock().unwrap().get(address).copied()
    }
}

/// Changes made before the 100 that are measured.
const WARM_UP: usize = 5;

const LOG: &str = "info,kube_ipvs::proxier=debug,controller::node=debug";

/// What one phase measured, passed from its process to the one that prints the table.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Measured {
    /// Seconds, by name.
    seconds: std::collections::BTreeMap<String, f64>,
    /// Sorted samples in seconds, by name.
    samples: std::collections::BTreeMap<String, Vec<f64>>,
    /// Other figures, by name.
    figures: std::collections::BTreeMap<String, f64>,
}

impl Measured {
    fn time(&mut self, name: &str, d: Duration) {
        self.seconds.insert(name.into(), d.as_secs_f64());
    }

    fn get(&self, name: &str) -> Duration {
        Duration::from_secs_f64(self.seconds[name])
    }

    fn sorted(&self, name: &str) -> Vec<Duration> {
        self.samples[name].iter().copied().map(Duration::from_secs_f64).collect()
    }
}

/// Runs each phase in a fresh network namespace (IPVS keeps deleted destinations in a trash
/// list for minutes, which slows every later addition to the same namespace), then prints
/// the table.
fn main() {
    let args = parse_args();
    if let Some(phase) = &args.phase {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let measured = match phase.as_str() {
            "api" => runtime.block_on(api_phase(&args, Variant::Shipped)),
            "api-no-estimation" => runtime.block_on(api_phase(&args, Variant::NoEstimation)),
            "api-min-sync-1s" => runtime.block_on(api_phase(&args, Variant::MinSyncPeriod1s)),
            "manifests" => runtime.block_on(manifests_phase(&args)),
            "churn" => runtime.block_on(churn_phase(&args)),
            "churn-kernel" => runtime.block_on(churn_kernel_phase(&args)),
            "delivery" => runtime.block_on(delivery_phase(&args)),
            "baseline" => runtime.block_on(baseline_phase(&args)),
            other => panic!("unknown phase {other}"),
        };
        println!("{}", serde_json::to_string(&measured).unwrap());
        return;
    }
    let (n, m, nodes) = (args.services, args.endpoints, args.nodes);
    let local = (n * m).div_ceil(nodes);
    eprintln!("bench: {n} Services x {m} endpoints on {nodes} nodes, {local} on this one");
    let me = std::env::current_exe().unwrap();
    let phase = |name: &str| -> Measured {
        let command = format!(
            "ip link set lo up && exec {} --phase {name} --services {n} --endpoints {m} --nodes {nodes} --kube-ipvs {}",
            me.display(),
            args.binary.display()
        );
        let out = Command::new("unshare")
            .args(["-n", "sh", "-c", &command])
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "phase {name} failed");
        let text = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    // The variants and the rolling update are measured up to the size the targets are set at;
    // beyond it, what scales: cold start, one change, idle full checks, memory.
    let variants = n <= VARIANTS_UP_TO;
    let wanted = |name: &str| args.phases.as_ref().is_none_or(|p| p.iter().any(|w| w == name));
    let run = |name: &str| wanted(name).then(|| phase(name));
    let variant = |name: &str| if variants { run(name) } else { None };
    let phases = Phases {
        api: run("api"),
        no_estimation: variant("api-no-estimation"),
        min_sync_1s: variant("api-min-sync-1s"),
        manifests: run("manifests"),
        churn: variant("churn"),
        churn_kernel: variant("churn-kernel"),
        delivery: run("delivery"),
    };
    let baseline = run("baseline").map(|b| b.get("baseline"));
    if let Some(baseline) = baseline {
        print_table(n, m, &phases, baseline);
    }
    if let Some(churn) = &phases.churn {
        print_churn(churn, phases.churn_kernel.as_ref());
    }
    if let Some(path) = &args.results {
        let mut results = serde_json::to_value(&phases).unwrap();
        results["services"] = n.into();
        results["endpoints"] = m.into();
        results["nodes"] = nodes.into();
        results["baseline"] = baseline.map(|b| b.as_secs_f64()).into();
        std::fs::write(path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    }
}

/// How an API phase runs the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// With the configuration `deploy/` ships (its sync period set to 5 s, to measure the
    /// full checks while idle).
    Shipped,
    /// The same with IPVS's rate estimator off; only the cold start and the changes.
    NoEstimation,
    /// The same with a minimum sync period of 1 s (what `deploy/` shipped before it was
    /// measured); only the cold start and the changes.
    MinSyncPeriod1s,
}

/// Through the API, with the shipped configuration (see [`Variant`]).
async fn api_phase(args: &Args, variant: Variant) -> Measured {
    let (n, m) = (args.services, args.endpoints);
    let ipvs = IpvsHandle::new().unwrap();
    let mut measured = Measured::default();
    // Through the API.
    let api = populated_api(args).await;
    let kubeconfig = kubeconfig_file("bench", &api.kubeconfig());
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();
    let started = Instant::now();
    let config = shipped_config();
    let config = config.to_str().unwrap().to_owned();
    let mut daemon_args =
        vec!["--config", &config, "--kubeconfig", &kubeconfig, "--ipvs-sync-period", "5s"];
    match variant {
        Variant::Shipped => {}
        Variant::NoEstimation => daemon_args.push("--ipvs-rate-estimation=false"),
        Variant::MinSyncPeriod1s => daemon_args.extend(["--ipvs-min-sync-period", "1s"]),
    }
    let mut daemon = Daemon::start_binary(&args.binary, "bench-api", &daemon_args, LOG);
    daemon.wait_synced_within(cold_start_limit(args));
    let cold_api = started.elapsed();
    print_cold_start(&daemon.log());
    assert_eq!(kernel_size(&ipvs).await, (n, n * m), "every virtual server and destination");
    eprintln!("bench: cold start through the API: {cold_api:?}");

    // One endpoint change at a time: the last endpoint of Service i gets a new address. The
    // first few warm the daemon up (first use of its sockets and code paths) and are reported
    // apart.
    // The poll below stands for no one on a real node: from here on this thread yields the CPU
    // to everything else (the daemon, and the fake API server, which is not on the node
    // either), so that it does not delay the changes it measures.
    yield_to_everything_else();
    let mut end_to_end = Vec::new();
    for change in 0..WARM_UP + 100 {
        let (i, fresh) = (change * 7919 % n, n * m + change);
        let changed = replaced(args, i, fresh);
        let key = ServiceKey::tcp(SocketAddr::from((cluster_ip(i), 80)));
        let wanted = SocketAddr::from((endpoint(fresh), 8080));
        let applied = Instant::now();
        api.apply(changed);
        loop {
            let destinations = ipvs.list_destinations(&key).await.unwrap();
            if destinations.iter().any(|d| d.destination.address == wanted) {
                break;
            }
            assert!(applied.elapsed() < Duration::from_secs(60), "change {change} never arrived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        end_to_end.push(applied.elapsed());
    }
    let first_change = end_to_end[0];
    let mut end_to_end = end_to_end.split_off(WARM_UP);
    end_to_end.sort();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = daemon.log();
    for line in
        log.lines().filter(|l| l.contains(" applied") || l.contains(" synced")).skip(2).take(6)
    {
        eprintln!("bench: {line}");
    }
    print_slow_syncs(&log);
    let mut daemon_side = partial_syncs(&log);
    let first_sync = daemon_side.first().copied().unwrap_or_default();
    let mut daemon_side = daemon_side.split_off(WARM_UP.min(daemon_side.len()));
    daemon_side.sort();
    assert!(daemon_side.len() >= 50, "partial syncs logged: {}", daemon_side.len());
    let secs = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).collect();
    measured.samples.insert("daemon_side".into(), secs(&daemon_side));
    measured.samples.insert("end_to_end".into(), secs(&end_to_end));
    measured.time("cold", cold_api);
    if variant != Variant::Shipped {
        assert!(daemon.stop().success());
        clean_up(args);
        return measured;
    }

    // Idle: full checks 5 s apart, nothing to write (once the replaced endpoints drained).
    vm_tests::daemon::eventually(Duration::from_secs(60), || {
        let draining = daemon.metric("kube_ipvs_draining_destinations");
        (draining == 0.0).then_some(()).ok_or(draining)
    });
    // From the end of one full check to the end of the third after it: three whole cycles of
    // check and 5 s pause. Nothing else runs, so the CPU time is the checks'.
    let checks = "kube_ipvs_full_checks_total";
    let ended = |daemon: &Daemon, count: f64| {
        vm_tests::daemon::eventually(Duration::from_secs(900), || {
            let done = daemon.metric(checks);
            (done >= count).then_some(()).ok_or(done)
        })
    };
    let first = daemon.metric(checks) + 1.0;
    ended(&daemon, first);
    let (writes, cpu) = (ipvs_writes(&daemon.metrics()), cpu_time(daemon.pid()));
    let idle_started = Instant::now();
    ended(&daemon, first + IDLE_CHECKS as f64);
    let idle_for = idle_started.elapsed();
    let idle_writes = ipvs_writes(&daemon.metrics()) - writes;
    let idle_cpu = cpu_time(daemon.pid()) - cpu;
    let status = status(daemon.pid());
    let parts = status.lines().filter(|l| l.starts_with("Rss") || l.starts_with("VmHWM"));
    eprintln!("bench: memory when idle: {}", parts.collect::<Vec<_>>().join(", "));
    measured.figures.insert("rss".into(), memory(&status, "VmHWM:"));
    measured.figures.insert("idle_rss".into(), memory(&status, "VmRSS:"));
    measured.time("total_cpu", cpu_time(daemon.pid()));
    assert!(daemon.stop().success());
    clean_up(args);
    measured.time("first_sync", first_sync);
    measured.time("first_change", first_change);
    measured.time("idle_cpu", idle_cpu);
    measured.figures.insert("idle_writes".into(), idle_writes as f64);
    measured.time("idle_for", idle_for);
    measured
}

async fn manifests_phase(args: &Args) -> Measured {
    let (n, m) = (args.services, args.endpoints);
    let ipvs = IpvsHandle::new().unwrap();
    let mut measured = Measured::default();

    // Through --manifests.
    let dir = std::env::temp_dir().join(format!("bench-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let objects: Vec<Value> =
        (0..n).flat_map(|i| [service(i), slice(i, m, i * m, args.nodes)]).collect();
    std::fs::write(
        dir.join("all.json"),
        json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string(),
    )
    .unwrap();
    let dir_arg = dir.to_str().unwrap().to_owned();
    let started = Instant::now();
    let mut from_files =
        Daemon::start_binary(&args.binary, "bench-manifests", &["--manifests", &dir_arg], LOG);
    from_files.wait_synced_within(cold_start_limit(args));
    let cold_manifests = started.elapsed();
    assert_eq!(kernel_size(&ipvs).await, (n, n * m));
    measured.figures.insert("rss".into(), memory(&status(from_files.pid()), "VmHWM:"));
    assert!(from_files.stop().success());
    clean_up(args);
    measured.time("cold", cold_manifests);
    measured
}

/// The baseline of one change's latency: the fake API server alone, with the same objects and
/// the same 5 + 100 changes as the API phase, and no daemon; a watch of the benchmark's own
/// notes when each new address arrives in an event.
async fn delivery_phase(args: &Args) -> Measured {
    let (n, m) = (args.services, args.endpoints);
    let mut measured = Measured::default();
    let api = populated_api(args).await;
    let delivery = Delivery::watch(api.address(), api.version()).await;
    yield_to_everything_else();
    let mut delivered = Vec::new();
    for change in 0..WARM_UP + 100 {
        let (i, fresh) = (change * 7919 % n, n * m + change);
        let changed = replaced(args, i, fresh);
        let address = endpoint(fresh).to_string();
        let applied = Instant::now();
        api.apply(changed);
        let arrived = loop {
            if let Some(arrived) = delivery.arrived(&address) {
                break arrived;
            }
            assert!(applied.elapsed() < Duration::from_secs(60), "change {change} never watched");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        delivered.push(arrived.saturating_duration_since(applied));
    }
    let mut delivered = delivered.split_off(WARM_UP);
    delivered.sort();
    measured
        .samples
        .insert("delivery".into(), delivered.iter().map(Duration::as_secs_f64).collect());
    measured
}

/// Endpoint changes per second in the churn phase, and for how long.
const CHURN_RATE: usize = 1_000;
const CHURN_SECONDS: usize = 30;
/// One change in this many is followed to the kernel, for the latency during the churn.
const CHURN_SAMPLE: usize = 20;

/// A rolling update across the cluster, with the shipped configuration: 1,000 endpoint
/// changes a second for 30 s, each replacing one endpoint of a Service with a new pod. Measures
/// whether the kernel keeps up (how long after the last write it holds every change), the
/// latency of one change in 20 while it goes on (write to kernel), and the daemon's CPU.
async fn churn_phase(args: &Args) -> Measured {
    let (n, m) = (args.services, args.endpoints);
    for number in [0, 249, 250, 62_499, 62_500, n * m + 1_000 + CHURN_RATE * CHURN_SECONDS] {
        assert_eq!(endpoint_number(endpoint(number)), number, "endpoint numbers round-trip");
    }
    let ipvs = IpvsHandle::new().unwrap();
    let mut measured = Measured::default();
    let api = populated_api(args).await;
    let kubeconfig = kubeconfig_file("churn", &api.kubeconfig());
    let config = shipped_config();
    let daemon_args =
        ["--config", config.to_str().unwrap(), "--kubeconfig", kubeconfig.to_str().unwrap()];
    let mut daemon = Daemon::start_binary(&args.binary, "bench-churn", &daemon_args, LOG);
    daemon.wait_synced_within(cold_start_limit(args));
    print_cold_start(&daemon.log());
    assert_eq!(kernel_size(&ipvs).await, (n, n * m));

    // The samples are followed on a thread of their own, at the lowest priority. A change is
    // done when the kernel holds it or a later change of the same Service (endpoints are
    // numbered in the order they are written): one replaced before a sync took it is
    // coalesced, as it should be, and done when its successor is.
    let (sample_tx, sample_rx) = std::sync::mpsc::channel::<(ServiceKey, usize, Instant)>();
    let follower = std::thread::spawn(move || {
        yield_to_everything_else();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ipvs = runtime.block_on(async { IpvsHandle::new() }).unwrap();
        let mut pending: Vec<(ServiceKey, usize, Instant)> = Vec::new();
        let mut latencies = Vec::new();
        let mut lost = 0;
        let mut open = true;
        while open || !pending.is_empty() {
            loop {
                match sample_rx.try_recv() {
                    Ok(sample) => pending.push(sample),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let now = Instant::now();
            pending.retain(|(key, wanted, written)| {
                let destinations = runtime.block_on(ipvs.list_destinations(key)).unwrap();
                let done = destinations.iter().any(|d| match d.destination.address {
                    SocketAddr::V4(address) => {
                        d.destination.weight > 0 && endpoint_number(*address.ip()) >= *wanted
                    }
                    SocketAddr::V6(_) => false,
                });
                if done {
                    latencies.push(now.saturating_duration_since(*written));
                }
                // Not done in 60 s: counted as lost, not left out.
                let given_up = !done && written.elapsed() >= Duration::from_secs(60);
                lost += usize::from(given_up);
                !done && !given_up
            });
            std::thread::sleep(Duration::from_millis(2));
        }
        (latencies, lost)
    });

    let cpu_before = cpu_time(daemon.pid());
    let changes_before = daemon.metric("kubeproxy_sync_proxy_rules_endpoint_changes_total");
    let started = Instant::now();
    let mut written = 0;
    // The newest endpoint of each Service changed, numbered past every other.
    let mut last: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let tick = Duration::from_millis(10);
    let per_tick = CHURN_RATE / 100;
    while written < CHURN_RATE * CHURN_SECONDS {
        let due = started + tick * (written / per_tick) as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        for _ in 0..per_tick {
            let (i, fresh) = churn_change(written, n, m);
            let changed = replaced(args, i, fresh);
            api.apply(changed);
            last.insert(i, fresh);
            if written % CHURN_SAMPLE == 0 {
                let key = ServiceKey::tcp(SocketAddr::from((cluster_ip(i), 80)));
                sample_tx.send((key, fresh, Instant::now())).unwrap();
            }
            written += 1;
        }
    }
    let burst = started.elapsed();
    drop(sample_tx);
    // Settled once the daemon has taken every event in and a sync has applied them all. A
    // sync applies its changes in key order, not in the order they were written, so the last
    // change written reaching the kernel says nothing of the others. The daemon handles events
    // and syncs in one loop: once it counted every change, the pending gauge falls to zero only
    // when the sync that took them has applied them.
    let burst_end = std::time::SystemTime::now();
    let changes = "kubeproxy_sync_proxy_rules_endpoint_changes_total";
    let pending = "kubeproxy_sync_proxy_rules_endpoint_changes_pending";
    vm_tests::daemon::eventually(Duration::from_secs(600), || {
        let seen = daemon.metric(changes) - changes_before;
        (seen >= written as f64).then_some(()).ok_or(seen)
    });
    vm_tests::daemon::eventually(Duration::from_secs(600), || {
        let left = daemon.metric(pending);
        (left == 0.0).then_some(()).ok_or(left)
    });
    let last_sync = daemon.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let burst_end = burst_end.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let lag = Duration::from_secs_f64((last_sync - burst_end).max(0.0));
    // Checked, not timed: the last change of every Service is there.
    let table = ipvs.dump().await.unwrap();
    let mut missing = Vec::new();
    for (i, fresh) in &last {
        let key = ServiceKey::tcp(SocketAddr::from((cluster_ip(*i), 80)));
        let wanted = SocketAddr::from((endpoint(*fresh), 8080));
        let (_, destinations) = table.iter().find(|(s, _)| s.service.key == key).unwrap();
        if !destinations.iter().any(|d| d.destination.address == wanted && d.destination.weight > 0)
        {
            let held: Vec<String> = (destinations.iter())
                .map(|d| format!("{} w{}", d.destination.address, d.destination.weight))
                .collect();
            missing.push(format!("Service {i}: {wanted} missing; the kernel has {held:?}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} last changes missing: {:#?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let cpu = cpu_time(daemon.pid()) - cpu_before;
    let (mut latencies, lost) = follower.join().unwrap();
    latencies.sort();
    assert!(daemon.stop().success());
    clean_up(args);
    measured.time("burst", burst);
    measured.time("lag", lag);
    measured.time("cpu", cpu);
    measured.figures.insert("changes".into(), written as f64);
    measured.figures.insert("lost".into(), lost as f64);
    measured
        .samples
        .insert("latency".into(), latencies.iter().map(Duration::as_secs_f64).collect());
    measured
}

/// The rolling update's `written`-th change: Service `i` gets the endpoint numbered `fresh`
/// in place of its newest one.
fn churn_change(written: usize, n: usize, m: usize) -> (usize, usize) {
    ((written * 7919) % n, n * m + 1_000 + written)
}

/// The rolling update's baseline: the kernel alone. The same changes on the same schedule,
/// each written straight to IPVS as the least it takes (add the new destination, delete the
/// one it replaces) by this process: no API server, no daemon, no graceful drain.
async fn churn_kernel_phase(args: &Args) -> Measured {
    use ipvs_netlink::{Change, Destination, VirtualService};
    let (n, m) = (args.services, args.endpoints);
    let ipvs = IpvsHandle::new().unwrap();
    let key = |i: usize| ServiceKey::tcp(SocketAddr::from((cluster_ip(i), 80)));
    let address = |e: usize| SocketAddr::from((endpoint(e), 8080));
    let mut table = Vec::with_capacity(n * (m + 1));
    for i in 0..n {
        table.push(Change::AddService(VirtualService::new(key(i), "rr")));
        let destinations = (i * m..(i + 1) * m).map(|e| Destination::new(address(e)));
        table.extend(destinations.map(|d| Change::AddDestination(key(i), d)));
    }
    for chunk in table.chunks(4096) {
        ipvs.apply(chunk).await.into_iter().collect::<Result<(), _>>().unwrap();
    }
    assert_eq!(kernel_size(&ipvs).await, (n, n * m));

    let mut newest: std::collections::HashMap<usize, usize> =
        (0..n).map(|i| (i, i * m + m - 1)).collect();
    let cpu_before = cpu_time(std::process::id());
    let started = Instant::now();
    let tick = Duration::from_millis(10);
    let per_tick = CHURN_RATE / 100;
    let mut written = 0;
    while written < CHURN_RATE * CHURN_SECONDS {
        let due = started + tick * (written / per_tick) as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let mut changes = Vec::with_capacity(2 * per_tick);
        for _ in 0..per_tick {
            let (i, fresh) = churn_change(written, n, m);
            let replaced = newest.insert(i, fresh).unwrap();
            changes.push(Change::AddDestination(key(i), Destination::new(address(fresh))));
            changes.push(Change::DeleteDestination(key(i), address(replaced)));
            written += 1;
        }
        ipvs.apply(&changes).await.into_iter().collect::<Result<(), _>>().unwrap();
    }
    let took = started.elapsed();
    let cpu = cpu_time(std::process::id()) - cpu_before;
    // Checked, not timed.
    assert_eq!(kernel_size(&ipvs).await, (n, n * m));
    let mut measured = Measured::default();
    measured.time("took", took);
    measured.time("cpu", cpu);
    measured.figures.insert("changes".into(), written as f64);
    measured
}

/// The churn phase's table, beside the kernel alone when it ran.
fn print_churn(churn: &Measured, kernel: Option<&Measured>) {
    let latency = churn.sorted("latency");
    let burst = churn.get("burst");
    let changes = churn.figures["changes"];
    println!(
        "\n#### A rolling update: {CHURN_RATE} endpoint changes a second for {CHURN_SECONDS} s\n"
    );
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| changes written / achieved rate | {changes:.0} / {:.0} a second |",
        changes / burst.as_secs_f64()
    );
    println!(
        "| lag: the last write to the kernel holding every change | {} |",
        ms(churn.get("lag"))
    );
    if !latency.is_empty() {
        println!(
            "| one change in {CHURN_SAMPLE}, API write to kernel (or a later change of its Service), p50 / p99 ({} done, {} not within 60 s) | {} / {} |",
            latency.len(),
            churn.figures["lost"],
            ms(percentile(&latency, 0.5)),
            ms(percentile(&latency, 0.99))
        );
    }
    println!(
        "| daemon CPU, burst and lag | {} ({:.0}% of one CPU) |",
        ms(churn.get("cpu")),
        100.0 * churn.get("cpu").as_secs_f64() / (burst + churn.get("lag")).as_secs_f64()
    );
    println!(
        "| from the first write to the kernel holding every change | {} |",
        ms(burst + churn.get("lag"))
    );
    if let Some(kernel) = kernel {
        let took = kernel.get("took");
        println!(
            "| baseline: the kernel alone, the same {:.0} changes written straight to IPVS on the same schedule (add the new, delete the replaced): until done, achieved rate, CPU | {} , {:.0} a second, {} |",
            kernel.figures["changes"],
            ms(took),
            kernel.figures["changes"] / took.as_secs_f64(),
            ms(kernel.get("cpu"))
        );
    }
}

async fn baseline_phase(args: &Args) -> Measured {
    let (n, m) = (args.services, args.endpoints);
    let mut measured = Measured::default();

    // The baseline: ipvsadm -R of the same virtual servers and destinations.
    let rules = ipvsadm_rules(args);
    let baseline = ipvsadm_restore(&rules);
    let ipvs = IpvsHandle::new().unwrap();
    assert_eq!(kernel_size(&ipvs).await, (n, n * m));
    measured.time("baseline", baseline);
    measured
}

/// The full checks the idle period lasts.
const IDLE_CHECKS: u32 = 3;

/// The largest size at which the API variants and the rolling update run.
const VARIANTS_UP_TO: usize = 10_000;

/// What every phase but the baseline measured (the variants and the rolling update up to
/// [`VARIANTS_UP_TO`] Services).
#[derive(Debug, serde::Serialize)]
struct Phases {
    api: Option<Measured>,
    no_estimation: Option<Measured>,
    min_sync_1s: Option<Measured>,
    manifests: Option<Measured>,
    churn: Option<Measured>,
    churn_kernel: Option<Measured>,
    delivery: Option<Measured>,
}

/// The table of the API, manifests and delivery phases; nothing unless all three ran.
fn print_table(n: usize, m: usize, phases: &Phases, baseline: Duration) {
    let Phases { no_estimation, min_sync_1s, .. } = phases;
    let (Some(api), Some(manifests), Some(delivery)) =
        (&phases.api, &phases.manifests, &phases.delivery)
    else {
        return;
    };
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let (cold_api, cold_manifests) = (api.get("cold"), manifests.get("cold"));
    let (daemon_side, end_to_end) = (api.sorted("daemon_side"), api.sorted("end_to_end"));
    let (first_sync, first_change) = (api.get("first_sync"), api.get("first_change"));
    let idle_writes = api.figures["idle_writes"];
    let (idle_cpu, total_cpu) = (api.get("idle_cpu"), api.get("total_cpu"));
    let idle_for = api.get("idle_for");
    let (rss, rss_manifests) = (api.figures["rss"], manifests.figures["rss"]);

    let ratio = |a: Duration, b: Duration| format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64());
    rows.push((
        "cold start through the API (to every VS, destination, address, set element)".into(),
        ms(cold_api),
        ratio(cold_api, baseline),
    ));
    rows.push((
        "cold start through --manifests".into(),
        ms(cold_manifests),
        ratio(cold_manifests, baseline),
    ));
    rows.push((
        "baseline: ipvsadm -R of the same VS and destinations".into(),
        ms(baseline),
        "1.00x".into(),
    ));
    rows.push((
        "one endpoint change, daemon-side, p50 / p99 (100 changes)".into(),
        format!("{} / {}", ms(percentile(&daemon_side, 0.5)), ms(percentile(&daemon_side, 0.99))),
        String::new(),
    ));
    if let Some(no_estimation) = no_estimation {
        let quiet = no_estimation.sorted("daemon_side");
        rows.push((
            "the same with --ipvs-rate-estimation=false (the kernel's rate estimator off)".into(),
            format!("{} / {}", ms(percentile(&quiet, 0.5)), ms(percentile(&quiet, 0.99))),
            String::new(),
        ));
    }
    rows.push((
        "the first change after start, daemon-side / API write to kernel (not in the above)".into(),
        format!("{} / {}", ms(first_sync), ms(first_change)),
        String::new(),
    ));
    let p50_p99 =
        |v: &[Duration]| format!("{} / {}", ms(percentile(v, 0.5)), ms(percentile(v, 0.99)));
    let delivery = delivery.sorted("delivery");
    rows.push((
        format!(
            "one endpoint change, API write to kernel, p50 / p99 (the shipped configuration: minSyncPeriod {})",
            shipped_min_sync_period()
        ),
        p50_p99(&end_to_end),
        String::new(),
    ));
    if let Some(min_sync_1s) = min_sync_1s {
        rows.push((
            "the same with minSyncPeriod 1s".into(),
            p50_p99(&min_sync_1s.sorted("end_to_end")),
            String::new(),
        ));
    }
    rows.push((
        "baseline: the fake API server alone (no daemon), write to watch event, p50 / p99".into(),
        p50_p99(&delivery),
        String::new(),
    ));
    rows.push((
        format!("idle, {IDLE_CHECKS} full checks 5 s apart ({}): IPVS writes", ms(idle_for)),
        format!("{idle_writes}"),
        String::new(),
    ));
    rows.push((
        "one full check (idle): duration with the 5 s pause / CPU time".into(),
        format!("{} / {}", ms(idle_for / IDLE_CHECKS), ms(idle_cpu / IDLE_CHECKS)),
        String::new(),
    ));
    rows.push(("daemon CPU time, whole API run".into(), ms(total_cpu), String::new()));
    rows.push((
        "peak RSS through the API / --manifests".into(),
        format!("{rss:.0} MiB / {rss_manifests:.0} MiB"),
        String::new(),
    ));
    rows.push((
        "RSS through the API, after the idle period".into(),
        format!("{:.0} MiB", api.figures["idle_rss"]),
        String::new(),
    ));

    println!("\n### {n} Services x {m} endpoints\n");
    println!("| measurement | result | vs baseline |");
    println!("|---|---|---|");
    for (what, result, ratio) in rows {
        println!("| {what} | {result} | {ratio} |");
    }

    // The targets, printed (never asserted): at 10,000 Services, and the memory one scaled.
    let memory_target = if n > 10_000 { 200.0 } else { 48.0 };
    let cold_ratio = cold_api.as_secs_f64() / baseline.as_secs_f64();
    let daemon_p99 = percentile(&daemon_side, 0.99);
    let (e2e_p99, delivery_p99) = (percentile(&end_to_end, 0.99), percentile(&delivery, 0.99));
    let targets = [
        (
            "cold start through the API <= 0.5x ipvsadm -R".to_owned(),
            cold_ratio <= 0.5,
            format!("{cold_ratio:.2}x"),
        ),
        (
            "one endpoint change, daemon-side, p99 <= 2 ms".to_owned(),
            daemon_p99 <= Duration::from_millis(2),
            ms(daemon_p99),
        ),
        (
            "API write to kernel, p99 <= the API server's delivery p99 + 5 ms".to_owned(),
            e2e_p99 <= delivery_p99 + Duration::from_millis(5),
            format!("{} against {} + 5 ms", ms(e2e_p99), ms(delivery_p99)),
        ),
        (
            format!("peak RSS <= {memory_target:.0} MiB"),
            rss <= memory_target,
            format!("{rss:.0} MiB"),
        ),
    ];
    println!("\n| target | met | measured |");
    println!("|---|---|---|");
    for (target, met, measured) in targets {
        println!("| {target} | {} | {measured} |", if met { "yes" } else { "no" });
    }
}
