//! `deploy/`: every manifest parses into its k8s-openapi type with no field left over, the
//! RBAC rules grant exactly what the code asks of the API server, the ConfigMap is a
//! configuration kube-ipvs takes without a warning, the DaemonSet points at it and at the
//! health port, and the dashboard only uses metrics kube-ipvs exports.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every document of every manifest in `deploy/`, with its file.
fn documents() -> Vec<(String, Value)> {
    let mut documents = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap();
            documents.push((path.file_name().unwrap().to_string_lossy().into_owned(), value));
        }
    }
    documents
}

/// The fields of `original` that `typed` lost: a typo, or a field of another API version.
fn lost(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => lost(value, other, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn strict<K: serde::de::DeserializeOwned + serde::Serialize>(file: &str, value: &Value) -> K {
    let typed: K = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut unknown = Vec::new();
    lost(value, &serde_json::to_value(&typed).unwrap(), "", &mut unknown);
    assert!(unknown.is_empty(), "{file}: unknown fields {unknown:?}");
    typed
}

struct Deploy {
    role: ClusterRole,
    config: ConfigMap,
    daemon_set: DaemonSet,
}

fn parse() -> Deploy {
    let (mut role, mut config, mut daemon_set) = (None, None, None);
    let mut kinds = BTreeSet::new();
    for (file, value) in documents() {
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "ServiceAccount" => drop(strict::<ServiceAccount>(&file, &value)),
            "ClusterRole" => role = Some(strict::<ClusterRole>(&file, &value)),
            "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(&file, &value)),
            "ConfigMap" => config = Some(strict::<ConfigMap>(&file, &value)),
            "DaemonSet" => daemon_set = Some(strict::<DaemonSet>(&file, &value)),
            other => panic!("{file}: unexpected kind {other:?}"),
        }
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    Deploy { role: role.unwrap(), config: config.unwrap(), daemon_set: daemon_set.unwrap() }
}

#[test]
fn every_manifest_is_exactly_its_type() {
    parse();
}

#[test]
fn rbac_grants_exactly_what_the_code_asks() {
    let role = parse().role;
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut asked = BTreeSet::new();
    for (group, resource, verbs) in kube_ipvs::source::api::access() {
        for verb in verbs {
            asked.insert((group.clone(), resource.clone(), verb.to_owned()));
        }
    }
    assert_eq!(granted, asked);
}

#[test]
fn the_config_map_is_a_configuration_without_warnings() {
    let deploy = parse();
    let text = &deploy.config.data.as_ref().unwrap()["config.conf"];
    let (config, warnings) = kube_ipvs::config::load(&Default::default(), Some(text)).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");

    let pod = deploy.daemon_set.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    assert_eq!(args[0], "run");
    let config_file = args.iter().find_map(|a| a.strip_prefix("--config=")).unwrap();
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| config_file.starts_with(&m.mount_path))
        .expect("the config file is on a mounted volume");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    assert_eq!(
        volume.config_map.as_ref().unwrap().name,
        deploy.config.metadata.name.clone().unwrap()
    );
    assert!(config_file.ends_with("/config.conf"));
    let env = container.env.iter().flatten().find(|e| e.name == "NODE_NAME").unwrap();
    let field = env.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    // The probes ask kube-proxy's health endpoints, on the configured port.
    let port = i32::from(config.healthz_bind_address.port());
    for (probe, path) in
        [(&container.liveness_probe, "/livez"), (&container.readiness_probe, "/healthz")]
    {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port));
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let text = std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap();
    let kustomization: Value = serde_norway::from_str(&text).unwrap();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let files: BTreeSet<String> = documents().into_iter().map(|(file, _)| file).collect();
    assert_eq!(listed, files);
}

#[test]
fn the_dashboard_uses_only_exported_metrics() {
    let metrics = kube_ipvs::metrics::Metrics::new();
    // Families show in the exposition once they have a sample.
    let kind = kube_ipvs::metrics::Kind { kind: "x".into() };
    for family in [
        &metrics.netlink_messages,
        &metrics.netlink_errors,
        &metrics.drift_repairs,
        &metrics.watch_errors,
    ] {
        family.get_or_create(&kind).inc();
    }
    metrics.healthz.get_or_create(&kube_ipvs::metrics::Code { code: "200".into() }).inc();
    let exposition = metrics.encode();
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let text = std::fs::read_to_string(deploy().join("grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("kubeproxy_") || word.starts_with("kube_ipvs_") {
                    used.insert(word.to_owned());
                }
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        assert!(exported.contains(name.as_str()), "{name} is not exported:\n{exposition}");
    }
}
