//! Guest requests across hosts. Only the vmhad of the host running a VM holds its guest channel; a vmhad
//! that needs an answer from a VM elsewhere (a clone job asking the template to prepare, a clone to take
//! its new identity) multicasts the request in the CPG group [`RELAY_GROUP`], the vmhad of the VM's host
//! asks the guest and multicasts the result back. Every call has a deadline; a request nobody answers
//! fails when its deadline passes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use vmha_corosync::{Cpg, CpgEvent, DEFAULT_DEADLINE};

use crate::guest::GuestError;
use crate::state::Shared;

/// CPG group of the relay (separate from vmhad's membership group so neither disturbs the other).
pub const RELAY_GROUP: &str = "vmhad-relay";
/// Extra time a relayed request waits beyond the guest's own deadline (CPG round trips).
const RELAY_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
enum Msg {
    Request {
        id: u64,
        from: u32,
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
}

#[derive(Default)]
struct Relay {
    link: Mutex<Option<(Cpg, u32)>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<(String, String)>>>,
    next: AtomicU64,
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
            .request(shared, vm, name, data_json, timeout_ms)
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
            .request(shared, vm, name, data_json, timeout_ms)
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
    let link = r.link.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some((cpg, me)) = link else {
        return Err(GuestError::Invalid(format!(
            "VM {vm} runs on {host} and the relay to other hosts is down (Corosync unreachable)"
        )));
    };
    let id = r.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, rx) = oneshot::channel();
    r.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
    let msg = Msg::Request {
        id,
        from: me,
        host: host.to_string(),
        vm: vm.to_string(),
        name: name.to_string(),
        data: data.to_string(),
        timeout_ms,
        expect,
    };
    let body = serde_json::to_vec(&msg).map_err(|e| GuestError::Invalid(e.to_string()))?;
    let answer = match cpg.mcast(&body).await {
        Err(e) => Err(GuestError::Invalid(format!("relaying to {host}: {e}"))),
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
    r.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    answer
}

/// Runs the relay forever: joins [`RELAY_GROUP`], answers requests for VMs on this host and hands results
/// to the waiting callers. Reconnects with a growing delay when Corosync goes away.
pub async fn follow_relay(shared: Arc<Shared>) {
    let mut delay = Duration::from_millis(200);
    loop {
        if let Err(e) = session(&shared, &mut delay).await {
            tracing::warn!("relay: {e}");
        }
        *relay().link.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn session(shared: &Arc<Shared>, delay: &mut Duration) -> Result<(), vmha_corosync::Error> {
    let (cpg, mut events) = Cpg::connect(DEFAULT_DEADLINE).await?;
    cpg.join(RELAY_GROUP).await?;
    let me = cpg.local_nodeid().await?;
    *relay().link.lock().unwrap_or_else(|e| e.into_inner()) = Some((cpg.clone(), me));
    *delay = Duration::from_millis(200);
    loop {
        let CpgEvent::Message { data, .. } = events.next().await? else {
            continue;
        };
        match serde_json::from_slice::<Msg>(&data) {
            Ok(Msg::Request {
                id,
                from,
                host,
                vm,
                name,
                data,
                timeout_ms,
                expect,
            }) if host == shared.local_host => {
                let (shared, cpg) = (Arc::clone(shared), cpg.clone());
                if expect {
                    shared.guests.expect(&vm);
                }
                tokio::spawn(async move {
                    let (outcome, reason) = match shared.guests.request(&shared, &vm, &name, &data, timeout_ms).await {
                        Ok((o, r)) => (o.as_str().to_string(), r),
                        Err(e) => ("error".to_string(), e.to_string()),
                    };
                    let reply = Msg::Result {
                        id,
                        to: from,
                        outcome,
                        reason,
                    };
                    if let Ok(body) = serde_json::to_vec(&reply) {
                        if let Err(e) = cpg.mcast(&body).await {
                            tracing::warn!(%vm, "relay: answering request {id}: {e}");
                        }
                    }
                });
            }
            Ok(Msg::Result {
                id,
                to,
                outcome,
                reason,
            }) if to == me => {
                if let Some(tx) = relay().pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    let _ = tx.send((outcome, reason));
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("relay: ignoring a malformed message: {e}"),
        }
    }
}
