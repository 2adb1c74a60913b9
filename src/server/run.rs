//! One shard's life: recovery of its spool (before it serves), the start of its appender,
//! deliverer and accept loops, serving until shutdown, and the drain (transactions in flight
//! finish, then the rest get 421 4.3.2, then delivery state is written).

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gannet_sched::{QueueIndex, Scheduler};
use glommio::net::TcpListener;
use tracing::{error, info, warn};

use super::reloadable::Reloadable;
use super::shard::{AllGone, Shard, Stage};
use super::{connection, signals};
use crate::config::{system_dns_servers, Config};
use crate::delivery::Deliverer;
use crate::dns::cache::DnsCache;
use crate::dns::resolver::Resolver;
use crate::spool::appender::{Appender, AppenderConfig, ExistingSegment, Liveness};
use crate::spool::mapped::MappedSegment;
use crate::spool::recovery::{list_segments, quarantine, scan_segment, Damage};
use crate::spool::shard_dir;

/// How often a shard looks at the process-wide shutdown flag (and the queue flush counter).
const SHUTDOWN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Every this many polls (5 s) a shard hands the allocator's freed pages back to the system.
const MEMORY_COLLECT_POLLS: u64 = 50;

/// Asks mimalloc to return this thread's freed memory to the system (`force`: also what it
/// would keep for reuse). Freed memory is otherwise purged only as the thread allocates again;
/// measured, 100,000 queued messages took 72-81 MB of PSS after a restart without this and
/// 48 MB with purging at once (benches/queued-memory).
pub(crate) fn give_back_memory(force: bool) {
    // SAFETY: mi_collect only walks and releases the calling thread's own heap; it has no
    // preconditions. Runs on every shard of every server test.
    unsafe { libmimalloc_sys::mi_collect(force) }
}

/// After the shutdown deadline, how long cut-off sessions get to send their 421 and go.
const FORCED_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why a shard could not start.
#[derive(Debug)]
pub enum ShardError {
    /// A spool directory or segment could not be created, listed or read.
    Spool {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The appender could not open the shard's directory.
    Appender(io::Error),
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardError::Spool { action, path, source } => write!(f, "cannot {action} {}: {source}", path.display()),
            ShardError::Appender(e) => write!(f, "cannot open spool: {e}"),
        }
    }
}

impl std::error::Error for ShardError {}

fn spool_error<'a>(action: &'static str, path: &'a std::path::Path) -> impl FnOnce(io::Error) -> ShardError + 'a {
    move |source| ShardError::Spool {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Reads this shard's spool back: its own directory and those of shards that no longer exist
/// (`shard + k * shard_count`), so that lowering the shard count never strands mail.
/// Returns the queue index, the segments in the shard's own directory (oldest first), and the
/// next segment sequence number.
fn recover(
    config: &Config,
    shard: u16,
    shard_count: usize,
) -> Result<(QueueIndex, Vec<ExistingSegment>, u64), ShardError> {
    let spool = &config.spool.directory;
    let own_dir = shard_dir(spool, shard);
    std::fs::create_dir_all(&own_dir).map_err(spool_error("create", &own_dir))?;
    let mut index = QueueIndex::default();
    let mut own_segments = Vec::new();
    let mut next_seq = 0;
    let mut adopted = u32::from(shard);
    loop {
        let dir = shard_dir(spool, adopted as u16);
        if adopted != u32::from(shard) && !dir.exists() {
            break;
        }
        // Half-made segments from a crash during preparation hold nothing.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".seg.tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let segments = list_segments(&dir).map_err(spool_error("list", &dir))?;
        for (seq, path) in &segments {
            let mapped = MappedSegment::open(path).map_err(spool_error("read", path))?;
            let buf = mapped.bytes();
            let scan = scan_segment(buf, adopted as u16, *seq);
            for damage in &scan.damage {
                match *damage {
                    Damage::TornTail { offset } => {
                        info!(
                            shard,
                            "segment {}: unacknowledged torn tail at offset {offset} cut off",
                            path.display()
                        );
                    }
                    Damage::Corrupt { offset, len, reason } => {
                        match quarantine(spool, adopted as u16, *seq, buf, offset, len) {
                            Ok(q) => error!(shard, "segment {}: record at offset {offset} is damaged ({reason}); quarantined as {}", path.display(), q.display()),
                            Err(e) => error!(shard, "segment {}: record at offset {offset} is damaged ({reason}); could not quarantine it: {e}", path.display()),
                        }
                    }
                }
            }
            // One segment at a time: a restart holds the index and one segment's scan, never
            // every record of the spool at once.
            index.apply_segment(scan);
            if adopted == u32::from(shard) {
                own_segments.push(ExistingSegment {
                    seq: *seq,
                    len_bytes: buf.len() as u64,
                });
                next_seq = next_seq.max(seq + 1);
            }
        }
        adopted += shard_count as u32;
        if adopted > u32::from(u16::MAX) {
            break;
        }
    }
    Ok((index, own_segments, next_seq))
}

/// What a shard starts with.
pub struct ShardSetup {
    pub index: u16,
    pub shard_count: usize,
    pub config: Arc<Config>,
    /// Bound, listening sockets, one per listener, for this shard alone.
    pub listener_fds: Vec<RawFd>,
    pub dns_cache: Arc<DnsCache>,
    pub reloadable: Arc<Reloadable>,
    /// This shard's end of the admin API's channels, when the admin API is on.
    pub control: Option<crate::admin::ShardEnd>,
    /// Destinations suspended when the server started.
    pub suspended: Arc<Vec<crate::admin::suspensions::SuspensionRecord>>,
    /// The admin listener, on the shard that hosts it (shard 0).
    pub admin: Option<crate::admin::AdminSetup>,
}

/// Runs a shard until shutdown.
pub async fn run(setup: ShardSetup, ready: mpsc::Sender<Result<u16, String>>) -> Result<(), ShardError> {
    let ShardSetup {
        index,
        shard_count,
        config,
        listener_fds,
        dns_cache,
        reloadable,
        control,
        suspended,
        admin,
    } = setup;
    crate::metrics::install(
        config.listeners.len(),
        gannet_metrics::MetricsLimits {
            destinations_max: config.admin.metrics_destinations_max,
            destination_label_after_attempts: config.admin.metrics_destination_attempts_min,
        },
    );
    let (appender, sched) = open_spool(&config, index, shard_count).await?;
    let dns_servers = if config.dns.servers.is_empty() {
        system_dns_servers()
    } else {
        config.dns.servers.clone()
    };
    let resolver = Resolver::new(dns_servers, config.dns.timeout.0, config.dns.attempts, dns_cache, index);
    let deliverer = Deliverer::new(index, config.clone(), appender.clone(), sched, resolver);
    deliverer.start_suspended(&suspended);
    deliverer.start();
    let shard = Shard::new(index, config.clone(), appender, deliverer, reloadable);
    let accept_tasks = accept_loops(&shard, listener_fds, &config);
    let control_task = control.map(|end| glommio::spawn_local(super::control::serve(end, shard.clone())));
    let admin_task = admin.map(|setup| serve_admin(setup, shard.clone()));
    let _ = ready.send(Ok(index));
    serve_until_shutdown(&shard).await;
    // Stop accepting: cancelling the accept loops drops (closes) this shard's listening sockets.
    drop(accept_tasks);
    drain(&shard).await;
    drop(admin_task);
    drop(control_task);
    Ok(())
}

/// Recovers the shard's spool into a scheduler and opens its appender over it.
async fn open_spool(
    config: &Config,
    index: u16,
    shard_count: usize,
) -> Result<(Rc<Appender>, Rc<RefCell<Scheduler>>), ShardError> {
    let started = Instant::now();
    let (queue, own_segments, next_seq) = recover(config, index, shard_count)?;
    let appender_config = AppenderConfig {
        shard: index,
        dir: shard_dir(&config.spool.directory, index),
        segment_bytes: config.spool.segment_size.0,
        segments_max: config.segments_per_shard_max(shard_count),
        min_free_bytes: config.spool.min_free.0,
        durability: config.spool.durability,
        inflight_bytes_max: config.spool.memory_max.0 as usize,
    };
    let recovered = queue.len();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let sched = Rc::new(RefCell::new(Scheduler::new(
        config.sched_config(index, shard_count, seed),
        queue,
    )));
    let live: Liveness = {
        let sched = sched.clone();
        // A borrow held elsewhere cannot happen (no borrow lives across an await); if it did,
        // "live" is the safe answer.
        Rc::new(move |seq| {
            sched
                .try_borrow()
                .map_or(true, |s| s.queue().segment_is_live(index, seq))
        })
    };
    let appender = Appender::open(appender_config, &own_segments, next_seq, live)
        .await
        .map_err(ShardError::Appender)?;
    info!(
        shard = index,
        "recovered {recovered} spooled message(s) in {:?}",
        started.elapsed()
    );
    Ok((appender, sched))
}

/// CPU shares of the admin listener's task queue against the default queue's 1000: when both
/// have work, SMTP gets the core nearly to itself.
const ADMIN_SHARES: usize = 50;

/// Starts the admin listener in a task queue of its own.
fn serve_admin(setup: crate::admin::AdminSetup, shard: Rc<Shard>) -> glommio::Task<()> {
    let executor = glommio::executor();
    let queue = executor.create_task_queue(
        glommio::Shares::Static(ADMIN_SHARES),
        glommio::Latency::NotImportant,
        "admin",
    );
    glommio::spawn_local_into(crate::admin::serve(setup, shard), queue).expect("a task queue just created exists")
}

/// One accept loop per listener, each connection served by a task of its own.
fn accept_loops(shard: &Rc<Shard>, listener_fds: Vec<RawFd>, config: &Config) -> Vec<glommio::Task<()>> {
    let mut tasks = Vec::with_capacity(listener_fds.len());
    for (listener_index, (fd, listener_config)) in listener_fds.into_iter().zip(&config.listeners).enumerate() {
        // SAFETY: `fd` is a bound, listening TCP socket created for this shard alone by
        // `server::serve`, which gave up ownership with into_raw_fd; nothing else closes it.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        let shard = shard.clone();
        let listener_config = listener_config.clone();
        tasks.push(glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(connection::serve(
                            stream,
                            shard.clone(),
                            listener_config.clone(),
                            listener_index,
                        ))
                        .detach();
                    }
                    Err(e) => {
                        warn!(shard = shard.index, "accept failed: {e}");
                        // Out of file descriptors and the like: back off instead of spinning.
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    tasks
}

/// Serves until a shutdown signal: queue flushes on SIGUSR1, freed memory handed back now and
/// then.
async fn serve_until_shutdown(shard: &Shard) {
    let mut flushes_seen = signals::flush_generation();
    // Recovery's and start-up's transient memory goes back to the system now, not whenever the
    // allocator next runs on this thread (a shard with a full queue and no traffic may not).
    give_back_memory(true);
    let mut polls = 0u64;
    while !signals::shutdown_requested() {
        glommio::timer::sleep(SHUTDOWN_POLL_INTERVAL).await;
        polls += 1;
        if polls % MEMORY_COLLECT_POLLS == 0 {
            give_back_memory(false);
        }
        shard.take_reloaded_config();
        let flushes = signals::flush_generation();
        if flushes != flushes_seen {
            flushes_seen = flushes;
            let retried = shard.deliverer.retry_all_now();
            info!(
                shard = shard.index,
                "queue flush: {retried} deferred message(s) retried now"
            );
        }
    }
}

/// Lets transactions in flight finish until `server.shutdown_timeout`, closes the rest with
/// 421, then writes the delivery state.
async fn drain(shard: &Shard) {
    shard.advance(Stage::Draining);
    let deadline = shard.config().server.shutdown_timeout.0;
    let drained = glommio::timer::timeout(deadline, async {
        AllGone { shard }.await;
        Ok(())
    })
    .await
    .is_ok();
    if !drained {
        warn!(
            shard = shard.index,
            "shutdown timeout: closing {} session(s) with 421",
            shard.sessions_open()
        );
        shard.advance(Stage::Forced);
        let _ = glommio::timer::timeout(FORCED_CLOSE_GRACE, async {
            AllGone { shard }.await;
            Ok(())
        })
        .await;
    }
    // Every acknowledged message was already durable when it was acknowledged; what is left is
    // delivery state, written now so that a clean stop never repeats a delivery.
    shard.deliverer.flush_state().await;
    let queued = shard.deliverer.queued();
    info!(shard = shard.index, "stopped with {queued} message(s) spooled");
}
