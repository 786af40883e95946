//! What one Service contributes: its virtual servers, and its elements of the netfilter table.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use ipnetwork::IpNetwork;
use ipvs_netlink::{Destination, Family, Protocol, ServiceFlags, ServiceKey, VirtualService};
use netfilter::{Elements, NodePort, ServicePort as NetfilterPort};

use super::{
    endpoints::{self, Endpoint},
    model::{
        DEFAULT_AFFINITY_TIMEOUT, Destinations, Exposure, NodeInfo, Problem, ProxyConfig,
        SCHEDULER_ANNOTATION, SCHEDULER_FLAGS_ANNOTATION, SCHEDULERS, ServicePortName,
        VirtualServer, VirtualServers,
    },
    service_info::{Parsed, ServiceInfo, ServiceInfoPort, ServiceType},
    slice::Slice,
};

/// Everything one Service asks of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceState {
    /// Its virtual servers.
    pub virtual_servers: VirtualServers,
    /// Its elements of the netfilter table (kube-ipvs0 addresses are `elements.vips`).
    pub elements: ServiceElements,
    /// What was wrong with it, or with its EndpointSlices.
    pub problems: Vec<Problem>,
    /// Its `externalTrafficPolicy: Local` ports: each gets a firewall-mark virtual server with
    /// only this node's endpoints, for traffic from outside the cluster.
    pub local_only: Vec<LocalOnly>,
}

/// One Service's elements of the netfilter table: the sets of [`Elements`], each a sorted
/// slice allocated at its size. A Service has one or a few elements of each kind, where a
/// B-tree node has room for eleven; at 10,000 Services that is megabytes. The firewall marks
/// of `externalTrafficPolicy: Local` are not here: the join gives them out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceElements {
    /// See [`Elements::cluster_ips`].
    pub cluster_ips: Box<[NetfilterPort]>,
    /// See [`Elements::external_ips`].
    pub external_ips: Box<[NetfilterPort]>,
    /// See [`Elements::local_external_ips`].
    pub local_external_ips: Box<[NetfilterPort]>,
    /// See [`Elements::node_ports`].
    pub node_ports: Box<[NodePort]>,
    /// See [`Elements::vips`].
    pub vips: Box<[IpAddr]>,
    /// See [`Elements::source_ranges`].
    pub source_ranges: Box<[(NetfilterPort, IpNetwork)]>,
    /// See [`Elements::health_check_node_ports`].
    pub health_check_node_ports: Box<[u16]>,
    /// See [`Elements::hairpin`].
    pub hairpin: Box<[IpAddr]>,
    /// See [`Elements::localhost_node_ports`].
    pub localhost_node_ports: BTreeMap<NodePort, BTreeSet<SocketAddrV4>>,
}

impl ServiceElements {
    /// Whether it has no element at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl From<Elements> for ServiceElements {
    /// Keeps the sets and the localhost NodePorts; the firewall marks are the join's.
    fn from(elements: Elements) -> Self {
        macro_rules! sets {
            ($($field:ident),*) => {
                Self {
                    $($field: elements.$field.into_iter().collect(),)*
                    localhost_node_ports: elements.localhost_node_ports,
                }
            };
        }
        netfilter::for_each_set!(sets)
    }
}

/// What external traffic a local-only virtual server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LocalKey {
    /// An external or load-balancer IP port.
    Address(NetfilterPort),
    /// A NodePort, on every node address of the family.
    NodePort(Family, NodePort),
}

impl LocalKey {
    /// The address family of the traffic.
    pub fn family(&self) -> Family {
        match self {
            Self::Address(port) => Family::of(port.address),
            Self::NodePort(family, _) => *family,
        }
    }
}

/// A virtual server for external traffic with `externalTrafficPolicy: Local`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOnly {
    /// The traffic it serves.
    pub key: LocalKey,
    /// Scheduler, flags and persistence, as the Service's other virtual servers.
    pub template: VirtualService,
    /// This node's endpoints, of the key's family.
    pub destinations: Destinations,
    /// The Service port.
    pub owner: ServicePortName,
}

/// Why a Service produces nothing at all, when that is by design rather than a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// `type: ExternalName`.
    ExternalName,
    /// `clusterIP: None`. (A Service labelled `service.kubernetes.io/headless` that has a
    /// cluster IP is served like any other, as kube-proxy serves it: the label only keeps
    /// its EndpointSlices out of the watch.)
    Headless,
    /// Labelled for another proxy (`service.kubernetes.io/service-proxy-name`).
    OtherProxy,
}

/// Whether a Service is one kube-ipvs implements at all.
pub fn skipped(service: &ServiceInfo, config: &ProxyConfig) -> Option<Skipped> {
    if let Some(proxy) = &service.proxy_name
        && config.service_proxy_name.as_ref() != Some(proxy)
    {
        return Some(Skipped::OtherProxy);
    }
    if !service.has_spec {
        return None;
    }
    if service.type_ == ServiceType::ExternalName {
        return Some(Skipped::ExternalName);
    }
    if service.cluster_ip_none {
        return Some(Skipped::Headless);
    }
    None
}

struct Context<'a> {
    object: String,
    config: &'a ProxyConfig,
    problems: Vec<Problem>,
}

impl Context<'_> {
    fn problem(&mut self, reason: String) {
        self.problems.push(Problem { object: self.object.clone(), reason });
    }
}

/// The scheduler and scheduler flags of a Service: its annotations, or the default.
fn scheduler(service: &ServiceInfo, context: &mut Context<'_>) -> (String, ServiceFlags) {
    let default = context.config.scheduler.clone();
    let name = match &service.scheduler {
        None => default,
        Some(name) if SCHEDULERS.contains(&name.as_str()) => name.clone(),
        Some(name) => {
            context.problem(format!(
                "annotation {SCHEDULER_ANNOTATION}={name:?} is not one of {}; using {default}",
                SCHEDULERS.join(", ")
            ));
            default
        }
    };
    let mut flags = ServiceFlags::empty();
    for flag in service.scheduler_flags.iter().flat_map(|f| f.split(',')) {
        let flag = flag.trim();
        match (name.as_str(), flag) {
            (_, "") => {}
            ("sh", "sh-fallback") | ("mh", "mh-fallback") => flags |= ServiceFlags::SCHED1,
            ("sh", "sh-port") | ("mh", "mh-port") => flags |= ServiceFlags::SCHED2,
            _ => context.problem(format!(
                "annotation {SCHEDULER_FLAGS_ANNOTATION}: {flag:?} is not a flag of scheduler {name}; ignored"
            )),
        }
    }
    (name, flags)
}

fn parse_ip(parsed: &Parsed<IpAddr>, what: &str, context: &mut Context<'_>) -> Option<IpAddr> {
    match parsed {
        Ok(ip) => Some(*ip),
        Err(text) => {
            context.problem(format!("{what} {text:?} is not an IP address; skipped"));
            None
        }
    }
}

/// How a Service's virtual servers schedule: the same for each of them.
struct Scheduling {
    scheduler: String,
    flags: ServiceFlags,
    /// The session affinity timeout, with `sessionAffinity: ClientIP`.
    affinity: Option<u32>,
}

impl Scheduling {
    fn of(service: &ServiceInfo, context: &mut Context<'_>) -> Self {
        let (scheduler, flags) = scheduler(service, context);
        let affinity = service.affinity.map(|timeout| {
            timeout.and_then(|t| u32::try_from(t).ok()).unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        Self { scheduler, flags, affinity }
    }

    /// The virtual service `key`, scheduled so.
    fn virtual_service(&self, key: ServiceKey) -> VirtualService {
        let service = VirtualService::new(key, self.scheduler.clone()).with_flags(self.flags);
        match self.affinity {
            Some(timeout) => service.persistent(timeout),
            None => service,
        }
    }
}

/// A Service's addresses, by kind, those that parse.
struct Addresses {
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    /// Only of a LoadBalancer.
    load_balancer_ips: Vec<IpAddr>,
    /// Only of a LoadBalancer.
    source_ranges: Vec<IpNetwork>,
}

impl Addresses {
    fn of(service: &ServiceInfo, context: &mut Context<'_>) -> Self {
        let mut ips = |ips: &[Parsed<IpAddr>], what: &str| -> Vec<IpAddr> {
            ips.iter().filter_map(|ip| parse_ip(ip, what, context)).collect()
        };
        let cluster_ips = ips(&service.cluster_ips, "cluster IP");
        let external_ips = ips(&service.external_ips, "external IP");
        if service.type_ != ServiceType::LoadBalancer {
            let (load_balancer_ips, source_ranges) = (Vec::new(), Vec::new());
            return Self { cluster_ips, external_ips, load_balancer_ips, source_ranges };
        }
        let load_balancer_ips = ips(&service.load_balancer_ips, "load-balancer IP");
        let source_ranges = (service.source_ranges.iter())
            .filter_map(|range| match range {
                Ok(range) => Some(*range),
                Err(range) => {
                    context.problem(format!(
                        "loadBalancerSourceRanges entry {range:?} is not a CIDR; skipped"
                    ));
                    None
                }
            })
            .collect();
        Self { cluster_ips, external_ips, load_balancer_ips, source_ranges }
    }
}

/// One Service port, with its endpoints.
struct Port<'a> {
    owner: ServicePortName,
    protocol: Protocol,
    number: u16,
    /// Every endpoint that may serve.
    cluster: Vec<&'a Endpoint>,
    /// This node's.
    local: Vec<&'a Endpoint>,
}

/// One Service's state, built port by port.
struct Builder<'a> {
    service: &'a ServiceInfo,
    node: &'a NodeInfo,
    scheduling: Scheduling,
    state: ServiceState,
    elements: Elements,
}

impl Builder<'_> {
    /// A virtual server on `address` for `port`, with the endpoints of `chosen` of its family.
    fn add(
        &mut self,
        port: &Port<'_>,
        exposure: Exposure,
        address: SocketAddr,
        chosen: &[&Endpoint],
    ) {
        let key = ServiceKey::Inet { protocol: port.protocol, address };
        let destinations = chosen
            .iter()
            .filter(|e| e.address.is_ipv4() == address.is_ipv4())
            .map(|e| Destination::new(SocketAddr::new(e.address, e.port)))
            .collect();
        self.state.virtual_servers.insert(Arc::new(VirtualServer {
            service: self.scheduling.virtual_service(key).into(),
            destinations,
            owner: port.owner.clone(),
            exposure,
        }));
    }

    /// The firewall-mark virtual server of `key` for external traffic with
    /// `externalTrafficPolicy: Local`: this node's endpoints only.
    fn local_only(&mut self, port: &Port<'_>, key: LocalKey) {
        let template =
            self.scheduling.virtual_service(ServiceKey::Fwmark { family: Family::Ipv4, mark: 0 });
        let destinations = (port.local.iter())
            .filter(|e| Family::of(e.address) == key.family())
            .map(|e| Destination::new(SocketAddr::new(e.address, e.port)))
            .collect();
        let owner = port.owner.clone();
        self.state.local_only.push(LocalOnly { key, template, destinations, owner });
    }

    /// The virtual servers on the cluster IPs; with `internalTrafficPolicy: Local`, this
    /// node's endpoints only.
    fn cluster_ips(&mut self, port: &Port<'_>, addresses: &Addresses) {
        let internal = if self.service.internal_local { &port.local } else { &port.cluster };
        for ip in &addresses.cluster_ips {
            self.add(port, Exposure::ClusterIp, SocketAddr::new(*ip, port.number), internal);
            self.elements.vips.insert(*ip);
            self.elements.cluster_ips.insert(NetfilterPort::new(*ip, port.protocol, port.number));
        }
    }

    /// The virtual servers on external and load-balancer IPs. They serve in-cluster clients
    /// too, so they get every endpoint; with `externalTrafficPolicy: Local`, external clients
    /// are marked over to a firewall-mark virtual server with only the local ones.
    fn external_ips(&mut self, port: &Port<'_>, addresses: &Addresses) {
        let kinds = [
            (Exposure::ExternalIp, &addresses.external_ips),
            (Exposure::LoadBalancer, &addresses.load_balancer_ips),
        ];
        for (exposure, ips) in kinds {
            for ip in ips {
                self.add(port, exposure, SocketAddr::new(*ip, port.number), &port.cluster);
                if !self.node.local_addresses.contains(ip) {
                    self.elements.vips.insert(*ip);
                }
                let element = NetfilterPort::new(*ip, port.protocol, port.number);
                if self.service.external_local {
                    self.elements.local_external_ips.insert(element);
                    self.local_only(port, LocalKey::Address(element));
                } else {
                    self.elements.external_ips.insert(element);
                }
                if exposure == Exposure::LoadBalancer {
                    for range in &addresses.source_ranges {
                        self.elements.source_ranges.insert((element, *range));
                    }
                }
            }
        }
    }

    /// The virtual servers on the node's NodePort addresses, and on 127.0.0.1 when localhost
    /// NodePorts are on.
    fn node_ports(&mut self, port: &Port<'_>, node_port: u16, localhost: bool) {
        for ip in &self.node.node_port_addresses {
            let address = SocketAddr::new(*ip, node_port);
            self.add(port, Exposure::NodePort, address, &port.cluster);
        }
        let element = NodePort { protocol: port.protocol, port: node_port };
        if !self.service.external_local {
            self.elements.node_ports.insert(element);
        } else {
            let families: BTreeSet<Family> =
                self.node.node_port_addresses.iter().map(|ip| Family::of(*ip)).collect();
            for family in families {
                self.local_only(port, LocalKey::NodePort(family, element));
            }
        }
        if localhost {
            let endpoints = (port.cluster.iter())
                .filter_map(|e| match e.address {
                    IpAddr::V4(v4) => Some(SocketAddrV4::new(v4, e.port)),
                    IpAddr::V6(_) => None,
                })
                .collect();
            self.elements.localhost_node_ports.insert(element, endpoints);
        }
    }

    fn finish(mut self, context: Context<'_>) -> ServiceState {
        self.state.problems = context.problems;
        self.state.elements = self.elements.into();
        self.state
    }
}

/// A port's protocol and number, or why it is skipped.
fn port_number(
    index: usize,
    port: &ServiceInfoPort,
    context: &mut Context<'_>,
) -> Option<(Protocol, u16)> {
    let protocol = match &port.protocol {
        Ok(protocol) => *protocol,
        Err(name) => {
            context.problem(format!("port {index} has unknown protocol {name:?}; skipped"));
            return None;
        }
    };
    let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
        context.problem(format!("port {index} has invalid port number {}; skipped", port.port));
        return None;
    };
    Some((protocol, number))
}

/// What one Service asks of the node, given its EndpointSlices.
pub fn service_state(
    service: &ServiceInfo,
    slices: &[&Slice],
    node: &NodeInfo,
    config: &ProxyConfig,
) -> ServiceState {
    if skipped(service, config).is_some() {
        return ServiceState::default();
    }
    let object = format!("Service {}/{}", service.namespace, service.name);
    let mut context = Context { object, config, problems: Vec::new() };
    if !service.has_spec {
        context.problem("has no spec; skipped".into());
        return ServiceState { problems: context.problems, ..ServiceState::default() };
    }
    let scheduling = Scheduling::of(service, &mut context);
    let addresses = Addresses::of(service, &mut context);
    let has_node_ports = matches!(service.type_, ServiceType::NodePort | ServiceType::LoadBalancer);
    let mut builder = Builder {
        service,
        node,
        scheduling,
        state: ServiceState::default(),
        elements: Elements::default(),
    };
    for (index, service_port) in service.ports.iter().enumerate() {
        let Some((protocol, number)) = port_number(index, service_port, &mut context) else {
            continue;
        };
        let name = &service_port.name;
        let endpoints =
            endpoints::collect(slices, name, protocol.name(), node, &mut context.problems);
        let (cluster, local) = endpoints::categorize(&endpoints, node);
        let owner = ServicePortName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            port: name.clone(),
        };
        let port = Port { owner, protocol, number, cluster, local };
        for endpoint in &port.local {
            builder.elements.hairpin.insert(endpoint.address);
        }
        builder.cluster_ips(&port, &addresses);
        builder.external_ips(&port, &addresses);
        if has_node_ports {
            match service_port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => {
                    builder.node_ports(&port, node_port, config.localhost_node_ports);
                }
                None => {}
                other => context
                    .problem(format!("port {name:?} has invalid nodePort {other:?}; skipped")),
            }
        }
    }
    if service.type_ == ServiceType::LoadBalancer && service.external_local {
        match service.health_check_node_port.map(u16::try_from) {
            Some(Ok(port)) if port != 0 => {
                builder.elements.health_check_node_ports.insert(port);
            }
            None => {}
            other => context.problem(format!("invalid healthCheckNodePort {other:?}; skipped")),
        }
    }
    builder.finish(context)
}
