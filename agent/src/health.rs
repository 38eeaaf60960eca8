//! VM and application health monitoring (issue 22; the rules are in [`vmha_model::health`]).
//!
//! The guest channel tasks ([`crate::guest`]) note what each local VM's vmha-guest sends in a
//! [`Registry`] ([`crate::heartbeats`]): that its channel connected or went away, each heartbeat, each application verdict. One
//! task ([`follow_health`]) checks the registry every [`TICK`]: a VM whose heartbeats stopped for longer
//! than its threshold is confirmed hung against libvirt (its domain running, or paused for no purpose:
//! nothing paused it for a migration, save, snapshot or an operator) and the CIB (not migrating), then
//! failed through Pacemaker with the reason and powered off at once (a hung guest cannot shut down), so
//! Pacemaker restarts it — in place, or elsewhere after `migration-threshold` failures. At most
//! `max_resets` per window; beyond that the hang is only reported. Every decision is also a D-Bus
//! `Event` (`vm-hung`, `vm-app-unhealthy`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::CibChange;
use tokio::time::Instant;
use vmha_model::health::{classify_domain_state, AppAction, DomainRun, HealthSettings};
use vmha_model::VmState;
use zbus::Connection;

pub use crate::heartbeats::{due, Check, Monitor, Outcome, Registry};
use crate::state::Shared;

/// How often the registry is checked: a hang is seen at most this late after its threshold.
pub const TICK: Duration = Duration::from_millis(200);
/// The deadline of each libvirt call.
const LIBVIRT_DEADLINE: Duration = Duration::from_secs(5);

/// Why a health action failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("VM {vm} on {host}: {call}: {message}")]
    Libvirt {
        vm: String,
        host: String,
        call: &'static str,
        message: String,
    },
}

/// The domain's run state from libvirt, within [`LIBVIRT_DEADLINE`].
async fn domain_run(uri: &str, host: &str, vm: &str) -> Result<DomainRun, HealthError> {
    let err = |call: &'static str, message: String| HealthError::Libvirt {
        vm: vm.to_string(),
        host: host.to_string(),
        call,
        message,
    };
    let (uri, name) = (uri.to_string(), vm.to_string());
    let work = tokio::task::spawn_blocking(move || -> Result<Option<(u32, i32)>, (&'static str, String)> {
        let conn = virt::connect::Connect::open(Some(&uri)).map_err(|e| ("virConnectOpen", e.to_string()))?;
        match conn.lookup_domain_by_name(&name) {
            Ok(d) => libvirt_ext::domain_state(&d)
                .map(|s| Some((s.state, s.reason)))
                .map_err(|e| ("virDomainGetState", e.to_string())),
            // No such domain: it does not run here (any more).
            Err(e) if e.code().is(virt::error::ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(("virDomainLookupByName", e.to_string())),
        }
    });
    match tokio::time::timeout(LIBVIRT_DEADLINE, work).await {
        Ok(Ok(Ok(Some((state, reason))))) => Ok(classify_domain_state(state, reason)),
        Ok(Ok(Ok(None))) => Ok(DomainRun::NotRunning),
        Ok(Ok(Err((call, message)))) => Err(err(call, message)),
        Ok(Err(e)) => Err(err("virDomainGetState", e.to_string())),
        Err(_) => Err(err(
            "virDomainGetState",
            format!("no answer within {} s", LIBVIRT_DEADLINE.as_secs()),
        )),
    }
}

/// Powers the domain off (`virDomainDestroy`) within [`LIBVIRT_DEADLINE`].
async fn destroy(uri: &str, host: &str, vm: &str) -> Result<(), HealthError> {
    let (u, name) = (uri.to_string(), vm.to_string());
    let work = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let conn = virt::connect::Connect::open(Some(&u)).map_err(|e| e.to_string())?;
        let d = conn.lookup_domain_by_name(&name).map_err(|e| e.to_string())?;
        d.destroy().map_err(|e| e.to_string())?;
        Ok(())
    });
    let message = match tokio::time::timeout(LIBVIRT_DEADLINE, work).await {
        Ok(Ok(Ok(()))) => return Ok(()),
        Ok(Ok(Err(m))) => m,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} s", LIBVIRT_DEADLINE.as_secs()),
    };
    Err(HealthError::Libvirt {
        vm: vm.to_string(),
        host: host.to_string(),
        call: "virDomainDestroy",
        message,
    })
}

/// The reason a hung VM is failed with (its Pacemaker exit reason).
pub fn hung_reason(silent: Duration, s: &HealthSettings, paused: Option<&str>) -> String {
    let mut r = format!(
        "guest hung: no heartbeat for {:.1} s (threshold {} s, sensitivity {})",
        silent.as_secs_f64(),
        s.sensitivity.threshold().as_secs(),
        s.sensitivity.as_str()
    );
    if let Some(why) = paused {
        r.push_str(&format!("; its vCPUs are paused ({why})"));
    }
    r
}

/// Checks the registry every [`TICK`], forever, and acts on hung VMs and unhealthy applications.
pub async fn follow_health(shared: Arc<Shared>, conn: Connection, uri: String, postmortem_dir: PathBuf) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = shared.snapshot();
        let Some(view) = snap.view.as_ref() else { continue };
        let registry = &shared.guests.health;
        let todo = due(registry, Instant::now(), |vm| {
            let v = view.vm(vm)?;
            let (settings, _) = HealthSettings::from_params(&v.params);
            Some((settings, v.state == VmState::Migrating))
        });
        for (vm, settings, check) in todo {
            let (shared, conn, uri, pm) = (Arc::clone(&shared), conn.clone(), uri.clone(), postmortem_dir.clone());
            tokio::spawn(async move {
                let outcome = act(&shared, &conn, &uri, &pm, &vm, &settings, check).await;
                shared.guests.health.finish(&vm, outcome, settings.grace);
            });
        }
    }
}

async fn act(
    shared: &Shared,
    conn: &Connection,
    uri: &str,
    postmortem_dir: &Path,
    vm: &str,
    s: &HealthSettings,
    check: Check,
) -> Outcome {
    let host = &shared.local_host;
    match check {
        Check::Silent(silent) => {
            let paused = match domain_run(uri, host, vm).await {
                Ok(DomainRun::Running) => None,
                Ok(DomainRun::PausedOtherwise(why)) => Some(why),
                Ok(DomainRun::PausedOnPurpose(why)) => {
                    tracing::debug!(vmha_vm = %vm, "VM {vm} sends no heartbeats while paused ({why}): not hung");
                    return Outcome::Excused;
                }
                Ok(DomainRun::NotRunning) => return Outcome::Handled,
                Err(e) => {
                    tracing::warn!(vmha_vm = %vm, "VM {vm} sends no heartbeats, but its state is unknown: {e}");
                    return Outcome::Retry;
                }
            };
            let reason = hung_reason(silent, s, paused);
            if !shared.guests.health.try_reset(vm, s) {
                let message = format!(
                    "{reason}; not reset: {} resets within {} s already (sensitivity {})",
                    s.sensitivity.max_resets(),
                    s.sensitivity.window().as_secs(),
                    s.sensitivity.as_str()
                );
                tracing::error!(vmha_vm = %vm, "VM {vm}: {message}");
                crate::signals::event(conn, "vm-hung", vm, &message).await;
                return Outcome::Handled;
            }
            // Before the reset: what its console showed last and a screenshot (within a few seconds).
            let kept = match crate::postmortem::keep(postmortem_dir, uri, host, vm, &reason).await {
                Ok(dir) => format!("; post-mortem in {}", dir.display()),
                Err(e) => {
                    tracing::warn!(vmha_vm = %vm, "{e}");
                    String::new()
                }
            };
            tracing::warn!(vmha_vm = %vm, "VM {vm}: {reason}: resetting it through Pacemaker{kept}");
            crate::signals::event(conn, "vm-hung", vm, &format!("{reason}; reset{kept}")).await;
            restart(shared, uri, vm, &reason, false, true).await;
            Outcome::Handled
        }
        Check::App(why) => {
            let reason = crate::failures::printable(&format!("application unhealthy: {why}"), 128);
            match s.app_action {
                AppAction::Ignore => {}
                AppAction::Report => {
                    tracing::warn!(vmha_vm = %vm, "VM {vm}: {reason} (health_app_action=report)");
                    crate::signals::event(conn, "vm-app-unhealthy", vm, &reason).await;
                }
                AppAction::Restart | AppAction::RestartElsewhere => {
                    let elsewhere = s.app_action == AppAction::RestartElsewhere;
                    if !shared.guests.health.try_reset(vm, s) {
                        let message = format!("{reason}; not restarted: reset limit reached");
                        tracing::error!(vmha_vm = %vm, "VM {vm}: {message}");
                        crate::signals::event(conn, "vm-app-unhealthy", vm, &message).await;
                        return Outcome::Handled;
                    }
                    tracing::warn!(vmha_vm = %vm, "VM {vm}: {reason}: restarting it (health_app_action={})", s.app_action.as_str());
                    crate::signals::event(
                        conn,
                        "vm-app-unhealthy",
                        vm,
                        &format!("{reason}; {}", s.app_action.as_str()),
                    )
                    .await;
                    // The guest still runs: Pacemaker's stop shuts it down cleanly.
                    restart(shared, uri, vm, &reason, elsewhere, false).await;
                }
            }
            // Acted once per change to unhealthy; the heartbeats are still followed.
            Outcome::Retry
        }
    }
}

/// Fails `vm` through Pacemaker with `reason`, and with `power_off` powers it off at once; with
/// `elsewhere`, then keeps it off this host by a location constraint (score -INFINITY, removed by
/// `vmha vm cleanup`), so Pacemaker starts it on another host.
///
/// The failure goes first: Pacemaker then recovers the VM (a stop here), and the constraint, added while
/// that stop runs, sends the start elsewhere. The other order lets Pacemaker act on the constraint alone,
/// and it moves a migratable VM by live migration: the guest, unhealthy application and all, would arrive
/// elsewhere as it was. (A fail count of INFINITY instead of the constraint is overwritten by the DC's own
/// fail-count update of the same failure, and Pacemaker clears fail counts when the VM's parameters
/// change: both seen in the lab.)
async fn restart(shared: &Shared, uri: &str, vm: &str, reason: &str, elsewhere: bool, power_off: bool) {
    let host = &shared.local_host;
    let mut controller = None;
    if !crate::failures::report(shared, &mut controller, vm, reason).await {
        // Not a VM Pacemaker runs here (any more), or Pacemaker is unreachable: nothing is powered off.
        return;
    }
    if elsewhere {
        let xml = vmha_model::change::health_ban(vm, host);
        match shared
            .backend
            .apply(CibChange::Create {
                section: "constraints",
                xml,
            })
            .await
        {
            Ok(()) => tracing::info!(vmha_vm = %vm, "VM {vm} kept off {host} until `vmha vm cleanup {vm}`"),
            Err(e) => tracing::warn!(vmha_vm = %vm, "VM {vm}: keeping it off {host}: {e}"),
        }
    }
    // A hung guest cannot shut down: power it off now, so Pacemaker's stop finds it stopped.
    if !power_off {
        return;
    }
    if let Err(e) = destroy(uri, host, vm).await {
        tracing::warn!(vmha_vm = %vm, "powering off VM {vm} after failing it: {e} (Pacemaker's stop will)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmha_model::health::Sensitivity;

    fn high() -> HealthSettings {
        HealthSettings {
            sensitivity: Sensitivity::High,
            ..HealthSettings::default()
        }
    }

    #[test]
    fn the_reason_says_how_long_and_why() {
        let s = high();
        assert_eq!(
            hung_reason(Duration::from_millis(5230), &s, None),
            "guest hung: no heartbeat for 5.2 s (threshold 5 s, sensitivity high)"
        );
        assert!(hung_reason(Duration::from_secs(6), &s, Some("unknown reason"))
            .ends_with("; its vCPUs are paused (unknown reason)"));
        assert!(hung_reason(Duration::from_secs(6), &s, Some("unknown reason")).len() <= 128);
    }
}
