//! The delivery simulator's fixed seeds (CI).

use gannet_sim::delivery::{run, DeliverySimConfig};

const SEEDS: std::ops::Range<u64> = 0..40;

#[test]
fn every_recipient_ends_delivered_or_bounced_and_fresh_mail_is_never_starved() {
    let (mut messages, mut attempts, mut bounces, mut dups, mut longest) = (0, 0, 0, 0, std::time::Duration::ZERO);
    let (mut unreachable, mut probes) = (0, 0);
    for seed in SEEDS {
        let report = run(seed, &DeliverySimConfig::CI);
        assert!(
            report.violations.is_empty(),
            "seed {seed}: {:?}",
            &report.violations[..report.violations.len().min(10)]
        );
        messages += report.messages;
        attempts += report.attempts;
        bounces += report.bounces;
        dups += report.duplicates;
        longest = longest.max(report.longest_fresh_wait);
        unreachable += report.unreachable_attempts;
        probes += report.probes;
    }
    eprintln!("{} seeds: {messages} messages, {attempts} attempts, {bounces} bounces, {dups} duplicates after drops past the dot, longest fresh wait {longest:?}; {unreachable} connection attempts to unreachable providers, {probes} of them probes", SEEDS.end);
    assert!(bounces > 0 && dups > 0, "the runs exercised failures and drops");
    assert!(probes > 0, "the runs exercised destinations down and their probes");
}
