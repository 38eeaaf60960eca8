//! `vmha-bench clone`: live clone on the lab. A 3-host lab with vmhad and two running 128 MiB TCG
//! templates with vmha-guest (hooks answer at once): one with a qcow2 disk (an overlay on a shared base)
//! and a NIC, one with neither. `vmha clone` of one clone and of `--count 8` of each, alternating between
//! the templates, `rounds` times.
//!
//! The template's stall is measured twice for every clone: libvirt's own downtime figure (the job's final
//! message carries `timings {json}` with `stall_ms`), and by an independent clock from the guest's point of
//! view: a process on the template's host sends `guest-ping` to the template's guest agent over one open
//! libvirt connection about every millisecond, and the longest gap between two answers that spans the
//! clone is the time the guest could not answer.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::process::ProcId;
use vmha_lab::{wait_for, Lab, LabConfig};

use crate::report::{cell, median, verdict, Run};

/// The templates: name, description.
const TEMPLATES: [(&str, &str); 2] = [("btpl", "qcow2 disk + NIC"), ("btpd", "no disk, no NIC")];

#[derive(Debug, Default, Clone, serde::Deserialize)]
struct Timings {
    prepare_ms: f64,
    capture_ms: f64,
    stall_ms: Option<f64>,
    create_ms: f64,
    resume_ms: f64,
    register_ms: f64,
    post_clone_ms: f64,
    total_ms: f64,
}

/// CLOCK_MONOTONIC in ns (the same clock in every lab host: the lab has no time namespaces).
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// What the ping loop prints when it ends.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Pings {
    /// CLOCK_MONOTONIC (ns) of every answer, in order.
    answers: Vec<u64>,
    /// Calls that failed (e.g. libvirt refusing while the domain is paused).
    errors: u64,
}

/// `vmha-bench ping-loop`: runs inside the template's host. Prints "ready" once the guest agent answered,
/// then pings until stdin closes and prints [`Pings`] as JSON.
pub fn ping_loop(domain: &str) -> Result<()> {
    let conn = virt::connect::Connect::open(Some("qemu:///system")).map_err(|e| anyhow!("qemu:///system: {e}"))?;
    let dom = conn
        .lookup_domain_by_name(domain)
        .map_err(|e| anyhow!("domain {domain}: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        s.store(true, Ordering::SeqCst);
    });
    const PING: &str = r#"{"execute":"guest-ping"}"#;
    let t0 = Instant::now();
    while dom.qemu_agent_command(PING, 5, 0).is_err() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the guest agent of {domain} did not answer within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut p = Pings {
        answers: Vec::with_capacity(100_000),
        errors: 0,
    };
    while !stop.load(Ordering::SeqCst) {
        match dom.qemu_agent_command(PING, 5, 0) {
            Ok(_) => p.answers.push(mono_ns()),
            Err(_) => p.errors += 1,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("{}", serde_json::to_string(&p)?);
    Ok(())
}

/// The ping loop, running in host `n` for domain `vm`.
struct PingLoop {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl PingLoop {
    fn start(lab: &Lab, n: u8, vm: &str) -> Result<PingLoop> {
        let init = ProcId::load(&lab.cfg.host_dir(n).join("pid"))?
            .filter(ProcId::alive)
            .ok_or_else(|| anyhow!("host {n} is not running"))?;
        let me = std::env::current_exe()?;
        let mut child = Command::new("nsenter")
            .args(["-t", &init.pid.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
            .arg(&me)
            .args(["ping-loop", "--domain", vm])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // libvirt prints every refused ping ("domain is not running" while it is paused).
            .stderr(Stdio::null())
            .spawn()
            .context("starting the ping loop")?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.wait();
            bail!("the ping loop for {vm} did not start");
        }
        Ok(PingLoop { child, stdout })
    }

    fn finish(mut self) -> Result<Pings> {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the ping loop failed: {status}");
        }
        Ok(serde_json::from_str(line.trim())?)
    }
}

/// What the answers show about one clone.
#[derive(Debug, Default, PartialEq)]
struct Gaps {
    /// The longest gap (ms) between answers that overlaps [from, to].
    during: Option<f64>,
    /// When that gap began, ms after `from` (negative: before).
    at: Option<f64>,
    /// The longest gap wholly before `from`: the loop's own noise while nothing happens.
    idle: Option<f64>,
}

fn gaps(p: &Pings, from: u64, to: u64) -> Gaps {
    let mut g = Gaps::default();
    for w in p.answers.windows(2) {
        let gap = (w[1] - w[0]) as f64 / 1e6;
        if w[1] >= from && w[0] <= to {
            if g.during.is_none_or(|d| gap > d) {
                g.during = Some(gap);
                g.at = Some((w[0] as f64 - from as f64) / 1e6);
            }
        } else if w[1] < from {
            g.idle = Some(g.idle.map_or(gap, |d| d.max(gap)));
        }
    }
    g
}

fn vmha(lab: &Lab, n: u8, args: &[&str]) -> Result<String> {
    let mut all = vec!["vmha", "--timeout", "300", "--output", "json"];
    all.extend_from_slice(args);
    let out = lab.exec(n, &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("vmha {args:?}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

fn timings(message: &str) -> Result<Timings> {
    let json = message
        .split_once("timings ")
        .map(|(_, t)| t)
        .ok_or_else(|| anyhow!("no timings in {message:?}"))?;
    Ok(serde_json::from_str(json)?)
}

/// One clone (or --count N) of one template.
struct Sample {
    template: &'static str,
    count: u32,
    t: Timings,
    cli_ms: f64,
    ping_gap_ms: Option<f64>,
    ping_gap_at_ms: Option<f64>,
    idle_gap_ms: Option<f64>,
    pings: usize,
    ping_errors: u64,
}

pub fn run(rounds: usize, quick: bool, cfg: &LabConfig, out: Option<PathBuf>) -> Result<()> {
    vmha_lab::init_logging();
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let run = Run::start(&cfg.shared_dir());
    let lab = crate::lab_with_vmhad(cfg)?;
    let shared = lab.cfg.shared_dir();
    let base = shared.join("base.qcow2");
    let disk = shared.join(format!("{}.vda.qcow2", TEMPLATES[0].0));
    vmha_lab::guest::disk_on_base(&base, &disk, "64M")?;
    lab.add_vm(
        &GuestSpec::new(TEMPLATES[0].0).with_disk_and_nic(&disk, "52:54:00:be:00:01"),
        VmAgent::Vmha,
    )?;
    lab.add_vm(&GuestSpec::new(TEMPLATES[1].0), VmAgent::Vmha)?;
    let host_of = |vm: &str| -> Option<u8> {
        let s = lab.status_from_any().ok()?;
        lab.cfg.host_number(s.running_on(vm)?)
    };
    for (tpl, _) in TEMPLATES {
        let a = wait_for(
            &format!("template {tpl} running"),
            Duration::from_secs(120),
            Duration::from_millis(200),
            || host_of(tpl),
        )?;
        wait_for(
            &format!("template {tpl}'s guest channel"),
            Duration::from_secs(120),
            Duration::from_millis(200),
            || vmha(&lab, a, &["vm", "request", tpl, "test-ok", "--timeout-ms", "5000"]).ok(),
        )?;
    }
    let counts: &[u32] = if quick { &[1] } else { &[1, 8] };
    let mut samples: Vec<Sample> = Vec::new();
    for round in 0..rounds {
        for &count in counts {
            for (ti, (tpl, _)) in TEMPLATES.iter().enumerate() {
                let a = host_of(tpl).ok_or_else(|| anyhow!("template {tpl} is not running"))?;
                let target = lab.other_host(a).context("no other host")?;
                let name = format!("k{ti}n{count}r{round}");
                let c = count.to_string();
                let pinger = PingLoop::start(&lab, a, tpl)?;
                std::thread::sleep(Duration::from_millis(500));
                let (t0, i0) = (mono_ns(), Instant::now());
                let result = vmha(
                    &lab,
                    a,
                    &[
                        "clone",
                        tpl,
                        "--name",
                        &name,
                        "--host",
                        &lab.cfg.host_name(target),
                        "--count",
                        &c,
                    ],
                );
                let (t1, cli_ms) = (mono_ns(), i0.elapsed().as_secs_f64() * 1000.0);
                std::thread::sleep(Duration::from_millis(300));
                let pings = pinger.finish()?;
                let out = result?;
                let v: serde_json::Value = serde_json::from_str(out.trim())?;
                let t = timings(v["message"].as_str().unwrap_or(""))?;
                let g = gaps(&pings, t0, t1);
                samples.push(Sample {
                    template: tpl,
                    count,
                    t,
                    cli_ms,
                    ping_gap_ms: g.during,
                    ping_gap_at_ms: g.at,
                    idle_gap_ms: g.idle,
                    pings: pings.answers.len(),
                    ping_errors: pings.errors,
                });
                let names: Vec<String> = if count == 1 {
                    vec![name.clone()]
                } else {
                    (1..=count).map(|i| format!("{name}-{i}")).collect()
                };
                for n in names {
                    vmha(&lab, a, &["vm", "remove", "--destroy", &n])?;
                }
            }
        }
    }
    let report = run.finish(
        "Live clone: template stall and time to clone ready",
        &body(&samples, rounds, counts),
    );
    drop(lab);
    crate::report::emit(&report, out.as_deref())
}

fn body(samples: &[Sample], rounds: usize, counts: &[u32]) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "Lab: 3 hosts, vmhad on each; templates of 128 MiB under TCG with vmha-guest: **btpl** ({}) and \
         **btpd** ({}), cloned to another host by `vmha clone`. {rounds} rounds; in each round every case \
         runs once, the two templates alternating.\n\n\
         - **stall, independent clock**: a process on the template's host sends `guest-ping` to the \
         template's guest agent over one open libvirt connection (libvirt's qemu-agent-command), sleeping \
         1 ms between calls; the figure is the longest gap between two answers that overlaps the clone (from \
         the `vmha clone` call to its return). The guest answers only while its vCPUs run, so this is the \
         stall as the guest sees it (plus up to one ping's round trip).\n\
         - **longest ping gap began**: how long after the `vmha clone` call that gap began; the live \
         capture (where libvirt stops the vCPUs) comes after prepare, within capture. A gap later than that \
         is the guest starved of CPU, not stopped: on this 2-core machine the template's QEMU shares the \
         cores with the clones being restored (and with other engineers' builds).\n\
         - **idle gap**: the longest gap between answers in the 0.5 s before the clone: the loop's own noise \
         floor.\n\
         - **stall, libvirt's figure**: `stall_ms` of the job's timings: libvirt's downtime statistic of the \
         live capture.\n\
         - **ready (job)**: the job's own total (request to the clones' post-clone acknowledgement); **CLI \
         wall**: the bench's clock around `vmha clone` (includes registering the clones in the cluster).\n",
        TEMPLATES[0].1, TEMPLATES[1].1
    );
    let _ = writeln!(
        r,
        "| template | clones | stall, independent clock ms | stall, libvirt's figure ms | idle gap ms | ready (job) ms | CLI wall ms | goals |\n|---|---|---|---|---|---|---|---|"
    );
    let mut extra = String::new();
    for &count in counts {
        for (tpl, what) in TEMPLATES {
            let s: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.template == tpl && s.count == count)
                .collect();
            let v = |f: fn(&Sample) -> Option<f64>| s.iter().filter_map(|x| f(x)).collect::<Vec<f64>>();
            let gap = v(|x| x.ping_gap_ms);
            let total = v(|x| Some(x.t.total_ms));
            let ready_goal = if count == 1 { 2000.0 } else { 10000.0 };
            let goals = format!(
                "stall <= 50 ms by the independent clock: {}; ready <= {} s: {}",
                verdict(!gap.is_empty() && median(&gap) <= 50.0),
                ready_goal / 1000.0,
                verdict(!total.is_empty() && median(&total) <= ready_goal)
            );
            let _ = writeln!(
                r,
                "| {tpl} ({what}) | {count} | {} | {} | {} | {} | {} | {goals} |",
                cell(&gap, 0, ""),
                cell(&v(|x| x.t.stall_ms), 0, ""),
                cell(&v(|x| x.idle_gap_ms), 1, ""),
                cell(&total, 0, ""),
                cell(&v(|x| Some(x.cli_ms)), 0, ""),
            );
            let _ = writeln!(
                extra,
                "| {tpl} | {count} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} / {} |",
                cell(&v(|x| Some(x.t.prepare_ms)), 0, ""),
                cell(&v(|x| Some(x.t.capture_ms)), 0, ""),
                cell(&v(|x| Some(x.t.create_ms)), 0, ""),
                cell(&v(|x| Some(x.t.resume_ms)), 0, ""),
                cell(&v(|x| Some(x.t.register_ms)), 0, ""),
                cell(&v(|x| Some(x.t.post_clone_ms)), 0, ""),
                cell(&v(|x| x.ping_gap_at_ms), 0, ""),
                cell(&v(|x| Some(x.pings as f64)), 0, ""),
                median(&v(|x| Some(x.ping_errors as f64))),
                s.iter().map(|x| x.ping_errors).max().unwrap_or(0),
            );
        }
    }
    let _ = writeln!(
        r,
        "\nGoals: issue 17 asks for a stall of at most 50 ms by the independent clock for every template shape \
         (the earlier goal, 100 ms, was judged by libvirt's figure); one clone ready within 2 s, eight within 10 s.\n"
    );
    let _ = writeln!(
        r,
        "### Steps, as vmhad timed them inside the job (ms), and the ping loop\n"
    );
    let _ = writeln!(
        r,
        "| template | clones | prepare | capture | create+start | resume | register | post-clone | longest ping gap began, ms after the clone call | answers per clone | failed pings (median / max) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    r.push_str(&extra);
    let _ = writeln!(
        r,
        "\nReference: VMware Instant Clone forks in under a second, 64 clones in under 6 s on one host."
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_spanning_the_clone_and_the_idle_floor() {
        let ms = 1_000_000;
        let p = Pings {
            answers: vec![0, ms, 2 * ms, 3 * ms, 40 * ms, 41 * ms, 90 * ms, 91 * ms],
            errors: 0,
        };
        // The clone ran from 10 ms to 80 ms: the gaps 3-40 and 41-90 overlap it.
        let g = gaps(&p, 10 * ms, 80 * ms);
        assert_eq!(g.during, Some(49.0));
        assert_eq!(g.at, Some(31.0));
        assert_eq!(g.idle, Some(1.0));
        let none = Pings {
            answers: vec![],
            errors: 0,
        };
        assert_eq!(gaps(&none, 0, 1), Gaps::default());
    }
}
