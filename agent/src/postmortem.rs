//! What is kept of a hung guest before vmhad resets it (issue 22): the tail of its console log and a
//! screenshot, for the post-mortem.
//!
//! A hung guest is powered off right after it is failed through Pacemaker, and what its console showed last
//! (a kernel oops, a soft-lockup report, a hung-task warning) is the best clue to why. Before the reset,
//! vmhad writes one directory per hang, `<dir>/<vm>/<UTC time>/`:
//! - `reason.txt`: the reason the VM was failed with;
//! - `console.log`: the last [`CONSOLE_TAIL`] bytes of each console log file the domain's live definition
//!   names (`<serial>`/`<console>` with `<log file=...>`, or of `type='file'`), as written by QEMU;
//! - `screenshot.ppm` (or `.png`, as libvirt hands it): `virDomainScreenshot` of screen 0;
//! - `missing.txt`: what could not be kept, and why (a domain without graphics has no screenshot).
//!
//! All of it within [`DEADLINE`]: a hung guest's post-mortem must not delay its reset by more. At most
//! [`KEEP`] post-mortems per VM are kept; older ones are removed.
//!
//! The console log's content is the guest's: it is copied as bytes, never interpreted. The VM's name
//! becomes a directory name only when it is one path component (no `/`, not `.` or `..`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The whole post-mortem of one hang (libvirt calls, reads and writes) is done within this.
pub const DEADLINE: Duration = Duration::from_secs(3);
/// How much of each console log is kept (its end).
pub const CONSOLE_TAIL: u64 = 64 * 1024;
/// The largest screenshot kept (a 1280x1024 PPM is 3.75 MiB).
pub const SCREENSHOT_MAX: usize = 16 * 1024 * 1024;
/// Post-mortems kept per VM.
pub const KEEP: usize = 5;
/// Where vmhad keeps them by default.
pub const DEFAULT_DIR: &str = "/var/lib/vmha/postmortem";

/// Why no post-mortem could be written at all.
#[derive(Debug, thiserror::Error)]
pub enum PostMortemError {
    #[error("VM {vm} on {host}: post-mortem not kept: the VM's name is not usable as a directory name")]
    BadName { vm: String, host: String },
    #[error("VM {vm} on {host}: post-mortem not kept: {call} {path}: {source}")]
    Io {
        vm: String,
        host: String,
        call: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {vm} on {host}: post-mortem not finished within {} s", DEADLINE.as_secs())]
    Deadline { vm: String, host: String },
}

/// The console log files a domain definition names: `<log file=...>` of its `<serial>` and `<console>`
/// devices, and the `<source path=...>` of a `type='file'` one, in document order, without repeats.
pub fn console_logs(domain_xml: &str) -> Vec<PathBuf> {
    let Ok(doc) = roxmltree::Document::parse(domain_xml) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = Vec::new();
    let devices = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("serial") || n.has_tag_name("console"));
    for dev in devices {
        let mut add = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() && !out.contains(&p) {
                out.push(p);
            }
        };
        for c in dev.children() {
            if c.has_tag_name("log") {
                if let Some(f) = c.attribute("file") {
                    add(f);
                }
            }
            if c.has_tag_name("source") && dev.attribute("type") == Some("file") {
                if let Some(f) = c.attribute("path") {
                    add(f);
                }
            }
        }
    }
    out
}

/// The last `max` bytes of the regular file at `path` (a symbolic link or anything but a regular file is
/// refused).
pub fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::with_capacity(len.min(max) as usize);
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The file extension for a screenshot of MIME type `mime`.
pub fn screenshot_extension(mime: &str) -> &'static str {
    match mime {
        "image/png" => "png",
        "image/x-portable-pixmap" => "ppm",
        _ => "img",
    }
}

/// `vm` as a directory name, when it is one ordinary path component.
fn dir_name(vm: &str) -> Option<&str> {
    (!vm.is_empty() && vm != "." && vm != ".." && !vm.contains('/') && !vm.contains('\0')).then_some(vm)
}

/// Removes all but the newest `keep` post-mortems in `vm_dir` (their names sort by time).
pub fn prune(vm_dir: &Path, keep: usize) -> std::io::Result<()> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(vm_dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for old in &names[..excess] {
        std::fs::remove_dir_all(old)?;
    }
    Ok(())
}

/// What libvirt gave for one domain: its live definition and a screenshot (MIME type and bytes), or why not.
struct FromLibvirt {
    xml: Result<String, String>,
    screenshot: Result<(String, Vec<u8>), String>,
}

fn from_libvirt(uri: &str, vm: &str) -> Result<FromLibvirt, String> {
    let conn = virt::connect::Connect::open(Some(uri)).map_err(|e| format!("virConnectOpen: {e}"))?;
    let dom = conn
        .lookup_domain_by_name(vm)
        .map_err(|e| format!("virDomainLookupByName: {e}"))?;
    let xml = dom.xml_desc(0).map_err(|e| format!("virDomainGetXMLDesc: {e}"));
    let screenshot = screenshot(&conn, &dom);
    Ok(FromLibvirt { xml, screenshot })
}

fn screenshot(conn: &virt::connect::Connect, dom: &virt::domain::Domain) -> Result<(String, Vec<u8>), String> {
    let stream = virt::stream::Stream::new(conn, 0).map_err(|e| format!("virStreamNew: {e}"))?;
    let mime = match dom.screenshot(&stream, 0, 0) {
        Ok(m) => m,
        Err(e) => {
            let _ = stream.abort();
            return Err(format!("virDomainScreenshot: {e}"));
        }
    };
    let mut data = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.recv(&mut buf) {
            Ok(0) => break,
            Ok(n) if n > 0 => {
                data.extend_from_slice(&buf[..n as usize]);
                if data.len() > SCREENSHOT_MAX {
                    let _ = stream.abort();
                    return Err(format!("virStreamRecv: the screenshot exceeds {SCREENSHOT_MAX} bytes"));
                }
            }
            Ok(_) => continue,
            Err(e) => {
                let _ = stream.abort();
                return Err(format!("virStreamRecv: {e}"));
            }
        }
    }
    stream.finish().map_err(|e| format!("virStreamFinish: {e}"))?;
    Ok((mime, data))
}

/// Keeps the post-mortem of hung VM `vm` (failed with `reason`) under `dir`, within [`DEADLINE`]; returns
/// its directory. What libvirt cannot give is listed in its `missing.txt`; only when nothing can be written
/// is it an error.
pub async fn keep(dir: &Path, uri: &str, host: &str, vm: &str, reason: &str) -> Result<PathBuf, PostMortemError> {
    let (dir, uri, host_s, vm_s, reason) = (
        dir.to_path_buf(),
        uri.to_string(),
        host.to_string(),
        vm.to_string(),
        reason.to_string(),
    );
    let work = tokio::task::spawn_blocking(move || write(&dir, &uri, &host_s, &vm_s, &reason, SystemTime::now()));
    match tokio::time::timeout(DEADLINE, work).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => Err(PostMortemError::Deadline {
            vm: vm.to_string(),
            host: host.to_string(),
        }),
    }
}

fn write(
    dir: &Path,
    uri: &str,
    host: &str,
    vm: &str,
    reason: &str,
    now: SystemTime,
) -> Result<PathBuf, PostMortemError> {
    let Some(name) = dir_name(vm) else {
        return Err(PostMortemError::BadName {
            vm: vm.to_string(),
            host: host.to_string(),
        });
    };
    let io = |call: &'static str, path: &Path| {
        let (vm, host, path) = (vm.to_string(), host.to_string(), path.to_path_buf());
        move |source| PostMortemError::Io {
            vm,
            host,
            call,
            path,
            source,
        }
    };
    let vm_dir = dir.join(name);
    let out = vm_dir.join(humantime::format_rfc3339_millis(now).to_string());
    std::fs::create_dir_all(&out).map_err(io("mkdir", &out))?;
    let put = |file: &str, data: &[u8]| {
        let p = out.join(file);
        std::fs::write(&p, data).map_err(io("write", &p))
    };
    put("reason.txt", format!("{reason}\n").as_bytes())?;

    let mut missing = Vec::new();
    match from_libvirt(uri, vm) {
        Err(e) => missing.push(format!("console and screenshot: {e}")),
        Ok(got) => {
            match got.xml {
                Err(e) => missing.push(format!("console: {e}")),
                Ok(xml) => {
                    let logs = console_logs(&xml);
                    if logs.is_empty() {
                        missing.push("console: the domain logs no serial console to a file".to_string());
                    }
                    let mut console = Vec::new();
                    for log in logs {
                        match tail(&log, CONSOLE_TAIL) {
                            Ok(bytes) => {
                                console.extend_from_slice(
                                    format!("==> {} (last {} bytes) <==\n", log.display(), bytes.len()).as_bytes(),
                                );
                                console.extend_from_slice(&bytes);
                                console.push(b'\n');
                            }
                            Err(e) => missing.push(format!("console: {}: {e}", log.display())),
                        }
                    }
                    if !console.is_empty() {
                        put("console.log", &console)?;
                    }
                }
            }
            match got.screenshot {
                Ok((mime, bytes)) => put(&format!("screenshot.{}", screenshot_extension(&mime)), &bytes)?,
                Err(e) => missing.push(format!("screenshot: {e}")),
            }
        }
    }
    if !missing.is_empty() {
        put("missing.txt", (missing.join("\n") + "\n").as_bytes())?;
    }
    if let Err(e) = prune(&vm_dir, KEEP) {
        tracing::warn!(vmha_vm = %vm, "pruning the post-mortems of VM {vm} in {}: {e}", vm_dir.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_logs_come_from_serial_and_console_devices() {
        let xml = r#"<domain><name>a</name><devices>
            <serial type='pty'><log file='/var/log/libvirt/qemu/a-console.log' append='on'/></serial>
            <console type='pty'><log file='/var/log/libvirt/qemu/a-console.log'/></console>
            <serial type='file'><source path='/srv/a-serial1.log'/></serial>
            <serial type='pty'><source path='/dev/pts/3'/></serial>
            <channel type='unix'><log file='/var/log/not-a-console.log'/></channel>
            <console type='pty'><log file='relative.log'/></console>
        </devices></domain>"#;
        assert_eq!(
            console_logs(xml),
            vec![
                PathBuf::from("/var/log/libvirt/qemu/a-console.log"),
                PathBuf::from("/srv/a-serial1.log")
            ]
        );
        assert!(console_logs("<domain><devices/></domain>").is_empty());
        assert!(console_logs("not xml <").is_empty());
    }

    #[test]
    fn tail_keeps_the_end_and_refuses_what_is_not_a_regular_file() {
        let d = tempdir();
        let f = d.join("log");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(tail(&f, 4).unwrap(), b"6789");
        assert_eq!(tail(&f, 100).unwrap(), b"0123456789");
        let link = d.join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(tail(&link, 4).unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(tail(&d, 4).unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(
            tail(&d.join("none"), 4).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_that_are_not_one_path_component_are_refused() {
        for bad in ["", ".", "..", "a/b", "../etc", "a\0b"] {
            assert_eq!(dir_name(bad), None, "{bad:?}");
        }
        assert_eq!(dir_name("web-1.example"), Some("web-1.example"));
        let d = tempdir();
        let e = write(&d, "test:///default", "node1", "../../etc", "r", SystemTime::now()).unwrap_err();
        assert!(matches!(e, PostMortemError::BadName { .. }), "{e}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "nothing written");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_post_mortem_of_a_test_domain_lists_what_is_missing_and_old_ones_are_pruned() {
        // libvirt's test driver: its domain "test" has no console log; its screenshot is a PPM.
        let d = tempdir();
        let mut dirs = Vec::new();
        for i in 0..(KEEP as u64 + 2) {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + i);
            dirs.push(write(&d, "test:///default", "node1", "test", "guest hung: test", at).unwrap());
        }
        let last = dirs.last().unwrap();
        assert_eq!(
            std::fs::read_to_string(last.join("reason.txt")).unwrap(),
            "guest hung: test\n"
        );
        let missing = std::fs::read_to_string(last.join("missing.txt")).unwrap();
        assert!(
            missing.contains("console: the domain logs no serial console"),
            "{missing}"
        );
        // The test driver hands a screenshot (a PNG).
        let shot = std::fs::read(last.join("screenshot.png")).unwrap();
        assert!(shot.starts_with(b"\x89PNG\r\n"), "{:?}", &shot[..shot.len().min(16)]);
        let kept: Vec<_> = std::fs::read_dir(d.join("test")).unwrap().collect();
        assert_eq!(kept.len(), KEEP);
        assert!(!dirs[0].exists() && !dirs[1].exists() && dirs[2].exists());
        // A domain that does not exist: still a reason and the list of what is missing.
        let gone = write(&d, "test:///default", "node1", "gone", "r", SystemTime::now()).unwrap();
        assert!(std::fs::read_to_string(gone.join("missing.txt"))
            .unwrap()
            .contains("virDomainLookupByName"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn screenshot_types_get_their_extension() {
        assert_eq!(screenshot_extension("image/png"), "png");
        assert_eq!(screenshot_extension("image/x-portable-pixmap"), "ppm");
        assert_eq!(screenshot_extension("text/html"), "img");
    }

    fn tempdir() -> PathBuf {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        let d = std::env::temp_dir().join(format!(
            "vmha-postmortem-{}",
            r.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
