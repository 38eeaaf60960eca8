//! What vmhad knows about the cluster at one moment: the CIB's view plus Corosync's membership and quorum.

use vmha_model::cib::HostState;
use vmha_model::ClusterView;

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
