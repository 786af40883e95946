//! `cargo xtask demo`: the demo program (`tests/vm/src/bin/demo.rs`) in the VM, with the
//! `kube-ipvs` it drives; `cargo xtask demo --cluster` and `cargo xtask cluster`: the
//! three-node cluster (`tests/vm/src/bin/cluster.rs`).

use anyhow::{Result, bail};

use crate::{
    vm::{self, GuestTask, VmOptions},
    vmtest::{build_binary, build_cluster_processes, build_daemon},
};

/// Builds kube-ipvs and the demo, and runs the demo in the VM in a network namespace of its
/// own.
pub(crate) fn run(options: &VmOptions) -> Result<()> {
    build_daemon()?;
    let demo = build_binary("demo", false)?;
    let argv = vec![demo.to_string_lossy().into_owned()];
    let results = vm::boot(GuestTask::Command { argv, fresh_netns: true }, options)?;
    if !results.failed.is_empty() {
        bail!("the demo failed in the VM");
    }
    Ok(())
}

/// Builds the cluster scenario and what it runs, and runs it in the VM: three nodes, every
/// check, a rollout and restarts under traffic, and its report.
pub(crate) fn run_cluster(options: &VmOptions) -> Result<()> {
    build_cluster_processes()?;
    let cluster = build_binary("cluster", false)?;
    let argv = vec![cluster.to_string_lossy().into_owned()];
    let results = vm::boot(GuestTask::Command { argv, fresh_netns: true }, options)?;
    if !results.failed.is_empty() {
        bail!("the cluster scenario failed in the VM (its report is above)");
    }
    Ok(())
}
