//! The lab cluster forms with fencing on and elects a DC; when the DC host dies it is fenced, the
//! survivors elect a new DC, and the fenced host comes back and rejoins.

use std::time::Duration;

use vmha_e2e::{Timeline, POLL};
use vmha_lab::wait_for;

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn cluster_forms_and_a_new_dc_is_elected_when_the_dc_host_dies() {
    let lab = vmha_e2e::lab();

    // Every host sees the same three members and the same DC, with quorum and a running fence device.
    let first = lab.status(1).unwrap();
    let dc = first.dc.clone().expect("a DC is elected");
    for n in lab.cfg.host_numbers() {
        let s = lab.status(n).unwrap();
        assert_eq!(
            s.online_nodes(),
            vec!["node1", "node2", "node3"],
            "members seen from node{n}"
        );
        assert_eq!(s.dc.as_deref(), Some(dc.as_str()), "DC seen from node{n}");
        assert!(s.quorate, "node{n} has quorum");
    }
    assert_eq!(
        lab.exec_ok(
            1,
            &[
                "crm_attribute",
                "--type",
                "crm_config",
                "--name",
                "stonith-enabled",
                "--query",
                "--quiet"
            ]
        )
        .unwrap()
        .trim(),
        "true"
    );
    assert!(first.running_on("fence-lab").is_some(), "fence device runs");

    // Each host is a host of its own: its own name and its own D-Bus system bus; host names resolve.
    let mut bus_ids = Vec::new();
    for n in lab.cfg.host_numbers() {
        assert_eq!(lab.exec_ok(n, &["hostname"]).unwrap().trim(), format!("node{n}"));
        let reply = lab
            .exec_ok(
                n,
                &[
                    "dbus-send",
                    "--system",
                    "--print-reply",
                    "--dest=org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus.GetId",
                ],
            )
            .unwrap();
        let id = reply
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("node{n}'s system bus answers GetId: {reply}"));
        bus_ids.push(id.to_string());
        let resolved = lab.exec_ok(n, &["getent", "hosts", "node3"]).unwrap();
        assert!(
            resolved.starts_with(&format!("{} ", lab.cfg.host_address(3))),
            "node3 resolves on node{n}: {resolved}"
        );
    }
    bus_ids.sort();
    bus_ids.dedup();
    assert_eq!(bus_ids.len(), 3, "every host has its own system bus");

    // Kill the DC host.
    let victim = lab.cfg.host_number(&dc).unwrap();
    let observer = lab.other_host(victim).unwrap();
    let mut t = Timeline::start();
    lab.power_off(victim).unwrap();
    let new_dc = wait_for("a new DC", Duration::from_secs(60), POLL, || {
        let s = lab.status(observer).ok()?;
        if s.node(&dc).is_some_and(|n| !n.online) {
            t.mark("pacemaker sees the DC host offline");
        }
        s.dc.filter(|d| *d != dc)
    })
    .unwrap();
    t.mark("new DC elected");
    assert_ne!(new_dc, dc);
    assert_ne!(lab.cfg.host_number(&new_dc), Some(victim));
    for n in lab.cfg.host_numbers().filter(|&n| n != victim) {
        assert_eq!(
            lab.status(n).unwrap().dc.as_deref(),
            Some(new_dc.as_str()),
            "every survivor agrees on the DC"
        );
    }

    // The dead DC host is fenced (fencing is on: the power controller is asked to act on it) and rejoins.
    wait_for("the old DC host to be fenced", Duration::from_secs(60), POLL, || {
        lab.power_events()
            .into_iter()
            .find(|e| e.host == dc && e.result == "ok")
    })
    .unwrap();
    t.mark("old DC host fenced");
    wait_for(
        "the fenced host to rejoin",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let s = lab.status(observer).ok()?;
            (s.online_nodes().len() == 3).then_some(())
        },
    )
    .unwrap();
    t.mark("fenced host back online");
    t.print(&format!("DC {dc} killed; new DC {new_dc}:"));
}
