//! The runner inside the VM: loads the kernel modules, then runs each test as its own process
//! in a fresh network namespace (IPVS tables, links and netfilter rules are per namespace),
//! and writes the results where the host can read them.

use std::{
    fs,
    path::Path,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::vm::{GUEST_MARKER, GuestTask, Plan, Results};

/// Longest one test may run.
const TEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Runs a command in a new network namespace with `lo` up.
const IN_FRESH_NETNS: &[&str] =
    &["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec \"$@\"", "netns"];

pub(crate) fn run(plan_file: &Path) -> Result<()> {
    println!("{GUEST_MARKER}");
    let plan: Plan = serde_json::from_slice(&fs::read(plan_file)?)?;
    let unloaded = load_modules(&plan.modules);
    let mut results = match plan.task {
        GuestTask::Tests { binaries, filter } => run_tests(&binaries, filter.as_deref())?,
        GuestTask::Command { argv, fresh_netns } => run_one_command(&argv, fresh_netns)?,
    };
    // A module that did not load fails the run, whatever the tests said: a test that passed
    // without it may not have tested what it claims.
    results.failed.extend(unloaded.into_iter().map(|module| format!("modprobe {module}")));
    fs::write(&plan.results, serde_json::to_vec(&results)?)?;
    Ok(())
}

/// A command whose PATH has the sbin directories, which the shell virtme-ng starts may lack.
fn command(program: &str) -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut command = Command::new(program);
    command.env("PATH", format!("/usr/local/sbin:/usr/sbin:/sbin:{path}"));
    command
}

/// Loads the kernel modules; returns those that did not load.
fn load_modules(modules: &[String]) -> Vec<String> {
    let mut failed = Vec::new();
    for module in modules {
        let ok = command("modprobe").arg(module).status().is_ok_and(|s| s.success());
        if !ok {
            failed.push(module.clone());
        }
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let ipvs = fs::read_to_string("/proc/net/ip_vs").unwrap_or_default();
    println!(
        "guest: kernel {}, {}",
        release.trim(),
        ipvs.lines().next().unwrap_or("IPVS NOT AVAILABLE")
    );
    if !failed.is_empty() {
        println!("guest: FAILED to load modules: {}", failed.join(", "));
    }
    failed
}

fn list_tests(binary: &Path) -> Result<Vec<String>> {
    let out = command(&binary.to_string_lossy())
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("cannot list the tests of {}", binary.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} --list failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

fn in_fresh_netns(argv: &[String]) -> Command {
    let mut cmd = command(IN_FRESH_NETNS[0]);
    cmd.args(&IN_FRESH_NETNS[1..]).args(argv);
    cmd
}

fn run_tests(binaries: &[std::path::PathBuf], filter: Option<&str>) -> Result<Results> {
    let mut results = Results::default();
    let mut matched = 0;
    for binary in binaries {
        let suite = binary
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.rsplit_once('-').map_or(n, |(name, _hash)| name))
            .unwrap_or("tests")
            .to_owned();
        let names = match list_tests(binary) {
            Ok(names) => names,
            Err(err) => {
                println!("---- {suite}: FAILED: {err:#}");
                results.failed.push(format!("{suite} (its tests could not be listed)"));
                continue;
            }
        };
        for name in names {
            let full_name = format!("{suite}::{name}");
            if filter.is_some_and(|f| !full_name.contains(f)) {
                continue;
            }
            matched += 1;
            println!("\n---- {full_name}");
            let argv = [
                binary.to_string_lossy().into_owned(),
                "--exact".into(),
                name.clone(),
                "--nocapture".into(),
                "--test-threads=1".into(),
            ];
            let mut cmd = in_fresh_netns(&argv);
            cmd.env("RUST_BACKTRACE", "1");
            let started = Instant::now();
            let outcome = wait_with_timeout(cmd.spawn()?, TEST_TIMEOUT)?;
            let seconds = started.elapsed().as_secs_f64();
            match outcome {
                Some(status) if status.success() => {
                    results.passed += 1;
                    println!("---- {full_name}: ok ({seconds:.1} s)");
                }
                Some(status) => {
                    results.failed.push(full_name.clone());
                    println!("---- {full_name}: FAILED ({status}, {seconds:.1} s)");
                }
                None => {
                    results.failed.push(full_name.clone());
                    println!("---- {full_name}: FAILED (timed out after {seconds:.0} s)");
                }
            }
        }
    }
    if matched == 0 {
        let what = filter.map_or("no tests were found".to_owned(), |f| {
            format!("no test matches --filter {f:?}")
        });
        println!("guest: FAILED: {what}");
        results.failed.push(what);
    }
    Ok(results)
}

fn run_one_command(argv: &[String], fresh_netns: bool) -> Result<Results> {
    let mut cmd = if fresh_netns { in_fresh_netns(argv) } else { command(&argv[0]) };
    if !fresh_netns {
        cmd.args(&argv[1..]);
    }
    let status = cmd.status().with_context(|| format!("cannot run {}", argv.join(" ")))?;
    let mut results = Results::default();
    if status.success() {
        results.passed = 1;
    } else {
        results.failed.push(argv.join(" "));
    }
    Ok(results)
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A test binary that answers `--list` with `script`'s behaviour.
    fn fake_binary(name: &str, script: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-guest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}-0123abcd"));
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_binary_that_cannot_list_its_tests_fails_the_run() {
        let broken = fake_binary("broken", "echo 'cannot start' >&2; exit 3");
        let results = run_tests(&[broken], None).unwrap();
        assert_eq!(results.passed, 0);
        assert!(results.failed.iter().any(|f| f.starts_with("broken")), "{:?}", results.failed);
    }

    #[test]
    fn a_filter_that_matches_no_test_fails_the_run() {
        let listing = fake_binary("listing", "echo 'one: test'; echo 'two: test'");
        let results = run_tests(&[listing], Some("three")).unwrap();
        assert_eq!(results.passed, 0);
        assert_eq!(results.failed, ["no test matches --filter \"three\""]);
    }

    #[test]
    fn a_module_that_does_not_load_is_reported() {
        let unloaded = load_modules(&["kube_ipvs_no_such_module".to_owned()]);
        assert_eq!(unloaded, ["kube_ipvs_no_such_module"]);
    }
}
