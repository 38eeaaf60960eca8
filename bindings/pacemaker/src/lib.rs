//! Safe, async access to Pacemaker for vmhad: the CIB ([`Cib`]: read, change in single operations, follow
//! changes), the controller ([`Controller`]: who the DC is, report a resource failure so recovery starts
//! at once, refresh a resource) and the attribute manager ([`clear_failures`]: clear a resource's fail
//! counts). Built on `pacemaker-sys` (Pacemaker 2.1.5's client libraries, as Debian 12 ships them).
//!
//! # Threads
//! Pacemaker's client libraries are not thread-safe, so no handle is ever used from two threads:
//! - every [`Cib`] of the process lives on one thread, the CIB thread. libcib delivers notifications only
//!   through glib's process-wide default main context and keeps process-wide state, so the CIB thread is
//!   the thread that owns that context, the process's glib loop thread (`vmha-glib-loop`; libvirt's event
//!   loop shares it; the application must not run a glib main loop on the default context elsewhere);
//! - every [`Controller`] has a thread of its own (its connection uses `pcmk_ipc_dispatch_poll`, no glib).
//!
//! Callers talk to these threads through channels; the async methods only await answers. Each thread first
//! installs the per-thread libxml2 settings Pacemaker's XML code needs (see the `xml` module).
//!
//! # Notifications
//! [`Cib::subscribe`] registers a `cib_diff_notify` callback. On the CIB thread, glib polls the IPC sockets
//! of every connection (`g_main_context_iteration`) and dispatches libcib's handler, which calls ours; it
//! turns the message into a [`CibChange`] and hands it to the subscriber's [`CibChanges`] stream. A lost
//! connection ends the stream with [`Error::Disconnected`]; see [`Cib::subscribe`] for the reconnect
//! contract.
//!
//! # Deadlines
//! Every call takes a `limit`; the caller gets its answer or [`Error::Timeout`] by then, whatever the daemon
//! does. The library-side work is bounded too: CIB calls run with libcib's own timeout set from the time left,
//! controller requests wait on the IPC socket only until their deadline, and a request whose caller already
//! gave up is not sent. The exception is the initial hand-shake of a connection to a daemon that accepts it
//! but never answers (libqb and libcib wait without a timeout there): connect returns [`Error::Timeout`], and
//! the thread of that connection stays blocked until the daemon answers or dies.
#![allow(unsafe_code)]

mod attrd;
mod callback;
mod cib;
mod cib_thread;
#[cfg(test)]
mod compact_tests;
mod controller;
mod error;
mod simulate;
mod xml;

pub use attrd::{clear_failures, update_attribute};
pub use cib::{Access, CallOptions, Cib, CibChange, CibChanges, CibVersion, Followed, FollowedParts, Scope};
pub use controller::{Controller, ControllerState, Resource};
pub use error::{Error, Result};
pub use simulate::schedule_file;
