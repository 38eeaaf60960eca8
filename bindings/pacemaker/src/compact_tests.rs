//! The compact copy of the CIB (`vmha-cib-copy`) against Pacemaker itself: the diffs `crm_diff --cib` makes
//! (as the CIB manager makes them) apply to it as Pacemaker's `xml_apply_patchset` applies them to a libxml2
//! tree, its digest is Pacemaker's, and hostile diffs are refused without a panic.

use pacemaker_sys as sys;
use vmha_cib_copy::{Applied, Doc};

use crate::xml::{self, Tree};

fn is_blank(text: Option<&str>) -> bool {
    text.is_none_or(|t| t.chars().all(|c| c.is_ascii_whitespace()))
}

/// An element as (name, attributes in order, children), blank text dropped: what two texts of the same
/// tree have in common.
#[derive(Debug, PartialEq, Eq)]
enum Shape {
    E(String, Vec<(String, String)>, Vec<Shape>),
    C(String),
    T(String),
}

fn shape(text: &str) -> Shape {
    fn of(n: roxmltree::Node) -> Option<Shape> {
        if n.is_element() {
            Some(Shape::E(
                n.tag_name().name().into(),
                n.attributes().map(|a| (a.name().into(), a.value().into())).collect(),
                n.children().filter_map(of).collect(),
            ))
        } else if n.is_comment() {
            Some(Shape::C(n.text().unwrap_or("").into()))
        } else if n.is_text() && !is_blank(n.text()) {
            Some(Shape::T(n.text().unwrap_or("").into()))
        } else {
            None
        }
    }
    of(roxmltree::Document::parse(text).unwrap().root_element()).unwrap()
}

/// Pacemaker's own digest of `text` (`calculate_xml_versioned_digest`, as `xml_apply_patchset` checks).
fn pacemaker_digest(text: &str) -> String {
    xml::init_thread();
    let tree = Tree::parse("test", text).unwrap();
    let version = std::ffi::CString::new(shape_attr(text, "crm_feature_set")).unwrap();
    // SAFETY: tree is a valid tree of this thread; the digest is a malloc'd string we free once.
    unsafe {
        let d = sys::calculate_xml_versioned_digest(tree.as_ptr(), 0, 1, version.as_ptr());
        assert!(!d.is_null());
        let s = std::ffi::CStr::from_ptr(d).to_string_lossy().into_owned();
        libc::free(d.cast());
        s
    }
}

fn shape_attr(text: &str, name: &str) -> String {
    let doc = roxmltree::Document::parse(text).unwrap();
    doc.root_element().attribute(name).unwrap_or("").to_string()
}

/// Pacemaker's `xml_apply_patchset` on a libxml2 tree of `text`: the result's text, or its return code.
fn pacemaker_apply(text: &str, diff: &str) -> Result<String, i32> {
    xml::init_thread();
    let doc = Tree::parse("test", text).unwrap();
    let diff = Tree::parse("test", diff).unwrap();
    // SAFETY: both trees are valid and ours; the call changes doc in place.
    let rc = unsafe { sys::xml_apply_patchset(doc.as_ptr(), diff.as_ptr(), true) };
    if rc == 0 {
        Ok(doc.to_text())
    } else {
        Err(rc)
    }
}

/// `crm_diff --cib`: the v2 patchset from one CIB to the next, with versions and digest, as the CIB
/// manager makes them.
fn crm_diff(from: &str, to: &str) -> String {
    let dir = std::env::temp_dir().join(format!("vmha-compact-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.xml"), dir.join("b.xml"));
    std::fs::write(&a, from).unwrap();
    std::fs::write(&b, to).unwrap();
    let out = std::process::Command::new("crm_diff")
        .arg("--original")
        .arg(&a)
        .arg("--new")
        .arg(&b)
        .arg("--cib")
        .output()
        .expect("crm_diff (pacemaker-cli-utils) must be installed for this test");
    assert_eq!(out.status.code(), Some(1), "crm_diff in {}: {out:?}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stdout).unwrap()
}

const FEATURES: &str = r#"crm_feature_set="3.16.2" validate-with="pacemaker-3.9""#;

/// A CIB at `epoch` with `resources`, `constraints` and `status` inside.
fn cib(epoch: u32, resources: &str, constraints: &str, status: &str) -> String {
    format!(
        r#"<cib admin_epoch="0" epoch="{epoch}" num_updates="0" {FEATURES} have-quorum="1" dc-uuid="1" cib-last-written="Sun Dec  6 22:00:00 2026" update-origin="n1" update-client="cibadmin" update-user="root"><configuration><crm_config><cluster_property_set id="cib-bootstrap-options"><nvpair id="o-1" name="stonith-enabled" value="true"/><nvpair id="o-2" name="cluster-name" value="lab"/></cluster_property_set></crm_config><nodes><node id="1" uname="n1"/><node id="2" uname="n2"/></nodes><resources>{resources}</resources><constraints>{constraints}</constraints></configuration><status>{status}</status></cib>"#
    )
}

fn vm(id: &str, extra: &str) -> String {
    format!(
        r#"<primitive id="{id}" class="ocf" provider="vmha" type="VirtualMachine"{extra}><instance_attributes id="{id}-i"><nvpair id="{id}-i-c" name="config" value="/etc/vmha/{id}.xml"/></instance_attributes><meta_attributes id="{id}-m"><nvpair id="{id}-m-t" name="target-role" value="Started"/></meta_attributes><utilization id="{id}-u"><nvpair id="{id}-u-m" name="hv_memory" value="128"/></utilization></primitive>"#
    )
}

fn node_state(id: &str, ops: &[(&str, &str)]) -> String {
    let rscs: String = ops
        .iter()
        .map(|(rsc, op)| {
            format!(
                r#"<lrm_resource id="{rsc}" class="ocf" provider="vmha" type="VirtualMachine"><lrm_rsc_op id="{rsc}_last_0" operation_key="{rsc}_{op}_0" operation="{op}" crm-debug-origin="do_update_resource" transition-key="1:2:0:abc" call-id="7" rc-code="0" op-status="0" interval="0" last-rc-change="1765000000" exec-time="120" queue-time="0"/></lrm_resource>"#
            )
        })
        .collect();
    format!(
        r#"<node_state id="{id}" uname="n{id}" in_ccm="true" crmd="online" crm-debug-origin="do_state_transition" join="member" expected="member"><transient_attributes id="{id}"><instance_attributes id="status-{id}"><nvpair id="status-{id}-f" name="fail-count-vm1#monitor_10000" value="1"/></instance_attributes></transient_attributes><lrm id="{id}"><lrm_resources>{rscs}</lrm_resources></lrm></node_state>"#
    )
}

/// A sequence of CIBs, each a few changes from the one before, covering every kind of change.
fn versions() -> Vec<String> {
    let c1 = r#"<rsc_location id="l1" rsc="vm1" node="n1" score="100"/><rsc_colocation id="c1" rsc="vm2" with-rsc="vm1" score="-INFINITY"/>"#;
    vec![
        cib(
            1,
            &format!("{}<!-- kept by hand -->{}", vm("vm1", ""), vm("vm2", "")),
            c1,
            &node_state("1", &[("vm1", "start")]),
        ),
        // A value changed, a resource created, a lrm_resource created.
        cib(
            2,
            &format!(
                "{}<!-- kept by hand -->{}{}",
                vm("vm1", ""),
                vm("vm2", ""),
                vm("vm3", "")
            )
            .replace(
                r#"name="target-role" value="Started"/></meta_attributes><utilization id="vm2-u""#,
                r#"name="target-role" value="Stopped"/></meta_attributes><utilization id="vm2-u""#,
            ),
            c1,
            &node_state("1", &[("vm1", "start"), ("vm3", "start")]),
        ),
        // Resources reordered (moves), the comment gone, a constraint deleted, a node_state created.
        cib(
            3,
            &format!("{}{}{}", vm("vm3", ""), vm("vm1", ""), vm("vm2", "")),
            r#"<rsc_location id="l1" rsc="vm1" node="n1" score="100"/>"#,
            &format!(
                "{}{}",
                node_state("1", &[("vm1", "start"), ("vm3", "start")]),
                node_state("2", &[])
            ),
        ),
        // Values a dump must escape (markup, quotes, tab, newline, carriage return) and text outside
        // ASCII; an attribute added.
        cib(
            4,
            &format!(
                "{}{}{}",
                vm(
                    "vm3",
                    r#" description="a&lt;b&gt;&amp;&quot;q&quot; it's&#9;tab&#10;line&#13;cr""#
                ),
                vm("vm1", r#" description="&lt;caf&#233; d \ back""#),
                vm("vm2", "")
            ),
            r#"<rsc_location id="l1" rsc="vm1" node="n1" score="100"/><!-- a note: <none> -->"#,
            &format!(
                "{}{}",
                node_state("1", &[("vm1", "monitor"), ("vm3", "start")]),
                node_state("2", &[])
            ),
        ),
        // An attribute removed, a resource deleted, a whole node_state deleted, moves with a create.
        cib(
            5,
            &format!("{}{}{}{}", vm("vm2", ""), vm("vm4", ""), vm("vm3", ""), vm("vm5", "")),
            r#"<!-- a note: <none> --><rsc_location id="l1" rsc="vm2" node="n2" score="50"/><rsc_location id="l4" rsc="vm4" node="n2" score="50"/><rsc_location id="l5" rsc="vm5" node="n2" score="50"/>"#,
            &node_state("2", &[("vm2", "start")]),
        ),
    ]
}

#[test]
fn the_digest_is_pacemakers() {
    for text in versions() {
        let doc = Doc::parse(&text).unwrap();
        assert_eq!(doc.digest().unwrap(), pacemaker_digest(&text), "{text}");
    }
    // Before feature set 3.0.5 Pacemaker's digest is another: not computed here.
    let old = r#"<cib admin_epoch="0" epoch="1" num_updates="0" crm_feature_set="3.0.1"/>"#;
    assert_eq!(Doc::parse(old).unwrap().digest(), None);
}

#[test]
fn crm_diffs_apply_as_pacemaker_applies_them() {
    let versions = versions();
    let mut doc = Doc::parse(&versions[0]).unwrap();
    for pair in versions.windows(2) {
        let diff = crm_diff(&pair[0], &pair[1]);
        assert!(diff.contains("digest="), "crm_diff --cib gives a digest: {diff}");
        let theirs = pacemaker_apply(&pair[0], &diff).expect("Pacemaker applies its own diff");
        assert_eq!(doc.apply(&diff), Applied::Yes, "{diff}");
        assert_eq!(shape(&doc.to_text()), shape(&theirs), "{diff}");
        // Pacemaker's text form of a value is lossy for tab, newline and carriage return (four spaces,
        // `\n`, `\r`): the diff holds them so, and so do Pacemaker's copies, and the digest agrees.
        if !["&#9;", "&#10;", "&#13;"].iter().any(|c| pair[1].contains(c)) {
            assert_eq!(shape(&doc.to_text()), shape(&pair[1]), "{diff}");
        }
        // The same diff again: the copy already holds it.
        assert_eq!(doc.apply(&diff), Applied::Older);
    }
}

#[test]
fn a_diff_whose_result_is_not_the_digest_is_refused() {
    let versions = versions();
    let diff = crm_diff(&versions[0], &versions[1]);
    // The copy had drifted (a value Pacemaker's copy does not have): the digest catches it.
    let drifted = versions[0].replace(r#"value="lab""#, r#"value="other""#);
    let mut doc = Doc::parse(&drifted).unwrap();
    assert!(matches!(doc.apply(&diff), Applied::Drifted(_)));
    // Without the digest, the same diff applies.
    let mut doc = Doc::parse(&drifted).unwrap();
    let no_digest = diff.replace(" digest=", " x-digest=");
    assert_eq!(doc.apply(&no_digest), Applied::Yes);
}

#[test]
fn versions_decide_whether_a_diff_applies() {
    let versions = versions();
    let diff = crm_diff(&versions[0], &versions[1]);
    // The copy is newer than the diff's source: older, nothing done.
    let mut doc = Doc::parse(&versions[1]).unwrap();
    let before = doc.to_text();
    assert_eq!(doc.apply(&diff), Applied::Older);
    assert_eq!(doc.to_text(), before);
    // The copy is older than the diff's source (a diff was missed): refused.
    let behind = versions[0].replace(r#"epoch="1""#, r#"epoch="0""#);
    let mut doc = Doc::parse(&behind).unwrap();
    assert!(matches!(doc.apply(&diff), Applied::No(_)));
    // Pacemaker says the same of both.
    assert!(pacemaker_apply(&versions[1], &diff).is_err());
    assert!(pacemaker_apply(&behind, &diff).is_err());
}

/// Creates and moves are done after the deletes and modifies, at the elements they were marked on: found
/// where they were marked when nothing moved them, and wherever they are when a later delete of an
/// earlier sibling, or a move, shifted them. Both as Pacemaker applies the same diff.
#[test]
fn creates_find_their_targets_after_the_other_changes_moved_them() {
    let base = cib(
        1,
        &format!("{}{}{}", vm("vm1", ""), vm("vm2", ""), vm("vm3", "")),
        "",
        "",
    );
    let wrap = |changes: &str| {
        format!(
            r#"<diff format="2"><version><source admin_epoch="0" epoch="1" num_updates="0"/><target admin_epoch="0" epoch="2" num_updates="0"/></version>{changes}</diff>"#
        )
    };
    let create = |id: &str, name: &str| {
        format!(
            r#"<change operation="create" path="/cib/configuration/resources/primitive[@id='{id}']/meta_attributes[@id='{id}-m']" position="1"><nvpair id="{id}-m-{name}" name="{name}" value="1"/></change>"#
        )
    };
    let delete_vm1 = r#"<change operation="delete" path="/cib/configuration/resources/primitive[@id='vm1']"/>"#;
    let diffs = [
        // In place.
        wrap(&create("vm2", "a")),
        // Two creates under one element, and one elsewhere.
        wrap(&format!(
            "{}{}{}",
            create("vm2", "a"),
            create("vm3", "b"),
            create("vm2", "c")
        )),
        // vm2 and vm3 move up by one after they were marked.
        wrap(&format!("{}{}{delete_vm1}", create("vm2", "a"), create("vm3", "b"))),
        // A move ahead of a create's target.
        wrap(&format!(
            r#"{}<change operation="move" path="/cib/configuration/resources/primitive[@id='vm3']" position="0"/>"#,
            create("vm1", "a")
        )),
    ];
    for diff in &diffs {
        let mut doc = Doc::parse(&base).unwrap();
        assert_eq!(doc.apply(diff), Applied::Yes, "{diff}");
        let theirs = pacemaker_apply(&base, diff).expect("Pacemaker applies it");
        assert_eq!(shape(&doc.to_text()), shape(&theirs), "{diff}");
        assert!(!doc.to_text().contains("mark"), "no mark left: {diff}");
    }
}

/// Hostile and broken diffs: refused (or, where Pacemaker would apply them, applied), never a panic.
#[test]
fn hostile_diffs_are_refused_without_panic() {
    let base = cib(1, &vm("vm1", ""), "", "");
    let wrap = |changes: &str| {
        format!(
            r#"<diff format="2"><version><source admin_epoch="0" epoch="1" num_updates="0"/><target admin_epoch="0" epoch="2" num_updates="0"/></version>{changes}</diff>"#
        )
    };
    let refused = [
        String::new(),
        "not xml".into(),
        "<diff/>".into(),
        r#"<diff format="1"/>"#.into(),
        r#"<other format="2"/>"#.into(),
        wrap(r#"<change operation="delete" path="/cib"/>"#),
        wrap(r#"<change operation="move" path="/cib" position="0"/>"#),
        wrap(r#"<change operation="create" path="/cib/configuration/resources" position="0"/>"#),
        wrap(r#"<change operation="create" path="/cib/nowhere" position="0"><x/></change>"#),
        wrap(r#"<change operation="modify" path="/cib/configuration"/>"#),
        wrap(r#"<change operation="modify" path="/cib/configuration"><change-result/></change>"#),
        wrap(r#"<change operation="explode" path="/cib"/>"#),
        wrap(r#"<change operation="modify" path="//cib"><change-result><cib/></change-result></change>"#),
        wrap(r#"<change operation="modify" path=""><change-result><cib/></change-result></change>"#),
        wrap(r#"<change operation="modify" path="cib"><change-result><cib/></change-result></change>"#),
        wrap(r#"<change operation="move" path="/cib/configuration/resources/primitive[@id='vm1']" position="5"/>"#),
        wrap(
            r#"<change operation="create" path="/cib/configuration/resources/primitive[@id='vm1']" position="0"><x/></change><change operation="delete" path="/cib/configuration/resources/primitive[@id='vm1']"/>"#,
        ),
    ];
    for diff in &refused {
        let mut doc = Doc::parse(&base).unwrap();
        assert!(matches!(doc.apply(diff), Applied::No(_)), "{diff}");
    }
    // Positions past the end, negative or not numbers put a created node last, as Pacemaker does.
    for position in ["99999999999", "-3", "x", "4294967296"] {
        let diff = wrap(&format!(
            r#"<change operation="create" path="/cib/configuration/resources" position="{position}"><primitive id="late"/></change>"#
        ));
        let mut doc = Doc::parse(&base).unwrap();
        assert_eq!(doc.apply(&diff), Applied::Yes, "{position}");
        let theirs = pacemaker_apply(&base, &diff).unwrap();
        assert_eq!(shape(&doc.to_text()), shape(&theirs), "{position}");
    }
    // A delete that matches nothing is skipped, as Pacemaker skips it.
    let diff = wrap(r#"<change operation="delete" path="/cib/configuration/resources/primitive[@id='gone']"/>"#);
    let mut doc = Doc::parse(&base).unwrap();
    assert_eq!(doc.apply(&diff), Applied::Yes);
    assert!(pacemaker_apply(&base, &diff).is_ok());
    assert!(Doc::parse("<notcib/>").is_err());
    assert!(Doc::parse("<cib").is_err());
}

#[test]
fn the_copy_is_smaller_than_its_text() {
    let many: String = (0..500).map(|i| vm(&format!("vm{i}"), "")).collect();
    let states: String = (1..=8)
        .map(|h| {
            let ops: Vec<(String, &str)> = (0..500).map(|i| (format!("vm{i}"), "stop")).collect();
            let ops: Vec<(&str, &str)> = ops.iter().map(|(r, o)| (r.as_str(), *o)).collect();
            node_state(&h.to_string(), &ops)
        })
        .collect();
    let text = cib(1, &many, "", &states);
    let doc = Doc::parse(&text).unwrap();
    assert_eq!(shape(&doc.to_text()), shape(&text));
    // Every element name and attribute name once, however many elements use it.
    assert!(doc.name_count() < 80, "{}", doc.name_count());
}
