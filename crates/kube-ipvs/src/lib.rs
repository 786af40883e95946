//! The `kube-ipvs` daemon's own parts, in the order data flows through them:
//!
//! - [`source`]: Services, EndpointSlices and the Node, watched from the API server or read
//!   from a directory of manifests, as one stream of watch events;
//! - [`proxier`]: the loop's body: events into the change tracker (crate `controller`), and
//!   what changed onto the node through its I/O; [`schedule`]: when it syncs and checks;
//! - [`health`], [`metrics`], [`service_health`]: what the sync loop reports, served over HTTP
//!   by [`http`] as kube-proxy serves it;
//! - [`inspect`]: what the daemon programmed, for `kube-ipvs ls` and its `--diff`;
//! - [`config`]: kube-proxy's flags and `KubeProxyConfiguration`, and kube-ipvs's own options;
//! - [`dumper`]: the full check's read of the IPVS table, on a low-priority thread;
//! - [`daemon`]: `kube-ipvs run`, which wires them together.
//!
//! The data plane and the desired-state computation are the crates `ipvs-netlink`,
//! `dummy-link`, `netfilter`, `sysctl-settings`, `conntrack` and `controller`.

pub mod config;
pub mod daemon;
pub mod dumper;
mod error;
pub mod health;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod proxier;
pub mod schedule;
pub mod service_health;
pub mod source;

pub use error::Error;
