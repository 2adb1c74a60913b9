//! What the admin thread asks a shard and what the shard answers. Both cross threads through
//! glommio's shared channels (`server::control`), so everything here is `Send` and owned. The
//! reply types are also the API's JSON (serde).

use gannet_metrics::ShardMetrics;
use serde::{Deserialize, Serialize};

/// Which messages an action or a listing applies to. Every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// One message id (as `gannet queue list` prints it).
    pub id: Option<String>,
    /// The envelope sender, exactly (case-insensitive); `<>` for bounces.
    pub sender: Option<String>,
    /// A recipient, exactly (case-insensitive).
    pub recipient: Option<String>,
    /// A recipient domain, exactly (case-insensitive).
    pub domain: Option<String>,
    /// ready, deferred, held or delivering.
    pub state: Option<String>,
    /// Received at least this many seconds ago.
    pub min_age_s: Option<u64>,
}

impl Selector {
    /// Nothing set: every message.
    pub fn is_all(&self) -> bool {
        *self == Selector::default()
    }
}

/// A listing request: the messages `selector` matches, oldest first, `offset..offset+limit`.
#[derive(Debug, Clone)]
pub struct Listing {
    pub selector: Selector,
    pub offset: usize,
    pub limit: usize,
}

/// One queued message, as listings show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageSummary {
    pub id: String,
    pub shard: u16,
    pub sender: String,
    pub size_bytes: u64,
    pub received_unix_s: u64,
    pub received: String,
    pub state: String,
    pub recipients_total: usize,
    pub recipients_pending: usize,
    pub attempts: u32,
    pub next_attempt: Option<String>,
}

/// One recipient of a shown message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipientDetail {
    pub address: String,
    /// pending or done (delivered, or failed with its notice spooled).
    pub state: String,
}

/// Everything about one message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageDetail {
    #[serde(flatten)]
    pub summary: MessageSummary,
    pub client_ip: String,
    pub helo: String,
    pub recipients: Vec<RecipientDetail>,
    /// The last reply a server gave for mail to a pending recipient's domain (the shard
    /// remembers the last 512 domains it tried).
    pub last_reply: Option<String>,
    /// That reply's bounce class (`rate-limited`, ...).
    #[serde(default)]
    pub last_class: Option<String>,
    /// The message's header section, as spooled (none if it cannot be read now).
    pub headers: Option<String>,
}

/// One row of the queue's shape: messages to a destination domain by age.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SummaryRow {
    pub domain: String,
    pub total: u64,
    /// Counts by age bucket, in the order of [`AGE_BUCKETS`].
    pub by_age: Vec<u64>,
}

/// Age buckets of the queue summary (upper bounds in seconds; the last one is open-ended).
pub const AGE_BUCKETS: [(&str, u64); 8] = [
    ("5m", 300),
    ("10m", 600),
    ("20m", 1200),
    ("40m", 2400),
    ("80m", 4800),
    ("160m", 9600),
    ("320m", 19200),
    ("older", u64::MAX),
];

/// An operator's action on the messages a selector matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Retry deferred mail now.
    Flush,
    /// Never attempt until released (persisted).
    Hold,
    Release,
    /// Drop without a notice.
    Delete,
    /// Return to the sender with a failure notice giving the operator's reason, then drop.
    Bounce,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Flush => "flush",
            Action::Hold => "hold",
            Action::Release => "release",
            Action::Delete => "delete",
            Action::Bounce => "bounce",
        }
    }
}

/// What one shard did for an action.
#[derive(Debug, Default)]
pub struct Acted {
    /// Messages the action applied to.
    pub touched: Vec<String>,
    /// Messages it could not apply to now (a delivery attempt is under way); try again.
    pub busy: Vec<String>,
    /// Set when the action could not be recorded durably.
    pub error: Option<String>,
}

#[derive(Debug)]
pub enum Request {
    Metrics,
    List(Listing),
    Show(String),
    Summary,
    Act {
        action: Action,
        selector: Selector,
        /// The operator's reason (bounces).
        reason: String,
    },
    /// Stop delivery to a recipient domain until then.
    Suspend {
        domain: String,
        until_unix_s: u64,
    },
    Resume {
        domain: String,
    },
    /// The destinations down now.
    Down,
    /// The shard's suspensions in force (the operator's and the bounce actions').
    Suspensions,
    /// The shard's slowed rates in force (bounce `slow` actions).
    Slowdowns,
}

/// A lowered rate in one shard's scheduler: a provider's (`provider google`) or a site's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSlowdown {
    pub destination: String,
    /// Time between messages while slowed.
    pub interval_ms: u64,
    pub until_unix_s: u64,
    pub shard: usize,
}

/// A suspension in one shard's scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSuspension {
    pub domain: String,
    pub until_unix_s: u64,
    pub shard: usize,
}

/// A destination that is down (crates/sched `health`): its mail waits for a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownSite {
    /// The receiving site: a smarthost's `IP:port`, or `MX host,host...`.
    pub destination: String,
    pub down_since_unix_s: u64,
    /// Connection failures in a row.
    pub failures: u32,
    pub next_probe_in_s: u64,
    /// Jobs waiting for the probe on this shard.
    pub waiting: usize,
}

#[derive(Debug)]
pub enum Reply {
    Metrics(Box<ShardMetrics>),
    /// Messages that match in all (`matched`) and the first `offset + limit` of them.
    List {
        matched: usize,
        messages: Vec<MessageSummary>,
    },
    Show(Option<Box<MessageDetail>>),
    Summary(Vec<SummaryRow>),
    Acted(Acted),
    /// A suspension is in force (true), or could not be (the shard's table is full).
    Suspended(bool),
    /// Messages a resume lets go.
    Resumed(usize),
    Down(Vec<DownSite>),
    Suspensions(Vec<ShardSuspension>),
    Slowdowns(Vec<ShardSlowdown>),
    /// The shard could not answer (it is stopping).
    Unavailable,
}

/// A request with the number the reply must carry back.
#[derive(Debug)]
pub struct Asked {
    pub serial: u64,
    pub request: Request,
}

/// A reply with the number of the request it answers.
#[derive(Debug)]
pub struct Answered {
    pub serial: u64,
    pub reply: Reply,
}
