//! The relay between vmhads (CPG group `vmhad-relay`) is authenticated: a process that Corosync admits
//! without being vmhad (here a non-root user in group haclient, admitted by the lab's `uidgid` setting, as
//! Debian's pacemaker sets it up) joins the group and tries what the relay carries: starting a clone
//! (bare, and with a made-up MAC), a guest request to a VM, completing a legitimate request that is in
//! flight (a guest request whose hook takes longer than the attack), and replaying genuine messages it
//! captured. Every attempt is refused and logged by every vmhad with its reason, nothing is created (no
//! clone domain, no resource, the guest's hook does not run again), the legitimate caller gets the
//! guest's real answer, and the relay still works afterwards.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use vmha_agent::envelope::{self, Envelope, Key};
use vmha_e2e::{domains, hook_log, wait_running, POLL};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::{target_binary, VmAgent};
use vmha_lab::{wait_for, Lab};

const VM: &str = "rvm1";
const GROUP: &str = "vmhad-relay";
const INTRUDER: &str = "vmha-intruder";
const INJECT: &str = "/usr/local/bin/cpg-inject";
/// Inside the hosts; the lab keeps each host's /var/log/vmha in its directory (`var-log-vmha`).
const CAPTURE: &str = "/var/log/vmha/intruder-capture.jsonl";

fn vmhad_log(lab: &Lab, n: u8) -> String {
    std::fs::read_to_string(lab.cfg.host_dir(n).join("var-log-vmha/vmhad.log")).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `vmha --output json vm request VM NAME` on host `n`: (exit code, JSON).
fn request(lab: &Lab, n: u8, name: &str, timeout_ms: u32) -> (i32, Value) {
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
                VM,
                name,
                "--timeout-ms",
                &t,
            ],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
    )
}

/// Runs `cpg-inject send` as the intruder on host `n`: the payloads are multicast in the relay group.
fn inject(lab: &Lab, n: u8, payloads: &[Vec<u8>]) -> Value {
    let hexes: Vec<String> = payloads.iter().map(|p| hex(p)).collect();
    let mut args = vec!["runuser", "-u", INTRUDER, "--", INJECT, "send", GROUP];
    args.extend(hexes.iter().map(String::as_str));
    let out = lab.exec(n, &args).unwrap();
    assert!(
        out.status.success(),
        "Corosync must admit the intruder (group haclient) for this test to mean anything: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("")).unwrap()
}

/// What the intruder's listener captured: (CPG node id, pid, bytes).
fn captured(lab: &Lab, n: u8) -> Vec<(u32, u32, Vec<u8>)> {
    let text =
        std::fs::read_to_string(lab.cfg.host_dir(n).join("var-log-vmha/intruder-capture.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                u32::try_from(v["nodeid"].as_u64()?).ok()?,
                u32::try_from(v["pid"].as_u64()?).ok()?,
                unhex(v["hex"].as_str()?),
            ))
        })
        .collect()
}

/// A captured message opened with the lab's key (the test plays the operator reading the traffic; the
/// intruder has no key): its envelope and body.
fn opened(key: &Key, raw: &[u8]) -> Option<(Envelope, Value)> {
    let e = envelope::open(key, raw).ok()?;
    let body = serde_json::from_slice(&e.body).ok()?;
    Some((e, body))
}

/// An envelope sealed with a made-up key, claiming to come from `nodeid`/`host`.
fn made_up_mac(nodeid: u32, host: &str, body: &Value) -> Vec<u8> {
    let mut bytes = [0u8; 32];
    bytes
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i as u8).wrapping_mul(37) ^ 0x5a);
    let key = Key::from_file_bytes(&bytes).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    envelope::seal(
        &key,
        &Envelope {
            nodeid,
            pid: 1,
            host: host.to_string(),
            session: [0x42; envelope::SESSION_LEN],
            seq: 1_000_000,
            time_ms: u64::try_from(now).unwrap(),
            body: serde_json::to_vec(body).unwrap(),
        },
    )
    .unwrap()
}

/// The relay's drop lines about messages from node `nodeid` in host `n`'s vmhad log after `from` bytes,
/// counted by reason.
fn drops(lab: &Lab, n: u8, from: usize, nodeid: u32) -> BTreeMap<&'static str, usize> {
    let log = vmhad_log(lab, n);
    let needle = format!("relay: dropped a message from node {nodeid} ");
    let mut by_reason = BTreeMap::new();
    for line in log.get(from..).unwrap_or("").lines().filter(|l| l.contains(&needle)) {
        for (reason, text) in [
            ("bad magic", "not a relay envelope"),
            ("bad MAC", "bad MAC"),
            ("wrong node", "it claims node id"),
            ("wrong pid", "it claims PID"),
        ] {
            if line.contains(text) {
                *by_reason.entry(reason).or_insert(0) += 1;
            }
        }
    }
    by_reason
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn relay_rejects_forged_messages() {
    let lab = vmha_e2e::lab_with_vmhad();
    lab.add_vm(&GuestSpec::new(VM), VmAgent::Vmha).unwrap();
    let vm_host = wait_running(&lab, VM, Duration::from_secs(180));
    let asker = lab.cfg.host_numbers().find(|&h| h != vm_host).unwrap();
    let status = lab.status(vm_host).unwrap();
    let dc = status.dc.clone().expect("a DC");
    let key = Key::from_file_bytes(&std::fs::read(lab.authkey().unwrap()).unwrap()).unwrap();
    println!(
        "{VM} runs on {}, requests come from {}, DC {dc}, authkey fingerprint {}",
        lab.cfg.host_name(vm_host),
        lab.cfg.host_name(asker),
        key.fingerprint()
    );
    // The guest channel is up and the relay works: a request from another host is answered.
    wait_for(
        "a relayed guest request to work",
        Duration::from_secs(120),
        POLL,
        || {
            let (code, r) = request(&lab, asker, "test-ok", 5000);
            (code == 0 && r["result"] == "done").then_some(())
        },
    )
    .unwrap();

    // The intruder: a non-root user of group haclient on the VM's host, with the CPG tool.
    let tool = target_binary("examples/cpg-inject").expect("the workspace's examples are built");
    lab.install(vm_host, &tool, INJECT, "0755").unwrap();
    lab.exec_ok(
        vm_host,
        &[
            "sh",
            "-c",
            &format!("id {INTRUDER} >/dev/null 2>&1 || useradd --system --no-create-home --gid haclient --shell /usr/sbin/nologin {INTRUDER}"),
        ],
    )
    .unwrap();
    let id = lab.exec_ok(vm_host, &["runuser", "-u", INTRUDER, "--", "id"]).unwrap();
    println!("intruder: {}", id.trim());
    assert!(!id.contains("uid=0(") && id.contains("(haclient)"), "{id}");
    lab.exec_ok(
        vm_host,
        &[
            "sh",
            "-c",
            &format!("setsid runuser -u {INTRUDER} -- {INJECT} listen {GROUP} 600 > {CAPTURE} 2>&1 < /dev/null &"),
        ],
    )
    .unwrap();
    let capture = lab.cfg.host_dir(vm_host).join("var-log-vmha/intruder-capture.jsonl");
    if let Err(e) = wait_for("the intruder's listener to join", Duration::from_secs(60), POLL, || {
        std::fs::read_to_string(&capture)
            .ok()?
            .contains("\"joined\"")
            .then_some(())
    }) {
        let ps = lab
            .exec(vm_host, &["ps", "-ef"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        panic!(
            "{e}: its output: {:?}; processes: {ps:?}",
            std::fs::read_to_string(&capture)
        );
    }
    let hook_runs = |name: &str| {
        hook_log(&lab, vm_host, VM)
            .unwrap()
            .iter()
            .filter(|(_, hook, _)| hook == name)
            .count()
    };
    // A genuine exchange for the intruder to capture.
    let (code, r) = request(&lab, asker, "test-ok", 5000);
    assert_eq!((code, r["result"].as_str()), (0, Some("done")), "{r}");
    let genuine = wait_for(
        "the intruder to capture a request and its result",
        Duration::from_secs(30),
        POLL,
        || {
            let c = captured(&lab, vm_host);
            let of = |t: &str| {
                c.iter()
                    .rev()
                    .find(|(_, _, raw)| opened(&key, raw).is_some_and(|(_, b)| b["t"] == t))
                    .cloned()
            };
            Some((of("request")?, of("result")?))
        },
    )
    .unwrap();
    let test_ok_runs = hook_runs("test-ok");
    let logs: Vec<usize> = lab.cfg.host_numbers().map(|n| vmhad_log(&lab, n).len()).collect();
    let resources_before: Vec<String> = status.resources.iter().map(|r| r.id.clone()).collect();
    let domains_before: Vec<Vec<String>> = lab.cfg.host_numbers().map(|n| domains(&lab, n)).collect();

    // 1. Start a clone on the DC: a bare message (the relay's old format), and one with a made-up MAC.
    let dc_node = lab.cfg.host_numbers().find(|&n| lab.cfg.host_name(n) == dc).unwrap();
    let clone_start = json!({"t": "clone-start", "id": 777, "from": dc_node, "host": dc,
        "spec": {"template": VM, "name": "intruder-clone", "host": null, "count": 1, "force": true}});
    let me = inject(
        &lab,
        vm_host,
        &[
            serde_json::to_vec(&clone_start).unwrap(),
            made_up_mac(u32::from(dc_node), &dc, &clone_start),
        ],
    );
    let intruder_node = u32::try_from(me["nodeid"].as_u64().unwrap()).unwrap();
    println!("intruder joined as node {intruder_node}, pid {}", me["pid"]);

    // 2. A guest request to the VM, as if from the asking host.
    let asker_name = lab.cfg.host_name(asker);
    let guest_request = json!({"t": "request", "id": 778, "host": lab.cfg.host_name(vm_host), "vm": VM,
        "name": "test-ok", "data": "{}", "timeout_ms": 5000, "expect": false});
    inject(
        &lab,
        vm_host,
        &[
            serde_json::to_vec(&guest_request).unwrap(),
            made_up_mac(u32::from(asker), &asker_name, &guest_request),
        ],
    );

    // 3. Complete a legitimate request in flight: test-slow's hook outlasts its deadline (the guest's real
    // answer is "failed", timed out); the intruder answers "done" for it first.
    let slow_out = "/var/log/vmha/slow-request.json";
    lab.exec_ok(
        asker,
        &[
            "sh",
            "-c",
            &format!(
                "setsid vmha --output json vm request {VM} test-slow --timeout-ms 15000 > {slow_out} 2>&1 < /dev/null &"
            ),
        ],
    )
    .unwrap();
    let (pending_id, requester) = wait_for(
        "the intruder to see the test-slow request",
        Duration::from_secs(30),
        POLL,
        || {
            captured(&lab, vm_host).iter().find_map(|(nodeid, _, raw)| {
                let (_, body) = opened(&key, raw)?;
                (body["t"] == "request" && body["name"] == "test-slow").then(|| (body["id"].as_u64().unwrap(), *nodeid))
            })
        },
    )
    .unwrap();
    let forged_result = json!({"t": "result", "id": pending_id, "to": requester, "outcome": "done",
        "reason": "forged by the intruder"});
    inject(
        &lab,
        vm_host,
        &[
            serde_json::to_vec(&forged_result).unwrap(),
            made_up_mac(u32::from(vm_host), &lab.cfg.host_name(vm_host), &forged_result),
        ],
    );

    // 4. Replay the genuine request and result it captured.
    inject(&lab, vm_host, &[genuine.0 .2.clone(), genuine.1 .2.clone()]);

    // Every vmhad refused and logged each attempt with its reason.
    let expected = [("bad magic", 3), ("bad MAC", 3)];
    for (i, n) in lab.cfg.host_numbers().enumerate() {
        let seen = wait_for(
            &format!("vmhad on {} to log every refusal", lab.cfg.host_name(n)),
            Duration::from_secs(30),
            POLL,
            || {
                let d = drops(&lab, n, logs[i], intruder_node);
                let replays = d.get("wrong node").unwrap_or(&0) + d.get("wrong pid").unwrap_or(&0);
                (expected.iter().all(|(r, c)| d.get(r).unwrap_or(&0) >= c) && replays >= 2).then_some(d)
            },
        )
        .unwrap();
        println!("vmhad on {}: dropped {seen:?}", lab.cfg.host_name(n));
        let log = vmhad_log(&lab, n);
        let new = &log[logs[i]..];
        assert!(!new.contains("running a clone job"), "{new}");
    }
    // The replayed request came from another node than its sender's; the replayed result from another
    // process on the sender's node.
    let d = drops(&lab, vm_host, logs[(vm_host - 1) as usize], intruder_node);
    assert!(d.contains_key("wrong node") && d.contains_key("wrong pid"), "{d:?}");

    // The legitimate caller gets the guest's real answer, not the forged one.
    let slow = wait_for("the test-slow request to end", Duration::from_secs(60), POLL, || {
        let text = std::fs::read_to_string(lab.cfg.host_dir(asker).join("var-log-vmha/slow-request.json")).ok()?;
        serde_json::from_str::<Value>(text.trim()).ok()
    })
    .unwrap();
    println!("test-slow from {asker_name}: {slow}");
    assert_eq!(slow["result"], "failed", "{slow}");
    assert!(slow["reason"].as_str().unwrap_or("").contains("timed out"), "{slow}");

    // Nothing was created or run: no clone domain or resource, the test-ok hook did not run again.
    assert_eq!(
        hook_runs("test-ok"),
        test_ok_runs,
        "a forged or replayed request ran the guest's hook"
    );
    let resources_after: Vec<String> = lab
        .status(vm_host)
        .unwrap()
        .resources
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(resources_after, resources_before);
    let domains_after: Vec<Vec<String>> = lab.cfg.host_numbers().map(|n| domains(&lab, n)).collect();
    assert_eq!(domains_after, domains_before);

    // The relay still works for vmhads.
    let (code, r) = request(&lab, asker, "test-ok", 5000);
    assert_eq!((code, r["result"].as_str()), (0, Some("done")), "{r}");
    assert_eq!(hook_runs("test-ok"), test_ok_runs + 1);
}
