//! The `kube-ipvs0` dummy interface and the Service addresses bound to it.
//!
//! IPVS only sees packets the kernel accepts as addressed to this host, so every Service address
//! that has a virtual server (ClusterIPs, external IPs, load-balancer IPs) is bound to a dummy
//! interface, `/32` for IPv4 and `/128` for IPv6, as kube-proxy does.
//!
//! Like kube-proxy, the link is created and left **down**: addresses on a down interface still
//! get their `local` routes, so the kernel accepts traffic to them, while a down link answers no
//! ARP or neighbour discovery and takes no route of its own. An operator's `ip -d addr show
//! kube-ipvs0` therefore looks as it does with kube-proxy.
//!
//! [`DummyLink::sync`] moves the address set to the desired one with the fewest operations
//! (only what is missing is added, only what is extra is removed), several requests in flight at
//! once. It touches no other interface and no other address. Adding an address that is already
//! there, or removing one that is already gone, is not an error.
//!
//! ```no_run
//! # async fn example() -> Result<(), dummy_link::Error> {
//! use std::collections::BTreeSet;
//! let handle = dummy_link::connect()?;
//! let link = dummy_link::DummyLink::ensure(handle, dummy_link::KUBE_IPVS0).await?;
//! let vips: BTreeSet<std::net::IpAddr> = ["10.96.0.1".parse().unwrap()].into();
//! let report = link.sync(&vips).await;
//! println!("added {:?}, removed {:?}", report.added, report.removed);
//! # Ok(())
//! # }
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
};

use futures::{Stream, StreamExt, TryStreamExt, stream};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkDummy,
    packet_core::{NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    },
};
use tracing::{debug, info};

/// The interface name kube-proxy and kube-ipvs use.
pub const KUBE_IPVS0: &str = "kube-ipvs0";

/// How many address requests are in flight at once during a sync.
const IN_FLIGHT: usize = 64;
/// How many times an address dump is read before an interrupted one is given up on.
const DUMP_TRIES: usize = 5;

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;
const ENXIO: i32 = 6;

/// A failure, naming the link and what was being done to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No rtnetlink socket could be opened.
    #[error("cannot open an rtnetlink socket: {0}")]
    Connect(#[source] io::Error),
    /// A link of that name exists but is not a dummy link; it is left alone.
    #[error("{link} exists but is a {kind} link, not a dummy one; it is not ours to manage")]
    NotDummy {
        /// The link name.
        link: String,
        /// What kind of link it is.
        kind: String,
    },
    /// The link disappeared while it was being managed.
    #[error("{link} does not exist")]
    NoSuchLink {
        /// The link name.
        link: String,
    },
    /// The kernel refused a request.
    #[error("{link}: {operation}: {source}")]
    Netlink {
        /// The link name.
        link: String,
        /// What was asked, such as `add address 10.96.0.1/32`.
        operation: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// Every try of an address dump was interrupted by concurrent changes
    /// (`NLM_F_DUMP_INTR`); what was read is not used (kubernetes#129562: a partial dump taken
    /// as the truth).
    #[error("{link}: the address dump was interrupted {DUMP_TRIES} times by concurrent changes")]
    DumpInterrupted {
        /// The link name (`*` for every link).
        link: String,
    },
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Opens an rtnetlink connection in the current network namespace and spawns its driver on the
/// current tokio runtime.
pub fn connect() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// The prefix length a Service address is bound with: the address alone.
pub fn host_prefix(address: IpAddr) -> u8 {
    if address.is_ipv4() { 32 } else { 128 }
}

/// What [`DummyLink::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Addresses bound.
    pub added: Vec<IpAddr>,
    /// Addresses unbound.
    pub removed: Vec<IpAddr>,
    /// Requests that failed; the others went ahead.
    pub failed: Vec<Error>,
}

impl SyncReport {
    /// Whether the link now holds exactly the desired addresses.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// A dummy link this process manages.
#[derive(Debug, Clone)]
pub struct DummyLink {
    handle: Handle,
    name: String,
    index: u32,
}

impl DummyLink {
    /// Finds the dummy link `name`, creating it (down) if it does not exist. Fails with
    /// [`Error::NotDummy`] if a link of that name exists with another kind.
    pub async fn ensure(handle: Handle, name: &str) -> Result<Self> {
        if let Some(link) = Self::find(handle.clone(), name).await? {
            return Ok(link);
        }
        let add = handle.link().add(LinkDummy::new(name).build()).execute().await;
        match add {
            Ok(()) => info!(link = name, "created the dummy link"),
            // Created by someone else in the meantime: find it below.
            Err(err) if errno(&err) == Some(EEXIST) => {}
            Err(source) => {
                return Err(Error::Netlink {
                    link: name.to_owned(),
                    operation: "create dummy link".into(),
                    source,
                });
            }
        }
        Self::find(handle, name).await?.ok_or_else(|| Error::NoSuchLink { link: name.to_owned() })
    }

    /// Finds the dummy link `name`; `None` if there is no link of that name.
    pub async fn find(handle: Handle, name: &str) -> Result<Option<Self>> {
        let found = handle.link().get().match_name(name.to_owned()).execute().try_next().await;
        let message = match found {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(None),
            Err(err) if errno(&err) == Some(ENODEV) => return Ok(None),
            Err(source) => {
                return Err(Error::Netlink {
                    link: name.to_owned(),
                    operation: "look up link".into(),
                    source,
                });
            }
        };
        match link_kind(&message) {
            Some(InfoKind::Dummy) => {
                Ok(Some(Self { handle, name: name.to_owned(), index: message.header.index }))
            }
            kind => Err(Error::NotDummy {
                link: name.to_owned(),
                kind: kind.map_or_else(|| "plain".to_owned(), |k| k.to_string()),
            }),
        }
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The link's interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn netlink_error(&self, operation: String, source: rtnetlink::Error) -> Error {
        if errno(&source) == Some(ENODEV) {
            return Error::NoSuchLink { link: self.name.clone() };
        }
        Error::Netlink { link: self.name.clone(), operation, source }
    }

    async fn address_messages(&self) -> Result<BTreeMap<IpAddr, u8>> {
        let mut handle = self.handle.clone();
        let messages = dump_addresses(|request| handle.request(request), &self.name)
            .await
            .map_err(|err| match err {
                Error::Netlink { source, .. } => {
                    self.netlink_error("list addresses".into(), source)
                }
                other => other,
            })?;
        Ok(messages
            .iter()
            .filter(|message| message.header.index == self.index)
            .filter_map(|message| {
                message.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(ip) => Some((*ip, message.header.prefix_len)),
                    _ => None,
                })
            })
            // The kernel gives a dummy link an IPv6 link-local address when it is up; it is
            // not a Service address.
            .filter(|(ip, _)| !is_ipv6_link_local(*ip))
            .collect())
    }

    /// The addresses bound to the link (IPv6 link-local ones aside).
    pub async fn addresses(&self) -> Result<BTreeSet<IpAddr>> {
        Ok(self.address_messages().await?.into_keys().collect())
    }

    /// Binds `address` with a host prefix; `Ok(false)` if it was already bound.
    pub async fn add_address(&self, address: IpAddr) -> Result<bool> {
        let prefix = host_prefix(address);
        match self.handle.address().add(self.index, address, prefix).execute().await {
            Ok(()) => Ok(true),
            Err(err) if errno(&err) == Some(EEXIST) => Ok(false),
            Err(source) => {
                Err(self.netlink_error(format!("add address {address}/{prefix}"), source))
            }
        }
    }

    /// Unbinds `address` (bound with `prefix`); `Ok(false)` if it was not bound.
    pub async fn remove_address(&self, address: IpAddr, prefix: u8) -> Result<bool> {
        let message = match address {
            IpAddr::V4(v4) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
                .index(self.index)
                .address(v4, prefix)
                .build(),
            IpAddr::V6(v6) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(self.index)
                .address(v6, prefix)
                .build(),
        };
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(true),
            Err(err) if matches!(errno(&err), Some(EADDRNOTAVAIL | ENXIO)) => Ok(false),
            Err(source) => {
                Err(self.netlink_error(format!("remove address {address}/{prefix}"), source))
            }
        }
    }

    /// Makes the link hold exactly `desired`: binds what is missing and unbinds what is extra,
    /// with up to 64 requests in flight. A failed request is reported and the others go on.
    pub async fn sync(&self, desired: &BTreeSet<IpAddr>) -> SyncReport {
        let mut report = SyncReport::default();
        let current = match self.address_messages().await {
            Ok(current) => current,
            Err(err) => {
                report.failed.push(err);
                return report;
            }
        };
        let to_add: Vec<IpAddr> =
            desired.iter().filter(|ip| !current.contains_key(ip)).copied().collect();
        let to_remove: Vec<(IpAddr, u8)> = current
            .iter()
            .filter(|(ip, _)| !desired.contains(ip))
            .map(|(ip, p)| (*ip, *p))
            .collect();
        let mut added = stream::iter(to_add)
            .map(|ip| async move { (ip, self.add_address(ip).await) })
            .buffer_unordered(IN_FLIGHT);
        while let Some((ip, result)) = added.next().await {
            match result {
                Ok(true) => report.added.push(ip),
                Ok(false) => {}
                Err(err) => report.failed.push(err),
            }
        }
        let mut removed = stream::iter(to_remove)
            .map(|(ip, prefix)| async move { (ip, self.remove_address(ip, prefix).await) })
            .buffer_unordered(IN_FLIGHT);
        while let Some((ip, result)) = removed.next().await {
            match result {
                Ok(true) => report.removed.push(ip),
                Ok(false) => {}
                Err(err) => report.failed.push(err),
            }
        }
        report.added.sort();
        report.removed.sort();
        debug!(link = %self.name, added = report.added.len(), removed = report.removed.len(), failed = report.failed.len(), "synced addresses");
        report
    }

    /// Deletes the link, with its addresses.
    pub async fn delete(self) -> Result<()> {
        match self.handle.link().del(self.index).execute().await {
            Ok(()) => {
                info!(link = %self.name, "deleted the dummy link");
                Ok(())
            }
            Err(err) if errno(&err) == Some(ENODEV) => Ok(()),
            Err(source) => Err(self.netlink_error("delete link".into(), source)),
        }
    }
}

/// Dumps every address of the host through `request` (the handle's, or a scripted kernel's in
/// tests). A dump the kernel flags as interrupted (`NLM_F_DUMP_INTR`: an address came or went
/// while it was read) is read again, and never taken as the truth.
async fn dump_addresses<S>(
    mut request: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Result<S, rtnetlink::Error>,
    link: &str,
) -> Result<Vec<AddressMessage>>
where
    S: Stream<Item = NetlinkMessage<RouteNetlinkMessage>>,
{
    let failed = |source| Error::Netlink {
        link: link.to_owned(),
        operation: "list addresses".into(),
        source,
    };
    for _ in 0..DUMP_TRIES {
        let mut message =
            NetlinkMessage::from(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
        message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut answers = std::pin::pin!(request(message).map_err(failed)?);
        let mut addresses = Vec::new();
        let mut interrupted = false;
        while let Some(answer) = answers.next().await {
            interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
            match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(address)) => {
                    addresses.push(address);
                }
                NetlinkPayload::Error(err) => {
                    return Err(failed(rtnetlink::Error::NetlinkError(err)));
                }
                _ => {}
            }
        }
        if !interrupted {
            return Ok(addresses);
        }
        debug!(link, "the address dump was interrupted; reading it again");
    }
    Err(Error::DumpInterrupted { link: link.to_owned() })
}

/// Every address of the host outside the link `except` (IPv6 link-local ones aside), from one
/// dump: the addresses NodePorts may be served on, and those that need no binding to be local.
/// A failed look-up of `except` is an error: taken as absent, its addresses (the Service
/// addresses, for kube-ipvs0) would count as the node's, and NodePorts would open on them.
pub async fn local_addresses(mut handle: Handle, except: &str) -> Result<Vec<IpAddr>> {
    let skip = DummyLink::find(handle.clone(), except).await?.map(|link| link.index);
    let messages = dump_addresses(|request| handle.request(request), "*").await?;
    let mut addresses: Vec<IpAddr> = messages
        .iter()
        .filter(|message| Some(message.header.index) != skip)
        .filter_map(|message| {
            message.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
        .filter(|ip| !is_ipv6_link_local(*ip))
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// Deletes the dummy link `name` if it exists; `Ok(false)` if there was none.
pub async fn delete_if_present(handle: Handle, name: &str) -> Result<bool> {
    match DummyLink::find(handle, name).await? {
        Some(link) => link.delete().await.map(|()| true),
        None => Ok(false),
    }
}

fn link_kind(message: &LinkMessage) -> Option<InfoKind> {
    message.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::Kind(kind) => Some(kind.clone()),
            _ => None,
        }),
        _ => None,
    })
}

fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses_are_bound_alone() {
        assert_eq!(host_prefix("10.96.0.1".parse().unwrap()), 32);
        assert_eq!(host_prefix("fd00::1".parse().unwrap()), 128);
    }

    #[test]
    fn link_local_addresses_are_not_service_addresses() {
        assert!(is_ipv6_link_local("fe80::1".parse().unwrap()));
        assert!(!is_ipv6_link_local("fd00::1".parse().unwrap()));
        assert!(!is_ipv6_link_local("10.0.0.1".parse().unwrap()));
    }

    /// An address message of interface `index`, as a dump answers it, with `flags`.
    fn answer(index: u32, address: &str, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
        let ip: IpAddr = address.parse().unwrap();
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = host_prefix(ip);
        message.attributes.push(AddressAttribute::Address(ip));
        let mut answer = NetlinkMessage::from(RouteNetlinkMessage::NewAddress(message));
        answer.header.flags = flags;
        answer
    }

    /// A kernel that answers each dump with the next of `dumps`.
    fn scripted(
        dumps: Vec<Vec<NetlinkMessage<RouteNetlinkMessage>>>,
    ) -> impl FnMut(
        NetlinkMessage<RouteNetlinkMessage>,
    ) -> Result<
        stream::Iter<std::vec::IntoIter<NetlinkMessage<RouteNetlinkMessage>>>,
        rtnetlink::Error,
    > {
        let mut dumps = dumps.into_iter();
        move |request| {
            assert_eq!(request.header.flags, NLM_F_REQUEST | NLM_F_DUMP);
            Ok(stream::iter(dumps.next().expect("a scripted dump")))
        }
    }

    #[tokio::test]
    async fn an_interrupted_address_dump_is_read_again_and_never_taken_as_the_truth() {
        const MULTI: u16 = rtnetlink::packet_core::NLM_F_MULTIPART;
        let partial = vec![answer(2, "192.168.99.2", MULTI | NLM_F_DUMP_INTR)];
        let whole = vec![answer(2, "192.168.99.2", MULTI), answer(7, "10.96.0.10", MULTI)];
        let found = dump_addresses(scripted(vec![partial.clone(), whole]), "*").await.unwrap();
        let indexes: Vec<u32> = found.iter().map(|m| m.header.index).collect();
        assert_eq!(indexes, [2, 7], "the second, whole dump");

        let always = vec![partial; DUMP_TRIES];
        let err = dump_addresses(scripted(always), "kube-ipvs0").await.unwrap_err();
        assert!(matches!(err, Error::DumpInterrupted { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "kube-ipvs0: the address dump was interrupted 5 times by concurrent changes"
        );
    }

    #[test]
    fn errors_name_the_link_and_the_operation() {
        let err = Error::NotDummy { link: "kube-ipvs0".into(), kind: "veth".into() };
        assert_eq!(
            err.to_string(),
            "kube-ipvs0 exists but is a veth link, not a dummy one; it is not ours to manage"
        );
    }
}
