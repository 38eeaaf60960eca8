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
//!
//! And by a second independent clock that bypasses libvirt: a process in the template's guest
//! (`vmha-guest --tick-to /dev/ttyS0`, started through the guest agent) writes a numbered line to the
//! serial console about every millisecond; a process on the template's host reads the console's host end
//! (QEMU's pty) and times each line's arrival with the host's CLOCK_MONOTONIC. Under TCG the guest's own
//! clock stops while its vCPUs are stopped, so only the host's arrival times show the stall.

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
    /// Set when the capture staged the memory on a tmpfs of the template's host (the copy's ms).
    #[serde(default)]
    staged_copy_ms: Option<f64>,
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

/// What the tick reader prints when it ends.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Ticks {
    /// CLOCK_MONOTONIC (ns) of every `vmha-tick` line's arrival, in order.
    arrivals: Vec<u64>,
    /// The lines' sequence numbers (a jump: lines lost on the way).
    seqs: Vec<u64>,
}

impl Ticks {
    /// Lines missing from the stream (jumps in the sequence numbers).
    fn lost(&self) -> u64 {
        self.seqs
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]).saturating_sub(1))
            .sum()
    }
}

/// The pty path of a domain's serial console, from its live XML.
fn serial_pty(xml: &str) -> Option<String> {
    let start = xml
        .find("<serial type='pty'")
        .or_else(|| xml.find("<console type='pty'"))?;
    let rest = &xml[start..];
    let rest = &rest[..rest.find("</serial>").or_else(|| rest.find("</console>"))?];
    let at = rest.find("path='")? + "path='".len();
    let len = rest[at..].find('\'')?;
    Some(rest[at..at + len].to_string())
}

/// `vmha-bench tick-reader`: runs inside the template's host. Opens the host end of the domain's serial
/// console, starts the guest's timestamp stream through the guest agent, prints "ready" once lines
/// arrive, then times every line until stdin closes and prints [`Ticks`] as JSON.
pub fn tick_reader(domain: &str, for_ms: u64) -> Result<()> {
    let conn = virt::connect::Connect::open(Some("qemu:///system")).map_err(|e| anyhow!("qemu:///system: {e}"))?;
    let dom = conn
        .lookup_domain_by_name(domain)
        .map_err(|e| anyhow!("domain {domain}: {e}"))?;
    let xml = dom.xml_desc(0).map_err(|e| anyhow!("domain {domain}: {e}"))?;
    let pty = serial_pty(&xml).ok_or_else(|| anyhow!("domain {domain} has no pty serial console"))?;
    // QEMU made the pty raw (no echo, no line editing): read what the guest writes, as it comes.
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .open(&pty)
        .with_context(|| format!("opening {pty}"))?;
    let ticks = Arc::new(std::sync::Mutex::new(Ticks::default()));
    let t = ticks.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        while let Ok(n) = port.read(&mut buf) {
            if n == 0 {
                break;
            }
            let now = mono_ns();
            for &b in &buf[..n] {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                let text = String::from_utf8_lossy(&line);
                if let Some(seq) = text.trim().strip_prefix("vmha-tick ").and_then(|n| n.parse().ok()) {
                    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                    t.arrivals.push(now);
                    t.seqs.push(seq);
                }
                line.clear();
            }
        }
    });
    let exec = serde_json::json!({"execute": "guest-exec", "arguments": {
        "path": "/usr/sbin/vmha-guest",
        "arg": ["--tick-to", "/dev/ttyS0", "--tick-for-ms", for_ms.to_string()],
        "capture-output": false}})
    .to_string();
    let t0 = Instant::now();
    let started = loop {
        match dom.qemu_agent_command(&exec, 5, 0) {
            Ok(answer) => break answer,
            Err(e) if t0.elapsed() > Duration::from_secs(60) => bail!("starting the timestamp stream in {domain}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let pid = serde_json::from_str::<serde_json::Value>(&started)
        .ok()
        .and_then(|v| v["return"]["pid"].as_u64());
    // QEMU notices a reader on the pty within a second; lines before that are dropped.
    let count = || ticks.lock().unwrap_or_else(|e| e.into_inner()).arrivals.len();
    while count() < 10 {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("no timestamp lines from {domain} on {pty} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    let t = ticks.lock().unwrap_or_else(|e| e.into_inner());
    // The stream is done with: end it, so that the next one starts alone (best effort; it ends by itself
    // after --for-ms anyway).
    if let Some(pid) = pid {
        let kill = serde_json::json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/kill", "arg": [pid.to_string()], "capture-output": false}})
        .to_string();
        let _ = dom.qemu_agent_command(&kill, 5, 0);
    }
    println!("{}", serde_json::to_string(&*t)?);
    std::io::stdout().flush()?;
    // The reading thread is blocked on the pty: end the process here.
    std::process::exit(0)
}

/// The ping loop, running in host `n` for domain `vm`.
struct PingLoop {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl PingLoop {
    fn start(lab: &Lab, n: u8, vm: &str) -> Result<PingLoop> {
        Self::start_helper(lab, n, &["ping-loop", "--domain", vm], vm)
    }

    /// The tick reader ([`tick_reader`]) for domain `vm` in host `n`.
    fn start_ticks(lab: &Lab, n: u8, vm: &str, for_ms: u64) -> Result<PingLoop> {
        Self::start_helper(
            lab,
            n,
            &["tick-reader", "--domain", vm, "--for-ms", &for_ms.to_string()],
            vm,
        )
    }

    fn start_helper(lab: &Lab, n: u8, args: &[&str], vm: &str) -> Result<PingLoop> {
        let init = ProcId::load(&lab.cfg.host_dir(n).join("pid"))?
            .filter(ProcId::alive)
            .ok_or_else(|| anyhow!("host {n} is not running"))?;
        let me = std::env::current_exe()?;
        let mut child = Command::new("nsenter")
            .args(["-t", &init.pid.to_string(), "-m", "-u", "-i", "-n", "-p", "--"])
            .arg(&me)
            .args(args)
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
            bail!("{} for {vm} did not start", args[0]);
        }
        Ok(PingLoop { child, stdout })
    }

    fn finish<T: serde::de::DeserializeOwned>(mut self) -> Result<T> {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the helper failed: {status}");
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

fn gaps(times: &[u64], from: u64, to: u64) -> Gaps {
    let mut g = Gaps::default();
    for w in times.windows(2) {
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
    /// Whether vmhad staged the template's memory on a tmpfs (as the job reported it).
    staged: bool,
    t: Timings,
    cli_ms: f64,
    ping_gap_ms: Option<f64>,
    ping_gap_at_ms: Option<f64>,
    idle_gap_ms: Option<f64>,
    pings: usize,
    ping_errors: u64,
    /// The ping loop's longest gap overlapping the capture window (see [`capture_end`]).
    ping_capture_gap_ms: Option<f64>,
    /// The timestamp stream: longest gap between arrivals overlapping the capture window, overlapping the
    /// whole call (as far as the stream covers it), when that began, and the idle floor.
    tick_capture_gap_ms: Option<f64>,
    tick_gap_ms: Option<f64>,
    tick_gap_at_ms: Option<f64>,
    tick_idle_gap_ms: Option<f64>,
    /// Lines that arrived during the call, and lines lost.
    ticks: usize,
    ticks_lost: u64,
}

/// How long the guest writes its timestamp stream (ms): up to a second until the reader sees it, the
/// 0.5 s before the call and the first 1.5 s or more of the call, which hold the capture. Kept short
/// because the clones inherit the writing process with the template's memory and go on writing for what
/// is left of it while they start (load on these two cores).
const TICK_FOR_MS: u64 = 3000;

/// The latest the live capture can have ended (CLOCK_MONOTONIC ns), from the call's return `t1` and the
/// job's own step timings: the job started at least `total + register` before `t1`, and the capture came
/// before create+start, resume and post-clone, which `total` includes.
fn capture_end(t1: u64, t: &Timings) -> u64 {
    let after = t.register_ms + t.create_ms + t.resume_ms + t.post_clone_ms;
    t1.saturating_sub((after * 1e6) as u64)
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
    let mut failures: Vec<String> = Vec::new();
    for round in 0..rounds {
        // One clone runs with and without staging the memory (cluster property vmha-capture-staging), the
        // order alternating by round; eight clones with staging (vmhad's default) only.
        let mut cases: Vec<(u32, bool)> = Vec::new();
        for &count in counts {
            if count == 1 && !quick {
                let first = round % 2 == 0;
                cases.push((count, first));
                cases.push((count, !first));
            } else {
                cases.push((count, true));
            }
        }
        for (count, staging) in cases {
            lab.exec_ok(
                1,
                &[
                    "crm_attribute",
                    "--type",
                    "crm_config",
                    "--name",
                    "vmha-capture-staging",
                    "--update",
                    if staging { "true" } else { "false" },
                ],
            )?;
            for (ti, (tpl, _)) in TEMPLATES.iter().enumerate() {
                let a = host_of(tpl).ok_or_else(|| anyhow!("template {tpl} is not running"))?;
                let target = lab.other_host(a).context("no other host")?;
                let name = format!("k{ti}n{count}s{}r{round}", u8::from(staging));
                let c = count.to_string();
                let ticker = PingLoop::start_ticks(&lab, a, tpl, TICK_FOR_MS)?;
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
                let pings: Pings = pinger.finish()?;
                let ticks: Ticks = ticker.finish()?;
                let out = match result {
                    Ok(out) => out,
                    Err(e) => {
                        // A clone that failed (and was rolled back) is reported, not hidden: the run goes on.
                        eprintln!("vmha-bench: clone {name} of {tpl} failed: {e}");
                        failures.push(format!(
                            "{tpl}, {count} clone(s), staging {}, round {}: {e}",
                            if staging { "on" } else { "off" },
                            round + 1
                        ));
                        continue;
                    }
                };
                let v: serde_json::Value = serde_json::from_str(out.trim())?;
                let t = timings(v["message"].as_str().unwrap_or(""))?;
                let g = gaps(&pings.answers, t0, t1);
                let cap = capture_end(t1, &t);
                let pc = gaps(&pings.answers, t0, cap);
                // The stream covers the call up to its last line (it runs for TICK_FOR_MS).
                let covered = ticks.arrivals.last().copied().unwrap_or(t0).min(t1);
                let tg = gaps(&ticks.arrivals, t0, covered);
                let tc = gaps(&ticks.arrivals, t0, cap);
                samples.push(Sample {
                    ping_capture_gap_ms: pc.during,
                    tick_capture_gap_ms: tc.during,
                    tick_gap_ms: tg.during,
                    tick_gap_at_ms: tg.at,
                    tick_idle_gap_ms: tg.idle,
                    ticks: ticks.arrivals.iter().filter(|&&x| x >= t0 && x <= t1).count(),
                    ticks_lost: ticks.lost(),
                    template: tpl,
                    count,
                    staged: t.staged_copy_ms.is_some(),
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
        &body(&samples, rounds, counts, &failures),
    );
    drop(lab);
    crate::report::emit(&report, out.as_deref())
}

fn body(samples: &[Sample], rounds: usize, counts: &[u32], failures: &[String]) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "Lab: 3 hosts, vmhad on each; templates of 128 MiB under TCG with vmha-guest: **btpl** ({}) and \
         **btpd** ({}), cloned to another host by `vmha clone`. {rounds} rounds; in each round every case \
         runs once, the two templates alternating. One clone runs twice in each round (not in --quick): with the \
         template's memory staged on a tmpfs of its host and copied to the shared storage after the template \
         runs again (vmhad's default), and straight to the shared storage (cluster property \
         `vmha-capture-staging=false`), in an order that alternates by round; rows are grouped by what the \
         job reported (`staged_copy_ms`).\n\n\
         Two independent clocks watch the template's guest during every clone, both timed by the host's \
         CLOCK_MONOTONIC; each figure is the longest gap between two signs of life:\n\
         - **stream**: a process in the template's guest (`vmha-guest --tick-to /dev/ttyS0`, started through \
         the guest agent) writes a numbered line to its serial console about every millisecond; a process on \
         the template's host reads the console's host end (QEMU's pty) and times each line's arrival. No \
         libvirt in the path: a gap is time the guest's vCPUs did not run (stopped, or starved of CPU). The \
         guest's own clock is no use here: under TCG it stops while the vCPUs are stopped.\n\
         - **ping loop**: a process on the template's host sends `guest-ping` to the template's guest agent \
         over one open libvirt connection (libvirt's qemu-agent-command), sleeping 1 ms between calls. \
         libvirt refuses agent calls while the domain is paused (\"failed pings\"), and the loop's 1000 \
         calls a second load libvirtd and the machine during the very capture they time.\n\
         - **during the capture**: the longest gap overlapping the window from the `vmha clone` call to the \
         latest the live capture can have ended (the call's return minus the job's register, create+start, \
         resume and post-clone steps, which follow the capture). This is the stall: there are no clones \
         yet to starve the template of CPU. **over the call**: the longest gap overlapping the whole call (for \
         the stream, as far as it runs: {TICK_FOR_MS} ms from its start, so for eight clones it covers the \
         capture and the first seconds of create+start). A gap after the capture is the guest starved of \
         CPU, not stopped: on this 2-core machine the template's QEMU shares the cores with the clones being \
         restored (and with other engineers' builds).\n\
         - **idle gap**: the longest gap in the 0.5 s before the call: each clock's own noise floor (stream / \
         ping loop).\n\
         - **stall, libvirt's figure**: `stall_ms` of the job's timings: libvirt's downtime statistic of the \
         live capture (QEMU's migration downtime: it leaves out what libvirt does before it resumes the \
         vCPUs).\n\
         - **ready (job)**: the job's own total (request to the clones' post-clone acknowledgement); **CLI \
         wall**: the bench's clock around `vmha clone` (includes registering the clones in the cluster).\n",
        TEMPLATES[0].1, TEMPLATES[1].1
    );
    let _ = writeln!(
        r,
        "| template | clones | stall during the capture, stream ms | stall during the capture, ping loop ms | stall, libvirt's figure ms | longest gap over the call, stream ms | longest gap over the call, ping loop ms | idle gap, stream / ping ms | ready (job) ms | CLI wall ms | goals |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut extra = String::new();
    for &count in counts {
        for staged in [true, false] {
            for (tpl, what) in TEMPLATES {
                let s: Vec<&Sample> = samples
                    .iter()
                    .filter(|s| s.template == tpl && s.count == count && s.staged == staged)
                    .collect();
                if s.is_empty() {
                    continue;
                }
                let how = if staged {
                    "memory staged on tmpfs"
                } else {
                    "memory straight to shared storage"
                };
                let v = |f: fn(&Sample) -> Option<f64>| s.iter().filter_map(|x| f(x)).collect::<Vec<f64>>();
                let stall = v(|x| x.tick_capture_gap_ms);
                let total = v(|x| Some(x.t.total_ms));
                let ready_goal = if count == 1 { 2000.0 } else { 10000.0 };
                let goals = format!(
                    "stall <= 50 ms by the stream during the capture: {}; ready <= {} s: {}",
                    verdict(!stall.is_empty() && median(&stall) <= 50.0),
                    ready_goal / 1000.0,
                    verdict(!total.is_empty() && median(&total) <= ready_goal)
                );
                let idle = |f: fn(&Sample) -> Option<f64>| {
                    let x = v(f);
                    if x.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.1}", median(&x))
                    }
                };
                let _ = writeln!(
                    r,
                    "| {tpl} ({what}), {how} | {count} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {goals} |",
                    cell(&stall, 0, ""),
                    cell(&v(|x| x.ping_capture_gap_ms), 0, ""),
                    cell(&v(|x| x.t.stall_ms), 0, ""),
                    cell(&v(|x| x.tick_gap_ms), 0, ""),
                    cell(&v(|x| x.ping_gap_ms), 0, ""),
                    idle(|x| x.tick_idle_gap_ms),
                    idle(|x| x.idle_gap_ms),
                    cell(&total, 0, ""),
                    cell(&v(|x| Some(x.cli_ms)), 0, ""),
                );
                let _ = writeln!(
                extra,
                "| {tpl}, {how} | {count} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} / {} | {} | {:.0} / {} |",
                cell(&v(|x| Some(x.t.prepare_ms)), 0, ""),
                cell(&v(|x| Some(x.t.capture_ms)), 0, ""),
                cell(&v(|x| x.t.staged_copy_ms), 0, ""),
                cell(&v(|x| Some(x.t.create_ms)), 0, ""),
                cell(&v(|x| Some(x.t.resume_ms)), 0, ""),
                cell(&v(|x| Some(x.t.register_ms)), 0, ""),
                cell(&v(|x| Some(x.t.post_clone_ms)), 0, ""),
                cell(&v(|x| x.tick_gap_at_ms), 0, ""),
                cell(&v(|x| x.ping_gap_at_ms), 0, ""),
                cell(&v(|x| Some(x.pings as f64)), 0, ""),
                median(&v(|x| Some(x.ping_errors as f64))),
                s.iter().map(|x| x.ping_errors).max().unwrap_or(0),
                cell(&v(|x| Some(x.ticks as f64)), 0, ""),
                median(&v(|x| Some(x.ticks_lost as f64))),
                s.iter().map(|x| x.ticks_lost).max().unwrap_or(0),
            );
            }
        }
    }
    let _ = writeln!(
        r,
        "\nGoals: issue 17 asks for a stall of at most 50 ms by an independent clock for every template shape \
         (the earlier goal, 100 ms, was judged by libvirt's figure); one clone ready within 2 s, eight within 10 s.\n"
    );
    let _ = writeln!(
        r,
        "### Steps, as vmhad timed them inside the job (ms), and the two clocks\n"
    );
    let _ = writeln!(
        r,
        "| template | clones | prepare | capture | of it, copying the staged memory | create+start | resume | register | post-clone | longest gap over the call began, ms after the call: stream | same, ping loop | ping answers per clone | failed pings (median / max) | stream lines per clone | stream lines lost (median / max) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    r.push_str(&extra);
    if !failures.is_empty() {
        let _ = writeln!(
            r,
            "\n**Failed clones** ({} of {}; each rolled back by vmhad, left out of the figures above):\n",
            failures.len(),
            failures.len() + samples.len()
        );
        for f in failures {
            let _ = writeln!(r, "- {}", f.replace('\n', " "));
        }
    }
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
        let g = gaps(&p.answers, 10 * ms, 80 * ms);
        assert_eq!(g.during, Some(49.0));
        assert_eq!(g.at, Some(31.0));
        assert_eq!(g.idle, Some(1.0));
        let none = Pings {
            answers: vec![],
            errors: 0,
        };
        assert_eq!(gaps(&none.answers, 0, 1), Gaps::default());
    }

    #[test]
    fn the_serial_consoles_pty_from_the_live_xml() {
        let xml = "<domain><devices><channel type='unix'><source path='/x'/></channel>\
                   <serial type='pty'><source path='/dev/pts/7'/><log file='/l' append='on'/>\
                   <target type='isa-serial' port='0'/></serial><console type='pty' tty='/dev/pts/7'>\
                   <source path='/dev/pts/7'/></console></devices></domain>";
        assert_eq!(serial_pty(xml).as_deref(), Some("/dev/pts/7"));
        assert_eq!(serial_pty("<domain><devices/></domain>"), None);
        // A serial device without a source (not started) has no pty.
        assert_eq!(serial_pty("<serial type='pty'><target port='0'/></serial>"), None);
    }

    #[test]
    fn lost_lines_are_the_jumps_in_the_sequence() {
        let t = Ticks {
            arrivals: vec![1, 2, 3, 4],
            seqs: vec![5, 6, 9, 10],
        };
        assert_eq!(t.lost(), 2);
        assert_eq!(Ticks::default().lost(), 0);
    }

    #[test]
    fn the_capture_ends_before_the_steps_that_follow_it() {
        let t = Timings {
            register_ms: 200.0,
            create_ms: 800.0,
            resume_ms: 50.0,
            post_clone_ms: 250.0,
            ..Timings::default()
        };
        let ms = 1_000_000;
        assert_eq!(capture_end(2000 * ms, &t), 700 * ms);
        assert_eq!(capture_end(10 * ms, &t), 0);
    }
}
