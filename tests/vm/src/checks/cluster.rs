//! The checks of a whole cluster: Services seen from pods on every node and from outside,
//! every policy, and each node's table as operators read it. The VM cluster
//! (`vm_tests::cluster`) and the kind run (`cargo xtask e2e`) run the same [`all`] over their
//! own [`ClusterView`] and [`Workload`].

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

/// Where a request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// Inside this pod.
    Pod(&'a str),
    /// From the client outside the cluster, with this source address.
    Outside(IpAddr),
}

/// The transport of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One TCP connection.
    Tcp,
    /// One UDP datagram and its answer.
    Udp,
}

/// Who answered a request: the pod, and the source address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The pod's name.
    pub pod: String,
    /// The request's source address as the pod saw it.
    pub peer: IpAddr,
}

impl Reply {
    /// A pod's answer, `<pod> <peer address>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("an answer {text:?}, not `<pod> <address>`");
        let (pod, peer) = text.trim().split_once(' ').ok_or_else(bad)?;
        Ok(Self { pod: pod.to_owned(), peer: peer.trim().parse().map_err(|_| bad())? })
    }
}

/// What the checks need from a cluster.
pub trait ClusterView {
    /// Sends one request from `origin` to `target` and says who answered.
    fn ask(
        &self,
        origin: Origin<'_>,
        target: SocketAddr,
        transport: Transport,
    ) -> Result<Reply, String>;
    /// The status code of `GET /` at `target` from outside (a health check node port).
    fn http_status(&self, target: SocketAddr) -> Result<u16, String>;
    /// `ipvsadm -Ln` on `node`.
    fn ipvsadm(&self, node: &str) -> Result<String, String>;
    /// `kube-ipvs ls` on `node`.
    fn ls(&self, node: &str) -> Result<String, String>;
    /// `kube-ipvs ls --diff` on `node` (empty when the kernel is as desired).
    fn ls_diff(&self, node: &str) -> Result<String, String>;
}

/// A node, as the checks see it.
#[derive(Debug, Clone)]
pub struct NodeRef {
    /// Its name.
    pub name: String,
    /// Its zone (`topology.kubernetes.io/zone`).
    pub zone: String,
    /// Its address, where NodePorts are reached.
    pub ip: IpAddr,
    /// The client pod on it.
    pub client: String,
}

/// A pod, and the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The pod's name.
    pub pod: String,
    /// Its node's name.
    pub node: String,
}

/// The pods behind one Service, by node.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    /// The pods.
    pub pods: Vec<Backend>,
}

impl Backends {
    /// Every pod.
    pub fn all(&self) -> BTreeSet<String> {
        self.pods.iter().map(|b| b.pod.clone()).collect()
    }

    /// The pods on `nodes`.
    pub fn on(&self, nodes: &[&str]) -> BTreeSet<String> {
        self.pods
            .iter()
            .filter(|b| nodes.contains(&b.node.as_str()))
            .map(|b| b.pod.clone())
            .collect()
    }
}

/// What the cluster runs, for the checks to expect.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The nodes, with a client pod each.
    pub nodes: Vec<NodeRef>,
    /// The outside client's address, and another one of it that no source range admits.
    pub outside: (IpAddr, IpAddr),
    /// `web`: a NodePort Service with TCP (`web_tcp`, NodePort `web_node_port`) and UDP
    /// (`web_udp`) ports, its pods on every node.
    pub web: Backends,
    /// `web`'s ClusterIP and TCP port.
    pub web_tcp: SocketAddr,
    /// `web`'s ClusterIP and UDP port.
    pub web_udp: SocketAddr,
    /// `web`'s TCP NodePort.
    pub web_node_port: u16,
    /// `echo`: one pod on every node, behind the Services of each policy below.
    pub echo: Backends,
    /// ClientIP session affinity over every `echo` pod.
    pub sticky: SocketAddr,
    /// `externalTrafficPolicy: Local` NodePort over the `echo` pods of `local_nodes`, with its
    /// health check node port.
    pub local_node_port: u16,
    /// The health check node port of the Local Service.
    pub health_check_node_port: u16,
    /// The nodes with a pod of the Local Services.
    pub local_nodes: Vec<String>,
    /// `internalTrafficPolicy: Local` over the `echo` pods of `local_nodes`.
    pub internal: SocketAddr,
    /// Topology hints: every `echo` pod hinted for its own node's zone.
    pub zoned: SocketAddr,
    /// A ClusterIP whose one endpoint is `hairpin_pod`, which asks it.
    pub hairpin: SocketAddr,
    /// The pod behind `hairpin`.
    pub hairpin_pod: String,
    /// A load-balancer address and port whose `loadBalancerSourceRanges` admit `outside.0`
    /// only.
    pub load_balancer: SocketAddr,
}

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was checked.
    pub what: String,
    /// `Ok` or what was seen instead.
    pub result: Result<(), String>,
}

fn asks(
    view: &dyn ClusterView,
    origin: Origin<'_>,
    target: SocketAddr,
    transport: Transport,
    times: usize,
) -> Vec<Result<Reply, String>> {
    (0..times).map(|_| view.ask(origin, target, transport)).collect()
}

fn pods_of(replies: &[Result<Reply, String>]) -> Vec<Result<String, String>> {
    replies.iter().map(|r| r.clone().map(|r| r.pod)).collect()
}

/// Every request was refused or timed out.
fn refused(what: &str, replies: &[Result<Reply, String>]) -> Result<(), String> {
    match replies.iter().find_map(|r| r.as_ref().ok()) {
        None => Ok(()),
        Some(reply) => Err(format!("{what} answered by {reply:?}, expected no answer")),
    }
}

/// Runs every check; the outcomes in order.
pub fn all(view: &dyn ClusterView, w: &Workload) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut check = |what: String, result: Result<(), String>| out.push(Outcome { what, result });
    let web = w.web.all();
    let echo = w.echo.all();
    let local_nodes: Vec<&str> = w.local_nodes.iter().map(String::as_str).collect();
    let rounds = 4 * web.len();

    for node in &w.nodes {
        let from = Origin::Pod(&node.client);
        let replies = asks(view, from, w.web_tcp, Transport::Tcp, rounds);
        check(
            format!("ClusterIP TCP from a pod on {} reaches the pods of every node", node.name),
            super::spread("web", pods_of(&replies), &web),
        );
        let replies = asks(view, from, w.web_udp, Transport::Udp, rounds);
        check(
            format!("ClusterIP UDP from a pod on {} reaches the pods of every node", node.name),
            super::spread("web (UDP)", pods_of(&replies), &web),
        );
        let replies = asks(view, from, w.sticky, Transport::Tcp, 8);
        check(
            format!("session affinity from {} sticks to one pod", node.name),
            super::sticky("sticky", pods_of(&replies)).map(|_| ()),
        );
    }

    for node in &w.nodes {
        let target = SocketAddr::new(node.ip, w.web_node_port);
        let replies = asks(view, Origin::Outside(w.outside.0), target, Transport::Tcp, rounds);
        let natted = match replies.iter().find_map(|r| r.as_ref().ok()) {
            Some(reply) if reply.peer == w.outside.0 => {
                Err(format!("{target} kept the client's address {}", reply.peer))
            }
            _ => Ok(()),
        };
        check(
            format!("NodePort on {} from outside reaches every pod, source NATed", node.name),
            super::spread(&target.to_string(), pods_of(&replies), &web).and(natted),
        );
    }

    for node in &w.nodes {
        let target = SocketAddr::new(node.ip, w.local_node_port);
        let health = SocketAddr::new(node.ip, w.health_check_node_port);
        let replies = asks(view, Origin::Outside(w.outside.0), target, Transport::Tcp, 6);
        let status = view.http_status(health);
        if local_nodes.contains(&node.name.as_str()) {
            let kept = match replies.iter().find_map(|r| r.as_ref().ok()) {
                Some(reply) if reply.peer != w.outside.0 => {
                    Err(format!("{target}: the pod saw {}, not the client", reply.peer))
                }
                _ => Ok(()),
            };
            let healthy = match status {
                Ok(200) => Ok(()),
                other => Err(format!("{health}: {other:?}, not 200")),
            };
            check(
                format!(
                    "externalTrafficPolicy Local on {}: its own pod, the client's address kept, health 200",
                    node.name
                ),
                super::spread(&target.to_string(), pods_of(&replies), &w.echo.on(&[&node.name]))
                    .and(kept)
                    .and(healthy),
            );
        } else {
            let unhealthy = match status {
                Ok(503) => Ok(()),
                other => Err(format!("{health}: {other:?}, not 503")),
            };
            check(
                format!(
                    "externalTrafficPolicy Local on {} (no local pod): refused, health 503",
                    node.name
                ),
                refused(&target.to_string(), &replies).and(unhealthy),
            );
        }
    }

    for node in &w.nodes {
        let from = Origin::Pod(&node.client);
        let replies = asks(view, from, w.internal, Transport::Tcp, 6);
        if local_nodes.contains(&node.name.as_str()) {
            check(
                format!("internalTrafficPolicy Local from {}: only its own pod", node.name),
                super::spread("internal", pods_of(&replies), &w.echo.on(&[&node.name])),
            );
        } else {
            check(
                format!("internalTrafficPolicy Local from {} (no local pod): no answer", node.name),
                refused("internal", &replies),
            );
        }
        let same_zone: Vec<&str> =
            w.nodes.iter().filter(|n| n.zone == node.zone).map(|n| n.name.as_str()).collect();
        let replies = asks(view, from, w.zoned, Transport::Tcp, 8);
        check(
            format!("topology hints from {} ({}): the pods of its zone", node.name, node.zone),
            super::spread("zoned", pods_of(&replies), &w.echo.on(&same_zone)),
        );
    }

    let replies = asks(view, Origin::Pod(&w.hairpin_pod), w.hairpin, Transport::Tcp, 3);
    check(
        "hairpin: a pod reaches itself through its Service".into(),
        super::spread("hairpin", pods_of(&replies), &[w.hairpin_pod.clone()].into()),
    );

    let allowed = asks(view, Origin::Outside(w.outside.0), w.load_balancer, Transport::Tcp, 6);
    let denied = asks(view, Origin::Outside(w.outside.1), w.load_balancer, Transport::Tcp, 2);
    check(
        format!("loadBalancerSourceRanges: {} gets in, {} does not", w.outside.0, w.outside.1),
        super::spread("load balancer", pods_of(&allowed), &echo)
            .and(refused("load balancer from a refused source", &denied)),
    );

    for node in &w.nodes {
        let table = view
            .ipvsadm(&node.name)
            .and_then(|ipvsadm| super::ls_matches_ipvsadm(&view.ls(&node.name)?, &ipvsadm));
        let diff = view.ls_diff(&node.name).and_then(|diff| {
            if diff.trim().is_empty() { Ok(()) } else { Err(format!("ls --diff:\n{diff}")) }
        });
        check(
            format!("{}: ipvsadm -Ln is kube-ipvs ls, ls --diff is empty", node.name),
            table.and(diff),
        );
    }
    out
}

/// The outcomes as a table, one line each.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut text = String::new();
    for outcome in outcomes {
        let mark = if outcome.result.is_ok() { "ok  " } else { "FAIL" };
        text.push_str(&format!("  {mark} {}\n", outcome.what));
        if let Err(err) = &outcome.result {
            for line in err.lines() {
                text.push_str(&format!("         {line}\n"));
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::BTreeMap, net::Ipv4Addr};

    /// A cluster as the checks expect it, answering from a table of who serves what.
    struct Ideal {
        w: Workload,
        broken_hairpin: bool,
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 168, 50, last))
    }

    fn workload() -> Workload {
        let node = |name: &str, zone: &str, last| NodeRef {
            name: name.into(),
            zone: zone.into(),
            ip: ip(last),
            client: format!("client-{name}"),
        };
        let set = |prefix: &str| Backends {
            pods: ["node-a", "node-b", "node-c"]
                .iter()
                .map(|n| Backend { pod: format!("{prefix}-{n}"), node: (*n).to_owned() })
                .collect(),
        };
        let vip = |last: u8, port| SocketAddr::from(([10, 96, 1, last], port));
        Workload {
            nodes: vec![
                node("node-a", "z1", 11),
                node("node-b", "z1", 12),
                node("node-c", "z2", 13),
            ],
            outside: (ip(100), ip(101)),
            web: set("web"),
            web_tcp: vip(10, 80),
            web_udp: vip(10, 53),
            web_node_port: 30080,
            echo: set("echo"),
            sticky: vip(11, 80),
            local_node_port: 30081,
            health_check_node_port: 30300,
            local_nodes: vec!["node-a".into(), "node-b".into()],
            internal: vip(13, 80),
            zoned: vip(14, 80),
            hairpin: vip(16, 80),
            hairpin_pod: "echo-node-a".into(),
            load_balancer: SocketAddr::from(([192, 0, 2, 10], 80)),
        }
    }

    impl ClusterView for Ideal {
        fn ask(
            &self,
            origin: Origin<'_>,
            target: SocketAddr,
            _: Transport,
        ) -> Result<Reply, String> {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let w = &self.w;
            let node_of_client =
                |pod: &str| w.nodes.iter().find(|n| n.client == pod).map(|n| n.name.clone());
            let pick = |pods: BTreeSet<String>| {
                let pods: Vec<String> = pods.into_iter().collect();
                if pods.is_empty() {
                    return Err("refused".to_owned());
                }
                Ok(pods[N.fetch_add(1, Ordering::Relaxed) % pods.len()].clone())
            };
            let (pod, peer) = match origin {
                Origin::Pod(pod) => {
                    let node = node_of_client(pod).unwrap_or("node-a".into());
                    let zone = w.nodes.iter().find(|n| n.name == node).unwrap().zone.clone();
                    let zone_nodes: Vec<&str> = w
                        .nodes
                        .iter()
                        .filter(|n| n.zone == zone)
                        .map(|n| n.name.as_str())
                        .collect();
                    let pods = if target == w.web_tcp || target == w.web_udp {
                        w.web.all()
                    } else if target == w.sticky {
                        [w.echo.pods[0].pod.clone()].into()
                    } else if target == w.internal {
                        if w.local_nodes.contains(&node) {
                            w.echo.on(&[&node])
                        } else {
                            BTreeSet::new()
                        }
                    } else if target == w.zoned {
                        w.echo.on(&zone_nodes)
                    } else if target == w.hairpin && !self.broken_hairpin {
                        [w.hairpin_pod.clone()].into()
                    } else {
                        BTreeSet::new()
                    };
                    (pick(pods)?, ip(1))
                }
                Origin::Outside(source) => {
                    let node = w.nodes.iter().find(|n| n.ip == target.ip());
                    if target == w.load_balancer {
                        if source != w.outside.0 {
                            return Err("timed out".into());
                        }
                        (pick(w.echo.all())?, ip(11))
                    } else if target.port() == w.web_node_port {
                        (pick(w.web.all())?, node.unwrap().ip)
                    } else {
                        let name = node.unwrap().name.clone();
                        if !w.local_nodes.contains(&name) {
                            return Err("refused".into());
                        }
                        (pick(w.echo.on(&[&name]))?, source)
                    }
                }
            };
            Ok(Reply { pod, peer })
        }

        fn http_status(&self, target: SocketAddr) -> Result<u16, String> {
            let node = self.w.nodes.iter().find(|n| n.ip == target.ip()).unwrap();
            Ok(if self.w.local_nodes.contains(&node.name) { 200 } else { 503 })
        }

        fn ipvsadm(&self, _: &str) -> Result<String, String> {
            Ok("TCP  10.96.1.10:80 rr\n".into())
        }

        fn ls(&self, _: &str) -> Result<String, String> {
            Ok("TCP  10.96.1.10:80 rr  # ns/web:http\n".into())
        }

        fn ls_diff(&self, _: &str) -> Result<String, String> {
            Ok(String::new())
        }
    }

    #[test]
    fn an_ideal_cluster_passes_and_a_broken_one_is_named() {
        let ideal = Ideal { w: workload(), broken_hairpin: false };
        let outcomes = all(&ideal, &ideal.w);
        let failed: BTreeMap<&str, &String> = outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().err().map(|e| (o.what.as_str(), e)))
            .collect();
        assert!(failed.is_empty(), "{failed:#?}");
        assert_eq!(outcomes.len(), 3 * 3 + 3 + 3 + 3 * 2 + 1 + 1 + 3);

        let broken = Ideal { w: workload(), broken_hairpin: true };
        let outcomes = all(&broken, &broken.w);
        let failed: Vec<&str> =
            outcomes.iter().filter(|o| o.result.is_err()).map(|o| o.what.as_str()).collect();
        assert_eq!(failed, ["hairpin: a pod reaches itself through its Service"]);
        assert!(table(&outcomes).contains("FAIL hairpin"));
    }
}
