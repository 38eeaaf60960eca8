//! Lifecycle event watches against libvirt's in-process `test:///default` driver, the threads they use, and how long
//! closing them takes.
//!
//! `test:///default` keeps one state per process while any connection to it is open, and its events reach the
//! callbacks registered on that state, so each test acts on the watch's own connection and on domains of its own.
//! The tests share the process's one event loop thread and count threads, so they run one at a time.

use std::os::unix::net::UnixListener;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use libvirt_ext::events::{
    watch, watch_with, DefinedDetail, EventWatch, Lifecycle, ResumedDetail, StartedDetail, StoppedDetail,
    SuspendedDetail, UndefinedDetail, WatchItem, WatchOptions, CLOSE_THREAD_NAME, LOOP_THREAD_NAME, OPEN_THREAD_NAME,
};
use libvirt_ext::Error;
use virt::domain::Domain;

const EVENT_DEADLINE: Duration = Duration::from_secs(5);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    virt::error::clear_error_callback();
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

fn read_write() -> WatchOptions {
    WatchOptions {
        read_write: true,
        ..WatchOptions::default()
    }
}

fn domain_xml(name: &str) -> String {
    format!("<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>")
}

/// How many threads of this process are named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Waits until `count` threads of this process are named `name`. A thread names itself once it runs, and its
/// /proc entry outlives a join by a moment, so the count is polled up to a deadline.
fn expect_threads(name: &str, count: usize) {
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        let now = threads_named(name);
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} threads named {name} after {EVENT_DEADLINE:?}, want {count}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `count` threads of this process run the libvirt event loop.
fn expect_loop_threads(count: usize) {
    expect_threads(LOOP_THREAD_NAME, count);
}

/// The next event for `domain` (events of other domains are skipped); fails on connection loss or after the deadline.
async fn next_event_for(watch: &mut EventWatch, domain: &str) -> Lifecycle {
    let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Err(_) => panic!("no event for {domain} within {EVENT_DEADLINE:?}"),
            Ok(None) => panic!("watch closed while waiting for an event for {domain}"),
            Ok(Some(WatchItem::ConnectionLost(reason))) => panic!("connection lost: {reason}"),
            Ok(Some(WatchItem::Event(event))) if event.domain == domain => {
                assert_eq!(event.uuid.len(), 36, "{event:?}");
                return event.lifecycle;
            }
            Ok(Some(WatchItem::Event(_))) => {}
        }
    }
}

#[test]
fn destroying_a_running_domain_reports_started_then_stopped_destroyed() {
    let _serial = serial();
    runtime().block_on(async {
        let mut watch = watch_with("test:///default", &read_write()).expect("watch test:///default");
        let name = "ev-destroyed";
        let dom = watch
            .connection()
            .create_domain_xml(&domain_xml(name), 0)
            .expect("create domain");
        assert_eq!(
            next_event_for(&mut watch, name).await,
            Lifecycle::Started(StartedDetail::Booted)
        );
        dom.destroy().expect("destroy");
        assert_eq!(
            next_event_for(&mut watch, name).await,
            Lifecycle::Stopped(StoppedDetail::Destroyed)
        );
    });
}

#[test]
fn each_lifecycle_step_reports_its_event() {
    type Step = fn(&Domain) -> Result<(), virt::error::Error>;
    let steps: [(&str, Step, Lifecycle); 7] = [
        ("start", Domain::create, Lifecycle::Started(StartedDetail::Booted)),
        (
            "suspend",
            Domain::suspend,
            Lifecycle::Suspended(SuspendedDetail::Paused),
        ),
        ("resume", Domain::resume, Lifecycle::Resumed(ResumedDetail::Unpaused)),
        (
            "shutdown",
            Domain::shutdown,
            Lifecycle::Stopped(StoppedDetail::Shutdown),
        ),
        ("start again", Domain::create, Lifecycle::Started(StartedDetail::Booted)),
        ("destroy", Domain::destroy, Lifecycle::Stopped(StoppedDetail::Destroyed)),
        (
            "undefine",
            Domain::undefine,
            Lifecycle::Undefined(UndefinedDetail::Removed),
        ),
    ];
    let _serial = serial();
    runtime().block_on(async {
        let mut watch = watch_with("test:///default", &read_write()).expect("watch test:///default");
        let name = "ev-steps";
        let dom = watch.connection().define_domain_xml(&domain_xml(name)).expect("define");
        assert_eq!(
            next_event_for(&mut watch, name).await,
            Lifecycle::Defined(DefinedDetail::Added)
        );
        for (step, act, expected) in steps {
            act(&dom).unwrap_or_else(|e| panic!("{step}: {e}"));
            assert_eq!(next_event_for(&mut watch, name).await, expected, "after {step}");
        }
    });
}

/// A watch closes well within its close timeout, its teardown thread gone, and the loop thread stays for the process.
/// (Before the process's glib loop was shared, libvirt's own loop thread waited for ever for the default context that
/// the CIB thread owned, so every close ran out its whole timeout; vmhad took 5 s to stop.)
#[test]
fn closing_a_watch_is_prompt_and_keeps_the_loop_thread() {
    let _serial = serial();
    // Another user of glib's default context, as the CIB thread is in vmhad, before the first watch.
    vmha_glib_loop::ensure_running().expect("glib loop");
    let options = WatchOptions {
        close_timeout: Duration::from_secs(5),
        ..WatchOptions::default()
    };
    let watch = watch_with("test:///default", &options).expect("watch test:///default");
    expect_loop_threads(1);
    let started = Instant::now();
    watch.close().expect("close within the deadline");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "closing took {took:?}");
    expect_threads(CLOSE_THREAD_NAME, 0);
    expect_loop_threads(1);
}

#[test]
fn watches_share_one_loop_thread() {
    let _serial = serial();
    runtime().block_on(async {
        let first = watch("test:///default").expect("first watch");
        let mut second = watch_with("test:///default", &read_write()).expect("second watch");
        expect_loop_threads(1);
        drop(first);
        let name = "ev-shared";
        let dom = second
            .connection()
            .create_domain_xml(&domain_xml(name), 0)
            .expect("create domain");
        assert_eq!(
            next_event_for(&mut second, name).await,
            Lifecycle::Started(StartedDetail::Booted)
        );
        dom.destroy().expect("destroy");
        assert_eq!(
            next_event_for(&mut second, name).await,
            Lifecycle::Stopped(StoppedDetail::Destroyed)
        );
        drop(second);
        expect_loop_threads(1);
    });
}

#[test]
fn a_failed_open_names_the_call() {
    let _serial = serial();
    let err = watch("test:///nonexistent/vmha-node.xml").expect_err("no such test driver file");
    assert!(
        matches!(
            err,
            Error::Libvirt {
                call: "virConnectOpenReadOnly",
                ..
            }
        ),
        "{err}"
    );
    expect_threads(OPEN_THREAD_NAME, 0);
}

#[test]
fn a_hung_libvirtd_costs_at_most_the_open_timeout() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("vmha-hung-libvirtd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket directory");
    let socket = dir.join("libvirt-sock");
    // Accepts connections into its backlog and never answers: a hung libvirtd.
    let hung = UnixListener::bind(&socket).expect("bind fake libvirtd socket");
    let options = WatchOptions {
        open_timeout: Duration::from_millis(300),
        ..WatchOptions::default()
    };
    let started = Instant::now();
    let err = watch_with(&format!("qemu+unix:///system?socket={}", socket.display()), &options)
        .expect_err("a silent daemon cannot complete the open");
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Once the daemon's socket goes away, the abandoned open fails and its thread ends.
    drop(hung);
    expect_threads(OPEN_THREAD_NAME, 0);
    std::fs::remove_dir_all(&dir).expect("remove socket directory");
}
