//! Issue 19 on real daemons: a zone loses all its hosts. Its VMs land in the nearest zone with room, the
//! highest priority first, and no lower-priority VM is displaced while free room exists anywhere.
//!
//! Lab: site s1 has zone s1/a = node1 (room for two guests) and zone s1/b = node2 (room for one); site s2
//! is node3 (room for two). `hi` (priority 100) and `mid` (50) run on node1, at home in s1/a; `lo` (1)
//! runs on node3, at home in s2. node1 is powered off and fenced (action `off`, it stays down): zone s1/a
//! has no host left. Expected, as what-if says beforehand: `hi` takes the one free slot of the nearest zone
//! (node2, same site); `mid` crosses to the other site (node3), where `lo` keeps running beside it, never
//! restarted nor moved. The table `a_zone_lost_whole_sends_the_highest_priority_nearest_...` in
//! model/tests/scheduler_tables.rs is the same case on Pacemaker's scheduler alone; the case Pacemaker's
//! scores cannot express exactly (two VMs of a lost zone competing for one free slot where a lower-priority
//! VM runs) is described there and in docs/placement.md.

use std::time::{Duration, Instant};

use vmha_e2e::{dc_idle, predicted_placement, settled_placement, vmha_json, POLL};
use vmha_lab::wait_for;

const VMS: [&str; 3] = ["hi", "mid", "lo"];

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn zone_lost_whole_fails_over_nearest_first() {
    let lab = vmha_e2e::lab_with_vmhad();
    let t0 = Instant::now();
    vmha_e2e::add_stopped_vms_fenced_hosts_stay_off(&lab, &VMS);
    let h = |n| lab.cfg.host_name(n);
    let policy = serde_json::json!({
        "hosts": {
            h(1): {"zone": "s1/a", "capacity": {"cpu": 2, "hv_memory": 256}},
            h(2): {"zone": "s1/b", "capacity": {"cpu": 1, "hv_memory": 128}},
            h(3): {"zone": "s2", "capacity": {"cpu": 2, "hv_memory": 256}},
        },
        "vms": {
            "hi": {"priority": 100, "zone": "s1/a"},
            "mid": {"priority": 50, "zone": "s1/a"},
            "lo": {"priority": 1, "zone": "s2"}
        }
    });
    let file = lab.cfg.shared_dir().join("policy.json");
    std::fs::write(&file, policy.to_string()).unwrap();
    lab.exec_ok(1, &["vmha", "policy", "set", file.to_str().unwrap()])
        .unwrap();
    assert_eq!(vmha_json(&lab, 1, &["policy", "apply"]).unwrap()["applied"], true);
    for vm in VMS {
        lab.exec_ok(1, &["vmha", "vm", "start", vm]).unwrap();
    }
    let before = wait_for(
        "the three VMs to run at home and the DC to be idle",
        Duration::from_secs(240),
        POLL,
        || {
            let p = settled_placement(&lab, 1, &VMS)?;
            (p.values().all(Option::is_some) && dc_idle(&lab, 1)).then_some(p)
        },
    )
    .unwrap();
    println!("before: {before:?} ({:.1} s since lab up)", t0.elapsed().as_secs_f64());
    assert_eq!(before["hi"], Some(h(1)), "hi at home in s1/a");
    assert_eq!(before["mid"], Some(h(1)), "mid at home in s1/a");
    assert_eq!(before["lo"], Some(h(3)), "lo at home in s2");
    // The DC's vmhad published every host's free capacity, which the policy's rules read.
    wait_for(
        "the free capacity in the node attributes",
        Duration::from_secs(60),
        POLL,
        || {
            let status = lab.exec_ok(1, &["cibadmin", "--query", "--scope", "status"]).ok()?;
            (1..=3)
                .all(|n| status.contains(&format!("vmha-free-status-{n}-hv_memory")))
                .then_some(())
        },
    )
    .unwrap();

    // What-if says it first: for the whole zone, and for its one host (the same event here).
    let zone = vmha_json(&lab, 3, &["what-if", "--fail-zone", "s1/a"]).unwrap();
    println!("{}", serde_json::to_string_pretty(&zone).unwrap());
    assert_eq!(zone["failed_hosts"], serde_json::json!([h(1)]));
    let vm = |name: &str| {
        zone["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .unwrap_or_else(|| panic!("{name} in the prediction: {zone}"))
            .clone()
    };
    assert_eq!(vm("hi")["to"], h(2), "hi: the nearest zone with room");
    assert_eq!(vm("hi")["step"], 2, "{}", vm("hi")["step_label"]);
    assert_eq!(vm("mid")["to"], h(3), "mid: the nearest room left, at the other site");
    assert_eq!(vm("lo")["outcome"], "stays", "lo is not displaced while room exists");
    assert_eq!(vm("lo")["host"], h(3));
    let predicted = predicted_placement(&zone);
    let host_event = vmha_json(&lab, 3, &["what-if", "--fail", &h(1)]).unwrap();
    assert_eq!(
        predicted_placement(&host_event),
        predicted,
        "failing zone s1/a is failing node1"
    );

    // lo's QEMU process: the same one before and after, so lo was neither restarted nor moved.
    let lo_qemu = lab.qemu_processes("lo");
    assert_eq!(lo_qemu.len(), 1, "{lo_qemu:?}");

    let victim = h(1);
    let fences_before = lab.power_events().len();
    let t = Instant::now();
    lab.power_off(1).unwrap();
    // Meanwhile no VM may run on two hosts: every poll counts its QEMU processes.
    let mut most = 0;
    let mut polls = 0u32;
    let after = wait_for(
        "the cluster to fence node1 and settle",
        Duration::from_secs(180),
        POLL,
        || {
            polls += 1;
            for name in VMS {
                most = most.max(lab.qemu_processes(name).len());
            }
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
            (dc_idle(&lab, 3) && p.values().all(Option::is_some)).then_some(p)
        },
    )
    .unwrap();
    println!(
        "after zone s1/a lost its only host {victim} ({:.1} s): {after:?}; at most {most} QEMU per VM in {polls} polls",
        t.elapsed().as_secs_f64()
    );
    assert!(most <= 1, "a VM ran on two hosts at once");
    assert_eq!(after, predicted, "the cluster did what what-if said");
    assert_eq!(after["hi"], Some(h(2)), "hi took the nearest free room");
    assert_eq!(after["mid"], Some(h(3)), "mid took the room left at the other site");
    assert_eq!(after["lo"], Some(h(3)), "lo kept running where it ran");
    assert_eq!(
        lab.qemu_processes("lo"),
        lo_qemu,
        "lo's QEMU is the same process: never restarted"
    );
    lab.power_on(1).unwrap();
}
