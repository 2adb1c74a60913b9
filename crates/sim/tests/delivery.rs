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

#[test]
fn a_throttling_provider_paced_by_its_rule_defers_little_and_starves_no_one() {
    let with_rate = |provider_rate| DeliverySimConfig {
        provider_rate,
        ..DeliverySimConfig::CI
    };
    // Below its throttle; above it (the slow action must catch up); no rule, no action.
    let configs = [with_rate(Some(0.25)), with_rate(Some(1.0)), with_rate(None)];
    let mut totals = [(0usize, 0usize); 3];
    for seed in 0..20 {
        for (config, total) in configs.iter().zip(totals.iter_mut()) {
            let report = run(seed, config);
            assert!(
                report.violations.is_empty(),
                "seed {seed}: {:?}",
                &report.violations[..report.violations.len().min(10)]
            );
            total.0 += report.throttled;
            total.1 += report.throttling_sends;
        }
    }
    let [paced, slowed, unpaced] = totals;
    eprintln!(
        "throttling provider over 20 seeds, rate replies of sends: paced below its throttle {} of {}, paced above it with the slow action {} of {}, neither {} of {}",
        paced.0, paced.1, slowed.0, slowed.1, unpaced.0, unpaced.1
    );
    assert!(
        unpaced.0 > 0,
        "unpaced, the provider's throttle was reached: the runs exercised it"
    );
    assert!(
        paced.0 * 10 <= unpaced.0,
        "pacing below the throttle cut the rate replies at least tenfold: {} vs {}",
        paced.0,
        unpaced.0
    );
    assert!(
        slowed.0 < unpaced.0,
        "the slow action cut the rate replies: {} vs {}",
        slowed.0,
        unpaced.0
    );
}
