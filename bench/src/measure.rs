//! Runs agent commands and records, for each call: wall time by this process's own monotonic clock around
//! the agent process (independent of the agent), CPU time (user + system of the command and every
//! process it waited for, the way `wait4` accounts them) and the CPU time libvirtd spent meanwhile
//! (utime + stime of its /proc/<pid>/stat before and after the call).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};
use nix::sys::resource::{getrusage, UsageWho};
use serde::{Deserialize, Serialize};

/// One side of a comparison: an agent program with its own extra environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Side {
    pub label: String,
    pub program: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl Side {
    pub fn new(label: &str, program: &str, env: &[(&str, &str)]) -> Self {
        Side {
            label: label.into(),
            program: program.into(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }
}

/// One run of one command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub label: String,
    pub action: String,
    pub wall_ms: f64,
    pub cpu_ms: f64,
    /// libvirtd's CPU time during the call (None when no libvirtd runs here).
    pub libvirtd_ms: Option<f64>,
    pub rc: i32,
}

fn children_cpu_ms() -> Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    Ok(ms(u.user_time()) + ms(u.system_time()))
}

/// The PID of the libvirtd this process sees in /proc (inside a lab host: that host's).
pub fn libvirtd_pid() -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "libvirtd").then_some(pid)
    })
}

/// utime + stime of process `pid` in ms.
pub fn process_cpu_ms(pid: i32) -> Option<f64> {
    cpu_ms_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime in ms of a /proc/<pid>/stat line.
pub fn cpu_ms_of_stat(stat: &str) -> Option<f64> {
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks * 1000.0 / hz as f64)
}

/// Runs `side.program action` once with output discarded.
pub fn run_once(side: &Side, action: &str, libvirtd: Option<i32>) -> Result<Sample> {
    let lv0 = libvirtd.and_then(process_cpu_ms);
    let cpu0 = children_cpu_ms()?;
    let t0 = Instant::now();
    let status = Command::new(&side.program)
        .arg(action)
        .envs(&side.env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {} {action}", side.program))?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let cpu_ms = children_cpu_ms()? - cpu0;
    let lv1 = libvirtd.and_then(process_cpu_ms);
    Ok(Sample {
        label: side.label.clone(),
        action: action.into(),
        wall_ms,
        cpu_ms,
        libvirtd_ms: lv0.zip(lv1).map(|(a, b)| b - a),
        rc: status.code().unwrap_or(-1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_command_and_its_exit_code() {
        let sh = Side::new("sh", "/bin/sh", &[]);
        let s = run_once(&sh, "-c", None).unwrap();
        assert_eq!(s.rc, 2, "sh -c without a command fails");
        assert!(s.wall_ms > 0.0);
        assert!(s.libvirtd_ms.is_none());
        let t = run_once(&Side::new("true", "/bin/true", &[("X", "1")]), "x", None).unwrap();
        assert_eq!(t.rc, 0);
    }

    #[test]
    fn reads_a_process_cpu_time() {
        let me = std::process::id() as i32;
        assert!(process_cpu_ms(me).is_some_and(|ms| ms >= 0.0));
        assert!(process_cpu_ms(-5).is_none());
    }
}
