//! Spool append + group commit: durable messages per second on one shard, with many concurrent
//! writers (group commit) against one writer (one fdatasync per message) and against the disk's
//! raw write + fdatasync rate. Run with `cargo bench --bench spool`; figures in messages/s.
//!
//! The spool lives in `GANNET_BENCH_DIR` (default: the system temp directory): put it on the disk
//! you want to measure.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gannet::smtp::envelope::{Envelope, Origin};
use gannet::smtp::session::MessageSink;
use gannet::spool::appender::{Appender, AppenderConfig};
use gannet::spool::Durability;
use glommio::io::{DmaFile, OpenOptions};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("GANNET_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn executor() -> LocalExecutor {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .unwrap()
}

fn envelope() -> Envelope {
    let mut env = Envelope::default();
    env.set_sender(|b| b.extend_from_slice(b"sender@bench.test"));
    env.add_recipient(|b| b.extend_from_slice(b"rcpt@remote.test"), 0, b"");
    env
}

/// Commits `total` messages of `size` bytes from `writers` concurrent tasks; returns the time.
async fn commit_many(appender: &Rc<Appender>, total: u64, writers: u64, size: usize) -> Duration {
    let content = Rc::new(vec![b'x'; size]);
    let env = Rc::new(envelope());
    let left = Rc::new(RefCell::new(total));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (appender, content, env, left) = (appender.clone(), content.clone(), env.clone(), left.clone());
        tasks.push(glommio::spawn_local(async move {
            let mut buffer = appender.message_buffer();
            loop {
                {
                    let mut n = left.borrow_mut();
                    if *n == 0 {
                        break;
                    }
                    *n -= 1;
                }
                let origin = Origin {
                    client_ip: "127.0.0.1".parse().unwrap(),
                    helo: b"bench",
                    received_unix_s: 0,
                };
                buffer.begin(&env, origin).unwrap();
                buffer.append(&content).unwrap();
                appender.commit(buffer.take()).await.expect("commit");
            }
        }));
    }
    for task in tasks {
        task.await;
    }
    t0.elapsed()
}

/// fdatasync-bound benchmarks: few samples, messages/s.
fn commit_group(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group("spool_commit");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(1));
    group
}

fn bench_group_commit(c: &mut Criterion) {
    let mut group = commit_group(c);
    for (label, size) in [("4KiB", 4 * 1024 - 512), ("100KiB", 100 * 1024)] {
        for writers in [1u64, 50] {
            let dir = bench_dir();
            let ex = executor();
            let config = AppenderConfig {
                shard: 0,
                dir: dir.path().to_path_buf(),
                segment_bytes: 256 << 20,
                segments_max: 1 << 20,
                min_free_bytes: 1 << 30,
                durability: Durability::Fsync,
                inflight_bytes_max: 256 << 20,
            };
            let appender = ex.run(async move {
                Appender::open(config, &[], 0, std::rc::Rc::new(|_| false))
                    .await
                    .unwrap()
            });
            group.bench_function(format!("{label}/{writers}_writers"), |b| {
                b.iter_custom(|iters| ex.run(commit_many(&appender, iters, writers, size)))
            });
        }
    }
    group.finish();
}

/// The disk's own rate: one 4 KiB O_DIRECT write and one fdatasync per message, in a pre-written
/// file (the same layout the spool uses), no group commit.
fn bench_raw_fdatasync(c: &mut Criterion) {
    let mut group = commit_group(c);
    let dir = bench_dir();
    let ex = executor();
    let path = dir.path().join("raw");
    let file_bytes: u64 = 256 << 20;
    let file: Rc<DmaFile> = ex.run(async move {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .dma_open(&path)
            .await
            .unwrap();
        let mut zeros = glommio::allocate_dma_buffer(1 << 20);
        zeros.as_bytes_mut().fill(0);
        let zeros = Rc::new(zeros);
        for off in (0..file_bytes).step_by(1 << 20) {
            file.write_rc_at(zeros.clone(), off).await.unwrap();
        }
        file.fdatasync().await.unwrap();
        Rc::new(file)
    });
    let pos = Rc::new(RefCell::new(0u64));
    group.bench_function("raw_4KiB_write_fdatasync_each", |b| {
        b.iter_custom(|iters| {
            let (file, pos) = (file.clone(), pos.clone());
            ex.run(async move {
                let t0 = Instant::now();
                for _ in 0..iters {
                    let mut buf = glommio::allocate_dma_buffer(4096);
                    buf.as_bytes_mut().fill(b'r');
                    let at = {
                        let mut p = pos.borrow_mut();
                        let at = *p;
                        *p = (*p + 4096) % file_bytes;
                        at
                    };
                    file.write_at(buf, at).await.unwrap();
                    file.fdatasync().await.unwrap();
                }
                t0.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_group_commit, bench_raw_fdatasync);
criterion_main!(benches);
