//! The errors vmhad replies with: D-Bus error names `org.vmha.Vmha1.Error.<Variant>`, each with a
//! message for people. Clients tell the classes apart by name; the message is not meant to be parsed.

use zbus::DBusError;

/// The prefix of vmhad's error names.
pub const ERROR_PREFIX: &str = "org.vmha.Vmha1.Error";

/// What went wrong, as vmhad tells its D-Bus callers. Every variant carries a message for people.
///
/// On the client side, a reply with another error name (the bus's own, such as
/// `org.freedesktop.DBus.Error.ServiceUnknown` when vmhad does not run) and transport failures are
/// [`Error::ZBus`]; vmhad never replies with that variant.
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.vmha.Vmha1.Error", impl_display = false)]
pub enum Error {
    /// Not one of vmhad's replies: the bus's errors, another service's, or the connection's.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The VM named is not a cluster VM.
    UnknownVm(String),
    /// The host named is not a cluster host.
    UnknownHost(String),
    /// The group or virtual cluster named does not exist.
    UnknownGroup(String),
    /// The cluster partition of this host has no quorum.
    NotQuorate(String),
    /// vmhad is still connecting, or cannot read the CIB right now.
    NotReady(String),
    /// The caller is neither root nor allowed by polkit.
    AccessDenied(String),
    /// The request itself is wrong (a bad name, value, path or file descriptor); nothing changed.
    InvalidArgument(String),
    /// The request clashes with what exists or runs: a name taken, a VM busy, another job.
    Conflict(String),
    /// The guest declined the request, with its reason.
    GuestRefused(String),
    /// The guest could not be reached (its channel is not connected, the relay to its host is down).
    GuestUnreachable(String),
    /// A libvirt call failed.
    Libvirt(String),
    /// Reading or changing the CIB failed.
    Cib(String),
    /// Anything else.
    Failed(String),
}

impl Error {
    /// Every error name vmhad replies with (not [`Error::ZBus`]), for documentation and tests.
    pub const NAMES: [&'static str; 13] = [
        "UnknownVm",
        "UnknownHost",
        "UnknownGroup",
        "NotQuorate",
        "NotReady",
        "AccessDenied",
        "InvalidArgument",
        "Conflict",
        "GuestRefused",
        "GuestUnreachable",
        "Libvirt",
        "Cib",
        "Failed",
    ];

    /// The error of class `name` (one of [`Error::NAMES`], e.g. `UnknownGroup`) with `message`; an
    /// unknown class is [`Error::Failed`]. For errors that travel by their class name (a relayed
    /// refusal, a job's details).
    pub fn from_class(name: &str, message: String) -> Error {
        match name {
            "UnknownVm" => Error::UnknownVm(message),
            "UnknownHost" => Error::UnknownHost(message),
            "UnknownGroup" => Error::UnknownGroup(message),
            "NotQuorate" => Error::NotQuorate(message),
            "NotReady" => Error::NotReady(message),
            "AccessDenied" => Error::AccessDenied(message),
            "InvalidArgument" => Error::InvalidArgument(message),
            "Conflict" => Error::Conflict(message),
            "GuestRefused" => Error::GuestRefused(message),
            "GuestUnreachable" => Error::GuestUnreachable(message),
            "Libvirt" => Error::Libvirt(message),
            "Cib" => Error::Cib(message),
            _ => Error::Failed(message),
        }
    }

    /// [`Error::Failed`] from anything printable.
    pub fn failed(e: impl std::fmt::Display) -> Error {
        Error::Failed(e.to_string())
    }

    /// [`Error::Cib`] from anything printable.
    pub fn cib(e: impl std::fmt::Display) -> Error {
        Error::Cib(e.to_string())
    }

    /// [`Error::InvalidArgument`] from anything printable.
    pub fn invalid(e: impl std::fmt::Display) -> Error {
        Error::InvalidArgument(e.to_string())
    }

    /// The message for people (for [`Error::ZBus`], the bus error's own message or description).
    pub fn message(&self) -> String {
        match self {
            Error::ZBus(zbus::Error::MethodError(_, Some(m), _)) => m.clone(),
            Error::ZBus(e) => e.to_string(),
            other => other.description().unwrap_or_default().to_string(),
        }
    }

    /// The last part of the error name (`UnknownVm`, ...), or the whole name for another service's error
    /// (`org.freedesktop.DBus.Error.ServiceUnknown`), or `""` for a failure that is no error reply.
    pub fn short_name(&self) -> String {
        match self {
            Error::ZBus(zbus::Error::MethodError(name, _, _)) => name.to_string(),
            Error::ZBus(zbus::Error::FDO(e)) => e.name().to_string(),
            Error::ZBus(_) => String::new(),
            other => {
                let name = other.name();
                name.strip_prefix(ERROR_PREFIX)
                    .and_then(|n| n.strip_prefix('.'))
                    .unwrap_or(name.as_str())
                    .to_string()
            }
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// What vmhad's code meets as `zbus::fdo::Error` (its own object server, the bus daemon, polkit):
/// access denied and invalid arguments keep their class, the rest is [`Error::Failed`].
impl From<zbus::fdo::Error> for Error {
    fn from(e: zbus::fdo::Error) -> Error {
        match e {
            zbus::fdo::Error::AccessDenied(m) => Error::AccessDenied(m),
            zbus::fdo::Error::InvalidArgs(m) => Error::InvalidArgument(m),
            other => Error::Failed(other.description().unwrap_or_default().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_of(e: &Error) -> zbus::Message {
        let call = zbus::Message::method_call("/org/vmha/Vmha1", "Start")
            .unwrap()
            .sender(":1.7")
            .unwrap()
            .build(&())
            .unwrap();
        e.create_reply(&call.header()).unwrap()
    }

    #[test]
    fn errors_travel_with_their_name_and_message() {
        let sent = [
            Error::UnknownVm("unknown VM vm9".into()),
            Error::UnknownHost("h".into()),
            Error::UnknownGroup("g".into()),
            Error::NotQuorate("q".into()),
            Error::NotReady("r".into()),
            Error::AccessDenied("a".into()),
            Error::InvalidArgument("i".into()),
            Error::Conflict("c".into()),
            Error::GuestRefused("gr".into()),
            Error::GuestUnreachable("gu".into()),
            Error::Libvirt("l".into()),
            Error::Cib("cib".into()),
            Error::Failed("f".into()),
        ];
        assert_eq!(sent.len(), Error::NAMES.len());
        for (e, short) in sent.iter().zip(Error::NAMES) {
            assert_eq!(e.name().as_str(), format!("org.vmha.Vmha1.Error.{short}"));
            assert_eq!(e.short_name(), short);
            let reply = reply_of(e);
            let back = Error::from(zbus::Error::from(reply));
            assert_eq!(back.name(), e.name(), "{back:?}");
            assert_eq!(back.message(), e.message());
            assert_eq!(back.to_string(), e.message());
        }
    }

    #[test]
    fn other_errors_stay_zbus_errors() {
        let bus = zbus::Error::MethodError(
            zbus::names::OwnedErrorName::try_from("org.freedesktop.DBus.Error.ServiceUnknown").unwrap(),
            Some("The name is not activatable".into()),
            zbus::Message::method_call("/", "X").unwrap().build(&()).unwrap(),
        );
        let e = Error::from(bus);
        assert!(matches!(e, Error::ZBus(_)));
        assert_eq!(e.short_name(), "org.freedesktop.DBus.Error.ServiceUnknown");
        assert_eq!(e.message(), "The name is not activatable");
        assert!(matches!(
            Error::from(zbus::fdo::Error::AccessDenied("no".into())),
            Error::AccessDenied(m) if m == "no"
        ));
        assert!(matches!(
            Error::from(zbus::fdo::Error::InvalidArgs("bad".into())),
            Error::InvalidArgument(m) if m == "bad"
        ));
    }

    #[test]
    fn errors_travel_by_their_class_name() {
        for name in Error::NAMES {
            let e = Error::from_class(name, "m".into());
            assert_eq!((e.short_name().as_str(), e.message().as_str()), (name, "m"));
        }
        assert!(matches!(Error::from_class("Nonsense", "m".into()), Error::Failed(_)));
    }

    #[test]
    fn every_error_name_is_documented() {
        let docs = include_str!("../../docs/dbus-api.md");
        let xml = include_str!("../../packaging/dbus/interfaces/org.vmha.Vmha1.Cluster.xml");
        for name in Error::NAMES {
            assert!(
                docs.contains(&format!("`{ERROR_PREFIX}.{name}`")),
                "docs/dbus-api.md does not list {name}"
            );
            assert!(
                xml.lines().any(|l| l.trim_start().starts_with(&format!("{name} "))),
                "org.vmha.Vmha1.Cluster.xml does not list {name}"
            );
        }
    }
}
