//! What can go wrong in an operation, typed so that vmhad can tell its D-Bus callers which kind of error
//! it was (`org.vmha.Vmha1.Error.*`) and the message names the VM, the host and the call.

use crate::ports::{CibError, HvError, StorageError, WaitError};

/// An operation's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The request itself is wrong (a bad count, a name that is not valid, a VM of another agent).
    #[error("{0}")]
    Invalid(String),
    #[error("unknown VM {0}")]
    UnknownVm(String),
    #[error("unknown host {0}")]
    UnknownHost(String),
    /// No group of that name in the stored policy (the message says which groups there are).
    #[error("{0}")]
    UnknownGroup(String),
    /// vmhad does not know the cluster's state yet (still connecting, or the CIB is unreachable).
    #[error("vmhad cannot read the CIB right now")]
    NotReady,
    #[error("the cluster is not quorate")]
    NotQuorate,
    /// The request collides with what exists (a taken name, a host without room, a file in the way).
    #[error("{0}")]
    Conflict(String),
    #[error("{vm}'s guest refused to {request}: {reason}")]
    GuestRefused {
        vm: String,
        request: String,
        reason: String,
    },
    #[error("{vm}'s guest failed to {request}: {reason}")]
    GuestFailed {
        vm: String,
        request: String,
        reason: String,
    },
    /// A growth needed members of lower-priority groups, and every candidate it asked refused to drain
    /// (or could not be asked) with no other candidate left: those members stay in their groups.
    /// `refused`: one entry per member, naming it, its group and its guest's answer.
    #[error(
        "{short} new member(s) of group {group} still have no room: {}; no other member of a lower-priority group may go (each is at its min, busy or asked already); the refusing members stay in their groups",
        .refused.join("; ")
    )]
    DrainsRefused {
        group: String,
        short: u32,
        refused: Vec<String>,
    },
    /// The request could not reach the guest (no channel, relay down).
    #[error("asking {vm}'s guest to {request}: {reason}")]
    GuestUnreachable {
        vm: String,
        request: String,
        reason: String,
    },
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    #[error(transparent)]
    Cib(#[from] CibError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The cluster did not reach the state the operation asked for.
    #[error("{what}: {reason}")]
    Cluster { what: String, reason: String },
    /// The data an operation read is not what it should be (a domain XML, a save image).
    #[error("{what}: {reason}")]
    Data { what: String, reason: String },
    /// It failed and everything it had done was undone.
    #[error("{0} (rolled back: nothing was created, template resumed)")]
    RolledBack(Box<OpError>),
    /// It failed and what it had done was undone (`what` says what, e.g. "instantiate failed, removing
    /// what it created: done").
    #[error("{error} ({what})")]
    Undone { error: Box<OpError>, what: String },
    /// It failed and undoing it failed too: what is left is listed.
    #[error("{error}; rollback incomplete: {undo}")]
    RollbackIncomplete { error: Box<OpError>, undo: String },
}

impl OpError {
    /// The error behind a rollback's wrapping.
    pub fn cause(&self) -> &OpError {
        match self {
            OpError::RolledBack(e)
            | OpError::Undone { error: e, .. }
            | OpError::RollbackIncomplete { error: e, .. } => e.cause(),
            e => e,
        }
    }

    pub(crate) fn data(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        OpError::Data {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn cluster(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        OpError::Cluster {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<WaitError> for OpError {
    fn from(e: WaitError) -> Self {
        OpError::cluster("waiting for the cluster", e)
    }
}
