//! What the operations need from the world, as traits: the cluster (CIB and the state vmhad follows),
//! the hypervisors of every host, the shared storage, the guests, job progress and the environment
//! (wall clock and randomness). vmhad implements them over Pacemaker, libvirt, the file system and its
//! guest channels and relay; [`crate::sim`] implements them in memory. Every call's deadline lives in the
//! implementation: a hung daemon must not hang an operation.
//!
//! Time: operations wait and measure with `tokio::time`, so a test runtime with a paused clock runs them
//! on virtual time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vmha_model::clone::SaveImage;

use crate::state::Snapshot;

/// A boxed future, so the ports can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One change to one CIB section, as Pacemaker's CIB API takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CibChange {
    /// Merge `xml` into `section` (elements matched by tag and id).
    Modify { section: &'static str, xml: String },
    /// Add `xml` to `section`.
    Create { section: &'static str, xml: String },
    /// Remove the element `xml` names (tag and id) from `section`.
    Delete { section: &'static str, xml: String },
    /// Replace the whole `section` with `xml` (the section element itself, e.g. `<tags>...</tags>`).
    Replace { section: &'static str, xml: String },
}

/// A failed CIB call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CIB {call}: {message}")]
pub struct CibError {
    pub call: &'static str,
    pub message: String,
}

/// The cluster as the vmhad running an operation sees it, and its CIB.
pub trait Cluster: Send + Sync {
    /// The host this vmhad runs on (the one whose node attributes hold its journals).
    fn local_host(&self) -> &str;
    /// The current state.
    fn snapshot(&self) -> Arc<Snapshot>;
    /// Every later state, as it comes.
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// How long an operation waits for the cluster to reach the state it asked for.
    fn job_deadline(&self) -> Duration;
    /// The whole CIB (configuration and status) as XML.
    fn query(&self) -> BoxFuture<'_, Result<String, CibError>>;
    /// Applies one change.
    fn apply(&self, change: CibChange) -> BoxFuture<'_, Result<(), CibError>>;
}

/// A failed hypervisor call, naming the host and the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("libvirt on {host}: {call}: {message}")]
pub struct HvError {
    pub host: String,
    pub call: &'static str,
    pub message: String,
}

/// A domain's disk chains: (target dev, [active layer, backing, ...]).
pub type DiskChains = Vec<(String, Vec<String>)>;

/// What a live capture ([`Hypervisor::live_snapshot`]) reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Captured {
    /// How long the VM's vCPUs were stopped by libvirt's own figure, when it says.
    pub downtime_ms: Option<u64>,
    /// When the memory was staged: how long copying it to its file took (after the vCPUs ran again).
    pub staged_copy_ms: Option<u64>,
}

/// The hypervisor (libvirt) of every host.
pub trait Hypervisor: Send + Sync {
    /// Whether `host` sees each file (directory, base name) through its storage API.
    fn sees_files(&self, host: &str, files: Vec<(String, String)>) -> BoxFuture<'_, Result<(), HvError>>;
    /// A live external snapshot of `vm` on `host` (`snapshot_xml`: a `<domainsnapshot>` with an external
    /// memory file and new overlays for its disks); the VM goes on running on the overlays. With `reuse`,
    /// the overlays exist already (made by [`Hypervisor::create_overlays`] on the VM's current layers),
    /// so that they are only opened, not created, while the vCPUs are stopped. With `stage`, the memory
    /// may be written to a fast local place on `host` first and copied to its file after the vCPUs run
    /// again (the adapter decides whether it can). Returns the downtime libvirt measured, when it says.
    fn live_snapshot(
        &self,
        host: &str,
        vm: &str,
        snapshot_xml: String,
        reuse: bool,
        stage: bool,
    ) -> BoxFuture<'_, Result<Captured, HvError>>;
    /// Creates each (backing, overlay) qcow2 overlay through `host`'s storage API.
    fn create_overlays(&self, host: &str, overlays: Vec<(String, String)>) -> BoxFuture<'_, Result<(), HvError>>;
    /// Restores a save image on `host`, running.
    fn restore(&self, host: &str, image: String) -> BoxFuture<'_, Result<(), HvError>>;
    /// Destroys the named domains on `host`, until none of them has shown up for a while (a restore
    /// still under way in libvirtd may create one late).
    fn destroy_all(&self, host: &str, domains: Vec<String>) -> BoxFuture<'_, Result<(), HvError>>;
    /// The disk chains of `vm` running on `host`: (target dev, [active layer, backing, ...]).
    fn disk_chains(&self, host: &str, vm: &str) -> BoxFuture<'_, Result<DiskChains, HvError>>;
    /// Pulls the layers vmha made below each disk's active layer into it ([`vmha_model::clone::compaction`])
    /// and waits for the block jobs; returns the layers that left the chains.
    fn compact(&self, host: &str, vm: &str) -> BoxFuture<'_, Result<Vec<String>, HvError>>;
    /// What stands in the way of defining the domains `(vm, domain XML)` on `host` (a domain of the same
    /// name or UUID there, a missing bridge or libvirt network), one line each.
    fn domain_problems(
        &self,
        host: &str,
        domains: Vec<(String, String)>,
    ) -> BoxFuture<'_, Result<Vec<String>, HvError>>;
    /// Freezes (`freeze`) or thaws the file systems of `domain`'s guest on `host` through
    /// qemu-guest-agent.
    fn guest_fsfreeze(&self, host: &str, domain: &str, freeze: bool) -> BoxFuture<'_, Result<(), HvError>>;
}

/// A failed storage call, naming the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct StorageError {
    pub path: String,
    pub message: String,
}

/// The cluster's shared storage (the same paths on every host).
pub trait Storage: Send + Sync {
    /// A small text file (at most 1 MiB).
    fn read_small(&self, path: &str) -> BoxFuture<'_, Result<String, StorageError>>;
    /// Replaces `path` with `content` atomically.
    fn write_atomic(&self, path: &str, content: String) -> BoxFuture<'_, Result<(), StorageError>>;
    fn exists(&self, path: &str) -> BoxFuture<'_, bool>;
    /// Removes `path`; `Ok(false)` when it did not exist.
    fn remove(&self, path: &str) -> BoxFuture<'_, Result<bool, StorageError>>;
    /// The header of a libvirt save image.
    fn read_image_header(&self, path: &str) -> BoxFuture<'_, Result<SaveImage, StorageError>>;
    /// Writes a new save image at `to` (which must not exist): a header carrying `xml`, then the QEMU stream
    /// of the image at `from`.
    fn write_clone_image(
        &self,
        from: &str,
        image: SaveImage,
        xml: String,
        to: &str,
    ) -> BoxFuture<'_, Result<(), StorageError>>;
    /// The backing file of a qcow2 image, as an absolute path (`None`: it has none, or it is not qcow2).
    fn backing_of(&self, image: &str) -> BoxFuture<'_, Result<Option<String>, StorageError>>;
    /// The regular files in `dir` (full paths).
    fn list_dir(&self, dir: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>>;
    /// The images in `layer`'s directory whose backing file it is.
    fn layer_users(&self, layer: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>>;

    // Files an instantiate creates, confined to the storage `roots` the operator mapped: under a root,
    // no link and no `..` followed on the way, nothing existing replaced or followed.

    /// Whether something (a file, a link, a directory) is at `path`, without following a link there.
    fn lexists(&self, path: &str) -> BoxFuture<'_, bool>;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &str) -> BoxFuture<'_, bool>;
    /// Creates `path`, which must not exist (not even as a link), under one of `roots`; returns it open
    /// for writing (the simulator's files have no data: `None`).
    fn create_new(&self, path: &str, roots: &[String]) -> BoxFuture<'_, Result<Option<std::fs::File>, StorageError>>;
    /// [`Storage::create_new`] with `content`, synced.
    fn write_new(&self, path: &str, roots: &[String], content: String) -> BoxFuture<'_, Result<(), StorageError>>;
    /// Gives the file `from` the further name `to` (a hard link, both under `roots`); fails when `to`
    /// exists: nothing is replaced.
    fn link_new(&self, from: &str, to: &str, roots: &[String]) -> BoxFuture<'_, Result<(), StorageError>>;
    /// Whether `a` and `b` are names of one file (a hard link of the other).
    fn same_file(&self, a: &str, b: &str) -> BoxFuture<'_, bool>;
    /// Removes the name `path` under `roots` (without following links); `Ok(false)` when it did not exist.
    fn remove_confined(&self, path: &str, roots: &[String]) -> BoxFuture<'_, Result<bool, StorageError>>;
    /// Checks that the file systems of `files` (path under `roots`, the bytes it will hold at most) have
    /// room for all of them.
    fn check_free_space(&self, files: Vec<(String, u64)>, roots: &[String]) -> BoxFuture<'_, Result<(), StorageError>>;
}

/// What a guest answered a request: `done`, `refused` or `failed`, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAnswer {
    pub outcome: String,
    pub reason: String,
}

impl GuestAnswer {
    pub fn done(&self) -> bool {
        self.outcome == "done"
    }
}

/// The guests' vmha channels, on any host (through the relay to the vmhad of the guest's host).
pub trait Guests: Send + Sync {
    /// A request to `vm` wherever the cluster says it runs. `Err`: it could not be delivered.
    fn request(
        &self,
        vm: &str,
        kind: &str,
        data: String,
        timeout_ms: u32,
    ) -> BoxFuture<'_, Result<GuestAnswer, String>>;
    /// A request to `vm` on `host`, whatever the CIB says (a VM that is no cluster resource yet).
    fn request_on(
        &self,
        host: &str,
        vm: &str,
        kind: &str,
        data: String,
        timeout_ms: u32,
    ) -> BoxFuture<'_, Result<GuestAnswer, String>>;
}

/// Where a job reports its steps.
pub trait Progress: Send + Sync {
    fn progress(&self, fraction: f64, message: &str) -> BoxFuture<'_, ()>;
}

/// A progress sink that only logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogProgress;

impl Progress for LogProgress {
    fn progress(&self, fraction: f64, message: &str) -> BoxFuture<'_, ()> {
        tracing::info!(fraction, message, "progress");
        Box::pin(async {})
    }
}

/// Wall-clock time and randomness (deterministic in the simulator).
pub trait Environment: Send + Sync {
    /// Milliseconds since the Unix epoch (names of files an operation makes).
    fn unix_ms(&self) -> u128;
    /// Fills `buf` with random bytes (UUIDs, MAC addresses).
    fn random(&self, buf: &mut [u8]);
}

/// Everything an operation runs against: one context passed in, no globals.
#[derive(Clone)]
pub struct Ports {
    pub cluster: Arc<dyn Cluster>,
    pub hypervisor: Arc<dyn Hypervisor>,
    pub storage: Arc<dyn Storage>,
    pub guests: Arc<dyn Guests>,
    pub env: Arc<dyn Environment>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports")
            .field("host", &self.cluster.local_host())
            .finish_non_exhaustive()
    }
}

impl Ports {
    /// Waits until `check` returns Some on a state (the current one or a later one), or fails after
    /// `limit` with a timeout.
    pub async fn wait_until<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&Snapshot) -> Option<T>,
    ) -> Result<T, WaitError> {
        let mut rx = self.cluster.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let current = rx.borrow_and_update().clone();
            if let Some(result) = check(&current) {
                return Ok(result);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(WaitError::ShuttingDown),
                Err(_) => return Err(WaitError::Timeout(limit)),
            }
        }
    }
}

/// Why [`Ports::wait_until`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("not done within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("vmhad is shutting down")]
    ShuttingDown,
}
