//! Captures byte vectors from the real kernel for the codec tests of `ipvs-netlink`.
//!
//! Run it in the VM in a fresh namespace, then paste its output into
//! `crates/netlink-packet-ipvs/src/message/tests/vectors.rs`:
//!
//! ```text
//! cargo build -p vm-tests --bin capture-vectors
//! cargo xtask vm -- unshare -n sh -c 'ip link set lo up && target/debug/capture-vectors'
//! ```
//!
//! It talks to the kernel with a plain blocking socket, so what it records does not depend on
//! the crate's I/O layer: requests are encoded with the crate's message types, and replies are
//! printed exactly as received, one netlink message per vector.

use std::{thread, time::Duration};

use ipvs_netlink::{
    Destination, Family, Netmask, ServiceFlags, ServiceKey, TunnelChecksum, TunnelType,
    VirtualService,
    message::{IpvsAttribute, IpvsCommand, IpvsMessage},
};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_generic::{
    GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
use vm_tests::{Pod, bind_vip, tcp_ask};

struct Capture {
    socket: Socket,
    family: u16,
    seq: u32,
}

fn print_vector(name: &str, bytes: &[u8]) {
    let lines: Vec<String> =
        bytes.chunks(40).map(|chunk| chunk.iter().map(|b| format!("{b:02x}")).collect()).collect();
    if let [line] = &lines[..] {
        println!("pub(super) const {name}: &str = \"{line}\";");
        return;
    }
    println!("pub(super) const {name}: &str = concat!(");
    for line in lines {
        println!("    \"{line}\",");
    }
    println!(");");
}

impl Capture {
    fn send<P>(&mut self, payload: P, flags: u16) -> Vec<u8>
    where
        P: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
        NetlinkPayload<P>: From<P>,
    {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0).expect("send");
        bytes
    }

    /// Every reply message until the ACK, error or end of dump.
    fn replies(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full().expect("recv");
            let mut offset = 0;
            while offset < datagram.len() {
                let frame = NetlinkBuffer::new_checked(&datagram[offset..]).expect("framing");
                let len = frame.length() as usize;
                let kind = frame.message_type();
                out.push(datagram[offset..offset + len].to_vec());
                offset += (len + 3) & !3;
                if kind == 2 || kind == 3 {
                    return out;
                }
            }
        }
    }

    fn ipvs(&mut self, name: Option<&str>, message: IpvsMessage, flags: u16) -> Vec<Vec<u8>> {
        let mut genl = GenlMessage::from_payload(message);
        genl.set_resolved_family_id(self.family);
        let request = self.send(genl, flags);
        if let Some(name) = name {
            print_vector(name, &request);
        }
        self.replies()
    }
}

fn service_message(command: IpvsCommand, service: &VirtualService) -> IpvsMessage {
    IpvsMessage::new(command, vec![IpvsAttribute::Service(service.to_attributes())])
}

fn main() {
    let mut socket = Socket::new(NETLINK_GENERIC).expect("socket");
    socket.bind_auto().expect("bind");
    socket.connect(&SocketAddr::new(0, 0)).expect("connect");
    let mut capture = Capture { socket, family: 0, seq: 0 };
    let lookup = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("IPVS".into())],
    });
    capture.send(lookup, NLM_F_REQUEST | NLM_F_ACK);
    let reply = capture.replies().remove(0);
    let parsed = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(&reply).expect("ctrl");
    let NetlinkPayload::InnerMessage(ctrl) = parsed.payload else { panic!("{parsed:?}") };
    capture.family = ctrl
        .payload
        .nlas
        .iter()
        .find_map(|a| if let GenlCtrlAttrs::FamilyId(id) = a { Some(*id) } else { None })
        .expect("IPVS family");
    println!(
        "// IPVS family id {} on {}",
        capture.family,
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim()
    );

    let web = ServiceKey::tcp("10.96.0.10:80".parse().unwrap());
    let v6 = ServiceKey::tcp("[fd00::10]:443".parse().unwrap());
    let mark = ServiceKey::Fwmark { family: Family::Ipv4, mark: 7 };
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    let dump = NLM_F_REQUEST | NLM_F_DUMP;

    let pod = Pod::new(1);
    pod.serve_tcp(8080);
    bind_vip("10.96.0.10".parse().unwrap());

    capture.ipvs(
        Some("REQUEST_NEW_SERVICE"),
        service_message(IpvsCommand::NewService, &VirtualService::new(web, "rr")),
        ack,
    );
    let affinity = VirtualService::new(v6, "sh")
        .with_flags(ServiceFlags::SH_FALLBACK | ServiceFlags::SH_PORT)
        .persistent(300)
        .with_netmask(Netmask::Ipv6(64));
    capture.ipvs(
        Some("REQUEST_NEW_SERVICE_V6_PERSISTENT"),
        service_message(IpvsCommand::NewService, &affinity),
        ack,
    );
    capture.ipvs(
        None,
        service_message(IpvsCommand::NewService, &VirtualService::new(mark, "wlc")),
        ack,
    );
    let dest = |key: ServiceKey, d: &Destination| {
        IpvsMessage::new(
            IpvsCommand::NewDest,
            vec![
                IpvsAttribute::Service(key.to_attributes()),
                IpvsAttribute::Destination(d.to_attributes()),
            ],
        )
    };
    capture.ipvs(Some("REQUEST_NEW_DEST"), dest(web, &Destination::new(pod.addr(8080))), ack);
    let gue = Destination::new("10.244.1.8:80".parse().unwrap()).with_tunnel(
        TunnelType::Gue,
        6080,
        TunnelChecksum::Checksum,
    );
    // On the firewall-mark service: nothing answers behind the tunnel.
    capture.ipvs(Some("REQUEST_NEW_DEST_GUE"), dest(mark, &gue), ack);

    for _ in 0..2 {
        assert_eq!(tcp_ask("10.96.0.10:80".parse().unwrap()).unwrap().from, "pod1");
    }
    // Let the estimator sum the counters.
    thread::sleep(Duration::from_secs(3));

    let services = capture.ipvs(None, IpvsMessage::new(IpvsCommand::GetService, vec![]), dump);
    for (i, message) in services.iter().enumerate() {
        print_vector(&format!("REPLY_SERVICE_DUMP_{i}"), message);
    }
    let dests = capture.ipvs(
        None,
        IpvsMessage::new(IpvsCommand::GetDest, vec![IpvsAttribute::Service(web.to_attributes())]),
        dump,
    );
    for (i, message) in dests.iter().enumerate() {
        print_vector(&format!("REPLY_DEST_DUMP_{i}"), message);
    }
    let info = capture.ipvs(None, IpvsMessage::new(IpvsCommand::GetInfo, vec![]), ack);
    print_vector("REPLY_INFO", &info[0]);
    let config = capture.ipvs(None, IpvsMessage::new(IpvsCommand::GetConfig, vec![]), ack);
    print_vector("REPLY_CONFIG", &config[0]);
    let exists = capture.ipvs(
        None,
        service_message(IpvsCommand::NewService, &VirtualService::new(web, "rr")),
        ack,
    );
    print_vector("REPLY_ERROR_EEXIST", &exists[0]);
}
