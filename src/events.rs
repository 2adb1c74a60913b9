//! The delivery-event webhook: received, delivered, deferred, bounced, expired and suppressed events, posted
//! as JSON batches to `[events] url`.
//!
//! Shards push events into one bounded lock-free queue (crossbeam's `ArrayQueue`: many
//! producers, one consumer, no lock, no allocation of its own per push) and never wait: when it
//! is full, the event is dropped, counted (`gannet_events_dropped_total`) and logged. A poster
//! thread takes batches off the queue and POSTs them (ureq), retrying a failed batch with
//! doubling delays; every event carries an id unique to this process's run, so that a receiver
//! can drop the repeats a retry may bring (delivery to the receiver is at least once while the
//! process runs; events still buffered when it stops or crashes are lost).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;
use serde::Serialize;
use tracing::{info, warn};

use crate::config::Events as EventsConfig;

/// How often the poster looks for events when the queue was empty.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// At shutdown, how long the poster keeps trying to post what is buffered.
const SHUTDOWN_FLUSH_MAX: Duration = Duration::from_secs(5);

/// One event, as the webhook receives it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique in this run of the process: `<run>-<sequence>`.
    pub id: String,
    pub time_unix_ms: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened, before the event has its id and time.
#[derive(Debug, Clone, Serialize)]
pub struct EventBody {
    /// received, delivered, deferred, bounced, expired or suppressed.
    pub kind: &'static str,
    pub message_id: String,
    pub sender: String,
    /// The recipient (delivery events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Recipients in the message (received events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The client's address (received events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The server that answered (delivery events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Its reply (delivery events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The bounce class of a failure or deferral (`invalid-recipient`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
}

/// The process's event buffer and its counters.
pub struct EventQueue {
    queue: ArrayQueue<Event>,
    run: String,
    next: AtomicU64,
    pub posted: AtomicU64,
    pub dropped: AtomicU64,
    pub failed_posts: AtomicU64,
    dropping: AtomicBool,
}

static EVENTS: OnceLock<Arc<EventQueue>> = OnceLock::new();

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The buffer, when the webhook is on.
pub fn queue() -> Option<&'static Arc<EventQueue>> {
    EVENTS.get()
}

/// Whether events are wanted (callers skip building them otherwise).
pub fn enabled() -> bool {
    EVENTS.get().is_some()
}

impl EventQueue {
    /// The counters, for the metrics.
    pub fn counts(&self) -> gannet_metrics::EventCounts {
        gannet_metrics::EventCounts {
            posted: self.posted.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed_posts: self.failed_posts.load(Ordering::Relaxed),
            buffered: self.queue.len() as u64,
        }
    }
}

/// Queues an event; never waits. Dropped (and counted) when the buffer is full.
pub fn emit(body: EventBody) {
    let Some(events) = EVENTS.get() else { return };
    let seq = events.next.fetch_add(1, Ordering::Relaxed);
    let event = Event {
        id: format!("{}-{seq}", events.run),
        time_unix_ms: unix_ms(),
        body,
    };
    if events.queue.push(event).is_err() {
        let dropped = events.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if !events.dropping.swap(true, Ordering::Relaxed) {
            warn!("event buffer full (events.buffer_events_max = {}): events are dropped until the webhook catches up ({dropped} so far)", events.queue.capacity());
        }
    }
}

/// Starts the poster thread when `[events] url` is set.
pub fn start(config: &EventsConfig) -> Result<(), String> {
    if !config.enabled() {
        return Ok(());
    }
    let run = format!("{:x}-{:x}", unix_ms(), std::process::id());
    let events = Arc::new(EventQueue {
        queue: ArrayQueue::new(config.buffer_events_max),
        run,
        next: AtomicU64::new(0),
        posted: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        failed_posts: AtomicU64::new(0),
        dropping: AtomicBool::new(false),
    });
    EVENTS
        .set(events.clone())
        .map_err(|_| "the event webhook is already running".to_string())?;
    info!("delivery events go to {}", config.url);
    let config = config.clone();
    std::thread::Builder::new()
        .name("events".into())
        .spawn(move || post_forever(&events, &config))
        .map_err(|e| format!("cannot start the event poster thread: {e}"))?;
    Ok(())
}

/// The poster: batches off the queue, POSTed in order, each retried until it is taken.
fn post_forever(events: &EventQueue, config: &EventsConfig) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(config.timeout.0))
        .build()
        .into();
    let mut batch: Vec<Event> = Vec::with_capacity(config.batch_events_max);
    let mut delay = config.retry_first.0;
    let mut failing = false;
    let mut stopping_since = None;
    loop {
        let stopping = crate::server::signals::shutdown_requested();
        if stopping && stopping_since.is_none() {
            stopping_since = Some(std::time::Instant::now());
        }
        while batch.len() < config.batch_events_max {
            match events.queue.pop() {
                Some(e) => batch.push(e),
                None => break,
            }
        }
        if batch.is_empty() {
            if stopping {
                return;
            }
            events.dropping.store(false, Ordering::Relaxed);
            std::thread::sleep(IDLE_POLL);
            continue;
        }
        if stopping_since.is_some_and(|t| t.elapsed() > SHUTDOWN_FLUSH_MAX) {
            warn!(
                "stopping with {} undelivered event(s)",
                batch.len() + events.queue.len()
            );
            return;
        }
        match post(&agent, &config.url, &batch) {
            Ok(()) => {
                events.posted.fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
                delay = config.retry_first.0;
                if std::mem::take(&mut failing) {
                    info!("event webhook {} takes events again", config.url);
                }
            }
            Err(why) => {
                events.failed_posts.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut failing, true) {
                    warn!(
                        "event webhook {}: {why}; retrying the batch of {} every {:?} or more",
                        config.url,
                        batch.len(),
                        delay
                    );
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(config.retry_max.0);
            }
        }
    }
}

#[derive(Serialize)]
struct Batch<'a> {
    events: &'a [Event],
}

/// Why a batch was not taken (it is posted again).
#[derive(Debug)]
enum PostError {
    Encode(serde_json::Error),
    Transport(ureq::Error),
    Status(u16),
}

impl std::fmt::Display for PostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostError::Encode(e) => write!(f, "cannot encode the batch: {e}"),
            PostError::Transport(e) => write!(f, "{e}"),
            PostError::Status(status) => write!(f, "answered {status}"),
        }
    }
}

fn post(agent: &ureq::Agent, url: &str, batch: &[Event]) -> Result<(), PostError> {
    let body = serde_json::to_string(&Batch { events: batch }).map_err(PostError::Encode)?;
    let response = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(PostError::Transport)?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(PostError::Status(status))
    }
}
