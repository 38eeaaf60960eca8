//! One-VM operations: add, start, stop, move (live migration through a temporary constraint), remove,
//! destroy (remove a clone and delete its files), and host standby/maintenance. Each is checked first
//! (nothing changes on a refusal), then changes the CIB one step at a time and waits for Pacemaker to
//! reach the asked state.

use vmha_model::change::{self, NewVm};
use vmha_model::domain::DomainSummary;
use vmha_model::VmState;

use crate::error::OpError;
use crate::ports::{CibChange, Ports, Progress};
use crate::state::Snapshot;

/// Largest domain XML an add reads.
pub const MAX_DOMAIN_XML: usize = 1 << 20;

/// A VM definition checked and ready to be added.
#[derive(Debug, Clone)]
pub struct PreparedVm {
    pub name: String,
    pub config: String,
    pub summary: DomainSummary,
}

/// A one-VM operation.
#[derive(Debug, Clone)]
pub enum VmOp {
    Add {
        prepared: PreparedVm,
        start: bool,
    },
    Start(String),
    Stop(String),
    Move {
        vm: String,
        host: String,
    },
    Remove(String),
    /// Removes a clone and deletes its domain XML file and disk overlays.
    Destroy(String),
}

impl VmOp {
    pub fn kind(&self) -> &'static str {
        match self {
            VmOp::Add { .. } => "add",
            VmOp::Start(_) => "start",
            VmOp::Stop(_) => "stop",
            VmOp::Move { .. } => "move",
            VmOp::Remove(_) => "remove",
            VmOp::Destroy(_) => "destroy",
        }
    }

    pub fn target(&self) -> String {
        match self {
            VmOp::Add { prepared, .. } => prepared.name.clone(),
            VmOp::Start(vm) | VmOp::Stop(vm) | VmOp::Remove(vm) | VmOp::Destroy(vm) => vm.clone(),
            VmOp::Move { vm, host } => format!("{vm} -> {host}"),
        }
    }
}

/// Reads and checks the domain XML of a VM to add.
pub async fn prepare_add(p: &Ports, name: &str, config: &str) -> Result<PreparedVm, OpError> {
    change::validate_name("VM name", name).map_err(|e| OpError::Invalid(e.to_string()))?;
    if !config.starts_with('/') {
        return Err(OpError::Invalid(format!("domain XML path {config:?} must be absolute")));
    }
    let xml = p
        .storage
        .read_small(config)
        .await
        .map_err(|e| OpError::Invalid(e.to_string()))?;
    if xml.len() > MAX_DOMAIN_XML {
        return Err(OpError::Invalid(format!(
            "{config} is larger than {MAX_DOMAIN_XML} bytes"
        )));
    }
    let summary = DomainSummary::parse(&xml).map_err(|e| OpError::Invalid(format!("{config}: {e}")))?;
    if summary.name != name {
        return Err(OpError::Invalid(format!(
            "{config} defines domain {:?}, not {name:?}",
            summary.name
        )));
    }
    let prepared = PreparedVm {
        name: name.to_string(),
        config: config.to_string(),
        summary,
    };
    check(
        p,
        &VmOp::Add {
            prepared: prepared.clone(),
            start: false,
        },
    )
    .await?;
    Ok(prepared)
}

/// Checks an operation against the current state before anything changes.
pub async fn check(p: &Ports, op: &VmOp) -> Result<(), OpError> {
    let snap = p.cluster.snapshot();
    let view = snap.view.as_ref().ok_or(OpError::NotReady)?;
    let vm_of = |name: &str| view.vm(name).ok_or_else(|| OpError::UnknownVm(name.to_string()));
    match op {
        VmOp::Add { prepared, .. } => {
            if view.vm(&prepared.name).is_some() {
                return Err(OpError::Conflict(format!(
                    "a VM named {} exists already",
                    prepared.name
                )));
            }
        }
        VmOp::Start(vm) | VmOp::Stop(vm) | VmOp::Remove(vm) => {
            vm_of(vm)?;
        }
        VmOp::Destroy(vm) => {
            let config = config_of(&snap, vm)?;
            let xml = p.storage.read_small(&config).await?;
            if vmha_model::clone::clone_of(&xml).is_none() {
                return Err(OpError::Invalid(format!(
                    "VM {vm} is not a vmha clone; --destroy deletes only clones (use remove)"
                )));
            }
        }
        VmOp::Move { vm, host } => {
            let v = vm_of(vm)?;
            let h = view.host(host).ok_or_else(|| OpError::UnknownHost(host.clone()))?;
            if !snap.host_online(host) {
                return Err(OpError::Conflict(format!("host {host} is not online")));
            }
            if h.standby || h.maintenance {
                return Err(OpError::Conflict(format!("host {host} is in standby or maintenance")));
            }
            if v.state != VmState::Running {
                return Err(OpError::Conflict(format!(
                    "VM {vm} is not running (it is {:?})",
                    v.state
                )));
            }
            if v.meta.get("allow-migrate").is_none_or(|m| !vmha_model::cib::is_true(m)) {
                return Err(OpError::Invalid(format!(
                    "VM {vm} does not allow live migration (meta allow-migrate=false)"
                )));
            }
        }
    }
    Ok(())
}

fn config_of(snap: &Snapshot, vm: &str) -> Result<String, OpError> {
    let v = snap
        .view
        .as_ref()
        .ok_or(OpError::NotReady)?
        .vm(vm)
        .ok_or_else(|| OpError::UnknownVm(vm.to_string()))?;
    v.config
        .clone()
        .ok_or_else(|| OpError::Invalid(format!("VM {vm} has no config parameter")))
}

fn vm_state(snap: &Snapshot, vm: &str) -> Option<(VmState, Vec<String>)> {
    let v = snap.view.as_ref()?.vm(vm)?;
    Some((v.state, v.hosts.clone()))
}

/// Sets a VM's `target-role` meta attribute (one CIB change).
pub async fn set_target_role(p: &Ports, vm: &str, role: &str) -> Result<(), OpError> {
    let cib = p.cluster.query().await?;
    let xml = change::set_resource_meta(&cib, vm, "target-role", role).map_err(|e| OpError::data("the CIB", e))?;
    p.cluster
        .apply(CibChange::Modify {
            section: "resources",
            xml,
        })
        .await?;
    Ok(())
}

/// Sets or clears a host's `standby` or `maintenance` attribute (one CIB change).
pub async fn set_host_attribute(p: &Ports, host: &str, attribute: &str, on: bool) -> Result<(), OpError> {
    set_node_attribute(p, host, attribute, if on { "on" } else { "off" }, "the CIB").await
}

/// Sets node attribute `name` of `host` to `value` (one CIB change); `what` names the value in an error.
pub(crate) async fn set_node_attribute(
    p: &Ports,
    host: &str,
    name: &str,
    value: &str,
    what: &str,
) -> Result<(), OpError> {
    let cib = p.cluster.query().await?;
    let xml = change::set_node_attribute(&cib, host, name, value).map_err(|e| OpError::data(what, e))?;
    p.cluster.apply(CibChange::Modify { section: "nodes", xml }).await?;
    Ok(())
}

/// Waits until the VM runs on one host (optionally a given one); a recorded failure ends the wait.
/// Returns the hosts it runs on.
pub async fn wait_running(p: &Ports, vm: &str, on: Option<&str>) -> Result<String, OpError> {
    let what = match on {
        Some(h) => format!("waiting for {vm} to run on {h}"),
        None => format!("waiting for {vm} to run"),
    };
    p.wait_until(p.cluster.job_deadline(), |snap| {
        let (state, hosts) = vm_state(snap, vm)?;
        match state {
            VmState::Running if on.is_none_or(|h| hosts.iter().any(|x| x == h)) => Some(Ok(hosts.join(","))),
            VmState::Failed => Some(Err(OpError::cluster(what.clone(), format!("VM {vm} failed")))),
            _ => None,
        }
    })
    .await
    .map_err(|e| OpError::cluster(what.clone(), e))?
}

/// Waits until the VM is stopped (or gone).
pub async fn wait_stopped(p: &Ports, vm: &str) -> Result<(), OpError> {
    p.wait_until(p.cluster.job_deadline(), |snap| match vm_state(snap, vm) {
        None | Some((VmState::Stopped, _)) => Some(()),
        _ => None,
    })
    .await
    .map_err(|e| OpError::cluster(format!("waiting for {vm} to stop"), e))
}

/// Runs a checked operation; returns what happened, in a sentence.
pub async fn run(p: &Ports, progress: &dyn Progress, op: &VmOp) -> Result<String, OpError> {
    match op {
        VmOp::Add { prepared, start } => add(p, progress, prepared, *start).await,
        VmOp::Start(vm) => {
            progress.progress(0.2, "asking Pacemaker to start it").await;
            set_target_role(p, vm, "Started").await?;
            let on = wait_running(p, vm, None).await?;
            Ok(format!("VM {vm} running on {on}"))
        }
        VmOp::Stop(vm) => {
            progress.progress(0.2, "asking Pacemaker to stop it").await;
            set_target_role(p, vm, "Stopped").await?;
            wait_stopped(p, vm).await?;
            Ok(format!("VM {vm} stopped"))
        }
        VmOp::Move { vm, host } => migrate(p, progress, vm, host).await,
        VmOp::Remove(vm) => remove(p, progress, vm).await,
        VmOp::Destroy(vm) => {
            let config = config_of(&p.cluster.snapshot(), vm)?;
            let removed = remove(p, progress, vm).await?;
            progress
                .progress(0.95, "deleting its domain XML file and disk overlays")
                .await;
            let files = crate::clone::destroy_files(p, &config).await?;
            Ok(format!("{removed}; deleted {}", files.join(", ")))
        }
    }
}

async fn add(p: &Ports, progress: &dyn Progress, prepared: &PreparedVm, start: bool) -> Result<String, OpError> {
    progress.progress(0.1, "creating the cluster resource").await;
    let xml = change::vm_primitive(&NewVm {
        name: &prepared.name,
        config: &prepared.config,
        hypervisor: "qemu:///system",
        migration_transport: "tcp",
        cpu: prepared.summary.vcpus,
        memory_mib: prepared.summary.memory_mib,
        start,
    })
    .map_err(|e| OpError::Invalid(e.to_string()))?;
    p.cluster
        .apply(CibChange::Create {
            section: "resources",
            xml,
        })
        .await?;
    if !start {
        return Ok(format!("VM {} added (stopped)", prepared.name));
    }
    progress.progress(0.4, "waiting for Pacemaker to start it").await;
    let on = wait_running(p, &prepared.name, None).await?;
    Ok(format!("VM {} added and running on {on}", prepared.name))
}

/// Live-migrates through a temporary location constraint, which goes whatever happened.
async fn migrate(p: &Ports, progress: &dyn Progress, vm: &str, host: &str) -> Result<String, OpError> {
    if vm_state(&p.cluster.snapshot(), vm).is_some_and(|(s, h)| s == VmState::Running && h == [host.to_string()]) {
        return Ok(format!("VM {vm} already runs on {host}"));
    }
    progress
        .progress(0.1, &format!("asking Pacemaker to migrate it to {host}"))
        .await;
    let id = change::move_constraint_id(vm);
    let delete = || CibChange::Delete {
        section: "constraints",
        xml: format!(r#"<rsc_location id="{}"/>"#, change::escape(&id)),
    };
    // A constraint an earlier move left (its vmhad died) goes first.
    let _ = p.cluster.apply(delete()).await;
    p.cluster
        .apply(CibChange::Create {
            section: "constraints",
            xml: change::move_constraint(vm, host),
        })
        .await?;
    progress.progress(0.3, "live-migrating").await;
    let moved = wait_running(p, vm, Some(host)).await;
    progress.progress(0.9, "removing the temporary constraint").await;
    let cleared = p.cluster.apply(delete()).await;
    moved?;
    cleared?;
    Ok(format!("VM {vm} migrated to {host}"))
}

/// Stops the VM, removes its constraints and its resource, and waits until Pacemaker forgot it.
async fn remove(p: &Ports, progress: &dyn Progress, vm: &str) -> Result<String, OpError> {
    progress.progress(0.1, "stopping it").await;
    set_target_role(p, vm, "Stopped").await?;
    wait_stopped(p, vm).await?;
    progress.progress(0.6, "removing its constraints and resource").await;
    let constraints = p
        .cluster
        .snapshot()
        .view
        .as_ref()
        .and_then(|v| v.vm(vm))
        .map(|v| v.constraints.clone())
        .unwrap_or_default();
    for c in constraints {
        let tag = match c.kind.as_str() {
            "location" => "rsc_location",
            "colocation" => "rsc_colocation",
            "order" => "rsc_order",
            _ => "rsc_ticket",
        };
        p.cluster
            .apply(CibChange::Delete {
                section: "constraints",
                xml: format!(r#"<{tag} id="{}"/>"#, change::escape(&c.id)),
            })
            .await?;
    }
    crate::clone::remove_from_tags(p, vm).await?;
    p.cluster
        .apply(CibChange::Delete {
            section: "resources",
            xml: format!(r#"<primitive id="{}"/>"#, change::escape(vm)),
        })
        .await?;
    p.wait_until(p.cluster.job_deadline(), |snap| {
        vm_state(snap, vm).is_none().then_some(())
    })
    .await
    .map_err(|e| OpError::cluster(format!("waiting for Pacemaker to forget {vm}"), e))?;
    Ok(format!("VM {vm} removed"))
}
