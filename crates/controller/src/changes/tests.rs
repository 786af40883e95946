//! The change tracker: which Services a watch event makes dirty, and what a sync compares.

use std::net::SocketAddr;

use ipvs_netlink::ServiceKey;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

use super::*;

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        node_port_addresses: vec![],
        local_addresses: vec![],
    }
}

/// A ClusterIP Service `ns/<name>` on `ip`:80 -> 8080.
fn service(name: &str, ip: &str) -> Arc<ServiceInfo> {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    }))
    .unwrap();
    Arc::new(ServiceInfo::from(&service))
}

/// An EndpointSlice `ns/<name>` of the Service `of` (none: no label), with ready endpoints.
fn slice(name: &str, of: Option<&str>, addresses: &[&str]) -> Arc<Slice> {
    let labels = match of {
        Some(service) => json!({"kubernetes.io/service-name": service}),
        None => json!({}),
    };
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addresses.iter().map(|a| json!({
            "addresses": [a], "nodeName": "node-b", "conditions": {"ready": true}
        })).collect::<Vec<_>>()
    }))
    .unwrap();
    Arc::new(Slice::from(&slice))
}

/// A tracker with `services` and `slices` listed and computed once.
fn listed(services: &[Arc<ServiceInfo>], slices: &[Arc<Slice>]) -> ChangeTracker {
    let mut tracker = ChangeTracker::new(ProxyConfig::default());
    tracker.service(&Event::Init);
    for service in services {
        tracker.service(&Event::InitApply(service.clone()));
    }
    tracker.service(&Event::InitDone);
    assert!(!tracker.ready(), "not before the slices are listed too");
    tracker.slice(&Event::Init);
    for slice in slices {
        tracker.slice(&Event::InitApply(slice.clone()));
    }
    tracker.slice(&Event::InitDone);
    assert!(tracker.ready() && tracker.pending());
    assert_eq!(tracker.compute(&node()).scope, Scope::Everything, "the first sync compares all");
    assert!(!tracker.pending());
    tracker
}

fn destinations(tracker: &ChangeTracker, vip: &str) -> Vec<String> {
    let key = ServiceKey::Inet {
        protocol: ipvs_netlink::Protocol::Tcp,
        address: SocketAddr::new(vip.parse().unwrap(), 80),
    };
    let server = tracker.desired().virtual_servers.get(&key);
    server.map(|s| s.destinations.keys().map(ToString::to_string).collect()).unwrap_or_default()
}

fn changed_keys(computed: &Computed) -> usize {
    match &computed.scope {
        Scope::Changed(delta) => delta.keys.len(),
        Scope::Everything => panic!("expected a delta, not a comparison of everything"),
    }
}

fn name(name: &str) -> ServiceName {
    ServiceName::new("ns", name)
}

#[test]
fn a_burst_of_events_is_one_computation_of_the_services_it_touched() {
    let mut tracker = listed(
        &[service("a", "10.96.0.1"), service("b", "10.96.0.2"), service("c", "10.96.0.3")],
        &[slice("a-1", Some("a"), &["10.244.0.1"]), slice("b-1", Some("b"), &["10.244.0.2"])],
    );
    for address in ["10.244.0.10", "10.244.0.11", "10.244.0.12"] {
        tracker.slice(&Event::Apply(slice("a-1", Some("a"), &[address])));
    }
    tracker.slice(&Event::Apply(slice("b-1", Some("b"), &["10.244.0.20"])));
    assert_eq!(tracker.dirty(), 2, "three changes of a and one of b");
    let computed = tracker.compute(&node());
    assert_eq!(computed.services, 2, "c is not recomputed");
    assert_eq!(changed_keys(&computed), 2);
    assert_eq!(destinations(&tracker, "10.96.0.1"), ["10.244.0.12:8080"], "the last one wins");
    assert_eq!(destinations(&tracker, "10.96.0.2"), ["10.244.0.20:8080"]);
}

#[test]
fn events_are_taken_in_order() {
    let mut tracker = listed(&[service("a", "10.96.0.1")], &[]);
    // Deleted and created again within one burst: the endpoints stay.
    let a1 = slice("a-1", Some("a"), &["10.244.0.1"]);
    tracker.slice(&Event::Apply(a1.clone()));
    tracker.slice(&Event::Delete(a1.clone()));
    tracker.slice(&Event::Apply(a1.clone()));
    tracker.compute(&node());
    assert_eq!(destinations(&tracker, "10.96.0.1"), ["10.244.0.1:8080"]);
    // Created and deleted within one: nothing.
    tracker.slice(&Event::Delete(a1.clone()));
    tracker.slice(&Event::Apply(a1.clone()));
    tracker.slice(&Event::Delete(a1));
    tracker.compute(&node());
    assert!(destinations(&tracker, "10.96.0.1").is_empty());
}

#[test]
fn a_slice_that_moves_to_another_service_leaves_the_first() {
    let mut tracker = listed(
        &[service("a", "10.96.0.1"), service("b", "10.96.0.2")],
        &[slice("s", Some("a"), &["10.244.0.1"])],
    );
    assert_eq!(destinations(&tracker, "10.96.0.1"), ["10.244.0.1:8080"]);
    tracker.slice(&Event::Apply(slice("s", Some("b"), &["10.244.0.1"])));
    let computed = tracker.compute(&node());
    assert_eq!(computed.services, 2, "both Services are recomputed");
    assert!(destinations(&tracker, "10.96.0.1").is_empty());
    assert_eq!(destinations(&tracker, "10.96.0.2"), ["10.244.0.1:8080"]);

    // Its label removed: skipped and reported, and b loses it.
    tracker.slice(&Event::Apply(slice("s", None, &["10.244.0.1"])));
    tracker.compute(&node());
    assert!(destinations(&tracker, "10.96.0.2").is_empty());
    let problems: Vec<String> = tracker.problems().iter().map(ToString::to_string).collect();
    assert_eq!(problems, ["EndpointSlice ns/s: has no kubernetes.io/service-name label; skipped"]);
    tracker.slice(&Event::Apply(slice("s", Some("a"), &["10.244.0.1"])));
    tracker.compute(&node());
    assert!(tracker.problems().is_empty());
    assert_eq!(destinations(&tracker, "10.96.0.1"), ["10.244.0.1:8080"]);
}

#[test]
fn a_service_deleted_while_its_slices_remain() {
    let a = service("a", "10.96.0.1");
    let mut tracker = listed(std::slice::from_ref(&a), &[slice("a-1", Some("a"), &["10.244.0.1"])]);
    tracker.service(&Event::Delete(a.clone()));
    let computed = tracker.compute(&node());
    assert_eq!(changed_keys(&computed), 1, "its virtual server goes");
    assert!(tracker.desired().virtual_servers.is_empty());
    assert!(tracker.state(&name("a")).is_none());
    assert!(tracker.problems().is_empty(), "a slice outliving its Service is no error");
    let waiting: Vec<String> = tracker.waiting().iter().map(ToString::to_string).collect();
    assert_eq!(waiting, ["EndpointSlice ns/a-1: its Service ns/a is unknown; waiting for it"]);

    // The Service back: its slices are used again without an event of their own.
    tracker.service(&Event::Apply(a));
    tracker.compute(&node());
    assert_eq!(destinations(&tracker, "10.96.0.1"), ["10.244.0.1:8080"]);
    assert!(tracker.waiting().is_empty());
}

#[test]
fn a_relist_compares_everything_and_drops_what_vanished() {
    let mut tracker = listed(
        &[service("a", "10.96.0.1"), service("b", "10.96.0.2")],
        &[slice("a-1", Some("a"), &["10.244.0.1"])],
    );
    // After 410 Expired: b was deleted meanwhile, and its delete event never came.
    tracker.service(&Event::Init);
    tracker.service(&Event::InitApply(service("a", "10.96.0.1")));
    assert!(!tracker.pending(), "a relist half done changes nothing");
    tracker.service(&Event::InitDone);
    let computed = tracker.compute(&node());
    assert_eq!(computed.scope, Scope::Everything);
    assert_eq!(computed.services, 2, "b is recomputed, as gone");
    assert_eq!(tracker.desired().virtual_servers.len(), 1);
    assert_eq!(destinations(&tracker, "10.96.0.1"), ["10.244.0.1:8080"]);
}

#[test]
fn a_change_of_the_node_recomputes_every_service() {
    let mut tracker = listed(&[service("a", "10.96.0.1"), service("b", "10.96.0.2")], &[]);
    tracker.everything_changed();
    let computed = tracker.compute(&node());
    assert_eq!((computed.scope, computed.services), (Scope::Everything, 2));
}
