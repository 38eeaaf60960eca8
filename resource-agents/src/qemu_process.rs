//! Whether a QEMU process runs a given domain, read from `/proc`: the fallback when libvirtd cannot
//! be reached (not running yet, or restarting), so that a probe at boot does not escalate into a
//! failed stop and fencing when the VM plainly is not running here.

use std::fs;
use std::io;
use std::path::Path;

/// Whether a NUL-separated `/proc/<pid>/cmdline` is a QEMU process started for domain `name`
/// (libvirt passes `-name guest=<name>,...`; QEMU escapes commas in values as `,,`).
pub fn cmdline_runs_domain(cmdline: &[u8], name: &str) -> bool {
    let mut args = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a));
    let Some(program) = args.next() else {
        return false;
    };
    let program = program.rsplit('/').next().unwrap_or_default();
    if !(program.starts_with("qemu-system-") || program == "qemu-kvm" || program == "kvm") {
        return false;
    }
    while let Some(arg) = args.next() {
        if arg == "-name" {
            return args.next().is_some_and(|value| guest_name(&value) == name);
        }
    }
    false
}

/// The guest name in a `-name` value: `guest=NAME,opt=...` or plain `NAME,opt=...`.
fn guest_name(value: &str) -> String {
    let value = value.strip_prefix("guest=").unwrap_or(value);
    let mut name = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
            } else {
                break;
            }
        }
        name.push(c);
    }
    name
}

/// The pid of a process under `proc_root` (normally `/proc`) that runs domain `name`.
pub fn find(proc_root: &Path, name: &str) -> io::Result<Option<u32>> {
    for entry in fs::read_dir(proc_root)? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Processes may exit while we look; unreadable ones are not ours to judge.
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            if cmdline_runs_domain(&cmdline, name) {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        args.join("\0").into_bytes()
    }

    #[test]
    fn recognises_libvirt_started_qemu() {
        let table = [
            (
                cmd(&["/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on"]),
                "web1",
                true,
            ),
            (
                cmd(&["/usr/bin/qemu-system-x86_64", "-name", "guest=web10,debug-threads=on"]),
                "web1",
                false,
            ),
            (
                cmd(&["/usr/bin/qemu-system-x86_64", "-name", "guest=a,,b,debug-threads=on"]),
                "a,b",
                true,
            ),
            (cmd(&["qemu-kvm", "-name", "web1"]), "web1", true),
            (
                cmd(&["/usr/bin/qemu-system-aarch64", "-S", "-name", "guest=web1"]),
                "web1",
                true,
            ),
            (cmd(&["/usr/bin/vim", "-name", "guest=web1"]), "web1", false),
            (cmd(&["/usr/bin/qemu-system-x86_64", "-name"]), "web1", false),
            (cmd(&["/usr/bin/qemu-system-x86_64", "-m", "128"]), "web1", false),
            (Vec::new(), "web1", false),
        ];
        for (cmdline, name, expected) in table {
            assert_eq!(
                cmdline_runs_domain(&cmdline, name),
                expected,
                "{:?} {name}",
                String::from_utf8_lossy(&cmdline)
            );
        }
    }

    #[test]
    fn scans_a_proc_like_tree() {
        let root = std::env::temp_dir().join(format!("vmha-proc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (pid, args) in [
            ("1", cmd(&["/sbin/init"])),
            ("self", cmd(&["/usr/bin/qemu-system-x86_64", "-name", "guest=web1"])),
            ("4242", cmd(&["/usr/bin/qemu-system-x86_64", "-name", "guest=web1"])),
        ] {
            fs::create_dir_all(root.join(pid)).expect("mkdir");
            fs::write(root.join(pid).join("cmdline"), args).expect("write");
        }
        assert_eq!(find(&root, "web1").expect("scan"), Some(4242));
        assert_eq!(find(&root, "web2").expect("scan"), None);
        let _ = fs::remove_dir_all(&root);
    }
}
