//! vmhad's D-Bus objects: the Cluster (root), one Host per cluster node, one VirtualMachine per VM
//! resource, and Job objects for long operations. Properties read the current [`Snapshot`]; after every
//! state change [`publish`] adds and removes objects and emits PropertiesChanged for what changed.

mod cluster;
mod host;
mod vm;

use std::sync::Arc;

use zbus::Connection;

use crate::api::{host_path, vm_path, Error};
use crate::state::{Shared, Snapshot};

/// What vmhad's methods return: a typed error (`org.vmha.Vmha1.Error.*`) on failure.
type Result<T> = std::result::Result<T, Error>;

/// The current snapshot, when vmhad has read the cluster (NotReady otherwise). The checks of the
/// operations refuse the same with a plain message; these come first so that the class is known.
fn ready(shared: &Shared) -> Result<Arc<Snapshot>> {
    let snap = shared.snapshot();
    if snap.view.is_none() {
        return Err(Error::NotReady(if snap.cib_connected {
            "vmhad has not read the cluster yet".into()
        } else {
            "vmhad cannot read the CIB right now (still connecting, or Pacemaker is unreachable)".into()
        }));
    }
    Ok(snap)
}

/// UnknownVm unless `name` is a cluster VM.
fn known_vm(snap: &Snapshot, name: &str) -> Result<()> {
    match snap.view.as_ref().and_then(|v| v.vm(name)) {
        Some(_) => Ok(()),
        None => Err(Error::UnknownVm(format!("unknown VM {name}"))),
    }
}

/// UnknownHost unless `name` is a cluster host.
fn known_host(snap: &Snapshot, name: &str) -> Result<()> {
    match snap.view.as_ref().and_then(|v| v.host(name)) {
        Some(_) => Ok(()),
        None => Err(Error::UnknownHost(format!("unknown host {name}"))),
    }
}

/// An operation's error as a D-Bus error, with its message: what is wrong with the request is
/// `InvalidArgs`, the rest `Failed`.
pub use cluster::ClusterObject;
pub use host::HostObject;
pub use vm::VmObject;

macro_rules! emit_all {
    ($iface:expr, $emitter:expr; $($prop:ident),+ $(,)?) => {{
        $( $iface.$prop($emitter).await?; )+
    }};
}

/// Brings the objects on the bus in line with `new` (after `old`): adds and removes host and VM objects
/// and emits PropertiesChanged for whatever changed, plus Cluster.Event signals for membership and DC
/// changes.
pub async fn publish(conn: &Connection, shared: &Arc<Shared>, old: &Snapshot, new: &Snapshot) -> zbus::Result<()> {
    let server = conn.object_server();
    let root = server.interface::<_, ClusterObject>(crate::api::ROOT_PATH).await?;
    let cluster = root.get().await;
    let e = root.signal_emitter();
    if old.view.as_ref().map(|v| &v.cluster_name) != new.view.as_ref().map(|v| &v.cluster_name) {
        cluster.name_changed(e).await?;
    }
    if old.quorate() != new.quorate() {
        cluster.quorate_changed(e).await?;
        ClusterObject::event(e, "quorum", "", if new.quorate() { "quorate" } else { "quorum lost" }).await?;
    }
    if old.dc() != new.dc() {
        cluster.designated_controller_changed(e).await?;
        ClusterObject::event(e, "dc", new.dc().unwrap_or(""), "designated controller changed").await?;
    }
    let (old_members, new_members) = (old.members(), new.members());
    if old_members != new_members {
        cluster.members_changed(e).await?;
        for m in new_members.iter().filter(|m| !old_members.contains(m)) {
            ClusterObject::event(e, "host-joined", m, "joined the cluster").await?;
        }
        for m in old_members.iter().filter(|m| !new_members.contains(m)) {
            ClusterObject::event(e, "host-left", m, "left the cluster").await?;
        }
    }
    let agents = |s: &Snapshot| s.membership.as_ref().map(|m| m.agents.clone());
    if agents(old) != agents(new) {
        cluster.agents_changed(e).await?;
    }
    if old.view.as_ref().map(|v| v.stonith_enabled) != new.view.as_ref().map(|v| v.stonith_enabled) {
        cluster.stonith_enabled_changed(e).await?;
    }
    if old.cib_connected != new.cib_connected {
        cluster.connected_changed(e).await?;
    }
    if old.view.as_ref().map(|v| &v.version) != new.view.as_ref().map(|v| &v.version) {
        cluster.cib_version_changed(e).await?;
    }
    if old.view.as_ref().map(|v| &v.vclusters) != new.view.as_ref().map(|v| &v.vclusters) {
        cluster.virtual_clusters_changed(e).await?;
    }
    if old.view.as_ref().map(|v| &v.groups) != new.view.as_ref().map(|v| &v.groups) {
        cluster.elastic_groups_changed(e).await?;
    }
    drop(cluster);

    let changes = vmha_ops::state::Changes::between(old, new);
    for name in &changes.hosts_removed {
        server.remove::<HostObject, _>(host_path(name)).await?;
    }
    for name in &changes.hosts_added {
        let host = HostObject {
            shared: Arc::clone(shared),
            name: name.clone(),
        };
        server.at(host_path(name), host).await?;
    }
    for name in &changes.hosts_changed {
        let iface = server.interface::<_, HostObject>(host_path(name)).await?;
        let h = iface.get().await;
        let e = iface.signal_emitter();
        emit_all!(h, e; state_changed, standby_changed, maintenance_changed, is_designated_controller_changed, utilization_changed);
    }

    for name in &changes.vms_removed {
        server.remove::<VmObject, _>(vm_path(name)).await?;
    }
    for name in &changes.vms_added {
        let vm = VmObject {
            shared: Arc::clone(shared),
            name: name.clone(),
        };
        server.at(vm_path(name), vm).await?;
    }
    for name in &changes.vms_changed {
        let iface = server.interface::<_, VmObject>(vm_path(name)).await?;
        let vm = iface.get().await;
        let e = iface.signal_emitter();
        emit_all!(vm, e; agent_changed, state_changed, hosts_changed, failed_on_changed, fail_counts_changed,
            target_role_changed, managed_changed, config_changed, constraints_changed, utilization_changed);
    }
    for (name, failed_on) in &changes.vms_failed {
        let detail = format!("failed on {}", failed_on.join(","));
        ClusterObject::event(root.signal_emitter(), "vm-failed", name, &detail).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cluster::archive_file;

    fn fd(f: std::fs::File) -> zbus::zvariant::OwnedFd {
        zbus::zvariant::OwnedFd::from(std::os::fd::OwnedFd::from(f))
    }

    #[test]
    fn archive_descriptors_must_be_open_the_right_way() {
        let path = std::env::temp_dir().join(format!("vmha-objects-test-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let read_only = std::fs::File::open(&path).unwrap();
        let e = archive_file(fd(read_only), true).unwrap_err().to_string();
        assert!(e.contains("is not open for writing"), "{e}");
        let write_only = std::fs::File::options().write(true).open(&path).unwrap();
        let e = archive_file(fd(write_only), false).unwrap_err().to_string();
        assert!(e.contains("is not open for reading"), "{e}");
        assert!(archive_file(fd(std::fs::File::open(&path).unwrap()), false).is_ok());
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let e = archive_file(fd(dir), false).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }
}
