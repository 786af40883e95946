//! The IPVS table as `ipvsadm -Ln` prints it: same order, same columns, byte for byte.
//!
//! Operators read IPVS state with `ipvsadm -Ln`; tools built on this crate can print the same
//! text (and add to it) without running `ipvsadm`. The layout follows ipvsadm 1.31, including
//! its sort order: libipvs compares addresses by subtracting them as 32-bit numbers and taking
//! the result as a signed int, so `192.0.2.10` sorts before `10.96.0.1`.

use std::{cmp::Ordering, fmt::Write, net::IpAddr};

use netlink_packet_ipvs::{
    DestinationEntry, Family, Info, Netmask, ServiceEntry, ServiceFlags, ServiceKey, Stats,
};

/// Which columns to print, as ipvsadm's listing options choose them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Columns {
    /// `ipvsadm -Ln`: scheduler and flags; forwarding, weight and connections.
    #[default]
    Default,
    /// `ipvsadm -Ln --stats`: traffic counters.
    Stats,
    /// `ipvsadm -Ln --rate`: the estimator's rates.
    Rate,
    /// `ipvsadm -Ln --thresholds`: connection thresholds.
    Thresholds,
    /// `ipvsadm -Ln --persistent-conn`: persistence templates.
    PersistentConn,
}

/// One virtual service and its destinations.
pub type TableEntry = (ServiceEntry, Vec<DestinationEntry>);

/// Sorts services and their destinations as `ipvsadm -L` does (unless given `--nosort`).
pub fn sort_like_ipvsadm(table: &mut [TableEntry]) {
    table.sort_by(|a, b| compare_services(&a.0, &b.0));
    for (_, destinations) in table.iter_mut() {
        destinations.sort_by(compare_destinations);
    }
}

/// The whole listing: the version line, the column titles, then every service, sorted.
pub fn render(info: &Info, table: &[TableEntry], columns: Columns) -> String {
    render_annotated(info, table, columns, |_| None)
}

/// [`render`], with `annotate`'s text after the line of each service it has one for (two
/// spaces apart), so that the listing stays `ipvsadm`'s line for line.
pub fn render_annotated(
    info: &Info,
    table: &[TableEntry],
    columns: Columns,
    annotate: impl Fn(&ServiceKey) -> Option<String>,
) -> String {
    let mut sorted = table.to_vec();
    sort_like_ipvsadm(&mut sorted);
    let mut out = header(info, columns);
    for (service, destinations) in &sorted {
        out.push_str(&service_line(service, columns));
        if let Some(note) = annotate(&service.service.key) {
            out.push_str("  ");
            out.push_str(&note);
        }
        out.push('\n');
        for destination in destinations {
            out.push_str(&destination_line(service, destination, columns));
            out.push('\n');
        }
    }
    out
}

/// The version line and the column titles, each ending in a newline.
pub fn header(info: &Info, columns: Columns) -> String {
    let mut out = format!(
        "IP Virtual Server version {} (size={})\n",
        info.version_string(),
        info.connection_table_size
    );
    let title = "Prot LocalAddress:Port";
    let numbers = |names: [&str; 5]| {
        format!(
            "{title:<33} {:>8} {:>8} {:>8} {:>8} {:>8}\n  -> RemoteAddress:Port\n",
            names[0], names[1], names[2], names[3], names[4]
        )
    };
    out.push_str(&match columns {
        Columns::Default => {
            "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           \
                             Forward Weight ActiveConn InActConn\n"
                .to_owned()
        }
        Columns::Stats => numbers(["Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"]),
        Columns::Rate => numbers(["CPS", "InPPS", "OutPPS", "InBPS", "OutBPS"]),
        Columns::Thresholds => format!(
            "{title:<33} {:<10} {:<10} {:<10} {:<10}\n  -> RemoteAddress:Port\n",
            "Uthreshold", "Lthreshold", "ActiveConn", "InActConn"
        ),
        Columns::PersistentConn => format!(
            "{title:<33} {:<9} {:<11} {:<10} {:<10}\n  -> RemoteAddress:Port\n",
            "Weight", "PersistConn", "ActiveConn", "InActConn"
        ),
    });
    out
}

/// The service's name column: `TCP  10.96.0.1:443`, `SCTP 10.96.0.9:3868`, `FWM  7 IPv6`.
pub fn service_name(key: &ServiceKey) -> String {
    match key {
        ServiceKey::Fwmark { family: Family::Ipv4, mark } => format!("FWM  {mark}"),
        ServiceKey::Fwmark { family: Family::Ipv6, mark } => format!("FWM  {mark} IPv6"),
        ServiceKey::Inet { protocol, address } => {
            let mut name = format!("{:<4} {}", protocol.name(), address);
            if address.is_ipv4() {
                name.truncate(33);
            }
            name
        }
    }
}

/// One service line, without the newline.
pub fn service_line(entry: &ServiceEntry, columns: Columns) -> String {
    let service = &entry.service;
    let name = service_name(&service.key);
    match columns {
        Columns::Stats => format!("{name:<33}{}", numbers(&stats_columns(&entry.counters()))),
        Columns::Rate => format!("{name:<33}{}", numbers(&rate_columns(&entry.counters()))),
        _ => {
            let mut line = format!("{name} {}", service.scheduler);
            let set = scheduler_flags(service);
            if !set.is_empty() {
                let _ = write!(line, " ({})", set.join(","));
            }
            if service.flags.contains(ServiceFlags::PERSISTENT) {
                let _ = write!(line, " persistent {}", service.timeout);
                match service.netmask {
                    Netmask::Ipv4(mask) if mask.octets() != [255; 4] => {
                        let _ = write!(line, " mask {mask}");
                    }
                    Netmask::Ipv6(prefix) if prefix != 128 => {
                        let _ = write!(line, " mask {prefix}");
                    }
                    _ => {}
                }
                if let Some(engine) = &service.persistence_engine {
                    let _ = write!(line, " pe {engine}");
                }
            }
            if service.flags.contains(ServiceFlags::ONE_PACKET) {
                line.push_str(" ops");
            }
            line
        }
    }
}

/// One destination line, without the newline.
pub fn destination_line(
    service: &ServiceEntry,
    entry: &DestinationEntry,
    columns: Columns,
) -> String {
    let d = &entry.destination;
    let mut name = d.address.to_string();
    if service.service.key.family() == Family::Ipv4 {
        name.truncate(28);
    }
    match columns {
        Columns::Default => format!(
            "  -> {name:<28} {:<7} {:<6} {:<10} {:<10}",
            d.forward.name(),
            d.weight as i32,
            entry.active_connections,
            entry.inactive_connections
        ),
        Columns::Stats => format!("  -> {name:<28}{}", numbers(&stats_columns(&entry.counters()))),
        Columns::Rate => {
            let rates = rate_columns(&entry.counters());
            format!(
                "  -> {name:<28} {:>8} {:>8} {:>8}{}",
                rates[0] as u32,
                rates[1] as u32,
                rates[2] as u32,
                numbers(&rates[3..])
            )
        }
        Columns::Thresholds => format!(
            "  -> {name:<28} {:<10} {:<10} {:<10} {:<10}",
            d.upper_threshold,
            d.lower_threshold,
            entry.active_connections,
            entry.inactive_connections
        ),
        Columns::PersistentConn => format!(
            "  -> {name:<28} {:<9} {:<11} {:<10} {:<10}",
            d.weight,
            entry.persistent_connections,
            entry.active_connections,
            entry.inactive_connections
        ),
    }
}

/// The scheduler flags set on the service, by the names ipvsadm gives them.
pub fn scheduler_flags(service: &netlink_packet_ipvs::VirtualService) -> Vec<&'static str> {
    [ServiceFlags::SCHED1, ServiceFlags::SCHED2, ServiceFlags::SCHED3]
        .into_iter()
        .zip(scheduler_flag_names(&service.scheduler))
        .filter(|(flag, _)| service.flags.contains(*flag))
        .map(|(_, name)| name)
        .collect()
}

/// The table as JSON, sorted as [`render`] sorts it: one object per virtual server with its
/// destinations, carrying the numbers of every `ipvsadm -Ln` column set at once.
pub fn json(table: &[TableEntry]) -> serde_json::Value {
    let mut sorted = table.to_vec();
    sort_like_ipvsadm(&mut sorted);
    let services: Vec<_> = sorted
        .iter()
        .map(|(entry, destinations)| {
            let service = &entry.service;
            let persistent = service.flags.contains(ServiceFlags::PERSISTENT);
            let mut object = serde_json::json!({
                "scheduler": service.scheduler,
                "flags": scheduler_flags(service),
                "persistent": persistent.then_some(service.timeout),
                "persistence_engine": service.persistence_engine,
                "one_packet": service.flags.contains(ServiceFlags::ONE_PACKET),
                "stats": stats_json(&entry.counters()),
                "destinations": destinations.iter().map(|d| serde_json::json!({
                    "address": d.destination.address.to_string(),
                    "forward": d.destination.forward.name(),
                    "weight": d.destination.weight as i32,
                    "upper_threshold": d.destination.upper_threshold,
                    "lower_threshold": d.destination.lower_threshold,
                    "active_connections": d.active_connections,
                    "inactive_connections": d.inactive_connections,
                    "persistent_connections": d.persistent_connections,
                    "stats": stats_json(&d.counters()),
                })).collect::<Vec<_>>(),
            });
            match service.key {
                ServiceKey::Inet { protocol, address } => {
                    object["protocol"] = protocol.name().into();
                    object["address"] = address.to_string().into();
                }
                ServiceKey::Fwmark { family, mark } => {
                    object["fwmark"] = mark.into();
                    object["family"] = match family {
                        Family::Ipv4 => "IPv4",
                        Family::Ipv6 => "IPv6",
                    }
                    .into();
                }
            }
            object
        })
        .collect();
    serde_json::Value::Array(services)
}

fn stats_json(stats: &Stats) -> serde_json::Value {
    serde_json::json!({
        "connections": stats.connections,
        "in_packets": stats.in_packets,
        "out_packets": stats.out_packets,
        "in_bytes": stats.in_bytes,
        "out_bytes": stats.out_bytes,
        "connection_rate": stats.connection_rate,
        "in_packet_rate": stats.in_packet_rate,
        "out_packet_rate": stats.out_packet_rate,
        "in_byte_rate": stats.in_byte_rate,
        "out_byte_rate": stats.out_byte_rate,
    })
}

fn scheduler_flag_names(scheduler: &str) -> [&'static str; 3] {
    match scheduler {
        "sh" => ["sh-fallback", "sh-port", "flag-3"],
        "mh" => ["mh-fallback", "mh-port", "flag-3"],
        _ => ["flag-1", "flag-2", "flag-3"],
    }
}

fn stats_columns(s: &Stats) -> [u64; 5] {
    [s.connections, s.in_packets, s.out_packets, s.in_bytes, s.out_bytes]
}

fn rate_columns(s: &Stats) -> [u64; 5] {
    [s.connection_rate, s.in_packet_rate, s.out_packet_rate, s.in_byte_rate, s.out_byte_rate]
}

/// ipvsadm's `print_largenum`: 9 columns, scaled with K, M, G or T from 100 million up.
fn numbers(values: &[u64]) -> String {
    let mut out = String::new();
    for &n in values {
        let _ = match n {
            0..100_000_000 => write!(out, "{n:>9}"),
            100_000_000..1_000_000_000 => write!(out, "{:>8}K", n / 1_000),
            1_000_000_000..100_000_000_000 => write!(out, "{:>8}M", n / 1_000_000),
            100_000_000_000..100_000_000_000_000 => write!(out, "{:>8}G", n / 1_000_000_000),
            _ => write!(out, "{:>8}T", n / 1_000_000_000_000),
        };
    }
    out
}

/// libipvs compares `ntohl(a) - ntohl(b)` computed in unsigned arithmetic and read as an int.
fn c_difference(a: u32, b: u32) -> Ordering {
    (a.wrapping_sub(b) as i32).cmp(&0)
}

fn address_words(ip: IpAddr) -> Vec<u32> {
    match ip {
        IpAddr::V4(v4) => vec![u32::from(v4)],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            o.chunks(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
    }
}

fn compare_addresses(a: IpAddr, b: IpAddr) -> Ordering {
    address_words(a)
        .into_iter()
        .zip(address_words(b))
        .map(|(x, y)| c_difference(x, y))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

fn compare_services(a: &ServiceEntry, b: &ServiceEntry) -> Ordering {
    let parts = |key: &ServiceKey| match key {
        ServiceKey::Fwmark { family, mark } => (*mark, family.to_af(), 6, None),
        ServiceKey::Inet { protocol, address } => {
            (0, key.family().to_af(), protocol.number(), Some(*address))
        }
    };
    let (mark_a, af_a, proto_a, addr_a) = parts(&a.service.key);
    let (mark_b, af_b, proto_b, addr_b) = parts(&b.service.key);
    c_difference(mark_a, mark_b).then(af_a.cmp(&af_b)).then(proto_a.cmp(&proto_b)).then_with(|| {
        match (addr_a, addr_b) {
            (Some(x), Some(y)) if x.is_ipv4() == y.is_ipv4() => {
                compare_addresses(x.ip(), y.ip()).then(x.port().cmp(&y.port()))
            }
            _ => Ordering::Equal,
        }
    })
}

fn compare_destinations(a: &DestinationEntry, b: &DestinationEntry) -> Ordering {
    let (x, y) = (a.destination.address, b.destination.address);
    let by_address = if x.is_ipv4() == y.is_ipv4() {
        compare_addresses(x.ip(), y.ip())
    } else {
        x.is_ipv6().cmp(&y.is_ipv6())
    };
    by_address.then(x.port().cmp(&y.port()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_ipvs::{Destination, ForwardMethod, VirtualService};

    fn service(service: VirtualService) -> ServiceEntry {
        ServiceEntry { service, stats: None, stats64: None }
    }

    fn destination(address: &str, weight: u32, forward: ForwardMethod) -> DestinationEntry {
        DestinationEntry::new(
            Destination::new(address.parse().unwrap()).with_weight(weight).with_forward(forward),
        )
    }

    fn sample() -> Vec<TableEntry> {
        let web = ServiceKey::tcp("10.96.0.10:80".parse().unwrap());
        vec![
            (
                service(VirtualService::new(web, "rr")),
                vec![
                    destination("127.0.0.1:80", 1, ForwardMethod::Masquerade),
                    destination("10.244.1.6:80", 3, ForwardMethod::DirectRoute),
                    destination("10.244.1.5:8080", 1, ForwardMethod::Masquerade),
                ],
            ),
            (
                service(
                    VirtualService::new(ServiceKey::tcp("192.0.2.10:443".parse().unwrap()), "sh")
                        .with_flags(ServiceFlags::SH_FALLBACK | ServiceFlags::SH_PORT)
                        .persistent(300)
                        .with_netmask(Netmask::Ipv4("255.255.255.0".parse().unwrap())),
                ),
                vec![],
            ),
            (
                service(
                    VirtualService::new(ServiceKey::Fwmark { family: Family::Ipv6, mark: 8 }, "lc")
                        .persistent(360),
                ),
                vec![],
            ),
            (
                service(
                    VirtualService::new(ServiceKey::udp("10.96.0.54:5060".parse().unwrap()), "rr")
                        .persistent(60)
                        .with_persistence_engine("sip")
                        .with_flags(ServiceFlags::ONE_PACKET),
                ),
                vec![],
            ),
            (
                service(VirtualService::new(
                    ServiceKey::sctp("10.96.0.99:3868".parse().unwrap()),
                    "nq",
                )),
                vec![],
            ),
        ]
    }

    #[test]
    fn lists_as_ipvsadm_1_31_does() {
        let info = Info { version: 0x010201, connection_table_size: 4096 };
        let table = sample();
        let expected = "\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  192.0.2.10:443 sh (sh-fallback,sh-port) persistent 300 mask 255.255.255.0
TCP  10.96.0.10:80 rr
  -> 10.244.1.5:8080              Masq    1      0          0         
  -> 10.244.1.6:80                Route   3      0          0         
  -> 127.0.0.1:80                 Masq    1      0          0         
UDP  10.96.0.54:5060 rr persistent 60 pe sip ops
SCTP 10.96.0.99:3868 nq
FWM  8 IPv6 lc persistent 360
";
        assert_eq!(render(&info, &table, Columns::Default), expected);
    }

    #[test]
    fn large_numbers_scale_as_ipvsadm_does() {
        assert_eq!(
            numbers(&[0, 99_999_999, 123_456_789, 5_000_000_000]),
            "        0 99999999  123456K    5000M"
        );
    }

    #[test]
    fn json_carries_every_column_in_listing_order() {
        let mut table = sample();
        table[0].1[2].active_connections = 4;
        table[0].1[2].stats64 =
            Some(Stats { connections: 9, in_bytes: 1 << 40, ..Stats::default() });
        let json = json(&table);
        let services = json.as_array().unwrap();
        let names: Vec<String> = services
            .iter()
            .map(|s| match (s.get("address"), s.get("fwmark")) {
                (Some(address), _) => {
                    format!("{} {}", s["protocol"].as_str().unwrap(), address.as_str().unwrap())
                }
                (None, Some(mark)) => format!("FWM {mark} {}", s["family"].as_str().unwrap()),
                (None, None) => panic!("{s}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "TCP 192.0.2.10:443",
                "TCP 10.96.0.10:80",
                "UDP 10.96.0.54:5060",
                "SCTP 10.96.0.99:3868",
                "FWM 8 IPv6"
            ],
            "ipvsadm's order"
        );
        let sh = &services[0];
        assert_eq!(sh["scheduler"], "sh");
        assert_eq!(sh["flags"], serde_json::json!(["sh-fallback", "sh-port"]));
        assert_eq!(sh["persistent"], 300);
        let web = &services[1];
        assert_eq!(web["persistent"], serde_json::Value::Null);
        let first = &web["destinations"][0];
        assert_eq!(first["address"], "10.244.1.5:8080");
        assert_eq!(first["forward"], "Masq");
        assert_eq!(first["active_connections"], 4);
        assert_eq!(first["stats"]["connections"], 9);
        assert_eq!(first["stats"]["in_bytes"], 1u64 << 40, "64-bit counters kept whole");
        assert_eq!(web["destinations"][1]["forward"], "Route");
        assert_eq!(web["destinations"][1]["weight"], 3);
        let sip = &services[2];
        assert_eq!(sip["persistence_engine"], "sip");
        assert_eq!(sip["one_packet"], true);
    }
}
