//! The daemon's configuration: kube-proxy's flags, an existing kube-proxy
//! `KubeProxyConfiguration` file, and kube-ipvs's own options.
//!
//! A value comes from the flag if it is given, else from the file, else the default. Fields of
//! the file kube-ipvs does not use are named in one warning; a value that cannot be used is an
//! error that names the field and says why.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, de::Error as _};
use serde_json::Value;

use controller::desired::SCHEDULERS;

use crate::Error;

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::Invalid { field: field.to_owned(), reason: reason.into() }
}

/// Where NodePorts are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node (outside kube-ipvs0), loopback and link-local aside.
    All,
    /// The addresses within these CIDRs.
    Cidrs(Vec<IpNetwork>),
    /// The node's primary addresses, as its Node object lists them (`primary`).
    Primary,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// The daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The Node's name (`--hostname-override`); the host name when not given.
    pub hostname_override: Option<String>,
    /// The kubeconfig file; in-cluster configuration when not given.
    pub kubeconfig: Option<PathBuf>,
    /// Pod networks (`--cluster-cidr`), for masquerade and `externalTrafficPolicy: Local`.
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Where NodePorts are served (`--nodeport-addresses`).
    pub node_port_addresses: NodePortAddresses,
    /// Masquerade all traffic to ClusterIPs (`--masquerade-all`).
    pub masquerade_all: bool,
    /// The masquerade mark bit (`--iptables-masquerade-bit`).
    pub masquerade_bit: u8,
    /// The default scheduler (`--ipvs-scheduler`).
    pub scheduler: String,
    /// Full check of the kernel state (`--ipvs-sync-period`).
    pub sync_period: Duration,
    /// Shortest time between syncs, to coalesce bursts (`--ipvs-min-sync-period`).
    pub min_sync_period: Duration,
    /// Virtual servers never touched (`--ipvs-exclude-cidrs`).
    pub exclude_cidrs: Vec<IpNetwork>,
    /// `arp_ignore`/`arp_announce` (`--ipvs-strict-arp`).
    pub strict_arp: bool,
    /// IPVS TCP timeout; zero leaves the kernel's (`--ipvs-tcp-timeout`).
    pub tcp_timeout: Duration,
    /// IPVS TCP FIN timeout; zero leaves the kernel's (`--ipvs-tcpfin-timeout`).
    pub tcp_fin_timeout: Duration,
    /// IPVS UDP timeout; zero leaves the kernel's (`--ipvs-udp-timeout`).
    pub udp_timeout: Duration,
    /// `/healthz` and `/livez` (`--healthz-bind-address`).
    pub healthz_bind_address: SocketAddr,
    /// `/metrics` (`--metrics-bind-address`).
    pub metrics_bind_address: SocketAddr,
    /// Also serve Services labelled with this proxy name (`--service-proxy-name`).
    pub service_proxy_name: Option<String>,
    /// The longest a removed TCP or SCTP endpoint drains before it is deleted.
    pub drain_bound: Duration,
    /// Serve NodePorts on 127.0.0.1 too.
    pub localhost_node_ports: bool,
    /// IPVS's rate estimator on or off (`net.ipv4.vs.run_estimation`); `None` leaves the
    /// kernel's setting (`--ipvs-rate-estimation`).
    pub rate_estimation: Option<bool>,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hostname_override: None,
            kubeconfig: None,
            cluster_cidrs: Vec::new(),
            node_port_addresses: NodePortAddresses::All,
            masquerade_all: false,
            masquerade_bit: 14,
            scheduler: "rr".into(),
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::ZERO,
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            tcp_timeout: Duration::ZERO,
            tcp_fin_timeout: Duration::ZERO,
            udp_timeout: Duration::ZERO,
            healthz_bind_address: "0.0.0.0:10256".parse().expect("an address"),
            metrics_bind_address: "127.0.0.1:10249".parse().expect("an address"),
            service_proxy_name: None,
            drain_bound: Duration::from_secs(15 * 60),
            localhost_node_ports: false,
            rate_estimation: None,
            log_format: LogFormat::Text,
        }
    }
}

/// The flags, as kube-proxy names them. Absent flags leave the file's value or the default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// A `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1) file, such as kube-proxy's
    /// ConfigMap. Flags given as well take precedence.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The kubeconfig file; in-cluster configuration when not given.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The Node's name, when it is not the host name.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// Pod networks, comma-separated CIDRs.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// Where NodePorts are served: comma-separated CIDRs, or `primary`.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub nodeport_addresses: Option<Vec<String>>,
    /// Masquerade all traffic to ClusterIPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,
    /// The packet-mark bit that asks for masquerade.
    #[arg(long, value_name = "BIT")]
    pub iptables_masquerade_bit: Option<u8>,
    /// The default scheduler: rr, wrr, lc, wlc, dh, sh, sed, nq or mh.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,
    /// How often the kernel state is checked in full (30s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ipvs_sync_period: Option<Duration>,
    /// The shortest time between two syncs, to coalesce bursts of changes (0s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ipvs_min_sync_period: Option<Duration>,
    /// Virtual servers in these comma-separated CIDRs are never touched.
    #[arg(long, value_name = "CIDRS")]
    pub ipvs_exclude_cidrs: Option<String>,
    /// Answer ARP only for addresses on the receiving interface (as MetalLB L2 needs).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub ipvs_strict_arp: Option<bool>,
    /// IPVS TCP session timeout (0: the kernel's).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ipvs_tcp_timeout: Option<Duration>,
    /// IPVS TCP FIN timeout (0: the kernel's).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ipvs_tcpfin_timeout: Option<Duration>,
    /// IPVS UDP timeout (0: the kernel's).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ipvs_udp_timeout: Option<Duration>,
    /// Address of `/healthz` and `/livez` (0.0.0.0:10256).
    #[arg(long, value_name = "ADDRESS")]
    pub healthz_bind_address: Option<String>,
    /// Address of `/metrics` (127.0.0.1:10249).
    #[arg(long, value_name = "ADDRESS")]
    pub metrics_bind_address: Option<String>,
    /// Also serve Services labelled `service.kubernetes.io/service-proxy-name` with this
    /// name (those labelled with another name belong to another proxy).
    #[arg(long, value_name = "NAME")]
    pub service_proxy_name: Option<String>,
    /// The longest a removed TCP or SCTP endpoint drains before it is deleted (15m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub drain_bound: Option<Duration>,
    /// Serve NodePorts on 127.0.0.1 too (kube-proxy's IPVS mode cannot).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub localhost_node_ports: Option<bool>,
    /// Turn IPVS's rate estimator (`ipvsadm -Ln --rate`, and before kernel 6.2 also
    /// `--stats`) on or off; left as the kernel has it unless given. Before kernel 6.2 it
    /// walks every virtual server and destination every 2 s, holding a CPU meanwhile.
    #[arg(long, value_name = "BOOL")]
    pub ipvs_rate_estimation: Option<bool>,
    /// Log format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// A `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1), the fields kube-ipvs uses:
/// each field's path is its place here. A field that is absent, null or an empty string counts
/// as not set, as kube-proxy's defaulting does; the others are kept aside (`other`) to be named
/// in a warning.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct KubeProxyConfiguration {
    #[serde(deserialize_with = "text")]
    api_version: Option<String>,
    #[serde(deserialize_with = "text")]
    kind: Option<String>,
    #[serde(deserialize_with = "text")]
    mode: Option<String>,
    client_connection: ClientConnection,
    #[serde(deserialize_with = "text")]
    hostname_override: Option<String>,
    #[serde(rename = "clusterCIDR", deserialize_with = "comma_separated_cidrs")]
    cluster_cidr: Option<Vec<IpNetwork>>,
    #[serde(deserialize_with = "node_port_address_list")]
    node_port_addresses: Option<NodePortAddresses>,
    iptables: Iptables,
    ipvs: Ipvs,
    #[serde(deserialize_with = "address")]
    healthz_bind_address: Option<SocketAddr>,
    #[serde(deserialize_with = "address")]
    metrics_bind_address: Option<SocketAddr>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ClientConnection {
    #[serde(deserialize_with = "text")]
    kubeconfig: Option<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Iptables {
    #[serde(deserialize_with = "boolean")]
    masquerade_all: Option<bool>,
    #[serde(deserialize_with = "bit")]
    masquerade_bit: Option<u8>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Ipvs {
    #[serde(deserialize_with = "text")]
    scheduler: Option<String>,
    #[serde(deserialize_with = "duration")]
    sync_period: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    min_sync_period: Option<Duration>,
    #[serde(rename = "excludeCIDRs", deserialize_with = "cidr_list")]
    exclude_cidrs: Option<Vec<IpNetwork>>,
    #[serde(rename = "strictARP", deserialize_with = "boolean")]
    strict_arp: Option<bool>,
    #[serde(deserialize_with = "duration")]
    tcp_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    tcp_fin_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    udp_timeout: Option<Duration>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// A value that is set: not null, not an empty string.
fn set_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    let value = Value::deserialize(deserializer)?;
    Ok((!value.is_null() && value.as_str() != Some("")).then_some(value))
}

fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    set_value(deserializer)?
        .map(|value| match value {
            Value::String(text) => Ok(text),
            other => Err(D::Error::custom(format!("{other} is not a string"))),
        })
        .transpose()
}

fn texts<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<String>>, D::Error> {
    let item = |value: Value| match value {
        Value::String(text) => Ok(text),
        other => Err(D::Error::custom(format!("{other} is not a string"))),
    };
    set_value(deserializer)?
        .map(|value| match value {
            Value::Array(items) => items.into_iter().map(item).collect(),
            other => Err(D::Error::custom(format!("{other} is not a list"))),
        })
        .transpose()
}

fn comma_separated_cidrs<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<IpNetwork>>, D::Error> {
    text(deserializer)?.map(|text| cidrs(text.split(',')).map_err(D::Error::custom)).transpose()
}

fn cidr_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<IpNetwork>>, D::Error> {
    texts(deserializer)?.map(|items| cidrs(items).map_err(D::Error::custom)).transpose()
}

fn node_port_address_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<NodePortAddresses>, D::Error> {
    texts(deserializer)?
        .map(|items| node_port_addresses(&items).map_err(D::Error::custom))
        .transpose()
}

fn address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    text(deserializer)?.map(|text| bind_address(&text).map_err(D::Error::custom)).transpose()
}

fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    set_value(deserializer)?
        .map(|value| {
            value.as_bool().ok_or_else(|| D::Error::custom(format!("{value} is not true or false")))
        })
        .transpose()
}

fn bit<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u8>, D::Error> {
    set_value(deserializer)?
        .map(|value| {
            value
                .as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .ok_or_else(|| D::Error::custom(format!("{value} is not a bit number")))
        })
        .transpose()
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    text(deserializer)?
        .map(|text| {
            humantime::parse_duration(&text)
                .map_err(|err| D::Error::custom(format!("{text:?} is not a duration: {err}")))
        })
        .transpose()
}

/// Every leaf field of the fields kept aside, as dotted paths under `prefix`, when set.
fn leaves(prefix: &str, fields: &serde_json::Map<String, Value>, out: &mut Vec<String>) {
    for (key, value) in fields {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            Value::Object(map) if !map.is_empty() => leaves(&path, map, out),
            Value::Null => {}
            Value::String(text) if text.is_empty() => {}
            _ => out.push(path),
        }
    }
}

impl KubeProxyConfiguration {
    /// The fields set that kube-ipvs does not use, sorted.
    fn unused(&self) -> Vec<String> {
        let mut unused = Vec::new();
        leaves("", &self.other, &mut unused);
        leaves("clientConnection", &self.client_connection.other, &mut unused);
        leaves("iptables", &self.iptables.other, &mut unused);
        leaves("ipvs", &self.ipvs.other, &mut unused);
        unused.sort();
        unused
    }
}

/// Comma-separated or listed CIDRs; blanks are skipped.
fn cidrs(items: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Vec<IpNetwork>, String> {
    items
        .into_iter()
        .filter_map(|s| Some(s.as_ref().trim().to_owned()).filter(|s| !s.is_empty()))
        .map(|s| s.parse().map_err(|_| format!("{s:?} is not a CIDR")))
        .collect()
}

/// `host:port`, or `:port` (every address), as kube-proxy accepts.
fn bind_address(text: &str) -> Result<SocketAddr, String> {
    let full = if text.starts_with(':') { format!("0.0.0.0{text}") } else { text.to_owned() };
    full.parse().map_err(|_| format!("{text:?} is not an address and port"))
}

fn node_port_addresses(items: &[String]) -> Result<NodePortAddresses, String> {
    if items.iter().any(|s| s == "primary") {
        return if items.len() == 1 {
            Ok(NodePortAddresses::Primary)
        } else {
            Err("primary cannot be combined with CIDRs".into())
        };
    }
    let cidrs = cidrs(items)?;
    Ok(if cidrs.is_empty() { NodePortAddresses::All } else { NodePortAddresses::Cidrs(cidrs) })
}

/// The configuration from the flags and, if `flags.config` is set, the file's text.
/// Returns it with the warnings to log.
pub fn load(flags: &Flags, file: Option<&str>) -> Result<(Config, Vec<String>), Error> {
    let mut config = Config::default();
    let mut warnings = Vec::new();
    if let Some(text) = file {
        let name = flags
            .config
            .as_ref()
            .map_or_else(|| "--config".to_owned(), |p| p.display().to_string());
        apply_file(&mut config, &name, text, &mut warnings)?;
    }
    apply_flags(&mut config, flags)?;
    validate(&config)?;
    Ok((config, warnings))
}

fn apply_file(
    config: &mut Config,
    file: &str,
    text: &str,
    warnings: &mut Vec<String>,
) -> Result<(), Error> {
    let document: Value = serde_norway::from_str(text)
        .map_err(|source| Error::Yaml { file: file.to_owned(), source })?;
    let api_version = document.get("apiVersion").and_then(Value::as_str);
    let kind = document.get("kind").and_then(Value::as_str);
    if kind != Some("KubeProxyConfiguration")
        || api_version != Some("kubeproxy.config.k8s.io/v1alpha1")
    {
        return Err(Error::NotKubeProxyConfiguration {
            file: file.to_owned(),
            kind: kind.map(str::to_owned),
            api_version: api_version.map(str::to_owned),
        });
    }
    let file_config: KubeProxyConfiguration =
        serde_path_to_error::deserialize(document).map_err(|err| Error::Invalid {
            field: err.path().to_string(),
            reason: err.into_inner().to_string(),
        })?;
    if let Some(mode) = file_config.mode.as_deref().filter(|m| *m != "ipvs") {
        warnings.push(format!("{file}: mode is {mode:?}; kube-ipvs always proxies with IPVS"));
    }
    let unused = file_config.unused();
    if !unused.is_empty() {
        warnings
            .push(format!("{file}: kube-ipvs does not use these fields: {}", unused.join(", ")));
    }
    apply_configuration(config, file_config);
    Ok(())
}

fn apply_configuration(config: &mut Config, file: KubeProxyConfiguration) {
    let KubeProxyConfiguration { client_connection, iptables, ipvs, .. } = file;
    if let Some(v) = client_connection.kubeconfig {
        config.kubeconfig = Some(v.into());
    }
    if let Some(v) = file.hostname_override {
        config.hostname_override = Some(v);
    }
    if let Some(v) = file.cluster_cidr {
        config.cluster_cidrs = v;
    }
    if let Some(v) = file.node_port_addresses {
        config.node_port_addresses = v;
    }
    if let Some(v) = iptables.masquerade_all {
        config.masquerade_all = v;
    }
    if let Some(v) = iptables.masquerade_bit {
        config.masquerade_bit = v;
    }
    if let Some(v) = ipvs.scheduler {
        config.scheduler = v;
    }
    if let Some(v) = ipvs.exclude_cidrs {
        config.exclude_cidrs = v;
    }
    if let Some(v) = ipvs.strict_arp {
        config.strict_arp = v;
    }
    // kube-proxy treats a zero sync period as "use the default".
    if let Some(v) = ipvs.sync_period.filter(|v| !v.is_zero()) {
        config.sync_period = v;
    }
    let durations = [
        (ipvs.min_sync_period, &mut config.min_sync_period),
        (ipvs.tcp_timeout, &mut config.tcp_timeout),
        (ipvs.tcp_fin_timeout, &mut config.tcp_fin_timeout),
        (ipvs.udp_timeout, &mut config.udp_timeout),
    ];
    for (value, target) in durations {
        if let Some(value) = value {
            *target = value;
        }
    }
    if let Some(v) = file.healthz_bind_address {
        config.healthz_bind_address = v;
    }
    if let Some(v) = file.metrics_bind_address {
        config.metrics_bind_address = v;
    }
}

fn apply_flags(config: &mut Config, flags: &Flags) -> Result<(), Error> {
    if let Some(v) = &flags.kubeconfig {
        config.kubeconfig = Some(v.clone());
    }
    if let Some(v) = &flags.hostname_override {
        config.hostname_override = Some(v.clone());
    }
    if let Some(v) = &flags.cluster_cidr {
        config.cluster_cidrs = cidrs(v.split(',')).map_err(|e| invalid("--cluster-cidr", e))?;
    }
    if let Some(v) = &flags.nodeport_addresses {
        config.node_port_addresses =
            node_port_addresses(v).map_err(|e| invalid("--nodeport-addresses", e))?;
    }
    if let Some(v) = flags.masquerade_all {
        config.masquerade_all = v;
    }
    if let Some(v) = flags.iptables_masquerade_bit {
        config.masquerade_bit = v;
    }
    if let Some(v) = &flags.ipvs_scheduler {
        config.scheduler = v.clone();
    }
    if let Some(v) = &flags.ipvs_exclude_cidrs {
        config.exclude_cidrs =
            cidrs(v.split(',')).map_err(|e| invalid("--ipvs-exclude-cidrs", e))?;
    }
    if let Some(v) = flags.ipvs_strict_arp {
        config.strict_arp = v;
    }
    let durations = [
        (flags.ipvs_sync_period, &mut config.sync_period),
        (flags.ipvs_min_sync_period, &mut config.min_sync_period),
        (flags.ipvs_tcp_timeout, &mut config.tcp_timeout),
        (flags.ipvs_tcpfin_timeout, &mut config.tcp_fin_timeout),
        (flags.ipvs_udp_timeout, &mut config.udp_timeout),
        (flags.drain_bound, &mut config.drain_bound),
    ];
    for (flag, target) in durations {
        if let Some(value) = flag {
            *target = value;
        }
    }
    if let Some(v) = &flags.healthz_bind_address {
        config.healthz_bind_address =
            bind_address(v).map_err(|e| invalid("--healthz-bind-address", e))?;
    }
    if let Some(v) = &flags.metrics_bind_address {
        config.metrics_bind_address =
            bind_address(v).map_err(|e| invalid("--metrics-bind-address", e))?;
    }
    if let Some(v) = &flags.service_proxy_name {
        config.service_proxy_name = Some(v.clone());
    }
    if let Some(v) = flags.localhost_node_ports {
        config.localhost_node_ports = v;
    }
    if let Some(v) = flags.ipvs_rate_estimation {
        config.rate_estimation = Some(v);
    }
    if let Some(v) = flags.log_format {
        config.log_format = v;
    }
    Ok(())
}

fn validate(config: &Config) -> Result<(), Error> {
    if !SCHEDULERS.contains(&config.scheduler.as_str()) {
        return Err(invalid(
            "--ipvs-scheduler (ipvs.scheduler)",
            format!("{:?} is not one of {}", config.scheduler, SCHEDULERS.join(", ")),
        ));
    }
    // The low 14 bits and bit 20 carry the marks of localhost NodePorts and of
    // externalTrafficPolicy Local virtual servers.
    if !(14..=31).contains(&config.masquerade_bit) || config.masquerade_bit == 20 {
        return Err(invalid(
            "--iptables-masquerade-bit (iptables.masqueradeBit)",
            format!(
                "{} must be between 14 and 31, and not 20 (kube-ipvs's own marks use those bits)",
                config.masquerade_bit
            ),
        ));
    }
    if config.sync_period.is_zero() {
        return Err(invalid("sync period", "must be more than zero"));
    }
    if config.min_sync_period > config.sync_period {
        return Err(invalid("min sync period", "must not be longer than the sync period"));
    }
    if config.drain_bound.is_zero() {
        return Err(invalid("--drain-bound", "must be more than zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy's configuration from the golden scenario.
    const GOLDEN: &str = "\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: /etc/kube-proxy/kubeconfig
hostnameOverride: virtme-ng
clusterCIDR: \"10.244.0.0/16,fd00:10:244::/56\"
mode: ipvs
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
ipvs:
  scheduler: rr
";

    #[test]
    fn an_existing_kube_proxy_config_map_is_read() {
        let (config, warnings) = load(&Flags::default(), Some(GOLDEN)).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.kubeconfig, Some("/etc/kube-proxy/kubeconfig".into()));
        assert_eq!(config.hostname_override.as_deref(), Some("virtme-ng"));
        assert_eq!(config.cluster_cidrs.len(), 2);
        assert_eq!(config.healthz_bind_address, "127.0.0.1:10256".parse().unwrap());
        assert_eq!(config.sync_period, Duration::from_secs(30));
        assert_eq!(config.rate_estimation, None, "the kernel's setting is left alone");
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = Flags {
            ipvs_scheduler: Some("lc".into()),
            ipvs_sync_period: Some(Duration::from_secs(10)),
            ipvs_rate_estimation: Some(false),
            ..Flags::default()
        };
        let (config, _) = load(&flags, Some(GOLDEN)).unwrap();
        assert_eq!(config.scheduler, "lc");
        assert_eq!(config.rate_estimation, Some(false));
        assert_eq!(config.sync_period, Duration::from_secs(10));
        assert_eq!(
            config.hostname_override.as_deref(),
            Some("virtme-ng"),
            "the rest from the file"
        );
    }

    #[test]
    fn unused_fields_are_named_in_one_warning() {
        let text =
            format!("{GOLDEN}conntrack:\n  maxPerCore: 65536\noomScoreAdj: -999\nmode: iptables\n");
        let (_, warnings) = load(&Flags::default(), Some(&text)).unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("mode is \"iptables\"")), "{warnings:?}");
        assert!(
            warnings.iter().any(
                |w| w.ends_with("does not use these fields: conntrack.maxPerCore, oomScoreAdj")
            ),
            "{warnings:?}"
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            (
                "ipvs:\n  scheduler: fastest\n",
                "--ipvs-scheduler (ipvs.scheduler): \"fastest\" is not one of",
            ),
            ("ipvs:\n  syncPeriod: soon\n", "ipvs.syncPeriod: \"soon\" is not a duration"),
            ("clusterCIDR: 10.244.0.0/33\n", "clusterCIDR: \"10.244.0.0/33\" is not a CIDR"),
            (
                "healthzBindAddress: localhost\n",
                "healthzBindAddress: \"localhost\" is not an address and port",
            ),
            (
                "iptables:\n  masqueradeBit: 3\n",
                "--iptables-masquerade-bit (iptables.masqueradeBit): 3 must be between 14 and 31",
            ),
            (
                "nodePortAddresses: [primary, 10.0.0.0/8]\n",
                "nodePortAddresses: primary cannot be combined",
            ),
            (
                "ipvs:\n  strictARP: yes please\n",
                "ipvs.strictARP: \"yes please\" is not true or false",
            ),
        ];
        for (extra, expected) in cases {
            let text = format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{extra}"
            );
            let err = load(&Flags::default(), Some(&text)).unwrap_err();
            assert!(err.to_string().starts_with(expected), "{extra}: {err}");
        }
        let err = load(&Flags::default(), Some("kind: Deployment\n")).unwrap_err();
        assert!(err.to_string().contains("not a KubeProxyConfiguration"), "{err}");
    }

    #[test]
    fn defaults_match_kube_proxy() {
        let (config, warnings) = load(&Flags::default(), None).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(config, Config::default());
        assert_eq!(config.healthz_bind_address.port(), 10256);
        assert_eq!(config.metrics_bind_address, "127.0.0.1:10249".parse().unwrap());
        assert_eq!(config.node_port_addresses, NodePortAddresses::All);
        let flags = Flags { nodeport_addresses: Some(vec!["primary".into()]), ..Flags::default() };
        assert_eq!(load(&flags, None).unwrap().0.node_port_addresses, NodePortAddresses::Primary);
    }
}
