//! Requests: what to ask the kernel, how each becomes a message, and what each errno means for it.
//!
//! This is pure code, shared by the I/O handle and by tests. [`Change`] is the part of it that
//! can be batched.

use std::{fmt, io, net::SocketAddr};

use crate::{
    error::Error,
    message::{
        IpvsAttribute, IpvsCommand, IpvsMessage,
        constants::{IP_VS_PENAME_MAXLEN, IP_VS_SCHEDNAME_MAXLEN},
    },
    types::{Destination, ServiceKey, Timeouts, VirtualService},
};

/// A change to IPVS state: the operations a batch is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add a virtual service (`NEW_SERVICE`).
    AddService(VirtualService),
    /// Change a virtual service's scheduler, flags, timeout or netmask (`SET_SERVICE`).
    UpdateService(VirtualService),
    /// Delete a virtual service and its destinations (`DEL_SERVICE`).
    DeleteService(ServiceKey),
    /// Add a destination to a virtual service (`NEW_DEST`).
    AddDestination(ServiceKey, Destination),
    /// Change a destination's forwarding method, weight or thresholds (`SET_DEST`).
    UpdateDestination(ServiceKey, Destination),
    /// Delete a destination (`DEL_DEST`).
    DeleteDestination(ServiceKey, SocketAddr),
}

/// Any request this crate sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Change(Change),
    GetService(ServiceKey),
    ListServices,
    ListDestinations(ServiceKey),
    Flush,
    GetTimeouts,
    SetTimeouts(Timeouts),
    GetInfo,
    Zero(Option<ServiceKey>),
}

/// The kind of a request, for error messages and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `NEW_SERVICE`.
    AddService,
    /// `SET_SERVICE`.
    UpdateService,
    /// `DEL_SERVICE`.
    DeleteService,
    /// `GET_SERVICE` of one service.
    GetService,
    /// `GET_SERVICE` dump.
    ListServices,
    /// `NEW_DEST`.
    AddDestination,
    /// `SET_DEST`.
    UpdateDestination,
    /// `DEL_DEST`.
    DeleteDestination,
    /// `GET_DEST` dump.
    ListDestinations,
    /// `FLUSH`.
    Flush,
    /// `GET_CONFIG`.
    GetTimeouts,
    /// `SET_CONFIG`.
    SetTimeouts,
    /// `GET_INFO`.
    GetInfo,
    /// `ZERO`.
    Zero,
    /// Resolving the IPVS generic-netlink family.
    ResolveFamily,
}

impl Operation {
    /// The variant's name, such as `AddService`: the `kind` label of the message metrics.
    pub fn kind(self) -> &'static str {
        match self {
            Self::AddService => "AddService",
            Self::UpdateService => "UpdateService",
            Self::DeleteService => "DeleteService",
            Self::GetService => "GetService",
            Self::ListServices => "ListServices",
            Self::AddDestination => "AddDestination",
            Self::UpdateDestination => "UpdateDestination",
            Self::DeleteDestination => "DeleteDestination",
            Self::ListDestinations => "ListDestinations",
            Self::Flush => "Flush",
            Self::GetTimeouts => "GetTimeouts",
            Self::SetTimeouts => "SetTimeouts",
            Self::GetInfo => "GetInfo",
            Self::Zero => "Zero",
            Self::ResolveFamily => "ResolveFamily",
        }
    }

    /// A short name, such as `add_service`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AddService => "add_service",
            Self::UpdateService => "update_service",
            Self::DeleteService => "delete_service",
            Self::GetService => "get_service",
            Self::ListServices => "list_services",
            Self::AddDestination => "add_destination",
            Self::UpdateDestination => "update_destination",
            Self::DeleteDestination => "delete_destination",
            Self::ListDestinations => "list_destinations",
            Self::Flush => "flush",
            Self::GetTimeouts => "get_timeouts",
            Self::SetTimeouts => "set_timeouts",
            Self::GetInfo => "get_info",
            Self::Zero => "zero",
            Self::ResolveFamily => "resolve_family",
        }
    }
}

/// Which request failed: its kind and the service and destination it was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// The kind of request.
    pub operation: Operation,
    /// The virtual service it was about, if any.
    pub service: Option<ServiceKey>,
    /// The destination it was about, if any.
    pub destination: Option<SocketAddr>,
}

impl Target {
    pub(crate) fn new(operation: Operation) -> Self {
        Self { operation, service: None, destination: None }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = self.operation.name().replace('_', " ");
        match (self.service, self.destination) {
            (Some(service), Some(destination)) => {
                write!(f, "{verb} {destination} of virtual service {service}")
            }
            (Some(service), None) => write!(f, "{verb} {service}"),
            (None, _) => f.write_str(&verb),
        }
    }
}

impl Change {
    /// What this change is about, for errors and logs.
    pub fn target(&self) -> Target {
        let (operation, service, destination) = match self {
            Self::AddService(s) => (Operation::AddService, s.key, None),
            Self::UpdateService(s) => (Operation::UpdateService, s.key, None),
            Self::DeleteService(k) => (Operation::DeleteService, *k, None),
            Self::AddDestination(k, d) => (Operation::AddDestination, *k, Some(d.address)),
            Self::UpdateDestination(k, d) => (Operation::UpdateDestination, *k, Some(d.address)),
            Self::DeleteDestination(k, a) => (Operation::DeleteDestination, *k, Some(*a)),
        };
        Target { operation, service: Some(service), destination }
    }

    fn message(&self) -> IpvsMessage {
        match self {
            Self::AddService(s) => IpvsMessage::new_service(s),
            Self::UpdateService(s) => IpvsMessage::set_service(s),
            Self::DeleteService(k) => IpvsMessage::del_service(k),
            Self::AddDestination(k, d) => IpvsMessage::new_dest(k, d),
            Self::UpdateDestination(k, d) => IpvsMessage::set_dest(k, d),
            Self::DeleteDestination(k, a) => IpvsMessage::del_dest(k, *a),
        }
    }

    /// Checks what the kernel would reject without saying why.
    fn validate(&self) -> Result<(), String> {
        if let Self::AddService(s) | Self::UpdateService(s) = self {
            if s.scheduler.is_empty() || s.scheduler.len() >= IP_VS_SCHEDNAME_MAXLEN {
                return Err(format!(
                    "scheduler name {:?} must have 1 to {} bytes",
                    s.scheduler,
                    IP_VS_SCHEDNAME_MAXLEN - 1
                ));
            }
            if let Some(pe) =
                s.persistence_engine.as_ref().filter(|pe| pe.len() >= IP_VS_PENAME_MAXLEN)
            {
                return Err(format!(
                    "persistence engine name {pe:?} must have at most {} bytes",
                    IP_VS_PENAME_MAXLEN - 1
                ));
            }
        }
        Ok(())
    }
}

impl Request {
    pub(crate) fn target(&self) -> Target {
        let with_service = |operation, service: &ServiceKey| Target {
            operation,
            service: Some(*service),
            destination: None,
        };
        match self {
            Self::Change(change) => change.target(),
            Self::GetService(k) => with_service(Operation::GetService, k),
            Self::ListDestinations(k) => with_service(Operation::ListDestinations, k),
            Self::Zero(Some(k)) => with_service(Operation::Zero, k),
            Self::Zero(None) => Target::new(Operation::Zero),
            Self::ListServices => Target::new(Operation::ListServices),
            Self::Flush => Target::new(Operation::Flush),
            Self::GetTimeouts => Target::new(Operation::GetTimeouts),
            Self::SetTimeouts(_) => Target::new(Operation::SetTimeouts),
            Self::GetInfo => Target::new(Operation::GetInfo),
        }
    }

    /// Whether the request is a dump (`NLM_F_DUMP`).
    pub(crate) fn is_dump(&self) -> bool {
        matches!(self, Self::ListServices | Self::ListDestinations(_))
    }

    /// The message for this request, or why it cannot be sent.
    pub(crate) fn message(&self) -> Result<IpvsMessage, Error> {
        let key = |k: &ServiceKey| IpvsAttribute::Service(k.to_attributes());
        Ok(match self {
            Self::Change(change) => {
                change
                    .validate()
                    .map_err(|reason| Error::InvalidArgument { target: self.target(), reason })?;
                change.message()
            }
            Self::GetService(k) => IpvsMessage::new(IpvsCommand::GetService, vec![key(k)]),
            // moby/ipvs and ipvsadm send an empty SERVICE nest with the dump; the kernel does
            // not need it.
            Self::ListServices => IpvsMessage::new(IpvsCommand::GetService, vec![]),
            Self::ListDestinations(k) => IpvsMessage::new(IpvsCommand::GetDest, vec![key(k)]),
            Self::Flush => IpvsMessage::new(IpvsCommand::Flush, vec![]),
            Self::GetTimeouts => IpvsMessage::new(IpvsCommand::GetConfig, vec![]),
            Self::SetTimeouts(t) => IpvsMessage::new(
                IpvsCommand::SetConfig,
                vec![
                    IpvsAttribute::TimeoutTcp(t.tcp),
                    IpvsAttribute::TimeoutTcpFin(t.tcp_fin),
                    IpvsAttribute::TimeoutUdp(t.udp),
                ],
            ),
            Self::GetInfo => IpvsMessage::new(IpvsCommand::GetInfo, vec![]),
            Self::Zero(Some(k)) => IpvsMessage::new(IpvsCommand::Zero, vec![key(k)]),
            Self::Zero(None) => IpvsMessage::new(IpvsCommand::Zero, vec![]),
        })
    }

    /// What a (positive) errno from the kernel means for this request.
    pub(crate) fn error_for(&self, errno: i32) -> Error {
        const EPERM: i32 = 1;
        const ENOENT: i32 = 2;
        const ESRCH: i32 = 3;
        const EACCES: i32 = 13;
        const EEXIST: i32 = 17;
        const EINVAL: i32 = 22;
        const ERANGE: i32 = 34;
        const EAFNOSUPPORT: i32 = 97;
        let target = self.target();
        match (errno, self) {
            (EEXIST, _) => Error::AlreadyExists { target },
            (ESRCH, _) => Error::NoSuchService { target },
            (
                ENOENT,
                Self::Change(Change::AddService(service) | Change::UpdateService(service)),
            ) => Error::UnknownScheduler { target, scheduler: service.scheduler.clone() },
            (
                ENOENT,
                Self::Change(Change::UpdateDestination(..) | Change::DeleteDestination(..)),
            ) => Error::NoSuchDestination { target },
            (EINVAL | ERANGE | EAFNOSUPPORT, _) => Error::InvalidArgument {
                target,
                reason: io::Error::from_raw_os_error(errno).to_string(),
            },
            (EPERM | EACCES, _) => Error::PermissionDenied { target },
            _ => Error::Kernel { target, source: io::Error::from_raw_os_error(errno) },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    #[test]
    fn operation_kinds_are_the_variant_names() {
        use Operation::*;
        let all = [
            AddService,
            UpdateService,
            DeleteService,
            GetService,
            ListServices,
            AddDestination,
            UpdateDestination,
            DeleteDestination,
            ListDestinations,
            Flush,
            GetTimeouts,
            SetTimeouts,
            GetInfo,
            Zero,
            ResolveFamily,
        ];
        for operation in all {
            assert_eq!(format!("{operation:?}"), operation.kind());
        }
    }

    use super::*;

    fn key() -> ServiceKey {
        ServiceKey::tcp("10.96.0.10:53".parse().unwrap())
    }

    #[test]
    fn errno_mapping_depends_on_the_request() {
        let dest: SocketAddr = "10.244.1.5:53".parse().unwrap();
        let add = Request::Change(Change::AddService(VirtualService::new(key(), "nope")));
        let del_dest = Request::Change(Change::DeleteDestination(key(), dest));
        let add_dest = Request::Change(Change::AddDestination(key(), Destination::new(dest)));

        assert!(
            matches!(add.error_for(2), Error::UnknownScheduler { scheduler, .. } if scheduler == "nope")
        );
        assert!(matches!(del_dest.error_for(2), Error::NoSuchDestination { .. }));
        assert!(matches!(add_dest.error_for(3), Error::NoSuchService { .. }));
        assert!(matches!(add_dest.error_for(17), Error::AlreadyExists { .. }));
        assert!(matches!(add_dest.error_for(34), Error::InvalidArgument { .. }));
        assert!(matches!(add_dest.error_for(1), Error::PermissionDenied { .. }));
        assert!(matches!(add_dest.error_for(16), Error::Kernel { .. }));
    }

    #[test]
    fn errors_name_the_request() {
        let dest: SocketAddr = "10.244.1.5:53".parse().unwrap();
        let request = Request::Change(Change::AddDestination(key(), Destination::new(dest)));
        assert_eq!(
            request.error_for(3).to_string(),
            "add destination 10.244.1.5:53 of virtual service TCP 10.96.0.10:53: \
             no such virtual service"
        );
        assert_eq!(
            Request::ListServices.error_for(1).to_string(),
            "list services: permission denied (CAP_NET_ADMIN is required)"
        );
    }

    #[test]
    fn overlong_scheduler_is_refused_before_sending() {
        let request = Request::Change(Change::AddService(VirtualService::new(
            key(),
            "a-very-long-scheduler",
        )));
        let err = request.message().unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(err.to_string().contains("must have 1 to 15 bytes"), "{err}");
    }
}
