//! Service attributes (`IPVS_SVC_ATTR_*`), nested under `IPVS_CMD_ATTR_SERVICE`.

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, Nla, NlaBuffer, Parseable, emit_u16,
    emit_u16_be, emit_u32, parse_string, parse_u16, parse_u16_be, parse_u32,
};

use super::{constants::svc_attr, parse_nested, stats::StatsAttribute};

/// One attribute of a virtual service, as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceAttribute {
    /// Address family (`AF_INET` or `AF_INET6`).
    AddressFamily(u16),
    /// IP protocol number.
    Protocol(u16),
    /// Virtual address: the kernel answers with 16 bytes, IPv4 in the first four.
    Address(Vec<u8>),
    /// Virtual port (host order here, big-endian on the wire).
    Port(u16),
    /// Firewall mark, for firewall-mark services.
    Fwmark(u32),
    /// Scheduler name.
    Scheduler(String),
    /// Service flags and the mask of the flags to change.
    Flags {
        /// Flag values.
        flags: u32,
        /// Which flags to change; the kernel answers with all bits set.
        mask: u32,
    },
    /// Persistence timeout, seconds.
    Timeout(u32),
    /// Persistence netmask as the kernel reads it with `nla_get_u32`.
    Netmask(u32),
    /// 32-bit statistics.
    Stats(Vec<StatsAttribute>),
    /// Persistence engine name.
    PersistenceEngine(String),
    /// 64-bit statistics.
    Stats64(Vec<StatsAttribute>),
    /// An attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for ServiceAttribute {
    fn value_len(&self) -> usize {
        match self {
            Self::AddressFamily(_) | Self::Protocol(_) | Self::Port(_) => 2,
            Self::Address(bytes) => bytes.len(),
            Self::Fwmark(_) | Self::Timeout(_) | Self::Netmask(_) => 4,
            Self::Scheduler(name) | Self::PersistenceEngine(name) => name.len() + 1,
            Self::Flags { .. } => 8,
            Self::Stats(attrs) | Self::Stats64(attrs) => attrs.as_slice().buffer_len(),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::AddressFamily(_) => svc_attr::AF,
            Self::Protocol(_) => svc_attr::PROTOCOL,
            Self::Address(_) => svc_attr::ADDR,
            Self::Port(_) => svc_attr::PORT,
            Self::Fwmark(_) => svc_attr::FWMARK,
            Self::Scheduler(_) => svc_attr::SCHED_NAME,
            Self::Flags { .. } => svc_attr::FLAGS,
            Self::Timeout(_) => svc_attr::TIMEOUT,
            Self::Netmask(_) => svc_attr::NETMASK,
            Self::Stats(_) => svc_attr::STATS,
            Self::PersistenceEngine(_) => svc_attr::PE_NAME,
            Self::Stats64(_) => svc_attr::STATS64,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // The buffer is exactly `value_len()` long, so the emit helpers cannot fail.
        let _ = match self {
            Self::AddressFamily(v) | Self::Protocol(v) => emit_u16(buffer, *v),
            Self::Port(v) => emit_u16_be(buffer, *v),
            Self::Address(bytes) => {
                buffer.copy_from_slice(bytes);
                Ok(())
            }
            Self::Fwmark(v) | Self::Timeout(v) | Self::Netmask(v) => emit_u32(buffer, *v),
            Self::Scheduler(name) | Self::PersistenceEngine(name) => {
                emit_c_string(buffer, name);
                Ok(())
            }
            Self::Flags { flags, mask } => {
                emit_u32(&mut buffer[..4], *flags).and_then(|()| emit_u32(&mut buffer[4..], *mask))
            }
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

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceAttribute {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            svc_attr::AF => Self::AddressFamily(parse_u16(value).context("service AF")?),
            svc_attr::PROTOCOL => Self::Protocol(parse_u16(value).context("service protocol")?),
            svc_attr::ADDR => Self::Address(parse_address(value).context("service address")?),
            svc_attr::PORT => Self::Port(parse_u16_be(value).context("service port")?),
            svc_attr::FWMARK => Self::Fwmark(parse_u32(value).context("service fwmark")?),
            svc_attr::SCHED_NAME => {
                Self::Scheduler(parse_string(value).context("service scheduler")?)
            }
            svc_attr::FLAGS => {
                if value.len() != 8 {
                    return Err(DecodeError::invalid_number(8, value.len()))
                        .context("service flags");
                }
                Self::Flags { flags: parse_u32(&value[..4])?, mask: parse_u32(&value[4..])? }
            }
            svc_attr::TIMEOUT => Self::Timeout(parse_u32(value).context("service timeout")?),
            svc_attr::NETMASK => Self::Netmask(parse_u32(value).context("service netmask")?),
            svc_attr::STATS => Self::Stats(parse_nested(value).context("service stats")?),
            svc_attr::PE_NAME => {
                Self::PersistenceEngine(parse_string(value).context("service pe name")?)
            }
            svc_attr::STATS64 => Self::Stats64(parse_nested(value).context("service stats64")?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// Emits `name` followed by a NUL into a buffer of `name.len() + 1` bytes.
pub(super) fn emit_c_string(buffer: &mut [u8], name: &str) {
    buffer[..name.len()].copy_from_slice(name.as_bytes());
    buffer[name.len()] = 0;
}

/// Accepts an address attribute of 4 or 16 bytes (`union nf_inet_addr`).
pub(super) fn parse_address(value: &[u8]) -> Result<Vec<u8>, DecodeError> {
    match value.len() {
        4 | 16 => Ok(value.to_vec()),
        len => Err(DecodeError::invalid_ip_address(len)),
    }
}
