//! The placement policy document (`vmha policy set FILE`; stored in the CIB, read back by every vmhad):
//! parsing (`Policy::from_json`), validation and compilation against a CIB (`policy::plan`, as in model's
//! policy tests), the stored form (`store_xml` / `Policy::from_cib`) and the elastic-group logic that reads
//! the same document (`group::elastic`, `autoscale_size`, `scale_plan`, `choose_host`), and the arbitration
//! between groups it carries (priorities, entitlements, time bounds: `member_priorities`,
//! `time_bound_sets`, `arbitrate`).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use vmha_model::arbitration::arbitrate;
use vmha_model::group::{
    arbitration_groups, autoscale_size, candidate_hosts, choose_host, elastic, member_priorities, scale_plan,
    time_bound_sets, with_member, without_member,
};
use vmha_model::policy::{plan, store_xml, Policy};
use vmha_model::ClusterView;

/// The CIB of model's policy tests.
const CIB: &str = include_str!("../../model/src/testdata/policy-cib.xml");

/// The CIB with `configuration` in place of its configuration section.
fn with_configuration(configuration: &str) -> String {
    let start = CIB.find("<configuration>").expect("the CIB has a configuration");
    let end = CIB.find("</configuration>").expect("the CIB has a configuration") + "</configuration>".len();
    format!("{}{}{}", &CIB[..start], configuration, &CIB[end..])
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::from_json(text) else {
        return;
    };
    // Stored in the CIB and read back, as every vmhad reads it.
    let stored = format!(
        "<cib><configuration><crm_config>{}</crm_config></configuration></cib>",
        store_xml(&policy)
    );
    let back = Policy::from_cib(&stored)
        .unwrap_or_else(|e| panic!("the stored policy does not read back: {e}\n{stored}"))
        .expect("the stored policy is found");
    let _ = back.to_json();

    if let Ok(p) = plan(&policy, CIB) {
        // The compiled configuration is well-formed, and applying it then planning again changes nothing.
        let applied = with_configuration(&p.configuration);
        roxmltree::Document::parse(&applied)
            .unwrap_or_else(|e| panic!("the compiled configuration is not XML: {e}\n{}", p.configuration));
        let _ = p.diff_text();
        let again = plan(&policy, &applied).unwrap_or_else(|e| panic!("re-planning an applied policy fails: {e}"));
        assert!(again.is_empty(), "re-applying changes:\n{}", again.diff_text());
    }

    // Arbitration: compiled the same whatever the document says (errors, never panics), and a growth
    // never takes more than it asks, never a template, never below a group's min.
    let _ = member_priorities(&policy);
    let _ = time_bound_sets(&policy);
    let groups = arbitration_groups(&policy, &|vm| vm.len() % 3 == 0);
    for g in &groups {
        for (want, free) in [(1, 0), (3, 1), (u32::MAX, 0)] {
            if let Ok(a) = arbitrate(&groups, &g.name, want, free) {
                assert!(a.granted <= want && a.granted + a.short == want, "{a:?}");
                for (victim, vm) in &a.preempt {
                    let v = groups.iter().find(|o| &o.name == victim).expect("a known group");
                    assert!(v.priority < g.priority, "{a:?}");
                    let m = v.members.iter().find(|m| &m.vm == vm).expect("a member");
                    assert!(!m.busy, "took a busy member or template: {a:?}");
                    let left = v.members.len() - a.preempt.iter().filter(|(o, _)| o == victim).count();
                    assert!(left as u32 >= v.min.min(v.members.len() as u32), "{a:?}");
                }
            }
        }
    }

    let view = ClusterView::from_cib(CIB).expect("the fixed CIB reads");
    let candidates = candidate_hosts(&view);
    for name in policy.groups.keys() {
        let Ok(g) = elastic(&policy, name) else {
            continue;
        };
        if let Some(rule) = &g.autoscale {
            for load in [0.0, 50.0, 100.0, f64::NAN] {
                let _ = autoscale_size(&g, rule, load);
            }
        }
        for size in [0, g.min, g.max, g.members.len() as u32 + 1, u32::MAX] {
            let _ = scale_plan(&g, size, |n| n == "vm1");
        }
        let running: BTreeMap<String, String> = g.members.iter().map(|m| (m.clone(), "n1".to_string())).collect();
        let _ = choose_host(&policy, name, &candidates, &running);
        let grown = with_member(&policy, name, "vm9");
        let _ = without_member(&grown, name, &g.template);
    }
});
