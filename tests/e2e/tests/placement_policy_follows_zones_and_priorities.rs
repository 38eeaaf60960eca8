//! A placement policy decides where VMs restart when a host fails: in their home zone while it has room,
//! across zones when it has none, the most important first and the least important stopped when capacity
//! is short; two replicas never share a host. `vmha what-if` predicts exactly what the cluster then does.
//!
//! Lab: zone `a` = node1 (room for 2 VMs) + node2 (room for 1), zone `b` = node3 (room for 2); the
//! hosts' capacity is set small by the policy so that four small guests fill the cluster. VMs: `ahi`
//! (priority 100) and `amid` (50) at home in `a`, both on node1 (the operator's own location preference,
//! which the policy leaves alone); `bone` (10) and `btwo` (1) at home in `b`; `ahi` and `bone` are
//! replicas kept apart by host. Failing node1: `ahi` restarts in zone `a` (node2 has room for one),
//! `amid` has to cross into `b`, where the lowest priority, `btwo`, is stopped to make room. Fencing stays
//! on (action `off`, so the fenced host stays down while the outcome is compared).

use std::time::{Duration, Instant};

use serde_json::Value;
use vmha_e2e::{dc_idle, predicted_placement, settled_placement, vmha_json, POLL};
use vmha_lab::{wait_for, Lab};

const VMS: [&str; 4] = ["ahi", "amid", "bone", "btwo"];

fn policy_json(lab: &Lab) -> String {
    let h = |n| lab.cfg.host_name(n);
    serde_json::json!({
        "placement_strategy": "balanced",
        "hosts": {
            h(1): {"zone": "a/r1", "capacity": {"cpu": 2, "hv_memory": 256}},
            h(2): {"zone": "a/r2", "capacity": {"cpu": 2, "hv_memory": 128}},
            h(3): {"zone": "b/r1", "capacity": {"cpu": 2, "hv_memory": 256}},
        },
        "vms": {
            "ahi": {"priority": 100, "zone": "a"},
            "amid": {"priority": 50, "zone": "a"},
            "bone": {"priority": 10, "zone": "b"},
            "btwo": {"priority": 1, "zone": "b"},
        },
        "groups": {"app": {"members": ["ahi", "bone"], "anti_affinity": "host"}}
    })
    .to_string()
}

fn zone_of(lab: &Lab, host: &str) -> &'static str {
    match lab.cfg.host_number(host) {
        Some(1 | 2) => "a",
        Some(3) => "b",
        _ => panic!("unknown host {host}"),
    }
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn placement_policy_follows_zones_and_priorities() {
    let lab = vmha_e2e::lab_with_vmhad();
    let t0 = Instant::now();
    vmha_e2e::add_stopped_vms_fenced_hosts_stay_off(&lab, &VMS);

    // A bad policy is refused and changes nothing.
    let shared = lab.cfg.shared_dir();
    let bad = shared.join("bad-policy.json");
    std::fs::write(&bad, r#"{"hosts": {"nosuch": {"zone": "a"}}}"#).unwrap();
    let out = lab.exec(1, &["vmha", "policy", "set", bad.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("host nosuch: not a node"));
    let cib_before = lab
        .exec_ok(1, &["cibadmin", "--query", "--scope", "configuration"])
        .unwrap();
    assert!(!cib_before.contains("vmha-policy"));

    // Store, dry-run (prints the difference, changes nothing), apply, re-apply (changes nothing).
    let file = shared.join("policy.json");
    std::fs::write(&file, policy_json(&lab)).unwrap();
    lab.exec_ok(1, &["vmha", "policy", "set", file.to_str().unwrap()])
        .unwrap();
    let dry = lab.exec_ok(2, &["vmha", "policy", "apply", "--dry-run"]).unwrap();
    println!("vmha policy apply --dry-run:\n{dry}");
    assert!(dry.contains("+ constraints: <rsc_colocation id=\"vmha-policy-apart-app-bone-ahi\""));
    assert!(dry.contains("dry run: nothing changed"));
    let constraints = lab
        .exec_ok(1, &["cibadmin", "--query", "--scope", "constraints"])
        .unwrap();
    assert!(!constraints.contains("vmha-policy-"), "the dry run changed nothing");
    let applied = vmha_json(&lab, 2, &["policy", "apply"]).unwrap();
    assert_eq!(applied["applied"], true);
    let epoch = |lab: &Lab| {
        let x = lab
            .exec_ok(1, &["cibadmin", "--query", "--xpath", "/cib", "--no-children"])
            .unwrap();
        x.split(" epoch=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .to_string()
    };
    let epoch_applied = epoch(&lab);
    let again = vmha_json(&lab, 3, &["policy", "apply"]).unwrap();
    assert_eq!(again["applied"], false);
    assert_eq!(again["plan"]["changes"].as_array().unwrap().len(), 0);
    assert_eq!(
        epoch(&lab),
        epoch_applied,
        "re-applying an unchanged policy changed nothing"
    );

    // The history: the apply that changed the cluster is recorded (who, where); a changed policy is a
    // second version; diff names the changed member; rollback applies the first again and is recorded.
    let history = |n: u8| vmha_json(&lab, n, &["policy", "history"]).unwrap()["versions"].clone();
    let h = history(1);
    assert_eq!(h.as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h[0]["version"], 1);
    assert_eq!(h[0]["note"], "apply");
    assert_eq!(h[0]["who"], format!("root@{}", lab.cfg.host_name(2)));
    let first: serde_json::Value = serde_json::from_str(&policy_json(&lab)).unwrap();
    let mut second = first.clone();
    second["vms"]["amid"]["priority"] = serde_json::json!(60);
    let file2 = shared.join("policy2.json");
    std::fs::write(&file2, second.to_string()).unwrap();
    lab.exec_ok(1, &["vmha", "policy", "set", file2.to_str().unwrap()])
        .unwrap();
    assert_eq!(vmha_json(&lab, 1, &["policy", "apply"]).unwrap()["applied"], true);
    let diff = vmha_json(&lab, 3, &["policy", "diff", "1", "2"]).unwrap();
    assert_eq!(
        diff["changes"],
        serde_json::json!([{"path": "/vms/amid/priority", "from": 50, "to": 60}]),
        "{diff}"
    );
    let rolled = vmha_json(&lab, 3, &["policy", "rollback", "1", "--yes"]).unwrap();
    assert_eq!(rolled["applied"], true, "{rolled}");
    let h = history(2);
    assert_eq!(h.as_array().unwrap().len(), 3, "{h}");
    assert_eq!(h[2]["note"], "rollback to 1");
    assert_eq!(h[2]["who"], format!("root@{}", lab.cfg.host_name(3)));
    let same = vmha_json(&lab, 1, &["policy", "diff", "1"]).unwrap();
    assert_eq!(
        same["changes"],
        serde_json::json!([]),
        "the stored policy is version 1 again"
    );
    assert_eq!(
        vmha_json(&lab, 2, &["policy", "apply"]).unwrap()["applied"],
        false,
        "the CIB carries version 1 again"
    );
    let constraints = lab
        .exec_ok(1, &["cibadmin", "--query", "--scope", "constraints"])
        .unwrap();
    assert!(constraints.contains("vmha-policy-home-ahi"));

    // The operator's own preference: ahi and amid start on node1 (the policy does not touch it).
    for vm in ["ahi", "amid"] {
        lab.exec_ok(
            1,
            &[
                "pcs",
                "constraint",
                "location",
                vm,
                "prefers",
                &format!("{}=1000", lab.cfg.host_name(1)),
            ],
        )
        .unwrap();
    }
    // Start the VMs, most important first; the cluster settles with every VM running.
    for vm in VMS {
        lab.exec_ok(1, &["vmha", "vm", "start", vm]).unwrap();
    }
    let before = wait_for(
        "all four VMs to run and the DC to be idle",
        Duration::from_secs(300),
        POLL,
        || {
            let p = settled_placement(&lab, 1, &VMS)?;
            (p.values().all(Option::is_some) && dc_idle(&lab, 1)).then_some(p)
        },
    )
    .unwrap();
    println!("before: {before:?} ({:.1} s since lab up)", t0.elapsed().as_secs_f64());
    let on = |n: u8| Some(lab.cfg.host_name(n));
    assert_eq!(before["ahi"], on(1));
    assert_eq!(before["amid"], on(1));
    assert_eq!(before["bone"], on(3), "bone at home in zone b");
    assert_eq!(before["btwo"], on(3), "btwo at home in zone b");
    let victim = 1;
    let victim_name = lab.cfg.host_name(victim);

    // N+1: with this little capacity, a host failure leaves VMs without a place.
    let n1 = vmha_json(&lab, 3, &["what-if", "--n-plus-one"]).unwrap();
    assert_eq!(n1["n_plus_one"], false, "{n1}");
    assert_eq!(n1["failures"].as_array().unwrap().len(), 3);
    let zone_a = vmha_json(&lab, 3, &["what-if", "--fail-zone", "a"]).unwrap();
    assert_eq!(
        zone_a["failed_hosts"],
        serde_json::json!([lab.cfg.host_name(1), lab.cfg.host_name(2)])
    );
    // Zone a lost: everything crowds into node3, and the replicas ahi and bone still do not share it.
    let crowded = predicted_placement(&zone_a);
    assert!(
        crowded["ahi"].is_none() || crowded["ahi"] != crowded["bone"],
        "replicas apart: {zone_a}"
    );
    println!("what-if --fail-zone a: {crowded:?}");

    // What-if first: fail node1.
    let observer = 3;
    let t = Instant::now();
    let prediction = vmha_json(&lab, observer, &["what-if", "--fail", &victim_name]).unwrap();
    println!(
        "what-if --fail {victim_name} ({:.2} s):\n{}",
        t.elapsed().as_secs_f64(),
        serde_json::to_string_pretty(&prediction).unwrap()
    );
    let human = lab
        .exec_ok(observer, &["vmha", "what-if", "--fail", &victim_name])
        .unwrap();
    println!("{human}");
    let expected = predicted_placement(&prediction);

    // The prediction follows the policy: ahi restarts in zone a (node2 has room for one), amid must cross
    // into b, where the lowest priority (btwo) gives way; bone (10) keeps running.
    assert_eq!(expected["ahi"], on(2), "ahi restarts in its zone while it has room");
    assert_eq!(expected["amid"], on(3), "amid crosses zones: a has no room left");
    assert_eq!(expected["bone"], on(3));
    assert_eq!(expected["btwo"], None, "the lowest priority is stopped");
    assert_ne!(expected["ahi"], expected["bone"]);
    assert_eq!(zone_of(&lab, expected["ahi"].as_deref().unwrap()), "a");
    assert_eq!(zone_of(&lab, expected["amid"].as_deref().unwrap()), "b");
    // What-if names the failover step: ahi took free room at home (step 1); amid found no free room
    // anywhere (node2 is ahi's now, node3 full) and took btwo's place outside its zone (step 5).
    let step = |vm: &str| -> (Value, String) {
        let v = prediction["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == vm)
            .unwrap();
        (v["step"].clone(), v["step_label"].as_str().unwrap_or("").to_string())
    };
    let (ahi_step, ahi_label) = step("ahi");
    assert_eq!(ahi_step, 1, "{ahi_label}");
    let (amid_step, amid_label) = step("amid");
    assert_eq!(amid_step, 5, "{amid_label}");
    assert!(amid_label.contains("in place of btwo"), "{amid_label}");
    assert!(human.contains("step 1: free room on"), "{human}");

    // Now the real thing.
    let fences_before = lab.power_events().len();
    let t = Instant::now();
    lab.power_off(victim).unwrap();
    let actual = wait_for(
        "the cluster to fence the host and settle",
        Duration::from_secs(180),
        POLL,
        || {
            let ahi = lab.qemu_processes("ahi");
            let bone = lab.qemu_processes("bone");
            for a in &ahi {
                assert!(
                    !bone.iter().any(|b| b.0 == a.0 && a.0 != 0),
                    "replicas share host {}: ahi {ahi:?} bone {bone:?}",
                    a.0
                );
            }
            let fenced = lab
                .power_events()
                .iter()
                .skip(fences_before)
                .any(|e| e.host == victim_name && e.result == "ok");
            if !fenced {
                return None;
            }
            let s = lab.status(observer).ok()?;
            if s.node(&victim_name).is_some_and(|n| n.online || n.unclean) {
                return None;
            }
            let p = settled_placement(&lab, observer, &VMS)?;
            dc_idle(&lab, observer).then_some(p)
        },
    )
    .unwrap();
    println!(
        "after {victim_name} failed ({:.1} s to settle): {actual:?}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(actual, expected, "the cluster did exactly what what-if predicted");
    assert!(!lab.host_alive(victim), "the fenced host stayed off");

    // Bring the host back for an orderly teardown.
    lab.power_on(victim).unwrap();
}
