//! The operations crate's ports ([`vmha_ops::ports`]) over the real libraries: the cluster over
//! [`Shared`] (Pacemaker's CIB, the followed state), the hypervisors over libvirt, the shared storage
//! over the file system, the guests over their channels and the relay, the environment over the system
//! clock and the kernel's randomness. [`ports`] builds the context vmhad's operations run against.
//!
//! Every libvirt call runs on a blocking thread with [`LIBVIRT_DEADLINE`]: a hung libvirtd fails the call,
//! it does not hang the operation.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use virt::connect::Connect;
use vmha_model::change;
use vmha_model::clone::{self as model, SaveImage};
use vmha_ops::ports::{
    BoxFuture, CibChange, CibError, Cluster, DiskChains, Environment, GuestAnswer, Guests, HvError, Hypervisor,
    Progress, Storage, StorageError,
};
use vmha_ops::Ports;

use crate::backend::CibBackend;
use crate::jobs::Job;
use crate::state::{Shared, Snapshot};

/// Deadline of one libvirt call (connect, snapshot, restore, volume creation, compaction).
pub const LIBVIRT_DEADLINE: Duration = Duration::from_secs(60);
/// The downtime limit of a clone's live capture (ms): QEMU stops the template's vCPUs for the last
/// pass of its memory only once it expects that pass to take at most this long. QEMU's default, 300 ms,
/// is what a live migration accepts; a capture the template should not feel wants far less.
pub const CAPTURE_DOWNTIME_MS: u64 = 5;
/// When a capture under [`CAPTURE_DOWNTIME_MS`] has not converged by then, the template's own limit
/// applies again for the rest of it.
pub const CAPTURE_CONVERGE_WITHIN: Duration = Duration::from_secs(10);

/// The domain's migration downtime limit lowered to [`CAPTURE_DOWNTIME_MS`] for a capture; `old` is
/// the limit to put back (none: it was not lowered, because reading or setting it failed or it was
/// lower already; the capture then runs under the domain's own limit, as before).
struct LowDowntime {
    old: Option<u64>,
}

impl LowDowntime {
    fn set(dom: &virt::domain::Domain, vm: &str) -> LowDowntime {
        let old = match libvirt_ext::max_downtime(dom) {
            Ok(old) if old > CAPTURE_DOWNTIME_MS => old,
            Ok(_) => return LowDowntime { old: None },
            Err(e) => {
                tracing::warn!(%vm, "reading the downtime limit: {e}; capturing under the domain's own");
                return LowDowntime { old: None };
            }
        };
        match dom.migrate_set_max_downtime(CAPTURE_DOWNTIME_MS, 0) {
            Ok(()) => LowDowntime { old: Some(old) },
            Err(e) => {
                tracing::warn!(%vm, "lowering the downtime limit: {e}; capturing under the domain's own");
                LowDowntime { old: None }
            }
        }
    }

    /// Puts the domain's own limit back (its live migrations use it).
    fn restore(self, dom: &virt::domain::Domain, vm: &str) {
        if let Some(old) = self.old {
            if let Err(e) = dom.migrate_set_max_downtime(old, 0) {
                tracing::warn!(%vm, "putting the downtime limit back to {old} ms: {e}");
            }
        }
    }
}

/// Largest file [`Storage::read_small`] reads.
const MAX_SMALL_FILE: u64 = 1 << 20;

/// How vmhad reaches libvirt on this host and on the others (`{host}` is replaced by the host name).
#[derive(Debug, Clone)]
pub struct Uris {
    pub local: String,
    pub peer: String,
}

impl Default for Uris {
    fn default() -> Self {
        Uris {
            local: "qemu:///system".into(),
            peer: "qemu+tcp://{host}/system".into(),
        }
    }
}

/// The context vmhad's operations run against: every port over the real libraries.
pub fn ports(shared: &Arc<Shared>, uris: Uris) -> Ports {
    Ports {
        cluster: Arc::new(SharedCluster::new(shared)),
        hypervisor: Arc::new(Libvirt {
            local_host: shared.local_host.clone(),
            uris,
        }),
        storage: Arc::new(Files),
        guests: Arc::new(GuestChannels {
            shared: Arc::downgrade(shared),
        }),
        env: Arc::new(System),
    }
}

/// The cluster as vmhad follows it ([`Shared`]'s state) and its CIB backend. It holds its own handles
/// rather than the `Shared` (which holds the [`Ports`]), so that nothing refers to itself.
pub struct SharedCluster {
    local_host: String,
    backend: Arc<dyn CibBackend>,
    state: watch::Receiver<Arc<Snapshot>>,
    job_deadline: Duration,
}

impl std::fmt::Debug for SharedCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCluster")
            .field("local_host", &self.local_host)
            .finish_non_exhaustive()
    }
}

impl SharedCluster {
    pub fn new(shared: &Shared) -> Self {
        SharedCluster {
            local_host: shared.local_host.clone(),
            backend: Arc::clone(&shared.backend),
            state: shared.subscribe(),
            job_deadline: shared.job_deadline,
        }
    }
}

impl Cluster for SharedCluster {
    fn local_host(&self) -> &str {
        &self.local_host
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.state.clone()
    }

    fn job_deadline(&self) -> Duration {
        self.job_deadline
    }

    fn query(&self) -> BoxFuture<'_, Result<String, CibError>> {
        self.backend.query()
    }

    fn apply(&self, change: CibChange) -> BoxFuture<'_, Result<(), CibError>> {
        self.backend.apply(change)
    }
}

/// libvirt on every host: this host's URI for this host, the peer URI pattern for the others.
#[derive(Debug, Clone)]
pub struct Libvirt {
    pub local_host: String,
    pub uris: Uris,
}

impl Libvirt {
    fn uri_of(&self, host: &str) -> String {
        if host == self.local_host {
            self.uris.local.clone()
        } else {
            self.uris.peer.replace("{host}", host)
        }
    }

    /// Runs `f` with a connection to `host`'s libvirt on a blocking thread, with [`LIBVIRT_DEADLINE`].
    /// `call` names what failed when connecting or the deadline passes.
    async fn with_conn<T: Send + 'static>(
        &self,
        host: String,
        call: &'static str,
        f: impl FnOnce(&Connect) -> Result<T, HvError> + Send + 'static,
    ) -> Result<T, HvError> {
        let uri = self.uri_of(&host);
        let on = host.clone();
        let work = tokio::task::spawn_blocking(move || {
            let conn = Connect::open(Some(&uri)).map_err(|e| HvError {
                host: on,
                call: "connect",
                message: format!("{uri}: {e}"),
            })?;
            f(&conn)
        });
        let error = |message: String| HvError {
            host: host.clone(),
            call,
            message,
        };
        match tokio::time::timeout(LIBVIRT_DEADLINE, work).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(error(e.to_string())),
            Err(_) => Err(error(format!("no answer within {} s", LIBVIRT_DEADLINE.as_secs()))),
        }
    }
}

/// Where a domain's backup job (`vmha site replicate`) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupState {
    /// Still copying: bytes done and in all, as libvirt reports them.
    Running {
        processed: u64,
        total: u64,
    },
    Completed,
    Failed(String),
}

/// The replication calls of `vmha site replicate`, made from the CLI to each host's libvirt, each with
/// [`LIBVIRT_DEADLINE`].
impl Libvirt {
    /// libvirt on every host as vmhad reaches it, seen from `local_host`.
    pub fn from_host(local_host: &str) -> Self {
        Libvirt {
            local_host: local_host.to_string(),
            uris: Uris::default(),
        }
    }

    /// The running domain's live XML.
    pub async fn live_xml(&self, host: &str, domain: &str) -> Result<String, HvError> {
        let (on, domain) = (host.to_string(), domain.to_string());
        self.with_conn(host.to_string(), "virDomainGetXMLDesc", move |conn| {
            conn.lookup_domain_by_name(&domain)
                .and_then(|d| d.xml_desc(0))
                .map_err(|e| HvError {
                    host: on,
                    call: "virDomainGetXMLDesc",
                    message: format!("domain {domain}: {e}"),
                })
        })
        .await
    }

    /// Starts the push-mode backup `xml` describes on `domain`.
    pub async fn backup_begin(&self, host: &str, domain: &str, xml: String) -> Result<(), HvError> {
        let (on, domain) = (host.to_string(), domain.to_string());
        self.with_conn(host.to_string(), "virDomainBackupBegin", move |conn| {
            let fail = |message| HvError {
                host: on.clone(),
                call: "virDomainBackupBegin",
                message,
            };
            let dom = conn
                .lookup_domain_by_name(&domain)
                .map_err(|e| fail(format!("domain {domain}: {e}")))?;
            libvirt_ext::backup_begin(&dom, &xml).map_err(|e| fail(format!("domain {domain}: {e}")))
        })
        .await
    }

    /// Where `domain`'s backup job stands: running (with progress), or how it ended.
    pub async fn backup_state(&self, host: &str, domain: &str) -> Result<BackupState, HvError> {
        let (on, domain) = (host.to_string(), domain.to_string());
        self.with_conn(host.to_string(), "virDomainGetJobStats", move |conn| {
            let fail = |message| HvError {
                host: on.clone(),
                call: "virDomainGetJobStats",
                message,
            };
            let dom = conn
                .lookup_domain_by_name(&domain)
                .map_err(|e| fail(format!("domain {domain}: {e}")))?;
            let now = dom.job_stats(0).map_err(|e| fail(format!("domain {domain}: {e}")))?;
            if now.r#type != virt::sys::VIR_DOMAIN_JOB_NONE as i32 {
                if now.operation != Some(virt::sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as i32) {
                    return Ok(BackupState::Failed(format!(
                        "domain {domain} runs another job (operation {:?}), not the backup",
                        now.operation
                    )));
                }
                return Ok(BackupState::Running {
                    processed: now.disk_processed.or(now.data_processed).unwrap_or(0),
                    total: now.disk_total.or(now.data_total).unwrap_or(0),
                });
            }
            let done = dom
                .job_stats(virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
                .map_err(|e| fail(format!("domain {domain}: {e}")))?;
            Ok(match (done.r#type as u32, done.operation) {
                (virt::sys::VIR_DOMAIN_JOB_COMPLETED, Some(op))
                    if op == virt::sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as i32 =>
                {
                    BackupState::Completed
                }
                (virt::sys::VIR_DOMAIN_JOB_FAILED, _) => BackupState::Failed(
                    done.error_message
                        .unwrap_or_else(|| "the backup job failed (libvirt gave no reason)".into()),
                ),
                _ => BackupState::Failed("libvirt has no record of the backup job completing".into()),
            })
        })
        .await
    }

    /// Cancels `domain`'s backup job (a round that failed elsewhere); a job already ended is fine.
    pub async fn backup_abort(&self, host: &str, domain: &str) -> Result<(), HvError> {
        let (on, domain) = (host.to_string(), domain.to_string());
        self.with_conn(host.to_string(), "virDomainAbortJob", move |conn| {
            let dom = conn.lookup_domain_by_name(&domain).map_err(|e| HvError {
                host: on.clone(),
                call: "virDomainAbortJob",
                message: format!("domain {domain}: {e}"),
            })?;
            match dom.job_stats(0) {
                Ok(j) if j.r#type == virt::sys::VIR_DOMAIN_JOB_NONE as i32 => Ok(()),
                _ => libvirt_ext::abort_job(&dom).map_err(|e| HvError {
                    host: on,
                    call: "virDomainAbortJob",
                    message: format!("domain {domain}: {e}"),
                }),
            }
        })
        .await
    }
}

fn dir_of(path: &str) -> String {
    path.rsplit_once('/').map_or(".".into(), |(d, _)| d.to_string())
}

fn base_of(path: &str) -> String {
    path.rsplit_once('/').map_or(path.into(), |(_, b)| b.to_string())
}

/// Where a clone's live capture writes the template's memory first, on the template's host: under `/run`,
/// a tmpfs on systemd hosts (as in the lab) that only root may write to (never `/dev/shm`, where any
/// local user could make the directory first and read the guest's memory). When
/// QEMU's last pass is done, libvirt closes the memory image before it resumes the template's vCPUs: its
/// I/O helper drains the pipe and fdatasyncs the image, tens of milliseconds on a disk, all of it inside
/// the template's stall. On a tmpfs that flush costs nothing; the image is copied to its place on the
/// shared storage (where the clones' host reads it) once the template runs again, and the staged copy
/// removed. A vmhad that dies in between leaves the staged image behind: the next capture on that host
/// removes it when it is older than [`STAGING_STALE`], and a reboot empties the tmpfs.
pub const CAPTURE_STAGING_DIR: &str = "/run/vmha-capture";
const STAGING_POOL: &str = "vmha-capture-staging";
/// Memory the template's host keeps available beyond the staged image (its guest's memory size): with
/// less, the capture writes to the shared storage directly, as without staging.
const STAGING_HEADROOM_KIB: u64 = 512 * 1024;
/// A staged image older than this is a leftover of a capture whose vmhad died (a capture takes seconds).
const STAGING_STALE: Duration = Duration::from_secs(3600);

/// A capture's memory image staged on the template's host ([`CAPTURE_STAGING_DIR`]).
struct Staged {
    pool: virt::storage_pool::StoragePool,
    name: String,
    path: String,
}

impl Staged {
    /// Chooses where `vm`'s capture stages its memory image bound for `final_path`, or `None` (capture
    /// to `final_path` directly): when the host lacks the memory, the tmpfs the room, or any call fails.
    fn choose(conn: &Connect, dom: &virt::domain::Domain, vm: &str, final_path: &str) -> Option<Staged> {
        let skip = |why: String| {
            tracing::info!(%vm, "capturing straight to {final_path}: {why}");
            None
        };
        let guest_kib = match dom.max_memory() {
            Ok(k) => k,
            Err(e) => return skip(format!("the guest's memory size: {e}")),
        };
        let available_kib = match libvirt_ext::node_memory_kib(conn) {
            Ok((_, free, buffers, cached)) => free + buffers + cached,
            Err(e) => return skip(format!("the host's memory: {e}")),
        };
        if available_kib < guest_kib + STAGING_HEADROOM_KIB {
            return skip(format!(
                "the host has {} MiB available, the guest's {} MiB and {} MiB to spare are needed",
                available_kib / 1024,
                guest_kib / 1024,
                STAGING_HEADROOM_KIB / 1024
            ));
        }
        let pool = match libvirt_ext::dir_pool_built(conn, CAPTURE_STAGING_DIR, STAGING_POOL, 0o700) {
            Ok(p) => p,
            Err(e) => return skip(format!("the staging pool on {CAPTURE_STAGING_DIR}: {e}")),
        };
        if let Err(e) = pool.refresh(0) {
            return skip(format!("refreshing the staging pool: {e}"));
        }
        remove_stale(&pool);
        match pool.info() {
            Ok(info) if info.available / 1024 >= guest_kib + 64 * 1024 => {}
            Ok(info) => {
                return skip(format!(
                    "{CAPTURE_STAGING_DIR} has {} MiB free, the guest has {} MiB",
                    info.available >> 20,
                    guest_kib / 1024
                ))
            }
            Err(e) => return skip(format!("the staging pool's room: {e}")),
        }
        let name = base_of(final_path).trim_start_matches('.').to_string();
        if name.is_empty() || pool.lookup_storage_vol_by_name(&name).is_ok() {
            return skip(format!("{CAPTURE_STAGING_DIR}/{name} exists"));
        }
        let path = format!("{CAPTURE_STAGING_DIR}/{name}");
        Some(Staged { pool, name, path })
    }

    /// Copies the staged image to `final_path` (through the host's storage API, a new file there) and
    /// removes the staged one whatever happened.
    fn copy_to(self, conn: &Connect, host: &str, final_path: &str) -> Result<(), HvError> {
        let fail = |call: &'static str, message: String| HvError {
            host: host.to_string(),
            call,
            message,
        };
        let copied = (|| {
            self.pool
                .refresh(0)
                .map_err(|e| fail("virStoragePoolRefresh", format!("{CAPTURE_STAGING_DIR}: {e}")))?;
            let from = self
                .pool
                .lookup_storage_vol_by_name(&self.name)
                .map_err(|e| fail("virStorageVolLookupByName", format!("{}: {e}", self.path)))?;
            let bytes = from
                .info()
                .map_err(|e| fail("virStorageVolGetInfo", format!("{}: {e}", self.path)))?
                .capacity;
            let to = refreshed_dir_pool(conn, host, &dir_of(final_path))?;
            let xml = format!(
                "<volume><name>{}</name><capacity unit='bytes'>{bytes}</capacity>\
                 <target><format type='raw'/><permissions><mode>0600</mode></permissions></target></volume>",
                change::escape(&base_of(final_path))
            );
            virt::storage_vol::StorageVol::create_xml_from(&to, &xml, &from, 0).map_err(|e| {
                fail(
                    "virStorageVolCreateXMLFrom",
                    format!("copying {} to {final_path}: {e}", self.path),
                )
            })?;
            Ok(())
        })();
        self.remove();
        copied
    }

    /// Removes the staged image, if it is there.
    fn remove(&self) {
        if self.pool.refresh(0).is_err() {
            return;
        }
        if let Ok(vol) = self.pool.lookup_storage_vol_by_name(&self.name) {
            if let Err(e) = vol.delete(0) {
                tracing::warn!(image = %self.path, "removing the staged memory image: {e}");
            }
        }
    }
}

/// Removes the staging pool's memory images (`*.mem`) older than [`STAGING_STALE`] (by their
/// modification time); nothing else in the directory is touched.
fn remove_stale(pool: &virt::storage_pool::StoragePool) {
    let Ok(vols) = pool.list_all_volumes(0) else { return };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    for vol in vols {
        if !vol.name().is_ok_and(|n| n.ends_with(".mem")) {
            continue;
        }
        let Ok(xml) = vol.xml_desc(0) else { continue };
        let mtime = roxmltree::Document::parse(&xml).ok().and_then(|d| {
            d.descendants()
                .find(|n| n.has_tag_name("mtime"))
                .and_then(|n| n.text())
                .and_then(|t| t.trim().parse::<f64>().ok())
        });
        if mtime.is_some_and(|m| now - m > STAGING_STALE.as_secs_f64()) {
            let path = vol.path().unwrap_or_default();
            match vol.delete(0) {
                Ok(()) => {
                    tracing::info!(image = %path, "removed a staged memory image left by a capture that did not finish")
                }
                Err(e) => tracing::warn!(image = %path, "removing a stale staged memory image: {e}"),
            }
        }
    }
}

/// The external memory file a `<domainsnapshot>` names.
fn snapshot_memory_file(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let memory = doc.root_element().children().find(|n| n.has_tag_name("memory"))?;
    (memory.attribute("snapshot") == Some("external"))
        .then(|| memory.attribute("file").map(str::to_string))
        .flatten()
}

/// The storage pool of directory `dir` on `host` ([`libvirt_ext::dir_pool`]), refreshed so that it lists
/// the files there now.
fn refreshed_dir_pool(conn: &Connect, host: &str, dir: &str) -> Result<virt::storage_pool::StoragePool, HvError> {
    let fail = |call: &'static str, message: String| HvError {
        host: host.to_string(),
        call,
        message,
    };
    let pool =
        libvirt_ext::dir_pool(conn, dir, &pool_name(dir)).map_err(|e| fail("storage pool", format!("{dir}: {e}")))?;
    pool.refresh(0)
        .map_err(|e| fail("virStoragePoolRefresh", format!("refreshing {dir}: {e}")))?;
    Ok(pool)
}

/// The name of the transient pool vmhad makes for a directory no pool has.
fn pool_name(dir: &str) -> String {
    let h = dir.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("vmha-{h:016x}")
}

impl Hypervisor for Libvirt {
    fn sees_files(&self, host: &str, files: Vec<(String, String)>) -> BoxFuture<'_, Result<(), HvError>> {
        let on = host.to_string();
        Box::pin(self.with_conn(host.to_string(), "checking storage", move |conn| {
            for (dir, file) in &files {
                let pool = libvirt_ext::dir_pool(conn, dir, &pool_name(dir)).map_err(|e| e.to_string());
                let seen = pool.and_then(|p| {
                    p.refresh(0).map_err(|e| e.to_string())?;
                    p.lookup_storage_vol_by_name(file).map_err(|e| e.to_string())
                });
                if let Err(e) = seen {
                    return Err(HvError {
                        host: on,
                        call: "storage lookup",
                        message: format!("it does not see {dir}/{file}: {e}"),
                    });
                }
            }
            Ok(())
        }))
    }

    fn live_snapshot(
        &self,
        host: &str,
        vm: &str,
        snapshot_xml: String,
        reuse: bool,
        stage: bool,
    ) -> BoxFuture<'_, Result<vmha_ops::ports::Captured, HvError>> {
        let (on, name) = (host.to_string(), vm.to_string());
        Box::pin(self.with_conn(host.to_string(), "capturing the template", move |conn| {
            let dom = conn.lookup_domain_by_name(&name).map_err(|e| HvError {
                host: on.clone(),
                call: "virDomainLookupByName",
                message: format!("domain {name}: {e}"),
            })?;
            // LIVE: the memory is written while the vCPUs run; QEMU stops them for the last pass, and
            // libvirt switches the disks to the overlays before it resumes them. REUSE_EXT: the overlays
            // were made beforehand, so libvirt only opens them in that pause (no image creation jobs).
            let mut flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
            if reuse {
                flags |= virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT;
            }
            // The memory goes to a tmpfs on this host first when it can (see CAPTURE_STAGING_DIR): the
            // snapshot's memory file is swapped for the staged path, so its attribute must appear once.
            let file_attr = |path: &str| format!("file='{}'", change::escape(path));
            let staged = snapshot_memory_file(&snapshot_xml)
                .filter(|m| stage && snapshot_xml.matches(&file_attr(m)).count() == 1)
                .and_then(|m| Staged::choose(conn, &dom, &name, &m).map(|s| (m, s)));
            let snapshot_xml = match &staged {
                Some((m, s)) => snapshot_xml.replace(&file_attr(m), &file_attr(&s.path)),
                None => snapshot_xml,
            };
            let limit = LowDowntime::set(&dom, &name);
            let made = std::thread::scope(|s| {
                let (done, wait) = std::sync::mpsc::channel::<()>();
                if let Some(old) = limit.old {
                    let d = &dom;
                    let n = &name;
                    s.spawn(move || {
                        // A guest that dirties its memory faster than it can be written never gets
                        // under the low limit: give it its old one back, and the capture ends as before.
                        if wait.recv_timeout(CAPTURE_CONVERGE_WITHIN) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                            tracing::warn!(vm = %n, "the live capture did not converge within {CAPTURE_CONVERGE_WITHIN:?} under a {CAPTURE_DOWNTIME_MS} ms downtime limit; allowing {old} ms");
                            let _ = d.migrate_set_max_downtime(old, 0);
                        }
                    });
                }
                let made = dom.create_snapshot_xml(&snapshot_xml, flags);
                drop(done);
                made
            });
            limit.restore(&dom, &name);
            let stats = made.as_ref().ok().and_then(|_| dom.job_stats(virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED).ok());
            if let Err(e) = made {
                if let Some((_, s)) = &staged {
                    s.remove();
                }
                return Err(HvError {
                    host: on,
                    call: "virDomainSnapshotCreateXML",
                    message: format!("live snapshot of {name}: {e}"),
                });
            }
            let mut staged_copy_ms = None;
            if let Some((final_path, s)) = staged {
                let at = Instant::now();
                let staged_at = s.path.clone();
                s.copy_to(conn, &on, &final_path)?;
                let ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(vm = %name, "memory image captured to {staged_at}, copied to {final_path} in {ms} ms");
                staged_copy_ms = Some(ms);
            }
            Ok(vmha_ops::ports::Captured {
                downtime_ms: stats.and_then(|s| s.downtime),
                staged_copy_ms,
            })
        }))
    }

    fn create_overlays(&self, host: &str, overlays: Vec<(String, String)>) -> BoxFuture<'_, Result<(), HvError>> {
        let on = host.to_string();
        Box::pin(
            self.with_conn(host.to_string(), "creating the clone overlays", move |conn| {
                let fail = |call: &'static str, message: String| HvError {
                    host: on.clone(),
                    call,
                    message,
                };
                for (backing, overlay) in &overlays {
                    let pool = refreshed_dir_pool(conn, &on, &dir_of(overlay))?;
                    let capacity = pool
                        .lookup_storage_vol_by_name(&base_of(backing))
                        .and_then(|v| v.info())
                        .map_err(|e| fail("virStorageVolGetInfo", format!("{backing}: {e}")))?
                        .capacity;
                    let xml = format!(
                        "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
                     <target><format type='qcow2'/></target>\
                     <backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
                        change::escape(&base_of(overlay)),
                        change::escape(backing)
                    );
                    virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0)
                        .map_err(|e| fail("virStorageVolCreateXML", format!("creating {overlay}: {e}")))?;
                }
                Ok(())
            }),
        )
    }

    fn restore(&self, host: &str, image: String) -> BoxFuture<'_, Result<(), HvError>> {
        let on = host.to_string();
        Box::pin(self.with_conn(host.to_string(), "restoring a clone", move |conn| {
            libvirt_ext::restore_domain(conn, &image, virt::sys::VIR_DOMAIN_SAVE_RUNNING).map_err(|e| HvError {
                host: on,
                call: "virDomainRestoreFlags",
                message: format!("restoring {image}: {e}"),
            })
        }))
    }

    fn destroy_all(&self, host: &str, domains: Vec<String>) -> BoxFuture<'_, Result<(), HvError>> {
        Box::pin(
            self.with_conn(host.to_string(), "destroying clone domains", move |conn| {
                // A restore the dead job started may still be under way in libvirtd: destroy until none of the
                // domains has shown up for two seconds.
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
            }),
        )
    }

    fn disk_chains(&self, host: &str, vm: &str) -> BoxFuture<'_, Result<DiskChains, HvError>> {
        let (on, vm) = (host.to_string(), vm.to_string());
        Box::pin(
            self.with_conn(host.to_string(), "reading the domain's disks", move |conn| {
                let fail = |message: String| HvError {
                    host: on.clone(),
                    call: "virDomainGetXMLDesc",
                    message,
                };
                let dom = conn
                    .lookup_domain_by_name(&vm)
                    .map_err(|e| fail(format!("domain {vm}: {e}")))?;
                let xml = dom.xml_desc(0).map_err(|e| fail(format!("domain {vm}: {e}")))?;
                model::disk_chains(&xml).map_err(|e| fail(format!("domain {vm}: {e}")))
            }),
        )
    }

    fn compact(&self, host: &str, vm: &str) -> BoxFuture<'_, Result<Vec<String>, HvError>> {
        let (on, vm) = (host.to_string(), vm.to_string());
        Box::pin(
            self.with_conn(host.to_string(), "compacting the template's disk chain", move |conn| {
                let fail = |call: &'static str, message: String| HvError {
                    host: on.clone(),
                    call,
                    message,
                };
                let dom = conn
                    .lookup_domain_by_name(&vm)
                    .map_err(|e| fail("virDomainLookupByName", format!("domain {vm}: {e}")))?;
                let xml = dom
                    .xml_desc(0)
                    .map_err(|e| fail("virDomainGetXMLDesc", format!("domain {vm}: {e}")))?;
                let chains =
                    model::disk_chains(&xml).map_err(|e| fail("virDomainGetXMLDesc", format!("domain {vm}: {e}")))?;
                let mut pulled = Vec::new();
                let mut dropped = Vec::new();
                for (dev, chain) in &chains {
                    let Some(c) = model::compaction(&vm, chain) else {
                        continue;
                    };
                    libvirt_ext::block_pull(&dom, dev, c.base.as_deref())
                        .map_err(|e| fail("virDomainBlockRebase", format!("{vm} {dev}: {e}")))?;
                    pulled.push(dev.clone());
                    dropped.extend(c.dropped);
                }
                let deadline = Instant::now() + Duration::from_secs(50);
                for dev in &pulled {
                    while libvirt_ext::block_job_active(&dom, dev)
                        .map_err(|e| fail("virDomainGetBlockJobInfo", format!("{vm} {dev}: {e}")))?
                    {
                        if Instant::now() > deadline {
                            return Err(fail(
                                "virDomainGetBlockJobInfo",
                                format!("the block pull of {vm} {dev} did not end within 50 s"),
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                Ok(dropped)
            }),
        )
    }

    fn domain_problems(
        &self,
        host: &str,
        domains: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<String>, HvError>> {
        let local = host == self.local_host;
        Box::pin(self.with_conn(host.to_string(), "checking domains", move |conn| {
            Ok(domain_problems(conn, &domains, local))
        }))
    }

    fn guest_fsfreeze(&self, host: &str, domain: &str, freeze: bool) -> BoxFuture<'_, Result<(), HvError>> {
        let (on, domain) = (host.to_string(), domain.to_string());
        let command = if freeze {
            "guest-fsfreeze-freeze"
        } else {
            "guest-fsfreeze-thaw"
        };
        let call = if freeze { "fsfreeze" } else { "fsthaw" };
        Box::pin(self.with_conn(host.to_string(), call, move |conn| {
            conn.lookup_domain_by_name(&domain)
                .and_then(|d| d.qemu_agent_command(&format!("{{\"execute\":\"{command}\"}}"), AGENT_TIMEOUT_S, 0))
                .map(|_| ())
                .map_err(|e| HvError {
                    host: on,
                    call,
                    message: format!("{command} on {domain}: {e}"),
                })
        }))
    }
}

/// The guest agent's own timeout for fsfreeze (seconds).
const AGENT_TIMEOUT_S: i32 = 10;

/// What stands in the way of defining `domains` (vm, XML) through `conn`: a domain with the same name or
/// UUID, a libvirt network that does not exist, and (on this host, `local`) a bridge that does not.
fn domain_problems(conn: &Connect, domains: &[(String, String)], local: bool) -> Vec<String> {
    use vmha_vcluster::printable;
    let mut problems = Vec::new();
    for (vm, xml) in domains {
        let Ok(doc) = roxmltree::Document::parse(xml) else {
            continue;
        };
        let child = |tag: &str| {
            doc.root_element()
                .children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(|t| t.trim().to_string())
        };
        let by_name = child("name").is_some_and(|n| conn.lookup_domain_by_name(&n).is_ok());
        let by_uuid = child("uuid").is_some_and(|u| conn.lookup_domain_by_uuid_string(&u).is_ok());
        if by_name || by_uuid {
            problems.push(format!(
                "VM {}: libvirt has a domain with its name or UUID on this host already",
                printable(vm)
            ));
        }
        for s in doc
            .descendants()
            .filter(|n| n.has_tag_name("source") && n.parent().is_some_and(|p| p.has_tag_name("interface")))
        {
            if let (Some(br), true) = (s.attribute("bridge"), local) {
                let name_ok = !br.is_empty() && br != "." && br != ".." && !br.contains('/');
                if !name_ok || !std::path::Path::new("/sys/class/net").join(br).exists() {
                    problems.push(format!(
                        "VM {}: bridge {} does not exist here (--map network=...)",
                        printable(vm),
                        printable(br)
                    ));
                }
            }
            if let Some(net) = s.attribute("network") {
                if conn.lookup_network_by_name(net).is_err() {
                    problems.push(format!(
                        "VM {}: libvirt network {} does not exist here (--map network=...)",
                        printable(vm),
                        printable(net)
                    ));
                }
            }
        }
    }
    problems
}

/// The shared storage through this host's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Files;

fn storage_error(path: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError {
        path: path.to_string(),
        message: e.to_string(),
    }
}

/// Runs blocking file work on a worker thread.
async fn on_thread<T: Send + 'static>(
    path: String,
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| storage_error(&path, e))?
}

/// `path` under one of `roots`, its directory opened without following links.
fn confined(path: &str, roots: &[String]) -> anyhow::Result<crate::confined::ConfinedPath> {
    crate::confined::ConfinedPath::locate(path, roots)
}

/// The backing file of a qcow2 image, as an absolute path: `None` for an image without one, data that is
/// not qcow2, or a file that does not exist.
async fn backing_of(image: &str) -> Result<Option<String>, StorageError> {
    let mut head = vec![0u8; 64 << 10];
    let mut f = match tokio::fs::File::open(image).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(storage_error(image, e)),
    };
    let mut n = 0;
    while n < head.len() {
        match tokio::io::AsyncReadExt::read(&mut f, &mut head[n..]).await {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) => return Err(storage_error(image, e)),
        }
    }
    Ok(model::qcow2_backing(&head[..n]).map(|backing| {
        if backing.starts_with('/') {
            backing
        } else {
            format!("{}/{backing}", dir_of(image))
        }
    }))
}

impl Storage for Files {
    fn read_small(&self, path: &str) -> BoxFuture<'_, Result<String, StorageError>> {
        let path = path.to_string();
        Box::pin(async move {
            let meta = tokio::fs::metadata(&path)
                .await
                .map_err(|e| storage_error(&path, format!("cannot read it: {e}")))?;
            if meta.len() > MAX_SMALL_FILE {
                return Err(storage_error(&path, "larger than 1 MiB"));
            }
            tokio::fs::read_to_string(&path)
                .await
                .map_err(|e| storage_error(&path, format!("cannot read it: {e}")))
        })
    }

    fn write_atomic(&self, path: &str, content: String) -> BoxFuture<'_, Result<(), StorageError>> {
        let path = path.to_string();
        Box::pin(async move {
            let tmp = format!("{path}.vmha-tmp");
            tokio::fs::write(&tmp, content)
                .await
                .map_err(|e| storage_error(&tmp, format!("writing: {e}")))?;
            tokio::fs::rename(&tmp, &path)
                .await
                .map_err(|e| storage_error(&path, format!("renaming {tmp} to it: {e}")))
        })
    }

    fn exists(&self, path: &str) -> BoxFuture<'_, bool> {
        let path = path.to_string();
        Box::pin(async move { tokio::fs::try_exists(&path).await.unwrap_or(false) })
    }

    fn remove(&self, path: &str) -> BoxFuture<'_, Result<bool, StorageError>> {
        let path = path.to_string();
        Box::pin(async move {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(storage_error(&path, e)),
            }
        })
    }

    fn read_image_header(&self, path: &str) -> BoxFuture<'_, Result<SaveImage, StorageError>> {
        let p = path.to_string();
        Box::pin(on_thread(path.to_string(), move || {
            let err = |e: &dyn std::fmt::Display| storage_error(&p, e);
            let mut f = std::fs::File::open(&p).map_err(|e| err(&e))?;
            let mut head = vec![0u8; model::HEADER_LEN];
            f.read_exact(&mut head).map_err(|e| err(&e))?;
            let len = model::save_image_len(&head).map_err(|e| err(&e))?;
            head.resize(len, 0);
            f.read_exact(&mut head[model::HEADER_LEN..]).map_err(|e| err(&e))?;
            model::parse_save_image(&head).map_err(|e| err(&e))
        }))
    }

    fn write_clone_image(
        &self,
        from: &str,
        image: SaveImage,
        xml: String,
        to: &str,
    ) -> BoxFuture<'_, Result<(), StorageError>> {
        let header = model::write_save_header(&image, &xml);
        let (from, to, offset) = (from.to_string(), to.to_string(), image.stream_offset);
        // The QEMU stream is copied in the kernel where the file system allows (std::io::copy).
        Box::pin(on_thread(to.clone(), move || {
            let mut src = std::fs::File::open(&from).map_err(|e| storage_error(&from, e))?;
            src.seek(SeekFrom::Start(offset)).map_err(|e| storage_error(&from, e))?;
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to)
                .map_err(|e| storage_error(&to, e))?;
            dst.write_all(&header).map_err(|e| storage_error(&to, e))?;
            std::io::copy(&mut src, &mut dst).map_err(|e| storage_error(&to, e))?;
            Ok(())
        }))
    }

    fn backing_of(&self, image: &str) -> BoxFuture<'_, Result<Option<String>, StorageError>> {
        let image = image.to_string();
        Box::pin(async move { backing_of(&image).await })
    }

    fn list_dir(&self, dir: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let dir = dir.to_string();
        Box::pin(async move {
            let mut entries = tokio::fs::read_dir(&dir).await.map_err(|e| storage_error(&dir, e))?;
            let mut files = Vec::new();
            while let Some(e) = entries.next_entry().await.map_err(|e| storage_error(&dir, e))? {
                if e.file_type().await.is_ok_and(|t| t.is_file()) {
                    files.push(e.path().to_string_lossy().into_owned());
                }
            }
            Ok(files)
        })
    }

    fn layer_users(&self, layer: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let layer = layer.to_string();
        Box::pin(async move {
            let dir = dir_of(&layer);
            let mut entries = tokio::fs::read_dir(&dir).await.map_err(|e| storage_error(&dir, e))?;
            let mut users = Vec::new();
            while let Some(e) = entries.next_entry().await.map_err(|e| storage_error(&dir, e))? {
                let path = e.path().to_string_lossy().into_owned();
                if path == layer || !e.file_type().await.is_ok_and(|t| t.is_file()) {
                    continue;
                }
                if backing_of(&path).await?.as_deref() == Some(layer.as_str()) {
                    users.push(path);
                }
            }
            Ok(users)
        })
    }

    fn lexists(&self, path: &str) -> BoxFuture<'_, bool> {
        let path = path.to_string();
        Box::pin(async move { tokio::fs::symlink_metadata(&path).await.is_ok() })
    }

    fn is_dir(&self, path: &str) -> BoxFuture<'_, bool> {
        let path = path.to_string();
        Box::pin(async move { tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir()) })
    }

    fn create_new(&self, path: &str, roots: &[String]) -> BoxFuture<'_, Result<Option<std::fs::File>, StorageError>> {
        let (path, roots) = (path.to_string(), roots.to_vec());
        Box::pin(on_thread(path.clone(), move || {
            confined(&path, &roots)
                .and_then(|f| f.create_new())
                .map(Some)
                .map_err(|e| storage_error(&path, format!("{e:#}")))
        }))
    }

    fn write_new(&self, path: &str, roots: &[String], content: String) -> BoxFuture<'_, Result<(), StorageError>> {
        let (path, roots) = (path.to_string(), roots.to_vec());
        Box::pin(on_thread(path.clone(), move || {
            let write = || -> anyhow::Result<()> {
                let mut f = confined(&path, &roots)?.create_new()?;
                f.write_all(content.as_bytes())?;
                f.sync_all()?;
                Ok(())
            };
            write().map_err(|e| storage_error(&path, format!("{e:#}")))
        }))
    }

    fn link_new(&self, from: &str, to: &str, roots: &[String]) -> BoxFuture<'_, Result<(), StorageError>> {
        let (from, to, roots) = (from.to_string(), to.to_string(), roots.to_vec());
        Box::pin(on_thread(to.clone(), move || {
            let link = || -> anyhow::Result<()> { confined(&from, &roots)?.link_to(&confined(&to, &roots)?) };
            link().map_err(|e| storage_error(&to, format!("{e:#}")))
        }))
    }

    fn same_file(&self, a: &str, b: &str) -> BoxFuture<'_, bool> {
        let (a, b) = (a.to_string(), b.to_string());
        Box::pin(async move {
            use std::os::unix::fs::MetadataExt;
            match (
                tokio::fs::symlink_metadata(&a).await,
                tokio::fs::symlink_metadata(&b).await,
            ) {
                (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
                _ => false,
            }
        })
    }

    fn remove_confined(&self, path: &str, roots: &[String]) -> BoxFuture<'_, Result<bool, StorageError>> {
        let (path, roots) = (path.to_string(), roots.to_vec());
        Box::pin(on_thread(path.clone(), move || {
            let f = confined(&path, &roots).map_err(|e| storage_error(&path, format!("{e:#}")))?;
            match f.remove() {
                Ok(()) => Ok(true),
                Err(e) if e.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::NOENT) => Ok(false),
                Err(e) => Err(storage_error(&path, format!("{e:#}"))),
            }
        }))
    }

    fn check_free_space(&self, files: Vec<(String, u64)>, roots: &[String]) -> BoxFuture<'_, Result<(), StorageError>> {
        let roots = roots.to_vec();
        let first = files.first().map(|f| f.0.clone()).unwrap_or_default();
        Box::pin(on_thread(first.clone(), move || {
            let located = files
                .iter()
                .map(|(p, size)| Ok((confined(p, &roots)?, *size)))
                .collect::<anyhow::Result<Vec<_>>>();
            located
                .and_then(|l| crate::confined::check_free_space(l.iter().map(|(f, s)| (f, *s))))
                .map_err(|e| storage_error(&first, format!("{e:#}")))
        }))
    }
}

/// The guests' channels: this host's directly, the others' through the relay ([`crate::relay`]).
#[derive(Debug, Clone)]
pub struct GuestChannels {
    shared: Weak<Shared>,
}

impl GuestChannels {
    fn shared(&self) -> Result<Arc<Shared>, String> {
        self.shared.upgrade().ok_or_else(|| "vmhad is stopping".to_string())
    }
}

fn answer(r: Result<(String, String), crate::guest::GuestError>) -> Result<GuestAnswer, String> {
    r.map(|(outcome, reason)| GuestAnswer { outcome, reason })
        .map_err(|e| e.to_string())
}

impl Guests for GuestChannels {
    fn request(
        &self,
        vm: &str,
        kind: &str,
        data: String,
        timeout_ms: u32,
    ) -> BoxFuture<'_, Result<GuestAnswer, String>> {
        let (vm, kind) = (vm.to_string(), kind.to_string());
        Box::pin(async move {
            let shared = self.shared()?;
            answer(crate::relay::guest_request(&shared, &vm, &kind, &data, timeout_ms).await)
        })
    }

    fn request_on(
        &self,
        host: &str,
        vm: &str,
        kind: &str,
        data: String,
        timeout_ms: u32,
    ) -> BoxFuture<'_, Result<GuestAnswer, String>> {
        let (host, vm, kind) = (host.to_string(), vm.to_string(), kind.to_string());
        Box::pin(async move {
            let shared = self.shared()?;
            answer(crate::relay::guest_request_on(&shared, &host, &vm, &kind, &data, timeout_ms).await)
        })
    }
}

/// A job reports an operation's steps on its D-Bus object (and to the vmhad it is mirrored to).
impl Progress for Job {
    fn progress(&self, fraction: f64, message: &str) -> BoxFuture<'_, ()> {
        let message = message.to_string();
        Box::pin(async move { Job::progress(self, fraction, &message).await })
    }
}

/// The system clock as local time (the time zone's offset from the C library, as Pacemaker reads it):
/// what the time bounds' drains follow ([`vmha_ops::bounds`]). Without an offset, UTC.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalSystemClock;

impl vmha_ops::bounds::LocalClock for LocalSystemClock {
    fn now(&self) -> vmha_model::bound_edges::LocalTime {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        vmha_model::bound_edges::LocalTime {
            unix,
            offset: glibc_malloc::utc_offset(unix).unwrap_or(0),
        }
    }
}

/// The system clock and the kernel's randomness.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Environment for System {
    fn unix_ms(&self) -> u128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    }

    fn random(&self, buf: &mut [u8]) {
        if getrandom::fill(buf).is_err() {
            // No kernel randomness (it never fails on Linux after boot): the clock, spread over the bytes,
            // still gives distinct identities.
            let t = self.unix_ms() ^ (u128::from(std::process::id()) << 64);
            for (i, x) in buf.iter_mut().enumerate() {
                *x = (t >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_pools() {
        let hv = Libvirt {
            local_host: "a".into(),
            uris: Uris::default(),
        };
        assert_eq!(hv.uri_of("a"), "qemu:///system");
        assert_eq!(hv.uri_of("b"), "qemu+tcp://b/system");
        assert_eq!(pool_name("/a"), pool_name("/a"));
        assert_ne!(pool_name("/a"), pool_name("/b"));
        assert_eq!(dir_of("/x/y/z.qcow2"), "/x/y");
        assert_eq!(base_of("/x/y/z.qcow2"), "z.qcow2");
    }

    #[tokio::test]
    async fn files_remove_and_write_atomically() {
        let dir = std::env::temp_dir().join(format!("vmha-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.xml").to_string_lossy().into_owned();
        let files = Files;
        files.write_atomic(&path, "<x/>".into()).await.unwrap();
        assert!(files.exists(&path).await);
        assert_eq!(files.read_small(&path).await.unwrap(), "<x/>");
        assert!(!std::path::Path::new(&format!("{path}.vmha-tmp")).exists());
        assert!(files.remove(&path).await.unwrap());
        assert!(!files.remove(&path).await.unwrap());
        assert!(files.read_small(&path).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn random_bytes_differ() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        System.random(&mut a);
        System.random(&mut b);
        assert_ne!(a, b);
    }
}
