//! Shared pieces of the lab scenarios in `tests/`: every scenario brings up its own lab (torn down by PID
//! when the test ends, also on panic) and measures what it proves.
//!
//! The scenarios need root and real daemons, so they are `#[ignore]`d in a plain `cargo test`; `ci/test`
//! runs them with `--ignored`.

use std::time::{Duration, Instant};

use vmha_lab::{Lab, LabConfig};

/// Brings up a fresh 3-host lab for one scenario (lab `e2e`, subnet 10.213.1.0/24).
pub fn lab() -> Lab {
    vmha_lab::init_logging();
    let t0 = Instant::now();
    let lab = Lab::up(LabConfig::new("e2e", 3, "10.213.1")).expect("lab bring-up");
    println!("lab up (3 hosts, quorate, DC elected, fencing on) in {:.1} s", t0.elapsed().as_secs_f64());
    lab
}

/// Poll interval of scenario checks.
pub const POLL: Duration = Duration::from_millis(100);

/// A stopwatch that records named moments of a scenario and prints them.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    marks: Vec<(String, Duration)>,
}

impl Timeline {
    pub fn start() -> Self {
        Timeline { start: Instant::now(), marks: Vec::new() }
    }

    /// Records `what` as happening now (only the first time) and returns the time since the start.
    pub fn mark(&mut self, what: &str) -> Duration {
        if let Some((_, d)) = self.marks.iter().find(|(w, _)| w == what) {
            return *d;
        }
        let d = self.start.elapsed();
        self.marks.push((what.to_string(), d));
        d
    }

    pub fn get(&self, what: &str) -> Option<Duration> {
        self.marks.iter().find(|(w, _)| w == what).map(|(_, d)| *d)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn print(&self, title: &str) {
        println!("{title}");
        for (what, d) in &self.marks {
            println!("  {:>7.2} s  {what}", d.as_secs_f64());
        }
    }
}
