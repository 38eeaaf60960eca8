//! Who may change the cluster through vmhad: root, or a caller polkit authorizes for
//! [`MANAGE_ACTION`](crate::api::MANAGE_ACTION). Everyone may read. Denied by default: when polkit is
//! not there or does not answer, a non-root caller is refused.
//!
//! A caller that sets the D-Bus flag ALLOW_INTERACTIVE_AUTHORIZATION on its call (the `vmha` CLI does on a
//! terminal) lets polkit ask it to authenticate through its authentication agent: polkit then gets
//! [`POLKIT_INTERACTIVE_DEADLINE`] instead of [`POLKIT_DEADLINE`] to answer.

use std::collections::HashMap;
use std::time::Duration;

use zbus::message::{Flags, Header};
use zbus::zvariant::Value;
use zbus::{Connection, Message};

use crate::api::{Error, MANAGE_ACTION};

/// How long the bus and polkit get to answer a call that does not allow interaction.
const POLKIT_DEADLINE: Duration = Duration::from_secs(5);

/// How long polkit gets when the caller allowed interactive authorization (someone may be typing a
/// password into an authentication agent).
pub const POLKIT_INTERACTIVE_DEADLINE: Duration = Duration::from_secs(120);

/// CheckAuthorization's flag AllowUserInteraction.
const POLKIT_ALLOW_USER_INTERACTION: u32 = 1;

/// polkit's AuthorizationResult, the reply of CheckAuthorization: `(bba{ss})`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// The subject may perform the action.
    pub authorized: bool,
    /// The subject could be authorized after authenticating (through an authentication agent).
    pub challenge: bool,
    /// polkit's details (e.g. `polkit.dismissed` when the user dismissed the agent's dialog).
    pub details: HashMap<String, String>,
}

impl Authorization {
    /// Reads CheckAuthorization's reply.
    pub fn from_reply(reply: &Message) -> zbus::Result<Authorization> {
        let (authorized, challenge, details): (bool, bool, HashMap<String, String>) = reply.body().deserialize()?;
        Ok(Authorization {
            authorized,
            challenge,
            details,
        })
    }
}

/// Whether the call whose header is `header` allows interactive authorization.
pub fn allows_interaction(header: &Header<'_>) -> bool {
    header.primary().flags().contains(Flags::AllowInteractiveAuth)
}

/// Returns Ok when the sender of `header` may change the cluster, or an AccessDenied error naming why
/// (Failed when the bus itself cannot be asked).
pub async fn authorize_change(conn: &Connection, header: &Header<'_>, what: &str) -> Result<(), Error> {
    let denied = |why: String| Error::AccessDenied(format!("{what}: {why}"));
    let sender = header
        .sender()
        .ok_or_else(|| denied("the call has no sender".into()))?
        .to_owned();
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| Error::Failed(format!("{what}: cannot ask the bus who the caller is: {e}")))?;
    let uid = tokio::time::timeout(POLKIT_DEADLINE, dbus.get_connection_unix_user(sender.clone().into()))
        .await
        .map_err(|_| denied("the bus did not say who the caller is".into()))?
        .map_err(|e| denied(format!("the bus did not say who the caller is ({e})")))?;
    if uid == 0 {
        return Ok(());
    }
    let interactive = allows_interaction(header);
    let deadline = if interactive {
        POLKIT_INTERACTIVE_DEADLINE
    } else {
        POLKIT_DEADLINE
    };
    match tokio::time::timeout(deadline, polkit_check(conn, sender.as_str(), interactive)).await {
        Ok(Ok(a)) if a.authorized => Ok(()),
        Ok(Ok(a)) if a.details.get("polkit.dismissed").is_some_and(|v| !v.is_empty()) => Err(denied(format!(
            "uid {uid} is not root and the authentication polkit asked for {MANAGE_ACTION} was dismissed"
        ))),
        Ok(Ok(a)) if a.challenge => Err(denied(format!(
            "uid {uid} is not root and polkit allows {MANAGE_ACTION} only after authentication{}",
            if interactive {
                " (no authentication agent answered)"
            } else {
                " (run vmha on a terminal, or with --interactive, with a polkit authentication agent)"
            }
        ))),
        Ok(Ok(_)) => Err(denied(format!(
            "uid {uid} is not root and polkit does not allow {MANAGE_ACTION}"
        ))),
        Ok(Err(e)) => Err(denied(format!(
            "uid {uid} is not root and polkit could not be asked ({e})"
        ))),
        Err(_) => Err(denied(format!(
            "uid {uid} is not root and polkit did not answer within {} s",
            deadline.as_secs()
        ))),
    }
}

/// Asks polkit whether the bus name `sender` may perform the manage action, letting polkit ask the user to
/// authenticate when `interactive`.
async fn polkit_check(conn: &Connection, sender: &str, interactive: bool) -> zbus::Result<Authorization> {
    let mut subject_details: HashMap<&str, Value> = HashMap::new();
    subject_details.insert("name", Value::from(sender));
    let subject = ("system-bus-name", subject_details);
    let details: HashMap<&str, &str> = HashMap::new();
    let flags = if interactive { POLKIT_ALLOW_USER_INTERACTION } else { 0 };
    let reply = conn
        .call_method(
            Some("org.freedesktop.PolicyKit1"),
            "/org/freedesktop/PolicyKit1/Authority",
            Some("org.freedesktop.PolicyKit1.Authority"),
            "CheckAuthorization",
            &(subject, MANAGE_ACTION, details, flags, ""),
        )
        .await?;
    Authorization::from_reply(&reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CheckAuthorization call as vmhad sends it, and polkit's reply to it with `body`.
    fn reply_with<B>(body: &B) -> Message
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let call = Message::method_call("/org/freedesktop/PolicyKit1/Authority", "CheckAuthorization")
            .unwrap()
            .sender(":1.7")
            .unwrap()
            .destination("org.freedesktop.PolicyKit1")
            .unwrap()
            .interface("org.freedesktop.PolicyKit1.Authority")
            .unwrap()
            .build(&())
            .unwrap();
        Message::method_return(&call.header())
            .unwrap()
            .sender(":1.2")
            .unwrap()
            .build(body)
            .unwrap()
    }

    #[test]
    fn polkit_reply_is_bba_ss() {
        let mut details = HashMap::new();
        details.insert(
            "polkit.retains_authorization_after_challenge".to_string(),
            "1".to_string(),
        );
        let reply = reply_with(&(false, true, details.clone()));
        assert_eq!(reply.body().signature().to_string(), "(bba{ss})");
        let a = Authorization::from_reply(&reply).unwrap();
        assert_eq!(
            a,
            Authorization {
                authorized: false,
                challenge: true,
                details
            }
        );

        let yes = Authorization::from_reply(&reply_with(&(true, false, HashMap::<String, String>::new()))).unwrap();
        assert!(yes.authorized && !yes.challenge && yes.details.is_empty());
    }

    #[test]
    fn a_reply_of_another_shape_is_an_error_not_a_yes() {
        // What the old code expected (a{sv}) is not what polkit sends; anything else must fail to parse.
        let mut details: HashMap<&str, Value> = HashMap::new();
        details.insert("x", Value::from(1u32));
        assert!(Authorization::from_reply(&reply_with(&(true, false, details))).is_err());
        assert!(Authorization::from_reply(&reply_with(&(true,))).is_err());
    }

    #[test]
    fn interaction_follows_the_callers_flag() {
        let plain = Message::method_call("/org/vmha/Vmha1", "Stop")
            .unwrap()
            .build(&())
            .unwrap();
        assert!(!allows_interaction(&plain.header()));
        let asked = Message::method_call("/org/vmha/Vmha1", "Stop")
            .unwrap()
            .with_flags(Flags::AllowInteractiveAuth)
            .unwrap()
            .build(&())
            .unwrap();
        assert!(allows_interaction(&asked.header()));
    }

    /// The `send_interface`s the bus policy allows to everyone (`context="default"`), with their
    /// `send_member` when it names one.
    fn open_to_everyone(conf: &str) -> Vec<(String, Option<String>)> {
        let options = roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        };
        let doc = roxmltree::Document::parse_with_options(conf, options).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name("policy") && n.attribute("context") == Some("default"))
            .flat_map(|p| p.children().filter(|n| n.has_tag_name("allow")))
            .filter(|a| a.attribute("send_destination") == Some(crate::api::BUS_NAME))
            .map(|a| {
                (
                    a.attribute("send_interface").unwrap_or("(any)").to_string(),
                    a.attribute("send_member").map(str::to_string),
                )
            })
            .collect()
    }

    #[test]
    fn bus_policy_lets_everyone_reach_every_interface_vmhad_serves() {
        use zbus::object_server::Interface;
        let allowed = open_to_everyone(include_str!("../../packaging/dbus/org.vmha.Vmha1.conf"));
        let served = [
            crate::objects::ClusterObject::name(),
            crate::objects::HostObject::name(),
            crate::objects::VmObject::name(),
            crate::jobs::JobObject::name(),
            crate::readiness::ReadinessObject::name(),
            zbus::fdo::ObjectManager::name(),
            // zbus serves these two on every object.
            zbus::names::InterfaceName::from_static_str_unchecked("org.freedesktop.DBus.Introspectable"),
            zbus::names::InterfaceName::from_static_str_unchecked("org.freedesktop.DBus.Peer"),
        ];
        for iface in &served {
            assert!(
                allowed.iter().any(|(i, m)| i == iface.as_str() && m.is_none()),
                "the bus policy does not let everyone call {iface}: {allowed:?}"
            );
        }
        // Properties: reading only.
        let props: Vec<_> = allowed
            .iter()
            .filter(|(i, _)| i == "org.freedesktop.DBus.Properties")
            .map(|(_, m)| m.as_deref())
            .collect();
        assert_eq!(props, vec![Some("Get"), Some("GetAll")]);
        // Nothing else: no blanket allow, no interface vmhad does not serve.
        assert_eq!(allowed.len(), served.len() + props.len(), "{allowed:?}");
    }
}
