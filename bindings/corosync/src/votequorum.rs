//! Votequorum, Corosync's vote-based quorum provider: votes, expected votes, the quorum threshold, its
//! options (two_node, wait_for_all, last_man_standing, auto_tie_breaker, qdevice), and tracking.

use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use corosync_sys as sys;

use crate::conn::{Conn, EventSource, Sink};
use crate::error::{check, Error};
use crate::{raw_slice, NodeId, RingId};

/// A node's state as votequorum sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Member,
    Dead,
    Leaving,
    Other(u32),
}

impl NodeState {
    fn from_raw(state: u32) -> NodeState {
        match state {
            sys::VOTEQUORUM_NODESTATE_MEMBER => NodeState::Member,
            sys::VOTEQUORUM_NODESTATE_DEAD => NodeState::Dead,
            sys::VOTEQUORUM_NODESTATE_LEAVING => NodeState::Leaving,
            other => NodeState::Other(other),
        }
    }

    /// A short lower-case name (`member`, `dead`, `leaving`, `other`).
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Member => "member",
            NodeState::Dead => "dead",
            NodeState::Leaving => "leaving",
            NodeState::Other(_) => "other",
        }
    }
}

/// The `VOTEQUORUM_INFO_*` flags of [`VotequorumInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VotequorumFlags(pub u32);

impl VotequorumFlags {
    fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
    pub fn two_node(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_TWONODE)
    }
    pub fn quorate(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_QUORATE)
    }
    pub fn wait_for_all(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_WAIT_FOR_ALL)
    }
    pub fn last_man_standing(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_LAST_MAN_STANDING)
    }
    pub fn auto_tie_breaker(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_AUTO_TIE_BREAKER)
    }
    pub fn allow_downscale(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_ALLOW_DOWNSCALE)
    }
    pub fn qdevice_registered(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_QDEVICE_REGISTERED)
    }
    pub fn qdevice_alive(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_QDEVICE_ALIVE)
    }
    pub fn qdevice_cast_vote(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_QDEVICE_CAST_VOTE)
    }
    pub fn qdevice_master_wins(self) -> bool {
        self.has(sys::VOTEQUORUM_INFO_QDEVICE_MASTER_WINS)
    }
}

/// What `votequorum_getinfo` reports about one node and the cluster's votes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VotequorumInfo {
    pub nodeid: NodeId,
    pub state: NodeState,
    /// The node's votes.
    pub votes: u32,
    /// The node's expected votes.
    pub expected_votes: u32,
    /// The highest expected votes of any member.
    pub highest_expected: u32,
    /// The votes of all members (and the quorum device, when it votes).
    pub total_votes: u32,
    /// Votes needed for quorum.
    pub quorum: u32,
    pub flags: VotequorumFlags,
    pub qdevice_votes: u32,
    /// Empty when no quorum device is configured.
    pub qdevice_name: String,
}

impl VotequorumInfo {
    fn from_raw(info: &sys::votequorum_info) -> Self {
        let name: Vec<u8> = info
            .qdevice_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        VotequorumInfo {
            nodeid: info.node_id,
            state: NodeState::from_raw(info.node_state),
            votes: info.node_votes,
            expected_votes: info.node_expected_votes,
            highest_expected: info.highest_expected,
            total_votes: info.total_votes,
            quorum: info.quorum,
            flags: VotequorumFlags(info.flags),
            qdevice_votes: info.qdevice_votes,
            qdevice_name: String::from_utf8_lossy(&name).into_owned(),
        }
    }
}

/// What votequorum tracking delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VotequorumEvent {
    /// Quorum was recalculated: whether quorate, and every node votequorum knows with its state.
    Quorum {
        quorate: bool,
        nodes: Vec<(NodeId, NodeState)>,
    },
    /// The membership changed: the new ring and its nodes.
    Nodelist { ring: RingId, members: Vec<NodeId> },
    /// The expected votes changed.
    ExpectedVotes(u32),
}

/// A votequorum connection: the query half. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Votequorum {
    conn: Arc<Conn>,
    limit: Duration,
}

/// The events half of a votequorum connection.
#[derive(Debug)]
pub struct VotequorumEvents {
    source: EventSource<VotequorumEvent>,
}

impl Votequorum {
    /// Connects to the local Corosync's votequorum service and starts tracking (`CS_TRACK_CURRENT |
    /// CS_TRACK_CHANGES`): the first events give the current state. Every call on the connection gets
    /// `limit`. Fails with `CS_ERR_LIBRARY` when votequorum is not Corosync's quorum provider.
    pub async fn connect(limit: Duration) -> Result<(Votequorum, VotequorumEvents), Error> {
        let sink: Arc<Sink<VotequorumEvent>> = Sink::new();
        let context = Arc::clone(&sink);
        let conn = Conn::open(
            "votequorum",
            "votequorum_initialize",
            limit,
            finalize,
            Some(sink.clone()),
            move || {
                let mut callbacks = sys::votequorum_callbacks_t {
                    votequorum_quorum_notify_fn: Some(on_quorum),
                    votequorum_expectedvotes_notify_fn: Some(on_expected_votes),
                    votequorum_nodelist_notify_fn: Some(on_nodelist),
                };
                let mut handle: sys::votequorum_handle_t = 0;
                // SAFETY: `handle` and `callbacks` are valid for the call; the library copies `callbacks`.
                check("votequorum_initialize", unsafe {
                    sys::votequorum_initialize(&mut handle, &mut callbacks)
                })?;
                // SAFETY: the context is the `Sink` that `Conn` keeps alive until after
                // `votequorum_finalize`; the callbacks only read it as `&Sink<VotequorumEvent>`. No
                // dispatch can run before this returns.
                let rc =
                    unsafe { sys::votequorum_context_set(handle, Arc::as_ptr(&context).cast::<c_void>().cast_mut()) };
                if let Err(e) = check("votequorum_context_set", rc) {
                    finalize(handle);
                    return Err(e);
                }
                Ok(handle)
            },
        )
        .await?;
        let source = EventSource::new(
            Arc::clone(&conn),
            sink,
            ("votequorum_fd_get", fd_get),
            ("votequorum_dispatch", dispatch),
            limit,
        )
        .await?;
        conn.call("votequorum_trackstart", limit, |raw| {
            // SAFETY: plain values; the handle is live while `conn` is.
            check("votequorum_trackstart", unsafe {
                sys::votequorum_trackstart(raw, 0, sys::CS_TRACK_CURRENT | sys::CS_TRACK_CHANGES)
            })
        })
        .await?;
        Ok((Votequorum { conn, limit }, VotequorumEvents { source }))
    }

    /// Votes and quorum state of node `nodeid` (0: this node).
    pub async fn get_info(&self, nodeid: NodeId) -> Result<VotequorumInfo, Error> {
        self.conn
            .call("votequorum_getinfo", self.limit, move |raw| {
                let mut info = sys::votequorum_info::default();
                // SAFETY: `info` is a valid out pointer for the call.
                check("votequorum_getinfo", unsafe {
                    sys::votequorum_getinfo(raw, nodeid, &mut info)
                })?;
                Ok(VotequorumInfo::from_raw(&info))
            })
            .await
    }
}

impl VotequorumEvents {
    /// The next votequorum change. An `Err` ends the stream (see the crate's reconnect contract).
    /// Cancellation-safe.
    pub async fn next(&mut self) -> Result<VotequorumEvent, Error> {
        self.source.next().await
    }
}

fn finalize(raw: u64) -> sys::cs_error_t {
    // SAFETY: called exactly once per handle, when nothing else can use it any more.
    unsafe { sys::votequorum_finalize(raw) }
}

fn dispatch(raw: u64) -> sys::cs_error_t {
    // SAFETY: `EventSource` calls this while it holds the connection, so the context `Sink` is alive;
    // CS_DISPATCH_ALL returns once nothing is pending.
    unsafe { sys::votequorum_dispatch(raw, sys::CS_DISPATCH_ALL) }
}

fn fd_get(raw: u64, fd: &mut i32) -> sys::cs_error_t {
    // SAFETY: `fd` is a valid out pointer for the call.
    unsafe { sys::votequorum_fd_get(raw, fd) }
}

/// The `Sink` registered as `handle`'s context.
///
/// # Safety
/// Only inside a callback of `votequorum_dispatch` on a handle opened by [`Votequorum::connect`].
unsafe fn sink<'a>(handle: sys::votequorum_handle_t) -> Option<&'a Sink<VotequorumEvent>> {
    let mut context: *mut c_void = ptr::null_mut();
    // SAFETY: `context` is a valid out pointer for the call.
    if unsafe { sys::votequorum_context_get(handle, &mut context) } != sys::CS_OK || context.is_null() {
        return None;
    }
    // SAFETY: per this function's contract the context is a live Sink<VotequorumEvent>.
    Some(unsafe { &*context.cast::<Sink<VotequorumEvent>>() })
}

/// `votequorum_quorum_notification_fn_t`.
unsafe extern "C" fn on_quorum(
    handle: sys::votequorum_handle_t,
    _context: u64,
    quorate: u32,
    node_list_entries: u32,
    node_list: *mut sys::votequorum_node_t,
) {
    // SAFETY: called by votequorum_dispatch on a handle from `Votequorum::connect`.
    let Some(sink) = (unsafe { sink(handle) }) else {
        return;
    };
    sink.deliver("votequorum_quorum_notify", || VotequorumEvent::Quorum {
        quorate: quorate != 0,
        // SAFETY: the library passes `node_list_entries` nodes, alive until the callback returns.
        nodes: unsafe { raw_slice(node_list.cast_const(), node_list_entries as usize) }
            .iter()
            .map(|n| (n.nodeid, NodeState::from_raw(n.state)))
            .collect(),
    });
}

/// `votequorum_nodelist_notification_fn_t`.
unsafe extern "C" fn on_nodelist(
    handle: sys::votequorum_handle_t,
    _context: u64,
    ring_id: sys::votequorum_ring_id_t,
    node_list_entries: u32,
    node_list: *mut u32,
) {
    // SAFETY: called by votequorum_dispatch on a handle from `Votequorum::connect`.
    let Some(sink) = (unsafe { sink(handle) }) else {
        return;
    };
    sink.deliver("votequorum_nodelist_notify", || VotequorumEvent::Nodelist {
        ring: RingId {
            nodeid: ring_id.nodeid,
            seq: ring_id.seq,
        },
        // SAFETY: the library passes `node_list_entries` node ids, alive until the callback returns.
        members: unsafe { raw_slice(node_list.cast_const(), node_list_entries as usize) }.to_vec(),
    });
}

/// `votequorum_expectedvotes_notification_fn_t`.
unsafe extern "C" fn on_expected_votes(handle: sys::votequorum_handle_t, _context: u64, expected_votes: u32) {
    // SAFETY: called by votequorum_dispatch on a handle from `Votequorum::connect`.
    let Some(sink) = (unsafe { sink(handle) }) else {
        return;
    };
    sink.deliver("votequorum_expectedvotes_notify", || {
        VotequorumEvent::ExpectedVotes(expected_votes)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_decode_every_option() {
        let f = VotequorumFlags(
            sys::VOTEQUORUM_INFO_QUORATE | sys::VOTEQUORUM_INFO_WAIT_FOR_ALL | sys::VOTEQUORUM_INFO_QDEVICE_REGISTERED,
        );
        assert!(f.quorate() && f.wait_for_all() && f.qdevice_registered());
        assert!(!f.two_node() && !f.last_man_standing() && !f.auto_tie_breaker() && !f.qdevice_alive());
        let all = VotequorumFlags(0x3ff);
        assert!(
            all.two_node()
                && all.last_man_standing()
                && all.auto_tie_breaker()
                && all.allow_downscale()
                && all.qdevice_alive()
                && all.qdevice_cast_vote()
                && all.qdevice_master_wins()
        );
    }

    #[test]
    fn info_is_read_from_the_c_struct() {
        let mut raw = sys::votequorum_info {
            node_id: 2,
            node_state: sys::VOTEQUORUM_NODESTATE_MEMBER,
            node_votes: 1,
            node_expected_votes: 3,
            highest_expected: 3,
            total_votes: 3,
            quorum: 2,
            flags: sys::VOTEQUORUM_INFO_QUORATE,
            ..Default::default()
        };
        for (dst, src) in raw.qdevice_name.iter_mut().zip(b"Qdevice\0junk") {
            *dst = *src as std::ffi::c_char;
        }
        let info = VotequorumInfo::from_raw(&raw);
        assert_eq!(info.nodeid, 2);
        assert_eq!(info.state, NodeState::Member);
        assert_eq!(
            (info.votes, info.expected_votes, info.total_votes, info.quorum),
            (1, 3, 3, 2)
        );
        assert!(info.flags.quorate());
        assert_eq!(info.qdevice_name, "Qdevice");
        assert_eq!(NodeState::from_raw(9), NodeState::Other(9));
    }
}
