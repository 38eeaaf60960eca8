//! Who may change the cluster through vmhad: root, or a caller polkit authorizes for
//! [`MANAGE_ACTION`](crate::api::MANAGE_ACTION). Everyone may read. Denied by default: when polkit is
//! not there or does not answer, a non-root caller is refused.

use std::collections::HashMap;
use std::time::Duration;

use zbus::message::Header;
use zbus::zvariant::{OwnedValue, Value};
use zbus::Connection;

use crate::api::MANAGE_ACTION;

/// How long polkit gets to answer.
const POLKIT_DEADLINE: Duration = Duration::from_secs(5);

/// Returns Ok when the sender of `header` may change the cluster, or an AccessDenied error naming why.
pub async fn authorize_change(conn: &Connection, header: &Header<'_>, what: &str) -> zbus::fdo::Result<()> {
    let denied = |why: String| zbus::fdo::Error::AccessDenied(format!("{what}: {why}"));
    let sender = header
        .sender()
        .ok_or_else(|| denied("the call has no sender".into()))?
        .to_owned();
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let uid = tokio::time::timeout(POLKIT_DEADLINE, dbus.get_connection_unix_user(sender.clone().into()))
        .await
        .map_err(|_| denied("the bus did not say who the caller is".into()))??;
    if uid == 0 {
        return Ok(());
    }
    match tokio::time::timeout(POLKIT_DEADLINE, polkit_allows(conn, sender.as_str())).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(denied(format!(
            "uid {uid} is not root and polkit does not allow {MANAGE_ACTION}"
        ))),
        Ok(Err(e)) => Err(denied(format!(
            "uid {uid} is not root and polkit could not be asked ({e})"
        ))),
        Err(_) => Err(denied(format!(
            "uid {uid} is not root and polkit did not answer in time"
        ))),
    }
}

/// Asks polkit whether the bus name `sender` may perform the manage action (no interaction).
async fn polkit_allows(conn: &Connection, sender: &str) -> zbus::Result<bool> {
    let mut subject_details: HashMap<&str, Value> = HashMap::new();
    subject_details.insert("name", Value::from(sender));
    let subject = ("system-bus-name", subject_details);
    let details: HashMap<&str, &str> = HashMap::new();
    let reply = conn
        .call_method(
            Some("org.freedesktop.PolicyKit1"),
            "/org/freedesktop/PolicyKit1/Authority",
            Some("org.freedesktop.PolicyKit1.Authority"),
            "CheckAuthorization",
            &(subject, MANAGE_ACTION, details, 0u32, ""),
        )
        .await?;
    let (authorized, _challenge, _details): (bool, bool, HashMap<String, OwnedValue>) = reply.body().deserialize()?;
    Ok(authorized)
}
