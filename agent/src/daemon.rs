//! vmhad's main loop: follows the CIB (reconnecting when Pacemaker restarts), publishes every change on
//! the bus, and owns utilization (host capacity from libvirt, VM needs from their definitions).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use vmha_model::change;
use vmha_model::cib::CibParts;
use vmha_model::domain::DomainSummary;
use zbus::Connection;

use crate::backend::{CibChange, FollowedCib};
use crate::objects::publish;
use crate::state::Shared;

/// Reads what changed in the CIB and publishes it. `parts` is the CIB as last read, part by part: a
/// change re-reads only the parts its diff touched ([`vmha_model::cib::CibParts`]), and the whole copy
/// when the diff cannot say (or those parts do not read). Returns whether a placement policy placed hosts
/// in zones, `None` when the CIB could not be read.
pub async fn refresh(conn: &Connection, shared: &Arc<Shared>, parts: &mut Option<CibParts>) -> Option<bool> {
    let read = read_parts(shared, parts).await.map(|()| {
        let p = parts.as_ref().expect("read_parts sets the parts");
        (p.view(), p.zoned())
    });
    let (old, zoned) = match read {
        Ok((view, zoned)) => (shared.replace_view(view), Some(zoned)),
        Err(e) => {
            *parts = None;
            tracing::warn!("reading the CIB: {e}");
            (shared.update(|s| s.cib_connected = false), None)
        }
    };
    let new = shared.snapshot();
    if let Err(e) = publish(conn, shared, &old, &new).await {
        tracing::warn!("publishing on the bus: {e}");
    }
    zoned
}

/// Brings `parts` up to date from the copy the notifications' diffs keep current: no whole read of the
/// CIB per change.
async fn read_parts(shared: &Arc<Shared>, parts: &mut Option<CibParts>) -> Result<(), String> {
    let followed = shared.backend.query_followed_parts().await.map_err(|e| e.to_string())?;
    let update = match (followed, parts.as_mut()) {
        (FollowedCib::Parts(update), Some(p)) => match p.update(&update) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!("the changed parts of the CIB do not read ({e}); reading it whole");
                None
            }
        },
        (FollowedCib::Parts(_), None) => None,
        (FollowedCib::Whole(xml), _) => Some(xml),
    };
    let xml = match update {
        Some(xml) => xml,
        None => shared.backend.query_followed().await.map_err(|e| e.to_string())?,
    };
    *parts = Some(CibParts::from_cib(&xml).map_err(|e| e.to_string())?);
    Ok(())
}

/// Follows the CIB forever: on every change notification (coalesced) re-reads it. When the connection
/// is lost, marks the state stale and reconnects with a growing delay (at most 5 s).
pub async fn follow_cib(conn: Connection, shared: Arc<Shared>) {
    let mut delay = Duration::from_millis(200);
    // Kept across reconnects: a CIB manager that restarted (Pacemaker restarts one it finds unresponsive)
    // changed no VM's definition, and the entries are checked against the CIB's again anyway. A DC's vmhad
    // that started over here read every VM's domain XML again (2000 files in the scale bench).
    let mut checked = Checked::default();
    loop {
        match shared.backend.changes().await {
            Ok(mut changes) => {
                tracing::info!("following the CIB");
                delay = Duration::from_millis(200);
                let mut parts = None;
                if let Some(zoned) = refresh(&conn, &shared, &mut parts).await {
                    reconcile_utilization(&shared, &mut checked).await;
                    crate::free_capacity::reconcile(&shared, zoned).await;
                }
                while changes.recv().await.is_some() {
                    while changes.try_recv().is_ok() {}
                    if let Some(zoned) = refresh(&conn, &shared, &mut parts).await {
                        reconcile_utilization(&shared, &mut checked).await;
                        crate::free_capacity::reconcile(&shared, zoned).await;
                    }
                }
                tracing::warn!("lost the CIB connection; reconnecting");
            }
            Err(e) => tracing::warn!("connecting to the CIB: {e}"),
        }
        let old = shared.update(|s| s.cib_connected = false);
        let _ = publish(&conn, &shared, &old, &shared.snapshot()).await;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// How often every VM's domain definition is read again although its CIB entry did not change (its file
/// may have been edited in place).
const RECHECK_ALL: Duration = Duration::from_secs(300);

/// The VMs whose utilization was last found to match their domain definition, with the CIB entry it was
/// checked against: a CIB change re-reads only the definitions of VMs whose entry changed, not all of them.
#[derive(Debug, Default)]
struct Checked {
    vms: HashMap<String, (String, vmha_model::cib::Attrs)>,
    /// When every VM was last checked; `None`: never (or not as the DC).
    all_at: Option<std::time::Instant>,
}

/// The utilization vmhad owns, set only when it differs from the CIB (never on every monitor, as
/// VirtualDomain does): this host's capacity, and — on the DC's vmhad only, so hosts do not race — each
/// VM's needs from its domain definition.
async fn reconcile_utilization(shared: &Arc<Shared>, checked: &mut Checked) {
    let snap = shared.snapshot();
    let Some(view) = snap.view.as_ref() else { return };
    let mut changes = Vec::new();
    if let Some(host) = view.host(&shared.local_host) {
        if let Some((cpus, memory_mib)) = shared.host_capacity() {
            for (name, value) in [("cpu", cpus.to_string()), ("hv_memory", memory_mib.to_string())] {
                if host.utilization.get(name) != Some(&value) {
                    changes.push(("nodes", Target::Host(host.name.clone()), name, value));
                }
            }
        }
    }
    if view.dc.as_deref() == Some(shared.local_host.as_str()) {
        if checked.all_at.is_none_or(|t| t.elapsed() >= RECHECK_ALL) {
            checked.vms.clear();
            checked.all_at = Some(std::time::Instant::now());
        }
        let names: HashSet<&str> = view.vms.iter().map(|vm| vm.name.as_str()).collect();
        checked.vms.retain(|name, _| names.contains(name.as_str()));
        for vm in &view.vms {
            let Some(config) = &vm.config else { continue };
            let unchanged = checked
                .vms
                .get(&vm.name)
                .is_some_and(|(c, u)| c == config && *u == vm.utilization);
            if unchanged {
                continue;
            }
            // Unreadable now: tried again with the next full check, not on every CIB change.
            let Some(summary) = read_summary(config).await else {
                checked
                    .vms
                    .insert(vm.name.clone(), (config.clone(), vm.utilization.clone()));
                continue;
            };
            let before = changes.len();
            for (name, value) in [
                ("cpu", summary.vcpus.to_string()),
                ("hv_memory", summary.memory_mib.to_string()),
            ] {
                if vm.utilization.get(name) != Some(&value) {
                    changes.push(("resources", Target::Vm(vm.name.clone()), name, value));
                }
            }
            if changes.len() == before {
                checked
                    .vms
                    .insert(vm.name.clone(), (config.clone(), vm.utilization.clone()));
            }
        }
    } else {
        *checked = Checked::default();
    }
    if changes.is_empty() {
        return;
    }
    let Ok(cib) = shared.backend.query().await else { return };
    for (section, target, name, value) in changes {
        let xml = match &target {
            Target::Host(h) => change::set_node_utilization(&cib, h, name, &value),
            Target::Vm(v) => change::set_resource_utilization(&cib, v, name, &value),
        };
        let Ok(xml) = xml else { continue };
        match shared.backend.apply(CibChange::Modify { section, xml }).await {
            Ok(()) => tracing::info!(?target, name, %value, "utilization set"),
            Err(e) => tracing::warn!(?target, name, "setting utilization: {e}"),
        }
    }
}

#[derive(Debug)]
enum Target {
    Host(String),
    Vm(String),
}

/// Reads a VM's domain definition (bounded in size and time, at most one read of it outstanding: a hung
/// shared storage does not pile up threads); `None` when it cannot be read.
async fn read_summary(path: &str) -> Option<DomainSummary> {
    let read = crate::readiness::read_shared_file(path, 1 << 20, Duration::from_secs(5)).await?;
    DomainSummary::parse(&read).ok()
}

/// This host's capacity from libvirt: (CPUs, memory in MiB), over a read-only connection to `uri`, within
/// `limit` (a hung libvirtd yields `None`, never a hung vmhad).
pub async fn probe_capacity(uri: &str, limit: Duration) -> Option<(u32, u64)> {
    let uri = uri.to_string();
    let probe = tokio::task::spawn_blocking(move || {
        let conn = virt::connect::Connect::open_read_only(Some(&uri)).ok()?;
        let info = conn.node_info().ok();
        let info = info?;
        Some((info.cpus, info.memory / 1024))
    });
    match tokio::time::timeout(limit, probe).await {
        Ok(Ok(capacity)) => capacity,
        _ => {
            tracing::warn!("libvirt did not report this host's capacity within {limit:?}");
            None
        }
    }
}
