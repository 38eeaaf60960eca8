//! What every vmhad tells the others about its own host, for `vmha check`: whether the storage of the
//! managed VMs (their domain XML and disk images) is visible there, and its clock (the time it sent the
//! report, whether an NTP daemon runs and whether the clock is synchronized).
//!
//! Every vmhad joins the Corosync process group [`READINESS_GROUP`] on its own CPG connection and
//! multicasts its [`HostReport`] every [`REPORT_INTERVAL`]. Each vmhad keeps the last report of every
//! host with the offset between the sender's clock and its own at delivery (CPG delivers within
//! milliseconds on a healthy ring, far below the 1 s `vmha check` tolerates), and serves them on D-Bus:
//! `org.vmha.Vmha1.Readiness.Reports()` at [`READINESS_PATH`] returns them as JSON. Nothing is written
//! into the CIB, so the reports cost the cluster no CIB traffic.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmha_corosync::{Cmap, Cpg, CpgEvent, DEFAULT_DEADLINE};

use crate::state::Shared;

/// CPG group of the readiness reports (separate from the `vmhad` group, whose membership is the list of
/// hosts where vmhad runs).
pub const READINESS_GROUP: &str = "vmhad-readiness";
/// D-Bus object that serves the reports.
pub use vmha_api::{READINESS_INTERFACE, READINESS_PATH};
/// How often each vmhad sends its report.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Deadline for looking at one file on (possibly hung) shared storage.
const STAT_DEADLINE: Duration = Duration::from_secs(3);
/// At most this many paths are reported (a CPG message stays small).
const MAX_PATHS: usize = 256;
/// At most this many looks at shared storage may be outstanding at once (each holds a blocking thread).
const MAX_OUTSTANDING: usize = 64;

/// One path a managed VM needs, and whether this host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathState {
    pub vm: String,
    pub path: String,
    /// `true`: exists; `false`: missing; `None`: could not be looked at in time (hung storage?).
    pub exists: Option<bool>,
}

/// What the kernel and the process table say about this host's clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockFacts {
    /// The NTP daemon found running (chronyd, ntpd, systemd-timesyncd, ...), if any.
    pub ntp_daemon: Option<String>,
    /// The kernel's word (adjtimex): `None` when it could not be read.
    pub synchronized: Option<bool>,
}

/// One host's report as sent on the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    /// The sender's wall clock when it sent the report (ms since the Unix epoch).
    pub time_ms: i64,
    pub clock: ClockFacts,
    pub storage: Vec<PathState>,
    /// The fingerprint of the relay's authkey on that host (never the key); `None`: no usable key (or a
    /// vmhad older than the authenticated relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authkey: Option<String>,
    /// Why that host has no usable authkey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authkey_problem: Option<String>,
}

/// A report as one vmhad received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedReport {
    #[serde(flatten)]
    pub report: HostReport,
    /// The sender's clock minus the receiver's at delivery, in ms.
    pub offset_ms: i64,
    /// How long ago it arrived, in ms.
    pub age_ms: u64,
}

/// The last report of every host, by host name.
#[derive(Debug, Default)]
pub struct Reports {
    by_host: Mutex<BTreeMap<String, (HostReport, i64, Instant, u32)>>,
}

impl Reports {
    pub fn new() -> Arc<Reports> {
        Arc::new(Reports::default())
    }

    fn record(&self, report: HostReport, offset_ms: i64, nodeid: u32) {
        if let Ok(mut m) = self.by_host.lock() {
            m.insert(report.host.clone(), (report, offset_ms, Instant::now(), nodeid));
        }
    }

    /// Forgets the reports of processes that left the group (their vmhad stopped or their host left).
    fn forget_nodes(&self, nodeids: &[u32]) {
        if let Ok(mut m) = self.by_host.lock() {
            m.retain(|_, (_, _, _, id)| !nodeids.contains(id));
        }
    }

    fn clear(&self) {
        if let Ok(mut m) = self.by_host.lock() {
            m.clear();
        }
    }

    pub fn list(&self) -> Vec<ReceivedReport> {
        let Ok(m) = self.by_host.lock() else {
            return Vec::new();
        };
        m.values()
            .map(|(report, offset_ms, at, _)| ReceivedReport {
                report: report.clone(),
                offset_ms: *offset_ms,
                age_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
            .collect()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The NTP daemon running on this host, from the process table (`/proc/*/comm`).
pub fn running_ntp_daemon() -> Option<String> {
    const DAEMONS: [&str; 5] = ["chronyd", "ntpd", "systemd-timesyn", "openntpd", "ntpsec"];
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if DAEMONS.contains(&comm) {
            return Some(if comm == "systemd-timesyn" {
                "systemd-timesyncd".to_string()
            } else {
                comm.to_string()
            });
        }
    }
    None
}

/// This host's clock facts. Whether the clock is synchronized comes from systemd-timedated
/// (`org.freedesktop.timedate1.NTPSynchronized`, the kernel's own flag as `timedatectl` shows it), asked
/// within 3 s; vmhad's unit forbids vmhad the clock system calls itself (`ProtectClock=yes`).
pub async fn clock_facts(bus: Option<&zbus::Connection>) -> ClockFacts {
    let ntp_daemon = tokio::task::spawn_blocking(running_ntp_daemon)
        .await
        .unwrap_or_default();
    let synchronized = match bus {
        Some(bus) => tokio::time::timeout(Duration::from_secs(3), ntp_synchronized(bus))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    ClockFacts {
        ntp_daemon,
        synchronized,
    }
}

async fn ntp_synchronized(bus: &zbus::Connection) -> Option<bool> {
    let props = zbus::fdo::PropertiesProxy::builder(bus)
        .destination("org.freedesktop.timedate1")
        .ok()?
        .path("/org/freedesktop/timedate1")
        .ok()?
        .build()
        .await
        .ok()?;
    let iface = zbus::names::InterfaceName::try_from("org.freedesktop.timedate1").ok()?;
    let value = props.get(iface, "NTPSynchronized").await.ok()?;
    bool::try_from(value).ok()
}

/// Looks at files on (possibly hung) shared storage from blocking threads, at most one outstanding look
/// per path and [`MAX_OUTSTANDING`] in all. A look that hangs (a hung NFS mount, a dead multipath device:
/// the thread sleeps in the kernel and cannot be cancelled) keeps its thread; until it returns, its path
/// is reported unknown at once, without starting another thread. So storage that stays hung costs vmhad
/// one thread per path, not one per path per report, and never more than [`MAX_OUTSTANDING`].
#[derive(Debug)]
pub struct Probes {
    outstanding: Arc<Mutex<HashSet<String>>>,
    max: usize,
}

impl Probes {
    pub fn new(max: usize) -> Probes {
        Probes {
            outstanding: Arc::default(),
            max,
        }
    }

    /// The probes vmhad uses for its shared-storage reads (readiness reports, VM definitions).
    pub fn shared() -> &'static Probes {
        static PROBES: OnceLock<Probes> = OnceLock::new();
        PROBES.get_or_init(|| Probes::new(MAX_OUTSTANDING))
    }

    /// Runs `look` on a blocking thread for `path` and waits at most `limit` for it; `None` when it did
    /// not answer in time, or was not started because a look at `path` is still outstanding or too many
    /// are.
    pub async fn look<T: Send + 'static>(
        &self,
        path: &str,
        limit: Duration,
        look: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        {
            let mut outstanding = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
            if outstanding.len() >= self.max || !outstanding.insert(path.to_string()) {
                return None;
            }
        }
        let outstanding = Arc::clone(&self.outstanding);
        let key = path.to_string();
        let work = tokio::task::spawn_blocking(move || {
            let result = look();
            outstanding.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            result
        });
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(found)) => Some(found),
            Ok(Err(_)) => {
                // The look panicked: its thread is gone, so is the path's slot.
                self.outstanding.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
                None
            }
            Err(_) => None,
        }
    }

    /// How many looks are outstanding.
    pub fn outstanding(&self) -> usize {
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Whether `path` exists, looked at within [`STAT_DEADLINE`] (`None`: no answer in time, or the last look
/// at it has not returned yet).
async fn exists(path: String) -> Option<bool> {
    let look = path.clone();
    Probes::shared()
        .look(&path, STAT_DEADLINE, move || Path::new(&look).exists())
        .await
}

/// The paths every managed VM needs: its domain XML and the disk images it names, the first
/// [`MAX_PATHS`] of them.
async fn needed_paths(shared: &Shared) -> Vec<(String, String)> {
    let snap = shared.snapshot();
    let Some(view) = snap.view.as_ref() else {
        return Vec::new();
    };
    let configs = view
        .vms
        .iter()
        .filter_map(|vm| Some((vm.name.clone(), vm.config.clone()?)));
    first_paths(configs, |config| async move {
        read_shared_file(&config, 1 << 20, STAT_DEADLINE)
            .await
            .map(|xml| disk_sources(&xml))
            .unwrap_or_default()
    })
    .await
}

/// Each VM's domain XML path and the disks `disks_of` finds in it, in order, until there are
/// [`MAX_PATHS`]: no VM's XML is read past that (each host reads them every [`REPORT_INTERVAL`]; with
/// thousands of VMs, reading them all to keep the first paths cost vmhad more CPU at rest than anything
/// else it does).
async fn first_paths<F, Fut>(configs: impl Iterator<Item = (String, String)>, mut disks_of: F) -> Vec<(String, String)>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let mut paths = Vec::new();
    for (vm, config) in configs {
        if paths.len() >= MAX_PATHS {
            break;
        }
        paths.push((vm.clone(), config.clone()));
        for disk in disks_of(config).await {
            paths.push((vm.clone(), disk));
        }
    }
    paths.truncate(MAX_PATHS);
    paths
}

/// The text of file `path` on shared storage if it is at most `max` bytes, read within `limit` through
/// [`Probes::shared`] (`None`: unreadable, too big, no answer in time or a read of it still outstanding).
pub async fn read_shared_file(path: &str, max: u64, limit: Duration) -> Option<String> {
    let file = path.to_string();
    Probes::shared()
        .look(path, limit, move || read_small(Path::new(&file), max))
        .await
        .flatten()
}

/// The text of `path` if it is at most `max` bytes (never reads more than `max + 1`).
fn read_small(path: &Path, max: u64) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(max + 1)
        .read_to_string(&mut text)
        .ok()?;
    (text.len() as u64 <= max).then_some(text)
}

/// The files a domain definition needs on the host that starts it: its disks' images (`<disk
/// type='file'>` and `type='block'` sources; network disks are no files to look for) and a direct-boot
/// kernel and initrd (`<os><kernel>`, `<os><initrd>`). Unreadable XML yields none.
pub fn disk_sources(xml: &str) -> Vec<String> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    let disks = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && matches!(n.attribute("type"), Some("file") | Some("block")))
        .filter_map(|disk| disk.children().find(|c| c.has_tag_name("source")))
        .filter_map(|source| source.attribute("file").or_else(|| source.attribute("dev")));
    let boot = doc
        .descendants()
        .filter(|n| n.has_tag_name("os"))
        .flat_map(|os| os.children())
        .filter(|n| n.has_tag_name("kernel") || n.has_tag_name("initrd"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    disks.chain(boot).map(str::to_string).collect()
}

/// This host's report now.
pub async fn own_report(shared: &Shared, bus: Option<&zbus::Connection>) -> HostReport {
    let mut storage = Vec::new();
    for (vm, path) in needed_paths(shared).await {
        let found = exists(path.clone()).await;
        storage.push(PathState {
            vm,
            path,
            exists: found,
        });
    }
    let clock = clock_facts(bus).await;
    let (authkey, authkey_problem) = match crate::relay::authkey_status() {
        Some(Ok(fingerprint)) => (Some(fingerprint), None),
        Some(Err(problem)) => (None, Some(problem)),
        None => (None, None),
    };
    HostReport {
        host: shared.local_host.clone(),
        time_ms: now_ms(),
        clock,
        storage,
        authkey,
        authkey_problem,
    }
}

/// Sends this host's report every [`REPORT_INTERVAL`] and keeps everyone's; reconnects with a growing
/// delay when Corosync goes away (the reports are then forgotten: they would go stale).
pub async fn follow_readiness(bus: zbus::Connection, shared: Arc<Shared>, reports: Arc<Reports>) {
    let mut delay = Duration::from_millis(500);
    loop {
        if let Err(e) = session(&bus, &shared, &reports, &mut delay).await {
            tracing::warn!("readiness reports: {e}");
        }
        reports.clear();
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn session(
    bus: &zbus::Connection,
    shared: &Arc<Shared>,
    reports: &Arc<Reports>,
    delay: &mut Duration,
) -> Result<(), String> {
    let cmap = Cmap::connect(DEFAULT_DEADLINE).await.map_err(|e| e.to_string())?;
    let names = cmap.node_names().await.map_err(|e| e.to_string())?;
    drop(cmap);
    let (cpg, mut events) = Cpg::connect(DEFAULT_DEADLINE).await.map_err(|e| e.to_string())?;
    cpg.join(READINESS_GROUP).await.map_err(|e| e.to_string())?;
    *delay = Duration::from_millis(500);
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let report = own_report(shared, Some(bus)).await;
                let data = serde_json::to_vec(&report).map_err(|e| e.to_string())?;
                cpg.mcast(&data).await.map_err(|e| e.to_string())?;
            }
            event = events.next() => match event.map_err(|e| e.to_string())? {
                CpgEvent::Message { group, nodeid, data, .. } if group == READINESS_GROUP => {
                    let received = now_ms();
                    match serde_json::from_slice::<HostReport>(&data) {
                        // A host speaks only for itself: the name must be the sender node's.
                        Ok(r) if names.get(&nodeid).is_none_or(|n| *n == r.host) => {
                            let offset = r.time_ms.saturating_sub(received);
                            reports.record(r, offset, nodeid);
                        }
                        Ok(r) => tracing::warn!(nodeid, host = %r.host, "ignoring a readiness report sent for another host"),
                        Err(e) => tracing::warn!(nodeid, "ignoring an unreadable readiness report: {e}"),
                    }
                }
                CpgEvent::Membership { group, left, .. } if group == READINESS_GROUP => {
                    let gone: Vec<u32> = left.iter().map(|m| m.nodeid).collect();
                    reports.forget_nodes(&gone);
                }
                _ => {}
            },
        }
    }
}

/// The D-Bus object serving the reports.
#[derive(Debug)]
pub struct ReadinessObject {
    pub reports: Arc<Reports>,
}

#[zbus::interface(name = "org.vmha.Vmha1.Readiness")]
impl ReadinessObject {
    /// The last report of every host whose vmhad is in the readiness group, as a JSON array of objects
    /// `{host, time_ms, clock: {ntp_daemon, synchronized}, storage: [{vm, path, exists}], offset_ms,
    /// age_ms}`.
    async fn reports(&self) -> String {
        serde_json::to_string(&self.reports.list()).unwrap_or_else(|_| "[]".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scenario: 2000 VMs of one disk each: the paths of the first 128 are kept, and no XML past the
    /// 128th is read.
    #[tokio::test]
    async fn no_domain_xml_is_read_past_the_path_limit() {
        let configs = (0..2000).map(|i| (format!("vm{i}"), format!("/shared/vm{i}.xml")));
        let mut read = 0;
        let paths = first_paths(configs, |config| {
            read += 1;
            async move { vec![config.replace(".xml", ".qcow2")] }
        })
        .await;
        assert_eq!(paths.len(), MAX_PATHS);
        assert_eq!(read, MAX_PATHS / 2, "XML files read");
        assert_eq!(paths[0], ("vm0".to_string(), "/shared/vm0.xml".to_string()));
        assert_eq!(paths[255], ("vm127".to_string(), "/shared/vm127.qcow2".to_string()));
        // A VM with many disks at the limit: cut at the limit.
        let many = [("big".to_string(), "/shared/big.xml".to_string())].into_iter();
        let paths = first_paths(many, |_| async { (0..300).map(|d| format!("/shared/d{d}")).collect() }).await;
        assert_eq!(paths.len(), MAX_PATHS);
    }

    #[test]
    fn disk_sources_are_file_and_block_disks() {
        let xml = r#"<domain><devices>
            <disk type='file' device='disk'><source file='/shared/a.qcow2'/></disk>
            <disk type='block' device='disk'><source dev='/dev/vg/b'/></disk>
            <disk type='network' device='disk'><source protocol='rbd' name='pool/c'/></disk>
            <disk type='file' device='cdrom'/>
            </devices><os><type>hvm</type><kernel>/img/vmlinuz</kernel><initrd> /img/initrd </initrd></os></domain>"#;
        assert_eq!(
            disk_sources(xml),
            vec!["/shared/a.qcow2", "/dev/vg/b", "/img/vmlinuz", "/img/initrd"]
        );
        assert!(disk_sources("not xml").is_empty());
    }

    #[tokio::test]
    async fn a_hung_path_holds_one_thread_however_often_it_is_looked_at() {
        let probes = Probes::new(3);
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // A look that hangs until released, like a stat on a hung NFS mount.
        let (release, hung) = std::sync::mpsc::channel::<()>();
        let hung = Arc::new(Mutex::new(hung));
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let mut done_tx = Some(done_tx);
        for _ in 0..10 {
            let (started, hung) = (Arc::clone(&started), Arc::clone(&hung));
            let done_tx = done_tx.take();
            let r = probes
                .look("/shared/hung.qcow2", Duration::from_millis(20), move || {
                    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = hung.lock().unwrap().recv();
                    if let Some(tx) = done_tx {
                        let _ = tx.send(());
                    }
                    true
                })
                .await;
            assert_eq!(r, None, "a hung look answers unknown");
        }
        assert_eq!(
            started.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one thread for the hung path"
        );
        assert_eq!(probes.outstanding(), 1);

        // Other paths still get looked at, up to the cap of outstanding looks.
        assert_eq!(
            probes.look("/shared/ok", Duration::from_secs(5), || true).await,
            Some(true)
        );
        let (_keep1, block1) = std::sync::mpsc::channel::<()>();
        let (_keep2, block2) = std::sync::mpsc::channel::<()>();
        assert_eq!(
            probes
                .look("/shared/b", Duration::from_millis(20), move || block1.recv().is_ok())
                .await,
            None
        );
        assert_eq!(
            probes
                .look("/shared/c", Duration::from_millis(20), move || block2.recv().is_ok())
                .await,
            None
        );
        assert_eq!(probes.outstanding(), 3);
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ran2 = Arc::clone(&ran);
        assert_eq!(
            probes
                .look("/shared/d", Duration::from_secs(5), move || ran2
                    .store(true, std::sync::atomic::Ordering::SeqCst))
                .await,
            None,
            "the cap is reached"
        );
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "no thread was started past the cap"
        );

        // Once the hung look returns, the path is looked at again.
        release.send(()).unwrap();
        done.await.unwrap();
        // The slot is freed right after the look returns, on its own thread: wait for that.
        let freed = tokio::time::timeout(Duration::from_secs(5), async {
            while probes.outstanding() != 2 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(freed.is_ok(), "the released look freed its path");
        assert_eq!(
            probes
                .look("/shared/hung.qcow2", Duration::from_secs(5), || false)
                .await,
            Some(false)
        );
    }

    #[test]
    fn small_files_only() {
        let dir = std::env::temp_dir().join(format!("vmha-readiness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("d.xml");
        std::fs::write(&f, "<domain/>").unwrap();
        assert_eq!(read_small(&f, 9).as_deref(), Some("<domain/>"));
        assert_eq!(read_small(&f, 8), None);
        assert_eq!(read_small(&dir.join("missing"), 100), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reports_round_trip_and_carry_offset_and_age() {
        let reports = Reports::new();
        let r = HostReport {
            host: "node1".into(),
            time_ms: 1000,
            clock: ClockFacts {
                ntp_daemon: Some("chronyd".into()),
                synchronized: Some(true),
            },
            storage: vec![PathState {
                vm: "vm1".into(),
                path: "/shared/vm1.qcow2".into(),
                exists: Some(true),
            }],
            authkey: Some("0123456789abcdef".into()),
            authkey_problem: None,
        };
        reports.record(r.clone(), -40, 1);
        let json = serde_json::to_string(&reports.list()).unwrap();
        let back: Vec<ReceivedReport> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].report, r);
        assert_eq!(back[0].offset_ms, -40);
        reports.forget_nodes(&[2]);
        assert_eq!(reports.list().len(), 1);
        reports.forget_nodes(&[1]);
        assert!(reports.list().is_empty());
    }
}
