//! What the daemon last programmed, as it publishes it on `/virtualservers`, and what
//! `kube-ipvs ls` makes of it: the kernel's table annotated with each virtual server's
//! Service, and the difference between what is desired and what the kernel holds.

use std::collections::{BTreeMap, BTreeSet};

use controller::desired::{DesiredState, Exposure};
use ipvs_netlink::{Destination, ServiceFlags, ServiceKey};
use ipvsadm_listing::{self as listing, TableEntry};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// One virtual server kube-ipvs programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServerView {
    /// The Service port it implements: `namespace/name:port`.
    pub service: String,
    /// What kind of address it is on: `ClusterIP`, `NodePort`, `LoadBalancer`,
    /// `ExternalIP`, or `Local` (the firewall-mark one of `externalTrafficPolicy: Local`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its scheduler.
    pub scheduler: String,
    /// What `ls --diff` compares of the virtual service, by name: scheduler, scheduler
    /// flags, persistence timeout, netmask, one-packet scheduling, persistence engine.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Its destinations (`address:port`): weight and forwarding method.
    pub destinations: BTreeMap<String, DestinationView>,
}

/// One destination of a [`VirtualServerView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationView {
    /// Its weight.
    pub weight: u32,
    /// Its forwarding method, as `ipvsadm -Ln` names it (`Masq`).
    pub forward: String,
}

impl From<&Destination> for DestinationView {
    fn from(destination: &Destination) -> Self {
        Self { weight: destination.weight, forward: destination.forward.name().to_owned() }
    }
}

/// The properties of a virtual service that `ls --diff` compares, each with a name (the
/// scheduler's is `scheduler`; the others as `ipvsadm -Ln` names them).
pub fn properties(service: &ipvs_netlink::VirtualService) -> BTreeMap<String, String> {
    let persistent = service.flags.contains(ServiceFlags::PERSISTENT);
    [
        ("scheduler", service.scheduler.clone()),
        ("scheduler-flags", listing::scheduler_flags(service).join(",")),
        ("persistent", if persistent { service.timeout.to_string() } else { "no".into() }),
        ("mask", service.netmask.to_string()),
        ("ops", service.flags.contains(ServiceFlags::ONE_PACKET).to_string()),
        ("pe", service.persistence_engine.clone().unwrap_or_default()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// Everything the daemon programs, by virtual server (`TCP 10.96.0.1:443`, `FWM 1048577`,
/// as [`ServiceKey`] displays them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Programmed {
    /// The desired virtual servers.
    pub virtual_servers: BTreeMap<String, VirtualServerView>,
    /// The virtual servers kube-ipvs owns in the kernel, as far as it knows.
    pub owned: BTreeSet<String>,
    /// Destinations draining before they are deleted: `TCP 10.96.0.1:443 -> 10.0.0.1:6443`.
    #[serde(default)]
    pub draining: BTreeSet<String>,
    /// The addresses bound to kube-ipvs0.
    #[serde(default)]
    pub addresses: BTreeSet<String>,
    /// The elements of the nftables table's sets, as `netfilter::expected_keys` gives them.
    #[serde(default)]
    pub netfilter: netfilter::ExpectedKeys,
}

/// What the sync loop last programmed, copied when asked.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The desired state last applied.
    pub desired: DesiredState,
    /// The virtual servers kube-ipvs owns in the kernel.
    pub owned: Vec<ServiceKey>,
    /// The destinations draining.
    pub draining: Vec<(ServiceKey, std::net::SocketAddr)>,
}

impl Snapshot {
    /// The view `kube-ipvs ls` reads.
    pub fn programmed(&self) -> Programmed {
        Programmed::new(&self.desired, &self.owned, &self.draining)
    }

    /// The Service port a virtual server implements: `namespace/name:port`.
    pub fn service_of(&self, key: &ServiceKey) -> Option<String> {
        self.desired.virtual_servers.get(key).map(|server| server.owner.to_string())
    }
}

/// A request for a [`Snapshot`], answered by the sync loop between syncs.
pub type SnapshotRequest = oneshot::Sender<Snapshot>;

/// The requests for a [`Snapshot`] the sync loop answers.
pub type SnapshotRequests = mpsc::Receiver<SnapshotRequest>;

/// The HTTP server's side: asks the sync loop for a [`Snapshot`]. The sync loop copies its
/// state only when asked, so a sync costs what changed, never the size of the whole table.
#[derive(Debug, Clone)]
pub struct Published {
    requests: mpsc::Sender<SnapshotRequest>,
}

impl Published {
    /// A handle, and the requests the sync loop answers.
    pub fn new() -> (Self, SnapshotRequests) {
        let (requests, receiver) = mpsc::channel(16);
        (Self { requests }, receiver)
    }

    /// What the sync loop programmed; `None` if it does not answer within `timeout` (it is
    /// in a long sync) or has stopped.
    pub async fn snapshot(&self, timeout: std::time::Duration) -> Option<Snapshot> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(reply).await.ok()?;
        tokio::time::timeout(timeout, answer).await.ok()?.ok()
    }
}

/// The name of an [`Exposure`] in listings.
pub fn kind_name(exposure: Exposure) -> &'static str {
    match exposure {
        Exposure::ClusterIp => "ClusterIP",
        Exposure::ExternalIp => "ExternalIP",
        Exposure::LoadBalancer => "LoadBalancer",
        Exposure::NodePort => "NodePort",
        Exposure::LocalOnly => "Local",
    }
}

impl Programmed {
    /// The view of a desired state, with the kernel virtual servers kube-ipvs owns and the
    /// destinations draining.
    pub fn new<'a>(
        desired: &DesiredState,
        owned: impl IntoIterator<Item = &'a ServiceKey>,
        draining: impl IntoIterator<Item = &'a (ServiceKey, std::net::SocketAddr)>,
    ) -> Self {
        let virtual_servers = desired
            .virtual_servers
            .iter()
            .map(|(key, server)| {
                let view = VirtualServerView {
                    service: server.owner.to_string(),
                    kind: kind_name(server.exposure).to_owned(),
                    scheduler: server.service.scheduler.clone(),
                    properties: properties(&server.service),
                    destinations: server
                        .destinations
                        .iter()
                        .map(|d| (d.address.to_string(), d.into()))
                        .collect(),
                };
                (key.to_string(), view)
            })
            .collect();
        Self {
            virtual_servers,
            owned: owned.into_iter().map(ToString::to_string).collect(),
            draining: draining
                .into_iter()
                .map(|(key, address)| format!("{key} -> {address}"))
                .collect(),
            addresses: desired.elements.vips.iter().map(ToString::to_string).collect(),
            netfilter: netfilter::expected_keys(&desired.elements),
        }
    }

    /// The note `ls` puts after a virtual server's line: `# ns/web:http ClusterIP`.
    pub fn annotation(&self, key: &ServiceKey) -> Option<String> {
        let view = self.virtual_servers.get(&key.to_string())?;
        Some(format!("# {} {}", view.service, view.kind))
    }

    /// What differs between the desired virtual servers and the kernel's table, one line
    /// each: `+` desired but missing, `-` owned but not desired, `~` different. Draining
    /// destinations are on their way out, and no difference.
    pub fn diff(&self, kernel: &[TableEntry]) -> Vec<String> {
        let kernel: BTreeMap<String, &TableEntry> =
            kernel.iter().map(|entry| (entry.0.service.key.to_string(), entry)).collect();
        let mut lines = Vec::new();
        for (key, view) in &self.virtual_servers {
            let Some((service, destinations)) = kernel.get(key).copied() else {
                lines.push(format!("+ {key} {}  # {} {}", view.scheduler, view.service, view.kind));
                continue;
            };
            let found = properties(&service.service);
            for (name, desired) in &view.properties {
                let actual = found.get(name).map_or("", String::as_str);
                if actual != desired {
                    lines.push(format!(
                        "~ {key} {name} {actual} (desired {desired})  # {}",
                        view.service
                    ));
                }
            }
            let found: BTreeMap<String, DestinationView> = destinations
                .iter()
                .map(|d| (d.destination.address.to_string(), (&d.destination).into()))
                .collect();
            for (address, wanted) in &view.destinations {
                let weight = wanted.weight;
                let Some(actual) = found.get(address) else {
                    lines.push(format!("+ {key} -> {address} weight {weight}  # {}", view.service));
                    continue;
                };
                if actual.weight != weight {
                    lines.push(format!(
                        "~ {key} -> {address} weight {} (desired {weight})  # {}",
                        actual.weight, view.service
                    ));
                }
                if actual.forward != wanted.forward {
                    lines.push(format!(
                        "~ {key} -> {address} forward {} (desired {})  # {}",
                        actual.forward, wanted.forward, view.service
                    ));
                }
            }
            for (address, actual) in &found {
                let draining = self.draining.contains(&format!("{key} -> {address}"));
                if !view.destinations.contains_key(address) && !draining {
                    lines.push(format!(
                        "- {key} -> {address} weight {}  # {}",
                        actual.weight, view.service
                    ));
                }
            }
        }
        for key in kernel.keys() {
            if self.owned.contains(key) && !self.virtual_servers.contains_key(key) {
                lines.push(format!("- {key}"));
            }
        }
        lines
    }

    /// What differs between the desired kube-ipvs0 addresses and those bound: `+ address`
    /// missing, `- address` not desired.
    pub fn diff_addresses(&self, bound: &BTreeSet<std::net::IpAddr>) -> Vec<String> {
        let bound: BTreeSet<String> = bound.iter().map(ToString::to_string).collect();
        let missing = self.addresses.difference(&bound).map(|a| format!("+ kube-ipvs0 {a}"));
        let extra = bound.difference(&self.addresses).map(|a| format!("- kube-ipvs0 {a}"));
        missing.chain(extra).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipvs_netlink::{Destination, DestinationEntry, ServiceEntry};

    fn entry(key: &str, scheduler: &str, destinations: &[(&str, u32)]) -> TableEntry {
        let (protocol, address) = key.split_once(' ').unwrap();
        let protocol = match protocol {
            "TCP" => ipvs_netlink::Protocol::Tcp,
            _ => ipvs_netlink::Protocol::Udp,
        };
        let service_key = ServiceKey::Inet { protocol, address: address.parse().unwrap() };
        let service = ipvs_netlink::VirtualService::new(service_key, scheduler);
        let destinations = destinations
            .iter()
            .map(|(address, weight)| {
                DestinationEntry::new(
                    Destination::new(address.parse().unwrap()).with_weight(*weight),
                )
            })
            .collect();
        (ServiceEntry { service, stats: None, stats64: None }, destinations)
    }

    fn view(scheduler: &str, destinations: &[(&str, u32)]) -> VirtualServerView {
        let key = ServiceKey::tcp("10.96.0.1:80".parse().unwrap());
        VirtualServerView {
            service: "ns/web:http".into(),
            kind: "ClusterIP".into(),
            scheduler: scheduler.into(),
            properties: properties(&ipvs_netlink::VirtualService::new(key, scheduler)),
            destinations: destinations
                .iter()
                .map(|(a, w)| {
                    ((*a).to_owned(), DestinationView { weight: *w, forward: "Masq".into() })
                })
                .collect(),
        }
    }

    #[test]
    fn the_diff_names_every_difference() {
        let mut sticky = view("rr", &[("10.244.0.2:8080", 1)]);
        let key = ServiceKey::tcp("10.96.0.13:80".parse().unwrap());
        let wanted = ipvs_netlink::VirtualService::new(key, "sh")
            .with_flags(ServiceFlags::SH_FALLBACK)
            .persistent(600);
        sticky.properties = properties(&wanted);
        sticky.scheduler = "sh".into();
        let programmed = Programmed {
            virtual_servers: [
                (
                    "TCP 10.96.0.10:80".to_owned(),
                    view("rr", &[("10.244.0.2:8080", 1), ("10.244.0.3:8080", 1)]),
                ),
                ("TCP 10.96.0.11:80".to_owned(), view("lc", &[])),
                ("TCP 10.96.0.12:80".to_owned(), view("rr", &[("10.244.0.2:8080", 1)])),
                ("TCP 10.96.0.13:80".to_owned(), sticky),
            ]
            .into(),
            owned: ["TCP 10.96.0.10:80", "TCP 10.96.0.99:80"].map(String::from).into(),
            draining: ["TCP 10.96.0.12:80 -> 10.244.0.9:8080"].map(String::from).into(),
            addresses: ["10.96.0.10", "10.96.0.11"].map(String::from).into(),
            netfilter: Default::default(),
        };
        // The sticky one by hand: sh without its flag, persistence 300 with a /24 mask, and a
        // destination forwarded by direct routing.
        let mut routed = entry("TCP 10.96.0.13:80", "sh", &[("10.244.0.2:8080", 1)]);
        routed.0.service = ipvs_netlink::VirtualService::new(key, "sh").persistent(300);
        routed.0.service.netmask = ipvs_netlink::Netmask::Ipv4("255.255.255.0".parse().unwrap());
        routed.1[0].destination.forward = ipvs_netlink::ForwardMethod::DirectRoute;
        let kernel = [
            entry("TCP 10.96.0.10:80", "wrr", &[("10.244.0.2:8080", 2), ("10.244.0.4:8080", 0)]),
            entry("TCP 10.96.0.12:80", "rr", &[("10.244.0.2:8080", 1), ("10.244.0.9:8080", 0)]),
            routed,
            entry("TCP 10.96.0.99:80", "rr", &[]),
            entry("TCP 192.0.2.1:80", "rr", &[]),
        ];
        assert_eq!(
            programmed.diff(&kernel),
            [
                "~ TCP 10.96.0.10:80 scheduler wrr (desired rr)  # ns/web:http",
                "~ TCP 10.96.0.10:80 -> 10.244.0.2:8080 weight 2 (desired 1)  # ns/web:http",
                "+ TCP 10.96.0.10:80 -> 10.244.0.3:8080 weight 1  # ns/web:http",
                "- TCP 10.96.0.10:80 -> 10.244.0.4:8080 weight 0  # ns/web:http",
                "+ TCP 10.96.0.11:80 lc  # ns/web:http ClusterIP",
                "~ TCP 10.96.0.13:80 mask 255.255.255.0 (desired 255.255.255.255)  # ns/web:http",
                "~ TCP 10.96.0.13:80 persistent 300 (desired 600)  # ns/web:http",
                "~ TCP 10.96.0.13:80 scheduler-flags  (desired sh-fallback)  # ns/web:http",
                "~ TCP 10.96.0.13:80 -> 10.244.0.2:8080 forward Route (desired Masq)  # ns/web:http",
                "- TCP 10.96.0.99:80",
            ]
        );
        let bound = ["10.96.0.10".parse().unwrap(), "10.96.0.50".parse().unwrap()].into();
        assert_eq!(
            programmed.diff_addresses(&bound),
            ["+ kube-ipvs0 10.96.0.11", "- kube-ipvs0 10.96.0.50"]
        );
        let in_sync = Programmed {
            virtual_servers: [(
                "TCP 10.96.0.12:80".to_owned(),
                view("rr", &[("10.244.0.2:8080", 1)]),
            )]
            .into(),
            owned: Default::default(),
            draining: programmed.draining.clone(),
            addresses: Default::default(),
            netfilter: Default::default(),
        };
        assert!(in_sync.diff(&kernel).is_empty(), "a foreign virtual server is no difference");
        let key = kernel[1].0.service.key;
        assert_eq!(in_sync.annotation(&key).as_deref(), Some("# ns/web:http ClusterIP"));
    }
}
