//! The CIB manager's diffs as vmhad's local copy of the CIB applies them (`vmha-cib-copy`): whatever a
//! notification's `<diff>` holds, applying it must not panic; a diff refused as older leaves the copy as it
//! was; a diff applied leaves a copy whose text reads back as the same copy, whose digest can be taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmha_cib_copy::{Applied, Doc};

/// A small CIB with every kind of node a diff can address: sections, resources with ids, an element without
/// one, a comment, a node_state with its history.
pub const BASE: &str = r#"<cib admin_epoch="0" epoch="1" num_updates="0" crm_feature_set="3.16.2" validate-with="pacemaker-3.9"><configuration><crm_config><cluster_property_set id="o"><nvpair id="o-1" name="stonith-enabled" value="true"/></cluster_property_set></crm_config><nodes><node id="1" uname="n1"/></nodes><resources><primitive id="vm1" class="ocf" provider="vmha" type="VirtualMachine"><meta_attributes id="vm1-m"><nvpair id="vm1-m-t" name="target-role" value="Started"/></meta_attributes></primitive><!-- by hand --><primitive id="vm2" class="ocf" provider="vmha" type="VirtualMachine"/></resources><constraints><rsc_location id="l1" rsc="vm1" node="n1" score="100"/></constraints></configuration><status><node_state id="1" uname="n1"><lrm id="1"><lrm_resources><lrm_resource id="vm1"><lrm_rsc_op id="vm1_last_0" operation="start"/></lrm_resource></lrm_resources></lrm></node_state></status></cib>"#;

fuzz_target!(|data: &[u8]| {
    let Ok(diff) = std::str::from_utf8(data) else {
        return;
    };
    let mut doc = Doc::parse(BASE).expect("the base CIB reads");
    let before = doc.to_text();
    match doc.apply(diff) {
        Applied::Older => assert_eq!(doc.to_text(), before, "an older diff changed the copy"),
        Applied::Yes => {
            let text = doc.to_text();
            let again = Doc::parse(&text).expect("an applied copy reads back");
            assert_eq!(
                again.to_text(),
                text,
                "the copy's text does not read back as the same copy"
            );
            let _ = doc.digest();
        }
        Applied::No(why) | Applied::Drifted(why) => assert!(!why.is_empty()),
    }
});
