//! The API server: list and watch with kube-rs's watcher, which relists after 410 Gone and
//! retries with backoff while the API server is unreachable.

use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::warn;

use super::{Input, Selectors, service_selectors, slice_selectors};

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    trim: fn(&mut K),
    wrap: fn(watcher::Event<K>) -> Input,
) -> BoxStream<'static, Input>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    watcher(api, config)
        // What is never read is dropped before anything keeps it.
        .modify(trim)
        .default_backoff()
        .map(move |event| match event {
            Ok(event) => wrap(event),
            Err(error) => Input::WatchFailed { kind, error: error.to_string() },
        })
        .boxed()
}

/// Drops what is never read from the Node: managed fields, annotations and the list of images
/// (hundreds of entries on a busy node).
fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(status) = &mut node.status {
        status.images = None;
    }
}

/// The watch events of every Service and EndpointSlice this node proxies, and of the Node
/// named `node`. The stream never ends.
pub fn inputs(
    client: Client,
    node: &str,
    service_proxy_name: Option<&str>,
) -> impl Stream<Item = Input> + Send + 'static {
    let config = |Selectors { labels, fields }: Selectors| {
        let config = watcher::Config::default();
        let config = if labels.is_empty() { config } else { config.labels(&labels) };
        if fields.is_empty() { config } else { config.fields(&fields) }
    };
    futures::stream::select_all([
        watch(
            Api::<Service>::all(client.clone()),
            config(service_selectors(service_proxy_name)),
            "Service",
            // Kept as a compact `ServiceInfo`: nothing to trim first.
            |_| {},
            Input::service,
        ),
        // Kept as a compact `Slice`: nothing to trim first.
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            config(slice_selectors()),
            "EndpointSlice",
            |_| {},
            Input::slice,
        ),
        watch(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            "Node",
            trim_node,
            Input::node,
        ),
    ])
}

/// What [`inputs`] asks of the API server, for RBAC: each resource's API group and plural
/// name, and the verbs. `deploy/rbac.yaml` grants exactly this (checked by a test).
pub fn access() -> Vec<(String, String, Vec<&'static str>)> {
    fn resource<K: Resource<DynamicType = ()>>() -> (String, String, Vec<&'static str>) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned(), vec!["list", "watch"])
    }
    vec![resource::<Service>(), resource::<EndpointSlice>(), resource::<Node>()]
}

/// Sends [`inputs`] to `sink` until the receiver is gone.
pub async fn forward(inputs: impl Stream<Item = Input>, sink: mpsc::Sender<Input>) {
    let mut inputs = std::pin::pin!(inputs);
    while let Some(input) = inputs.next().await {
        if let Input::WatchFailed { kind, error } = &input {
            warn!(kind, %error, "watch failed; the kernel keeps its state, retrying");
        }
        if sink.send(input).await.is_err() {
            return;
        }
    }
}
