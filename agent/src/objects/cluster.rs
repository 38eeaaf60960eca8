//! The Cluster object (`/org/vmha/Vmha1`, `org.vmha.Vmha1.Cluster`).

use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::{interface, Connection};

use crate::api::Error;
use crate::auth::authorize_change;
use crate::errors::op_error;
use crate::jobs::{self, DcJob, Job, Operation, VmOp};
use crate::state::Shared;

use super::{known_host, known_vm, ready, Result};

/// An archive passed as a file descriptor: open for writing (`write`) or reading, and not a directory.
pub(super) fn archive_file(fd: zbus::zvariant::OwnedFd, write: bool) -> Result<std::fs::File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let bad = |why: String| Error::InvalidArgument(format!("the archive file descriptor {why}"));
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(fd));
    let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| bad(format!("cannot be inspected: {e}")))?;
    let mode = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE;
    let ok = if write {
        mode == OFlag::O_WRONLY || mode == OFlag::O_RDWR
    } else {
        mode == OFlag::O_RDONLY || mode == OFlag::O_RDWR
    };
    if !ok {
        return Err(bad(format!(
            "is not open for {}",
            if write { "writing" } else { "reading" }
        )));
    }
    let meta = file.metadata().map_err(|e| bad(format!("cannot be inspected: {e}")))?;
    if meta.is_dir() {
        return Err(bad("is a directory".into()));
    }
    Ok(file)
}

/// The error a caller gets for a refusal of the archive store.
fn store_error(e: crate::archive_store::StoreError) -> Error {
    use crate::archive_store::StoreError as S;
    match e {
        S::BadName(..) | S::Missing(_) => Error::InvalidArgument(e.to_string()),
        S::Exists(_) => Error::Conflict(e.to_string()),
        S::Io { .. } => Error::Failed(e.to_string()),
    }
}

/// Checks that the virtual cluster `name` exists and can be captured (nothing is written).
async fn check_vcluster(shared: &Arc<Shared>, name: &str) -> Result<()> {
    let cib = shared.backend.query().await.map_err(Error::cib)?;
    vmha_vcluster::capture::capture(&cib, name).map_err(|e| match e {
        vmha_vcluster::VclusterError::NotFound(m) => Error::UnknownGroup(m),
        vmha_vcluster::VclusterError::Cib(m) => Error::Cib(m),
        other => Error::invalid(other),
    })?;
    Ok(())
}

/// Starts a capture job into `file`: the caller's file, or with `store` (the pending file and its
/// archive name) a file of the archive store, named only when the capture succeeded (`pending` removes the
/// partial file otherwise).
async fn start_capture(
    conn: &Connection,
    shared: &Arc<Shared>,
    opts: crate::vcluster::CaptureOptions,
    file: std::fs::File,
    store: Option<(crate::archive_store::Pending, String)>,
) -> Result<OwnedObjectPath> {
    let job_shared = Arc::clone(shared);
    let path = Job::start_task(conn, shared, "capture", opts.name.clone(), move |job| async move {
        let ports = match job_shared.ports() {
            Ok(p) => p.clone(),
            Err(e) => return (Err(e), String::new()),
        };
        let report: Arc<dyn crate::vcluster::Report> = Arc::new(job.reporter());
        let mut summary = match crate::vcluster::run_capture(&ports, &job, report, &opts, file, job.id()).await {
            Ok(summary) => summary,
            Err(e) => {
                let details = serde_json::json!({"error_class": op_error(e.clone()).short_name()});
                return (Err(e.to_string()), details.to_string());
            }
        };
        let Some((pending, archive)) = store else {
            let message = crate::vcluster::capture_text(&summary, std::path::Path::new("the archive"));
            return (Ok(message), summary.to_string());
        };
        match pending.finish() {
            Ok(path) => {
                let message = crate::vcluster::capture_text(&summary, &path);
                summary["archive"] = serde_json::json!(archive);
                (Ok(message), summary.to_string())
            }
            Err(e) => {
                let message = e.to_string();
                let details = serde_json::json!({"error_class": store_error(e).short_name()});
                (Err(message), details.to_string())
            }
        }
    })
    .await?;
    Ok(path)
}

/// Starts an instantiate job on the archive in `file` (checked options, see `instantiate_vcluster`).
async fn start_instantiate(
    conn: &Connection,
    shared: &Arc<Shared>,
    file: std::fs::File,
    opts: crate::vcluster::InstantiateOptions,
    stored: Option<&str>,
) -> Result<OwnedObjectPath> {
    let spec = opts.spec().map_err(|e| Error::InvalidArgument(format!("{e:#}")))?;
    // The job's Target names what is instantiated: the new name, else the stored archive (a file passed by
    // descriptor has no name here); a dry run says so, so that a plan is not read as an instantiate.
    let mut target = match (&opts.name, stored) {
        (Some(name), _) => name.clone(),
        (None, Some(archive)) => format!("from archive {archive}"),
        (None, None) => "(archive)".into(),
    };
    if opts.dry_run {
        target.push_str(" (plan)");
    }
    let job_shared = Arc::clone(shared);
    let path = Job::start_task(conn, shared, "instantiate", target, move |job| async move {
        let ports = match job_shared.ports() {
            Ok(p) => p.clone(),
            Err(e) => return (Err(e), String::new()),
        };
        let report: Arc<dyn crate::vcluster::Report> = Arc::new(job.reporter());
        let done = crate::vcluster::run_instantiate(&ports, &job, report, file, &spec, job.id()).await;
        let mut details = done.details();
        if let Err(e) = &done.result {
            details["error_class"] = serde_json::json!(op_error(e.clone()).short_name());
        }
        (done.result.map_err(|e| e.to_string()), details.to_string())
    })
    .await?;
    Ok(path)
}

/// The signing key of a capture: none, or read from the one regular file the caller passed (a pipe or
/// socket could block the bus handler). Its content never appears in an error.
fn signing_key(fds: Vec<zbus::zvariant::OwnedFd>) -> Result<Option<vmha_vcluster::signature::SecretKey>> {
    let bad = |why: String| Error::InvalidArgument(format!("the signing key: {why}"));
    let mut fds = fds.into_iter();
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    if fds.next().is_some() {
        return Err(bad("more than one key file descriptor".into()));
    }
    let file = archive_file(fd, false).map_err(|e| bad(e.message()))?;
    let meta = file.metadata().map_err(|e| bad(format!("cannot be inspected: {e}")))?;
    if !meta.is_file() {
        return Err(bad("the file descriptor is not a regular file".into()));
    }
    let key = vmha_vcluster::signature::SecretKey::read(&file, "the signing key file").map_err(Error::invalid)?;
    Ok(Some(key))
}

/// The cluster as a whole: `/org/vmha/Vmha1`, interface `org.vmha.Vmha1.Cluster`.
#[derive(Debug)]
pub struct ClusterObject {
    pub shared: Arc<Shared>,
}

impl ClusterObject {
    /// Runs a job that the DC's vmhad drives (which checks the request itself), so that the next DC
    /// takes over a job whose host died: relayed there, or run here when this is the DC or the DC has no
    /// vmhad to reach.
    async fn on_dc(&self, conn: &Connection, spec: DcJob) -> Result<OwnedObjectPath> {
        if let Some(dc) = crate::relay::job_host(&self.shared) {
            return crate::relay::job_via_dc(conn, &self.shared, &dc, spec).await;
        }
        let dc = self.shared.snapshot().dc().map(str::to_string);
        if dc.as_deref() != Some(self.shared.local_host.as_str()) {
            tracing::warn!(
                ?dc,
                kind = spec.kind(),
                "running a job here: the DC's vmhad cannot be reached (no DC, no vmhad there, or the relay is down)"
            );
        }
        let op = spec.check(&self.shared).await.map_err(op_error)?;
        Ok(Job::start(conn, &self.shared, op).await?)
    }
}

#[interface(name = "org.vmha.Vmha1.Cluster")]
impl ClusterObject {
    /// Cluster name (Pacemaker's `cluster-name`).
    #[zbus(property)]
    async fn name(&self) -> String {
        self.shared
            .snapshot()
            .view
            .as_ref()
            .and_then(|v| v.cluster_name.clone())
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn quorate(&self) -> bool {
        self.shared.snapshot().quorate()
    }

    /// The host Pacemaker elected designated controller; empty while there is none.
    #[zbus(property)]
    async fn designated_controller(&self) -> String {
        self.shared.snapshot().dc().unwrap_or_default().to_string()
    }

    /// Hosts in the cluster membership.
    #[zbus(property)]
    async fn members(&self) -> Vec<String> {
        self.shared.snapshot().members()
    }

    /// Hosts where vmhad runs (the `vmhad` Corosync process group); empty while Corosync is unreachable.
    #[zbus(property)]
    async fn agents(&self) -> Vec<String> {
        self.shared
            .snapshot()
            .membership
            .as_ref()
            .map(|m| m.agents.clone())
            .unwrap_or_default()
    }

    /// The host this vmhad runs on.
    #[zbus(property)]
    async fn local_host(&self) -> String {
        self.shared.local_host.clone()
    }

    #[zbus(property)]
    async fn stonith_enabled(&self) -> bool {
        self.shared.snapshot().view.as_ref().is_some_and(|v| v.stonith_enabled)
    }

    /// True while vmhad reads the CIB (false: the properties may be stale). False with an empty
    /// CibVersion: vmhad has not read the cluster yet (still connecting), so Quorate,
    /// DesignatedController and StonithEnabled are defaults, not the cluster's.
    #[zbus(property)]
    async fn connected(&self) -> bool {
        self.shared.snapshot().cib_connected
    }

    /// CIB version `admin_epoch.epoch.num_updates` the properties reflect; empty until vmhad first read the
    /// CIB.
    #[zbus(property)]
    async fn cib_version(&self) -> String {
        self.shared
            .snapshot()
            .view
            .as_ref()
            .map(|v| v.version.clone())
            .unwrap_or_default()
    }

    /// The virtual clusters (the CIB's tags, as `vmha vcluster list` lists them): (name, member resources
    /// in order), by name; empty until vmhad first read the CIB.
    #[zbus(property)]
    async fn virtual_clusters(&self) -> Vec<(String, Vec<String>)> {
        self.shared
            .snapshot()
            .view
            .as_ref()
            .map(|v| v.vclusters.iter().map(|(n, m)| (n.clone(), m.clone())).collect())
            .unwrap_or_default()
    }

    /// The elastic groups of the stored placement policy (as `vmha group list` lists them): (name,
    /// template, min, max, members in order, the newest last), by name; empty without a stored policy,
    /// when it does not read, or until vmhad first read the CIB.
    #[zbus(property)]
    async fn elastic_groups(&self) -> Vec<(String, String, u32, u32, Vec<String>)> {
        self.shared
            .snapshot()
            .view
            .as_ref()
            .map(|v| {
                v.groups
                    .iter()
                    .map(|g| (g.name.clone(), g.template.clone(), g.min, g.max, g.members.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Defines a VM from its domain XML file (on storage every host sees) as a cluster resource under
    /// `ocf:vmha:VirtualMachine`, with utilization from the definition; starts it when `start` is true.
    /// Returns the job.
    async fn add_vm(
        &self,
        name: String,
        config: String,
        start: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        authorize_change(conn, &header, &format!("add VM {name}")).await?;
        let snap = ready(&self.shared)?;
        if known_vm(&snap, &name).is_ok() {
            return Err(Error::Conflict(format!("a VM named {name} exists already")));
        }
        let prepared = jobs::prepare_add(&self.shared, &name, &config)
            .await
            .map_err(op_error)?;
        Ok(Job::start(conn, &self.shared, Operation::Vm(VmOp::Add { prepared, start })).await?)
    }

    /// Live-clones the running VM `template` (see `vmha clone`): `name` (empty: `<template>-clone`; with
    /// `count` > 1 the clones are `<name>-1` ... `<name>-N`) on `host` (empty: the host with the most free
    /// memory). Without `force` the template's guest is asked to prepare first and a refusal aborts.
    /// Checked before anything changes; returns the job.
    #[allow(clippy::too_many_arguments)] // the D-Bus signature plus zbus's header and connection
    async fn clone_vm(
        &self,
        template: String,
        name: String,
        host: String,
        count: u32,
        force: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        authorize_change(conn, &header, &format!("clone VM {template}")).await?;
        if count == 0 || count > vmha_ops::clone::MAX_COUNT {
            return Err(Error::InvalidArgument(format!(
                "count must be 1..={}",
                vmha_ops::clone::MAX_COUNT
            )));
        }
        let snap = ready(&self.shared)?;
        known_vm(&snap, &template)?;
        if !host.is_empty() {
            known_host(&snap, &host)?;
        }
        let spec = vmha_ops::clone::CloneSpec {
            template,
            name: (!name.is_empty()).then_some(name),
            host: (!host.is_empty()).then_some(host),
            count,
            force,
        };
        self.on_dc(conn, DcJob::Clone(spec)).await
    }

    /// Brings the elastic group `group` of the stored placement policy to `size` members (see `vmha group
    /// scale`): grows by live clones of its template (without `force` its guest is asked to prepare
    /// first), shrinks by asking the newest members' guests to drain (each has `drain_timeout_ms`; a
    /// refusal stops the shrink there) and destroying them. Checked before anything changes (the size
    /// within the group's min and max); run as a journaled job by the DC's vmhad. Returns the job; its
    /// Details are the summary (JSON: group, from, asked, size, steps, error, and error_class when it
    /// failed).
    #[allow(clippy::too_many_arguments)] // the D-Bus signature plus zbus's header and connection
    async fn scale_group(
        &self,
        group: String,
        size: u32,
        force: bool,
        drain_timeout_ms: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        authorize_change(conn, &header, &format!("scale group {group}")).await?;
        let max = crate::guest::MAX_REQUEST_MS;
        if !(1..=max).contains(&drain_timeout_ms) {
            return Err(Error::InvalidArgument(format!(
                "the drain timeout must be 1..={max} ms"
            )));
        }
        ready(&self.shared)?;
        let spec = vmha_ops::group::ScaleSpec {
            group,
            size,
            force,
            drain_ms: drain_timeout_ms,
        };
        self.on_dc(conn, DcJob::Scale(spec)).await
    }

    /// Captures the virtual cluster `name` (see `vmha vcluster capture`) into `archive`, a file the
    /// caller opened for writing (written from its start, synced; naming and removing the file is the
    /// caller's). `with_disks` adds the disk images, `halt` stops the members around the disk copy
    /// (otherwise their file systems are frozen through qemu-guest-agent), `level` is zstd's (1..19).
    /// `sign_key` is empty or one secret key file (`vmha vcluster keygen`) the caller opened for reading:
    /// the archive is signed with it (the key is read from the file here, never sent as bytes on the bus).
    /// Checked before anything changes; returns the job, whose Details are the capture's summary (JSON).
    #[allow(clippy::too_many_arguments)] // the D-Bus signature plus zbus's header and connection
    async fn capture_vcluster(
        &self,
        name: String,
        archive: zbus::zvariant::OwnedFd,
        with_disks: bool,
        halt: bool,
        level: i32,
        sign_key: Vec<zbus::zvariant::OwnedFd>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        authorize_change(conn, &header, &format!("capture virtual cluster {name}")).await?;
        let file = archive_file(archive, true)?;
        let sign = signing_key(sign_key)?;
        if !(1..=19).contains(&level) {
            return Err(Error::InvalidArgument(format!("zstd level {level} is outside 1..19")));
        }
        check_vcluster(&self.shared, &name).await?;
        let opts = crate::vcluster::CaptureOptions {
            name,
            with_disks,
            halt,
            level,
            sign,
        };
        start_capture(conn, &self.shared, opts, file, None).await
    }

    /// Instantiates the virtual cluster in `archive`, a file the caller opened for reading (see `vmha
    /// vcluster instantiate`): `maps` are `KIND=OLD:NEW` specifications, `name` (empty: the archive's)
    /// renames it, `dry_run` only checks and plans, `wait_seconds` (0: do not wait) bounds the wait for
    /// its VMs to run, `allow` lets through what the safe subset refuses (categories such as
    /// `qemu-args`, agents as `agent=CLASS:PROVIDER:TYPE`; each item let through is listed in the plan).
    /// `require_signature` refuses, before anything is created, an archive not signed by a trusted key;
    /// `trusted_keys` are the trusted public keys as (where from, key file text), empty: those in
    /// /etc/vmha/trusted-keys/*.pub. Everything it created is removed again on failure. Returns the job,
    /// whose Details hold the plan (with the archive's signer) and the problems of the target (JSON).
    #[allow(clippy::too_many_arguments)] // the D-Bus signature plus zbus's header and connection
    async fn instantiate_vcluster(
        &self,
        archive: zbus::zvariant::OwnedFd,
        maps: Vec<String>,
        name: String,
        dry_run: bool,
        wait_seconds: u32,
        allow: Vec<String>,
        require_signature: bool,
        trusted_keys: Vec<(String, String)>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        authorize_change(conn, &header, "instantiate a virtual cluster").await?;
        let file = archive_file(archive, false)?;
        let name = (!name.is_empty()).then_some(name);
        vmha_vcluster::Maps::parse(&maps, name.clone()).map_err(Error::invalid)?;
        vmha_vcluster::domain_check::Allow::parse(&allow).map_err(Error::InvalidArgument)?;
        let opts = crate::vcluster::InstantiateOptions {
            maps,
            name: name.clone(),
            allow,
            dry_run,
            wait: std::time::Duration::from_secs(wait_seconds.into()),
            require_signature,
            trusted_keys,
        };
        start_instantiate(conn, &self.shared, file, opts, None).await
    }

    /// Captures the virtual cluster `name` as `capture_vcluster` does, into the archive `archive` of
    /// vmhad's archive store (its option archive-dir): for callers that cannot pass a file descriptor, such as
    /// the web console. `archive` is a name (1 to 64 of letters, digits, `.`, `_`, `-`, starting with a
    /// letter or digit), never a path; one that exists is refused (Conflict). The archive gets its name
    /// only when the capture succeeded: a failed capture leaves nothing in the store. zstd level 3, not
    /// signed.
    async fn capture_vcluster_to_store(
        &self,
        name: String,
        archive: String,
        with_disks: bool,
        halt: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        authorize_change(
            conn,
            &header,
            &format!("capture virtual cluster {name} into archive {archive}"),
        )
        .await?;
        crate::archive_store::check_name(&archive).map_err(store_error)?;
        check_vcluster(&self.shared, &name).await?;
        let (file, pending) = self.shared.archive_store().create(&archive).map_err(store_error)?;
        let opts = crate::vcluster::CaptureOptions {
            name,
            with_disks,
            halt,
            level: 3,
            sign: None,
        };
        start_capture(conn, &self.shared, opts, file, Some((pending, archive))).await
    }

    /// Instantiates the virtual cluster in archive `archive` of vmhad's archive store, as
    /// `instantiate_vcluster` does (no items let through the safe subset, no signature required): for
    /// callers that cannot pass a file descriptor, such as the web console, which shows the plan of a
    /// `dry_run` first.
    #[allow(clippy::too_many_arguments)] // the D-Bus signature plus zbus's header and connection
    async fn instantiate_vcluster_from_store(
        &self,
        archive: String,
        maps: Vec<String>,
        name: String,
        dry_run: bool,
        wait_seconds: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        authorize_change(
            conn,
            &header,
            &format!("instantiate a virtual cluster from archive {archive}"),
        )
        .await?;
        let file = self.shared.archive_store().open(&archive).map_err(store_error)?;
        let name = (!name.is_empty()).then_some(name);
        vmha_vcluster::Maps::parse(&maps, name.clone()).map_err(Error::invalid)?;
        let opts = crate::vcluster::InstantiateOptions {
            maps,
            name: name.clone(),
            allow: Vec::new(),
            dry_run,
            wait: std::time::Duration::from_secs(wait_seconds.into()),
            require_signature: false,
            trusted_keys: Vec::new(),
        };
        start_instantiate(conn, &self.shared, file, opts, Some(&archive)).await
    }

    /// The archives in vmhad's archive store: (name, bytes, modified as seconds since the epoch), by name.
    /// Reading only: every caller may ask.
    async fn stored_archives(&self) -> Result<Vec<(String, u64, u64)>> {
        self.shared.archive_store().list().map_err(store_error)
    }

    /// What Pacemaker's scheduler would do if the hosts `hosts` failed, or every host of zone `zone`
    /// (exactly one of the two non-empty): the answer of `vmha what-if` with JSON output (see `vmha
    /// what-if`; JSON: failed_hosts, vms with each VM's outcome, zones with the capacity left). Run on a
    /// copy of the live CIB in a child process with a deadline; changes nothing, so every caller may
    /// ask. One at a time per vmhad (Conflict while another runs).
    async fn what_if(&self, hosts: Vec<String>, zone: String) -> Result<String> {
        ready(&self.shared)?;
        crate::whatif::run(&self.shared, hosts, zone).await
    }

    /// Something happened in the cluster (a host left, a DC was elected, a VM failed, a job ended).
    #[zbus(signal)]
    pub async fn event(emitter: &SignalEmitter<'_>, kind: &str, subject: &str, message: &str) -> zbus::Result<()>;

    /// A valid message from the guest of `vm` on this host (one JSON line of the guest channel protocol:
    /// a hello or a request's result). Untrusted content: it comes from inside the VM.
    #[zbus(signal)]
    pub async fn guest_message(emitter: &SignalEmitter<'_>, vm: &str, json: &str) -> zbus::Result<()>;
}
