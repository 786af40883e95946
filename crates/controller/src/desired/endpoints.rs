//! Which endpoints a Service port uses, as kube-proxy decides (`CategorizeEndpoints`): ready
//! ones, or serving-and-terminating ones when none is ready; topology hints; local ones.

use std::{collections::BTreeMap, net::IpAddr};

use super::{
    model::{NodeInfo, Problem},
    slice::Slice,
};

/// One endpoint of one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) address: IpAddr,
    pub(crate) port: u16,
    pub(crate) ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
    pub(crate) local: bool,
    pub(crate) zone_hints: Vec<String>,
    pub(crate) node_hints: Vec<String>,
}

fn slice_name(slice: &Slice) -> String {
    format!("EndpointSlice {}/{}", slice.namespace, slice.name)
}

/// The endpoints of the Service port named `port_name` with `protocol`, from every slice of
/// the Service: duplicates across slices merged (an endpoint ready in any slice is ready),
/// addresses that do not parse reported and skipped.
pub(crate) fn collect(
    slices: &[&Slice],
    port_name: &str,
    protocol: &str,
    node: &NodeInfo,
    problems: &mut Vec<Problem>,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        let port = slice.ports.iter().find(|p| p.name == port_name && p.protocol == protocol);
        let Some(port) = port else { continue };
        let number = match port.port.map(u16::try_from) {
            Some(Ok(number)) if number != 0 => number,
            other => {
                problems.push(Problem {
                    object: slice_name(slice),
                    reason: format!("port {port_name:?} has no valid number ({other:?}); skipped"),
                });
                continue;
            }
        };
        for text in &slice.invalid_addresses {
            let reason = if text.is_empty() {
                "an endpoint has no address; skipped".to_owned()
            } else {
                format!("endpoint address {text:?} is not an IP address; skipped")
            };
            problems.push(Problem { object: slice_name(slice), reason });
        }
        for endpoint in &slice.endpoints {
            let candidate = Endpoint {
                address: endpoint.address,
                port: number,
                ready: endpoint.ready,
                serving: endpoint.serving,
                terminating: endpoint.terminating,
                local: endpoint.node_name.as_deref() == Some(&node.name),
                zone_hints: endpoint.hints.as_ref().map(|h| h.zones.clone()).unwrap_or_default(),
                node_hints: endpoint.hints.as_ref().map(|h| h.nodes.clone()).unwrap_or_default(),
            };
            merged
                .entry((endpoint.address, number))
                .and_modify(|seen| {
                    if candidate.ready && !seen.ready {
                        *seen = candidate.clone();
                    }
                })
                .or_insert(candidate);
        }
    }
    merged.into_values().collect()
}

/// How topology hints narrow the endpoints down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

fn topology(endpoints: &[Endpoint], node: &NodeInfo) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(&node.name))
    {
        return Topology::SameNode;
    }
    if let Some(zone) = &node.zone
        && ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.contains(zone))
    {
        return Topology::SameZone;
    }
    Topology::None
}

/// The endpoints for cluster-wide traffic, and those on this node.
pub(crate) fn categorize<'a>(
    endpoints: &'a [Endpoint],
    node: &NodeInfo,
) -> (Vec<&'a Endpoint>, Vec<&'a Endpoint>) {
    let mode = topology(endpoints, node);
    let in_topology = |e: &&Endpoint| match mode {
        Topology::None => true,
        Topology::SameNode => e.node_hints.contains(&node.name),
        Topology::SameZone => node.zone.as_ref().is_some_and(|zone| e.zone_hints.contains(zone)),
    };
    let usable = |candidates: Vec<&'a Endpoint>| -> Vec<&'a Endpoint> {
        let ready: Vec<&Endpoint> = candidates.iter().copied().filter(|e| e.ready).collect();
        if !ready.is_empty() {
            return ready;
        }
        candidates.into_iter().filter(|e| e.serving && e.terminating).collect()
    };
    let cluster_ready: Vec<&Endpoint> =
        endpoints.iter().filter(|e| e.ready).filter(in_topology).collect();
    let cluster = if cluster_ready.is_empty() {
        endpoints.iter().filter(|e| e.serving && e.terminating).collect()
    } else {
        cluster_ready
    };
    let local = usable(endpoints.iter().filter(|e| e.local).collect());
    (cluster, local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(
        address: &str,
        ready: bool,
        serving: bool,
        terminating: bool,
        local: bool,
    ) -> Endpoint {
        Endpoint {
            address: address.parse().unwrap(),
            port: 8080,
            ready,
            serving,
            terminating,
            local,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn addresses(list: &[&Endpoint]) -> Vec<String> {
        list.iter().map(|e| e.address.to_string()).collect()
    }

    fn node() -> NodeInfo {
        NodeInfo { name: "node-a".into(), zone: Some("zone-a".into()), ..NodeInfo::default() }
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let all = [
            endpoint("10.0.0.1", true, true, false, true),
            endpoint("10.0.0.2", false, false, false, true),
            endpoint("10.0.0.3", false, true, true, false),
            endpoint("10.0.0.4", true, true, false, false),
        ];
        let (cluster, local) = categorize(&all, &node());
        assert_eq!(addresses(&cluster), ["10.0.0.1", "10.0.0.4"]);
        assert_eq!(addresses(&local), ["10.0.0.1"]);
    }

    #[test]
    fn serving_terminating_endpoints_are_the_fallback() {
        let all = [
            endpoint("10.0.0.5", false, true, true, true),
            endpoint("10.0.0.6", false, true, true, false),
            endpoint("10.0.0.7", false, false, true, false),
        ];
        let (cluster, local) = categorize(&all, &node());
        assert_eq!(addresses(&cluster), ["10.0.0.5", "10.0.0.6"]);
        assert_eq!(addresses(&local), ["10.0.0.5"]);
    }

    #[test]
    fn zone_hints_narrow_the_cluster_endpoints_only_when_every_ready_one_has_them() {
        let mut a = endpoint("10.0.0.1", true, true, false, false);
        a.zone_hints = vec!["zone-a".into()];
        let mut b = endpoint("10.0.0.2", true, true, false, false);
        b.zone_hints = vec!["zone-b".into()];
        let both = [a.clone(), b.clone()];
        let (cluster, _) = categorize(&both, &node());
        assert_eq!(addresses(&cluster), ["10.0.0.1"]);
        // One ready endpoint without hints: hints are ignored.
        let c = endpoint("10.0.0.3", true, true, false, false);
        let three = [a.clone(), b, c];
        let (cluster, _) = categorize(&three, &node());
        assert_eq!(cluster.len(), 3);
        // Node hints come first.
        let mut d = endpoint("10.0.0.4", true, true, false, true);
        d.node_hints = vec!["node-a".into()];
        let mut e = a;
        e.node_hints = vec!["node-z".into()];
        let hinted = [d, e];
        let (cluster, _) = categorize(&hinted, &node());
        assert_eq!(addresses(&cluster), ["10.0.0.4"]);
    }
}
