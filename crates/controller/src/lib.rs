//! From Kubernetes objects to the state of a node's kernel.
//!
//! [`desired`] computes, as pure functions, the IPVS virtual servers and destinations,
//! kube-ipvs0's addresses and the netfilter table's elements that Services, EndpointSlices and
//! the local Node ask for, following kube-proxy's IPVS mode except where it is known to be wrong;
//! [`reconcile`] moves the kernel's IPVS table there with the fewest changes.

pub mod desired;
pub mod reconcile;
