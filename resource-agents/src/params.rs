//! Instance parameters (`OCF_RESKEY_<name>`): the table that documents them in the meta-data, and
//! their parsing and validation into [`Params`].

use std::path::PathBuf;
use std::time::Duration;

/// The type of a parameter as the meta-data advertises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    String,
    Integer,
    Boolean,
    /// One of a fixed set of values.
    Select(&'static [&'static str]),
}

/// One instance parameter: everything the meta-data says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    /// The value used when the parameter is unset, as written in the meta-data.
    pub default: &'static str,
    /// Whether a change takes effect through `reload-agent`, without restarting the VM.
    pub reloadable: bool,
    /// OCF 1.1 `unique-group`: no two resources may share the values of a group.
    pub unique_group: Option<&'static str>,
    pub shortdesc: &'static str,
    pub longdesc: &'static str,
}

/// The hypervisor URI used when `hypervisor` is unset.
pub const DEFAULT_HYPERVISOR: &str = "qemu:///system";
/// The guest-agent deadline used by a depth-10 monitor when `monitor_guest_agent_timeout` is unset.
pub const DEFAULT_GUEST_AGENT_TIMEOUT: Duration = Duration::from_millis(2000);
/// How long migrate_to waits for the guest's answer to the `migrate` request when
/// `guest_migrate_timeout` is unset.
pub const DEFAULT_GUEST_MIGRATE_TIMEOUT: Duration = Duration::from_millis(10_000);

const SHUTDOWN_MODES: &[&str] = &["acpi", "agent", "both"];

/// Every parameter the agent accepts, in meta-data order.
pub const PARAMETERS: &[ParamSpec] = &[
    ParamSpec {
        name: "config",
        kind: ParamKind::String,
        default: "",
        reloadable: false,
        unique_group: Some("config"),
        shortdesc: "Domain XML file (on shared storage)",
        longdesc: "Absolute path of the libvirt domain XML that defines the VM, readable on every \
node that may run it (shared storage or a synchronised copy). start creates a transient domain \
from it (virDomainCreateXML): the domain exists in libvirt only while it runs, so no stale \
definition lingers on other hosts. If unset, 'domain' must name a domain already defined on each \
node. On a node where the file is missing, probes report the VM as not running.",
    },
    ParamSpec {
        name: "domain",
        kind: ParamKind::String,
        default: "",
        reloadable: false,
        unique_group: Some("domain"),
        shortdesc: "Domain name",
        longdesc: "Name of the libvirt domain. Without 'config' it names a domain defined \
persistently on every node that may run it; start boots that definition (virDomainCreate). With \
'config' it must equal the name in the XML; setting it lets monitor and stop work without reading \
the file.",
    },
    ParamSpec {
        name: "hypervisor",
        kind: ParamKind::String,
        default: DEFAULT_HYPERVISOR,
        reloadable: false,
        unique_group: None,
        shortdesc: "Hypervisor URI",
        longdesc: "libvirt connection URI of the local hypervisor.",
    },
    ParamSpec {
        name: "force_stop",
        kind: ParamKind::Boolean,
        default: "false",
        reloadable: true,
        unique_group: None,
        shortdesc: "Destroy instead of shutting down",
        longdesc: "If true, stop destroys the domain at once (like pulling the power cord) \
instead of asking the guest to shut down first. Cannot be combined with save_on_stop.",
    },
    ParamSpec {
        name: "shutdown_mode",
        kind: ParamKind::Select(SHUTDOWN_MODES),
        default: "acpi",
        reloadable: true,
        unique_group: None,
        shortdesc: "How stop asks the guest to shut down",
        longdesc: "acpi: press the virtual power button; agent: ask the QEMU guest agent; both: \
the guest agent first, ACPI if that fails. If the hypervisor driver does not support the chosen \
method, the driver's default shutdown method is used instead.",
    },
    ParamSpec {
        name: "shutdown_timeout",
        kind: ParamKind::Integer,
        default: "0",
        reloadable: true,
        unique_group: None,
        shortdesc: "Graceful shutdown budget (seconds)",
        longdesc: "Seconds stop waits for the guest to power off before it destroys the domain. \
0 means automatic: the stop timeout minus a reserve for destroying the domain and answering \
Pacemaker (a third of the timeout, at least 5 s and at most 30 s). Larger values are capped to \
keep that reserve.",
    },
    ParamSpec {
        name: "save_on_stop",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "Directory for saved memory state",
        longdesc: "If set, stop saves the running VM's memory to <dir>/<domain>.state \
(virDomainSaveFlags) instead of shutting the guest down, and start restores from that file and \
deletes it. Put the directory on shared storage so the VM can resume on any node. If the save \
fails, stop falls back to shutdown and destroy.",
    },
    ParamSpec {
        name: "start_networks",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "libvirt networks to start first",
        longdesc: "Space- or comma-separated names of libvirt networks that start activates \
before the domain if they are not active.",
    },
    ParamSpec {
        name: "start_pools",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "libvirt storage pools to start first",
        longdesc: "Space- or comma-separated names of libvirt storage pools that start activates \
(or refreshes, if already active) before the domain.",
    },
    ParamSpec {
        name: "start_resources",
        kind: ParamKind::Boolean,
        default: "false",
        reloadable: true,
        unique_group: None,
        shortdesc: "Start the networks and pools the config uses",
        longdesc: "If true, start also activates every libvirt network (<interface \
type='network'>) and storage pool (<disk type='volume'>) that the 'config' XML refers to, in \
addition to start_networks and start_pools.",
    },
    ParamSpec {
        name: "guest_channel",
        kind: ParamKind::Boolean,
        default: "true",
        reloadable: true,
        unique_group: None,
        shortdesc: "Add vmha's guest channel",
        longdesc: "When start creates the domain from config and its XML has no virtio-serial channel named \
org.vmha.guest.0, add one whose host side is the socket vmhad connects to \
(/var/lib/libvirt/qemu/vmha.<domain>.guest.0), so that vmha-guest inside the VM receives cluster events \
and requests. The file on shared storage is not changed.",
    },
    ParamSpec {
        name: "migration_transport",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "Transport to the target's libvirtd",
        longdesc: "Transport of the libvirt connection to the migration target, such as ssh, \
tcp or tls: the target URI becomes <driver>+<transport>://<target>/<path>. Unset: the transport \
of 'hypervisor', if any, else libvirt's default for remote hosts (tls).",
    },
    ParamSpec {
        name: "migration_user",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "User for the target's libvirtd",
        longdesc: "User name put into the target URI (<user>@<target>), for example for ssh. \
Ignored when remote_uri is set.",
    },
    ParamSpec {
        name: "migration_network_suffix",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "Host name suffix of the migration network",
        longdesc: "Suffix added to the target node's name to reach it over a dedicated \
migration network; for a fully qualified name it goes before the first dot (node2.example.com \
with -mig gives node2-mig.example.com). Used for the target URI and, for QEMU, for the migration \
data stream (tcp://<name>).",
    },
    ParamSpec {
        name: "remote_uri",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "Explicit target libvirt URI",
        longdesc: "libvirt URI of the migration target, replacing the one built from \
hypervisor, migration_transport, migration_user and migration_network_suffix. %n stands for the \
target node name.",
    },
    ParamSpec {
        name: "migrate_uri",
        kind: ParamKind::String,
        default: "",
        reloadable: true,
        unique_group: None,
        shortdesc: "Explicit migration data URI",
        longdesc: "Hypervisor URI for the migration data stream (for QEMU, tcp://host[:port]), \
passed as VIR_MIGRATE_PARAM_URI. %n stands for the target node name with \
migration_network_suffix applied. Unset: tcp://<target><suffix> when a suffix is set, otherwise \
the target chooses.",
    },
    ParamSpec {
        name: "migration_speed",
        kind: ParamKind::Integer,
        default: "0",
        reloadable: true,
        unique_group: None,
        shortdesc: "Migration bandwidth limit (MiB/s)",
        longdesc: "Maximum bandwidth of a live migration in MiB/s; 0 leaves the hypervisor's \
default.",
    },
    ParamSpec {
        name: "migration_downtime",
        kind: ParamKind::Integer,
        default: "0",
        reloadable: true,
        unique_group: None,
        shortdesc: "Maximum migration downtime (ms)",
        longdesc: "Longest pause of the guest that the final phase of a live migration may \
cause, in milliseconds; 0 leaves the hypervisor's default.",
    },
    ParamSpec {
        name: "shared_storage",
        kind: ParamKind::Boolean,
        default: "false",
        reloadable: true,
        unique_group: None,
        shortdesc: "Disks are on storage every node shares (migrate even where libvirt cannot tell)",
        longdesc: "Set to true when the operator knows that every disk of the VM is on storage all nodes \
share coherently, but libvirt does not recognise it as shared (it recognises NFS, GFS2, OCFS2, CephFS, \
SMB/CIFS, GPFS, GlusterFS and Quobyte mounts; a cluster file system or a shared directory of another kind \
looks local to it, and it then refuses a live migration as unsafe, so that Pacemaker stops and restarts \
the VM instead). migrate_to then adds VIR_MIGRATE_UNSAFE, which skips all of libvirt's storage safety \
checks (the equivalent of VirtualDomain's migrate_options=--unsafe). Only safe with disks that every \
node reads and writes the same bytes of, and whose host page cache cannot hold stale data: give each \
disk cache='none' or cache='directsync' in the domain XML. Wrong, it corrupts the disks of migrated VMs.",
    },
    ParamSpec {
        name: "monitor_guest_agent_timeout",
        kind: ParamKind::Integer,
        default: "2000",
        reloadable: true,
        unique_group: None,
        shortdesc: "Guest agent deadline of a depth-10 monitor (ms)",
        longdesc: "Milliseconds a monitor with OCF_CHECK_LEVEL=10 waits for the QEMU guest \
agent to answer guest-ping (rounded up to whole seconds for libvirt). Between 1 and 60000.",
    },
    ParamSpec {
        name: "guest_migrate_timeout",
        kind: ParamKind::Integer,
        default: "10000",
        reloadable: true,
        unique_group: None,
        shortdesc: "Wait for the guest before a live migration (ms)",
        longdesc: "Before migrate_to live-migrates the VM, it asks the guest to prepare: the request \
'migrate' (with the source and target hosts) goes through the local vmhad over the vmha guest channel to \
vmha-guest, which runs the VM's migrate hooks. migrate_to waits for the answer at most this many \
milliseconds (and never more than a quarter of the operation's timeout), then migrates whatever the answer \
was: a guest that refuses, fails or does not answer is logged but cannot stop the move (a failed migrate_to \
would make Pacemaker stop and restart the VM instead). When vmhad does not run, the guest is not told. \
0 does not ask the guest. Between 0 and 600000.",
    },
    ParamSpec {
        name: "health_monitoring",
        kind: ParamKind::Boolean,
        default: "false",
        reloadable: true,
        unique_group: None,
        shortdesc: "Reset the VM when its guest hangs (vmha-guest heartbeats)",
        longdesc: "vmha-guest sends a heartbeat on the vmha guest channel every second; the vmhad of the \
host the VM runs on follows them. When true, a VM whose heartbeats stop for longer than its sensitivity's \
threshold while its QEMU runs, and that nothing paused on purpose (libvirt shows it paused for a \
migration, save, snapshot, dump or by an operator, or the CIB shows it migrating), is hung: vmhad fails it \
through Pacemaker with the reason (e.g. 'guest hung: no heartbeat for 5.2 s') and powers it off, and \
Pacemaker's recovery restarts it (in place, or elsewhere after migration-threshold failures). A VM that \
never sent a heartbeat (no vmha-guest, or an older one) is not monitored. Off by default: a reset is \
destructive, so it is chosen per VM. Takes effect without a restart.",
    },
    ParamSpec {
        name: "health_sensitivity",
        kind: ParamKind::Select(vmha_model::health::Sensitivity::NAMES),
        default: "medium",
        reloadable: true,
        unique_group: None,
        shortdesc: "How quickly a silent guest is hung, and how often it may be reset",
        longdesc: "high: hung after 5 s without a heartbeat, at most 3 resets per hour; medium: 20 s, 3 \
per 24 hours; low: 60 s, 3 per 7 days. Beyond the resets allowed, a hang is only reported (log and D-Bus \
Event vm-hung), so a broken guest cannot loop forever.",
    },
    ParamSpec {
        name: "health_grace",
        kind: ParamKind::Integer,
        default: "30",
        reloadable: true,
        unique_group: None,
        shortdesc: "Seconds of silence allowed after a start, an arrival or a pause (s)",
        longdesc: "After the guest channel connects (the VM started, was restored or arrived by migration) \
and after anything paused the VM on purpose, its heartbeats may be missing this many seconds before a \
silence counts. Between 0 and 3600.",
    },
    ParamSpec {
        name: "health_app_action",
        kind: ParamKind::Select(vmha_model::health::AppAction::NAMES),
        default: "report",
        reloadable: true,
        unique_group: None,
        shortdesc: "What an unhealthy application does (health hooks in the guest)",
        longdesc: "vmha-guest runs the executables in /etc/vmha/health.d inside the guest every 10 s \
(exit 0: healthy); after 3 failed rounds in a row it reports the application unhealthy. ignore: nothing; \
report: a log line and a D-Bus Event vm-app-unhealthy; restart: the VM is failed through Pacemaker with \
the hook's reason and Pacemaker restarts it (in place, or elsewhere after migration-threshold failures); \
restart-elsewhere: its fail count on this host is also set to INFINITY, so Pacemaker restarts it on \
another host (vmha vm cleanup lets it back). Restarts count against health_sensitivity's reset limit.",
    },
];

/// How stop asks the guest to power off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    Acpi,
    Agent,
    Both,
}

impl ShutdownMode {
    /// The `virDomainShutdownFlagValues` bits for this mode.
    pub fn flags(self) -> u32 {
        let acpi = virt_sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN;
        let agent = virt_sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT;
        match self {
            ShutdownMode::Acpi => acpi,
            ShutdownMode::Agent => agent,
            ShutdownMode::Both => acpi | agent,
        }
    }
}

/// Where the migration goes and how (used by `migrate_to`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationParams {
    pub transport: Option<String>,
    pub user: Option<String>,
    pub network_suffix: Option<String>,
    pub remote_uri: Option<String>,
    pub migrate_uri: Option<String>,
    /// MiB/s, 0 = hypervisor default.
    pub speed_mib_s: u64,
    /// Milliseconds, 0 = hypervisor default.
    pub downtime_ms: u64,
    /// The operator declares the disks shared: migrate with `VIR_MIGRATE_UNSAFE`.
    pub shared_storage: bool,
}

/// The validated instance parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub config: Option<PathBuf>,
    pub domain: Option<String>,
    pub hypervisor: String,
    pub force_stop: bool,
    pub shutdown_mode: ShutdownMode,
    /// `None`: automatic share of the stop timeout.
    pub shutdown_timeout: Option<Duration>,
    pub save_on_stop: Option<PathBuf>,
    pub start_networks: Vec<String>,
    pub start_pools: Vec<String>,
    pub start_resources: bool,
    /// Add vmha's guest channel to a domain created from `config`.
    pub guest_channel: bool,
    pub migration: MigrationParams,
    pub guest_agent_timeout: Duration,
    /// How long migrate_to waits for the guest's answer to `migrate`; zero: the guest is not asked.
    pub guest_migrate_timeout: Duration,
    /// Health monitoring (read by vmhad; validated here).
    pub health: vmha_model::health::HealthSettings,
}

/// An invalid parameter value or combination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("parameter {name}={value:?} is invalid: expected {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("parameters force_stop and save_on_stop exclude each other")]
    ForceStopWithSave,
    #[error("neither config nor domain is set: one of them must name the VM")]
    NoIdentity,
}

/// How to treat invalid values of parameters that do not identify the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Every invalid value is an error.
    Strict,
    /// For stop: an invalid behavioural parameter falls back to its default (reported in
    /// [`Parsed::ignored`]) so a bad edit cannot keep a VM from being stopped. Invalid `config`,
    /// `domain` or `hypervisor` values are still errors.
    Lenient,
}

/// The outcome of parsing: parameters plus the errors that [`Strictness::Lenient`] ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub params: Params,
    pub ignored: Vec<ParamError>,
}

impl Params {
    /// Reads `OCF_RESKEY_<name>` for every parameter through `get`. Empty values count as unset.
    pub fn parse(get: impl Fn(&str) -> Option<String>, strictness: Strictness) -> Result<Parsed, ParamError> {
        let raw = |name: &str| {
            get(&format!("OCF_RESKEY_{name}"))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut soft = Leniency {
            strictness,
            ignored: Vec::new(),
        };

        let config = raw("config").map(|v| check_absolute_path("config", v)).transpose()?;
        let domain = raw("domain").map(|v| check_domain_name("domain", v)).transpose()?;
        if config.is_none() && domain.is_none() {
            return Err(ParamError::NoIdentity);
        }
        let hypervisor = match raw("hypervisor") {
            Some(uri) => check_libvirt_uri("hypervisor", uri)?,
            None => DEFAULT_HYPERVISOR.to_owned(),
        };

        let force_stop = soft.apply(optional(raw("force_stop"), |v| parse_bool("force_stop", v)), None)?;
        let shutdown_mode = soft.apply(
            optional(raw("shutdown_mode"), |v| parse_shutdown_mode("shutdown_mode", v)),
            None,
        )?;
        let shutdown_timeout = soft.apply(
            optional(raw("shutdown_timeout"), |v| {
                parse_u64("shutdown_timeout", v, "a number of seconds")
            }),
            None,
        )?;
        let mut save_on_stop = soft.apply(
            optional(raw("save_on_stop"), |v| check_absolute_path("save_on_stop", v)),
            None,
        )?;
        let start_networks = soft.apply(
            optional(raw("start_networks"), |v| parse_name_list("start_networks", &v)),
            None,
        )?;
        let start_pools = soft.apply(
            optional(raw("start_pools"), |v| parse_name_list("start_pools", &v)),
            None,
        )?;
        let start_resources = soft.apply(
            optional(raw("start_resources"), |v| parse_bool("start_resources", v)),
            None,
        )?;
        let guest_channel = soft.apply(optional(raw("guest_channel"), |v| parse_bool("guest_channel", v)), None)?;
        let transport = soft.apply(
            optional(raw("migration_transport"), |v| {
                check_token(
                    "migration_transport",
                    v,
                    is_transport,
                    "a transport such as ssh, tcp or tls",
                )
            }),
            None,
        )?;
        let user = soft.apply(
            optional(raw("migration_user"), |v| {
                check_token("migration_user", v, is_user_name, "a user name")
            }),
            None,
        )?;
        let network_suffix = soft.apply(
            optional(raw("migration_network_suffix"), |v| {
                check_token(
                    "migration_network_suffix",
                    v,
                    is_host_name_part,
                    "letters, digits, '-' and '.'",
                )
            }),
            None,
        )?;
        let remote_uri = soft.apply(
            optional(raw("remote_uri"), |v| check_libvirt_uri("remote_uri", v)),
            None,
        )?;
        let migrate_uri = soft.apply(
            optional(raw("migrate_uri"), |v| {
                check_token("migrate_uri", v, is_data_uri, "a URI such as tcp://%n:49152")
            }),
            None,
        )?;
        let speed_mib_s = soft.apply(
            optional(raw("migration_speed"), |v| {
                parse_u64("migration_speed", v, "MiB/s as a whole number")
            }),
            None,
        )?;
        let downtime_ms = soft.apply(
            optional(raw("migration_downtime"), |v| {
                parse_u64("migration_downtime", v, "milliseconds as a whole number")
            }),
            None,
        )?;
        let shared_storage = soft.apply(
            optional(raw("shared_storage"), |v| parse_bool("shared_storage", v)),
            None,
        )?;
        let guest_agent_ms = soft.apply(
            optional(raw("monitor_guest_agent_timeout"), |v| {
                parse_u64("monitor_guest_agent_timeout", v.clone(), "1 to 60000 (ms)").and_then(|ms| match ms {
                    1..=60_000 => Ok(ms),
                    _ => Err(invalid("monitor_guest_agent_timeout", v, "1 to 60000 (ms)")),
                })
            }),
            None,
        )?;
        let guest_migrate_ms = soft.apply(
            optional(raw("guest_migrate_timeout"), |v| {
                parse_u64("guest_migrate_timeout", v.clone(), "0 to 600000 (ms)").and_then(|ms| match ms {
                    0..=600_000 => Ok(ms),
                    _ => Err(invalid("guest_migrate_timeout", v, "0 to 600000 (ms)")),
                })
            }),
            None,
        )?;

        let health = soft.apply(
            vmha_model::health::HealthSettings::parse(|name| raw(name)).map_err(|e| ParamError::Invalid {
                name: e.name,
                value: e.value,
                expected: e.expected,
            }),
            vmha_model::health::HealthSettings::default(),
        )?;

        if force_stop == Some(true) && save_on_stop.is_some() {
            soft.apply(Err(ParamError::ForceStopWithSave), ())?;
            save_on_stop = None;
        }

        let params = Params {
            config,
            domain,
            hypervisor,
            force_stop: force_stop.unwrap_or(false),
            shutdown_mode: shutdown_mode.unwrap_or(ShutdownMode::Acpi),
            shutdown_timeout: shutdown_timeout.filter(|s| *s > 0).map(Duration::from_secs),
            save_on_stop,
            start_networks: start_networks.unwrap_or_default(),
            start_pools: start_pools.unwrap_or_default(),
            start_resources: start_resources.unwrap_or(false),
            guest_channel: guest_channel.unwrap_or(true),
            migration: MigrationParams {
                transport,
                user,
                network_suffix,
                remote_uri,
                migrate_uri,
                speed_mib_s: speed_mib_s.unwrap_or(0),
                downtime_ms: downtime_ms.unwrap_or(0),
                shared_storage: shared_storage.unwrap_or(false),
            },
            guest_agent_timeout: guest_agent_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_GUEST_AGENT_TIMEOUT),
            guest_migrate_timeout: guest_migrate_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_GUEST_MIGRATE_TIMEOUT),
            health,
        };
        Ok(Parsed {
            params,
            ignored: soft.ignored,
        })
    }

    /// The file that `save_on_stop` uses for this domain.
    pub fn state_file(&self, domain: &str) -> Option<PathBuf> {
        self.save_on_stop
            .as_ref()
            .map(|dir| dir.join(format!("{domain}.state")))
    }
}

/// Applies [`Strictness`] to the result of parsing one behavioural parameter.
struct Leniency {
    strictness: Strictness,
    ignored: Vec<ParamError>,
}

impl Leniency {
    fn apply<T>(&mut self, result: Result<T, ParamError>, default: T) -> Result<T, ParamError> {
        match result {
            Ok(value) => Ok(value),
            Err(e) if self.strictness == Strictness::Lenient => {
                self.ignored.push(e);
                Ok(default)
            }
            Err(e) => Err(e),
        }
    }
}

fn optional<T>(
    value: Option<String>,
    parse: impl FnOnce(String) -> Result<T, ParamError>,
) -> Result<Option<T>, ParamError> {
    value.map(parse).transpose()
}

fn invalid(name: &'static str, value: String, expected: &'static str) -> ParamError {
    ParamError::Invalid { name, value, expected }
}

/// OCF boolean spellings, as `ocf_is_true` accepts them.
fn parse_bool(name: &'static str, value: String) -> Result<bool, ParamError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" | "t" => Ok(true),
        "0" | "false" | "no" | "off" | "n" | "f" => Ok(false),
        _ => Err(invalid(name, value, "true or false")),
    }
}

fn parse_u64(name: &'static str, value: String, expected: &'static str) -> Result<u64, ParamError> {
    value.parse::<u64>().map_err(|_| invalid(name, value, expected))
}

fn parse_shutdown_mode(name: &'static str, value: String) -> Result<ShutdownMode, ParamError> {
    match value.as_str() {
        "acpi" => Ok(ShutdownMode::Acpi),
        "agent" => Ok(ShutdownMode::Agent),
        "both" => Ok(ShutdownMode::Both),
        _ => Err(invalid(name, value, "acpi, agent or both")),
    }
}

fn check_absolute_path(name: &'static str, value: String) -> Result<PathBuf, ParamError> {
    if value.starts_with('/') {
        Ok(PathBuf::from(value))
    } else {
        Err(invalid(name, value, "an absolute path"))
    }
}

/// libvirt rejects '/' in domain names; control characters would garble logs.
fn check_domain_name(name: &'static str, value: String) -> Result<String, ParamError> {
    if value.contains('/') || value.chars().any(char::is_control) {
        Err(invalid(name, value, "a libvirt domain name (no '/')"))
    } else {
        Ok(value)
    }
}

/// A libvirt connection URI: `driver[+transport]://[user@][host][:port]/path[?query]`.
pub fn is_libvirt_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let mut scheme_chars = scheme.chars();
    let scheme_ok = scheme_chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && scheme_chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '+');
    scheme_ok && !scheme.ends_with('+') && !rest.chars().any(char::is_whitespace)
}

fn check_libvirt_uri(name: &'static str, value: String) -> Result<String, ParamError> {
    if is_libvirt_uri(&value) {
        Ok(value)
    } else {
        Err(invalid(
            name,
            value,
            "a libvirt URI such as qemu:///system or qemu+ssh://host/system",
        ))
    }
}

fn check_token(
    name: &'static str,
    value: String,
    valid: fn(&str) -> bool,
    expected: &'static str,
) -> Result<String, ParamError> {
    if valid(&value) {
        Ok(value)
    } else {
        Err(invalid(name, value, expected))
    }
}

fn is_transport(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn is_user_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn is_host_name_part(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
}

fn is_data_uri(s: &str) -> bool {
    s.contains(':') && !s.chars().any(char::is_whitespace)
}

fn parse_name_list(name: &'static str, value: &str) -> Result<Vec<String>, ParamError> {
    let names: Vec<String> = value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.iter().any(|n| n.contains('/')) {
        return Err(invalid(name, value.to_owned(), "libvirt object names"));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_with(pairs: &[(&str, &str)], strictness: Strictness) -> Result<Parsed, ParamError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (format!("OCF_RESKEY_{k}"), v.to_string()))
            .collect();
        Params::parse(|k| map.get(k).cloned(), strictness)
    }

    fn strict(pairs: &[(&str, &str)]) -> Result<Params, ParamError> {
        parse_with(pairs, Strictness::Strict).map(|p| p.params)
    }

    #[test]
    fn defaults_apply_when_only_the_config_is_set() {
        let p = strict(&[("config", "/shared/vm1.xml")]).expect("valid");
        assert_eq!(p.config, Some(PathBuf::from("/shared/vm1.xml")));
        assert_eq!(p.domain, None);
        assert_eq!(p.hypervisor, "qemu:///system");
        assert!(!p.force_stop);
        assert_eq!(p.shutdown_mode, ShutdownMode::Acpi);
        assert_eq!(p.shutdown_timeout, None);
        assert_eq!(p.save_on_stop, None);
        assert_eq!(p.migration, MigrationParams::default());
        assert_eq!(p.guest_agent_timeout, Duration::from_secs(2));
        assert_eq!(p.guest_migrate_timeout, Duration::from_secs(10));
        assert!(p.start_networks.is_empty() && p.start_pools.is_empty());
    }

    #[test]
    fn every_parameter_is_read() {
        let p = strict(&[
            ("config", "/shared/vm1.xml"),
            ("domain", "vm1"),
            ("hypervisor", "qemu+unix:///system?socket=/run/x.sock"),
            ("force_stop", "yes"),
            ("shutdown_mode", "both"),
            ("shutdown_timeout", "45"),
            ("start_networks", "default, mig"),
            ("start_pools", "images"),
            ("start_resources", "1"),
            ("migration_transport", "ssh"),
            ("migration_user", "hauser"),
            ("migration_network_suffix", "-mig"),
            ("remote_uri", "qemu+ssh://%n/system"),
            ("migrate_uri", "tcp://%n:49152"),
            ("migration_speed", "500"),
            ("migration_downtime", "300"),
            ("shared_storage", "yes"),
            ("monitor_guest_agent_timeout", "1500"),
            ("guest_migrate_timeout", "0"),
        ])
        .expect("valid");
        assert_eq!(p.domain.as_deref(), Some("vm1"));
        assert_eq!(p.hypervisor, "qemu+unix:///system?socket=/run/x.sock");
        assert!(p.force_stop);
        assert_eq!(p.shutdown_mode, ShutdownMode::Both);
        assert_eq!(p.shutdown_timeout, Some(Duration::from_secs(45)));
        assert_eq!(p.start_networks, vec!["default", "mig"]);
        assert_eq!(p.start_pools, vec!["images"]);
        assert!(p.start_resources);
        assert_eq!(p.migration.transport.as_deref(), Some("ssh"));
        assert_eq!(p.migration.user.as_deref(), Some("hauser"));
        assert_eq!(p.migration.network_suffix.as_deref(), Some("-mig"));
        assert_eq!(p.migration.remote_uri.as_deref(), Some("qemu+ssh://%n/system"));
        assert_eq!(p.migration.migrate_uri.as_deref(), Some("tcp://%n:49152"));
        assert_eq!(p.migration.speed_mib_s, 500);
        assert_eq!(p.migration.downtime_ms, 300);
        assert!(p.migration.shared_storage);
        assert_eq!(p.guest_agent_timeout, Duration::from_millis(1500));
        assert_eq!(p.guest_migrate_timeout, Duration::ZERO);
    }

    #[test]
    fn invalid_values_name_the_parameter() {
        let table: &[(&[(&str, &str)], &str)] = &[
            (&[], "neither config nor domain"),
            (&[("config", "vm1.xml")], "config="),
            (&[("domain", "a/b")], "domain="),
            (&[("domain", "a"), ("hypervisor", "qemu:/system")], "hypervisor="),
            (&[("domain", "a"), ("hypervisor", "QEMU:///system")], "hypervisor="),
            (&[("domain", "a"), ("hypervisor", "qemu+:///system")], "hypervisor="),
            (&[("domain", "a"), ("force_stop", "maybe")], "force_stop="),
            (&[("domain", "a"), ("shutdown_mode", "reset")], "shutdown_mode="),
            (&[("domain", "a"), ("shutdown_timeout", "-1")], "shutdown_timeout="),
            (&[("domain", "a"), ("save_on_stop", "state")], "save_on_stop="),
            (
                &[("domain", "a"), ("migration_transport", "ssh tcp")],
                "migration_transport=",
            ),
            (&[("domain", "a"), ("migration_user", "1root")], "migration_user="),
            (
                &[("domain", "a"), ("migration_network_suffix", "_x")],
                "migration_network_suffix=",
            ),
            (&[("domain", "a"), ("remote_uri", "node2")], "remote_uri="),
            (&[("domain", "a"), ("migrate_uri", "node2")], "migrate_uri="),
            (&[("domain", "a"), ("migration_speed", "fast")], "migration_speed="),
            (&[("domain", "a"), ("migration_downtime", "1.5")], "migration_downtime="),
            (&[("domain", "a"), ("shared_storage", "maybe")], "shared_storage="),
            (
                &[("domain", "a"), ("monitor_guest_agent_timeout", "0")],
                "monitor_guest_agent_timeout=",
            ),
            (
                &[("domain", "a"), ("guest_migrate_timeout", "600001")],
                "guest_migrate_timeout=",
            ),
            (&[("domain", "a"), ("start_pools", "a/b")], "start_pools="),
            (
                &[("domain", "a"), ("health_monitoring", "sometimes")],
                "health_monitoring=",
            ),
            (
                &[("domain", "a"), ("health_sensitivity", "paranoid")],
                "health_sensitivity=",
            ),
            (&[("domain", "a"), ("health_grace", "86400")], "health_grace="),
            (
                &[("domain", "a"), ("health_app_action", "reboot")],
                "health_app_action=",
            ),
            (
                &[("domain", "a"), ("force_stop", "true"), ("save_on_stop", "/s")],
                "force_stop and save_on_stop",
            ),
        ];
        for (pairs, needle) in table {
            let err = strict(pairs).expect_err(needle);
            assert!(err.to_string().contains(needle), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn lenient_parsing_keeps_defaults_for_behaviour_but_not_identity() {
        let parsed = parse_with(
            &[
                ("domain", "vm1"),
                ("shutdown_mode", "reset"),
                ("migration_speed", "fast"),
                ("force_stop", "true"),
                ("save_on_stop", "/s"),
            ],
            Strictness::Lenient,
        )
        .expect("lenient");
        assert_eq!(parsed.params.shutdown_mode, ShutdownMode::Acpi);
        assert_eq!(parsed.params.migration.speed_mib_s, 0);
        assert!(parsed.params.force_stop);
        assert_eq!(parsed.params.save_on_stop, None, "force wins over save");
        assert_eq!(parsed.ignored.len(), 3, "{:?}", parsed.ignored);

        let bad_identity = parse_with(&[("config", "relative.xml")], Strictness::Lenient);
        assert!(bad_identity.is_err());
        let bad_uri = parse_with(&[("domain", "a"), ("hypervisor", "x")], Strictness::Lenient);
        assert!(bad_uri.is_err());
    }

    #[test]
    fn booleans_accept_ocf_spellings() {
        for (value, expected) in [
            ("true", true),
            ("YES", true),
            ("1", true),
            ("on", true),
            ("false", false),
            ("No", false),
            ("0", false),
            ("off", false),
        ] {
            let p = strict(&[("domain", "a"), ("force_stop", value)]).expect(value);
            assert_eq!(p.force_stop, expected, "{value}");
        }
    }

    #[test]
    fn shutdown_modes_map_to_libvirt_flags() {
        assert_eq!(ShutdownMode::Acpi.flags(), 1);
        assert_eq!(ShutdownMode::Agent.flags(), 2);
        assert_eq!(ShutdownMode::Both.flags(), 3);
    }

    #[test]
    fn zero_shutdown_timeout_means_automatic() {
        let p = strict(&[("domain", "a"), ("shutdown_timeout", "0")]).expect("valid");
        assert_eq!(p.shutdown_timeout, None);
    }

    #[test]
    fn state_file_lives_in_the_save_directory() {
        let p = strict(&[("domain", "a"), ("save_on_stop", "/shared/state")]).expect("valid");
        assert_eq!(p.state_file("web1"), Some(PathBuf::from("/shared/state/web1.state")));
        let none = strict(&[("domain", "a")]).expect("valid");
        assert_eq!(none.state_file("web1"), None);
    }

    #[test]
    fn uri_syntax() {
        for ok in [
            "qemu:///system",
            "test:///default",
            "qemu+ssh://root@host:22/system",
            "qemu+unix:///system?socket=/tmp/s",
            "xen:///",
        ] {
            assert!(is_libvirt_uri(ok), "{ok}");
        }
        for bad in ["", "qemu", "qemu:/system", "://x", "1qemu:///", "qemu:///sys tem"] {
            assert!(!is_libvirt_uri(bad), "{bad}");
        }
    }

    #[test]
    fn parameter_table_is_consistent() {
        let mut names: Vec<&str> = PARAMETERS.iter().map(|p| p.name).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "duplicate parameter names");
        for spec in PARAMETERS {
            assert!(!spec.shortdesc.is_empty() && !spec.longdesc.is_empty(), "{}", spec.name);
            if let ParamKind::Select(options) = spec.kind {
                assert!(options.contains(&spec.default), "{}", spec.name);
            }
            if spec.kind == ParamKind::Integer {
                assert!(spec.default.parse::<u64>().is_ok(), "{}", spec.name);
            }
        }
        // Identity and placement must never change under a running VM.
        for fixed in ["config", "domain", "hypervisor"] {
            let spec = PARAMETERS.iter().find(|p| p.name == fixed).expect(fixed);
            assert!(!spec.reloadable, "{fixed}");
        }
    }

    #[test]
    fn every_documented_parameter_is_parsed() {
        // Each parameter set to a valid but non-default value must change the parsed result.
        let samples: &[(&str, &str)] = &[
            ("config", "/x.xml"),
            ("domain", "other"),
            ("hypervisor", "test:///default"),
            ("force_stop", "true"),
            ("shutdown_mode", "agent"),
            ("shutdown_timeout", "7"),
            ("save_on_stop", "/s"),
            ("start_networks", "n"),
            ("start_pools", "p"),
            ("start_resources", "true"),
            ("guest_channel", "false"),
            ("migration_transport", "tcp"),
            ("migration_user", "u"),
            ("migration_network_suffix", "-m"),
            ("remote_uri", "qemu+tcp://%n/system"),
            ("migrate_uri", "tcp://%n"),
            ("migration_speed", "9"),
            ("migration_downtime", "9"),
            ("shared_storage", "true"),
            ("monitor_guest_agent_timeout", "9"),
            ("guest_migrate_timeout", "9"),
            ("health_monitoring", "true"),
            ("health_sensitivity", "high"),
            ("health_grace", "9"),
            ("health_app_action", "restart"),
        ];
        assert_eq!(samples.len(), PARAMETERS.len());
        let base = strict(&[("domain", "a"), ("config", "/a.xml")]).expect("base");
        for (name, value) in samples {
            assert!(PARAMETERS.iter().any(|p| p.name == *name), "{name}");
            let mut pairs = vec![("domain", "a"), ("config", "/a.xml")];
            pairs.retain(|(k, _)| k != name);
            pairs.push((name, value));
            let p = strict(&pairs).expect(name);
            assert_ne!(p, base, "{name} had no effect");
        }
    }
}
