//! The built agent as Pacemaker runs it: one action argument, parameters in the environment,
//! an exit code and an `ocf-exit-reason:` line.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_vmha-ocf-virtualmachine");

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(AGENT)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().copied())
        .output()
        .expect("run agent")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmha-bin-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[test]
fn meta_data_needs_no_environment() {
    let out = agent(&["meta-data", "ignored-extra"], &[]);
    assert_eq!(code(&out), 0);
    let xml = String::from_utf8(out.stdout).expect("utf-8");
    assert!(xml.starts_with("<?xml version=\"1.0\"?>\n<!DOCTYPE resource-agent SYSTEM \"ra-api-1.dtd\""));
    assert!(xml.contains("\n<resource-agent name=\"VirtualMachine\""));
    assert!(xml.contains("<version>1.1</version>"));
    assert!(xml.trim_end().ends_with("</resource-agent>"));
}

#[test]
fn usage_and_bad_invocations() {
    for arg in ["usage", "help"] {
        let out = agent(&[arg], &[]);
        assert_eq!(code(&out), 0, "{arg}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: VirtualMachine {start|"));
    }
    let none = agent(&[], &[]);
    assert_eq!(code(&none), 2);
    let unknown = agent(&["promote"], &[]);
    assert_eq!(code(&unknown), 3);
    assert!(stderr(&unknown).contains("ocf-exit-reason:promote: action not supported\n"));
}

#[test]
fn monitor_against_the_test_driver() {
    let running = agent(
        &["monitor"],
        &[
            ("OCF_RESKEY_hypervisor", "test:///default"),
            ("OCF_RESKEY_domain", "test"),
        ],
    );
    assert_eq!(code(&running), 0, "{}", stderr(&running));
    assert!(running.stderr.is_empty(), "a healthy monitor is silent");

    let status = agent(
        &["status"],
        &[
            ("OCF_RESKEY_hypervisor", "test:///default"),
            ("OCF_RESKEY_domain", "absent"),
        ],
    );
    assert_eq!(code(&status), 7);
}

#[test]
fn invalid_configuration_is_fatal_with_a_reason() {
    let out = agent(
        &["validate-all"],
        &[("OCF_RESKEY_domain", "web1"), ("OCF_RESKEY_shutdown_mode", "reset")],
    );
    assert_eq!(code(&out), 6);
    let reason = stderr(&out);
    let line = reason
        .lines()
        .find(|l| l.starts_with("ocf-exit-reason:"))
        .expect("exit reason");
    assert_eq!(
        line,
        "ocf-exit-reason:validate-all: parameter shutdown_mode=\"reset\" is invalid: \
         expected acpi, agent or both"
    );
}

#[test]
fn validate_without_libvirtd_checks_parameters_only() {
    let dir = scratch("validate");
    let config = dir.join("web1.xml");
    std::fs::write(&config, "<domain type='kvm'><name>web1</name></domain>").expect("write");
    let out = agent(
        &["validate-all"],
        &[
            (
                "OCF_RESKEY_hypervisor",
                "qemu+unix:///system?socket=/nonexistent/vmha.sock",
            ),
            ("OCF_RESKEY_config", config.to_str().expect("utf-8")),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// A libvirtd that accepts connections and never answers, like a SIGSTOPped one.
fn hung_daemon(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("hung.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            let mut reader = stream.try_clone().expect("clone");
            held.push(stream);
            // Swallow the request so the client is left waiting for a reply.
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    path
}

#[test]
fn a_hung_libvirtd_gives_an_error_before_the_timeout() {
    let dir = scratch("hung");
    let socket = hung_daemon(&dir);
    let uri = format!("qemu+unix:///system?socket={}", socket.display());
    for (action, timeout_ms, pending) in [
        ("monitor", 2000_u64, "virConnectOpenReadOnly"),
        ("stop", 3000, "virConnectOpen"),
        ("start", 3000, "virConnectOpen"),
    ] {
        let started = Instant::now();
        let out = agent(
            &[action],
            &[
                ("OCF_RESKEY_hypervisor", &uri),
                ("OCF_RESKEY_domain", "web1"),
                ("OCF_RESKEY_CRM_meta_timeout", &timeout_ms.to_string()),
                ("OCF_RESKEY_CRM_meta_interval", "10000"),
            ],
        );
        let took = started.elapsed();
        assert_eq!(code(&out), 1, "{action}: {}", stderr(&out));
        assert!(
            took < Duration::from_millis(timeout_ms),
            "{action} answered after {took:?}, beyond its {timeout_ms} ms timeout"
        );
        let reason = stderr(&out);
        assert!(
            reason.contains(&format!(
                "ocf-exit-reason:{action}: VM web1: no answer from libvirt within "
            )) && reason.contains(&format!("(pending call: {pending})")),
            "{action}: {reason}"
        );
    }
}

/// HA_debug, HA_LOGFILE, HA_DEBUGLOG and HA_LOGFACILITY send the agent's log lines where ocf-shellfuncs
/// sends a shell agent's.
#[test]
fn ha_debug_and_the_log_settings_are_honoured() {
    let test_driver = [
        ("OCF_RESKEY_hypervisor", "test:///default"),
        ("OCF_RESKEY_domain", "test"),
        ("OCF_RESOURCE_INSTANCE", "vm1"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut env = test_driver.to_vec();
        env.extend_from_slice(extra);
        env
    };

    // HA_debug=1: the monitor, silent otherwise, writes its debug lines to stderr.
    let quiet = agent(&["monitor"], &with(&[("HA_debug", "0")]));
    assert_eq!(code(&quiet), 0, "{}", stderr(&quiet));
    assert!(quiet.stderr.is_empty(), "HA_debug=0: {}", stderr(&quiet));
    let debug = agent(&["monitor"], &with(&[("HA_debug", "1")]));
    assert_eq!(code(&debug), 0, "{}", stderr(&debug));
    let err = stderr(&debug);
    assert!(
        err.contains("DEBUG") && err.contains("starting") && err.contains("action=\"monitor\""),
        "{err}"
    );
    assert!(err.contains("done") && err.contains("status=Success"), "{err}");

    // HA_DEBUGLOG takes the debug lines (stderr then has none); HA_LOGFILE alone takes no debug lines.
    let dir = scratch("ha-debug");
    let debuglog = dir.join("debug.log");
    let env: Vec<(&str, &str)> = test_driver
        .iter()
        .copied()
        .chain([("HA_debug", "1"), ("HA_DEBUGLOG", debuglog.to_str().unwrap())])
        .collect();
    let out = agent(&["monitor"], &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        out.stderr.is_empty(),
        "debug lines went to HA_DEBUGLOG: {}",
        stderr(&out)
    );
    let written = std::fs::read_to_string(&debuglog).unwrap();
    assert!(written.contains("DEBUG") && written.contains("starting"), "{written}");

    // A facility takes every line from stderr (syslog(3) drops them here if no syslog daemon listens).
    let out = agent(&["monitor"], &with(&[("HA_debug", "1"), ("HA_LOGFACILITY", "daemon")]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "lines went to syslog: {}", stderr(&out));
    let out = agent(&["monitor"], &with(&[("HA_debug", "1"), ("HA_LOGFACILITY", "none")]));
    assert!(
        stderr(&out).contains("starting"),
        "none: no syslog, stderr: {}",
        stderr(&out)
    );

    // The exit reason stays on stderr wherever the log lines go.
    let absent = agent(
        &["start"],
        &[
            ("OCF_RESKEY_hypervisor", "test:///default"),
            ("OCF_RESKEY_domain", "absent"),
            ("HA_LOGFACILITY", "daemon"),
        ],
    );
    assert_ne!(code(&absent), 0);
    assert!(stderr(&absent).contains("ocf-exit-reason:"), "{}", stderr(&absent));
    let _ = std::fs::remove_dir_all(&dir);
}
