//! Guest requests across hosts. Only the vmhad of the host running a VM holds its guest channel; a vmhad
//! that needs an answer from a VM elsewhere (a clone job asking the template to prepare, a clone to take
//! its new identity) multicasts the request in the CPG group [`RELAY_GROUP`], the vmhad of the VM's host
//! asks the guest and multicasts the result back. Every call has a deadline; a request nobody answers
//! fails when its deadline passes.
//!
//! Clone and group scale jobs are driven by the vmhad on the DC's host: a vmhad asked for one elsewhere
//! relays the request there ([`job_via_dc`]), the DC's vmhad checks and runs it as its own job (journaled on its
//! host, taken over by the next DC if that host dies) and mirrors the job's progress and result back to a
//! local job the caller follows.
//!
//! Every message is sealed in an authenticated [`envelope`] with the cluster's key
//! ([`crate::authkey::AUTHKEY_PATH`]); without a usable key the relay stays off (and says so in the log),
//! it never runs unauthenticated. A message is acted on only when its envelope verifies against the CPG
//! sender, is fresh and not a replay; an answer only when it is for an id this vmhad waits for and comes
//! from the host the request went to. Requests are authorized on the host where they were asked for
//! (the D-Bus methods call [`crate::auth::authorize_change`] before relaying); the receiving vmhad trusts
//! a key holder's request as it trusts its own callers' authorized ones. Every dropped message is logged
//! with its reason, rate-limited per reason.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vmha_corosync::{Cmap, Cpg, CpgEvent, DEFAULT_DEADLINE};
use vmha_ops::clone::CloneSpec;
use vmha_ops::group::ScaleSpec;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use crate::envelope::{CpgSender, DropLog, Gate, Key, Pending, Refusal, Sealer, SESSION_LEN};
use crate::guest::GuestError;
use crate::jobs::{DcJob, Job};
use crate::state::Shared;

/// CPG group of the relay (separate from vmhad's membership group so neither disturbs the other).
pub const RELAY_GROUP: &str = "vmhad-relay";
/// Extra time a relayed request waits beyond the guest's own deadline (CPG round trips).
const RELAY_GRACE: Duration = Duration::from_secs(3);
/// How long a relayed clone request waits for the DC's vmhad to check and take it (the check looks the
/// template's storage up through the target host's libvirt).
const ACCEPT_DEADLINE: Duration = Duration::from_secs(90);
/// A mirrored job that reports nothing for this long is given up (a clone job reports every step; its
/// longest, creating the clones, is bounded by libvirt's deadline).
const MIRROR_SILENCE: Duration = Duration::from_secs(600);
/// How often vmhad looks for the authkey again while it is missing or unusable.
const KEY_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
enum Msg {
    /// Ask VM `vm` on `host` (answered to the sender's node).
    Request {
        id: u64,
        host: String,
        vm: String,
        name: String,
        data: String,
        timeout_ms: u32,
        /// The VM may not be a cluster resource yet: open its channel on the target host first.
        #[serde(default)]
        expect: bool,
    },
    Result {
        id: u64,
        to: u32,
        outcome: String,
        reason: String,
    },
    /// Run this clone (a [`CloneSpec`]) as a job on `host` (the DC's).
    CloneStart { id: u64, host: String, spec: CloneSpec },
    /// Run this group scale (a [`ScaleSpec`]) as a job on `host` (the DC's).
    ScaleStart { id: u64, host: String, spec: ScaleSpec },
    /// The DC's vmhad took the job (`error`: it refused it, with why; `class`: the refusal's
    /// `org.vmha.Vmha1.Error` class, absent from a vmhad that sends none).
    JobAccepted {
        id: u64,
        to: u32,
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        class: Option<String>,
    },
    /// Progress of a mirrored job.
    JobUpdate {
        id: u64,
        to: u32,
        fraction: Option<f64>,
        message: String,
    },
    /// A mirrored job ended (`details`: what it left for its caller, JSON, when it left anything).
    JobDone {
        id: u64,
        to: u32,
        ok: bool,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        details: Option<String>,
    },
}

/// What the vmhad that relayed a job hears of it.
#[derive(Debug)]
enum JobEvent {
    /// Refused when `Some(error)`, with the refusal's class.
    Accepted(Option<String>, Option<String>),
    Update(Option<f64>, String),
    /// Success, message, details.
    Done(bool, String, Option<String>),
}

/// Where a job's progress is mirrored to: the relayed request `id` of the vmhad with node id `to`.
#[derive(Debug, Clone, Copy)]
pub struct Mirror {
    id: u64,
    to: u32,
}

/// The relay's connection: the CPG handle, the key and this process's sealer.
#[derive(Clone)]
struct Link {
    cpg: Cpg,
    key: Key,
    sealer: Arc<Sealer>,
}

#[derive(Default)]
struct Relay {
    link: Mutex<Option<Link>>,
    /// Guest requests waiting for their result, with the host each went to.
    pending: Mutex<Pending<oneshot::Sender<(String, String)>>>,
    /// Relayed jobs whose progress this vmhad mirrors, with the host each went to.
    jobs: Mutex<Pending<mpsc::UnboundedSender<JobEvent>>>,
    next: AtomicU64,
    /// The authkey's fingerprint, or why there is no usable key.
    key_status: Mutex<Option<Result<String, String>>>,
    drops: Mutex<DropLog>,
}

fn link() -> Option<Link> {
    relay().link.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The fingerprint of the authkey the relay uses (`Ok`), or why the relay is off for want of a usable key
/// (`Err`); `None` before vmhad looked.
pub fn authkey_status() -> Option<Result<String, String>> {
    relay().key_status.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Seals and multicasts `msg`.
async fn send_on(link: &Link, msg: &Msg) -> Result<(), String> {
    let body = serde_json::to_vec(msg).map_err(|e| format!("encoding: {e}"))?;
    let sealed = link
        .sealer
        .seal(&link.key, body, now_ms())
        .map_err(|e| format!("sealing: {e}"))?;
    link.cpg.mcast(&sealed).await.map_err(|e| e.to_string())
}

async fn send(link: &Link, msg: &Msg) {
    if let Err(e) = send_on(link, msg).await {
        tracing::warn!("relay: sending {msg:?}: {e}");
    }
}

/// Logs a dropped message, at most [`DropLog::BURST`] lines per reason per minute.
fn dropped(sender: CpgSender, refusal: &Refusal) {
    let allowed = relay()
        .drops
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow(refusal.kind(), Instant::now());
    match allowed {
        Some(0) => tracing::warn!(
            "relay: dropped a message from node {} pid {}: {refusal}",
            sender.nodeid,
            sender.pid
        ),
        Some(n) => tracing::warn!(
            "relay: dropped a message from node {} pid {}: {refusal} ({n} more dropped for {} not logged)",
            sender.nodeid,
            sender.pid,
            refusal.kind()
        ),
        None => {}
    }
}

/// The host whose vmhad drives clone and scale jobs: the DC's, when it is not this host and runs vmhad and the
/// relay is up (otherwise this vmhad runs the job itself).
pub fn job_host(shared: &Shared) -> Option<String> {
    let snap = shared.snapshot();
    let dc = snap.dc()?.to_string();
    let runs_vmhad = snap.membership.as_ref().is_some_and(|m| m.agents.contains(&dc));
    (dc != shared.local_host && runs_vmhad && link().is_some()).then_some(dc)
}

/// Relays a job request to the vmhad on `dc`, which checks it and runs it as its own job; returns a
/// local job mirroring that one (progress, result, details). The DC's refusal is the call's error, with
/// the class the DC gave it.
pub async fn job_via_dc(
    conn: &Connection,
    shared: &Arc<Shared>,
    dc: &str,
    spec: DcJob,
) -> Result<OwnedObjectPath, vmha_api::Error> {
    let Some(link) = link() else {
        return Err(vmha_api::Error::Failed(
            "the relay to the DC is down (Corosync unreachable, or no usable /etc/vmha/authkey)".into(),
        ));
    };
    let r = relay();
    let id = r.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    r.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(id, dc, tx);
    let forget = move || {
        relay().jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    };
    let (kind, target, when_lost) = (spec.kind(), spec.target(), spec.when_lost());
    let host = dc.to_string();
    let msg = match spec {
        DcJob::Clone(spec) => Msg::CloneStart { id, host, spec },
        DcJob::Scale(spec) => Msg::ScaleStart { id, host, spec },
    };
    send(&link, &msg).await;
    match tokio::time::timeout(ACCEPT_DEADLINE, rx.recv()).await {
        Ok(Some(JobEvent::Accepted(None, _))) => {}
        Ok(Some(JobEvent::Accepted(Some(error), class))) => {
            forget();
            return Err(api_error(class.as_deref(), error));
        }
        _ => {
            forget();
            return Err(vmha_api::Error::Failed(format!(
                "vmhad on {dc} (the DC, which runs {kind} jobs) did not take the job within {} s",
                ACCEPT_DEADLINE.as_secs()
            )));
        }
    }
    let job = Job::create(conn, shared, kind, target)
        .await
        .inspect_err(|_| forget())?;
    let path = job.path().to_string();
    let (shared, dc) = (Arc::clone(shared), dc.to_string());
    tokio::spawn(async move {
        job.report(Some(0.0), &format!("running in vmhad on {dc}, the DC"))
            .await;
        let mut watch = shared.subscribe();
        let gone = |shared: &Shared| {
            shared
                .snapshot()
                .membership
                .as_ref()
                .is_some_and(|m| !m.agents.contains(&dc))
        };
        let result = loop {
            tokio::select! {
                event = tokio::time::timeout(MIRROR_SILENCE, rx.recv()) => match event.unwrap_or_else(|_| {
                    Some(JobEvent::Done(
                        false,
                        format!("no word of the job for {} s", MIRROR_SILENCE.as_secs()),
                        None,
                    ))
                }) {
                    Some(JobEvent::Update(fraction, message)) => job.report(fraction, &message).await,
                    Some(JobEvent::Done(ok, message, details)) => {
                        if let Some(details) = details {
                            job.set_details(details);
                        }
                        let message = format!("run by vmhad on {dc}, the DC: {message}");
                        break if ok { Ok(message) } else { Err(message) };
                    }
                    Some(JobEvent::Accepted(..)) => {}
                    None => break Err("the relay stopped".to_string()),
                },
                changed = watch.changed() => {
                    if changed.is_err() {
                        break Err("vmhad is stopping".to_string());
                    }
                    if gone(&shared) {
                        break Err(format!(
                            "vmhad on {dc}, which ran the {kind} job, went away midway; {when_lost}"
                        ));
                    }
                }
            }
        };
        forget();
        job.finish(result).await;
    });
    OwnedObjectPath::try_from(path).map_err(vmha_api::Error::failed)
}

/// The error a DC's refusal of class `class` (an `org.vmha.Vmha1.Error` name; none from a vmhad that
/// sends none: InvalidArgument, as such a vmhad's refusals were) is to the caller.
fn api_error(class: Option<&str>, message: String) -> vmha_api::Error {
    vmha_api::Error::from_class(class.unwrap_or("InvalidArgument"), message)
}

/// Mirrors a job's progress to the vmhad that relayed it.
pub async fn mirror_update(m: Mirror, fraction: Option<f64>, message: &str) {
    if let Some(link) = link() {
        let msg = Msg::JobUpdate {
            id: m.id,
            to: m.to,
            fraction,
            message: message.to_string(),
        };
        send(&link, &msg).await;
    }
}

/// Mirrors a job's end (and its details, JSON, when it left any) to the vmhad that relayed it.
pub async fn mirror_done(m: Mirror, ok: bool, message: &str, details: String) {
    if let Some(link) = link() {
        let msg = Msg::JobDone {
            id: m.id,
            to: m.to,
            ok,
            message: message.to_string(),
            details: (!details.is_empty()).then_some(details),
        };
        send(&link, &msg).await;
    }
}

impl crate::jobs::JobMirror for Mirror {
    fn update<'a>(&'a self, fraction: Option<f64>, message: &'a str) -> vmha_ops::ports::BoxFuture<'a, ()> {
        Box::pin(mirror_update(*self, fraction, message))
    }

    fn done<'a>(&'a self, ok: bool, message: &'a str, details: String) -> vmha_ops::ports::BoxFuture<'a, ()> {
        Box::pin(mirror_done(*self, ok, message, details))
    }
}

/// On the DC: checks and starts a relayed job, telling the requester whether it took it (and if not, why,
/// with the error's class).
async fn start_relayed(conn: Connection, shared: Arc<Shared>, link: Link, id: u64, from: u32, spec: DcJob) {
    let op = match spec.check(&shared).await {
        Ok(op) => op,
        Err(e) => {
            let e = crate::errors::op_error(e);
            let refusal = Msg::JobAccepted {
                id,
                to: from,
                error: Some(e.message()),
                class: Some(e.short_name()),
            };
            send(&link, &refusal).await;
            return;
        }
    };
    let accepted = Msg::JobAccepted {
        id,
        to: from,
        error: None,
        class: None,
    };
    send(&link, &accepted).await;
    let mirror = Mirror { id, to: from };
    if let Err(e) = Job::start_mirrored(&conn, &shared, op, Some(Arc::new(mirror))).await {
        mirror_done(mirror, false, &format!("cannot start the job: {e}"), String::new()).await;
    }
}

fn relay() -> &'static Relay {
    static RELAY: OnceLock<Relay> = OnceLock::new();
    RELAY.get_or_init(Relay::default)
}

/// Sends a guest request to `vm` wherever it runs: directly when it runs here, through the relay
/// otherwise. Returns `(outcome, reason)` as the guest API does (`done`, `refused`, `failed`).
pub async fn guest_request(
    shared: &Shared,
    vm: &str,
    name: &str,
    data_json: &str,
    timeout_ms: u32,
) -> Result<(String, String), GuestError> {
    let host = shared
        .snapshot()
        .view
        .as_ref()
        .and_then(|v| v.vm(vm))
        .and_then(|v| (v.hosts.len() == 1).then(|| v.hosts[0].clone()));
    match host {
        Some(h) if h != shared.local_host => remote(&h, vm, name, data_json, timeout_ms, false).await,
        _ => shared
            .guests
            .request(&shared.snapshot(), &shared.local_host, vm, name, data_json, timeout_ms)
            .await
            .map(|(o, r)| (o.as_str().to_string(), r)),
    }
}

/// Sends a guest request to `vm` on `host`, whatever the CIB says: for a VM that is not a cluster resource
/// yet (a clone just restored there), whose channel that host's vmhad opens on this request.
pub async fn guest_request_on(
    shared: &Shared,
    host: &str,
    vm: &str,
    name: &str,
    data_json: &str,
    timeout_ms: u32,
) -> Result<(String, String), GuestError> {
    if host == shared.local_host {
        shared.guests.expect(vm);
        shared
            .guests
            .request(&shared.snapshot(), &shared.local_host, vm, name, data_json, timeout_ms)
            .await
            .map(|(o, r)| (o.as_str().to_string(), r))
    } else {
        remote(host, vm, name, data_json, timeout_ms, true).await
    }
}

async fn remote(
    host: &str,
    vm: &str,
    name: &str,
    data: &str,
    timeout_ms: u32,
    expect: bool,
) -> Result<(String, String), GuestError> {
    let r = relay();
    let Some(link) = link() else {
        return Err(GuestError::Unreachable(format!(
            "VM {vm} runs on {host} and the relay to other hosts is down (Corosync unreachable, or no usable \
             /etc/vmha/authkey)"
        )));
    };
    let id = r.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, rx) = oneshot::channel();
    r.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, host, tx);
    let msg = Msg::Request {
        id,
        host: host.to_string(),
        vm: vm.to_string(),
        name: name.to_string(),
        data: data.to_string(),
        timeout_ms,
        expect,
    };
    let answer = match send_on(&link, &msg).await {
        Err(e) => Err(GuestError::Unreachable(format!("relaying to {host}: {e}"))),
        Ok(()) => {
            let limit = Duration::from_millis(u64::from(timeout_ms)) + RELAY_GRACE;
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok((outcome, reason))) if outcome == "error" => Err(GuestError::Invalid(reason)),
                Ok(Ok(result)) => Ok(result),
                _ => Ok((
                    "failed".to_string(),
                    format!("no answer from vmhad on {host} within {} ms", limit.as_millis()),
                )),
            }
        }
    };
    r.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    answer
}

/// Runs the relay forever: loads the authkey (the relay stays off, saying why, until there is a usable
/// one), joins [`RELAY_GROUP`], answers requests for VMs on this host and hands results to the waiting
/// callers. Reconnects with a growing delay when Corosync goes away.
pub async fn follow_relay(conn: Connection, shared: Arc<Shared>) {
    let path = Path::new(crate::authkey::AUTHKEY_PATH);
    let mut said = String::new();
    let key = loop {
        match crate::authkey::load(path) {
            Ok(key) => break key,
            Err(e) => {
                let e = e.to_string();
                if e != said {
                    tracing::error!(
                        "relay off: {e}. Guest requests to VMs on other hosts and clone jobs run by the DC's \
                         vmhad fail until it is in place (looked for again every {} s)",
                        KEY_RETRY.as_secs()
                    );
                    said = e.clone();
                }
                *relay().key_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e));
                tokio::time::sleep(KEY_RETRY).await;
            }
        }
    };
    tracing::info!(
        "relay: authkey {} loaded (fingerprint {})",
        path.display(),
        key.fingerprint()
    );
    *relay().key_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(key.fingerprint().to_string()));
    let mut delay = Duration::from_millis(200);
    loop {
        if let Err(e) = session(&conn, &shared, &key, &mut delay).await {
            tracing::warn!("relay: {e}");
        }
        *relay().link.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn new_session() -> Result<[u8; SESSION_LEN], String> {
    let mut session = [0u8; SESSION_LEN];
    getrandom::fill(&mut session).map_err(|e| format!("no random session id from the kernel: {e}"))?;
    Ok(session)
}

async fn session(conn: &Connection, shared: &Arc<Shared>, key: &Key, delay: &mut Duration) -> Result<(), String> {
    let names: BTreeMap<u32, String> = {
        let cmap = Cmap::connect(DEFAULT_DEADLINE).await.map_err(|e| e.to_string())?;
        cmap.node_names().await.map_err(|e| e.to_string())?
    };
    let (cpg, mut events) = Cpg::connect(DEFAULT_DEADLINE).await.map_err(|e| e.to_string())?;
    cpg.join(RELAY_GROUP).await.map_err(|e| e.to_string())?;
    let me = cpg.local_nodeid().await.map_err(|e| e.to_string())?;
    // A new session id per connection: the receivers' replay windows start afresh with it.
    let sealer = Arc::new(Sealer::new(me, std::process::id(), &shared.local_host, new_session()?));
    let link = Link {
        cpg: cpg.clone(),
        key: key.clone(),
        sealer,
    };
    *relay().link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
    *delay = Duration::from_millis(200);
    let mut gate = Gate::default();
    loop {
        let CpgEvent::Message { nodeid, pid, data, .. } = events.next().await.map_err(|e| e.to_string())? else {
            continue;
        };
        let sender = CpgSender { nodeid, pid };
        let envelope = match gate.admit(key, &data, sender, names.get(&nodeid).map(String::as_str), now_ms()) {
            Ok(e) => e,
            Err(refusal) => {
                dropped(sender, &refusal);
                continue;
            }
        };
        let from_host = envelope.host;
        let msg = match serde_json::from_slice::<Msg>(&envelope.body) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!("relay: ignoring a malformed message from {from_host} (node {nodeid}): {e}");
                continue;
            }
        };
        match msg {
            Msg::Request {
                id,
                host,
                vm,
                name,
                data,
                timeout_ms,
                expect,
            } if host == shared.local_host => {
                let (shared, link) = (Arc::clone(shared), link.clone());
                if expect {
                    shared.guests.expect(&vm);
                }
                tokio::spawn(async move {
                    let (outcome, reason) = match shared
                        .guests
                        .request(&shared.snapshot(), &shared.local_host, &vm, &name, &data, timeout_ms)
                        .await
                    {
                        Ok((o, r)) => (o.as_str().to_string(), r),
                        Err(e) => ("error".to_string(), e.to_string()),
                    };
                    let reply = Msg::Result {
                        id,
                        to: nodeid,
                        outcome,
                        reason,
                    };
                    if let Err(e) = send_on(&link, &reply).await {
                        tracing::warn!(vmha_vm = %vm, "relay: answering request {id}: {e}");
                    }
                });
            }
            Msg::Result {
                id,
                to,
                outcome,
                reason,
            } if to == me => {
                let waiter = relay()
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(id, &from_host);
                match waiter {
                    Ok(tx) => {
                        let _ = tx.send((outcome, reason));
                    }
                    Err(refusal) => dropped(sender, &refusal),
                }
            }
            Msg::CloneStart { id, host, spec } if host == shared.local_host => {
                let spec = DcJob::Clone(spec);
                relayed_job(conn, shared, &link, id, nodeid, &from_host, spec);
            }
            Msg::ScaleStart { id, host, spec } if host == shared.local_host => {
                let spec = DcJob::Scale(spec);
                relayed_job(conn, shared, &link, id, nodeid, &from_host, spec);
            }
            Msg::JobAccepted { id, to, error, class } if to == me => {
                job_event(sender, &from_host, id, JobEvent::Accepted(error, class))
            }
            Msg::JobUpdate {
                id,
                to,
                fraction,
                message,
            } if to == me => job_event(sender, &from_host, id, JobEvent::Update(fraction, message)),
            Msg::JobDone {
                id,
                to,
                ok,
                message,
                details,
            } if to == me => job_event(sender, &from_host, id, JobEvent::Done(ok, message, details)),
            _ => {}
        }
    }
}

/// Starts a job relayed here by node `nodeid` (vmhad on `from_host`).
fn relayed_job(
    conn: &Connection,
    shared: &Arc<Shared>,
    link: &Link,
    id: u64,
    nodeid: u32,
    from_host: &str,
    spec: DcJob,
) {
    tracing::info!(
        target = %spec.target(),
        "relay: running a {} job asked for by node {nodeid} (vmhad on {from_host})",
        spec.kind()
    );
    let (conn, shared, link) = (conn.clone(), Arc::clone(shared), link.clone());
    tokio::spawn(start_relayed(conn, shared, link, id, nodeid, spec));
}

/// Hands a job event to the mirror waiting for `id`, when it comes from the host the job went to.
fn job_event(sender: CpgSender, from_host: &str, id: u64, event: JobEvent) {
    let jobs = relay().jobs.lock().unwrap_or_else(|e| e.into_inner());
    match jobs.get(id, from_host) {
        Ok(tx) => {
            let _ = tx.send(event);
        }
        Err(refusal) => {
            drop(jobs);
            dropped(sender, &refusal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_requests_travel_as_their_own_kind() {
        let spec = ScaleSpec {
            group: "web".into(),
            size: 3,
            force: false,
            drain_ms: 30_000,
        };
        let msg = Msg::ScaleStart {
            id: 7,
            host: "node1".into(),
            spec: spec.clone(),
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert!(
            json.starts_with(r#"{"t":"scale-start","id":7,"host":"node1""#),
            "{json}"
        );
        match serde_json::from_str::<Msg>(&json).unwrap() {
            Msg::ScaleStart {
                id: 7,
                host,
                spec: back,
            } => {
                assert_eq!(host, "node1");
                assert_eq!(back, spec);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn job_ends_carry_details_and_refusals_their_class_and_older_messages_still_parse() {
        let done = Msg::JobDone {
            id: 1,
            to: 2,
            ok: false,
            message: "m".into(),
            details: Some(r#"{"group":"web"}"#.into()),
        };
        let json = serde_json::to_string(&done).unwrap();
        assert!(matches!(
            serde_json::from_str::<Msg>(&json).unwrap(),
            Msg::JobDone { details: Some(d), .. } if d == r#"{"group":"web"}"#
        ));
        // As a vmhad without details or classes sends them.
        let old = r#"{"t":"job-done","id":1,"to":2,"ok":true,"message":"m"}"#;
        assert!(matches!(
            serde_json::from_str::<Msg>(old).unwrap(),
            Msg::JobDone {
                details: None,
                ok: true,
                ..
            }
        ));
        let old = r#"{"t":"job-accepted","id":1,"to":2,"error":"no"}"#;
        let Msg::JobAccepted { error, class, .. } = serde_json::from_str::<Msg>(old).unwrap() else {
            panic!("job-accepted")
        };
        assert_eq!(class, None);
        assert_eq!(
            api_error(class.as_deref(), error.unwrap()).short_name(),
            "InvalidArgument"
        );
        assert_eq!(api_error(Some("UnknownGroup"), "m".into()).short_name(), "UnknownGroup");
        // Without details and class, nothing extra goes on the wire.
        let bare = Msg::JobAccepted {
            id: 1,
            to: 2,
            error: None,
            class: None,
        };
        assert_eq!(
            serde_json::to_string(&bare).unwrap(),
            r#"{"t":"job-accepted","id":1,"to":2,"error":null}"#
        );
    }
}
