//! What vmhad knows about the cluster at one moment: the CIB's view plus Corosync's membership and quorum.

use std::collections::HashMap;

use vmha_model::cib::{HostState, HostView, VmView};
use vmha_model::{ClusterView, VmState};

/// Corosync's word on membership and quorum (from the Corosync client libraries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub members: Vec<String>,
    pub quorate: bool,
    /// Hosts where vmhad runs (members of the `vmhad` process group).
    pub agents: Vec<String>,
}

/// One consistent state of the cluster as this vmhad knows it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The CIB's view; `None` until the CIB was read, or while it cannot be.
    pub view: Option<ClusterView>,
    /// Corosync's view; `None` while vmhad is not connected to Corosync.
    pub membership: Option<Membership>,
    /// True while vmhad is connected to the CIB (false: `view` is the last one read, possibly stale).
    pub cib_connected: bool,
}

impl Snapshot {
    /// Cluster members: Corosync's when known, else the hosts the CIB shows online.
    pub fn members(&self) -> Vec<String> {
        if let Some(m) = &self.membership {
            return m.members.clone();
        }
        self.view
            .as_ref()
            .map(|v| v.online_hosts().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    pub fn quorate(&self) -> bool {
        match &self.membership {
            Some(m) => m.quorate,
            None => self.view.as_ref().is_some_and(|v| v.quorate),
        }
    }

    pub fn dc(&self) -> Option<&str> {
        self.view.as_ref()?.dc.as_deref()
    }

    pub fn host_names(&self) -> Vec<String> {
        self.view
            .as_ref()
            .map(|v| v.hosts.iter().map(|h| h.name.clone()).collect())
            .unwrap_or_default()
    }

    pub fn vm_names(&self) -> Vec<String> {
        self.view
            .as_ref()
            .map(|v| v.vms.iter().map(|h| h.name.clone()).collect())
            .unwrap_or_default()
    }

    pub fn host_online(&self, name: &str) -> bool {
        self.view
            .as_ref()
            .and_then(|v| v.host(name))
            .is_some_and(|h| h.state == HostState::Online)
    }
}

/// What changed in the hosts and VMs from one snapshot to the next, by name: found with one pass over
/// each side (a change to one VM in a CIB of thousands costs a lookup per VM, not a search).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub hosts_added: Vec<String>,
    pub hosts_removed: Vec<String>,
    /// Hosts whose view changed, or that became or stopped being the DC.
    pub hosts_changed: Vec<String>,
    pub vms_added: Vec<String>,
    pub vms_removed: Vec<String>,
    pub vms_changed: Vec<String>,
    /// VMs that went into the failed state, with the hosts they failed on.
    pub vms_failed: Vec<(String, Vec<String>)>,
}

fn hosts_by_name(s: &Snapshot) -> HashMap<&str, &HostView> {
    s.view
        .as_ref()
        .map(|v| v.hosts.iter().map(|h| (h.name.as_str(), h)).collect())
        .unwrap_or_default()
}

fn vms_by_name(s: &Snapshot) -> HashMap<&str, &VmView> {
    s.view
        .as_ref()
        .map(|v| v.vms.iter().map(|vm| (vm.name.as_str(), vm)).collect())
        .unwrap_or_default()
}

impl Changes {
    pub fn between(old: &Snapshot, new: &Snapshot) -> Changes {
        let mut c = Changes::default();
        let (before, after) = (hosts_by_name(old), hosts_by_name(new));
        let dc_flip = |name: &str| (old.dc() == Some(name)) != (new.dc() == Some(name));
        for h in new.view.iter().flat_map(|v| &v.hosts) {
            match before.get(h.name.as_str()) {
                None => c.hosts_added.push(h.name.clone()),
                Some(b) if *b != h || dc_flip(&h.name) => c.hosts_changed.push(h.name.clone()),
                Some(_) => {}
            }
        }
        for h in old.view.iter().flat_map(|v| &v.hosts) {
            if !after.contains_key(h.name.as_str()) {
                c.hosts_removed.push(h.name.clone());
            }
        }
        let (before, after) = (vms_by_name(old), vms_by_name(new));
        for vm in new.view.iter().flat_map(|v| &v.vms) {
            match before.get(vm.name.as_str()) {
                None => c.vms_added.push(vm.name.clone()),
                Some(b) if *b != vm => {
                    c.vms_changed.push(vm.name.clone());
                    if vm.state != b.state && vm.state == VmState::Failed {
                        c.vms_failed.push((vm.name.clone(), vm.failed_on.clone()));
                    }
                }
                Some(_) => {}
            }
        }
        for vm in old.view.iter().flat_map(|v| &v.vms) {
            if !after.contains_key(vm.name.as_str()) {
                c.vms_removed.push(vm.name.clone());
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmha_model::cib::HostState;

    fn host(name: &str) -> HostView {
        HostView {
            name: name.into(),
            id: name.into(),
            state: HostState::Online,
            standby: false,
            maintenance: false,
            utilization: Default::default(),
        }
    }

    fn vm(name: &str, state: VmState) -> VmView {
        VmView {
            name: name.into(),
            agent: "ocf:vmha:VirtualMachine".into(),
            config: None,
            state,
            hosts: vec![],
            failed_on: vec!["h2".into()],
            fail_counts: Default::default(),
            target_role: None,
            managed: true,
            utilization: Default::default(),
            constraints: vec![],
            params: Default::default(),
            meta: Default::default(),
        }
    }

    fn snap(dc: &str, hosts: Vec<HostView>, vms: Vec<VmView>) -> Snapshot {
        Snapshot {
            view: Some(ClusterView {
                cluster_name: None,
                version: "0.1.0".into(),
                dc: Some(dc.into()),
                quorate: true,
                stonith_enabled: true,
                capture_staging: true,
                replications: Default::default(),
                hosts,
                vms,
                vclusters: Default::default(),
                groups: Vec::new(),
                policy_fingerprint: None,
            }),
            membership: None,
            cib_connected: true,
        }
    }

    #[test]
    fn changes_name_what_was_added_removed_and_changed() {
        let old = snap(
            "h1",
            vec![host("h1"), host("h2"), host("h3")],
            vec![
                vm("a", VmState::Running),
                vm("b", VmState::Running),
                vm("c", VmState::Stopped),
            ],
        );
        let mut h3 = host("h3");
        h3.standby = true;
        let new = snap(
            "h2",
            vec![host("h1"), host("h2"), h3, host("h4")],
            vec![
                vm("a", VmState::Running),
                vm("b", VmState::Failed),
                vm("d", VmState::Stopped),
            ],
        );
        let c = Changes::between(&old, &new);
        assert_eq!(c.hosts_added, ["h4"]);
        assert!(c.hosts_removed.is_empty());
        assert_eq!(
            c.hosts_changed,
            ["h1", "h2", "h3"],
            "the DC moved from h1 to h2; h3 went standby"
        );
        assert_eq!(c.vms_added, ["d"]);
        assert_eq!(c.vms_removed, ["c"]);
        assert_eq!(c.vms_changed, ["b"]);
        assert_eq!(c.vms_failed, [("b".to_string(), vec!["h2".to_string()])]);
        assert_eq!(Changes::between(&new, &new), Changes::default());
        let gone = Changes::between(&new, &Snapshot::default());
        assert_eq!(gone.hosts_removed.len(), 4);
        assert_eq!(gone.vms_removed, ["a", "b", "d"]);
    }
}
