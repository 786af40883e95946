//! `cargo xtask bench ipvs`: programming and dumping IPVS through `ipvs-netlink`, with
//! `ipvsadm -R` and `ipvsadm -Ln` on the same rules in the same VM as the baseline.
//!
//! Runs inside the VM in a fresh network namespace. Prints a Markdown table.

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

fn parse_args() -> Args {
    let mut args = Args { services: 10_000, destinations: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse().ok()).expect("a number after the flag");
        match flag.as_str() {
            "--services" => args.services = value,
            "--destinations" => args.destinations = value,
            other => panic!("unknown flag {other}"),
        }
    }
    args
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

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let ipvs = runtime.block_on(async { IpvsHandle::new() }).unwrap();
    let changes = changes(&args);
    let operations = changes.len();
    let destinations = args.services * args.destinations;
    eprintln!(
        "ipvs-bench: {} services x {} destinations ({operations} operations)",
        args.services, args.destinations
    );

    // Ours: program from empty, then dump.
    runtime.block_on(ipvs.flush()).unwrap();
    let started = Instant::now();
    let results = runtime.block_on(ipvs.apply(&changes));
    let ours_program = started.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 0, "{:?}", results.iter().find(|r| r.is_err()));
    let started = Instant::now();
    let table = runtime.block_on(ipvs.dump()).unwrap();
    let ours_dump = started.elapsed();
    assert_eq!(table.len(), args.services);
    assert_eq!(table.iter().map(|(_, d)| d.len()).sum::<usize>(), destinations);
    let (ipvsadm_dump_ours_state, listed) = ipvsadm_list();
    assert_eq!(listed, destinations, "ipvsadm lists what the crate wrote");

    // Baseline: the same rules through ipvsadm -R from empty, then dump both ways again.
    runtime.block_on(ipvs.flush()).unwrap();
    let rules = ipvsadm_rules(&args);
    let ipvsadm_program = ipvsadm_restore(&rules);
    let (ipvsadm_dump, listed) = ipvsadm_list();
    assert_eq!(listed, destinations);
    let started = Instant::now();
    let table = runtime.block_on(ipvs.dump()).unwrap();
    let ours_dump_again = started.elapsed();
    assert_eq!(table.iter().map(|(_, d)| d.len()).sum::<usize>(), destinations);
    runtime.block_on(ipvs.flush()).unwrap();

    let ours_dump = ours_dump.min(ours_dump_again);
    let ipvsadm_dump = ipvsadm_dump.min(ipvsadm_dump_ours_state);
    let rate = |n: usize, d: Duration| format!("{:.0}", n as f64 / d.as_secs_f64());
    let ratio = |a: Duration, b: Duration| format!("{:.2}", a.as_secs_f64() / b.as_secs_f64());
    let entries = args.services + destinations;
    println!();
    println!(
        "IPVS programming and dumping, {} services x {} destinations, same VM, same run:",
        args.services, args.destinations
    );
    println!();
    println!(
        "| operation | ipvs-netlink | ipvsadm | ratio (ours / ipvsadm) | ipvs-netlink ops/s | ipvsadm ops/s |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| program from empty ({operations} adds; `ipvsadm -R`) | {} | {} | {} | {} | {} |",
        seconds(ours_program),
        seconds(ipvsadm_program),
        ratio(ours_program, ipvsadm_program),
        rate(operations, ours_program),
        rate(operations, ipvsadm_program)
    );
    println!(
        "| dump every service and destination ({entries} entries; `ipvsadm -Ln`) | {} | {} | {} | {} | {} |",
        seconds(ours_dump),
        seconds(ipvsadm_dump),
        ratio(ours_dump, ipvsadm_dump),
        rate(entries, ours_dump),
        rate(entries, ipvsadm_dump)
    );
    println!();
}
