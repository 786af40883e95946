//! Moving the kernel's IPVS table to the desired state, incrementally.
//!
//! The [`Reconciler`] keeps a shadow of the virtual servers it owns. It starts from the kernel
//! ([`Reconciler::adopt`]): what already matches is kept as it is, so restarting over a
//! programmed node writes nothing and disturbs no connection. [`Reconciler::sync`] then applies
//! only the difference for the virtual servers it is given, through one pipelined batch.
//! [`Reconciler::full_check`] compares the kernel with the shadow and heals drift.
//! [`Reconciler::drain`] deletes draining destinations whose connections ended or whose time
//! bound elapsed.

mod diff;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use ipvs_netlink::{Change, IpvsHandle, Protocol, ServiceKey};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use self::diff::{KernelDigests, KernelServer, KernelState, Plan, config_digest, drains, plan};
use crate::{
    Error,
    desired::{Destinations, LOCAL_MARK_BASE, LOCAL_MARK_SPACE, VirtualServer},
};

/// Which virtual servers are kube-ipvs's: the others are never touched. Shared by reference
/// across the awaits of a check, so `Sync`.
pub trait Ownership: Sync {
    /// Whether kube-ipvs owns the virtual server with this key.
    fn owns(&self, key: &ServiceKey) -> bool;
}

impl<F: Fn(&ServiceKey) -> bool + Sync> Ownership for F {
    fn owns(&self, key: &ServiceKey) -> bool {
        self(key)
    }
}

/// kube-ipvs's own virtual servers: those on a Service port kube-ipvs programmed (its netfilter
/// table lists them, whatever the address: a ClusterIP, an external IP or load-balancer
/// address that is one of the node's own); and, outside `--ipvs-exclude-cidrs`, those on
/// Service addresses (kube-ipvs0's), those on NodePort addresses within the NodePort range,
/// and the firewall-mark ones of `externalTrafficPolicy: Local`.
///
/// So `--ipvs-exclude-cidrs` means what it means to kube-proxy: the virtual servers in those
/// CIDRs that kube-ipvs did not create are never touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The Service ports kube-ipvs programmed: at start, those its netfilter table in the
    /// kernel lists (`Netfilter::programmed_service_ports`); later, the desired ones.
    pub service_ports: BTreeSet<netfilter::ServicePort>,
    /// Addresses bound to kube-ipvs0, and those about to be.
    pub service_addresses: BTreeSet<std::net::IpAddr>,
    /// Addresses NodePorts are served on.
    pub node_port_addresses: BTreeSet<std::net::IpAddr>,
    /// The NodePort range (`--service-node-port-range`, 30000-32767).
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// `--ipvs-exclude-cidrs`.
    pub exclude_cidrs: Vec<ipnetwork::IpNetwork>,
}

impl Owned {
    /// kube-ipvs's virtual servers: those on `service_ports`, and outside `exclude_cidrs` those
    /// on `service_addresses` and those in `node_port_range` on `node_port_addresses` or on
    /// 127.0.0.1 (where NodePorts are served when localhost NodePorts are on, and were by the
    /// last run when they were).
    pub fn new(
        service_ports: BTreeSet<netfilter::ServicePort>,
        service_addresses: BTreeSet<std::net::IpAddr>,
        node_port_addresses: impl IntoIterator<Item = std::net::IpAddr>,
        node_port_range: std::ops::RangeInclusive<u16>,
        exclude_cidrs: Vec<ipnetwork::IpNetwork>,
    ) -> Self {
        let mut node_port_addresses: BTreeSet<_> = node_port_addresses.into_iter().collect();
        node_port_addresses.insert(std::net::Ipv4Addr::LOCALHOST.into());
        Self {
            service_ports,
            service_addresses,
            node_port_addresses,
            node_port_range,
            exclude_cidrs,
        }
    }
}

impl Ownership for Owned {
    fn owns(&self, key: &ServiceKey) -> bool {
        match key {
            ServiceKey::Inet { protocol, address } => {
                let ip = address.ip();
                let port = netfilter::ServicePort::new(ip, *protocol, address.port());
                self.service_ports.contains(&port)
                    || !self.exclude_cidrs.iter().any(|cidr| cidr.contains(ip))
                        && (self.service_addresses.contains(&ip)
                            || (self.node_port_addresses.contains(&ip)
                                && self.node_port_range.contains(&address.port())))
            }
            ServiceKey::Fwmark { mark, .. } => {
                (LOCAL_MARK_BASE..LOCAL_MARK_BASE + LOCAL_MARK_SPACE).contains(mark)
            }
        }
    }
}

/// Which virtual servers a [`Reconciler::sync`] compares.
#[derive(Debug, Clone, Copy)]
pub enum Servers<'a> {
    /// Every one of the shadow and of the desired state.
    All,
    /// Only these (those a delta names).
    Only(&'a BTreeSet<ServiceKey>),
}

/// What one [`Reconciler::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Changes the kernel accepted.
    pub applied: usize,
    /// Changes it refused; their virtual servers were read again and the changes planned anew
    /// and tried once more.
    pub failed: Vec<ipvs_netlink::Error>,
    /// Changes that succeeded on that second try.
    pub retried: usize,
    /// Conntrack flows of removed UDP destinations that were deleted.
    pub stale_flows_deleted: usize,
}

/// What one [`Reconciler::full_check`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Virtual servers that differed from the shadow (missing, extra, or changed).
    pub servers: Vec<ServiceKey>,
}

/// How many changes a sync plans and sends at a time: eight windows of the socket, and a few
/// hundred KiB of changes, requests and results held at once, however large the sync.
const APPLY_CHUNK: usize = 1024;

/// The kernel side of kube-ipvs: a shadow of the owned IPVS table and the changes that move it.
#[derive(Debug)]
pub struct Reconciler {
    ipvs: IpvsHandle,
    shadow: KernelState,
    draining: BTreeMap<(ServiceKey, SocketAddr), Instant>,
    drain_bound: Duration,
    /// While a check's dump is being read: the virtual servers written since it began, whose
    /// dumped state may be older than the shadow's.
    touched: Option<BTreeSet<ServiceKey>>,
}

/// Reads the whole IPVS table (every virtual server, whoever owns it), each virtual server
/// converted as soon as it is read: statistics are dropped on the way, so a large table is
/// never held in its full form.
pub async fn read_kernel(ipvs: &IpvsHandle) -> Result<KernelState, ipvs_netlink::Error> {
    let servers = ipvs
        .dump_with(|service, destinations| {
            let server = kernel_server(service, destinations);
            (server.service.key, server)
        })
        .await?;
    Ok(servers.into_iter().collect())
}

/// Reads the digest of every virtual server in the kernel (whoever owns it), for
/// [`Reconciler::finish_check`]: each is digested as soon as it is read, so the table is never
/// held whole.
pub async fn read_digests(ipvs: &IpvsHandle) -> Result<KernelDigests, ipvs_netlink::Error> {
    let digests = ipvs
        .dump_with(|service, mut destinations| {
            // In address order, as the shadow holds them; the kernel has one per address.
            destinations.sort_unstable_by_key(|d| d.destination.address);
            let digest = config_digest(&service, destinations.iter().map(|d| &d.destination));
            (service.key, digest)
        })
        .await?;
    Ok(digests.into_iter().collect())
}

/// A virtual server as read from the kernel, without statistics.
fn kernel_server(
    service: ipvs_netlink::VirtualService,
    destinations: Vec<ipvs_netlink::DestinationEntry>,
) -> KernelServer {
    KernelServer {
        service: Arc::new(service),
        destinations: destinations.into_iter().map(|d| d.destination).collect(),
    }
}

fn owned_state(mut table: KernelState, ownership: &dyn Ownership) -> KernelState {
    table.retain(|key, _| ownership.owns(key));
    table
}

impl Reconciler {
    /// Reads the kernel once and takes the virtual servers `ownership` claims as the shadow.
    /// Draining destinations (weight 0) found there go on draining, with a fresh time bound.
    pub async fn adopt(
        ipvs: IpvsHandle,
        ownership: &dyn Ownership,
        drain_bound: Duration,
    ) -> Result<Self, Error> {
        let shadow = owned_state(read_kernel(&ipvs).await.map_err(Error::Ipvs)?, ownership);
        let now = Instant::now();
        let draining = shadow
            .iter()
            .flat_map(|(key, server)| {
                server
                    .destinations
                    .iter()
                    .filter(|d| d.weight == 0)
                    .map(move |d| ((*key, d.address), now))
            })
            .collect();
        info!(virtual_servers = shadow.len(), "adopted the IPVS table");
        Ok(Self { ipvs, shadow, draining, drain_bound, touched: None })
    }

    /// The IPVS handle it writes through (for its message counts).
    pub fn ipvs(&self) -> &IpvsHandle {
        &self.ipvs
    }

    /// The shadow: what this reconciler believes the kernel holds.
    pub fn shadow(&self) -> &KernelState {
        &self.shadow
    }

    /// Destinations draining, with when they started.
    pub fn draining(&self) -> impl Iterator<Item = &(ServiceKey, SocketAddr)> {
        self.draining.keys()
    }

    /// Applies the difference for the virtual servers `servers` names.
    pub async fn sync(
        &mut self,
        desired: &BTreeMap<ServiceKey, Arc<VirtualServer>>,
        servers: Servers<'_>,
    ) -> SyncReport {
        let all: BTreeSet<ServiceKey>;
        let keys = match servers {
            Servers::Only(keys) => keys,
            Servers::All => {
                all = self.shadow.keys().chain(desired.keys()).copied().collect();
                &all
            }
        };
        let mut report = SyncReport::default();
        let mut draining = Vec::new();
        let mut reread = BTreeSet::new();
        let mut removed_udp = Vec::new();
        let mut keys = keys.iter().peekable();
        while keys.peek().is_some() {
            // A bounded number of changes at a time: a first sync of a large cluster never
            // holds all its changes, requests and results at once.
            let mut changes = Vec::new();
            let mut planned = Vec::new();
            while changes.len() < APPLY_CHUNK
                && let Some(key) = keys.next()
            {
                let plan = plan(*key, self.shadow.get(key), desired.get(key).map(AsRef::as_ref));
                changes.extend(plan.changes);
                draining.extend(plan.draining);
                planned.push(*key);
            }
            if changes.is_empty() {
                self.share_desired(&planned, desired);
                continue;
            }
            let results = self.ipvs.apply(&changes).await;
            for (change, result) in changes.iter().zip(results) {
                match result {
                    Ok(()) => {
                        report.applied += 1;
                        self.record(change);
                        if let Change::DeleteDestination(
                            ServiceKey::Inet { protocol: Protocol::Udp, address },
                            endpoint,
                        ) = change
                        {
                            removed_udp.push((*address, *endpoint));
                        }
                    }
                    Err(err) => {
                        warn!(%err, "IPVS change failed; reading the virtual server again");
                        let key = change.target().service.expect("every change names its service");
                        reread.insert(key);
                        report.failed.push(err);
                    }
                }
            }
            self.share_desired(&planned, desired);
        }
        let now = Instant::now();
        for entry in draining {
            self.draining.entry(entry).or_insert(now);
        }
        for key in &reread {
            self.reread(*key).await;
        }
        if !reread.is_empty() {
            // Once more, from what the kernel really holds; what still fails waits for the next sync.
            let retry: Vec<Change> = reread
                .iter()
                .flat_map(|key| {
                    plan(*key, self.shadow.get(key), desired.get(key).map(AsRef::as_ref)).changes
                })
                .collect();
            for (change, result) in retry.iter().zip(self.ipvs.apply(&retry).await) {
                match result {
                    Ok(()) => {
                        report.applied += 1;
                        report.retried += 1;
                        self.record(change);
                    }
                    Err(err) => warn!(%err, "IPVS change failed again"),
                }
            }
        }
        if !removed_udp.is_empty() {
            // Clients that keep sending from the same port would stay stuck to the gone endpoint.
            match tokio::task::spawn_blocking(move || conntrack::delete_stale_udp(&removed_udp))
                .await
            {
                Ok(Ok(deleted)) => report.stale_flows_deleted = deleted,
                Ok(Err(err)) => warn!(%err, "cannot delete stale UDP conntrack flows"),
                Err(err) => warn!(%err, "stale UDP conntrack cleanup did not finish"),
            }
        }
        debug!(applied = report.applied, failed = report.failed.len(), "synced IPVS");
        report
    }

    /// Where the shadow of a virtual server of `keys` has exactly its desired destinations,
    /// or service, it holds the desired ones rather than its own copy (a change to either
    /// copies them).
    fn share_desired(
        &mut self,
        keys: &[ServiceKey],
        desired: &BTreeMap<ServiceKey, Arc<VirtualServer>>,
    ) {
        for key in keys {
            let (Some(server), Some(wanted)) = (self.shadow.get_mut(key), desired.get(key)) else {
                continue;
            };
            if !server.destinations.shared_with(&wanted.destinations)
                && server.destinations == wanted.destinations
            {
                server.destinations = wanted.destinations.clone();
            }
            if !Arc::ptr_eq(&server.service, &wanted.service) && server.service == wanted.service {
                server.service = wanted.service.clone();
            }
        }
    }

    /// Updates the shadow after the kernel accepted `change`.
    fn record(&mut self, change: &Change) {
        if let (Some(touched), Some(key)) = (&mut self.touched, change.target().service) {
            touched.insert(key);
        }
        match change {
            Change::AddService(service) | Change::UpdateService(service) => {
                let service = Arc::new(service.clone());
                let server = self.shadow.entry(service.key).or_insert_with(|| KernelServer {
                    service: service.clone(),
                    destinations: Destinations::new(),
                });
                server.service = service;
            }
            Change::DeleteService(key) => {
                self.shadow.remove(key);
                self.draining.retain(|(k, _), _| k != key);
            }
            Change::AddDestination(key, destination)
            | Change::UpdateDestination(key, destination) => {
                if let Some(server) = self.shadow.get_mut(key) {
                    server.destinations.insert(*destination);
                }
                if destination.weight != 0 {
                    self.draining.remove(&(*key, destination.address));
                }
            }
            Change::DeleteDestination(key, address) => {
                if let Some(server) = self.shadow.get_mut(key) {
                    server.destinations.remove(address);
                }
                self.draining.remove(&(*key, *address));
            }
        }
    }

    /// Reads one virtual server from the kernel into the shadow.
    async fn reread(&mut self, key: ServiceKey) {
        if let Some(touched) = &mut self.touched {
            touched.insert(key);
        }
        match self.ipvs.get_service(&key).await {
            Ok(entry) => match self.ipvs.list_destinations(&key).await {
                Ok(destinations) => {
                    self.shadow.insert(key, kernel_server(entry.service, destinations));
                }
                Err(err) => {
                    warn!(%err, "cannot read the destinations back; forgetting the virtual server")
                }
            },
            Err(ipvs_netlink::Error::NoSuchService { .. }) => {
                self.shadow.remove(&key);
            }
            Err(err) => warn!(%err, "cannot read the virtual server back"),
        }
    }

    /// Reads the kernel and compares it with the shadow; the kernel's state becomes the shadow,
    /// so the next [`Reconciler::sync`] with `keys: None` heals every difference.
    pub async fn full_check(&mut self, ownership: &dyn Ownership) -> Result<Drift, Error> {
        let ipvs = self.begin_check();
        let digests = read_digests(&ipvs).await.map_err(Error::Ipvs)?;
        Ok(self.finish_check(digests, ownership).await)
    }

    /// Starts a check whose dump is read elsewhere (so that syncs go on meanwhile): returns
    /// the handle to dump with, and from now on notes which virtual servers are written.
    pub fn begin_check(&mut self) -> IpvsHandle {
        self.touched = Some(BTreeSet::new());
        self.ipvs.clone()
    }

    /// Compares the digests of a dump taken since [`Reconciler::begin_check`]
    /// ([`read_digests`]) with the shadow. Where they differ, the kernel's state becomes the
    /// shadow: a virtual server gone from the kernel leaves it, one changed or added is read
    /// again. The virtual servers written while the dump was read are left out: their shadow
    /// is newer than the dump.
    pub async fn finish_check(
        &mut self,
        mut digests: KernelDigests,
        ownership: &dyn Ownership,
    ) -> Drift {
        digests.retain(|key, _| ownership.owns(key));
        let touched = self.touched.take().unwrap_or_default();
        let keys: BTreeSet<ServiceKey> =
            digests.keys().chain(self.shadow.keys()).copied().collect();
        let mut drift = Drift::default();
        for key in keys {
            if touched.contains(&key) {
                continue;
            }
            let same = match (digests.get(&key), self.shadow.get(&key)) {
                (Some(digest), Some(shadow)) => *digest == shadow.config_digest(),
                _ => false,
            };
            if !same {
                drift.servers.push(key);
            }
        }
        for key in &drift.servers {
            if digests.contains_key(key) {
                self.reread(*key).await;
            } else {
                self.shadow.remove(key);
            }
        }
        if !drift.servers.is_empty() {
            warn!(
                virtual_servers = drift.servers.len(),
                "the IPVS table drifted from what was programmed"
            );
        }
        drift
    }

    /// Deletes draining destinations that have no connections left, or whose time bound
    /// elapsed; returns those deleted.
    pub async fn drain(&mut self) -> Result<Vec<(ServiceKey, SocketAddr)>, Error> {
        let services: BTreeSet<ServiceKey> = self.draining.keys().map(|(k, _)| *k).collect();
        let mut done = Vec::new();
        for key in services {
            let destinations = match self.ipvs.list_destinations(&key).await {
                Ok(destinations) => destinations,
                Err(ipvs_netlink::Error::NoSuchService { .. }) => {
                    self.draining.retain(|(k, _), _| *k != key);
                    continue;
                }
                Err(err) => return Err(Error::Ipvs(err)),
            };
            for entry in destinations {
                let id = (key, entry.destination.address);
                let Some(since) = self.draining.get(&id) else { continue };
                let idle = entry.active_connections + entry.inactive_connections == 0;
                if idle || since.elapsed() >= self.drain_bound {
                    done.push(id);
                }
            }
        }
        if done.is_empty() {
            return Ok(done);
        }
        let changes: Vec<Change> =
            done.iter().map(|(k, a)| Change::DeleteDestination(*k, *a)).collect();
        for (change, result) in changes.iter().zip(self.ipvs.apply(&changes).await) {
            match result {
                Ok(()) | Err(ipvs_netlink::Error::NoSuchDestination { .. }) => self.record(change),
                Err(err) => warn!(%err, "cannot delete a drained destination"),
            }
        }
        info!(destinations = done.len(), "drained destinations deleted");
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_covers_programmed_ports_service_addresses_node_ports_and_our_marks_only() {
        let programmed = |text: &str| {
            let address: std::net::SocketAddr = text.parse().unwrap();
            netfilter::ServicePort::new(address.ip(), Protocol::Tcp, address.port())
        };
        let owned = Owned {
            // An external IP that is the node's address, and a ClusterIP in an excluded CIDR,
            // both programmed by kube-ipvs.
            service_ports: [programmed("192.168.99.2:8080"), programmed("10.96.0.11:53")].into(),
            service_addresses: ["10.96.0.10".parse().unwrap(), "10.96.0.11".parse().unwrap()]
                .into(),
            node_port_addresses: ["192.168.99.2".parse().unwrap()].into(),
            node_port_range: 30000..=32767,
            exclude_cidrs: vec!["10.96.0.0/28".parse().unwrap()],
        };
        let tcp = |s: &str| ServiceKey::tcp(s.parse().unwrap());
        assert!(owned.owns(&tcp("192.168.99.2:30080")));
        assert!(!owned.owns(&tcp("192.168.99.2:22")), "outside the NodePort range");
        assert!(owned.owns(&tcp("192.168.99.2:8080")), "a node address programmed as a VIP");
        assert!(!owned.owns(&tcp("192.168.99.2:8081")), "the same address, another port");
        assert!(!owned.owns(&tcp("10.96.0.10:80")), "excluded, not programmed by kube-ipvs");
        assert!(owned.owns(&tcp("10.96.0.11:53")), "excluded, but programmed by kube-ipvs");
        assert!(!owned.owns(&ServiceKey::Inet {
            protocol: Protocol::Udp,
            address: "10.96.0.11:53".parse().unwrap()
        }));
        assert!(!owned.owns(&tcp("192.0.2.1:80")), "someone else's");
        let mark = |mark| ServiceKey::Fwmark { family: ipvs_netlink::Family::Ipv4, mark };
        assert!(owned.owns(&mark(LOCAL_MARK_BASE + 7)));
        assert!(!owned.owns(&mark(7)));
    }
}
