//! vmha's D-Bus API: versioned names, object paths and the mapping of names into path segments.

/// Well-known bus name of vmhad on the system bus.
pub const BUS_NAME: &str = "org.vmha.Vmha1";
/// Root object: the Cluster interface and the ObjectManager of all hosts, VMs and jobs.
pub const ROOT_PATH: &str = "/org/vmha/Vmha1";
pub const CLUSTER_INTERFACE: &str = "org.vmha.Vmha1.Cluster";
pub const HOST_INTERFACE: &str = "org.vmha.Vmha1.Host";
pub const VM_INTERFACE: &str = "org.vmha.Vmha1.VirtualMachine";
pub const JOB_INTERFACE: &str = "org.vmha.Vmha1.Job";
/// polkit action a non-root caller needs for any change.
pub const MANAGE_ACTION: &str = "org.vmha.Vmha1.manage";

/// Escapes a name into one object path segment: `[A-Za-z0-9]` stay, every other byte becomes `_xx`
/// (lower-case hex), as systemd does.
pub fn path_segment(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("_{b:02x}"));
        }
    }
    if s.is_empty() {
        s.push('_');
    }
    s
}

pub fn host_path(name: &str) -> String {
    format!("{ROOT_PATH}/host/{}", path_segment(name))
}

pub fn vm_path(name: &str) -> String {
    format!("{ROOT_PATH}/vm/{}", path_segment(name))
}

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
        for name in ["vm1", "web-1.a_b", "x"] {
            assert!(zbus::zvariant::ObjectPath::try_from(vm_path(name)).is_ok());
        }
        assert_eq!(job_path(7), "/org/vmha/Vmha1/job/7");
    }
}
