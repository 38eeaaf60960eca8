//! VM and application health: the per-VM settings (resource parameters of `ocf:vmha:VirtualMachine`,
//! read by the agent's validation, by vmhad and by `vmha vm show`) and the rules vmhad applies.
//!
//! vmha-guest sends a heartbeat on the guest channel every second ([`crate::guest::GuestMessage::Heartbeat`]).
//! vmhad follows them per VM: a VM that sent at least one heartbeat on its current channel (a VM without
//! vmha-guest, or with an older one, is never monitored) and whose heartbeats then stop for longer than
//! its sensitivity's threshold is **hung**, unless something paused it on purpose (libvirt shows it paused
//! for a migration, a save, a snapshot, a dump or by an operator, or the CIB shows it migrating): then the
//! grace period starts again from when it was last seen paused. The grace period also runs after the
//! channel connects (a start, a restore, an arrival). A hung VM is failed through Pacemaker with the
//! reason, so Pacemaker's recovery applies (restart in place; elsewhere after `migration-threshold`
//! failures), at most `max_resets` times per window; beyond that it is only reported.
//!
//! Application health: vmha-guest runs `/etc/vmha/health.d/*`; after their threshold of consecutive
//! failures it reports the application unhealthy ([`crate::guest::GuestMessage::Health`]), and vmhad
//! applies the VM's [`AppAction`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// `health_monitoring`: follow the VM's heartbeats and reset it when they stop (default false: a reset is
/// destructive, so it is the operator's choice per VM, as VM monitoring is in vSphere HA).
pub const PARAM_MONITORING: &str = "health_monitoring";
/// `health_sensitivity`: low, medium (default) or high.
pub const PARAM_SENSITIVITY: &str = "health_sensitivity";
/// `health_grace`: seconds after the channel connects or a pause ends before a silence counts.
pub const PARAM_GRACE: &str = "health_grace";
/// `health_app_action`: what an unhealthy application report does.
pub const PARAM_APP_ACTION: &str = "health_app_action";

/// The default grace period (seconds).
pub const DEFAULT_GRACE_S: u64 = 30;
/// The longest grace period (seconds).
pub const MAX_GRACE_S: u64 = 3600;

/// How quickly a silent guest is declared hung, and how often it may be reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sensitivity {
    Low,
    Medium,
    High,
}

impl Sensitivity {
    pub const NAMES: &'static [&'static str] = &["low", "medium", "high"];

    pub fn parse(s: &str) -> Option<Sensitivity> {
        match s {
            "low" => Some(Sensitivity::Low),
            "medium" => Some(Sensitivity::Medium),
            "high" => Some(Sensitivity::High),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Low => "low",
            Sensitivity::Medium => "medium",
            Sensitivity::High => "high",
        }
    }

    /// How long heartbeats may stop before the VM is hung.
    pub fn threshold(self) -> Duration {
        match self {
            Sensitivity::Low => Duration::from_secs(60),
            Sensitivity::Medium => Duration::from_secs(20),
            Sensitivity::High => Duration::from_secs(5),
        }
    }

    /// At most this many resets per [`Sensitivity::window`]; later hangs are only reported.
    pub fn max_resets(self) -> usize {
        3
    }

    pub fn window(self) -> Duration {
        match self {
            Sensitivity::Low => Duration::from_secs(7 * 24 * 3600),
            Sensitivity::Medium => Duration::from_secs(24 * 3600),
            Sensitivity::High => Duration::from_secs(3600),
        }
    }
}

/// What vmhad does when a guest reports its application unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppAction {
    /// Nothing (logged at debug level).
    Ignore,
    /// A log line and a D-Bus Event; the VM keeps running.
    Report,
    /// The VM is failed through Pacemaker, which restarts it (in place, or elsewhere after
    /// `migration-threshold` failures).
    Restart,
    /// The VM is failed through Pacemaker and its fail count on this host set to INFINITY: Pacemaker
    /// restarts it on another host.
    RestartElsewhere,
}

impl AppAction {
    pub const NAMES: &'static [&'static str] = &["ignore", "report", "restart", "restart-elsewhere"];

    pub fn parse(s: &str) -> Option<AppAction> {
        match s {
            "ignore" => Some(AppAction::Ignore),
            "report" => Some(AppAction::Report),
            "restart" => Some(AppAction::Restart),
            "restart-elsewhere" => Some(AppAction::RestartElsewhere),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AppAction::Ignore => "ignore",
            AppAction::Report => "report",
            AppAction::Restart => "restart",
            AppAction::RestartElsewhere => "restart-elsewhere",
        }
    }
}

/// A VM's health settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    pub monitoring: bool,
    pub sensitivity: Sensitivity,
    pub grace: Duration,
    pub app_action: AppAction,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            monitoring: false,
            sensitivity: Sensitivity::Medium,
            grace: Duration::from_secs(DEFAULT_GRACE_S),
            app_action: AppAction::Report,
        }
    }
}

/// An invalid health parameter: its name, value and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter {name}={value:?} is invalid: expected {expected}")]
pub struct HealthParamError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" => Some(true),
        "0" | "false" | "no" | "off" | "n" => Some(false),
        _ => None,
    }
}

impl HealthSettings {
    /// Reads the settings from a parameter lookup (`get(name)`; empty or unset: the default), strictly.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<HealthSettings, HealthParamError> {
        let d = HealthSettings::default();
        let raw = |name: &str| get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let bad =
            |name: &'static str, value: String, expected: &'static str| HealthParamError { name, value, expected };
        let monitoring = match raw(PARAM_MONITORING) {
            None => d.monitoring,
            Some(v) => parse_bool(&v).ok_or_else(|| bad(PARAM_MONITORING, v, "a boolean"))?,
        };
        let sensitivity = match raw(PARAM_SENSITIVITY) {
            None => d.sensitivity,
            Some(v) => Sensitivity::parse(&v).ok_or_else(|| bad(PARAM_SENSITIVITY, v, "low, medium or high"))?,
        };
        let grace = match raw(PARAM_GRACE) {
            None => d.grace,
            Some(v) => match v.parse::<u64>() {
                Ok(s) if s <= MAX_GRACE_S => Duration::from_secs(s),
                _ => return Err(bad(PARAM_GRACE, v, "0 to 3600 (seconds)")),
            },
        };
        let app_action = match raw(PARAM_APP_ACTION) {
            None => d.app_action,
            Some(v) => AppAction::parse(&v)
                .ok_or_else(|| bad(PARAM_APP_ACTION, v, "ignore, report, restart or restart-elsewhere"))?,
        };
        Ok(HealthSettings {
            monitoring,
            sensitivity,
            grace,
            app_action,
        })
    }

    /// The settings of a VM from its resource parameters; invalid values fall back to their defaults
    /// (the agent's validation refuses them; vmhad must not stop monitoring over a typo) and are
    /// returned as errors beside.
    pub fn from_params(params: &BTreeMap<String, String>) -> (HealthSettings, Vec<HealthParamError>) {
        let mut errors = Vec::new();
        let mut settings = HealthSettings::default();
        for name in [PARAM_MONITORING, PARAM_SENSITIVITY, PARAM_GRACE, PARAM_APP_ACTION] {
            let one = HealthSettings::parse(|n| (n == name).then(|| params.get(n).cloned()).flatten());
            match one {
                Ok(s) => match name {
                    PARAM_MONITORING => settings.monitoring = s.monitoring,
                    PARAM_SENSITIVITY => settings.sensitivity = s.sensitivity,
                    PARAM_GRACE => settings.grace = s.grace,
                    _ => settings.app_action = s.app_action,
                },
                Err(e) => errors.push(e),
            }
        }
        (settings, errors)
    }

    /// What `vmha vm show` and the D-Bus property `Health` show: string keys and values.
    pub fn summary(&self) -> BTreeMap<String, String> {
        let s = self.sensitivity;
        [
            ("monitoring", if self.monitoring { "on" } else { "off" }.to_string()),
            ("sensitivity", s.as_str().to_string()),
            ("threshold_s", s.threshold().as_secs().to_string()),
            ("max_resets", s.max_resets().to_string()),
            ("reset_window_s", s.window().as_secs().to_string()),
            ("grace_s", self.grace.as_secs().to_string()),
            ("app_action", self.app_action.as_str().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Why libvirt shows a domain paused, as far as health monitoring cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainRun {
    /// Running: its vCPUs should run, so should the guest.
    Running,
    /// Paused on purpose (migration, save, snapshot, dump, an operator's suspend, starting up, shutting
    /// down, post-copy): silence is expected.
    PausedOnPurpose(&'static str),
    /// Paused for another reason (unknown — e.g. its vCPUs stopped behind libvirt's back —, an I/O error,
    /// a watchdog, a crash): silence counts.
    PausedOtherwise(&'static str),
    /// Not running (shut off, crashed, being shut down, gone): not vmhad's to reset; the lifecycle
    /// events report a failure.
    NotRunning,
}

/// Classifies libvirt's `virDomainState` and, when paused, its `virDomainPausedReason`.
pub fn classify_domain_state(state: u32, reason: i32) -> DomainRun {
    // virDomainState: 1 running, 2 blocked, 3 paused, 7 pmsuspended; virDomainPausedReason values.
    match state {
        1 | 2 => DomainRun::Running,
        3 => match reason {
            1 => DomainRun::PausedOnPurpose("user"),
            2 => DomainRun::PausedOnPurpose("migration"),
            3 => DomainRun::PausedOnPurpose("save"),
            4 => DomainRun::PausedOnPurpose("dump"),
            5 => DomainRun::PausedOtherwise("I/O error"),
            6 => DomainRun::PausedOtherwise("watchdog"),
            7 => DomainRun::PausedOnPurpose("restored from a snapshot"),
            8 => DomainRun::PausedOnPurpose("shutting down"),
            9 => DomainRun::PausedOnPurpose("snapshot"),
            10 => DomainRun::PausedOtherwise("crashed"),
            11 => DomainRun::PausedOnPurpose("starting up"),
            12 => DomainRun::PausedOnPurpose("post-copy migration"),
            13 => DomainRun::PausedOtherwise("failed post-copy migration"),
            14 => DomainRun::PausedOtherwise("API error"),
            _ => DomainRun::PausedOtherwise("unknown reason"),
        },
        // Suspended to RAM by the guest itself: it cannot send heartbeats and is not hung.
        7 => DomainRun::PausedOnPurpose("guest power management suspend"),
        _ => DomainRun::NotRunning,
    }
}

/// The reset history of one VM on this host: at most `max` resets per sliding window.
#[derive(Debug, Clone)]
pub struct ResetLimit<T> {
    times: Vec<T>,
}

impl<T> Default for ResetLimit<T> {
    fn default() -> Self {
        ResetLimit { times: Vec::new() }
    }
}

impl<T: Copy> ResetLimit<T> {
    /// Records a reset at `now` if fewer than `max` of the recorded ones are still `in_window`; false
    /// (nothing recorded) when the limit is reached.
    pub fn try_reset(&mut self, now: T, max: usize, in_window: impl Fn(&T) -> bool) -> bool {
        self.times.retain(|t| in_window(t));
        if self.times.len() >= max {
            return false;
        }
        self.times.push(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_and_presets() {
        let (s, errors) = HealthSettings::from_params(&BTreeMap::new());
        assert!(errors.is_empty());
        assert_eq!(s, HealthSettings::default());
        assert!(!s.monitoring, "resetting hung guests is opt-in");
        assert_eq!(s.sensitivity, Sensitivity::Medium);
        assert_eq!(s.app_action, AppAction::Report);
        assert!(Sensitivity::High.threshold() < Sensitivity::Medium.threshold());
        assert!(Sensitivity::Medium.threshold() < Sensitivity::Low.threshold());
        assert!(Sensitivity::High.window() < Sensitivity::Low.window());
        let summary = s.summary();
        assert_eq!(summary["monitoring"], "off");
        assert_eq!(summary["threshold_s"], "20");
        assert_eq!(summary["app_action"], "report");
    }

    #[test]
    fn parameters_are_parsed_and_bad_ones_named() {
        let (s, errors) = HealthSettings::from_params(&params(&[
            ("health_monitoring", "off"),
            ("health_sensitivity", "high"),
            ("health_grace", "5"),
            ("health_app_action", "restart-elsewhere"),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            s,
            HealthSettings {
                monitoring: false,
                sensitivity: Sensitivity::High,
                grace: Duration::from_secs(5),
                app_action: AppAction::RestartElsewhere,
            }
        );
        // Hostile or mistyped values: each named, the rest still read, the bad ones at their defaults.
        let (s, errors) = HealthSettings::from_params(&params(&[
            ("health_monitoring", "maybe"),
            ("health_sensitivity", "HIGH"),
            ("health_grace", "3601"),
            ("health_app_action", "reboot; rm -rf /"),
        ]));
        assert_eq!(s, HealthSettings::default());
        let names: Vec<&str> = errors.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [PARAM_MONITORING, PARAM_SENSITIVITY, PARAM_GRACE, PARAM_APP_ACTION]
        );
        assert_eq!(
            errors[2].to_string(),
            "parameter health_grace=\"3601\" is invalid: expected 0 to 3600 (seconds)"
        );
        for grace in ["-1", "1.5", "", " 7 "] {
            let r = HealthSettings::parse(|n| (n == PARAM_GRACE).then(|| grace.to_string()));
            match grace {
                "" => assert_eq!(r.unwrap().grace, Duration::from_secs(DEFAULT_GRACE_S)),
                " 7 " => assert_eq!(r.unwrap().grace, Duration::from_secs(7)),
                _ => assert!(r.is_err(), "{grace:?}"),
            }
        }
    }

    #[test]
    fn only_unexplained_pauses_count_as_silence() {
        assert_eq!(classify_domain_state(1, 1), DomainRun::Running);
        for (reason, why) in [
            (1, "user"),
            (2, "migration"),
            (3, "save"),
            (9, "snapshot"),
            (12, "post-copy migration"),
        ] {
            assert_eq!(classify_domain_state(3, reason), DomainRun::PausedOnPurpose(why));
        }
        assert_eq!(
            classify_domain_state(3, 0),
            DomainRun::PausedOtherwise("unknown reason")
        );
        assert_eq!(classify_domain_state(3, 5), DomainRun::PausedOtherwise("I/O error"));
        assert_eq!(
            classify_domain_state(3, 999),
            DomainRun::PausedOtherwise("unknown reason")
        );
        assert!(matches!(classify_domain_state(7, 0), DomainRun::PausedOnPurpose(_)));
        for state in [0, 4, 5, 6, 99] {
            assert_eq!(classify_domain_state(state, 0), DomainRun::NotRunning, "{state}");
        }
    }

    #[test]
    fn the_reset_limit_slides_with_its_window() {
        let mut limit = ResetLimit::default();
        let window = |now: u64| move |t: &u64| now - *t < 100;
        // Three resets at 1000, 1010, 1020 allowed, the fourth at 1030 refused (window 100).
        for t in [1000u64, 1010, 1020] {
            assert!(limit.try_reset(t, 3, window(t)));
        }
        assert!(!limit.try_reset(1030, 3, window(1030)));
        // Once the first one left the window, one more.
        assert!(limit.try_reset(1100, 3, window(1100)));
        assert!(!limit.try_reset(1101, 3, window(1101)));
    }
}
