//! `cargo xtask bench`: benchmarks that need the VM print their table from inside it.

use anyhow::{Result, bail};

use crate::{
    vm::{self, GuestTask, VmOptions},
    vmtest::build_binary,
};

/// The benchmarks.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum Which {
    /// Programming and dumping IPVS through `ipvs-netlink`, against `ipvsadm -R` and `-Ln` (VM).
    Ipvs,
    /// The desired state and the diff, from scratch and for one change (host).
    Controller,
    /// The `kube-ipvs` daemon: cold start, one change, idle resync, memory, through the API
    /// and through `--manifests`, against `ipvsadm -R` (VM).
    Daemon,
}

pub(crate) fn run(
    which: Which,
    services: usize,
    destinations: usize,
    nodes: usize,
    options: &VmOptions,
) -> Result<()> {
    let binary = match which {
        Which::Ipvs => build_binary("ipvs-bench", true)?,
        Which::Daemon => build_binary("daemon-bench", true)?,
        Which::Controller => {
            return crate::util::run(crate::util::cargo([
                "bench",
                "--package",
                "controller",
                "--bench",
                "desired",
            ]));
        }
    };
    let mut argv =
        vec![binary.to_string_lossy().into_owned(), "--services".into(), services.to_string()];
    match which {
        Which::Daemon => {
            let daemon = crate::vmtest::build_shipped_daemon()?;
            argv.extend(["--endpoints".into(), destinations.to_string()]);
            argv.extend(["--nodes".into(), nodes.to_string()]);
            argv.extend(["--kube-ipvs".into(), daemon.to_string_lossy().into_owned()]);
        }
        _ => argv.extend(["--destinations".into(), destinations.to_string()]),
    }
    let results = vm::boot(GuestTask::Command { argv, fresh_netns: true }, options)?;
    if !results.failed.is_empty() {
        bail!("the benchmark failed in the VM");
    }
    Ok(())
}
