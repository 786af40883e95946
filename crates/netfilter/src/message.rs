//! Set element changes as nf_tables netlink messages: the bytes of each key and value, and the
//! request builders. Pure functions; [`crate::socket`] sends what they build.
//!
//! The kernel compares keys byte for byte, so they must be laid out as `nft` lays them out:
//! addresses and ports in network order, marks in host order, and in a concatenation every
//! field padded to a multiple of 4 bytes (one nf_tables register). A range in a concatenation
//! (`source-ranges-*`) is a key with the first addresses and a key end with the last.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_core::{DecodeError, DefaultNla, NLA_TYPE_MASK, NlasIterator};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};

use crate::{
    elements::{Item, SetChange, Value},
    model::{NodePort, ServicePort, TABLE},
    socket::SocketError,
};

/// `NFTA_SET_ELEM_LIST_ELEMENTS`: a message's list of elements.
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
/// `NFTA_DATA_VALUE`, inside `NFTA_SET_ELEM_KEY_END`.
const NFTA_DATA_VALUE: u16 = 1;
/// Elements per message: the element list is one attribute, whose length must fit in 16 bits
/// (the largest element, an IPv6 source range, takes under 100 bytes).
const ELEMENTS_PER_MESSAGE: usize = 512;

fn address(out: &mut Vec<u8>, address: IpAddr) {
    match address {
        IpAddr::V4(a) => out.extend(a.octets()),
        IpAddr::V6(a) => out.extend(a.octets()),
    }
}

/// One field of a concatenation, padded to a register.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend(bytes);
    out.resize(out.len() + (4 - bytes.len() % 4) % 4, 0);
}

fn node_port(out: &mut Vec<u8>, port: &NodePort) {
    // IP protocol numbers fit in a byte.
    field(out, &[port.protocol.number() as u8]);
    field(out, &port.port.to_be_bytes());
}

fn service_port(out: &mut Vec<u8>, port: &ServicePort) {
    address(out, port.address);
    node_port(out, &NodePort { protocol: port.protocol, port: port.port });
}

/// The key of an element, as the kernel stores it.
pub(crate) fn key(item: &Item) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    match item {
        Item::Address(a) => address(&mut out, *a),
        Item::ServicePort(port) => service_port(&mut out, port),
        Item::SourceRange(port, range) => {
            service_port(&mut out, port);
            address(&mut out, range.network());
        }
        Item::Hairpin(a) => {
            address(&mut out, *a);
            address(&mut out, *a);
        }
        Item::NodePort(port) => node_port(&mut out, port),
        // Alone, an inet_service is its two bytes.
        Item::Port(port) => out.extend(port.to_be_bytes()),
        Item::Bucket(port, mark) => {
            node_port(&mut out, port);
            out.extend(mark.to_ne_bytes());
        }
    }
    out
}

/// The end of a range element's key: the same fields, with the range's last address.
pub(crate) fn key_end(item: &Item) -> Option<Vec<u8>> {
    let Item::SourceRange(port, range) = item else { return None };
    let mut out = Vec::with_capacity(40);
    service_port(&mut out, port);
    address(&mut out, last_address(range));
    Some(out)
}

fn last_address(range: &IpNetwork) -> IpAddr {
    match range {
        IpNetwork::V4(n) => n.broadcast().into(),
        IpNetwork::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix());
            let mask = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
            std::net::Ipv6Addr::from(u128::from(n.network()) | mask).into()
        }
    }
}

/// A map element's value, as the kernel stores it.
pub(crate) fn value(value: &Value) -> Vec<u8> {
    match value {
        Value::Mark(mark) => mark.to_ne_bytes().to_vec(),
        Value::Address(a) => a.octets().to_vec(),
        Value::Port(port) => port.to_be_bytes().to_vec(),
    }
}

fn element(item: &Item, data: Option<&Value>) -> ListAttribute<SetElementAttribute> {
    let mut attributes = vec![SetElementAttribute::Key(DataAttribute::Value(key(item)))];
    if let Some(end) = key_end(item) {
        attributes.push(SetElementAttribute::KeyEnd(vec![DefaultNla::new(NFTA_DATA_VALUE, end)]));
    }
    if let Some(data) = data {
        attributes.push(SetElementAttribute::Data(DataAttribute::Value(value(data))));
    }
    ListAttribute::Element(attributes)
}

/// `NFT_MSG_NEWSETELEM` or `NFT_MSG_DELSETELEM` messages for one change, as many as its
/// elements need.
pub(crate) fn change_messages(change: &SetChange) -> impl Iterator<Item = NfTablesMessage> + '_ {
    change.entries.chunks(ELEMENTS_PER_MESSAGE).map(|chunk| {
        let message = SetElementMessage {
            attributes: vec![
                SetElementList::Table(TABLE.to_owned()),
                SetElementList::Set(change.set.clone()),
                SetElementList::Elements(
                    chunk.iter().map(|(item, data)| element(item, data.as_ref())).collect(),
                ),
            ],
        };
        if change.delete {
            NfTablesMessage::DeleteSetElement(message)
        } else {
            NfTablesMessage::NewSetElement(message)
        }
    })
}

/// `NFT_MSG_GETSETELEM` for one set or map: with `NLM_F_DUMP`, every element.
pub(crate) fn list_elements(set: &str) -> NfTablesMessage {
    NfTablesMessage::GetSetElement(SetElementMessage {
        attributes: vec![
            SetElementList::Table(TABLE.to_owned()),
            SetElementList::Set(set.to_owned()),
        ],
    })
}

/// How many elements a dump answer carries: the entries of its element list, counted without
/// decoding them. `payload` is the message after its netlink header.
pub(crate) fn element_count(payload: &[u8]) -> Result<usize, SocketError> {
    let invalid = |e: DecodeError| SocketError::Decode(format!("set element dump: {e}"));
    // The netfilter header (family, version, resource id) comes first.
    let attributes = payload.get(4..).unwrap_or_default();
    let mut count = 0;
    for attribute in NlasIterator::new(attributes) {
        let attribute = attribute.map_err(invalid)?;
        if attribute.kind() & NLA_TYPE_MASK == NFTA_SET_ELEM_LIST_ELEMENTS {
            for element in NlasIterator::new(attribute.value()) {
                element.map_err(invalid)?;
                count += 1;
            }
        }
    }
    Ok(count)
}

/// `NFTA_SET_ELEM_KEY`: an element's key, holding an `NFTA_DATA_VALUE`.
const NFTA_SET_ELEM_KEY: u16 = 1;

/// The keys of the elements a dump answer carries, as the kernel stores them (the bytes
/// [`key`] builds). `payload` is the message after its netlink header.
pub(crate) fn element_keys(payload: &[u8]) -> Result<Vec<Vec<u8>>, SocketError> {
    let invalid = |e: DecodeError| SocketError::Decode(format!("set element dump: {e}"));
    let attributes = payload.get(4..).unwrap_or_default();
    let mut keys = Vec::new();
    for attribute in NlasIterator::new(attributes) {
        let attribute = attribute.map_err(invalid)?;
        if attribute.kind() & NLA_TYPE_MASK != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for element in NlasIterator::new(attribute.value()) {
            let element = element.map_err(invalid)?;
            for part in NlasIterator::new(element.value()) {
                let part = part.map_err(invalid)?;
                if part.kind() & NLA_TYPE_MASK != NFTA_SET_ELEM_KEY {
                    continue;
                }
                for data in NlasIterator::new(part.value()) {
                    let data = data.map_err(invalid)?;
                    if data.kind() & NLA_TYPE_MASK == NFTA_DATA_VALUE {
                        keys.push(data.value().to_vec());
                    }
                }
            }
        }
    }
    Ok(keys)
}

/// The service port a `cluster-ips`, `external-ips` or `local-external-ips` key holds (the
/// reverse of [`key`] for [`Item::ServicePort`]); `None` for bytes of another shape.
pub(crate) fn service_port_of_key(key: &[u8]) -> Option<ServicePort> {
    let (address, rest): (IpAddr, &[u8]) = match key.len() {
        12 => (<[u8; 4]>::try_from(&key[..4]).ok()?.into(), &key[4..]),
        24 => (<[u8; 16]>::try_from(&key[..16]).ok()?.into(), &key[16..]),
        _ => return None,
    };
    let protocol = crate::model::Protocol::from_number(rest[0].into()).ok()?;
    Some(ServicePort::new(address, protocol, u16::from_be_bytes([rest[4], rest[5]])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, port};

    #[test]
    fn concatenated_fields_are_padded_to_registers() {
        let item = Item::ServicePort(port("10.96.0.10", Protocol::Tcp, 80));
        assert_eq!(key(&item), [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0]);
        let item = Item::NodePort(NodePort { protocol: Protocol::Udp, port: 30053 });
        assert_eq!(key(&item), [17, 0, 0, 0, 0x75, 0x65, 0, 0]);
    }

    #[test]
    fn a_port_alone_is_two_bytes_and_marks_are_in_host_order() {
        assert_eq!(key(&Item::Port(32100)), [0x7d, 0x64]);
        let bucket = Item::Bucket(NodePort { protocol: Protocol::Tcp, port: 30080 }, 0x4003);
        let mut expected = vec![6, 0, 0, 0, 0x75, 0x80, 0, 0];
        expected.extend(0x4003u32.to_ne_bytes());
        assert_eq!(key(&bucket), expected);
        assert_eq!(value(&Value::Mark(0x0010_0001)), 0x0010_0001u32.to_ne_bytes());
        assert_eq!(value(&Value::Port(8080)), [0x1f, 0x90]);
    }

    #[test]
    fn a_source_range_runs_from_its_network_to_its_last_address() {
        let lb = port("192.0.2.10", Protocol::Tcp, 80);
        let item = Item::SourceRange(lb, "203.0.113.0/24".parse().unwrap());
        assert_eq!(key(&item)[12..], [203, 0, 113, 0]);
        assert_eq!(key_end(&item).unwrap()[12..], [203, 0, 113, 255]);
        assert_eq!(key(&item)[..12], key_end(&item).unwrap()[..12]);
        let lb6 = port("2001:db8::10", Protocol::Tcp, 443);
        let item = Item::SourceRange(lb6, "2001:db8:1::/48".parse().unwrap());
        let end = key_end(&item).unwrap();
        assert_eq!(end.len(), 40);
        let last: [u8; 16] = end[24..].try_into().unwrap();
        assert_eq!(
            std::net::Ipv6Addr::from(last),
            "2001:db8:1:ffff:ffff:ffff:ffff:ffff".parse::<std::net::Ipv6Addr>().unwrap()
        );
        let host = Item::SourceRange(lb6, "2001:db8::1/128".parse().unwrap());
        assert_eq!(key(&host)[24..], key_end(&host).unwrap()[24..]);
        assert_eq!(key_end(&Item::Port(80)), None);
    }

    #[test]
    fn large_changes_are_split_into_messages_that_fit() {
        let entries: Vec<(Item, Option<Value>)> = (0..1200u32)
            .map(|i| (Item::Address(std::net::Ipv4Addr::from(0x0a00_0000 + i).into()), None))
            .collect();
        let change = SetChange { set: "vips-v4".into(), delete: false, entries };
        let messages: Vec<_> = change_messages(&change).collect();
        assert_eq!(messages.len(), 3);
        let counts: Vec<usize> = messages
            .iter()
            .map(|m| {
                let NfTablesMessage::NewSetElement(m) = m else { panic!("{m:?}") };
                m.attributes
                    .iter()
                    .map(|a| if let SetElementList::Elements(e) = a { e.len() } else { 0 })
                    .sum()
            })
            .collect();
        assert_eq!(counts, [512, 512, 176]);
    }
}
