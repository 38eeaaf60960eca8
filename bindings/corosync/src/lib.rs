//! Thin, safe, async wrappers over the Corosync client libraries, for vmhad: [`Cpg`] (process groups:
//! join, agreed-order multicast, membership), [`Quorum`], [`Votequorum`], [`Cmap`] (configuration and
//! runtime keys, and their changes) and [`Cfg`] (local node id).
//!
//! This crate and `corosync-sys` are the only ones in vmha's Corosync code that hold `unsafe`; every block
//! states why it is sound.
//!
//! # Events
//! Services with callbacks (CPG, quorum, votequorum, cmap tracking) come as two halves from `connect`: a cheap-to-clone
//! command half and an events half whose `next().await` yields one event at a time. The events half waits
//! for the connection's file descriptor (`*_fd_get`) to become readable through
//! `tokio::io::unix::AsyncFd` — no polling thread, no busy loop — then runs `*_dispatch(CS_DISPATCH_ALL)`;
//! the C callbacks reach a Rust-side queue through the library's context pointer and never unwind into C.
//! `next()` is cancellation-safe, so it fits a `tokio::select!` loop.
//!
//! # Deadlines
//! The library calls are synchronous IPC without a timeout of their own, so each one — initialize,
//! requests, dispatch, finalize — runs on tokio's blocking pool under `tokio::time::timeout` with the
//! handle's deadline (chosen at `connect`, [`DEFAULT_DEADLINE`] is a sensible value).
//! `CS_ERR_TRY_AGAIN` (Corosync syncing, or CPG flow control) is retried with backoff within the same
//! deadline. A call that misses it returns [`Error::Timeout`]; its thread stays parked in the library
//! until Corosync answers or dies, and later calls on the same handle wait behind it (each again bounded
//! by its deadline). Handles are finalized on drop, on the blocking pool. Because tokio's runtime waits
//! for blocking-pool threads when it is dropped, a daemon should leave its runtime with
//! `Runtime::shutdown_timeout` so a hung Corosync cannot hold up its exit.
//!
//! # Reconnect contract
//! An `Err` from an events half's `next()` is final: the connection is closed or unusable — Corosync
//! exited or restarted ([`Error::Disconnected`], or `CS_ERR_LIBRARY` from dispatch), it hung past the
//! deadline ([`Error::Timeout`]), or a callback failed. Later calls of `next()` return
//! [`Error::Disconnected`], and command calls on that connection fail too. The caller then:
//! 1. treats the partition as not quorate and its memberships as unknown from that moment;
//! 2. drops both halves (the handle is finalized);
//! 3. connects again, with backoff while `connect` fails (`CS_ERR_LIBRARY` while Corosync is down,
//!    `CS_ERR_TRY_AGAIN` while it starts);
//! 4. re-joins its CPG groups: the first membership event after a join lists every member, and quorum and
//!    votequorum tracking start with the current state, so no state needs to survive the reconnect.
//!
//! Messages multicast while this process was disconnected are not replayed; the other members saw it
//! leave (`ProcDown`) and rejoin, in the same order as everything else.

#![allow(unsafe_code)]

mod cfg;
mod cmap;
mod conn;
mod cpg;
mod error;
mod quorum;
mod votequorum;

pub use cfg::Cfg;
pub use cmap::{Cmap, CmapChange, CmapEvent, CmapEvents, CmapValue, RuntimeMember};
pub use conn::DEFAULT_DEADLINE;
pub use cpg::{Cpg, CpgEvent, CpgEvents, CpgMember, CpgReason, MAX_GROUP_NAME};
pub use error::{CsError, Error};
pub use quorum::{Quorum, QuorumEvent, QuorumEvents};
pub use votequorum::{NodeState, Votequorum, VotequorumEvent, VotequorumEvents, VotequorumFlags, VotequorumInfo};

/// A Corosync node id.
pub type NodeId = u32;

/// A totem ring: the node that formed it and its sequence number (grows with every membership change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RingId {
    pub nodeid: NodeId,
    pub seq: u64,
}

/// A slice over a C array that the library passed to a callback (empty for NULL or no entries).
///
/// # Safety
/// When `len > 0` and `ptr` is not NULL, `ptr` must point at `len` initialised `T`s that stay valid and
/// unchanged for `'a`.
unsafe fn raw_slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}
