//! The one error type of the crate: which call failed, Pacemaker's code and its text.

use std::time::Duration;

/// A failed Pacemaker call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A CIB call returned a legacy (negative errno-style) Pacemaker code; `text` is `pcmk_strerror`'s.
    #[error("{call} failed: {text} (legacy code {code})")]
    Legacy {
        call: &'static str,
        code: i32,
        text: String,
    },
    /// A `pcmk_*` call returned a standard Pacemaker return code; `text` is `pcmk_rc_str`'s.
    #[error("{call} failed: {text} (return code {code})")]
    Rc {
        call: &'static str,
        code: i32,
        text: String,
    },
    /// A daemon answered with a failure status (`crm_exit_t`, text from `crm_exit_str`) or refused the
    /// request (e.g. an operation result in the reply).
    #[error("{call} failed: {text} (status {code})")]
    Refused {
        call: &'static str,
        code: i32,
        text: String,
    },
    /// No answer before the caller's deadline. For a change (modify, replace, fail a resource) the outcome
    /// is unknown: read the state again.
    #[error("{call}: no answer within {limit:?}")]
    Timeout { call: &'static str, limit: Duration },
    /// The connection to the daemon is gone (the daemon stopped or the host is shutting down): drop the
    /// handle and connect again.
    #[error("{call}: the connection to {daemon} is lost")]
    Disconnected { call: &'static str, daemon: &'static str },
    /// The request could not be expressed (a NUL byte in a string, XML Pacemaker cannot parse) or the
    /// answer could not be understood.
    #[error("{call}: {reason}")]
    Invalid { call: &'static str, reason: String },
}

impl Error {
    /// The name of the call that failed.
    pub fn call(&self) -> &'static str {
        match self {
            Error::Legacy { call, .. }
            | Error::Rc { call, .. }
            | Error::Refused { call, .. }
            | Error::Timeout { call, .. }
            | Error::Disconnected { call, .. }
            | Error::Invalid { call, .. } => call,
        }
    }

    /// True when the handle is unusable and the caller should connect again.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected { .. })
    }
}

/// Result of this crate's calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
