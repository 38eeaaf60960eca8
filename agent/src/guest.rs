//! vmhad's side of the guest channels: one task per VM running on this host, connected to the UNIX
//! socket QEMU listens on for the VM's `org.vmha.guest.0` port (reconnecting while the VM restarts or
//! migrates, stopping when it leaves), forwarding cluster events (membership, DC) to every local guest
//! and carrying requests to a guest and its results back. A guest is untrusted: its lines are bounded in
//! size and rate and parsed strictly; each kind of problem is logged once per VM; a broken guest only
//! ever costs its own task.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use vmha_model::guest::{
    channel_socket, parse_guest_line, valid_name, BoundedLine, GuestMessage, HostMessage, Line, Outcome, EVENT_DC,
    EVENT_MEMBERSHIP, EVENT_MIGRATED, MAX_LINE,
};
use vmha_model::VmState;
use zbus::Connection;

use tokio::sync::watch;
use vmha_ops::state::Snapshot;

/// Lines per second a guest may send (token bucket, burst of twice as many); more are dropped.
const LINES_PER_SECOND: f64 = 20.0;
/// Bytes per second read from a guest; beyond that vmhad stops reading (QEMU then holds the guest back).
const BYTES_PER_SECOND: f64 = 256.0 * 1024.0;
/// Messages waiting to be written to one guest; more are dropped.
const QUEUE: usize = 64;
/// How long one write to a guest may take.
const WRITE_LIMIT: Duration = Duration::from_secs(5);
/// Longest request deadline a caller may ask for.
pub const MAX_REQUEST_MS: u32 = 600_000;

/// Why a request could not be answered by the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{0}")]
    Invalid(String),
    #[error("VM {vm} does not run on this host ({local}){where_}")]
    NotHere { vm: String, local: String, where_: String },
    #[error("the guest channel of VM {0} is not connected (is vmha-guest running in it?)")]
    NotConnected(String),
    /// The host the VM runs on cannot be reached (the relay is down, or sending failed).
    #[error("{0}")]
    Unreachable(String),
}

/// The guest channels of the VMs on this host.
#[derive(Debug, Default)]
pub struct Guests {
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    next_id: AtomicU64,
    /// VMs expected to run here although the CIB does not show them yet (a clone just restored on this
    /// host, before it is a cluster resource), until when.
    expected: Mutex<HashMap<String, Instant>>,
    /// Wakes the channel follower when an expectation is added.
    wake: tokio::sync::Notify,
    /// Wakes requests waiting for a channel to connect.
    connected_wake: tokio::sync::Notify,
    /// The heartbeats and application verdicts of the connected guests (see [`crate::heartbeats`]).
    pub health: crate::heartbeats::Registry,
}

/// How long an expected VM gets a channel without the CIB showing it here.
/// What the guest channels need of vmhad's state: this host's name, the channels, the cluster's state.
#[derive(Debug, Clone)]
pub struct GuestContext {
    pub local_host: String,
    pub guests: Arc<Guests>,
    pub state: watch::Receiver<Arc<Snapshot>>,
}

impl GuestContext {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        let mut rx = self.state.clone();
        // As a new subscriber of the sender: the current state counts as seen.
        rx.borrow_and_update();
        rx
    }
}

const EXPECT_FOR: Duration = Duration::from_secs(60);

/// One VM's channel, shared by its task and the callers.
#[derive(Debug)]
struct Channel {
    vm: String,
    outgoing: mpsc::Sender<String>,
    /// Requests waiting for their answer: the line sent, to send again if the guest reopens its port.
    pending: Mutex<HashMap<String, Pending>>,
    connected: AtomicBool,
    /// Problems already logged for this VM (each kind once).
    logged: Mutex<HashSet<&'static str>>,
}

/// A request sent to a guest and not answered yet.
#[derive(Debug)]
struct Pending {
    line: String,
    answer: oneshot::Sender<(Outcome, String)>,
}

impl Channel {
    /// Queues the lines of the requests still waiting for an answer again, oldest first: the guest reopened
    /// its side of the port, and what it had not read when it closed it is gone. vmha-guest answers a request
    /// it has seen already without running its hooks again. The number queued.
    fn resend_pending(&self) -> usize {
        let mut lines: Vec<(u64, String)> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, p)| (request_number(id), p.line.clone()))
            .collect();
        lines.sort();
        lines
            .into_iter()
            .filter(|(_, line)| self.outgoing.try_send(line.clone()).is_ok())
            .count()
    }

    fn log_once(&self, kind: &'static str, detail: &str) {
        if self.logged.lock().unwrap_or_else(|e| e.into_inner()).insert(kind) {
            tracing::warn!(vmha_vm = %self.vm, "guest channel of VM {}: {kind}: {detail} (logged once)", self.vm);
        }
    }

    /// Queues a line for the guest; false when the channel is down or its queue is full.
    fn send(&self, msg: &HostMessage) -> bool {
        if !self.connected.load(Ordering::Relaxed) {
            return false;
        }
        match self.outgoing.try_send(msg.to_line()) {
            Ok(()) => true,
            Err(_) => {
                self.log_once("queue full", "the guest does not read; messages dropped");
                false
            }
        }
    }
}

impl Guests {
    fn channel(&self, vm: &str) -> Option<Arc<Channel>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).get(vm).cloned()
    }

    /// Opens the channel of `vm` on this host now, although the CIB does not show it here (yet), for
    /// [`EXPECT_FOR`]; once the CIB shows it, it is followed as any other.
    pub fn expect(&self, vm: &str) {
        if !valid_vm_name(vm) {
            return;
        }
        self.expected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.to_string(), Instant::now() + EXPECT_FOR);
        self.wake.notify_one();
    }

    /// The VMs expected here now (expired expectations are dropped).
    fn expected_now(&self) -> Vec<String> {
        let mut e = self.expected.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        e.retain(|_, until| *until > now);
        e.keys().cloned().collect()
    }

    /// Sends a request to `vm`'s guest and waits for its result, at most `timeout_ms` plus a grace second
    /// (a channel still connecting is waited for within `timeout_ms`).
    pub async fn request(
        &self,
        snap: &Snapshot,
        local_host: &str,
        vm: &str,
        name: &str,
        data_json: &str,
        timeout_ms: u32,
    ) -> Result<(Outcome, String), GuestError> {
        if !valid_name(name) {
            return Err(GuestError::Invalid(format!(
                "request name {name:?} must match [a-z0-9-]{{1,32}}"
            )));
        }
        let data: Value = if data_json.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(data_json).map_err(|e| GuestError::Invalid(format!("request data: {e}")))?
        };
        if !data.is_object() {
            return Err(GuestError::Invalid("request data must be a JSON object".into()));
        }
        if !(1..=MAX_REQUEST_MS).contains(&timeout_ms) {
            return Err(GuestError::Invalid(format!("timeout must be 1..={MAX_REQUEST_MS} ms")));
        }
        let hosts = snap
            .view
            .as_ref()
            .and_then(|v| v.vm(vm))
            .map(|v| v.hosts.clone())
            .unwrap_or_default();
        // While an operation on the VM is pending (a migration from here, a first monitor) the CIB shows it
        // on no host; a connected channel proves its QEMU runs here.
        let connected_here = || self.channel(vm).is_some_and(|c| c.connected.load(Ordering::Relaxed));
        if !(hosts.iter().any(|h| h == local_host) || hosts.is_empty() && connected_here()) {
            let where_ = if hosts.is_empty() {
                ": it runs nowhere".to_string()
            } else {
                format!(": it runs on {}; ask vmhad there", hosts.join(", "))
            };
            return Err(GuestError::NotHere {
                vm: vm.to_string(),
                local: local_host.to_string(),
                where_,
            });
        }
        // A channel that is (re)connecting (the VM just arrived by migration, started or was restored) is
        // waited for within the request's deadline; the guest gets what is left of it.
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        let channel = self.connected_channel(vm, deadline).await?;
        let timeout_ms = u32::try_from(deadline.saturating_duration_since(Instant::now()).as_millis())
            .unwrap_or(timeout_ms)
            .max(1);
        let id = format!("{}-r{}", instance(), self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = oneshot::channel();
        let msg = HostMessage::request(&id, name, u64::from(timeout_ms), data);
        channel.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id.clone(),
            Pending {
                line: msg.to_line(),
                answer: tx,
            },
        );
        let answer = if channel.send(&msg) {
            let limit = Duration::from_millis(u64::from(timeout_ms)) + Duration::from_secs(1);
            match tokio::time::timeout(limit, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => (
                    Outcome::Failed,
                    "the guest channel closed before the guest answered".into(),
                ),
                Err(_) => (
                    Outcome::Failed,
                    format!("the guest did not answer within {timeout_ms} ms"),
                ),
            }
        } else {
            (Outcome::Failed, "could not send the request to the guest".into())
        };
        channel.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        Ok(answer)
    }

    /// `vm`'s channel once it is connected, waiting for that until `deadline`.
    async fn connected_channel(&self, vm: &str, deadline: Instant) -> Result<Arc<Channel>, GuestError> {
        loop {
            let notified = self.connected_wake.notified();
            tokio::pin!(notified);
            // Registered before the check, so a connection made between the check and the wait wakes it.
            notified.as_mut().enable();
            if let Some(c) = self.channel(vm).filter(|c| c.connected.load(Ordering::Relaxed)) {
                return Ok(c);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(GuestError::NotConnected(vm.to_string()));
            }
        }
    }

    /// Drops `vm`'s channel from the table if it is still `channel` (and not a newer one).
    fn forget(&self, vm: &str, channel: &Arc<Channel>) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if channels.get(vm).is_some_and(|c| Arc::ptr_eq(c, channel)) {
            channels.remove(vm);
        }
    }

    fn broadcast(&self, msg: &HostMessage) -> usize {
        let channels: Vec<Arc<Channel>> = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        channels.iter().filter(|c| c.send(msg)).count()
    }
}

/// The VMs this host runs according to the snapshot.
pub fn local_vms(snap: &Snapshot, host: &str) -> Vec<String> {
    snap.view
        .as_ref()
        .map(|v| {
            v.vms
                .iter()
                .filter(|vm| vm.hosts.iter().any(|h| h == host))
                .map(|vm| vm.name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The events a change from `old` to `new` means for guests.
pub fn cluster_events(old: &Snapshot, new: &Snapshot) -> Vec<HostMessage> {
    let mut events = Vec::new();
    let (before, after) = (old.members(), new.members());
    if before != after {
        events.push(membership_event(new, &before));
    }
    if old.dc() != new.dc() {
        events.push(dc_event(new));
    }
    events
}

fn membership_event(snap: &Snapshot, before: &[String]) -> HostMessage {
    let members = snap.members();
    let joined: Vec<&String> = members.iter().filter(|m| !before.contains(m)).collect();
    let left: Vec<&String> = before.iter().filter(|m| !members.contains(m)).collect();
    HostMessage::event(
        EVENT_MEMBERSHIP,
        json!({ "members": members, "joined": joined, "left": left, "quorate": snap.quorate(), "time": now() }),
    )
}

fn dc_event(snap: &Snapshot) -> HostMessage {
    HostMessage::event(EVENT_DC, json!({ "dc": snap.dc(), "time": now() }))
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// How long a VM may be missing from this host in the CIB, with its channel not connected, before its
/// channel task stops. The CIB briefly shows a VM on no host while an operation on it is pending (the
/// first monitor after a start, a migration): a connected channel proves QEMU still runs here, and the
/// grace covers the moments before it connects, so that one start is one connection.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long after the CIB last showed a VM migrating its arrival here counts as a live migration.
const ARRIVAL_WINDOW: Duration = Duration::from_secs(300);

/// A running channel task.
#[derive(Debug)]
struct Task {
    abort: tokio::task::AbortHandle,
    channel: Arc<Channel>,
    /// Since when the CIB no longer shows the VM on this host.
    missing_since: Option<Instant>,
}

/// Remembers VMs the CIB showed migrating, and from where, to tell a guest it arrived by migration.
#[derive(Debug, Default)]
struct Migrations {
    /// The last hosts each VM was active on.
    last_hosts: HashMap<String, Vec<String>>,
    /// VMs seen migrating: the source (the host it was active on before) and when.
    migrating: HashMap<String, (Option<String>, Instant)>,
}

impl Migrations {
    /// Takes note of a snapshot (before any new channel tasks start).
    fn observe(&mut self, snap: &Snapshot, now: Instant) {
        let Some(view) = snap.view.as_ref() else { return };
        for vm in &view.vms {
            if vm.state == VmState::Migrating {
                let source = self.last_hosts.get(&vm.name).and_then(|h| h.first().cloned());
                self.migrating.entry(vm.name.clone()).or_insert((source, now));
            }
            if !vm.hosts.is_empty() {
                self.last_hosts.insert(vm.name.clone(), vm.hosts.clone());
            }
        }
        self.migrating
            .retain(|_, (_, at)| now.duration_since(*at) < ARRIVAL_WINDOW);
    }

    /// Forgets migrations that ended elsewhere or failed (after new channel tasks took theirs).
    fn settle(&mut self, snap: &Snapshot) {
        let Some(view) = snap.view.as_ref() else { return };
        for vm in &view.vms {
            if vm.state != VmState::Migrating && !vm.hosts.is_empty() {
                self.migrating.remove(&vm.name);
            }
        }
    }

    /// The `migrated` event for `vm`, which starts running on `local`, if it came by migration.
    fn arrival(&mut self, vm: &str, local: &str) -> Option<HostMessage> {
        let (source, _) = self.migrating.remove(vm)?;
        let source = source.filter(|s| s != local);
        Some(HostMessage::event(
            EVENT_MIGRATED,
            json!({ "vm": vm, "source": source, "target": local, "time": now() }),
        ))
    }
}

/// Follows the snapshots forever: starts and stops the VMs' channel tasks and forwards cluster events.
pub async fn follow_guests(conn: Connection, ctx: GuestContext) {
    let mut rx = ctx.subscribe();
    let mut tasks: HashMap<String, Task> = HashMap::new();
    let mut migrations = Migrations::default();
    let mut old = rx.borrow_and_update().clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let new = rx.borrow_and_update().clone();
        let now = Instant::now();
        migrations.observe(&new, now);
        let mut local = local_vms(&new, &ctx.local_host);
        for vm in ctx.guests.expected_now() {
            if !local.contains(&vm) {
                local.push(vm);
            }
        }
        tasks.retain(|vm, task| {
            if task.abort.is_finished() {
                ctx.guests.forget(vm, &task.channel);
                return false;
            }
            if local.contains(vm) {
                task.missing_since = None;
                return true;
            }
            let since = *task.missing_since.get_or_insert(now);
            if task.channel.connected.load(Ordering::Relaxed) || now.duration_since(since) < STOP_GRACE {
                return true;
            }
            task.abort.abort();
            ctx.guests.forget(vm, &task.channel);
            tracing::info!(vmha_vm = %vm, "guest channel of VM {vm} stopped: the VM does not run here (any more)");
            false
        });
        for vm in local {
            if tasks.contains_key(&vm) {
                continue;
            }
            let (outgoing, queue) = mpsc::channel(QUEUE);
            let channel = Arc::new(Channel {
                vm: vm.clone(),
                outgoing,
                pending: Mutex::new(HashMap::new()),
                connected: AtomicBool::new(false),
                logged: Mutex::new(HashSet::new()),
            });
            ctx.guests
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(vm.clone(), Arc::clone(&channel));
            let arrival = migrations.arrival(&vm, &ctx.local_host);
            if arrival.is_some() {
                tracing::info!(vmha_vm = %vm, "VM {vm} arrived here by live migration; its guest will be told");
            }
            let task = tokio::spawn(run_channel(
                conn.clone(),
                ctx.clone(),
                Arc::clone(&channel),
                queue,
                arrival,
            ));
            tasks.insert(
                vm,
                Task {
                    abort: task.abort_handle(),
                    channel,
                    missing_since: None,
                },
            );
        }
        migrations.settle(&new);
        for event in cluster_events(&old, &new) {
            let sent = ctx.guests.broadcast(&event);
            tracing::debug!(event = event.name(), sent, "cluster event sent to guests");
        }
        old = new;
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {}
            _ = ctx.guests.wake.notified() => {}
        }
    }
}

/// One VM's channel, forever (aborted when the VM leaves this host).
async fn run_channel(
    conn: Connection,
    ctx: GuestContext,
    channel: Arc<Channel>,
    mut queue: mpsc::Receiver<String>,
    mut arrival: Option<HostMessage>,
) {
    let path = channel_socket(&channel.vm);
    let mut delay = Duration::from_millis(200);
    loop {
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                delay = Duration::from_millis(200);
                tracing::info!(vmha_vm = %channel.vm, "guest channel of VM {} connected", channel.vm);
                let (read, mut write) = stream.into_split();
                // Part of this task (not spawned): aborting the task ends the reading too.
                // Told when vmha-guest says hello on this connection.
                let hello = tokio::sync::Notify::new();
                let reader = read_guest(
                    conn.clone(),
                    &ctx.guests.health,
                    Arc::clone(&channel),
                    BufReader::new(read),
                    &hello,
                );
                tokio::pin!(reader);
                while queue.try_recv().is_ok() {}
                ctx.guests.health.connected(&channel.vm);
                channel.connected.store(true, Ordering::Relaxed);
                ctx.guests.connected_wake.notify_waiters();
                // The greeting (the membership, and `migrated` after an arrival) goes out when vmha-guest
                // says hello: what is written before it opened its side of the port is lost. Without a hello
                // (an older vmha-guest, or its side was open already) it goes out after GREET_WAIT. Nothing
                // else is written before then either: a request sent to a guest whose side is still closed
                // (a VM just restored or started) would be lost.
                let greet_by = Instant::now() + GREET_WAIT;
                let mut greeted = false;
                loop {
                    tokio::select! {
                        _ = &mut reader => break,
                        _ = hello.notified() => {
                            greet(&ctx, &channel, &mut arrival);
                            if greeted {
                                // vmha-guest reopened its side of the port (it had seen the host side closed, e.g.
                                // a restored clone): lines written before that may have been dropped with its old
                                // session's buffer.
                                let n = channel.resend_pending();
                                tracing::info!(vmha_vm = %channel.vm, "vmha-guest reopened its port: membership and {n} waiting request(s) sent again");
                            }
                            greeted = true;
                        }
                        _ = tokio::time::sleep_until(greet_by), if !greeted => {
                            greet(&ctx, &channel, &mut arrival);
                            greeted = true;
                        }
                        line = queue.recv(), if greeted => {
                            let Some(mut line) = line else { return };
                            line.push('\n');
                            match tokio::time::timeout(WRITE_LIMIT, write.write_all(line.as_bytes())).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(vmha_vm = %channel.vm, "writing to the guest channel: {e}");
                                    break;
                                }
                                Err(_) => {
                                    channel.log_once("write stalled", "a write did not finish within 5 s; reconnecting");
                                    break;
                                }
                            }
                        }
                    }
                }
                channel.connected.store(false, Ordering::Relaxed);
                ctx.guests.health.disconnected(&channel.vm);
                channel.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
                tracing::info!(vmha_vm = %channel.vm, "guest channel of VM {} disconnected", channel.vm);
            }
            Err(e) => tracing::trace!(vmha_vm = %channel.vm, "connecting to {path}: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// This vmhad's part of its request ids: a request id is never used twice on a guest, across vmhad restarts
/// and hosts (vmha-guest remembers the ids it answered; the time vmhad started, in ns, and its pid).
fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| {
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{ns:x}.{}", std::process::id())
    })
}

/// The sequence number of one of our request ids (`<instance>-r<n>`); 0 for any other.
fn request_number(id: &str) -> u64 {
    id.rsplit_once("-r").and_then(|(_, n)| n.parse().ok()).unwrap_or(0)
}

/// How long after connecting vmhad waits for vmha-guest's hello before greeting the guest anyway.
const GREET_WAIT: Duration = Duration::from_secs(2);

/// Sends the guest the current membership and, once, the pending `migrated` event.
fn greet(ctx: &GuestContext, channel: &Channel, arrival: &mut Option<HostMessage>) {
    let snap = ctx.snapshot();
    let _ = channel.send(&membership_event(&snap, &snap.members()));
    if let Some(event) = arrival.take() {
        let _ = channel.send(&event);
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            rate,
            burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
    }

    /// Takes `n` tokens if there are enough.
    fn take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt; returns how long to wait until the debt is paid.
    fn spend(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Reads one line of at most `max` bytes, never buffering more; also returns the bytes consumed and
/// whether reading had to slow down. Every chunk is paid for in `bytes` as it is consumed, waiting while
/// the bucket is in debt: one endless line (no newline ever) is read no faster than many short ones, and
/// costs no more memory than `max`.
async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    max: usize,
    bytes: &mut Bucket,
) -> std::io::Result<(Line, usize, bool)> {
    let mut bounded = BoundedLine::new(max);
    let mut consumed = 0usize;
    let mut slowed = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok((bounded.end(), consumed, slowed));
        }
        let (used, line) = bounded.feed(buf);
        reader.consume(used);
        consumed = consumed.saturating_add(used);
        let pause = bytes.spend(used as f64, Instant::now());
        if !pause.is_zero() {
            slowed = true;
            tokio::time::sleep(pause).await;
        }
        if let Some(line) = line {
            return Ok((line, consumed, slowed));
        }
    }
}

/// Reads a guest's lines until it disconnects.
async fn read_guest(
    conn: Connection,
    health: &crate::heartbeats::Registry,
    channel: Arc<Channel>,
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    hello: &tokio::sync::Notify,
) {
    let mut lines = Bucket::new(LINES_PER_SECOND, 2.0 * LINES_PER_SECOND, Instant::now());
    let mut bytes = Bucket::new(BYTES_PER_SECOND, BYTES_PER_SECOND, Instant::now());
    let mut greeted = false;
    loop {
        let (line, slowed) = match read_line(&mut reader, MAX_LINE, &mut bytes).await {
            Ok((Line::Eof, _, _)) => return,
            Ok((line, _, slowed)) => (line, slowed),
            Err(e) => {
                tracing::debug!(vmha_vm = %channel.vm, "reading the guest channel: {e}");
                return;
            }
        };
        if slowed {
            channel.log_once("flood", "the guest sends more than 256 KiB/s; reading slowed down");
        }
        // An oversized line counts against the line rate like any other.
        if !lines.take(1.0, Instant::now()) {
            channel.log_once(
                "rate limit",
                &format!("more than {LINES_PER_SECOND} lines/s; excess lines dropped"),
            );
            continue;
        }
        let line = match line {
            Line::Complete(l) => l,
            Line::TooLong(n) => {
                channel.log_once(
                    "oversized line",
                    &format!("dropped a line of {n} bytes (limit {MAX_LINE})"),
                );
                continue;
            }
            Line::Eof => return,
        };
        let msg = match parse_guest_line(&line) {
            Ok(m) => m,
            Err(e) => {
                channel.log_once("invalid message", &format!("dropped: {e}"));
                continue;
            }
        };
        if matches!(msg, GuestMessage::Hello { .. }) {
            hello.notify_one();
        }
        match &msg {
            GuestMessage::Hello { version, .. } if !greeted => {
                greeted = true;
                tracing::info!(vmha_vm = %channel.vm, %version, "vmha-guest said hello");
            }
            GuestMessage::Hello { version, .. } => {
                tracing::debug!(vmha_vm = %channel.vm, %version, "vmha-guest said hello again");
            }
            GuestMessage::Result { id, result, reason, .. } => {
                let waiter = channel.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                match waiter {
                    Some(p) => {
                        let _ = p.answer.send((*result, reason.clone()));
                    }
                    None => channel.log_once("unexpected result", &format!("no request {id} is waiting")),
                }
            }
            // Heartbeats are vmhad's own business: no signal for each (one per VM and second).
            GuestMessage::Heartbeat { stopping, .. } => {
                if *stopping {
                    tracing::info!(vmha_vm = %channel.vm, "vmha-guest stops: VM {} not monitored until its next heartbeat", channel.vm);
                    health.stopping(&channel.vm);
                } else {
                    health.heartbeat(&channel.vm);
                    continue;
                }
            }
            GuestMessage::Health { healthy, reason, .. } => health.app_verdict(&channel.vm, *healthy, reason),
        }
        crate::signals::guest_message(&conn, &channel.vm, &msg.to_line()).await;
    }
}

/// A VM name usable in a channel socket path: what the CIB allows as a resource id, no path characters.
fn valid_vm_name(vm: &str) -> bool {
    !vm.is_empty()
        && vm.len() <= 64
        && vm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !vm.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Membership;

    fn snap(members: &[&str]) -> Snapshot {
        Snapshot {
            membership: Some(Membership {
                members: members.iter().map(|m| m.to_string()).collect(),
                quorate: members.len() >= 2,
                agents: vec![],
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn membership_changes_become_one_event_with_who_joined_and_left() {
        let events = cluster_events(&snap(&["n1", "n2", "n3"]), &snap(&["n1", "n2"]));
        assert_eq!(events.len(), 1);
        let HostMessage::Event { name, data, .. } = &events[0] else {
            panic!()
        };
        assert_eq!(name, "membership");
        assert_eq!(data["members"], json!(["n1", "n2"]));
        assert_eq!(data["left"], json!(["n3"]));
        assert_eq!(data["joined"], json!([]));
        assert_eq!(data["quorate"], json!(true));
        assert!(cluster_events(&snap(&["n1"]), &snap(&["n1"])).is_empty());
    }

    fn vm_snap(state: VmState, hosts: &[&str]) -> Snapshot {
        Snapshot {
            view: Some(vmha_model::ClusterView {
                cluster_name: None,
                version: "0.0.0".into(),
                dc: None,
                quorate: true,
                stonith_enabled: true,
                capture_staging: true,
                replications: Default::default(),
                hosts: vec![],
                vms: vec![vmha_model::VmView {
                    name: "vm1".into(),
                    agent: "ocf:vmha:VirtualMachine".into(),
                    config: None,
                    state,
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    failed_on: vec![],
                    fail_counts: Default::default(),
                    target_role: None,
                    managed: true,
                    params: Default::default(),
                    meta: Default::default(),
                    utilization: Default::default(),
                    constraints: vec![],
                }],
                vclusters: Default::default(),
                groups: vec![],
                policy_fingerprint: None,
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn an_arrival_after_a_migration_is_told_and_a_plain_start_is_not() {
        let t0 = Instant::now();
        let mut m = Migrations::default();
        for (state, hosts) in [
            (VmState::Running, &["n1"][..]),
            (VmState::Migrating, &[]),
            (VmState::Stopped, &[]),
            (VmState::Migrating, &[]),
        ] {
            m.observe(&vm_snap(state, hosts), t0);
            m.settle(&vm_snap(state, hosts));
        }
        m.observe(&vm_snap(VmState::Running, &["n2"]), t0);
        let HostMessage::Event { name, data, .. } = m.arrival("vm1", "n2").expect("migrated event") else {
            panic!()
        };
        assert_eq!(
            (name.as_str(), &data["source"], &data["target"]),
            ("migrated", &json!("n1"), &json!("n2"))
        );
        assert!(m.arrival("vm1", "n2").is_none(), "told once");

        // Started after a stop, or a migration that failed back to its source: no event.
        let mut m = Migrations::default();
        m.observe(&vm_snap(VmState::Starting, &[]), t0);
        m.observe(&vm_snap(VmState::Running, &["n2"]), t0);
        assert!(m.arrival("vm1", "n2").is_none());
        m.observe(&vm_snap(VmState::Migrating, &[]), t0);
        m.settle(&vm_snap(VmState::Migrating, &[]));
        m.observe(&vm_snap(VmState::Running, &["n2"]), t0);
        m.settle(&vm_snap(VmState::Running, &["n2"]));
        assert!(m.arrival("vm1", "n3").is_none(), "a failed migration is forgotten");
        // Too long ago.
        let mut m = Migrations::default();
        m.observe(&vm_snap(VmState::Migrating, &[]), t0);
        m.observe(&vm_snap(VmState::Running, &["n2"]), t0 + ARRIVAL_WINDOW);
        assert!(m.arrival("vm1", "n2").is_none());
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let input = format!("ok\n{}\nend", "x".repeat(100));
        let mut r = BufReader::with_capacity(8, input.as_bytes());
        let mut bytes = Bucket::new(1e9, 1e9, Instant::now());
        assert_eq!(
            read_line(&mut r, 10, &mut bytes).await.unwrap(),
            (Line::Complete(b"ok".to_vec()), 3, false)
        );
        assert_eq!(
            read_line(&mut r, 10, &mut bytes).await.unwrap(),
            (Line::TooLong(100), 101, false)
        );
        assert_eq!(
            read_line(&mut r, 10, &mut bytes).await.unwrap(),
            (Line::Complete(b"end".to_vec()), 3, false)
        );
        assert_eq!(read_line(&mut r, 10, &mut bytes).await.unwrap().0, Line::Eof);
    }

    /// A fake guest: `total` bytes of `x` and never a newline, counting what was read of it.
    struct EndlessLine {
        left: usize,
        read: Arc<AtomicU64>,
    }

    impl tokio::io::AsyncRead for EndlessLine {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = buf.remaining().min(self.left);
            buf.put_slice(&vec![b'x'; n]);
            self.left -= n;
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_line_is_paced_by_the_byte_bucket_and_kept_small() {
        const RATE: f64 = 64.0 * 1024.0;
        let read = Arc::new(AtomicU64::new(0));
        let mut r = BufReader::with_capacity(
            4096,
            EndlessLine {
                left: 1 << 20,
                read: Arc::clone(&read),
            },
        );
        let mut bytes = Bucket::new(RATE, RATE, Instant::now());
        // After 5 s (tokio's paused clock: the pacing sleeps advance it) the line is still being read, and
        // no more of it than the bucket allowed: its burst plus 5 s of its rate (plus one buffer).
        let t0 = Instant::now();
        let early = tokio::time::timeout(Duration::from_secs(5), read_line(&mut r, 100, &mut bytes)).await;
        assert!(early.is_err(), "1 MiB at 64 KiB/s is not read in 5 s: {early:?}");
        let so_far = read.load(Ordering::Relaxed) as f64;
        assert!(so_far <= RATE + 5.0 * RATE + 4096.0, "read {so_far} bytes in 5 s");
        assert!(so_far >= 5.0 * RATE, "read only {so_far} bytes in 5 s");

        // The whole of it: about (1 MiB - burst) / rate = 15 s, an oversized line of 1 MiB.
        let mut r = BufReader::with_capacity(
            4096,
            EndlessLine {
                left: 1 << 20,
                read: Arc::new(AtomicU64::new(0)),
            },
        );
        let mut bytes = Bucket::new(RATE, RATE, Instant::now());
        let t0b = Instant::now();
        let (line, consumed, slowed) = read_line(&mut r, 100, &mut bytes).await.unwrap();
        let took = t0b.elapsed();
        assert_eq!((line, consumed, slowed), (Line::TooLong(1 << 20), 1 << 20, true));
        assert!(
            took >= Duration::from_secs(14) && took <= Duration::from_secs(16),
            "1 MiB took {took:?} at 64 KiB/s"
        );
        assert!(t0.elapsed() >= took);
    }

    #[test]
    fn buckets_limit_lines_and_pace_bytes() {
        let t0 = Instant::now();
        let mut lines = Bucket::new(20.0, 40.0, t0);
        assert_eq!((0..100).filter(|_| lines.take(1.0, t0)).count(), 40);
        let later = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| lines.take(1.0, later)).count(), 10);
        let mut bytes = Bucket::new(1000.0, 1000.0, t0);
        assert_eq!(bytes.spend(500.0, t0), Duration::ZERO);
        assert_eq!(bytes.spend(1500.0, t0), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn requests_are_checked_before_anything_is_sent() {
        let shared = crate::state::Shared::new("n1".into(), Arc::new(crate::backend::RecordingCib::new("<cib/>")));
        let guests = Guests::default();
        let err = |r: Result<(Outcome, String), GuestError>| r.unwrap_err().to_string();
        assert!(err(guests
            .request(&shared.snapshot(), &shared.local_host, "vm", "Bad", "{}", 10)
            .await)
        .contains("must match"));
        assert!(err(guests
            .request(&shared.snapshot(), &shared.local_host, "vm", "ok", "[]", 10)
            .await)
        .contains("JSON object"));
        assert!(err(guests
            .request(&shared.snapshot(), &shared.local_host, "vm", "ok", "{", 10)
            .await)
        .contains("request data"));
        assert!(err(guests
            .request(&shared.snapshot(), &shared.local_host, "vm", "ok", "", 0)
            .await)
        .contains("timeout"));
        let e = err(guests
            .request(&shared.snapshot(), &shared.local_host, "vm", "ok", "", 10)
            .await);
        assert!(e.contains("does not run on this host (n1): it runs nowhere"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_connecting_channel_within_its_deadline() {
        let guests = Arc::new(Guests::default());
        let (outgoing, _queue) = mpsc::channel(QUEUE);
        let channel = Arc::new(Channel {
            vm: "web-1".into(),
            outgoing,
            pending: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            logged: Mutex::new(HashSet::new()),
        });
        guests
            .channels
            .lock()
            .unwrap()
            .insert("web-1".into(), Arc::clone(&channel));
        // Never connects: refused at the deadline, not before.
        let t0 = Instant::now();
        let e = guests
            .connected_channel("web-1", t0 + Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, GuestError::NotConnected(_)), "{e}");
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "gave up after {:?}",
            t0.elapsed()
        );
        // Connects 200 ms into a 5 s deadline: taken then.
        let (g, c) = (Arc::clone(&guests), Arc::clone(&channel));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.connected.store(true, Ordering::Relaxed);
            g.connected_wake.notify_waiters();
        });
        let t0 = Instant::now();
        let got = guests
            .connected_channel("web-1", t0 + Duration::from_secs(5))
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&got, &channel));
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(1),
            "took {took:?}"
        );
    }

    /// When vmha-guest reopens its port, every request still waiting is queued again, oldest first, and an
    /// answered one is not.
    #[test]
    fn waiting_requests_are_sent_again_oldest_first() {
        let (outgoing, mut queue) = mpsc::channel(QUEUE);
        let channel = Channel {
            vm: "cl-1".into(),
            outgoing,
            pending: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(true),
            logged: Mutex::new(HashSet::new()),
        };
        let mut answers = Vec::new();
        for n in [10, 9, 2] {
            let (answer, rx) = oneshot::channel();
            answers.push(rx);
            let id = format!("{}-r{n}", instance());
            let line = HostMessage::request(&id, "post-clone", 1000, serde_json::json!({})).to_line();
            channel.pending.lock().unwrap().insert(id, Pending { line, answer });
        }
        assert!(
            vmha_model::guest::valid_id(&format!("{}-r{}", instance(), u64::MAX)),
            "ids stay valid"
        );
        assert_eq!(channel.resend_pending(), 3);
        let mut sent = Vec::new();
        while let Ok(line) = queue.try_recv() {
            match vmha_model::guest::parse_host_line(line.as_bytes()).unwrap() {
                HostMessage::Request { id, .. } => sent.push(request_number(&id)),
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(sent, [2, 9, 10]);
        channel.pending.lock().unwrap().clear();
        assert_eq!(channel.resend_pending(), 0, "nothing waits");
        assert_eq!(request_number("someone-else"), 0);
    }

    #[test]
    fn expected_vms_are_followed_until_their_expectation_expires() {
        let guests = Guests::default();
        guests.expect("web-1");
        guests.expect("../etc");
        guests.expect("");
        assert_eq!(guests.expected_now(), ["web-1"], "only plain VM names");
        guests
            .expected
            .lock()
            .unwrap()
            .insert("old".into(), Instant::now() - Duration::from_secs(1));
        assert_eq!(guests.expected_now(), ["web-1"], "expired expectations are dropped");
    }
}
