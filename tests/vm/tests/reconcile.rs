//! The reconciler against the real kernel: adoption without writes, incremental changes,
//! drift healing, graceful drain with live connections.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use controller::{
    desired::{Exposure, ServicePortName, VirtualServer},
    reconcile::{Reconciler, Servers, read_digests},
};
use ipvs_netlink::{Destination, IpvsHandle, Operation, ServiceKey, VirtualService};
use vm_tests::{Pod, bind_vip, ipvsadm, sh};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn owned(key: &ServiceKey) -> bool {
    matches!(key, ServiceKey::Inet { address, .. } if address.ip().to_string().starts_with("10.96."))
}

/// Virtual servers by key, as the desired state holds them.
type Table = BTreeMap<ServiceKey, Arc<VirtualServer>>;

fn server(port: u16, destinations: &[SocketAddr]) -> (ServiceKey, Arc<VirtualServer>) {
    let key = ServiceKey::tcp(SocketAddr::from((VIP, port)));
    let server = VirtualServer {
        service: Arc::new(VirtualService::new(key, "rr")),
        destinations: destinations.iter().map(|d| Destination::new(*d)).collect(),
        owner: ServicePortName {
            namespace: "ns".into(),
            name: format!("svc-{port}"),
            port: String::new(),
        },
        exposure: Exposure::ClusterIp,
    };
    (key, Arc::new(server))
}

fn desired(servers: Vec<(ServiceKey, Arc<VirtualServer>)>) -> Table {
    servers.into_iter().collect()
}

/// A reconciler that programmed `count` virtual servers with one destination each.
async fn programmed(count: u16) -> (IpvsHandle, Reconciler, Table) {
    let ipvs = IpvsHandle::new().unwrap();
    let mut reconciler =
        Reconciler::adopt(ipvs.clone(), &owned, Duration::from_secs(60)).await.unwrap();
    let table = desired((1..=count).map(|i| server(i, &[addr("10.244.0.2:8080")])).collect());
    reconciler.sync(&table, Servers::All).await;
    (ipvs, reconciler, table)
}

/// IPVS writes a handle has sent.
async fn writes(ipvs: &IpvsHandle) -> u64 {
    let sent = ipvs.sent_messages().await;
    [
        Operation::AddService,
        Operation::UpdateService,
        Operation::DeleteService,
        Operation::AddDestination,
        Operation::UpdateDestination,
        Operation::DeleteDestination,
        Operation::Flush,
    ]
    .iter()
    .map(|op| sent.get(op).copied().unwrap_or(0))
    .sum()
}

/// The pod name a holding server greets with (it keeps the connection open).
fn read_name(stream: &mut TcpStream) -> String {
    let mut name = [0; 4];
    std::io::Read::read_exact(stream, &mut name).unwrap();
    String::from_utf8_lossy(&name).into_owned()
}

/// Connects, reads the greeting, and closes.
fn greeting(address: SocketAddr) -> String {
    read_name(&mut TcpStream::connect(address).unwrap())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn a_second_start_over_a_programmed_node_writes_nothing() {
    // Something that is not ours: it must survive.
    ipvsadm(&["-A", "-t", "192.0.2.1:80", "-s", "wlc"]);
    let table = desired(
        (1..=20).map(|i| server(i, &[addr("10.244.0.2:8080"), addr("10.244.0.3:8080")])).collect(),
    );
    let ipvs = IpvsHandle::new().unwrap();
    let mut first = Reconciler::adopt(ipvs.clone(), &owned, Duration::from_secs(60)).await.unwrap();
    let report = first.sync(&table, Servers::All).await;
    assert_eq!((report.applied, report.failed.len()), (60, 0));
    let programmed = ipvsadm(&["-Ln"]);

    // A restart: a new handle, adopt, sync everything.
    let ipvs = IpvsHandle::new().unwrap();
    let mut second =
        Reconciler::adopt(ipvs.clone(), &owned, Duration::from_secs(60)).await.unwrap();
    let report = second.sync(&table, Servers::All).await;
    assert_eq!(report.applied, 0);
    assert_eq!(writes(&ipvs).await, 0, "no IPVS write on the second start");
    assert_eq!(ipvsadm(&["-Ln"]), programmed);
    assert!(programmed.contains("TCP  192.0.2.1:80 wlc"), "foreign virtual server kept");
}

#[tokio::test]
async fn one_endpoint_added_is_exactly_one_new_destination() {
    let (ipvs, mut reconciler, mut table) = programmed(50).await;
    let before = ipvs.sent_messages().await;

    let (key, grown) = server(7, &[addr("10.244.0.2:8080"), addr("10.244.0.3:8080")]);
    table.insert(key, grown);
    let report = reconciler.sync(&table, Servers::Only(&BTreeSet::from([key]))).await;
    assert_eq!(report.applied, 1);
    let after = ipvs.sent_messages().await;
    let delta: u64 = after.iter().map(|(op, n)| n - before.get(op).copied().unwrap_or(0)).sum();
    assert_eq!(delta, 1);
    assert_eq!(after[&Operation::AddDestination] - before[&Operation::AddDestination], 1);
}

#[tokio::test]
async fn the_shadow_shares_the_desired_destinations_and_copies_them_to_change_them() {
    let (_, mut reconciler, mut table) = programmed(3).await;
    for (key, server) in &table {
        assert!(reconciler.shadow()[key].destinations.shared_with(&server.destinations), "{key}");
        assert!(Arc::ptr_eq(&reconciler.shadow()[key].service, &server.service), "{key}");
    }
    // The desired state moves on while the old one is still held (the join may hold it).
    let old = table.clone();
    let (key, grown) = server(2, &[addr("10.244.0.2:8080"), addr("10.244.0.3:8080")]);
    table.insert(key, grown);
    let report = reconciler.sync(&table, Servers::Only(&BTreeSet::from([key]))).await;
    assert_eq!(report.applied, 1);
    assert_eq!(old[&key].destinations.len(), 1, "the old desired destinations are untouched");
    assert_eq!(reconciler.shadow()[&key].destinations.len(), 2);
    assert!(reconciler.shadow()[&key].destinations.shared_with(&table[&key].destinations));

    // A new scheduler: the shadow records the service the kernel accepted, then shares the
    // desired one again.
    let mut changed = table[&key].clone();
    Arc::make_mut(&mut changed).service = VirtualService::new(key, "lc").into();
    table.insert(key, changed);
    let report = reconciler.sync(&table, Servers::Only(&BTreeSet::from([key]))).await;
    assert_eq!(report.applied, 1);
    assert_eq!(reconciler.shadow()[&key].service.scheduler, "lc");
    assert!(Arc::ptr_eq(&reconciler.shadow()[&key].service, &table[&key].service));
}

#[tokio::test]
async fn drift_is_found_and_healed() {
    let (_, mut reconciler, table) = programmed(5).await;
    let programmed = ipvsadm(&["-Ln"]);

    // Someone clears the table, and adds a destination by hand.
    ipvsadm(&["-C"]);
    ipvsadm(&["-A", "-t", "10.96.0.10:1", "-s", "rr"]);
    ipvsadm(&["-a", "-t", "10.96.0.10:1", "-r", "10.244.9.9:80", "-m"]);
    let drift = reconciler.full_check(&owned).await.unwrap();
    assert_eq!(drift.servers.len(), 5);
    let report = reconciler.sync(&table, Servers::All).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // The stranger destination is drained first (it might carry connections): it has none.
    assert_eq!(
        reconciler.drain().await.unwrap(),
        [(ServiceKey::tcp(addr("10.96.0.10:1")), addr("10.244.9.9:80"))]
    );
    assert_eq!(ipvsadm(&["-Ln"]), programmed, "healed");
    assert!(reconciler.full_check(&owned).await.unwrap().servers.is_empty());
}

#[tokio::test]
async fn a_check_whose_dump_is_older_than_a_sync_leaves_what_the_sync_wrote_alone() {
    let (_, mut reconciler, mut table) = programmed(3).await;

    // The check's dump is taken; then a sync changes one virtual server and adds another
    // before the check ends, and someone clears a third by hand.
    let dump = read_digests(&reconciler.begin_check()).await.unwrap();
    let (changed, _) = server(1, &[]);
    table.insert(changed, server(1, &[addr("10.244.0.3:8080")]).1);
    let (added, added_server) = server(4, &[addr("10.244.0.2:8080")]);
    table.insert(added, added_server);
    reconciler.sync(&table, Servers::Only(&BTreeSet::from([changed, added]))).await;
    ipvsadm(&["-D", "-t", "10.96.0.10:3"]);

    // The dump is older than the sync for those two: they are not drift, and their shadow
    // stays as the sync left it. The cleared one was not written since: drift, healed.
    let drift = reconciler.finish_check(dump, &owned).await;
    assert!(drift.servers.is_empty(), "the third went after the dump: {:?}", drift.servers);
    let report = reconciler.sync(&table, Servers::All).await;
    assert_eq!(report.applied, 0, "nothing written again for the two the sync wrote");
    let drift = reconciler.full_check(&owned).await.unwrap();
    assert_eq!(drift.servers, [ServiceKey::tcp(addr("10.96.0.10:3"))]);
    reconciler.sync(&table, Servers::All).await;
    assert!(reconciler.full_check(&owned).await.unwrap().servers.is_empty(), "all healed");
}

#[tokio::test]
async fn a_removed_endpoint_drains_while_a_connection_is_open_and_goes_when_it_closes() {
    let pods = [Pod::new(1), Pod::new(2)];
    for pod in &pods {
        pod.serve_tcp_held(8080);
    }
    bind_vip(VIP.into());
    let ipvs = IpvsHandle::new().unwrap();
    let mut reconciler =
        Reconciler::adopt(ipvs.clone(), &owned, Duration::from_secs(600)).await.unwrap();
    let (key, both) = server(80, &[pods[0].addr(8080), pods[1].addr(8080)]);
    reconciler.sync(&desired(vec![(key, both)]), Servers::All).await;

    // Hold a connection to pod1.
    let vip = SocketAddr::from((VIP, 80));
    let held = loop {
        let mut stream = TcpStream::connect(vip).unwrap();
        if read_name(&mut stream) == "pod1" {
            break stream;
        }
    };

    // pod1's endpoint goes away: weight 0, kept while the connection lives.
    let (key, only_pod2) = server(80, &[pods[1].addr(8080)]);
    reconciler.sync(&desired(vec![(key, only_pod2)]), Servers::All).await;
    let listed = ipvsadm(&["-Ln"]);
    assert!(listed.contains("  -> 10.244.1.2:8080              Masq    0      1"), "{listed}");
    assert!(reconciler.drain().await.unwrap().is_empty(), "still in use");
    for _ in 0..4 {
        assert_eq!(greeting(vip), "pod2", "no new connection to a draining pod");
    }

    // The connection ends (reset, so IPVS forgets it quickly): the destination goes.
    socket2::SockRef::from(&held).set_linger(Some(Duration::ZERO)).unwrap();
    drop(held);
    let mut deleted = Vec::new();
    for _ in 0..60 {
        deleted = reconciler.drain().await.unwrap();
        if !deleted.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(deleted, [(key, pods[0].addr(8080))]);
    assert!(!ipvsadm(&["-Ln"]).contains("10.244.1.2:8080"));
}

#[tokio::test]
async fn a_draining_endpoint_goes_when_the_bound_elapses_even_if_in_use() {
    let pod = Pod::new(1);
    pod.serve_tcp_held(8080);
    bind_vip(VIP.into());
    let ipvs = IpvsHandle::new().unwrap();
    let mut reconciler =
        Reconciler::adopt(ipvs.clone(), &owned, Duration::from_secs(2)).await.unwrap();
    let (key, with_pod) = server(80, &[pod.addr(8080)]);
    reconciler.sync(&desired(vec![(key, with_pod)]), Servers::All).await;
    let _held = TcpStream::connect(SocketAddr::from((VIP, 80))).unwrap();
    let (key, empty) = server(80, &[]);
    reconciler.sync(&desired(vec![(key, empty)]), Servers::All).await;
    assert!(reconciler.drain().await.unwrap().is_empty(), "within the bound");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reconciler.drain().await.unwrap(), [(key, pod.addr(8080))]);

    // And a returning endpoint gets its weight back instead.
    let (key, back) = server(80, &[pod.addr(8080)]);
    reconciler.sync(&desired(vec![(key, back.clone())]), Servers::All).await;
    let (_, gone) = server(80, &[]);
    reconciler.sync(&desired(vec![(key, gone)]), Servers::All).await;
    reconciler.sync(&desired(vec![(key, back)]), Servers::All).await;
    assert!(ipvsadm(&["-Ln"]).contains("  -> 10.244.1.2:8080              Masq    1"));
    assert_eq!(reconciler.draining().count(), 0);
}

#[tokio::test]
async fn a_removed_udp_endpoint_goes_at_once_with_its_conntrack_flows() {
    let pods = [Pod::new(1), Pod::new(2)];
    for pod in &pods {
        pod.serve_udp(5353);
    }
    let client = Pod::new(3);
    bind_vip(VIP.into());
    sysctl_settings::apply(&sysctl_settings::plan(
        Default::default(),
        sysctl_settings::KernelVersion::running().unwrap(),
    ))
    .unwrap();
    // The node's table: with its NAT chains, conntrack tracks the node's traffic.
    let mut table = netfilter::Netfilter::new(netfilter::Config {
        cluster_cidrs: vec![vm_tests::CLUSTER_CIDR.parse().unwrap()],
        ..netfilter::Config::default()
    });
    table.install(&netfilter::Elements::default()).await.unwrap();
    let ipvs = IpvsHandle::new().unwrap();
    let mut reconciler = Reconciler::adopt(ipvs, &owned, Duration::from_secs(600)).await.unwrap();
    let service = SocketAddr::from((VIP, 53));
    let key = ServiceKey::udp(service);
    let dns = |destinations: &[SocketAddr]| {
        let (_, mut server) = server(53, destinations);
        Arc::make_mut(&mut server).service = VirtualService::new(key, "rr").into();
        desired(vec![(key, server)])
    };
    reconciler.sync(&dns(&[pods[0].addr(5353), pods[1].addr(5353)]), Servers::All).await;

    // A client that keeps one source port, as resolvers do.
    let socket = client.netns.run(|| std::net::UdpSocket::bind("0.0.0.0:40000").unwrap());
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Who answers this client port (`None`: nobody, within the time-out).
    let ask = || {
        socket.send_to(b"who", service).unwrap();
        let mut buf = [0; 64];
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).split(' ').next()?.to_owned())
    };
    let first = ask().expect("an answer");
    let (gone, other) = if first == "pod1" { (&pods[0], &pods[1]) } else { (&pods[1], &pods[0]) };
    // A second client port, scheduled to the other endpoint (round robin).
    let second = client.netns.run(|| std::net::UdpSocket::bind("0.0.0.0:40001").unwrap());
    second.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    second.send_to(b"who", service).unwrap();
    let mut buf = [0; 64];
    let (n, _) = second.recv_from(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with(&other.name));
    let flows = conntrack::udp_flows(VIP.into()).unwrap();
    assert!(flows.iter().any(|f| conntrack::is_stale(f, service, gone.addr(5353))), "{flows:?}");
    assert!(flows.iter().any(|f| conntrack::is_stale(f, service, other.addr(5353))), "{flows:?}");

    // The kernel answers the filtered dump with that endpoint's flow only.
    let to_gone = conntrack::udp_flows_to(service, gone.addr(5353)).unwrap();
    assert_eq!(to_gone.len(), 1, "{to_gone:?}");
    assert!(conntrack::is_stale(&to_gone[0], service, gone.addr(5353)), "{to_gone:?}");

    // Its endpoint goes: deleted at once (UDP does not drain). With expire_nodest_conn=0 the
    // kernel keeps the flows of a removed destination, so whatever goes, kube-ipvs deleted:
    // the gone endpoint's flow, and nothing else.
    sh("sysctl", &["-qw", "net.ipv4.vs.expire_nodest_conn=0"]);
    let report = reconciler.sync(&dns(&[other.addr(5353)]), Servers::All).await;
    assert_eq!((report.applied, report.failed.len()), (1, 0));
    assert_eq!(report.stale_flows_deleted, 1, "{report:?}");
    assert!(reconciler.draining().next().is_none());
    let flows = conntrack::udp_flows(VIP.into()).unwrap();
    assert!(!flows.iter().any(|f| conntrack::is_stale(f, service, gone.addr(5353))), "{flows:?}");
    assert!(flows.iter().any(|f| conntrack::is_stale(f, service, other.addr(5353))), "{flows:?}");
    // With the kernel expiring IPVS connections to removed destinations again, the same
    // client port is answered by the remaining endpoint.
    sh("sysctl", &["-qw", "net.ipv4.vs.expire_nodest_conn=1"]);
    let mut answered = None;
    for _ in 0..3 {
        answered = ask();
        if answered.as_ref() == Some(&other.name) {
            break;
        }
    }
    assert_eq!(answered.as_ref(), Some(&other.name));
}

#[tokio::test]
async fn a_failed_change_is_read_back_and_tried_again_from_the_kernels_state() {
    let ipvs = IpvsHandle::new().unwrap();
    let mut reconciler = Reconciler::adopt(ipvs, &owned, Duration::from_secs(60)).await.unwrap();
    reconciler.sync(&desired(vec![server(1, &[addr("10.244.0.2:8080")])]), Servers::All).await;
    // Someone deletes the virtual server; the shadow does not know.
    ipvsadm(&["-D", "-t", "10.96.0.10:1"]);
    let report = reconciler
        .sync(
            &desired(vec![server(1, &[addr("10.244.0.2:8080"), addr("10.244.0.3:8080")])]),
            Servers::All,
        )
        .await;
    // Adding the destination failed (no such service); read back, the whole server was added.
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(matches!(report.failed[0], ipvs_netlink::Error::NoSuchService { .. }));
    assert_eq!(report.retried, 3, "the service and its two destinations");
    let listed = ipvsadm(&["-Ln"]);
    assert!(listed.contains("10.244.0.2:8080") && listed.contains("10.244.0.3:8080"), "{listed}");
}
