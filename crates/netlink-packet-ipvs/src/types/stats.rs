//! Traffic counters, IPVS's timeouts and what `GET_INFO` reports.

use crate::message::{StatsAttribute, StatsCounter};

/// Traffic counters of a service or destination, and the estimator's rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stats {
    /// Connections scheduled.
    pub connections: u64,
    /// Incoming packets.
    pub in_packets: u64,
    /// Outgoing packets.
    pub out_packets: u64,
    /// Incoming bytes.
    pub in_bytes: u64,
    /// Outgoing bytes.
    pub out_bytes: u64,
    /// Connections per second.
    pub connection_rate: u64,
    /// Incoming packets per second.
    pub in_packet_rate: u64,
    /// Outgoing packets per second.
    pub out_packet_rate: u64,
    /// Incoming bytes per second.
    pub in_byte_rate: u64,
    /// Outgoing bytes per second.
    pub out_byte_rate: u64,
}

impl Stats {
    /// Reads a nested statistics block of either width.
    pub fn from_attributes(attrs: &[StatsAttribute]) -> Self {
        let mut stats = Self::default();
        for attr in attrs {
            let (counter, value) = match attr {
                StatsAttribute::U32(counter, value) => (*counter, u64::from(*value)),
                StatsAttribute::U64(counter, value) => (*counter, *value),
                StatsAttribute::Other(_) => continue,
            };
            let field = match counter {
                StatsCounter::Connections => &mut stats.connections,
                StatsCounter::InPackets => &mut stats.in_packets,
                StatsCounter::OutPackets => &mut stats.out_packets,
                StatsCounter::InBytes => &mut stats.in_bytes,
                StatsCounter::OutBytes => &mut stats.out_bytes,
                StatsCounter::ConnectionRate => &mut stats.connection_rate,
                StatsCounter::InPacketRate => &mut stats.in_packet_rate,
                StatsCounter::OutPacketRate => &mut stats.out_packet_rate,
                StatsCounter::InByteRate => &mut stats.in_byte_rate,
                StatsCounter::OutByteRate => &mut stats.out_byte_rate,
            };
            *field = value;
        }
        stats
    }
}

/// The connection timeouts of IPVS (`ipvsadm --set`), in seconds. In a request, 0 leaves a
/// value unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// TCP established.
    pub tcp: u32,
    /// TCP after a FIN.
    pub tcp_fin: u32,
    /// UDP.
    pub udp: u32,
}

/// What `GET_INFO` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Info {
    /// The IPVS version as the kernel encodes it: `0x010201` for 1.2.1.
    pub version: u32,
    /// Number of buckets of the connection hash table.
    pub connection_table_size: u32,
}

impl Info {
    /// The version as `major.minor.patch`, as `ipvsadm` prints it.
    pub fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
    }
}
