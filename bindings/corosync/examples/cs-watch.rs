//! `cs-watch`: follows the local Corosync through vmha-corosync and prints one JSON object per line —
//! the cluster as cmap/cfg/votequorum describe it at start, then every quorum, votequorum, totem ring,
//! CPG membership and CPG message event, each stamped with the wall-clock time `t` (seconds).
//!
//! ```text
//! cs-watch [--group NAME] [--send N] [--send-when-members K] [--for SECS] [--until-messages M]
//!          [--deadline-ms MS] [--track PREFIX]...
//! ```
//! Joins CPG group NAME (default `vmha-cs-watch`); once the group has K members (default 1) it multicasts
//! N messages `<nodeid>:<i>`. Each `--track` prints the changes of the cmap keys under PREFIX. Exits 0 after SECS seconds (default 60), after M delivered messages, or on
//! SIGINT/SIGTERM; exits 2 when an event stream ends (Corosync died or hung: the reconnect contract's
//! signal), printing an `error` line first.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use vmha_corosync::{
    Cfg, Cmap, CmapEvent, CmapValue, Cpg, CpgEvent, CpgMember, Error, Quorum, QuorumEvent, Votequorum, VotequorumEvent,
    VotequorumInfo,
};

#[derive(Debug)]
struct Options {
    group: String,
    send: u32,
    send_when_members: usize,
    duration: Duration,
    until_messages: Option<usize>,
    deadline: Duration,
    track: Vec<String>,
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cs-watch: {e}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cs-watch: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(watch(options));
    // A call stuck in a hung Corosync must not hold up the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut o = Options {
        group: "vmha-cs-watch".into(),
        send: 0,
        send_when_members: 1,
        duration: Duration::from_secs(60),
        until_messages: None,
        deadline: vmha_corosync::DEFAULT_DEADLINE,
        track: Vec::new(),
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--group" => o.group = value()?,
            "--send" => o.send = number(value()?)? as u32,
            "--send-when-members" => o.send_when_members = number(value()?)? as usize,
            "--for" => o.duration = Duration::from_secs(number(value()?)?),
            "--until-messages" => o.until_messages = Some(number(value()?)? as usize),
            "--deadline-ms" => o.deadline = Duration::from_millis(number(value()?)?),
            "--track" => o.track.push(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn emit(event: &str, mut fields: Value) {
    fields["event"] = json!(event);
    fields["t"] = json!(now());
    println!("{fields}");
}

fn emit_error(e: &Error) {
    emit(
        "error",
        json!({"call": e.call(), "error": e.to_string(), "hint": e.hint(),
               "disconnected": e.is_disconnected(), "timeout": e.is_timeout()}),
    );
}

fn member_json(m: &CpgMember) -> Value {
    json!({"nodeid": m.nodeid, "pid": m.pid, "reason": m.reason.as_str()})
}

fn info_json(i: &VotequorumInfo) -> Value {
    json!({
        "nodeid": i.nodeid, "state": i.state.as_str(), "votes": i.votes,
        "expected_votes": i.expected_votes, "highest_expected": i.highest_expected,
        "total_votes": i.total_votes, "quorum": i.quorum, "quorate": i.flags.quorate(),
        "two_node": i.flags.two_node(), "wait_for_all": i.flags.wait_for_all(),
        "last_man_standing": i.flags.last_man_standing(), "auto_tie_breaker": i.flags.auto_tie_breaker(),
        "qdevice": i.flags.qdevice_registered(), "qdevice_name": i.qdevice_name,
    })
}

fn value_json(v: &CmapValue) -> Value {
    match v {
        CmapValue::String(s) => json!(s),
        CmapValue::Float(f) => json!(f),
        CmapValue::Double(d) => json!(d),
        CmapValue::Binary(b) => json!(b),
        other => json!(other.as_i128().map(|i| i as i64)),
    }
}

/// What cmap, cfg and votequorum say about the cluster, as the `start` line.
async fn describe(deadline: Duration, cpg: &Cpg, votequorum: &Votequorum) -> Result<Value, Error> {
    let cmap = Cmap::connect(deadline).await?;
    let cfg = Cfg::connect(deadline).await?;
    let names: BTreeMap<String, String> = cmap
        .node_names()
        .await?
        .into_iter()
        .map(|(id, name)| (id.to_string(), name))
        .collect();
    let runtime_members: BTreeMap<String, String> = cmap
        .runtime_members()
        .await?
        .into_iter()
        .map(|(id, m)| (id.to_string(), m.status))
        .collect();
    let token = cmap.get_opt("totem.token").await?.and_then(|v| v.as_i128());
    Ok(json!({
        "nodeid": cpg.local_nodeid().await?,
        "cfg_nodeid": cfg.local_nodeid().await?,
        "cluster_name": cmap.cluster_name().await?,
        "node_names": names,
        "runtime_members": runtime_members,
        "totem_token_ms": token.map(|t| t as i64),
        "runtime_token_ms": cmap.get_u32("runtime.config.totem.token").await?,
        "max_atomic_msgsize": cpg.max_atomic_msgsize().await?,
        "votequorum": info_json(&votequorum.get_info(0).await?),
    }))
}

async fn watch(o: Options) -> ExitCode {
    match run(&o).await {
        Ok(reason) => {
            emit("exit", json!({"reason": reason}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            emit_error(&e);
            ExitCode::from(2)
        }
    }
}

async fn run(o: &Options) -> Result<&'static str, Error> {
    let (cpg, mut cpg_events) = Cpg::connect(o.deadline).await?;
    let (quorum, mut quorum_events) = Quorum::connect(o.deadline).await?;
    let (votequorum, mut votequorum_events) = Votequorum::connect(o.deadline).await?;
    let prefixes: Vec<&str> = o.track.iter().map(String::as_str).collect();
    let (_tracking, mut cmap_events) = Cmap::track(o.deadline, &prefixes).await?;
    let mut start = describe(o.deadline, &cpg, &votequorum).await?;
    start["quorate"] = json!(quorum.is_quorate().await?);
    start["quorum_provider"] = json!(quorum.has_provider());
    start["group"] = json!(o.group);
    emit("start", start);
    cpg.join(&o.group).await?;
    let me = cpg.local_nodeid().await?;

    let mut terminate = signal(SignalKind::terminate()).map_err(|source| Error::Io { call: "signal", source })?;
    let end = tokio::time::sleep(o.duration);
    tokio::pin!(end);
    let (mut sent, mut delivered) = (false, 0usize);
    loop {
        tokio::select! {
            _ = &mut end => return Ok("duration"),
            _ = terminate.recv() => return Ok("sigterm"),
            _ = tokio::signal::ctrl_c() => return Ok("sigint"),
            event = cmap_events.next(), if !prefixes.is_empty() => {
                let CmapEvent { key, change, value, old } = event?;
                emit("cmap", json!({"key": key, "change": change.as_str(),
                                    "value": value.as_ref().map(value_json), "old": old.as_ref().map(value_json)}));
            }
            event = quorum_events.next() => {
                let QuorumEvent { quorate, ring, members } = event?;
                emit("quorum", json!({"quorate": quorate, "ring_nodeid": ring.nodeid, "ring_seq": ring.seq,
                                      "members": members}));
            }
            event = votequorum_events.next() => match event? {
                VotequorumEvent::Quorum { quorate, nodes } => {
                    let nodes: Vec<Value> = nodes.iter()
                        .map(|(id, state)| json!({"nodeid": id, "state": state.as_str()}))
                        .collect();
                    emit("votequorum", json!({"kind": "quorum", "quorate": quorate, "nodes": nodes}));
                }
                VotequorumEvent::Nodelist { ring, members } => emit("votequorum",
                    json!({"kind": "nodelist", "ring_nodeid": ring.nodeid, "ring_seq": ring.seq,
                           "members": members})),
                VotequorumEvent::ExpectedVotes(votes) => emit("votequorum",
                    json!({"kind": "expected_votes", "expected_votes": votes})),
            },
            event = cpg_events.next() => match event? {
                CpgEvent::Message { group, nodeid, pid, data } => {
                    delivered += 1;
                    emit("message", json!({"group": group, "nodeid": nodeid, "pid": pid,
                                           "data": String::from_utf8_lossy(&data)}));
                    if o.until_messages.is_some_and(|m| delivered >= m) {
                        return Ok("messages");
                    }
                }
                CpgEvent::Membership { group, members, joined, left } => {
                    emit("membership", json!({"group": group,
                        "members": members.iter().map(member_json).collect::<Vec<_>>(),
                        "joined": joined.iter().map(member_json).collect::<Vec<_>>(),
                        "left": left.iter().map(member_json).collect::<Vec<_>>()}));
                    if !sent && o.send > 0 && members.len() >= o.send_when_members {
                        sent = true;
                        for i in 0..o.send {
                            let data = format!("{me}:{i}");
                            cpg.mcast(data.as_bytes()).await?;
                            emit("sent", json!({"data": data}));
                        }
                    }
                }
                CpgEvent::Ring { ring, nodes } => emit("ring",
                    json!({"ring_nodeid": ring.nodeid, "ring_seq": ring.seq, "nodes": nodes})),
            },
        }
    }
}
