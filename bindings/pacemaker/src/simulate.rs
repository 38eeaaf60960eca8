//! Pacemaker's scheduler on a CIB kept in a file: what the cluster would do with it (`pcmk_simulate`,
//! libpacemaker's public simulation API, as `crm_simulate -x FILE -S` uses it, without the tool).
//!
//! The scheduler is synchronous and may take long on a big CIB, and libpacemaker keeps process-wide state;
//! so vmha runs it in a child process of its own and bounds the child (see `vmha what-if`).

use std::ffi::c_char;
use std::path::Path;
use std::ptr;

use pacemaker_sys as sys;

use crate::error::{Error, Result};
use crate::xml::{self, cstring, rc_text, Tree};

const CALL: &str = "pcmk_simulate";

/// Runs the scheduler once on the CIB in `cib_file` (configuration and status, e.g. a copy of the live CIB
/// with some hosts marked down) and writes the transition graph it computes to `graph_file`.
///
/// Pacemaker opens the CIB through `cib_new()`, which reads the `CIB_file` environment variable: this sets
/// it for the whole process, so call it only in a process that talks to no live CIB (vmha's what-if child).
pub fn schedule_file(cib_file: &Path, graph_file: &Path) -> Result<()> {
    let cib = cib_file.to_str().ok_or_else(|| Error::Invalid {
        call: CALL,
        reason: format!("{} is not UTF-8", cib_file.display()),
    })?;
    let graph = cstring(CALL, graph_file.to_str().unwrap_or_default())?;
    if graph.as_bytes().is_empty() {
        return Err(Error::Invalid {
            call: CALL,
            reason: format!("{} is not a usable path", graph_file.display()),
        });
    }
    std::env::set_var("CIB_file", cib);
    xml::init_thread();
    let mut injections = sys::pcmk_injections_t {
        node_up: ptr::null_mut(),
        node_down: ptr::null_mut(),
        node_fail: ptr::null_mut(),
        op_inject: ptr::null_mut(),
        op_fail: ptr::null_mut(),
        ticket_grant: ptr::null_mut(),
        ticket_revoke: ptr::null_mut(),
        ticket_standby: ptr::null_mut(),
        ticket_activate: ptr::null_mut(),
        watchdog: ptr::null_mut(),
        quorum: ptr::null_mut(),
    };
    // SAFETY: pe_new_working_set returns a new working set we own (freed below) or NULL.
    let data_set = unsafe { sys::pe_new_working_set() };
    if data_set.is_null() {
        return Err(Error::Invalid {
            call: "pe_new_working_set",
            reason: "out of memory".into(),
        });
    }
    let mut out: *mut sys::xmlNode = ptr::null_mut();
    // SAFETY: every pointer is valid for the call: data_set is ours, injections holds no events (all NULL),
    // graph is a NUL-terminated path Pacemaker only reads; the output tree, if any, becomes ours.
    let rc = unsafe {
        sys::pcmk_simulate(
            &mut out,
            data_set,
            &mut injections,
            sys::pcmk_sim_process,
            0,
            ptr::null_mut::<c_char>(),
            ptr::null_mut::<c_char>(),
            graph.as_ptr().cast_mut(),
            ptr::null_mut::<c_char>(),
        )
    };
    // SAFETY: `out` is NULL or a tree pcmk_simulate handed over; nothing else frees it.
    drop(unsafe { Tree::from_owned(out) });
    // SAFETY: data_set came from pe_new_working_set and is freed once.
    unsafe { sys::pe_free_working_set(data_set) };
    if rc != sys::pcmk_rc_ok {
        return Err(Error::Rc {
            call: CALL,
            code: rc,
            text: rc_text(rc),
        });
    }
    Ok(())
}
