//! `vmha-guest`: the guest side of vmha's guest channel. Opens the virtio-serial port
//! `org.vmha.guest.0`, says hello, and for every cluster event or request from the host runs the
//! executables in `<hooks dir>/<name>/` (in name order, the message as JSON on stdin, within the
//! deadline) and answers requests: all hooks exit 0 → done; a hook exits 3 → refused (its stdout's first
//! line is the reason); another status or a timeout → failed. Reopens the port whenever the host side
//! goes away (VM migrated, vmhad restarted) or the port is not there yet.

mod channel;
mod health;
mod hooks;
mod tick;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use vmha_model::guest::{GuestMessage, PORT_NAME};

use crate::channel::{send, serve, Config};
use crate::health::{health_checks, heartbeats, Beacon, HealthConfig};

#[derive(Parser, Debug)]
#[command(
    name = "vmha-guest",
    version,
    about = "Runs hooks for vmha cluster events and requests inside a VM",
    long_about = "Runs hooks for vmha cluster events and requests inside a VM. Opens the virtio-serial port \
                  org.vmha.guest.0 (which vmha adds to the domains it starts), and for every cluster event or \
                  request from the host runs the executables in <hooks>/<name>/ in name order, with the message \
                  as JSON on stdin and within the deadline. A request is done when all its hooks exit 0, refused \
                  when one exits 3 (the first line of its output is the reason), failed otherwise. Reopens the \
                  port whenever the host side goes away. Sends a heartbeat every second (vmhad resets a VM whose \
                  heartbeats stop while it runs), and runs the application health hooks in /etc/vmha/health.d \
                  at an interval: after 3 failed rounds in a row it reports the application unhealthy, and \
                  vmhad applies the VM's health_app_action. Normally started by systemd (vmha-guest.service)."
)]
struct Args {
    /// The channel's virtio-serial port.
    #[arg(long, default_value_t = format!("/dev/virtio-ports/{PORT_NAME}"))]
    port: String,
    /// Hooks directory: `<dir>/<event or request name>/` holds the executables to run.
    #[arg(long, default_value = "/etc/vmha/hooks.d")]
    hooks: PathBuf,
    /// How long an event's hooks may run (requests bring their own deadline).
    #[arg(long, default_value_t = 10_000)]
    event_timeout_ms: u64,
    /// Milliseconds between two heartbeats (vmhad resets a VM whose heartbeats stop while it runs; see
    /// vmha's health_sensitivity); 0 sends none (the VM is then not monitored).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    heartbeat_interval_ms: u64,
    /// Application health hooks: every executable here runs at each health interval (exit 0: healthy).
    #[arg(long, default_value = "/etc/vmha/health.d")]
    health_dir: PathBuf,
    /// Milliseconds between two rounds of health hooks.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    health_interval_ms: u64,
    /// How long each health hook may run (ms); overrunning counts as a failure.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    health_timeout_ms: u64,
    /// Failed rounds in a row before the application is reported unhealthy.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    health_failures: u32,
    /// Benchmark helper: instead of serving the channel, write a timestamp stream (`vmha-tick <n>` lines,
    /// about one per millisecond) to PATH for --tick-for-ms, then exit (see vmha-bench clone).
    #[arg(long, hide = true, value_name = "PATH")]
    tick_to: Option<PathBuf>,
    /// How long the timestamp stream runs, by the guest's clock (ms).
    #[arg(long, hide = true, default_value_t = 4_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    tick_for_ms: u64,
    /// Write the manual page vmha-guest.8 into DIR and exit (for packaging).
    #[arg(long, hide = true, value_name = "DIR")]
    generate_man: Option<PathBuf>,
}

/// Writes vmha-guest.8, generated from this command line's definition, into `dir`.
fn generate_man(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(Args::command()).section("8").render(&mut page)?;
    std::fs::write(dir.join("vmha-guest.8"), page)
}

/// Pause between two attempts to read the channel while no host side is connected.
const REOPEN_PAUSE: Duration = Duration::from_millis(100);

fn main() {
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        if let Err(e) = generate_man(dir) {
            eprintln!("vmha-guest: writing the manual page into {}: {e}", dir.display());
            std::process::exit(1);
        }
        return;
    }
    if let Some(path) = &args.tick_to {
        match tick::run(path, Duration::from_millis(args.tick_for_ms)) {
            Ok(_) => return,
            Err(e) => {
                eprintln!("vmha-guest: timestamp stream to {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
    let config = Config {
        hooks: args.hooks,
        event_timeout: Duration::from_millis(args.event_timeout_ms),
        requests: Arc::default(),
    };
    // SIGTERM and SIGINT are taken by a thread of their own (blocked here, before any thread starts, so
    // that every thread inherits the mask): vmha-guest says it stops before it exits, so vmhad does not
    // take the end of its heartbeats for a hung guest.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGTERM);
    stop_signals.add(Signal::SIGINT);
    if let Err(e) = stop_signals.thread_block() {
        eprintln!("vmha-guest: blocking SIGTERM: {e}");
    }
    let beacon = Arc::new(Beacon::default());
    {
        let b = Arc::clone(&beacon);
        std::thread::spawn(move || {
            if let Ok(signal) = stop_signals.wait() {
                eprintln!("vmha-guest: {signal:?}: stopping");
                b.say_stopping(Duration::from_secs(1));
                std::process::exit(0);
            }
        });
    }
    if args.heartbeat_interval_ms > 0 {
        let (b, every) = (Arc::clone(&beacon), Duration::from_millis(args.heartbeat_interval_ms));
        std::thread::spawn(move || heartbeats(b, every));
    }
    let health = HealthConfig {
        dir: args.health_dir,
        interval: Duration::from_millis(args.health_interval_ms),
        timeout: Duration::from_millis(args.health_timeout_ms),
        failures: args.health_failures,
    };
    {
        let b = Arc::clone(&beacon);
        std::thread::spawn(move || health_checks(b, health));
    }
    let mut complained = false;
    loop {
        match OpenOptions::new().read(true).write(true).open(&args.port) {
            Ok(port) => {
                complained = false;
                let writer = match port.try_clone() {
                    Ok(w) => Arc::new(Mutex::new(w)),
                    Err(e) => {
                        eprintln!("vmha-guest: {}: {e}", args.port);
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                // The hello is lost while no host side is connected; vmhad does not need it.
                let _ = send(&writer, &GuestMessage::hello(env!("CARGO_PKG_VERSION")));
                beacon.set_writer(Some(Arc::clone(&writer)));
                if let Err(e) = serve(port, writer, &config) {
                    eprintln!("vmha-guest: reading {}: {e}", args.port);
                }
                beacon.set_writer(None);
            }
            Err(e) if !complained => {
                eprintln!("vmha-guest: opening {}: {e} (retrying)", args.port);
                complained = true;
            }
            Err(_) => {}
        }
        // End of file: no host side connected. Reopen after a short pause: when vmhad connects (after a
        // restart, a migration or a clone's restore) the hello should follow at once, since vmhad sends
        // nothing before it (or 2 s).
        std::thread::sleep(REOPEN_PAUSE);
    }
}
