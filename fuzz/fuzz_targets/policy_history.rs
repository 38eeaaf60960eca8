//! The policy history kept in the CIB (`vmha policy history | diff | rollback`, and every apply, which
//! rewrites it): whatever the `vmha-history` set holds (anyone with CIB write access can put anything
//! there), reading it (`history::entries`, `find`, `policy_of`) must not panic, and recording a new version
//! (`history::record`) must give a well-formed configuration in which the new version reads back, the
//! stored policy is the recorded one, at most `KEEP` entries remain, and every entry the input held that
//! is kept is kept byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmha_model::policy::history::{self, entries, find, next_version, policy_of, record, unified_diff, Version, KEEP};
use vmha_model::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let configuration = format!(
        r#"<configuration><crm_config><cluster_property_set id="{}">{text}</cluster_property_set></crm_config><nodes/><resources/><constraints/></configuration>"#,
        history::SET_ID
    );
    if roxmltree::Document::parse(&configuration).is_err() {
        return;
    }
    let cib = format!("<cib>{configuration}<status/></cib>");
    let all = entries(&cib).expect("a well-formed CIB reads");
    let mut readable = Vec::new();
    for e in &all {
        if let Some(n) = e.number {
            let _ = find(&cib, n).map(|v| policy_of(&v).map(|_| ()));
        }
        if let Ok(v) = &e.read {
            readable.push(v.clone());
        }
    }
    if let [a, .., b] = readable.as_slice() {
        let _ = unified_diff(&a.policy, &b.policy, "a", "b");
    }
    let p = Policy::default();
    let v = Version {
        version: next_version(&all),
        time: "2026-12-06T06:00:00Z".into(),
        who: "root@h1".into(),
        note: text.chars().take(64).collect(),
        policy: serde_json::to_value(&p).expect("a policy is JSON"),
    };
    let Ok(out) = record(&configuration, &p, &v) else {
        return;
    };
    let back = format!("<cib>{out}<status/></cib>");
    roxmltree::Document::parse(&back).unwrap_or_else(|e| panic!("the recorded configuration is not XML: {e}\n{out}"));
    assert_eq!(find(&back, v.version).expect("the new version reads back"), v);
    assert_eq!(Policy::from_cib(&back).expect("the stored policy reads"), Some(p));
    assert!(entries(&back).expect("it reads").len() <= KEEP);
});
