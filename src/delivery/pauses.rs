//! Pauses that a bounce action sets, shared by every shard. A `suspend` action pauses the
//! provider (at a provider's site, e.g. on Yahoo's `[TSS04]`) or suspends the recipient's
//! domain in that shard's scheduler at once and publishes it here; every other shard adopts it
//! at its next tick (within `TICK`, 500 ms), so the receiver sees the whole host stop sending,
//! not one core of it.
//!
//! - Provider pauses: one atomic per provider index (rule order, the same in every shard,
//!   bounded by `PROVIDERS_MAX`); a published time only grows (`fetch_max`), and a time in the
//!   past means no pause.
//! - Domain suspensions: domain names come from outside, so they travel as news, not as a
//!   shared map: one bounded lock-free queue per shard (crossbeam's `ArrayQueue`, drained at
//!   the tick; the shards' executors need no wake-up for it). A full queue drops the news
//!   (counted in no metric: that shard's own next matching reply suspends the domain anyway).
//!
//! No lock, and no allocation but the domain name on its way. Nothing here is persisted: after
//! a restart the next matching reply sets it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crossbeam_queue::ArrayQueue;
use gannet_sched::PROVIDERS_MAX;

/// Domain suspensions on their way to one shard, at most.
pub const SUSPENSION_NEWS_MAX: usize = 1024;

/// News of one suspension: the domain and until when.
type News = (Box<str>, u64);

/// One queue per shard, made at start ([`init`]).
static SUSPENSION_NEWS: OnceLock<Box<[ArrayQueue<News>]>> = OnceLock::new();

/// Makes the shards' queues of news (once, at start; later calls change nothing).
pub fn init(shard_count: usize) {
    SUSPENSION_NEWS.get_or_init(|| (0..shard_count).map(|_| ArrayQueue::new(SUSPENSION_NEWS_MAX)).collect());
}

/// Tells every shard but `from` that `domain` is suspended until `until_unix_s`.
pub fn publish_suspension(from: u16, domain: &str, until_unix_s: u64) {
    let Some(queues) = SUSPENSION_NEWS.get() else {
        return;
    };
    for (shard, queue) in queues.iter().enumerate() {
        if shard != usize::from(from) {
            // Full: dropped (see the module's doc).
            let _ = queue.push((domain.into(), until_unix_s));
        }
    }
}

/// Hands the suspensions other shards published for `shard` to `adopt`, at most
/// `SUSPENSION_NEWS_MAX` per call.
pub fn take_suspensions(shard: u16, mut adopt: impl FnMut(&str, u64)) {
    let Some(queue) = SUSPENSION_NEWS.get().and_then(|q| q.get(usize::from(shard))) else {
        return;
    };
    for _ in 0..SUSPENSION_NEWS_MAX {
        let Some((domain, until_unix_s)) = queue.pop() else {
            break;
        };
        adopt(&domain, until_unix_s);
    }
}

static PAUSED_UNTIL_UNIX_S: [AtomicU64; PROVIDERS_MAX] = [const { AtomicU64::new(0) }; PROVIDERS_MAX];

/// Publishes a pause of provider `index` until `until_unix_s` (a later pause already
/// published stands).
pub fn publish(index: usize, until_unix_s: u64) {
    if let Some(slot) = PAUSED_UNTIL_UNIX_S.get(index) {
        slot.fetch_max(until_unix_s, Ordering::Relaxed);
    }
}

/// Until when provider `index` is paused, as published (0 if never).
pub fn published(index: usize) -> u64 {
    PAUSED_UNTIL_UNIX_S
        .get(index)
        .map_or(0, |slot| slot.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_pause_only_grows_and_out_of_range_indexes_are_ignored() {
        let index = PROVIDERS_MAX - 1;
        publish(index, 2_000);
        publish(index, 1_000);
        assert_eq!(published(index), 2_000);
        publish(PROVIDERS_MAX, 5);
        assert_eq!(published(PROVIDERS_MAX), 0);
    }

    #[test]
    fn suspension_news_reaches_every_other_shard_and_a_full_queue_drops_it() {
        init(3);
        publish_suspension(1, "slow.test", 1_000);
        let mut got = Vec::new();
        for shard in 0..3 {
            take_suspensions(shard, |domain, until| got.push((shard, domain.to_string(), until)));
        }
        assert_eq!(got, [(0, "slow.test".into(), 1_000), (2, "slow.test".into(), 1_000)]);
        for n in 0..SUSPENSION_NEWS_MAX + 5 {
            publish_suspension(1, &format!("d{n}.test"), 1);
        }
        let mut taken = 0;
        take_suspensions(0, |_, _| taken += 1);
        assert_eq!(taken, SUSPENSION_NEWS_MAX);
        take_suspensions(0, |_, _| taken += 1);
        assert_eq!(taken, SUSPENSION_NEWS_MAX, "the rest was dropped");
        take_suspensions(7, |_, _| panic!("no such shard"));
    }
}
