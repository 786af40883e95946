//! Stale UDP conntrack entries, deleted over ctnetlink (no `conntrack` binary).
//!
//! UDP has no end of connection. When a UDP endpoint of a Service goes away, conntrack keeps
//! the flows that were sent to it, and a client that keeps sending from the same port keeps
//! being sent to the endpoint that is gone (kubernetes#71514, CoreDNS rollouts). kube-ipvs
//! deletes the destination at once and, with [`delete_stale_udp`], the conntrack flows whose
//! original destination is the Service address and port and whose replies came from that
//! endpoint.
//!
//! The kernel is asked for exactly those flows, as conntrack-tools asks (a dump with a
//! `CTA_FILTER` on the original destination, protocol and port and on the reply's source,
//! kernels ≥ 5.9; older ones ignore the filter and the flows are matched here too), and they
//! are deleted over the same socket. A dump the kernel flags as interrupted
//! (`NLM_F_DUMP_INTR`) is read again, never taken as the truth.
//!
//! The calls block on a netlink socket of the current network namespace; async callers run them
//! with `tokio::task::spawn_blocking`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    DefaultNla, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_NETFILTER};
use tracing::debug;

const ENOENT: i32 = 2;
/// How many times a dump is read before an interrupted one is given up on.
const DUMP_TRIES: usize = 5;
/// `CTA_FILTER` (kernels ≥ 5.9): which fields of `CTA_TUPLE_ORIG` and `CTA_TUPLE_REPLY` a dump
/// must match.
const CTA_FILTER: u16 = 25;
/// `CTA_FILTER_ORIG_FLAGS` and `CTA_FILTER_REPLY_FLAGS`, inside `CTA_FILTER`.
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
/// The fields, as `CTA_FILTER_F_*` in the kernel's `nf_internals.h`.
const FILTER_IP_SRC: u32 = 1 << 0;
const FILTER_IP_DST: u32 = 1 << 1;
const FILTER_PROTO_NUM: u32 = 1 << 3;
const FILTER_PROTO_SRC_PORT: u32 = 1 << 4;
const FILTER_PROTO_DST_PORT: u32 = 1 << 5;

/// A failed conntrack request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket failed.
    #[error("conntrack: {operation}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the request.
    #[error("conntrack: {operation}: the kernel answered {source}")]
    Kernel {
        /// What was being done.
        operation: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Every try of a dump was interrupted by concurrent changes; what was read is not used.
    #[error("conntrack: {operation}: interrupted {DUMP_TRIES} times by concurrent changes")]
    DumpInterrupted {
        /// What was being done.
        operation: &'static str,
    },
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One direction of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowTuple {
    /// Source address and port.
    pub source: SocketAddr,
    /// Destination address and port.
    pub destination: SocketAddr,
}

/// A UDP flow as conntrack tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    /// As the client sent it (to the Service address).
    pub original: FlowTuple,
    /// As replies come (from the endpoint, after IPVS).
    pub reply: FlowTuple,
}

fn tuple_from(tuples: &[Tuple]) -> Option<FlowTuple> {
    let (mut source, mut destination, mut sport, mut dport) = (None, None, None, None);
    for tuple in tuples {
        match tuple {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => source = Some(*a),
                        IPTuple::DestinationAddress(a) => destination = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for proto in protos {
                    match proto {
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(FlowTuple {
        source: SocketAddr::new(source?, sport?),
        destination: SocketAddr::new(destination?, dport?),
    })
}

/// The flow a dump answer describes, if it is a UDP one.
fn udp_flow(message: ConntrackMessage) -> Option<Flow> {
    let ConntrackMessage::New(attributes) = message else { return None };
    let mut original = None;
    let mut reply = None;
    let mut udp = false;
    for attribute in &attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(tuples) => {
                udp = tuples.iter().any(|t| {
                    matches!(t, Tuple::Proto(p) if p.contains(&ProtoTuple::Protocol(Protocol::Udp)))
                });
                original = tuple_from(tuples);
            }
            ConntrackAttribute::CtaTupleReply(tuples) => reply = tuple_from(tuples),
            _ => {}
        }
    }
    udp.then_some(Flow { original: original?, reply: reply? })
}

fn family_of(address: IpAddr) -> NetfilterProtoFamily {
    if address.is_ipv4() { NetfilterProtoFamily::IPv4 } else { NetfilterProtoFamily::IPv6 }
}

fn tuple_attributes(tuple: &FlowTuple) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(tuple.source.ip()),
            IPTuple::DestinationAddress(tuple.destination.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Udp),
            ProtoTuple::SourcePort(tuple.source.port()),
            ProtoTuple::DestinationPort(tuple.destination.port()),
        ]),
    ]
}

/// A dump request for the UDP flows sent to `service` and answered by `endpoint`: the kernel
/// compares the original destination, protocol and port, and the reply's source address and
/// port, and sends only the flows that match.
fn stale_flows_request(service: SocketAddr, endpoint: SocketAddr) -> ConntrackMessage {
    let u32_attribute = |kind: u16, value: u32| {
        let mut bytes = Vec::with_capacity(8);
        bytes.extend(8u16.to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(value.to_ne_bytes());
        bytes
    };
    let mut filter = u32_attribute(
        CTA_FILTER_ORIG_FLAGS,
        FILTER_IP_DST | FILTER_PROTO_NUM | FILTER_PROTO_DST_PORT,
    );
    filter.extend(u32_attribute(
        CTA_FILTER_REPLY_FLAGS,
        FILTER_IP_SRC | FILTER_PROTO_NUM | FILTER_PROTO_SRC_PORT,
    ));
    ConntrackMessage::Get(vec![
        ConntrackAttribute::CtaTupleOrig(vec![
            Tuple::Ip(vec![IPTuple::DestinationAddress(service.ip())]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::DestinationPort(service.port()),
            ]),
        ]),
        ConntrackAttribute::CtaTupleReply(vec![
            Tuple::Ip(vec![IPTuple::SourceAddress(endpoint.ip())]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(endpoint.port()),
            ]),
        ]),
        // Nested: see `mark_filter_nested`.
        ConntrackAttribute::Other(DefaultNla::new(CTA_FILTER, filter)),
    ])
}

/// Sets `NLA_F_NESTED` on a serialized request's `CTA_FILTER`: the kernel parses it as a
/// nested attribute and refuses it without the flag, and netlink-packet-netfilter emits its
/// `Other` attributes without it, whatever their kind says.
fn mark_filter_nested(request: &mut [u8]) {
    // The netlink header (16 bytes) and the netfilter header (4) come before the attributes.
    let mut offset = 20;
    while offset + 4 <= request.len() {
        let length = usize::from(u16::from_ne_bytes([request[offset], request[offset + 1]]));
        let kind = u16::from_ne_bytes([request[offset + 2], request[offset + 3]]);
        if kind & !NLA_F_NESTED == CTA_FILTER {
            request[offset + 2..offset + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        }
        if length < 4 {
            return;
        }
        offset += (length + 3) & !3;
    }
}

/// What the requests are sent over: the netlink socket, or a scripted kernel in tests.
trait Transport {
    /// Sends one datagram.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Receives one datagram, whatever its size.
    fn recv(&mut self) -> io::Result<Vec<u8>>;
}

impl Transport for Socket {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        Socket::send(self, bytes, 0).map(drop)
    }

    fn recv(&mut self) -> io::Result<Vec<u8>> {
        self.recv_from_full().map(|(datagram, _)| datagram)
    }
}

/// A ctnetlink socket.
struct Conntrack<T = Socket> {
    socket: T,
    sequence: u32,
}

impl Conntrack {
    fn open() -> Result<Self> {
        let io = |source| Error::Io { operation: "open a netlink socket", source };
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&NetlinkAddr::new(0, 0)).map_err(io)?;
        Ok(Self { socket, sequence: 0 })
    }
}

impl<T: Transport> Conntrack<T> {
    /// Sends one request and returns its reply messages, up to the ACK or the end of the dump,
    /// and whether the kernel flagged the dump as interrupted.
    fn exchange(
        &mut self,
        operation: &'static str,
        family: NetfilterProtoFamily,
        message: ConntrackMessage,
        flags: u16,
    ) -> Result<(Vec<ConntrackMessage>, bool)> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let payload = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), message);
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        mark_filter_nested(&mut bytes);
        let io = |source| Error::Io { operation, source };
        self.socket.send(&bytes).map_err(io)?;
        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            let datagram = self.socket.recv().map_err(io)?;
            let mut offset = 0;
            while offset < datagram.len() {
                let frame = NetlinkBuffer::new_checked(&datagram[offset..])
                    .map_err(|e| io(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
                let len = frame.length() as usize;
                let seq = frame.sequence_number();
                let bytes = &datagram[offset..offset + len];
                offset += (len + 3) & !3;
                if seq != self.sequence {
                    continue;
                }
                interrupted |= frame.flags() & NLM_F_DUMP_INTR != 0;
                let message = match NetlinkMessage::<NetfilterMessage>::deserialize(bytes) {
                    Ok(message) => message,
                    // A flow this crate cannot read is no flow of ours.
                    Err(err) => {
                        debug!(%err, "skipping an unreadable conntrack message");
                        continue;
                    }
                };
                match message.payload {
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ct),
                        ..
                    }) => replies.push(ct),
                    NetlinkPayload::Error(err) => match err.code {
                        None => return Ok((replies, interrupted)),
                        Some(code) => {
                            return Err(Error::Kernel {
                                operation,
                                source: io::Error::from_raw_os_error(-code.get()),
                            });
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok((replies, interrupted)),
                    _ => {}
                }
            }
        }
    }

    /// The UDP flows a dump request answers with, read again while the kernel flags the dump
    /// as interrupted.
    fn udp_flows(
        &mut self,
        operation: &'static str,
        family: NetfilterProtoFamily,
        request: &ConntrackMessage,
    ) -> Result<Vec<Flow>> {
        for _ in 0..DUMP_TRIES {
            let (messages, interrupted) =
                self.exchange(operation, family, request.clone(), NLM_F_REQUEST | NLM_F_DUMP)?;
            if !interrupted {
                return Ok(messages.into_iter().filter_map(udp_flow).collect());
            }
            debug!(operation, "the conntrack dump was interrupted; reading it again");
        }
        Err(Error::DumpInterrupted { operation })
    }

    /// Deletes one flow; `Ok(false)` if it was gone already.
    fn delete(&mut self, flow: &Flow) -> Result<bool> {
        let request = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(
            tuple_attributes(&flow.original),
        )]);
        match self.exchange(
            "delete a flow",
            family_of(flow.original.source.ip()),
            request,
            NLM_F_REQUEST | NLM_F_ACK,
        ) {
            Ok(_) => Ok(true),
            Err(Error::Kernel { source, .. }) if source.raw_os_error() == Some(ENOENT) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// The UDP flows the kernel answers a filtered dump for `service` and `endpoint` with.
    fn flows_to(&mut self, service: SocketAddr, endpoint: SocketAddr) -> Result<Vec<Flow>> {
        let request = stale_flows_request(service, endpoint);
        self.udp_flows("list the flows of a removed endpoint", family_of(service.ip()), &request)
    }

    /// Deletes the UDP flows of each `(service, removed endpoint)` pair; returns how many.
    fn delete_stale_udp(&mut self, stale: &[(SocketAddr, SocketAddr)]) -> Result<usize> {
        let mut deleted = 0;
        for (service, endpoint) in stale {
            let flows = self.flows_to(*service, *endpoint)?;
            // A kernel without dump filters (before 5.9) answers with every flow.
            for flow in flows.iter().filter(|flow| is_stale(flow, *service, *endpoint)) {
                if self.delete(flow)? {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

/// Every UDP flow of the family of `address` that conntrack tracks.
pub fn udp_flows(address: IpAddr) -> Result<Vec<Flow>> {
    let request = ConntrackMessage::Get(vec![]);
    Conntrack::open()?.udp_flows("list flows", family_of(address), &request)
}

/// The UDP flows sent to `service` and answered by `endpoint`, as the kernel's filtered dump
/// answers (a kernel before 5.9 ignores the filter and answers with every flow).
pub fn udp_flows_to(service: SocketAddr, endpoint: SocketAddr) -> Result<Vec<Flow>> {
    Conntrack::open()?.flows_to(service, endpoint)
}

/// Deletes one flow; `Ok(false)` if it was gone already.
pub fn delete(flow: &Flow) -> Result<bool> {
    Conntrack::open()?.delete(flow)
}

/// Which flows are stale: sent to `service` (a Service address and port) and answered by
/// `endpoint`, which is gone.
pub fn is_stale(flow: &Flow, service: SocketAddr, endpoint: SocketAddr) -> bool {
    flow.original.destination == service && flow.reply.source == endpoint
}

/// Deletes the UDP flows of each `(service address, removed endpoint)` pair, over one socket:
/// the kernel is asked for each pair's flows only; returns how many were deleted.
pub fn delete_stale_udp(stale: &[(SocketAddr, SocketAddr)]) -> Result<usize> {
    if stale.is_empty() {
        return Ok(0);
    }
    let deleted = Conntrack::open()?.delete_stale_udp(stale)?;
    debug!(deleted, "deleted stale UDP conntrack flows");
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use netlink_packet_core::{NLM_F_MULTIPART, NLMSG_DONE, NLMSG_ERROR};

    use super::*;

    /// A kernel that answers each dump with the next of its scripted answers (the flows, and
    /// whether the dump was interrupted), acknowledges every other request, and keeps them.
    #[derive(Default)]
    struct Scripted {
        dumps: VecDeque<(Vec<Flow>, bool)>,
        requests: Vec<NetlinkMessage<NetfilterMessage>>,
        sent: Vec<Vec<u8>>,
        queued: VecDeque<Vec<u8>>,
    }

    fn header(length: u32, kind: u16, flags: u16, sequence: u32) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(16);
        bytes.extend(length.to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(flags.to_ne_bytes());
        bytes.extend(sequence.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        bytes
    }

    impl Transport for Scripted {
        fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
            let request = NetlinkMessage::<NetfilterMessage>::deserialize(bytes).unwrap();
            let sequence = request.header.sequence_number;
            let mut answer = Vec::new();
            if request.header.flags & NLM_F_DUMP == NLM_F_DUMP {
                let (flows, interrupted) = self.dumps.pop_front().expect("a scripted dump");
                let flags = NLM_F_MULTIPART | if interrupted { NLM_F_DUMP_INTR } else { 0 };
                for flow in flows {
                    let mut header = NetlinkHeader::default();
                    header.flags = flags;
                    header.sequence_number = sequence;
                    let ct = ConntrackMessage::New(vec![
                        ConntrackAttribute::CtaTupleOrig(tuple_attributes(&flow.original)),
                        ConntrackAttribute::CtaTupleReply(tuple_attributes(&flow.reply)),
                    ]);
                    let payload = NetfilterMessage::new(
                        NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                        ct,
                    );
                    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
                    message.finalize();
                    let at = answer.len();
                    answer.resize(at + message.buffer_len(), 0);
                    message.serialize(&mut answer[at..]);
                }
                answer.extend(header(20, NLMSG_DONE, flags, sequence));
                answer.extend(0i32.to_ne_bytes());
            } else {
                // An acknowledgement: error 0 and the request's header.
                answer.extend(header(36, NLMSG_ERROR, 0, sequence));
                answer.extend(0i32.to_ne_bytes());
                answer.extend(&bytes[..16]);
            }
            self.requests.push(request);
            self.sent.push(bytes.to_vec());
            self.queued.push_back(answer);
            Ok(())
        }

        fn recv(&mut self) -> io::Result<Vec<u8>> {
            self.queued.pop_front().ok_or_else(|| io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn stale_flows_are_asked_for_filtered_read_again_when_interrupted_and_deleted_on_one_socket() {
        let service: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let gone: SocketAddr = "10.244.0.2:5353".parse().unwrap();
        let stale = flow("10.244.0.9:4000", "10.96.0.10:53", "10.244.0.2:5353");
        // A kernel without dump filters answers with other flows too; they are left alone.
        let other = flow("10.244.0.9:4001", "10.96.0.10:53", "10.244.0.3:5353");
        let dumps = [(vec![stale], true), (vec![stale, other], false)].into();
        let mut conntrack =
            Conntrack { socket: Scripted { dumps, ..Default::default() }, sequence: 0 };
        assert_eq!(conntrack.delete_stale_udp(&[(service, gone)]).unwrap(), 1);

        let requests = &conntrack.socket.requests;
        assert_eq!(requests.len(), 3, "two dumps (the first interrupted) and one deletion");
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Get(attributes)),
            ..
        }) = &requests[1].payload
        else {
            panic!("{:?}", requests[1]);
        };
        // The tuples to match, and the filter that says which of their fields: a nested
        // attribute (the kernel refuses it without NLA_F_NESTED), as sent.
        assert_eq!(attributes.len(), 3, "{attributes:?}");
        assert!(matches!(&attributes[0], ConntrackAttribute::CtaTupleOrig(t)
            if t.contains(&Tuple::Ip(vec![IPTuple::DestinationAddress(service.ip())]))));
        assert!(matches!(&attributes[1], ConntrackAttribute::CtaTupleReply(t)
            if t.contains(&Tuple::Ip(vec![IPTuple::SourceAddress(gone.ip())]))));
        let mut filter = 20u16.to_ne_bytes().to_vec();
        filter.extend((CTA_FILTER | NLA_F_NESTED).to_ne_bytes());
        filter.extend([8, 0, 1, 0]);
        filter.extend((FILTER_IP_DST | FILTER_PROTO_NUM | FILTER_PROTO_DST_PORT).to_ne_bytes());
        filter.extend([8, 0, 2, 0]);
        filter.extend((FILTER_IP_SRC | FILTER_PROTO_NUM | FILTER_PROTO_SRC_PORT).to_ne_bytes());
        let sent = &conntrack.socket.sent[1];
        assert!(sent.windows(filter.len()).any(|w| w == filter), "{sent:?}");
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(deleted)),
            ..
        }) = &requests[2].payload
        else {
            panic!("{:?}", requests[2]);
        };
        assert_eq!(deleted, &[ConntrackAttribute::CtaTupleOrig(tuple_attributes(&stale.original))]);
    }

    #[test]
    fn a_dump_interrupted_every_time_is_an_error() {
        let stale = flow("10.244.0.9:4000", "10.96.0.10:53", "10.244.0.2:5353");
        let dumps = std::iter::repeat_n((vec![stale], true), DUMP_TRIES).collect();
        let mut conntrack =
            Conntrack { socket: Scripted { dumps, ..Default::default() }, sequence: 0 };
        let pair = (stale.original.destination, stale.reply.source);
        let err = conntrack.delete_stale_udp(&[pair]).unwrap_err();
        assert!(matches!(err, Error::DumpInterrupted { .. }), "{err}");
        assert_eq!(conntrack.socket.requests.len(), DUMP_TRIES, "nothing deleted");
    }

    fn flow(client: &str, service: &str, endpoint: &str) -> Flow {
        let client: SocketAddr = client.parse().unwrap();
        let endpoint: SocketAddr = endpoint.parse().unwrap();
        Flow {
            original: FlowTuple { source: client, destination: service.parse().unwrap() },
            reply: FlowTuple { source: endpoint, destination: client },
        }
    }

    #[test]
    fn a_flow_is_stale_when_sent_to_the_service_and_answered_by_the_gone_endpoint() {
        let service: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let gone: SocketAddr = "10.244.0.2:5353".parse().unwrap();
        assert!(is_stale(
            &flow("10.244.0.9:4000", "10.96.0.10:53", "10.244.0.2:5353"),
            service,
            gone
        ));
        assert!(!is_stale(
            &flow("10.244.0.9:4000", "10.96.0.10:53", "10.244.0.3:5353"),
            service,
            gone
        ));
        assert!(!is_stale(
            &flow("10.244.0.9:4000", "10.96.0.11:53", "10.244.0.2:5353"),
            service,
            gone
        ));
    }

    #[test]
    fn tuples_read_back_as_written() {
        let original = FlowTuple {
            source: "10.244.0.9:4000".parse().unwrap(),
            destination: "10.96.0.10:53".parse().unwrap(),
        };
        assert_eq!(tuple_from(&tuple_attributes(&original)), Some(original));
    }
}
