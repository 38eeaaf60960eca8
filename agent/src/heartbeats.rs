//! The heartbeats and application verdicts of the VMs whose guest channels are connected on this host, and
//! the rules that decide when one is due a check (see [`crate::health`], which acts on them). Fed by the
//! guest channel tasks ([`crate::guest`]); no I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use vmha_model::health::{AppAction, HealthSettings, ResetLimit};

/// What vmhad knows of one VM's heartbeats on its current channel connection.
#[derive(Debug, Clone)]
pub struct Monitor {
    /// The last heartbeat; `None`: none since the channel connected (or since a hang was handled): not
    /// monitored.
    last_beat: Option<Instant>,
    /// When the channel connected: no silence counts within the VM's grace after it (the grace is read from
    /// the VM's settings at each check, so a VM whose channel connected before vmhad knew its settings gets
    /// its own grace, not a default).
    connected_at: Instant,
    /// No silence counts before this either (the grace after a pause on purpose).
    excused_until: Option<Instant>,
    /// The application verdict the guest sent last, and whether vmhad acted on it already.
    app: Option<(bool, String)>,
    app_handled: bool,
    /// A decision about this VM is being carried out (its libvirt check or its action).
    busy: bool,
}

impl Monitor {
    fn new(now: Instant) -> Self {
        Monitor {
            last_beat: None,
            connected_at: now,
            excused_until: None,
            app: None,
            app_handled: true,
            busy: false,
        }
    }

    /// How long the guest has been silent, when that is over `threshold` and the `grace` after the
    /// connection (and any excuse) has passed.
    pub fn overdue(&self, now: Instant, threshold: Duration, grace: Duration) -> Option<Duration> {
        let last = self.last_beat?;
        let silent = now.saturating_duration_since(last);
        let in_grace = now < self.connected_at + grace || self.excused_until.is_some_and(|e| now < e);
        (silent > threshold && !in_grace).then_some(silent)
    }

    /// Something paused the VM on purpose (seen at `now`): silence counts only after `grace` from now.
    pub fn excuse(&mut self, now: Instant, grace: Duration) {
        let until = now + grace;
        self.excused_until = Some(self.excused_until.map_or(until, |e| e.max(until)));
    }
}

/// The health of the VMs whose channels are connected on this host, and their reset history.
#[derive(Debug, Default)]
pub struct Registry {
    vms: Mutex<HashMap<String, Monitor>>,
    /// Resets per VM (kept across connections: a VM reset here comes back on a new connection).
    resets: Mutex<HashMap<String, ResetLimit<Instant>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// `vm`'s channel connected: a fresh monitor, not armed until its first heartbeat.
    pub fn connected(&self, vm: &str) {
        lock(&self.vms).insert(vm.to_string(), Monitor::new(Instant::now()));
    }

    /// `vm`'s channel went away (its QEMU stopped or migrated away, or vmhad stops following it).
    pub fn disconnected(&self, vm: &str) {
        lock(&self.vms).remove(vm);
    }

    pub fn heartbeat(&self, vm: &str) {
        if let Some(m) = lock(&self.vms).get_mut(vm) {
            m.last_beat = Some(Instant::now());
        }
    }

    /// vmha-guest is being stopped: no heartbeats until it runs again, and that is no hang.
    pub fn stopping(&self, vm: &str) {
        if let Some(m) = lock(&self.vms).get_mut(vm) {
            m.last_beat = None;
        }
    }

    /// The guest's application verdict; a change to unhealthy is acted on once.
    pub fn app_verdict(&self, vm: &str, healthy: bool, reason: &str) {
        if let Some(m) = lock(&self.vms).get_mut(vm) {
            let was_unhealthy = m.app.as_ref().is_some_and(|(h, _)| !h);
            if healthy || !was_unhealthy {
                m.app_handled = healthy;
            }
            m.app = Some((healthy, reason.to_string()));
        }
    }

    /// The status shown for `vm`: whether it is monitored, the age of its last heartbeat, its
    /// application verdict.
    pub fn status(&self, vm: &str) -> HashMap<String, String> {
        let mut out = HashMap::new();
        if let Some(m) = lock(&self.vms).get(vm) {
            out.insert(
                "heartbeats".into(),
                if m.last_beat.is_some() { "yes" } else { "no" }.into(),
            );
            if let Some(last) = m.last_beat {
                out.insert(
                    "last_heartbeat_ms_ago".into(),
                    Instant::now().saturating_duration_since(last).as_millis().to_string(),
                );
            }
            if let Some((healthy, reason)) = &m.app {
                out.insert(
                    "application".into(),
                    if *healthy { "healthy" } else { "unhealthy" }.into(),
                );
                if !reason.is_empty() {
                    out.insert("application_reason".into(), reason.clone());
                }
            }
        }
        out
    }
}

/// What to do about one VM, decided under the registry's lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Silent for this long: confirm with libvirt, then reset.
    Silent(Duration),
    /// The application is unhealthy (reason): apply the action.
    App(String),
}

/// One pass over the registry: the VMs to look at now, marked busy. `settings` and `migrating` come from
/// the CIB (a VM the CIB does not show is not a cluster VM: `None`, skipped).
pub fn due(
    registry: &Registry,
    now: Instant,
    settings: impl Fn(&str) -> Option<(HealthSettings, bool)>,
) -> Vec<(String, HealthSettings, Check)> {
    let mut out = Vec::new();
    let mut vms = lock(&registry.vms);
    for (vm, m) in vms.iter_mut() {
        let Some((s, migrating)) = settings(vm) else { continue };
        if m.busy {
            continue;
        }
        if migrating {
            m.excuse(now, s.grace);
            continue;
        }
        if !m.app_handled {
            if let Some((false, reason)) = &m.app {
                m.app_handled = true;
                if s.app_action != AppAction::Ignore {
                    m.busy = true;
                    out.push((vm.clone(), s, Check::App(reason.clone())));
                    continue;
                }
            }
        }
        if !s.monitoring {
            continue;
        }
        if let Some(silent) = m.overdue(now, s.sensitivity.threshold(), s.grace) {
            m.busy = true;
            out.push((vm.clone(), s, Check::Silent(silent)));
        }
    }
    out
}

/// How a check ended, for the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Paused on purpose: grace from now.
    Excused,
    /// Acted on (or only reported): not monitored until its next heartbeat.
    Handled,
    /// Not confirmed (libvirt did not answer): check again at the next tick.
    Retry,
}

impl Registry {
    pub(crate) fn finish(&self, vm: &str, outcome: Outcome, grace: Duration) {
        if let Some(m) = lock(&self.vms).get_mut(vm) {
            m.busy = false;
            match outcome {
                Outcome::Excused => m.excuse(Instant::now(), grace),
                Outcome::Handled => m.last_beat = None,
                Outcome::Retry => {}
            }
        }
    }

    /// Records a reset of `vm` now if its limit allows one.
    pub(crate) fn try_reset(&self, vm: &str, s: &HealthSettings) -> bool {
        let now = Instant::now();
        let window = s.sensitivity.window();
        lock(&self.resets)
            .entry(vm.to_string())
            .or_default()
            .try_reset(now, s.sensitivity.max_resets(), |t| now.duration_since(*t) < window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmha_model::health::Sensitivity;

    fn high() -> HealthSettings {
        HealthSettings {
            monitoring: true,
            sensitivity: Sensitivity::High,
            grace: Duration::from_secs(10),
            ..HealthSettings::default()
        }
    }

    fn registry_with(vm: &str) -> Registry {
        let r = Registry::default();
        r.connected(vm);
        r
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_after_connecting_is_the_vms_own_even_before_its_first_check() {
        // The channel connected before vmhad ever checked the VM (a VM started on this host for the first
        // time): its own grace (2 s), not the default (30 s).
        let r = registry_with("vm1");
        let short = HealthSettings {
            grace: Duration::from_secs(2),
            ..high()
        };
        r.heartbeat("vm1");
        tokio::time::advance(Duration::from_millis(5100)).await;
        assert_eq!(due(&r, Instant::now(), |_| Some((short, false))).len(), 1);
        // A longer grace (10 s) still holds at 5.1 s.
        let r = registry_with("vm2");
        r.heartbeat("vm2");
        tokio::time::advance(Duration::from_millis(5100)).await;
        assert!(due(&r, Instant::now(), |_| Some((high(), false))).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_that_never_sent_a_heartbeat_is_not_monitored() {
        let r = registry_with("vm1");
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(due(&r, Instant::now(), |_| Some((high(), false))).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn silence_past_the_threshold_after_the_grace_is_a_hang_once() {
        let r = registry_with("vm1");
        r.heartbeat("vm1");
        // Within the grace (10 s after connecting): not yet, although silent for 6 s > 5 s.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(due(&r, Instant::now(), |_| Some((high(), false))).is_empty());
        tokio::time::advance(Duration::from_secs(4)).await;
        r.heartbeat("vm1");
        tokio::time::advance(Duration::from_millis(4900)).await;
        assert!(
            due(&r, Instant::now(), |_| Some((high(), false))).is_empty(),
            "4.9 s < 5 s"
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        let todo = due(&r, Instant::now(), |_| Some((high(), false)));
        assert_eq!(todo.len(), 1);
        assert_eq!(todo[0].2, Check::Silent(Duration::from_millis(5100)));
        // Busy while being handled; not monitored once handled, until a heartbeat comes again.
        assert!(due(&r, Instant::now(), |_| Some((high(), false))).is_empty());
        r.finish("vm1", Outcome::Handled, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(due(&r, Instant::now(), |_| Some((high(), false))).is_empty());
        r.heartbeat("vm1");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(due(&r, Instant::now(), |_| Some((high(), false))).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_vmha_guest_that_says_it_stops_is_not_taken_for_a_hang() {
        let r = registry_with("vm1");
        tokio::time::advance(Duration::from_secs(11)).await;
        r.heartbeat("vm1");
        r.stopping("vm1");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(due(&r, Instant::now(), |_| Some((high(), false))).is_empty());
        // Back: followed again.
        r.heartbeat("vm1");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(due(&r, Instant::now(), |_| Some((high(), false))).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_migration_or_a_pause_on_purpose_restarts_the_grace() {
        let r = registry_with("vm1");
        tokio::time::advance(Duration::from_secs(11)).await;
        r.heartbeat("vm1");
        tokio::time::advance(Duration::from_secs(6)).await;
        // The CIB shows it migrating: excused, grace from now.
        assert!(due(&r, Instant::now(), |_| Some((high(), true))).is_empty());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(
            due(&r, Instant::now(), |_| Some((high(), false))).is_empty(),
            "in grace"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(due(&r, Instant::now(), |_| Some((high(), false))).len(), 1);
        // libvirt says paused for a snapshot: excused again.
        r.finish("vm1", Outcome::Excused, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(due(&r, Instant::now(), |_| Some((high(), false))).is_empty());
        // Monitoring off, or not a cluster VM: never due.
        tokio::time::advance(Duration::from_secs(60)).await;
        let off = HealthSettings {
            monitoring: false,
            ..high()
        };
        assert!(due(&r, Instant::now(), |_| Some((off, false))).is_empty());
        assert!(due(&r, Instant::now(), |_| None).is_empty());
        assert_eq!(due(&r, Instant::now(), |_| Some((high(), false))).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unhealthy_application_is_acted_on_once_per_change() {
        let r = registry_with("vm1");
        let restart = HealthSettings {
            app_action: AppAction::Restart,
            ..high()
        };
        r.app_verdict("vm1", true, "");
        assert!(due(&r, Instant::now(), |_| Some((restart, false))).is_empty());
        r.app_verdict("vm1", false, "hook 50-lab exited with status 1");
        let todo = due(&r, Instant::now(), |_| Some((restart, false)));
        assert_eq!(todo[0].2, Check::App("hook 50-lab exited with status 1".into()));
        r.finish("vm1", Outcome::Retry, Duration::from_secs(10));
        // Repeated verdicts (every tenth heartbeat) are not new failures.
        r.app_verdict("vm1", false, "hook 50-lab exited with status 1");
        assert!(due(&r, Instant::now(), |_| Some((restart, false))).is_empty());
        r.app_verdict("vm1", true, "");
        r.app_verdict("vm1", false, "again");
        assert_eq!(due(&r, Instant::now(), |_| Some((restart, false))).len(), 1);
        // ignore: never due.
        r.finish("vm1", Outcome::Retry, Duration::from_secs(10));
        r.app_verdict("vm1", true, "");
        r.app_verdict("vm1", false, "again");
        let ignore = HealthSettings {
            app_action: AppAction::Ignore,
            ..high()
        };
        assert!(due(&r, Instant::now(), |_| Some((ignore, false))).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_reset_limit_stops_a_loop() {
        let r = Registry::default();
        let s = high();
        for _ in 0..s.sensitivity.max_resets() {
            assert!(r.try_reset("vm1", &s));
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        assert!(!r.try_reset("vm1", &s), "a fourth reset within the hour");
        assert!(r.try_reset("vm2", &s), "per VM");
        tokio::time::advance(s.sensitivity.window()).await;
        assert!(r.try_reset("vm1", &s), "the window slid");
    }
}
