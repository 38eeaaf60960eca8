//! `vmha-bench memory`: vmhad's memory idle and after a soak of jobs. A 3-host lab with vmhad on each and
//! one small VM (128 MiB, TCG, no disk, vmha-guest). vmhad's RSS (VmRSS of /proc/<pid>/status, read by the
//! bench in each host's /proc) freshly started and idle, then after `jobs` jobs of each kind, batch by
//! batch: `vmha vm stop` + `vmha vm start` (one of each per job pair), `vmha vm move` (a live migration),
//! `vmha vm request VM test-ok` (a guest request through the guest channel), `vmha vcluster capture`
//! and `vmha vcluster instantiate` (archive jobs in vmhad; the instantiate is refused after its plan, the
//! VM existing here); then after a settle period.

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

/// The VM's state and hosts as host N's vmhad sees them (host 1 is where the jobs are asked).
fn vm_state(lab: &Lab, n: u8) -> Option<(String, Vec<String>)> {
    let out = lab.exec_ok(n, &["vmha", "--output", "json", "vm", "show", VM]).ok()?;
    let shown: vmha_api::json::VmShow = serde_json::from_str(&out).ok()?;
    Some((shown.vm.state, shown.vm.hosts))
}

/// The host the VM runs on, once every host's vmhad sees it running there (not while its start or
/// migration is still pending anywhere: the DC's vmhad, which runs a move, refuses one of a VM it still
/// sees starting).
fn host_of(lab: &Lab) -> Option<u8> {
    let mut seen = None;
    for n in lab.cfg.host_numbers() {
        let (state, hosts) = vm_state(lab, n)?;
        let here = match hosts.as_slice() {
            [host] if state == "running" => lab.cfg.host_number(host)?,
            _ => return None,
        };
        if seen.is_some_and(|s| s != here) {
            return None;
        }
        seen = Some(here);
    }
    seen
}

fn stopped(lab: &Lab) -> bool {
    vm_state(lab, 1).is_some_and(|(state, _)| state == "stopped")
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
    /// Per host: where the RSS is, from /proc/<pid>/smaps.
    parts: Vec<Parts>,
    job_ms: Vec<f64>,
}

/// One vmhad's resident memory by mapping (KiB), summed from /proc/<pid>/smaps.
#[derive(Debug, Default, Clone, Copy)]
struct Parts {
    /// The vmhad binary's own mappings (text, read-only data, relocated data).
    binary: f64,
    /// Shared libraries (`*.so*`), the dynamic loader included.
    libraries: f64,
    /// libqb's shared-memory IPC rings with Corosync and Pacemaker (/dev/shm/qb-*).
    rings: f64,
    /// Anonymous mappings: heap, malloc arenas, thread stacks.
    anonymous: f64,
    /// Everything else (vdso, other files).
    other: f64,
    /// Proportional set size (shared pages divided among the processes mapping them).
    pss: f64,
}

/// Sorts smaps' per-mapping Rss into `Parts`. `smaps` is the text of /proc/<pid>/smaps.
fn parse_smaps(smaps: &str) -> Parts {
    let mut parts = Parts::default();
    let mut name = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !first.ends_with(':') && first.contains('-') {
            // A mapping's header: address perms offset dev inode [path].
            name = words.nth(4).unwrap_or("").to_string();
            continue;
        }
        let kib = || words.clone().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        match first {
            "Pss:" => parts.pss += kib(),
            "Rss:" => {
                let v = kib();
                let file = name.rsplit('/').next().unwrap_or("");
                if name.ends_with("/vmhad") {
                    parts.binary += v;
                } else if file.contains(".so") {
                    parts.libraries += v;
                } else if name.starts_with("/dev/shm/qb-") {
                    parts.rings += v;
                } else if name.is_empty()
                    || name.starts_with("[heap]")
                    || name.starts_with("[stack")
                    || name.starts_with("[anon")
                {
                    parts.anonymous += v;
                } else {
                    parts.other += v;
                }
            }
            _ => {}
        }
    }
    parts
}

fn parts(lab: &Lab) -> Result<Vec<Parts>> {
    lab.cfg
        .host_numbers()
        .map(|n| {
            let pid = lab.vmhad_pid(n)?.ok_or_else(|| anyhow!("no vmhad runs on host {n}"))?;
            let smaps = lab.exec_ok(n, &["cat", &format!("/proc/{pid}/smaps")])?;
            Ok(parse_smaps(&smaps))
        })
        .collect()
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
    crate::wait_vmhad_ready(&lab)?;
    std::thread::sleep(Duration::from_secs(10));
    let mut points = vec![Point {
        label: "fresh, idle (3 hosts, no VM)".into(),
        usage: usage(&lab)?,
        split: split(&lab)?,
        parts: parts(&lab)?,
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
        parts: parts(&lab)?,
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
        parts: parts(&lab)?,
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
        parts: parts(&lab)?,
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
        parts: parts(&lab)?,
        job_ms: ms,
    });
    // Archive jobs through vmhad's D-Bus jobs: a live capture of the virtual cluster `soak` (soak1, no
    // disk), then an instantiate of that archive on the same cluster, which vmhad verifies and plans and
    // then refuses (soak1's ids are in use here, no storage is mapped): the archive is read, checked and translated,
    // nothing is created.
    let archives = lab.cfg.dir().join("archives");
    std::fs::create_dir_all(&archives)?;
    let archive = archives.join("soak.vca");
    let archive_s = archive.to_str().ok_or_else(|| anyhow!("archive path is not UTF-8"))?;
    vmha(&lab, 1, &["vcluster", "create", "soak", VM])?;
    let mut ms = Vec::new();
    for _ in 0..jobs {
        let _ = std::fs::remove_file(&archive);
        let t = Instant::now();
        vmha(&lab, 1, &["vcluster", "capture", "soak", "--out", archive_s])?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    points.push(Point {
        label: format!("after {jobs} capture jobs"),
        usage: usage(&lab)?,
        split: split(&lab)?,
        parts: parts(&lab)?,
        job_ms: ms,
    });
    let mut ms = Vec::new();
    for i in 0..jobs {
        let n = hosts[i % hosts.len()];
        let t = Instant::now();
        let out = lab.exec_with_deadline(
            n,
            &[
                "vmha",
                "--timeout",
                "120",
                "vcluster",
                "instantiate",
                archive_s,
                "--wait",
                "0",
            ],
            Duration::from_secs(150),
        )?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("the archive was rejected") {
            bail!(
                "vmha vcluster instantiate of {VM}'s archive on the cluster that has {VM}: expected a \
                 refusal (the archive was rejected), got {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                err.trim()
            );
        }
    }
    points.push(Point {
        label: format!("after {jobs} instantiate jobs (verified, planned, refused)"),
        usage: usage(&lab)?,
        split: split(&lab)?,
        parts: parts(&lab)?,
        job_ms: ms,
    });

    std::thread::sleep(settle);
    points.push(Point {
        label: format!("after {} s settling", settle.as_secs()),
        usage: usage(&lab)?,
        split: split(&lab)?,
        parts: parts(&lab)?,
        job_ms: vec![],
    });

    let mut r = String::new();
    let _ = writeln!(
        r,
        "Lab: 3 hosts (Corosync, Pacemaker, libvirtd, vmhad on each), one VM **{VM}** (128 MiB, TCG, no disk, \
         vmha-guest). Jobs through the CLI on the product's path: `vmha vm stop` + `vmha vm start` (asked on \
         host 1), `vmha vm move` to another host (a live migration, asked on host 1), `vmha vm request {VM} \
         test-ok` (through the guest channel, asked on each host in turn), archive jobs through vmhad's D-Bus \
         jobs: `vmha vcluster capture soak` (a live capture of the virtual cluster `soak` = {VM}, no disk, \
         asked on host 1) and `vmha vcluster instantiate` of that archive (asked on each host in turn: vmhad \
         reads, verifies and plans it, then refuses it: {VM}'s ids are in use on this cluster); {jobs} of each \
         kind. Not in the soak: clone jobs.\n\n\
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
    let _ = writeln!(
        r,
        "\nWhere each host's vmhad RSS is, MiB (hosts 1, 2, 3), summed per mapping from /proc/<pid>/smaps: the \
         vmhad binary's own mappings, shared libraries, libqb's shared-memory IPC rings with Corosync and \
         Pacemaker (/dev/shm/qb-*), anonymous memory (heap, malloc arenas, thread stacks), the rest; and PSS \
         (each shared page divided among the processes that map it: what vmhad costs the host; for \
         information, the goal is RSS).\n\n\
         | point | binary | libraries | IPC rings | anonymous | other | PSS |\n|---|---|---|---|---|---|---|"
    );
    for p in &points {
        let col = |g: fn(&Parts) -> f64| {
            p.parts
                .iter()
                .map(|x| format!("{:.1}", g(x) / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} | {} | {} |",
            p.label,
            col(|x| x.binary),
            col(|x| x.libraries),
            col(|x| x.rings),
            col(|x| x.anonymous),
            col(|x| x.other),
            col(|x| x.pss)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_is_sorted_by_mapping() {
        let smaps = "\
55d0c0000000-55d0c0800000 r-xp 00001000 fd:00 123 /usr/sbin/vmhad
Rss:                1000 kB
Pss:                1000 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:00 124 /usr/lib/x86_64-linux-gnu/libvirt.so.0.9000.0
Rss:                 400 kB
Pss:                 100 kB
7f0000200000-7f0000300000 rw-s 00000000 00:19 125 /dev/shm/qb-30-224-40-e0GhMd/qb-event-cpg-data
Rss:                  64 kB
Pss:                  32 kB
7f0000400000-7f0000500000 rw-p 00000000 00:00 0 
Rss:                  20 kB
Pss:                  20 kB
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0 [heap]
Rss:                  30 kB
Pss:                  30 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Pss:                   0 kB
";
        let p = parse_smaps(smaps);
        assert_eq!(p.binary, 1000.0);
        assert_eq!(p.libraries, 400.0);
        assert_eq!(p.rings, 64.0);
        assert_eq!(p.anonymous, 50.0);
        assert_eq!(p.other, 8.0);
        assert_eq!(p.pss, 1182.0);
    }
}
