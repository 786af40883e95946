//! Stale UDP conntrack entries, deleted over ctnetlink (no `conntrack` binary).
//!
//! UDP has no end of connection. When a UDP endpoint of a Service goes away, conntrack keeps
//! the flows that were sent to it, and a client that keeps sending from the same port keeps
//! being sent to the endpoint that is gone (kubernetes#71514, CoreDNS rollouts). kube-ipvs
//! deletes the destination at once and, with [`delete_stale_udp`], the conntrack flows whose
//! original destination is the Service address and whose replies came from that endpoint.
//!
//! The calls block on a netlink socket of the current network namespace; async callers run them
//! with `tokio::task::spawn_blocking`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_NETFILTER};
use tracing::debug;

const ENOENT: i32 = 2;

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

/// A ctnetlink socket.
struct Conntrack {
    socket: Socket,
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

    /// Sends one request and returns its reply messages, up to the ACK or the end of the dump.
    fn exchange(
        &mut self,
        operation: &'static str,
        family: NetfilterProtoFamily,
        message: ConntrackMessage,
        flags: u16,
    ) -> Result<Vec<ConntrackMessage>> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let payload = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), message);
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        let io = |source| Error::Io { operation, source };
        self.socket.send(&bytes, 0).map_err(io)?;
        let mut replies = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(io)?;
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
                        None => return Ok(replies),
                        Some(code) => {
                            return Err(Error::Kernel {
                                operation,
                                source: io::Error::from_raw_os_error(-code.get()),
                            });
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok(replies),
                    _ => {}
                }
            }
        }
    }
}

/// Every UDP flow of the family of `address` that conntrack tracks.
pub fn udp_flows(address: IpAddr) -> Result<Vec<Flow>> {
    let mut conntrack = Conntrack::open()?;
    let messages = conntrack.exchange(
        "list flows",
        family_of(address),
        ConntrackMessage::Get(vec![]),
        NLM_F_REQUEST | NLM_F_DUMP,
    )?;
    Ok(messages
        .into_iter()
        .filter_map(|message| {
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
        })
        .collect())
}

/// Deletes one flow; `Ok(false)` if it was gone already.
pub fn delete(flow: &Flow) -> Result<bool> {
    let mut conntrack = Conntrack::open()?;
    let request = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(
        tuple_attributes(&flow.original),
    )]);
    match conntrack.exchange(
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

/// Which flows are stale: sent to `service` (a Service address and port) and answered by
/// `endpoint`, which is gone.
pub fn is_stale(flow: &Flow, service: SocketAddr, endpoint: SocketAddr) -> bool {
    flow.original.destination == service && flow.reply.source == endpoint
}

/// Deletes the UDP flows of each `(service address, removed endpoint)` pair; returns how many.
pub fn delete_stale_udp(stale: &[(SocketAddr, SocketAddr)]) -> Result<usize> {
    // One dump per address family involved.
    let families: std::collections::BTreeMap<bool, IpAddr> =
        stale.iter().map(|(service, _)| (service.is_ipv4(), service.ip())).collect();
    let mut deleted = 0;
    for family in families.into_values() {
        for flow in udp_flows(family)? {
            if stale.iter().any(|(service, endpoint)| is_stale(&flow, *service, *endpoint))
                && delete(&flow)?
            {
                deleted += 1;
            }
        }
    }
    debug!(deleted, "deleted stale UDP conntrack flows");
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

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
