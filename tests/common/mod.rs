//! Test harness: runs the real `gannet` binary on ephemeral loopback ports with a configuration
//! written into a temporary directory, and waits on its log lines (events, not sleeps).
#![allow(dead_code)]

pub mod dns;
pub mod sink;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_gannet");
/// How long a server may take to start (recovery, zero-filling segments) on a busy CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Test ports come from below the kernel's ephemeral range (32768 and up here), so that no
/// outbound connection can take a port as its source port while a test server is restarting,
/// and below relay-bench's default range (31000-31099).
const TEST_PORT_FIRST: u16 = 20000;
const TEST_PORT_COUNT: u16 = 11000;

/// A free loopback port, outside the ephemeral range (see above).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // A different starting point per test process, so that consecutive runs do not collide
    // with sockets the previous run left in TIME_WAIT.
    let seed = (std::process::id() as u16).wrapping_mul(7919) % TEST_PORT_COUNT;
    for _ in 0..TEST_PORT_COUNT {
        let offset = (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % TEST_PORT_COUNT;
        let port = TEST_PORT_FIRST + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free test port in {TEST_PORT_FIRST}..{}",
        TEST_PORT_FIRST + TEST_PORT_COUNT
    );
}

/// A configuration: sections of key = value lines, with test-friendly defaults.
#[derive(Clone)]
pub struct Setup {
    sections: Vec<(String, Vec<(String, String)>)>,
    routes: Vec<(String, Option<SocketAddr>)>,
    /// Extra TOML appended as is (array tables such as `[[destination]]`).
    raw: String,
    pub mx_port: u16,
    pub submission_port: u16,
    pub smtps_port: u16,
    pub admin_port: u16,
    /// Files the configuration names (password file, certificates), kept while the setup lives.
    pub files: Arc<tempfile::TempDir>,
    /// Extra environment for the server process.
    pub env: Vec<(String, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup::new()
    }
}

impl Setup {
    pub fn new() -> Setup {
        let mut s = Setup {
            sections: Vec::new(),
            routes: Vec::new(),
            raw: String::new(),
            mx_port: free_port(),
            submission_port: free_port(),
            smtps_port: free_port(),
            admin_port: free_port(),
            files: Arc::new(tempfile::tempdir().unwrap()),
            env: Vec::new(),
        };
        s.set("server", "hostname", "\"mx.test\"");
        s.set("server", "shards", "1");
        s.set("server", "io_memory", "\"256KiB\"");
        s.set("server", "shutdown_timeout", "\"10s\"");
        // Tests run as root in CI; a configuration file must then say so (docs/service.md).
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            s.set("server", "user", "\"root\"");
        }
        s.set("spool", "segment_size", "\"4MiB\"");
        s.set("spool", "size_max", "\"1GiB\"");
        s.set("spool", "min_free", "\"0B\"");
        s.set("spool", "memory_max", "\"16MiB\"");
        s.set("limits", "message_size_max", "\"1MiB\"");
        let admin = format!("\"127.0.0.1:{}\"", s.admin_port);
        s.set("admin", "address", &admin);
        s
    }

    /// Sets `key = value` (value in TOML syntax) in `[section]`.
    pub fn set(&mut self, section: &str, key: &str, value: &str) -> &mut Setup {
        let idx = match self.sections.iter().position(|(name, _)| name == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[idx].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => keys.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// Adds a `[[route]]`: mail for `domain` ("*" for all) goes to `smarthost`.
    pub fn route(&mut self, domain: &str, smarthost: SocketAddr) -> &mut Setup {
        self.routes.push((domain.to_string(), Some(smarthost)));
        self
    }

    /// Appends raw TOML (array tables).
    pub fn raw(&mut self, toml: &str) -> &mut Setup {
        self.raw.push_str(toml);
        self.raw.push('\n');
        self
    }

    /// Adds a `[[route]]` with `mx = true` for `domain`.
    pub fn mx_route(&mut self, domain: &str) -> &mut Setup {
        self.routes.push((domain.to_string(), None));
        self
    }

    /// Writes a password file with these (user, password) pairs, each line made by
    /// `gannet passwd`, and points `auth.password_file` at it.
    pub fn users(&mut self, users: &[(&str, &str)]) -> &mut Setup {
        let mut text = String::from("# made by the test with gannet passwd\n");
        for (user, password) in users {
            text.push_str(&password_line(user, password, None));
        }
        let path = self.files.path().join("users");
        std::fs::write(&path, text).unwrap();
        self.set("auth", "password_file", &format!("{:?}", path.display().to_string()))
    }

    pub fn shards(&mut self, n: usize) -> &mut Setup {
        self.set("server", "shards", &n.to_string())
    }

    pub fn toml(&self, spool_dir: &Path) -> String {
        let mut text = String::new();
        for (name, keys) in &self.sections {
            text.push_str(&format!("[{name}]\n"));
            for (k, v) in keys {
                text.push_str(&format!("{k} = {v}\n"));
            }
            if name == "spool" {
                text.push_str(&format!("directory = {:?}\n", spool_dir.display().to_string()));
            }
            text.push('\n');
        }
        if !self.sections.iter().any(|(n, _)| n == "spool") {
            text.push_str(&format!(
                "[spool]\ndirectory = {:?}\n\n",
                spool_dir.display().to_string()
            ));
        }
        for (domain, smarthost) in &self.routes {
            match smarthost {
                Some(addr) => text.push_str(&format!("[[route]]\ndomain = {domain:?}\nsmarthost = \"{addr}\"\n\n")),
                None => text.push_str(&format!("[[route]]\ndomain = {domain:?}\nmx = true\n\n")),
            }
        }
        text.push_str(&self.raw);
        text.push_str(&format!(
            "[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"mx\"\n\n[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"submission\"\n\n[[listener]]\naddress = \"127.0.0.1:{}\"\nkind = \"smtps\"\n",
            self.mx_port, self.submission_port, self.smtps_port
        ));
        text
    }
}

/// One password-file line from `gannet passwd USER [--addresses LIST]`, password on stdin.
pub fn password_line(user: &str, password: &str, addresses: Option<&str>) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("passwd").arg(user);
    if let Some(list) = addresses {
        cmd.arg("--addresses").arg(list);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "gannet passwd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with(&format!("{user}:$argon2id$")), "{line}");
    line
}

type LogLines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A running gannet process.
pub struct Gannet {
    child: Option<Child>,
    pub dir: Arc<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub spool_dir: PathBuf,
    pub setup: Setup,
    log: LogLines,
}

impl Gannet {
    pub fn start(setup: &Setup) -> Gannet {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Gannet::start_in(setup, dir)
    }

    /// Starts on an existing directory (and so an existing spool): a restart.
    pub fn start_in(setup: &Setup, dir: Arc<tempfile::TempDir>) -> Gannet {
        let g = Gannet::spawn(setup, dir);
        let ready = g.wait_for_log("ready:", START_TIMEOUT);
        assert!(ready, "gannet did not become ready; log:\n{}", g.log_text());
        g
    }

    /// Stops this process if it still runs (SIGKILL) and starts a new one on the same spool.
    pub fn restart(mut self) -> Gannet {
        self.kill();
        let (setup, dir) = (self.setup.clone(), self.dir.clone());
        drop(self);
        Gannet::start_in(&setup, dir)
    }

    /// Starts without waiting for readiness.
    pub fn spawn(setup: &Setup, dir: Arc<tempfile::TempDir>) -> Gannet {
        let spool_dir = dir.path().join("spool");
        let config_path = dir.path().join("gannet.toml");
        std::fs::write(&config_path, setup.toml(&spool_dir)).unwrap();
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .env("GANNET_LOG", "info,glommio::reactor=off")
            .envs(setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gannet");
        let log: LogLines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lines, cv) = &*sink;
                lines.lock().unwrap().push(line);
                cv.notify_all();
            }
            let (lines, cv) = &*sink;
            lines.lock().unwrap().push("<eof>".into());
            cv.notify_all();
        });
        Gannet {
            child: Some(child),
            dir,
            config_path,
            spool_dir,
            setup: setup.clone(),
            log,
        }
    }

    pub fn mx(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.setup.mx_port))
    }

    pub fn submission(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.setup.submission_port))
    }

    pub fn smtps(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.setup.smtps_port))
    }

    /// The admin API's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.setup.admin_port)
    }

    /// An HTTP request to the admin API with curl: (status, body). `extra`: more curl arguments.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>, extra: &[&str]) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "-X", method, "-w", "\n%{http_code}"]);
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", body]);
        }
        cmd.args(extra).arg(format!("{}{path}", self.admin_url()));
        let out = cmd.output().expect("curl");
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, status) = text.rsplit_once('\n').unwrap();
        (status.trim().parse().unwrap(), body.to_string())
    }

    /// The value of one sample in the server's metrics, `key` being the family and labels as
    /// exposed (0 when absent).
    pub fn metric(&self, key: &str) -> f64 {
        let (status, text) = self.http("GET", "/metrics", None, &[]);
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits until a log line contains `needle` (true), or the process ends / time runs out.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout)
    }

    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.log;
        let mut guard = lines.lock().unwrap();
        loop {
            if guard.iter().filter(|l| l.contains(needle)).count() >= count {
                return true;
            }
            if guard.last().is_some_and(|l| l == "<eof>") {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = cv.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    pub fn log_text(&self) -> String {
        self.log.0.lock().unwrap().join("\n")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY (test): kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    pub fn wait(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gannet did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `gannet <args> --config <ours>` and returns its output.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .unwrap()
    }

    /// The ids in `gannet queue list`.
    pub fn queued_ids(&self) -> Vec<String> {
        let out = self.command(&["queue", "list"]);
        assert!(
            out.status.success(),
            "queue list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.ends_with(&format!("message(s) in {}", self.spool_dir.display())))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// The stored content of a message (our Received header, then the client's bytes).
    pub fn stored(&self, id: &str) -> Vec<u8> {
        let out = self.command(&["queue", "show", id]);
        assert!(
            out.status.success(),
            "queue show {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Gannet {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The client's bytes of a stored message: what follows our Received header.
pub fn without_received(stored: &[u8]) -> &[u8] {
    assert!(stored.starts_with(b"Received: from "), "no Received header first");
    let mut pos = 0;
    loop {
        let lf = stored[pos..].iter().position(|&b| b == b'\n').expect("header ends") + pos;
        pos = lf + 1;
        if stored.get(pos) != Some(&b'\t') {
            return &stored[pos..];
        }
    }
}

/// The id in a `250 2.0.0 Ok: queued as <id>` reply.
pub fn queued_id(reply: &str) -> Option<String> {
    reply.split("queued as ").nth(1).map(|s| s.trim().to_string())
}

/// A minimal raw SMTP connection for the byte-level tests (pipelining, BDAT, smuggling), where
/// no off-the-shelf client can send the exact bytes.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        Raw::connect_from(addr, None)
    }

    /// Connects from a given local address (127.0.0.2 is outside the default trusted network
    /// only if the test configures it so).
    pub fn connect_from(addr: SocketAddr, local: Option<&str>) -> Raw {
        let stream = match local {
            None => TcpStream::connect(addr).unwrap(),
            Some(ip) => {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                let local: SocketAddr = format!("{ip}:0").parse().unwrap();
                socket.bind(&local.into()).unwrap();
                socket.connect(&addr.into()).unwrap();
                socket.into()
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one complete reply (all its lines); None at EOF.
    pub fn reply(&mut self) -> Option<String> {
        let mut lines = String::new();
        loop {
            let line = self.line()?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push_str(&line);
            if last {
                return Some(lines);
            }
        }
    }

    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=lf).collect();
                return Some(String::from_utf8(line).unwrap());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends a command and returns its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply().expect("a reply")
    }

    /// Sends a command; None if the connection closed instead of replying.
    pub fn cmd_opt(&mut self, line: &str) -> Option<String> {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Reads the greeting and says EHLO.
    pub fn hello(&mut self) {
        let greeting = self.reply().unwrap();
        assert!(greeting.starts_with("220 "), "{greeting}");
        let ehlo = self.cmd("EHLO client.test");
        assert!(ehlo.starts_with("250-"), "{ehlo}");
    }

    /// True when the server closed the connection (EOF with nothing more).
    pub fn closed(&mut self) -> bool {
        self.reply().is_none()
    }
}

/// Sends one message on a new connection (EHLO, MAIL, RCPT for each of `to`, DATA), checking
/// every reply; returns the id of the `250 ... queued as` reply.
pub fn send_message(server: SocketAddr, from: &str, to: &[&str], content: &str) -> String {
    let mut c = Raw::connect(server);
    c.hello();
    assert!(c.cmd(&format!("MAIL FROM:<{from}>")).starts_with("250"));
    for rcpt in to {
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(content.as_bytes());
    let reply = c.cmd(".");
    queued_id(&reply).unwrap_or_else(|| panic!("not queued: {reply}"))
}

/// Runs a Python 3 script with arguments; panics with its output if it fails.
pub fn python(script: &str, args: &[&str]) -> String {
    String::from_utf8(python_bytes(script, args)).unwrap()
}

/// Like [`python`], for scripts that print bytes.
pub fn python_bytes(script: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Starts Postfix's smtp-sink on 127.0.0.1:`port` with `flags` (its stdout piped: `-c` counts
/// there).
pub fn smtp_sink(port: u16, flags: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(tool("smtp-sink"));
    // SAFETY (test): geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.args(["-u", "nobody"]);
    }
    cmd.args(flags)
        .arg(format!("127.0.0.1:{port}"))
        .arg("100")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Finds a Postfix/swaks tool: on PATH or in /usr/sbin.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed; run scripts/test (it installs postfix and swaks)");
}

/// The lines a child writes to stderr, as they come (the child must have `Stdio::piped()`).
pub fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns it, or None after `timeout` of silence or at
/// the end. Every line read is appended to `log`.
pub fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
    log: &mut String,
) -> Option<String> {
    while let Ok(line) = lines.recv_timeout(timeout) {
        log.push_str(&line);
        log.push('\n');
        if line.contains(needle) {
            return Some(line);
        }
    }
    None
}

/// The fields of a /proc/PID[/task/TID]/status file, values with their whitespace collapsed.
pub fn proc_status(path: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

/// Every thread of `pid` runs as `uid`/`gid` with no capability of any kind.
pub fn assert_unprivileged(pid: i32, uid: u32, gid: u32) {
    let ids = |id: u32| format!("{id} {id} {id} {id}");
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = proc_status(&task.unwrap().path().join("status"));
        let name = status.get("Name").cloned().unwrap_or_default();
        assert_eq!(status.get("Uid"), Some(&ids(uid)), "thread {name}: {status:?}");
        assert_eq!(status.get("Gid"), Some(&ids(gid)), "thread {name}: {status:?}");
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(
                status.get(set).map(String::as_str),
                Some("0000000000000000"),
                "thread {name} {set}: {status:?}"
            );
        }
        assert_eq!(status.get("NoNewPrivs").map(String::as_str), Some("1"), "thread {name}");
        threads += 1;
    }
    assert!(threads >= 2, "the server and its shard threads");
}

/// An HTTP receiver for the event webhook: answers 500 to the first N posts, then prints every
/// event of every batch as a JSON line.
const EVENT_RECEIVER: &str = r#"
import http.server, json, sys
port, fails = int(sys.argv[1]), [int(sys.argv[2])]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if fails[0] > 0:
            fails[0] -= 1
            self.send_response(500); self.end_headers()
            print("FAILED", flush=True)
            return
        for e in json.loads(body)["events"]:
            print(json.dumps(e), flush=True)
        self.send_response(204); self.end_headers()
    def log_message(self, *args):
        pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
print("READY", flush=True)
srv.serve_forever()
"#;

/// Starts [`EVENT_RECEIVER`] on a free port, failing the first `fails` posts: the process, its
/// lines (after READY), and the port.
pub fn event_receiver(fails: usize) -> (Child, std::sync::mpsc::Receiver<String>, u16) {
    let port = free_port();
    let mut receiver = Command::new("python3")
        .args(["-c", EVENT_RECEIVER, &port.to_string(), &fails.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = receiver.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), "READY");
    (receiver, rx, port)
}
