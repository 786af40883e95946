//! The socket loop: one netlink socket, requests matched to replies by sequence number.
//!
//! The kernel handles every IPVS message synchronously inside `sendmsg`, in order, and queues
//! one reply (an ACK or an error) per message. A batch is therefore sent as chunks of up to
//! `window` messages in one `sendmsg` each; the window bounds what can queue up in the
//! socket's receive buffer, so no reply is lost to `ENOBUFS`.
//!
//! Dumps are read to their end (`NLMSG_DONE`) before anything else is sent: only one dump can
//! run on a socket at a time. A dump flagged `NLM_F_DUMP_INTR` is discarded and tried again.

use std::{collections::HashMap, future::Future, io};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_generic::{
    GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket, protocols::NETLINK_GENERIC};
use tracing::{debug, trace};

use crate::{
    error::Error,
    message::{IpvsMessage, constants::IPVS_GENL_NAME},
    request::{Change, Operation, Request, Target},
};

const ENOENT: i32 = 2;
const ENOBUFS: i32 = 105;
/// Largest datagram the kernel sends on a netlink socket (dump skbs are capped at 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;
/// Receive buffer asked of the kernel (it is capped by `net.core.rmem_max`).
const SOCKET_RCVBUF: usize = 4 * 1024 * 1024;
/// How many times an interrupted dump is tried before giving up.
const DUMP_ATTEMPTS: u32 = 5;
/// Default number of messages per `sendmsg` in a batch.
pub(crate) const DEFAULT_WINDOW: usize = 128;

/// A datagram transport to the kernel.
pub(crate) trait Transport: Send {
    /// Sends one buffer (one or more netlink messages) in one `sendmsg`.
    fn send(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Receives one datagram into `buf`, replacing its contents.
    fn recv(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;
}

/// A generic-netlink socket in the current network namespace.
pub(crate) struct NetlinkSocket {
    socket: TokioSocket,
    /// Each datagram is peeked for its size and read at that size, rather than into one
    /// `RECV_BUFFER`: the kernel sizes dump parts by the largest read it has seen, so they
    /// stay at one page instead of 32 KiB.
    small_parts: bool,
}

impl NetlinkSocket {
    /// Opens and binds the socket. Needs a tokio runtime.
    pub(crate) fn open(small_parts: bool) -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_GENERIC)?;
        let inner = socket.socket_mut();
        inner.bind_auto()?;
        inner.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        // Error replies need not echo the failed request; extended ACKs carry the kernel's
        // reason where it gives one.
        inner.set_cap_ack(true)?;
        inner.set_ext_ack(true)?;
        if let Err(err) = inner.set_rx_buf_sz(SOCKET_RCVBUF) {
            debug!(%err, "could not enlarge the netlink receive buffer");
        }
        Ok(Self { socket, small_parts })
    }
}

impl Transport for NetlinkSocket {
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let sent = self.socket.send(bytes).await?;
        if sent != bytes.len() {
            return Err(io::Error::other(format!("sent {sent} of {} bytes", bytes.len())));
        }
        Ok(())
    }

    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if self.small_parts {
            (*buf, _) = self.socket.recv_from_full().await?;
            return Ok(());
        }
        buf.clear();
        self.socket.recv(buf).await?;
        if buf.len() >= RECV_BUFFER {
            return Err(io::Error::other("netlink datagram larger than the receive buffer"));
        }
        Ok(())
    }
}

/// One reply to one request, as far as the socket loop cares.
#[derive(Debug)]
enum Reply<M> {
    /// A payload message, with its netlink flags.
    Message(M, u16),
    /// The request succeeded.
    Ack,
    /// The request failed with this (positive) errno.
    Failed(i32),
    /// End of a dump.
    Done,
    /// This message could not be decoded.
    Malformed(String),
}

impl<M> Reply<M> {
    fn is_final(&self) -> bool {
        matches!(self, Self::Ack | Self::Failed(_) | Self::Done)
    }
}

/// Splits a datagram into `(sequence number, reply)` pairs. Only a datagram whose netlink
/// framing is broken fails as a whole.
fn decode_datagram<M>(datagram: &[u8]) -> Result<Vec<(u32, Reply<M>)>, String>
where
    M: NetlinkDeserializable,
{
    let mut replies = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let frame = NetlinkBuffer::new_checked(&datagram[offset..])
            .map_err(|err| format!("bad netlink framing: {err}"))?;
        let len = frame.length() as usize;
        let seq = frame.sequence_number();
        let bytes = &datagram[offset..offset + len];
        offset += (len + 3) & !3;
        let reply = match NetlinkMessage::<M>::deserialize(bytes) {
            Ok(message) => {
                let flags = message.header.flags;
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => Reply::Message(inner, flags),
                    NetlinkPayload::Error(err) => match err.code {
                        None => Reply::Ack,
                        Some(code) => Reply::Failed(-code.get()),
                    },
                    NetlinkPayload::Done(done) if done.code < 0 => Reply::Failed(-done.code),
                    NetlinkPayload::Done(_) => Reply::Done,
                    NetlinkPayload::Overrun(_) => Reply::Failed(ENOBUFS),
                    _ => continue,
                }
            }
            Err(err) => Reply::Malformed(err.to_string()),
        };
        replies.push((seq, reply));
    }
    Ok(replies)
}

/// One socket, its sequence numbers and the resolved IPVS family id.
pub(crate) struct Connection<T> {
    transport: T,
    sequence: u32,
    family: Option<u16>,
    /// A dump that was abandoned mid-way (its future dropped) and must be drained first.
    unfinished_dump: Option<u32>,
    window: usize,
    buffer: Vec<u8>,
    /// Messages sent, by operation: lets callers count writes.
    pub(crate) sent: HashMap<Operation, u64>,
}

impl<T: Transport> Connection<T> {
    pub(crate) fn new(transport: T) -> Self {
        Self {
            transport,
            sequence: 0,
            family: None,
            unfinished_dump: None,
            window: DEFAULT_WINDOW,
            buffer: Vec::with_capacity(RECV_BUFFER),
            sent: HashMap::new(),
        }
    }

    pub(crate) fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1).max(1);
        self.sequence
    }

    /// Appends `payload` as a netlink message with a fresh sequence number to `out`.
    fn encode<P>(&mut self, payload: P, flags: u16, out: &mut Vec<u8>) -> u32
    where
        P: NetlinkSerializable + std::fmt::Debug,
        NetlinkPayload<P>: From<P>,
    {
        let seq = self.next_sequence();
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        message.finalize();
        let start = out.len();
        out.resize(start + message.buffer_len(), 0);
        message.serialize(&mut out[start..]);
        seq
    }

    async fn recv_replies<M: NetlinkDeserializable>(&mut self) -> io::Result<Vec<(u32, Reply<M>)>> {
        let mut buffer = std::mem::take(&mut self.buffer);
        let result = self.transport.recv(&mut buffer).await;
        let replies = result.map(|()| decode_datagram(&buffer));
        self.buffer = buffer;
        replies?.map_err(io::Error::other)
    }

    /// Reads until the final reply of `seq` (an abandoned dump, or a request whose caller gave
    /// up), discarding everything.
    async fn drain(&mut self, seq: u32) -> io::Result<()> {
        loop {
            let replies = self.recv_replies::<GenlMessage<IpvsMessage>>().await?;
            if replies.iter().any(|(s, r)| *s == seq && r.is_final()) {
                return Ok(());
            }
        }
    }

    /// Asks the kernel's generic-netlink controller for the IPVS family id; `None` when the
    /// kernel has no such family.
    async fn lookup_family(&mut self) -> Result<Option<u16>, Error> {
        let target = Target::new(Operation::ResolveFamily);
        let request = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.to_owned())],
        });
        let mut bytes = Vec::new();
        let seq = self.encode(request, NLM_F_REQUEST | NLM_F_ACK, &mut bytes);
        let io = |source| Error::Io { target, source };
        self.transport.send(&bytes).await.map_err(io)?;
        let mut family = None;
        loop {
            for (s, reply) in self.recv_replies::<GenlMessage<GenlCtrl>>().await.map_err(io)? {
                if s != seq {
                    continue;
                }
                match reply {
                    Reply::Message(message, _) => {
                        family = message.payload.nlas.iter().find_map(|nla| match nla {
                            GenlCtrlAttrs::FamilyId(id) => Some(*id),
                            _ => None,
                        });
                    }
                    Reply::Ack | Reply::Done => {
                        return match family {
                            Some(id) => Ok(Some(id)),
                            None => Err(Error::MalformedReply {
                                target,
                                reason: "the controller's answer has no family id".into(),
                            }),
                        };
                    }
                    Reply::Failed(ENOENT) => return Ok(None),
                    Reply::Failed(errno) => {
                        return Err(Error::Kernel {
                            target,
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    Reply::Malformed(reason) => {
                        return Err(Error::MalformedReply { target, reason });
                    }
                }
            }
        }
    }

    /// The IPVS family id, resolved once and cached.
    async fn family(&mut self, target: Target) -> Result<u16, Error> {
        if let Some(id) = self.family {
            return Ok(id);
        }
        match self.lookup_family().await? {
            Some(id) => {
                debug!(family = id, "resolved the IPVS generic-netlink family");
                self.family = Some(id);
                Ok(id)
            }
            None => Err(Error::IpvsUnavailable { target }),
        }
    }

    /// After an `ENOENT`, checks whether the cached family id went stale (the module was
    /// reloaded) and whether IPVS is there at all. `Ok(true)`: the id changed, send again.
    async fn family_changed(&mut self, target: Target) -> Result<bool, Error> {
        let old = self.family.take();
        let new = self.family(target).await?;
        Ok(old != Some(new))
    }

    async fn finish_abandoned_dump(&mut self, target: Target) -> Result<(), Error> {
        if let Some(seq) = self.unfinished_dump {
            self.drain(seq).await.map_err(|source| Error::Io { target, source })?;
            self.unfinished_dump = None;
        }
        Ok(())
    }

    /// Sends one request and collects its reply messages.
    pub(crate) async fn execute(&mut self, request: &Request) -> Result<Vec<IpvsMessage>, Error> {
        self.execute_each(request, |message, out| {
            out.push(message);
            Ok(())
        })
        .await
    }

    /// Sends one request and hands each reply message to `each` as soon as it is decoded;
    /// `each` adds what it makes of the message to the reply's list, or says why the message
    /// is malformed. A large dump is never held whole in its decoded form.
    pub(crate) async fn execute_each<R>(
        &mut self,
        request: &Request,
        mut each: impl FnMut(IpvsMessage, &mut Vec<R>) -> Result<(), String>,
    ) -> Result<Vec<R>, Error> {
        let target = request.target();
        self.finish_abandoned_dump(target).await?;
        let message = request.message()?;
        let mut stale_family_checked = false;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.exchange(request, message.clone(), &mut each).await {
                Err(Exchange::Failed(ENOENT)) if !stale_family_checked => {
                    stale_family_checked = true;
                    if !self.family_changed(target).await? {
                        return Err(request.error_for(ENOENT));
                    }
                }
                Err(Exchange::Failed(errno)) => return Err(request.error_for(errno)),
                Err(Exchange::Interrupted) if attempts < DUMP_ATTEMPTS => {
                    debug!(%target, attempts, "dump interrupted, trying again");
                }
                Err(Exchange::Interrupted) => {
                    return Err(Error::DumpInterrupted { target, attempts });
                }
                Err(Exchange::Error(err)) => return Err(err),
                Ok(messages) => return Ok(messages),
            }
        }
    }

    async fn exchange<R>(
        &mut self,
        request: &Request,
        message: IpvsMessage,
        each: &mut impl FnMut(IpvsMessage, &mut Vec<R>) -> Result<(), String>,
    ) -> Result<Vec<R>, Exchange> {
        let target = request.target();
        let family = self.family(target).await.map_err(Exchange::Error)?;
        let dump = request.is_dump();
        let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        let mut genl = GenlMessage::from_payload(message);
        genl.set_resolved_family_id(family);
        let mut bytes = Vec::new();
        let seq = self.encode(genl, flags, &mut bytes);
        *self.sent.entry(target.operation).or_default() += 1;
        let io = |source| Exchange::Error(Error::Io { target, source });
        self.transport.send(&bytes).await.map_err(io)?;
        if dump {
            self.unfinished_dump = Some(seq);
        }
        let mut messages = Vec::new();
        let mut interrupted = false;
        let mut malformed = None;
        loop {
            for (s, reply) in self.recv_replies::<GenlMessage<IpvsMessage>>().await.map_err(io)? {
                if s != seq {
                    trace!(seq = s, "discarding a reply to an earlier request");
                    continue;
                }
                let outcome = match reply {
                    Reply::Message(genl, flags) => {
                        interrupted |= flags & NLM_F_DUMP_INTR != 0;
                        if let Err(reason) = each(genl.payload, &mut messages) {
                            // Keep reading: a dump must be drained to its end.
                            malformed.get_or_insert(reason);
                        }
                        continue;
                    }
                    Reply::Malformed(reason) => {
                        // Keep reading: a dump must be drained to its end.
                        malformed.get_or_insert(reason);
                        continue;
                    }
                    Reply::Ack | Reply::Done => Ok(()),
                    Reply::Failed(errno) => Err(Exchange::Failed(errno)),
                };
                self.unfinished_dump = None;
                outcome?;
                if let Some(reason) = malformed {
                    return Err(Exchange::Error(Error::MalformedReply { target, reason }));
                }
                if interrupted {
                    return Err(Exchange::Interrupted);
                }
                return Ok(messages);
            }
        }
    }

    /// Applies changes in order, `window` messages per `sendmsg`, and returns one result per
    /// change. A failed change does not stop the others.
    pub(crate) async fn apply(&mut self, changes: &[Change]) -> Vec<Result<(), Error>> {
        let requests: Vec<Request> = changes.iter().cloned().map(Request::Change).collect();
        let mut results: Vec<Option<Result<(), Error>>> = Vec::with_capacity(requests.len());
        results.resize_with(requests.len(), || None);
        let mut start = 0;
        let mut stale_family_checked = false;
        while start < requests.len() {
            let end = (start + self.window).min(requests.len());
            let failure = match self.apply_chunk(&requests, start..end, &mut results).await {
                Ok(ChunkOutcome::AllNoEntry) if !stale_family_checked => {
                    stale_family_checked = true;
                    match self.family_changed(requests[start].target()).await {
                        Ok(true) => {
                            // The family id was stale: send the same chunk again.
                            results[start..end].iter_mut().for_each(|r| *r = None);
                            continue;
                        }
                        Ok(false) => None,
                        Err(err) => Some(err),
                    }
                }
                Ok(_) => None,
                Err(err) => Some(err),
            };
            if let Some(err) = failure {
                // Nothing more can be sent: every remaining change fails the same way.
                for i in start..requests.len() {
                    results[i] = Some(Err(err.retarget(requests[i].target())));
                }
                break;
            }
            start = end;
        }
        results
            .into_iter()
            .zip(&requests)
            .map(|(result, request)| {
                result.unwrap_or_else(|| {
                    Err(Error::Io {
                        target: request.target(),
                        source: io::Error::other("no reply from the kernel"),
                    })
                })
            })
            .collect()
    }

    async fn apply_chunk(
        &mut self,
        requests: &[Request],
        chunk: std::ops::Range<usize>,
        results: &mut [Option<Result<(), Error>>],
    ) -> Result<ChunkOutcome, Error> {
        let first = requests[chunk.start].target();
        self.finish_abandoned_dump(first).await?;
        let family = self.family(first).await?;
        let mut bytes = Vec::new();
        let mut pending = HashMap::new();
        for i in chunk.clone() {
            match requests[i].message() {
                Ok(message) => {
                    let mut genl = GenlMessage::from_payload(message);
                    genl.set_resolved_family_id(family);
                    let seq = self.encode(genl, NLM_F_REQUEST | NLM_F_ACK, &mut bytes);
                    *self.sent.entry(requests[i].target().operation).or_default() += 1;
                    pending.insert(seq, i);
                }
                Err(err) => results[i] = Some(Err(err)),
            }
        }
        if pending.is_empty() {
            return Ok(ChunkOutcome::Done);
        }
        let sent = pending.len();
        let mut no_entry = 0;
        let fail_pending = |pending: &HashMap<u32, usize>,
                            results: &mut [Option<Result<(), Error>>],
                            err: &io::Error| {
            for &i in pending.values() {
                results[i] = Some(Err(Error::Io {
                    target: requests[i].target(),
                    source: io::Error::new(err.kind(), err.to_string()),
                }));
            }
        };
        if let Err(err) = self.transport.send(&bytes).await {
            fail_pending(&pending, results, &err);
            return Ok(ChunkOutcome::Done);
        }
        while !pending.is_empty() {
            let replies = match self.recv_replies::<GenlMessage<IpvsMessage>>().await {
                Ok(replies) => replies,
                Err(err) => {
                    // The outcome of what is still pending is unknown.
                    fail_pending(&pending, results, &err);
                    return Ok(ChunkOutcome::Done);
                }
            };
            for (seq, reply) in replies {
                let Some(&i) = pending.get(&seq) else {
                    trace!(seq, "discarding a reply to an earlier request");
                    continue;
                };
                let result = match reply {
                    Reply::Ack | Reply::Done => Ok(()),
                    Reply::Failed(errno) => {
                        no_entry += usize::from(errno == ENOENT);
                        Err(requests[i].error_for(errno))
                    }
                    Reply::Malformed(reason) => {
                        Err(Error::MalformedReply { target: requests[i].target(), reason })
                    }
                    Reply::Message(..) => continue,
                };
                pending.remove(&seq);
                results[i] = Some(result);
            }
        }
        Ok(if no_entry == sent { ChunkOutcome::AllNoEntry } else { ChunkOutcome::Done })
    }
}

/// How one exchange with the kernel ended, before it is mapped to the caller's error.
enum Exchange {
    Failed(i32),
    Interrupted,
    Error(Error),
}

enum ChunkOutcome {
    Done,
    /// Every message of the chunk failed with `ENOENT`: the family id may be stale.
    AllNoEntry,
}

#[cfg(test)]
pub(crate) mod tests;
