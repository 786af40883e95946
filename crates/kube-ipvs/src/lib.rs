//! The `kube-ipvs` program's own parts: its configuration. The data plane and the controller
//! are the crates `ipvs-netlink`, `dummy-link`, `netfilter`, `sysctl-settings`, `conntrack` and
//! `controller`.

pub mod config;
