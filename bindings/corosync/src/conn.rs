//! One IPC connection to a Corosync service: how its calls get a deadline, how they are serialised, how
//! its events are dispatched when its file descriptor is readable, and how it is finalized.
//!
//! Every library call (initialize, requests, dispatch, finalize) runs on tokio's blocking pool under
//! `tokio::time::timeout`: the calls are synchronous IPC with no timeout of their own
//! (`CS_IPC_TIMEOUT_MS` is -1), so a hung Corosync would otherwise block the caller for good. A call that
//! misses its deadline returns [`Error::Timeout`]; its blocking thread stays parked in the library until
//! Corosync answers or dies, holding the connection (and its lock) alive meanwhile. Calls on one
//! connection are serialised by an async lock: libqb's client side has one request/response channel per
//! connection and no locking of its own.

use std::any::Any;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use corosync_sys as sys;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

use crate::error::{check, CsError, Error};

/// The deadline of every call on a handle unless the caller picks another.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// Longest pause between two tries of a call that Corosync answered with `CS_ERR_TRY_AGAIN`.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// A library function that finalizes or dispatches a handle.
pub(crate) type HandleFn = fn(u64) -> sys::cs_error_t;

/// A live library handle. Finalized when the last reference goes (the public handle, its events source
/// and any call still running on the blocking pool each hold one).
pub(crate) struct Conn {
    service: &'static str,
    raw: u64,
    finalize: HandleFn,
    /// What the library's context pointer points at: kept alive until after `*_finalize`.
    context: Option<Arc<dyn Any + Send + Sync>>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("service", &self.service)
            .field("raw", &self.raw)
            .finish()
    }
}

impl Conn {
    /// Opens a connection: runs `init` (which calls `*_initialize` and returns the raw handle) on the
    /// blocking pool within `limit`, retrying while Corosync answers `CS_ERR_TRY_AGAIN`. `context` is what
    /// `init` registered as the library's context pointer; it lives as long as the handle. A handle whose
    /// `init` completes after the deadline is finalized as soon as it does.
    pub(crate) async fn open(
        service: &'static str,
        call: &'static str,
        limit: Duration,
        finalize: HandleFn,
        context: Option<Arc<dyn Any + Send + Sync>>,
        init: impl Fn() -> Result<u64, Error> + Send + Sync + 'static,
    ) -> Result<Arc<Conn>, Error> {
        let init = Arc::new(init);
        retrying(call, limit, move || {
            let init = Arc::clone(&init);
            let context = context.clone();
            async move {
                join(
                    call,
                    tokio::task::spawn_blocking(move || {
                        let raw = init()?;
                        Ok(Arc::new(Conn {
                            service,
                            raw,
                            finalize,
                            context,
                            lock: Arc::new(tokio::sync::Mutex::new(())),
                        }))
                    })
                    .await,
                )
            }
        })
        .await
    }

    pub(crate) fn service(&self) -> &'static str {
        self.service
    }

    /// Runs `f(raw handle)` on the blocking pool, alone on this connection, within `limit` (waiting for
    /// the lock included), retrying while Corosync answers `CS_ERR_TRY_AGAIN`.
    pub(crate) async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        call: &'static str,
        limit: Duration,
        f: impl Fn(u64) -> Result<T, Error> + Send + Sync + 'static,
    ) -> Result<T, Error> {
        let f = Arc::new(f);
        retrying(call, limit, || {
            let conn = Arc::clone(self);
            let f = Arc::clone(&f);
            async move {
                let guard = Arc::clone(&conn.lock).lock_owned().await;
                join(
                    call,
                    tokio::task::spawn_blocking(move || {
                        let _serialised = guard;
                        f(conn.raw)
                    })
                    .await,
                )
            }
        })
        .await
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let (service, raw, finalize, context) = (self.service, self.raw, self.finalize, self.context.take());
        let finalize = move || {
            if let Err(e) = check("finalize", finalize(raw)) {
                tracing::debug!(service, error = %e, "finalizing a corosync handle");
            }
            // The library no longer calls back into `context` once the handle is finalized.
            drop(context);
        };
        // `*_finalize` is IPC too: never block an async thread on it.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(finalize)),
            Err(_) => finalize(),
        }
    }
}

fn join<T>(call: &'static str, r: Result<Result<T, Error>, tokio::task::JoinError>) -> Result<T, Error> {
    r.map_err(|source| Error::Worker { call, source })?
}

/// Runs `attempt` until it succeeds, fails with anything but `CS_ERR_TRY_AGAIN`, or `limit` is over (then
/// the last `CS_ERR_TRY_AGAIN`, or [`Error::Timeout`] if an attempt was still running).
async fn retrying<T, Fut>(call: &'static str, limit: Duration, mut attempt: impl FnMut() -> Fut) -> Result<T, Error>
where
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Err(_) => return Err(Error::Timeout { call, limit }),
            Ok(Err(e)) if e.code() == Some(CsError::TRY_AGAIN) => {
                if Instant::now() + pause >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(pause).await;
                pause = next_backoff(pause);
            }
            Ok(result) => return result,
        }
    }
}

/// Doubles the pause between tries, up to [`MAX_BACKOFF`].
fn next_backoff(pause: Duration) -> Duration {
    (pause * 2).min(MAX_BACKOFF)
}

/// Where a connection's C callbacks leave their events for [`EventSource::next`]. The library's context
/// pointer points at it.
#[derive(Debug)]
pub(crate) struct Sink<E> {
    queue: Mutex<VecDeque<E>>,
    panicked: Mutex<Option<&'static str>>,
}

impl<E> Sink<E> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Sink {
            queue: Mutex::new(VecDeque::new()),
            panicked: Mutex::new(None),
        })
    }

    fn push(&self, event: E) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(event);
    }

    fn pop(&self) -> Option<E> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).pop_front()
    }

    fn panicked(&self) -> Option<&'static str> {
        *self.panicked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a C callback's body (which builds the event): a panic never unwinds into C, it is recorded and
    /// ends the event stream instead.
    pub(crate) fn deliver(&self, callback: &'static str, build: impl FnOnce() -> E) {
        match catch_unwind(AssertUnwindSafe(build)) {
            Ok(event) => self.push(event),
            Err(_) => {
                tracing::error!(callback, "corosync callback panicked");
                *self.panicked.lock().unwrap_or_else(PoisonError::into_inner) = Some(callback);
            }
        }
    }
}

/// The library's file descriptor of a connection (owned and closed by the library, never by us).
#[derive(Debug)]
struct LibraryFd(RawFd);

impl AsRawFd for LibraryFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The events of one connection: waits for its file descriptor, dispatches, hands out what the callbacks
/// queued.
#[derive(Debug)]
pub(crate) struct EventSource<E> {
    // Declared first so it is dropped first: the fd leaves the reactor before the connection (and so the
    // library, which closes the fd) can go.
    fd: AsyncFd<LibraryFd>,
    conn: Arc<Conn>,
    sink: Arc<Sink<E>>,
    dispatch_call: &'static str,
    dispatch: HandleFn,
    limit: Duration,
    /// The error that ended the stream, not yet returned.
    failure: Option<Error>,
    closed: bool,
}

impl<E: Send + 'static> EventSource<E> {
    /// Registers the connection's fd (from `*_fd_get`) with the reactor.
    pub(crate) async fn new(
        conn: Arc<Conn>,
        sink: Arc<Sink<E>>,
        fd_get: (&'static str, fn(u64, &mut i32) -> sys::cs_error_t),
        dispatch: (&'static str, HandleFn),
        limit: Duration,
    ) -> Result<Self, Error> {
        let (fd_call, fd_get) = fd_get;
        let fd = conn
            .call(fd_call, limit, move |raw| {
                let mut fd = -1;
                check(fd_call, fd_get(raw, &mut fd))?;
                Ok(fd)
            })
            .await?;
        // SAFETY: the library keeps `fd` open until `*_finalize`, which runs only when the last reference
        // to `conn` is gone; this `EventSource` holds one and drops the `AsyncFd` before it.
        let fd =
            unsafe { AsyncFd::register_with_interest(LibraryFd(fd), Interest::READABLE) }.map_err(|e| Error::Io {
                call: fd_call,
                source: e.into_parts().1,
            })?;
        Ok(EventSource {
            fd,
            conn,
            sink,
            dispatch_call: dispatch.0,
            dispatch: dispatch.1,
            limit,
            failure: None,
            closed: false,
        })
    }

    /// The next event. Waits (without a deadline) until the fd is readable, then dispatches everything
    /// Corosync has sent (`CS_DISPATCH_ALL`, under the handle's deadline). Cancellation-safe: events a
    /// dispatch queued are kept for the next call. Events queued before a failure are handed out first;
    /// then an `Err` ends the stream, and later calls return [`Error::Disconnected`].
    pub(crate) async fn next(&mut self) -> Result<E, Error> {
        loop {
            if let Some(callback) = self.sink.panicked() {
                self.closed = true;
                return Err(Error::Callback { callback });
            }
            if let Some(event) = self.sink.pop() {
                return Ok(event);
            }
            if let Some(e) = self.failure.take() {
                return Err(e);
            }
            if self.closed {
                return Err(Error::Disconnected {
                    service: self.conn.service(),
                });
            }
            let mut ready = self.fd.readable().await.map_err(|source| Error::Io {
                call: self.dispatch_call,
                source,
            })?;
            let hung_up = ready.ready().is_read_closed() || ready.ready().is_error();
            let (call, dispatch) = (self.dispatch_call, self.dispatch);
            let result = self
                .conn
                .call(call, self.limit, move |raw| check(call, dispatch(raw)))
                .await;
            ready.clear_ready();
            if let Err(e) = result {
                tracing::debug!(service = self.conn.service(), error = %e, "event stream ends");
                self.closed = true;
                self.failure = Some(e);
            } else if hung_up {
                // Corosync closed its end: hand out what was dispatched, then report the loss.
                tracing::debug!(service = self.conn.service(), "corosync closed the connection");
                self.closed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut p = Duration::from_millis(1);
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.push(p.as_millis());
            p = next_backoff(p);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 64, 100, 100, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn try_again_is_retried_until_it_succeeds() {
        let mut tries = 0;
        let r = retrying("cpg_join", Duration::from_secs(1), || {
            tries += 1;
            let n = tries;
            async move {
                if n < 4 {
                    check("cpg_join", sys::CS_ERR_TRY_AGAIN).map(|()| 0)
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn try_again_until_the_deadline_returns_the_last_error() {
        let r: Result<(), Error> = retrying("cpg_mcast_joined", Duration::from_millis(300), || async {
            check("cpg_mcast_joined", sys::CS_ERR_TRY_AGAIN)
        })
        .await;
        assert_eq!(r.unwrap_err().code(), Some(CsError::TRY_AGAIN));
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_are_not_retried() {
        let mut tries = 0;
        let r: Result<(), Error> = retrying("cpg_join", Duration::from_secs(1), || {
            tries += 1;
            async { check("cpg_join", sys::CS_ERR_ACCESS) }
        })
        .await;
        assert_eq!(r.unwrap_err().code(), Some(CsError::ACCESS));
        assert_eq!(tries, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_hangs_times_out() {
        let r: Result<(), Error> = retrying("quorum_getquorate", Duration::from_secs(2), || {
            std::future::pending::<Result<(), Error>>()
        })
        .await;
        let e = r.unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert_eq!(e.call(), "quorum_getquorate");
    }

    #[test]
    fn a_panicking_callback_is_recorded_not_unwound() {
        let sink: Arc<Sink<u32>> = Sink::new();
        sink.deliver("cpg_deliver", || 7);
        sink.deliver("cpg_confchg", || panic!("bad event"));
        assert_eq!(sink.pop(), Some(7));
        assert_eq!(sink.panicked(), Some("cpg_confchg"));
    }
}
