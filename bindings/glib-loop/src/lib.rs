//! glib's default main context, owned and iterated by one thread of the process for the process's life.
//!
//! Two C libraries vmhad uses deliver their events only through glib's process-wide default main context:
//! - libcib (Pacemaker 2.1.5) watches each CIB connection's IPC socket there (`mainloop_add_ipc_client`);
//! - libvirt's default event loop implementation is glib's: `virEventRegisterDefaultImpl` registers it,
//!   every handle and timeout it adds is a source attached to the default context, and
//!   `virEventRunDefaultImpl` is one `g_main_context_iteration` of that context.
//!
//! glib lets one thread at a time iterate a context. A thread that wants to while another owns it waits on
//! a condition until the owner releases it. With a thread per library, one of them would wait for ever and
//! the other would dispatch both libraries' sources, while the work the waiting thread had been asked to do
//! between iterations never ran. So the process has one such thread, [`THREAD_NAME`]: it owns the default
//! context from its start to the process's end, runs the jobs callers [`submit`] between iterations, in the
//! order they were submitted, and otherwise blocks in `g_main_context_iteration`, which dispatches every
//! library's sources. [`submit`] wakes it (`g_main_context_wakeup`).
//!
//! A job holds up every library's events while it runs, so jobs must be short or bounded by a deadline of
//! their own. Nothing else in the process may iterate the default context (or call
//! `virEventRunDefaultImpl`): the thread refuses to start if another thread owns the context, and a thread
//! that tried later would wait for ever.
#![allow(unsafe_code)]

use std::fmt;
use std::sync::mpsc;
use std::sync::OnceLock;

use glib_sys as sys;

/// The name of the thread that owns glib's default main context.
pub const THREAD_NAME: &str = "vmha-glib";

/// Work for the loop thread.
pub type Job = Box<dyn FnOnce() + Send>;

/// Why the loop thread is not there to run jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "glib's main loop thread: {}", self.0)
    }
}

impl std::error::Error for Error {}

/// glib's default main context.
#[derive(Debug, Clone, Copy)]
struct MainContext(*mut sys::GMainContext);

// SAFETY: a GMainContext is thread-safe; other threads only call g_main_context_wakeup on it.
unsafe impl Send for MainContext {}
// SAFETY: as above.
unsafe impl Sync for MainContext {}

#[derive(Debug)]
struct Loop {
    jobs: mpsc::Sender<Job>,
    context: MainContext,
}

static LOOP: OnceLock<Result<Loop, Error>> = OnceLock::new();

/// Starts the loop thread if it is not running yet. Every later call returns what the first one found.
pub fn ensure_running() -> Result<(), Error> {
    the_loop().map(|_| ())
}

/// Queues `job` to run on the loop thread after the jobs submitted before it, and wakes the thread.
pub fn submit(job: Job) -> Result<(), Error> {
    let running = the_loop()?;
    running
        .jobs
        .send(job)
        .map_err(|_| Error("the thread has ended".into()))?;
    // SAFETY: the context is glib's default one, valid for the process's life (never freed);
    // g_main_context_wakeup may be called from any thread.
    unsafe { sys::g_main_context_wakeup(running.context.0) };
    Ok(())
}

/// Whether the calling thread is the loop thread.
pub fn on_loop_thread() -> bool {
    // Only the loop thread ever owns the default context (it acquired it for good).
    LOOP.get().and_then(|running| running.as_ref().ok()).is_some_and(|l| {
        // SAFETY: the context is valid for the process's life; the call only reads its owner.
        unsafe { sys::g_main_context_is_owner(l.context.0) != 0 }
    })
}

fn the_loop() -> Result<&'static Loop, Error> {
    LOOP.get_or_init(start).as_ref().map_err(Clone::clone)
}

fn start() -> Result<Loop, Error> {
    let (jobs, inbox) = mpsc::channel::<Job>();
    let (ready_tx, ready) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || run(&inbox, &ready_tx))
        .map_err(|e| Error(format!("starting it: {e}")))?;
    let context = ready.recv().map_err(|_| Error("it ended while starting".into()))??;
    Ok(Loop { jobs, context })
}

fn run(inbox: &mpsc::Receiver<Job>, ready: &mpsc::SyncSender<Result<MainContext, Error>>) {
    // SAFETY: g_main_context_default returns glib's global default context (never NULL, never freed).
    let context = unsafe { sys::g_main_context_default() };
    // SAFETY: context is valid; acquiring makes this thread its owner, for the process's life (it is never
    // released).
    if unsafe { sys::g_main_context_acquire(context) } == 0 {
        let _ = ready.send(Err(Error(
            "another thread owns glib's default main context (nothing else may run a glib loop on it)".into(),
        )));
        return;
    }
    if ready.send(Ok(MainContext(context))).is_err() {
        return;
    }
    loop {
        loop {
            match inbox.try_recv() {
                Ok(job) => job(),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        // SAFETY: this thread owns the context; blocks until a source is ready or a caller wakes it.
        unsafe { sys::g_main_context_iteration(context, 1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const DEADLINE: Duration = Duration::from_secs(10);

    /// How often a glib timeout fired, and on which thread it last did.
    type Fired = (AtomicUsize, Mutex<Option<String>>);

    #[test]
    fn jobs_run_in_order_on_the_loop_thread() {
        let (tx, rx) = mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            submit(Box::new(move || {
                let _ = tx.send((i, on_loop_thread(), std::thread::current().name().map(str::to_owned)));
            }))
            .unwrap();
        }
        for i in 0..50 {
            let (n, on_loop, name) = rx.recv_timeout(DEADLINE).unwrap();
            assert_eq!(n, i);
            assert!(on_loop);
            assert_eq!(name.as_deref(), Some(THREAD_NAME));
        }
        assert!(!on_loop_thread(), "a test thread is not the loop thread");
    }

    /// What the old design got wrong: a second thread iterating the default context (as libvirt's own loop
    /// thread did) waits for ever, because the loop thread owns it.
    #[test]
    fn nothing_else_can_iterate_the_default_context() {
        ensure_running().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: the default context is valid; a non-blocking iteration returns at once either way.
            let acquired = unsafe { sys::g_main_context_acquire(sys::g_main_context_default()) };
            let _ = tx.send(acquired);
        });
        assert_eq!(rx.recv_timeout(DEADLINE).unwrap(), 0, "the loop thread owns it");
    }

    unsafe extern "C" fn count_and_stop(data: sys::gpointer) -> sys::gboolean {
        // SAFETY: data is the Arc's pointer given to g_timeout_add_full below, alive until the destroy notify.
        let fired = unsafe { &*data.cast::<Fired>() };
        fired.0.fetch_add(1, Ordering::SeqCst);
        *fired.1.lock().unwrap() = std::thread::current().name().map(str::to_owned);
        sys::GFALSE
    }

    unsafe extern "C" fn release(data: sys::gpointer) {
        // SAFETY: data came from Arc::into_raw below; glib calls this once.
        drop(unsafe { Arc::from_raw(data.cast::<Fired>()) });
    }

    /// Sources other code attaches to the default context (as libvirt and libcib do, from any thread) are
    /// dispatched by the loop thread without anyone submitting a job.
    #[test]
    fn sources_on_the_default_context_are_dispatched_by_the_loop_thread() {
        ensure_running().unwrap();
        let fired: Arc<Fired> = Arc::new((AtomicUsize::new(0), Mutex::new(None)));
        let data = Arc::into_raw(fired.clone()).cast_mut().cast();
        // SAFETY: the callbacks match glib's GSourceFunc and GDestroyNotify; data stays valid until `release`.
        unsafe { sys::g_timeout_add_full(sys::G_PRIORITY_DEFAULT, 20, Some(count_and_stop), data, Some(release)) };
        let until = Instant::now() + DEADLINE;
        while fired.0.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < until, "the timeout never fired");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(fired.1.lock().unwrap().as_deref(), Some(THREAD_NAME));
        assert_eq!(fired.0.load(Ordering::SeqCst), 1, "it asked not to run again");
    }
}
