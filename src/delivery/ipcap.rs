//! Connections per receiving IP address, across every site of the shard: domains with
//! different MX host names often land on the same servers, and a provider judges a sender by
//! how many connections come from it to each of its addresses (`delivery.connections_per_ip_max`,
//! process-wide, split over the shards). A connection holds an [`IpSlot`] for as long as it
//! lives; dropping it gives the place back and wakes workers waiting for one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

pub struct IpCap {
    /// Open connections per address (at most one entry per open connection).
    counts: RefCell<HashMap<IpAddr, usize>>,
    max: usize,
    /// Bumped whenever a slot is given back.
    releases: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

/// A connection's place under the cap for its address.
pub struct IpSlot {
    cap: Rc<IpCap>,
    ip: IpAddr,
}

impl IpCap {
    pub fn new(max: usize) -> Rc<IpCap> {
        assert!(max > 0);
        Rc::new(IpCap {
            counts: RefCell::new(HashMap::new()),
            max,
            releases: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
        })
    }

    /// A place for a connection to `ip`, if it has one free.
    pub fn try_take(self: &Rc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut counts = self.counts.borrow_mut();
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpSlot { cap: self.clone(), ip })
    }

    /// Connections open to `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.counts.borrow().get(&ip).copied().unwrap_or(0)
    }

    /// Ready once any slot has been given back after this call.
    pub fn released(&self) -> Released<'_> {
        Released {
            cap: self,
            seen: self.releases.get(),
        }
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.cap.counts.borrow_mut();
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
        drop(counts);
        self.cap.releases.set(self.cap.releases.get() + 1);
        for waker in self.cap.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

pub struct Released<'a> {
    cap: &'a IpCap,
    seen: u64,
}

impl Future for Released<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.cap.releases.get() != self.seen {
            return Poll::Ready(());
        }
        self.cap.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_live_slots_per_address() {
        let cap = IpCap::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = cap.try_take(a).unwrap();
        let _s2 = cap.try_take(a).unwrap();
        assert!(cap.try_take(a).is_none());
        let _s3 = cap.try_take(b).unwrap();
        let released = cap.released();
        drop(s1);
        assert_eq!(cap.open(a), 1);
        assert_eq!(released.cap.releases.get(), released.seen + 1);
        assert!(cap.try_take(a).is_some());
    }
}
