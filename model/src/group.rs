//! Elastic VM groups: a group of the placement policy ([`crate::policy::GroupSpec`]) with a `template`
//! (a running VM its new members are live-cloned from) and a `min`/`max` size. `vmha group scale NAME N`
//! grows it by live clones and shrinks it by draining and destroying its newest clones; this module
//! decides what that means (names, order, where each new member goes), without any I/O.
//!
//! ```text
//! "groups": {"web": {"members": ["web1"], "template": "web1", "min": 1, "max": 4, "anti_affinity": "host"}}
//! ```
//!
//! The template is always a member and is never removed (`min` is at least 1). New members are named
//! `<group>-<n>` with the lowest free `n`, and appended to `members`, so the newest are last; a shrink
//! removes from the end. A new member goes to a host that keeps the group's anti-affinity (or affinity),
//! with the most free memory among those.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::arbitration::{time_bound_meta, GroupState, Member, TimeBound, ENTITLED};
use crate::cib::{ClusterView, HostState};
use crate::policy::{zone_at, GroupSpec, Level, Policy, PolicyError};

/// Largest `max` of an elastic group.
pub const MAX_SIZE: u32 = 64;

fn invalid<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError::Invalid(msg.into()))
}

/// An elastic group, read from the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Elastic {
    pub name: String,
    pub template: String,
    pub min: u32,
    pub max: u32,
    pub members: Vec<String>,
    pub autoscale: Option<Autoscale>,
}

impl GroupSpec {
    /// A group is elastic when it names a template.
    pub fn is_elastic(&self) -> bool {
        self.template.is_some() || self.min.is_some() || self.max.is_some()
    }

    /// Checks the elastic settings (called by [`Policy::validate`]).
    pub fn validate_elastic(&self, group: &str) -> Result<(), PolicyError> {
        if !self.is_elastic() {
            return Ok(());
        }
        let Some(template) = &self.template else {
            return invalid(format!("group {group}: min and max need a template"));
        };
        if !self.members.contains(template) {
            return invalid(format!(
                "group {group}: the template {template} must be one of its members"
            ));
        }
        let (min, max) = (self.min.unwrap_or(1), self.max.unwrap_or(MAX_SIZE));
        if min < 1 || min > max || max > MAX_SIZE {
            return invalid(format!(
                "group {group}: needs 1 <= min <= max <= {MAX_SIZE} (min {min}, max {max})"
            ));
        }
        if let Some(rule) = &self.autoscale {
            rule.validate(group)?;
        }
        if let Some(p) = self.priority {
            if p <= -ENTITLED || p >= ENTITLED {
                return invalid(format!(
                    "group {group}: priority {p} must be above -{ENTITLED} and below {ENTITLED}"
                ));
            }
        }
        let mut windows: Vec<(u8, u8)> = Vec::new();
        for b in &self.time_bounds {
            let (from, to) = b.hours(group)?;
            if b.max < min {
                return invalid(format!(
                    "group {group}: time bound {}-{} max {} is below the group's min {min}",
                    b.from, b.to, b.max
                ));
            }
            if b.max > max {
                return invalid(format!(
                    "group {group}: time bound {}-{} max {} is above the group's max {max}",
                    b.from, b.to, b.max
                ));
            }
            for (f, t) in &windows {
                if (*f, *t) == (from, to) {
                    return invalid(format!("group {group}: time bound {}-{} is given twice", b.from, b.to));
                }
                if hours_of(*f, *t).intersection(&hours_of(from, to)).next().is_some() {
                    return invalid(format!(
                        "group {group}: time bounds {f:02}:00-{t:02}:00 and {}-{} overlap",
                        b.from, b.to
                    ));
                }
            }
            windows.push((from, to));
        }
        Ok(())
    }
}

/// The hours `[from, to)` of a window (wrapping midnight).
fn hours_of(from: u8, to: u8) -> BTreeSet<u8> {
    let mut out = BTreeSet::new();
    let mut h = from;
    while h != to {
        out.insert(h);
        h = (h + 1) % 24;
    }
    out
}

/// A time bound of an elastic group: at most `max` members from `from` to `to` (`"HH:00"`, the DC's
/// clock; the window may wrap midnight, e.g. `{"max": 8, "from": "20:00", "to": "06:00"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeBoundSpec {
    pub max: u32,
    pub from: String,
    pub to: String,
}

impl TimeBoundSpec {
    /// The window's hours, checked: whole hours `HH:00` (Pacemaker's `date_spec` rules compare hours),
    /// 00 to 23, `from` and `to` differing.
    pub fn hours(&self, group: &str) -> Result<(u8, u8), PolicyError> {
        let hour = |s: &str| -> Option<u8> {
            let (h, m) = s.split_once(':')?;
            if h.len() != 2 || m != "00" || !h.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            h.parse::<u8>().ok().filter(|h| *h <= 23)
        };
        let bad = || {
            PolicyError::Invalid(format!(
                "group {group}: time bound hours {:?} to {:?}: each must be a whole hour 00:00 to 23:00, and they must differ",
                self.from, self.to
            ))
        };
        let (from, to) = (hour(&self.from).ok_or_else(bad)?, hour(&self.to).ok_or_else(bad)?);
        if from == to {
            return Err(bad());
        }
        Ok((from, to))
    }
}

/// Arbitration is on when any group of the policy sets a `priority`.
pub fn arbitrated(policy: &Policy) -> bool {
    policy.groups.values().any(|g| g.priority.is_some())
}

/// The elastic groups as arbitration sees them (empty when no group sets a priority): priority (default
/// 0), `min` as the entitlement, members oldest first; `busy(vm)` marks members mid-transaction, and a
/// group's template is never given up (it is counted as busy).
pub fn arbitration_groups(policy: &Policy, busy: &dyn Fn(&str) -> bool) -> Vec<GroupState> {
    if !arbitrated(policy) {
        return Vec::new();
    }
    policy
        .groups
        .iter()
        .filter(|(_, g)| g.is_elastic())
        .map(|(name, g)| GroupState {
            name: name.clone(),
            priority: g.priority.unwrap_or(0),
            min: g.min.unwrap_or(1),
            members: g
                .members
                .iter()
                .map(|m| Member {
                    vm: m.clone(),
                    busy: busy(m) || g.template.as_deref() == Some(m.as_str()),
                })
                .collect(),
        })
        .collect()
}

/// The compiled Pacemaker priority of every member of an elastic group, when arbitration is on
/// ([`crate::arbitration::member_priorities`]; no member counts as busy here: the entitled are the
/// template and the oldest up to `min`).
pub fn member_priorities(policy: &Policy) -> Result<BTreeMap<String, i32>, PolicyError> {
    crate::arbitration::member_priorities(&arbitration_groups(policy, &|_| false))
        .map_err(|e| PolicyError::Invalid(e.to_string()))
}

/// The time bounds' meta attribute sets, by member ([`crate::arbitration::time_bound_meta`]).
pub fn time_bound_sets(policy: &Policy) -> Result<Vec<(String, String)>, PolicyError> {
    let mut out = Vec::new();
    for (name, g) in &policy.groups {
        for b in &g.time_bounds {
            let (from_hour, to_hour) = b.hours(name)?;
            let bound = TimeBound {
                group: name.clone(),
                max: b.max,
                from_hour,
                to_hour,
            };
            let sets = time_bound_meta(&bound, &g.members).map_err(|e| PolicyError::Invalid(e.to_string()))?;
            out.extend(sets);
        }
    }
    Ok(out)
}

/// An elastic group's scaling rule: the members' CPU load (busy share of their vCPUs, in percent,
/// averaged over the members, measured by the hosts through libvirt) above `cpu_above` adds a member,
/// below `cpu_below` removes one; always within min and max, one step per evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    pub cpu_above: u32,
    pub cpu_below: u32,
}

impl Autoscale {
    fn validate(&self, group: &str) -> Result<(), PolicyError> {
        if self.cpu_above > 100 || self.cpu_below >= self.cpu_above {
            return invalid(format!(
                "group {group}: autoscale needs 0 <= cpu_below < cpu_above <= 100 (percent), not {} and {}",
                self.cpu_below, self.cpu_above
            ));
        }
        Ok(())
    }
}

/// The size the rule asks for at `load` percent (None: stay).
pub fn autoscale_size(g: &Elastic, rule: &Autoscale, load: f64) -> Option<u32> {
    let size = g.members.len() as u32;
    if load > f64::from(rule.cpu_above) && size < g.max {
        Some(size + 1)
    } else if load < f64::from(rule.cpu_below) && size > g.min {
        Some(size - 1)
    } else {
        None
    }
}

/// A VM's CPU load between two samples of its CPU time (ns) `dt` apart, over `vcpus` vCPUs, in percent.
pub fn cpu_percent(cpu_ns_before: u64, cpu_ns_after: u64, dt: std::time::Duration, vcpus: u32) -> f64 {
    let wall = dt.as_nanos() as f64 * f64::from(vcpus.max(1));
    if wall <= 0.0 {
        return 0.0;
    }
    (cpu_ns_after.saturating_sub(cpu_ns_before) as f64 / wall * 100.0).clamp(0.0, 100.0)
}

/// The elastic group `name` of `policy`.
pub fn elastic(policy: &Policy, name: &str) -> Result<Elastic, PolicyError> {
    let Some(spec) = policy.groups.get(name) else {
        let known: Vec<&String> = policy.groups.keys().collect();
        return invalid(format!("no group {name} in the policy (groups: {known:?})"));
    };
    if !spec.is_elastic() {
        return invalid(format!(
            "group {name} is not elastic: give it a template, min and max in the policy"
        ));
    }
    spec.validate_elastic(name)?;
    Ok(Elastic {
        name: name.to_string(),
        template: spec.template.clone().unwrap_or_default(),
        min: spec.min.unwrap_or(1),
        max: spec.max.unwrap_or(MAX_SIZE),
        members: spec.members.clone(),
        autoscale: spec.autoscale.clone(),
    })
}

/// Every elastic group of `policy`, by name (what `vmha group list` lists and vmhad publishes).
pub fn elastic_groups(policy: &Policy) -> Result<Vec<Elastic>, PolicyError> {
    policy
        .groups
        .iter()
        .filter(|(_, g)| g.is_elastic())
        .map(|(name, _)| elastic(policy, name))
        .collect()
}

/// What a scale to a size does: members to add (in order) or to remove (newest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScalePlan {
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl ScalePlan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// The plan to bring group `g` to `size` members; `taken(name)` says whether a name is used in the
/// cluster (a resource or any CIB id) already.
pub fn scale_plan(g: &Elastic, size: u32, taken: impl Fn(&str) -> bool) -> Result<ScalePlan, PolicyError> {
    if size < g.min || size > g.max {
        return invalid(format!(
            "group {}: size {size} is outside its bounds (min {}, max {}); nothing changed",
            g.name, g.min, g.max
        ));
    }
    let now = g.members.len();
    let size = size as usize;
    let mut plan = ScalePlan::default();
    if size > now {
        let mut n = 1u32;
        while plan.add.len() < size - now {
            let name = format!("{}-{n}", g.name);
            if !taken(&name) && !g.members.contains(&name) {
                plan.add.push(name);
            }
            n += 1;
        }
    } else if size < now {
        let removable: Vec<&String> = g.members.iter().rev().filter(|m| **m != g.template).collect();
        if removable.len() < now - size {
            return invalid(format!(
                "group {}: only {} member(s) besides the template {} can be removed",
                g.name,
                removable.len(),
                g.template
            ));
        }
        plan.remove = removable.into_iter().take(now - size).cloned().collect();
    }
    Ok(plan)
}

/// `policy` with `vm` appended to `group`'s members, with the template's VM settings (priority, zone).
pub fn with_member(policy: &Policy, group: &str, vm: &str) -> Policy {
    let mut p = policy.clone();
    if let Some(spec) = p.groups.get_mut(group) {
        if !spec.members.iter().any(|m| m == vm) {
            spec.members.push(vm.to_string());
        }
        if let Some(settings) = spec.template.as_ref().and_then(|t| policy.vms.get(t)) {
            p.vms.insert(vm.to_string(), settings.clone());
        }
    }
    p
}

/// `policy` without `vm` in `group` (and without its own VM settings).
pub fn without_member(policy: &Policy, group: &str, vm: &str) -> Policy {
    let mut p = policy.clone();
    if let Some(spec) = p.groups.get_mut(group) {
        spec.members.retain(|m| m != vm);
    }
    p.vms.remove(vm);
    p
}

/// Where a host is, for keeping members apart or together at `level`: its zone at that level, or the
/// host itself (also for hosts without a zone, or not that deep a zone).
fn place_key(policy: &Policy, host: &str, level: Level) -> String {
    if level == Level::Host {
        return format!("host:{host}");
    }
    policy
        .hosts
        .get(host)
        .and_then(|h| zone_at(&h.zone, level))
        .map_or_else(|| format!("host:{host}"), |z| format!("zone:{z}"))
}

/// The host for a new member of `group`: among `candidates` (online hosts able to run VMs, with their
/// free memory in MiB), those that keep the group's anti-affinity or affinity given where its members
/// run (`running`: member -> host), the one with the most free memory. A hard rule (score -INFINITY or
/// INFINITY, the default) that no candidate keeps is an error; a soft one falls back to all candidates.
pub fn choose_host(
    policy: &Policy,
    group: &str,
    candidates: &BTreeMap<String, u64>,
    running: &BTreeMap<String, String>,
) -> Result<String, PolicyError> {
    if candidates.is_empty() {
        return invalid("no online host can take a new member");
    }
    let spec = policy.groups.get(group);
    let members: BTreeSet<&str> = spec
        .map(|s| s.members.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let used = |level: Level| -> BTreeSet<String> {
        running
            .iter()
            .filter(|(vm, _)| members.contains(vm.as_str()))
            .map(|(_, host)| place_key(policy, host, level))
            .collect()
    };
    let (allowed, hard, why): (Vec<&String>, bool, String) = match spec.map(|s| (s.anti_affinity, s.affinity, s)) {
        Some((Some(level), _, s)) => {
            let used = used(level);
            (
                candidates
                    .keys()
                    .filter(|h| !used.contains(&place_key(policy, h, level)))
                    .collect(),
                s.score.as_deref().is_none_or(|x| x == "-INFINITY"),
                format!("keeps group {group}'s members apart by {}", level.name()),
            )
        }
        Some((None, Some(level), s)) => {
            let used = used(level);
            (
                candidates
                    .keys()
                    .filter(|h| used.is_empty() || used.contains(&place_key(policy, h, level)))
                    .collect(),
                s.score.as_deref().is_none_or(|x| x == "INFINITY" || x == "+INFINITY"),
                format!("keeps group {group}'s members together by {}", level.name()),
            )
        }
        _ => (candidates.keys().collect(), false, String::new()),
    };
    let pool: Vec<&String> = if allowed.is_empty() && !hard {
        candidates.keys().collect()
    } else {
        allowed
    };
    pool.into_iter()
        .max_by(|a, b| candidates[*a].cmp(&candidates[*b]).then(b.cmp(a)))
        .cloned()
        .ok_or_else(|| PolicyError::Invalid(format!("no online host {why}; the group cannot grow")))
}

/// A host's `hv_memory` capacity minus what the VMs active on it need (MiB), when the host declares one.
pub fn free_memory(view: &ClusterView, host: &str) -> Option<u64> {
    let cap: u64 = view.host(host)?.utilization.get("hv_memory")?.parse().ok()?;
    let used: u64 = view
        .vms
        .iter()
        .filter(|v| v.hosts.iter().any(|h| h == host))
        .filter_map(|v| v.utilization.get("hv_memory")?.parse::<u64>().ok())
        .sum();
    Some(cap.saturating_sub(used))
}

/// Hosts that can take a new VM now (online, not in standby or maintenance) with their free memory
/// (0 when they declare no capacity).
pub fn candidate_hosts(view: &ClusterView) -> BTreeMap<String, u64> {
    view.hosts
        .iter()
        .filter(|h| h.state == HostState::Online && !h.standby && !h.maintenance)
        .map(|h| (h.name.clone(), free_memory(view, &h.name).unwrap_or(0)))
        .collect()
}

/// Where each VM active on exactly one host runs.
pub fn running(view: &ClusterView) -> BTreeMap<String, String> {
    view.vms
        .iter()
        .filter(|v| v.hosts.len() == 1)
        .map(|v| (v.name.clone(), v.hosts[0].clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Policy {
        Policy::from_json(json).unwrap()
    }

    const WEB: &str = r#"{
        "hosts": {"n1": {"zone": "a"}, "n2": {"zone": "a"}, "n3": {"zone": "b"}},
        "vms": {"web1": {"priority": 7, "zone": "a"}},
        "groups": {"web": {"members": ["web1", "web-1"], "template": "web1", "min": 1, "max": 3,
                           "anti_affinity": "host"}}
    }"#;

    #[test]
    fn elastic_groups_are_read_and_checked() {
        let p = policy(WEB);
        let g = elastic(&p, "web").unwrap();
        assert_eq!((g.template.as_str(), g.min, g.max, g.members.len()), ("web1", 1, 3, 2));
        assert!(elastic(&p, "nope").unwrap_err().to_string().contains("no group nope"));
        let plain = policy(r#"{"groups": {"g": {"members": ["a", "b"], "anti_affinity": "host"}}}"#);
        assert!(elastic(&plain, "g").unwrap_err().to_string().contains("not elastic"));
        for (json, why) in [
            (r#"{"members": ["a"], "min": 1, "max": 2}"#, "need a template"),
            (
                r#"{"members": ["a"], "template": "b", "max": 2}"#,
                "must be one of its members",
            ),
            (
                r#"{"members": ["a"], "template": "a", "min": 3, "max": 2}"#,
                "min <= max",
            ),
            (r#"{"members": ["a"], "template": "a", "min": 0, "max": 2}"#, "1 <= min"),
            (r#"{"members": ["a"], "template": "a", "max": 65}"#, "<= 64"),
        ] {
            let p = policy(&format!(r#"{{"groups": {{"g": {json}}}}}"#));
            let e = elastic(&p, "g").unwrap_err().to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
    }

    #[test]
    fn priorities_and_time_bounds_are_checked_and_hostile_ones_refused_by_group() {
        let ok = policy(
            r#"{"groups": {"batch": {"members": ["a", "b"], "template": "a", "min": 1, "max": 9, "priority": 1,
                "time_bounds": [{"max": 8, "from": "20:00", "to": "06:00"}, {"max": 2, "from": "06:00", "to": "08:00"}]}}}"#,
        );
        assert_eq!(ok.groups["batch"].time_bounds[0].hours("batch").unwrap(), (20, 6));
        elastic(&ok, "batch").unwrap();
        for (json, why) in [
            (r#""priority": 100000"#, "priority 100000 must be"),
            (r#""priority": -100000"#, "priority -100000 must be"),
            (
                r#""time_bounds": [{"max": 8, "from": "20:30", "to": "06:00"}]"#,
                "whole hour",
            ),
            (
                r#""time_bounds": [{"max": 8, "from": "24:00", "to": "06:00"}]"#,
                "whole hour",
            ),
            (
                r#""time_bounds": [{"max": 8, "from": "7:00", "to": "06:00"}]"#,
                "whole hour",
            ),
            (
                r#""time_bounds": [{"max": 8, "from": "+1:00", "to": "06:00"}]"#,
                "whole hour",
            ),
            (
                r#""time_bounds": [{"max": 8, "from": "", "to": "06:00"}]"#,
                "whole hour",
            ),
            (
                r#""time_bounds": [{"max": 8, "from": "06:00", "to": "06:00"}]"#,
                "must differ",
            ),
            (
                r#""time_bounds": [{"max": 1, "from": "20:00", "to": "06:00"}]"#,
                "below the group's min 2",
            ),
            (
                r#""time_bounds": [{"max": 10, "from": "20:00", "to": "06:00"}]"#,
                "above the group's max 9",
            ),
            (
                r#""time_bounds": [{"max": 8, "from": "20:00", "to": "06:00"}, {"max": 8, "from": "20:00", "to": "06:00"}]"#,
                "given twice",
            ),
            (
                r#""time_bounds": [{"max": 8, "from": "20:00", "to": "06:00"}, {"max": 3, "from": "05:00", "to": "07:00"}]"#,
                "overlap",
            ),
        ] {
            let p = policy(&format!(
                r#"{{"groups": {{"batch": {{"members": ["a", "b"], "template": "a", "min": 2, "max": 9, {json}}}}}}}"#
            ));
            let e = elastic(&p, "batch").unwrap_err().to_string();
            assert!(e.contains("group batch") && e.contains(why), "{json}: {e}");
        }
        // Unknown fields (a misspelt bound, a bound of an unknown kind) do not read at all.
        for json in [
            r#"{"groups": {"g": {"members": ["a"], "template": "a", "time_bounds": [{"max": 1, "from": "01:00", "to": "02:00", "days": "mon"}]}}}"#,
            r#"{"groups": {"g": {"members": ["a"], "template": "a", "time_bound": []}}}"#,
            r#"{"groups": {"g": {"members": ["a"], "template": "a", "priority": "high"}}}"#,
            r#"{"groups": {"g": {"members": ["a"], "template": "a", "priority": 4294967296}}}"#,
        ] {
            assert!(Policy::from_json(json).is_err(), "{json}");
        }
    }

    #[test]
    fn priorities_and_time_bounds_need_an_elastic_group_and_no_own_vm_priority() {
        use crate::policy::tests::CIB;
        let view = ClusterView::from_cib(CIB).unwrap();
        let check = |json: &str| policy(json).validate(&view).map_err(|e| e.to_string());
        let e = check(r#"{"groups": {"g": {"members": ["vm1", "vm2"], "anti_affinity": "host", "priority": 3}}}"#)
            .unwrap_err();
        assert!(
            e.contains("group g: priority and time_bounds need an elastic group"),
            "{e}"
        );
        let e = check(
            r#"{"vms": {"vm2": {"priority": 9}},
                "groups": {"g": {"members": ["vm1", "vm2"], "template": "vm1", "priority": 3}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("VM vm2: its priority comes from group g"), "{e}");
        // Without any group priority, a member's own priority stays allowed (as before).
        check(r#"{"vms": {"vm2": {"priority": 9}}, "groups": {"g": {"members": ["vm1", "vm2"], "template": "vm1"}}}"#)
            .unwrap();
    }

    #[test]
    fn apply_compiles_member_priorities_and_time_bound_rules() {
        use crate::arbitration::ENTITLED;
        use crate::policy::plan;
        use crate::policy::tests::CIB;
        let p = policy(
            r#"{"groups": {"batch": {"members": ["vm1", "vm2", "vm3"], "template": "vm1", "min": 1, "max": 3,
                "priority": 4, "time_bounds": [{"max": 1, "from": "20:00", "to": "06:00"}]}}}"#,
        );
        let c = plan(&p, CIB).unwrap().configuration;
        let doc = roxmltree::Document::parse(&c).unwrap();
        let prio = |vm: &str| -> Option<String> {
            doc.descendants()
                .find(|n| n.attribute("id") == Some(format!("vmha-policy-meta-{vm}-priority").as_str()))
                .and_then(|n| n.attribute("value").map(str::to_string))
        };
        assert_eq!(
            prio("vm1").as_deref(),
            Some((ENTITLED + 4).to_string().as_str()),
            "the template: entitled"
        );
        assert_eq!(prio("vm2").as_deref(), Some("4"));
        assert_eq!(prio("vm3").as_deref(), Some("4"));
        // The newest two members beyond max 1 get the night's stop rule; the template none.
        for (vm, bounded) in [("vm1", false), ("vm2", true), ("vm3", true)] {
            let prim = doc
                .descendants()
                .find(|n| n.has_tag_name("primitive") && n.attribute("id") == Some(vm))
                .unwrap();
            let set = prim
                .children()
                .find(|n| n.attribute("id") == Some(format!("vmha-policy-bound-{vm}-20-6").as_str()));
            assert_eq!(set.is_some(), bounded, "{vm}");
            if let Some(set) = set {
                let hours: Vec<&str> = set.descendants().filter_map(|n| n.attribute("hours")).collect();
                assert_eq!(hours, ["20-23", "0-5"]);
                assert!(set
                    .descendants()
                    .any(|n| n.attribute("name") == Some("target-role") && n.attribute("value") == Some("Stopped")));
            }
        }
        // Applied, planning again changes nothing; a policy without them drops them all.
        let applied = crate::policy::tests::with_configuration(CIB, &c);
        assert!(plan(&p, &applied).unwrap().is_empty());
        let mut plain = p.clone();
        let g = plain.groups.get_mut("batch").unwrap();
        g.priority = None;
        g.time_bounds.clear();
        let back = plan(&plain, &applied).unwrap().configuration;
        assert!(
            !back.contains("vmha-policy-bound-") && !back.contains("vmha-policy-meta-vm2-priority"),
            "{back}"
        );
    }

    #[test]
    fn scaling_names_new_members_and_removes_the_newest_first() {
        let g = elastic(&policy(WEB), "web").unwrap();
        let taken = |n: &str| n == "web-2";
        let up = scale_plan(&g, 3, taken).unwrap();
        assert_eq!(up.add, ["web-3"], "web-1 is a member, web-2 is taken");
        assert!(up.remove.is_empty());
        assert_eq!(scale_plan(&g, 1, taken).unwrap().remove, ["web-1"]);
        assert!(scale_plan(&g, 2, taken).unwrap().is_empty());
        let e = scale_plan(&g, 4, taken).unwrap_err().to_string();
        assert!(e.contains("outside its bounds (min 1, max 3)"), "{e}");
        assert!(scale_plan(&g, 0, taken).is_err());
        let mut odd = g.clone();
        odd.autoscale = None;
        odd.members = vec!["web-1".into(), "web1".into()];
        assert_eq!(
            scale_plan(&odd, 1, taken).unwrap().remove,
            ["web-1"],
            "never the template"
        );
    }

    #[test]
    fn the_rule_steps_one_member_within_the_bounds() {
        let rule = Autoscale {
            cpu_above: 70,
            cpu_below: 20,
        };
        let g = elastic(&policy(WEB), "web").unwrap();
        assert_eq!(autoscale_size(&g, &rule, 90.0), Some(3));
        assert_eq!(autoscale_size(&g, &rule, 50.0), None);
        assert_eq!(autoscale_size(&g, &rule, 5.0), Some(1));
        let mut full = g.clone();
        full.members.push("web-2".into());
        assert_eq!(autoscale_size(&full, &rule, 99.0), None, "never above max");
        let mut alone = g.clone();
        alone.members.truncate(1);
        assert_eq!(autoscale_size(&alone, &rule, 0.0), None, "never below min");
        let secs = std::time::Duration::from_secs(2);
        assert_eq!(cpu_percent(0, 1_000_000_000, secs, 1), 50.0);
        assert_eq!(cpu_percent(0, 1_000_000_000, secs, 2), 25.0);
        assert_eq!(cpu_percent(5, 1, secs, 1), 0.0, "a restarted VM's counter goes back");
        for bad in [
            r#"{"cpu_above": 20, "cpu_below": 20}"#,
            r#"{"cpu_above": 120, "cpu_below": 20}"#,
        ] {
            let p = policy(&format!(
                r#"{{"groups": {{"g": {{"members": ["a"], "template": "a", "autoscale": {bad}}}}}}}"#
            ));
            assert!(
                elastic(&p, "g")
                    .unwrap_err()
                    .to_string()
                    .contains("cpu_below < cpu_above"),
                "{bad}"
            );
        }
    }

    #[test]
    fn members_join_with_the_templates_settings_and_leave_without_them() {
        let p = policy(WEB);
        let grown = with_member(&p, "web", "web-3");
        assert_eq!(grown.groups["web"].members, ["web1", "web-1", "web-3"]);
        assert_eq!(grown.vms["web-3"], p.vms["web1"]);
        let shrunk = without_member(&grown, "web", "web-3");
        assert_eq!(shrunk, p);
    }

    #[test]
    fn new_members_go_where_the_group_rule_allows() {
        let p = policy(WEB);
        let free: BTreeMap<String, u64> = [("n1", 900), ("n2", 500), ("n3", 100)]
            .iter()
            .map(|(h, f)| (h.to_string(), *f))
            .collect();
        let running: BTreeMap<String, String> = [("web1", "n1"), ("web-1", "n2"), ("other", "n3")]
            .iter()
            .map(|(v, h)| (v.to_string(), h.to_string()))
            .collect();
        assert_eq!(choose_host(&p, "web", &free, &running).unwrap(), "n3");
        // Apart by site: n1 and n2 are both in site a, taken; n3 in b.
        let mut by_site = p.clone();
        by_site.groups.get_mut("web").unwrap().anti_affinity = Some(Level::Site);
        assert_eq!(choose_host(&by_site, "web", &free, &running).unwrap(), "n3");
        let mut all_taken = running.clone();
        all_taken.insert("web-1".into(), "n3".into());
        all_taken.insert("web1".into(), "n1".into());
        all_taken.insert("web-9".into(), "n2".into());
        let mut full = p.clone();
        full.groups.get_mut("web").unwrap().members.push("web-9".into());
        let e = choose_host(&full, "web", &free, &all_taken).unwrap_err().to_string();
        assert!(e.contains("apart by host"), "{e}");
        // A soft rule falls back to the host with the most free memory.
        full.groups.get_mut("web").unwrap().score = Some("-100".into());
        assert_eq!(choose_host(&full, "web", &free, &all_taken).unwrap(), "n1");
        // Together: the template's host.
        let mut together = p.clone();
        let spec = together.groups.get_mut("web").unwrap();
        spec.anti_affinity = None;
        spec.affinity = Some(Level::Host);
        let only_tpl: BTreeMap<String, String> = [("web1".to_string(), "n2".to_string())].into();
        assert_eq!(choose_host(&together, "web", &free, &only_tpl).unwrap(), "n2");
        assert!(choose_host(&p, "web", &BTreeMap::new(), &running).is_err());
    }
}
