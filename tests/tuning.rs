//! tuning/check, the host check script: its JSON report must agree with what this test reads
//! itself (/proc/sys, getrlimit, sysfs, /proc/self/mountinfo, statfs), its exit code with its
//! verdict, and its text report with its JSON one; a usage error exits 2.
//!
//! The script runs with `--pid self`, so it reports the limits of its own process, which inherits
//! this test process's limits even while `gannet` processes of other tests are running.

use serde_json::Value;
use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The sysctls tuning/sysctl.d/90-gannet.conf sets (fs.file-max is checked but not set there).
const IN_SYSCTL_FILE: &[&str] = &[
    "net.ipv4.ip_local_port_range",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_fin_timeout",
];

/// The checks every report has (NIC checks vary with the host and are named `nic.*`).
const EXPECTED_CHECKS: &[&str] = &[
    "net.ipv4.ip_local_port_range",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_fin_timeout",
    "fs.file-max",
    "fs.nr_open",
    "kernel.io_uring_disabled",
    "kernel.osrelease",
    "rlimit.memlock",
    "rlimit.nofile",
    "thp.enabled",
    "spool.filesystem",
    "spool.mount_options",
    "spool.disk_scheduler",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning").join("check")
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn run_check(args: &[&str]) -> Output {
    Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .expect("run tuning/check with python3")
}

/// A spool directory of its own under the system's temporary directory, removed on drop.
struct TempSpool(PathBuf);

impl TempSpool {
    fn new(tag: &str) -> TempSpool {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "gannet-tuning-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&dir).expect("create the test's spool directory");
        TempSpool(dir)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("temporary directory path is UTF-8")
    }
}

impl Drop for TempSpool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `tuning/check --json --pid self --spool SPOOL` plus `extra`; returns the report and exit code.
fn report(spool: &TempSpool, extra: &[&str]) -> (Value, i32) {
    let mut args = vec!["--json", "--pid", "self", "--spool", spool.arg()];
    args.extend_from_slice(extra);
    let output = run_check(&args);
    let code = output.status.code().expect("tuning/check exited by a signal");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.trim().is_empty(), "tuning/check wrote to stderr: {stderr}");
    let document: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "tuning/check --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    (document, code)
}

fn checks(document: &Value) -> &Vec<Value> {
    document["checks"].as_array().expect("\"checks\" is an array")
}

fn check<'a>(document: &'a Value, name: &str) -> &'a Value {
    checks(document)
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no check named {name} in {document}"))
}

fn text_field<'a>(check: &'a Value, key: &str) -> &'a str {
    check[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} of {check} is not a string"))
}

fn found<'a>(document: &'a Value, name: &str) -> &'a str {
    text_field(check(document, name), "found")
}

fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

/// What the script must report for a sysctl, read here independently.
fn expected_sysctl(name: &str) -> String {
    let path = sysctl_path(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => normalise(&text),
        Err(_) if name == "kernel.io_uring_disabled" && !path.exists() => "absent".to_string(),
        Err(_) => "unreadable".to_string(),
    }
}

fn rlimit_text(value: libc::rlim_t) -> String {
    if value == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        value.to_string()
    }
}

/// "soft=S hard=H" for this process, from getrlimit.
fn own_limit(which: libc::__rlimit_resource_t) -> String {
    // SAFETY: getrlimit writes into the rlimit struct we own and pass by pointer.
    let limit = unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(which, &mut limit), 0, "getrlimit failed");
        limit
    };
    format!(
        "soft={} hard={}",
        rlimit_text(limit.rlim_cur),
        rlimit_text(limit.rlim_max)
    )
}

/// Decodes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            i + 4 <= bytes.len() && bytes[i] == b'\\' && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b));
        if octal {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).expect("octal digits are ASCII");
            out.push(u32::from_str_radix(digits, 8).expect("octal digits") as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The type of the file system holding `path`: the mount with the longest mount point that is a
/// prefix of it (the later one in /proc/self/mountinfo when two share a mount point).
fn filesystem_type(path: &Path) -> String {
    let path = path.to_str().expect("path is UTF-8");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let mut best: Option<(String, String)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split_whitespace().collect();
        let Some(fstype) = right.split_whitespace().next() else {
            continue;
        };
        if left.len() < 5 {
            continue;
        }
        let point = unescape_mount(left[4]);
        let holds = point == "/" || path == point || path.starts_with(&format!("{}/", point.trim_end_matches('/')));
        if holds && best.as_ref().is_none_or(|(longest, _)| point.len() >= longest.len()) {
            best = Some((point, fstype.to_string()));
        }
    }
    best.expect("some mount holds the path").1
}

/// The file system's magic number from statfs(2), a reading independent of mountinfo.
fn statfs_magic(path: &Path) -> i64 {
    let c_path = CString::new(path.to_str().expect("path is UTF-8")).expect("no NUL in path");
    // SAFETY: statfs writes into the struct we own; c_path is a valid NUL-terminated string.
    unsafe {
        let mut buffer: libc::statfs = std::mem::zeroed();
        assert_eq!(libc::statfs(c_path.as_ptr(), &mut buffer), 0, "statfs failed");
        buffer.f_type as i64
    }
}

/// The file system types statfs's magic number allows, for the common ones (None: not known here).
fn types_for_magic(magic: i64) -> Option<&'static [&'static str]> {
    match magic {
        0xEF53 => Some(&["ext2", "ext3", "ext4"]),
        0x5846_5342 => Some(&["xfs"]),
        0x0102_1994 => Some(&["tmpfs"]),
        0x9123_683E => Some(&["btrfs"]),
        0x794C_7630 => Some(&["overlay"]),
        _ => None,
    }
}

fn gannet_process_running() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .any(|entry| std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|comm| comm.trim() == "gannet"))
}

/// The block of the text report that belongs to one check (from its "[...] name" line to the
/// blank line after it).
fn text_block<'a>(text: &'a str, name: &str) -> &'a str {
    let header = format!("] {name}\n");
    let start = text
        .find(&header)
        .unwrap_or_else(|| panic!("no block for {name} in the text report:\n{text}"));
    let rest = &text[start..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

#[test]
fn exit_code_and_verdicts_agree() {
    let spool = TempSpool::new("verdict");
    let (document, code) = report(&spool, &[]);
    let all_ok = checks(&document)
        .iter()
        .all(|check| check["ok"].as_bool().expect("every check's ok is a boolean"));
    let ok = document["ok"].as_bool().expect("\"ok\" is a boolean");
    assert_eq!(ok, all_ok, "\"ok\" must be true iff every check is ok: {document}");
    assert_eq!(code, if ok { 0 } else { 1 }, "exit code for ok = {ok}");
}

#[test]
fn every_check_is_complete_and_named_once() {
    let spool = TempSpool::new("names");
    let (document, _) = report(&spool, &[]);
    let mut names = HashSet::new();
    for check in checks(&document) {
        for key in ["name", "found", "recommended", "why", "fix"] {
            assert!(!text_field(check, key).is_empty(), "{key} of {check} is empty");
        }
        assert!(check["ok"].is_boolean(), "ok of {check} is not a boolean");
        assert!(
            names.insert(text_field(check, "name").to_string()),
            "{check} appears twice"
        );
    }
    for name in EXPECTED_CHECKS {
        assert!(names.contains(*name), "the report has no {name} check: {document}");
    }
    assert!(
        names.iter().any(|name| name.starts_with("nic.")),
        "no NIC check: {document}"
    );
}

#[test]
fn sysctls_match_proc_sys() {
    let spool = TempSpool::new("sysctl");
    let (document, _) = report(&spool, &[]);
    let mut compared = 0;
    for check in checks(&document) {
        let name = text_field(check, "name");
        if !(name.starts_with("net.") || name.starts_with("fs.") || name.starts_with("kernel.")) {
            continue;
        }
        assert_eq!(
            normalise(text_field(check, "found")),
            expected_sysctl(name),
            "{name} as tuning/check read it vs {}",
            sysctl_path(name).display()
        );
        compared += 1;
    }
    assert!(compared >= 10, "only {compared} sysctl checks in {document}");
}

#[test]
fn io_uring_switch_and_kernel_release_match() {
    let spool = TempSpool::new("kernel");
    let (document, _) = report(&spool, &[]);
    let switch = check(&document, "kernel.io_uring_disabled");
    let path = sysctl_path("kernel.io_uring_disabled");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            assert_eq!(text_field(switch, "found"), text.trim());
            if text.trim() == "0" {
                assert_eq!(switch["ok"], true, "io_uring_disabled = 0 is as recommended");
            }
        }
        Err(_) if !path.exists() => {
            assert_eq!(text_field(switch, "found"), "absent");
            assert_eq!(switch["ok"], true, "an absent switch means io_uring is allowed");
        }
        Err(_) => assert_eq!(text_field(switch, "found"), "unreadable"),
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("read osrelease");
    assert_eq!(found(&document, "kernel.osrelease"), release.trim());
}

#[test]
fn limits_are_those_of_the_test_process() {
    let spool = TempSpool::new("limits");
    let memlock = own_limit(libc::RLIMIT_MEMLOCK);
    let nofile = own_limit(libc::RLIMIT_NOFILE);
    let (document, _) = report(&spool, &[]);
    assert_eq!(
        found(&document, "rlimit.memlock"),
        memlock,
        "--pid self: the script's own limits are ours"
    );
    assert_eq!(found(&document, "rlimit.nofile"), nofile);

    // Without --pid the script looks for a running gannet first; compare only if none runs
    // (other tests start gannet processes) before and after the run.
    if gannet_process_running() {
        eprintln!("a gannet process is running: default-limits comparison skipped");
        return;
    }
    let output = run_check(&["--json", "--spool", spool.arg()]);
    if gannet_process_running() {
        eprintln!("a gannet process started meanwhile: default-limits comparison skipped");
        return;
    }
    let document: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(found(&document, "rlimit.memlock"), memlock);
    assert_eq!(found(&document, "rlimit.nofile"), nofile);
    let why = text_field(check(&document, "rlimit.memlock"), "why");
    assert!(
        why.contains("own process"),
        "the why must say whose limits these are: {why}"
    );
}

#[test]
fn transparent_huge_pages_match_sysfs() {
    let spool = TempSpool::new("thp");
    let (document, _) = report(&spool, &[]);
    let reported = found(&document, "thp.enabled");
    match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled") {
        Ok(text) => {
            let selected = text
                .split_whitespace()
                .find(|word| word.starts_with('[') && word.ends_with(']'))
                .map(|word| word.trim_matches(|c| c == '[' || c == ']'))
                .unwrap_or_else(|| text.trim());
            assert_eq!(reported, selected, "THP mode, from {text:?}");
        }
        Err(_) => assert!(
            reported == "absent" || reported == "unreadable",
            "THP file unreadable here, script says {reported}"
        ),
    }
}

#[test]
fn spool_filesystem_matches_mountinfo_and_statfs() {
    let spool = TempSpool::new("fs");
    let (document, _) = report(&spool, &[]);
    let real = std::fs::canonicalize(&spool.0).expect("canonicalize the spool");
    let reported = found(&document, "spool.filesystem");
    assert_eq!(reported, filesystem_type(&real), "file system of {}", real.display());
    if let Some(types) = types_for_magic(statfs_magic(&real)) {
        assert!(
            types.contains(&reported),
            "statfs says one of {types:?}, the script {reported}"
        );
    }

    // A spool that does not exist yet is checked where it would be created.
    let not_yet = spool.0.join("not").join("yet");
    let (document, _) = report(&spool, &["--spool", not_yet.to_str().expect("UTF-8 path")]);
    assert_eq!(found(&document, "spool.filesystem"), filesystem_type(&real));
}

#[test]
fn sysctl_file_and_report_agree() {
    let spool = TempSpool::new("conf");
    let (document, _) = report(&spool, &[]);
    let conf_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/sysctl.d/90-gannet.conf");
    let conf = std::fs::read_to_string(&conf_path).expect("read tuning/sysctl.d/90-gannet.conf");
    let mut settings = HashSet::new();
    for line in conf.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("sysctl.d lines are key = value");
        let key = key.trim().trim_start_matches('-');
        let recommended = text_field(check(&document, key), "recommended");
        assert!(
            recommended.contains(&normalise(value)),
            "{key}: the file sets {value:?}, the report recommends {recommended:?}"
        );
        settings.insert(key.to_string());
    }
    for name in IN_SYSCTL_FILE {
        assert!(settings.contains(*name), "90-gannet.conf does not set {name}");
    }
}

#[test]
fn text_report_shows_found_recommended_and_fix() {
    let spool = TempSpool::new("text");
    let (document, json_code) = report(&spool, &[]);
    let output = run_check(&["--pid", "self", "--spool", spool.arg()]);
    let text = String::from_utf8(output.stdout).expect("text report is UTF-8");
    assert_eq!(
        output.status.code(),
        Some(json_code),
        "text and JSON runs agree on the exit code"
    );
    for name in ["net.core.somaxconn", "rlimit.nofile", "spool.filesystem"] {
        let wanted = check(&document, name);
        let block = text_block(&text, name);
        for key in ["found", "recommended", "fix"] {
            let value = text_field(wanted, key);
            assert!(
                block.contains(value),
                "the text block of {name} lacks its {key} {value:?}:\n{block}"
            );
        }
    }
    let summary = text.lines().rev().find(|line| !line.is_empty()).unwrap_or("");
    assert!(summary.starts_with("Summary: "), "last line: {summary:?}");
}

#[test]
fn unknown_option_is_a_usage_error() {
    let output = run_check(&["--no-such-option"]);
    assert_eq!(output.status.code(), Some(2), "an unknown option exits 2");
    assert!(output.stdout.is_empty(), "nothing on stdout for a usage error");
    assert!(!output.stderr.is_empty(), "the usage error is explained on stderr");
}

#[test]
fn runs_through_its_shebang() {
    let spool = TempSpool::new("shebang");
    let output = Command::new(script())
        .args(["--json", "--pid", "self", "--spool", spool.arg()])
        .output()
        .expect("tuning/check is executable");
    let code = output.status.code().expect("exited normally");
    assert!(code == 0 || code == 1, "exit code {code}");
    let document: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(document["ok"].as_bool(), Some(code == 0));
}
