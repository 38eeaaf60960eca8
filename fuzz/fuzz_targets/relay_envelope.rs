//! Bytes from the relay's CPG group (untrusted: any process Corosync admits to the group can send them):
//! the envelope parser and gate of `agent/src/envelope.rs` (compiled here from its source file, which
//! is pure). Raw input must give an envelope or a refusal, never a panic; input sealed with the key must be
//! admitted once, its replay refused, and any single byte changed in it refused.
#![no_main]

#[allow(dead_code)]
#[path = "../../agent/src/envelope.rs"]
mod envelope;

use envelope::{open, CpgSender, Gate, Key, Sealer, MAX_BODY};
use libfuzzer_sys::fuzz_target;

const NOW_MS: u64 = 1_796_000_000_000;

fuzz_target!(|data: &[u8]| {
    let key = Key::from_file_bytes(&[7u8; 32]).expect("a 32-byte key");
    // Raw bytes, as an intruder without the key sends them.
    if let Ok(e) = open(&key, data) {
        panic!("an envelope nobody sealed was opened: {e:?}");
    }
    let sender = CpgSender { nodeid: 2, pid: 4242 };
    let mut gate = Gate::default();
    let _ = gate.admit(&key, data, sender, Some("node2"), NOW_MS);

    // The same bytes as a body sealed by a genuine vmhad: admitted once, then refused as a replay.
    if data.len() > MAX_BODY || data.is_empty() {
        return;
    }
    let sealer = Sealer::new(2, 4242, "node2", [9u8; 16]);
    let sealed = sealer
        .seal(&key, data.to_vec(), NOW_MS)
        .expect("a body within bounds seals");
    let e = gate
        .admit(&key, &sealed, sender, Some("node2"), NOW_MS)
        .unwrap_or_else(|r| panic!("a genuine envelope was refused: {r}"));
    assert_eq!(e.body, data);
    assert!(
        gate.admit(&key, &sealed, sender, Some("node2"), NOW_MS).is_err(),
        "replay admitted"
    );
    // Another process on the same node, or another node, sending the genuine bytes: refused.
    let fresh = sealer.seal(&key, data.to_vec(), NOW_MS).expect("seals");
    assert!(gate
        .admit(&key, &fresh, CpgSender { nodeid: 2, pid: 4243 }, Some("node2"), NOW_MS)
        .is_err());
    assert!(gate
        .admit(&key, &fresh, CpgSender { nodeid: 3, pid: 4242 }, Some("node3"), NOW_MS)
        .is_err());
    // One byte changed anywhere (chosen by the input): refused.
    let mut bent = fresh.clone();
    let at = usize::from(data[0]) * 131 % bent.len();
    bent[at] ^= 0x01 | data[data.len() - 1];
    assert!(open(&key, &bent).is_err(), "a changed byte at {at} was not noticed");
});
