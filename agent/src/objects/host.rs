//! The Host objects (`/org/vmha/Vmha1/host/<name>`, `org.vmha.Vmha1.Host`).

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{interface, Connection};

use crate::auth::authorize_change;
use crate::errors::op_error;
use crate::jobs::{self};
use crate::state::Shared;

use super::{known_host, ready, Result};

/// One host: `/org/vmha/Vmha1/host/<name>`, interface `org.vmha.Vmha1.Host`.
#[derive(Debug)]
pub struct HostObject {
    pub shared: Arc<Shared>,
    pub name: String,
}

impl HostObject {
    fn view(&self) -> Option<vmha_model::HostView> {
        self.shared.snapshot().view.as_ref()?.host(&self.name).cloned()
    }

    async fn set_attribute(&self, conn: &Connection, header: &Header<'_>, attribute: &str, on: bool) -> Result<()> {
        authorize_change(conn, header, &format!("{attribute} of host {}", self.name)).await?;
        known_host(&*ready(&self.shared)?, &self.name)?;
        // Past the checks above, what fails is reading or changing the CIB.
        jobs::set_host_attribute(&self.shared, &self.name, attribute, on)
            .await
            .map_err(op_error)
    }
}

#[interface(name = "org.vmha.Vmha1.Host")]
impl HostObject {
    #[zbus(property)]
    async fn name(&self) -> String {
        self.name.clone()
    }

    /// `online`, `pending`, `unclean` (lost, not yet fenced) or `offline`.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.view()
            .map(|h| {
                serde_json::to_value(h.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn standby(&self) -> bool {
        self.view().is_some_and(|h| h.standby)
    }

    #[zbus(property)]
    async fn maintenance(&self) -> bool {
        self.view().is_some_and(|h| h.maintenance)
    }

    #[zbus(property)]
    async fn is_designated_controller(&self) -> bool {
        self.shared.snapshot().dc() == Some(self.name.as_str())
    }

    /// Capacity for placement (`cpu`, `hv_memory` in MiB).
    #[zbus(property)]
    async fn utilization(&self) -> HashMap<String, String> {
        self.view()
            .map(|h| h.utilization.into_iter().collect())
            .unwrap_or_default()
    }

    /// Standby: no VM may run here; running VMs are moved away by Pacemaker.
    async fn set_standby(
        &self,
        on: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.set_attribute(conn, &header, "standby", on).await
    }

    /// Maintenance: Pacemaker neither starts, stops nor monitors anything here.
    async fn set_maintenance(
        &self,
        on: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        self.set_attribute(conn, &header, "maintenance", on).await
    }
}
