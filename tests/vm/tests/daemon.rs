//! End to end: the real `kube-ipvs run` process on the node, fed by a fake API server over
//! HTTP (or a manifests directory), with pods in network namespaces and real connections.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use fake_apiserver::{FakeApiServer, Resource};
use serde_json::json;
use vm_tests::{
    NODE_IP, Topology,
    daemon::{
        Daemon, answered_by, answering, eventually, ipvs_writes, nft_table, service, slice, vips,
    },
    ipvsadm, sh, tcp_ask,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LATE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const MINUTE: Duration = Duration::from_secs(60);

fn node(pods: u8) -> Topology {
    sh("modprobe", &["br_netfilter"]);
    let topology = Topology::new(pods);
    sh("sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    topology
}

fn names(topology: &Topology, indexes: &[usize]) -> std::collections::BTreeSet<String> {
    indexes.iter().map(|i| topology.pods[*i].name.clone()).collect()
}

/// A client opening connections to `address` one after another until stopped; counts
/// successes and failures.
struct Client {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: thread::JoinHandle<Vec<String>>,
}

impl Client {
    fn start(address: SocketAddr) -> Self {
        let (stop, ok, failed): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
            Default::default();
        let (s, o, f) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let thread = thread::spawn(move || {
            let mut errors = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match tcp_ask(address) {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(err) => {
                        errors.push(err.to_string());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                thread::sleep(Duration::from_millis(20));
            }
            errors
        });
        Self { stop, ok, failed, thread }
    }

    /// Stops it; returns (successes, failures).
    fn finish(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.thread.join().expect("the client thread");
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), errors)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_followed_from_creation_to_deletion() {
    let topology = node(4);
    let pods: Vec<_> = topology.pods.iter().collect();
    let api = FakeApiServer::start().await.unwrap();
    let mut daemon = Daemon::with_api("follow", &api.kubeconfig(), &[]);
    api.apply(service("web", WEB, 80, json!({})));
    api.apply(slice("web", &pods[..3]));
    let vip = SocketAddr::from((WEB, 80));
    eventually(MINUTE, || answered_by(vip, 12, &names(&topology, &[0, 1, 2])));
    daemon.wait_synced();

    // Scaled up: the new pod gets connections.
    api.apply(slice("web", &pods));
    eventually(MINUTE, || answered_by(vip, 16, &names(&topology, &[0, 1, 2, 3])));
    // Scaled down: new connections go to the remaining pod only.
    api.apply(slice("web", &pods[1..2]));
    eventually(MINUTE, || answered_by(vip, 8, &names(&topology, &[1])));

    // Deleted: the address, the virtual server and the set elements go.
    assert!(vips().contains(&WEB.to_string()));
    assert!(nft_table().contains(&WEB.to_string()));
    api.delete(Resource::Services, "ns", "web");
    api.delete(Resource::EndpointSlices, "ns", "web-1");
    eventually(MINUTE, || {
        let gone = !vips().contains(&WEB.to_string())
            && !ipvsadm(&["-Sn"]).contains(&WEB.to_string())
            && !nft_table().contains(&WEB.to_string());
        gone.then_some(()).ok_or("still there")
    });
    assert!(tcp_ask(vip).is_err(), "nothing answers on a deleted Service");
    assert!(daemon.running(), "{}", daemon.log());
    assert!(daemon.stop().success(), "a clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_drops_no_connection_and_writes_nothing() {
    let topology = node(3);
    let pods: Vec<_> = topology.pods.iter().collect();
    let api = FakeApiServer::start().await.unwrap();
    let mut first = Daemon::with_api("restart-1", &api.kubeconfig(), &[]);
    api.apply(service("web", WEB, 80, json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}]})));
    api.apply(slice("web", &pods));
    let vip = SocketAddr::from((WEB, 80));
    eventually(MINUTE, || answered_by(vip, 9, &topology.pod_names()));
    first.wait_synced();
    let table = ipvsadm(&["-Sn"]);
    let addresses = vips();

    let client = Client::start(vip);
    let node_port = Client::start(SocketAddr::from((NODE_IP, 30080)));
    thread::sleep(Duration::from_secs(1));
    assert!(first.stop().success());
    assert_eq!(ipvsadm(&["-Sn"]), table, "SIGTERM leaves the kernel state in place");
    thread::sleep(Duration::from_secs(2));
    let mut second = Daemon::with_api("restart-2", &api.kubeconfig(), &[]);
    second.wait_synced();
    thread::sleep(Duration::from_secs(1));
    let (ok, failed, errors) = client.finish();
    let (ok_np, failed_np, errors_np) = node_port.finish();
    assert_eq!((failed, failed_np), (0, 0), "{errors:?} {errors_np:?}");
    assert!(ok > 10 && ok_np > 10, "{ok} and {ok_np} connections");

    let metrics = second.metrics();
    assert_eq!(ipvs_writes(&metrics), 0.0, "the second start writes no IPVS message:\n{metrics}");
    assert_eq!(ipvsadm(&["-Sn"]), table);
    assert_eq!(vips(), addresses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_keeps_traffic_and_changes_land_after_it() {
    let topology = node(4);
    let pods: Vec<_> = topology.pods.iter().collect();
    let api = FakeApiServer::start().await.unwrap();
    let mut daemon = Daemon::with_api("outage", &api.kubeconfig(), &["--ipvs-sync-period", "5s"]);
    api.apply(service("web", WEB, 80, json!({})));
    api.apply(slice("web", &pods[..3]));
    let vip = SocketAddr::from((WEB, 80));
    eventually(MINUTE, || answered_by(vip, 12, &names(&topology, &[0, 1, 2])));
    daemon.wait_synced();
    let table = ipvsadm(&["-Sn"]);

    let client = Client::start(vip);
    api.stop().await;
    // Changes while kube-ipvs cannot see them, and a compacted history: its watches get
    // 410 Gone when they come back, and it must list again.
    api.apply(slice("web", &[pods[0], pods[1], pods[3]]));
    api.apply(service("late", LATE, 80, json!({})));
    api.apply(slice("late", &pods[2..3]));
    api.compact();
    thread::sleep(Duration::from_secs(30));
    assert_eq!(ipvsadm(&["-Sn"]), table, "nothing changes while the API server is away");
    assert!(daemon.running(), "{}", daemon.log());
    api.resume().await.unwrap();

    eventually(2 * MINUTE, || {
        answered_by(SocketAddr::from((LATE, 80)), 2, &names(&topology, &[2]))
    });
    eventually(MINUTE, || answered_by(vip, 12, &names(&topology, &[0, 1, 3])));
    let (ok, failed, errors) = client.finish();
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok > 100, "{ok} connections");
    let requests = api.requests();
    let lists = requests.iter().filter(|r| *r == "LIST services").count();
    assert!(lists >= 2, "relisted after 410 Gone: {requests:?}");
    assert!(daemon.metric("kube_ipvs_watch_errors_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_ipvs_table_is_healed_within_the_sync_period() {
    let topology = node(2);
    let pods: Vec<_> = topology.pods.iter().collect();
    let api = FakeApiServer::start().await.unwrap();
    let mut daemon = Daemon::with_api("heal", &api.kubeconfig(), &["--ipvs-sync-period", "3s"]);
    api.apply(service("web", WEB, 80, json!({})));
    api.apply(slice("web", &pods));
    let vip = SocketAddr::from((WEB, 80));
    eventually(MINUTE, || answered_by(vip, 6, &topology.pod_names()));
    daemon.wait_synced();
    let table = ipvsadm(&["-Sn"]);
    ipvsadm(&["-C"]);
    assert!(tcp_ask(vip).is_err(), "nothing answers with the table cleared");
    eventually(Duration::from_secs(30), || {
        (ipvsadm(&["-Sn"]) == table).then_some(()).ok_or("not healed")
    });
    assert_eq!(answering(vip, 6).unwrap(), topology.pod_names());
    assert!(
        daemon.metric("kube_ipvs_drift_repairs_total{kind=\"ipvs\"}") >= 1.0,
        "{}",
        daemon.metrics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_reported_once_and_the_good_ones_programmed() {
    let topology = node(2);
    let pods: Vec<_> = topology.pods.iter().collect();
    let api = FakeApiServer::start().await.unwrap();
    let mut daemon = Daemon::with_api("malformed", &api.kubeconfig(), &[]);
    for i in 0..100u8 {
        // Every other one has an address that is not one, the others an unknown protocol.
        let bad = if i % 2 == 0 {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("bad-{i}"), "namespace": "ns"},
                   "spec": {"clusterIP": format!("10.96.1.{i}.5"), "ports": [{"port": 80}]}})
        } else {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("bad-{i}"), "namespace": "ns"},
                   "spec": {"clusterIP": format!("10.96.1.{i}"), "ports": [{"port": 80, "protocol": "QUIC"}]}})
        };
        api.apply(bad);
        if i == 50 {
            api.apply(service("web", WEB, 80, json!({})));
            api.apply(slice("web", &pods));
        }
    }
    let vip = SocketAddr::from((WEB, 80));
    eventually(MINUTE, || answered_by(vip, 6, &topology.pod_names()));
    daemon.wait_synced();
    // Another change makes another sync: nothing is reported twice.
    api.apply(service("late", LATE, 80, json!({})));
    api.apply(slice("late", &pods[..1]));
    eventually(MINUTE, || answering(SocketAddr::from((LATE, 80)), 2).map(|_| ()));
    let log = daemon.log();
    // Each report once: no line repeats (timestamps aside), and every bad Service is named.
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" skipped "))
        .map(|l| l.split_once(" WARN ").map_or(l, |(_, rest)| rest))
        .collect();
    let distinct: std::collections::BTreeSet<&str> = reports.iter().copied().collect();
    assert_eq!(distinct.len(), reports.len(), "a report repeated:\n{log}");
    for i in 0..100 {
        let name = format!("object=Service ns/bad-{i} ");
        assert!(reports.iter().any(|r| r.contains(&name)), "{name} not reported:\n{log}");
    }
    assert!(daemon.running());
    assert!(daemon.metric("kube_ipvs_skipped_objects") >= 100.0, "{}", daemon.metrics());
}
