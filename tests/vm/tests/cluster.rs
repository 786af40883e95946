//! A whole cluster in the VM (`vm_tests::cluster`): three nodes running the shipped
//! kube-ipvs against one API server process, checked from pods and from outside, then
//! changed with requests running the whole time. `cargo xtask cluster` runs the same
//! scenario on its own and prints its report.

#[test]
fn three_nodes_serve_every_policy_through_a_rollout_and_restarts_without_a_failed_request() {
    let report = vm_tests::cluster::scenario::run();
    println!("{}", report.render());
    assert!(report.passed(), "the cluster scenario failed; its report is above");
}

#[test]
fn kube_ipvs_takes_a_node_over_from_kube_proxy_and_hands_it_back_without_a_failed_request() {
    let report = vm_tests::cluster::takeover::run();
    println!("{}", report.render());
    assert!(report.passed(), "the takeover failed; its report is above");
}
