//! libvirt's domain state and reason, classified into what the cluster must know: running here,
//! cleanly stopped here, or failed here.

use libvirt_ext::RawState;
use virt_sys as sys;

use crate::ocf::OcfStatus;

/// The cluster's view of a domain that exists in libvirt on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Running or blocked: vCPUs are scheduled; what `start` waits for.
    Running,
    /// Active (a QEMU process exists) but not executing guest code, for a benign reason.
    Paused(PauseKind),
    /// Active and shutting down.
    ShuttingDown,
    /// Active, suspended to RAM by the guest (ACPI S3).
    GuestSuspended,
    /// Not active: shut off (only persistent domains stay visible like this).
    ShutOff(&'static str),
    /// Active but broken: crashed, or paused on an I/O error, a watchdog, a failed post-copy.
    Failed(&'static str),
    /// libvirt reports no state (for example while a migration is being set up).
    Indeterminate,
}

/// Why a domain is paused, as far as start and monitor care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    /// Paused by a user or with no known reason: `start` resumes it.
    Resumable(&'static str),
    /// Paused by libvirt for a job that resumes it (migration, save, snapshot, startup).
    Job(&'static str),
}

impl Condition {
    /// Classifies libvirt's `(state, reason)` pair.
    pub fn classify(raw: RawState) -> Condition {
        let reason = u32::try_from(raw.reason).unwrap_or(u32::MAX);
        match raw.state {
            sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => Condition::Running,
            sys::VIR_DOMAIN_PAUSED => paused(reason),
            sys::VIR_DOMAIN_SHUTDOWN => Condition::ShuttingDown,
            sys::VIR_DOMAIN_PMSUSPENDED => Condition::GuestSuspended,
            sys::VIR_DOMAIN_SHUTOFF => Condition::ShutOff(match reason {
                sys::VIR_DOMAIN_SHUTOFF_CRASHED => "shut off after a crash",
                sys::VIR_DOMAIN_SHUTOFF_FAILED => "shut off: failed to start",
                sys::VIR_DOMAIN_SHUTOFF_SAVED => "shut off: saved",
                sys::VIR_DOMAIN_SHUTOFF_MIGRATED => "shut off: migrated away",
                sys::VIR_DOMAIN_SHUTOFF_DESTROYED => "shut off: destroyed",
                sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN => "shut off: guest shut down",
                _ => "shut off",
            }),
            sys::VIR_DOMAIN_CRASHED => Condition::Failed("crashed"),
            _ => Condition::Indeterminate,
        }
    }

    /// Whether a QEMU (or other hypervisor) process exists for the domain on this host.
    pub fn is_active(self) -> bool {
        !matches!(self, Condition::ShutOff(_))
    }

    /// The monitor's answer: running and benign-active states are 0 (never 7 while a process
    /// exists, or a probe could let the VM start on a second host), shut off is 7, failed and
    /// indeterminate are 1 so that Pacemaker recovers (stop, then start).
    pub fn monitor_status(self) -> OcfStatus {
        match self {
            Condition::Running | Condition::Paused(_) | Condition::ShuttingDown | Condition::GuestSuspended => {
                OcfStatus::Success
            }
            Condition::ShutOff(_) => OcfStatus::NotRunning,
            Condition::Failed(_) | Condition::Indeterminate => OcfStatus::ErrGeneric,
        }
    }

    /// A few words for logs and exit reasons.
    pub fn describe(self) -> &'static str {
        match self {
            Condition::Running => "running",
            Condition::Paused(PauseKind::Resumable(what) | PauseKind::Job(what)) => what,
            Condition::ShuttingDown => "shutting down",
            Condition::GuestSuspended => "suspended by the guest",
            Condition::ShutOff(what) | Condition::Failed(what) => what,
            Condition::Indeterminate => "in no state libvirt can report",
        }
    }
}

fn paused(reason: u32) -> Condition {
    use PauseKind::{Job, Resumable};
    match reason {
        sys::VIR_DOMAIN_PAUSED_IOERROR => Condition::Failed("paused by a disk I/O error"),
        sys::VIR_DOMAIN_PAUSED_WATCHDOG => Condition::Failed("paused by its watchdog"),
        sys::VIR_DOMAIN_PAUSED_CRASHED => Condition::Failed("paused after a guest crash"),
        sys::VIR_DOMAIN_PAUSED_POSTCOPY_FAILED => Condition::Failed("paused after a failed post-copy migration"),
        sys::VIR_DOMAIN_PAUSED_API_ERROR => Condition::Failed("paused by a hypervisor error"),
        sys::VIR_DOMAIN_PAUSED_USER => Condition::Paused(Resumable("paused by a user")),
        sys::VIR_DOMAIN_PAUSED_FROM_SNAPSHOT => Condition::Paused(Resumable("paused after a snapshot revert")),
        sys::VIR_DOMAIN_PAUSED_MIGRATION | sys::VIR_DOMAIN_PAUSED_POSTCOPY => {
            Condition::Paused(Job("paused for migration"))
        }
        sys::VIR_DOMAIN_PAUSED_SAVE => Condition::Paused(Job("paused while saving")),
        sys::VIR_DOMAIN_PAUSED_DUMP => Condition::Paused(Job("paused while dumping")),
        sys::VIR_DOMAIN_PAUSED_SNAPSHOT => Condition::Paused(Job("paused for a snapshot")),
        sys::VIR_DOMAIN_PAUSED_SHUTTING_DOWN => Condition::Paused(Job("paused while shutting down")),
        sys::VIR_DOMAIN_PAUSED_STARTING_UP => Condition::Paused(Job("paused while starting up")),
        _ => Condition::Paused(Resumable("paused")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(state: u32, reason: u32) -> Condition {
        Condition::classify(RawState {
            state,
            reason: i32::try_from(reason).expect("small"),
        })
    }

    /// The scenario table: every state and the reasons that change the answer.
    #[test]
    fn state_to_monitor_exit_code() {
        use OcfStatus::{ErrGeneric as Fail, NotRunning as Stopped, Success as Up};
        let table = [
            (sys::VIR_DOMAIN_RUNNING, 1, Up),
            (sys::VIR_DOMAIN_BLOCKED, 0, Up),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_USER, Up),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_MIGRATION, Up),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_STARTING_UP, Up),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_UNKNOWN, Up),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_IOERROR, Fail),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_WATCHDOG, Fail),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_CRASHED, Fail),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_POSTCOPY_FAILED, Fail),
            (sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_API_ERROR, Fail),
            (sys::VIR_DOMAIN_SHUTDOWN, 0, Up),
            (sys::VIR_DOMAIN_PMSUSPENDED, 0, Up),
            (sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN, Stopped),
            (sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_CRASHED, Stopped),
            (sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_MIGRATED, Stopped),
            (sys::VIR_DOMAIN_CRASHED, 0, Fail),
            (sys::VIR_DOMAIN_NOSTATE, 0, Fail),
            (99, 0, Fail),
        ];
        for (state, reason, expected) in table {
            assert_eq!(
                c(state, reason).monitor_status(),
                expected,
                "state {state} reason {reason}"
            );
        }
    }

    #[test]
    fn only_shut_off_is_inactive() {
        assert!(!c(sys::VIR_DOMAIN_SHUTOFF, 0).is_active());
        for state in [
            sys::VIR_DOMAIN_NOSTATE,
            sys::VIR_DOMAIN_RUNNING,
            sys::VIR_DOMAIN_BLOCKED,
            sys::VIR_DOMAIN_PAUSED,
            sys::VIR_DOMAIN_SHUTDOWN,
            sys::VIR_DOMAIN_CRASHED,
            sys::VIR_DOMAIN_PMSUSPENDED,
        ] {
            assert!(c(state, 0).is_active(), "state {state}");
        }
    }

    #[test]
    fn start_resumes_only_benign_pauses() {
        assert!(matches!(
            c(sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_USER),
            Condition::Paused(PauseKind::Resumable(_))
        ));
        assert!(matches!(
            c(sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_MIGRATION),
            Condition::Paused(PauseKind::Job(_))
        ));
    }

    #[test]
    fn descriptions_name_the_cause() {
        assert_eq!(
            c(sys::VIR_DOMAIN_PAUSED, sys::VIR_DOMAIN_PAUSED_IOERROR).describe(),
            "paused by a disk I/O error"
        );
        assert_eq!(
            c(sys::VIR_DOMAIN_SHUTOFF, sys::VIR_DOMAIN_SHUTOFF_CRASHED).describe(),
            "shut off after a crash"
        );
        assert_eq!(c(sys::VIR_DOMAIN_RUNNING, 0).describe(), "running");
    }
}
