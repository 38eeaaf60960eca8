//! The cluster as Pacemaker's CIB describes it: hosts, the DC, quorum and the VM resources with where
//! they run, read from one `cibadmin --query` document (configuration and status).

use std::collections::BTreeMap;

use roxmltree::{Document, Node};
use serde::Serialize;

use crate::group::Elastic;
use crate::policy::Policy;
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
    /// Instance attributes, meta attributes and utilization: shared with the parts the view was built
    /// from ([`Attrs`]), so that building a view per CIB change does not copy them for every VM.
    pub params: Attrs,
    pub meta: Attrs,
    pub utilization: Attrs,
    pub constraints: Vec<Constraint>,
}

/// A resource's name/value pairs of one kind (instance attributes, meta attributes, utilization). Shared:
/// a view built per CIB change points at the ones its unchanged resources already had (cloned as a
/// reference count, compared as a pointer first, dropped without freeing).
pub type Attrs = std::sync::Arc<BTreeMap<String, String>>;

/// The whole cluster as one CIB document describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub cluster_name: Option<String>,
    /// `admin_epoch.epoch.num_updates`: changes whenever the CIB changes.
    pub version: String,
    pub dc: Option<String>,
    pub quorate: bool,
    pub stonith_enabled: bool,
    /// Whether a live clone's capture may stage the template's memory on a tmpfs of its host (cluster
    /// property `vmha-capture-staging`, true unless set false).
    pub capture_staging: bool,
    /// Replication settings of protected virtual clusters (cluster properties `vmha-replicate-VC`, see
    /// [`crate::replica::ReplicationSetting`]): virtual cluster -> the raw value, read when used.
    pub replications: BTreeMap<String, String>,
    pub hosts: Vec<HostView>,
    pub vms: Vec<VmView>,
    /// The virtual clusters: the tags of the configuration's `tags` section (tag id -> the ids it refers
    /// to, in order), as `vmha vcluster list` lists them.
    pub vclusters: BTreeMap<String, Vec<String>>,
    /// The elastic groups of the stored placement policy, as `vmha group list` lists them (none without a
    /// stored policy, or when it does not read).
    pub groups: Vec<Elastic>,
    /// A fingerprint of the stored placement policy's text (cluster property `vmha-policy`); `None`
    /// without one. What follows the policy (its time bounds) reads the CIB again only when this changed,
    /// not on every change of the configuration.
    pub policy_fingerprint: Option<u64>,
}

/// The virtual clusters of a `<tags>` section: each `<tag>`'s id -> the ids of its `<obj_ref>`s, in order.
pub fn tags_of(tags: Node) -> BTreeMap<String, Vec<String>> {
    children(tags, "tag")
        .map(|t| {
            (
                t.attribute("id").unwrap_or("").to_string(),
                children(t, "obj_ref")
                    .filter_map(|n| n.attribute("id").map(str::to_string))
                    .collect(),
            )
        })
        .collect()
}

/// The elastic groups of the policy stored in a `crm_config` section (none when there is no policy or it
/// does not read).
fn groups_of(crm_config: Option<Node>) -> Vec<Elastic> {
    crm_config
        .and_then(crate::policy::stored_json)
        .and_then(|json| Policy::from_json(json).ok())
        .and_then(|p| crate::group::elastic_groups(&p).ok())
        .unwrap_or_default()
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

/// One configured host as the `nodes` section gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeConf {
    id: String,
    name: String,
    attrs: BTreeMap<String, String>,
    utilization: BTreeMap<String, String>,
    /// A placement zone is set on it (`vmha-zone-site`).
    zoned: bool,
}

/// One `<node_state>` of the status section, read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeStateInfo {
    in_ccm: bool,
    crmd: bool,
    join: String,
    expected: String,
    transient: BTreeMap<String, String>,
    /// What each `<lrm_resource>`'s history says, in the document's order.
    history: Vec<(String, HistoryState)>,
}

/// One VM primitive of the resources section, read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prim {
    name: String,
    agent: String,
    params: Attrs,
    meta: Attrs,
    utilization: Attrs,
}

/// A CIB read part by part, so that a change re-reads only the parts it touched ([`CibParts::update`]) and
/// [`CibParts::view`] recombines them: the `<cib>` element's attributes, the `crm_config`, `nodes`,
/// `constraints` and `tags` sections whole, the resources section per top-level element and the status section per
/// `<node_state>`. [`ClusterView::from_cib`] goes through it too, so both ways read the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CibParts {
    version: String,
    dc_uuid: Option<String>,
    quorate: bool,
    crm_config: BTreeMap<String, String>,
    nodes: Vec<NodeConf>,
    /// By id; the last `<node_state>` with an id wins, as in a map built in document order.
    node_states: BTreeMap<String, NodeStateInfo>,
    constraints: BTreeMap<String, Vec<Constraint>>,
    /// The resources section's top-level elements in order: (id, the VM primitives in or under it).
    resources: Vec<(Option<String>, Vec<Prim>)>,
    /// Any `vmha-zone-site` nvpair in the nodes, status or resources sections (a placement policy with zones).
    zoned_nodes: bool,
    /// The `tags` section: the virtual clusters.
    tags: BTreeMap<String, Vec<String>>,
    /// The elastic groups of the policy stored in `crm_config`.
    groups: Vec<Elastic>,
    /// [`ClusterView::policy_fingerprint`], computed when `crm_config` is read.
    policy_fingerprint: Option<u64>,
}

/// What changed in a CIB since it was last read, part by part (see [`CibParts`]): each part as XML text,
/// `None` or empty where the part is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CibUpdate {
    /// The `<cib>` element (its children are not read).
    pub root: String,
    /// Whole sections: `crm_config`, `nodes`, `constraints`, `resources`, `tags` or `status`, with their
    /// element ("" when the CIB has none).
    pub sections: Vec<(String, String)>,
    /// Top-level elements of the resources section by id, after the sections.
    pub resources: Vec<(String, Option<String>)>,
    /// `<node_state>` elements by id, after the sections.
    pub node_states: Vec<(String, Option<String>)>,
}

fn parse_nodes(nodes: Option<Node>) -> Vec<NodeConf> {
    let Some(nodes) = nodes else { return Vec::new() };
    children(nodes, "node")
        .filter(|n| n.attribute("type").is_none_or(|t| t == "member"))
        .filter_map(|node| {
            Some(NodeConf {
                id: node.attribute("id")?.to_string(),
                name: node.attribute("uname")?.to_string(),
                attrs: nvpairs(node, "instance_attributes"),
                // What vmhad and users declare; the placement policy's own (scaled) set is not theirs.
                utilization: crate::policy::effective_nvpairs(node, "utilization", true),
                zoned: false,
            })
        })
        .collect()
}

fn has_zone(node: Option<Node>) -> bool {
    node.is_some_and(|n| {
        n.descendants()
            .any(|d| d.has_tag_name("nvpair") && d.attribute("name") == Some("vmha-zone-site"))
    })
}

fn parse_node_state(s: Node) -> NodeStateInfo {
    let mut history = Vec::new();
    if let Some(lrm_resources) = child(s, "lrm").and_then(|l| child(l, "lrm_resources")) {
        for r in children(lrm_resources, "lrm_resource") {
            if let (Some(rsc), Some(state)) = (r.attribute("id"), history_state(r)) {
                history.push((rsc.to_string(), state));
            }
        }
    }
    NodeStateInfo {
        in_ccm: up_flag(s.attribute("in_ccm")),
        crmd: up_flag(s.attribute("crmd")),
        join: s.attribute("join").unwrap_or("down").to_string(),
        expected: s.attribute("expected").unwrap_or("down").to_string(),
        transient: child(s, "transient_attributes")
            .map(|t| nvpairs(t, "instance_attributes"))
            .unwrap_or_default(),
        history,
    }
}

fn parse_node_states(status: Option<Node>) -> BTreeMap<String, NodeStateInfo> {
    status
        .map(|s| {
            children(s, "node_state")
                .filter_map(|n| Some((n.attribute("id")?.to_string(), parse_node_state(n))))
                .collect()
        })
        .unwrap_or_default()
}

/// The VM primitives in or under one element of the resources section (itself included).
fn vm_primitives(top: Node) -> Vec<Prim> {
    top.descendants()
        .filter(|n| n.has_tag_name("primitive"))
        .filter_map(|p| {
            let class = p.attribute("class").unwrap_or("");
            let provider = p.attribute("provider").unwrap_or("");
            let kind = p.attribute("type").unwrap_or("");
            if !VM_AGENTS
                .iter()
                .any(|(c, pr, t)| *c == class && *pr == provider && *t == kind)
            {
                return None;
            }
            Some(Prim {
                name: p.attribute("id")?.to_string(),
                agent: format!("{class}:{provider}:{kind}"),
                params: Attrs::new(nvpairs(p, "instance_attributes")),
                meta: Attrs::new(nvpairs(p, "meta_attributes")),
                utilization: Attrs::new(nvpairs(p, "utilization")),
            })
        })
        .collect()
}

fn parse_resources(resources: Option<Node>) -> Vec<(Option<String>, Vec<Prim>)> {
    let Some(resources) = resources else { return Vec::new() };
    // Primitives right under the section and the elements holding others, each once, in order.
    resources
        .children()
        .filter(|n| n.is_element())
        .map(|top| (top.attribute("id").map(str::to_string), vm_primitives(top)))
        .collect()
}

fn prim_zoned(p: &Prim) -> bool {
    [&p.params, &p.meta, &p.utilization]
        .iter()
        .any(|m| m.contains_key("vmha-zone-site"))
}

/// The root element of `text`, which must be `<tag>`; `None` for empty text (the part is gone).
fn part<'a, 'i>(doc: &'a Option<Document<'i>>, tag: &str) -> Result<Option<Node<'a, 'i>>, ModelError> {
    match doc {
        None => Ok(None),
        Some(d) if d.root_element().has_tag_name(tag) => Ok(Some(d.root_element())),
        Some(d) => Err(ModelError::Invalid {
            what: "CIB part",
            value: d.root_element().tag_name().name().to_string(),
            why: "is not the element expected there",
        }),
    }
}

fn parse_opt(text: Option<&str>) -> Result<Option<Document<'_>>, ModelError> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => Ok(Some(Document::parse(t)?)),
    }
}

impl CibParts {
    /// Reads a whole CIB (`cibadmin --query` output).
    pub fn from_cib(xml: &str) -> Result<Self, ModelError> {
        let doc = Document::parse(xml)?;
        let cib = doc.root_element();
        let configuration = child(cib, "configuration").ok_or(ModelError::MissingSection("configuration"))?;
        let mut parts = CibParts::default();
        parts.set_root(cib);
        parts.crm_config = crm_config_of(child(configuration, "crm_config"));
        parts.policy_fingerprint = policy_fingerprint(&parts.crm_config);
        parts.groups = groups_of(child(configuration, "crm_config"));
        parts.tags = child(configuration, "tags").map(tags_of).unwrap_or_default();
        parts.nodes = parse_nodes(child(configuration, "nodes"));
        parts.constraints = child(configuration, "constraints")
            .map(constraints_by_resource_owned)
            .unwrap_or_default();
        parts.resources = parse_resources(child(configuration, "resources"));
        parts.node_states = parse_node_states(child(cib, "status"));
        parts.zoned_nodes = has_zone(child(configuration, "nodes"));
        Ok(parts)
    }

    fn set_root(&mut self, cib: Node) {
        self.version = format!(
            "{}.{}.{}",
            cib.attribute("admin_epoch").unwrap_or("0"),
            cib.attribute("epoch").unwrap_or("0"),
            cib.attribute("num_updates").unwrap_or("0")
        );
        self.dc_uuid = cib.attribute("dc-uuid").map(str::to_string);
        self.quorate = cib.attribute("have-quorum").is_some_and(is_true);
    }

    /// Re-reads the parts `update` carries. On error nothing changed (read the CIB whole then).
    pub fn update(&mut self, update: &CibUpdate) -> Result<(), ModelError> {
        // Everything is parsed first, then applied: an error leaves the parts as they were.
        let root = Document::parse(&update.root)?;
        if !root.root_element().has_tag_name("cib") {
            return Err(ModelError::Invalid {
                what: "CIB part",
                value: root.root_element().tag_name().name().to_string(),
                why: "is not <cib>",
            });
        }
        let mut sections = Vec::new();
        for (name, text) in &update.sections {
            sections.push((name.as_str(), parse_opt(Some(text))?));
        }
        let mut resources = Vec::new();
        for (id, text) in &update.resources {
            let doc = parse_opt(text.as_deref())?;
            let prims = match &doc {
                Some(d) if d.root_element().attribute("id") != Some(id.as_str()) => {
                    return Err(ModelError::Invalid {
                        what: "resource part",
                        value: id.clone(),
                        why: "holds an element with another id",
                    })
                }
                Some(d) => Some(vm_primitives(d.root_element())),
                None => None,
            };
            resources.push((id, prims));
        }
        let mut states = Vec::new();
        for (id, text) in &update.node_states {
            let doc = parse_opt(text.as_deref())?;
            let state = match part(&doc, "node_state")? {
                Some(n) if n.attribute("id") != Some(id.as_str()) => {
                    return Err(ModelError::Invalid {
                        what: "node_state part",
                        value: id.clone(),
                        why: "holds an element with another id",
                    })
                }
                Some(n) => Some(parse_node_state(n)),
                None => None,
            };
            states.push((id, state));
        }
        let mut next = Vec::new();
        for (name, doc) in &sections {
            let node = part(doc, name)?;
            next.push(match *name {
                "crm_config" => Section::CrmConfig(crm_config_of(node), groups_of(node)),
                "tags" => Section::Tags(node.map(tags_of).unwrap_or_default()),
                "nodes" => Section::Nodes(parse_nodes(node), has_zone(node)),
                "constraints" => Section::Constraints(node.map(constraints_by_resource_owned).unwrap_or_default()),
                "resources" => Section::Resources(parse_resources(node)),
                "status" => Section::Status(parse_node_states(node)),
                other => {
                    return Err(ModelError::Invalid {
                        what: "CIB section",
                        value: other.to_string(),
                        why: "is not one the view reads by section",
                    })
                }
            });
        }
        // Resources by id must be known ones (a new top-level element comes with its section).
        let mut known = self.resources.clone_ids();
        for s in &next {
            if let Section::Resources(r) = s {
                known = r.clone_ids();
            }
        }
        for (id, prims) in &resources {
            if prims.is_some() && !known.iter().any(|k| k.as_deref() == Some(id.as_str())) {
                return Err(ModelError::Invalid {
                    what: "resource part",
                    value: id.to_string(),
                    why: "names a resource not read before (a new one comes with its section)",
                });
            }
        }

        self.set_root(root.root_element());
        for s in next {
            match s {
                Section::CrmConfig(c, g) => {
                    self.policy_fingerprint = policy_fingerprint(&c);
                    (self.crm_config, self.groups) = (c, g);
                }
                Section::Tags(t) => self.tags = t,
                Section::Nodes(n, z) => (self.nodes, self.zoned_nodes) = (n, z),
                Section::Constraints(c) => self.constraints = c,
                Section::Resources(r) => self.resources = r,
                Section::Status(s) => self.node_states = s,
            }
        }
        for (id, prims) in resources {
            let at = self
                .resources
                .iter()
                .position(|(i, _)| i.as_deref() == Some(id.as_str()));
            match (at, prims) {
                (Some(at), Some(p)) => self.resources[at].1 = p,
                (Some(at), None) => {
                    self.resources.remove(at);
                }
                (None, _) => {}
            }
        }
        for (id, state) in states {
            match state {
                Some(s) => {
                    self.node_states.insert(id.clone(), s);
                }
                None => {
                    self.node_states.remove(id.as_str());
                }
            }
        }
        Ok(())
    }

    /// A placement policy placed hosts in zones (`vmha-zone-site` is set somewhere).
    pub fn zoned(&self) -> bool {
        self.zoned_nodes
            || self
                .node_states
                .values()
                .any(|s| s.transient.contains_key("vmha-zone-site"))
            || self.resources.iter().flat_map(|(_, p)| p).any(prim_zoned)
    }

    /// The cluster these parts describe.
    pub fn view(&self) -> ClusterView {
        let mut hosts = Vec::new();
        let mut names_by_id = BTreeMap::new();
        for node in &self.nodes {
            names_by_id.insert(node.id.as_str(), node.name.as_str());
            let state_node = self.node_states.get(&node.id);
            let transient = state_node.map(|s| &s.transient);
            let flag = |name: &str| {
                node.attrs
                    .get(name)
                    .or_else(|| transient.and_then(|t| t.get(name)))
                    .is_some_and(|v| is_true(v))
            };
            let state = match state_node {
                None => HostState::Offline,
                Some(s) => {
                    if s.in_ccm && s.crmd && s.join == "member" {
                        HostState::Online
                    } else if s.in_ccm {
                        HostState::Pending
                    } else if s.expected == "member" && s.join != "down" {
                        HostState::Unclean
                    } else {
                        HostState::Offline
                    }
                }
            };
            hosts.push(HostView {
                name: node.name.clone(),
                id: node.id.clone(),
                state,
                standby: flag("standby"),
                maintenance: flag("maintenance"),
                utilization: node.utilization.clone(),
            });
        }
        let dc = self
            .dc_uuid
            .as_deref()
            .and_then(|id| names_by_id.get(id))
            .map(|n| n.to_string());

        // Per resource, then host: what the operation history says, and fail counts.
        let mut history: BTreeMap<&str, BTreeMap<&str, HistoryState>> = BTreeMap::new();
        let mut fail_counts: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        for (id, state_node) in &self.node_states {
            let Some(host) = names_by_id.get(id.as_str()).copied() else {
                continue;
            };
            let offline_clean = hosts.iter().any(|h| h.name == host && h.state == HostState::Offline);
            if !offline_clean {
                for (rsc, state) in &state_node.history {
                    history.entry(rsc.as_str()).or_default().insert(host, *state);
                }
            }
            for (name, value) in &state_node.transient {
                let Some(rest) = name.strip_prefix("fail-count-") else {
                    continue;
                };
                let rsc = rest.split('#').next().unwrap_or(rest).to_string();
                let n: u32 = if value == "INFINITY" {
                    1_000_000
                } else {
                    value.parse().unwrap_or(0)
                };
                *fail_counts.entry(rsc).or_default().entry(host.to_string()).or_default() += n;
            }
        }

        let mut vms = Vec::new();
        for p in self.resources.iter().flat_map(|(_, p)| p) {
            let mut hosts_active = Vec::new();
            let mut failed_on = Vec::new();
            let mut pending = None;
            for (host, state) in history.get(p.name.as_str()).into_iter().flatten() {
                match state {
                    HistoryState::Active => hosts_active.push(host.to_string()),
                    HistoryState::Failed => failed_on.push(host.to_string()),
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
                name: p.name.clone(),
                agent: p.agent.clone(),
                config: p.params.get("config").cloned(),
                state,
                hosts: hosts_active,
                failed_on,
                // A VM named twice gets them once (the first), as the whole read did.
                fail_counts: fail_counts.remove(&p.name).unwrap_or_default(),
                target_role: p.meta.get("target-role").cloned(),
                managed: p.meta.get("is-managed").is_none_or(|v| is_true(v)),
                utilization: p.utilization.clone(),
                constraints: Vec::new(),
                params: p.params.clone(),
                meta: p.meta.clone(),
            });
        }
        // Constraints go to the first VM of each name, as the whole read's `remove` did.
        let mut taken = std::collections::BTreeSet::new();
        for vm in &mut vms {
            if taken.insert(vm.name.clone()) {
                if let Some(c) = self.constraints.get(&vm.name) {
                    vm.constraints = c.clone();
                }
            }
        }

        ClusterView {
            cluster_name: self.crm_config.get("cluster-name").cloned(),
            version: self.version.clone(),
            dc,
            quorate: self.quorate,
            stonith_enabled: self.crm_config.get("stonith-enabled").is_none_or(|v| is_true(v)),
            capture_staging: self.crm_config.get("vmha-capture-staging").is_none_or(|v| is_true(v)),
            replications: self
                .crm_config
                .iter()
                .filter_map(|(k, v)| {
                    let vc = k.strip_prefix(crate::replica::REPLICATE_PREFIX)?;
                    (!vc.is_empty()).then(|| (vc.to_string(), v.clone()))
                })
                .collect(),
            hosts,
            vms,
            vclusters: self.tags.clone(),
            groups: self.groups.clone(),
            policy_fingerprint: self.policy_fingerprint,
        }
    }
}

/// A section read for [`CibParts::update`].
enum Section {
    CrmConfig(BTreeMap<String, String>, Vec<Elastic>),
    Tags(BTreeMap<String, Vec<String>>),
    Nodes(Vec<NodeConf>, bool),
    Constraints(BTreeMap<String, Vec<Constraint>>),
    Resources(Vec<(Option<String>, Vec<Prim>)>),
    Status(BTreeMap<String, NodeStateInfo>),
}

trait CloneIds {
    fn clone_ids(&self) -> Vec<Option<String>>;
}

impl CloneIds for Vec<(Option<String>, Vec<Prim>)> {
    fn clone_ids(&self) -> Vec<Option<String>> {
        self.iter().map(|(id, _)| id.clone()).collect()
    }
}

/// A fingerprint of the stored policy's text in `crm_config`'s properties (stable within one process).
fn policy_fingerprint(crm_config: &BTreeMap<String, String>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let text = crm_config.get(crate::policy::STORE_NAME)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    Some(h.finish())
}

fn crm_config_of(node: Option<Node>) -> BTreeMap<String, String> {
    node.map(|c| nvpairs(c, "cluster_property_set")).unwrap_or_default()
}

fn constraints_by_resource_owned(constraints: Node) -> BTreeMap<String, Vec<Constraint>> {
    constraints_by_resource(constraints)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

impl ClusterView {
    /// Reads the cluster from a whole CIB (`cibadmin --query` output).
    pub fn from_cib(xml: &str) -> Result<Self, ModelError> {
        Ok(CibParts::from_cib(xml)?.view())
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

    /// The parts of `xml` as the CIB thread gives them: every section, resource and node_state.
    fn all_parts(xml: &str) -> CibUpdate {
        let doc = Document::parse(xml).unwrap();
        let cib = doc.root_element();
        let text = |n: Node| xml[n.range()].to_string();
        let root_end = xml[cib.range()].find('>').unwrap();
        let mut root = xml[cib.range().start..cib.range().start + root_end].to_string();
        root.push_str("/>");
        let root = root.replace("/>/>", "/>");
        let configuration = child(cib, "configuration").unwrap();
        let mut u = CibUpdate {
            root,
            ..CibUpdate::default()
        };
        for name in ["crm_config", "nodes", "constraints", "tags"] {
            u.sections
                .push((name.into(), child(configuration, name).map(text).unwrap_or_default()));
        }
        if let Some(r) = child(configuration, "resources") {
            for top in r.children().filter(|n| n.is_element()) {
                u.resources.push((top.attribute("id").unwrap().into(), Some(text(top))));
            }
        }
        if let Some(s) = child(cib, "status") {
            for n in children(s, "node_state") {
                u.node_states.push((n.attribute("id").unwrap().into(), Some(text(n))));
            }
        }
        u
    }

    #[test]
    fn parts_updated_read_as_the_whole_cib_does() {
        let lost = r#"in_ccm="false" crmd="offline" join="member" expected="member""#;
        let fc = r#"<nvpair id="f" name="fail-count-vm1#monitor_10000" value="INFINITY"/>"#;
        let c = r#"<constraints><rsc_location id="l" rsc="vm1" node="n2" score="10"/></constraints>"#;
        let docs = [
            cib(
                "1",
                "",
                &[("1", "n1", UP, PROBED_STOPPED, ""), ("2", "n2", UP, STARTED, "")],
            ),
            cib("2", c, &[("1", "n1", UP, STARTED, fc), ("2", "n2", lost, STARTED, "")]),
            cib("1", c, &[("1", "n1", UP, "", "")]),
            STARTING.to_string(),
            cib("2", "", &[("1", "n1", UP, STARTED, ""), ("3", "n3", UP, "", fc)]),
        ];
        for old in &docs {
            for new in &docs {
                let mut parts = CibParts::from_cib(old).unwrap();
                let mut update = all_parts(new);
                // What the old CIB had and the new one has not is sent as gone.
                for (id, _) in all_parts(old).resources {
                    if !update.resources.iter().any(|(i, _)| *i == id) {
                        update.resources.push((id, None));
                    }
                }
                for (id, _) in all_parts(old).node_states {
                    if !update.node_states.iter().any(|(i, _)| *i == id) {
                        update.node_states.push((id, None));
                    }
                }
                // A resource the old CIB lacked comes with its section.
                let known = |id: &str| all_parts(old).resources.iter().any(|(i, _)| i == id);
                if update.resources.iter().any(|(id, p)| p.is_some() && !known(id)) {
                    assert!(
                        parts.clone().update(&update).is_err(),
                        "a new resource needs its section"
                    );
                    let doc = Document::parse(new).unwrap();
                    let section = child(child(doc.root_element(), "configuration").unwrap(), "resources").unwrap();
                    update
                        .sections
                        .push(("resources".into(), new[section.range()].to_string()));
                    update.resources.clear();
                }
                parts.update(&update).unwrap();
                assert_eq!(parts.view(), ClusterView::from_cib(new).unwrap());
                assert_eq!(parts.view(), CibParts::from_cib(new).unwrap().view());
            }
        }
    }

    #[test]
    fn parts_that_do_not_read_change_nothing() {
        let x = cib("1", "", &[("1", "n1", UP, STARTED, "")]);
        let parts = CibParts::from_cib(&x).unwrap();
        let good = all_parts(&x);
        let bad = [
            CibUpdate {
                root: "not xml".into(),
                ..good.clone()
            },
            CibUpdate {
                root: "<node/>".into(),
                ..good.clone()
            },
            CibUpdate {
                sections: vec![("nodes".into(), "<resources/>".into())],
                ..good.clone()
            },
            CibUpdate {
                sections: vec![("acls".into(), "<acls/>".into())],
                ..good.clone()
            },
            CibUpdate {
                resources: vec![("vm1".into(), Some(r#"<primitive id="other"/>"#.into()))],
                ..good.clone()
            },
            CibUpdate {
                resources: vec![("vm9".into(), Some(r#"<primitive id="vm9"/>"#.into()))],
                ..good.clone()
            },
            CibUpdate {
                node_states: vec![("1".into(), Some(r#"<node_state id="2"/>"#.into()))],
                ..good.clone()
            },
            CibUpdate {
                node_states: vec![("1".into(), Some(r#"<lrm id="1"/>"#.into()))],
                ..good.clone()
            },
            CibUpdate {
                node_states: vec![("1".into(), Some("<node_state id='1'".into()))],
                ..good.clone()
            },
        ];
        for update in bad {
            let mut p = parts.clone();
            assert!(p.update(&update).is_err(), "{update:?}");
            assert_eq!(p, parts, "a refused update changed nothing");
        }
        // A removed VM and node_state, and an emptied section.
        let mut p = parts.clone();
        p.update(&CibUpdate {
            root: good.root.clone(),
            sections: vec![("crm_config".into(), String::new())],
            resources: vec![("vm1".into(), None)],
            node_states: vec![("1".into(), None)],
        })
        .unwrap();
        let v = p.view();
        assert!(v.vm("vm1").is_none());
        assert_eq!(v.host("n1").unwrap().state, HostState::Offline);
        assert_eq!(v.cluster_name, None);
    }

    /// A view built after a change shares the attributes of the VMs the change did not touch with the
    /// view before it (no copy per VM and change), and has new ones where it did.
    #[test]
    fn views_share_the_attributes_of_untouched_vms() {
        let nodes = [("1", "n1", UP, STARTED, "")];
        let old = cib("1", "", &nodes);
        let mut parts = CibParts::from_cib(&old).unwrap();
        let before = parts.view();
        let vm = |v: &ClusterView| v.vm("vm1").unwrap().clone();
        // The status changes (the VM stops): its attributes are the same allocations.
        let stopped = cib("1", "", &[("1", "n1", UP, PROBED_STOPPED, "")]);
        let mut update = all_parts(&stopped);
        update.sections.clear();
        update.resources.clear();
        parts.update(&update).unwrap();
        let after = parts.view();
        assert_ne!(vm(&before).state, vm(&after).state);
        for (a, b) in [
            (&vm(&before).params, &vm(&after).params),
            (&vm(&before).meta, &vm(&after).meta),
            (&vm(&before).utilization, &vm(&after).utilization),
        ] {
            assert!(std::sync::Arc::ptr_eq(a, b), "shared: {a:?}");
        }
        // Its primitive changes: new attributes, with the new value.
        let grown = stopped.replace(r#"name="hv_memory" value="128""#, r#"name="hv_memory" value="256""#);
        let mut update = all_parts(&grown);
        update.sections.clear();
        update.node_states.clear();
        parts.update(&update).unwrap();
        let grown_view = parts.view();
        assert!(!std::sync::Arc::ptr_eq(
            &vm(&after).utilization,
            &vm(&grown_view).utilization
        ));
        assert_eq!(vm(&grown_view).utilization["hv_memory"], "256");
        assert_eq!(grown_view, ClusterView::from_cib(&grown).unwrap());
    }

    #[test]
    fn virtual_clusters_and_elastic_groups_read_whole_and_by_parts() {
        let nodes = [("1", "n1", UP, STARTED, "")];
        let plain = cib("1", "", &nodes);
        let with_policy = |json: &str| {
            let set = format!(
                r#"<cluster_property_set id="vmha-policy"><nvpair id="vmha-policy-p" name="vmha-policy" value="{}"/></cluster_property_set></crm_config>"#,
                crate::change::escape(json)
            );
            let tags = r#"<tags><tag id="shop"><obj_ref id="vm1"/><obj_ref id="ip1"/></tag><tag id="solo"><obj_ref id="ip1"/></tag></tags>"#;
            cib("1", tags, &nodes).replacen("</crm_config>", &set, 1)
        };
        let full = with_policy(
            r#"{"groups": {"web": {"members": ["vm1"], "template": "vm1", "min": 1, "max": 3},
                           "plain": {"members": ["ip1"]}}}"#,
        );
        let v = ClusterView::from_cib(&full).unwrap();
        let shop: Vec<String> = vec!["vm1".into(), "ip1".into()];
        assert_eq!(v.vclusters.get("shop"), Some(&shop));
        assert_eq!(v.vclusters.get("solo"), Some(&vec!["ip1".to_string()]));
        assert_eq!(v.vclusters.len(), 2);
        assert_eq!(v.groups.len(), 1, "only the elastic group: {:?}", v.groups);
        let web = &v.groups[0];
        assert_eq!(
            (web.name.as_str(), web.template.as_str(), web.min, web.max, &web.members),
            ("web", "vm1", 1, 3, &vec!["vm1".to_string()])
        );
        let none = ClusterView::from_cib(&plain).unwrap();
        assert!(none.vclusters.is_empty() && none.groups.is_empty());
        // A stored policy that does not read lists no groups (the tags still read).
        let broken = ClusterView::from_cib(&with_policy("{not json")).unwrap();
        assert!(broken.groups.is_empty());
        assert_eq!(broken.vclusters.len(), 2);
        // By parts, both ways: the crm_config and tags sections carry them.
        for (old, new) in [(&plain, &full), (&full, &plain)] {
            let mut parts = CibParts::from_cib(old).unwrap();
            parts.update(&all_parts(new)).unwrap();
            assert_eq!(parts.view(), ClusterView::from_cib(new).unwrap());
        }
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
