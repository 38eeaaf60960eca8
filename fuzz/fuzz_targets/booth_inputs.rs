//! What `vmha site` reads from booth and the CIB (issue 20): booth.conf (anyone who can edit it), the
//! output of `booth list` (what the other sites and the arbitrator sent) and a site's CIB (ticket states,
//! rsc_ticket constraints, the booth site group). The input is split at the first two NUL bytes into those
//! three texts. Nothing may panic, and whatever comes out must be safe to act on: every ticket name read
//! from booth.conf or `booth list` passes `validate_ticket` (so it never reaches booth's command line as an
//! option), `validate_site` only accepts a site booth.conf lists, an authfile is an absolute path without
//! control characters, errors print no control characters, and the key check never shows the key (the
//! third text read as a key file). Each line of the third text is also read as a replication setting
//! (`vmha-replicate-VC`, CIB text): accepted ones read back the same and name only plain absolute paths.
//! The whole input is also read as a replication round's commit record (a file on the peer's shared
//! storage, `vmha_model::round_record`): an accepted one names only absolute, normal paths, and completing
//! it in a directory could only rename a partial copy in that directory over an image it names there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmha_model::replica::{is_partial_of, partial_name, ReplicationSetting};
use vmha_model::round_record::RoundRecord;
use vmha_model::site::{authkey_problem, parse_booth_list, validate_site, validate_ticket, BoothConf, SiteView};

fn no_controls(text: &str) {
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "an error prints a control character: {text:?}"
    );
}

fn round_record(text: &str) {
    match RoundRecord::parse(std::path::Path::new("/peer/.vmha-round-0.json"), text) {
        Ok(r) => {
            for dir in r.directories() {
                for image in r.images_in(&dir) {
                    let image_path = std::path::Path::new(image);
                    assert!(image_path.is_absolute(), "{image:?}");
                    assert_eq!(image_path.parent(), Some(dir.as_path()));
                    let partial = partial_name(image, &r.round);
                    let partial_path = std::path::Path::new(&partial);
                    assert_eq!(
                        partial_path.parent(),
                        Some(dir.as_path()),
                        "{partial:?} outside {dir:?}"
                    );
                    let name = partial_path.file_name().and_then(|n| n.to_str()).expect("a file name");
                    assert!(
                        is_partial_of(name, image),
                        "{partial:?} is no partial copy of {image:?}"
                    );
                }
            }
            assert_eq!(
                r.directories().iter().map(|d| r.images_in(d).count()).sum::<usize>(),
                r.images.len(),
                "an image outside every directory"
            );
        }
        Err(e) => no_controls(&e.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    round_record(&text);
    let mut parts = text.splitn(3, '\0');
    let conf_text = parts.next().unwrap_or("");
    let list_text = parts.next().unwrap_or("");
    let cib_text = parts.next().unwrap_or("");

    match BoothConf::parse(conf_text) {
        Ok(conf) => {
            for t in &conf.tickets {
                validate_ticket(&t.name).expect("a ticket read from booth.conf is a valid name");
                assert_eq!(conf.ticket(&t.name), Some(t), "ticket names are unique");
            }
            // Any line of the other texts as a site name given by the operator.
            for candidate in list_text.lines().chain(cib_text.lines()).take(16) {
                match validate_site(candidate, &conf) {
                    Ok(addr) => assert!(conf.sites.contains(&addr), "{candidate:?} is no site"),
                    Err(e) => no_controls(&e.to_string()),
                }
            }
            let mut members: Vec<_> = conf.sites.iter().chain(&conf.arbitrators).collect();
            members.sort();
            members.dedup();
            assert_eq!(
                members.len(),
                conf.sites.len() + conf.arbitrators.len(),
                "a member listed twice"
            );
            if let Some(path) = &conf.authfile {
                assert!(path.starts_with('/') && !path.chars().any(char::is_control), "{path:?}");
            }
            if let [a, b] = conf.sites.as_slice() {
                assert_eq!(conf.other_site(*a), Some(*b));
                assert_eq!(conf.other_site(*b), Some(*a));
            }
        }
        Err(e) => no_controls(&e.to_string()),
    }

    for t in parse_booth_list(list_text) {
        validate_ticket(&t.name).expect("a ticket read from booth list is a valid name");
        if let Some(e) = &t.expires {
            assert!(!e.is_empty() && e != "INF");
        }
    }

    let key = cib_text.as_bytes();
    let mode = data.first().map_or(0o600, |&b| u32::from(b) << 3);
    let problem = authkey_problem(mode, key);
    if let Some(p) = &problem {
        no_controls(p);
    }
    // The answer depends on the key's length only, never on its bytes (so it cannot show them).
    let blanked: Vec<u8> = key
        .iter()
        .map(|&b| if b.is_ascii_whitespace() { b } else { b'k' })
        .collect();
    assert_eq!(
        problem,
        authkey_problem(mode, &blanked),
        "the answer depends on the key's bytes"
    );

    if let Ok(view) = SiteView::from_cib(cib_text) {
        for t in &view.tickets {
            let _ = view.granted_here(&t.name);
        }
        for b in &view.bindings {
            assert!(view.binding_of(&b.rsc).is_some());
        }
    }
    for line in cib_text.lines() {
        match ReplicationSetting::parse("vc", line) {
            Ok(setting) => {
                assert_eq!(ReplicationSetting::parse("vc", &setting.value()).as_ref(), Ok(&setting));
                for (here, peer) in &setting.storage {
                    for p in [here, peer] {
                        assert!(p.starts_with('/') && !p.split('/').any(|c| c == ".."), "{p:?}");
                        assert!(!p.chars().any(char::is_control), "{p:?}");
                    }
                }
            }
            Err(e) => no_controls(&e.to_string()),
        }
    }
});
