//! Why the shared DNS cache is papaya's lock-free map: lookups per second from two threads at
//! once (as two shards would), against the obvious alternatives. Run with
//! `cargo bench --bench dns_cache`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gannet_dns::cache::{CacheLimits, DnsCache};
use gannet_dns::message::Answer;
use hickory_proto::rr::RecordType;

const NAMES: usize = 10_000;
const THREADS: usize = 2;

fn names() -> Vec<String> {
    (0..NAMES).map(|i| format!("mx{i}.example{}.com", i % 97)).collect()
}

/// Runs `lookup` `iters` times on each of THREADS threads at once; returns the wall time.
fn concurrent(iters: u64, lookup: Arc<dyn Fn(usize) -> bool + Send + Sync>) -> Duration {
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (barrier, lookup) = (barrier.clone(), lookup.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut hits = 0u64;
                for i in 0..iters as usize {
                    hits += u64::from(lookup((i * 7919 + t * 104_729) % NAMES));
                }
                black_box(hits);
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    t0.elapsed()
}

fn bench(c: &mut Criterion) {
    let names = Arc::new(names());
    let mut group = c.benchmark_group("dns_cache_read_2_threads");
    group.throughput(Throughput::Elements(THREADS as u64));

    let cache = DnsCache::new(CacheLimits {
        entries_max: NAMES * 2,
        ttl_min: Duration::from_secs(3600),
        ttl_max: Duration::from_secs(3600),
        negative_ttl_max: Duration::from_secs(3600),
        failure_ttl: Duration::from_secs(3600),
    });
    let now = Instant::now();
    for n in names.iter() {
        cache.insert(
            n,
            RecordType::MX,
            Answer::Mx(vec![(10, "mx.example.com".into())]),
            3600,
            now,
        );
    }
    let (c1, n1) = (cache.clone(), names.clone());
    group.bench_function("papaya (DnsCache)", |b| {
        let (c1, n1) = (c1.clone(), n1.clone());
        b.iter_custom(move |iters| {
            let (c1, n1) = (c1.clone(), n1.clone());
            concurrent(iters, Arc::new(move |i| c1.get(&n1[i], RecordType::MX, now).is_some()))
        })
    });

    let map: HashMap<(String, u16), Arc<Answer>> = names
        .iter()
        .map(|n| {
            (
                (n.clone(), 15u16),
                Arc::new(Answer::Mx(vec![(10, "mx.example.com".into())])),
            )
        })
        .collect();
    let rw = Arc::new(RwLock::new(map.clone()));
    let n2 = names.clone();
    group.bench_function("RwLock<HashMap>", |b| {
        let (rw, n2) = (rw.clone(), n2.clone());
        b.iter_custom(move |iters| {
            let (rw, n2) = (rw.clone(), n2.clone());
            concurrent(
                iters,
                Arc::new(move |i| rw.read().unwrap().get(&(n2[i].clone(), 15)).cloned().is_some()),
            )
        })
    });
    let mx = Arc::new(Mutex::new(map));
    let n3 = names.clone();
    group.bench_function("Mutex<HashMap>", |b| {
        let (mx, n3) = (mx.clone(), n3.clone());
        b.iter_custom(move |iters| {
            let (mx, n3) = (mx.clone(), n3.clone());
            concurrent(
                iters,
                Arc::new(move |i| mx.lock().unwrap().get(&(n3[i].clone(), 15)).cloned().is_some()),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
