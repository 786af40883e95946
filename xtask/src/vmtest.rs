//! `cargo xtask vmtest`: builds the privileged tests and runs them in the VM.

use std::{io::BufRead, path::PathBuf, process::Stdio};

use anyhow::{Context, Result, bail};

use crate::{
    util::{cargo, describe},
    vm::{self, GuestTask, VmOptions},
};

/// The workspace member holding the privileged tests.
pub(crate) const PACKAGE: &str = "vm-tests";

/// Builds the test binaries of `PACKAGE` and returns their paths.
fn build_test_binaries() -> Result<Vec<PathBuf>> {
    let mut command = cargo([
        "test",
        "--package",
        PACKAGE,
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    command.stdout(Stdio::piped());
    eprintln!("+ {}", describe(&command));
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut binaries = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let message: serde_json::Value = serde_json::from_str(&line?).unwrap_or_default();
        if message["reason"] == "compiler-artifact"
            && message["profile"]["test"] == true
            && let Some(executable) = message["executable"].as_str()
        {
            binaries.push(PathBuf::from(executable));
        }
    }
    if !child.wait()?.success() {
        bail!("building the VM tests failed");
    }
    binaries.sort();
    Ok(binaries)
}

/// Builds the `kube-ipvs` executable next to the test binaries, where the end-to-end tests
/// find it (`vm_tests::daemon::binary`).
pub(crate) fn build_daemon() -> Result<()> {
    let mut command = cargo(["build", "--package", "kube-ipvs", "--bin", "kube-ipvs"]);
    eprintln!("+ {}", describe(&command));
    if !command.status()?.success() {
        bail!("building kube-ipvs failed");
    }
    Ok(())
}

/// Builds `kube-ipvs` as the image ships it (the `dist` profile); returns its path.
pub(crate) fn build_shipped_daemon() -> Result<PathBuf> {
    let mut command =
        cargo(["build", "--profile", "dist", "--package", "kube-ipvs", "--bin", "kube-ipvs"]);
    eprintln!("+ {}", describe(&command));
    if !command.status()?.success() {
        bail!("building the shipped kube-ipvs failed");
    }
    Ok(crate::util::target_dir().join("dist/kube-ipvs"))
}

/// Builds what the cluster scenario runs besides its own code: the shipped `kube-ipvs` and
/// the `fake-apiserver` process (`vm_tests::cluster` finds both under `target/`).
pub(crate) fn build_cluster_processes() -> Result<()> {
    build_shipped_daemon()?;
    let mut command = cargo(["build", "--package", "fake-apiserver", "--bin", "fake-apiserver"]);
    eprintln!("+ {}", describe(&command));
    if !command.status()?.success() {
        bail!("building fake-apiserver failed");
    }
    Ok(())
}

/// Builds the tests, runs them in the VM and prints the closing `N passed, N failed` line.
pub(crate) fn run(filter: Option<&str>, options: &VmOptions) -> Result<()> {
    build_daemon().context("building kube-ipvs for the end-to-end tests")?;
    build_cluster_processes().context("building the cluster's processes")?;
    let binaries = build_test_binaries().context("building the VM tests")?;
    let results =
        vm::boot(GuestTask::Tests { binaries, filter: filter.map(str::to_owned) }, options)?;
    println!();
    for name in &results.failed {
        println!("failed: {name}");
    }
    println!("vmtest: {} passed, {} failed", results.passed, results.failed.len());
    if !results.failed.is_empty() {
        bail!("{} VM test(s) failed", results.failed.len());
    }
    if results.passed == 0 {
        bail!("no VM test ran");
    }
    Ok(())
}

/// Builds one binary of `PACKAGE` (in release mode if `release`) and returns its path.
pub(crate) fn build_binary(name: &str, release: bool) -> Result<PathBuf> {
    let mut command = cargo(["build", "--package", PACKAGE, "--bin", name]);
    command.arg("--message-format=json-render-diagnostics");
    if release {
        command.arg("--release");
    }
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    eprintln!("+ {}", describe(&command));
    let out = command.output()?;
    if !out.status.success() {
        bail!("building {name} failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no {name} executable"))
}
