//! Configuration: a TOML file, or the embedded default (`src/default.toml`).
//!
//! Every key has a default, so a file names only what it changes. Unknown keys, bad values and
//! impossible combinations are refused before anything starts, with the file, the line, the key,
//! and what to write instead. `docs/config.md` is the reference.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{Network, RelayPolicy};
use crate::smtp::data::BareLineEndings;
use crate::smtp::deadline::Timeouts;
use crate::smtp::session::SessionConfig;
use crate::spool::appender::SEGMENT_FILL_CHUNK_BYTES;
use crate::spool::record::message_record_bytes_max;
use crate::spool::Durability;
use crate::units::{ByteSize, Span};
use gannet_sched::backoff::RetrySchedule;
use gannet_sched::{Route as SchedRoute, RouteTarget as SchedTarget, SchedConfig, SiteRule};

/// The configuration Gannet serves with when no `--config` is given.
pub const DEFAULT_TOML: &str = include_str!("default.toml");
/// The range of `server.sched_slice` Linux accepts (it clamps anything else).
const SCHED_SLICE_MIN: Duration = Duration::from_micros(100);
const SCHED_SLICE_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default = "default_listeners", rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub spool: Spool,
    #[serde(default)]
    pub relay: Relay,
    #[serde(default)]
    pub smtp: Smtp,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub delivery: Delivery,
    /// Where mail for each domain goes; the first exact match wins, then "*".
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
    /// Receiver-specific limits: the first matching rule applies to a destination.
    #[serde(default, rename = "destination")]
    pub destinations: Vec<DestinationLimits>,
}

/// Limits for the destinations a rule matches (per shard, like the defaults they replace).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationLimits {
    /// A smarthost `IP:port`, a recipient domain (`example.com`), or `*.example.com` for the
    /// domain's subdomains, or `*` for everything.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Instead of `delivery.connections_per_destination_max` (process-wide, split across shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    /// Instead of `delivery.messages_per_connection_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_connection_max: Option<usize>,
    /// At most this many messages per second to the destination (per shard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<f64>,
}

impl DestinationLimits {
    /// Whether this rule covers a destination named `name` (an `IP:port` or a domain).
    pub fn matches(&self, name: &str) -> bool {
        gannet_sched::site::pattern_matches(&self.pattern, name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Recursive DNS servers (`IP:port`). Empty: the `nameserver` lines of /etc/resolv.conf.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// How long to wait for one server's answer.
    #[serde(default = "default_dns_timeout")]
    pub timeout: Span,
    /// Rounds over all servers before a lookup fails (temporarily).
    #[serde(default = "default_dns_attempts")]
    pub attempts: usize,
    /// Entries in the cache shared by all shards.
    #[serde(default = "default_dns_cache_entries_max")]
    pub cache_entries_max: usize,
    /// Answers are kept at least this long, whatever their TTL...
    #[serde(default = "default_dns_ttl_min")]
    pub ttl_min: Span,
    /// ...and at most this long.
    #[serde(default = "default_dns_ttl_max")]
    pub ttl_max: Span,
    /// NXDOMAIN/NODATA are kept for the SOA minimum (RFC 2308), at most this long.
    #[serde(default = "default_dns_negative_ttl_max")]
    pub negative_ttl_max: Span,
    /// A server failure or timeout is remembered this long, so that a dead server is not asked
    /// again for every message.
    #[serde(default = "default_dns_failure_ttl")]
    pub failure_ttl: Span,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// Name sent in EHLO. Default: `server.hostname`.
    #[serde(default)]
    pub helo_name: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Span,
    /// Waiting for the greeting, and for the reply to each command (RFC 5321 4.5.3.2: 5 minutes).
    #[serde(default = "default_reply_timeout")]
    pub reply_timeout: Span,
    /// Waiting for the reply after the final dot (RFC 5321: 10 minutes).
    #[serde(default = "default_final_reply_timeout")]
    pub final_reply_timeout: Span,
    /// Concurrent connections per destination, for the whole process: each shard gets an equal
    /// share (rounded up).
    #[serde(default = "default_connections_per_destination_max")]
    pub connections_per_destination_max: usize,
    /// Concurrent delivering connections per shard, over all destinations.
    #[serde(default = "default_connections_per_shard_max")]
    pub connections_per_shard_max: usize,
    /// Concurrent connections to one receiving IP address, for the whole process, over all
    /// destinations (each shard gets an equal share, rounded up).
    #[serde(default = "default_connections_per_ip_max")]
    pub connections_per_ip_max: usize,
    /// Receiving sites each shard keeps track of; idle ones beyond it are forgotten (their
    /// pooled connections closed), least recently active first.
    #[serde(default = "default_destinations_max")]
    pub destinations_max: usize,
    #[serde(default = "default_messages_per_connection_max")]
    pub messages_per_connection_max: usize,
    /// How long an idle outbound connection is kept for reuse.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Span,
    /// First retry after a temporary failure; each further one waits twice as long (with
    /// jitter), up to `retry_max`.
    #[serde(default = "default_retry_first")]
    pub retry_first: Span,
    #[serde(default = "default_retry_max")]
    pub retry_max: Span,
    /// After this long in the queue a message that still cannot be delivered fails for good.
    #[serde(default = "default_queue_lifetime")]
    pub queue_lifetime: Span,
    /// Use STARTTLS when a server offers it (opportunistic TLS, RFC 7435).
    #[serde(default = "default_starttls")]
    pub starttls: bool,
    /// The port of MX hosts (25; other values are for tests and unusual setups).
    #[serde(default = "default_mx_port")]
    pub mx_port: u16,
    /// After this long in the queue, one delay notice (RFC 3464 "delayed") goes to the sender
    /// for recipients still deferred that asked NOTIFY=DELAY or gave no NOTIFY. "0s": never.
    #[serde(default = "default_delay_warning_after")]
    pub delay_warning_after: Span,
}

/// One routing rule: a smarthost, or MX delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A domain, or "*" for every domain without a rule of its own.
    pub domain: String,
    /// Relay everything for the domain to this `IP:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<SocketAddr>,
    /// Deliver to the domain's MX hosts (RFC 5321 5.1) on `delivery.mx_port`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mx: bool,
    /// Never send this route's mail in plaintext: no STARTTLS, or a failed handshake, defers it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_required: bool,
    /// AUTH PLAIN to the smarthost as this user (only ever over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// A file holding the smarthost password (its first line), read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_password_file: Option<PathBuf>,
    /// The password, read from `auth_password_file`.
    #[serde(skip)]
    pub auth_password: Option<String>,
}

/// Where a route sends mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTarget {
    Smarthost(SocketAddr),
    Mx,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// Port 25: mail from other MTAs.
    Mx,
    /// Port 587: mail from users' clients; STARTTLS, then AUTH before MAIL (RFC 6409).
    Submission,
    /// Port 465: submission over implicit TLS (RFC 8314); AUTH before MAIL.
    Smtps,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: SocketAddr,
    pub kind: ListenerKind,
    /// Offer STARTTLS (mx and submission). Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starttls: Option<bool>,
    /// Offer AUTH (over TLS only). Default: true on submission and smtps, false on mx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<bool>,
}

impl Listener {
    /// Whether this listener offers STARTTLS (never on smtps, where TLS starts at connect).
    pub fn offers_starttls(&self) -> bool {
        self.kind != ListenerKind::Smtps && self.starttls.unwrap_or(true)
    }

    /// Whether this listener offers AUTH once TLS is on.
    pub fn offers_auth(&self) -> bool {
        self.auth.unwrap_or(self.kind != ListenerKind::Mx)
    }

    /// Whether MAIL needs AUTH first: mail submission (587 and 465) is for users only.
    pub fn requires_auth(&self) -> bool {
        self.kind != ListenerKind::Mx
    }
}

/// Inbound TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// Certificates, chosen by SNI; the first is the default. None: a self-signed one is made
    /// at first start and kept in the spool directory.
    #[serde(rename = "certificate", skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<TlsCertificate>,
    /// How long a TLS handshake (STARTTLS or implicit) may take.
    pub handshake_timeout: Span,
}

impl Default for Tls {
    fn default() -> Tls {
        Tls {
            certificates: Vec::new(),
            handshake_timeout: Span(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    /// PEM certificate chain, leaf first.
    pub chain: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// SMTP AUTH (server side).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// `user:argon2-hash[:addresses]` lines (`gannet passwd USER` makes one). None: nobody can
    /// authenticate, so AUTH is not offered and submission accepts no mail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// An authenticated user's MAIL FROM must be its own address (its user name, or one listed
    /// for it in the password file): 553 5.7.1 otherwise.
    pub sender_must_match: bool,
    /// Failed attempts from one IP address (per shard) before it is blocked with 421.
    pub failures_max: u32,
    /// Delay before the first 535 reply; it doubles with each further failure.
    pub failure_delay: Span,
    /// How long a blocked address stays blocked (and how long failures are remembered).
    pub block_duration: Span,
}

impl Default for Auth {
    fn default() -> Auth {
        Auth {
            password_file: None,
            sender_must_match: true,
            failures_max: 5,
            failure_delay: Span(Duration::from_secs(1)),
            block_duration: Span(Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spool {
    #[serde(default = "default_spool_directory")]
    pub directory: PathBuf,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Size of each pre-written segment file; a multiple of 1MiB.
    #[serde(default = "default_segment_size")]
    pub segment_size: ByteSize,
    /// The most disk the spool may use, over all shards; past it mail is refused with 452.
    #[serde(default = "default_spool_size_max")]
    pub size_max: ByteSize,
    /// Mail is refused with 452 rather than leave less than this free on the file system.
    #[serde(default = "default_min_free")]
    pub min_free: ByteSize,
    /// Memory per shard for messages being received or written; past it, 452.
    #[serde(default = "default_memory_max")]
    pub memory_max: ByteSize,
    /// When a shard has this many segments and the oldest still holds unfinished (deferred)
    /// messages, those are copied into the newest segment so the oldest can be deleted. 0: never.
    #[serde(default = "default_copy_forward_segments")]
    pub copy_forward_segments: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// Domains we accept mail for from anyone.
    #[serde(default)]
    pub local_domains: Vec<String>,
    /// Clients in these networks may relay to any domain.
    #[serde(default = "default_trusted_networks")]
    pub trusted_networks: Vec<NetworkText>,
}

/// A network as written in the file, checked on load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkText(pub Network);

impl Serialize for NetworkText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for NetworkText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NetworkText, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(NetworkText).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndingPolicy {
    Reject,
    Normalize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smtp {
    /// What to do with a bare CR or LF in message content: "reject" (550 5.5.2) or "normalize".
    #[serde(default = "default_bare_line_endings")]
    pub bare_line_endings: BareLineEndingPolicy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Longest command line, CRLF included (RFC 5321 minimum: 512).
    #[serde(default = "default_line_length_max")]
    pub line_length_max: usize,
    #[serde(default = "default_message_size_max")]
    pub message_size_max: ByteSize,
    #[serde(default = "default_recipients_max")]
    pub recipients_max: usize,
    #[serde(default = "default_errors_max")]
    pub errors_max: u32,
    #[serde(default = "default_sessions_per_shard_max")]
    pub sessions_per_shard_max: usize,
    /// Enforced per shard (shards share nothing): the process allows up to shards times this.
    #[serde(default = "default_sessions_per_ip_max")]
    pub sessions_per_ip_max: usize,
    /// A whole command line (or AUTH response) must arrive within this, counted from when the
    /// server starts waiting for it: a deadline per command, not per read.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Span,
    /// How long one message's content (DATA, or all BDAT chunks) may take in total.
    #[serde(default = "default_data_timeout")]
    pub data_timeout: Span,
    /// Content must arrive at least this fast (bytes per second), over each
    /// `data_rate_window`; 0: no minimum.
    #[serde(default = "default_data_rate_min")]
    pub data_rate_min_bytes_per_second: u64,
    #[serde(default = "default_data_rate_window")]
    pub data_rate_window: Span,
    /// A shard with at least this fraction of `sessions_per_shard_max` open is under stress:
    /// command waits and rate windows shrink to `stress_command_timeout` (Postfix's stress mode).
    #[serde(default = "default_stress_sessions_fraction")]
    pub stress_sessions_fraction: f64,
    #[serde(default = "default_stress_command_timeout")]
    pub stress_command_timeout: Span,
    /// NOOP, RSET, VRFY and HELP past this many since the last accepted message count as errors.
    #[serde(default = "default_junk_commands_max")]
    pub junk_commands_max: u32,
    /// New connections per minute from one IP address (per shard); 0: no limit. Trusted
    /// networks are exempt from the three rates.
    #[serde(default = "default_connections_per_ip_per_minute")]
    pub connections_per_ip_per_minute: u32,
    /// Messages (MAIL commands) per minute from one IP address (per shard); 0: no limit.
    #[serde(default = "default_messages_per_minute")]
    pub messages_per_ip_per_minute: u32,
    /// Messages per minute from one authenticated user (per shard); 0: no limit.
    #[serde(default = "default_messages_per_minute")]
    pub messages_per_user_per_minute: u32,
    /// Recipients accepted over one connection, all transactions together.
    #[serde(default = "default_recipients_per_session_max")]
    pub recipients_per_session_max: usize,
    /// After this many error replies in a session, each further error reply is delayed.
    #[serde(default = "default_tarpit_after_errors")]
    pub tarpit_after_errors: u32,
    /// The delay added to each error reply past `tarpit_after_errors`; "0s": no tarpit.
    #[serde(default = "default_tarpit_delay")]
    pub tarpit_delay: Span,
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

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn default_listeners() -> Vec<Listener> {
    vec![
        Listener {
            address: "127.0.0.1:2525".parse().unwrap(),
            kind: ListenerKind::Mx,
            starttls: None,
            auth: None,
        },
        Listener {
            address: "127.0.0.1:2587".parse().unwrap(),
            kind: ListenerKind::Submission,
            starttls: None,
            auth: None,
        },
        Listener {
            address: "127.0.0.1:2465".parse().unwrap(),
            kind: ListenerKind::Smtps,
            starttls: None,
            auth: None,
        },
    ]
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
fn default_spool_directory() -> PathBuf {
    PathBuf::from("./gannet-spool")
}
fn default_durability() -> Durability {
    Durability::Fsync
}
fn default_segment_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_spool_size_max() -> ByteSize {
    ByteSize(8 << 30)
}
fn default_min_free() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_memory_max() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_copy_forward_segments() -> usize {
    4
}
fn default_trusted_networks() -> Vec<NetworkText> {
    vec![
        NetworkText("127.0.0.0/8".parse().unwrap()),
        NetworkText("::1/128".parse().unwrap()),
    ]
}
fn default_bare_line_endings() -> BareLineEndingPolicy {
    BareLineEndingPolicy::Reject
}
fn default_line_length_max() -> usize {
    2048
}
fn default_message_size_max() -> ByteSize {
    ByteSize(10 << 20)
}
fn default_recipients_max() -> usize {
    1000
}
fn default_errors_max() -> u32 {
    20
}
fn default_sessions_per_shard_max() -> usize {
    1000
}
fn default_sessions_per_ip_max() -> usize {
    50
}
fn default_command_timeout() -> Span {
    Span(Duration::from_secs(300))
}
fn default_data_rate_min() -> u64 {
    500
}
fn default_data_rate_window() -> Span {
    Span(Duration::from_secs(30))
}
fn default_stress_sessions_fraction() -> f64 {
    0.8
}
fn default_stress_command_timeout() -> Span {
    Span(Duration::from_secs(10))
}
fn default_junk_commands_max() -> u32 {
    100
}
fn default_data_timeout() -> Span {
    Span(Duration::from_secs(600))
}
fn default_connections_per_ip_per_minute() -> u32 {
    60
}
fn default_messages_per_minute() -> u32 {
    120
}
fn default_recipients_per_session_max() -> usize {
    10_000
}
fn default_tarpit_after_errors() -> u32 {
    3
}
fn default_tarpit_delay() -> Span {
    Span(Duration::from_secs(1))
}

fn default_delay_warning_after() -> Span {
    Span(Duration::from_secs(4 * 3600))
}
fn default_starttls() -> bool {
    true
}
fn default_mx_port() -> u16 {
    25
}
fn default_dns_timeout() -> Span {
    Span(Duration::from_secs(5))
}
fn default_dns_attempts() -> usize {
    2
}
fn default_dns_cache_entries_max() -> usize {
    100_000
}
fn default_dns_ttl_min() -> Span {
    Span(Duration::from_secs(30))
}
fn default_dns_ttl_max() -> Span {
    Span(Duration::from_secs(86_400))
}
fn default_dns_negative_ttl_max() -> Span {
    Span(Duration::from_secs(3600))
}
fn default_dns_failure_ttl() -> Span {
    Span(Duration::from_secs(30))
}

impl Default for Dns {
    fn default() -> Dns {
        Dns {
            servers: Vec::new(),
            timeout: default_dns_timeout(),
            attempts: default_dns_attempts(),
            cache_entries_max: default_dns_cache_entries_max(),
            ttl_min: default_dns_ttl_min(),
            ttl_max: default_dns_ttl_max(),
            negative_ttl_max: default_dns_negative_ttl_max(),
            failure_ttl: default_dns_failure_ttl(),
        }
    }
}

/// The `nameserver` lines of /etc/resolv.conf, on port 53.
pub fn system_dns_servers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn default_connect_timeout() -> Span {
    Span(Duration::from_secs(30))
}
fn default_reply_timeout() -> Span {
    Span(Duration::from_secs(300))
}
fn default_final_reply_timeout() -> Span {
    Span(Duration::from_secs(600))
}
fn default_connections_per_destination_max() -> usize {
    20
}
fn default_connections_per_ip_max() -> usize {
    20
}
fn default_destinations_max() -> usize {
    10_000
}
fn default_connections_per_shard_max() -> usize {
    500
}
fn default_messages_per_connection_max() -> usize {
    1000
}
fn default_idle_timeout() -> Span {
    Span(Duration::from_secs(10))
}
fn default_retry_first() -> Span {
    Span(Duration::from_secs(300))
}
fn default_retry_max() -> Span {
    Span(Duration::from_secs(4000))
}
fn default_queue_lifetime() -> Span {
    Span(Duration::from_secs(5 * 24 * 3600))
}

impl Default for Delivery {
    fn default() -> Delivery {
        Delivery {
            helo_name: None,
            connect_timeout: default_connect_timeout(),
            reply_timeout: default_reply_timeout(),
            final_reply_timeout: default_final_reply_timeout(),
            connections_per_destination_max: default_connections_per_destination_max(),
            connections_per_shard_max: default_connections_per_shard_max(),
            connections_per_ip_max: default_connections_per_ip_max(),
            destinations_max: default_destinations_max(),
            messages_per_connection_max: default_messages_per_connection_max(),
            idle_timeout: default_idle_timeout(),
            retry_first: default_retry_first(),
            retry_max: default_retry_max(),
            queue_lifetime: default_queue_lifetime(),
            mx_port: default_mx_port(),
            starttls: default_starttls(),
            delay_warning_after: default_delay_warning_after(),
        }
    }
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
        }
    }
}

impl Default for Spool {
    fn default() -> Spool {
        Spool {
            directory: default_spool_directory(),
            durability: default_durability(),
            segment_size: default_segment_size(),
            size_max: default_spool_size_max(),
            min_free: default_min_free(),
            memory_max: default_memory_max(),
            copy_forward_segments: default_copy_forward_segments(),
        }
    }
}

impl Default for Relay {
    fn default() -> Relay {
        Relay {
            local_domains: Vec::new(),
            trusted_networks: default_trusted_networks(),
        }
    }
}

impl Default for Smtp {
    fn default() -> Smtp {
        Smtp {
            bare_line_endings: default_bare_line_endings(),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            line_length_max: default_line_length_max(),
            message_size_max: default_message_size_max(),
            recipients_max: default_recipients_max(),
            errors_max: default_errors_max(),
            sessions_per_shard_max: default_sessions_per_shard_max(),
            sessions_per_ip_max: default_sessions_per_ip_max(),
            command_timeout: default_command_timeout(),
            data_timeout: default_data_timeout(),
            data_rate_min_bytes_per_second: default_data_rate_min(),
            data_rate_window: default_data_rate_window(),
            stress_sessions_fraction: default_stress_sessions_fraction(),
            stress_command_timeout: default_stress_command_timeout(),
            junk_commands_max: default_junk_commands_max(),
            connections_per_ip_per_minute: default_connections_per_ip_per_minute(),
            messages_per_ip_per_minute: default_messages_per_minute(),
            messages_per_user_per_minute: default_messages_per_minute(),
            recipients_per_session_max: default_recipients_per_session_max(),
            tarpit_after_errors: default_tarpit_after_errors(),
            tarpit_delay: default_tarpit_delay(),
        }
    }
}

/// A configuration the server cannot start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, or "<embedded default>".
    pub source_name: String,
    pub line: Option<usize>,
    /// `section.key`, when one key is to blame.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source_name)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Finds the line of `key` inside `[section]` (or `[[section]]` number `index`) in the TOML text.
fn line_of(text: &str, section: &str, index: usize, key: &str) -> Option<usize> {
    let mut in_section = section.is_empty();
    let mut seen = 0usize;
    let mut section_line = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section && {
                seen += 1;
                seen == index + 1
            };
            if in_section {
                section_line = Some(n + 1);
            }
            continue;
        }
        if in_section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(n + 1);
                }
            }
        }
    }
    section_line
}

impl Config {
    /// Parses and validates a configuration. `source_name` names the file in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            source_name: source_name.to_string(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
            key: None,
            message: e.message().to_string(),
        })?;
        config.validate(text, source_name)?;
        let mut config = config;
        for (i, route) in config.routes.iter_mut().enumerate() {
            if let Some(path) = &route.auth_password_file {
                let password = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    source_name: source_name.to_string(),
                    line: line_of(text, "route", i, "auth_password_file"),
                    key: Some("route.auth_password_file".into()),
                    message: format!(
                        "cannot read {}: {e}; write the path of a file holding the password",
                        path.display()
                    ),
                })?;
                route.auth_password = Some(password.lines().next().unwrap_or("").to_string());
            }
        }
        Ok(config)
    }

    /// The embedded default.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_TOML, "<embedded default>").expect("the embedded default configuration is valid")
    }

    /// The effective configuration as TOML (every key, defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configuration serialises")
    }

    /// The number of shards to run, given the CPUs this process may use.
    pub fn shard_count(&self, cpus: usize) -> usize {
        match self.server.shards {
            Shards::Auto => cpus.max(1),
            Shards::Count(n) => n,
        }
    }

    /// Segments each shard may keep (its share of `spool.size_max`).
    pub fn segments_per_shard_max(&self, shards: usize) -> usize {
        (self.spool.size_max.0 / self.spool.segment_size.0.max(1) / shards.max(1) as u64) as usize
    }

    /// The largest spool record these limits allow.
    pub fn record_bytes_max(&self) -> u64 {
        message_record_bytes_max(
            self.limits.line_length_max,
            self.limits.recipients_max,
            self.limits.message_size_max.0,
        )
    }

    /// Checks values and combinations that the types alone cannot.
    fn validate(&self, text: &str, source_name: &str) -> Result<(), ConfigError> {
        let fail = |section: &str, index: usize, key: &str, message: String| ConfigError {
            source_name: source_name.to_string(),
            line: line_of(text, section, index, key),
            key: Some(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            }),
            message,
        };
        if !valid_hostname(&self.server.hostname) {
            return Err(fail(
                "server",
                0,
                "hostname",
                format!(
                    "`{}` is not a host name; write a fully qualified name such as \"mx.example.com\"",
                    self.server.hostname
                ),
            ));
        }
        if self.server.shutdown_timeout.0.is_zero() {
            return Err(fail(
                "server",
                0,
                "shutdown_timeout",
                "must be more than zero, such as \"30s\"".into(),
            ));
        }
        let slice = self.server.sched_slice.0;
        if !slice.is_zero() && !(SCHED_SLICE_MIN..=SCHED_SLICE_MAX).contains(&slice) {
            return Err(fail(
                "server",
                0,
                "sched_slice",
                "must be \"0s\" (the kernel's default) or between \"100us\" and \"100ms\", the range Linux accepts"
                    .into(),
            ));
        }
        if self.server.io_memory.0 < 64 * 1024 {
            return Err(fail("server", 0, "io_memory", "must be at least \"64KiB\"".into()));
        }
        if self.listeners.is_empty() {
            return Err(fail(
                "",
                0,
                "listener",
                "at least one [[listener]] is needed, such as address = \"127.0.0.1:2525\" with kind = \"mx\"".into(),
            ));
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            if self.listeners[..i].iter().any(|l| l.address == listener.address) {
                return Err(fail(
                    "listener",
                    i,
                    "address",
                    format!(
                        "{} is listed twice; give each listener its own address",
                        listener.address
                    ),
                ));
            }
            if listener.kind == ListenerKind::Smtps && listener.starttls.is_some() {
                return Err(fail(
                    "listener",
                    i,
                    "starttls",
                    "an smtps listener speaks TLS from the first byte; remove starttls".into(),
                ));
            }
        }
        let l = &self.limits;
        if !(512..=65536).contains(&l.line_length_max) {
            return Err(fail(
                "limits",
                0,
                "line_length_max",
                format!(
                    "{} is out of range; RFC 5321 needs at least 512, and at most 65536 is allowed",
                    l.line_length_max
                ),
            ));
        }
        if l.message_size_max.0 < 1024 || l.message_size_max.0 > (1 << 30) {
            return Err(fail(
                "limits",
                0,
                "message_size_max",
                "must be between \"1KiB\" and \"1GiB\"".into(),
            ));
        }
        if !(1..=100_000).contains(&l.recipients_max) {
            return Err(fail(
                "limits",
                0,
                "recipients_max",
                "must be between 1 and 100000 (RFC 5321 asks for at least 100)".into(),
            ));
        }
        if l.errors_max == 0 {
            return Err(fail("limits", 0, "errors_max", "must be at least 1".into()));
        }
        if l.sessions_per_shard_max == 0 || l.sessions_per_ip_max == 0 {
            let key = if l.sessions_per_shard_max == 0 {
                "sessions_per_shard_max"
            } else {
                "sessions_per_ip_max"
            };
            return Err(fail("limits", 0, key, "must be at least 1".into()));
        }
        if l.command_timeout.0.is_zero() || l.data_timeout.0.is_zero() {
            let key = if l.command_timeout.0.is_zero() {
                "command_timeout"
            } else {
                "data_timeout"
            };
            return Err(fail("limits", 0, key, "must be more than zero, such as \"5m\"".into()));
        }
        for (key, span) in [
            ("data_rate_window", l.data_rate_window),
            ("stress_command_timeout", l.stress_command_timeout),
        ] {
            if span.0 < Duration::from_secs(1) || span.0 > Duration::from_secs(3600) {
                return Err(fail("limits", 0, key, "must be between \"1s\" and \"1h\"".into()));
            }
        }
        if l.data_rate_min_bytes_per_second > 1 << 30 {
            return Err(fail(
                "limits",
                0,
                "data_rate_min_bytes_per_second",
                "must be at most 1073741824 (1 GiB per second); 0 turns the minimum off".into(),
            ));
        }
        if !(l.stress_sessions_fraction > 0.0 && l.stress_sessions_fraction <= 1.0) {
            return Err(fail(
                "limits",
                0,
                "stress_sessions_fraction",
                "must be a fraction above 0 and at most 1.0, such as 0.8 (1.0: only when the shard is full)".into(),
            ));
        }
        if l.recipients_per_session_max < l.recipients_max {
            return Err(fail(
                "limits",
                0,
                "recipients_per_session_max",
                format!(
                    "{} is below limits.recipients_max ({}); one transaction could never use its allowance",
                    l.recipients_per_session_max, l.recipients_max
                ),
            ));
        }
        if l.tarpit_delay.0 > Duration::from_secs(30) {
            return Err(fail(
                "limits",
                0,
                "tarpit_delay",
                "must be at most \"30s\" (the delay grows with each error, up to 30s)".into(),
            ));
        }
        let t = &self.tls;
        if t.handshake_timeout.0.is_zero() {
            return Err(fail(
                "tls",
                0,
                "handshake_timeout",
                "must be more than zero, such as \"10s\"".into(),
            ));
        }
        for (i, c) in t.certificates.iter().enumerate() {
            for (key, path) in [("chain", &c.chain), ("key", &c.key)] {
                if !path.is_file() {
                    return Err(fail(
                        "tls.certificate",
                        i,
                        key,
                        format!("{} is not a readable file; give the path of a PEM file", path.display()),
                    ));
                }
            }
        }
        let a = &self.auth;
        if a.failures_max == 0 {
            return Err(fail("auth", 0, "failures_max", "must be at least 1".into()));
        }
        if a.block_duration.0.is_zero() {
            return Err(fail(
                "auth",
                0,
                "block_duration",
                "must be more than zero, such as \"10m\"".into(),
            ));
        }
        if a.failure_delay.0 > Duration::from_secs(60) {
            return Err(fail(
                "auth",
                0,
                "failure_delay",
                "must be at most \"60s\" (it doubles with each failure)".into(),
            ));
        }
        if let Some(path) = &a.password_file {
            if let Err(e) = crate::auth::passwords::PasswordFile::load(path) {
                return Err(fail("auth", 0, "password_file", e));
            }
        }
        let s = &self.spool;
        if s.segment_size.0 < SEGMENT_FILL_CHUNK_BYTES
            || s.segment_size.0 % SEGMENT_FILL_CHUNK_BYTES != 0
            || s.segment_size.0 > (4 << 30)
        {
            return Err(fail(
                "spool",
                0,
                "segment_size",
                format!(
                    "{} must be a whole number of MiB between \"1MiB\" and \"4GiB\", such as \"64MiB\"",
                    s.segment_size
                ),
            ));
        }
        if s.copy_forward_segments == 1 || s.copy_forward_segments == 2 {
            return Err(fail(
                "spool",
                0,
                "copy_forward_segments",
                "must be 0 (never) or at least 3: the oldest segment, one in between, and the one being written".into(),
            ));
        }
        let record_max = self.record_bytes_max();
        if s.segment_size.0 < record_max {
            return Err(fail("spool", 0, "segment_size", format!(
                "{} cannot hold the largest message the limits allow ({} bytes with limits.message_size_max = {} and limits.recipients_max = {}); raise spool.segment_size or lower those limits",
                s.segment_size, record_max, l.message_size_max, l.recipients_max
            )));
        }
        if s.memory_max.0 < record_max + 512 * 1024 {
            return Err(fail("spool", 0, "memory_max", format!(
                "{} cannot buffer the largest message the limits allow; make it at least {} (limits.message_size_max plus 512KiB)",
                s.memory_max,
                ByteSize(record_max + 512 * 1024)
            )));
        }
        if s.size_max.0 < 2 * s.segment_size.0 {
            return Err(fail(
                "spool",
                0,
                "size_max",
                format!(
                    "{} must hold at least two segments of spool.segment_size ({}) per shard",
                    s.size_max, s.segment_size
                ),
            ));
        }
        let d = &self.delivery;
        for (key, span) in [
            ("connect_timeout", d.connect_timeout),
            ("reply_timeout", d.reply_timeout),
            ("final_reply_timeout", d.final_reply_timeout),
            ("idle_timeout", d.idle_timeout),
            ("retry_first", d.retry_first),
            ("retry_max", d.retry_max),
            ("queue_lifetime", d.queue_lifetime),
        ] {
            if span.0.is_zero() {
                return Err(fail(
                    "delivery",
                    0,
                    key,
                    "must be more than zero, such as \"30s\"".into(),
                ));
            }
        }
        if d.retry_max < d.retry_first {
            return Err(fail(
                "delivery",
                0,
                "retry_max",
                format!(
                    "{} is shorter than delivery.retry_first ({}); make it at least as long",
                    d.retry_max, d.retry_first
                ),
            ));
        }
        for (key, value) in [
            ("connections_per_destination_max", d.connections_per_destination_max),
            ("messages_per_connection_max", d.messages_per_connection_max),
            ("connections_per_shard_max", d.connections_per_shard_max),
            ("connections_per_ip_max", d.connections_per_ip_max),
            ("destinations_max", d.destinations_max),
        ] {
            if value == 0 {
                return Err(fail("delivery", 0, key, "must be at least 1".into()));
            }
        }
        if d.destinations_max > 1_000_000 {
            return Err(fail(
                "delivery",
                0,
                "destinations_max",
                "must be at most 1000000 (sites with mail queued are kept beyond it anyway)".into(),
            ));
        }
        if let Some(name) = &d.helo_name {
            if !valid_hostname(name) {
                return Err(fail("delivery", 0, "helo_name", format!("`{name}` is not a host name")));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.domain != "*" && !valid_hostname(&route.domain) {
                return Err(fail(
                    "route",
                    i,
                    "domain",
                    format!(
                        "`{}` is not a domain; write a name such as \"example.com\", or \"*\" for every domain",
                        route.domain
                    ),
                ));
            }
            if route.auth_user.is_some() != route.auth_password_file.is_some() {
                return Err(fail(
                    "route",
                    i,
                    "auth_user",
                    "give both auth_user and auth_password_file, or neither".into(),
                ));
            }
            if route.auth_user.is_some() && route.smarthost.is_none() {
                return Err(fail(
                    "route",
                    i,
                    "auth_user",
                    "AUTH is for smarthost routes only".into(),
                ));
            }
            if route.smarthost.is_some() == route.mx {
                return Err(fail(
                    "route",
                    i,
                    "domain",
                    format!(
                        "the route for `{}` needs exactly one of smarthost = \"IP:port\" or mx = true",
                        route.domain
                    ),
                ));
            }
            if self.routes[..i]
                .iter()
                .any(|r| r.domain.eq_ignore_ascii_case(&route.domain))
            {
                return Err(fail(
                    "route",
                    i,
                    "domain",
                    format!("`{}` has two routes; keep one", route.domain),
                ));
            }
        }
        let dns = &self.dns;
        if dns.timeout.0.is_zero() {
            return Err(fail(
                "dns",
                0,
                "timeout",
                "must be more than zero, such as \"5s\"".into(),
            ));
        }
        if dns.attempts == 0 || dns.attempts > 10 {
            return Err(fail("dns", 0, "attempts", "must be between 1 and 10".into()));
        }
        if dns.cache_entries_max == 0 {
            return Err(fail("dns", 0, "cache_entries_max", "must be at least 1".into()));
        }
        if dns.ttl_min > dns.ttl_max {
            return Err(fail(
                "dns",
                0,
                "ttl_min",
                format!("{} is longer than dns.ttl_max ({})", dns.ttl_min, dns.ttl_max),
            ));
        }
        for (i, rule) in self.destinations.iter().enumerate() {
            if rule.pattern.is_empty() {
                return Err(fail(
                    "destination",
                    i,
                    "match",
                    "write an IP:port, a domain, *.domain or *".into(),
                ));
            }
            if rule.connections_max == Some(0) || rule.messages_per_connection_max == Some(0) {
                return Err(fail(
                    "destination",
                    i,
                    "connections_max",
                    "limits must be at least 1".into(),
                ));
            }
            if rule.messages_per_second.is_some_and(|r| !(r > 0.0 && r <= 1_000_000.0)) {
                return Err(fail(
                    "destination",
                    i,
                    "messages_per_second",
                    "must be a number above 0, such as 10 or 0.5".into(),
                ));
            }
        }
        for domain in &self.relay.local_domains {
            if !valid_hostname(domain) {
                return Err(fail(
                    "relay",
                    0,
                    "local_domains",
                    format!("`{domain}` is not a domain name; write names such as \"example.com\""),
                ));
            }
        }
        Ok(())
    }

    /// Checks that need the shard count (known only on the machine that runs the server).
    pub fn validate_for_shards(&self, shards: usize, cpus: usize, source_name: &str) -> Result<(), ConfigError> {
        if shards > cpus {
            return Err(ConfigError {
                source_name: source_name.to_string(),
                line: None,
                key: Some("server.shards".into()),
                message: format!("{shards} shards asked for, but this process may use only {cpus} CPUs; write \"auto\" or a number up to {cpus}"),
            });
        }
        if self.segments_per_shard_max(shards) < 2 {
            return Err(ConfigError {
                source_name: source_name.to_string(),
                line: None,
                key: Some("spool.size_max".into()),
                message: format!(
                    "{} leaves fewer than two segments of {} for each of {shards} shards; raise spool.size_max",
                    self.spool.size_max, self.spool.segment_size
                ),
            });
        }
        Ok(())
    }

    /// Where mail for a recipient domain goes: its own route, else the "*" route.
    pub fn route(&self, domain: &[u8]) -> Option<RouteTarget> {
        let exact = self
            .routes
            .iter()
            .find(|r| r.domain.as_bytes().eq_ignore_ascii_case(domain));
        exact
            .or_else(|| self.routes.iter().find(|r| r.domain == "*"))
            .map(|r| match r.smarthost {
                Some(addr) => RouteTarget::Smarthost(addr),
                None => RouteTarget::Mx,
            })
    }

    /// The limits rule for a destination named `name` (an `IP:port` or a domain), if any.
    pub fn destination_limits(&self, name: &str) -> Option<&DestinationLimits> {
        self.destinations.iter().find(|d| d.matches(name))
    }

    /// The scheduler's settings for shard `shard` of `shard_count`.
    pub fn sched_config(&self, shard: u16, shard_count: usize, seed: u64) -> SchedConfig {
        let d = &self.delivery;
        SchedConfig {
            shard,
            shard_count,
            routes: self
                .routes
                .iter()
                .map(|r| SchedRoute {
                    domain: r.domain.clone(),
                    target: match r.smarthost {
                        Some(addr) => SchedTarget::Smarthost(addr),
                        None => SchedTarget::Mx,
                    },
                })
                .collect(),
            site_rules: self
                .destinations
                .iter()
                .map(|r| SiteRule {
                    pattern: r.pattern.clone(),
                    connections_max: r.connections_max,
                    messages_per_connection_max: r.messages_per_connection_max,
                    messages_per_second: r.messages_per_second,
                })
                .collect(),
            connections_per_site_max: d.connections_per_destination_max,
            messages_per_connection_max: d.messages_per_connection_max,
            connections_per_shard_max: d.connections_per_shard_max,
            sites_max: d.destinations_max,
            retry: RetrySchedule {
                first: d.retry_first.0,
                max: d.retry_max.0,
            },
            queue_lifetime: d.queue_lifetime.0,
            delay_warning_after: d.delay_warning_after.0,
            // Forget a site no sooner than its pooled connections would have closed.
            site_idle: d.idle_timeout.0.max(Duration::from_secs(10)),
            seed,
        }
    }

    /// The name Gannet gives in EHLO when delivering.
    pub fn helo_name(&self) -> &str {
        self.delivery.helo_name.as_deref().unwrap_or(&self.server.hostname)
    }

    /// The session settings every session of a shard shares.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            hostname: self.server.hostname.clone(),
            line_length_max: self.limits.line_length_max,
            message_size_max: self.limits.message_size_max.0,
            recipients_max: self.limits.recipients_max,
            errors_max: self.limits.errors_max,
            bare_line_endings: match self.smtp.bare_line_endings {
                BareLineEndingPolicy::Reject => BareLineEndings::Reject,
                BareLineEndingPolicy::Normalize => BareLineEndings::Normalize,
            },
            relay: RelayPolicy {
                local_domains: self
                    .relay
                    .local_domains
                    .iter()
                    .map(|d| d.to_ascii_lowercase())
                    .collect(),
                trusted_networks: self.relay.trusted_networks.iter().map(|n| n.0).collect(),
            },
            recipients_per_session_max: self.limits.recipients_per_session_max,
            tarpit_after_errors: self.limits.tarpit_after_errors,
            tarpit_delay: self.limits.tarpit_delay.0,
            sender_must_match: self.auth.sender_must_match,
            timeouts: Timeouts {
                command: self.limits.command_timeout.0,
                stress_command: self.limits.stress_command_timeout.0,
                data: self.limits.data_timeout.0,
                data_rate_min_bytes_per_s: self.limits.data_rate_min_bytes_per_second,
                data_rate_window: self.limits.data_rate_window.0,
            },
            junk_commands_max: self.limits.junk_commands_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_matches_the_documented_defaults() {
        let c = Config::embedded_default();
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[0].address, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.listeners[1].kind, ListenerKind::Submission);
        assert_eq!(c.listeners[2].kind, ListenerKind::Smtps);
        assert!(c.listeners[0].offers_starttls() && !c.listeners[0].offers_auth());
        assert!(c.listeners[1].offers_starttls() && c.listeners[1].offers_auth() && c.listeners[1].requires_auth());
        assert!(!c.listeners[2].offers_starttls() && c.listeners[2].requires_auth());
        assert_eq!(c.spool.directory, PathBuf::from("./gannet-spool"));
        assert_eq!(c.spool.durability, Durability::Fsync);
        assert_eq!(c.server.shards, Shards::Auto);
        // An empty file means every default.
        let empty = Config::parse("", "empty.toml").unwrap();
        assert_eq!(empty.to_toml(), c.to_toml());
    }

    #[test]
    fn routes_match_the_domain_then_the_wildcard() {
        let c = Config::parse(
            "[[route]]\ndomain = \"special.example\"\nsmarthost = \"127.0.0.1:2601\"\n\n[[route]]\ndomain = \"*\"\nsmarthost = \"[::1]:2602\"\n",
            "g.toml",
        )
        .unwrap();
        assert_eq!(
            c.route(b"SPECIAL.example"),
            Some(RouteTarget::Smarthost("127.0.0.1:2601".parse().unwrap()))
        );
        assert_eq!(
            c.route(b"other.example"),
            Some(RouteTarget::Smarthost("[::1]:2602".parse().unwrap()))
        );
        let c = Config::parse("[[route]]\ndomain = \"*\"\nmx = true\n", "g.toml").unwrap();
        assert_eq!(c.route(b"x.example"), Some(RouteTarget::Mx));
        let e = Config::parse(
            "[[route]]\ndomain = \"*\"\nmx = true\nsmarthost = \"127.0.0.1:25\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("exactly one"), "{e}");
        assert_eq!(Config::embedded_default().route(b"x.example"), None);
    }

    #[test]
    fn destination_rules_match_addresses_domains_and_suffixes() {
        let c = Config::parse(
            "[[destination]]\nmatch = \"*.big.example\"\nconnections_max = 2\n\n[[destination]]\nmatch = \"127.0.0.1:2526\"\nmessages_per_second = 0.5\n",
            "g.toml",
        )
        .unwrap();
        assert_eq!(
            c.destination_limits("mx.BIG.example").and_then(|d| d.connections_max),
            Some(2)
        );
        assert!(
            c.destination_limits("big.example").is_none(),
            "a suffix rule needs a subdomain"
        );
        assert!(c.destination_limits("notbig.example").is_none());
        assert_eq!(
            c.destination_limits("127.0.0.1:2526")
                .and_then(|d| d.messages_per_second),
            Some(0.5)
        );
        let e = Config::parse("[[destination]]\nmatch = \"x\"\nmessages_per_second = 0\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn smarthost_credentials_are_checked_and_loaded() {
        let route = "[[route]]\ndomain = \"*\"\nsmarthost = \"127.0.0.1:2526\"\n";
        let e = Config::parse(&format!("{route}auth_user = \"u\"\n"), "g.toml").unwrap_err();
        assert!(e.message.contains("both auth_user and auth_password_file"), "{e}");
        let e = Config::parse(
            "[[route]]\ndomain = \"*\"\nmx = true\nauth_user = \"u\"\nauth_password_file = \"/x\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("smarthost routes only"), "{e}");
        let e = Config::parse(
            &format!("{route}auth_user = \"u\"\nauth_password_file = \"/nonexistent/pw\"\n"),
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("cannot read /nonexistent/pw"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2\nignored\n").unwrap();
        let c = Config::parse(
            &format!(
                "{route}auth_user = \"u\"\nauth_password_file = {:?}\n",
                pw.display().to_string()
            ),
            "g.toml",
        )
        .unwrap();
        assert_eq!(c.routes[0].auth_password.as_deref(), Some("hunter2"));
        assert!(!c.to_toml().contains("hunter2"), "the password is never printed");
    }

    #[test]
    fn unknown_keys_name_the_line_and_the_valid_keys() {
        let e = Config::parse("[limits]\nmessage_size_max = \"1MiB\"\nrecipient_max = 5\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().starts_with("g.toml:3: "), "{e}");
        assert!(e.message.contains("recipients_max"), "{e}");
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let e = Config::parse("[limits]\ncommand_timeout = 30\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("\"30s\""), "{e}");
        let e = Config::parse("[spool]\nsegment_size = \"64 Mb\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("\"10MiB\""), "{e}");
        let e = Config::parse("[relay]\ntrusted_networks = [\"10.0.0.0/40\"]\n", "g.toml").unwrap_err();
        assert!(e.message.contains("prefix length"), "{e}");
        let e = Config::parse("[spool]\ndurability = \"sometimes\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("fsync"), "{e}");
    }

    #[test]
    fn slow_client_limits_are_checked_with_their_line() {
        let e = Config::parse("[limits]\ndata_rate_window = \"500ms\"\n", "g.toml").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("limits.data_rate_window")),
            "{e}"
        );
        let e = Config::parse("[limits]\n\nstress_sessions_fraction = 1.5\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("at most 1.0"), "{e}");
        let e = Config::parse("[limits]\nstress_sessions_fraction = 0\n", "g.toml").unwrap_err();
        assert!(e.message.contains("above 0"), "{e}");
        let e = Config::parse("[limits]\nstress_command_timeout = \"2h\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("\"1h\""), "{e}");
        let e = Config::parse("[limits]\ndata_rate_min_bytes_per_second = 2000000000\n", "g.toml").unwrap_err();
        assert!(e.message.contains("0 turns the minimum off"), "{e}");
        let c = Config::parse("[limits]\ndata_rate_min_bytes_per_second = 0\n", "g.toml").unwrap();
        assert_eq!(c.session_config().timeouts.data_rate_min_bytes_per_s, 0);
        let d = Config::embedded_default().session_config();
        assert_eq!(d.timeouts.command, Duration::from_secs(300));
        assert_eq!(d.timeouts.stress_command, Duration::from_secs(10));
        assert_eq!(d.junk_commands_max, 100);
    }

    #[test]
    fn impossible_combinations_are_refused_with_their_line() {
        let text = "[limits]\nmessage_size_max = \"100MiB\"\n\n[spool]\nsegment_size = \"64MiB\"\n";
        let e = Config::parse(text, "g.toml").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("spool.segment_size"));
        assert_eq!(e.line, Some(5));
        let e = Config::parse("[[listener]]\naddress = \"127.0.0.1:25\"\nkind = \"mx\"\n[[listener]]\naddress = \"127.0.0.1:25\"\nkind = \"submission\"\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        let e = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:465\"\nkind = \"smtps\"\nstarttls = true\n",
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("speaks TLS from the first byte"), "{e}");
        let e = Config::parse(
            "[[tls.certificate]]\nchain = \"/nonexistent.pem\"\nkey = \"/k.pem\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            e.to_string()
                .contains("tls.certificate.chain: /nonexistent.pem is not a readable file"),
            "{e}"
        );
        let e = Config::parse("[auth]\npassword_file = \"/nonexistent-users\"\n", "g.toml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("g.toml:2: auth.password_file: /nonexistent-users: cannot read"),
            "{e}"
        );
        let e = Config::parse("[limits]\nrecipients_per_session_max = 10\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = Config::parse("[spool]\nsegment_size = \"3500KiB\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("whole number of MiB"), "{e}");
        let e = Config::parse(
            "[[route]]\ndomain = \"*\"\nsmarthost = \"relay.example:25\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let e = Config::parse("[dns]\nttl_min = \"2h\"\nttl_max = \"1h\"\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = Config::parse("[delivery]\nretry_first = \"1h\"\nretry_max = \"5m\"\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let c = Config::parse("[server]\nshards = 4\n", "g.toml").unwrap();
        assert!(c
            .validate_for_shards(4, 2, "g.toml")
            .unwrap_err()
            .message
            .contains("only 2 CPUs"));
        assert!(Config::parse("[server]\nshards = 0\n", "g.toml").is_err());
    }
}
