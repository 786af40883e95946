//! Cross-checks with `ipvsadm`, both ways: what the crate writes, ipvsadm lists as expected;
//! what ipvsadm writes, the crate reads back as the same services and destinations; and the
//! crate's own listing (`ipvs_netlink::listing`) prints what ipvsadm prints.

use std::net::SocketAddr;

use ipvs_netlink::{
    Change, Destination, Family, ForwardMethod, IpvsHandle, Netmask, ServiceFlags, ServiceKey,
    TunnelChecksum, TunnelType, VirtualService,
};
use ipvsadm_listing::{self as listing, Columns};
use vm_tests::{Pod, bind_vip, ipvsadm, tcp_ask};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A table with every kind of service the crate can write.
fn rich_table() -> Vec<Change> {
    let web = ServiceKey::tcp(addr("10.96.0.10:80"));
    let lb = ServiceKey::tcp(addr("192.0.2.10:443"));
    let dns = ServiceKey::udp(addr("10.96.0.53:53"));
    let sip = ServiceKey::udp(addr("10.96.0.54:5060"));
    let diameter = ServiceKey::sctp(addr("10.96.0.99:3868"));
    let v6 = ServiceKey::tcp(addr("[fd00::10]:443"));
    let mark = ServiceKey::Fwmark { family: Family::Ipv4, mark: 7 };
    let mark6 = ServiceKey::Fwmark { family: Family::Ipv6, mark: 8 };
    vec![
        Change::AddService(VirtualService::new(web, "rr")),
        Change::AddDestination(web, Destination::new(addr("10.244.1.5:8080"))),
        Change::AddDestination(
            web,
            Destination::new(addr("10.244.1.6:80"))
                .with_forward(ForwardMethod::DirectRoute)
                .with_weight(3)
                .with_thresholds(10, 100),
        ),
        Change::AddDestination(
            web,
            Destination::new(addr("10.244.1.7:80"))
                .with_tunnel(TunnelType::Ipip, 0, TunnelChecksum::None)
                .with_weight(0),
        ),
        Change::AddDestination(
            web,
            Destination::new(addr("10.244.1.8:80")).with_tunnel(
                TunnelType::Gue,
                6080,
                TunnelChecksum::None,
            ),
        ),
        Change::AddService(
            VirtualService::new(lb, "sh")
                .with_flags(ServiceFlags::SH_FALLBACK | ServiceFlags::SH_PORT)
                .persistent(300)
                .with_netmask(Netmask::Ipv4("255.255.255.0".parse().unwrap())),
        ),
        Change::AddService(VirtualService::new(dns, "mh").with_flags(
            ServiceFlags::MH_FALLBACK | ServiceFlags::MH_PORT | ServiceFlags::ONE_PACKET,
        )),
        Change::AddService(
            VirtualService::new(sip, "rr")
                .persistent(60)
                .with_persistence_engine("sip")
                .with_flags(ServiceFlags::ONE_PACKET),
        ),
        Change::AddService(VirtualService::new(diameter, "nq")),
        Change::AddService(
            VirtualService::new(v6, "wrr").persistent(100).with_netmask(Netmask::Ipv6(64)),
        ),
        Change::AddDestination(v6, Destination::new(addr("[fd00:10:244::5]:8443")).with_weight(2)),
        Change::AddService(VirtualService::new(mark, "wlc")),
        Change::AddDestination(
            mark,
            Destination::new(addr("10.244.2.2:0")).with_forward(ForwardMethod::DirectRoute),
        ),
        Change::AddService(VirtualService::new(mark6, "lc").persistent(360)),
    ]
}

#[tokio::test]
async fn what_the_crate_writes_ipvsadm_lists() {
    let ipvs = IpvsHandle::new().unwrap();
    for result in ipvs.apply(&rich_table()).await {
        result.unwrap();
    }
    // Exactly what ipvsadm 1.31 prints for this table (the order is ipvsadm's own sort).
    let expected = "\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  192.0.2.10:443 sh (sh-fallback,sh-port) persistent 300 mask 255.255.255.0
TCP  10.96.0.10:80 rr
  -> 10.244.1.5:8080              Masq    1      0          0         
  -> 10.244.1.6:80                Route   3      0          0         
  -> 10.244.1.7:80                Tunnel  0      0          0         
  -> 10.244.1.8:80                Tunnel  1      0          0         
UDP  10.96.0.53:53 mh (mh-fallback,mh-port) ops
UDP  10.96.0.54:5060 rr persistent 60 pe sip ops
SCTP 10.96.0.99:3868 nq
TCP  [fd00::10]:443 wrr persistent 100 mask 64
  -> [fd00:10:244::5]:8443        Masq    2      0          0         
FWM  7 wlc
  -> 10.244.2.2:0                 Route   1      0          0         
FWM  8 IPv6 lc persistent 360
";
    assert_eq!(ipvsadm(&["-Ln"]), expected);
    let thresholds = ipvsadm(&["-Ln", "--thresholds"]);
    assert!(
        thresholds.contains("  -> 10.244.1.6:80                100        10         0          0"),
        "{thresholds}"
    );
    let rules = ipvsadm(&["-Sn"]);
    assert!(rules.contains("-a -t 10.96.0.10:80 -r 10.244.1.8:80 -i -w 1 --tun-type gue --tun-port 6080 --tun-nocsum"), "{rules}");
}

#[tokio::test]
async fn the_crate_lists_what_ipvsadm_lists() {
    let ipvs = IpvsHandle::new().unwrap();
    for result in ipvs.apply(&rich_table()).await {
        result.unwrap();
    }
    // Real traffic, so that counters and connection counts are not all zero.
    let pod = Pod::new(1);
    pod.serve_tcp_held(8080);
    let vip = addr("10.96.1.1:80");
    bind_vip(vip.ip());
    let key = ServiceKey::tcp(vip);
    ipvs.add_service(&VirtualService::new(key, "rr").persistent(600)).await.unwrap();
    ipvs.add_destination(&key, &Destination::new(pod.addr(8080))).await.unwrap();
    let _held = std::net::TcpStream::connect(vip).unwrap();
    tcp_ask(vip).ok();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let info = ipvs.info().await.unwrap();
    for (columns, flags) in [
        (Columns::Default, vec!["-Ln"]),
        (Columns::Stats, vec!["-Ln", "--stats"]),
        (Columns::Thresholds, vec!["-Ln", "--thresholds"]),
        (Columns::PersistentConn, vec!["-Ln", "--persistent-conn"]),
    ] {
        // Counters can move between the two reads: try again a few times.
        let mut attempts = Vec::new();
        for _ in 0..3 {
            let ours = listing::render(&info, &ipvs.dump().await.unwrap(), columns);
            let theirs = ipvsadm(&flags);
            let same = ours == theirs;
            attempts.push((ours, theirs));
            if same {
                break;
            }
        }
        let (ours, theirs) = attempts.pop().unwrap();
        assert_eq!(ours, theirs, "{flags:?}");
    }
    // The held connection and the persistence template show up in the counts.
    let listed = ipvsadm(&["-Ln", "--persistent-conn"]);
    let line = listed.lines().find(|l| l.contains("10.244.1.2:8080")).unwrap();
    let fields: Vec<u32> = line.split_whitespace().skip(2).map(|f| f.parse().unwrap()).collect();
    let [weight, persistent, active, _inactive] = fields[..] else { panic!("{line}") };
    assert_eq!((weight, persistent, active), (1, 1, 1), "{listed}");

    // The JSON listing: the same virtual servers in the same order, with the same counts.
    let json = listing::json(&ipvs.dump().await.unwrap());
    let services = json.as_array().unwrap();
    let from_json: Vec<(String, String)> = services
        .iter()
        .map(|s| match s.get("address") {
            Some(address) => (s["protocol"].to_string(), address.to_string()),
            None => ("FWM".to_owned(), s["fwmark"].to_string()),
        })
        .map(|(a, b)| (a.trim_matches('"').to_owned(), b.trim_matches('"').to_owned()))
        .collect();
    let listed = ipvsadm(&["-Ln"]);
    let from_ipvsadm: Vec<(String, String)> = listed
        .lines()
        .skip(3)
        .filter(|l| !l.starts_with("  ->"))
        .map(|l| {
            let mut words = l.split_whitespace();
            (words.next().unwrap().to_owned(), words.next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(from_json, from_ipvsadm, "{listed}");
    let held = services
        .iter()
        .flat_map(|s| s["destinations"].as_array().unwrap())
        .find(|d| d["address"] == "10.244.1.2:8080")
        .unwrap();
    assert_eq!(held["active_connections"], 1, "{held}");
    assert_eq!(held["persistent_connections"], 1, "{held}");
    assert!(held["stats"]["connections"].as_u64().unwrap() >= 1, "{held}");
}

#[tokio::test]
async fn what_ipvsadm_writes_the_crate_reads() {
    for args in [
        "-A -t 10.96.0.10:80 -s rr",
        "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1",
        "-a -t 10.96.0.10:80 -r 10.244.1.6:8080 -g -w 3 -x 100 -y 10",
        "-a -t 10.96.0.10:80 -r 10.244.1.8:8080 -i --tun-type gue --tun-port 6080 --tun-csum",
        "-A -t 192.0.2.10:443 -s sh -b sh-fallback,sh-port -p 300 -M 255.255.255.0",
        "-A -u 10.96.0.53:53 -s mh -b mh-fallback,mh-port -o",
        "-A --sctp-service 10.96.0.99:3868 -s nq",
        "-A -f 7 -s wlc",
        "-a -f 7 -r 10.244.2.2:0 -g",
        "-A -f 8 -6 -s lc -p",
        "-A -t [fd00::10]:443 -s wrr -p 100 -M 64",
        "-a -t [fd00::10]:443 -r [fd00:10:244::5]:8443 -m -w 2",
    ] {
        ipvsadm(&args.split(' ').collect::<Vec<_>>());
    }
    let ipvs = IpvsHandle::new().unwrap();
    let mut table = ipvs.dump().await.unwrap();
    listing::sort_like_ipvsadm(&mut table);
    let services: Vec<VirtualService> = table.iter().map(|(s, _)| s.service.clone()).collect();
    let expected = [
        VirtualService::new(ServiceKey::tcp(addr("192.0.2.10:443")), "sh")
            .with_flags(ServiceFlags::SH_FALLBACK | ServiceFlags::SH_PORT | ServiceFlags::HASHED)
            .persistent(300)
            .with_netmask(Netmask::Ipv4("255.255.255.0".parse().unwrap())),
        VirtualService::new(ServiceKey::tcp(addr("10.96.0.10:80")), "rr")
            .with_flags(ServiceFlags::HASHED),
        VirtualService::new(ServiceKey::udp(addr("10.96.0.53:53")), "mh").with_flags(
            ServiceFlags::MH_FALLBACK
                | ServiceFlags::MH_PORT
                | ServiceFlags::ONE_PACKET
                | ServiceFlags::HASHED,
        ),
        VirtualService::new(ServiceKey::sctp(addr("10.96.0.99:3868")), "nq")
            .with_flags(ServiceFlags::HASHED),
        VirtualService::new(ServiceKey::tcp(addr("[fd00::10]:443")), "wrr")
            .with_flags(ServiceFlags::HASHED)
            .persistent(100)
            .with_netmask(Netmask::Ipv6(64)),
        VirtualService::new(ServiceKey::Fwmark { family: Family::Ipv4, mark: 7 }, "wlc")
            .with_flags(ServiceFlags::HASHED),
        VirtualService::new(ServiceKey::Fwmark { family: Family::Ipv6, mark: 8 }, "lc")
            .with_flags(ServiceFlags::HASHED)
            .persistent(360),
    ];
    assert_eq!(services, expected);

    let web: Vec<Destination> = table[1].1.iter().map(|d| d.destination).collect();
    assert_eq!(
        web,
        [
            Destination::new(addr("10.244.1.5:8080")),
            // The kernel keeps the service's port for forwarding methods that cannot map it.
            Destination::new(addr("10.244.1.6:80"))
                .with_forward(ForwardMethod::DirectRoute)
                .with_weight(3)
                .with_thresholds(10, 100),
            Destination::new(addr("10.244.1.8:80")).with_tunnel(
                TunnelType::Gue,
                6080,
                TunnelChecksum::Checksum
            ),
        ]
    );
    assert_eq!(
        table[4].1[0].destination,
        Destination::new(addr("[fd00:10:244::5]:8443")).with_weight(2)
    );
    assert_eq!(
        table[5].1[0].destination,
        Destination::new(addr("10.244.2.2:0")).with_forward(ForwardMethod::DirectRoute)
    );

    // And the crate's listing of ipvsadm's state is ipvsadm's listing.
    let info = ipvs.info().await.unwrap();
    assert_eq!(listing::render(&info, &table, Columns::Default), ipvsadm(&["-Ln"]));
}
