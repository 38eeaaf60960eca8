//! Arbitration between elastic groups (issue 19): priority between groups and entitlement (a group's
//! guaranteed minimum, its `min`). Pure model logic: `vmha policy apply` compiles [`member_priorities`]
//! and [`time_bound_meta`] from the policy's groups ([`crate::group::member_priorities`],
//! [`crate::group::time_bound_sets`]), and `vmha group scale` plans a growth with [`arbitrate`]
//! (`vmha_ops::group::check`).
//!
//! A group that must grow takes free room first. Only when there is not enough does it take members of
//! groups of strictly lower priority, the lowest priority first and the newest member first, and never:
//! - below that group's minimum (its entitlement; members mid-transaction count as present), nor
//! - a member mid-transaction (a clone being made, a drain under way): it is skipped, and an older member
//!   above the minimum goes instead.
//!
//! Every member takes one slot (the groups' members are clones of one template each). Members a group
//! gives up are to be drained through the guest API before they are destroyed, as `vmha group scale`
//! shrinks a group.
//!
//! The same rule, expressed for Pacemaker's scheduler ([`member_priorities`]): a member within its
//! group's entitlement (the oldest `min`, and any mid-transaction) gets the priority [`ENTITLED`] plus its
//! group's; a member beyond it its group's priority alone. The scheduler places higher priorities first,
//! so a growing group's new members displace a lower group's excess members and never its entitled ones
//! (`model/tests/scheduler_tables.rs`, "preemption").

use std::collections::{BTreeMap, BTreeSet};

/// Priority added to a member within its group's entitlement: above every group's own priority.
pub const ENTITLED: i32 = 100_000;

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub vm: String,
    /// A clone being made or a drain under way: never taken, always counted.
    pub busy: bool,
}

/// A group as arbitration sees it: members oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub name: String,
    /// Higher wins. Must be below [`ENTITLED`].
    pub priority: i32,
    /// The entitlement: fewest members the group is left with by others.
    pub min: u32,
    pub members: Vec<Member>,
}

/// What a group's growth takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Arbitration {
    /// Slots taken from free room.
    pub from_free: u32,
    /// Members to drain and remove, in order: (group, VM).
    pub preempt: Vec<(String, String)>,
    /// New members that get a slot (`from_free` + `preempt.len()`).
    pub granted: u32,
    /// New members that get none.
    pub short: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArbitrationError {
    #[error("group {0}: not among the groups arbitrated")]
    UnknownGroup(String),
    #[error("group {group}: priority {priority} is not below {ENTITLED}")]
    PriorityTooHigh { group: String, priority: i32 },
    #[error("group {group}: VM {vm} is a member twice (or of two groups)")]
    DuplicateMember { group: String, vm: String },
}

fn check(groups: &[GroupState]) -> Result<(), ArbitrationError> {
    let mut seen = BTreeSet::new();
    for g in groups {
        if g.priority >= ENTITLED || g.priority <= -ENTITLED {
            return Err(ArbitrationError::PriorityTooHigh {
                group: g.name.clone(),
                priority: g.priority,
            });
        }
        for m in &g.members {
            if !seen.insert(m.vm.as_str()) {
                return Err(ArbitrationError::DuplicateMember {
                    group: g.name.clone(),
                    vm: m.vm.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The members `g` may give up to a higher-priority group, in the order it gives them: newest first,
/// never a busy one, never below its minimum.
fn preemptible(g: &GroupState) -> Vec<&Member> {
    let spare = (g.members.len() as u32).saturating_sub(g.min) as usize;
    g.members.iter().rev().filter(|m| !m.busy).take(spare).collect()
}

/// Group `grower` wants `want` more members and `free` slots are free: what it gets, and whom it takes.
pub fn arbitrate(groups: &[GroupState], grower: &str, want: u32, free: u32) -> Result<Arbitration, ArbitrationError> {
    check(groups)?;
    let g = groups
        .iter()
        .find(|g| g.name == grower)
        .ok_or_else(|| ArbitrationError::UnknownGroup(grower.to_string()))?;
    let from_free = want.min(free);
    let mut need = want - from_free;
    let mut lower: Vec<&GroupState> = groups.iter().filter(|o| o.priority < g.priority).collect();
    // Lowest priority first; among equals, by name (deterministic).
    lower.sort_by(|a, b| a.priority.cmp(&b.priority).then_with(|| a.name.cmp(&b.name)));
    let mut preempt = Vec::new();
    for o in lower {
        for m in preemptible(o) {
            if need == 0 {
                break;
            }
            preempt.push((o.name.clone(), m.vm.clone()));
            need -= 1;
        }
    }
    Ok(Arbitration {
        from_free,
        granted: from_free + preempt.len() as u32,
        short: need,
        preempt,
    })
}

/// The next member a growth takes from a lower-priority group while it runs, after the members `taken`
/// were drained and removed and those in `refused` refused to drain: [`arbitrate`] over `groups` as they
/// were when the growth was planned, without the members taken (gone) and with the refusing ones busy (a
/// refusing member stays in its group, counts towards its `min`, and is not asked again). `need` is how
/// many members the growth takes from lower-priority groups in all. `None` when it has taken `need`
/// already or no candidate is left. Without refusals the members come in [`arbitrate`]'s order.
pub fn next_preempt(
    groups: &[GroupState],
    grower: &str,
    need: u32,
    taken: &[(String, String)],
    refused: &BTreeSet<String>,
) -> Result<Option<(String, String)>, ArbitrationError> {
    let left = need.saturating_sub(u32::try_from(taken.len()).unwrap_or(u32::MAX));
    if left == 0 {
        return Ok(None);
    }
    let now: Vec<GroupState> = groups
        .iter()
        .map(|g| GroupState {
            members: g
                .members
                .iter()
                .filter(|m| !taken.iter().any(|(_, vm)| *vm == m.vm))
                .map(|m| Member {
                    vm: m.vm.clone(),
                    busy: m.busy || refused.contains(&m.vm),
                })
                .collect(),
            ..g.clone()
        })
        .collect();
    Ok(arbitrate(&now, grower, left, 0)?.preempt.into_iter().next())
}

/// The Pacemaker `priority` of every member: [`ENTITLED`] plus the group's priority within the
/// entitlement (the oldest `min` members and every busy one), the group's priority beyond it.
pub fn member_priorities(groups: &[GroupState]) -> Result<BTreeMap<String, i32>, ArbitrationError> {
    check(groups)?;
    let mut out = BTreeMap::new();
    for g in groups {
        let excess: BTreeSet<&str> = preemptible(g).into_iter().map(|m| m.vm.as_str()).collect();
        for m in &g.members {
            let p = if excess.contains(m.vm.as_str()) {
                g.priority
            } else {
                ENTITLED + g.priority
            };
            out.insert(m.vm.clone(), p);
        }
    }
    Ok(out)
}

/// A time-of-day bound on a group: at most `max` members from `from_hour`:00 to `to_hour`:00 (local time of
/// the DC; the window may wrap midnight, e.g. 20 to 6), compiled into Pacemaker date rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeBound {
    pub group: String,
    pub max: u32,
    pub from_hour: u8,
    pub to_hour: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeBoundError {
    #[error("group {group}: time bound hours {from}-{to}: each must be 0-23 and they must differ")]
    Hours { group: String, from: u8, to: u8 },
}

/// The `date_spec` hour ranges of the window `[from, to)`.
fn hour_ranges(from: u8, to: u8) -> Vec<String> {
    let range = |a: u8, b: u8| if a == b { a.to_string() } else { format!("{a}-{b}") };
    if from < to {
        vec![range(from, to - 1)]
    } else if to == 0 {
        vec![range(from, 23)]
    } else {
        vec![range(from, 23), range(0, to - 1)]
    }
}

/// For each member beyond the bound's `max` (members oldest first: the newest go), the meta attribute set
/// (for its `<primitive>`) that stops it while the window lasts: `target-role=Stopped` under a rule of
/// `date_spec` hours, scored above the policy's own meta set so it wins while the rule holds; outside the
/// window the set does not apply and the member runs. Ids start with `vmha-policy-`.
pub fn time_bound_meta(bound: &TimeBound, members: &[String]) -> Result<BTreeMap<String, String>, TimeBoundError> {
    let (from, to) = (bound.from_hour, bound.to_hour);
    if from > 23 || to > 23 || from == to {
        return Err(TimeBoundError::Hours {
            group: bound.group.clone(),
            from,
            to,
        });
    }
    let mut out = BTreeMap::new();
    for vm in members.iter().skip(bound.max as usize) {
        let id = format!("vmha-policy-bound-{}-{from}-{to}", crate::policy::id_part(vm));
        let dates: String = hour_ranges(from, to)
            .iter()
            .enumerate()
            .map(|(i, h)| {
                format!(
                    r#"<date_expression id="{id}-d{i}" operation="date_spec"><date_spec id="{id}-d{i}-s" hours="{h}"/></date_expression>"#
                )
            })
            .collect();
        out.insert(
            vm.clone(),
            format!(
                r#"<meta_attributes id="{id}" score="2000"><rule id="{id}-rule" boolean-op="or" score="INFINITY">{dates}</rule><nvpair id="{id}-role" name="target-role" value="Stopped"/></meta_attributes>"#
            ),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, priority: i32, min: u32, members: &[&str], busy: &[&str]) -> GroupState {
        GroupState {
            name: name.into(),
            priority,
            min,
            members: members
                .iter()
                .map(|m| Member {
                    vm: m.to_string(),
                    busy: busy.contains(m),
                })
                .collect(),
        }
    }

    fn taken(a: &Arbitration) -> Vec<&str> {
        a.preempt.iter().map(|(_, vm)| vm.as_str()).collect()
    }

    #[test]
    fn free_room_first_then_a_lower_group_down_to_its_min_and_no_further() {
        let groups = [
            group("web", 50, 1, &["w1"], &[]),
            group("batch", 1, 2, &["b1", "b2", "b3", "b4", "b5"], &[]),
        ];
        // Enough free room: nobody is displaced.
        let a = arbitrate(&groups, "web", 3, 5).unwrap();
        assert_eq!((a.from_free, a.granted, a.short), (3, 3, 0));
        assert!(a.preempt.is_empty());
        // One free slot, then batch's newest, down to its min of 2 and no further.
        let a = arbitrate(&groups, "web", 5, 1).unwrap();
        assert_eq!(a.from_free, 1);
        assert_eq!(taken(&a), ["b5", "b4", "b3"]);
        assert_eq!((a.granted, a.short), (4, 1));
    }

    #[test]
    fn a_member_mid_transaction_is_never_taken_but_counts() {
        let groups = [
            group("web", 50, 1, &["w1"], &[]),
            group("batch", 1, 2, &["b1", "b2", "b3", "b4", "b5"], &["b5", "b3"]),
        ];
        // b5 and b3 busy: 5 members over a min of 2 leave 3 to give, the newest not busy (b4, b2, b1);
        // b3 and b5 stay and make up the min.
        let a = arbitrate(&groups, "web", 10, 0).unwrap();
        assert_eq!(taken(&a), ["b4", "b2", "b1"]);
        assert_eq!((a.granted, a.short), (3, 7));
        // With min 4 only one may go, and not a busy one.
        let groups = [
            group("web", 50, 1, &["w1"], &[]),
            group("batch", 1, 4, &["b1", "b2", "b3", "b4", "b5"], &["b5"]),
        ];
        assert_eq!(taken(&arbitrate(&groups, "web", 10, 0).unwrap()), ["b4"]);
    }

    #[test]
    fn only_strictly_lower_groups_give_way_lowest_first() {
        let groups = [
            group("web", 50, 1, &["w1"], &[]),
            group("peer", 50, 0, &["p1", "p2"], &[]),
            group("mid", 10, 1, &["m1", "m2"], &[]),
            group("low", 1, 1, &["l1", "l2"], &[]),
        ];
        let a = arbitrate(&groups, "web", 3, 0).unwrap();
        assert_eq!(taken(&a), ["l2", "m2"], "low before mid, never peer (equal priority)");
        assert_eq!(a.short, 1);
        // The lowest group grows: nobody gives way.
        let a = arbitrate(&groups, "low", 2, 1).unwrap();
        assert!(a.preempt.is_empty());
        assert_eq!((a.granted, a.short), (1, 1));
    }

    #[test]
    fn hostile_inputs_are_refused_by_name() {
        let g = [group("web", 50, 1, &["w1"], &[])];
        assert_eq!(
            arbitrate(&g, "nope", 1, 1).unwrap_err(),
            ArbitrationError::UnknownGroup("nope".into())
        );
        let g = [group("web", ENTITLED, 1, &["w1"], &[])];
        assert!(matches!(
            arbitrate(&g, "web", 1, 1),
            Err(ArbitrationError::PriorityTooHigh { .. })
        ));
        let g = [group("a", 1, 0, &["x"], &[]), group("b", 2, 0, &["x"], &[])];
        assert!(matches!(
            member_priorities(&g),
            Err(ArbitrationError::DuplicateMember { vm, .. }) if vm == "x"
        ));
        // A min above the size: nothing to give, no overflow.
        let g = [group("web", 50, 1, &[], &[]), group("low", 1, 9, &["l1"], &[])];
        assert_eq!(arbitrate(&g, "web", u32::MAX, u32::MAX).unwrap().granted, u32::MAX);
        assert!(arbitrate(&g, "web", 3, 0).unwrap().preempt.is_empty());
    }

    /// Runs a growth's preemptions with `refuses` refusing to drain: (taken, refused).
    fn run_preemptions(groups: &[GroupState], need: u32, refuses: &[&str]) -> (Vec<String>, Vec<String>) {
        let (mut taken, mut refused) = (Vec::new(), BTreeSet::new());
        while let Some((g, vm)) = next_preempt(groups, "web", need, &taken, &refused).unwrap() {
            assert!(
                !taken.iter().any(|(_, t)| *t == vm) && !refused.contains(&vm),
                "{vm} asked twice"
            );
            if refuses.contains(&vm.as_str()) {
                refused.insert(vm);
            } else {
                taken.push((g, vm));
            }
        }
        (
            taken.into_iter().map(|(_, vm)| vm).collect(),
            refused.into_iter().collect(),
        )
    }

    #[test]
    fn a_refused_drain_takes_the_next_member_in_arbitrations_order_never_below_min() {
        let groups = [
            group("web", 50, 1, &["w1"], &[]),
            group("mid", 10, 1, &["m1", "m2"], &[]),
            group("low", 1, 2, &["l1", "l2", "l3", "l4"], &["l3"]),
        ];
        // Without refusals: arbitrate's own order (low's newest not busy first, then mid).
        let planned = taken(&arbitrate(&groups, "web", 3, 0).unwrap()).join(" ");
        assert_eq!(planned, "l4 l2 m2");
        assert_eq!(run_preemptions(&groups, 3, &[]).0.join(" "), planned);
        // l4 refuses: it stays and counts, so l2 and l1 may go (l3, l4 keep low at its min of 2).
        let (t, r) = run_preemptions(&groups, 2, &["l4"]);
        assert_eq!((t.join(" "), r.join(" ")), ("l2 l1".into(), "l4".into()));
        // l2 refuses after l4 went: l1 goes instead; low keeps l2, l3 (its min).
        assert_eq!(run_preemptions(&groups, 2, &["l2"]).0, ["l4", "l1"]);
        // Every member of low refuses: mid's next; all refuse: nothing is taken, each asked once.
        assert_eq!(run_preemptions(&groups, 1, &["l4", "l2", "l1"]).0, ["m2"]);
        let (t, r) = run_preemptions(&groups, 2, &["l4", "l2", "l1", "m2", "m1"]);
        assert!(t.is_empty(), "{t:?}");
        assert_eq!(r, ["l1", "l2", "l4", "m1", "m2"]);
        // Never the busy one (l3), never below min after what was taken: with 2 taken from low, no more.
        let (t, _) = run_preemptions(&groups, 5, &["m2", "m1"]);
        assert_eq!(t, ["l4", "l2"]);
        // Taken enough: nothing more; an unknown grower is refused by name.
        let done = [("low".to_string(), "l4".to_string())];
        assert_eq!(next_preempt(&groups, "web", 1, &done, &BTreeSet::new()).unwrap(), None);
        assert_eq!(
            next_preempt(&groups, "nope", 1, &[], &BTreeSet::new()).unwrap_err(),
            ArbitrationError::UnknownGroup("nope".into())
        );
    }

    #[test]
    fn member_priorities_protect_the_entitlement_and_busy_members() {
        let g = [
            group("web", 50, 1, &["w1", "w2"], &[]),
            group("batch", 1, 2, &["b1", "b2", "b3", "b4"], &["b4"]),
        ];
        let p = member_priorities(&g).unwrap();
        assert_eq!(p["w1"], ENTITLED + 50);
        assert_eq!(p["w2"], 50);
        assert_eq!(p["b1"], ENTITLED + 1);
        assert_eq!(p["b2"], 1, "the spare ones are the newest not busy: b3 and b2");
        assert_eq!(p["b3"], 1);
        assert_eq!(p["b4"], ENTITLED + 1, "busy");
    }

    #[test]
    fn time_bounds_stop_the_newest_beyond_max_inside_the_window_only() {
        let members: Vec<String> = (1..=10).map(|i| format!("b{i}")).collect();
        let night = TimeBound {
            group: "batch".into(),
            max: 8,
            from_hour: 20,
            to_hour: 6,
        };
        let m = time_bound_meta(&night, &members).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["b10", "b9"]);
        assert!(
            m["b9"].contains(r#"hours="20-23""#) && m["b9"].contains(r#"hours="0-5""#),
            "{}",
            m["b9"]
        );
        assert!(m["b9"].contains(r#"name="target-role" value="Stopped""#));
        assert_eq!(hour_ranges(8, 18), ["8-17"]);
        assert_eq!(hour_ranges(20, 0), ["20-23"]);
        assert_eq!(hour_ranges(23, 1), ["23", "0"]);
        for (from, to) in [(24, 1), (1, 24), (5, 5)] {
            let b = TimeBound {
                from_hour: from,
                to_hour: to,
                ..night.clone()
            };
            assert!(time_bound_meta(&b, &members).is_err(), "{from}-{to}");
        }
        let few = TimeBound { max: 20, ..night };
        assert!(time_bound_meta(&few, &members).unwrap().is_empty());
    }
}
