//! The one error type of the Corosync wrappers: which call failed and how (Corosync's `cs_error_t`, a
//! deadline, a lost connection).

use std::fmt;
use std::time::Duration;

use corosync_sys as sys;

/// A `cs_error_t` other than `CS_OK`, with its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsError(pub u32);

impl CsError {
    /// `CS_ERR_TRY_AGAIN`: Corosync is busy (syncing, flow control); the call may succeed later.
    pub const TRY_AGAIN: CsError = CsError(sys::CS_ERR_TRY_AGAIN);
    /// `CS_ERR_LIBRARY`: the IPC connection failed or is gone (Corosync not running, or died).
    pub const LIBRARY: CsError = CsError(sys::CS_ERR_LIBRARY);
    /// `CS_ERR_BAD_HANDLE`: the handle was finalized (or Corosync dropped the connection).
    pub const BAD_HANDLE: CsError = CsError(sys::CS_ERR_BAD_HANDLE);
    /// `CS_ERR_NOT_EXIST`: no such key, group or node.
    pub const NOT_EXIST: CsError = CsError(sys::CS_ERR_NOT_EXIST);
    /// `CS_ERR_ACCESS`: the caller may not use this service (not root, no `uidgid.d` entry).
    pub const ACCESS: CsError = CsError(sys::CS_ERR_ACCESS);
    /// `CS_ERR_NO_SECTIONS`: the end of a cmap iteration.
    pub const NO_SECTIONS: CsError = CsError(sys::CS_ERR_NO_SECTIONS);

    /// The `cs_error_t` constant's name, as in `corotypes.h`.
    pub fn name(self) -> &'static str {
        match self.0 {
            sys::CS_OK => "CS_OK",
            sys::CS_ERR_LIBRARY => "CS_ERR_LIBRARY",
            sys::CS_ERR_VERSION => "CS_ERR_VERSION",
            sys::CS_ERR_INIT => "CS_ERR_INIT",
            sys::CS_ERR_TIMEOUT => "CS_ERR_TIMEOUT",
            sys::CS_ERR_TRY_AGAIN => "CS_ERR_TRY_AGAIN",
            sys::CS_ERR_INVALID_PARAM => "CS_ERR_INVALID_PARAM",
            sys::CS_ERR_NO_MEMORY => "CS_ERR_NO_MEMORY",
            sys::CS_ERR_BAD_HANDLE => "CS_ERR_BAD_HANDLE",
            sys::CS_ERR_BUSY => "CS_ERR_BUSY",
            sys::CS_ERR_ACCESS => "CS_ERR_ACCESS",
            sys::CS_ERR_NOT_EXIST => "CS_ERR_NOT_EXIST",
            sys::CS_ERR_NAME_TOO_LONG => "CS_ERR_NAME_TOO_LONG",
            sys::CS_ERR_EXIST => "CS_ERR_EXIST",
            sys::CS_ERR_NO_SPACE => "CS_ERR_NO_SPACE",
            sys::CS_ERR_INTERRUPT => "CS_ERR_INTERRUPT",
            sys::CS_ERR_NAME_NOT_FOUND => "CS_ERR_NAME_NOT_FOUND",
            sys::CS_ERR_NO_RESOURCES => "CS_ERR_NO_RESOURCES",
            sys::CS_ERR_NOT_SUPPORTED => "CS_ERR_NOT_SUPPORTED",
            sys::CS_ERR_BAD_OPERATION => "CS_ERR_BAD_OPERATION",
            sys::CS_ERR_FAILED_OPERATION => "CS_ERR_FAILED_OPERATION",
            sys::CS_ERR_MESSAGE_ERROR => "CS_ERR_MESSAGE_ERROR",
            sys::CS_ERR_QUEUE_FULL => "CS_ERR_QUEUE_FULL",
            sys::CS_ERR_QUEUE_NOT_AVAILABLE => "CS_ERR_QUEUE_NOT_AVAILABLE",
            sys::CS_ERR_BAD_FLAGS => "CS_ERR_BAD_FLAGS",
            sys::CS_ERR_TOO_BIG => "CS_ERR_TOO_BIG",
            sys::CS_ERR_NO_SECTIONS => "CS_ERR_NO_SECTIONS",
            sys::CS_ERR_CONTEXT_NOT_FOUND => "CS_ERR_CONTEXT_NOT_FOUND",
            sys::CS_ERR_TOO_MANY_GROUPS => "CS_ERR_TOO_MANY_GROUPS",
            sys::CS_ERR_SECURITY => "CS_ERR_SECURITY",
            _ => "CS_ERR_UNKNOWN",
        }
    }
}

impl fmt::Display for CsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Turns a `cs_error_t` into `Ok(())` or the failed call's error.
pub(crate) fn check(call: &'static str, rc: sys::cs_error_t) -> Result<(), Error> {
    if rc == sys::CS_OK {
        Ok(())
    } else {
        Err(Error::Corosync {
            call,
            code: CsError(rc),
        })
    }
}

/// A failed Corosync call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The library call returned a `cs_error_t` other than `CS_OK`.
    #[error("{call} failed: {code}")]
    Corosync { call: &'static str, code: CsError },
    /// Corosync did not answer within the handle's deadline (it hangs or is overloaded). The connection
    /// may still be usable once Corosync answers again; its events source is closed.
    #[error("{call}: corosync did not answer within {limit:?}")]
    Timeout { call: &'static str, limit: Duration },
    /// The connection to Corosync is closed (Corosync exited or restarted, or an earlier error ended the
    /// event stream): open a new connection.
    #[error("{service}: the connection to corosync is closed")]
    Disconnected { service: &'static str },
    /// An argument cannot be passed to Corosync (too long, contains a NUL byte, empty).
    #[error("{call}: {reason}")]
    InvalidArgument { call: &'static str, reason: String },
    /// A cmap key holds a value of another type than the one asked for.
    #[error("{call}: key {key} holds {found}, not {wanted}")]
    WrongType {
        call: &'static str,
        key: String,
        found: &'static str,
        wanted: &'static str,
    },
    /// Registering the connection's file descriptor with the async reactor failed.
    #[error("{call}: {source}")]
    Io {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The blocking-pool task running the call did not complete (the runtime is shutting down).
    #[error("{call}: the worker running the call failed: {source}")]
    Worker {
        call: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A callback panicked while Corosync delivered events: events may be missing, so the event stream
    /// ends (reconnect to resynchronise).
    #[error("{callback}: the callback panicked; the event stream ends")]
    Callback { callback: &'static str },
}

impl Error {
    /// The Corosync error code, when the library returned one.
    pub fn code(&self) -> Option<CsError> {
        match self {
            Error::Corosync { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The call (or service, or callback) that failed.
    pub fn call(&self) -> &'static str {
        match self {
            Error::Corosync { call, .. }
            | Error::Timeout { call, .. }
            | Error::InvalidArgument { call, .. }
            | Error::WrongType { call, .. }
            | Error::Io { call, .. }
            | Error::Worker { call, .. } => call,
            Error::Disconnected { service } => service,
            Error::Callback { callback } => callback,
        }
    }

    /// True when the connection is gone and only a new one helps: Corosync closed it, or the library
    /// reports the IPC connection or handle as dead.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected { .. })
            || matches!(self.code(), Some(CsError::LIBRARY | CsError::BAD_HANDLE))
    }

    /// True when Corosync did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// What an operator can check, for the errors that have a usual cause.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Timeout { .. } => Some("is corosync hung or overloaded? check its log and CPU"),
            Error::Disconnected { .. } => Some("corosync exited or restarted: reconnect once it runs"),
            Error::Corosync { code, .. } => match *code {
                CsError::LIBRARY => Some("is corosync running on this host?"),
                CsError::ACCESS => Some("run as root or add the user to corosync's uidgid.d"),
                CsError::TRY_AGAIN => Some("corosync is busy (membership sync or flow control): retry"),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corosync_errors_name_the_call_and_the_code() {
        let e = check("cpg_join", sys::CS_ERR_TRY_AGAIN).unwrap_err();
        assert_eq!(e.to_string(), "cpg_join failed: CS_ERR_TRY_AGAIN (6)");
        assert_eq!(e.code(), Some(CsError::TRY_AGAIN));
        assert_eq!(e.call(), "cpg_join");
        assert!(!e.is_disconnected());
        assert!(e.hint().is_some());
        assert!(check("cpg_join", sys::CS_OK).is_ok());
    }

    #[test]
    fn every_documented_code_has_its_name() {
        for (code, name) in [
            (sys::CS_ERR_LIBRARY, "CS_ERR_LIBRARY"),
            (sys::CS_ERR_NOT_EXIST, "CS_ERR_NOT_EXIST"),
            (sys::CS_ERR_NO_SECTIONS, "CS_ERR_NO_SECTIONS"),
            (sys::CS_ERR_TOO_MANY_GROUPS, "CS_ERR_TOO_MANY_GROUPS"),
            (sys::CS_ERR_SECURITY, "CS_ERR_SECURITY"),
        ] {
            assert_eq!(CsError(code).name(), name);
        }
        for code in 2..=28 {
            assert_ne!(CsError(code).name(), "CS_ERR_UNKNOWN", "code {code}");
        }
        assert_eq!(CsError(29).name(), "CS_ERR_UNKNOWN");
    }

    #[test]
    fn lost_connections_are_recognised() {
        assert!(check("cpg_dispatch", sys::CS_ERR_LIBRARY)
            .unwrap_err()
            .is_disconnected());
        assert!(check("cpg_mcast_joined", sys::CS_ERR_BAD_HANDLE)
            .unwrap_err()
            .is_disconnected());
        assert!(Error::Disconnected { service: "cpg" }.is_disconnected());
        let t = Error::Timeout {
            call: "cmap_get",
            limit: Duration::from_secs(5),
        };
        assert!(t.is_timeout() && !t.is_disconnected());
        assert_eq!(t.to_string(), "cmap_get: corosync did not answer within 5s");
    }
}
