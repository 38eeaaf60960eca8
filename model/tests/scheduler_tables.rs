//! Scheduler scenario tables: the placement policy compiled into a file-backed CIB, hosts failed the way
//! what-if fails them, the free capacity set the way vmhad keeps it, and Pacemaker's own scheduler
//! (`crm_simulate`, no daemons, no root) deciding. One table per step of the failover order (see
//! `vmha_model::failover`), plus the case of issue 19 where a priority-100 VM pushed a priority-1 VM out
//! instead of taking free room.
//!
//! Needs `crm_simulate` (pacemaker-cli-utils, installed by ci/install-deps).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use vmha_model::failover::with_free_capacity;
use vmha_model::policy::{plan, Policy};
use vmha_model::whatif::{fail_hosts, grant_tickets, predict, Prediction};

/// A host: name, zone, pool, capacity (in VM-sized slots of `hv_memory`).
type Host = (&'static str, &'static str, &'static str, u32);
/// A VM: name, priority, home zone, pool, host it runs on.
type Vm = (&'static str, i32, &'static str, &'static str, Option<&'static str>);

struct Case {
    name: &'static str,
    hosts: &'static [Host],
    vms: &'static [Vm],
    fail: &'static [&'static str],
    /// Where each VM runs afterwards (`None`: stopped).
    expect: &'static [(&'static str, Option<&'static str>)],
    /// The failover step what-if names for the VMs placed anew.
    steps: &'static [(&'static str, u8)],
    /// Stickiness of the user's resource defaults (the issue checked 0, 1 and 100).
    user_stickiness: Option<u32>,
}

/// Pools: two of hardware class x86, one of class gpu.
const POOLS: &str = r#"{"std": {"class": "x86"}, "big": {"class": "x86"}, "gpu": {"class": "gpu"}}"#;

fn op(vm: &str, host: &str) -> String {
    format!(
        r#"<lrm_resource id="{vm}" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="{vm}_last_0" operation_key="{vm}_start_0" operation="start" crm-debug-origin="test" crm_feature_set="3.16.2" transition-key="1:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" transition-magic="0:0;1:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" call-id="5" rc-code="0" op-status="0" interval="0" exec-time="1" queue-time="0" on_node="{host}"/></lrm_resource>"#
    )
}

/// The cluster of a case, before its policy: hosts with capacity, VMs needing one slot each, running
/// where the case says.
fn cib(case: &Case) -> String {
    let mut nodes = String::new();
    let mut states = String::new();
    for (i, (h, _, _, slots)) in case.hosts.iter().enumerate() {
        let id = i + 1;
        nodes.push_str(&format!(
            r#"<node id="{id}" uname="{h}"><utilization id="n{id}-u"><nvpair id="n{id}-um" name="hv_memory" value="{slots}"/></utilization></node>"#
        ));
        let ops: String = case
            .vms
            .iter()
            .filter(|v| v.4 == Some(*h))
            .map(|v| op(v.0, h))
            .collect();
        states.push_str(&format!(
            r#"<node_state id="{id}" uname="{h}" in_ccm="true" crmd="online" join="member" expected="member"><lrm id="{id}"><lrm_resources>{ops}</lrm_resources></lrm></node_state>"#
        ));
    }
    let resources: String = case
        .vms
        .iter()
        .map(|(v, ..)| {
            format!(
                r#"<primitive id="{v}" class="ocf" provider="vmha" type="VirtualMachine"><utilization id="{v}-u"><nvpair id="{v}-um" name="hv_memory" value="1"/></utilization></primitive>"#
            )
        })
        .collect();
    let defaults = case
        .user_stickiness
        .map(|s| {
            format!(
                r#"<rsc_defaults><meta_attributes id="rsc-options"><nvpair id="rsc-options-stickiness" name="resource-stickiness" value="{s}"/></meta_attributes></rsc_defaults>"#
            )
        })
        .unwrap_or_default();
    format!(
        r#"<cib admin_epoch="0" epoch="1" num_updates="0" validate-with="pacemaker-3.7" crm_feature_set="3.16.2" have-quorum="1" dc-uuid="1"><configuration><crm_config><cluster_property_set id="cib-bootstrap-options"><nvpair id="o1" name="stonith-enabled" value="false"/></cluster_property_set></crm_config><nodes>{nodes}</nodes><resources>{resources}</resources><constraints/>{defaults}</configuration><status>{states}</status></cib>"#
    )
}

fn policy(case: &Case) -> Policy {
    let hosts: BTreeMap<&str, serde_json::Value> = case
        .hosts
        .iter()
        .map(|(h, z, p, _)| (*h, serde_json::json!({"zone": z, "pool": p})))
        .collect();
    let vms: BTreeMap<&str, serde_json::Value> = case
        .vms
        .iter()
        .map(|(v, prio, zone, pool, _)| (*v, serde_json::json!({"priority": prio, "zone": zone, "pool": pool})))
        .collect();
    let all: BTreeMap<String, serde_json::Value> = serde_json::from_str(POOLS).unwrap();
    let pools: BTreeMap<&String, &serde_json::Value> = all
        .iter()
        .filter(|(name, _)| case.hosts.iter().any(|h| h.2 == name.as_str()))
        .collect();
    let doc = serde_json::json!({
        "pools": pools,
        "hosts": hosts,
        "vms": vms,
    });
    Policy::from_json(&doc.to_string()).unwrap()
}

fn with_configuration(cib: &str, configuration: &str) -> String {
    let start = cib.find("<configuration>").unwrap();
    let end = cib.find("</configuration>").unwrap() + "</configuration>".len();
    format!("{}{}{}", &cib[..start], configuration, &cib[end..])
}

/// A private scratch directory for one run of the scheduler.
fn scratch() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmha-scheduler-tables-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs Pacemaker's scheduler (`crm_simulate`) on `cib`, with its clock at `datetime` (ISO 8601) when
/// given: the transition graph and what it printed.
fn simulate(cib: &str, datetime: Option<&str>) -> (String, String) {
    let dir = scratch();
    let cib_file = dir.join("cib.xml");
    let graph_file = dir.join("graph.xml");
    std::fs::write(&cib_file, cib).unwrap();
    let mut cmd = Command::new("crm_simulate");
    cmd.arg("-x").arg(&cib_file);
    if let Some(t) = datetime {
        cmd.arg("-t").arg(t);
    }
    let out = cmd
        .arg("-R")
        .arg("-s")
        .arg("-G")
        .arg(&graph_file)
        .env_remove("CIB_file")
        .env_remove("CIB_shadow")
        .output()
        .expect("crm_simulate (pacemaker-cli-utils) must be installed for the scheduler tables");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "crm_simulate failed:\n{text}");
    let graph = std::fs::read_to_string(&graph_file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (graph, text)
}

/// Runs Pacemaker's scheduler on `copy` and reads its transition graph as what-if does.
fn schedule(live: &str, copy: &str, failed: &[String]) -> (Prediction, String) {
    let (graph, text) = simulate(copy, None);
    (predict(live, copy, &graph, failed, None).unwrap(), text)
}

fn run(case: &Case) {
    let base = cib(case);
    let p = policy(case);
    let planned = plan(&p, &base).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let stored = vmha_model::policy::store_xml(&p);
    let configuration = planned
        .configuration
        .replacen("</crm_config>", &format!("{stored}</crm_config>"), 1);
    let live = with_configuration(&base, &configuration);
    let failed: Vec<String> = case.fail.iter().map(|s| s.to_string()).collect();
    let copy = with_free_capacity(&fail_hosts(&live, &failed).unwrap()).unwrap();
    let (prediction, scores) = schedule(&live, &copy, &failed);
    let placement = prediction.placement();
    for (vm, host) in case.expect {
        assert_eq!(
            placement.get(*vm).cloned().flatten().as_deref(),
            *host,
            "{}: {vm}\nprediction: {:#?}\n{scores}",
            case.name,
            prediction.vms
        );
    }
    for (vm, step) in case.steps {
        let v = prediction.vms.iter().find(|v| v.vm == *vm).unwrap();
        assert_eq!(v.step, Some(*step), "{}: {vm}: {}", case.name, v.step_label);
        assert!(
            v.step_label.starts_with(&format!("step {step}:")) || v.step_label.contains(&format!("; step {step}:")),
            "{}: {vm}: {}",
            case.name,
            v.step_label
        );
    }
}

// Zones: eu/b1/r1 (rack k1 and k2), eu/b1/r2, eu/b2, us.

#[test]
fn step_1_the_home_zone_takes_the_vm_where_it_has_room_nearest_first() {
    run(&Case {
        name: "step 1",
        hosts: &[
            ("h1", "eu/b1/r1/k1", "std", 1),
            ("h2", "eu/b1/r1/k2", "std", 2),
            ("h3", "eu/b1/r1/k1", "std", 2),
            ("h4", "us", "std", 4),
        ],
        vms: &[
            ("v", 10, "eu/b1/r1/k1", "std", Some("h1")),
            ("w", 10, "eu/b1/r1/k2", "std", Some("h2")),
        ],
        fail: &["h1"],
        // h3 shares v's rack: before h2 (same room) and h4 (another site, the most room).
        expect: &[("v", Some("h3")), ("w", Some("h2"))],
        steps: &[("v", 1)],
        user_stickiness: None,
    });
}

#[test]
fn step_2_the_own_pool_in_the_nearest_zone_with_room() {
    let hosts: &[Host] = &[
        ("h1", "eu/b1/r1", "std", 1),
        ("h2", "eu/b1/r1", "std", 1),
        ("h3", "eu/b1/r2", "std", 1),
        ("h4", "eu/b2", "std", 3),
        ("h5", "us", "std", 3),
        ("g1", "eu/b1/r1", "big", 3),
    ];
    // The home room is full (lo fills h2): the same building (h3) before the same site (h4).
    run(&Case {
        name: "step 2, same building",
        hosts,
        vms: &[
            ("v", 10, "eu/b1/r1", "std", Some("h1")),
            ("lo", 1, "eu/b1/r1", "std", Some("h2")),
        ],
        fail: &["h1"],
        expect: &[("v", Some("h3")), ("lo", Some("h2"))],
        steps: &[("v", 2)],
        user_stickiness: None,
    });
    // The building is full too: the same site (h4) before another site (h5), and before the other pool
    // (g1) in the home room.
    run(&Case {
        name: "step 2, same site",
        hosts,
        vms: &[
            ("v", 10, "eu/b1/r1", "std", Some("h1")),
            ("lo", 1, "eu/b1/r1", "std", Some("h2")),
            ("x", 1, "eu/b1/r2", "std", Some("h3")),
        ],
        fail: &["h1"],
        expect: &[("v", Some("h4")), ("lo", Some("h2")), ("x", Some("h3"))],
        steps: &[("v", 2)],
        user_stickiness: None,
    });
}

#[test]
fn step_3_another_pool_of_the_class_never_another_class() {
    run(&Case {
        name: "step 3",
        hosts: &[
            ("h1", "eu/b1/r1", "std", 1),
            ("h2", "eu/b1/r1", "std", 1),
            ("gp", "eu/b1/r1", "gpu", 4),
            ("b1", "us", "big", 2),
        ],
        vms: &[
            ("v", 10, "eu/b1/r1", "std", Some("h1")),
            ("lo", 1, "eu/b1/r1", "std", Some("h2")),
        ],
        fail: &["h1"],
        // Pool std is full; the gpu host in the home room is another class: v goes to pool big.
        expect: &[("v", Some("b1")), ("lo", Some("h2"))],
        steps: &[("v", 3)],
        user_stickiness: None,
    });
}

#[test]
fn step_4_without_free_room_a_lower_priority_vm_near_home_gives_way() {
    run(&Case {
        name: "step 4",
        hosts: &[
            ("h1", "eu/b1/r1", "std", 1),
            ("h2", "eu/b1/r1", "std", 1),
            ("h3", "eu/b2", "std", 1),
        ],
        vms: &[
            ("v", 10, "eu/b1/r1", "std", Some("h1")),
            ("near", 1, "eu/b1/r1", "std", Some("h2")),
            ("far", 5, "eu/b2", "std", Some("h3")),
        ],
        fail: &["h1"],
        // near gives way (home zone first) and finds no room; far is above near: it stays.
        expect: &[("v", Some("h2")), ("near", None), ("far", Some("h3"))],
        steps: &[("v", 4)],
        user_stickiness: None,
    });
}

#[test]
fn step_5_then_lower_priority_vms_elsewhere_in_zone_order() {
    run(&Case {
        name: "step 5",
        hosts: &[
            ("h1", "eu/b1/r1", "std", 1),
            ("h2", "eu/b1/r1", "std", 1),
            ("h3", "eu/b2", "std", 1),
            ("h4", "us", "std", 1),
        ],
        vms: &[
            ("v", 10, "eu/b1/r1", "std", Some("h1")),
            // The home zone holds a VM of the same priority: it keeps its place.
            ("peer", 10, "eu/b1/r1", "std", Some("h2")),
            ("near", 1, "eu/b2", "std", Some("h3")),
            ("far", 5, "us", "std", Some("h4")),
        ],
        fail: &["h1"],
        expect: &[
            ("v", Some("h3")),
            ("peer", Some("h2")),
            ("near", None),
            ("far", Some("h4")),
        ],
        steps: &[("v", 5)],
        user_stickiness: None,
    });
}

/// Issue 19: the priority-100 VM's home zone is full (a priority-1 VM fills it), another zone has free
/// room. Before, Pacemaker placed the priority-100 VM first on its best-scored host and pushed the
/// priority-1 VM out to the free zone, at stickiness 0, 1 and 100. Now it takes the free room itself.
#[test]
fn the_issue_case_takes_the_free_room_instead_of_pushing_a_vm_out() {
    for stickiness in [None, Some(0), Some(1), Some(100)] {
        run(&Case {
            name: "issue 19",
            hosts: &[("a1", "A", "std", 1), ("a2", "A", "std", 1), ("b1", "B", "std", 1)],
            vms: &[("hi", 100, "A", "std", Some("a1")), ("lo", 1, "A", "std", Some("a2"))],
            fail: &["a1"],
            expect: &[("hi", Some("b1")), ("lo", Some("a2"))],
            steps: &[("hi", 2)],
            user_stickiness: stickiness,
        });
    }
    // Without the free capacity vmhad keeps (the attributes the rule reads), the same policy shows the
    // bug: Pacemaker places hi first on its best-scored host and pushes lo out.
    let case = Case {
        name: "issue 19 without free attributes",
        hosts: &[("a1", "A", "std", 1), ("a2", "A", "std", 1), ("b1", "B", "std", 1)],
        vms: &[("hi", 100, "A", "std", Some("a1")), ("lo", 1, "A", "std", Some("a2"))],
        fail: &["a1"],
        expect: &[],
        steps: &[],
        user_stickiness: None,
    };
    let live = with_configuration(&cib(&case), &plan(&policy(&case), &cib(&case)).unwrap().configuration);
    let failed = vec!["a1".to_string()];
    let (p, _) = schedule(&live, &fail_hosts(&live, &failed).unwrap(), &failed);
    let placement = p.placement();
    assert_eq!(placement["hi"].as_deref(), Some("a2"));
    assert_eq!(placement["lo"].as_deref(), Some("b1"));
}

/// A zone loses all its hosts and several of its VMs compete for the same free room: the limit of what
/// Pacemaker's scores express. The free capacity is a node attribute read once per transition, so two
/// VMs placed in the same transition both see the one free slot of r2a; Pacemaker counts only the VMs it
/// has assigned, so both land there and the lower-priority VM that ran there moves on to the next free
/// room (and so on). Every VM keeps running, the highest-priority VM takes the nearest free room, nothing
/// is stopped while room existed, but VMs already running may move (live) to make the room.
#[test]
fn a_zone_lost_whole_keeps_every_vm_running_highest_priority_nearest() {
    let case = Case {
        name: "zone lost",
        hosts: &[
            ("r1a", "eu/b1/r1", "std", 2),
            ("r1b", "eu/b1/r1", "std", 2),
            ("r2a", "eu/b1/r2", "std", 2),
            ("b2a", "eu/b2", "std", 2),
            ("usa", "us", "std", 4),
        ],
        vms: &[
            ("p100", 100, "eu/b1/r1", "std", Some("r1a")),
            ("p50", 50, "eu/b1/r1", "std", Some("r1a")),
            ("p10", 10, "eu/b1/r1", "std", Some("r1b")),
            ("p1", 1, "eu/b1/r1", "std", Some("r1b")),
            ("r2low", 1, "eu/b1/r2", "std", Some("r2a")),
            ("b2low", 1, "eu/b2", "std", Some("b2a")),
        ],
        fail: &["r1a", "r1b"],
        expect: &[("p100", Some("r2a"))],
        steps: &[("p100", 2)],
        user_stickiness: None,
    };
    run(&case);
    // Free room: r2a 1, b2a 1, usa 4, for the 4 VMs of the lost zone: all of them run somewhere.
    let live = with_configuration(&cib(&case), &plan(&policy(&case), &cib(&case)).unwrap().configuration);
    let failed: Vec<String> = case.fail.iter().map(|s| s.to_string()).collect();
    let copy = with_free_capacity(&fail_hosts(&live, &failed).unwrap()).unwrap();
    let (p, _) = schedule(&live, &copy, &failed);
    assert!(p.without_place().is_empty(), "{:#?}", p.vms);
}

/// The lab scenario `zone_lost_whole_fails_over_nearest_first` as a table: zone s1/a loses its only host
/// with two VMs on it. The nearest zone (s1/b, same site) has room for one: the priority-100 VM takes it;
/// the priority-50 VM goes to the other site, where the priority-1 VM keeps running beside it (room for
/// both there: nothing is displaced).
#[test]
fn a_zone_lost_whole_sends_the_highest_priority_nearest_and_displaces_nothing_while_room_exists() {
    run(&Case {
        name: "zone lost, lab shape",
        hosts: &[
            ("n1", "s1/a", "std", 2),
            ("n2", "s1/b", "std", 1),
            ("n3", "s2", "std", 2),
        ],
        vms: &[
            ("hi", 100, "s1/a", "std", Some("n1")),
            ("mid", 50, "s1/a", "std", Some("n1")),
            ("lo", 1, "s2", "std", Some("n3")),
        ],
        fail: &["n1"],
        expect: &[("hi", Some("n2")), ("mid", Some("n3")), ("lo", Some("n3"))],
        steps: &[("hi", 2), ("mid", 2)],
        user_stickiness: None,
    });
}

/// `vmha site what-if`: site B holds site A's virtual cluster stopped by its booth ticket; the scheduler
/// run on B's CIB with the ticket granted says what a takeover would start where, and what it displaces.
#[test]
fn a_lost_sites_ticket_granted_here_starts_its_vms_and_says_what_gives_way() {
    let case = Case {
        name: "site takeover",
        hosts: &[("b1", "site-b", "std", 2), ("b2", "site-b", "std", 1)],
        vms: &[
            ("local", 1, "site-b", "std", Some("b1")),
            ("shop1", 100, "site-b", "std", None),
            ("shop2", 100, "site-b", "std", None),
            ("shop3", 100, "site-b", "std", None),
        ],
        fail: &[],
        expect: &[],
        steps: &[],
        user_stickiness: None,
    };
    let base = cib(&case);
    let planned = plan(&policy(&case), &base).unwrap();
    let tickets: String = ["shop1", "shop2", "shop3"]
        .iter()
        .map(|v| format!(r#"<rsc_ticket id="vmha-site-{v}" rsc="{v}" ticket="shop" loss-policy="stop"/>"#))
        .collect();
    let configuration = planned
        .configuration
        .replacen("</constraints>", &format!("{tickets}</constraints>"), 1);
    let configuration = if configuration.contains(&tickets) {
        configuration
    } else {
        configuration.replacen("<constraints/>", &format!("<constraints>{tickets}</constraints>"), 1)
    };
    let live = with_configuration(&base, &configuration);
    assert!(live.contains(&tickets));
    // Without the ticket the site's own VM runs and the protected ones are held stopped.
    let (now, _) = schedule(&live, &with_free_capacity(&live).unwrap(), &[]);
    let placement = now.placement();
    assert_eq!(
        placement.get("local").cloned().flatten().as_deref(),
        Some("b1"),
        "{:#?}",
        now.vms
    );
    for v in ["shop1", "shop2", "shop3"] {
        assert_eq!(
            placement.get(v).cloned().flatten(),
            None,
            "{v} without the ticket: {:#?}",
            now.vms
        );
    }
    // The ticket granted: the three priority-100 VMs need every slot of the site; the priority-1 VM gives
    // way, and the prediction says so.
    let granted = grant_tickets(&live, &["shop".to_string()]).unwrap();
    assert!(
        granted.contains(r#"<ticket_state id="shop" granted="true"/>"#),
        "{granted}"
    );
    let (p, scores) = schedule(&live, &with_free_capacity(&granted).unwrap(), &[]);
    let placement = p.placement();
    for v in ["shop1", "shop2", "shop3"] {
        assert!(
            placement.get(v).cloned().flatten().is_some(),
            "{v}: {:#?}\n{scores}",
            p.vms
        );
    }
    assert_eq!(placement.get("local").cloned().flatten(), None, "{:#?}", p.vms);
    assert_eq!(p.without_place(), vec!["local"], "{:#?}", p.vms);
}

/// The `<constraints>` section of a CIB, as written.
fn constraints(cib: &str) -> String {
    let start = cib.find("<constraints").unwrap();
    let end = cib.find("</constraints>").map(|e| e + "</constraints>".len()).unwrap();
    cib[start..end].to_string()
}

/// Applies `p` to `cib` as `vmha policy apply` / `rollback` do: compiled, stored and recorded as
/// version `n` in one replace of the configuration section.
fn apply_recorded(cib: &str, p: &Policy, n: u32, note: &str) -> String {
    use vmha_model::policy::history::{record, Version};
    let planned = plan(p, cib).unwrap();
    let v = Version {
        version: n,
        time: "2026-12-06T06:00:00Z".into(),
        who: "root@h1".into(),
        note: note.into(),
        policy: serde_json::to_value(p).unwrap(),
    };
    with_configuration(cib, &record(&planned.configuration, p, &v).unwrap())
}

#[test]
fn rollback_restores_exactly_the_constraints_of_the_version_and_the_scheduler_follows_them() {
    use vmha_model::policy::history::{find, policy_of, versions};
    let hosts: &[Host] = &[("h1", "a", "std", 2), ("h2", "a", "std", 2), ("h3", "b", "std", 2)];
    let case = Case {
        name: "rollback",
        hosts,
        vms: &[("v", 10, "a", "std", Some("h1")), ("w", 5, "b", "std", Some("h3"))],
        fail: &[],
        expect: &[],
        steps: &[],
        user_stickiness: None,
    };
    let base = cib(&case);
    let p1 = policy(&case);
    // Version 2 swaps the home zones and the priorities.
    let mut doc = serde_json::to_value(&p1).unwrap();
    doc["vms"]["v"]["zone"] = "b".into();
    doc["vms"]["v"]["priority"] = 1.into();
    doc["vms"]["w"]["zone"] = "a".into();
    let p2: Policy = serde_json::from_value(doc).unwrap();

    let cib1 = apply_recorded(&base, &p1, 1, "apply");
    let cib2 = apply_recorded(&cib1, &p2, 2, "apply");
    assert_ne!(
        constraints(&cib1),
        constraints(&cib2),
        "version 2 compiles to other constraints"
    );

    // Rollback: version 1 read back from the history, applied as version 3.
    let back = policy_of(&find(&cib2, 1).unwrap()).unwrap();
    assert_eq!(back, p1);
    let cib3 = apply_recorded(&cib2, &back, 3, "rollback to 1");
    assert_eq!(
        constraints(&cib3),
        constraints(&cib1),
        "exactly version 1's constraints"
    );
    assert_eq!(
        Policy::from_cib(&cib3).unwrap().unwrap(),
        p1,
        "version 1 is the stored policy again"
    );
    assert!(plan(&p1, &cib3).unwrap().is_empty(), "the CIB carries version 1");
    let kept = versions(&cib3).unwrap();
    assert_eq!(kept.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(kept[2].note, "rollback to 1");

    // Pacemaker's scheduler, h1 failed: under version 2 v (home b) goes to h3; after the rollback it
    // stays in its home zone a (h2), as under version 1.
    let failed = vec!["h1".to_string()];
    let placed = |live: &str| {
        let copy = with_free_capacity(&fail_hosts(live, &failed).unwrap()).unwrap();
        let (prediction, scores) = schedule(live, &copy, &failed);
        (prediction.placement(), scores)
    };
    let (under2, s2) = placed(&cib2);
    assert_eq!(under2.get("v").cloned().flatten().as_deref(), Some("h3"), "{s2}");
    let (under1, s1) = placed(&cib1);
    let (under3, s3) = placed(&cib3);
    assert_eq!(under1.get("v").cloned().flatten().as_deref(), Some("h2"), "{s1}");
    assert_eq!(under3, under1, "{s3}");
}

#[test]
fn preemption_a_growing_group_shrinks_a_lower_one_down_to_its_min_and_no_further() {
    use vmha_model::arbitration::{arbitrate, member_priorities, GroupState, Member};
    // web (priority 50, min 1) runs w1 and wants five more (w2..w6, added stopped); batch (priority 1,
    // min 2) runs b1..b5, b3 mid-transaction. 7 slots, 6 taken: one free.
    let members = |names: &[&str], busy: &[&str]| -> Vec<Member> {
        names
            .iter()
            .map(|n| Member {
                vm: n.to_string(),
                busy: busy.contains(n),
            })
            .collect()
    };
    let groups = [
        GroupState {
            name: "web".into(),
            priority: 50,
            min: 1,
            members: members(&["w1", "w2", "w3", "w4", "w5", "w6"], &[]),
        },
        GroupState {
            name: "batch".into(),
            priority: 1,
            min: 2,
            members: members(&["b1", "b2", "b3", "b4", "b5"], &["b3"]),
        },
    ];
    // The model: one free slot, then b5, b4, b2 (b3 busy), leaving b1 and b3: the min, no further.
    let before = [GroupState {
        members: members(&["w1"], &[]),
        ..groups[0].clone()
    }];
    let a = arbitrate(&[before[0].clone(), groups[1].clone()], "web", 5, 1).unwrap();
    let taken: Vec<&str> = a.preempt.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(taken, ["b5", "b4", "b2"]);
    assert_eq!((a.granted, a.short), (4, 1));

    // Pacemaker's scheduler with the compiled member priorities decides the same.
    let run_with = |prio: &BTreeMap<String, i32>| {
        let running = ["w1", "b1", "b2", "b3", "b4", "b5"];
        let vms: Vec<Vm> = prio
            .iter()
            .map(|(vm, p)| {
                let vm: &'static str = Box::leak(vm.clone().into_boxed_str());
                let host = running
                    .contains(&vm)
                    .then(|| if vm.starts_with('w') || vm == "b1" { "h1" } else { "h2" });
                (vm, *p, "a", "std", host)
            })
            .collect();
        let case = Case {
            name: "preemption",
            hosts: &[("h1", "a", "std", 4), ("h2", "a", "std", 3)],
            vms: Box::leak(vms.into_boxed_slice()),
            fail: &[],
            expect: &[],
            steps: &[],
            user_stickiness: None,
        };
        let base = cib(&case);
        let live = with_configuration(&base, &plan(&policy(&case), &base).unwrap().configuration);
        let copy = with_free_capacity(&live).unwrap();
        let (prediction, scores) = schedule(&live, &copy, &[]);
        let running: Vec<String> = prediction
            .placement()
            .into_iter()
            .filter_map(|(vm, host)| host.map(|_| vm))
            .collect();
        (running, scores)
    };
    let (runs, scores) = run_with(&member_priorities(&groups).unwrap());
    let batch: Vec<&str> = runs.iter().map(String::as_str).filter(|v| v.starts_with('b')).collect();
    assert_eq!(batch, ["b1", "b3"], "batch down to its min, b3 (busy) kept\n{scores}");
    let web = runs.iter().filter(|v| v.starts_with('w')).count();
    assert_eq!(web, 5, "w1 and four new members (one short): {runs:?}\n{scores}");

    // Control: with the groups' priorities alone (no entitlement), web's growth pushes batch below its
    // min.
    let plain: BTreeMap<String, i32> = groups
        .iter()
        .flat_map(|g| g.members.iter().map(move |m| (m.vm.clone(), g.priority)))
        .collect();
    let (runs, scores) = run_with(&plain);
    let batch = runs.iter().filter(|v| v.starts_with('b')).count();
    assert!(
        batch < 2,
        "without the entitlement batch falls below its min: {runs:?}\n{scores}"
    );
}

/// As [`schedule`], with Pacemaker's clock set to `datetime` (ISO 8601): the VMs that run afterwards.
fn running_at(live: &str, datetime: &str) -> (Vec<String>, String) {
    let (graph, text) = simulate(live, Some(datetime));
    let p = predict(live, live, &graph, &[], None).unwrap();
    let running = p
        .placement()
        .into_iter()
        .filter_map(|(vm, host)| host.map(|_| vm))
        .collect();
    (running, text)
}

#[test]
fn time_bounds_batch_max_8_from_20_to_6_at_two_times_of_day() {
    use vmha_model::arbitration::{time_bound_meta, TimeBound};
    let names: Vec<String> = (1..=10).map(|i| format!("b{i:02}")).collect();
    let vms: Vec<Vm> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let n: &'static str = Box::leak(n.clone().into_boxed_str());
            (n, 1, "a", "std", Some(if i % 2 == 0 { "h1" } else { "h2" }))
        })
        .collect();
    let case = Case {
        name: "time bounds",
        hosts: &[("h1", "a", "std", 8), ("h2", "a", "std", 8)],
        vms: Box::leak(vms.into_boxed_slice()),
        fail: &[],
        expect: &[],
        steps: &[],
        user_stickiness: None,
    };
    let base = cib(&case);
    let mut live = with_configuration(&base, &plan(&policy(&case), &base).unwrap().configuration);
    let bound = TimeBound {
        group: "batch".into(),
        max: 8,
        from_hour: 20,
        to_hour: 6,
    };
    for (vm, meta) in time_bound_meta(&bound, &names).unwrap() {
        let at = live.find(&format!(r#"<primitive id="{vm}" "#)).unwrap();
        let end = at + live[at..].find("</primitive>").unwrap();
        live.insert_str(end, &meta);
    }
    let all: Vec<String> = names.clone();
    // 12:00: outside the window, all ten run.
    let (noon, text) = running_at(&live, "2026-12-06T12:00:00Z");
    assert_eq!(noon, all, "{text}");
    // 22:00 and 03:00: inside the window (both sides of midnight), the newest two stop.
    for t in ["2026-12-06T22:00:00Z", "2026-12-07T03:00:00Z"] {
        let (night, text) = running_at(&live, t);
        assert_eq!(night, all[..8].to_vec(), "{t}\n{text}");
    }
    // 06:00: the window is over.
    let (morning, text) = running_at(&live, "2026-12-07T06:00:00Z");
    assert_eq!(morning, all, "{text}");
}

/// The `time_bounds` and `priority` of the policy document, compiled by `vmha policy apply` (not put
/// in by hand as above): at 12:00 every batch member runs, at 22:00 the newest beyond the bound stop;
/// a higher-priority group's new members displace batch's excess members, never its entitled ones; a
/// rollback to the version without them drops every compiled element, and all run again at 22:00.
#[test]
fn apply_compiles_group_priorities_and_time_bounds_and_a_rollback_removes_them() {
    use vmha_model::policy::history::{find, policy_of};
    // h1 and h2 hold 3 slots each: web w1 (running), w2, w3 (new, stopped); batch b1..b4 running.
    let vms: &[Vm] = &[
        ("w1", 0, "a", "std", Some("h1")),
        ("w2", 0, "a", "std", None),
        ("w3", 0, "a", "std", None),
        ("b1", 0, "a", "std", Some("h1")),
        ("b2", 0, "a", "std", Some("h1")),
        ("b3", 0, "a", "std", Some("h2")),
        ("b4", 0, "a", "std", Some("h2")),
    ];
    let case = Case {
        name: "compiled arbitration",
        hosts: &[("h1", "a", "std", 3), ("h2", "a", "std", 3)],
        vms,
        fail: &[],
        expect: &[],
        steps: &[],
        user_stickiness: None,
    };
    let base = cib(&case);
    let mut doc = serde_json::to_value(policy(&case)).unwrap();
    // No VM sets its own priority: the groups' priorities give the members theirs.
    for vm in doc["vms"].as_object_mut().unwrap().values_mut() {
        vm.as_object_mut().unwrap().remove("priority");
    }
    let p0: Policy = serde_json::from_value(doc.clone()).unwrap();
    doc["groups"] = serde_json::json!({
        "web": {"members": ["w1", "w2", "w3"], "template": "w1", "min": 1, "max": 4, "priority": 50},
        "batch": {"members": ["b1", "b2", "b3", "b4"], "template": "b1", "min": 2, "max": 8, "priority": 1,
                  "time_bounds": [{"max": 3, "from": "20:00", "to": "06:00"}]}
    });
    let p1: Policy = serde_json::from_value(doc).unwrap();
    let cib0 = apply_recorded(&base, &p0, 1, "apply");
    let cib1 = apply_recorded(&cib0, &p1, 2, "apply");
    let runs = |live: &str, t: &str| -> (Vec<String>, String) {
        let (mut r, text) = running_at(live, t);
        r.sort();
        (r, text)
    };
    // Without the groups' priorities: nothing is displaced for w2, w3 (one free slot: one of them).
    let (noon0, text) = runs(&cib0, "2026-12-06T12:00:00Z");
    assert_eq!(
        noon0.iter().filter(|v| v.starts_with('b')).count(),
        4,
        "{noon0:?}\n{text}"
    );
    assert_eq!(
        noon0.iter().filter(|v| v.starts_with('w')).count(),
        2,
        "{noon0:?}\n{text}"
    );
    // With them, at noon: web takes the free slot and one of batch's two excess members (b3, b4);
    // batch keeps its min of 2 (b1, b2) plus one.
    let (noon, text) = runs(&cib1, "2026-12-06T12:00:00Z");
    let web: Vec<&str> = noon.iter().map(String::as_str).filter(|v| v.starts_with('w')).collect();
    let batch: Vec<&str> = noon.iter().map(String::as_str).filter(|v| v.starts_with('b')).collect();
    assert_eq!(web, ["w1", "w2", "w3"], "{text}");
    assert_eq!(batch.len(), 3, "{noon:?}\n{text}");
    assert!(
        batch.contains(&"b1") && batch.contains(&"b2"),
        "the entitled stay: {batch:?}\n{text}"
    );
    // At 22:00 the bound (max 3) stops b4 whatever else happens.
    let (night, text) = runs(&cib1, "2026-12-06T22:00:00Z");
    assert!(!night.contains(&"b4".to_string()), "{night:?}\n{text}");
    assert!(
        night.contains(&"b1".to_string()) && night.contains(&"b2".to_string()),
        "{night:?}\n{text}"
    );
    // Rollback to version 1: none of the compiled elements stay.
    let back = policy_of(&find(&cib1, 1).unwrap()).unwrap();
    let cib2 = apply_recorded(&cib1, &back, 3, "rollback to 1");
    let conf = |c: &str| {
        let s = c.find("<configuration>").unwrap();
        c[s..c.find("</configuration>").unwrap()].to_string()
    };
    assert!(conf(&cib1).contains("vmha-policy-bound-b4-20-6"));
    assert!(!conf(&cib2).contains("vmha-policy-bound-"), "{}", conf(&cib2));
    assert!(!conf(&cib2).contains("vmha-policy-meta-b1-priority"));
    let (night, text) = runs(&cib2, "2026-12-06T22:00:00Z");
    assert_eq!(
        night.iter().filter(|v| v.starts_with('b')).count(),
        4,
        "{night:?}\n{text}"
    );
}
