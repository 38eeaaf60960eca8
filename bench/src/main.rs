//! `vmha-bench`: measures vmha against the tools it replaces, on real daemons in the lab, and prints the
//! figures beside the baselines of `shared/docs/baselines.md`.

mod clone;
mod failover;
mod measure;
mod memory;
mod report;
mod scale;
mod site;
mod vcluster;
mod vcluster_lab;
mod whatif;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use measure::{libvirtd_pid, run_once, Sample, Side};
use report::{cell, median, verdict, Run};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::{target_binary, VmAgent};
use vmha_lab::{wait_for, Lab, LabConfig};

const VIRTUAL_DOMAIN: &str = "/usr/lib/ocf/resource.d/heartbeat/VirtualDomain";
const VIRTUAL_MACHINE: &str = "/usr/lib/ocf/resource.d/vmha/VirtualMachine";

#[derive(Parser, Debug)]
#[command(name = "vmha-bench", about = "vmha benchmarks on the lab, beside their baselines")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Which lab a bench brings up (and tears down by PID at the end, also when it fails). Two labs of
/// different names and subnets run side by side; the subnet exists only inside the lab's namespaces.
#[derive(Args, Debug, Clone)]
struct LabArgs {
    /// Lab name (1-8 characters of a-z, 0-9).
    #[arg(long)]
    lab: Option<String>,
    /// First three octets of the lab's subnet.
    #[arg(long)]
    subnet: Option<String>,
}

impl LabArgs {
    fn config(&self, name: &str, subnet: &str) -> LabConfig {
        LabConfig::new(
            self.lab.as_deref().unwrap_or(name),
            3,
            self.subnet.as_deref().unwrap_or(subnet),
        )
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// ocf:vmha:VirtualMachine against ocf:heartbeat:VirtualDomain with its defaults and against
    /// VirtualDomain without its utilization updates (like for like), on the same VM and host, alternating:
    /// monitor, start, stop and live migration, with libvirtd's CPU per call. Brings up its own lab.
    Agents {
        /// Monitor calls per side.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Lifecycle rounds (stop, start, migration there and back) per side.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// One round of everything (3 monitor calls per side): proves the bench works, measures nothing.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        lab: LabArgs,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Virtual clusters: capture and instantiate of the metadata of --vms VMs (file-backed CIBs, the
    /// library's path) and of a disk image (incompressible bytes from /dev/urandom; a compressible image
    /// separately) against this machine's own copy of the same bytes, alternating in the same run. With
    /// --vmhad: the same through the product's path, `vmha vcluster capture`/`instantiate` as vmhad's
    /// D-Bus jobs on a lab cluster of its own.
    Vcluster {
        #[arg(long, default_value_t = 50)]
        vms: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        /// One round, 5 VMs, 16 MiB disks: proves the bench works, measures nothing.
        #[arg(long)]
        quick: bool,
        /// Work directory (default /var/tmp; not with --vmhad, which works in its lab's directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Through vmhad's D-Bus jobs on a 3-host lab cluster instead of the library calls.
        #[arg(long)]
        vmhad: bool,
        #[command(flatten)]
        lab: LabArgs,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Live clone (`vmha clone`) of running 128 MiB guests, one template with a qcow2 disk and one without:
    /// the template's stall by libvirt's figure and by an independent clock in the guest's view (the
    /// longest gap between guest-agent pings ~1 ms apart), and time to clone ready, for 1 clone and
    /// --count 8. Brings up its own lab.
    Clone {
        /// Rounds per case.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// One round of one clone of each template: proves the bench works, measures nothing.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        lab: LabArgs,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Failover and VM-crash recovery, vmha (VirtualMachine + vmhad) against VirtualDomain: two labs side
    /// by side, trials alternating, each time split into detection, fencing and start by this process's
    /// clock. Brings up both labs.
    Failover {
        /// Rounds (each: every kind of failure once per side).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// One round of the VM crash only: proves the bench works, measures nothing.
        #[arg(long)]
        quick: bool,
        /// The failures to cause (default: all three).
        #[arg(long, value_enum, value_delimiter = ',')]
        failures: Vec<failover::Kind>,
        /// Names of the two labs (vmha's, VirtualDomain's).
        #[arg(long, value_delimiter = ',', default_values_t = ["fva".to_string(), "fvb".to_string()])]
        labs: Vec<String>,
        /// Their subnets (first three octets).
        #[arg(long, value_delimiter = ',', default_values_t = ["10.213.141".to_string(), "10.213.151".to_string()])]
        subnets: Vec<String>,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// vmhad and the CLI at scale: the lab's CIB grown to --hosts hosts (the extra ones offline) and --vms
    /// stopped VMs; vmhad's latency and CPU per CIB change and its RSS, and the wall time of `vmha status`,
    /// `vmha what-if --n-plus-one` and `vmha policy apply --dry-run`. Brings up its own lab.
    Scale {
        #[arg(long, default_value_t = 32)]
        hosts: u8,
        #[arg(long, default_value_t = 2000)]
        vms: usize,
        /// CIB changes timed.
        #[arg(long, default_value_t = 100)]
        changes: usize,
        /// Runs of each CLI command.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// 8 hosts, 200 VMs, 10 changes, 2 runs: proves the bench works, measures nothing.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        lab: LabArgs,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// vmhad's log filter in every host (`RUST_LOG` in /etc/default/vmhad, e.g.
        /// `info,vmha_pacemaker=debug`), for finding where its time goes; the default is the shipped one.
        #[arg(long)]
        vmhad_log: Option<String>,
        /// Copy every host's daemon logs (vmhad's included) into this directory before the lab goes down.
        #[arg(long)]
        logs: Option<PathBuf>,
        /// Leave the lab running at the end (to look at its vmhads; `vmha-lab --lab NAME down` tears it
        /// down).
        #[arg(long)]
        keep: bool,
    },
    /// `vmha what-if --n-plus-one` on a generated file-backed CIB (32 hosts, 2000 VMs; no lab), sides alternating.
    Whatif(whatif::WhatifArgs),
    /// Disaster recovery between two sites: switchover time, and RPO and RTO when a site is lost while
    /// `vmha site replicate --every` runs and the guest writes. Brings up two sites and booth's arbitrator.
    Site(site::SiteArgs),
    /// vmhad's memory (RSS from /proc) freshly started and idle, after --jobs jobs of each kind (VM stop +
    /// start, live move, guest request) and after settling. Brings up its own lab.
    Memory {
        #[arg(long, default_value_t = 100)]
        jobs: usize,
        /// Seconds to wait after the soak before the last reading.
        #[arg(long, default_value_t = 30)]
        settle: u64,
        /// 3 jobs of each kind, 5 s settling: proves the bench works, measures nothing.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        lab: LabArgs,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// (internal, runs inside a lab host) Makes --count CIB changes and times each until vmhad publishes
    /// it; prints the figures as JSON.
    #[command(hide = true)]
    CibChanges {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        vms: usize,
    },
    /// (internal, runs inside a lab host) Runs each side's actions in turn and prints the samples as JSON.
    #[command(hide = true)]
    Measure {
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Actions run in this order for each side in each round (e.g. monitor, or start,stop).
        #[arg(long, value_delimiter = ',')]
        actions: Vec<String>,
        /// The sides, as JSON (a list of {label, program, env}); they alternate within each round.
        #[arg(long)]
        sides: String,
    },
    /// (internal, runs inside a lab host) Sends guest-ping to a domain's guest agent over one libvirt
    /// connection about every millisecond until stdin closes; prints the answers' monotonic times as JSON.
    #[command(hide = true)]
    PingLoop {
        #[arg(long)]
        domain: String,
    },
    /// (internal, runs inside a lab host) Opens the host end of a domain's serial console (its pty),
    /// starts `vmha-guest --tick-to /dev/ttyS0` in the guest through its guest agent and times every
    /// `vmha-tick` line as it arrives, until stdin closes; prints the arrivals as JSON.
    #[command(hide = true)]
    TickReader {
        #[arg(long)]
        domain: String,
        /// How long the guest writes the stream (ms, by its clock).
        #[arg(long, default_value_t = 4000)]
        for_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Agents {
            runs,
            rounds,
            quick,
            lab,
            out,
        } => {
            let (runs, rounds) = if quick { (3, 1) } else { (runs, rounds) };
            // Longer than the DC's full re-read of every VM's definition (every 300 s) unless quick.
            let rest = Duration::from_secs(if quick { 5 } else { 310 });
            agents(runs, rounds, rest, &lab, out)
        }
        Cmd::Clone {
            rounds,
            quick,
            lab,
            out,
        } => clone::run(
            if quick { 1 } else { rounds },
            quick,
            &lab.config("bclone", "10.213.3"),
            out,
        ),
        Cmd::Failover {
            rounds,
            quick,
            failures,
            labs,
            subnets,
            out,
        } => {
            if labs.len() != 2 || subnets.len() != 2 {
                eprintln!("vmha-bench: --labs and --subnets take two values each");
                return ExitCode::FAILURE;
            }
            let (a, b) = failover::configs((&labs[0], &subnets[0]), (&labs[1], &subnets[1]));
            failover::run(if quick { 1 } else { rounds }, quick, &failures, &a, &b, out)
        }
        Cmd::Scale {
            hosts,
            vms,
            changes,
            runs,
            quick,
            lab,
            out,
            vmhad_log,
            logs,
            keep,
        } => {
            let (hosts, vms, changes, runs) = if quick {
                (8, 200, 10, 2)
            } else {
                (hosts, vms, changes, runs)
            };
            let diag = scale::Diagnostics { vmhad_log, logs, keep };
            scale::run(
                hosts,
                vms,
                changes,
                runs,
                &lab.config("bscale", "10.213.20"),
                out,
                &diag,
            )
        }
        Cmd::Memory {
            jobs,
            settle,
            quick,
            lab,
            out,
        } => {
            let (jobs, settle) = if quick { (3, 5) } else { (jobs, settle) };
            memory::run(jobs, Duration::from_secs(settle), &lab.config("bmem", "10.213.21"), out)
        }
        Cmd::Whatif(args) => whatif::run(args),
        Cmd::Site(args) => site::run(args),
        Cmd::CibChanges { pid, count, vms } => scale::cib_changes(pid, count, vms),
        Cmd::Measure { runs, actions, sides } => measure_cmd(runs, &actions, &sides),
        Cmd::PingLoop { domain } => clone::ping_loop(&domain),
        Cmd::TickReader { domain, for_ms } => clone::tick_reader(&domain, for_ms),
        Cmd::Vcluster {
            vms,
            rounds,
            disk_mib,
            quick,
            dir,
            vmhad,
            lab,
            out,
        } => {
            let (vms, rounds, disk_mib) = if quick { (5, 1, 16) } else { (vms, rounds, disk_mib) };
            if vmhad {
                vcluster_lab::run(vms, rounds, disk_mib, &lab.config("bvcl", "10.213.23"), out)
            } else {
                vcluster::run(vms, rounds, disk_mib, dir, out)
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Waits until every host's vmhad has read the cluster (`vmha status` no longer says it is connecting).
pub(crate) fn wait_vmhad_ready(lab: &Lab) -> Result<()> {
    vmha_lab::wait_for(
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
    )
}

/// Brings up the lab of `cfg` with this build installed in every host and vmhad running on each (the
/// benches that measure vmha through vmhad).
pub(crate) fn lab_with_vmhad(cfg: &LabConfig) -> Result<Lab> {
    let lab = Lab::up(cfg.clone())?;
    let build = target_binary("vmhad")?
        .parent()
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| anyhow!("no build directory"))?;
    lab.install_build(&build)?;
    for n in lab.cfg.host_numbers() {
        lab.start_vmhad(n)?;
    }
    Ok(lab)
}

fn measure_cmd(runs: usize, actions: &[String], sides: &str) -> Result<()> {
    let sides: Vec<Side> = serde_json::from_str(sides)?;
    let libvirtd = libvirtd_pid();
    let mut samples = Vec::new();
    for _ in 0..runs {
        for side in &sides {
            for action in actions {
                samples.push(run_once(side, action, libvirtd)?);
            }
        }
    }
    println!("{}", serde_json::to_string(&samples)?);
    Ok(())
}

/// OCF environment for a direct agent call on domain `vm` (`env` arguments).
fn ocf_env(vm: &str, config: &str, timeout_ms: u32, extra: &[(&str, String)]) -> Vec<String> {
    let mut env = vec![
        "env".to_string(),
        "OCF_ROOT=/usr/lib/ocf".into(),
        format!("OCF_RESOURCE_INSTANCE={vm}"),
        format!("OCF_RESKEY_config={config}"),
        "OCF_RESKEY_hypervisor=qemu:///system".into(),
        "OCF_RESKEY_migration_transport=tcp".into(),
        "OCF_RESKEY_force_stop=true".into(),
        format!("OCF_RESKEY_CRM_meta_timeout={timeout_ms}"),
    ];
    env.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    env
}

/// Runs `vmha-bench measure` inside host `n` and returns its samples.
fn measure_in(lab: &Lab, n: u8, env: &[String], runs: usize, actions: &str, sides: &[Side]) -> Result<Vec<Sample>> {
    let me = std::env::current_exe()?;
    let me = me.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let runs = runs.to_string();
    let sides = serde_json::to_string(sides)?;
    let mut args: Vec<&str> = env.iter().map(String::as_str).collect();
    args.extend([me, "measure", "--runs", &runs, "--actions", actions, "--sides", &sides]);
    let out = lab.exec_with_deadline(n, &args, Duration::from_secs(1800))?;
    if !out.status.success() {
        bail!("measure on host {n}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The samples of one side's action.
fn of<'a>(samples: &'a [Sample], label: &str, action: &str) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.label == label && s.action == action)
        .collect()
}

/// libvirtd's CPU per call: its CPU time over all of the side's calls, divided by the calls.
fn libvirtd_per_call(s: &[&Sample]) -> Option<f64> {
    let v: Vec<f64> = s.iter().filter_map(|s| s.libvirtd_ms).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn exit_codes(s: &[&Sample]) -> Vec<i32> {
    let mut rcs: Vec<i32> = s.iter().map(|s| s.rc).collect();
    rcs.sort_unstable();
    rcs.dedup();
    rcs
}

fn fmt_opt(x: Option<f64>, unit: &str) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{x:.1}{unit}"))
}

const VM: &str = "VirtualMachine";
const VD: &str = "VirtualDomain defaults";
const VD_OFF: &str = "VirtualDomain utilization off";

fn agents(runs: usize, rounds: usize, rest: Duration, lab_args: &LabArgs, out: Option<PathBuf>) -> Result<()> {
    vmha_lab::init_logging();
    let cfg = lab_args.config("bench", "10.213.2");
    let run = Run::start(&cfg.shared_dir());
    let lab = Lab::up(cfg)?;
    let build = target_binary("vmha-ocf-virtualmachine")?;
    lab.install_build(build.parent().ok_or_else(|| anyhow!("no build directory"))?)?;
    let sides = [
        Side::new(VM, VIRTUAL_MACHINE, &[]),
        Side::new(VD, VIRTUAL_DOMAIN, &[]),
        Side::new(
            VD_OFF,
            VIRTUAL_DOMAIN,
            &[
                ("OCF_RESKEY_autoset_utilization_cpu", "false"),
                ("OCF_RESKEY_autoset_utilization_hv_memory", "false"),
            ],
        ),
    ];
    let mut r = String::new();
    let _ = writeln!(
        r,
        "Lab: 3 hosts in namespaces, TCG guest of 128 MiB, Debian 12 packages. Sides: **{VM}** \
         (`ocf:vmha:VirtualMachine`), **{VD}** (`ocf:heartbeat:VirtualDomain` as shipped, which also \
         updates the resource's cpu and hv_memory utilization in the CIB on every monitor: work vmha leaves \
         to vmhad), **{VD_OFF}** (VirtualDomain with `autoset_utilization_cpu=false \
         autoset_utilization_hv_memory=false`: like for like). All run against the same VM (a cluster \
         resource put in maintenance, so Pacemaker runs no monitor of its own meanwhile) on the same host.\n\n\
         Wall time: the bench's monotonic clock around the agent process (independent of the agents). CPU: \
         user + system of the agent and every process it ran (wait4). libvirtd CPU: utime + stime of the \
         host's libvirtd from /proc/<pid>/stat before and after each call, summed over the side's calls and \
         divided by the calls (clock ticks of 10 ms, so only the mean over many calls means anything).\n"
    );

    // The VM: a cluster resource under vmha's agent, then in maintenance (no recurring monitor).
    lab.add_vm(&GuestSpec::new("bench1"), VmAgent::Vmha)?;
    let host = wait_for(
        "bench1 running",
        Duration::from_secs(120),
        Duration::from_millis(250),
        || {
            let s = lab.status_from_any().ok()?;
            lab.cfg.host_number(s.running_on("bench1")?)
        },
    )?;
    lab.exec_ok(
        host,
        &[
            "crm_resource",
            "--resource",
            "bench1",
            "--meta",
            "--set-parameter",
            "maintenance",
            "--parameter-value",
            "true",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let config = lab.cfg.shared_dir().join("bench1.xml").display().to_string();

    // Monitor: A B C floor, A B C floor, ...
    let env = ocf_env(
        "bench1",
        &config,
        30000,
        &[("OCF_RESKEY_CRM_meta_interval", "10000".into())],
    );
    let mut with_floor = sides.to_vec();
    with_floor.push(Side::new("/bin/true", "/bin/true", &[]));
    let samples = measure_in(&lab, host, &env, runs, "monitor", &with_floor)?;
    let _ = writeln!(
        r,
        "## monitor of a running VM ({runs} calls per side, alternating {VM}, {VD}, {VD_OFF}, /bin/true)\n"
    );
    let _ = writeln!(
        r,
        "| side | wall ms | CPU ms (agent + children) | libvirtd CPU ms per call | exit codes |\n|---|---|---|---|---|"
    );
    for side in &with_floor {
        let s = of(&samples, &side.label, "monitor");
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {:?} |",
            side.label,
            cell(&s.iter().map(|s| s.wall_ms).collect::<Vec<_>>(), 1, ""),
            cell(&s.iter().map(|s| s.cpu_ms).collect::<Vec<_>>(), 1, ""),
            fmt_opt(libvirtd_per_call(&s), ""),
            exit_codes(&s)
        );
    }
    let vm = of(&samples, VM, "monitor");
    if exit_codes(&vm) != [0] {
        bail!(
            "VirtualMachine monitor did not return 0 on a running VM: {:?}",
            exit_codes(&vm)
        );
    }
    let med = |s: &[&Sample], f: fn(&Sample) -> f64| median(&s.iter().map(|x| f(x)).collect::<Vec<_>>());
    // What VirtualDomain's utilization updates add to each of its monitors: its defaults less like for like.
    let vd_utilization = (
        med(&of(&samples, VD, "monitor"), |s| s.cpu_ms) - med(&of(&samples, VD_OFF, "monitor"), |s| s.cpu_ms),
        libvirtd_per_call(&of(&samples, VD, "monitor"))
            .zip(libvirtd_per_call(&of(&samples, VD_OFF, "monitor")))
            .map(|(a, b)| a - b),
    );
    let _ = writeln!(
        r,
        "\n| ratio of medians | wall | CPU | libvirtd CPU per call | goal: VirtualMachine at least 8x less wall |\n|---|---|---|---|---|"
    );
    for (other, what) in [(VD, "vs defaults"), (VD_OFF, "like for like")] {
        let o = of(&samples, other, "monitor");
        let w = med(&o, |s| s.wall_ms) / med(&vm, |s| s.wall_ms);
        let c = med(&o, |s| s.cpu_ms) / med(&vm, |s| s.cpu_ms);
        let l = libvirtd_per_call(&o)
            .zip(libvirtd_per_call(&vm))
            .map(|(a, b)| {
                if b > 0.0 {
                    format!("{:.1}x", a / b)
                } else {
                    format!("{a:.1} ms vs 0")
                }
            })
            .unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            r,
            "| {other} / {VM} ({what}) | {w:.1}x | {c:.1}x | {l} | {} |",
            verdict(w >= 8.0)
        );
    }
    let _ = writeln!(
        r,
        "\nBaselines (shared/docs/baselines.md, other runs): VirtualDomain monitor with defaults 146 / 183 / 206 ms \
         wall (min / median / max), utilization off 65 / 73 / 88 ms; side by side on this machine kind 87-91 ms \
         (off) and 164-180 ms (defaults); libvirtd ~10-12 ms CPU per VirtualDomain monitor.\n"
    );

    // Lifecycle on the same VM: per round, each side in turn (order rotated every round): stop and start
    // on the host, live migration to another host and back (migrate_to on the source + migrate_from on
    // the target).
    let target = lab.other_host(host).ok_or_else(|| anyhow!("no second host"))?;
    let mut life: Vec<Sample> = Vec::new();
    let mut migrations: Vec<(String, f64)> = Vec::new();
    for round in 0..rounds {
        for k in 0..sides.len() {
            let side = &sides[(round + k) % sides.len()];
            let one = std::slice::from_ref(side);
            let env = ocf_env("bench1", &config, 90000, &[]);
            for action in ["stop", "start"] {
                let s = measure_in(&lab, host, &env, 1, action, one)?;
                if s[0].rc != 0 {
                    bail!("{} {action} returned {}", side.label, s[0].rc);
                }
                life.extend(s);
            }
            for (from, to) in [(host, target), (target, host)] {
                let extra = [
                    ("OCF_RESKEY_CRM_meta_migrate_source", lab.cfg.host_name(from)),
                    ("OCF_RESKEY_CRM_meta_migrate_target", lab.cfg.host_name(to)),
                ];
                let env = ocf_env("bench1", &config, 120000, &extra);
                let a = measure_in(&lab, from, &env, 1, "migrate_to", one)?;
                let b = measure_in(&lab, to, &env, 1, "migrate_from", one)?;
                if a[0].rc != 0 || b[0].rc != 0 {
                    bail!(
                        "{} migration {from}->{to} failed: migrate_to rc {}, migrate_from rc {}",
                        side.label,
                        a[0].rc,
                        b[0].rc
                    );
                }
                migrations.push((side.label.clone(), a[0].wall_ms + b[0].wall_ms));
            }
        }
    }
    let _ = writeln!(
        r,
        "## stop, start and live migration ({rounds} rounds; in each round every side in turn, the order \
         rotated each round: stop + start on the host, then migrate_to + migrate_from to another host and back)\n"
    );
    let _ = writeln!(
        r,
        "| side | stop ms | start ms | migration ms (migrate_to + migrate_from) | libvirtd CPU ms per stop / start |\n|---|---|---|---|---|"
    );
    let wall = |l: &str, a: &str| of(&life, l, a).iter().map(|s| s.wall_ms).collect::<Vec<_>>();
    let mig = |l: &str| {
        migrations
            .iter()
            .filter(|(x, _)| x == l)
            .map(|(_, w)| *w)
            .collect::<Vec<_>>()
    };
    for side in &sides {
        let l = &side.label;
        let _ = writeln!(
            r,
            "| {l} | {} | {} | {} | {} / {} |",
            cell(&wall(l, "stop"), 0, ""),
            cell(&wall(l, "start"), 0, ""),
            cell(&mig(l), 0, ""),
            fmt_opt(libvirtd_per_call(&of(&life, l, "stop")), ""),
            fmt_opt(libvirtd_per_call(&of(&life, l, "start")), ""),
        );
    }
    let _ = writeln!(
        r,
        "\n| ratio of medians | stop | start | migration |\n|---|---|---|---|"
    );
    for (other, what) in [(VD, "vs defaults"), (VD_OFF, "like for like")] {
        let q = |a: &str| median(&wall(other, a)) / median(&wall(VM, a));
        let _ = writeln!(
            r,
            "| {other} / {VM} ({what}) | {:.2}x | {:.2}x | {:.2}x |",
            q("stop"),
            q("start"),
            median(&mig(other)) / median(&mig(VM))
        );
    }
    let _ = writeln!(
        r,
        "\nBaselines (lab.md, other runs): VirtualDomain start 842 ms; migrate_to 1.06 s; live migration \
         through Pacemaker 2.1-2.7 s. No goal is set for stop, start or migration."
    );

    // Keeping utilization: VirtualDomain's defaults do it in every monitor; vmha leaves it to vmhad, which
    // sets a VM's cpu and hv_memory from its definition when the CIB entry changes and, on the DC, re-reads
    // every VM's definition every 300 s. vmhad's CPU at rest (no request, no CIB change of ours) over a
    // window longer than that re-read is an upper bound of what keeping utilization costs it.
    // vmhad starts only now, so that it took no CPU from the agents' calls above; the window starts once
    // every vmhad shows the VM (its start-up work done).
    let hosts: Vec<u8> = lab.cfg.host_numbers().collect();
    for &n in &hosts {
        lab.start_vmhad(n)?;
    }
    wait_for(
        "every vmhad to show bench1",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            hosts
                .iter()
                .all(|&n| {
                    lab.exec(n, &["vmha", "--output", "json", "status"])
                        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"bench1\""))
                })
                .then_some(())
        },
    )?;
    let cpu_now = |n: u8| scale::vmhad_usage(&lab, n).map(|(_, _, cpu)| cpu);
    let before = hosts.iter().map(|&n| cpu_now(n)).collect::<Result<Vec<_>>>()?;
    let at = Instant::now();
    std::thread::sleep(rest);
    let after = hosts.iter().map(|&n| cpu_now(n)).collect::<Result<Vec<_>>>()?;
    let secs = at.elapsed().as_secs_f64();
    let per_hour: Vec<String> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| format!("{:.1}", (a - b) / 1000.0 * 3600.0 / secs))
        .collect();
    let (vd_cpu, vd_libvirtd) = vd_utilization;
    let _ = writeln!(
        r,
        "\n## keeping utilization, CPU per hour\n\n| who | CPU s per hour | how measured |\n|---|---|---|\n| vmhad at rest, the whole daemon (hosts {}) | {} | utime + stime of each host's vmhad over {secs:.0} s \
         with the VM running (in maintenance: its monitors would be the agent's CPU, not vmhad's) and nothing \
         asked of vmhad; includes the DC's re-read of every VM's definition (every 300 s) and everything else \
         vmhad does at rest: an upper bound for the utilization work, for the whole cluster, not per VM |\n| {VD}'s utilization updates, per VM at a 10 s monitor interval | {:.1} (agent and children) + {} (libvirtd) | \
         360 monitors an hour times the difference of the medians above: {VD} less {VD_OFF}, {vd_cpu:.1} ms \
         CPU per monitor, libvirtd {} ms |\n",
        hosts.iter().map(u8::to_string).collect::<Vec<_>>().join(", "),
        per_hour.join(", "),
        vd_cpu * 360.0 / 1000.0,
        vd_libvirtd.map_or("n/a".into(), |l| format!("{:.1}", l * 360.0 / 1000.0)),
        vd_libvirtd.map_or("n/a".into(), |l| format!("{l:.1}")),
    );

    let report = run.finish("ocf:vmha:VirtualMachine vs ocf:heartbeat:VirtualDomain", &r);
    drop(lab);
    report::emit(&report, out.as_deref())
}
