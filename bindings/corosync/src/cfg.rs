//! Cfg, Corosync's configuration service: which node this is.

use std::sync::Arc;
use std::time::Duration;

use corosync_sys as sys;

use crate::conn::Conn;
use crate::error::{check, Error};
use crate::NodeId;

/// A cfg connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cfg {
    conn: Arc<Conn>,
    limit: Duration,
}

impl Cfg {
    /// Connects to the local Corosync's cfg service (`corosync_cfg_initialize`, no callbacks). Every call
    /// on the connection gets `limit`.
    pub async fn connect(limit: Duration) -> Result<Cfg, Error> {
        let conn = Conn::open("cfg", "corosync_cfg_initialize", limit, finalize, None, || {
            let mut handle: sys::corosync_cfg_handle_t = 0;
            // SAFETY: `handle` is a valid out pointer; NULL callbacks are allowed (lib/cfg.c copies them
            // only when given).
            check("corosync_cfg_initialize", unsafe {
                sys::corosync_cfg_initialize(&mut handle, std::ptr::null())
            })?;
            Ok(handle)
        })
        .await?;
        Ok(Cfg { conn, limit })
    }

    /// This node's Corosync node id (`corosync_cfg_local_get`).
    pub async fn local_nodeid(&self) -> Result<NodeId, Error> {
        self.conn
            .call("corosync_cfg_local_get", self.limit, |raw| {
                let mut nodeid: std::ffi::c_uint = 0;
                // SAFETY: `nodeid` is a valid out pointer for the call.
                check("corosync_cfg_local_get", unsafe {
                    sys::corosync_cfg_local_get(raw, &mut nodeid)
                })?;
                Ok(nodeid)
            })
            .await
    }
}

fn finalize(raw: u64) -> sys::cs_error_t {
    // SAFETY: called exactly once per handle, when nothing else can use it any more.
    unsafe { sys::corosync_cfg_finalize(raw) }
}
