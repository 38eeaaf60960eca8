//! Placement policy: the operator's intent (zones, priorities, capacity, affinity) and its compilation into
//! the Pacemaker configuration that carries it out.
//!
//! # The policy
//! - Zones form a hierarchy, site > building > room > rack, written as a path (`eu`, `eu/b1`, `eu/b1/r2`,
//!   `eu/b1/r2/k7`); each host sits in one zone. A zone may set an overcommit ratio for the hosts under it
//!   (the deepest zone that sets one wins).
//! - Host pools group hosts of one hardware class (`pools`: name -> `class` and optional `units`, the
//!   provider quota in normalised units each host of the pool offers); a host names its pool.
//! - Each VM may have a priority (Pacemaker's `priority`: higher is placed first, lower gives way when no
//!   host has room), a home zone (restarts prefer it, then the nearest zones; `strict_zone` forbids leaving
//!   it), a home pool (preferred over other pools of its class; other classes are never used) and a consumer
//!   quota `units`.
//! - Hosts' capacity is their utilization (vmhad writes `cpu` and `hv_memory` from libvirt; VMs' needs come
//!   from their definitions), scaled by the zone's overcommit ratio or replaced by an explicit capacity.
//! - Groups of VMs may be kept apart (anti-affinity) or together (affinity) by host or by zone level.
//!
//! ```text
//! {
//!   "placement_strategy": "balanced",          // default | utilization | minimal | balanced
//!   "home_score": 100,                         // h: worth of each zone level shared with the home zone
//!   "zones": {"eu/b1": {"overcommit": 1.5}},   // capacity = utilization x 1.5 for hosts under eu/b1
//!   "pools": {"std": {"class": "x86", "units": 64}, "gpu": {"class": "a100"}},
//!   "hosts": {"node1": {"zone": "eu/b1/r1", "pool": "std"},
//!             "node3": {"zone": "us/b1", "capacity": {"cpu": 8, "hv_memory": 16384}}},
//!   "vms":   {"db": {"priority": 100, "zone": "eu", "pool": "std", "units": 8},
//!             "batch": {"priority": 1, "zone": "eu/b1", "strict_zone": true}},
//!   "groups": {"web": {"members": ["web1", "web2"], "anti_affinity": "host"},   // or "site", "rack", ...
//!              "app": {"members": ["app1"], "template": "app1", "min": 1, "max": 4,  // elastic (crate::group)
//!                      "autoscale": {"cpu_above": 70, "cpu_below": 20}, "priority": 50},  // arbitration
//!              "batch": {"members": ["b1"], "template": "b1", "min": 2, "max": 10, "priority": 1,
//!                        "time_bounds": [{"max": 8, "from": "20:00", "to": "06:00"}]}}
//! }
//! ```
//!
//! # Failover order
//! After lost capacity a VM restarts (1) in its home zone and pool where a host has room, (2) else in its
//! pool in other zones, nearest in the zone hierarchy first, (3) else in any pool of its class, (4) only
//! then in place of lower-priority VMs near home, (5) then elsewhere in zone order. The scores that carry
//! it ([`Scores`], h = `home_score`): each zone level a host shares with the VM's home zone adds h (same
//! rack 4h > room 3h > building 2h > site h > elsewhere 0); the VM's own pool adds 5h; a host of another
//! class is -INFINITY; a host whose free capacity (the `vmha-free-*` transient node attributes the DC's
//! vmhad keeps: capacity less the VMs running there) covers the VM's needs adds 10h; every VM of the
//! cluster sticks to its host with 20h. Steps 4-5 are Pacemaker's priority: where no host has the free-room
//! score, the VM takes its best-scored host and Pacemaker, placing lower-priority VMs after it, moves them
//! away or stops them. [`crate::failover`] explains why the free-room attributes are needed and where
//! Pacemaker's scores still fall short.
//!
//! # Where it lives
//! The policy is a JSON document stored in the CIB, in the nvpair `vmha-policy` of the cluster property set
//! `vmha-policy` (so every host sees the same one); see [`store_xml`] and [`Policy::from_cib`].
//!
//! # What it compiles to
//! Every element it generates has an id starting with [`PREFIX`] (`vmha-policy-`): node attributes
//! `vmha-zone-<level>` (the zone path down to that level), `vmha-pool` and `vmha-class` in a set of their
//! own per node, a higher-scored utilization set per node when capacity is scaled or given (a pool's
//! `units` as `vmha-units`), a higher-scored meta set per VM with `priority` and `resource-stickiness` (the
//! latter for every VM once hosts are placed in zones), a utilization set with `vmha-units` per VM with a
//! quota, one location constraint per VM with its zone, pool, class and free-room rules, colocation
//! constraints for groups, elastic groups' member priorities and time bounds (`target-role=Stopped` under a
//! `date_spec` rule, see [`crate::arbitration`] and `docs/policy.md`), and a cluster property set with
//! `placement-strategy`. [`plan`] computes the whole new `<configuration>`: everything
//! the policy owned before is dropped and generated afresh, everything else is copied as it is, so applying
//! it (one `cib_replace` of the configuration section) changes exactly what the policy owns.

use std::collections::{BTreeMap, BTreeSet};

use roxmltree::{Document, Node};
use serde::{Deserialize, Serialize};

use crate::change::{escape, validate_name};
use crate::cib::ClusterView;
use crate::ModelError;

/// Prefix of every id the policy generates (and owns).
pub const PREFIX: &str = "vmha-policy-";
/// Id of the cluster property set that stores the policy document (not generated, so not replaced).
pub const STORE_SET_ID: &str = "vmha-policy";
/// Name of the nvpair that holds the policy document.
pub const STORE_NAME: &str = "vmha-policy";
/// Score of the policy's attribute sets: above the unscored (0) sets users and vmhad write, so they win.
pub const SET_SCORE: &str = "1000";
/// Zone levels, outermost first.
pub const LEVELS: [Level; 4] = [Level::Site, Level::Building, Level::Room, Level::Rack];
/// Largest `home_score` (the other placement scores are multiples of it, see [`Scores`]).
pub const MAX_HOME_SCORE: i32 = 10_000;
/// Largest provider or consumer quota (normalised units).
pub const MAX_UNITS: u64 = 1_000_000_000;
/// Node attribute with a host's pool.
pub const POOL_ATTRIBUTE: &str = "vmha-pool";
/// Node attribute with a host's hardware class (its pool's).
pub const CLASS_ATTRIBUTE: &str = "vmha-class";
/// Utilization name of the normalised units of pools (provider) and VMs (consumer).
pub const UNITS: &str = "vmha-units";
/// Prefix of the transient node attributes that carry a host's free capacity (`vmha-free-cpu`,
/// `vmha-free-hv_memory`, ...): its capacity less what the VMs running on it take, see
/// [`crate::failover::free_capacity`].
pub const FREE_PREFIX: &str = "vmha-free-";

/// The scores the policy compiles to, all derived from `home_score` (h, at least 1 where it matters):
/// each zone level shared with the VM's home zone adds h (same rack 4h > room 3h > building 2h > site h >
/// elsewhere 0), the VM's own pool adds 5h (more than any zone difference), a host with free room for the
/// VM adds 10h (more than pool and zone together), and a running VM keeps its host with a stickiness of
/// 20h (more than everything else together, so nothing moves for a better score).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scores {
    pub level: i32,
    pub pool: i32,
    pub free: i32,
    pub stickiness: i32,
}

/// Errors of the policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Invalid(String),
    #[error("the policy is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the CIB is not well-formed XML: {0}")]
    Xml(#[from] roxmltree::Error),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError::Invalid(msg.into()))
}

/// A zone level, or the host itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Host,
    Site,
    Building,
    Room,
    Rack,
}

impl Level {
    /// Depth in a zone path (site 1 .. rack 4); 0 for the host.
    pub fn depth(self) -> usize {
        match self {
            Level::Host => 0,
            Level::Site => 1,
            Level::Building => 2,
            Level::Room => 3,
            Level::Rack => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Host => "host",
            Level::Site => "site",
            Level::Building => "building",
            Level::Room => "room",
            Level::Rack => "rack",
        }
    }

    /// The node attribute that names a host's zone at this level (`#uname` for the host itself).
    pub fn attribute(self) -> String {
        match self {
            Level::Host => "#uname".to_string(),
            other => format!("vmha-zone-{}", other.name()),
        }
    }

    fn of_depth(depth: usize) -> Option<Level> {
        LEVELS.get(depth.checked_sub(1)?).copied()
    }
}

/// Settings of a zone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    /// Capacity of the zone's hosts is their utilization times this (e.g. 1.5: 50 % overcommit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overcommit: Option<f64>,
}

/// A host pool: hosts of one hardware class that VMs of the pool share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Hardware class (e.g. `gpu-a100`): a VM of the pool may fail over to any pool of its class, never to
    /// another class.
    pub class: String,
    /// Provider quota: normalised units each host of the pool offers (Pacemaker utilization `vmha-units`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
}

/// Settings of a host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Zone path, e.g. `eu/b1/r2`.
    pub zone: String,
    /// The host's pool (a name of the policy's `pools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Explicit capacity (`cpu`, `hv_memory`, ...), instead of the utilization vmhad writes (times overcommit).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capacity: BTreeMap<String, u64>,
}

/// Settings of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Pacemaker `priority`: higher is placed first and stopped last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Home zone: hosts in it are preferred, then the nearest zones (`home_score` per shared level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Never run outside the home zone (a -INFINITY rule); off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict_zone: bool,
    /// Home pool: preferred over other pools of its class; hosts of other classes are never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Consumer quota: normalised units the VM takes of a host's `units` (Pacemaker utilization
    /// `vmha-units`; only hosts whose pool sets `units` can then run it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
}

/// VMs kept apart or together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub members: Vec<String>,
    /// Never two members on the same host (or in the same zone of this level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<Level>,
    /// All members on the same host (or in the same zone of this level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Level>,
    /// Colocation score; default -INFINITY for anti-affinity and INFINITY for affinity (a finite score
    /// makes it a preference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<String>,
    /// Elastic group (see [`crate::group`]): the running member new members are live-cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Elastic group: fewest members `vmha group scale` leaves (default 1, the template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// Elastic group: most members `vmha group scale` makes (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Elastic group: scale on the members' measured CPU load (see [`crate::group::autoscale_size`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::group::Autoscale>,
    /// Elastic group: priority between groups (see [`crate::arbitration`]); a group that must grow and
    /// finds no free room takes members of groups of strictly lower priority, never below their `min`
    /// (the entitlement). Once any group sets one, every elastic group takes part (default 0) and its
    /// members' Pacemaker priority is compiled from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Elastic group: at most `max` members running from `from` to `to` (hours of the DC's clock),
    /// compiled into Pacemaker date rules on the newest members beyond `max`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_bounds: Vec<crate::group::TimeBoundSpec>,
}

fn default_strategy() -> String {
    "balanced".to_string()
}

fn default_home_score() -> i32 {
    100
}

/// The placement policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Pacemaker `placement-strategy`: `default`, `utilization`, `minimal` or `balanced`.
    #[serde(default = "default_strategy")]
    pub placement_strategy: String,
    /// What each zone level a host shares with a VM's home zone is worth (see [`Scores`]); 0 to
    /// [`MAX_HOME_SCORE`].
    #[serde(default = "default_home_score")]
    pub home_score: i32,
    #[serde(default)]
    pub zones: BTreeMap<String, ZoneSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, PoolSpec>,
    #[serde(default)]
    pub hosts: BTreeMap<String, HostSpec>,
    #[serde(default)]
    pub vms: BTreeMap<String, VmSpec>,
    #[serde(default)]
    pub groups: BTreeMap<String, GroupSpec>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            placement_strategy: default_strategy(),
            home_score: default_home_score(),
            zones: BTreeMap::new(),
            pools: BTreeMap::new(),
            hosts: BTreeMap::new(),
            vms: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

/// Checks a zone path: 1 to 4 names separated by `/`.
pub fn validate_zone(zone: &str) -> Result<(), PolicyError> {
    let parts: Vec<&str> = zone.split('/').collect();
    if parts.len() > 4 {
        return invalid(format!("zone {zone:?}: at most 4 levels (site/building/room/rack)"));
    }
    for part in parts {
        validate_name("zone name", part).map_err(|e| PolicyError::Invalid(format!("zone {zone:?}: {e}")))?;
    }
    Ok(())
}

/// `zone` is `ancestor` or lies under it.
pub fn zone_within(zone: &str, ancestor: &str) -> bool {
    zone == ancestor || zone.strip_prefix(ancestor).is_some_and(|rest| rest.starts_with('/'))
}

/// The zone path of `zone` cut at `level` (None when the zone is not that deep).
pub fn zone_at(zone: &str, level: Level) -> Option<String> {
    let parts: Vec<&str> = zone.split('/').collect();
    (level.depth() >= 1 && parts.len() >= level.depth()).then(|| parts[..level.depth()].join("/"))
}

fn is_score(s: &str) -> bool {
    matches!(s, "INFINITY" | "+INFINITY" | "-INFINITY") || s.parse::<i64>().is_ok()
}

impl Policy {
    /// Parses a policy document (JSON).
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        Ok(serde_json::from_str(text)?)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The policy stored in the CIB, if any.
    pub fn from_cib(cib: &str) -> Result<Option<Policy>, PolicyError> {
        let doc = Document::parse(cib)?;
        stored_json(doc.root()).map(Policy::from_json).transpose()
    }

    /// Checks the policy against the cluster: every host, VM and zone it names exists. A policy that fails
    /// here is never stored or applied.
    pub fn validate(&self, view: &ClusterView) -> Result<(), PolicyError> {
        if !["default", "utilization", "minimal", "balanced"].contains(&self.placement_strategy.as_str()) {
            return invalid(format!(
                "placement_strategy {:?}: must be default, utilization, minimal or balanced",
                self.placement_strategy
            ));
        }
        if !(0..=MAX_HOME_SCORE).contains(&self.home_score) {
            return invalid(format!(
                "home_score {}: must be 0 to {MAX_HOME_SCORE} (the free-room and stickiness scores are multiples of it)",
                self.home_score
            ));
        }
        for (pool, spec) in &self.pools {
            validate_name("pool name", pool).map_err(|e| PolicyError::Invalid(e.to_string()))?;
            validate_name("hardware class", &spec.class)
                .map_err(|e| PolicyError::Invalid(format!("pool {pool}: {e}")))?;
            if spec.units.is_some_and(|u| u > MAX_UNITS) {
                return invalid(format!("pool {pool}: units must be at most {MAX_UNITS}"));
            }
            if !self.hosts.values().any(|h| h.pool.as_deref() == Some(pool.as_str())) {
                return invalid(format!("pool {pool}: no host is in it"));
            }
        }
        for (zone, spec) in &self.zones {
            validate_zone(zone)?;
            if let Some(r) = spec.overcommit {
                if !(r.is_finite() && r > 0.0 && r <= 100.0) {
                    return invalid(format!("zone {zone}: overcommit {r} must be above 0 and at most 100"));
                }
            }
            if !self.hosts.values().any(|h| zone_within(&h.zone, zone)) {
                return invalid(format!("zone {zone}: no host is in it"));
            }
        }
        for (host, spec) in &self.hosts {
            if view.host(host).is_none() {
                return invalid(format!("host {host}: not a node of this cluster"));
            }
            validate_zone(&spec.zone).map_err(|e| PolicyError::Invalid(format!("host {host}: {e}")))?;
            if let Some(pool) = &spec.pool {
                if !self.pools.contains_key(pool) {
                    return invalid(format!("host {host}: pool {pool:?} is not in the policy's pools"));
                }
            }
            for name in spec.capacity.keys() {
                validate_name("utilization name", name)
                    .map_err(|e| PolicyError::Invalid(format!("host {host}: {e}")))?;
            }
        }
        for (vm, spec) in &self.vms {
            if view.vm(vm).is_none() {
                return invalid(format!("VM {vm}: no such VM resource in the CIB"));
            }
            if let Some(zone) = &spec.zone {
                validate_zone(zone).map_err(|e| PolicyError::Invalid(format!("VM {vm}: {e}")))?;
                if !self.hosts.values().any(|h| zone_within(&h.zone, zone)) {
                    return invalid(format!("VM {vm}: home zone {zone} has no host"));
                }
            } else if spec.strict_zone {
                return invalid(format!("VM {vm}: strict_zone needs a zone"));
            }
            if let Some(pool) = &spec.pool {
                if !self.pools.contains_key(pool) {
                    return invalid(format!("VM {vm}: pool {pool:?} is not in the policy's pools"));
                }
            }
            if let Some(units) = spec.units {
                if units > MAX_UNITS {
                    return invalid(format!("VM {vm}: units must be at most {MAX_UNITS}"));
                }
                if !self.hosts.values().any(|h| {
                    h.pool
                        .as_ref()
                        .and_then(|p| self.pools.get(p))
                        .is_some_and(|p| p.units.is_some())
                }) {
                    return invalid(format!("VM {vm}: units need a pool whose hosts offer units"));
                }
            }
            if let Some(p) = spec.priority {
                if !(-1_000_000..=1_000_000).contains(&p) {
                    return invalid(format!("VM {vm}: priority {p} must be -1000000 to 1000000"));
                }
            }
        }
        let mut grouped: BTreeMap<&str, &str> = BTreeMap::new();
        for (group, spec) in &self.groups {
            validate_name("group name", group).map_err(|e| PolicyError::Invalid(e.to_string()))?;
            spec.validate_elastic(group)?;
            if !spec.is_elastic() && (spec.priority.is_some() || !spec.time_bounds.is_empty()) {
                return invalid(format!(
                    "group {group}: priority and time_bounds need an elastic group (template, min, max)"
                ));
            }
            if spec.is_elastic() && crate::group::arbitrated(self) {
                if let Some(m) = spec.members.iter().find(|m| self.priority_of(m).is_some()) {
                    return invalid(format!(
                        "VM {m}: its priority comes from group {group}'s priority (groups set priorities); remove it from vms"
                    ));
                }
            }
            if spec.is_elastic() {
                // An elastic group may be the template alone, and need not constrain placement.
                if spec.anti_affinity.is_some() && spec.affinity.is_some() {
                    return invalid(format!("group {group}: set at most one of anti_affinity and affinity"));
                }
            } else {
                if spec.members.len() < 2 {
                    return invalid(format!("group {group}: needs at least 2 members"));
                }
                if spec.anti_affinity.is_some() == spec.affinity.is_some() {
                    return invalid(format!("group {group}: set exactly one of anti_affinity and affinity"));
                }
            }
            if let Some(score) = &spec.score {
                if !is_score(score) {
                    return invalid(format!("group {group}: score {score:?} is not a Pacemaker score"));
                }
            }
            for m in &spec.members {
                if view.vm(m).is_none() {
                    return invalid(format!("group {group}: {m} is no VM resource in the CIB"));
                }
                if let Some(other) = grouped.insert(m, group) {
                    return invalid(format!("VM {m} is in two groups ({other} and {group})"));
                }
            }
        }
        Ok(())
    }

    /// The placement scores (see [`Scores`]).
    pub fn scores(&self) -> Scores {
        let u = self.home_score.max(1);
        Scores {
            level: self.home_score,
            pool: 5 * u,
            free: 10 * u,
            stickiness: 20 * u,
        }
    }

    /// The home zone of a VM, if it has one.
    pub fn home_zone(&self, vm: &str) -> Option<&str> {
        self.vms.get(vm)?.zone.as_deref()
    }

    /// The hardware class of a pool.
    pub fn class_of(&self, pool: &str) -> Option<&str> {
        self.pools.get(pool).map(|p| p.class.as_str())
    }

    fn priority_of(&self, vm: &str) -> Option<i32> {
        self.vms.get(vm).and_then(|v| v.priority)
    }

    fn priority(&self, vm: &str) -> i32 {
        self.vms.get(vm).and_then(|v| v.priority).unwrap_or(0)
    }

    /// The overcommit ratio of a host's zone (the deepest zone that sets one), 1 by default.
    pub fn overcommit(&self, zone: &str) -> f64 {
        self.zones
            .iter()
            .filter(|(z, s)| zone_within(zone, z) && s.overcommit.is_some())
            .max_by_key(|(z, _)| z.split('/').count())
            .and_then(|(_, s)| s.overcommit)
            .unwrap_or(1.0)
    }
}

/// The stored policy's JSON text under `node` (the whole CIB or its `crm_config` section), if any.
pub fn stored_json<'a>(node: Node<'a, '_>) -> Option<&'a str> {
    node.descendants()
        .find(|n| n.has_tag_name("cluster_property_set") && n.attribute("id") == Some(STORE_SET_ID))
        .and_then(|set| {
            set.children()
                .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some(STORE_NAME))
        })
        .and_then(|nv| nv.attribute("value"))
}

/// The `<cluster_property_set>` that stores `policy` in the CIB; for a modify of `crm_config`.
pub fn store_xml(policy: &Policy) -> String {
    let json = serde_json::to_string(policy).unwrap_or_default();
    format!(
        r#"<cluster_property_set id="{STORE_SET_ID}"><nvpair id="{STORE_SET_ID}.document" name="{STORE_NAME}" value="{}"/></cluster_property_set>"#,
        escape(&xml_safe_json(&json))
    )
}

/// `json` with the characters XML 1.0 cannot carry, not even as character references (U+FFFE, U+FFFF,
/// control characters), written as JSON `\u` escapes. In JSON text they can only stand inside strings, where
/// the escape means the same character: the document reads back the same, and the CIB stays well-formed.
fn xml_safe_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c < ' ' || matches!(c, '\u{fffe}' | '\u{ffff}') {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Sets of nvpairs of one tag under `node`, by Pacemaker's precedence: sorted by `score` (highest first,
/// unscored 0), the first value of each name wins. `skip_policy` leaves out the policy's own sets.
pub(crate) fn effective_nvpairs(node: Node, tag: &str, skip_policy: bool) -> BTreeMap<String, String> {
    let mut sets: Vec<(i64, Node)> = node
        .children()
        .filter(|n| n.has_tag_name(tag))
        .filter(|n| !(skip_policy && is_owned(n.attribute("id").unwrap_or(""))))
        .map(|n| (score_value(n.attribute("score").unwrap_or("0")), n))
        .collect();
    sets.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut out = BTreeMap::new();
    for (_, set) in sets {
        for nv in set.children().filter(|n| n.has_tag_name("nvpair")) {
            if let Some(name) = nv.attribute("name") {
                out.entry(name.to_string())
                    .or_insert_with(|| nv.attribute("value").unwrap_or("").to_string());
            }
        }
    }
    out
}

fn score_value(s: &str) -> i64 {
    match s {
        "INFINITY" | "+INFINITY" => 1_000_000,
        "-INFINITY" => -1_000_000,
        other => other.parse().unwrap_or(0),
    }
}

/// An id the policy generated (the stored document is not one: it is kept across applies).
pub fn is_owned(id: &str) -> bool {
    id.starts_with(PREFIX)
}

pub(crate) fn id_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '.'
            }
        })
        .collect()
}

/// What the policy generates, keyed by where it goes.
#[derive(Debug, Default)]
struct Generated {
    /// node id -> sets appended to the `<node>`.
    nodes: BTreeMap<String, Vec<String>>,
    /// primitive id -> sets appended to the `<primitive>`.
    primitives: BTreeMap<String, Vec<String>>,
    constraints: Vec<String>,
    crm_config: Vec<String>,
}

fn nvpair(id: &str, name: &str, value: &str) -> String {
    format!(
        r#"<nvpair id="{}" name="{}" value="{}"/>"#,
        escape(id),
        escape(name),
        escape(value)
    )
}

fn generate(policy: &Policy, doc: &Document, view: &ClusterView) -> Result<Generated, PolicyError> {
    let mut g = Generated::default();
    let nodes: BTreeMap<&str, Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("node"))
        .filter_map(|n| Some((n.attribute("uname")?, n)))
        .collect();
    for (host, spec) in &policy.hosts {
        let node = nodes
            .get(host.as_str())
            .ok_or_else(|| PolicyError::Invalid(format!("host {host}: no <node> in the CIB")))?;
        let id = node.attribute("id").unwrap_or(host);
        let base = format!("{PREFIX}node-{}", id_part(id));
        let mut attrs = String::new();
        for level in LEVELS {
            if let Some(z) = zone_at(&spec.zone, level) {
                attrs.push_str(&nvpair(&format!("{base}-{}", level.name()), &level.attribute(), &z));
            }
        }
        let pool = spec.pool.as_ref().and_then(|p| Some((p, policy.pools.get(p)?)));
        if let Some((name, pool)) = pool {
            attrs.push_str(&nvpair(&format!("{base}-pool"), POOL_ATTRIBUTE, name));
            attrs.push_str(&nvpair(&format!("{base}-class"), CLASS_ATTRIBUTE, &pool.class));
        }
        let mut sets = vec![format!(
            r#"<instance_attributes id="{base}" score="{SET_SCORE}">{attrs}</instance_attributes>"#
        )];
        // Capacity: explicit, else what vmhad (or the user) declared, times the zone's overcommit.
        let raw = effective_nvpairs(*node, "utilization", true);
        let ratio = policy.overcommit(&spec.zone);
        let mut capacity: BTreeMap<String, String> = BTreeMap::new();
        if (ratio - 1.0).abs() > f64::EPSILON {
            for (name, value) in &raw {
                if let Ok(v) = value.parse::<u64>() {
                    capacity.insert(name.clone(), ((v as f64) * ratio).floor().to_string());
                }
            }
        }
        if let Some(units) = pool.and_then(|(_, p)| p.units) {
            capacity.insert(UNITS.to_string(), units.to_string());
        }
        for (name, value) in &spec.capacity {
            capacity.insert(name.clone(), value.to_string());
        }
        if !capacity.is_empty() {
            let pairs: String = capacity
                .iter()
                .map(|(n, v)| nvpair(&format!("{base}-utilization-{}", id_part(n)), n, v))
                .collect();
            sets.push(format!(
                r#"<utilization id="{base}-utilization" score="{SET_SCORE}">{pairs}</utilization>"#
            ));
        }
        g.nodes.insert(id.to_string(), sets);
    }
    let primitives: BTreeMap<&str, Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("primitive"))
        .filter_map(|n| Some((n.attribute("id")?, n)))
        .collect();
    let scores = policy.scores();
    let zoned = !policy.hosts.is_empty();
    let none = VmSpec::default();
    // Arbitration between elastic groups: members' priorities from their group's (entitled ones
    // above every group), and the time bounds' date rules.
    let member_priority = crate::group::member_priorities(policy)?;
    for (vm, set) in crate::group::time_bound_sets(policy)? {
        g.primitives.entry(vm).or_default().push(set);
    }
    for vm in view.vms.iter().map(|v| v.name.as_str()) {
        let spec = policy.vms.get(vm).unwrap_or(&none);
        let v = id_part(vm);
        let mut meta = String::new();
        if let Some(p) = member_priority.get(vm).copied().or(spec.priority) {
            meta.push_str(&nvpair(
                &format!("{PREFIX}meta-{v}-priority"),
                "priority",
                &p.to_string(),
            ));
        }
        if zoned {
            meta.push_str(&nvpair(
                &format!("{PREFIX}meta-{v}-stickiness"),
                "resource-stickiness",
                &scores.stickiness.to_string(),
            ));
        }
        if !meta.is_empty() {
            g.primitives.entry(vm.to_string()).or_default().push(format!(
                r#"<meta_attributes id="{PREFIX}meta-{v}" score="{SET_SCORE}">{meta}</meta_attributes>"#
            ));
        }
        if let Some(units) = spec.units {
            g.primitives.entry(vm.to_string()).or_default().push(format!(
                r#"<utilization id="{PREFIX}util-{v}" score="{SET_SCORE}">{}</utilization>"#,
                nvpair(&format!("{PREFIX}util-{v}-units"), UNITS, &units.to_string())
            ));
        }
        let mut rules = String::new();
        // Step 1-2: nearest zone first, one score per level of the home zone the host shares.
        if let Some(zone) = spec.zone.as_deref() {
            if scores.level > 0 {
                for level in LEVELS {
                    let Some(at) = zone_at(zone, level) else { break };
                    rules.push_str(&format!(
                        r#"<rule id="{PREFIX}home-{v}-{l}" score="{}"><expression id="{PREFIX}home-{v}-{l}-expr" attribute="{}" operation="eq" value="{}"/></rule>"#,
                        scores.level,
                        escape(&level.attribute()),
                        escape(&at),
                        l = level.name(),
                    ));
                }
            }
            if spec.strict_zone {
                let attr = Level::of_depth(zone.split('/').count())
                    .map(Level::attribute)
                    .unwrap_or_default();
                rules.push_str(&format!(
                    concat!(
                        r#"<rule id="{p}home-{v}-out" score="-INFINITY" boolean-op="or">"#,
                        r#"<expression id="{p}home-{v}-out-ne" attribute="{a}" operation="ne" value="{z}"/>"#,
                        r#"<expression id="{p}home-{v}-out-undef" attribute="{a}" operation="not_defined"/>"#,
                        r#"</rule>"#
                    ),
                    p = PREFIX,
                    v = v,
                    a = escape(&attr),
                    z = escape(zone)
                ));
            }
        }
        // Step 2-3: the own pool before other pools of the class; never another class.
        if let Some((pool, class)) = spec.pool.as_deref().and_then(|p| Some((p, policy.class_of(p)?))) {
            rules.push_str(&format!(
                r#"<rule id="{PREFIX}home-{v}-pool" score="{}"><expression id="{PREFIX}home-{v}-pool-expr" attribute="{POOL_ATTRIBUTE}" operation="eq" value="{}"/></rule>"#,
                scores.pool,
                escape(pool)
            ));
            rules.push_str(&format!(
                concat!(
                    r#"<rule id="{p}home-{v}-class" score="-INFINITY" boolean-op="or">"#,
                    r#"<expression id="{p}home-{v}-class-ne" attribute="{a}" operation="ne" value="{c}"/>"#,
                    r#"<expression id="{p}home-{v}-class-undef" attribute="{a}" operation="not_defined"/>"#,
                    r#"</rule>"#
                ),
                p = PREFIX,
                v = v,
                a = CLASS_ATTRIBUTE,
                c = escape(class)
            ));
        }
        // Steps 1-3 before 4-5: a host with free room for the VM (its transient `vmha-free-*` attributes,
        // kept by vmhad) beats any host without, so a VM displaces another only where no host has room.
        if zoned {
            let mut needs: BTreeMap<String, u64> = primitives
                .get(vm)
                .map(|p| effective_nvpairs(*p, "utilization", true))
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, val)| Some((k, val.parse::<u64>().ok()?)))
                .collect();
            if let Some(units) = spec.units {
                needs.insert(UNITS.to_string(), units);
            }
            if !needs.is_empty() {
                let exprs: String = needs
                    .iter()
                    .map(|(name, need)| {
                        format!(
                            r#"<expression id="{PREFIX}home-{v}-free-{}" attribute="{}" operation="gte" type="number" value="{need}"/>"#,
                            id_part(name),
                            escape(&format!("{FREE_PREFIX}{name}"))
                        )
                    })
                    .collect();
                rules.push_str(&format!(
                    r#"<rule id="{PREFIX}home-{v}-free" score="{}" boolean-op="and">{exprs}</rule>"#,
                    scores.free
                ));
            }
        }
        if !rules.is_empty() {
            g.constraints.push(format!(
                r#"<rsc_location id="{PREFIX}home-{v}" rsc="{}">{rules}</rsc_location>"#,
                escape(vm)
            ));
        }
    }
    for (group, spec) in &policy.groups {
        let (level, default_score) = match (spec.anti_affinity, spec.affinity) {
            (Some(l), _) => (l, "-INFINITY"),
            (None, Some(l)) => (l, "INFINITY"),
            (None, None) => continue,
        };
        let kind = if spec.anti_affinity.is_some() {
            "apart"
        } else {
            "together"
        };
        let score = spec.score.as_deref().unwrap_or(default_score);
        // Highest priority first: each member is placed with (after) the ones before it, so when
        // capacity is short the lower-priority member is the one that gives way.
        let mut members: Vec<&String> = spec.members.iter().collect();
        members.sort_by(|a, b| policy.priority(b).cmp(&policy.priority(a)).then(a.cmp(b)));
        for (i, dependent) in members.iter().enumerate() {
            let primaries: Vec<&&String> = if spec.anti_affinity.is_some() {
                members[..i].iter().collect()
            } else {
                members[..i].iter().take(1).collect()
            };
            for primary in primaries {
                g.constraints.push(format!(
                    r#"<rsc_colocation id="{PREFIX}{kind}-{}-{}-{}" rsc="{}" with-rsc="{}" score="{}" node-attribute="{}"/>"#,
                    id_part(group),
                    id_part(dependent),
                    id_part(primary),
                    escape(dependent),
                    escape(primary),
                    escape(score),
                    escape(&level.attribute())
                ));
            }
        }
    }
    g.crm_config.push(format!(
        r#"<cluster_property_set id="{PREFIX}options">{}</cluster_property_set>"#,
        nvpair(
            &format!("{PREFIX}options-placement-strategy"),
            "placement-strategy",
            &policy.placement_strategy
        )
    ));
    Ok(g)
}

/// An element's attributes, in order.
pub(crate) type Attributes = Vec<(String, String)>;

/// Writes `node` and its subtree as XML, leaving out elements `skip` selects and appending, at the end of
/// each element, what `append` gives for it.
pub(crate) fn write_xml(
    node: Node,
    out: &mut String,
    skip: &dyn Fn(Node) -> bool,
    append: &dyn Fn(Node) -> Vec<String>,
) {
    write_xml_with(node, out, skip, append, &|_| None)
}

/// As [`write_xml`], and `attributes` may replace an element's attributes.
pub(crate) fn write_xml_with(
    node: Node,
    out: &mut String,
    skip: &dyn Fn(Node) -> bool,
    append: &dyn Fn(Node) -> Vec<String>,
    attributes: &dyn Fn(Node) -> Option<Attributes>,
) {
    if node.is_text() {
        out.push_str(&escape_text(node.text().unwrap_or("")));
        return;
    }
    if node.is_comment() {
        out.push_str(&format!("<!--{}-->", node.text().unwrap_or("")));
        return;
    }
    if !node.is_element() || skip(node) {
        return;
    }
    let tag = node.tag_name().name();
    out.push('<');
    out.push_str(tag);
    match attributes(node) {
        Some(attrs) => {
            for (k, v) in attrs {
                out.push_str(&format!(r#" {k}="{}""#, escape(&v)));
            }
        }
        None => {
            for a in node.attributes() {
                out.push_str(&format!(r#" {}="{}""#, a.name(), escape(a.value())));
            }
        }
    }
    let extra = append(node);
    let mut inner = String::new();
    for c in node.children() {
        write_xml_with(c, &mut inner, skip, append, attributes);
    }
    for e in extra {
        inner.push_str(&e);
    }
    if inner.is_empty() {
        out.push_str("/>");
    } else {
        out.push('>');
        out.push_str(&inner);
        out.push_str(&format!("</{tag}>"));
    }
}

fn escape_text(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// An element in a canonical form (attributes sorted, whitespace-only text dropped), for comparing.
fn canonical(node: Node) -> String {
    let mut attrs: Vec<(String, String)> = node
        .attributes()
        .map(|a| (a.name().to_string(), a.value().to_string()))
        .collect();
    attrs.sort();
    let mut s = format!("<{}", node.tag_name().name());
    for (k, v) in attrs {
        s.push_str(&format!(r#" {k}="{}""#, escape(&v)));
    }
    let children: Vec<String> = node
        .children()
        .filter_map(|c| {
            if c.is_element() {
                Some(canonical(c))
            } else if c.is_text() {
                let t = c.text().unwrap_or("").trim();
                (!t.is_empty()).then(|| escape_text(t))
            } else {
                None
            }
        })
        .collect();
    if children.is_empty() {
        s.push_str("/>");
    } else {
        s.push('>');
        s.push_str(&children.concat());
        s.push_str(&format!("</{}>", node.tag_name().name()));
    }
    s
}

/// The outermost policy-owned elements of a `<configuration>`: id -> (where, canonical XML).
fn owned_elements(configuration: Node) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    fn walk(node: Node, out: &mut BTreeMap<String, (String, String)>) {
        for c in node.children().filter(|c| c.is_element()) {
            match c.attribute("id") {
                Some(id) if is_owned(id) => {
                    out.insert(id.to_string(), (location(c), canonical(c)));
                }
                _ => walk(c, out),
            }
        }
    }
    walk(configuration, &mut out);
    out
}

/// Where an element sits, e.g. `nodes/node[node1]` or `constraints`.
fn location(node: Node) -> String {
    let mut parts: Vec<String> = node
        .ancestors()
        .skip(1)
        .filter(|a| a.is_element())
        .take_while(|a| !a.has_tag_name("configuration"))
        .map(|a| match a.attribute("uname").or(a.attribute("id")) {
            Some(id) => format!("{}[{}]", a.tag_name().name(), id),
            None => a.tag_name().name().to_string(),
        })
        .collect();
    parts.reverse();
    parts.join("/")
}

/// One difference between the current and the planned configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "lowercase")]
pub enum PlanChange {
    Add {
        at: String,
        id: String,
        xml: String,
    },
    Remove {
        at: String,
        id: String,
        xml: String,
    },
    Replace {
        at: String,
        id: String,
        old: String,
        new: String,
    },
}

/// What applying the policy does: the new `<configuration>` and how it differs from the current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The whole new `<configuration>` section (for a `cib_replace` of `configuration`).
    #[serde(skip)]
    pub configuration: String,
    /// The CIB version the plan was computed from (`admin_epoch.epoch.num_updates`).
    pub from_version: String,
    pub changes: Vec<PlanChange>,
    /// Things that keep the policy from taking full effect.
    pub warnings: Vec<String>,
}

impl Plan {
    /// True when applying changes nothing.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The difference as text: `+` added, `-` removed elements, each with where it goes.
    pub fn diff_text(&self) -> String {
        let mut s = String::new();
        for c in &self.changes {
            match c {
                PlanChange::Add { at, xml, .. } => s.push_str(&format!("+ {at}: {xml}\n")),
                PlanChange::Remove { at, xml, .. } => s.push_str(&format!("- {at}: {xml}\n")),
                PlanChange::Replace { at, old, new, .. } => {
                    s.push_str(&format!("- {at}: {old}\n+ {at}: {new}\n"));
                }
            }
        }
        s
    }
}

/// Compiles `policy` against the whole CIB `cib` into the configuration that carries it out (see the
/// module documentation). Validates the policy first.
pub fn plan(policy: &Policy, cib: &str) -> Result<Plan, PolicyError> {
    let view = ClusterView::from_cib(cib)?;
    policy.validate(&view)?;
    let doc = Document::parse(cib)?;
    let configuration = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("configuration"))
        .ok_or(ModelError::MissingSection("configuration"))?;
    let generated = generate(policy, &doc, &view)?;
    let skip = |n: Node| n.attribute("id").is_some_and(is_owned);
    let append = |n: Node| -> Vec<String> {
        let id = n.attribute("id").unwrap_or("");
        match n.tag_name().name() {
            "node" if n.parent().is_some_and(|p| p.has_tag_name("nodes")) => {
                generated.nodes.get(id).cloned().unwrap_or_default()
            }
            "primitive" => generated.primitives.get(id).cloned().unwrap_or_default(),
            "constraints" => generated.constraints.clone(),
            "crm_config" => generated.crm_config.clone(),
            _ => Vec::new(),
        }
    };
    let mut text = String::new();
    write_xml(configuration, &mut text, &skip, &append);
    // A configuration without <constraints> cannot happen in a CIB Pacemaker wrote; refuse rather than drop.
    for (section, needed) in [("constraints", !generated.constraints.is_empty()), ("crm_config", true)] {
        if needed && !configuration.children().any(|c| c.has_tag_name(section)) {
            return invalid(format!("the CIB has no <{section}> section"));
        }
    }

    let new_doc = Document::parse(&text)?;
    let old = owned_elements(configuration);
    let new = owned_elements(new_doc.root_element());
    let mut changes = Vec::new();
    for (id, (at, xml)) in &old {
        match new.get(id) {
            None => changes.push(PlanChange::Remove {
                at: at.clone(),
                id: id.clone(),
                xml: xml.clone(),
            }),
            Some((new_at, new_xml)) if new_xml != xml || new_at != at => changes.push(PlanChange::Replace {
                at: new_at.clone(),
                id: id.clone(),
                old: xml.clone(),
                new: new_xml.clone(),
            }),
            Some(_) => {}
        }
    }
    for (id, (at, xml)) in &new {
        if !old.contains_key(id) {
            changes.push(PlanChange::Add {
                at: at.clone(),
                id: id.clone(),
                xml: xml.clone(),
            });
        }
    }

    let mut warnings = Vec::new();
    if let Some(user) = configuration
        .descendants()
        .find(|n| n.has_tag_name("cluster_property_set") && n.attribute("id") == Some("cib-bootstrap-options"))
        .and_then(|set| {
            set.children()
                .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some("placement-strategy"))
        })
        .and_then(|n| n.attribute("value"))
    {
        if user != policy.placement_strategy {
            warnings.push(format!(
                "placement-strategy is {user:?} in cib-bootstrap-options, which wins over the policy's {:?}",
                policy.placement_strategy
            ));
        }
    }
    if policy.placement_strategy == "default" && policy.hosts.values().any(|h| !h.capacity.is_empty()) {
        warnings.push("placement_strategy default ignores capacity".into());
    }
    let unplaced: BTreeSet<&str> = view
        .hosts
        .iter()
        .map(|h| h.name.as_str())
        .filter(|h| !policy.hosts.contains_key(*h))
        .collect();
    if !policy.hosts.is_empty() && !unplaced.is_empty() {
        warnings.push(format!(
            "hosts in no zone: {}",
            unplaced.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(Plan {
        configuration: text,
        from_version: view.version,
        changes,
        warnings,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The CIB of the policy tests (the policy fuzz target uses it too).
    pub(crate) const CIB: &str = include_str!("testdata/policy-cib.xml");

    pub(crate) fn policy() -> Policy {
        Policy::from_json(
            r#"{
            "zones": {"a": {"overcommit": 1.5}},
            "hosts": {"n1": {"zone": "a/r1"}, "n2": {"zone": "a/r2"}, "n3": {"zone": "b", "capacity": {"hv_memory": 256}}},
            "vms": {"vm1": {"priority": 10, "zone": "a"}, "vm2": {"priority": 5, "zone": "b", "strict_zone": true}, "vm3": {}},
            "groups": {"app": {"members": ["vm1", "vm2", "vm3"], "anti_affinity": "host"}}
        }"#,
        )
        .unwrap()
    }

    /// The CIB with `configuration` put in place of its configuration section.
    pub(crate) fn with_configuration(cib: &str, configuration: &str) -> String {
        let start = cib.find("<configuration>").unwrap();
        let end = cib.find("</configuration>").unwrap() + "</configuration>".len();
        format!("{}{}{}", &cib[..start], configuration, &cib[end..])
    }

    #[test]
    fn compiles_zones_priorities_capacity_and_groups() {
        let p = plan(&policy(), CIB).unwrap();
        let c = &p.configuration;
        Document::parse(c).unwrap();
        for needle in [
            // zone path per level as node attributes
            r#"<nvpair id="vmha-policy-node-1-site" name="vmha-zone-site" value="a"/>"#,
            r#"<nvpair id="vmha-policy-node-1-building" name="vmha-zone-building" value="a/r1"/>"#,
            // overcommit scales what vmhad declared; an explicit capacity replaces it
            r#"<utilization id="vmha-policy-node-1-utilization" score="1000"><nvpair id="vmha-policy-node-1-utilization-cpu" name="cpu" value="6"/><nvpair id="vmha-policy-node-1-utilization-hv_memory" name="hv_memory" value="1500"/></utilization>"#,
            r#"<nvpair id="vmha-policy-node-3-utilization-hv_memory" name="hv_memory" value="256"/>"#,
            // priority
            // priority, and a stickiness above every placement score (every VM of the cluster)
            r#"<meta_attributes id="vmha-policy-meta-vm1" score="1000"><nvpair id="vmha-policy-meta-vm1-priority" name="priority" value="10"/><nvpair id="vmha-policy-meta-vm1-stickiness" name="resource-stickiness" value="2000"/></meta_attributes>"#,
            r#"<meta_attributes id="vmha-policy-meta-vm3" score="1000"><nvpair id="vmha-policy-meta-vm3-stickiness" name="resource-stickiness" value="2000"/></meta_attributes>"#,
            // home zone: preferred, not required; a host with free room for the VM beats any zone
            r#"<rsc_location id="vmha-policy-home-vm1" rsc="vm1"><rule id="vmha-policy-home-vm1-site" score="100"><expression id="vmha-policy-home-vm1-site-expr" attribute="vmha-zone-site" operation="eq" value="a"/></rule><rule id="vmha-policy-home-vm1-free" score="1000" boolean-op="and"><expression id="vmha-policy-home-vm1-free-hv_memory" attribute="vmha-free-hv_memory" operation="gte" type="number" value="128"/></rule></rsc_location>"#,
            // ...unless strict
            r#"<rule id="vmha-policy-home-vm2-out" score="-INFINITY" boolean-op="or">"#,
            // anti-affinity: the lower priority VM is placed with (after) the higher one
            r##"<rsc_colocation id="vmha-policy-apart-app-vm2-vm1" rsc="vm2" with-rsc="vm1" score="-INFINITY" node-attribute="#uname"/>"##,
            r##"<rsc_colocation id="vmha-policy-apart-app-vm3-vm2" rsc="vm3" with-rsc="vm2" score="-INFINITY" node-attribute="#uname"/>"##,
            r#"<rsc_colocation id="vmha-policy-apart-app-vm3-vm1""#,
            r#"<nvpair id="vmha-policy-options-placement-strategy" name="placement-strategy" value="balanced"/>"#,
            // user configuration is kept
            r#"<rsc_location id="user-loc" rsc="vm1" node="n1" score="50"/>"#,
            r#"<nvpair id="u1m" name="hv_memory" value="1000"/>"#,
        ] {
            assert!(c.contains(needle), "{needle}\nin\n{c}");
        }
        assert!(!c.contains("-INFINITY\" boolean-op=\"or\"><expression id=\"vmha-policy-home-vm1"));
        assert!(!c.contains("vmha-policy-meta-vm3-priority"), "no priority set");
        assert!(!c.contains("vmha-policy-home-vm3"), "no zone, no needs: no rules");
        assert!(p.changes.iter().all(|ch| matches!(ch, PlanChange::Add { .. })));
        assert!(p
            .diff_text()
            .contains("+ nodes/node[n1]: <instance_attributes id=\"vmha-policy-node-1\""));
        assert_eq!(p.from_version, "0.5.2");
    }

    #[test]
    fn reapplying_an_unchanged_policy_changes_nothing() {
        let first = plan(&policy(), CIB).unwrap();
        assert!(!first.is_empty());
        let applied = with_configuration(CIB, &first.configuration);
        let again = plan(&policy(), &applied).unwrap();
        assert!(again.is_empty(), "{}", again.diff_text());
        assert_eq!(again.configuration, first.configuration);
    }

    #[test]
    fn reapplying_replaces_exactly_what_the_policy_owns() {
        let applied = with_configuration(CIB, &plan(&policy(), CIB).unwrap().configuration);
        let mut p = policy();
        p.groups.clear();
        p.vms.get_mut("vm1").unwrap().priority = Some(20);
        let second = plan(&p, &applied).unwrap();
        let removed: Vec<&str> = second
            .changes
            .iter()
            .filter_map(|c| match c {
                PlanChange::Remove { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            removed,
            vec![
                "vmha-policy-apart-app-vm2-vm1",
                "vmha-policy-apart-app-vm3-vm1",
                "vmha-policy-apart-app-vm3-vm2"
            ]
        );
        let replaced: Vec<&str> = second
            .changes
            .iter()
            .filter_map(|c| match c {
                PlanChange::Replace { id, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(replaced, vec!["vmha-policy-meta-vm1"]);
        assert!(second.configuration.contains(r#"<rsc_location id="user-loc""#));
        // An empty policy removes everything the policy owned and nothing else.
        let none = plan(&Policy::default(), &applied).unwrap();
        let cleared = with_configuration(CIB, &none.configuration);
        let doc = Document::parse(&cleared).unwrap();
        let owned: Vec<&str> = doc
            .descendants()
            .filter_map(|n| n.attribute("id"))
            .filter(|id| is_owned(id) && *id != "vmha-policy-options" && !id.starts_with("vmha-policy-options-"))
            .collect();
        assert!(owned.is_empty(), "{owned:?}");
        let before = Document::parse(CIB).unwrap();
        let user_ids: BTreeSet<&str> = before.descendants().filter_map(|n| n.attribute("id")).collect();
        let after_ids: BTreeSet<&str> = doc
            .descendants()
            .filter_map(|n| n.attribute("id"))
            .filter(|id| !is_owned(id))
            .collect();
        assert_eq!(user_ids, after_ids);
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        let check = |json: &str, why: &str| {
            let err = Policy::from_json(json)
                .map_err(|e| e.to_string())
                .and_then(|p| plan(&p, CIB).map(|_| ()).map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(err.contains(why), "{json}: {err}");
        };
        check(r#"{"hosts": {"n9": {"zone": "a"}}}"#, "host n9: not a node");
        check(r#"{"hosts": {"n1": {"zone": "a/b/c/d/e"}}}"#, "at most 4 levels");
        check(r#"{"hosts": {"n1": {"zone": "a b"}}}"#, "zone name");
        check(r#"{"vms": {"nosuch": {"priority": 1}}}"#, "VM nosuch: no such VM");
        check(
            r#"{"hosts": {"n1": {"zone": "a"}}, "vms": {"vm1": {"zone": "b"}}}"#,
            "home zone b has no host",
        );
        check(r#"{"placement_strategy": "random"}"#, "placement_strategy");
        check(
            r#"{"zones": {"a": {"overcommit": 0}}, "hosts": {"n1": {"zone": "a"}}}"#,
            "overcommit",
        );
        check(
            r#"{"groups": {"g": {"members": ["vm1"], "anti_affinity": "host"}}}"#,
            "at least 2",
        );
        check(
            r#"{"groups": {"g": {"members": ["vm1", "ip"], "anti_affinity": "host"}}}"#,
            "ip is no VM",
        );
        check(
            r#"{"groups": {"g": {"members": ["vm1", "vm2"], "anti_affinity": "host", "affinity": "host"}}}"#,
            "exactly one",
        );
        check(r#"{"typo": 1}"#, "unknown field");
        check(
            r#"{"hosts": {"n1": {"zone": "a", "pool": "p"}}}"#,
            "host n1: pool \"p\" is not in the policy's pools",
        );
        check(
            r#"{"pools": {"p": {"class": "x"}}, "hosts": {"n1": {"zone": "a"}}}"#,
            "pool p: no host is in it",
        );
        check(
            r#"{"pools": {"p": {"class": "a b"}}, "hosts": {"n1": {"zone": "a", "pool": "p"}}}"#,
            "hardware class",
        );
        check(
            r#"{"pools": {"p<": {"class": "x"}}, "hosts": {"n1": {"zone": "a", "pool": "p<"}}}"#,
            "pool name",
        );
        check(
            r#"{"pools": {"p": {"class": "x", "units": 1000000000000}}, "hosts": {"n1": {"zone": "a", "pool": "p"}}}"#,
            "units must be at most",
        );
        check(
            r#"{"pools": {"p": {"class": "x"}}, "hosts": {"n1": {"zone": "a", "pool": "p"}}, "vms": {"vm1": {"units": 2}}}"#,
            "VM vm1: units need a pool whose hosts offer units",
        );
        check(
            r#"{"hosts": {"n1": {"zone": "a"}}, "vms": {"vm1": {"pool": "q"}}}"#,
            "VM vm1: pool \"q\" is not in the policy's pools",
        );
        check(r#"{"home_score": 10001}"#, "home_score 10001");
    }

    #[test]
    fn zones_grade_per_level_and_pools_rank_and_fence_classes() {
        let p = Policy::from_json(
            r#"{
            "pools": {"std": {"class": "x86", "units": 10}, "gpu": {"class": "gpu"}},
            "hosts": {"n1": {"zone": "eu/b1/r1/k1", "pool": "std"}, "n2": {"zone": "eu/b2", "pool": "gpu"}},
            "vms": {"vm1": {"zone": "eu/b1/r1/k1", "pool": "std", "units": 3}}
        }"#,
        )
        .unwrap();
        let c = plan(&p, CIB).unwrap().configuration;
        Document::parse(&c).unwrap();
        for needle in [
            // one rule per level of the home zone, each worth home_score: same rack 400 ... same site 100
            r#"<rule id="vmha-policy-home-vm1-site" score="100"><expression id="vmha-policy-home-vm1-site-expr" attribute="vmha-zone-site" operation="eq" value="eu"/></rule>"#,
            r#"<rule id="vmha-policy-home-vm1-building" score="100"><expression id="vmha-policy-home-vm1-building-expr" attribute="vmha-zone-building" operation="eq" value="eu/b1"/></rule>"#,
            r#"<rule id="vmha-policy-home-vm1-rack" score="100"><expression id="vmha-policy-home-vm1-rack-expr" attribute="vmha-zone-rack" operation="eq" value="eu/b1/r1/k1"/></rule>"#,
            // the own pool beats every zone difference; another class is forbidden
            r#"<rule id="vmha-policy-home-vm1-pool" score="500"><expression id="vmha-policy-home-vm1-pool-expr" attribute="vmha-pool" operation="eq" value="std"/></rule>"#,
            r#"<rule id="vmha-policy-home-vm1-class" score="-INFINITY" boolean-op="or"><expression id="vmha-policy-home-vm1-class-ne" attribute="vmha-class" operation="ne" value="x86"/>"#,
            // free room for its needs (the units included) beats pool and zone together
            r#"<rule id="vmha-policy-home-vm1-free" score="1000" boolean-op="and"><expression id="vmha-policy-home-vm1-free-hv_memory" attribute="vmha-free-hv_memory" operation="gte" type="number" value="128"/><expression id="vmha-policy-home-vm1-free-vmha-units" attribute="vmha-free-vmha-units" operation="gte" type="number" value="3"/></rule>"#,
            // hosts carry pool and class; the pool's units are their capacity; the VM's units its need
            r#"<nvpair id="vmha-policy-node-1-pool" name="vmha-pool" value="std"/><nvpair id="vmha-policy-node-1-class" name="vmha-class" value="x86"/>"#,
            r#"<nvpair id="vmha-policy-node-1-utilization-vmha-units" name="vmha-units" value="10"/>"#,
            r#"<utilization id="vmha-policy-util-vm1" score="1000"><nvpair id="vmha-policy-util-vm1-units" name="vmha-units" value="3"/></utilization>"#,
            r#"<nvpair id="vmha-policy-meta-vm1-stickiness" name="resource-stickiness" value="2000"/>"#,
        ] {
            assert!(c.contains(needle), "{needle}\nin\n{c}");
        }
        assert!(
            !c.contains("vmha-policy-node-2-utilization-vmha-units"),
            "pool gpu offers no units"
        );
        let s = p.scores();
        assert!(s.pool > 4 * s.level && s.free > s.pool + 4 * s.level && s.stickiness > s.free + s.pool + 4 * s.level);
    }

    #[test]
    fn zone_levels_and_overcommit() {
        assert_eq!(zone_at("eu/b1/r2", Level::Building).as_deref(), Some("eu/b1"));
        assert_eq!(zone_at("eu", Level::Room), None);
        assert!(zone_within("eu/b1", "eu") && !zone_within("eu2", "eu") && zone_within("eu", "eu"));
        let p =
            Policy::from_json(r#"{"zones": {"eu": {"overcommit": 2.0}, "eu/b1": {"overcommit": 1.25}, "eu/b2": {}}}"#)
                .unwrap();
        assert_eq!(p.overcommit("eu/b1/r1"), 1.25);
        assert_eq!(p.overcommit("eu/b2"), 2.0);
        assert_eq!(p.overcommit("us"), 1.0);
    }

    #[test]
    fn the_policy_round_trips_through_the_cib() {
        let p = policy();
        let set = store_xml(&p);
        let cib = CIB.replace(
            "</cluster_property_set></crm_config>",
            &format!("</cluster_property_set>{set}</crm_config>"),
        );
        assert_eq!(Policy::from_cib(&cib).unwrap(), Some(p));
        assert_eq!(Policy::from_cib(CIB).unwrap(), None);
        // The stored document is not policy-owned: applying keeps it.
        let planned = plan(&policy(), &cib).unwrap();
        assert!(planned
            .configuration
            .contains(r#"<cluster_property_set id="vmha-policy">"#));
    }

    #[test]
    fn characters_xml_cannot_carry_are_stored_as_json_escapes() {
        // Found by the policy_doc fuzz target: U+FFFF in any string of the document made the stored
        // CIB element ill-formed.
        let p = Policy {
            placement_strategy: "a\u{ffff}b\u{fffe}c\u{1}d\te\u{7f}".into(),
            ..Policy::default()
        };
        let set = store_xml(&p);
        assert!(
            !set.contains('\u{ffff}') && !set.contains('\u{fffe}') && !set.contains('\u{1}'),
            "{set}"
        );
        let cib = CIB.replace(
            "</cluster_property_set></crm_config>",
            &format!("</cluster_property_set>{set}</crm_config>"),
        );
        assert_eq!(Policy::from_cib(&cib).unwrap(), Some(p));
    }

    #[test]
    fn effective_sets_follow_pacemakers_precedence() {
        let x = r#"<node id="1"><utilization id="a"><nvpair name="cpu" value="4"/></utilization><utilization id="vmha-policy-x" score="1000"><nvpair name="cpu" value="6"/></utilization></node>"#;
        let doc = Document::parse(x).unwrap();
        assert_eq!(effective_nvpairs(doc.root_element(), "utilization", false)["cpu"], "6");
        assert_eq!(effective_nvpairs(doc.root_element(), "utilization", true)["cpu"], "4");
    }
}

/// The applied versions of the policy, kept in the CIB beside the stored one: each time `vmha policy
/// apply` (or a rollback) changes the cluster, the policy it applied is recorded with who and when, so an
/// operator can see what changed (`vmha policy history`, `diff`) and go back (`rollback`). The set's id
/// does not start with [`PREFIX`]: compiling a policy never touches it.
pub mod history {
    use std::time::Duration;

    use roxmltree::{Document, Node};
    use serde::{Deserialize, Serialize};

    use super::{escape, store_xml, write_xml, xml_safe_json, Policy, PolicyError, STORE_SET_ID};

    /// The cluster property set of the history (in `crm_config`).
    pub const SET_ID: &str = "vmha-history";
    /// How many versions are kept (the oldest go first).
    pub const KEEP: usize = 20;
    /// Largest history entry read back, in bytes of its stored text: a policy document is at most 1 MiB
    /// (`vmha policy set`), with who, when and escapes well under this. A bigger entry was not written by
    /// vmha and is refused unread.
    pub const MAX_ENTRY: usize = 4 << 20;
    /// How long the unified diff may search for the shortest difference before it settles for a longer one.
    const DIFF_DEADLINE: Duration = Duration::from_secs(2);

    /// One applied version.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Version {
        /// 1, 2, 3...: one more than the newest kept.
        pub version: u32,
        /// When it was applied (RFC 3339, UTC).
        pub time: String,
        /// Who applied it (`user@host`; `user (sudo as root)@host` under sudo).
        pub who: String,
        /// What it was: `apply`, or `rollback to N`.
        pub note: String,
        /// The policy document.
        pub policy: serde_json::Value,
    }

    /// Errors of the policy history, each naming the version or the stored entry.
    #[derive(Debug, thiserror::Error)]
    pub enum HistoryError {
        #[error("policy version {version} is not kept (kept: {kept}; vmha policy history)")]
        NotKept { version: u32, kept: String },
        #[error("policy history entry {id} is {bytes} bytes, more than the {max} vmha writes: refused unread")]
        TooLarge { id: String, bytes: usize, max: usize },
        #[error("policy history entry {id} does not read as a recorded version: {reason}")]
        Unreadable { id: String, reason: String },
        #[error("policy history entry {id} says it is version {inner}, its name says {outer}")]
        Mismatch { id: String, inner: u32, outer: u32 },
        #[error("policy version {version} no longer reads as a policy: {reason}")]
        NotAPolicy { version: u32, reason: String },
        #[error("the configuration to record policy version {version} in: {reason}")]
        Configuration { version: u32, reason: String },
    }

    /// One stored entry: its nvpair id, the version its name gives, and what it reads as.
    #[derive(Debug)]
    pub struct Entry {
        pub id: String,
        /// From the nvpair's name (`vmha-policy-vN`); `None` when the name is not one vmha writes.
        pub number: Option<u32>,
        pub read: Result<Version, HistoryError>,
    }

    fn nvpair_id(version: u32) -> String {
        format!("{SET_ID}.v{version}")
    }

    fn nvpair_name(version: u32) -> String {
        format!("vmha-policy-v{version}")
    }

    fn history_set<'a, 'i>(doc: &'a Document<'i>) -> Option<Node<'a, 'i>> {
        doc.descendants().find(|n| {
            n.has_tag_name("cluster_property_set")
                && n.attribute("id") == Some(SET_ID)
                && n.parent().is_some_and(|p| p.has_tag_name("crm_config"))
        })
    }

    fn read_entry(nv: Node) -> Entry {
        let id = nv.attribute("id").unwrap_or("").to_string();
        let number = nv
            .attribute("name")
            .and_then(|n| n.strip_prefix("vmha-policy-v"))
            .and_then(|n| n.parse::<u32>().ok());
        let value = nv.attribute("value").unwrap_or("");
        let read = if value.len() > MAX_ENTRY {
            Err(HistoryError::TooLarge {
                id: id.clone(),
                bytes: value.len(),
                max: MAX_ENTRY,
            })
        } else {
            serde_json::from_str::<Version>(value)
                .map_err(|e| HistoryError::Unreadable {
                    id: id.clone(),
                    reason: e.to_string(),
                })
                .and_then(|v| match number {
                    Some(n) if n == v.version => Ok(v),
                    Some(n) => Err(HistoryError::Mismatch {
                        id: id.clone(),
                        inner: v.version,
                        outer: n,
                    }),
                    None => Err(HistoryError::Unreadable {
                        id: id.clone(),
                        reason: "its name is not vmha-policy-vN".into(),
                    }),
                })
        };
        Entry { id, number, read }
    }

    /// Every entry of the history kept in the CIB, oldest first (unnumbered ones first), each read on
    /// its own: one broken entry does not hide the others.
    pub fn entries(cib: &str) -> Result<Vec<Entry>, PolicyError> {
        let doc = Document::parse(cib)?;
        let mut out: Vec<Entry> = history_set(&doc)
            .map(|set| {
                set.children()
                    .filter(|n| n.has_tag_name("nvpair"))
                    .map(read_entry)
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|e| e.number);
        Ok(out)
    }

    /// Every version kept in the CIB, oldest first. An entry that does not read is an error naming it
    /// (the history is only ever written by vmha).
    pub fn versions(cib: &str) -> Result<Vec<Version>, PolicyError> {
        entries(cib)?
            .into_iter()
            .map(|e| e.read.map_err(|e| PolicyError::Invalid(e.to_string())))
            .collect()
    }

    /// Version `n` of the history in `cib`: not kept, too large and unreadable are errors naming it.
    pub fn find(cib: &str, n: u32) -> Result<Version, HistoryError> {
        let all = entries(cib).map_err(|e| HistoryError::Unreadable {
            id: SET_ID.into(),
            reason: e.to_string(),
        })?;
        let kept = || {
            let numbers: Vec<String> = all.iter().filter_map(|e| e.number).map(|n| n.to_string()).collect();
            if numbers.is_empty() {
                "none".to_string()
            } else {
                numbers.join(", ")
            }
        };
        let kept = kept();
        match all.into_iter().find(|e| e.number == Some(n)) {
            Some(e) => e.read,
            None => Err(HistoryError::NotKept { version: n, kept }),
        }
    }

    /// The policy of version `v`, read as a policy document (a version written by an older vmha may no
    /// longer read).
    pub fn policy_of(v: &Version) -> Result<Policy, HistoryError> {
        serde_json::from_value(v.policy.clone()).map_err(|e| HistoryError::NotAPolicy {
            version: v.version,
            reason: e.to_string(),
        })
    }

    /// The next version after the entries of `cib` (broken ones count: their number is never reused).
    pub fn next_version(entries: &[Entry]) -> u32 {
        entries.iter().filter_map(|e| e.number).max().unwrap_or(0) + 1
    }

    fn nvpair_xml(v: &Version) -> String {
        let json = serde_json::to_string(v).unwrap_or_default();
        format!(
            r#"<nvpair id="{}" name="{}" value="{}"/>"#,
            nvpair_id(v.version),
            nvpair_name(v.version),
            escape(&xml_safe_json(&json))
        )
    }

    /// The set holding `v` alone (for tests and for a CIB modify of `crm_config`).
    pub fn record_xml(v: &Version) -> String {
        format!(
            r#"<cluster_property_set id="{SET_ID}">{}</cluster_property_set>"#,
            nvpair_xml(v)
        )
    }

    /// `configuration` (a `<configuration>` element, as [`super::plan`] writes it) with `policy` stored and
    /// `v` recorded in its history, the oldest entries beyond [`KEEP`] dropped: what one replace of the
    /// configuration section writes, so the constraints, the stored policy and the history change together
    /// or not at all. Entries that do not read are kept as they are (and count towards [`KEEP`]).
    pub fn record(configuration: &str, policy: &Policy, v: &Version) -> Result<String, HistoryError> {
        let bad = |reason: String| HistoryError::Configuration {
            version: v.version,
            reason,
        };
        let doc = Document::parse(configuration).map_err(|e| bad(e.to_string()))?;
        let root = doc.root_element();
        if !root.has_tag_name("configuration") {
            return Err(bad(format!("<{}> is not <configuration>", root.tag_name().name())));
        }
        if !root.children().any(|c| c.has_tag_name("crm_config")) {
            return Err(bad("it has no <crm_config>".into()));
        }
        let new = nvpair_xml(v);
        if new.len() > MAX_ENTRY {
            return Err(HistoryError::TooLarge {
                id: nvpair_id(v.version),
                bytes: new.len(),
                max: MAX_ENTRY,
            });
        }
        // The kept entries, raw, by number (unnumbered first: they go first when pruning).
        let mut kept: Vec<(Option<u32>, String)> = history_set(&doc)
            .map(|set| {
                set.children()
                    .filter(|n| n.has_tag_name("nvpair"))
                    .filter(|n| read_entry(*n).number != Some(v.version))
                    .map(|n| {
                        let mut s = String::new();
                        write_xml(n, &mut s, &|_| false, &|_| Vec::new());
                        (read_entry(n).number, s)
                    })
                    .collect()
            })
            .unwrap_or_default();
        kept.push((Some(v.version), new));
        kept.sort_by_key(|k| k.0);
        let drop = kept.len().saturating_sub(KEEP);
        let set = format!(
            r#"<cluster_property_set id="{SET_ID}">{}</cluster_property_set>"#,
            kept[drop..].iter().map(|k| k.1.as_str()).collect::<String>()
        );
        let ours = |n: Node| {
            n.has_tag_name("cluster_property_set")
                && n.parent().is_some_and(|p| p.has_tag_name("crm_config"))
                && matches!(n.attribute("id"), Some(id) if id == SET_ID || id == STORE_SET_ID)
        };
        let append = |n: Node| {
            if n.has_tag_name("crm_config") && n.parent() == Some(root) {
                vec![store_xml(policy), set.clone()]
            } else {
                Vec::new()
            }
        };
        let mut out = String::new();
        write_xml(root, &mut out, &ours, &append);
        Ok(out)
    }

    /// A readable unified diff (`diff -u` style) of two policy documents, pretty-printed with sorted
    /// members; empty when they are the same.
    pub fn unified_diff(a: &serde_json::Value, b: &serde_json::Value, a_name: &str, b_name: &str) -> String {
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
        let (x, y) = (pretty(a), pretty(b));
        if x == y {
            return String::new();
        }
        similar::TextDiff::configure()
            .timeout(DIFF_DEADLINE)
            .diff_lines(&x, &y)
            .unified_diff()
            .context_radius(3)
            .header(a_name, b_name)
            .to_string()
    }

    /// RFC 6902-like differences between two policy documents, member by member: `(path, old, new)`;
    /// `path` is a JSON pointer (RFC 6901).
    pub fn differences(
        a: &serde_json::Value,
        b: &serde_json::Value,
    ) -> Vec<(String, Option<serde_json::Value>, Option<serde_json::Value>)> {
        let mut out = Vec::new();
        walk(String::new(), Some(a), Some(b), &mut out);
        out
    }

    fn pointer_segment(key: &str) -> String {
        key.replace('~', "~0").replace('/', "~1")
    }

    type Difference = (String, Option<serde_json::Value>, Option<serde_json::Value>);

    fn walk(path: String, a: Option<&serde_json::Value>, b: Option<&serde_json::Value>, out: &mut Vec<Difference>) {
        use serde_json::Value;
        match (a, b) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    walk(format!("{path}/{}", pointer_segment(k)), x.get(k), y.get(k), out);
                }
            }
            (Some(x), Some(y)) if x == y => {}
            (x, y) => out.push((if path.is_empty() { "/".into() } else { path }, x.cloned(), y.cloned())),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn version(n: u32, policy: serde_json::Value) -> Version {
            Version {
                version: n,
                time: "2026-12-05T23:00:00Z".into(),
                who: "root@node1".into(),
                note: "apply".into(),
                policy,
            }
        }

        fn cib_with(sets: &str) -> String {
            format!("<cib><configuration><crm_config>{sets}</crm_config></configuration></cib>")
        }

        #[test]
        fn versions_round_trip_through_the_cib_with_hostile_text() {
            let v = version(3, serde_json::json!({"zones": {"a\"<&>\u{1}": {"x": 1}}}));
            let xml = record_xml(&v);
            let cib = cib_with(&xml);
            assert_eq!(versions(&cib).unwrap(), vec![v]);
            assert!(versions(&cib_with("")).unwrap().is_empty());
        }

        #[test]
        fn a_broken_entry_is_an_error_naming_it() {
            let cib = cib_with(
                r#"<cluster_property_set id="vmha-history"><nvpair id="vmha-history.v2" name="vmha-policy-v2" value="{"/></cluster_property_set>"#,
            );
            let e = versions(&cib).unwrap_err().to_string();
            assert!(e.contains("vmha-history.v2"), "{e}");
        }

        /// A configuration as `plan` writes it, with `n` versions recorded (1..=n) and `extra` in the set.
        fn configuration_with(n: u32, extra: &str) -> String {
            let set: String = (1..=n)
                .map(|i| {
                    let x = record_xml(&version(i, serde_json::json!({"v": i})));
                    x[x.find("<nvpair").unwrap()..x.find("</cluster").unwrap()].to_string()
                })
                .collect();
            format!(
                r#"<configuration><crm_config><cluster_property_set id="cib-bootstrap-options"><nvpair id="o1" name="stonith-enabled" value="false"/></cluster_property_set><cluster_property_set id="vmha-policy"><nvpair id="vmha-policy.document" name="vmha-policy" value="{{}}"/></cluster_property_set><cluster_property_set id="vmha-history">{set}{extra}</cluster_property_set></crm_config><nodes/><resources/><constraints><rsc_location id="user-pref" rsc="vm1" node="n1" score="5"/></constraints></configuration>"#
            )
        }

        fn in_cib(configuration: &str) -> String {
            format!("<cib>{configuration}<status/></cib>")
        }

        #[test]
        fn recording_stores_the_policy_and_the_version_in_the_same_configuration() {
            let p = crate::policy::tests::policy();
            let c = configuration_with(2, "");
            let v = version(3, serde_json::to_value(&p).unwrap());
            let out = record(&c, &p, &v).unwrap();
            let cib = in_cib(&out);
            // The stored policy is the recorded one, the history has all three, the rest is untouched.
            assert_eq!(Policy::from_cib(&cib).unwrap().unwrap(), p);
            let all = versions(&cib).unwrap();
            assert_eq!(all.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
            assert_eq!(all[2], v);
            assert!(out.contains(r#"<rsc_location id="user-pref" rsc="vm1" node="n1" score="5"/>"#));
            assert!(out.contains(r#"id="cib-bootstrap-options""#));
            assert_eq!(out.matches(r#"id="vmha-history""#).count(), 1);
            assert_eq!(out.matches(r#"id="vmha-policy""#).count(), 1);
            // Without a history yet: the set is created.
            let fresh = c.replace(
                &c[c.find(r#"<cluster_property_set id="vmha-history">"#).unwrap()..c.find("</crm_config>").unwrap()],
                "",
            );
            assert!(!fresh.contains("vmha-history"));
            let out = record(&fresh, &p, &version(1, serde_json::json!({}))).unwrap();
            assert_eq!(versions(&in_cib(&out)).unwrap().len(), 1);
        }

        #[test]
        fn only_the_newest_versions_are_kept() {
            let c = configuration_with(KEEP as u32, "");
            let all = entries(&in_cib(&c)).unwrap();
            assert_eq!(next_version(&all), KEEP as u32 + 1);
            let p = Policy::default();
            let out = record(&c, &p, &version(KEEP as u32 + 1, serde_json::json!({}))).unwrap();
            let kept: Vec<u32> = versions(&in_cib(&out)).unwrap().iter().map(|v| v.version).collect();
            assert_eq!(kept, (2..=KEEP as u32 + 1).collect::<Vec<_>>());
            assert_eq!(next_version(&[]), 1);
        }

        #[test]
        fn broken_entries_are_named_kept_as_they_are_and_never_reused() {
            let broken = r#"<nvpair id="vmha-history.v7" name="vmha-policy-v7" value="{&quot;version&quot;:"/>"#;
            let liar = format!(
                r#"<nvpair id="vmha-history.v8" name="vmha-policy-v8" value="{}"/>"#,
                escape(&serde_json::to_string(&version(3, serde_json::json!({}))).unwrap())
            );
            let huge = format!(
                r#"<nvpair id="vmha-history.v9" name="vmha-policy-v9" value="{}"/>"#,
                "x".repeat(MAX_ENTRY + 1)
            );
            let c = configuration_with(2, &format!("{broken}{liar}{huge}"));
            let cib = in_cib(&c);
            let all = entries(&cib).unwrap();
            assert_eq!(all.len(), 5);
            assert!(all[0].read.is_ok() && all[1].read.is_ok());
            assert!(matches!(&all[2].read, Err(HistoryError::Unreadable { id, .. }) if id == "vmha-history.v7"));
            assert!(matches!(
                &all[3].read,
                Err(HistoryError::Mismatch { inner: 3, outer: 8, .. })
            ));
            assert!(matches!(&all[4].read, Err(HistoryError::TooLarge { bytes, .. }) if *bytes == MAX_ENTRY + 1));
            // Each is an error naming it when asked for; the good ones still read; unknown is its own error.
            let e = find(&cib, 7).unwrap_err().to_string();
            assert!(e.contains("vmha-history.v7"), "{e}");
            assert!(find(&cib, 9).unwrap_err().to_string().contains("refused unread"));
            assert_eq!(find(&cib, 2).unwrap().version, 2);
            let e = find(&cib, 42).unwrap_err();
            assert!(
                matches!(&e, HistoryError::NotKept { version: 42, kept } if kept == "1, 2, 7, 8, 9"),
                "{e}"
            );
            assert!(versions(&cib).is_err());
            // A new record keeps them as they were and takes the number after them.
            assert_eq!(next_version(&all), 10);
            let out = record(&c, &Policy::default(), &version(10, serde_json::json!({}))).unwrap();
            assert!(out.contains(broken), "the broken entry is kept byte for byte");
            assert!(out.contains(&liar));
            assert_eq!(entries(&in_cib(&out)).unwrap().len(), 6);
            assert_eq!(find(&in_cib(&out), 10).unwrap().version, 10);
        }

        #[test]
        fn a_version_that_no_longer_reads_as_a_policy_is_an_error_naming_it() {
            let v = version(4, serde_json::json!({"vms": "not a map"}));
            let e = policy_of(&v).unwrap_err();
            assert!(matches!(e, HistoryError::NotAPolicy { version: 4, .. }), "{e}");
            let ok = version(5, serde_json::to_value(crate::policy::tests::policy()).unwrap());
            assert_eq!(policy_of(&ok).unwrap(), crate::policy::tests::policy());
        }

        #[test]
        fn recording_into_something_else_is_refused() {
            let p = Policy::default();
            let v = version(1, serde_json::json!({}));
            for bad in ["<cib/>", "<configuration><nodes/></configuration>", "<configuration>"] {
                assert!(
                    matches!(record(bad, &p, &v), Err(HistoryError::Configuration { version: 1, .. })),
                    "{bad}"
                );
            }
        }

        #[test]
        fn the_unified_diff_shows_the_changed_lines_with_context() {
            let a = serde_json::json!({"groups": {"web": {"max": 4, "min": 1}}, "home_score": 100});
            let b = serde_json::json!({"groups": {"web": {"max": 8, "min": 1}}, "home_score": 100});
            let d = unified_diff(&a, &b, "version 1", "version 2");
            assert!(d.starts_with("--- version 1\n+++ version 2\n@@ "), "{d}");
            assert!(d.contains("\n-      \"max\": 4,\n+      \"max\": 8,\n"), "{d}");
            assert!(d.contains("\n       \"min\": 1\n"), "context kept: {d}");
            assert_eq!(unified_diff(&a, &a, "x", "y"), "");
        }

        #[test]
        fn differences_name_each_changed_member_by_its_pointer() {
            let a = serde_json::json!({"groups": {"web": {"max": 4, "min": 1}}, "home_score": 100, "x/y": 1});
            let b = serde_json::json!({"groups": {"web": {"max": 8, "min": 1}}, "zones": {"a": {}}, "x/y": 2});
            let d = differences(&a, &b);
            let paths: Vec<&str> = d.iter().map(|(p, _, _)| p.as_str()).collect();
            assert_eq!(paths, ["/groups/web/max", "/home_score", "/x~1y", "/zones"]);
            assert_eq!(d[0].1, Some(serde_json::json!(4)));
            assert_eq!(d[0].2, Some(serde_json::json!(8)));
            assert_eq!(d[1].2, None);
            assert_eq!(d[3].1, None);
            assert!(differences(&a, &a).is_empty());
        }
    }
}
