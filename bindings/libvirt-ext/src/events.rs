//! Domain lifecycle events: a watch on one libvirt connection that forwards every lifecycle event, and the loss of
//! the connection, into a tokio channel.
//!
//! # Threading model
//!
//! libvirt delivers events only from an event loop, and its default loop is one per process. This module:
//!
//! - registers libvirt's default event loop implementation once per process (`virEventRegisterDefaultImpl`), on the
//!   first call to [`watch`]; nothing happens before that;
//! - lets the process's glib loop thread ([`LOOP_THREAD_NAME`], from `vmha-glib-loop`) run that loop. libvirt's
//!   default implementation is glib's: its handles and timeouts are sources on glib's default main context, and
//!   `virEventRunDefaultImpl` is one iteration of that context. libcib needs the same context iterated, and glib
//!   lets one thread at a time do it, so one thread of the process does it for both (a loop thread of this
//!   module's own would wait for ever for the context the CIB thread owns). The thread starts with the first watch
//!   and lives as long as the process. Event callbacks run on it and only push into an unbounded channel, so they
//!   never block it;
//! - opens each watch's connection on a short-lived thread, [`OPEN_THREAD_NAME`], so that a hung libvirtd costs the
//!   caller at most [`WatchOptions::open_timeout`];
//! - tears each watch down (deregister, close) on another short-lived thread, [`CLOSE_THREAD_NAME`], and waits for it
//!   at most [`WatchOptions::close_timeout`]; never on the loop thread, whose other users a hung libvirtd would hold
//!   up. A teardown against a hung libvirtd is bounded by the keepalive: libvirt closes a connection whose peer
//!   misses `count` probes sent every `interval` seconds.
//!
//! Connections passed to libvirt's event machinery must be opened after the loop is registered, which [`watch`]
//! guarantees. The process must not register another event loop implementation, nor call `virEventRunDefaultImpl`.
//!
//! # Reconnect contract
//!
//! [`WatchItem::ConnectionLost`] is the last item a watch yields: libvirtd went away (EOF, keepalive timeout, I/O
//! error). The caller drops the watch, creates a new one (with a backoff while libvirtd is down), and then
//! reconciles with the domains' current states: events that happened while no watch was connected are lost.
//! [`EventWatch::next`] returns `None` only once the watch is closing.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::Duration;

use tokio::sync::mpsc::{self as channel, UnboundedReceiver, UnboundedSender, WeakUnboundedSender};
use virt::connect::Connect;
use virt_sys as sys;

use crate::{last_error, Error};

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// A domain changed its lifecycle state.
    Event(DomainEvent),
    /// The connection to libvirtd is gone; no more items follow. Create a new watch.
    ConnectionLost(CloseReason),
}

/// One `VIR_DOMAIN_EVENT_ID_LIFECYCLE` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    /// The domain's name.
    pub domain: String,
    /// The domain's UUID in its canonical string form.
    pub uuid: String,
    /// The event and its detail, decoded.
    pub lifecycle: Lifecycle,
    /// The raw `virDomainEventType`.
    pub event: i32,
    /// The raw detail code; its meaning depends on `event`.
    pub detail: i32,
}

/// A decoded lifecycle event (`virDomainEventType`) with its detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Defined(DefinedDetail),
    Undefined(UndefinedDetail),
    Started(StartedDetail),
    Suspended(SuspendedDetail),
    Resumed(ResumedDetail),
    /// The domain is no longer running; the detail says why.
    Stopped(StoppedDetail),
    Shutdown(ShutdownDetail),
    PMSuspended(PMSuspendedDetail),
    Crashed(CrashedDetail),
    /// An event type this build does not know (see [`DomainEvent::event`]).
    Unknown,
}

/// Why libvirt closed a watched connection (`virConnectCloseReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A read or write error on the connection.
    Error,
    /// libvirtd closed the connection (it exited or restarted).
    Eof,
    /// libvirtd did not answer keepalive probes (hung, or its host is unreachable).
    Keepalive,
    /// The client side closed the connection.
    Client,
    /// A reason this build does not know.
    Other(i32),
}

/// How [`watch_with`] opens and closes a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOptions {
    /// Open the connection read-write instead of read-only (for callers that act on [`EventWatch::connection`]).
    pub read_write: bool,
    /// Keepalive probes on the connection; `None` leaves libvirt's default (no probes).
    pub keepalive: Option<KeepAlive>,
    /// How long opening the connection and registering the callbacks may take.
    pub open_timeout: Duration,
    /// How long closing the watch (deregistering its callbacks and closing its connection) may take.
    pub close_timeout: Duration,
}

/// `virConnectSetKeepAlive` settings: libvirt sends a probe after `interval_secs` of silence and closes the
/// connection (reason [`CloseReason::Keepalive`]) after `count` unanswered probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    pub interval_secs: i32,
    pub count: u32,
}

/// A live watch on one connection. Dropping it deregisters the callbacks and closes the connection (see the module
/// documentation for the time bounds).
pub struct EventWatch {
    uri: String,
    registration: Option<Registration>,
    items: UnboundedReceiver<WatchItem>,
    close_timeout: Duration,
}

/// Name of the thread that runs libvirt's default event loop: the process's glib loop thread.
pub const LOOP_THREAD_NAME: &str = vmha_glib_loop::THREAD_NAME;

/// Name of the short-lived threads that open a watch's connection.
pub const OPEN_THREAD_NAME: &str = "vmha-virt-open";

/// Name of the short-lived threads that close a watch's connection.
pub const CLOSE_THREAD_NAME: &str = "vmha-virt-close";

macro_rules! detail_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $raw:path,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A detail code this build does not know.
            Other(i32),
        }

        impl $name {
            fn from_raw(detail: i32) -> Self {
                match u32::try_from(detail) {
                    $(Ok($raw) => Self::$variant,)+
                    _ => Self::Other(detail),
                }
            }
        }
    };
}

detail_enum!(
    /// Detail of [`Lifecycle::Defined`].
    DefinedDetail {
        Added = sys::VIR_DOMAIN_EVENT_DEFINED_ADDED,
        Updated = sys::VIR_DOMAIN_EVENT_DEFINED_UPDATED,
        Renamed = sys::VIR_DOMAIN_EVENT_DEFINED_RENAMED,
        FromSnapshot = sys::VIR_DOMAIN_EVENT_DEFINED_FROM_SNAPSHOT,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::Undefined`].
    UndefinedDetail {
        Removed = sys::VIR_DOMAIN_EVENT_UNDEFINED_REMOVED,
        Renamed = sys::VIR_DOMAIN_EVENT_UNDEFINED_RENAMED,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::Started`].
    StartedDetail {
        Booted = sys::VIR_DOMAIN_EVENT_STARTED_BOOTED,
        Migrated = sys::VIR_DOMAIN_EVENT_STARTED_MIGRATED,
        Restored = sys::VIR_DOMAIN_EVENT_STARTED_RESTORED,
        FromSnapshot = sys::VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT,
        Wakeup = sys::VIR_DOMAIN_EVENT_STARTED_WAKEUP,
        Recreated = sys::VIR_DOMAIN_EVENT_STARTED_RECREATED,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::Suspended`].
    SuspendedDetail {
        Paused = sys::VIR_DOMAIN_EVENT_SUSPENDED_PAUSED,
        Migrated = sys::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED,
        IoError = sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR,
        Watchdog = sys::VIR_DOMAIN_EVENT_SUSPENDED_WATCHDOG,
        Restored = sys::VIR_DOMAIN_EVENT_SUSPENDED_RESTORED,
        FromSnapshot = sys::VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT,
        ApiError = sys::VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR,
        Postcopy = sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
        PostcopyFailed = sys::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED,
        GuestShutdown = sys::VIR_DOMAIN_EVENT_SUSPENDED_GUEST_SHUTDOWN,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::Resumed`].
    ResumedDetail {
        Unpaused = sys::VIR_DOMAIN_EVENT_RESUMED_UNPAUSED,
        Migrated = sys::VIR_DOMAIN_EVENT_RESUMED_MIGRATED,
        FromSnapshot = sys::VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT,
        Postcopy = sys::VIR_DOMAIN_EVENT_RESUMED_POSTCOPY,
        PostcopyFailed = sys::VIR_DOMAIN_EVENT_RESUMED_POSTCOPY_FAILED,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::Stopped`]: why the domain is no longer running.
    StoppedDetail {
        /// The guest shut down (normal or requested by the host).
        Shutdown = sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
        /// Destroyed through the API (`virsh destroy`, a Pacemaker stop that had to force).
        Destroyed = sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
        /// The guest crashed and its `on_crash` action stopped it.
        Crashed = sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED,
        /// Migrated away to another host.
        Migrated = sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED,
        /// Saved to a file.
        Saved = sys::VIR_DOMAIN_EVENT_STOPPED_SAVED,
        /// The hypervisor process died (killed, out of memory, emulator error).
        Failed = sys::VIR_DOMAIN_EVENT_STOPPED_FAILED,
        /// Stopped by reverting to an offline snapshot.
        FromSnapshot = sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT,
        /// Stopped in order to be started again (for example by `virsh reset` in some drivers).
        Recreated = sys::VIR_DOMAIN_EVENT_STOPPED_RECREATED,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::Shutdown`].
    ShutdownDetail {
        Finished = sys::VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED,
        Guest = sys::VIR_DOMAIN_EVENT_SHUTDOWN_GUEST,
        Host = sys::VIR_DOMAIN_EVENT_SHUTDOWN_HOST,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::PMSuspended`].
    PMSuspendedDetail {
        Memory = sys::VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY,
        Disk = sys::VIR_DOMAIN_EVENT_PMSUSPENDED_DISK,
    }
);

detail_enum!(
    /// Detail of [`Lifecycle::Crashed`].
    CrashedDetail {
        Panicked = sys::VIR_DOMAIN_EVENT_CRASHED_PANICKED,
        CrashLoaded = sys::VIR_DOMAIN_EVENT_CRASHED_CRASHLOADED,
    }
);

impl Lifecycle {
    /// Decodes a raw `virDomainEventType` and its detail.
    pub fn from_raw(event: i32, detail: i32) -> Lifecycle {
        match u32::try_from(event) {
            Ok(sys::VIR_DOMAIN_EVENT_DEFINED) => Lifecycle::Defined(DefinedDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_UNDEFINED) => Lifecycle::Undefined(UndefinedDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_STARTED) => Lifecycle::Started(StartedDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_SUSPENDED) => Lifecycle::Suspended(SuspendedDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_RESUMED) => Lifecycle::Resumed(ResumedDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_STOPPED) => Lifecycle::Stopped(StoppedDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_SHUTDOWN) => Lifecycle::Shutdown(ShutdownDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_PMSUSPENDED) => Lifecycle::PMSuspended(PMSuspendedDetail::from_raw(detail)),
            Ok(sys::VIR_DOMAIN_EVENT_CRASHED) => Lifecycle::Crashed(CrashedDetail::from_raw(detail)),
            _ => Lifecycle::Unknown,
        }
    }
}

impl CloseReason {
    fn from_raw(reason: c_int) -> CloseReason {
        match u32::try_from(reason) {
            Ok(sys::VIR_CONNECT_CLOSE_REASON_ERROR) => CloseReason::Error,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_EOF) => CloseReason::Eof,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE) => CloseReason::Keepalive,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_CLIENT) => CloseReason::Client,
            _ => CloseReason::Other(reason),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Error => f.write_str("I/O error on the connection"),
            CloseReason::Eof => f.write_str("libvirtd closed the connection"),
            CloseReason::Keepalive => f.write_str("libvirtd stopped answering keepalive probes"),
            CloseReason::Client => f.write_str("closed by the client"),
            CloseReason::Other(code) => write!(f, "unknown close reason {code}"),
        }
    }
}

impl Default for WatchOptions {
    /// Read-only, keepalive every 5 s with 3 probes, 10 s to open, 5 s to close.
    fn default() -> Self {
        WatchOptions {
            read_write: false,
            keepalive: Some(KeepAlive {
                interval_secs: 5,
                count: 3,
            }),
            open_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// Watches lifecycle events of all domains on `uri` over a read-only connection with the default options.
pub fn watch(uri: &str) -> Result<EventWatch, Error> {
    watch_with(uri, &WatchOptions::default())
}

/// Watches lifecycle events of all domains on `uri`: starts the event loop thread if needed, opens the connection,
/// sets the keepalive, and registers the lifecycle and close callbacks, all within `options.open_timeout`.
pub fn watch_with(uri: &str, options: &WatchOptions) -> Result<EventWatch, Error> {
    start_event_loop()?;
    let (tx, items) = channel::unbounded_channel();
    let (target, opts) = (uri.to_owned(), options.clone());
    // When the caller gave up waiting, the registration is torn down on the opening thread.
    let opened = on_own_thread(
        OPEN_THREAD_NAME,
        "starting the thread that opens the event connection",
        options.open_timeout,
        move || Registration::open(&target, &opts, tx),
    )?;
    let registration = match opened {
        Ok(opened) => opened?,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(Error::Timeout {
                what: "opening the event connection",
                after: options.open_timeout,
            })
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(Error::Failed {
                what: "opening the event connection: the opening thread panicked",
            })
        }
    };
    tracing::debug!(uri, "watching domain lifecycle events");
    Ok(EventWatch {
        uri: uri.to_owned(),
        registration: Some(registration),
        items,
        close_timeout: options.close_timeout,
    })
}

impl EventWatch {
    /// The URI this watch is connected to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The watched connection, to act on the domains whose events this watch reports (the `test` driver keeps its
    /// state per process and reports events only to callbacks of that state). Do not register a close callback on
    /// it: libvirt allows one per connection and the watch owns it.
    pub fn connection(&self) -> &Connect {
        match &self.registration {
            Some(registration) => &registration.conn,
            None => unreachable!("the registration is only taken while the watch is closing"),
        }
    }

    /// The next event or connection loss; `None` once the watch is closing. Cancel-safe (usable in `select!`).
    pub async fn next(&mut self) -> Option<WatchItem> {
        self.items.recv().await
    }

    /// Closes the watch like dropping it does, but reports a teardown that missed `close_timeout` (the teardown then
    /// finishes in the background).
    pub fn close(mut self) -> Result<(), Error> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), Error> {
        match self.registration.take() {
            Some(registration) => tear_down(registration, self.close_timeout),
            None => Ok(()),
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        if let Err(error) = self.shut_down() {
            tracing::warn!(uri = %self.uri, %error, "event watch did not close cleanly");
        }
    }
}

impl fmt::Debug for EventWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventWatch")
            .field("uri", &self.uri)
            .field("callback_id", &self.registration.as_ref().and_then(|r| r.callback_id))
            .finish_non_exhaustive()
    }
}

/// A connection with the watch's callbacks registered on it. Dropping it deregisters them and closes the connection,
/// which may block on a hung libvirtd (up to the keepalive bound): only the opening and closing threads drop it.
struct Registration {
    conn: Connect,
    callback_id: Option<c_int>,
    close_callback: bool,
}

impl Registration {
    fn open(uri: &str, options: &WatchOptions, items: UnboundedSender<WatchItem>) -> Result<Registration, Error> {
        let (call, opened) = if options.read_write {
            ("virConnectOpen", Connect::open(Some(uri)))
        } else {
            ("virConnectOpenReadOnly", Connect::open_read_only(Some(uri)))
        };
        let conn = opened.map_err(|source| Error::Libvirt { call, source })?;
        let mut registration = Registration {
            conn,
            callback_id: None,
            close_callback: false,
        };
        if let Some(keepalive) = options.keepalive {
            registration.set_keepalive(keepalive)?;
        }
        registration.register_close_callback(items.downgrade())?;
        registration.register_lifecycle_callback(items)?;
        Ok(registration)
    }

    fn set_keepalive(&self, keepalive: KeepAlive) -> Result<(), Error> {
        match self.conn.set_keep_alive(keepalive.interval_secs, keepalive.count) {
            Ok(()) => Ok(()),
            // In-process drivers (test://) have no peer to probe.
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_SUPPORT => {
                tracing::debug!(error = %e, "keepalive not supported by this driver");
                Ok(())
            }
            Err(source) => Err(Error::Libvirt {
                call: "virConnectSetKeepAlive",
                source,
            }),
        }
    }

    /// Registers `on_close` with a weak sender, so the channel closes when the lifecycle callback is freed even with
    /// drivers that accept a close callback without ever calling or freeing it (the test driver).
    fn register_close_callback(&mut self, items: WeakUnboundedSender<WatchItem>) -> Result<(), Error> {
        let opaque = Box::into_raw(Box::new(items));
        // SAFETY: `self.conn` is a live connection; `opaque` is a valid, uniquely owned Box pointer whose ownership
        // passes to libvirt, which hands it to `on_close` and frees it exactly once through
        // `free_boxed::<WeakUnboundedSender<_>>` (on unregister, after the callback fires, or when the connection is
        // disposed).
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                self.conn.as_ptr(),
                Some(on_close),
                opaque.cast(),
                Some(free_boxed::<WeakUnboundedSender<WatchItem>>),
            )
        };
        if rc < 0 {
            // SAFETY: registration failed, so libvirt did not take ownership; `opaque` came from Box::into_raw above.
            drop(unsafe { Box::from_raw(opaque) });
            return Err(last_error("virConnectRegisterCloseCallback"));
        }
        self.close_callback = true;
        Ok(())
    }

    fn register_lifecycle_callback(&mut self, items: UnboundedSender<WatchItem>) -> Result<(), Error> {
        let opaque = Box::into_raw(Box::new(items));
        let lifecycle: LifecycleCallback = on_lifecycle;
        // SAFETY: libvirt declares the argument with the generic callback type and calls it as the event's own type
        // (`virConnectDomainEventCallback` for VIR_DOMAIN_EVENT_ID_LIFECYCLE), as its VIR_DOMAIN_EVENT_CALLBACK
        // macro does in C. Both are plain function pointers of the same size; the pointer is never called as the
        // generic type.
        let generic = unsafe { std::mem::transmute::<LifecycleCallback, GenericCallback>(lifecycle) };
        // SAFETY: `self.conn` is a live connection; a null domain means "all domains"; `opaque` is a valid, uniquely
        // owned Box pointer whose ownership passes to libvirt, which frees it exactly once through
        // `free_boxed::<UnboundedSender<_>>` after the last call of `on_lifecycle`.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                self.conn.as_ptr(),
                ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(generic),
                opaque.cast(),
                Some(free_boxed::<UnboundedSender<WatchItem>>),
            )
        };
        if id < 0 {
            // SAFETY: registration failed, so libvirt did not take ownership; `opaque` came from Box::into_raw above.
            drop(unsafe { Box::from_raw(opaque) });
            return Err(last_error("virConnectDomainEventRegisterAny"));
        }
        self.callback_id = Some(id);
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(id) = self.callback_id.take() {
            // SAFETY: `self.conn` is a live connection and `id` the callback id libvirt returned for it.
            if unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) } < 0 {
                let error = virt::error::Error::last_error();
                tracing::debug!(%error, "virConnectDomainEventDeregisterAny failed (connection already lost?)");
            }
        }
        if self.close_callback {
            // SAFETY: `self.conn` is a live connection; `on_close` is the callback registered on it. After the call
            // libvirt no longer calls it; a failure means libvirt already dropped it (after it fired).
            if unsafe { sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close)) } < 0 {
                let error = virt::error::Error::last_error();
                tracing::debug!(%error, "virConnectUnregisterCloseCallback failed (callback already fired?)");
            }
        }
        // `self.conn` is closed when it drops, after this body.
    }
}

type LifecycleCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type GenericCallback = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// The `virConnectDomainEventCallback` for lifecycle events; runs on the loop thread.
unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let forwarded = panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `opaque` is the `Box<UnboundedSender<WatchItem>>` given to virConnectDomainEventRegisterAny;
        // libvirt frees it only after the last call of this callback, and nothing else mutates it.
        let items = unsafe { &*opaque.cast::<UnboundedSender<WatchItem>>() };
        // SAFETY: libvirt holds a reference on `dom` for the duration of the callback.
        let (domain, uuid) = unsafe { domain_identity(dom) };
        // A closed receiver means the watch is closing: the event has no one to go to.
        let _closing = items.send(WatchItem::Event(DomainEvent {
            domain,
            uuid,
            lifecycle: Lifecycle::from_raw(event, detail),
            event,
            detail,
        }));
    }));
    if forwarded.is_err() {
        tracing::error!(event, detail, "panic while forwarding a domain lifecycle event");
    }
    0
}

/// The `virConnectCloseFunc`; runs on the loop thread.
unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    let forwarded = panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `opaque` is the `Box<WeakUnboundedSender<WatchItem>>` given to virConnectRegisterCloseCallback;
        // libvirt frees it only after this callback returns, and nothing else mutates it.
        let items = unsafe { &*opaque.cast::<WeakUnboundedSender<WatchItem>>() };
        if let Some(items) = items.upgrade() {
            let _closing = items.send(WatchItem::ConnectionLost(CloseReason::from_raw(reason)));
        }
    }));
    if forwarded.is_err() {
        tracing::error!(reason, "panic while reporting a lost libvirt connection");
    }
}

/// The `virFreeCallback` for an opaque pointer made by `Box::into_raw(Box::<T>::new(..))`.
unsafe extern "C" fn free_boxed<T>(opaque: *mut c_void) {
    // A panic must not unwind into libvirt (dropping the senders this frees does not panic; a T whose drop
    // did would be logged, not abort the process).
    let freed = panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: libvirt calls this exactly once, with the pointer it was given at registration, which came
        // from `Box::<T>::into_raw`.
        drop(unsafe { Box::from_raw(opaque.cast::<T>()) });
    }));
    if freed.is_err() {
        tracing::error!("panic while freeing a libvirt callback's data");
    }
}

/// The domain's name and UUID string ("" for what libvirt cannot tell).
///
/// # Safety
/// `dom` must be a live `virDomainPtr` for the duration of the call.
unsafe fn domain_identity(dom: sys::virDomainPtr) -> (String, String) {
    // SAFETY: `dom` is live (caller); the returned name belongs to `dom` and is copied before returning.
    let name = unsafe {
        let name = sys::virDomainGetName(dom);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    };
    let mut buf: [c_char; sys::VIR_UUID_STRING_BUFLEN as usize] = [0; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `dom` is live (caller); `buf` has the VIR_UUID_STRING_BUFLEN bytes libvirt writes, NUL included.
    let uuid = unsafe {
        if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0 {
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        } else {
            String::new()
        }
    };
    (name, uuid)
}

static DEFAULT_IMPL: OnceLock<Result<(), virt::error::Error>> = OnceLock::new();

/// Registers libvirt's default (glib) event loop implementation once per process and makes sure the process's glib
/// loop thread runs it.
fn start_event_loop() -> Result<(), Error> {
    DEFAULT_IMPL
        .get_or_init(virt::event::event_register_default_impl)
        .clone()
        .map_err(|source| Error::Libvirt {
            call: "virEventRegisterDefaultImpl",
            source,
        })?;
    Ok(vmha_glib_loop::ensure_running()?)
}

/// Drops `registration` (deregister, close) on a thread of its own and waits for it at most `limit`.
fn tear_down(registration: Registration, limit: Duration) -> Result<(), Error> {
    let closed = on_own_thread(
        CLOSE_THREAD_NAME,
        "starting the thread that closes the event connection",
        limit,
        move || drop(registration),
    )?;
    match closed {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout {
            what: "closing the event connection",
            after: limit,
        }),
    }
}

/// Runs `work` on a new thread named `name` and waits for its result at most `limit`: the result, or why there is
/// none (`Timeout`; `Disconnected` when `work` panicked). A result that comes after the wait ran out is dropped on
/// that thread. `starting` names the step in the error when the thread cannot be started.
fn on_own_thread<T: Send + 'static>(
    name: &str,
    starting: &'static str,
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<Result<T, mpsc::RecvTimeoutError>, Error> {
    let (done_tx, done) = mpsc::sync_channel(1);
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _late = done_tx.send(work());
        })
        .map_err(|source| Error::Thread { what: starting, source })?;
    Ok(done.recv_timeout(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_details_decode() {
        let table = [
            (5, 0, Lifecycle::Stopped(StoppedDetail::Shutdown)),
            (5, 1, Lifecycle::Stopped(StoppedDetail::Destroyed)),
            (5, 2, Lifecycle::Stopped(StoppedDetail::Crashed)),
            (5, 3, Lifecycle::Stopped(StoppedDetail::Migrated)),
            (5, 4, Lifecycle::Stopped(StoppedDetail::Saved)),
            (5, 5, Lifecycle::Stopped(StoppedDetail::Failed)),
            (5, 6, Lifecycle::Stopped(StoppedDetail::FromSnapshot)),
            (5, 99, Lifecycle::Stopped(StoppedDetail::Other(99))),
            (5, -1, Lifecycle::Stopped(StoppedDetail::Other(-1))),
            (2, 0, Lifecycle::Started(StartedDetail::Booted)),
            (6, 1, Lifecycle::Shutdown(ShutdownDetail::Guest)),
            (8, 0, Lifecycle::Crashed(CrashedDetail::Panicked)),
            (42, 0, Lifecycle::Unknown),
            (-1, 0, Lifecycle::Unknown),
        ];
        for (event, detail, expected) in table {
            assert_eq!(
                Lifecycle::from_raw(event, detail),
                expected,
                "event {event} detail {detail}"
            );
        }
    }

    #[test]
    fn a_watch_can_move_into_a_task() {
        fn send<T: Send>() {}
        send::<EventWatch>();
        send::<WatchItem>();
    }

    #[test]
    fn close_reasons_decode() {
        assert_eq!(CloseReason::from_raw(0), CloseReason::Error);
        assert_eq!(CloseReason::from_raw(1), CloseReason::Eof);
        assert_eq!(CloseReason::from_raw(2), CloseReason::Keepalive);
        assert_eq!(CloseReason::from_raw(3), CloseReason::Client);
        assert_eq!(CloseReason::from_raw(7), CloseReason::Other(7));
    }
}
