//! A virtual cluster moves between two clusters with different host names and subnets: on cluster A
//! (3 hosts `node1..3`, 10.213.7.0/24) three VMs with disk images, a virtual IP, an order, a colocation and a
//! location constraint are tagged `shop` and captured live with their disks (`vmha vcluster capture
//! --with-disks`, guests frozen through qemu-guest-agent); A is torn down and cluster B (2 hosts
//! `kvm-b1..2`, 10.213.17.0/24) instantiates the archive with host, address and storage maps: every VM
//! runs from the copied disks (same checksums), the virtual IP is up with its translated address on the
//! host where web runs, and the constraints are there in translated form. Capturing again on B and mapping
//! back gives A's resources, constraints and domains. Hostile archives (truncated, tampered, absolute
//! path, `..`, symlink, device file, oversized entry, wrong format version), unmapped hosts and a CIB
//! change that fails are all rejected with nothing left behind.
//!
//! The labs run one after the other (the archive is a file), not at once: two clusters plus three TCG
//! guests are too much for this machine's two cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmha_e2e::{domain_with_raw_disk, release_build, sha256, vmha_long, vmha_long_ok, wait_running, POLL};
use vmha_lab::guest::image_dir;
use vmha_lab::{wait_for, Lab, LabConfig};
use vmha_vcluster::archive::{self, verify, ArchiveWriter, FileSum};
use vmha_vcluster::translate::{plan, Maps, Target};

const VMS: [&str; 3] = ["h7web", "h7app", "h7db"];
const ARCHIVES: &str = "/var/tmp/vmha-lab/h7-archives";
const DISK_MIB: u64 = 48;

fn config_a() -> LabConfig {
    vmha_e2e::with_test_timing(LabConfig::new("h7a", 3, "10.213.7"))
}

fn config_b() -> LabConfig {
    let mut cfg = LabConfig::new("h7b", 2, "10.213.17");
    cfg.host_prefix = "kvm-b".into();
    vmha_e2e::with_test_timing(cfg)
}

fn up(cfg: LabConfig) -> Lab {
    let t0 = Instant::now();
    let lab = Lab::up(cfg).expect("lab bring-up");
    lab.install_build(&release_build()).expect("installing the build");
    // Capture and instantiate run in vmhad (the CLI passes it the archive's file descriptor).
    for n in lab.cfg.host_numbers() {
        lab.start_vmhad(n).expect("starting vmhad");
    }
    println!("lab {} up in {:.1} s", lab.cfg.name, t0.elapsed().as_secs_f64());
    lab
}

/// A sparse disk image with data in a few places, marked with the VM's name and a nonce.
fn write_disk(path: &Path, vm: &str, nonce: u128) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_MIB << 20).unwrap();
    let marker = format!("vmha vcluster marker {vm} {nonce:032x}\n");
    for (i, offset) in [0u64, 5 << 20, 17 << 20, (DISK_MIB << 20) - 4096].iter().enumerate() {
        let block: Vec<u8> = marker.bytes().cycle().skip(i).take(4096).collect();
        f.write_all_at(&block, *offset).unwrap();
    }
    // 2 MiB of incompressible-ish data too.
    let mut x = nonce as u64 | 1;
    let noise: Vec<u8> = (0..(2 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    f.write_all_at(&noise, 9 << 20).unwrap();
    f.sync_all().unwrap();
}

fn create_vm(lab: &Lab, vm: &str) {
    let xml = lab.cfg.shared_dir().join(format!("{vm}.xml"));
    std::fs::write(&xml, domain_with_raw_disk(lab, vm)).unwrap();
    let config = format!("config={}", xml.display());
    lab.exec_ok(
        1,
        &[
            "pcs",
            "resource",
            "create",
            vm,
            "ocf:vmha:VirtualMachine",
            &config,
            "hypervisor=qemu:///system",
            "migration_transport=tcp",
            "meta",
            "allow-migrate=true",
            "op",
            "monitor",
            "interval=10s",
            "timeout=30s",
            "op",
            "start",
            "timeout=90s",
            "op",
            "stop",
            "timeout=90s",
        ],
    )
    .unwrap();
}

/// The resources, constraints and tags of the CIB, canonical (to see that a rejected instantiate changed
/// nothing; cluster properties the DC maintains are left out).
fn configuration(lab: &Lab) -> String {
    let xml = lab
        .exec_ok(1, &["cibadmin", "--query", "--scope", "configuration"])
        .unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    doc.root_element()
        .children()
        .filter(|n| matches!(n.tag_name().name(), "resources" | "constraints" | "tags"))
        .map(canonical)
        .collect()
}

fn shared_files(lab: &Lab) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(lab.cfg.shared_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Rewrites an archive's entries: `edit` gets (name, header, data) and may change or add them.
fn repack(original: &[u8], edit: impl Fn(&mut Vec<(String, tar::Header, Vec<u8>)>)) -> Vec<u8> {
    use std::io::Read;
    let tar_bytes = zstd::decode_all(original).unwrap();
    let mut a = tar::Archive::new(tar_bytes.as_slice());
    let mut entries = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let header = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        entries.push((name, header, data));
    }
    edit(&mut entries);
    let mut b = tar::Builder::new(Vec::new());
    for (name, mut h, data) in entries {
        let bytes = name.as_bytes();
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..bytes.len()].copy_from_slice(bytes);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap()
}

/// Adds an entry (listed in the manifest, the first entry, so only its nature is wrong) right after the
/// manifest, among the metadata.
fn with_entry(original: &[u8], name: &str, kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
    repack(original, |entries| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/shadow").unwrap();
        }
        assert_eq!(entries[0].0, archive::MANIFEST);
        let mut manifest: serde_json::Value = serde_json::from_slice(&entries[0].2).unwrap();
        manifest["files"][name] = serde_json::to_value(FileSum::of(data)).unwrap();
        entries[0].2 = serde_json::to_vec(&manifest).unwrap();
        entries.insert(1, (name.to_string(), h, data.to_vec()));
    })
}

/// Canonical form of an element: tag, sorted attributes, element children; whitespace ignored.
fn canonical(n: roxmltree::Node) -> String {
    let mut attrs: Vec<String> = n
        .attributes()
        .map(|a| format!("{}={:?}", a.name(), a.value()))
        .collect();
    attrs.sort();
    let kids: Vec<String> = n.children().filter(|c| c.is_element()).map(canonical).collect();
    format!("<{} {}>{}</>", n.tag_name().name(), attrs.join(" "), kids.join(""))
}

fn canonical_children(xml: &str, section: &str) -> BTreeMap<String, String> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    let s = doc.descendants().find(|n| n.has_tag_name(section)).unwrap();
    s.children()
        .filter(|n| n.is_element())
        .map(|n| (n.attribute("id").unwrap_or("").to_string(), canonical(n)))
        .collect()
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn vcluster_capture_and_instantiate() {
    vmha_lab::init_logging();
    let started = Instant::now();
    std::fs::create_dir_all(ARCHIVES).unwrap();
    let archive_a = PathBuf::from(ARCHIVES).join("shop-from-a.vca");
    let archive_b = PathBuf::from(ARCHIVES).join("shop-from-b.vca");
    for f in [&archive_a, &archive_b] {
        let _ = std::fs::remove_file(f);
    }

    // --- Cluster A: the virtual cluster, captured live with its disks.
    let a = up(config_a());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut disk_sums = BTreeMap::new();
    for vm in VMS {
        let disk = a.cfg.shared_dir().join(format!("{vm}.img"));
        write_disk(&disk, vm, nonce);
        disk_sums.insert(vm, sha256(&disk));
        create_vm(&a, vm);
    }
    a.exec_ok(
        1,
        &[
            "pcs",
            "resource",
            "create",
            "h7vip",
            "ocf:heartbeat:IPaddr2",
            "ip=10.213.7.100",
            "cidr_netmask=24",
            "op",
            "monitor",
            "interval=10s",
        ],
    )
    .unwrap();
    a.exec_ok(
        1,
        &["pcs", "constraint", "order", "start", "h7db", "then", "start", "h7web"],
    )
    .unwrap();
    a.exec_ok(
        1,
        &[
            "pcs",
            "constraint",
            "colocation",
            "add",
            "h7vip",
            "with",
            "h7web",
            "INFINITY",
        ],
    )
    .unwrap();
    a.exec_ok(1, &["pcs", "constraint", "location", "h7db", "prefers", "node1=50"])
        .unwrap();
    let mut members = vec!["create", "shop"];
    members.extend(VMS);
    members.push("h7vip");
    let mut args = vec!["vcluster"];
    args.extend(&members);
    vmha_long_ok(&a, 2, &args);
    let listed = vmha_long_ok(&a, 3, &["vcluster", "list"]);
    assert_eq!(listed.trim(), "shop: h7web h7app h7db h7vip");
    for vm in VMS {
        wait_running(&a, vm, Duration::from_secs(300));
    }
    wait_for("h7vip running", Duration::from_secs(120), POLL, || {
        a.status_from_any().ok()?.running_on("h7vip").map(str::to_string)
    })
    .unwrap();
    // A live capture freezes the guests through qemu-guest-agent: wait until every agent answers.
    for vm in VMS {
        let n = wait_running(&a, vm, Duration::from_secs(30));
        wait_for(&format!("{vm}'s guest agent"), Duration::from_secs(300), POLL, || {
            vmha_e2e::guest_agent(&a, n, vm, &serde_json::json!({"execute": "guest-ping"})).ok()
        })
        .unwrap();
    }
    let shown: serde_json::Value =
        serde_json::from_str(&vmha_long_ok(&a, 1, &["--output", "json", "vcluster", "show", "shop"])).unwrap();
    println!("vcluster show: {shown}");
    assert_eq!(shown["constraints"].as_array().map(Vec::len), Some(3), "{shown}");

    let t = Instant::now();
    let out = vmha_long_ok(
        &a,
        2,
        &[
            "--output",
            "json",
            "vcluster",
            "capture",
            "shop",
            "--out",
            archive_a.to_str().unwrap(),
            "--with-disks",
        ],
    );
    let capture_secs = t.elapsed().as_secs_f64();
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!(
        "capture on A: {capture_secs:.1} s, {} bytes: {summary}",
        std::fs::metadata(&archive_a).unwrap().len()
    );
    assert_eq!(summary["consistency"], "frozen");
    assert_eq!(summary["disks"].as_array().map(Vec::len), Some(3));
    // The guests were thawed: their agents answer and they still run.
    for vm in VMS {
        let n = wait_running(&a, vm, Duration::from_secs(30));
        let frozen =
            vmha_e2e::guest_agent(&a, n, vm, &serde_json::json!({"execute": "guest-fsfreeze-status"})).unwrap();
        assert_eq!(frozen, "thawed", "{vm}");
    }
    let original = verify(std::fs::File::open(&archive_a).unwrap()).unwrap();
    let shared_a = a.cfg.shared_dir();
    drop(a);

    // --- Cluster B: other host names, other subnet.
    let b = up(config_b());
    let shared_b = b.cfg.shared_dir();
    let storage = format!("storage={}:{}", shared_a.display(), shared_b.display());
    // The guest kernel and initrd: storage both clusters have (an instantiate lets domains use files
    // under mapped storage directories only).
    let images = format!("storage={}:{}", image_dir().display(), image_dir().display());
    let maps = [
        "--map",
        "hosts=node1:kvm-b1,node2:kvm-b2,node3:kvm-b2",
        "--map",
        "address=10.213.7.0/24:10.213.17.0/24",
        "--map",
        &storage,
        "--map",
        &images,
    ];
    let before = configuration(&b);
    let files_before = shared_files(&b);
    let nothing_changed = |what: &str| {
        assert_eq!(configuration(&b), before, "{what} changed the CIB");
        assert_eq!(shared_files(&b), files_before, "{what} left files behind");
    };

    // Hostile and broken archives: rejected, naming the problem, nothing created.
    let bytes = std::fs::read(&archive_a).unwrap();
    let tampered = repack(&bytes, |entries| {
        let e = entries.iter_mut().find(|(n, ..)| n == "domains/h7web.xml").unwrap();
        let text = String::from_utf8(e.2.clone())
            .unwrap()
            .replace("<memory unit='MiB'>96", "<memory unit='MiB'>64");
        e.2 = text.into_bytes();
    });
    let wrong_version = repack(&bytes, |entries| {
        let mut m: serde_json::Value = serde_json::from_slice(&entries[0].2).unwrap();
        m["format_version"] = 99.into();
        entries[0].2 = serde_json::to_vec(&m).unwrap();
    });
    // A disk chunk changed after capture: found only at the end of the single pass, when the disks are
    // already written under their hidden names (which go again).
    let tampered_disk = repack(&bytes, |entries| {
        let e = entries
            .iter_mut()
            .rev()
            .find(|(n, ..)| n.starts_with("disks/"))
            .unwrap();
        e.2[100] ^= 0xff;
    });
    let big = vec![b'x'; (archive::MAX_METADATA + 1) as usize];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..bytes.len() * 2 / 3].to_vec(), "truncated"),
        ("tampered", tampered, "checksum mismatch for domains/h7web.xml"),
        ("tampered-disk", tampered_disk, "checksum mismatch for disks/"),
        (
            "absolute",
            with_entry(&bytes, "/etc/cron.d/evil", tar::EntryType::Regular, b"x"),
            "absolute path",
        ),
        (
            "dotdot",
            with_entry(&bytes, "domains/../../../etc/evil.xml", tar::EntryType::Regular, b"x"),
            "'..'",
        ),
        (
            "symlink",
            with_entry(&bytes, "domains/evil.xml", tar::EntryType::Symlink, b""),
            "symbolic link",
        ),
        (
            "device",
            with_entry(&bytes, "domains/evil.xml", tar::EntryType::Block, b""),
            "block device",
        ),
        (
            "oversized",
            with_entry(&bytes, "domains/evil.xml", tar::EntryType::Regular, &big),
            "oversized",
        ),
        ("version", wrong_version, "format version 99"),
    ];
    for (what, data, expect) in &cases {
        let path = PathBuf::from(ARCHIVES).join(format!("hostile-{what}.vca"));
        std::fs::write(&path, data).unwrap();
        let mut args = vec!["vcluster", "instantiate", path.to_str().unwrap()];
        args.extend(maps);
        let (code, out, err) = vmha_long(&b, 1, &args);
        println!("{what}: exit {code}: {}", err.trim());
        assert_ne!(code, 0, "{what} accepted: {out}");
        assert!(err.contains(expect), "{what}: expected {expect:?} in {err}");
        nothing_changed(what);
    }
    // Unmapped hosts: the plan names them.
    let (code, _, err) = vmha_long(
        &b,
        1,
        &[
            "vcluster",
            "instantiate",
            archive_a.to_str().unwrap(),
            "--map",
            &storage,
            "--map",
            &images,
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("hosts without a mapping: node1"), "{err}");
    nothing_changed("unmapped hosts");
    // A CIB change that fails (an archive whose resource Pacemaker's schema refuses, checksums valid):
    // the domain file written before it is removed again.
    let broken = {
        let res = original.text(archive::RESOURCES).unwrap().replace(
            "<primitive id=\"h7app\"",
            "<primitive id=\"h7app\" bogus-attribute=\"1\"",
        );
        let mut metadata = original.metadata.clone();
        metadata.insert(archive::RESOURCES.to_string(), res.into_bytes());
        let mut m = original.manifest.clone();
        m.disks.clear();
        let w = ArchiveWriter::new(Vec::new(), 1, m, &metadata).unwrap();
        w.finish().unwrap().0
    };
    let broken_path = PathBuf::from(ARCHIVES).join("schema-invalid.vca");
    std::fs::write(&broken_path, &broken).unwrap();
    let mut args = vec!["vcluster", "instantiate", broken_path.to_str().unwrap()];
    args.extend(maps);
    let (code, _, err) = vmha_long(&b, 1, &args);
    println!("schema-invalid: exit {code}: {}", err.trim());
    assert_ne!(code, 0);
    assert!(err.contains("removing what it created"), "{err}");
    nothing_changed("a failed CIB change");

    // Dry run: the plan, nothing else.
    let mut args = vec![
        "--output",
        "json",
        "vcluster",
        "instantiate",
        archive_a.to_str().unwrap(),
        "--dry-run",
    ];
    args.extend(maps);
    let dry: serde_json::Value = serde_json::from_str(&vmha_long_ok(&b, 2, &args)).unwrap();
    assert_eq!(dry["plan"]["hosts"]["node1"], "kvm-b1", "{dry}");
    assert!(dry["plan"]["remaps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["place"] == "resource h7vip param ip" && r["new"] == "10.213.17.100"));
    nothing_changed("a dry run");

    // The real thing.
    let t = Instant::now();
    let mut args = vec!["vcluster", "instantiate", archive_a.to_str().unwrap()];
    args.extend(maps);
    let out = vmha_long_ok(&b, 2, &args);
    let instantiate_secs = t.elapsed().as_secs_f64();
    println!("instantiate on B ({instantiate_secs:.1} s, until all run):\n{out}");
    let mut hosts = BTreeMap::new();
    for vm in VMS {
        hosts.insert(vm, wait_running(&b, vm, Duration::from_secs(300)));
        let disk = shared_b.join(format!("{vm}.img"));
        assert_eq!(sha256(&disk), disk_sums[vm], "{vm}'s disk on B");
        let used = b
            .exec_ok(hosts[vm], &["virsh", "-c", "qemu:///system", "domblklist", vm])
            .unwrap();
        assert!(used.contains(disk.to_str().unwrap()), "{vm} runs from {used}");
    }
    let vip_host = wait_for("h7vip running on B", Duration::from_secs(120), POLL, || {
        b.status_from_any().ok()?.running_on("h7vip").map(str::to_string)
    })
    .unwrap();
    assert_eq!(
        b.cfg.host_number(&vip_host),
        Some(hosts["h7web"]),
        "colocation: h7vip runs with h7web"
    );
    let addrs = b.exec_ok(hosts["h7web"], &["ip", "-4", "-o", "addr"]).unwrap();
    assert!(addrs.contains("10.213.17.100/24"), "{addrs}");
    let constraints = b
        .exec_ok(1, &["cibadmin", "--query", "--scope", "constraints"])
        .unwrap();
    println!("constraints on B:\n{constraints}");
    assert!(constraints.contains("node=\"kvm-b1\""), "location translated");
    assert!(!constraints.contains("node=\"node"), "no host of A is left");
    let order = canonical_children(&constraints, "constraints");
    assert_eq!(order.len(), 3);

    // Capture on B, map back: A's configuration and domains.
    // A cold capture (--halt): the members stop, their disks are copied, their target-role comes back as it
    // was (none) and they run again.
    let t = Instant::now();
    let out = vmha_long_ok(
        &b,
        1,
        &[
            "--output",
            "json",
            "vcluster",
            "capture",
            "shop",
            "--out",
            archive_b.to_str().unwrap(),
            "--with-disks",
            "--halt",
        ],
    );
    let halted: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!("cold capture on B: {:.1} s: {halted}", t.elapsed().as_secs_f64());
    assert_eq!(halted["consistency"], "halted");
    let resources = b.exec_ok(1, &["cibadmin", "--query", "--scope", "resources"]).unwrap();
    assert!(
        !resources.contains("target-role"),
        "target-role restored (absent): {resources}"
    );
    for vm in VMS {
        wait_running(&b, vm, Duration::from_secs(300));
    }
    let from_b = verify(std::fs::File::open(&archive_b).unwrap()).unwrap();
    let back = Maps::parse(
        &[
            "hosts=kvm-b1:node1,kvm-b2:node2".to_string(),
            "address=10.213.17.0/24:10.213.7.0/24".to_string(),
            format!("storage={}:{}", shared_b.display(), shared_a.display()),
            images.clone(),
        ],
        None,
    )
    .unwrap();
    let target_a = Target {
        hosts: vec!["node1".into(), "node2".into(), "node3".into()],
        ids: Default::default(),
    };
    let p = plan(&from_b, &back, &target_a).unwrap();
    for section in ["resources", "constraints"] {
        assert_eq!(
            canonical_children(&p.cib_fragment, section),
            canonical_children(original.text(&format!("cluster/{section}.xml")).unwrap(), section),
            "{section} after A -> B -> A"
        );
    }
    for d in &p.domains {
        let orig = original.text(&format!("domains/{}.xml", d.vm)).unwrap();
        assert_eq!(d.xml, orig, "{}'s domain after A -> B -> A", d.vm);
    }
    println!(
        "vcluster scenario passed in {:.0} s (capture {capture_secs:.1} s, instantiate {instantiate_secs:.1} s)",
        started.elapsed().as_secs_f64()
    );
}
