//! Live clone of a running VM (`vmha clone`): check, ask the template's guest to prepare, capture its
//! memory and disks live (external snapshot: the template goes on running on a new overlay), restore the
//! capture as new domains with their own identity on the target host, resume the template's guest, tell
//! each clone's guest that it is a clone and wait for its acknowledgement, register the clones as cluster
//! resources with the template's settings. Any failure rolls back what was made and resumes the template.
//!
//! The job runs in the vmhad on the DC's host. Every step is written ahead to a journal (a node attribute
//! of the host running the job) before it creates anything, so that a restarted vmhad, or the next DC's
//! vmhad when this one's host is gone, rolls back a clone that was cut short ([`recover`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;
use vmha_model::change::{self, validate_name};
use vmha_model::clone::{self as model, CloneIdentity, SaveImage};
use vmha_model::VmState;

use crate::error::OpError;
use crate::ports::{CibChange, GuestAnswer, Ports, Progress};
use crate::state::Snapshot;

/// How long a guest has to prepare, resume or take its new identity.
pub const GUEST_DEADLINE_MS: u32 = 10_000;
/// How long a clone's guest may take to open its channel after the restore.
const POST_CLONE_WINDOW: Duration = Duration::from_secs(30);
/// How often the template's guest is asked to resume before the clone fails.
const RESUME_ATTEMPTS: u32 = 3;
/// Most clones one request makes.
pub const MAX_COUNT: u32 = 16;
/// Prefix of the node attributes holding clone journals.
pub const JOURNAL_PREFIX: &str = "vmha-clone-journal-";

/// What `Clone` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSpec {
    pub template: String,
    pub name: Option<String>,
    pub host: Option<String>,
    pub count: u32,
    pub force: bool,
}

/// A clone job's plan, checked before anything changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub template: String,
    pub source: String,
    pub target: String,
    pub names: Vec<String>,
    pub force: bool,
    /// The template's domain XML file (its `config` parameter) and its content when checked.
    pub config: String,
    pub config_xml: String,
}

/// What a clone job made, so far: enough to undo it (also after a crash, from the journal). Fields missing
/// from a stored journal (an older vmhad's) read as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Journal {
    pub template: String,
    pub source: String,
    pub target: String,
    /// The template's guest was asked to prepare and has not been resumed yet.
    pub prepared: bool,
    /// Files to delete on rollback (overlays, memory images, clone domain XML files).
    pub files: Vec<String>,
    /// Clone domains started on `target`.
    pub domains: Vec<String>,
    /// Clone resources registered (with their constraints).
    pub resources: Vec<String>,
    /// Constraints created: (tag, id).
    pub constraints: Vec<(String, String)>,
    /// The template's domain XML file and its disks' (frozen, new overlay) paths of the live capture:
    /// once the capture switched the template to its new overlays, its definition must name them.
    pub config: String,
    pub overlays: Vec<(String, String)>,
    /// The clones are registered and running: the job succeeded, nothing is to be undone (a journal left
    /// behind by a failed clean-up is only dropped).
    pub finished: bool,
}

/// Timings of one clone job, reported in its final message (and read by the bench).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Timings {
    pub prepare_ms: u128,
    pub capture_ms: u128,
    /// How long the template's vCPUs were stopped (libvirt's downtime of the snapshot job), when known.
    pub stall_ms: Option<u64>,
    /// When the capture staged the template's memory on a tmpfs of its host: how long copying it to the
    /// shared storage took (part of `capture_ms`, after the template ran again). `None`: not staged.
    pub staged_copy_ms: Option<u64>,
    pub create_ms: u128,
    pub resume_ms: u128,
    pub register_ms: u128,
    pub post_clone_ms: u128,
    /// From the request to the clones' post-clone acknowledgement: the clones are ready (registering them
    /// as cluster resources follows, in `register_ms`).
    pub total_ms: u128,
}

/// Checks a clone request against the cluster (nothing changes).
pub async fn check(p: &Ports, spec: &CloneSpec) -> Result<Plan, OpError> {
    if spec.count == 0 || spec.count > MAX_COUNT {
        return Err(OpError::Invalid(format!("count must be 1..={MAX_COUNT}")));
    }
    let snap = p.cluster.snapshot();
    let view = snap.view.as_ref().ok_or(OpError::NotReady)?;
    let tpl = view
        .vm(&spec.template)
        .ok_or_else(|| OpError::UnknownVm(spec.template.clone()))?;
    if tpl.agent != "ocf:vmha:VirtualMachine" {
        return Err(OpError::Invalid(format!(
            "VM {} runs under {}; only ocf:vmha:VirtualMachine VMs can be cloned",
            tpl.name, tpl.agent
        )));
    }
    if tpl.state != VmState::Running || tpl.hosts.len() != 1 {
        return Err(OpError::Conflict(format!(
            "VM {} is not running on one host (it is {:?})",
            tpl.name, tpl.state
        )));
    }
    let source = tpl.hosts[0].clone();
    let config = tpl
        .config
        .clone()
        .ok_or_else(|| OpError::Invalid(format!("VM {} has no config parameter", tpl.name)))?;
    let names = model::clone_names(&tpl.name, spec.name.as_deref(), spec.count);
    let cib = p.cluster.query().await?;
    for n in &names {
        validate_name("clone name", n).map_err(|e| OpError::Invalid(e.to_string()))?;
        if view.vm(n).is_some() || cib.contains(&format!("id=\"{n}\"")) {
            return Err(OpError::Conflict(format!("the name {n} is taken in the CIB")));
        }
    }
    if let Some(other) = clone_under_way(&cib, &tpl.name, None) {
        return Err(OpError::Conflict(format!(
            "VM {} is being cloned already ({other}); try again when that job ended",
            tpl.name
        )));
    }
    let target = match &spec.host {
        Some(h) => h.clone(),
        None => best_host(&snap).unwrap_or_else(|| source.clone()),
    };
    let host = view.host(&target).ok_or_else(|| OpError::UnknownHost(target.clone()))?;
    if !snap.host_online(&target) || host.standby || host.maintenance {
        return Err(OpError::Conflict(format!(
            "host {target} is not online, or in standby or maintenance"
        )));
    }
    if let (Some(free), Some(need)) = (
        vmha_model::group::free_memory(view, &target),
        tpl.utilization.get("hv_memory").and_then(|v| v.parse::<u64>().ok()),
    ) {
        let want = need * u64::from(spec.count);
        if free < want {
            return Err(OpError::Conflict(format!(
                "host {target} has {free} MiB of hv_memory capacity left; {} clone(s) of {} need {want} MiB",
                spec.count, tpl.name
            )));
        }
    }
    let config_xml = p.storage.read_small(&config).await?;
    let disks = model::writable_disks(&config_xml).map_err(|e| OpError::data(&config, e))?;
    // The target must see the template's storage: look its disks up through the target's libvirt.
    let files: Vec<(String, String)> = disks
        .iter()
        .map(|(_, f)| (dir_of(f), base_of(f)))
        .chain(std::iter::once((dir_of(&config), base_of(&config))))
        .collect();
    p.hypervisor.sees_files(&target, files).await?;
    Ok(Plan {
        template: tpl.name.clone(),
        source,
        target,
        names,
        force: spec.force,
        config,
        config_xml,
    })
}

/// The online host with the most free memory, for clones without `--host`.
fn best_host(snap: &Snapshot) -> Option<String> {
    let view = snap.view.as_ref()?;
    view.hosts
        .iter()
        .filter(|h| snap.host_online(&h.name) && !h.standby && !h.maintenance)
        .max_by_key(|h| vmha_model::group::free_memory(view, &h.name).unwrap_or(0))
        .map(|h| h.name.clone())
}

pub(crate) fn dir_of(path: &str) -> String {
    path.rsplit_once('/').map_or(".".into(), |(d, _)| d.to_string())
}

pub(crate) fn base_of(path: &str) -> String {
    path.rsplit_once('/').map_or(path.into(), |(_, b)| b.to_string())
}

/// Runs a checked clone plan as job `job_id`. On failure, everything made is undone and the template
/// resumed; the error says whether that succeeded.
pub async fn run(p: &Ports, progress: &dyn Progress, plan: &Plan, job_id: &str) -> Result<String, OpError> {
    let mut run = CloneRun::new(p, progress, plan, job_id);
    match run.steps().await {
        Ok(message) => {
            clear_journal(p, p.cluster.local_host(), &run.key).await;
            Ok(message)
        }
        Err(e) => {
            progress.progress(0.95, &format!("rolling back: {e}")).await;
            let undo = rollback(p, &run.journal).await;
            clear_journal(p, p.cluster.local_host(), &run.key).await;
            match undo {
                Ok(()) => Err(OpError::RolledBack(Box::new(e))),
                Err(u) => Err(OpError::RollbackIncomplete {
                    error: Box::new(e),
                    undo: u,
                }),
            }
        }
    }
}

/// A clone made from the capture, before it runs.
#[derive(Debug)]
struct Made {
    name: String,
    identity: CloneIdentity,
    xml_path: String,
    mem_path: String,
}

/// One clone job under way: its plan, journal and what the steps made.
struct CloneRun<'a> {
    p: &'a Ports,
    progress: &'a dyn Progress,
    plan: &'a Plan,
    journal: Journal,
    key: String,
    started: Instant,
    t: Timings,
    /// Names the files of this capture.
    stamp: u128,
    /// The capture's memory image.
    mem: String,
    /// (target dev, frozen layer, the template's new overlay) per writable disk.
    renames: Vec<(String, String, String)>,
    made: Vec<Made>,
}

impl<'a> CloneRun<'a> {
    fn new(p: &'a Ports, progress: &'a dyn Progress, plan: &'a Plan, job_id: &str) -> Self {
        let journal = Journal {
            template: plan.template.clone(),
            source: plan.source.clone(),
            target: plan.target.clone(),
            ..Journal::default()
        };
        CloneRun {
            p,
            progress,
            plan,
            journal,
            key: format!("{JOURNAL_PREFIX}{job_id}"),
            started: Instant::now(),
            t: Timings::default(),
            stamp: p.env.unix_ms(),
            mem: String::new(),
            renames: Vec::new(),
            made: Vec::new(),
        }
    }

    async fn steps(&mut self) -> Result<String, OpError> {
        self.save_journal().await?;
        // Two jobs that passed their checks at once both see each other's journal now: the one with the
        // smaller key goes on.
        let cib = self.p.cluster.query().await?;
        if let Some(other) = clone_under_way(&cib, &self.plan.template, Some(&self.key)) {
            return Err(OpError::Conflict(format!(
                "VM {} is being cloned already ({other})",
                self.plan.template
            )));
        }
        self.prepare().await?;
        self.capture().await?;
        let at = Instant::now();
        self.write_clone_files().await?;
        self.create_overlays().await?;
        self.restore_clones().await?;
        self.t.create_ms = at.elapsed().as_millis();
        self.resume_template().await?;
        self.announce_identities().await?;
        // The clones are ready: their guests took their new identity.
        self.t.total_ms = self.started.elapsed().as_millis();
        let at = Instant::now();
        self.register().await?;
        self.wait_clones_running().await?;
        self.t.register_ms = at.elapsed().as_millis();
        self.journal.finished = true;
        self.save_journal().await?;
        // Keep the template's disk chain short: pull the layers vmha made (the frozen one of this clone,
        // and any a rolled-back clone left) into its active overlay, so that every clone adds a layer only
        // under the clones, never under the template; layers no clone uses go.
        let tpl = &self.plan.template;
        self.progress
            .progress(0.9, &format!("compacting {tpl}'s disk chain"))
            .await;
        compact_template(self.p, tpl, &self.plan.source).await;
        let timings = serde_json::to_string(&self.t).unwrap_or_default();
        Ok(format!(
            "cloned {tpl} to {} on {}; timings {timings}",
            self.plan.names.join(", "),
            self.plan.target
        ))
    }

    /// Writes the journal ahead of the step that makes what it records: a step runs only once its undo
    /// is stored.
    async fn save_journal(&self) -> Result<(), OpError> {
        let value = serde_json::to_string(&self.journal).map_err(|e| OpError::data("the clone journal", e))?;
        let host = self.p.cluster.local_host();
        crate::vm::set_node_attribute(self.p, host, &self.key, &value, "the clone journal").await
    }

    /// Asks the template's guest to prepare (unless `--force`).
    async fn prepare(&mut self) -> Result<(), OpError> {
        let at = Instant::now();
        let tpl = &self.plan.template;
        if self.plan.force {
            self.progress
                .progress(0.05, "--force: not asking the template's guest")
                .await;
        } else {
            self.progress
                .progress(0.05, &format!("asking {tpl}'s guest to prepare"))
                .await;
            let data = json!({"clones": self.plan.names, "target": self.plan.target}).to_string();
            self.journal.prepared = true;
            self.save_journal().await?;
            let answer = self
                .p
                .guests
                .request(tpl, "prepare-clone", data, GUEST_DEADLINE_MS)
                .await;
            expect_done(tpl, "prepare", answer)?;
        }
        self.t.prepare_ms = at.elapsed().as_millis();
        Ok(())
    }

    /// Captures memory and disks live; the template goes on on new overlays, and its definition is made
    /// to name them.
    async fn capture(&mut self) -> Result<(), OpError> {
        let at = Instant::now();
        let (tpl, s) = (self.plan.template.clone(), self.stamp);
        self.progress
            .progress(0.2, &format!("capturing {tpl} live on {}", self.plan.source))
            .await;
        let disks = model::writable_disks(&self.plan.config_xml).map_err(|e| OpError::data(&self.plan.config, e))?;
        let dir = dir_of(&self.plan.config);
        self.mem = format!("{dir}/.{tpl}.{s}.mem");
        self.renames = disks
            .iter()
            .map(|(dev, frozen)| {
                (
                    dev.clone(),
                    frozen.clone(),
                    format!("{}/{tpl}.{s}.{dev}.qcow2", dir_of(frozen)),
                )
            })
            .collect();
        self.journal.files.push(self.mem.clone());
        self.journal.config = self.plan.config.clone();
        self.journal.overlays = self.renames.iter().map(|(_, f, n)| (f.clone(), n.clone())).collect();
        self.save_journal().await?;
        let mut x = format!(
            "<domainsnapshot><name>vmha-clone-{s}</name><memory snapshot='external' file='{}'/><disks>",
            change::escape(&self.mem)
        );
        for (dev, _, new) in &self.renames {
            x.push_str(&format!(
                "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
                change::escape(dev),
                change::escape(new)
            ));
        }
        x.push_str("</disks></domainsnapshot>");
        let reuse = self.make_overlays_ahead().await;
        let stage = self
            .p
            .cluster
            .snapshot()
            .view
            .as_ref()
            .is_none_or(|v| v.capture_staging);
        let captured = self
            .p
            .hypervisor
            .live_snapshot(&self.plan.source, &tpl, x, reuse, stage)
            .await?;
        self.t.stall_ms = captured.downtime_ms;
        self.t.staged_copy_ms = captured.staged_copy_ms;
        // The template now writes to its new overlays: its definition must say so before anything else, or
        // a restart would boot it from the frozen layer the clones share.
        follow_overlays(self.p, &self.plan.config, &self.journal.overlays).await?;
        self.t.capture_ms = at.elapsed().as_millis();
        Ok(())
    }

    /// Makes the template's new overlays on its current layers before the capture, through the source
    /// host's storage API, so that the capture only opens them while the template's vCPUs are stopped
    /// (creating a qcow2 image there costs block jobs and round trips inside the stall). `false` when the
    /// template has no disks, or making them failed: the capture then creates them itself, as before
    /// (what this made is removed first; the journal, written ahead, names them for a rollback either way).
    async fn make_overlays_ahead(&self) -> bool {
        if self.renames.is_empty() {
            return false;
        }
        let overlays: Vec<(String, String)> = self
            .renames
            .iter()
            .map(|(_, frozen, new)| (frozen.clone(), new.clone()))
            .collect();
        match self
            .p
            .hypervisor
            .create_overlays(&self.plan.source, overlays.clone())
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(template = %self.plan.template, "making the overlays before the capture: {e}; the capture makes them");
                for (_, new) in &overlays {
                    if self.p.storage.exists(new).await {
                        if let Err(e) = self.p.storage.remove(new).await {
                            tracing::warn!(overlay = %new, "removing an overlay made before the capture: {e}");
                        }
                    }
                }
                false
            }
        }
    }

    /// Writes each clone's domain XML file and save image (the capture with its new identity).
    async fn write_clone_files(&mut self) -> Result<(), OpError> {
        let s = self.stamp;
        self.progress
            .progress(
                0.4,
                &format!("creating {} on {}", self.plan.names.join(", "), self.plan.target),
            )
            .await;
        let image = self.p.storage.read_image_header(&self.mem).await?;
        let dir = dir_of(&self.plan.config);
        for clone in &self.plan.names {
            let identity = self.identity(clone, &image);
            let runtime = model::clone_domain_xml(&image.xml, &identity).map_err(|e| OpError::data(&self.mem, e))?;
            let persistent = model::clone_domain_xml(&self.plan.config_xml, &identity)
                .map_err(|e| OpError::data(&self.plan.config, e))?;
            let xml_path = format!("{dir}/{clone}.xml");
            let mem_path = format!("{dir}/.{clone}.{s}.mem");
            if self.p.storage.exists(&xml_path).await {
                return Err(OpError::Conflict(format!("{xml_path} exists already")));
            }
            self.journal.files.push(xml_path.clone());
            self.journal.files.push(mem_path.clone());
            self.journal
                .files
                .extend(identity.disks.iter().map(|(_, to)| to.clone()));
            self.save_journal().await?;
            self.p.storage.write_atomic(&xml_path, persistent).await?;
            self.p
                .storage
                .write_clone_image(&self.mem, image.clone(), runtime, &mem_path)
                .await?;
            self.made.push(Made {
                name: clone.clone(),
                identity,
                xml_path,
                mem_path,
            });
        }
        Ok(())
    }

    fn identity(&self, clone: &str, image: &SaveImage) -> CloneIdentity {
        let env = &self.p.env;
        let random16 = || {
            let mut b = [0u8; 16];
            env.random(&mut b);
            b
        };
        let uuid = model::uuid_from(random16());
        let genid = model::uuid_from(random16());
        let macs = (0..interfaces(&image.xml))
            .map(|_| {
                let mut b = [0u8; 3];
                env.random(&mut b);
                model::mac_from(b)
            })
            .collect();
        CloneIdentity {
            template: self.plan.template.clone(),
            name: clone.to_string(),
            uuid,
            genid,
            macs,
            disks: self
                .renames
                .iter()
                .map(|(dev, frozen, _)| (frozen.clone(), format!("{}/{clone}.{dev}.qcow2", dir_of(frozen))))
                .collect(),
        }
    }

    /// Creates the clones' disk overlays on the frozen layers, on the target host.
    async fn create_overlays(&mut self) -> Result<(), OpError> {
        let overlays: Vec<(String, String)> = self
            .made
            .iter()
            .flat_map(|m| m.identity.disks.iter().cloned())
            .collect();
        self.p.hypervisor.create_overlays(&self.plan.target, overlays).await?;
        Ok(())
    }

    /// Restores every clone on the target host at once; the save images go afterwards, whatever happened.
    async fn restore_clones(&mut self) -> Result<(), OpError> {
        self.journal.domains.extend(self.made.iter().map(|m| m.name.clone()));
        self.save_journal().await?;
        let target = &self.plan.target;
        let restores = self
            .made
            .iter()
            .map(|m| self.p.hypervisor.restore(target, m.mem_path.clone()));
        let results = futures_util::future::join_all(restores).await;
        let mut failures: Vec<String> = results
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        // The images hold the template's memory: none may stay behind, or the clone fails (and its
        // rollback tries again).
        let images = self.made.iter().map(|m| m.mem_path.as_str()).chain([self.mem.as_str()]);
        for image in images.collect::<Vec<_>>() {
            if let Err(e) = self.p.storage.remove(image).await {
                failures.push(format!("removing the memory image {e}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(OpError::cluster("restoring the clones", failures.join("; ")))
        }
    }

    /// Resumes the template's guest. Its application waits for this: a failed request is repeated, and
    /// when the guest never confirms, the clone fails (and its rollback asks once more).
    async fn resume_template(&mut self) -> Result<(), OpError> {
        let at = Instant::now();
        if self.journal.prepared {
            let tpl = &self.plan.template;
            self.progress.progress(0.55, &format!("resuming {tpl}'s guest")).await;
            let mut last = Ok(());
            for attempt in 0..RESUME_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let answer = self
                    .p
                    .guests
                    .request(tpl, "resume", "{}".into(), GUEST_DEADLINE_MS)
                    .await;
                last = expect_done(tpl, "resume", answer);
                match &last {
                    Ok(()) => break,
                    Err(e) => tracing::warn!(%tpl, attempt, "resuming the template's guest: {e}"),
                }
            }
            last?;
            self.journal.prepared = false;
            self.save_journal().await?;
        }
        self.t.resume_ms = at.elapsed().as_millis();
        Ok(())
    }

    /// Tells each clone's guest who it is now and waits for its acknowledgement (through the target host's
    /// vmhad, which opens the channel on this request: the clone is not a cluster resource yet).
    async fn announce_identities(&mut self) -> Result<(), OpError> {
        let at = Instant::now();
        self.progress
            .progress(0.65, "telling the clones' guests who they are")
            .await;
        for m in &self.made {
            let data = json!({
                "template": self.plan.template,
                "name": m.name,
                "hostname": m.name,
                "uuid": m.identity.uuid,
                "macs": m.identity.macs,
                "host": self.plan.target,
            })
            .to_string();
            let deadline = Instant::now() + POST_CLONE_WINDOW;
            loop {
                let r = self
                    .p
                    .guests
                    .request_on(
                        &self.plan.target,
                        &m.name,
                        "post-clone",
                        data.clone(),
                        GUEST_DEADLINE_MS,
                    )
                    .await;
                match r {
                    Ok(a) if a.done() => break,
                    Ok(a) => {
                        return Err(OpError::GuestFailed {
                            vm: m.name.clone(),
                            request: "take its clone identity".into(),
                            reason: format!("{}: {}", a.outcome, a.reason),
                        })
                    }
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(clone = %m.name, "post-clone not deliverable yet: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        return Err(OpError::GuestUnreachable {
                            vm: m.name.clone(),
                            request: "take its clone identity".into(),
                            reason: e,
                        })
                    }
                }
            }
        }
        self.t.post_clone_ms = at.elapsed().as_millis();
        Ok(())
    }

    /// Registers the clones as cluster resources with the template's settings, constraints and tags.
    async fn register(&mut self) -> Result<(), OpError> {
        self.progress
            .progress(0.8, "registering the clones as cluster resources")
            .await;
        let tpl = self.plan.template.clone();
        for i in 0..self.made.len() {
            let (clone, xml_path) = (self.made[i].name.clone(), self.made[i].xml_path.clone());
            let cib = self.p.cluster.query().await?;
            let r = model::clone_resource(&cib, &tpl, &clone, &xml_path).map_err(|e| OpError::data("the CIB", e))?;
            self.journal.resources.push(clone.clone());
            self.save_journal().await?;
            self.p
                .cluster
                .apply(CibChange::Create {
                    section: "resources",
                    xml: r.primitive,
                })
                .await?;
            for (tag, id, xml) in r.constraints {
                self.journal.constraints.push((tag, id));
                self.save_journal().await?;
                self.p
                    .cluster
                    .apply(CibChange::Create {
                        section: "constraints",
                        xml,
                    })
                    .await?;
            }
            for tag in r.tags {
                add_to_tag(self.p, &tag, &clone).await?;
            }
        }
        Ok(())
    }

    /// Waits until Pacemaker shows every clone running on the target host.
    async fn wait_clones_running(&self) -> Result<(), OpError> {
        for m in &self.made {
            wait_running_on(self.p, &m.name, &self.plan.target).await?;
        }
        Ok(())
    }
}

/// `Ok` when the guest answered `done`; otherwise the error naming the VM and what it was asked.
fn expect_done(vm: &str, request: &str, answer: Result<GuestAnswer, String>) -> Result<(), OpError> {
    match answer {
        Ok(a) if a.done() => Ok(()),
        Ok(a) if a.outcome == "refused" => Err(OpError::GuestRefused {
            vm: vm.to_string(),
            request: request.to_string(),
            reason: a.reason,
        }),
        Ok(a) => Err(OpError::GuestFailed {
            vm: vm.to_string(),
            request: request.to_string(),
            reason: a.reason,
        }),
        Err(reason) => Err(OpError::GuestUnreachable {
            vm: vm.to_string(),
            request: request.to_string(),
            reason,
        }),
    }
}

/// Another unfinished clone job of `template` in the CIB (`host/key`): any, or with `mine`, one whose key
/// sorts before `mine`.
fn clone_under_way(cib: &str, template: &str, mine: Option<&str>) -> Option<String> {
    journals(cib)
        .into_iter()
        .filter(|j| mine.is_none_or(|m| j.key.as_str() < m))
        .filter(|j| serde_json::from_str::<Journal>(&j.value).is_ok_and(|x| x.template == template && !x.finished))
        .map(|j| format!("job {} on {}", j.key.trim_start_matches(JOURNAL_PREFIX), j.host))
        .next()
}

/// Drops `host`'s journal `key` (retried: a journal left behind of a finished job is only dropped by
/// the next recovery, but one of a rolled-back job would be rolled back again, which is harmless).
pub(crate) async fn clear_journal(p: &Ports, host: &str, key: &str) {
    for attempt in 0..3 {
        let Ok(cib) = p.cluster.query().await else { continue };
        let ids = journal_nvpair_ids(&cib, Some(host), key);
        let mut ok = true;
        for id in ids {
            ok &= drop_journal(p, &id).await;
        }
        if ok {
            return;
        }
        tracing::warn!(%key, attempt, "dropping the journal failed");
    }
}

/// Deletes the journal node attribute whose nvpair id is `id`.
async fn drop_journal(p: &Ports, id: &str) -> bool {
    let xml = format!(r#"<nvpair id="{}"/>"#, change::escape(id));
    p.cluster
        .apply(CibChange::Delete { section: "nodes", xml })
        .await
        .is_ok()
}

/// Ids of the node-attribute nvpairs named `key` (of `host`, or any host).
fn journal_nvpair_ids(cib: &str, host: Option<&str>, key: &str) -> Vec<String> {
    attributes(cib, key)
        .into_iter()
        .filter(|j| j.key == key && host.is_none_or(|x| x == j.host))
        .map(|j| j.id)
        .collect()
}

/// A clone journal found in the CIB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJournal {
    /// The host whose vmhad ran the job.
    pub host: String,
    /// The node attribute's name.
    pub key: String,
    /// The nvpair's id.
    pub id: String,
    pub value: String,
}

/// Every clone journal in the CIB.
pub fn journals(cib: &str) -> Vec<StoredJournal> {
    attributes(cib, JOURNAL_PREFIX)
}

/// Every node attribute whose name starts with `prefix` (the journals of vmha's jobs).
pub fn attributes(cib: &str, prefix: &str) -> Vec<StoredJournal> {
    let Ok(doc) = roxmltree::Document::parse(cib) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for node in doc.descendants().filter(|n| n.has_tag_name("node")) {
        let Some(host) = node.attribute("uname") else { continue };
        for nv in node.descendants().filter(|n| n.has_tag_name("nvpair")) {
            let (Some(name), Some(id)) = (nv.attribute("name"), nv.attribute("id")) else {
                continue;
            };
            if name.starts_with(prefix) {
                out.push(StoredJournal {
                    host: host.to_string(),
                    key: name.to_string(),
                    id: id.to_string(),
                    value: nv.attribute("value").unwrap_or("").to_string(),
                });
            }
        }
    }
    out
}

/// Points the template's definition at its new overlays (those that exist: the capture made them).
async fn follow_overlays(p: &Ports, config: &str, overlays: &[(String, String)]) -> Result<(), OpError> {
    if config.is_empty() || overlays.is_empty() {
        return Ok(());
    }
    let mut xml = p.storage.read_small(config).await?;
    let before = xml.clone();
    for (frozen, new) in overlays {
        if p.storage.exists(new).await {
            xml = xml.replace(&format!("'{frozen}'"), &format!("'{new}'"));
            xml = xml.replace(&format!("\"{frozen}\""), &format!("\"{new}\""));
        }
    }
    if xml != before {
        p.storage.write_atomic(config, xml).await?;
    }
    Ok(())
}

/// Shortens the disk chains of `template` (running on `host`, see [`model::compaction`]) and deletes the
/// layers that left them when no other image uses them. Best effort: a failure leaves a longer chain,
/// which the next clone shortens, and is logged.
pub async fn compact_template(p: &Ports, template: &str, host: &str) {
    let dropped = match p.hypervisor.compact(host, template).await {
        Ok(dropped) => dropped,
        Err(e) => {
            tracing::warn!(%template, "compacting the template's disk chain: {e}");
            return;
        }
    };
    for layer in dropped {
        match p.storage.layer_users(&layer).await {
            Ok(users) if users.is_empty() => {
                if let Err(e) = p.storage.remove(&layer).await {
                    tracing::warn!(%layer, "removing an unused clone layer: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%layer, "cannot tell whether the clone layer is in use: {e}"),
        }
    }
}

fn interfaces(xml: &str) -> usize {
    roxmltree::Document::parse(xml)
        .map(|d| d.descendants().filter(|n| n.has_tag_name("interface")).count())
        .unwrap_or(0)
}

async fn add_to_tag(p: &Ports, tag: &str, member: &str) -> Result<(), OpError> {
    let cib = p.cluster.query().await?;
    let doc = roxmltree::Document::parse(&cib).map_err(|e| OpError::data("the CIB", e))?;
    let Some(node) = doc
        .descendants()
        .find(|n| n.has_tag_name("tag") && n.attribute("id") == Some(tag))
    else {
        return Ok(());
    };
    let mut refs: Vec<String> = node
        .children()
        .filter(|c| c.has_tag_name("obj_ref"))
        .filter_map(|c| c.attribute("id").map(str::to_string))
        .collect();
    refs.push(member.to_string());
    let body: String = refs
        .iter()
        .map(|r| format!(r#"<obj_ref id="{}"/>"#, change::escape(r)))
        .collect();
    p.cluster
        .apply(CibChange::Modify {
            section: "tags",
            xml: format!(r#"<tag id="{}">{body}</tag>"#, change::escape(tag)),
        })
        .await?;
    Ok(())
}

/// Removes `member` from every tag that lists it, and the tags it was the last member of (as `pcs
/// resource delete` does: a tag needs at least one member), in one replace of the `tags` section.
pub(crate) async fn remove_from_tags(p: &Ports, member: &str) -> Result<(), OpError> {
    let cib = p.cluster.query().await?;
    let doc = roxmltree::Document::parse(&cib).map_err(|e| OpError::data("the CIB", e))?;
    let Some(section) = doc.descendants().find(|n| n.has_tag_name("tags")) else {
        return Ok(());
    };
    let listed = section
        .descendants()
        .any(|n| n.has_tag_name("obj_ref") && n.attribute("id") == Some(member));
    if !listed {
        return Ok(());
    }
    let mut xml = String::from("<tags>");
    for tag in section.children().filter(|n| n.has_tag_name("tag")) {
        let refs: Vec<&str> = tag
            .children()
            .filter(|c| c.has_tag_name("obj_ref"))
            .filter_map(|c| c.attribute("id"))
            .filter(|id| *id != member)
            .collect();
        if refs.is_empty() {
            continue;
        }
        xml.push_str(&format!(
            r#"<tag id="{}">"#,
            change::escape(tag.attribute("id").unwrap_or(""))
        ));
        for r in refs {
            xml.push_str(&format!(r#"<obj_ref id="{}"/>"#, change::escape(r)));
        }
        xml.push_str("</tag>");
    }
    xml.push_str("</tags>");
    p.cluster.apply(CibChange::Replace { section: "tags", xml }).await?;
    Ok(())
}

async fn wait_running_on(p: &Ports, vm: &str, host: &str) -> Result<(), OpError> {
    let what = format!("waiting for {vm} to run on {host}");
    p.wait_until(p.cluster.job_deadline(), |snap| {
        let v = snap.view.as_ref()?.vm(vm)?;
        match v.state {
            VmState::Running if v.hosts == [host.to_string()] => Some(Ok(())),
            VmState::Running if !v.hosts.is_empty() => Some(Err(OpError::cluster(
                what.clone(),
                format!("{vm} runs on {}, not {host}", v.hosts.join(",")),
            ))),
            VmState::Failed => Some(Err(OpError::cluster(what.clone(), format!("VM {vm} failed")))),
            _ => None,
        }
    })
    .await
    .map_err(|e| OpError::cluster(what.clone(), e))?
}

/// The host `vm` runs on, when it runs on exactly one.
fn running_host(p: &Ports, vm: &str) -> Option<String> {
    let snap = p.cluster.snapshot();
    let v = snap.view.as_ref()?.vm(vm)?;
    (v.hosts.len() == 1).then(|| v.hosts[0].clone())
}

/// Undoes what `journal` records: clone resources and constraints, clone domains, files; resumes the
/// template's guest when it was left prepared. Goes on after a failure; `Err` lists what could not be
/// undone.
pub async fn rollback(p: &Ports, journal: &Journal) -> Result<(), String> {
    let mut errors = Vec::new();
    // The template's definition follows the overlays the capture moved it to, unless it runs from the
    // frozen layer again (its host died before the definition named the overlays, and Pacemaker started
    // it elsewhere from the old one): then those overlays are stale, and go.
    let template_host = running_host(p, &journal.template);
    let active: Option<Vec<String>> = match &template_host {
        Some(h) => match p.hypervisor.disk_chains(h, &journal.template).await {
            Ok(chains) => Some(chains.into_iter().filter_map(|(_, c)| c.into_iter().next()).collect()),
            Err(e) => {
                tracing::warn!(template = %journal.template, "reading the template's disks: {e}");
                None
            }
        },
        None => None,
    };
    let (stale, follow): (Vec<_>, Vec<_>) = journal
        .overlays
        .iter()
        .cloned()
        .partition(|(frozen, new)| active.as_ref().is_some_and(|a| a.contains(frozen) && !a.contains(new)));
    if let Err(e) = follow_overlays(p, &journal.config, &follow).await {
        errors.push(e.to_string());
    }
    for (_, new) in &stale {
        tracing::warn!(template = %journal.template, overlay = %new, "the template runs from its frozen layer again; its stale overlay goes");
        if let Err(e) = p.storage.remove(new).await {
            errors.push(e.to_string());
        }
    }
    for (tag, id) in &journal.constraints {
        let xml = format!(r#"<{tag} id="{}"/>"#, change::escape(id));
        let _ = p
            .cluster
            .apply(CibChange::Delete {
                section: "constraints",
                xml,
            })
            .await;
    }
    for r in &journal.resources {
        if let Err(e) = remove_from_tags(p, r).await {
            tracing::warn!(vm = %r, "removing a rolled-back clone from its tags: {e}");
        }
        // Unmanage first is not needed: the domain is destroyed below, and the resource goes now.
        let xml = format!(r#"<primitive id="{}"/>"#, change::escape(r));
        if let Err(e) = p
            .cluster
            .apply(CibChange::Delete {
                section: "resources",
                xml,
            })
            .await
        {
            if !e.message.contains("No such") && !e.message.contains("not found") {
                errors.push(e.to_string());
            }
        }
    }
    if !journal.domains.is_empty() {
        if let Err(e) = p.hypervisor.destroy_all(&journal.target, journal.domains.clone()).await {
            errors.push(e.to_string());
        }
    }
    for f in &journal.files {
        if let Err(e) = p.storage.remove(f).await {
            errors.push(e.to_string());
        }
    }
    // The template moved to new overlays in the capture: its frozen layer, which no clone uses now,
    // goes back into them (wherever the template runs now).
    if !journal.overlays.is_empty() {
        // Read again: wherever the template runs now.
        if let Some(host) = running_host(p, &journal.template) {
            compact_template(p, &journal.template, &host).await;
        }
    }
    if journal.prepared {
        let answer = p
            .guests
            .request(&journal.template, "resume", "{}".into(), GUEST_DEADLINE_MS)
            .await;
        if let Err(e) = expect_done(&journal.template, "resume", answer) {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Rolls back the clone journals left by a vmhad that stopped in the middle of a clone: this host's own
/// (at start) and, on the DC, those of hosts whose vmhad is gone. A finished job's journal is only
/// dropped.
pub async fn recover(p: &Ports) {
    for j in orphaned(p, JOURNAL_PREFIX).await {
        let (host, key) = (&j.host, &j.key);
        let journal = match serde_json::from_str::<Journal>(&j.value) {
            Ok(journal) => journal,
            Err(_) => {
                tracing::warn!(%host, %key, "dropping an unreadable clone journal");
                drop_journal(p, &j.id).await;
                continue;
            }
        };
        if journal.finished {
            tracing::info!(%host, %key, "dropping the journal of a clone that finished");
            drop_journal(p, &j.id).await;
            continue;
        }
        tracing::warn!(%host, %key, template = %journal.template, "rolling back an interrupted clone");
        match rollback(p, &journal).await {
            Ok(()) => tracing::info!(%key, "interrupted clone rolled back"),
            Err(e) => tracing::warn!(%key, "rolling back an interrupted clone: {e}"),
        }
        drop_journal(p, &j.id).await;
    }
}

/// The journals (node attributes named `prefix...`) this vmhad must recover: its own host's (a vmhad that
/// stopped midway) and, on the DC, those of hosts whose vmhad is gone.
pub(crate) async fn orphaned(p: &Ports, prefix: &str) -> Vec<StoredJournal> {
    let snap = p.cluster.snapshot();
    let local = p.cluster.local_host();
    let i_am_dc = snap.dc() == Some(local);
    let agents = snap.membership.as_ref().map(|m| m.agents.clone());
    let Ok(cib) = p.cluster.query().await else {
        return Vec::new();
    };
    attributes(&cib, prefix)
        .into_iter()
        .filter(|j| j.host == local || (i_am_dc && agents.as_ref().is_some_and(|a| !a.contains(&j.host))))
        .collect()
}

/// Follows the cluster and rolls back interrupted clones: once at start (after the first CIB view), then
/// whenever the set of hosts running vmhad shrinks or the DC changes (a host that dies with its vmhad
/// midway is usually the DC itself, and the new DC is elected after its vmhad left).
pub async fn follow_journals(p: Ports) {
    let mut rx = p.cluster.subscribe();
    let mut last_agents: Option<Vec<String>> = None;
    let mut last_dc: Option<String> = None;
    let mut first = true;
    loop {
        let snap = rx.borrow_and_update().clone();
        if snap.view.is_some() {
            let agents = snap.membership.as_ref().map(|m| m.agents.clone());
            let shrank = match (&last_agents, &agents) {
                (Some(a), Some(b)) => a.iter().any(|h| !b.contains(h)),
                _ => false,
            };
            let dc = snap.dc().map(str::to_string);
            let dc_changed = dc.is_some() && dc != last_dc;
            if first || shrank || dc_changed {
                first = false;
                recover(&p).await;
                crate::group::recover(&p).await;
                crate::vcluster::recover(&p).await;
            }
            if agents.is_some() {
                last_agents = agents;
            }
            if dc.is_some() {
                last_dc = dc;
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// `vmha vm remove --destroy`: after the resource is gone, deletes a clone's domain XML file and disk
/// overlays, and the frozen template layers they were on once no other image uses them (so that cloning
/// a template again and again leaves no layers behind). Refuses VMs that are not clones (their disks are
/// not vmha's to delete).
pub async fn destroy_files(p: &Ports, config: &str) -> Result<Vec<String>, OpError> {
    let xml = p.storage.read_small(config).await?;
    let Some(template) = model::clone_of(&xml) else {
        return Err(OpError::Invalid(format!(
            "{config} is not a vmha clone; --destroy deletes only clones"
        )));
    };
    let mut removed = Vec::new();
    // Every layer is known before anything goes: an unreadable header must not leave an unused template
    // layer behind.
    let disks: Vec<String> = model::writable_disks(&xml)
        .map_err(|e| OpError::data(config, e))?
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let mut layers = Vec::new();
    for disk in &disks {
        if let Some(backing) = p.storage.backing_of(disk).await? {
            layers.push(backing);
        }
    }
    // What goes goes as far as it can, and the layers below are looked at whatever failed: a second try
    // would no longer know them.
    let mut errors = Vec::new();
    for disk in disks {
        match p.storage.remove(&disk).await {
            Ok(true) => removed.push(disk),
            Ok(false) => {}
            Err(e) => errors.push(e),
        }
    }
    // The domain XML file goes last, and only once every disk went: a second try reads the disks from it.
    if errors.is_empty() {
        match p.storage.remove(config).await {
            Ok(_) => removed.push(config.to_string()),
            Err(e) => errors.push(e),
        }
    }
    let dirs = model::writable_disks(&xml)
        .unwrap_or_default()
        .iter()
        .map(|(_, d)| dir_of(d))
        .collect();
    removed.extend(remove_unused_layers(p, &template, layers, dirs).await);
    match errors.into_iter().next() {
        None => Ok(removed),
        Some(e) => Err(e.into()),
    }
}

/// Removes the template layers nothing uses any more: `known` (those a destroyed clone's disks named) and
/// (a second try after a crash no longer knows those: the disks are gone) every layer vmha made for
/// `template` in `dirs` that the template does not run on or name. Returns what went.
pub async fn remove_unused_layers(
    p: &Ports,
    template: &str,
    known: Vec<String>,
    dirs: std::collections::BTreeSet<String>,
) -> Vec<String> {
    let mut candidates: std::collections::BTreeSet<String> = known.into_iter().collect();
    if let Some(protected) = template_layers(p, template).await {
        for dir in dirs {
            match p.storage.list_dir(&dir).await {
                Ok(files) => candidates.extend(files.into_iter().filter(|f| !protected.contains(f))),
                Err(e) => tracing::warn!(%dir, "listing the clone layers: {e}"),
            }
        }
    }
    let mut removed = Vec::new();
    for layer in candidates {
        if !model::is_clone_layer(template, &base_of(&layer)) {
            continue;
        }
        match p.storage.layer_users(&layer).await {
            Ok(users) if users.is_empty() => match p.storage.remove(&layer).await {
                Ok(true) => removed.push(layer),
                Ok(false) => {}
                Err(e) => tracing::warn!(%layer, "removing an unused clone layer: {e}"),
            },
            Ok(users) => tracing::debug!(%layer, ?users, "clone layer still in use"),
            Err(e) => tracing::warn!(%layer, "cannot tell whether the clone layer is in use: {e}"),
        }
    }
    removed
}

/// Every layer `template` runs on (its whole chain, where it runs) and names in its definition; `None`
/// when that cannot be known (then no layer is taken for unused on its name alone).
async fn template_layers(p: &Ports, template: &str) -> Option<std::collections::BTreeSet<String>> {
    let snap = p.cluster.snapshot();
    let vm = snap.view.as_ref()?.vm(template)?;
    let mut out = std::collections::BTreeSet::new();
    let config = vm.config.clone()?;
    let xml = p.storage.read_small(&config).await.ok()?;
    out.extend(model::writable_disks(&xml).ok()?.into_iter().map(|(_, d)| d));
    for host in &vm.hosts {
        let chains = p.hypervisor.disk_chains(host, template).await.ok()?;
        out.extend(chains.into_iter().flat_map(|(_, c)| c));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_are_found_per_host() {
        let cib = r#"<cib><configuration><nodes>
            <node id="1" uname="a"><instance_attributes id="a-ia">
              <nvpair id="a-j" name="vmha-clone-journal-7" value="{&quot;template&quot;:&quot;vm1&quot;}"/>
              <nvpair id="a-s" name="standby" value="off"/>
            </instance_attributes></node>
            <node id="2" uname="b"/>
        </nodes></configuration></cib>"#;
        let found = journals(cib);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].host, "a");
        assert_eq!(found[0].key, "vmha-clone-journal-7");
        let j: Journal = serde_json::from_str(&found[0].value).unwrap();
        assert_eq!(j.template, "vm1");
        assert!(!j.finished);
        assert_eq!(
            journal_nvpair_ids(cib, Some("b"), "vmha-clone-journal-7"),
            Vec::<String>::new()
        );
        assert_eq!(journal_nvpair_ids(cib, None, "vmha-clone-journal-7"), ["a-j"]);
        assert_eq!(
            journal_nvpair_ids(cib, Some("a"), "vmha-clone-journal-8"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn paths_split_into_directory_and_name() {
        assert_eq!(dir_of("/x/y/z.qcow2"), "/x/y");
        assert_eq!(base_of("/x/y/z.qcow2"), "z.qcow2");
        assert_eq!(dir_of("z.qcow2"), ".");
        assert_eq!(base_of("z.qcow2"), "z.qcow2");
    }
}
