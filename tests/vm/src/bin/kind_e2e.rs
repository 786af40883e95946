//! The checks of `cargo xtask e2e`, run on the host against a kind cluster where kube-ipvs
//! replaces kube-proxy (xtask creates the cluster and deploys kube-ipvs; `KUBECONFIG` points
//! at it). It deploys `tests/vm/e2e/workloads.yaml` and checks, from inside the cluster and
//! from the host: ClusterIP, NodePort, session affinity, `externalTrafficPolicy: Local`,
//! hairpin, scaling, and the node's IPVS table as `ipvsadm -Ln` and `kube-ipvs ls` show it.
//! The assertions are those of the VM end-to-end tests (`vm_tests::checks`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::Command,
    time::Duration,
};

use vm_tests::{
    checks,
    daemon::{eventually, http_get},
};

const WORKLOADS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/workloads.yaml");
const LIMIT: Duration = Duration::from_secs(180);

fn kubectl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("kubectl").args(args).output().map_err(|e| format!("kubectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

fn must(args: &[&str]) -> String {
    kubectl(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Lines of `name value…` from a jsonpath.
fn table(args: &[&str]) -> Vec<Vec<String>> {
    must(args)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

struct Web {
    /// Ready pod name → (node, address).
    pods: BTreeMap<String, (String, String)>,
}

fn web_pods() -> Web {
    let all = table(&[
        "-n",
        "e2e",
        "get",
        "pods",
        "-l",
        "app=web",
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ]);
    // Pods being deleted have a fourth column, their deletion timestamp.
    let pods = all
        .into_iter()
        .filter(|row| row.len() == 3)
        .map(|row| (row[0].clone(), (row[1].clone(), row[2].clone())))
        .collect();
    Web { pods }
}

fn cluster_ip(service: &str) -> String {
    must(&["-n", "e2e", "get", "service", service, "-o", "jsonpath={.spec.clusterIP}"])
}

/// `wget` from the client pod.
fn from_client(url: &str) -> Result<String, String> {
    kubectl(&["-n", "e2e", "exec", "client", "--", "wget", "-qO-", "-T", "3", url])
        .map(|s| s.trim().to_owned())
}

/// `GET path` from the host.
fn from_host(address: SocketAddr, path: &str) -> Result<String, String> {
    match http_get(address, path) {
        Ok((200, body)) => Ok(body.trim().to_owned()),
        Ok((code, body)) => Err(format!("{address}{path}: {code} {body}")),
        Err(err) => Err(format!("{address}{path}: {err}")),
    }
}

fn main() {
    let mut passed = 0;
    let mut pass = |what: &str| {
        passed += 1;
        println!("e2e: ok: {what}");
    };
    must(&["apply", "-f", WORKLOADS]);
    must(&["-n", "e2e", "rollout", "status", "deployment/web", "--timeout=180s"]);
    must(&["-n", "e2e", "wait", "pod/client", "--for=condition=Ready", "--timeout=180s"]);
    let web = web_pods();
    let names: BTreeSet<String> = web.pods.keys().cloned().collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let nodes: BTreeMap<String, String> = table(&[
        "get", "nodes", "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.addresses[?(@.type==\"InternalIP\")].address}{\"\\n\"}{end}",
    ])
    .into_iter()
    .map(|row| (row[0].clone(), row[1].clone()))
    .collect();

    let web_ip = cluster_ip("web");
    eventually(LIMIT, || {
        let answers = (0..16).map(|_| from_client(&format!("http://{web_ip}/hostname")));
        checks::spread("web (ClusterIP) from a pod", answers, &names)
    });
    pass("ClusterIP from a pod reaches every endpoint");

    let (node, node_ip) = nodes.iter().find(|(n, _)| n.contains("worker")).expect("a worker");
    let node_port: SocketAddr = format!("{node_ip}:30080").parse().unwrap();
    eventually(LIMIT, || {
        checks::spread(
            "NodePort from the host",
            (0..16).map(|_| from_host(node_port, "/hostname")),
            &names,
        )
    });
    pass("NodePort from outside the cluster reaches every endpoint");

    let sticky_ip = cluster_ip("web-sticky");
    eventually(LIMIT, || {
        checks::sticky(
            "web-sticky",
            (0..8).map(|_| from_client(&format!("http://{sticky_ip}/hostname"))),
        )
    });
    pass("ClientIP session affinity keeps a client on one endpoint");

    let local: BTreeSet<String> =
        web.pods.iter().filter(|(_, (n, _))| n == node).map(|(name, _)| name.clone()).collect();
    let local_port: SocketAddr = format!("{node_ip}:30081").parse().unwrap();
    if local.is_empty() {
        let refused = from_host(local_port, "/hostname");
        assert!(refused.is_err(), "no local endpoint on {node}, yet {refused:?}");
    } else {
        eventually(LIMIT, || {
            checks::spread(
                "externalTrafficPolicy Local",
                (0..12).map(|_| from_host(local_port, "/hostname")),
                &local,
            )
        });
        let seen = from_host(local_port, "/clientip").unwrap();
        let seen_ip = seen.rsplit_once(':').map_or(seen.as_str(), |(ip, _)| ip);
        assert!(
            !nodes.values().any(|n| n == seen_ip),
            "the client address was kept, not the node's: {seen}"
        );
    }
    pass(
        "externalTrafficPolicy Local serves only this node's endpoints and keeps the client address",
    );

    // Hairpin: a pod reaching itself through its Service (netexec dials for us).
    let (pod, (_, pod_ip)) = web.pods.iter().next().unwrap();
    eventually(LIMIT, || {
        let url = format!(
            "http://{pod_ip}:8080/dial?request=hostname&protocol=http&host={web_ip}&port=80&tries=16"
        );
        let reply = from_client(&url)?;
        let reply: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| format!("{reply}: {e}"))?;
        let responses: Vec<&str> = reply["responses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str())
            .collect();
        let errors = reply["errors"].as_array().map_or(0, Vec::len);
        (errors == 0 && responses.contains(&pod.as_str())).then_some(()).ok_or(format!("{reply}"))
    });
    pass("hairpin: a pod reaches itself through its Service");

    // The node's table, as operators read it.
    let agent = must(&[
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "k8s-app=kube-ipvs",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    eventually(LIMIT, || {
        let ipvsadm = kubectl(&["-n", "kube-system", "exec", &agent, "--", "ipvsadm", "-Ln"])?;
        let ls = kubectl(&["-n", "kube-system", "exec", &agent, "--", "kube-ipvs", "ls"])?;
        if !ipvsadm.contains(&format!("TCP  {web_ip}:80 rr")) {
            return Err(format!("no virtual server for {web_ip}:\n{ipvsadm}"));
        }
        checks::ls_matches_ipvsadm(&ls, &ipvsadm)
    });
    pass("ipvsadm -Ln on a node shows the Services, and kube-ipvs ls matches it line for line");

    must(&["-n", "e2e", "scale", "deployment/web", "--replicas=2"]);
    must(&["-n", "e2e", "rollout", "status", "deployment/web", "--timeout=180s"]);
    eventually(LIMIT, || {
        let remaining: BTreeSet<String> = web_pods().pods.keys().cloned().collect();
        if remaining.len() != 2 {
            return Err(format!("{remaining:?}"));
        }
        checks::spread(
            "web after scaling to 2",
            (0..12).map(|_| from_client(&format!("http://{web_ip}/hostname"))),
            &remaining,
        )
    });
    pass("scaling down: only the remaining endpoints answer");
    println!("e2e: {passed} checks passed");
}
