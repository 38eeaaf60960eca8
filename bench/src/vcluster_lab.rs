//! `vmha-bench vcluster --vmhad`: virtual-cluster capture and instantiate through the product's own path,
//! on a lab cluster (3 hosts: Corosync, Pacemaker, libvirtd, vmhad on each): `vmha vcluster capture` and
//! `vmha vcluster instantiate`, the CLI handing the archive to vmhad as a file descriptor and vmhad
//! running each as a D-Bus job against the live CIB manager, timed by the bench's own clock around the
//! command.
//!
//! Each round captures the virtual cluster, deletes it (its resources, constraints, tag and files, not
//! timed) and instantiates the archive back in its place, so that every round does the same work on the
//! same cluster. Metadata: `vms` stopped VMs (domain files, utilization, operations), a virtual IP and
//! order, colocation and location constraints, the same set the library bench captures. Disks: one stopped
//! VM with a disk image of incompressible bytes (the main case), then a compressible image, each against
//! the machine's sequential copy of the same image (read + write + fsync) in the same round, caches dropped
//! before each step.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use vmha_lab::{Lab, LabConfig};
use vmha_vcluster::archive::verify;

use crate::report::{cell, median, verdict, Run};
use crate::scale::vmhad_usage;
use crate::vcluster::{disk_table, domain_xml, drop_cache, make_image, make_random_image, members};

/// The longest a capture or instantiate may take here.
const JOB_LIMIT: Duration = Duration::from_secs(600);

/// `vmha ARGS` on host 1 (where the jobs are asked): its standard output.
fn vmha(lab: &Lab, args: &[&str]) -> Result<String> {
    let mut all = vec!["vmha", "--timeout", "600"];
    all.extend_from_slice(args);
    let out = lab.exec_with_deadline(1, &all, JOB_LIMIT + Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "vmha {}: exit {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every vmhad's CPU so far (ms, summed over the hosts).
fn vmhad_cpu(lab: &Lab) -> Result<f64> {
    lab.cfg
        .host_numbers()
        .map(|n| vmhad_usage(lab, n).map(|(_, _, cpu)| cpu))
        .sum()
}

/// Creates configuration elements in one CIB change (a fragment of `<configuration>`'s children).
fn cib_create(lab: &Lab, fragment: &str) -> Result<()> {
    let file = lab.cfg.shared_dir().join("bench-fragment.xml");
    fs::write(&file, format!("<configuration>{fragment}</configuration>"))?;
    lab.exec_ok(
        1,
        &[
            "cibadmin",
            "--modify",
            "--allow-create",
            "--scope",
            "configuration",
            "--xml-file",
            &file.to_string_lossy(),
        ],
    )?;
    Ok(())
}

/// Deletes every configuration element an XPath matches.
fn cib_delete(lab: &Lab, xpath: &str) -> Result<()> {
    lab.exec_ok(1, &["cibadmin", "--delete-all", "--force", "--xpath", xpath])?;
    Ok(())
}

/// How many primitives in the CIB have an id starting with `prefix`.
fn primitives(lab: &Lab, prefix: &str) -> Result<usize> {
    let xml = lab.exec_ok(1, &["cibadmin", "--query", "--scope", "resources"])?;
    let doc = roxmltree::Document::parse(&xml)?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("primitive"))
        .filter(|n| n.attribute("id").is_some_and(|id| id.starts_with(prefix)))
        .count())
}

/// Wall seconds and the vmhads' CPU seconds of `f`.
fn timed(lab: &Lab, f: impl FnOnce() -> Result<()>) -> Result<(f64, f64)> {
    let c = vmhad_cpu(lab)?;
    let t = Instant::now();
    f()?;
    let wall = t.elapsed().as_secs_f64();
    Ok((wall, (vmhad_cpu(lab)? - c) / 1000.0))
}

/// Wall and CPU seconds of one process-local step.
fn timed_here(f: impl FnOnce() -> Result<()>) -> Result<(f64, f64)> {
    let (t, c) = (Instant::now(), crate::vcluster::cpu());
    f()?;
    Ok((t.elapsed().as_secs_f64(), crate::vcluster::cpu() - c))
}

pub fn run(vms: usize, rounds: usize, disk_mib: u64, cfg: &LabConfig, out: Option<PathBuf>) -> Result<()> {
    vmha_lab::init_logging();
    if rounds == 0 || vms == 0 {
        bail!("--rounds and --vms must be at least 1");
    }
    let run = Run::start(&cfg.shared_dir());
    let lab = crate::lab_with_vmhad(cfg)?;
    crate::wait_vmhad_ready(&lab)?;
    let result = run_in(&lab, vms, rounds, disk_mib);
    drop(lab);
    let report = run.finish(
        "vmha vcluster: capture and instantiate through vmhad on a lab cluster",
        &result?,
    );
    crate::report::emit(&report, out.as_deref())
}

/// One step's samples: wall seconds and the CPU seconds it cost (the vmhads', or this process's).
#[derive(Default)]
struct Samples {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Samples {
    fn push(&mut self, (wall, cpu): (f64, f64)) {
        self.wall.push(wall);
        self.cpu.push(cpu);
    }
}

/// Deletes the metadata case's virtual cluster from the CIB: its tag, constraints and resources.
fn delete_metadata(lab: &Lab) -> Result<()> {
    cib_delete(lab, "/cib/configuration/tags/tag[@id='bmeta']")?;
    cib_delete(lab, "/cib/configuration/constraints/*[starts-with(@id, 'bench-')]")?;
    cib_delete(
        lab,
        "/cib/configuration/resources/primitive[starts-with(@id, 'bvm') or @id='bvip']",
    )
}

fn metadata(lab: &Lab, vms: usize, rounds: usize) -> Result<(Samples, Samples, u64)> {
    let dir = lab.cfg.shared_dir().join("bmeta");
    fs::create_dir_all(&dir)?;
    let hosts: Vec<String> = lab.cfg.host_numbers().map(|n| lab.cfg.host_name(n)).collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let vip = format!("{}.200", lab.cfg.subnet);
    let (r, c, tag) = members(&dir, vms, &vip, &hosts, "bmeta");
    let names: Vec<String> = (0..vms).map(|i| format!("bvm{i:03}")).collect();
    let write_domains = || -> Result<()> {
        for vm in &names {
            fs::write(dir.join(format!("{vm}.xml")), domain_xml(vm, &dir))?;
        }
        Ok(())
    };
    write_domains()?;
    cib_create(
        lab,
        &format!("<resources>{r}</resources><constraints>{c}</constraints><tags>{tag}</tags>"),
    )?;
    let archive = lab.cfg.shared_dir().join("bmeta.vca");
    let archive_s = archive.to_string_lossy().into_owned();
    let storage = format!("storage={}:{}", dir.display(), dir.display());
    let (mut cap, mut inst) = (Samples::default(), Samples::default());
    for _ in 0..rounds {
        let _ = fs::remove_file(&archive);
        cap.push(timed(lab, || {
            vmha(lab, &["vcluster", "capture", "bmeta", "-o", &archive_s]).map(drop)
        })?);
        let captured = verify(File::open(&archive)?)?;
        if captured.manifest.vms.len() != vms {
            bail!("the archive holds {} VMs, not {vms}", captured.manifest.vms.len());
        }
        // The virtual cluster deleted: the instantiate creates it again in the same place.
        delete_metadata(lab)?;
        if primitives(lab, "bvm")? != 0 {
            bail!("the virtual cluster's VMs are still in the CIB after their deletion");
        }
        for vm in &names {
            fs::remove_file(dir.join(format!("{vm}.xml")))?;
        }
        inst.push(timed(lab, || {
            vmha(
                lab,
                &["vcluster", "instantiate", &archive_s, "--wait", "0", "--map", &storage],
            )
            .map(drop)
        })?);
        let created = primitives(lab, "bvm")?;
        if created != vms {
            bail!("instantiate created {created} VM resources, not {vms}");
        }
        for vm in &names {
            if !dir.join(format!("{vm}.xml")).exists() {
                bail!("instantiate wrote no domain file for {vm}");
            }
        }
    }
    let size = fs::metadata(&archive)?.len();
    // Out of the way of the disk cases (the lab's 3 hosts probe nothing more of them).
    delete_metadata(lab)?;
    Ok((cap, inst, size))
}

/// One disk case: the copy, capture and instantiate of `image` (of VM `bdisk`), in turn in every round.
struct DiskCase {
    size: u64,
    archive: u64,
    copy: Samples,
    capture: Samples,
    instantiate: Samples,
}

fn disk_case(lab: &Lab, dir: &Path, image: &Path, rounds: usize) -> Result<DiskCase> {
    let size = fs::metadata(image)?.len();
    let original = vmha_e2e::sha256(image);
    let domain = dir.join("bdisk.xml");
    fs::write(&domain, domain_xml("bdisk", dir))?;
    let vm = format!(
        r#"<resources><primitive id="bdisk" class="ocf" provider="vmha" type="VirtualMachine"><instance_attributes id="bdisk-ia"><nvpair id="bdisk-ia-config" name="config" value="{}"/><nvpair id="bdisk-ia-hypervisor" name="hypervisor" value="qemu:///system"/></instance_attributes><meta_attributes id="bdisk-meta"><nvpair id="bdisk-meta-target-role" name="target-role" value="Stopped"/></meta_attributes></primitive></resources><tags><tag id="bdisk-vc"><obj_ref id="bdisk"/></tag></tags>"#,
        domain.display()
    );
    cib_create(lab, &vm)?;
    let copy = lab.cfg.shared_dir().join("bench-copy.img");
    let archive = lab.cfg.shared_dir().join("bdisk.vca");
    let archive_s = archive.to_string_lossy().into_owned();
    let storage = format!("storage={}:{}", dir.display(), dir.display());
    let mut case = DiskCase {
        size,
        archive: 0,
        copy: Samples::default(),
        capture: Samples::default(),
        instantiate: Samples::default(),
    };
    // As in the library bench, each step first deletes what it wrote in the round before.
    for _ in 0..rounds {
        let _ = fs::remove_file(&copy);
        drop_cache(image)?;
        case.copy.push(timed_here(|| {
            let mut src = File::open(image)?;
            let mut dst = File::create(&copy)?;
            std::io::copy(&mut src, &mut dst)?;
            dst.sync_all()?;
            Ok(())
        })?);
        drop_cache(image)?;
        let _ = fs::remove_file(&archive);
        case.capture.push(timed(lab, || {
            vmha(
                lab,
                &["vcluster", "capture", "bdisk-vc", "-o", &archive_s, "--with-disks"],
            )
            .map(drop)
        })?);
        cib_delete(lab, "/cib/configuration/tags/tag[@id='bdisk-vc']")?;
        cib_delete(lab, "/cib/configuration/resources/primitive[@id='bdisk']")?;
        fs::remove_file(&domain)?;
        fs::remove_file(image)?;
        drop_cache(&archive)?;
        case.instantiate.push(timed(lab, || {
            vmha(
                lab,
                &["vcluster", "instantiate", &archive_s, "--wait", "0", "--map", &storage],
            )
            .map(drop)
        })?);
        if primitives(lab, "bdisk")? != 1 {
            bail!("instantiate did not create bdisk");
        }
        let got = fs::metadata(image).map_err(|e| anyhow!("instantiate wrote no {}: {e}", image.display()))?;
        if got.len() != size {
            bail!("the instantiated image has {} bytes, not {size}", got.len());
        }
    }
    if vmha_e2e::sha256(image) != original {
        bail!("the instantiated image differs from the original");
    }
    case.archive = fs::metadata(&archive)?.len();
    cib_delete(lab, "/cib/configuration/tags/tag[@id='bdisk-vc']")?;
    cib_delete(lab, "/cib/configuration/resources/primitive[@id='bdisk']")?;
    for p in [&copy, &archive, &domain] {
        let _ = fs::remove_file(p);
    }
    Ok(case)
}

fn run_in(lab: &Lab, vms: usize, rounds: usize, disk_mib: u64) -> Result<String> {
    let (cap, inst, meta_size) = metadata(lab, vms, rounds)?;
    let dir = lab.cfg.shared_dir().join("bdisk");
    fs::create_dir_all(&dir)?;
    let image = dir.join("bdisk.img");
    make_random_image(&image, disk_mib)?;
    let incompressible = disk_case(lab, &dir, &image, rounds)?;
    fs::remove_file(&image)?;
    make_image(&image, disk_mib)?;
    let compressible = disk_case(lab, &dir, &image, rounds)?;
    fs::remove_file(&image)?;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "Through the product's path on a lab cluster of {} hosts (Corosync, Pacemaker, libvirtd, vmhad on each, \
         all on this machine): `vmha vcluster capture` and `vmha vcluster instantiate --wait 0` on host 1, \
         each a D-Bus job in vmhad against the live CIB manager, timed by this bench's clock around the \
         command (the CLI's start and its D-Bus round trips included). Each round captures the virtual \
         cluster, deletes it (resources, constraints, tag, files; not timed) and instantiates the archive \
         back in its place. \"vmhad CPU\" is every host's vmhad's user + system CPU over the step (from \
         /proc), the copy's is this process's.\n",
        lab.cfg.hosts
    );
    let constraints = (vms - 1) + vms / 2 + vms + 1;
    let _ = writeln!(
        s,
        "## metadata of {vms} stopped VMs (+ a virtual IP, {constraints} constraints), {rounds} rounds\n"
    );
    let _ = writeln!(s, "| step | seconds | vmhad CPU s (mean) | goal |\n|---|---|---|---|");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let _ = writeln!(
        s,
        "| capture (CIB query, {vms} domain files, archive of {meta_size} bytes written + fsync) | {} | {:.2} | < 5 s: {} |",
        cell(&cap.wall, 3, ""),
        mean(&cap.cpu),
        verdict(median(&cap.wall) < 5.0)
    );
    let _ = writeln!(
        s,
        "| instantiate (verify, plan, {vms} domain files, journal, one CIB change; VMs left stopped) | {} | {:.2} | < 5 s: {} |",
        cell(&inst.wall, 3, ""),
        mean(&inst.cpu),
        verdict(median(&inst.wall) < 5.0)
    );
    let _ = writeln!(s);
    for (title, case, main) in [
        ("incompressible: bytes from /dev/urandom (the main case)", &incompressible, true),
        (
            "compressible: half pseudo-random, half one repeated log line, in 1 MiB stripes (zstd halves it: not the goal's case)",
            &compressible,
            false,
        ),
    ] {
        let _ = writeln!(s, "## disk image of {disk_mib} MiB, {title}; {rounds} rounds\n");
        let _ = writeln!(
            s,
            "In every round, in turn: the machine's sequential copy of the image (read + write + fsync, this \
             process), capture of the stopped VM with its disk (`--with-disks`), instantiate (the disk \
             written under a hidden name, checked, put in place); caches dropped before each (fadvise \
             DONTNEED). Archive: {} bytes for {} bytes of image ({:.0} %). The image came back byte for \
             byte (sha256sum).\n",
            case.archive,
            case.size,
            100.0 * case.archive as f64 / case.size as f64
        );
        disk_table(
            &mut s,
            case.size,
            &case.copy.wall,
            format!("{:.2} (this process)", mean(&case.copy.cpu)),
            &[
                (
                    "capture (vmhad job)",
                    &case.capture.wall,
                    format!("{:.2} (vmhads)", mean(&case.capture.cpu)),
                ),
                (
                    "instantiate (vmhad job)",
                    &case.instantiate.wall,
                    format!("{:.2} (vmhads)", mean(&case.instantiate.cpu)),
                ),
            ],
            main,
        );
        let _ = writeln!(s);
    }
    Ok(s)
}
