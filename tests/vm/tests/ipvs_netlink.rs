//! `ipvs-netlink` against the real kernel: every operation, every error, real traffic.
//!
//! Each test runs in its own network namespace, so each starts with an empty IPVS table.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use ipvs_netlink::{
    Change, Destination, Error, Family, ForwardMethod, IpvsHandle, Netmask, ServiceFlags,
    ServiceKey, Timeouts, TunnelChecksum, TunnelType, VirtualService,
};
use vm_tests::{Pod, bind_vip, sh, tcp_ask};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn tcp(s: &str) -> ServiceKey {
    ServiceKey::tcp(addr(s))
}

#[tokio::test]
async fn info_matches_proc() {
    let ipvs = IpvsHandle::new().unwrap();
    let info = ipvs.info().await.unwrap();
    let proc = std::fs::read_to_string("/proc/net/ip_vs").unwrap();
    let expected = format!(
        "IP Virtual Server version {} (size={})",
        info.version_string(),
        info.connection_table_size
    );
    assert_eq!(proc.lines().next().unwrap(), expected);
}

#[tokio::test]
async fn ipv4_service_lifecycle() {
    let ipvs = IpvsHandle::new().unwrap();
    let key = tcp("10.96.0.10:80");
    let service = VirtualService::new(key, "rr");
    ipvs.add_service(&service).await.unwrap();

    let got = ipvs.get_service(&key).await.unwrap();
    assert_eq!(got.service.key, key);
    assert_eq!(got.service.scheduler, "rr");
    assert_eq!(got.service.flags, ServiceFlags::HASHED, "the kernel adds HASHED");
    assert_eq!(got.service.netmask, Netmask::Ipv4(Ipv4Addr::BROADCAST));
    assert!(got.service.same_config(&service));
    assert_eq!(got.counters().connections, 0);
    assert!(got.stats.is_some() && got.stats64.is_some());

    let err = ipvs.add_service(&service).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert_eq!(err.target().service, Some(key));

    let changed = VirtualService::new(key, "wrr").persistent(300);
    ipvs.update_service(&changed).await.unwrap();
    let got = ipvs.get_service(&key).await.unwrap();
    assert!(got.service.same_config(&changed), "{got:?}");
    assert_eq!(got.service.flags, ServiceFlags::PERSISTENT | ServiceFlags::HASHED);
    assert_eq!(got.service.timeout, 300);

    let listed = ipvs.list_services().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].service.same_config(&changed));

    ipvs.delete_service(&key).await.unwrap();
    for err in [
        ipvs.get_service(&key).await.unwrap_err(),
        ipvs.delete_service(&key).await.unwrap_err(),
        ipvs.update_service(&changed).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::NoSuchService { .. }), "{err}");
    }
    assert!(ipvs.list_services().await.unwrap().is_empty());
}

#[tokio::test]
async fn ipv6_service_lifecycle() {
    let ipvs = IpvsHandle::new().unwrap();
    let key = tcp("[fd00:10:96::10]:443");
    let service = VirtualService::new(key, "rr");
    assert_eq!(service.netmask, Netmask::Ipv6(128));
    ipvs.add_service(&service).await.unwrap();
    let got = ipvs.get_service(&key).await.unwrap();
    assert!(got.service.same_config(&service), "{got:?}");
    assert_eq!(got.service.key.family(), Family::Ipv6);

    let affinity = VirtualService::new(key, "sh").persistent(600).with_netmask(Netmask::Ipv6(64));
    ipvs.update_service(&affinity).await.unwrap();
    assert!(ipvs.get_service(&key).await.unwrap().service.same_config(&affinity));

    // The kernel wants an IPv6 prefix length of 1 to 128.
    let bad = VirtualService::new(tcp("[fd00:10:96::11]:443"), "rr").with_netmask(Netmask::Ipv6(0));
    let err = ipvs.add_service(&bad).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");

    ipvs.delete_service(&key).await.unwrap();
}

#[tokio::test]
async fn fwmark_services_in_both_families() {
    let ipvs = IpvsHandle::new().unwrap();
    let v4 = ServiceKey::Fwmark { family: Family::Ipv4, mark: 7 };
    let v6 = ServiceKey::Fwmark { family: Family::Ipv6, mark: 7 };
    ipvs.add_service(&VirtualService::new(v4, "wlc")).await.unwrap();
    ipvs.add_service(&VirtualService::new(v6, "lc").persistent(360)).await.unwrap();
    ipvs.add_destination(&v4, &Destination::new(addr("10.244.2.2:8080"))).await.unwrap();
    ipvs.add_destination(&v6, &Destination::new(addr("[fd00:10:244::2]:8080"))).await.unwrap();

    let keys: BTreeSet<ServiceKey> =
        ipvs.list_services().await.unwrap().into_iter().map(|s| s.service.key).collect();
    assert_eq!(keys, BTreeSet::from([v4, v6]));
    let got = ipvs.get_service(&v6).await.unwrap();
    assert_eq!(got.service.scheduler, "lc");
    assert_eq!(got.service.timeout, 360);
    let dests = ipvs.list_destinations(&v6).await.unwrap();
    assert_eq!(dests[0].destination.address, addr("[fd00:10:244::2]:8080"));

    ipvs.delete_service(&v4).await.unwrap();
    assert!(matches!(ipvs.get_service(&v4).await, Err(Error::NoSuchService { .. })));
    assert!(ipvs.get_service(&v6).await.is_ok(), "the other family is a different service");
}

#[tokio::test]
async fn every_scheduler_is_accepted() {
    let ipvs = IpvsHandle::new().unwrap();
    let schedulers = ["rr", "wrr", "lc", "wlc", "dh", "sh", "sed", "nq", "mh"];
    for (i, scheduler) in schedulers.iter().enumerate() {
        let key = tcp(&format!("10.96.1.{}:80", i + 1));
        ipvs.add_service(&VirtualService::new(key, *scheduler)).await.unwrap();
        assert_eq!(ipvs.get_service(&key).await.unwrap().service.scheduler, *scheduler);
    }
    assert_eq!(ipvs.list_services().await.unwrap().len(), schedulers.len());
}

#[tokio::test]
async fn an_unknown_scheduler_is_reported_by_name() {
    let ipvs = IpvsHandle::new().unwrap();
    let key = tcp("10.96.0.10:80");
    let err = ipvs.add_service(&VirtualService::new(key, "nosuch")).await.unwrap_err();
    match &err {
        Error::UnknownScheduler { scheduler, target } => {
            assert_eq!(scheduler, "nosuch");
            assert_eq!(target.service, Some(key));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("nosuch"), "{err}");
    // Changing an existing service to an unknown scheduler fails the same way.
    ipvs.add_service(&VirtualService::new(key, "rr")).await.unwrap();
    let err = ipvs.update_service(&VirtualService::new(key, "nosuch")).await.unwrap_err();
    assert!(matches!(err, Error::UnknownScheduler { .. }), "{err}");
}

#[tokio::test]
async fn scheduler_flags_one_packet_netmask_and_persistence_engine() {
    let ipvs = IpvsHandle::new().unwrap();
    let services = [
        VirtualService::new(tcp("10.96.0.1:443"), "sh")
            .with_flags(ServiceFlags::SH_FALLBACK | ServiceFlags::SH_PORT),
        VirtualService::new(ServiceKey::udp(addr("10.96.0.53:53")), "mh").with_flags(
            ServiceFlags::MH_FALLBACK | ServiceFlags::MH_PORT | ServiceFlags::ONE_PACKET,
        ),
        VirtualService::new(tcp("10.96.0.2:80"), "rr")
            .persistent(600)
            .with_netmask(Netmask::Ipv4("255.255.255.0".parse().unwrap())),
        VirtualService::new(ServiceKey::udp(addr("10.96.0.54:5060")), "rr")
            .persistent(60)
            .with_persistence_engine("sip"),
        VirtualService::new(ServiceKey::sctp(addr("10.96.0.99:3868")), "nq"),
    ];
    for service in &services {
        ipvs.add_service(service).await.unwrap();
        let got = ipvs.get_service(&service.key).await.unwrap();
        assert!(got.service.same_config(service), "wanted {service:?}, got {got:?}");
        assert_eq!(got.service.flags, service.flags_in_kernel());
    }
}

#[tokio::test]
async fn destination_lifecycle_and_errors() {
    let ipvs = IpvsHandle::new().unwrap();
    let key = tcp("10.96.0.10:80");
    let missing = tcp("10.96.0.11:80");
    ipvs.add_service(&VirtualService::new(key, "wrr")).await.unwrap();

    let a = Destination::new(addr("10.244.1.5:8080"));
    let b = Destination::new(addr("10.244.1.6:8080")).with_weight(3).with_thresholds(10, 100);
    ipvs.add_destination(&key, &a).await.unwrap();
    ipvs.add_destination(&key, &b).await.unwrap();

    let mut listed = ipvs.list_destinations(&key).await.unwrap();
    listed.sort_by_key(|d| d.destination.address);
    assert_eq!(listed.len(), 2);
    assert!(listed[0].destination.same_config(&a), "{listed:?}");
    assert!(listed[1].destination.same_config(&b), "{listed:?}");
    assert_eq!(listed[1].destination.upper_threshold, 100);
    assert_eq!(listed[1].destination.lower_threshold, 10);
    assert_eq!(listed[0].active_connections + listed[0].inactive_connections, 0);

    // Drain: weight 0, then delete.
    ipvs.update_destination(&key, &a.with_weight(0)).await.unwrap();
    let got = ipvs.list_destinations(&key).await.unwrap();
    assert_eq!(
        got.iter().find(|d| d.destination.address == a.address).unwrap().destination.weight,
        0
    );
    ipvs.delete_destination(&key, a.address).await.unwrap();
    assert_eq!(ipvs.list_destinations(&key).await.unwrap().len(), 1);

    let err = ipvs.add_destination(&key, &b).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert_eq!(err.target().destination, Some(b.address));
    for err in [
        ipvs.update_destination(&key, &a).await.unwrap_err(),
        ipvs.delete_destination(&key, a.address).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::NoSuchDestination { .. }), "{err}");
    }
    for err in [
        ipvs.add_destination(&missing, &a).await.unwrap_err(),
        ipvs.update_destination(&missing, &a).await.unwrap_err(),
        ipvs.delete_destination(&missing, a.address).await.unwrap_err(),
        ipvs.list_destinations(&missing).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::NoSuchService { .. }), "{err}");
        assert_eq!(err.target().service, Some(missing));
    }
    // Lower threshold above the upper one.
    let err = ipvs
        .add_destination(&key, &Destination::new(addr("10.244.1.7:8080")).with_thresholds(100, 10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    // A weight above i32::MAX is negative to the kernel.
    let err = ipvs
        .add_destination(&key, &Destination::new(addr("10.244.1.8:8080")).with_weight(u32::MAX))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[tokio::test]
async fn every_forwarding_method_and_tunnel_type() {
    let ipvs = IpvsHandle::new().unwrap();
    let key = tcp("10.96.0.10:80");
    ipvs.add_service(&VirtualService::new(key, "rr")).await.unwrap();
    let wanted = [
        Destination::new(addr("10.244.1.1:8080")),
        Destination::new(addr("10.244.1.2:80")).with_forward(ForwardMethod::DirectRoute),
        Destination::new(addr("10.244.1.3:80")).with_forward(ForwardMethod::Bypass),
        Destination::new(addr("10.244.1.4:80")).with_tunnel(
            TunnelType::Ipip,
            0,
            TunnelChecksum::None,
        ),
        Destination::new(addr("10.244.1.5:80")).with_tunnel(
            TunnelType::Gue,
            6080,
            TunnelChecksum::Checksum,
        ),
        Destination::new(addr("10.244.1.6:80")).with_tunnel(
            TunnelType::Gre,
            0,
            TunnelChecksum::Remote,
        ),
        Destination::new(addr("10.244.1.7:80")).with_forward(ForwardMethod::Local),
    ];
    let results = ipvs
        .apply(&wanted.iter().map(|d| Change::AddDestination(key, *d)).collect::<Vec<_>>())
        .await;
    for (result, d) in results.iter().zip(&wanted) {
        assert!(result.is_ok(), "{d:?}: {result:?}");
    }
    let listed = ipvs.list_destinations(&key).await.unwrap();
    for d in &wanted {
        let got = listed.iter().find(|e| e.destination.address == d.address).unwrap();
        assert!(got.destination.same_config(d), "wanted {d:?}, got {:?}", got.destination);
    }

    // A destination of the other family needs a tunnel.
    let v6 = Destination::new(addr("[fd00:10:244::9]:80"));
    let err = ipvs.add_destination(&key, &v6).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    let v6_tunnel = v6.with_tunnel(TunnelType::Ipip, 0, TunnelChecksum::None);
    ipvs.add_destination(&key, &v6_tunnel).await.unwrap();
    let listed = ipvs.list_destinations(&key).await.unwrap();
    assert!(listed.iter().any(|e| e.destination.address == v6.address));

    // GUE needs a port.
    let err = ipvs
        .add_destination(
            &key,
            &Destination::new(addr("10.244.1.8:80")).with_tunnel(
                TunnelType::Gue,
                0,
                TunnelChecksum::None,
            ),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
}

#[tokio::test]
async fn timeouts_are_read_and_set() {
    let ipvs = IpvsHandle::new().unwrap();
    let before = ipvs.timeouts().await.unwrap();
    assert_eq!(before, Timeouts { tcp: 900, tcp_fin: 120, udp: 300 }, "kernel defaults");
    ipvs.set_timeouts(Timeouts { tcp: 3600, tcp_fin: 30, udp: 60 }).await.unwrap();
    assert_eq!(ipvs.timeouts().await.unwrap(), Timeouts { tcp: 3600, tcp_fin: 30, udp: 60 });
    // 0 leaves a value as it is.
    ipvs.set_timeouts(Timeouts { tcp: 0, tcp_fin: 0, udp: 90 }).await.unwrap();
    assert_eq!(ipvs.timeouts().await.unwrap(), Timeouts { tcp: 3600, tcp_fin: 30, udp: 90 });
    assert_eq!(sh("ipvsadm", &["-Ln", "--timeout"]).trim(), "Timeout (tcp tcpfin udp): 3600 30 90");
}

#[tokio::test]
async fn counters_follow_real_traffic_and_are_zeroed() {
    let ipvs = IpvsHandle::new().unwrap();
    let pod = Pod::new(1);
    pod.serve_tcp(8080);
    let vip = addr("10.96.0.10:80");
    bind_vip(vip.ip());
    let key = ServiceKey::tcp(vip);
    let other = tcp("10.96.0.11:80");
    ipvs.add_service(&VirtualService::new(key, "rr")).await.unwrap();
    ipvs.add_service(&VirtualService::new(other, "rr")).await.unwrap();
    ipvs.add_destination(&key, &Destination::new(pod.addr(8080))).await.unwrap();

    for _ in 0..3 {
        assert_eq!(tcp_ask(vip).unwrap().from, "pod1", "the VIP reaches the pod");
    }
    // The kernel sums its per-CPU counters on the estimator's 2-second tick.
    let service = wait_for_connections(&ipvs, &key, 3).await;
    let counters = service.counters();
    assert_eq!(counters.connections, 3);
    assert!(counters.in_packets >= 9 && counters.out_packets >= 6, "{counters:?}");
    assert!(counters.in_bytes > 0 && counters.out_bytes > 0, "{counters:?}");
    let stats32 = service.stats.unwrap();
    assert_eq!(stats32.connections, counters.connections, "32- and 64-bit blocks agree");
    let dest = ipvs.list_destinations(&key).await.unwrap()[0];
    assert_eq!(dest.counters().connections, 3);
    assert!(dest.active_connections + dest.inactive_connections > 0, "{dest:?}");

    ipvs.zero(Some(&key)).await.unwrap();
    assert_eq!(ipvs.get_service(&key).await.unwrap().counters().connections, 0);
    tcp_ask(vip).unwrap();
    wait_for_connections(&ipvs, &key, 1).await;
    ipvs.zero(None).await.unwrap();
    assert_eq!(ipvs.get_service(&key).await.unwrap().counters().connections, 0);

    let err = ipvs.zero(Some(&tcp("10.96.0.12:80"))).await.unwrap_err();
    assert!(matches!(err, Error::NoSuchService { .. }), "{err}");
}

/// Polls a service until its counters show `connections`.
async fn wait_for_connections(
    ipvs: &IpvsHandle,
    key: &ServiceKey,
    connections: u64,
) -> ipvs_netlink::ServiceEntry {
    for _ in 0..100 {
        let entry = ipvs.get_service(key).await.unwrap();
        if entry.counters().connections == connections {
            return entry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{key} never counted {connections} connections: {:?}", ipvs.get_service(key).await);
}

#[tokio::test]
async fn flush_removes_every_service() {
    let ipvs = IpvsHandle::new().unwrap();
    for i in 1..=5 {
        let key = tcp(&format!("10.96.0.{i}:80"));
        ipvs.add_service(&VirtualService::new(key, "rr")).await.unwrap();
        ipvs.add_destination(&key, &Destination::new(addr("10.244.1.1:80"))).await.unwrap();
    }
    assert_eq!(ipvs.list_services().await.unwrap().len(), 5);
    ipvs.flush().await.unwrap();
    assert!(ipvs.list_services().await.unwrap().is_empty());
}

#[test]
fn permission_is_denied_without_cap_net_admin() {
    // Capabilities are per thread: drop CAP_NET_ADMIN on this one and open the socket here.
    caps::drop(None, caps::CapSet::Effective, caps::Capability::CAP_NET_ADMIN).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let ipvs = IpvsHandle::new().unwrap();
        let err = ipvs.list_services().await.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
        let key = tcp("10.96.0.10:80");
        let err = ipvs.add_service(&VirtualService::new(key, "rr")).await.unwrap_err();
        assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
        assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
    });
}

/// The IPVS modules, dependants first.
const IPVS_MODULES: &[&str] = &[
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_dh",
    "ip_vs_sh",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_mh",
    "ip_vs_pe_sip",
    "ip_vs",
];

fn unload_ipvs() {
    // Namespaces of earlier tests may take a moment to go away and release the module.
    for _ in 0..100 {
        // Whatever else uses ip_vs goes first (xt_ipvs, loaded by kube-proxy's replayed rules
        // in the cluster test).
        let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
        let users = modules
            .lines()
            .find(|l| l.starts_with("ip_vs "))
            .and_then(|l| l.split_whitespace().nth(3))
            .unwrap_or_default();
        let others = users.split(',').filter(|m| !m.is_empty() && *m != "-");
        for module in others.chain(IPVS_MODULES.iter().copied()) {
            let _ = std::process::Command::new("rmmod").arg(module).output();
        }
        if !std::path::Path::new("/sys/module/ip_vs").exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("ip_vs stays loaded: {}", std::fs::read_to_string("/proc/modules").unwrap());
}

fn load_ipvs() {
    for module in IPVS_MODULES.iter().rev() {
        sh("modprobe", &[module]);
    }
}

/// Stops the kernel from loading modules on demand until dropped.
struct NoModuleLoading(String);

impl NoModuleLoading {
    fn new() -> Self {
        let helper = std::fs::read_to_string("/proc/sys/kernel/modprobe").unwrap();
        std::fs::write("/proc/sys/kernel/modprobe", "/bin/false").unwrap();
        Self(helper.trim().to_owned())
    }
}

impl Drop for NoModuleLoading {
    fn drop(&mut self) {
        std::fs::write("/proc/sys/kernel/modprobe", &self.0).unwrap();
    }
}

#[tokio::test]
async fn ipvs_missing_then_loaded_then_reloaded() {
    let no_loading = NoModuleLoading::new();
    unload_ipvs();
    let ipvs = IpvsHandle::new().expect("a handle opens without IPVS");
    let err = ipvs.info().await.unwrap_err();
    assert!(matches!(err, Error::IpvsUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("ip_vs"), "{err}");
    let results = ipvs.apply(&[Change::DeleteService(tcp("10.96.0.1:80"))]).await;
    assert!(matches!(results[0], Err(Error::IpvsUnavailable { .. })), "{results:?}");

    // With module loading allowed again, looking the family up loads ip_vs on demand.
    drop(no_loading);
    ipvs.info().await.expect("the family is resolved once IPVS can be loaded");
    assert!(std::path::Path::new("/sys/module/ip_vs").exists());
    let key = tcp("10.96.0.10:80");
    ipvs.add_service(&VirtualService::new(key, "rr")).await.unwrap();

    // Reloading the module gives the family a new id; the handle follows it.
    ipvs.flush().await.unwrap();
    unload_ipvs();
    load_ipvs();
    ipvs.add_service(&VirtualService::new(key, "rr"))
        .await
        .expect("the stale family id is replaced");
    let results =
        ipvs.apply(&[Change::AddDestination(key, Destination::new(addr("10.244.1.1:80")))]).await;
    assert!(results[0].is_ok(), "{results:?}");
}

#[tokio::test]
async fn a_batch_of_1000_changes_with_failures_in_the_middle() {
    let ipvs = IpvsHandle::new().unwrap();
    let key = |i: usize| tcp(&format!("10.96.{}.{}:80", i / 200, i % 200 + 1));
    let dest = |j: usize| Destination::new(SocketAddr::from(([10, 244, 0, j as u8 + 1], 8080)));
    // 100 services with 9 destinations each: 1,000 changes.
    let mut changes = Vec::new();
    for i in 0..100 {
        changes.push(Change::AddService(VirtualService::new(key(i), "rr")));
        changes.extend((0..9).map(|j| Change::AddDestination(key(i), dest(j))));
    }
    assert_eq!(changes.len(), 1000);
    // Deliberate failures, each in place of a destination.
    changes[305] = Change::AddService(VirtualService::new(key(30), "rr")); // exists
    changes[501] = Change::AddDestination(tcp("10.99.0.1:80"), dest(0)); // no such service
    changes[702] = Change::DeleteDestination(key(70), addr("10.244.9.9:80")); // no such destination
    changes[803] = Change::AddService(VirtualService::new(tcp("10.98.0.1:80"), "nosuch")); // scheduler
    changes[904] = Change::AddDestination(key(90), dest(0)); // exists

    ipvs.set_window(64).await;
    let results = ipvs.apply(&changes).await;
    assert_eq!(results.len(), 1000);
    for (i, result) in results.iter().enumerate() {
        match i {
            305 | 904 => {
                assert!(matches!(result, Err(Error::AlreadyExists { .. })), "{i}: {result:?}")
            }
            501 => assert!(matches!(result, Err(Error::NoSuchService { .. })), "{i}: {result:?}"),
            702 => {
                assert!(matches!(result, Err(Error::NoSuchDestination { .. })), "{i}: {result:?}")
            }
            803 => {
                assert!(matches!(result, Err(Error::UnknownScheduler { .. })), "{i}: {result:?}")
            }
            _ => assert!(result.is_ok(), "{i}: {result:?}"),
        }
        if let Err(err) = result {
            assert_eq!(err.target(), &changes[i].target(), "errors name their change");
        }
    }

    let table = ipvs.dump().await.unwrap();
    assert_eq!(table.len(), 100);
    let destinations: usize = table.iter().map(|(_, d)| d.len()).sum();
    // Each deliberate failure took the place of one destination.
    assert_eq!(destinations, 900 - 5);
    let sent = ipvs.sent_messages().await;
    assert_eq!(
        sent.values().sum::<u64>(),
        1000 + 101,
        "1000 changes, 1 dump of services, 100 of destinations"
    );
}

#[tokio::test]
async fn a_large_dump_spans_many_datagrams_and_is_complete() {
    let ipvs = IpvsHandle::new().unwrap();
    let mut changes = Vec::new();
    for i in 0..3000u32 {
        let key = ServiceKey::tcp(SocketAddr::from((
            [10, 96, (i / 250) as u8, (i % 250) as u8 + 1],
            443,
        )));
        changes.push(Change::AddService(VirtualService::new(key, "rr")));
        changes.push(Change::AddDestination(
            key,
            Destination::new(SocketAddr::from(([10, 244, 1, 1], 8443))),
        ));
    }
    assert!(ipvs.apply(&changes).await.iter().all(Result::is_ok));
    let services = ipvs.list_services().await.unwrap();
    assert_eq!(services.len(), 3000);
    let unique: BTreeSet<ServiceKey> = services.iter().map(|s| s.service.key).collect();
    assert_eq!(unique.len(), 3000, "no service twice");

    // Read in one-page parts (each datagram peeked for its size), the same table comes back.
    let small = IpvsHandle::with_small_dump_parts().unwrap();
    let table = |dump: Vec<(ipvs_netlink::ServiceEntry, Vec<ipvs_netlink::DestinationEntry>)>| {
        dump.into_iter()
            .map(|(s, d)| (s.service, d.into_iter().map(|d| d.destination).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    };
    let in_small_parts = table(small.dump().await.unwrap());
    assert_eq!(in_small_parts.len(), 3000);
    assert_eq!(in_small_parts, table(ipvs.dump().await.unwrap()));
}

#[tokio::test]
async fn a_window_too_large_for_one_sendmsg_fails_as_io_and_applies_nothing() {
    let ipvs = IpvsHandle::new().unwrap();
    let changes: Vec<Change> = (0..3000u32)
        .map(|i| {
            let vip = SocketAddr::from(([10, 96, (i / 250) as u8, (i % 250) as u8 + 1], 80));
            Change::AddService(VirtualService::new(ServiceKey::tcp(vip), "rr"))
        })
        .collect();
    // 3,000 messages in one sendmsg exceed the socket's send buffer: EMSGSIZE.
    ipvs.set_window(100_000).await;
    let results = ipvs.apply(&changes).await;
    for (result, change) in results.iter().zip(&changes) {
        match result {
            Err(err @ Error::Io { target, .. }) => assert_eq!(*target, change.target(), "{err}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(ipvs.list_services().await.unwrap().is_empty(), "nothing was half applied");
    ipvs.set_window(128).await;
    assert!(ipvs.apply(&changes).await.iter().all(Result::is_ok));
    assert_eq!(ipvs.list_services().await.unwrap().len(), 3000);
}
