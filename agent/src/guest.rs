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
    EVENT_MEMBERSHIP, MAX_LINE,
};
use zbus::Connection;

use crate::objects::ClusterObject;
use crate::state::{Shared, Snapshot};

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
}

/// The guest channels of the VMs on this host.
#[derive(Debug, Default)]
pub struct Guests {
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    next_id: AtomicU64,
}

/// One VM's channel, shared by its task and the callers.
#[derive(Debug)]
struct Channel {
    vm: String,
    outgoing: mpsc::Sender<String>,
    pending: Mutex<HashMap<String, oneshot::Sender<(Outcome, String)>>>,
    connected: AtomicBool,
    /// Problems already logged for this VM (each kind once).
    logged: Mutex<HashSet<&'static str>>,
}

impl Channel {
    fn log_once(&self, kind: &'static str, detail: &str) {
        if self.logged.lock().unwrap_or_else(|e| e.into_inner()).insert(kind) {
            tracing::warn!(vm = %self.vm, "guest channel of VM {}: {kind}: {detail} (logged once)", self.vm);
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

    /// Sends a request to `vm`'s guest and waits for its result, at most `timeout_ms` plus a grace second.
    pub async fn request(
        &self,
        shared: &Shared,
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
        let snap = shared.snapshot();
        let hosts = snap
            .view
            .as_ref()
            .and_then(|v| v.vm(vm))
            .map(|v| v.hosts.clone())
            .unwrap_or_default();
        if !hosts.contains(&shared.local_host) {
            let where_ = if hosts.is_empty() {
                ": it runs nowhere".to_string()
            } else {
                format!(": it runs on {}; ask vmhad there", hosts.join(", "))
            };
            return Err(GuestError::NotHere {
                vm: vm.to_string(),
                local: shared.local_host.clone(),
                where_,
            });
        }
        let channel = self
            .channel(vm)
            .filter(|c| c.connected.load(Ordering::Relaxed))
            .ok_or_else(|| GuestError::NotConnected(vm.to_string()))?;
        let id = format!("r{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = oneshot::channel();
        channel
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        let msg = HostMessage::request(&id, name, u64::from(timeout_ms), data);
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

/// Follows the snapshots forever: starts and stops the VMs' channel tasks and forwards cluster events.
pub async fn follow_guests(conn: Connection, shared: Arc<Shared>) {
    let mut rx = shared.subscribe();
    let mut tasks: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    // Since when each VM with a channel task has been missing from this host in the CIB: the CIB shows a
    // VM on no host for a moment while Pacemaker records a start, which must not cost a reconnect.
    let mut absent: HashMap<String, std::time::Instant> = HashMap::new();
    let mut old = rx.borrow_and_update().clone();
    loop {
        let new = rx.borrow_and_update().clone();
        let local = local_vms(&new, &shared.local_host);
        let now = std::time::Instant::now();
        absent.retain(|vm, _| !local.contains(vm) && tasks.contains_key(vm));
        for vm in tasks.keys() {
            if !local.contains(vm) {
                absent.entry(vm.clone()).or_insert(now);
            }
        }
        tasks.retain(|vm, task| {
            let gone = absent.get(vm).is_some_and(|since| now.duration_since(*since) >= CHANNEL_LINGER);
            let keep = !gone && !task.is_finished();
            if !keep {
                absent.remove(vm);
                task.abort();
                shared
                    .guests
                    .channels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(vm);
                tracing::info!(%vm, "guest channel stopped: the VM does not run here (any more)");
            }
            keep
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
            shared
                .guests
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(vm.clone(), Arc::clone(&channel));
            let task = tokio::spawn(run_channel(conn.clone(), Arc::clone(&shared), channel, queue));
            tasks.insert(vm, task.abort_handle());
        }
        for event in cluster_events(&old, &new) {
            let sent = shared.guests.broadcast(&event);
            tracing::debug!(event = event.name(), sent, "cluster event sent to guests");
        }
        old = new;
        if absent.is_empty() {
            if rx.changed().await.is_err() {
                return;
            }
        } else if let Ok(Err(_)) = tokio::time::timeout(CHANNEL_LINGER / 4, rx.changed()).await {
            return;
        }
    }
}

/// How long a VM's channel task outlives the VM's absence from this host in the CIB.
const CHANNEL_LINGER: Duration = Duration::from_secs(2);

/// One VM's channel, forever (aborted when the VM leaves this host).
async fn run_channel(conn: Connection, shared: Arc<Shared>, channel: Arc<Channel>, mut queue: mpsc::Receiver<String>) {
    let path = channel_socket(&channel.vm);
    let mut delay = Duration::from_millis(200);
    loop {
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                delay = Duration::from_millis(200);
                tracing::info!(vm = %channel.vm, "guest channel connected");
                let (read, mut write) = stream.into_split();
                // Part of this task (not spawned): aborting the task ends the reading too.
                let reader = read_guest(conn.clone(), Arc::clone(&channel), BufReader::new(read));
                tokio::pin!(reader);
                while queue.try_recv().is_ok() {}
                channel.connected.store(true, Ordering::Relaxed);
                let snap = shared.snapshot();
                let _ = channel.send(&membership_event(&snap, &snap.members()));
                loop {
                    tokio::select! {
                        _ = &mut reader => break,
                        line = queue.recv() => {
                            let Some(mut line) = line else { return };
                            line.push('\n');
                            match tokio::time::timeout(WRITE_LIMIT, write.write_all(line.as_bytes())).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(vm = %channel.vm, "writing to the guest channel: {e}");
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
                channel.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
                tracing::info!(vm = %channel.vm, "guest channel disconnected");
            }
            Err(e) => tracing::trace!(vm = %channel.vm, "connecting to {path}: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
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

/// Reads one line of at most `max` bytes, never buffering more; also returns the bytes consumed.
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin), max: usize) -> std::io::Result<(Line, usize)> {
    let mut bounded = BoundedLine::new(max);
    let mut consumed = 0usize;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok((bounded.end(), consumed));
        }
        let (used, line) = bounded.feed(buf);
        reader.consume(used);
        consumed += used;
        if let Some(line) = line {
            return Ok((line, consumed));
        }
    }
}

/// Reads a guest's lines until it disconnects.
async fn read_guest(conn: Connection, channel: Arc<Channel>, mut reader: BufReader<tokio::net::unix::OwnedReadHalf>) {
    let mut lines = Bucket::new(LINES_PER_SECOND, 2.0 * LINES_PER_SECOND, Instant::now());
    let mut bytes = Bucket::new(BYTES_PER_SECOND, BYTES_PER_SECOND, Instant::now());
    let mut greeted = false;
    loop {
        let (line, consumed) = match read_line(&mut reader, MAX_LINE).await {
            Ok((Line::Eof, _)) => return,
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(vm = %channel.vm, "reading the guest channel: {e}");
                return;
            }
        };
        let pause = bytes.spend(consumed as f64, Instant::now());
        if !pause.is_zero() {
            channel.log_once("flood", "the guest sends more than 256 KiB/s; reading slowed down");
            tokio::time::sleep(pause).await;
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
        if !lines.take(1.0, Instant::now()) {
            channel.log_once(
                "rate limit",
                &format!("more than {LINES_PER_SECOND} lines/s; excess lines dropped"),
            );
            continue;
        }
        let msg = match parse_guest_line(&line) {
            Ok(m) => m,
            Err(e) => {
                channel.log_once("invalid message", &format!("dropped: {e}"));
                continue;
            }
        };
        match &msg {
            GuestMessage::Hello { version, .. } if !greeted => {
                greeted = true;
                tracing::info!(vm = %channel.vm, %version, "vmha-guest said hello");
            }
            GuestMessage::Hello { version, .. } => {
                tracing::debug!(vm = %channel.vm, %version, "vmha-guest said hello again");
            }
            GuestMessage::Result { id, result, reason, .. } => {
                let waiter = channel.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send((*result, reason.clone()));
                    }
                    None => channel.log_once("unexpected result", &format!("no request {id} is waiting")),
                }
            }
        }
        if let Ok(root) = conn
            .object_server()
            .interface::<_, ClusterObject>(crate::api::ROOT_PATH)
            .await
        {
            let _ = ClusterObject::guest_message(root.signal_emitter(), &channel.vm, &msg.to_line()).await;
        }
    }
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

    #[tokio::test]
    async fn lines_are_bounded() {
        let input = format!("ok\n{}\nend", "x".repeat(100));
        let mut r = BufReader::with_capacity(8, input.as_bytes());
        assert_eq!(
            read_line(&mut r, 10).await.unwrap(),
            (Line::Complete(b"ok".to_vec()), 3)
        );
        assert_eq!(read_line(&mut r, 10).await.unwrap(), (Line::TooLong(100), 101));
        assert_eq!(
            read_line(&mut r, 10).await.unwrap(),
            (Line::Complete(b"end".to_vec()), 3)
        );
        assert_eq!(read_line(&mut r, 10).await.unwrap().0, Line::Eof);
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
        let shared = Shared::new("n1".into(), Arc::new(crate::backend::RecordingCib::new("<cib/>")));
        let guests = Guests::default();
        let err = |r: Result<(Outcome, String), GuestError>| r.unwrap_err().to_string();
        assert!(err(guests.request(&shared, "vm", "Bad", "{}", 10).await).contains("must match"));
        assert!(err(guests.request(&shared, "vm", "ok", "[]", 10).await).contains("JSON object"));
        assert!(err(guests.request(&shared, "vm", "ok", "{", 10).await).contains("request data"));
        assert!(err(guests.request(&shared, "vm", "ok", "", 0).await).contains("timeout"));
        let e = err(guests.request(&shared, "vm", "ok", "", 10).await);
        assert!(e.contains("does not run on this host (n1): it runs nowhere"), "{e}");
    }
}
