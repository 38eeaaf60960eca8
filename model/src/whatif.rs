//! What-if: the copy of the live CIB Pacemaker's scheduler is run on (hosts failed, a VM added), and what
//! the transition graph it computes means for each VM and for each zone's capacity.

use std::collections::{BTreeMap, BTreeSet};

use roxmltree::{Document, Node};
use serde::Serialize;

use crate::cib::{ClusterView, HostState};
use crate::policy::{effective_nvpairs, write_xml, write_xml_with, Attributes, Policy, PolicyError, LEVELS};

fn invalid<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError::Invalid(msg.into()))
}

/// The hosts of the cluster with their zone (the deepest `vmha-zone-*` node attribute the policy set), or
/// `None` for hosts in no zone.
pub fn host_zones(cib: &str) -> Result<BTreeMap<String, Option<String>>, PolicyError> {
    Ok(host_zones_of(&Document::parse(cib)?))
}

fn host_zones_of(doc: &Document) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for node in doc.descendants().filter(|n| n.has_tag_name("node")) {
        let Some(name) = node.attribute("uname") else { continue };
        if node.parent().is_none_or(|p| !p.has_tag_name("nodes")) {
            continue;
        }
        let attrs = effective_nvpairs(node, "instance_attributes", false);
        let zone = LEVELS.iter().rev().find_map(|l| attrs.get(&l.attribute()).cloned());
        out.insert(name.to_string(), zone);
    }
    out
}

/// The hosts in `zone` (or under it), by the node attributes in the CIB.
pub fn hosts_in_zone(cib: &str, zone: &str) -> Result<Vec<String>, PolicyError> {
    let hosts: Vec<String> = host_zones(cib)?
        .into_iter()
        .filter(|(_, z)| z.as_deref().is_some_and(|z| crate::policy::zone_within(z, zone)))
        .map(|(h, _)| h)
        .collect();
    if hosts.is_empty() {
        return invalid(format!(
            "no host is in zone {zone} (apply a policy that places hosts in zones)"
        ));
    }
    Ok(hosts)
}

/// The whole CIB `cib` with its configuration section replaced by `configuration` (a `<configuration>`
/// element): the CIB a replace of that section would leave, for the scheduler to run on.
pub fn with_configuration(cib: &str, configuration: &str) -> Result<String, PolicyError> {
    let doc = Document::parse(cib)?;
    let old = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("configuration"))
        .ok_or_else(|| PolicyError::Invalid("the CIB has no <configuration> section".into()))?;
    let new = Document::parse(configuration)?;
    if !new.root_element().has_tag_name("configuration") {
        return invalid("the replacement is not a <configuration> element");
    }
    let range = old.range();
    Ok(format!("{}{}{}", &cib[..range.start], configuration, &cib[range.end..]))
}

/// The whole CIB with `hosts` failed and fenced: cleanly down (`in_ccm` false, `crmd` offline, join and
/// expected down), their resource history and transient attributes gone — what the CIB says once the
/// cluster fenced them.
pub fn fail_hosts(cib: &str, hosts: &[String]) -> Result<String, PolicyError> {
    fail_hosts_in(&Document::parse(cib)?, &ClusterView::from_cib(cib)?, hosts)
}

/// [`fail_hosts`] on the CIB `doc` already parsed, `view` its cluster view.
fn fail_hosts_in(doc: &Document, view: &ClusterView, hosts: &[String]) -> Result<String, PolicyError> {
    let mut ids = BTreeSet::new();
    for h in hosts {
        match view.host(h) {
            Some(host) => {
                ids.insert(host.id.clone());
            }
            None => return invalid(format!("host {h}: not a node of this cluster")),
        }
    }
    let in_failed_state = |n: Node| {
        n.parent()
            .is_some_and(|p| p.has_tag_name("node_state") && p.attribute("id").is_some_and(|id| ids.contains(id)))
    };
    let skip = |n: Node| (n.has_tag_name("lrm") || n.has_tag_name("transient_attributes")) && in_failed_state(n);
    let attributes = |n: Node| -> Option<Attributes> {
        if !(n.has_tag_name("node_state") && n.attribute("id").is_some_and(|id| ids.contains(id))) {
            return None;
        }
        let mut attrs: Vec<(String, String)> = n
            .attributes()
            .map(|a| (a.name().to_string(), a.value().to_string()))
            .collect();
        for (name, value) in [
            ("in_ccm", "false"),
            ("crmd", "offline"),
            ("join", "down"),
            ("expected", "down"),
        ] {
            match attrs.iter_mut().find(|(k, _)| k == name) {
                Some(a) => a.1 = value.to_string(),
                None => attrs.push((name.to_string(), value.to_string())),
            }
        }
        Some(attrs)
    };
    let mut out = String::new();
    write_xml_with(doc.root_element(), &mut out, &skip, &|_| Vec::new(), &attributes);
    Ok(out)
}

/// The whole CIB with `primitive` (a VM resource's XML) added to its resources.
pub fn add_resource(cib: &str, primitive: &str) -> Result<String, PolicyError> {
    let new = Document::parse(primitive)?;
    let id = new.root_element().attribute("id").unwrap_or("");
    let doc = Document::parse(cib)?;
    if doc.descendants().any(|n| n.attribute("id") == Some(id)) {
        return invalid(format!("{id} already exists in the CIB"));
    }
    let append = |n: Node| {
        if n.has_tag_name("resources") && n.parent().is_some_and(|p| p.has_tag_name("configuration")) {
            vec![primitive.to_string()]
        } else {
            Vec::new()
        }
    };
    let mut out = String::new();
    write_xml(doc.root_element(), &mut out, &|_| false, &append);
    Ok(out)
}

/// The whole CIB with booth `tickets` granted to this cluster (`status/tickets`: each ticket's
/// `ticket_state` granted and not on standby, created when missing) — what the CIB says once booth granted
/// them here, for the scheduler to run on (`vmha site what-if`). Ticket names are checked as booth's.
pub fn grant_tickets(cib: &str, tickets: &[String]) -> Result<String, PolicyError> {
    for t in tickets {
        crate::site::validate_ticket(t).map_err(|e| PolicyError::Invalid(e.to_string()))?;
    }
    let doc = Document::parse(cib)?;
    let root = doc.root_element();
    let Some(status) = root.children().find(|n| n.has_tag_name("status")) else {
        return invalid("the CIB has no status section");
    };
    let ticket_list = status.children().find(|n| n.has_tag_name("tickets"));
    let present: BTreeSet<&str> = ticket_list
        .iter()
        .flat_map(|l| l.children())
        .filter(|n| n.has_tag_name("ticket_state"))
        .filter_map(|n| n.attribute("id"))
        .collect();
    let missing: Vec<String> = tickets
        .iter()
        .filter(|t| !present.contains(t.as_str()))
        .map(|t| format!(r#"<ticket_state id="{t}" granted="true"/>"#))
        .collect();
    let append = |n: Node| -> Vec<String> {
        if ticket_list.is_some_and(|l| l == n) {
            missing.clone()
        } else if ticket_list.is_none() && n == status {
            vec![format!("<tickets>{}</tickets>", missing.concat())]
        } else {
            Vec::new()
        }
    };
    let attributes = |n: Node| -> Option<Attributes> {
        let id = n.attribute("id")?;
        if !(n.has_tag_name("ticket_state")
            && n.parent().is_some_and(|p| ticket_list == Some(p))
            && tickets.iter().any(|t| t == id))
        {
            return None;
        }
        let mut attrs: Vec<(String, String)> = n
            .attributes()
            .filter(|a| a.name() != "granted" && a.name() != "standby")
            .map(|a| (a.name().to_string(), a.value().to_string()))
            .collect();
        attrs.push(("granted".into(), "true".into()));
        Some(attrs)
    };
    let mut out = String::new();
    write_xml_with(root, &mut out, &|_| false, &append, &attributes);
    Ok(out)
}

/// The live CIB read once for several events (`vmha what-if --n-plus-one` asks one per host): each event's
/// copy and prediction are exactly those of [`fail_hosts`], [`add_resource`],
/// [`crate::failover::with_free_capacity`] and [`predict`], without parsing the live CIB again per event.
#[derive(Debug)]
pub struct Events<'a> {
    doc: Document<'a>,
    view: ClusterView,
    policy: Option<Policy>,
}

impl<'a> Events<'a> {
    pub fn new(live: &'a str) -> Result<Self, PolicyError> {
        Ok(Events {
            doc: Document::parse(live)?,
            view: ClusterView::from_cib(live)?,
            policy: Policy::from_cib(live).ok().flatten(),
        })
    }

    /// The live CIB's cluster view.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// The CIB the scheduler runs on for the event: `failed` hosts failed and fenced, `primitive` (a VM
    /// resource's XML) added, the free capacity of every online host set as vmhad keeps it.
    pub fn copy(&self, failed: &[String], primitive: Option<&str>) -> Result<String, PolicyError> {
        let mut copy = fail_hosts_in(&self.doc, &self.view, failed)?;
        if let Some(p) = primitive {
            copy = add_resource(&copy, p)?;
        }
        crate::failover::with_free_capacity(&copy)
    }

    /// What the transition graph `graph` the scheduler computed on `copy` means (see [`predict`]).
    pub fn predict(
        &self,
        copy: &str,
        graph: &str,
        failed_hosts: &[String],
        added_vm: Option<&str>,
    ) -> Result<Prediction, PolicyError> {
        predict_in(&self.view, self.policy.as_ref(), copy, graph, failed_hosts, added_vm)
    }
}

/// Id of the resource defaults [`scheduler_input`] adds.
pub const NO_FAILURES_ID: &str = "vmha-what-if-no-failures";

/// Id prefix of the meta attributes [`scheduler_input`] gives a resource with a fail count (the resource's id
/// follows).
pub const KEEP_THRESHOLD_ID: &str = "vmha-what-if-keep-threshold-";

/// The text to hand Pacemaker's scheduler for `copy`: `copy` with `migration-threshold=0` in a resource defaults
/// set of score INFINITY, and each resource that has a fail count keeping the threshold it had; or `copy` itself
/// when that cannot be done safely.
///
/// Same answer, less work: the scheduler reads a resource's migration-threshold in one place only
/// (`pcmk__threshold_reached`, Pacemaker 2.1.5), which returns "not reached" either when the threshold is
/// 0 or when the resource's fail count on the node is 0. What the threshold of 0 saves: that check asks
/// `pe_get_failcount` for every resource on every node (32 x 2000 pairs at the scale bench's size), which
/// compiles two regular expressions per pair, two thirds of the scheduler's time there (1.5 s against 0.5 s).
///
/// Resources with a `fail-count-*` attribute on some node (a real cluster usually has a few) keep their
/// threshold: when no `migration-threshold` is set anywhere in the CIB, every resource's threshold is Pacemaker's
/// default, INFINITY, so each of them gets a meta attributes set of its own saying so, which wins over resource
/// defaults. Conservative: a `migration-threshold` anywhere while some fail count exists (a resource's own,
/// a group's or clone's, or a default, maybe under a rule), a fail count of a resource not found as a primitive
/// or whose id has other characters than letters, digits, `-`, `_` and `.`, `fail-count-` text in the
/// configuration, a set of these ids already there, or an unexpected shape leaves `copy` as it is.
pub fn scheduler_input(copy: &str) -> Result<std::borrow::Cow<'_, str>, PolicyError> {
    use std::borrow::Cow;
    if copy.contains(NO_FAILURES_ID) || copy.contains(KEEP_THRESHOLD_ID) {
        return Ok(Cow::Borrowed(copy));
    }
    let doc = Document::parse(copy)?;
    let root = doc.root_element();
    let Some(config) = root.children().find(|n| n.has_tag_name("configuration")) else {
        return Ok(Cow::Borrowed(copy));
    };
    if copy[config.range()].contains("fail-count-") {
        return Ok(Cow::Borrowed(copy));
    }
    // The resources with a fail count on some node.
    let mut failing = BTreeSet::new();
    for status in root.children().filter(|n| n.has_tag_name("status")) {
        for name in status
            .descendants()
            .filter(|n| n.has_tag_name("nvpair"))
            .filter_map(|n| n.attribute("name")?.strip_prefix("fail-count-"))
        {
            // fail-count-RSC#OP_INTERVAL (fail-count-RSC before Pacemaker 2.0); a clone instance's RSC ends in :N.
            let rsc = name.split_once('#').map_or(name, |(rsc, _)| rsc);
            let rsc = match rsc.rsplit_once(':') {
                Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
                _ => rsc,
            };
            failing.insert(rsc);
        }
    }
    if !failing.is_empty() && copy.contains("migration-threshold") {
        return Ok(Cow::Borrowed(copy));
    }
    // What goes where: (start, end, text) of each replaced range, none overlapping.
    let mut splices: Vec<(usize, usize, String)> = Vec::new();
    for rsc in &failing {
        // Written into an id below: only what Pacemaker's ids are made of (its schema checks them as XML IDs).
        if !rsc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Ok(Cow::Borrowed(copy));
        }
        let Some(primitive) = config
            .descendants()
            .find(|n| n.has_tag_name("primitive") && n.attribute("id") == Some(*rsc))
        else {
            return Ok(Cow::Borrowed(copy));
        };
        let set = format!(
            r#"<meta_attributes id="{KEEP_THRESHOLD_ID}{rsc}"><nvpair id="{KEEP_THRESHOLD_ID}{rsc}-migration-threshold" name="migration-threshold" value="INFINITY"/></meta_attributes>"#
        );
        let Some(splice) = last_child(copy, primitive, "primitive", set) else {
            return Ok(Cow::Borrowed(copy));
        };
        splices.push(splice);
    }
    let set = format!(
        r#"<meta_attributes id="{NO_FAILURES_ID}" score="INFINITY"><nvpair id="{NO_FAILURES_ID}-migration-threshold" name="migration-threshold" value="0"/></meta_attributes>"#
    );
    let defaults = config
        .children()
        .filter(|n| n.has_tag_name("rsc_defaults"))
        .collect::<Vec<_>>();
    match defaults.as_slice() {
        [] => {
            let r = config.range();
            let close = "</configuration>";
            if !copy[r.clone()].ends_with(close) {
                return Ok(Cow::Borrowed(copy));
            }
            let at = r.end - close.len();
            splices.push((at, at, format!("<rsc_defaults>{set}</rsc_defaults>")));
        }
        [d] => {
            let Some(splice) = last_child(copy, *d, "rsc_defaults", set) else {
                return Ok(Cow::Borrowed(copy));
            };
            splices.push(splice);
        }
        _ => return Ok(Cow::Borrowed(copy)),
    }
    splices.sort_by_key(|&(start, _, _)| start);
    let mut out = String::with_capacity(copy.len() + splices.iter().map(|(_, _, t)| t.len()).sum::<usize>());
    let mut from = 0;
    for (start, end, text) in &splices {
        out.push_str(&copy[from..*start]);
        out.push_str(text);
        from = *end;
    }
    out.push_str(&copy[from..]);
    Ok(Cow::Owned(out))
}

/// The splice (start, end, text) of `copy` that makes `child` the last child of `element` (a `<tag>` written
/// either empty, `<tag .../>`, or with its end tag): `None` for any other shape.
fn last_child(copy: &str, element: Node<'_, '_>, tag: &str, child: String) -> Option<(usize, usize, String)> {
    let r = element.range();
    let text = &copy[r.clone()];
    let close = format!("</{tag}>");
    if text.ends_with("/>") {
        Some((r.end - 2, r.end, format!(">{child}{close}")))
    } else if text.ends_with(&close) {
        let at = r.end - close.len();
        Some((at, at, child))
    } else {
        None
    }
}

/// One resource operation of a transition graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphAction {
    pub resource: String,
    pub operation: String,
    pub host: String,
}

/// The resource operations (not pseudo-events) of a transition graph (`<transition_graph>`).
pub fn graph_actions(graph: &str) -> Result<Vec<GraphAction>, PolicyError> {
    let doc = Document::parse(graph)?;
    if !doc.root_element().has_tag_name("transition_graph") {
        return invalid("not a transition graph");
    }
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("rsc_op"))
        .filter_map(|op| {
            let primitive = op.children().find(|c| c.has_tag_name("primitive"))?;
            Some(GraphAction {
                resource: primitive
                    .attribute("long-id")
                    .or(primitive.attribute("id"))?
                    .to_string(),
                operation: op.attribute("operation")?.to_string(),
                host: op.attribute("on_node")?.to_string(),
            })
        })
        .collect())
}

/// What happens to one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum VmOutcome {
    /// Keeps running where it runs.
    Stays { host: String },
    /// Runs elsewhere (restarted or migrated).
    Moves { from: String, to: String },
    /// Was running, would be stopped: no host has room for it (or none may take it).
    Stops { from: String },
    /// Not running, would start.
    Starts { to: String },
    /// Not running and would not start although it should run.
    StaysStopped,
}

/// One VM's prediction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmPrediction {
    pub vm: String,
    pub priority: i64,
    #[serde(flatten)]
    pub outcome: VmOutcome,
    /// The step of the failover order that placed it (1-5, see [`crate::failover`]); `None` when it keeps
    /// its host or gets none.
    pub step: Option<u8>,
    /// Why it ends up where it does, for people (the step, or who displaced it).
    pub step_label: String,
    /// The VMs that took its place on its host (empty unless it was displaced).
    pub displaced_by: Vec<String>,
}

/// Capacity left in one zone after the event (sum over its surviving hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZoneCapacity {
    /// Zone path, or `-` for hosts in no zone.
    pub zone: String,
    pub hosts: Vec<String>,
    /// Utilization name -> capacity of the surviving hosts.
    pub capacity: BTreeMap<String, i64>,
    /// Utilization name -> what is left once the predicted VMs run.
    pub free: BTreeMap<String, i64>,
}

/// The scheduler's answer to one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prediction {
    pub failed_hosts: Vec<String>,
    pub added_vm: Option<String>,
    pub vms: Vec<VmPrediction>,
    pub zones: Vec<ZoneCapacity>,
}

impl Prediction {
    /// VMs that would not run although they ran before (or should run).
    pub fn without_place(&self) -> Vec<&str> {
        self.vms
            .iter()
            .filter(|v| matches!(v.outcome, VmOutcome::Stops { .. } | VmOutcome::StaysStopped))
            .map(|v| v.vm.as_str())
            .collect()
    }

    /// Where each VM would run (`None`: stopped).
    pub fn placement(&self) -> BTreeMap<String, Option<String>> {
        self.vms
            .iter()
            .map(|v| {
                let host = match &v.outcome {
                    VmOutcome::Stays { host } => Some(host.clone()),
                    VmOutcome::Moves { to, .. } | VmOutcome::Starts { to } => Some(to.clone()),
                    VmOutcome::Stops { .. } | VmOutcome::StaysStopped => None,
                };
                (v.vm.clone(), host)
            })
            .collect()
    }
}

/// Names the failover step of each VM in `vms` (sorted highest priority first): a VM that lands on a host
/// where the free capacity before the event (less what higher-priority VMs took there first) covered its
/// needs took free room (steps 1-3), else it took the place of the VMs that leave that host (4-5).
fn label_steps(policy: Option<&Policy>, copy: &Document, after: &ClusterView, vms: &mut [VmPrediction]) {
    use crate::failover::{displaced_from, fits, free_capacity_of, host_places_of, step_for};
    let mut free = free_capacity_of(copy, after);
    let places = host_places_of(copy);
    // Where each VM runs in the copy (the event applied, before the scheduler acts).
    let before: BTreeMap<String, Option<String>> = after
        .vms
        .iter()
        .map(|v| (v.name.clone(), v.hosts.first().cloned()))
        .collect();
    let after_hosts: BTreeMap<String, Option<String>> = vms
        .iter()
        .map(|v| {
            let h = match &v.outcome {
                VmOutcome::Stays { host } => Some(host.clone()),
                VmOutcome::Moves { to, .. } | VmOutcome::Starts { to } => Some(to.clone()),
                _ => None,
            };
            (v.vm.clone(), h)
        })
        .collect();
    let newcomers = |host: &str| -> Vec<String> {
        after_hosts
            .iter()
            .filter(|(vm, h)| h.as_deref() == Some(host) && before.get(*vm).cloned().flatten().as_deref() != Some(host))
            .map(|(vm, _)| vm.clone())
            .collect()
    };
    for v in vms.iter_mut() {
        let needs = after.vm(&v.vm).map(|x| x.utilization.clone()).unwrap_or_default();
        match v.outcome.clone() {
            VmOutcome::Moves { to, .. } | VmOutcome::Starts { to } => {
                let room = fits(free.get(&to), &needs);
                if let Some(f) = free.get_mut(&to) {
                    for (k, need) in needs.iter() {
                        if let Some(x) = f.get_mut(k) {
                            *x -= int(need);
                        }
                    }
                }
                let displaced = displaced_from(&to, &before, &after_hosts);
                let place = places.get(&to).cloned().unwrap_or_default();
                let taken = step_for(policy, &v.vm, &to, &place, room, &displaced);
                v.step = Some(taken.step);
                v.step_label = taken.label;
            }
            VmOutcome::Stays { .. } => v.step_label = "keeps its host".into(),
            VmOutcome::Stops { .. } | VmOutcome::StaysStopped => {
                v.step_label = "no host of its class has room, and no lower-priority VM to take the place of".into()
            }
        }
        // Displaced: it ran on a host that survives and others took its place there.
        if let Some(Some(was)) = before.get(&v.vm) {
            if after_hosts.get(&v.vm).cloned().flatten().as_deref() != Some(was.as_str()) {
                let by = newcomers(was);
                if !by.is_empty() {
                    let how = match v.step {
                        Some(_) => format!("; {}", v.step_label),
                        None => "; no free room left for it".to_string(),
                    };
                    // Arbitration between elastic groups: every newcomer of one other group with a
                    // priority took the place of this member (or VM).
                    let group_of = |vm: &str| -> Option<&str> {
                        let p = policy.filter(|p| crate::group::arbitrated(p))?;
                        p.groups
                            .iter()
                            .find(|(_, g)| g.is_elastic() && g.members.iter().any(|m| m == vm))
                            .map(|(n, _)| n.as_str())
                    };
                    let by_group = group_of(&by[0])
                        .filter(|g| by.iter().all(|b| group_of(b) == Some(*g)) && group_of(&v.vm) != Some(*g));
                    let preempted = by_group.map_or(String::new(), |g| format!(" (preempted by group {g})"));
                    v.step_label = format!("displaced from {was} by {}{preempted}{how}", by.join(", "));
                    v.displaced_by = by;
                }
            }
        }
    }
}

fn int(v: &str) -> i64 {
    v.parse().unwrap_or(0)
}

/// Reads the scheduler's transition graph for the event: `live` is the live CIB, `copy` the CIB the
/// scheduler ran on (the event applied), `graph` its transition graph.
pub fn predict(
    live: &str,
    copy: &str,
    graph: &str,
    failed_hosts: &[String],
    added_vm: Option<&str>,
) -> Result<Prediction, PolicyError> {
    let before = ClusterView::from_cib(live)?;
    let policy = Policy::from_cib(live).ok().flatten();
    predict_in(&before, policy.as_ref(), copy, graph, failed_hosts, added_vm)
}

/// [`predict`] with the live CIB's view and stored policy already read.
fn predict_in(
    before: &ClusterView,
    policy: Option<&Policy>,
    copy: &str,
    graph: &str,
    failed_hosts: &[String],
    added_vm: Option<&str>,
) -> Result<Prediction, PolicyError> {
    let after_view = ClusterView::from_cib(copy)?;
    let doc = Document::parse(copy)?;
    let actions = graph_actions(graph)?;
    let mut vms = Vec::new();
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    for vm in &after_view.vms {
        let mut hosts: BTreeSet<String> = vm.hosts.iter().cloned().collect();
        for a in actions.iter().filter(|a| a.resource == vm.name) {
            match a.operation.as_str() {
                "stop" | "migrate_to" => {
                    hosts.remove(&a.host);
                }
                "start" | "migrate_from" => {
                    hosts.insert(a.host.clone());
                }
                _ => {}
            }
        }
        let was = before.vm(&vm.name).and_then(|v| v.hosts.first().cloned());
        let now = hosts.into_iter().next();
        let wanted = vm
            .target_role
            .as_deref()
            .is_none_or(|r| !r.eq_ignore_ascii_case("stopped"));
        let outcome = match (was, now) {
            (Some(a), Some(b)) if a == b => VmOutcome::Stays { host: b },
            (Some(a), Some(b)) => VmOutcome::Moves { from: a, to: b },
            (Some(a), None) => VmOutcome::Stops { from: a },
            (None, Some(b)) => VmOutcome::Starts { to: b },
            (None, None) if wanted => VmOutcome::StaysStopped,
            (None, None) => continue,
        };
        if let VmOutcome::Stays { host: h } | VmOutcome::Moves { to: h, .. } | VmOutcome::Starts { to: h } = &outcome {
            placed.insert(vm.name.clone(), h.clone());
        }
        vms.push(VmPrediction {
            vm: vm.name.clone(),
            priority: vm.meta.get("priority").map(|p| int(p)).unwrap_or(0),
            outcome,
            step: None,
            step_label: String::new(),
            displaced_by: Vec::new(),
        });
    }
    vms.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.vm.cmp(&b.vm)));
    label_steps(policy, &doc, &after_view, &mut vms);

    // Capacity per zone: the scheduler's view of each surviving host's capacity, minus the predicted VMs.
    let zones = host_zones_of(&doc);
    let mut capacity: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for node in doc
        .descendants()
        .filter(|n| n.has_tag_name("node") && n.parent().is_some_and(|p| p.has_tag_name("nodes")))
    {
        let Some(name) = node.attribute("uname") else { continue };
        let up = after_view
            .host(name)
            .is_some_and(|h| h.state == HostState::Online && !h.standby);
        if !up || failed_hosts.iter().any(|f| f == name) {
            continue;
        }
        let util = effective_nvpairs(node, "utilization", false)
            .into_iter()
            .map(|(k, v)| (k, int(&v)))
            .collect();
        capacity.insert(name.to_string(), util);
    }
    // A host counts in its zone and in every zone above it (`a/r1` counts in `a`).
    let zones_of = |host: &str| -> Vec<String> {
        match zones.get(host).cloned().flatten() {
            Some(z) => LEVELS.iter().filter_map(|l| crate::policy::zone_at(&z, *l)).collect(),
            None => vec!["-".to_string()],
        }
    };
    let mut by_zone: BTreeMap<String, ZoneCapacity> = BTreeMap::new();
    for (host, cap) in &capacity {
        for zone in zones_of(host) {
            let entry = by_zone.entry(zone.clone()).or_insert_with(|| ZoneCapacity {
                zone,
                hosts: Vec::new(),
                capacity: BTreeMap::new(),
                free: BTreeMap::new(),
            });
            entry.hosts.push(host.clone());
            for (k, v) in cap {
                *entry.capacity.entry(k.clone()).or_default() += v;
                *entry.free.entry(k.clone()).or_default() += v;
            }
        }
    }
    for (vm, host) in &placed {
        let Some(v) = after_view.vm(vm) else { continue };
        for zone in zones_of(host) {
            let Some(z) = by_zone.get_mut(&zone) else { continue };
            for (k, need) in v.utilization.iter() {
                if let Some(free) = z.free.get_mut(k) {
                    *free -= int(need);
                }
            }
        }
    }
    Ok(Prediction {
        failed_hosts: failed_hosts.to_vec(),
        added_vm: added_vm.map(str::to_string),
        vms,
        zones: by_zone.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<cib admin_epoch="0" epoch="9" num_updates="1">
<configuration><crm_config/>
<nodes>
  <node id="1" uname="n1"><instance_attributes id="vmha-policy-node-1" score="1000"><nvpair id="a1" name="vmha-zone-site" value="a"/></instance_attributes><utilization id="u1"><nvpair id="u1m" name="hv_memory" value="256"/></utilization></node>
  <node id="2" uname="n2"><instance_attributes id="vmha-policy-node-2" score="1000"><nvpair id="a2" name="vmha-zone-site" value="a"/><nvpair id="a2b" name="vmha-zone-building" value="a/x"/></instance_attributes><utilization id="u2"><nvpair id="u2m" name="hv_memory" value="512"/></utilization><utilization id="vmha-policy-node-2-utilization" score="1000"><nvpair id="p2m" name="hv_memory" value="128"/></utilization></node>
  <node id="3" uname="n3"><instance_attributes id="vmha-policy-node-3" score="1000"><nvpair id="a3" name="vmha-zone-site" value="b"/></instance_attributes><utilization id="u3"><nvpair id="u3m" name="hv_memory" value="128"/></utilization></node>
</nodes>
<resources>
  <primitive id="hi" class="ocf" provider="vmha" type="VirtualMachine"><meta_attributes id="m1"><nvpair id="m1p" name="priority" value="100"/></meta_attributes><utilization id="hu"><nvpair id="hum" name="hv_memory" value="128"/></utilization></primitive>
  <primitive id="lo" class="ocf" provider="vmha" type="VirtualMachine"><meta_attributes id="m2"><nvpair id="m2p" name="priority" value="1"/></meta_attributes><utilization id="lu"><nvpair id="lum" name="hv_memory" value="128"/></utilization></primitive>
  <primitive id="mid" class="ocf" provider="vmha" type="VirtualMachine"><meta_attributes id="m3"><nvpair id="m3p" name="priority" value="50"/></meta_attributes><utilization id="mu"><nvpair id="mum" name="hv_memory" value="128"/></utilization></primitive>
</resources><constraints/></configuration>
<status>
  <node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member"><transient_attributes id="1"/><lrm id="1"><lrm_resources>
    <lrm_resource id="hi" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="hi_last_0" operation="start" call-id="5" rc-code="0" op-status="0" interval="0"/></lrm_resource>
    <lrm_resource id="lo" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="lo_last_0" operation="start" call-id="6" rc-code="0" op-status="0" interval="0"/></lrm_resource>
  </lrm_resources></lrm></node_state>
  <node_state id="2" uname="n2" in_ccm="true" crmd="online" join="member" expected="member"><lrm id="2"><lrm_resources>
    <lrm_resource id="mid" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="mid_last_0" operation="start" call-id="5" rc-code="0" op-status="0" interval="0"/></lrm_resource>
  </lrm_resources></lrm></node_state>
  <node_state id="3" uname="n3" in_ccm="true" crmd="online" join="member" expected="member"/>
</status></cib>"#;

    const GRAPH: &str = r#"<transition_graph cluster-delay="60s" transition_id="0">
  <synapse id="0"><action_set><rsc_op id="10" operation="start" operation_key="hi_start_0" on_node="n2" on_node_uuid="2"><primitive id="hi" class="ocf" provider="vmha" type="VirtualMachine"/><attributes/></rsc_op></action_set><inputs/></synapse>
  <synapse id="1"><action_set><rsc_op id="11" operation="migrate_to" operation_key="mid_migrate_to_0" on_node="n2" on_node_uuid="2"><primitive id="mid" class="ocf" provider="vmha" type="VirtualMachine"/><attributes/></rsc_op></action_set><inputs/></synapse>
  <synapse id="2"><action_set><rsc_op id="12" operation="migrate_from" operation_key="mid_migrate_from_0" on_node="n3" on_node_uuid="3"><primitive id="mid" class="ocf" provider="vmha" type="VirtualMachine"/><attributes/></rsc_op></action_set><inputs/></synapse>
  <synapse id="3"><action_set><rsc_op id="13" operation="monitor" operation_key="hi_monitor_10000" on_node="n2" on_node_uuid="2"><primitive id="hi" class="ocf" provider="vmha" type="VirtualMachine"/><attributes/></rsc_op></action_set><inputs/></synapse>
  <synapse id="4"><action_set><pseudo_event id="14" operation="stop" operation_key="lo_stop_0"><attributes/></pseudo_event></action_set><inputs/></synapse>
</transition_graph>"#;

    #[test]
    fn failing_a_host_marks_it_fenced_and_forgets_its_resources() {
        let copy = fail_hosts(LIVE, &["n1".to_string()]).unwrap();
        let v = ClusterView::from_cib(&copy).unwrap();
        assert_eq!(v.host("n1").unwrap().state, HostState::Offline);
        assert_eq!(v.host("n2").unwrap().state, HostState::Online);
        assert!(v.vm("hi").unwrap().hosts.is_empty());
        assert_eq!(v.vm("mid").unwrap().hosts, vec!["n2"]);
        assert!(!copy.contains("<transient_attributes id=\"1\""));
        assert!(fail_hosts(LIVE, &["n9".to_string()]).is_err());
    }

    #[test]
    fn a_member_displaced_by_a_higher_groups_members_names_the_group() {
        let failed = vec!["n1".to_string()];
        let copy = fail_hosts(LIVE, &failed).unwrap();
        let before = ClusterView::from_cib(LIVE).unwrap();
        let label = |json: &str| {
            let policy = Policy::from_json(json).unwrap();
            let p = predict_in(&before, Some(&policy), &copy, GRAPH, &failed, None).unwrap();
            p.vms.iter().find(|v| v.vm == "mid").unwrap().step_label.clone()
        };
        let groups = r#"{"groups": {"front": {"members": ["hi"], "template": "hi", "priority": 50},
                                    "batch": {"members": ["mid"], "template": "mid", "priority": 1}}}"#;
        let l = label(groups);
        assert!(
            l.starts_with("displaced from n2 by hi (preempted by group front); step 1"),
            "{l}"
        );
        // Without group priorities (or in the same group), no group is named.
        let l = label(r#"{"groups": {"front": {"members": ["hi"], "template": "hi"}}}"#);
        assert!(l.starts_with("displaced from n2 by hi; step 1"), "{l}");
        let l = label(r#"{"groups": {"front": {"members": ["hi", "mid"], "template": "hi", "priority": 5}}}"#);
        assert!(!l.contains("preempted"), "{l}");
    }

    #[test]
    fn zones_name_their_hosts() {
        assert_eq!(hosts_in_zone(LIVE, "a").unwrap(), vec!["n1", "n2"]);
        assert!(hosts_in_zone(LIVE, "c").is_err());
    }

    #[test]
    fn the_graph_tells_who_moves_stops_and_what_is_left() {
        let failed = vec!["n1".to_string()];
        let copy = fail_hosts(LIVE, &failed).unwrap();
        let p = predict(LIVE, &copy, GRAPH, &failed, None).unwrap();
        let got: Vec<(&str, i64, &VmOutcome)> = p.vms.iter().map(|v| (v.vm.as_str(), v.priority, &v.outcome)).collect();
        assert_eq!(
            got,
            vec![
                (
                    "hi",
                    100,
                    &VmOutcome::Moves {
                        from: "n1".into(),
                        to: "n2".into()
                    }
                ),
                (
                    "mid",
                    50,
                    &VmOutcome::Moves {
                        from: "n2".into(),
                        to: "n3".into()
                    }
                ),
                ("lo", 1, &VmOutcome::Stops { from: "n1".into() }),
            ]
        );
        // n2 had no free room (mid filled it): hi took mid's place; mid found free room on n3.
        assert_eq!(p.vms[0].step, Some(4), "{}", p.vms[0].step_label);
        assert!(
            p.vms[0].step_label.contains("in place of mid on n2"),
            "{}",
            p.vms[0].step_label
        );
        assert_eq!(p.vms[1].step, Some(1));
        assert_eq!(p.vms[1].displaced_by, vec!["hi"]);
        assert!(
            p.vms[1]
                .step_label
                .starts_with("displaced from n2 by hi; step 1: free room on n3"),
            "{}",
            p.vms[1].step_label
        );
        assert_eq!((p.vms[2].step, p.vms[2].displaced_by.is_empty()), (None, true));
        assert_eq!(p.without_place(), vec!["lo"]);
        // n2's capacity is the policy's (128, not 512); n1 failed and counts no more.
        let a = p.zones.iter().find(|z| z.zone == "a").unwrap();
        assert_eq!(a.hosts, vec!["n2"]);
        assert_eq!(a.capacity["hv_memory"], 128);
        assert_eq!(a.free["hv_memory"], 0);
        let ax = p.zones.iter().find(|z| z.zone == "a/x").unwrap();
        assert_eq!((ax.hosts.clone(), ax.free["hv_memory"]), (vec!["n2".to_string()], 0));
        let b = p.zones.iter().find(|z| z.zone == "b").unwrap();
        assert_eq!(b.free["hv_memory"], 0);
        assert!(graph_actions("<cib/>").is_err());
    }

    #[test]
    fn an_added_vm_goes_into_the_resources() {
        let x = add_resource(
            LIVE,
            r#"<primitive id="new" class="ocf" provider="vmha" type="VirtualMachine"/>"#,
        )
        .unwrap();
        let v = ClusterView::from_cib(&x).unwrap();
        assert!(v.vm("new").is_some());
        assert!(add_resource(LIVE, r#"<primitive id="hi"/>"#).is_err());
    }

    #[test]
    fn granting_tickets_sets_or_adds_their_state_and_refuses_bad_names() {
        let shop = vec!["shop".to_string()];
        // No tickets section yet: one is made.
        let g = grant_tickets(LIVE, &shop).unwrap();
        assert!(
            g.contains(r#"<tickets><ticket_state id="shop" granted="true"/></tickets></status>"#),
            "{g}"
        );
        Document::parse(&g).unwrap();
        // A ticket revoked and on standby here, another left alone, a third added.
        let with = LIVE.replace(
            "</status>",
            r#"<tickets><ticket_state id="shop" granted="false" standby="true" last-granted="5"/><ticket_state id="db" granted="false"/></tickets></status>"#,
        );
        let g = grant_tickets(&with, &["shop".to_string(), "new-1".to_string()]).unwrap();
        assert!(
            g.contains(r#"<ticket_state id="shop" last-granted="5" granted="true"/>"#),
            "{g}"
        );
        assert!(g.contains(r#"<ticket_state id="db" granted="false"/>"#), "{g}");
        assert!(
            g.contains(r#"<ticket_state id="new-1" granted="true"/></tickets>"#),
            "{g}"
        );
        // Names that are no booth ticket (they would be written into the XML) change nothing.
        for bad in ["a\"/><x", "-F", ""] {
            assert!(grant_tickets(LIVE, &[bad.to_string()]).is_err(), "{bad:?}");
        }
        assert!(grant_tickets("<cib/>", &shop).is_err());
    }
}
