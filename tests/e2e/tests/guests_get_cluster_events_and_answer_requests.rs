//! Guests take part in the cluster through the vmha guest channel (vmha-guest and the lab image's test
//! hooks inside every VM): when a host dies, every surviving VM's membership hook runs within 2 s of
//! Pacemaker noticing; requests come back done, refused with the guest's reason, or failed when the hook
//! overruns its deadline; and a guest flooding the channel with garbage and oversized lines neither slows
//! vmhad down nor fills its log (each problem is logged once, naming the VM).

use std::time::{Duration, Instant};

use vmha_e2e::{guest_agent, guest_uptime, hook_log, wait_running, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::VmAgent;
use vmha_lab::{power, wait_for, Lab};

const VMS: [&str; 2] = ["gvm1", "gvm2"];

/// What the guest's test hooks recorded: (guest uptime, hook directory, message).
fn seen(lab: &Lab, n: u8, vm: &str) -> Vec<(f64, String, serde_json::Value)> {
    hook_log(lab, n, vm).unwrap_or_default()
}

/// The guest's clock against ours: host time (seconds since the epoch) minus guest uptime, and the
/// uncertainty of that offset (half the round trip of the reading).
fn guest_clock(lab: &Lab, n: u8, vm: &str) -> (f64, f64) {
    let before = power::now();
    let up = guest_uptime(lab, n, vm).unwrap();
    let after = power::now();
    ((before + after) / 2.0 - up, (after - before) / 2.0)
}

/// `vmha --output json vm request VM REQUEST ...` on host `n`: (exit code, JSON or error text).
fn request(lab: &Lab, n: u8, vm: &str, name: &str, timeout_ms: u32) -> (i32, serde_json::Value, String) {
    let t = timeout_ms.to_string();
    let out = lab
        .exec(
            n,
            &[
                "vmha",
                "--output",
                "json",
                "vm",
                "request",
                vm,
                name,
                "--timeout-ms",
                &t,
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn vmhad_log(lab: &Lab, n: u8) -> String {
    std::fs::read_to_string(lab.cfg.host_dir(n).join("var-log-vmha/vmhad.log")).unwrap_or_default()
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn guests_get_cluster_events_and_answer_requests() {
    let lab = vmha_e2e::lab_with_vmhad();
    for vm in VMS {
        lab.add_vm(&GuestSpec::new(vm), VmAgent::Vmha).unwrap();
    }
    let hosts: Vec<u8> = VMS
        .iter()
        .map(|vm| wait_running(&lab, vm, Duration::from_secs(180)))
        .collect();
    // Every guest's channel is up: vmhad sends the membership when it connects.
    for (vm, &n) in VMS.iter().zip(&hosts) {
        wait_for(
            &format!("{vm}'s first membership event"),
            Duration::from_secs(120),
            POLL,
            || {
                seen(&lab, n, vm)
                    .iter()
                    .any(|(_, hook, _)| hook == "membership")
                    .then_some(())
            },
        )
        .unwrap();
    }

    // (b) Requests: done, refused with the reason, failed at the deadline.
    let (vm, n) = (VMS[0], hosts[0]);
    let started = Instant::now();
    let (code, ok, err) = request(&lab, n, vm, "test-ok", 5000);
    println!("test-ok: {ok} in {:?}", started.elapsed());
    assert_eq!((code, ok["result"].as_str()), (0, Some("done")), "{err}");
    let (code, refused, err) = request(&lab, n, vm, "test-refuse", 5000);
    println!("test-refuse: {refused}");
    assert_eq!(
        (code, refused["result"].as_str(), refused["reason"].as_str()),
        (1, Some("refused"), Some("test-refuse says no")),
        "{err}"
    );
    let started = Instant::now();
    let (code, slow, err) = request(&lab, n, vm, "test-slow", 2000);
    let took = started.elapsed();
    println!("test-slow: {slow} in {took:?}");
    assert_eq!((code, slow["result"].as_str()), (1, Some("failed")), "{err}");
    assert!(slow["reason"].as_str().unwrap_or("").contains("timed out"), "{slow}");
    assert!(took < Duration::from_secs(5), "test-slow took {took:?}");
    let elsewhere = lab.cfg.host_numbers().find(|&h| h != n).unwrap();
    // Any host's vmhad takes the request: the one where the VM runs answers through the relay.
    let (code, relayed, err) = request(&lab, elsewhere, vm, "test-ok", 5000);
    println!("from {}: {relayed}", lab.cfg.host_name(elsewhere));
    assert_eq!((code, relayed["result"].as_str()), (0, Some("done")), "{err}");

    // (c) A guest floods the channel: vmhad stays responsive and logs each problem once.
    let vmhad_pid = lab.exec_ok(n, &["cat", "/run/vmhad.pid"]).unwrap();
    let exec = serde_json::json!({"execute": "guest-exec",
        "arguments": {"path": "/usr/sbin/vmha-guest-flood", "capture-output": true}});
    let flood_pid = guest_agent(&lab, n, vm, &exec).unwrap()["pid"].as_i64().unwrap();
    let flood_status = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": flood_pid}});
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    let flood_started = Instant::now();
    loop {
        let t = Instant::now();
        lab.exec_ok(n, &["vmha", "status"]).unwrap();
        slowest = slowest.max(t.elapsed());
        answers += 1;
        let done = guest_agent(&lab, n, vm, &flood_status)
            .map(|r| r["exited"] == true)
            .unwrap_or(false);
        if done || flood_started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    println!(
        "flood ran {:?}; vmha status answered {answers} times meanwhile, slowest in {slowest:?}",
        flood_started.elapsed()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "vmha status took {slowest:?} during the flood"
    );
    // vmha-guest comes back (the flood script stopped it) and the channel works again.
    wait_for(
        "the channel to work again after the flood",
        Duration::from_secs(60),
        POLL,
        || {
            let (code, r, _) = request(&lab, n, vm, "test-ok", 5000);
            (code == 0 && r["result"] == "done").then_some(())
        },
    )
    .unwrap();
    assert_eq!(
        lab.exec_ok(n, &["cat", "/run/vmhad.pid"]).unwrap(),
        vmhad_pid,
        "vmhad survived"
    );
    let log = vmhad_log(&lab, n);
    for problem in ["invalid message", "oversized line", "rate limit"] {
        let needle = format!("guest channel of VM {vm}: {problem}");
        let count = log.lines().filter(|l| l.contains(&needle)).count();
        println!("vmhad.log on {}: {count} x {needle:?}", lab.cfg.host_name(n));
        assert_eq!(count, 1, "{needle:?} logged {count} times");
    }

    // (a) A host without VMs dies: every VM's membership hook runs within 2 s of Pacemaker noticing.
    let victim = lab
        .cfg
        .host_numbers()
        .find(|h| !hosts.contains(h))
        .expect("a host without VMs");
    let victim_name = lab.cfg.host_name(victim);
    let clocks: Vec<(f64, f64)> = VMS
        .iter()
        .zip(&hosts)
        .map(|(vm, &n)| guest_clock(&lab, n, vm))
        .collect();
    let observer = hosts[0];
    lab.power_off(victim).unwrap();
    let pcmk_time = wait_for(
        "Pacemaker to notice the host is gone",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let s = lab.status(observer).ok()?;
            (!s.node(&victim_name)?.online).then(power::now)
        },
    )
    .unwrap();
    for ((vm, &n), (offset, uncertainty)) in VMS.iter().zip(&hosts).zip(clocks) {
        let (up, msg) = wait_for(
            &format!("{vm}'s hook to see {victim_name} leave"),
            Duration::from_secs(30),
            POLL,
            || {
                seen(&lab, n, vm).into_iter().find_map(|(up, hook, msg)| {
                    let left = msg["data"]["left"]
                        .as_array()?
                        .iter()
                        .any(|h| h == victim_name.as_str());
                    (hook == "membership" && left).then_some((up, msg))
                })
            },
        )
        .unwrap();
        let hook_time = offset + up;
        let lag = hook_time - pcmk_time;
        let sent = msg["data"]["time"].as_f64().unwrap_or(0.0) - pcmk_time;
        println!(
            "{vm} on {}: membership hook ran {lag:+.2} s (±{uncertainty:.2}) after crm_mon showed {victim_name} gone \
             (vmhad sent it {sent:+.2} s); members now {}",
            lab.cfg.host_name(n),
            msg["data"]["members"]
        );
        assert!(
            lag - uncertainty < 2.0,
            "{vm}'s hook ran {lag:.2} s after Pacemaker noticed"
        );
    }
}
