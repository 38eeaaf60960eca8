//! Drives vmha-pacemaker from the command line, one JSON line per result or event:
//!
//! ```text
//! pcmk-watch dc                          # who the DC is, as the DC's controller answers
//! pcmk-watch watch [--seconds N]         # the DC, then one line per CIB change (epoch, num_updates) and DC
//!                                        # change; reconnects when a connection is lost
//! pcmk-watch query [--section S | --xpath X]
//! pcmk-watch modify --section S --xml XML [--create]
//! pcmk-watch fail --host H --rsc ID --standard ocf [--provider P] --type T
//! pcmk-watch refresh --host H --rsc ID --standard ocf [--provider P] --type T
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use vmha_pacemaker::{Access, CallOptions, Cib, CibChanges, Controller, Resource, Scope};

#[derive(Parser)]
#[command(about = "Follows and drives Pacemaker through vmha's bindings (JSON lines out)")]
struct Cli {
    /// Deadline of each call, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    limit_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the DC.
    Dc,
    /// Print the DC, then follow CIB changes and DC changes.
    Watch {
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Print the XML of a section, an XPath selection or the whole CIB.
    Query {
        #[arg(long, conflicts_with = "xpath")]
        section: Option<String>,
        #[arg(long)]
        xpath: Option<String>,
    },
    /// Merge XML into a section in one CIB operation.
    Modify {
        #[arg(long)]
        section: String,
        #[arg(long)]
        xml: String,
        /// Create what is missing.
        #[arg(long)]
        create: bool,
    },
    /// Report a resource failure to the controller (recovery starts at once).
    Fail(ResourceArgs),
    /// Clear a resource's operation history on a host (Pacemaker probes it again).
    Refresh(ResourceArgs),
}

#[derive(Args)]
struct ResourceArgs {
    #[arg(long)]
    host: String,
    #[arg(long)]
    rsc: String,
    #[arg(long, default_value = "ocf")]
    standard: String,
    #[arg(long)]
    provider: Option<String>,
    #[arg(long = "type")]
    agent: String,
}

impl ResourceArgs {
    fn resource(&self) -> Resource {
        Resource {
            id: self.rsc.clone(),
            standard: self.standard.clone(),
            provider: self.provider.clone(),
            agent: self.agent.clone(),
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("warn")
        .init();
    let cli = Cli::parse();
    let limit = Duration::from_millis(cli.limit_ms);
    match cli.command {
        Command::Dc => {
            let controller = Controller::connect(limit).await?;
            let state = controller.ping(limit).await?;
            emit(json!({"event": "dc", "dc": state.dc, "fsa_state": state.fsa_state, "result": state.result}));
        }
        Command::Watch { seconds } => watch(limit, seconds.map(Duration::from_secs)).await?,
        Command::Query { section, xpath } => {
            let scope = match (section, xpath) {
                (Some(s), _) => Scope::Section(s),
                (None, Some(x)) => Scope::XPath(x),
                (None, None) => Scope::All,
            };
            let cib = Cib::connect("pcmk-watch", Access::ReadOnly, limit).await?;
            println!("{}", cib.query(&scope, CallOptions::NONE, limit).await?);
        }
        Command::Modify { section, xml, create } => {
            let cib = Cib::connect("pcmk-watch", Access::ReadWrite, limit).await?;
            let options = if create {
                CallOptions::CAN_CREATE
            } else {
                CallOptions::NONE
            };
            cib.modify(&Scope::Section(section.clone()), &xml, options, limit)
                .await?;
            emit(json!({"event": "modified", "section": section, "t": now()}));
        }
        Command::Fail(args) => {
            let controller = Controller::connect(limit).await?;
            let t = now();
            controller.fail_resource(&args.host, &args.resource(), limit).await?;
            emit(json!({"event": "failed", "host": args.host, "rsc": args.rsc, "t": t, "acknowledged": now()}));
        }
        Command::Refresh(args) => {
            let controller = Controller::connect(limit).await?;
            controller.refresh_resource(&args.host, &args.resource(), limit).await?;
            emit(json!({"event": "refreshed", "host": args.host, "rsc": args.rsc, "t": now()}));
        }
    }
    Ok(())
}

/// Prints the DC and follows the CIB: a line per change, and a line whenever the DC changes (polled every
/// second). Follows the bindings' reconnect contract: when a connection is lost it prints an error line,
/// connects again (retrying every second) and prints a new "watching" line with the CIB's version.
async fn watch(limit: Duration, seconds: Option<Duration>) -> Result<()> {
    let stop = tokio::time::sleep(seconds.unwrap_or(Duration::from_secs(u64::from(u32::MAX))));
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut controller: Option<Controller> = None;
    let mut dc: Option<String> = None;
    loop {
        let (cib, mut changes, version) = match follow_cib(limit).await {
            Ok(following) => following,
            Err(e) => {
                emit(json!({"event": "error", "error": e.to_string(), "t": now()}));
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if controller.is_none() {
            controller = Controller::connect(limit).await.ok();
        }
        if let Some(c) = &controller {
            dc = c.designated_controller(limit).await.unwrap_or(None);
        }
        emit(json!({"event": "watching", "dc": dc, "t": now(), "epoch": version.0, "num_updates": version.1}));
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                change = changes.next() => match change {
                    Some(Ok(c)) => {
                        emit(json!({
                            "event": "change", "t": now(),
                            "admin_epoch": c.version.map(|v| v.admin_epoch),
                            "epoch": c.version.map(|v| v.epoch),
                            "num_updates": c.version.map(|v| v.num_updates),
                            "operation": c.operation, "rc": c.rc, "paths": c.paths, "missed": c.missed,
                        }));
                        emit(copy_check(&cib, limit).await);
                    }
                    Some(Err(e)) => {
                        emit(json!({"event": "error", "error": e.to_string(), "t": now()}));
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if controller.is_none() {
                        controller = Controller::connect(limit).await.ok();
                    }
                    let Some(c) = &controller else { continue };
                    match c.designated_controller(limit).await {
                        Ok(Some(now_dc)) if dc.as_ref() != Some(&now_dc) => {
                            emit(json!({"event": "dc", "dc": now_dc, "previous": dc, "t": now()}));
                            dc = Some(now_dc);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            emit(json!({"event": "error", "error": e.to_string(), "t": now()}));
                            controller = None;
                        }
                    }
                }
            }
        }
    }
}

/// Compares the bindings' local copy of the CIB (kept current by the notifications' diffs) with a whole
/// query: "same", "differs" (a bug), or "raced" (the two were read at different versions: a newer change
/// was still on its way).
async fn copy_check(cib: &Cib, limit: Duration) -> serde_json::Value {
    let result = async {
        let copy = cib.query_all_followed(limit).await?;
        let whole = cib.query_all(limit).await?;
        let (a, b) = (roxmltree::Document::parse(&copy)?, roxmltree::Document::parse(&whole)?);
        let version = |d: &roxmltree::Document| {
            ["admin_epoch", "epoch", "num_updates"].map(|n| d.root_element().attribute(n).unwrap_or("").to_string())
        };
        let (result, difference) = if version(&a) != version(&b) {
            ("raced", None)
        } else if canonical(a.root_element()) == canonical(b.root_element()) {
            ("same", None)
        } else {
            (
                "differs",
                Some(first_difference(a.root_element(), b.root_element(), "")),
            )
        };
        let (applied, reads) = cib.local_copy_stats(limit).await?;
        anyhow::Ok(
            json!({"event": "copy", "result": result, "applied": applied, "reads": reads,
            "version": version(&b).join("."), "difference": difference, "t": now()}),
        )
    }
    .await;
    result.unwrap_or_else(|e| json!({"event": "error", "error": format!("copy check: {e}"), "t": now()}))
}

/// Where two trees first differ: the path and both sides' element (attributes and child tags).
fn first_difference(a: roxmltree::Node, b: roxmltree::Node, path: &str) -> String {
    let path = format!(
        "{path}/{}[@id={:?}]",
        a.tag_name().name(),
        a.attribute("id").unwrap_or("")
    );
    let (ka, kb): (Vec<_>, Vec<_>) = (
        a.children().filter(|n| n.is_element()).collect(),
        b.children().filter(|n| n.is_element()).collect(),
    );
    let shallow = |n: roxmltree::Node| {
        let attrs = attributes(n);
        let kids: Vec<String> = n
            .children()
            .filter(|c| c.is_element())
            .map(|c| format!("{}#{}", c.tag_name().name(), c.attribute("id").unwrap_or("")))
            .collect();
        format!("{} [{}]", attrs.join(" "), kids.join(" "))
    };
    if shallow(a) == shallow(b) {
        for (x, y) in ka.iter().zip(&kb) {
            if canonical(*x) != canonical(*y) {
                return first_difference(*x, *y, &path);
            }
        }
    }
    format!("{path}: copy {} / whole {}", shallow(a), shallow(b))
}

/// The root's bookkeeping attributes: the CIB manager sets them without a diff (when it writes the file,
/// and on requests that change nothing), so a copy kept from diffs may show older values.
const BOOKKEEPING: [&str; 4] = ["cib-last-written", "update-origin", "update-client", "update-user"];

/// An element's attributes as `name="value"`, sorted; the root's bookkeeping attributes left out.
fn attributes(node: roxmltree::Node) -> Vec<String> {
    let root = node.parent().is_some_and(|p| p.is_root());
    let mut attrs: Vec<String> = node
        .attributes()
        .filter(|a| !(root && BOOKKEEPING.contains(&a.name())))
        .map(|a| format!("{}={:?}", a.name(), a.value()))
        .collect();
    attrs.sort();
    attrs
}

/// An element as text with its attributes sorted and whitespace between elements dropped.
fn canonical(node: roxmltree::Node) -> String {
    let attrs = attributes(node);
    let mut out = format!("<{} {}>", node.tag_name().name(), attrs.join(" "));
    for child in node.children() {
        if child.is_element() {
            out.push_str(&canonical(child));
        } else if let Some(text) = child.text().map(str::trim).filter(|t| !t.is_empty()) {
            out.push_str(text);
        }
    }
    out.push_str("</>");
    out
}

/// Connects to the CIB, subscribes to its changes, then reads its version (epoch, num_updates): changes
/// after that read are all notified. The local copy is read whole here, so later diffs apply to it.
async fn follow_cib(limit: Duration) -> Result<(Cib, CibChanges, (u64, u64))> {
    let cib = Cib::connect("pcmk-watch", Access::ReadOnly, limit).await?;
    let changes = cib.subscribe(limit).await?;
    let all = cib.query_all_followed(limit).await?;
    let doc = roxmltree::Document::parse(&all)?;
    let attr = |name| {
        doc.root_element()
            .attribute(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let version = (attr("epoch"), attr("num_updates"));
    Ok((cib, changes, version))
}
