//! The VirtualMachine objects (`/org/vmha/Vmha1/vm/<name>`, `org.vmha.Vmha1.VirtualMachine`).

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::zvariant::OwnedObjectPath;
use zbus::{interface, Connection};

use crate::api::Error;
use crate::auth::authorize_change;
use crate::errors::op_error;
use crate::guest::GuestError;
use crate::jobs::{self, Job, Operation, VmOp};
use crate::state::Shared;

use super::{known_host, known_vm, ready, Result};

/// One VM resource: `/org/vmha/Vmha1/vm/<name>`, interface `org.vmha.Vmha1.VirtualMachine`.
#[derive(Debug)]
pub struct VmObject {
    pub shared: Arc<Shared>,
    pub name: String,
}

impl VmObject {
    fn view(&self) -> Option<vmha_model::VmView> {
        self.shared.snapshot().view.as_ref()?.vm(&self.name).cloned()
    }

    async fn operation(&self, conn: &Connection, header: &Header<'_>, what: &str, op: VmOp) -> Result<OwnedObjectPath> {
        authorize_change(conn, header, &format!("{what} VM {}", self.name)).await?;
        let snap = ready(&self.shared)?;
        known_vm(&snap, &self.name)?;
        if let VmOp::Move { host, .. } = &op {
            known_host(&snap, host)?;
        }
        let op = Operation::Vm(op);
        jobs::check(&self.shared, &op).await.map_err(op_error)?;
        Ok(Job::start(conn, &self.shared, op).await?)
    }
}

#[interface(name = "org.vmha.Vmha1.VirtualMachine")]
impl VmObject {
    #[zbus(property)]
    async fn name(&self) -> String {
        self.name.clone()
    }

    /// Resource agent, e.g. `ocf:vmha:VirtualMachine`.
    #[zbus(property)]
    async fn agent(&self) -> String {
        self.view().map(|v| v.agent).unwrap_or_default()
    }

    /// `running`, `stopped`, `starting`, `stopping`, `migrating` or `failed`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.view()
            .and_then(|v| serde_json::to_value(v.state).ok()?.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Hosts the VM runs on (one, except while something is wrong).
    #[zbus(property)]
    async fn hosts(&self) -> Vec<String> {
        self.view().map(|v| v.hosts).unwrap_or_default()
    }

    #[zbus(property)]
    async fn failed_on(&self) -> Vec<String> {
        self.view().map(|v| v.failed_on).unwrap_or_default()
    }

    #[zbus(property)]
    async fn fail_counts(&self) -> HashMap<String, u32> {
        self.view()
            .map(|v| v.fail_counts.into_iter().collect())
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn target_role(&self) -> String {
        self.view().and_then(|v| v.target_role).unwrap_or_default()
    }

    #[zbus(property)]
    async fn managed(&self) -> bool {
        self.view().is_some_and(|v| v.managed)
    }

    /// Domain XML file.
    #[zbus(property)]
    async fn config(&self) -> String {
        self.view().and_then(|v| v.config).unwrap_or_default()
    }

    /// Constraints naming the VM, one line each.
    #[zbus(property)]
    async fn constraints(&self) -> Vec<String> {
        self.view()
            .map(|v| {
                v.constraints
                    .into_iter()
                    .map(|c| format!("{}: {}", c.id, c.summary))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn utilization(&self) -> HashMap<String, String> {
        self.view()
            .map(|v| v.utilization.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Its health monitoring (issue 22): the settings from its resource parameters (monitoring,
    /// sensitivity, threshold_s, max_resets, reset_window_s, grace_s, app_action) and, on the host it runs
    /// on, what this vmhad sees now (heartbeats, last_heartbeat_ms_ago, application, application_reason).
    /// Read on demand: no PropertiesChanged.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn health(&self) -> HashMap<String, String> {
        let Some(v) = self.view() else {
            return HashMap::new();
        };
        let (settings, _) = vmha_model::health::HealthSettings::from_params(&v.params);
        let mut out: HashMap<String, String> = settings.summary().into_iter().collect();
        out.extend(self.shared.guests.health.status(&self.name));
        out
    }

    /// Starts the VM (target-role Started); the job ends when it runs.
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "start", VmOp::Start(self.name.clone()))
            .await
    }

    /// Stops the VM (target-role Stopped); the job ends when it is stopped everywhere.
    async fn stop(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "stop", VmOp::Stop(self.name.clone()))
            .await
    }

    /// Clears the VM's failures on `host` (empty: every host), as `pcs resource cleanup`: Pacemaker's
    /// attribute manager drops its fail counts and last-failure times, and each host showing a failure of
    /// it forgets that operation history and probes it again. Returns the hosts probed again. An unknown
    /// host is refused (UnknownHost) and changes nothing.
    async fn cleanup(
        &self,
        host: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<String>> {
        authorize_change(conn, &header, &format!("clean up VM {}", self.name)).await?;
        use crate::failures::CleanupError as E;
        crate::failures::cleanup(&self.shared, &self.name, &host)
            .await
            .map_err(|e| match e {
                E::UnknownVm(_) => Error::UnknownVm(e.to_string()),
                E::UnknownHost { .. } => Error::UnknownHost(e.to_string()),
                E::Agent { .. } => Error::InvalidArgument(e.to_string()),
                E::Cib { .. } | E::Attrd { .. } | E::Refresh { .. } | E::HealthBan { .. } => Error::Cib(e.to_string()),
            })
    }

    /// Live-migrates the VM to `host` through Pacemaker; the temporary constraint is removed afterwards.
    #[zbus(name = "Move")]
    async fn move_to(
        &self,
        host: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(
            conn,
            &header,
            "move",
            VmOp::Move {
                vm: self.name.clone(),
                host,
            },
        )
        .await
    }

    /// Sends request `name` (with `data_json`, a JSON object, possibly empty) to the VM's guest over the
    /// vmha guest channel and waits for its result, at most `timeout_ms` (the guest's deadline) plus one
    /// second: `done`, `refused` (with the guest's reason) or `failed` (with why). Any host's vmhad takes
    /// it: a VM running on another host is reached through that host's vmhad (Corosync CPG relay).
    async fn guest_request(
        &self,
        name: String,
        data_json: String,
        timeout_ms: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, String)> {
        authorize_change(conn, &header, &format!("guest request {name} to VM {}", self.name)).await?;
        // Wherever the VM runs: through the relay when that is another host.
        crate::relay::guest_request(&self.shared, &self.name, &name, &data_json, timeout_ms)
            .await
            .map_err(|e| match e {
                GuestError::Invalid(m) => Error::InvalidArgument(m),
                GuestError::Unreachable(m) => Error::GuestUnreachable(m),
                other @ (GuestError::NotHere { .. } | GuestError::NotConnected(_)) => {
                    Error::GuestUnreachable(other.to_string())
                }
            })
    }

    /// Removes a clone (as Remove) and deletes its domain XML file and disk overlays; refuses VMs that are
    /// not vmha clones.
    async fn destroy(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "destroy", VmOp::Destroy(self.name.clone()))
            .await
    }

    /// Stops the VM and removes its resource and the constraints naming it.
    async fn remove(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        self.operation(conn, &header, "remove", VmOp::Remove(self.name.clone()))
            .await
    }
}
