//! The whole table as nftables JSON: its sets with their elements, chains and rules. Pure
//! functions; [`crate::Netfilter`] hands their output to `nft`.

use std::{
    borrow::Cow,
    collections::{BTreeSet, HashSet},
    net::SocketAddrV4,
};

use ipnetwork::IpNetwork;
use nftables::{
    expr::{
        BinaryOperation, CT, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression,
        NgMode, Numgen, Payload, PayloadField, Prefix,
    },
    schema::{
        Chain, Element, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType,
        SetTypeValue, Table,
    },
    stmt::{Mangle, Match, Operator, Reject, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use crate::{
    elements::{
        Item, LOCALHOST_ADDRESSES, LOCALHOST_BUCKETS, LOCALHOST_PORTS, SetKind, contents,
        map_entries, mark_map_name, mark_maps, set_name, sets,
    },
    model::{Config, Elements, Family, NodePort, ServicePort, TABLE},
};

const NAT_DSTNAT: i32 = -100;
const NAT_SRCNAT: i32 = 100;
const FILTER: i32 = 0;

pub(crate) fn set_type(kind: SetKind, family: Option<Family>) -> (Vec<SetType>, bool) {
    let addr = match family {
        Some(Family::Ipv6) => SetType::Ipv6Addr,
        _ => SetType::Ipv4Addr,
    };
    use SetType::{InetProto, InetService};
    match kind {
        SetKind::ClusterIps
        | SetKind::ExternalIps
        | SetKind::LocalExternalIps
        | SetKind::Firewalled => (vec![addr, InetProto, InetService], false),
        SetKind::Vips => (vec![addr], false),
        SetKind::SourceRanges => (vec![addr, InetProto, InetService, addr], true),
        SetKind::Hairpin => (vec![addr, addr], false),
        SetKind::NodePorts | SetKind::LocalhostNodePorts => (vec![InetProto, InetService], false),
        SetKind::HealthCheckPorts => (vec![InetService], false),
    }
}

fn string(s: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(s.into()))
}

fn concat(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(items))
}

fn item_expression(item: &Item) -> Expression<'static> {
    let service_port = |p: &ServicePort| {
        vec![
            string(p.address.to_string()),
            string(p.protocol.name().to_lowercase()),
            Expression::Number(p.port.into()),
        ]
    };
    match item {
        Item::Address(address) => string(address.to_string()),
        Item::ServicePort(port) => concat(service_port(port)),
        Item::SourceRange(port, range) => {
            let mut items = service_port(port);
            items.push(Expression::Named(NamedExpression::Prefix(Prefix {
                addr: Box::new(string(range.network().to_string())),
                len: range.prefix().into(),
            })));
            concat(items)
        }
        Item::Hairpin(address) => {
            concat(vec![string(address.to_string()), string(address.to_string())])
        }
        Item::NodePort(node_port) => concat(vec![
            string(node_port.protocol.name().to_lowercase()),
            Expression::Number(node_port.port.into()),
        ]),
        Item::Port(port) => Expression::Number((*port).into()),
        Item::Bucket(node_port, mark) => concat(vec![
            string(node_port.protocol.name().to_lowercase()),
            Expression::Number(node_port.port.into()),
            Expression::Number(*mark),
        ]),
    }
}

fn element(set: &str, items: &BTreeSet<Item>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: set.to_owned().into(),
        elem: items.iter().map(item_expression).collect::<Vec<_>>().into(),
    })
}

/// The elements of both localhost maps for these entries.
fn map_elements(entries: &BTreeSet<(NodePort, u32, SocketAddrV4)>) -> [NfListObject<'static>; 2] {
    let key = |port: &NodePort, mark: u32| item_expression(&Item::Bucket(*port, mark));
    let map = |name: &'static str, value: &dyn Fn(&SocketAddrV4) -> Expression<'static>| {
        NfListObject::Element(Element {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            elem: entries
                .iter()
                .map(|(port, mark, endpoint)| {
                    Expression::List(vec![key(port, *mark), value(endpoint)])
                })
                .collect::<Vec<_>>()
                .into(),
        })
    };
    [
        map(LOCALHOST_ADDRESSES, &|endpoint| string(endpoint.ip().to_string())),
        map(LOCALHOST_PORTS, &|endpoint| Expression::Number(endpoint.port().into())),
    ]
}

fn mark_map_element(name: &str, entries: &BTreeSet<(Item, u32)>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.to_owned().into(),
        elem: entries
            .iter()
            .map(|(item, mark)| {
                Expression::List(vec![item_expression(item), Expression::Number(*mark)])
            })
            .collect::<Vec<_>>()
            .into(),
    })
}

/// `add map inet kube-ipvs <name> { type <key> : <value>; }`
fn add_map(name: &str, key: Vec<SetType>, value: SetType) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Map(Box::new(nftables::schema::Map {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.to_owned().into(),
        handle: None,
        set_type: SetTypeValue::Concatenated(key.into()),
        map: SetTypeValue::Single(value),
        policy: None,
        flags: None,
        elem: None,
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    }))))
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table { family: NfFamily::INet, name: TABLE.into(), handle: None })
}

/// The whole table as one transaction: created if missing, deleted, and created again with its
/// sets, elements, chains and rules. The kernel applies it atomically.
pub(crate) fn install(config: &Config, elements: &Elements) -> Nftables<'static> {
    let mut objects = vec![
        NfObject::CmdObject(NfCmd::Add(table())),
        NfObject::CmdObject(NfCmd::Delete(table())),
        NfObject::CmdObject(NfCmd::Add(table())),
    ];
    let contents = contents(elements);
    for (kind, family) in sets() {
        let name = set_name(kind, family);
        let (types, interval) = set_type(kind, family);
        let items = &contents[&name];
        objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.clone().into(),
            handle: None,
            set_type: if types.len() == 1 {
                SetTypeValue::Single(types[0])
            } else {
                SetTypeValue::Concatenated(types.into())
            },
            policy: None,
            flags: interval.then(|| HashSet::from([SetFlag::Interval])),
            elem: None,
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        })))));
        if !items.is_empty() {
            objects.push(NfObject::CmdObject(NfCmd::Add(element(&name, items))));
        }
    }
    for (name, value) in
        [(LOCALHOST_ADDRESSES, SetType::Ipv4Addr), (LOCALHOST_PORTS, SetType::InetService)]
    {
        objects.push(add_map(
            name,
            vec![SetType::InetProto, SetType::InetService, SetType::Mark],
            value,
        ));
    }
    let entries = map_entries(config, elements);
    if !entries.is_empty() {
        objects.extend(map_elements(&entries).map(|e| NfObject::CmdObject(NfCmd::Add(e))));
    }
    for (name, entries) in mark_maps(elements) {
        let family = if name.ends_with("-v6") { Family::Ipv6 } else { Family::Ipv4 };
        let key = if name.starts_with("local-traffic") {
            let addr = if family == Family::Ipv6 { SetType::Ipv6Addr } else { SetType::Ipv4Addr };
            vec![addr, SetType::InetProto, SetType::InetService]
        } else {
            vec![SetType::InetProto, SetType::InetService]
        };
        objects.push(add_map(&name, key, SetType::Mark));
        if !entries.is_empty() {
            objects.push(NfObject::CmdObject(NfCmd::Add(mark_map_element(&name, &entries))));
        }
    }
    for (name, hook) in chains() {
        objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            newname: None,
            handle: None,
            _type: hook.map(|(kind, _, _)| kind),
            hook: hook.map(|(_, hook, _)| hook),
            prio: hook.map(|(_, _, prio)| prio),
            dev: None,
            policy: hook.map(|_| NfChainPolicy::Accept),
        }))));
    }
    for (chain, statements) in rules(config) {
        objects.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: chain.into(),
            expr: statements.into(),
            handle: None,
            index: None,
            comment: None,
        }))));
    }
    Nftables { objects: objects.into() }
}

/// The transaction that deletes the table (creating it first, so that it cannot fail).
pub(crate) fn remove() -> Nftables<'static> {
    Nftables {
        objects: vec![
            NfObject::CmdObject(NfCmd::Add(table())),
            NfObject::CmdObject(NfCmd::Delete(table())),
        ]
        .into(),
    }
}

type Hook = Option<(NfChainType, NfHook, i32)>;

fn chains() -> Vec<(&'static str, Hook)> {
    vec![
        ("nat-prerouting", Some((NfChainType::NAT, NfHook::Prerouting, NAT_DSTNAT))),
        ("nat-output", Some((NfChainType::NAT, NfHook::Output, NAT_DSTNAT))),
        ("nat-postrouting", Some((NfChainType::NAT, NfHook::Postrouting, NAT_SRCNAT))),
        ("filter-input", Some((NfChainType::Filter, NfHook::Input, FILTER))),
        ("local-traffic", None),
        ("mark-for-masquerade", None),
        ("source-ranges", None),
        ("vip-filter", None),
    ]
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn set_ref(name: String) -> Expression<'static> {
    string(format!("@{name}"))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn addr_field(family: Family, field: &'static str) -> Expression<'static> {
    match family {
        Family::Ipv4 => payload("ip", field),
        Family::Ipv6 => payload("ip6", field),
    }
}

/// `ip daddr . meta l4proto . th dport`
fn service_key(family: Family) -> Expression<'static> {
    concat(vec![addr_field(family, "daddr"), meta(MetaKey::L4proto), payload("th", "dport")])
}

fn in_set(key: Expression<'static>, kind: SetKind, family: Option<Family>) -> Statement<'static> {
    matches(key, Operator::EQ, set_ref(set_name(kind, family)))
}

fn ct_state_new() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT { key: "state".into(), family: None, dir: None })),
        Operator::IN,
        string("new"),
    )
}

fn jump(chain: &'static str) -> Statement<'static> {
    Statement::Jump(nftables::stmt::JumpTarget { target: chain.into() })
}

fn fib_local(flag: FibFlag) -> Statement<'static> {
    fib_type(flag, Operator::EQ)
}

/// `fib <flag> type <op> local`
fn fib_type(flag: FibFlag, op: Operator) -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: HashSet::from([flag]),
        })),
        op,
        string("local"),
    )
}

fn prefix(network: &IpNetwork) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(string(network.network().to_string())),
        len: network.prefix().into(),
    }))
}

/// `meta l4proto . th dport . meta mark map @name`
fn localhost_lookup(name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Map(Box::new(nftables::expr::Map {
        key: concat(vec![meta(MetaKey::L4proto), payload("th", "dport"), meta(MetaKey::Mark)]),
        data: string(format!("@{name}")),
    })))
}

/// The rules, chain by chain, in order.
/// A rule: its chain, and its statements.
type ChainRule = (&'static str, Vec<Statement<'static>>);

/// The table's rules, chain by chain, in order.
fn rules(config: &Config) -> Vec<ChainRule> {
    let mark = config.masquerade_mark();
    let mut rules = vec![("nat-prerouting", vec![jump("local-traffic")])];
    if config.localhost_node_ports {
        rules.push(localhost_node_ports(mark));
    }
    rules.push(("nat-prerouting", vec![jump("mark-for-masquerade")]));
    rules.push(("nat-output", vec![jump("mark-for-masquerade")]));
    rules.extend(local_traffic(config));
    rules.extend(mark_for_masquerade(config, mark));
    rules.extend(postrouting(mark));
    rules.extend(filter());
    rules
}

/// Sets the masquerade bit.
fn set_mark(mark: u32) -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            meta(MetaKey::Mark),
            Expression::Number(mark),
        ]))),
    })
}

/// A source outside the pod networks of `family`; `None` when none is configured.
fn not_from_pods(config: &Config, family: Family) -> Option<Statement<'static>> {
    let cidrs: Vec<&IpNetwork> =
        (config.cluster_cidrs.iter()).filter(|c| c.is_ipv4() == (family == Family::Ipv4)).collect();
    if cidrs.is_empty() {
        return None;
    }
    let set = cidrs.iter().map(|c| nftables::expr::SetItem::Element(prefix(c))).collect();
    Some(matches(
        addr_field(family, "saddr"),
        Operator::NEQ,
        Expression::Named(NamedExpression::Set(set)),
    ))
}

/// The protocol and destination port, as the NodePort sets key them.
fn protocol_and_port() -> Expression<'static> {
    concat(vec![meta(MetaKey::L4proto), payload("th", "dport")])
}

/// externalTrafficPolicy Local: traffic from outside the cluster (not from a pod, not from
/// the node) is marked for the local-only firewall-mark virtual server.
fn local_traffic(config: &Config) -> Vec<ChainRule> {
    let set_mark_from = |key: Expression<'static>, map: String| {
        Statement::Mangle(Mangle {
            key: meta(MetaKey::Mark),
            value: Expression::Named(NamedExpression::Map(Box::new(nftables::expr::Map {
                key,
                data: string(format!("@{map}")),
            }))),
        })
    };
    let mut rules = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        let name = match family {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        };
        let mut external = vec![matches(meta(MetaKey::Nfproto), Operator::EQ, string(name))];
        external.extend(not_from_pods(config, family));
        external.push(fib_type(FibFlag::Saddr, Operator::NEQ));
        let mut by_address = external.clone();
        by_address.push(set_mark_from(service_key(family), mark_map_name("local-traffic", family)));
        rules.push(("local-traffic", by_address));
        let mut by_node_port = external;
        by_node_port.push(fib_local(FibFlag::Daddr));
        by_node_port
            .push(set_mark_from(protocol_and_port(), mark_map_name("local-node-ports", family)));
        rules.push(("local-traffic", by_node_port));
    }
    rules
}

/// Localhost NodePorts: straight to an endpoint (IPVS cannot take them), marked for
/// masquerade; the mark's low bits carry the bucket.
fn localhost_node_ports(mark: u32) -> ChainRule {
    let bucket = Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: Expression::Named(NamedExpression::Numgen(Numgen {
            mode: NgMode::Random,
            ng_mod: LOCALHOST_BUCKETS,
            offset: Some(mark),
        })),
    });
    let to_endpoint = Statement::DNAT(Some(nftables::stmt::NAT {
        addr: Some(localhost_lookup(LOCALHOST_ADDRESSES)),
        family: Some(nftables::stmt::NATFamily::IP),
        port: Some(localhost_lookup(LOCALHOST_PORTS)),
        flags: None,
    }));
    let loopback = IpNetwork::V4("127.0.0.0/8".parse().expect("a network"));
    let statements = vec![
        matches(addr_field(Family::Ipv4, "daddr"), Operator::EQ, prefix(&loopback)),
        in_set(protocol_and_port(), SetKind::LocalhostNodePorts, None),
        bucket,
        to_endpoint,
    ];
    ("nat-output", statements)
}

/// What is marked for masquerade: external IPs and load balancers with
/// externalTrafficPolicy Cluster always, ClusterIPs from outside the pods (or all, with
/// masquerade-all), NodePorts on every local address.
fn mark_for_masquerade(config: &Config, mark: u32) -> Vec<ChainRule> {
    let mut rules = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        let f = Some(family);
        rules.push((
            "mark-for-masquerade",
            vec![in_set(service_key(family), SetKind::ExternalIps, f), set_mark(mark)],
        ));
        let mut cluster = Vec::new();
        if !config.masquerade_all {
            cluster
                .push(not_from_pods(config, family).unwrap_or_else(|| fib_local(FibFlag::Saddr)));
        }
        cluster.push(in_set(service_key(family), SetKind::ClusterIps, f));
        cluster.push(set_mark(mark));
        rules.push(("mark-for-masquerade", cluster));
    }
    rules.push((
        "mark-for-masquerade",
        vec![
            fib_local(FibFlag::Daddr),
            in_set(protocol_and_port(), SetKind::NodePorts, None),
            set_mark(mark),
        ],
    ));
    rules
}

/// Masquerade: hairpin traffic (a pod that reached itself through a Service), and what is
/// marked, the mark cleared.
fn postrouting(mark: u32) -> Vec<ChainRule> {
    let mut rules = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        let pair = concat(vec![addr_field(family, "saddr"), addr_field(family, "daddr")]);
        rules.push((
            "nat-postrouting",
            vec![in_set(pair, SetKind::Hairpin, Some(family)), Statement::Masquerade(None)],
        ));
    }
    let marked = matches(
        Expression::BinaryOperation(Box::new(BinaryOperation::AND(
            meta(MetaKey::Mark),
            Expression::Number(mark),
        ))),
        Operator::EQ,
        Expression::Number(mark),
    );
    let clear = Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: Expression::BinaryOperation(Box::new(BinaryOperation::XOR(
            meta(MetaKey::Mark),
            Expression::Number(mark),
        ))),
    });
    rules.push(("nat-postrouting", vec![marked, clear, Statement::Masquerade(None)]));
    rules
}

/// The filter: health-check NodePorts always open, loadBalancerSourceRanges enforced, and
/// only Service ports open on Service addresses (kubernetes#72236).
fn filter() -> Vec<ChainRule> {
    let mut rules = vec![("filter-input", vec![ct_state_new(), jump("source-ranges")])];
    // Health-check NodePorts: nothing below may refuse them.
    rules.push((
        "filter-input",
        vec![
            matches(meta(MetaKey::L4proto), Operator::EQ, string("tcp")),
            in_set(payload("th", "dport"), SetKind::HealthCheckPorts, None),
            Statement::Accept(None),
        ],
    ));
    for family in [Family::Ipv4, Family::Ipv6] {
        let f = Some(family);
        rules.push((
            "filter-input",
            vec![
                ct_state_new(),
                in_set(addr_field(family, "daddr"), SetKind::Vips, f),
                jump("vip-filter"),
            ],
        ));
        // loadBalancerSourceRanges: other sources are dropped.
        let service_and_source = concat(vec![
            addr_field(family, "daddr"),
            meta(MetaKey::L4proto),
            payload("th", "dport"),
            addr_field(family, "saddr"),
        ]);
        rules.push((
            "source-ranges",
            vec![
                in_set(service_key(family), SetKind::Firewalled, f),
                matches(
                    service_and_source,
                    Operator::NEQ,
                    set_ref(set_name(SetKind::SourceRanges, f)),
                ),
                Statement::Drop(None),
            ],
        ));
        for kind in [SetKind::ClusterIps, SetKind::ExternalIps, SetKind::LocalExternalIps] {
            rules.push((
                "vip-filter",
                vec![in_set(service_key(family), kind, f), Statement::Return(None)],
            ));
        }
    }
    rules.push(("vip-filter", vec![Statement::Reject(Some(Reject { _type: None, expr: None }))]));
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, port};

    #[test]
    fn source_ranges_name_the_service_as_firewalled() {
        let lb = port("192.0.2.10", Protocol::Tcp, 80);
        let mut new = Elements::default();
        new.source_ranges.insert((lb, "203.0.113.0/24".parse().unwrap()));
        // A range of the other family still firewalls the service, and allows nothing.
        new.source_ranges.insert((lb, "2001:db8::/32".parse().unwrap()));
        let sets = contents(&new);
        assert_eq!(sets["firewalled-v4"].len(), 1);
        assert_eq!(sets["source-ranges-v4"].len(), 1);
        assert!(sets["source-ranges-v6"].is_empty());
        let json = serde_json::to_value(item_expression(sets["source-ranges-v4"].first().unwrap()))
            .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"concat": ["192.0.2.10", "tcp", 80, {"prefix": {"addr": "203.0.113.0", "len": 24}}]})
        );
    }

    #[test]
    fn the_install_transaction_replaces_the_whole_table_atomically() {
        let config =
            Config { cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()], ..Config::default() };
        let json = serde_json::to_value(install(&config, &Elements::default())).unwrap();
        let objects = json["nftables"].as_array().unwrap();
        assert_eq!(
            objects[0],
            serde_json::json!({"add": {"table": {"family": "inet", "name": "kube-ipvs"}}})
        );
        assert_eq!(
            objects[1],
            serde_json::json!({"delete": {"table": {"family": "inet", "name": "kube-ipvs"}}})
        );
        let sets = objects.iter().filter(|o| o["add"]["set"].is_object()).count();
        assert_eq!(sets, 17);
        let base_chains: Vec<&str> =
            objects.iter().filter_map(|o| o["add"]["chain"]["hook"].as_str()).collect();
        assert_eq!(base_chains, ["prerouting", "output", "postrouting", "input"]);
        // The cluster CIDR is what decides masquerade for ClusterIPs.
        let text = json.to_string();
        assert!(text.contains(r#"{"prefix":{"addr":"10.244.0.0","len":16}}"#), "{text}");
    }
}
