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
        authentication: Authentication {
            authfile: Some("/etc/booth/authkey".into()),
            problem: None,
        },
        replicas: vec![ReplicaAge {
            vcluster: "vc".into(),
            as_of: "2026-12-07T06:00:00Z".into(),
            age_seconds: 42,
            images: 2,
        }],
        replication: vec![
            ReplicationStatus {
                vcluster: "vc".into(),
                setting: "every=60 storage=/a:/b".into(),
                problem: None,
                peer_copies_as_of: Some("2026-12-07T06:00:00Z".into()),
                age_seconds: Some(7),
            },
            ReplicationStatus {
                vcluster: "vd".into(),
                setting: "every=1".into(),
                problem: Some("the replication setting of vd: every=1: must be 5 to 86400 seconds".into()),
                peer_copies_as_of: None,
                age_seconds: None,
            },
        ],
    };
    let w = status_warnings(&s);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("ticket a has acquire-after 0"), "{w:?}");
    assert!(status_text(&s).contains("\nwarning: ticket a "));
    let text = status_text(&s);
    assert!(
        text.contains("replication of vc by vmhad: every=60 storage=/a:/b; the peer's copies as of 2026-12-07T06:00:00Z (7 s ago)\n"),
        "{text}"
    );
    assert!(text.contains("replication of vd by vmhad: every=1 (NOT USED: the replication setting of vd: every=1: must be 5 to 86400 seconds)\n"), "{text}");
    assert!(status_text(&s).contains(
        "replica here of vc: disks as of 2026-12-07T06:00:00Z (42 s ago, 2 image(s)): a failover here starts from it\n"
    ));
}

#[test]
fn status_warns_when_booth_is_not_authenticated_or_its_key_is_unusable() {
    let dir = std::env::temp_dir().join(format!("vmha-authkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("authkey");
    let conf = |path: &std::path::Path| BoothConf::parse(&format!("authfile = {}\n", path.display())).unwrap();
    let status = |auth: Authentication| Status {
        local_site: None,
        sites: vec![],
        arbitrators: vec![],
        tickets: vec![],
        authentication: auth,
        replicas: vec![],
        replication: vec![],
    };
    // No authfile at all.
    let none = status(check_authentication(&BoothConf::default()));
    let w = status_warnings(&none);
    assert!(w.len() == 1 && w[0].contains("not authenticated"), "{w:?}");
    assert!(status_text(&none).contains("booth authentication: none\n"));
    // Missing file, then a usable key, then group-readable, then too short.
    let missing = check_authentication(&conf(&key));
    assert!(
        missing.problem.as_deref().unwrap().starts_with("cannot be read"),
        "{missing:?}"
    );
    std::fs::write(&key, "0123456789abcdef-secret\n").unwrap();
    let set_mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set_mode(0o600);
    let good = status(check_authentication(&conf(&key)));
    assert_eq!(good.authentication.problem, None);
    assert!(status_warnings(&good).is_empty());
    assert!(status_text(&good).contains(&format!("booth authentication: key {}\n", key.display())));
    set_mode(0o644);
    let open = status(check_authentication(&conf(&key)));
    let w = status_warnings(&open);
    assert!(
        w.len() == 1 && w[0].contains("mode 0644") && !w[0].contains("secret"),
        "{w:?}"
    );
    assert!(status_text(&open).contains("(unusable: see below)"));
    std::fs::write(&key, "short").unwrap();
    set_mode(0o600);
    let short = check_authentication(&conf(&key));
    assert!(short.problem.as_deref().unwrap().contains("5-byte key"), "{short:?}");
    // A symbolic link (to a device here) is not followed, and a directory is no key.
    std::fs::remove_file(&key).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &key).unwrap();
    assert_eq!(
        check_authentication(&conf(&key)).problem.as_deref(),
        Some("is not a regular file")
    );
    std::fs::remove_file(&key).unwrap();
    std::fs::create_dir(&key).unwrap();
    assert_eq!(
        check_authentication(&conf(&key)).problem.as_deref(),
        Some("is not a regular file")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn site_what_if_lists_the_takeover_and_says_when_it_is_incomplete() {
    use vmha_model::whatif::{Prediction, VmOutcome, VmPrediction};
    let vm = |name: &str, priority: i64, outcome: VmOutcome| VmPrediction {
        vm: name.into(),
        priority,
        outcome,
        step: None,
        step_label: String::new(),
        displaced_by: vec![],
    };
    let view = SiteView {
        local_site: Some("10.0.2.100".parse().unwrap()),
        tickets: vec![],
        bindings: vec![
            TicketBinding {
                id: "vmha-site-shop".into(),
                rsc: "shop".into(),
                ticket: "shop".into(),
                loss_policy: "stop".into(),
            },
            TicketBinding {
                id: "vmha-site-db".into(),
                rsc: "db".into(),
                ticket: "db".into(),
                loss_policy: "stop".into(),
            },
        ],
    };
    let tags = BTreeMap::from([
        (
            "shop".to_string(),
            vec!["web1".to_string(), "web2".to_string(), "shop-ip".to_string()],
        ),
        ("db".to_string(), vec!["pg".to_string()]),
    ]);
    let mut p = Prediction {
        failed_hosts: vec![],
        added_vm: None,
        vms: vec![
            vm("web1", 100, VmOutcome::Starts { to: "b1".into() }),
            vm("web2", 100, VmOutcome::Starts { to: "b2".into() }),
            vm("local", 1, VmOutcome::Stops { from: "b2".into() }),
            vm("calm", 1, VmOutcome::Stays { host: "b1".into() }),
            vm("pg", 50, VmOutcome::StaysStopped),
        ],
        zones: vec![],
    };
    let lost = "10.0.1.100".parse().unwrap();
    // shop's address is no VM: the prediction places VMs only, and it does not make the takeover incomplete.
    let is_vm = |m: &str| m != "shop-ip";
    // Only the shop ticket: pg (held by db) is not part of the takeover; calm stays and is not listed.
    let w = site_what_if(lost, vec!["shop".into()], &view, &tags, is_vm, &p);
    assert!(w.takeover_complete, "{w:?}");
    assert_eq!(w.vclusters.keys().collect::<Vec<_>>(), ["shop"]);
    let listed: Vec<&str> = w.vms.iter().map(|v| v.vm.as_str()).collect();
    assert_eq!(listed, ["web1", "web2", "local", "pg"]);
    let text = site_what_if_text(&w);
    assert!(
        text.contains("web1             shop                  100  starts on b1\n"),
        "{text}"
    );
    assert!(text.contains("STOPS (was on b2): gives way"), "{text}");
    assert!(
        text.ends_with("takeover: every protected VM gets a place here\n"),
        "{text}"
    );
    // Both tickets: pg gets no place, so the takeover is incomplete.
    let w = site_what_if(lost, vec!["shop".into(), "db".into()], &view, &tags, is_vm, &p);
    assert!(!w.takeover_complete);
    assert!(site_what_if_text(&w).contains("INCOMPLETE"));
    // A protected member that is not in the prediction at all has no place either.
    p.vms.remove(1);
    assert!(!site_what_if(lost, vec!["shop".into()], &view, &tags, is_vm, &p).takeover_complete);
}

#[test]
fn a_protect_refuses_unauthenticated_booth_unless_allowed() {
    let none = Authentication::default();
    let e = require_authentication(&none, "shop", false).unwrap_err().to_string();
    assert!(
        e.starts_with("booth.conf sets no authfile: booth's messages are not authenticated")
            && e.contains("ticket shop")
            && e.contains("nothing changed")
            && e.contains("--allow-unauthenticated-booth"),
        "{e}"
    );
    let broken = Authentication {
        authfile: Some("/etc/booth/authkey".into()),
        problem: Some("has mode 0644: readable by others".into()),
    };
    let e = require_authentication(&broken, "shop", false).unwrap_err().to_string();
    assert!(
        e.starts_with("booth's key file /etc/booth/authkey has mode 0644"),
        "{e}"
    );
    // Said explicitly: allowed (with a warning on stderr).
    require_authentication(&none, "shop", true).unwrap();
    require_authentication(&broken, "shop", true).unwrap();
    // A usable key: no question.
    let good = Authentication {
        authfile: Some("/etc/booth/authkey".into()),
        problem: None,
    };
    require_authentication(&good, "shop", false).unwrap();
}

#[test]
fn a_vm_being_stopped_still_runs_for_the_switchover_and_the_replication() {
    let cib = |op: &str| {
        format!(
            r#"<cib admin_epoch="0" epoch="1" num_updates="0" have-quorum="1" dc-uuid="1"><configuration><crm_config/><nodes><node id="1" uname="h1"/></nodes><resources><primitive id="vm1" class="ocf" provider="vmha" type="VirtualMachine"/></resources><constraints/></configuration><status><node_state id="1" uname="h1" in_ccm="true" crmd="online" join="member" expected="member"><lrm id="1"><lrm_resources><lrm_resource id="vm1" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="vm1_last_0" operation="start" call-id="4" rc-code="0" op-status="0" interval="0"/>{op}</lrm_resource></lrm_resources></lrm></node_state></status></cib>"#
        )
    };
    let members = vec!["vm1".to_string()];
    // Pacemaker records the stop as pending while the agent shuts the guest down: its QEMU still runs.
    let stopping =
        cib(r#"<lrm_rsc_op id="vm1_last_0" operation="stop" call-id="-1" rc-code="193" op-status="-1" interval="0"/>"#);
    assert_eq!(running_members(&stopping, &members).unwrap(), members);
    // A failed stop: unknown until Pacemaker recovers it (fencing).
    let failed = cib(
        r#"<lrm_rsc_op id="vm1_last_failure_0" operation="stop" call-id="5" rc-code="1" op-status="0" interval="0"/>"#,
    );
    assert_eq!(running_members(&failed, &members).unwrap(), members);
    // The stop completed: settled.
    let stopped =
        cib(r#"<lrm_rsc_op id="vm1_stop_0" operation="stop" call-id="5" rc-code="0" op-status="0" interval="0"/>"#);
    assert!(running_members(&stopped, &members).unwrap().is_empty());
}
