//! `vmha-bench whatif`: the wall time of the real `vmha what-if --n-plus-one` on a file-backed CIB of the
//! scale bench's size (no lab, no daemons): `hosts` nodes of which `online` are up and the rest recorded
//! as cleanly down, `vms` VM primitives as `vmha vm add` writes them (stopped, cpu 1 and hv_memory 128),
//! a fence device, and the scale bench's no-probe constraints. `running` of the VMs can be made to run
//! (start history on the online hosts, spread evenly) so that each failure moves VMs.
//!
//! Each side is a `vmha` binary run with `CIB_file` naming the generated CIB (libcib's file-backed CIB,
//! opened read-only), timed by this process's monotonic clock around the process, its CPU (user + system
//! of the process and its scheduler children) by `getrusage(RUSAGE_CHILDREN)`; sides alternate in every
//! round. With a baseline side (e.g. a build of the previous revision), the JSON answers of both sides are
//! compared in every round: the bench fails when they differ.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::sys::resource::{getrusage, UsageWho};

use crate::report::{cell, median, verdict, Run};

/// The goal of issue 17: what-if --n-plus-one at 32 hosts and 2000 VMs within 2 s.
const GOAL_MS: f64 = 2000.0;

#[derive(Args, Debug)]
pub struct WhatifArgs {
    /// Nodes in the CIB.
    #[arg(long, default_value_t = 32)]
    hosts: usize,
    /// Of them online (the others offline, cleanly down).
    #[arg(long, default_value_t = 3)]
    online: usize,
    #[arg(long, default_value_t = 2000)]
    vms: usize,
    /// VMs running (spread over the online hosts); the others are stopped.
    #[arg(long, default_value_t = 0)]
    running: usize,
    /// Rounds (each runs every side once, alternating).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// The vmha binary measured.
    #[arg(long, default_value = "target/release/vmha")]
    vmha: PathBuf,
    /// A second vmha binary run beside it (e.g. the previous revision's), whose answers must be the same.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The fence device's monitor failed once on host 1 (a fail count in the status section, as real
    /// clusters often carry one): the scheduler must then check migration thresholds.
    #[arg(long)]
    fence_fail_count: bool,
    /// 8 hosts, 200 VMs, 1 round: proves the bench works, measures nothing.
    #[arg(long)]
    quick: bool,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn vm_name(i: usize) -> String {
    format!("sv{i:04}")
}

fn host_name(i: usize) -> String {
    format!("host{i}")
}

/// The CIB: see the module's description. The status section has a `node_state` for every node (members
/// for the online ones, cleanly down for the others, as the scale bench records them).
pub fn cib(hosts: usize, online: usize, vms: usize, running: usize, fence_fail_count: bool) -> Result<String> {
    let mut nodes = String::new();
    let mut states = String::new();
    for i in 1..=hosts {
        let (id, name) = if i <= online {
            (i, host_name(i))
        } else {
            (100 + i, format!("node{i}"))
        };
        if i <= online {
            let _ = write!(
                nodes,
                r#"<node id="{id}" uname="{name}"><utilization id="nodes-{id}-utilization"><nvpair id="nodes-{id}-utilization-cpu" name="cpu" value="{}"/><nvpair id="nodes-{id}-utilization-hv_memory" name="hv_memory" value="{}"/></utilization></node>"#,
                vms.div_ceil(online.max(1)) + 8,
                (vms.div_ceil(online.max(1)) + 8) * 128
            );
            let mut ops = String::new();
            if i == 1 {
                ops.push_str(r#"<lrm_resource id="fence-lab" type="fence_vmha_lab" class="stonith"><lrm_rsc_op id="fence-lab_last_0" operation_key="fence-lab_start_0" operation="start" crm-debug-origin="do_update_resource" crm_feature_set="3.16.2" transition-key="1:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" transition-magic="0:0;1:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" exit-reason="" on_node="host1" call-id="6" rc-code="0" op-status="0" interval="0" last-rc-change="1765000000" exec-time="20" queue-time="0"/><lrm_rsc_op id="fence-lab_monitor_60000" operation_key="fence-lab_monitor_60000" operation="monitor" crm-debug-origin="do_update_resource" crm_feature_set="3.16.2" transition-key="2:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" transition-magic="0:0;2:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" exit-reason="" on_node="host1" call-id="7" rc-code="0" op-status="0" interval="60000" last-rc-change="1765000000" exec-time="10" queue-time="0"/></lrm_resource>"#);
            }
            for v in (0..running).filter(|v| v % online == i - 1) {
                let n = vm_name(v);
                let _ = write!(
                    ops,
                    r#"<lrm_resource id="{n}" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="{n}_last_0" operation_key="{n}_start_0" operation="start" crm-debug-origin="do_update_resource" crm_feature_set="3.16.2" transition-key="3:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" transition-magic="0:0;3:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" exit-reason="" on_node="{name}" call-id="{}" rc-code="0" op-status="0" interval="0" last-rc-change="1765000000" exec-time="500" queue-time="0"/></lrm_resource>"#,
                    10 + v
                );
            }
            let attrs = if i == 1 && fence_fail_count {
                r#"<nvpair id="status-1-fail-count-fence-lab.monitor_60000" name="fail-count-fence-lab#monitor_60000" value="1"/><nvpair id="status-1-last-failure-fence-lab.monitor_60000" name="last-failure-fence-lab#monitor_60000" value="1765000000"/>"#
            } else {
                ""
            };
            let _ = write!(
                states,
                r#"<node_state id="{id}" uname="{name}" in_ccm="true" crmd="online" crm-debug-origin="do_state_transition" join="member" expected="member"><transient_attributes id="{id}"><instance_attributes id="status-{id}">{attrs}</instance_attributes></transient_attributes><lrm id="{id}"><lrm_resources>{ops}</lrm_resources></lrm></node_state>"#
            );
        } else {
            let _ = write!(nodes, r#"<node id="{id}" uname="{name}"/>"#);
            let _ = write!(
                states,
                r#"<node_state id="{id}" uname="{name}" in_ccm="false" crmd="offline" crm-debug-origin="vmha-bench" join="down" expected="down"/>"#
            );
        }
    }
    let mut resources = String::from(
        r#"<primitive id="fence-lab" class="stonith" type="fence_vmha_lab"><operations><op id="fence-lab-monitor-interval-60s" name="monitor" interval="60s"/></operations></primitive>"#,
    );
    for v in 0..vms {
        let name = vm_name(v);
        resources.push_str(&vmha_model::change::vm_primitive(&vmha_model::change::NewVm {
            name: &name,
            config: &format!("/var/tmp/vmha-lab/bench/shared/domains/{name}.xml"),
            hypervisor: "qemu:///system",
            migration_transport: "tcp",
            cpu: 1,
            memory_mib: 128,
            start: v < running,
        })?);
    }
    let constraints: String = (1..=online)
        .map(|i| {
            format!(
                r#"<rsc_location id="bench-no-probe-{i}" rsc-pattern="^sv[0-9]+$" node="{}" score="0" resource-discovery="never"/>"#,
                host_name(i)
            )
        })
        .collect();
    Ok(format!(
        r#"<cib crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="100" num_updates="5" admin_epoch="0" cib-last-written="Sun Dec  6 03:00:00 2026" update-origin="host1" update-client="cibadmin" have-quorum="1" dc-uuid="1"><configuration><crm_config><cluster_property_set id="cib-bootstrap-options"><nvpair id="cib-bootstrap-options-have-watchdog" name="have-watchdog" value="false"/><nvpair id="cib-bootstrap-options-cluster-infrastructure" name="cluster-infrastructure" value="corosync"/><nvpair id="cib-bootstrap-options-cluster-name" name="cluster-name" value="bench"/><nvpair id="cib-bootstrap-options-stonith-enabled" name="stonith-enabled" value="true"/></cluster_property_set></crm_config><nodes>{nodes}</nodes><resources>{resources}</resources><constraints>{constraints}</constraints></configuration><status>{states}</status></cib>"#
    ))
}

fn children_cpu_ms() -> Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    Ok(ms(u.user_time()) + ms(u.system_time()))
}

/// One run of `vmha --output json what-if --n-plus-one` on the CIB file: wall ms, CPU ms, the answer.
fn run_once(vmha: &Path, cib_file: &Path) -> Result<(f64, f64, String)> {
    let cpu0 = children_cpu_ms()?;
    let t0 = Instant::now();
    let out = Command::new(vmha)
        .args(["--output", "json", "what-if", "--n-plus-one"])
        .env("CIB_file", cib_file)
        .env_remove("CIB_shadow")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", vmha.display()))?;
    let wall = t0.elapsed().as_secs_f64() * 1000.0;
    let cpu = children_cpu_ms()? - cpu0;
    if !out.status.success() {
        bail!(
            "{} what-if --n-plus-one failed ({}): {}",
            vmha.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((wall, cpu, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The failures and their VM outcomes of an answer, in short (for the report).
fn summary(answer: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(answer).context("the answer is not JSON")?;
    let failures = v["failures"].as_array().map(Vec::len).unwrap_or(0);
    let vms: usize = v["failures"]
        .as_array()
        .map(|f| f.iter().map(|p| p["vms"].as_array().map(Vec::len).unwrap_or(0)).sum())
        .unwrap_or(0);
    Ok(format!(
        "N+1 {}, {failures} failures, {vms} VM predictions in all",
        v["n_plus_one"]
    ))
}

pub fn run(args: WhatifArgs) -> Result<()> {
    let (hosts, vms, running, rounds) = if args.quick {
        (8, 200, args.running.min(200), 1)
    } else {
        (args.hosts, args.vms, args.running, args.rounds)
    };
    if args.online == 0 || args.online > hosts || running > vms {
        bail!("--online must be 1..=--hosts and --running at most --vms");
    }
    let dir = std::env::temp_dir().join(format!("vmha-bench-whatif-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let run = Run::start(&dir);
    let cib_file = dir.join("cib.xml");
    let text = cib(hosts, args.online, vms, running, args.fence_fail_count)?;
    std::fs::write(&cib_file, &text)?;
    let mut sides = vec![("this build", args.vmha.clone())];
    if let Some(b) = &args.baseline {
        sides.push(("baseline", b.clone()));
    }
    let mut wall: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut answer = String::new();
    let mut same = 0;
    let result = (|| -> Result<()> {
        for round in 0..rounds {
            let mut answers = Vec::new();
            // Alternating, and which side goes first alternates too.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..sides.len()).collect()
            } else {
                (0..sides.len()).rev().collect()
            };
            for i in order {
                let (w, c, a) = run_once(&sides[i].1, &cib_file)?;
                eprintln!("round {round}: {} {w:.0} ms wall, {c:.0} ms CPU", sides[i].0);
                wall[i].push(w);
                cpu[i].push(c);
                answers.push(a);
            }
            if answers.windows(2).any(|w| w[0] != w[1]) {
                bail!("round {round}: the sides' answers differ");
            }
            same += usize::from(answers.len() > 1);
            answer = answers.pop().unwrap_or_default();
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;

    let mut body = String::new();
    let _ = writeln!(
        body,
        "CIB: a file ({:.1} MB) of **{hosts} hosts** ({} online: node_state members; {} offline, recorded \
         as cleanly down as the scale bench records them) and **{vms} VMs** (`ocf:vmha:VirtualMachine` \
         primitives as `vmha vm add` writes them, cpu 1 and hv_memory 128; {running} running, spread over \
         the online hosts, the rest target-role=Stopped), a fence device on host 1{}, and the scale bench's \
         no-probe location constraints. No lab, no daemons: `vmha` reads it through libcib's file-backed \
         CIB (`CIB_file`, read-only).\n",
        text.len() as f64 / 1e6,
        if args.fence_fail_count {
            " (its monitor failed once there: a fail count in the status section)"
        } else {
            ""
        },
        args.online,
        hosts - args.online
    );
    let _ = writeln!(
        body,
        "How measured: `CIB_file=FILE vmha --output json what-if --n-plus-one`, {rounds} rounds, the sides \
         alternating (and which goes first alternating); wall time by the bench's monotonic clock around \
         the process, CPU as user + system of the process and its scheduler children (getrusage). Answer: {}.{}\n",
        summary(&answer)?,
        if sides.len() > 1 {
            format!(" The sides' JSON answers were byte-identical in all {same} rounds.")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        body,
        "| side | binary | wall, ms | CPU, ms | goal (wall) |\n|---|---|---|---|---|"
    );
    for (i, (label, path)) in sides.iter().enumerate() {
        let _ = writeln!(
            body,
            "| {label} | `{}` | {} | {} | <= {GOAL_MS:.0} ms: {} |",
            path.display(),
            cell(&wall[i], 0, ""),
            cell(&cpu[i], 0, ""),
            verdict(median(&wall[i]) <= GOAL_MS)
        );
    }
    let report = run.finish(
        &format!("What-if N+1 with {hosts} hosts and {vms} VMs in the CIB"),
        &body,
    );
    crate::report::emit(&report, args.out.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_cib_has_the_asked_size_and_state() {
        let text = cib(6, 2, 10, 4, true).unwrap();
        let view = vmha_model::ClusterView::from_cib(&text).unwrap();
        assert_eq!(view.hosts.len(), 6);
        assert_eq!(view.online_hosts(), vec!["host1", "host2"]);
        assert_eq!(view.vms.len(), 10);
        let running: Vec<&str> = view
            .vms
            .iter()
            .filter(|v| !v.hosts.is_empty())
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(running, vec!["sv0000", "sv0001", "sv0002", "sv0003"]);
        assert_eq!(view.vm("sv0001").unwrap().hosts, vec!["host2"]);
        assert!(cib(3, 1, 2, 0, false).unwrap().contains(r#"value="Stopped""#));
    }

    #[test]
    fn summary_reads_an_answer() {
        let a = r#"{"n_plus_one": true, "failures": [{"vms": [1, 2]}, {"vms": []}]}"#;
        assert_eq!(summary(a).unwrap(), "N+1 true, 2 failures, 2 VM predictions in all");
        assert!(summary("nope").is_err());
    }
}
