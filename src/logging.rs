//! The server's log: tracing events to stderr as text, logfmt or JSON lines (`[log]`), with a
//! level or filter that SIGHUP can change, as can the format.
//!
//! Lines go through a lock-free channel to one writer thread, so shards never wait on each
//! other for the stderr lock. That thread starts only once the server has dropped its
//! privileges ([`start_writer_thread`]), so that it too runs with none; until then lines are
//! written to stderr directly.

use std::sync::{Mutex, OnceLock};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::writer::{EitherWriter, MakeWriter};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{Log, LogFormat};

/// Always added to the configured level: glommio's reactor logs an ERROR when its IOPOLL probe
/// fails on our write-only spool files, which is the intended outcome (the appender is opened
/// write-only so that the executor does not busy-poll).
const QUIET_TARGETS: &str = "glommio::reactor=off";
/// The environment variable that overrides `log.level` (and then SIGHUP leaves the level).
pub const LEVEL_VARIABLE: &str = "GANNET_LOG";
/// Log lines queued for the writer thread at most: past it lines are dropped, never waited
/// for (the default of 128,000 preallocates 4 MB).
const BACKLOG_LINES_MAX: usize = 16_384;

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type FormatLayer = Box<dyn Layer<Filtered> + Send + Sync>;

struct Handles {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<FormatLayer, Filtered>,
    /// GANNET_LOG was set: the level is the environment's, whatever the file says.
    level_from_environment: bool,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();
static WRITER: OnceLock<NonBlocking> = OnceLock::new();
static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Makes each event's writer: the writer thread once it runs, stderr before.
#[derive(Clone, Copy)]
struct Writer;

impl<'a> MakeWriter<'a> for Writer {
    type Writer = EitherWriter<NonBlocking, std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        match WRITER.get() {
            Some(writer) => EitherWriter::A(writer.clone()),
            None => EitherWriter::B(std::io::stderr()),
        }
    }
}

fn filter(log: &Log) -> (EnvFilter, bool) {
    match std::env::var(LEVEL_VARIABLE) {
        Ok(directives) if !directives.trim().is_empty() => (
            EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET_TARGETS}"))),
            true,
        ),
        _ => (EnvFilter::new(format!("{},{QUIET_TARGETS}", log.level)), false),
    }
}

fn format_layer(format: LogFormat) -> FormatLayer {
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(Writer)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(Writer)
            .with_target(false)
            .boxed(),
        LogFormat::Logfmt => tracing_logfmt::builder()
            .with_target(false)
            .with_span_name(false)
            .with_span_path(false)
            .layer()
            .with_writer(Writer)
            .boxed(),
    }
}

/// Installs the process's subscriber. Call once, before anything logs.
pub fn init(log: &Log) {
    let (filter, level_from_environment) = filter(log);
    let (filter, filter_handle) = reload::Layer::new(filter);
    let (format, format_handle) = reload::Layer::new(format_layer(log.format));
    tracing_subscriber::registry().with(filter).with(format).init();
    let _ = HANDLES.set(Handles {
        filter: filter_handle,
        format: format_handle,
        level_from_environment,
    });
}

/// Starts the writer thread (after the privilege drop; see the module's comment).
pub fn start_writer_thread() {
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(BACKLOG_LINES_MAX)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    if WRITER.set(writer).is_ok() {
        *GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    }
}

/// Writes out what the writer thread still holds; call before the process exits.
pub fn finish() {
    drop(GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
}

/// SIGHUP: the level and the format of `log` from now on. Returns what it did, for the log.
pub fn reconfigure(log: &Log) -> String {
    let Some(handles) = HANDLES.get() else {
        return "log: not initialised".into();
    };
    let level = if handles.level_from_environment {
        format!("level kept from {LEVEL_VARIABLE}")
    } else {
        match handles.filter.reload(filter(log).0) {
            Ok(()) => format!("level {}", log.level),
            Err(e) => format!("level unchanged ({e})"),
        }
    };
    let format = match handles.format.reload(format_layer(log.format)) {
        Ok(()) => format!("format {:?}", log.format).to_lowercase(),
        Err(e) => format!("format unchanged ({e})"),
    };
    format!("log {level}, {format}")
}
