//! Quorum, Corosync's quorum service: is this partition quorate, and which nodes are in it.

use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use corosync_sys as sys;

use crate::conn::{Conn, EventSource, Sink};
use crate::error::{check, Error};
use crate::{raw_slice, NodeId, RingId};

/// A quorum change: whether the partition is quorate, its ring, and the nodes in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumEvent {
    pub quorate: bool,
    /// The ring (`ring.seq` is the ring sequence number).
    pub ring: RingId,
    pub members: Vec<NodeId>,
}

/// A quorum connection: the query half. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Quorum {
    conn: Arc<Conn>,
    limit: Duration,
    provider: bool,
}

/// The events half of a quorum connection.
#[derive(Debug)]
pub struct QuorumEvents {
    source: EventSource<QuorumEvent>,
}

impl Quorum {
    /// Connects to the local Corosync's quorum service (`quorum_model_initialize`, model v1) and starts
    /// tracking (`quorum_trackstart` with `CS_TRACK_CURRENT | CS_TRACK_CHANGES`): the first event is the
    /// current state, then one per change. Every call on the connection gets `limit`.
    pub async fn connect(limit: Duration) -> Result<(Quorum, QuorumEvents), Error> {
        let sink: Arc<Sink<QuorumEvent>> = Sink::new();
        let context = Arc::clone(&sink);
        let quorum_type = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let kind = Arc::clone(&quorum_type);
        let conn = Conn::open(
            "quorum",
            "quorum_model_initialize",
            limit,
            finalize,
            Some(sink.clone()),
            move || {
                let mut model = sys::quorum_model_v1_data_t {
                    model: sys::QUORUM_MODEL_V1,
                    quorum_notify_fn: Some(on_quorum),
                    nodelist_notify_fn: None,
                };
                let mut handle: sys::quorum_handle_t = 0;
                let mut quorum_type = 0;
                // SAFETY: `handle`, `model` and `quorum_type` are valid for the call; the library copies
                // `model`. The context pointer is the `Sink` that `Conn` keeps alive until after
                // `quorum_finalize`; the callback only reads it as `&Sink<QuorumEvent>`.
                let rc = unsafe {
                    sys::quorum_model_initialize(
                        &mut handle,
                        sys::QUORUM_MODEL_V1,
                        ptr::from_mut(&mut model).cast::<sys::quorum_model_data_t>(),
                        &mut quorum_type,
                        Arc::as_ptr(&context).cast::<c_void>().cast_mut(),
                    )
                };
                check("quorum_model_initialize", rc)?;
                kind.store(quorum_type, std::sync::atomic::Ordering::Relaxed);
                Ok(handle)
            },
        )
        .await?;
        let source = EventSource::new(
            Arc::clone(&conn),
            sink,
            ("quorum_fd_get", fd_get),
            ("quorum_dispatch", dispatch),
            limit,
        )
        .await?;
        conn.call("quorum_trackstart", limit, |raw| {
            // SAFETY: plain values; the handle is live while `conn` is.
            check("quorum_trackstart", unsafe {
                sys::quorum_trackstart(raw, sys::CS_TRACK_CURRENT | sys::CS_TRACK_CHANGES)
            })
        })
        .await?;
        let provider = quorum_type.load(std::sync::atomic::Ordering::Relaxed) == sys::QUORUM_SET;
        Ok((Quorum { conn, limit, provider }, QuorumEvents { source }))
    }

    /// True when Corosync runs a quorum provider (`QUORUM_SET`); without one every partition is quorate.
    pub fn has_provider(&self) -> bool {
        self.provider
    }

    /// Whether this node's partition is quorate now (`quorum_getquorate`).
    pub async fn is_quorate(&self) -> Result<bool, Error> {
        self.conn
            .call("quorum_getquorate", self.limit, |raw| {
                let mut quorate = 0;
                // SAFETY: `quorate` is a valid out pointer for the call.
                check("quorum_getquorate", unsafe {
                    sys::quorum_getquorate(raw, &mut quorate)
                })?;
                Ok(quorate != 0)
            })
            .await
    }
}

impl QuorumEvents {
    /// The next quorum change. An `Err` ends the stream (see the crate's reconnect contract): treat the
    /// partition as not quorate until a new connection says otherwise. Cancellation-safe.
    pub async fn next(&mut self) -> Result<QuorumEvent, Error> {
        self.source.next().await
    }
}

fn finalize(raw: u64) -> sys::cs_error_t {
    // SAFETY: `Conn` calls this exactly once, when nothing else can use the handle any more.
    unsafe { sys::quorum_finalize(raw) }
}

fn dispatch(raw: u64) -> sys::cs_error_t {
    // SAFETY: `EventSource` calls this while it holds the connection, so the context `Sink` is alive;
    // CS_DISPATCH_ALL returns once nothing is pending.
    unsafe { sys::quorum_dispatch(raw, sys::CS_DISPATCH_ALL) }
}

fn fd_get(raw: u64, fd: &mut i32) -> sys::cs_error_t {
    // SAFETY: `fd` is a valid out pointer for the call.
    unsafe { sys::quorum_fd_get(raw, fd) }
}

/// `quorum_v1_quorum_notification_fn_t`.
unsafe extern "C" fn on_quorum(
    handle: sys::quorum_handle_t,
    quorate: u32,
    ring_id: sys::quorum_ring_id,
    member_list_entries: u32,
    member_list: *const u32,
) {
    let mut context: *const c_void = ptr::null();
    // SAFETY: `context` is a valid out pointer for the call.
    if unsafe { sys::quorum_context_get(handle, &mut context) } != sys::CS_OK || context.is_null() {
        return;
    }
    // SAFETY: called by quorum_dispatch on a handle from `Quorum::connect`, whose context is a live
    // Sink<QuorumEvent> for the whole dispatch.
    let sink = unsafe { &*context.cast::<Sink<QuorumEvent>>() };
    sink.deliver("quorum_notify", || QuorumEvent {
        quorate: quorate != 0,
        ring: RingId {
            nodeid: ring_id.nodeid,
            seq: ring_id.seq,
        },
        // SAFETY: the library passes `member_list_entries` node ids, alive until the callback returns;
        // they are copied here.
        members: unsafe { raw_slice(member_list, member_list_entries as usize) }.to_vec(),
    });
}
