//! Codec tests against byte vectors from the real kernel: every message parses into the
//! expected values and re-emits byte for byte; no input makes the parser panic.

mod vectors;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use proptest::prelude::*;

use self::vectors::*;
use super::{IpvsAttribute, IpvsCommand, IpvsMessage};
use crate::types::{
    Destination, DestinationEntry, Family, ForwardMethod, Netmask, ServiceEntry, ServiceFlags,
    ServiceKey, TunnelChecksum, TunnelType, VirtualService,
};

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

type Message = NetlinkMessage<GenlMessage<IpvsMessage>>;

fn parse(hex: &str) -> Message {
    Message::deserialize(&bytes(hex)).unwrap()
}

fn ipvs(message: &Message) -> &IpvsMessage {
    match &message.payload {
        NetlinkPayload::InnerMessage(genl) => &genl.payload,
        other => panic!("not an IPVS message: {other:?}"),
    }
}

fn service_entry(message: &Message) -> ServiceEntry {
    match &ipvs(message).attributes[..] {
        [IpvsAttribute::Service(attrs)] => ServiceEntry::from_attributes(attrs).unwrap(),
        other => panic!("{other:?}"),
    }
}

fn destination_entry(message: &Message) -> DestinationEntry {
    match &ipvs(message).attributes[..] {
        [IpvsAttribute::Destination(attrs)] => {
            DestinationEntry::from_attributes(attrs, Family::Ipv4).unwrap()
        }
        other => panic!("{other:?}"),
    }
}

const ALL: &[(&str, &str)] = &[
    ("REQUEST_NEW_SERVICE", REQUEST_NEW_SERVICE),
    ("REQUEST_NEW_SERVICE_V6_PERSISTENT", REQUEST_NEW_SERVICE_V6_PERSISTENT),
    ("REQUEST_NEW_DEST", REQUEST_NEW_DEST),
    ("REQUEST_NEW_DEST_GUE", REQUEST_NEW_DEST_GUE),
    ("REPLY_SERVICE_DUMP_0", REPLY_SERVICE_DUMP_0),
    ("REPLY_SERVICE_DUMP_1", REPLY_SERVICE_DUMP_1),
    ("REPLY_SERVICE_DUMP_2", REPLY_SERVICE_DUMP_2),
    ("REPLY_SERVICE_DUMP_3", REPLY_SERVICE_DUMP_3),
    ("REPLY_DEST_DUMP_0", REPLY_DEST_DUMP_0),
    ("REPLY_DEST_DUMP_1", REPLY_DEST_DUMP_1),
    ("REPLY_INFO", REPLY_INFO),
    ("REPLY_CONFIG", REPLY_CONFIG),
    ("REPLY_ERROR_EEXIST", REPLY_ERROR_EEXIST),
];

#[test]
fn every_vector_reemits_byte_for_byte() {
    for (name, hex) in ALL {
        let original = bytes(hex);
        let message = Message::deserialize(&original).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut emitted = vec![0; message.buffer_len()];
        message.serialize(&mut emitted);
        assert_eq!(emitted, original, "{name}");
    }
}

#[test]
fn the_service_dump_reads_as_the_services_that_were_added() {
    let dumped: Vec<ServiceEntry> =
        [REPLY_SERVICE_DUMP_0, REPLY_SERVICE_DUMP_1, REPLY_SERVICE_DUMP_2]
            .iter()
            .map(|hex| service_entry(&parse(hex)))
            .collect();
    let find = |key: ServiceKey| dumped.iter().find(|s| s.service.key == key).unwrap();

    let web = find(ServiceKey::tcp("10.96.0.10:80".parse().unwrap()));
    assert_eq!(web.service.scheduler, "rr");
    assert_eq!(web.service.flags, ServiceFlags::HASHED);
    assert_eq!(web.service.netmask, Netmask::host(Family::Ipv4));
    // Two connections went through this service before the dump.
    let stats64 = web.stats64.unwrap();
    assert_eq!(stats64.connections, 2);
    assert!(stats64.in_packets >= 6 && stats64.in_bytes > stats64.in_packets * 40);
    assert_eq!(web.stats.unwrap().connections, 2, "the 32-bit block agrees");

    let v6 = find(ServiceKey::tcp("[fd00::10]:443".parse().unwrap()));
    assert_eq!(v6.service.scheduler, "sh");
    assert_eq!(
        v6.service.flags,
        ServiceFlags::PERSISTENT
            | ServiceFlags::HASHED
            | ServiceFlags::SH_FALLBACK
            | ServiceFlags::SH_PORT
    );
    assert_eq!((v6.service.timeout, v6.service.netmask), (300, Netmask::Ipv6(64)));

    let mark = find(ServiceKey::Fwmark { family: Family::Ipv4, mark: 7 });
    assert_eq!(mark.service.scheduler, "wlc");

    let done = parse(REPLY_SERVICE_DUMP_3);
    assert!(matches!(done.payload, NetlinkPayload::Done(_)), "{done:?}");
}

#[test]
fn the_destination_dump_reads_with_counters() {
    let pod = destination_entry(&parse(REPLY_DEST_DUMP_0));
    assert_eq!(pod.destination, Destination::new("10.244.1.2:8080".parse().unwrap()));
    assert_eq!(pod.destination.forward, ForwardMethod::Masquerade);
    assert_eq!(pod.counters().connections, 2);
    assert_eq!(pod.active_connections + pod.inactive_connections, 2);
    assert!(matches!(parse(REPLY_DEST_DUMP_1).payload, NetlinkPayload::Done(_)));
}

#[test]
fn info_config_and_error_replies() {
    let info = parse(REPLY_INFO);
    assert_eq!(ipvs(&info).command, IpvsCommand::SetInfo);
    assert_eq!(
        ipvs(&info).attributes,
        [IpvsAttribute::InfoVersion(0x010201), IpvsAttribute::InfoConnectionTableSize(4096)]
    );
    let config = parse(REPLY_CONFIG);
    assert_eq!(ipvs(&config).command, IpvsCommand::SetConfig);
    assert_eq!(
        ipvs(&config).attributes,
        [
            IpvsAttribute::TimeoutTcp(900),
            IpvsAttribute::TimeoutTcpFin(120),
            IpvsAttribute::TimeoutUdp(300)
        ]
    );
    match parse(REPLY_ERROR_EEXIST).payload {
        NetlinkPayload::Error(err) => assert_eq!(err.raw_code(), -17),
        other => panic!("{other:?}"),
    }
}

/// The attributes after the netlink header of a request.
fn request_body(message: &IpvsMessage) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(message.clone());
    genl.set_resolved_family_id(32);
    let mut message = NetlinkMessage::from(genl);
    message.finalize();
    let mut out = vec![0; message.buffer_len()];
    message.serialize(&mut out);
    out[16..].to_vec()
}

#[test]
fn requests_encode_as_the_kernel_accepted_them() {
    let web = ServiceKey::tcp("10.96.0.10:80".parse().unwrap());
    let v6 = ServiceKey::tcp("[fd00::10]:443".parse().unwrap());
    let mark = ServiceKey::Fwmark { family: Family::Ipv4, mark: 7 };
    let cases = [
        (REQUEST_NEW_SERVICE, IpvsMessage::new_service(&VirtualService::new(web, "rr"))),
        (
            REQUEST_NEW_SERVICE_V6_PERSISTENT,
            IpvsMessage::new_service(
                &VirtualService::new(v6, "sh")
                    .with_flags(ServiceFlags::SH_FALLBACK | ServiceFlags::SH_PORT)
                    .persistent(300)
                    .with_netmask(Netmask::Ipv6(64)),
            ),
        ),
        (
            REQUEST_NEW_DEST,
            IpvsMessage::new_dest(&web, &Destination::new("10.244.1.2:8080".parse().unwrap())),
        ),
        (
            REQUEST_NEW_DEST_GUE,
            IpvsMessage::new_dest(
                &mark,
                &Destination::new("10.244.1.8:80".parse().unwrap()).with_tunnel(
                    TunnelType::Gue,
                    6080,
                    TunnelChecksum::Checksum,
                ),
            ),
        ),
    ];
    for (hex, message) in cases {
        assert_eq!(request_body(&message), bytes(hex)[16..], "{message:?}");
    }
}

#[test]
fn unknown_attributes_are_kept() {
    // A service nest with an attribute from the future (kind 99), and a top-level one (kind 42).
    let mut attrs =
        VirtualService::new(ServiceKey::tcp("10.0.0.1:80".parse().unwrap()), "rr").to_attributes();
    attrs.push(super::ServiceAttribute::Other(netlink_packet_core::DefaultNla::new(
        99,
        vec![1, 2, 3],
    )));
    let message = IpvsMessage::new(
        IpvsCommand::NewService,
        vec![
            IpvsAttribute::Service(attrs),
            IpvsAttribute::Other(netlink_packet_core::DefaultNla::new(42, vec![7; 8])),
        ],
    );
    let wire = request_body(&message);
    let mut framed = vec![0; 16];
    framed.extend_from_slice(&wire);
    let len = framed.len() as u32;
    framed[..4].copy_from_slice(&len.to_ne_bytes());
    framed[4..6].copy_from_slice(&32u16.to_ne_bytes());
    let parsed = Message::deserialize(&framed).unwrap();
    assert_eq!(ipvs(&parsed), &message);
    let IpvsAttribute::Service(attrs) = &ipvs(&parsed).attributes[0] else { panic!() };
    let entry = ServiceEntry::from_attributes(attrs).unwrap();
    assert_eq!(entry.service.key, ServiceKey::tcp("10.0.0.1:80".parse().unwrap()));
}

/// Parses everything the crate parses, from the netlink frame to the typed model.
fn parse_all_the_way(data: &[u8]) {
    if let Ok(message) = Message::deserialize(data)
        && let NetlinkPayload::InnerMessage(genl) = message.payload
    {
        for attr in genl.payload.attributes {
            match attr {
                IpvsAttribute::Service(attrs) => {
                    let _ = ServiceEntry::from_attributes(&attrs);
                }
                IpvsAttribute::Destination(attrs) => {
                    let _ = DestinationEntry::from_attributes(&attrs, Family::Ipv6);
                    let _ = DestinationEntry::from_attributes(&attrs, Family::Ipv4);
                }
                _ => {}
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_all_the_way(&data);
    }

    #[test]
    fn mutated_kernel_replies_never_panic(
        which in 0..ALL.len(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut data = bytes(ALL[which].1);
        for (at, value) in flips {
            let at = at % data.len();
            data[at] = value;
        }
        parse_all_the_way(&data);
        let cut = cut % (data.len() + 1);
        parse_all_the_way(&data[..cut]);
    }
}
