//! The nftables table kube-ipvs owns: `inet kube-ipvs`.
//!
//! IPVS alone does not make Services work. This table adds, for IPv4 and IPv6:
//!
//! - **masquerade**: traffic to ClusterIPs from outside the cluster CIDR (or all of it with
//!   masquerade-all), to external and load-balancer IPs with `externalTrafficPolicy: Cluster`,
//!   and to NodePorts with that policy is marked before IPVS sees it (`prerouting` and `output`,
//!   nat priority) and masqueraded on its way out (`postrouting`);
//! - **hairpin**: a pod that reached itself through a Service is masqueraded;
//! - **the VIP filter**: new connections to an address on kube-ipvs0 are rejected unless they
//!   are for a Service port on it (kubernetes#72236: otherwise every host service listening on
//!   0.0.0.0, sshd included, answers on every ClusterIP);
//! - **loadBalancerSourceRanges**: other sources are dropped;
//! - **healthCheckNodePorts**: accepted before anything else in the table can refuse them.
//!
//! The rules are fixed; what changes with Services are set elements ([`Elements`]).
//! [`Netfilter::install`] writes the whole table in one atomic transaction, through
//! `nft -j -f -` with the JSON built by the `nftables` crate; [`Netfilter::update`] adds and
//! deletes only the elements that changed, in one nf_tables netlink batch (one transaction,
//! no process started). See `docs/netfilter.md` for why, and for what
//! `nft list table inet kube-ipvs` shows.

mod elements;
mod message;
mod model;
mod ruleset;
mod socket;

use nftables::helper::{self, NftablesError};
use tracing::{debug, warn};

pub use self::model::{Config, Elements, Family, NodePort, Protocol, ServicePort, TABLE};

/// The kernel modules the table's rules use (`nf_tables` and the expressions: NAT chains,
/// masquerade, conntrack, fib, reject), for loading them before the first transaction. The
/// kernel loads a missing one in the middle of a transaction by aborting and replaying the
/// whole batch, once per module.
pub const KERNEL_MODULES: &[&str] =
    &["nf_tables", "nft_chain_nat", "nft_masq", "nft_ct", "nft_fib_inet", "nft_reject_inet"];

/// A failed `nft` transaction.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `nft` failed or could not be run.
    #[error("nftables: {operation} of table inet {TABLE} failed: {source}")]
    Nft {
        /// What was being done: `install`, `update` or `remove`.
        operation: &'static str,
        /// What `nft` said.
        #[source]
        source: NftablesError,
    },
    /// `nft` could not be run to list the table.
    #[error("nftables: cannot run nft to list table inet {TABLE}: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft list table` failed (the table does not exist, say).
    #[error("nftables: cannot list table inet {TABLE}: {stderr}")]
    List {
        /// What `nft` wrote on its standard error.
        stderr: String,
    },
    /// A netlink request on the table failed.
    #[error("nftables: {operation} of table inet {TABLE} over netlink failed: {source}")]
    Netlink {
        /// What was being done: `update`, `check` or `read`.
        operation: &'static str,
        /// What the socket or the kernel said: the socket failed, the kernel refused, its
        /// answer could not be read, or a dump kept being interrupted.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How an [`Netfilter::update`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Nothing changed; nothing was written.
    Unchanged,
    /// Only the changed elements were written.
    Elements,
    /// The whole table was written: it was not installed yet, or the incremental transaction
    /// failed (the table had been changed behind our back) and the table was rewritten.
    Installed,
}

/// The table, and what this process last wrote to it.
#[derive(Debug)]
pub struct Netfilter {
    config: Config,
    /// What the kernel holds, as far as this process knows.
    applied: Option<Elements>,
    /// Hairpin elements no longer wanted but still in the kernel, deleted by
    /// [`Netfilter::flush`].
    stale_hairpin: std::collections::BTreeSet<std::net::IpAddr>,
    /// The netlink socket, kept open between syncs; opened again after a failure.
    socket: Option<socket::NfSocket>,
    transactions: u64,
}

impl Netfilter {
    /// Manages the table with this configuration; writes nothing yet.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            applied: None,
            stale_hairpin: Default::default(),
            socket: None,
            transactions: 0,
        }
    }

    /// Runs `request` on the netlink socket, opening it if needed; a socket that failed is
    /// closed, so the next request starts on a fresh one.
    fn netlink<T>(
        &mut self,
        request: impl FnOnce(&mut socket::NfSocket) -> Result<T, socket::SocketError>,
    ) -> Result<T, socket::SocketError> {
        let socket = match &mut self.socket {
            Some(socket) => socket,
            None => self.socket.insert(socket::NfSocket::open()?),
        };
        let result = request(socket);
        if result.is_err() {
            self.socket = None;
        }
        result
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The elements last written, if the table was installed.
    pub fn applied(&self) -> Option<&Elements> {
        self.applied.as_ref()
    }

    /// How many transactions (`nft` runs and netlink batches) this instance made.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    async fn run(
        &mut self,
        operation: &'static str,
        nftables: &nftables::schema::Nftables<'_>,
    ) -> Result<()> {
        self.transactions += 1;
        helper::apply_ruleset_async(nftables)
            .await
            .map_err(|source| Error::Nft { operation, source })
    }

    /// Writes the whole table, with `elements`; a table of the same name is replaced in one
    /// atomic transaction. When there is no such table yet (nothing can depend on it), the
    /// rules are written by `nft` and the elements by one netlink batch right after, which is
    /// much faster for large tables than `nft` reading them as JSON.
    pub async fn install(&mut self, elements: &Elements) -> Result<()> {
        self.applied = None;
        self.stale_hairpin.clear();
        let probe = elements::set_name(elements::SetKind::Vips, Some(Family::Ipv4));
        let exists = self.netlink(|socket| socket.count(&probe)).map_or(true, |c| c.is_some());
        if !exists {
            self.run("install", &ruleset::install(&self.config, &Elements::default())).await?;
            self.applied = Some(Elements::default());
            let changes = elements::element_changes(&self.config, &Elements::default(), elements);
            if changes.is_empty() {
                return Ok(());
            }
            self.transactions += 1;
            let messages = changes.iter().flat_map(message::change_messages);
            let written = self.netlink(|socket| socket.transaction(messages));
            // Before the copy below: the two are as large as the table.
            drop(changes);
            match written {
                Ok(()) => {
                    self.applied = Some(elements.clone());
                    debug!(table = TABLE, "installed the nftables table, then its elements");
                    return Ok(());
                }
                Err(err) => warn!(%err, "writing the elements failed; writing the whole table"),
            }
        }
        self.run("install", &ruleset::install(&self.config, elements)).await?;
        self.applied = Some(elements.clone());
        debug!(table = TABLE, "installed the nftables table");
        Ok(())
    }

    /// Moves the table to `elements`, writing only the elements that changed.
    pub async fn update(&mut self, elements: &Elements) -> Result<Update> {
        let Some(applied) = &self.applied else {
            self.install(elements).await?;
            return Ok(Update::Installed);
        };
        let changes = elements::element_changes(&self.config, applied, elements);
        let update =
            self.write_changes(changes, elements, |applied| *applied = elements.clone()).await?;
        self.stale_hairpin.clear();
        Ok(update)
    }

    /// Moves the table by a known difference: `removed` elements go, `added` ones come (for
    /// a localhost NodePort or a marked port, `removed` holds the old value and `added` the
    /// new). `target` is where that leads, written whole if the change cannot be applied.
    /// Costs what changed, not what the table holds.
    ///
    /// Hairpin elements that go are left in the kernel until [`Netfilter::flush`]: deleting
    /// an element costs the kernel far more than adding one, every replaced pod retires one,
    /// and a stale `pod . pod` element matches nothing (a pod is only sent to itself through
    /// a Service it is an endpoint of, and then its element is wanted anyway).
    pub async fn apply_delta(
        &mut self,
        removed: &Elements,
        added: &Elements,
        target: &Elements,
    ) -> Result<Update> {
        if self.applied.is_none() {
            self.install(target).await?;
            return Ok(Update::Installed);
        }
        let mut removed = std::borrow::Cow::Borrowed(removed);
        let mut added = std::borrow::Cow::Borrowed(added);
        if !removed.hairpin.is_empty() {
            let removed = removed.to_mut();
            self.stale_hairpin.append(&mut removed.hairpin);
        }
        if added.hairpin.iter().any(|a| self.stale_hairpin.contains(a)) {
            // Still in the kernel: wanted again, so no longer stale, and nothing to write.
            let stale = &mut self.stale_hairpin;
            added.to_mut().hairpin.retain(|a| !stale.remove(a));
        }
        let changes = elements::element_changes(&self.config, &removed, &added);
        self.write_changes(changes, target, |applied| applied.apply(&removed, &added)).await
    }

    /// Deletes the elements [`Netfilter::apply_delta`] left in the kernel. For quiet moments:
    /// the periodic full check calls it.
    pub async fn flush(&mut self) -> Result<Update> {
        let Some(applied) = &self.applied else { return Ok(Update::Unchanged) };
        if self.stale_hairpin.is_empty() {
            return Ok(Update::Unchanged);
        }
        let removed =
            Elements { hairpin: std::mem::take(&mut self.stale_hairpin), ..Default::default() };
        let mut target = applied.clone();
        target.apply(&removed, &Elements::default());
        let changes = elements::element_changes(&self.config, &removed, &Elements::default());
        self.write_changes(changes, &target, |applied| {
            applied.apply(&removed, &Elements::default())
        })
        .await
    }

    /// Writes the changes that lead to `target`, falling back to writing the whole table;
    /// `record` brings what was applied up to date after a successful write.
    async fn write_changes(
        &mut self,
        changes: Vec<elements::SetChange>,
        target: &Elements,
        record: impl FnOnce(&mut Elements),
    ) -> Result<Update> {
        if changes.is_empty() {
            return Ok(Update::Unchanged);
        }
        self.transactions += 1;
        let messages = changes.iter().flat_map(message::change_messages);
        let written = self.netlink(|socket| socket.transaction(messages));
        match written {
            Ok(()) => {
                record(self.applied.get_or_insert_with(Elements::default));
                Ok(Update::Elements)
            }
            Err(err) => {
                // The table is not what we wrote (deleted, flushed, edited): write it whole.
                warn!(%err, "incremental nftables update failed; writing the whole table");
                self.install(target).await?;
                Ok(Update::Installed)
            }
        }
    }

    /// Compares the table in the kernel with what was last written (each set and map exists
    /// and holds as many elements) and writes it whole if it differs: someone deleted or
    /// flushed it. Returns whether it had drifted. Reads the sets over netlink; writes only on
    /// drift.
    pub async fn check(&mut self) -> Result<bool> {
        let Some(applied) = &self.applied else { return Ok(false) };
        let wanted = elements::element_counts(&self.config, applied);
        let netlink =
            |err: socket::SocketError| Error::Netlink { operation: "check", source: Box::new(err) };
        let drifted = self
            .netlink(|socket| {
                for (set, count) in &wanted {
                    if socket.count(set)? != Some(*count) {
                        return Ok(true);
                    }
                }
                Ok(false)
            })
            .map_err(netlink)?;
        if !drifted {
            return Ok(false);
        }
        let applied = self.applied.clone().unwrap_or_default();
        warn!(table = TABLE, "the nftables table differs from what was written; writing it again");
        self.install(&applied).await?;
        Ok(true)
    }

    /// The ClusterIP, external-IP and load-balancer ports the table in the kernel holds,
    /// whoever wrote it last (empty when there is no table). The table lives as long as the
    /// virtual servers kube-ipvs programmed for them, so it is kube-ipvs's record of which
    /// virtual servers it created, across restarts.
    pub fn programmed_service_ports(&mut self) -> Result<std::collections::BTreeSet<ServicePort>> {
        use elements::SetKind;
        let mut ports = std::collections::BTreeSet::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            for kind in [SetKind::ClusterIps, SetKind::ExternalIps, SetKind::LocalExternalIps] {
                let set = elements::set_name(kind, Some(family));
                for key in self.keys(&set)?.unwrap_or_default() {
                    ports.extend(message::service_port_of_key(&key));
                }
            }
        }
        Ok(ports)
    }

    /// How the sets and maps in the kernel differ from `expected` (as [`expected_keys`]
    /// gives it), one line per element missing or extra
    /// (`set cluster-ips-v4: missing 10.96.0.10:80/TCP`) or set missing; empty when they hold
    /// exactly those elements. Compares the keys, as the kernel stores them.
    pub fn differences(&mut self, expected: &ExpectedKeys) -> Result<Vec<String>> {
        let mut differences = Vec::new();
        for (set, items) in expected {
            let Some(kernel) = self.keys(set)? else {
                differences.push(format!("set {set}: missing from the kernel"));
                continue;
            };
            let kernel: std::collections::BTreeMap<String, Vec<u8>> =
                kernel.into_iter().map(|key| (hex(&key), key)).collect();
            for (key, item) in items {
                if !kernel.contains_key(key) {
                    differences.push(format!("set {set}: missing {item}"));
                }
            }
            for (key, bytes) in kernel.iter().filter(|(key, _)| !items.contains_key(*key)) {
                let extra = message::service_port_of_key(bytes)
                    .map_or_else(|| key.clone(), |port| port.to_string());
                differences.push(format!("set {set}: extra {extra}"));
            }
        }
        Ok(differences)
    }

    /// The keys of the elements of `set` in the kernel; `None` if it does not exist.
    fn keys(&mut self, set: &str) -> Result<Option<Vec<Vec<u8>>>> {
        self.netlink(|socket| socket.keys(set))
            .map_err(|err| Error::Netlink { operation: "read", source: Box::new(err) })
    }

    /// Deletes the table, if it exists.
    pub async fn remove(&mut self) -> Result<()> {
        self.run("remove", &ruleset::remove()).await?;
        self.applied = None;
        Ok(())
    }
}

/// The elements of each set and map of the table (the localhost endpoint maps aside), by
/// set name: each element's key as the kernel stores it, in hex, with the element as people
/// read it. What [`Netfilter::differences`] compares the kernel with.
pub type ExpectedKeys =
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>;

/// The [`ExpectedKeys`] of `elements`.
pub fn expected_keys(elements: &Elements) -> ExpectedKeys {
    let keyed = |items: &mut dyn Iterator<Item = elements::Item>| {
        items.map(|item| (hex(&message::key(&item)), item.to_string())).collect()
    };
    let mut expected: ExpectedKeys = elements::contents(elements)
        .into_iter()
        .map(|(set, items)| (set, keyed(&mut items.into_iter())))
        .collect();
    for (map, entries) in elements::mark_maps(elements) {
        expected.insert(map, keyed(&mut entries.into_iter().map(|(item, _)| item)));
    }
    expected
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The table as `nft list table inet kube-ipvs` prints it, for people to read.
pub async fn listing() -> Result<String> {
    let out = tokio::process::Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .output()
        .await
        .map_err(Error::Spawn)?;
    if !out.status.success() {
        return Err(Error::List { stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
