//! The kernel parameters IPVS-mode Service proxying needs.
//!
//! [`plan`] decides, as a pure function of the configuration and the kernel version, which
//! values the node needs; [`apply`] writes only those that differ and reports each change.
//! The `net.*` parameters belong to the network namespace the process runs in.
//!
//! | parameter | value | why |
//! |---|---|---|
//! | `net.ipv4.vs.conntrack` | 1 | netfilter must track IPVS connections to masquerade them |
//! | `net.ipv4.vs.expire_nodest_conn` | 1 | a connection to a deleted destination ends on its next packet (UDP) |
//! | `net.ipv4.vs.expire_quiescent_template` | 1 | persistence templates of a weight-0 destination expire, so affinity does not pin clients to a draining pod |
//! | `net.ipv4.ip_forward` | 1 | IPVS NAT forwards to pods |
//! | `net.ipv4.vs.conn_reuse_mode` | 0 on kernels 4.1 to 5.8, untouched from 5.9 | kubernetes#70747 (1 s SYN drops on reused ports), #81775 (side effects of 0), #93297 (kernel 5.9 fixed the cause) |
//! | `net.ipv4.conf.all.arp_ignore`, `arp_announce` | 1, 2 | only with strict ARP, for MetalLB-style L2 announcements |
//! | `net.ipv4.conf.all.route_localnet` | 1 | only with NodePorts on 127.0.0.1, which must be routed to pods |
//! | `net.ipv4.vs.run_estimation` | 0 or 1, only when asked (from 5.16) | before 6.2 the rate estimator walks every virtual server and destination every 2 s in one softirq, holding a CPU for milliseconds at tens of thousands of them |

use std::fmt;

use sysctl::Sysctl;
use tracing::{info, warn};

/// A failure to read or write one parameter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The parameter does not exist: for `net.ipv4.vs.*`, the `ip_vs` module is not loaded.
    #[error("{name} does not exist{}", if name.starts_with("net.ipv4.vs.") { " (is the ip_vs module loaded?)" } else { "" })]
    Missing {
        /// The parameter.
        name: String,
    },
    /// The parameter could not be read.
    #[error("cannot read {name}: {source}")]
    Read {
        /// The parameter.
        name: String,
        /// Why.
        #[source]
        source: sysctl::SysctlError,
    },
    /// The parameter could not be set.
    #[error("cannot set {name} to {value}: {source}")]
    Write {
        /// The parameter.
        name: String,
        /// The value it was to get.
        value: String,
        /// Why.
        #[source]
        source: sysctl::SysctlError,
    },
    /// The kernel release string did not parse.
    #[error("cannot tell the kernel version from {release:?}")]
    KernelVersion {
        /// What `kernel.osrelease` says.
        release: String,
    },
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Options that change which parameters are needed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `--ipvs-strict-arp`: answer ARP only for addresses on the receiving interface.
    pub strict_arp: bool,
    /// NodePorts on 127.0.0.1, which needs `route_localnet`.
    pub localhost_node_ports: bool,
    /// `--ipvs-rate-estimation`: IPVS's rate estimator on or off; `None` leaves it as it is.
    pub rate_estimation: Option<bool>,
}

/// A kernel version, major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl KernelVersion {
    /// Reads `major.minor` from a release string such as `6.1.0-56-amd64`.
    pub fn parse(release: &str) -> Result<Self> {
        let mut parts = release.trim().split(['.', '-']);
        let mut number = || parts.next().and_then(|p| p.parse().ok());
        match (number(), number()) {
            (Some(major), Some(minor)) => Ok(Self { major, minor }),
            _ => Err(Error::KernelVersion { release: release.to_owned() }),
        }
    }

    /// The running kernel's version.
    pub fn running() -> Result<Self> {
        Self::parse(&read("kernel.osrelease")?)
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One parameter and the value it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The parameter, dotted (`net.ipv4.vs.conntrack`).
    pub name: &'static str,
    /// Its value.
    pub value: &'static str,
}

/// What the node needs: parameters to set, and warnings about the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The parameters.
    pub settings: Vec<Setting>,
    /// Problems the settings cannot fix.
    pub warnings: Vec<String>,
}

/// The parameters the node needs, for these options on this kernel.
pub fn plan(options: Options, kernel: KernelVersion) -> Plan {
    let mut plan = Plan::default();
    let mut set = |name, value| plan.settings.push(Setting { name, value });
    set("net.ipv4.vs.conntrack", "1");
    set("net.ipv4.vs.expire_nodest_conn", "1");
    set("net.ipv4.vs.expire_quiescent_template", "1");
    set("net.ipv4.ip_forward", "1");
    let reuse_fixed = KernelVersion { major: 5, minor: 9 };
    let reuse_minimum = KernelVersion { major: 4, minor: 1 };
    if kernel >= reuse_minimum && kernel < reuse_fixed {
        set("net.ipv4.vs.conn_reuse_mode", "0");
    }
    if options.strict_arp {
        set("net.ipv4.conf.all.arp_ignore", "1");
        set("net.ipv4.conf.all.arp_announce", "2");
    }
    if options.localhost_node_ports {
        set("net.ipv4.conf.all.route_localnet", "1");
    }
    let run_estimation = KernelVersion { major: 5, minor: 16 };
    match options.rate_estimation {
        Some(on) if kernel >= run_estimation => {
            set("net.ipv4.vs.run_estimation", if on { "1" } else { "0" });
        }
        Some(false) => plan.warnings.push(format!(
            "kernel {kernel} is older than 5.16: IPVS rate estimation cannot be turned off \
             (net.ipv4.vs.run_estimation does not exist)"
        )),
        Some(true) | None => {}
    }
    if kernel < reuse_minimum {
        plan.warnings.push(format!(
            "kernel {kernel} is older than 4.1: IPVS drops the first packet of connections that \
             reuse a port, and net.ipv4.vs.conn_reuse_mode cannot prevent it"
        ));
    }
    plan
}

/// A parameter that [`apply`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The parameter.
    pub name: &'static str,
    /// Its value before.
    pub from: String,
    /// Its value now.
    pub to: &'static str,
}

fn read(name: &str) -> Result<String> {
    let ctl = sysctl::Ctl::new(name).map_err(|source| match source {
        sysctl::SysctlError::NotFound(_) => Error::Missing { name: name.to_owned() },
        source => Error::Read { name: name.to_owned(), source },
    })?;
    ctl.value_string()
        .map(|value| value.trim().to_owned())
        .map_err(|source| Error::Read { name: name.to_owned(), source })
}

/// Sets every parameter of the plan that differs, and returns what changed. Every parameter
/// is tried; the first failure is returned after the others were set.
pub fn apply(plan: &Plan) -> Result<Vec<Change>> {
    for warning in &plan.warnings {
        warn!("{warning}");
    }
    let mut changes = Vec::new();
    let mut first_error = None;
    for setting in &plan.settings {
        match apply_one(setting) {
            Ok(Some(change)) => {
                info!(parameter = change.name, from = %change.from, to = change.to, "set kernel parameter");
                changes.push(change);
            }
            Ok(None) => {}
            Err(err) => {
                warn!(%err, "kernel parameter not set");
                first_error.get_or_insert(err);
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(changes),
    }
}

fn apply_one(setting: &Setting) -> Result<Option<Change>> {
    let current = read(setting.name)?;
    if current == setting.value {
        return Ok(None);
    }
    let ctl = sysctl::Ctl::new(setting.name)
        .map_err(|source| Error::Read { name: setting.name.to_owned(), source })?;
    ctl.set_value_string(setting.value).map_err(|source| Error::Write {
        name: setting.name.to_owned(),
        value: setting.value.to_owned(),
        source,
    })?;
    Ok(Some(Change { name: setting.name, from: current, to: setting.value }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(plan: &Plan) -> Vec<&str> {
        plan.settings.iter().map(|s| s.name).collect()
    }

    fn kernel(major: u32, minor: u32) -> KernelVersion {
        KernelVersion { major, minor }
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(KernelVersion::parse("6.1.0-56-amd64").unwrap(), kernel(6, 1));
        assert_eq!(KernelVersion::parse("5.10.226\n").unwrap(), kernel(5, 10));
        assert_eq!(KernelVersion::parse("4.19-rc3").unwrap(), kernel(4, 19));
        assert!(KernelVersion::parse("linux").is_err());
    }

    #[test]
    fn the_base_settings_on_a_current_kernel() {
        let plan = plan(Options::default(), kernel(6, 1));
        assert_eq!(
            names(&plan),
            [
                "net.ipv4.vs.conntrack",
                "net.ipv4.vs.expire_nodest_conn",
                "net.ipv4.vs.expire_quiescent_template",
                "net.ipv4.ip_forward"
            ]
        );
        assert!(plan.settings.iter().all(|s| s.value == "1"));
        assert!(plan.warnings.is_empty());
    }

    #[test]
    fn conn_reuse_mode_follows_the_kernel_version() {
        let reuse = |k| {
            plan(Options::default(), k)
                .settings
                .into_iter()
                .find(|s| s.name == "net.ipv4.vs.conn_reuse_mode")
                .map(|s| s.value)
        };
        assert_eq!(reuse(kernel(4, 0)), None);
        assert_eq!(reuse(kernel(4, 1)), Some("0"));
        assert_eq!(reuse(kernel(5, 8)), Some("0"));
        assert_eq!(reuse(kernel(5, 9)), None, "fixed in 5.9: left as the kernel has it");
        assert_eq!(reuse(kernel(6, 1)), None);
        assert_eq!(plan(Options::default(), kernel(3, 10)).warnings.len(), 1);
    }

    #[test]
    fn options_add_their_settings() {
        let options =
            Options { strict_arp: true, localhost_node_ports: true, rate_estimation: None };
        let plan = plan(options, kernel(6, 1));
        let names = names(&plan);
        assert!(names.contains(&"net.ipv4.conf.all.arp_ignore"));
        assert!(names.contains(&"net.ipv4.conf.all.arp_announce"));
        assert!(names.contains(&"net.ipv4.conf.all.route_localnet"));
    }

    #[test]
    fn rate_estimation_is_set_only_when_asked() {
        let estimation = |rate_estimation, k| {
            let plan = plan(Options { rate_estimation, ..Options::default() }, k);
            let value = plan
                .settings
                .iter()
                .find(|s| s.name == "net.ipv4.vs.run_estimation")
                .map(|s| s.value);
            (value, plan.warnings.len())
        };
        assert_eq!(estimation(None, kernel(6, 1)), (None, 0), "left as the kernel has it");
        assert_eq!(estimation(Some(false), kernel(6, 1)), (Some("0"), 0));
        assert_eq!(estimation(Some(true), kernel(5, 16)), (Some("1"), 0));
        assert_eq!(estimation(Some(false), kernel(5, 15)), (None, 1), "cannot be turned off");
        assert_eq!(estimation(Some(true), kernel(5, 15)), (None, 0), "always on there");
    }

    #[test]
    fn a_missing_ipvs_parameter_points_at_the_module() {
        let err = Error::Missing { name: "net.ipv4.vs.conntrack".into() };
        assert_eq!(
            err.to_string(),
            "net.ipv4.vs.conntrack does not exist (is the ip_vs module loaded?)"
        );
    }
}
