//! Fast failure reporting: vmhad watches libvirt's lifecycle events on its host, and when a VM that
//! Pacemaker runs here dies outside Pacemaker's control (its QEMU failed, or the guest crashed), tells
//! Pacemaker's controller at once, so recovery starts now instead of at the next monitor.
//!
//! Only `Stopped(Failed)` and `Stopped(Crashed)` are reported: a shutdown or destroy may be Pacemaker's
//! own stop, and migration and save are normal. The CIB is read afresh before reporting, so a VM that
//! Pacemaker no longer runs here is never reported.
//!
//! The controller's fail request (`pcmk_controld_api_fail`, what `crm_resource --fail` sends) carries no
//! reason: the controller records an `asyncmon` failure whose exit reason is always "Simulated failure".
//! Once that record is in the CIB's status section, vmhad replaces its exit reason with the real one
//! ("QEMU exited unexpectedly", "guest crashed (kernel panic)"), so `crm_mon` and `pcs status` show why.
//! The fail request goes out first and alone: recovery never waits for the reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use libvirt_ext::events::{CrashedDetail, Lifecycle, StoppedDetail, WatchItem};
use tracing::Instrument;
use vmha_model::cib::HostState;
use vmha_model::ClusterView;
use vmha_pacemaker::{Access, CallOptions, Cib, Controller, Resource, Scope};

use crate::state::Shared;

const CONTROLLER_DEADLINE: Duration = Duration::from_secs(5);

/// The exit reason the controller gives every failure reported through its fail request.
pub const SIMULATED_FAILURE: &str = "Simulated failure";

/// How long vmhad waits for the controller's failure record to reach the CIB before giving up on
/// replacing its exit reason (the failure itself is reported either way).
const REASON_DEADLINE: Duration = Duration::from_secs(20);

/// Longest exit reason vmhad writes (Pacemaker's own agents keep theirs to a line).
const REASON_MAX_CHARS: usize = 128;

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
                // The last crash event of each domain (a panic comes before the stop it causes).
                let mut crashes: HashMap<String, CrashedDetail> = HashMap::new();
                while let Some(item) = watch.next().await {
                    match item {
                        WatchItem::Event(event) => match event.lifecycle {
                            Lifecycle::Crashed(detail) => {
                                crashes.insert(event.domain.clone(), detail);
                            }
                            Lifecycle::Started(_) => {
                                crashes.remove(&event.domain);
                            }
                            Lifecycle::Stopped(stopped) => {
                                let crash = crashes.remove(&event.domain);
                                if let Some(reason) = failure_reason(stopped, crash) {
                                    let span = tracing::info_span!(
                                        "vm_failure",
                                        vmha_vm = %event.domain,
                                    );
                                    let _ = report(&shared, &mut controller, &event.domain, &reason)
                                        .instrument(span)
                                        .await;
                                }
                            }
                            _ => {}
                        },
                        WatchItem::ConnectionLost(reason) => {
                            tracing::warn!(?reason, "lost the libvirt connection");
                            break;
                        }
                    }
                }
                // Closing waits for libvirt (bounded by the watch's close timeout): not on this runtime
                // thread, which serves everything else vmhad does.
                match tokio::task::spawn_blocking(move || watch.close()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(%uri, "closing the libvirt event watch: {e}"),
                    Err(e) => tracing::warn!("closing the libvirt event watch: {e}"),
                }
            }
            Ok(Err(e)) => tracing::warn!(%uri, "watching libvirt: {e}"),
            Err(e) => tracing::warn!("libvirt watcher: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Why a VM stopped, when that stop is a failure vmhad reports (`None`: a normal stop): short and printable,
/// it becomes the failure's exit reason in Pacemaker. `crash` is the domain's last crash event, if any.
///
/// libvirt tells that QEMU died (its monitor closed without a shutdown), not how: a signal or exit status
/// of QEMU, which is libvirtd's child, never reaches vmhad.
pub fn failure_reason(stopped: StoppedDetail, crash: Option<CrashedDetail>) -> Option<String> {
    let reason = match stopped {
        StoppedDetail::Failed => "QEMU exited unexpectedly (killed, out of memory or emulator error)".to_string(),
        StoppedDetail::Crashed => match crash {
            Some(CrashedDetail::Panicked) => "guest crashed (guest kernel panic)".to_string(),
            Some(CrashedDetail::CrashLoaded) => "guest crashed (crash kernel loaded)".to_string(),
            Some(CrashedDetail::Other(code)) => format!("guest crashed (libvirt crash detail {code})"),
            None => "guest crashed".to_string(),
        },
        _ => return None,
    };
    Some(printable(&reason, REASON_MAX_CHARS))
}

/// `text` on one printable line of at most `max` characters: control characters are escaped
/// (`\n`, `\u{1b}`), a longer text is cut with "...".
pub fn printable(text: &str, max: usize) -> String {
    let escaped: String = text.chars().flat_map(char::escape_debug).collect();
    // escape_debug also escapes quotes and backslashes; quotes are harmless in an exit reason.
    let escaped = escaped.replace("\\'", "'").replace("\\\"", "\"");
    if escaped.chars().count() <= max {
        return escaped;
    }
    let mut cut: String = escaped.chars().take(max.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

/// The origin vmhad gives the failure record it relabels. The DC's controller treats every change of an
/// operation record made outside a transition as a new failure and bumps the fail count again (Pacemaker
/// 2.1.5; later versions skip a record they have seen), except a record whose origin says it is a
/// restatement of the controller's history (`build_active_RAs`, what the controller writes when it re-sends
/// its history on a join). The relabelled record is exactly that: the same result, restated with its reason.
pub const RESTATED: &str = "build_active_RAs";

/// The CIB change that gives the failure the controller recorded for `resource` on `host` its real
/// `reason`: an XPath that selects the record only while it still carries [`SIMULATED_FAILURE`] (so a
/// later, different failure is never relabelled) and the element to merge into it. `None` when a name
/// cannot be quoted in an XPath (Pacemaker's ids and node names never contain a quote).
pub fn reason_change(host: &str, resource: &str, op_id: &str, reason: &str) -> Option<(String, String)> {
    if [host, resource, op_id].iter().any(|s| s.contains(['\'', '"'])) {
        return None;
    }
    let xpath = format!(
        "/cib/status/node_state[@uname='{host}']/lrm/lrm_resources/lrm_resource[@id='{resource}']\
         /lrm_rsc_op[@id='{op_id}'][@operation='asyncmon'][@exit-reason='{SIMULATED_FAILURE}']"
    );
    let xml = format!(
        r#"<lrm_rsc_op id="{}" exit-reason="{}" crm-debug-origin="{RESTATED}"/>"#,
        vmha_model::change::escape(op_id),
        vmha_model::change::escape(reason)
    );
    Some((xpath, xml))
}

/// Waits (up to [`REASON_DEADLINE`]) for the controller to record the failure vmhad reported for
/// `resource` on `host`, then replaces its "Simulated failure" with `reason`. The controller writes its
/// record after answering the fail request, so each CIB change is a new chance; a record that is not there
/// by the deadline keeps Pacemaker's text (logged).
async fn record_reason(host: String, resource: String, reason: String) {
    let deadline = tokio::time::Instant::now() + REASON_DEADLINE;
    let failure_id = format!("{resource}_last_failure_0");
    let Some((xpath, xml)) = reason_change(&host, &resource, &failure_id, &reason) else {
        return;
    };
    let cib = match Cib::connect("vmhad-failure-reason", Access::ReadWrite, CONTROLLER_DEADLINE).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot give the failure its reason ({reason}): {e}");
            return;
        }
    };
    // Subscribed before the first try, so the record's arrival between a try and the wait is not missed.
    let mut changes = match cib.subscribe(CONTROLLER_DEADLINE).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!("no CIB notifications ({e}): trying once");
            None
        }
    };
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match cib
            .modify(
                &Scope::xpath(&xpath),
                &xml,
                CallOptions::NONE,
                left.min(CONTROLLER_DEADLINE),
            )
            .await
        {
            Ok(()) => {
                tracing::info!(exit_reason = %reason, "failure recorded in Pacemaker with its reason");
                // The same failure is also the resource's last operation until the recovery's stop.
                let last_id = format!("{resource}_last_0");
                if let Some((xpath, xml)) = reason_change(&host, &resource, &last_id, &reason) {
                    let _ = cib
                        .modify(&Scope::xpath(&xpath), &xml, CallOptions::NONE, CONTROLLER_DEADLINE)
                        .await;
                }
                return;
            }
            Err(vmha_pacemaker::Error::Legacy { code, .. }) if code == -(nix::errno::Errno::ENXIO as i32) => {}
            Err(e) => {
                tracing::warn!("giving the failure its reason ({reason}): {e}");
                return;
            }
        }
        let Some(stream) = changes.as_mut() else {
            tracing::warn!("the failure record is not in the CIB yet: it keeps Pacemaker's reason");
            return;
        };
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(_) => changes = None,
            Err(_) => {
                tracing::warn!(
                    "no failure record of {resource} on {host} in the CIB within {REASON_DEADLINE:?}: it keeps Pacemaker's reason"
                );
                return;
            }
        }
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
    #[error("removing the health ban of VM {vm} ({id}): {reason}")]
    HealthBan { vm: String, id: String, reason: String },
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
    let cib_error = |reason: String| CleanupError::Cib {
        vm: vm.to_string(),
        reason,
    };
    let xml = shared.backend.query().await.map_err(|e| cib_error(e.to_string()))?;
    let view = ClusterView::from_cib(&xml).map_err(|e| cib_error(e.to_string()))?;
    let plan = plan_cleanup(&view, vm, host)?;
    // The constraints a restart-elsewhere left (health_app_action), on that host or every host.
    let bans = vmha_model::change::health_bans(&xml, vm, host).map_err(|e| cib_error(e.to_string()))?;
    for ban in bans {
        shared
            .backend
            .apply(crate::backend::CibChange::Delete {
                section: "constraints",
                xml: ban.clone(),
            })
            .await
            .map_err(|e| CleanupError::HealthBan {
                vm: vm.to_string(),
                id: ban,
                reason: e.to_string(),
            })?;
    }
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
    tracing::info!(vmha_vm = %vm, hosts = ?plan.refresh, "cleaned up: fail counts cleared, history refreshed");
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

/// Fails `domain` through Pacemaker's controller with the reason `what`, if Pacemaker runs it on this
/// host (read afresh from the CIB); true when the failure was reported.
pub(crate) async fn report(shared: &Shared, controller: &mut Option<Controller>, domain: &str, what: &str) -> bool {
    let fresh = match shared.backend.query().await.map(|xml| ClusterView::from_cib(&xml)) {
        Ok(Ok(view)) => view,
        _ => {
            tracing::warn!("VM stopped ({what}) but the CIB cannot be read: leaving it to the monitor");
            return false;
        }
    };
    let Some(resource) = running_here(&fresh, domain, &shared.local_host) else {
        return false;
    };
    if controller.is_none() {
        match Controller::connect(CONTROLLER_DEADLINE).await {
            Ok(c) => *controller = Some(c),
            Err(e) => {
                tracing::warn!("VM failed ({what}) but the controller is unreachable: {e}");
                return false;
            }
        }
    }
    let Some(c) = controller.as_ref() else { return false };
    match c
        .fail_resource(&shared.local_host, &resource, CONTROLLER_DEADLINE)
        .await
    {
        Ok(()) => {
            tracing::info!("VM failed ({what}): reported to Pacemaker");
            tokio::spawn(
                record_reason(shared.local_host.clone(), resource.id.clone(), what.to_string()).in_current_span(),
            );
            true
        }
        Err(e) => {
            tracing::warn!("reporting the failure ({what}) to Pacemaker: {e}");
            *controller = None;
            false
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

    #[test]
    fn failures_get_a_reason_and_normal_stops_none() {
        assert_eq!(
            failure_reason(StoppedDetail::Failed, None).as_deref(),
            Some("QEMU exited unexpectedly (killed, out of memory or emulator error)")
        );
        assert_eq!(
            failure_reason(StoppedDetail::Crashed, Some(CrashedDetail::Panicked)).as_deref(),
            Some("guest crashed (guest kernel panic)")
        );
        assert_eq!(
            failure_reason(StoppedDetail::Crashed, None).as_deref(),
            Some("guest crashed")
        );
        for normal in [
            StoppedDetail::Shutdown,
            StoppedDetail::Destroyed,
            StoppedDetail::Migrated,
            StoppedDetail::Saved,
        ] {
            assert_eq!(
                failure_reason(normal, Some(CrashedDetail::Panicked)),
                None,
                "{normal:?}"
            );
        }
    }

    #[test]
    fn reasons_are_one_short_printable_line() {
        assert_eq!(printable("it's \"fine\"", 40), "it's \"fine\"");
        assert_eq!(printable("two\nlines\x1b[31m", 40), "two\\nlines\\u{1b}[31m");
        let long = printable(&"x".repeat(500), 20);
        assert_eq!(long, format!("{}...", "x".repeat(17)));
        assert!(printable("tab\there\u{7f}", 40).chars().all(|c| !c.is_control()));
    }

    #[test]
    fn the_reason_change_selects_only_the_simulated_failure_of_that_resource_on_that_host() {
        let (xpath, xml) = reason_change("n1", "vm1", "vm1_last_failure_0", "a <b> & \"c\"").unwrap();
        assert_eq!(
            xpath,
            "/cib/status/node_state[@uname='n1']/lrm/lrm_resources/lrm_resource[@id='vm1']\
             /lrm_rsc_op[@id='vm1_last_failure_0'][@operation='asyncmon'][@exit-reason='Simulated failure']"
        );
        assert_eq!(
            xml,
            r#"<lrm_rsc_op id="vm1_last_failure_0" exit-reason="a &lt;b&gt; &amp; &quot;c&quot;" crm-debug-origin="build_active_RAs"/>"#
        );
        assert_eq!(reason_change("n'1", "vm1", "vm1_last_0", "r"), None);
        // The XPath matches the record the controller writes for a fail request, and nothing else.
        let status = r#"<cib><status><node_state uname="n1"><lrm><lrm_resources><lrm_resource id="vm1">
            <lrm_rsc_op id="vm1_last_failure_0" operation="asyncmon" exit-reason="Simulated failure"/>
            </lrm_resource></lrm_resources></lrm></node_state></status></cib>"#;
        let doc = roxmltree::Document::parse(status).unwrap();
        let op = doc.descendants().find(|n| n.has_tag_name("lrm_rsc_op")).unwrap();
        let steps: Vec<&str> = xpath.trim_start_matches("/cib/status/").split('/').collect();
        assert_eq!(steps.len(), 5);
        assert!(steps[4].contains(&format!("[@id='{}']", op.attribute("id").unwrap())));
        assert!(steps[4].contains(&format!("[@operation='{}']", op.attribute("operation").unwrap())));
        assert!(steps[4].contains(&format!("[@exit-reason='{}']", op.attribute("exit-reason").unwrap())));
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
