//! The table's set and map elements as typed items, and the changes that move the kernel
//! from one [`Elements`] to another. Pure functions: [`crate::ruleset`] writes the items as
//! nftables JSON for the whole table, [`crate::message`] as netlink bytes for changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use ipnetwork::IpNetwork;

use crate::model::{Config, Elements, Family, NodePort, ServicePort};

/// The maps from localhost NodePort and bucket to endpoint address, and to endpoint port.
/// (Two maps with one value each: nft 1.0.6 cannot read a concatenated map value in JSON.)
pub(crate) const LOCALHOST_ADDRESSES: &str = "localhost-endpoint-addresses";
pub(crate) const LOCALHOST_PORTS: &str = "localhost-endpoint-ports";
/// Buckets per localhost NodePort: endpoints are spread over them in turn.
pub(crate) const LOCALHOST_BUCKETS: u32 = 64;

/// The sets of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SetKind {
    ClusterIps,
    ExternalIps,
    LocalExternalIps,
    Vips,
    Firewalled,
    SourceRanges,
    Hairpin,
    NodePorts,
    HealthCheckPorts,
    LocalhostNodePorts,
}

/// One element of one set, in a form that orders and compares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Item {
    Address(IpAddr),
    ServicePort(ServicePort),
    SourceRange(ServicePort, IpNetwork),
    Hairpin(IpAddr),
    NodePort(NodePort),
    Port(u16),
    /// A localhost NodePort's bucket: its mark holds the masquerade bit and the bucket number.
    Bucket(NodePort, u32),
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let node_port = |p: &NodePort| format!("{}/{}", p.port, p.protocol);
        match self {
            Self::Address(a) | Self::Hairpin(a) => write!(f, "{a}"),
            Self::ServicePort(port) => write!(f, "{port}"),
            Self::SourceRange(port, range) => write!(f, "{port} from {range}"),
            Self::NodePort(port) => f.write_str(&node_port(port)),
            Self::Port(port) => write!(f, "{port}"),
            Self::Bucket(port, mark) => write!(f, "{} bucket {mark:#x}", node_port(port)),
        }
    }
}

/// The value a map element maps its key to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Value {
    /// A firewall mark (`local-traffic-*`, `local-node-ports-*`).
    Mark(u32),
    /// An endpoint address (`localhost-endpoint-addresses`).
    Address(Ipv4Addr),
    /// An endpoint port (`localhost-endpoint-ports`).
    Port(u16),
}

/// Elements to add to, or delete from, one set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetChange {
    /// The set or map.
    pub set: String,
    /// Deleted rather than added.
    pub delete: bool,
    /// The keys, each with its value in a map.
    pub entries: Vec<(Item, Option<Value>)>,
}

/// Every set's name, and the family its elements belong to (`None`: both).
pub(crate) fn sets() -> Vec<(SetKind, Option<Family>)> {
    use SetKind::*;
    let mut sets = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        for kind in
            [ClusterIps, ExternalIps, LocalExternalIps, Vips, Firewalled, SourceRanges, Hairpin]
        {
            sets.push((kind, Some(family)));
        }
    }
    sets.push((NodePorts, None));
    sets.push((HealthCheckPorts, None));
    sets.push((LocalhostNodePorts, None));
    sets
}

pub(crate) fn set_name(kind: SetKind, family: Option<Family>) -> String {
    let base = match kind {
        SetKind::ClusterIps => "cluster-ips",
        SetKind::ExternalIps => "external-ips",
        SetKind::LocalExternalIps => "local-external-ips",
        SetKind::Vips => "vips",
        SetKind::Firewalled => "firewalled",
        SetKind::SourceRanges => "source-ranges",
        SetKind::Hairpin => "hairpin",
        SetKind::NodePorts => "node-ports",
        SetKind::HealthCheckPorts => "health-check-node-ports",
        SetKind::LocalhostNodePorts => "localhost-node-ports",
    };
    match family {
        Some(Family::Ipv4) => format!("{base}-v4"),
        Some(Family::Ipv6) => format!("{base}-v6"),
        None => base.to_owned(),
    }
}

fn family_of(address: IpAddr) -> Option<Family> {
    Some(Family::of(address))
}

/// The elements of every set, by set name.
pub(crate) fn contents(elements: &Elements) -> BTreeMap<String, BTreeSet<Item>> {
    let mut sets: BTreeMap<String, BTreeSet<Item>> = sets()
        .into_iter()
        .map(|(kind, family)| (set_name(kind, family), BTreeSet::new()))
        .collect();
    let mut put = |kind, family, item| {
        sets.get_mut(&set_name(kind, family)).expect("every set is listed").insert(item);
    };
    for (kind, ports) in [
        (SetKind::ClusterIps, &elements.cluster_ips),
        (SetKind::ExternalIps, &elements.external_ips),
        (SetKind::LocalExternalIps, &elements.local_external_ips),
    ] {
        for port in ports {
            put(kind, family_of(port.address), Item::ServicePort(*port));
        }
    }
    for vip in &elements.vips {
        put(SetKind::Vips, family_of(*vip), Item::Address(*vip));
    }
    for (port, range) in &elements.source_ranges {
        // A range of the other family can never match this service.
        if range.is_ipv4() == port.address.is_ipv4() {
            put(SetKind::SourceRanges, family_of(port.address), Item::SourceRange(*port, *range));
        }
        put(SetKind::Firewalled, family_of(port.address), Item::ServicePort(*port));
    }
    for address in &elements.hairpin {
        put(SetKind::Hairpin, family_of(*address), Item::Hairpin(*address));
    }
    for node_port in &elements.node_ports {
        put(SetKind::NodePorts, None, Item::NodePort(*node_port));
    }
    for node_port in
        elements.localhost_node_ports.iter().filter(|(_, e)| !e.is_empty()).map(|(p, _)| p)
    {
        put(SetKind::LocalhostNodePorts, None, Item::NodePort(*node_port));
    }
    for port in &elements.health_check_node_ports {
        put(SetKind::HealthCheckPorts, None, Item::Port(*port));
    }
    sets
}

/// The localhost endpoint map: (NodePort, bucket mark) to endpoint.
pub(crate) fn map_entries(
    config: &Config,
    elements: &Elements,
) -> BTreeSet<(NodePort, u32, SocketAddrV4)> {
    let mut entries = BTreeSet::new();
    for (node_port, endpoints) in &elements.localhost_node_ports {
        let endpoints: Vec<&SocketAddrV4> = endpoints.iter().collect();
        if endpoints.is_empty() {
            continue;
        }
        for bucket in 0..LOCALHOST_BUCKETS {
            let endpoint = endpoints[bucket as usize % endpoints.len()];
            entries.insert((*node_port, config.masquerade_mark() + bucket, *endpoint));
        }
    }
    entries
}

/// The maps from Service port (or NodePort) to the firewall mark of its local-only virtual
/// server, by name, for `externalTrafficPolicy: Local`.
pub(crate) fn mark_maps(elements: &Elements) -> BTreeMap<String, BTreeSet<(Item, u32)>> {
    let mut maps: BTreeMap<String, BTreeSet<(Item, u32)>> = BTreeMap::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        maps.insert(mark_map_name("local-traffic", family), BTreeSet::new());
        maps.insert(mark_map_name("local-node-ports", family), BTreeSet::new());
    }
    for (port, mark) in &elements.local_traffic {
        let name = mark_map_name("local-traffic", Family::of(port.address));
        maps.get_mut(&name).expect("listed").insert((Item::ServicePort(*port), *mark));
    }
    for ((family, node_port), mark) in &elements.local_node_ports {
        let name = mark_map_name("local-node-ports", *family);
        maps.get_mut(&name).expect("listed").insert((Item::NodePort(*node_port), *mark));
    }
    maps
}

pub(crate) fn mark_map_name(base: &str, family: Family) -> String {
    match family {
        Family::Ipv4 => format!("{base}-v4"),
        Family::Ipv6 => format!("{base}-v6"),
    }
}

/// How many elements each set and map holds for these elements, by name: what a listing of
/// the table shows when nothing changed it.
pub(crate) fn element_counts(config: &Config, elements: &Elements) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> =
        contents(elements).into_iter().map(|(name, items)| (name, items.len())).collect();
    counts.extend(mark_maps(elements).into_iter().map(|(name, entries)| (name, entries.len())));
    let localhost = map_entries(config, elements).len();
    counts.insert(LOCALHOST_ADDRESSES.to_owned(), localhost);
    counts.insert(LOCALHOST_PORTS.to_owned(), localhost);
    counts
}

/// The changes that move the sets and maps from `old` to `new`: deletions, then additions.
/// Empty when nothing changed. `old` and `new` may be the whole contents or only the parts that
/// changed, as long as a localhost NodePort comes with all of its endpoints.
pub(crate) fn element_changes(config: &Config, old: &Elements, new: &Elements) -> Vec<SetChange> {
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    let mut change = |set: &str, removed: Vec<(Item, Option<Value>)>, added| {
        for (delete, entries, out) in [(true, removed, &mut deletes), (false, added, &mut adds)] {
            if !entries.is_empty() {
                out.push(SetChange { set: set.to_owned(), delete, entries });
            }
        }
    };
    // A bucket that changes endpoint is a deletion and an addition of the same key.
    let (old_map, new_map) = (map_entries(config, old), map_entries(config, new));
    let bucket = |(port, mark, _): &(NodePort, u32, SocketAddrV4)| Item::Bucket(*port, *mark);
    let removed: Vec<_> = old_map.difference(&new_map).collect();
    let added: Vec<_> = new_map.difference(&old_map).collect();
    for (name, value) in [
        (LOCALHOST_ADDRESSES, (|e: &SocketAddrV4| Value::Address(*e.ip())) as fn(&_) -> _),
        (LOCALHOST_PORTS, |e: &SocketAddrV4| Value::Port(e.port())),
    ] {
        let entries = |list: &[&(NodePort, u32, SocketAddrV4)]| {
            list.iter().map(|entry| (bucket(entry), Some(value(&entry.2)))).collect()
        };
        change(name, entries(&removed), entries(&added));
    }
    let (old_marks, new_marks) = (mark_maps(old), mark_maps(new));
    for (name, new_entries) in &new_marks {
        let old_entries = &old_marks[name];
        let entries = |a: &BTreeSet<(Item, u32)>, b| {
            a.difference(b).map(|(item, mark)| (item.clone(), Some(Value::Mark(*mark)))).collect()
        };
        change(name, entries(old_entries, new_entries), entries(new_entries, old_entries));
    }
    for (set, (removed, added)) in set_differences(old, new) {
        let entries = |items: Vec<Item>| items.into_iter().map(|item| (item, None)).collect();
        change(&set, entries(removed), entries(added));
    }
    deletes.extend(adds);
    deletes
}

/// The items each set loses and gains from `old` to `new`, by set name: the difference of
/// [`contents`], worked out collection by collection so that neither side is copied whole.
fn set_differences(old: &Elements, new: &Elements) -> BTreeMap<String, (Vec<Item>, Vec<Item>)> {
    type Changes = (Vec<Item>, Vec<Item>);
    let mut sets: BTreeMap<(SetKind, Option<Family>), Changes> = BTreeMap::new();
    let mut put = |kind, family, item, gone: bool| {
        let (removed, added) = sets.entry((kind, family)).or_default();
        if gone { removed.push(item) } else { added.push(item) }
    };
    /// Calls `each` with what only `old` has (`true`), then with what only `new` has.
    fn diff<T: Ord>(old: &BTreeSet<T>, new: &BTreeSet<T>, mut each: impl FnMut(&T, bool)) {
        old.difference(new).for_each(|item| each(item, true));
        new.difference(old).for_each(|item| each(item, false));
    }
    for (kind, old, new) in [
        (SetKind::ClusterIps, &old.cluster_ips, &new.cluster_ips),
        (SetKind::ExternalIps, &old.external_ips, &new.external_ips),
        (SetKind::LocalExternalIps, &old.local_external_ips, &new.local_external_ips),
    ] {
        diff(old, new, |port, gone| {
            put(kind, family_of(port.address), Item::ServicePort(*port), gone);
        });
    }
    diff(&old.vips, &new.vips, |vip, gone| {
        put(SetKind::Vips, family_of(*vip), Item::Address(*vip), gone);
    });
    diff(&old.source_ranges, &new.source_ranges, |(port, range), gone| {
        // A range of the other family can never match this service.
        if range.is_ipv4() == port.address.is_ipv4() {
            let item = Item::SourceRange(*port, *range);
            put(SetKind::SourceRanges, family_of(port.address), item, gone);
        }
    });
    let firewalled = |e: &Elements| e.source_ranges.iter().map(|(port, _)| *port).collect();
    diff(&firewalled(old), &firewalled(new), |port: &ServicePort, gone| {
        put(SetKind::Firewalled, family_of(port.address), Item::ServicePort(*port), gone);
    });
    diff(&old.hairpin, &new.hairpin, |address, gone| {
        put(SetKind::Hairpin, family_of(*address), Item::Hairpin(*address), gone);
    });
    diff(&old.node_ports, &new.node_ports, |port, gone| {
        put(SetKind::NodePorts, None, Item::NodePort(*port), gone);
    });
    let localhost = |e: &Elements| {
        e.localhost_node_ports.iter().filter(|(_, e)| !e.is_empty()).map(|(p, _)| *p).collect()
    };
    diff(&localhost(old), &localhost(new), |port: &NodePort, gone| {
        put(SetKind::LocalhostNodePorts, None, Item::NodePort(*port), gone);
    });
    diff(&old.health_check_node_ports, &new.health_check_node_ports, |port, gone| {
        put(SetKind::HealthCheckPorts, None, Item::Port(*port), gone);
    });
    sets.into_iter().map(|((kind, family), changes)| (set_name(kind, family), changes)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, port};

    #[test]
    fn an_unchanged_state_needs_no_change() {
        let mut elements = Elements::default();
        elements.cluster_ips.insert(port("10.96.0.10", Protocol::Tcp, 80));
        elements.vips.insert("10.96.0.10".parse().unwrap());
        assert!(element_changes(&Config::default(), &elements, &elements.clone()).is_empty());
    }

    /// Elements drawn from small pools of both families, so that two draws share some.
    fn random_elements(seed: &mut u64) -> Elements {
        let mut next = |n: u64| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed % n
        };
        let mut e = Elements::default();
        for _ in 0..12 {
            let address: IpAddr = match next(2) {
                0 => Ipv4Addr::new(10, 96, 0, next(4) as u8).into(),
                _ => format!("fd00::{}", next(4)).parse().unwrap(),
            };
            let service = ServicePort::new(address, Protocol::Tcp, 80 + next(2) as u16);
            let node_port = NodePort { protocol: Protocol::Udp, port: 30000 + next(3) as u16 };
            match next(8) {
                0 => e.cluster_ips.insert(service),
                1 => e.external_ips.insert(service),
                2 => e.local_external_ips.insert(service),
                3 => e.vips.insert(address),
                4 => e.hairpin.insert(address),
                5 => e.node_ports.insert(node_port),
                6 => e.health_check_node_ports.insert(node_port.port),
                _ => {
                    let range = ["192.0.2.0/24", "2001:db8::/32"][next(2) as usize];
                    e.source_ranges.insert((service, range.parse().unwrap()))
                }
            };
            let endpoints = e.localhost_node_ports.entry(node_port).or_default();
            if next(3) == 0 {
                endpoints.insert(SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 2), 8080));
            }
        }
        e
    }

    #[test]
    fn the_set_changes_are_the_difference_of_the_contents() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for round in 0..300 {
            let (old, new) = (random_elements(&mut seed), random_elements(&mut seed));
            let (before, after) = (contents(&old), contents(&new));
            let mut expected = BTreeMap::new();
            for (set, items) in &after {
                let removed: Vec<Item> = before[set].difference(items).cloned().collect();
                let added: Vec<Item> = items.difference(&before[set]).cloned().collect();
                if !removed.is_empty() || !added.is_empty() {
                    expected.insert(set.clone(), (removed, added));
                }
            }
            let mut changed = set_differences(&old, &new);
            changed.retain(|_, (removed, added)| !removed.is_empty() || !added.is_empty());
            assert_eq!(changed, expected, "round {round}");
        }
    }

    #[test]
    fn one_service_added_is_one_element_per_set_it_touches() {
        let old = Elements::default();
        let mut new = old.clone();
        let web = port("10.96.0.10", Protocol::Tcp, 80);
        new.cluster_ips.insert(web);
        new.vips.insert(web.address);
        assert_eq!(
            element_changes(&Config::default(), &old, &new),
            [
                SetChange {
                    set: "cluster-ips-v4".into(),
                    delete: false,
                    entries: vec![(Item::ServicePort(web), None)],
                },
                SetChange {
                    set: "vips-v4".into(),
                    delete: false,
                    entries: vec![(Item::Address(web.address), None)],
                },
            ]
        );
    }

    #[test]
    fn removals_come_before_additions_and_families_stay_apart() {
        let mut old = Elements::default();
        old.cluster_ips.insert(port("10.96.0.10", Protocol::Tcp, 80));
        let mut new = Elements::default();
        let dns = port("fd00::10", Protocol::Udp, 53);
        new.cluster_ips.insert(dns);
        let changes = element_changes(&Config::default(), &old, &new);
        assert_eq!((changes[0].set.as_str(), changes[0].delete), ("cluster-ips-v4", true));
        assert_eq!((changes[1].set.as_str(), changes[1].delete), ("cluster-ips-v6", false));
        assert_eq!(changes[1].entries, [(Item::ServicePort(dns), None)]);
    }

    #[test]
    fn local_traffic_marks_are_map_values() {
        let lb = port("192.0.2.10", Protocol::Tcp, 80);
        let mut new = Elements::default();
        new.local_traffic.insert(lb, 0x0010_0007);
        let changes = element_changes(&Config::default(), &Elements::default(), &new);
        assert_eq!(
            changes,
            [SetChange {
                set: "local-traffic-v4".into(),
                delete: false,
                entries: vec![(Item::ServicePort(lb), Some(Value::Mark(0x0010_0007)))],
            }]
        );
    }

    #[test]
    fn localhost_endpoints_fill_the_buckets_in_turn_and_change_bucket_by_bucket() {
        let config = Config { localhost_node_ports: true, ..Config::default() };
        let node_port = NodePort { protocol: Protocol::Tcp, port: 30080 };
        let a: SocketAddrV4 = "10.244.0.2:8080".parse().unwrap();
        let b: SocketAddrV4 = "10.244.0.3:8080".parse().unwrap();
        let mut old = Elements::default();
        old.localhost_node_ports.insert(node_port, [a].into());
        let entries = map_entries(&config, &old);
        assert_eq!(entries.len(), 64);
        assert!(entries.iter().all(|(_, mark, e)| *e == a && mark & 0x4000 != 0));
        let mut new = old.clone();
        new.localhost_node_ports.insert(node_port, [a, b].into());
        let spread = map_entries(&config, &new);
        assert_eq!(spread.iter().filter(|(_, _, e)| *e == b).count(), 32, "half the buckets move");
        // 32 buckets change endpoint: each is deleted and added again, in both maps.
        let changes = element_changes(&config, &old, &new);
        let count = |delete: bool| -> usize {
            changes.iter().filter(|c| c.delete == delete).map(|c| c.entries.len()).sum()
        };
        assert_eq!((count(true), count(false)), (64, 64), "{changes:?}");
        assert!(changes.iter().filter(|c| !c.delete).flat_map(|c| &c.entries).all(
            |(item, value)| {
                matches!(item, Item::Bucket(p, _) if *p == node_port)
                    && matches!(value, Some(Value::Address(x)) if *x == *b.ip())
                        | matches!(value, Some(Value::Port(8080)))
            }
        ));
    }
}
