//! `vmha-ocf-virtualmachine`: the executable Pacemaker runs as `ocf:vmha:VirtualMachine`.
//!
//! Startup is kept minimal because a monitor starts the binary every few seconds: no logging
//! setup for monitor unless `HA_debug` asks for debug lines, no XML beyond the `config` file's name (skipped when `domain` is set), a
//! read-only connection. All libvirt work runs on a worker thread; if it misses the deadline,
//! the process reports the pending call and exits (the stuck thread dies with it).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use vmha_resource_agents::agent;
use vmha_resource_agents::deadline::{self, Bounded, Deadline, Progress};
use vmha_resource_agents::logging::LogConfig;
use vmha_resource_agents::metadata;
use vmha_resource_agents::ocf::{self, Action, OcfEnv, OcfStatus};

fn main() -> ExitCode {
    let Some(arg) = std::env::args().nth(1) else {
        eprintln!("{}", ocf::USAGE);
        return exit(OcfStatus::ErrArgs);
    };
    let Some(action) = Action::parse(&arg) else {
        eprintln!("{}", ocf::USAGE);
        eprintln!("{}", ocf::exit_reason_line(&format!("{arg}: action not supported")));
        return exit(OcfStatus::ErrUnimplemented);
    };
    match action {
        Action::MetaData => return print(&metadata::render(env!("CARGO_PKG_VERSION"))),
        Action::Usage => return print(&format!("{}\n", ocf::USAGE)),
        _ => {}
    }
    // Where log lines go: HA_LOGFACILITY, HA_LOGFILE, HA_DEBUGLOG, HA_debug, as ocf-shellfuncs reads them.
    let log = LogConfig::from_lookup(|key| std::env::var(key).ok(), std::io::stderr().is_terminal());
    if action != Action::Monitor || log.debug {
        log.init();
    }

    let env = OcfEnv::from_lookup(|key| std::env::var(key).ok());
    let timeout = env.timeout_for(action);
    tracing::debug!(
        action = action.name(),
        timeout_s = timeout.as_secs_f64(),
        budget_s = deadline::working_budget(timeout).as_secs_f64(),
        "starting"
    );
    let deadline = Deadline::after(deadline::working_budget(timeout));
    let progress = Progress::new();
    let worker_progress = progress.clone();
    let worker_env = env.clone();
    let outcome = deadline::run_bounded(deadline, &progress, move || {
        agent::run(
            action,
            &worker_env,
            &|key| std::env::var(key).ok(),
            deadline,
            &worker_progress,
        )
    });

    let outcome = match outcome {
        Bounded::Done(outcome) => outcome,
        Bounded::Expired { call } => {
            let vm = progress.vm().unwrap_or_else(|| "?".into());
            report(&format!(
                "{}: VM {vm}: no answer from libvirt within {:.1} s of the {:.1} s timeout \
                 (pending call: {call}); is libvirtd hung?",
                action.name(),
                deadline::working_budget(timeout).as_secs_f64(),
                timeout.as_secs_f64()
            ));
            // The worker is stuck in libvirt; it must not delay the answer. Nothing in this
            // process holds state that needs cleaning up, so exit at once.
            std::process::exit(i32::from(OcfStatus::ErrGeneric.code()));
        }
        Bounded::WorkerFailed(why) => agent::Outcome {
            status: OcfStatus::ErrGeneric,
            reason: Some(format!("{}: {why}", action.name())),
        },
    };
    tracing::debug!(action = action.name(), status = ?outcome.status, reason = ?outcome.reason, "done");
    if let Some(reason) = &outcome.reason {
        report(reason);
    }
    exit(outcome.status)
}

fn exit(status: OcfStatus) -> ExitCode {
    ExitCode::from(status.code())
}

fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => exit(OcfStatus::Success),
        Err(_) => exit(OcfStatus::ErrGeneric),
    }
}

fn report(reason: &str) {
    eprintln!("{}", ocf::exit_reason_line(reason));
}
