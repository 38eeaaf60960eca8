//! What every result file records, shared by every bench: the exact command, the git revision, the date,
//! the machine (cores, CPU model, memory, the disk and file system the measured storage is on, kernel),
//! the load average when the run began and when it ended, and each figure as its median with its spread
//! (min–max and interquartile range) over the rounds, with a verdict against its goal.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

/// Median and spread of one figure over its rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub max: f64,
}

/// The `p` quantile (0..=1) of sorted values, interpolated linearly between closest ranks.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let pos = p * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Stats {
    /// `None` for no values (NaN values are left out).
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Stats {
            n: v.len(),
            min: v[0],
            q1: quantile(&v, 0.25),
            median: quantile(&v, 0.5),
            q3: quantile(&v, 0.75),
            max: v[v.len() - 1],
        })
    }

    /// `median (min–max, IQR q1–q3, n=N)` with `prec` decimals and a unit after the median.
    pub fn cell(&self, prec: usize, unit: &str) -> String {
        let f = |x: f64| format!("{x:.prec$}");
        format!(
            "{}{unit} ({}–{}, IQR {}–{}, n={})",
            f(self.median),
            f(self.min),
            f(self.max),
            f(self.q1),
            f(self.q3),
            self.n
        )
    }
}

/// [`Stats::cell`] of `values`, or "no samples".
pub fn cell(values: &[f64], prec: usize, unit: &str) -> String {
    Stats::of(values).map_or_else(|| "no samples".into(), |s| s.cell(prec, unit))
}

/// Median of `values` (NaN when there are none).
pub fn median(values: &[f64]) -> f64 {
    Stats::of(values).map_or(f64::NAN, |s| s.median)
}

/// "met" or "**missed**".
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The workspace this bench was built from.
fn workspace() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/..")
}

/// `git rev-parse HEAD` of the workspace, with "-dirty" when a tracked file outside bench/results/ (which
/// the benches themselves rewrite) differs from it.
pub fn revision() -> String {
    let dir = workspace();
    let Some(head) = run("git", &["-C", dir, "rev-parse", "HEAD"]) else {
        return "unknown (no git)".into();
    };
    let changes = run(
        "git",
        &[
            "-C",
            dir,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)bench/results",
        ],
    );
    match changes {
        Some(c) if c.is_empty() => head,
        Some(_) => format!("{head}-dirty"),
        None => format!("{head} (status unknown)"),
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The machine: cores, CPU model, memory, the disk and file system of `storage`, kernel.
pub fn machine(storage: &Path) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let processors = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_string());
    let usable = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    // The storage may not exist yet (a lab makes its directory later): its closest existing ancestor.
    let existing = storage.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let path = existing.to_string_lossy();
    let fs = run("findmnt", &["-n", "-T", &path, "-o", "SOURCE,FSTYPE,TARGET"])
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into());
    let rotational = fs
        .split_whitespace()
        .next()
        .and_then(|dev| dev.strip_prefix("/dev/"))
        .and_then(|dev| std::fs::read_to_string(format!("/sys/class/block/{dev}/queue/rotational")).ok())
        .map(|r| {
            if r.trim() == "0" {
                ", non-rotational"
            } else {
                ", rotational"
            }
        })
        .unwrap_or("");
    let size = run("df", &["-h", "--output=size,avail", &path])
        .and_then(|d| {
            d.lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" / "))
        })
        .map(|s| format!(", size / free {s}"))
        .unwrap_or_default();
    vec![
        (
            "cores".into(),
            format!("{processors} in /proc/cpuinfo, {usable} usable by this process"),
        ),
        ("CPU model".into(), model),
        ("memory".into(), mem),
        (format!("storage of {path}"), format!("{fs}{rotational}{size}")),
        ("kernel".into(), kernel),
    ]
}

/// One run of a bench: what it was, where and when; [`Run::finish`] writes the result file's head.
pub struct Run {
    command: String,
    revision: String,
    date: String,
    machine: Vec<(String, String)>,
    load_start: String,
}

impl Run {
    /// Records the command line, revision, date, machine and load average now. `storage` is where the
    /// measured data lives (the lab's shared directory, the work directory).
    pub fn start(storage: &Path) -> Run {
        let command = std::env::args().map(|a| shell_quote(&a)).collect::<Vec<_>>().join(" ");
        Run {
            command,
            revision: revision(),
            date: run("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_else(|| "unknown".into()),
            machine: machine(storage),
            load_start: loadavg(),
        }
    }

    /// The whole result file: a title, the run's facts (load average read now as the end), `body`.
    pub fn finish(&self, title: &str, body: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# {title}\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| command | `{}` |", self.command);
        let _ = writeln!(s, "| revision | {} |", self.revision);
        let _ = writeln!(s, "| date | {} |", self.date);
        for (k, v) in &self.machine {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        let _ = writeln!(
            s,
            "| load average (1, 5, 15 min) | {} at start, {} at end |",
            self.load_start,
            loadavg()
        );
        let _ = writeln!(
            s,
            "\nTaken on a **shared machine**: other engineers build on the same cores at the same time, so \
             figures swing with their load (the load average above). The sides compared run alternating \
             (A B A B ...) in the same run, so that load falls on both. Each figure is its median with its \
             spread: min–max and the interquartile range, over n samples.\n"
        );
        if std::env::args().any(|a| a == "--quick") {
            let _ = writeln!(
                s,
                "**Quick mode** (one round, smallest sizes): this run only proves the bench works; its figures \
                 and verdicts mean nothing.\n"
            );
        }
        s.push_str(body);
        s
    }
}

/// Writes `report` to stdout and, when asked, to `out`.
pub fn emit(report: &str, out: Option<&Path>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    print!("{report}");
    if let Some(out) = out {
        std::fs::write(out, report).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_quartiles_and_spread() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.min, s.q1, s.median, s.q3, s.max), (5, 1.0, 2.0, 3.0, 4.0, 5.0));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.q1, 1.75);
        assert_eq!(s.q3, 3.25);
        assert!(Stats::of(&[]).is_none());
        assert!(Stats::of(&[f64::NAN]).is_none());
        assert_eq!(
            Stats::of(&[7.0]).unwrap().cell(1, " ms"),
            "7.0 ms (7.0–7.0, IQR 7.0–7.0, n=1)"
        );
        assert_eq!(cell(&[], 0, ""), "no samples");
    }

    #[test]
    fn quoting_keeps_plain_words() {
        assert_eq!(shell_quote("--out"), "--out");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn run_facts_are_written() {
        let run = Run::start(Path::new("/"));
        let text = run.finish("t", "body\n");
        assert!(text.contains("| revision | "));
        assert!(text.contains("| CPU model | "));
        assert!(text.contains("at start,"));
        assert!(text.contains("shared machine"));
        assert!(text.ends_with("body\n"));
        assert!(!loadavg().is_empty());
    }
}
