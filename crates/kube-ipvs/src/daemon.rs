//! `kube-ipvs run`: adopts the node's kernel state, serves HTTP, starts the source, and runs
//! the sync loop until SIGTERM or SIGINT ([`run`] reads as that list). Kernel state is left in place on exit, as kube-proxy
//! leaves it, so traffic survives a restart or an upgrade.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use controller::{
    desired::ProxyConfig,
    node::NodeSync,
    reconcile::{Owned, Reconciler},
};
use dummy_link::{DummyLink, KUBE_IPVS0};
use ipvs_netlink::IpvsHandle;
use netfilter::Netfilter;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    time::{Instant, sleep_until},
};
use tracing::{debug, info, warn};

use crate::{
    Error,
    config::Config,
    dumper::{Dumped, Dumper},
    health::ProxyHealth,
    http::{self, Shared},
    inspect::{Published, SnapshotRequests},
    metrics::Metrics,
    proxier::{Proxier, Settings},
    schedule::Schedule,
    source::{Input, api, manifests::Manifests},
};

/// Options of `kube-ipvs run` beyond kube-proxy's configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Read Services, EndpointSlices and the Node from this directory instead of the API
    /// server.
    pub manifests: Option<PathBuf>,
    /// How often the manifests directory is read again.
    pub manifests_interval: Duration,
    /// The cluster's NodePort range.
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// Export the kernel's traffic counters of every virtual server on `/metrics`.
    pub traffic_metrics: bool,
}

/// The node's name: `--hostname-override`, else the host name.
pub fn node_name(config: &Config) -> String {
    config.hostname_override.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_lowercase())
            .unwrap_or_default()
    })
}

async fn kube_client(config: &Config) -> Result<kube::Client, Error> {
    let client_config = match &config.kubeconfig {
        Some(path) => {
            let failed = |source| Error::Kubeconfig { file: path.clone(), source };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(failed)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(failed)?
        }
        None => kube::Config::infer().await.map_err(Error::InferConfig)?,
    };
    kube::Client::try_from(client_config).map_err(Error::Client)
}

/// Loads the kernel modules of IPVS, its default scheduler and the nftables table, with one
/// `modprobe -a`, before anything needs them. The kernel would load them on demand, but
/// nf_tables loads a module in the middle of a transaction by aborting and replaying the
/// whole batch, once per module: on a fresh node that made the first table take 12 of the
/// first sync's 13.3 s, against 1.2 of 1.9 s with the modules loaded first
/// (docs/benchmarks.md). Modules already loaded (as after a restart) are not asked for, and
/// when all are, no process is started. Best effort: where modprobe cannot run, the kernel
/// still loads them on demand.
async fn load_kernel_modules(scheduler: &str) {
    let started = Instant::now();
    let scheduler_module = format!("ip_vs_{scheduler}");
    let modules: Vec<&str> = ["ip_vs", scheduler_module.as_str()]
        .into_iter()
        .chain(netfilter::KERNEL_MODULES.iter().copied())
        .filter(|module| !std::path::Path::new("/sys/module").join(module).exists())
        .collect();
    if modules.is_empty() {
        return;
    }
    let loaded = tokio::process::Command::new("modprobe").arg("-a").args(&modules).output();
    match tokio::time::timeout(Duration::from_secs(60), loaded).await {
        Ok(Ok(out)) if out.status.success() => {
            debug!(
                took_ms = started.elapsed().as_millis() as u64,
                ?modules,
                "kernel modules loaded"
            );
        }
        Ok(Ok(out)) => info!(
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "modprobe failed; the kernel loads the modules on demand"
        ),
        Ok(Err(err)) => info!(%err, "cannot run modprobe; the kernel loads the modules on demand"),
        Err(_) => info!("modprobe did not finish in 60 s; the kernel loads the modules on demand"),
    }
}

/// Kernel parameters and IPVS timeouts, as kube-proxy sets them at start.
async fn set_up_kernel(config: &Config, ipvs: &IpvsHandle) -> Result<(), Error> {
    // IPVS first: asking for its generic-netlink family loads `ip_vs` on a node where nothing
    // did yet, and its kernel parameters exist only from then on.
    let started = Instant::now();
    let info = ipvs.info().await.map_err(controller::Error::from)?;
    debug!(
        version = info.version_string(),
        took_ms = started.elapsed().as_millis() as u64,
        "IPVS is there"
    );
    let options = sysctl_settings::Options {
        strict_arp: config.strict_arp,
        localhost_node_ports: config.localhost_node_ports,
        rate_estimation: config.rate_estimation,
    };
    let plan = sysctl_settings::plan(options, sysctl_settings::KernelVersion::running()?);
    sysctl_settings::apply(&plan)?;
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let timeouts = ipvs_netlink::Timeouts {
        tcp: secs(config.tcp_timeout),
        tcp_fin: secs(config.tcp_fin_timeout),
        udp: secs(config.udp_timeout),
    };
    // Zero leaves a timeout as it is.
    if timeouts != ipvs_netlink::Timeouts::default() {
        ipvs.set_timeouts(timeouts).await.map_err(Error::Timeouts)?;
        info!(?timeouts, "set the IPVS timeouts");
    }
    Ok(())
}

async fn local_addresses() -> Result<Vec<IpAddr>, Error> {
    let handle = dummy_link::connect().map_err(controller::Error::from)?;
    Ok(dummy_link::local_addresses(handle, KUBE_IPVS0).await.map_err(controller::Error::from)?)
}

/// The dump of a full check, once its task is done.
async fn dumped(
    answer: &mut Option<oneshot::Receiver<Dumped>>,
) -> Result<Dumped, oneshot::error::RecvError> {
    answer.as_mut().expect("polled only while a check runs").await
}

/// What the metrics server tells anyone who reaches it, when it listens beyond loopback
/// (`metricsBindAddress: 0.0.0.0:10249` is common in kube-proxy ConfigMaps): `None` on
/// loopback.
fn exposure(metrics: SocketAddr, traffic_metrics: bool) -> Option<&'static str> {
    if metrics.ip().is_loopback() {
        return None;
    }
    Some(if traffic_metrics {
        "/virtualservers (every Service's virtual servers and endpoints) and /metrics with the traffic of every virtual server (--traffic-metrics)"
    } else {
        "/virtualservers (every Service's virtual servers and endpoints) and /metrics"
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config, options: RunOptions) -> Result<(), Error> {
    let node_name = node_name(&config);
    info!(node = node_name, version = env!("CARGO_PKG_VERSION"), "starting kube-ipvs");
    let (ipvs, node, local) = adopt_node(&config, &options).await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(ProxyHealth::new(config.sync_period));
    let snapshots = serve_http(&config, &options, &ipvs, &metrics, &health).await?;
    let settings = settings(&config, &options, &node_name);
    let proxier = Proxier::new(settings, node, local, metrics, health);
    let inputs = start_source(&config, &options, node_name).await?;
    sync_loop(&config, proxier, inputs, snapshots).await
}

/// Sets the kernel up and adopts the state the last run left: nothing is written until the
/// first lists are complete, and then only what differs. Returns the IPVS handle, the node's
/// I/O and the node's addresses outside kube-ipvs0.
async fn adopt_node(
    config: &Config,
    options: &RunOptions,
) -> Result<(IpvsHandle, NodeSync, Vec<IpAddr>), Error> {
    let ipvs = IpvsHandle::new().map_err(controller::Error::from)?;
    let started = Instant::now();
    load_kernel_modules(&config.scheduler).await;
    set_up_kernel(config, &ipvs).await?;
    let kernel_set_up = started.elapsed();

    let link_handle = dummy_link::connect().map_err(controller::Error::from)?;
    let link = DummyLink::ensure(link_handle, KUBE_IPVS0).await.map_err(controller::Error::from)?;
    let local = local_addresses().await?;
    let mut netfilter = Netfilter::new(netfilter::Config {
        cluster_cidrs: config.cluster_cidrs.clone(),
        masquerade_all: config.masquerade_all,
        masquerade_bit: config.masquerade_bit,
        localhost_node_ports: config.localhost_node_ports,
    });
    let owned = Owned::new(
        // The Service ports the last run programmed, as its netfilter table records them.
        netfilter.programmed_service_ports().map_err(controller::Error::from)?,
        link.addresses().await.map_err(controller::Error::from)?,
        local.iter().copied(),
        options.node_port_range.clone(),
        config.exclude_cidrs.clone(),
    );
    let adopting = Instant::now();
    let reconciler = Reconciler::adopt(ipvs.clone(), &owned, config.drain_bound).await?;
    // Where the start's time goes, before the lists: see docs/benchmarks.md.
    debug!(
        kernel_ms = kernel_set_up.as_millis() as u64,
        link_and_ownership_ms = (adopting - started - kernel_set_up).as_millis() as u64,
        adopt_ms = adopting.elapsed().as_millis() as u64,
        "kernel state adopted"
    );
    Ok((ipvs, NodeSync { reconciler, link, netfilter }, local))
}

/// Starts the health and metrics servers. Returns the requests for what was programmed
/// (`/virtualservers`), which the loop answers.
async fn serve_http(
    config: &Config,
    options: &RunOptions,
    ipvs: &IpvsHandle,
    metrics: &Arc<Metrics>,
    health: &Arc<ProxyHealth>,
) -> Result<SnapshotRequests, Error> {
    let (published, snapshot_requests) = Published::new();
    let shared = Shared {
        health: health.clone(),
        metrics: metrics.clone(),
        traffic: options.traffic_metrics.then(|| ipvs.clone()),
        programmed: published,
    };
    let bound =
        http::serve("/healthz", config.healthz_bind_address, http::health_router(shared.clone()))
            .await?;
    info!(address = %bound, "serving /healthz and /livez");
    let bound =
        http::serve("/metrics", config.metrics_bind_address, http::metrics_router(shared)).await?;
    info!(address = %bound, "serving /metrics and /proxyMode");
    if let Some(exposed) = exposure(bound, options.traffic_metrics) {
        warn!(address = %bound, exposed, "the metrics address is not loopback: anyone who reaches it can read these, unauthenticated");
    }
    Ok(snapshot_requests)
}

/// What the proxier is told besides the objects.
fn settings(config: &Config, options: &RunOptions, node_name: &str) -> Settings {
    Settings {
        proxy: ProxyConfig {
            scheduler: config.scheduler.clone(),
            service_proxy_name: config.service_proxy_name.clone(),
            localhost_node_ports: config.localhost_node_ports,
        },
        exclude_cidrs: config.exclude_cidrs.clone(),
        node_name: node_name.to_owned(),
        node_port_addresses: config.node_port_addresses.clone(),
        node_port_range: options.node_port_range.clone(),
    }
}

/// Starts reading Services, EndpointSlices and the Node, from the API server or from
/// manifests.
async fn start_source(
    config: &Config,
    options: &RunOptions,
    node_name: String,
) -> Result<mpsc::Receiver<Input>, Error> {
    let (sink, inputs) = mpsc::channel(4096);
    match &options.manifests {
        Some(dir) => {
            info!(dir = %dir.display(), "reading Services and EndpointSlices from manifests");
            let manifests = Manifests::new(dir.clone(), node_name);
            tokio::spawn(manifests.follow(options.manifests_interval, sink));
        }
        None => {
            let client = kube_client(config).await?;
            let stream = api::inputs(client, &node_name, config.service_proxy_name.as_deref());
            tokio::spawn(api::forward(stream, sink));
        }
    }
    Ok(inputs)
}

/// At most this many events are taken at once, so that signals and syncs get their turn.
const MAX_QUEUED: usize = 4096;

/// Takes the events already queued behind one just taken, up to [`MAX_QUEUED`]. The next sync
/// then covers a whole burst: taken one event per turn of the loop, a busy loop would sync
/// after each (with no minimum sync period), and every sync has a cost of its own: a rolling
/// update of 500 changes a second outran the daemon that way, 45 s behind at its end.
fn take_queued(inputs: &mut mpsc::Receiver<Input>, mut handle: impl FnMut(Input)) -> usize {
    let mut taken = 0;
    while taken < MAX_QUEUED {
        match inputs.try_recv() {
            Ok(input) => handle(input),
            Err(_) => break,
        }
        taken += 1;
    }
    taken
}

/// The loop: events in, syncs and full checks when the [`Schedule`] says, draining, and the
/// answers to `/virtualservers`, until SIGTERM or SIGINT.
async fn sync_loop(
    config: &Config,
    mut proxier: Proxier<NodeSync>,
    mut inputs: mpsc::Receiver<Input>,
    mut snapshot_requests: SnapshotRequests,
) -> Result<(), Error> {
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut schedule = Schedule::new(config.min_sync_period, config.sync_period, Instant::now());
    let mut drain = tokio::time::interval(Duration::from_secs(1));
    let mut dumper = Dumper::start()?;
    let mut check: Option<oneshot::Receiver<Dumped>> = None;
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: stopping; the kernel state stays in place"); break }
            _ = interrupt.recv() => { info!("SIGINT: stopping; the kernel state stays in place"); break }
            input = inputs.recv() => match input {
                Some(input) => {
                    proxier.handle(input);
                    take_queued(&mut inputs, |input| proxier.handle(input));
                }
                None => { warn!("the source ended"); break }
            },
            _ = sleep_until(schedule.next_sync()), if proxier.ready() && proxier.pending() => {
                let result = proxier.sync().await;
                if let Err(err) = &result {
                    warn!(%err, "sync failed; retrying");
                }
                schedule.synced(result.is_ok(), Instant::now());
            }
            _ = sleep_until(schedule.next_check()), if check.is_none() => {
                match local_addresses().await {
                    Ok(addresses) => proxier.set_local_addresses(addresses),
                    Err(err) => warn!(%err, "cannot read the node's addresses"),
                }
                if proxier.begin_check() {
                    // The IPVS table is read on the dump thread; syncs go on meanwhile.
                    check = Some(dumper.dump());
                } else {
                    schedule.checked(Instant::now());
                }
            }
            dumped = dumped(&mut check), if check.is_some() => {
                check = None;
                let result = match dumped {
                    Ok(Ok(digests)) => proxier.finish_check(digests).await,
                    Ok(Err(err)) => Err(controller::Error::Ipvs(err).into()),
                    // The thread is gone (it panicked): the next check gets a new one.
                    Err(_) => match Dumper::start() {
                        Ok(restarted) => {
                            dumper = restarted;
                            Err(Error::DumpThreadStopped)
                        }
                        Err(err) => Err(err),
                    },
                };
                if let Err(err) = result {
                    warn!(%err, "full check failed; retrying at the next one");
                }
                schedule.checked(Instant::now());
            }
            Some(request) = snapshot_requests.recv() => {
                // The asker may have given up; then there is no one to answer.
                let _ = request.send(proxier.snapshot());
            }
            _ = drain.tick(), if proxier.draining() => {
                if let Err(err) = proxier.drain().await {
                    warn!(%err, "draining failed; retrying");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Input, MAX_QUEUED, exposure, mpsc, take_queued};

    fn failed() -> Input {
        Input::WatchFailed { kind: "Service", error: "unreachable".into() }
    }

    #[test]
    fn every_queued_event_is_taken_before_the_next_sync_up_to_a_bound() {
        let (sink, mut inputs) = mpsc::channel(2 * MAX_QUEUED);
        for _ in 0..3 {
            sink.try_send(failed()).unwrap();
        }
        let mut handled = 0;
        assert_eq!(take_queued(&mut inputs, |_| handled += 1), 3);
        assert_eq!(handled, 3);
        assert_eq!(take_queued(&mut inputs, |_| handled += 1), 0, "nothing queued");
        for _ in 0..MAX_QUEUED + 5 {
            sink.try_send(failed()).unwrap();
        }
        assert_eq!(take_queued(&mut inputs, |_| {}), MAX_QUEUED, "the loop gets its turn");
        assert_eq!(take_queued(&mut inputs, |_| {}), 5);
    }

    #[test]
    fn a_metrics_address_beyond_loopback_says_what_it_exposes() {
        assert_eq!(exposure("127.0.0.1:10249".parse().unwrap(), true), None);
        assert_eq!(exposure("[::1]:10249".parse().unwrap(), true), None);
        let wide = exposure("0.0.0.0:10249".parse().unwrap(), false).unwrap();
        assert!(wide.contains("/virtualservers") && !wide.contains("traffic"), "{wide}");
        let traffic = exposure("[::]:10249".parse().unwrap(), true).unwrap();
        assert!(traffic.contains("--traffic-metrics"), "{traffic}");
    }
}
