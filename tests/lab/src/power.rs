//! The lab's power controller (a PDU for namespace hosts) and the fence agent `fence_vmha_lab` that
//! Pacemaker's fencer runs inside a host to reach it.
//!
//! The controller runs in the root namespace and listens on a Unix socket in the lab directory (a path
//! socket, so hosts reach it from their own network namespaces). One request per connection:
//! `status|off|on|reboot HOST` or `ping`; the reply is one line: `on`, `off`, `ok`, `pong` or
//! `error: ...`. Every power action is appended to `power.log` as a JSON line with its time.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::LabConfig;
use crate::lab::Lab;

/// One power action the controller carried out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PowerEvent {
    /// Seconds since the Unix epoch when the action completed.
    pub time: f64,
    pub action: String,
    pub host: String,
    pub result: String,
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Reads the controller's log of power actions.
pub fn events(cfg: &LabConfig) -> Vec<PowerEvent> {
    std::fs::read_to_string(cfg.power_log())
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// Runs the power controller until killed.
pub fn serve(cfg: LabConfig) -> Result<()> {
    let path = cfg.power_socket();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    tracing::info!(socket = %path.display(), "power controller listening");
    // Power actions are serialised: a fence reboot must not race a power-on of the same host.
    let lock = Arc::new(Mutex::new(()));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let cfg = cfg.clone();
        let lock = Arc::clone(&lock);
        std::thread::spawn(move || {
            if let Err(e) = handle(&cfg, &lock, stream) {
                tracing::warn!("power request failed: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(cfg: &LabConfig, lock: &Mutex<()>, stream: UnixStream) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let action = words.next().unwrap_or_default().to_string();
    let host = words.next().unwrap_or_default().to_string();
    let reply = match answer(cfg, lock, &action, &host) {
        Ok(r) => r,
        Err(e) => format!("error: {e:#}"),
    };
    if matches!(action.as_str(), "off" | "on" | "reboot") {
        let ev = PowerEvent {
            time: now(),
            action: action.clone(),
            host: host.clone(),
            result: reply.clone(),
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cfg.power_log())?;
        writeln!(f, "{}", serde_json::to_string(&ev)?)?;
    }
    tracing::info!(%action, %host, %reply, "power request");
    (&stream).write_all(format!("{reply}\n").as_bytes())?;
    Ok(())
}

fn answer(cfg: &LabConfig, lock: &Mutex<()>, action: &str, host: &str) -> Result<String> {
    if action == "ping" {
        return Ok("pong".into());
    }
    let n = cfg.host_number(host).ok_or_else(|| anyhow!("unknown host {host:?}"))?;
    let lab = Lab::attach(cfg.clone())?;
    if action == "status" {
        return Ok(if lab.host_alive(n) { "on" } else { "off" }.into());
    }
    let _guard = lock.lock().map_err(|_| anyhow!("power lock poisoned"))?;
    match action {
        "off" => lab.power_off(n)?,
        "on" => lab.power_on(n)?,
        "reboot" => {
            lab.power_off(n)?;
            lab.power_on(n)?;
        }
        other => bail!("unknown action {other:?}"),
    }
    Ok("ok".into())
}

/// Sends one request to the controller and returns its reply line.
pub fn request(cfg: &LabConfig, line: &str, limit: Duration) -> Result<String> {
    let mut stream = UnixStream::connect(cfg.power_socket()).with_context(|| {
        format!(
            "connecting to the lab power controller at {}",
            cfg.power_socket().display()
        )
    })?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("no answer from the power controller")?;
    let reply = reply.trim().to_string();
    if let Some(e) = reply.strip_prefix("error: ") {
        bail!("power controller: {e}");
    }
    Ok(reply)
}

/// Arguments of one fence agent call, from stdin (`key=value` lines, as the fencer passes them) and
/// the command line (`-o ACTION`, `--action=ACTION`, `-n PLUG`, `--plug=PLUG`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FenceArgs {
    pub action: String,
    pub plug: Option<String>,
}

impl FenceArgs {
    pub fn parse(stdin: &str, argv: &[String]) -> Self {
        let mut a = FenceArgs::default();
        for line in stdin.lines() {
            let Some((k, v)) = line.trim().split_once('=') else {
                continue;
            };
            match k {
                "action" | "option" => a.action = v.to_string(),
                "port" | "plug" | "nodename" if a.plug.is_none() => a.plug = Some(v.to_string()),
                _ => {}
            }
        }
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            if let Some(v) = arg.strip_prefix("--action=") {
                a.action = v.to_string();
            } else if let Some(v) = arg.strip_prefix("--plug=").or_else(|| arg.strip_prefix("--port=")) {
                a.plug = Some(v.to_string());
            } else if arg == "-o" {
                a.action = it.next().cloned().unwrap_or_default();
            } else if arg == "-n" {
                a.plug = it.next().cloned();
            }
        }
        if a.action.is_empty() {
            a.action = "reboot".into();
        }
        a
    }
}

const FENCE_METADATA: &str = r#"<?xml version="1.0" ?>
<resource-agent name="fence_vmha_lab" shortdesc="Fence agent for vmha lab hosts (namespaces on one machine)">
<longdesc>Powers a vmha lab host off and on through the lab's power controller, which kills or starts the host's namespaces. For the lab only: production hosts use BMC, PDU or sbd fencing.</longdesc>
<vendor-url>https://example.invalid/vmha</vendor-url>
<parameters>
  <parameter name="action" unique="0" required="1">
    <getopt mixed="-o, --action=[action]"/>
    <content type="string" default="reboot"/>
    <shortdesc lang="en">Fencing action</shortdesc>
  </parameter>
  <parameter name="plug" unique="0" required="0" obsoletes="port">
    <getopt mixed="-n, --plug=[id]"/>
    <content type="string"/>
    <shortdesc lang="en">Lab host to act on</shortdesc>
  </parameter>
  <parameter name="port" unique="0" required="0" deprecated="1">
    <getopt mixed="-n, --plug=[id]"/>
    <content type="string"/>
    <shortdesc lang="en">Lab host to act on</shortdesc>
  </parameter>
</parameters>
<actions>
  <action name="on" automatic="0"/>
  <action name="off"/>
  <action name="reboot"/>
  <action name="status"/>
  <action name="list"/>
  <action name="monitor"/>
  <action name="metadata"/>
  <action name="validate-all"/>
</actions>
</resource-agent>
"#;

/// Runs one fence agent call; returns its exit code (0 success, 1 failure, 2 "off" for status).
pub fn fence_agent(cfg: &LabConfig, argv: &[String]) -> i32 {
    let stdin = read_stdin(Duration::from_secs(2));
    let args = FenceArgs::parse(&stdin, argv);
    match fence_action(cfg, &args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fence_vmha_lab {}: {e:#}", args.action);
            1
        }
    }
}

fn fence_action(cfg: &LabConfig, args: &FenceArgs) -> Result<i32> {
    let limit = Duration::from_secs(50);
    let plug = || args.plug.clone().ok_or_else(|| anyhow!("no plug (host) given"));
    match args.action.as_str() {
        "metadata" => {
            print!("{FENCE_METADATA}");
            Ok(0)
        }
        "monitor" | "validate-all" => Ok(if request(cfg, "ping", limit)? == "pong" { 0 } else { 1 }),
        "list" | "list-status" => {
            for n in cfg.host_numbers() {
                println!("{},", cfg.host_name(n));
            }
            Ok(0)
        }
        "status" => match request(cfg, &format!("status {}", plug()?), limit)?.as_str() {
            "on" => Ok(0),
            "off" => Ok(2),
            other => bail!("unexpected status {other:?}"),
        },
        action @ ("off" | "on" | "reboot") => {
            let host = plug()?;
            request(cfg, &format!("{action} {host}"), limit)?;
            // Verify the resulting state before reporting success.
            let want = if action == "off" { "off" } else { "on" };
            let got = request(cfg, &format!("status {host}"), limit)?;
            if got != want {
                bail!("{host} is {got} after {action}");
            }
            Ok(0)
        }
        other => bail!("unsupported action {other:?}"),
    }
}

/// Reads the fencer's `key=value` lines; gives up after `limit` (a terminal or an open pipe is not an error).
fn read_stdin(limit: Duration) -> String {
    if std::io::stdin().is_terminal() {
        return String::new();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::stdin().read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx.recv_timeout(limit).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_fencer_stdin() {
        let a = FenceArgs::parse("action=off\nport=node2\nnodename=node2\nunknown=1\n", &[]);
        assert_eq!(
            a,
            FenceArgs {
                action: "off".into(),
                plug: Some("node2".into())
            }
        );
    }

    #[test]
    fn parses_command_line_and_defaults_to_reboot() {
        assert_eq!(FenceArgs::parse("", &argv(&["-o", "metadata"])).action, "metadata");
        let a = FenceArgs::parse("", &argv(&["--action=status", "--plug=node3"]));
        assert_eq!(
            a,
            FenceArgs {
                action: "status".into(),
                plug: Some("node3".into())
            }
        );
        assert_eq!(FenceArgs::parse("", &[]).action, "reboot");
    }

    #[test]
    fn metadata_is_well_formed_and_advertises_off() {
        let doc = roxmltree::Document::parse(FENCE_METADATA).unwrap();
        let actions: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("action"))
            .filter_map(|n| n.attribute("name"))
            .collect();
        for a in ["off", "on", "reboot", "status", "monitor", "metadata"] {
            assert!(actions.contains(&a), "{a} missing");
        }
    }
}
