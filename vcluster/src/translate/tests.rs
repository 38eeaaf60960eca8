use super::*;
use crate::archive::{verify, ArchiveWriter};
use crate::capture::capture;
use crate::{manifest_for, metadata_entries};

const CIB: &str = include_str!("../testdata/cib.xml");

fn domain(vm: &str, dir: &str, net: &str) -> String {
    format!(
        "<domain type='qemu'><name>{vm}</name><devices>\
         <disk type='file' device='disk'><source file='{dir}/{vm}.img'/><target dev='vda'/></disk>\
         <disk type='file' device='cdrom'><source file='/iso/x.iso'/></disk>\
         <interface type='network'><source network='{net}'/></interface></devices>\
         <os><kernel>{dir}/vmlinuz</kernel></os></domain>"
    )
}

/// Captures `name` from `cib` into an archive and verifies it, as capture and instantiate do.
fn archived(cib: &str, name: &str, dir: &str, net: &str) -> Verified {
    let c = capture(cib, name).unwrap();
    let domains = c
        .vms
        .iter()
        .map(|v| (v.resource.clone(), domain(&v.resource, dir, net)))
        .collect();
    let placement = BTreeMap::from([("web".to_string(), "node1".to_string()), ("vip".into(), "node2".into())]);
    let m = manifest_for(&c, placement, "2026-11-22T00:00:00Z".into(), "frozen", &[]);
    let w = ArchiveWriter::new(Vec::new(), 1, m, &metadata_entries(&c, &domains).unwrap()).unwrap();
    let (bytes, ..) = w.finish().unwrap();
    verify(bytes.as_slice()).unwrap()
}

fn maps(specs: &[&str]) -> Maps {
    Maps::parse(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>(), None).unwrap()
}

fn target_b() -> Target {
    Target {
        hosts: vec!["kvm-b1".into(), "kvm-b2".into()],
        ids: ["cib-bootstrap-options".to_string()].into(),
    }
}

const TO_B: [&str; 4] = [
    "hosts=node1:kvm-b1,node2:kvm-b2,node3:kvm-b2",
    "address=10.213.7.0/24:10.213.17.0/24",
    "storage=/srv/a/shared:/srv/b/shared",
    "network=lan-a:lan-b",
];

#[test]
fn parses_maps_and_rejects_bad_ones() {
    let m = maps(&TO_B);
    assert_eq!(m.hosts["node3"], "kvm-b2");
    assert_eq!(m.addresses[0].prefix, 24);
    assert_eq!(m.path("/srv/a/shared/x.img").as_deref(), Some("/srv/b/shared/x.img"));
    assert_eq!(
        m.path("/srv/a/sharedx/x.img"),
        None,
        "prefixes match whole path components"
    );
    for bad in [
        "hosts=node1",
        "address=10.0.0.0/24:10.1.0.0/16",
        "address=10.0.0.0:10.1.0.0/24",
        "storage=rel:/abs",
        "colour=red:blue",
        "network=",
        "nothing",
    ] {
        assert!(Maps::parse(&[bad.to_string()], None).is_err(), "{bad}");
    }
    assert!(Maps::parse(&[], Some("bad name!".into())).is_err());
}

#[test]
fn addresses_keep_their_host_part_and_tokens_stay_intact() {
    let m = maps(&["address=10.213.7.0/24:10.213.17.0/24"]);
    let (new, left) = m.addresses_in("peer 10.213.7.11:80, 192.168.1.1 and 10.213.7.300 v1.10.213.7.5");
    assert_eq!(
        new.as_deref(),
        Some("peer 10.213.17.11:80, 192.168.1.1 and 10.213.7.300 v1.10.213.7.5")
    );
    assert_eq!(left, ["192.168.1.1"]);
    assert_eq!(m.addresses_in("10.213.7.100").0.as_deref(), Some("10.213.17.100"));
    assert_eq!(m.addresses_in("24").0, None);
}

#[test]
fn plan_translates_everything_it_names() {
    let v = archived(CIB, "shop", "/srv/a/shared", "lan-a");
    let p = plan(&v, &maps(&TO_B), &target_b()).unwrap();
    let f = &p.cib_fragment;
    assert!(f.contains(r#"name="ip" value="10.213.17.100""#), "{f}");
    assert!(f.contains(r#"value="peer 10.213.17.11:80, 192.168.1.1 and 10.213.7.300""#));
    assert!(f.contains(r#"name="config" value="/srv/b/shared/web.xml""#));
    assert!(f.contains(r#"name="start_networks" value="lan-b mgmt""#));
    assert!(f.contains(r#"rsc="db" node="kvm-b1""#));
    assert!(f.contains(r##"attribute="#uname" operation="eq" value="kvm-b2""##));
    assert!(f.contains(r#"<tag id="shop"><obj_ref id="web"/><obj_ref id="db"/><obj_ref id="vip"/></tag>"#));
    assert!(
        !f.contains("node1") || f.contains("db-prefers-node1"),
        "ids are kept, hosts are mapped"
    );
    let web = p.domains.iter().find(|d| d.vm == "web").unwrap();
    assert_eq!(web.path, "/srv/b/shared/web.xml");
    assert!(web.xml.contains("<source file='/srv/b/shared/web.img'/>"));
    assert!(web.xml.contains("<source file='/iso/x.iso'/>"), "unmapped paths stay");
    assert!(web.xml.contains("<source network='lan-b'/>"));
    assert!(web.xml.contains("<kernel>/srv/b/shared/vmlinuz</kernel>"));
    let r = p.resources.iter().find(|r| r.id == "web").unwrap();
    assert_eq!(
        (r.ran_on.as_deref(), r.expected_on.as_deref()),
        (Some("node1"), Some("kvm-b1"))
    );
    assert!(p
        .remaps
        .iter()
        .any(|r| r.place == "resource vip param ip" && r.new == "10.213.17.100"));
    assert!(p.warnings.iter().any(|w| w.contains("192.168.1.1")));
    assert!(p.text().contains("node3 -> kvm-b2"));
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["hosts"]["node1"], "kvm-b1");
}

#[test]
fn unmapped_hosts_are_listed_with_what_to_add() {
    let v = archived(CIB, "shop", "/srv/a/shared", "lan-a");
    let err = plan(&v, &maps(&["hosts=node1:kvm-b1"]), &target_b())
        .unwrap_err()
        .to_string();
    assert!(err.contains("hosts without a mapping: node2, node3"), "{err}");
    assert!(err.contains("--map hosts=node2:NEW,node3:NEW"), "{err}");
    let err = plan(
        &v,
        &maps(&["hosts=node1:kvm-b1,node2:kvm-b9,node3:kvm-b2"]),
        &target_b(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("kvm-b9 is not a host of this cluster"), "{err}");
}

#[test]
fn ids_in_use_fail_the_plan_and_rename_changes_the_tag() {
    let v = archived(CIB, "shop", "/srv/a/shared", "lan-a");
    let mut t = target_b();
    t.ids.insert("db".into());
    t.ids.insert("shop".into());
    let err = plan(&v, &maps(&TO_B), &t).unwrap_err().to_string();
    assert!(err.contains("ids already in use on this cluster: db, shop"), "{err}");
    t.ids.remove("db");
    let mut m = maps(&TO_B);
    m.name = Some("shop2".into());
    let p = plan(&v, &m, &t).unwrap();
    assert!(p.cib_fragment.contains(r#"<tag id="shop2">"#));
}

/// Canonical form of an XML element: tag, sorted attributes, children; whitespace ignored.
fn canonical(n: roxmltree::Node) -> String {
    let mut attrs: Vec<String> = n.attributes().map(|a| format!("{}={}", a.name(), a.value())).collect();
    attrs.sort();
    let kids: Vec<String> = n.children().filter(|c| c.is_element()).map(canonical).collect();
    format!("<{} {}>{}</>", n.tag_name().name(), attrs.join(" "), kids.join(""))
}

fn config_canon(cib: &str) -> (String, String, String) {
    let d = roxmltree::Document::parse(cib).unwrap();
    let sect = |t: &str| canonical(d.descendants().find(|n| n.has_tag_name(t)).unwrap());
    (sect("resources"), sect("constraints"), sect("tags"))
}

#[test]
fn instantiate_then_capture_and_map_back_gives_the_original() {
    // Only the virtual cluster's own configuration, as the other cluster would hold it.
    let only_shop = {
        let c = capture(CIB, "shop").unwrap();
        format!(
            "<cib><configuration><nodes><node id='1' uname='node1'/><node id='2' uname='node2'/><node id='3' uname='node3'/></nodes>{}{}<tags>{}</tags></configuration></cib>",
            c.resources_xml, c.constraints_xml, c.tag_xml
        )
    };
    let v = archived(&only_shop, "shop", "/srv/a/shared", "lan-a");
    let p = plan(&v, &maps(&TO_B), &target_b()).unwrap();
    let cib_b = format!(
        "<cib><configuration><nodes><node id='1' uname='kvm-b1'/><node id='2' uname='kvm-b2'/></nodes>{}</configuration></cib>",
        p.cib_fragment.trim_start_matches("<configuration>").trim_end().trim_end_matches("</configuration>")
    );
    let v2 = archived(&cib_b, "shop", "/srv/b/shared", "lan-b");
    let back = maps(&[
        "hosts=kvm-b1:node1,kvm-b2:node2",
        "address=10.213.17.0/24:10.213.7.0/24",
        "storage=/srv/b/shared:/srv/a/shared",
        "network=lan-b:lan-a",
    ]);
    let target_a = Target {
        hosts: vec!["node1".into(), "node2".into(), "node3".into()],
        ids: Default::default(),
    };
    let p2 = plan(&v2, &back, &target_a).unwrap();
    let cib_a2 = format!("<cib>{}</cib>", p2.cib_fragment);
    // node3 folded into kvm-b2 and comes back as node2: the one expected difference.
    let expected = only_shop.replace(r#"value="node3""#, r#"value="node2""#);
    assert_eq!(config_canon(&cib_a2), config_canon(&expected));
    let web = p2.domains.iter().find(|d| d.vm == "web").unwrap();
    assert_eq!(web.xml, domain("web", "/srv/a/shared", "lan-a"));
}
