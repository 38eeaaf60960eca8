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

/// Disk 0 of VM web, `size` bytes.
fn web_disk(size: u64) -> DiskEntry {
    DiskEntry {
        id: 0,
        vm: "web".into(),
        path: "/shared/web.img".into(),
        size,
    }
}

fn metadata() -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([
        (RESOURCES.to_string(), b"<resources/>".to_vec()),
        (CONSTRAINTS.to_string(), b"<constraints/>".to_vec()),
        (TAG.to_string(), b"<tag id='t'><obj_ref id='web'/></tag>".to_vec()),
        (
            "domains/web.xml".to_string(),
            b"<domain><name>web</name></domain>".to_vec(),
        ),
    ])
}

fn temp(what: &str) -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "vmha-vc-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A valid archive (optionally with a disk made of `disk` bytes).
fn good(disk: Option<&[u8]>) -> Vec<u8> {
    let mut m = manifest("t");
    let path = temp("disk");
    if let Some(data) = disk {
        std::fs::write(&path, data).unwrap();
        m.disks.push(web_disk(data.len() as u64));
    }
    let mut w = ArchiveWriter::new(Vec::new(), 1, m, &metadata()).unwrap();
    if disk.is_some() {
        let f = File::open(&path).unwrap();
        w.add_disk(&f, &mut |_| {}).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
    w.finish().unwrap().0
}

fn entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    let bytes = name.as_bytes();
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
        h.set_link_name("/etc/shadow").unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// Raw tar entries (no path checks), each (name, type, data), between a manifest (`None`: one listing
/// every metadata entry with its real checksum) and a chunk list listing every `disks/` entry,
/// compressed.
fn raw(entries: &[(&str, tar::EntryType, &[u8])], manifest_override: Option<Manifest>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut m = manifest("t");
    let mut chunks = ChunkList::default();
    for (name, _, data) in entries {
        if name.starts_with("disks/") {
            chunks.chunks.insert(name.to_string(), FileSum::of(data));
        } else {
            m.files.insert(name.to_string(), FileSum::of(data));
        }
    }
    if chunks.chunks.keys().any(|c| c.starts_with("disks/0/")) {
        m.disks.push(web_disk(4 * CHUNK));
    }
    let m = manifest_override.unwrap_or(m);
    entry(
        &mut b,
        MANIFEST,
        tar::EntryType::Regular,
        &serde_json::to_vec(&m).unwrap(),
    );
    for (name, kind, data) in entries {
        entry(&mut b, name, *kind, data);
    }
    entry(
        &mut b,
        CHUNK_LIST,
        tar::EntryType::Regular,
        &serde_json::to_vec(&chunks).unwrap(),
    );
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

/// A tar stream holding the manifest of [`BASE`] and its entries (no chunk list yet).
fn head_only() -> tar::Builder<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let m = serde_json::to_vec(&base_manifest()).unwrap();
    entry(&mut b, MANIFEST, tar::EntryType::Regular, &m);
    for (name, kind, data) in &BASE {
        entry(&mut b, name, *kind, data);
    }
    b
}

fn base_manifest() -> Manifest {
    let mut m = manifest("t");
    for (name, _, data) in &BASE {
        m.files.insert(name.to_string(), FileSum::of(data));
    }
    m
}

#[test]
fn a_written_archive_verifies_with_its_metadata() {
    let v = verify(good(None).as_slice()).unwrap();
    assert_eq!(v.manifest.name, "t");
    assert_eq!(v.manifest.format_version, FORMAT_VERSION);
    assert_eq!(v.text("domains/web.xml").unwrap(), "<domain><name>web</name></domain>");
    assert_eq!(v.manifest.files.len(), 4);
    assert!(v.manifest.files[TAG].blake3.len() == 64);
    assert!(v.chunks.chunks.is_empty());
}

#[test]
fn raw_builder_makes_valid_archives() {
    // The hostile cases below differ from this one in one point only.
    verify(raw(&BASE, None).as_slice()).unwrap();
    let mut e = BASE.to_vec();
    e.push(("disks/0/0000000000000000", tar::EntryType::Regular, b"data"));
    verify(raw(&e, None).as_slice()).unwrap();
}

#[test]
fn disks_are_sparse_and_come_back_identical_in_one_pass() {
    let mut data = vec![0u8; (CHUNK * 3 + 1000) as usize];
    data[10] = 1;
    data[(CHUNK * 2 + 5) as usize] = 7;
    let last = data.len() - 1;
    data[last] = 9;
    let archive = good(Some(&data));
    let out = temp("out");
    let mut heads = 0;
    let mut progress = 0;
    let v = read(
        archive.as_slice(),
        |head: &Verified| -> Result<_, ArchiveError> {
            heads += 1;
            // The metadata is checked and the disk data not yet read when the destination is asked for.
            assert_eq!(head.text(TAG).unwrap(), "<tag id='t'><obj_ref id='web'/></tag>");
            assert!(head.chunks.chunks.is_empty());
            assert_eq!(head.manifest.disks[0].size, data.len() as u64);
            let f = File::options().create_new(true).write(true).open(&out)?;
            Ok(Some(BTreeMap::from([(0, f)])))
        },
        &mut |n| progress = n,
    )
    .unwrap();
    assert_eq!(heads, 1);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let stats = v.stats(0);
    assert_eq!(stats.chunks, 3, "the all-zero second chunk is a hole");
    assert_eq!(stats.stored, data.len() as u64 - CHUNK);
    assert_eq!(progress, archive.len() as u64, "progress counts the archive's bytes");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn a_disk_that_changes_size_while_captured_is_refused() {
    let path = temp("grow");
    std::fs::write(&path, [1u8; 1000]).unwrap();
    let mut m = manifest("t");
    m.disks.push(web_disk(500));
    let mut w = ArchiveWriter::new(Vec::new(), 1, m, &metadata()).unwrap();
    let e = w.add_disk(&File::open(&path).unwrap(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("changed size"), "{e}");
    std::fs::remove_file(&path).unwrap();
    // And a writer cannot finish without every listed disk.
    let mut m = manifest("t");
    m.disks.push(web_disk(500));
    let w = ArchiveWriter::new(Vec::new(), 1, m, &metadata()).unwrap();
    assert!(w.finish().unwrap_err().to_string().contains("1 disks, 0 were added"));
}

#[test]
fn a_refusal_at_the_head_stops_the_read_without_writing() {
    let archive = good(Some(&[3u8; 100_000]));
    let r = read(
        archive.as_slice(),
        |_| -> Result<Option<DiskFiles>, String> { Err("target not ready".into()) },
        &mut |_| {},
    );
    assert_eq!(r.unwrap_err(), "target not ready");
}

impl From<ArchiveError> for String {
    fn from(e: ArchiveError) -> String {
        e.to_string()
    }
}

#[test]
fn truncated_archives_are_rejected() {
    let a = good(Some(&[5u8; 100_000]));
    for cut in [a.len() - 1, a.len() / 2, 20, 3] {
        let msg = rejected(&a[..cut]);
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }
    assert!(rejected(&[]).contains("truncated"));
    // A stream that ends cleanly before its chunk list.
    let b = head_only();
    let a = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
    assert!(rejected(&a).contains("no CHUNKS.json"));
}

#[test]
fn tampered_entries_fail_their_checksum() {
    let mut m = base_manifest();
    m.files.get_mut(TAG).unwrap().blake3 = hash_hex(b"something else");
    let msg = rejected(&raw(&BASE, Some(m)));
    assert!(
        msg.contains("tampered") && msg.contains("checksum mismatch for cluster/tag.xml"),
        "{msg}"
    );
    // A disk chunk changed after capture: found against the chunk list, and a reader that wrote it learns
    // of it from the error.
    let mut a = tar::Archive::new(
        zstd::decode_all(good(Some(&[5u8; 100_000])).as_slice())
            .unwrap()
            .as_slice(),
    )
    .entries()
    .unwrap()
    .map(|e| {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        (name, data)
    })
    .collect::<Vec<_>>();
    let chunk = a.iter_mut().find(|(n, _)| n.starts_with("disks/")).unwrap();
    chunk.1[7] ^= 1;
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in &a {
        entry(&mut b, name, tar::EntryType::Regular, data);
    }
    let bytes = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
    let msg = rejected(&bytes);
    assert!(msg.contains("checksum mismatch for disks/0/0000000000000000"), "{msg}");
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
    let mut m = base_manifest();
    // Format 2 (SHA-256 sums) is as foreign as any other.
    m.format_version = 2;
    let msg = rejected(&raw(&BASE, Some(m)));
    assert!(
        msg.contains("format version 2; this vmha reads format version 3"),
        "{msg}"
    );
}

#[test]
fn unknown_missing_and_misplaced_entries_are_rejected() {
    // In the layout but not listed in the manifest.
    let mut m = base_manifest();
    m.files.remove("domains/web.xml");
    m.vms.clear();
    m.members.clear();
    let msg = rejected(&raw(&BASE, Some(m.clone())));
    assert!(msg.contains("domains/web.xml is not listed"), "{msg}");
    // Listed but absent.
    m.files.insert("domains/web.xml".into(), FileSum::of(b"<domain/>"));
    m.files.insert("domains/db.xml".into(), FileSum::of(b"x"));
    let msg = rejected(&raw(&BASE, Some(m)));
    assert!(msg.contains("lists domains/db.xml, which the archive lacks"), "{msg}");
    // Outside the layout.
    let msg = rejected(&with(("etc/cron.d/x", tar::EntryType::Regular, b"x")));
    assert!(msg.contains("not part of the archive layout"), "{msg}");
    // A chunk of a disk the manifest does not list.
    let msg = rejected(&with(("disks/7/0000000000000000", tar::EntryType::Regular, b"x")));
    assert!(msg.contains("belongs to no listed disk"), "{msg}");
    // No manifest first.
    let mut b = tar::Builder::new(Vec::new());
    entry(&mut b, TAG, tar::EntryType::Regular, b"x");
    let a = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
    assert!(rejected(&a).contains("starts with cluster/tag.xml, not with MANIFEST.json"));
    // Metadata after the disk data, and anything after the chunk list.
    let mut e = BASE[..3].to_vec();
    e.push(("disks/0/0000000000000000", tar::EntryType::Regular, b"data"));
    e.push(BASE[3]);
    let msg = rejected(&raw(&e, None));
    assert!(
        msg.contains("lists domains/web.xml, which the archive lacks before its disk data"),
        "{msg}"
    );
    let mut e = BASE.to_vec();
    e.push(("disks/0/0000000000000000", tar::EntryType::Regular, b"data"));
    e.push(("domains/db.xml", tar::EntryType::Regular, b"x"));
    let mut m = base_manifest();
    m.disks.push(web_disk(CHUNK));
    let msg = rejected(&raw(&e, Some(m)));
    assert!(msg.contains("\"domains/db.xml\" comes after the disk data"), "{msg}");
    let mut b = head_only();
    entry(&mut b, CHUNK_LIST, tar::EntryType::Regular, b"{\"chunks\":{}}");
    entry(&mut b, "domains/late.xml", tar::EntryType::Regular, b"x");
    let a = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
    assert!(rejected(&a).contains("follows CHUNKS.json"));
}

#[test]
fn duplicate_entries_are_rejected() {
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

/// A raw tar header block of `kind` claiming `size` bytes, named `name`.
fn raw_header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

#[test]
fn long_name_and_pax_headers_are_refused_before_being_read() {
    // A long-name header claiming a terabyte, with nothing behind it: the tar crate would read (and
    // allocate) it whole before returning an entry; it is refused by its header.
    for (kind, want) in [
        (tar::EntryType::GNULongName, "GNU long-name extension header"),
        (tar::EntryType::GNULongLink, "GNU long-name extension header"),
        (tar::EntryType::XHeader, "PAX extension header"),
        (tar::EntryType::XGlobalHeader, "PAX extension header"),
        (tar::EntryType::GNUSparse, "GNU sparse file"),
    ] {
        let mut b = head_only();
        b.get_mut()
            .extend_from_slice(raw_header("././@LongLink", kind, 1 << 40).as_bytes());
        let a = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
        let msg = rejected(&a);
        assert!(msg.contains("hostile") && msg.contains(want), "{kind:?}: {msg}");
    }
    // A genuine long name as the tar crate writes it (a GNU long-name entry first) is refused too.
    let mut b = head_only();
    let long = format!("domains/{}.xml", "a".repeat(120));
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, &long, b"x".as_slice()).unwrap();
    let a = zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap();
    assert!(rejected(&a).contains("GNU long-name extension header"));
}

#[test]
fn metadata_is_capped_in_total() {
    let big = vec![b'x'; (MAX_METADATA - 1) as usize];
    let names: Vec<String> = (0..5).map(|i| format!("domains/d{i}.xml")).collect();
    let mut e = BASE.to_vec();
    for n in &names {
        e.push((n.as_str(), tar::EntryType::Regular, big.as_slice()));
    }
    let msg = rejected(&raw(&e, None));
    assert!(msg.contains("metadata entries hold more than"), "{msg}");
}

#[test]
fn chunk_offsets_and_disk_sizes_cannot_overflow() {
    // A chunk at the last possible offset of a disk claiming the largest size.
    let mut m = base_manifest();
    m.disks.push(DiskEntry {
        id: 0,
        vm: "web".into(),
        path: "/shared/web.img".into(),
        size: i64::MAX as u64,
    });
    let last = (u64::MAX / CHUNK) * CHUNK;
    let name = format!("disks/0/{last:016x}");
    let mut e = BASE.to_vec();
    e.push((name.as_str(), tar::EntryType::Regular, b"data"));
    let msg = rejected(&raw(&e, Some(m.clone())));
    assert!(msg.contains("ends beyond its disk's size"), "{msg}");
    // Sizes that add up past 2^64.
    m.disks.push(DiskEntry {
        id: 1,
        vm: "web".into(),
        path: "/shared/web2.img".into(),
        size: i64::MAX as u64,
    });
    m.disks.push(DiskEntry {
        id: 2,
        vm: "web".into(),
        path: "/shared/web3.img".into(),
        size: i64::MAX as u64,
    });
    let msg = rejected(&raw(&BASE, Some(m.clone())));
    assert!(msg.contains("add up to more than"), "{msg}");
    m.disks.truncate(1);
    m.disks[0].size = u64::MAX;
    assert!(rejected(&raw(&BASE, Some(m))).contains("more than a file can hold"));
}

mod signed {
    use super::*;
    use crate::signature::{SecretKey, TrustedKey};

    /// Every entry of an archive, in order (the archive must be well-formed tar).
    fn unpack(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let tar = zstd::decode_all(archive).unwrap();
        let mut a = tar::Archive::new(tar.as_slice());
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, data)
            })
            .collect()
    }

    fn repack(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            entry(&mut b, name, tar::EntryType::Regular, data);
        }
        zstd::encode_all(b.into_inner().unwrap().as_slice(), 1).unwrap()
    }

    /// An archive with a 2-chunk disk signed by `key`.
    fn signed_by(key: &SecretKey) -> Vec<u8> {
        let key = SecretKey::parse(&key.to_text(), "k").unwrap();
        let mut m = manifest("t");
        let data: Vec<u8> = (0..CHUNK as usize + 100).map(|i| (i % 251) as u8 + 1).collect();
        let path = temp("signed-disk");
        std::fs::write(&path, &data).unwrap();
        m.disks.push(web_disk(data.len() as u64));
        let mut w = ArchiveWriter::new_signed(Vec::new(), 1, m, &metadata(), Some(key)).unwrap();
        w.add_disk(&File::open(&path).unwrap(), &mut |_| {}).unwrap();
        std::fs::remove_file(&path).unwrap();
        w.finish().unwrap().0
    }

    fn trusting(key: &SecretKey, require: bool) -> Trust {
        Trust {
            keys: vec![TrustedKey {
                key: key.public(),
                source: "/etc/vmha/trusted-keys/op.pub".into(),
            }],
            require,
        }
    }

    fn refused(archive: &[u8], trust: &Trust) -> String {
        let mut head_seen = false;
        let r = read_trusting(
            archive,
            trust,
            |_| {
                head_seen = true;
                Ok::<_, ArchiveError>(None)
            },
            &mut |_| {},
        );
        match r {
            Ok(_) => panic!("accepted a badly signed archive"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with("signature: "), "{e}");
                if trust.require && e.contains("trusted") {
                    assert!(!head_seen, "refused only after the head was handed on: {e}");
                }
                e
            }
        }
    }

    /// `archive` with its manifest edited by `edit`, re-summed as an attacker would.
    fn edit_metadata(archive: &[u8], path: &str, new: &[u8]) -> Vec<u8> {
        let mut entries = unpack(archive);
        let mut m: Manifest = serde_json::from_slice(&entries[0].1).unwrap();
        m.files.insert(path.into(), FileSum::of(new));
        entries[0].1 = serde_json::to_vec_pretty(&m).unwrap();
        for (p, d) in entries.iter_mut() {
            if p == path {
                *d = new.to_vec();
            }
        }
        repack(&entries)
    }

    #[test]
    fn a_signed_archive_verifies_and_names_its_signer() {
        let key = SecretKey::generate().unwrap();
        let a = signed_by(&key);
        let names: Vec<String> = unpack(&a).into_iter().map(|(p, _)| p).collect();
        assert_eq!(names[1], MANIFEST_SIG, "{names:?}");
        assert_eq!(names.last().unwrap(), CHUNKS_SIG, "{names:?}");
        let v = verify_trusting(a.as_slice(), &trusting(&key, true)).unwrap();
        let s = v.signer.unwrap();
        assert_eq!(s.fingerprint, key.public().fingerprint());
        assert_eq!(s.trusted.as_deref(), Some("/etc/vmha/trusted-keys/op.pub"));
        assert_eq!(v.chunks.chunks.len(), 2);
        // Without trusted keys: still checked, shown as not trusted.
        let v = verify(a.as_slice()).unwrap();
        assert_eq!(v.signer.unwrap().trusted, None);
        assert!(crate::signature::Signer::text(None).contains("unsigned"));
    }

    #[test]
    fn a_key_that_is_not_trusted_is_refused_when_a_signature_is_required() {
        let key = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let a = signed_by(&other);
        let e = refused(&a, &trusting(&key, true));
        assert!(
            e.contains(&other.public().fingerprint()) && e.contains("not a trusted key"),
            "{e}"
        );
        let e = refused(
            &a,
            &Trust {
                keys: vec![],
                require: true,
            },
        );
        assert!(e.contains("not a trusted key (0 trusted)"), "{e}");
        // Not required: accepted, not trusted.
        let v = verify_trusting(a.as_slice(), &trusting(&key, false)).unwrap();
        assert_eq!(v.signer.unwrap().trusted, None);
    }

    #[test]
    fn unsigned_archives_are_refused_only_when_a_signature_is_required() {
        let key = SecretKey::generate().unwrap();
        let a = good(Some(&[7u8; 1000]));
        let e = refused(&a, &trusting(&key, true));
        assert!(e.contains("unsigned"), "{e}");
        let v = verify_trusting(a.as_slice(), &trusting(&key, false)).unwrap();
        assert_eq!(v.signer, None);
        // A signed archive stripped of its signatures is unsigned.
        let stripped: Vec<_> = unpack(&signed_by(&key))
            .into_iter()
            .filter(|(p, _)| p != MANIFEST_SIG && p != CHUNKS_SIG)
            .collect();
        let stripped = repack(&stripped);
        assert!(refused(&stripped, &trusting(&key, true)).contains("unsigned"));
        assert_eq!(verify(stripped.as_slice()).unwrap().signer, None);
    }

    #[test]
    fn a_tampered_metadata_entry_fails_the_signature_even_re_summed() {
        let key = SecretKey::generate().unwrap();
        let a = edit_metadata(
            &signed_by(&key),
            "domains/web.xml",
            b"<domain><name>web</name><qemu:commandline/></domain>",
        );
        for trust in [trusting(&key, true), Trust::default()] {
            let e = refused(&a, &trust);
            assert!(
                e.contains("does not match MANIFEST.json") && e.contains("altered"),
                "{e}"
            );
        }
        // Re-signing with another key makes it another signer's archive, not the trusted one's.
        let mut entries = unpack(&a);
        let attacker = SecretKey::generate().unwrap();
        let manifest = entries[0].1.clone();
        entries[1].1 = serde_json::to_vec(&ManifestSignature {
            key: key.public().to_text(),
            signature: attacker.sign(&manifest_message(&manifest)),
        })
        .unwrap();
        assert!(refused(&repack(&entries), &trusting(&key, true)).contains("does not match"));
    }

    #[test]
    fn a_tampered_disk_chunk_fails_the_signature_even_re_summed() {
        let key = SecretKey::generate().unwrap();
        let mut entries = unpack(&signed_by(&key));
        let list_at = entries.iter().position(|(p, _)| p == CHUNK_LIST).unwrap();
        let mut list: ChunkList = serde_json::from_slice(&entries[list_at].1).unwrap();
        let chunk_at = entries.iter().position(|(p, _)| p.starts_with("disks/")).unwrap();
        entries[chunk_at].1[0] ^= 0xff;
        list.chunks
            .insert(entries[chunk_at].0.clone(), FileSum::of(&entries[chunk_at].1));
        entries[list_at].1 = serde_json::to_vec(&list).unwrap();
        let e = refused(&repack(&entries), &trusting(&key, true));
        assert!(e.contains("does not match CHUNKS.json"), "{e}");
        // The disk data, chunk list and its signature of another archive signed by the same key (with
        // another manifest): the chunk list's signature binds the manifest.
        let mut m = manifest("other");
        m.disks.push(web_disk(10));
        let path = temp("other-disk");
        std::fs::write(&path, [9u8; 10]).unwrap();
        let mut w = ArchiveWriter::new_signed(
            Vec::new(),
            1,
            m,
            &metadata(),
            Some(SecretKey::parse(&key.to_text(), "k").unwrap()),
        )
        .unwrap();
        w.add_disk(&File::open(&path).unwrap(), &mut |_| {}).unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = unpack(&w.finish().unwrap().0);
        let mut mixed: Vec<_> = unpack(&signed_by(&key)).into_iter().take(6).collect();
        assert_eq!(mixed[5].0, "domains/web.xml");
        mixed.extend(other.into_iter().skip(6));
        let e = refused(&repack(&mixed), &Trust::default());
        assert!(e.contains("does not match CHUNKS.json"), "{e}");
    }

    #[test]
    fn missing_or_misplaced_signatures_are_refused() {
        let key = SecretKey::generate().unwrap();
        let entries = unpack(&signed_by(&key));
        let trust = trusting(&key, false);
        // Without its chunk list signature (cut off, or removed).
        let cut: Vec<_> = entries.iter().filter(|(p, _)| p != CHUNKS_SIG).cloned().collect();
        let e = refused(&repack(&cut), &trust);
        assert!(e.contains("ends without CHUNKS.sig"), "{e}");
        // A chunk list signature in an unsigned archive.
        let no_head: Vec<_> = entries.iter().filter(|(p, _)| p != MANIFEST_SIG).cloned().collect();
        let e = refused(&repack(&no_head), &trust);
        assert!(e.contains("without MANIFEST.sig"), "{e}");
        // The manifest's signature moved after the metadata.
        let mut moved = entries.clone();
        let sig = moved.remove(1);
        moved.insert(3, sig);
        let e = verify(repack(&moved).as_slice()).unwrap_err().to_string();
        assert!(e.contains("MANIFEST.sig"), "{e}");
        // Two chunk list signatures.
        let mut twice = entries.clone();
        twice.push(entries.last().unwrap().clone());
        let e = verify(repack(&twice).as_slice()).unwrap_err().to_string();
        assert!(e.contains("CHUNKS.sig"), "{e}");
        // Garbage in the signature entry.
        let mut garbage = entries.clone();
        garbage[1].1 = b"{\"key\":\"vmha-ed25519 AAAA\",\"signature\":\"\"}".to_vec();
        let e = refused(&repack(&garbage), &trust);
        assert!(e.contains("not 32"), "{e}");
        // A metadata entry may not be named like a signature.
        let mut meta = metadata();
        meta.insert(MANIFEST_SIG.into(), b"x".to_vec());
        assert!(ArchiveWriter::new(Vec::new(), 1, manifest("t"), &meta).is_err());
    }
}
