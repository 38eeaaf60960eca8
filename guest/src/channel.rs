//! One session on the channel: reads the host's lines (bounded), runs events' hooks one after another
//! on an event worker, runs each request's hooks on its own thread and writes its result back.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmha_model::guest::{parse_host_line, BoundedLine, GuestMessage, HostMessage, Line, MAX_LINE};

use crate::hooks::run_hooks;

/// What a session needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// Hooks directory: `<hooks>/<event or request name>/<executables>`.
    pub hooks: PathBuf,
    /// How long an event's hooks may run together.
    pub event_timeout: Duration,
}

/// Reads one `\n`-terminated line of at most `max` bytes, never buffering more than that.
pub fn read_line(reader: &mut impl BufRead, max: usize) -> io::Result<Line> {
    let mut bounded = BoundedLine::new(max);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(bounded.end());
        }
        let (used, line) = bounded.feed(buf);
        reader.consume(used);
        if let Some(line) = line {
            return Ok(line);
        }
    }
}

/// Writes one message as a line.
pub fn send<W: Write>(writer: &Mutex<W>, msg: &GuestMessage) -> io::Result<()> {
    let mut line = msg.to_line();
    line.push('\n');
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(line.as_bytes())?;
    w.flush()
}

/// Serves one connection until the host side goes away (end of file or a read error).
pub fn serve<R, W>(reader: R, writer: Arc<Mutex<W>>, config: &Config) -> io::Result<()>
where
    R: Read,
    W: Write + Send + 'static,
{
    let mut reader = BufReader::new(reader);
    let (events, queue) = mpsc::channel::<(String, String)>();
    let event_config = config.clone();
    let worker = std::thread::spawn(move || {
        for (name, line) in queue {
            let r = run_hooks(&event_config.hooks, &name, &line, event_config.event_timeout);
            if !r.reason.is_empty() {
                eprintln!("vmha-guest: event {name}: {} ({})", r.outcome.as_str(), r.reason);
            }
        }
    });
    let result = loop {
        let line = match read_line(&mut reader, MAX_LINE) {
            Ok(Line::Complete(l)) => l,
            Ok(Line::TooLong(n)) => {
                eprintln!("vmha-guest: skipped a line of {n} bytes from the host");
                continue;
            }
            Ok(Line::Eof) => break Ok(()),
            Err(e) => break Err(e),
        };
        if line.is_empty() {
            continue;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        match parse_host_line(&line) {
            Ok(HostMessage::Event { name, .. }) => {
                let _ = events.send((name, text));
            }
            Ok(HostMessage::Request {
                id, name, deadline_ms, ..
            }) => {
                let writer = Arc::clone(&writer);
                let hooks = config.hooks.clone();
                std::thread::spawn(move || {
                    let r = run_hooks(&hooks, &name, &text, Duration::from_millis(deadline_ms));
                    if let Err(e) = send(&writer, &GuestMessage::result(&id, r.outcome, &r.reason)) {
                        eprintln!("vmha-guest: answering request {id} ({name}): {e}");
                    }
                });
            }
            Err(e) => eprintln!("vmha-guest: ignored a line from the host: {e}"),
        }
    };
    drop(events);
    let _ = worker.join();
    result
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::os::unix::net::UnixStream;

    use vmha_model::guest::{parse_guest_line, Outcome};

    use super::*;
    use crate::hooks::tests::{hook, hooks_dir};

    #[test]
    fn lines_are_bounded_and_oversized_ones_skipped() {
        let input = format!("short\n{}\nafter\nlast", "x".repeat(100));
        let mut r = BufReader::with_capacity(16, Cursor::new(input));
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::Complete(b"short".to_vec()));
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::TooLong(100));
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::Complete(b"after".to_vec()));
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::Complete(b"last".to_vec()));
        assert_eq!(read_line(&mut r, 10).unwrap(), Line::Eof);
    }

    /// The fake port: a socketpair, the test playing the host.
    #[test]
    fn a_session_runs_hooks_and_answers_requests() {
        let dir = hooks_dir("session");
        let seen = dir.join("seen");
        hook(&dir, "membership", "log", &format!("cat >> {}", seen.display()));
        hook(&dir, "test-ok", "ok", "exit 0");
        hook(&dir, "test-refuse", "no", "echo not now; exit 3");
        hook(&dir, "test-slow", "slow", "sleep 30");
        let (guest, host) = UnixStream::pair().unwrap();
        let config = Config {
            hooks: dir.clone(),
            event_timeout: Duration::from_secs(5),
        };
        let writer = Arc::new(Mutex::new(guest.try_clone().unwrap()));
        let session = std::thread::spawn(move || serve(guest, writer, &config));

        let mut to_guest = host.try_clone().unwrap();
        let event = HostMessage::event("membership", serde_json::json!({"members": ["n1"]})).to_line();
        let mut lines = vec![
            "garbage".to_string(),
            event.clone(),
            "y".repeat(MAX_LINE + 10),
            HostMessage::request("a", "test-ok", 5000, serde_json::json!({})).to_line(),
            HostMessage::request("b", "test-refuse", 5000, serde_json::json!({})).to_line(),
            HostMessage::request("c", "test-slow", 200, serde_json::json!({})).to_line(),
        ];
        lines.push(String::new());
        to_guest.write_all(lines.join("\n").as_bytes()).unwrap();

        let mut from_guest = BufReader::new(host.try_clone().unwrap());
        let mut results = std::collections::BTreeMap::new();
        while results.len() < 3 {
            let Line::Complete(l) = read_line(&mut from_guest, MAX_LINE).unwrap() else {
                panic!("the session ended early")
            };
            if let GuestMessage::Result { id, result, reason, .. } = parse_guest_line(&l).unwrap() {
                results.insert(id, (result, reason));
            }
        }
        assert_eq!(results["a"], (Outcome::Done, String::new()));
        assert_eq!(results["b"], (Outcome::Refused, "not now".to_string()));
        assert_eq!(results["c"].0, Outcome::Failed);
        assert!(results["c"].1.contains("timed out"), "{:?}", results["c"]);

        host.shutdown(std::net::Shutdown::Both).unwrap();
        session.join().unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), format!("{event}\n"));
    }
}
