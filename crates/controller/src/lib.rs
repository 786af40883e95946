//! From Kubernetes objects to the state of a node's kernel.
//!
//! [`desired`] computes, as pure functions, the IPVS virtual servers and destinations,
//! kube-ipvs0's addresses and the netfilter table's elements that Services, EndpointSlices and
//! the local Node ask for, following kube-proxy's IPVS mode except where it is known to be wrong;
//! [`changes`] tracks the objects as watch events change them and says which Services to
//! recompute; [`reconcile`] moves the kernel's IPVS table there with the fewest changes; [`node`] does so
//! for the whole node, netfilter table and kube-ipvs0 included.

pub mod changes;
pub mod desired;
pub mod node;
pub mod reconcile;

/// A failure to read or write the node's kernel state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// IPVS.
    #[error(transparent)]
    Ipvs(#[from] ipvs_netlink::Error),
    /// The netfilter table.
    #[error(transparent)]
    Netfilter(#[from] netfilter::Error),
    /// kube-ipvs0.
    #[error(transparent)]
    Link(#[from] dummy_link::Error),
}
