//! The difference between what the kernel holds and what it should hold, as IPVS changes.
//! Pure functions.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    sync::Arc,
};

use ipvs_netlink::{Change, Destination, Protocol, ServiceKey, VirtualService};

use crate::desired::{Destinations, VirtualServer};

/// One virtual server as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelServer {
    /// The virtual service (shared with the desired state where the two are equal).
    pub service: Arc<VirtualService>,
    /// Its destinations, by address.
    pub destinations: Destinations,
}

/// The IPVS state kube-ipvs owns, by key.
pub type KernelState = BTreeMap<ServiceKey, KernelServer>;

/// Each virtual server's [`KernelServer::config_digest`], by key: what the periodic check reads
/// from the kernel, a few bytes per virtual server instead of all its destinations.
pub type KernelDigests = BTreeMap<ServiceKey, u64>;

impl KernelServer {
    /// A digest of what the kernel is configured with: two virtual servers have the same
    /// digest when, and (but for a 64-bit collision) only when, their services and all their
    /// destinations have the same configuration (`same_config`). Stable within a process.
    pub fn config_digest(&self) -> u64 {
        config_digest(&self.service, self.destinations.iter())
    }
}

/// [`KernelServer::config_digest`] of `service` with `destinations`, in address order.
pub fn config_digest<'a>(
    service: &VirtualService,
    destinations: impl ExactSizeIterator<Item = &'a Destination>,
) -> u64 {
    let mut hasher = DefaultHasher::new();
    service.hash_config(&mut hasher);
    destinations.len().hash(&mut hasher);
    for destination in destinations {
        destination.hash_config(&mut hasher);
    }
    hasher.finish()
}

/// Whether a removed destination of this virtual server drains (weight 0 until its connections
/// end) rather than going at once: TCP and SCTP drain, UDP goes at once (its "connections" never
/// end by themselves, kubernetes#71514).
pub fn drains(key: &ServiceKey) -> bool {
    match key {
        ServiceKey::Inet { protocol, .. } => *protocol != Protocol::Udp,
        // A firewall-mark service carries whatever its mark selects; treat it as TCP.
        ServiceKey::Fwmark { .. } => true,
    }
}

/// What to do to one virtual server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The changes, in the order they must be applied.
    pub changes: Vec<Change>,
    /// Destinations set to weight 0 to drain, to delete once their connections end.
    pub draining: Vec<(ServiceKey, SocketAddr)>,
}

/// The changes that take the kernel's virtual server `current` to `desired` (either may be
/// absent). Destinations already draining (weight 0, not desired) are left as they are.
pub fn plan(
    key: ServiceKey,
    current: Option<&KernelServer>,
    desired: Option<&VirtualServer>,
) -> Plan {
    let mut plan = Plan::default();
    match (current, desired) {
        (None, None) => {}
        (None, Some(desired)) => {
            plan.changes.push(Change::AddService(VirtualService::clone(&desired.service)));
            for destination in &desired.destinations {
                plan.changes.push(Change::AddDestination(key, *destination));
            }
        }
        (Some(_), None) => plan.changes.push(Change::DeleteService(key)),
        (Some(current), Some(desired)) => {
            if !current.service.same_config(&desired.service) {
                plan.changes.push(Change::UpdateService(VirtualService::clone(&desired.service)));
            }
            for wanted in &desired.destinations {
                match current.destinations.get(&wanted.address) {
                    None => plan.changes.push(Change::AddDestination(key, *wanted)),
                    // A draining destination that is wanted again gets its weight back.
                    Some(have) if !have.same_config(wanted) => {
                        plan.changes.push(Change::UpdateDestination(key, *wanted))
                    }
                    Some(_) => {}
                }
            }
            let extra = current
                .destinations
                .iter()
                .filter(|d| !desired.destinations.contains_key(&d.address));
            for have in extra {
                let address = &have.address;
                if !drains(&key) {
                    plan.changes.push(Change::DeleteDestination(key, *address));
                } else if have.weight != 0 {
                    plan.changes.push(Change::UpdateDestination(key, have.with_weight(0)));
                    plan.draining.push((key, *address));
                } else {
                    // Already at weight 0: still draining from an earlier change.
                    plan.draining.push((key, *address));
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{Exposure, ServicePortName};
    use ipvs_netlink::Destination;

    fn key(protocol: Protocol) -> ServiceKey {
        ServiceKey::Inet { protocol, address: "10.96.0.10:80".parse().unwrap() }
    }

    fn dest(address: &str) -> Destination {
        Destination::new(address.parse().unwrap())
    }

    fn desired(key: ServiceKey, scheduler: &str, destinations: &[&str]) -> VirtualServer {
        VirtualServer {
            service: Arc::new(VirtualService::new(key, scheduler)),
            destinations: destinations.iter().map(|d| dest(d)).collect(),
            owner: ServicePortName {
                namespace: "ns".into(),
                name: "web".into(),
                port: "http".into(),
            },
            exposure: Exposure::ClusterIp,
        }
    }

    fn kernel(key: ServiceKey, scheduler: &str, destinations: &[Destination]) -> KernelServer {
        KernelServer {
            service: Arc::new(VirtualService::new(key, scheduler)),
            destinations: destinations.iter().copied().collect(),
        }
    }

    #[test]
    fn the_config_digest_follows_same_config() {
        let k = key(Protocol::Tcp);
        let a = dest("10.244.0.1:8080");
        let b = dest("10.244.0.2:8080");
        let base = kernel(k, "rr", &[a, b]);
        let digest = base.config_digest();
        assert_eq!(kernel(k, "rr", &[b, a]).config_digest(), digest, "order does not count");

        let mut hashed = base.clone();
        Arc::make_mut(&mut hashed.service).flags |= ipvs_netlink::ServiceFlags::HASHED;
        assert_eq!(hashed.config_digest(), digest, "the kernel's own flag does not count");
        let mut tunnel_settings = base.clone();
        let mut with_port = a;
        with_port.tunnel_port = 4789;
        tunnel_settings.destinations.insert(with_port);
        assert_eq!(tunnel_settings.config_digest(), digest, "unused tunnel settings do not count");

        let mut weight = base.clone();
        let mut draining = a;
        draining.weight = 0;
        weight.destinations.insert(draining);
        let mut tunnelled = tunnel_settings.clone();
        let mut through_tunnel = with_port;
        through_tunnel.forward = ipvs_netlink::ForwardMethod::Tunnel;
        tunnelled.destinations.insert(through_tunnel);
        let mut tunnelled_other_port = tunnelled.clone();
        through_tunnel.tunnel_port = 6081;
        tunnelled_other_port.destinations.insert(through_tunnel);
        let mut timeout = base.clone();
        Arc::make_mut(&mut timeout.service).timeout = 10_800;
        for (what, other) in [
            ("a weight", weight),
            ("a destination fewer", kernel(k, "rr", &[a])),
            ("the scheduler", kernel(k, "wrr", &[a, b])),
            ("the protocol", kernel(key(Protocol::Udp), "rr", &[a, b])),
            ("the timeout", timeout),
            ("a tunnelled destination", tunnelled_other_port.clone()),
        ] {
            assert_ne!(other.config_digest(), digest, "{what} counts");
        }
        assert_ne!(tunnelled.config_digest(), tunnelled_other_port.config_digest());
    }

    #[test]
    fn nothing_changed_is_no_change() {
        let k = key(Protocol::Tcp);
        let plan = plan(
            k,
            Some(&kernel(k, "rr", &[dest("10.244.0.1:8080")])),
            Some(&desired(k, "rr", &["10.244.0.1:8080"])),
        );
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn a_new_virtual_server_is_added_with_its_destinations() {
        let k = key(Protocol::Tcp);
        let plan = plan(k, None, Some(&desired(k, "rr", &["10.244.0.1:8080", "10.244.0.2:8080"])));
        assert_eq!(plan.changes.len(), 3);
        assert!(matches!(plan.changes[0], Change::AddService(_)));
    }

    #[test]
    fn one_endpoint_added_is_exactly_one_new_destination() {
        let k = key(Protocol::Tcp);
        let plan = plan(
            k,
            Some(&kernel(k, "rr", &[dest("10.244.0.1:8080")])),
            Some(&desired(k, "rr", &["10.244.0.1:8080", "10.244.0.2:8080"])),
        );
        assert_eq!(plan.changes, [Change::AddDestination(k, dest("10.244.0.2:8080"))]);
    }

    #[test]
    fn a_removed_tcp_endpoint_drains_and_a_udp_one_goes_at_once() {
        let tcp = key(Protocol::Tcp);
        let plan_tcp = plan(
            tcp,
            Some(&kernel(tcp, "rr", &[dest("10.244.0.1:8080"), dest("10.244.0.2:8080")])),
            Some(&desired(tcp, "rr", &["10.244.0.1:8080"])),
        );
        assert_eq!(
            plan_tcp.changes,
            [Change::UpdateDestination(tcp, dest("10.244.0.2:8080").with_weight(0))]
        );
        assert_eq!(plan_tcp.draining, [(tcp, "10.244.0.2:8080".parse().unwrap())]);
        let udp = key(Protocol::Udp);
        let plan_udp = plan(
            udp,
            Some(&kernel(udp, "rr", &[dest("10.244.0.1:53"), dest("10.244.0.2:53")])),
            Some(&desired(udp, "rr", &["10.244.0.1:53"])),
        );
        assert_eq!(
            plan_udp.changes,
            [Change::DeleteDestination(udp, "10.244.0.2:53".parse().unwrap())]
        );
        assert!(plan_udp.draining.is_empty());
    }

    #[test]
    fn a_draining_destination_that_returns_gets_its_weight_back() {
        let k = key(Protocol::Tcp);
        let plan = plan(
            k,
            Some(&kernel(k, "rr", &[dest("10.244.0.2:8080").with_weight(0)])),
            Some(&desired(k, "rr", &["10.244.0.2:8080"])),
        );
        assert_eq!(plan.changes, [Change::UpdateDestination(k, dest("10.244.0.2:8080"))]);
        assert!(plan.draining.is_empty());
    }

    #[test]
    fn a_changed_scheduler_updates_in_place_and_a_gone_service_is_deleted() {
        let k = key(Protocol::Tcp);
        let plan_changed = plan(k, Some(&kernel(k, "rr", &[])), Some(&desired(k, "lc", &[])));
        assert_eq!(plan_changed.changes, [Change::UpdateService(VirtualService::new(k, "lc"))]);
        let plan_gone = plan(k, Some(&kernel(k, "rr", &[dest("10.244.0.1:8080")])), None);
        assert_eq!(plan_gone.changes, [Change::DeleteService(k)]);
    }
}
