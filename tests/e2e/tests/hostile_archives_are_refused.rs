//! Virtual-cluster archives are untrusted input: vmhad instantiates them as root. A genuine capture (two
//! VMs with disks and a virtual IP, tagged `h1shop`, captured cold with `--with-disks`) is edited as an
//! attacker would, each entry re-summed in the manifest (the sums detect damage, they are no signature),
//! one archive per category: a host file as a disk, raw QEMU arguments, a DAC/seclabel override, a host
//! block device, an agent outside the allowlist, a foreign CIB section, a path climbing out of storage and
//! a long-name header bomb. Each is refused by `--dry-run` and by a real instantiate, naming what it
//! refused, and the CIB's configuration, libvirt's domains on every host and the storage directory (names
//! and hashes) are exactly as before. An opt-in (`--allow-agent`) shows in the plan. Signatures: the
//! capture is signed with an operator key (`vmha vcluster keygen`, `capture --sign`); the hostile archives
//! are made from it stripped of its signature. With `--require-signature` the unsigned archive is refused,
//! and a signed archive with an entry edited and re-summed is refused by its signature, both before
//! anything is created. The genuine signed archive still instantiates with `--require-signature
//! --trusted-key`, its plan naming the signer: its VMs run from their copied disks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmha_e2e::{domain_with_raw_disk, sha256, vmha_long, vmha_long_ok, wait_running, POLL};
use vmha_lab::guest::image_dir;
use vmha_lab::{wait_for, Lab};
use vmha_vcluster::archive::{self, FileSum};

const VMS: [&str; 2] = ["h1web", "h1db"];
const DISK_MIB: u64 = 16;

fn write_disk(path: &Path, vm: &str) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_MIB << 20).unwrap();
    let marker = format!("vmha hostile-archive marker {vm}\n");
    for offset in [0u64, 5 << 20, (DISK_MIB << 20) - 4096] {
        let block: Vec<u8> = marker.bytes().cycle().take(4096).collect();
        f.write_all_at(&block, offset).unwrap();
    }
    f.sync_all().unwrap();
}

/// Canonical form of an element: tag, sorted attributes, element children; whitespace ignored.
fn canonical(n: roxmltree::Node) -> String {
    let mut attrs: Vec<String> = n
        .attributes()
        .map(|a| format!("{}={:?}", a.name(), a.value()))
        .collect();
    attrs.sort();
    let kids: Vec<String> = n
        .children()
        .filter(|c| c.is_element())
        // Properties the DC itself maintains.
        .filter(|c| {
            !(c.has_tag_name("nvpair")
                && matches!(
                    c.attribute("name"),
                    Some("dc-version" | "cluster-infrastructure" | "last-lrm-refresh" | "have-watchdog")
                ))
        })
        .map(canonical)
        .collect();
    format!("<{} {}>{}</>", n.tag_name().name(), attrs.join(" "), kids.join(""))
}

/// What an instantiate could change: the CIB's whole configuration section (cluster properties,
/// nodes, resources, constraints, defaults, tags, ...), libvirt's domains on every host, and the storage
/// directory's files with their hashes.
#[derive(Debug, PartialEq, Eq)]
struct State {
    configuration: String,
    domains: BTreeMap<u8, String>,
    files: BTreeMap<String, String>,
}

fn state(lab: &Lab) -> State {
    let xml = lab
        .exec_ok(1, &["cibadmin", "--query", "--scope", "configuration"])
        .unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let configuration = canonical(doc.root_element());
    let domains = lab
        .cfg
        .host_numbers()
        .map(|n| {
            let list = lab
                .exec_ok(n, &["virsh", "-c", "qemu:///system", "list", "--all", "--name"])
                .unwrap();
            (n, list.trim().to_string())
        })
        .collect();
    let mut files = BTreeMap::new();
    let mut dirs = vec![lab.cfg.shared_dir()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let p = e.path();
            if t.is_dir() {
                dirs.push(p);
            } else if t.is_file() {
                files.insert(p.display().to_string(), sha256(&p));
            } else {
                files.insert(p.display().to_string(), format!("{t:?}"));
            }
        }
    }
    State {
        configuration,
        domains,
        files,
    }
}

/// The archive's tar entries (name, data), decompressed.
fn entries(archive_bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let tar_bytes = zstd::decode_all(archive_bytes).unwrap();
    let mut a = tar::Archive::new(tar_bytes.as_slice());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

fn pack(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap()
}

/// The genuine archive with metadata entry `name` rewritten by `edit` and re-summed in the manifest: a
/// consistent archive, as an attacker makes one.
fn rewrite(genuine: &[u8], name: &str, edit: impl Fn(&str) -> String) -> Vec<u8> {
    let mut e = entries(genuine);
    let i = e.iter().position(|(n, _)| n == name).unwrap();
    let old = String::from_utf8(e[i].1.clone()).unwrap();
    let new = edit(&old);
    assert_ne!(old, new, "the edit of {name} changed nothing");
    e[i].1 = new.into_bytes();
    assert_eq!(e[0].0, archive::MANIFEST);
    let mut m: serde_json::Value = serde_json::from_slice(&e[0].1).unwrap();
    m["files"][name] = serde_json::to_value(FileSum::of(&e[i].1)).unwrap();
    e[0].1 = serde_json::to_vec(&m).unwrap();
    pack(&e)
}

/// The genuine archive with a GNU long-name header claiming 1 TiB right after the manifest.
fn long_name_bomb(genuine: &[u8]) -> Vec<u8> {
    let mut tar_bytes = zstd::decode_all(genuine).unwrap();
    let first = tar::Header::from_byte_slice(&tar_bytes[..512]).size().unwrap();
    let at = 512 + first.div_ceil(512) as usize * 512;
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_cksum();
    tar_bytes.splice(at..at, h.as_bytes().iter().copied());
    zstd::encode_all(tar_bytes.as_slice(), 1).unwrap()
}

#[test]
#[ignore = "lab scenario: needs root and the lab's daemons (run ci/test)"]
fn hostile_archives_are_refused() {
    let lab = vmha_e2e::lab();
    // The lab's own directory (labs of other names may run this scenario at the same time).
    let archives = PathBuf::from(format!("/var/tmp/vmha-lab/{}-archives", lab.cfg.name));
    std::fs::create_dir_all(&archives).unwrap();
    for n in lab.cfg.host_numbers() {
        lab.start_vmhad(n).expect("starting vmhad");
    }
    let shared = lab.cfg.shared_dir();
    let subnet = lab.cfg.subnet.clone();
    let vip = format!("{subnet}.100");

    // The virtual cluster: two VMs with disks and a virtual IP with them.
    let mut disk_sums = BTreeMap::new();
    for vm in VMS {
        let disk = shared.join(format!("{vm}.img"));
        write_disk(&disk, vm);
        disk_sums.insert(vm, sha256(&disk));
        let xml = shared.join(format!("{vm}.xml"));
        std::fs::write(&xml, domain_with_raw_disk(&lab, vm)).unwrap();
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
    let ip = format!("ip={vip}");
    lab.exec_ok(
        1,
        &[
            "pcs",
            "resource",
            "create",
            "h1vip",
            "ocf:heartbeat:IPaddr2",
            &ip,
            "cidr_netmask=24",
        ],
    )
    .unwrap();
    lab.exec_ok(
        1,
        &[
            "pcs",
            "constraint",
            "colocation",
            "add",
            "h1vip",
            "with",
            "h1web",
            "INFINITY",
        ],
    )
    .unwrap();
    vmha_long_ok(&lab, 1, &["vcluster", "create", "h1shop", "h1web", "h1db", "h1vip"]);
    for vm in VMS {
        wait_running(&lab, vm, Duration::from_secs(300));
    }

    // An operator key.
    let key = archives.join("h1-operator.key");
    let public = archives.join("h1-operator.key.pub");
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(&public);
    let out = vmha_long_ok(&lab, 1, &["vcluster", "keygen", "-o", key.to_str().unwrap()]);
    let fingerprint = out
        .split_whitespace()
        .find(|w| w.starts_with("ed25519:"))
        .map(|w| w.trim_end_matches(')').to_string())
        .unwrap_or_else(|| panic!("no fingerprint in {out}"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "the secret key file's mode"
    );

    // The genuine archive (cold: the VMs stop while their disks are copied), signed.
    let genuine_path = archives.join("genuine.vca");
    let _ = std::fs::remove_file(&genuine_path);
    let out = vmha_long_ok(
        &lab,
        1,
        &[
            "vcluster",
            "capture",
            "h1shop",
            "--out",
            genuine_path.to_str().unwrap(),
            "--with-disks",
            "--halt",
            "--sign",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.contains(&format!("signed by {fingerprint}")), "{out}");
    let signed = std::fs::read(&genuine_path).unwrap();
    let names: Vec<String> = entries(&signed).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[1], archive::MANIFEST_SIG, "{names:?}");
    assert_eq!(names.last().unwrap(), archive::CHUNKS_SIG, "{names:?}");
    // The same archive unsigned: what the hostile archives are made from.
    let unsigned: Vec<(String, Vec<u8>)> = entries(&signed)
        .into_iter()
        .filter(|(n, _)| n != archive::MANIFEST_SIG && n != archive::CHUNKS_SIG)
        .collect();
    let genuine = pack(&unsigned);
    let unsigned_path = archives.join("genuine-unsigned.vca");
    std::fs::write(&unsigned_path, &genuine).unwrap();

    // Remove the virtual cluster, so that the genuine archive can come back at the end.
    vmha_long_ok(&lab, 1, &["vcluster", "remove", "h1shop"]);
    for r in ["h1vip", "h1web", "h1db"] {
        lab.exec_ok(1, &["pcs", "resource", "delete", r]).unwrap();
    }
    wait_for("the VMs gone", Duration::from_secs(180), POLL, || {
        VMS.iter().all(|vm| lab.qemu_processes(vm).is_empty()).then_some(())
    })
    .unwrap();
    for vm in VMS {
        std::fs::remove_file(shared.join(format!("{vm}.xml"))).unwrap();
        std::fs::remove_file(shared.join(format!("{vm}.img"))).unwrap();
    }

    let storage = format!("storage={}:{}", shared.display(), shared.display());
    // The guest kernel and initrd are storage too (both clusters have them).
    let images = format!("storage={}:{}", image_dir().display(), image_dir().display());
    let maps = ["--map", &storage, "--map", &images];
    let before = state(&lab);
    let web = "domains/h1web.xml";
    let qemu_args = "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
        <qemu:arg value='-writeconfig'/><qemu:arg value='/tmp/h1-pwned.cfg'/></qemu:commandline></domain>";
    let block = "<devices>\n    <disk type='block' device='disk'><source dev='/dev/loop0'/><target dev='vdz' bus='virtio'/></disk>";
    let web_img = format!("{}/h1web.img", shared.display());
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "host-file-as-disk",
            rewrite(&genuine, web, |x| x.replace(&web_img, "/etc/shadow")),
            "<source file='/etc/shadow'> in <disk>: file /etc/shadow is outside every storage root".into(),
        ),
        (
            "qemu-args",
            rewrite(&genuine, web, |x| x.replace("</domain>", qemu_args)),
            "<qemu:commandline>".into(),
        ),
        (
            "seclabel",
            rewrite(&genuine, web, |x| {
                x.replace(
                    "</domain>",
                    "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel></domain>",
                )
            }),
            "<seclabel type='static' model='dac' relabel='no'>: security label override".into(),
        ),
        (
            "block-device",
            rewrite(&genuine, web, |x| x.replacen("<devices>", block, 1)),
            "<disk type='block' device='disk'>: a block disk reaches host storage directly".into(),
        ),
        (
            "agent",
            rewrite(&genuine, archive::RESOURCES, |x| {
                x.replace("type=\"IPaddr2\"", "type=\"anything\"").replace(
                    "name=\"cidr_netmask\" value=\"24\"",
                    "name=\"binfile\" value=\"/usr/bin/touch /tmp/h1-pwned\"",
                )
            }),
            "agent ocf:heartbeat:anything is not allowed".into(),
        ),
        (
            "foreign-cib-section",
            rewrite(&genuine, archive::RESOURCES, |_| {
                "<crm_config><cluster_property_set id=\"h1evil\">\
                 <nvpair id=\"h1evil-stonith\" name=\"stonith-enabled\" value=\"false\"/>\
                 </cluster_property_set></crm_config>"
                    .into()
            }),
            "cluster/resources.xml: the root element is <crm_config>, not <resources>".into(),
        ),
        (
            "path-out-of-storage",
            rewrite(&genuine, archive::RESOURCES, |x| {
                x.replace(
                    &format!("{}/h1web.xml", shared.display()),
                    &format!("{}/../../../../../etc/h1-evil.xml", shared.display()),
                )
            }),
            "outside every storage root".into(),
        ),
        (
            "long-name-bomb",
            long_name_bomb(&genuine),
            "GNU long-name extension header".into(),
        ),
    ];
    for (what, data, expect) in &cases {
        let path = archives.join(format!("hostile-{what}.vca"));
        std::fs::write(&path, data).unwrap();
        for dry in [true, false] {
            let mut args = vec!["vcluster", "instantiate", path.to_str().unwrap()];
            args.extend(maps);
            if dry {
                args.push("--dry-run");
            }
            let (code, out, err) = vmha_long(&lab, 2, &args);
            println!("{what} (dry run: {dry}): exit {code}: {}", err.trim());
            assert_ne!(code, 0, "{what} accepted: {out}");
            assert!(err.contains(expect.as_str()), "{what}: expected {expect:?} in {err}");
            assert_eq!(state(&lab), before, "{what} (dry run: {dry}) changed something");
        }
    }
    for n in lab.cfg.host_numbers() {
        for f in ["/tmp/h1-pwned", "/tmp/h1-pwned.cfg", "/etc/h1-evil.xml"] {
            assert!(!exists_on(&lab, n, f), "{f} exists on host {n}");
        }
    }

    // An opt-in is shown in the plan (dry run).
    let path = archives.join("hostile-agent.vca");
    let mut args = vec![
        "vcluster",
        "instantiate",
        path.to_str().unwrap(),
        "--dry-run",
        "--allow-agent",
        "ocf:heartbeat:anything",
    ];
    args.extend(maps);
    let out = vmha_long_ok(&lab, 2, &args);
    println!("dry run with --allow-agent:\n{out}");
    assert!(out.contains("ALLOWED beyond the safe subset"), "{out}");
    assert!(
        out.contains("resource h1vip with agent ocf:heartbeat:anything"),
        "{out}"
    );
    assert!(out.contains("param binfile=/usr/bin/touch /tmp/h1-pwned"), "{out}");
    assert!(out.contains("archive: unsigned"), "{out}");
    assert_eq!(state(&lab), before, "a dry run changed something");

    // Signatures: an unsigned archive is refused with --require-signature; a signed one with an entry
    // edited and re-summed is refused by its signature (required or not); a signature by a key that is
    // not trusted is refused with --require-signature; a secret key given as a trusted key is refused
    // without showing it. Each before anything is created.
    let tampered_path = archives.join("hostile-signed-tampered.vca");
    std::fs::write(
        &tampered_path,
        rewrite(&signed, web, |x| x.replace(&web_img, "/etc/shadow")),
    )
    .unwrap();
    let trusted = public.to_str().unwrap();
    let signature_cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (
            &unsigned_path,
            vec!["--require-signature", "--trusted-key", trusted],
            "signature: the archive is unsigned, and a signature by a trusted key is required",
        ),
        (
            &tampered_path,
            vec!["--require-signature", "--trusted-key", trusted],
            "does not match MANIFEST.json: the archive was altered after it was signed",
        ),
        (
            &tampered_path,
            vec![],
            "does not match MANIFEST.json: the archive was altered after it was signed",
        ),
        (
            &genuine_path,
            vec!["--require-signature", "--trusted-key", key.to_str().unwrap()],
            "this is a secret key file, not a public one",
        ),
    ];
    let secret = std::fs::read_to_string(&key).unwrap();
    let seed = secret.split_whitespace().nth(1).unwrap().to_string();
    for (path, extra, expect) in &signature_cases {
        for dry in [true, false] {
            let mut args = vec!["vcluster", "instantiate", path.to_str().unwrap()];
            args.extend(maps);
            args.extend(extra.iter().copied());
            if dry {
                args.push("--dry-run");
            }
            let (code, out, err) = vmha_long(&lab, 2, &args);
            println!(
                "{} {extra:?} (dry run: {dry}): exit {code}: {}",
                path.display(),
                err.trim()
            );
            assert_ne!(code, 0, "{} {extra:?} accepted: {out}", path.display());
            assert!(err.contains(expect), "{}: expected {expect:?} in {err}", path.display());
            assert!(!err.contains(&seed) && !out.contains(&seed), "the secret key was shown");
            assert_eq!(
                state(&lab),
                before,
                "{} {extra:?} (dry run: {dry}) changed something",
                path.display()
            );
        }
    }
    // A key the target does not trust (none in /etc/vmha/trusted-keys here).
    let mut args = vec![
        "vcluster",
        "instantiate",
        genuine_path.to_str().unwrap(),
        "--dry-run",
        "--require-signature",
    ];
    args.extend(maps);
    let (code, out, err) = vmha_long(&lab, 2, &args);
    assert_ne!(code, 0, "an untrusted signer accepted: {out}");
    assert!(
        err.contains(&format!("signed by {fingerprint}, which is not a trusted key")),
        "{err}"
    );
    assert_eq!(state(&lab), before, "a refused dry run changed something");

    // The genuine archive instantiates, its signature required: its VMs run from their copied disks.
    let mut args = vec!["vcluster", "instantiate", genuine_path.to_str().unwrap()];
    args.extend(maps);
    args.extend(["--require-signature", "--trusted-key", trusted]);
    let out = vmha_long_ok(&lab, 2, &args);
    println!("genuine instantiate:\n{out}");
    assert!(
        out.contains(&format!("archive: signed by {fingerprint} (trusted: {trusted})")),
        "the plan names the signer: {out}"
    );
    assert!(
        out.contains("disk type=file device=disk"),
        "the plan lists the disks: {out}"
    );
    for vm in VMS {
        wait_running(&lab, vm, Duration::from_secs(300));
    }
    // The lab guests do not write to these raw disks: their content is the archive's.
    for vm in VMS {
        assert_eq!(sha256(&shared.join(format!("{vm}.img"))), disk_sums[vm], "{vm}'s disk");
    }
    println!("hostile archives scenario passed");
}

/// Whether `path` exists on host `n` (`test -e`).
fn exists_on(lab: &Lab, n: u8, path: &str) -> bool {
    lab.exec_with_deadline(n, &["test", "-e", path], Duration::from_secs(10))
        .unwrap()
        .status
        .success()
}
