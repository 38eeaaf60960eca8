//! vmhad's operations on the cluster. Each is checked first (a clear error, nothing changed) and then
//! runs as a Job object on the bus with progress, a final result and a `Finished` signal. Operations
//! change the CIB (one change per step) and then wait for Pacemaker to reach the asked state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::{interface, Connection};

use vmha_ops::OpError;

use crate::api::job_path;
use crate::state::Shared;

/// How long a finished job stays on the bus for late readers.
const JOB_LINGER: Duration = Duration::from_secs(600);

pub use vmha_ops::vm::{PreparedVm, VmOp};

/// What a job does.
#[derive(Debug, Clone)]
pub enum Operation {
    /// A one-VM operation (see [`vmha_ops::vm`]).
    Vm(VmOp),
    /// Live clone (see [`vmha_ops::clone`]).
    Clone(Box<vmha_ops::clone::Plan>),
    /// Scaling an elastic group (see [`vmha_ops::group`]).
    Scale(Box<vmha_ops::group::ScalePlan>),
}

/// A request for a job that the DC's vmhad runs (relayed there when asked on another host, see
/// [`crate::relay::job_via_dc`]): journaled on the DC's host, completed or rolled back by the next DC.
#[derive(Debug, Clone)]
pub enum DcJob {
    Clone(vmha_ops::clone::CloneSpec),
    Scale(vmha_ops::group::ScaleSpec),
}

impl DcJob {
    pub fn kind(&self) -> &'static str {
        match self {
            DcJob::Clone(_) => "clone",
            DcJob::Scale(_) => "scale",
        }
    }

    pub fn target(&self) -> String {
        match self {
            DcJob::Clone(spec) => format!(
                "{} -> {}",
                spec.template,
                spec.name.clone().unwrap_or_else(|| format!("{}-clone", spec.template))
            ),
            DcJob::Scale(spec) => spec.group.clone(),
        }
    }

    /// What becomes of the job when the vmhad running it goes away midway.
    pub fn when_lost(&self) -> &'static str {
        match self {
            DcJob::Clone(_) => "its restart or the next DC's vmhad rolls the clone back",
            DcJob::Scale(_) => "its restart or the next DC's vmhad completes the member it was adding or removing",
        }
    }

    /// Checks the request (nothing changes) and makes the job's operation.
    pub async fn check(&self, shared: &Shared) -> Result<Operation, OpError> {
        let p = ports(shared)?;
        Ok(match self {
            DcJob::Clone(spec) => Operation::Clone(Box::new(vmha_ops::clone::check(p, spec).await?)),
            DcJob::Scale(spec) => Operation::Scale(Box::new(vmha_ops::group::check(p, spec).await?)),
        })
    }
}

impl Operation {
    fn kind(&self) -> &'static str {
        match self {
            Operation::Vm(op) => op.kind(),
            Operation::Clone(_) => "clone",
            Operation::Scale(_) => "scale",
        }
    }

    fn target(&self) -> String {
        match self {
            Operation::Vm(op) => op.target(),
            Operation::Clone(plan) => format!("{} -> {}", plan.template, plan.names.join(",")),
            Operation::Scale(plan) => plan.spec.group.clone(),
        }
    }
}

/// Checks an operation against the current state before anything changes.
pub async fn check(shared: &Shared, op: &Operation) -> Result<(), OpError> {
    match op {
        Operation::Vm(op) => vmha_ops::vm::check(ports(shared)?, op).await,
        Operation::Clone(_) | Operation::Scale(_) => Ok(()),
    }
}

fn ports(shared: &Shared) -> Result<&vmha_ops::Ports, OpError> {
    shared.ports().map_err(|_| OpError::NotReady)
}

/// Reads and checks the domain XML of a VM to add.
pub async fn prepare_add(shared: &Shared, name: &str, config: &str) -> Result<PreparedVm, OpError> {
    vmha_ops::vm::prepare_add(ports(shared)?, name, config).await
}

/// Sets or clears a host's `standby` or `maintenance` attribute (one CIB change).
pub async fn set_host_attribute(shared: &Shared, host: &str, attribute: &str, on: bool) -> Result<(), OpError> {
    vmha_ops::vm::set_host_attribute(ports(shared)?, host, attribute, on).await
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
    mirror: Option<Arc<dyn JobMirror>>,
}

/// Where a job's progress and end also go: the vmhad that relayed the request here (implemented by
/// [`crate::relay`], so that jobs do not depend on the relay that starts them).
pub trait JobMirror: Send + Sync + std::fmt::Debug {
    fn update<'a>(&'a self, fraction: Option<f64>, message: &'a str) -> vmha_ops::ports::BoxFuture<'a, ()>;
    fn done<'a>(&'a self, ok: bool, message: &'a str, details: String) -> vmha_ops::ports::BoxFuture<'a, ()>;
}

impl Job {
    /// Puts a job object on the bus and runs `op` in the background; returns the job's path.
    pub async fn start(conn: &Connection, shared: &Arc<Shared>, op: Operation) -> zbus::fdo::Result<OwnedObjectPath> {
        Job::start_mirrored(conn, shared, op, None).await
    }

    /// [`Job::start`], with the job's progress and end also sent to `mirror` (a vmhad that relayed the
    /// request here, see [`crate::relay::job_via_dc`]).
    pub async fn start_mirrored(
        conn: &Connection,
        shared: &Arc<Shared>,
        op: Operation,
        mirror: Option<Arc<dyn JobMirror>>,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        let mut job = Job::create(conn, shared, op.kind(), op.target()).await?;
        job.mirror = mirror;
        let path = job.path.clone();
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let (result, details) = run(&shared, &job, &op).await;
            if let Some(details) = details {
                job.set_details(details);
            }
            job.finish(result).await;
        });
        OwnedObjectPath::try_from(path).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    /// Puts a job object on the bus and runs the future `work` makes of the job (reporting through
    /// it) in the background; the future gives the result and the details (JSON). Returns the job's path.
    pub async fn start_task<F, Fut>(
        conn: &Connection,
        shared: &Arc<Shared>,
        kind: &str,
        target: String,
        work: F,
    ) -> zbus::fdo::Result<OwnedObjectPath>
    where
        F: FnOnce(Job) -> Fut,
        Fut: std::future::Future<Output = (Result<String, String>, String)> + Send + 'static,
    {
        let job = Job::create(conn, shared, kind, target).await?;
        let path = job.path.clone();
        let work = work(job.clone());
        tokio::spawn(async move {
            let (result, details) = work.await;
            job.set_details(details);
            job.finish(result).await;
        });
        OwnedObjectPath::try_from(path).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    /// This job's progress as reported from any thread (a transfer's, from the thread doing it).
    pub fn reporter(&self) -> JobReport {
        JobReport {
            job: self.clone(),
            runtime: tokio::runtime::Handle::current(),
        }
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

    /// Sets what the job leaves for its caller (JSON), before it finishes.
    pub(crate) fn set_details(&self, details: String) {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).details = details;
    }

    /// Reports progress (`fraction` when known).
    pub(crate) async fn report(&self, fraction: Option<f64>, message: &str) {
        self.update(fraction, None, message).await;
    }

    async fn update(&self, progress: Option<f64>, state: Option<&str>, message: &str) {
        if let (Some(m), None) = (&self.mirror, state) {
            m.update(progress, message).await;
        }
        {
            let mut info = self.info.lock().unwrap_or_else(|p| p.into_inner());
            // A step reported late (a reporter task that ran on past the job's end) must not overwrite how
            // the job ended: its Message stays the outcome.
            if state.is_none() && info.state != "running" {
                return;
            }
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

    /// The job's kind ("migrate", "clone"...), for the log's `vmha_job_kind` field.
    fn kind(&self) -> String {
        self.info.lock().map(|i| i.kind.clone()).unwrap_or_default()
    }

    /// Reports a step.
    pub async fn progress(&self, fraction: f64, message: &str) {
        tracing::info!(vmha_job = self.id(), vmha_job_kind = %self.kind(), fraction, message, "job progress");
        self.update(Some(fraction), None, message).await;
    }

    pub(crate) async fn finish(self, result: Result<String, String>) {
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        if let Some(m) = &self.mirror {
            let details = self.info.lock().map(|i| i.details.clone()).unwrap_or_default();
            m.done(ok, &message, details).await;
        }
        tracing::info!(vmha_job = self.id(), vmha_job_kind = %self.kind(), ok, %message, "job finished");
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
        let info = self.info.lock().map(|i| i.clone()).ok();
        if let Some(i) = info {
            crate::signals::event(&self.conn, "job", &format!("{} {}", i.kind, i.target), &i.message).await;
        }
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::spawn(async move {
            tokio::time::sleep(JOB_LINGER).await;
            let _ = conn.object_server().remove::<JobObject, _>(path.as_str()).await;
        });
    }
}

/// A job's progress reported from another thread (see [`Job::reporter`]).
#[derive(Debug)]
pub struct JobReport {
    job: Job,
    runtime: tokio::runtime::Handle,
}

impl crate::vcluster::Report for JobReport {
    fn step(&self, fraction: Option<f64>, message: &str) {
        let job = self.job.clone();
        let message = message.to_string();
        tracing::info!(vmha_job = job.id(), vmha_job_kind = %job.kind(), ?fraction, %message, "job progress");
        self.runtime
            .spawn(async move { job.update(fraction, None, &message).await });
    }
}

/// Runs a job's operation: its result message and the details it leaves (JSON), if any.
async fn run(shared: &Arc<Shared>, job: &Job, op: &Operation) -> (Result<String, String>, Option<String>) {
    let ports = match shared.ports() {
        Ok(p) => p,
        Err(e) => return (Err(e), None),
    };
    match op {
        Operation::Vm(op) => with_class(vmha_ops::vm::run(ports, job, op).await),
        Operation::Clone(plan) => with_class(vmha_ops::clone::run(ports, job, plan, job.id()).await),
        Operation::Scale(plan) => {
            let (summary, outcome) = vmha_ops::group::run(ports, job, plan, job.id()).await;
            let class = outcome.err().map(|e| crate::errors::op_error(e).short_name());
            let message = summary.message();
            let details = scale_details(&summary, class.as_deref());
            (if class.is_none() { Ok(message) } else { Err(message) }, Some(details))
        }
    }
}

/// A job's result, and when it failed Details naming the `org.vmha.Vmha1.Error` class of its error
/// (`{"error_class": "GuestRefused"}`): a client, also on another host through the relay, tells a guest's
/// refusal from a libvirt failure by it.
fn with_class(r: Result<String, vmha_ops::OpError>) -> (Result<String, String>, Option<String>) {
    match r {
        Ok(message) => (Ok(message), None),
        Err(e) => {
            let message = e.to_string();
            let class = crate::errors::op_error(e).short_name();
            (
                Err(message),
                Some(serde_json::json!({ "error_class": class }).to_string()),
            )
        }
    }
}

/// A scale job's Details: its summary (`group`, `from`, `asked`, `size`, `steps`, `error`) and, when it
/// failed, the `org.vmha.Vmha1.Error` class of its error (`error_class`, e.g. `GuestRefused`).
pub fn scale_details(summary: &vmha_ops::group::ScaleSummary, class: Option<&str>) -> String {
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    if let (Some(class), Some(map)) = (class, v.as_object_mut()) {
        map.insert("error_class".into(), class.into());
    }
    v.to_string()
}
