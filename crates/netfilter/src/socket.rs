//! The nf_tables netlink socket: sends element changes as one batch (one transaction), and
//! reads a set's elements (or only counts them). Calls are short and run in the kernel as they
//! are sent, so they are made directly on a blocking socket. A dump the kernel flags as
//! interrupted (`NLM_F_DUMP_INTR`: the table changed while it was read) is read again, and
//! never taken as the truth.

use std::io;

use netlink_packet_core::{
    ErrorBuffer, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    nftables::NfTablesMessage, none::ControlMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `NFNL_SUBSYS_NFTABLES`: a batch's `res_id` names the subsystem it is for.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const ENOENT: i32 = 2;
/// `NFT_MSG_NEWSETELEM` of the nf_tables subsystem: what a dump of elements answers with.
const NEWSETELEM: u16 = (NFNL_SUBSYS_NFTABLES << 8) | 12;
/// How many times a dump is read before an interrupted one is given up on.
const DUMP_TRIES: usize = 5;

/// What went wrong on the socket or in the kernel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketError {
    /// The socket failed.
    #[error("netlink socket: {0}")]
    Io(#[source] io::Error),
    /// The kernel refused a request.
    #[error("the kernel answered {0}")]
    Kernel(#[source] io::Error),
    /// The kernel answered something this code cannot read.
    #[error("unreadable netlink answer: {0}")]
    Decode(String),
    /// Every try of a dump was interrupted by concurrent changes; what was read is not used.
    #[error("the dump of set {0} was interrupted {DUMP_TRIES} times by concurrent changes")]
    DumpInterrupted(String),
}

/// What the socket is sent over: the netlink socket, or a scripted kernel in tests.
pub(crate) trait Transport {
    /// Sends one datagram.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Receives one datagram into `buffer`; with `MSG_DONTWAIT` in `flags`, fails with
    /// `WouldBlock` when none is queued.
    fn recv(&mut self, buffer: &mut Vec<u8>, flags: i32) -> io::Result<usize>;
    /// Makes the send buffer at least `length` bytes.
    fn reserve(&mut self, length: usize) -> io::Result<()>;
}

impl Transport for Socket {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        Socket::send(self, bytes, 0).map(drop)
    }

    fn recv(&mut self, buffer: &mut Vec<u8>, flags: i32) -> io::Result<usize> {
        Socket::recv(self, &mut &mut buffer[..], flags)
    }

    fn reserve(&mut self, length: usize) -> io::Result<()> {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        let current = getsockopt(&*self, sockopt::SndBuf).unwrap_or(0);
        if current >= length {
            return Ok(());
        }
        setsockopt(&*self, sockopt::SndBufForce, &length)
            .or_else(|_| setsockopt(&*self, sockopt::SndBuf, &length))
            .map_err(io::Error::from)
    }
}

/// A netfilter netlink socket.
#[derive(Debug)]
pub(crate) struct NfSocket<T = Socket> {
    socket: T,
    sequence: u32,
}

impl NfSocket {
    /// Opens a socket in the current network namespace.
    pub(crate) fn open() -> Result<Self, SocketError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(SocketError::Io)?;
        socket.bind_auto().map_err(SocketError::Io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(SocketError::Io)?;
        // Errors carry the failed request's header only, not the whole batch message.
        socket.set_cap_ack(true).map_err(SocketError::Io)?;
        Ok(Self { socket, sequence: 0 })
    }
}

impl<T: Transport> NfSocket<T> {
    fn frame(
        &mut self,
        inner: NetfilterMessageInner,
        family: NetfilterProtoFamily,
        res_id: u16,
        flags: u16,
    ) -> NetlinkMessage<NetfilterMessage> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let payload = NetfilterMessage::new(NetfilterHeader::new(family, 0, res_id), inner);
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        message.finalize();
        message
    }

    /// The message that opens or closes a batch.
    fn batch_marker(&mut self, marker: ControlMessage) -> NetlinkMessage<NetfilterMessage> {
        let inner = NetfilterMessageInner::None(marker);
        self.frame(inner, NetfilterProtoFamily::Unspec, NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST)
    }

    /// Sends `messages` as one batch: the kernel applies all of them or none. Each message is
    /// serialized as it comes, so only the batch's bytes are ever held whole.
    pub(crate) fn transaction(
        &mut self,
        messages: impl IntoIterator<Item = NfTablesMessage>,
    ) -> Result<(), SocketError> {
        fn append(bytes: &mut Vec<u8>, frame: NetlinkMessage<NetfilterMessage>) {
            let at = bytes.len();
            bytes.resize(at + frame.buffer_len(), 0);
            frame.serialize(&mut bytes[at..]);
        }
        let mut bytes = Vec::new();
        let begin = self.batch_marker(ControlMessage::BatchBegin);
        append(&mut bytes, begin);
        let first = self.sequence.wrapping_add(1);
        for message in messages {
            let create =
                if matches!(message, NfTablesMessage::NewSetElement(_)) { NLM_F_CREATE } else { 0 };
            let frame = self.frame(
                NetfilterMessageInner::NfTables(message),
                NetfilterProtoFamily::Inet,
                0,
                NLM_F_REQUEST | NLM_F_ACK | create,
            );
            append(&mut bytes, frame);
        }
        let last = self.sequence;
        let end = self.batch_marker(ControlMessage::BatchEnd);
        append(&mut bytes, end);
        // A batch must be sent in one piece to be one transaction.
        self.socket.reserve(bytes.len() + 4096).map_err(SocketError::Io)?;
        self.socket.send(&bytes).map_err(SocketError::Io)?;
        // The kernel handled the whole batch during the send: each message's answer is queued.
        let expected = last.wrapping_sub(first).wrapping_add(1) as usize;
        let mut answered = 0;
        let mut failure = None;
        self.receive(nix_dontwait(), |frame| {
            if frame.sequence.wrapping_sub(first) > last.wrapping_sub(first) {
                // Left over from an earlier request on this socket.
                return Ok(true);
            }
            if let Frame { error: Some(code), .. } = frame {
                answered += 1;
                if code != 0 {
                    failure.get_or_insert(io::Error::from_raw_os_error(-code));
                }
            }
            Ok(answered < expected)
        })?;
        match failure {
            Some(err) => Err(SocketError::Kernel(err)),
            None if answered < expected => Err(SocketError::Decode(format!(
                "the kernel answered {answered} of {expected} messages"
            ))),
            None => Ok(()),
        }
    }

    /// How many elements the set or map `set` holds; `None` if it (or the table) does not
    /// exist.
    pub(crate) fn count(&mut self, set: &str) -> Result<Option<usize>, SocketError> {
        self.dump(set, |count: &mut usize, payload| {
            *count += crate::message::element_count(payload)?;
            Ok(())
        })
    }

    /// The keys of the elements of the set or map `set`, as the kernel stores them; `None`
    /// if it (or the table) does not exist.
    pub(crate) fn keys(&mut self, set: &str) -> Result<Option<Vec<Vec<u8>>>, SocketError> {
        self.dump(set, |keys: &mut Vec<Vec<u8>>, payload| {
            keys.extend(crate::message::element_keys(payload)?);
            Ok(())
        })
    }

    /// Dumps the elements of `set`, folding each answer's payload into an `A`; `None` if the
    /// set (or the table) does not exist. An interrupted dump starts again from a fresh `A`.
    fn dump<A: Default>(
        &mut self,
        set: &str,
        mut fold: impl FnMut(&mut A, &[u8]) -> Result<(), SocketError>,
    ) -> Result<Option<A>, SocketError> {
        for _ in 0..DUMP_TRIES {
            let frame = self.frame(
                NetfilterMessageInner::NfTables(crate::message::list_elements(set)),
                NetfilterProtoFamily::Inet,
                0,
                // No ACK asked: a dump ends with NLMSG_DONE, and an error is answered anyway.
                NLM_F_REQUEST | NLM_F_DUMP,
            );
            let mut bytes = vec![0; frame.buffer_len()];
            frame.serialize(&mut bytes);
            self.socket.send(&bytes).map_err(SocketError::Io)?;
            let sequence = self.sequence;
            let mut folded = A::default();
            let mut missing = false;
            let mut interrupted = false;
            let mut failure = None;
            self.receive(0, |frame| {
                if frame.sequence != sequence {
                    return Ok(true);
                }
                interrupted |= frame.flags & NLM_F_DUMP_INTR != 0;
                match frame.error {
                    Some(0) => Ok(false),
                    Some(code) if -code == ENOENT => {
                        missing = true;
                        Ok(false)
                    }
                    Some(code) => {
                        failure = Some(io::Error::from_raw_os_error(-code));
                        Ok(false)
                    }
                    None if frame.message_type == NLMSG_DONE => Ok(false),
                    None if frame.message_type == NEWSETELEM => {
                        // The rest of an interrupted dump is read (and dropped) all the same,
                        // so the socket is left clean for the next try.
                        if !interrupted {
                            fold(&mut folded, frame.payload)?;
                        }
                        Ok(true)
                    }
                    None => Ok(true),
                }
            })?;
            match failure {
                Some(err) => return Err(SocketError::Kernel(err)),
                None if missing => return Ok(None),
                None if interrupted => continue,
                None => return Ok(Some(folded)),
            }
        }
        Err(SocketError::DumpInterrupted(set.to_owned()))
    }

    /// Reads answers, handing each message to `each`, while `each` returns true. With
    /// `MSG_DONTWAIT`, stops too when nothing more is queued.
    fn receive(
        &mut self,
        flags: i32,
        mut each: impl FnMut(Frame<'_>) -> Result<bool, SocketError>,
    ) -> Result<(), SocketError> {
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let length = match self.socket.recv(&mut buffer, flags) {
                Ok(length) => length,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) => return Err(SocketError::Io(err)),
            };
            let mut offset = 0;
            while offset < length {
                let frame = NetlinkBuffer::new_checked(&buffer[offset..length])
                    .map_err(|e| SocketError::Decode(e.to_string()))?;
                let size = frame.length() as usize;
                let message_type = frame.message_type();
                let error = if message_type == NLMSG_ERROR {
                    let answer = ErrorBuffer::new_checked(frame.payload())
                        .map_err(|e| SocketError::Decode(e.to_string()))?;
                    Some(answer.code().map_or(0, |code| code.get()))
                } else {
                    None
                };
                let frame = Frame {
                    message_type,
                    flags: frame.flags(),
                    sequence: frame.sequence_number(),
                    error,
                    payload: frame.payload(),
                };
                offset += (size + 3) & !3;
                if !each(frame)? {
                    return Ok(());
                }
            }
        }
    }
}

/// One message as received: its type and sequence number, its error code if it is an
/// answer (`Some(0)`: an acknowledgement), and its payload.
struct Frame<'a> {
    message_type: u16,
    flags: u16,
    sequence: u32,
    error: Option<i32>,
    payload: &'a [u8],
}

fn nix_dontwait() -> i32 {
    nix::sys::socket::MsgFlags::MSG_DONTWAIT.bits()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use netlink_packet_core::{NLM_F_MULTIPART, NLMSG_DONE};
    use netlink_packet_netfilter::nftables::{SetElementList, SetElementMessage};

    use super::*;
    use crate::{elements::Item, model::Protocol};

    /// A kernel that answers each dump with the next of its scripted answers: the keys, and
    /// whether the dump was interrupted.
    #[derive(Default)]
    struct Scripted {
        dumps: VecDeque<(Vec<Item>, bool)>,
        queued: VecDeque<Vec<u8>>,
    }

    fn answer(sequence: u32, items: &[Item], flags: u16) -> Vec<u8> {
        let elements = items
            .iter()
            .map(|item| {
                netlink_packet_netfilter::nftables::ListAttribute::Element(vec![
                    netlink_packet_netfilter::nftables::SetElementAttribute::Key(
                        netlink_packet_netfilter::nftables::DataAttribute::Value(
                            crate::message::key(item),
                        ),
                    ),
                ])
            })
            .collect();
        let message = NfTablesMessage::NewSetElement(SetElementMessage {
            attributes: vec![
                SetElementList::Table("kube-ipvs".into()),
                SetElementList::Set("cluster-ips-v4".into()),
                SetElementList::Elements(elements),
            ],
        });
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = sequence;
        let payload = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NetfilterMessageInner::NfTables(message),
        );
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        // NLMSG_DONE, carrying the interruption flag too, as the kernel's does.
        let mut done = vec![0u8; 20];
        done[..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        done[6..8].copy_from_slice(&flags.to_ne_bytes());
        done[8..12].copy_from_slice(&sequence.to_ne_bytes());
        bytes.extend(done);
        bytes
    }

    impl Transport for Scripted {
        fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
            let sequence = u32::from_ne_bytes(bytes[8..12].try_into().unwrap());
            let (items, interrupted) = self.dumps.pop_front().expect("a scripted dump");
            let flags = NLM_F_MULTIPART | if interrupted { NLM_F_DUMP_INTR } else { 0 };
            self.queued.push_back(answer(sequence, &items, flags));
            Ok(())
        }

        fn recv(&mut self, buffer: &mut Vec<u8>, _: i32) -> io::Result<usize> {
            let datagram = self.queued.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            buffer[..datagram.len()].copy_from_slice(&datagram);
            Ok(datagram.len())
        }

        fn reserve(&mut self, _: usize) -> io::Result<()> {
            Ok(())
        }
    }

    fn port(text: &str) -> Item {
        Item::ServicePort(crate::model::port(text, Protocol::Tcp, 80))
    }

    #[test]
    fn an_interrupted_dump_is_read_again_and_never_taken_as_the_truth() {
        let partial = vec![port("10.96.0.10")];
        let whole = vec![port("10.96.0.10"), port("10.96.0.11")];
        let dumps = [(partial.clone(), true), (whole.clone(), false)].into();
        let mut socket = NfSocket { socket: Scripted { dumps, ..Default::default() }, sequence: 0 };
        let keys = socket.keys("cluster-ips-v4").unwrap().unwrap();
        assert_eq!(keys, whole.iter().map(crate::message::key).collect::<Vec<_>>());
        let ports: Vec<String> = keys
            .iter()
            .filter_map(|k| crate::message::service_port_of_key(k))
            .map(|p| p.to_string())
            .collect();
        assert_eq!(ports, ["10.96.0.10:80/TCP", "10.96.0.11:80/TCP"]);

        let dumps = [(partial.clone(), true), (whole.clone(), false)].into();
        let mut socket = NfSocket { socket: Scripted { dumps, ..Default::default() }, sequence: 0 };
        assert_eq!(socket.count("cluster-ips-v4").unwrap(), Some(2), "counts too");

        let dumps = std::iter::repeat_n((partial, true), DUMP_TRIES).collect();
        let mut socket = NfSocket { socket: Scripted { dumps, ..Default::default() }, sequence: 0 };
        let err = socket.keys("cluster-ips-v4").unwrap_err();
        assert!(matches!(err, SocketError::DumpInterrupted(_)), "{err}");
    }
}
