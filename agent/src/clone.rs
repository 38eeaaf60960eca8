//! Live clone of a running VM (`vmha clone`): check, ask the template's guest to prepare, capture its
//! memory and disks live (external snapshot: the template goes on running on a new overlay), restore the
//! capture as new domains with their own identity on the target host, resume the template's guest, tell
//! each clone's guest that it is a clone and wait for its acknowledgement, register the clones as cluster
//! resources with the template's settings. Any failure rolls back what was made and resumes the template.
//! The job runs in the vmhad on the DC's host (a request made elsewhere is relayed there, see
//! [`crate::relay::clone_via_dc`]). Every step is written to a journal (a node attribute of the host
//! running the job), so that a restarted vmhad, or the next DC's vmhad when this one's host is gone,
//! rolls back a clone that was cut short.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use virt::connect::Connect;
use vmha_model::change::{self, validate_name};
use vmha_model::clone::{self as model, CloneIdentity};
use vmha_model::VmState;

use crate::backend::CibChange;
use crate::jobs::Job;
use crate::relay;
use crate::state::Shared;

/// How long a guest has to prepare, resume or take its new identity.
const GUEST_DEADLINE_MS: u32 = 10_000;
/// Deadline of one libvirt call (connect, snapshot, restore, volume creation).
const LIBVIRT_DEADLINE: Duration = Duration::from_secs(60);
/// Most clones one request makes.
pub const MAX_COUNT: u32 = 16;
/// Prefix of the node attributes holding clone journals.
pub const JOURNAL_PREFIX: &str = "vmha-clone-journal-";

/// What `Clone` was asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneSpec {
    pub template: String,
    pub name: Option<String>,
    pub host: Option<String>,
    pub count: u32,
    pub force: bool,
}

/// How vmhad reaches libvirt on this host and on the others (`{host}` is replaced by the host name).
#[derive(Debug, Clone)]
pub struct Uris {
    pub local: String,
    pub peer: String,
}

static URIS: OnceLock<Uris> = OnceLock::new();

/// Sets the libvirt URIs (once, at vmhad's start).
pub fn configure(uris: Uris) {
    let _ = URIS.set(uris);
}

fn uri_of(shared: &Shared, host: &str) -> String {
    let uris = URIS.get().cloned().unwrap_or(Uris {
        local: "qemu:///system".into(),
        peer: "qemu+tcp://{host}/system".into(),
    });
    if host == shared.local_host {
        uris.local
    } else {
        uris.peer.replace("{host}", host)
    }
}

/// A clone job's plan, checked before anything changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
}

/// Checks a clone request against the cluster (nothing changes).
pub async fn check(shared: &Shared, spec: &CloneSpec) -> Result<Plan, String> {
    if spec.count == 0 || spec.count > MAX_COUNT {
        return Err(format!("count must be 1..={MAX_COUNT}"));
    }
    let snap = shared.snapshot();
    let view = snap.view.as_ref().ok_or("vmhad cannot read the CIB right now")?;
    let tpl = view
        .vm(&spec.template)
        .ok_or_else(|| format!("unknown VM {}", spec.template))?;
    if tpl.agent != "ocf:vmha:VirtualMachine" {
        return Err(format!(
            "VM {} runs under {}; only ocf:vmha:VirtualMachine VMs can be cloned",
            tpl.name, tpl.agent
        ));
    }
    if tpl.state != VmState::Running || tpl.hosts.len() != 1 {
        return Err(format!(
            "VM {} is not running on one host (it is {:?})",
            tpl.name, tpl.state
        ));
    }
    let source = tpl.hosts[0].clone();
    let config = tpl
        .config
        .clone()
        .ok_or_else(|| format!("VM {} has no config parameter", tpl.name))?;
    let names = model::clone_names(&tpl.name, spec.name.as_deref(), spec.count);
    let cib = shared.backend.query().await.map_err(|e| e.to_string())?;
    for n in &names {
        validate_name("clone name", n).map_err(|e| e.to_string())?;
        if view.vm(n).is_some() || cib.contains(&format!("id=\"{n}\"")) {
            return Err(format!("the name {n} is taken in the CIB"));
        }
    }
    let target = match &spec.host {
        Some(h) => h.clone(),
        None => best_host(view, &snap).unwrap_or_else(|| source.clone()),
    };
    let host = view.host(&target).ok_or_else(|| format!("unknown host {target}"))?;
    if !snap.host_online(&target) || host.standby || host.maintenance {
        return Err(format!("host {target} is not online, or in standby or maintenance"));
    }
    if let (Some(free), Some(need)) = (
        vmha_model::group::free_memory(view, &target),
        tpl.utilization.get("hv_memory").and_then(|v| v.parse::<u64>().ok()),
    ) {
        let want = need * u64::from(spec.count);
        if free < want {
            return Err(format!(
                "host {target} has {free} MiB of hv_memory capacity left; {} clone(s) of {} need {want} MiB",
                spec.count, tpl.name
            ));
        }
    }
    let config_xml = read_small(&config).await?;
    let disks = model::writable_disks(&config_xml).map_err(|e| format!("{config}: {e}"))?;
    // The target must see the template's storage: look its disks up through the target's libvirt.
    let uri = uri_of(shared, &target);
    let dirs: Vec<(String, String)> = disks
        .iter()
        .map(|(_, f)| (dir_of(f), base_of(f)))
        .chain(std::iter::once((dir_of(&config), base_of(&config))))
        .collect();
    let on = target.clone();
    blocking(&format!("checking storage on {target}"), move || {
        let conn = Connect::open(Some(&uri)).map_err(|e| format!("libvirt on {on}: {e}"))?;
        let mut out = Ok(());
        for (dir, file) in &dirs {
            let pool = libvirt_ext::dir_pool(&conn, dir, &pool_name(dir)).map_err(|e| e.to_string());
            let seen = pool.and_then(|p| {
                p.refresh(0).map_err(|e| e.to_string())?;
                p.lookup_storage_vol_by_name(file).map_err(|e| e.to_string())
            });
            if let Err(e) = seen {
                out = Err(format!("host {on} does not see {dir}/{file}: {e}"));
                break;
            }
        }
        out
    })
    .await??;
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
fn best_host(view: &vmha_model::ClusterView, snap: &crate::state::Snapshot) -> Option<String> {
    view.hosts
        .iter()
        .filter(|h| snap.host_online(&h.name) && !h.standby && !h.maintenance)
        .max_by_key(|h| vmha_model::group::free_memory(view, &h.name).unwrap_or(0))
        .map(|h| h.name.clone())
}

fn dir_of(path: &str) -> String {
    path.rsplit_once('/').map_or(".".into(), |(d, _)| d.to_string())
}

fn base_of(path: &str) -> String {
    path.rsplit_once('/').map_or(path.into(), |(_, b)| b.to_string())
}

fn pool_name(dir: &str) -> String {
    let h = dir.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("vmha-{h:016x}")
}

async fn read_small(path: &str) -> Result<String, String> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if meta.len() > 1 << 20 {
        return Err(format!("{path} is larger than 1 MiB"));
    }
    tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// Runs blocking libvirt work on a worker thread with [`LIBVIRT_DEADLINE`].
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    match tokio::time::timeout(LIBVIRT_DEADLINE, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} s", LIBVIRT_DEADLINE.as_secs())),
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    b
}

fn stamp() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// Timings of one clone job, reported in its final message (and read by the bench).
#[derive(Debug, Default, Serialize)]
pub struct Timings {
    pub prepare_ms: u128,
    pub capture_ms: u128,
    /// How long the template's vCPUs were stopped (libvirt's downtime of the snapshot job), when known.
    pub stall_ms: Option<u64>,
    pub create_ms: u128,
    pub resume_ms: u128,
    pub register_ms: u128,
    pub post_clone_ms: u128,
    /// From the request to the clones' post-clone acknowledgement: the clones are ready (registering them
    /// as cluster resources follows, in `register_ms`).
    pub total_ms: u128,
}

/// Runs a checked clone plan as `job`.
pub async fn run(shared: &Arc<Shared>, job: &Job, plan: &Plan, job_id: &str) -> Result<String, String> {
    let mut journal = Journal {
        template: plan.template.clone(),
        source: plan.source.clone(),
        target: plan.target.clone(),
        ..Journal::default()
    };
    let key = format!("{JOURNAL_PREFIX}{job_id}");
    let result = steps(shared, job, plan, &mut journal, &key).await;
    match result {
        Ok(message) => {
            clear_journal(shared, &key).await;
            Ok(message)
        }
        Err(e) => {
            job.progress(0.95, &format!("rolling back: {e}")).await;
            let undo = rollback(shared, &journal).await;
            clear_journal(shared, &key).await;
            match undo {
                Ok(()) => Err(format!("{e} (rolled back: nothing was created, template resumed)")),
                Err(u) => Err(format!("{e}; rollback incomplete: {u}")),
            }
        }
    }
}

async fn write_journal(shared: &Shared, key: &str, journal: &Journal) {
    let Ok(value) = serde_json::to_string(journal) else {
        return;
    };
    let set = async {
        let cib = shared.backend.query().await.map_err(|e| e.to_string())?;
        let xml = change::set_node_attribute(&cib, &shared.local_host, key, &value).map_err(|e| e.to_string())?;
        shared
            .backend
            .apply(CibChange::Modify { section: "nodes", xml })
            .await
            .map_err(|e| e.to_string())
    };
    if let Err(e) = set.await {
        tracing::warn!(%key, "writing the clone journal: {e}");
    }
}

async fn clear_journal(shared: &Shared, key: &str) {
    let Ok(cib) = shared.backend.query().await else { return };
    for id in journal_nvpair_ids(&cib, Some(&shared.local_host), key) {
        drop_journal(shared, &id).await;
    }
}

/// Deletes the journal node attribute whose nvpair id is `id` (best effort: a journal left behind is
/// rolled back again, which is harmless).
async fn drop_journal(shared: &Shared, id: &str) {
    let xml = format!(r#"<nvpair id="{}"/>"#, change::escape(id));
    let _ = apply(shared, CibChange::Delete { section: "nodes", xml }).await;
}

/// Ids of the node-attribute nvpairs named `key` (of `host`, or any host).
fn journal_nvpair_ids(cib: &str, host: Option<&str>, key: &str) -> Vec<String> {
    journals(cib)
        .into_iter()
        .filter(|(h, k, _, _)| k == key && host.is_none_or(|x| x == h))
        .map(|(_, _, id, _)| id)
        .collect()
}

/// Every clone journal in the CIB: (host, name, nvpair id, journal).
pub fn journals(cib: &str) -> Vec<(String, String, String, String)> {
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
            if name.starts_with(JOURNAL_PREFIX) {
                out.push((
                    host.to_string(),
                    name.to_string(),
                    id.to_string(),
                    nv.attribute("value").unwrap_or("").to_string(),
                ));
            }
        }
    }
    out
}

async fn steps(
    shared: &Arc<Shared>,
    job: &Job,
    plan: &Plan,
    journal: &mut Journal,
    key: &str,
) -> Result<String, String> {
    let started = Instant::now();
    let mut t = Timings::default();
    let tpl = plan.template.clone();
    write_journal(shared, key, journal).await;

    // 2. Prepare.
    let at = Instant::now();
    if plan.force {
        job.progress(0.05, "--force: not asking the template's guest").await;
    } else {
        job.progress(0.05, &format!("asking {tpl}'s guest to prepare")).await;
        let data = json!({"clones": plan.names, "target": plan.target}).to_string();
        journal.prepared = true;
        write_journal(shared, key, journal).await;
        let (outcome, reason) = relay::guest_request(shared, &tpl, "prepare-clone", &data, GUEST_DEADLINE_MS)
            .await
            .map_err(|e| format!("asking {tpl}'s guest to prepare: {e}"))?;
        match outcome.as_str() {
            "done" => {}
            "refused" => return Err(format!("{tpl}'s guest refused to prepare: {reason}")),
            _ => return Err(format!("{tpl}'s guest failed to prepare: {reason}")),
        }
    }
    t.prepare_ms = at.elapsed().as_millis();

    // 3. Capture: memory and disks, the template goes on on new overlays.
    let at = Instant::now();
    job.progress(0.2, &format!("capturing {tpl} live on {}", plan.source))
        .await;
    let disks = model::writable_disks(&plan.config_xml).map_err(|e| e.to_string())?;
    let dir = dir_of(&plan.config);
    let s = stamp();
    let mem = format!("{dir}/.{tpl}.{s}.mem");
    let renames: Vec<(String, String, String)> = disks
        .iter()
        .map(|(dev, frozen)| {
            (
                dev.clone(),
                frozen.clone(),
                format!("{}/{tpl}.{s}.{dev}.qcow2", dir_of(frozen)),
            )
        })
        .collect();
    journal.files.push(mem.clone());
    journal.config = plan.config.clone();
    journal.overlays = renames.iter().map(|(_, f, n)| (f.clone(), n.clone())).collect();
    write_journal(shared, key, journal).await;
    let snapshot_xml = {
        let mut x = format!(
            "<domainsnapshot><name>vmha-clone-{s}</name><memory snapshot='external' file='{}'/><disks>",
            change::escape(&mem)
        );
        for (dev, _, new) in &renames {
            x.push_str(&format!(
                "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
                change::escape(dev),
                change::escape(new)
            ));
        }
        x.push_str("</disks></domainsnapshot>");
        x
    };
    let uri = uri_of(shared, &plan.source);
    let name = tpl.clone();
    let stall = blocking("capturing the template", move || -> Result<Option<u64>, String> {
        let conn = Connect::open(Some(&uri)).map_err(|e| format!("libvirt on {uri}: {e}"))?;
        let r = (|| {
            let dom = conn
                .lookup_domain_by_name(&name)
                .map_err(|e| format!("domain {name}: {e}"))?;
            let flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
            dom.create_snapshot_xml(&snapshot_xml, flags)
                .map_err(|e| format!("live snapshot of {name}: {e}"))?;
            let stats = dom.job_stats(virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED).ok();
            Ok(stats.and_then(|s| s.downtime))
        })();
        r
    })
    .await??;
    t.stall_ms = stall;
    // The template now writes to its new overlays: its definition must say so before anything else, or a
    // restart would boot it from the frozen layer the clones share.
    follow_overlays(&plan.config, &journal.overlays).await?;
    t.capture_ms = at.elapsed().as_millis();

    // 4. Create the clones from the capture on the target host.
    let at = Instant::now();
    job.progress(0.4, &format!("creating {} on {}", plan.names.join(", "), plan.target))
        .await;
    let image = read_image_header(&mem).await?;
    let mut made = Vec::new();
    for clone in &plan.names {
        let identity = CloneIdentity {
            template: tpl.clone(),
            name: clone.clone(),
            uuid: model::uuid_from(random()),
            genid: model::uuid_from(random()),
            macs: (0..interfaces(&image.xml)).map(|_| model::mac_from(random())).collect(),
            disks: renames
                .iter()
                .map(|(dev, frozen, _)| (frozen.clone(), format!("{}/{clone}.{dev}.qcow2", dir_of(frozen))))
                .collect(),
        };
        let runtime = model::clone_domain_xml(&image.xml, &identity).map_err(|e| e.to_string())?;
        let persistent = model::clone_domain_xml(&plan.config_xml, &identity).map_err(|e| e.to_string())?;
        let xml_path = format!("{dir}/{clone}.xml");
        let mem_path = format!("{dir}/.{clone}.{s}.mem");
        journal.files.push(xml_path.clone());
        journal.files.push(mem_path.clone());
        journal.files.extend(identity.disks.iter().map(|(_, to)| to.clone()));
        write_journal(shared, key, journal).await;
        if tokio::fs::try_exists(&xml_path).await.unwrap_or(false) {
            return Err(format!("{xml_path} exists already"));
        }
        write_atomic(&xml_path, &persistent).await?;
        write_clone_image(&mem, &image, &runtime, &mem_path).await?;
        made.push((clone.clone(), identity, xml_path, mem_path));
    }
    let uri = uri_of(shared, &plan.target);
    let overlays: Vec<(String, String)> = made.iter().flat_map(|(_, id, _, _)| id.disks.iter().cloned()).collect();
    blocking("creating the clone overlays", move || create_overlays(&uri, &overlays)).await??;
    journal.domains.extend(made.iter().map(|(c, _, _, _)| c.clone()));
    write_journal(shared, key, journal).await;
    let mut restores = Vec::new();
    for (clone, _, _, mem_path) in &made {
        let uri = uri_of(shared, &plan.target);
        let path = mem_path.clone();
        let c = clone.clone();
        restores.push(tokio::spawn(blocking("restoring a clone", move || {
            let conn = Connect::open(Some(&uri)).map_err(|e| format!("libvirt on {uri}: {e}"))?;
            let r = libvirt_ext::restore_domain(&conn, &path, virt::sys::VIR_DOMAIN_SAVE_RUNNING)
                .map_err(|e| format!("restoring {c}: {e}"));
            r
        })));
    }
    let mut failures = Vec::new();
    for r in restores {
        match r.await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e)) | Err(e)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    for (_, _, _, mem_path) in &made {
        let _ = tokio::fs::remove_file(mem_path).await;
    }
    let _ = tokio::fs::remove_file(&mem).await;
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    t.create_ms = at.elapsed().as_millis();

    // 5. Resume the template's guest.
    let at = Instant::now();
    if journal.prepared {
        job.progress(0.55, &format!("resuming {tpl}'s guest")).await;
        let r = relay::guest_request(shared, &tpl, "resume", "{}", GUEST_DEADLINE_MS).await;
        journal.prepared = false;
        write_journal(shared, key, journal).await;
        match r {
            Ok((o, _)) if o == "done" => {}
            Ok((o, reason)) => tracing::warn!(%tpl, "the template's guest answered resume with {o}: {reason}"),
            Err(e) => tracing::warn!(%tpl, "resuming the template's guest: {e}"),
        }
    }
    t.resume_ms = at.elapsed().as_millis();

    // 6. Tell each clone's guest who it is now and wait for its acknowledgement (through the target host's
    // vmhad, which opens the channel on this request: the clone is not a cluster resource yet).
    let at = Instant::now();
    job.progress(0.65, "telling the clones' guests who they are").await;
    for (clone, identity, _, _) in &made {
        let data = json!({
            "template": tpl,
            "name": clone,
            "hostname": clone,
            "uuid": identity.uuid,
            "macs": identity.macs,
            "host": plan.target,
        })
        .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match relay::guest_request_on(shared, &plan.target, clone, "post-clone", &data, GUEST_DEADLINE_MS).await {
                Ok((o, _)) if o == "done" => break,
                Ok((o, reason)) => return Err(format!("{clone}'s guest answered post-clone with {o}: {reason}")),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%clone, "post-clone not deliverable yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(format!("telling {clone}'s guest it is a clone: {e}")),
            }
        }
    }
    t.post_clone_ms = at.elapsed().as_millis();
    // The clones are ready: their guests took their new identity.
    t.total_ms = started.elapsed().as_millis();

    // 7. Register the clones as cluster resources with the template's settings.
    let at = Instant::now();
    job.progress(0.8, "registering the clones as cluster resources").await;
    for (clone, _, xml_path, _) in &made {
        let cib = shared.backend.query().await.map_err(|e| e.to_string())?;
        let r = model::clone_resource(&cib, &tpl, clone, xml_path).map_err(|e| e.to_string())?;
        journal.resources.push(clone.clone());
        write_journal(shared, key, journal).await;
        apply(
            shared,
            CibChange::Create {
                section: "resources",
                xml: r.primitive,
            },
        )
        .await?;
        for (tag, id, xml) in r.constraints {
            journal.constraints.push((tag, id));
            apply(
                shared,
                CibChange::Create {
                    section: "constraints",
                    xml,
                },
            )
            .await?;
        }
        write_journal(shared, key, journal).await;
        for tag in r.tags {
            add_to_tag(shared, &tag, clone).await?;
        }
    }
    for (clone, _, _, _) in &made {
        wait_running_on(shared, clone, &plan.target).await?;
    }
    t.register_ms = at.elapsed().as_millis();

    // 8. Keep the template's disk chain short: pull the layers vmha made (the frozen one of this clone,
    // and any a rolled-back clone left) into its active overlay, so that every clone adds a layer only
    // under the clones, never under the template; layers no clone uses go.
    job.progress(0.9, &format!("compacting {tpl}'s disk chain")).await;
    compact_template(shared, &tpl, &plan.source).await;
    let timings = serde_json::to_string(&t).unwrap_or_default();
    Ok(format!(
        "cloned {tpl} to {} on {}; timings {timings}",
        plan.names.join(", "),
        plan.target
    ))
}

/// Points the template's definition at its new overlays (those that exist: the capture made them).
async fn follow_overlays(config: &str, overlays: &[(String, String)]) -> Result<(), String> {
    if config.is_empty() || overlays.is_empty() {
        return Ok(());
    }
    let mut xml = read_small(config).await?;
    let before = xml.clone();
    for (frozen, new) in overlays {
        if tokio::fs::try_exists(new).await.unwrap_or(false) {
            xml = xml.replace(&format!("'{frozen}'"), &format!("'{new}'"));
            xml = xml.replace(&format!("\"{frozen}\""), &format!("\"{new}\""));
        }
    }
    if xml != before {
        write_atomic(config, &xml).await?;
    }
    Ok(())
}

/// Shortens the disk chains of `template` (running on `host`, see [`model::compaction`]) and deletes the
/// layers that left them when no other image uses them. Best effort: a failure leaves a longer chain,
/// which the next clone shortens, and is logged.
async fn compact_template(shared: &Shared, template: &str, host: &str) {
    let uri = uri_of(shared, host);
    let name = template.to_string();
    let dropped = match blocking("compacting the template's disk chain", move || compact(&uri, &name)).await {
        Ok(Ok(dropped)) => dropped,
        Ok(Err(e)) | Err(e) => {
            tracing::warn!(%template, "compacting the template's disk chain: {e}");
            return;
        }
    };
    for layer in dropped {
        match layer_users(&layer).await {
            Ok(users) if users.is_empty() => {
                if let Err(e) = tokio::fs::remove_file(&layer).await {
                    tracing::warn!(%layer, "removing an unused clone layer: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%layer, "cannot tell whether the clone layer is in use: {e}"),
        }
    }
}

/// Pulls the layers vmha made below each disk's active layer into it and waits for the block jobs to end;
/// returns the layers that left the chains.
fn compact(uri: &str, vm: &str) -> Result<Vec<String>, String> {
    let conn = Connect::open(Some(uri)).map_err(|e| format!("libvirt on {uri}: {e}"))?;
    let dom = conn
        .lookup_domain_by_name(vm)
        .map_err(|e| format!("domain {vm}: {e}"))?;
    let xml = dom.xml_desc(0).map_err(|e| format!("domain {vm}: {e}"))?;
    let chains = model::disk_chains(&xml).map_err(|e| e.to_string())?;
    let mut pulled = Vec::new();
    let mut dropped = Vec::new();
    for (dev, chain) in &chains {
        let Some(c) = model::compaction(vm, chain) else {
            continue;
        };
        libvirt_ext::block_pull(&dom, dev, c.base.as_deref()).map_err(|e| format!("{dev}: {e}"))?;
        pulled.push(dev.clone());
        dropped.extend(c.dropped);
    }
    let deadline = Instant::now() + Duration::from_secs(50);
    for dev in &pulled {
        while libvirt_ext::block_job_active(&dom, dev).map_err(|e| format!("{dev}: {e}"))? {
            if Instant::now() > deadline {
                return Err(format!("the block pull of {dev} did not end within 50 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(dropped)
}

fn interfaces(xml: &str) -> usize {
    roxmltree::Document::parse(xml)
        .map(|d| d.descendants().filter(|n| n.has_tag_name("interface")).count())
        .unwrap_or(0)
}

async fn apply(shared: &Shared, change: CibChange) -> Result<(), String> {
    shared.backend.apply(change).await.map_err(|e| e.to_string())
}

async fn add_to_tag(shared: &Shared, tag: &str, member: &str) -> Result<(), String> {
    let cib = shared.backend.query().await.map_err(|e| e.to_string())?;
    let doc = roxmltree::Document::parse(&cib).map_err(|e| e.to_string())?;
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
    apply(
        shared,
        CibChange::Modify {
            section: "tags",
            xml: format!(r#"<tag id="{}">{body}</tag>"#, change::escape(tag)),
        },
    )
    .await
}

async fn wait_running_on(shared: &Shared, vm: &str, host: &str) -> Result<(), String> {
    shared
        .wait_until(shared.job_deadline, |snap| {
            let v = snap.view.as_ref()?.vm(vm)?;
            match v.state {
                VmState::Running if v.hosts == [host.to_string()] => Some(Ok(())),
                VmState::Running if !v.hosts.is_empty() => {
                    Some(Err(format!("{vm} runs on {}, not {host}", v.hosts.join(","))))
                }
                VmState::Failed => Some(Err(format!("VM {vm} failed"))),
                _ => None,
            }
        })
        .await
}

async fn write_atomic(path: &str, content: &str) -> Result<(), String> {
    let tmp = format!("{path}.vmha-tmp");
    tokio::fs::write(&tmp, content)
        .await
        .map_err(|e| format!("writing {tmp}: {e}"))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| format!("renaming {tmp} to {path}: {e}"))
}

async fn read_image_header(path: &str) -> Result<model::SaveImage, String> {
    let p = path.to_string();
    tokio::task::spawn_blocking(move || -> Result<model::SaveImage, String> {
        let mut f = std::fs::File::open(&p).map_err(|e| format!("{p}: {e}"))?;
        let mut head = vec![0u8; model::HEADER_LEN];
        f.read_exact(&mut head).map_err(|e| format!("{p}: {e}"))?;
        let len = model::save_image_len(&head).map_err(|e| format!("{p}: {e}"))?;
        head.resize(len, 0);
        f.read_exact(&mut head[model::HEADER_LEN..])
            .map_err(|e| format!("{p}: {e}"))?;
        model::parse_save_image(&head).map_err(|e| format!("{p}: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Writes a save image for a clone: a header carrying `xml`, then the template's QEMU stream
/// (copied in the kernel where the file system allows).
async fn write_clone_image(from: &str, image: &model::SaveImage, xml: &str, to: &str) -> Result<(), String> {
    let header = model::write_save_header(image, xml);
    let (from, to, offset) = (from.to_string(), to.to_string(), image.stream_offset);
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut src = std::fs::File::open(&from).map_err(|e| format!("{from}: {e}"))?;
        src.seek(SeekFrom::Start(offset)).map_err(|e| format!("{from}: {e}"))?;
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&to)
            .map_err(|e| format!("{to}: {e}"))?;
        dst.write_all(&header).map_err(|e| format!("{to}: {e}"))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| format!("{to}: {e}"))?;
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Creates each clone overlay (qcow2 on its frozen backing file) through libvirt's storage API.
fn create_overlays(uri: &str, overlays: &[(String, String)]) -> Result<(), String> {
    let conn = Connect::open(Some(uri)).map_err(|e| format!("libvirt on {uri}: {e}"))?;
    let r = (|| {
        for (backing, overlay) in overlays {
            let dir = dir_of(overlay);
            let pool = libvirt_ext::dir_pool(&conn, &dir, &pool_name(&dir)).map_err(|e| e.to_string())?;
            pool.refresh(0).map_err(|e| format!("refreshing {dir}: {e}"))?;
            let capacity = pool
                .lookup_storage_vol_by_name(&base_of(backing))
                .and_then(|v| v.info())
                .map_err(|e| format!("{backing}: {e}"))?
                .capacity;
            let xml = format!(
                "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
                 <target><format type='qcow2'/></target>\
                 <backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
                change::escape(&base_of(overlay)),
                change::escape(backing)
            );
            virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0)
                .map_err(|e| format!("creating {overlay}: {e}"))?;
        }
        Ok(())
    })();
    r
}

/// Undoes what `journal` records: clone resources and constraints, clone domains, files; resumes the
/// template's guest when it was left prepared.
pub async fn rollback(shared: &Arc<Shared>, journal: &Journal) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Err(e) = follow_overlays(&journal.config, &journal.overlays).await {
        errors.push(e);
    }
    for (tag, id) in &journal.constraints {
        let xml = format!(r#"<{tag} id="{}"/>"#, change::escape(id));
        let _ = apply(
            shared,
            CibChange::Delete {
                section: "constraints",
                xml,
            },
        )
        .await;
    }
    for r in &journal.resources {
        // Unmanage first is not needed: the domain is destroyed below, and the resource goes now.
        let xml = format!(r#"<primitive id="{}"/>"#, change::escape(r));
        if let Err(e) = apply(
            shared,
            CibChange::Delete {
                section: "resources",
                xml,
            },
        )
        .await
        {
            if !e.contains("No such") && !e.contains("not found") {
                errors.push(e);
            }
        }
    }
    if !journal.domains.is_empty() {
        let uri = uri_of(shared, &journal.target);
        let domains = journal.domains.clone();
        let r = blocking("destroying clone domains", move || -> Result<(), String> {
            let conn = Connect::open(Some(&uri)).map_err(|e| format!("libvirt on {uri}: {e}"))?;
            // A restore the dead job started may still be under way in libvirtd: destroy until none of
            // the clones has shown up for two seconds.
            let quiet_for = Duration::from_secs(2);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut quiet_since = Instant::now();
            while Instant::now() < deadline && quiet_since.elapsed() < quiet_for {
                for d in &domains {
                    if let Ok(dom) = conn.lookup_domain_by_name(d) {
                        let _ = dom.destroy();
                        quiet_since = Instant::now();
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })
        .await;
        if let Err(e) | Ok(Err(e)) = r {
            errors.push(e);
        }
    }
    for f in &journal.files {
        match tokio::fs::remove_file(f).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{f}: {e}")),
        }
    }
    // The template moved to new overlays in the capture: its frozen layer, which no clone uses now,
    // goes back into them (wherever the template runs now).
    if !journal.overlays.is_empty() {
        let host = shared
            .snapshot()
            .view
            .as_ref()
            .and_then(|v| v.vm(&journal.template))
            .and_then(|v| (v.hosts.len() == 1).then(|| v.hosts[0].clone()));
        if let Some(host) = host {
            compact_template(shared, &journal.template, &host).await;
        }
    }
    if journal.prepared {
        match relay::guest_request(shared, &journal.template, "resume", "{}", GUEST_DEADLINE_MS).await {
            Ok((o, _)) if o == "done" => {}
            Ok((o, reason)) => errors.push(format!("resuming {}: {o}: {reason}", journal.template)),
            Err(e) => errors.push(format!("resuming {}: {e}", journal.template)),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Rolls back the clone journals left by a vmhad that stopped in the middle of a clone: this host's own
/// (at start) and, on the DC, those of hosts whose vmhad is gone.
pub async fn recover(shared: &Arc<Shared>) {
    let snap = shared.snapshot();
    let i_am_dc = snap.dc() == Some(shared.local_host.as_str());
    let agents = snap.membership.as_ref().map(|m| m.agents.clone());
    let Ok(cib) = shared.backend.query().await else { return };
    for (host, key, id, value) in journals(&cib) {
        let orphaned = host == shared.local_host || (i_am_dc && agents.as_ref().is_some_and(|a| !a.contains(&host)));
        if !orphaned {
            continue;
        }
        let Ok(journal) = serde_json::from_str::<Journal>(&value) else {
            tracing::warn!(%host, %key, "dropping an unreadable clone journal");
            drop_journal(shared, &id).await;
            continue;
        };
        tracing::warn!(%host, %key, template = %journal.template, "rolling back an interrupted clone");
        match rollback(shared, &journal).await {
            Ok(()) => tracing::info!(%key, "interrupted clone rolled back"),
            Err(e) => tracing::warn!(%key, "rolling back an interrupted clone: {e}"),
        }
        drop_journal(shared, &id).await;
    }
}

/// Follows the cluster and rolls back interrupted clones: once at start (after the first CIB view), then
/// whenever the set of hosts running vmhad shrinks or the DC changes (a host that dies with its vmhad
/// midway is usually the DC itself, and the new DC is elected after its vmhad left).
pub async fn follow_journals(shared: Arc<Shared>) {
    let mut rx = shared.subscribe();
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
                recover(&shared).await;
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
pub async fn destroy_files(config: &str) -> Result<Vec<String>, String> {
    let xml = read_small(config).await?;
    let Some(template) = model::clone_of(&xml) else {
        return Err(format!("{config} is not a vmha clone; --destroy deletes only clones"));
    };
    let mut removed = Vec::new();
    let mut layers = Vec::new();
    for (_, disk) in model::writable_disks(&xml).map_err(|e| e.to_string())? {
        if let Some(backing) = backing_of(&disk).await {
            layers.push(backing);
        }
        match tokio::fs::remove_file(&disk).await {
            Ok(()) => removed.push(disk),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{disk}: {e}")),
        }
    }
    tokio::fs::remove_file(config)
        .await
        .map_err(|e| format!("{config}: {e}"))?;
    removed.push(config.to_string());
    for layer in layers {
        if !model::is_clone_layer(&template, &base_of(&layer)) {
            continue;
        }
        match layer_users(&layer).await {
            Ok(users) if users.is_empty() => match tokio::fs::remove_file(&layer).await {
                Ok(()) => removed.push(layer),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(%layer, "removing an unused clone layer: {e}"),
            },
            Ok(users) => tracing::debug!(%layer, ?users, "clone layer still in use"),
            Err(e) => tracing::warn!(%layer, "cannot tell whether the clone layer is in use: {e}"),
        }
    }
    Ok(removed)
}

/// The backing file of a qcow2 image, as an absolute path.
async fn backing_of(image: &str) -> Option<String> {
    let mut head = vec![0u8; 64 << 10];
    let mut f = tokio::fs::File::open(image).await.ok()?;
    let mut n = 0;
    while n < head.len() {
        match tokio::io::AsyncReadExt::read(&mut f, &mut head[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(m) => n += m,
        }
    }
    let backing = model::qcow2_backing(&head[..n])?;
    Some(if backing.starts_with('/') {
        backing
    } else {
        format!("{}/{backing}", dir_of(image))
    })
}

/// The qcow2 images in `layer`'s directory whose backing file it is.
async fn layer_users(layer: &str) -> Result<Vec<String>, String> {
    let dir = dir_of(layer);
    let mut entries = tokio::fs::read_dir(&dir).await.map_err(|e| format!("{dir}: {e}"))?;
    let mut users = Vec::new();
    while let Some(e) = entries.next_entry().await.map_err(|e| format!("{dir}: {e}"))? {
        let path = e.path().to_string_lossy().into_owned();
        if path == layer || !e.file_type().await.is_ok_and(|t| t.is_file()) {
            continue;
        }
        if backing_of(&path).await.as_deref() == Some(layer) {
            users.push(path);
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_are_found_per_host() {
        let cib = r#"<cib><configuration><nodes>
<node id="1" uname="node1"><instance_attributes id="n1">
<nvpair id="n1-j" name="vmha-clone-journal-7" value="{&quot;template&quot;:&quot;tpl&quot;}"/>
<nvpair id="n1-x" name="other" value="1"/></instance_attributes></node>
<node id="2" uname="node2"/></nodes></configuration></cib>"#;
        let j = journals(cib);
        assert_eq!(j.len(), 1);
        assert_eq!(j[0].0, "node1");
        assert_eq!(j[0].2, "n1-j");
        let parsed: Journal = serde_json::from_str(&j[0].3).unwrap();
        assert_eq!(parsed.template, "tpl");
        assert_eq!(
            journal_nvpair_ids(cib, Some("node2"), "vmha-clone-journal-7"),
            Vec::<String>::new()
        );
        assert_eq!(journal_nvpair_ids(cib, None, "vmha-clone-journal-7"), ["n1-j"]);
        assert_eq!(pool_name("/a"), pool_name("/a"));
        assert_ne!(pool_name("/a"), pool_name("/b"));
        assert_eq!(dir_of("/x/y/z.qcow2"), "/x/y");
        assert_eq!(base_of("/x/y/z.qcow2"), "z.qcow2");
    }
}
