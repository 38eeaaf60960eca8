//! Zone-ordered failover: the free capacity of each host that the compiled placement rules read, and which
//! step of the failover order placed (or displaced) a VM.
//!
//! The order (after lost capacity a VM restarts): (1) in its home zone, on its own pool, where there is
//! room; (2) else its pool in other zones, nearest in the zone hierarchy first; (3) else any pool of its
//! hardware class; (4) only then in place of lower-priority VMs near home, (5) then elsewhere in zone order.
//!
//! Pacemaker assigns VMs greedily, highest `priority` first, and counts on a host only the VMs it has
//! assigned already: a high-priority VM does not see the lower-priority VMs still running on a host, so
//! by scores alone it takes the best-scored host and pushes them out, even while another host is empty.
//! What it lacks is the free capacity; vmhad (on the DC) keeps it in transient node attributes
//! `vmha-free-<utilization>` ([`free_capacity`]), and the policy compiles for each VM a rule that adds a
//! score larger than any zone or pool preference on the hosts whose free capacity covers the VM's needs.
//! Displacement (steps 4-5) is then left to Pacemaker's priority, exactly where no host has room.
//!
//! # What Pacemaker's scores cannot express, and how close this gets
//! Found with `crm_simulate` on Pacemaker 2.1.5 (the tables in `model/tests/scheduler_tables.rs`):
//! - **Static scores alone cannot do steps 1-3 before 4-5.** With `priority` the higher VM is assigned
//!   first and sees lower-priority VMs' hosts as empty (issue 19's case, at stickiness 0, 1 and 100 alike,
//!   and at any stickiness: stickiness only scores the VM's own host). Without `priority` (equal
//!   priorities, where Pacemaker assigns running VMs first) free room is used first but nothing is ever
//!   displaced. Negative colocations of each VM with every higher-priority VM (with `influence=false` so
//!   that only VMs being placed are steered) were tried and rejected: Pacemaker adds the dependent's full
//!   score on the other side, so displaced lower-priority VMs avoided every host with a higher-priority VM;
//!   the scores Pacemaker merges through chains of colocations cancel (a VM avoiding `mid` is pulled toward
//!   `mid`'s own lower-priority neighbours); and it needs a constraint per pair of VMs. Hence the free
//!   capacity as node attributes, kept by vmhad.
//! - **Several VMs placed in one transition share one host's free room.** The attribute is read once per
//!   transition and Pacemaker counts only the VMs it assigned: when a zone is lost, two of its VMs may both
//!   take the one free slot of the nearest host; the lower-priority VM that ran there then moves on (live)
//!   to the next free room, or stops when there is none. No VM stops while room exists anywhere, but a
//!   running VM may move to make room for one of higher priority although another host had room for it.
//! - **A displaced VM may displace one of its own priority.** Pacemaker orders equal priorities by their
//!   score on their current host; a VM pushed off its host is still "running" there and may be placed before
//!   an equal-priority VM on the next host and take its room.
//! - **Freshness.** The attributes follow the CIB (vmhad updates them on each change, written only when they
//!   change); between a VM starting and the update, Pacemaker's own capacity check still prevents
//!   overcommit: only the preference may be stale. `vmha what-if` computes them afresh for its copy.
//! - **Needs are compiled.** The free-room rule carries the VM's needs at `policy apply`; a VM whose
//!   utilization changes afterwards shows as a pending change in `vmha policy show` until applied again.

use std::collections::{BTreeMap, BTreeSet};

use roxmltree::{Document, Node};
use serde::Serialize;

use crate::cib::{ClusterView, HostState};
use crate::policy::{
    effective_nvpairs, write_xml, zone_at, zone_within, Level, Policy, PolicyError, FREE_PREFIX, LEVELS, POOL_ATTRIBUTE,
};

/// Per host, per utilization name: capacity less what the VMs active on the host take.
pub type FreeCapacity = BTreeMap<String, BTreeMap<String, i64>>;

fn int(v: &str) -> Option<i64> {
    v.trim().parse().ok()
}

/// The free capacity of every online host: its capacity as Pacemaker sees it (the highest-scored
/// utilization set wins, so the policy's overcommit counts) less the utilization of every VM resource
/// active on it. Only the utilization names the host declares are counted.
pub fn free_capacity(cib: &str) -> Result<FreeCapacity, PolicyError> {
    Ok(free_capacity_of(&Document::parse(cib)?, &ClusterView::from_cib(cib)?))
}

pub(crate) fn free_capacity_of(doc: &Document, view: &ClusterView) -> FreeCapacity {
    let primitives: BTreeMap<&str, Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("primitive"))
        .filter_map(|n| Some((n.attribute("id")?, n)))
        .collect();
    let mut out = FreeCapacity::new();
    for node in doc
        .descendants()
        .filter(|n| n.has_tag_name("node") && n.parent().is_some_and(|p| p.has_tag_name("nodes")))
    {
        let Some(name) = node.attribute("uname") else { continue };
        if view.host(name).is_none_or(|h| h.state != HostState::Online) {
            continue;
        }
        let mut free: BTreeMap<String, i64> = effective_nvpairs(node, "utilization", false)
            .into_iter()
            .filter_map(|(k, v)| Some((k, int(&v)?)))
            .collect();
        for vm in view.vms.iter().filter(|v| v.hosts.iter().any(|h| h == name)) {
            let Some(p) = primitives.get(vm.name.as_str()) else {
                continue;
            };
            for (k, need) in effective_nvpairs(*p, "utilization", false) {
                if let (Some(f), Some(need)) = (free.get_mut(&k), int(&need)) {
                    *f -= need;
                }
            }
        }
        out.insert(name.to_string(), free);
    }
    out
}

/// Id of the transient attribute set that carries a host's free capacity (`node` is the node id).
pub fn free_set_id(node: &str) -> String {
    format!("{FREE_PREFIX}status-{node}")
}

/// The `<transient_attributes>` content for one host's free capacity.
pub fn free_set_xml(node: &str, free: &BTreeMap<String, i64>) -> String {
    let set = free_set_id(node);
    let pairs: String = free
        .iter()
        .map(|(k, v)| {
            format!(
                r#"<nvpair id="{}" name="{}" value="{v}"/>"#,
                crate::change::escape(&format!("{set}-{k}")),
                crate::change::escape(&format!("{FREE_PREFIX}{k}"))
            )
        })
        .collect();
    format!(
        r#"<instance_attributes id="{}">{pairs}</instance_attributes>"#,
        crate::change::escape(&set)
    )
}

/// The whole CIB with every online host's free capacity in its transient attributes, as vmhad keeps it
/// (what the scheduler reads): stale `vmha-free-*` values are dropped first. What-if runs the scheduler on
/// such a copy, so its answer does not depend on how fresh the live attributes are.
pub fn with_free_capacity(cib: &str) -> Result<String, PolicyError> {
    let doc = Document::parse(cib)?;
    let view = ClusterView::from_cib(cib)?;
    let free = free_capacity_of(&doc, &view);
    let ids: BTreeMap<String, String> = view.hosts.iter().map(|h| (h.id.clone(), h.name.clone())).collect();
    let state_host = |n: Node| -> Option<&String> {
        n.has_tag_name("node_state")
            .then(|| n.attribute("id").and_then(|id| ids.get(id)))
            .flatten()
    };
    let skip = |n: Node| {
        (n.has_tag_name("nvpair") && n.attribute("name").is_some_and(|k| k.starts_with(FREE_PREFIX)))
            || (n.has_tag_name("instance_attributes")
                && n.attribute("id")
                    .is_some_and(|id| id.starts_with(&format!("{FREE_PREFIX}status-"))))
    };
    let append = |n: Node| -> Vec<String> {
        if n.has_tag_name("transient_attributes") {
            let Some(state) = n.parent().filter(|p| p.has_tag_name("node_state")) else {
                return Vec::new();
            };
            let id = state.attribute("id").unwrap_or("");
            return match state_host(state).and_then(|h| free.get(h)) {
                Some(f) if !f.is_empty() => vec![free_set_xml(id, f)],
                _ => Vec::new(),
            };
        }
        let Some(host) = state_host(n) else { return Vec::new() };
        if n.children().any(|c| c.has_tag_name("transient_attributes")) {
            return Vec::new();
        }
        let id = n.attribute("id").unwrap_or("");
        match free.get(host) {
            Some(f) if !f.is_empty() => vec![format!(
                r#"<transient_attributes id="{}">{}</transient_attributes>"#,
                crate::change::escape(id),
                free_set_xml(id, f)
            )],
            _ => Vec::new(),
        }
    };
    let mut out = String::new();
    write_xml(doc.root_element(), &mut out, &skip, &append);
    Ok(out)
}

/// The free capacity the status section carries now (the `vmha-free-*` transient attributes), per host.
pub fn free_in_status(cib: &str) -> Result<FreeCapacity, PolicyError> {
    Ok(free_in_status_of(&Document::parse(cib)?))
}

fn free_in_status_of(doc: &Document) -> FreeCapacity {
    let mut out = FreeCapacity::new();
    for state in doc.descendants().filter(|n| n.has_tag_name("node_state")) {
        let Some(host) = state.attribute("uname") else { continue };
        let entry = out.entry(host.to_string()).or_default();
        for nv in state
            .descendants()
            .filter(|n| n.has_tag_name("nvpair"))
            .filter(|n| n.ancestors().any(|a| a.has_tag_name("transient_attributes")))
        {
            let (Some(name), Some(value)) = (nv.attribute("name"), nv.attribute("value")) else {
                continue;
            };
            if let (Some(k), Some(v)) = (name.strip_prefix(FREE_PREFIX), int(value)) {
                entry.insert(k.to_string(), v);
            }
        }
    }
    out.retain(|_, f| !f.is_empty());
    out
}

/// The modifications of the status section that bring the `vmha-free-*` attributes up to date: one
/// `<node_state>` per online host whose free capacity changed (for a CIB modify that creates what is
/// missing). Empty when nothing changed.
pub fn free_updates(cib: &str) -> Result<Vec<(String, String)>, PolicyError> {
    let doc = Document::parse(cib)?;
    let view = ClusterView::from_cib(cib)?;
    let want = free_capacity_of(&doc, &view);
    let have = free_in_status_of(&doc);
    let mut out = Vec::new();
    for (host, free) in &want {
        if free.is_empty() || have.get(host) == Some(free) {
            continue;
        }
        let Some(id) = view.host(host).map(|h| h.id.clone()) else {
            continue;
        };
        let id_x = crate::change::escape(&id);
        out.push((
            host.clone(),
            format!(
                r#"<node_state id="{id_x}"><transient_attributes id="{id_x}">{}</transient_attributes></node_state>"#,
                free_set_xml(&id, free)
            ),
        ));
    }
    Ok(out)
}

/// Where a host sits for the policy: its zone and pool (node attributes the policy set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPlace {
    pub zone: Option<String>,
    pub pool: Option<String>,
}

/// Every host's zone and pool, from the node attributes in the CIB.
pub fn host_places(cib: &str) -> Result<BTreeMap<String, HostPlace>, PolicyError> {
    Ok(host_places_of(&Document::parse(cib)?))
}

pub(crate) fn host_places_of(doc: &Document) -> BTreeMap<String, HostPlace> {
    let mut out = BTreeMap::new();
    for node in doc
        .descendants()
        .filter(|n| n.has_tag_name("node") && n.parent().is_some_and(|p| p.has_tag_name("nodes")))
    {
        let Some(name) = node.attribute("uname") else { continue };
        let attrs = effective_nvpairs(node, "instance_attributes", false);
        out.insert(
            name.to_string(),
            HostPlace {
                zone: LEVELS.iter().rev().find_map(|l| attrs.get(&l.attribute()).cloned()),
                pool: attrs.get(POOL_ATTRIBUTE).cloned(),
            },
        );
    }
    out
}

/// The deepest zone level `a` and `b` share (None: not even the site).
pub fn shared_level(a: &str, b: &str) -> Option<Level> {
    LEVELS
        .iter()
        .rev()
        .copied()
        .find(|l| zone_at(a, *l).is_some_and(|x| Some(x) == zone_at(b, *l)))
}

/// Which step of the failover order put a VM on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepTaken {
    /// 1 to 5 (see the module documentation).
    pub step: u8,
    /// What the step was, for people: e.g. `step 2: free room in pool gpu, zone eu/b2 (same site)`.
    pub label: String,
}

/// What the failover order says about a VM that starts (or moves) onto `host`: `fits` is whether the
/// host's free capacity before the event covered the VM's needs (else it took the place of the VMs in
/// `displaced`).
pub fn step_for(
    policy: Option<&Policy>,
    vm: &str,
    host: &str,
    place: &HostPlace,
    fits: bool,
    displaced: &[String],
) -> StepTaken {
    let spec = policy.and_then(|p| p.vms.get(vm));
    let home = spec.and_then(|s| s.zone.as_deref());
    let pool = spec.and_then(|s| s.pool.as_deref());
    let in_home = match (home, place.zone.as_deref()) {
        (None, _) => true,
        (Some(h), Some(z)) => zone_within(z, h),
        (Some(_), None) => false,
    };
    let own_pool = pool.is_none() || pool == place.pool.as_deref();
    let nearness = match (home, place.zone.as_deref()) {
        (Some(h), Some(z)) if !in_home => match shared_level(h, z) {
            Some(l) => format!(", zone {z} (same {})", l.name()),
            None => format!(", zone {z} (another site)"),
        },
        (Some(_), Some(z)) => format!(", home zone {z}"),
        (_, None) => ", a host in no zone".to_string(),
        (None, Some(z)) => format!(", zone {z}"),
    };
    let pool_text = place.pool.as_deref().map(|p| format!(", pool {p}")).unwrap_or_default();
    if fits {
        let (step, what) = if in_home && own_pool {
            (1, "free room")
        } else if own_pool {
            (2, "free room, own pool in another zone")
        } else {
            (3, "free room in another pool of its class")
        };
        StepTaken {
            step,
            label: format!("step {step}: {what} on {host}{pool_text}{nearness}"),
        }
    } else {
        let step = if in_home { 4 } else { 5 };
        let whom = if displaced.is_empty() {
            "lower-priority VMs".to_string()
        } else {
            displaced.join(", ")
        };
        StepTaken {
            step,
            label: format!("step {step}: no free room anywhere; in place of {whom} on {host}{pool_text}{nearness}"),
        }
    }
}

/// Whether `free` covers every need (names the host does not declare do not count, as in Pacemaker).
pub fn fits(free: Option<&BTreeMap<String, i64>>, needs: &BTreeMap<String, String>) -> bool {
    let Some(free) = free else { return false };
    needs
        .iter()
        .filter_map(|(k, v)| Some((k, int(v)?)))
        .all(|(k, need)| free.get(k).is_none_or(|f| *f >= need))
}

/// The names of the VMs in `before` running on `host` that `after` no longer places there.
pub fn displaced_from(
    host: &str,
    before: &BTreeMap<String, Option<String>>,
    after: &BTreeMap<String, Option<String>>,
) -> Vec<String> {
    let gone: BTreeSet<&String> = before
        .iter()
        .filter(|(vm, h)| h.as_deref() == Some(host) && after.get(*vm).cloned().flatten().as_deref() != Some(host))
        .map(|(vm, _)| vm)
        .collect();
    gone.into_iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIB: &str = r#"<cib admin_epoch="0" epoch="1" num_updates="0"><configuration><crm_config/>
<nodes>
  <node id="1" uname="a1"><instance_attributes id="vmha-policy-node-1" score="1000"><nvpair id="z1" name="vmha-zone-site" value="A"/><nvpair id="p1" name="vmha-pool" value="std"/></instance_attributes><utilization id="u1"><nvpair id="u1m" name="hv_memory" value="4"/><nvpair id="u1c" name="cpu" value="8"/></utilization><utilization id="vmha-policy-node-1-utilization" score="1000"><nvpair id="p1m" name="hv_memory" value="6"/></utilization></node>
  <node id="2" uname="b1"><utilization id="u2"><nvpair id="u2m" name="hv_memory" value="4"/></utilization></node>
  <node id="3" uname="c1"><utilization id="u3"><nvpair id="u3m" name="hv_memory" value="4"/></utilization></node>
</nodes>
<resources>
  <primitive id="v1" class="ocf" provider="vmha" type="VirtualMachine"><utilization id="v1u"><nvpair id="v1um" name="hv_memory" value="2"/><nvpair id="v1uc" name="cpu" value="1"/></utilization></primitive>
  <primitive id="v2" class="ocf" provider="vmha" type="VirtualMachine"><utilization id="v2u"><nvpair id="v2um" name="hv_memory" value="3"/></utilization></primitive>
</resources><constraints/></configuration>
<status>
  <node_state id="1" uname="a1" in_ccm="true" crmd="online" join="member" expected="member"><transient_attributes id="1"><instance_attributes id="status-1"><nvpair id="s1" name="vmha-free-hv_memory" value="99"/><nvpair id="s2" name="other" value="x"/></instance_attributes></transient_attributes><lrm id="1"><lrm_resources>
    <lrm_resource id="v1" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="v1_last_0" operation="start" call-id="5" rc-code="0" op-status="0" interval="0"/></lrm_resource>
    <lrm_resource id="v2" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="v2_last_0" operation="start" call-id="6" rc-code="0" op-status="0" interval="0"/></lrm_resource>
  </lrm_resources></lrm></node_state>
  <node_state id="2" uname="b1" in_ccm="true" crmd="online" join="member" expected="member"/>
  <node_state id="3" uname="c1" in_ccm="false" crmd="offline" join="down" expected="down"/>
</status></cib>"#;

    #[test]
    fn free_capacity_is_the_effective_capacity_less_the_running_vms() {
        let f = free_capacity(CIB).unwrap();
        // a1: the policy's 6 (not 4) less 2 + 3; cpu 8 less 1 (v2 declares no cpu).
        assert_eq!(f["a1"]["hv_memory"], 1);
        assert_eq!(f["a1"]["cpu"], 7);
        assert_eq!(f["b1"]["hv_memory"], 4);
        assert!(!f.contains_key("c1"), "offline hosts have no free capacity");
    }

    #[test]
    fn the_free_attributes_replace_stale_ones_and_keep_the_rest() {
        let x = with_free_capacity(CIB).unwrap();
        Document::parse(&x).unwrap();
        assert!(!x.contains(r#"value="99""#), "{x}");
        assert!(x.contains(r#"<nvpair id="s2" name="other" value="x"/>"#));
        assert!(x.contains(
            r#"<instance_attributes id="vmha-free-status-1"><nvpair id="vmha-free-status-1-cpu" name="vmha-free-cpu" value="7"/><nvpair id="vmha-free-status-1-hv_memory" name="vmha-free-hv_memory" value="1"/></instance_attributes>"#
        ));
        // b1 had no transient attributes: they are created.
        assert!(x.contains(r#"<transient_attributes id="2"><instance_attributes id="vmha-free-status-2">"#));
        assert!(!x.contains("vmha-free-status-3"));
        // Applying twice gives the same CIB.
        assert_eq!(with_free_capacity(&x).unwrap(), x);
    }

    #[test]
    fn updates_cover_only_hosts_whose_free_capacity_changed() {
        let u = free_updates(CIB).unwrap();
        let hosts: Vec<&str> = u.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, ["a1", "b1"]);
        assert!(u[0].1.starts_with(
            r#"<node_state id="1"><transient_attributes id="1"><instance_attributes id="vmha-free-status-1">"#
        ));
        let fresh = with_free_capacity(CIB).unwrap();
        assert!(free_updates(&fresh).unwrap().is_empty());
        assert_eq!(free_in_status(&fresh).unwrap(), free_capacity(CIB).unwrap());
    }

    #[test]
    fn hostile_utilization_values_count_as_nothing() {
        let cib = CIB.replace(r#"name="hv_memory" value="3""#, r#"name="hv_memory" value="-&quot;x""#);
        let f = free_capacity(&cib).unwrap();
        assert_eq!(f["a1"]["hv_memory"], 4);
        assert!(free_capacity("<cib").is_err());
    }

    #[test]
    fn steps_follow_zone_pool_and_room() {
        let p = Policy::from_json(
            r#"{"vms": {"v": {"zone": "eu/b1/r1", "pool": "gpu1"}}, "pools": {"gpu1": {"class": "gpu"}, "gpu2": {"class": "gpu"}}}"#,
        )
        .unwrap();
        let at = |zone: &str, pool: &str| HostPlace {
            zone: Some(zone.to_string()),
            pool: Some(pool.to_string()),
        };
        let s = |place: HostPlace, fits: bool| step_for(Some(&p), "v", "h", &place, fits, &["lo".to_string()]);
        assert_eq!(s(at("eu/b1/r1/k2", "gpu1"), true).step, 1);
        let two = s(at("eu/b2", "gpu1"), true);
        assert_eq!(two.step, 2);
        assert!(two.label.contains("(same site)"), "{}", two.label);
        assert_eq!(s(at("eu/b1/r1", "gpu2"), true).step, 3);
        let four = s(at("eu/b1/r1", "gpu1"), false);
        assert_eq!(four.step, 4);
        assert!(four.label.contains("in place of lo"), "{}", four.label);
        assert_eq!(s(at("us", "gpu1"), false).step, 5);
        assert_eq!(shared_level("eu/b1/r1", "eu/b1/r2"), Some(Level::Building));
        assert_eq!(shared_level("eu", "us"), None);
    }

    #[test]
    fn fitting_needs_every_declared_name() {
        let free: BTreeMap<String, i64> = [("cpu".to_string(), 2), ("hv_memory".to_string(), 4)].into();
        let needs = |c: &str, m: &str| -> BTreeMap<String, String> {
            [
                ("cpu".to_string(), c.to_string()),
                ("hv_memory".to_string(), m.to_string()),
            ]
            .into()
        };
        assert!(fits(Some(&free), &needs("2", "4")));
        assert!(!fits(Some(&free), &needs("3", "1")));
        assert!(!fits(None, &needs("1", "1")));
    }
}
