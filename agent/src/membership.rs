//! vmhad's view of Corosync: cluster membership and quorum (quorum service), and the process group of
//! all vmhad instances (CPG group `vmhad`), mapped to host names through cmap. Reconnects with a growing
//! delay when Corosync goes away; meanwhile membership is unknown and vmhad falls back to the CIB's view.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vmha_corosync::{Cmap, Cpg, CpgEvent, Quorum, DEFAULT_DEADLINE};
use zbus::Connection;

use crate::objects::publish;
use crate::state::{Membership, Shared};

/// CPG group every vmhad joins.
pub const VMHAD_GROUP: &str = "vmhad";

fn names(ids: impl IntoIterator<Item = u32>, names: &BTreeMap<u32, String>) -> Vec<String> {
    let mut v: Vec<String> = ids
        .into_iter()
        .map(|id| names.get(&id).cloned().unwrap_or_else(|| format!("node-id-{id}")))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Follows Corosync forever.
pub async fn follow_corosync(conn: Connection, shared: Arc<Shared>) {
    let mut delay = Duration::from_millis(200);
    loop {
        if let Err(e) = session(&conn, &shared, &mut delay).await {
            tracing::warn!("corosync: {e}");
        }
        let old = shared.update(|s| s.membership = None);
        let _ = publish(&conn, &shared, &old, &shared.snapshot()).await;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn session(conn: &Connection, shared: &Arc<Shared>, delay: &mut Duration) -> Result<(), vmha_corosync::Error> {
    // cmap only for the node names: its connection (and its shared-memory rings) closes right after.
    let node_names = Cmap::connect(DEFAULT_DEADLINE).await?.node_names().await?;
    let (_quorum, mut quorum_events) = Quorum::connect(DEFAULT_DEADLINE).await?;
    let (cpg, mut cpg_events) = Cpg::connect(DEFAULT_DEADLINE).await?;
    cpg.join(VMHAD_GROUP).await?;
    tracing::info!("following corosync (quorum and CPG group {VMHAD_GROUP})");
    *delay = Duration::from_millis(200);
    let mut membership = Membership::default();
    loop {
        tokio::select! {
            event = quorum_events.next() => {
                let q = event?;
                membership.quorate = q.quorate;
                membership.members = names(q.members, &node_names);
            }
            event = cpg_events.next() => {
                if let CpgEvent::Membership { group, members, .. } = event? {
                    if group == VMHAD_GROUP {
                        membership.agents = names(members.iter().map(|m| m.nodeid), &node_names);
                    }
                }
            }
        }
        let current = membership.clone();
        let old = shared.update(|s| s.membership = Some(current));
        if let Err(e) = publish(conn, shared, &old, &shared.snapshot()).await {
            tracing::warn!("publishing on the bus: {e}");
        }
    }
}
