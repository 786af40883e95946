//! The one error type of the `kube-ipvs` library.

use std::{net::SocketAddr, path::PathBuf};

/// What can go wrong in the daemon: its configuration, its inputs, its servers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is not YAML, or not a `KubeProxyConfiguration`.
    #[error("{file}: {reason}")]
    File {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("{field}: {reason}")]
    Invalid {
        /// The flag or field, such as `ipvs.scheduler` or `--ipvs-scheduler`.
        field: String,
        /// Why.
        reason: String,
    },
    /// The manifests directory cannot be read.
    #[error("--manifests {}: {source}", dir.display())]
    Manifests {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No client for the API server could be configured.
    #[error("cannot configure the Kubernetes client: {0}")]
    Client(String),
    /// The handlers of SIGTERM and SIGINT cannot be installed.
    #[error("cannot handle signals: {0}")]
    Signal(#[source] std::io::Error),
    /// An HTTP server cannot listen.
    #[error("cannot listen on {address} for {what}: {source}")]
    Listen {
        /// What the server is for (`/healthz`, `/metrics`, a healthCheckNodePort).
        what: String,
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A kernel parameter cannot be read or set.
    #[error(transparent)]
    Sysctl(#[from] sysctl_settings::Error),
    /// The IPVS timeouts cannot be set.
    #[error("cannot set the IPVS timeouts: {0}")]
    Timeouts(#[source] ipvs_netlink::Error),
    /// The thread that reads the IPVS table for the full check cannot start, or stopped.
    #[error("the IPVS dump thread: {0}")]
    DumpThread(String),
    /// The node's kernel state cannot be read or written.
    #[error(transparent)]
    Node(#[from] controller::Error),
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}
