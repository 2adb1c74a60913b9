//! What classifying one failure costs with the default rules: a reply the first rule matches,
//! one only the status table classes, and one no rule or code matches (every pattern tried).
//! Classification runs once per failed or deferred recipient, never for delivered mail.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use gannet_bounce::{Failure, Rules};

fn classify(c: &mut Criterion) {
    let rules = Rules::defaults();
    let hosts = ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"];
    let cases = [
        ("gmail_rate", 450, "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered."),
        ("status_only", 550, "5.1.1 <someone@example.com>: Recipient address rejected: User unknown in virtual mailbox table"),
        ("unmatched", 451, "4.3.0 Temporary local problem, please try again later, queue file write error"),
    ];
    let mut group = c.benchmark_group("classify");
    for (name, code, text) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                rules.classify(black_box(&Failure {
                    code,
                    text,
                    mx_hosts: &hosts,
                }))
            })
        });
    }
    group.finish();
    c.bench_function("compile_defaults", |b| b.iter(Rules::defaults));
}

criterion_group!(benches, classify);
criterion_main!(benches);
