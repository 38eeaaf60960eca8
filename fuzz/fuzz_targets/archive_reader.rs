//! The virtual-cluster archive reader (`vcluster::archive::verify`, what `vmha vcluster instantiate` runs
//! as root on an archive from anywhere) on a whole archive stream, then the instantiate plan built from
//! what it accepted (`vcluster::translate::plan`).
//!
//! An input that starts with zstd's frame magic is the archive as stored. Anything else is taken as the
//! tar stream inside and compressed here first, so that mutations reach the tar and manifest checks
//! instead of dying in the decompressor (the BLAKE3 sums still have to match, as in a hand-edited archive
//! whose sums were recomputed: the seeds carry valid ones).
#![no_main]

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

fuzz_target!(|data: &[u8]| {
    let compressed;
    let stream = if data.starts_with(&ZSTD_MAGIC) {
        data
    } else {
        compressed = zstd::bulk::compress(data, 1).expect("zstd compresses any input");
        compressed.as_slice()
    };
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
});
