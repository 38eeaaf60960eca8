//! Runs commands repeatedly and records wall time and CPU time (user + system, of the command and
//! every process it waited for), the way `wait4` accounts them.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};
use nix::sys::resource::{getrusage, UsageWho};
use serde::{Deserialize, Serialize};

/// One run of one command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub label: String,
    pub action: String,
    pub wall_ms: f64,
    pub cpu_ms: f64,
    pub rc: i32,
}

fn children_cpu_ms() -> Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    Ok(ms(u.user_time()) + ms(u.system_time()))
}

/// Runs `program action` once with output discarded.
pub fn run_once(label: &str, program: &str, action: &str) -> Result<Sample> {
    let cpu0 = children_cpu_ms()?;
    let t0 = Instant::now();
    let status = Command::new(program)
        .arg(action)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {program} {action}"))?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let cpu_ms = children_cpu_ms()? - cpu0;
    Ok(Sample {
        label: label.into(),
        action: action.into(),
        wall_ms,
        cpu_ms,
        rc: status.code().unwrap_or(-1),
    })
}

/// min, median, max of a list of figures.
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_and_even_lists() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
        assert!(spread(vec![]).1.is_nan());
    }

    #[test]
    fn measures_a_real_command_and_its_exit_code() {
        let s = run_once("sh", "/bin/sh", "-c").unwrap();
        assert_eq!(s.rc, 2, "sh -c without a command fails");
        assert!(s.wall_ms > 0.0);
        let t = run_once("true", "/bin/true", "x").unwrap();
        assert_eq!(t.rc, 0);
    }
}
