//! Fast failure reporting: vmhad watches libvirt's lifecycle events on its host, and when a VM that
//! Pacemaker runs here dies outside Pacemaker's control (its QEMU failed, or the guest crashed), tells
//! Pacemaker's controller at once, so recovery starts now instead of at the next monitor.
//!
//! Only `Stopped(Failed)` and `Stopped(Crashed)` are reported: a shutdown or destroy may be Pacemaker's
//! own stop, and migration and save are normal. The CIB is read afresh before reporting, so a VM that
//! Pacemaker no longer runs here is never reported.

use std::sync::Arc;
use std::time::Duration;

use libvirt_ext::events::{Lifecycle, StoppedDetail, WatchItem};
use vmha_model::cib::HostState;
use vmha_model::ClusterView;
use vmha_pacemaker::{Controller, Resource};

use crate::state::Shared;

const CONTROLLER_DEADLINE: Duration = Duration::from_secs(5);

/// Watches libvirt at `uri` forever (reconnecting with a growing delay) and reports VM failures.
pub async fn report_vm_failures(shared: Arc<Shared>, uri: String) {
    let mut delay = Duration::from_millis(200);
    let mut controller: Option<Controller> = None;
    loop {
        let opened = {
            let uri = uri.clone();
            tokio::task::spawn_blocking(move || libvirt_ext::events::watch(&uri)).await
        };
        match opened {
            Ok(Ok(mut watch)) => {
                tracing::info!(%uri, "watching libvirt lifecycle events");
                delay = Duration::from_millis(200);
                while let Some(item) = watch.next().await {
                    match item {
                        WatchItem::Event(event) => {
                            if matches!(
                                event.lifecycle,
                                Lifecycle::Stopped(StoppedDetail::Failed | StoppedDetail::Crashed)
                            ) {
                                report(
                                    &shared,
                                    &mut controller,
                                    &event.domain,
                                    &format!("{:?}", event.lifecycle),
                                )
                                .await;
                            }
                        }
                        WatchItem::ConnectionLost(reason) => {
                            tracing::warn!(?reason, "lost the libvirt connection");
                            break;
                        }
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(%uri, "watching libvirt: {e}"),
            Err(e) => tracing::warn!("libvirt watcher: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The cluster resource of `domain` when Pacemaker believes it runs on this host.
fn running_here(view: &ClusterView, domain: &str, host: &str) -> Option<Resource> {
    let vm = view.vm(domain)?;
    if !vm.hosts.iter().any(|h| h == host) {
        return None;
    }
    resource_of(vm)
}

/// Why clearing a VM's failures (`vmha vm cleanup`) did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("cleaning up VM {vm}: the CIB cannot be read: {reason}")]
    Cib { vm: String, reason: String },
    #[error("VM {0} is not a cluster VM")]
    UnknownVm(String),
    #[error("VM {vm}: its agent {agent:?} is not standard:provider:type")]
    Agent { vm: String, agent: String },
    #[error("cleaning up VM {vm}: {host} is not a cluster host")]
    UnknownHost { vm: String, host: String },
    #[error("clearing the fail counts of VM {vm} ({on}): {source}")]
    Attrd {
        vm: String,
        on: String,
        source: vmha_pacemaker::Error,
    },
    #[error("refreshing VM {vm}'s operation history on {host}: {source}")]
    Refresh {
        vm: String,
        host: String,
        source: vmha_pacemaker::Error,
    },
}

impl CleanupError {
    /// True when the request itself is wrong (nothing was changed).
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            CleanupError::UnknownVm(_) | CleanupError::UnknownHost { .. } | CleanupError::Agent { .. }
        )
    }
}

/// What a cleanup of `vm` does, decided from the CIB before anything changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupPlan {
    pub resource: Resource,
    /// The host whose fail counts attrd clears; `None`: every host.
    pub attrd_host: Option<String>,
    /// Online hosts whose operation history of the VM the controller clears (so its failed operations
    /// leave the status and Pacemaker probes it again there): the hosts named that show a failure or a
    /// fail count for it.
    pub refresh: Vec<String>,
}

/// Checks a cleanup request against `view`: `vm` must be a cluster VM, `host` (empty: every host) a
/// cluster host.
pub fn plan_cleanup(view: &ClusterView, vm: &str, host: &str) -> Result<CleanupPlan, CleanupError> {
    let v = view.vm(vm).ok_or_else(|| CleanupError::UnknownVm(vm.to_string()))?;
    let resource = resource_of(v).ok_or_else(|| CleanupError::Agent {
        vm: vm.to_string(),
        agent: v.agent.clone(),
    })?;
    if !host.is_empty() && view.host(host).is_none() {
        return Err(CleanupError::UnknownHost {
            vm: vm.to_string(),
            host: host.to_string(),
        });
    }
    let refresh = view
        .hosts
        .iter()
        .filter(|h| host.is_empty() || h.name == host)
        .filter(|h| h.state == HostState::Online)
        .filter(|h| v.failed_on.contains(&h.name) || v.fail_counts.contains_key(&h.name))
        .map(|h| h.name.clone())
        .collect();
    Ok(CleanupPlan {
        resource,
        attrd_host: (!host.is_empty()).then(|| host.to_string()),
        refresh,
    })
}

/// Clears `vm`'s failures on `host` (empty: every host), as `crm_resource --cleanup` does: attrd clears
/// its fail counts and last-failure times, then each named host's controller forgets its failed operation
/// history and probes it again. Returns the hosts refreshed. A wrong VM or host changes nothing.
pub async fn cleanup(shared: &Shared, vm: &str, host: &str) -> Result<Vec<String>, CleanupError> {
    let view = shared
        .backend
        .query()
        .await
        .map_err(|e| e.to_string())
        .and_then(|xml| ClusterView::from_cib(&xml).map_err(|e| e.to_string()))
        .map_err(|reason| CleanupError::Cib {
            vm: vm.to_string(),
            reason,
        })?;
    let plan = plan_cleanup(&view, vm, host)?;
    vmha_pacemaker::clear_failures(plan.attrd_host.as_deref(), &plan.resource.id, CONTROLLER_DEADLINE)
        .await
        .map_err(|source| CleanupError::Attrd {
            vm: vm.to_string(),
            on: plan.attrd_host.clone().unwrap_or_else(|| "every host".into()),
            source,
        })?;
    if plan.refresh.is_empty() {
        return Ok(Vec::new());
    }
    let controller = Controller::connect(CONTROLLER_DEADLINE)
        .await
        .map_err(|source| CleanupError::Refresh {
            vm: vm.to_string(),
            host: plan.refresh.join(","),
            source,
        })?;
    for h in &plan.refresh {
        controller
            .refresh_resource(h, &plan.resource, CONTROLLER_DEADLINE)
            .await
            .map_err(|source| CleanupError::Refresh {
                vm: vm.to_string(),
                host: h.clone(),
                source,
            })?;
    }
    tracing::info!(%vm, hosts = ?plan.refresh, "cleaned up: fail counts cleared, history refreshed");
    Ok(plan.refresh)
}

fn resource_of(vm: &vmha_model::VmView) -> Option<Resource> {
    let mut parts = vm.agent.splitn(3, ':');
    let (standard, provider, agent) = (parts.next()?, parts.next()?, parts.next()?);
    Some(Resource {
        id: vm.name.clone(),
        standard: standard.to_string(),
        provider: Some(provider.to_string()),
        agent: agent.to_string(),
    })
}

async fn report(shared: &Shared, controller: &mut Option<Controller>, domain: &str, what: &str) {
    let fresh = match shared.backend.query().await.map(|xml| ClusterView::from_cib(&xml)) {
        Ok(Ok(view)) => view,
        _ => {
            tracing::warn!(%domain, "VM stopped ({what}) but the CIB cannot be read: leaving it to the monitor");
            return;
        }
    };
    let Some(resource) = running_here(&fresh, domain, &shared.local_host) else {
        return;
    };
    if controller.is_none() {
        match Controller::connect(CONTROLLER_DEADLINE).await {
            Ok(c) => *controller = Some(c),
            Err(e) => {
                tracing::warn!(%domain, "VM failed ({what}) but the controller is unreachable: {e}");
                return;
            }
        }
    }
    let Some(c) = controller.as_ref() else { return };
    match c
        .fail_resource(&shared.local_host, &resource, CONTROLLER_DEADLINE)
        .await
    {
        Ok(()) => tracing::info!(%domain, "VM failed ({what}): reported to Pacemaker"),
        Err(e) => {
            tracing::warn!(%domain, "reporting the failure ({what}) to Pacemaker: {e}");
            *controller = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIB: &str = r#"<cib have-quorum="1" dc-uuid="1"><configuration><nodes><node id="1" uname="n1"/><node id="2" uname="n2"/></nodes>
        <resources><primitive id="vm1" class="ocf" provider="vmha" type="VirtualMachine"/></resources></configuration>
        <status><node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member"><lrm id="1"><lrm_resources>
        <lrm_resource id="vm1" class="ocf" provider="vmha" type="VirtualMachine"><lrm_rsc_op id="vm1_last_0" operation="start" call-id="4" rc-code="0" op-status="0" interval="0"/></lrm_resource>
        </lrm_resources></lrm></node_state></status></cib>"#;

    #[test]
    fn reports_only_vms_pacemaker_runs_on_this_host() {
        let view = ClusterView::from_cib(CIB).unwrap();
        let r = running_here(&view, "vm1", "n1").unwrap();
        assert_eq!(
            (
                r.id.as_str(),
                r.standard.as_str(),
                r.provider.as_deref(),
                r.agent.as_str()
            ),
            ("vm1", "ocf", Some("vmha"), "VirtualMachine")
        );
        assert!(running_here(&view, "vm1", "n2").is_none(), "not here");
        assert!(running_here(&view, "other", "n1").is_none(), "not a cluster VM");
    }

    const FAILED_CIB: &str = r#"<cib have-quorum="1" dc-uuid="1"><configuration><nodes><node id="1" uname="n1"/><node id="2" uname="n2"/><node id="3" uname="n3"/></nodes>
        <resources><primitive id="vm1" class="ocf" provider="vmha" type="VirtualMachine"/><primitive id="vm2" class="ocf" provider="vmha" type="VirtualMachine"/></resources></configuration>
        <status>
        <node_state id="1" uname="n1" in_ccm="true" crmd="online" join="member" expected="member">
          <transient_attributes id="1"><instance_attributes id="status-1"><nvpair id="status-1-fc" name="fail-count-vm1#asyncmon_0" value="1"/></instance_attributes></transient_attributes>
          <lrm id="1"><lrm_resources><lrm_resource id="vm1" class="ocf" provider="vmha" type="VirtualMachine"><lrm_rsc_op id="vm1_last_0" operation="start" call-id="6" rc-code="0" op-status="0" interval="0"/></lrm_resource></lrm_resources></lrm></node_state>
        <node_state id="2" uname="n2" in_ccm="true" crmd="online" join="member" expected="member"/>
        </status></cib>"#;

    #[test]
    fn cleanup_everywhere_clears_every_hosts_counts_and_refreshes_hosts_with_failures() {
        let view = ClusterView::from_cib(FAILED_CIB).unwrap();
        let plan = plan_cleanup(&view, "vm1", "").unwrap();
        assert_eq!(plan.attrd_host, None);
        assert_eq!(plan.resource.id, "vm1");
        assert_eq!(plan.refresh, vec!["n1".to_string()], "only n1 shows a failure of vm1");
    }

    #[test]
    fn cleanup_on_one_host_touches_only_that_host() {
        let view = ClusterView::from_cib(FAILED_CIB).unwrap();
        let plan = plan_cleanup(&view, "vm1", "n2").unwrap();
        assert_eq!(plan.attrd_host.as_deref(), Some("n2"));
        assert!(plan.refresh.is_empty(), "{plan:?}");
        let plan = plan_cleanup(&view, "vm1", "n1").unwrap();
        assert_eq!(plan.refresh, vec!["n1".to_string()]);
    }

    #[test]
    fn cleanup_of_an_unknown_vm_or_host_is_refused() {
        let view = ClusterView::from_cib(FAILED_CIB).unwrap();
        let e = plan_cleanup(&view, "nope", "").unwrap_err();
        assert!(e.is_invalid());
        assert_eq!(e.to_string(), "VM nope is not a cluster VM");
        let e = plan_cleanup(&view, "vm1", "n9").unwrap_err();
        assert!(e.is_invalid());
        assert_eq!(e.to_string(), "cleaning up VM vm1: n9 is not a cluster host");
    }
}
