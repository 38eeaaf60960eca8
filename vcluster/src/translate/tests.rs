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

const TO_B: [&str; 5] = [
    "hosts=node1:kvm-b1,node2:kvm-b2,node3:kvm-b2",
    "address=10.213.7.0/24:10.213.17.0/24",
    "storage=/srv/a/shared:/srv/b/shared",
    "network=lan-a:lan-b",
    // The ISO library is storage both clusters have.
    "storage=/iso:/iso",
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
        "storage=/iso:/iso",
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

/// An archive like [`archived`]'s with entry `path` edited by `edit` (the manifest re-summed, as an
/// attacker would), verified.
fn edited(path: &str, edit: impl Fn(&str) -> String) -> Verified {
    let v = archived(CIB, "shop", "/srv/a/shared", "lan-a");
    let mut metadata = v.metadata.clone();
    let text = String::from_utf8(metadata[path].clone()).unwrap();
    let new = edit(&text);
    assert_ne!(new, text, "the edit of {path} changed nothing");
    metadata.insert(path.to_string(), new.into_bytes());
    let w = ArchiveWriter::new(Vec::new(), 1, v.manifest.clone(), &metadata).unwrap();
    let (bytes, ..) = w.finish().unwrap();
    verify(bytes.as_slice()).unwrap()
}

fn refused_plan(v: &Verified, m: &Maps) -> String {
    match plan(v, m, &target_b()) {
        Ok(p) => panic!("planned a hostile archive:\n{}", p.text()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn foreign_cib_sections_and_elements_are_refused() {
    let m = maps(&TO_B);
    for (path, from, to, want) in [
        (
            RESOURCES,
            "*",
            "<crm_config><cluster_property_set id='evil'><nvpair id='evil-s' name='stonith-enabled' value='false'/></cluster_property_set></crm_config>",
            "root element is <crm_config>",
        ),
        (
            RESOURCES,
            "</resources>",
            "<primitive id='fence' class='stonith' type='fence_xvm'/></resources>",
            "<primitive id=\"fence\">: a stonith",
        ),
        (
            RESOURCES,
            "</resources>",
            "<primitive id='extra' class='ocf' provider='heartbeat' type='IPaddr2'/></resources>",
            "<primitive id=\"extra\"> is not a member the manifest lists",
        ),
        (
            RESOURCES,
            "</resources>",
            "<rsc_defaults><meta_attributes id='rd'/></rsc_defaults></resources>",
            "<rsc_defaults> is not a resource a virtual cluster holds",
        ),
        (
            RESOURCES,
            "<utilization id=\"web-utilization\">",
            "<bundle id='b'/><utilization id=\"web-utilization\">",
            "<bundle id=\"b\"> is not part of",
        ),
        (
            RESOURCES,
            "<meta_attributes id=\"db-meta\">",
            "<meta_attributes id=\"db-meta2\" id-ref=\"cib-bootstrap-options\"/><meta_attributes id=\"db-meta\">",
            "id-ref \"cib-bootstrap-options\" refers to something outside",
        ),
        (
            CONSTRAINTS,
            "</constraints>",
            "<rsc_ticket id='t' rsc='web' ticket='x'/></constraints>",
            "<rsc_ticket id=\"t\">: tickets are cluster-wide",
        ),
        (
            CONSTRAINTS,
            "</constraints>",
            "<rsc_colocation id='c2' rsc='web' with-rsc='outsider' score='INFINITY'/></constraints>",
            "names outsider, which is not one of",
        ),
        (
            CONSTRAINTS,
            "</constraints>",
            "<rsc_location id='l2' rsc-pattern='.*' node='node1' score='-INFINITY'/></constraints>",
            "rsc-pattern= reaches beyond",
        ),
        (
            CONSTRAINTS,
            "<constraints>",
            "<constraints><nodes/>",
            "<nodes>: only location, colocation and order constraints",
        ),
        (
            RESOURCES,
            "id=\"vip-instance_attributes-ip\"",
            "id=\"web-instance_attributes-config\"",
            "the id is defined twice",
        ),
    ] {
        let v = edited(path, |t| if from == "*" { to.to_string() } else { t.replacen(from, to, 1) });
        let err = refused_plan(&v, &m);
        assert!(err.contains(want), "{path} {to}: expected {want:?} in {err}");
    }
    // A constraint on the archive's tag name, created under another name: it would reach a tag of the
    // target's.
    let v = edited(CONSTRAINTS, |t| {
        t.replacen(
            "</constraints>",
            "<rsc_location id='on-tag' rsc='shop' node='node1' score='-INFINITY'/></constraints>",
            1,
        )
    });
    plan(&v, &m, &target_b()).unwrap();
    let mut renamed = m.clone();
    renamed.name = Some("shop2".into());
    let err = plan(&v, &renamed, &target_b()).unwrap_err().to_string();
    assert!(err.contains("names shop, which is not one of"), "{err}");
}

#[test]
fn agents_outside_the_allowlist_need_an_option_and_show_in_the_plan() {
    let hostile = |t: &str| {
        t.replacen(
            r#"<primitive id="vip" class="ocf" provider="heartbeat" type="IPaddr2">"#,
            r#"<primitive id="vip" class="ocf" provider="heartbeat" type="anything"><instance_attributes id="vip-run"><nvpair id="vip-run-binfile" name="binfile" value="/bin/sh -c id"/></instance_attributes>"#,
            1,
        )
    };
    let v = edited(RESOURCES, hostile);
    let err = refused_plan(&v, &maps(&TO_B));
    assert!(
        err.contains("<primitive id=\"vip\">: agent ocf:heartbeat:anything is not allowed")
            && err.contains("--allow-agent ocf:heartbeat:anything"),
        "{err}"
    );
    let mut m = maps(&TO_B);
    m.allow = Allow::parse(&["agent=ocf:heartbeat:anything".into()]).unwrap();
    let p = plan(&v, &m, &target_b()).unwrap();
    assert!(p
        .allowed
        .iter()
        .any(|a| a.contains("resource vip with agent ocf:heartbeat:anything")));
    let text = p.text();
    assert!(text.contains("ALLOWED beyond the safe subset"), "{text}");
    assert!(
        text.contains("param binfile=/bin/sh -c id"),
        "every parameter is shown: {text}"
    );
}

#[test]
fn vm_parameters_pointing_outside_storage_are_refused() {
    for (value, want) in [
        (
            "/etc/libvirt/qemu/x.xml",
            "resource web param config=/etc/libvirt/qemu/x.xml: outside every storage root",
        ),
        ("/srv/a/shared/../../../etc/x.xml", "outside every storage root"),
    ] {
        let v = edited(RESOURCES, |t| t.replacen("/srv/a/shared/web.xml", value, 1));
        let err = refused_plan(&v, &maps(&TO_B));
        assert!(err.contains(want), "{value}: {err}");
    }
    let v = edited(RESOURCES, |t| {
        t.replacen(
            r#"<nvpair id="web-instance_attributes-hypervisor""#,
            r#"<nvpair id="web-ms" name="monitor_scripts" value="/srv/a/shared/x.sh"/><nvpair id="web-instance_attributes-hypervisor""#,
            1,
        )
    });
    let err = refused_plan(&v, &maps(&TO_B));
    assert!(
        err.contains("param monitor_scripts=/srv/b/shared/x.sh: scripts run as root")
            && err.contains("--allow scripts"),
        "{err}"
    );
}

#[test]
fn vm_connections_that_run_programs_or_reach_host_sockets_are_refused() {
    for (name, value, want) in [
        (
            "hypervisor",
            "qemu+ext:///system?command=/tmp/x",
            "libvirt transport qemu+ext",
        ),
        (
            "hypervisor",
            "qemu+unix:///system?socket=/tmp/s",
            "libvirt transport qemu+unix",
        ),
        ("hypervisor", "qemu+ssh://h/system?command=/tmp/x", "with parameters"),
        ("hypervisor", "qemu:///session", "driver path /session"),
        ("hypervisor", "lxc:///", "libvirt transport lxc"),
        (
            "remote_uri",
            "qemu+ssh://%n/system?keyfile=/root/.ssh/id",
            "with parameters",
        ),
        ("migrate_uri", "unix:///tmp/sock", "other than tcp://"),
        ("migrate_uri", "tcp://h:49152/x", "other than tcp://"),
    ] {
        let v = edited(RESOURCES, |t| {
            t.replacen(
                r#"name="hypervisor" value="qemu:///system""#,
                &format!(r#"name="{name}" value="{value}""#),
                1,
            )
        });
        let err = refused_plan(&v, &maps(&TO_B));
        assert!(
            err.contains(&format!("param {name}=")) && err.contains(want) && err.contains("--allow connections"),
            "{name}={value}: {err}"
        );
    }
    for (name, value) in [
        ("hypervisor", "qemu:///system"),
        ("hypervisor", "qemu+tls://h/system"),
        ("remote_uri", "qemu+ssh://%n/system"),
        ("migrate_uri", "tcp://%n-mig:49152"),
        ("migration_transport", "ssh"),
    ] {
        assert_eq!(unsafe_connection(name, value), None, "{name}={value}");
    }
}

#[test]
fn hostile_domains_are_refused_on_their_translated_paths() {
    // A host file as a disk, raw QEMU arguments, a DAC override: refused, naming the element.
    for (edit, want) in [
        (("/srv/a/shared/web.img", "/etc/shadow"), "<source file='/etc/shadow'> in <disk>: file /etc/shadow is outside every storage root"),
        (
            ("</devices>", "</devices><qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-x'/></qemu:commandline>"),
            "<qemu:commandline>",
        ),
        (("</devices>", "</devices><seclabel type='static' model='dac' relabel='no'><label>0:0</label></seclabel>"), "<seclabel"),
        (("<devices>", "<devices><disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdz'/></disk>"), "<disk type='block'"),
    ] {
        let v = edited("domains/web.xml", |t| t.replacen(edit.0, edit.1, 1));
        let err = refused_plan(&v, &maps(&TO_B));
        assert!(err.contains("domain of VM web: domain XML refused") && err.contains(want), "{want}: {err}");
    }
    // Mapped into storage, a path is fine: the check runs on the translated XML.
    let v = edited("domains/web.xml", |t| {
        t.replacen("/srv/a/shared/web.img", "/srv/a/shared/other/web.img", 1)
    });
    plan(&v, &maps(&TO_B), &target_b()).unwrap();
    // Without a storage map nothing may be written anywhere.
    let v = archived(CIB, "shop", "/srv/a/shared", "lan-a");
    let err = refused_plan(&v, &maps(&TO_B[..2]));
    assert!(err.contains("no storage directory is mapped"), "{err}");
}

#[test]
fn the_plan_lists_devices_and_parameters_and_escapes_control_characters() {
    let v = edited(RESOURCES, |t| t.replacen("lan-a mgmt", "lan-a mgmt\u{9b}31m", 1));
    let p = plan(&v, &maps(&TO_B), &target_b()).unwrap();
    let text = p.text();
    assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
    assert!(text.contains("\\u{9b}31m"), "{text}");
    assert!(text.contains("    param config=/srv/b/shared/web.xml"), "{text}");
    assert!(text.contains("    meta allow-migrate=true"), "{text}");
    assert!(
        text.contains("disk type=file device=disk source.file=/srv/b/shared/web.img"),
        "{text}"
    );
    assert!(text.contains("interface type=network source.network=lan-b"), "{text}");
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["resources"][2]["params"]["ip"], "10.213.17.100", "{json}");
    assert!(json["domains"][0]["devices"].as_array().unwrap().len() >= 3, "{json}");
}
