//! Where the agent's log lines go, decided from the environment the way `ocf-shellfuncs` (`ha_log`,
//! `ha_debug`) decides for the shell agents of the resource-agents package, so an administrator's settings
//! apply to this agent too:
//!
//! - `HA_LOGFACILITY`: a syslog facility (`daemon`, `local0`...); `none` or empty: no syslog.
//! - `HA_LOGFILE`: a file to append info and higher lines to.
//! - `HA_DEBUGLOG`: a file to append every line to, debug lines included when debugging (unless it is
//!   `HA_LOGFILE`).
//! - `HA_debug`: set and not `0`: debug lines are written too.
//! - stderr (which Pacemaker's executor records): info and higher lines when neither a facility nor
//!   `HA_LOGFILE` is set; debug lines when neither a facility nor `HA_DEBUGLOG` is set. A terminal on
//!   stderr takes everything, and nothing else does (as for a shell agent run by hand).
//! - `HA_LOGTAG`: the syslog tag; default `VirtualMachine(<resource>)`, with the process id.
//!
//! The `ocf-exit-reason:` line always goes to stderr, whatever the settings: it is not a log line.

use std::fs::OpenOptions;
use std::path::PathBuf;

use tracing::{Level, Metadata};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// A place log lines go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stderr,
    /// syslog with this facility (its `logger(1)` name).
    Syslog(String),
    /// A file lines are appended to.
    File(PathBuf),
}

/// One destination and which lines it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sink {
    pub to: Destination,
    /// Info, notice, warning and error lines.
    pub normal: bool,
    /// Debug lines.
    pub debug: bool,
}

/// The agent's logging, as read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub sinks: Vec<Sink>,
    pub debug: bool,
    /// The syslog tag (`HA_LOGTAG`, else `VirtualMachine(<OCF_RESOURCE_INSTANCE>)`).
    pub tag: String,
    /// `HA_LOGFACILITY` named no facility syslog knows (then it is ignored, like `none`).
    pub unknown_facility: Option<String>,
}

/// The syslog facilities `logger(1)` names.
fn facility(name: &str) -> Option<syslog_tracing::Facility> {
    use syslog_tracing::Facility as F;
    Some(match name {
        "auth" | "security" => F::Auth,
        "authpriv" => F::AuthPriv,
        "cron" => F::Cron,
        "daemon" => F::Daemon,
        "ftp" => F::Ftp,
        "lpr" => F::Lpr,
        "mail" => F::Mail,
        "news" => F::News,
        "user" => F::User,
        "uucp" => F::Uucp,
        "local0" => F::Local0,
        "local1" => F::Local1,
        "local2" => F::Local2,
        "local3" => F::Local3,
        "local4" => F::Local4,
        "local5" => F::Local5,
        "local6" => F::Local6,
        "local7" => F::Local7,
        _ => return None,
    })
}

impl LogConfig {
    /// Reads the settings through `lookup` (the environment); `stderr_is_terminal` as `tty` tells.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>, stderr_is_terminal: bool) -> LogConfig {
        let set = |key: &str| lookup(key).filter(|v| !v.is_empty());
        let debug = set("HA_debug").is_some_and(|v| v != "0");
        let tag = set("HA_LOGTAG").unwrap_or_else(|| match set("OCF_RESOURCE_INSTANCE") {
            Some(rsc) => format!("VirtualMachine({rsc})"),
            None => "VirtualMachine".to_string(),
        });
        if stderr_is_terminal {
            return LogConfig {
                sinks: vec![Sink {
                    to: Destination::Stderr,
                    normal: true,
                    debug,
                }],
                debug,
                tag,
                unknown_facility: None,
            };
        }
        let mut unknown_facility = None;
        let facility = set("HA_LOGFACILITY").filter(|f| f != "none").filter(|f| {
            let known = facility(f).is_some();
            if !known {
                unknown_facility = Some(f.clone());
            }
            known
        });
        let logfile = set("HA_LOGFILE").map(PathBuf::from);
        let debuglog = set("HA_DEBUGLOG")
            .map(PathBuf::from)
            .filter(|d| Some(d) != logfile.as_ref());
        let mut sinks = Vec::new();
        if let Some(f) = &facility {
            sinks.push(Sink {
                to: Destination::Syslog(f.clone()),
                normal: true,
                debug,
            });
        }
        if let Some(file) = &logfile {
            sinks.push(Sink {
                to: Destination::File(file.clone()),
                normal: true,
                debug: false,
            });
        }
        if let Some(file) = &debuglog {
            sinks.push(Sink {
                to: Destination::File(file.clone()),
                normal: true,
                debug,
            });
        }
        let stderr = Sink {
            to: Destination::Stderr,
            normal: facility.is_none() && logfile.is_none(),
            debug: debug && facility.is_none() && debuglog.is_none(),
        };
        if stderr.normal || stderr.debug {
            sinks.push(stderr);
        }
        LogConfig {
            sinks,
            debug,
            tag,
            unknown_facility,
        }
    }

    /// Installs the process's log subscriber. Lines of other crates' debug level are left out (libvirt's
    /// and D-Bus's chatter), so `HA_debug` adds the agent's own debug lines only.
    pub fn init(&self) {
        let mut layers: Vec<Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>> = Vec::new();
        let mut problems = Vec::new();
        for sink in &self.sinks {
            let (normal, debug) = (sink.normal, sink.debug);
            let wanted = move |meta: &Metadata<'_>| {
                let level = *meta.level();
                if level <= Level::INFO {
                    normal
                } else {
                    debug && level == Level::DEBUG && meta.target().starts_with("vmha")
                }
            };
            match &sink.to {
                Destination::Stderr => layers.push(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(false)
                        .without_time()
                        .with_target(false)
                        .with_filter(filter_fn(wanted))
                        .boxed(),
                ),
                Destination::Syslog(name) => {
                    let Some(f) = facility(name) else { continue };
                    let ident = std::ffi::CString::new(self.tag.replace('\0', "")).unwrap_or_default();
                    match syslog_tracing::Syslog::new(ident, syslog_tracing::Options::LOG_PID, f) {
                        Some(syslog) => layers.push(
                            tracing_subscriber::fmt::layer()
                                .with_writer(syslog)
                                .with_ansi(false)
                                .without_time()
                                .with_target(false)
                                .with_filter(filter_fn(wanted))
                                .boxed(),
                        ),
                        None => problems.push("syslog is already open".to_string()),
                    }
                }
                Destination::File(path) => match OpenOptions::new().create(true).append(true).open(path) {
                    Ok(file) => layers.push(
                        tracing_subscriber::fmt::layer()
                            .with_writer(std::sync::Mutex::new(file))
                            .with_ansi(false)
                            .with_target(false)
                            .with_filter(filter_fn(wanted))
                            .boxed(),
                    ),
                    Err(e) => problems.push(format!("cannot append to {}: {e}", path.display())),
                },
            }
        }
        let _ = tracing_subscriber::registry().with(layers).try_init();
        for p in problems {
            tracing::warn!("logging: {p}");
        }
        if let Some(f) = &self.unknown_facility {
            tracing::warn!("logging: HA_LOGFACILITY={f} is not a syslog facility; not logging to syslog");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)], tty: bool) -> LogConfig {
        LogConfig::from_lookup(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()), tty)
    }

    fn sink(to: Destination, normal: bool, debug: bool) -> Sink {
        Sink { to, normal, debug }
    }

    #[test]
    fn by_default_lines_go_to_stderr_without_debug() {
        let c = config(&[], false);
        assert_eq!(c.sinks, vec![sink(Destination::Stderr, true, false)]);
        assert!(!c.debug);
        for off in ["0", ""] {
            assert!(!config(&[("HA_debug", off)], false).debug, "HA_debug={off:?}");
        }
        let c = config(&[("HA_debug", "1")], false);
        assert_eq!(c.sinks, vec![sink(Destination::Stderr, true, true)]);
    }

    #[test]
    fn a_facility_takes_the_lines_from_stderr() {
        let c = config(&[("HA_LOGFACILITY", "local3"), ("HA_debug", "1")], false);
        assert_eq!(c.sinks, vec![sink(Destination::Syslog("local3".into()), true, true)]);
        for none in ["none", ""] {
            let c = config(&[("HA_LOGFACILITY", none)], false);
            assert_eq!(c.sinks, vec![sink(Destination::Stderr, true, false)], "{none:?}");
        }
        let c = config(&[("HA_LOGFACILITY", "bogus")], false);
        assert_eq!(c.sinks, vec![sink(Destination::Stderr, true, false)]);
        assert_eq!(c.unknown_facility.as_deref(), Some("bogus"));
    }

    #[test]
    fn log_files_as_ocf_shellfuncs_writes_them() {
        // HA_LOGFILE: normal lines only, and stderr then keeps just the debug lines (no HA_DEBUGLOG).
        let c = config(&[("HA_LOGFILE", "/l"), ("HA_debug", "1")], false);
        assert_eq!(
            c.sinks,
            vec![
                sink(Destination::File("/l".into()), true, false),
                sink(Destination::Stderr, false, true)
            ]
        );
        // HA_DEBUGLOG: every line; stderr keeps the normal ones (no facility, no HA_LOGFILE).
        let c = config(&[("HA_DEBUGLOG", "/d"), ("HA_debug", "yes")], false);
        assert_eq!(
            c.sinks,
            vec![
                sink(Destination::File("/d".into()), true, true),
                sink(Destination::Stderr, true, false)
            ]
        );
        // The same file for both is written once.
        let c = config(&[("HA_LOGFILE", "/l"), ("HA_DEBUGLOG", "/l")], false);
        assert_eq!(c.sinks, vec![sink(Destination::File("/l".into()), true, false)]);
        let c = config(
            &[
                ("HA_LOGFACILITY", "daemon"),
                ("HA_LOGFILE", "/l"),
                ("HA_DEBUGLOG", "/d"),
                ("HA_debug", "1"),
            ],
            false,
        );
        assert_eq!(
            c.sinks,
            vec![
                sink(Destination::Syslog("daemon".into()), true, true),
                sink(Destination::File("/l".into()), true, false),
                sink(Destination::File("/d".into()), true, true),
            ]
        );
    }

    #[test]
    fn a_terminal_takes_everything() {
        let c = config(
            &[("HA_LOGFACILITY", "daemon"), ("HA_LOGFILE", "/l"), ("HA_debug", "1")],
            true,
        );
        assert_eq!(c.sinks, vec![sink(Destination::Stderr, true, true)]);
    }

    #[test]
    fn the_tag_names_the_resource() {
        assert_eq!(
            config(&[("OCF_RESOURCE_INSTANCE", "vm1")], false).tag,
            "VirtualMachine(vm1)"
        );
        assert_eq!(config(&[], false).tag, "VirtualMachine");
        assert_eq!(
            config(&[("HA_LOGTAG", "mine"), ("OCF_RESOURCE_INSTANCE", "vm1")], false).tag,
            "mine"
        );
    }
}
