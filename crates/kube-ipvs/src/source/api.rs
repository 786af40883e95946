//! The API server: list and watch with kube-rs's watcher, which relists after 410 Gone and
//! retries while the API server is unreachable.
//!
//! How it retries decides how soon changes flow again after an API server restart. A 410
//! (`Expired`: the restarted watch cache cannot resume an older resourceVersion) is answered
//! by a fresh list at once, with no wait: it is not a failure of the server. Other failures
//! (connection refused while it is down, errors while it starts) are retried after an
//! exponential backoff from 250 ms, capped at 1 s, with jitter (each wait is up to twice
//! that), reset by the first success. client-go's reflector waits up to 30 s, which is where
//! a restarted API server's first change took a minute to reach kube-proxy's kernel state.

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
        // A 410 becomes an item that is no error to the backoff below, so the relist that the
        // watcher starts next is not delayed (and the backoff is reset).
        .map(move |event| match event {
            Ok(event) => Ok(wrap(event)),
            Err(error) if expired(&error) => {
                Ok(Input::WatchFailed { kind, error: error.to_string() })
            }
            Err(error) => Err(error),
        })
        .backoff(retry_backoff())
        .map(move |input| match input {
            Ok(input) => input,
            Err(error) => Input::WatchFailed { kind, error: error.to_string() },
        })
        .boxed()
}

/// Whether the API server said `410 Gone` (`Expired`): the watcher lists again.
fn expired(error: &watcher::Error) -> bool {
    let gone = |status: &kube::core::Status| status.code == 410;
    match error {
        watcher::Error::WatchError(status) => gone(status),
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => gone(status),
        _ => false,
    }
}

/// The wait before a failed list or watch is tried again: see the module's documentation.
fn retry_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// The first wait after a failure.
const RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest wait between tries, before jitter (which adds up to as much again).
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);

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

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    #[test]
    fn a_410_is_told_from_other_failures() {
        let status = |code: u16| {
            let mut status = Status::failure("too old resource version: 144 (145)", "Expired");
            status.code = code;
            Box::new(status)
        };
        assert!(expired(&watcher::Error::WatchError(status(410))));
        assert!(expired(&watcher::Error::InitialListFailed(kube::Error::Api(status(410)))));
        assert!(!expired(&watcher::Error::WatchError(status(500))));
        assert!(!expired(&watcher::Error::WatchStartFailed(kube::Error::Api(status(503)))));
        assert!(!expired(&watcher::Error::NoResourceVersion));
    }

    #[test]
    fn retries_wait_a_second_or_two_at_most() {
        let waits: Vec<_> = retry_backoff().take(50).collect();
        assert_eq!(waits.len(), 50, "it never gives up");
        assert!(waits[0] >= RETRY_MIN && waits[0] < 2 * RETRY_MIN, "{waits:?}");
        assert!(waits.iter().all(|w| *w < 2 * RETRY_MAX), "{waits:?}");
        assert!(waits[10..].iter().all(|w| *w >= RETRY_MAX), "{waits:?}");
    }
}
