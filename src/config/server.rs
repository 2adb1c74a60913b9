//! `[server]`: the host name, shards, shutdown and per-shard I/O settings, and host-name checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::{ByteSize, Span};

/// The range of `server.sched_slice` Linux accepts (it clamps anything else).
const SCHED_SLICE_MIN: Duration = Duration::from_micros(100);
const SCHED_SLICE_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Name in the greeting, EHLO reply and Received headers. Default: the system's host name.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// "auto" (one per CPU this process may run on) or a number.
    #[serde(default)]
    pub shards: Shards,
    /// On SIGTERM/SIGINT, how long transactions in flight may take before they are cut off.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Span,
    /// io_uring registered buffer memory per shard (locked memory: see tuning/).
    #[serde(default = "default_io_memory")]
    pub io_memory: ByteSize,
    /// How long an idle shard spins before it sleeps: less wake-up latency and fewer context
    /// switches under load, for CPU burnt while idle. "0s" (the default) sleeps at once.
    #[serde(default = "default_spin_before_park")]
    pub spin_before_park: Span,
    /// The scheduler time slice each shard thread asks for (Linux 6.12+, EEVDF's custom slice);
    /// "0s" keeps the kernel's default. See docs/config.md for why it is short by default.
    #[serde(default = "default_sched_slice")]
    pub sched_slice: Span,
    /// The user to run as once the listeners are bound and the spool is open, when started as
    /// root (`crate::server::privileges`). Started as root without it, Gannet refuses to serve;
    /// "root" keeps root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The group to run as with `user`. Default: that user's primary group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shards {
    #[default]
    Auto,
    Count(usize),
}

impl Serialize for Shards {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Shards::Auto => s.serialize_str("auto"),
            Shards::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Shards, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        const HINT: &str = "write \"auto\" (one shard per CPU) or a number of shards such as 2";
        match Raw::deserialize(d)? {
            Raw::Number(n) if n >= 1 => Ok(Shards::Count(n as usize)),
            Raw::Number(n) => Err(serde::de::Error::custom(format!("{n} shards is not possible; {HINT}"))),
            Raw::Text(t) if t == "auto" => Ok(Shards::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("`{t}` is not a shard count; {HINT}"))),
        }
    }
}

fn default_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own. Exercised by
    // every test that starts the binary on the embedded default.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && valid_hostname(name) => name.to_string(),
        _ => "localhost".to_string(),
    }
}

pub(super) fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A name `getpwnam`/`getgrnam` can look up: what useradd accepts (letters, digits, `_`, `-`, `.`,
/// not starting with `-`), at most 32 bytes.
fn valid_account_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn default_shutdown_timeout() -> Span {
    Span(Duration::from_secs(30))
}
fn default_spin_before_park() -> Span {
    Span(Duration::ZERO)
}
fn default_sched_slice() -> Span {
    Span(Duration::from_micros(300))
}
fn default_io_memory() -> ByteSize {
    ByteSize(1 << 20)
}

impl Default for Server {
    fn default() -> Server {
        Server {
            hostname: default_hostname(),
            shards: Shards::Auto,
            shutdown_timeout: default_shutdown_timeout(),
            io_memory: default_io_memory(),
            spin_before_park: default_spin_before_park(),
            sched_slice: default_sched_slice(),
            user: None,
            group: None,
        }
    }
}

/// Checks `[server]`.
pub(super) fn validate(server: &Server, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if !valid_hostname(&server.hostname) {
        return Err(fail(
            "server",
            0,
            "hostname",
            format!(
                "`{}` is not a host name; write a fully qualified name such as \"mx.example.com\"",
                server.hostname
            ),
        ));
    }
    if server.shutdown_timeout.0.is_zero() {
        return Err(fail(
            "server",
            0,
            "shutdown_timeout",
            "must be more than zero, such as \"30s\"".into(),
        ));
    }
    let slice = server.sched_slice.0;
    if !slice.is_zero() && !(SCHED_SLICE_MIN..=SCHED_SLICE_MAX).contains(&slice) {
        return Err(fail(
            "server",
            0,
            "sched_slice",
            "must be \"0s\" (the kernel's default) or between \"100us\" and \"100ms\", the range Linux accepts".into(),
        ));
    }
    for (key, name) in [("user", &server.user), ("group", &server.group)] {
        if let Some(name) = name {
            if !valid_account_name(name) {
                return Err(fail(
                    "server",
                    0,
                    key,
                    format!("`{name}` is not a user or group name; write a name such as \"gannet\""),
                ));
            }
        }
    }
    if server.group.is_some() && server.user.is_none() {
        return Err(fail(
            "server",
            0,
            "group",
            "is set without server.user; set server.user too, or remove server.group".into(),
        ));
    }
    if server.io_memory.0 < 64 * 1024 {
        return Err(fail("server", 0, "io_memory", "must be at least \"64KiB\"".into()));
    }
    Ok(())
}
