//! The API server: list and watch with kube-rs's watcher, which relists after 410 Gone and
//! retries while the API server is unreachable.
//!
//! How it retries decides how soon changes flow again after an API server restart
//! ([`Retry`]). A 410 (`Expired`: the restarted watch cache cannot resume an older
//! resourceVersion) is answered by a fresh list at once: it is not a failure of the server.
//! While the server does not answer at all (connections refused, cut), tries are 250 ms apart
//! at first and 500 ms at most: a refused connection costs it nothing, and the first try after
//! it is back comes within a second. An error the server answers with (5xx, 429, 403) is
//! retried after 0.5 s, doubling to at most 4 s, not to press a struggling server. Every wait
//! has jitter (up to as much again) and every success resets both. client-go's reflector waits
//! up to 30 s, which is where a restarted API server's first change took a minute to reach
//! kube-proxy's kernel state.

use backon::BackoffBuilder;
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
        // The wait before the next try is taken here, before the failure is passed on: the
        // watcher is not polled (and so does not try again) until it is over.
        .scan(Retry::default(), |retry, event| {
            let wait = retry.after(&event);
            futures::future::ready(Some((event, wait)))
        })
        .then(move |(event, wait)| async move {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            match event {
                Ok(event) => wrap(event),
                Err(error) => Input::WatchFailed { kind, error: error.to_string() },
            }
        })
        .boxed()
}

/// How long to wait after each watcher item before the watcher tries again: see the module's
/// documentation.
struct Retry {
    /// After failures where the server did not answer.
    unreachable: backon::ExponentialBackoff,
    /// After errors the server answered with.
    failing: backon::ExponentialBackoff,
}

impl Default for Retry {
    fn default() -> Self {
        Self { unreachable: UNREACHABLE.build(), failing: FAILING.build() }
    }
}

impl Retry {
    /// The wait after `item`: none after a success (which resets both backoffs) or a 410.
    fn after<T>(&mut self, item: &Result<T, watcher::Error>) -> Option<std::time::Duration> {
        let Err(error) = item else {
            *self = Self::default();
            return None;
        };
        if expired(error) {
            return None;
        }
        if answered(error) { self.failing.next() } else { self.unreachable.next() }
    }
}

/// Waits doubling from `min` to `max`, each with jitter of up to as much again, never giving up.
const fn doubling(
    min: std::time::Duration,
    max: std::time::Duration,
) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

const UNREACHABLE: backon::ExponentialBuilder =
    doubling(std::time::Duration::from_millis(250), std::time::Duration::from_millis(500));
const FAILING: backon::ExponentialBuilder =
    doubling(std::time::Duration::from_millis(500), std::time::Duration::from_secs(4));

/// Whether the API server answered the failed request (with an HTTP error status), rather
/// than not being reached at all.
fn answered(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(_) => true,
        watcher::Error::InitialListFailed(error)
        | watcher::Error::WatchStartFailed(error)
        | watcher::Error::WatchFailed(error) => matches!(error, kube::Error::Api(_)),
        watcher::Error::NoResourceVersion => true,
    }
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
    fn retries_come_within_a_second_while_unreachable_and_slower_after_errors() {
        let mut retry = Retry::default();
        let unreachable: Result<(), _> = Err(watcher::Error::WatchStartFailed(
            kube::Error::Service("connection refused".into()),
        ));
        let waits: Vec<_> = (0..50).map(|_| retry.after(&unreachable).unwrap()).collect();
        assert!(waits.iter().all(|w| w.as_millis() >= 250 && w.as_millis() < 1000), "{waits:?}");
        let mut answered = 0;
        let failing: Result<(), _> = Err(watcher::Error::WatchError(Box::new({
            let mut status = Status::failure("etcdserver: leader changed", "InternalError");
            status.code = 500;
            status
        })));
        let waits: Vec<_> = (0..50).map(|_| retry.after(&failing).unwrap()).collect();
        for wait in &waits {
            assert!(wait.as_millis() >= 500 && wait.as_millis() < 8000, "{waits:?}");
            answered += usize::from(wait.as_secs() >= 4);
        }
        assert!(answered > 40, "it settles at 4 s or more: {waits:?}");
        // A 410 waits for nothing; a success resets both.
        let gone: Result<(), _> = Err(watcher::Error::WatchError(Box::new({
            let mut status = Status::failure("too old resource version: 1 (2)", "Expired");
            status.code = 410;
            status
        })));
        assert_eq!(retry.after(&gone), None);
        assert_eq!(retry.after(&Ok::<(), watcher::Error>(())), None);
        assert!(retry.after(&failing).unwrap().as_millis() < 1000, "reset");
    }
}
