//! Elastic VM groups (`vmha group scale`): a group of the placement policy with a template and min/max
//! grows by live clones of its running template, each on a host that keeps the group apart, and shrinks
//! by asking its newest member's guest to drain and destroying it; a guest that refuses to drain keeps
//! its member; sizes outside min/max are refused with nothing changed. Scaling is a job of the DC's vmhad
//! (D-Bus ScaleGroup): asked on another host, it is relayed there and followed from where it was asked.

use std::path::Path;
use std::time::Duration;

use vmha_e2e::{guest_exec, hook_log, lab_with_vmhad, vmha_json, vmha_run, wait_running, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{wait_for, Lab};

const TPL: &str = "gweb";

/// The hooks a guest ran, in order, among `wanted`.
fn hooks(lab: &Lab, n: u8, vm: &str, wanted: &[&str]) -> Vec<String> {
    hook_log(lab, n, vm)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, hook, _)| hook)
        .filter(|h| wanted.contains(&h.as_str()))
        .collect()
}

/// The group's members as `vmha group list` reports them: (vm, host).
fn members(lab: &Lab) -> Vec<(String, Option<String>)> {
    let list = vmha_json(lab, 1, &["group", "list"]).unwrap();
    let group = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "web")
        .unwrap_or_else(|| panic!("group web listed: {list}"))
        .clone();
    group["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["vm"].as_str().unwrap().to_string(),
                m["host"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn names(m: &[(String, Option<String>)]) -> Vec<&str> {
    m.iter().map(|(v, _)| v.as_str()).collect()
}

fn cib(lab: &Lab) -> String {
    lab.exec_ok(1, &["cibadmin", "--query"]).unwrap()
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn elastic_group_scales_by_live_clones() {
    let lab = lab_with_vmhad();
    let shared = lab.cfg.shared_dir();
    let base = shared.join("gbase.qcow2");
    let disk = shared.join(format!("{TPL}.vda.qcow2"));
    vmha_lab::guest::disk_on_base(&base, &disk, "64M").unwrap();
    let spec = GuestSpec::new(TPL).with_disk_and_nic(Path::new(&disk), "52:54:00:c1:00:01");
    lab.add_vm(&spec, VmAgent::Vmha).unwrap();
    let a = wait_running(&lab, TPL, Duration::from_secs(120));
    wait_for("the template's guest channel", Duration::from_secs(90), POLL, || {
        let (code, _, _) = vmha_run(&lab, 1, &["vm", "request", TPL, "test-ok", "--timeout-ms", "5000"]);
        (code == 0).then_some(())
    })
    .unwrap();

    // The group: the template alone, at most 3, never two members on one host.
    let policy = serde_json::json!({
        "vms": {TPL: {"priority": 10}},
        "groups": {"web": {"members": [TPL], "template": TPL, "min": 1, "max": 3, "anti_affinity": "host"}}
    });
    let file = shared.join("group-policy.json");
    std::fs::write(&file, policy.to_string()).unwrap();
    lab.exec_ok(1, &["vmha", "policy", "set", file.to_str().unwrap()])
        .unwrap();
    lab.exec_ok(1, &["vmha", "policy", "apply"]).unwrap();
    assert_eq!(members(&lab), [(TPL.to_string(), Some(lab.cfg.host_name(a)))]);

    // The DC's vmhad runs scale jobs; `other` is a host that is not the DC.
    let dc = lab.status_from_any().unwrap().dc.unwrap();
    let d = lab.cfg.host_number(&dc).unwrap();
    let other = lab.cfg.host_numbers().find(|&n| n != d).unwrap();

    // Out of bounds, or no such group: refused (by the DC's vmhad, with its class), nothing changes.
    let before = cib(&lab);
    for (n, size) in [(other, "4"), (1, "0")] {
        let (code, _, err) = vmha_run(&lab, n, &["group", "scale", "web", size]);
        assert_eq!(code, 3, "scale to {size} must be refused as InvalidArgument: {err}");
        assert!(err.contains("outside its bounds (min 1, max 3)"), "{err}");
    }
    let (code, _, err) = vmha_run(&lab, other, &["group", "scale", "nosuch", "2"]);
    assert_eq!(code, 7, "an unknown group is UnknownGroup: {err}");
    assert!(err.contains("no group nosuch"), "{err}");
    let after = cib(&lab);
    let config = |c: &str| c[c.find("<configuration>").unwrap()..c.find("</configuration>").unwrap()].to_string();
    assert_eq!(config(&before), config(&after), "a refused scale changes nothing");

    // Grow by 2: two live clones, each on a host of its own. Asked on a host that is not the DC: the DC's
    // vmhad runs the job and the CLI follows it through its own vmhad.
    let (code, out, err) = vmha_run(&lab, other, &["group", "scale", "web", "3"]);
    assert_eq!(code, 0, "scale up failed: {err}");
    println!("{}{}", err.trim(), out.trim());
    assert!(out.contains("1 -> 3 members"), "{out}");
    assert!(
        err.contains(&format!("running in vmhad on {dc}, the DC")),
        "the CLI follows the DC's job: {err}"
    );
    let dc_log = lab
        .exec_ok(
            d,
            &[
                "grep",
                "-c",
                "running a scale job asked for by node",
                "/var/log/vmha/vmhad.log",
            ],
        )
        .unwrap_or_default();
    assert!(
        dc_log.trim().parse::<u32>().unwrap_or(0) >= 1,
        "the DC's vmhad took the relayed scale job"
    );
    let json = vmha_json(&lab, other, &["group", "scale", "web", "3"]).unwrap();
    assert_eq!(
        (json["group"].as_str(), json["from"].as_u64(), json["size"].as_u64()),
        (Some("web"), Some(3), Some(3)),
        "the job's summary reaches the host that asked: {json}"
    );
    let m = members(&lab);
    assert_eq!(names(&m), [TPL, "web-1", "web-2"]);
    let mut hosts: Vec<u8> = Vec::new();
    for vm in [TPL, "web-1", "web-2"] {
        hosts.push(wait_running(&lab, vm, Duration::from_secs(60)));
    }
    let mut distinct = hosts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "anti-affinity keeps the members on 3 hosts: {hosts:?}"
    );
    for (i, vm) in ["web-1", "web-2"].iter().enumerate() {
        let seen = hooks(&lab, hosts[i + 1], vm, &["prepare-clone", "resume", "post-clone"]);
        assert_eq!(seen.last().map(String::as_str), Some("post-clone"), "{vm}: {seen:?}");
    }
    assert_eq!(
        hooks(&lab, a, TPL, &["prepare-clone", "resume"]),
        ["prepare-clone", "resume", "prepare-clone", "resume"],
        "the template prepared and resumed once per clone"
    );
    let c = cib(&lab);
    for pair in ["web-1", "web-2"] {
        assert!(
            c.contains(&format!("rsc=\"{pair}\"")) && c.contains("vmha-policy-apart-web-"),
            "the policy keeps {pair} apart from the other members"
        );
    }
    assert!(
        c.contains("id=\"vmha-policy-meta-web-1\""),
        "web-1 has the template's priority from the policy"
    );

    // Shrink by 1: the newest member's guest refuses to drain -> it stays.
    let newest = hosts[2];
    guest_exec(
        &lab,
        newest,
        "web-2",
        "/bin/touch",
        &["/run/vmha-guest/refuse-drain"],
        Duration::from_secs(10),
    )
    .unwrap();
    let (code, _, err) = vmha_run(&lab, 1, &["group", "scale", "web", "2"]);
    assert_eq!(code, 11, "a refused drain is GuestRefused: {err}");
    assert!(
        err.contains("sessions still open"),
        "the guest's reason reaches the caller: {err}"
    );
    assert_eq!(names(&members(&lab)), [TPL, "web-1", "web-2"]);
    assert_eq!(wait_running(&lab, "web-2", Duration::from_secs(10)), newest);

    // It drains: the newest member leaves, its domain, resource and overlay are gone.
    guest_exec(
        &lab,
        newest,
        "web-2",
        "/bin/rm",
        &["-f", "/run/vmha-guest/refuse-drain"],
        Duration::from_secs(10),
    )
    .unwrap();
    let (code, out, err) = vmha_run(&lab, 1, &["group", "scale", "web", "2"]);
    assert_eq!(code, 0, "scale down failed: {err}");
    assert!(out.contains("3 -> 2 members"), "{out}");
    assert_eq!(names(&members(&lab)), [TPL, "web-1"]);
    wait_for("web-2 gone", Duration::from_secs(60), POLL, || {
        let gone = lab.qemu_processes("web-2").is_empty()
            && !cib(&lab).contains("\"web-2\"")
            && !shared.join("web-2.xml").exists()
            && !shared.join("web-2.vda.qcow2").exists();
        gone.then_some(())
    })
    .unwrap();
    // The others run on.
    assert_eq!(wait_running(&lab, TPL, Duration::from_secs(10)), a);
    assert_eq!(wait_running(&lab, "web-1", Duration::from_secs(10)), hosts[1]);
    let (code, out, _) = vmha_run(&lab, 1, &["group", "scale", "web", "2"]);
    assert_eq!(code, 0);
    assert!(out.contains("has 2 members already"), "{out}");

    // The autoscale rule: busy members -> one more; idle -> one fewer; only the DC's host acts.
    let mut p = policy.clone();
    p["groups"]["web"]["members"] = serde_json::json!([TPL, "web-1"]);
    p["vms"]["web-1"] = serde_json::json!({"priority": 10});
    p["groups"]["web"]["autoscale"] = serde_json::json!({"cpu_above": 50, "cpu_below": 15});
    std::fs::write(&file, p.to_string()).unwrap();
    lab.exec_ok(1, &["vmha", "policy", "set", file.to_str().unwrap()])
        .unwrap();
    let busy = ["-c", "while :; do :; done > /dev/null 2>&1 & echo $! > /run/busy.pid"];
    for (vm, n) in [(TPL, a), ("web-1", hosts[1])] {
        guest_exec(&lab, n, vm, "/bin/sh", &busy, Duration::from_secs(10)).unwrap();
    }
    let (code, out, err) = vmha_run(&lab, other, &["group", "autoscale", "--only-on-dc"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is not the DC"), "{out}");
    let (code, out, err) = vmha_run(&lab, d, &["group", "autoscale", "--sample-secs", "3", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("scale up to 3"), "busy members: {out}");
    assert_eq!(names(&members(&lab)), [TPL, "web-1"], "a dry run changes nothing");
    let (code, out, err) = vmha_run(&lab, d, &["group", "autoscale", "--only-on-dc", "--sample-secs", "3"]);
    assert_eq!(code, 0, "autoscale up failed: {err}");
    println!("{}", out.trim());
    assert!(out.contains("2 -> 3 members"), "{out}");
    let grown = members(&lab);
    assert_eq!(names(&grown).len(), 3, "{grown:?}");
    let newest = grown[2].0.clone();
    let newest_host = wait_running(&lab, &newest, Duration::from_secs(60));
    // The clone carries the template's busy loop (and its pid file): stop it everywhere.
    let calm = ["-c", "kill $(cat /run/busy.pid)"];
    for (vm, n) in [(TPL, a), ("web-1", hosts[1]), (newest.as_str(), newest_host)] {
        guest_exec(&lab, n, vm, "/bin/sh", &calm, Duration::from_secs(10)).unwrap();
    }
    let (code, out, err) = vmha_run(&lab, d, &["group", "autoscale", "--only-on-dc", "--sample-secs", "3"]);
    assert_eq!(code, 0, "autoscale down failed: {err}");
    println!("{}", out.trim());
    assert!(out.contains("3 -> 2 members"), "{out}");
    assert_eq!(names(&members(&lab)), [TPL, "web-1"]);
    wait_for("the newest member gone", Duration::from_secs(60), POLL, || {
        (lab.qemu_processes(&newest).is_empty() && !cib(&lab).contains(&format!("\"{newest}\""))).then_some(())
    })
    .unwrap();
}
