//! What-if's fast path gives the old path's answers: on generated clusters (running and stopped VMs of
//! several priorities, online and offline hosts, some full), every single host failure predicted per call
//! as before (`fail_hosts`, `with_free_capacity`, `predict`, the copy handed to the scheduler as it is)
//! equals the prediction of `whatif::Events` with the scheduler run on `scheduler_input` (the copy with
//! migration-threshold 0 by default, the resources with a fail count keeping theirs). Pacemaker's own scheduler (`crm_simulate`, no
//! daemons, no root) decides both; its schema validation checks the edited input too.
//!
//! Needs `crm_simulate` (pacemaker-cli-utils, installed by ci/install-deps).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use vmha_model::failover::with_free_capacity;
use vmha_model::whatif::{fail_hosts, predict, scheduler_input, Events, VmOutcome, KEEP_THRESHOLD_ID, NO_FAILURES_ID};
use vmha_model::ClusterView;

/// How a generated cluster looks.
struct Shape {
    online: usize,
    offline: usize,
    vms: usize,
    /// VMs 0..running run (spread over the online hosts); the others are stopped, half of them wanted.
    running: usize,
    /// Host capacity in VM-sized slots of hv_memory.
    slots: usize,
    /// Extra XML in `<configuration>` (e.g. resource defaults).
    extra_config: &'static str,
    /// A fail count of VM 0 on host 1 (transient attribute), so that the threshold matters.
    fail_count: Option<u32>,
}

fn op(vm: &str, host: &str, call: usize) -> String {
    format!(
        r#"<lrm_resource id="{vm}" type="VirtualMachine" class="ocf" provider="vmha"><lrm_rsc_op id="{vm}_last_0" operation_key="{vm}_start_0" operation="start" crm-debug-origin="test" crm_feature_set="3.16.2" transition-key="1:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" transition-magic="0:0;1:1:0:aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" call-id="{call}" rc-code="0" op-status="0" interval="0" exec-time="1" queue-time="0" on_node="{host}"/></lrm_resource>"#
    )
}

fn cib(s: &Shape) -> String {
    let mut nodes = String::new();
    let mut states = String::new();
    for i in 1..=s.online {
        let h = format!("h{i}");
        let _ = write!(
            nodes,
            r#"<node id="{i}" uname="{h}"><utilization id="n{i}-u"><nvpair id="n{i}-uc" name="cpu" value="{}"/><nvpair id="n{i}-um" name="hv_memory" value="{}"/></utilization></node>"#,
            s.slots,
            s.slots * 128
        );
        let ops: String = (0..s.running)
            .filter(|v| v % s.online == i - 1)
            .map(|v| op(&format!("vm{v:03}"), &h, 10 + v))
            .collect();
        let fail = match s.fail_count {
            Some(n) if i == 1 => format!(
                r#"<nvpair id="status-1-fail-count-vm000.monitor_10000" name="fail-count-vm000#monitor_10000" value="{n}"/><nvpair id="status-1-last-failure-vm000.monitor_10000" name="last-failure-vm000#monitor_10000" value="1765000000"/>"#
            ),
            _ => String::new(),
        };
        let _ = write!(
            states,
            r#"<node_state id="{i}" uname="{h}" in_ccm="true" crmd="online" join="member" expected="member"><transient_attributes id="{i}"><instance_attributes id="status-{i}">{fail}</instance_attributes></transient_attributes><lrm id="{i}"><lrm_resources>{ops}</lrm_resources></lrm></node_state>"#
        );
    }
    for j in 0..s.offline {
        let id = 101 + j;
        let _ = write!(nodes, r#"<node id="{id}" uname="off{j}"/>"#);
        let _ = write!(
            states,
            r#"<node_state id="{id}" uname="off{j}" in_ccm="false" crmd="offline" join="down" expected="down"/>"#
        );
    }
    let mut resources = String::new();
    for v in 0..s.vms {
        let name = format!("vm{v:03}");
        let start = v < s.running || v % 2 == 0;
        let mut p = vmha_model::change::vm_primitive(&vmha_model::change::NewVm {
            name: &name,
            config: &format!("/shared/{name}.xml"),
            hypervisor: "qemu:///system",
            migration_transport: "tcp",
            cpu: 1,
            memory_mib: 128,
            start,
        })
        .unwrap();
        // Priorities 0..4, so that higher ones displace lower ones when room runs out.
        let priority = format!(
            r#"<nvpair id="{name}-meta_attributes-priority" name="priority" value="{}"/></meta_attributes>"#,
            v % 5
        );
        p = p.replacen("</meta_attributes>", &priority, 1);
        resources.push_str(&p);
    }
    format!(
        r#"<cib admin_epoch="0" epoch="1" num_updates="0" validate-with="pacemaker-3.7" crm_feature_set="3.16.2" have-quorum="1" dc-uuid="1"><configuration><crm_config><cluster_property_set id="cib-bootstrap-options"><nvpair id="o1" name="stonith-enabled" value="false"/><nvpair id="o2" name="placement-strategy" value="balanced"/></cluster_property_set></crm_config><nodes>{nodes}</nodes><resources>{resources}</resources><constraints/>{}</configuration><status>{states}</status></cib>"#,
        s.extra_config
    )
}

fn scratch() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmha-whatif-events-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Pacemaker's scheduler (`crm_simulate`) on `cib`: its transition graph.
fn simulate(cib: &str) -> String {
    let dir = scratch();
    let cib_file = dir.join("cib.xml");
    let graph_file = dir.join("graph.xml");
    std::fs::write(&cib_file, cib).unwrap();
    let out = Command::new("crm_simulate")
        .arg("-x")
        .arg(&cib_file)
        .arg("-R")
        .arg("-G")
        .arg(&graph_file)
        .env_remove("CIB_file")
        .env_remove("CIB_shadow")
        .output()
        .expect("crm_simulate (pacemaker-cli-utils) must be installed for the what-if tests");
    assert!(
        out.status.success(),
        "crm_simulate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let graph = std::fs::read_to_string(&graph_file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    graph
}

/// Every single online host failure, old path and new path: the predictions must be equal. Returns how
/// many VMs moved or stopped over all events (so a case can insist that something happened) and, per
/// event in host order, whether the scheduler input was changed.
fn compare(shape: &Shape) -> (usize, Vec<bool>) {
    let live = cib(shape);
    let events = Events::new(&live).unwrap();
    let hosts: Vec<String> = ClusterView::from_cib(&live)
        .unwrap()
        .online_hosts()
        .iter()
        .map(|h| h.to_string())
        .collect();
    assert_eq!(hosts.len(), shape.online);
    let mut happened = 0;
    let mut changed = Vec::new();
    for h in &hosts {
        let failed = vec![h.clone()];
        let old_copy = with_free_capacity(&fail_hosts(&live, &failed).unwrap()).unwrap();
        let old = predict(&live, &old_copy, &simulate(&old_copy), &failed, None).unwrap();

        let copy = events.copy(&failed, None).unwrap();
        assert_eq!(copy, old_copy, "the copy for {h} differs");
        let input = scheduler_input(&copy).unwrap();
        changed.push(input.contains(NO_FAILURES_ID));
        let new = events.predict(&copy, &simulate(&input), &failed, None).unwrap();
        assert_eq!(new, old, "failing {h}: the predictions differ");
        happened += new
            .vms
            .iter()
            .filter(|v| matches!(v.outcome, VmOutcome::Moves { .. } | VmOutcome::Stops { .. }))
            .count();
    }
    (happened, changed)
}

#[test]
fn roomy_cluster_same_answers_with_threshold_checks_skipped() {
    let (moved, changed) = compare(&Shape {
        online: 4,
        offline: 5,
        vms: 40,
        running: 16,
        slots: 12,
        extra_config: "",
        fail_count: None,
    });
    assert_eq!(
        changed,
        vec![true; 4],
        "no fail count anywhere: the scheduler input carries migration-threshold=0"
    );
    assert!(moved >= 16, "every running VM of a failed host moves or stops: {moved}");
}

#[test]
fn full_cluster_same_answers_with_stops_and_displacement() {
    // 3 x 5 slots for 14 running VMs: a failure leaves room for 10; priorities decide who stops.
    let (moved, changed) = compare(&Shape {
        online: 3,
        offline: 2,
        vms: 24,
        running: 14,
        slots: 5,
        extra_config: "",
        fail_count: None,
    });
    assert_eq!(changed, vec![true; 3]);
    assert!(moved >= 14, "{moved}");
}

#[test]
fn existing_resource_defaults_are_kept_and_extended() {
    for extra in [
        "<rsc_defaults/>",
        r#"<rsc_defaults><meta_attributes id="user-defaults"><nvpair id="user-stickiness" name="resource-stickiness" value="100"/><nvpair id="user-threshold" name="migration-threshold" value="3"/></meta_attributes></rsc_defaults>"#,
    ] {
        let (moved, changed) = compare(&Shape {
            online: 3,
            offline: 1,
            vms: 18,
            running: 9,
            slots: 6,
            extra_config: extra,
            fail_count: None,
        });
        assert_eq!(changed, vec![true; 3], "{extra}");
        assert!(moved >= 9, "{extra}: {moved}");
    }
}

#[test]
fn a_fail_count_with_a_threshold_set_leaves_the_input_as_it_is() {
    // vm000 failed once on h1 with migration-threshold 1 (user default): the threshold bans it from h1.
    let shape = Shape {
        online: 3,
        offline: 1,
        vms: 12,
        running: 6,
        slots: 6,
        extra_config: r#"<rsc_defaults><meta_attributes id="user-defaults"><nvpair id="user-threshold" name="migration-threshold" value="1"/></meta_attributes></rsc_defaults>"#,
        fail_count: Some(1),
    };
    let (_, changed) = compare(&shape);
    // Failing h1 drops its transient attributes, the fail count with them; otherwise it is there and the
    // scheduler must check thresholds.
    assert_eq!(changed, vec![true, false, false]);
    let live = cib(&shape);
    let copy = with_free_capacity(&live).unwrap();
    assert!(matches!(scheduler_input(&copy).unwrap(), std::borrow::Cow::Borrowed(_)));
    // And the threshold does matter here: vm000 leaves h1 although nothing failed.
    let p = predict(&live, &copy, &simulate(&copy), &[], None).unwrap();
    let vm0 = p.vms.iter().find(|v| v.vm == "vm000").unwrap();
    assert!(
        matches!(&vm0.outcome, VmOutcome::Moves { from, .. } if from == "h1"),
        "{:?}",
        vm0.outcome
    );
}

/// A fail count with no threshold set anywhere: the failing resource keeps Pacemaker's default threshold (INFINITY),
/// every other resource gets 0. A start failure's fail count is INFINITY, which reaches that default: the
/// scheduler moves the VM off the host, on both paths.
#[test]
fn a_fail_count_keeps_its_resources_default_threshold() {
    let shape = Shape {
        online: 3,
        offline: 1,
        vms: 12,
        running: 6,
        slots: 6,
        extra_config: "",
        fail_count: Some(1_000_000),
    };
    let (_, changed) = compare(&shape);
    assert_eq!(changed, vec![true; 3], "every event's input is the faster one");
    let live = cib(&shape);
    let copy = with_free_capacity(&live).unwrap();
    let input = scheduler_input(&copy).unwrap();
    let keep = format!(
        r#"<meta_attributes id="{KEEP_THRESHOLD_ID}vm000"><nvpair id="{KEEP_THRESHOLD_ID}vm000-migration-threshold" name="migration-threshold" value="INFINITY"/></meta_attributes>"#
    );
    assert_eq!(
        input.matches(KEEP_THRESHOLD_ID).count(),
        2,
        "vm000 alone keeps its threshold"
    );
    assert!(
        input.contains(&format!("{keep}</primitive>")),
        "inside vm000's primitive"
    );
    let old = predict(&live, &copy, &simulate(&copy), &[], None).unwrap();
    let new = predict(&live, &copy, &simulate(&input), &[], None).unwrap();
    assert_eq!(new, old);
    let vm0 = |p: &vmha_model::whatif::Prediction| p.vms.iter().find(|v| v.vm == "vm000").unwrap().outcome.clone();
    assert!(
        matches!(&vm0(&new), VmOutcome::Moves { from, .. } if from == "h1"),
        "{:?}",
        vm0(&new)
    );
    // Without the kept threshold the answer would be wrong: vm000 would stay on h1.
    let naive = input.replace(&keep, "");
    let wrong = predict(&live, &copy, &simulate(&naive), &[], None).unwrap();
    assert!(
        matches!(&vm0(&wrong), VmOutcome::Stays { host } if host == "h1"),
        "{:?}",
        vm0(&wrong)
    );
}

#[test]
fn scheduler_input_refuses_unexpected_shapes() {
    // A set of that id already there, or two resource defaults sections: left alone.
    let twice = format!(
        r#"<cib><configuration><rsc_defaults><meta_attributes id="{NO_FAILURES_ID}"/></rsc_defaults></configuration><status/></cib>"#
    );
    assert_eq!(scheduler_input(&twice).unwrap(), twice);
    let two = "<cib><configuration><rsc_defaults/><rsc_defaults/></configuration><status/></cib>";
    assert_eq!(scheduler_input(two).unwrap(), two);
    let none = "<cib><status/></cib>";
    assert_eq!(scheduler_input(none).unwrap(), none);
    assert!(scheduler_input("<cib>").is_err());
    // Added where it belongs, once.
    let plain = "<cib><configuration><nodes/></configuration><status/></cib>";
    let out = scheduler_input(plain).unwrap();
    assert_eq!(out.matches(NO_FAILURES_ID).count(), 2);
    assert!(out.starts_with("<cib><configuration><nodes/><rsc_defaults><meta_attributes"));
    assert!(out.ends_with("</rsc_defaults></configuration><status/></cib>"));

    // Fail counts: of a clone instance, found as its primitive (self-closing here); of a resource that is no
    // primitive of the configuration, or with a threshold set anywhere, or fail-count text in the
    // configuration: left alone.
    let status = |name: &str| {
        format!(
            r#"<status><node_state id="1" uname="h1"><transient_attributes id="1"><instance_attributes id="s-1"><nvpair id="s-1-f" name="fail-count-{name}#monitor_10000" value="1"/></instance_attributes></transient_attributes></node_state></status>"#
        )
    };
    let clone = format!(
        r#"<cib><configuration><resources><clone id="c"><primitive id="p" class="ocf" provider="heartbeat" type="Dummy"/></clone></resources></configuration>{}</cib>"#,
        status("p:1")
    );
    let out = scheduler_input(&clone).unwrap();
    assert!(
        out.contains(&format!(
            r#"type="Dummy"><meta_attributes id="{KEEP_THRESHOLD_ID}p"><nvpair id="{KEEP_THRESHOLD_ID}p-migration-threshold" name="migration-threshold" value="INFINITY"/></meta_attributes></primitive></clone>"#
        )),
        "{out}"
    );
    assert_eq!(out.matches(NO_FAILURES_ID).count(), 2, "{out}");
    assert!(roxmltree::Document::parse(&out).is_ok());
    let ghost = clone.replace("fail-count-p:1", "fail-count-ghost");
    assert_eq!(scheduler_input(&ghost).unwrap(), ghost);
    let threshold = clone.replace(
        r#"<clone id="c">"#,
        r#"<clone id="c"><meta_attributes id="c-m"><nvpair id="c-m-t" name="migration-threshold" value="2"/></meta_attributes>"#,
    );
    assert_eq!(scheduler_input(&threshold).unwrap(), threshold);
    let quoted = clone
        .replace(r#"primitive id="p""#, r#"primitive id="p&quot;q""#)
        .replace("fail-count-p:1", "fail-count-p&quot;q");
    assert_eq!(scheduler_input(&quoted).unwrap(), quoted);
    let rule = clone.replace("<resources>", r#"<resources><!-- fail-count-p -->"#);
    assert_eq!(scheduler_input(&rule).unwrap(), rule);
}
