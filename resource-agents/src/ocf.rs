//! The OCF resource-agent protocol: actions, exit codes, the environment Pacemaker passes, and
//! exit reasons.

use std::time::Duration;

/// OCF exit codes (OCF resource agent API 1.1, "Exit Status Codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcfStatus {
    /// 0: the action succeeded (monitor: the resource runs here).
    Success,
    /// 1: soft error; Pacemaker recovers (restart, or fence after a failed stop).
    ErrGeneric,
    /// 2: incorrect arguments: a hard error on this node.
    ErrArgs,
    /// 3: the action is not implemented.
    ErrUnimplemented,
    /// 4: insufficient privileges.
    ErrPerm,
    /// 5: something this node needs is missing: hard error on this node only.
    ErrInstalled,
    /// 6: the resource configuration is invalid: fatal, stops the resource everywhere.
    ErrConfigured,
    /// 7: monitor/probe only: cleanly stopped here.
    NotRunning,
}

impl OcfStatus {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            OcfStatus::Success => 0,
            OcfStatus::ErrGeneric => 1,
            OcfStatus::ErrArgs => 2,
            OcfStatus::ErrUnimplemented => 3,
            OcfStatus::ErrPerm => 4,
            OcfStatus::ErrInstalled => 5,
            OcfStatus::ErrConfigured => 6,
            OcfStatus::NotRunning => 7,
        }
    }
}

/// An action named by the agent's single argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    /// `monitor` and its LSB-style alias `status`.
    Monitor,
    MetaData,
    ValidateAll,
    MigrateTo,
    MigrateFrom,
    ReloadAgent,
    /// `usage` and `help`.
    Usage,
}

impl Action {
    /// Every action the agent knows.
    pub const ALL: [Action; 9] = [
        Action::Start,
        Action::Stop,
        Action::Monitor,
        Action::MetaData,
        Action::ValidateAll,
        Action::MigrateTo,
        Action::MigrateFrom,
        Action::ReloadAgent,
        Action::Usage,
    ];

    /// Parses an action argument; `None` for an action this agent does not implement.
    pub fn parse(arg: &str) -> Option<Action> {
        Some(match arg {
            "start" => Action::Start,
            "stop" => Action::Stop,
            "monitor" | "status" => Action::Monitor,
            "meta-data" => Action::MetaData,
            "validate-all" => Action::ValidateAll,
            "migrate_to" => Action::MigrateTo,
            "migrate_from" => Action::MigrateFrom,
            "reload-agent" => Action::ReloadAgent,
            "usage" | "help" => Action::Usage,
            _ => return None,
        })
    }

    /// The canonical action name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Monitor => "monitor",
            Action::MetaData => "meta-data",
            Action::ValidateAll => "validate-all",
            Action::MigrateTo => "migrate_to",
            Action::MigrateFrom => "migrate_from",
            Action::ReloadAgent => "reload-agent",
            Action::Usage => "usage",
        }
    }

    /// The timeout assumed when Pacemaker passes none (`OCF_RESKEY_CRM_meta_timeout` unset);
    /// it matches the meta-data hints except for monitor, which assumes Pacemaker's 20 s default.
    pub fn default_timeout(self) -> Duration {
        Duration::from_secs(match self {
            Action::Start | Action::Stop => 90,
            Action::Monitor => 20,
            Action::MigrateTo => 120,
            Action::MigrateFrom => 60,
            Action::ValidateAll | Action::ReloadAgent => 10,
            Action::MetaData | Action::Usage => 5,
        })
    }
}

/// The usage line printed by `usage`/`help` and on a bad invocation.
pub const USAGE: &str = "usage: VirtualMachine \
{start|stop|monitor|status|migrate_to|migrate_from|reload-agent|validate-all|meta-data|usage}";

/// How thorough a monitor is (`OCF_CHECK_LEVEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLevel {
    /// 0: libvirt's view of the domain state only.
    State,
    /// 10: also a `guest-ping` through the QEMU guest agent.
    GuestAgent,
}

impl CheckLevel {
    /// Maps `OCF_CHECK_LEVEL`; an unsupported level falls back to the next lower supported one
    /// (OCF 1.1 "Check Levels"), and anything unparsable to the lightest check.
    pub fn from_env_value(value: Option<&str>) -> CheckLevel {
        match value.and_then(|v| v.trim().parse::<u32>().ok()) {
            Some(level) if level >= 10 => CheckLevel::GuestAgent,
            _ => CheckLevel::State,
        }
    }
}

/// What Pacemaker tells the agent about the operation (everything but instance parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcfEnv {
    /// `OCF_RESKEY_CRM_meta_timeout` (ms); `None` when unset or unparsable.
    pub timeout: Option<Duration>,
    /// `OCF_RESKEY_CRM_meta_interval` (ms); zero for probes and one-shot operations.
    pub interval: Duration,
    /// `OCF_CHECK_LEVEL`.
    pub check_level: CheckLevel,
    /// `OCF_RESKEY_CRM_meta_migrate_target`: the node a migration goes to.
    pub migrate_target: Option<String>,
    /// `OCF_RESKEY_CRM_meta_migrate_source`: the node a migration comes from.
    pub migrate_source: Option<String>,
    /// `OCF_RESOURCE_INSTANCE`: the resource's name in the cluster.
    pub resource_instance: Option<String>,
}

impl OcfEnv {
    /// Reads the OCF variables through `get` (the process environment in production). Empty
    /// values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> OcfEnv {
        let get = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        let millis = |key: &str| {
            get(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        };
        OcfEnv {
            timeout: millis("OCF_RESKEY_CRM_meta_timeout").filter(|t| !t.is_zero()),
            interval: millis("OCF_RESKEY_CRM_meta_interval").unwrap_or_default(),
            check_level: CheckLevel::from_env_value(get("OCF_CHECK_LEVEL").as_deref()),
            migrate_target: get("OCF_RESKEY_CRM_meta_migrate_target"),
            migrate_source: get("OCF_RESKEY_CRM_meta_migrate_source"),
            resource_instance: get("OCF_RESOURCE_INSTANCE"),
        }
    }

    /// A monitor with interval 0 is a probe: "is it running here?" rather than "is it healthy?".
    pub fn is_probe(&self) -> bool {
        self.interval.is_zero()
    }

    /// The operation's timeout, or the action's default when Pacemaker passed none.
    pub fn timeout_for(&self, action: Action) -> Duration {
        self.timeout.unwrap_or_else(|| action.default_timeout())
    }
}

/// Formats the line Pacemaker shows as the failure reason: `ocf-exit-reason:` and one line of
/// text (line breaks and other control characters become spaces).
pub fn exit_reason_line(reason: &str) -> String {
    let text: String = reason
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("ocf-exit-reason:{text}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> OcfEnv {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        OcfEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn exit_codes_match_the_ocf_table() {
        let table = [
            (OcfStatus::Success, 0),
            (OcfStatus::ErrGeneric, 1),
            (OcfStatus::ErrArgs, 2),
            (OcfStatus::ErrUnimplemented, 3),
            (OcfStatus::ErrPerm, 4),
            (OcfStatus::ErrInstalled, 5),
            (OcfStatus::ErrConfigured, 6),
            (OcfStatus::NotRunning, 7),
        ];
        for (status, code) in table {
            assert_eq!(status.code(), code, "{status:?}");
        }
    }

    #[test]
    fn actions_parse_with_aliases() {
        let table = [
            ("start", Some(Action::Start)),
            ("stop", Some(Action::Stop)),
            ("monitor", Some(Action::Monitor)),
            ("status", Some(Action::Monitor)),
            ("meta-data", Some(Action::MetaData)),
            ("validate-all", Some(Action::ValidateAll)),
            ("migrate_to", Some(Action::MigrateTo)),
            ("migrate_from", Some(Action::MigrateFrom)),
            ("reload-agent", Some(Action::ReloadAgent)),
            ("usage", Some(Action::Usage)),
            ("help", Some(Action::Usage)),
            ("reload", None),
            ("promote", None),
            ("START", None),
            ("", None),
        ];
        for (arg, expected) in table {
            assert_eq!(Action::parse(arg), expected, "{arg:?}");
        }
    }

    #[test]
    fn action_names_round_trip() {
        for action in Action::ALL {
            assert_eq!(Action::parse(action.name()), Some(action));
        }
    }

    #[test]
    fn check_levels_fall_back_to_the_next_lower_supported() {
        let table = [
            (None, CheckLevel::State),
            (Some("0"), CheckLevel::State),
            (Some("5"), CheckLevel::State),
            (Some("10"), CheckLevel::GuestAgent),
            (Some("20"), CheckLevel::GuestAgent),
            (Some(" 10 "), CheckLevel::GuestAgent),
            (Some("heavy"), CheckLevel::State),
            (Some("-10"), CheckLevel::State),
        ];
        for (value, expected) in table {
            assert_eq!(CheckLevel::from_env_value(value), expected, "{value:?}");
        }
    }

    #[test]
    fn environment_is_read_in_milliseconds() {
        let e = env(&[
            ("OCF_RESKEY_CRM_meta_timeout", "20000"),
            ("OCF_RESKEY_CRM_meta_interval", "10000"),
            ("OCF_CHECK_LEVEL", "10"),
            ("OCF_RESKEY_CRM_meta_migrate_target", "node2"),
            ("OCF_RESKEY_CRM_meta_migrate_source", "node1"),
            ("OCF_RESOURCE_INSTANCE", "vm-web"),
        ]);
        assert_eq!(e.timeout, Some(Duration::from_secs(20)));
        assert_eq!(e.interval, Duration::from_secs(10));
        assert!(!e.is_probe());
        assert_eq!(e.check_level, CheckLevel::GuestAgent);
        assert_eq!(e.migrate_target.as_deref(), Some("node2"));
        assert_eq!(e.migrate_source.as_deref(), Some("node1"));
        assert_eq!(e.resource_instance.as_deref(), Some("vm-web"));
    }

    #[test]
    fn empty_or_bad_values_count_as_unset() {
        let e = env(&[
            ("OCF_RESKEY_CRM_meta_timeout", "soon"),
            ("OCF_RESKEY_CRM_meta_interval", ""),
            ("OCF_RESKEY_CRM_meta_migrate_target", " "),
        ]);
        assert_eq!(e.timeout, None);
        assert!(e.is_probe());
        assert_eq!(e.migrate_target, None);
        assert_eq!(e.timeout_for(Action::Monitor), Duration::from_secs(20));
        assert_eq!(e.timeout_for(Action::Stop), Duration::from_secs(90));
        let zero = env(&[("OCF_RESKEY_CRM_meta_timeout", "0")]);
        assert_eq!(zero.timeout, None, "a zero timeout would leave no time at all");
    }

    #[test]
    fn exit_reason_is_a_single_line() {
        assert_eq!(
            exit_reason_line("VM 'a': virDomainCreateXML failed:\nline two\r\n"),
            "ocf-exit-reason:VM 'a': virDomainCreateXML failed: line two"
        );
    }
}
