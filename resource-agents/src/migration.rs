//! Planning a live migration: the target's libvirt URI, the data-stream URI, the migration flags.

use virt_sys as sys;

use crate::params::{is_libvirt_uri, MigrationParams};

/// Everything `migrate_to` passes to `virDomainMigrateToURI3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationPlan {
    /// libvirt URI of the target's daemon (the `dconnuri`); the source libvirtd connects to it.
    pub target_uri: String,
    /// Hypervisor data-stream URI (`VIR_MIGRATE_PARAM_URI`), when one must be forced.
    pub data_uri: Option<String>,
    /// `virDomainMigrateFlags`.
    pub flags: u32,
    /// `VIR_MIGRATE_PARAM_BANDWIDTH` in MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    /// For `virDomainMigrateSetMaxDowntime`, in ms.
    pub max_downtime_ms: Option<u64>,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the local hypervisor URI {0:?} has no driver://host/path form to derive a target URI from")]
    UnusableHypervisorUri(String),
    #[error("the target URI {0:?} built for the migration is not a libvirt URI")]
    BadTargetUri(String),
}

/// Live migration, managed peer-to-peer by the source libvirtd, aborted on I/O errors.
///
/// Peer-to-peer means libvirtd drives all phases itself (the guest is resumed on the target only
/// after the source has stopped, and resumed on the source if the target fails), even if this
/// agent dies. A transient domain (from `config`) stays transient; a persistent one (`domain`
/// only) gets its definition updated on the target (`PERSIST_DEST`) but kept on the source
/// (no `UNDEFINE_SOURCE`), since every node must keep it to restart the VM after a failover.
///
/// `shared_storage` (the operator's word that every disk is on storage all nodes share, which libvirt
/// cannot tell for every kind) adds `UNSAFE`: libvirt then skips its storage checks instead of refusing
/// ("Migration without shared storage is unsafe").
pub fn migration_flags(persistent: bool, shared_storage: bool) -> u32 {
    let mut flags = sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER | sys::VIR_MIGRATE_ABORT_ON_ERROR;
    if persistent {
        flags |= sys::VIR_MIGRATE_PERSIST_DEST;
    }
    if shared_storage {
        flags |= sys::VIR_MIGRATE_UNSAFE;
    }
    flags
}

/// The host name through which to reach `node`: the migration network suffix goes after the
/// first label (`node2.example.com` + `-mig` = `node2-mig.example.com`).
pub fn target_host(node: &str, suffix: Option<&str>) -> String {
    match suffix {
        None => node.to_owned(),
        Some(suffix) => match node.split_once('.') {
            Some((first, rest)) => format!("{first}{suffix}.{rest}"),
            None => format!("{node}{suffix}"),
        },
    }
}

/// Builds the plan for migrating to cluster node `target_node`.
pub fn plan(
    hypervisor: &str,
    params: &MigrationParams,
    target_node: &str,
    persistent: bool,
) -> Result<MigrationPlan, PlanError> {
    let host = target_host(target_node, params.network_suffix.as_deref());
    let target_uri = match &params.remote_uri {
        Some(uri) => uri.replace("%n", target_node),
        None => derive_target_uri(hypervisor, params.transport.as_deref(), params.user.as_deref(), &host)?,
    };
    if !is_libvirt_uri(&target_uri) {
        return Err(PlanError::BadTargetUri(target_uri));
    }
    let driver = hypervisor.split(['+', ':']).next().unwrap_or_default();
    let data_uri = match (&params.migrate_uri, &params.network_suffix) {
        (Some(uri), _) => Some(uri.replace("%n", &host)),
        (None, Some(_)) if driver == "qemu" => Some(format!("tcp://{host}")),
        (None, _) => None,
    };
    Ok(MigrationPlan {
        target_uri,
        data_uri,
        flags: migration_flags(persistent, params.shared_storage),
        bandwidth_mib_s: Some(params.speed_mib_s).filter(|s| *s > 0),
        max_downtime_ms: Some(params.downtime_ms).filter(|d| *d > 0),
    })
}

/// `driver[+transport]://[user@]host[:port]/path` from the local URI: the driver, port and path
/// are kept, the host replaced, the transport taken from `transport` or else kept; a query (such
/// as `?socket=`, which names a local file) is dropped.
fn derive_target_uri(
    hypervisor: &str,
    transport: Option<&str>,
    user: Option<&str>,
    host: &str,
) -> Result<String, PlanError> {
    let unusable = || PlanError::UnusableHypervisorUri(hypervisor.to_owned());
    let (scheme, rest) = hypervisor.split_once("://").ok_or_else(unusable)?;
    let (driver, local_transport) = match scheme.split_once('+') {
        Some((driver, t)) => (driver, Some(t)),
        None => (scheme, None),
    };
    let rest = rest.split('?').next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let port = authority
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let transport = match transport.or(local_transport) {
        Some("unix") | None => String::new(),
        Some(t) => format!("+{t}"),
    };
    let user = user.map(|u| format!("{u}@")).unwrap_or_default();
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    if driver.is_empty() {
        return Err(unusable());
    }
    Ok(format!("{driver}{transport}://{user}{host}{port}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> MigrationParams {
        MigrationParams::default()
    }

    #[test]
    fn suffix_goes_after_the_first_label() {
        let table = [
            ("node2", None, "node2"),
            ("node2", Some("-mig"), "node2-mig"),
            ("node2.example.com", Some("-mig"), "node2-mig.example.com"),
            ("node2.example.com", Some(".mig"), "node2.mig.example.com"),
        ];
        for (node, suffix, expected) in table {
            assert_eq!(target_host(node, suffix), expected, "{node} {suffix:?}");
        }
    }

    #[test]
    fn target_uri_scenarios() {
        // (hypervisor, transport, user, suffix, remote_uri, expected target URI)
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
        );
        let table: &[Row] = &[
            ("qemu:///system", None, None, None, None, "qemu://node2/system"),
            (
                "qemu:///system",
                Some("ssh"),
                None,
                None,
                None,
                "qemu+ssh://node2/system",
            ),
            (
                "qemu:///system",
                Some("tcp"),
                None,
                Some("-mig"),
                None,
                "qemu+tcp://node2-mig/system",
            ),
            (
                "qemu:///system",
                Some("ssh"),
                Some("ha"),
                None,
                None,
                "qemu+ssh://ha@node2/system",
            ),
            (
                "qemu+ssh://node1/system",
                None,
                None,
                None,
                None,
                "qemu+ssh://node2/system",
            ),
            (
                "qemu+tls://node1:16514/system",
                Some("tcp"),
                None,
                None,
                None,
                "qemu+tcp://node2:16514/system",
            ),
            (
                "qemu+unix:///system?socket=/run/s",
                None,
                None,
                None,
                None,
                "qemu://node2/system",
            ),
            (
                "qemu:///session",
                Some("ssh"),
                None,
                None,
                None,
                "qemu+ssh://node2/session",
            ),
            ("xen://", None, None, None, None, "xen://node2/"),
            (
                "qemu:///system",
                Some("ssh"),
                Some("ha"),
                Some("-mig"),
                Some("qemu+tls://%n.lan/system"),
                "qemu+tls://node2.lan/system",
            ),
        ];
        for (hv, transport, user, suffix, remote, expected) in table {
            let p = MigrationParams {
                transport: transport.map(str::to_owned),
                user: user.map(str::to_owned),
                network_suffix: suffix.map(str::to_owned),
                remote_uri: remote.map(str::to_owned),
                ..params()
            };
            let plan = plan(hv, &p, "node2", false).expect(hv);
            assert_eq!(plan.target_uri, *expected, "{hv} {transport:?} {user:?} {suffix:?}");
        }
    }

    #[test]
    fn data_uri_follows_suffix_or_explicit_value() {
        let plain = plan("qemu:///system", &params(), "node2", false).expect("plan");
        assert_eq!(plain.data_uri, None);

        let suffixed = MigrationParams {
            network_suffix: Some("-mig".into()),
            ..params()
        };
        let p = plan("qemu:///system", &suffixed, "node2.lan", false).expect("plan");
        assert_eq!(p.data_uri.as_deref(), Some("tcp://node2-mig.lan"));
        let xen = plan("xen:///system", &suffixed, "node2", false).expect("plan");
        assert_eq!(xen.data_uri, None, "only QEMU takes a tcp:// data URI");

        let explicit = MigrationParams {
            network_suffix: Some("-mig".into()),
            migrate_uri: Some("tcp://%n:49152".into()),
            ..params()
        };
        let p = plan("qemu:///system", &explicit, "node2", false).expect("plan");
        assert_eq!(p.data_uri.as_deref(), Some("tcp://node2-mig:49152"));
    }

    #[test]
    fn flags_keep_transient_domains_transient() {
        let live_p2p = sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER;
        let transient = migration_flags(false, false);
        assert_eq!(transient & live_p2p, live_p2p);
        assert_ne!(transient & sys::VIR_MIGRATE_ABORT_ON_ERROR, 0);
        assert_eq!(transient & sys::VIR_MIGRATE_PERSIST_DEST, 0);
        let persistent = migration_flags(true, false);
        assert_ne!(persistent & sys::VIR_MIGRATE_PERSIST_DEST, 0);
        for flags in [transient, persistent] {
            assert_eq!(flags & sys::VIR_MIGRATE_UNDEFINE_SOURCE, 0);
            assert_eq!(flags & sys::VIR_MIGRATE_OFFLINE, 0);
            assert_eq!(
                flags & sys::VIR_MIGRATE_UNSAFE,
                0,
                "libvirt's storage checks stay on by default"
            );
        }
    }

    #[test]
    fn declared_shared_storage_skips_libvirts_storage_checks() {
        let shared = MigrationParams {
            shared_storage: true,
            ..params()
        };
        for persistent in [false, true] {
            let p = plan("qemu:///system", &shared, "node2", persistent).expect("plan");
            assert_ne!(p.flags & sys::VIR_MIGRATE_UNSAFE, 0);
            assert_eq!(p.flags & !sys::VIR_MIGRATE_UNSAFE, migration_flags(persistent, false));
            let plain = plan("qemu:///system", &params(), "node2", persistent).expect("plan");
            assert_eq!(plain.flags & sys::VIR_MIGRATE_UNSAFE, 0);
        }
    }

    #[test]
    fn speed_and_downtime_are_optional() {
        let p = plan("qemu:///system", &params(), "n", false).expect("plan");
        assert_eq!((p.bandwidth_mib_s, p.max_downtime_ms), (None, None));
        let tuned = MigrationParams {
            speed_mib_s: 100,
            downtime_ms: 250,
            ..params()
        };
        let p = plan("qemu:///system", &tuned, "n", false).expect("plan");
        assert_eq!((p.bandwidth_mib_s, p.max_downtime_ms), (Some(100), Some(250)));
    }

    #[test]
    fn unusable_uris_are_reported() {
        let err = plan("qemu", &params(), "n", false).expect_err("no ://");
        assert!(matches!(err, PlanError::UnusableHypervisorUri(_)), "{err}");
        let bad_remote = MigrationParams {
            remote_uri: Some("%n".into()),
            ..params()
        };
        let err = plan("qemu:///system", &bad_remote, "n", false).expect_err("bad remote");
        assert!(matches!(err, PlanError::BadTargetUri(_)), "{err}");
    }
}
