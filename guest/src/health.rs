//! Heartbeats and application health, for vmhad's VM and application monitoring.
//!
//! A heartbeat thread sends `{"type":"heartbeat","seq":N}` on the channel every interval while a port is
//! open: when the guest's kernel hangs (or its vCPUs stop), the heartbeats stop and vmhad resets the VM
//! after its threshold. A health thread runs every executable in the health directory
//! (`/etc/vmha/health.d/*`, in name order, each within its own deadline, no input) at an interval: a round
//! passes when every hook exits 0; after `failures` failed rounds in a row the application is reported
//! unhealthy (with the failing hook and how it failed), and healthy again after a passing round. The
//! verdict goes out when it changes, and again with every tenth heartbeat (so a vmhad that restarted or a
//! channel that reconnected learns it).

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmha_model::guest::{GuestMessage, Outcome};

use crate::channel::send;
use crate::hooks::{hooks_in, run_hook};

/// Heartbeats between two repetitions of an unchanged health verdict.
const REPEAT_VERDICT_EVERY: u64 = 10;

/// What the heartbeat and health threads share with the channel loop.
#[derive(Debug, Default)]
pub struct Beacon {
    /// The open port's writer, while one is open.
    writer: Mutex<Option<Arc<Mutex<File>>>>,
    /// The application verdict: `None` until the health hooks decided (or when there are none).
    verdict: Mutex<Option<(bool, String)>>,
}

impl Beacon {
    /// The channel loop opened the port (`Some`) or lost it (`None`).
    pub fn set_writer(&self, writer: Option<Arc<Mutex<File>>>) {
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = writer;
    }

    fn send(&self, msg: &GuestMessage) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = writer {
            // Lost while no host side is connected; vmhad only counts what arrives.
            let _ = send(&w, msg);
        }
    }

    fn verdict_message(&self) -> Option<GuestMessage> {
        self.verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(healthy, reason)| GuestMessage::health(*healthy, reason))
    }

    /// Records a verdict; true when it changed.
    fn set_verdict(&self, healthy: bool, reason: String) -> bool {
        let mut v = self.verdict.lock().unwrap_or_else(|e| e.into_inner());
        let changed = v.as_ref().map(|(h, _)| *h) != Some(healthy);
        *v = Some((healthy, reason));
        changed
    }
}

impl Beacon {
    /// Tells vmhad that vmha-guest stops (so the end of its heartbeats is no hang), waiting at most
    /// `limit` for the write (it blocks while no host side is connected).
    pub fn say_stopping(self: &Arc<Self>, limit: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            me.send(&GuestMessage::stopping(0));
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(limit);
    }
}

/// Sends a heartbeat every `interval`, forever (and the verdict every [`REPEAT_VERDICT_EVERY`]th time).
pub fn heartbeats(beacon: Arc<Beacon>, interval: Duration) {
    let mut seq: u64 = 0;
    loop {
        beacon.send(&GuestMessage::heartbeat(seq));
        if seq.is_multiple_of(REPEAT_VERDICT_EVERY) {
            if let Some(msg) = beacon.verdict_message() {
                beacon.send(&msg);
            }
        }
        seq = seq.wrapping_add(1);
        std::thread::sleep(interval);
    }
}

/// How the health hooks run.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub dir: PathBuf,
    pub interval: Duration,
    /// Each hook's own deadline.
    pub timeout: Duration,
    /// Failed rounds in a row before the application is unhealthy.
    pub failures: u32,
}

/// Counts failed rounds and decides the verdict.
#[derive(Debug, Default)]
pub struct Verdicts {
    failed_in_a_row: u32,
}

impl Verdicts {
    /// The verdict after a round: `None` (no hooks, or not enough failures to say unhealthy yet — the
    /// verdict stays as it was), or `Some((healthy, reason))`.
    pub fn after_round(&mut self, result: Option<Result<(), String>>, failures: u32) -> Option<(bool, String)> {
        match result? {
            Ok(()) => {
                self.failed_in_a_row = 0;
                Some((true, String::new()))
            }
            Err(why) => {
                self.failed_in_a_row = self.failed_in_a_row.saturating_add(1);
                (self.failed_in_a_row >= failures.max(1)).then(|| {
                    (
                        false,
                        format!("{why} ({} failed checks in a row)", self.failed_in_a_row),
                    )
                })
            }
        }
    }
}

/// One round: every hook in `config.dir`, each within `config.timeout`; `None` when there are none,
/// `Err` with the first failure.
pub fn health_round(config: &HealthConfig) -> Option<Result<(), String>> {
    let hooks = hooks_in(&config.dir);
    if hooks.is_empty() {
        return None;
    }
    for hook in hooks {
        let r = run_hook(
            &hook,
            "health",
            "{}",
            std::time::Instant::now() + config.timeout,
            config.timeout,
        );
        match r.outcome {
            Outcome::Done => {}
            // A health hook has no "refuse": every status but 0 is a failure.
            Outcome::Refused => return Some(Err(format!("health hook {} exited with status 3", hook.display()))),
            Outcome::Failed => return Some(Err(r.reason)),
        }
    }
    Some(Ok(()))
}

/// Runs the health hooks every interval, forever, and tells vmhad when the verdict changes.
pub fn health_checks(beacon: Arc<Beacon>, config: HealthConfig) {
    let mut verdicts = Verdicts::default();
    loop {
        if let Some((healthy, reason)) = verdicts.after_round(health_round(&config), config.failures) {
            if beacon.set_verdict(healthy, reason.clone()) {
                if healthy {
                    eprintln!("vmha-guest: the application is healthy");
                } else {
                    eprintln!("vmha-guest: the application is unhealthy: {reason}");
                }
                if let Some(msg) = beacon.verdict_message() {
                    beacon.send(&msg);
                }
            }
        }
        std::thread::sleep(config.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::tests::{hook, hooks_dir};

    #[test]
    fn three_failed_rounds_in_a_row_make_the_application_unhealthy() {
        let mut v = Verdicts::default();
        assert_eq!(v.after_round(None, 3), None, "no hooks: no verdict");
        assert_eq!(v.after_round(Some(Ok(())), 3), Some((true, String::new())));
        assert_eq!(v.after_round(Some(Err("x".into())), 3), None);
        assert_eq!(v.after_round(Some(Err("x".into())), 3), None);
        let (healthy, reason) = v
            .after_round(Some(Err("hook a exited with status 1".into())), 3)
            .unwrap();
        assert!(!healthy);
        assert_eq!(reason, "hook a exited with status 1 (3 failed checks in a row)");
        // A pass resets the count.
        assert_eq!(v.after_round(Some(Ok(())), 3), Some((true, String::new())));
        assert_eq!(v.after_round(Some(Err("x".into())), 3), None);
    }

    #[test]
    fn a_round_runs_every_hook_each_within_its_deadline() {
        let root = hooks_dir("health");
        let config = HealthConfig {
            dir: root.join("health.d"),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(300),
            failures: 3,
        };
        assert_eq!(health_round(&config), None, "no directory: no hooks");
        hook(&root, "health.d", "10-ok", "exit 0");
        assert_eq!(health_round(&config), Some(Ok(())));
        hook(&root, "health.d", "20-refuse", "exit 3");
        assert!(health_round(&config).unwrap().unwrap_err().contains("status 3"));
        std::fs::remove_file(root.join("health.d/20-refuse")).unwrap();
        hook(&root, "health.d", "30-slow", "sleep 30");
        let started = std::time::Instant::now();
        let err = health_round(&config).unwrap().unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_stopping_vmha_guest_says_so_and_does_not_wait_for_an_absent_host() {
        use std::io::BufRead;
        let beacon = Arc::new(Beacon::default());
        // No port open: returns at once.
        beacon.say_stopping(Duration::from_secs(5));
        let (guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(guest));
        beacon.set_writer(Some(Arc::new(Mutex::new(file))));
        beacon.say_stopping(Duration::from_secs(5));
        let mut line = String::new();
        std::io::BufReader::new(host).read_line(&mut line).unwrap();
        assert_eq!(
            vmha_model::guest::parse_guest_line(line.trim_end().as_bytes()).unwrap(),
            GuestMessage::stopping(0)
        );
    }

    #[test]
    fn the_verdict_changes_are_told_and_repeated() {
        let beacon = Beacon::default();
        assert!(beacon.verdict_message().is_none());
        assert!(beacon.set_verdict(false, "down".into()));
        assert!(!beacon.set_verdict(false, "still down".into()), "unchanged");
        assert_eq!(
            beacon.verdict_message(),
            Some(GuestMessage::health(false, "still down"))
        );
        assert!(beacon.set_verdict(true, String::new()));
    }
}
