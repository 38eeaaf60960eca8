//! `vmha-bench scale`: vmhad and the CLI on a large cluster. A 3-host lab with vmhad on each; its CIB is
//! grown to `hosts` nodes (the extra ones offline: never started, recorded in the CIB's status section as
//! cleanly down, see [`grow`]) and `vms` VM primitives (`ocf:vmha:VirtualMachine`, target-role=Stopped so
//! that no QEMU runs, with cpu and hv_memory utilization), in a few bulk `cibadmin --modify` calls. Then:
//!
//! - vmhad's latency and CPU per CIB change: `changes` small changes (a meta attribute on a different VM
//!   each time, by `cibadmin --modify`), each waited for until host 1's vmhad publishes a CIB version with a
//!   newer epoch (a PropertiesChanged signal of its `CibVersion`), timed by the bench's own monotonic clock
//!   inside host 1, and split at the CIB manager's notification as the bench's own CIB subscription receives
//!   it; vmhad's CPU from /proc/<pid>/stat around all of them, less its idle rate measured just before.
//! - vmhad's RSS (VmRSS of /proc/<pid>/status) freshly started on the 3-host CIB, and at the large size.
//! - wall time of `vmha status`, `vmha what-if --n-plus-one` and `vmha policy apply --dry-run` (a small
//!   stored policy), run in host 1, timed by `vmha-bench measure` around the process.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use vmha_lab::guest::GuestSpec;
use vmha_lab::{wait_for, Lab, LabConfig};

use crate::measure::{process_cpu_ms, Side};
use crate::report::{cell, median, verdict, Run};

/// First Corosync node id of the extra (offline) nodes.
const EXTRA_ID: u32 = 101;

pub fn vm_name(i: usize) -> String {
    format!("sv{i:04}")
}

/// `admin_epoch.epoch.num_updates` as numbers.
fn version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|x| x.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// The version attributes of the live CIB's root element, as vmhad publishes them.
fn cib_version(lab: &Lab, n: u8) -> Result<String> {
    let out = lab.exec_ok(n, &["sh", "-c", "cibadmin --query --local | head -c 1000"])?;
    let attr = |name: &str| -> Option<String> {
        let key = format!(" {name}=\"");
        let at = out.find(&key)? + key.len();
        Some(out[at..].split('"').next()?.to_string())
    };
    Ok(format!(
        "{}.{}.{}",
        attr("admin_epoch").ok_or_else(|| anyhow!("no admin_epoch in the CIB"))?,
        attr("epoch").ok_or_else(|| anyhow!("no epoch in the CIB"))?,
        attr("num_updates").ok_or_else(|| anyhow!("no num_updates in the CIB"))?
    ))
}

/// VmRSS (KiB) and utime+stime (ms) of host N's vmhad, read from that host's /proc.
pub fn vmhad_usage(lab: &Lab, n: u8) -> Result<(u32, f64, f64)> {
    let pid = lab.vmhad_pid(n)?.ok_or_else(|| anyhow!("no vmhad runs on host {n}"))?;
    let out = lab.exec_ok(
        n,
        &["cat", &format!("/proc/{pid}/status"), &format!("/proc/{pid}/stat")],
    )?;
    let rss = out
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no VmRSS for vmhad {pid}"))?;
    let stat = out.lines().last().unwrap_or("");
    let cpu = crate::measure::cpu_ms_of_stat(stat).ok_or_else(|| anyhow!("no CPU times for vmhad {pid}"))?;
    Ok((pid, rss, cpu))
}

/// Host N's vmhad's resident memory split (KiB): (anonymous: its heap and stacks; file-backed and shared:
/// the pages of its binary and libraries, shared with every process that maps them, and shm).
pub fn vmhad_rss_split(lab: &Lab, n: u8) -> Result<(f64, f64)> {
    let pid = lab.vmhad_pid(n)?.ok_or_else(|| anyhow!("no vmhad runs on host {n}"))?;
    let out = lab.exec_ok(n, &["cat", &format!("/proc/{pid}/status")])?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no {name} for vmhad {pid}"))
    };
    Ok((field("RssAnon:")?, field("RssFile:")? + field("RssShmem:")?))
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

/// The nodes and VMs added to the CIB: offline nodes (a `<node>` each, and a `<node_state>` saying it is
/// cleanly down, as Pacemaker records a node that left the cluster in an orderly way) and stopped VMs.
///
/// Why the node_state: a configured node that the cluster has never seen is *unclean* to Pacemaker's
/// scheduler while `startup-fencing` is true (the default, and what a production cluster wants), so 29
/// never-seen nodes would each be fenced; the lab's fence device cannot reach them, so every transition
/// would retry 29 failing fencing actions (a fencing storm). A real 32-host cluster with 29 hosts down
/// has seen them and knows they left cleanly; the node_state entries record exactly that. Fencing stays on.
fn grow(lab: &Lab, hosts: u8, vms: usize) -> Result<()> {
    let shared = lab.cfg.shared_dir();
    let mut nodes = String::from("<nodes>");
    let mut status = String::from("<status>");
    for n in 4..=u32::from(hosts) {
        let id = EXTRA_ID + n - 4;
        let _ = write!(nodes, r#"<node id="{id}" uname="node{n}"/>"#);
        let _ = write!(
            status,
            r#"<node_state id="{id}" uname="node{n}" in_ccm="false" crmd="offline" crm-debug-origin="vmha-bench" join="down" expected="down"/>"#
        );
    }
    nodes.push_str("</nodes>");
    status.push_str("</status>");
    if hosts > 3 {
        cibadmin(lab, &shared, "nodes", &nodes)?;
        cibadmin(lab, &shared, "status", &status)?;
    }
    // No probes: without this, Pacemaker probes every new resource on every online host (3 x vms agent
    // calls, and as many status updates, each a CIB change every vmhad handles), which at 2000 VMs would
    // not finish in the time this bench has. One location constraint per online host, by pattern.
    let mut cons = String::from("<constraints>");
    for n in lab.cfg.host_numbers() {
        let _ = write!(
            cons,
            r#"<rsc_location id="bench-no-probe-{n}" rsc-pattern="^sv[0-9]+$" node="{}" score="0" resource-discovery="never"/>"#,
            lab.cfg.host_name(n)
        );
    }
    cons.push_str("</constraints>");
    cibadmin(lab, &shared, "constraints", &cons)?;
    // The domain XML every VM's config names (the agent's probe reads it): one small file per VM.
    const BATCH: usize = 500;
    for start in (0..vms).step_by(BATCH) {
        let mut xml = String::from("<resources>");
        for i in start..(start + BATCH).min(vms) {
            let name = vm_name(i);
            let path = lab.write_domain_xml(&GuestSpec::new(&name))?;
            xml.push_str(&vmha_model::change::vm_primitive(&vmha_model::change::NewVm {
                name: &name,
                config: path.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
                hypervisor: "qemu:///system",
                migration_transport: "tcp",
                // As the domain XML says (vmhad corrects a VM's utilization to its domain's).
                cpu: 1,
                memory_mib: 128,
                start: false,
            })?);
        }
        xml.push_str("</resources>");
        cibadmin(lab, &shared, "resources", &xml)?;
    }
    Ok(())
}

/// `cibadmin --modify --scope SCOPE --xml-file` (a file on shared storage) on host 1.
fn cibadmin(lab: &Lab, shared: &Path, scope: &str, xml: &str) -> Result<()> {
    let file = shared.join(format!("bench-{scope}.xml"));
    std::fs::write(&file, xml)?;
    let f = file.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let out = lab.exec_with_deadline(
        1,
        &["cibadmin", "--modify", "--scope", scope, "--xml-file", f],
        Duration::from_secs(300),
    )?;
    if !out.status.success() {
        bail!(
            "cibadmin --modify --scope {scope}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What `vmha-bench cib-changes` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Changes {
    /// From starting `cibadmin --modify` to vmhad's publication of a newer epoch (ms).
    pub from_call_ms: Vec<f64>,
    /// From cibadmin's exit (the CIB has the change) to vmhad's publication (ms; negative: published first).
    pub from_commit_ms: Vec<f64>,
    /// From the CIB manager's change notification (as this process, a CIB client like vmhad, received it)
    /// to vmhad's publication (ms): vmhad's share of the latency, by this process's clock.
    #[serde(default)]
    pub from_notify_ms: Vec<f64>,
    /// From starting cibadmin to that notification (ms): Pacemaker's share.
    #[serde(default)]
    pub to_notify_ms: Vec<f64>,
    /// vmhad's CPU (ms) over all the changes.
    pub cpu_ms: f64,
    /// How long all the changes took (ms).
    pub span_ms: f64,
    /// vmhad's CPU (ms) over `idle_ms` of quiet right before the changes.
    pub idle_cpu_ms: f64,
    #[serde(default)]
    pub idle_ms: f64,
    /// Every CIB update the bench's own subscription was notified of from the first change to the end
    /// (the bench's changes and whatever else was written meanwhile: the DC's transitions, status
    /// updates); vmhad handles each of them.
    #[serde(default)]
    pub updates: usize,
}

/// `vmha-bench cib-changes` (runs inside a lab host): `count` changes, a meta attribute on VM `i` each.
pub fn cib_changes(pid: i32, count: usize, vms: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let out = rt.block_on(async move {
        let bus = zbus::Connection::system().await?;
        let proxy = vmha_api::proxy::ClusterProxy::new(&bus).await?;
        let mut changed = proxy.receive_cib_version_changed().await;
        let mut current = proxy.cib_version().await?;
        // A CIB client of its own, subscribed as vmhad is: when the notification of each change arrives.
        let cib = vmha_pacemaker::Cib::connect("vmha-bench", vmha_pacemaker::Access::ReadOnly, LIMIT).await?;
        let mut notes = cib.subscribe(LIMIT).await?;
        let mut c = Changes {
            from_call_ms: Vec::new(),
            from_commit_ms: Vec::new(),
            from_notify_ms: Vec::new(),
            to_notify_ms: Vec::new(),
            cpu_ms: 0.0,
            span_ms: 0.0,
            idle_cpu_ms: 0.0,
            idle_ms: 0.0,
            updates: 0,
        };
        // Notifications of the quiet span (none, if it was quiet) are not the changes'.
        while let Some(Some(_)) = futures_util::FutureExt::now_or_never(notes.next()) {}
        // vmhad's CPU while nothing changes, before the changes (after them, Pacemaker may still be
        // writing the status updates the changes caused).
        let idle0 = process_cpu_ms(pid).context("vmhad's /proc/<pid>/stat")?;
        let quiet = Instant::now();
        tokio::time::sleep(IDLE).await;
        c.idle_cpu_ms = process_cpu_ms(pid).context("vmhad's /proc/<pid>/stat")? - idle0;
        c.idle_ms = quiet.elapsed().as_secs_f64() * 1000.0;
        let cpu0 = process_cpu_ms(pid).context("vmhad's /proc/<pid>/stat")?;
        let start = Instant::now();
        for i in 0..count {
            let name = vm_name((i * 7919) % vms.max(1));
            let old = version(&current).ok_or_else(|| anyhow!("vmhad's CibVersion {current:?}"))?;
            let xml = format!(
                r#"<primitive id="{name}"><meta_attributes id="{name}-meta_attributes"><nvpair id="{name}-meta_attributes-bench-mark" name="bench-mark" value="{i}"/></meta_attributes></primitive>"#
            );
            let t0 = Instant::now();
            let mut child = tokio::process::Command::new("cibadmin")
                .args(["--modify", "--xml-text", &xml])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let mut commit: Option<Instant> = None;
            let mut seen: Option<Instant> = None;
            let mut notified: Option<Instant> = None;
            let deadline = tokio::time::sleep(Duration::from_secs(30));
            tokio::pin!(deadline);
            while commit.is_none() || seen.is_none() || notified.is_none() {
                tokio::select! {
                    n = notes.next() => {
                        let n = n.ok_or_else(|| anyhow!("the CIB subscription ended"))??;
                        c.updates += 1;
                        if notified.is_none() && n.version.is_some_and(|v| (v.admin_epoch, v.epoch) > (old.0, old.1)) {
                            notified = Some(Instant::now());
                        }
                    }
                    st = child.wait(), if commit.is_none() => {
                        if !st?.success() {
                            bail!("cibadmin --modify of {name} failed");
                        }
                        commit = Some(Instant::now());
                    }
                    v = changed.next(), if seen.is_none() => {
                        let v = v.ok_or_else(|| anyhow!("vmhad left the bus"))?.get().await?;
                        if version(&v).is_some_and(|n| (n.0, n.1) > (old.0, old.1)) {
                            seen = Some(Instant::now());
                        }
                        current = v;
                    }
                    _ = &mut deadline => bail!("vmhad did not publish change {i} within 30 s (still {current})"),
                }
            }
            let (commit, seen, notified) = (commit.unwrap_or(t0), seen.unwrap_or(t0), notified.unwrap_or(t0));
            c.to_notify_ms.push(notified.duration_since(t0).as_secs_f64() * 1000.0);
            c.from_notify_ms.push(signed_ms(seen, notified));
            c.from_call_ms.push(seen.duration_since(t0).as_secs_f64() * 1000.0);
            c.from_commit_ms.push(signed_ms(seen, commit));
        }
        let span = start.elapsed();
        c.cpu_ms = process_cpu_ms(pid).context("vmhad's /proc/<pid>/stat")? - cpu0;
        // Notified by then but not read yet.
        while let Some(Some(n)) = futures_util::FutureExt::now_or_never(notes.next()) {
            n?;
            c.updates += 1;
        }
        c.span_ms = span.as_secs_f64() * 1000.0;
        anyhow::Ok(c)
    })?;
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// `a - b` in ms (negative when `a` came first).
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        a.duration_since(b).as_secs_f64() * 1000.0
    } else {
        -(b.duration_since(a).as_secs_f64() * 1000.0)
    }
}

/// The quiet span over which vmhad's idle CPU is measured.
const IDLE: Duration = Duration::from_secs(20);

/// Deadline of the bench's own CIB calls.
const LIMIT: Duration = Duration::from_secs(30);

fn status(lab: &Lab, n: u8) -> Result<vmha_api::json::Status> {
    let out = lab.exec_ok(n, &["vmha", "--output", "json", "status"])?;
    Ok(serde_json::from_str(&out)?)
}

/// Waits until every host's vmhad shows `hosts` hosts and `vms` VMs at the live CIB's version.
fn wait_seen(lab: &Lab, hosts: usize, vms: usize, limit: Duration) -> Result<f64> {
    let t0 = Instant::now();
    wait_for(
        &format!("every vmhad to show {hosts} hosts and {vms} VMs at the CIB's version"),
        limit,
        Duration::from_millis(500),
        || {
            let cib = cib_version(lab, 1).ok()?;
            lab.cfg
                .host_numbers()
                .all(|n| {
                    status(lab, n)
                        .is_ok_and(|s| s.hosts.len() == hosts && s.vms.len() >= vms && s.cluster.cib_version == cib)
                })
                .then_some(())
        },
    )?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Runs `vmha ARGS` (output discarded) `runs` times in host 1 by `vmha-bench measure`; wall ms each.
fn time_cli(lab: &Lab, label: &str, script: &str, runs: usize) -> Result<(Vec<f64>, Vec<i32>)> {
    let path = lab
        .cfg
        .shared_dir()
        .join(format!("bench-{}.sh", label.replace(' ', "-")));
    std::fs::write(&path, format!("exec {script} >/dev/null\n"))?;
    let p = path.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let side = Side::new(label, "/bin/sh", &[]);
    let s = crate::measure_in(lab, 1, &[], runs, p, std::slice::from_ref(&side))?;
    Ok((s.iter().map(|x| x.wall_ms).collect(), s.iter().map(|x| x.rc).collect()))
}

/// The unhealthy nodes in crm_mon's view (unclean or pending) and the fencing actions in the history.
fn fencing_facts(lab: &Lab) -> Result<(usize, usize, String)> {
    let mon = lab.exec_ok(1, &["crm_mon", "--one-shot", "--output-as=xml"])?;
    let unclean = mon.matches("unclean=\"true\"").count();
    let pending = mon.matches("pending=\"true\"").count();
    let hist = lab.exec(1, &["stonith_admin", "--history", "*"])?;
    let h = String::from_utf8_lossy(&hist.stdout).trim().to_string();
    Ok((unclean, pending, h))
}

#[allow(clippy::too_many_arguments)]
/// Every host's vmhad: (PID, RSS KiB, CPU ms).
fn usage_all(lab: &Lab) -> Result<Vec<(u32, f64, f64)>> {
    lab.cfg.host_numbers().map(|n| vmhad_usage(lab, n)).collect()
}

/// Every host's vmhad RSS in MiB, as a table cell ("94.2, 95.9, 94.2").
fn rss_cells(usage: &[(u32, f64, f64)]) -> String {
    usage
        .iter()
        .map(|x| format!("{:.1}", mib(x.1)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The largest vmhad RSS of the hosts, MiB.
fn largest_mib(usage: &[(u32, f64, f64)]) -> f64 {
    mib(usage.iter().map(|x| x.1).fold(0.0, f64::max))
}

/// Waits (at most `limit`) until host 1 reads the same CIB version twice `quiet` apart.
fn wait_quiet(lab: &Lab, quiet: Duration, limit: Duration) -> Result<()> {
    let mut last = String::new();
    wait_for(
        &format!("the CIB to be quiet for {} s", quiet.as_secs()),
        limit,
        quiet,
        || {
            let v = cib_version(lab, 1).ok()?;
            let same = v == last;
            last = v;
            same.then_some(())
        },
    )
}

/// What the bench can leave behind for finding where vmhad's time goes (no figure depends on them).
#[derive(Debug, Default)]
pub struct Diagnostics {
    /// vmhad's `RUST_LOG` in every host.
    pub vmhad_log: Option<String>,
    /// Where every host's daemon logs are copied before the lab goes down.
    pub logs: Option<PathBuf>,
    /// Leave the lab running.
    pub keep: bool,
}

pub fn run(
    hosts: u8,
    vms: usize,
    changes: usize,
    runs: usize,
    cfg: &LabConfig,
    out: Option<PathBuf>,
    diag: &Diagnostics,
) -> Result<()> {
    vmha_lab::init_logging();
    if hosts < 3 || changes == 0 || runs == 0 {
        bail!("--hosts must be at least 3, --changes and --runs at least 1");
    }
    let run = Run::start(&cfg.shared_dir());
    let lab = crate::lab_with_vmhad(cfg)?;
    if let Some(filter) = &diag.vmhad_log {
        for n in lab.cfg.host_numbers() {
            lab.stop_vmhad(n)?;
            lab.exec_ok(
                n,
                &[
                    "sh",
                    "-c",
                    r#"printf 'RUST_LOG=%s\n' "$1" >> /etc/default/vmhad"#,
                    "sh",
                    filter,
                ],
            )?;
            lab.start_vmhad(n)?;
        }
    }
    let result = measure(&lab, hosts, vms, changes, runs, run, out);
    if let Some(dir) = &diag.logs {
        match lab.collect_logs(dir) {
            Ok(d) => eprintln!("daemon logs in {}", d.display()),
            Err(e) => eprintln!("collecting the daemon logs: {e:#}"),
        }
    }
    if diag.keep {
        eprintln!("lab {} left running", lab.cfg.name);
        lab.release();
    } else {
        drop(lab);
    }
    result
}

fn measure(
    lab: &Lab,
    hosts: u8,
    vms: usize,
    changes: usize,
    runs: usize,
    run: Run,
    out: Option<PathBuf>,
) -> Result<()> {
    wait_seen(lab, 3, 0, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(5));
    let fresh: Vec<(u32, f64, f64)> = usage_all(lab)?;

    let t0 = Instant::now();
    grow(lab, hosts, vms)?;
    let grow_s = t0.elapsed().as_secs_f64();
    let seen_s = wait_seen(lab, hosts as usize, vms, Duration::from_secs(900))?;
    // Pacemaker probes every new resource on every online host; the CIB settles when the probes are done.
    let t1 = Instant::now();
    let settled = wait_quiet(lab, Duration::from_secs(10), Duration::from_secs(1800));
    let settle_s = t1.elapsed().as_secs_f64();
    settled?;
    wait_seen(lab, hosts as usize, vms, Duration::from_secs(120))?;
    let (unclean, pending, history) = fencing_facts(lab)?;
    let big: Vec<(u32, f64, f64)> = usage_all(lab)?;

    // Changes, timed inside host 1. Whether host 1 is the DC matters: the DC's vmhad has work of its
    // own (utilization, free capacity).
    let dc_of = |s: vmha_api::json::Status| s.cluster.designated_controller.unwrap_or_default();
    let dc_before = dc_of(status(lab, 1)?);
    let cpu_before: Vec<(u32, f64, f64)> = usage_all(lab)?;
    let me = std::env::current_exe()?;
    let me = me.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let pid = big[0].0.to_string();
    let (k, v) = (changes.to_string(), vms.to_string());
    let o = lab.exec_with_deadline(
        1,
        &[me, "cib-changes", "--pid", &pid, "--count", &k, "--vms", &v],
        Duration::from_secs(1800),
    )?;
    if !o.status.success() {
        bail!("cib-changes: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let ch: Changes = serde_json::from_slice(&o.stdout)?;
    let cpu_after: Vec<(u32, f64, f64)> = usage_all(lab)?;
    let dc_after = dc_of(status(lab, 1)?);

    // The CLI.
    let policy = lab.cfg.shared_dir().join("bench-policy.json");
    let mut pvms = serde_json::Map::new();
    for i in 0..vms.min(20) {
        pvms.insert(vm_name(i), serde_json::json!({"priority": 100 - i as i32, "zone": "a"}));
    }
    let doc = serde_json::json!({
        "placement_strategy": "balanced",
        "hosts": {
            lab.cfg.host_name(1): {"zone": "a/r1"},
            lab.cfg.host_name(2): {"zone": "a/r2"},
            lab.cfg.host_name(3): {"zone": "b/r1"},
        },
        "vms": pvms,
    });
    std::fs::write(&policy, doc.to_string())?;
    lab.exec_ok(1, &["vmha", "policy", "set", policy.to_str().unwrap_or("")])?;
    // The CLI timed against a cluster at rest: the DC's own scheduler, which every change above (the
    // policy's too) set running over the 2000 resources, done first, as an operator asking a question
    // between changes would find it.
    let t_idle = Instant::now();
    wait_for(
        "the DC to be idle",
        Duration::from_secs(900),
        Duration::from_millis(500),
        || vmha_e2e::dc_idle(lab, 1).then_some(()),
    )?;
    wait_quiet(lab, Duration::from_secs(5), Duration::from_secs(600))?;
    let idle_wait_s = t_idle.elapsed().as_secs_f64();
    let (st, st_rc) = time_cli(lab, "vmha status", "vmha status", runs)?;
    let (wi, wi_rc) = time_cli(lab, "vmha what-if --n-plus-one", "vmha what-if --n-plus-one", runs)?;
    let (pa, pa_rc) = time_cli(lab, "vmha policy apply --dry-run", "vmha policy apply --dry-run", runs)?;
    let after: Vec<(u32, f64, f64)> = usage_all(lab)?;
    // At rest: once the CIB has not changed for 15 s (vmhad gives freed memory back after 10 s of quiet).
    wait_quiet(lab, Duration::from_secs(15), Duration::from_secs(600))?;
    let rested: Vec<(u32, f64, f64)> = usage_all(lab)?;

    let mut r = String::new();
    let _ = writeln!(
        r,
        "Lab: 3 real hosts (Corosync, Pacemaker, libvirtd, vmhad on each); the CIB grown to **{hosts} hosts** \
         ({} extra `<node>` entries, never started) and **{vms} VMs** (`ocf:vmha:VirtualMachine` primitives \
         as `vmha vm add` writes them, target-role=Stopped so no QEMU runs, utilization cpu 1 and \
         hv_memory 128 MiB as their domain XML says, each naming its own domain XML file), added in {} bulk `cibadmin --modify` \
         calls in {grow_s:.1} s. Every vmhad showed them all at the CIB's version {seen_s:.1} s after that; \
         the CIB was then quiet ({settle_s:.0} s more, 10 s of it the check). **No probes**: a location \
         constraint per online host (`rsc-pattern=\"^sv[0-9]+$\"`, `resource-discovery=never`) keeps \
         Pacemaker from probing the new resources, so the status section holds no operation history for \
         them; a real cluster's CIB would also hold a probe result per VM and host (3 x {vms} \
         `lrm_resource` entries here), and while those probes run every one of them is a CIB change every \
         vmhad handles.\n\n\
         **The offline hosts and fencing.** A configured node the cluster has never seen is *unclean* to \
         Pacemaker while `startup-fencing` is true (the default): it would fence each of them, and the lab's \
         fence device cannot reach them, so every transition would retry failing fencing actions. A real \
         32-host cluster whose other hosts are down has seen them leave; the bench records that in the status \
         section (a `node_state` per extra node: in_ccm=false, crmd=offline, join=down, expected=down), with \
         fencing left on. Afterwards crm_mon showed {unclean} unclean and {pending} pending nodes; fencing \
         history: `{}`.\n",
        hosts.saturating_sub(3),
        vms.div_ceil(500) + usize::from(hosts > 3) * 2 + 1,
        if history.is_empty() {
            "(none)".into()
        } else {
            history.replace('\n', " / ")
        },
    );
    let _ = writeln!(
        r,
        "How measured: latency by the bench's monotonic clock inside host 1, from starting `cibadmin --modify` \
         (a meta attribute on a different VM each time) to the PropertiesChanged signal of host 1's vmhad's \
         `CibVersion` with the newer epoch; *after commit* counts from cibadmin's exit (the CIB had the \
         change); the *notification* is the CIB manager's change notification as the bench itself, \
         subscribed as a CIB client the way vmhad is, received it (its own clock, not vmhad's). vmhad's CPU: utime + stime of /proc/<pid>/stat around all {changes} changes, less its CPU \
         at its idle rate (measured over {:.0} s of quiet right before the changes) over as long, divided by \
         {changes} (clock ticks of 10 ms: only the mean means anything), and the same divided by every CIB update the bench's \
         own subscription was notified of in that window (vmhad handles each one, whoever wrote it). RSS: VmRSS of /proc/<pid>/status. CLI: `vmha-bench measure` around the process in host 1 \
         ({runs} runs each, output discarded). No figure comes from vmhad itself.\n\n\
         The DC (Pacemaker's designated controller, as host 1's vmhad showed it) before the changes: **{}**, \
         after them: **{}**; the measured host is {}. Every host's vmhad's CPU over the quiet span and the \
         changes together (utime + stime from outside the hosts, ms; hosts 1, 2, 3): {}.\n",
        ch.idle_ms / 1000.0,
        if dc_before.is_empty() { "none" } else { &dc_before },
        if dc_after.is_empty() { "none" } else { &dc_after },
        lab.cfg.host_name(1),
        cpu_before
            .iter()
            .zip(&cpu_after)
            .map(|(b, a)| if a.0 == b.0 {
                format!("{:.0}", a.2 - b.2)
            } else {
                "(restarted)".into()
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    let idle_rate = if ch.idle_ms > 0.0 {
        ch.idle_cpu_ms / ch.idle_ms
    } else {
        0.0
    };
    // vmhad's CPU over the changes' window less its idle rate over as long.
    let net_ms = ch.cpu_ms - idle_rate * ch.span_ms;
    let per_change = net_ms / changes as f64;
    let lat = median(&ch.from_notify_ms);
    let wi_med = median(&wi);
    let _ = writeln!(r, "| figure | value | goal |\n|---|---|---|");
    let _ = writeln!(
        r,
        "| CIB change handled by vmhad: the CIB manager's notification to vmhad's publication, ms | {} | <= 10 ms: {} |",
        cell(&ch.from_notify_ms, 1, ""),
        verdict_of_net(lat, 10.0)
    );
    let _ = writeln!(
        r,
        "| Pacemaker's share: cibadmin start to the CIB manager's notification, ms | {} | |",
        cell(&ch.to_notify_ms, 1, "")
    );
    let _ = writeln!(
        r,
        "| end to end: cibadmin start to vmhad's publication, ms | {} | |",
        cell(&ch.from_call_ms, 1, "")
    );
    let _ = writeln!(
        r,
        "| same, from cibadmin's exit, ms | {} | |",
        cell(&ch.from_commit_ms, 1, "")
    );
    let _ = writeln!(
        r,
        "| vmhad CPU per change (net of idle), ms | {per_change:.1} ({:.0} ms over {changes} changes in {:.1} s, {:.1} ms per change gross; idle {:.0} ms over {:.0} s before) | <= 10 ms: {} |",
        ch.cpu_ms,
        ch.span_ms / 1000.0,
        ch.cpu_ms / changes as f64,
        ch.idle_cpu_ms,
        ch.idle_ms / 1000.0,
        verdict_of_net(per_change, 10.0)
    );
    // vmhad handles every update written in the window, the bench's or not: the same CPU over all of them.
    if ch.updates > 0 {
        let per_update = net_ms / ch.updates as f64;
        let _ = writeln!(
            r,
            "| vmhad CPU per CIB update in that window (net of idle), ms | {per_update:.1} ({} updates notified to the bench's own CIB subscription in the {:.1} s, {changes} of them the bench's changes) | <= 10 ms: {} |",
            ch.updates,
            ch.span_ms / 1000.0,
            verdict_of_net(per_update, 10.0)
        );
    }
    let _ = writeln!(
        r,
        "| vmhad RSS at {hosts} hosts / {vms} VMs, MiB (hosts 1, 2, 3) | {} | <= 64 MiB: {} |",
        rss_cells(&big),
        verdict(largest_mib(&big) <= 64.0)
    );
    let _ = writeln!(
        r,
        "| vmhad RSS after the changes and the CLI runs, MiB (hosts 1, 2, 3) | {} | |",
        rss_cells(&after)
    );
    let _ = writeln!(
        r,
        "| vmhad RSS at rest afterwards (the CIB unchanged for 15 s), MiB (hosts 1, 2, 3) | {} | <= 64 MiB: {} |",
        rss_cells(&rested),
        verdict(largest_mib(&rested) <= 64.0)
    );
    let _ = writeln!(
        r,
        "| vmhad RSS freshly started, 3 hosts and no VM, MiB (hosts 1, 2, 3) | {} | |",
        rss_cells(&fresh)
    );
    let _ = writeln!(
        r,
        "| waited for the DC's controller to be idle (S_IDLE) and the CIB quiet for 5 s before the CLI runs below, s | {idle_wait_s:.1} | |"
    );
    let _ = writeln!(
        r,
        "| `vmha status`, ms | {} (exit codes {:?}) | |",
        cell(&st, 0, ""),
        codes(&st_rc)
    );
    let _ = writeln!(
        r,
        "| `vmha what-if --n-plus-one`, ms | {} (exit codes {:?}) | <= 2 s: {} |",
        cell(&wi, 0, ""),
        codes(&wi_rc),
        verdict(wi_med <= 2000.0 && wi_rc.iter().all(|&c| c == 0))
    );
    let _ = writeln!(
        r,
        "| `vmha policy apply --dry-run` ({} VMs in the policy), ms | {} (exit codes {:?}) | |",
        vms.min(20),
        cell(&pa, 0, ""),
        codes(&pa_rc)
    );
    let _ =
        writeln!(
        r,
        "\nvmhad's CPU over the whole run (utime + stime, ms; hosts 1, 2, 3): {} freshly started, {} at full size, \
         {} at the end.\n\nNotes: what-if with --n-plus-one fails each of the 3 online hosts in turn and runs \
         Pacemaker's scheduler on a copy of the whole CIB each time (the {} offline hosts are not failed again); \
         the VMs are stopped, so the scheduler places none of them, but it reads and unpacks every resource, \
         node and status entry.",
        fresh.iter().map(|x| format!("{:.0}", x.2)).collect::<Vec<_>>().join(", "),
        big.iter().map(|x| format!("{:.0}", x.2)).collect::<Vec<_>>().join(", "),
        after.iter().map(|x| format!("{:.0}", x.2)).collect::<Vec<_>>().join(", "),
        hosts.saturating_sub(3),
    );
    let report = run.finish(
        &format!("Scale: vmhad and the CLI with {hosts} hosts and {vms} VMs in the CIB"),
        &r,
    );
    crate::report::emit(&report, out.as_deref())
}

fn codes(rc: &[i32]) -> Vec<i32> {
    let mut v = rc.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// The verdict on a figure that is a difference of two measurements (a median of differences, or a gross
/// figure net of idle): a negative value says the noise is larger than the figure, so it is not measured,
/// not met.
fn verdict_of_net(value: f64, goal: f64) -> &'static str {
    if value < 0.0 {
        "**not measured** (below zero: the noise is larger than the figure)"
    } else {
        verdict(value <= goal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_net_figure_is_not_measured() {
        assert!(verdict_of_net(-0.1, 10.0).contains("not measured"));
        assert_eq!(verdict_of_net(3.7, 10.0), "met");
        assert_eq!(verdict_of_net(13.9, 10.0), "**missed**");
    }

    #[test]
    fn versions_compare_by_number() {
        assert_eq!(version("0.12.3"), Some((0, 12, 3)));
        assert!(version("0.12.3") < version("0.13.0"));
        assert!(version("0.9.100") < version("0.10.0"));
        assert_eq!(version(""), None);
        assert_eq!(version("1.2"), None);
        assert_eq!(vm_name(7), "sv0007");
    }
}
