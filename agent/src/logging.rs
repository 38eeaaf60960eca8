//! Where vmhad logs, and with which fields.
//!
//! - **journal** (native protocol, `tracing-journald`): every entry has `SYSLOG_IDENTIFIER=vmhad`,
//!   `PRIORITY`, `VMHA_HOST` (this host's cluster name) and the fields of the event and of its spans, named
//!   in capitals without a prefix: `VMHA_VM` (the VM the message is about), `VMHA_JOB` and `VMHA_JOB_KIND`
//!   (a job's number and kind), `EXIT_REASON`... So `journalctl VMHA_VM=vm1` shows what vmhad said about
//!   vm1.
//! - **syslog** (`syslog(3)`, facility daemon, `vmhad[PID]`): the fallback when the journal's socket does
//!   not answer; the fields are written into the line as `name=value`.
//! - **stderr**: one line per event with the fields as `name=value`; what vmhad does in the foreground,
//!   under a test, or wherever its stderr is collected (a terminal, a file, a pipe: the lab's log files).
//!
//! `--log auto` (the default) logs to the journal when systemd connected stderr to the journal
//! (`JOURNAL_STREAM` names stderr) or when stderr goes nowhere useful (`/dev/null`, closed, a socket), and
//! to stderr when it is a terminal, a file or a pipe.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::EnvFilter;

/// vmhad's `--log` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal when systemd runs vmhad or stderr goes nowhere, else stderr.
    #[default]
    Auto,
    /// The journal (native protocol), falling back to syslog when its socket does not answer.
    Journal,
    /// syslog (facility daemon).
    Syslog,
    /// Standard error.
    Stderr,
}

/// Where vmhad's standard error goes, for `--log auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StderrKind {
    /// A journal stream systemd set up (`JOURNAL_STREAM` is stderr's `device:inode`).
    Journal,
    /// A terminal, a regular file or a pipe: someone reads it.
    Collected,
    /// `/dev/null`, another character device, a socket that is not the journal's, or closed.
    Lost,
}

/// What `stat` says about stderr (`None`: it is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StderrStat {
    pub dev: u64,
    pub ino: u64,
    pub terminal: bool,
    /// A regular file or a FIFO.
    pub file_or_pipe: bool,
}

/// Classifies stderr from `stat` and `JOURNAL_STREAM` (`device:inode` in decimal, set by systemd).
pub fn classify_stderr(stat: Option<StderrStat>, journal_stream: Option<&str>) -> StderrKind {
    let Some(stat) = stat else {
        return StderrKind::Lost;
    };
    let journal = journal_stream
        .and_then(|s| s.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        .is_some_and(|(d, i)| d == stat.dev && i == stat.ino);
    if journal {
        StderrKind::Journal
    } else if stat.terminal || stat.file_or_pipe {
        StderrKind::Collected
    } else {
        StderrKind::Lost
    }
}

/// This process's stderr, classified.
pub fn stderr_kind() -> StderrKind {
    let stderr = std::io::stderr();
    let stat = rustix::fs::fstat(&stderr).ok().map(|st| {
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        StderrStat {
            dev: st.st_dev,
            ino: st.st_ino,
            terminal: stderr.is_terminal(),
            file_or_pipe: matches!(kind, rustix::fs::FileType::RegularFile | rustix::fs::FileType::Fifo),
        }
    });
    classify_stderr(stat, std::env::var("JOURNAL_STREAM").ok().as_deref())
}

/// What `--log auto` means for a stderr of this kind: [`LogTarget::Journal`] or [`LogTarget::Stderr`].
pub fn resolve(target: LogTarget, stderr: StderrKind) -> LogTarget {
    match (target, stderr) {
        (LogTarget::Auto, StderrKind::Collected) => LogTarget::Stderr,
        (LogTarget::Auto, StderrKind::Journal | StderrKind::Lost) => LogTarget::Journal,
        (t, _) => t,
    }
}

/// Where the log went in the end, and why not where it was asked to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub target: LogTarget,
    /// Why the asked target was not usable (it was then the next in journal, syslog, stderr).
    pub fallback: Option<String>,
}

/// The filter of `RUST_LOG`, `info` by default.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A subscriber that logs to `target` (resolved: not [`LogTarget::Auto`]), `host` being this host's
/// cluster name (the journal's `VMHA_HOST`). Journal falls back to syslog, syslog to stderr.
pub fn subscriber(target: LogTarget, host: &str, filter: EnvFilter) -> (Box<dyn Subscriber + Send + Sync>, Chosen) {
    let registry = tracing_subscriber::registry().with(filter);
    let mut fallback = None;
    if matches!(target, LogTarget::Journal | LogTarget::Auto) {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("vmhad".to_string())
                    .with_custom_fields([("VMHA_HOST", host.as_bytes())]);
                return (
                    Box::new(registry.with(layer)),
                    Chosen {
                        target: LogTarget::Journal,
                        fallback,
                    },
                );
            }
            Err(e) => fallback = Some(format!("the journal's socket does not answer: {e}")),
        }
    }
    if matches!(target, LogTarget::Journal | LogTarget::Auto | LogTarget::Syslog) {
        let (options, facility) = (syslog_tracing::Options::LOG_PID, syslog_tracing::Facility::Daemon);
        match syslog_tracing::Syslog::new(c"vmhad", options, facility) {
            Some(syslog) => {
                let layer = tracing_subscriber::fmt::layer()
                    .with_writer(syslog)
                    .with_ansi(false)
                    .without_time()
                    .with_level(false);
                return (
                    Box::new(registry.with(layer)),
                    Chosen {
                        target: LogTarget::Syslog,
                        fallback,
                    },
                );
            }
            None => {
                fallback =
                    Some(fallback.map_or_else(String::new, |f| f + "; ") + "syslog is already open in this process")
            }
        }
    }
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    (
        Box::new(registry.with(layer)),
        Chosen {
            target: LogTarget::Stderr,
            fallback,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(dev: u64, ino: u64, terminal: bool, file_or_pipe: bool) -> Option<StderrStat> {
        Some(StderrStat {
            dev,
            ino,
            terminal,
            file_or_pipe,
        })
    }

    #[test]
    fn stderr_is_the_journal_only_when_journal_stream_names_it() {
        // systemd's stream socket: not a file, not a terminal.
        assert_eq!(
            classify_stderr(stat(8, 4242, false, false), Some("8:4242")),
            StderrKind::Journal
        );
        // JOURNAL_STREAM inherited by a child whose stderr was redirected elsewhere.
        assert_eq!(
            classify_stderr(stat(8, 99, false, true), Some("8:4242")),
            StderrKind::Collected
        );
        assert_eq!(
            classify_stderr(stat(8, 99, false, false), Some("8:4242")),
            StderrKind::Lost
        );
        assert_eq!(
            classify_stderr(stat(8, 4242, false, false), Some("garbage")),
            StderrKind::Lost
        );
        assert_eq!(classify_stderr(stat(1, 2, true, false), None), StderrKind::Collected);
        assert_eq!(classify_stderr(stat(1, 2, false, true), None), StderrKind::Collected);
        assert_eq!(classify_stderr(None, Some("8:4242")), StderrKind::Lost);
    }

    #[test]
    fn auto_logs_to_stderr_where_someone_reads_it_and_to_the_journal_otherwise() {
        assert_eq!(resolve(LogTarget::Auto, StderrKind::Collected), LogTarget::Stderr);
        assert_eq!(resolve(LogTarget::Auto, StderrKind::Journal), LogTarget::Journal);
        assert_eq!(resolve(LogTarget::Auto, StderrKind::Lost), LogTarget::Journal);
        for t in [LogTarget::Journal, LogTarget::Syslog, LogTarget::Stderr] {
            for s in [StderrKind::Collected, StderrKind::Journal, StderrKind::Lost] {
                assert_eq!(resolve(t, s), t, "an explicit --log {t:?} is obeyed");
            }
        }
    }
}
