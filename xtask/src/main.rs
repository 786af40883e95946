//! Build, test and benchmark tasks for kube-ipvs.
//!
//! `cargo xtask test` is the whole test suite: formatting, lints, unit tests, and the
//! privileged tests against a real kernel in a VM (`cargo xtask vmtest`). The VM boots a stock
//! Debian kernel under qemu with virtme-ng, sharing the host's root filesystem; inside it, this
//! same binary runs as the guest-side runner (`xtask guest`).

mod bench;
mod charts;
mod demo;
mod e2e;
mod guest;
mod setup;
mod util;
mod vm;
mod vmtest;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and benchmark tasks for kube-ipvs")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The demo: boots the VM, runs `kube-ipvs run --manifests` on `deploy/demo` with three
    /// pods in network namespaces, shows `ipvsadm -Ln` and `kube-ipvs ls`, sends requests
    /// through the Services, then changes a manifest and shows the kernel following.
    Demo {
        /// Show the three-node cluster instead: every check, a rollout and rolling restarts
        /// of kube-ipvs with requests running, zero failures (the same as `cargo xtask
        /// cluster`).
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        vm: vm::VmOptions,
    },
    /// Run every test: rustfmt, clippy, unit tests, then the VM tests against a real kernel.
    /// Installs what it needs (Debian packages, the kernel, virtme-ng) when it is missing.
    Test {
        #[command(flatten)]
        vm: vm::VmOptions,
    },
    /// kube-ipvs in place of kube-proxy on a kind cluster, checked from inside and outside.
    ///
    /// Needs docker (with a running daemon), kind and kubectl; without them it stops at once
    /// and says what is missing. Not part of `cargo xtask test`.
    E2e {
        /// Keep the cluster afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// A whole cluster in the VM: three nodes running the shipped kube-ipvs against one API
    /// server, every Service policy checked from pods and from outside, a rolling
    /// replacement of pods, a rolling restart and a SIGKILL of kube-ipvs with requests
    /// running throughout, and a live takeover from kube-proxy's state. Prints a report.
    Cluster {
        #[command(flatten)]
        vm: vm::VmOptions,
    },
    /// Run the privileged tests (`tests/vm`) inside a VM, each in its own network namespace.
    Vmtest {
        /// Run only the tests whose name (`suite::test`) contains this text.
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        vm: vm::VmOptions,
    },
    /// Run a benchmark inside the VM and print its table.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        which: bench::Which,
        /// Virtual services to program: one size, or several (`1000,10000,50000`), each in a
        /// VM of its own.
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        services: Vec<usize>,
        /// Destinations per virtual service.
        #[arg(long, default_value_t = 10)]
        destinations: usize,
        /// The daemon benchmark: the nodes the endpoints are spread over (this node hosts
        /// every so many; 1 puts them all on it).
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// The daemon benchmark: where its charts (SVG) and figures (JSON) are written.
        #[arg(long, default_value = "target/bench")]
        charts: std::path::PathBuf,
        #[command(flatten)]
        vm: vm::VmOptions,
    },
    /// Boot the VM and run one command in it (as root, in the initial network namespace).
    Vm {
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
        #[command(flatten)]
        vm: vm::VmOptions,
    },
    /// Inside the VM: load the kernel modules and carry out a plan written by the host.
    #[command(hide = true)]
    Guest {
        /// The plan file.
        plan: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { vm } => {
            util::run(util::cargo(["fmt", "--all", "--", "--check"]))?;
            util::run(util::cargo([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            util::run(util::cargo(["test"]))?;
            vmtest::run(None, &vm)
        }
        Task::Demo { cluster: false, vm } => demo::run(&vm),
        Task::Demo { cluster: true, vm } | Task::Cluster { vm } => demo::run_cluster(&vm),
        Task::E2e { keep } => e2e::run_e2e(keep),
        Task::Vmtest { filter, vm } => vmtest::run(filter.as_deref(), &vm),
        Task::Bench { which, services, destinations, nodes, charts, vm } => {
            let sizes = bench::Sizes { services, destinations, nodes, charts };
            bench::run(which, &sizes, &vm)
        }
        Task::Vm { command, vm } => vm::run_command(command, &vm),
        Task::Guest { plan } => guest::run(&plan),
    }
}
