//! vmhad's D-Bus API, shared by vmhad, the `vmha` CLI and the resource agent: the versioned names, the
//! object paths (with the escaping of names into path segments), the typed errors vmhad replies with
//! ([`Error`]) and `#[zbus::proxy]` client traits for every interface ([`proxy`]). The interfaces are
//! described in `packaging/dbus/interfaces/*.xml`; a test of vmhad compares what it serves with them.
//!
//! [`json`] is the versioned schema of `vmha --output json`.
//!
//! This crate depends on zbus and serde only: the resource agent links it and is started for every monitor.

mod error;
pub mod json;
pub mod proxy;

pub use error::{Error, ERROR_PREFIX};

/// Well-known bus name of vmhad on the system bus.
pub const BUS_NAME: &str = "org.vmha.Vmha1";
/// Root object: the Cluster interface and the ObjectManager of all hosts, VMs and jobs.
pub const ROOT_PATH: &str = "/org/vmha/Vmha1";
/// The object serving the readiness reports of every host (`vmha check`).
pub const READINESS_PATH: &str = "/org/vmha/Vmha1/readiness";
pub const CLUSTER_INTERFACE: &str = "org.vmha.Vmha1.Cluster";
pub const HOST_INTERFACE: &str = "org.vmha.Vmha1.Host";
pub const VM_INTERFACE: &str = "org.vmha.Vmha1.VirtualMachine";
pub const JOB_INTERFACE: &str = "org.vmha.Vmha1.Job";
pub const READINESS_INTERFACE: &str = "org.vmha.Vmha1.Readiness";
/// polkit action a non-root caller needs for any change.
pub const MANAGE_ACTION: &str = "org.vmha.Vmha1.manage";

/// Escapes a name into one object path segment: `[A-Za-z0-9]` stay, every other byte becomes `_xx`
/// (lower-case hex), as systemd does; the empty name is `_`.
pub fn path_segment(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            s.push(char::from(b));
        } else {
            s.push('_');
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    if s.is_empty() {
        s.push('_');
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The object of cluster host `name`.
pub fn host_path(name: &str) -> String {
    format!("{ROOT_PATH}/host/{}", path_segment(name))
}

/// The object of VM resource `name`.
pub fn vm_path(name: &str) -> String {
    format!("{ROOT_PATH}/vm/{}", path_segment(name))
}

/// The object of job `id`.
pub fn job_path(id: u64) -> String {
    format!("{ROOT_PATH}/job/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_valid_distinct_path_segments() {
        assert_eq!(path_segment("vm1"), "vm1");
        assert_eq!(path_segment("web-1.a_b"), "web_2d1_2ea_5fb");
        assert_ne!(path_segment("a-b"), path_segment("a_b"));
        assert_eq!(path_segment(""), "_");
        assert_eq!(path_segment("\u{e9}"), "_c3_a9");
        for name in ["vm1", "web-1.a_b", "x", "", "é/ü"] {
            assert!(zbus::zvariant::ObjectPath::try_from(vm_path(name)).is_ok());
            assert!(zbus::zvariant::ObjectPath::try_from(host_path(name)).is_ok());
        }
        assert_eq!(vm_path("db-1.a"), "/org/vmha/Vmha1/vm/db_2d1_2ea");
        assert_eq!(vm_path(""), "/org/vmha/Vmha1/vm/_");
        assert_eq!(job_path(7), "/org/vmha/Vmha1/job/7");
    }

    #[test]
    fn names_are_versioned_under_the_bus_name() {
        for iface in [
            CLUSTER_INTERFACE,
            HOST_INTERFACE,
            VM_INTERFACE,
            JOB_INTERFACE,
            READINESS_INTERFACE,
            MANAGE_ACTION,
            ERROR_PREFIX,
        ] {
            assert!(iface.starts_with(&format!("{BUS_NAME}.")), "{iface}");
        }
        assert!(READINESS_PATH.starts_with(ROOT_PATH));
    }
}
