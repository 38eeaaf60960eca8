//! The relay's authenticated envelope (pure: no I/O, no clock, no globals; unit-tested below).
//!
//! Every message a vmhad multicasts in the relay's CPG group is wrapped in an envelope whose MAC (BLAKE3
//! keyed hash, with a key derived from the cluster's `/etc/vmha/authkey`) covers every field:
//!
//! ```text
//! "VMHR" | version u8 | node id u32 | pid u32 | session [16] | sequence u64 | time ms u64 |
//! host length u16 | host | body length u32 | body | MAC [32]          (integers big-endian)
//! ```
//!
//! A receiver ([`Gate::admit`]) refuses, before reading the body: input too short, too long or whose lengths
//! do not add up; an unknown magic or version; a MAC that does not verify (constant-time comparison); a node
//! id or PID other than the CPG sender's (Corosync vouches for those, not the sender); a host name other than
//! the sender node's; a timestamp outside [`WINDOW_MS`] of the receiver's clock; a sequence number not above
//! the highest already seen for that (node, session) (a replay, or a copy resent by another process).
//! [`Pending`] then accepts an answer only for an id the receiver waits for, and only from the host the
//! request went to. [`DropLog`] rate-limits the log lines of refusals so that a flood cannot fill the log.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Envelope magic.
const MAGIC: &[u8; 4] = b"VMHR";
/// Envelope version.
pub const VERSION: u8 = 1;
/// Length of a session id.
pub const SESSION_LEN: usize = 16;
/// Length of the MAC.
const MAC_LEN: usize = 32;
/// Everything before the host name: magic, version, node id, pid, session, sequence, time, host length.
const HEAD_LEN: usize = 4 + 1 + 4 + 4 + SESSION_LEN + 8 + 8 + 2;
/// Longest host name accepted (a DNS name is at most 253 bytes).
pub const MAX_HOST: usize = 255;
/// Largest body sealed or accepted (a guest request's data, a clone spec: far below).
pub const MAX_BODY: usize = 256 * 1024;
/// Largest envelope accepted.
pub const MAX_ENVELOPE: usize = HEAD_LEN + MAX_HOST + 4 + MAX_BODY + MAC_LEN;
/// How far an envelope's timestamp may be from the receiver's clock, either way.
pub const WINDOW_MS: u64 = 120_000;
/// Shortest authkey file accepted.
pub const MIN_KEY_FILE: usize = 32;
/// Longest authkey file accepted.
pub const MAX_KEY_FILE: usize = 4096;

const MAC_CONTEXT: &str = "vmha 2026-12 vmhad relay message authentication";
const FINGERPRINT_CONTEXT: &str = "vmha 2026-12 authkey fingerprint";

/// Why an envelope or an answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("truncated: {len} bytes, the envelope needs {need}")]
    Truncated { len: usize, need: usize },
    #[error("oversized: {len} bytes, at most {max}")]
    Oversized { len: usize, max: usize },
    #[error("not a relay envelope (bad magic)")]
    BadMagic,
    #[error("envelope version {0}, this vmhad speaks {VERSION}")]
    BadVersion(u8),
    #[error("its lengths do not add up to its {len} bytes")]
    BadLength { len: usize },
    #[error("its host name is not UTF-8")]
    BadHost,
    #[error("bad MAC (forged, or sealed with another /etc/vmha/authkey)")]
    BadMac,
    #[error("it claims node id {claimed}, Corosync says node id {cpg} sent it (forged, or a copy resent)")]
    WrongNode { claimed: u32, cpg: u32 },
    #[error("it claims PID {claimed}, Corosync says PID {cpg} on node {nodeid} sent it (forged, or a copy resent)")]
    WrongPid { claimed: u32, cpg: u32, nodeid: u32 },
    #[error("it claims host {claimed:?}, node id {nodeid} is {expected:?}")]
    WrongHost {
        claimed: String,
        expected: String,
        nodeid: u32,
    },
    #[error("stale: its timestamp is {skew_ms} ms off this host's clock (at most {WINDOW_MS} ms)")]
    Stale { skew_ms: i128 },
    #[error("replay: sequence {seq} of node {nodeid}'s session, already at {last}")]
    Replay { nodeid: u32, seq: u64, last: u64 },
    #[error("answer for id {id}, which this vmhad is not waiting for")]
    UnknownId { id: u64 },
    #[error("answer for id {id} from {from:?}, but that request went to {expected:?}")]
    AnswerFromWrongHost { id: u64, from: String, expected: String },
}

impl Refusal {
    /// A short name of the kind of refusal (the key of [`DropLog`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Truncated { .. } => "truncated",
            Refusal::Oversized { .. } => "oversized",
            Refusal::BadMagic => "bad magic",
            Refusal::BadVersion(_) => "bad version",
            Refusal::BadLength { .. } => "bad length",
            Refusal::BadHost => "bad host",
            Refusal::BadMac => "bad MAC",
            Refusal::WrongNode { .. } => "wrong node",
            Refusal::WrongPid { .. } => "wrong pid",
            Refusal::WrongHost { .. } => "wrong host",
            Refusal::Stale { .. } => "stale",
            Refusal::Replay { .. } => "replay",
            Refusal::UnknownId { .. } => "unknown id",
            Refusal::AnswerFromWrongHost { .. } => "answer from wrong host",
        }
    }
}

/// Why an authkey file's content is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{len} bytes: an authkey has at least {MIN_KEY_FILE} (generate one with `vmha keygen`)")]
    TooShort { len: usize },
    #[error("{len} bytes: an authkey has at most {MAX_KEY_FILE}")]
    TooLong { len: usize },
}

/// The relay's MAC key, derived from the authkey file's bytes (never the bytes themselves).
#[derive(Clone)]
pub struct Key {
    mac: [u8; 32],
    fingerprint: String,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("fingerprint", &self.fingerprint).finish()
    }
}

impl Key {
    /// The key of an authkey file's content.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        if bytes.len() < MIN_KEY_FILE {
            return Err(KeyError::TooShort { len: bytes.len() });
        }
        if bytes.len() > MAX_KEY_FILE {
            return Err(KeyError::TooLong { len: bytes.len() });
        }
        Ok(Key {
            mac: blake3::derive_key(MAC_CONTEXT, bytes),
            fingerprint: fingerprint(bytes),
        })
    }

    /// The key's fingerprint (16 hex digits of a one-way derivation: safe to show and compare).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// The fingerprint of an authkey file's content: the first 16 hex digits of a BLAKE3 key derivation
/// (a context of its own, so it tells nothing of the MAC key).
pub fn fingerprint(bytes: &[u8]) -> String {
    let d = blake3::derive_key(FINGERPRINT_CONTEXT, bytes);
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// An envelope's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub nodeid: u32,
    pub pid: u32,
    pub host: String,
    pub session: [u8; SESSION_LEN],
    pub seq: u64,
    pub time_ms: u64,
    pub body: Vec<u8>,
}

/// Seals `envelope` with `key`. Refuses a body above [`MAX_BODY`] or a host name above [`MAX_HOST`].
pub fn seal(key: &Key, e: &Envelope) -> Result<Vec<u8>, Refusal> {
    if e.body.len() > MAX_BODY {
        return Err(Refusal::Oversized {
            len: e.body.len(),
            max: MAX_BODY,
        });
    }
    if e.host.len() > MAX_HOST {
        return Err(Refusal::BadHost);
    }
    let mut out = Vec::with_capacity(HEAD_LEN + e.host.len() + 4 + e.body.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&e.nodeid.to_be_bytes());
    out.extend_from_slice(&e.pid.to_be_bytes());
    out.extend_from_slice(&e.session);
    out.extend_from_slice(&e.seq.to_be_bytes());
    out.extend_from_slice(&e.time_ms.to_be_bytes());
    // Both lengths were bounded above.
    out.extend_from_slice(&u16::try_from(e.host.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(e.host.as_bytes());
    out.extend_from_slice(&u32::try_from(e.body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&e.body);
    let mac = blake3::keyed_hash(&key.mac, &out);
    out.extend_from_slice(mac.as_bytes());
    Ok(out)
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(Refusal::Truncated {
                len: self.bytes.len(),
                need: self.at.saturating_add(n),
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Refusal> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// Parses and verifies raw bytes from the relay group (the fuzzer's entry point: any input gives `Ok` or a
/// [`Refusal`], never a panic, and nothing is read past the input).
pub fn open(key: &Key, raw: &[u8]) -> Result<Envelope, Refusal> {
    if raw.len() > MAX_ENVELOPE {
        return Err(Refusal::Oversized {
            len: raw.len(),
            max: MAX_ENVELOPE,
        });
    }
    if raw.len() >= MAGIC.len() && &raw[..MAGIC.len()] != MAGIC {
        return Err(Refusal::BadMagic);
    }
    let need = HEAD_LEN + 4 + MAC_LEN;
    if raw.len() < need {
        return Err(Refusal::Truncated { len: raw.len(), need });
    }
    let mut r = Reader { bytes: raw, at: 0 };
    if r.take(4)? != MAGIC {
        return Err(Refusal::BadMagic);
    }
    let version = r.array::<1>()?[0];
    if version != VERSION {
        return Err(Refusal::BadVersion(version));
    }
    let nodeid = u32::from_be_bytes(r.array()?);
    let pid = u32::from_be_bytes(r.array()?);
    let session: [u8; SESSION_LEN] = r.array()?;
    let seq = u64::from_be_bytes(r.array()?);
    let time_ms = u64::from_be_bytes(r.array()?);
    let host_len = usize::from(u16::from_be_bytes(r.array()?));
    if host_len > MAX_HOST {
        return Err(Refusal::BadLength { len: raw.len() });
    }
    let host = r.take(host_len)?;
    let body_len = usize::try_from(u32::from_be_bytes(r.array()?)).unwrap_or(usize::MAX);
    if body_len > MAX_BODY {
        return Err(Refusal::Oversized {
            len: body_len,
            max: MAX_BODY,
        });
    }
    let body = r.take(body_len)?;
    let signed = r.at;
    let mac: [u8; MAC_LEN] = r.array()?;
    if r.at != raw.len() {
        return Err(Refusal::BadLength { len: raw.len() });
    }
    // blake3::Hash compares in constant time.
    if blake3::keyed_hash(&key.mac, &raw[..signed]) != blake3::Hash::from_bytes(mac) {
        return Err(Refusal::BadMac);
    }
    let host = std::str::from_utf8(host).map_err(|_| Refusal::BadHost)?.to_string();
    Ok(Envelope {
        nodeid,
        pid,
        host,
        session,
        seq,
        time_ms,
        body: body.to_vec(),
    })
}

/// Who Corosync says sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpgSender {
    pub nodeid: u32,
    pub pid: u32,
}

/// The receiving side: verifies envelopes and remembers, per (node, session), the highest sequence seen.
#[derive(Debug, Default)]
pub struct Gate {
    /// (node id, session) -> (highest sequence, its timestamp).
    seen: HashMap<(u32, [u8; SESSION_LEN]), (u64, u64)>,
}

/// Sessions remembered before the ones past the time window are forgotten (only MAC-verified envelopes add
/// one, so only holders of the key can grow the table).
const MAX_SESSIONS: usize = 1024;

impl Gate {
    /// Admits `raw` from `sender` if it is a genuine, fresh, first-seen envelope; `host_of_node` is the
    /// sender node's name from Corosync's nodelist (`None`: unknown, not checked); `now_ms` is the
    /// receiver's clock (ms since the Unix epoch).
    pub fn admit(
        &mut self,
        key: &Key,
        raw: &[u8],
        sender: CpgSender,
        host_of_node: Option<&str>,
        now_ms: u64,
    ) -> Result<Envelope, Refusal> {
        let e = open(key, raw)?;
        if e.nodeid != sender.nodeid {
            return Err(Refusal::WrongNode {
                claimed: e.nodeid,
                cpg: sender.nodeid,
            });
        }
        if e.pid != sender.pid {
            return Err(Refusal::WrongPid {
                claimed: e.pid,
                cpg: sender.pid,
                nodeid: sender.nodeid,
            });
        }
        if let Some(expected) = host_of_node {
            if e.host != expected {
                return Err(Refusal::WrongHost {
                    claimed: e.host,
                    expected: expected.to_string(),
                    nodeid: sender.nodeid,
                });
            }
        }
        let skew = i128::from(e.time_ms) - i128::from(now_ms);
        if skew.unsigned_abs() > u128::from(WINDOW_MS) {
            return Err(Refusal::Stale { skew_ms: skew });
        }
        let slot = (e.nodeid, e.session);
        if let Some(&(last, _)) = self.seen.get(&slot) {
            if e.seq <= last {
                return Err(Refusal::Replay {
                    nodeid: e.nodeid,
                    seq: e.seq,
                    last,
                });
            }
        }
        if self.seen.len() >= MAX_SESSIONS && !self.seen.contains_key(&slot) {
            // An envelope older than the window is refused as stale anyway: its session may go.
            self.seen.retain(|_, (_, t)| now_ms.saturating_sub(*t) <= 2 * WINDOW_MS);
        }
        self.seen.insert(slot, (e.seq, e.time_ms));
        Ok(e)
    }
}

/// The sending side: this process's node id, PID, host name, random session and next sequence number.
#[derive(Debug)]
pub struct Sealer {
    nodeid: u32,
    pid: u32,
    host: String,
    session: [u8; SESSION_LEN],
    seq: std::sync::atomic::AtomicU64,
}

impl Sealer {
    pub fn new(nodeid: u32, pid: u32, host: &str, session: [u8; SESSION_LEN]) -> Sealer {
        Sealer {
            nodeid,
            pid,
            host: host.to_string(),
            session,
            seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Seals `body` with the next sequence number and the time `now_ms`.
    pub fn seal(&self, key: &Key, body: Vec<u8>, now_ms: u64) -> Result<Vec<u8>, Refusal> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        seal(
            key,
            &Envelope {
                nodeid: self.nodeid,
                pid: self.pid,
                host: self.host.clone(),
                session: self.session,
                seq,
                time_ms: now_ms,
                body,
            },
        )
    }
}

/// What a vmhad waits for, by id, with the host each request went to.
#[derive(Debug)]
pub struct Pending<T> {
    map: HashMap<u64, (String, T)>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending { map: HashMap::new() }
    }
}

impl<T> Pending<T> {
    /// Waits for answers to `id` from `host`.
    pub fn insert(&mut self, id: u64, host: &str, value: T) {
        self.map.insert(id, (host.to_string(), value));
    }

    /// Stops waiting for `id`.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        self.map.remove(&id).map(|(_, v)| v)
    }

    /// The waiter of `id` if the answer comes `from` the host the request went to.
    pub fn get(&self, id: u64, from: &str) -> Result<&T, Refusal> {
        match self.map.get(&id) {
            None => Err(Refusal::UnknownId { id }),
            Some((host, _)) if host != from => Err(Refusal::AnswerFromWrongHost {
                id,
                from: from.to_string(),
                expected: host.clone(),
            }),
            Some((_, v)) => Ok(v),
        }
    }

    /// Takes the waiter of `id` if the answer comes `from` the host the request went to (a wrong host's
    /// answer leaves it waiting for the right one).
    pub fn take(&mut self, id: u64, from: &str) -> Result<T, Refusal> {
        self.get(id, from)?;
        self.remove(id).ok_or(Refusal::UnknownId { id })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Rate-limits the log lines of refusals: at most [`DropLog::BURST`] lines per kind of refusal per
/// [`DropLog::PERIOD`]; the next line allowed says how many were left out.
#[derive(Debug, Default)]
pub struct DropLog {
    kinds: HashMap<&'static str, (Instant, u32, u64)>,
}

impl DropLog {
    pub const BURST: u32 = 5;
    pub const PERIOD: Duration = Duration::from_secs(60);

    /// `Some(n)` when a refusal of `kind` at `now` may be logged (`n`: how many of this kind were left
    /// out since the last line); `None` when it is to be left out.
    pub fn allow(&mut self, kind: &'static str, now: Instant) -> Option<u64> {
        let (start, lines, left_out) = self.kinds.entry(kind).or_insert((now, 0, 0));
        if now.saturating_duration_since(*start) >= Self::PERIOD {
            *start = now;
            *lines = 0;
        }
        if *lines < Self::BURST {
            *lines += 1;
            Some(std::mem::take(left_out))
        } else {
            *left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn key(b: u8) -> Key {
        Key::from_file_bytes(&[b; 32]).unwrap()
    }

    fn envelope(seq: u64) -> Envelope {
        Envelope {
            nodeid: 2,
            pid: 4242,
            host: "node2".into(),
            session: [7; SESSION_LEN],
            seq,
            time_ms: NOW,
            body: br#"{"t":"request"}"#.to_vec(),
        }
    }

    const FROM: CpgSender = CpgSender { nodeid: 2, pid: 4242 };

    fn admit(gate: &mut Gate, raw: &[u8]) -> Result<Envelope, Refusal> {
        gate.admit(&key(1), raw, FROM, Some("node2"), NOW)
    }

    #[test]
    fn a_genuine_envelope_round_trips() {
        let raw = seal(&key(1), &envelope(1)).unwrap();
        assert_eq!(admit(&mut Gate::default(), &raw), Ok(envelope(1)));
    }

    #[test]
    fn a_forged_or_foreign_mac_is_refused() {
        let mut raw = seal(&key(1), &envelope(1)).unwrap();
        let other = seal(&key(2), &envelope(1)).unwrap();
        assert_eq!(admit(&mut Gate::default(), &other), Err(Refusal::BadMac));
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(admit(&mut Gate::default(), &raw), Err(Refusal::BadMac));
        // Any covered field changed: the body, the sequence, the host.
        for at in [HEAD_LEN + 2, 4 + 1 + 4 + 4 + SESSION_LEN + 7, raw.len() - MAC_LEN - 1] {
            let mut raw = seal(&key(1), &envelope(1)).unwrap();
            raw[at] ^= 0x20;
            assert_eq!(admit(&mut Gate::default(), &raw), Err(Refusal::BadMac), "byte {at}");
        }
    }

    #[test]
    fn the_sender_must_be_who_corosync_says() {
        let raw = seal(&key(1), &envelope(1)).unwrap();
        let mut gate = Gate::default();
        let other_node = CpgSender { nodeid: 3, pid: 4242 };
        assert_eq!(
            gate.admit(&key(1), &raw, other_node, Some("node3"), NOW),
            Err(Refusal::WrongNode { claimed: 2, cpg: 3 })
        );
        let other_pid = CpgSender { nodeid: 2, pid: 999 };
        assert_eq!(
            gate.admit(&key(1), &raw, other_pid, Some("node2"), NOW),
            Err(Refusal::WrongPid {
                claimed: 4242,
                cpg: 999,
                nodeid: 2
            })
        );
        assert_eq!(
            gate.admit(&key(1), &raw, FROM, Some("node9"), NOW).unwrap_err().kind(),
            "wrong host"
        );
        // None of these refusals used up the sequence number.
        assert!(admit(&mut gate, &raw).is_ok());
    }

    #[test]
    fn a_replay_is_refused() {
        let mut gate = Gate::default();
        let first = seal(&key(1), &envelope(5)).unwrap();
        assert!(admit(&mut gate, &first).is_ok());
        assert_eq!(
            admit(&mut gate, &first),
            Err(Refusal::Replay {
                nodeid: 2,
                seq: 5,
                last: 5
            })
        );
        let older = seal(&key(1), &envelope(4)).unwrap();
        assert_eq!(admit(&mut gate, &older).unwrap_err().kind(), "replay");
        assert!(admit(&mut gate, &seal(&key(1), &envelope(6)).unwrap()).is_ok());
        // Another session of the same node (a restarted vmhad) starts its own sequence.
        let mut restarted = envelope(1);
        restarted.session = [8; SESSION_LEN];
        assert!(admit(&mut gate, &seal(&key(1), &restarted).unwrap()).is_ok());
    }

    #[test]
    fn a_stale_or_future_timestamp_is_refused() {
        let mut gate = Gate::default();
        let mut old = envelope(1);
        old.time_ms = NOW - WINDOW_MS - 1;
        assert_eq!(
            admit(&mut gate, &seal(&key(1), &old).unwrap()),
            Err(Refusal::Stale {
                skew_ms: -(i128::from(WINDOW_MS) + 1)
            })
        );
        let mut future = envelope(2);
        future.time_ms = NOW + WINDOW_MS + 1;
        assert_eq!(
            admit(&mut gate, &seal(&key(1), &future).unwrap()).unwrap_err().kind(),
            "stale"
        );
        let mut edge = envelope(3);
        edge.time_ms = NOW - WINDOW_MS;
        assert!(admit(&mut gate, &seal(&key(1), &edge).unwrap()).is_ok());
    }

    #[test]
    fn truncated_oversized_and_garbage_input_is_refused() {
        let raw = seal(&key(1), &envelope(1)).unwrap();
        let mut gate = Gate::default();
        for len in [0, 1, 4, HEAD_LEN, raw.len() - MAC_LEN, raw.len() - 1] {
            let r = admit(&mut gate, &raw[..len]);
            assert!(
                matches!(r, Err(Refusal::Truncated { .. } | Refusal::BadLength { .. })),
                "{len}: {r:?}"
            );
        }
        let mut longer = raw.clone();
        longer.push(0);
        assert_eq!(
            admit(&mut gate, &longer),
            Err(Refusal::BadLength { len: raw.len() + 1 })
        );
        assert!(matches!(
            admit(&mut gate, &vec![0u8; MAX_ENVELOPE + 1]),
            Err(Refusal::Oversized { .. })
        ));
        let mut big = envelope(1);
        big.body = vec![b'x'; MAX_BODY + 1];
        assert!(matches!(seal(&key(1), &big), Err(Refusal::Oversized { .. })));
        // A body length field far beyond the input.
        let mut lying = raw.clone();
        let at = HEAD_LEN + "node2".len();
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(admit(&mut gate, &lying), Err(Refusal::Oversized { .. })));
        lying[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(admit(&mut gate, &lying), Err(Refusal::Truncated { .. })));
        let mut magic = raw.clone();
        magic[0] = b'{';
        assert_eq!(admit(&mut gate, &magic), Err(Refusal::BadMagic));
        let mut version = raw.clone();
        version[4] = 9;
        assert_eq!(admit(&mut gate, &version), Err(Refusal::BadVersion(9)));
        // A bare JSON message (what the relay sent before envelopes, or a forgery) is not an envelope.
        let json = br#"{"t":"clone-start","id":1,"host":"node1","spec":{"template":"vm1"}}"#;
        assert_eq!(admit(&mut gate, json), Err(Refusal::BadMagic));
        assert!(admit(&mut gate, &raw).is_ok());
    }

    #[test]
    fn answers_only_for_awaited_ids_from_the_asked_host() {
        let mut pending: Pending<&str> = Pending::default();
        pending.insert(7, "node2", "caller");
        assert_eq!(pending.take(8, "node2"), Err(Refusal::UnknownId { id: 8 }));
        assert_eq!(
            pending.take(7, "node3"),
            Err(Refusal::AnswerFromWrongHost {
                id: 7,
                from: "node3".into(),
                expected: "node2".into()
            })
        );
        assert_eq!(pending.get(7, "node2"), Ok(&"caller"));
        assert_eq!(pending.take(7, "node2"), Ok("caller"));
        assert_eq!(pending.take(7, "node2"), Err(Refusal::UnknownId { id: 7 }));
        assert!(pending.is_empty());
    }

    #[test]
    fn keys_need_enough_bytes_and_fingerprints_differ() {
        assert_eq!(
            Key::from_file_bytes(&[0; 31]).unwrap_err(),
            KeyError::TooShort { len: 31 }
        );
        assert!(Key::from_file_bytes(&[0; MAX_KEY_FILE + 1]).is_err());
        let (a, b) = (key(1), key(2));
        assert_eq!(a.fingerprint().len(), 16);
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), key(1).fingerprint());
        // The fingerprint is not a prefix of the MAC key or of the key file.
        assert!(!format!("{a:?}").contains("0101"));
        let mac_hex: String = a.mac.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!mac_hex.starts_with(a.fingerprint()));
    }

    #[test]
    fn sealer_numbers_its_envelopes() {
        let s = Sealer::new(2, 4242, "node2", [7; SESSION_LEN]);
        let mut gate = Gate::default();
        for n in 1..=3 {
            let e = admit(&mut gate, &s.seal(&key(1), b"{}".to_vec(), NOW).unwrap()).unwrap();
            assert_eq!(e.seq, n);
        }
    }

    #[test]
    fn refusal_logs_are_rate_limited() {
        let mut log = DropLog::default();
        let t0 = Instant::now();
        for _ in 0..DropLog::BURST {
            assert_eq!(log.allow("bad MAC", t0), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(log.allow("bad MAC", t0), None);
        }
        // Another kind has its own budget.
        assert_eq!(log.allow("replay", t0), Some(0));
        assert_eq!(log.allow("bad MAC", t0 + DropLog::PERIOD), Some(100));
        assert_eq!(log.allow("bad MAC", t0 + DropLog::PERIOD), Some(0));
    }
}
