//! The checks of `cargo xtask e2e`, run on the host against a kind cluster where kube-ipvs
//! replaces kube-proxy (xtask creates the cluster and deploys kube-ipvs; `KUBECONFIG` points
//! at it).
//!
//! It runs the VM cluster's workload and checks (`vm_tests::cluster::objects`,
//! `vm_tests::checks::cluster`) on kind: on each node, two `web` pods, an `echo` pod and a
//! client pod (socat, answering each connection and datagram with the pod's name and the
//! peer's address, as the VM's pods do), the same Services and hand-written EndpointSlices,
//! zones on the nodes, and the host as the outside client (with a second address on the kind
//! network, which the load balancer's source ranges refuse, and a route to the load-balancer
//! range through a worker; both removed at the end).

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use vm_tests::{
    checks::cluster::{
        self as checks, Backend, Backends, ClusterView, NodeRef, Origin, Reply, Transport, Workload,
    },
    cluster::{
        objects::{self, Endpoint, NAMESPACE},
        request,
    },
    daemon::{eventually, http_get},
};

const LIMIT: Duration = Duration::from_secs(180);
/// The pods' image: socat answers every connection and datagram.
const IMAGE: &str = "alpine/socat:1.8.0.1";
/// What every pod runs: TCP 8080 and UDP 5353 answered with `<pod> <peer address>`.
const SERVE: &str = "socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo $POD_NAME $SOCAT_PEERADDR' & \
                     exec socat UDP-RECVFROM:5353,fork SYSTEM:'echo $POD_NAME $SOCAT_PEERADDR'";

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

/// `kubectl apply` of one object.
fn apply(object: &Value) {
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child.stdin.take().expect("piped").write_all(object.to_string().as_bytes()).expect("written");
    assert!(child.wait().expect("kubectl ends").success(), "kubectl apply of {object}");
}

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()).ok_or_else(
        || format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)),
    )
}

/// The kind cluster as the checks see it.
struct Kind {
    /// kube-ipvs's pod on each node.
    agents: BTreeMap<String, String>,
}

impl ClusterView for Kind {
    fn ask(
        &self,
        origin: Origin<'_>,
        target: SocketAddr,
        transport: Transport,
    ) -> Result<Reply, String> {
        match origin {
            Origin::Outside(source) => request(target, transport, Some(source)),
            Origin::Pod(pod) => {
                let command = match transport {
                    Transport::Tcp => {
                        format!("socat -T2 - TCP:{target},connect-timeout=1 </dev/null")
                    }
                    Transport::Udp => format!("echo who | socat -T2 - UDP:{target}"),
                };
                let text = kubectl(&["-n", NAMESPACE, "exec", pod, "--", "sh", "-c", &command])?;
                Reply::parse(&text).map_err(|e| format!("{target}: {e}"))
            }
        }
    }

    fn http_status(&self, target: SocketAddr) -> Result<u16, String> {
        http_get(target, "/").map(|(code, _)| code).map_err(|e| format!("{target}: {e}"))
    }

    fn ipvsadm(&self, node: &str) -> Result<String, String> {
        kubectl(&["-n", "kube-system", "exec", &self.agents[node], "--", "ipvsadm", "-Ln"])
    }

    fn ls(&self, node: &str) -> Result<String, String> {
        kubectl(&["-n", "kube-system", "exec", &self.agents[node], "--", "kube-ipvs", "ls"])
    }

    fn ls_diff(&self, node: &str) -> Result<String, String> {
        kubectl(&[
            "-n",
            "kube-system",
            "exec",
            &self.agents[node],
            "--",
            "kube-ipvs",
            "ls",
            "--diff",
        ])
    }
}

fn pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "kube-ipvs-e2e"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "serve", "image": IMAGE, "command": ["sh", "-c", SERVE],
                                 "env": [{"name": "POD_NAME", "value": name}]}]},
    })
}

fn main() {
    // The nodes, in order: a, b (zone-1) and c (zone-2).
    let rows = must(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.addresses[?(@.type==\"InternalIP\")].address}{\"\\n\"}{end}",
    ]);
    let nodes: Vec<(String, Ipv4Addr)> = rows
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, ip)| (n.to_owned(), ip.trim().parse().expect("a node address")))
        .collect();
    assert_eq!(nodes.len(), 3, "the kind cluster has three nodes: {nodes:?}");
    let short = ["a", "b", "c"];
    let zone = |i: usize| if i < 2 { "zone-1" } else { "zone-2" };
    for (i, (node, _)) in nodes.iter().enumerate() {
        must(&[
            "label",
            "node",
            node,
            &format!("topology.kubernetes.io/zone={}", zone(i)),
            "--overwrite",
        ]);
    }

    // The host is the outside client, with a second address the source ranges refuse.
    let gateway = sh(
        "docker",
        &["network", "inspect", "kind", "-f", "{{range .IPAM.Config}}{{.Gateway}} {{end}}"],
    )
    .expect("the kind network");
    let outside: Ipv4Addr =
        gateway.split_whitespace().find_map(|g| g.parse().ok()).expect("an IPv4 gateway");
    let bridge =
        sh("ip", &["-o", "route", "get", &nodes[0].1.to_string()]).expect("a route to the nodes");
    let device =
        bridge.split_whitespace().skip_while(|w| *w != "dev").nth(1).expect("a device").to_owned();
    let [a, b, c, _] = outside.octets();
    let refused = Ipv4Addr::new(a, b, c, 254);
    let _ = sh("ip", &["addr", "add", &format!("{refused}/32"), "dev", &device]);
    let _ = sh("ip", &["route", "add", "192.0.2.0/24", "via", &nodes[1].1.to_string()]);

    apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}));
    let mut placed: Vec<(String, usize)> = Vec::new();
    for (i, (node, _)) in nodes.iter().enumerate() {
        for name in ["web-{}1", "web-{}2", "echo-{}", "client-{}"] {
            let name = name.replace("{}", short[i]);
            apply(&pod(&name, node));
            placed.push((name, i));
        }
    }
    must(&[
        "-n",
        NAMESPACE,
        "wait",
        "pod",
        "-l",
        "app=kube-ipvs-e2e",
        "--for=condition=Ready",
        "--timeout=180s",
    ]);
    let ips: BTreeMap<String, Ipv4Addr> = must(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        "app=kube-ipvs-e2e",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.podIP}{\"\\n\"}{end}",
    ])
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(n, ip)| (n.to_owned(), ip.trim().parse().expect("a pod address")))
    .collect();
    let endpoint = |name: &str| {
        let i = placed.iter().find(|(n, _)| n == name).expect("a pod").1;
        Endpoint::ready(ips[name], name, &nodes[i].0, zone(i))
    };
    let set = |prefix: &str| -> Vec<String> {
        placed.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(n, _)| n.clone()).collect()
    };
    let (web, echo) = (set("web-"), set("echo-"));

    for service in objects::services(outside) {
        if service["metadata"]["name"] == "kubernetes" {
            continue;
        }
        apply(&service);
        if let Some(status) = service.get("status") {
            let name = service["metadata"]["name"].as_str().expect("a name");
            must(&[
                "-n",
                NAMESPACE,
                "patch",
                "service",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ]);
        }
    }
    let endpoints = |pods: &[String]| pods.iter().map(|p| endpoint(p)).collect::<Vec<_>>();
    apply(&objects::slice("web", &endpoints(&web), false));
    for (service, members, hints) in [
        ("sticky", &echo[..], false),
        ("local", &echo[..2], false),
        ("internal", &echo[..2], false),
        ("zoned", &echo[..], true),
        ("lb", &echo[..], false),
        ("hairpin", &echo[..1], false),
    ] {
        apply(&objects::slice(service, &endpoints(members), hints));
    }

    let agents: BTreeMap<String, String> = nodes
        .iter()
        .map(|(node, _)| {
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
            (node.clone(), agent)
        })
        .collect();
    let kind = Kind { agents };
    let backends = |pods: &[String]| Backends {
        pods: pods
            .iter()
            .map(|p| Backend {
                pod: p.clone(),
                node: nodes[placed.iter().find(|(n, _)| n == p).unwrap().1].0.clone(),
            })
            .collect(),
    };
    let socket = |ip: Ipv4Addr, port| SocketAddr::new(IpAddr::V4(ip), port);
    let workload = Workload {
        nodes: nodes
            .iter()
            .enumerate()
            .map(|(i, (name, ip))| NodeRef {
                name: name.clone(),
                zone: zone(i).into(),
                ip: IpAddr::V4(*ip),
                client: format!("client-{}", short[i]),
            })
            .collect(),
        outside: (IpAddr::V4(outside), IpAddr::V4(refused)),
        web: backends(&web),
        web_tcp: socket(objects::WEB, 80),
        web_udp: socket(objects::WEB, 53),
        web_node_port: objects::WEB_NODE_PORT,
        echo: backends(&echo),
        sticky: socket(objects::STICKY, 80),
        local_node_port: objects::LOCAL_NODE_PORT,
        health_check_node_port: objects::HEALTH_CHECK_NODE_PORT,
        local_nodes: nodes[..2].iter().map(|(n, _)| n.clone()).collect(),
        internal: socket(objects::INTERNAL, 80),
        zoned: socket(objects::ZONED, 80),
        hairpin: socket(objects::HAIRPIN, 80),
        hairpin_pod: echo[0].clone(),
        load_balancer: socket(objects::LB_INGRESS, 80),
    };
    // Every node has programmed everything once its table is as desired.
    eventually(LIMIT, || {
        nodes.iter().try_for_each(|(node, _)| match kind.ls_diff(node) {
            Ok(diff) if diff.trim().is_empty() => Ok(()),
            other => Err(format!("{node}: {other:?}")),
        })
    });
    let outcomes = checks::all(&kind, &workload);
    print!("{}", checks::table(&outcomes));
    let _ = sh("ip", &["route", "del", "192.0.2.0/24"]);
    let _ = sh("ip", &["addr", "del", &format!("{refused}/32"), "dev", &device]);
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    println!("e2e: {} checks passed, {failed} failed", outcomes.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
