//! `cargo xtask bench`: benchmarks that need the VM print their table from inside it. The
//! daemon benchmark also hands its figures back, and charts are drawn from them
//! ([`crate::charts`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{
    charts,
    util::target_dir,
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
    /// The `kube-ipvs` daemon: cold start, one change, idle resync, memory, a rolling update,
    /// through the API and through `--manifests`, against `ipvsadm -R` (VM).
    Daemon,
}

/// What to run, and where the charts go.
#[derive(Debug)]
pub(crate) struct Sizes {
    /// Virtual services (Services), one run each.
    pub(crate) services: Vec<usize>,
    /// Destinations (endpoints) per virtual service.
    pub(crate) destinations: usize,
    /// The daemon benchmark: the nodes the endpoints are spread over.
    pub(crate) nodes: usize,
    /// The daemon benchmark: the directory the charts are written to.
    pub(crate) charts: PathBuf,
}

pub(crate) fn run(which: Which, sizes: &Sizes, options: &VmOptions) -> Result<()> {
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
    let daemon = match which {
        Which::Daemon => Some(crate::vmtest::build_shipped_daemon()?),
        _ => None,
    };
    let mut runs = Vec::new();
    for &services in &sizes.services {
        let mut argv =
            vec![binary.to_string_lossy().into_owned(), "--services".into(), services.to_string()];
        match &daemon {
            Some(daemon) => {
                argv.extend(["--endpoints".into(), sizes.destinations.to_string()]);
                argv.extend(["--nodes".into(), sizes.nodes.to_string()]);
                argv.extend(["--kube-ipvs".into(), daemon.to_string_lossy().into_owned()]);
                argv.extend(["--results".into(), results_file()?.to_string_lossy().into_owned()]);
            }
            None => argv.extend(["--destinations".into(), sizes.destinations.to_string()]),
        }
        let results = vm::boot(GuestTask::Command { argv, fresh_netns: true }, options)?;
        if !results.failed.is_empty() {
            bail!("the benchmark failed in the VM at {services} Services");
        }
        if daemon.is_some() {
            let file = results_file()?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("{}: the benchmark wrote no figures", file.display()))?;
            runs.push(serde_json::from_str(&text)?);
        }
    }
    if daemon.is_some() {
        write_charts(runs, &sizes.charts)?;
    }
    Ok(())
}

/// Where the guest writes the daemon benchmark's figures (the VM's run directory, which is
/// emptied at each boot).
fn results_file() -> Result<PathBuf> {
    let run = target_dir().join("vm/run");
    std::fs::create_dir_all(&run)?;
    Ok(run.canonicalize()?.join("daemon-bench.json"))
}

fn write_charts(runs: Vec<serde_json::Value>, dir: &Path) -> Result<()> {
    let dir = crate::util::workspace_root().join(dir);
    let dir = dir.as_path();
    std::fs::create_dir_all(dir)?;
    // The sizes not measured this time are kept from the figures already there, so that a
    // large size can be run on its own and still be charted beside the others.
    let file = dir.join("daemon-bench.json");
    let earlier: Vec<serde_json::Value> = match std::fs::read_to_string(&file) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not the benchmark's figures", file.display()))?,
        Err(_) => Vec::new(),
    };
    let (runs, kept) = charts::merge(earlier, runs);
    for services in kept {
        println!("charts: the run at {services} Services is kept from {}", file.display());
    }
    std::fs::write(&file, serde_json::to_string_pretty(&runs)?)?;
    let written = charts::draw(&runs, dir)?;
    for chart in written {
        println!("chart: {}", chart.display());
    }
    Ok(())
}
