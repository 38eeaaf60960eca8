//! Prints the domain lifecycle events of a libvirt URI, one line each, until the connection is lost.
//!
//! Usage: `lifecycle-events [URI [CLOSE_AFTER_SECS]]` (default `qemu:///system`, no limit). Closes the watch when the
//! connection is lost (after printing why) or after `CLOSE_AFTER_SECS`, prints how long closing took, and exits 0;
//! exits 1 when the watch cannot be opened.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libvirt_ext::events::{watch, WatchItem};

fn stamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

fn main() -> ExitCode {
    virt::error::clear_error_callback();
    let uri = std::env::args().nth(1).unwrap_or_else(|| "qemu:///system".to_owned());
    let close_after = std::env::args()
        .nth(2)
        .and_then(|secs| secs.parse().ok())
        .map_or(Duration::MAX, Duration::from_secs);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut watch = match watch(&uri) {
            Ok(watch) => watch,
            Err(e) => {
                eprintln!("error: watching {uri}: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("{} watching {uri}", stamp());
        let limit = tokio::time::sleep(close_after);
        tokio::pin!(limit);
        loop {
            let item = tokio::select! {
                item = watch.next() => item,
                () = &mut limit => {
                    println!("{} closing after {close_after:?}", stamp());
                    break;
                }
            };
            match item {
                None => break,
                Some(WatchItem::Event(ev)) => println!(
                    "{} event domain={} uuid={} lifecycle={:?} event={} detail={}",
                    stamp(),
                    ev.domain,
                    ev.uuid,
                    ev.lifecycle,
                    ev.event,
                    ev.detail
                ),
                Some(WatchItem::ConnectionLost(reason)) => {
                    println!("{} connection-lost reason={reason:?} ({reason})", stamp());
                    break;
                }
            }
        }
        let closing = Instant::now();
        let closed = watch.close();
        println!("{} closed in {:?}: {closed:?}", stamp(), closing.elapsed());
        ExitCode::SUCCESS
    })
}
