//! The evaluation of `vmha check`: facts in, findings out.

use super::*;
use crate::readiness::{ClockFacts, HostReport, PathState, StorageSummary};

fn cib_xml(props: &str, resources: &str, status: &str) -> String {
    format!(
        r#"<cib><configuration><crm_config><cluster_property_set id="o">{props}</cluster_property_set></crm_config>
        <nodes/><resources>{resources}</resources><constraints/></configuration><status>{status}</status></cib>"#
    )
}

const FENCE: &str = r#"<primitive id="fence-lab" class="stonith" type="fence_vmha_lab"/>"#;
const FENCE_MONITORED: &str = r#"<node_state uname="node1"><lrm><lrm_resources><lrm_resource id="fence-lab">
    <lrm_rsc_op id="a" operation="monitor" interval="0" rc-code="7" last-rc-change="1700000000"/>
    <lrm_rsc_op id="b" operation="monitor" interval="60000" rc-code="0" last-rc-change="1700000100"/>
    </lrm_resource></lrm_resources></lrm></node_state>"#;

fn report(host: &str, offset_ms: i64, storage: Vec<PathState>) -> ReceivedReport {
    ReceivedReport {
        report: HostReport {
            host: host.into(),
            time_ms: 0,
            clock: ClockFacts {
                ntp_daemon: Some("chronyd".into()),
                synchronized: Some(true),
            },
            storage,
            storage_summary: None,
            authkey: Some("0123456789abcdef".into()),
            authkey_problem: None,
        },
        offset_ms,
        age_ms: 1000,
    }
}

fn disk(exists: Option<bool>) -> Vec<PathState> {
    vec![PathState {
        vm: "vm1".into(),
        path: "/shared/vm1.qcow2".into(),
        exists,
    }]
}

fn members() -> Vec<String> {
    vec!["node1".into(), "node2".into(), "node3".into()]
}

fn healthy() -> Inputs {
    Inputs {
        cib: CibFacts::parse(&cib_xml(
            r#"<nvpair id="a" name="stonith-enabled" value="true"/>"#,
            FENCE,
            FENCE_MONITORED,
        )),
        quorum: Ok(QuorumFacts {
            nodes: 3,
            quorate: true,
            expected_votes: 3,
            total_votes: 3,
            quorum: 2,
            ..Default::default()
        }),
        totem: Ok(TotemFacts {
            configured_token_ms: Some(1000),
            token_coefficient_ms: Some(0),
            effective_token_ms: 1000,
            consensus_ms: Some(1200),
            nodes: 3,
        }),
        libvirt: Ok("9.0.0".into()),
        hypervisor: "qemu:///system".into(),
        vmhad: Ok(VmhadFacts {
            local_host: "node1".into(),
            members: members(),
            agents: members(),
        }),
        reports: Ok(vec![
            report("node1", 0, disk(Some(true))),
            report("node2", 3, disk(Some(true))),
            report("node3", -2, disk(Some(true))),
        ]),
        shutdown: Ok(ShutdownFacts {
            pacemaker_unit: Some("/usr/lib/systemd/system/pacemaker.service".into()),
            pacemaker_after: [
                "corosync.service",
                "libvirtd.service",
                "libvirt-guests.service",
                "virt-guest-shutdown.target",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            drop_ins: vec![DROP_IN.into()],
            installed: [
                "libvirtd.service",
                "libvirt-guests.service",
                "virt-guest-shutdown.target",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            guests_enabled: true,
            guests_on_shutdown: "shutdown".into(),
        }),
    }
}

fn item<'a>(findings: &'a [Finding], name: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.item == name)
        .unwrap_or_else(|| panic!("no item {name}"))
}

#[test]
fn a_healthy_cluster_is_all_green() {
    let f = evaluate(&healthy());
    assert_eq!(f.len(), 10);
    for x in &f {
        assert_eq!(x.level, Level::Green, "{x:?}");
        assert!(x.fix.is_empty());
    }
    assert_eq!(worst(&f), Level::Green);
    let fencing = item(&f, "fencing");
    assert!(fencing.summary.contains("fence-lab"), "{}", fencing.summary);
    assert!(
        fencing
            .summary
            .contains("monitor ok on node1 at 2023-11-14 22:15:00 UTC"),
        "{}",
        fencing.summary
    );
    assert!(fencing.summary.contains("last fencing: unknown"));
    assert!(item(&f, "shared-storage").summary.contains("1 files"));
}

#[test]
fn stonith_disabled_is_red_with_the_fix() {
    let mut i = healthy();
    i.cib = CibFacts::parse(&cib_xml(
        r#"<nvpair id="a" name="stonith-enabled" value="false"/>"#,
        FENCE,
        "",
    ));
    let f = evaluate(&i);
    let x = item(&f, "fencing");
    assert_eq!(x.level, Level::Red);
    assert!(x.summary.contains("stonith-enabled=false"));
    assert!(x.fix.contains("pcs property set stonith-enabled=true"));
    assert_eq!(worst(&f), Level::Red);
}

#[test]
fn no_device_or_disabled_device_or_failing_monitor_is_red() {
    let mut i = healthy();
    i.cib = CibFacts::parse(&cib_xml("", "", ""));
    let x = item(&evaluate(&i), "fencing").clone();
    assert_eq!(x.level, Level::Red);
    assert!(x.summary.contains("no fence device"), "{}", x.summary);

    i.cib = CibFacts::parse(&cib_xml(
        "",
        r#"<primitive id="f1" class="stonith" type="fence_ipmilan"><meta_attributes id="m">
            <nvpair id="m1" name="target-role" value="Stopped"/></meta_attributes></primitive>"#,
        "",
    ));
    let x = item(&evaluate(&i), "fencing").clone();
    assert_eq!(x.level, Level::Red);
    assert_eq!(x.fix, "pcs stonith enable f1");

    i.cib = CibFacts::parse(&cib_xml(
        "",
        FENCE,
        &FENCE_MONITORED.replace(r#"rc-code="0""#, r#"rc-code="1""#),
    ));
    let x = item(&evaluate(&i), "fencing").clone();
    assert_eq!(x.level, Level::Red);
    assert!(x.summary.contains("FAILED"), "{}", x.summary);
}

#[test]
fn no_quorum_policy_ignore_is_red_and_defaults_to_stop() {
    let mut i = healthy();
    i.cib = CibFacts::parse(&cib_xml(
        r#"<nvpair id="q" name="no-quorum-policy" value="ignore"/>"#,
        FENCE,
        "",
    ));
    let x = item(&evaluate(&i), "quorum-policy").clone();
    assert_eq!(x.level, Level::Red);
    assert!(x.fix.contains("no-quorum-policy=stop"));
    assert_eq!(
        item(&evaluate(&healthy()), "quorum-policy").summary,
        "no-quorum-policy=stop"
    );
    i.cib = CibFacts::parse(&cib_xml(
        r#"<nvpair id="q" name="no-quorum-policy" value="freeze"/>"#,
        FENCE,
        "",
    ));
    assert_eq!(item(&evaluate(&i), "quorum-policy").level, Level::Green);
}

#[test]
fn votequorum_settings() {
    let mut i = healthy();
    let two = QuorumFacts {
        nodes: 2,
        quorate: true,
        expected_votes: 2,
        total_votes: 2,
        quorum: 2,
        ..Default::default()
    };
    i.quorum = Ok(two.clone());
    let x = item(&evaluate(&i), "votequorum").clone();
    assert_eq!(x.level, Level::Yellow);
    assert!(x.fix.contains("two_node: 1"));

    i.quorum = Ok(QuorumFacts {
        two_node: true,
        quorum: 1,
        ..two.clone()
    });
    assert_eq!(item(&evaluate(&i), "votequorum").level, Level::Yellow);
    i.quorum = Ok(QuorumFacts {
        two_node: true,
        wait_for_all: true,
        quorum: 1,
        ..two
    });
    assert_eq!(item(&evaluate(&i), "votequorum").level, Level::Green);

    i.quorum = Ok(QuorumFacts {
        nodes: 3,
        quorate: true,
        expected_votes: 1,
        total_votes: 3,
        quorum: 1,
        ..Default::default()
    });
    assert_eq!(item(&evaluate(&i), "votequorum").level, Level::Red);
    i.quorum = Ok(QuorumFacts {
        nodes: 3,
        quorate: false,
        ..Default::default()
    });
    assert_eq!(item(&evaluate(&i), "votequorum").level, Level::Red);
    i.quorum = Err("CS_ERR_LIBRARY".into());
    let x = item(&evaluate(&i), "votequorum").clone();
    assert_eq!(x.level, Level::Red);
    assert!(x.summary.contains("CS_ERR_LIBRARY"));
}

#[test]
fn token_too_long_or_inflated_by_the_coefficient_is_yellow() {
    let mut i = healthy();
    i.totem = Ok(TotemFacts {
        configured_token_ms: Some(1000),
        token_coefficient_ms: None,
        effective_token_ms: 1650,
        consensus_ms: None,
        nodes: 3,
    });
    let x = item(&evaluate(&i), "corosync-token").clone();
    assert_eq!(x.level, Level::Yellow);
    assert!(x.summary.contains("Corosync waits 1650 ms"), "{}", x.summary);
    assert!(x.fix.contains("token_coefficient: 0"));

    i.totem = Ok(TotemFacts {
        configured_token_ms: Some(20_000),
        token_coefficient_ms: Some(0),
        effective_token_ms: 20_000,
        consensus_ms: None,
        nodes: 3,
    });
    let x = item(&evaluate(&i), "corosync-token").clone();
    assert_eq!(x.level, Level::Yellow);
    assert!(x.summary.contains("20.0 s"), "{}", x.summary);

    // Corosync's default (3000 ms + 650 ms for the third node) is fine.
    i.totem = Ok(TotemFacts {
        configured_token_ms: None,
        token_coefficient_ms: None,
        effective_token_ms: 3650,
        consensus_ms: Some(4380),
        nodes: 3,
    });
    assert_eq!(item(&evaluate(&i), "corosync-token").level, Level::Green);
}

#[test]
fn libvirt_unreachable_is_red() {
    let mut i = healthy();
    i.libvirt = Err("no answer within 10 s (is libvirtd hung?)".into());
    let x = item(&evaluate(&i), "libvirt").clone();
    assert_eq!(x.level, Level::Red);
    assert!(x.summary.contains("qemu:///system"));
    assert!(x.fix.contains("libvirtd"));
}

#[test]
fn a_host_without_vmhad_is_named() {
    let mut i = healthy();
    i.vmhad = Ok(VmhadFacts {
        local_host: "node1".into(),
        members: members(),
        agents: vec!["node1".into(), "node2".into()],
    });
    i.reports = Ok(vec![
        report("node1", 0, disk(Some(true))),
        report("node2", 0, disk(Some(true))),
    ]);
    let f = evaluate(&i);
    let x = item(&f, "vmhad");
    assert_eq!(x.level, Level::Red);
    assert!(x.summary.starts_with("vmhad is not running on node3"), "{}", x.summary);
    assert!(x.fix.contains("node3"));
    // The other items say why they know nothing about node3, without another red.
    assert_eq!(item(&f, "shared-storage").level, Level::Yellow);
    assert!(item(&f, "time-sync").summary.contains("node3"));

    i.vmhad = Err("vmhad is not running on this host".into());
    assert_eq!(item(&evaluate(&i), "vmhad").level, Level::Red);
}

#[test]
fn storage_missing_or_hung_on_a_host_is_red() {
    let mut i = healthy();
    i.reports = Ok(vec![
        report("node1", 0, disk(Some(true))),
        report("node2", 0, disk(Some(false))),
        report("node3", 0, disk(Some(true))),
    ]);
    let x = item(&evaluate(&i), "shared-storage").clone();
    assert_eq!(x.level, Level::Red);
    assert_eq!(x.summary, "node2 cannot see /shared/vm1.qcow2 (VM vm1)");
    i.reports = Ok(vec![
        report("node1", 0, disk(Some(true))),
        report("node2", 0, disk(None)),
        report("node3", 0, disk(Some(true))),
    ]);
    assert_eq!(item(&evaluate(&i), "shared-storage").level, Level::Red);
}

/// A host's report as today's vmhad sends it: the paths it does not see, and what it counted.
fn swept(host: &str, unseen: Vec<PathState>, summary: StorageSummary) -> ReceivedReport {
    let mut r = report(host, 0, unseen);
    r.report.storage_summary = Some(summary);
    r
}

fn summary(vms: usize, looked_at: usize, problems: usize) -> StorageSummary {
    StorageSummary {
        vms,
        looked_at,
        paths: looked_at * 2,
        problems,
        oldest_ms: 75_000,
    }
}

/// 2000 VMs: the finding counts every VM's files, not the 256 a report lists; a host whose first sweep
/// has not ended is yellow (nothing to say yet about the VMs it has not looked at); the missing paths a
/// report counted past its list are counted in the finding, and the finding names at most 10.
#[test]
fn storage_of_thousands_of_vms() {
    let mut i = healthy();
    i.reports = Ok(["node1", "node2", "node3"]
        .iter()
        .map(|h| swept(h, vec![], summary(2000, 2000, 0)))
        .collect());
    let x = item(&evaluate(&i), "shared-storage").clone();
    assert_eq!(x.level, Level::Green);
    assert_eq!(
        x.summary,
        "the 4000 files of the 2000 managed VMs exist on every host (node1, node2, node3); the oldest look was 75 s ago"
    );

    let mut reports = i.reports.clone().unwrap();
    reports[1] = swept("node2", vec![], summary(2000, 512, 0));
    i.reports = Ok(reports);
    let x = item(&evaluate(&i), "shared-storage").clone();
    assert_eq!(x.level, Level::Yellow);
    assert!(
        x.summary
            .starts_with("node2 has looked at 512 of 2000 VMs so far (each host looks at 128"),
        "{}",
        x.summary
    );

    let unseen: Vec<PathState> = (0..256)
        .map(|n| PathState {
            vm: format!("vm{n}"),
            path: format!("/shared/vm{n}.qcow2"),
            exists: Some(false),
        })
        .collect();
    let mut reports = i.reports.clone().unwrap();
    reports[2] = swept("node3", unseen, summary(2000, 2000, 300));
    i.reports = Ok(reports);
    let x = item(&evaluate(&i), "shared-storage").clone();
    assert_eq!(x.level, Level::Red, "a missing file wins over a sweep not ended");
    assert!(
        x.summary.starts_with("node3 cannot see /shared/vm0.qcow2 (VM vm0); "),
        "{}",
        x.summary
    );
    assert!(x.summary.ends_with("; and 290 more"), "{}", x.summary);
    assert_eq!(x.summary.matches("cannot see").count(), 10);

    // Counts no vmhad would send (the reports come from a CPG group): said, no overflow.
    let mut reports = i.reports.clone().unwrap();
    reports[0] = swept("node1", vec![], summary(usize::MAX, 1, usize::MAX));
    reports[1] = swept("node2", vec![], summary(2000, 2000, usize::MAX));
    i.reports = Ok(reports);
    let x = item(&evaluate(&i), "shared-storage").clone();
    assert_eq!(x.level, Level::Red);

    // No VM at all.
    i.reports = Ok(["node1", "node2", "node3"]
        .iter()
        .map(|h| swept(h, vec![], summary(0, 0, 0)))
        .collect());
    assert!(item(&evaluate(&i), "shared-storage")
        .summary
        .starts_with("no managed VM needs files"));
}

#[test]
fn stale_reports_count_as_missing() {
    let mut i = healthy();
    let mut old = report("node3", 0, disk(Some(false)));
    old.age_ms = 60_000;
    i.reports = Ok(vec![
        report("node1", 0, disk(Some(true))),
        report("node2", 0, disk(Some(true))),
        old,
    ]);
    let x = item(&evaluate(&i), "shared-storage").clone();
    assert_eq!(x.level, Level::Yellow);
    assert!(x.summary.contains("no report from node3"));
}

#[test]
fn clocks_apart_or_unsynchronized() {
    let mut i = healthy();
    i.reports = Ok(vec![
        report("node1", 0, vec![]),
        report("node2", 2500, vec![]),
        report("node3", -10, vec![]),
    ]);
    let x = item(&evaluate(&i), "time-sync").clone();
    assert_eq!(x.level, Level::Red);
    assert!(x.summary.contains("node2 is 2.5 s ahead"), "{}", x.summary);

    let mut unsynced = report("node3", 0, vec![]);
    unsynced.report.clock.synchronized = Some(false);
    i.reports = Ok(vec![report("node1", 0, vec![]), report("node2", 0, vec![]), unsynced]);
    let x = item(&evaluate(&i), "time-sync").clone();
    assert_eq!(x.level, Level::Yellow);
    assert!(x.summary.contains("node3 (chronyd)"));

    // Without an NTP daemon only the offsets are judged, and the summary says so.
    let mut no_ntp = report("node3", 0, vec![]);
    no_ntp.report.clock = ClockFacts::default();
    i.reports = Ok(vec![report("node1", 0, vec![]), report("node2", 0, vec![]), no_ntp]);
    let x = item(&evaluate(&i), "time-sync").clone();
    assert_eq!(x.level, Level::Green);
    assert!(x.summary.contains("no NTP daemon seen on node3"));
}

#[test]
fn render_prints_a_fix_under_each_problem() {
    let mut i = healthy();
    i.libvirt = Err("down".into());
    let text = render(&evaluate(&i));
    assert!(text.contains("RED     libvirt"), "{text}");
    assert!(text.contains("fix: start libvirtd"), "{text}");
    assert_eq!(text.matches("fix:").count(), 1);
}

#[test]
fn no_reports_at_all_is_yellow_not_green() {
    let mut i = healthy();
    i.reports = Ok(vec![]);
    let f = evaluate(&i);
    for name in ["shared-storage", "time-sync", "relay-authkey"] {
        let x = item(&f, name);
        assert_eq!(x.level, Level::Yellow, "{x:?}");
        assert!(x.summary.contains("no host has reported yet"));
    }
}

fn set_reports(i: &mut Inputs, f: impl Fn(&mut ReceivedReport)) {
    if let Ok(reports) = &mut i.reports {
        reports.iter_mut().for_each(f);
    }
}

#[test]
fn authkeys_missing_or_different_are_red_with_where_to_copy_from() {
    let i = healthy();
    let f = evaluate(&i);
    let x = item(&f, "relay-authkey");
    assert_eq!(x.level, Level::Green, "{x:?}");
    assert!(x.summary.contains("fingerprint 0123456789abcdef"), "{}", x.summary);

    let mut i = healthy();
    set_reports(&mut i, |r| {
        if r.report.host == "node3" {
            r.report.authkey = Some("fedcba9876543210".into());
        }
    });
    let f = evaluate(&i);
    let x = item(&f, "relay-authkey");
    assert_eq!(x.level, Level::Red, "{x:?}");
    assert!(
        x.summary
            .contains("node3 has a different key (fingerprint fedcba9876543210"),
        "{}",
        x.summary
    );
    assert_eq!(
        x.fix,
        "copy /etc/vmha/authkey from node1 to node3 (root, mode 0600) and restart vmhad there"
    );

    let mut i = healthy();
    set_reports(&mut i, |r| {
        if r.report.host == "node2" {
            r.report.authkey = None;
            r.report.authkey_problem = Some("/etc/vmha/authkey: mode 0644 lets others read it".into());
        }
    });
    let f = evaluate(&i);
    let x = item(&f, "relay-authkey");
    assert_eq!(x.level, Level::Red, "{x:?}");
    assert!(
        x.summary
            .contains("no usable key on node2 (/etc/vmha/authkey: mode 0644"),
        "{}",
        x.summary
    );
    assert!(x.fix.contains("from node1 to node2"), "{}", x.fix);

    let mut i = healthy();
    set_reports(&mut i, |r| r.report.authkey = None);
    let x = item(&evaluate(&i), "relay-authkey").clone();
    assert_eq!(x.level, Level::Red, "{x:?}");
    assert!(x.fix.contains("vmha keygen"), "{}", x.fix);
    // The key itself is never part of a report: only its fingerprint.
    let json = serde_json::to_string(&healthy().reports.unwrap()).unwrap();
    assert!(json.contains("\"authkey\":\"0123456789abcdef\""), "{json}");
}

#[test]
fn a_host_whose_shutdown_would_kill_its_vms_is_red_and_unreadable_units_yellow() {
    let mut i = healthy();
    if let Ok(f) = &mut i.shutdown {
        f.pacemaker_after.remove("libvirt-guests.service");
    }
    let findings = evaluate(&i);
    let f = item(&findings, "shutdown-order");
    assert_eq!(f.level, Level::Red, "{f:?}");
    assert!(f.summary.contains("libvirt-guests.service"), "{}", f.summary);
    assert!(f.fix.contains(DROP_IN), "{}", f.fix);
    assert_eq!(worst(&findings), Level::Red);

    i.shutdown = Err("permission denied".into());
    let f = item(&evaluate(&i), "shutdown-order").clone();
    assert_eq!(f.level, Level::Yellow, "{f:?}");
    assert!(f.summary.contains("permission denied"), "{}", f.summary);
}
