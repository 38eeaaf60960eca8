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
    /// Compile the stored policy into Pacemaker's configuration and apply it in one CIB change, which also
    /// records it in the policy history (version, who, when): constraints, stored policy and history
    /// change together or not at all.
    Apply {
        /// Print the exact CIB difference and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The applied versions of the policy kept in the CIB (the newest 20): version, time (UTC), who, what.
    History,
    /// What changed between two applied versions (or between a version and the stored policy): a unified
    /// diff of the two policy documents (with --json: also member by member, as JSON pointers).
    Diff {
        /// The older version.
        from: u32,
        /// The newer version; default: the stored policy.
        to: Option<u32>,
    },
    /// Go back to an applied version: shows the what-if first (the policy's diff, the constraints'
    /// diff, and where Pacemaker's scheduler would move VMs), asks, then stores and applies version N in
    /// one CIB change, recorded as a new version "rollback to N". Refused, with nothing changed, when the
    /// configuration moves between the what-if and the change.
    Rollback {
        /// The version to go back to (`vmha policy history`).
        version: u32,
        /// Show what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask (needed when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
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
    /// A whole site is lost (its booth site address), asked at the site that would take over: as
    /// `vmha site what-if --lost SITE`.
    #[arg(long, value_name = "SITE", conflicts_with_all = ["fail", "fail_zone", "add_vm", "n_plus_one"])]
    pub fail_site: Option<String>,
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

pub async fn policy(cmd: PolicyCmd, json_out: bool, limit: Duration) -> Result<()> {
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
            let entries = history::entries(&query(&cib).await?)?;
            if json_out {
                let versions: Vec<_> = entries.iter().filter_map(|e| e.read.as_ref().ok()).collect();
                let broken: Vec<_> = entries
                    .iter()
                    .filter_map(|e| {
                        e.read
                            .as_ref()
                            .err()
                            .map(|err| json!({"id": e.id, "version": e.number, "error": err.to_string()}))
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&document(
                        "policy_history",
                        json!({ "versions": versions, "unreadable": broken })
                    ))?
                );
            } else if entries.is_empty() {
                println!("no applied version recorded yet (vmha policy apply records one)");
            } else {
                println!("{:>7}  {:<20}  {:<24}  WHAT", "VERSION", "TIME (UTC)", "WHO");
                for e in &entries {
                    match &e.read {
                        Ok(v) => println!(
                            "{:>7}  {:<20}  {:<24}  {}",
                            v.version,
                            v.time,
                            vmha_vcluster::printable(&v.who),
                            vmha_vcluster::printable(&v.note)
                        ),
                        Err(err) => println!(
                            "{:>7}  {:<20}  {:<24}  UNREADABLE: {}",
                            e.number.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                            "-",
                            "-",
                            vmha_vcluster::printable(&err.to_string())
                        ),
                    }
                }
            }
        }
        PolicyCmd::Diff { from, to } => {
            let cib = connect(Access::ReadOnly).await?;
            let xml = query(&cib).await?;
            let a = history::find(&xml, from)?.policy;
            let (b, to_name) = match to {
                Some(n) => (history::find(&xml, n)?.policy, format!("version {n}")),
                None => (serde_json::to_value(stored(&xml)?)?, "the stored policy".to_string()),
            };
            let from_name = format!("version {from}");
            let unified = history::unified_diff(&a, &b, &from_name, &to_name);
            if json_out {
                let changes: Vec<_> = history::differences(&a, &b)
                    .iter()
                    .map(|(path, old, new)| json!({"path": path, "from": old, "to": new}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&document(
                        "policy_diff",
                        json!({"from": from, "to": to, "changes": changes, "unified": unified})
                    ))?
                );
            } else if unified.is_empty() {
                println!("{from_name} and {to_name} are the same policy");
            } else {
                print!("{}", terminal_safe(&unified));
            }
        }
        PolicyCmd::Rollback { version, dry_run, yes } => rollback(version, dry_run, yes, json_out, limit).await?,
    }
    Ok(())
}

/// `text` for a terminal: control characters other than newlines and the bidirectional-text controls
/// shown as `\u{..}` escapes (a policy document may carry any text in its names).
fn terminal_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if (c.is_control() && c != '\n')
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            {
                format!("\\u{{{:x}}}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
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

/// Errors of applying a policy or rolling one back, beyond the model's own.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "the CIB configuration changed since the what-if was shown (version {shown}, now {now}): nothing \
         changed; run vmha policy rollback {version} again"
    )]
    MovedSinceShown { version: u32, shown: String, now: String },
    #[error("the CIB configuration kept changing while applying (5 tries): nothing changed; try again")]
    KeptChanging,
    #[error(
        "rollback to policy version {version} not confirmed: nothing changed (stdin is not a terminal; \
         pass --yes to roll back without asking)"
    )]
    NotConfirmed { version: u32 },
    #[error("rollback to policy version {version} declined: nothing changed")]
    Declined { version: u32 },
}

/// Which policy [`apply_policy`] applies.
enum Source<'a> {
    /// The one stored in the CIB (`vmha policy apply`).
    Stored,
    /// This one, stored with it (`vmha policy rollback`).
    Given(&'a Policy),
}

/// What [`apply_policy`] did.
struct Applied {
    plan: policy::Plan,
    /// The version recorded, when it changed the CIB.
    recorded: Option<u32>,
}

/// Applies a policy in one CIB change: the configuration section replaced by the compiled configuration,
/// with the policy stored and recorded in the history (who, when, `note`), so constraints, stored policy
/// and history change together or not at all. Nothing is written when the CIB carries the policy and
/// stores it already.
///
/// Concurrency: the configuration version is read again just before the replace, and the replace is
/// skipped (and everything recomputed, up to 5 times) when it moved; with `shown` (the version a what-if
/// was computed on) a move is an error instead, so what is applied is what was shown. Pacemaker offers
/// no conditional replace of a section, so a change landing between that last read and the replace is
/// overwritten; the history read back afterwards reports it.
async fn apply_policy(cib: &Cib, source: Source<'_>, note: &str, shown: Option<(u32, &str)>) -> Result<Applied> {
    for _ in 0..5 {
        let xml = query(cib).await?;
        let p = match source {
            Source::Stored => stored(&xml)?,
            Source::Given(p) => p.clone(),
        };
        let plan = policy::plan(&p, &xml)?;
        let already_stored = Policy::from_cib(&xml).ok().flatten().as_ref() == Some(&p);
        if plan.is_empty() && already_stored {
            return Ok(Applied { plan, recorded: None });
        }
        let before = config_version(&xml)?;
        if let Some((version, shown)) = shown {
            if before != shown {
                return Err(ApplyError::MovedSinceShown {
                    version,
                    shown: shown.to_string(),
                    now: before,
                }
                .into());
            }
        }
        let entries = history::entries(&xml)?;
        let v = history::Version {
            version: history::next_version(&entries),
            time: crate::vcluster::now_rfc3339(),
            who: who(),
            note: note.to_string(),
            policy: serde_json::to_value(&p)?,
        };
        let configuration = history::record(&plan.configuration, &p, &v)?;
        let now = config_version(&query(cib).await?)?;
        if now != before {
            if let Some((version, shown)) = shown {
                return Err(ApplyError::MovedSinceShown {
                    version,
                    shown: shown.to_string(),
                    now,
                }
                .into());
            }
            continue;
        }
        cib.replace(
            &Scope::section("configuration"),
            &configuration,
            CallOptions::NONE,
            CIB_CALL,
        )
        .await
        .context("replacing the configuration section (policy, its history and the constraints)")?;
        match history::find(&query(cib).await?, v.version) {
            Ok(back) if back == v => tracing::info!(version = v.version, "policy applied and recorded"),
            _ => eprintln!(
                "vmha: warning: another change to the CIB configuration landed with this one; check vmha \
                 policy history and vmha policy show"
            ),
        }
        return Ok(Applied {
            plan,
            recorded: Some(v.version),
        });
    }
    Err(ApplyError::KeptChanging.into())
}

/// The what-if of a configuration: Pacemaker's scheduler run on the live CIB with its configuration
/// section replaced, read as `vmha what-if` reads it.
async fn predict_configuration(live: &str, configuration: &str, limit: Duration) -> Result<Prediction> {
    predict_cib(live, &whatif::with_configuration(live, configuration)?, limit).await
}

/// Pacemaker's scheduler on `copy` (the live CIB `live` with an event applied, e.g. tickets granted by
/// `vmha site what-if`), its free capacity computed afresh as vmhad keeps it: what it would do to each VM.
pub async fn predict_cib(live: &str, copy: &str, limit: Duration) -> Result<Prediction> {
    let copy = vmha_model::failover::with_free_capacity(copy)?;
    let graph = run_scheduler(&whatif::scheduler_input(&copy)?, limit).await?;
    Ok(whatif::predict(live, &copy, &graph, &[], None)?)
}

/// Asks on the terminal whether to roll back; refuses when stdin is not one.
fn confirm(version: u32) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Read, Write};
    if !std::io::stdin().is_terminal() {
        return Err(ApplyError::NotConfirmed { version }.into());
    }
    eprint!("roll back to policy version {version}? [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().lock().take(64).read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(ApplyError::Declined { version }.into())
    }
}

/// `vmha policy rollback`: version `n`'s policy, checked against today's cluster and shown (what changes
/// in the policy, in the constraints, and where the scheduler would move VMs), then, confirmed, stored,
/// applied and recorded as "rollback to N" in one CIB change.
async fn rollback(n: u32, dry_run: bool, yes: bool, json_out: bool, limit: Duration) -> Result<()> {
    let cib = connect(if dry_run { Access::ReadOnly } else { Access::ReadWrite }).await?;
    let xml = query(&cib).await?;
    let v = history::find(&xml, n)?;
    let p = history::policy_of(&v)?;
    let shown = config_version(&xml)?;
    // What-if first: the plan against today's cluster (refused when the old policy no longer fits it).
    let preview = policy::plan(&p, &xml).with_context(|| format!("policy version {n} against today's cluster"))?;
    let current = Policy::from_cib(&xml).ok().flatten();
    let policy_diff = history::unified_diff(
        &current
            .as_ref()
            .map(serde_json::to_value)
            .transpose()?
            .unwrap_or(serde_json::Value::Null),
        &v.policy,
        "the stored policy",
        &format!("version {n}"),
    );
    let prediction = predict_configuration(&xml, &preview.configuration, limit).await?;
    let moves: Vec<&vmha_model::whatif::VmPrediction> = prediction
        .vms
        .iter()
        .filter(|v| !matches!(v.outcome, VmOutcome::Stays { .. } | VmOutcome::StaysStopped))
        .collect();
    if !json_out {
        print!("{}", terminal_safe(&policy_diff));
        print!("{}", preview.diff_text());
        if moves.is_empty() {
            println!("what-if: no VM would move, start or stop");
        } else {
            println!("what-if: the scheduler would then:");
            for m in &moves {
                println!("  {:<16} {}", m.vm, outcome_text(&m.outcome));
            }
        }
    }
    let applied = if dry_run {
        None
    } else {
        if !yes {
            confirm(n)?;
        }
        Some(apply_policy(&cib, Source::Given(&p), &format!("rollback to {n}"), Some((n, &shown))).await?)
    };
    let recorded = applied.as_ref().and_then(|a| a.recorded);
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&document(
                "policy_rollback",
                json!({
                    "version": n,
                    "applied": recorded.is_some(),
                    "recorded_as": recorded,
                    "dry_run": dry_run,
                    "plan": applied.as_ref().map(|a| &a.plan).unwrap_or(&preview),
                    "policy_diff": policy_diff,
                    "what_if": moves,
                })
            ))?
        );
    } else if dry_run {
        println!(
            "rolling back to version {n}: {} change(s) (dry run: nothing changed)",
            preview.changes.len()
        );
    } else if let Some(r) = recorded {
        println!(
            "rolled back to version {n}: {} change(s) applied with the policy in one CIB change, recorded as \
             version {r}",
            applied.as_ref().map(|a| a.plan.changes.len()).unwrap_or(0)
        );
    } else {
        println!("nothing to change: the CIB carries and stores version {n}'s policy already");
    }
    Ok(())
}

fn outcome_text(o: &VmOutcome) -> String {
    match o {
        VmOutcome::Stays { host } => format!("stays on {host}"),
        VmOutcome::Moves { from, to } => format!("moves {from} -> {to}"),
        VmOutcome::Stops { from } => format!("STOPS (was on {from}): no host has room"),
        VmOutcome::Starts { to } => format!("starts on {to}"),
        VmOutcome::StaysStopped => "STAYS STOPPED: no host has room".to_string(),
    }
}

async fn apply(dry_run: bool, json_out: bool) -> Result<()> {
    let cib = connect(if dry_run { Access::ReadOnly } else { Access::ReadWrite }).await?;
    let (plan, recorded) = if dry_run {
        let xml = query(&cib).await?;
        (policy::plan(&stored(&xml)?, &xml)?, None)
    } else {
        let a = apply_policy(&cib, Source::Stored, "apply", None).await?;
        (a.plan, a.recorded)
    };
    let applied = recorded.is_some();
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&document(
                "policy_apply",
                json!({"applied": applied, "recorded_as": recorded, "dry_run": dry_run, "plan": plan})
            ))?
        );
    } else {
        for w in &plan.warnings {
            eprintln!("vmha: warning: {w}");
        }
        if plan.is_empty() && !applied {
            println!("nothing to change: the CIB carries the policy");
        } else {
            print!("{}", plan.diff_text());
            match recorded {
                Some(r) => println!(
                    "{} change(s) applied in one CIB change, recorded as policy version {r}",
                    plan.changes.len()
                ),
                None => println!("{} change(s) (dry run: nothing changed)", plan.changes.len()),
            }
        }
    }
    Ok(())
}

/// Compiles the stored policy and replaces the configuration section with the result, recording it in
/// the policy history (one CIB change; nothing when the CIB carries the policy already). Returns the plan
/// it applied.
pub async fn apply_stored(cib: &Cib) -> Result<policy::Plan> {
    Ok(apply_policy(cib, Source::Stored, "apply", None).await?.plan)
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

/// One event's prediction: its copy of the live CIB, Pacemaker's scheduler on it in a child process, the
/// transition graph read.
pub(crate) async fn predict(
    events: &whatif::Events<'_>,
    failed: &[String],
    add: Option<(&str, &str)>,
    limit: Duration,
) -> Result<Prediction> {
    // The free capacity the placement rules read, as vmhad keeps it, is computed afresh for the copy.
    let copy = events.copy(failed, add.map(|(_, primitive)| primitive))?;
    let graph = run_scheduler(&whatif::scheduler_input(&copy)?, limit).await?;
    Ok(events.predict(&copy, &graph, failed, add.map(|(n, _)| n))?)
}

pub async fn what_if(args: WhatIfArgs, json_out: bool, limit: Duration) -> Result<()> {
    // `--fail-site` is the site takeover question: the CLI sends it to `site::what_if` (site builds on
    // placement's prediction, so placement never calls back into site).
    if args.fail_site.is_some() {
        anyhow::bail!("what_if: --fail-site is answered by site::what_if");
    }
    let xml = {
        let cib = connect(Access::ReadOnly).await?;
        query(&cib).await?
    };
    let events = whatif::Events::new(&xml)?;
    let view = events.view();
    if args.n_plus_one {
        use futures_util::{StreamExt, TryStreamExt};
        // One event per online host, each scheduler in a child process of its own (libpacemaker keeps
        // process-wide state: never two runs in one process at once), as many at a time as there are cores
        // and one more, which starts while the others' graphs are read. Reported in host order; the first
        // failure ends them all (the children still running are killed).
        let width = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
        let hosts: Vec<&str> = view
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Online && !h.standby)
            .map(|h| h.name.as_str())
            .collect();
        let events = &events;
        let reports: Vec<Prediction> = futures_util::stream::iter(hosts)
            .map(|h| async move { predict(events, &[h.to_string()], None, limit).await })
            .buffered(width)
            .try_collect()
            .await?;
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
        &events,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-host cluster with two VMs. No crm_feature_set: libcib refuses to change a CIB whose feature
    /// set is newer than its own (EPROTONOSUPPORT).
    const CIB: &str = r#"<cib admin_epoch="0" epoch="1" num_updates="0" validate-with="pacemaker-3.7" have-quorum="1" dc-uuid="1"><configuration><crm_config><cluster_property_set id="cib-bootstrap-options"><nvpair id="o1" name="stonith-enabled" value="false"/></cluster_property_set></crm_config><nodes><node id="1" uname="h1"/><node id="2" uname="h2"/></nodes><resources><primitive id="v" class="ocf" provider="vmha" type="VirtualMachine"/><primitive id="w" class="ocf" provider="vmha" type="VirtualMachine"/></resources><constraints/></configuration><status/></cib>"#;

    fn policy(v_zone: &str, v_priority: i32) -> Policy {
        Policy::from_json(&format!(
            r#"{{"hosts": {{"h1": {{"zone": "a"}}, "h2": {{"zone": "b"}}}},
                "vms": {{"v": {{"zone": "{v_zone}", "priority": {v_priority}}}, "w": {{"zone": "b"}}}}}}"#
        ))
        .unwrap()
    }

    async fn store(cib: &Cib, p: &Policy) {
        cib.modify(
            &Scope::section("crm_config"),
            &policy::store_xml(p),
            CallOptions::CAN_CREATE,
            CIB_CALL,
        )
        .await
        .unwrap();
    }

    fn epoch(xml: &str) -> u64 {
        let v = config_version(xml).unwrap();
        v.rsplit_once('.').unwrap().1.parse().unwrap()
    }

    /// One test on one file-backed CIB (libcib keeps one such file per process): apply, history,
    /// rollback with its what-if version check, and broken entries.
    #[tokio::test]
    async fn apply_and_rollback_are_one_cib_change_each_recorded_and_checked() {
        let dir = std::env::temp_dir().join(format!("vmha-policy-history-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cib.xml");
        std::fs::write(&path, CIB).unwrap();
        let cib = Cib::open_file(&path, Access::ReadWrite, CIB_CALL).await.unwrap();

        // Apply: one CIB change (epoch + 1) carrying constraints, the stored policy and version 1.
        let p1 = policy("a", 10);
        store(&cib, &p1).await;
        let before = query(&cib).await.unwrap();
        let a = apply_policy(&cib, Source::Stored, "apply", None).await.unwrap();
        assert_eq!(a.recorded, Some(1));
        assert!(!a.plan.is_empty());
        let after1 = query(&cib).await.unwrap();
        assert_eq!(epoch(&after1), epoch(&before) + 1, "one CIB change");
        let v1 = history::find(&after1, 1).unwrap();
        assert_eq!(v1.note, "apply");
        assert_eq!(v1.who, who());
        assert!(v1.time.ends_with('Z'), "UTC: {}", v1.time);
        assert_eq!(history::policy_of(&v1).unwrap(), p1);
        assert!(
            after1.contains("vmha-policy-home-v"),
            "the constraints are in: {after1}"
        );

        // Applying again changes nothing and records nothing.
        let again = apply_policy(&cib, Source::Stored, "apply", None).await.unwrap();
        assert_eq!(again.recorded, None);
        assert_eq!(epoch(&query(&cib).await.unwrap()), epoch(&after1));

        // Version 2.
        let p2 = policy("b", 1);
        store(&cib, &p2).await;
        assert_eq!(
            apply_policy(&cib, Source::Stored, "apply", None)
                .await
                .unwrap()
                .recorded,
            Some(2)
        );
        let after2 = query(&cib).await.unwrap();

        // A rollback whose what-if was computed on another configuration version: refused, nothing
        // changed.
        let e = apply_policy(&cib, Source::Given(&p1), "rollback to 1", Some((1, "0.1")))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(
                e.downcast_ref::<ApplyError>(),
                Some(ApplyError::MovedSinceShown { version: 1, .. })
            ),
            "{e:#}"
        );
        assert_eq!(query(&cib).await.unwrap(), after2, "nothing changed");

        // The rollback as shown: version 1's constraints and policy, recorded as version 3, one change.
        let shown = config_version(&after2).unwrap();
        let r = apply_policy(&cib, Source::Given(&p1), "rollback to 1", Some((1, &shown)))
            .await
            .unwrap();
        assert_eq!(r.recorded, Some(3));
        let after3 = query(&cib).await.unwrap();
        assert_eq!(epoch(&after3), epoch(&after2) + 1, "one CIB change");
        assert_eq!(stored(&after3).unwrap(), p1);
        assert!(policy::plan(&p1, &after3).unwrap().is_empty());
        let section = |xml: &str| {
            let doc = roxmltree::Document::parse(xml).unwrap();
            let c = doc.descendants().find(|n| n.has_tag_name("constraints")).unwrap();
            xml[c.range()].to_string()
        };
        assert_eq!(section(&after3), section(&after1), "exactly version 1's constraints");
        assert_eq!(history::find(&after3, 3).unwrap().note, "rollback to 1");

        // A corrupted entry (not vmha's writing): named when asked for, kept by the next apply, and its
        // number is not reused; the readable versions stay usable.
        cib.modify(
            &Scope::section("crm_config"),
            r#"<cluster_property_set id="vmha-history"><nvpair id="vmha-history.v4" name="vmha-policy-v4" value="{broken"/></cluster_property_set>"#,
            CallOptions::CAN_CREATE,
            CIB_CALL,
        )
        .await
        .unwrap();
        let broken = query(&cib).await.unwrap();
        let e = history::find(&broken, 4).unwrap_err();
        assert!(e.to_string().contains("vmha-history.v4"), "{e}");
        assert!(matches!(
            history::find(&broken, 9),
            Err(history::HistoryError::NotKept { version: 9, .. })
        ));
        store(&cib, &p2).await;
        assert_eq!(
            apply_policy(&cib, Source::Stored, "apply", None)
                .await
                .unwrap()
                .recorded,
            Some(5)
        );
        let after5 = query(&cib).await.unwrap();
        assert!(after5.contains(r#"value="{broken""#), "kept as it was");
        assert_eq!(
            history::find(&after5, 2).unwrap().policy,
            history::find(&after5, 5).unwrap().policy
        );

        drop(cib);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
