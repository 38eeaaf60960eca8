//! `cpg-inject`: a stand-in for a hostile local process in the lab (any process Corosync admits: root, or
//! a member of a group its `uidgid` setup lists, such as haclient). Joins a CPG group and either records
//! what is multicast there or multicasts raw bytes of its own.
//!
//! ```text
//! cpg-inject listen GROUP SECS     print one JSON line {"nodeid","pid","hex"} per message for SECS seconds
//! cpg-inject send GROUP HEX...     multicast each HEX-encoded payload, in order, then leave
//! ```
//! Both print a first line `{"joined": GROUP, "nodeid": N, "pid": P}` (P: this process's PID). Exit
//! status 0, 1 when Corosync refuses or fails, 64 on a usage error.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use vmha_corosync::{Cpg, CpgEvent};

const DEADLINE: Duration = Duration::from_secs(10);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd-length hex {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("hex {s:?}: {e}")))
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cpg-inject: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match args.as_slice() {
        [cmd, group, secs] if cmd == "listen" => match secs.parse::<u64>() {
            Ok(secs) => runtime.block_on(listen(group, Duration::from_secs(secs))),
            Err(e) => Err(format!("SECS: {e}")),
        },
        [cmd, group, payloads @ ..] if cmd == "send" && !payloads.is_empty() => {
            match payloads.iter().map(|p| unhex(p)).collect::<Result<Vec<_>, _>>() {
                Ok(payloads) => runtime.block_on(send(group, &payloads)),
                Err(e) => {
                    eprintln!("cpg-inject: {e}");
                    return ExitCode::from(64);
                }
            }
        }
        _ => {
            eprintln!("usage: cpg-inject listen GROUP SECS | cpg-inject send GROUP HEX...");
            return ExitCode::from(64);
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    match code {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cpg-inject: {e}");
            ExitCode::FAILURE
        }
    }
}

fn line(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

async fn joined(group: &str) -> Result<(Cpg, vmha_corosync::CpgEvents), String> {
    let (cpg, events) = Cpg::connect(DEADLINE).await.map_err(|e| e.to_string())?;
    cpg.join(group).await.map_err(|e| e.to_string())?;
    let nodeid = cpg.local_nodeid().await.map_err(|e| e.to_string())?;
    line(json!({"joined": group, "nodeid": nodeid, "pid": std::process::id()}));
    Ok((cpg, events))
}

async fn listen(group: &str, secs: Duration) -> Result<(), String> {
    let (_cpg, mut events) = joined(group).await?;
    let until = tokio::time::Instant::now() + secs;
    loop {
        match tokio::time::timeout_at(until, events.next()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(CpgEvent::Message { nodeid, pid, data, .. })) => {
                line(json!({"nodeid": nodeid, "pid": pid, "hex": hex(&data)}));
            }
            Ok(Ok(_)) => {}
        }
    }
}

async fn send(group: &str, payloads: &[Vec<u8>]) -> Result<(), String> {
    let (cpg, _events) = joined(group).await?;
    for p in payloads {
        cpg.mcast(p).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
