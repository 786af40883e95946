//! The socket loop against a scripted kernel: sequence matching, family resolution and
//! re-resolution, interrupted and malformed dumps, and batches.

use std::{
    collections::VecDeque,
    io,
    sync::{Arc, Mutex},
};

use netlink_packet_core::{
    NLM_F_DUMP_INTR, NLM_F_MULTIPART, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::{
    GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};

use super::{Connection, Transport};
use crate::{
    Change, Destination, Error, ServiceKey, VirtualService,
    message::{IpvsAttribute, IpvsCommand, IpvsMessage},
    request::Request,
};

const GENL_ID_CTRL: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// One message the code under test sent.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) message_type: u16,
    pub(crate) seq: u32,
    pub(crate) command: u8,
}

type Handler = Box<dyn FnMut(&Sent) -> Vec<Vec<u8>> + Send>;

/// A kernel stand-in: every `sendmsg` is split into messages and each is answered by the
/// handler with zero or more datagrams.
pub(crate) struct Scripted {
    handler: Handler,
    queue: VecDeque<Vec<u8>>,
    /// How many `recv` calls never complete, as a kernel that has not answered yet.
    stalls: usize,
    /// Every message sent, and how many `sendmsg` calls carried them.
    pub(crate) log: Arc<Mutex<(Vec<Sent>, usize)>>,
}

impl Scripted {
    pub(crate) fn new(handler: impl FnMut(&Sent) -> Vec<Vec<u8>> + Send + 'static) -> Self {
        Self { handler: Box::new(handler), queue: VecDeque::new(), stalls: 0, log: Arc::default() }
    }
}

impl Transport for Scripted {
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut offset = 0;
        let mut log = self.log.lock().unwrap();
        log.1 += 1;
        while offset < bytes.len() {
            let frame = NetlinkBuffer::new_checked(&bytes[offset..]).expect("valid framing");
            let len = frame.length() as usize;
            let sent = Sent {
                message_type: frame.message_type(),
                seq: frame.sequence_number(),
                command: bytes[offset + 16],
            };
            self.queue.extend((self.handler)(&sent));
            log.0.push(sent);
            offset += len;
        }
        Ok(())
    }

    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        if self.stalls > 0 {
            self.stalls -= 1;
            std::future::pending::<()>().await;
        }
        match self.queue.pop_front() {
            Some(datagram) => {
                buf.extend_from_slice(&datagram);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::WouldBlock, "the script has no reply")),
        }
    }
}

fn header_bytes(message_type: u16, flags: u16, seq: u32, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((16 + payload_len) as u32).to_ne_bytes());
    out.extend_from_slice(&message_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

/// An ACK (`errno` 0) or an error reply, with the capped request header.
pub(crate) fn ack(seq: u32, errno: i32) -> Vec<u8> {
    let mut out = header_bytes(NLMSG_ERROR, 0x100, seq, 20);
    out.extend_from_slice(&(-errno).to_ne_bytes());
    out.extend_from_slice(&[0; 16]);
    out
}

/// The end of a dump.
pub(crate) fn done(seq: u32, errno: i32) -> Vec<u8> {
    let mut out = header_bytes(NLMSG_DONE, NLM_F_MULTIPART, seq, 4);
    out.extend_from_slice(&(-errno).to_ne_bytes());
    out
}

/// One IPVS message as the kernel frames it.
pub(crate) fn ipvs(family: u16, seq: u32, flags: u16, message: IpvsMessage) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(message);
    genl.set_resolved_family_id(family);
    frame(genl, seq, flags)
}

fn frame<P>(payload: P, seq: u32, flags: u16) -> Vec<u8>
where
    P: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
    NetlinkPayload<P>: From<P>,
{
    let mut header = NetlinkHeader::default();
    header.sequence_number = seq;
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    message.finalize();
    let mut out = vec![0; message.buffer_len()];
    message.serialize(&mut out);
    out
}

/// The controller's answer to `CTRL_CMD_GETFAMILY`: the family, then an ACK.
pub(crate) fn family_reply(seq: u32, id: Option<u16>) -> Vec<Vec<u8>> {
    match id {
        Some(id) => {
            let reply = GenlMessage::from_payload(GenlCtrl {
                cmd: GenlCtrlCmd::NewFamily,
                nlas: vec![GenlCtrlAttrs::FamilyName("IPVS".into()), GenlCtrlAttrs::FamilyId(id)],
            });
            vec![frame(reply, seq, 0), ack(seq, 0)]
        }
        None => vec![ack(seq, 2)],
    }
}

fn service_message(port: u16) -> IpvsMessage {
    let service = VirtualService::new(ServiceKey::tcp(([10, 0, 0, 1], port).into()), "rr");
    let mut attrs = service.to_attributes();
    // As in a dump: the kernel's HASHED flag and an all-ones mask.
    attrs.retain(|a| !matches!(a, crate::message::ServiceAttribute::Flags { .. }));
    attrs.push(crate::message::ServiceAttribute::Flags { flags: 2, mask: u32::MAX });
    IpvsMessage::new(IpvsCommand::NewService, vec![IpvsAttribute::Service(attrs)])
}

fn key(port: u16) -> ServiceKey {
    ServiceKey::tcp(([10, 0, 0, 1], port).into())
}

/// A kernel with IPVS at family `id` that answers dumps with `dump` and ACKs everything else.
fn kernel(id: u16, mut dump: impl FnMut(u32) -> Vec<Vec<u8>> + Send + 'static) -> Scripted {
    Scripted::new(move |sent| match sent.message_type {
        GENL_ID_CTRL => family_reply(sent.seq, Some(id)),
        t if t == id && sent.command == u8::from(IpvsCommand::GetService) => dump(sent.seq),
        _ => vec![ack(sent.seq, 0)],
    })
}

#[tokio::test]
async fn resolves_the_family_once_and_reads_a_dump() {
    let transport = kernel(42, |seq| {
        vec![
            ipvs(42, seq, NLM_F_MULTIPART, service_message(80)),
            ipvs(42, seq, NLM_F_MULTIPART, service_message(81)),
            done(seq, 0),
        ]
    });
    let log = transport.log.clone();
    let mut connection = Connection::new(transport);
    for _ in 0..2 {
        let messages = connection.execute(&Request::ListServices).await.unwrap();
        assert_eq!(messages.len(), 2);
    }
    let log = log.lock().unwrap();
    let types: Vec<u16> = log.0.iter().map(|s| s.message_type).collect();
    assert_eq!(types, [GENL_ID_CTRL, 42, 42], "one family lookup, then two dumps");
}

#[tokio::test]
async fn an_interrupted_dump_is_discarded_and_tried_again() {
    let mut attempt = 0;
    let transport = kernel(42, move |seq| {
        attempt += 1;
        if attempt == 1 {
            // A partial dump: one service, flagged as interrupted.
            vec![
                ipvs(42, seq, NLM_F_MULTIPART | NLM_F_DUMP_INTR, service_message(80)),
                done(seq, 0),
            ]
        } else {
            vec![
                ipvs(42, seq, NLM_F_MULTIPART, service_message(80)),
                ipvs(42, seq, NLM_F_MULTIPART, service_message(81)),
                ipvs(42, seq, NLM_F_MULTIPART, service_message(82)),
                done(seq, 0),
            ]
        }
    });
    let mut connection = Connection::new(transport);
    let messages = connection.execute(&Request::ListServices).await.unwrap();
    assert_eq!(messages.len(), 3, "only the complete second dump is returned");
}

#[tokio::test]
async fn a_dump_that_stays_interrupted_is_an_error_not_a_partial_result() {
    let transport = kernel(42, |seq| {
        vec![ipvs(42, seq, NLM_F_MULTIPART | NLM_F_DUMP_INTR, service_message(80)), done(seq, 0)]
    });
    let mut connection = Connection::new(transport);
    let err = connection.execute(&Request::ListServices).await.unwrap_err();
    assert!(matches!(err, Error::DumpInterrupted { attempts: 5, .. }), "{err}");
}

#[tokio::test]
async fn a_malformed_dump_part_fails_the_dump_and_the_socket_stays_usable() {
    let mut dumps = 0;
    let transport = kernel(42, move |seq| {
        dumps += 1;
        let mut broken = ipvs(42, seq, NLM_F_MULTIPART, service_message(80));
        if dumps == 1 {
            // Truncate the PORT attribute inside the service nest to one byte.
            let at = broken.windows(4).position(|w| w == [6, 0, 4, 0]).unwrap();
            broken[at] = 5;
        }
        vec![broken, ipvs(42, seq, NLM_F_MULTIPART, service_message(81)), done(seq, 0)]
    });
    let mut connection = Connection::new(transport);
    let err = connection.execute(&Request::ListServices).await.unwrap_err();
    assert!(matches!(err, Error::MalformedReply { .. }), "{err}");
    let messages = connection.execute(&Request::ListServices).await.unwrap();
    assert_eq!(messages.len(), 2);
}

#[tokio::test]
async fn replies_to_earlier_requests_are_skipped() {
    let transport = Scripted::new(|sent| match sent.message_type {
        GENL_ID_CTRL => family_reply(sent.seq, Some(42)),
        // A stale reply to an abandoned request comes first.
        _ => vec![ack(sent.seq.wrapping_sub(1), 17), ack(sent.seq, 0)],
    });
    let mut connection = Connection::new(transport);
    let change = Change::DeleteService(key(80));
    connection.execute(&Request::Change(change)).await.unwrap();
}

#[tokio::test]
async fn a_batch_goes_out_in_windows_and_reports_each_change() {
    let mut seen = 0;
    let transport = Scripted::new(move |sent| {
        if sent.message_type == GENL_ID_CTRL {
            return family_reply(sent.seq, Some(42));
        }
        seen += 1;
        // The 6th change exists already; the 151st names a missing service.
        let errno = match seen {
            6 => 17,
            151 => 3,
            _ => 0,
        };
        vec![ack(sent.seq, errno)]
    });
    let log = transport.log.clone();
    let mut connection = Connection::new(transport);
    connection.set_window(128);
    let changes: Vec<Change> = (0..300)
        .map(|i| {
            Change::AddDestination(key(80), Destination::new(([10, 1, 0, 1], 1000 + i).into()))
        })
        .collect();
    let results = connection.apply(&changes).await;
    assert_eq!(results.len(), 300);
    for (i, result) in results.iter().enumerate() {
        match i {
            5 => assert!(matches!(result, Err(Error::AlreadyExists { .. })), "{result:?}"),
            150 => assert!(matches!(result, Err(Error::NoSuchService { .. })), "{result:?}"),
            _ => assert!(result.is_ok(), "change {i}: {result:?}"),
        }
    }
    let err = results[150].as_ref().unwrap_err();
    assert_eq!(err.target().destination, Some(([10, 1, 0, 1], 1150).into()));
    let (sent, sendmsgs) = &*log.lock().unwrap();
    assert_eq!(sent.len(), 301, "one family lookup and 300 changes");
    assert_eq!(*sendmsgs, 1 + 3, "300 changes in windows of 128");
}

#[tokio::test]
async fn a_stale_family_id_is_resolved_again() {
    let mut lookups = 0;
    let transport = Scripted::new(move |sent| match sent.message_type {
        GENL_ID_CTRL => {
            lookups += 1;
            // The module was reloaded after the first lookup and got a new id.
            family_reply(sent.seq, Some(if lookups == 1 { 42 } else { 43 }))
        }
        42 => vec![ack(sent.seq, 2)],
        _ => vec![ack(sent.seq, 0)],
    });
    let log = transport.log.clone();
    let mut connection = Connection::new(transport);
    connection.execute(&Request::Flush).await.unwrap();
    let changes = vec![Change::DeleteService(key(80)), Change::DeleteService(key(81))];
    assert!(connection.apply(&changes).await.iter().all(Result::is_ok));
    let types: Vec<u16> = log.lock().unwrap().0.iter().map(|s| s.message_type).collect();
    assert_eq!(types, [GENL_ID_CTRL, 42, GENL_ID_CTRL, 43, 43, 43]);
}

#[tokio::test]
async fn a_genuine_enoent_is_not_mistaken_for_a_stale_family() {
    let transport = Scripted::new(|sent| match sent.message_type {
        GENL_ID_CTRL => family_reply(sent.seq, Some(42)),
        _ => vec![ack(sent.seq, 2)],
    });
    let mut connection = Connection::new(transport);
    let request = Request::Change(Change::DeleteDestination(key(80), ([10, 1, 0, 1], 80).into()));
    let err = connection.execute(&request).await.unwrap_err();
    assert!(matches!(err, Error::NoSuchDestination { .. }), "{err}");
}

#[tokio::test]
async fn without_ipvs_every_request_and_change_says_so() {
    let transport = Scripted::new(|sent| family_reply(sent.seq, None));
    let mut connection = Connection::new(transport);
    let err = connection.execute(&Request::GetInfo).await.unwrap_err();
    assert!(matches!(err, Error::IpvsUnavailable { .. }), "{err}");
    let changes = vec![Change::DeleteService(key(80)), Change::DeleteService(key(81))];
    let results = connection.apply(&changes).await;
    for (result, change) in results.iter().zip(&changes) {
        match result {
            Err(err @ Error::IpvsUnavailable { target }) => {
                assert_eq!(*target, change.target(), "{err}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn an_abandoned_dump_is_drained_before_the_next_request() {
    let mut transport =
        kernel(42, |seq| vec![ipvs(42, seq, NLM_F_MULTIPART, service_message(80)), done(seq, 0)]);
    // Resolving the family reads one reply; the dump's first read never completes.
    transport.stalls = 0;
    let log = transport.log.clone();
    let mut connection = Connection::new(transport);
    connection.execute(&Request::GetInfo).await.unwrap();
    connection.transport.stalls = 1;
    // Start a dump and drop its future after the request went out.
    {
        let dump = connection.execute(&Request::ListServices);
        futures_poll_once(dump).await;
    }
    assert!(connection.unfinished_dump.is_some());
    connection.execute(&Request::Flush).await.unwrap();
    assert!(connection.unfinished_dump.is_none());
    assert_eq!(log.lock().unwrap().0.len(), 4, "lookup, info, dump, flush");
}

/// Polls a future once and drops it, as a caller that gives up does.
async fn futures_poll_once<F: std::future::Future>(future: F) {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        let _ = future.as_mut().poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}
