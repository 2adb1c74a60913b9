//! The suppression check on the RCPT path: lookups per second in a list of a million entries
//! (a hit, a miss on a global entry, a miss that also tries the sender's domain), and the
//! memory one entry takes (resident set growth while a million are inserted, printed once).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gannet_suppress::{Entry, Scope, Source, SuppressionList};

const ENTRIES: usize = 1_000_000;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn filled() -> SuppressionList {
    let before = resident_bytes();
    let list = SuppressionList::new(ENTRIES);
    for i in 0..ENTRIES {
        let entry = Entry::new(
            "550 5.1.1 The email account that you tried to reach does not exist.",
            Source::HardBounce,
            1_796_000_000,
            0,
        );
        list.insert(&Scope::Global, &format!("user{i}@example{}.com", i % 1000), entry, 0)
            .expect("room");
    }
    let grown = resident_bytes().saturating_sub(before);
    eprintln!(
        "suppression list: {ENTRIES} entries, resident set grew {} MB: {} bytes per entry (70-byte reason, ~22-byte address)",
        grown / 1_000_000,
        grown / ENTRIES as u64
    );
    list
}

fn lookups(c: &mut Criterion) {
    let list = filled();
    let mut group = c.benchmark_group("suppression_check_1m");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hit", |b| {
        b.iter(|| list.check(black_box(b"<User123456@Example456.com>"), b"sender.example", 1))
    });
    group.bench_function("miss_global_only", |b| {
        b.iter(|| list.check(black_box(b"nobody@example.org"), b"", 1))
    });
    group.bench_function("miss_with_sender_scope", |b| {
        b.iter(|| list.check(black_box(b"nobody@example.org"), b"sender.example", 1))
    });
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
