//! Time bounds drained before they stop members (issue 19): the DC's vmhad asks the guests of the
//! members a time bound will stop to drain, a lead before the window starts, once per window.
//!
//! A time bound's compiled `target-role=Stopped` date rule stops the members beyond its `max` at the
//! window's start (Pacemaker's `date_spec`, the DC's clock). Before that edge ([`look`]): the guest API
//! `drain` request (data `{"group", "size", "time_bound": "20:00-06:00"}`) to each of them, all at once,
//! each bounded by the drain timeout and all by the window's start. The answers are logged (a refusal
//! as a warning naming the member) and recorded in a node attribute of the DC's host
//! (`vmha-bound-drain-<group>-<from>-<to>`: the window and each member's answer), which also says that
//! the window was drained: a restarted vmhad or the next DC does not ask again. A refusal changes
//! nothing: Pacemaker still stops the member at the window's start.
//!
//! Which members, and when, is pure logic over an injected clock ([`vmha_model::bound_edges`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmha_model::bound_edges::{self, Edge, LocalTime};
use vmha_model::policy::Policy;

use crate::error::OpError;
use crate::ports::Ports;

/// Prefix of the node attributes recording the windows drained.
pub const RECORD_PREFIX: &str = "vmha-bound-drain-";
/// The default lead: how long before a window's start its members are asked to drain.
pub const DEFAULT_LEAD: Duration = Duration::from_secs(60);
/// The longest the follower sleeps between two looks at the clock (a wall-clock step is seen within it).
const LOOK_EVERY: Duration = Duration::from_secs(30);

/// The DC's wall clock as Pacemaker's `date_spec` reads it (local time), injected.
pub trait LocalClock: Send + Sync {
    fn now(&self) -> LocalTime;
}

/// How the follower drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainRule {
    /// How long before a window's start its members are asked.
    pub lead: Duration,
    /// How long a member's guest has to answer (also bounded by the window's start).
    pub drain: Duration,
}

impl Default for DrainRule {
    fn default() -> Self {
        DrainRule {
            lead: DEFAULT_LEAD,
            drain: Duration::from_secs(30),
        }
    }
}

/// What was recorded of one window drained.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// [`bound_edges::bound_key`]: `group/from-to`.
    pub bound: String,
    /// The window's start, local seconds since the epoch.
    pub window: i64,
    /// The window as the drain request named it (`20:00-06:00`).
    pub time_bound: String,
    /// Each member asked and its answer: `done`, `refused: REASON`, `failed: REASON`, `unreachable:
    /// REASON`, `gone` (not a VM any more), or `asking` while the requests are out.
    pub answers: BTreeMap<String, String>,
}

/// What one look did (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Looked {
    /// Windows drained now, with their record.
    pub drained: Vec<Record>,
    /// Windows that started without their drain (`bound`, window start).
    pub missed: Vec<(String, i64)>,
    /// When to look again.
    pub next_in: Option<Duration>,
}

/// The windows drained so far, per bound: the latest window start recorded on any host.
pub fn drained(cib: &str) -> BTreeMap<String, i64> {
    let mut out: BTreeMap<String, i64> = BTreeMap::new();
    for r in records(cib) {
        let w = out.entry(r.bound).or_insert(r.window);
        *w = (*w).max(r.window);
    }
    out
}

/// The records of every window drained (`vmha` reads them; tests).
pub fn records(cib: &str) -> Vec<Record> {
    crate::clone::attributes(cib, RECORD_PREFIX)
        .into_iter()
        .filter_map(|a| serde_json::from_str(&a.value).ok())
        .collect()
}

fn attribute_name(edge: &Edge) -> String {
    let group: String = edge
        .bound
        .group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{RECORD_PREFIX}{group}-{}-{}", edge.bound.from_hour, edge.bound.to_hour)
}

/// One look at the clock on this vmhad: nothing unless its host is the DC (as `vmha group autoscale
/// --only-on-dc` decides); otherwise drains every window due ([`bound_edges::look`]) and logs the missed
/// ones. `last`: the local time of the previous look.
pub async fn look(p: &Ports, now: LocalTime, last: Option<i64>, rule: DrainRule) -> Result<Looked, OpError> {
    let snap = p.cluster.snapshot();
    // Not the DC, or no policy stored (as the CIB last followed says): nothing to drain, and no read of
    // the whole CIB.
    let no_policy = snap.view.as_ref().is_some_and(|v| v.policy_fingerprint.is_none());
    if snap.dc() != Some(p.cluster.local_host()) || no_policy {
        return Ok(Looked {
            next_in: Some(LOOK_EVERY),
            ..Looked::default()
        });
    }
    let cib = p.cluster.query().await?;
    let Some(policy) = Policy::from_cib(&cib).map_err(|e| OpError::data("the stored policy", e))? else {
        return Ok(Looked {
            next_in: Some(LOOK_EVERY),
            ..Looked::default()
        });
    };
    let bounds = bound_edges::bounds_of(&policy);
    let lead = u32::try_from(rule.lead.as_secs()).unwrap_or(u32::MAX);
    let found = bound_edges::look(&bounds, &drained(&cib), last, now.local(), lead);
    let mut out = Looked {
        next_in: found
            .next_in
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0))),
        ..Looked::default()
    };
    for edge in &found.missed {
        tracing::warn!(
            group = %edge.bound.group,
            time_bound = %bound_edges::window_name(&edge.bound),
            members = ?edge.stops,
            "the time bound's window started at {} without its members asked to drain (the clock jumped, or no vmhad was the DC in its lead); Pacemaker stops them",
            LocalTime::clock(edge.start)
        );
        out.missed.push((bound_edges::bound_key(&edge.bound), edge.start));
    }
    let view = snap.view.as_ref();
    for edge in &found.due {
        let until_start = Duration::from_secs(u64::try_from(edge.start - now.local()).unwrap_or(0));
        let record = drain_edge(p, edge, &policy, view, rule.drain.min(until_start)).await?;
        out.drained.push(record);
    }
    Ok(out)
}

/// Asks the members `edge` stops to drain, recording the window first (asked at most once, also when
/// this vmhad dies meanwhile) and the answers after.
async fn drain_edge(
    p: &Ports,
    edge: &Edge,
    policy: &Policy,
    view: Option<&vmha_model::ClusterView>,
    limit: Duration,
) -> Result<Record, OpError> {
    let group = &edge.bound.group;
    let window = bound_edges::window_name(&edge.bound);
    let members = policy.groups.get(group).map_or(0, |g| g.members.len());
    let data = bound_edges::drain_data(edge, members);
    let mut record = Record {
        bound: bound_edges::bound_key(&edge.bound),
        window: edge.start,
        time_bound: window.clone(),
        answers: edge.stops.iter().map(|m| (m.clone(), "asking".to_string())).collect(),
    };
    let name = attribute_name(edge);
    let host = p.cluster.local_host().to_string();
    let save = |r: &Record| {
        let value = serde_json::to_string(r).unwrap_or_default();
        let (name, host) = (name.clone(), host.clone());
        async move { crate::vm::set_node_attribute(p, &host, &name, &value, "the time bound's drain record").await }
    };
    save(&record).await?;
    tracing::info!(%group, time_bound = %window, members = ?edge.stops, "asking the members the time bound stops at {} to drain", LocalTime::clock(edge.start));
    let ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
    let asks = edge.stops.iter().map(|vm| {
        let data = data.clone();
        async move {
            // A member that is no VM any more (destroyed since the policy named it) is not asked.
            if view.is_some_and(|v| v.vm(vm).is_none()) {
                return (vm.clone(), "gone".to_string());
            }
            let asked = tokio::time::timeout(limit, p.guests.request(vm, "drain", data, ms)).await;
            let answer = match asked {
                Ok(Ok(a)) if a.done() => "done".to_string(),
                Ok(Ok(a)) => format!("{}: {}", a.outcome, a.reason),
                Ok(Err(e)) => format!("unreachable: {e}"),
                Err(_) => format!("unreachable: no answer within {} ms", limit.as_millis()),
            };
            (vm.clone(), answer)
        }
    });
    for (vm, answer) in futures_util::future::join_all(asks).await {
        if answer == "done" {
            tracing::info!(%group, %vm, time_bound = %window, "drained before the time bound's window");
        } else {
            tracing::warn!(%group, %vm, time_bound = %window, "did not drain before the time bound's window ({answer}); Pacemaker stops it at the window's start anyway");
        }
        record.answers.insert(vm, answer);
    }
    if let Err(e) = save(&record).await {
        tracing::warn!(%group, time_bound = %window, "recording the drain's answers: {e}");
    }
    Ok(record)
}

/// Follows the clock in the vmhad: looks at it at each lead's start and at least every 30 s (a clock
/// step is seen within that), on the DC only ([`look`]). The CIB is read again only when the stored
/// policy changed (not any other change of the configuration: on a large cluster a whole read per
/// change was most of the DC's vmhad's work), this host became the DC, the clock reached the next lead
/// or stepped back since the last read.
pub async fn follow(p: Ports, clock: Arc<dyn LocalClock>, rule: DrainRule) {
    let mut last: Option<i64> = None;
    // (the stored policy, local time of the next lead) as of the last read of the CIB.
    let mut known: Option<(Option<Option<u64>>, i64)> = None;
    loop {
        let now = clock.now();
        let policy = policy_key(&p);
        let quiet = known.as_ref().and_then(|(v, next)| {
            let same = *v == policy && policy.is_some();
            let ahead = next.saturating_sub(now.local());
            (same && ahead > 0 && last.is_none_or(|l| now.local() >= l)).then_some(ahead)
        });
        let wait = if let Some(ahead) = quiet {
            Duration::from_secs(u64::try_from(ahead).unwrap_or(u64::MAX)).min(LOOK_EVERY)
        } else {
            match look(&p, now, last, rule).await {
                Ok(l) => {
                    let next = l.next_in.unwrap_or(Duration::from_secs(86_400));
                    known = Some((
                        policy,
                        now.local()
                            .saturating_add(i64::try_from(next.as_secs()).unwrap_or(i64::MAX)),
                    ));
                    next.min(LOOK_EVERY)
                }
                Err(e) => {
                    tracing::warn!("draining the members of time bounds: {e}");
                    known = None;
                    LOOK_EVERY
                }
            }
        };
        last = Some(now.local());
        tokio::time::sleep(wait.max(Duration::from_millis(500))).await;
    }
}

/// The stored policy as the CIB vmhad follows has it ([`vmha_model::ClusterView::policy_fingerprint`]:
/// `Some(None)` when there is none); `None` when not the DC or not known, so that the next look reads
/// the CIB.
fn policy_key(p: &Ports) -> Option<Option<u64>> {
    let snap = p.cluster.snapshot();
    if snap.dc() != Some(p.cluster.local_host()) {
        return None;
    }
    Some(snap.view.as_ref()?.policy_fingerprint)
}
