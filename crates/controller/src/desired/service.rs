//! What one Service contributes: its virtual servers, and its elements of the netfilter table.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use ipnetwork::IpNetwork;
use ipvs_netlink::{Destination, Family, ServiceFlags, ServiceKey, VirtualService};
use netfilter::{Elements, NodePort, ServicePort as NetfilterPort};

use super::{
    endpoints::{self, Endpoint},
    model::{
        DEFAULT_AFFINITY_TIMEOUT, Destinations, Exposure, NodeInfo, Problem, ProxyConfig,
        SCHEDULER_ANNOTATION, SCHEDULER_FLAGS_ANNOTATION, SCHEDULERS, ServicePortName,
        VirtualServer, VirtualServers,
    },
    service_info::{Parsed, ServiceInfo, ServiceType},
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

/// What one Service asks of the node, given its EndpointSlices.
pub fn service_state(
    service: &ServiceInfo,
    slices: &[&Slice],
    node: &NodeInfo,
    config: &ProxyConfig,
) -> ServiceState {
    let (namespace, name) = (service.namespace.clone(), service.name.clone());
    let mut context =
        Context { object: format!("Service {namespace}/{name}"), config, problems: Vec::new() };
    let mut state = ServiceState::default();
    let mut elements = Elements::default();
    if skipped(service, config).is_some() {
        return state;
    }
    if !service.has_spec {
        context.problem("has no spec; skipped".into());
        state.problems = context.problems;
        return state;
    }

    let (scheduler, scheduler_flags) = scheduler(service, &mut context);
    let affinity = service.affinity.map(|timeout| {
        timeout.and_then(|t| u32::try_from(t).ok()).unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let (external_local, internal_local) = (service.external_local, service.internal_local);

    // Addresses, by kind.
    let cluster_ips: Vec<IpAddr> = (service.cluster_ips.iter())
        .filter_map(|ip| parse_ip(ip, "cluster IP", &mut context))
        .collect();
    let external_ips: Vec<IpAddr> = (service.external_ips.iter())
        .filter_map(|ip| parse_ip(ip, "external IP", &mut context))
        .collect();
    let is_load_balancer = service.type_ == ServiceType::LoadBalancer;
    let load_balancer_ips: Vec<IpAddr> = if is_load_balancer {
        (service.load_balancer_ips.iter())
            .filter_map(|ip| parse_ip(ip, "load-balancer IP", &mut context))
            .collect()
    } else {
        Vec::new()
    };
    let source_ranges: Vec<IpNetwork> = if is_load_balancer {
        (service.source_ranges.iter())
            .filter_map(|range| match range {
                Ok(range) => Some(*range),
                Err(range) => {
                    context.problem(format!(
                        "loadBalancerSourceRanges entry {range:?} is not a CIDR; skipped"
                    ));
                    None
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let has_node_ports = matches!(service.type_, ServiceType::NodePort | ServiceType::LoadBalancer);

    for (index, port) in service.ports.iter().enumerate() {
        let port_name = port.name.clone();
        let owner = ServicePortName {
            namespace: namespace.clone(),
            name: name.clone(),
            port: port_name.clone(),
        };
        let protocol = match &port.protocol {
            Ok(protocol) => *protocol,
            Err(name) => {
                context.problem(format!("port {index} has unknown protocol {name:?}; skipped"));
                continue;
            }
        };
        let protocol_name = protocol.name();
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            context.problem(format!("port {index} has invalid port number {}; skipped", port.port));
            continue;
        };
        let endpoints =
            endpoints::collect(slices, &port_name, protocol_name, node, &mut context.problems);
        let (cluster, local) = endpoints::categorize(&endpoints, node);
        let internal_set = if internal_local { &local } else { &cluster };
        // Virtual servers on external addresses serve in-cluster clients too, so they get every
        // endpoint; with externalTrafficPolicy Local, external clients are marked over to a
        // firewall-mark virtual server with only the local ones (see `LocalOnly`).
        let external_set = &cluster;
        let template = {
            let mut t = VirtualService::new(
                ServiceKey::Fwmark { family: Family::Ipv4, mark: 0 },
                scheduler.clone(),
            )
            .with_flags(scheduler_flags);
            if let Some(timeout) = affinity {
                t = t.persistent(timeout);
            }
            t
        };
        let local_only = |key: LocalKey| LocalOnly {
            key,
            template: template.clone(),
            destinations: local
                .iter()
                .filter(|e| Family::of(e.address) == key.family())
                .map(|e| Destination::new(SocketAddr::new(e.address, e.port)))
                .collect(),
            owner: owner.clone(),
        };
        for endpoint in &local {
            elements.hairpin.insert(endpoint.address);
        }

        let add =
            |state: &mut ServiceState, exposure, address: SocketAddr, chosen: &Vec<&Endpoint>| {
                let key = ServiceKey::Inet { protocol, address };
                let mut virtual_service =
                    VirtualService::new(key, scheduler.clone()).with_flags(scheduler_flags);
                if let Some(timeout) = affinity {
                    virtual_service = virtual_service.persistent(timeout);
                }
                let destinations = chosen
                    .iter()
                    .filter(|e| e.address.is_ipv4() == address.is_ipv4())
                    .map(|e| Destination::new(SocketAddr::new(e.address, e.port)))
                    .collect();
                state.virtual_servers.insert(Arc::new(VirtualServer {
                    service: virtual_service.into(),
                    destinations,
                    owner: owner.clone(),
                    exposure,
                }));
            };

        for ip in &cluster_ips {
            add(&mut state, Exposure::ClusterIp, SocketAddr::new(*ip, number), internal_set);
            elements.vips.insert(*ip);
            elements.cluster_ips.insert(NetfilterPort::new(*ip, protocol, number));
        }
        for (exposure, ips) in
            [(Exposure::ExternalIp, &external_ips), (Exposure::LoadBalancer, &load_balancer_ips)]
        {
            for ip in ips {
                add(&mut state, exposure, SocketAddr::new(*ip, number), external_set);
                if !node.local_addresses.contains(ip) {
                    elements.vips.insert(*ip);
                }
                let element = NetfilterPort::new(*ip, protocol, number);
                if external_local {
                    elements.local_external_ips.insert(element);
                    state.local_only.push(local_only(LocalKey::Address(element)));
                } else {
                    elements.external_ips.insert(element);
                }
                if exposure == Exposure::LoadBalancer {
                    for range in &source_ranges {
                        elements.source_ranges.insert((element, *range));
                    }
                }
            }
        }
        if has_node_ports {
            match port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => {
                    for ip in &node.node_port_addresses {
                        add(
                            &mut state,
                            Exposure::NodePort,
                            SocketAddr::new(*ip, node_port),
                            external_set,
                        );
                    }
                    let element = NodePort { protocol, port: node_port };
                    if !external_local {
                        elements.node_ports.insert(element);
                    } else {
                        let families: BTreeSet<Family> =
                            node.node_port_addresses.iter().map(|ip| Family::of(*ip)).collect();
                        for family in families {
                            state.local_only.push(local_only(LocalKey::NodePort(family, element)));
                        }
                    }
                    if config.localhost_node_ports {
                        let endpoints = external_set
                            .iter()
                            .filter_map(|e| match e.address {
                                IpAddr::V4(v4) => Some(SocketAddrV4::new(v4, e.port)),
                                IpAddr::V6(_) => None,
                            })
                            .collect();
                        elements.localhost_node_ports.insert(element, endpoints);
                    }
                }
                None => {}
                other => context
                    .problem(format!("port {port_name:?} has invalid nodePort {other:?}; skipped")),
            }
        }
    }
    if is_load_balancer && external_local {
        match service.health_check_node_port.map(u16::try_from) {
            Some(Ok(port)) if port != 0 => {
                elements.health_check_node_ports.insert(port);
            }
            None => {}
            other => context.problem(format!("invalid healthCheckNodePort {other:?}; skipped")),
        }
    }
    state.problems = context.problems;
    state.elements = elements.into();
    state
}
