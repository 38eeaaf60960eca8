//! Issue 19 on real daemons: a priority-100 VM loses its host, its home zone has no room left (a
//! priority-1 VM fills the other host there) and another zone has free room. The VM takes the free room;
//! the priority-1 VM keeps running where it runs. Before, Pacemaker placed the priority-100 VM first on
//! its best-scored host and pushed the priority-1 VM out.
//!
//! Lab: zone `a` = node1 and node2, zone `b` = node3, each with room for one guest (capacity set by the
//! policy). `hi` (100) on node1 and `lo` (1) on node2, both at home in `a`. node1 is powered off and
//! fenced (action `off`, it stays down). The DC's vmhad keeps each host's free capacity in `vmha-free-*`
//! node attributes, which the policy's rules read.

use std::time::{Duration, Instant};

use vmha_e2e::{dc_idle, settled_placement, vmha_json, POLL};
use vmha_lab::wait_for;

const VMS: [&str; 2] = ["hi", "lo"];

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn failover_takes_free_room_before_displacing() {
    let lab = vmha_e2e::lab_with_vmhad();
    let t0 = Instant::now();
    vmha_e2e::add_stopped_vms_fenced_hosts_stay_off(&lab, &VMS);
    let h = |n| lab.cfg.host_name(n);
    let policy = serde_json::json!({
        "hosts": {
            h(1): {"zone": "a/r1", "capacity": {"cpu": 1, "hv_memory": 128}},
            h(2): {"zone": "a/r2", "capacity": {"cpu": 1, "hv_memory": 128}},
            h(3): {"zone": "b/r1", "capacity": {"cpu": 1, "hv_memory": 128}},
        },
        "vms": {"hi": {"priority": 100, "zone": "a"}, "lo": {"priority": 1, "zone": "a"}}
    });
    let file = lab.cfg.shared_dir().join("policy.json");
    std::fs::write(&file, policy.to_string()).unwrap();
    lab.exec_ok(1, &["vmha", "policy", "set", file.to_str().unwrap()])
        .unwrap();
    assert_eq!(vmha_json(&lab, 1, &["policy", "apply"]).unwrap()["applied"], true);
    // hi on node1, lo on node2 (the operator's own preferences, which the policy leaves alone).
    for (vm, n) in [("hi", 1), ("lo", 2)] {
        lab.exec_ok(
            1,
            &[
                "pcs",
                "constraint",
                "location",
                vm,
                "prefers",
                &format!("{}=5000", h(n)),
            ],
        )
        .unwrap();
        lab.exec_ok(1, &["vmha", "vm", "start", vm]).unwrap();
    }
    let before = wait_for(
        "both VMs to run and the DC to be idle",
        Duration::from_secs(240),
        POLL,
        || {
            let p = settled_placement(&lab, 1, &VMS)?;
            (p.values().all(Option::is_some) && dc_idle(&lab, 1)).then_some(p)
        },
    )
    .unwrap();
    println!("before: {before:?} ({:.1} s since lab up)", t0.elapsed().as_secs_f64());
    assert_eq!(before["hi"], Some(h(1)));
    assert_eq!(before["lo"], Some(h(2)));
    // The DC's vmhad published the free capacity: node3 has room for one guest, node2 none.
    wait_for(
        "the free capacity in the node attributes",
        Duration::from_secs(60),
        POLL,
        || {
            let status = lab.exec_ok(1, &["cibadmin", "--query", "--scope", "status"]).ok()?;
            (status.contains("vmha-free-status-3-hv_memory") && status.contains("vmha-free-status-2-hv_memory"))
                .then_some(())
        },
    )
    .unwrap();

    // What-if says it first, with the step.
    let prediction = vmha_json(&lab, 3, &["what-if", "--fail", &h(1)]).unwrap();
    println!("{}", serde_json::to_string_pretty(&prediction).unwrap());
    let vm = |name: &str| {
        prediction["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(vm("hi")["to"], h(3), "hi takes the free room in zone b");
    assert_eq!(vm("hi")["step"], 2, "{}", vm("hi")["step_label"]);
    assert_eq!(vm("lo")["outcome"], "stays", "lo is not displaced while room exists");

    let victim = h(1);
    let fences_before = lab.power_events().len();
    let t = Instant::now();
    lab.power_off(1).unwrap();
    let after = wait_for(
        "the cluster to fence node1 and settle",
        Duration::from_secs(180),
        POLL,
        || {
            let fenced = lab
                .power_events()
                .iter()
                .skip(fences_before)
                .any(|e| e.host == victim && e.result == "ok");
            if !fenced {
                return None;
            }
            let s = lab.status(3).ok()?;
            if s.node(&victim).is_some_and(|n| n.online || n.unclean) {
                return None;
            }
            let p = settled_placement(&lab, 3, &VMS)?;
            (dc_idle(&lab, 3) && p["hi"].is_some()).then_some(p)
        },
    )
    .unwrap();
    println!("after {victim} failed ({:.1} s): {after:?}", t.elapsed().as_secs_f64());
    assert_eq!(after["hi"], Some(h(3)), "hi took the free room");
    assert_eq!(after["lo"], Some(h(2)), "lo kept running where it ran");
    lab.power_on(1).unwrap();
}
