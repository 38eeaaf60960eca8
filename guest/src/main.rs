//! `vmha-guest`: the guest side of vmha's guest channel. Opens the virtio-serial port
//! `org.vmha.guest.0`, says hello, and for every cluster event or request from the host runs the
//! executables in `<hooks dir>/<name>/` (in name order, the message as JSON on stdin, within the
//! deadline) and answers requests: all hooks exit 0 → done; a hook exits 3 → refused (its stdout's first
//! line is the reason); another status or a timeout → failed. Reopens the port whenever the host side
//! goes away (VM migrated, vmhad restarted) or the port is not there yet.

mod channel;
mod hooks;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use vmha_model::guest::{GuestMessage, PORT_NAME};

use crate::channel::{send, serve, Config};

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
                  port whenever the host side goes away. Normally started by systemd (vmha-guest.service)."
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
    let config = Config {
        hooks: args.hooks,
        event_timeout: Duration::from_millis(args.event_timeout_ms),
    };
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
                if let Err(e) = serve(port, writer, &config) {
                    eprintln!("vmha-guest: reading {}: {e}", args.port);
                }
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
