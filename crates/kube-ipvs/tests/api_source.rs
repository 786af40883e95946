//! The API source against a fake API server over real HTTP: the initial lists, the label and
//! field selectors, live changes, bookmarks, server-side timeouts, dropped watches, 410 Gone
//! and an API server that goes away.

use std::time::Duration;

use fake_apiserver::{FakeApiServer, Resource, Settings};
use futures::Stream;
use kube_ipvs::source::{Input, api};
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn service(name: &str, labels: Value) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "ns", "labels": labels},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
}

fn slice(name: &str, service: &str) -> Value {
    json!({"kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": service}},
           "endpoints": [{"addresses": ["10.244.0.2"]}]})
}

async fn client(server: &FakeApiServer) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig()).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The inputs, forwarded by a task as the daemon forwards them, so the watches go on while
/// the test waits.
fn watch(inputs: impl Stream<Item = Input> + Send + 'static) -> mpsc::Receiver<Input> {
    let (sink, receiver) = mpsc::channel(1024);
    tokio::spawn(api::forward(inputs, sink));
    receiver
}

/// Takes inputs until `until` has been seen, with a time limit; returns them all.
async fn until(inputs: &mut mpsc::Receiver<Input>, until: &str, limit: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(limit, async {
        while let Some(input) = inputs.recv().await {
            let text = input.to_string();
            let done = text == until || (until.ends_with(" failed") && text.starts_with(until));
            seen.push(text);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "no {until:?} within {limit:?}; saw {seen:?}");
    seen
}

const SECOND: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn selected_objects_are_listed_then_followed() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("web", json!({})));
    // Labelled headless, with a cluster IP: served, as kube-proxy serves it.
    server.apply(service("labelled", json!({"service.kubernetes.io/headless": ""})));
    let mut headless = service("headless", json!({}));
    headless["spec"]["clusterIP"] = json!("None");
    server.apply(headless);
    server.apply(service("other", json!({"service.kubernetes.io/service-proxy-name": "cilium"})));
    server.apply(slice("web-1", "web"));
    let mut headless_slice = slice("headless-1", "headless");
    headless_slice["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    server.apply(headless_slice);
    server.apply(json!({"kind": "Node", "metadata": {"name": "node-a"}}));
    server.apply(json!({"kind": "Node", "metadata": {"name": "node-b"}}));

    let mut inputs = watch(api::inputs(client(&server).await, "node-a", None));
    let mut seen = Vec::new();
    for done in ["Service done", "EndpointSlice done", "Node done"] {
        if !seen.contains(&done.to_owned()) {
            seen.extend(until(&mut inputs, done, WAIT).await);
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "EndpointSlice done",
            "EndpointSlice init",
            "EndpointSlice list ns/web-1",
            "Node done",
            "Node init",
            "Node list node-a",
            "Service done",
            "Service init",
            "Service list ns/labelled",
            "Service list ns/web",
        ]
    );

    server.apply(service("api", json!({})));
    assert_eq!(until(&mut inputs, "Service apply ns/api", WAIT).await, ["Service apply ns/api"]);
    // A Service that becomes headless leaves the selection: deleted, as the real watch
    // cache sends it.
    let mut api = service("api", json!({}));
    api["spec"]["clusterIP"] = json!("None");
    server.apply(api);
    until(&mut inputs, "Service delete ns/api", WAIT).await;
    assert!(server.delete(Resource::EndpointSlices, "ns", "web-1"));
    until(&mut inputs, "EndpointSlice delete ns/web-1", WAIT).await;
    // With a proxy name of its own, labelled Services come through to be filtered later.
    let mut named = watch(api::inputs(client(&server).await, "node-a", Some("kube-ipvs")));
    let all = until(&mut named, "Service done", WAIT).await;
    assert!(all.contains(&"Service list ns/other".to_owned()), "{all:?}");
    assert!(!all.contains(&"Service list ns/headless".to_owned()), "{all:?}");
}

#[tokio::test]
async fn bookmarks_and_timeouts_resume_without_a_relist() {
    let server = FakeApiServer::start().await.unwrap();
    server.set(Settings { bookmark_interval: Duration::from_millis(100), max_watch: SECOND });
    server.apply(service("web", json!({})));
    let mut inputs = watch(api::inputs(client(&server).await, "node-a", None));
    until(&mut inputs, "Service done", WAIT).await;
    // Other resources move the version on; bookmarks carry it to the Service watch.
    for i in 0..5 {
        server.apply(json!({"kind": "Node", "metadata": {"name": format!("n{i}")}}));
    }
    let version = server.version();
    // Watches end every second on the server's side; the client resumes each time.
    tokio::time::sleep(3 * SECOND).await;
    server.apply(service("api", json!({})));
    until(&mut inputs, "Service apply ns/api", WAIT).await;
    let requests = server.requests();
    let lists = requests.iter().filter(|r| *r == "LIST services").count();
    assert_eq!(lists, 1, "resumed without listing again: {requests:?}");
    let resumed_from_bookmark = requests
        .iter()
        .filter_map(|r| r.strip_prefix("WATCH services from "))
        .any(|v| v.parse::<u64>().unwrap() >= version);
    assert!(resumed_from_bookmark, "a watch resumed from a bookmark's version: {requests:?}");
}

#[tokio::test]
async fn gone_forces_a_relist_that_brings_what_was_missed() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("web", json!({})));
    server.apply(service("old", json!({})));
    let mut inputs = watch(api::inputs(client(&server).await, "node-a", None));
    until(&mut inputs, "Service done", WAIT).await;
    server.stop().await;
    // Changes while the client cannot watch, then the history is compacted: its resumed
    // watch gets 410 Gone.
    server.apply(service("new", json!({})));
    server.delete(Resource::Services, "ns", "old");
    server.compact();
    server.resume().await.unwrap();
    let seen = until(&mut inputs, "Service done", 2 * WAIT).await;
    let listed: Vec<_> = seen.iter().filter(|s| s.starts_with("Service list")).collect();
    assert_eq!(listed, ["Service list ns/new", "Service list ns/web"], "{seen:?}");
    let requests = server.requests();
    assert_eq!(requests.iter().filter(|r| *r == "LIST services").count(), 2, "{requests:?}");
}

#[tokio::test]
async fn an_api_server_that_goes_away_is_reported_and_waited_for() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("web", json!({})));
    let mut inputs = watch(api::inputs(client(&server).await, "node-a", None));
    until(&mut inputs, "Service done", WAIT).await;
    server.stop().await;
    until(&mut inputs, "Service failed", WAIT).await;
    server.apply(service("meanwhile", json!({})));
    tokio::time::sleep(2 * SECOND).await;
    server.resume().await.unwrap();
    let seen = until(&mut inputs, "Service apply ns/meanwhile", 2 * WAIT).await;
    assert!(!seen.iter().any(|s| s == "Service init"), "resumed, not relisted: {seen:?}");
}

#[tokio::test]
async fn a_failing_list_is_reported_and_retried() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(service("web", json!({})));
    server.apply(slice("web-1", "web"));
    server.fail(Resource::EndpointSlices, true);
    let mut inputs = watch(api::inputs(client(&server).await, "node-a", None));
    let seen = until(&mut inputs, "EndpointSlice failed", WAIT).await;
    assert!(!seen.contains(&"EndpointSlice done".to_owned()), "{seen:?}");
    server.fail(Resource::EndpointSlices, false);
    until(&mut inputs, "EndpointSlice done", WAIT).await;
}
