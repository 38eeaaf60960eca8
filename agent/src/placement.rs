//! `vmha policy set|show|apply` and `vmha what-if`: the placement policy (stored in the CIB, compiled by
//! `vmha_model::policy`) and Pacemaker's own scheduler run on a copy of the live CIB.
//!
//! These talk to this host's CIB manager directly through `vmha-pacemaker` (no vmhad needed), every call
//! with a deadline. The scheduler runs in a child process (`vmha` re-executed with a hidden subcommand that
//! calls libpacemaker's `pcmk_simulate`), killed when it overruns its deadline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use vmha_api::json::document;
use vmha_model::change::{self, NewVm};
use vmha_model::cib::HostState;
use vmha_model::domain::DomainSummary;
use vmha_model::policy::{self, history, Policy};
use vmha_model::whatif::{self, Prediction, VmOutcome};
use vmha_model::ClusterView;
use vmha_pacemaker::{Access, CallOptions, Cib, Scope};

/// Deadline of each CIB call.
const CIB_CALL: Duration = Duration::from_secs(15);
/// Largest policy document or domain XML read from a file.
const MAX_FILE: u64 = 1 << 20;

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Check a policy document (JSON) against the cluster and store it in the CIB (it takes effect with
    /// `vmha policy apply`).
    Set {
        /// The policy document (JSON); `-` reads stdin.
        file: PathBuf,
    },
    /// Print the stored policy and what applying it would change.
    Show,
    /// Compile the stored policy into Pacemaker's configuration and apply it in one CIB change. Each
    /// apply that changes the cluster is recorded in the policy history (who, when, what).
    Apply {
        /// Print the exact CIB difference and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The applied versions of the policy kept in the CIB (the newest 20): version, time, who, what.
    History,
    /// What changed between two applied versions (or between a version and the stored policy), member by
    /// member (JSON pointers).
    Diff {
        /// The older version.
        from: u32,
        /// The newer version; default: the stored policy.
        to: Option<u32>,
    },
    /// Go back to an applied version: shows what would change (as `apply --dry-run`), then stores and
    /// applies it in one CIB change and records it.
    Rollback {
        /// The version to go back to (`vmha policy history`).
        version: u32,
        /// Show what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct WhatIfArgs {
    /// Hosts that fail (comma-separated).
    #[arg(long, value_delimiter = ',')]
    fail: Vec<String>,
    /// Every host of this zone fails.
    #[arg(long)]
    fail_zone: Option<String>,
    /// A VM is added (its domain XML file, absolute path on storage every host sees).
    #[arg(long)]
    add_vm: Option<PathBuf>,
    /// For every single host failure: does every VM still have a place?
    #[arg(long)]
    n_plus_one: bool,
}

/// The hidden subcommand the what-if child runs.
#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// The CIB to schedule (a file).
    #[arg(long)]
    cib: PathBuf,
    /// Where to write the transition graph.
    #[arg(long)]
    graph: PathBuf,
}

fn read_bounded(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin().take(MAX_FILE).read_to_string(&mut text)?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .take(MAX_FILE)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(text)
}

async fn connect(access: Access) -> Result<Cib> {
    Cib::connect("vmha", access, CIB_CALL)
        .await
        .context("connecting to the CIB manager on this host (is Pacemaker running? are you root?)")
}

async fn query(cib: &Cib) -> Result<String> {
    cib.query_all(CIB_CALL).await.context("reading the CIB")
}

/// The policy stored in a CIB (an error naming the fix when there is none).
pub fn stored(xml: &str) -> Result<Policy> {
    Policy::from_cib(xml)
        .context("reading the stored policy")?
        .ok_or_else(|| anyhow!("no policy is stored (vmha policy set FILE)"))
}

/// `admin_epoch.epoch` of a CIB: what changes when its configuration changes.
fn config_version(xml: &str) -> Result<String> {
    let v = ClusterView::from_cib(xml)?.version;
    Ok(v.rsplit_once('.').map(|(a, _)| a.to_string()).unwrap_or(v))
}

pub async fn policy(cmd: PolicyCmd, json_out: bool) -> Result<()> {
    match cmd {
        PolicyCmd::Set { file } => {
            let p = Policy::from_json(&read_bounded(&file)?)?;
            let cib = connect(Access::ReadWrite).await?;
            let xml = query(&cib).await?;
            // Compiling checks it against the cluster: a policy that cannot be applied is not stored.
            let plan = policy::plan(&p, &xml)?;
            cib.modify(
                &Scope::section("crm_config"),
                &policy::store_xml(&p),
                CallOptions::CAN_CREATE,
                CIB_CALL,
            )
            .await
            .context("storing the policy in the CIB")?;
            if json_out {
                println!(
                    "{}",
                    document(
                        "policy_stored",
                        json!({"stored": true, "pending_changes": plan.changes.len()})
                    )
                );
            } else {
                println!(
                    "policy stored; {} change(s) pending (vmha policy apply [--dry-run])",
                    plan.changes.len()
                );
            }
        }
        PolicyCmd::Show => {
            let cib = connect(Access::ReadOnly).await?;
            let xml = query(&cib).await?;
            let p = stored(&xml)?;
            let plan = policy::plan(&p, &xml)?;
            if json_out {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&document("policy", json!({"policy": p, "plan": plan})))?
                );
            } else {
                println!("{}", p.to_json());
                if plan.is_empty() {
                    println!("# applied: the CIB carries this policy");
                } else {
                    println!("# not applied: {} change(s) pending", plan.changes.len());
                }
                for w in &plan.warnings {
                    println!("# warning: {w}");
                }
            }
        }
        PolicyCmd::Apply { dry_run } => apply(dry_run, json_out).await?,
        PolicyCmd::History => {
            let cib = connect(Access::ReadOnly).await?;
            let versions = history::versions(&query(&cib).await?)?;
            if json_out {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&document("policy_history", json!({ "versions": versions })))?
                );
            } else if versions.is_empty() {
                println!("no applied version recorded yet (vmha policy apply records one)");
            } else {
                println!("{:>7}  {:<20}  {:<24}  WHAT", "VERSION", "TIME", "WHO");
                for v in &versions {
                    println!(
                        "{:>7}  {:<20}  {:<24}  {}",
                        v.version,
                        v.time,
                        vmha_vcluster::printable(&v.who),
                        vmha_vcluster::printable(&v.note)
                    );
                }
            }
        }
        PolicyCmd::Diff { from, to } => {
            let cib = connect(Access::ReadOnly).await?;
            let xml = query(&cib).await?;
            let versions = history::versions(&xml)?;
            let find = |n: u32| -> Result<serde_json::Value> {
                versions
                    .iter()
                    .find(|v| v.version == n)
                    .map(|v| v.policy.clone())
                    .ok_or_else(|| anyhow!("policy version {n} is not kept (vmha policy history)"))
            };
            let a = find(from)?;
            let (b, to_name) = match to {
                Some(n) => (find(n)?, format!("version {n}")),
                None => (serde_json::to_value(stored(&xml)?)?, "the stored policy".to_string()),
            };
            let d = history::differences(&a, &b);
            if json_out {
                let changes: Vec<_> = d
                    .iter()
                    .map(|(path, old, new)| json!({"path": path, "from": old, "to": new}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&document(
                        "policy_diff",
                        json!({"from": from, "to": to, "changes": changes})
                    ))?
                );
            } else if d.is_empty() {
                println!("version {from} and {to_name} are the same policy");
            } else {
                let show = |v: &Option<serde_json::Value>| {
                    v.as_ref()
                        .map(|v| vmha_vcluster::printable(&v.to_string()))
                        .unwrap_or_else(|| "(absent)".into())
                };
                println!("from version {from} to {to_name}:");
                for (path, old, new) in &d {
                    println!("  {}: {} -> {}", vmha_vcluster::printable(path), show(old), show(new));
                }
            }
        }
        PolicyCmd::Rollback { version, dry_run } => rollback(version, dry_run, json_out).await?,
    }
    Ok(())
}

/// Who runs this command: `user@host`, with the sudo caller when there is one.
fn who() -> String {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "?".into());
    match std::env::var("SUDO_USER") {
        Ok(by) if !by.is_empty() && by != user => format!("{by} (sudo as {user})@{host}"),
        _ => format!("{user}@{host}"),
    }
}

/// Records `policy` as the newest applied version (and drops the oldest beyond the kept number). The
/// policy is applied already: a failure here is a warning, never an error of the apply.
async fn record(cib: &Cib, policy: &Policy, note: &str) {
    let result = async {
        let kept = history::versions(&query(cib).await?)?;
        let v = history::Version {
            version: history::next_version(&kept),
            time: crate::vcluster::now_rfc3339(),
            who: who(),
            note: note.to_string(),
            policy: serde_json::to_value(policy)?,
        };
        cib.modify(
            &Scope::section("crm_config"),
            &history::record_xml(&v),
            CallOptions::CAN_CREATE,
            CIB_CALL,
        )
        .await
        .context("recording the applied policy")?;
        for old in history::pruned(&kept, v.version) {
            cib.delete(&Scope::section("crm_config"), &old, CallOptions::NONE, CIB_CALL)
                .await
                .context("dropping the oldest recorded policy")?;
        }
        anyhow::Ok(v.version)
    }
    .await;
    match result {
        Ok(n) => tracing::info!(version = n, "policy version recorded"),
        Err(e) => eprintln!("vmha: warning: the policy is applied but not recorded in its history: {e:#}"),
    }
}

/// `vmha policy rollback`: version `n`'s policy, checked and shown against the cluster, then stored and
/// applied (unless `dry_run`) and recorded.
async fn rollback(n: u32, dry_run: bool, json_out: bool) -> Result<()> {
    let cib = connect(if dry_run { Access::ReadOnly } else { Access::ReadWrite }).await?;
    let xml = query(&cib).await?;
    let v = history::versions(&xml)?
        .into_iter()
        .find(|v| v.version == n)
        .ok_or_else(|| anyhow!("policy version {n} is not kept (vmha policy history)"))?;
    let p: Policy = serde_json::from_value(v.policy.clone())
        .map_err(|e| anyhow!("policy version {n} no longer reads as a policy: {e}"))?;
    // What-if first: the plan against today's cluster (refused when the old policy no longer fits it).
    let preview = policy::plan(&p, &xml).with_context(|| format!("policy version {n} against today's cluster"))?;
    let (plan, applied) = if dry_run {
        (preview, false)
    } else {
        if !json_out {
            print!("{}", preview.diff_text());
        }
        let plan = store_and_apply(&cib, &p).await?;
        record(&cib, &p, &format!("rollback to {n}")).await;
        let applied = !plan.is_empty();
        (plan, applied)
    };
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&document(
                "policy_rollback",
                json!({"version": n, "applied": applied, "dry_run": dry_run, "plan": plan})
            ))?
        );
    } else if dry_run {
        print!("{}", plan.diff_text());
        println!(
            "rolling back to version {n}: {} change(s) (dry run: nothing changed)",
            plan.changes.len()
        );
    } else {
        println!(
            "rolled back to version {n} ({} change(s) applied in one CIB change; stored and recorded)",
            plan.changes.len()
        );
    }
    Ok(())
}

async fn apply(dry_run: bool, json_out: bool) -> Result<()> {
    let cib = connect(if dry_run { Access::ReadOnly } else { Access::ReadWrite }).await?;
    let (plan, applied) = if dry_run {
        let xml = query(&cib).await?;
        (policy::plan(&stored(&xml)?, &xml)?, false)
    } else {
        let plan = apply_stored(&cib).await?;
        let applied = !plan.is_empty();
        if applied {
            let p = stored(&query(&cib).await?)?;
            record(&cib, &p, "apply").await;
        }
        (plan, applied)
    };
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&document(
                "policy_apply",
                json!({"applied": applied, "dry_run": dry_run, "plan": plan})
            ))?
        );
    } else {
        for w in &plan.warnings {
            eprintln!("vmha: warning: {w}");
        }
        if plan.is_empty() {
            println!("nothing to change: the CIB carries the policy");
        } else {
            print!("{}", plan.diff_text());
            println!(
                "{} change(s) {}",
                plan.changes.len(),
                if applied {
                    "applied in one CIB change"
                } else {
                    "(dry run: nothing changed)"
                }
            );
        }
    }
    Ok(())
}

/// Compiles the stored policy and replaces the configuration section with the result (one CIB change;
/// nothing when the CIB carries the policy already). Returns the plan it applied.
pub async fn apply_stored(cib: &Cib) -> Result<policy::Plan> {
    // A configuration change between our read and our replace would be lost: read again just before
    // replacing and start over when the configuration moved on.
    for _ in 0..5 {
        let xml = query(cib).await?;
        let plan = policy::plan(&stored(&xml)?, &xml)?;
        if plan.is_empty() {
            return Ok(plan);
        }
        let now = query(cib).await?;
        if config_version(&now)? != config_version(&xml)? {
            continue;
        }
        cib.replace(
            &Scope::section("configuration"),
            &plan.configuration,
            CallOptions::NONE,
            CIB_CALL,
        )
        .await
        .context("replacing the configuration section")?;
        return Ok(plan);
    }
    bail!("the CIB configuration kept changing while applying; try again")
}

/// Checks `p` against the cluster, stores it and applies it (see [`apply_stored`]).
pub async fn store_and_apply(cib: &Cib, p: &Policy) -> Result<policy::Plan> {
    let xml = query(cib).await?;
    policy::plan(p, &xml)?;
    cib.modify(
        &Scope::section("crm_config"),
        &policy::store_xml(p),
        CallOptions::CAN_CREATE,
        CIB_CALL,
    )
    .await
    .context("storing the policy in the CIB")?;
    apply_stored(cib).await
}

/// The CIB of this host (read-write) and the policy stored in it.
pub async fn load(access: Access) -> Result<(Cib, String, Policy)> {
    let cib = connect(access).await?;
    let xml = query(&cib).await?;
    let p = stored(&xml)?;
    Ok((cib, xml, p))
}

/// Reads the whole CIB again.
pub async fn reread(cib: &Cib) -> Result<String> {
    query(cib).await
}

/// The hidden child: runs Pacemaker's scheduler on the CIB file and writes the transition graph.
pub fn schedule(args: &ScheduleArgs) -> Result<()> {
    vmha_pacemaker::schedule_file(&args.cib, &args.graph)?;
    if !args.graph.is_file() {
        bail!("the scheduler wrote no transition graph");
    }
    Ok(())
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let base = std::env::temp_dir();
        for i in 0..100u32 {
            let dir = base.join(format!("vmha-what-if-{}-{i}", std::process::id()));
            // Private: the copy holds the whole CIB, resource parameters included.
            let created = {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().mode(0o700).create(&dir)
            };
            match created {
                Ok(()) => return Ok(Scratch(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
        }
        bail!("no scratch directory in {}", base.display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the scheduler on `copy` in a child process, within `limit`; returns the transition graph.
async fn run_scheduler(copy: &str, limit: Duration) -> Result<String> {
    let scratch = Scratch::new()?;
    let cib_path = scratch.0.join("cib.xml");
    let graph_path = scratch.0.join("graph.xml");
    std::fs::write(&cib_path, copy).with_context(|| format!("writing {}", cib_path.display()))?;
    let exe = std::env::current_exe().context("locating the vmha binary")?;
    let child = tokio::process::Command::new(exe)
        .arg("schedule-copy")
        .arg("--cib")
        .arg(&cib_path)
        .arg("--graph")
        .arg(&graph_path)
        .env_remove("CIB_shadow")
        .env("PCMK_debug", "no")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the scheduler child")?;
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r.context("waiting for the scheduler child")?,
        Err(_) => bail!(
            "Pacemaker's scheduler did not finish within {} s (killed)",
            limit.as_secs()
        ),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("the scheduler failed ({}): {last}", out.status);
    }
    std::fs::read_to_string(&graph_path).context("reading the transition graph")
}

async fn predict(live: &str, failed: &[String], add: Option<(&str, &str)>, limit: Duration) -> Result<Prediction> {
    let mut copy = whatif::fail_hosts(live, failed)?;
    if let Some((_, primitive)) = add {
        copy = whatif::add_resource(&copy, primitive)?;
    }
    // The free capacity the placement rules read, as vmhad keeps it, computed afresh for the copy.
    let copy = vmha_model::failover::with_free_capacity(&copy)?;
    let graph = run_scheduler(&copy, limit).await?;
    Ok(whatif::predict(live, &copy, &graph, failed, add.map(|(n, _)| n))?)
}

pub async fn what_if(args: WhatIfArgs, json_out: bool, limit: Duration) -> Result<()> {
    let xml = {
        let cib = connect(Access::ReadOnly).await?;
        query(&cib).await?
    };
    let view = ClusterView::from_cib(&xml)?;
    if args.n_plus_one {
        let mut reports = Vec::new();
        for host in view.hosts.iter().filter(|h| h.state == HostState::Online && !h.standby) {
            let p = predict(&xml, std::slice::from_ref(&host.name), None, limit).await?;
            reports.push(p);
        }
        let ok = reports.iter().all(|p| p.without_place().is_empty());
        if json_out {
            println!(
                "{}",
                serde_json::to_string_pretty(&document(
                    "what_if_n_plus_one",
                    json!({"n_plus_one": ok, "failures": reports})
                ))?
            );
        } else {
            for p in &reports {
                let lost = p.without_place();
                println!(
                    "{:<16} {}",
                    p.failed_hosts.join(","),
                    if lost.is_empty() {
                        "every VM keeps a place".to_string()
                    } else {
                        format!("no place for: {}", lost.join(", "))
                    }
                );
            }
            println!("N+1: {}", if ok { "yes" } else { "NO" });
        }
        return Ok(());
    }
    let (failed, added) = if let Some(zone) = &args.fail_zone {
        (whatif::hosts_in_zone(&xml, zone)?, None)
    } else if let Some(path) = &args.add_vm {
        if !path.is_absolute() {
            bail!("--add-vm {}: the domain XML path must be absolute", path.display());
        }
        let summary = DomainSummary::parse(&read_bounded(path)?)
            .with_context(|| format!("{} is not a usable domain XML", path.display()))?;
        let primitive = change::vm_primitive(&NewVm {
            name: &summary.name,
            config: path.to_str().ok_or_else(|| anyhow!("the path is not UTF-8"))?,
            hypervisor: "qemu:///system",
            migration_transport: "tcp",
            cpu: summary.vcpus,
            memory_mib: summary.memory_mib,
            start: true,
        })?;
        (Vec::new(), Some((summary.name, primitive)))
    } else {
        for h in &args.fail {
            if view.host(h).is_none() {
                bail!("host {h}: not a node of this cluster");
            }
        }
        (args.fail.clone(), None)
    };
    let p = predict(
        &xml,
        &failed,
        added.as_ref().map(|(n, x)| (n.as_str(), x.as_str())),
        limit,
    )
    .await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&document("what_if", &p))?);
    } else {
        print_prediction(&p);
    }
    Ok(())
}

fn print_prediction(p: &Prediction) {
    match (&p.added_vm, p.failed_hosts.is_empty()) {
        (Some(vm), _) => println!("what if {vm} is added:"),
        (None, false) => println!("what if {} fail(s):", p.failed_hosts.join(", ")),
        (None, true) => println!("what the scheduler would do now:"),
    }
    println!("{:<16} {:>8}  OUTCOME", "VM", "PRIORITY");
    for v in &p.vms {
        let what = match &v.outcome {
            VmOutcome::Stays { host } => format!("stays on {host}"),
            VmOutcome::Moves { from, to } => format!("moves {from} -> {to}"),
            VmOutcome::Stops { from } => format!("STOPS (was on {from}): no host has room"),
            VmOutcome::Starts { to } => format!("starts on {to}"),
            VmOutcome::StaysStopped => "STAYS STOPPED: no host has room".to_string(),
        };
        println!("{:<16} {:>8}  {what}", v.vm, v.priority);
        if !v.step_label.is_empty() && !matches!(v.outcome, VmOutcome::Stays { .. }) {
            println!("{:<16} {:>8}  ({})", "", "", vmha_vcluster::printable(&v.step_label));
        }
    }
    println!();
    println!("capacity left per zone (surviving hosts):");
    for z in &p.zones {
        let free: Vec<String> = z
            .free
            .iter()
            .map(|(k, v)| format!("{k} {v}/{}", z.capacity.get(k).copied().unwrap_or(0)))
            .collect();
        println!("  {:<16} [{}] {}", z.zone, z.hosts.join(","), free.join("  "));
    }
}
