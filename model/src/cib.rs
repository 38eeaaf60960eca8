//! The cluster as Pacemaker's CIB describes it: hosts, the DC, quorum and the VM resources with where
//! they run, read from one `cibadmin --query` document (configuration and status).

use std::collections::BTreeMap;

use roxmltree::{Document, Node};
use serde::Serialize;

use crate::{ModelError, VM_AGENTS};

/// A host (Pacemaker node) and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostView {
    pub name: String,
    pub id: String,
    pub state: HostState,
    pub standby: bool,
    pub maintenance: bool,
    /// Capacity declared for placement (`cpu`, `hv_memory`).
    pub utilization: BTreeMap<String, String>,
}

/// Membership state of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// Member of the cluster with its controller joined.
    Online,
    /// In the membership but its controller has not joined (yet).
    Pending,
    /// Left while expected to be up and not yet fenced: its resources are in an unknown state.
    Unclean,
    /// Cleanly down (shut down, or fenced).
    Offline,
}

/// The state of a VM resource across the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Running,
    Stopped,
    Starting,
    Stopping,
    Migrating,
    /// A failure is recorded and not yet recovered (or the VM is active in more than one place).
    Failed,
}

/// A constraint that involves a VM, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Constraint {
    pub id: String,
    /// `location`, `colocation`, `order` or `ticket`.
    pub kind: String,
    /// One line, e.g. `vm1 prefers node3 (INFINITY)`.
    pub summary: String,
}

/// A VM resource: a primitive of one of [`VM_AGENTS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmView {
    pub name: String,
    /// `class:provider:type`, e.g. `ocf:vmha:VirtualMachine`.
    pub agent: String,
    /// The domain XML file (`config` parameter), when set.
    pub config: Option<String>,
    pub state: VmState,
    /// Hosts where the VM is active (more than one only while something is wrong).
    pub hosts: Vec<String>,
    /// Hosts where a failure is recorded.
    pub failed_on: Vec<String>,
    /// Fail counts per host (summed over operations).
    pub fail_counts: BTreeMap<String, u32>,
    /// `target-role` meta attribute (`Started`, `Stopped`), when set.
    pub target_role: Option<String>,
    /// `is-managed` is not false.
    pub managed: bool,
    pub params: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub utilization: BTreeMap<String, String>,
    pub constraints: Vec<Constraint>,
}

/// The whole cluster as one CIB document describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub cluster_name: Option<String>,
    /// `admin_epoch.epoch.num_updates`: changes whenever the CIB changes.
    pub version: String,
    pub dc: Option<String>,
    pub quorate: bool,
    pub stonith_enabled: bool,
    pub hosts: Vec<HostView>,
    pub vms: Vec<VmView>,
}

fn child<'a, 'i>(node: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(tag))
}

fn children<'a, 'i: 'a>(node: Node<'a, 'i>, tag: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children().filter(move |n| n.has_tag_name(tag))
}

/// name -> value of every `<nvpair>` in the `<tag>` sets directly under `node` (rules are not evaluated).
fn nvpairs(node: Node, tag: &str) -> BTreeMap<String, String> {
    children(node, tag)
        .flat_map(|set| children(set, "nvpair"))
        .filter_map(|nv| {
            Some((
                nv.attribute("name")?.to_string(),
                nv.attribute("value").unwrap_or("").to_string(),
            ))
        })
        .collect()
}

/// Pacemaker's boolean spelling (`true`, `on`, `yes`, `1`, ...).
pub fn is_true(value: &str) -> bool {
    matches!(value.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "y" | "1")
}

/// `in_ccm` and `crmd` are `true`/`online` in older CIBs and a timestamp (non-zero: up) in newer ones.
fn up_flag(value: Option<&str>) -> bool {
    match value {
        Some("true" | "online") => true,
        Some(v) => v.parse::<u64>().is_ok_and(|t| t > 0),
        None => false,
    }
}

/// What the operation history of one resource on one host says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HistoryState {
    Active,
    Inactive,
    Failed,
    Pending(PendingOp),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingOp {
    Start,
    Stop,
    Migrate,
    Other,
}

/// Reads an `<lrm_resource>`'s operation history: the newest completed operation decides, a pending
/// operation wins over it.
fn history_state(lrm_resource: Node) -> Option<HistoryState> {
    let mut newest: Option<(i64, &str, u64, i32, i32)> = None;
    for op in children(lrm_resource, "lrm_rsc_op") {
        let operation = op.attribute("operation").unwrap_or("");
        let call_id: i64 = op.attribute("call-id").and_then(|c| c.parse().ok()).unwrap_or(-1);
        let op_status: i32 = op.attribute("op-status").and_then(|c| c.parse().ok()).unwrap_or(0);
        if call_id < 0 || op_status == -1 {
            return Some(HistoryState::Pending(match operation {
                "start" => PendingOp::Start,
                "stop" => PendingOp::Stop,
                "migrate_to" | "migrate_from" => PendingOp::Migrate,
                _ => PendingOp::Other,
            }));
        }
        let rc: i32 = op.attribute("rc-code").and_then(|c| c.parse().ok()).unwrap_or(1);
        let interval: u64 = op.attribute("interval").and_then(|c| c.parse().ok()).unwrap_or(0);
        if newest.is_none_or(|(c, ..)| call_id > c) {
            newest = Some((call_id, operation, interval, rc, op_status));
        }
    }
    let (_, operation, interval, rc, op_status) = newest?;
    if op_status != 0 {
        return Some(HistoryState::Failed);
    }
    Some(match (operation, rc) {
        ("stop" | "migrate_to", 0) => HistoryState::Inactive,
        // A probe that finds the resource not running.
        ("monitor", 7) if interval == 0 => HistoryState::Inactive,
        (_, 0) => HistoryState::Active,
        _ => HistoryState::Failed,
    })
}

impl ClusterView {
    /// Reads the cluster from a whole CIB (`cibadmin --query` output).
    pub fn from_cib(xml: &str) -> Result<Self, ModelError> {
        let doc = Document::parse(xml)?;
        let cib = doc.root_element();
        let configuration = child(cib, "configuration").ok_or(ModelError::MissingSection("configuration"))?;
        let status = child(cib, "status");
        let crm_config = child(configuration, "crm_config")
            .map(|c| nvpairs(c, "cluster_property_set"))
            .unwrap_or_default();
        let version = format!(
            "{}.{}.{}",
            cib.attribute("admin_epoch").unwrap_or("0"),
            cib.attribute("epoch").unwrap_or("0"),
            cib.attribute("num_updates").unwrap_or("0")
        );

        // Hosts: configured nodes, with their state from the status section.
        let node_states: BTreeMap<&str, Node> = status
            .map(|s| {
                children(s, "node_state")
                    .filter_map(|n| Some((n.attribute("id")?, n)))
                    .collect()
            })
            .unwrap_or_default();
        let mut hosts = Vec::new();
        let mut names_by_id = BTreeMap::new();
        if let Some(nodes) = child(configuration, "nodes") {
            for node in children(nodes, "node").filter(|n| n.attribute("type").is_none_or(|t| t == "member")) {
                let (Some(id), Some(name)) = (node.attribute("id"), node.attribute("uname")) else {
                    continue;
                };
                names_by_id.insert(id.to_string(), name.to_string());
                let attrs = nvpairs(node, "instance_attributes");
                let state_node = node_states.get(id);
                let transient = state_node
                    .and_then(|s| child(*s, "transient_attributes"))
                    .map(|t| nvpairs(t, "instance_attributes"))
                    .unwrap_or_default();
                let flag = |name: &str| {
                    attrs
                        .get(name)
                        .or_else(|| transient.get(name))
                        .is_some_and(|v| is_true(v))
                };
                let state = match state_node {
                    None => HostState::Offline,
                    Some(s) => {
                        let in_ccm = up_flag(s.attribute("in_ccm"));
                        let crmd = up_flag(s.attribute("crmd"));
                        let join = s.attribute("join").unwrap_or("down");
                        let expected = s.attribute("expected").unwrap_or("down");
                        if in_ccm && crmd && join == "member" {
                            HostState::Online
                        } else if in_ccm {
                            HostState::Pending
                        } else if expected == "member" && join != "down" {
                            HostState::Unclean
                        } else {
                            HostState::Offline
                        }
                    }
                };
                hosts.push(HostView {
                    name: name.to_string(),
                    id: id.to_string(),
                    state,
                    standby: flag("standby"),
                    maintenance: flag("maintenance"),
                    // What vmhad and users declare; the placement policy's own (scaled) set is not theirs.
                    utilization: crate::policy::effective_nvpairs(node, "utilization", true),
                });
            }
        }
        let dc = cib.attribute("dc-uuid").and_then(|id| names_by_id.get(id).cloned());

        // Per host and resource: what the operation history says, and fail counts.
        // Keyed by resource, then host: each VM reads its own entries (a CIB holds one per VM and host).
        let mut history: BTreeMap<&str, BTreeMap<String, HistoryState>> = BTreeMap::new();
        let mut fail_counts: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        for (id, state_node) in &node_states {
            let Some(host) = names_by_id.get(*id) else { continue };
            let offline_clean = hosts.iter().any(|h| &h.name == host && h.state == HostState::Offline);
            if let Some(lrm_resources) = child(*state_node, "lrm").and_then(|l| child(l, "lrm_resources")) {
                for r in children(lrm_resources, "lrm_resource") {
                    let (Some(rsc), Some(state)) = (r.attribute("id"), history_state(r)) else {
                        continue;
                    };
                    if offline_clean {
                        continue;
                    }
                    history.entry(rsc).or_default().insert(host.clone(), state);
                }
            }
            if let Some(t) = child(*state_node, "transient_attributes") {
                for (name, value) in nvpairs(t, "instance_attributes") {
                    let Some(rest) = name.strip_prefix("fail-count-") else {
                        continue;
                    };
                    let rsc = rest.split('#').next().unwrap_or(rest).to_string();
                    let n: u32 = if value == "INFINITY" {
                        1_000_000
                    } else {
                        value.parse().unwrap_or(0)
                    };
                    *fail_counts.entry(rsc).or_default().entry(host.clone()).or_default() += n;
                }
            }
        }

        let mut constraints = child(configuration, "constraints")
            .map(constraints_by_resource)
            .unwrap_or_default();
        let mut vms = Vec::new();
        if let Some(resources) = child(configuration, "resources") {
            for p in resources.descendants().filter(|n| n.has_tag_name("primitive")) {
                let class = p.attribute("class").unwrap_or("");
                let provider = p.attribute("provider").unwrap_or("");
                let kind = p.attribute("type").unwrap_or("");
                if !VM_AGENTS
                    .iter()
                    .any(|(c, pr, t)| *c == class && *pr == provider && *t == kind)
                {
                    continue;
                }
                let Some(name) = p.attribute("id") else { continue };
                let params = nvpairs(p, "instance_attributes");
                let meta = nvpairs(p, "meta_attributes");
                let mut hosts_active = Vec::new();
                let mut failed_on = Vec::new();
                let mut pending = None;
                for (host, state) in history.get(name).into_iter().flatten() {
                    match state {
                        HistoryState::Active => hosts_active.push(host.clone()),
                        HistoryState::Failed => failed_on.push(host.clone()),
                        HistoryState::Pending(op) => pending = Some(*op),
                        HistoryState::Inactive => {}
                    }
                }
                let state = if !failed_on.is_empty() || hosts_active.len() > 1 {
                    VmState::Failed
                } else {
                    match pending {
                        Some(PendingOp::Start) => VmState::Starting,
                        Some(PendingOp::Stop) => VmState::Stopping,
                        Some(PendingOp::Migrate) => VmState::Migrating,
                        _ if !hosts_active.is_empty() => VmState::Running,
                        Some(PendingOp::Other) => VmState::Starting,
                        None => VmState::Stopped,
                    }
                };
                vms.push(VmView {
                    name: name.to_string(),
                    agent: format!("{class}:{provider}:{kind}"),
                    config: params.get("config").cloned(),
                    state,
                    hosts: hosts_active,
                    failed_on,
                    fail_counts: fail_counts.remove(name).unwrap_or_default(),
                    target_role: meta.get("target-role").cloned(),
                    managed: meta.get("is-managed").is_none_or(|v| is_true(v)),
                    utilization: nvpairs(p, "utilization"),
                    constraints: constraints.remove(name).unwrap_or_default(),
                    params,
                    meta,
                });
            }
        }

        Ok(ClusterView {
            cluster_name: crm_config.get("cluster-name").cloned(),
            version,
            dc,
            quorate: cib.attribute("have-quorum").is_some_and(is_true),
            stonith_enabled: crm_config.get("stonith-enabled").is_none_or(|v| is_true(v)),
            hosts,
            vms,
        })
    }

    pub fn host(&self, name: &str) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn vm(&self, name: &str) -> Option<&VmView> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// Names of the hosts that are online.
    pub fn online_hosts(&self) -> Vec<&str> {
        self.hosts
            .iter()
            .filter(|h| h.state == HostState::Online)
            .map(|h| h.name.as_str())
            .collect()
    }
}

/// The constraints that name resource `rsc`, summarised.
/// Every constraint, under each resource it names (in the CIB's order): one pass over the section.
fn constraints_by_resource<'a>(constraints: Node<'a, '_>) -> BTreeMap<&'a str, Vec<Constraint>> {
    let mut out: BTreeMap<&str, Vec<Constraint>> = BTreeMap::new();
    for c in constraints.children().filter(|n| n.is_element()) {
        let refs_in_sets: Vec<&str> = c
            .descendants()
            .filter(|n| n.has_tag_name("resource_ref"))
            .filter_map(|n| n.attribute("id"))
            .collect();
        let mut named: Vec<&str> = ["rsc", "with-rsc", "first", "then"]
            .iter()
            .filter_map(|a| c.attribute(*a))
            .chain(refs_in_sets.iter().copied())
            .collect();
        named.sort_unstable();
        named.dedup();
        let in_sets: std::collections::BTreeSet<&str> = refs_in_sets.iter().copied().collect();
        for rsc in named {
            if let Some(constraint) = constraint_of(c, rsc, in_sets.contains(rsc)) {
                out.entry(rsc).or_default().push(constraint);
            }
        }
    }
    out
}

/// What constraint `c` means for `rsc`, if it concerns it.
fn constraint_of(c: Node, rsc: &str, in_set: bool) -> Option<Constraint> {
    let id = c.attribute("id").unwrap_or("").to_string();
    let (kind, summary) = match c.tag_name().name() {
        "rsc_location" if c.attribute("rsc") == Some(rsc) || in_set => {
            let score = c.attribute("score").unwrap_or("(rule)");
            match c.attribute("node") {
                Some(node) if score.starts_with('-') => ("location", format!("{rsc} avoids {node} ({score})")),
                Some(node) => ("location", format!("{rsc} prefers {node} ({score})")),
                None => ("location", format!("{rsc} placed by rule ({score})")),
            }
        }
        "rsc_colocation" if c.attribute("rsc") == Some(rsc) || c.attribute("with-rsc") == Some(rsc) || in_set => {
            let a = c.attribute("rsc").unwrap_or("(set)");
            let b = c.attribute("with-rsc").unwrap_or("(set)");
            (
                "colocation",
                format!("{a} with {b} ({})", c.attribute("score").unwrap_or("INFINITY")),
            )
        }
        "rsc_order" if c.attribute("first") == Some(rsc) || c.attribute("then") == Some(rsc) || in_set => {
            let a = c.attribute("first").unwrap_or("(set)");
            let b = c.attribute("then").unwrap_or("(set)");
            ("order", format!("{a} then {b}"))
        }
        "rsc_ticket" if c.attribute("rsc") == Some(rsc) || in_set => (
            "ticket",
            format!("{rsc} needs ticket {}", c.attribute("ticket").unwrap_or("?")),
        ),
        _ => return None,
    };
    Some(Constraint {
        id,
        kind: kind.to_string(),
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CIB captured from the lab: 3 hosts, DC node1, vm1 being started on node2.
    const STARTING: &str = include_str!("testdata/cib-vm-starting.xml");

    /// A small CIB: `nodes` as (id, name, node_state attributes, lrm ops for vm1, transient nvpairs).
    fn cib(dc: &str, extra_config: &str, nodes: &[(&str, &str, &str, &str, &str)]) -> String {
        let mut s = format!(
            r#"<cib admin_epoch="0" epoch="12" num_updates="3" have-quorum="1" dc-uuid="{dc}"><configuration>
            <crm_config><cluster_property_set id="o"><nvpair id="o1" name="cluster-name" value="lab"/></cluster_property_set></crm_config><nodes>"#
        );
        for (id, name, ..) in nodes {
            s.push_str(&format!(r#"<node id="{id}" uname="{name}"/>"#));
        }
        s.push_str(
            r#"</nodes><resources>
            <primitive id="vm1" class="ocf" provider="vmha" type="VirtualMachine">
              <instance_attributes id="vm1-ia"><nvpair id="vm1-ia-c" name="config" value="/shared/vm1.xml"/></instance_attributes>
              <meta_attributes id="vm1-ma"><nvpair id="vm1-ma-a" name="allow-migrate" value="true"/></meta_attributes>
              <utilization id="vm1-u"><nvpair id="vm1-u-m" name="hv_memory" value="128"/></utilization>
            </primitive>
            <primitive id="ip1" class="ocf" provider="heartbeat" type="IPaddr2"/>
            </resources>"#,
        );
        s.push_str(extra_config);
        s.push_str("</configuration><status>");
        for (id, name, state, ops, transient) in nodes {
            s.push_str(&format!(
                r#"<node_state id="{id}" uname="{name}" {state}><transient_attributes id="{id}"><instance_attributes id="s{id}">{transient}</instance_attributes></transient_attributes>
                <lrm id="{id}"><lrm_resources><lrm_resource id="vm1" class="ocf" provider="vmha" type="VirtualMachine">{ops}</lrm_resource></lrm_resources></lrm></node_state>"#
            ));
        }
        s.push_str("</status></cib>");
        s
    }

    const UP: &str = r#"in_ccm="true" crmd="online" join="member" expected="member""#;
    const PROBED_STOPPED: &str =
        r#"<lrm_rsc_op id="vm1_last_0" operation="monitor" call-id="3" rc-code="7" op-status="0" interval="0"/>"#;
    const STARTED: &str = r#"<lrm_rsc_op id="vm1_last_0" operation="start" call-id="5" rc-code="0" op-status="0" interval="0"/>
        <lrm_rsc_op id="vm1_monitor_10000" operation="monitor" call-id="6" rc-code="0" op-status="0" interval="10000"/>"#;

    #[test]
    fn reads_hosts_dc_quorum_and_a_starting_vm_from_a_real_cib() {
        let v = ClusterView::from_cib(STARTING).unwrap();
        assert_eq!(v.cluster_name.as_deref(), Some("e2e"));
        assert_eq!(v.dc.as_deref(), Some("node1"));
        assert!(v.quorate);
        assert!(v.stonith_enabled);
        assert_eq!(v.online_hosts(), vec!["node1", "node2", "node3"]);
        let vm = v.vm("vm1").unwrap();
        assert_eq!(vm.agent, "ocf:vmha:VirtualMachine");
        assert_eq!(vm.state, VmState::Starting);
        assert_eq!(vm.config.as_deref(), Some("/var/tmp/vmha-lab/e2e/shared/vm1.xml"));
        assert_eq!(vm.meta.get("allow-migrate").map(String::as_str), Some("true"));
        assert!(v.vm("fence-lab").is_none(), "only VM agents are VMs");
    }

    #[test]
    fn a_started_vm_runs_where_its_history_says() {
        let x = cib(
            "1",
            "",
            &[("1", "n1", UP, PROBED_STOPPED, ""), ("2", "n2", UP, STARTED, "")],
        );
        let v = ClusterView::from_cib(&x).unwrap();
        let vm = v.vm("vm1").unwrap();
        assert_eq!(vm.state, VmState::Running);
        assert_eq!(vm.hosts, vec!["n2"]);
        assert_eq!(vm.utilization.get("hv_memory").map(String::as_str), Some("128"));
        assert!(v.vm("ip1").is_none());
        assert_eq!(v.version, "0.12.3");
    }

    #[test]
    fn a_monitor_failure_is_a_failed_vm_with_its_fail_count() {
        let died = r#"<lrm_rsc_op id="vm1_last_0" operation="start" call-id="5" rc-code="0" op-status="0" interval="0"/>
            <lrm_rsc_op id="vm1_monitor_10000" operation="monitor" call-id="6" rc-code="7" op-status="0" interval="10000"/>
            <lrm_rsc_op id="vm1_last_failure_0" operation="monitor" call-id="6" rc-code="7" op-status="0" interval="10000"/>"#;
        let fc = r#"<nvpair id="f" name="fail-count-vm1#monitor_10000" value="1"/>"#;
        let v = ClusterView::from_cib(&cib("1", "", &[("1", "n1", UP, died, fc)])).unwrap();
        let vm = v.vm("vm1").unwrap();
        assert_eq!(vm.state, VmState::Failed);
        assert_eq!(vm.failed_on, vec!["n1"]);
        assert_eq!(vm.fail_counts.get("n1"), Some(&1));
    }

    #[test]
    fn a_recovered_vm_is_running_again_despite_its_old_failure() {
        let recovered = r#"<lrm_rsc_op id="vm1_last_failure_0" operation="monitor" call-id="6" rc-code="7" op-status="0" interval="10000"/>
            <lrm_rsc_op id="vm1_last_0" operation="start" call-id="8" rc-code="0" op-status="0" interval="0"/>
            <lrm_rsc_op id="vm1_monitor_10000" operation="monitor" call-id="9" rc-code="0" op-status="0" interval="10000"/>"#;
        let v = ClusterView::from_cib(&cib("1", "", &[("1", "n1", UP, recovered, "")])).unwrap();
        assert_eq!(v.vm("vm1").unwrap().state, VmState::Running);
    }

    #[test]
    fn running_on_two_hosts_is_a_failure() {
        let x = cib("1", "", &[("1", "n1", UP, STARTED, ""), ("2", "n2", UP, STARTED, "")]);
        let vm = ClusterView::from_cib(&x).unwrap().vm("vm1").unwrap().clone();
        assert_eq!(vm.state, VmState::Failed);
        assert_eq!(vm.hosts, vec!["n1", "n2"]);
    }

    #[test]
    fn host_states_unclean_fenced_pending_standby_and_maintenance() {
        let lost = r#"in_ccm="false" crmd="offline" join="member" expected="member""#;
        let fenced = r#"in_ccm="false" crmd="offline" join="down" expected="down""#;
        let joining = r#"in_ccm="1795307033" crmd="0" join="pending" expected="member""#;
        let standby = r#"<nvpair id="s" name="standby" value="on"/>"#;
        let x = cib(
            "1",
            "",
            &[
                ("1", "n1", UP, "", standby),
                ("2", "n2", lost, STARTED, ""),
                ("3", "n3", fenced, STARTED, ""),
                ("4", "n4", joining, "", ""),
            ],
        );
        let v = ClusterView::from_cib(&x).unwrap();
        assert_eq!(v.host("n1").unwrap().state, HostState::Online);
        assert!(v.host("n1").unwrap().standby);
        assert_eq!(v.host("n2").unwrap().state, HostState::Unclean);
        assert_eq!(v.host("n3").unwrap().state, HostState::Offline);
        assert_eq!(v.host("n4").unwrap().state, HostState::Pending);
        // A fenced host's stale history does not count; an unclean host's does (the VM may still run there).
        assert_eq!(v.vm("vm1").unwrap().hosts, vec!["n2"]);
    }

    #[test]
    fn constraints_naming_the_vm_are_summarised() {
        let c = r#"<constraints>
            <rsc_location id="cli-prefer-vm1" rsc="vm1" role="Started" node="n2" score="INFINITY"/>
            <rsc_location id="avoid" rsc="vm1" node="n1" score="-100"/>
            <rsc_colocation id="col" rsc="ip1" with-rsc="vm1" score="INFINITY"/>
            <rsc_order id="ord" first="vm1" then="ip1"/>
            <rsc_location id="other" rsc="ip1" node="n1" score="10"/>
        </constraints>"#;
        let v = ClusterView::from_cib(&cib("1", c, &[("1", "n1", UP, "", "")])).unwrap();
        let summaries: Vec<String> = v
            .vm("vm1")
            .unwrap()
            .constraints
            .iter()
            .map(|c| c.summary.clone())
            .collect();
        assert_eq!(
            summaries,
            vec![
                "vm1 prefers n2 (INFINITY)",
                "vm1 avoids n1 (-100)",
                "ip1 with vm1 (INFINITY)",
                "vm1 then ip1"
            ]
        );
    }

    #[test]
    fn newer_pacemaker_timestamps_mean_up() {
        let ts = r#"in_ccm="1795307033" crmd="1795307034" join="member" expected="member""#;
        let v = ClusterView::from_cib(&cib("1", "", &[("1", "n1", ts, "", "")])).unwrap();
        assert_eq!(v.host("n1").unwrap().state, HostState::Online);
    }

    #[test]
    fn rejects_documents_that_are_not_a_cib() {
        assert!(matches!(
            ClusterView::from_cib("<cib/>"),
            Err(ModelError::MissingSection("configuration"))
        ));
        assert!(matches!(ClusterView::from_cib("not xml"), Err(ModelError::Xml(_))));
    }
}
