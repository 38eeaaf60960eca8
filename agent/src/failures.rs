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
}
