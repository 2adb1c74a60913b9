//! Gannet's deterministic simulator. A seed picks every choice of a run (what happens next,
//! when the machine crashes, what a crash keeps, what a receiver answers), so a failing seed
//! replays the same run exactly.
//!
//! - [`spool`]: the commit policy and recovery over a disk that crashes at any write or sync;
//! - [`delivery`]: the delivery scheduler with simulated time and receivers that misbehave.
//!
//! `cargo test -p gannet-sim` runs the fixed seeds CI runs; `cargo run --release -p gannet-sim
//! -- --hours N` runs fresh seeds for hours.

pub mod delivery;
pub mod disk;
pub mod rng;
pub mod spool;
