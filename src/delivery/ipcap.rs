//! Connections per receiving IP address, across every site of the shard: domains with
//! different MX host names often land on the same servers, and a provider judges a sender by
//! how many connections come from it to each of its addresses (`delivery.connections_per_ip_max`,
//! process-wide, split over the shards). A connection holds an [`IpSlot`] for as long as it
//! lives; dropping it gives the place back and wakes workers waiting for one.
//!
//! Fairness between sites that share an address: a worker that finds every address of its
//! site at the cap, held by other sites, says so ([`IpCap::waiting`]); a worker of another site
//! then gives its connection up after its current message ([`IpCap::wanted_by_other`]) instead
//! of keeping it for its whole queue, and a connection is not parked in the pool while another
//! site waits for its address.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use gannet_sched::SiteKey;

pub struct IpCap {
    /// Open connections per address (at most one entry per open connection).
    counts: RefCell<HashMap<IpAddr, usize>>,
    max: Cell<usize>,
    /// Bumped whenever a slot is given back.
    releases: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
    /// Sites with a worker waiting for a place at an address (at most one entry per worker).
    waiting: RefCell<HashMap<IpAddr, Vec<SiteKey>>>,
}

/// A worker's wait for a place at some addresses; dropping it ends the wait.
pub struct Waiting {
    cap: Rc<IpCap>,
    ips: Vec<IpAddr>,
    site: SiteKey,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = self.cap.waiting.borrow_mut();
        for ip in &self.ips {
            if let Some(sites) = waiting.get_mut(ip) {
                if let Some(i) = sites.iter().position(|s| *s == self.site) {
                    sites.swap_remove(i);
                }
                if sites.is_empty() {
                    waiting.remove(ip);
                }
            }
        }
    }
}

/// A connection's place under the cap for its address.
pub struct IpSlot {
    cap: Rc<IpCap>,
    ip: IpAddr,
}

impl IpCap {
    /// A reload: at most `max` connections per address from now on (open ones stay).
    pub fn set_max(&self, max: usize) {
        assert!(max > 0);
        self.max.set(max);
        self.releases.set(self.releases.get() + 1);
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    pub fn new(max: usize) -> Rc<IpCap> {
        assert!(max > 0);
        Rc::new(IpCap {
            counts: RefCell::new(HashMap::new()),
            max: Cell::new(max),
            releases: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
            waiting: RefCell::new(HashMap::new()),
        })
    }

    /// A place for a connection to `ip`, if it has one free.
    pub fn try_take(self: &Rc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut counts = self.counts.borrow_mut();
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max.get() {
            return None;
        }
        *count += 1;
        Some(IpSlot { cap: self.clone(), ip })
    }

    /// Connections open to `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.counts.borrow().get(&ip).copied().unwrap_or(0)
    }

    /// Says that a worker of `site` waits for a place at one of `ips`, until the guard drops.
    pub fn waiting(self: &Rc<Self>, ips: &[IpAddr], site: &SiteKey) -> Waiting {
        let mut waiting = self.waiting.borrow_mut();
        for ip in ips {
            waiting.entry(*ip).or_default().push(site.clone());
        }
        Waiting {
            cap: self.clone(),
            ips: ips.to_vec(),
            site: site.clone(),
        }
    }

    /// Whether a worker of a site other than `site` waits for a place at `ip`.
    pub fn wanted_by_other(&self, ip: IpAddr, site: &SiteKey) -> bool {
        self.waiting
            .borrow()
            .get(&ip)
            .is_some_and(|sites| sites.iter().any(|s| s != site))
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
        let (one, two) = (SiteKey::mx(&["mx1.test"]), SiteKey::mx(&["mx2.test"]));
        let wait = cap.waiting(&[a], &one);
        assert!(cap.wanted_by_other(a, &two) && !cap.wanted_by_other(a, &one));
        drop(wait);
        assert!(!cap.wanted_by_other(a, &two));
    }
}
