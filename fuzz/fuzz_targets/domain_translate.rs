//! Domain XML from an archive (untrusted): translation for the target cluster
//! (`vcluster::translate::translate_domain`, with the maps of vcluster's tests) and the disk list
//! (`domain_disks`). And what reads a domain file as root elsewhere: the resource agent's `config` file
//! (`DomainConfig::parse`, `model::domain::with_guest_channel`, which splices vmha's guest channel in) and
//! vmhad's `DomainSummary::parse`. And a running domain's live XML as `vmha site replicate` plans its copies
//! (`model::replica::replica_plan`, `backup_xml`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmha_model::domain::{with_guest_channel, DomainSummary};
use vmha_model::replica::{backup_xml, replica_plan};
use vmha_resource_agents::domain_config::DomainConfig;
use vmha_vcluster::domain_check::{self, Allow, Roots};
use vmha_vcluster::translate::{domain_disks, translate_domain, Maps};

/// The maps of vcluster's translate tests (`TO_B`).
const MAPS: [&str; 4] = [
    "hosts=node1:kvm-b1,node2:kvm-b2,node3:kvm-b2",
    "address=10.213.7.0/24:10.213.17.0/24",
    "storage=/srv/a/shared:/srv/b/shared",
    "network=lan-a:lan-b",
];

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    // The safe-subset check instantiate runs on every domain of an archive: never a panic, and a domain
    // it accepts without any opt-in names no file outside the storage roots.
    let roots = Roots {
        dirs: vec!["/srv/b/shared".into()],
        files: vec![],
    };
    if let Ok(summary) = domain_check::check(xml, &roots, &Allow::default()) {
        for path in domain_disks(xml).unwrap_or_default() {
            assert!(
                roots.contains(&path).is_some(),
                "accepted a disk outside storage: {path}\n{summary:?}"
            );
        }
    }
    let _ = DomainConfig::parse(xml);
    let _ = DomainSummary::parse(xml);
    if let Ok(Some(with)) = with_guest_channel(xml) {
        // The channel is spliced into well-formed XML, and is then found there.
        roxmltree::Document::parse(&with).unwrap_or_else(|e| panic!("with the guest channel: {e}\n{with}"));
        assert!(
            matches!(with_guest_channel(&with), Ok(None)),
            "channel not found in\n{with}"
        );
    }
    let maps = Maps::parse(&MAPS.map(String::from), None).expect("the fixed maps parse");
    // Replication: a plan it accepts copies only into plain paths under the mapped storage, never onto
    // its source, and its backup request is well-formed XML naming each planned disk once.
    if let Ok(plan) = replica_plan("web", xml, |p| maps.path(p)) {
        let request = backup_xml(&plan, "0a");
        let doc = roxmltree::Document::parse(&request).unwrap_or_else(|e| panic!("backup XML: {e}\n{request}"));
        let named = doc.descendants().filter(|n| n.has_tag_name("disk")).count();
        assert_eq!(named, plan.disks.len() + plan.skipped.len(), "{request}");
        for d in &plan.disks {
            assert!(d.target.starts_with("/srv/b/shared/") && d.target != d.source, "{d:?}");
            assert!(!d.target.split('/').any(|c| c == ".."), "{d:?}");
        }
    }
    let mut remaps = Vec::new();
    let Ok(translated) = translate_domain("web", xml, &maps, &mut remaps) else {
        let _ = domain_disks(xml);
        return;
    };
    // The translation is well-formed XML whenever its input was, and lists the same number of disks.
    let before = domain_disks(xml).expect("translate_domain accepted it, so it parses");
    let after =
        domain_disks(&translated).unwrap_or_else(|e| panic!("translated XML does not parse: {e}\n{translated}"));
    assert_eq!(before.len(), after.len(), "{translated}");
    for r in &remaps {
        assert!(!r.new.is_empty(), "{r:?}");
    }
});
