//! Booting the test VM: virtme-ng with the stock kernel, the host's root filesystem shared
//! read-only, and one read-write directory for the plan and the results.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{setup, util::target_dir};

/// Kernel modules loaded in the guest before anything runs.
pub(crate) const MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_dh",
    "ip_vs_sh",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_mh",
    "dummy",
    "veth",
    "bridge",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_ct",
    "nft_nat",
    "nft_masq",
    "nft_reject_inet",
    "ipip",
    "br_netfilter",
    "sctp",
];

/// Printed by the guest runner before its own output; everything before it is boot noise.
pub(crate) const GUEST_MARKER: &str = "==== kube-ipvs guest ====";

/// How to boot the VM.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct VmOptions {
    /// Use KVM. Off by default: software emulation (TCG) is slower but works everywhere.
    #[arg(long)]
    pub(crate) kvm: bool,
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub(crate) memory: String,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub(crate) cpus: u32,
    /// Give up on the VM after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub(crate) timeout: u64,
}

/// What the guest runner is asked to do.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct Plan {
    /// Modules to load first.
    pub(crate) modules: Vec<String>,
    /// The work.
    pub(crate) task: GuestTask,
    /// Where the guest writes `results.json` (shared read-write with the host).
    pub(crate) results: PathBuf,
}

/// The work of one VM run.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum GuestTask {
    /// Run every test of these libtest binaries, each in a fresh network namespace.
    Tests {
        /// The test binaries.
        binaries: Vec<PathBuf>,
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Run one command line.
    Command {
        /// The program and its arguments.
        argv: Vec<String>,
        /// Run it in a fresh network namespace.
        fresh_netns: bool,
    },
}

/// What the guest reports back.
#[derive(Serialize, Deserialize, Debug, Default)]
pub(crate) struct Results {
    /// Tests that passed (or 1 for a command that succeeded).
    pub(crate) passed: usize,
    /// Names of the tests that failed (or the command).
    pub(crate) failed: Vec<String>,
}

/// Boots the VM, has it carry out `task`, streams its output, and returns what it reported.
pub(crate) fn boot(task: GuestTask, options: &VmOptions) -> Result<Results> {
    setup::ensure_tools()?;
    let kernel = setup::ensure_kernel()?;
    let run_dir = target_dir().join("vm/run");
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)?;
    let run_dir = run_dir.canonicalize()?;
    let results = run_dir.join("results.json");
    let plan = Plan { modules: MODULES.iter().map(|m| m.to_string()).collect(), task, results };
    let plan_file = run_dir.join("plan.json");
    fs::write(&plan_file, serde_json::to_vec_pretty(&plan)?)?;

    let xtask = std::env::current_exe()?.canonicalize()?;
    let mut vng = Command::new(setup::vng().context("virtme-ng is not installed")?);
    vng.arg("--run")
        .arg(&kernel.image)
        .args(["--cpus", &options.cpus.to_string(), "--memory", &options.memory])
        .arg("--rwdir")
        .arg(&run_dir)
        // virtiofsd is not installed; 9p works without waiting for it.
        .arg("--force-9p")
        .arg("--verbose")
        .arg("--exec")
        .arg(format!("{} guest {}", xtask.display(), plan_file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        // The guest's console, its programs' output included, arrives on vng's stderr.
        .stderr(Stdio::piped());
    if !options.kvm {
        vng.arg("--disable-kvm");
    }
    eprintln!(
        "xtask: booting kernel {} in a VM ({}; this takes about 20 s)",
        kernel.release,
        if options.kvm { "KVM" } else { "software emulation" }
    );
    let started = Instant::now();
    let mut child = vng.spawn().context("cannot start vng")?;
    let console = child.stderr.take().expect("piped");
    let deadline = Duration::from_secs(options.timeout);
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let step = Duration::from_millis(500);
        let mut waited = Duration::ZERO;
        while waited < deadline {
            std::thread::sleep(step);
            waited += step;
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        let _ = Command::new("kill").arg(pid.to_string()).status();
        true
    });
    let mut in_guest = false;
    for line in BufReader::new(console).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        if line.contains(GUEST_MARKER) {
            in_guest = true;
            continue;
        }
        if in_guest && !is_kernel_log(line) {
            println!("{line}");
        }
    }
    child.wait()?;
    let timed_out = watchdog.join().unwrap_or(false);
    eprintln!("xtask: the VM ran for {:.0} s", started.elapsed().as_secs_f64());
    if timed_out {
        bail!("the VM did not finish within {} s and was stopped", options.timeout);
    }
    let reported = fs::read(&plan.results).with_context(|| {
        format!(
            "the VM stopped without writing {}: it crashed or did not boot",
            plan.results.display()
        )
    })?;
    Ok(serde_json::from_slice(&reported)?)
}

/// Kernel console lines look like `[   12.345678] message`.
fn is_kernel_log(line: &str) -> bool {
    line.strip_prefix('[').and_then(|rest| rest.split_once(']')).is_some_and(|(stamp, _)| {
        let stamp = stamp.trim();
        !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
    })
}

/// `cargo xtask vm -- COMMAND`: runs a command in the VM.
pub(crate) fn run_command(argv: Vec<String>, options: &VmOptions) -> Result<()> {
    let results = boot(GuestTask::Command { argv, fresh_netns: false }, options)?;
    if !results.failed.is_empty() {
        bail!("the command failed in the VM");
    }
    Ok(())
}
