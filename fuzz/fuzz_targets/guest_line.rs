//! The guest channel's line protocol, both directions: what vmhad (as root) reads from a guest
//! (`parse_guest_line`, behind `BoundedLine`: hello, results, heartbeats, health verdicts) and what vmha-guest reads from the host (`parse_host_line`).
//! The input is the raw byte stream of a channel: it is cut into lines exactly as both ends do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmha_model::guest::{parse_guest_line, parse_host_line, BoundedLine, GuestMessage, Line, MAX_LINE, MAX_TEXT};

fn check_line(line: &[u8]) {
    if let Ok(msg) = parse_guest_line(line) {
        // What was accepted is written back the same way and reads back as the same message.
        let again = msg.to_line();
        assert_eq!(parse_guest_line(again.as_bytes()).as_ref(), Ok(&msg), "{again}");
        // A health verdict's reason, as accepted, is one printable line of bounded size.
        if let GuestMessage::Health { reason, .. } = &msg {
            assert!(
                reason.len() <= MAX_TEXT && !reason.chars().any(char::is_control),
                "{again}"
            );
        }
    }
    if let Ok(msg) = parse_host_line(line) {
        // Its `data` may hold floats, which serde_json does not promise to read back to the last bit.
        let again = msg.to_line();
        let back = parse_host_line(again.as_bytes()).unwrap_or_else(|e| panic!("{e}: {again}"));
        assert_eq!(back.name(), msg.name(), "{again}");
    }
}

/// Cuts `stream` into lines of at most `max` bytes, handing the reader's buffers over `step` bytes at a
/// time, and parses each complete line.
fn read_lines(stream: &[u8], max: usize, step: usize) {
    // One BoundedLine per line, as both ends read (agent/src/guest.rs, guest/src/channel.rs).
    let mut rest = stream;
    'lines: loop {
        let mut bounded = BoundedLine::new(max);
        let line = loop {
            if rest.is_empty() {
                break bounded.end();
            }
            let buf = &rest[..rest.len().min(step)];
            let (used, line) = bounded.feed(buf);
            assert!(used > 0 && used <= buf.len(), "feed consumed {used} of {}", buf.len());
            rest = &rest[used..];
            if let Some(line) = line {
                break line;
            }
        };
        match line {
            Line::Complete(l) => {
                assert!(l.len() <= max, "a complete line of {} bytes, bound {max}", l.len());
                assert!(!l.contains(&b'\n'));
                check_line(&l);
            }
            Line::TooLong(n) => assert!(n > max),
            Line::Eof => break 'lines,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The real bound, and a small one so that the too-long path is reached too; the reader's buffer size
    // varies with the input.
    let step = data.len() % 61 + 1;
    read_lines(data, MAX_LINE, step);
    read_lines(data, 64, step);
    check_line(data);
});
