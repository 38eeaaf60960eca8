//! Client proxies for vmhad's interfaces, one trait per `packaging/dbus/interfaces/*.xml`.
//!
//! Methods that change something need root or polkit's `org.vmha.Vmha1.manage`. Each comes twice: plain,
//! and as `<method>_interactive`, which sets the D-Bus flag ALLOW_INTERACTIVE_AUTHORIZATION so that polkit
//! may ask the user to authenticate through an authentication agent (vmhad then waits longer for polkit).
//! Methods fail with [`Error`](crate::Error).

use std::collections::HashMap;

use zbus::proxy;
use zbus::zvariant::{Fd, OwnedObjectPath};

use crate::Error;

/// `org.vmha.Vmha1.Cluster` at [`ROOT_PATH`](crate::ROOT_PATH).
#[proxy(
    interface = "org.vmha.Vmha1.Cluster",
    default_service = "org.vmha.Vmha1",
    default_path = "/org/vmha/Vmha1",
    gen_blocking = false
)]
pub trait Cluster {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn quorate(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn designated_controller(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn members(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn agents(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn local_host(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn stonith_enabled(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn connected(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn cib_version(&self) -> zbus::Result<String>;
    /// The virtual clusters: (name, member resources).
    #[zbus(property)]
    fn virtual_clusters(&self) -> zbus::Result<Vec<(String, Vec<String>)>>;
    /// The elastic groups of the stored policy: (name, template, min, max, members).
    #[zbus(property)]
    fn elastic_groups(&self) -> zbus::Result<Vec<(String, String, u32, u32, Vec<String>)>>;

    fn add_vm(&self, name: &str, config: &str, start: bool) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "AddVm", allow_interactive_auth)]
    fn add_vm_interactive(&self, name: &str, config: &str, start: bool) -> Result<OwnedObjectPath, Error>;

    fn clone_vm(
        &self,
        template: &str,
        name: &str,
        host: &str,
        count: u32,
        force: bool,
    ) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "CloneVm", allow_interactive_auth)]
    fn clone_vm_interactive(
        &self,
        template: &str,
        name: &str,
        host: &str,
        count: u32,
        force: bool,
    ) -> Result<OwnedObjectPath, Error>;

    /// What the scheduler would do if `hosts` (or every host of `zone`) failed: `vmha what-if`'s JSON.
    /// Read-only; one at a time per vmhad.
    fn what_if(&self, hosts: &[&str], zone: &str) -> Result<String, Error>;

    fn scale_group(&self, group: &str, size: u32, force: bool, drain_timeout_ms: u32)
        -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "ScaleGroup", allow_interactive_auth)]
    fn scale_group_interactive(
        &self,
        group: &str,
        size: u32,
        force: bool,
        drain_timeout_ms: u32,
    ) -> Result<OwnedObjectPath, Error>;

    #[allow(clippy::too_many_arguments)]
    fn capture_vcluster(
        &self,
        name: &str,
        archive: Fd<'_>,
        with_disks: bool,
        halt: bool,
        level: i32,
        sign_key: &[Fd<'_>],
    ) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "CaptureVcluster", allow_interactive_auth)]
    #[allow(clippy::too_many_arguments)]
    fn capture_vcluster_interactive(
        &self,
        name: &str,
        archive: Fd<'_>,
        with_disks: bool,
        halt: bool,
        level: i32,
        sign_key: &[Fd<'_>],
    ) -> Result<OwnedObjectPath, Error>;

    #[allow(clippy::too_many_arguments)]
    fn instantiate_vcluster(
        &self,
        archive: Fd<'_>,
        maps: &[&str],
        name: &str,
        dry_run: bool,
        wait_seconds: u32,
        allow: &[&str],
        require_signature: bool,
        trusted_keys: &[(&str, &str)],
    ) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "InstantiateVcluster", allow_interactive_auth)]
    #[allow(clippy::too_many_arguments)]
    fn instantiate_vcluster_interactive(
        &self,
        archive: Fd<'_>,
        maps: &[&str],
        name: &str,
        dry_run: bool,
        wait_seconds: u32,
        allow: &[&str],
        require_signature: bool,
        trusted_keys: &[(&str, &str)],
    ) -> Result<OwnedObjectPath, Error>;

    /// Something happened in the cluster (`quorum`, `dc`, `host-joined`, `host-left`, `vm-failed`, `job`).
    #[zbus(signal)]
    fn event(&self, kind: &str, subject: &str, message: &str) -> zbus::Result<()>;

    /// A valid message from the guest of `vm` on this host. Untrusted: it comes from inside the VM.
    #[zbus(signal)]
    fn guest_message(&self, vm: &str, json: &str) -> zbus::Result<()>;
}

/// `org.vmha.Vmha1.Host` at [`host_path`](crate::host_path).
#[proxy(
    interface = "org.vmha.Vmha1.Host",
    default_service = "org.vmha.Vmha1",
    gen_blocking = false
)]
pub trait Host {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn standby(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn maintenance(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn is_designated_controller(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn utilization(&self) -> zbus::Result<HashMap<String, String>>;

    fn set_standby(&self, on: bool) -> Result<(), Error>;
    #[zbus(name = "SetStandby", allow_interactive_auth)]
    fn set_standby_interactive(&self, on: bool) -> Result<(), Error>;

    fn set_maintenance(&self, on: bool) -> Result<(), Error>;
    #[zbus(name = "SetMaintenance", allow_interactive_auth)]
    fn set_maintenance_interactive(&self, on: bool) -> Result<(), Error>;
}

/// `org.vmha.Vmha1.VirtualMachine` at [`vm_path`](crate::vm_path).
#[proxy(
    interface = "org.vmha.Vmha1.VirtualMachine",
    default_service = "org.vmha.Vmha1",
    gen_blocking = false
)]
pub trait VirtualMachine {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn agent(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn hosts(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn failed_on(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn fail_counts(&self) -> zbus::Result<HashMap<String, u32>>;
    #[zbus(property)]
    fn target_role(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn managed(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn config(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn constraints(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn utilization(&self) -> zbus::Result<HashMap<String, String>>;

    fn start(&self) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "Start", allow_interactive_auth)]
    fn start_interactive(&self) -> Result<OwnedObjectPath, Error>;

    fn stop(&self) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "Stop", allow_interactive_auth)]
    fn stop_interactive(&self) -> Result<OwnedObjectPath, Error>;

    fn cleanup(&self, host: &str) -> Result<Vec<String>, Error>;
    #[zbus(name = "Cleanup", allow_interactive_auth)]
    fn cleanup_interactive(&self, host: &str) -> Result<Vec<String>, Error>;

    #[zbus(name = "Move")]
    fn move_to(&self, host: &str) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "Move", allow_interactive_auth)]
    fn move_to_interactive(&self, host: &str) -> Result<OwnedObjectPath, Error>;

    /// Returns `(outcome, reason)`: `done`, `refused` (with the guest's reason) or `failed` (with why).
    fn guest_request(&self, name: &str, data_json: &str, timeout_ms: u32) -> Result<(String, String), Error>;
    #[zbus(name = "GuestRequest", allow_interactive_auth)]
    fn guest_request_interactive(
        &self,
        name: &str,
        data_json: &str,
        timeout_ms: u32,
    ) -> Result<(String, String), Error>;

    fn destroy(&self) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "Destroy", allow_interactive_auth)]
    fn destroy_interactive(&self) -> Result<OwnedObjectPath, Error>;

    fn remove(&self) -> Result<OwnedObjectPath, Error>;
    #[zbus(name = "Remove", allow_interactive_auth)]
    fn remove_interactive(&self) -> Result<OwnedObjectPath, Error>;
}

/// `org.vmha.Vmha1.Job` at [`job_path`](crate::job_path) (the path a method returned).
#[proxy(
    interface = "org.vmha.Vmha1.Job",
    default_service = "org.vmha.Vmha1",
    gen_blocking = false
)]
pub trait Job {
    #[zbus(property)]
    fn kind(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<f64>;
    #[zbus(property)]
    fn message(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn details(&self) -> zbus::Result<String>;

    /// Sent once when the job ends.
    #[zbus(signal)]
    fn finished(&self, success: bool, message: &str) -> zbus::Result<()>;
}

/// `org.vmha.Vmha1.Readiness` at [`READINESS_PATH`](crate::READINESS_PATH).
#[proxy(
    interface = "org.vmha.Vmha1.Readiness",
    default_service = "org.vmha.Vmha1",
    default_path = "/org/vmha/Vmha1/readiness",
    gen_blocking = false
)]
pub trait Readiness {
    /// The last report of every host whose vmhad runs, as JSON.
    fn reports(&self) -> Result<String, Error>;
}
