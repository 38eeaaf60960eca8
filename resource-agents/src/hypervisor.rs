//! The libvirt side: one connection and the calls the actions make, each recorded in
//! [`Progress`] before it starts (for the deadline report) and failing with the VM and call named.
//!
//! Tests drive several actions over one [`Hypervisor`], since the state of libvirt's `test:///`
//! driver lives in its connection.

use std::path::Path;
use std::time::Duration;

use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters};
use virt_sys as sys;

use crate::deadline::Progress;
use crate::domain_state::Condition;
use crate::error::{is_no_domain, AgentError};
use crate::migration::MigrationPlan;

/// Whether the connection may change anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `virConnectOpenReadOnly`: enough to look at domain states, and cheaper to authorise.
    ReadOnly,
    ReadWrite,
}

/// An open libvirt connection.
#[derive(Debug)]
pub struct Hypervisor {
    conn: Connect,
    uri: String,
    progress: Progress,
}

/// How a shutdown request was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownRequest {
    /// With the requested method.
    AsRequested,
    /// The driver rejected the method; its default graceful method was used.
    DriverDefault,
}

impl Hypervisor {
    /// Opens `uri`. libvirt's default error printer is silenced: errors are reported once, as
    /// the exit reason.
    pub fn open(uri: &str, access: Access, progress: &Progress) -> Result<Hypervisor, AgentError> {
        virt::error::clear_error_callback();
        let call = match access {
            Access::ReadOnly => "virConnectOpenReadOnly",
            Access::ReadWrite => "virConnectOpen",
        };
        progress.enter(call);
        let opened = match access {
            Access::ReadOnly => Connect::open_read_only(Some(uri)),
            Access::ReadWrite => Connect::open(Some(uri)),
        };
        let conn = opened.map_err(|source| AgentError::Connect {
            uri: uri.to_owned(),
            call,
            source,
        })?;
        Ok(Hypervisor {
            conn,
            uri: uri.to_owned(),
            progress: progress.clone(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The domain called `name`, if libvirt knows it on this host.
    pub fn find(&self, name: &str) -> Result<Option<Vm<'_>>, AgentError> {
        self.progress.enter("virDomainLookupByName");
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Some(Vm {
                hv: self,
                dom,
                name: name.to_owned(),
            })),
            Err(e) if is_no_domain(&e) => Ok(None),
            Err(e) => Err(AgentError::libvirt(name, "virDomainLookupByName", e)),
        }
    }

    /// The condition of domain `name`; `None` if it does not exist (or vanished meanwhile, as a
    /// transient domain does when it stops).
    pub fn condition(&self, name: &str) -> Result<Option<Condition>, AgentError> {
        match self.find(name)? {
            Some(vm) => vm.condition(),
            None => Ok(None),
        }
    }

    /// `virDomainCreateXML`: boots a transient domain from `xml`.
    pub fn create_transient(&self, name: &str, xml: &str) -> Result<(), AgentError> {
        self.progress.enter("virDomainCreateXML");
        self.conn
            .create_domain_xml(xml, 0)
            .map(drop)
            .map_err(|e| AgentError::libvirt(name, "virDomainCreateXML", e))
    }

    /// `virDomainRestoreFlags`: resumes a domain saved to `path`, running (or in its saved
    /// state, if the driver does not support choosing; start resumes it then).
    pub fn restore(&self, name: &str, path: &Path) -> Result<(), AgentError> {
        self.progress.enter("virDomainRestoreFlags");
        let path = path.to_string_lossy();
        let restored = match self
            .conn
            .restore_domain_flags(&path, None, sys::VIR_DOMAIN_SAVE_RUNNING)
        {
            Err(e) if flags_unsupported(&e) => self.conn.restore_domain_flags(&path, None, 0),
            other => other,
        };
        restored.map_err(|e| AgentError::libvirt(name, "virDomainRestoreFlags", e))
    }

    /// The raw connection, for tests that arrange libvirt objects first.
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connect {
        &self.conn
    }

    /// Starts libvirt network `network` unless it is active.
    pub fn ensure_network_active(&self, vm: &str, network: &str) -> Result<(), AgentError> {
        self.progress.enter("virNetworkLookupByName");
        let net = self
            .conn
            .lookup_network_by_name(network)
            .map_err(|e| AgentError::libvirt(vm, "virNetworkLookupByName", e))?;
        self.progress.enter("virNetworkIsActive");
        let active = net
            .is_active()
            .map_err(|e| AgentError::libvirt(vm, "virNetworkIsActive", e))?;
        if !active {
            tracing::info!(vm, network, "starting libvirt network");
            self.progress.enter("virNetworkCreate");
            net.create()
                .map_err(|e| AgentError::libvirt(vm, "virNetworkCreate", e))?;
        }
        Ok(())
    }

    /// Starts storage pool `pool` unless it is active, in which case it is refreshed so that
    /// volumes created on other nodes are visible.
    pub fn ensure_pool_active(&self, vm: &str, pool: &str) -> Result<(), AgentError> {
        self.progress.enter("virStoragePoolLookupByName");
        let p = self
            .conn
            .lookup_storage_pool_by_name(pool)
            .map_err(|e| AgentError::libvirt(vm, "virStoragePoolLookupByName", e))?;
        self.progress.enter("virStoragePoolIsActive");
        let active = p
            .is_active()
            .map_err(|e| AgentError::libvirt(vm, "virStoragePoolIsActive", e))?;
        if active {
            self.progress.enter("virStoragePoolRefresh");
            p.refresh(0)
                .map_err(|e| AgentError::libvirt(vm, "virStoragePoolRefresh", e))
        } else {
            tracing::info!(vm, pool, "starting libvirt storage pool");
            self.progress.enter("virStoragePoolCreate");
            p.create(0)
                .map_err(|e| AgentError::libvirt(vm, "virStoragePoolCreate", e))
        }
    }
}

/// A domain on this host.
#[derive(Debug)]
pub struct Vm<'h> {
    hv: &'h Hypervisor,
    dom: Domain,
    name: String,
}

impl Vm<'_> {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn enter(&self, call: &'static str) {
        self.hv.progress.enter(call);
    }

    fn fail(&self, call: &'static str) -> impl FnOnce(virt::error::Error) -> AgentError + '_ {
        move |e| AgentError::libvirt(&self.name, call, e)
    }

    /// The domain's condition; `None` if it vanished.
    pub fn condition(&self) -> Result<Option<Condition>, AgentError> {
        self.enter("virDomainGetState");
        match libvirt_ext::domain_state(&self.dom) {
            Ok(raw) => Ok(Some(Condition::classify(raw))),
            Err(e) if e.libvirt_error().is_some_and(is_no_domain) => Ok(None),
            Err(e) => Err(AgentError::ext(&self.name, e)),
        }
    }

    pub fn uuid(&self) -> Result<String, AgentError> {
        self.enter("virDomainGetUUIDString");
        self.dom.uuid_string().map_err(self.fail("virDomainGetUUIDString"))
    }

    pub fn is_persistent(&self) -> Result<bool, AgentError> {
        self.enter("virDomainIsPersistent");
        self.dom.is_persistent().map_err(self.fail("virDomainIsPersistent"))
    }

    /// `virDomainCreate`: boots a defined domain (restoring libvirt's managed save, if any).
    pub fn boot(&self) -> Result<(), AgentError> {
        self.enter("virDomainCreate");
        self.dom.create().map_err(self.fail("virDomainCreate"))
    }

    pub fn resume(&self) -> Result<(), AgentError> {
        self.enter("virDomainResume");
        self.dom.resume().map_err(self.fail("virDomainResume"))
    }

    pub fn wake_up(&self) -> Result<(), AgentError> {
        self.enter("virDomainPMWakeup");
        self.dom.pm_wakeup(0).map_err(self.fail("virDomainPMWakeup"))
    }

    /// Asks the guest to power off with `flags` (`virDomainShutdownFlagValues`); if the driver
    /// rejects those flags, asks with the driver's default method.
    pub fn request_shutdown(&self, flags: u32) -> Result<ShutdownRequest, AgentError> {
        self.enter("virDomainShutdownFlags");
        match self.dom.shutdown_flags(flags) {
            Ok(()) => Ok(ShutdownRequest::AsRequested),
            Err(e) if flags_unsupported(&e) => {
                tracing::warn!(
                    vm = self.name,
                    error = e.message(),
                    "shutdown method not supported by the driver; using its default"
                );
                self.dom
                    .shutdown_flags(0)
                    .map(|()| ShutdownRequest::DriverDefault)
                    .map_err(self.fail("virDomainShutdownFlags"))
            }
            Err(e) => Err(AgentError::libvirt(&self.name, "virDomainShutdownFlags", e)),
        }
    }

    /// `virDomainDestroy`: kills the domain's process. A domain that is already gone or not
    /// running counts as destroyed.
    pub fn destroy(&self) -> Result<(), AgentError> {
        self.enter("virDomainDestroy");
        match self.dom.destroy() {
            Ok(()) => Ok(()),
            Err(e) if is_no_domain(&e) || e.code().to_raw() == sys::VIR_ERR_OPERATION_INVALID => Ok(()),
            Err(e) => Err(AgentError::libvirt(&self.name, "virDomainDestroy", e)),
        }
    }

    /// `virDomainSaveFlags`: writes the memory state to `path` and stops the domain.
    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        self.enter("virDomainSaveFlags");
        libvirt_ext::save_domain(&self.dom, &path.to_string_lossy(), 0).map_err(|e| AgentError::ext(&self.name, e))
    }

    pub fn set_max_downtime(&self, millis: u64) -> Result<(), AgentError> {
        self.enter("virDomainMigrateSetMaxDowntime");
        self.dom
            .migrate_set_max_downtime(millis, 0)
            .map_err(self.fail("virDomainMigrateSetMaxDowntime"))
    }

    /// Aborts the running job (a migration started from another connection).
    pub fn abort_job(&self) -> Result<(), AgentError> {
        self.enter("virDomainAbortJob");
        libvirt_ext::abort_job(&self.dom).map_err(|e| AgentError::ext(&self.name, e))
    }

    /// `virDomainMigrateToURI3` following `plan`; blocks until the migration ends.
    pub fn migrate(&self, plan: &MigrationPlan) -> Result<(), AgentError> {
        let params = MigrateParameters {
            bandwidth: plan.bandwidth_mib_s,
            uri: plan.data_uri.clone(),
            ..MigrateParameters::default()
        };
        self.enter("virDomainMigrateToURI3");
        self.dom
            .migrate_to_uri3(Some(&plan.target_uri), params, plan.flags)
            .map_err(self.fail("virDomainMigrateToURI3"))
    }

    /// Sends `guest-ping` to the QEMU guest agent; libvirt waits at most `timeout` (whole
    /// seconds, rounded up).
    pub fn guest_ping(&self, timeout: Duration) -> Result<(), AgentError> {
        let seconds = i32::try_from(timeout.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
        self.enter("virDomainQemuAgentCommand");
        self.dom
            .qemu_agent_command(r#"{"execute":"guest-ping"}"#, seconds, 0)
            .map(drop)
            .map_err(self.fail("virDomainQemuAgentCommand"))
    }
}

/// The driver does not support the requested flags (the error some drivers, such as `test:///`,
/// give for shutdown methods they lack).
fn flags_unsupported(err: &virt::error::Error) -> bool {
    let code = err.code().to_raw();
    code == sys::VIR_ERR_ARGUMENT_UNSUPPORTED
        || (code == sys::VIR_ERR_INVALID_ARG && err.message().contains("unsupported flags"))
}
