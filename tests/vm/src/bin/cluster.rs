//! `cargo xtask cluster`: the whole-cluster scenario (`vm_tests::cluster`) in the VM, with
//! its report: the checks, the requests per phase, the restarts; then the live takeover from
//! kube-proxy and the rollback, in a network namespace of their own. `cluster nodes` or
//! `cluster takeover` runs one of the two. Exits 1 if anything failed.

use nix::sched::{CloneFlags, unshare};

fn main() {
    let only = std::env::args().nth(1);
    let mut passed = true;
    if only.as_deref() != Some("takeover") {
        let cluster = vm_tests::cluster::scenario::run();
        println!("{}", cluster.render());
        passed &= cluster.passed();
        unshare(CloneFlags::CLONE_NEWNET).expect("a network namespace for the takeover");
        vm_tests::sh("ip", &["link", "set", "lo", "up"]);
    }
    if only.as_deref() != Some("nodes") {
        let takeover = vm_tests::cluster::takeover::run();
        println!("{}", takeover.render());
        passed &= takeover.passed();
    }
    if !passed {
        std::process::exit(1);
    }
}
