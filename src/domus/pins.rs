//! Address → identity pins: the identity a domus learned at an address for routes that name
//! none (a [`Route`](super::Route) whose `identity` is `None`), so later sends there go to
//! that peer's session without a handshake each.
//!
//! A pin is a cache, not a trust decision: a route without an identity accepts whichever
//! identity the trust anchors certify at its address, and a pin only remembers the last one
//! seen. So the table stays small and current:
//!
//! * **bounded**: at most `DomusConfig::max_pinned_addresses`; one more evicts the pins unused
//!   for longest (those past their age first);
//! * **aged**: a pin unused (no send took it) for `DomusConfig::peer_retire_after` is
//!   forgotten, and the next send there learns the identity again;
//! * **dropped on a mismatch**: when a dial to the pinned peer at that address meets another
//!   identity (a Kubernetes pod IP reused by another pod), the pin goes, and the next send
//!   dials and pins whoever answers now. A route that *names* an identity never reads a pin,
//!   so nothing here moves a send to another identity than the one its route named.
//!
//! Pure: no IO, no clock (every call takes `now`), no lock (the domus keeps the table behind
//! its own mutex, held for one call).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::a0_transport::{DomusAddr, DomusId};

/// The pins of one domus (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Pins {
    map: HashMap<DomusAddr, Pin>,
}

#[derive(Debug)]
struct Pin {
    id: DomusId,
    /// When a send last took it (or it was made).
    used: Instant,
}

impl Pins {
    /// The identity pinned at `addr`, if it was used within `max_idle`; marks it used. A pin
    /// older than that is forgotten here.
    pub(super) fn get(
        &mut self,
        addr: &DomusAddr,
        now: Instant,
        max_idle: Duration,
    ) -> Option<DomusId> {
        let pin = self.map.get_mut(addr)?;
        if now.saturating_duration_since(pin.used) >= max_idle {
            self.map.remove(addr);
            return None;
        }
        pin.used = now;
        Some(pin.id.clone())
    }

    /// Pins `id` at `addr` (replacing what was pinned there), keeping at most `max` pins:
    /// when one more would not fit, the pins unused for `max_idle` go first, then the least
    /// recently used ones. Eviction scans the table, but it runs only after a dial that
    /// learned a new address, which costs far more.
    pub(super) fn pin(
        &mut self,
        addr: DomusAddr,
        id: DomusId,
        now: Instant,
        max: usize,
        max_idle: Duration,
    ) {
        let max = max.max(1);
        if !self.map.contains_key(&addr) && self.map.len() >= max {
            self.map
                .retain(|_, pin| now.saturating_duration_since(pin.used) < max_idle);
            // The limit can be lowered while running: evict down to one below it.
            while self.map.len() >= max {
                let Some(oldest) = self
                    .map
                    .iter()
                    .min_by_key(|(_, pin)| pin.used)
                    .map(|(addr, _)| addr.clone())
                else {
                    break;
                };
                self.map.remove(&oldest);
            }
        }
        self.map.insert(addr, Pin { id, used: now });
    }

    /// Forgets the pin at `addr` if it names `id` (a dial there expecting `id` met another
    /// identity); true when it did.
    pub(super) fn unpin(&mut self, addr: &DomusAddr, id: &DomusId) -> bool {
        if self.map.get(addr).is_some_and(|pin| &pin.id == id) {
            self.map.remove(addr);
            return true;
        }
        false
    }

    /// Pins held now (some may be past their age until the next eviction or look-up).
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn addr(n: u32) -> DomusAddr {
        let [_, b, c, d] = n.to_be_bytes();
        DomusAddr::tcp(([10, b, c, d], 7000))
    }

    fn id(name: &str) -> DomusId {
        DomusId::spiffe("pins.test", name).expect("id")
    }

    #[test]
    fn the_table_stays_within_its_bound_under_many_distinct_addresses() {
        let mut pins = Pins::default();
        let start = Instant::now();
        for n in 0..100_000u32 {
            let now = start + Duration::from_millis(u64::from(n));
            pins.pin(addr(n), id("x"), now, 64, HOUR);
            assert!(pins.len() <= 64, "{} pins after {n}", pins.len());
        }
        assert_eq!(pins.len(), 64);
        // The most recent ones stayed; the oldest went.
        let now = start + Duration::from_secs(100);
        assert!(pins.get(&addr(99_999), now, HOUR).is_some());
        assert!(pins.get(&addr(0), now, HOUR).is_none());
    }

    #[test]
    fn the_least_recently_used_pin_goes_first() {
        let mut pins = Pins::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        pins.pin(addr(1), id("a"), at(0), 2, HOUR);
        pins.pin(addr(2), id("b"), at(1), 2, HOUR);
        // Used again: now the most recent.
        assert_eq!(pins.get(&addr(1), at(2), HOUR), Some(id("a")));
        pins.pin(addr(3), id("c"), at(3), 2, HOUR);
        assert_eq!(pins.len(), 2);
        assert_eq!(
            pins.get(&addr(2), at(4), HOUR),
            None,
            "b was used longest ago"
        );
        assert_eq!(pins.get(&addr(1), at(4), HOUR), Some(id("a")));
        assert_eq!(pins.get(&addr(3), at(4), HOUR), Some(id("c")));
        // Lowered limit: one pin evicts down to it.
        pins.pin(addr(4), id("d"), at(5), 1, HOUR);
        assert_eq!(pins.len(), 1);
        assert_eq!(pins.get(&addr(4), at(5), HOUR), Some(id("d")));
    }

    #[test]
    fn a_pin_unused_for_its_age_is_forgotten_and_use_keeps_it() {
        let mut pins = Pins::default();
        let t0 = Instant::now();
        let age = Duration::from_secs(10);
        pins.pin(addr(1), id("a"), t0, 8, age);
        pins.pin(addr(2), id("b"), t0, 8, age);
        // addr 1 is used every 9 s: it stays for ever.
        for k in 1..=5u64 {
            assert_eq!(
                pins.get(&addr(1), t0 + Duration::from_secs(9 * k), age),
                Some(id("a"))
            );
        }
        // addr 2 was not used for 45 s: gone.
        assert_eq!(pins.get(&addr(2), t0 + Duration::from_secs(45), age), None);
        assert_eq!(pins.len(), 1);
        // Stale pins are the first to go when the table is full.
        let mut full = Pins::default();
        full.pin(addr(1), id("a"), t0, 2, age);
        full.pin(addr(2), id("b"), t0 + Duration::from_secs(8), 2, age);
        full.pin(addr(3), id("c"), t0 + Duration::from_secs(11), 2, age);
        assert_eq!(full.len(), 2);
        let now = t0 + Duration::from_secs(12);
        assert_eq!(full.get(&addr(1), now, age), None);
        assert_eq!(full.get(&addr(2), now, age), Some(id("b")));
    }

    #[test]
    fn unpin_forgets_only_the_identity_that_failed() {
        let mut pins = Pins::default();
        let t0 = Instant::now();
        pins.pin(addr(1), id("a"), t0, 8, HOUR);
        assert!(!pins.unpin(&addr(1), &id("b")), "b was never pinned there");
        assert_eq!(pins.get(&addr(1), t0, HOUR), Some(id("a")));
        assert!(pins.unpin(&addr(1), &id("a")));
        assert_eq!(pins.get(&addr(1), t0, HOUR), None);
        // Pinned anew: the next identity seen there.
        pins.pin(addr(1), id("b"), t0, 8, HOUR);
        assert_eq!(pins.get(&addr(1), t0, HOUR), Some(id("b")));
    }
}
