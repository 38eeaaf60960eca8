//! Failover and VM-crash recovery, vmha against VirtualDomain: two labs side by side (the same 3-host
//! recipe, the same Corosync timing, fencing on), one running its VM under `ocf:vmha:VirtualMachine` with
//! vmhad, the other under `ocf:heartbeat:VirtualDomain` without it. Trials alternate between the labs.
//!
//! Every time is taken by this process's monotonic clock from the moment it caused the failure, by
//! polling from outside the cluster (every [`POLL`]): Corosync's membership as another host reports it,
//! the lab's power controller's log (the fence device: not the system under test), Pacemaker's status,
//! and the QEMU processes of the lab's hosts. So each figure is exact to about one poll.
//!
//! - Host crash (hard power-off of the VM's host): detected (Corosync's membership lost the host),
//!   fenced (the power controller confirmed the fence), started (a new QEMU runs the VM on another host
//!   and Pacemaker shows it there). This path is Corosync, Pacemaker and fencing for either agent; the
//!   agent only starts the VM at the end.
//! - VM crash (SIGKILL to the VM's QEMU): detected (Pacemaker recorded a failure of the VM: a failed
//!   operation or a fail count in the CIB), started (a new QEMU runs the VM). vmha's vmhad reports the dead
//!   QEMU at once; VirtualDomain's failure is found by its next monitor (interval 10 s here).
//! - Guest hang (the VM's vCPUs stopped behind libvirt's back, QMP `stop` through `virsh
//!   qemu-monitor-command`: the guest runs no instruction, QEMU lives on): detected (Pacemaker recorded a
//!   failure of the VM), started (a new QEMU runs the VM). vmha's side runs its hang VMs with
//!   `health_monitoring=true health_sensitivity=high` (threshold 5 s): the figure to judge is detection
//!   minus that threshold. VirtualDomain's monitor takes a paused domain for a running one: its side is
//!   watched for [`HANG_WATCH`], then resumed. The reset limit (3 an hour per host for `high`) is kept
//!   out of the way by one hang VM per 3 rounds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{wait_for, Lab, LabConfig};

use crate::report::{cell, median, Run};

/// How often the trial looks.
const POLL: Duration = Duration::from_millis(50);
/// Corosync token of both labs (token_coefficient 0), as the other benches.
const TOKEN_MS: u32 = 1000;
/// How long a hung guest is watched for its detection before the trial gives up (and resumes it).
const HANG_WATCH: Duration = Duration::from_secs(60);
/// vmha's hang threshold in these trials (sensitivity high).
const HANG_THRESHOLD_S: f64 = 5.0;
/// vmha's health settings of the hang VMs.
const HANG_PARAMS: &[&str] = &["health_monitoring=true", "health_sensitivity=high", "health_grace=5"];

/// One side: a lab and the VM it runs.
struct Side {
    label: &'static str,
    lab: Lab,
    vm: &'static str,
    /// The VMs hung in guest-hang trials (one per 3 rounds), and whether vmhad monitors them.
    hang_vms: Vec<String>,
    vmha: bool,
}

/// A kind of failure the bench causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    HostCrash,
    VmCrash,
    GuestHang,
}

impl Kind {
    fn title(self) -> &'static str {
        match self {
            Kind::HostCrash => "host crash (hard power-off of the VM's host)",
            Kind::VmCrash => "VM crash (SIGKILL to the VM's QEMU)",
            Kind::GuestHang => "guest hang (vCPUs stopped behind libvirt's back; QEMU lives on)",
        }
    }
}

/// One trial's times in seconds from the failure (NaN: not seen).
#[derive(Debug, Clone)]
struct Trial {
    side: &'static str,
    kind: Kind,
    detected: f64,
    fenced: f64,
    started: f64,
}

fn config(name: &str, subnet: &str) -> LabConfig {
    let mut cfg = LabConfig::new(name, 3, subnet);
    cfg.token_ms = Some(TOKEN_MS);
    cfg.token_coefficient = Some(0);
    cfg
}

/// Host number running `vm` by Pacemaker, with exactly one QEMU of it, on that host.
fn running(lab: &Lab, vm: &str) -> Option<u8> {
    let s = lab.status_from_any().ok()?;
    let n = lab.cfg.host_number(s.running_on(vm)?)?;
    let q = lab.qemu_processes(vm);
    (q.len() == 1 && q[0].0 == n).then_some(n)
}

/// Waits until the lab is whole: every host online, the VM running once, the DC idle.
fn settle(lab: &Lab, vm: &str) -> Result<u8> {
    wait_for(
        &format!("lab {} whole with {vm} running", lab.cfg.name),
        Duration::from_secs(240),
        Duration::from_millis(200),
        || {
            let s = lab.status_from_any().ok()?;
            if s.online_nodes().len() != 3 || s.resources.iter().any(|r| r.failed) {
                return None;
            }
            running(lab, vm)
        },
    )
}

/// True once Pacemaker recorded a failure of `vm` (a failed operation or a fail count) in the CIB.
fn failure_recorded(lab: &Lab, n: u8, vm: &str) -> bool {
    let Ok(status) = lab.exec_ok(n, &["cibadmin", "--query", "--scope", "status"]) else {
        return false;
    };
    status.lines().any(|l| {
        (l.contains(&format!("name=\"fail-count-{vm}#")) && !l.contains("value=\"0\""))
            || (l.contains(&format!("id=\"{vm}_last_failure_0\"")) && !l.contains("rc-code=\"0\""))
    })
}

fn host_crash(side: &Side) -> Result<Trial> {
    let lab = &side.lab;
    let host = settle(lab, side.vm)?;
    let observer = lab.other_host(host).context("no other host")?;
    let victim = lab.cfg.host_name(host);
    let fences_before = lab.power_events().len();
    let t0 = Instant::now();
    let wall0 = vmha_lab::power::now();
    lab.power_off(host)?;
    let mut detected = f64::NAN;
    let started = wait_for(
        &format!("{} restarted elsewhere in lab {}", side.vm, lab.cfg.name),
        Duration::from_secs(180),
        POLL,
        || {
            if detected.is_nan() && {
                let m = lab.corosync_members(observer);
                !m.is_empty() && !m.contains(&victim)
            } {
                detected = t0.elapsed().as_secs_f64();
            }
            let n = running(lab, side.vm)?;
            (n != host).then(|| t0.elapsed().as_secs_f64())
        },
    )?;
    // The power controller logs the fence's completion with its own wall-clock time (it is the lab's fence
    // device, not part of the cluster under test).
    let fenced = lab
        .power_events()
        .iter()
        .skip(fences_before)
        .find(|e| e.host == victim && e.result == "ok" && e.action != "on")
        .map(|e| e.time - wall0)
        .unwrap_or(f64::NAN);
    if fenced.is_nan() {
        bail!(
            "lab {}: {victim} was not fenced before {} restarted",
            lab.cfg.name,
            side.vm
        );
    }
    lab.power_on(host)?;
    Ok(Trial {
        side: side.label,
        kind: Kind::HostCrash,
        detected,
        fenced,
        started,
    })
}

fn vm_crash(side: &Side) -> Result<Trial> {
    let lab = &side.lab;
    settle(lab, side.vm)?;
    let observer = 1;
    let q = lab.qemu_processes(side.vm);
    let pid = q
        .first()
        .map(|q| q.1)
        .ok_or_else(|| anyhow!("no QEMU runs {}", side.vm))?;
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    let mut detected = f64::NAN;
    let started = wait_for(
        &format!("{} running again in lab {}", side.vm, lab.cfg.name),
        Duration::from_secs(120),
        POLL,
        || {
            if detected.is_nan() && failure_recorded(lab, observer, side.vm) {
                detected = t0.elapsed().as_secs_f64();
            }
            let q = lab.qemu_processes(side.vm);
            (q.len() == 1 && q[0].1 != pid).then(|| t0.elapsed().as_secs_f64())
        },
    )?;
    // Clear the failure for the next trial (as an operator would), once Pacemaker shows it running.
    settle_running(lab, side.vm)?;
    lab.exec_ok(1, &["crm_resource", "--cleanup", "--resource", side.vm])?;
    Ok(Trial {
        side: side.label,
        kind: Kind::VmCrash,
        detected,
        fenced: f64::NAN,
        started,
    })
}

/// Waits until vmhad on host `n` has received `vm`'s heartbeats for longer than the grace after a connect
/// (so a hang now is judged by its threshold alone).
fn wait_monitored(lab: &Lab, n: u8, vm: &str) -> Result<()> {
    let first = wait_for(
        &format!("{vm}'s heartbeats on {}", lab.cfg.host_name(n)),
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            let out = lab.exec_ok(n, &["vmha", "--output", "json", "vm", "show", vm]).ok()?;
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            let h = v.pointer("/vm/health")?;
            let fresh = h
                .get("last_heartbeat_ms_ago")?
                .as_str()?
                .parse::<u64>()
                .ok()
                .is_some_and(|ms| ms < 2000);
            (h.get("heartbeats")?.as_str()? == "yes" && fresh).then(Instant::now)
        },
    )?;
    // The grace (5 s) runs from the channel's connection, which was before the first heartbeat seen.
    let grace_over = first + Duration::from_secs(5);
    let now = Instant::now();
    if grace_over > now {
        std::thread::sleep(grace_over - now);
    }
    Ok(())
}

fn virsh_hmp(lab: &Lab, n: u8, vm: &str, command: &str) -> Result<()> {
    lab.exec_ok(
        n,
        &[
            "virsh",
            "-c",
            "qemu:///system",
            "qemu-monitor-command",
            vm,
            "--hmp",
            command,
        ],
    )?;
    Ok(())
}

fn guest_hang(side: &Side, round: usize) -> Result<Trial> {
    let lab = &side.lab;
    let vm = side.hang_vms[round / 3].as_str();
    let n = settle(lab, vm)?;
    if side.vmha {
        wait_monitored(lab, n, vm)?;
    }
    let observer = 1;
    let pid = lab.qemu_processes(vm)[0].1;
    let t0 = Instant::now();
    virsh_hmp(lab, n, vm, "stop")?;
    let mut detected = f64::NAN;
    let started = wait_for(
        &format!(
            "{vm} hung, recovered or not within {} s, in lab {}",
            HANG_WATCH.as_secs(),
            lab.cfg.name
        ),
        HANG_WATCH + Duration::from_secs(60),
        POLL,
        || {
            if detected.is_nan() && failure_recorded(lab, observer, vm) {
                detected = t0.elapsed().as_secs_f64();
            }
            let q = lab.qemu_processes(vm);
            if q.len() == 1 && q[0].1 != pid {
                return Some(t0.elapsed().as_secs_f64());
            }
            (detected.is_nan() && t0.elapsed() >= HANG_WATCH).then_some(f64::NAN)
        },
    )?;
    if started.is_nan() {
        // Never noticed: the trial resumes the guest itself.
        virsh_hmp(lab, n, vm, "cont")?;
    } else {
        settle_running(lab, vm)?;
    }
    lab.exec_ok(1, &["crm_resource", "--cleanup", "--resource", vm])?;
    Ok(Trial {
        side: side.label,
        kind: Kind::GuestHang,
        detected,
        fenced: f64::NAN,
        started,
    })
}

fn settle_running(lab: &Lab, vm: &str) -> Result<u8> {
    wait_for(
        &format!("{vm} running in lab {}", lab.cfg.name),
        Duration::from_secs(120),
        Duration::from_millis(200),
        || running(lab, vm),
    )
}

/// Runs the bench: `kinds` (default: every kind; `quick`: the VM crash once).
pub fn run(
    rounds: usize,
    quick: bool,
    kinds: &[Kind],
    a: &LabConfig,
    b: &LabConfig,
    out: Option<PathBuf>,
) -> Result<()> {
    vmha_lab::init_logging();
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let kinds: &[Kind] = if quick {
        &[Kind::VmCrash]
    } else if kinds.is_empty() {
        &[Kind::VmCrash, Kind::HostCrash, Kind::GuestHang]
    } else {
        kinds
    };
    let hangs = if kinds.contains(&Kind::GuestHang) {
        rounds.div_ceil(3)
    } else {
        0
    };
    let run = Run::start(&a.shared_dir());
    let vmha_lab = crate::lab_with_vmhad(a)?;
    vmha_lab.add_vm(&GuestSpec::new("fva1"), VmAgent::Vmha)?;
    let vd_lab = Lab::up(b.clone())?;
    vd_lab.add_vm(&GuestSpec::new("fvb1"), VmAgent::VirtualDomain)?;
    let hang_vms = |prefix: &str| (1..=hangs).map(|i| format!("{prefix}h{i}")).collect::<Vec<_>>();
    let sides = [
        Side {
            label: "vmha (VirtualMachine + vmhad)",
            lab: vmha_lab,
            vm: "fva1",
            hang_vms: hang_vms("fva"),
            vmha: true,
        },
        Side {
            label: "VirtualDomain",
            lab: vd_lab,
            vm: "fvb1",
            hang_vms: hang_vms("fvb"),
            vmha: false,
        },
    ];
    for s in &sides {
        for vm in &s.hang_vms {
            if s.vmha {
                s.lab.add_vm_with(&GuestSpec::new(vm), VmAgent::Vmha, HANG_PARAMS)?;
            } else {
                s.lab.add_vm(&GuestSpec::new(vm), VmAgent::VirtualDomain)?;
            }
        }
    }
    for s in &sides {
        settle(&s.lab, s.vm)?;
        for vm in &s.hang_vms {
            settle(&s.lab, vm)?;
        }
    }
    let mut trials = Vec::new();
    for round in 0..rounds {
        for &kind in kinds {
            // Alternate which side goes first from round to round.
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let t = match kind {
                    Kind::HostCrash => host_crash(&sides[i])?,
                    Kind::VmCrash => vm_crash(&sides[i])?,
                    Kind::GuestHang => guest_hang(&sides[i], round)?,
                };
                eprintln!("vmha-bench: trial {t:?}");
                trials.push(t);
            }
        }
    }
    let report = run.finish(
        "Failover and VM-crash recovery: vmha against VirtualDomain",
        &body(
            &trials,
            rounds,
            kinds,
            &sides.iter().map(|s| s.label).collect::<Vec<_>>(),
        ),
    );
    drop(sides);
    crate::report::emit(&report, out.as_deref())
}

fn body(trials: &[Trial], rounds: usize, kinds: &[Kind], sides: &[&'static str]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Two labs side by side on this machine, each 3 hosts in namespaces with Corosync (token {TOKEN_MS} ms, \
         token_coefficient 0), Pacemaker with fencing on (the lab's power controller), libvirtd, and one TCG \
         guest of 128 MiB: one runs it under `ocf:vmha:VirtualMachine` with vmhad on every host, the other \
         under `ocf:heartbeat:VirtualDomain` (force_stop=true) without vmhad. Both: monitor interval 10 s. \
         {rounds} round(s); in each, every kind of failure once per side, the sides alternating (which goes \
         first alternates by round).\n\n\
         Clock: this process's monotonic clock from the moment it caused the failure, polling from outside \
         the cluster every {} ms (figures exact to about one poll); fencing from the lab power controller's \
         own log. A host crash is recovered by Corosync (detection), Pacemaker (scheduling) and fencing: the \
         same for any agent, which only starts the VM at the end. A VM crash is where the agents differ.\n",
        POLL.as_millis()
    ));
    for &kind in kinds {
        s.push_str(&format!("\n## {}\n\n", kind.title()));
        match kind {
            Kind::HostCrash => {
                s.push_str("| side | detected (membership lost the host) | fenced (power controller) | VM running elsewhere |\n|---|---|---|---|\n")
            }
            Kind::VmCrash => s.push_str(
                "| side | detected (failure recorded in the CIB) | VM running again (new QEMU) |\n|---|---|---|\n",
            ),
            Kind::GuestHang => s.push_str(&format!(
                "vmha's threshold: {HANG_THRESHOLD_S} s (`{}`). A side that did not notice the hang within {} s \
                 shows no figure (n counts the trials that did).\n\n\
                 | side | detected (failure recorded in the CIB) | detected minus the threshold | VM running again (new QEMU) | trials not detected |\n|---|---|---|---|---|\n",
                HANG_PARAMS.join(" "),
                HANG_WATCH.as_secs()
            )),
        }
        for side in sides {
            let of: Vec<&Trial> = trials.iter().filter(|t| t.side == *side && t.kind == kind).collect();
            let col = |f: fn(&Trial) -> f64| cell(&of.iter().map(|t| f(t)).collect::<Vec<_>>(), 2, " s");
            match kind {
                Kind::HostCrash => s.push_str(&format!(
                    "| {side} | {} | {} | {} |\n",
                    col(|t| t.detected),
                    col(|t| t.fenced),
                    col(|t| t.started)
                )),
                Kind::VmCrash => s.push_str(&format!(
                    "| {side} | {} | {} |\n",
                    col(|t| t.detected),
                    col(|t| t.started)
                )),
                Kind::GuestHang => {
                    let seen: Vec<&&Trial> = of.iter().filter(|t| !t.detected.is_nan()).collect();
                    let over: Vec<f64> = seen.iter().map(|t| t.detected - HANG_THRESHOLD_S).collect();
                    s.push_str(&format!(
                        "| {side} | {} | {} | {} | {} of {} |\n",
                        cell(&seen.iter().map(|t| t.detected).collect::<Vec<_>>(), 2, " s"),
                        cell(&over, 2, " s"),
                        cell(&seen.iter().map(|t| t.started).collect::<Vec<_>>(), 2, " s"),
                        of.len() - seen.len(),
                        of.len()
                    ))
                }
            }
        }
        let started = |side: &str| {
            median(
                &trials
                    .iter()
                    .filter(|t| t.side == side && t.kind == kind)
                    .map(|t| t.started)
                    .collect::<Vec<_>>(),
            )
        };
        if sides.len() == 2 {
            let (a, b) = (started(sides[0]), started(sides[1]));
            if b.is_nan() {
                s.push_str(&format!(
                    "\nMedian time to the VM running again: {} {a:.2} s; {} never recovered it.\n",
                    sides[0], sides[1]
                ));
                continue;
            }
            s.push_str(&format!(
                "\nMedian time to the VM running again: {} {a:.2} s, {} {b:.2} s ({}).\n",
                sides[0],
                sides[1],
                if a < b {
                    format!("vmha {:.1}x faster", b / a)
                } else {
                    format!("vmha not faster: {:.1}x", b / a)
                }
            ));
        }
    }
    s.push_str("\n## Every trial (seconds from the failure)\n\n| side | failure | detected | fenced | running |\n|---|---|---|---|---|\n");
    for t in trials {
        s.push_str(&format!(
            "| {} | {:?} | {:.2} | {:.2} | {:.2} |\n",
            t.side, t.kind, t.detected, t.fenced, t.started
        ));
    }
    s
}

/// Both labs' configurations.
pub fn configs(a: (&str, &str), b: (&str, &str)) -> (LabConfig, LabConfig) {
    (config(a.0, a.1), config(b.0, b.1))
}
