//! The server: everything that touches threads, sockets and signals. The protocol logic it drives
//! lives in [`crate::smtp`] and [`crate::spool`].
//!
//! Start-up order: check the configuration against this machine, take the spool lock, make sure no
//! other process listens on our addresses, bind one SO_REUSEPORT socket per listener per shard,
//! then start one glommio executor per shard, each pinned to its own CPU. A shard recovers its
//! spool, adopts its sockets and reports ready; once all have, the server logs `ready`.

pub mod connection;
pub mod control;
pub mod lock;
pub mod notify;
pub mod privileges;
pub mod proxy;
pub mod reloadable;
pub mod run;
pub mod sched;
pub mod shard;
pub mod signals;
mod signing;
pub mod tls;
mod verification;

use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::config::Config;
use crate::dns::cache::{CacheLimits, DnsCache};
use crate::spool::Durability;

/// The huge page io_uring may charge a registered buffer by (x86-64's 2 MiB).
const HUGE_PAGE_BYTES: u64 = 2 << 20;

/// Backlog of each listening socket.
const LISTEN_BACKLOG: i32 = 1024;

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set we own; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it, and CPU_ISSET only reads it. Covered by every test
    // that starts the server (shards are pinned to these CPUs).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Raises the soft locked-memory limit to the hard limit: io_uring's registered buffers are
/// locked memory (see tuning/memlock.md). Returns the soft limit in force afterwards.
fn raise_memlock_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the rlimit struct we own.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

/// Binds one listening socket with SO_REUSEPORT.
fn bind_reuseport(address: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// How long start-up waits for a listening address still held by a previous instance.
const ADDRESS_IN_USE_WAIT: Duration = Duration::from_secs(3);

/// Checks that nobody listens on `address` with a plain bind (no SO_REUSEPORT). A previous
/// instance killed a moment ago can still hold its listening socket: io_uring tears down a dead
/// process's ring in a kernel work queue, after the process is gone. So "address in use" is
/// retried for a few seconds before it counts.
fn probe_address(address: SocketAddr) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + ADDRESS_IN_USE_WAIT;
    loop {
        match std::net::TcpListener::bind(address) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the server until a shutdown signal; returns an error message for start-up failures.
pub fn serve(mut config: Config, source_name: &str) -> Result<(), String> {
    let cpus = allowed_cpus();
    let shards = config.shard_count(cpus.len());
    config
        .validate_for_shards(shards, cpus.len(), source_name)
        .map_err(|e| e.to_string())?;
    crate::delivery::pauses::init(shards);

    let privileges = privileges::plan(&config.server, source_name == crate::config::EMBEDDED_DEFAULT_NAME)?;
    let memlock = raise_memlock_limit();
    let io_memory = config.server.io_memory.0 as usize;
    // glommio registers the buffer once per ring (three rings per executor), and io_uring
    // charges whole huge pages when the buffer sits in one (transparent huge pages): measured
    // as an unprivileged user, one shard at 1 MiB pinned 6 MiB and needed a 7 MiB limit.
    let needed = 3 * (io_memory as u64).next_multiple_of(HUGE_PAGE_BYTES) * shards as u64;
    if memlock < needed {
        warn!("locked-memory limit is {memlock} bytes, below the {needed} that server.io_memory = {} for {shards} shards registers; storage I/O falls back to unregistered buffers (see tuning/memlock.md)", config.server.io_memory);
    }

    std::fs::create_dir_all(&config.spool.directory).map_err(|e| {
        format!(
            "cannot create spool directory {}: {e}",
            config.spool.directory.display()
        )
    })?;
    // Absolute from here on: glommio's Directory::open hands relative paths to openat with an
    // invalid directory descriptor (EBADF), and absolute paths make clearer log lines anyway.
    config.spool.directory = std::fs::canonicalize(&config.spool.directory).map_err(|e| {
        format!(
            "cannot resolve spool directory {}: {e}",
            config.spool.directory.display()
        )
    })?;
    let lock = lock::SpoolLock::acquire(&config.spool.directory)?;
    let reloadable = Arc::new(reloadable::Reloadable::load(
        &config,
        &config.spool.directory,
        (source_name != crate::config::EMBEDDED_DEFAULT_NAME).then(|| std::path::PathBuf::from(source_name)),
    )?);
    for listener in &config.listeners {
        if listener.requires_auth() && !reloadable.auth_configured() {
            warn!(
                "{} ({:?}) requires AUTH before MAIL but auth.password_file is not set: it will refuse all mail with 530 5.7.0",
                listener.address, listener.kind
            );
        }
    }

    if config.spool.durability == Durability::None {
        warn!("spool.durability = \"none\": mail is acknowledged before it is on stable storage and a crash loses it; use this for benchmarks only");
    }

    // SO_REUSEPORT lets a second process share our port silently; a plain bind first proves that
    // nobody else is listening there.
    for listener in &config.listeners {
        probe_address(listener.address).map_err(|e| {
            format!(
                "cannot listen on {} ({:?}): {e}; is another server running there?",
                listener.address, listener.kind
            )
        })?;
    }
    let mut shard_fds: Vec<Vec<RawFd>> = Vec::with_capacity(shards);
    for _ in 0..shards {
        let mut fds = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            let socket =
                bind_reuseport(listener.address).map_err(|e| format!("cannot listen on {}: {e}", listener.address))?;
            fds.push(socket.into_raw_fd());
        }
        shard_fds.push(fds);
    }

    let dns_cache = DnsCache::new(CacheLimits {
        entries_max: config.dns.cache_entries_max,
        ttl_min: config.dns.ttl_min.0,
        ttl_max: config.dns.ttl_max.0,
        negative_ttl_max: config.dns.negative_ttl_max.0,
        failure_ttl: config.dns.failure_ttl.0,
    });
    let suspended = crate::admin::suspensions::load(&config.spool.directory, crate::smtp::received::unix_now_s())?;
    // Before the privileges drop: the journal is created here and given to the account with the spool.
    crate::suppression::open(&config, crate::smtp::received::unix_now_s())?;
    crate::verp::open(&config)?;
    let config = Arc::new(config);
    let mut control_ends: Vec<Option<crate::admin::ShardEnd>> = (0..shards).map(|_| None).collect();
    let mut admin = if config.admin.enabled {
        let (shard_ends, admin_ends) = crate::admin::channels(shards);
        // Shard 0 hosts the admin listener and answers it directly: no channel of its own.
        control_ends = std::iter::once(None).chain(shard_ends.into_iter().map(Some)).collect();
        Some(crate::admin::prepare(config.clone(), admin_ends, suspended.clone())?)
    } else {
        None
    };
    // Everything privileged is done: sockets bound, spool locked, keys and certificates read.
    if let privileges::Plan::Become(account) = &privileges {
        let changed = privileges::chown_spool(&config.spool.directory, account)?;
        if changed > 0 {
            info!("gave {changed} spool entries to {}", account.user);
        }
    }
    privileges::drop_privileges(&privileges)?;
    crate::logging::start_writer_thread();
    signals::install(reloadable.clone()).map_err(|e| format!("cannot install signal handlers: {e}"))?;
    crate::events::start(&config.events)?;
    let suspended_shared = Arc::new(suspended);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<u16, String>>();
    let mut handles = Vec::with_capacity(shards);
    for ((index, fds), control) in shard_fds.into_iter().enumerate().zip(control_ends) {
        let config = config.clone();
        let dns_cache = dns_cache.clone();
        let reloadable = reloadable.clone();
        let ready_tx = ready_tx.clone();
        let suspended = suspended_shared.clone();
        // The admin listener lives on shard 0.
        let admin = if index == 0 { admin.take() } else { None };
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpus[index]))
            .name(&format!("shard-{index}"))
            .io_memory(io_memory);
        if !config.server.spin_before_park.0.is_zero() {
            builder = builder.spin_before_park(config.server.spin_before_park.0);
        }
        let handle = builder
            .spawn(move || async move {
                let shard = index as u16;
                let slice = config.server.sched_slice.0;
                if !slice.is_zero() {
                    if let Err(e) = sched::set_current_thread_slice(slice) {
                        warn!(shard, "cannot set the scheduler slice (server.sched_slice): {e}; running with the kernel's default");
                    }
                }
                let result = run::run(
                    run::ShardSetup {
                        index: shard,
                        shard_count: shards,
                        config,
                        listener_fds: fds,
                        dns_cache,
                        reloadable,
                        control,
                        suspended,
                        admin,
                    },
                    ready_tx.clone(),
                )
                .await;
                if let Err(e) = &result {
                    let _ = ready_tx.send(Err(format!("shard {shard}: {e}")));
                }
                result
            })
            .map_err(|e| format!("cannot start shard {index} on CPU {}: {e}", cpus[index]))?;
        handles.push(handle);
    }
    drop(ready_tx);

    let mut ready = 0;
    while ready < shards {
        match ready_rx.recv() {
            Ok(Ok(_)) => ready += 1,
            Ok(Err(e)) => {
                signals::request_shutdown();
                for handle in handles {
                    let _ = handle.join();
                }
                return Err(e);
            }
            Err(_) => return Err("a shard stopped during start-up".into()),
        }
    }
    let addresses: Vec<String> = config
        .listeners
        .iter()
        .map(|l| format!("{} ({:?})", l.address, l.kind).to_lowercase())
        .collect();
    info!("ready: {shards} shards serving on {}", addresses.join(", "));
    notify::ready(&format!("{shards} shards serving"));

    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e.to_string()),
            Err(e) => failure = Some(format!("shard failed: {e}")),
        }
    }
    drop(lock);
    match failure {
        None => {
            info!("stopped");
            Ok(())
        }
        Some(e) => Err(e),
    }
}
