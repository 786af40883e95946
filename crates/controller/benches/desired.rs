//! `cargo xtask bench controller`: the cost of the desired state and of the diff, from scratch
//! and for one endpoint change, against recomputing everything for that change (kube-proxy's
//! way) in the same run. Prints a Markdown table.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use controller::{
    changes::{ChangeTracker, Scope, desired_state},
    desired::{DesiredState, NodeInfo, ProxyConfig, Slice},
    reconcile::{KernelState, plan},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event;
use serde_json::json;

/// The first 2,700 Services are NodePorts (the whole default range), the rest ClusterIPs.
fn service(i: usize) -> Service {
    let cluster_ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
    let spec = if i < 2_700 {
        json!({"type": "NodePort", "clusterIP": cluster_ip,
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30_000 + i}]})
    } else {
        json!({"type": "ClusterIP", "clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
    };
    serde_json::from_value(
        json!({"metadata": {"name": format!("svc-{i}"), "namespace": "bench"}, "spec": spec}),
    )
    .unwrap()
}

fn slice(i: usize, endpoints: usize, generation: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..endpoints)
        .map(|j| {
            let n = i * 16 + j + generation;
            json!({"addresses": [format!("10.{}.{}.{}", 100 + n / 62_500, n / 250 % 250, n % 250 + 1)],
                   "nodeName": if j % 4 == 0 { "node-a" } else { "node-b" },
                   "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        node_port_addresses: vec!["192.168.99.2".parse().unwrap()],
        local_addresses: vec!["192.168.99.2".parse().unwrap()],
    }
}

/// The median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn percentile(mut times: Vec<Duration>, p: f64) -> Duration {
    times.sort();
    times[((times.len() as f64 * p) as usize).min(times.len() - 1)]
}

/// The kernel state once the desired state is programmed.
fn programmed(desired: &DesiredState) -> KernelState {
    desired
        .virtual_servers
        .iter()
        .map(|(key, v)| {
            (
                *key,
                controller::reconcile::KernelServer {
                    service: v.service.clone(),
                    destinations: v.destinations.clone(),
                },
            )
        })
        .collect()
}

fn human(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 { format!("{:.1} ms", us / 1000.0) } else { format!("{us:.1} µs") }
}

fn main() {
    let endpoints = 10;
    let config = ProxyConfig::default();
    let node = node();
    println!();
    println!(
        "Desired state and diff, {endpoints} endpoints per Service; the first 2,700 Services are \
         NodePorts (two virtual servers each):"
    );
    println!();
    println!(
        "| Services | desired state, from scratch | diff against an empty kernel (changes) | one endpoint change, incremental (p50 / p99) | one endpoint change, full recompute (p50) | full / incremental |"
    );
    println!("|---|---|---|---|---|---|");
    for services in [1_000, 10_000] {
        let all_services: Vec<Service> = (0..services).map(service).collect();
        let slices: Vec<EndpointSlice> = (0..services).map(|i| slice(i, endpoints, 0)).collect();

        let scratch = median(5, || {
            black_box(desired_state(&all_services, &slices, &node, &config));
        });
        let desired = desired_state(&all_services, &slices, &node, &config);
        assert!(desired.problems.is_empty(), "{:?}", desired.problems.first());
        let empty = KernelState::new();
        let mut changes = 0;
        let diff = median(5, || {
            changes = desired
                .virtual_servers
                .iter()
                .map(|(k, v)| plan(*k, empty.get(k), Some(v)).changes.len())
                .sum();
        });

        // One endpoint of one Service changes, as the daemon takes it: the watch event's slice
        // kept, the event tracked, the Service recomputed and joined, and its virtual servers
        // diffed against the kernel.
        let kernel = programmed(&desired);
        let mut tracker = ChangeTracker::listed(&all_services, &slices, &node, &config);
        let mut incremental = Vec::new();
        for round in 0..200 {
            let i = (round * 7919) % services;
            let changed = slice(i, endpoints, 1 + round % 3);
            let started = Instant::now();
            tracker.slice(&Event::Apply(Arc::new(Slice::from(changed))));
            let Scope::Changed(delta) = tracker.compute(&node).scope else {
                panic!("one change compares only what it touched")
            };
            let desired = tracker.desired();
            let plans: usize = delta
                .keys
                .iter()
                .map(|k| {
                    plan(*k, kernel.get(k), desired.virtual_servers.get(k).map(AsRef::as_ref))
                        .changes
                        .len()
                })
                .sum();
            incremental.push(started.elapsed());
            black_box(plans);
        }
        // The same change, kube-proxy's way: everything again.
        let mut modified = slices.clone();
        modified[services / 2] = slice(services / 2, endpoints, 1);
        let full = median(5, || {
            let again = desired_state(&all_services, &modified, &node, &config);
            let plans: usize = again
                .virtual_servers
                .iter()
                .map(|(k, v)| plan(*k, kernel.get(k), Some(v)).changes.len())
                .sum();
            black_box(plans);
        });
        let p50 = percentile(incremental.clone(), 0.5);
        let p99 = percentile(incremental, 0.99);
        println!(
            "| {services} | {} | {} ({changes}) | {} / {} | {} | {:.0}x |",
            human(scratch),
            human(diff),
            human(p50),
            human(p99),
            human(full),
            full.as_secs_f64() / p50.as_secs_f64()
        );
    }
    println!();
}
