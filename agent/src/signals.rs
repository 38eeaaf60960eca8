//! The Cluster object's signals, emitted from anywhere in vmhad (jobs, guest channels) by name, so that
//! those modules do not depend on the D-Bus objects ([`crate::objects`]) that depend on them.

use zbus::names::BusName;
use zbus::Connection;

use crate::api::{CLUSTER_INTERFACE, ROOT_PATH};

/// `Event(kind, subject, message)`: something happened in the cluster (a job ended, ...).
pub async fn event(conn: &Connection, kind: &str, subject: &str, message: &str) {
    let body = (kind, subject, message);
    if let Err(e) = conn
        .emit_signal(None::<BusName<'_>>, ROOT_PATH, CLUSTER_INTERFACE, "Event", &body)
        .await
    {
        tracing::debug!("emitting Event: {e}");
    }
}

/// `GuestMessage(vm, json)`: a valid message from a guest on this host.
pub async fn guest_message(conn: &Connection, vm: &str, json: &str) {
    if let Err(e) = conn
        .emit_signal(
            None::<BusName<'_>>,
            ROOT_PATH,
            CLUSTER_INTERFACE,
            "GuestMessage",
            &(vm, json),
        )
        .await
    {
        tracing::debug!("emitting GuestMessage: {e}");
    }
}
