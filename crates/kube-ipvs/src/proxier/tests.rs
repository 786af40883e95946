//! The loop body against a fake node: the kernel is a map that takes what each sync sends, so
//! every test also checks that the deltas, applied in turn, leave what the desired state says.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use controller::{
    Error as NodeError,
    desired::{ServiceInfo, Slice},
    node::{Applied, Healed},
};
use ipvs_netlink::{Operation, Protocol, ServiceKey};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

use super::*;
use crate::metrics::Kind;

/// The kernel as the syncs left it: each virtual server's destinations.
#[derive(Debug, Default)]
struct FakeNode {
    kernel: BTreeMap<ServiceKey, Vec<SocketAddr>>,
    /// What each sync compared.
    scopes: Vec<Scope>,
    /// Syncs to refuse, from the next one on.
    fail: usize,
    /// Virtual servers the next full check finds changed behind our back.
    drift: usize,
    /// The ownership each full check was given.
    checked: Vec<Owned>,
}

impl NodeIo for FakeNode {
    async fn apply(&mut self, desired: &DesiredState, scope: &Scope) -> Result<Applied, NodeError> {
        self.scopes.push(scope.clone());
        if self.fail > 0 {
            self.fail -= 1;
            let busy = std::io::Error::from(std::io::ErrorKind::ResourceBusy);
            let source = Box::new(busy);
            return Err(NodeError::Netfilter(netfilter::Error::Netlink {
                operation: "update",
                source,
            }));
        }
        let keys: Vec<ServiceKey> = match scope {
            Scope::Everything => {
                self.kernel.clear();
                desired.virtual_servers.keys().copied().collect()
            }
            Scope::Changed(delta) => delta.keys.iter().copied().collect(),
        };
        for key in keys {
            match desired.virtual_servers.get(&key) {
                Some(server) => {
                    self.kernel.insert(key, server.destinations.keys().copied().collect())
                }
                None => self.kernel.remove(&key),
            };
        }
        Ok(Applied {
            netfilter: netfilter::Update::Elements,
            addresses: dummy_link::SyncReport::default(),
            ipvs: controller::reconcile::SyncReport::default(),
        })
    }

    fn begin_check(&mut self) {}

    async fn finish_check(
        &mut self,
        _: &DesiredState,
        owned: &Owned,
        _: KernelDigests,
    ) -> Result<Healed, NodeError> {
        self.checked.push(owned.clone());
        Ok(Healed { virtual_servers: std::mem::take(&mut self.drift), ..Healed::default() })
    }

    async fn drain(&mut self) -> Result<usize, NodeError> {
        Ok(0)
    }

    fn draining(&self) -> usize {
        0
    }

    fn draining_destinations(&self) -> Vec<(ServiceKey, SocketAddr)> {
        Vec::new()
    }

    fn owned(&self) -> Vec<ServiceKey> {
        self.kernel.keys().copied().collect()
    }

    async fn service_addresses(&self) -> Result<BTreeSet<IpAddr>, NodeError> {
        Ok(BTreeSet::new())
    }

    async fn sent_messages(&self) -> HashMap<Operation, u64> {
        HashMap::new()
    }
}

fn proxier() -> Proxier<FakeNode> {
    let settings = Settings {
        proxy: ProxyConfig::default(),
        node_name: "node-a".into(),
        node_port_addresses: NodePortAddresses::All,
        node_port_range: 30000..=32767,
        exclude_cidrs: Vec::new(),
    };
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(30)));
    Proxier::new(settings, FakeNode::default(), Vec::new(), Arc::new(Metrics::new()), health)
}

/// A ClusterIP Service `ns/<name>` on `ip`:80 -> 8080.
fn service(name: &str, ip: &str) -> Arc<ServiceInfo> {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    }))
    .unwrap();
    Arc::new(ServiceInfo::from(&service))
}

/// An EndpointSlice `ns/<name>` of the Service `of`, with ready endpoints.
fn slice(name: &str, of: &str, addresses: &[&str]) -> Arc<Slice> {
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": of}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addresses.iter().map(|a| json!({
            "addresses": [a], "nodeName": "node-b", "conditions": {"ready": true}
        })).collect::<Vec<_>>()
    }))
    .unwrap();
    Arc::new(Slice::from(&slice))
}

fn list_services(proxier: &mut Proxier<FakeNode>, services: &[Arc<ServiceInfo>]) {
    proxier.handle(Input::Service(Event::Init));
    for service in services {
        proxier.handle(Input::Service(Event::InitApply(service.clone())));
    }
    proxier.handle(Input::Service(Event::InitDone));
}

fn list_slices(proxier: &mut Proxier<FakeNode>, slices: &[Arc<Slice>]) {
    proxier.handle(Input::Slice(Event::Init));
    for slice in slices {
        proxier.handle(Input::Slice(Event::InitApply(slice.clone())));
    }
    proxier.handle(Input::Slice(Event::InitDone));
}

/// A proxier that listed these and synced once.
async fn synced(services: &[Arc<ServiceInfo>], slices: &[Arc<Slice>]) -> Proxier<FakeNode> {
    let mut proxier = proxier();
    list_services(&mut proxier, services);
    list_slices(&mut proxier, slices);
    assert!(proxier.sync().await.unwrap());
    proxier
}

fn key(vip: &str) -> ServiceKey {
    ServiceKey::Inet { protocol: Protocol::Tcp, address: SocketAddr::new(vip.parse().unwrap(), 80) }
}

/// The destinations the fake kernel holds for `vip`:80.
fn kernel(proxier: &Proxier<FakeNode>, vip: &str) -> Option<Vec<String>> {
    let destinations = proxier.node().kernel.get(&key(vip))?;
    Some(destinations.iter().map(ToString::to_string).collect())
}

/// The kernel holds exactly the desired virtual servers and destinations.
fn assert_converged(proxier: &Proxier<FakeNode>) {
    let desired: BTreeMap<ServiceKey, Vec<SocketAddr>> = proxier
        .desired()
        .virtual_servers
        .iter()
        .map(|(key, server)| (*key, server.destinations.keys().copied().collect()))
        .collect();
    assert_eq!(proxier.node().kernel, desired);
}

fn last_scope(proxier: &Proxier<FakeNode>) -> &Scope {
    proxier.node().scopes.last().expect("a sync")
}

#[tokio::test]
async fn nothing_is_synced_before_services_and_slices_are_both_listed() {
    let mut proxier = proxier();
    list_services(&mut proxier, &[service("a", "10.96.0.1")]);
    assert!(!proxier.ready());
    assert!(!proxier.sync().await.unwrap(), "half the picture would empty Service a");
    assert!(proxier.node().scopes.is_empty());
    list_slices(&mut proxier, &[slice("a-1", "a", &["10.244.0.1"])]);
    assert!(proxier.sync().await.unwrap());
    assert_eq!(proxier.node().scopes, [Scope::Everything]);
    assert_eq!(kernel(&proxier, "10.96.0.1").unwrap(), ["10.244.0.1:8080"]);
    assert!(!proxier.pending());
    assert!(!proxier.sync().await.unwrap(), "nothing pending, nothing sent");
}

#[tokio::test]
async fn a_burst_is_one_sync_of_what_it_touched() {
    let services =
        [service("a", "10.96.0.1"), service("b", "10.96.0.2"), service("c", "10.96.0.3")];
    let mut proxier = synced(&services, &[slice("a-1", "a", &["10.244.0.1"])]).await;
    for address in ["10.244.0.2", "10.244.0.3", "10.244.0.4"] {
        proxier.handle(Input::Slice(Event::Apply(slice("a-1", "a", &[address]))));
    }
    proxier.handle(Input::Slice(Event::Apply(slice("b-1", "b", &["10.244.1.1"]))));
    assert!(proxier.sync().await.unwrap());
    assert_eq!(proxier.node().scopes.len(), 2, "the first sync and one for the burst");
    let Scope::Changed(delta) = last_scope(&proxier) else { panic!("a delta") };
    assert_eq!(delta.keys, BTreeSet::from([key("10.96.0.1"), key("10.96.0.2")]));
    assert_eq!(kernel(&proxier, "10.96.0.1").unwrap(), ["10.244.0.4:8080"], "the last one");
    assert_converged(&proxier);
}

#[tokio::test]
async fn a_failed_sync_is_retried_comparing_everything() {
    let mut proxier = synced(&[service("a", "10.96.0.1")], &[]).await;
    proxier.node.fail = 1;
    proxier.handle(Input::Slice(Event::Apply(slice("a-1", "a", &["10.244.0.1"]))));
    assert!(proxier.sync().await.is_err());
    assert!(proxier.pending(), "nothing is lost");
    assert_eq!(kernel(&proxier, "10.96.0.1").unwrap(), Vec::<String>::new());
    // A second change meanwhile; the retry compares everything, so both land.
    proxier.handle(Input::Service(Event::Apply(service("b", "10.96.0.2"))));
    assert!(proxier.sync().await.unwrap());
    assert_eq!(last_scope(&proxier), &Scope::Everything);
    assert_eq!(kernel(&proxier, "10.96.0.1").unwrap(), ["10.244.0.1:8080"]);
    assert!(kernel(&proxier, "10.96.0.2").is_some());
    assert_converged(&proxier);
    // And then deltas again.
    proxier.handle(Input::Slice(Event::Delete(slice("a-1", "a", &["10.244.0.1"]))));
    proxier.sync().await.unwrap();
    assert!(matches!(last_scope(&proxier), Scope::Changed(_)));
    assert_converged(&proxier);
}

#[tokio::test]
async fn a_full_check_that_finds_drift_counts_the_repairs() {
    let mut proxier = proxier();
    assert!(!proxier.begin_check(), "nothing to check before the first sync");
    list_services(&mut proxier, &[service("a", "10.96.0.1")]);
    list_slices(&mut proxier, &[]);
    proxier.sync().await.unwrap();
    assert!(proxier.begin_check());
    proxier.node.drift = 2;
    proxier.finish_check(KernelDigests::default()).await.unwrap();
    let metrics = proxier.reports.metrics();
    let repairs = metrics.drift_repairs.get_or_create(&Kind { kind: "ipvs".into() }).get();
    assert_eq!((repairs, metrics.full_checks.get()), (2, 1));
    // The check was told that the Service's address and port are kube-ipvs's.
    let owned = &proxier.node().checked[0];
    assert!(owned.service_addresses.contains(&"10.96.0.1".parse::<IpAddr>().unwrap()));
    assert!(controller::reconcile::Ownership::owns(owned, &key("10.96.0.1")));
    assert!(!controller::reconcile::Ownership::owns(owned, &key("10.96.9.9")));
}

#[tokio::test]
async fn a_slice_that_moves_between_services_is_synced_on_both() {
    let services = [service("a", "10.96.0.1"), service("b", "10.96.0.2")];
    let mut proxier = synced(&services, &[slice("s", "a", &["10.244.0.1"])]).await;
    proxier.handle(Input::Slice(Event::Apply(slice("s", "b", &["10.244.0.1"]))));
    proxier.sync().await.unwrap();
    let Scope::Changed(delta) = last_scope(&proxier) else { panic!("a delta") };
    assert_eq!(delta.keys.len(), 2);
    assert_eq!(kernel(&proxier, "10.96.0.1").unwrap(), Vec::<String>::new());
    assert_eq!(kernel(&proxier, "10.96.0.2").unwrap(), ["10.244.0.1:8080"]);
    assert_converged(&proxier);
}

#[tokio::test]
async fn a_service_deleted_while_its_slices_remain_leaves_the_kernel() {
    let a = service("a", "10.96.0.1");
    let mut proxier = synced(std::slice::from_ref(&a), &[slice("a-1", "a", &["10.244.0.1"])]).await;
    proxier.handle(Input::Service(Event::Delete(a.clone())));
    proxier.sync().await.unwrap();
    assert_eq!(kernel(&proxier, "10.96.0.1"), None);
    assert_eq!(
        proxier.reports.metrics().skipped_objects.get(),
        0,
        "a slice outliving its Service is no error"
    );
    // Back, with the endpoints it had, though its slice sent no event.
    proxier.handle(Input::Service(Event::Apply(a)));
    proxier.sync().await.unwrap();
    assert_eq!(kernel(&proxier, "10.96.0.1").unwrap(), ["10.244.0.1:8080"]);
    assert_converged(&proxier);
}

#[tokio::test]
async fn a_relist_after_410_compares_everything_and_removes_what_vanished() {
    let services = [service("a", "10.96.0.1"), service("b", "10.96.0.2")];
    let mut proxier = synced(&services, &[]).await;
    // The watch cache lost b's deletion: the relist no longer has it.
    list_services(&mut proxier, &services[..1]);
    proxier.sync().await.unwrap();
    assert_eq!(last_scope(&proxier), &Scope::Everything);
    assert_eq!(kernel(&proxier, "10.96.0.2"), None);
    assert_converged(&proxier);
}
