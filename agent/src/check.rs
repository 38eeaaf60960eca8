//! `vmha check`: is this host (and its cluster) ready to run VMs highly available? Each item is green,
//! yellow or red, with a one-line fix for every problem.
//!
//! [`gather`] reads the facts, every call with a deadline and none through a command-line tool: the CIB
//! (fencing, no-quorum-policy) through Pacemaker's CIB API, votequorum and the totem settings through
//! Corosync's libraries, libvirt through a read-only connection, the Corosync members and the hosts where
//! vmhad runs from vmhad's `Members` and `Agents`, and what every host sees of the VMs' storage and of its
//! clock from the reports vmhads exchange ([`crate::readiness`]), and this host's systemd units (is Pacemaker
//! stopped before libvirt on shutdown? [`shutdown`]). [`evaluate`] turns the facts into
//! findings; it is pure, and unit-tested below.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::readiness::{ReceivedReport, REPORT_INTERVAL};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Green,
    Yellow,
    Red,
}

impl Level {
    pub fn word(self) -> &'static str {
        match self {
            Level::Green => "green",
            Level::Yellow => "yellow",
            Level::Red => "red",
        }
    }
}

/// One item of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub item: &'static str,
    pub level: Level,
    pub summary: String,
    /// What to do about it (empty when green).
    pub fix: String,
}

fn finding(item: &'static str, level: Level, summary: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        item,
        level,
        summary: summary.into(),
        fix: fix.into(),
    }
}

fn green(item: &'static str, summary: impl Into<String>) -> Finding {
    finding(item, Level::Green, summary, "")
}

/// A fence device in the CIB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceDevice {
    pub id: String,
    pub agent: String,
    /// Not stopped through `target-role=Stopped`.
    pub enabled: bool,
    /// The last result of its monitor (which runs the agent against the fencing hardware): host, when
    /// (Unix seconds) and whether it succeeded.
    pub last_monitor: Option<(String, i64, bool)>,
}

/// What the CIB says about fencing and quorum policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CibFacts {
    pub stonith_enabled: bool,
    pub no_quorum_policy: String,
    pub fence_devices: Vec<FenceDevice>,
}

impl CibFacts {
    /// Reads the facts from the whole CIB.
    pub fn parse(xml: &str) -> Result<CibFacts, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the CIB is not XML: {e}"))?;
        let root = doc.root_element();
        let configuration = root
            .children()
            .find(|n| n.has_tag_name("configuration"))
            .ok_or("the CIB has no <configuration>")?;
        let mut props = std::collections::BTreeMap::new();
        for set in configuration
            .children()
            .filter(|n| n.has_tag_name("crm_config"))
            .flat_map(|c| c.children())
            .filter(|n| n.has_tag_name("cluster_property_set"))
        {
            for nv in set.children().filter(|n| n.has_tag_name("nvpair")) {
                if let (Some(k), Some(v)) = (nv.attribute("name"), nv.attribute("value")) {
                    props.insert(k.to_string(), v.to_string());
                }
            }
        }
        let is_true = |v: &str| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "on" | "1" | "y");
        let stonith_enabled = props.get("stonith-enabled").is_none_or(|v| is_true(v));
        let no_quorum_policy = props
            .get("no-quorum-policy")
            .cloned()
            .unwrap_or_else(|| "stop".to_string());
        let status = root.children().find(|n| n.has_tag_name("status"));
        let mut fence_devices = Vec::new();
        if let Some(resources) = configuration.children().find(|n| n.has_tag_name("resources")) {
            for p in resources
                .descendants()
                .filter(|n| n.has_tag_name("primitive") && n.attribute("class") == Some("stonith"))
            {
                let id = p.attribute("id").unwrap_or_default().to_string();
                let stopped = p
                    .descendants()
                    .filter(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some("target-role"))
                    .any(|n| n.attribute("value").is_some_and(|v| v.eq_ignore_ascii_case("stopped")));
                let mut last_monitor: Option<(String, i64, bool)> = None;
                for node_state in status
                    .iter()
                    .flat_map(|s| s.children())
                    .filter(|n| n.has_tag_name("node_state"))
                {
                    let host = node_state.attribute("uname").unwrap_or_default();
                    for op in node_state
                        .descendants()
                        .filter(|n| n.has_tag_name("lrm_resource") && n.attribute("id") == Some(id.as_str()))
                        .flat_map(|r| r.children())
                        .filter(|n| n.has_tag_name("lrm_rsc_op") && n.attribute("operation") == Some("monitor"))
                    {
                        let when: i64 = op
                            .attribute("last-rc-change")
                            .and_then(|t| t.parse().ok())
                            .unwrap_or_default();
                        // The probe (interval 0) answers "not running" (7) on hosts without the device.
                        if op.attribute("interval") == Some("0") {
                            continue;
                        }
                        let ok = op.attribute("rc-code") == Some("0");
                        if last_monitor.as_ref().is_none_or(|(_, t, _)| when > *t) {
                            last_monitor = Some((host.to_string(), when, ok));
                        }
                    }
                }
                fence_devices.push(FenceDevice {
                    id,
                    agent: p.attribute("type").unwrap_or_default().to_string(),
                    enabled: !stopped,
                    last_monitor,
                });
            }
        }
        Ok(CibFacts {
            stonith_enabled,
            no_quorum_policy,
            fence_devices,
        })
    }
}

/// votequorum's view from this host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QuorumFacts {
    /// Nodes in corosync.conf's nodelist.
    pub nodes: u32,
    pub quorate: bool,
    pub expected_votes: u32,
    pub total_votes: u32,
    pub quorum: u32,
    pub two_node: bool,
    pub wait_for_all: bool,
    pub last_man_standing: bool,
    pub qdevice: bool,
}

/// Corosync's totem timing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TotemFacts {
    /// `totem.token` from corosync.conf (`None`: not set, Corosync's default).
    pub configured_token_ms: Option<u32>,
    /// `totem.token_coefficient` from corosync.conf (`None`: not set, 650 ms).
    pub token_coefficient_ms: Option<u32>,
    /// The token timeout Corosync runs with (`runtime.config.totem.token`).
    pub effective_token_ms: u32,
    pub consensus_ms: Option<u32>,
    pub nodes: u32,
}

/// vmhad's view of who runs vmhad.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmhadFacts {
    pub local_host: String,
    /// Corosync members.
    pub members: Vec<String>,
    /// Hosts whose vmhad is in the `vmhad` process group.
    pub agents: Vec<String>,
}

/// Everything `vmha check` looks at; an `Err` says why a fact could not be read.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub cib: Result<CibFacts, String>,
    pub quorum: Result<QuorumFacts, String>,
    pub totem: Result<TotemFacts, String>,
    /// libvirt's version on success.
    pub libvirt: Result<String, String>,
    pub hypervisor: String,
    pub vmhad: Result<VmhadFacts, String>,
    pub reports: Result<Vec<ReceivedReport>, String>,
    /// This host's systemd units: is Pacemaker stopped before libvirt on shutdown?
    pub shutdown: Result<ShutdownFacts, String>,
}

/// A token timeout above this makes failover slow (a dead host is noticed only after it).
pub const SLOW_TOKEN_MS: u32 = 10_000;
/// Clocks further apart than this are out of sync.
pub const MAX_CLOCK_OFFSET_MS: i64 = 1_000;
/// Corosync's default token_coefficient.
const DEFAULT_TOKEN_COEFFICIENT_MS: u32 = 650;

/// The findings, in a fixed order of items.
pub fn evaluate(inputs: &Inputs) -> Vec<Finding> {
    let mut out = Vec::new();
    match &inputs.cib {
        Ok(cib) => {
            out.push(fencing(cib));
            out.push(quorum_policy(cib));
        }
        Err(e) => {
            let fix = "start Pacemaker on this host and run vmha check as root";
            out.push(finding("fencing", Level::Red, format!("cannot read the CIB: {e}"), fix));
            out.push(finding(
                "quorum-policy",
                Level::Red,
                format!("cannot read the CIB: {e}"),
                fix,
            ));
        }
    }
    out.push(match &inputs.quorum {
        Ok(q) => votequorum(q),
        Err(e) => finding(
            "votequorum",
            Level::Red,
            format!("cannot read votequorum: {e}"),
            "start Corosync on this host (systemctl start corosync)",
        ),
    });
    out.push(match &inputs.totem {
        Ok(t) => token(t),
        Err(e) => finding(
            "corosync-token",
            Level::Red,
            format!("cannot read Corosync's settings: {e}"),
            "start Corosync on this host (systemctl start corosync)",
        ),
    });
    out.push(match &inputs.libvirt {
        Ok(version) => green("libvirt", format!("{} answers (libvirt {version})", inputs.hypervisor)),
        Err(e) => finding(
            "libvirt",
            Level::Red,
            format!("{} does not answer: {e}", inputs.hypervisor),
            "start libvirtd on this host (systemctl start libvirtd)",
        ),
    });
    out.push(match &inputs.shutdown {
        Ok(f) => shutdown::evaluate(f),
        Err(e) => finding(
            shutdown::ITEM,
            Level::Yellow,
            format!("cannot read this host's systemd units: {e}"),
            "run vmha check as root",
        ),
    });
    let members: Vec<String> = match &inputs.vmhad {
        Ok(v) => v.members.clone(),
        Err(_) => Vec::new(),
    };
    out.push(match &inputs.vmhad {
        Ok(v) => vmhad(v),
        Err(e) => finding(
            "vmhad",
            Level::Red,
            format!("vmhad on this host does not answer: {e}"),
            "start vmhad on this host (systemctl start vmhad)",
        ),
    });
    match &inputs.reports {
        Ok(reports) => {
            out.push(storage(reports, &members));
            out.push(clocks(reports, &members));
            let local = inputs.vmhad.as_ref().map(|v| v.local_host.as_str()).unwrap_or_default();
            out.push(authkeys(reports, &members, local));
        }
        Err(e) => {
            let summary = format!("no host reports: vmhad on this host does not answer ({e})");
            let fix = "start vmhad on this host (systemctl start vmhad)";
            out.push(finding("shared-storage", Level::Yellow, summary.clone(), fix));
            out.push(finding("time-sync", Level::Yellow, summary.clone(), fix));
            out.push(finding("relay-authkey", Level::Yellow, summary, fix));
        }
    }
    out
}

fn fencing(cib: &CibFacts) -> Finding {
    const ITEM: &str = "fencing";
    if !cib.stonith_enabled {
        return finding(
            ITEM,
            Level::Red,
            "fencing is disabled (stonith-enabled=false): a failed host's VMs may run twice",
            "configure a fence device for every host, then: pcs property set stonith-enabled=true",
        );
    }
    if cib.fence_devices.is_empty() {
        return finding(
            ITEM,
            Level::Red,
            "stonith-enabled=true but no fence device is configured: failed hosts cannot be fenced and their VMs stay down",
            "add a fence device that can power off every host, e.g. pcs stonith create fence-ipmi fence_ipmilan ip=... pcmk_host_list=...",
        );
    }
    let enabled: Vec<&FenceDevice> = cib.fence_devices.iter().filter(|d| d.enabled).collect();
    if enabled.is_empty() {
        let ids: Vec<&str> = cib.fence_devices.iter().map(|d| d.id.as_str()).collect();
        return finding(
            ITEM,
            Level::Red,
            format!("every fence device is disabled ({})", ids.join(", ")),
            format!("pcs stonith enable {}", ids[0]),
        );
    }
    let failing: Vec<&FenceDevice> = enabled
        .iter()
        .copied()
        .filter(|d| matches!(d.last_monitor, Some((_, _, false))))
        .collect();
    let describe = |d: &FenceDevice| match &d.last_monitor {
        Some((host, when, ok)) => format!(
            "{} ({}; monitor {} on {host} at {})",
            d.id,
            d.agent,
            if *ok { "ok" } else { "FAILED" },
            utc(*when)
        ),
        None => format!("{} ({}; not monitored yet)", d.id, d.agent),
    };
    let devices: Vec<String> = enabled.iter().map(|d| describe(d)).collect();
    let history =
        "last fencing: unknown (vmha does not read the fencer's history; stonith_admin --history '*' shows it)";
    if !failing.is_empty() {
        return finding(
            ITEM,
            Level::Red,
            format!("fence device monitor fails: {}", devices.join(", ")),
            format!(
                "check the device's address and credentials, then: pcs stonith cleanup {}",
                failing[0].id
            ),
        );
    }
    green(
        ITEM,
        format!("stonith-enabled=true; devices: {}; {history}", devices.join(", ")),
    )
}

fn utc(secs: i64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm), to print UTC without a crate.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn quorum_policy(cib: &CibFacts) -> Finding {
    const ITEM: &str = "quorum-policy";
    match cib.no_quorum_policy.as_str() {
        "ignore" => finding(
            ITEM,
            Level::Red,
            "no-quorum-policy=ignore: a partition without quorum keeps running (and starting) VMs: split brain",
            "pcs property set no-quorum-policy=stop",
        ),
        "stop" | "freeze" | "demote" | "suicide" | "fence" => {
            green(ITEM, format!("no-quorum-policy={}", cib.no_quorum_policy))
        }
        other => finding(
            ITEM,
            Level::Yellow,
            format!("no-quorum-policy={other} is not a value Pacemaker knows"),
            "pcs property set no-quorum-policy=stop",
        ),
    }
}

fn votequorum(q: &QuorumFacts) -> Finding {
    const ITEM: &str = "votequorum";
    let summary = format!(
        "{} nodes, expected votes {}, total votes {}, quorum {}{}{}{}{}",
        q.nodes,
        q.expected_votes,
        q.total_votes,
        q.quorum,
        if q.two_node { ", two_node" } else { "" },
        if q.wait_for_all { ", wait_for_all" } else { "" },
        if q.last_man_standing { ", last_man_standing" } else { "" },
        if q.qdevice { ", quorum device" } else { "" },
    );
    if !q.quorate {
        return finding(
            ITEM,
            Level::Red,
            format!("this host is not quorate ({summary})"),
            "bring enough hosts up and check the Corosync links (corosync-cfgtool -s)",
        );
    }
    if q.expected_votes < q.nodes && !q.last_man_standing {
        return finding(
            ITEM,
            Level::Red,
            format!(
                "expected votes {} is below the {} nodes of the nodelist: two partitions may both be quorate ({summary})",
                q.expected_votes, q.nodes
            ),
            "remove quorum { expected_votes } from corosync.conf (the nodelist sets it) and reload Corosync",
        );
    }
    if q.two_node && !q.wait_for_all {
        return finding(
            ITEM,
            Level::Yellow,
            format!("two_node without wait_for_all: after a cold start each host may run alone and fence the other ({summary})"),
            "remove wait_for_all: 0 from the quorum section of corosync.conf",
        );
    }
    if q.nodes == 2 && !q.two_node && !q.qdevice {
        return finding(
            ITEM,
            Level::Yellow,
            format!("2 nodes without two_node: losing either host loses quorum and stops every VM ({summary})"),
            "set quorum { two_node: 1 } in corosync.conf (or add a quorum device)",
        );
    }
    green(ITEM, summary)
}

fn token(t: &TotemFacts) -> Finding {
    const ITEM: &str = "corosync-token";
    let coefficient = t.token_coefficient_ms.unwrap_or(DEFAULT_TOKEN_COEFFICIENT_MS);
    let summary = format!(
        "token timeout {} ms{}{}",
        t.effective_token_ms,
        match t.configured_token_ms {
            Some(c) => format!(
                " (totem.token {c} ms, token_coefficient {coefficient} ms, {} nodes)",
                t.nodes
            ),
            None => format!(
                " (Corosync's default, token_coefficient {coefficient} ms, {} nodes)",
                t.nodes
            ),
        },
        t.consensus_ms
            .map(|c| format!(", consensus {c} ms"))
            .unwrap_or_default()
    );
    if t.effective_token_ms > SLOW_TOKEN_MS {
        return finding(
            ITEM,
            Level::Yellow,
            format!(
                "{summary}: a dead host is noticed only after {:.1} s, so its VMs restart late",
                f64::from(t.effective_token_ms) / 1000.0
            ),
            "lower totem.token in corosync.conf (e.g. 3000) and set totem.token_coefficient: 0, then reload Corosync",
        );
    }
    if let Some(configured) = t.configured_token_ms {
        if t.effective_token_ms > configured {
            return finding(
                ITEM,
                Level::Yellow,
                format!(
                    "{summary}: totem.token says {configured} ms but Corosync waits {} ms, because token_coefficient adds {coefficient} ms per node above 2",
                    t.effective_token_ms
                ),
                format!("set totem.token_coefficient: 0 in corosync.conf if you meant {configured} ms, then reload Corosync"),
            );
        }
    }
    green(ITEM, summary)
}

fn vmhad(v: &VmhadFacts) -> Finding {
    const ITEM: &str = "vmhad";
    let agents: BTreeSet<&str> = v.agents.iter().map(String::as_str).collect();
    let missing: Vec<&str> = v
        .members
        .iter()
        .map(String::as_str)
        .filter(|m| !agents.contains(m))
        .collect();
    if v.members.is_empty() {
        return finding(
            ITEM,
            Level::Yellow,
            "vmhad does not know the Corosync members (is it connected to Corosync?)",
            "check vmhad's log on this host (journalctl -u vmhad)",
        );
    }
    if !missing.is_empty() {
        return finding(
            ITEM,
            Level::Red,
            format!(
                "vmhad is not running on {} (members: {})",
                missing.join(", "),
                v.members.join(", ")
            ),
            format!("start vmhad on {}: systemctl start vmhad", missing.join(", ")),
        );
    }
    green(ITEM, format!("running on every member: {}", v.members.join(", ")))
}

fn fresh(r: &ReceivedReport) -> bool {
    r.age_ms <= u64::try_from((REPORT_INTERVAL * 3).as_millis()).unwrap_or(u64::MAX)
}

/// Members without a fresh report.
fn silent<'a>(reports: &[ReceivedReport], members: &'a [String]) -> Vec<&'a str> {
    members
        .iter()
        .filter(|m| !reports.iter().any(|r| &r.report.host == *m && fresh(r)))
        .map(String::as_str)
        .collect()
}

/// Yellow for `item` when some members sent no report (vmhad not running there?).
fn silent_hosts(item: &'static str, reports: &[ReceivedReport], members: &[String]) -> Option<Finding> {
    let silent = silent(reports, members);
    (!silent.is_empty()).then(|| {
        finding(
            item,
            Level::Yellow,
            format!("no report from {} (vmhad not running there?)", silent.join(", ")),
            format!("start vmhad on {}: systemctl start vmhad", silent.join(", ")),
        )
    })
}

/// The finding when no host has reported (yet): vmhad just started, or cannot reach Corosync.
fn no_reports(item: &'static str) -> Finding {
    finding(
        item,
        Level::Yellow,
        "no host has reported yet (vmhad just started, or it cannot reach Corosync)",
        "run vmha check again in a few seconds; if this stays, check vmhad's log (journalctl -u vmhad)",
    )
}

/// At most this many paths a host does not see are named in the finding's summary (the others counted).
const NAMED_PATHS: usize = 10;

fn storage(reports: &[ReceivedReport], members: &[String]) -> Finding {
    const ITEM: &str = "shared-storage";
    if !reports.iter().any(fresh) {
        return no_reports(ITEM);
    }
    let mut missing = Vec::new();
    let mut unknown = Vec::new();
    // Problems a report counted but did not list (it lists the first 256).
    let mut unlisted: usize = 0;
    // Hosts whose first sweep over the VMs' files has not ended yet.
    let mut sweeping = Vec::new();
    let (mut vms, mut oldest_ms) = (None, 0);
    let mut paths = BTreeSet::new();
    let mut counted_paths = 0;
    for r in reports.iter().filter(|r| fresh(r)) {
        let host = &r.report.host;
        if let Some(s) = &r.report.storage_summary {
            // Saturating: the counts come from other hosts' vmhads (a CPG group, not the relay's key).
            unlisted = unlisted.saturating_add(s.problems.saturating_sub(r.report.storage.len()));
            if s.looked_at < s.vms {
                sweeping.push(format!("{host} has looked at {} of {} VMs", s.looked_at, s.vms));
            }
            vms = Some(vms.unwrap_or(0).max(s.vms));
            oldest_ms = oldest_ms.max(s.oldest_ms);
            counted_paths = counted_paths.max(s.paths);
        }
        for p in &r.report.storage {
            paths.insert(p.path.as_str());
            match p.exists {
                Some(true) => {}
                Some(false) => missing.push(format!("{host} cannot see {} (VM {})", p.path, p.vm)),
                None => unknown.push(format!("{host} did not answer for {} (VM {})", p.path, p.vm)),
            }
        }
    }
    let named = |list: &[String], extra: usize| {
        let more = list.len().saturating_sub(NAMED_PATHS).saturating_add(extra);
        let mut text = list[..list.len().min(NAMED_PATHS)].join("; ");
        if more > 0 {
            text.push_str(&format!("; and {more} more"));
        }
        text
    };
    if !missing.is_empty() {
        let extra = if unknown.is_empty() { unlisted } else { 0 };
        return finding(
            ITEM,
            Level::Red,
            named(&missing, extra),
            "mount the shared storage at the same path on every host (and check the paths in the VMs' domain XML)",
        );
    }
    if !unknown.is_empty() || unlisted > 0 {
        return finding(
            ITEM,
            Level::Red,
            format!("{}: is the shared storage hung?", named(&unknown, unlisted)),
            "check the storage mount on those hosts (a hung NFS mount blocks VM start and migration)",
        );
    }
    if let Some(f) = silent_hosts(ITEM, reports, members) {
        return f;
    }
    if !sweeping.is_empty() {
        return finding(
            ITEM,
            Level::Yellow,
            format!(
                "{} so far (each host looks at {} VMs' files every {} s)",
                sweeping.join("; "),
                crate::readiness::VMS_PER_REPORT,
                REPORT_INTERVAL.as_secs()
            ),
            "run vmha check again once every host has looked at every VM",
        );
    }
    let hosts: Vec<&str> = reports.iter().map(|r| r.report.host.as_str()).collect();
    // Reports that count what they looked at list only what a host does not see; an older vmhad's list
    // every path it needs (the first 256).
    if vms.map_or(paths.is_empty(), |n| n == 0) {
        return green(ITEM, format!("no managed VM needs files (hosts: {})", hosts.join(", ")));
    }
    match vms {
        Some(vms) => green(
            ITEM,
            format!(
                "the {counted_paths} files of {} exist on every host ({}); the oldest look was {} s ago",
                if vms == 1 {
                    "the one managed VM".to_string()
                } else {
                    format!("the {vms} managed VMs")
                },
                hosts.join(", "),
                oldest_ms.div_ceil(1000)
            ),
        ),
        None => green(
            ITEM,
            format!(
                "the {} files of the managed VMs exist on every host ({})",
                paths.len(),
                hosts.join(", ")
            ),
        ),
    }
}

fn clocks(reports: &[ReceivedReport], members: &[String]) -> Finding {
    const ITEM: &str = "time-sync";
    let fresh_reports: Vec<&ReceivedReport> = reports.iter().filter(|r| fresh(r)).collect();
    if fresh_reports.is_empty() {
        return no_reports(ITEM);
    }
    let off: Vec<String> = fresh_reports
        .iter()
        .filter(|r| r.offset_ms.abs() > MAX_CLOCK_OFFSET_MS)
        .map(|r| {
            format!(
                "{} is {:.1} s {}",
                r.report.host,
                r.offset_ms.abs() as f64 / 1000.0,
                if r.offset_ms > 0 { "ahead" } else { "behind" }
            )
        })
        .collect();
    if !off.is_empty() {
        return finding(
            ITEM,
            Level::Red,
            format!(
                "clocks differ by more than {} s: {} (compared with this host)",
                MAX_CLOCK_OFFSET_MS / 1000,
                off.join(", ")
            ),
            "run an NTP daemon (e.g. chrony) with the same servers on every host",
        );
    }
    let unsynced: Vec<String> = fresh_reports
        .iter()
        .filter_map(|r| match (&r.report.clock.ntp_daemon, r.report.clock.synchronized) {
            (Some(daemon), Some(false)) => Some(format!("{} ({daemon})", r.report.host)),
            _ => None,
        })
        .collect();
    if !unsynced.is_empty() {
        return finding(
            ITEM,
            Level::Yellow,
            format!(
                "the NTP daemon runs but the kernel clock is not synchronized on {}",
                unsynced.join(", ")
            ),
            "check that the NTP servers are reachable (chronyc sources / timedatectl timesync-status)",
        );
    }
    if let Some(f) = silent_hosts(ITEM, reports, members) {
        return f;
    }
    let worst = fresh_reports.iter().map(|r| r.offset_ms.abs()).max().unwrap_or(0);
    let without_ntp: Vec<&str> = fresh_reports
        .iter()
        .filter(|r| r.report.clock.ntp_daemon.is_none())
        .map(|r| r.report.host.as_str())
        .collect();
    green(
        ITEM,
        format!(
            "{} hosts within {worst} ms of this host{}",
            fresh_reports.len(),
            if without_ntp.is_empty() {
                ", NTP-synchronized".to_string()
            } else {
                format!(
                    " (no NTP daemon seen on {}: synchronization not checked there)",
                    without_ntp.join(", ")
                )
            }
        ),
    )
}

/// The relay's key (`/etc/vmha/authkey`) on every host, compared by fingerprint: red when a host has
/// none (or an unusable one) or when the hosts' keys differ, with where to copy it from.
fn authkeys(reports: &[ReceivedReport], members: &[String], local: &str) -> Finding {
    const ITEM: &str = "relay-authkey";
    const PATH: &str = crate::authkey::AUTHKEY_PATH;
    let fresh_reports: Vec<&ReceivedReport> = reports.iter().filter(|r| fresh(r)).collect();
    if fresh_reports.is_empty() {
        return no_reports(ITEM);
    }
    // Hosts by fingerprint; the reference key is the one most hosts have (a tie: this host's).
    let mut by_key: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    let mut without = Vec::new();
    for r in &fresh_reports {
        match &r.report.authkey {
            Some(fp) => by_key.entry(fp.as_str()).or_default().push(r.report.host.as_str()),
            None => without.push(format!(
                "{} ({})",
                r.report.host,
                r.report
                    .authkey_problem
                    .as_deref()
                    .unwrap_or("no key reported: vmhad there predates the authenticated relay?")
            )),
        }
    }
    let reference = by_key
        .iter()
        .max_by_key(|(_, hosts)| (hosts.len(), hosts.contains(&local)))
        .map(|(fp, hosts)| (*fp, hosts.clone()));
    let Some((fingerprint, holders)) = reference else {
        return finding(
            ITEM,
            Level::Red,
            format!("no host has a usable {PATH}: {}", without.join("; ")),
            format!(
                "on one host run `vmha keygen`, copy {PATH} to every host (root, mode 0600) and restart vmhad there"
            ),
        );
    };
    let source = holders.first().copied().unwrap_or_default();
    let mut problems = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    if !without.is_empty() {
        problems.push(format!("no usable key on {}", without.join("; ")));
        targets.extend(
            fresh_reports
                .iter()
                .filter(|r| r.report.authkey.is_none())
                .map(|r| r.report.host.as_str()),
        );
    }
    for (fp, hosts) in by_key.iter().filter(|(fp, _)| **fp != fingerprint) {
        problems.push(format!(
            "{} {} a different key (fingerprint {fp}, not {fingerprint})",
            hosts.join(", "),
            if hosts.len() == 1 { "has" } else { "have" }
        ));
        targets.extend(hosts.iter().copied());
    }
    if !problems.is_empty() {
        return finding(
            ITEM,
            Level::Red,
            format!(
                "{}: the relay between vmhads drops their messages (guest requests and clones across hosts fail)",
                problems.join("; ")
            ),
            format!(
                "copy {PATH} from {source} to {} (root, mode 0600) and restart vmhad there",
                targets.join(", ")
            ),
        );
    }
    if let Some(f) = silent_hosts(ITEM, reports, members) {
        return f;
    }
    green(
        ITEM,
        format!(
            "the same {PATH} (fingerprint {fingerprint}) on every host ({})",
            holders.join(", ")
        ),
    )
}

/// The report as text: one line per item, and the fix under each problem.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s.push_str(&format!(
            "{:<7} {:<15} {}\n",
            f.level.word().to_uppercase(),
            f.item,
            f.summary
        ));
        if !f.fix.is_empty() {
            s.push_str(&format!("{:<23} fix: {}\n", "", f.fix));
        }
    }
    s
}

/// The worst level of all findings.
pub fn worst(findings: &[Finding]) -> Level {
    findings.iter().map(|f| f.level).max().unwrap_or(Level::Green)
}

/// The default deadline of each call `vmha check` makes.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);

mod gather;
pub use gather::gather;
mod shutdown;
pub use shutdown::{ShutdownFacts, DROP_IN};

#[cfg(test)]
mod tests;
