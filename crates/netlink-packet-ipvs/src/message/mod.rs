//! The IPVS generic-netlink messages: pure types and codecs, no I/O.
//!
//! [`IpvsMessage`] is the payload of a `GenlMessage<IpvsMessage>`. Its attributes follow the
//! kernel's attribute spaces one to one ([`IpvsAttribute`], [`ServiceAttribute`],
//! [`DestinationAttribute`], [`StatsAttribute`]); attributes this crate does not know are kept
//! as `Other` so that a message from a newer kernel parses and re-emits unchanged.
//!
//! The typed model in [`crate::types`] converts to and from these attributes.

pub mod constants;
mod destination;
mod service;
mod stats;
#[cfg(test)]
mod tests;

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized, emit_u32, parse_u32,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use self::constants::{IPVS_GENL_NAME, IPVS_GENL_VERSION, cmd_attr, info_attr};
pub use self::{
    destination::DestinationAttribute,
    service::ServiceAttribute,
    stats::{StatsAttribute, StatsCounter},
};

/// An IPVS generic-netlink command (`IPVS_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpvsCommand {
    /// Add a virtual service; also the command of every `GET_SERVICE` reply.
    NewService,
    /// Change a virtual service.
    SetService,
    /// Delete a virtual service.
    DelService,
    /// Get one virtual service, or dump all of them.
    GetService,
    /// Add a destination; also the command of every `GET_DEST` reply.
    NewDest,
    /// Change a destination.
    SetDest,
    /// Delete a destination.
    DelDest,
    /// Dump the destinations of one virtual service.
    GetDest,
    /// Start a connection sync daemon.
    NewDaemon,
    /// Stop a connection sync daemon.
    DelDaemon,
    /// Dump the connection sync daemons.
    GetDaemon,
    /// Set the protocol timeouts; also the command of the `GET_CONFIG` reply.
    SetConfig,
    /// Get the protocol timeouts.
    GetConfig,
    /// The command of the `GET_INFO` reply.
    SetInfo,
    /// Get the IPVS version and the connection table size.
    GetInfo,
    /// Zero the counters of one virtual service, or of all.
    Zero,
    /// Delete every virtual service and destination.
    Flush,
    /// A command number this crate does not know.
    Other(u8),
}

impl From<IpvsCommand> for u8 {
    fn from(command: IpvsCommand) -> u8 {
        use IpvsCommand::*;
        match command {
            NewService => 1,
            SetService => 2,
            DelService => 3,
            GetService => 4,
            NewDest => 5,
            SetDest => 6,
            DelDest => 7,
            GetDest => 8,
            NewDaemon => 9,
            DelDaemon => 10,
            GetDaemon => 11,
            SetConfig => 12,
            GetConfig => 13,
            SetInfo => 14,
            GetInfo => 15,
            Zero => 16,
            Flush => 17,
            Other(value) => value,
        }
    }
}

impl From<u8> for IpvsCommand {
    fn from(value: u8) -> Self {
        use IpvsCommand::*;
        match value {
            1 => NewService,
            2 => SetService,
            3 => DelService,
            4 => GetService,
            5 => NewDest,
            6 => SetDest,
            7 => DelDest,
            8 => GetDest,
            9 => NewDaemon,
            10 => DelDaemon,
            11 => GetDaemon,
            12 => SetConfig,
            13 => GetConfig,
            14 => SetInfo,
            15 => GetInfo,
            16 => Zero,
            17 => Flush,
            other => Other(other),
        }
    }
}

impl IpvsCommand {
    /// The `GET_INFO` request and its reply reuse attribute numbers 1 and 2 for the info
    /// attributes, which every other command uses for `SERVICE` and `DEST`.
    fn carries_info(self) -> bool {
        matches!(self, Self::GetInfo | Self::SetInfo)
    }
}

/// A top-level IPVS attribute (`IPVS_CMD_ATTR_*`, or `IPVS_INFO_ATTR_*` for the info reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsAttribute {
    /// A virtual service.
    Service(Vec<ServiceAttribute>),
    /// A destination.
    Destination(Vec<DestinationAttribute>),
    /// TCP established timeout, seconds.
    TimeoutTcp(u32),
    /// TCP FIN_WAIT timeout, seconds.
    TimeoutTcpFin(u32),
    /// UDP timeout, seconds.
    TimeoutUdp(u32),
    /// IPVS version (`GET_INFO` reply).
    InfoVersion(u32),
    /// Connection table size (`GET_INFO` reply).
    InfoConnectionTableSize(u32),
    /// An attribute this crate does not know (including sync daemon attributes).
    Other(DefaultNla),
}

impl Nla for IpvsAttribute {
    fn value_len(&self) -> usize {
        match self {
            Self::Service(attrs) => attrs.as_slice().buffer_len(),
            Self::Destination(attrs) => attrs.as_slice().buffer_len(),
            Self::TimeoutTcp(_)
            | Self::TimeoutTcpFin(_)
            | Self::TimeoutUdp(_)
            | Self::InfoVersion(_)
            | Self::InfoConnectionTableSize(_) => 4,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        // The kernel neither requires nor sends NLA_F_NESTED on IPVS nests; neither does
        // ipvsadm, so requests carry none either.
        match self {
            Self::Service(_) => cmd_attr::SERVICE,
            Self::Destination(_) => cmd_attr::DEST,
            Self::TimeoutTcp(_) => cmd_attr::TIMEOUT_TCP,
            Self::TimeoutTcpFin(_) => cmd_attr::TIMEOUT_TCP_FIN,
            Self::TimeoutUdp(_) => cmd_attr::TIMEOUT_UDP,
            Self::InfoVersion(_) => info_attr::VERSION,
            Self::InfoConnectionTableSize(_) => info_attr::CONN_TAB_SIZE,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Service(attrs) => attrs.as_slice().emit(buffer),
            Self::Destination(attrs) => attrs.as_slice().emit(buffer),
            Self::TimeoutTcp(v)
            | Self::TimeoutTcpFin(v)
            | Self::TimeoutUdp(v)
            | Self::InfoVersion(v)
            | Self::InfoConnectionTableSize(v) => {
                // The buffer is exactly 4 bytes long.
                let _ = emit_u32(buffer, *v);
            }
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> ParseableParametrized<NlaBuffer<&'a T>, IpvsCommand>
    for IpvsAttribute
{
    fn parse_with_param(buf: &NlaBuffer<&'a T>, command: IpvsCommand) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match (command.carries_info(), buf.kind()) {
            (true, info_attr::VERSION) => {
                Self::InfoVersion(parse_u32(value).context("info version")?)
            }
            (true, info_attr::CONN_TAB_SIZE) => {
                Self::InfoConnectionTableSize(parse_u32(value).context("info table size")?)
            }
            (false, cmd_attr::SERVICE) => Self::Service(parse_nested(value).context("service")?),
            (false, cmd_attr::DEST) => {
                Self::Destination(parse_nested(value).context("destination")?)
            }
            (false, cmd_attr::TIMEOUT_TCP) => {
                Self::TimeoutTcp(parse_u32(value).context("tcp timeout")?)
            }
            (false, cmd_attr::TIMEOUT_TCP_FIN) => {
                Self::TimeoutTcpFin(parse_u32(value).context("tcp fin timeout")?)
            }
            (false, cmd_attr::TIMEOUT_UDP) => {
                Self::TimeoutUdp(parse_u32(value).context("udp timeout")?)
            }
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// The payload of one IPVS generic-netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    /// The command, carried in the generic-netlink header.
    pub command: IpvsCommand,
    /// The top-level attributes.
    pub attributes: Vec<IpvsAttribute>,
}

impl IpvsMessage {
    /// A message with the given command and attributes.
    pub fn new(command: IpvsCommand, attributes: Vec<IpvsAttribute>) -> Self {
        Self { command, attributes }
    }
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.command.into()
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attributes.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attributes.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buffer: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let command = IpvsCommand::from(header.cmd);
        let attributes = NlasIterator::new(buffer)
            .map(|nla| IpvsAttribute::parse_with_param(&nla?, command))
            .collect::<Result<_, _>>()
            .context("IPVS message")?;
        Ok(Self { command, attributes })
    }
}

/// Parses every attribute of a nested block.
fn parse_nested<A>(value: &[u8]) -> Result<Vec<A>, DecodeError>
where
    A: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    NlasIterator::new(value).map(|nla| A::parse(&nla?)).collect()
}
