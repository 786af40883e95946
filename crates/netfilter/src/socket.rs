//! The nf_tables netlink socket: sends element changes as one batch (one transaction), and
//! lists how many elements a set holds. Calls are short and run in the kernel as they are
//! sent, so they are made directly on a blocking socket.

use std::io;

use netlink_packet_core::{
    ErrorBuffer, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
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
}

/// A netfilter netlink socket.
#[derive(Debug)]
pub(crate) struct NfSocket {
    socket: Socket,
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
        let length = bytes.len();
        self.reserve(length)?;
        self.socket.send(&bytes, 0).map_err(SocketError::Io)?;
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
        let frame = self.frame(
            NetfilterMessageInner::NfTables(crate::message::list_elements(set)),
            NetfilterProtoFamily::Inet,
            0,
            // No ACK asked: a dump ends with NLMSG_DONE, and an error is answered anyway.
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        let mut bytes = vec![0; frame.buffer_len()];
        frame.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(SocketError::Io)?;
        let sequence = self.sequence;
        let mut count = 0;
        let mut missing = false;
        let mut failure = None;
        self.receive(0, |frame| {
            if frame.sequence != sequence {
                return Ok(true);
            }
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
                    count += crate::message::element_count(frame.payload)?;
                    Ok(true)
                }
                None => Ok(true),
            }
        })?;
        match failure {
            Some(err) => Err(SocketError::Kernel(err)),
            None if missing => Ok(None),
            None => Ok(Some(count)),
        }
    }

    /// Makes the send buffer large enough for one batch of `length` bytes (a batch must be
    /// sent in one piece to be one transaction).
    fn reserve(&self, length: usize) -> Result<(), SocketError> {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        let wanted = length + 4096;
        let current = getsockopt(&self.socket, sockopt::SndBuf).unwrap_or(0);
        if current >= wanted {
            return Ok(());
        }
        setsockopt(&self.socket, sockopt::SndBufForce, &wanted)
            .or_else(|_| setsockopt(&self.socket, sockopt::SndBuf, &wanted))
            .map_err(|errno| SocketError::Io(errno.into()))
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
            let length = match self.socket.recv(&mut &mut buffer[..], flags) {
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
    sequence: u32,
    error: Option<i32>,
    payload: &'a [u8],
}

fn nix_dontwait() -> i32 {
    nix::sys::socket::MsgFlags::MSG_DONTWAIT.bits()
}
