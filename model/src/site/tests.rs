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
    acquire-after = 60
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
fn booth_conf_gives_sites_arbitrators_and_tickets() {
    let c = conf();
    assert_eq!(
        c.sites,
        vec![Ipv4Addr::new(10, 213, 191, 100), Ipv4Addr::new(10, 213, 192, 100)]
    );
    assert_eq!(c.arbitrators, vec![Ipv4Addr::new(10, 213, 193, 10)]);
    assert_eq!(
        c.tickets,
        vec![
            TicketConf {
                name: "shop".into(),
                expire: 20,
                manual: false,
                acquire_after: 0
            },
            // The __defaults__ stanza's expire; its own mode.
            TicketConf {
                name: "db-8".into(),
                expire: 300,
                manual: true,
                acquire_after: 60
            },
        ]
    );
    assert_eq!(c.other_site(c.sites[0]), Some(c.sites[1]));
}

#[test]
fn hostile_booth_conf_is_an_error_naming_the_line() {
    for (text, line) in [
        ("site = 10.0.0.1\nsite = not-an-address\n", 2),
        ("ticket = \"a;rm -rf /\"\n", 1),
        ("ticket = -F\n", 1),
        ("site 10.0.0.1\n", 1),
        ("ticket = t\nexpire = soon\n", 2),
        ("arbitrator = 10.0.0.300\n", 1),
        ("ticket = a\nticket = b\nticket = a\n", 3),
        ("ticket = a\nticket = __defaults__\nexpire = 1\n", 2),
        ("expire = -1\n", 1),
        ("ticket = t\nacquire-after = 1m\n", 2),
        ("site = 10.0.0.1\narbitrator = 10.0.0.1\n", 2),
        ("site = \u{1b}[31m\n", 1),
        ("authfile = etc/booth/authkey\n", 1),
        ("authfile = /etc/booth/a\u{7}b\n", 1),
        ("authfile = /a\nsite = 10.0.0.1\nauthfile = /b\n", 3),
    ] {
        match BoothConf::parse(text) {
            Err(SiteError::Conf { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn hostile_ticket_names_are_refused() {
    for bad in [
        "",
        "-F",
        "--help",
        "1shop",
        "shop ticket",
        "shop\nsite = 1.2.3.4",
        "shop\"",
        "shop'",
        "../etc/passwd",
        "shop;reboot",
        "$(reboot)",
        "shöp",
        "shop\u{202e}",
        &"t".repeat(64),
    ] {
        let e = validate_ticket(bad).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("ticket "), "{text}");
        // The message prints control and bidi characters escaped.
        assert!(!text.contains('\n') && !text.contains('\u{202e}'), "{text:?}");
    }
    for good in ["shop", "db-8", "T_1", &"t".repeat(63)] {
        validate_ticket(good).unwrap();
    }
}

#[test]
fn hostile_sites_are_refused() {
    let c = conf();
    assert_eq!(
        validate_site("10.213.192.100", &c),
        Ok(Ipv4Addr::new(10, 213, 192, 100))
    );
    for bad in [
        "",
        "-s",
        "siteB",
        "10.213.193.10", // the arbitrator is no site
        "10.213.191.1",  // not in booth.conf
        "10.213.192.100 ",
        "10.213.192.100\n",
        "10.213.192.100;reboot",
        "::1",
    ] {
        let e = validate_site(bad, &c).unwrap_err();
        assert!(matches!(e, SiteError::Invalid { what: "site", .. }), "{bad:?}: {e}");
    }
}

#[test]
fn booth_list_lines_parse_and_junk_is_skipped() {
    let text = "ticket: shop, leader: 10.213.191.100, expires: 2026-12-06 06:40:00, commit: 2026-12-06 06:39:40\n\
                ticket: db-8, leader: NONE\n\
                ticket: -F, leader: 10.0.0.1\n\
                garbage line\n\
                ticket: idle, leader: 10.213.192.100, expires: INF\n";
    let l = parse_booth_list(text);
    assert_eq!(l.len(), 3, "{l:?}");
    assert_eq!(l[0].name, "shop");
    assert_eq!(l[0].leader, Some(Ipv4Addr::new(10, 213, 191, 100)));
    assert_eq!(l[0].expires.as_deref(), Some("2026-12-06 06:40:00"));
    assert_eq!(l[1].leader, None);
    assert_eq!(l[2].expires, None);
}

#[test]
fn site_view_reads_tickets_bindings_and_the_local_site() {
    let v = SiteView::from_cib(CIB).unwrap();
    assert_eq!(v.local_site, Some(Ipv4Addr::new(10, 213, 191, 100)));
    assert!(v.granted_here("shop"));
    assert!(!v.granted_here("db-8"));
    assert!(!v.granted_here("nosuch"));
    assert_eq!(v.ticket("shop").unwrap().expires, Some(1_796_000_020));
    let b = v.binding_of("shop").unwrap();
    assert_eq!((b.ticket.as_str(), b.loss_policy.as_str()), ("shop", "fence"));
    assert!(v.binding_of("web").is_none());
    assert!(SiteView::from_cib("<cib").is_err());
}

#[test]
fn ticket_defaults_apply_to_the_tickets_after_them_only() {
    // Ticket settings before any ticket are defaults too (booth reads them so).
    let c = BoothConf::parse("expire = 30\nticket = a\nticket = b\nexpire = 5\nmode = manual\nticket = c\n").unwrap();
    let got: Vec<(&str, u32, bool)> = c
        .tickets
        .iter()
        .map(|t| (t.name.as_str(), t.expire, t.manual))
        .collect();
    assert_eq!(got, vec![("a", 30, false), ("b", 5, true), ("c", 30, false)]);
    // Without any defaults: booth's 600 s, automatic mode.
    let c = BoothConf::parse("ticket = a\n").unwrap();
    assert_eq!((c.tickets[0].expire, c.tickets[0].manual), (DEFAULT_EXPIRE, false));
}

#[test]
fn errors_print_hostile_text_escaped() {
    let e = BoothConf::parse("site = \u{1b}]0;owned\u{7}\n")
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\u{1b}') && !e.contains('\u{7}'), "{e:?}");
}

#[test]
fn authfile_is_read_and_checked_without_showing_the_key() {
    let c = BoothConf::parse("authfile = \"/etc/booth/authkey\"\nsite = 10.0.0.1\n").unwrap();
    assert_eq!(c.authfile.as_deref(), Some("/etc/booth/authkey"));
    assert_eq!(conf().authfile, None);
    let long = "/x".repeat(2049);
    assert!(validate_authfile(&long).is_err());
    // Owner-only and 8 to 64 bytes (white space around a text key does not count): fine.
    assert_eq!(authkey_problem(0o100600, b"\n  12345678\n"), None);
    assert_eq!(authkey_problem(0o400, &[0xff; 64]), None);
    // Readable by the group or others: booth refuses it.
    let p = authkey_problem(0o100640, b"secret-key-1234").unwrap();
    assert!(p.contains("mode 0640") && !p.contains("secret"), "{p}");
    assert!(authkey_problem(0o604, b"secret-key-1234").is_some());
    // Too short, too long, empty.
    for key in [&b"1234567"[..], &[7u8; 65][..], &b"   \n"[..]] {
        let p = authkey_problem(0o600, key).unwrap();
        assert!(p.contains("booth needs 8 to 64 bytes"), "{p}");
    }
}
