//! Scaling an elastic VM group (`vmha group scale`, and autoscale): a journaled job in the DC's vmhad.
//! Growing live-clones the group's template once per new member ([`crate::clone`], each clone with its own
//! journal and rollback) onto a host that keeps the group's (anti-)affinity, then adds the member to the
//! stored placement policy and applies it. Shrinking asks the newest member's guest to drain, takes it
//! out of the policy, then destroys it. After each member the group is consistent at the size reached.
//!
//! Between elastic groups with priorities (the policy's `priority`, [`vmha_model::arbitration`]), a
//! growth first takes free room; when there is not enough it takes members of groups of strictly lower
//! priority (lowest first, newest first, never below their `min`, never a template, never a member of a
//! group being scaled): they are drained through the guest API, taken out of the policy and destroyed
//! as a shrink removes a member, before the new members are cloned. A growth that would still fall short
//! is refused before anything changes, naming what it would take ([`check`]). A member that refuses to
//! drain (or whose guest cannot be asked) stays in its group, and the next candidate in the same order
//! is asked instead ([`vmha_model::arbitration::next_preempt`]); the growth stops only when none is left
//! ([`OpError::DrainsRefused`], naming the members that refused).
//!
//! The job's journal (a node attribute of its host) names the member between two of those changes: a
//! member cloned and not yet in the policy, or out of the policy and not yet destroyed. A restarted vmhad
//! or the next DC completes that member's step ([`recover`]): the clone is running, so it joins; the
//! drained member leaves for good.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::json;
use vmha_model::arbitration::{self, GroupState};
use vmha_model::group::{self, Elastic};
use vmha_model::policy::{self, Policy};
use vmha_model::ClusterView;

use crate::clone::{self, CloneSpec};
use crate::error::OpError;
use crate::ports::{BoxFuture, CibChange, Ports, Progress};
use crate::vm::{self, VmOp};

/// Prefix of the node attributes holding scale journals.
pub const JOURNAL_PREFIX: &str = "vmha-scale-journal-";
/// How often applying the policy starts over when the configuration changed under it.
const APPLY_ATTEMPTS: u32 = 5;

/// What a scale request asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleSpec {
    pub group: String,
    pub size: u32,
    /// Clone without asking the template's guest to prepare.
    pub force: bool,
    /// How long a member's guest has to drain.
    pub drain_ms: u32,
}

/// A checked scale request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePlan {
    pub spec: ScaleSpec,
    pub template: String,
    pub from: usize,
    pub add: Vec<String>,
    pub remove: Vec<String>,
    /// Members of lower-priority groups to drain and remove first, in order: (group, VM).
    pub preempt: Vec<(String, String)>,
    /// The elastic groups as arbitration saw them when planning (empty without preemption): where the
    /// next candidate comes from when a member refuses to drain.
    pub arbitration: Vec<GroupState>,
    /// How many of the new members take free room.
    pub from_free: u32,
}

impl ScalePlan {
    /// The plan for people: what is added, removed and taken from other groups.
    pub fn describe(&self) -> String {
        let g = &self.spec.group;
        let mut out = format!("group {g}: {} -> {} members", self.from, self.spec.size);
        if !self.add.is_empty() {
            out.push_str(&format!("; adds {}", self.add.join(", ")));
        }
        if !self.remove.is_empty() {
            out.push_str(&format!("; drains and removes {}", self.remove.join(", ")));
        }
        if !self.preempt.is_empty() {
            out.push_str(&format!(
                "; {} from free room, then drains and removes {} (lower-priority groups)",
                self.from_free,
                self.preempt
                    .iter()
                    .map(|(g, vm)| format!("{vm} of {g}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out
    }
}

/// The journal of a scale job: the member between two of its changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleJournal {
    pub group: String,
    /// Being cloned, or cloned and not yet in the policy: joins when it exists.
    pub joining: Option<String>,
    /// Drained and out of the policy (or about to be), not yet destroyed.
    pub leaving: Option<String>,
    /// The group `leaving` leaves when it is not `group` (a member preempted from a lower-priority group).
    pub leaving_group: Option<String>,
    /// The lower-priority groups this job takes members from (no other job scales them meanwhile).
    pub preempting: Vec<String>,
    /// The leaving member's domain XML file (its files go even when its resource went already).
    pub leaving_config: Option<String>,
}

/// What a scale job did: JSON for its caller (`group`, `from`, `asked`, `size`, `steps`, `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleSummary {
    pub group: String,
    pub from: usize,
    pub asked: u32,
    pub size: usize,
    pub steps: Vec<serde_json::Value>,
    pub error: Option<String>,
}

impl ScaleSummary {
    /// The job's result for people: how the group changed, or why it stopped and where it stands.
    pub fn message(&self) -> String {
        match &self.error {
            None if self.steps.is_empty() => format!("group {} has {} members already", self.group, self.size),
            None => format!("group {}: {} -> {} members", self.group, self.from, self.size),
            Some(e) => format!(
                "group {}: {e} (the group has {} members; asked for {})",
                self.group, self.size, self.asked
            ),
        }
    }
}

fn stored(cib: &str) -> Result<Policy, OpError> {
    Policy::from_cib(cib)
        .map_err(|e| OpError::data("the stored policy", e))?
        .ok_or_else(|| OpError::Invalid("no policy is stored (vmha policy set FILE)".into()))
}

fn elastic(p: &Policy, name: &str) -> Result<Elastic, OpError> {
    let known = p.groups.contains_key(name);
    group::elastic(p, name).map_err(|e| {
        if known {
            OpError::Invalid(e.to_string())
        } else {
            OpError::UnknownGroup(e.to_string())
        }
    })
}

/// Checks a scale request (nothing changes).
pub async fn check(p: &Ports, spec: &ScaleSpec) -> Result<ScalePlan, OpError> {
    let cib = p.cluster.query().await?;
    plan_of(&cib, spec)
}

/// The plan of a scale request against `cib` (`vmha group scale --dry-run` shows it; nothing changes).
pub fn plan_of(cib: &str, spec: &ScaleSpec) -> Result<ScalePlan, OpError> {
    let policy = stored(cib)?;
    let g = elastic(&policy, &spec.group)?;
    let view = ClusterView::from_cib(cib).map_err(|e| OpError::data("the CIB", e))?;
    let plan = group::scale_plan(&g, spec.size, |n| {
        view.vm(n).is_some() || cib.contains(&format!("id=\"{n}\""))
    })
    .map_err(|e| OpError::Invalid(e.to_string()))?;
    if let Some(j) = journals(cib).into_iter().find(|j| j.1.group == spec.group) {
        return Err(OpError::Conflict(format!(
            "group {} is being scaled already (job {} on {})",
            spec.group,
            j.0.key.trim_start_matches(JOURNAL_PREFIX),
            j.0.host
        )));
    }
    if let Some(j) = journals(cib).into_iter().find(|j| j.1.preempting.contains(&spec.group)) {
        return Err(OpError::Conflict(format!(
            "group {} is giving members to group {} (job {} on {}); try again when that ends",
            spec.group,
            j.1.group,
            j.0.key.trim_start_matches(JOURNAL_PREFIX),
            j.0.host
        )));
    }
    let (mut preempt, mut from_free, mut groups) = (Vec::new(), plan.add.len() as u32, Vec::new());
    if !plan.add.is_empty() && group::arbitrated(&policy) {
        let (arbitrated, a) = arbitration(cib, &view, &policy, &g, plan.add.len() as u32)?;
        if a.short > 0 {
            let prio = |name: &str| policy.groups.get(name).and_then(|s| s.priority).unwrap_or(0);
            let mut by_group: Vec<(String, Vec<String>)> = Vec::new();
            for (o, vm) in &a.preempt {
                match by_group.iter_mut().find(|(n, _)| n == o) {
                    Some((_, vms)) => vms.push(vm.clone()),
                    None => by_group.push((o.clone(), vec![vm.clone()])),
                }
            }
            let taking = if by_group.is_empty() {
                "no lower-priority group has a member to give (each is at its min, busy or being scaled)".to_string()
            } else {
                format!(
                    "would take {}",
                    by_group
                        .iter()
                        .map(|(o, vms)| format!("{} from group {o} (priority {})", vms.join(", "), prio(o)))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            };
            return Err(OpError::Conflict(format!(
                "group {} (priority {}): no free room for {} of its {} new member(s); {taking}, and {} would still have no room; nothing changed",
                g.name,
                prio(&g.name),
                plan.add.len() as u32 - a.from_free,
                plan.add.len(),
                a.short
            )));
        }
        if !a.preempt.is_empty() {
            groups = arbitrated;
        }
        preempt = a.preempt;
        from_free = a.from_free;
    }
    Ok(ScalePlan {
        spec: spec.clone(),
        template: g.template.clone(),
        from: g.members.len(),
        add: plan.add,
        remove: plan.remove,
        preempt,
        arbitration: groups,
        from_free,
    })
}

/// Free slots for new members of `g`: on each host that can take a VM, its free `hv_memory` over the
/// template's (one slot per host without a member when the group keeps members apart by host); unknown
/// (no preemption) when the template or a host declares no memory.
pub fn free_slots(view: &ClusterView, policy: &Policy, g: &Elastic) -> u32 {
    let Some(need) = view
        .vm(&g.template)
        .and_then(|t| t.utilization.get("hv_memory"))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0)
    else {
        return u32::MAX;
    };
    let apart = policy.groups.get(&g.name).is_some_and(|s| {
        s.anti_affinity == Some(policy::Level::Host) && s.score.as_deref().is_none_or(|x| x == "-INFINITY")
    });
    let running = group::running(view);
    let mut slots: u64 = 0;
    for host in group::candidate_hosts(view).keys() {
        let Some(free) = group::free_memory(view, host) else {
            return u32::MAX;
        };
        let mut n = free / need;
        if apart {
            let used = g.members.iter().any(|m| running.get(m) == Some(host));
            n = if used { 0 } else { n.min(1) };
        }
        slots = slots.saturating_add(n);
    }
    u32::try_from(slots).unwrap_or(u32::MAX)
}

/// What growing `g` by `want` takes ([`vmha_model::arbitration::arbitrate`]), with the groups as
/// arbitration saw them: members named in a scale journal, and every member of a group being scaled, are
/// busy.
fn arbitration(
    cib: &str,
    view: &ClusterView,
    policy: &Policy,
    g: &Elastic,
    want: u32,
) -> Result<(Vec<GroupState>, arbitration::Arbitration), OpError> {
    let js = journals(cib);
    let busy = |vm: &str| {
        js.iter().any(|(_, j)| {
            j.joining.as_deref() == Some(vm)
                || j.leaving.as_deref() == Some(vm)
                || std::iter::once(&j.group).chain(&j.preempting).any(|name| {
                    policy
                        .groups
                        .get(name)
                        .is_some_and(|s| s.members.iter().any(|m| m == vm))
                })
        })
    };
    let groups = group::arbitration_groups(policy, &busy);
    let a = arbitration::arbitrate(&groups, &g.name, want, free_slots(view, policy, g))
        .map_err(|e| OpError::Invalid(e.to_string()))?;
    Ok((groups, a))
}

/// Stores `policy` in the CIB and applies it (its compiled constraints replace vmha's own in the
/// configuration, starting over when the configuration changed between the read and the replace).
pub async fn store_policy(p: &Ports, policy: &Policy) -> Result<(), OpError> {
    let cib = p.cluster.query().await?;
    policy::plan(policy, &cib).map_err(|e| OpError::Invalid(e.to_string()))?;
    p.cluster
        .apply(CibChange::Modify {
            section: "crm_config",
            xml: policy::store_xml(policy),
        })
        .await?;
    for _ in 0..APPLY_ATTEMPTS {
        let xml = p.cluster.query().await?;
        let plan = policy::plan(&stored(&xml)?, &xml).map_err(|e| OpError::Invalid(e.to_string()))?;
        if plan.is_empty() {
            return Ok(());
        }
        let now = p.cluster.query().await?;
        if config_version(&now) != config_version(&xml) {
            continue;
        }
        p.cluster
            .apply(CibChange::Replace {
                section: "configuration",
                xml: plan.configuration,
            })
            .await?;
        return Ok(());
    }
    Err(OpError::Conflict(
        "the CIB configuration kept changing while applying the policy; try again".into(),
    ))
}

/// `admin_epoch.epoch` of a CIB: what changes when its configuration changes.
fn config_version(xml: &str) -> Option<String> {
    let v = ClusterView::from_cib(xml).ok()?.version;
    Some(v.rsplit_once('.').map(|(a, _)| a.to_string()).unwrap_or(v))
}

/// A progress sink reporting into `[from, to]` of another's range.
struct Part<'a> {
    inner: &'a dyn Progress,
    from: f64,
    to: f64,
    prefix: String,
}

impl Progress for Part<'_> {
    fn progress(&self, fraction: f64, message: &str) -> BoxFuture<'_, ()> {
        let f = self.from + (self.to - self.from) * fraction.clamp(0.0, 1.0);
        let m = format!("{}{message}", self.prefix);
        Box::pin(async move { self.inner.progress(f, &m).await })
    }
}

/// One scale job under way.
struct ScaleRun<'a> {
    p: &'a Ports,
    progress: &'a dyn Progress,
    plan: &'a ScalePlan,
    job_id: &'a str,
    key: String,
    journal: ScaleJournal,
    steps: Vec<serde_json::Value>,
    /// Where this job put its clones (Pacemaker's status may not show one just registered yet).
    placed: BTreeMap<String, String>,
}

/// Runs a checked scale plan as job `job_id`; the summary says how far it got, also on failure.
pub async fn run(
    p: &Ports,
    progress: &dyn Progress,
    plan: &ScalePlan,
    job_id: &str,
) -> (ScaleSummary, Result<(), OpError>) {
    let mut run = ScaleRun {
        p,
        progress,
        plan,
        job_id,
        key: format!("{JOURNAL_PREFIX}{job_id}"),
        journal: ScaleJournal {
            group: plan.spec.group.clone(),
            preempting: {
                let mut groups: Vec<String> = plan.preempt.iter().map(|(g, _)| g.clone()).collect();
                groups.dedup();
                groups
            },
            ..ScaleJournal::default()
        },
        steps: Vec::new(),
        placed: BTreeMap::new(),
    };
    let outcome = run.steps().await;
    // A member between two changes finishes its step whatever went wrong (its undo would be worse: a
    // running clone destroyed, a drained member back in service).
    if run.journal.joining.is_some() || run.journal.leaving.is_some() {
        let journal = run.journal.clone();
        if let Err(e) = complete(p, &journal).await {
            tracing::warn!(group = %plan.spec.group, "completing the member's step: {e}");
        }
    }
    // A journal left behind only makes the next recovery complete a step that is complete.
    clone::clear_journal(p, p.cluster.local_host(), &run.key).await;
    let size = p
        .cluster
        .query()
        .await
        .ok()
        .and_then(|cib| stored(&cib).ok())
        .and_then(|pol| group::elastic(&pol, &plan.spec.group).ok())
        .map_or(0, |g| g.members.len());
    let summary = ScaleSummary {
        group: plan.spec.group.clone(),
        from: plan.from,
        asked: plan.spec.size,
        size,
        steps: run.steps,
        error: outcome.as_ref().err().map(ToString::to_string),
    };
    (summary, outcome)
}

impl ScaleRun<'_> {
    async fn save(&self) -> Result<(), OpError> {
        let value = serde_json::to_string(&self.journal).map_err(|e| OpError::data("the scale journal", e))?;
        let host = self.p.cluster.local_host();
        crate::vm::set_node_attribute(self.p, host, &self.key, &value, "the scale journal").await
    }

    async fn steps(&mut self) -> Result<(), OpError> {
        self.save().await?;
        let total = (self.plan.add.len() + self.plan.remove.len() + self.plan.preempt.len()).max(1) as f64;
        let mut done = 0.0;
        // Room first: the lower-priority groups' members the plan takes, drained as a shrink drains.
        self.preempt(&mut done, total).await?;
        for member in &self.plan.add {
            self.add(member, done / total, (done + 1.0) / total).await?;
            done += 1.0;
        }
        let group = self.plan.spec.group.clone();
        for member in &self.plan.remove {
            self.remove(&group, member, done / total).await?;
            done += 1.0;
        }
        Ok(())
    }

    /// Clones the template as `member` on a host that keeps the group's placement, then adds it to the
    /// policy.
    async fn add(&mut self, member: &str, from: f64, to: f64) -> Result<(), OpError> {
        let group = &self.plan.spec.group;
        let cib = self.p.cluster.query().await?;
        let view = ClusterView::from_cib(&cib).map_err(|e| OpError::data("the CIB", e))?;
        let policy = stored(&cib)?;
        let mut running = group::running(&view);
        for (vm, host) in &self.placed {
            running.entry(vm.clone()).or_insert_with(|| host.clone());
        }
        let host = group::choose_host(&policy, group, &group::candidate_hosts(&view), &running)
            .map_err(|e| OpError::Conflict(format!("adding {member}: {e}")))?;
        let part = Part {
            inner: self.progress,
            from,
            to: from + (to - from) * 0.9,
            prefix: format!("{member}: "),
        };
        part.progress(0.0, &format!("cloning {} as {member} on {host}", self.plan.template))
            .await;
        let spec = CloneSpec {
            template: self.plan.template.clone(),
            name: Some(member.to_string()),
            host: Some(host.clone()),
            count: 1,
            force: self.plan.spec.force,
        };
        let cplan = clone::check(self.p, &spec).await?;
        // Written ahead: a clone that finished joins the group even when this vmhad dies right after it
        // (one that did not finish is rolled back by its own journal, and does not exist to join).
        self.journal.joining = Some(member.to_string());
        self.save().await?;
        clone::run(self.p, &part, &cplan, &format!("{}-{member}", self.job_id)).await?;
        self.placed.insert(member.to_string(), host.clone());
        self.progress
            .progress(from + (to - from) * 0.95, &format!("{member} joins group {group}"))
            .await;
        let cib = self.p.cluster.query().await?;
        store_policy(self.p, &group::with_member(&stored(&cib)?, group, member)).await?;
        self.journal.joining = None;
        self.save().await?;
        self.steps.push(json!({"added": member, "host": host}));
        Ok(())
    }

    /// Takes the members of lower-priority groups the growth needs (as many as the plan's `preempt`), in
    /// arbitration's order: a member that refuses to drain, or whose guest cannot be asked, stays in its
    /// group and the next candidate is asked ([`arbitration::next_preempt`]); when none is left, the
    /// growth stops with [`OpError::DrainsRefused`] naming those that refused (nothing more changes).
    async fn preempt(&mut self, done: &mut f64, total: f64) -> Result<(), OpError> {
        let need = u32::try_from(self.plan.preempt.len()).unwrap_or(u32::MAX);
        if need == 0 {
            return Ok(());
        }
        let grower = self.plan.spec.group.clone();
        let mut taken: Vec<(String, String)> = Vec::new();
        // Refusing members, and members of a group another job took up since the plan: not asked.
        let mut refused = BTreeSet::new();
        let mut why = Vec::new();
        while let Some((other, member)) =
            arbitration::next_preempt(&self.plan.arbitration, &grower, need, &taken, &refused)
                .map_err(|e| OpError::Invalid(e.to_string()))?
        {
            if !self.journal.preempting.contains(&other) {
                // A candidate of a group the plan did not take from: not while another job scales it or
                // takes from it, and no scale of it starts meanwhile.
                let cib = self.p.cluster.query().await?;
                let other_job = journals(&cib)
                    .into_iter()
                    .find(|(j, s)| j.key != self.key && (s.group == other || s.preempting.contains(&other)));
                if let Some((j, _)) = other_job {
                    why.push(format!(
                        "group {other} is in job {} on {}",
                        j.key.trim_start_matches(JOURNAL_PREFIX),
                        j.host
                    ));
                    let all = self.plan.arbitration.iter().filter(|g| g.name == other);
                    refused.extend(all.flat_map(|g| g.members.iter().map(|m| m.vm.clone())));
                    continue;
                }
                self.journal.preempting.push(other.clone());
                self.save().await?;
            }
            let refusal = match self.drain(&other, &member, *done / total).await {
                Ok(()) => None,
                Err(OpError::GuestRefused { reason, .. }) => Some(("refused to drain", reason)),
                Err(OpError::GuestUnreachable { reason, .. }) => Some(("could not be asked to drain", reason)),
                Err(e) => return Err(e),
            };
            if let Some((what, reason)) = refusal {
                let reason = reason.trim_end_matches("; it stays in the group");
                tracing::warn!(group = %grower, vm = %member, from = %other, "{member} {what} ({reason}); asking the next candidate");
                self.steps
                    .push(json!({"drain_refused": member, "group": other, "reason": reason}));
                why.push(format!("{member} of group {other} {what} ({reason})"));
                refused.insert(member);
                continue;
            }
            self.take_out(&other, &member).await?;
            taken.push((other, member));
            *done += 1.0;
        }
        let got = u32::try_from(taken.len()).unwrap_or(u32::MAX);
        if got < need {
            return Err(OpError::DrainsRefused {
                group: grower,
                short: need - got,
                refused: why,
            });
        }
        Ok(())
    }

    /// Drains `member`'s guest, takes it out of `group`'s policy and destroys it.
    async fn remove(&mut self, group: &str, member: &str, at: f64) -> Result<(), OpError> {
        self.drain(group, member, at).await?;
        self.take_out(group, member).await
    }

    /// Asks `member`'s guest to drain (`group` is another than the one scaled when the member is
    /// preempted). A refusal or an unreachable guest changes nothing: the member stays in its group.
    async fn drain(&mut self, group: &str, member: &str, at: f64) -> Result<(), OpError> {
        let preempted = group != self.plan.spec.group;
        self.progress
            .progress(
                at,
                &if preempted {
                    format!(
                        "asking {member}'s guest to drain (group {group} gives way to group {})",
                        self.plan.spec.group
                    )
                } else {
                    format!("asking {member}'s guest to drain")
                },
            )
            .await;
        let data = if preempted {
            let size = self
                .p
                .cluster
                .query()
                .await
                .ok()
                .and_then(|cib| stored(&cib).ok())
                .and_then(|pol| pol.groups.get(group).map(|g| g.members.len().saturating_sub(1)))
                .unwrap_or(0);
            json!({"group": group, "size": size, "preempted_by": self.plan.spec.group}).to_string()
        } else {
            json!({"group": group, "size": self.plan.spec.size}).to_string()
        };
        let answer = self
            .p
            .guests
            .request(member, "drain", data, self.plan.spec.drain_ms)
            .await;
        match answer {
            Ok(a) if a.done() => {}
            Ok(a) => {
                return Err(OpError::GuestRefused {
                    vm: member.to_string(),
                    request: "drain".into(),
                    reason: format!("{}: {}; it stays in the group", a.outcome, a.reason),
                })
            }
            Err(e) => {
                return Err(OpError::GuestUnreachable {
                    vm: member.to_string(),
                    request: "drain".into(),
                    reason: format!("{e}; it stays in the group"),
                })
            }
        }
        Ok(())
    }

    /// Takes the drained `member` out of `group`'s policy and destroys it, journaled.
    async fn take_out(&mut self, group: &str, member: &str) -> Result<(), OpError> {
        let preempted = group != self.plan.spec.group;
        self.journal.leaving = Some(member.to_string());
        self.journal.leaving_group = preempted.then(|| group.to_string());
        self.journal.leaving_config = self
            .p
            .cluster
            .snapshot()
            .view
            .as_ref()
            .and_then(|v| v.vm(member))
            .and_then(|v| v.config.clone());
        self.save().await?;
        leave(self.p, group, member, self.journal.leaving_config.as_deref()).await?;
        self.journal.leaving = None;
        self.journal.leaving_group = None;
        self.journal.leaving_config = None;
        self.save().await?;
        if preempted {
            self.steps.push(json!({"preempted": member, "group": group}));
        } else {
            self.steps.push(json!({"removed": member}));
        }
        Ok(())
    }
}

/// Takes `member` out of `group`'s policy (when in it) and destroys it (when it exists; its files, from
/// `config`, when only they are left).
async fn leave(p: &Ports, group: &str, member: &str, config: Option<&str>) -> Result<(), OpError> {
    let cib = p.cluster.query().await?;
    let policy = stored(&cib)?;
    if policy
        .groups
        .get(group)
        .is_some_and(|g| g.members.iter().any(|m| m == member))
    {
        store_policy(p, &group::without_member(&policy, group, member)).await?;
    }
    let exists = p
        .cluster
        .snapshot()
        .view
        .as_ref()
        .is_some_and(|v| v.vm(member).is_some());
    if exists {
        let op = VmOp::Destroy(member.to_string());
        vm::check(p, &op).await?;
        vm::run(p, &crate::ports::LogProgress, &op).await?;
    } else if let Some(config) = config {
        if p.storage.exists(config).await {
            clone::destroy_files(p, config).await?;
        } else if let Some(template) = policy.groups.get(group).and_then(|g| g.template.clone()) {
            // Its files went, maybe not the template layer below them.
            let dirs = std::iter::once(clone::dir_of(config)).collect();
            clone::remove_unused_layers(p, &template, Vec::new(), dirs).await;
        }
    }
    Ok(())
}

/// Finishes the step of the member a journal names: a joining member that runs joins the policy; a
/// leaving one leaves and is destroyed.
async fn complete(p: &Ports, journal: &ScaleJournal) -> Result<(), OpError> {
    if let Some(member) = &journal.joining {
        let cib = p.cluster.query().await?;
        let view = ClusterView::from_cib(&cib).map_err(|e| OpError::data("the CIB", e))?;
        let policy = stored(&cib)?;
        let listed = policy
            .groups
            .get(&journal.group)
            .is_some_and(|g| g.members.iter().any(|m| m == member));
        if view.vm(member).is_some() && !listed {
            store_policy(p, &group::with_member(&policy, &journal.group, member)).await?;
        }
    }
    if let Some(member) = &journal.leaving {
        let group = journal.leaving_group.as_deref().unwrap_or(&journal.group);
        leave(p, group, member, journal.leaving_config.as_deref()).await?;
    }
    Ok(())
}

/// Every scale journal in the CIB, with its stored form.
fn journals(cib: &str) -> Vec<(clone::StoredJournal, ScaleJournal)> {
    clone::attributes(cib, JOURNAL_PREFIX)
        .into_iter()
        .map(|j| {
            let parsed = serde_json::from_str::<ScaleJournal>(&j.value).unwrap_or_default();
            (j, parsed)
        })
        .collect()
}

/// Completes the scale steps left by a vmhad that stopped midway: this host's own (at start) and, on the
/// DC, those of hosts whose vmhad is gone. Clone journals are recovered first ([`clone::recover`]).
pub async fn recover(p: &Ports) {
    for j in clone::orphaned(p, JOURNAL_PREFIX).await {
        let journal = serde_json::from_str::<ScaleJournal>(&j.value).unwrap_or_default();
        tracing::warn!(host = %j.host, key = %j.key, group = %journal.group, "completing an interrupted group scale");
        if let Err(e) = complete(p, &journal).await {
            tracing::warn!(key = %j.key, "completing an interrupted group scale: {e}");
        }
        clone::clear_journal(p, &j.host, &j.key).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(steps: usize, size: usize, error: Option<&str>) -> ScaleSummary {
        ScaleSummary {
            group: "web".into(),
            from: 1,
            asked: 3,
            size,
            steps: (0..steps).map(|i| json!({"added": format!("web-{i}")})).collect(),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn drains_refused_names_the_group_and_every_refusing_member_once() {
        let e = OpError::DrainsRefused {
            group: "web".into(),
            short: 1,
            refused: vec![
                "batch-2 of group batch refused to drain (refused: busy)".into(),
                "group mid is in job 7 on h2".into(),
            ],
        };
        let m = summary(0, 1, Some(&e.to_string())).message();
        assert!(
            m.starts_with("group web: 1 new member(s) of group web still have no room: batch-2 of group batch refused to drain (refused: busy); group mid is in job 7 on h2; "),
            "{m}"
        );
        assert!(
            m.ends_with("the refusing members stay in their groups (the group has 1 members; asked for 3)"),
            "{m}"
        );
    }

    #[test]
    fn a_summary_says_how_the_group_changed_or_why_it_stopped() {
        assert_eq!(summary(2, 3, None).message(), "group web: 1 -> 3 members");
        assert_eq!(summary(0, 1, None).message(), "group web has 1 members already");
        assert_eq!(
            summary(1, 2, Some("web-2's guest refused to drain: no")).message(),
            "group web: web-2's guest refused to drain: no (the group has 2 members; asked for 3)"
        );
        let json = serde_json::to_value(summary(1, 2, None)).unwrap();
        let mut keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["asked", "error", "from", "group", "size", "steps"]);
        assert_eq!(
            serde_json::from_value::<ScaleSummary>(json).unwrap(),
            summary(1, 2, None)
        );
    }
}
