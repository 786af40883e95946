//! [`IpvsHandle`]: the async API over one netlink socket.

use std::{collections::HashMap, convert::identity, net::SocketAddr, sync::Arc};

use tokio::sync::Mutex;

use crate::{
    connection::{Connection, NetlinkSocket},
    error::{Error, Result},
    message::{IpvsAttribute, IpvsMessage},
    request::{Change, Operation, Request, Target},
    types::{
        Destination, DestinationEntry, Info, ServiceEntry, ServiceKey, Timeouts, VirtualService,
    },
};

/// The most sockets [`IpvsHandle::dump`] reads destinations over at once.
pub const DUMP_SOCKETS: usize = 4;
/// Below this many services per socket, another socket is not worth opening.
const MIN_SERVICES_PER_SOCKET: usize = 256;

/// A handle to the IPVS table of the network namespace it was opened in.
///
/// Cloning is cheap; clones share one socket and take turns on it. The IPVS family id is
/// resolved on first use and again when the kernel stops recognising it (the `ip_vs` module
/// was reloaded), so a handle opened before IPVS was loaded starts working once it is.
#[derive(Clone)]
pub struct IpvsHandle {
    connection: Shared,
    /// Further sockets for [`IpvsHandle::dump`]: one dump runs per socket at a time, so the
    /// per-service destination dumps are spread over these. They are opened with the handle,
    /// so they live in the same network namespace whatever thread dumps later.
    dump_connections: Arc<[Shared]>,
}

type Shared = Arc<Mutex<Connection<NetlinkSocket>>>;

fn open_connection(small_parts: bool) -> Result<Shared> {
    let socket = NetlinkSocket::open(small_parts)
        .map_err(|source| Error::Io { target: Target::new(Operation::ResolveFamily), source })?;
    Ok(Arc::new(Mutex::new(Connection::new(socket))))
}

impl std::fmt::Debug for IpvsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsHandle").finish_non_exhaustive()
    }
}

impl IpvsHandle {
    /// Opens a generic-netlink socket in the current network namespace. Must be called within
    /// a tokio runtime. Does not talk to the kernel yet, so it succeeds without IPVS.
    pub fn new() -> Result<Self> {
        Self::open(false)
    }

    /// Opens a handle as [`IpvsHandle::new`] does, whose sockets peek each datagram for its
    /// size and read it at that size (two system calls instead of one). The kernel sizes the
    /// parts of a dump by the largest read it has seen, so they stay at one page instead of
    /// 32 KiB; it fills each part holding the global genetlink and IPVS mutexes, so another
    /// socket's writes wait less behind a large dump read through this handle.
    pub fn with_small_dump_parts() -> Result<Self> {
        Self::open(true)
    }

    fn open(small_parts: bool) -> Result<Self> {
        let extra =
            std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, DUMP_SOCKETS) - 1;
        let open = || open_connection(small_parts);
        Ok(Self {
            connection: open()?,
            dump_connections: (0..extra).map(|_| open()).collect::<Result<_>>()?,
        })
    }

    /// Sets how many messages a batch puts in one `sendmsg` (default 128). The replies of one
    /// such chunk must fit the socket's receive buffer.
    pub async fn set_window(&self, window: usize) {
        self.connection.lock().await.set_window(window);
    }

    /// How many messages this handle has sent, by operation: what a caller that must prove it
    /// wrote nothing can count.
    pub async fn sent_messages(&self) -> HashMap<Operation, u64> {
        let mut total = HashMap::new();
        for connection in std::iter::once(&self.connection).chain(self.dump_connections.iter()) {
            for (operation, count) in &connection.lock().await.sent {
                *total.entry(*operation).or_default() += count;
            }
        }
        total
    }

    async fn execute(&self, request: Request) -> Result<Vec<IpvsMessage>> {
        self.connection.lock().await.execute(&request).await
    }

    async fn change(&self, change: Change) -> Result<()> {
        self.execute(Request::Change(change)).await.map(drop)
    }

    /// The IPVS version and connection table size (`ipvsadm --version`, `/proc/net/ip_vs`).
    pub async fn info(&self) -> Result<Info> {
        let request = Request::GetInfo;
        let mut version = None;
        let mut size = None;
        for attr in self.execute(request.clone()).await?.into_iter().flat_map(|m| m.attributes) {
            match attr {
                IpvsAttribute::InfoVersion(v) => version = Some(v),
                IpvsAttribute::InfoConnectionTableSize(v) => size = Some(v),
                _ => {}
            }
        }
        match (version, size) {
            (Some(version), Some(connection_table_size)) => {
                Ok(Info { version, connection_table_size })
            }
            _ => Err(malformed(&request, "the info reply lacks the version or table size")),
        }
    }

    /// Adds a virtual service.
    pub async fn add_service(&self, service: &VirtualService) -> Result<()> {
        self.change(Change::AddService(service.clone())).await
    }

    /// Changes an existing virtual service in place; its destinations and connections stay.
    pub async fn update_service(&self, service: &VirtualService) -> Result<()> {
        self.change(Change::UpdateService(service.clone())).await
    }

    /// Deletes a virtual service with its destinations.
    pub async fn delete_service(&self, key: &ServiceKey) -> Result<()> {
        self.change(Change::DeleteService(*key)).await
    }

    /// Reads one virtual service.
    pub async fn get_service(&self, key: &ServiceKey) -> Result<ServiceEntry> {
        let request = Request::GetService(*key);
        let mut connection = self.connection.lock().await;
        let services = connection.execute_each(&request, push_services(identity)).await?;
        services.into_iter().next().ok_or_else(|| malformed(&request, "the reply holds no service"))
    }

    /// Lists every virtual service of the namespace (a dump).
    pub async fn list_services(&self) -> Result<Vec<ServiceEntry>> {
        let request = Request::ListServices;
        self.connection.lock().await.execute_each(&request, push_services(identity)).await
    }

    /// Adds a destination to a virtual service.
    pub async fn add_destination(
        &self,
        service: &ServiceKey,
        destination: &Destination,
    ) -> Result<()> {
        self.change(Change::AddDestination(*service, *destination)).await
    }

    /// Changes a destination's forwarding method, weight or thresholds.
    pub async fn update_destination(
        &self,
        service: &ServiceKey,
        destination: &Destination,
    ) -> Result<()> {
        self.change(Change::UpdateDestination(*service, *destination)).await
    }

    /// Deletes a destination.
    pub async fn delete_destination(
        &self,
        service: &ServiceKey,
        address: SocketAddr,
    ) -> Result<()> {
        self.change(Change::DeleteDestination(*service, address)).await
    }

    /// Lists the destinations of a virtual service (a dump). Fails with
    /// [`Error::NoSuchService`] if the service does not exist; the kernel itself answers such
    /// a dump with an empty list.
    pub async fn list_destinations(&self, service: &ServiceKey) -> Result<Vec<DestinationEntry>> {
        let destinations = self.destinations_of(service).await?;
        if destinations.is_empty() {
            // Tell an empty service from a missing one.
            self.get_service(service).await.map_err(|err| match err {
                Error::NoSuchService { .. } => {
                    Error::NoSuchService { target: Request::ListDestinations(*service).target() }
                }
                other => other,
            })?;
        }
        Ok(destinations)
    }

    async fn destinations_of(&self, service: &ServiceKey) -> Result<Vec<DestinationEntry>> {
        destinations_on(&self.connection, service).await
    }

    /// Lists every virtual service with its destinations, in the kernel's order.
    ///
    /// The destinations of each service are a dump of their own; they are read over up to
    /// [`DUMP_SOCKETS`] sockets at once, so on a multi-threaded runtime decoding overlaps the
    /// kernel's work.
    pub async fn dump(&self) -> Result<Vec<(ServiceEntry, Vec<DestinationEntry>)>> {
        let services = self.list_services().await?;
        self.with_destinations(services, |service, destinations| (service, destinations)).await
    }

    /// As [`IpvsHandle::dump`], without the services' statistics (dropped as each is read),
    /// and each virtual service and its destinations turned into a `T` by `f` as soon as they
    /// are read: a large table is never held whole in its full form.
    pub async fn dump_with<T, F>(&self, f: F) -> Result<Vec<T>>
    where
        T: Send + 'static,
        F: Fn(VirtualService, Vec<DestinationEntry>) -> T + Clone + Send + 'static,
    {
        let request = Request::ListServices;
        let keep = push_services(|entry: ServiceEntry| entry.service);
        let services = self.connection.lock().await.execute_each(&request, keep).await?;
        self.with_destinations(services, f).await
    }

    /// Reads the destinations of each of `services`, and turns each service and its
    /// destinations into a `T` by `f`.
    async fn with_destinations<S, T, F>(&self, services: Vec<S>, f: F) -> Result<Vec<T>>
    where
        S: Listed + Clone + Send + Sync + 'static,
        T: Send + 'static,
        F: Fn(S, Vec<DestinationEntry>) -> T + Clone + Send + 'static,
    {
        let sockets = (1 + self.dump_connections.len())
            .min(services.len().div_ceil(MIN_SERVICES_PER_SOCKET))
            .max(1);
        let chunk = services.len().div_ceil(sockets).max(1);
        let connections = std::iter::once(&self.connection).chain(self.dump_connections.iter());
        let mut tasks = Vec::new();
        // Each socket reads a contiguous part, from the one list rather than a copy of it.
        let services = Arc::new(services);
        for (i, connection) in connections.take(sockets).enumerate() {
            let part = (i * chunk).min(services.len())..((i + 1) * chunk).min(services.len());
            let (services, connection, f) = (services.clone(), connection.clone(), f.clone());
            tasks.push(tokio::spawn(async move {
                let mut table = Vec::with_capacity(part.len());
                for service in &services[part] {
                    let destinations = destinations_on(&connection, service.key()).await?;
                    table.push(f(service.clone(), destinations));
                }
                Ok::<_, Error>(table)
            }));
        }
        let mut table = Vec::new();
        for task in tasks {
            let part = task.await.map_err(|err| Error::Io {
                target: Request::ListServices.target(),
                source: std::io::Error::other(err),
            })??;
            table.extend(part);
        }
        Ok(table)
    }

    /// Deletes every virtual service and destination of the namespace (`ipvsadm -C`).
    pub async fn flush(&self) -> Result<()> {
        self.execute(Request::Flush).await.map(drop)
    }

    /// The TCP, TCP FIN and UDP connection timeouts.
    pub async fn timeouts(&self) -> Result<Timeouts> {
        let request = Request::GetTimeouts;
        let mut timeouts = Timeouts::default();
        let mut seen = 0;
        for attr in self.execute(request.clone()).await?.into_iter().flat_map(|m| m.attributes) {
            match attr {
                IpvsAttribute::TimeoutTcp(v) => timeouts.tcp = v,
                IpvsAttribute::TimeoutTcpFin(v) => timeouts.tcp_fin = v,
                IpvsAttribute::TimeoutUdp(v) => timeouts.udp = v,
                _ => continue,
            }
            seen += 1;
        }
        if seen != 3 {
            return Err(malformed(&request, "the config reply lacks a timeout"));
        }
        Ok(timeouts)
    }

    /// Sets the connection timeouts; a 0 leaves that timeout unchanged (`ipvsadm --set`).
    pub async fn set_timeouts(&self, timeouts: Timeouts) -> Result<()> {
        self.execute(Request::SetTimeouts(timeouts)).await.map(drop)
    }

    /// Zeroes the counters of one service, or of every service with `None` (`ipvsadm -Z`).
    pub async fn zero(&self, service: Option<&ServiceKey>) -> Result<()> {
        self.execute(Request::Zero(service.copied())).await.map(drop)
    }

    /// Applies many changes pipelined on the socket and returns one result per change, in
    /// order. A failed change does not stop the ones after it.
    pub async fn apply(&self, changes: &[Change]) -> Vec<Result<()>> {
        self.connection.lock().await.apply(changes).await
    }
}

/// Dumps the destinations of one service on the given socket.
async fn destinations_on(
    connection: &Shared,
    service: &ServiceKey,
) -> Result<Vec<DestinationEntry>> {
    let family = service.family();
    let request = Request::ListDestinations(*service);
    connection
        .lock()
        .await
        .execute_each(&request, |message, out| {
            for attr in message.attributes {
                if let IpvsAttribute::Destination(attrs) = attr {
                    out.push(
                        DestinationEntry::from_attributes(&attrs, family)
                            .map_err(|e| e.to_string())?,
                    );
                }
            }
            Ok(())
        })
        .await
}

fn malformed(request: &Request, reason: &str) -> Error {
    Error::MalformedReply { target: request.target(), reason: reason.to_owned() }
}

/// What a reply message is turned into, as it arrives: the services it holds, each kept as
/// `keep` makes it.
fn push_services<S>(
    keep: impl Fn(ServiceEntry) -> S,
) -> impl FnMut(IpvsMessage, &mut Vec<S>) -> Result<(), String> {
    move |message, out| {
        for attr in message.attributes {
            if let IpvsAttribute::Service(attrs) = attr {
                out.push(keep(ServiceEntry::from_attributes(&attrs).map_err(|e| e.to_string())?));
            }
        }
        Ok(())
    }
}

/// A listed virtual service, as a dump keeps it while it reads the destinations.
trait Listed {
    /// The service's key.
    fn key(&self) -> &ServiceKey;
}

impl Listed for ServiceEntry {
    fn key(&self) -> &ServiceKey {
        &self.service.key
    }
}

impl Listed for VirtualService {
    fn key(&self) -> &ServiceKey {
        &self.key
    }
}
