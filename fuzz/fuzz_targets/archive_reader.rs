//! The virtual-cluster archive reader (`vcluster::archive::verify`, what `vmha vcluster instantiate` runs
//! as root on an archive from anywhere) on a whole archive stream, then the instantiate plan built from
//! what it accepted (`vcluster::translate::plan`).
//!
//! An input that starts with zstd's frame magic is the archive as stored. Anything else is taken as the
//! tar stream inside and compressed here first, so that mutations reach the tar and manifest checks
//! instead of dying in the decompressor; and then once more with the manifest's and the chunk list's
//! BLAKE3 sums recomputed for the entries it holds (what issue 15's attacker did to hand-edited archives:
//! the sums detect damage, they are no signature), so that mutated metadata reaches the checks and the
//! plan behind the sums.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use vmha_vcluster::archive::{parse_manifest, verify};
use vmha_vcluster::translate::{plan, Maps, Target};

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The maps of vcluster's translate tests (`TO_B`).
const MAPS: [&str; 4] = [
    "hosts=node1:kvm-b1,node2:kvm-b2,node3:kvm-b2",
    "address=10.213.7.0/24:10.213.17.0/24",
    "storage=/srv/a/shared:/srv/b/shared",
    "network=lan-a:lan-b",
];

/// The tar stream `tar` rebuilt with every sum its manifest and chunk list give for an entry it holds
/// recomputed; `None` when it does not read as tar or nothing changed.
fn resummed(tar_bytes: &[u8]) -> Option<Vec<u8>> {
    let mut entries = Vec::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        let path = String::from_utf8(entry.path_bytes().into_owned()).ok()?;
        let header = entry.header().clone();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).ok()?;
        entries.push((path, header, data));
    }
    let sum = |data: &[u8]| serde_json::json!({"size": data.len(), "blake3": blake3::hash(data).to_hex().as_str()});
    // Sums of the entries a JSON list (`files` of the manifest, `chunks` of the chunk list) names.
    let fix = |json: &[u8], key: &str| -> Option<Vec<u8>> {
        let mut value: serde_json::Value = serde_json::from_slice(json).ok()?;
        let listed = value.get_mut(key)?.as_object_mut()?;
        for (path, _, data) in &entries {
            if let Some(slot) = listed.get_mut(path) {
                *slot = sum(data);
            }
        }
        serde_json::to_vec(&value).ok()
    };
    let mut changed = false;
    let mut out = tar::Builder::new(Vec::new());
    for (path, header, data) in &entries {
        let key = match path.as_str() {
            "MANIFEST.json" => "files",
            "CHUNKS.json" => "chunks",
            _ => "",
        };
        let data = match fix(data, key).filter(|_| !key.is_empty()) {
            Some(fixed) if fixed != *data => {
                changed = true;
                fixed
            }
            _ => data.clone(),
        };
        let mut header = header.clone();
        out.append_data(&mut header, path, data.as_slice()).ok()?;
    }
    let out = out.into_inner().ok()?;
    changed.then_some(out)
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(&ZSTD_MAGIC) {
        check(data);
        return;
    }
    check(&zstd::bulk::compress(data, 1).expect("zstd compresses any input"));
    if let Some(tar) = resummed(data) {
        check(&zstd::bulk::compress(&tar, 1).expect("zstd compresses any input"));
    }
});

/// Verifies the archive `stream` and, when it is accepted, plans its instantiation.
fn check(stream: &[u8]) {
    let Ok(verified) = verify(stream) else {
        return;
    };
    // What was accepted is consistent: its manifest reads back, every file it lists is there.
    let json = serde_json::to_vec(&verified.manifest).expect("a manifest serializes");
    assert_eq!(
        parse_manifest(&json).expect("an accepted manifest parses again"),
        verified.manifest
    );
    for path in verified.manifest.files.keys() {
        assert!(verified.metadata.contains_key(path), "{path} listed but not read");
    }
    for disk in &verified.manifest.disks {
        let _ = verified.stats(disk.id);
    }
    let maps = Maps::parse(&MAPS.map(String::from), None).expect("the fixed maps parse");
    let target = Target {
        hosts: vec!["kvm-b1".into(), "kvm-b2".into()],
        ids: ["cib-bootstrap-options".to_string()].into(),
    };
    if let Ok(p) = plan(&verified, &maps, &target) {
        let _ = p.text();
        serde_json::to_string(&p).expect("a plan serializes");
    }
}
