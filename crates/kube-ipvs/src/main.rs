//! `kube-ipvs`: Kubernetes Services on a node with the kernel's IPVS load balancer, in place of
//! kube-proxy's IPVS mode.

use std::{net::SocketAddr, ops::RangeInclusive, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ipvs_netlink::IpvsHandle;
use ipvsadm_listing as listing;
use kube_ipvs::{config, inspect::Programmed};

#[derive(Parser)]
#[command(
    name = "kube-ipvs",
    version,
    about = "Kubernetes Services with the kernel's IPVS load balancer, in place of kube-proxy's IPVS mode"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy on this node.
    ///
    /// Watches Services, EndpointSlices and this node's Node (or reads them from
    /// `--manifests`), and keeps the kernel's IPVS table, kube-ipvs0 and the nftables table in
    /// step with them. Stops on SIGTERM or SIGINT and leaves the kernel state in place.
    Run {
        #[command(flatten)]
        flags: Box<config::Flags>,
        /// Read Services, EndpointSlices and the Node from YAML or JSON files in this
        /// directory, and follow changes to it, instead of the API server.
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// How often the manifests directory is read again.
        #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = humantime::parse_duration)]
        manifests_interval: Duration,
        /// The cluster's NodePort range (`--service-node-port-range`): virtual servers on the
        /// node's addresses in it belong to kube-ipvs.
        #[arg(long, default_value = "30000-32767", value_name = "FIRST-LAST", value_parser = port_range)]
        node_port_range: RangeInclusive<u16>,
        /// Export the kernel's connection, packet and byte counters of every virtual server on
        /// `/metrics`, labelled with its Service.
        #[arg(long)]
        traffic_metrics: bool,
    },
    /// Print the IPVS table as `ipvsadm -Ln` does, with the Service of each virtual server.
    ///
    /// The listing is `ipvsadm -Ln`'s line for line; each virtual server's line is followed by
    /// `# namespace/name:port Type`, asked of the running daemon.
    Ls {
        /// Columns, as ipvsadm's listing options.
        #[arg(long, value_enum, default_value = "default")]
        columns: Columns,
        /// Print JSON instead: every column set at once, in the same order, with the
        /// Services.
        #[arg(long, conflicts_with = "columns")]
        json: bool,
        /// Print only what differs between the daemon's desired state and the kernel:
        /// `+` missing, `-` not desired, `~` different. Exits with 1 when anything differs.
        #[arg(long, conflicts_with_all = ["json", "columns"])]
        diff: bool,
        /// The running daemon's metrics address, where it tells which Service each virtual
        /// server implements.
        #[arg(long, default_value = "127.0.0.1:10249", value_name = "ADDRESS")]
        daemon: SocketAddr,
        /// Do not ask the daemon: exactly `ipvsadm -Ln`'s listing.
        #[arg(long, conflicts_with = "diff")]
        no_names: bool,
    },
    /// Remove everything kube-ipvs owns from this node, and nothing else.
    ///
    /// That is its virtual servers (on kube-ipvs0's addresses, on NodePorts, and its
    /// firewall-mark ones), kube-ipvs0, and its nftables table.
    Cleanup {
        #[command(flatten)]
        flags: Box<config::Flags>,
        /// The NodePort range of the cluster (`--service-node-port-range`).
        #[arg(long, default_value = "30000-32767", value_name = "FIRST-LAST", value_parser = port_range)]
        node_port_range: RangeInclusive<u16>,
    },
    /// Print the version.
    Version,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Columns {
    /// `ipvsadm -Ln`.
    Default,
    /// `ipvsadm -Ln --stats`.
    Stats,
    /// `ipvsadm -Ln --rate`.
    Rate,
    /// `ipvsadm -Ln --thresholds`.
    Thresholds,
    /// `ipvsadm -Ln --persistent-conn`.
    PersistentConn,
}

impl From<Columns> for listing::Columns {
    fn from(columns: Columns) -> Self {
        match columns {
            Columns::Default => Self::Default,
            Columns::Stats => Self::Stats,
            Columns::Rate => Self::Rate,
            Columns::Thresholds => Self::Thresholds,
            Columns::PersistentConn => Self::PersistentConn,
        }
    }
}

fn init_logging(format: config::LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        config::LogFormat::Text => builder.init(),
        config::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A port range as kube-apiserver's `--service-node-port-range` takes it: `FIRST-LAST`.
fn port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("{p:?} is not a port"));
    let (first, last) = text.split_once('-').ok_or("the range must be FIRST-LAST")?;
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("{first} is above {last}"));
    }
    Ok(first..=last)
}

/// What the daemon at `address` programmed.
async fn programmed(address: SocketAddr) -> Result<Programmed> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri = format!("http://{address}/virtualservers").parse()?;
    let ask = async {
        let response = client.get(uri).await?;
        anyhow::ensure!(response.status().is_success(), "it answered {}", response.status());
        let body = response.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 5 s"))?
        .with_context(|| format!("asking kube-ipvs at {address} (--daemon)"))
}

async fn ls(columns: Columns, json: bool, diff: bool, daemon: Option<SocketAddr>) -> Result<bool> {
    let ipvs = IpvsHandle::new()?;
    let mut table = ipvs.dump().await?;
    listing::sort_like_ipvsadm(&mut table);
    let programmed = match daemon {
        None => None,
        Some(address) => match programmed(address).await {
            Ok(programmed) => Some(programmed),
            Err(err) if !diff => {
                eprintln!("kube-ipvs ls: Services not shown: {err:#}");
                None
            }
            Err(err) => return Err(err),
        },
    };
    if diff {
        let lines = match &programmed {
            Some(programmed) => differences(programmed, &table).await?,
            None => Vec::new(),
        };
        for line in &lines {
            println!("{line}");
        }
        return Ok(lines.is_empty());
    }
    if json {
        let mut value = listing::json(&table);
        if let (Some(programmed), Some(items)) = (&programmed, value.as_array_mut()) {
            for ((entry, _), item) in table.iter().zip(items) {
                if let Some(view) = programmed.virtual_servers.get(&entry.service.key.to_string()) {
                    item["service"] = view.service.clone().into();
                    item["type"] = view.kind.clone().into();
                }
            }
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let info = ipvs.info().await?;
        let annotate = |key: &_| programmed.as_ref().and_then(|p| p.annotation(key));
        print!("{}", listing::render_annotated(&info, &table, columns.into(), annotate));
    }
    Ok(true)
}

/// Everything that differs between what the daemon programs and the kernel: the IPVS table,
/// kube-ipvs0's addresses and the nftables table's elements.
async fn differences(
    programmed: &Programmed,
    table: &[listing::TableEntry],
) -> Result<Vec<String>> {
    let mut lines = programmed.diff(table);
    let handle = dummy_link::connect()?;
    let bound = match dummy_link::DummyLink::find(handle, dummy_link::KUBE_IPVS0).await? {
        Some(link) => link.addresses().await?,
        None => Default::default(),
    };
    lines.extend(programmed.diff_addresses(&bound));
    let mut netfilter = netfilter::Netfilter::new(netfilter::Config::default());
    lines.extend(
        netfilter.differences(&programmed.netfilter)?.into_iter().map(|d| format!("~ {d}")),
    );
    Ok(lines)
}

/// The configuration from the flags and `--config`; logging is set up, and the warnings
/// logged.
fn configure(flags: &config::Flags) -> Result<config::Config> {
    let file = flags
        .config
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --config {}", path.display()))
        })
        .transpose()?;
    let (config, warnings) = config::load(flags, file.as_deref())?;
    init_logging(config.log_format);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

async fn cleanup(flags: &config::Flags, node_port_range: RangeInclusive<u16>) -> Result<()> {
    let config = configure(flags)?;
    let report = controller::node::clean_up(node_port_range, config.exclude_cidrs).await?;
    for err in &report.failed {
        tracing::error!(%err, "cannot delete a virtual server");
    }
    tracing::info!(
        virtual_servers = report.virtual_servers,
        kube_ipvs0 = report.link,
        "removed kube-ipvs's virtual servers, kube-ipvs0 and its nftables table"
    );
    let failed = report.failed.len();
    anyhow::ensure!(failed == 0, "{failed} virtual servers could not be deleted");
    Ok(())
}

/// Turns transparent huge pages off for this process. Where the kernel backs every aligned
/// 2 MiB of anonymous memory with a huge page (`transparent_hugepage=always`, Debian's
/// default), a partly used 2 MiB stretch of the allocator's arenas counts whole in the RSS:
/// at 10,000 Services that was 20 MiB more for no gain.
fn no_huge_pages() {
    if let Err(err) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(%err, "cannot turn transparent huge pages off; memory use may be higher");
    }
}

/// mimalloc, rather than the C library's allocator: it gives freed memory back to the system,
/// where glibc's per-thread arenas keep the peak of every thread (the startup's large
/// transient tables) for the life of the process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run { flags, manifests, manifests_interval, node_port_range, traffic_metrics } => {
            let config = configure(&flags)?;
            no_huge_pages();
            let options = kube_ipvs::daemon::RunOptions {
                manifests,
                manifests_interval,
                node_port_range,
                traffic_metrics,
            };
            kube_ipvs::daemon::run(config, options).await?;
            Ok(())
        }
        Command::Ls { columns, json, diff, daemon, no_names } => {
            let same = ls(columns, json, diff, (!no_names).then_some(daemon)).await?;
            if !same {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Cleanup { flags, node_port_range } => cleanup(&flags, node_port_range).await,
        Command::Version => {
            println!("kube-ipvs {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::port_range;

    #[test]
    fn port_ranges_are_checked() {
        assert_eq!(port_range("30000-32767"), Ok(30000..=32767));
        assert_eq!(port_range(" 80 - 80 "), Ok(80..=80));
        assert_eq!(port_range("30000"), Err("the range must be FIRST-LAST".to_owned()));
        assert_eq!(port_range("30000-70000"), Err("\"70000\" is not a port".to_owned()));
        assert_eq!(port_range("32767-30000"), Err("32767 is above 30000".to_owned()));
    }
}
