//! Table-driven tests of the desired state, and the golden scenario against kube-proxy.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use ipvs_netlink::{DestinationEntry, Info, ServiceEntry, ServiceFlags, ServiceKey};
use ipvsadm_listing::{self as listing, Columns};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};

use super::*;
use crate::changes::desired_state;

fn node() -> NodeInfo {
    NodeInfo {
        name: "virtme-ng".into(),
        zone: None,
        node_port_addresses: vec!["192.168.99.2".parse().unwrap()],
        local_addresses: vec!["192.168.99.2".parse().unwrap(), "fd00:99::2".parse().unwrap()],
    }
}

fn service(value: Value) -> Service {
    serde_json::from_value(value).unwrap()
}

fn slice(value: Value) -> EndpointSlice {
    serde_json::from_value(value).unwrap()
}

/// A ClusterIP Service `ns/web` on 10.96.0.10:80 -> 8080, with `spec` merged in.
fn web(spec: Value) -> Service {
    let mut base = json!({
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    });
    for (key, value) in spec.as_object().unwrap() {
        base["spec"][key] = value.clone();
    }
    service(base)
}

/// An EndpointSlice of `ns/web` with endpoints `(address, node, ready, serving, terminating)`.
fn web_slice(name: &str, endpoints: &[(&str, &str, bool, bool, bool)]) -> EndpointSlice {
    slice(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(a, n, r, s, t)| json!({
            "addresses": [a], "nodeName": n,
            "conditions": {"ready": r, "serving": s, "terminating": t}
        })).collect::<Vec<_>>()
    }))
}

fn destinations(state: &DesiredState, key: &str) -> Vec<String> {
    let key: SocketAddr = key.parse().unwrap();
    let server = state
        .virtual_servers
        .values()
        .find(|v| matches!(v.key(), ServiceKey::Inet { address, .. } if address == key))
        .unwrap_or_else(|| panic!("no virtual server {key}"));
    server.destinations.keys().map(|d| d.to_string()).collect()
}

/// The local-only virtual servers of a state.
fn local_only(state: &DesiredState) -> Vec<&VirtualServer> {
    state
        .virtual_servers
        .values()
        .map(AsRef::as_ref)
        .filter(|v| v.exposure == Exposure::LocalOnly)
        .collect()
}

fn compute(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
    desired_state(services, slices, &node(), &ProxyConfig::default())
}

#[test]
fn a_cluster_ip_service_with_ready_endpoints() {
    let state = compute(
        &[web(json!({}))],
        &[web_slice(
            "a",
            &[
                ("10.244.0.11", "virtme-ng", true, true, false),
                ("10.244.1.13", "node-b", true, true, false),
            ],
        )],
    );
    assert_eq!(destinations(&state, "10.96.0.10:80"), ["10.244.0.11:8080", "10.244.1.13:8080"]);
    let server = state.virtual_servers.values().next().unwrap();
    assert_eq!(server.service.scheduler, "rr");
    assert_eq!(server.owner.to_string(), "ns/web:http");
    assert!(state.elements.vips.contains(&"10.96.0.10".parse::<IpAddr>().unwrap()));
    assert_eq!(state.elements.hairpin.len(), 1, "only the local endpoint");
    assert!(state.problems.is_empty(), "{:?}", state.problems);
}

#[test]
fn endpoints_split_over_slices_are_merged_and_duplicates_counted_once() {
    let state = compute(
        &[web(json!({}))],
        &[
            web_slice("a", &[("10.244.0.11", "virtme-ng", true, true, false)]),
            web_slice(
                "b",
                &[
                    ("10.244.0.11", "virtme-ng", false, false, false),
                    ("10.244.0.12", "node-b", true, true, false),
                ],
            ),
        ],
    );
    assert_eq!(destinations(&state, "10.96.0.10:80"), ["10.244.0.11:8080", "10.244.0.12:8080"]);
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let state = compute(
        &[web(json!({"internalTrafficPolicy": "Local"}))],
        &[web_slice(
            "a",
            &[
                ("10.244.0.91", "virtme-ng", true, true, false),
                ("10.244.1.92", "node-b", true, true, false),
            ],
        )],
    );
    assert_eq!(destinations(&state, "10.96.0.10:80"), ["10.244.0.91:8080"]);
}

#[test]
fn session_affinity_makes_the_virtual_server_persistent() {
    let state = compute(
        &[web(
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}),
        )],
        &[],
    );
    let server = state.virtual_servers.values().next().unwrap();
    assert!(server.service.flags.contains(ServiceFlags::PERSISTENT));
    assert_eq!(server.service.timeout, 600);
    let default = compute(&[web(json!({"sessionAffinity": "ClientIP"}))], &[]);
    assert_eq!(
        default.virtual_servers.values().next().unwrap().service.timeout,
        DEFAULT_AFFINITY_TIMEOUT
    );
}

#[test]
fn the_scheduler_annotation_is_followed_and_a_bad_one_falls_back_and_is_reported() {
    let mut annotated = web(json!({}));
    annotated.metadata.annotations = Some(
        [
            (SCHEDULER_ANNOTATION.to_owned(), "mh".to_owned()),
            (SCHEDULER_FLAGS_ANNOTATION.to_owned(), "mh-fallback,mh-port".to_owned()),
        ]
        .into(),
    );
    let state = compute(&[annotated], &[]);
    let server = state.virtual_servers.values().next().unwrap();
    assert_eq!(server.service.scheduler, "mh");
    assert_eq!(server.service.flags, ServiceFlags::MH_FALLBACK | ServiceFlags::MH_PORT);

    let mut bad = web(json!({}));
    bad.metadata.annotations =
        Some([(SCHEDULER_ANNOTATION.to_owned(), "fastest".to_owned())].into());
    let state = compute(&[bad], &[]);
    assert_eq!(
        state.virtual_servers.values().next().unwrap().service.scheduler,
        "rr",
        "not dropped"
    );
    assert_eq!(state.problems.len(), 1);
    assert!(
        state.problems[0]
            .to_string()
            .starts_with("Service ns/web: annotation kube-ipvs.io/scheduler=\"fastest\""),
        "{}",
        state.problems[0]
    );
}

#[test]
fn headless_external_name_and_other_proxies_produce_nothing() {
    let headless = web(json!({"clusterIP": "None", "clusterIPs": ["None"]}));
    let external_name = web(json!({"type": "ExternalName", "externalName": "example.invalid"}));
    let mut other_proxy = web(json!({}));
    other_proxy.metadata.labels =
        Some([(SERVICE_PROXY_NAME_LABEL.to_owned(), "cilium".to_owned())].into());
    for service in [headless, external_name, other_proxy] {
        let state = compute(&[service], &[]);
        assert!(
            state.virtual_servers.is_empty() && state.elements == netfilter::Elements::default()
        );
        assert!(state.problems.is_empty());
    }
    // A Service labelled headless that has a cluster IP is served as kube-proxy serves it: a
    // virtual server (with no destinations until endpoints come) and its address.
    let mut labelled_headless = web(json!({}));
    labelled_headless.metadata.labels = Some([(HEADLESS_LABEL.to_owned(), String::new())].into());
    let state = compute(&[labelled_headless], &[]);
    let (_, server) = state.virtual_servers.first_key_value().expect("a virtual server");
    assert!(server.destinations.is_empty());
    assert_eq!(state.elements.vips, ["10.96.0.10".parse().unwrap()].into());
    // Our own proxy name is served.
    let mut ours = web(json!({}));
    ours.metadata.labels =
        Some([(SERVICE_PROXY_NAME_LABEL.to_owned(), "kube-ipvs".to_owned())].into());
    let config =
        ProxyConfig { service_proxy_name: Some("kube-ipvs".into()), ..ProxyConfig::default() };
    assert_eq!(desired_state([&ours], [], &node(), &config).virtual_servers.len(), 1);
}

#[test]
fn bad_input_is_skipped_reported_and_does_not_stop_the_others() {
    let bad_ip = web(json!({"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300"]}));
    let mut bad_ports = web(json!({"clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"],
        "ports": [{"name": "zero", "port": 0, "protocol": "TCP"}, {"name": "icmp", "port": 7, "protocol": "ICMP"},
                  {"name": "ok", "port": 443, "protocol": "TCP"}]}));
    bad_ports.metadata.name = Some("ports".into());
    let mut good = web(json!({"clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"]}));
    good.metadata.name = Some("good".into());
    let no_label =
        slice(json!({"metadata": {"name": "stray", "namespace": "ns"}, "addressType": "IPv4"}));
    let early = slice(
        json!({"metadata": {"name": "early-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "later"}}, "addressType": "IPv4"}),
    );
    let bad_endpoint = slice(json!({
        "metadata": {"name": "good-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "good"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.999"]}, {"addresses": ["10.244.0.7"]}]
    }));
    let state = compute(&[bad_ip, bad_ports, good], &[no_label, early, bad_endpoint]);
    assert_eq!(
        destinations(&state, "10.96.0.12:80"),
        ["10.244.0.7:8080"],
        "the good Service is programmed"
    );
    assert!(
        state.virtual_servers.keys().any(|k| k.to_string() == "TCP 10.96.0.11:443"),
        "the good port of a bad Service too"
    );
    let problems: Vec<String> = state.problems.iter().map(ToString::to_string).collect();
    for expected in [
        "EndpointSlice ns/early-1: its Service ns/later is unknown; waiting for it",
        "EndpointSlice ns/good-1: endpoint address \"10.244.0.999\" is not an IP address; skipped",
        "EndpointSlice ns/stray: has no kubernetes.io/service-name label; skipped",
        "Service ns/ports: port 0 has invalid port number 0; skipped",
        "Service ns/ports: port 1 has unknown protocol \"ICMP\"; skipped",
        "Service ns/web: cluster IP \"10.96.0.300\" is not an IP address; skipped",
    ] {
        assert!(problems.iter().any(|p| p == expected), "missing {expected:?} in {problems:#?}");
    }
}

#[test]
fn two_services_claiming_one_virtual_server_keep_the_first_by_name_and_report_the_other() {
    let mut twin = web(json!({}));
    twin.metadata.name = Some("twin".into());
    // Whatever order they come in: the owner does not change with the order of events.
    for services in [[web(json!({})), twin.clone()], [twin.clone(), web(json!({}))]] {
        let state = compute(&services, &[]);
        assert_eq!(state.virtual_servers.values().next().unwrap().owner.name, "twin");
        assert_eq!(state.problems.len(), 1);
        assert_eq!(state.problems[0].object, "Service ns/web");
        assert!(state.problems[0].reason.contains("already the virtual server of ns/twin:http"));
    }
}

/// Reads every object of a `kind: List` YAML file.
fn golden_objects() -> (Vec<Service>, Vec<EndpointSlice>) {
    let text = include_str!("../../tests/golden/golden-objects-server.yaml");
    let list: Value = serde_norway::from_str(text).unwrap();
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for item in list["items"].as_array().unwrap() {
        match item["kind"].as_str() {
            Some("Service") => services.push(serde_json::from_value(item.clone()).unwrap()),
            Some("EndpointSlice") => slices.push(serde_json::from_value(item.clone()).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    (services, slices)
}

#[test]
fn the_golden_scenario_matches_kube_proxy() {
    let (services, slices) = golden_objects();
    let state = desired_state(&services, &slices, &node(), &ProxyConfig::default());
    assert!(state.problems.is_empty(), "{:#?}", state.problems);
    let table: Vec<(ServiceEntry, Vec<DestinationEntry>)> = state
        .virtual_servers
        .values()
        .map(|server| {
            let entry =
                ServiceEntry { service: (*server.service).clone(), stats: None, stats64: None };
            let destinations =
                server.destinations.iter().map(|d| DestinationEntry::new(*d)).collect();
            (entry, destinations)
        })
        .collect();
    let ours = listing::render(
        &Info { version: 0x010201, connection_table_size: 4096 },
        &table,
        Columns::Default,
    );

    // kube-proxy's table, less the API server's own Service, which the scenario's objects do not
    // include.
    let golden = include_str!("../../tests/golden/ipvsadm-Ln.txt");
    let mut expected = String::new();
    let mut skipping = false;
    for line in golden.lines() {
        if !line.starts_with("  ->") {
            skipping = line.starts_with("TCP  10.96.0.1:443 ");
        }
        if !skipping {
            expected.push_str(line);
            expected.push('\n');
        }
    }
    // Where kube-ipvs differs from kube-proxy: svc-e, externalTrafficPolicy Local, with endpoint
    // 10.244.0.51 here and 10.244.1.52 on node-b. kube-proxy gives its load-balancer and NodePort
    // virtual servers the local endpoint only, so pods using the load-balancer IP reach only this
    // node's endpoint. kube-ipvs gives them every endpoint (for clients inside the cluster) and adds
    // a firewall-mark virtual server per port with the local endpoint alone, to which traffic from
    // outside the cluster is marked; with no local endpoint that one is empty and refuses, where
    // kube-proxy falls back to remote endpoints whose replies cannot return (PR #97081).
    let remote = "  -> 10.244.1.52:8080             Masq    1      0          0         ";
    let mut ours_as_kube_proxy = String::new();
    let mut block = String::new();
    for line in ours.lines() {
        if !line.starts_with("  ->") {
            block = line.to_owned();
        }
        let svc_e_external =
            block == "TCP  192.0.2.10:80 rr" || block == "TCP  192.168.99.2:30081 rr";
        if block.starts_with("FWM") || (svc_e_external && line == remote) {
            continue;
        }
        ours_as_kube_proxy.push_str(line);
        ours_as_kube_proxy.push('\n');
    }
    assert_eq!(ours_as_kube_proxy, expected);
    assert!(ours.contains(&format!("TCP  192.0.2.10:80 rr\n  -> 10.244.0.51:8080             Masq    1      0          0         \n{remote}\n")));
    let local_only = local_only(&state);
    assert_eq!(local_only.len(), 2);
    for server in &local_only {
        assert_eq!(server.owner.to_string(), "golden/svc-e:http");
        assert_eq!(
            server.destinations.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.0.51:8080"]
        );
    }
    let marks: BTreeSet<u32> = state
        .elements
        .local_traffic
        .values()
        .chain(state.elements.local_node_ports.values())
        .copied()
        .collect();
    let fwmarks: BTreeSet<u32> = local_only
        .iter()
        .map(|v| match v.key() {
            ServiceKey::Fwmark { mark, .. } => mark,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(marks, fwmarks, "every marked flow has its virtual server");

    let vips: Vec<String> = state.elements.vips.iter().map(ToString::to_string).collect();
    assert!(
        vips.contains(&"192.0.2.10".to_owned()) && vips.contains(&"fd00:10:96::8".to_owned()),
        "{vips:?}"
    );
    assert!(state.elements.health_check_node_ports.contains(&32100));
    assert_eq!(state.elements.source_ranges.len(), 1);
}

#[test]
fn external_traffic_policy_local_gets_a_local_only_virtual_server_with_a_stable_mark() {
    let lb = |name: &str, ip: &str| {
        let mut s = service(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30081}],
                     "healthCheckNodePort": 32100},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}
        }));
        s.spec.as_mut().unwrap().cluster_ips = None;
        s
    };
    let remote_only = slice(json!({
        "metadata": {"name": "lb-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "lb"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.52"], "nodeName": "node-b", "conditions": {"ready": true}}]
    }));
    let first = compute(&[lb("lb", "192.0.2.10")], std::slice::from_ref(&remote_only));
    // No local endpoint: the local-only virtual servers exist, empty, so external clients are
    // refused; the address's own virtual server still has the remote endpoint.
    let local_only = local_only(&first);
    assert_eq!(local_only.len(), 2, "one for the load-balancer IP, one for the NodePort");
    assert!(local_only.iter().all(|v| v.destinations.is_empty()));
    assert_eq!(destinations(&first, "192.0.2.10:80"), ["10.244.1.52:8080"]);
    assert!(first.elements.health_check_node_ports.contains(&32100));

    // The same Service, with another one added, keeps its marks.
    let mut other = lb("other", "192.0.2.11");
    other.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.21".into());
    other.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30082);
    let second = compute(&[lb("lb", "192.0.2.10"), other], &[remote_only]);
    for (port, mark) in &first.elements.local_traffic {
        assert_eq!(second.elements.local_traffic.get(port), Some(mark));
    }
    assert_eq!(second.elements.local_traffic.len(), 2);
    assert!(
        second
            .elements
            .local_traffic
            .values()
            .all(|m| (LOCAL_MARK_BASE..2 * LOCAL_MARK_BASE).contains(m))
    );
}

#[test]
fn node_port_addresses_follow_kube_proxy() {
    let local: Vec<IpAddr> = ["127.0.0.1", "192.168.99.2", "fd00:99::2", "fe80::1", "10.0.0.5"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let all = node_port_addresses(&local, &[]);
    assert_eq!(
        all.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.0.0.5", "192.168.99.2", "fd00:99::2"]
    );
    let only = node_port_addresses(
        &local,
        &["192.168.99.0/24".parse().unwrap(), "127.0.0.0/8".parse().unwrap()],
    );
    assert_eq!(only.iter().map(ToString::to_string).collect::<Vec<_>>(), ["192.168.99.2"]);
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}}
    }))
    .unwrap();
    let info = NodeInfo::from_node(&node, all, local);
    assert_eq!((info.name.as_str(), info.zone.as_deref()), ("node-a", Some("zone-1")));
}
