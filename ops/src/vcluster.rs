//! Virtual clusters: `instantiate` (an archive's virtual cluster created on this cluster) and `capture`
//! (a virtual cluster written into an archive), one function per step over the ports. The archive format,
//! the capture of the CIB and the translation plan are the `vmha-vcluster` crate's; the archive stream
//! itself is read or written through [`ArchiveSource`] and [`ArchiveSink`] (vmhad: a file and a thread;
//! the simulator: bytes in memory).
//!
//! Instantiate is journaled like a clone: a node attribute of the job's host lists, before each step,
//! what the step may create (the staged and final name of every file, the CIB elements), and what it
//! placed. A failure rolls back exactly that: the CIB elements (then waits for their domains to stop),
//! then the files whose final name it placed (or whose final name is a hard link of its staged file: the
//! link was made, the journal not yet updated), then the staged files. A vmhad killed midway does so
//! when it starts again ([`recover`]), or the DC when that host's vmhad is gone.
//!
//! Capture with `halt` journals the members' target-roles before it stops them; a failure, or a restarted
//! vmhad finding the journal, puts them back.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vmha_model::change::{self, escape};
use vmha_model::{ClusterView, VmState};
use vmha_vcluster::archive::{DiskStats, Manifest, Verified};
use vmha_vcluster::capture::{self as vcapture, configuration_ids, Captured};
use vmha_vcluster::domain_check::Allow;
use vmha_vcluster::printable;
use vmha_vcluster::signature::Trust;
use vmha_vcluster::translate::{domain_disks, plan, Maps, Plan, Target};

use crate::clone::{self, clear_journal, orphaned};
use crate::error::OpError;
use crate::ports::{BoxFuture, CibChange, Ports, Progress};
use crate::vm::set_node_attribute;

/// The node attribute (prefix) of an instantiate's journal.
pub const JOURNAL_PREFIX: &str = "vmha-instantiate-journal-";
/// The node attribute (prefix) of a capture's journal (the target-roles it changed).
pub const CAPTURE_JOURNAL_PREFIX: &str = "vmha-capture-journal-";
/// What the name of a file staged by an instantiate ends with.
pub const STAGED_SUFFIX: &str = ".vmha-partial";
/// How long a rollback waits for the domains of the resources it deleted to stop.
const STOP_WAIT: Duration = Duration::from_secs(120);
/// How long a capture with `halt` waits for the members to stop.
const HALT_WAIT: Duration = Duration::from_secs(300);

/// The archive an instantiate reads, once, front to back.
pub trait ArchiveSource: Send {
    /// Reads the archive up to its disk data: the manifest (its signature checked against the trust)
    /// and the metadata, each checked. `Err`: the archive is refused.
    fn head(&mut self) -> BoxFuture<'_, Result<Verified, String>>;
    /// Reads the rest: disk `id`'s data into `files[id]` (`None`: write nowhere, only check), and
    /// checks every chunk and the chunk list. `Err`: the archive is refused.
    fn rest(&mut self, files: Option<BTreeMap<u32, std::fs::File>>) -> BoxFuture<'_, Result<(), String>>;
}

/// The archive a capture writes.
pub trait ArchiveSink: Send {
    /// Opens the disks to copy (vm, path), before anything changes: a missing disk fails the capture
    /// then.
    fn open_disks(&mut self, disks: Vec<(String, String)>) -> BoxFuture<'_, Result<(), OpError>>;
    /// Writes the whole archive (the disks opened, with their sizes now) and syncs it.
    fn write<'a>(
        &'a mut self,
        c: &'a Captured,
        metadata: &'a BTreeMap<String, Vec<u8>>,
        placement: BTreeMap<String, String>,
        consistency: &'a str,
    ) -> BoxFuture<'a, Result<(Manifest, Vec<DiskStats>), OpError>>;
}

/// What an instantiate is asked to do.
#[derive(Debug, Clone)]
pub struct InstantiateSpec {
    /// `KIND=OLD:NEW` specifications (see [`Maps::parse`]).
    pub maps: Vec<String>,
    pub name: Option<String>,
    /// `--allow` categories and `agent=CLASS:PROVIDER:TYPE` items (see [`Allow::parse`]).
    pub allow: Vec<String>,
    pub dry_run: bool,
    /// How long to wait for the VMs to run (zero: do not wait).
    pub wait: Duration,
    /// The keys trusted and whether a signature is required.
    pub trust: Trust,
}

/// How an instantiate went: the plan (once the archive's head was read) and the problems the target
/// has, then the outcome.
#[derive(Debug)]
pub struct Instantiated {
    pub plan: Option<Plan>,
    pub problems: Vec<String>,
    pub result: Result<String, OpError>,
}

impl Instantiated {
    /// The plan and problems as JSON (the job's details).
    pub fn details(&self) -> Value {
        json!({
            "plan": self.plan,
            "plan_text": self.plan.as_ref().map(Plan::text),
            "problems": self.problems,
        })
    }
}

/// An instantiate's journal: everything it may have created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstantiateJournal {
    /// The virtual cluster's name here.
    pub name: String,
    /// The storage roots the files are confined to.
    pub roots: Vec<String>,
    /// (staged name, final name) of every file it writes, in order; written before the first is made.
    pub files: Vec<(String, String)>,
    /// The final names it placed.
    pub placed: Vec<String>,
    /// (section, `<tag id=".."/>`) of every CIB element it creates; written before the CIB change.
    pub cib: Vec<(String, String)>,
    /// The VMs it creates (their domains must be gone before their files are).
    pub vms: Vec<String>,
    /// The job ended well; the journal is only dropped.
    pub finished: bool,
    /// The host had no node attributes before the journal: the set the journal made goes with it.
    #[serde(default)]
    pub made_set: bool,
}

/// The hidden name a file is written under until it is complete: next to its destination (a link in
/// the same directory puts it in place), named after the job.
pub fn staged_name(to: &str, job_id: &str) -> String {
    let (dir, base) = to.rsplit_once('/').unwrap_or(("", to));
    format!("{dir}/.{base}.{job_id}{STAGED_SUFFIX}")
}

fn rejected(e: impl std::fmt::Display) -> OpError {
    OpError::data("the archive was rejected", e)
}

/// Instantiates the archive `archive` on this cluster: plans it against the CIB and this host, then
/// (unless a dry run) journals, stages the disks, reads them, places the disks and the domain
/// definitions, makes one CIB change and waits for the VMs. On any failure what it created is removed.
pub async fn instantiate(
    p: &Ports,
    progress: &dyn Progress,
    spec: &InstantiateSpec,
    archive: &mut dyn ArchiveSource,
    job_id: &str,
) -> Instantiated {
    let mut run = InstantiateRun {
        p,
        progress,
        spec,
        key: format!("{JOURNAL_PREFIX}{job_id}"),
        job_id: job_id.to_string(),
        journal: InstantiateJournal::default(),
        journaled: false,
        plan: None,
        problems: Vec::new(),
    };
    let result = match run.steps(archive).await {
        Ok(m) => {
            if run.journaled {
                run.journal.finished = true;
                // A journal marked finished is only dropped by a recovery; a failed mark leaves one that
                // would roll back a finished instantiate, so the job fails then.
                match run.save_journal().await {
                    Ok(()) => {
                        drop_journal(p, p.cluster.local_host(), &run.key, run.journal.made_set).await;
                        Ok(m)
                    }
                    Err(e) => run.fail(e).await,
                }
            } else {
                Ok(m)
            }
        }
        Err(e) => run.fail(e).await,
    };
    Instantiated {
        plan: run.plan,
        problems: run.problems,
        result,
    }
}

struct InstantiateRun<'a> {
    p: &'a Ports,
    progress: &'a dyn Progress,
    spec: &'a InstantiateSpec,
    key: String,
    job_id: String,
    journal: InstantiateJournal,
    /// The journal was written (so there may be something to roll back).
    journaled: bool,
    plan: Option<Plan>,
    problems: Vec<String>,
}

impl InstantiateRun<'_> {
    async fn fail(&mut self, e: OpError) -> Result<String, OpError> {
        if !self.journaled {
            return Err(e);
        }
        self.progress
            .progress(0.95, &format!("instantiate failed, removing what it created: {e}"))
            .await;
        let undo = rollback(self.p, &self.journal).await;
        drop_journal(self.p, self.p.cluster.local_host(), &self.key, self.journal.made_set).await;
        Err(match undo {
            Ok(()) => OpError::Undone {
                error: Box::new(e),
                what: "instantiate failed, removing what it created: done".into(),
            },
            Err(u) => OpError::RollbackIncomplete {
                error: Box::new(e),
                undo: u,
            },
        })
    }

    async fn steps(&mut self, archive: &mut dyn ArchiveSource) -> Result<String, OpError> {
        let (maps, target) = self.read_target().await?;
        let roots = maps.roots();
        self.progress.progress(0.02, "reading and checking the archive").await;
        let head = archive.head().await.map_err(rejected)?;
        self.plan(&head, &maps, &target).await?;
        if self.spec.dry_run {
            archive.rest(None).await.map_err(rejected)?;
            return Ok("dry run: nothing changed".into());
        }
        let p = self.plan.clone().ok_or_else(|| OpError::data("the plan", "missing"))?;
        self.begin_journal(&p, roots).await?;
        let files = self.stage_disks(&p).await?;
        self.progress.progress(0.1, "reading the disks").await;
        archive.rest(Some(files)).await.map_err(rejected)?;
        self.progress
            .progress(0.82, "placing the disks and domain definitions")
            .await;
        self.stage_domains(&p).await?;
        self.place_files().await?;
        self.create_in_cib(&p).await?;
        self.wait_running().await?;
        Ok(format!("virtual cluster {} instantiated", p.name))
    }

    /// The maps asked for, and what this cluster has (hosts, CIB ids).
    async fn read_target(&mut self) -> Result<(Maps, Target), OpError> {
        let mut maps =
            Maps::parse(&self.spec.maps, self.spec.name.clone()).map_err(|e| OpError::Invalid(e.to_string()))?;
        maps.allow = Allow::parse(&self.spec.allow).map_err(OpError::Invalid)?;
        self.progress.progress(0.0, "reading the CIB").await;
        let cib = self.p.cluster.query().await?;
        let view = ClusterView::from_cib(&cib).map_err(|e| OpError::data("the CIB", e))?;
        let target = Target {
            hosts: view.hosts.iter().map(|h| h.name.clone()).collect(),
            ids: configuration_ids(&cib).map_err(|e| OpError::data("the CIB", e))?,
        };
        Ok((maps, target))
    }

    /// The plan, and what this host's storage and libvirt say against it.
    async fn plan(&mut self, head: &Verified, maps: &Maps, target: &Target) -> Result<(), OpError> {
        let p = plan(head, maps, target).map_err(rejected)?;
        let problems = self.check_target(&p).await?;
        self.progress
            .progress(
                0.05,
                &format!(
                    "planned: {} resources, {} domains, {} disks",
                    p.resources.len(),
                    p.domains.len(),
                    p.disks.len()
                ),
            )
            .await;
        self.problems = problems.clone();
        self.plan = Some(p);
        if !problems.is_empty() {
            return Err(OpError::Conflict(format!(
                "the archive was rejected: the target is not ready: {}",
                problems.join("; ")
            )));
        }
        Ok(())
    }

    /// Storage directories and free file names, then libvirt's domains, networks and bridges.
    async fn check_target(&self, p: &Plan) -> Result<Vec<String>, OpError> {
        let mut problems = Vec::new();
        let mut paths: Vec<&str> = p.domains.iter().map(|d| d.path.as_str()).collect();
        paths.extend(p.disks.iter().map(|d| d.to.as_str()));
        for path in paths {
            let dir = path
                .rsplit_once('/')
                .map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
            if self.p.storage.lexists(path).await {
                problems.push(format!("{} exists already", printable(path)));
            } else if !self.p.storage.is_dir(dir).await {
                problems.push(format!(
                    "storage directory {} is missing (map it with --map storage=OLD:NEW)",
                    printable(dir)
                ));
            }
        }
        let domains = p.domains.iter().map(|d| (d.vm.clone(), d.xml.clone())).collect();
        let host = self.p.cluster.local_host().to_string();
        problems.extend(self.p.hypervisor.domain_problems(&host, domains).await?);
        Ok(problems)
    }

    async fn save_journal(&self) -> Result<(), OpError> {
        let value = serde_json::to_string(&self.journal).map_err(|e| OpError::data("the journal", e))?;
        set_node_attribute(self.p, self.p.cluster.local_host(), &self.key, &value, "the journal").await
    }

    /// Room for the disks, then the journal naming every file it will write and every CIB element it
    /// will create, before any is.
    async fn begin_journal(&mut self, p: &Plan, roots: Vec<String>) -> Result<(), OpError> {
        let disks = p.disks.iter().map(|d| (d.to.clone(), d.size)).collect();
        self.p.storage.check_free_space(disks, &roots).await?;
        let mut files: Vec<(String, String)> = Vec::new();
        for to in p.disks.iter().map(|d| &d.to).chain(p.domains.iter().map(|d| &d.path)) {
            files.push((staged_name(to, &self.job_id), to.clone()));
        }
        self.journal = InstantiateJournal {
            name: p.name.clone(),
            roots,
            files,
            placed: Vec::new(),
            cib: created_elements(&p.cib_fragment)?,
            vms: p.domains.iter().map(|d| d.vm.clone()).collect(),
            finished: false,
            made_set: !has_node_attributes(&self.p.cluster.query().await?, self.p.cluster.local_host()),
        };
        // Journaled before the write: a write that fails after reaching the CIB still gets rolled back.
        self.journaled = true;
        self.save_journal().await
    }

    /// Creates every disk's staged file (the archive's data goes there).
    async fn stage_disks(&mut self, p: &Plan) -> Result<BTreeMap<u32, std::fs::File>, OpError> {
        let mut files = BTreeMap::new();
        for d in &p.disks {
            let stage = staged_name(&d.to, &self.job_id);
            if let Some(f) = self.p.storage.create_new(&stage, &self.journal.roots).await? {
                files.insert(d.id, f);
            }
        }
        Ok(files)
    }

    /// Writes every domain definition under its staged name.
    async fn stage_domains(&mut self, p: &Plan) -> Result<(), OpError> {
        for d in &p.domains {
            let stage = staged_name(&d.path, &self.job_id);
            self.p
                .storage
                .write_new(&stage, &self.journal.roots, d.xml.clone())
                .await?;
        }
        Ok(())
    }

    /// Links every staged file into place (never replacing a file that appeared meanwhile), journals them
    /// all in one write, then drops the staged names. Until that write a rollback knows a placed file by
    /// its final name being a hard link of its staged one (one journal write per file cost a CIB change
    /// each: 50 domain files took 5 s).
    async fn place_files(&mut self) -> Result<(), OpError> {
        let roots = self.journal.roots.clone();
        let files = self.journal.files.clone();
        let mut linked = Ok(());
        for (stage, to) in &files {
            linked = self.p.storage.link_new(stage, to, &roots).await;
            if linked.is_err() {
                break;
            }
            self.journal.placed.push(to.clone());
        }
        if !self.journal.placed.is_empty() {
            self.save_journal().await?;
        }
        linked?;
        for (stage, _) in &files {
            self.p.storage.remove_confined(stage, &roots).await?;
        }
        Ok(())
    }

    /// The resources, constraints and tag in one CIB change (their ids checked free once more).
    async fn create_in_cib(&mut self, p: &Plan) -> Result<(), OpError> {
        self.progress
            .progress(0.85, "creating the resources, constraints and tag (one CIB change)")
            .await;
        let cib = self.p.cluster.query().await?;
        let ids = configuration_ids(&cib).map_err(|e| OpError::data("the CIB", e))?;
        let taken: Vec<&str> = self
            .journal
            .cib
            .iter()
            .filter_map(|(_, xml)| element_id(xml))
            .filter(|id| ids.contains(*id))
            .collect();
        if !taken.is_empty() {
            // Not ours to delete: off the journal before it fails.
            let taken: Vec<String> = taken.iter().map(|s| s.to_string()).collect();
            self.journal.cib.clear();
            self.save_journal().await?;
            return Err(OpError::Conflict(format!(
                "ids already in use on this cluster: {}",
                taken.join(", ")
            )));
        }
        self.p
            .cluster
            .apply(CibChange::Modify {
                section: "configuration",
                xml: p.cib_fragment.clone(),
            })
            .await?;
        Ok(())
    }

    /// Waits until every VM whose captured target-role is not Stopped runs.
    async fn wait_running(&mut self) -> Result<(), OpError> {
        if self.spec.wait.is_zero() {
            return Ok(());
        }
        self.progress
            .progress(0.9, "waiting for the virtual cluster to run")
            .await;
        let cib = self.p.cluster.query().await?;
        let expect: Vec<String> = self
            .journal
            .vms
            .iter()
            .filter(|v| target_role(&cib, v).is_none_or(|(_, r)| !r.eq_ignore_ascii_case("stopped")))
            .cloned()
            .collect();
        self.p
            .wait_until(self.spec.wait, |snap| {
                let view = snap.view.as_ref()?;
                expect
                    .iter()
                    .all(|n| view.vm(n).is_some_and(|vm| vm.state == VmState::Running))
                    .then_some(())
            })
            .await
            .map_err(|e| OpError::cluster("virtual cluster running", e))
    }
}

fn element_id(xml: &str) -> Option<&str> {
    let start = xml.find(" id=\"")? + 5;
    let end = xml[start..].find('"')? + start;
    Some(&xml[start..end])
}

/// The (section, `<tag id=".."/>`) of every element the CIB fragment creates, tags first (they refer
/// to the resources), then constraints, then resources: the order they are deleted in.
fn created_elements(fragment: &str) -> Result<Vec<(String, String)>, OpError> {
    let doc = roxmltree::Document::parse(fragment).map_err(|e| OpError::data("the plan's CIB change", e))?;
    let mut out = Vec::new();
    for section in ["tags", "constraints", "resources"] {
        if let Some(s) = doc.root_element().children().find(|n| n.has_tag_name(section)) {
            for el in s.children().filter(|n| n.is_element()) {
                out.push((
                    section.to_string(),
                    format!(
                        "<{} id=\"{}\"/>",
                        el.tag_name().name(),
                        escape(el.attribute("id").unwrap_or(""))
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Removes what the journal says an instantiate created: its CIB elements (those there), then, once
/// their domains stopped, its files, last made first. `Err` lists what is left.
pub async fn rollback(p: &Ports, j: &InstantiateJournal) -> Result<(), String> {
    let mut left = Vec::new();
    if !j.cib.is_empty() {
        match p.cluster.query().await {
            Ok(cib) => {
                let ids = configuration_ids(&cib).unwrap_or_default();
                for (section, xml) in &j.cib {
                    if !element_id(xml).is_some_and(|id| ids.contains(id)) {
                        continue;
                    }
                    let section: &'static str = match section.as_str() {
                        "tags" => "tags",
                        "constraints" => "constraints",
                        _ => "resources",
                    };
                    let change = CibChange::Delete {
                        section,
                        xml: xml.clone(),
                    };
                    if let Err(e) = p.cluster.apply(change).await {
                        left.push(format!("{xml} in {section}: {e}"));
                    }
                }
            }
            Err(e) => left.push(format!("the CIB elements: {e}")),
        }
    }
    // The domains must be gone before their files are.
    let stopped = p
        .wait_until(STOP_WAIT, |snap| {
            let view = snap.view.as_ref()?;
            j.vms
                .iter()
                .all(|n| view.vm(n).is_none_or(|vm| vm.hosts.is_empty()))
                .then_some(())
        })
        .await;
    if let Err(e) = stopped {
        left.push(format!("the VMs stopping: {e}"));
        // Their files stay: a running domain's disk is not removed under it.
        return Err(left.join("; "));
    }
    for (stage, to) in j.files.iter().rev() {
        let staged_here = p.storage.lexists(stage).await;
        let ours = j.placed.contains(to) || (staged_here && p.storage.same_file(stage, to).await);
        if ours {
            if let Err(e) = p.storage.remove_confined(to, &j.roots).await {
                left.push(e.to_string());
            }
        }
        if staged_here {
            if let Err(e) = p.storage.remove_confined(stage, &j.roots).await {
                left.push(e.to_string());
            }
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(left.join("; "))
    }
}

/// Whether `host`'s node has a set of node attributes (`instance_attributes`).
fn has_node_attributes(cib: &str, host: &str) -> bool {
    node_attribute_sets(cib, host).next().is_some()
}

/// The ids of `host`'s node attribute sets, and whether each is empty.
fn node_attribute_sets<'a>(cib: &'a str, host: &'a str) -> impl Iterator<Item = (String, bool)> + 'a {
    let doc = roxmltree::Document::parse(cib).ok();
    let sets: Vec<(String, bool)> = doc
        .iter()
        .flat_map(|d| d.descendants())
        .filter(|n| n.has_tag_name("node") && n.attribute("uname") == Some(host))
        .filter(|n| n.ancestors().any(|a| a.has_tag_name("configuration")))
        .flat_map(|n| n.children().filter(|c| c.has_tag_name("instance_attributes")))
        .map(|s| {
            (
                s.attribute("id").unwrap_or("").to_string(),
                !s.children().any(|c| c.is_element()),
            )
        })
        .collect();
    sets.into_iter()
}

/// Drops `host`'s journal `key`; with `made_set`, also the set of node attributes the journal made,
/// once empty (so that the CIB's configuration is as before).
async fn drop_journal(p: &Ports, host: &str, key: &str, made_set: bool) {
    clear_journal(p, host, key).await;
    if !made_set {
        return;
    }
    let Ok(cib) = p.cluster.query().await else { return };
    for (id, empty) in node_attribute_sets(&cib, host) {
        if empty {
            let xml = format!("<instance_attributes id=\"{}\"/>", escape(&id));
            if let Err(e) = p.cluster.apply(CibChange::Delete { section: "nodes", xml }).await {
                tracing::warn!(%host, "dropping the emptied node attribute set: {e}");
            }
        }
    }
}

/// Rolls back the instantiates a vmhad left midway (this host's, and on the DC those of hosts whose
/// vmhad is gone), and puts back the target-roles of interrupted captures. A finished instantiate's
/// journal is only dropped.
pub async fn recover(p: &Ports) {
    for j in orphaned(p, JOURNAL_PREFIX).await {
        let parsed = serde_json::from_str::<InstantiateJournal>(&j.value);
        let made_set = parsed.as_ref().is_ok_and(|x| x.made_set);
        match parsed {
            Ok(journal) if journal.finished => {
                tracing::info!(host = %j.host, key = %j.key, "dropping the journal of an instantiate that finished");
            }
            Ok(journal) => {
                tracing::warn!(host = %j.host, key = %j.key, name = %journal.name, "rolling back an interrupted instantiate");
                if let Err(e) = rollback(p, &journal).await {
                    tracing::warn!(key = %j.key, "rolling back an interrupted instantiate: {e}");
                }
            }
            Err(e) => tracing::warn!(key = %j.key, "dropping an unreadable instantiate journal: {e}"),
        }
        drop_journal(p, &j.host, &j.key, made_set).await;
    }
    for j in orphaned(p, CAPTURE_JOURNAL_PREFIX).await {
        let parsed = serde_json::from_str::<CaptureJournal>(&j.value);
        let made_set = parsed.as_ref().is_ok_and(|x| x.made_set);
        match parsed {
            Ok(journal) => {
                tracing::warn!(host = %j.host, key = %j.key, "restoring the target-roles of an interrupted capture");
                if let Err(e) = restore_roles(p, &journal.roles).await {
                    tracing::warn!(key = %j.key, "restoring target-roles: {e}");
                }
            }
            Err(e) => tracing::warn!(key = %j.key, "dropping an unreadable capture journal: {e}"),
        }
        drop_journal(p, &j.host, &j.key, made_set).await;
    }
}

/// The `target-role` nvpair (id, value) of a resource.
pub fn target_role(cib: &str, rsc: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(cib).ok()?;
    doc.descendants()
        .find(|n| n.is_element() && n.attribute("id") == Some(rsc) && !n.has_tag_name("obj_ref"))
        .and_then(|r| {
            r.children()
                .filter(|n| n.has_tag_name("meta_attributes"))
                .flat_map(|s| s.children())
                .find(|n| n.has_tag_name("nvpair") && n.attribute("name") == Some("target-role"))
        })
        .map(|n| {
            (
                n.attribute("id").unwrap_or("").to_string(),
                n.attribute("value").unwrap_or("").to_string(),
            )
        })
}

/// A capture's journal: each member's target-role before the capture stopped it (`None`: it had none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureJournal {
    pub roles: BTreeMap<String, Option<String>>,
    /// The host had no node attributes before the journal (see [`InstantiateJournal::made_set`]).
    #[serde(default)]
    pub made_set: bool,
}

/// What a capture is asked to do.
#[derive(Debug, Clone)]
pub struct CaptureSpec {
    pub name: String,
    pub with_disks: bool,
    pub halt: bool,
}

async fn set_role(p: &Ports, rsc: &str, role: &str) -> Result<(), OpError> {
    let cib = p.cluster.query().await?;
    let xml = change::set_resource_meta(&cib, rsc, "target-role", role).map_err(|e| OpError::data("the CIB", e))?;
    p.cluster
        .apply(CibChange::Modify {
            section: "resources",
            xml,
        })
        .await?;
    Ok(())
}

/// Puts back each resource's target-role as it was (removing one it did not have).
pub async fn restore_roles(p: &Ports, before: &BTreeMap<String, Option<String>>) -> Result<(), String> {
    let mut errors = Vec::new();
    for (rsc, role) in before {
        let r = async {
            let cib = p.cluster.query().await?;
            let now = target_role(&cib, rsc);
            match (role, now) {
                (Some(v), Some((_, n))) if *v == n => Ok(()),
                (Some(v), _) => set_role(p, rsc, v).await,
                (None, Some((id, _))) => {
                    let xml = format!("<nvpair id=\"{}\"/>", escape(&id));
                    p.cluster
                        .apply(CibChange::Delete {
                            section: "resources",
                            xml,
                        })
                        .await?;
                    Ok(())
                }
                (None, None) => Ok(()),
            }
        }
        .await;
        if let Err(e) = r {
            errors.push(format!("{rsc}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("restoring target-role failed: {}", errors.join("; ")))
    }
}

/// Captures the virtual cluster `spec.name` into `sink`: its members' definitions (domain XML read from
/// the shared storage), and with `with_disks` their disks, the members stopped (`halt`: their
/// target-roles journaled first and put back whatever happens) or their guests' file systems frozen.
/// Returns the summary (JSON).
pub async fn capture(
    p: &Ports,
    progress: &dyn Progress,
    spec: &CaptureSpec,
    sink: &mut dyn ArchiveSink,
    job_id: &str,
) -> Result<Value, OpError> {
    progress.progress(0.0, "reading the CIB").await;
    let cib = p.cluster.query().await?;
    let c = vcapture::capture(&cib, &spec.name).map_err(|e| match e {
        vmha_vcluster::VclusterError::NotFound(m) => OpError::UnknownGroup(m),
        other => OpError::data("the virtual cluster", other),
    })?;
    let view = ClusterView::from_cib(&cib).map_err(|e| OpError::data("the CIB", e))?;
    let mut domains = BTreeMap::new();
    for vm in &c.vms {
        let path = vm.config.as_ref().ok_or_else(|| {
            OpError::Invalid(format!(
                "VM {} has no config parameter: vmha captures VMs whose domain XML is a file",
                vm.resource
            ))
        })?;
        domains.insert(vm.resource.clone(), p.storage.read_small(path).await?);
    }
    let metadata = vmha_vcluster::metadata_entries(&c, &domains).map_err(|e| OpError::data("the capture", e))?;
    let placement: BTreeMap<String, String> = c
        .vms
        .iter()
        .filter_map(|v| Some((v.resource.clone(), view.vm(&v.resource)?.hosts.first()?.clone())))
        .collect();
    let mut disks = Vec::new();
    if spec.with_disks {
        for vm in &c.vms {
            for path in domain_disks(&domains[&vm.resource]).map_err(|e| OpError::data("a domain XML", e))? {
                disks.push((vm.resource.clone(), path));
            }
        }
    }
    sink.open_disks(disks.clone()).await?;
    let (consistency, written) = if disks.is_empty() {
        let c2 = "metadata only";
        (c2, sink.write(&c, &metadata, placement, c2).await)
    } else if spec.halt {
        let w = halted(p, progress, &c, &cib, sink, &metadata, placement, job_id).await;
        ("halted", w)
    } else {
        ("frozen", frozen(p, progress, &c, sink, &metadata, placement).await)
    };
    let (manifest, stats) = written?;
    let disks: Vec<Value> = manifest
        .disks
        .iter()
        .zip(&stats)
        .map(|(d, s)| json!({"id": d.id, "vm": d.vm, "path": d.path, "size": d.size, "chunks": s.chunks, "stored": s.stored}))
        .collect();
    Ok(json!({
        "name": manifest.name,
        "members": manifest.members,
        "constraints": c.constraints,
        "left_out": c.left_out.iter().map(|(c, o)| json!({"constraint": c, "names": o})).collect::<Vec<_>>(),
        "disks": disks,
        "consistency": consistency,
    }))
}

/// A cold capture: the roles journaled, the members stopped, the archive written, the roles put back.
#[allow(clippy::too_many_arguments)]
async fn halted(
    p: &Ports,
    progress: &dyn Progress,
    c: &Captured,
    cib: &str,
    sink: &mut dyn ArchiveSink,
    metadata: &BTreeMap<String, Vec<u8>>,
    placement: BTreeMap<String, String>,
    job_id: &str,
) -> Result<(Manifest, Vec<DiskStats>), OpError> {
    let journal = CaptureJournal {
        roles: c
            .vms
            .iter()
            .map(|v| (v.resource.clone(), target_role(cib, &v.resource).map(|(_, r)| r)))
            .collect(),
        made_set: !has_node_attributes(cib, p.cluster.local_host()),
    };
    let key = format!("{CAPTURE_JOURNAL_PREFIX}{job_id}");
    let value = serde_json::to_string(&journal).map_err(|e| OpError::data("the journal", e))?;
    progress.progress(0.05, "stopping the members (--halt)").await;
    let r = async {
        set_node_attribute(p, p.cluster.local_host(), &key, &value, "the journal").await?;
        for vm in &c.vms {
            set_role(p, &vm.resource, "Stopped").await?;
        }
        let names: Vec<String> = c.vms.iter().map(|v| v.resource.clone()).collect();
        p.wait_until(HALT_WAIT, |snap| {
            let view = snap.view.as_ref()?;
            names
                .iter()
                .all(|n| view.vm(n).is_none_or(|vm| vm.state == VmState::Stopped))
                .then_some(())
        })
        .await
        .map_err(|e| OpError::cluster("members stopped", e))?;
        sink.write(c, metadata, placement, "halted").await
    }
    .await;
    progress.progress(0.97, "restarting the members").await;
    // Retried: a member left stopped until the next recovery is an outage.
    let mut restored = restore_roles(p, &journal.roles).await;
    for _ in 0..2 {
        if restored.is_ok() {
            break;
        }
        restored = restore_roles(p, &journal.roles).await;
    }
    match restored {
        Ok(()) => {
            drop_journal(p, p.cluster.local_host(), &key, journal.made_set).await;
            r
        }
        // The journal stays: the next recovery tries again.
        Err(u) => Err(OpError::RollbackIncomplete {
            error: Box::new(
                r.err()
                    .unwrap_or_else(|| OpError::cluster("restarting the members", &u)),
            ),
            undo: u,
        }),
    }
}

/// A live capture: every running member's file systems frozen, the archive written, every one frozen
/// thawed, whatever happened.
async fn frozen(
    p: &Ports,
    progress: &dyn Progress,
    c: &Captured,
    sink: &mut dyn ArchiveSink,
    metadata: &BTreeMap<String, Vec<u8>>,
    placement: BTreeMap<String, String>,
) -> Result<(Manifest, Vec<DiskStats>), OpError> {
    progress.progress(0.05, "freezing the guests' file systems").await;
    let mut thaw = Vec::new();
    let mut r = Ok(());
    for vm in &c.vms {
        let Some(host) = placement.get(&vm.resource) else {
            continue;
        };
        let domain = vm.domain.clone().unwrap_or_else(|| vm.resource.clone());
        match p.hypervisor.guest_fsfreeze(host, &domain, true).await {
            Ok(()) => thaw.push((host.clone(), domain)),
            Err(e) => {
                r = Err(OpError::Cluster {
                    what: format!(
                        "freezing {}'s file systems (a live capture needs qemu-guest-agent in every running VM; \
                         --halt captures with the VMs stopped)",
                        vm.resource
                    ),
                    reason: e.to_string(),
                });
                break;
            }
        }
    }
    let mut w = match r {
        Ok(()) => sink.write(c, metadata, placement, "frozen").await,
        Err(e) => Err(e),
    };
    progress.progress(0.97, "thawing the guests' file systems").await;
    for (host, domain) in &thaw {
        if let Err(e) = p.hypervisor.guest_fsfreeze(host, domain, false).await {
            tracing::warn!(%domain, "thawing failed: {e}");
            if w.is_ok() {
                w = Err(e.into());
            }
        }
    }
    w
}

/// Every capture or instantiate journal in the CIB (host, key).
pub fn journals(cib: &str) -> Vec<clone::StoredJournal> {
    let mut out = clone::attributes(cib, JOURNAL_PREFIX);
    out.extend(clone::attributes(cib, CAPTURE_JOURNAL_PREFIX));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_names_are_hidden_siblings_named_after_the_job() {
        assert_eq!(
            staged_name("/srv/vmha/web.img", "7"),
            "/srv/vmha/.web.img.7.vmha-partial"
        );
    }

    #[test]
    fn created_elements_come_tags_first() {
        let f = r#"<configuration><resources><primitive id="a"/></resources><constraints><rsc_location id="l"/></constraints><tags><tag id="t"/></tags></configuration>"#;
        assert_eq!(
            created_elements(f).unwrap(),
            vec![
                ("tags".to_string(), r#"<tag id="t"/>"#.to_string()),
                ("constraints".to_string(), r#"<rsc_location id="l"/>"#.to_string()),
                ("resources".to_string(), r#"<primitive id="a"/>"#.to_string()),
            ]
        );
        assert_eq!(element_id(r#"<tag id="t"/>"#), Some("t"));
    }
}
