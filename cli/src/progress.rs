//! How the `vmha` CLI shows a running job: on a terminal, a live bar (share done, time so far, the current
//! step) with a finished line, and its duration, printed for every step it leaves behind; elsewhere (a pipe,
//! a log, `TERM=dumb`), a plain line for every update, which is what scripts and logs want.
//!
//! A step is what a job's message names before its first `": "` ("disk web.qcow2: 12.0/64.0 MiB, ..."):
//! updates of the same step (a transfer's figures) redraw the bar, a new step closes the one before.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Resolution of the bar: the job's fraction is shown in thousandths.
const SCALE: u64 = 1000;

/// The step a message belongs to: what it says before its first `": "`, or all of it.
pub fn step_of(message: &str) -> &str {
    message.split_once(": ").map_or(message, |(step, _)| step)
}

enum Mode {
    Bar(ProgressBar),
    Lines(Box<dyn Write + Send>),
}

/// The display of one job, fed with its `Progress` and `Message` properties as they change.
pub struct JobProgress {
    mode: Mode,
    fraction: Option<f64>,
    /// The current step: its name, its latest message and when it began.
    step: Option<(String, String, Instant)>,
}

impl std::fmt::Debug for JobProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobProgress")
            .field("bar", &matches!(self.mode, Mode::Bar(_)))
            .field("fraction", &self.fraction)
            .field("step", &self.step.as_ref().map(|s| &s.1))
            .finish()
    }
}

impl JobProgress {
    /// A bar on stderr when stderr is a terminal that can redraw a line, lines on stderr otherwise.
    pub fn stderr() -> JobProgress {
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        if std::io::stderr().is_terminal() && !dumb {
            JobProgress::bar(ProgressDrawTarget::stderr())
        } else {
            JobProgress::lines(Box::new(std::io::stderr()))
        }
    }

    /// A bar drawn on `target`.
    pub fn bar(target: ProgressDrawTarget) -> JobProgress {
        let bar = ProgressBar::with_draw_target(Some(SCALE), target);
        let style = ProgressStyle::with_template("  {spinner} [{bar:28}] {percent:>3}% {elapsed:>4}  {wide_msg}")
            .expect("the bar's template is valid")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        JobProgress {
            mode: Mode::Bar(bar),
            fraction: None,
            step: None,
        }
    }

    /// A line per update written to `out`.
    pub fn lines(out: Box<dyn Write + Send>) -> JobProgress {
        JobProgress {
            mode: Mode::Lines(out),
            fraction: None,
            step: None,
        }
    }

    /// The job's `Progress` (a fraction of the whole; kept within 0..=1) and/or `Message` changed.
    pub fn update(&mut self, fraction: Option<f64>, message: Option<&str>) {
        // A job's messages may carry a guest's or an archive's words: control characters are escaped.
        let shown = message.map(vmha_vcluster::printable);
        let message = shown.as_deref();
        if let Some(f) = fraction.filter(|f| f.is_finite()) {
            self.fraction = Some(f.clamp(0.0, 1.0));
        }
        match &mut self.mode {
            Mode::Lines(out) => {
                if let Some(text) = message {
                    let _ = match self.fraction {
                        Some(p) => writeln!(out, "  [{:>3.0}%] {text}", p * 100.0),
                        None => writeln!(out, "  ... {text}"),
                    };
                }
            }
            Mode::Bar(bar) => {
                if let Some(p) = self.fraction {
                    bar.set_position((p * SCALE as f64).round() as u64);
                }
                if let Some(text) = message {
                    let step = step_of(text);
                    match &mut self.step {
                        Some((name, latest, _)) if name == step => *latest = text.to_string(),
                        current => {
                            if let Some((_, latest, began)) = current.take() {
                                bar.println(finished_line(true, &latest, began.elapsed()));
                            }
                            *current = Some((step.to_string(), text.to_string(), Instant::now()));
                        }
                    }
                    bar.set_message(text.to_string());
                }
            }
        }
    }

    /// The job finished (`ok`: it succeeded) with `result` (which the caller prints): the bar goes, the
    /// last step is closed with the outcome (unless it is the result itself).
    pub fn finish(&mut self, ok: bool, result: &str) {
        if let Mode::Bar(bar) = &self.mode {
            if let Some((_, latest, began)) = self.step.take().filter(|(_, latest, _)| latest != result) {
                bar.println(finished_line(ok, &latest, began.elapsed()));
            }
            bar.finish_and_clear();
        }
    }
}

impl Drop for JobProgress {
    /// A display dropped before its job finished (an error while waiting) leaves no bar behind.
    fn drop(&mut self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}

fn finished_line(ok: bool, message: &str, took: Duration) -> String {
    format!(
        "  {} {message} ({:.1} s)",
        if ok { '✓' } else { '✗' },
        took.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A terminal that keeps what was written on it.
    #[derive(Debug, Default, Clone)]
    struct Screen(Arc<Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn on_a_terminal_each_finished_step_stays_as_a_line_and_the_result_is_not_repeated() {
        let screen = Screen::default();
        let mut p = JobProgress::bar(ProgressDrawTarget::term_like(Box::new(screen.clone())));
        p.update(Some(0.05), Some("asking tpl's guest to prepare"));
        p.update(Some(0.2), Some("disk a: 1.0/4.0 MiB"));
        p.update(Some(0.3), Some("disk a: 4.0/4.0 MiB"));
        p.update(Some(1.0), Some("cloned tpl to c1"));
        p.finish(true, "cloned tpl to c1");
        let text = screen.0.lock().unwrap().clone();
        // The bar is redrawn in place (cursor moves, no new lines): the closed steps are the marked texts.
        assert_eq!(text.matches('✓').count(), 2, "{text}");
        assert!(text.contains("  ✓ asking tpl's guest to prepare ("), "{text}");
        assert!(text.contains("  ✓ disk a: 4.0/4.0 MiB ("), "{text}");
        assert!(
            !text.contains("disk a: 1.0/4.0 MiB ("),
            "a transfer's figures are one step"
        );

        let screen = Screen::default();
        let mut p = JobProgress::bar(ProgressDrawTarget::term_like(Box::new(screen.clone())));
        p.update(Some(0.4), Some("creating c1 on node2"));
        p.finish(false, "creating c1: no room");
        let text = screen.0.lock().unwrap().clone();
        assert!(text.contains("  ✗ creating c1 on node2 ("), "{text}");
    }

    #[test]
    fn a_step_is_what_the_message_names_before_its_first_colon() {
        assert_eq!(step_of("disk web.qcow2: 1.0/2.0 MiB, 3.0 MiB/s"), "disk web.qcow2");
        assert_eq!(step_of("rolling back: guest said no: busy"), "rolling back");
        assert_eq!(step_of("creating web-2 on node2"), "creating web-2 on node2");
        assert_eq!(step_of("no:space"), "no:space");
    }

    #[test]
    fn lines_show_every_message_with_the_share_done() {
        let sink = Sink::default();
        let mut p = JobProgress::lines(Box::new(sink.clone()));
        p.update(None, Some("queued"));
        p.update(Some(0.4), None);
        p.update(None, Some("creating web-2 on node2"));
        p.update(Some(7.0), Some("archive: 3.0/3.0 MiB"));
        p.update(Some(f64::NAN), Some("still"));
        p.finish(true, "done");
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "  ... queued\n  [ 40%] creating web-2 on node2\n  [100%] archive: 3.0/3.0 MiB\n  [100%] still\n"
        );
    }

    #[test]
    fn the_bar_follows_the_fraction_and_keeps_one_step_per_name() {
        let mut p = JobProgress::bar(ProgressDrawTarget::hidden());
        p.update(Some(0.05), Some("asking tpl's guest to prepare"));
        p.update(Some(0.2), Some("disk a: 1.0/4.0 MiB"));
        p.update(Some(0.3), Some("disk a: 2.0/4.0 MiB"));
        let Mode::Bar(bar) = &p.mode else { unreachable!() };
        assert_eq!(bar.position(), 300);
        assert_eq!(bar.message(), "disk a: 2.0/4.0 MiB");
        assert_eq!(p.step.as_ref().map(|s| s.0.as_str()), Some("disk a"));
        p.update(Some(-1.0), Some("resuming tpl's guest"));
        let Mode::Bar(bar) = &p.mode else { unreachable!() };
        assert_eq!(bar.position(), 0);
        assert_eq!(p.step.as_ref().map(|s| s.0.as_str()), Some("resuming tpl's guest"));
        p.finish(false, "failed: no room");
        assert!(p.step.is_none());
        let Mode::Bar(bar) = &p.mode else { unreachable!() };
        assert!(bar.is_finished());
    }
}
