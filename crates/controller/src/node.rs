//! The whole node: the netfilter table, kube-ipvs0 and IPVS, moved to a desired state together.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use dummy_link::DummyLink;
use ipvs_netlink::{Change, Operation, ServiceKey};
use netfilter::Netfilter;
use tracing::{debug, warn};

use crate::{
    Error,
    changes::Scope,
    desired::DesiredState,
    reconcile::{KernelDigests, Owned, Ownership, Reconciler, Servers, SyncReport, read_digests},
};

/// The node's kernel state as the daemon's loop drives it: [`NodeSync`] on a real node, a
/// fake in the loop's unit tests.
pub trait NodeIo {
    /// Moves the node to `desired`, comparing what `scope` names (see [`NodeSync::apply`]).
    fn apply(
        &mut self,
        desired: &DesiredState,
        scope: &Scope,
    ) -> impl Future<Output = Result<Applied, Error>> + Send;

    /// Starts a full check whose IPVS dump is read elsewhere (see
    /// [`Reconciler::begin_check`]).
    fn begin_check(&mut self);

    /// Ends the full check with the dumped digests, and heals every difference (see
    /// [`NodeSync::finish_check`]).
    fn finish_check(
        &mut self,
        desired: &DesiredState,
        owned: &Owned,
        digests: KernelDigests,
    ) -> impl Future<Output = Result<Healed, Error>> + Send;

    /// Deletes the draining destinations that are done. Returns how many.
    fn drain(&mut self) -> impl Future<Output = Result<usize, Error>> + Send;

    /// How many destinations are draining.
    fn draining(&self) -> usize;

    /// The draining destinations.
    fn draining_destinations(&self) -> Vec<(ServiceKey, SocketAddr)>;

    /// The virtual servers kube-ipvs owns in the kernel, as last written.
    fn owned(&self) -> Vec<ServiceKey>;

    /// The addresses bound to kube-ipvs0.
    fn service_addresses(&self) -> impl Future<Output = Result<BTreeSet<IpAddr>, Error>> + Send;

    /// How many IPVS messages of each kind were sent since the start.
    fn sent_messages(&self) -> impl Future<Output = HashMap<Operation, u64>> + Send;
}

impl NodeIo for NodeSync {
    async fn apply(&mut self, desired: &DesiredState, scope: &Scope) -> Result<Applied, Error> {
        NodeSync::apply(self, desired, scope).await
    }

    fn begin_check(&mut self) {
        self.reconciler.begin_check();
    }

    async fn finish_check(
        &mut self,
        desired: &DesiredState,
        owned: &Owned,
        digests: KernelDigests,
    ) -> Result<Healed, Error> {
        NodeSync::finish_check(self, desired, owned, digests).await
    }

    async fn drain(&mut self) -> Result<usize, Error> {
        Ok(self.reconciler.drain().await?.len())
    }

    fn draining(&self) -> usize {
        self.reconciler.draining().count()
    }

    fn draining_destinations(&self) -> Vec<(ServiceKey, SocketAddr)> {
        self.reconciler.draining().copied().collect()
    }

    fn owned(&self) -> Vec<ServiceKey> {
        self.reconciler.shadow().keys().copied().collect()
    }

    async fn service_addresses(&self) -> Result<BTreeSet<IpAddr>, Error> {
        Ok(self.link.addresses().await?)
    }

    async fn sent_messages(&self) -> HashMap<Operation, u64> {
        self.reconciler.ipvs().sent_messages().await
    }
}

/// What [`NodeSync::apply`] did.
#[derive(Debug)]
pub struct Applied {
    /// The netfilter table.
    pub netfilter: netfilter::Update,
    /// kube-ipvs0's addresses.
    pub addresses: dummy_link::SyncReport,
    /// IPVS.
    pub ipvs: SyncReport,
}

/// What [`NodeSync::full_check`] found and healed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Healed {
    /// The netfilter table was rewritten (deleted or flushed behind our back).
    pub netfilter: bool,
    /// Addresses bound again to kube-ipvs0 (or unbound).
    pub addresses: usize,
    /// Virtual servers that differed from what was programmed.
    pub virtual_servers: usize,
}

impl Healed {
    /// Whether anything had drifted.
    pub fn any(&self) -> bool {
        self.netfilter || self.addresses > 0 || self.virtual_servers > 0
    }
}

/// The node's kernel state kube-ipvs owns.
#[derive(Debug)]
pub struct NodeSync {
    /// IPVS.
    pub reconciler: Reconciler,
    /// kube-ipvs0.
    pub link: DummyLink,
    /// The netfilter table.
    pub netfilter: Netfilter,
}

impl NodeSync {
    /// Moves the node to `desired`: by the delta of [`Scope::Changed`] (the virtual servers and
    /// elements that changed) or, with [`Scope::Everything`], by comparing everything. The masquerade rules go first and the virtual
    /// servers last, so no virtual server is ever reachable before its replies can be
    /// masqueraded (kubernetes#133773). kube-ipvs0's addresses are synced when the Service
    /// addresses changed; [`NodeSync::full_check`] repairs them whatever happened.
    pub async fn apply(&mut self, desired: &DesiredState, scope: &Scope) -> Result<Applied, Error> {
        let started = std::time::Instant::now();
        // The addresses follow the Service addresses, which most changes (endpoints) leave
        // alone: then the link is not read at all. The full check reads it every time.
        let (netfilter, addresses_changed) = match scope {
            Scope::Changed(delta) => {
                let update = self
                    .netfilter
                    .apply_delta(&delta.removed, &delta.added, &desired.elements)
                    .await?;
                (update, delta.addresses_changed())
            }
            Scope::Everything => {
                let changed = self
                    .netfilter
                    .applied()
                    .is_none_or(|applied| applied.vips != desired.elements.vips);
                (self.netfilter.update(&desired.elements).await?, changed)
            }
        };
        let netfilter_done = started.elapsed();
        let addresses = if addresses_changed {
            self.link.sync(&desired.elements.vips).await
        } else {
            dummy_link::SyncReport::default()
        };
        for err in &addresses.failed {
            warn!(%err, "kube-ipvs0 address not synced");
        }
        let addresses_done = started.elapsed();
        let servers = match scope {
            Scope::Changed(delta) => Servers::Only(&delta.keys),
            Scope::Everything => Servers::All,
        };
        let ipvs = self.reconciler.sync(&desired.virtual_servers, servers).await;
        debug!(
            netfilter_us = netfilter_done.as_micros() as u64,
            addresses_us = (addresses_done - netfilter_done).as_micros() as u64,
            ipvs_us = (started.elapsed() - addresses_done).as_micros() as u64,
            "applied"
        );
        Ok(Applied { netfilter, addresses, ipvs })
    }

    /// The periodic check: compares the table, the addresses and the IPVS table with what was
    /// programmed, and heals every difference.
    pub async fn full_check(
        &mut self,
        desired: &DesiredState,
        ownership: &dyn Ownership,
    ) -> Result<Healed, Error> {
        let digests = read_digests(&self.reconciler.begin_check()).await.map_err(Error::Ipvs)?;
        self.finish_check(desired, ownership, digests).await
    }

    /// The periodic check, with the IPVS table dumped elsewhere since
    /// [`Reconciler::begin_check`] (reading a large table takes long; syncs go on meanwhile).
    pub async fn finish_check(
        &mut self,
        desired: &DesiredState,
        ownership: &dyn Ownership,
        digests: KernelDigests,
    ) -> Result<Healed, Error> {
        let started = std::time::Instant::now();
        // Elements left in place to keep syncs fast are deleted now.
        self.netfilter.flush().await?;
        let netfilter = self.netfilter.check().await?;
        let netfilter_done = started.elapsed();
        let addresses = self.link.sync(&desired.elements.vips).await;
        let addresses_done = started.elapsed();
        let drift = self.reconciler.finish_check(digests, ownership).await;
        let read_done = started.elapsed();
        self.reconciler.sync(&desired.virtual_servers, Servers::All).await;
        debug!(
            netfilter_us = netfilter_done.as_micros() as u64,
            addresses_us = (addresses_done - netfilter_done).as_micros() as u64,
            ipvs_compare_us = (read_done - addresses_done).as_micros() as u64,
            ipvs_sync_us = (started.elapsed() - read_done).as_micros() as u64,
            "checked"
        );
        let healed = Healed {
            netfilter,
            addresses: addresses.added.len() + addresses.removed.len(),
            virtual_servers: drift.servers.len(),
        };
        if healed.any() {
            warn!(?healed, "healed drift of the node's state");
        }
        Ok(healed)
    }
}

/// What [`clean_up`] removed.
#[derive(Debug, Default)]
pub struct CleanedUp {
    /// Virtual servers deleted.
    pub virtual_servers: usize,
    /// Virtual servers the kernel refused to delete.
    pub failed: Vec<ipvs_netlink::Error>,
    /// kube-ipvs0 existed and was deleted.
    pub link: bool,
}

/// Removes everything kube-ipvs owns from the node (`kube-ipvs cleanup`): the virtual servers
/// [`Owned`] claims (those on the Service ports its netfilter table lists, and outside
/// `exclude_cidrs` those on kube-ipvs0's addresses, on the node's addresses within
/// `node_port_range`, and the firewall-mark ones of `externalTrafficPolicy: Local`), then
/// kube-ipvs0 and the netfilter table. Everything else is left alone.
pub async fn clean_up(
    node_port_range: std::ops::RangeInclusive<u16>,
    exclude_cidrs: Vec<ipnetwork::IpNetwork>,
) -> Result<CleanedUp, Error> {
    let handle = dummy_link::connect()?;
    let link = DummyLink::find(handle.clone(), dummy_link::KUBE_IPVS0).await?;
    let service_addresses = match &link {
        Some(link) => link.addresses().await?,
        None => BTreeSet::new(),
    };
    let node_addresses = dummy_link::local_addresses(handle, dummy_link::KUBE_IPVS0).await?;
    let mut netfilter = Netfilter::new(netfilter::Config::default());
    let service_ports = netfilter.programmed_service_ports()?;
    let owned = Owned::new(
        service_ports,
        service_addresses,
        node_addresses,
        node_port_range,
        exclude_cidrs,
    );
    let ipvs = ipvs_netlink::IpvsHandle::new()?;
    let deletions: Vec<Change> = ipvs
        .list_services()
        .await?
        .into_iter()
        .map(|entry| entry.service.key)
        .filter(|key| owned.owns(key))
        .map(Change::DeleteService)
        .collect();
    let mut report = CleanedUp::default();
    for result in ipvs.apply(&deletions).await {
        match result {
            Ok(_) => report.virtual_servers += 1,
            Err(err) => report.failed.push(err),
        }
    }
    if let Some(link) = link {
        link.delete().await?;
        report.link = true;
    }
    netfilter.remove().await?;
    Ok(report)
}
