//! Deadlines: every action finishes, or gives up with a reason, before Pacemaker's timeout.
//!
//! libvirt's client calls block without a limit (a SIGSTOPped libvirtd never answers), so the
//! action runs on a worker thread and the main thread waits for it with a deadline. When the
//! deadline passes, the caller reports which libvirt call was pending and exits the process; the
//! stuck thread dies with it. Inside the action, phases that wait (shutdown, migration) get
//! shorter deadlines carved out of the operation's.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// A point in time by which something must be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// The deadline `budget` from now.
    pub fn after(budget: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + budget,
        }
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub fn has_passed(&self) -> bool {
        self.remaining().is_zero()
    }

    /// A deadline `reserve` earlier than this one (never earlier than now).
    pub fn minus(&self, reserve: Duration) -> Deadline {
        Deadline::after(self.remaining().saturating_sub(reserve))
    }

    /// Whichever of the two deadlines comes first.
    pub fn min(self, other: Deadline) -> Deadline {
        if other.at < self.at {
            other
        } else {
            self
        }
    }
}

/// How long the agent may work: the operation timeout minus a margin to report and exit before
/// Pacemaker kills it (a tenth of the timeout, between 0.5 s and 3 s).
pub fn working_budget(op_timeout: Duration) -> Duration {
    let margin = (op_timeout / 10).clamp(Duration::from_millis(500), Duration::from_secs(3));
    op_timeout.saturating_sub(margin)
}

/// How long stop waits for a graceful shutdown out of a working budget `budget`: whatever
/// remains after a reserve for destroying the domain (a third of the budget, at least 5 s, at
/// most 30 s); an explicit `requested` value is honoured up to that limit.
pub fn graceful_shutdown_budget(budget: Duration, requested: Option<Duration>) -> Duration {
    let reserve = (budget / 3).clamp(Duration::from_secs(5), Duration::from_secs(30));
    let limit = budget.saturating_sub(reserve);
    requested.map_or(limit, |r| r.min(limit))
}

/// How long migrate_to lets a migration run before aborting it: the budget minus a reserve to
/// abort and let libvirt resume the guest on the source (a tenth, at least 2 s, at most 10 s).
pub fn migration_budget(budget: Duration) -> Duration {
    let reserve = (budget / 10).clamp(Duration::from_secs(2), Duration::from_secs(10));
    budget.saturating_sub(reserve)
}

#[derive(Debug, Default)]
struct ProgressState {
    call: &'static str,
    vm: Option<String>,
}

/// What the worker is doing right now: the VM and the libvirt call, for the report written when
/// a deadline passes. Cloning shares the record.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    state: Arc<Mutex<ProgressState>>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Records that `call` is about to start.
    pub fn enter(&self, call: &'static str) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).call = call;
    }

    /// Records the VM the action is about.
    pub fn set_vm(&self, vm: &str) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).vm = Some(vm.to_owned());
    }

    /// The last call entered (empty before the first).
    pub fn call(&self) -> &'static str {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).call
    }

    pub fn vm(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).vm.clone()
    }
}

/// The result of [`run_bounded`].
#[derive(Debug, PartialEq, Eq)]
pub enum Bounded<T> {
    /// The work finished in time.
    Done(T),
    /// The deadline passed first; `call` was pending. The worker thread is left behind.
    Expired { call: &'static str },
    /// The worker thread could not be created, or panicked.
    WorkerFailed(String),
}

/// Runs `work` on a new thread and waits for its result until `deadline`.
pub fn run_bounded<T, F>(deadline: Deadline, progress: &Progress, work: F) -> Bounded<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = thread::Builder::new().name("libvirt-worker".into()).spawn(move || {
        // The receiver may be gone if the deadline passed; nothing to do then.
        let _ = tx.send(work());
    });
    let worker = match spawned {
        Ok(worker) => worker,
        Err(e) => return Bounded::WorkerFailed(format!("cannot start a worker thread: {e}")),
    };
    match rx.recv_timeout(deadline.remaining()) {
        Ok(value) => {
            // Let the worker end before the process does: its thread-exit work (libvirt's thread-local
            // error freed by a key destructor) racing the libraries' exit-time destructors corrupted the
            // heap once in a lab run ("double free or corruption" in a probe). It has sent its result,
            // so this is its last instructions.
            let _ = worker.join();
            Bounded::Done(value)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Bounded::Expired { call: progress.call() },
        Err(mpsc::RecvTimeoutError::Disconnected) => Bounded::WorkerFailed("the worker thread panicked".into()),
    }
}

/// Repeats `probe` until it yields a value or `deadline` passes, pausing between attempts
/// (20 ms doubling up to 500 ms). Returns `Ok(None)` when the deadline passed first.
pub fn poll_until<T, E>(deadline: Deadline, mut probe: impl FnMut() -> Result<Option<T>, E>) -> Result<Option<T>, E> {
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(value) = probe()? {
            return Ok(Some(value));
        }
        let left = deadline.remaining();
        if left.is_zero() {
            return Ok(None);
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_budget_leaves_a_margin() {
        let table = [
            (Duration::from_secs(20), Duration::from_secs(18)),
            (Duration::from_secs(90), Duration::from_secs(87)),
            (Duration::from_secs(2), Duration::from_millis(1500)),
            (Duration::from_millis(300), Duration::ZERO),
        ];
        for (timeout, budget) in table {
            assert_eq!(working_budget(timeout), budget, "{timeout:?}");
        }
    }

    #[test]
    fn graceful_shutdown_always_leaves_time_to_destroy() {
        let s = Duration::from_secs;
        let table = [
            (s(87), None, s(58)),
            (s(87), Some(s(30)), s(30)),
            (s(87), Some(s(300)), s(58)),
            (s(18), None, s(12)),
            (s(6), None, s(1)),
            (s(4), None, s(0)),
            (s(300), None, s(270)),
        ];
        for (budget, requested, expected) in table {
            let graceful = graceful_shutdown_budget(budget, requested);
            assert_eq!(graceful, expected, "{budget:?} {requested:?}");
            assert!(budget.saturating_sub(graceful) >= s(4).min(budget));
        }
    }

    #[test]
    fn migration_budget_reserves_time_to_abort() {
        let s = Duration::from_secs;
        assert_eq!(
            migration_budget(s(117)),
            s(117) - Duration::from_millis(11700).min(s(10))
        );
        assert_eq!(migration_budget(s(20)), s(18));
        assert_eq!(migration_budget(s(1)), s(0));
    }

    #[test]
    fn finished_work_is_returned() {
        let progress = Progress::new();
        let result = run_bounded(Deadline::after(Duration::from_secs(30)), &progress, || 42);
        assert_eq!(result, Bounded::Done(42));
    }

    #[test]
    fn hung_work_expires_naming_the_pending_call() {
        let progress = Progress::new();
        let worker_progress = progress.clone();
        let (release, hang) = mpsc::channel::<()>();
        let started = Instant::now();
        let result = run_bounded(Deadline::after(Duration::from_millis(200)), &progress, move || {
            worker_progress.set_vm("web1");
            worker_progress.enter("virConnectOpen");
            // Blocks like a call to a stopped libvirtd, until the test releases it.
            let _ = hang.recv();
        });
        assert_eq!(result, Bounded::Expired { call: "virConnectOpen" });
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(progress.vm().as_deref(), Some("web1"));
        drop(release);
    }

    #[test]
    fn a_panicking_worker_is_reported() {
        let progress = Progress::new();
        let result: Bounded<()> = run_bounded(Deadline::after(Duration::from_secs(30)), &progress, || panic!("boom"));
        assert!(matches!(result, Bounded::WorkerFailed(_)), "{result:?}");
    }

    #[test]
    fn polling_stops_at_the_first_value() {
        let mut calls = 0;
        let found: Result<Option<u32>, ()> = poll_until(Deadline::after(Duration::from_secs(30)), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        });
        assert_eq!(found, Ok(Some(3)));
    }

    #[test]
    fn polling_gives_up_at_the_deadline_and_passes_errors_on() {
        let none: Result<Option<()>, ()> = poll_until(Deadline::after(Duration::from_millis(50)), || Ok(None));
        assert_eq!(none, Ok(None));
        let err: Result<Option<()>, &str> = poll_until(Deadline::after(Duration::from_secs(30)), || Err("lost"));
        assert_eq!(err, Err("lost"));
    }

    #[test]
    fn deadlines_compose() {
        let long = Deadline::after(Duration::from_secs(60));
        let short = long.minus(Duration::from_secs(50));
        assert!(short.remaining() <= Duration::from_secs(10));
        assert_eq!(long.min(short), short);
        assert_eq!(short.min(long), short);
        assert!(Deadline::after(Duration::ZERO).has_passed());
        assert!(!long.has_passed());
    }
}
