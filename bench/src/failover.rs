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

/// One side: a lab and the VM it runs.
struct Side {
    label: &'static str,
    lab: Lab,
    vm: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    HostCrash,
    VmCrash,
}

impl Kind {
    fn title(self) -> &'static str {
        match self {
            Kind::HostCrash => "host crash (hard power-off of the VM's host)",
            Kind::VmCrash => "VM crash (SIGKILL to the VM's QEMU)",
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

fn settle_running(lab: &Lab, vm: &str) -> Result<u8> {
    wait_for(
        &format!("{vm} running in lab {}", lab.cfg.name),
        Duration::from_secs(120),
        Duration::from_millis(200),
        || running(lab, vm),
    )
}

pub fn run(rounds: usize, quick: bool, a: &LabConfig, b: &LabConfig, out: Option<PathBuf>) -> Result<()> {
    vmha_lab::init_logging();
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let run = Run::start(&a.shared_dir());
    let vmha_lab = crate::lab_with_vmhad(a)?;
    vmha_lab.add_vm(&GuestSpec::new("fva1"), VmAgent::Vmha)?;
    let vd_lab = Lab::up(b.clone())?;
    vd_lab.add_vm(&GuestSpec::new("fvb1"), VmAgent::VirtualDomain)?;
    let sides = [
        Side {
            label: "vmha (VirtualMachine + vmhad)",
            lab: vmha_lab,
            vm: "fva1",
        },
        Side {
            label: "VirtualDomain",
            lab: vd_lab,
            vm: "fvb1",
        },
    ];
    for s in &sides {
        settle(&s.lab, s.vm)?;
    }
    let kinds: &[Kind] = if quick {
        &[Kind::VmCrash]
    } else {
        &[Kind::VmCrash, Kind::HostCrash]
    };
    let mut trials = Vec::new();
    for round in 0..rounds {
        for &kind in kinds {
            // Alternate which side goes first from round to round.
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let t = match kind {
                    Kind::HostCrash => host_crash(&sides[i])?,
                    Kind::VmCrash => vm_crash(&sides[i])?,
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
