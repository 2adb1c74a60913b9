//! The admin listener: HTTP beside the SMTP work, for `GET /metrics` (Prometheus) and the queue
//! API (docs/admin.md). It runs in a low-priority task queue of shard 0 and asks each shard for
//! its part: each shard owns its queue and its metrics, so nothing is shared. Requests and
//! replies cross threads through glommio's bounded shared channels, one pair per other shard
//! (shard 0 is asked directly): they wake the shard's parked executor, which a crossbeam queue could not without
//! the shard polling it (docs/admin.md says more on that choice).
//!
//! - [`protocol`]: what crosses the channels (and the API's JSON);
//! - `http`: hyper over glommio, limits, the bearer token;
//! - `routes`: the URL space;
//! - [`client`]: `gannet queue ...` talking to the API.

pub mod client;
mod http;
pub mod protocol;
mod routes;
pub mod suppression_client;
pub mod suppression_routes;
pub mod suspensions;

use std::cell::Cell;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};
use glommio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::Config;
use protocol::{Answered, Asked, Reply, Request};

/// Requests or replies in flight per shard and direction (one is asked at a time).
const CHANNEL_SLOTS: usize = 4;
/// How long the admin thread waits for a shard's answer.
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A shard's ends of its channels with the admin thread.
pub struct ShardEnd {
    pub requests: SharedReceiver<Asked>,
    pub replies: SharedSender<Answered>,
}

/// The admin thread's ends of one shard's channels.
pub struct AdminEnd {
    requests: SharedSender<Asked>,
    replies: SharedReceiver<Answered>,
}

/// One channel pair per shard but the first, which hosts the admin listener and is asked
/// directly.
pub fn channels(shards: usize) -> (Vec<ShardEnd>, Vec<AdminEnd>) {
    (1..shards)
        .map(|_| {
            let (req_tx, req_rx) = shared_channel::new_bounded(CHANNEL_SLOTS);
            let (rep_tx, rep_rx) = shared_channel::new_bounded(CHANNEL_SLOTS);
            (
                ShardEnd {
                    requests: req_rx,
                    replies: rep_tx,
                },
                AdminEnd {
                    requests: req_tx,
                    replies: rep_rx,
                },
            )
        })
        .unzip()
}

/// A shard as the admin thread reaches it: one request at a time, each numbered.
struct ShardLink {
    requests: ConnectedSender<Asked>,
    replies: ConnectedReceiver<Answered>,
    turn: Semaphore,
    serial: Cell<u64>,
}

/// How the admin reaches a shard: the shard it runs on, directly; the others through their
/// channels (a glommio shared channel with both ends on one executor is not what they are
/// made for, so none is used that way).
enum Link {
    Local(Rc<crate::server::shard::Shard>),
    Remote(ShardLink),
}

impl Link {
    async fn ask(&self, request: Request) -> Reply {
        match self {
            Link::Local(shard) => crate::server::control::answer(shard, request).await,
            Link::Remote(link) => link.ask(request).await,
        }
    }
}

impl ShardLink {
    async fn ask(&self, request: Request) -> Reply {
        let Ok(_turn) = self.turn.acquire_permit(1).await else {
            return Reply::Unavailable;
        };
        let serial = self.serial.get() + 1;
        self.serial.set(serial);
        if self.requests.send(Asked { serial, request }).await.is_err() {
            return Reply::Unavailable;
        }
        let deadline = std::time::Instant::now() + SHARD_ANSWER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let answer = glommio::timer::timeout(left, async { Ok(self.replies.recv().await) }).await;
            match answer {
                // A late answer to a request that timed out: not ours.
                Ok(Some(a)) if a.serial != serial => continue,
                Ok(Some(a)) => return a.reply,
                Ok(None) | Err(_) => return Reply::Unavailable,
            }
        }
    }
}

/// What the routes work with.
pub struct AdminState {
    config: Arc<Config>,
    shards: Vec<Link>,
    /// The suspensions in force, as in the spool's file (this thread is its only writer).
    suspended: std::cell::RefCell<Vec<suspensions::SuspensionRecord>>,
}

impl AdminState {
    /// Asks every shard, in turn, the request `make` builds; their replies in shard order.
    async fn ask_all(&self, make: impl Fn() -> Request) -> Vec<Reply> {
        let mut replies = Vec::with_capacity(self.shards.len());
        for link in &self.shards {
            replies.push(link.ask(make()).await);
        }
        replies
    }
}

/// The bearer token from `admin.token_file`: its first line, which must not be empty.
pub fn read_token(config: &Config) -> Result<Option<String>, String> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read admin.token_file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 {
        return Err(format!(
            "admin.token_file {}: the token (its first line) must be at least 16 characters",
            path.display()
        ));
    }
    Ok(Some(token))
}

/// What the admin listener starts with: its socket (bound on the main thread before the shards
/// start, so that a clash stops start-up with a clear error), its token, every shard's channel
/// ends, and the suspensions in force. `Send`: it moves to the shard that hosts the listener.
pub struct AdminSetup {
    config: Arc<Config>,
    fd: RawFd,
    token: Option<String>,
    ends: Vec<AdminEnd>,
    suspended: Vec<suspensions::SuspensionRecord>,
}

/// Binds the admin address and reads the token.
pub fn prepare(
    config: Arc<Config>,
    ends: Vec<AdminEnd>,
    suspended: Vec<suspensions::SuspensionRecord>,
) -> Result<AdminSetup, String> {
    let token = read_token(&config)?;
    let address = config.admin.address;
    let listener = std::net::TcpListener::bind(address)
        .map_err(|e| format!("cannot listen on {address} (admin.address): {e}; is another server running there?"))?;
    Ok(AdminSetup {
        config,
        fd: listener.into_raw_fd(),
        token,
        ends,
        suspended,
    })
}

/// Serves the admin API until the task is dropped. It runs on shard 0, in a task queue of its
/// own with a small share of the CPU, beside that shard's SMTP work: a glommio executor of its
/// own would cost about 4 MB of resident memory for a listener that is idle nearly always
/// (measured: docs/admin.md). `host` (the shard it runs on) is asked
/// directly, the others through their channels.
pub async fn serve(setup: AdminSetup, host: Rc<crate::server::shard::Shard>) {
    let AdminSetup {
        config,
        fd,
        token,
        ends,
        suspended,
    } = setup;
    // SAFETY: `fd` is the listening socket `prepare` bound, whose ownership into_raw_fd gave
    // up; only this task uses it. Every test that starts the server reaches it.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
    let mut shards = Vec::with_capacity(ends.len() + 1);
    shards.push(Link::Local(host));
    for end in ends {
        shards.push(Link::Remote(ShardLink {
            requests: end.requests.connect().await,
            replies: end.replies.connect().await,
            turn: Semaphore::new(1),
            serial: Cell::new(0),
        }));
    }
    let limits = http::HttpLimits {
        connections_max: config.admin.connections_max,
        request_bytes_max: config.admin.request_size_max.0 as usize,
        connection_timeout: config.admin.connection_timeout.0,
    };
    let address = config.admin.address;
    let state = Rc::new(AdminState {
        config,
        shards,
        suspended: std::cell::RefCell::new(suspended),
    });
    info!("admin API listening on http://{address}");
    let token: Option<Rc<str>> = token.map(Rc::from);
    http::serve(listener, limits, token, move |req| {
        let state = state.clone();
        async move { routes::route(&state, req).await }
    })
    .await;
}

/// Logs and swallows a shard that could not answer.
fn note_unavailable(what: &str) {
    warn!("admin: a shard did not answer {what} in time");
}
