//! `cargo xtask demo`, inside the VM: a node with three pods and a client outside it,
//! `kube-ipvs run` on the manifests in `deploy/demo`, then traffic through the Services, and
//! the kernel following a change to a manifest.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use vm_tests::{
    CLUSTER_CIDR, NODE_IP, Topology,
    daemon::{self, Daemon, eventually},
    ipvsadm, sh, tcp_ask,
};

const MANIFESTS: [(&str, &str); 2] = [
    ("web.yaml", include_str!("../../../../deploy/demo/web.yaml")),
    ("sticky.yaml", include_str!("../../../../deploy/demo/sticky.yaml")),
];

fn title(text: &str) {
    println!("\n== {text}\n");
}

fn command(line: &str, output: &str) {
    println!("$ {line}");
    print!("{output}");
}

fn kube_ipvs(args: &[&str]) -> String {
    sh(daemon::binary().to_str().expect("a UTF-8 path"), args)
}

/// Who answers `times` connections to `address`, in order.
fn requests(address: SocketAddr, times: usize) -> String {
    let names: Vec<String> = (0..times)
        .map(|_| tcp_ask(address).map_or_else(|e| format!("({e})"), |a| a.from))
        .collect();
    let mut counts = BTreeMap::<&str, usize>::new();
    for name in &names {
        *counts.entry(name).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(name, n)| format!("{name}: {n}")).collect();
    format!("{}\n   ({})\n", names.join(" "), counts.join(", "))
}

fn main() {
    sh("modprobe", &["br_netfilter"]);
    let topology = Topology::new(3);
    sh("sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    let dir = Path::new("/tmp/kube-ipvs-demo");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("a manifests directory");
    for (name, text) in MANIFESTS {
        std::fs::write(dir.join(name), text).expect("manifest written");
    }
    title(
        "a node (192.168.99.2) with three pods, pod1-pod3 at 10.244.0.2-4, and a client outside it",
    );
    let args = ["--manifests", "/tmp/kube-ipvs-demo"];
    println!(
        "$ kube-ipvs run --manifests /tmp/kube-ipvs-demo --hostname-override node-a --cluster-cidr {CLUSTER_CIDR} &"
    );
    let mut daemon = Daemon::start("demo", &args);
    daemon.wait_synced();
    for line in daemon.log().lines().filter(|l| l.contains("INFO")).take(8) {
        println!("  {}", line.split_once("  INFO ").map_or(line, |(_, rest)| rest));
    }

    title("the kernel's IPVS table");
    command("ipvsadm -Ln", &ipvsadm(&["-Ln"]));
    println!();
    command("kube-ipvs ls", &kube_ipvs(&["ls"]));

    title("requests through the Services");
    println!("web, ClusterIP 10.96.0.10:80, round robin, from the node:");
    print!("   {}", requests(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80)), 9));
    println!("sticky, ClusterIP 10.96.0.12:80, ClientIP affinity, least-connection:");
    print!("   {}", requests(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 12), 80)), 9));
    println!("web-nodeport, NodePort {NODE_IP}:30080, from the client outside the node:");
    let outside = topology.client.run(|| requests(SocketAddr::from((NODE_IP, 30080)), 9));
    print!("   {outside}");

    title("web.yaml changed: web loses pod3 (10.244.0.4)");
    let web = MANIFESTS[0].1.replacen(
        "- {addresses: [10.244.0.4], nodeName: node-a, conditions: {ready: true}}\n",
        "",
        1,
    );
    std::fs::write(dir.join("web.yaml"), web).expect("manifest written");
    eventually(Duration::from_secs(60), || {
        let draining = "-a -t 10.96.0.10:80 -r 10.244.0.4:8080 -m -w 0";
        ipvsadm(&["-Sn"]).contains(draining).then_some(()).ok_or("not yet")
    });
    command("kube-ipvs ls", &kube_ipvs(&["ls"]));
    println!("\n(10.244.0.4 drains with weight 0 while connections to it remain, then goes.)\n");
    println!("web, 10.96.0.10:80:");
    print!("   {}", requests(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80)), 9));
    command("kube-ipvs ls --diff", &kube_ipvs(&["ls", "--diff"]));
    println!("(no difference between the desired state and the kernel)");

    title("kube-ipvs stops on SIGTERM and leaves the kernel state in place");
    let status = daemon.stop();
    println!("kube-ipvs exited: {status}");
    println!("web, 10.96.0.10:80, with kube-ipvs stopped:");
    print!("   {}", requests(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80)), 6));
}
