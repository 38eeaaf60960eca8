//! Telling the guest before a live migration: migrate_to asks the local vmhad (D-Bus, system bus) to send
//! the VM's guest the request `migrate` over the vmha guest channel and waits for the answer, bounded. The
//! answer is only logged: the migration goes ahead whatever it is (see the README).

use std::time::Duration;

use serde_json::json;
use vmha_api::proxy::VirtualMachineProxy;
use vmha_api::Error;
use vmha_model::guest::REQUEST_MIGRATE;

pub use vmha_api::vm_path;

/// Time on top of the guest's deadline for connecting to the bus, vmhad's own grace second and the reply.
const DBUS_GRACE: Duration = Duration::from_secs(3);

/// What became of the question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The guest's hooks ran and succeeded.
    Done,
    /// The guest declined, with its reason.
    Refused(String),
    /// A hook failed, or the guest did not answer in time (vmhad's reason).
    Failed(String),
    /// The guest could not be asked (no system bus, vmhad not running, channel not connected, ...).
    NotAsked(String),
}

/// The resource name vmhad knows the VM by: the OCF instance without a clone suffix (`vm1:0`), else the
/// domain name.
pub fn resource_name(instance: Option<&str>, domain: &str) -> String {
    match instance {
        Some(i) if !i.is_empty() => i.split(':').next().unwrap_or(i).to_owned(),
        _ => domain.to_owned(),
    }
}

/// How long to wait for the guest: the configured wait, at most a quarter of what is left of the
/// operation (the migration needs the rest).
pub fn wait_for_guest(configured: Duration, remaining: Duration) -> Duration {
    configured.min(remaining / 4)
}

/// Asks the guest of `vm` (its resource name) to prepare for a live migration from `source` to `target`,
/// waiting at most `wait` for its answer (plus [`DBUS_GRACE`] for the D-Bus exchange).
pub fn ask_before_migration(vm: &str, source: Option<&str>, target: &str, wait: Duration) -> Answer {
    let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
    let data = json!({ "vm": vm, "source": source, "target": target }).to_string();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return Answer::NotAsked(format!("cannot start the D-Bus client: {e}")),
    };
    let call = async {
        let conn = zbus::Connection::system().await?;
        let proxy = VirtualMachineProxy::builder(&conn).path(vm_path(vm))?.build().await?;
        proxy.guest_request(REQUEST_MIGRATE, &data, wait_ms).await
    };
    let limit = Duration::from_millis(u64::from(wait_ms)) + DBUS_GRACE;
    match runtime.block_on(async { tokio::time::timeout(limit, call).await }) {
        Err(_) => Answer::NotAsked(format!("vmhad did not answer within {} ms", limit.as_millis())),
        Ok(Err(e)) => Answer::NotAsked(describe(&e)),
        Ok(Ok((result, reason))) => match result.as_str() {
            "done" => Answer::Done,
            "refused" => Answer::Refused(reason),
            _ => Answer::Failed(reason),
        },
    }
}

fn describe(e: &Error) -> String {
    match e {
        Error::ZBus(zbus::Error::MethodError(name, detail, _)) => {
            let detail = detail.as_deref().unwrap_or("");
            match name.as_str() {
                "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                    "vmhad is not running on this host".to_owned()
                }
                "org.freedesktop.DBus.Error.UnknownObject" | "org.freedesktop.DBus.Error.UnknownMethod" => {
                    format!("vmhad does not know the VM ({detail})")
                }
                _ => format!("{name}: {detail}"),
            }
        }
        Error::ZBus(other) => format!("cannot reach vmhad: {other}"),
        // vmhad's own refusals (unknown VM, guest unreachable, access denied, ...): its message says why.
        vmhad => format!("{}: {vmhad}", vmhad.short_name()),
    }
}

/// Logs the answer; the migration goes ahead in every case.
pub fn log_answer(vm: &str, target: &str, answer: &Answer) {
    match answer {
        Answer::Done => tracing::info!(vm, target, "the guest is ready for the migration"),
        Answer::Refused(reason) => tracing::warn!(
            vm,
            target,
            "the guest refused the migration ({reason}); migrating anyway"
        ),
        Answer::Failed(reason) => tracing::warn!(
            vm,
            target,
            "the guest's migrate request failed ({reason}); migrating anyway"
        ),
        Answer::NotAsked(why) => tracing::warn!(
            vm,
            target,
            "the guest was not told about the migration: {why}; migrating anyway"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_names_match_vmhad() {
        assert_eq!(vm_path("vm1"), "/org/vmha/Vmha1/vm/vm1");
        assert_eq!(vm_path("db-1.a"), "/org/vmha/Vmha1/vm/db_2d1_2ea");
        assert_eq!(vm_path(""), "/org/vmha/Vmha1/vm/_");
        assert_eq!(resource_name(Some("vm1:2"), "dom"), "vm1");
        assert_eq!(resource_name(Some("vm1"), "dom"), "vm1");
        assert_eq!(resource_name(None, "dom"), "dom");
    }

    #[test]
    fn the_wait_leaves_the_migration_most_of_the_operation() {
        let s = Duration::from_secs;
        assert_eq!(wait_for_guest(s(10), s(120)), s(10));
        assert_eq!(wait_for_guest(s(60), s(120)), s(30));
        assert_eq!(wait_for_guest(Duration::ZERO, s(120)), Duration::ZERO);
    }

    #[test]
    fn without_vmhad_the_guest_is_not_asked_and_the_call_is_bounded() {
        // No vmhad owns the name here (and maybe there is no system bus at all): NotAsked, quickly.
        let t = std::time::Instant::now();
        let answer = ask_before_migration("vmha-no-such-vm", Some("n1"), "n2", Duration::from_millis(500));
        assert!(matches!(answer, Answer::NotAsked(_)), "{answer:?}");
        assert!(t.elapsed() < Duration::from_millis(500) + DBUS_GRACE + Duration::from_secs(1));
    }
}
