//! vmhad's D-Bus objects: the Cluster (root), one Host per cluster node, one VirtualMachine per VM
//! resource, and Job objects for long operations. Properties read the current [`Snapshot`]; after every
//! state change [`publish`] adds and removes objects and emits PropertiesChanged for what changed.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::{interface, Connection};

use crate::api::{host_path, vm_path, Error};
use crate::auth::authorize_change;
use crate::errors::op_error;
use crate::guest::GuestError;
use crate::jobs::{self, DcJob, Job, Operation, VmOp};
use crate::state::{Shared, Snapshot};

/// What vmhad's methods return: a typed error (`org.vmha.Vmha1.Error.*`) on failure.
type Result<T> = std::result::Result<T, Error>;

/// The current snapshot, when vmhad has read the cluster (NotReady otherwise). The checks of the
/// operations refuse the same with a plain message; these come first so that the class is known.
fn ready(shared: &Shared) -> Result<Arc<Snapshot>> {
    let snap = shared.snapshot();
    if snap.view.is_none() {
        return Err(Error::NotReady(if snap.cib_connected {
            "vmhad has not read the cluster yet".into()
        } else {
            "vmhad cannot read the CIB right now (still connecting, or Pacemaker is unreachable)".into()
        }));
    }
    Ok(snap)
}

/// UnknownVm unless `name` is a cluster VM.
fn known_vm(snap: &Snapshot, name: &str) -> Result<()> {
    match snap.view.as_ref().and_then(|v| v.vm(name)) {
        Some(_) => Ok(()),
        None => Err(Error::UnknownVm(format!("unknown VM {name}"))),
    }
}

/// UnknownHost unless `name` is a cluster host.
fn known_host(snap: &Snapshot, name: &str) -> Result<()> {
    match snap.view.as_ref().and_then(|v| v.host(name)) {
        Some(_) => Ok(()),
        None => Err(Error::UnknownHost(format!("unknown host {name}"))),
    }
}

/// An operation's error as a D-Bus error, with its message: what is wrong with the request is
/// `InvalidArgs`, the rest `Failed`.
/// An archive passed as a file descriptor: open for writing (`write`) or reading, and not a directory.
fn archive_file(fd: zbus::zvariant::OwnedFd, write: bool) -> Result<std::fs::File> {
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
        let cib = self.shared.backend.query().await.map_err(Error::cib)?;
        vmha_vcluster::capture::capture(&cib, &name).map_err(|e| match e {
            vmha_vcluster::VclusterError::NotFound(m) => Error::UnknownGroup(m),
            vmha_vcluster::VclusterError::Cib(m) => Error::Cib(m),
            other => Error::invalid(other),
        })?;
        let opts = crate::vcluster::CaptureOptions {
            name: name.clone(),
            with_disks,
            halt,
            level,
            sign,
        };
        let path = Job::start_on_thread(conn, &self.shared, "capture", name, move |report| {
            let r = crate::vcluster::block_on(crate::vcluster::capture_to(&opts, file, report));
            match r.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(summary) => {
                    let message = crate::vcluster::capture_text(&summary, std::path::Path::new("the archive"));
                    (Ok(message), summary.to_string())
                }
                Err(e) => (Err(format!("{e:#}")), String::new()),
            }
        })
        .await?;
        Ok(path)
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
        opts.trust().map_err(|e| Error::InvalidArgument(format!("{e:#}")))?;
        let target = name.unwrap_or_else(|| "(archive)".into());
        let path = Job::start_on_thread(conn, &self.shared, "instantiate", target, move |report| {
            match crate::vcluster::block_on(crate::vcluster::instantiate_from(file, &opts, report)) {
                Ok(done) => {
                    let details = done.details().to_string();
                    (done.result.map_err(|e| format!("{e:#}")), details)
                }
                Err(e) => (Err(format!("cannot run the job: {e}")), String::new()),
            }
        })
        .await?;
        Ok(path)
    }

    /// Something happened in the cluster (a host left, a DC was elected, a VM failed, a job ended).
    #[zbus(signal)]
    pub async fn event(emitter: &SignalEmitter<'_>, kind: &str, subject: &str, message: &str) -> zbus::Result<()>;

    /// A valid message from the guest of `vm` on this host (one JSON line of the guest channel protocol:
    /// a hello or a request's result). Untrusted content: it comes from inside the VM.
    #[zbus(signal)]
    pub async fn guest_message(emitter: &SignalEmitter<'_>, vm: &str, json: &str) -> zbus::Result<()>;
}

/// One host: `/org/vmha/Vmha1/host/<name>`, interface `org.vmha.Vmha1.Host`.
#[derive(Debug)]
pub struct HostObject {
    pub shared: Arc<Shared>,
    pub name: String,
}

impl HostObject {
    fn view(&self) -> Option<vmha_model::HostView> {
        self.shared.snapshot().view.as_ref()?.host(&self.name).cloned()
    }

    async fn set_attribute(&self, conn: &Connection, header: &Header<'_>, attribute: &str, on: bool) -> Result<()> {
        authorize_change(conn, header, &format!("{attribute} of host {}", self.name)).await?;
        known_host(&*ready(&self.shared)?, &self.name)?;
        // Past the checks above, what fails is reading or changing the CIB.
        jobs::set_host_attribute(&self.shared, &self.name, attribute, on)
            .await
            .map_err(op_error)
    }
}

#[interface(name = "org.vmha.Vmha1.Host")]
impl HostObject {
    #[zbus(property)]
    async fn name(&self) -> String {
        self.name.clone()
    }

    /// `online`, `pending`, `unclean` (lost, not yet fenced) or `offline`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.view()
            .map(|h| {
                serde_json::to_value(h.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn standby(&self) -> bool {
        self.view().is_some_and(|h| h.standby)
    }

    #[zbus(property)]
    async fn maintenance(&self) -> bool {
        self.view().is_some_and(|h| h.maintenance)
    }

    #[zbus(property)]
    async fn is_designated_controller(&self) -> bool {
        self.shared.snapshot().dc() == Some(self.name.as_str())
    }

    /// Capacity for placement (`cpu`, `hv_memory` in MiB).
    #[zbus(property)]
    async fn utilization(&self) -> HashMap<String, String> {
        self.view()
            .map(|h| h.utilization.into_iter().collect())
            .unwrap_or_default()
    }

    /// Standby: no VM may run here; running VMs are moved away by Pacemaker.
    async fn set_standby(
        &self,
        on: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.set_attribute(conn, &header, "standby", on).await
    }

    /// Maintenance: Pacemaker neither starts, stops nor monitors anything here.
    async fn set_maintenance(
        &self,
        on: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.set_attribute(conn, &header, "maintenance", on).await
    }
}

/// One VM resource: `/org/vmha/Vmha1/vm/<name>`, interface `org.vmha.Vmha1.VirtualMachine`.
#[derive(Debug)]
pub struct VmObject {
    pub shared: Arc<Shared>,
    pub name: String,
}

impl VmObject {
    fn view(&self) -> Option<vmha_model::VmView> {
        self.shared.snapshot().view.as_ref()?.vm(&self.name).cloned()
    }

    async fn operation(&self, conn: &Connection, header: &Header<'_>, what: &str, op: VmOp) -> Result<OwnedObjectPath> {
        authorize_change(conn, header, &format!("{what} VM {}", self.name)).await?;
        let snap = ready(&self.shared)?;
        known_vm(&snap, &self.name)?;
        if let VmOp::Move { host, .. } = &op {
            known_host(&snap, host)?;
        }
        let op = Operation::Vm(op);
        jobs::check(&self.shared, &op).await.map_err(op_error)?;
        Ok(Job::start(conn, &self.shared, op).await?)
    }
}

#[interface(name = "org.vmha.Vmha1.VirtualMachine")]
impl VmObject {
    #[zbus(property)]
    async fn name(&self) -> String {
        self.name.clone()
    }

    /// Resource agent, e.g. `ocf:vmha:VirtualMachine`.
    #[zbus(property)]
    async fn agent(&self) -> String {
        self.view().map(|v| v.agent).unwrap_or_default()
    }

    /// `running`, `stopped`, `starting`, `stopping`, `migrating` or `failed`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.view()
            .and_then(|v| serde_json::to_value(v.state).ok()?.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Hosts the VM runs on (one, except while something is wrong).
    #[zbus(property)]
    async fn hosts(&self) -> Vec<String> {
        self.view().map(|v| v.hosts).unwrap_or_default()
    }

    #[zbus(property)]
    async fn failed_on(&self) -> Vec<String> {
        self.view().map(|v| v.failed_on).unwrap_or_default()
    }

    #[zbus(property)]
    async fn fail_counts(&self) -> HashMap<String, u32> {
        self.view()
            .map(|v| v.fail_counts.into_iter().collect())
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn target_role(&self) -> String {
        self.view().and_then(|v| v.target_role).unwrap_or_default()
    }

    #[zbus(property)]
    async fn managed(&self) -> bool {
        self.view().is_some_and(|v| v.managed)
    }

    /// Domain XML file.
    #[zbus(property)]
    async fn config(&self) -> String {
        self.view().and_then(|v| v.config).unwrap_or_default()
    }

    /// Constraints naming the VM, one line each.
    #[zbus(property)]
    async fn constraints(&self) -> Vec<String> {
        self.view()
            .map(|v| {
                v.constraints
                    .into_iter()
                    .map(|c| format!("{}: {}", c.id, c.summary))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn utilization(&self) -> HashMap<String, String> {
        self.view()
            .map(|v| v.utilization.into_iter().collect())
            .unwrap_or_default()
    }

    /// Starts the VM (target-role Started); the job ends when it runs.
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "start", VmOp::Start(self.name.clone()))
            .await
    }

    /// Stops the VM (target-role Stopped); the job ends when it is stopped everywhere.
    async fn stop(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "stop", VmOp::Stop(self.name.clone()))
            .await
    }

    /// Clears the VM's failures on `host` (empty: every host), as `pcs resource cleanup`: Pacemaker's
    /// attribute manager drops its fail counts and last-failure times, and each host showing a failure of
    /// it forgets that operation history and probes it again. Returns the hosts probed again. An unknown
    /// host is refused (UnknownHost) and changes nothing.
    async fn cleanup(
        &self,
        host: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>> {
        authorize_change(conn, &header, &format!("clean up VM {}", self.name)).await?;
        use crate::failures::CleanupError as E;
        crate::failures::cleanup(&self.shared, &self.name, &host)
            .await
            .map_err(|e| match e {
                E::UnknownVm(_) => Error::UnknownVm(e.to_string()),
                E::UnknownHost { .. } => Error::UnknownHost(e.to_string()),
                E::Agent { .. } => Error::InvalidArgument(e.to_string()),
                E::Cib { .. } | E::Attrd { .. } | E::Refresh { .. } => Error::Cib(e.to_string()),
            })
    }

    /// Live-migrates the VM to `host` through Pacemaker; the temporary constraint is removed afterwards.
    #[zbus(name = "Move")]
    async fn move_to(
        &self,
        host: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(
            conn,
            &header,
            "move",
            VmOp::Move {
                vm: self.name.clone(),
                host,
            },
        )
        .await
    }

    /// Sends request `name` (with `data_json`, a JSON object, possibly empty) to the VM's guest over the
    /// vmha guest channel and waits for its result, at most `timeout_ms` (the guest's deadline) plus one
    /// second: `done`, `refused` (with the guest's reason) or `failed` (with why). Any host's vmhad takes
    /// it: a VM running on another host is reached through that host's vmhad (Corosync CPG relay).
    async fn guest_request(
        &self,
        name: String,
        data_json: String,
        timeout_ms: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, String)> {
        authorize_change(conn, &header, &format!("guest request {name} to VM {}", self.name)).await?;
        // Wherever the VM runs: through the relay when that is another host.
        crate::relay::guest_request(&self.shared, &self.name, &name, &data_json, timeout_ms)
            .await
            .map_err(|e| match e {
                GuestError::Invalid(m) => Error::InvalidArgument(m),
                GuestError::Unreachable(m) => Error::GuestUnreachable(m),
                other @ (GuestError::NotHere { .. } | GuestError::NotConnected(_)) => {
                    Error::GuestUnreachable(other.to_string())
                }
            })
    }

    /// Removes a clone (as Remove) and deletes its domain XML file and disk overlays; refuses VMs that are
    /// not vmha clones.
    async fn destroy(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "destroy", VmOp::Destroy(self.name.clone()))
            .await
    }

    /// Stops the VM and removes its resource and the constraints naming it.
    async fn remove(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "remove", VmOp::Remove(self.name.clone()))
            .await
    }
}

macro_rules! emit_all {
    ($iface:expr, $emitter:expr; $($prop:ident),+ $(,)?) => {{
        $( $iface.$prop($emitter).await?; )+
    }};
}

/// Brings the objects on the bus in line with `new` (after `old`): adds and removes host and VM objects
/// and emits PropertiesChanged for whatever changed, plus Cluster.Event signals for membership and DC
/// changes.
pub async fn publish(conn: &Connection, shared: &Arc<Shared>, old: &Snapshot, new: &Snapshot) -> zbus::Result<()> {
    let server = conn.object_server();
    let root = server.interface::<_, ClusterObject>(crate::api::ROOT_PATH).await?;
    let cluster = root.get().await;
    let e = root.signal_emitter();
    if old.view.as_ref().map(|v| &v.cluster_name) != new.view.as_ref().map(|v| &v.cluster_name) {
        cluster.name_changed(e).await?;
    }
    if old.quorate() != new.quorate() {
        cluster.quorate_changed(e).await?;
        ClusterObject::event(e, "quorum", "", if new.quorate() { "quorate" } else { "quorum lost" }).await?;
    }
    if old.dc() != new.dc() {
        cluster.designated_controller_changed(e).await?;
        ClusterObject::event(e, "dc", new.dc().unwrap_or(""), "designated controller changed").await?;
    }
    let (old_members, new_members) = (old.members(), new.members());
    if old_members != new_members {
        cluster.members_changed(e).await?;
        for m in new_members.iter().filter(|m| !old_members.contains(m)) {
            ClusterObject::event(e, "host-joined", m, "joined the cluster").await?;
        }
        for m in old_members.iter().filter(|m| !new_members.contains(m)) {
            ClusterObject::event(e, "host-left", m, "left the cluster").await?;
        }
    }
    let agents = |s: &Snapshot| s.membership.as_ref().map(|m| m.agents.clone());
    if agents(old) != agents(new) {
        cluster.agents_changed(e).await?;
    }
    if old.view.as_ref().map(|v| v.stonith_enabled) != new.view.as_ref().map(|v| v.stonith_enabled) {
        cluster.stonith_enabled_changed(e).await?;
    }
    if old.cib_connected != new.cib_connected {
        cluster.connected_changed(e).await?;
    }
    if old.view.as_ref().map(|v| &v.version) != new.view.as_ref().map(|v| &v.version) {
        cluster.cib_version_changed(e).await?;
    }
    drop(cluster);

    let old_hosts = old.host_names();
    let new_hosts = new.host_names();
    for name in old_hosts.iter().filter(|h| !new_hosts.contains(h)) {
        server.remove::<HostObject, _>(host_path(name)).await?;
    }
    for name in &new_hosts {
        let path = host_path(name);
        if !old_hosts.contains(name) {
            server
                .at(
                    path,
                    HostObject {
                        shared: Arc::clone(shared),
                        name: name.clone(),
                    },
                )
                .await?;
            continue;
        }
        let before = old.view.as_ref().and_then(|v| v.host(name));
        let after = new.view.as_ref().and_then(|v| v.host(name));
        let dc_flip = (old.dc() == Some(name.as_str())) != (new.dc() == Some(name.as_str()));
        if before != after || dc_flip {
            let iface = server.interface::<_, HostObject>(path).await?;
            let h = iface.get().await;
            let e = iface.signal_emitter();
            emit_all!(h, e; state_changed, standby_changed, maintenance_changed, is_designated_controller_changed, utilization_changed);
        }
    }

    let old_vms = old.vm_names();
    let new_vms = new.vm_names();
    for name in old_vms.iter().filter(|v| !new_vms.contains(v)) {
        server.remove::<VmObject, _>(vm_path(name)).await?;
    }
    for name in &new_vms {
        let path = vm_path(name);
        if !old_vms.contains(name) {
            server
                .at(
                    path,
                    VmObject {
                        shared: Arc::clone(shared),
                        name: name.clone(),
                    },
                )
                .await?;
            continue;
        }
        let before = old.view.as_ref().and_then(|v| v.vm(name));
        let after = new.view.as_ref().and_then(|v| v.vm(name));
        if before != after {
            let iface = server.interface::<_, VmObject>(path).await?;
            let vm = iface.get().await;
            let e = iface.signal_emitter();
            emit_all!(vm, e; agent_changed, state_changed, hosts_changed, failed_on_changed, fail_counts_changed,
                target_role_changed, managed_changed, config_changed, constraints_changed, utilization_changed);
            if let (Some(b), Some(a)) = (before, after) {
                if a.state != b.state && a.state == vmha_model::VmState::Failed {
                    ClusterObject::event(
                        root.signal_emitter(),
                        "vm-failed",
                        name,
                        &format!("failed on {}", a.failed_on.join(",")),
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::archive_file;

    fn fd(f: std::fs::File) -> zbus::zvariant::OwnedFd {
        zbus::zvariant::OwnedFd::from(std::os::fd::OwnedFd::from(f))
    }

    #[test]
    fn archive_descriptors_must_be_open_the_right_way() {
        let path = std::env::temp_dir().join(format!("vmha-objects-test-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let read_only = std::fs::File::open(&path).unwrap();
        let e = archive_file(fd(read_only), true).unwrap_err().to_string();
        assert!(e.contains("is not open for writing"), "{e}");
        let write_only = std::fs::File::options().write(true).open(&path).unwrap();
        let e = archive_file(fd(write_only), false).unwrap_err().to_string();
        assert!(e.contains("is not open for reading"), "{e}");
        assert!(archive_file(fd(std::fs::File::open(&path).unwrap()), false).is_ok());
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let e = archive_file(fd(dir), false).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }
}
