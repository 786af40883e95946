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
    time::Duration,
};

use ipvs_netlink::{Change, IpvsHandle, Protocol, ServiceKey};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use self::diff::{KernelServer, KernelState, Plan, drains, plan};
use crate::desired::VirtualServer;

/// A failure to read the kernel's IPVS table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// IPVS could not be read.
    #[error("reading the IPVS table: {0}")]
    Ipvs(#[from] ipvs_netlink::Error),
}

/// Which virtual servers are kube-ipvs's: the others are never touched.
pub trait Ownership {
    /// Whether kube-ipvs owns the virtual server with this key.
    fn owns(&self, key: &ServiceKey) -> bool;
}

impl<F: Fn(&ServiceKey) -> bool> Ownership for F {
    fn owns(&self, key: &ServiceKey) -> bool {
        self(key)
    }
}

/// What one [`Reconciler::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Changes the kernel accepted.
    pub applied: usize,
    /// Changes it refused; their virtual servers were read again.
    pub failed: Vec<ipvs_netlink::Error>,
    /// Conntrack flows of removed UDP destinations that were deleted.
    pub stale_flows_deleted: usize,
}

/// What one [`Reconciler::full_check`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Virtual servers that differed from the shadow (missing, extra, or changed).
    pub servers: Vec<ServiceKey>,
}

/// The kernel side of kube-ipvs: a shadow of the owned IPVS table and the changes that move it.
#[derive(Debug)]
pub struct Reconciler {
    ipvs: IpvsHandle,
    shadow: KernelState,
    draining: BTreeMap<(ServiceKey, SocketAddr), Instant>,
    drain_bound: Duration,
}

fn owned_state(
    table: Vec<(ipvs_netlink::ServiceEntry, Vec<ipvs_netlink::DestinationEntry>)>,
    ownership: &dyn Ownership,
) -> KernelState {
    table
        .into_iter()
        .filter(|(service, _)| ownership.owns(&service.service.key))
        .map(|(service, destinations)| {
            let server = KernelServer {
                service: service.service,
                destinations: destinations
                    .into_iter()
                    .map(|d| (d.destination.address, d.destination))
                    .collect(),
            };
            (server.service.key, server)
        })
        .collect()
}

impl Reconciler {
    /// Reads the kernel once and takes the virtual servers `ownership` claims as the shadow.
    /// Draining destinations (weight 0) found there go on draining, with a fresh time bound.
    pub async fn adopt(
        ipvs: IpvsHandle,
        ownership: &dyn Ownership,
        drain_bound: Duration,
    ) -> Result<Self, Error> {
        let shadow = owned_state(ipvs.dump().await?, ownership);
        let now = Instant::now();
        let draining = shadow
            .iter()
            .flat_map(|(key, server)| {
                server
                    .destinations
                    .values()
                    .filter(|d| d.weight == 0)
                    .map(move |d| ((*key, d.address), now))
            })
            .collect();
        info!(virtual_servers = shadow.len(), "adopted the IPVS table");
        Ok(Self { ipvs, shadow, draining, drain_bound })
    }

    /// The shadow: what this reconciler believes the kernel holds.
    pub fn shadow(&self) -> &KernelState {
        &self.shadow
    }

    /// Destinations draining, with when they started.
    pub fn draining(&self) -> impl Iterator<Item = &(ServiceKey, SocketAddr)> {
        self.draining.keys()
    }

    /// Applies the difference for the virtual servers `keys` (all of the shadow and of
    /// `desired` when `None`).
    pub async fn sync(
        &mut self,
        desired: &BTreeMap<ServiceKey, VirtualServer>,
        keys: Option<&BTreeSet<ServiceKey>>,
    ) -> SyncReport {
        let all: BTreeSet<ServiceKey>;
        let keys = match keys {
            Some(keys) => keys,
            None => {
                all = self.shadow.keys().chain(desired.keys()).copied().collect();
                &all
            }
        };
        let mut changes = Vec::new();
        let mut draining = Vec::new();
        for key in keys {
            let plan = plan(*key, self.shadow.get(key), desired.get(key));
            changes.extend(plan.changes);
            draining.extend(plan.draining);
        }
        let mut report = SyncReport::default();
        if changes.is_empty() {
            return report;
        }
        let results = self.ipvs.apply(&changes).await;
        let mut reread = BTreeSet::new();
        let mut removed_udp = Vec::new();
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
                    reread.insert(change.target().service.expect("every change names its service"));
                    report.failed.push(err);
                }
            }
        }
        let now = Instant::now();
        for entry in draining {
            self.draining.entry(entry).or_insert(now);
        }
        for key in reread {
            self.reread(key).await;
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

    /// Updates the shadow after the kernel accepted `change`.
    fn record(&mut self, change: &Change) {
        match change {
            Change::AddService(service) | Change::UpdateService(service) => {
                let server = self.shadow.entry(service.key).or_insert_with(|| KernelServer {
                    service: service.clone(),
                    destinations: BTreeMap::new(),
                });
                server.service = service.clone();
            }
            Change::DeleteService(key) => {
                self.shadow.remove(key);
                self.draining.retain(|(k, _), _| k != key);
            }
            Change::AddDestination(key, destination)
            | Change::UpdateDestination(key, destination) => {
                if let Some(server) = self.shadow.get_mut(key) {
                    server.destinations.insert(destination.address, *destination);
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
        match self.ipvs.get_service(&key).await {
            Ok(entry) => match self.ipvs.list_destinations(&key).await {
                Ok(destinations) => {
                    self.shadow.insert(
                        key,
                        KernelServer {
                            service: entry.service,
                            destinations: destinations
                                .into_iter()
                                .map(|d| (d.destination.address, d.destination))
                                .collect(),
                        },
                    );
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
        let kernel = owned_state(self.ipvs.dump().await?, ownership);
        let mut drift = Drift::default();
        for key in kernel.keys().chain(self.shadow.keys()).collect::<BTreeSet<_>>() {
            let same = match (kernel.get(key), self.shadow.get(key)) {
                (Some(k), Some(s)) => {
                    k.service.same_config(&s.service)
                        && k.destinations.len() == s.destinations.len()
                        && k.destinations
                            .iter()
                            .all(|(a, d)| s.destinations.get(a).is_some_and(|e| e.same_config(d)))
                }
                _ => false,
            };
            if !same {
                drift.servers.push(*key);
            }
        }
        if !drift.servers.is_empty() {
            warn!(
                virtual_servers = drift.servers.len(),
                "the IPVS table drifted from what was programmed"
            );
        }
        self.shadow = kernel;
        Ok(drift)
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
                Err(err) => return Err(err.into()),
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
