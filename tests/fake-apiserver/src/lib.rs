//! An in-process Kubernetes API server for tests.
//!
//! It speaks the real list and watch protocol over HTTP, for Services, EndpointSlices and
//! Nodes, with the objects as JSON (as k8s-openapi serializes them):
//!
//! - lists carry the store's `resourceVersion`, and are paged with `limit` and `continue`;
//! - `?watch=1` streams newline-delimited events from a `resourceVersion`: the changes after
//!   it, then live ones; an object that stops (or starts) matching the selectors is sent as
//!   `DELETED` (or `ADDED`), as the real watch cache does;
//! - `BOOKMARK` events when `allowWatchBookmarks` is set;
//! - watches end after `timeoutSeconds`, or after the server's own limit;
//! - label selectors (`k`, `!k`, `k=v`, `k!=v`) and the `metadata.name`,
//!   `metadata.namespace` and `spec.clusterIP` field selectors;
//! - and failures on demand: every open watch dropped, the history compacted so resumed
//!   watches get `410 Gone` and must list again, or the whole server stopped (connections
//!   refused) and started again on the same address, or one resource refused with 403;
//! - writes as the real API: `PUT` creates or replaces one object at its own path
//!   ([`Resource::object_path`]), `DELETE` deletes it, `GET` reads it, so that a test in
//!   another process (the `fake-apiserver` binary) plays the kubelet and the controllers;
//! - and a restart as a real kube-apiserver does one ([`FakeApiServer::shut_down`],
//!   [`FakeApiServer::restart`]): on SIGTERM it removes its own address from the `kubernetes`
//!   Service's endpoints, closes every watch and stops listening; started again, it adds its
//!   address back, and its new watch cache answers a watch from before the restart with
//!   `410 Expired` (`too old resource version: 144 (145)`).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
    task::{JoinHandle, JoinSet},
};

/// The resources served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// `/api/v1/services`.
    Services,
    /// `/apis/discovery.k8s.io/v1/endpointslices`.
    EndpointSlices,
    /// `/api/v1/nodes`.
    Nodes,
}

impl Resource {
    /// The resource of an object's `kind`.
    pub fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Self::Services),
            "EndpointSlice" => Some(Self::EndpointSlices),
            "Node" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            Self::Services | Self::Nodes => "v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Self::Nodes
    }

    /// The URL path of one object of this resource (`namespace` is ignored for Nodes).
    pub fn object_path(self, namespace: &str, name: &str) -> String {
        match self {
            Self::Services => format!("/api/v1/namespaces/{namespace}/services/{name}"),
            Self::EndpointSlices => {
                format!("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}")
            }
            Self::Nodes => format!("/api/v1/nodes/{name}"),
        }
    }

    /// Its plural name, as in the URL.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Nodes => "nodes",
        }
    }
}

type Key = (Resource, String, String);

/// One change: the object before and after (`None` when absent).
#[derive(Debug, Clone)]
struct Change {
    version: u64,
    resource: Resource,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Debug, Default)]
struct Store {
    version: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    requests: Vec<String>,
    uid: u64,
    /// Resources whose requests are refused with 403 Forbidden.
    failing: std::collections::BTreeSet<Resource>,
    /// The server's own endpoints in `default/kubernetes`, while it is shut down.
    own_endpoints: Option<Value>,
}

/// Server-side settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The longest a watch lasts, whatever `timeoutSeconds` asks.
    pub max_watch: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self { bookmark_interval: Duration::from_secs(1), max_watch: Duration::from_secs(300) }
    }
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    generation: watch::Sender<u64>,
    settings: Mutex<Settings>,
}

/// The server, running on a loopback port until dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    task: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn meta<'a>(object: &'a Value, field: &str) -> &'a str {
    object.pointer(&format!("/metadata/{field}")).and_then(Value::as_str).unwrap_or_default()
}

/// Whether `object` matches a label selector (`k`, `!k`, `k=v`, `k==v`, `k!=v`, comma-separated).
pub fn labels_match(selector: &str, object: &Value) -> bool {
    let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
    let label = |key: &str| labels.and_then(|l| l.get(key.trim())).and_then(Value::as_str);
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        if let Some((key, value)) = term.split_once("!=") {
            label(key) != Some(value.trim())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(key) == Some(value.trim())
        } else if let Some(key) = term.strip_prefix('!') {
            label(key).is_none()
        } else {
            label(term).is_some()
        }
    })
}

/// Whether `object` matches a field selector (`metadata.name`, `metadata.namespace` and, for
/// Services, `spec.clusterIP`; `=`, `==` or `!=`, comma-separated).
pub fn fields_match(selector: &str, object: &Value) -> bool {
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        let (field, value, equal) = match term.split_once("!=") {
            Some((f, v)) => (f, v, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((f, v)) => (f, v, true),
                None => return false,
            },
        };
        let actual = match field.trim() {
            "metadata.name" => meta(object, "name"),
            "metadata.namespace" => meta(object, "namespace"),
            // Services only, as the real server: `spec.clusterIP!=None` keeps headless ones out.
            "spec.clusterIP" => {
                object.pointer("/spec/clusterIP").and_then(Value::as_str).unwrap_or_default()
            }
            _ => return false,
        };
        (actual == value.trim()) == equal
    })
}

/// The query parameters of a list or watch.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    resource_version: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_: Option<String>,
}

impl Params {
    fn matches(&self, object: &Value) -> bool {
        labels_match(self.label_selector.as_deref().unwrap_or_default(), object)
            && fields_match(self.field_selector.as_deref().unwrap_or_default(), object)
    }

    fn watching(&self) -> bool {
        matches!(self.watch.as_deref(), Some("1" | "true"))
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl Shared {
    fn record(&self, store: &mut Store, key: Key, new: Option<Value>) -> u64 {
        store.version += 1;
        let version = store.version;
        let old = match &new {
            Some(object) => store.objects.insert(key.clone(), object.clone()),
            None => store.objects.remove(&key),
        };
        let change = Change { version, resource: key.0, old, new };
        store.history.push(change.clone());
        let _ = self.changes.send(change);
        version
    }

    /// Creates or replaces an object; its new resource version, or why it was refused.
    fn apply(&self, mut object: Value) -> Result<u64, String> {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let resource = Resource::of_kind(&kind).ok_or(format!("kind {kind:?} is not served"))?;
        if meta(&object, "name").is_empty() {
            return Err(format!("{kind} without a name"));
        }
        object["apiVersion"] = resource.api_version().into();
        if resource.namespaced() && meta(&object, "namespace").is_empty() {
            object["metadata"]["namespace"] = "default".into();
        }
        let mut store = lock(&self.store);
        let key =
            (resource, meta(&object, "namespace").to_owned(), meta(&object, "name").to_owned());
        let uid = match store.objects.get(&key) {
            Some(old) => meta(old, "uid").to_owned(),
            None => {
                store.uid += 1;
                format!("00000000-0000-0000-0000-{:012}", store.uid)
            }
        };
        object["metadata"]["uid"] = uid.into();
        object["metadata"]["resourceVersion"] = (store.version + 1).to_string().into();
        Ok(self.record(&mut store, key, Some(object)))
    }

    fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let mut store = lock(&self.store);
        let key = (resource, namespace.to_owned(), name.to_owned());
        if !store.objects.contains_key(&key) {
            return false;
        }
        self.record(&mut store, key, None);
        true
    }

    fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.store).objects.get(&(resource, namespace.to_owned(), name.to_owned())).cloned()
    }

    fn list(&self, resource: Resource, params: &Params) -> Response {
        let mut store = lock(&self.store);
        store.requests.push(format!("LIST {}", resource.plural()));
        // As the real API server, a page goes on from the last key of the one before (the
        // continue token names it), so that a page costs its own objects, not every object
        // before it.
        let first = (resource, String::new(), String::new());
        let from = match params.continue_.as_deref() {
            None | Some("") => Bound::Included(first),
            Some(token) => match token.split_once('/') {
                Some((namespace, name)) => {
                    Bound::Excluded((resource, namespace.to_owned(), name.to_owned()))
                }
                None => {
                    let body =
                        status(400, "BadRequest", format!("invalid continue token {token:?}"));
                    return json_response(StatusCode::BAD_REQUEST, &body);
                }
            },
        };
        let limit = params.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut page: Vec<&Value> = Vec::new();
        let mut last = None;
        let mut more = false;
        let objects = store.objects.range((from, Bound::Unbounded));
        for ((_, namespace, name), object) in objects.take_while(|((r, _, _), _)| *r == resource) {
            if !params.matches(object) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(object);
            last = Some(format!("{namespace}/{name}"));
        }
        let mut metadata = json!({"resourceVersion": store.version.to_string()});
        if let (true, Some(last)) = (more, last) {
            metadata["continue"] = last.into();
        }
        let body = json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": page,
        });
        json_response(StatusCode::OK, &body)
    }

    fn watch(self: &Arc<Self>, resource: Resource, params: Params) -> Response {
        let settings = *lock(&self.settings);
        let mut changes = self.changes.subscribe();
        let mut generation = self.generation.subscribe();
        let (sender, receiver) = mpsc::channel::<String>(256);
        let from: u64 = params.resource_version.as_deref().unwrap_or("0").parse().unwrap_or(0);
        let (backlog, gone, compacted, mut version) = {
            let mut store = lock(&self.store);
            store.requests.push(format!("WATCH {} from {from}", resource.plural()));
            let gone = from != 0 && from < store.compacted;
            let backlog: Vec<Change> = store
                .history
                .iter()
                .filter(|c| c.resource == resource && c.version > from)
                .cloned()
                .collect();
            // The watch has seen everything up to now: the backlog of its resource, and the
            // other resources' changes, which later bookmarks count too.
            (backlog, gone, store.compacted, from.max(store.version))
        };
        let timeout = params
            .timeout_seconds
            .map_or(settings.max_watch, Duration::from_secs)
            .min(settings.max_watch);
        let bookmarks = params.allow_watch_bookmarks.unwrap_or(false);
        tokio::spawn(async move {
            let line = |kind: &str, object: &Value| {
                format!("{}\n", json!({"type": kind, "object": object}))
            };
            if gone {
                let message = format!("too old resource version: {from} ({compacted})");
                let _ = sender.send(line("ERROR", &status(410, "Expired", message))).await;
                return;
            }
            let event = |change: &Change| -> Option<String> {
                let was = change.old.as_ref().is_some_and(|o| params.matches(o));
                let is = change.new.as_ref().is_some_and(|n| params.matches(n));
                match (was, is, &change.new) {
                    (false, true, Some(new)) => Some(line("ADDED", new)),
                    (true, true, Some(new)) => Some(line("MODIFIED", new)),
                    (true, false, _) => {
                        let mut gone = change.new.clone().or_else(|| change.old.clone())?;
                        gone["metadata"]["resourceVersion"] = change.version.to_string().into();
                        Some(line("DELETED", &gone))
                    }
                    _ => None,
                }
            };
            for change in &backlog {
                if let Some(line) = event(change)
                    && sender.send(line).await.is_err()
                {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut bookmark = tokio::time::interval(settings.bookmark_interval);
            bookmark.tick().await;
            loop {
                let line = tokio::select! {
                    _ = &mut deadline => return,
                    _ = generation.changed() => return,
                    _ = bookmark.tick(), if bookmarks => {
                        let object = json!({"kind": resource.kind(), "apiVersion": resource.api_version(),
                                            "metadata": {"resourceVersion": version.to_string()}});
                        line("BOOKMARK", &object)
                    }
                    change = changes.recv() => match change {
                        Ok(change) if change.resource == resource && change.version > version => {
                            version = change.version;
                            match event(&change) { Some(line) => line, None => continue }
                        }
                        // Another resource's change: later bookmarks carry its version.
                        Ok(change) => { version = version.max(change.version); continue }
                        // Fell behind: end the watch, as an API server does.
                        Err(_) => return,
                    },
                };
                if sender.send(line).await.is_err() {
                    return;
                }
            }
        });
        let body = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|line| (Ok::<_, Infallible>(line), receiver))
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(body))
            .expect("a valid response")
    }
}

async fn serve_resource(
    State((shared, resource)): State<(Arc<Shared>, Resource)>,
    Query(params): Query<Params>,
) -> Response {
    if lock(&shared.store).failing.contains(&resource) {
        let message = format!(
            "{} is forbidden: User \"system:serviceaccount:kube-system:kube-ipvs\" cannot list resource",
            resource.plural()
        );
        return json_response(StatusCode::FORBIDDEN, &status(403, "Forbidden", message));
    }
    if params.watching() { shared.watch(resource, params) } else { shared.list(resource, &params) }
}

/// One object: `GET` reads it, `PUT` creates or replaces it (the body's kind must be the
/// path's, and its name and namespace are the path's), `DELETE` deletes it.
async fn serve_object(
    State((shared, resource)): State<(Arc<Shared>, Resource)>,
    Path(path): Path<BTreeMap<String, String>>,
    method: Method,
    body: Bytes,
) -> Response {
    let name = path.get("name").cloned().unwrap_or_default();
    let namespace = path.get("namespace").cloned().unwrap_or_default();
    let not_found = || {
        let message = format!("{} \"{name}\" not found", resource.plural());
        json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", message))
    };
    let bad = |message: String| {
        json_response(StatusCode::BAD_REQUEST, &status(400, "BadRequest", message))
    };
    match method {
        Method::GET => match shared.get(resource, &namespace, &name) {
            Some(object) => json_response(StatusCode::OK, &object),
            None => not_found(),
        },
        Method::DELETE => {
            if shared.delete(resource, &namespace, &name) {
                let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Success"});
                json_response(StatusCode::OK, &body)
            } else {
                not_found()
            }
        }
        _ => {
            let mut object: Value = match serde_json::from_slice(&body) {
                Ok(object) => object,
                Err(err) => return bad(format!("the body is not a JSON object: {err}")),
            };
            if object["kind"].as_str() != Some(resource.kind()) {
                return bad(format!("the body's kind is not {}", resource.kind()));
            }
            if !meta(&object, "name").is_empty() && meta(&object, "name") != name {
                return bad(format!("the body's name is not {name:?}"));
            }
            object["metadata"]["name"] = name.clone().into();
            if resource.namespaced() {
                object["metadata"]["namespace"] = namespace.clone().into();
            }
            let Ok(version) = shared.apply(object) else { return bad("not stored".into()) };
            let key = (resource, namespace, name);
            let stored = lock(&shared.store).objects.get(&key).cloned();
            json_response(StatusCode::OK, &stored.unwrap_or(json!({"resourceVersion": version})))
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let route = |resource| get(serve_resource).with_state((shared.clone(), resource));
    let object = |resource| {
        get(serve_object)
            .put(serve_object)
            .delete(serve_object)
            .with_state((shared.clone(), resource))
    };
    Router::new()
        .route("/api/v1/services", route(Resource::Services))
        .route("/apis/discovery.k8s.io/v1/endpointslices", route(Resource::EndpointSlices))
        .route("/api/v1/nodes", route(Resource::Nodes))
        .route("/api/v1/namespaces/{namespace}/services/{name}", object(Resource::Services))
        .route(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}",
            object(Resource::EndpointSlices),
        )
        .route("/api/v1/nodes/{name}", object(Resource::Nodes))
        .route("/readyz", get(|| async { "ok" }))
        .fallback(|| async {
            json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", "not served by the fake API server".into()),
            )
        })
}

/// Accepts connections until aborted; aborting it closes every connection too.
async fn accept(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        // As the real API server (Go sets TCP_NODELAY on every connection): a watch event is
        // written at once, not held back by Nagle's algorithm for the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        connections.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
        while connections.try_join_next().is_some() {}
    }
}

impl FakeApiServer {
    /// A server on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A server on `address`.
    pub async fn start_on(address: SocketAddr) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            store: Mutex::default(),
            changes: broadcast::channel(65_536).0,
            generation: watch::channel(0).0,
            settings: Mutex::default(),
        });
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, router(shared.clone())));
        Ok(Self { shared, address, task: Mutex::new(Some(task)) })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A kubeconfig for it.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.address
        )
    }

    /// Changes server-side settings (for watches started from now on).
    pub fn set(&self, settings: Settings) {
        *lock(&self.shared.settings) = settings;
    }

    /// Creates or replaces an object (its `kind` says which resource); returns its new
    /// resource version. Namespaced objects without a namespace go to `default`.
    ///
    /// # Panics
    /// If the object's kind is not served or it has no name: a mistake in the test.
    pub fn apply(&self, object: Value) -> u64 {
        self.shared.apply(object).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        self.shared.delete(resource, namespace, name)
    }

    /// Forgets the history: a watch resumed from an older version than the current one gets
    /// `410 Gone` and the client has to list again.
    pub fn compact(&self) {
        let mut store = lock(&self.shared.store);
        store.compacted = store.version;
        store.history.clear();
    }

    /// Shuts down as a kube-apiserver does on SIGTERM: its own address leaves the
    /// `kubernetes` Service's endpoints (the `default/kubernetes` EndpointSlice's endpoints
    /// are emptied, when there is one), every watch is closed (after that change has gone out
    /// to them), and it stops listening: connections are refused until
    /// [`FakeApiServer::restart`].
    pub async fn shut_down(&self) {
        let key = (Resource::EndpointSlices, "default".to_owned(), "kubernetes".to_owned());
        let slice = lock(&self.shared.store).objects.get(&key).cloned();
        if let Some(mut slice) = slice {
            let own = slice["endpoints"].take();
            slice["endpoints"] = json!([]);
            self.apply(slice);
            lock(&self.shared.store).own_endpoints = Some(own);
            // The watches send what they have before they are closed.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop().await;
    }

    /// Starts again after [`FakeApiServer::shut_down`], as a restarted kube-apiserver: its
    /// address is back in the `kubernetes` Service's endpoints, and its new watch cache holds
    /// no history, so a watch from a resourceVersion before the restart gets `410 Expired`.
    pub async fn restart(&self) -> std::io::Result<()> {
        let own = lock(&self.shared.store).own_endpoints.take();
        let key = (Resource::EndpointSlices, "default".to_owned(), "kubernetes".to_owned());
        let slice = lock(&self.shared.store).objects.get(&key).cloned();
        match (own, slice) {
            (Some(own), Some(mut slice)) => {
                slice["endpoints"] = own;
                self.apply(slice);
            }
            // A restarted server writes (leases, its endpoints) before it serves: its
            // resourceVersion is newer than any a client saw.
            _ => lock(&self.shared.store).version += 1,
        }
        self.compact();
        self.resume().await
    }

    /// Ends every open watch (the connections stay up).
    pub fn drop_watches(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Stops serving: the listener closes and every connection is cut, so clients see
    /// connections refused until [`FakeApiServer::resume`].
    pub async fn stop(&self) {
        let task = lock(&self.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        self.drop_watches();
    }

    /// Serves again on the same address.
    pub async fn resume(&self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.address).await?;
        let task = tokio::spawn(accept(listener, router(self.shared.clone())));
        *lock(&self.task) = Some(task);
        Ok(())
    }

    /// The lists and watches served, in order, as `LIST services` or
    /// `WATCH services from 12`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.store).requests.clone()
    }

    /// Refuses every list and watch of `resource` with 403 Forbidden, as an API server does
    /// when RBAC lacks a rule (`true`), or serves them again. (A 503 would be retried inside
    /// the client.)
    pub fn fail(&self, resource: Resource, failing: bool) {
        let mut store = lock(&self.shared.store);
        if failing {
            store.failing.insert(resource);
        } else {
            store.failing.remove(&resource);
        }
    }

    /// The current resource version.
    pub fn version(&self) -> u64 {
        lock(&self.shared.store).version
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        self.drop_watches();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn selectors_are_kube_proxys_selectors() {
        let service = |cluster_ip: &str, labels: Value| json!({"metadata": {"name": "s", "labels": labels}, "spec": {"clusterIP": cluster_ip}});
        let headless = service("None", json!({}));
        let labelled = service("10.96.0.1", json!({"service.kubernetes.io/headless": ""}));
        let other = service("10.96.0.2", json!({"service.kubernetes.io/service-proxy-name": "x"}));
        assert!(!fields_match("spec.clusterIP!=None", &headless));
        assert!(fields_match("spec.clusterIP!=None", &labelled));
        assert!(fields_match("spec.clusterIP=None", &headless));
        assert!(labels_match("!service.kubernetes.io/service-proxy-name", &labelled));
        assert!(!labels_match("!service.kubernetes.io/service-proxy-name", &other));
        assert!(!labels_match("!service.kubernetes.io/headless", &labelled));
        assert!(!fields_match("spec.unknown=x", &labelled), "an unknown field matches nothing");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_restart_removes_its_endpoint_refuses_connections_and_expires_old_watches() {
        let server = FakeApiServer::start().await.unwrap();
        let own = json!([{"addresses": ["192.168.99.1"], "conditions": {"ready": true}}]);
        server.apply(json!({"kind": "EndpointSlice", "addressType": "IPv4", "endpoints": own,
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}}}));
        let before = server.version();
        let address = server.address();
        let path = "/apis/discovery.k8s.io/v1/endpointslices";
        server.shut_down().await;
        let get_now = move |path: String| {
            tokio::task::spawn_blocking(move || {
                std::net::TcpStream::connect(address).map(|_| ()).map(|()| get(address, &path))
            })
        };
        assert!(get_now(path.into()).await.unwrap().is_err(), "connections refused");
        server.restart().await.unwrap();
        let list = get_now(path.into()).await.unwrap().unwrap();
        assert!(list.contains("192.168.99.1"), "its endpoint is back: {list}");
        let watch = get_now(format!("{path}?watch=1&resourceVersion={before}")).await.unwrap();
        let watch = watch.unwrap();
        assert!(watch.contains("\"code\":410") && watch.contains("Expired"), "{watch}");
        assert!(watch.contains(&format!("too old resource version: {before} (")), "{watch}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn watches_end_at_the_server_limit() {
        let server = FakeApiServer::start().await.unwrap();
        server.set(Settings {
            bookmark_interval: Duration::from_millis(100),
            max_watch: Duration::from_millis(500),
        });
        let address = server.address();
        let started = std::time::Instant::now();
        let text = tokio::task::spawn_blocking(move || {
            get(address, "/api/v1/services?watch=1&allowWatchBookmarks=true&timeoutSeconds=290")
        })
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "{text}");
        assert!(text.contains("BOOKMARK"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_list_is_paged_from_the_last_key_of_the_page_before() {
        let server = FakeApiServer::start().await.unwrap();
        for name in ["e", "a", "d", "b", "c"] {
            let metadata = json!({"name": name, "namespace": "ns"});
            server.apply(json!({"kind": "Service", "metadata": metadata,
                                "spec": {"clusterIP": "10.96.0.1"}}));
        }
        // A slice sorts after the Services: no page reads into it.
        server.apply(json!({"kind": "EndpointSlice", "addressType": "IPv4", "endpoints": [],
            "metadata": {"name": "a", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "a"}}}));
        let address = server.address();
        let page = move |token: Option<String>| async move {
            let mut path = "/api/v1/services?limit=2".to_owned();
            if let Some(token) = token {
                path.push_str(&format!("&continue={token}"));
            }
            let text = tokio::task::spawn_blocking(move || get(address, &path)).await.unwrap();
            let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
            let list: Value = serde_json::from_str(body).unwrap();
            let names: Vec<String> = (list["items"].as_array().unwrap().iter())
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
                .collect();
            (names, list["metadata"]["continue"].as_str().map(str::to_owned))
        };
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let (names, next) = page(token).await;
            assert!(names.len() <= 2, "{names:?}");
            seen.extend(names);
            match next {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
        let bad = tokio::task::spawn_blocking(move || get(address, "/api/v1/services?continue=x"));
        assert!(bad.await.unwrap().contains("invalid continue token"));
    }
}
