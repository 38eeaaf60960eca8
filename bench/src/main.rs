//! `vmha-bench`: measures vmha against the tools it replaces, on real daemons in the lab, and prints the
//! figures beside the baselines of `shared/docs/baselines.md`.

mod clone;
mod measure;
mod vcluster;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use measure::{run_once, spread, Sample};
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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// ocf:vmha:VirtualMachine against ocf:heartbeat:VirtualDomain on the same VM and host, alternating:
    /// monitor cost, start, stop and live migration. Brings up its own lab (torn down at the end).
    Agents {
        /// Monitor calls per agent.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Start/stop and migration rounds per agent.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Virtual clusters: capture and instantiate of the metadata of --vms VMs (file-backed CIBs) and of a
    /// disk image against this machine's own sequential copy, measured in the same run.
    Vcluster {
        #[arg(long, default_value_t = 50)]
        vms: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        /// Work directory (default /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Live clone (`vmha clone`) of a running 128 MiB guest: template stall and time to clone ready, per
    /// step, for 1 clone and for --count 8, beside the goals. Brings up its own lab (torn down at the end).
    Clone {
        /// Rounds per case.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also write the report (markdown) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// (internal, runs inside a lab host) Runs each agent's actions in turn and prints the samples as JSON.
    #[command(hide = true)]
    Measure {
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Actions run in this order for each agent in each round (e.g. monitor, or start,stop).
        #[arg(long, value_delimiter = ',')]
        actions: Vec<String>,
        /// LABEL=PROGRAM, repeated; the agents alternate within each round.
        #[arg(long = "agent")]
        agents: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Agents { runs, rounds, out } => agents(runs, rounds, out),
        Cmd::Clone { rounds, out } => clone::run(rounds, out),
        Cmd::Measure { runs, actions, agents } => measure_cmd(runs, &actions, &agents),
        Cmd::Vcluster {
            vms,
            rounds,
            disk_mib,
            dir,
            out,
        } => vcluster::run(vms, rounds, disk_mib, dir, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn measure_cmd(runs: usize, actions: &[String], agents: &[String]) -> Result<()> {
    let agents: Vec<(&str, &str)> = agents
        .iter()
        .map(|a| {
            a.split_once('=')
                .ok_or_else(|| anyhow!("--agent wants LABEL=PROGRAM, not {a:?}"))
        })
        .collect::<Result<_>>()?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        for (label, program) in &agents {
            for action in actions {
                samples.push(run_once(label, program, action)?);
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
fn measure_in(
    lab: &Lab,
    n: u8,
    env: &[String],
    runs: usize,
    actions: &str,
    agents: &[(&str, &str)],
) -> Result<Vec<Sample>> {
    let me = std::env::current_exe()?;
    let me = me.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let runs = runs.to_string();
    let agent_args: Vec<String> = agents.iter().map(|(l, p)| format!("--agent={l}={p}")).collect();
    let mut args: Vec<&str> = env.iter().map(String::as_str).collect();
    args.extend([me, "measure", "--runs", &runs, "--actions", actions]);
    args.extend(agent_args.iter().map(String::as_str));
    let out = lab.exec_with_deadline(n, &args, Duration::from_secs(1800))?;
    if !out.status.success() {
        bail!("measure on host {n}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// min / median / max of one figure.
type Spread = (f64, f64, f64);

/// Wall and CPU spreads of one agent's action, and the exit codes it returned.
fn row(samples: &[Sample], label: &str, action: &str) -> Option<(Spread, Spread, Vec<i32>)> {
    let s: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.label == label && s.action == action)
        .collect();
    if s.is_empty() {
        return None;
    }
    let mut rcs: Vec<i32> = s.iter().map(|s| s.rc).collect();
    rcs.sort_unstable();
    rcs.dedup();
    Some((
        spread(s.iter().map(|s| s.wall_ms).collect()),
        spread(s.iter().map(|s| s.cpu_ms).collect()),
        rcs,
    ))
}

fn fmt3((a, b, c): Spread) -> String {
    format!("{a:.1} / {b:.1} / {c:.1}")
}

fn agents(runs: usize, rounds: usize, out: Option<PathBuf>) -> Result<()> {
    vmha_lab::init_logging();
    let lab = Lab::up(LabConfig::new("bench", 3, "10.213.2"))?;
    let build = target_binary("vmha-ocf-virtualmachine")?;
    lab.install_build(build.parent().ok_or_else(|| anyhow!("no build directory"))?)?;
    let both = [("VirtualDomain", VIRTUAL_DOMAIN), ("VirtualMachine", VIRTUAL_MACHINE)];
    let mut report = String::new();
    let _ = writeln!(report, "# ocf:vmha:VirtualMachine vs ocf:heartbeat:VirtualDomain\n");
    let _ = writeln!(
        report,
        "Command: `vmha-bench agents --runs {runs} --rounds {rounds}` (lab: 3 hosts, TCG guests of 128 MiB, Debian 12 packages).\n\
         Figures are min / median / max in ms; CPU is user+system of the agent and every process it ran.\n"
    );

    // Monitor: the same running VM (a cluster resource under vmha's agent), the same host, alternating.
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
    let config = lab.cfg.shared_dir().join("bench1.xml").display().to_string();
    let env = ocf_env(
        "bench1",
        &config,
        30000,
        &[("OCF_RESKEY_CRM_meta_interval", "10000".into())],
    );
    let mut agents_and_floor = both.to_vec();
    agents_and_floor.push(("true", "/bin/true"));
    let samples = measure_in(&lab, host, &env, runs, "monitor", &agents_and_floor)?;
    let _ = writeln!(
        report,
        "## monitor of a running VM ({runs} calls each, alternating, same VM, same host)\n"
    );
    let _ = writeln!(report, "| agent | wall | CPU | exit codes |\n|---|---|---|---|");
    for (label, _) in &agents_and_floor {
        let (w, c, rc) = row(&samples, label, "monitor").ok_or_else(|| anyhow!("no samples for {label}"))?;
        let _ = writeln!(report, "| {label} | {} | {} | {rc:?} |", fmt3(w), fmt3(c));
    }
    let (vd_w, vd_c, _) = row(&samples, "VirtualDomain", "monitor").context("VirtualDomain samples")?;
    let (vm_w, vm_c, vm_rc) = row(&samples, "VirtualMachine", "monitor").context("VirtualMachine samples")?;
    if vm_rc != [0] {
        bail!("VirtualMachine monitor did not return 0 on a running VM: {vm_rc:?}");
    }
    let _ = writeln!(
        report,
        "\n**VirtualMachine is {:.1}x faster in wall time and uses {:.1}x less CPU than VirtualDomain** (medians; goal 8x).\n\
         Baseline (baselines.md): VirtualDomain monitor 146 / 183 / 206 wall, 138 / 177 / 191 CPU; one-shot C \
         connect+lookup+state 16 / 19 / 25 wall; /bin/true 2.0 / 2.1 / 3.1.\n",
        vd_w.1 / vm_w.1,
        vd_c.1 / vm_c.1
    );

    // Start and stop: a VM outside Pacemaker, each agent in turn on the same host.
    let spec = GuestSpec::new("bench2");
    let config2 = lab.write_domain_xml(&spec)?.display().to_string();
    let env2 = ocf_env("bench2", &config2, 90000, &[]);
    let samples = measure_in(&lab, host, &env2, rounds, "start,stop", &both)?;
    let _ = writeln!(
        report,
        "## start and stop ({rounds} rounds each, alternating; force_stop=true)\n"
    );
    let _ = writeln!(
        report,
        "| agent | action | wall | CPU | exit codes |\n|---|---|---|---|---|"
    );
    for (label, _) in &both {
        for action in ["start", "stop"] {
            let (w, c, rc) = row(&samples, label, action).ok_or_else(|| anyhow!("no {action} samples for {label}"))?;
            let _ = writeln!(report, "| {label} | {action} | {} | {} | {rc:?} |", fmt3(w), fmt3(c));
        }
    }
    let _ = writeln!(report, "\nBaseline (lab.md): VirtualDomain start 842 ms.\n");

    // Live migration: migrate_to on the source, then migrate_from on the target, there and back.
    let target = lab.other_host(host).ok_or_else(|| anyhow!("no second host"))?;
    let mut migrations: Vec<(String, f64)> = Vec::new();
    for (label, program) in &both {
        measure_in(&lab, host, &env2, 1, "start", &[(label, program)])?;
        for _ in 0..rounds {
            for (from, to) in [(host, target), (target, host)] {
                let extra = [
                    ("OCF_RESKEY_CRM_meta_migrate_source", lab.cfg.host_name(from)),
                    ("OCF_RESKEY_CRM_meta_migrate_target", lab.cfg.host_name(to)),
                ];
                let env = ocf_env("bench2", &config2, 120000, &extra);
                let a = measure_in(&lab, from, &env, 1, "migrate_to", &[(label, program)])?;
                let b = measure_in(&lab, to, &env, 1, "migrate_from", &[(label, program)])?;
                if a[0].rc != 0 || b[0].rc != 0 {
                    bail!(
                        "{label} migration {from}->{to} failed: migrate_to rc {}, migrate_from rc {}",
                        a[0].rc,
                        b[0].rc
                    );
                }
                migrations.push((label.to_string(), a[0].wall_ms + b[0].wall_ms));
            }
        }
        measure_in(&lab, host, &env2, 1, "stop", &[(label, program)])?;
    }
    let _ = writeln!(
        report,
        "## live migration, migrate_to + migrate_from ({} migrations each)\n",
        rounds * 2
    );
    let _ = writeln!(report, "| agent | wall |\n|---|---|");
    for (label, _) in &both {
        let w = spread(migrations.iter().filter(|(l, _)| l == label).map(|(_, w)| *w).collect());
        let _ = writeln!(report, "| {label} | {} |", fmt3(w));
    }
    let _ = writeln!(
        report,
        "\nBaseline (lab.md): live migration through Pacemaker 2.1-2.7 s (VirtualDomain migrate_to 1.06 s)."
    );

    print!("{report}");
    if let Some(out) = out {
        std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
