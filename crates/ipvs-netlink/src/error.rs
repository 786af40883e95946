//! The crate's error type.

use std::io;

use crate::request::Target;

/// An IPVS request failed. Every variant names the request it belongs to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service or destination to add exists already (`EEXIST`).
    #[error("{target}: already exists")]
    AlreadyExists {
        /// The failed request.
        target: Target,
    },
    /// The virtual service does not exist (`ESRCH`).
    #[error("{target}: no such virtual service")]
    NoSuchService {
        /// The failed request.
        target: Target,
    },
    /// The destination does not exist (`ENOENT` on a destination request).
    #[error("{target}: no such destination")]
    NoSuchDestination {
        /// The failed request.
        target: Target,
    },
    /// The kernel has no such scheduler or persistence engine, and could not load its module
    /// (`ENOENT` on a service request).
    #[error(
        "{target}: scheduler {scheduler:?} or persistence engine is not available in the kernel \
         (is the ip_vs_{scheduler} module installed?)"
    )]
    UnknownScheduler {
        /// The failed request.
        target: Target,
        /// The scheduler the request asked for.
        scheduler: String,
    },
    /// The kernel rejected the request's values (`EINVAL`, `ERANGE`, `EAFNOSUPPORT`), or the
    /// request could not be encoded (a name too long, for example).
    #[error("{target}: invalid argument: {reason}")]
    InvalidArgument {
        /// The failed request.
        target: Target,
        /// What the kernel or the encoder said.
        reason: String,
    },
    /// The caller lacks `CAP_NET_ADMIN` in the network namespace (`EPERM`).
    #[error("{target}: permission denied (CAP_NET_ADMIN is required)")]
    PermissionDenied {
        /// The failed request.
        target: Target,
    },
    /// The kernel has no IPVS family: the `ip_vs` module is not loaded or not built.
    #[error("{target}: IPVS is not available in this kernel (is the ip_vs module loaded?)")]
    IpvsUnavailable {
        /// The failed request.
        target: Target,
    },
    /// Talking to the kernel failed; the outcome of the request is unknown.
    #[error("{target}: netlink I/O failed: {source}")]
    Io {
        /// The failed request.
        target: Target,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The kernel's reply could not be decoded.
    #[error("{target}: malformed reply from the kernel: {reason}")]
    MalformedReply {
        /// The failed request.
        target: Target,
        /// What was wrong with it.
        reason: String,
    },
    /// A dump kept being interrupted by concurrent changes (`NLM_F_DUMP_INTR`); its partial
    /// result was discarded.
    #[error("{target}: dump interrupted by concurrent changes {attempts} times in a row")]
    DumpInterrupted {
        /// The failed request.
        target: Target,
        /// How many times it was tried.
        attempts: u32,
    },
    /// Another error from the kernel.
    #[error("{target}: kernel error: {source}")]
    Kernel {
        /// The failed request.
        target: Target,
        /// The errno as an I/O error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The kind of failure, as a stable name for metric labels: the variant's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::NoSuchService { .. } => "NoSuchService",
            Self::NoSuchDestination { .. } => "NoSuchDestination",
            Self::UnknownScheduler { .. } => "UnknownScheduler",
            Self::InvalidArgument { .. } => "InvalidArgument",
            Self::PermissionDenied { .. } => "PermissionDenied",
            Self::IpvsUnavailable { .. } => "IpvsUnavailable",
            Self::Io { .. } => "Io",
            Self::MalformedReply { .. } => "MalformedReply",
            Self::DumpInterrupted { .. } => "DumpInterrupted",
            Self::Kernel { .. } => "Kernel",
        }
    }

    /// The request that failed.
    pub fn target(&self) -> &Target {
        match self {
            Self::AlreadyExists { target }
            | Self::NoSuchService { target }
            | Self::NoSuchDestination { target }
            | Self::UnknownScheduler { target, .. }
            | Self::InvalidArgument { target, .. }
            | Self::PermissionDenied { target }
            | Self::IpvsUnavailable { target }
            | Self::Io { target, .. }
            | Self::MalformedReply { target, .. }
            | Self::DumpInterrupted { target, .. }
            | Self::Kernel { target, .. } => target,
        }
    }
}

/// A result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The same failure, reported for another request: when one failure (IPVS missing, the
    /// socket gone) stops a whole batch, each remaining change gets its own error.
    pub fn retarget(&self, target: Target) -> Error {
        let copy_io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Self::AlreadyExists { .. } => Self::AlreadyExists { target },
            Self::NoSuchService { .. } => Self::NoSuchService { target },
            Self::NoSuchDestination { .. } => Self::NoSuchDestination { target },
            Self::UnknownScheduler { scheduler, .. } => {
                Self::UnknownScheduler { target, scheduler: scheduler.clone() }
            }
            Self::InvalidArgument { reason, .. } => {
                Self::InvalidArgument { target, reason: reason.clone() }
            }
            Self::PermissionDenied { .. } => Self::PermissionDenied { target },
            Self::IpvsUnavailable { .. } => Self::IpvsUnavailable { target },
            Self::Io { source, .. } => Self::Io { target, source: copy_io(source) },
            Self::MalformedReply { reason, .. } => {
                Self::MalformedReply { target, reason: reason.clone() }
            }
            Self::DumpInterrupted { attempts, .. } => {
                Self::DumpInterrupted { target, attempts: *attempts }
            }
            Self::Kernel { source, .. } => Self::Kernel { target, source: copy_io(source) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Operation;

    #[test]
    fn kinds_are_the_variant_names() {
        let target = || Target::new(Operation::Flush);
        let io = || io::Error::from_raw_os_error(1);
        let all = [
            Error::AlreadyExists { target: target() },
            Error::PermissionDenied { target: target() },
            Error::Io { target: target(), source: io() },
            Error::DumpInterrupted { target: target(), attempts: 5 },
            Error::Kernel { target: target(), source: io() },
        ];
        for err in all {
            assert!(format!("{err:?}").starts_with(err.kind()), "{err:?} is not {}", err.kind());
        }
    }
}
