//! Processes the lab starts, identified by PID plus start time (so a reused PID is never mistaken for
//! ours), and commands run with a deadline.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A process the lab started: its PID and the start time the kernel recorded for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcId {
    /// Identifies a live process by PID.
    pub fn of(pid: i32) -> Result<Self> {
        let start_time = start_time(pid).ok_or_else(|| anyhow!("process {pid} is gone"))?;
        Ok(ProcId { pid, start_time })
    }

    /// True while the very process we started is alive (not a zombie, not a reuse of its PID).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        fs::write(path, format!("{} {}\n", self.pid, self.start_time))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a saved identity; `None` when there is no file.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut it = text.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(pid)), Some(Ok(start_time))) => Ok(Some(ProcId {
                pid: i32::try_from(pid)?,
                start_time,
            })),
            _ => bail!("malformed process identity in {}", path.display()),
        }
    }

    /// Sends a signal if (and only if) this is still our process.
    pub fn signal(&self, sig: Signal) -> Result<bool> {
        if !self.alive() {
            return Ok(false);
        }
        kill(Pid::from_raw(self.pid), sig).with_context(|| format!("kill {sig} {}", self.pid))?;
        Ok(true)
    }

    /// The PID namespace this process lives in (its inode number).
    pub fn pid_namespace(&self) -> Option<u64> {
        pid_namespace(self.pid)
    }
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the fields that follow start after
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|s| s == "Z")
}

/// Inode of the PID namespace of a process.
pub fn pid_namespace(pid: i32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    let s = link.to_string_lossy();
    s.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// Every PID (as seen from here) on this machine.
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// PIDs of the processes living in the PID namespace `ns`.
pub fn pids_in_namespace(ns: u64) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| pid_namespace(p) == Some(ns))
        .collect()
}

/// The command line of a process as its arguments.
pub fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Direct children of a process.
pub fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// The libvirt domain name a QEMU process runs (from `-name guest=NAME,...`), if it is one.
pub fn qemu_guest_name(args: &[String]) -> Option<String> {
    if !args.first().is_some_and(|a| a.contains("qemu-system")) {
        return None;
    }
    let pos = args.iter().position(|a| a == "-name")?;
    let value = args.get(pos + 1)?;
    let first = value.split(',').next()?;
    Some(first.strip_prefix("guest=").unwrap_or(first).to_string())
}

/// Runs a command, killing it if it outlives `limit` (through coreutils `timeout`), and returns its output.
pub fn run_with_deadline(program: &str, args: &[&str], limit: Duration) -> Result<Output> {
    let secs = format!("{:.3}", limit.as_secs_f64());
    let out = Command::new("timeout")
        .args(["-k", "2", &secs, program])
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if out.status.code() == Some(124) || out.status.code() == Some(137) {
        bail!("{program} {} did not finish within {:?}", args.join(" "), limit);
    }
    Ok(out)
}

/// Like [`run_with_deadline`] but fails unless the command exits 0; returns its stdout.
pub fn run_ok(program: &str, args: &[&str], limit: Duration) -> Result<String> {
    let out = run_with_deadline(program, args, limit)?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_this_process_and_rejects_a_reused_pid() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let impostor = ProcId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.alive());
        assert!(me.pid_namespace().is_some());
    }

    #[test]
    fn saves_and_loads_identity() {
        let dir = std::env::temp_dir().join(format!("vmha-lab-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pid");
        assert_eq!(ProcId::load(&path).unwrap(), None);
        let id = ProcId {
            pid: 42,
            start_time: 4242,
        };
        id.save(&path).unwrap();
        assert_eq!(ProcId::load(&path).unwrap(), Some(id));
        fs::write(&path, "garbage").unwrap();
        assert!(ProcId::load(&path).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_guest_name_from_qemu_command_line() {
        let args: Vec<String> = [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=vm1,debug-threads=on",
            "-S",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(qemu_guest_name(&args).as_deref(), Some("vm1"));
        let other: Vec<String> = ["/bin/sleep", "-name", "guest=vm1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(qemu_guest_name(&other), None);
    }

    #[test]
    fn a_command_past_its_deadline_is_an_error() {
        let err = run_with_deadline("sleep", &["5"], Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert_eq!(run_ok("echo", &["hi"], Duration::from_secs(5)).unwrap(), "hi\n");
        assert!(run_ok("false", &[], Duration::from_secs(5)).is_err());
    }
}
