//! One session on the channel: reads the host's lines (bounded), runs events' hooks one after another
//! on an event worker, runs each request's hooks on its own thread and writes its result back.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmha_model::guest::{parse_host_line, BoundedLine, GuestMessage, HostMessage, Line, Outcome, MAX_LINE};

use crate::hooks::run_hooks;

/// What a session needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// Hooks directory: `<hooks>/<event or request name>/<executables>`.
    pub hooks: PathBuf,
    /// How long an event's hooks may run together.
    pub event_timeout: Duration,
    /// The requests seen lately, across sessions.
    pub requests: Arc<Requests>,
}

/// How many request ids vmha-guest remembers.
const REMEMBERED: usize = 64;

/// The requests seen lately and their results: vmhad sends a request again when this side reopened the port
/// (what it had not read was dropped with the old session), so a request may arrive twice. Its hooks run
/// once: a second copy of a finished request gets the result again, of a running one nothing (the result
/// follows when the hooks end).
#[derive(Debug, Default)]
pub struct Requests {
    /// Oldest first: each id and, once its hooks ended, its result.
    seen: Mutex<VecDeque<(String, Option<Answer>)>>,
}

/// A request's result and reason.
type Answer = (Outcome, String);

/// What to do with a request that arrived.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    New,
    Running,
    Done(Answer),
}

impl Requests {
    /// Records `id` as running if it is new.
    fn arrived(&self, id: &str) -> Seen {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.iter().find(|(i, _)| i == id) {
            Some((_, None)) => Seen::Running,
            Some((_, Some(answer))) => Seen::Done(answer.clone()),
            None => {
                if seen.len() == REMEMBERED {
                    // The oldest finished one goes (a running one stays: its second copy must not run).
                    match seen.iter().position(|(_, r)| r.is_some()) {
                        Some(i) => {
                            seen.remove(i);
                        }
                        None => {
                            seen.pop_front();
                        }
                    }
                }
                seen.push_back((id.to_string(), None));
                Seen::New
            }
        }
    }

    fn finished(&self, id: &str, outcome: Outcome, reason: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, r)) = seen.iter_mut().find(|(i, _)| i == id) {
            *r = Some((outcome, reason.to_string()));
        }
    }
}

/// Reads one `\n`-terminated line of at most `max` bytes, never buffering more than that.
pub fn read_line(reader: &mut impl BufRead, max: usize) -> io::Result<Line> {
    let mut bounded = BoundedLine::new(max);
    loop {
        // A signal that interrupts the read is no reason to end the session (a socket with a receive
        // timeout is never restarted by the kernel, whatever SA_RESTART says).
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
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
            }) => match config.requests.arrived(&id) {
                Seen::New => {
                    let writer = Arc::clone(&writer);
                    let hooks = config.hooks.clone();
                    let requests = Arc::clone(&config.requests);
                    std::thread::spawn(move || {
                        let r = run_hooks(&hooks, &name, &text, Duration::from_millis(deadline_ms));
                        requests.finished(&id, r.outcome, &r.reason);
                        if let Err(e) = send(&writer, &GuestMessage::result(&id, r.outcome, &r.reason)) {
                            eprintln!("vmha-guest: answering request {id} ({name}): {e}");
                        }
                    });
                }
                Seen::Running => {}
                Seen::Done((outcome, reason)) => {
                    if let Err(e) = send(&writer, &GuestMessage::result(&id, outcome, &reason)) {
                        eprintln!("vmha-guest: answering request {id} ({name}) again: {e}");
                    }
                }
            },
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
            requests: Arc::default(),
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

    /// vmhad sends a waiting request again when vmha-guest reopens its port, so one may arrive twice, in
    /// one session or the next: its hooks run once, a copy while they run gets nothing, a copy after gets
    /// the same result again.
    #[test]
    fn a_request_seen_twice_runs_its_hooks_once() {
        let dir = hooks_dir("twice");
        let ran = dir.join("ran");
        let gate = dir.join("gate");
        hook(
            &dir,
            "post-clone",
            "record",
            &format!(
                "echo run >> {}; while [ ! -e {} ]; do sleep 0.01; done; echo not yet; exit 3",
                ran.display(),
                gate.display()
            ),
        );
        let config = Config {
            hooks: dir.clone(),
            event_timeout: Duration::from_secs(5),
            requests: Arc::default(),
        };
        let request = HostMessage::request("h1-r7", "post-clone", 20_000, serde_json::json!({})).to_line() + "\n";
        let session = |config: &Config| {
            let (guest, host) = UnixStream::pair().unwrap();
            let writer = Arc::new(Mutex::new(guest.try_clone().unwrap()));
            let config = config.clone();
            let t = std::thread::spawn(move || serve(guest, writer, &config));
            (host, t)
        };
        // The results on a session: the `expected` ones waited for up to 10 s each (a loaded machine may
        // be slow to run the hook), then 300 ms more for any that should not be there.
        let results = |host: &UnixStream, expected: usize| {
            let mut from_guest = BufReader::new(host.try_clone().unwrap());
            let mut got = Vec::new();
            loop {
                let wait = if got.len() < expected { 10_000 } else { 300 };
                host.set_read_timeout(Some(Duration::from_millis(wait))).unwrap();
                let l = match read_line(&mut from_guest, MAX_LINE) {
                    Ok(Line::Complete(l)) => l,
                    Err(e) if got.len() >= expected && e.kind() == std::io::ErrorKind::WouldBlock => break,
                    other => panic!("reading the session: {other:?} after {got:?} (wanted {expected})"),
                };
                if let GuestMessage::Result { id, result, reason, .. } = parse_guest_line(&l).unwrap() {
                    got.push((id, result, reason));
                }
            }
            got
        };
        let wait_for = |what: &dyn Fn() -> bool| {
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while !what() {
                assert!(std::time::Instant::now() < until, "timed out");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let runs = || std::fs::read_to_string(&ran).map(|s| s.lines().count()).unwrap_or(0);

        // Session 1: the request arrives and its hook starts; a second copy in the same session while it
        // runs starts nothing.
        let (mut host1, t1) = session(&config);
        host1.write_all(request.as_bytes()).unwrap();
        wait_for(&|| runs() == 1);
        host1.write_all(request.as_bytes()).unwrap();
        // Session 2 (the port reopened): a copy while the hook still runs: nothing either.
        let (mut host2, t2) = session(&config);
        host2.write_all(request.as_bytes()).unwrap();
        assert_eq!(results(&host2, 0), vec![], "no answer while the hooks run");
        std::fs::write(&gate, "").unwrap();
        // The one run answers once, on the session it came from.
        let first = results(&host1, 1);
        assert_eq!(
            first,
            vec![("h1-r7".to_string(), Outcome::Refused, "not yet".to_string())]
        );
        // A copy after it ended: the same result again, no second run.
        host2.write_all(request.as_bytes()).unwrap();
        assert_eq!(results(&host2, 1), first);
        assert_eq!(runs(), 1, "the hook ran once");
        for (host, t) in [(host1, t1), (host2, t2)] {
            host.shutdown(std::net::Shutdown::Both).unwrap();
            t.join().unwrap().unwrap();
        }
    }

    /// A read interrupted by a signal (EINTR, as the test harness's reads of a session with a receive timeout
    /// saw when a hook process ended) is tried again, not taken as the end of the line.
    #[test]
    fn an_interrupted_read_is_tried_again() {
        struct Interrupting {
            interrupted: bool,
            data: &'static [u8],
        }
        impl Read for Interrupting {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if !self.interrupted {
                    self.interrupted = true;
                    return Err(io::Error::from(io::ErrorKind::Interrupted));
                }
                let n = self.data.len().min(buf.len());
                buf[..n].copy_from_slice(&self.data[..n]);
                self.data = &self.data[n..];
                Ok(n)
            }
        }
        let mut reader = BufReader::new(Interrupting {
            interrupted: false,
            data: b"{\"a\":1}\n",
        });
        match read_line(&mut reader, MAX_LINE).unwrap() {
            Line::Complete(l) => assert_eq!(l, b"{\"a\":1}".to_vec()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_line(&mut reader, MAX_LINE).unwrap(), Line::Eof));
    }

    #[test]
    fn the_oldest_finished_request_is_forgotten_first() {
        let r = Requests::default();
        assert_eq!(r.arrived("running"), Seen::New);
        for i in 0..REMEMBERED - 1 {
            assert_eq!(r.arrived(&format!("d{i}")), Seen::New);
            r.finished(&format!("d{i}"), Outcome::Done, "");
        }
        assert_eq!(r.arrived("d0"), Seen::Done((Outcome::Done, String::new())));
        assert_eq!(r.arrived("new"), Seen::New, "remembering {REMEMBERED} at most");
        assert_eq!(r.arrived("running"), Seen::Running, "a running request is kept");
        assert_eq!(r.arrived("d0"), Seen::New, "d0, the oldest finished one, was forgotten");
    }
}
