//! CPG, Corosync's closed process groups: join a group, multicast to it in agreed (total) order, and get
//! its membership changes (virtual synchrony: every member sees the same changes and messages in the same
//! order).

use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use corosync_sys as sys;

use crate::conn::{Conn, EventSource, Sink};
use crate::error::{check, Error};
use crate::{raw_slice, NodeId, RingId};

/// Longest group name CPG accepts (`CPG_MAX_NAME_LENGTH`), in bytes.
pub const MAX_GROUP_NAME: usize = sys::CPG_MAX_NAME_LENGTH as usize;

/// Why a process appears in a membership change (`cpg_reason_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpgReason {
    /// The process joined the group.
    Join,
    /// The process left the group (`cpg_leave` or `cpg_finalize`).
    Leave,
    /// The process's node left the cluster membership.
    NodeDown,
    /// The process's node joined the cluster membership.
    NodeUp,
    /// The process exited without leaving.
    ProcDown,
    /// No reason given (entries of the member list).
    Undefined,
    /// A code this version does not know.
    Other(u32),
}

impl CpgReason {
    fn from_raw(reason: u32) -> CpgReason {
        match reason {
            sys::CPG_REASON_JOIN => CpgReason::Join,
            sys::CPG_REASON_LEAVE => CpgReason::Leave,
            sys::CPG_REASON_NODEDOWN => CpgReason::NodeDown,
            sys::CPG_REASON_NODEUP => CpgReason::NodeUp,
            sys::CPG_REASON_PROCDOWN => CpgReason::ProcDown,
            sys::CPG_REASON_UNDEFINED => CpgReason::Undefined,
            other => CpgReason::Other(other),
        }
    }

    /// A short lower-case name (`join`, `nodedown`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            CpgReason::Join => "join",
            CpgReason::Leave => "leave",
            CpgReason::NodeDown => "nodedown",
            CpgReason::NodeUp => "nodeup",
            CpgReason::ProcDown => "procdown",
            CpgReason::Undefined => "undefined",
            CpgReason::Other(_) => "other",
        }
    }
}

/// One process in a CPG group: the node it runs on and its PID there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpgMember {
    pub nodeid: NodeId,
    pub pid: u32,
    pub reason: CpgReason,
}

/// What a CPG connection delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpgEvent {
    /// A message multicast to a joined group (also our own), in agreed order.
    Message {
        group: String,
        nodeid: NodeId,
        pid: u32,
        data: Vec<u8>,
    },
    /// The group's membership changed: the full member list after the change, and who joined and left.
    Membership {
        group: String,
        members: Vec<CpgMember>,
        joined: Vec<CpgMember>,
        left: Vec<CpgMember>,
    },
    /// The cluster (totem) membership changed: the new ring and the nodes in it. The first one arrives
    /// right after joining a group.
    Ring { ring: RingId, nodes: Vec<NodeId> },
}

/// A CPG connection: the command half. Cheap to clone; the connection closes when this, every clone and
/// its [`CpgEvents`] are dropped (leaving every joined group).
#[derive(Debug, Clone)]
pub struct Cpg {
    conn: Arc<Conn>,
    limit: Duration,
}

/// The events half of a CPG connection: messages and membership changes of the joined groups.
#[derive(Debug)]
pub struct CpgEvents {
    source: EventSource<CpgEvent>,
}

impl Cpg {
    /// Connects to the local Corosync's CPG service (`cpg_model_initialize`, model v1, with the initial
    /// totem configuration delivered). Every call on the connection, this one included, gets `limit`.
    pub async fn connect(limit: Duration) -> Result<(Cpg, CpgEvents), Error> {
        let sink: Arc<Sink<CpgEvent>> = Sink::new();
        let context = Arc::clone(&sink);
        let conn = Conn::open(
            "cpg",
            "cpg_model_initialize",
            limit,
            finalize,
            Some(sink.clone()),
            move || {
                let mut model = sys::cpg_model_v1_data_t {
                    model: sys::CPG_MODEL_V1,
                    cpg_deliver_fn: Some(on_deliver),
                    cpg_confchg_fn: Some(on_confchg),
                    cpg_totem_confchg_fn: Some(on_totem_confchg),
                    flags: sys::CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF,
                };
                let mut handle: sys::cpg_handle_t = 0;
                // SAFETY: `handle` and `model` are valid for the call; the library copies `model`. The
                // context pointer is the `Sink` that `Conn` keeps alive until after `cpg_finalize`; the
                // callbacks only read it as `&Sink<CpgEvent>`, which is what it is.
                let rc = unsafe {
                    sys::cpg_model_initialize(
                        &mut handle,
                        sys::CPG_MODEL_V1,
                        ptr::from_mut(&mut model).cast::<sys::cpg_model_data_t>(),
                        Arc::as_ptr(&context).cast::<c_void>().cast_mut(),
                    )
                };
                check("cpg_model_initialize", rc)?;
                Ok(handle)
            },
        )
        .await?;
        let source = EventSource::new(
            Arc::clone(&conn),
            sink,
            ("cpg_fd_get", fd_get),
            ("cpg_dispatch", dispatch),
            limit,
        )
        .await?;
        Ok((Cpg { conn, limit }, CpgEvents { source }))
    }

    /// Joins `group`: from now on its messages and membership changes arrive as events, the first being
    /// a membership change that lists every member.
    pub async fn join(&self, group: &str) -> Result<(), Error> {
        let name = group_name("cpg_join", group)?;
        self.conn
            .call("cpg_join", self.limit, move |raw| {
                // SAFETY: `name` is a valid cpg_name on this frame; the library copies it.
                check("cpg_join", unsafe { sys::cpg_join(raw, &name) })
            })
            .await
    }

    /// Leaves `group`.
    pub async fn leave(&self, group: &str) -> Result<(), Error> {
        let name = group_name("cpg_leave", group)?;
        self.conn
            .call("cpg_leave", self.limit, move |raw| {
                // SAFETY: `name` is a valid cpg_name on this frame; the library copies it.
                check("cpg_leave", unsafe { sys::cpg_leave(raw, &name) })
            })
            .await
    }

    /// Multicasts `data` to every joined group with agreed ordering: every member, the sender included,
    /// gets it in the same order relative to other messages and membership changes. Retried while CPG
    /// applies flow control (`CS_ERR_TRY_AGAIN`), within the deadline.
    pub async fn mcast(&self, data: &[u8]) -> Result<(), Error> {
        let data: Arc<[u8]> = Arc::from(data);
        self.conn
            .call("cpg_mcast_joined", self.limit, move |raw| {
                let iov = sys::iovec {
                    iov_base: data.as_ptr().cast_mut().cast::<c_void>(),
                    iov_len: data.len(),
                };
                // SAFETY: one iovec pointing at `data`, alive for the call; the library only reads it
                // (the C prototype is not const-correct).
                check("cpg_mcast_joined", unsafe {
                    sys::cpg_mcast_joined(raw, sys::CPG_TYPE_AGREED, &iov, 1)
                })
            })
            .await
    }

    /// This node's Corosync node id.
    pub async fn local_nodeid(&self) -> Result<NodeId, Error> {
        self.conn
            .call("cpg_local_get", self.limit, |raw| {
                let mut nodeid: std::ffi::c_uint = 0;
                // SAFETY: `nodeid` is a valid out pointer for the call.
                check("cpg_local_get", unsafe { sys::cpg_local_get(raw, &mut nodeid) })?;
                Ok(nodeid)
            })
            .await
    }

    /// The current members of `group` (which this connection must have joined).
    pub async fn membership(&self, group: &str) -> Result<Vec<CpgMember>, Error> {
        let name = group_name("cpg_membership_get", group)?;
        self.conn
            .call("cpg_membership_get", self.limit, move |raw| {
                let mut name = name;
                let mut list = [sys::cpg_address::default(); sys::CPG_MEMBERS_MAX as usize];
                let mut entries = list.len() as std::ffi::c_int;
                // SAFETY: `list` has room for `entries` addresses, and the library writes at most that
                // many; `name` and `entries` are valid for the call.
                check("cpg_membership_get", unsafe {
                    sys::cpg_membership_get(raw, &mut name, list.as_mut_ptr(), &mut entries)
                })?;
                let n = usize::try_from(entries).unwrap_or(0).min(list.len());
                Ok(members(&list[..n]))
            })
            .await
    }

    /// The largest message that is multicast without fragmentation.
    pub async fn max_atomic_msgsize(&self) -> Result<u32, Error> {
        self.conn
            .call("cpg_max_atomic_msgsize_get", self.limit, |raw| {
                let mut size = 0;
                // SAFETY: `size` is a valid out pointer for the call.
                check("cpg_max_atomic_msgsize_get", unsafe {
                    sys::cpg_max_atomic_msgsize_get(raw, &mut size)
                })?;
                Ok(size)
            })
            .await
    }
}

impl CpgEvents {
    /// The next message or membership change. An `Err` ends the stream (see the crate's reconnect
    /// contract). Cancellation-safe.
    pub async fn next(&mut self) -> Result<CpgEvent, Error> {
        self.source.next().await
    }
}

/// A group name as CPG takes it: 1 to [`MAX_GROUP_NAME`] bytes, no NUL.
fn group_name(call: &'static str, group: &str) -> Result<sys::cpg_name, Error> {
    let bytes = group.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_GROUP_NAME || bytes.contains(&0) {
        return Err(Error::InvalidArgument {
            call,
            reason: format!("CPG group name {group:?} must be 1 to {MAX_GROUP_NAME} bytes without NUL"),
        });
    }
    let mut name = sys::cpg_name {
        length: bytes.len() as u32,
        value: [0; MAX_GROUP_NAME],
    };
    for (dst, src) in name.value.iter_mut().zip(bytes) {
        *dst = *src as std::ffi::c_char;
    }
    Ok(name)
}

/// The text of a group name CPG delivered (invalid UTF-8 replaced).
fn group_text(name: &sys::cpg_name) -> String {
    let len = (name.length as usize).min(MAX_GROUP_NAME);
    let bytes: Vec<u8> = name.value[..len].iter().map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn members(list: &[sys::cpg_address]) -> Vec<CpgMember> {
    list.iter()
        .map(|a| CpgMember {
            nodeid: a.nodeid,
            pid: a.pid,
            reason: CpgReason::from_raw(a.reason),
        })
        .collect()
}

fn finalize(raw: u64) -> sys::cs_error_t {
    // SAFETY: finalizing a handle is valid once; `Conn` calls this exactly once, when nothing else can use
    // the handle any more. An unknown handle is rejected by the library's handle database.
    unsafe { sys::cpg_finalize(raw) }
}

fn dispatch(raw: u64) -> sys::cs_error_t {
    // SAFETY: `EventSource` calls this while it holds the connection, so the context `Sink` the callbacks
    // use is alive; CS_DISPATCH_ALL reads with a zero timeout and returns once nothing is pending.
    unsafe { sys::cpg_dispatch(raw, sys::CS_DISPATCH_ALL) }
}

fn fd_get(raw: u64, fd: &mut i32) -> sys::cs_error_t {
    // SAFETY: `fd` is a valid out pointer for the call.
    unsafe { sys::cpg_fd_get(raw, fd) }
}

/// The `Sink` registered as `handle`'s context.
///
/// # Safety
/// Only inside a callback of `cpg_dispatch` on a handle opened by [`Cpg::connect`], whose context is a
/// live `Sink<CpgEvent>` for the whole dispatch.
unsafe fn sink<'a>(handle: sys::cpg_handle_t) -> Option<&'a Sink<CpgEvent>> {
    let mut context: *mut c_void = ptr::null_mut();
    // SAFETY: `context` is a valid out pointer for the call.
    let rc = unsafe { sys::cpg_context_get(handle, &mut context) };
    if rc != sys::CS_OK || context.is_null() {
        return None;
    }
    // SAFETY: per this function's contract the context is a live Sink<CpgEvent>.
    Some(unsafe { &*context.cast::<Sink<CpgEvent>>() })
}

/// `cpg_deliver_fn_t`.
unsafe extern "C" fn on_deliver(
    handle: sys::cpg_handle_t,
    group_name: *const sys::cpg_name,
    nodeid: u32,
    pid: u32,
    msg: *mut c_void,
    msg_len: usize,
) {
    // SAFETY: called by cpg_dispatch on a handle from `Cpg::connect`.
    let Some(sink) = (unsafe { sink(handle) }) else {
        return;
    };
    sink.deliver("cpg_deliver", || {
        // SAFETY: the library passes a valid group name and `msg_len` readable bytes at `msg`, both alive
        // until the callback returns; they are copied here.
        let (group, data) = unsafe {
            (
                group_name.as_ref().map(group_text).unwrap_or_default(),
                raw_slice(msg.cast::<u8>().cast_const(), msg_len).to_vec(),
            )
        };
        CpgEvent::Message {
            group,
            nodeid,
            pid,
            data,
        }
    });
}

/// `cpg_confchg_fn_t`.
unsafe extern "C" fn on_confchg(
    handle: sys::cpg_handle_t,
    group_name: *const sys::cpg_name,
    member_list: *const sys::cpg_address,
    member_list_entries: usize,
    left_list: *const sys::cpg_address,
    left_list_entries: usize,
    joined_list: *const sys::cpg_address,
    joined_list_entries: usize,
) {
    // SAFETY: called by cpg_dispatch on a handle from `Cpg::connect`.
    let Some(sink) = (unsafe { sink(handle) }) else {
        return;
    };
    sink.deliver("cpg_confchg", || {
        // SAFETY: the library passes a valid group name and three arrays with the given numbers of
        // entries, alive until the callback returns; they are copied here.
        unsafe {
            CpgEvent::Membership {
                group: group_name.as_ref().map(group_text).unwrap_or_default(),
                members: members(raw_slice(member_list, member_list_entries)),
                joined: members(raw_slice(joined_list, joined_list_entries)),
                left: members(raw_slice(left_list, left_list_entries)),
            }
        }
    });
}

/// `cpg_totem_confchg_fn_t`.
unsafe extern "C" fn on_totem_confchg(
    handle: sys::cpg_handle_t,
    ring_id: sys::cpg_ring_id,
    member_list_entries: u32,
    member_list: *const u32,
) {
    // SAFETY: called by cpg_dispatch on a handle from `Cpg::connect`.
    let Some(sink) = (unsafe { sink(handle) }) else {
        return;
    };
    sink.deliver("cpg_totem_confchg", || CpgEvent::Ring {
        ring: RingId {
            nodeid: ring_id.nodeid,
            seq: ring_id.seq,
        },
        // SAFETY: the library passes an array of `member_list_entries` node ids, alive until the
        // callback returns; it is copied here.
        nodes: unsafe { raw_slice(member_list, member_list_entries as usize) }.to_vec(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_round_trip() {
        let name = group_name("cpg_join", "vmha").unwrap();
        assert_eq!(name.length, 4);
        assert_eq!(group_text(&name), "vmha");
        let longest = "g".repeat(MAX_GROUP_NAME);
        assert_eq!(group_text(&group_name("cpg_join", &longest).unwrap()), longest);
    }

    #[test]
    fn bad_group_names_are_refused_before_corosync_sees_them() {
        for bad in ["", "a\0b", &"g".repeat(MAX_GROUP_NAME + 1)] {
            let e = group_name("cpg_join", bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { call: "cpg_join", .. }), "{e}");
        }
    }

    #[test]
    fn a_delivered_name_longer_than_the_buffer_is_clamped() {
        let mut name = group_name("cpg_join", "x").unwrap();
        name.length = 10_000;
        assert_eq!(group_text(&name).len(), MAX_GROUP_NAME);
    }

    #[test]
    fn addresses_become_members_with_reasons() {
        let list = [
            sys::cpg_address {
                nodeid: 1,
                pid: 100,
                reason: sys::CPG_REASON_JOIN,
            },
            sys::cpg_address {
                nodeid: 3,
                pid: 300,
                reason: sys::CPG_REASON_NODEDOWN,
            },
            sys::cpg_address {
                nodeid: 2,
                pid: 200,
                reason: 42,
            },
        ];
        let m = members(&list);
        assert_eq!(
            m,
            vec![
                CpgMember {
                    nodeid: 1,
                    pid: 100,
                    reason: CpgReason::Join
                },
                CpgMember {
                    nodeid: 3,
                    pid: 300,
                    reason: CpgReason::NodeDown
                },
                CpgMember {
                    nodeid: 2,
                    pid: 200,
                    reason: CpgReason::Other(42)
                },
            ]
        );
        assert_eq!(m[1].reason.as_str(), "nodedown");
    }
}
