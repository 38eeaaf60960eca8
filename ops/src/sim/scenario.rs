//! Scenario tables: a file of commands run against a [`World`], producing a log to compare with the
//! expected one (as pve-ha-manager's simulator does). One command per line, `#` starts a comment:
//!
//! ```text
//! hosts h1 h2 h3                         the cluster (the first host is the DC)
//! vm vm1 on h2 [memory 512] [tag web]    a running VM resource with its files
//! guest vm1 prepare-clone refused busy   how a guest answers a request (default: done)
//! fault fail hv.restore [2]              the 2nd call of that name fails
//! fault kill-vmhad cib.create [1]        the vmhad making that call dies there
//! fault kill-host at 17                  the host of the vmhad making the 17th call dies there
//! clone vm1 [count 2] [host h3] [name x] [force] [on h1] [&]
//!                                        a clone job in the vmhad on `on` (default: the DC); `&` runs
//!                                        it alongside the next ones until `wait`
//! wait                                   waits for the jobs started with `&`
//! start vm1 | stop vm1 | remove vm1 | destroy vm1-clone | move vm1 h3
//!                                        a one-VM job in the DC's vmhad
//! standby h2 on|off                      host standby (Pacemaker moves its VMs away)
//! policy {"groups": {...}}               stores and applies a placement policy (JSON on one line)
//! scale web 3 [force] [on h1] [&]        a group scale job
//! members web                           the stored policy's members of group web
//! file /srv/vmha/x.img                   a file on the storage (there before: the invariants allow it)
//! archive shop web1@h2 db1@h3            an archive of virtual cluster `shop` with VMs web1 (on h2) and
//!                                        db1 (on h3) and their disks, captured on another cluster with
//!                                        the same host names and storage
//! instantiate shop [name x] [map KIND=OLD:NEW] [wait 0] [dry-run] [on h1]
//!                                        an instantiate of that archive in the vmhad on `on` (default:
//!                                        the DC); without a `map`, storage=/srv/vmha:/srv/vmha
//! capture shop [disks] [halt] [on h1]    a capture of virtual cluster `shop` (into memory)
//! restart-vmhad h1                       vmhad starts again on h1 (and recovers its journals)
//! recover h2                             h2's vmhad recovers what dead vmhads left (as after a DC change)
//! check vm1                              the invariants, with vm1 as the template
//! ```

use std::sync::Arc;

use crate::clone::{self, CloneSpec};
use crate::group;
use crate::ports::LogProgress;
use crate::sim::{Fault, FaultAction, SimArchive, SimSink, Trigger, World, STORAGE};
use crate::vcluster::{self, CaptureSpec, InstantiateSpec};
use crate::vm::{self, VmOp};

/// Runs a scenario; returns its log. `Err` for a scenario that cannot be read.
pub async fn run(script: &str) -> Result<String, String> {
    let mut world: Option<Arc<World>> = None;
    let mut background: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> = Vec::new();
    let mut jobs = 0;
    let mut archives: std::collections::BTreeMap<String, Arc<Vec<u8>>> = Default::default();
    for (n, raw) in script.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let bad = |why: &str| format!("line {}: {why}: {line}", n + 1);
        if words[0] == "hosts" {
            let w = World::new(&words[1..]);
            w.note(format!("> {line}"));
            world = Some(w);
            continue;
        }
        let w = world.clone().ok_or_else(|| bad("no `hosts` line first"))?;
        w.note(format!("> {line}"));
        match words[0] {
            "vm" => {
                let (name, host) = match words.get(1..4) {
                    Some([name, "on", host]) => (*name, *host),
                    _ => return Err(bad("vm NAME on HOST")),
                };
                let mut memory = 512;
                let mut tags = Vec::new();
                let mut rest = words[4..].iter();
                while let Some(k) = rest.next() {
                    let v = rest.next().ok_or_else(|| bad("a value is missing"))?;
                    match *k {
                        "memory" => memory = v.parse().map_err(|_| bad("memory is a number"))?,
                        "tag" => tags.push(*v),
                        _ => return Err(bad("unknown vm option")),
                    }
                }
                w.add_vm(name, host, memory, &tags);
            }
            "guest" => {
                if words.len() < 4 {
                    return Err(bad("guest VM KIND OUTCOME [REASON]"));
                }
                w.guest_answers(words[1], words[2], words[3], &words[4..].join(" "));
            }
            "fault" => {
                let action = match words.get(1) {
                    Some(&"fail") => FaultAction::Fail,
                    Some(&"kill-vmhad") => FaultAction::KillVmhad,
                    Some(&"kill-host") => FaultAction::KillHost,
                    _ => return Err(bad("fault fail|kill-vmhad|kill-host")),
                };
                let trigger = match words.get(2..) {
                    Some(["at", k]) => Trigger::Call(k.parse().map_err(|_| bad("a call number"))?),
                    Some([call]) => Trigger::Named(call.to_string(), 1),
                    Some([call, k]) => Trigger::Named(call.to_string(), k.parse().map_err(|_| bad("a number"))?),
                    _ => return Err(bad("fault ACTION CALL [NTH] | fault ACTION at N")),
                };
                w.inject(Fault { trigger, action });
            }
            "clone" => {
                let (spec, on, bg) = clone_spec(&words).map_err(|e| bad(&e))?;
                let on = on.or_else(|| w.dc()).ok_or_else(|| bad("no DC"))?;
                jobs += 1;
                let job = run_clone(Arc::clone(&w), on, spec, jobs);
                if bg {
                    background.push(Box::pin(job));
                } else {
                    job.await;
                }
            }
            "start" | "stop" | "remove" | "destroy" | "move" => {
                let vm = words.get(1).ok_or_else(|| bad("VM"))?.to_string();
                let op = match words[0] {
                    "start" => VmOp::Start(vm),
                    "stop" => VmOp::Stop(vm),
                    "remove" => VmOp::Remove(vm),
                    "destroy" => VmOp::Destroy(vm),
                    _ => VmOp::Move {
                        vm,
                        host: words.get(2).ok_or_else(|| bad("move VM HOST"))?.to_string(),
                    },
                };
                let on = w.dc().ok_or_else(|| bad("no DC"))?;
                let ports = w.vmhad(&on);
                let outcome = match vm::check(&ports, &op).await {
                    Err(e) => format!("refused: {e}"),
                    Ok(()) => match vm::run(&ports, &LogProgress, &op).await {
                        Ok(m) => format!("ok: {m}"),
                        Err(e) => format!("failed: {e}"),
                    },
                };
                w.note(format!("{} {} -> {outcome}", op.kind(), op.target()));
            }
            "standby" => {
                let (host, on) = match words.get(1..3) {
                    Some([h, "on"]) => (*h, true),
                    Some([h, "off"]) => (*h, false),
                    _ => return Err(bad("standby HOST on|off")),
                };
                let dc = w.dc().ok_or_else(|| bad("no DC"))?;
                let r = vm::set_host_attribute(&w.vmhad(&dc), host, "standby", on).await;
                w.note(format!(
                    "standby {host} -> {}",
                    r.map_or_else(|e| format!("failed: {e}"), |()| "ok".into())
                ));
            }
            "policy" => {
                let json = line.trim_start_matches("policy").trim();
                let policy = vmha_model::policy::Policy::from_json(json).map_err(|e| bad(&e.to_string()))?;
                let dc = w.dc().ok_or_else(|| bad("no DC"))?;
                let r = group::store_policy(&w.vmhad(&dc), &policy).await;
                w.note(format!(
                    "policy -> {}",
                    r.map_or_else(|e| format!("failed: {e}"), |()| "stored and applied".into())
                ));
            }
            "scale" => {
                let (name, size) = match words.get(1..3) {
                    Some([n, s]) => (n.to_string(), s.parse().map_err(|_| bad("a size"))?),
                    _ => return Err(bad("scale GROUP SIZE")),
                };
                let (mut force, mut on, mut bg) = (false, None, false);
                let mut rest = words[3..].iter();
                while let Some(k) = rest.next() {
                    match *k {
                        "force" => force = true,
                        "&" => bg = true,
                        "on" => on = rest.next().map(|h| h.to_string()),
                        _ => return Err(bad("unknown scale option")),
                    }
                }
                let on = on.or_else(|| w.dc()).ok_or_else(|| bad("no DC"))?;
                jobs += 1;
                let spec = group::ScaleSpec {
                    group: name,
                    size,
                    force,
                    drain_ms: 10_000,
                };
                let job = run_scale(Arc::clone(&w), on, spec, jobs);
                if bg {
                    background.push(Box::pin(job));
                } else {
                    job.await;
                }
            }
            "wait" => {
                futures_util::future::join_all(background.drain(..)).await;
            }
            "restart-vmhad" => {
                let host = words.get(1).ok_or_else(|| bad("restart-vmhad HOST"))?;
                w.restart_vmhad(host);
                recover_all(&w, host).await;
            }
            "recover" => {
                let host = words.get(1).ok_or_else(|| bad("recover HOST"))?;
                recover_all(&w, host).await;
            }
            "file" => {
                let path = words.get(1).ok_or_else(|| bad("file PATH"))?;
                w.add_file(path);
            }
            "archive" => {
                let name = words.get(1).ok_or_else(|| bad("archive NAME VM@HOST..."))?;
                let mut vms = Vec::new();
                for v in &words[2..] {
                    let (vm, host) = v.split_once('@').ok_or_else(|| bad("VM@HOST"))?;
                    vms.push((vm.to_string(), host.to_string()));
                }
                let hosts = w.host_names();
                let bytes = archive_of(&hosts, name, &vms).await.map_err(|e| bad(&e))?;
                w.note(format!("archive {name}: {} VMs", vms.len()));
                archives.insert(name.to_string(), Arc::new(bytes));
            }
            "instantiate" => {
                let name = words.get(1).ok_or_else(|| bad("instantiate ARCHIVE ..."))?;
                let bytes = archives.get(*name).cloned().ok_or_else(|| bad("no such archive"))?;
                let mut spec = InstantiateSpec {
                    maps: Vec::new(),
                    name: None,
                    allow: Vec::new(),
                    dry_run: false,
                    wait: std::time::Duration::from_secs(60),
                    trust: Default::default(),
                };
                let mut on = None;
                let mut rest = words[2..].iter();
                while let Some(k) = rest.next() {
                    match *k {
                        "dry-run" => spec.dry_run = true,
                        key => {
                            let v = rest.next().ok_or_else(|| bad("a value is missing"))?;
                            match key {
                                "name" => spec.name = Some(v.to_string()),
                                "map" => spec.maps.push(v.to_string()),
                                "wait" => {
                                    spec.wait = std::time::Duration::from_secs(v.parse().map_err(|_| bad("seconds"))?)
                                }
                                "on" => on = Some(v.to_string()),
                                _ => return Err(bad("unknown instantiate option")),
                            }
                        }
                    }
                }
                if spec.maps.is_empty() {
                    spec.maps.push(format!("storage={STORAGE}:{STORAGE}"));
                }
                let on = on.or_else(|| w.dc()).ok_or_else(|| bad("no DC"))?;
                jobs += 1;
                let outcome = run_instantiate(&w, &on, &spec, bytes, jobs).await;
                w.note(format!("instantiate of {name} (job {jobs} on {on}) -> {outcome}"));
            }
            "capture" => {
                let name = words.get(1).ok_or_else(|| bad("capture NAME ..."))?;
                let mut spec = CaptureSpec {
                    name: name.to_string(),
                    with_disks: false,
                    halt: false,
                };
                let mut on = None;
                let mut rest = words[2..].iter();
                while let Some(k) = rest.next() {
                    match *k {
                        "disks" => spec.with_disks = true,
                        "halt" => spec.halt = true,
                        "on" => on = rest.next().map(|h| h.to_string()),
                        _ => return Err(bad("unknown capture option")),
                    }
                }
                let on = on.or_else(|| w.dc()).ok_or_else(|| bad("no DC"))?;
                jobs += 1;
                let outcome = match run_capture(&w, &on, &spec, jobs).await {
                    Some(Ok(summary)) => format!(
                        "ok: {} ({} disks)",
                        summary["consistency"],
                        summary["disks"].as_array().map_or(0, Vec::len)
                    ),
                    Some(Err(e)) => format!("failed: {e}"),
                    None => "vmhad died".into(),
                };
                w.note(format!("capture of {name} (job {jobs} on {on}) -> {outcome}"));
            }
            "members" => {
                let name = words.get(1).ok_or_else(|| bad("members GROUP"))?;
                let cib = w.cib();
                let members = vmha_model::policy::Policy::from_cib(&cib)
                    .ok()
                    .flatten()
                    .and_then(|p| p.groups.get(*name).map(|g| g.members.join(", ")));
                w.note(format!(
                    "members of {name}: {}",
                    members.unwrap_or_else(|| "no such group".into())
                ));
            }
            "check" => {
                let template = words.get(1).ok_or_else(|| bad("check TEMPLATE"))?;
                let v = w.violations(template);
                if v.is_empty() {
                    w.note("invariants hold");
                }
                for x in v {
                    w.note(format!("VIOLATION: {x}"));
                }
            }
            _ => return Err(bad("unknown command")),
        }
    }
    futures_util::future::join_all(background.drain(..)).await;
    Ok(world.map(|w| w.log().join("\n") + "\n").unwrap_or_default())
}

type Parsed = (CloneSpec, Option<String>, bool);

fn clone_spec(words: &[&str]) -> Result<Parsed, String> {
    let template = words.get(1).ok_or("clone TEMPLATE ...")?;
    let mut spec = CloneSpec {
        template: template.to_string(),
        name: None,
        host: None,
        count: 1,
        force: false,
    };
    let (mut on, mut bg) = (None, false);
    let mut rest = words[2..].iter();
    while let Some(k) = rest.next() {
        match *k {
            "force" => spec.force = true,
            "&" => bg = true,
            key => {
                let v = rest.next().ok_or("a value is missing")?;
                match key {
                    "count" => spec.count = v.parse().map_err(|_| "count is a number")?,
                    "host" => spec.host = Some(v.to_string()),
                    "name" => spec.name = Some(v.to_string()),
                    "on" => on = Some(v.to_string()),
                    _ => return Err(format!("unknown clone option {key}")),
                }
            }
        }
    }
    Ok((spec, on, bg))
}

/// Checks and runs a clone job in the vmhad on `on`, as vmhad would; logs how it ended (stopping it when
/// that vmhad dies).
async fn run_clone(w: Arc<World>, on: String, spec: CloneSpec, job: usize) {
    let ports = w.vmhad(&on);
    let template = spec.template.clone();
    let work = async {
        let plan = clone::check(&ports, &spec).await.map_err(|e| format!("refused: {e}"))?;
        clone::run(&ports, &LogProgress, &plan, &job.to_string())
            .await
            .map_err(|e| format!("failed: {e}"))
    };
    let outcome = tokio::select! {
        r = work => match r {
            Ok(m) => format!("ok: {}", m.split("; timings").next().unwrap_or(&m)),
            Err(e) => e,
        },
        () = w.vmhad_dies(&on) => "vmhad died".to_string(),
    };
    w.note(format!("clone of {template} (job {job} on {on}) -> {outcome}"));
}

/// Checks and runs a scale job in the vmhad on `on`; logs how it ended and the group's size.
async fn run_scale(w: Arc<World>, on: String, spec: group::ScaleSpec, job: usize) {
    let ports = w.vmhad(&on);
    let name = spec.group.clone();
    let work = async {
        let plan = match group::check(&ports, &spec).await {
            Ok(plan) => plan,
            Err(e) => return format!("refused: {e}"),
        };
        let (summary, outcome) = group::run(&ports, &LogProgress, &plan, &job.to_string()).await;
        let steps: Vec<String> = summary.steps.iter().map(|s| s.to_string()).collect();
        match outcome {
            Ok(()) => format!(
                "ok: {} -> {} members, steps [{}]",
                summary.from,
                summary.size,
                steps.join(", ")
            ),
            Err(e) => format!("failed at {} members: {e}; steps [{}]", summary.size, steps.join(", ")),
        }
    };
    let outcome = tokio::select! {
        r = work => r,
        () = w.vmhad_dies(&on) => "vmhad died".to_string(),
    };
    w.note(format!(
        "scale of {name} to {} (job {job} on {on}) -> {outcome}",
        spec.size
    ));
}

/// What a restarted vmhad, or a new DC, recovers: clones, group scales, instantiates and captures.
pub async fn recover_all(w: &Arc<World>, host: &str) {
    let p = w.vmhad(host);
    clone::recover(&p).await;
    group::recover(&p).await;
    vcluster::recover(&p).await;
}

/// An archive of virtual cluster `name` made of `vms` (VM, host), captured (metadata and empty disks)
/// on a cluster of `hosts` of its own.
pub async fn archive_of(hosts: &[String], name: &str, vms: &[(String, String)]) -> Result<Vec<u8>, String> {
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let source = World::new(&hosts);
    for (vm, host) in vms {
        source.add_vm(vm, host, 512, &[name]);
    }
    let on = source.dc().ok_or("no DC")?;
    let mut sink = SimSink::new(&source, &on);
    let spec = CaptureSpec {
        name: name.to_string(),
        with_disks: true,
        halt: false,
    };
    vcluster::capture(&source.vmhad(&on), &LogProgress, &spec, &mut sink, "0")
        .await
        .map_err(|e| e.to_string())?;
    sink.bytes.ok_or_else(|| "no archive written".to_string())
}

/// Runs an instantiate in the vmhad on `on`: how it ended, in a line (stopping when that vmhad dies).
pub async fn run_instantiate(
    w: &Arc<World>,
    on: &str,
    spec: &InstantiateSpec,
    bytes: Arc<Vec<u8>>,
    job: usize,
) -> String {
    let ports = w.vmhad(on);
    let mut archive = SimArchive::new(w, on, bytes);
    let id = job.to_string();
    let work = vcluster::instantiate(&ports, &LogProgress, spec, &mut archive, &id);
    tokio::select! {
        done = work => match done.result {
            Ok(m) => format!("ok: {m}"),
            Err(e) if done.plan.is_none() || !done.problems.is_empty() => format!("refused: {e}"),
            Err(e) => format!("failed: {e}"),
        },
        () = w.vmhad_dies(on) => "vmhad died".to_string(),
    }
}

/// Runs a capture in the vmhad on `on`; `None` when that vmhad died.
pub async fn run_capture(
    w: &Arc<World>,
    on: &str,
    spec: &CaptureSpec,
    job: usize,
) -> Option<Result<serde_json::Value, String>> {
    let ports = w.vmhad(on);
    let mut sink = SimSink::new(w, on);
    let id = job.to_string();
    let work = vcluster::capture(&ports, &LogProgress, spec, &mut sink, &id);
    tokio::select! {
        r = work => Some(r.map_err(|e| e.to_string())),
        () = w.vmhad_dies(on) => None,
    }
}
