//! `cargo xtask bench ipvs`: programming and dumping IPVS through `ipvs-netlink`, with
//! `ipvsadm -R` and `ipvsadm -Ln` on the same rules in the same VM as the baseline.
//!
//! Runs inside the VM; each side programs from empty in a fresh network namespace of its own,
//! and the two run in both orders. Prints a Markdown table.

use std::{
    io::Read,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ipvs_netlink::{Change, Destination, IpvsHandle, ServiceKey, VirtualService};
use vm_tests::ipvsadm_restore;

struct Args {
    services: usize,
    destinations: usize,
}

/// The sizes, and the side to measure when run as one (`--side ipvs-netlink|ipvsadm`).
fn parse_args() -> (Args, Option<String>) {
    let mut args = Args { services: 10_000, destinations: 10 };
    let mut side = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("a value after the flag");
        let number = || value.parse().expect("a number");
        match flag.as_str() {
            "--services" => args.services = number(),
            "--destinations" => args.destinations = number(),
            "--side" => side = Some(value),
            other => panic!("unknown flag {other}"),
        }
    }
    (args, side)
}

fn service_address(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 96, (i / 250) as u8 + 1, (i % 250) as u8 + 1], 80))
}

fn destination_address(i: usize, j: usize) -> SocketAddr {
    let n = i * 64 + j;
    SocketAddr::from((
        [10, 244, (n / 250 % 250) as u8, (n % 250) as u8 + 1],
        8080 + (n / 62_500) as u16,
    ))
}

fn changes(args: &Args) -> Vec<Change> {
    let mut changes = Vec::with_capacity(args.services * (args.destinations + 1));
    for i in 0..args.services {
        let key = ServiceKey::tcp(service_address(i));
        changes.push(Change::AddService(VirtualService::new(key, "rr")));
        for j in 0..args.destinations {
            changes.push(Change::AddDestination(key, Destination::new(destination_address(i, j))));
        }
    }
    changes
}

fn ipvsadm_rules(args: &Args) -> String {
    let mut rules = String::new();
    for i in 0..args.services {
        let vip = service_address(i);
        rules.push_str(&format!("-A -t {vip} -s rr\n"));
        for j in 0..args.destinations {
            rules.push_str(&format!("-a -t {vip} -r {} -m -w 1\n", destination_address(i, j)));
        }
    }
    rules
}

/// Runs `ipvsadm -Ln` and reads its whole output, as an operator's pipe would.
fn ipvsadm_list() -> (Duration, usize) {
    let started = Instant::now();
    let mut child = Command::new("ipvsadm").arg("-Ln").stdout(Stdio::piped()).spawn().unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "ipvsadm -Ln failed");
    let lines = out.split(|b| *b == b'\n').filter(|l| l.starts_with(b"  -> ")).count();
    (started.elapsed(), lines - 1)
}

/// What one side measured in its own network namespace, in seconds.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Side {
    /// Programming every service and destination from empty.
    program: f64,
    /// Dumping them through `ipvs-netlink`.
    dump: f64,
    /// Listing them with `ipvsadm -Ln`.
    list: f64,
}

/// Programs the table one way (`ours`: `ipvs-netlink`; else `ipvsadm -R`), dumps it both
/// ways, and flushes it.
fn measure(args: &Args, ours: bool) -> Side {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let ipvs = runtime.block_on(async { IpvsHandle::new() }).unwrap();
    let destinations = args.services * args.destinations;
    let program = if ours {
        let changes = changes(args);
        let started = Instant::now();
        let results = runtime.block_on(ipvs.apply(&changes));
        let took = started.elapsed();
        let failed = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(failed, 0, "{:?}", results.iter().find(|r| r.is_err()));
        took
    } else {
        ipvsadm_restore(&ipvsadm_rules(args))
    };
    let started = Instant::now();
    let table = runtime.block_on(ipvs.dump()).unwrap();
    let dump = started.elapsed();
    assert_eq!(table.len(), args.services);
    assert_eq!(table.iter().map(|(_, d)| d.len()).sum::<usize>(), destinations);
    let (list, listed) = ipvsadm_list();
    assert_eq!(listed, destinations, "ipvsadm lists every destination");
    runtime.block_on(ipvs.flush()).unwrap();
    Side { program: program.as_secs_f64(), dump: dump.as_secs_f64(), list: list.as_secs_f64() }
}

/// Runs one side in a fresh network namespace of its own: IPVS keeps deleted destinations
/// in a per-namespace trash list, and every later addition searches it, so a side run after
/// another in the same namespace would be slowed by the first.
fn side_in_fresh_namespace(args: &Args, side: &str) -> Side {
    let me = std::env::current_exe().unwrap();
    let command = format!(
        "ip link set lo up && exec {} --side {side} --services {} --destinations {}",
        me.display(),
        args.services,
        args.destinations
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &command])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "side {side} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

fn main() {
    let (args, side) = parse_args();
    if let Some(side) = side {
        let measured = measure(&args, side == "ipvs-netlink");
        println!("{}", serde_json::to_string(&measured).unwrap());
        return;
    }
    let operations = args.services * (args.destinations + 1);
    eprintln!(
        "ipvs-bench: {} services x {} destinations ({operations} operations), each side in a fresh namespace, in both orders",
        args.services, args.destinations
    );
    // Both orders: what one side leaves behind (memory, the kernel's workers tearing a
    // namespace down) cannot favour either.
    let ours_first = side_in_fresh_namespace(&args, "ipvs-netlink");
    let theirs_second = side_in_fresh_namespace(&args, "ipvsadm");
    let theirs_first = side_in_fresh_namespace(&args, "ipvsadm");
    let ours_second = side_in_fresh_namespace(&args, "ipvs-netlink");

    let entries = args.services * (args.destinations + 1);
    let rate = |n: usize, s: f64| format!("{:.0}", n as f64 / s);
    let pair = |a: f64, b: f64| format!("{:.2} s / {:.2} s", a, b);
    let ratio = |ours: f64, theirs: f64| format!("{:.2}", ours / theirs);
    println!();
    println!(
        "IPVS programming and dumping, {} services x {} destinations, same VM, same run; each side in a fresh network namespace, run first and run second:",
        args.services, args.destinations
    );
    println!();
    println!(
        "| operation | ipvs-netlink (first / second) | ipvsadm (first / second) | ratio, ours / ipvsadm (each first / each second) | ipvs-netlink ops/s | ipvsadm ops/s |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| program from empty ({operations} adds; `ipvsadm -R`) | {} | {} | {} / {} | {} | {} |",
        pair(ours_first.program, ours_second.program),
        pair(theirs_first.program, theirs_second.program),
        ratio(ours_first.program, theirs_first.program),
        ratio(ours_second.program, theirs_second.program),
        rate(operations, ours_first.program.min(ours_second.program)),
        rate(operations, theirs_first.program.min(theirs_second.program)),
    );
    // Each dump is read twice per order (after each side's programming): the better of the
    // two tables, as both hold the same rules.
    let dump = |a: &Side, b: &Side| a.dump.min(b.dump);
    let list = |a: &Side, b: &Side| a.list.min(b.list);
    println!(
        "| dump every service and destination ({entries} entries; `ipvsadm -Ln`) | {} | {} | {} / {} | {} | {} |",
        pair(dump(&ours_first, &theirs_second), dump(&theirs_first, &ours_second)),
        pair(list(&ours_first, &theirs_second), list(&theirs_first, &ours_second)),
        ratio(dump(&ours_first, &theirs_second), list(&ours_first, &theirs_second)),
        ratio(dump(&theirs_first, &ours_second), list(&theirs_first, &ours_second)),
        rate(entries, dump(&ours_first, &theirs_second).min(dump(&theirs_first, &ours_second))),
        rate(entries, list(&ours_first, &theirs_second).min(list(&theirs_first, &ours_second))),
    );
    println!();
    let program_ratio = (ours_first.program / theirs_first.program)
        .max(ours_second.program / theirs_second.program);
    println!(
        "Target: programming at most 0.5x ipvsadm -R in either order: {} ({program_ratio:.2}x)",
        if program_ratio <= 0.5 { "met" } else { "not met" }
    );
    println!();
}
