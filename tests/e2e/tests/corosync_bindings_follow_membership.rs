//! vmha's Corosync bindings (`vmha-corosync`, driven by its `cs-watch` example on every host) follow the
//! real cluster: all hosts see the same CPG membership and get every multicast message in the same
//! order, quorum is reported, cmap and cfg describe the cluster; when a host is powered off the survivors
//! get a membership change without it within seconds, stay quorate, see cmap's runtime member list mark
//! it as left, and see it rejoin the ring once fenced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmha_e2e::{after, json_lines, of_kind, POLL};
use vmha_lab::lab::target_binary;
use vmha_lab::{wait_for, Lab};

/// Messages each host multicasts once the group has every host.
const SENDS: usize = 5;
const GROUP: &str = "vmha-e2e-cs";
/// Where `cs-watch` is installed inside each host.
const WATCH: &str = "/usr/local/bin/cs-watch";

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn corosync_bindings_follow_membership_order_and_quorum() {
    let lab = vmha_e2e::lab();
    let dir = lab.cfg.dir().join("cs-watch");
    std::fs::create_dir_all(&dir).unwrap();
    let hosts: Vec<u8> = lab.cfg.host_numbers().collect();
    let binary = target_binary("examples/cs-watch").expect("the workspace's examples are built");
    let mut pids = BTreeMap::new();
    for &n in &hosts {
        lab.install(n, &binary, WATCH, "0755").unwrap();
        pids.insert(n, start_watch(&lab, n, &output(&dir, n), hosts.len()));
    }

    // Every host delivers every host's messages.
    let total = SENDS * hosts.len();
    wait_for(
        "every host to deliver every multicast message",
        Duration::from_secs(60),
        POLL,
        || {
            hosts
                .iter()
                .all(|&n| of_kind(&events(&dir, n), "message").len() >= total)
                .then_some(())
        },
    )
    .unwrap();

    // cmap, cfg, cpg and votequorum describe the same cluster on every host.
    let names: BTreeMap<String, String> = hosts.iter().map(|&n| (n.to_string(), lab.cfg.host_name(n))).collect();
    for &n in &hosts {
        let all = events(&dir, n);
        let start = &of_kind(&all, "start")[0];
        assert_eq!(start["cluster_name"], lab.cfg.name.as_str(), "cluster name on node{n}");
        assert_eq!(
            start["node_names"],
            serde_json::to_value(&names).unwrap(),
            "node names on node{n}"
        );
        assert_eq!(start["nodeid"], u64::from(n), "CPG's local node id on node{n}");
        assert_eq!(start["cfg_nodeid"], u64::from(n), "cfg's local node id on node{n}");
        assert_eq!(
            start["runtime_token_ms"],
            vmha_e2e::token_ms(),
            "runtime.config.totem.token on node{n}"
        );
        assert_eq!(start["quorate"], true, "quorum_getquorate on node{n}");
        let vq = &start["votequorum"];
        assert_eq!(
            (vq["expected_votes"].as_u64(), vq["quorum"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(vq["quorate"], true);
        assert!(
            of_kind(&all, "quorum")
                .iter()
                .any(|q| q["quorate"] == true && nodes(&q["members"]) == set(&hosts)),
            "node{n} reports a quorate partition of every host"
        );
    }

    // The same membership and the same message order everywhere.
    let views: Vec<Value> = hosts
        .iter()
        .map(|&n| full_view(&events(&dir, n), hosts.len()))
        .collect();
    for (i, view) in views.iter().enumerate() {
        assert_eq!(
            view, &views[0],
            "the membership with every host, node{} vs node1",
            hosts[i]
        );
    }
    let orders: Vec<Vec<(u64, String)>> = hosts.iter().map(|&n| delivered(&events(&dir, n))).collect();
    let expected: BTreeSet<String> = hosts
        .iter()
        .flat_map(|n| (0..SENDS).map(move |i| format!("{n}:{i}")))
        .collect();
    for (i, order) in orders.iter().enumerate() {
        let n = hosts[i];
        assert_eq!(order.len(), total, "node{n} delivered each message once: {order:?}");
        let texts: BTreeSet<String> = order.iter().map(|(_, d)| d.clone()).collect();
        assert_eq!(texts, expected, "node{n} delivered every host's messages");
        assert_eq!(order, &orders[0], "node{n} delivered in the same order as node1");
    }
    println!(
        "{} messages in the same order on every host: {:?}",
        total,
        orders[0].iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>()
    );

    // Power a host off: the survivors see it leave the group within seconds and stay quorate.
    let victim = *hosts.last().unwrap();
    let survivors: Vec<u8> = hosts.iter().copied().filter(|&n| n != victim).collect();
    let t0 = vmha_lab::power::now();
    lab.power_off(victim).unwrap();
    let seen = wait_for(
        &format!("the survivors to see node{victim} leave"),
        Duration::from_secs(20),
        POLL,
        || {
            survivors
                .iter()
                .map(|&n| {
                    let all = events(&dir, n);
                    let left = of_kind(&all, "membership").into_iter().find(|m| {
                        after(m, t0)
                            && m["left"].as_array().is_some_and(|l| {
                                l.iter()
                                    .any(|a| a["nodeid"] == u64::from(victim) && a["reason"] == "nodedown")
                            })
                    })?;
                    let quorum = of_kind(&all, "quorum")
                        .into_iter()
                        .find(|q| after(q, t0) && nodes(&q["members"]) == set(&survivors))?;
                    let status = format!("runtime.members.{victim}.status");
                    of_kind(&all, "cmap")
                        .into_iter()
                        .find(|c| after(c, t0) && c["key"] == status.as_str() && c["value"] == "left")?;
                    Some((n, left, quorum))
                })
                .collect::<Option<Vec<_>>>()
        },
    )
    .unwrap();
    for (n, left, quorum) in &seen {
        let detected = left["t"].as_f64().unwrap() - t0;
        println!("node{n}: CPG membership without node{victim} after {detected:.2} s; quorum {quorum}");
        assert!(detected < 10.0, "node{n} saw node{victim} leave after {detected:.2} s");
        assert_eq!(
            nodes_of(&left["members"]),
            set(&survivors),
            "node{n}'s group after the failure"
        );
        assert_eq!(quorum["quorate"], true, "node{n} stays quorate");
    }

    // The powered-off host is fenced and comes back: the survivors' totem ring has every host again.
    wait_for(
        &format!("node{victim} to rejoin the ring"),
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            survivors
                .iter()
                .all(|&n| {
                    of_kind(&events(&dir, n), "ring")
                        .iter()
                        .any(|r| after(r, t0) && nodes(&r["nodes"]) == set(&hosts))
                })
                .then_some(())
        },
    )
    .unwrap();
    for &n in &survivors {
        let all = events(&dir, n);
        for q in of_kind(&all, "quorum").iter().filter(|q| after(q, t0)) {
            assert_eq!(q["quorate"], true, "node{n} stayed quorate throughout: {q}");
        }
        assert!(
            of_kind(&all, "error").is_empty(),
            "node{n}'s event streams never failed"
        );
    }

    // cs-watch ends cleanly on SIGTERM.
    for &n in &survivors {
        lab.exec_ok(n, &["kill", "-TERM", &pids[&n].to_string()]).unwrap();
        let reason = wait_for("cs-watch to exit", Duration::from_secs(10), POLL, || {
            of_kind(&events(&dir, n), "exit").first().map(|e| e["reason"].clone())
        })
        .unwrap();
        assert_eq!(reason, "sigterm", "node{n}'s cs-watch exit");
    }
}

fn output(dir: &Path, n: u8) -> PathBuf {
    dir.join(format!("node{n}.jsonl"))
}

/// Starts `cs-watch` in the background on host `n`, writing its JSON lines to `out`; returns its PID in
/// the host.
fn start_watch(lab: &Lab, n: u8, out: &Path, members: usize) -> u32 {
    let script = format!(
        "setsid {WATCH} --group {GROUP} --send {SENDS} --send-when-members {members} --for 600 \
         --track runtime.members. > {out} 2> {out}.err < /dev/null & echo $!",
        out = out.display()
    );
    lab.exec_ok(n, &["sh", "-c", &script])
        .unwrap()
        .trim()
        .parse()
        .expect("the PID of cs-watch")
}

/// Every complete JSON line host `n`'s cs-watch has written so far.
fn events(dir: &Path, n: u8) -> Vec<Value> {
    json_lines(&output(dir, n))
}

fn set(hosts: &[u8]) -> BTreeSet<u64> {
    hosts.iter().map(|&n| u64::from(n)).collect()
}

/// Node ids of a JSON array of node ids.
fn nodes(list: &Value) -> BTreeSet<u64> {
    list.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Node ids of a JSON array of CPG members.
fn nodes_of(members: &Value) -> BTreeSet<u64> {
    members
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["nodeid"].as_u64()).collect())
        .unwrap_or_default()
}

/// The first membership that has `hosts` members: (node id, pid) of each, as this host saw it.
fn full_view(events: &[Value], hosts: usize) -> Value {
    of_kind(events, "membership")
        .into_iter()
        .find(|m| m["members"].as_array().is_some_and(|a| a.len() == hosts))
        .map(|m| {
            m["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| serde_json::json!([a["nodeid"], a["pid"]]))
                .collect()
        })
        .expect("a membership with every host")
}

/// The delivered messages in order: (sender node id, text).
fn delivered(events: &[Value]) -> Vec<(u64, String)> {
    of_kind(events, "message")
        .iter()
        .map(|m| {
            (
                m["nodeid"].as_u64().unwrap_or_default(),
                m["data"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
