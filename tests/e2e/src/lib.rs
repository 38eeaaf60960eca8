//! Shared pieces of the lab scenarios in `tests/`: every scenario brings up its own lab (torn down by PID
//! when the test ends, also on panic) and measures what it proves.
//!
//! The scenarios need root and real daemons, so they are `#[ignore]`d in a plain `cargo test`; `ci/test`
//! runs them with `--ignored`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use base64::Engine as _;
use vmha_lab::{wait_for, Lab, LabConfig};

/// The scenarios' lab: `e2e` on 10.213.1.0/24, or `$VMHA_E2E_LAB` on `$VMHA_E2E_SUBNET` (so that two
/// engineers can run scenarios side by side).
pub fn config() -> LabConfig {
    let name = std::env::var("VMHA_E2E_LAB").unwrap_or_else(|_| "e2e".into());
    let subnet = std::env::var("VMHA_E2E_SUBNET").unwrap_or_else(|_| "10.213.1".into());
    with_test_timing(LabConfig::new(&name, 3, &subnet))
}

/// The Corosync token timeout of the scenarios' labs: `VMHA_E2E_TOKEN_MS`, by default 3000 ms
/// (Corosync's own default) with token_coefficient 0. The benchmarks keep 1000 ms; the scenarios
/// run on shared CI machines where a whole-machine stall of a second or more happens, and a
/// membership change it causes would be a failure the scenario did not set out to test.
pub fn token_ms() -> u32 {
    std::env::var("VMHA_E2E_TOKEN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// `cfg` with the scenarios' Corosync timing ([`token_ms`], token_coefficient 0).
pub fn with_test_timing(mut cfg: LabConfig) -> LabConfig {
    cfg.token_ms = Some(token_ms());
    cfg.token_coefficient = Some(0);
    cfg
}

/// Brings up a fresh 3-host lab for one scenario ([`config`]) with the workspace's build installed in
/// every host.
pub fn lab() -> Lab {
    vmha_lab::init_logging();
    let t0 = Instant::now();
    let lab = Lab::up(config()).expect("lab bring-up");
    println!(
        "lab up (3 hosts, quorate, DC elected, fencing on) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    lab.install_build(&release_build())
        .expect("installing the build into the hosts");
    lab
}

/// The release build of the workspace (what ships), which the scenarios install into the lab hosts:
/// `target/release` beside the running test binary's target directory.
pub fn release_build() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .expect("a cargo target directory");
    let dir = target.join("release");
    assert!(
        dir.join("vmha-ocf-virtualmachine").is_file() && dir.join("vmhad").is_file(),
        "{} lacks the release build: run cargo build --release --workspace --bins",
        dir.display()
    );
    dir
}

/// Waits until `vm` is started on exactly one host according to Pacemaker and exactly one QEMU process
/// runs it, on that host; returns the host number.
pub fn wait_running(lab: &Lab, vm: &str, limit: Duration) -> u8 {
    wait_for(&format!("{vm} running on one host"), limit, POLL, || {
        let s = lab.status_from_any().ok()?;
        let n = lab.cfg.host_number(s.running_on(vm)?)?;
        let qemus = lab.qemu_processes(vm);
        (qemus.len() == 1 && qemus[0].0 == n).then_some(n)
    })
    .unwrap()
}

/// Sends one qemu-guest-agent command to `vm` on host `n` (through libvirt) and returns its `return` value.
pub fn guest_agent(lab: &Lab, n: u8, vm: &str, command: &serde_json::Value) -> Result<serde_json::Value> {
    let out = lab.exec_ok(
        n,
        &[
            "virsh",
            "-c",
            "qemu:///system",
            "qemu-agent-command",
            vm,
            &command.to_string(),
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    v.get("return")
        .cloned()
        .ok_or_else(|| anyhow!("guest agent answered {v}"))
}

/// Runs `path args` inside `vm` (on host `n`) through qemu-guest-agent and returns its stdout (empty when
/// it printed nothing), waiting at most `limit` for it to finish.
pub fn guest_exec(lab: &Lab, n: u8, vm: &str, path: &str, args: &[&str], limit: Duration) -> Result<String> {
    let exec = serde_json::json!({"execute": "guest-exec",
        "arguments": {"path": path, "arg": args, "capture-output": true}});
    // Right after a migration or a start libvirt may not have seen the agent's channel connect yet
    // ("Guest agent is not responding: Guest agent not available for now"): that one refusal is waited out
    // within `limit`; any other error is returned at once.
    let deadline = Instant::now() + limit;
    let started = loop {
        match guest_agent(lab, n, vm, &exec) {
            Err(e) if agent_not_yet_connected(&e) && Instant::now() < deadline => std::thread::sleep(POLL),
            other => break other?,
        }
    };
    let pid = started["pid"]
        .as_i64()
        .ok_or_else(|| anyhow!("guest-exec gave no pid"))?;
    let status = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
    let done = wait_for(&format!("guest-exec {path} to finish"), limit, POLL, || {
        guest_agent(lab, n, vm, &status).ok().filter(|r| r["exited"] == true)
    })?;
    let Some(data) = done["out-data"].as_str() else {
        return Ok(String::new());
    };
    Ok(String::from_utf8(
        base64::engine::general_purpose::STANDARD.decode(data)?,
    )?)
}

/// Whether libvirt refused a guest-agent command only because the agent's channel is not connected (yet).
fn agent_not_yet_connected(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("Guest agent not available for now") || text.contains("Guest agent is not connected")
}

/// What the lab guest's test hooks recorded in `/run/vmha-guest/seen.log` (see `tests/lab/guest/build-guest`),
/// oldest first: (guest uptime, hook directory, message JSON). Lines that do not parse are skipped.
pub fn hook_log(lab: &Lab, n: u8, vm: &str) -> Result<Vec<(f64, String, serde_json::Value)>> {
    let text = guest_exec(
        lab,
        n,
        vm,
        "/bin/sh",
        &["-c", "cat /run/vmha-guest/seen.log 2>/dev/null; true"],
        Duration::from_secs(20),
    )?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            let up = parts.next()?.parse().ok()?;
            let hook = parts.next()?.to_string();
            let msg = serde_json::from_str(parts.next()?).ok()?;
            Some((up, hook, msg))
        })
        .collect())
}

/// Seconds since the guest's kernel booted, read inside the guest through qemu-guest-agent.
pub fn guest_uptime(lab: &Lab, n: u8, vm: &str) -> Result<f64> {
    let text = guest_exec(lab, n, vm, "/bin/cat", &["/proc/uptime"], Duration::from_secs(10))?;
    if text.is_empty() {
        bail!("guest-exec of cat /proc/uptime returned no output")
    }
    let first = text
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/uptime"))?;
    Ok(first.parse()?)
}

/// Location constraints `pcs resource move` / `crm_resource --move` leave behind (`cli-prefer-*`, `cli-ban-*`).
pub fn leftover_move_constraints(lab: &Lab, n: u8) -> Vec<String> {
    let xml = lab
        .exec_ok(n, &["cibadmin", "--query", "--scope", "constraints"])
        .unwrap();
    xml.lines()
        .filter(|l| l.contains("cli-prefer-") || l.contains("cli-ban-"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Poll interval of scenario checks.
pub const POLL: Duration = Duration::from_millis(100);

/// A stopwatch that records named moments of a scenario and prints them.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    marks: Vec<(String, Duration)>,
}

impl Timeline {
    pub fn start() -> Self {
        Timeline {
            start: Instant::now(),
            marks: Vec::new(),
        }
    }

    /// Records `what` as happening now (only the first time) and returns the time since the start.
    pub fn mark(&mut self, what: &str) -> Duration {
        if let Some((_, d)) = self.marks.iter().find(|(w, _)| w == what) {
            return *d;
        }
        let d = self.start.elapsed();
        self.marks.push((what.to_string(), d));
        d
    }

    pub fn get(&self, what: &str) -> Option<Duration> {
        self.marks.iter().find(|(w, _)| w == what).map(|(_, d)| *d)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn print(&self, title: &str) {
        println!("{title}");
        for (what, d) in &self.marks {
            println!("  {:>7.2} s  {what}", d.as_secs_f64());
        }
    }
}

const DETECTED: &str = "detected: corosync membership lost the host";

/// How a scenario takes a host out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFailure {
    /// Hard power-off: every process of the host dies at once.
    Crash,
    /// The host's network cable is pulled; the host itself keeps running until it is fenced.
    Partition,
}

/// Takes out the host running `vm` and proves the cluster's recovery: the host is fenced, the VM runs on
/// another host, and at no poll does more than one QEMU run the VM. Returns the timeline (detection,
/// fencing, restart, rejoin).
pub fn fail_vm_host_and_check_recovery(lab: &Lab, vm: &str, failure: HostFailure) -> Timeline {
    let host = wait_running(lab, vm, Duration::from_secs(120));
    let observer = lab.other_host(host).unwrap();
    let victim = lab.cfg.host_name(host);
    let fences_before = lab.power_events().len();

    let mut t = Timeline::start();
    match failure {
        HostFailure::Crash => lab.power_off(host).unwrap(),
        HostFailure::Partition => lab.cut_network(host).unwrap(),
    }
    t.mark("host failed");
    let fenced = |lab: &Lab| {
        lab.power_events()
            .iter()
            .skip(fences_before)
            .any(|e| e.host == victim && e.result == "ok")
    };
    let new_host = wait_for(
        &format!("{vm} restarted on another host"),
        Duration::from_secs(120),
        POLL,
        || {
            let qemus = lab.qemu_processes(vm);
            assert!(qemus.len() <= 1, "{vm} runs {} times at once: {qemus:?}", qemus.len());
            if t.get(DETECTED).is_none() {
                let members = lab.corosync_members(observer);
                if !members.is_empty() && !members.contains(&victim) {
                    t.mark(DETECTED);
                }
            }
            if fenced(lab) {
                t.mark("fenced: power controller confirmed");
            }
            let s = lab.status(observer).ok()?;
            let n = lab.cfg.host_number(s.running_on(vm)?)?;
            (n != host && qemus.len() == 1 && qemus[0].0 == n).then_some(n)
        },
    )
    .unwrap();
    t.mark(&format!("{vm} running on node{new_host}"));
    assert!(t.get(DETECTED).is_some(), "the failure was detected");
    assert!(fenced(lab), "the failed host was fenced before {vm} was recovered");
    if failure == HostFailure::Partition {
        lab.heal_network(host).unwrap();
    }

    // Stays exactly once while the fenced host comes back and rejoins.
    wait_for(
        "the fenced host to rejoin",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let qemus = lab.qemu_processes(vm);
            assert_eq!(qemus.len(), 1, "{vm} QEMU processes after recovery: {qemus:?}");
            (lab.status(observer).ok()?.online_nodes().len() == 3).then_some(())
        },
    )
    .unwrap();
    t.mark("fenced host back online");
    assert_eq!(lab.status(observer).unwrap().resource(vm).unwrap().nodes.len(), 1);
    t
}

/// Where the lab installs vmha's OCF agent in every host.
pub const VMHA_AGENT: &str = "/usr/lib/ocf/resource.d/vmha/VirtualMachine";

/// What one direct call of an OCF agent returned.
#[derive(Debug)]
pub struct AgentRun {
    pub rc: i32,
    pub stderr: String,
    pub elapsed: Duration,
}

impl AgentRun {
    /// The `ocf-exit-reason:` line the agent printed, if any.
    pub fn exit_reason(&self) -> Option<&str> {
        self.stderr.lines().find_map(|l| l.strip_prefix("ocf-exit-reason:"))
    }
}

/// Runs vmha's agent on host `n` outside Pacemaker, with the OCF environment Pacemaker would give it:
/// instance `instance`, `OCF_RESKEY_<k>=<v>` for each parameter, the operation timeout in ms and any
/// extra `CRM_meta` variables.
pub fn run_agent(
    lab: &Lab,
    n: u8,
    instance: &str,
    action: &str,
    params: &[(&str, &str)],
    timeout_ms: u32,
    meta: &[(&str, &str)],
) -> AgentRun {
    let mut args = vec![
        "env".to_string(),
        "OCF_ROOT=/usr/lib/ocf".into(),
        format!("OCF_RESOURCE_INSTANCE={instance}"),
        format!("OCF_RESKEY_CRM_meta_timeout={timeout_ms}"),
    ];
    args.extend(params.iter().map(|(k, v)| format!("OCF_RESKEY_{k}={v}")));
    args.extend(meta.iter().map(|(k, v)| format!("OCF_RESKEY_CRM_meta_{k}={v}")));
    args.push(VMHA_AGENT.into());
    args.push(action.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let out = lab
        .exec_with_deadline(n, &args, Duration::from_millis(u64::from(timeout_ms) + 30_000))
        .unwrap();
    AgentRun {
        rc: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: t0.elapsed(),
    }
}

/// Every libvirt domain host `n` knows (running or defined), sorted.
pub fn domains(lab: &Lab, n: u8) -> Vec<String> {
    let out = lab
        .exec_ok(n, &["virsh", "-c", "qemu:///system", "list", "--all", "--name"])
        .unwrap();
    let mut names: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Sends a signal to host `n`'s libvirtd (SIGSTOP makes it hang, SIGCONT resumes it).
pub fn signal_libvirtd(lab: &Lab, n: u8, signal: &str) {
    lab.exec_ok(n, &["sh", "-c", &format!("kill -{signal} $(cat /run/libvirtd.pid)")])
        .unwrap();
}

/// Brings up a lab with vmhad running on every host (the workspace's build installed first).
pub fn lab_with_vmhad() -> Lab {
    let lab = lab();
    for n in lab.cfg.host_numbers() {
        lab.start_vmhad(n).expect("starting vmhad");
    }
    lab
}

/// Placement scenarios' start: fencing stays on but a fenced host stays off (`stonith-action=off`), so an
/// outcome can be compared before the host returns; then `vms` are added stopped through `vmha vm add`.
pub fn add_stopped_vms_fenced_hosts_stay_off(lab: &Lab, vms: &[&str]) {
    lab.exec_ok(
        1,
        &[
            "crm_attribute",
            "--type",
            "crm_config",
            "--name",
            "stonith-action",
            "--update",
            "off",
        ],
    )
    .unwrap();
    for vm in vms {
        let xml = lab.write_domain_xml(&vmha_lab::guest::GuestSpec::new(vm)).unwrap();
        lab.exec_ok(
            1,
            &["vmha", "vm", "add", vm, "--config", xml.to_str().unwrap(), "--stopped"],
        )
        .unwrap();
    }
}

/// `vmha --timeout 180 ARGS` on host `n`: (exit code, stdout, stderr); an exec failure is exit code -1 with
/// the error as stderr.
pub fn vmha_run(lab: &Lab, n: u8, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["vmha", "--timeout", "180"];
    all.extend_from_slice(args);
    match lab.exec(n, &all) {
        Ok(out) => (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Err(e) => (-1, String::new(), e.to_string()),
    }
}

/// Runs the `vmha` CLI on host `n` with `--output json` and parses its output.
pub fn vmha_json(lab: &Lab, n: u8, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["vmha", "--output", "json"];
    all.extend_from_slice(args);
    let out = lab.exec_ok(n, &all)?;
    Ok(serde_json::from_str(&out)?)
}

/// Reads one document of `vmha --output json` into its schema type (`vmha_api::json`: unknown members
/// are refused), checking its version and kind: every read of the CLI's JSON in the scenarios is also a
/// test of the documented schema against the real daemons.
pub fn parse_document<T: serde::de::DeserializeOwned>(text: &str, kind: &str) -> Result<T> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    anyhow::ensure!(
        v["schema_version"] == vmha_api::json::SCHEMA_VERSION && v["kind"] == kind,
        "not a vmha JSON document of kind {kind} (schema {}): {text}",
        vmha_api::json::SCHEMA_VERSION
    );
    serde_json::from_value(v).map_err(|e| anyhow::anyhow!("{kind} does not follow the JSON schema: {e}: {text}"))
}

/// `vmha status --output json` on host `n`, typed.
pub fn vmha_status(lab: &Lab, n: u8) -> Result<vmha_api::json::Status> {
    parse_document(&lab.exec_ok(n, &["vmha", "--output", "json", "status"])?, "status")
}

/// `vmha vm show VM --output json` on host `n`, typed.
pub fn vmha_vm(lab: &Lab, n: u8, vm: &str) -> Result<vmha_api::json::Vm> {
    let shown: vmha_api::json::VmShow =
        parse_document(&lab.exec_ok(n, &["vmha", "--output", "json", "vm", "show", vm])?, "vm")?;
    Ok(shown.vm)
}

/// `vmha host list --output json` on host `n`, typed.
pub fn vmha_hosts(lab: &Lab, n: u8) -> Result<Vec<vmha_api::json::Host>> {
    let list: vmha_api::json::HostList = parse_document(
        &lab.exec_ok(n, &["vmha", "--output", "json", "host", "list"])?,
        "host_list",
    )?;
    Ok(list.hosts)
}

/// Runs the `vmha` CLI on host `n` as an unprivileged user (nobody), returning (exit code, stdout, stderr).
pub fn vmha_as_nobody(lab: &Lab, n: u8, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "vmha"];
    all.extend_from_slice(args);
    let out = lab.exec(n, &all).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Resident memory (KiB) and CPU time (clock ticks) of process `pid` inside host `n`.
pub fn process_usage(lab: &Lab, n: u8, pid: u32) -> (u64, u64) {
    let status = lab.exec_ok(n, &["cat", &format!("/proc/{pid}/status")]).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = lab.exec_ok(n, &["cat", &format!("/proc/{pid}/stat")]).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    (rss, ticks)
}

/// Every complete JSON line written to `path` so far (a line still being written is skipped): the
/// output of the event followers the scenarios run inside hosts.
pub fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The events whose `event` field is `kind`.
pub fn of_kind(events: &[serde_json::Value], kind: &str) -> Vec<serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).cloned().collect()
}

/// Whether an event's time stamp `t` (seconds since the epoch) is at or after `t0`.
pub fn after(event: &serde_json::Value, t0: f64) -> bool {
    event["t"].as_f64().is_some_and(|t| t >= t0)
}

/// `vmha ARGS` on host `n` with a deadline long enough for a virtual cluster's disks (600 s): (exit code,
/// stdout, stderr). Panics when the command cannot be run at all.
pub fn vmha_long(lab: &Lab, n: u8, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["vmha"];
    all.extend_from_slice(args);
    let out = lab.exec_with_deadline(n, &all, Duration::from_secs(600)).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`vmha_long`] that must succeed; its stdout.
pub fn vmha_long_ok(lab: &Lab, n: u8, args: &[&str]) -> String {
    let (code, out, err) = vmha_long(lab, n, args);
    assert_eq!(code, 0, "vmha {}: {out}{err}", args.join(" "));
    out
}

/// A lab guest of 96 MiB with a raw disk image `<vm>.img` on the lab's shared storage.
pub fn domain_with_raw_disk(lab: &Lab, vm: &str) -> String {
    let disk = lab.cfg.shared_dir().join(format!("{vm}.img"));
    vmha_lab::guest::GuestSpec {
        memory_mib: 96,
        ..vmha_lab::guest::GuestSpec::new(vm)
    }
    .domain_xml(&vmha_lab::guest::image_dir())
    .replace(
        "  <devices>\n",
        &format!(
            "  <devices>\n    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\n",
            disk.display()
        ),
    )
}

/// The SHA-256 of a file, by sha256sum (a tool independent of vmha).
pub fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Where each of `vms` runs according to Pacemaker (None: stopped), once none of them is between states;
/// `None` until then, and while QEMU does not run each VM exactly where Pacemaker says.
pub fn settled_placement(
    lab: &Lab,
    observer: u8,
    vms: &[&str],
) -> Option<std::collections::BTreeMap<String, Option<String>>> {
    let s = lab.status(observer).ok()?;
    let mut out = std::collections::BTreeMap::new();
    for vm in vms {
        let r = s.resource(vm)?;
        let host = match (r.active, r.role.as_str(), r.nodes.len()) {
            (true, "Started", 1) => Some(r.nodes[0].clone()),
            (false, "Stopped", 0) => None,
            _ => return None,
        };
        let expected: Vec<u8> = host.iter().filter_map(|h| lab.cfg.host_number(h)).collect();
        if lab.qemu_processes(vm).iter().map(|q| q.0).collect::<Vec<_>>() != expected {
            return None;
        }
        out.insert(vm.to_string(), host);
    }
    Some(out)
}

/// The DC's controller is idle (no transition running or pending), as `observer` sees it.
pub fn dc_idle(lab: &Lab, observer: u8) -> bool {
    let Some(dc) = lab.status(observer).ok().and_then(|s| s.dc) else {
        return false;
    };
    lab.exec_ok(observer, &["crmadmin", "--status", &dc])
        .is_ok_and(|out| out.contains("S_IDLE"))
}

/// Where `vmha what-if --output json` says each VM runs afterwards (None: stopped).
pub fn predicted_placement(p: &serde_json::Value) -> std::collections::BTreeMap<String, Option<String>> {
    p["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let host = match v["outcome"].as_str().unwrap() {
                "stays" => Some(v["host"].as_str().unwrap().to_string()),
                "moves" | "starts" => Some(v["to"].as_str().unwrap().to_string()),
                _ => None,
            };
            (v["vm"].as_str().unwrap().to_string(), host)
        })
        .collect()
}
