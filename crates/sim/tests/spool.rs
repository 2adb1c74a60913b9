//! The spool simulator's fixed seeds (CI), and the proof that it catches a broken policy.

use gannet_sim::spool::{run, SpoolSimConfig};

/// Seeds CI runs.
const SEEDS: std::ops::Range<u64> = 0..300;
/// Seeds that once found a bug, kept whatever `SEEDS` becomes:
/// - 194: a segment being recycled (its messages all finished, their tombstones in the next
///   segment) let the next segment be deleted before the recycled one's old name was gone for
///   good; a crash in between brought finished messages back. Fixed in the commit policy: no
///   deletion while a recycle is in flight.
const REGRESSION_SEEDS: [u64; 1] = [194];

#[test]
fn every_acknowledged_message_survives_every_crash() {
    let (mut ops, mut crashes, mut acked, mut dups) = (0, 0, 0, 0);
    for seed in SEEDS.chain(REGRESSION_SEEDS) {
        let report = run(seed, &SpoolSimConfig::CI);
        assert!(report.violations.is_empty(), "seed {seed}: {:?}", report.violations);
        ops += report.disk_ops;
        crashes += report.crashes;
        acked += report.acknowledged;
        dups += report.duplicates;
    }
    eprintln!(
        "{} seeds: {crashes} crashes, {ops} disk operations, {acked} acknowledged, {dups} duplicates",
        SEEDS.end
    );
    assert!(acked > 1000, "the runs acknowledge enough to mean something: {acked}");
}

#[test]
fn a_policy_that_acknowledges_before_the_sync_is_caught() {
    let broken = SpoolSimConfig {
        broken: true,
        ..SpoolSimConfig::CI
    };
    let caught = SEEDS.filter(|&seed| !run(seed, &broken).violations.is_empty()).count();
    assert!(caught > 0, "no seed caught acknowledgement before fdatasync");
    eprintln!("the broken policy failed {caught} of {} seeds", SEEDS.end);
}
