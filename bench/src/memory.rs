//! `vmha-bench memory`: vmhad's memory idle and after a soak of jobs. A 3-host lab with vmhad on each and
//! one small VM (128 MiB, TCG, no disk, vmha-guest). vmhad's RSS (VmRSS of /proc/<pid>/status, read by the
//! bench in each host's /proc) freshly started and idle, then after `jobs` jobs of each kind, batch by
//! batch: `vmha vm stop` + `vmha vm start` (one of each per job pair), `vmha vm move` (a live migration),
//! `vmha vm request VM test-ok` (a guest request through the guest channel); then after a settle period.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{wait_for, Lab, LabConfig};

use crate::report::{cell, verdict, Run};
use crate::scale::{vmhad_rss_split, vmhad_usage};

const VM: &str = "soak1";
const GOAL_MIB: f64 = 24.0;

fn vmha(lab: &Lab, n: u8, args: &[&str]) -> Result<()> {
    let mut all = vec!["vmha", "--timeout", "120"];
    all.extend_from_slice(args);
    let out = lab.exec_with_deadline(n, &all, Duration::from_secs(150))?;
    if !out.status.success() {
        bail!(
            "vmha {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The VM's state and hosts as host 1's vmhad (where the jobs are asked) sees them.
fn vm_state(lab: &Lab) -> Option<(String, Vec<String>)> {
    let out = lab.exec_ok(1, &["vmha", "--output", "json", "vm", "show", VM]).ok()?;
    let shown: vmha_api::json::VmShow = serde_json::from_str(&out).ok()?;
    Some((shown.vm.state, shown.vm.hosts))
}

/// The host the VM runs on, once vmhad sees it running there (not while its start or migration is still
/// pending: vmhad refuses to move a VM that is starting).
fn host_of(lab: &Lab) -> Option<u8> {
    let (state, hosts) = vm_state(lab)?;
    match hosts.as_slice() {
        [host] if state == "running" => lab.cfg.host_number(host),
        _ => None,
    }
}

fn stopped(lab: &Lab) -> bool {
    vm_state(lab).is_some_and(|(state, _)| state == "stopped")
}

fn wait_running(lab: &Lab) -> Result<u8> {
    wait_for(
        &format!("{VM} running"),
        Duration::from_secs(120),
        Duration::from_millis(200),
        || host_of(lab),
    )
}

/// One row: a label and every host's (pid, RSS KiB, CPU ms).
struct Point {
    label: String,
    usage: Vec<(u32, f64, f64)>,
    /// Per host: (anonymous, file-backed + shared) RSS, KiB.
    split: Vec<(f64, f64)>,
    job_ms: Vec<f64>,
}

fn usage(lab: &Lab) -> Result<Vec<(u32, f64, f64)>> {
    lab.cfg.host_numbers().map(|n| vmhad_usage(lab, n)).collect()
}

fn split(lab: &Lab) -> Result<Vec<(f64, f64)>> {
    lab.cfg.host_numbers().map(|n| vmhad_rss_split(lab, n)).collect()
}

pub fn run(jobs: usize, settle: Duration, cfg: &LabConfig, out: Option<PathBuf>) -> Result<()> {
    vmha_lab::init_logging();
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let run = Run::start(&cfg.shared_dir());
    let lab = crate::lab_with_vmhad(cfg)?;
    // Fresh and idle: every vmhad has read the cluster, then 10 s without anything happening.
    wait_for(
        "every vmhad to have read the cluster",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            lab.cfg
                .host_numbers()
                .all(|n| {
                    lab.exec_ok(n, &["vmha", "--output", "json", "status"])
                        .ok()
                        .and_then(|o| serde_json::from_str::<vmha_api::json::Status>(&o).ok())
                        .is_some_and(|s| !s.connecting)
                })
                .then_some(())
        },
    )?;
    std::thread::sleep(Duration::from_secs(10));
    let mut points = vec![Point {
        label: "fresh, idle (3 hosts, no VM)".into(),
        usage: usage(&lab)?,
        split: split(&lab)?,
        job_ms: vec![],
    }];

    lab.add_vm(&GuestSpec::new(VM), VmAgent::Vmha)?;
    let a = wait_running(&lab)?;
    wait_for(
        &format!("{VM}'s guest channel"),
        Duration::from_secs(120),
        Duration::from_millis(300),
        || vmha(&lab, a, &["vm", "request", VM, "test-ok", "--timeout-ms", "5000"]).ok(),
    )?;
    points.push(Point {
        label: format!("{VM} added and running"),
        usage: usage(&lab)?,
        split: split(&lab)?,
        job_ms: vec![],
    });

    // stop + start pairs.
    let mut ms = Vec::new();
    for _ in 0..jobs {
        let t = Instant::now();
        vmha(&lab, 1, &["vm", "stop", VM])?;
        wait_for(
            &format!("{VM} stopped"),
            Duration::from_secs(60),
            Duration::from_millis(200),
            || stopped(&lab).then_some(()),
        )?;
        vmha(&lab, 1, &["vm", "start", VM])?;
        wait_running(&lab)?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    points.push(Point {
        label: format!("after {jobs} stop + {jobs} start jobs"),
        usage: usage(&lab)?,
        split: split(&lab)?,
        job_ms: ms,
    });

    // Live migrations.
    let mut ms = Vec::new();
    for _ in 0..jobs {
        let from = wait_running(&lab)?;
        let to = lab.other_host(from).ok_or_else(|| anyhow!("no other host"))?;
        let t = Instant::now();
        vmha(&lab, 1, &["vm", "move", VM, &lab.cfg.host_name(to)])?;
        wait_for(
            &format!("{VM} on host {to}"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            || (host_of(&lab) == Some(to)).then_some(()),
        )?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    points.push(Point {
        label: format!("after {jobs} move jobs (live migrations)"),
        usage: usage(&lab)?,
        split: split(&lab)?,
        job_ms: ms,
    });

    // Guest requests, asked on every host in turn.
    let mut ms = Vec::new();
    let hosts: Vec<u8> = lab.cfg.host_numbers().collect();
    for i in 0..jobs {
        let n = hosts[i % hosts.len()];
        let t = Instant::now();
        vmha(&lab, n, &["vm", "request", VM, "test-ok", "--timeout-ms", "5000"])?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    points.push(Point {
        label: format!("after {jobs} guest requests"),
        usage: usage(&lab)?,
        split: split(&lab)?,
        job_ms: ms,
    });
    std::thread::sleep(settle);
    points.push(Point {
        label: format!("after {} s settling", settle.as_secs()),
        usage: usage(&lab)?,
        split: split(&lab)?,
        job_ms: vec![],
    });

    let mut r = String::new();
    let _ = writeln!(
        r,
        "Lab: 3 hosts (Corosync, Pacemaker, libvirtd, vmhad on each), one VM **{VM}** (128 MiB, TCG, no disk, \
         vmha-guest). Jobs through the CLI on the product's path: `vmha vm stop` + `vmha vm start` (asked on \
         host 1), `vmha vm move` to another host (a live migration, asked on host 1), `vmha vm request {VM} \
         test-ok` (through the guest channel, asked on each host in turn); {jobs} of each kind. Not in the \
         soak: archive (vcluster capture/instantiate) and clone jobs.\n\n\
         RSS: VmRSS of each host's vmhad, read by the bench from /proc/<pid>/status in that host (never a \
         figure vmhad reports), split into RssAnon (vmhad's own heap and stacks) and RssFile + RssShmem (the \
         resident pages of its binary and shared libraries — libvirt, libcib, glib, libxml2, gnutls — and \
         of Corosync's shared-memory IPC: counted in every process that maps them); CPU: utime + stime of /proc/<pid>/stat (cumulative). The PID is printed so \
         a restarted vmhad would show.\n"
    );
    let _ = writeln!(
        r,
        "| point | vmhad RSS MiB (hosts 1, 2, 3) | of which anonymous / file-backed and shared, MiB | vmhad CPU ms, cumulative (hosts 1, 2, 3) | PIDs | wall per job ms |\n|---|---|---|---|---|---|"
    );
    for p in &points {
        let f = |g: fn(&(u32, f64, f64)) -> String| p.usage.iter().map(g).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} | {} |",
            p.label,
            f(|x| format!("{:.1}", x.1 / 1024.0)),
            p.split
                .iter()
                .map(|(a, f)| format!("{:.1} / {:.1}", a / 1024.0, f / 1024.0))
                .collect::<Vec<_>>()
                .join(", "),
            f(|x| format!("{:.0}", x.2)),
            f(|x| x.0.to_string()),
            if p.job_ms.is_empty() {
                String::new()
            } else {
                cell(&p.job_ms, 0, "")
            }
        );
    }
    let max = |p: &Point| p.usage.iter().map(|x| x.1 / 1024.0).fold(0.0, f64::max);
    let fresh = max(&points[0]);
    let end = max(points.last().unwrap_or(&points[0]));
    let _ = writeln!(
        r,
        "\n| goal (issue 17) | largest of the 3 hosts | verdict |\n|---|---|---|\n\
         | vmhad at most {GOAL_MIB} MiB RSS idle (fresh) | {fresh:.1} MiB | {} |\n\
         | back under {GOAL_MIB} MiB after the soak and settling | {end:.1} MiB | {} |",
        verdict(fresh <= GOAL_MIB),
        verdict(end <= GOAL_MIB)
    );
    let report = run.finish("vmhad memory: idle and after a soak of jobs", &r);
    drop(lab);
    crate::report::emit(&report, out.as_deref())
}
