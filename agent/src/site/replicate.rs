//! `vmha site replicate VC --map storage=/HERE:/PEER [--every SECS]`: the peer's copies of a running
//! virtual cluster's disks brought up to one consistent point while its VMs keep running.
//!
//! A round, at the site holding VC's ticket (so the peer runs nothing of VC: its copies are not in use):
//! 1. every running member's disks are planned from its live XML ([`replica_plan`]): every writable disk
//!    must be a raw or qcow2 file covered by the storage map, or the round is refused before any change;
//! 2. the guests' file systems are frozen (qemu-guest-agent), all of them at once, so the point is
//!    consistent across the virtual cluster;
//! 3. a push-mode backup job starts on each running domain (`virDomainBackupBegin`): from that moment
//!    QEMU copies each disk as it was then into a partial file beside the peer's image, while the guest
//!    writes on (QEMU saves a block's old contents to the copy before the guest's write lands);
//! 4. the guests are thawed: their stall is steps 2-4, not the copy;
//! 5. once every job completed, the partial files are synced, their modification time set to the point
//!    (what `vmha site status` at the peer shows as the replica's age), and renamed over the peer's images
//!    after a last check that the ticket is still here. Stopped members' images are copied as they are.
//!
//! A failure anywhere before the renames aborts the jobs and removes the partial files: the peer's
//! copies stay as they were (the previous point). Right before the renames the round writes its commit
//! record ([`vmha_model::round_record`]) beside the peer's images, so a round that dies between two renames
//! is completed (never left half old, half new) by the next round, or by the resource agent at the peer
//! before it starts a VM on those images. The copies are full copies each round (no dirty-block
//! tracking yet) and need the peer's storage mounted at the same path on every host of this site that
//! runs a member, and on the host running the command.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use vmha_api::json::document;
use vmha_model::change::escape;
use vmha_model::change::validate_name;
use vmha_model::printable;
use vmha_model::replica::{
    backup_xml, is_partial_of, partial_name, replica_plan, ReplicaPlan, ReplicationSetting, REPLICATE_PREFIX,
    REPLICATION_SET,
};
use vmha_model::round_record::{self, RoundRecord};
use vmha_model::{ClusterView, VmState};
use vmha_ops::ports::Hypervisor;
use vmha_pacemaker::{CallOptions, Scope};
use vmha_vcluster::capture;
use vmha_vcluster::translate::Maps;

use super::{disk_copies, read_all, validate_ticket, SiteView, CIB_DEADLINE};
use crate::ports::{BackupState, Libvirt};
use crate::vcluster::query;

/// How often a running backup job is asked how far it is.
const POLL: Duration = Duration::from_millis(200);

/// What one round did (`--output json`: kind `site_replicate`).
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub vcluster: String,
    /// The consistent point, RFC 3339 (UTC).
    pub point: String,
    /// How long the guests' file systems were frozen (freeze, jobs started, thaw), in ms.
    pub frozen_ms: u64,
    /// The whole round, in ms.
    pub seconds: f64,
    /// Images copied (peer path), with bytes.
    pub images: Vec<(String, u64)>,
    /// Running members copied live, and stopped members copied as they are.
    pub live: Vec<String>,
    pub stopped: Vec<String>,
}

/// One running member: where it runs and its plan.
struct Live {
    member: String,
    host: String,
    domain: String,
    plan: ReplicaPlan,
}

/// `vmha site replicate`.
pub async fn replicate(
    vc: &str,
    maps: &[String],
    every: Option<Duration>,
    wait: Duration,
    freeze: bool,
    json_out: bool,
) -> Result<ExitCode> {
    validate_name("virtual cluster name", vc)?;
    let maps = Maps::parse(maps, None)?;
    if maps.roots().is_empty() {
        bail!("no --map storage=/HERE:/PEER: say where the peer's copies of the disks are");
    }
    let local = nix::unistd::gethostname()
        .context("reading this host's name")?
        .to_string_lossy()
        .into_owned();
    let hv = Libvirt::from_host(&local);
    loop {
        match round(&hv, vc, &maps, wait, freeze).await {
            Ok(r) => {
                if json_out {
                    println!("{}", serde_json::to_string(&document("site_replicate", &r))?);
                } else {
                    println!(
                        "replicated {vc}: consistent point {}, guests frozen {} ms, {} image(s), {} bytes, {:.1} s",
                        r.point,
                        r.frozen_ms,
                        r.images.len(),
                        r.images.iter().map(|(_, b)| b).sum::<u64>(),
                        r.seconds
                    );
                }
            }
            Err(e) => {
                let Some(every) = every else { return Err(e) };
                if e.downcast_ref::<NotHere>().is_some() {
                    return Err(e);
                }
                eprintln!(
                    "vmha: replication round failed ({}): {e:#}; next round in {} s",
                    failure_outcome(&e),
                    every.as_secs()
                );
            }
        }
        let Some(every) = every else {
            return Ok(ExitCode::SUCCESS);
        };
        tokio::time::sleep(every).await;
    }
}

/// The ticket is not (or no longer) granted here: the peer may run the virtual cluster on its copies.
#[derive(Debug, thiserror::Error)]
#[error("ticket {ticket} is not granted at this site: the peer may run {vc} on its copies; replicate from the site that holds the ticket")]
struct NotHere {
    ticket: String,
    vc: String,
}

/// A round failed after its commit record was written: its remaining renames are completed later (next round,
/// or the peer's resource agent), so the peer gets this round's point, not the previous one.
#[derive(Debug, thiserror::Error)]
#[error(
    "round {round} is committed; its remaining images are renamed into place by the next round or by the \
     peer's resource agent before it starts a VM there"
)]
struct Committed {
    round: String,
}

/// How a failed round leaves the peer's copies, for its message.
fn failure_outcome(e: &anyhow::Error) -> &'static str {
    if e.downcast_ref::<Committed>().is_some() {
        "the peer gets this round's point once its remaining renames succeed"
    } else {
        "the peer keeps its previous copies"
    }
}

async fn round(hv: &Libvirt, vc: &str, maps: &Maps, wait: Duration, freeze: bool) -> Result<Round> {
    let t0 = Instant::now();
    let c = read_all().await?;
    let binding = c
        .view
        .binding_of(vc)
        .ok_or_else(|| anyhow!("{vc} is not protected by a ticket here (vmha site protect)"))?
        .clone();
    validate_ticket(&binding.ticket)?;
    if !c.view.granted_here(&binding.ticket) {
        return Err(NotHere {
            ticket: binding.ticket,
            vc: vc.to_string(),
        }
        .into());
    }
    let members = capture::list(&c.xml)?
        .get(vc)
        .cloned()
        .ok_or_else(|| anyhow!("no virtual cluster named {vc}"))?;
    let cluster = ClusterView::from_cib(&c.xml).context("reading the CIB")?;

    // 1. Every disk planned before anything is changed.
    let mut live = Vec::new();
    let mut stopped = Vec::new();
    for m in &members {
        let Some(vm) = cluster.vm(m) else { continue };
        match (vm.hosts.as_slice(), vm.state) {
            ([], VmState::Stopped) => stopped.push(m.clone()),
            ([host], VmState::Running) => {
                let domain = vm.params.get("domain").cloned().unwrap_or_else(|| m.clone());
                let xml = hv.live_xml(host, &domain).await?;
                let plan = replica_plan(&domain, &xml, |p| maps.path(p))?;
                live.push(Live {
                    member: m.clone(),
                    host: host.clone(),
                    domain,
                    plan,
                });
            }
            (hosts, state) => bail!(
                "{m} is {} (active on {}): not replicating until Pacemaker has settled it",
                format!("{state:?}").to_lowercase(),
                if hosts.is_empty() {
                    "no host".to_string()
                } else {
                    hosts.join(", ")
                }
            ),
        }
    }
    let copies = disk_copies(&c.xml, &stopped, maps)?;
    // This round's own id names its partial files: a round running at the same time (another `--every`,
    // an operator's) never writes over or removes them.
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| anyhow!("drawing the round's id: {e}"))?;
    let round_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let mut partials: Vec<(String, String)> = live
        .iter()
        .flat_map(|l| l.plan.disks.iter().map(|d| (d.partial(&round_id), d.target.clone())))
        .collect();
    partials.extend(copies.iter().map(|(_, to)| (partial_name(to, &round_id), to.clone())));
    if partials.is_empty() {
        bail!("{vc} has no disk images to replicate");
    }
    let mut seen = std::collections::BTreeSet::new();
    for (_, target) in &partials {
        if !seen.insert(target) {
            bail!("two disks of {vc} map to the same peer path {target}");
        }
    }
    // Rounds that died after committing are completed first (their partial copies are renamed into
    // place, the set whole); then leftovers of rounds that died before (never committed) are removed once
    // older than any round may take.
    complete_pending(partials.iter().map(|(_, target)| target.as_str()))?;
    for (_, target) in &partials {
        remove_leftovers(target, wait + LEFTOVER_GRACE);
    }

    // 2-4. Frozen, jobs begun, thawed.
    let r = live_round(hv, &live, &round_id, wait, freeze).await;
    let (point, frozen_ms) = match r {
        Ok(x) => x,
        Err(e) => {
            cleanup(&partials);
            return Err(e);
        }
    };
    // Stopped members: their images as they are.
    let mut images = BTreeMap::new();
    for (from, to) in &copies {
        let (from2, partial) = (from.clone(), partial_name(to, &round_id));
        let copied = tokio::task::spawn_blocking(move || std::fs::copy(&from2, &partial))
            .await
            .context("the disk copy")?
            .with_context(|| format!("copying {from} for the peer"));
        match copied {
            Ok(bytes) => {
                images.insert(to.clone(), bytes);
            }
            Err(e) => {
                cleanup(&partials);
                return Err(e);
            }
        }
    }

    // 5. Synced, stamped with the point, renamed into place while the ticket is still here.
    let finish = {
        let partials = partials.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<(String, u64)>> {
            let mut sizes = Vec::new();
            for (partial, target) in &partials {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(partial)
                    .with_context(|| format!("opening the copy {partial}"))?;
                f.sync_all().with_context(|| format!("syncing {partial}"))?;
                f.set_modified(point).with_context(|| format!("stamping {partial}"))?;
                sizes.push((target.clone(), f.metadata().map(|m| m.len()).unwrap_or(0)));
            }
            Ok(sizes)
        })
        .await
        .context("syncing the copies")?
    };
    let sizes = match finish {
        Ok(s) => s,
        Err(e) => {
            cleanup(&partials);
            return Err(e);
        }
    };
    // The ticket once more, through the round's own CIB connection.
    let still = query(&c.cib).await.ok().and_then(|xml| SiteView::from_cib(&xml).ok());
    if !still.is_some_and(|v| v.granted_here(&binding.ticket)) {
        cleanup(&partials);
        return Err(NotHere {
            ticket: binding.ticket,
            vc: vc.to_string(),
        }
        .into());
    }
    // The commit: the round's record in every directory of the peer's images. From here on the set is
    // replaced whole: if this round dies between two renames, the next round or the peer's resource
    // agent (before it starts a VM there) completes it from the record.
    let record = RoundRecord {
        version: round_record::VERSION,
        vcluster: vc.to_string(),
        round: round_id.clone(),
        point: humantime::format_rfc3339_seconds(point).to_string(),
        images: partials.iter().map(|(_, target)| target.clone()).collect(),
    };
    let records = match record.commit() {
        Ok(r) => r,
        Err(e) => {
            cleanup(&partials);
            return Err(anyhow!(e).context("committing the round (the peer keeps its previous point)"));
        }
    };
    for (partial, target) in &partials {
        let renamed = std::fs::rename(partial, target)
            .with_context(|| format!("renaming {partial} to {target}"))
            .and_then(|()| match Path::new(target).parent() {
                Some(dir) => std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .with_context(|| format!("syncing {}", dir.display())),
                None => Ok(()),
            });
        if let Err(e) = renamed {
            // Committed: the copies not renamed yet stay, with the record, for the next completion.
            return Err(e.context(Committed {
                round: round_id.clone(),
            }));
        }
    }
    for r in &records {
        if let Err(e) = std::fs::remove_file(r) {
            tracing::warn!("removing the completed round's record {}: {e}", r.display());
        }
    }
    Ok(Round {
        vcluster: vc.to_string(),
        point: humantime::format_rfc3339_seconds(point).to_string(),
        frozen_ms,
        seconds: t0.elapsed().as_secs_f64(),
        images: sizes,
        live: live.iter().map(|l| l.member.clone()).collect(),
        stopped,
    })
}

/// Freezes every running member, starts the backups, thaws; then waits for the copies. Returns the point
/// and how long the guests were frozen. On error every job begun is aborted (the caller removes the files).
async fn live_round(
    hv: &Libvirt,
    live: &[Live],
    round_id: &str,
    wait: Duration,
    freeze: bool,
) -> Result<(SystemTime, u64)> {
    use futures_util::future::join_all;
    let started = Instant::now();
    let mut frozen = Vec::new();
    let mut begun = Vec::new();
    let mut failed: Option<anyhow::Error> = None;
    // Each step on every VM at once: the guests' stall is the slowest VM's, not the sum.
    if freeze {
        let results = join_all(live.iter().map(|l| hv.guest_fsfreeze(&l.host, &l.domain, true))).await;
        for (l, r) in live.iter().zip(results) {
            match r {
                Ok(()) => frozen.push(l),
                Err(e) => {
                    failed.get_or_insert(anyhow!(e).context(format!(
                        "freezing {}'s file systems (a consistent point needs qemu-guest-agent in every running VM; \
                         --no-freeze replicates crash-consistent copies)",
                        l.member
                    )));
                }
            }
        }
    }
    if failed.is_none() {
        let with_disks: Vec<&Live> = live.iter().filter(|l| !l.plan.disks.is_empty()).collect();
        let results = join_all(
            with_disks
                .iter()
                .map(|l| hv.backup_begin(&l.host, &l.domain, backup_xml(&l.plan, round_id))),
        )
        .await;
        for (l, r) in with_disks.into_iter().zip(results) {
            match r {
                Ok(()) => begun.push(l),
                Err(e) => {
                    failed.get_or_insert(anyhow!(e).context(format!("starting the copy of {}", l.member)));
                }
            }
        }
    }
    let point = SystemTime::now();
    let thawed = join_all(frozen.iter().map(|l| hv.guest_fsfreeze(&l.host, &l.domain, false))).await;
    for (l, r) in frozen.iter().zip(thawed) {
        if let Err(e) = r {
            tracing::warn!(domain = %l.domain, "thawing failed: {e}");
            failed.get_or_insert(anyhow!(e).context(format!("thawing {}", l.member)));
        }
    }
    let frozen_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if failed.is_none() {
        failed = wait_all(hv, &begun, wait).await.err();
    }
    if let Some(e) = failed {
        for l in &begun {
            if let Err(a) = hv.backup_abort(&l.host, &l.domain).await {
                tracing::warn!(domain = %l.domain, "aborting the copy: {a}");
            }
        }
        return Err(e);
    }
    Ok((point, frozen_ms))
}

/// Waits until every begun job completed, `wait` at most.
async fn wait_all(hv: &Libvirt, begun: &[&Live], wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    let mut open: Vec<&&Live> = begun.iter().collect();
    while !open.is_empty() {
        let mut still = Vec::new();
        for l in open {
            match hv.backup_state(&l.host, &l.domain).await? {
                BackupState::Completed => {}
                BackupState::Running { processed, total } => {
                    if Instant::now() > deadline {
                        bail!(
                            "the copy of {} did not complete within {} s ({processed} of {total} bytes)",
                            l.member,
                            wait.as_secs()
                        );
                    }
                    still.push(l);
                }
                BackupState::Failed(why) => {
                    bail!("the copy of {} on {} failed: {}", l.member, l.host, printable(&why))
                }
            }
        }
        open = still;
        if !open.is_empty() {
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

fn remove_if_there(path: &str) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the leftover {path}")),
    }
}

/// Beyond a round's `--wait`, how much older a partial file must be before another round removes it.
const LEFTOVER_GRACE: Duration = Duration::from_secs(60);

/// Removes partial copies of `target` by any round that are older than `older_than`.
fn remove_leftovers(target: &str, older_than: Duration) {
    let Some(dir) = Path::new(target).parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_partial_of(name, target) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > older_than);
        if old {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!("removing the leftover {}: {err}", e.path().display());
            }
        }
    }
}

/// Completes the committed rounds whose records are in the directories of `targets` (see
/// [`vmha_model::round_record`]). A record that is not valid is reported and left alone; a rename that
/// fails ends the round (the storage is not fit for one).
fn complete_pending<'a>(targets: impl Iterator<Item = &'a str>) -> Result<()> {
    let sweep = round_record::complete_for(targets)
        .map_err(|e| anyhow!(e).context("completing an interrupted replication round"))?;
    for c in &sweep.completed {
        tracing::warn!(
            "completed the interrupted replication round of {} at {} ({}): {} images renamed into place",
            printable(&c.vcluster),
            printable(&c.point),
            c.record.display(),
            c.renamed
        );
    }
    for e in &sweep.invalid {
        tracing::warn!("{e} (left alone)");
    }
    Ok(())
}

fn cleanup(partials: &[(String, String)]) {
    for (partial, _) in partials {
        if let Err(e) = remove_if_there(partial) {
            tracing::warn!("{e:#}");
        }
    }
}

/// `vmha site replication VC --every SECS --map storage=/HERE:/PEER` (or `--off`): this site's vmhad
/// replicates VC every SECS seconds while this site holds its ticket. Stored as the cluster property
/// `vmha-replicate-VC` (property set `vmha-site-replication`).
pub async fn configure(
    vc: &str,
    every: Option<u64>,
    stale_after: Option<u64>,
    maps: &[String],
    off: bool,
) -> Result<ExitCode> {
    validate_name("virtual cluster name", vc)?;
    let c = read_all().await?;
    if c.view.binding_of(vc).is_none() {
        bail!("{vc} is not protected by a ticket here (vmha site protect)");
    }
    let id = format!("{REPLICATE_PREFIX}{vc}");
    if off {
        if !maps.is_empty() || every.is_some() || stale_after.is_some() {
            bail!("--off takes no --every, --stale-after or --map");
        }
        c.cib
            .delete(
                &Scope::section("crm_config"),
                &format!(r#"<nvpair id="{}"/>"#, escape(&id)),
                CallOptions::NONE,
                CIB_DEADLINE,
            )
            .await
            .with_context(|| format!("removing the replication setting of {vc}"))?;
        println!("replication of {vc} by vmhad: off");
        return Ok(ExitCode::SUCCESS);
    }
    let every = every.ok_or_else(|| anyhow!("--every SECS (or --off) is needed"))?;
    // The maps as `vmha vcluster` reads them, then the setting as vmhad will read it back.
    let parsed = Maps::parse(maps, None)?;
    let storage: Vec<(String, String)> = maps
        .iter()
        .map(|m| {
            m.strip_prefix("storage=")
                .and_then(|p| p.split_once(':'))
                .map(|(h, p)| (h.to_string(), p.to_string()))
                .ok_or_else(|| {
                    anyhow!(
                        "--map {}: only storage=/HERE:/PEER maps apply to replication",
                        printable(m)
                    )
                })
        })
        .collect::<Result<_>>()?;
    if parsed.roots().is_empty() {
        bail!("no --map storage=/HERE:/PEER: say where the peer's copies of the disks are");
    }
    let value = ReplicationSetting {
        every_secs: every,
        stale_secs: stale_after,
        storage,
    }
    .value();
    let setting = ReplicationSetting::parse(vc, &value)?;
    // Every disk must be covered now (a member added later is checked by each round).
    let members = capture::list(&c.xml)?.get(vc).cloned().unwrap_or_default();
    disk_copies(&c.xml, &members, &parsed)?;
    let fragment = format!(
        r#"<crm_config><cluster_property_set id="{REPLICATION_SET}"><nvpair id="{}" name="{}" value="{}"/></cluster_property_set></crm_config>"#,
        escape(&id),
        escape(&id),
        escape(&setting.value())
    );
    c.cib
        .modify(
            &Scope::section("crm_config"),
            &fragment,
            CallOptions::CAN_CREATE,
            CIB_DEADLINE,
        )
        .await
        .with_context(|| format!("storing the replication setting of {vc}"))?;
    println!(
        "replication of {vc} by vmhad: every {every} s while this site holds its ticket, stale after {} s without a round that succeeded ({})",
        setting.stale_after_secs(),
        setting.maps().join(" ")
    );
    Ok(ExitCode::SUCCESS)
}

/// How often vmhad looks at the replication settings.
const FOLLOW_TICK: Duration = Duration::from_secs(1);
/// The longest a round run by vmhad may copy.
const SERVICE_WAIT: Duration = Duration::from_secs(3600);

/// One virtual cluster's replication as vmhad's service sees it: since when no round has succeeded (or
/// since the service began to follow it here), and whether that was reported as stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    since: Instant,
    stale: bool,
}

/// A change of a [`Freshness`] to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// No round succeeded for the setting's stale limit: the peer's copies grow old.
    Stale { for_secs: u64 },
    /// A round succeeded after the replica was reported stale.
    Current { after_secs: u64 },
}

impl Freshness {
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            stale: false,
        }
    }

    /// At `now`: stale (reported once) when no round succeeded for `limit_secs` (the setting's
    /// [`ReplicationSetting::stale_after_secs`]).
    pub fn check(&mut self, now: Instant, limit_secs: u64) -> Option<Change> {
        let for_secs = now.saturating_duration_since(self.since).as_secs();
        if self.stale || for_secs < limit_secs {
            return None;
        }
        self.stale = true;
        Some(Change::Stale { for_secs })
    }

    /// A round succeeded at `now` (or the ticket is elsewhere, so the replica is not this site's to keep).
    pub fn current(&mut self, now: Instant) -> Option<Change> {
        let after_secs = now.saturating_duration_since(self.since).as_secs();
        let was = std::mem::replace(self, Self::new(now));
        was.stale.then_some(Change::Current { after_secs })
    }
}

/// How one round of the service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Done,
    Failed,
    /// The ticket is not here: nothing to do at this site.
    NotHere,
}

/// vmhad's replication: on the DC of a quorate site, each virtual cluster with a replication setting
/// (`vmha site replication`) gets a round every period while this site holds its ticket; one round per
/// virtual cluster at a time. A round that finds the ticket elsewhere does nothing (the other site's
/// vmhad replicates towards here if it is set to). Outcomes go to vmhad's log and out as the D-Bus signal
/// `Event`: `replication` (a round copied), `replication-failed`, and `replica-stale` once no round
/// succeeded for the setting's stale limit (3 periods unless `stale=SECS`; then `replica-current` when
/// one does again); the copies' age
/// shows in `vmha site status`. Ends only with vmhad.
pub async fn follow(shared: std::sync::Arc<crate::state::Shared>, conn: zbus::Connection) {
    let state = shared.subscribe();
    let local = shared.local_host.clone();
    let hv = Libvirt::from_host(&local);
    let mut started: BTreeMap<String, Instant> = BTreeMap::new();
    let mut running: BTreeMap<String, tokio::task::JoinHandle<Ended>> = BTreeMap::new();
    let mut fresh: BTreeMap<String, Freshness> = BTreeMap::new();
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(FOLLOW_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let finished: Vec<String> = running
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(vc, _)| vc.clone())
            .collect();
        for vc in finished {
            let Some(h) = running.remove(&vc) else { continue };
            let ended = h.await.unwrap_or(Ended::Failed);
            let now = Instant::now();
            if ended != Ended::Failed {
                let f = fresh.entry(vc.clone()).or_insert_with(|| Freshness::new(now));
                if let Some(Change::Current { after_secs }) = f.current(now) {
                    let message = format!("replica current again: a round succeeded after {after_secs} s without one");
                    tracing::info!(vcluster = %printable(&vc), "{message}");
                    crate::signals::event(&conn, "replica-current", &vc, &message).await;
                }
            }
        }
        let snap = state.borrow().clone();
        let Some(view) = snap.view.as_ref() else { continue };
        if view.dc.as_deref() != Some(local.as_str()) || !snap.quorate() {
            // Not this host's to follow: begun afresh when it is again.
            fresh.clear();
            continue;
        }
        fresh.retain(|vc, _| view.replications.contains_key(vc));
        for (vc, raw) in &view.replications {
            let parsed = validate_name("virtual cluster name", vc)
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(ReplicationSetting::parse(vc, raw)?))
                .and_then(|s| Ok((Maps::parse(&s.maps(), None)?, s.every_secs, s.stale_after_secs())));
            let (maps, every, stale_after) = match parsed {
                Ok(x) => {
                    refused.remove(vc);
                    x
                }
                Err(e) => {
                    if refused.get(vc) != Some(raw) {
                        tracing::warn!(vcluster = %printable(vc), "replication setting not used: {e:#}");
                        refused.insert(vc.clone(), raw.clone());
                    }
                    continue;
                }
            };
            let f = fresh
                .entry(vc.clone())
                .or_insert_with(|| Freshness::new(Instant::now()));
            if let Some(Change::Stale { for_secs }) = f.check(Instant::now(), stale_after) {
                let message = format!(
                    "replica stale: no replication round succeeded for {for_secs} s (one every {every} s is set, stale after {stale_after} s); the peer site's copies are at least that old, and a failover there loses what was written since"
                );
                tracing::warn!(vcluster = %printable(vc), "{message}");
                crate::signals::event(&conn, "replica-stale", vc, &message).await;
            }
            if running.contains_key(vc)
                || started
                    .get(vc)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(every))
            {
                continue;
            }
            started.insert(vc.clone(), Instant::now());
            let (hv, vc2, conn) = (hv.clone(), vc.clone(), conn.clone());
            running.insert(
                vc.clone(),
                tokio::spawn(async move {
                    match round(&hv, &vc2, &maps, SERVICE_WAIT, true).await {
                        Ok(r) => {
                            tracing::info!(
                                vcluster = %vc2,
                                point = %r.point,
                                frozen_ms = r.frozen_ms,
                                images = r.images.len(),
                                seconds = r.seconds,
                                "replicated to the peer site"
                            );
                            let message = format!(
                                "replicated to the peer site: {} image(s) as of {}, frozen {} ms, {:.1} s",
                                r.images.len(),
                                r.point,
                                r.frozen_ms,
                                r.seconds
                            );
                            crate::signals::event(&conn, "replication", &vc2, &message).await;
                            Ended::Done
                        }
                        Err(e) if e.downcast_ref::<NotHere>().is_some() => {
                            tracing::debug!(vcluster = %vc2, "not replicating: {e}");
                            Ended::NotHere
                        }
                        Err(e) => {
                            let message = format!("replication round failed ({}): {e:#}", failure_outcome(&e));
                            tracing::warn!(vcluster = %vc2, "{message}");
                            crate::signals::event(&conn, "replication-failed", &vc2, &message).await;
                            Ended::Failed
                        }
                    }
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scenario: rounds every 10 s, stale after 30 s (the default of 3 periods); the stale report comes
    /// once, at 30 s without a success, and the next success reports the replica current again, once.
    #[test]
    fn a_replica_is_stale_after_its_limit_without_a_success_and_current_after_the_next() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let limit = ReplicationSetting::parse("shop", "every=10 storage=/a:/b")
            .unwrap()
            .stale_after_secs();
        assert_eq!(limit, 30);
        let mut f = Freshness::new(t0);
        assert_eq!(f.check(at(29), limit), None, "not yet: under three periods");
        assert_eq!(f.current(at(25)), None, "a success before: nothing to report");
        assert_eq!(f.check(at(54), limit), None, "counted from the last success");
        assert_eq!(f.check(at(55), limit), Some(Change::Stale { for_secs: 30 }));
        assert_eq!(f.check(at(90), limit), None, "reported once");
        assert_eq!(f.current(at(95)), Some(Change::Current { after_secs: 70 }));
        assert_eq!(f.current(at(96)), None, "once");
        assert_eq!(f.check(at(125), limit), None);
        assert_eq!(
            f.check(at(126), limit),
            Some(Change::Stale { for_secs: 30 }),
            "and again"
        );
        // A limit of its own (stale=120): not at three periods.
        let mut g = Freshness::new(t0);
        assert_eq!(g.check(at(119), 120), None);
        assert_eq!(g.check(at(120), 120), Some(Change::Stale { for_secs: 120 }));
        // The longest setting does not overflow.
        assert_eq!(Freshness::new(t0).check(at(1), u64::MAX), None);
    }
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    #[test]
    fn a_failure_after_the_commit_says_the_peer_gets_the_round() {
        let renaming = anyhow!("renaming /peer/.m2.img.ab.vmha-replica to /peer/m2.img: Is a directory");
        let committed = renaming.context(Committed { round: "ab".into() });
        assert_eq!(
            failure_outcome(&committed),
            "the peer gets this round's point once its remaining renames succeed"
        );
        let text = format!("{committed:#}");
        assert!(
            text.starts_with("round ab is committed;") && text.ends_with("Is a directory"),
            "{text}"
        );
        let before = anyhow!("freezing m1's file systems").context("the round");
        assert_eq!(failure_outcome(&before), "the peer keeps its previous copies");
    }
}
