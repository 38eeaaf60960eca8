//! The vmha guest channel protocol (version 1): JSON lines over a virtio-serial port named
//! [`PORT_NAME`]. The host sends events (no answer) and requests (answered by one result with the same
//! id); the guest sends a hello and results. Everything from a guest is untrusted: [`parse_guest_line`]
//! accepts only known fields, bounded lines and validated ids and names.
//!
//! Host to guest:
//! `{"v":1,"type":"event","name":"membership","data":{...}}`,
//! `{"v":1,"type":"request","id":"r1","name":"prepare-clone","deadline_ms":10000,"data":{...}}`.
//! Guest to host:
//! `{"v":1,"type":"hello","version":"0.1.0"}`,
//! `{"v":1,"type":"result","id":"r1","result":"refused","reason":"database busy"}`,
//! `{"v":1,"type":"heartbeat","seq":42}` (every second or so: the guest runs; see [`crate::health`];
//! `"stopping":true` on the last one of a vmha-guest being stopped),
//! `{"v":1,"type":"health","healthy":false,"reason":"hook 10-web exited with status 1"}` (the verdict of
//! the guest's application health hooks, sent when it changes and repeated with the heartbeats' pace).
//!
//! Live migration: before `ocf:vmha:VirtualMachine` live-migrates a VM (`migrate_to`, on the source) it
//! sends the request [`REQUEST_MIGRATE`] through the source's vmhad, with
//! `data = {"vm": ..., "source": <host>, "target": <host>}`, and waits for the result at most its
//! `guest_migrate_timeout`; whatever the answer (done, refused, failed, none), it then migrates: a guest
//! cannot veto an operator's or Pacemaker's move (a failed `migrate_to` would only make Pacemaker stop
//! and restart the VM instead). After the VM arrived, the target's vmhad sends the event
//! [`EVENT_MIGRATED`] with `data = {"vm": ..., "source": <host or null>, "target": <host>, "time": ...}`
//! when vmha-guest says hello on its new channel (what vmhad writes before the guest opened its port is lost).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Protocol version carried in every message as `"v"`.
pub const VERSION: u64 = 1;
/// Name of the virtio-serial port (the `<target name=...>` of the channel) inside the guest.
pub const PORT_NAME: &str = "org.vmha.guest.0";
/// Longest line either side accepts, in bytes, without the newline.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest reason or version string a guest may send, in bytes.
pub const MAX_TEXT: usize = 1024;
/// Longest request id.
pub const MAX_ID: usize = 64;
/// Longest event or request name.
pub const MAX_NAME: usize = 32;

/// Well-known events.
pub const EVENT_MEMBERSHIP: &str = "membership";
pub const EVENT_DC: &str = "dc";
/// The VM arrived on this host by live migration (sent by the target's vmhad).
pub const EVENT_MIGRATED: &str = "migrated";
/// Well-known requests.
pub const REQUEST_PREPARE_CLONE: &str = "prepare-clone";
pub const REQUEST_POST_CLONE: &str = "post-clone";
pub const REQUEST_RESUME: &str = "resume";
pub const REQUEST_DRAIN: &str = "drain";
/// The VM is about to be live-migrated (sent before the migration starts; answered or not, it migrates).
pub const REQUEST_MIGRATE: &str = "migrate";

/// The host side of a VM's channel: the UNIX socket QEMU listens on, one per VM and host, in libvirt's
/// QEMU state directory (local to every host, writable by the QEMU user). Not under its `channel/target/`
/// subdirectory: libvirt replaces paths there with its own per-domain-id ones.
pub fn channel_socket(vm: &str) -> String {
    format!("/var/lib/libvirt/qemu/vmha.{vm}.guest.0")
}

/// What the host sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum HostMessage {
    /// Something happened; hooks run, nothing is answered.
    Event { v: u64, name: String, data: Value },
    /// Asks the guest to act before `deadline_ms` and answer with a [`GuestMessage::Result`].
    Request {
        v: u64,
        id: String,
        name: String,
        deadline_ms: u64,
        data: Value,
    },
}

/// What a guest sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum GuestMessage {
    /// The guest side started (vmha-guest's version).
    Hello { v: u64, version: String },
    /// The answer to request `id`.
    Result {
        v: u64,
        id: String,
        result: Outcome,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// The guest runs (vmha-guest's heartbeat thread got CPU time): sent at a steady interval. `seq`
    /// counts up from 0 for each vmha-guest process. `stopping`: vmha-guest is being stopped (SIGTERM):
    /// no more heartbeats will come, and that is no hang.
    Heartbeat {
        v: u64,
        seq: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stopping: bool,
    },
    /// The verdict of the guest's application health hooks: unhealthy after their threshold of consecutive
    /// failures (`reason` says which hook and how), healthy again once they pass.
    Health {
        v: u64,
        healthy: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
}

/// The longest a guest may say its heartbeat interval is (ms); see [`GuestMessage::Heartbeat`].
pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 60_000;

/// A request's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every hook succeeded.
    Done,
    /// A hook declined, with a reason (e.g. the application cannot be cloned now).
    Refused,
    /// A hook failed or overran the deadline (or the guest did not answer in time).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("line of {0} bytes is longer than {MAX_LINE}")]
    TooLong(usize),
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("unsupported protocol version {0} (expected {VERSION})")]
    Version(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("{kind} message: unknown field {field:?}")]
    UnknownField { kind: &'static str, field: String },
    #[error("{kind} message: missing or invalid field {field:?}: {why}")]
    Field {
        kind: &'static str,
        field: &'static str,
        why: &'static str,
    },
}

impl HostMessage {
    pub fn event(name: &str, data: Value) -> Self {
        HostMessage::Event {
            v: VERSION,
            name: name.to_string(),
            data,
        }
    }

    pub fn request(id: &str, name: &str, deadline_ms: u64, data: Value) -> Self {
        HostMessage::Request {
            v: VERSION,
            id: id.to_string(),
            name: name.to_string(),
            deadline_ms,
            data,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            HostMessage::Event { name, .. } | HostMessage::Request { name, .. } => name,
        }
    }

    /// One line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl GuestMessage {
    pub fn hello(version: &str) -> Self {
        GuestMessage::Hello {
            v: VERSION,
            version: version.to_string(),
        }
    }

    pub fn result(id: &str, result: Outcome, reason: &str) -> Self {
        GuestMessage::Result {
            v: VERSION,
            id: id.to_string(),
            result,
            reason: truncate(reason, MAX_TEXT).to_string(),
        }
    }

    pub fn heartbeat(seq: u64) -> Self {
        GuestMessage::Heartbeat {
            v: VERSION,
            seq,
            stopping: false,
        }
    }

    /// The last heartbeat of a vmha-guest that is being stopped.
    pub fn stopping(seq: u64) -> Self {
        GuestMessage::Heartbeat {
            v: VERSION,
            seq,
            stopping: true,
        }
    }

    /// The application health verdict; `reason` is cut to [`MAX_TEXT`] bytes and its control characters
    /// become spaces (the host refuses them).
    pub fn health(healthy: bool, reason: &str) -> Self {
        let reason: String = truncate(reason, MAX_TEXT)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        GuestMessage::Health {
            v: VERSION,
            healthy,
            reason,
        }
    }

    /// One line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// True for an event or request name: `[a-z0-9-]{1,32}`.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// True for a request id: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses one line from a guest (without its newline), strictly.
pub fn parse_guest_line(line: &[u8]) -> Result<GuestMessage, ProtocolError> {
    let (kind, mut obj) = object(line)?;
    match kind.as_str() {
        "hello" => {
            let kind = "hello";
            only(kind, &obj, &["v", "type", "version"])?;
            let version = text(kind, &mut obj, "version", MAX_TEXT, true)?;
            if version.chars().any(char::is_control) {
                return Err(ProtocolError::Field {
                    kind,
                    field: "version",
                    why: "control characters",
                });
            }
            Ok(GuestMessage::hello(&version))
        }
        "result" => {
            let kind = "result";
            only(kind, &obj, &["v", "type", "id", "result", "reason"])?;
            let id = text(kind, &mut obj, "id", MAX_ID, true)?;
            if !valid_id(&id) {
                return Err(ProtocolError::Field {
                    kind,
                    field: "id",
                    why: "must match [A-Za-z0-9._-]{1,64}",
                });
            }
            let result = match text(kind, &mut obj, "result", 16, true)?.as_str() {
                "done" => Outcome::Done,
                "refused" => Outcome::Refused,
                "failed" => Outcome::Failed,
                _ => {
                    return Err(ProtocolError::Field {
                        kind,
                        field: "result",
                        why: "must be done, refused or failed",
                    })
                }
            };
            let reason = text(kind, &mut obj, "reason", MAX_TEXT, false)?;
            Ok(GuestMessage::result(&id, result, &reason))
        }
        "heartbeat" => {
            let kind = "heartbeat";
            only(kind, &obj, &["v", "type", "seq", "stopping"])?;
            let stopping = match obj.get("stopping") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ProtocolError::Field {
                        kind,
                        field: "stopping",
                        why: "must be true or false",
                    })
                }
            };
            let seq = match obj.get("seq") {
                Some(Value::Number(n)) => n.as_u64(),
                _ => None,
            }
            .ok_or(ProtocolError::Field {
                kind,
                field: "seq",
                why: "must be an integer from 0 to 2^64-1",
            })?;
            Ok(if stopping {
                GuestMessage::stopping(seq)
            } else {
                GuestMessage::heartbeat(seq)
            })
        }
        "health" => {
            let kind = "health";
            only(kind, &obj, &["v", "type", "healthy", "reason"])?;
            let Some(Value::Bool(healthy)) = obj.get("healthy") else {
                return Err(ProtocolError::Field {
                    kind,
                    field: "healthy",
                    why: "must be true or false",
                });
            };
            let healthy = *healthy;
            let reason = text(kind, &mut obj, "reason", MAX_TEXT, false)?;
            if reason.chars().any(char::is_control) {
                return Err(ProtocolError::Field {
                    kind,
                    field: "reason",
                    why: "control characters",
                });
            }
            Ok(GuestMessage::health(healthy, &reason))
        }
        other => Err(ProtocolError::UnknownType(truncate(other, 32).to_string())),
    }
}

/// Parses one line from the host (without its newline), strictly: what vmha-guest accepts.
pub fn parse_host_line(line: &[u8]) -> Result<HostMessage, ProtocolError> {
    let (kind, mut obj) = object(line)?;
    let (kind, fields): (&'static str, &[&str]) = match kind.as_str() {
        "event" => ("event", &["v", "type", "name", "data"]),
        "request" => ("request", &["v", "type", "id", "name", "deadline_ms", "data"]),
        other => return Err(ProtocolError::UnknownType(truncate(other, 32).to_string())),
    };
    only(kind, &obj, fields)?;
    let name = text(kind, &mut obj, "name", MAX_NAME, true)?;
    if !valid_name(&name) {
        return Err(ProtocolError::Field {
            kind,
            field: "name",
            why: "must match [a-z0-9-]{1,32}",
        });
    }
    let data = obj.remove("data").unwrap_or(Value::Object(Map::new()));
    if !data.is_object() {
        return Err(ProtocolError::Field {
            kind,
            field: "data",
            why: "must be an object",
        });
    }
    if kind == "event" {
        return Ok(HostMessage::event(&name, data));
    }
    let id = text(kind, &mut obj, "id", MAX_ID, true)?;
    if !valid_id(&id) {
        return Err(ProtocolError::Field {
            kind,
            field: "id",
            why: "must match [A-Za-z0-9._-]{1,64}",
        });
    }
    let deadline_ms = obj
        .get("deadline_ms")
        .and_then(Value::as_u64)
        .filter(|d| *d > 0)
        .ok_or(ProtocolError::Field {
            kind,
            field: "deadline_ms",
            why: "must be a positive integer",
        })?;
    Ok(HostMessage::request(&id, &name, deadline_ms, data))
}

/// Checks size, JSON object, version; returns the type and the object.
fn object(line: &[u8]) -> Result<(String, Map<String, Value>), ProtocolError> {
    if line.len() > MAX_LINE {
        return Err(ProtocolError::TooLong(line.len()));
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ProtocolError::NotJson("not an object".into()));
    };
    match obj.get("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(other) => return Err(ProtocolError::Version(truncate(&other.to_string(), 32).to_string())),
        None => return Err(ProtocolError::Version("(none)".into())),
    }
    let kind = match obj.get("type") {
        Some(Value::String(t)) => t.clone(),
        _ => return Err(ProtocolError::UnknownType("(none)".into())),
    };
    Ok((kind, obj))
}

fn only(kind: &'static str, obj: &Map<String, Value>, known: &[&str]) -> Result<(), ProtocolError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(field) => Err(ProtocolError::UnknownField {
            kind,
            field: truncate(field, 32).to_string(),
        }),
        None => Ok(()),
    }
}

fn text(
    kind: &'static str,
    obj: &mut Map<String, Value>,
    field: &'static str,
    max: usize,
    required: bool,
) -> Result<String, ProtocolError> {
    match obj.remove(field) {
        Some(Value::String(s)) if s.len() <= max => Ok(s),
        Some(Value::String(_)) => Err(ProtocolError::Field {
            kind,
            field,
            why: "too long",
        }),
        None if !required => Ok(String::new()),
        None => Err(ProtocolError::Field {
            kind,
            field,
            why: "missing",
        }),
        Some(_) => Err(ProtocolError::Field {
            kind,
            field,
            why: "must be a string",
        }),
    }
}

/// One line read from a channel, bounded in size.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    /// A line longer than the bound (skipped up to its newline); its length.
    TooLong(usize),
    Eof,
}

/// Collects one `\n`-terminated line of at most `max` bytes from the buffers a reader fills, never holding
/// more than `max` bytes: the bounding both ends of a channel use, whatever their I/O.
#[derive(Debug)]
pub struct BoundedLine {
    line: Vec<u8>,
    len: usize,
    max: usize,
}

impl BoundedLine {
    pub fn new(max: usize) -> Self {
        BoundedLine {
            line: Vec::new(),
            len: 0,
            max,
        }
    }

    /// Takes from a non-empty filled buffer what belongs to this line; returns the bytes to consume and the
    /// line once its newline was seen.
    pub fn feed(&mut self, buf: &[u8]) -> (usize, Option<Line>) {
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        self.len += chunk.len();
        if self.len <= self.max {
            self.line.extend_from_slice(chunk);
        }
        match done {
            Some(used) => (used, Some(self.finish())),
            None => (buf.len(), None),
        }
    }

    /// The reader reached end of file.
    pub fn end(&mut self) -> Line {
        if self.len == 0 {
            Line::Eof
        } else {
            self.finish()
        }
    }

    fn finish(&mut self) -> Line {
        let line = std::mem::take(&mut self.line);
        if self.len > self.max {
            Line::TooLong(self.len)
        } else {
            Line::Complete(line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_across_buffers() {
        let mut b = BoundedLine::new(10);
        assert_eq!(b.feed(b"o"), (1, None));
        assert_eq!(b.feed(b"k\nrest"), (2, Some(Line::Complete(b"ok".to_vec()))));
        let mut b = BoundedLine::new(10);
        assert_eq!(b.feed(&[b'x'; 8]), (8, None));
        assert_eq!(b.feed(&[b'x'; 8]), (8, None));
        assert_eq!(b.feed(b"x\n"), (2, Some(Line::TooLong(17))));
        let mut b = BoundedLine::new(10);
        assert_eq!(b.end(), Line::Eof);
        assert_eq!(b.feed(b"end"), (3, None));
        assert_eq!(b.end(), Line::Complete(b"end".to_vec()));
    }
    use serde_json::json;

    #[test]
    fn host_messages_are_versioned_json_lines_the_guest_parses_back() {
        let event = HostMessage::event(EVENT_MEMBERSHIP, json!({"members": ["n1", "n2"], "left": ["n3"]}));
        let line = event.to_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["type"], "event");
        assert_eq!(v["name"], "membership");
        assert_eq!(parse_host_line(line.as_bytes()).unwrap(), event);

        let request = HostMessage::request("r-1", REQUEST_PREPARE_CLONE, 5000, json!({}));
        let line = request.to_line();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["deadline_ms"].as_u64()),
            (Some("request"), Some(5000))
        );
        assert_eq!(parse_host_line(line.as_bytes()).unwrap(), request);
        assert_eq!(request.name(), "prepare-clone");
    }

    #[test]
    fn guest_results_and_hello_round_trip() {
        for msg in [
            GuestMessage::hello("0.1.0"),
            GuestMessage::result("r1", Outcome::Done, ""),
            GuestMessage::result("r2", Outcome::Refused, "database busy"),
            GuestMessage::result("r3", Outcome::Failed, "hook timed out"),
            GuestMessage::heartbeat(0),
            GuestMessage::heartbeat(u64::MAX),
            GuestMessage::stopping(7),
            GuestMessage::health(true, ""),
            GuestMessage::health(false, "hook 10-web exited with status 1"),
        ] {
            assert_eq!(parse_guest_line(msg.to_line().as_bytes()).unwrap(), msg);
        }
        let line = GuestMessage::result("r2", Outcome::Refused, "busy").to_line();
        assert_eq!(
            line,
            r#"{"type":"result","v":1,"id":"r2","result":"refused","reason":"busy"}"#
        );
    }

    /// Scenario table: untrusted guest input and the error it must give.
    #[test]
    fn guest_input_is_parsed_strictly() {
        let long = format!(r#"{{"v":1,"type":"hello","version":"{}"}}"#, "x".repeat(MAX_LINE));
        let cases: &[(&str, &str)] = &[
            ("", "not a JSON object"),
            ("garbage", "not a JSON object"),
            ("[1,2]", "not a JSON object"),
            (
                r#"{"type":"hello","version":"1"}"#,
                "unsupported protocol version (none)",
            ),
            (
                r#"{"v":2,"type":"hello","version":"1"}"#,
                "unsupported protocol version 2",
            ),
            (
                r#"{"v":"1","type":"hello","version":"1"}"#,
                "unsupported protocol version",
            ),
            (r#"{"v":1,"type":"event","name":"x"}"#, "unknown message type \"event\""),
            (r#"{"v":1,"version":"1"}"#, "unknown message type \"(none)\""),
            (
                r#"{"v":1,"type":"hello","version":"1","extra":1}"#,
                "unknown field \"extra\"",
            ),
            (r#"{"v":1,"type":"hello"}"#, "\"version\": missing"),
            (r#"{"v":1,"type":"hello","version":"a\u0007"}"#, "control characters"),
            (r#"{"v":1,"type":"result","id":"a b","result":"done"}"#, "\"id\""),
            (r#"{"v":1,"type":"result","id":"","result":"done"}"#, "\"id\""),
            (
                r#"{"v":1,"type":"result","id":"r1","result":"ok"}"#,
                "done, refused or failed",
            ),
            (
                r#"{"v":1,"type":"result","id":"r1","result":"done","reason":5}"#,
                "must be a string",
            ),
            (r#"{"v":1,"type":"result","result":"done"}"#, "\"id\": missing"),
            (r#"{"v":1,"type":"heartbeat"}"#, "\"seq\""),
            (r#"{"v":1,"type":"heartbeat","seq":-1}"#, "\"seq\""),
            (r#"{"v":1,"type":"heartbeat","seq":1.5}"#, "\"seq\""),
            (r#"{"v":1,"type":"heartbeat","seq":"1"}"#, "\"seq\""),
            (r#"{"v":1,"type":"heartbeat","seq":18446744073709551616}"#, "\"seq\""),
            (r#"{"v":1,"type":"heartbeat","seq":1,"at":2}"#, "unknown field \"at\""),
            (r#"{"v":1,"type":"heartbeat","seq":1,"stopping":1}"#, "\"stopping\""),
            (r#"{"v":1,"type":"health","reason":"x"}"#, "\"healthy\""),
            (r#"{"v":1,"type":"health","healthy":"false"}"#, "\"healthy\""),
            (r#"{"v":1,"type":"health","healthy":0}"#, "\"healthy\""),
            (
                r#"{"v":1,"type":"health","healthy":false,"reason":"a\nb"}"#,
                "control characters",
            ),
            (
                r#"{"v":1,"type":"health","healthy":false,"action":"restart"}"#,
                "unknown field \"action\"",
            ),
        ];
        for (line, expected) in cases {
            let err = parse_guest_line(line.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(expected), "{line:?}: {err:?} lacks {expected:?}");
        }
        let too_long = format!(
            r#"{{"v":1,"type":"result","id":"r1","result":"refused","reason":"{}"}}"#,
            "y".repeat(MAX_TEXT + 1)
        );
        assert!(parse_guest_line(too_long.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("too long"));
        assert!(matches!(
            parse_guest_line(long.as_bytes()),
            Err(ProtocolError::TooLong(_))
        ));
    }

    #[test]
    fn host_input_is_parsed_strictly_too() {
        let cases: &[(&str, &str)] = &[
            (r#"{"v":1,"type":"event","name":"Bad_Name"}"#, "[a-z0-9-]"),
            (r#"{"v":1,"type":"event","name":"dc","data":[]}"#, "must be an object"),
            (
                r#"{"v":1,"type":"request","id":"r1","name":"drain","data":{}}"#,
                "deadline_ms",
            ),
            (
                r#"{"v":1,"type":"request","id":"r1","name":"drain","deadline_ms":0}"#,
                "deadline_ms",
            ),
            (
                r#"{"v":1,"type":"result","id":"r1","result":"done"}"#,
                "unknown message type",
            ),
        ];
        for (line, expected) in cases {
            let err = parse_host_line(line.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(expected), "{line:?}: {err:?} lacks {expected:?}");
        }
        let ok = parse_host_line(br#"{"v":1,"type":"event","name":"dc"}"#).unwrap();
        assert_eq!(ok, HostMessage::event("dc", json!({})));
    }

    #[test]
    fn names_ids_and_truncation() {
        assert!(valid_name("test-ok") && valid_name("a") && !valid_name("") && !valid_name(&"a".repeat(33)));
        assert!(!valid_name("A") && !valid_name("a/b") && !valid_name("a.b"));
        assert!(valid_id("n1.42_x-Y") && !valid_id("") && !valid_id(&"a".repeat(65)) && !valid_id("a/b"));
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
        // A verdict's reason is made one printable, bounded line before it is sent.
        let GuestMessage::Health { reason, .. } =
            GuestMessage::health(false, &format!("a\nb\u{1b}{}", "x".repeat(2000)))
        else {
            panic!()
        };
        assert!(reason.starts_with("a b ") && reason.len() <= MAX_TEXT && !reason.contains('\n'));
        assert!(parse_guest_line(GuestMessage::health(false, &reason).to_line().as_bytes()).is_ok());
        assert_eq!(channel_socket("web"), "/var/lib/libvirt/qemu/vmha.web.guest.0");
    }
}
