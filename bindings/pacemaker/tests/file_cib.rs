//! The CIB calls against Pacemaker's file-backed CIB (the same libcib code paths as a live CIB, no daemon):
//! query by section and XPath, create, modify, replace, delete, errors, and persistence on drop.

use std::path::PathBuf;
use std::time::Duration;

use vmha_pacemaker::{Access, CallOptions, Cib, Error, Scope};

const LIMIT: Duration = Duration::from_secs(10);

/// `cibadmin --empty` of Pacemaker 2.1.5 (a CIB with a newer feature set is refused: EPROTONOSUPPORT).
const EMPTY_CIB: &str = r#"<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0"><configuration><crm_config/><nodes/><resources/><constraints/></configuration><status/></cib>"#;

fn cib_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmha-pacemaker-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cib.xml");
    std::fs::write(&path, EMPTY_CIB).unwrap();
    path
}

fn version(xml: &str) -> (u64, u64) {
    let doc = roxmltree_lite(xml);
    (doc.0, doc.1)
}

/// epoch and num_updates of a `<cib>` element (a tiny attribute reader keeps the test free of extra crates).
fn roxmltree_lite(xml: &str) -> (u64, u64) {
    let attr = |name: &str| -> u64 {
        let key = format!(" {name}=\"");
        let start = xml.find(&key).unwrap() + key.len();
        xml[start..].split('"').next().unwrap().parse().unwrap()
    };
    (attr("epoch"), attr("num_updates"))
}

/// libcib keeps a file-backed CIB in one process-wide buffer, so the file cases run in sequence.
#[tokio::test]
async fn file_cib() {
    reads_and_changes_a_file_cib_in_single_operations().await;
    a_file_cib_offers_no_notifications_and_bad_paths_fail_cleanly().await;
}

async fn reads_and_changes_a_file_cib_in_single_operations() {
    let path = cib_file("ops");
    let cib = Cib::open_file(&path, Access::ReadWrite, LIMIT).await.unwrap();

    let props = r#"<cluster_property_set id="vmha-options"><nvpair id="vmha-options-x" name="x" value="1"/></cluster_property_set>"#;
    cib.create(&Scope::section("crm_config"), props, CallOptions::NONE, LIMIT)
        .await
        .unwrap();
    let again = cib
        .create(&Scope::section("crm_config"), props, CallOptions::NONE, LIMIT)
        .await;
    assert!(
        matches!(again, Err(Error::Legacy { call: "cib create", .. })),
        "{again:?}"
    );

    let nv = r#"<nvpair id="vmha-options-x" name="x" value="2"/>"#;
    cib.modify(&Scope::section("crm_config"), nv, CallOptions::NONE, LIMIT)
        .await
        .unwrap();
    let by_xpath = cib
        .query(
            &Scope::xpath("//nvpair[@id='vmha-options-x']"),
            CallOptions::NONE,
            LIMIT,
        )
        .await
        .unwrap();
    assert!(by_xpath.contains(r#"value="2""#), "{by_xpath}");

    let primitive = r#"<primitive id="d1" class="ocf" provider="pacemaker" type="Dummy"/>"#;
    cib.create(&Scope::section("resources"), primitive, CallOptions::NONE, LIMIT)
        .await
        .unwrap();
    let resources = cib
        .query(&Scope::section("resources"), CallOptions::NONE, LIMIT)
        .await
        .unwrap();
    assert!(
        resources.starts_with("<resources") && resources.contains(r#"id="d1""#),
        "{resources}"
    );

    let location = r#"<rsc_location id="l1" rsc="d1" node="node1" score="100"/>"#;
    let constraints = format!("<constraints>{location}</constraints>");
    cib.replace(&Scope::section("constraints"), &constraints, CallOptions::NONE, LIMIT)
        .await
        .unwrap();
    let all = cib.query_all(LIMIT).await.unwrap();
    assert!(all.starts_with("<cib") && all.contains(r#"id="l1""#), "{all}");
    let (epoch, _) = version(&all);
    assert!(epoch > 1, "configuration changes bump the epoch: {all}");

    cib.delete(&Scope::section("constraints"), location, CallOptions::NONE, LIMIT)
        .await
        .unwrap();
    let constraints = cib
        .query(&Scope::section("constraints"), CallOptions::NONE, LIMIT)
        .await
        .unwrap();
    assert!(!constraints.contains("l1"), "{constraints}");

    let missing = cib
        .query(&Scope::xpath("//primitive[@id='nope']"), CallOptions::NONE, LIMIT)
        .await;
    assert!(
        matches!(missing, Err(Error::Legacy { code, .. }) if code == -libc_enxio()),
        "{missing:?}"
    );
    let malformed = cib
        .modify(&Scope::section("crm_config"), "<nvpair", CallOptions::NONE, LIMIT)
        .await;
    assert!(matches!(malformed, Err(Error::Invalid { .. })), "{malformed:?}");

    drop(cib);
    // The drop waits for the signoff on the CIB thread, which writes the file back: once it returns, the
    // file holds the changes (a tool that exits right after its last change loses nothing).
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(written.contains(r#"id="d1""#), "{written}");
    let reopened = Cib::open_file(&path, Access::ReadOnly, LIMIT).await.unwrap();
    assert!(reopened.query_all(LIMIT).await.unwrap().contains(r#"value="2""#));
}

fn libc_enxio() -> i32 {
    6
}

async fn a_file_cib_offers_no_notifications_and_bad_paths_fail_cleanly() {
    let path = cib_file("notify");
    let cib = Cib::open_file(&path, Access::ReadOnly, LIMIT).await.unwrap();
    let sub = cib.subscribe(LIMIT).await;
    assert!(
        matches!(
            sub,
            Err(Error::Legacy {
                call: "cib add_notify_callback",
                ..
            })
        ),
        "{sub:?}"
    );

    drop(cib);
    let nowhere = Cib::open_file(&path.with_file_name("missing.xml"), Access::ReadOnly, LIMIT).await;
    assert!(
        matches!(nowhere, Err(Error::Legacy { call: "cib signon", .. })),
        "{nowhere:?}"
    );
}
