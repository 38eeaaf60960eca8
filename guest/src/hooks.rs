//! Running a message's hooks: every executable in `<hooks dir>/<name>/`, in name order, with the message
//! as JSON on stdin, each within what is left of the deadline.
//!
//! A hook's exit status decides: 0 — go on with the next hook; [`EXIT_REFUSED`] (3) — the request is
//! refused, the first line of the hook's stdout is the reason, later hooks do not run; anything else, or
//! overrunning the deadline (the hook's process group is killed) — the request failed. No hooks at all:
//! done.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use vmha_model::guest::{truncate, Outcome, MAX_TEXT};

/// Exit status with which a hook refuses a request (its stdout's first line is the reason).
pub const EXIT_REFUSED: i32 = 3;

/// How much of a hook's stdout is kept.
const STDOUT_KEPT: usize = 4096;

/// The outcome of a message's hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HooksResult {
    pub outcome: Outcome,
    pub reason: String,
}

impl HooksResult {
    fn new(outcome: Outcome, reason: impl Into<String>) -> Self {
        HooksResult {
            outcome,
            reason: reason.into(),
        }
    }
}

/// The executables in `dir/name/`, sorted by file name; none when the directory does not exist.
pub fn hooks_for(dir: &Path, name: &str) -> Vec<PathBuf> {
    hooks_in(&dir.join(name))
}

/// The executables in `dir`, sorted by file name; none when the directory does not exist.
pub fn hooks_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut hooks: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|e| e.path())
        .collect();
    hooks.sort();
    hooks
}

/// Runs the hooks for `name` with `input` (one JSON line) on stdin, all within `limit`.
pub fn run_hooks(dir: &Path, name: &str, input: &str, limit: Duration) -> HooksResult {
    let deadline = Instant::now() + limit;
    for hook in hooks_for(dir, name) {
        let result = run_hook(&hook, name, input, deadline, limit);
        if result.outcome != Outcome::Done {
            return result;
        }
    }
    HooksResult::new(Outcome::Done, "")
}

/// Runs one hook with `input` on stdin until `deadline` (`limit` is what the deadline was, for the reason).
pub fn run_hook(hook: &Path, name: &str, input: &str, deadline: Instant, limit: Duration) -> HooksResult {
    let shown = hook.display();
    let mut child = match Command::new(hook)
        .env("VMHA_MESSAGE", name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return HooksResult::new(Outcome::Failed, format!("hook {shown} could not start: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let mut line = input.to_string();
        line.push('\n');
        // A hook need not read its input: write from a thread so a full pipe cannot block us.
        std::thread::spawn(move || {
            let _ = stdin.write_all(line.as_bytes());
        });
    }
    let (tx, rx) = mpsc::channel();
    if let Some(mut stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = STDOUT_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            let _ = tx.send(kept);
        });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return HooksResult::new(Outcome::Failed, format!("waiting for hook {shown}: {e}")),
        }
    };
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // The hook's helpers (its process group) go with it, whatever the outcome.
    let _ = killpg(pgid, Signal::SIGKILL);
    let Some(status) = status else {
        let _ = child.wait();
        return HooksResult::new(
            Outcome::Failed,
            format!("hook {shown} timed out (deadline {} ms)", limit.as_millis()),
        );
    };
    match status.code() {
        Some(0) => HooksResult::new(Outcome::Done, ""),
        Some(EXIT_REFUSED) => {
            let out = rx.recv_timeout(Duration::from_millis(500)).unwrap_or_default();
            let out = String::from_utf8_lossy(&out);
            let first = out.lines().next().unwrap_or("").trim();
            let reason = if first.is_empty() {
                format!("refused by hook {shown}")
            } else {
                truncate(first, MAX_TEXT).to_string()
            };
            HooksResult::new(Outcome::Refused, reason)
        }
        Some(code) => HooksResult::new(Outcome::Failed, format!("hook {shown} exited with status {code}")),
        None => HooksResult::new(Outcome::Failed, format!("hook {shown} was killed by a signal")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn hooks_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmha-guest-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub(crate) fn hook(dir: &Path, name: &str, file: &str, script: &str) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(file);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn hooks_run_in_name_order_with_the_message_on_stdin() {
        let dir = hooks_dir("order");
        let log = dir.join("log");
        let log = log.display();
        hook(&dir, "membership", "20-second", &format!("echo second >> {log}"));
        hook(&dir, "membership", "10-first", &format!("cat >> {log}"));
        std::fs::write(dir.join("membership/30-not-executable"), "exit 1").unwrap();
        let r = run_hooks(&dir, "membership", r#"{"v":1}"#, Duration::from_secs(5));
        assert_eq!(r, HooksResult::new(Outcome::Done, ""));
        assert_eq!(std::fs::read_to_string(dir.join("log")).unwrap(), "{\"v\":1}\nsecond\n");
        assert_eq!(
            run_hooks(&dir, "no-such", "{}", Duration::from_secs(1)).outcome,
            Outcome::Done
        );
    }

    /// Scenario table: what a hook does, and the result the request gets.
    #[test]
    fn exit_status_and_deadline_decide_the_result() {
        let dir = hooks_dir("results");
        let cases: &[(&str, &str, Outcome, &str)] = &[
            ("ok", "exit 0", Outcome::Done, ""),
            (
                "refuse",
                "echo 'database busy'; echo more; exit 3",
                Outcome::Refused,
                "database busy",
            ),
            ("refuse-silent", "exit 3", Outcome::Refused, "refused by hook"),
            ("fail", "exit 1", Outcome::Failed, "exited with status 1"),
            ("slow", "sleep 30", Outcome::Failed, "timed out (deadline 300 ms)"),
            ("slow-child", "sleep 30 & wait", Outcome::Failed, "timed out"),
            ("killed", "kill -9 $$", Outcome::Failed, "killed by a signal"),
        ];
        for (name, script, outcome, reason) in cases {
            hook(&dir, name, "hook", script);
            let started = Instant::now();
            let r = run_hooks(&dir, name, "{}", Duration::from_millis(300));
            assert_eq!(r.outcome, *outcome, "{name}: {r:?}");
            assert!(r.reason.contains(reason), "{name}: {r:?}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{name} took {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn a_refusal_stops_later_hooks() {
        let dir = hooks_dir("stop");
        hook(&dir, "drain", "1", "echo no; exit 3");
        hook(&dir, "drain", "2", &format!("touch {}/ran", dir.display()));
        assert_eq!(
            run_hooks(&dir, "drain", "{}", Duration::from_secs(5)).outcome,
            Outcome::Refused
        );
        assert!(!dir.join("ran").exists());
    }
}
