//! The vmha lab: a real multi-host KVM cluster (Corosync, Pacemaker, D-Bus, virtlogd, libvirtd, QEMU guests
//! under TCG) on one machine, every host in its own network, mount, UTS, IPC and PID namespaces.
//!
//! Used from Rust tests through [`Lab`] and from the command line through the `vmha-lab` binary.
//! Everything the lab starts is tracked by PID (with the process start time, against PID reuse) and torn
//! down by PID, never by name.

pub mod cluster;
pub mod config;
pub mod guest;
pub mod lab;
pub mod package;
pub mod power;
pub mod process;
pub mod site;
pub mod wait;

pub use cluster::{ClusterStatus, NodeStatus, ResourceStatus};
pub use config::LabConfig;
pub use lab::Lab;
pub use wait::wait_for;

/// Sets up `tracing` output on stderr for tests and the CLI (`RUST_LOG` overrides the default `info`).
pub fn init_logging() {
    remember_panics();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The last panic's message and place, kept so that a failing scenario can repeat it after the
/// (long) daemon log tails it prints while the lab is torn down.
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn remember_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            let place = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = Some(format!("{place}: {message}"));
            }
            previous(info);
        }));
    });
}

/// The message of the last panic seen since [`init_logging`], if any.
pub fn last_panic() -> Option<String> {
    LAST_PANIC.lock().ok().and_then(|l| l.clone())
}
