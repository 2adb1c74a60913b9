//! A destination's queue of jobs in three lanes, so that one kind of mail cannot starve another:
//! fresh mail is not held up behind a backlog of retries, retries are not starved by a flood of
//! fresh mail, and bounces travel in a lane of their own.

use std::collections::VecDeque;

/// Which lane a job travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// A message's first attempt.
    Fresh,
    /// A later attempt after a deferral.
    Retry,
    /// A bounce (from the null sender).
    Bounce,
}

/// The order lanes are served in: out of every five picks, three go to fresh mail, one to retries
/// and one to bounces; a pick whose lane is empty falls to the next lane with work. So each lane
/// gets at least a fifth of the picks whenever it has work.
const CYCLE: [[Lane; 3]; 5] = [
    [Lane::Fresh, Lane::Retry, Lane::Bounce],
    [Lane::Fresh, Lane::Bounce, Lane::Retry],
    [Lane::Retry, Lane::Fresh, Lane::Bounce],
    [Lane::Fresh, Lane::Retry, Lane::Bounce],
    [Lane::Bounce, Lane::Fresh, Lane::Retry],
];

#[derive(Debug)]
pub struct Lanes<T> {
    fresh: VecDeque<T>,
    retry: VecDeque<T>,
    bounce: VecDeque<T>,
    pick: usize,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            fresh: VecDeque::new(),
            retry: VecDeque::new(),
            bounce: VecDeque::new(),
            pick: 0,
        }
    }
}

impl<T> Lanes<T> {
    fn lane(&mut self, lane: Lane) -> &mut VecDeque<T> {
        match lane {
            Lane::Fresh => &mut self.fresh,
            Lane::Retry => &mut self.retry,
            Lane::Bounce => &mut self.bounce,
        }
    }

    pub fn push_back(&mut self, lane: Lane, item: T) {
        self.lane(lane).push_back(item);
    }

    /// Puts an item back at the head of its lane (it was taken and could not be served).
    pub fn push_front(&mut self, lane: Lane, item: T) {
        self.lane(lane).push_front(item);
    }

    /// The next item, by the cycle above.
    pub fn pop(&mut self) -> Option<T> {
        if self.is_empty() {
            return None;
        }
        let order = CYCLE[self.pick % CYCLE.len()];
        self.pick = self.pick.wrapping_add(1);
        order.into_iter().find_map(|lane| self.lane(lane).pop_front())
    }

    /// Everything, all lanes.
    pub fn drain(&mut self) -> Vec<T> {
        let mut all: Vec<T> = self.fresh.drain(..).collect();
        all.extend(self.retry.drain(..));
        all.extend(self.bounce.drain(..));
        all
    }

    /// Takes out every item `take` picks, keeping the others in their order.
    pub fn take_if(&mut self, mut take: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        for lane in [&mut self.fresh, &mut self.retry, &mut self.bounce] {
            let mut kept = VecDeque::with_capacity(lane.len());
            for item in lane.drain(..) {
                if take(&item) {
                    taken.push(item);
                } else {
                    kept.push_back(item);
                }
            }
            *lane = kept;
        }
        taken
    }

    /// Every item, lane by lane.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.fresh.iter().chain(self.retry.iter()).chain(self.bounce.iter())
    }

    pub fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.retry.is_empty() && self.bounce.is_empty()
    }

    pub fn len(&self) -> usize {
        self.fresh.len() + self.retry.len() + self.bounce.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lane_gets_its_share_under_load() {
        let mut lanes = Lanes::default();
        for i in 0..100 {
            lanes.push_back(Lane::Fresh, ('f', i));
            lanes.push_back(Lane::Retry, ('r', i));
            lanes.push_back(Lane::Bounce, ('b', i));
        }
        let first: Vec<char> = (0..10).map(|_| lanes.pop().unwrap().0).collect();
        assert_eq!(first.iter().filter(|c| **c == 'f').count(), 6);
        assert_eq!(first.iter().filter(|c| **c == 'r').count(), 2);
        assert_eq!(first.iter().filter(|c| **c == 'b').count(), 2);
        assert_eq!(lanes.len(), 290);
    }

    #[test]
    fn an_empty_lane_gives_its_turn_away_and_order_within_a_lane_is_kept() {
        let mut lanes = Lanes::default();
        for i in 0..5 {
            lanes.push_back(Lane::Retry, i);
        }
        lanes.push_front(Lane::Retry, 99);
        let all: Vec<i32> = std::iter::from_fn(|| lanes.pop()).collect();
        assert_eq!(all, vec![99, 0, 1, 2, 3, 4]);
        assert!(lanes.pop().is_none());
        lanes.push_back(Lane::Bounce, 7);
        assert_eq!(lanes.drain(), vec![7]);
        assert!(lanes.is_empty());
    }
}
