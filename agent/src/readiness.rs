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
/// At most this many paths the host does not see are listed in a report (a CPG message stays small); the
/// report's [`StorageSummary`] counts them all.
const MAX_PATHS: usize = 256;
/// At most this many VMs' files are looked at for one report; the others keep their last look. A host
/// with up to this many VMs looks at all of them every [`REPORT_INTERVAL`]; with 2000 VMs a full sweep
/// takes 16 reports (80 s) instead of reading 2000 domain XMLs every 5 s.
pub const VMS_PER_REPORT: usize = 128;
/// At most this many VMs are looked at at once (each look holds a blocking thread; [`MAX_OUTSTANDING`]
/// bounds them all).
const LOOKS_AT_ONCE: usize = 16;
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

/// What a host's last look at every managed VM's files found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageSummary {
    /// Managed VMs with a domain XML path.
    pub vms: usize,
    /// Of those, the ones looked at so far (all of them once the first sweep ended).
    pub looked_at: usize,
    /// Paths those looks found needed (each VM's domain XML and the files it names).
    pub paths: usize,
    /// Of those, the ones missing or unanswered ([`HostReport::storage`] lists the first [`MAX_PATHS`]).
    pub problems: usize,
    /// How long ago the oldest of those looks was, in ms.
    pub oldest_ms: u64,
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
    /// With a [`StorageSummary`]: the paths of the managed VMs this host does not see (missing, or no
    /// answer in time), the first [`MAX_PATHS`]. Without one (a vmhad before the summary): the VMs' paths,
    /// seen or not, the first [`MAX_PATHS`].
    pub storage: Vec<PathState>,
    /// What the last look at every managed VM's files found, counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_summary: Option<StorageSummary>,
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

/// Every managed VM with a domain XML path: (VM, XML path), in the view's order.
fn managed_configs(shared: &Shared) -> Vec<(String, String)> {
    let snap = shared.snapshot();
    let Some(view) = snap.view.as_ref() else {
        return Vec::new();
    };
    view.vms
        .iter()
        .filter_map(|vm| Some((vm.name.clone(), vm.config.clone()?)))
        .collect()
}

/// What one look at a VM's files found: every path and whether it exists (`None`: no answer in time).
type Found = Vec<(String, Option<bool>)>;

/// One VM's last look.
#[derive(Debug)]
struct Look {
    config: String,
    found: Found,
    at: Instant,
}

/// The last look at every managed VM's files. Each report looks again at [`VMS_PER_REPORT`] VMs: those
/// never looked at first, then those looked at longest ago; so every VM is covered, and a host with
/// thousands of VMs does not read every domain XML every [`REPORT_INTERVAL`].
#[derive(Debug, Default)]
pub struct StorageSweep {
    looks: BTreeMap<String, Look>,
}

impl StorageSweep {
    /// Looks at the next VMs of `vms` (VM, XML path) with `look` and returns the paths not seen (the first
    /// [`MAX_PATHS`]) and the summary over every VM's last look. VMs gone from `vms` are forgotten; a VM
    /// whose XML path changed counts as never looked at.
    pub async fn refresh<F, Fut>(
        &mut self,
        vms: &[(String, String)],
        now: Instant,
        look: F,
    ) -> (Vec<PathState>, StorageSummary)
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Option<Found>>,
    {
        let wanted: BTreeMap<&str, &str> = vms.iter().map(|(vm, c)| (vm.as_str(), c.as_str())).collect();
        self.looks
            .retain(|vm, l| wanted.get(vm.as_str()).is_some_and(|c| *c == l.config));
        // Never looked at first (in the view's order), then the oldest looks: each VM's key read once, and
        // only the VMs due sorted (with thousands of VMs, a sort of all of them by lookups in `looks` cost
        // more than the looks).
        let mut keyed: Vec<(Option<Instant>, usize)> = vms
            .iter()
            .enumerate()
            .map(|(i, (vm, _))| (self.looks.get(vm).map(|l| l.at), i))
            .collect();
        if keyed.len() > VMS_PER_REPORT {
            keyed.select_nth_unstable(VMS_PER_REPORT);
            keyed.truncate(VMS_PER_REPORT);
        }
        keyed.sort_unstable();
        let due: Vec<&(String, String)> = keyed.iter().map(|&(_, i)| &vms[i]).collect();
        for batch in due.chunks(LOOKS_AT_ONCE) {
            let found = futures_util::future::join_all(batch.iter().map(|(_, config)| look(config.clone()))).await;
            for ((vm, config), found) in batch.iter().zip(found) {
                // No answer: the paths of the last look (or the XML) are unknown now.
                let found = found.unwrap_or_else(|| match self.looks.get(vm) {
                    Some(last) => last.found.iter().map(|(p, _)| (p.clone(), None)).collect(),
                    None => vec![(config.clone(), None)],
                });
                let look = Look {
                    config: config.clone(),
                    found,
                    at: now,
                };
                self.looks.insert(vm.clone(), look);
            }
        }
        let mut summary = StorageSummary {
            vms: vms.len(),
            ..StorageSummary::default()
        };
        let mut unseen = Vec::new();
        for (vm, _) in vms {
            let Some(l) = self.looks.get(vm) else {
                continue;
            };
            summary.looked_at += 1;
            summary.paths += l.found.len();
            let age = u64::try_from(now.saturating_duration_since(l.at).as_millis()).unwrap_or(u64::MAX);
            summary.oldest_ms = summary.oldest_ms.max(age);
            for (path, exists) in &l.found {
                if *exists == Some(true) {
                    continue;
                }
                summary.problems += 1;
                if unseen.len() < MAX_PATHS {
                    unseen.push(PathState {
                        vm: vm.clone(),
                        path: path.clone(),
                        exists: *exists,
                    });
                }
            }
        }
        (unseen, summary)
    }
}

/// The files VM definition `config` needs and whether this host sees them, from one blocking look
/// within [`STAT_DEADLINE`] (`None`: no answer in time, or a look at it still outstanding).
async fn look_at_files(config: String) -> Option<Found> {
    let key = format!("vm-files:{config}");
    Probes::shared()
        .look(&key, STAT_DEADLINE, move || files_of(&config))
        .await
}

/// The domain XML at `config` and the files it names, each with whether it exists. An XML that cannot be
/// read (too big, not UTF-8) names no files.
fn files_of(config: &str) -> Found {
    if !Path::new(config).exists() {
        return vec![(config.to_string(), Some(false))];
    }
    let mut found = vec![(config.to_string(), Some(true))];
    if let Some(xml) = read_small(Path::new(config), 1 << 20) {
        for path in disk_sources(&xml) {
            let exists = Path::new(&path).exists();
            found.push((path, Some(exists)));
        }
    }
    found
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

/// This host's report now, after `sweep` looked at the next VMs' files.
pub async fn own_report(shared: &Shared, bus: Option<&zbus::Connection>, sweep: &mut StorageSweep) -> HostReport {
    let configs = managed_configs(shared);
    let (storage, summary) = sweep.refresh(&configs, Instant::now(), look_at_files).await;
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
        storage_summary: Some(summary),
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
    let mut sweep = StorageSweep::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let report = own_report(shared, Some(bus), &mut sweep).await;
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
    /// `{host, time_ms, clock: {ntp_daemon, synchronized}, storage: [{vm, path, exists}], storage_summary:
    /// {vms, looked_at, paths, problems, oldest_ms}, offset_ms, age_ms}` (`storage`: the paths that host
    /// does not see).
    async fn reports(&self) -> String {
        serde_json::to_string(&self.reports.list()).unwrap_or_else(|_| "[]".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vms(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("vm{i}"), format!("/shared/vm{i}.xml")))
            .collect()
    }

    /// A look that finds the XML and one disk, the disk missing for `vm7`; counts its calls.
    fn counting_look(calls: &Arc<Mutex<Vec<String>>>) -> impl Fn(String) -> std::future::Ready<Option<Found>> + '_ {
        move |config: String| {
            calls.lock().unwrap().push(config.clone());
            let disk = config.replace(".xml", ".qcow2");
            let seen = !config.ends_with("/vm7.xml");
            std::future::ready(Some(vec![(config, Some(true)), (disk, Some(seen))]))
        }
    }

    /// Scenario: 2000 VMs of one disk each. Each report reads 128 domain XMLs, never-read ones first and
    /// then the oldest; after 16 reports every VM has been looked at, and the summary counts all 4000
    /// paths, not the first 256.
    #[tokio::test]
    async fn every_vm_is_covered_128_per_report() {
        let vms = vms(2000);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut sweep = StorageSweep::default();
        let t0 = Instant::now();
        let (unseen, s) = sweep.refresh(&vms, t0, counting_look(&calls)).await;
        assert_eq!(calls.lock().unwrap().len(), VMS_PER_REPORT, "XML files read per report");
        assert_eq!((s.vms, s.looked_at, s.paths, s.problems), (2000, 128, 256, 1));
        assert_eq!(unseen.len(), 1);
        assert_eq!(
            (unseen[0].vm.as_str(), unseen[0].path.as_str()),
            ("vm7", "/shared/vm7.qcow2")
        );
        assert_eq!(unseen[0].exists, Some(false));
        for k in 1..16u64 {
            let (_, s) = sweep
                .refresh(&vms, t0 + REPORT_INTERVAL * k as u32, counting_look(&calls))
                .await;
            assert_eq!(s.looked_at, (128 * (k as usize + 1)).min(2000));
        }
        let read = calls.lock().unwrap().clone();
        assert_eq!(read.len(), 16 * 128);
        let distinct: HashSet<&String> = read[..2000].iter().collect();
        assert_eq!(distinct.len(), 2000, "no VM read twice before every VM was read once");
        // The 16th report read the last 80 VMs, then the 48 oldest looks again (VMs 0 to 47).
        assert_eq!(read[2000], "/shared/vm0.xml");
        let (_, s) = sweep
            .refresh(&vms, t0 + REPORT_INTERVAL * 16, counting_look(&calls))
            .await;
        assert_eq!((s.looked_at, s.paths, s.problems), (2000, 4000, 1));
        // The 17th: the oldest again, VMs 48 to 175; the oldest look left is the 2nd report's.
        assert_eq!(calls.lock().unwrap()[2048], "/shared/vm48.xml");
        assert_eq!(s.oldest_ms, 75_000);
    }

    /// A VM that left is forgotten; one whose XML path changed is looked at again first; a look with no
    /// answer makes that VM's last paths unknown (or its XML, never looked at).
    #[tokio::test]
    async fn left_changed_and_unanswered_vms() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut sweep = StorageSweep::default();
        let t0 = Instant::now();
        sweep.refresh(&vms(3), t0, counting_look(&calls)).await;
        let mut now = vms(2);
        now[1].1 = "/other/vm1.xml".into();
        calls.lock().unwrap().clear();
        let (_, s) = sweep.refresh(&now, t0, counting_look(&calls)).await;
        assert_eq!(s.vms, 2);
        assert_eq!(*calls.lock().unwrap(), vec!["/other/vm1.xml", "/shared/vm0.xml"]);
        let (unseen, s) = sweep.refresh(&now, t0, |_| std::future::ready(None::<Found>)).await;
        assert_eq!((s.paths, s.problems), (4, 4));
        assert!(unseen.iter().all(|p| p.exists.is_none()));
        assert_eq!(unseen[0].path, "/shared/vm0.xml");
        let mut fresh = StorageSweep::default();
        let (unseen, s) = fresh.refresh(&vms(1), t0, |_| std::future::ready(None::<Found>)).await;
        assert_eq!((s.paths, s.problems), (1, 1));
        assert_eq!(unseen[0].path, "/shared/vm0.xml");
    }

    /// Files on a real file system: the XML, a disk present, a disk and a kernel missing; a missing XML
    /// names nothing else.
    #[test]
    fn files_of_a_domain_xml() {
        let dir = std::env::temp_dir().join(format!("vmha-files-of-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("a.qcow2");
        std::fs::write(&disk, b"").unwrap();
        let xml = dir.join("vm.xml");
        std::fs::write(
            &xml,
            format!(
                "<domain><devices><disk type='file'><source file='{}'/></disk><disk type='file'><source file='{}/b.qcow2'/></disk></devices><os><kernel>/nonexistent/vmlinuz</kernel></os></domain>",
                disk.display(),
                dir.display()
            ),
        )
        .unwrap();
        let found = files_of(xml.to_str().unwrap());
        let flags: Vec<Option<bool>> = found.iter().map(|(_, e)| *e).collect();
        assert_eq!(flags, vec![Some(true), Some(true), Some(false), Some(false)]);
        assert_eq!(found[3].0, "/nonexistent/vmlinuz");
        let gone = dir.join("gone.xml");
        assert_eq!(
            files_of(gone.to_str().unwrap()),
            vec![(gone.display().to_string(), Some(false))]
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
                exists: Some(false),
            }],
            storage_summary: Some(StorageSummary {
                vms: 1,
                looked_at: 1,
                paths: 2,
                problems: 1,
                oldest_ms: 5000,
            }),
            authkey: Some("0123456789abcdef".into()),
            authkey_problem: None,
        };
        reports.record(r.clone(), -40, 1);
        let json = serde_json::to_string(&reports.list()).unwrap();
        let back: Vec<ReceivedReport> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].report, r);
        assert_eq!(back[0].offset_ms, -40);
        // A report of a vmhad before the summary still reads.
        let old = r#"{"host":"node2","time_ms":1,"clock":{"ntp_daemon":null,"synchronized":null},"storage":[]}"#;
        assert_eq!(serde_json::from_str::<HostReport>(old).unwrap().storage_summary, None);
        reports.forget_nodes(&[2]);
        assert_eq!(reports.list().len(), 1);
        reports.forget_nodes(&[1]);
        assert!(reports.list().is_empty());
    }
}
