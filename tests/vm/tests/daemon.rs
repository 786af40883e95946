//! End to end: the real `kube-ipvs run` process on the node, fed by a fake API server over
//! HTTP (or a manifests directory), with pods in network namespaces and real connections.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use controller::desired::HEADLESS_LABEL;
use fake_apiserver::{FakeApiServer, Resource};
use serde_json::json;
use vm_tests::{
    NODE_IP, Topology,
    daemon::{
        Daemon, HEALTHZ, METRICS, answered_by, answering, answers, eventually, http_get,
        ipvs_writes, nft_table, service, slice, vips,
    },
    ipvsadm, sh, tcp_ask,
};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LATE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LABELLED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
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

/// A fake API server, and kube-ipvs (started with `args`) watching it.
async fn watched(name: &str, args: &[&str]) -> (FakeApiServer, Daemon) {
    let api = FakeApiServer::start().await.unwrap();
    let daemon = Daemon::with_api(name, &api.kubeconfig(), args);
    (api, daemon)
}

/// Publishes the Service `web` (ClusterIP `WEB`, port 80) over `pods`, and waits until
/// kube-ipvs has synced and exactly those pods answer; returns its address.
fn publish_web(api: &FakeApiServer, daemon: &mut Daemon, pods: &[&vm_tests::Pod]) -> SocketAddr {
    api.apply(service("web", WEB, 80, json!({})));
    api.apply(slice("web", pods));
    let vip = SocketAddr::from((WEB, 80));
    let expected = pods.iter().map(|p| p.name.clone()).collect();
    eventually(MINUTE, || answered_by(vip, 3 * pods.len() + 3, &expected));
    daemon.wait_synced();
    vip
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
    let (api, mut daemon) = watched("follow", &[]).await;
    let vip = publish_web(&api, &mut daemon, &pods[..3]);

    // Scaled up: the new pod gets connections.
    api.apply(slice("web", &pods));
    eventually(MINUTE, || answered_by(vip, 16, &names(&topology, &[0, 1, 2, 3])));
    // Scaled down: new connections go to the remaining pod only.
    api.apply(slice("web", &pods[1..2]));
    eventually(MINUTE, || answered_by(vip, 8, &names(&topology, &[1])));

    // The EndpointSlice is relabelled to another Service: its endpoints move there, and the
    // first Service is left with none; deleted, it takes them from the second.
    let late = SocketAddr::from((LATE, 80));
    api.apply(service("late", LATE, 80, json!({})));
    let mut moved = slice("web", &pods[2..3]);
    moved["metadata"]["labels"]["kubernetes.io/service-name"] = json!("late");
    api.apply(moved);
    eventually(MINUTE, || answered_by(late, 8, &names(&topology, &[2])));
    // A removed destination may stay a while at weight 0, for its connections to drain.
    let serving = |vip: SocketAddr, i: usize| {
        let listed = ipvsadm(&["-Ln", "-t", &vip.to_string()]);
        let pod = format!("{}:8080", pods[i].ip);
        let weight = |line: &str| line.split_whitespace().nth(3).map(str::to_owned);
        listed.lines().any(|line| line.contains(&pod) && weight(line).as_deref() != Some("0"))
    };
    eventually(MINUTE, || (!serving(vip, 1) && !serving(vip, 2)).then_some(()).ok_or("web"));
    api.delete(Resource::EndpointSlices, "ns", "web-1");
    eventually(MINUTE, || (!serving(late, 2)).then_some(()).ok_or("late"));
    api.delete(Resource::Services, "ns", "late");
    api.apply(slice("web", &pods[1..2]));
    eventually(MINUTE, || answered_by(vip, 8, &names(&topology, &[1])));

    // A Service labelled `service.kubernetes.io/headless` that has a cluster IP is served as
    // kube-proxy serves it: its slices (labelled too) are not watched, so it gets a virtual
    // server with no destinations and its address, and a client is refused at once instead of
    // waiting for a time-out. A Service with `clusterIP: None` gets nothing.
    let mut labelled = service("labelled", LABELLED, 80, json!({}));
    labelled["metadata"]["labels"] = json!({HEADLESS_LABEL: ""});
    api.apply(labelled);
    let mut labelled_slice = slice("labelled", &pods[..1]);
    labelled_slice["metadata"]["labels"][HEADLESS_LABEL] = json!("");
    api.apply(labelled_slice);
    let mut headless = service("headless", LATE, 80, json!({}));
    headless["spec"]["clusterIP"] = json!("None");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    api.apply(headless);
    api.apply(slice("headless", &pods[..1]));
    let labelled = SocketAddr::from((LABELLED, 80));
    eventually(MINUTE, || {
        let listed = ipvsadm(&["-Ln", "-t", &labelled.to_string()]);
        let destination = |line: &str| line.contains("-> 10.");
        let programmed = listed.contains(&labelled.to_string())
            && !listed.lines().any(destination)
            && vips().contains(&LABELLED.to_string());
        programmed.then_some(()).ok_or(listed)
    });
    daemon.wait_synced();
    let started = std::time::Instant::now();
    let refused = tcp_ask(labelled).expect_err("a Service with no endpoints refuses");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    println!("labelled headless: refused in {:?}", started.elapsed());
    assert!(!ipvsadm(&["-Sn"]).contains(&LATE.to_string()), "clusterIP: None gets nothing");
    api.delete(Resource::Services, "ns", "labelled");
    api.delete(Resource::Services, "ns", "headless");

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
    let (api, mut first) = watched("restart-1", &[]).await;
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

/// The weights of a virtual server's destinations, read over netlink.
async fn weights(ipvs: &ipvs_netlink::IpvsHandle, vip: SocketAddr) -> BTreeMap<String, u32> {
    let key = ipvs_netlink::ServiceKey::tcp(vip);
    let destinations = ipvs.list_destinations(&key).await.unwrap_or_default();
    destinations
        .into_iter()
        .map(|d| (d.destination.address.ip().to_string(), d.destination.weight))
        .collect()
}

/// The kernel serves exactly `pods` through `vip` (others may drain at weight 0).
async fn serving(
    ipvs: &ipvs_netlink::IpvsHandle,
    vip: SocketAddr,
    pods: &[&vm_tests::Pod],
) -> bool {
    let weights = weights(ipvs, vip).await;
    let serving: Vec<String> =
        weights.iter().filter(|(_, w)| **w > 0).map(|(a, _)| a.clone()).collect();
    let wanted: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    serving == wanted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_keeps_traffic_and_changes_flow_within_seconds() {
    let topology = node(4);
    let pods: Vec<_> = topology.pods.iter().collect();
    let (api, mut daemon) = watched("restart-api", &["--ipvs-sync-period", "5s"]).await;
    // The `kubernetes` Service, whose endpoint is the API server's own address (pod4 plays
    // it): a real API server takes it out on shutdown and puts it back when it starts.
    let kubernetes = Ipv4Addr::new(10, 96, 0, 1);
    let mut own = service("kubernetes", kubernetes, 443, json!({}));
    own["metadata"]["namespace"] = json!("default");
    api.apply(own);
    let mut own_slice = slice("kubernetes", &pods[3..4]);
    own_slice["metadata"]["namespace"] = json!("default");
    api.apply(own_slice);
    let vip = publish_web(&api, &mut daemon, &pods[..2]);
    let ipvs = ipvs_netlink::IpvsHandle::new().unwrap();
    let api_vip = SocketAddr::from((kubernetes, 443));
    eventually(MINUTE, || answered_by(api_vip, 2, &names(&topology, &[3])));

    let client = Client::start(vip);
    // Down while objects change: the changes land after it, from a fresh list (410 Expired).
    api.shut_down().await;
    api.apply(slice("web", &[pods[0], pods[1], pods[2]]));
    api.apply(service("late", LATE, 80, json!({})));
    api.apply(slice("late", &pods[2..3]));
    thread::sleep(Duration::from_secs(5));
    assert!(daemon.running(), "{}", daemon.log());
    assert!(serving(&ipvs, vip, &pods[..2]).await, "nothing changes while it is away");
    assert_eq!(http_get(HEALTHZ.parse().unwrap(), "/healthz").unwrap().0, 200);
    api.restart().await.unwrap();
    eventually(MINUTE, || answered_by(SocketAddr::from((LATE, 80)), 2, &names(&topology, &[2])));
    eventually(MINUTE, || answered_by(vip, 12, &names(&topology, &[0, 1, 2])));

    // Ten restarts, down for 1 to 5 s: the first change written after each reaches the kernel
    // soon after the API server is back. The time is printed, not asserted (a benchmark's job).
    let mut latencies = Vec::new();
    for (attempt, down) in [3, 1, 4, 2, 5, 3, 1, 4, 2, 3].into_iter().enumerate() {
        api.shut_down().await;
        thread::sleep(Duration::from_secs(down));
        api.restart().await.unwrap();
        let wanted: Vec<&vm_tests::Pod> =
            if attempt % 2 == 0 { vec![pods[0], pods[1]] } else { vec![pods[0], pods[1], pods[2]] };
        let written = std::time::Instant::now();
        api.apply(slice("web", &wanted));
        let deadline = written + MINUTE;
        while !serving(&ipvs, vip, &wanted).await {
            assert!(std::time::Instant::now() < deadline, "the change never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(written.elapsed());
        // Its own endpoint is back in the `kubernetes` Service.
        let api_served =
            || async { weights(&ipvs, api_vip).await.get(&pods[3].ip.to_string()) == Some(&1) };
        let until = std::time::Instant::now() + MINUTE;
        while !api_served().await {
            assert!(std::time::Instant::now() < until, "the kubernetes endpoint never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    latencies.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let all: Vec<String> = latencies.iter().map(|d| format!("{:.0}", ms(d))).collect();
    println!(
        "API server restarts: first change to the kernel after the restart, over {} tries: \
         p50 {:.0} ms, p99 {:.0} ms (each: {} ms)",
        latencies.len(),
        ms(&latencies[latencies.len() / 2]),
        ms(latencies.last().unwrap()),
        all.join(", ")
    );

    // A restart with no change: the fresh lists write nothing, and remove nothing.
    thread::sleep(Duration::from_secs(2));
    let writes = ipvs_writes(&daemon.metrics());
    let lists = |api: &FakeApiServer| {
        api.requests().iter().filter(|r| r.starts_with("LIST endpointslices")).count()
    };
    let listed = lists(&api);
    api.stop().await;
    thread::sleep(Duration::from_secs(1));
    api.restart().await.unwrap();
    eventually(MINUTE, || (lists(&api) > listed).then_some(()).ok_or("no relist"));
    thread::sleep(Duration::from_secs(2));
    assert_eq!(ipvs_writes(&daemon.metrics()), writes, "a relist of unchanged objects wrote");

    let (ok, failed, errors) = client.finish();
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok > 100, "{ok} connections");
    assert!(daemon.metric("kube_ipvs_watch_errors_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_ipvs_table_is_healed_within_the_sync_period() {
    let topology = node(2);
    let pods: Vec<_> = topology.pods.iter().collect();
    let (api, mut daemon) = watched("heal", &["--ipvs-sync-period", "3s"]).await;
    let vip = publish_web(&api, &mut daemon, &pods);
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
    let (api, mut daemon) = watched("malformed", &[]).await;
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

/// An EndpointSlice of Service `name` with these pods on these nodes.
fn placed(name: &str, pods: &[(&vm_tests::Pod, &str)]) -> serde_json::Value {
    let mut slice = slice(name, &[]);
    slice["endpoints"] = pods
        .iter()
        .map(|(pod, node)| json!({"addresses": [pod.ip.to_string()], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    slice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_type_health_metrics_and_ls() {
    let topology = node(3);
    let pods: Vec<_> = topology.pods.iter().collect();
    let (api, mut daemon) = watched("types", &["--traffic-metrics"]).await;
    let lb = Ipv4Addr::new(192, 0, 2, 10);
    // ClusterIP with session affinity and its own scheduler.
    let mut sticky = service("sticky", WEB, 80, json!({"sessionAffinity": "ClientIP"}));
    sticky["metadata"]["annotations"] = json!({"kube-ipvs.io/scheduler": "lc"});
    api.apply(sticky);
    api.apply(slice("sticky", &pods));
    // NodePort.
    let http = |node_port: u16| json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": node_port}]);
    api.apply(service("np", LATE, 80, json!({"type": "NodePort", "ports": http(30080)})));
    api.apply(slice("np", &pods));
    // LoadBalancer with externalTrafficPolicy Local: pod1 here, pod2 and pod3 elsewhere.
    let mut local = service(
        "local",
        Ipv4Addr::new(10, 96, 0, 12),
        80,
        json!({
        "type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100, "ports": http(30081)}),
    );
    local["status"] = json!({"loadBalancer": {"ingress": [{"ip": lb.to_string()}]}});
    api.apply(local);
    api.apply(placed("local", &[(pods[0], "node-a"), (pods[1], "node-b"), (pods[2], "node-b")]));

    let all = topology.pod_names();
    eventually(MINUTE, || answered_by(SocketAddr::from((LATE, 80)), 9, &all));
    daemon.wait_synced();
    // Affinity: one client, one pod.
    vm_tests::checks::sticky("sticky", answers(SocketAddr::from((WEB, 80)), 6)).unwrap();
    assert!(
        ipvsadm(&["-Ln"]).contains("TCP  10.96.0.10:80 lc persistent 10800"),
        "{}",
        ipvsadm(&["-Ln"])
    );
    // NodePort from outside: every pod.
    let outside = topology.client.run(|| answering(SocketAddr::from((NODE_IP, 30080)), 9)).unwrap();
    assert_eq!(outside, all);
    // Local: outside clients reach this node's pod only, and it sees their address.
    let answers: Vec<_> = topology
        .client
        .run(|| (0..6).map(|_| tcp_ask(SocketAddr::from((lb, 80))).unwrap()).collect());
    assert!(
        answers
            .iter()
            .all(|a| a.from == "pod1" && a.peer == std::net::IpAddr::from(vm_tests::CLIENT_IP)),
        "{answers:?}"
    );
    // Its healthCheckNodePort answers with the local endpoint count, from outside too.
    let health =
        topology.client.run(|| http_get(SocketAddr::from((NODE_IP, 32100)), "/healthz")).unwrap();
    assert_eq!(health.0, 200, "{health:?}");
    let body: serde_json::Value = serde_json::from_str(&health.1).unwrap();
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"], json!({"namespace": "ns", "name": "local"}));
    // And over IPv6, as dual-stack load balancers check it.
    sh("ip", &["addr", "add", "fd00:99::2/64", "dev", "eth-node", "nodad"]);
    topology.client.ip(&["addr", "add", "fd00:99::10/64", "dev", "eth0", "nodad"]);
    let node_v6: std::net::IpAddr = "fd00:99::2".parse().unwrap();
    let health =
        topology.client.run(|| http_get(SocketAddr::new(node_v6, 32100), "/healthz")).unwrap();
    assert_eq!(health.0, 200, "{health:?}");
    assert!(health.1.contains("\"localEndpoints\": 1"), "{health:?}");
    // The endpoint leaves this node; the EndpointSlice says when that happened, for
    // kubeproxy_network_programming_duration_seconds.
    let mut moved = placed("local", &[(pods[1], "node-b")]);
    moved["metadata"]["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": jiff_now()});
    api.apply(moved);
    eventually(MINUTE, || match http_get(SocketAddr::from((NODE_IP, 32100)), "/healthz") {
        Ok((503, body)) if body.contains("\"localEndpoints\": 0") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let health = http_get(SocketAddr::new(node_v6, 32100), "/healthz").unwrap();
    assert_eq!(health.0, 503, "{health:?}");

    // kube-proxy's health and metrics endpoints.
    let (code, body) = http_get(HEALTHZ.parse().unwrap(), "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((body["healthy"].clone(), body["nodeEligible"].clone()), (json!(true), json!(true)));
    assert_eq!(http_get(HEALTHZ.parse().unwrap(), "/livez").unwrap().0, 200);
    assert_eq!(http_get(METRICS.parse().unwrap(), "/proxyMode").unwrap(), (200, "ipvs".to_owned()));
    let metrics = daemon.metrics();
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 1",
        "kube_ipvs_netlink_messages_total{kind=\"AddService\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    // The kernel's counters per virtual server, named by Service (the kernel folds its
    // per-CPU counters in every 2 s).
    let np = "kube_ipvs_virtual_server_connections_total{service=\"ns/np:http\",virtual_server=\"TCP 10.96.0.11:80\"}";
    eventually(MINUTE, || {
        let counted = daemon.metric(np);
        (counted >= 9.0).then_some(()).ok_or(format!("{np} {counted}"))
    });

    // `kube-ipvs ls`: ipvsadm's listing line for line, plus the Services.
    let ls = sh(vm_tests::daemon::binary().to_str().unwrap(), &["ls"]);
    vm_tests::checks::ls_matches_ipvsadm(&ls, &ipvsadm(&["-Ln"])).unwrap();
    assert!(
        ls.contains("TCP  10.96.0.10:80 lc persistent 10800  # ns/sticky:http ClusterIP"),
        "{ls}"
    );
    assert!(ls.contains("TCP  192.0.2.10:80 rr  # ns/local:http LoadBalancer"), "{ls}");
    assert!(ls.contains("  # ns/local:http Local"), "{ls}");
    // --diff: nothing, then what was changed behind kube-ipvs's back.
    assert_eq!(sh(vm_tests::daemon::binary().to_str().unwrap(), &["ls", "--diff"]), "");
    ipvsadm(&["-d", "-t", "10.96.0.11:80", "-r", &format!("{}:8080", pods[0].ip)]);
    let out = std::process::Command::new(vm_tests::daemon::binary())
        .args(["ls", "--diff"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("+ TCP 10.96.0.11:80 -> {}:8080 weight 1  # ns/np:http", pods[0].ip)
    );

    // The node being deleted: /healthz fails (load balancers stop sending), /livez does not.
    api.apply(json!({"kind": "Node", "metadata": {"name": "node-a"},
                     "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}));
    eventually(MINUTE, || match http_get(HEALTHZ.parse().unwrap(), "/healthz") {
        Ok((503, body)) if body.contains("\"nodeEligible\":false") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(http_get(HEALTHZ.parse().unwrap(), "/livez").unwrap().0, 200);
}

/// Now as an RFC 3339 timestamp, as the EndpointSlice controller writes it.
fn jiff_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    sh("date", &["-u", "-d", &format!("@{}", now.as_secs()), "+%Y-%m-%dT%H:%M:%SZ"])
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_removed_before_services_and_slices_are_both_listed() {
    let topology = node(2);
    let pods: Vec<_> = topology.pods.iter().collect();
    let (api, mut first) = watched("startup-1", &[]).await;
    api.apply(service("old", LATE, 80, json!({})));
    api.apply(slice("old", &pods));
    publish_web(&api, &mut first, &pods);
    eventually(MINUTE, || answered_by(SocketAddr::from((LATE, 80)), 6, &topology.pod_names()));
    assert!(first.stop().success());
    let table = ipvsadm(&["-Sn"]);

    // While kube-ipvs is down, a Service goes; when it starts, EndpointSlices cannot be listed.
    api.delete(Resource::Services, "ns", "old");
    api.delete(Resource::EndpointSlices, "ns", "old-1");
    api.fail(Resource::EndpointSlices, true);
    let client = Client::start(SocketAddr::from((WEB, 80)));
    let mut second = Daemon::with_api("startup-2", &api.kubeconfig(), &[]);
    eventually(MINUTE, || {
        let failed = second.metric("kube_ipvs_watch_errors_total{kind=\"EndpointSlice\"}");
        (failed >= 1.0)
            .then_some(())
            .ok_or_else(|| format!("no failed list yet:\n{}\n{}", second.log(), second.metrics()))
    });
    thread::sleep(Duration::from_secs(5));
    assert_eq!(ipvsadm(&["-Sn"]), table, "nothing removed with only Services listed");
    assert_eq!(second.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds"), 0.0);

    api.fail(Resource::EndpointSlices, false);
    second.wait_synced();
    eventually(MINUTE, || {
        (!ipvsadm(&["-Sn"]).contains(&LATE.to_string())).then_some(()).ok_or("old is still there")
    });
    let (ok, failed, errors) = client.finish();
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok > 10);
}

#[test]
fn a_manifests_directory_is_followed() {
    let topology = node(3);
    let pods: Vec<_> = topology.pods.iter().collect();
    let dir = std::env::temp_dir().join(format!("manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |file: &str, objects: &[serde_json::Value]| {
        // JSON is YAML: one document per object.
        let text: Vec<String> = objects.iter().map(|o| o.to_string()).collect();
        std::fs::write(dir.join(file), text.join("\n---\n")).unwrap();
    };
    write("web.yaml", &[service("web", WEB, 80, json!({})), slice("web", &pods[..2])]);
    let dir_arg = dir.to_str().unwrap().to_owned();
    let mut daemon = Daemon::start("manifests", &["--manifests", &dir_arg]);
    let vip = SocketAddr::from((WEB, 80));
    eventually(MINUTE, || answered_by(vip, 6, &names(&topology, &[0, 1])));
    daemon.wait_synced();

    write("web.yaml", &[service("web", WEB, 80, json!({})), slice("web", &pods)]);
    eventually(MINUTE, || answered_by(vip, 9, &topology.pod_names()));
    // A broken file is reported and skipped; the rest stays.
    std::fs::write(
        dir.join("broken.yaml"),
        "kind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n",
    )
    .unwrap();
    eventually(MINUTE, || {
        daemon.log().contains("manifest skipped").then_some(()).ok_or("not reported")
    });
    assert_eq!(answering(vip, 9).unwrap(), topology.pod_names());
    println!("{}", sh(vm_tests::daemon::binary().to_str().unwrap(), &["ls"]));

    std::fs::remove_file(dir.join("web.yaml")).unwrap();
    eventually(MINUTE, || {
        (!ipvsadm(&["-Sn"]).contains(&WEB.to_string())).then_some(()).ok_or("still there")
    });
    assert!(daemon.running(), "{}", daemon.log());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_external_ips_source_ranges_and_internal_policy() {
    use std::net::IpAddr;
    use vm_tests::{CLIENT_IP, OTHER_CLIENT_IP, tcp_ask_from, udp_ask};
    let topology = node(3);
    let pods: Vec<_> = topology.pods.iter().collect();
    let (api, mut daemon) = watched("kinds", &[]).await;
    // UDP.
    let dns = Ipv4Addr::new(10, 96, 0, 53);
    api.apply(service(
        "dns",
        dns,
        53,
        json!({"ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}),
    ));
    let mut dns_slice = slice("dns", &pods);
    dns_slice["ports"] = json!([{"name": "dns", "port": 5353, "protocol": "UDP"}]);
    api.apply(dns_slice);
    // An external IP, and a load balancer open to one client address only.
    let external = Ipv4Addr::new(192, 0, 2, 20);
    let lb = Ipv4Addr::new(192, 0, 2, 21);
    api.apply(service("ext", WEB, 80, json!({"externalIPs": [external.to_string()]})));
    api.apply(slice("ext", &pods));
    let mut ranged = service(
        "ranged",
        LATE,
        80,
        json!({
        "type": "LoadBalancer", "loadBalancerSourceRanges": [format!("{CLIENT_IP}/32")],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30090}]}),
    );
    ranged["status"] = json!({"loadBalancer": {"ingress": [{"ip": lb.to_string()}]}});
    api.apply(ranged);
    api.apply(slice("ranged", &pods));
    // internalTrafficPolicy Local: pod1 here, the others elsewhere.
    let internal = Ipv4Addr::new(10, 96, 0, 13);
    api.apply(service("internal", internal, 80, json!({"internalTrafficPolicy": "Local"})));
    api.apply(placed("internal", &[(pods[0], "node-a"), (pods[1], "node-b"), (pods[2], "node-b")]));

    let all = topology.pod_names();
    eventually(MINUTE, || answered_by(SocketAddr::from((WEB, 80)), 9, &all));
    daemon.wait_synced();
    let udp: std::collections::BTreeSet<String> =
        (0..9).map(|_| udp_ask(SocketAddr::from((dns, 53))).unwrap().from).collect();
    assert_eq!(udp, all, "UDP spread over every pod");
    let outside = topology.client.run(|| answering(SocketAddr::from((external, 80)), 9)).unwrap();
    assert_eq!(outside, all, "the external IP from outside");
    let allowed = topology
        .client
        .run(|| tcp_ask_from(Some(IpAddr::from(CLIENT_IP)), SocketAddr::from((lb, 80))));
    assert!(allowed.is_ok(), "the allowed source gets in: {allowed:?}");
    let refused = topology
        .client
        .run(|| tcp_ask_from(Some(IpAddr::from(OTHER_CLIENT_IP)), SocketAddr::from((lb, 80))));
    assert!(refused.is_err(), "a source outside loadBalancerSourceRanges: {refused:?}");
    assert_eq!(answering(SocketAddr::from((internal, 80)), 6).unwrap(), names(&topology, &[0]));
}

/// Every Service of the golden scenario, as the API server served them.
fn golden_objects() -> Vec<serde_json::Value> {
    let text = include_str!("../../../crates/controller/tests/golden/golden-objects-server.yaml");
    let list: serde_json::Value = serde_norway::from_str(text).expect("the golden objects");
    list["items"].as_array().expect("a List").clone()
}

/// Waits until the daemon has completed `n` more full checks than it had.
fn full_checks(daemon: &mut Daemon, n: f64) {
    let before = daemon.metric("kube_ipvs_full_checks_total");
    eventually(2 * MINUTE, || {
        assert!(daemon.running(), "kube-ipvs exited:\n{}", daemon.log());
        let done = daemon.metric("kube_ipvs_full_checks_total");
        (done >= before + n).then_some(()).ok_or(format!("{done} full checks"))
    });
}

/// What must stay 0 on a node that nobody changes: drift repairs and refused IPVS changes.
fn repairs_and_errors(daemon: &Daemon) -> (f64, f64) {
    let metrics = daemon.metrics();
    (
        vm_tests::daemon::metric(&metrics, "kube_ipvs_drift_repairs_total"),
        vm_tests::daemon::metric(&metrics, "kube_ipvs_netlink_errors_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_shape_is_owned_restarts_write_nothing_and_checks_find_no_drift() {
    let topology = node(3);
    let pods: Vec<_> = topology.pods.iter().collect();
    let api = FakeApiServer::start().await.unwrap();
    for object in golden_objects() {
        api.apply(object);
    }
    // The node's own address as an external IP and as a load-balancer address (as k3s's
    // ServiceLB sets it), on ports outside the NodePort range.
    let node_ip = NODE_IP.to_string();
    api.apply(service("node-external", WEB, 8080, json!({"externalIPs": [node_ip]})));
    api.apply(slice("node-external", &pods));
    let mut lb = service(
        "node-lb",
        LATE,
        8081,
        json!({"type": "LoadBalancer", "ports": [{"name": "http", "port": 8081,
               "protocol": "TCP", "targetPort": 8080, "nodePort": 30091}]}),
    );
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": node_ip}]}});
    api.apply(lb);
    api.apply(slice("node-lb", &pods));
    // Shapes the other tests use: NodePort, session affinity, UDP, local policies.
    api.apply(service(
        "shapes",
        LABELLED,
        80,
        json!({"type": "NodePort", "sessionAffinity": "ClientIP",
               "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30092},
                         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30093}]}),
    ));
    let mut shapes = slice("shapes", &pods);
    shapes["ports"] = json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                             {"name": "dns", "port": 5353, "protocol": "UDP"}]);
    api.apply(shapes);

    // The golden Services' addresses are in an excluded CIDR: kube-ipvs programs them and
    // owns what it programmed, and leaves alone what it did not create there, though on a
    // Service address (kube-proxy's meaning of the flag).
    ipvsadm(&["-A", "-t", "10.96.10.1:9999", "-s", "rr"]);
    let args = ["--ipvs-sync-period", "2s", "--ipvs-exclude-cidrs", "10.96.10.0/24"];
    let mut first = Daemon::with_api("shapes-1", &api.kubeconfig(), &args);
    first.wait_synced();
    for port in [8080, 8081] {
        let address = SocketAddr::from((NODE_IP, port));
        eventually(MINUTE, || answered_by(address, 6, &topology.pod_names()));
    }
    // Two full checks: no drift, no change, no refused write.
    let writes = ipvs_writes(&first.metrics());
    full_checks(&mut first, 2.0);
    assert_eq!(repairs_and_errors(&first), (0.0, 0.0), "{}", first.log());
    assert_eq!(ipvs_writes(&first.metrics()), writes, "the checks changed nothing");
    let table = ipvsadm(&["-Sn"]);
    assert!(
        table.contains(&format!("{NODE_IP}:8080")) && table.contains(&format!("{NODE_IP}:8081"))
    );
    let addresses = vips();
    assert!(first.stop().success());

    // A restart writes nothing, and its checks find nothing either.
    let mut second = Daemon::with_api("shapes-2", &api.kubeconfig(), &args);
    second.wait_synced();
    full_checks(&mut second, 2.0);
    let metrics = second.metrics();
    assert_eq!(ipvs_writes(&metrics), 0.0, "the restart wrote to IPVS:\n{metrics}");
    assert_eq!(repairs_and_errors(&second), (0.0, 0.0), "{}", second.log());
    assert_eq!(ipvsadm(&["-Sn"]), table);
    assert_eq!(vips(), addresses);
    assert!(second.stop().success());

    // The Services on the node's address deleted while kube-ipvs was away: the next start
    // knows their virtual servers for its own (its netfilter table lists their ports), and
    // removes them.
    api.delete(Resource::Services, "ns", "node-external");
    api.delete(Resource::Services, "ns", "node-lb");
    let mut third = Daemon::with_api("shapes-3", &api.kubeconfig(), &args);
    third.wait_synced();
    let listed = ipvsadm(&["-Sn"]);
    for port in [8080, 8081] {
        assert!(!listed.contains(&format!("{NODE_IP}:{port}")), "{port} left behind:\n{listed}");
    }
    assert!(listed.contains(&format!("{LABELLED}:80")), "the others stay:\n{listed}");
    assert!(listed.contains("10.96.10.1:80"), "an excluded Service's own:\n{listed}");
    assert!(listed.contains("10.96.10.1:9999"), "not kube-ipvs's:\n{listed}");
    // And deleted while it runs.
    api.apply(service("node-external", WEB, 8080, json!({"externalIPs": [node_ip]})));
    let on_node = format!("{NODE_IP}:8080");
    eventually(MINUTE, || ipvsadm(&["-Sn"]).contains(&on_node).then_some(()).ok_or("not yet"));
    api.delete(Resource::Services, "ns", "node-external");
    eventually(MINUTE, || (!ipvsadm(&["-Sn"]).contains(&on_node)).then_some(()).ok_or("still"));
    assert_eq!(repairs_and_errors(&third), (0.0, 0.0), "{}", third.log());
    assert!(third.stop().success());
}

/// `kube-ipvs ls --diff`: its exit code and what it printed.
fn ls_diff() -> (Option<i32>, String) {
    let out = std::process::Command::new(vm_tests::daemon::binary())
        .args(["ls", "--diff"])
        .output()
        .expect("kube-ipvs ls runs");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_diff_names_everything_changed_behind_kube_ipvss_back() {
    let topology = node(2);
    let pods: Vec<_> = topology.pods.iter().collect();
    // No full check during the test: what is broken stays broken until it is put back.
    let (api, mut daemon) = watched("diff", &["--ipvs-sync-period", "1h"]).await;
    // Port 8080 to 8080, so a destination can be switched to direct routing (which takes the
    // service's port).
    let mut sticky = service(
        "sticky",
        WEB,
        8080,
        json!({"sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}),
    );
    sticky["metadata"]["annotations"] = json!({"kube-ipvs.io/scheduler": "sh",
                                                "kube-ipvs.io/scheduler-flags": "sh-fallback"});
    api.apply(sticky);
    api.apply(slice("sticky", &pods[..1]));
    let vip = format!("{WEB}:8080");
    let pod = format!("{}:8080", pods[0].ip);
    eventually(MINUTE, || {
        let listed = ipvsadm(&["-Sn"]);
        listed.contains(&format!("-t {vip} -r {pod}")).then_some(()).ok_or(listed)
    });
    daemon.wait_synced();
    assert_eq!(ls_diff(), (Some(0), String::new()));

    let key = format!("TCP {vip}");
    let element = format!("{{ {WEB} . tcp . 8080 }}");
    // The virtual service edited by hand: `ipvsadm -E` with what kube-ipvs programmed
    // (`sh`, `sh-fallback`, persistent 600), and `change` in place of one of its options.
    let edited = |change: [&'static str; 2]| -> Vec<String> {
        let mut options = vec![["-s", "sh"], ["-b", "sh-fallback"], ["-p", "600"]];
        match options.iter_mut().find(|o| o[0] == change[0]) {
            Some(option) => *option = change,
            None => options.push(change),
        }
        let command = ["ipvsadm", "-E", "-t", &vip].map(String::from).to_vec();
        command.into_iter().chain(options.concat().into_iter().map(String::from)).collect()
    };
    let programmed = edited(["-M", "255.255.255.255"]);
    let mut unflagged = edited(["-s", "sh"]);
    unflagged.retain(|a| a != "-b" && a != "sh-fallback");
    let words = |text: &str| text.split(' ').map(String::from).collect::<Vec<_>>();
    // What is broken, how, how it is put back, and the line `ls --diff` prints for it.
    let cases: [(&str, Vec<String>, Vec<String>, String); 7] = [
        (
            "scheduler",
            edited(["-s", "wrr"]).into_iter().filter(|a| a != "-b" && a != "sh-fallback").collect(),
            programmed.clone(),
            format!("~ {key} scheduler wrr (desired sh)"),
        ),
        (
            "scheduler flags",
            unflagged,
            programmed.clone(),
            format!("~ {key} scheduler-flags  (desired sh-fallback)"),
        ),
        (
            "persistence timeout",
            edited(["-p", "300"]),
            programmed.clone(),
            format!("~ {key} persistent 300 (desired 600)"),
        ),
        (
            "persistence netmask",
            edited(["-M", "255.255.255.0"]),
            programmed,
            format!("~ {key} mask 255.255.255.0 (desired 255.255.255.255)"),
        ),
        (
            "forwarding method",
            words(&format!("ipvsadm -e -t {vip} -r {pod} -g -w 1")),
            words(&format!("ipvsadm -e -t {vip} -r {pod} -m -w 1")),
            format!("~ {key} -> {pod} forward Route (desired Masq)"),
        ),
        (
            "kube-ipvs0 address",
            words(&format!("ip addr del {WEB}/32 dev kube-ipvs0")),
            words(&format!("ip addr add {WEB}/32 dev kube-ipvs0")),
            format!("+ kube-ipvs0 {WEB}"),
        ),
        (
            "nftables element",
            // nft joins its arguments into one command.
            words(&format!("nft delete element inet kube-ipvs cluster-ips-v4 {element}")),
            words(&format!("nft add element inet kube-ipvs cluster-ips-v4 {element}")),
            format!("~ set cluster-ips-v4: missing {vip}/TCP"),
        ),
    ];
    let run = |command: &[String]| {
        let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
        sh(&command[0], &args);
    };
    for (what, break_it, mend_it, expected) in cases {
        run(&break_it);
        let (code, text) = ls_diff();
        assert_eq!(code, Some(1), "{what}: {text}");
        assert!(
            text.lines().any(|line| line.starts_with(&expected)),
            "{what}: expected {expected:?} in:\n{text}"
        );
        run(&mend_it);
        assert_eq!(ls_diff(), (Some(0), String::new()), "{what} put back");
    }
    assert!(daemon.running(), "{}", daemon.log());
}
