//! What the daemon last programmed, as it publishes it on `/virtualservers`, and what
//! `kube-ipvs ls` makes of it: the kernel's table annotated with each virtual server's
//! Service, and the difference between what is desired and what the kernel holds.

use std::collections::{BTreeMap, BTreeSet};

use controller::desired::{DesiredState, Exposure};
use ipvs_netlink::{ServiceKey, listing::TableEntry};
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
    /// Its destinations (`address:port`) and their weights.
    pub destinations: BTreeMap<String, u32>,
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

/// The HTTP server's side: asks the sync loop for a [`Snapshot`]. The sync loop copies its
/// state only when asked, so a sync costs what changed, never the size of the whole table.
#[derive(Debug, Clone)]
pub struct Published {
    requests: mpsc::Sender<SnapshotRequest>,
}

impl Published {
    /// A handle, and the requests the sync loop answers.
    pub fn new() -> (Self, mpsc::Receiver<SnapshotRequest>) {
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
                    destinations: server
                        .destinations
                        .iter()
                        .map(|d| (d.address.to_string(), d.weight))
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
            if service.service.scheduler != view.scheduler {
                lines.push(format!(
                    "~ {key} scheduler {} (desired {})  # {}",
                    service.service.scheduler, view.scheduler, view.service
                ));
            }
            let found: BTreeMap<String, u32> = destinations
                .iter()
                .map(|d| (d.destination.address.to_string(), d.destination.weight))
                .collect();
            for (address, weight) in &view.destinations {
                match found.get(address) {
                    None => lines
                        .push(format!("+ {key} -> {address} weight {weight}  # {}", view.service)),
                    Some(w) if w != weight => lines.push(format!(
                        "~ {key} -> {address} weight {w} (desired {weight})  # {}",
                        view.service
                    )),
                    Some(_) => {}
                }
            }
            for (address, weight) in &found {
                let draining = self.draining.contains(&format!("{key} -> {address}"));
                if !view.destinations.contains_key(address) && !draining {
                    lines.push(format!("- {key} -> {address} weight {weight}  # {}", view.service));
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
        let service = ipvs_netlink::Service::new(service_key, scheduler);
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
        VirtualServerView {
            service: "ns/web:http".into(),
            kind: "ClusterIP".into(),
            scheduler: scheduler.into(),
            destinations: destinations.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect(),
        }
    }

    #[test]
    fn the_diff_names_every_difference() {
        let programmed = Programmed {
            virtual_servers: [
                (
                    "TCP 10.96.0.10:80".to_owned(),
                    view("rr", &[("10.244.0.2:8080", 1), ("10.244.0.3:8080", 1)]),
                ),
                ("TCP 10.96.0.11:80".to_owned(), view("lc", &[])),
                ("TCP 10.96.0.12:80".to_owned(), view("rr", &[("10.244.0.2:8080", 1)])),
            ]
            .into(),
            owned: ["TCP 10.96.0.10:80", "TCP 10.96.0.99:80"].map(String::from).into(),
            draining: ["TCP 10.96.0.12:80 -> 10.244.0.9:8080"].map(String::from).into(),
        };
        let kernel = [
            entry("TCP 10.96.0.10:80", "wrr", &[("10.244.0.2:8080", 2), ("10.244.0.4:8080", 0)]),
            entry("TCP 10.96.0.12:80", "rr", &[("10.244.0.2:8080", 1), ("10.244.0.9:8080", 0)]),
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
                "- TCP 10.96.0.99:80",
            ]
        );
        let in_sync = Programmed {
            virtual_servers: [(
                "TCP 10.96.0.12:80".to_owned(),
                view("rr", &[("10.244.0.2:8080", 1)]),
            )]
            .into(),
            owned: Default::default(),
            draining: programmed.draining.clone(),
        };
        assert!(in_sync.diff(&kernel).is_empty(), "a foreign virtual server is no difference");
        let key = kernel[1].0.service.key;
        assert_eq!(in_sync.annotation(&key).as_deref(), Some("# ns/web:http ClusterIP"));
    }
}
