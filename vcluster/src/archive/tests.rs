use super::*;

fn manifest(name: &str) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        vmha_version: "0.1.0".into(),
        name: name.into(),
        source_cluster: Some("a".into()),
        hosts: vec!["node1".into(), "node2".into()],
        created: rfc3339(0),
        consistency: "frozen".into(),
        members: vec!["web".into()],
        vms: vec![VmEntry {
            resource: "web".into(),
            domain_file: "domains/web.xml".into(),
        }],
        placement: BTreeMap::from([("web".into(), "node1".into())]),
        disks: vec![],
        files: BTreeMap::new(),
    }
}

/// A valid archive (optionally with a disk made of `disk` bytes).
fn good(disk: Option<&[u8]>) -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new(), 1).unwrap();
    w.add_file(RESOURCES, b"<resources/>").unwrap();
    w.add_file(CONSTRAINTS, b"<constraints/>").unwrap();
    w.add_file(TAG, b"<tag id='t'><obj_ref id='web'/></tag>").unwrap();
    w.add_file("domains/web.xml", b"<domain><name>web</name></domain>")
        .unwrap();
    if let Some(data) = disk {
        let dir = std::env::temp_dir().join(format!("vmha-vc-test-{}-{}", std::process::id(), data.len()));
        std::fs::write(&dir, data).unwrap();
        let f = File::open(&dir).unwrap();
        w.add_disk("web", "/shared/web.img", &f, &mut |_| {}).unwrap();
        std::fs::remove_file(&dir).unwrap();
    }
    w.finish(manifest("t")).unwrap().0
}

/// Raw tar entries (no path checks), each (name, type, data), then the manifest listing `listed`
/// (`None`: list every entry with its real checksum), compressed.
fn raw(entries: &[(&str, tar::EntryType, &[u8])], manifest_override: Option<Manifest>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut m = manifest("t");
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            h.set_link_name("/etc/shadow").unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
        m.files.insert(
            name.to_string(),
            FileSum {
                size: data.len() as u64,
                sha256: sha256_hex(data),
            },
        );
    }
    let m = manifest_override.unwrap_or(m);
    let json = serde_json::to_vec(&m).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path(MANIFEST).unwrap();
    h.set_size(json.len() as u64);
    h.set_cksum();
    b.append(&h, json.as_slice()).unwrap();
    zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap()
}

const BASE: [(&str, tar::EntryType, &[u8]); 4] = [
    (RESOURCES, tar::EntryType::Regular, b"<resources/>"),
    (CONSTRAINTS, tar::EntryType::Regular, b"<constraints/>"),
    (TAG, tar::EntryType::Regular, b"<tag/>"),
    ("domains/web.xml", tar::EntryType::Regular, b"<domain/>"),
];

fn with(extra: (&'static str, tar::EntryType, &'static [u8])) -> Vec<u8> {
    let mut e = BASE.to_vec();
    e.push(extra);
    raw(&e, None)
}

fn rejected(archive: &[u8]) -> String {
    match verify(archive) {
        Ok(_) => panic!("accepted a bad archive"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_written_archive_verifies_with_its_metadata() {
    let v = verify(good(None).as_slice()).unwrap();
    assert_eq!(v.manifest.name, "t");
    assert_eq!(v.text("domains/web.xml").unwrap(), "<domain><name>web</name></domain>");
    assert_eq!(v.manifest.files.len(), 4);
    assert!(v.manifest.files[TAG].sha256.len() == 64);
}

#[test]
fn raw_builder_makes_valid_archives() {
    // The hostile cases below differ from this one in one point only.
    verify(raw(&BASE, None).as_slice()).unwrap();
}

#[test]
fn disks_are_sparse_and_come_back_identical() {
    let mut data = vec![0u8; (CHUNK * 3 + 1000) as usize];
    data[10] = 1;
    data[(CHUNK * 2 + 5) as usize] = 7;
    let last = data.len() - 1;
    data[last] = 9;
    let archive = good(Some(&data));
    let v = verify(archive.as_slice()).unwrap();
    let disk = &v.manifest.disks[0];
    assert_eq!(disk.size, data.len() as u64);
    assert_eq!(disk.chunks, 3, "the all-zero second chunk is a hole");
    let out = std::env::temp_dir().join(format!("vmha-vc-out-{}", std::process::id()));
    let mut progress = 0;
    extract_disks(
        archive.as_slice(),
        &v.manifest,
        &mut |_| Ok(File::options().create(true).truncate(true).write(true).open(&out)?),
        &mut |n| progress = n,
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(progress, disk.stored);
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn truncated_archives_are_rejected() {
    let a = good(Some(&[5u8; 100_000]));
    for cut in [a.len() - 1, a.len() / 2, 20, 3] {
        let msg = rejected(&a[..cut]);
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }
    assert!(rejected(&[]).contains("truncated"));
}

#[test]
fn tampered_entries_fail_their_checksum() {
    let mut m = manifest("t");
    for (name, _, data) in &BASE {
        m.files.insert(
            name.to_string(),
            FileSum {
                size: data.len() as u64,
                sha256: sha256_hex(data),
            },
        );
    }
    m.files.get_mut(TAG).unwrap().sha256 = sha256_hex(b"something else");
    let msg = rejected(&raw(&BASE, Some(m)));
    assert!(
        msg.contains("tampered") && msg.contains("checksum mismatch for cluster/tag.xml"),
        "{msg}"
    );
}

#[test]
fn hostile_paths_are_rejected() {
    for (name, want) in [
        ("/etc/passwd", "absolute path"),
        ("../../etc/passwd", "'..'"),
        ("domains/../../x.xml", "'..'"),
        ("domains//web2.xml", "empty"),
        ("./cluster/tag2.xml", "'.'"),
    ] {
        let msg = rejected(&with((name, tar::EntryType::Regular, b"x")));
        assert!(msg.contains("hostile") && msg.contains(want), "{name}: {msg}");
    }
}

#[test]
fn links_devices_and_other_types_are_rejected() {
    for (kind, want) in [
        (tar::EntryType::Symlink, "symbolic link"),
        (tar::EntryType::Link, "hard link"),
        (tar::EntryType::Char, "character device"),
        (tar::EntryType::Block, "block device"),
        (tar::EntryType::Fifo, "FIFO"),
        (tar::EntryType::Directory, "directory"),
    ] {
        let msg = rejected(&with(("domains/db.xml", kind, b"")));
        assert!(msg.contains("hostile") && msg.contains(want), "{want}: {msg}");
    }
}

#[test]
fn oversized_entries_are_rejected_before_being_read() {
    let big = vec![0u8; (MAX_METADATA + 1) as usize];
    let mut e = BASE.to_vec();
    e.push(("domains/big.xml", tar::EntryType::Regular, &big));
    let msg = rejected(&raw(&e, None));
    assert!(msg.contains("oversized"), "{msg}");
    let chunk = vec![1u8; (CHUNK + 1) as usize];
    let mut e = BASE.to_vec();
    e.push(("disks/0/0000000000000000", tar::EntryType::Regular, &chunk));
    assert!(rejected(&raw(&e, None)).contains("oversized"));
}

#[test]
fn wrong_format_version_is_named() {
    let mut m = manifest("t");
    m.format_version = 2;
    let msg = rejected(&raw(&BASE, Some(m)));
    assert!(msg.contains("format version 2"), "{msg}");
}

#[test]
fn unknown_and_missing_entries_are_rejected() {
    // In the layout but not listed in the manifest.
    let mut m = manifest("t");
    for (name, _, data) in &BASE[..3] {
        m.files.insert(
            name.to_string(),
            FileSum {
                size: data.len() as u64,
                sha256: sha256_hex(data),
            },
        );
    }
    let msg = rejected(&raw(&BASE, Some(m.clone())));
    assert!(msg.contains("domains/web.xml is not listed"), "{msg}");
    // Listed but absent.
    m.files.insert(
        "domains/web.xml".into(),
        FileSum {
            size: 9,
            sha256: sha256_hex(b"<domain/>"),
        },
    );
    m.files.insert(
        "domains/db.xml".into(),
        FileSum {
            size: 1,
            sha256: sha256_hex(b"x"),
        },
    );
    let msg = rejected(&raw(&BASE, Some(m)));
    assert!(msg.contains("lists domains/db.xml, which the archive lacks"), "{msg}");
    // Outside the layout.
    let msg = rejected(&with(("etc/cron.d/x", tar::EntryType::Regular, b"x")));
    assert!(msg.contains("not part of the archive layout"), "{msg}");
    // No manifest at all.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path(TAG).unwrap();
    h.set_size(1);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let a = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
    assert!(rejected(&a).contains("no MANIFEST.json"));
}

#[test]
fn duplicate_entries_and_entries_after_the_manifest_are_rejected() {
    let mut e = BASE.to_vec();
    e.push(BASE[0]);
    assert!(rejected(&raw(&e, None)).contains("appears twice"));
}

#[test]
fn not_zstd_is_rejected() {
    let msg = rejected(b"PK\x03\x04 this is a zip");
    assert!(msg.contains("truncated or corrupt"), "{msg}");
}

#[test]
fn rfc3339_formats_known_dates() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(1_795_315_621), "2026-11-22T02:47:01Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
}
