//! The daemon's configuration: kube-proxy's flags, an existing kube-proxy
//! `KubeProxyConfiguration` file, and kube-ipvs's own options.
//!
//! A value comes from the flag if it is given, else from the file, else the default. Fields of
//! the file kube-ipvs does not use are named in one warning; a value that cannot be used is an
//! error that names the field and says why.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ipnetwork::IpNetwork;
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

/// The fields of a `KubeProxyConfiguration` kube-ipvs uses.
const USED: &[&str] = &[
    "apiVersion",
    "kind",
    "mode",
    "clientConnection.kubeconfig",
    "hostnameOverride",
    "clusterCIDR",
    "nodePortAddresses",
    "iptables.masqueradeAll",
    "iptables.masqueradeBit",
    "ipvs.scheduler",
    "ipvs.syncPeriod",
    "ipvs.minSyncPeriod",
    "ipvs.excludeCIDRs",
    "ipvs.strictARP",
    "ipvs.tcpTimeout",
    "ipvs.tcpFinTimeout",
    "ipvs.udpTimeout",
    "healthzBindAddress",
    "metricsBindAddress",
];

/// Every leaf field of a YAML document, as dotted paths, with its value.
fn leaves(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                leaves(&path, value, out);
            }
        }
        _ => out.push((prefix.to_owned(), value.clone())),
    }
}

/// A field that is absent, null, an empty string or a zero duration counts as not set, as
/// kube-proxy's defaulting does.
fn set(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| !v.is_null() && v.as_str() != Some(""))
}

fn get<'a>(document: &'a Value, path: &str) -> Option<&'a Value> {
    set(path.split('.').try_fold(document, |v, key| v.get(key)))
}

fn string(field: &str, value: &Value) -> Result<String, Error> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid(field, format!("{value} is not a string")))
}

fn boolean(field: &str, value: &Value) -> Result<bool, Error> {
    value.as_bool().ok_or_else(|| invalid(field, format!("{value} is not true or false")))
}

fn duration(field: &str, text: &str) -> Result<Duration, Error> {
    humantime::parse_duration(text)
        .map_err(|err| invalid(field, format!("{text:?} is not a duration: {err}")))
}

fn cidrs(field: &str, items: impl IntoIterator<Item = String>) -> Result<Vec<IpNetwork>, Error> {
    items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| invalid(field, format!("{s:?} is not a CIDR"))))
        .collect()
}

fn list(field: &str, value: &Value) -> Result<Vec<String>, Error> {
    match value {
        Value::Array(items) => items.iter().map(|v| string(field, v)).collect(),
        other => Err(invalid(field, format!("{other} is not a list"))),
    }
}

/// `host:port`, or `:port` (every address), as kube-proxy accepts.
fn bind_address(field: &str, text: &str) -> Result<SocketAddr, Error> {
    let full = if text.starts_with(':') { format!("0.0.0.0{text}") } else { text.to_owned() };
    full.parse().map_err(|_| invalid(field, format!("{text:?} is not an address and port")))
}

fn node_port_addresses(field: &str, items: Vec<String>) -> Result<NodePortAddresses, Error> {
    if items.iter().any(|s| s == "primary") {
        return if items.len() == 1 {
            Ok(NodePortAddresses::Primary)
        } else {
            Err(invalid(field, "primary cannot be combined with CIDRs"))
        };
    }
    let cidrs = cidrs(field, items)?;
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
        .map_err(|err| Error::File { file: file.to_owned(), reason: format!("not YAML: {err}") })?;
    let kind = document.get("kind").and_then(Value::as_str);
    let api_version = document.get("apiVersion").and_then(Value::as_str);
    if kind != Some("KubeProxyConfiguration")
        || api_version != Some("kubeproxy.config.k8s.io/v1alpha1")
    {
        return Err(Error::File {
            file: file.to_owned(),
            reason: format!(
                "not a KubeProxyConfiguration of kubeproxy.config.k8s.io/v1alpha1 (kind {kind:?}, apiVersion {api_version:?})"
            ),
        });
    }
    if let Some(mode) = get(&document, "mode").and_then(Value::as_str).filter(|m| *m != "ipvs") {
        warnings.push(format!("{file}: mode is {mode:?}; kube-ipvs always proxies with IPVS"));
    }
    let mut all = Vec::new();
    leaves("", &document, &mut all);
    let ignored: Vec<String> = all
        .into_iter()
        .filter(|(path, value)| !USED.contains(&path.as_str()) && set(Some(value)).is_some())
        .map(|(path, _)| path)
        .collect();
    if !ignored.is_empty() {
        warnings
            .push(format!("{file}: kube-ipvs does not use these fields: {}", ignored.join(", ")));
    }

    if let Some(v) = get(&document, "clientConnection.kubeconfig") {
        config.kubeconfig = Some(string("clientConnection.kubeconfig", v)?.into());
    }
    if let Some(v) = get(&document, "hostnameOverride") {
        config.hostname_override = Some(string("hostnameOverride", v)?);
    }
    if let Some(v) = get(&document, "clusterCIDR") {
        config.cluster_cidrs =
            cidrs("clusterCIDR", string("clusterCIDR", v)?.split(',').map(str::to_owned))?;
    }
    if let Some(v) = get(&document, "nodePortAddresses") {
        config.node_port_addresses =
            node_port_addresses("nodePortAddresses", list("nodePortAddresses", v)?)?;
    }
    if let Some(v) = get(&document, "iptables.masqueradeAll") {
        config.masquerade_all = boolean("iptables.masqueradeAll", v)?;
    }
    if let Some(v) = get(&document, "iptables.masqueradeBit") {
        config.masquerade_bit = v
            .as_u64()
            .and_then(|b| u8::try_from(b).ok())
            .ok_or_else(|| invalid("iptables.masqueradeBit", format!("{v} is not a bit number")))?;
    }
    if let Some(v) = get(&document, "ipvs.scheduler") {
        config.scheduler = string("ipvs.scheduler", v)?;
    }
    if let Some(v) = get(&document, "ipvs.excludeCIDRs") {
        config.exclude_cidrs = cidrs("ipvs.excludeCIDRs", list("ipvs.excludeCIDRs", v)?)?;
    }
    if let Some(v) = get(&document, "ipvs.strictARP") {
        config.strict_arp = boolean("ipvs.strictARP", v)?;
    }
    for (field, target) in [
        ("ipvs.syncPeriod", &mut config.sync_period),
        ("ipvs.minSyncPeriod", &mut config.min_sync_period),
        ("ipvs.tcpTimeout", &mut config.tcp_timeout),
        ("ipvs.tcpFinTimeout", &mut config.tcp_fin_timeout),
        ("ipvs.udpTimeout", &mut config.udp_timeout),
    ] {
        if let Some(v) = get(&document, field) {
            let value = duration(field, &string(field, v)?)?;
            // kube-proxy treats a zero sync period as "use the default".
            if !(field == "ipvs.syncPeriod" && value.is_zero()) {
                *target = value;
            }
        }
    }
    for (field, target) in [
        ("healthzBindAddress", &mut config.healthz_bind_address),
        ("metricsBindAddress", &mut config.metrics_bind_address),
    ] {
        if let Some(v) = get(&document, field) {
            *target = bind_address(field, &string(field, v)?)?;
        }
    }
    Ok(())
}

fn apply_flags(config: &mut Config, flags: &Flags) -> Result<(), Error> {
    if let Some(v) = &flags.kubeconfig {
        config.kubeconfig = Some(v.clone());
    }
    if let Some(v) = &flags.hostname_override {
        config.hostname_override = Some(v.clone());
    }
    if let Some(v) = &flags.cluster_cidr {
        config.cluster_cidrs = cidrs("--cluster-cidr", v.split(',').map(str::to_owned))?;
    }
    if let Some(v) = &flags.nodeport_addresses {
        config.node_port_addresses = node_port_addresses("--nodeport-addresses", v.clone())?;
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
        config.exclude_cidrs = cidrs("--ipvs-exclude-cidrs", v.split(',').map(str::to_owned))?;
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
        config.healthz_bind_address = bind_address("--healthz-bind-address", v)?;
    }
    if let Some(v) = &flags.metrics_bind_address {
        config.metrics_bind_address = bind_address("--metrics-bind-address", v)?;
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
