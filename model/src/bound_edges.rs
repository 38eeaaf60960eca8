//! When a time bound's window is about to start (issue 19): the members it will stop and when to ask
//! their guests to drain. Pure logic over an injected clock; the DC's vmhad acts on it
//! (`vmha_ops::bounds`).
//!
//! A time bound (`{"max": 8, "from": "20:00", "to": "06:00"}`) compiles into a `target-role=Stopped`
//! date rule on each member beyond `max` (the newest, [`crate::arbitration::time_bound_meta`]): Pacemaker
//! stops them at `from`:00 by the DC's clock, as `date_spec` reads it (local time). A `lead` before that
//! edge the members are asked to drain, once per window. Times here are local seconds since the epoch
//! ([`LocalTime::local`]: the Unix time plus the local offset from UTC), so that a day is 86400 of them
//! and `from`:00 is a multiple of 3600.

use std::collections::BTreeMap;

use crate::arbitration::TimeBound;

const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;

/// A reading of the DC's wall clock: the Unix time and the local offset from UTC then (what Pacemaker's
/// `date_spec` hours compare against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub unix: i64,
    /// Seconds east of UTC.
    pub offset: i32,
}

impl LocalTime {
    /// Local seconds since the epoch.
    pub fn local(&self) -> i64 {
        self.unix.saturating_add(i64::from(self.offset))
    }

    /// `HH:MM:SS` of the local time (logs).
    pub fn clock(local: i64) -> String {
        let s = local.rem_euclid(DAY);
        format!("{:02}:{:02}:{:02}", s / HOUR, (s % HOUR) / 60, s % 60)
    }
}

/// A time bound's window `HH:00-HH:00`, as its drain requests and records name it.
pub fn window_name(bound: &TimeBound) -> String {
    format!("{:02}:00-{:02}:00", bound.from_hour, bound.to_hour)
}

/// The key of a bound in the record of windows drained: group, from and to.
pub fn bound_key(bound: &TimeBound) -> String {
    format!("{}/{}-{}", bound.group, bound.from_hour, bound.to_hour)
}

/// The members the bound stops while its window lasts (members oldest first: those beyond `max`),
/// newest first. Empty when the group has no more than `max`, or the bound's hours are not valid.
pub fn stopped_by(bound: &TimeBound, members: &[String]) -> Vec<String> {
    if !valid(bound) {
        return Vec::new();
    }
    members.iter().skip(bound.max as usize).rev().cloned().collect()
}

fn valid(bound: &TimeBound) -> bool {
    bound.from_hour <= 23 && bound.to_hour <= 23 && bound.from_hour != bound.to_hour
}

/// Every time bound of `policy`'s groups with the group's members (oldest first); bounds whose hours do
/// not read are left out (the policy's own check refuses them).
pub fn bounds_of(policy: &crate::policy::Policy) -> Vec<(TimeBound, Vec<String>)> {
    let mut out = Vec::new();
    for (name, g) in &policy.groups {
        for b in &g.time_bounds {
            let Ok((from_hour, to_hour)) = b.hours(name) else {
                continue;
            };
            let bound = TimeBound {
                group: name.clone(),
                max: b.max,
                from_hour,
                to_hour,
            };
            out.push((bound, g.members.clone()));
        }
    }
    out
}

/// The data of the guest API `drain` request a member gets before the edge: its group, the group's size
/// while the window lasts, and the window.
pub fn drain_data(edge: &Edge, members: usize) -> String {
    serde_json::json!({
        "group": edge.bound.group,
        "size": members.min(edge.bound.max as usize),
        "time_bound": window_name(&edge.bound),
    })
    .to_string()
}

/// The first start of the bound's window strictly after `local` (local seconds).
pub fn next_start(bound: &TimeBound, local: i64) -> i64 {
    let start = local.div_euclid(DAY) * DAY + i64::from(bound.from_hour) * HOUR;
    if start > local {
        start
    } else {
        start + DAY
    }
}

/// One window edge: a bound's window start, with the members it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub bound: TimeBound,
    /// When the window starts, in local seconds (also the window's identity in the record).
    pub start: i64,
    /// The members Pacemaker stops then, newest first.
    pub stops: Vec<String>,
}

/// What one look at the clock finds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Look {
    /// Windows starting within the lead whose members were not asked yet: ask them now.
    pub due: Vec<Edge>,
    /// Windows that started since the last look without their members asked (the clock jumped forward
    /// over the lead, or no look fell inside it): only to be logged, Pacemaker stops them already.
    pub missed: Vec<Edge>,
    /// Seconds from now until the next lead starts (of any valid bound), `None` without bounds.
    pub next_in: Option<i64>,
}

/// Looks at the clock: `bounds` (each with its group's members, oldest first), `drained` the latest
/// window start drained of each bound ([`bound_key`]), `last` the local time of the previous look (`None`
/// at the first), `now` the local time, `lead` how long before a window's start its members are asked.
///
/// A window is due when `start - lead <= now < start` (never with a lead of 0), it stops at least one
/// member and no window of
/// that bound at or after `start` was drained (so a window is drained once, also when the clock steps
/// back into its lead after the drain). A bound whose hours are not valid is ignored.
pub fn look(
    bounds: &[(TimeBound, Vec<String>)],
    drained: &BTreeMap<String, i64>,
    last: Option<i64>,
    now: i64,
    lead: u32,
) -> Look {
    let lead = i64::from(lead).min(DAY - 1);
    let mut out = Look::default();
    for (bound, members) in bounds {
        if !valid(bound) {
            continue;
        }
        let start = next_start(bound, now);
        let lead_at = start - lead;
        let ahead = if lead_at > now {
            lead_at - now
        } else {
            lead_at + DAY - now
        };
        out.next_in = Some(out.next_in.map_or(ahead, |n| n.min(ahead)));
        let stops = stopped_by(bound, members);
        if stops.is_empty() {
            continue;
        }
        let done_up_to = drained.get(&bound_key(bound)).copied();
        let edge = |start: i64| Edge {
            bound: bound.clone(),
            start,
            stops: stops.clone(),
        };
        if lead_at <= now && done_up_to.is_none_or(|d| d < start) {
            out.due.push(edge(start));
        }
        // The window that started last (at or before now): missed when the previous look was before its
        // lead and it was not drained.
        let started = start - DAY;
        if let Some(last) = last {
            if last < started - lead && started <= now && done_up_to.is_none_or(|d| d < started) {
                out.missed.push(edge(started));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn night(max: u32) -> TimeBound {
        TimeBound {
            group: "batch".into(),
            max,
            from_hour: 20,
            to_hour: 6,
        }
    }

    fn members(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("b{i}")).collect()
    }

    /// Local seconds of day `day` at `h:m:s`.
    fn at(day: i64, h: i64, m: i64, s: i64) -> i64 {
        day * DAY + h * HOUR + m * 60 + s
    }

    const D: i64 = 20_000;

    #[test]
    fn the_local_clock_is_unix_time_plus_the_offset() {
        let t = LocalTime {
            unix: at(D, 19, 0, 0),
            offset: 3600,
        };
        assert_eq!(t.local(), at(D, 20, 0, 0));
        assert_eq!(LocalTime::clock(t.local() - 30), "19:59:30");
        assert_eq!(LocalTime::clock(-1), "23:59:59", "before the epoch");
        let far = LocalTime {
            unix: i64::MAX,
            offset: 3600,
        };
        assert_eq!(far.local(), i64::MAX, "no overflow");
    }

    #[test]
    fn the_newest_beyond_max_are_stopped_the_same_members_the_rule_stops() {
        let m = members(10);
        assert_eq!(stopped_by(&night(8), &m), ["b10", "b9"]);
        let rule = crate::arbitration::time_bound_meta(&night(8), &m).unwrap();
        let mut stops = stopped_by(&night(8), &m);
        stops.sort();
        assert_eq!(rule.keys().cloned().collect::<Vec<_>>(), stops);
        assert!(stopped_by(&night(10), &m).is_empty());
        assert!(
            stopped_by(&night(0), &[]).is_empty(),
            "a bound of a group without members"
        );
        let bad = TimeBound {
            from_hour: 5,
            to_hour: 5,
            ..night(0)
        };
        assert!(stopped_by(&bad, &m).is_empty());
    }

    #[test]
    fn next_start_is_strictly_after_now_and_wraps_midnight() {
        let b = night(1);
        assert_eq!(next_start(&b, at(D, 12, 0, 0)), at(D, 20, 0, 0));
        assert_eq!(next_start(&b, at(D, 19, 59, 59)), at(D, 20, 0, 0));
        assert_eq!(
            next_start(&b, at(D, 20, 0, 0)),
            at(D + 1, 20, 0, 0),
            "started: the next one"
        );
        assert_eq!(next_start(&b, at(D, 23, 30, 0)), at(D + 1, 20, 0, 0));
        let midnight = TimeBound {
            from_hour: 0,
            to_hour: 6,
            ..b
        };
        assert_eq!(next_start(&midnight, at(D, 23, 59, 30)), at(D + 1, 0, 0, 0));
        assert_eq!(next_start(&midnight, at(D, 0, 0, 0)), at(D + 1, 0, 0, 0));
        assert_eq!(next_start(&midnight, -10), 0, "before the epoch");
    }

    #[test]
    fn a_window_is_due_within_its_lead_once_at_several_clock_times() {
        let bounds = [(night(8), members(10))];
        let none = BTreeMap::new();
        let lead = 60;
        // Noon: nothing due; the next lead starts at 19:59:00.
        let l = look(&bounds, &none, None, at(D, 12, 0, 0), lead);
        assert!(l.due.is_empty() && l.missed.is_empty());
        assert_eq!(l.next_in, Some(at(D, 19, 59, 0) - at(D, 12, 0, 0)));
        // 19:58:59: one second before the lead.
        let l = look(&bounds, &none, None, at(D, 19, 58, 59), lead);
        assert!(l.due.is_empty());
        assert_eq!(l.next_in, Some(1));
        // 19:59:00 and 19:59:59: due, the window of day D, stopping b10 and b9.
        for now in [at(D, 19, 59, 0), at(D, 19, 59, 59)] {
            let l = look(&bounds, &none, None, now, lead);
            assert_eq!(l.due.len(), 1, "{}", LocalTime::clock(now));
            assert_eq!(l.due[0].start, at(D, 20, 0, 0));
            assert_eq!(l.due[0].stops, ["b10", "b9"]);
            assert_eq!(l.next_in, Some(at(D + 1, 19, 59, 0) - now), "tomorrow's lead");
        }
        // Drained: not due again within the same lead.
        let drained: BTreeMap<String, i64> = [(bound_key(&night(8)), at(D, 20, 0, 0))].into();
        assert!(look(&bounds, &drained, Some(at(D, 19, 59, 0)), at(D, 19, 59, 30), lead)
            .due
            .is_empty());
        // 20:00:00 and 03:00 (after midnight, inside the window): the window started, nothing due.
        for now in [at(D, 20, 0, 0), at(D + 1, 3, 0, 0)] {
            assert!(look(&bounds, &drained, Some(now - 30), now, lead).due.is_empty());
        }
        // The next day's lead: due again (a new window), although day D's was drained.
        let l = look(
            &bounds,
            &drained,
            Some(at(D + 1, 19, 58, 0)),
            at(D + 1, 19, 59, 10),
            lead,
        );
        assert_eq!(l.due.iter().map(|e| e.start).collect::<Vec<_>>(), [at(D + 1, 20, 0, 0)]);
    }

    #[test]
    fn a_window_starting_at_midnight_is_due_the_evening_before() {
        let b = TimeBound {
            group: "batch".into(),
            max: 1,
            from_hour: 0,
            to_hour: 6,
        };
        let bounds = [(b, members(2))];
        let l = look(&bounds, &BTreeMap::new(), None, at(D, 23, 59, 30), 60);
        assert_eq!(l.due.len(), 1);
        assert_eq!(l.due[0].start, at(D + 1, 0, 0, 0));
        assert_eq!(l.due[0].stops, ["b2"]);
        // A lead longer than the time to midnight from before it: due from 23:00 with an hour's lead.
        let l = look(&bounds, &BTreeMap::new(), None, at(D, 23, 0, 0), 3600);
        assert_eq!(l.due.len(), 1);
        assert!(look(&bounds, &BTreeMap::new(), None, at(D, 22, 59, 59), 3600)
            .due
            .is_empty());
    }

    #[test]
    fn clock_jumps_neither_repeat_a_drain_nor_hide_a_missed_one() {
        let bounds = [(night(8), members(10))];
        let start = at(D, 20, 0, 0);
        let drained: BTreeMap<String, i64> = [(bound_key(&night(8)), start)].into();
        // Back into the lead after the drain (the clock stepped back 30 s at 19:59:50): not again.
        assert!(look(&bounds, &drained, Some(at(D, 19, 59, 50)), at(D, 19, 59, 20), 60)
            .due
            .is_empty());
        // Back a whole day after the drain (into the lead of the window of day D-1, older than the one
        // drained): not again.
        assert!(
            look(&bounds, &drained, Some(at(D, 19, 59, 50)), at(D - 1, 19, 59, 50), 60)
                .due
                .is_empty()
        );
        // Forward over the lead (19:58 to 20:05): nothing due, the window is reported missed, once.
        let none = BTreeMap::new();
        let l = look(&bounds, &none, Some(at(D, 19, 58, 0)), at(D, 20, 5, 0), 60);
        assert!(l.due.is_empty());
        assert_eq!(l.missed.iter().map(|e| e.start).collect::<Vec<_>>(), [start]);
        assert!(look(&bounds, &none, Some(at(D, 20, 5, 0)), at(D, 20, 6, 0), 60)
            .missed
            .is_empty());
        // A look inside the lead was not a miss (the drain was due then), nor is a drained window.
        assert!(look(&bounds, &none, Some(at(D, 19, 59, 30)), at(D, 20, 0, 30), 60)
            .missed
            .is_empty());
        assert!(look(&bounds, &drained, Some(at(D, 19, 0, 0)), at(D, 20, 1, 0), 60)
            .missed
            .is_empty());
    }

    #[test]
    fn a_policys_bounds_come_with_their_members_and_the_drain_names_the_window() {
        let p = crate::policy::Policy::from_json(
            r#"{"groups": {"batch": {"members": ["b1", "b2", "b3"], "template": "b1", "min": 1, "max": 8,
                "time_bounds": [{"max": 1, "from": "20:00", "to": "06:00"}, {"max": 2, "from": "06:00", "to": "08:00"}]},
                "web": {"members": ["w1"], "template": "w1", "min": 1, "max": 2}}}"#,
        )
        .unwrap();
        let bounds = bounds_of(&p);
        assert_eq!(bounds.len(), 2, "web has no bound");
        assert_eq!(bounds[0].0, night(1));
        assert_eq!(bounds[0].1, ["b1", "b2", "b3"]);
        let l = look(&bounds, &BTreeMap::new(), None, at(D, 19, 59, 30), 60);
        assert_eq!(l.due.len(), 1);
        assert_eq!(l.due[0].stops, ["b3", "b2"]);
        let data: serde_json::Value = serde_json::from_str(&drain_data(&l.due[0], 3)).unwrap();
        assert_eq!(
            data,
            serde_json::json!({"group": "batch", "size": 1, "time_bound": "20:00-06:00"})
        );
    }

    #[test]
    fn bounds_that_stop_nobody_or_are_broken_ask_nobody() {
        let broken = TimeBound {
            from_hour: 24,
            ..night(0)
        };
        let bounds = [
            (night(8), members(3)),
            (
                TimeBound {
                    group: "empty".into(),
                    ..night(0)
                },
                Vec::new(),
            ),
            (broken, members(3)),
        ];
        let l = look(&bounds, &BTreeMap::new(), Some(at(D, 19, 0, 0)), at(D, 19, 59, 30), 60);
        assert!(l.due.is_empty() && l.missed.is_empty(), "{l:?}");
        assert_eq!(l.next_in, Some(at(D + 1, 19, 59, 0) - at(D, 19, 59, 30)));
        assert_eq!(look(&[], &BTreeMap::new(), None, 0, 60), Look::default());
        // A lead of a day or more is cut to a day less a second: never due for two windows at once.
        let l = look(
            &[(night(8), members(10))],
            &BTreeMap::new(),
            None,
            at(D, 20, 0, 1),
            u32::MAX,
        );
        assert_eq!(l.due.iter().map(|e| e.start).collect::<Vec<_>>(), [at(D + 1, 20, 0, 0)]);
        assert_eq!(window_name(&night(8)), "20:00-06:00");
        // A lead of 0: never due (the drains are off), the window's start included.
        for now in [at(D, 19, 59, 59), at(D, 20, 0, 0)] {
            assert!(look(&[(night(8), members(10))], &BTreeMap::new(), None, now, 0)
                .due
                .is_empty());
        }
    }
}
