//! Services as kube-ipvs keeps them: only what the desired state reads, the addresses already
//! parsed. A k8s-openapi `Service` takes 824 bytes before anything in it is set, and a few
//! hundred more on the heap; a [`ServiceInfo`] of one port about 350 bytes in all.
//!
//! Like [`Slice`](super::Slice), [`ServiceInfo`] implements kube-rs's `Lookup` (kind, name
//! and namespace), which is all the change tracker's cache (`changes::Cache`) needs of it.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use ipvs_netlink::Protocol;
use k8s_openapi::api::core::v1::Service;

use super::model::{SCHEDULER_ANNOTATION, SCHEDULER_FLAGS_ANNOTATION, SERVICE_PROXY_NAME_LABEL};

/// A value parsed from the text the Service holds, or that text when it does not parse (it is
/// reported when the Service is used).
pub type Parsed<T> = Result<T, Box<str>>;

/// A Service, reduced to what the desired state reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Whether it has a spec at all.
    pub has_spec: bool,
    /// Its `type`.
    pub type_: ServiceType,
    /// `clusterIP: None`.
    pub cluster_ip_none: bool,
    /// Its `service.kubernetes.io/service-proxy-name` label.
    pub proxy_name: Option<String>,
    /// Its scheduler annotation, as written.
    pub scheduler: Option<String>,
    /// Its scheduler-flags annotation, as written.
    pub scheduler_flags: Option<String>,
    /// `sessionAffinity: ClientIP`, with the timeout it sets, if any.
    pub affinity: Option<Option<i32>>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// Its cluster IPs (`clusterIPs`, or `clusterIP` when that is empty), empty ones left out.
    pub cluster_ips: Box<[Parsed<IpAddr>]>,
    /// Its `externalIPs`.
    pub external_ips: Box<[Parsed<IpAddr>]>,
    /// The IPs of its load-balancer ingress, but those of `ipMode: Proxy` (traffic to them
    /// goes through the load balancer, not to the node).
    pub load_balancer_ips: Box<[Parsed<IpAddr>]>,
    /// Its `loadBalancerSourceRanges`.
    pub source_ranges: Box<[Parsed<IpNetwork>]>,
    /// Its `healthCheckNodePort`, as written.
    pub health_check_node_port: Option<i32>,
    /// Its ports.
    pub ports: Box<[ServiceInfoPort]>,
}

/// A Service's `type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// `ClusterIP`, unset, or a type this version does not know.
    #[default]
    ClusterIp,
    /// `NodePort`.
    NodePort,
    /// `LoadBalancer`.
    LoadBalancer,
    /// `ExternalName`.
    ExternalName,
}

/// A port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfoPort {
    /// Its name (empty when unnamed).
    pub name: String,
    /// Its protocol (`TCP` when unset), or the name of one kube-ipvs does not know.
    pub protocol: Parsed<Protocol>,
    /// Its number, as written.
    pub port: i32,
    /// Its `nodePort`, as written.
    pub node_port: Option<i32>,
}

/// A protocol from the name the API gives it (the one [`Protocol::name`] gives).
fn parse_protocol(name: String) -> Parsed<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| name.into())
}

fn parse<T: std::str::FromStr>(text: String) -> Parsed<T> {
    text.parse().map_err(|_| text.into())
}

impl From<Service> for ServiceInfo {
    fn from(service: Service) -> Self {
        let Service { metadata, spec, status } = service;
        let mut labels = metadata.labels.unwrap_or_default();
        let mut annotations = metadata.annotations.unwrap_or_default();
        let mut info = Self {
            name: metadata.name.unwrap_or_default(),
            namespace: metadata.namespace.unwrap_or_default(),
            has_spec: spec.is_some(),
            proxy_name: labels.remove(SERVICE_PROXY_NAME_LABEL),
            scheduler: annotations.remove(SCHEDULER_ANNOTATION),
            scheduler_flags: annotations.remove(SCHEDULER_FLAGS_ANNOTATION),
            ..Self::default()
        };
        let Some(spec) = spec else { return info };
        info.type_ = match spec.type_.as_deref() {
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            _ => ServiceType::ClusterIp,
        };
        info.cluster_ip_none = spec.cluster_ip.as_deref() == Some("None");
        info.affinity = (spec.session_affinity.as_deref() == Some("ClientIP"))
            .then(|| spec.session_affinity_config?.client_ip?.timeout_seconds);
        info.external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        info.internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let cluster_ips = match spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips,
            _ => spec.cluster_ip.into_iter().collect(),
        };
        info.cluster_ips = cluster_ips.into_iter().filter(|ip| !ip.is_empty()).map(parse).collect();
        info.external_ips = spec.external_ips.into_iter().flatten().map(parse).collect();
        let ingress = status.and_then(|s| s.load_balancer?.ingress).unwrap_or_default();
        info.load_balancer_ips = ingress
            .into_iter()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip)
            .map(parse)
            .collect();
        info.source_ranges = spec
            .load_balancer_source_ranges
            .into_iter()
            .flatten()
            .map(|range| range.trim().parse().map_err(|_| range.into()))
            .collect();
        info.health_check_node_port = spec.health_check_node_port;
        info.ports = spec
            .ports
            .into_iter()
            .flatten()
            .map(|port| ServiceInfoPort {
                name: port.name.unwrap_or_default(),
                protocol: parse_protocol(port.protocol.unwrap_or_else(|| "TCP".into())),
                port: port.port,
                node_port: port.node_port,
            })
            .collect();
        info
    }
}

super::model::kept_api_object!(ServiceInfo, Service);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_service_keeps_what_its_state_reads_with_its_addresses_parsed() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                         "labels": {"app": "web", SERVICE_PROXY_NAME_LABEL: "kube-ipvs"},
                         "annotations": {SCHEDULER_ANNOTATION: "sh", "other": "x"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10", "fd00::a"], "externalIPs": ["192.0.2.1", "bad"],
                     "sessionAffinity": "ClientIP",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                     "loadBalancerSourceRanges": [" 203.0.113.0/24 ", "nope"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                               {"port": 53, "protocol": "QUIC"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"},
                                                    {"ip": "198.51.100.2", "ipMode": "Proxy"},
                                                    {"hostname": "lb.example"}]}}
        }))
        .unwrap();
        let info = ServiceInfo::from(service);
        let ip = |text: &str| Ok(text.parse().unwrap());
        assert_eq!((info.name.as_str(), info.namespace.as_str()), ("web", "ns"));
        assert!(info.has_spec && !info.cluster_ip_none);
        assert_eq!(info.type_, ServiceType::LoadBalancer);
        assert_eq!(info.proxy_name.as_deref(), Some("kube-ipvs"));
        assert_eq!((info.scheduler.as_deref(), info.scheduler_flags), (Some("sh"), None));
        assert_eq!(info.affinity, Some(None));
        assert!(info.external_local && !info.internal_local);
        assert_eq!(*info.cluster_ips, [ip("10.96.0.10"), ip("fd00::a")]);
        assert_eq!(*info.external_ips, [ip("192.0.2.1"), Err("bad".into())]);
        assert_eq!(*info.load_balancer_ips, [ip("198.51.100.1")]);
        assert_eq!(
            *info.source_ranges,
            [Ok("203.0.113.0/24".parse().unwrap()), Err("nope".into())]
        );
        assert_eq!(info.health_check_node_port, Some(32000));
        assert_eq!(
            *info.ports,
            [
                ServiceInfoPort {
                    name: "http".into(),
                    protocol: Ok(Protocol::Tcp),
                    port: 80,
                    node_port: Some(30080)
                },
                ServiceInfoPort {
                    name: String::new(),
                    protocol: Err("QUIC".into()),
                    port: 53,
                    node_port: None
                },
            ]
        );
    }

    #[test]
    fn a_single_cluster_ip_stands_in_for_an_empty_list_and_none_is_headless() {
        let service = |spec| -> Service {
            serde_json::from_value(json!({"metadata": {"name": "a"}, "spec": spec})).unwrap()
        };
        let info = ServiceInfo::from(service(json!({"clusterIP": "10.96.0.1", "clusterIPs": []})));
        assert_eq!(*info.cluster_ips, [Ok("10.96.0.1".parse().unwrap())]);
        let info = ServiceInfo::from(service(json!({"clusterIP": "None"})));
        assert!(info.cluster_ip_none);
        let info = ServiceInfo::from(service(json!({"clusterIP": ""})));
        assert!(info.cluster_ips.is_empty() && !info.cluster_ip_none);
        let info =
            ServiceInfo::from(service(json!({"type": "Weird", "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}})));
        assert_eq!((info.type_, info.affinity), (ServiceType::ClusterIp, Some(Some(60))));
        let bare: Service = serde_json::from_value(json!({"metadata": {"name": "b"}})).unwrap();
        assert!(!ServiceInfo::from(bare).has_spec);
    }
}
