//! `vmha-guest --tick-to PATH`: a timestamp stream for benchmarks. Writes `vmha-tick <n>\n` (n = 0, 1,
//! 2, ...) to PATH (e.g. the serial console `/dev/ttyS0` or a virtio-serial port) about every
//! millisecond, for a given time by the guest's clock, then exits. The host times each line's arrival at
//! the chardev's host end with its own clock: a gap between two arrivals is time the guest could not run
//! (vCPUs stopped, or starved). The guest's own clock is no use for that: under TCG it stops while the
//! vCPUs are stopped. A write that fails (the port gone), or a port that takes nothing for
//! [`GIVE_UP`] (a virtio-serial port with no host side connected, as in a clone of the VM), ends the
//! stream.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Time between two lines.
pub const INTERVAL: Duration = Duration::from_millis(1);
/// How long the port may take nothing before the stream ends.
pub const GIVE_UP: Duration = Duration::from_millis(200);

/// The line for sequence number `n`.
pub fn line(n: u64) -> String {
    format!("vmha-tick {n}\n")
}

/// Writes the stream to `path` for `duration`; returns how many lines were written.
pub fn run(path: &Path, duration: Duration) -> std::io::Result<u64> {
    let mut out = OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let start = Instant::now();
    let mut n = 0u64;
    let mut last_ok = Instant::now();
    while start.elapsed() < duration {
        match out.write_all(line(n).as_bytes()) {
            Ok(()) => {
                n += 1;
                last_ok = Instant::now();
            }
            // A full buffer (a slow reader): skip this tick, the next one shows the gap.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && last_ok.elapsed() < GIVE_UP => {}
            Err(e) => return Err(e),
        }
        std::thread::sleep(INTERVAL);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_numbered_lines_then_stops() {
        let dir = std::env::temp_dir().join(format!("vmha-tick-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("out");
        std::fs::write(&f, "").unwrap();
        let n = run(&f, Duration::from_millis(30)).unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, n);
        assert!(n >= 1);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(format!("{l}\n"), line(i as u64));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_path_is_an_error() {
        assert!(run(Path::new("/nonexistent-vmha/port"), Duration::from_millis(5)).is_err());
    }
}
