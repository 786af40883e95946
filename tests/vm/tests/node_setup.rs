//! `dummy-link` and `sysctl-settings` against the real kernel.

use std::{collections::BTreeSet, net::IpAddr};

use dummy_link::{DummyLink, Error, KUBE_IPVS0};
use vm_tests::sh;

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[tokio::test]
async fn the_link_is_created_down_and_found_again() {
    let handle = dummy_link::connect().unwrap();
    assert!(DummyLink::find(handle.clone(), KUBE_IPVS0).await.unwrap().is_none());
    let link = DummyLink::ensure(handle.clone(), KUBE_IPVS0).await.unwrap();
    let shown = sh("ip", &["-d", "link", "show", KUBE_IPVS0]);
    assert!(shown.contains("state DOWN") && shown.contains("dummy"), "{shown}");
    let again = DummyLink::ensure(handle.clone(), KUBE_IPVS0).await.unwrap();
    assert_eq!(again.index(), link.index(), "the existing link is reused");
    link.delete().await.unwrap();
    assert!(DummyLink::find(handle.clone(), KUBE_IPVS0).await.unwrap().is_none());
    assert!(!dummy_link::delete_if_present(handle, KUBE_IPVS0).await.unwrap());
}

#[tokio::test]
async fn a_link_of_another_kind_is_left_alone() {
    sh("ip", &["link", "add", KUBE_IPVS0, "type", "veth", "peer", "name", "peer0"]);
    let err = DummyLink::ensure(dummy_link::connect().unwrap(), KUBE_IPVS0).await.unwrap_err();
    assert!(matches!(&err, Error::NotDummy { kind, .. } if kind == "veth"), "{err}");
    assert!(sh("ip", &["link", "show", KUBE_IPVS0]).contains("kube-ipvs0@peer0"));
}

#[tokio::test]
async fn addresses_are_synced_with_the_fewest_changes_and_nothing_else_is_touched() {
    let handle = dummy_link::connect().unwrap();
    // Another interface with addresses that must stay.
    sh("ip", &["link", "add", "other0", "type", "dummy"]);
    sh("ip", &["addr", "add", "10.96.0.1/32", "dev", "other0"]);
    sh("ip", &["addr", "add", "192.0.2.1/24", "dev", "lo"]);
    let link = DummyLink::ensure(handle, KUBE_IPVS0).await.unwrap();

    let first = ips(&["10.96.0.1", "10.96.0.2", "fd00:10:96::1"]);
    let report = link.sync(&first).await;
    assert!(report.is_complete(), "{:?}", report.failed);
    assert_eq!(report.added, first.iter().copied().collect::<Vec<_>>());
    assert!(report.removed.is_empty());
    assert_eq!(link.addresses().await.unwrap(), first);
    let shown = sh("ip", &["addr", "show", KUBE_IPVS0]);
    assert!(shown.contains("10.96.0.2/32") && shown.contains("fd00:10:96::1/128"), "{shown}");

    // One address less, one more: exactly one removal and one addition.
    let second = ips(&["10.96.0.1", "10.96.0.3", "fd00:10:96::1"]);
    let report = link.sync(&second).await;
    assert_eq!(report.added, [second.iter().nth(1).copied().unwrap()]);
    assert_eq!(report.removed, ["10.96.0.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(link.addresses().await.unwrap(), second);

    // Nothing to do: nothing done.
    let report = link.sync(&second).await;
    assert!(report.added.is_empty() && report.removed.is_empty());

    // Adding what is there and removing what is gone are not errors.
    assert!(!link.add_address("10.96.0.1".parse().unwrap()).await.unwrap());
    assert!(!link.remove_address("10.96.0.2".parse().unwrap(), 32).await.unwrap());

    // The other interfaces kept their addresses, 10.96.0.1 on other0 included.
    assert!(sh("ip", &["addr", "show", "other0"]).contains("10.96.0.1/32"));
    assert!(sh("ip", &["addr", "show", "lo"]).contains("192.0.2.1/24"));

    // Bound addresses are local: the kernel accepts traffic to them.
    let route = sh("ip", &["route", "get", "10.96.0.3"]);
    assert!(route.starts_with("local 10.96.0.3"), "{route}");
    assert!(link.sync(&BTreeSet::new()).await.is_complete());
    assert!(link.addresses().await.unwrap().is_empty());
}

#[test]
fn kernel_parameters_are_set_once_and_reported() {
    let kernel = sysctl_settings::KernelVersion::running().unwrap();
    let options = sysctl_settings::Options {
        strict_arp: true,
        localhost_node_ports: true,
        rate_estimation: Some(false),
    };
    let plan = sysctl_settings::plan(options, kernel);
    // A fresh network namespace starts with the kernel's defaults, which differ.
    let changes = sysctl_settings::apply(&plan).unwrap();
    let changed: BTreeSet<&str> = changes.iter().map(|c| c.name).collect();
    for name in ["net.ipv4.vs.conntrack", "net.ipv4.ip_forward", "net.ipv4.conf.all.arp_announce"] {
        assert!(changed.contains(name), "{name} in {changes:?}");
    }
    assert_eq!(sh("sysctl", &["-n", "net.ipv4.vs.conntrack"]).trim(), "1");
    assert_eq!(sh("sysctl", &["-n", "net.ipv4.conf.all.arp_ignore"]).trim(), "1");
    // Asked for: the rate estimator is off in this namespace (it exists from 5.16).
    if kernel >= (sysctl_settings::KernelVersion { major: 5, minor: 16 }) {
        assert!(changed.contains("net.ipv4.vs.run_estimation"), "{changes:?}");
        assert_eq!(sh("sysctl", &["-n", "net.ipv4.vs.run_estimation"]).trim(), "0");
    }
    // Kernel 5.9 and later fixed what conn_reuse_mode=0 worked around: left at its default.
    if kernel >= (sysctl_settings::KernelVersion { major: 5, minor: 9 }) {
        assert_eq!(sh("sysctl", &["-n", "net.ipv4.vs.conn_reuse_mode"]).trim(), "1");
    }
    assert!(sysctl_settings::apply(&plan).unwrap().is_empty(), "a second run changes nothing");
}
