//! Runs the simulator for a while on fresh seeds and prints what it explored; a failing seed is
//! printed so that `cargo test`'s seed lists can keep it.
//!
//!     cargo run --release -p gannet-sim -- [--hours H | --seeds N] [--first SEED]

use std::time::{Duration, Instant};

use gannet_sim::delivery::{self, DeliverySimConfig};
use gannet_sim::spool::{self, SpoolSimConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let hours: f64 = value("--hours").map_or(0.0, |h| h.parse().expect("--hours takes a number"));
    let seeds: u64 = value("--seeds").map_or(if hours > 0.0 { u64::MAX } else { 1000 }, |n| {
        n.parse().expect("--seeds takes a number")
    });
    let first: u64 = value("--first").map_or(1_000_000, |n| n.parse().expect("--first takes a number"));
    let until = Instant::now() + Duration::from_secs_f64(hours * 3600.0);
    let (mut ops, mut crashes, mut acked, mut duplicates, mut failing) = (0u64, 0u64, 0u64, 0u64, Vec::new());
    let mut run = 0;
    while run < seeds && (hours == 0.0 || Instant::now() < until) {
        let seed = first + run;
        let report = spool::run(seed, &SpoolSimConfig::CI);
        ops += report.disk_ops;
        crashes += report.crashes;
        acked += report.acknowledged;
        duplicates += report.duplicates;
        if !report.violations.is_empty() {
            eprintln!("spool seed {seed}: {:?}", report.violations);
            failing.push(seed);
        }
        let report = delivery::run(seed, &DeliverySimConfig::CI);
        if !report.violations.is_empty() {
            eprintln!("delivery seed {seed}: {:?}", report.violations);
            failing.push(seed);
        }
        run += 1;
    }
    println!(
        "spool and delivery: {run} seeds each; spool: {crashes} crashes, {ops} disk operations (crash points), {acked} messages acknowledged, {duplicates} finished recipients pending again (at-least-once), {} failing seeds {failing:?}",
        failing.len()
    );
    if !failing.is_empty() {
        std::process::exit(1);
    }
}
