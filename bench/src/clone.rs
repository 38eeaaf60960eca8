//! `vmha-bench clone`: live clone on the lab. A 3-host lab with vmhad, a 128 MiB TCG template with a
//! qcow2 disk and vmha-guest (hooks answer at once); `vmha clone` of one clone and of `--count 8`, each
//! run `rounds` times; the figures come from the job's own step timings (vmhad measures each step; the
//! stall is libvirt's downtime of the live capture: how long the template's vCPUs were stopped).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::{target_binary, VmAgent};
use vmha_lab::{wait_for, Lab, LabConfig};

const TPL: &str = "btpl";

#[derive(Debug, Default, Clone, serde::Deserialize)]
struct Timings {
    prepare_ms: f64,
    capture_ms: f64,
    stall_ms: Option<f64>,
    create_ms: f64,
    resume_ms: f64,
    register_ms: f64,
    post_clone_ms: f64,
    total_ms: f64,
}

fn vmha(lab: &Lab, n: u8, args: &[&str]) -> Result<String> {
    let mut all = vec!["vmha", "--timeout", "300", "--output", "json"];
    all.extend_from_slice(args);
    let out = lab.exec(n, &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("vmha {args:?}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

fn timings(message: &str) -> Result<Timings> {
    let json = message
        .split_once("timings ")
        .map(|(_, t)| t)
        .ok_or_else(|| anyhow!("no timings in {message:?}"))?;
    Ok(serde_json::from_str(json)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn run(rounds: usize, out: Option<PathBuf>) -> Result<()> {
    let lab = Lab::up(LabConfig::new("bclone", 3, "10.213.3"))?;
    let build = target_binary("vmhad")?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("no build directory"))?;
    lab.install_build(&build)?;
    for n in lab.cfg.host_numbers() {
        lab.start_vmhad(n)?;
    }
    let shared = lab.cfg.shared_dir();
    let base = shared.join("base.qcow2");
    let disk = shared.join(format!("{TPL}.vda.qcow2"));
    vmha_lab::guest::disk_on_base(&base, &disk, "64M")?;
    lab.add_vm(
        &GuestSpec::new(TPL).with_disk_and_nic(&disk, "52:54:00:be:00:01"),
        VmAgent::Vmha,
    )?;
    let host_of = |vm: &str| -> Option<u8> {
        let s = lab.status_from_any().ok()?;
        lab.cfg.host_number(s.running_on(vm)?)
    };
    let a = wait_for(
        "the template running",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || host_of(TPL),
    )?;
    wait_for(
        "the template's guest channel",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || vmha(&lab, a, &["vm", "request", TPL, "test-ok", "--timeout-ms", "5000"]).ok(),
    )?;
    let target = lab.other_host(a).context("no other host")?;
    let target_name = lab.cfg.host_name(target);
    let mut report = String::new();
    let mut rows: Vec<(String, Vec<Timings>, Vec<f64>)> = Vec::new();
    for (label, count) in [("1 clone", 1u32), ("8 clones (--count 8)", 8)] {
        let mut all = Vec::new();
        let mut wall = Vec::new();
        for round in 0..rounds {
            let name = format!("b{count}r{round}");
            let c = count.to_string();
            let t0 = Instant::now();
            let out = vmha(
                &lab,
                a,
                &["clone", TPL, "--name", &name, "--host", &target_name, "--count", &c],
            )?;
            wall.push(t0.elapsed().as_secs_f64() * 1000.0);
            let v: serde_json::Value = serde_json::from_str(out.trim())?;
            all.push(timings(v["message"].as_str().unwrap_or(""))?);
            let names: Vec<String> = if count == 1 {
                vec![name.clone()]
            } else {
                (1..=count).map(|i| format!("{name}-{i}")).collect()
            };
            for n in names {
                vmha(&lab, a, &["vm", "remove", "--destroy", &n])?;
            }
        }
        rows.push((label.to_string(), all, wall));
    }
    writeln!(report, "## Live clone (`vmha-bench clone --rounds {rounds}`)\n")?;
    writeln!(
        report,
        "128 MiB TCG template with a qcow2 disk on the lab's shared directory, cloned to another host; \
         medians of {rounds} rounds; step times measured by vmhad inside the job.\n"
    )?;
    writeln!(
        report,
        "| clones | template stall | prepare | capture | create+start | resume | register | post-clone | ready (job) | CLI wall | goal |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (label, t, wall) in &rows {
        let m = |f: fn(&Timings) -> f64| median(t.iter().map(f).collect());
        let stall = median(t.iter().filter_map(|x| x.stall_ms).collect());
        let goal = if label.starts_with('1') {
            "stall <= 100 ms, ready <= 2 s"
        } else {
            "stall <= 100 ms, ready <= 10 s"
        };
        writeln!(
            report,
            "| {label} | {stall:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {goal} |",
            m(|x| x.prepare_ms),
            m(|x| x.capture_ms),
            m(|x| x.create_ms),
            m(|x| x.resume_ms),
            m(|x| x.register_ms),
            m(|x| x.post_clone_ms),
            m(|x| x.total_ms),
            median(wall.clone()),
        )?;
    }
    writeln!(
        report,
        "\nReference: VMware Instant Clone forks in under a second, 64 clones in under 6 s on one host."
    )?;
    print!("{report}");
    if let Some(path) = out {
        std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
