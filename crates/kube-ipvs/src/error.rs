//! The one error type of the `kube-ipvs` library.

use std::{net::SocketAddr, path::PathBuf};

/// What can go wrong in the daemon: its configuration, its inputs, its servers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is not YAML.
    #[error("{file}: not YAML: {source}")]
    Yaml {
        /// The file.
        file: String,
        /// What the parser said.
        #[source]
        source: serde_norway::Error,
    },
    /// The configuration file is not a `KubeProxyConfiguration`.
    #[error(
        "{file}: not a KubeProxyConfiguration of kubeproxy.config.k8s.io/v1alpha1 (kind {kind:?}, apiVersion {api_version:?})"
    )]
    NotKubeProxyConfiguration {
        /// The file.
        file: String,
        /// Its `kind`.
        kind: Option<String>,
        /// Its `apiVersion`.
        api_version: Option<String>,
    },
    /// A field of the configuration file cannot be used.
    #[error("{field}: {source}")]
    Field {
        /// The field's path, such as `ipvs.scheduler`.
        field: String,
        /// Why.
        #[source]
        source: serde_json::Error,
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
    /// The kubeconfig file cannot be read or used.
    #[error("cannot configure the Kubernetes client from {}: {source}", file.display())]
    Kubeconfig {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither a kubeconfig nor the in-cluster configuration was found.
    #[error("cannot configure the Kubernetes client: {0}")]
    InferConfig(#[source] kube::config::InferConfigError),
    /// The client for the API server cannot be built from its configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
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
    /// The thread that reads the IPVS table for the full check cannot start.
    #[error("cannot start the IPVS dump thread: {0}")]
    DumpThreadStart(#[source] std::io::Error),
    /// The IPVS dump thread cannot open its netlink socket.
    #[error("the IPVS dump thread cannot connect: {0}")]
    DumpThreadConnect(#[source] ipvs_netlink::Error),
    /// The IPVS dump thread stopped (it panicked); the next check starts another.
    #[error("the IPVS dump thread stopped")]
    DumpThreadStopped,
    /// The node's kernel state cannot be read or written.
    #[error(transparent)]
    Node(#[from] controller::Error),
}
