//! A directory of manifests: Services, EndpointSlices and Nodes in YAML or JSON files (several
//! documents per file, and `List`s, as `kubectl apply -f DIR` takes them), followed for
//! changes. For standalone use, demos and benchmarks.
//!
//! The first scan lists everything (as a watch's initial list does); later scans send only
//! what was added, changed or removed. A document that is not a usable object is reported
//! once, with its file, and skipped; the rest of the file is still used.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use controller::desired::{ServiceInfo, Slice};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event;
use serde::Deserialize;
use serde_json::{Value, value::RawValue};
use tokio::sync::mpsc;
use tracing::warn;

use super::{Input, service_watched, slice_watched};
use controller::desired::ObjectKey as Key;

use crate::Error;

/// The objects of one or more files. Each object is parsed once and shared (by `Arc`) between
/// its file, the directory's merged view, the last scan and the daemon's cache, to which the
/// events carry it: one copy, however many views.
#[derive(Debug, Clone, Default, PartialEq)]
struct Objects {
    services: BTreeMap<Key, Arc<ServiceInfo>>,
    slices: BTreeMap<Key, Arc<Slice>>,
    nodes: BTreeMap<Key, Arc<Node>>,
}

/// Puts `old`'s object in place of each equal one in `new`, so that a file read again keeps
/// one copy of what did not change (the daemon's cache holds the old one).
fn reuse<K: PartialEq>(new: &mut BTreeMap<Key, Arc<K>>, old: &BTreeMap<Key, Arc<K>>) {
    for (key, object) in new {
        if let Some(kept) = old.get(key).filter(|kept| *kept == object) {
            *object = kept.clone();
        }
    }
}

impl Objects {
    fn reuse(&mut self, old: &Objects) {
        reuse(&mut self.services, &old.services);
        reuse(&mut self.slices, &old.slices);
        reuse(&mut self.nodes, &old.nodes);
    }

    fn extend(&mut self, other: &Objects) {
        self.services.extend(other.services.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.slices.extend(other.slices.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.nodes.extend(other.nodes.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

#[derive(Debug)]
struct File {
    modified: Option<SystemTime>,
    len: u64,
    objects: Objects,
}

/// A manifests directory and what was last read from it.
#[derive(Debug)]
pub struct Manifests {
    dir: PathBuf,
    node: String,
    files: BTreeMap<PathBuf, File>,
    current: Option<Objects>,
}

fn key(namespace: Option<&str>, name: Option<&str>) -> Key {
    Key::new(namespace.unwrap_or("default"), name.unwrap_or_default())
}

/// Parses a namespaced object as its API type `P` into `objects`, kept as a `K` (a Service as
/// a [`ServiceInfo`], an EndpointSlice as a [`Slice`]), in `default` when it names no
/// namespace. An object the API server's watch would not send (`watched` says which, by the
/// watch's selectors) is left out, as it would be.
fn insert<P: serde::de::DeserializeOwned + kube::Resource, K: From<P>>(
    document: &RawValue,
    object: &str,
    watched: fn(&P) -> bool,
    objects: &mut BTreeMap<Key, Arc<K>>,
) -> Result<(), String> {
    let mut parsed: P =
        serde_json::from_str(document.get()).map_err(|e| format!("{object}: {e}"))?;
    if !watched(&parsed) {
        return Ok(());
    }
    let meta = parsed.meta_mut();
    let key = key(meta.namespace.as_deref(), meta.name.as_deref());
    meta.namespace = Some(key.namespace.clone());
    objects.insert(key, Arc::new(K::from(parsed)));
    Ok(())
}

/// What a document is, read without building it: its kind, its name, and (for a `List`) its
/// items, as slices of the text.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: HeadMetadata,
    #[serde(default, borrow)]
    items: Vec<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct HeadMetadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// Parses one JSON document into `objects`; returns why it cannot be used. Each object is
/// deserialized straight from its text into its type: no intermediate tree.
fn add_document(document: &RawValue, objects: &mut Objects) -> Result<(), String> {
    if document.get().trim() == "null" {
        return Ok(());
    }
    let head: Head = serde_json::from_str(document.get()).map_err(|e| e.to_string())?;
    let kind = head.kind.as_str();
    let name = head.metadata.name.as_deref().unwrap_or_default();
    if kind != "List" && name.is_empty() {
        return Err(format!("a {kind:?} without metadata.name"));
    }
    // The object as errors name it: `Service default/web`.
    let object = match head.metadata.namespace.as_deref() {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None if kind == "Node" => format!("Node {name}"),
        None => format!("{kind} default/{name}"),
    };
    match kind {
        "List" => {
            let mut problems = Vec::new();
            for item in head.items {
                if let Err(problem) = add_document(item, objects) {
                    problems.push(problem);
                }
            }
            if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
        }
        "Service" => insert(document, &object, service_watched, &mut objects.services),
        "EndpointSlice" => insert(document, &object, slice_watched, &mut objects.slices),
        "Node" => {
            let node: Node =
                serde_json::from_str(document.get()).map_err(|e| format!("{object}: {e}"))?;
            objects.nodes.insert(key(Some(""), node.metadata.name.as_deref()), Arc::new(node));
            Ok(())
        }
        other => Err(format!("kind {other:?} is not a Service, EndpointSlice, Node or List")),
    }
}

/// The objects of one file's text. Problems are logged with the file's name. A `.json` file
/// is read as a stream of JSON documents; other files as YAML documents, each turned into
/// JSON text first, so that both are read by one path.
fn parse(path: &Path, text: &str) -> Objects {
    let mut objects = Objects::default();
    let add = |index: usize, result: Result<(), String>| {
        if let Err(reason) = result {
            warn!(file = %path.display(), document = index + 1, %reason, "manifest skipped");
        }
    };
    if path.extension().is_some_and(|e| e == "json") {
        let documents = serde_json::Deserializer::from_str(text).into_iter::<&RawValue>();
        for (index, document) in documents.enumerate() {
            match document {
                Ok(document) => add(index, add_document(document, &mut objects)),
                Err(e) => {
                    // The rest of the stream cannot be found again after a syntax error.
                    add(index, Err(format!("not JSON: {e}")));
                    break;
                }
            }
        }
    } else {
        for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let result = Value::deserialize(document)
                .map_err(|e| format!("not YAML: {e}"))
                .and_then(|value| {
                    serde_json::value::to_raw_value(&value).map_err(|e| e.to_string())
                })
                .and_then(|raw| add_document(&raw, &mut objects));
            add(index, result);
        }
    }
    objects
}

fn changes<K: PartialEq>(
    old: &BTreeMap<Key, Arc<K>>,
    new: &BTreeMap<Key, Arc<K>>,
    wrap: fn(Event<Arc<K>>) -> Input,
    out: &mut Vec<Input>,
) {
    for (key, object) in new {
        // A file read again keeps its unchanged objects (`reuse`): pointers first, then
        // contents (an object moved to another file is a new one with the same contents).
        if old.get(key).is_none_or(|o| !Arc::ptr_eq(o, object) && o != object) {
            out.push(wrap(Event::Apply(object.clone())));
        }
    }
    for (key, object) in old {
        if !new.contains_key(key) {
            out.push(wrap(Event::Delete(object.clone())));
        }
    }
}

fn listing<K>(
    objects: &BTreeMap<Key, Arc<K>>,
    wrap: fn(Event<Arc<K>>) -> Input,
    out: &mut Vec<Input>,
) {
    out.push(wrap(Event::Init));
    out.extend(objects.values().map(|o| wrap(Event::InitApply(o.clone()))));
    out.push(wrap(Event::InitDone));
}

impl Manifests {
    /// The manifests in `dir`; `node` is this node's name (other Nodes are ignored).
    pub fn new(dir: PathBuf, node: String) -> Self {
        Self { dir, node, files: BTreeMap::new(), current: None }
    }

    /// Reads the files that changed since the last scan, and returns the events that bring a
    /// watcher's cache from the last scan's objects to these.
    pub fn scan(&mut self) -> Result<Vec<Input>, Error> {
        let io = |source| Error::Manifests { dir: self.dir.clone(), source };
        let mut seen = BTreeMap::new();
        let mut changed = false;
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let manifest =
                matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"));
            // Follows symbolic links, as a mounted ConfigMap has them.
            let Ok(metadata) = std::fs::metadata(&path) else { continue };
            if !manifest || !metadata.is_file() {
                continue;
            }
            let (modified, len) = (metadata.modified().ok(), metadata.len());
            let old = self.files.remove(&path);
            let file = match old {
                Some(file) if file.modified == modified && file.len == len => file,
                _ => match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        changed = true;
                        let mut objects = parse(&path, &text);
                        if let Some(old) = old {
                            objects.reuse(&old.objects);
                        }
                        File { modified, len, objects }
                    }
                    Err(err) => {
                        warn!(file = %path.display(), %err, "manifest cannot be read");
                        changed = true;
                        continue;
                    }
                },
            };
            seen.insert(path, file);
        }
        // A file gone is a change too. Nothing changed: no events, and nothing rebuilt.
        changed |= !self.files.is_empty();
        self.files = seen;
        if !changed && self.current.is_some() {
            return Ok(Vec::new());
        }
        let mut all = Objects::default();
        for file in self.files.values() {
            all.extend(&file.objects);
        }
        all.nodes.retain(|key, _| key.name == self.node);
        let mut out = Vec::new();
        match &self.current {
            None => {
                listing(&all.services, Input::Service, &mut out);
                listing(&all.slices, Input::Slice, &mut out);
                listing(&all.nodes, Input::Node, &mut out);
            }
            Some(old) => {
                changes(&old.services, &all.services, Input::Service, &mut out);
                changes(&old.slices, &all.slices, Input::Slice, &mut out);
                changes(&old.nodes, &all.nodes, Input::Node, &mut out);
            }
        }
        self.current = Some(all);
        Ok(out)
    }

    /// Scans every `interval` and sends the events to `sink`, until the receiver is gone. A
    /// directory that cannot be read is reported and tried again.
    pub async fn follow(mut self, interval: Duration, sink: mpsc::Sender<Input>) {
        loop {
            match self.scan() {
                Ok(inputs) => {
                    for input in inputs {
                        if sink.send(input).await.is_err() {
                            return;
                        }
                    }
                }
                Err(err) => warn!(%err, "manifests not read; the kernel keeps its state"),
            }
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(inputs: &[Input]) -> Vec<String> {
        inputs.iter().map(ToString::to_string).collect()
    }

    const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.2]}]
---
kind: ConfigMap
metadata: {name: not-ours}
---
kind: Service
metadata: {}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}}
- {apiVersion: v1, kind: Node, metadata: {name: node-b}}
";

    #[test]
    fn the_first_scan_lists_and_later_scans_send_changes() {
        let dir = std::env::temp_dir().join(format!("kube-ipvs-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.yaml"), WEB).unwrap();
        std::fs::write(dir.join("README.md"), "not a manifest").unwrap();
        let mut manifests = Manifests::new(dir.clone(), "node-a".into());
        assert_eq!(
            names(&manifests.scan().unwrap()),
            [
                "Service init",
                "Service list default/web",
                "Service done",
                "EndpointSlice init",
                "EndpointSlice list default/web-1",
                "EndpointSlice done",
                "Node init",
                "Node list node-a",
                "Node done"
            ]
        );
        assert!(manifests.scan().unwrap().is_empty(), "nothing changed");
        let web = manifests.current.as_ref().unwrap().services.values().next().cloned().unwrap();

        // The file read again: what changed is sent, and what did not stays the same object,
        // the one the first scan sent.
        std::fs::write(dir.join("web.yaml"), WEB.replace("10.244.0.2", "10.244.0.22")).unwrap();
        assert_eq!(names(&manifests.scan().unwrap()), ["EndpointSlice apply default/web-1"]);
        let again = manifests.current.as_ref().unwrap().services.values().next().cloned().unwrap();
        assert!(Arc::ptr_eq(&web, &again), "one copy of an unchanged Service");

        let api = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: other}\nspec: {clusterIP: 10.96.0.11}\n";
        std::fs::write(dir.join("api.yml"), api).unwrap();
        assert_eq!(names(&manifests.scan().unwrap()), ["Service apply other/api"]);
        let namespace = manifests.current.as_ref().unwrap().services.keys().next().cloned();
        assert_eq!(namespace, Some(Key::new("default", "web")), "namespace defaults");

        std::fs::remove_file(dir.join("web.yaml")).unwrap();
        let removed = manifests.scan().unwrap();
        assert_eq!(removed.len(), 3, "{:?}", names(&removed));
        assert_eq!(names(&removed)[0], "Service delete default/web");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_files_are_read_as_json_streams_of_documents_and_lists() {
        let path = Path::new("all.json");
        let service = |name: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "ns"}, "spec": {"clusterIP": "10.96.0.11"}})
        };
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List",
            "items": [service("a"), service("b")]});
        let text = format!("{list}\n{}", service("c"));
        let objects = parse(path, &text);
        let names: Vec<&str> = objects.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // What the API server's watches would not send is left out, as they leave it: a
        // headless Service, and the slices labelled headless.
        let mut headless = service("h");
        headless["spec"]["clusterIP"] = "None".into();
        let mut headless_slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "h-1", "namespace": "ns",
                         "labels": {"service.kubernetes.io/headless": ""}}});
        let objects = parse(path, &format!("{headless}\n{headless_slice}"));
        assert!(objects.services.is_empty() && objects.slices.is_empty());
        headless_slice["metadata"]["labels"] = serde_json::json!({});
        assert_eq!(parse(path, &headless_slice.to_string()).slices.len(), 1);
        // A syntax error keeps what came before it.
        let objects = parse(path, &format!("{}\n{{\"kind\": ", service("d")));
        assert_eq!(objects.services.len(), 1);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let mut manifests = Manifests::new("/nonexistent/manifests".into(), "n".into());
        let err = manifests.scan().unwrap_err().to_string();
        assert!(err.starts_with("--manifests /nonexistent/manifests: "), "{err}");
    }
}
