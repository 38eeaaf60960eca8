//! vmhad's journal entries carry its structured fields: the test stands in for journald (a datagram
//! socket at /run/systemd/journal/socket, in a mount namespace of its own test thread so the host's journal
//! is untouched), logs through vmhad's journal subscriber and reads the native-protocol datagram.
//! Needs root (to make the mount namespace); skipped with a message otherwise.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use vmha_agent::logging::{self, LogTarget};

/// Parses one journal native-protocol payload: `KEY=value\n`, or `KEY\n` + 64-bit LE length + bytes + `\n`.
fn parse_native(mut payload: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut fields = Vec::new();
    while !payload.is_empty() {
        let end = payload.iter().position(|&b| b == b'\n').expect("field without newline");
        let line = &payload[..end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                line[eq + 1..].to_vec(),
            ));
            payload = &payload[end + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &payload[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.push((name, rest[8..8 + len].to_vec()));
            assert_eq!(rest[8 + len], b'\n');
            payload = &rest[8 + len + 1..];
        }
    }
    fields
}

#[test]
fn journal_entries_carry_vm_host_and_job_fields() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root for a mount namespace");
        return;
    }
    // This thread only (unshare(CLONE_NEWNS) unshares the thread's filesystem context): a private /run.
    unshare(CloneFlags::CLONE_NEWNS).unwrap();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    mount(Some("tmpfs"), "/run", Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
    std::fs::create_dir_all("/run/systemd/journal").unwrap();
    let journald = UnixDatagram::bind("/run/systemd/journal/socket").unwrap();
    journald.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let (subscriber, chosen) =
        logging::subscriber(LogTarget::Journal, "node7", tracing_subscriber::EnvFilter::new("info"));
    assert_eq!(chosen.target, LogTarget::Journal, "{chosen:?}");
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("vm_failure", vmha_vm = "vm1");
        let _in = span.enter();
        tracing::warn!(
            vmha_job = 12,
            vmha_job_kind = "migrate",
            "VM failed (QEMU exited\nunexpectedly)"
        );
    });

    // The layer's probe (an empty datagram) comes first.
    let mut buf = vec![0u8; 64 * 1024];
    let payload = loop {
        let n = journald.recv(&mut buf).unwrap();
        if n > 0 {
            break buf[..n].to_vec();
        }
    };
    let fields = parse_native(&payload);
    let by_name: HashMap<&str, &[u8]> = fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let text = |k: &str| by_name.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(text("VMHA_VM").as_deref(), Some("vm1"), "{fields:?}");
    assert_eq!(text("VMHA_HOST").as_deref(), Some("node7"), "{fields:?}");
    assert_eq!(text("VMHA_JOB").as_deref(), Some("12"), "{fields:?}");
    assert_eq!(text("VMHA_JOB_KIND").as_deref(), Some("migrate"), "{fields:?}");
    assert_eq!(text("SYSLOG_IDENTIFIER").as_deref(), Some("vmhad"), "{fields:?}");
    assert_eq!(text("PRIORITY").as_deref(), Some("4"), "warn is priority 4: {fields:?}");
    assert_eq!(
        text("MESSAGE").as_deref(),
        Some("VM failed (QEMU exited\nunexpectedly)"),
        "a multi-line message travels length-encoded, intact: {fields:?}"
    );
    assert_eq!(fields.iter().filter(|(k, _)| k == "VMHA_HOST").count(), 1, "{fields:?}");
}
