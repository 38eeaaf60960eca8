//! The free capacity of each host in its transient node attributes `vmha-free-<utilization>`, which the
//! placement policy's free-room rules read (see `vmha_model::failover`): kept by the DC's vmhad only, so
//! hosts do not race, and written only when it changed.

use std::sync::Arc;

use crate::backend::CibChange;
use vmha_model::failover;

use crate::state::Shared;

/// Brings the free-capacity attributes up to date (on the DC, when a policy places hosts in zones: `zoned`,
/// as the snapshot's CIB says) from the CIB as the change notifications left it.
pub async fn reconcile(shared: &Arc<Shared>, zoned: bool) {
    let snap = shared.snapshot();
    let Some(view) = snap.view.as_ref() else { return };
    if view.dc.as_deref() != Some(shared.local_host.as_str()) {
        return;
    }
    // Only where a policy placed hosts in zones (its rules read the attributes): the whole CIB is read
    // only then.
    if !zoned {
        return;
    }
    let cib = match shared.backend.query_followed().await {
        Ok(cib) => cib,
        Err(e) => {
            tracing::warn!("reading the CIB for the hosts' free capacity: {e}");
            return;
        }
    };
    let updates = match failover::free_updates(&cib) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!("computing the hosts' free capacity: {e}");
            return;
        }
    };
    for (host, xml) in updates {
        match shared.backend.apply(CibChange::Modify { section: "status", xml }).await {
            Ok(()) => tracing::debug!(%host, "free capacity updated"),
            Err(e) => tracing::warn!(%host, "updating the free capacity: {e}"),
        }
    }
}
