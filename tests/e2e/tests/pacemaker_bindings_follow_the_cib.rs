//! vmha's Pacemaker bindings (`vmha-pacemaker`, driven by its `pcmk-watch` example inside the hosts) against
//! the real cluster: the DC they report is crm_mon's on every host; a CIB change made with `crm_attribute`
//! reaches their notification stream within a second; a change they make is what `cibadmin --query` reads
//! on every host; a resource failure they report makes Pacemaker recover the resource at once (fail count
//! up, restarted) instead of at the next monitor; and after the DC host is powered off, the bindings on a
//! survivor report the new DC, the one crm_mon reports. Throughout, the local copy of the CIB they keep
//! from the notifications' diffs equals the CIB at every version it is compared at.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use vmha_e2e::{after, json_lines, of_kind, Timeline, POLL};
use vmha_lab::lab::target_binary;
use vmha_lab::{wait_for, Lab};

/// How long a CIB change may take to reach the bindings' notification stream.
const NOTIFY_WITHIN: f64 = 1.0;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn pacemaker_bindings_follow_the_cib_and_the_dc() {
    let lab = vmha_e2e::lab();
    let watch = target_binary("examples/pcmk-watch").expect("the workspace's examples are built");
    let watch = watch.to_str().unwrap();
    let hosts: Vec<u8> = lab.cfg.host_numbers().collect();
    let mut t = Timeline::start();

    // The DC the bindings report (the DC's controller answering a ping) is crm_mon's, on every host.
    let dc = lab.status(1).unwrap().dc.expect("a DC is elected");
    for &n in &hosts {
        let reply = json(&lab.exec_ok(n, &[watch, "dc"]).unwrap());
        assert_eq!(reply["dc"], dc.as_str(), "the DC the bindings report on node{n}");
        assert_eq!(reply["result"], "ok", "the DC's health on node{n}");
    }
    let dc_host = lab.cfg.host_number(&dc).unwrap();
    let observer = lab.other_host(dc_host).unwrap();
    let actor = hosts.iter().copied().find(|&n| n != dc_host && n != observer).unwrap();

    // A follower on a host that is not the DC.
    let log = lab.cfg.host_dir(observer).join("pcmk-watch.jsonl");
    let _ = std::fs::remove_file(&log);
    let script = format!(
        "setsid {watch} watch --seconds 600 > {out} 2> {out}.err < /dev/null & echo $!",
        out = log.display()
    );
    let pid = lab
        .exec_ok(observer, &["sh", "-c", &script])
        .unwrap()
        .trim()
        .to_string();
    let start = wait_for("the follower to subscribe", Duration::from_secs(20), POLL, || {
        of_kind(&events(&log), "watching").into_iter().next()
    })
    .unwrap();
    assert_eq!(start["dc"], dc.as_str(), "the follower's DC");
    t.mark("follower subscribed");

    // A change made with crm_attribute on another host reaches the stream within a second.
    let t0 = vmha_lab::power::now();
    lab.exec_ok(
        actor,
        &[
            "crm_attribute",
            "--type",
            "crm_config",
            "--name",
            "vmha-e2e-probe",
            "--update",
            "1",
        ],
    )
    .unwrap();
    let seen = wait_for(
        "the crm_attribute change notification",
        Duration::from_secs(5),
        POLL,
        || {
            of_kind(&events(&log), "change")
                .into_iter()
                .find(|c| after(c, t0) && touches(c, "cib-bootstrap-options"))
        },
    )
    .unwrap();
    let delay = seen["t"].as_f64().unwrap() - t0;
    println!(
        "crm_attribute on node{actor} -> notification on node{observer}: {:.0} ms",
        delay * 1000.0
    );
    assert!(delay <= NOTIFY_WITHIN, "notified {delay:.3} s after the change: {seen}");
    assert!(
        version(&seen) > version(&start),
        "the notification carries the new CIB version: {start} then {seen}"
    );

    // A change made through the bindings is what cibadmin reads on every host, and is notified too.
    let marker = format!("m{}", vmha_lab::power::now() as u64);
    let xml = format!(
        r#"<cluster_property_set id="vmha-e2e"><nvpair id="vmha-e2e-marker" name="vmha-e2e-marker" value="{marker}"/></cluster_property_set>"#
    );
    let t1 = vmha_lab::power::now();
    let done = json(
        &lab.exec_ok(
            actor,
            &[watch, "modify", "--section", "crm_config", "--create", "--xml", &xml],
        )
        .unwrap(),
    );
    assert_eq!(done["event"], "modified");
    for &n in &hosts {
        wait_for(
            &format!("the marker in node{n}'s CIB"),
            Duration::from_secs(10),
            POLL,
            || {
                let out = lab
                    .exec_ok(
                        n,
                        &["cibadmin", "--query", "--xpath", "//nvpair[@id='vmha-e2e-marker']"],
                    )
                    .ok()?;
                out.contains(&format!(r#"value="{marker}""#)).then_some(())
            },
        )
        .unwrap();
    }
    wait_for(
        "the notification of the bindings' own change",
        Duration::from_secs(5),
        POLL,
        || {
            of_kind(&events(&log), "change")
                .into_iter()
                .find(|c| after(c, t1) && touches(c, "crm_config"))
        },
    )
    .unwrap();
    t.mark("modify through the bindings read back by cibadmin on every host");

    // A reported failure makes Pacemaker recover the resource at once (its monitor runs only every 10 min).
    lab.exec_ok(
        actor,
        &[
            "pcs",
            "resource",
            "create",
            "d1",
            "ocf:pacemaker:Dummy",
            "op",
            "monitor",
            "interval=600s",
        ],
    )
    .unwrap();
    let runs_on = wait_for("d1 to start", Duration::from_secs(60), POLL, || {
        let s = lab.status(actor).ok()?;
        lab.cfg.host_number(s.running_on("d1")?)
    })
    .unwrap();
    let node = lab.cfg.host_name(runs_on);
    assert_eq!(fail_count(&lab, actor, &node), 0);
    let t2 = vmha_lab::power::now();
    let acked = json(
        &lab.exec_ok(
            actor,
            &[
                watch,
                "fail",
                "--host",
                &node,
                "--rsc",
                "d1",
                "--standard",
                "ocf",
                "--provider",
                "pacemaker",
                "--type",
                "Dummy",
            ],
        )
        .unwrap(),
    );
    assert_eq!(acked["event"], "failed");
    let counted = wait_for("d1's fail count to go up", Duration::from_secs(3), POLL, || {
        let c = fail_count(&lab, actor, &node);
        (c > 0).then_some(c)
    })
    .unwrap();
    let counted_after = vmha_lab::power::now() - t2;
    let restarted = wait_for("d1 to be restarted", Duration::from_secs(10), POLL, || {
        last_start(&lab, actor, &node).filter(|&at| at >= t2.floor() as u64)
    })
    .unwrap();
    let recovered_after = vmha_lab::power::now() - t2;
    assert!(lab.status(actor).unwrap().running_on("d1").is_some(), "d1 runs again");
    println!(
        "fail_resource(d1 on {node}): acknowledged in {:.0} ms, fail count {counted} after {:.2} s, \
         restarted (start at {restarted}) after {:.2} s",
        (acked["acknowledged"].as_f64().unwrap() - acked["t"].as_f64().unwrap()) * 1000.0,
        counted_after,
        recovered_after
    );
    assert!(
        recovered_after < 5.0,
        "recovered {recovered_after:.2} s after the report"
    );
    t.mark("reported failure recovered");

    // The DC host dies: the survivor's bindings report the new DC, crm_mon's.
    lab.power_off(dc_host).unwrap();
    t.mark("DC host powered off");
    let new_dc = wait_for("the follower to report a new DC", Duration::from_secs(60), POLL, || {
        of_kind(&events(&log), "dc")
            .into_iter()
            .filter_map(|e| e["dc"].as_str().map(str::to_string))
            .find(|d| *d != dc)
    })
    .unwrap();
    t.mark("the bindings report the new DC");
    assert_ne!(lab.cfg.host_number(&new_dc), Some(dc_host));
    let crm_mon_dc = wait_for("crm_mon to report a DC", Duration::from_secs(30), POLL, || {
        lab.status(observer).ok()?.dc
    })
    .unwrap();
    assert_eq!(new_dc, crm_mon_dc, "the bindings' new DC is crm_mon's");
    let reply = json(&lab.exec_ok(observer, &[watch, "dc"]).unwrap());
    assert_eq!(reply["dc"], new_dc.as_str());
    assert!(
        of_kind(&events(&log), "error").is_empty(),
        "the follower on a survivor kept its connections: {:?}",
        of_kind(&events(&log), "error")
    );

    // The local copy the bindings keep from the notifications' diffs (what vmhad reads on every change)
    // was the CIB itself at every version it was compared at, and the diffs did the work (few whole reads).
    let copies = of_kind(&events(&log), "copy");
    let differs: Vec<&Value> = copies.iter().filter(|c| c["result"] == "differs").collect();
    assert!(differs.is_empty(), "the local copy differed from the CIB: {differs:?}");
    let same = copies.iter().filter(|c| c["result"] == "same").count();
    let applied = copies.iter().filter_map(|c| c["applied"].as_u64()).max().unwrap_or(0);
    let reads = copies.iter().filter_map(|c| c["reads"].as_u64()).max().unwrap_or(0);
    println!(
        "local CIB copy: {} changes compared ({same} same, {} raced), {applied} diffs applied, {reads} whole reads",
        copies.len(),
        copies.len() - same
    );
    assert!(same >= 5, "the copy was compared at 5 versions or more: {copies:?}");
    assert!(applied >= 5, "diffs were applied to the copy: {copies:?}");
    assert!(reads <= 2, "the copy was read whole at most twice: {copies:?}");
    let _ = lab.exec(observer, &["kill", &pid]);
    t.print(&format!("DC {dc} -> {new_dc}; follower on node{observer}:"));
}

fn json(line: &str) -> Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Every complete JSON line the follower has written so far.
fn events(log: &Path) -> Vec<Value> {
    json_lines(log)
}

/// Whether a change notification names a changed path containing `what`.
fn touches(change: &Value, what: &str) -> bool {
    change["paths"]
        .as_array()
        .is_some_and(|paths| paths.iter().filter_map(Value::as_str).any(|p| p.contains(what)))
}

/// (admin_epoch, epoch, num_updates) of a "watching" or "change" line.
fn version(event: &Value) -> (u64, u64, u64) {
    let n = |k: &str| event[k].as_u64().unwrap_or(0);
    (n("admin_epoch"), n("epoch"), n("num_updates"))
}

/// d1's fail count on `node`, as `crm_failcount` reads it on host `n`.
fn fail_count(lab: &Lab, n: u8, node: &str) -> u64 {
    let out = lab
        .exec_ok(n, &["crm_failcount", "--query", "--resource", "d1", "--node", node])
        .unwrap();
    out.split("value=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// When d1 last started successfully on `node` (`last-rc-change` of its last operation, if that is a
/// successful start), from the CIB's status section on host `n`.
fn last_start(lab: &Lab, n: u8, node: &str) -> Option<u64> {
    let xpath = format!("//node_state[@uname='{node}']//lrm_resource[@id='d1']/lrm_rsc_op[@id='d1_last_0']");
    let out = lab.exec_ok(n, &["cibadmin", "--query", "--xpath", &xpath]).ok()?;
    let attr = |name: &str| -> Option<String> {
        let key = format!(" {name}=\"");
        let start = out.find(&key)? + key.len();
        Some(out[start..].split('"').next()?.to_string())
    };
    (attr("operation")? == "start" && attr("rc-code")? == "0").then(|| attr("last-rc-change")?.parse().ok())?
}
