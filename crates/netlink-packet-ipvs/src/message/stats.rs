//! Nested statistics attributes (`IPVS_SVC_ATTR_STATS{,64}`, `IPVS_DEST_ATTR_STATS{,64}`).

use netlink_packet_core::{
    DecodeError, DefaultNla, Nla, NlaBuffer, Parseable, emit_u32, emit_u64, parse_u32, parse_u64,
};

use super::constants::stats_attr;

/// Which counter a statistics attribute carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatsCounter {
    /// Connections scheduled.
    Connections,
    /// Incoming packets.
    InPackets,
    /// Outgoing packets.
    OutPackets,
    /// Incoming bytes.
    InBytes,
    /// Outgoing bytes.
    OutBytes,
    /// Connections per second (rate estimator).
    ConnectionRate,
    /// Incoming packets per second (rate estimator).
    InPacketRate,
    /// Outgoing packets per second (rate estimator).
    OutPacketRate,
    /// Incoming bytes per second (rate estimator).
    InByteRate,
    /// Outgoing bytes per second (rate estimator).
    OutByteRate,
}

impl StatsCounter {
    fn from_kind(kind: u16) -> Option<Self> {
        Some(match kind {
            stats_attr::CONNS => Self::Connections,
            stats_attr::INPKTS => Self::InPackets,
            stats_attr::OUTPKTS => Self::OutPackets,
            stats_attr::INBYTES => Self::InBytes,
            stats_attr::OUTBYTES => Self::OutBytes,
            stats_attr::CPS => Self::ConnectionRate,
            stats_attr::INPPS => Self::InPacketRate,
            stats_attr::OUTPPS => Self::OutPacketRate,
            stats_attr::INBPS => Self::InByteRate,
            stats_attr::OUTBPS => Self::OutByteRate,
            _ => return None,
        })
    }

    fn kind(self) -> u16 {
        match self {
            Self::Connections => stats_attr::CONNS,
            Self::InPackets => stats_attr::INPKTS,
            Self::OutPackets => stats_attr::OUTPKTS,
            Self::InBytes => stats_attr::INBYTES,
            Self::OutBytes => stats_attr::OUTBYTES,
            Self::ConnectionRate => stats_attr::CPS,
            Self::InPacketRate => stats_attr::INPPS,
            Self::OutPacketRate => stats_attr::OUTPPS,
            Self::InByteRate => stats_attr::INBPS,
            Self::OutByteRate => stats_attr::OUTBPS,
        }
    }
}

/// One attribute of a nested statistics block.
///
/// The 32-bit block carries most counters as u32 and the byte counters as u64; the 64-bit
/// block carries every counter as u64. The width is kept so a parsed block re-emits
/// byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsAttribute {
    /// A counter carried as a u32.
    U32(StatsCounter, u32),
    /// A counter carried as a u64.
    U64(StatsCounter, u64),
    /// Padding or an attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for StatsAttribute {
    fn value_len(&self) -> usize {
        match self {
            Self::U32(..) => 4,
            Self::U64(..) => 8,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::U32(counter, _) | Self::U64(counter, _) => counter.kind(),
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // The buffer is exactly `value_len()` long, so these cannot fail.
        let _ = match self {
            Self::U32(_, value) => emit_u32(buffer, *value),
            Self::U64(_, value) => emit_u64(buffer, *value),
            Self::Other(nla) => {
                nla.emit_value(buffer);
                Ok(())
            }
        };
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for StatsAttribute {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match (StatsCounter::from_kind(buf.kind()), value.len()) {
            (Some(counter), 4) => Self::U32(counter, parse_u32(value)?),
            (Some(counter), 8) => Self::U64(counter, parse_u64(value)?),
            (Some(counter), len) => {
                return Err(DecodeError::from(format!(
                    "statistics counter {counter:?} has {len} bytes, expected 4 or 8"
                )));
            }
            (None, _) => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}
