//! vmhad's operations on the cluster. Each is checked first (a clear error, nothing changed) and then
//! runs as a Job object on the bus with progress, a final result and a `Finished` signal. Operations
//! change the CIB (one change per step) and then wait for Pacemaker to reach the asked state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::{interface, Connection};

use vmha_model::change::{self, NewVm};
use vmha_model::domain::DomainSummary;
use vmha_model::VmState;

use crate::api::job_path;
use crate::backend::CibChange;
use crate::objects::ClusterObject;
use crate::state::{Shared, Snapshot};

/// Largest domain XML vmhad reads.
const MAX_DOMAIN_XML: u64 = 1 << 20;
/// How long a finished job stays on the bus for late readers.
const JOB_LINGER: Duration = Duration::from_secs(600);

/// A VM definition checked and ready to be added.
#[derive(Debug, Clone)]
pub struct PreparedVm {
    pub name: String,
    pub config: String,
    pub summary: DomainSummary,
}

/// What a job does.
#[derive(Debug, Clone)]
pub enum Operation {
    Add {
        prepared: PreparedVm,
        start: bool,
    },
    Start(String),
    Stop(String),
    Move {
        vm: String,
        host: String,
    },
    Remove(String),
    /// Removes a clone and deletes its domain XML file and disk overlays.
    Destroy(String),
    /// Live clone (see [`vmha_ops::clone`]).
    Clone(Box<vmha_ops::clone::Plan>),
}

impl Operation {
    fn kind(&self) -> &'static str {
        match self {
            Operation::Add { .. } => "add",
            Operation::Start(_) => "start",
            Operation::Stop(_) => "stop",
            Operation::Move { .. } => "move",
            Operation::Remove(_) => "remove",
            Operation::Destroy(_) => "destroy",
            Operation::Clone(_) => "clone",
        }
    }

    fn target(&self) -> String {
        match self {
            Operation::Add { prepared, .. } => prepared.name.clone(),
            Operation::Start(vm) | Operation::Stop(vm) | Operation::Remove(vm) => vm.clone(),
            Operation::Move { vm, host } => format!("{vm} -> {host}"),
            Operation::Destroy(vm) => vm.clone(),
            Operation::Clone(plan) => format!("{} -> {}", plan.template, plan.names.join(",")),
        }
    }
}

/// Checks an operation against the current state before anything changes.
pub fn check(shared: &Shared, op: &Operation) -> Result<(), String> {
    let snap = shared.snapshot();
    let view = snap.view.as_ref().ok_or("vmhad cannot read the CIB right now")?;
    let vm_of = |name: &str| view.vm(name).ok_or_else(|| format!("unknown VM {name}"));
    match op {
        Operation::Add { prepared, .. } => {
            if view.vm(&prepared.name).is_some() {
                return Err(format!("a VM named {} exists already", prepared.name));
            }
        }
        Operation::Start(vm) | Operation::Stop(vm) | Operation::Remove(vm) => {
            vm_of(vm)?;
        }
        Operation::Destroy(vm) => {
            let v = vm_of(vm)?;
            let config = v
                .config
                .as_deref()
                .ok_or_else(|| format!("VM {vm} has no config parameter"))?;
            let xml = std::fs::read_to_string(config).map_err(|e| format!("cannot read {config}: {e}"))?;
            if vmha_model::clone::clone_of(&xml).is_none() {
                return Err(format!(
                    "VM {vm} is not a vmha clone; --destroy deletes only clones (use remove)"
                ));
            }
        }
        Operation::Clone(_) => {}
        Operation::Move { vm, host } => {
            let v = vm_of(vm)?;
            let h = view.host(host).ok_or_else(|| format!("unknown host {host}"))?;
            if !snap.host_online(host) {
                return Err(format!("host {host} is not online"));
            }
            if h.standby || h.maintenance {
                return Err(format!("host {host} is in standby or maintenance"));
            }
            if v.state != VmState::Running {
                return Err(format!("VM {vm} is not running (it is {:?})", v.state));
            }
            if v.meta.get("allow-migrate").is_none_or(|m| !vmha_model::cib::is_true(m)) {
                return Err(format!(
                    "VM {vm} does not allow live migration (meta allow-migrate=false)"
                ));
            }
        }
    }
    Ok(())
}

/// Reads and checks the domain XML of a VM to add.
pub async fn prepare_add(shared: &Shared, name: &str, config: &str) -> Result<PreparedVm, String> {
    change::validate_name("VM name", name).map_err(|e| e.to_string())?;
    if !config.starts_with('/') {
        return Err(format!("domain XML path {config:?} must be absolute"));
    }
    let file = tokio::fs::File::open(config)
        .await
        .map_err(|e| format!("cannot read {config}: {e}"))?;
    let mut xml = String::new();
    file.take(MAX_DOMAIN_XML + 1)
        .read_to_string(&mut xml)
        .await
        .map_err(|e| format!("cannot read {config}: {e}"))?;
    if xml.len() as u64 > MAX_DOMAIN_XML {
        return Err(format!("{config} is larger than {MAX_DOMAIN_XML} bytes"));
    }
    let summary = DomainSummary::parse(&xml).map_err(|e| format!("{config}: {e}"))?;
    if summary.name != name {
        return Err(format!("{config} defines domain {:?}, not {name:?}", summary.name));
    }
    let prepared = PreparedVm {
        name: name.to_string(),
        config: config.to_string(),
        summary,
    };
    check(
        shared,
        &Operation::Add {
            prepared: prepared.clone(),
            start: false,
        },
    )?;
    Ok(prepared)
}

/// Sets or clears a host's `standby` or `maintenance` attribute (one CIB change).
pub async fn set_host_attribute(shared: &Shared, host: &str, attribute: &str, on: bool) -> Result<(), String> {
    let cib = shared.backend.query().await.map_err(|e| e.to_string())?;
    let xml =
        change::set_node_attribute(&cib, host, attribute, if on { "on" } else { "off" }).map_err(|e| e.to_string())?;
    shared
        .backend
        .apply(CibChange::Modify { section: "nodes", xml })
        .await
        .map_err(|e| e.to_string())
}

/// A job's public state.
#[derive(Debug, Clone)]
struct JobInfo {
    kind: String,
    target: String,
    state: String,
    progress: f64,
    message: String,
    /// JSON the job leaves for its caller (empty: none).
    details: String,
}

/// A long operation: `/org/vmha/Vmha1/job/<n>`, interface `org.vmha.Vmha1.Job`.
#[derive(Debug)]
pub struct JobObject {
    info: Arc<Mutex<JobInfo>>,
}

impl JobObject {
    fn read<T>(&self, f: impl FnOnce(&JobInfo) -> T) -> T {
        let info = self.info.lock().unwrap_or_else(|p| p.into_inner());
        f(&info)
    }
}

#[interface(name = "org.vmha.Vmha1.Job")]
impl JobObject {
    /// `add`, `start`, `stop`, `move` or `remove`.
    #[zbus(property)]
    async fn kind(&self) -> String {
        self.read(|i| i.kind.clone())
    }

    #[zbus(property)]
    async fn target(&self) -> String {
        self.read(|i| i.target.clone())
    }

    /// `running`, `succeeded` or `failed`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.read(|i| i.state.clone())
    }

    /// 0.0 to 1.0.
    #[zbus(property)]
    async fn progress(&self) -> f64 {
        self.read(|i| i.progress)
    }

    /// What the job is doing, or how it ended.
    #[zbus(property)]
    async fn message(&self) -> String {
        self.read(|i| i.message.clone())
    }

    /// What the job leaves for its caller once it finished, as JSON (empty for most jobs; a virtual
    /// cluster capture's summary, an instantiate's plan).
    #[zbus(property)]
    async fn details(&self) -> String {
        self.read(|i| i.details.clone())
    }

    #[zbus(signal)]
    async fn finished(emitter: &SignalEmitter<'_>, success: bool, message: &str) -> zbus::Result<()>;
}

/// The running side of a job.
#[derive(Debug, Clone)]
pub struct Job {
    conn: Connection,
    path: String,
    info: Arc<Mutex<JobInfo>>,
    /// Where the job's progress and end are also sent.
    mirror: Option<crate::relay::Mirror>,
}

impl Job {
    /// Puts a job object on the bus and runs `op` in the background; returns the job's path.
    pub async fn start(conn: &Connection, shared: &Arc<Shared>, op: Operation) -> zbus::fdo::Result<OwnedObjectPath> {
        Job::start_mirrored(conn, shared, op, None).await
    }

    /// [`Job::start`], with the job's progress and end also sent to `mirror` (a vmhad that relayed the
    /// request here, see [`crate::relay::clone_via_dc`]).
    pub async fn start_mirrored(
        conn: &Connection,
        shared: &Arc<Shared>,
        op: Operation,
        mirror: Option<crate::relay::Mirror>,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        let mut job = Job::create(conn, shared, op.kind(), op.target()).await?;
        job.mirror = mirror;
        let path = job.path.clone();
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let result = run(&shared, &job, &op).await;
            job.finish(result).await;
        });
        OwnedObjectPath::try_from(path).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    /// Puts a job object on the bus and runs `work` on a thread of its own (with its own runtime: it
    /// may block, on files and libvirt, without stalling vmhad); `work` reports through the job and
    /// returns its result and details (JSON). Returns the job's path.
    pub async fn start_on_thread<F>(
        conn: &Connection,
        shared: &Arc<Shared>,
        kind: &str,
        target: String,
        work: F,
    ) -> zbus::fdo::Result<OwnedObjectPath>
    where
        F: FnOnce(&JobReport) -> (Result<String, String>, String) + Send + 'static,
    {
        let job = Job::create(conn, shared, kind, target).await?;
        let path = job.path.clone();
        let report = JobReport {
            job: job.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("vmha-job-{}", job.id()))
            .spawn(move || {
                let _ = tx.send(work(&report));
            });
        if let Err(e) = spawned {
            job.finish(Err(format!("cannot start the job's thread: {e}"))).await;
        } else {
            tokio::spawn(async move {
                let (result, details) = rx
                    .await
                    .unwrap_or_else(|_| (Err("the job's thread ended without a result".into()), String::new()));
                job.info.lock().unwrap_or_else(|p| p.into_inner()).details = details;
                job.finish(result).await;
            });
        }
        OwnedObjectPath::try_from(path).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    /// Puts a job object on the bus; the caller runs it and reports through it.
    pub(crate) async fn create(
        conn: &Connection,
        shared: &Arc<Shared>,
        kind: &str,
        target: String,
    ) -> zbus::fdo::Result<Job> {
        let path = job_path(shared.next_job_id());
        let info = Arc::new(Mutex::new(JobInfo {
            kind: kind.into(),
            target,
            state: "running".into(),
            progress: 0.0,
            message: "queued".into(),
            details: String::new(),
        }));
        conn.object_server()
            .at(
                path.as_str(),
                JobObject {
                    info: Arc::clone(&info),
                },
            )
            .await?;
        Ok(Job {
            conn: conn.clone(),
            path,
            info,
            mirror: None,
        })
    }

    /// The job's object path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Reports progress (`fraction` when known).
    pub(crate) async fn report(&self, fraction: Option<f64>, message: &str) {
        self.update(fraction, None, message).await;
    }

    async fn update(&self, progress: Option<f64>, state: Option<&str>, message: &str) {
        if let (Some(m), None) = (self.mirror, state) {
            crate::relay::mirror_update(m, progress, message).await;
        }
        {
            let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = progress {
                info.progress = p;
            }
            if let Some(s) = state {
                info.state = s.to_string();
            }
            info.message = message.to_string();
        }
        let Ok(iface) = self
            .conn
            .object_server()
            .interface::<_, JobObject>(self.path.as_str())
            .await
        else {
            return;
        };
        let job = iface.get().await;
        let e = iface.signal_emitter();
        let _ = job.progress_changed(e).await;
        let _ = job.message_changed(e).await;
        if state.is_some() {
            let _ = job.state_changed(e).await;
        }
    }

    /// The job's number (the last segment of its path).
    pub fn id(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("0")
    }

    /// Reports a step.
    pub async fn progress(&self, fraction: f64, message: &str) {
        tracing::info!(job = %self.path, fraction, message, "job progress");
        self.update(Some(fraction), None, message).await;
    }

    pub(crate) async fn finish(self, result: Result<String, String>) {
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        if let Some(m) = self.mirror {
            crate::relay::mirror_done(m, ok, &message).await;
        }
        tracing::info!(job = %self.path, ok, %message, "job finished");
        self.update(
            ok.then_some(1.0),
            Some(if ok { "succeeded" } else { "failed" }),
            &message,
        )
        .await;
        if let Ok(iface) = self
            .conn
            .object_server()
            .interface::<_, JobObject>(self.path.as_str())
            .await
        {
            let _ = JobObject::finished(iface.signal_emitter(), ok, &message).await;
        }
        if let Ok(root) = self
            .conn
            .object_server()
            .interface::<_, ClusterObject>(crate::api::ROOT_PATH)
            .await
        {
            let info = self.info.lock().map(|i| i.clone()).ok();
            if let Some(i) = info {
                let _ = ClusterObject::event(
                    root.signal_emitter(),
                    "job",
                    &format!("{} {}", i.kind, i.target),
                    &i.message,
                )
                .await;
            }
        }
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::spawn(async move {
            tokio::time::sleep(JOB_LINGER).await;
            let _ = conn.object_server().remove::<JobObject, _>(path.as_str()).await;
        });
    }
}

/// A job's progress reported from the job's own thread (see [`Job::start_on_thread`]).
#[derive(Debug)]
pub struct JobReport {
    job: Job,
    runtime: tokio::runtime::Handle,
}

impl crate::vcluster::Report for JobReport {
    fn step(&self, fraction: Option<f64>, message: &str) {
        let job = self.job.clone();
        let message = message.to_string();
        tracing::info!(job = %job.path, ?fraction, %message, "job progress");
        self.runtime
            .spawn(async move { job.update(fraction, None, &message).await });
    }
}

async fn apply(shared: &Shared, change: CibChange) -> Result<(), String> {
    shared.backend.apply(change).await.map_err(|e| e.to_string())
}

async fn set_target_role(shared: &Shared, vm: &str, role: &str) -> Result<(), String> {
    let cib = shared.backend.query().await.map_err(|e| e.to_string())?;
    let xml = change::set_resource_meta(&cib, vm, "target-role", role).map_err(|e| e.to_string())?;
    apply(
        shared,
        CibChange::Modify {
            section: "resources",
            xml,
        },
    )
    .await
}

fn vm_state(snap: &Snapshot, vm: &str) -> Option<(VmState, Vec<String>)> {
    let v = snap.view.as_ref()?.vm(vm)?;
    Some((v.state, v.hosts.clone()))
}

/// Waits until the VM runs on one host (optionally a given one); a recorded failure ends the wait.
async fn wait_running(shared: &Shared, vm: &str, on: Option<&str>) -> Result<String, String> {
    shared
        .wait_until(shared.job_deadline, |snap| {
            let (state, hosts) = vm_state(snap, vm)?;
            match state {
                VmState::Running if on.is_none_or(|h| hosts.iter().any(|x| x == h)) => Some(Ok(hosts.join(","))),
                VmState::Failed => Some(Err(format!("VM {vm} failed"))),
                _ => None,
            }
        })
        .await
}

async fn wait_stopped(shared: &Shared, vm: &str) -> Result<(), String> {
    shared
        .wait_until(shared.job_deadline, |snap| match vm_state(snap, vm) {
            None | Some((VmState::Stopped, _)) => Some(Ok(())),
            _ => None,
        })
        .await
}

fn vm_of_config(shared: &Shared, vm: &str) -> Result<String, String> {
    shared
        .snapshot()
        .view
        .as_ref()
        .and_then(|v| v.vm(vm))
        .and_then(|v| v.config.clone())
        .ok_or_else(|| format!("VM {vm} has no config parameter"))
}

async fn run(shared: &Arc<Shared>, job: &Job, op: &Operation) -> Result<String, String> {
    match op {
        Operation::Add { prepared, start } => {
            job.progress(0.1, "creating the cluster resource").await;
            let xml = change::vm_primitive(&NewVm {
                name: &prepared.name,
                config: &prepared.config,
                hypervisor: "qemu:///system",
                migration_transport: "tcp",
                cpu: prepared.summary.vcpus,
                memory_mib: prepared.summary.memory_mib,
                start: *start,
            })
            .map_err(|e| e.to_string())?;
            apply(
                shared,
                CibChange::Create {
                    section: "resources",
                    xml,
                },
            )
            .await?;
            if !*start {
                return Ok(format!("VM {} added (stopped)", prepared.name));
            }
            job.progress(0.4, "waiting for Pacemaker to start it").await;
            let on = wait_running(shared, &prepared.name, None).await?;
            Ok(format!("VM {} added and running on {on}", prepared.name))
        }
        Operation::Start(vm) => {
            job.progress(0.2, "asking Pacemaker to start it").await;
            set_target_role(shared, vm, "Started").await?;
            let on = wait_running(shared, vm, None).await?;
            Ok(format!("VM {vm} running on {on}"))
        }
        Operation::Stop(vm) => {
            job.progress(0.2, "asking Pacemaker to stop it").await;
            set_target_role(shared, vm, "Stopped").await?;
            wait_stopped(shared, vm).await?;
            Ok(format!("VM {vm} stopped"))
        }
        Operation::Move { vm, host } => {
            if vm_state(&shared.snapshot(), vm).is_some_and(|(s, h)| s == VmState::Running && h == [host.clone()]) {
                return Ok(format!("VM {vm} already runs on {host}"));
            }
            job.progress(0.1, &format!("asking Pacemaker to migrate it to {host}"))
                .await;
            let id = change::move_constraint_id(vm);
            let constraint = change::move_constraint(vm, host);
            apply(
                shared,
                CibChange::Delete {
                    section: "constraints",
                    xml: format!(r#"<rsc_location id="{id}"/>"#),
                },
            )
            .await
            .ok();
            apply(
                shared,
                CibChange::Create {
                    section: "constraints",
                    xml: constraint,
                },
            )
            .await?;
            job.progress(0.3, "live-migrating").await;
            let moved = wait_running(shared, vm, Some(host)).await;
            // The temporary constraint goes whatever happened: vmha leaves nothing behind.
            job.progress(0.9, "removing the temporary constraint").await;
            let cleared = apply(
                shared,
                CibChange::Delete {
                    section: "constraints",
                    xml: format!(r#"<rsc_location id="{id}"/>"#),
                },
            )
            .await;
            moved?;
            cleared?;
            Ok(format!("VM {vm} migrated to {host}"))
        }
        Operation::Clone(plan) => vmha_ops::clone::run(shared.ports()?, job, plan, job.id())
            .await
            .map_err(|e| e.to_string()),
        Operation::Destroy(vm) => {
            let config = vm_of_config(shared, vm)?;
            let removed = Box::pin(run(shared, job, &Operation::Remove(vm.clone()))).await?;
            job.progress(0.95, "deleting its domain XML file and disk overlays")
                .await;
            let files = vmha_ops::clone::destroy_files(shared.ports()?, &config)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!("{removed}; deleted {}", files.join(", ")))
        }
        Operation::Remove(vm) => {
            job.progress(0.1, "stopping it").await;
            set_target_role(shared, vm, "Stopped").await?;
            wait_stopped(shared, vm).await?;
            job.progress(0.6, "removing its constraints and resource").await;
            let constraints = shared
                .snapshot()
                .view
                .as_ref()
                .and_then(|v| v.vm(vm))
                .map(|v| v.constraints.clone())
                .unwrap_or_default();
            for c in constraints {
                let tag = match c.kind.as_str() {
                    "location" => "rsc_location",
                    "colocation" => "rsc_colocation",
                    "order" => "rsc_order",
                    _ => "rsc_ticket",
                };
                apply(
                    shared,
                    CibChange::Delete {
                        section: "constraints",
                        xml: format!(r#"<{tag} id="{}"/>"#, change::escape(&c.id)),
                    },
                )
                .await?;
            }
            apply(
                shared,
                CibChange::Delete {
                    section: "resources",
                    xml: format!(r#"<primitive id="{}"/>"#, change::escape(vm)),
                },
            )
            .await?;
            shared
                .wait_until(shared.job_deadline, |snap| {
                    vm_state(snap, vm).is_none().then_some(Ok(()))
                })
                .await?;
            Ok(format!("VM {vm} removed"))
        }
    }
}
