//! `cargo xtask e2e`: kube-ipvs in place of kube-proxy on a kind cluster.
//!
//! Creates a kind cluster with kube-proxy disabled (`kubeProxyMode: none`), builds the image
//! from `deploy/Dockerfile` and loads it into the nodes, applies `deploy/` with that image,
//! waits for the DaemonSet, then runs the checks (`tests/vm/src/bin/kind_e2e.rs`: the VM
//! cluster's workload and its checks, `vm_tests::checks::cluster`) from the host. The cluster is deleted afterwards,
//! unless `--keep`. Needs docker with a running daemon, kind and kubectl; without them it
//! stops before doing anything, says what is missing, and exits with status 2.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{
    util::{describe, have, output, run, target_dir, workspace_root},
    vmtest::build_binary,
};

/// The kind cluster's name.
const CLUSTER: &str = "kube-ipvs-e2e";
/// The image built and loaded into the nodes.
const IMAGE: &str = "kube-ipvs:e2e";
/// The image `deploy/` names.
const DEPLOYED_IMAGE: &str = "ghcr.io/kube-ipvs/kube-ipvs:0.1.0";
/// kind nodes share the host's kernel: IPVS and its schedulers must be loadable there.
const HOST_MODULES: &[&str] =
    &["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_sh", "nf_conntrack", "nf_tables"];

/// Two workers, so that `externalTrafficPolicy: Local` has a node without every endpoint.
const KIND_CONFIG: &str = "kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  kubeProxyMode: none
  podSubnet: 10.244.0.0/16
  serviceSubnet: 10.96.0.0/16
nodes:
- role: control-plane
- role: worker
- role: worker
";

/// What is missing to run on this machine, if anything.
fn missing() -> Option<String> {
    let absent: Vec<&str> =
        ["docker", "kind", "kubectl"].into_iter().filter(|p| !have(p)).collect();
    if !absent.is_empty() {
        return Some(format!("{} not found on PATH", absent.join(", ")));
    }
    let daemon = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
    match daemon {
        Ok(out) if out.status.success() => None,
        _ => {
            Some("docker is installed but its daemon does not answer (`docker info` failed)".into())
        }
    }
}

fn kubectl(kubeconfig: &std::path::Path) -> Command {
    let mut command = Command::new("kubectl");
    command.env("KUBECONFIG", kubeconfig);
    command
}

/// Runs the end-to-end checks on a kind cluster.
pub(crate) fn run_e2e(keep: bool) -> Result<()> {
    if let Some(what) = missing() {
        // Not a failure of kube-ipvs: the run did not happen. Exit status 2 says so.
        eprintln!(
            "cargo xtask e2e: skipped: it needs docker (with a running daemon), kind and kubectl, \
             and {what}. Nothing was done. The same checks run in the VM: \
             cargo xtask cluster"
        );
        std::process::exit(2);
    }
    let dir = target_dir().join("e2e");
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    for module in HOST_MODULES {
        if let Err(err) = output({
            let mut c = Command::new("modprobe");
            c.arg(module);
            c
        }) {
            eprintln!("xtask: warning: cannot load {module} on the host: {err:#}");
        }
    }

    let clusters = output({
        let mut c = Command::new("kind");
        c.args(["get", "clusters"]);
        c
    })?;
    if !clusters.lines().any(|c| c == CLUSTER) {
        let config = dir.join("kind.yaml");
        std::fs::write(&config, KIND_CONFIG)?;
        let mut create = Command::new("kind");
        create.args(["create", "cluster", "--name", CLUSTER, "--wait", "180s", "--config"]);
        create.arg(&config).arg("--kubeconfig").arg(&kubeconfig);
        run(create)?;
    } else {
        let mut get = Command::new("kind");
        get.args(["get", "kubeconfig", "--name", CLUSTER]);
        std::fs::write(&kubeconfig, output(get)?)?;
    }
    let result = deploy_and_check(&kubeconfig);
    if keep {
        eprintln!("xtask: keeping the cluster: KUBECONFIG={} kubectl …", kubeconfig.display());
    } else {
        let mut delete = Command::new("kind");
        delete.args(["delete", "cluster", "--name", CLUSTER]);
        if let Err(err) = run(delete) {
            eprintln!("xtask: warning: {err:#}");
        }
    }
    result
}

fn deploy_and_check(kubeconfig: &std::path::Path) -> Result<()> {
    let root = workspace_root();
    let mut build = Command::new("docker");
    build.args(["build", "-f", "deploy/Dockerfile", "-t", IMAGE, "."]).current_dir(&root);
    run(build)?;
    let mut load = Command::new("kind");
    load.args(["load", "docker-image", IMAGE, "--name", CLUSTER]);
    run(load)?;

    // deploy/ as it is, with the image just built.
    let mut render = kubectl(kubeconfig);
    render.args(["kustomize"]).arg(root.join("deploy"));
    let manifests = output(render)?;
    anyhow::ensure!(manifests.contains(DEPLOYED_IMAGE), "deploy/ no longer names {DEPLOYED_IMAGE}");
    let manifests = manifests.replace(DEPLOYED_IMAGE, IMAGE);
    let rendered = target_dir().join("e2e/deploy.yaml");
    std::fs::write(&rendered, manifests)?;
    let mut apply = kubectl(kubeconfig);
    apply.args(["apply", "-f"]).arg(&rendered);
    run(apply)?;
    // No proxy serves the `kubernetes` Service before kube-ipvs does: it reaches the API
    // server at the control-plane node's own address (deploy/configmap.yaml says how).
    let mut inspect = Command::new("docker");
    inspect.args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"]);
    inspect.arg(format!("{CLUSTER}-control-plane"));
    let api_host = output(inspect)?.trim().to_owned();
    let patch = format!(r#"{{"data":{{"apiServerHost":"{api_host}","apiServerPort":"6443"}}}}"#);
    let mut configure = kubectl(kubeconfig);
    configure.args(["-n", "kube-system", "patch", "configmap", "kube-ipvs", "--type=merge", "-p"]);
    configure.arg(&patch);
    run(configure)?;
    let mut restart = kubectl(kubeconfig);
    restart.args(["-n", "kube-system", "rollout", "restart", "daemonset/kube-ipvs"]);
    run(restart)?;
    let mut rollout = kubectl(kubeconfig);
    rollout.args(["-n", "kube-system", "rollout", "status", "daemonset/kube-ipvs"]);
    rollout.arg("--timeout=300s");
    run(rollout)?;

    let checks = build_binary("kind-e2e", false)?;
    let mut command = Command::new(&checks);
    command.env("KUBECONFIG", kubeconfig);
    eprintln!("+ {}", describe(&command));
    let status = command.status().with_context(|| format!("cannot run {}", checks.display()))?;
    if !status.success() {
        let mut logs = kubectl(kubeconfig);
        logs.args(["-n", "kube-system", "logs", "daemonset/kube-ipvs", "--tail=100"]);
        let _ = run(logs);
        bail!("the end-to-end checks failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kind_config_disables_kube_proxy() {
        let config = super::KIND_CONFIG;
        assert!(config.lines().any(|l| l.trim() == "kubeProxyMode: none"), "{config}");
        assert_eq!(config.matches("role: worker").count(), 2);
    }
}
