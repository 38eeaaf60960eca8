//! The attribute manager (pacemaker-attrd): clearing a resource's fail counts, the first half of
//! `crm_resource --cleanup` (the second is the controller's refresh, [`crate::Controller::refresh_resource`]).
//!
//! `pcmk__attrd_api_clear_failures` with no API object opens a temporary connection (synchronous
//! dispatch), sends the request and closes it; attrd does not answer clear requests. The call runs on a
//! thread of its own so the caller's deadline holds even if attrd accepts the connection but never
//! completes the IPC hand-shake (that thread then stays blocked until attrd answers or dies).

use std::ffi::CString;
use std::ptr;
use std::time::Duration;

use pacemaker_sys as sys;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::xml::{self, cstring};

const CALL: &str = "pcmk__attrd_api_clear_failures";

/// Asks pacemaker-attrd to clear `resource`'s fail counts and last-failure times (the transient
/// attributes `fail-count-<resource>#<op>_<interval>` and `last-failure-...`) on `host`, or on every host
/// when `host` is `None`. attrd removes them from every host's memory and from the CIB status section;
/// returns once the request was sent (attrd sends no answer to it).
pub async fn clear_failures(host: Option<&str>, resource: &str, limit: Duration) -> Result<()> {
    let host: Option<CString> = host.map(|h| cstring(CALL, h)).transpose()?;
    if resource.is_empty() {
        return Err(Error::Invalid {
            call: CALL,
            reason: "no resource named (an empty name would clear every resource's failures)".into(),
        });
    }
    let resource = cstring(CALL, resource)?;
    on_attrd_thread(CALL, limit, true, move || {
        // SAFETY: a NULL api makes libcrmcommon create, connect, use and free a connection of its own on
        // this thread; every string is a valid C string that outlives the call, or NULL (operation and
        // interval: every operation; user name: none, the caller's own rights).
        unsafe {
            sys::pcmk__attrd_api_clear_failures(
                ptr::null_mut(),
                host.as_ref().map_or(ptr::null(), |h| h.as_ptr()),
                resource.as_ptr(),
                ptr::null(),
                ptr::null(),
                ptr::null(),
                0, // pcmk__node_attr_none: a cluster node, not a Pacemaker Remote one
            )
        }
    })
    .await
}

/// Runs one attrd request (`request`, returning a standard Pacemaker return code) on a thread of its own,
/// so that `limit` holds even if attrd never completes the IPC hand-shake. `hint_when_down` adds "is
/// Pacemaker running?" to the errors that mean attrd could not be reached.
async fn on_attrd_thread(
    call: &'static str,
    limit: Duration,
    hint_when_down: bool,
    request: impl FnOnce() -> i32 + Send + 'static,
) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("pcmk-attrd".into())
        .spawn(move || {
            xml::init_thread();
            let _ = tx.send(request());
        })
        .map_err(|e| Error::Invalid {
            call,
            reason: format!("starting the attrd thread: {e}"),
        })?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(rc)) if rc == sys::pcmk_rc_ok => Ok(()),
        Ok(Ok(rc)) => Err(Error::Rc {
            call,
            code: rc,
            text: if hint_when_down && (rc == libc::ENOTCONN || rc == libc::ECONNREFUSED || rc == libc::ENOENT) {
                format!("{} (is Pacemaker running?)", xml::rc_text(rc))
            } else {
                xml::rc_text(rc)
            },
        }),
        Ok(Err(_)) | Err(_) => Err(Error::Timeout { call, limit }),
    }
}

const UPDATE: &str = "pcmk__attrd_api_update";

/// `pcmk__node_attr_value` (Pacemaker 2.1.5's `enum pcmk__node_attr_opts`, in a header Debian does not
/// install): the update sets the attribute's value.
const NODE_ATTR_VALUE: u32 = 1 << 3;

/// Asks pacemaker-attrd to set the transient node attribute `name` of `host` to `value` (what the
/// controller does to a fail count, and `crm_attribute -l reboot` to any attribute); attrd writes it to the
/// CIB's status section and the scheduler sees it. Returns once the request was sent.
pub async fn update_attribute(host: &str, name: &str, value: &str, limit: Duration) -> Result<()> {
    if host.is_empty() || name.is_empty() {
        return Err(Error::Invalid {
            call: UPDATE,
            reason: "no host or no attribute named".into(),
        });
    }
    let host = cstring(UPDATE, host)?;
    let name = cstring(UPDATE, name)?;
    let value = cstring(UPDATE, value)?;
    on_attrd_thread(UPDATE, limit, false, move || {
        // SAFETY: a NULL api makes libcrmcommon create, connect, use and free a connection of its own on
        // this thread; host, name and value are valid C strings that outlive the call; dampen, set and user
        // name are NULL (unchanged, the first set, the caller's own rights).
        unsafe {
            sys::pcmk__attrd_api_update(
                ptr::null_mut(),
                host.as_ptr(),
                name.as_ptr(),
                value.as_ptr(),
                ptr::null(),
                ptr::null(),
                ptr::null(),
                NODE_ATTR_VALUE,
            )
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_resource_name_is_refused_before_anything_is_sent() {
        match clear_failures(None, "", Duration::from_secs(1)).await {
            Err(Error::Invalid { call, .. }) => assert_eq!(call, CALL),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_update_without_host_or_name_or_with_a_nul_is_refused_before_anything_is_sent() {
        for (host, name, value) in [("", "a", "1"), ("n1", "", "1"), ("n1", "a\0b", "1"), ("n1", "a", "1\0")] {
            assert!(
                matches!(
                    update_attribute(host, name, value, Duration::from_secs(1)).await,
                    Err(Error::Invalid { .. })
                ),
                "{host:?} {name:?} {value:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_nul_byte_in_a_name_is_refused() {
        assert!(matches!(
            clear_failures(Some("node\0x"), "vm1", Duration::from_secs(1)).await,
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            clear_failures(None, "vm\0x", Duration::from_secs(1)).await,
            Err(Error::Invalid { .. })
        ));
    }
}
