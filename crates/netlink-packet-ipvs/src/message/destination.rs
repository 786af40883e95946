//! Destination (real server) attributes (`IPVS_DEST_ATTR_*`), nested under `IPVS_CMD_ATTR_DEST`.

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, Nla, NlaBuffer, Parseable, emit_u16,
    emit_u16_be, emit_u32, parse_u8, parse_u16, parse_u16_be, parse_u32,
};

use super::{constants::dest_attr, parse_nested, service::parse_address, stats::StatsAttribute};

/// One attribute of a destination, as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationAttribute {
    /// Real server address: the kernel answers with 16 bytes, IPv4 in the first four.
    Address(Vec<u8>),
    /// Real server port (host order here, big-endian on the wire).
    Port(u16),
    /// Forwarding method (`IP_VS_CONN_F_*` masked with `IP_VS_CONN_F_FWD_MASK`).
    ForwardMethod(u32),
    /// Weight.
    Weight(u32),
    /// Upper connection threshold (0: none).
    UpperThreshold(u32),
    /// Lower connection threshold (0: none).
    LowerThreshold(u32),
    /// Active connections.
    ActiveConnections(u32),
    /// Inactive connections.
    InactiveConnections(u32),
    /// Persistent connection templates.
    PersistentConnections(u32),
    /// 32-bit statistics.
    Stats(Vec<StatsAttribute>),
    /// Address family of the destination.
    AddressFamily(u16),
    /// 64-bit statistics.
    Stats64(Vec<StatsAttribute>),
    /// Tunnel type (IPIP 0, GUE 1, GRE 2).
    TunnelType(u8),
    /// Tunnel port (host order here, big-endian on the wire).
    TunnelPort(u16),
    /// Tunnel flags (no checksum 0, checksum 1, remote checksum 2).
    TunnelFlags(u16),
    /// An attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for DestinationAttribute {
    fn value_len(&self) -> usize {
        match self {
            Self::Address(bytes) => bytes.len(),
            Self::Port(_) | Self::AddressFamily(_) | Self::TunnelPort(_) | Self::TunnelFlags(_) => {
                2
            }
            Self::TunnelType(_) => 1,
            Self::ForwardMethod(_)
            | Self::Weight(_)
            | Self::UpperThreshold(_)
            | Self::LowerThreshold(_)
            | Self::ActiveConnections(_)
            | Self::InactiveConnections(_)
            | Self::PersistentConnections(_) => 4,
            Self::Stats(attrs) | Self::Stats64(attrs) => attrs.as_slice().buffer_len(),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Address(_) => dest_attr::ADDR,
            Self::Port(_) => dest_attr::PORT,
            Self::ForwardMethod(_) => dest_attr::FWD_METHOD,
            Self::Weight(_) => dest_attr::WEIGHT,
            Self::UpperThreshold(_) => dest_attr::U_THRESH,
            Self::LowerThreshold(_) => dest_attr::L_THRESH,
            Self::ActiveConnections(_) => dest_attr::ACTIVE_CONNS,
            Self::InactiveConnections(_) => dest_attr::INACT_CONNS,
            Self::PersistentConnections(_) => dest_attr::PERSIST_CONNS,
            Self::Stats(_) => dest_attr::STATS,
            Self::AddressFamily(_) => dest_attr::ADDR_FAMILY,
            Self::Stats64(_) => dest_attr::STATS64,
            Self::TunnelType(_) => dest_attr::TUN_TYPE,
            Self::TunnelPort(_) => dest_attr::TUN_PORT,
            Self::TunnelFlags(_) => dest_attr::TUN_FLAGS,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // The buffer is exactly `value_len()` long, so the emit helpers cannot fail.
        let _ = match self {
            Self::Address(bytes) => {
                buffer.copy_from_slice(bytes);
                Ok(())
            }
            Self::Port(v) | Self::TunnelPort(v) => emit_u16_be(buffer, *v),
            Self::AddressFamily(v) | Self::TunnelFlags(v) => emit_u16(buffer, *v),
            Self::TunnelType(v) => {
                buffer[0] = *v;
                Ok(())
            }
            Self::ForwardMethod(v)
            | Self::Weight(v)
            | Self::UpperThreshold(v)
            | Self::LowerThreshold(v)
            | Self::ActiveConnections(v)
            | Self::InactiveConnections(v)
            | Self::PersistentConnections(v) => emit_u32(buffer, *v),
            Self::Stats(attrs) | Self::Stats64(attrs) => {
                attrs.as_slice().emit(buffer);
                Ok(())
            }
            Self::Other(nla) => {
                nla.emit_value(buffer);
                Ok(())
            }
        };
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestinationAttribute {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            dest_attr::ADDR => Self::Address(parse_address(v).context("destination address")?),
            dest_attr::PORT => Self::Port(parse_u16_be(v).context("destination port")?),
            dest_attr::FWD_METHOD => Self::ForwardMethod(parse_u32(v).context("forward method")?),
            dest_attr::WEIGHT => Self::Weight(parse_u32(v).context("weight")?),
            dest_attr::U_THRESH => Self::UpperThreshold(parse_u32(v).context("upper threshold")?),
            dest_attr::L_THRESH => Self::LowerThreshold(parse_u32(v).context("lower threshold")?),
            dest_attr::ACTIVE_CONNS => {
                Self::ActiveConnections(parse_u32(v).context("active connections")?)
            }
            dest_attr::INACT_CONNS => {
                Self::InactiveConnections(parse_u32(v).context("inactive connections")?)
            }
            dest_attr::PERSIST_CONNS => {
                Self::PersistentConnections(parse_u32(v).context("persistent connections")?)
            }
            dest_attr::STATS => Self::Stats(parse_nested(v).context("destination stats")?),
            dest_attr::ADDR_FAMILY => {
                Self::AddressFamily(parse_u16(v).context("destination address family")?)
            }
            dest_attr::STATS64 => Self::Stats64(parse_nested(v).context("destination stats64")?),
            dest_attr::TUN_TYPE => Self::TunnelType(parse_u8(v).context("tunnel type")?),
            dest_attr::TUN_PORT => Self::TunnelPort(parse_u16_be(v).context("tunnel port")?),
            dest_attr::TUN_FLAGS => Self::TunnelFlags(parse_u16(v).context("tunnel flags")?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}
