use super::*;

const CONF: &str = r#"# two sites and an arbitrator
transport = UDP
port = 9929
site = 10.213.191.100
site = "10.213.192.100"
arbitrator = ::ffff:10.213.193.10
ticket = "__defaults__"
    expire = 300
ticket = "shop"
    expire = 20
    timeout = 1
ticket = db-8
    mode = MANUAL
"#;

fn conf() -> BoothConf {
    BoothConf::parse(CONF).unwrap()
}

const CIB: &str = r#"<cib><configuration><resources>
  <group id="booth">
    <primitive id="booth-ip" class="ocf" provider="heartbeat" type="IPaddr2">
      <instance_attributes id="booth-ip-ia"><nvpair id="booth-ip-ip" name="ip" value="10.213.191.100"/></instance_attributes>
    </primitive>
    <primitive id="booth-site" class="ocf" provider="pacemaker" type="booth-site"/>
  </group>
  <primitive id="other-ip" class="ocf" provider="heartbeat" type="IPaddr2">
    <instance_attributes id="o-ia"><nvpair id="o-ip" name="ip" value="10.1.1.1"/></instance_attributes>
  </primitive>
</resources><constraints>
  <rsc_ticket id="vmha-site-shop" rsc="shop" ticket="shop" loss-policy="fence"/>
</constraints></configuration>
<status><tickets>
  <ticket_state id="shop" granted="true" booth-cfg-name="booth" last-granted="1796000000" expires="1796000020"/>
  <ticket_state id="db-8" granted="false"/>
</tickets></status></cib>"#;

#[test]
fn rsc_ticket_xml_is_escaped_and_names_the_tag() {
    assert_eq!(
        rsc_ticket_xml("shop", "shop", LossPolicy::Stop),
        r#"<rsc_ticket id="vmha-site-shop" rsc="shop" ticket="shop" loss-policy="stop"/>"#
    );
    // Names are validated before this; even so nothing breaks out of the attribute.
    let x = rsc_ticket_xml("a\"b", "t<", LossPolicy::Fence);
    assert!(roxmltree::Document::parse(&x).is_ok(), "{x}");
}

#[test]
fn a_protect_checks_everything_before_a_change() {
    let ctx = |granted: bool| {
        let xml = CIB
            .replace(
                "<rsc_ticket id=\"vmha-site-shop\" rsc=\"shop\" ticket=\"shop\" loss-policy=\"fence\"/>",
                "",
            )
            .replace(
                "</constraints>",
                "</constraints><tags><tag id=\"web\"><obj_ref id=\"other-ip\"/></tag></tags>",
            )
            .replace("granted=\"true\"", &format!("granted=\"{granted}\""));
        (xml.clone(), conf(), SiteView::from_cib(&xml).unwrap())
    };
    let check = |granted: bool, vc: &str, ticket: &str, peer: &str, at_peer: bool| {
        let (xml, conf, view) = ctx(granted);
        check_protect_parts(&xml, &conf, &view, vc, ticket, peer, at_peer).map_err(|e| e.to_string())
    };
    assert_eq!(
        check(true, "web", "shop", "10.213.192.100", false),
        Ok(Ipv4Addr::new(10, 213, 192, 100))
    );
    assert!(check(true, "web", "shop", "10.213.191.100", false)
        .unwrap_err()
        .contains("is this site"));
    assert!(check(false, "web", "shop", "10.213.192.100", false)
        .unwrap_err()
        .contains("not granted"));
    assert!(check(true, "web", "shop", "10.213.192.100", true)
        .unwrap_err()
        .contains("both sites"));
    assert!(check(false, "web", "shop", "10.213.191.100", true).is_err());
    assert!(check(true, "nosuch", "shop", "10.213.192.100", false)
        .unwrap_err()
        .contains("no virtual cluster"));
    assert!(check(true, "web", "other", "10.213.192.100", false)
        .unwrap_err()
        .contains("no ticket other"));
    assert!(check(true, "web", "-F", "10.213.192.100", false)
        .unwrap_err()
        .starts_with("ticket"));
    assert!(check(true, "web;x", "shop", "10.213.192.100", false).is_err());
    assert!(check(true, "web", "shop", "--force", false)
        .unwrap_err()
        .starts_with("site"));
}

#[test]
fn disk_copies_need_a_storage_map_for_every_disk() {
    let dir = std::env::temp_dir().join(format!("vmha-site-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let domain = dir.join("vm1.xml");
    std::fs::write(
        &domain,
        "<domain type='qemu'><name>vm1</name><devices><disk type='file' device='disk'><source file='/a/vm1.img'/></disk></devices></domain>",
    )
    .unwrap();
    let cib = format!(
        r#"<cib><configuration><crm_config/><nodes/><resources>
        <primitive id="vm1" class="ocf" provider="vmha" type="VirtualMachine">
          <instance_attributes id="vm1-ia"><nvpair id="vm1-config" name="config" value="{}"/></instance_attributes>
        </primitive></resources><constraints/></configuration><status/></cib>"#,
        domain.display()
    );
    let members = vec!["vm1".to_string()];
    let ok = disk_copies(&cib, &members, &Maps::parse(&["storage=/a:/b".into()], None).unwrap()).unwrap();
    assert_eq!(ok, vec![("/a/vm1.img".to_string(), "/b/vm1.img".to_string())]);
    let e = disk_copies(&cib, &members, &Maps::parse(&["storage=/c:/d".into()], None).unwrap()).unwrap_err();
    assert!(e.to_string().contains("no --map storage"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn status_warns_of_a_stop_policy_without_acquire_after() {
    let ticket = |name: &str, acquire_after: u32, loss: &str| TicketStatus {
        name: name.into(),
        expire_seconds: 20,
        manual: false,
        acquire_after_seconds: acquire_after,
        leader: None,
        expires: None,
        granted_here: true,
        vclusters: vec![("vc".into(), loss.into())],
        running_here: vec![],
    };
    let s = Status {
        local_site: None,
        sites: vec![],
        arbitrators: vec![],
        tickets: vec![ticket("a", 0, "stop"), ticket("b", 10, "stop"), ticket("c", 0, "fence")],
    };
    let w = status_warnings(&s);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("ticket a has acquire-after 0"), "{w:?}");
    assert!(status_text(&s).contains("\nwarning: ticket a "));
}
