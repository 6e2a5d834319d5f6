//! The publisher's table of subscriptions: which subscriber (a verified identity) wants which
//! pattern, until when. A subscription is added or renewed by its subscriber's announcement
//! and lives for one lease; one not renewed in time ages out (a crashed subscriber), an
//! unsubscribe ends it at once. Bounded per subscriber and in total: an announcement past a
//! bound is refused, and the table never grows past them.
//!
//! Pure and generic over the subscriber's key (the service keys it by `DomusId`): no clock
//! (every call takes `now`), no IO, no policy on who may subscribe (the service checks its
//! ACL before calling). It must not decide delivery: [`Membership::subscribers`] only says who
//! a publish goes to at this moment.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::name::{Topic, TopicPattern};

/// The table's bounds and the lease a subscription is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipLimits {
    /// The most patterns one subscriber may hold.
    pub per_subscriber: usize,
    /// The most subscriptions in the table.
    pub total: usize,
    /// How long a subscription lives without a renewal.
    pub lease: Duration,
}

impl Default for MembershipLimits {
    fn default() -> Self {
        Self {
            per_subscriber: 256,
            total: 65_536,
            lease: Duration::from_secs(30),
        }
    }
}

/// Why an announcement was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// The subscriber holds `per_subscriber` patterns already.
    PerSubscriber,
    /// The table holds `total` subscriptions already.
    Total,
}

/// The publisher's subscriptions. Invariants: `by_subscriber` and `expiries` hold the same
/// subscriptions; `len` is their number and never passes `limits.total`; no subscriber holds
/// more than `limits.per_subscriber`.
#[derive(Debug)]
pub struct Membership<S> {
    limits: MembershipLimits,
    by_subscriber: BTreeMap<S, BTreeMap<TopicPattern, Instant>>,
    expiries: BTreeSet<(Instant, S, TopicPattern)>,
    len: usize,
}

impl<S: Clone + Ord> Membership<S> {
    /// An empty table.
    pub fn new(limits: MembershipLimits) -> Self {
        Self {
            limits,
            by_subscriber: BTreeMap::new(),
            expiries: BTreeSet::new(),
            len: 0,
        }
    }

    /// Adds `pattern` for `subscriber`, or renews it: either way it lives until the returned
    /// instant (`now` plus the lease). A renewal is never refused; a new subscription past a
    /// bound is.
    pub fn subscribe(
        &mut self,
        now: Instant,
        subscriber: &S,
        pattern: TopicPattern,
    ) -> Result<Instant, Refused> {
        self.subscribe_for(now, subscriber, pattern, self.limits.lease)
    }

    /// As [`subscribe`](Self::subscribe), for `lease` (at most the table's lease).
    pub fn subscribe_for(
        &mut self,
        now: Instant,
        subscriber: &S,
        pattern: TopicPattern,
        lease: Duration,
    ) -> Result<Instant, Refused> {
        let until = now.checked_add(lease.min(self.limits.lease)).unwrap_or(now);
        if let Some(old) = self
            .by_subscriber
            .get_mut(subscriber)
            .and_then(|patterns| patterns.get_mut(&pattern))
        {
            let before = std::mem::replace(old, until);
            self.expiries
                .remove(&(before, subscriber.clone(), pattern.clone()));
            self.expiries.insert((until, subscriber.clone(), pattern));
            return Ok(until);
        }
        let held = self.by_subscriber.get(subscriber).map_or(0, BTreeMap::len);
        if held >= self.limits.per_subscriber {
            return Err(Refused::PerSubscriber);
        }
        if self.len >= self.limits.total {
            return Err(Refused::Total);
        }
        self.by_subscriber
            .entry(subscriber.clone())
            .or_default()
            .insert(pattern.clone(), until);
        self.expiries.insert((until, subscriber.clone(), pattern));
        self.len = self.len.saturating_add(1);
        Ok(until)
    }

    /// Ends `subscriber`'s `pattern` at once; whether it was held.
    pub fn unsubscribe(&mut self, subscriber: &S, pattern: &TopicPattern) -> bool {
        let Some(patterns) = self.by_subscriber.get_mut(subscriber) else {
            return false;
        };
        let Some(until) = patterns.remove(pattern) else {
            return false;
        };
        if patterns.is_empty() {
            self.by_subscriber.remove(subscriber);
        }
        self.expiries
            .remove(&(until, subscriber.clone(), pattern.clone()));
        self.len = self.len.saturating_sub(1);
        true
    }

    /// Ends every subscription of `subscriber` (it restarted, or left); how many there were.
    pub fn remove_subscriber(&mut self, subscriber: &S) -> usize {
        let Some(patterns) = self.by_subscriber.remove(subscriber) else {
            return 0;
        };
        for (pattern, until) in &patterns {
            self.expiries
                .remove(&(*until, subscriber.clone(), pattern.clone()));
        }
        self.len = self.len.saturating_sub(patterns.len());
        patterns.len()
    }

    /// Ends every subscription whose lease ran out by `now`; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<(S, TopicPattern)> {
        let mut gone = Vec::new();
        while let Some(first) = self.expiries.first() {
            if first.0 > now {
                break;
            }
            let Some((_, subscriber, pattern)) = self.expiries.pop_first() else {
                break;
            };
            if let Some(patterns) = self.by_subscriber.get_mut(&subscriber) {
                patterns.remove(&pattern);
                if patterns.is_empty() {
                    self.by_subscriber.remove(&subscriber);
                }
            }
            self.len = self.len.saturating_sub(1);
            gone.push((subscriber, pattern));
        }
        gone
    }

    /// When the next lease runs out, if any subscription is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|(at, _, _)| *at)
    }

    /// Who a publish to `topic` goes to now: each subscriber with a matching pattern, once
    /// (however many of its patterns match), in key order. Leases past `now` are not counted
    /// even before [`expire`](Self::expire) removes them.
    pub fn subscribers(&self, now: Instant, topic: &Topic) -> Vec<S> {
        self.by_subscriber
            .iter()
            .filter(|(_, patterns)| {
                patterns
                    .iter()
                    .any(|(pattern, until)| *until > now && pattern.matches(topic))
            })
            .map(|(subscriber, _)| subscriber.clone())
            .collect()
    }

    /// The longest lease the table gives.
    pub fn lease(&self) -> Duration {
        self.limits.lease
    }

    /// Every subscription held: subscriber and pattern.
    pub fn entries(&self) -> Vec<(S, TopicPattern)> {
        self.by_subscriber
            .iter()
            .flat_map(|(s, patterns)| patterns.keys().map(move |p| (s.clone(), p.clone())))
            .collect()
    }

    /// How many subscriptions the table holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many distinct subscribers hold a subscription.
    pub fn subscriber_count(&self) -> usize {
        self.by_subscriber.len()
    }

    /// How many patterns `subscriber` holds.
    pub fn held_by(&self, subscriber: &S) -> usize {
        self.by_subscriber.get(subscriber).map_or(0, BTreeMap::len)
    }

    /// Each pattern held, with how many subscribers hold it (for reporting).
    pub fn patterns(&self) -> BTreeMap<TopicPattern, usize> {
        let mut counts = BTreeMap::new();
        for patterns in self.by_subscriber.values() {
            for pattern in patterns.keys() {
                *counts.entry(pattern.clone()).or_insert(0usize) += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::new(s).unwrap()
    }

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    const LEASE: Duration = Duration::from_secs(30);

    fn table(per_subscriber: usize, total: usize) -> Membership<&'static str> {
        Membership::new(MembershipLimits {
            per_subscriber,
            total,
            lease: LEASE,
        })
    }

    /// The two indexes hold the same subscriptions, and `len` counts them.
    fn check(m: &Membership<&'static str>) {
        let by: usize = m.by_subscriber.values().map(BTreeMap::len).sum();
        assert_eq!(by, m.len);
        assert_eq!(m.expiries.len(), m.len);
        for (until, s, pattern) in &m.expiries {
            assert_eq!(m.by_subscriber[s][pattern], *until);
        }
        assert!(m.len <= m.limits.total);
    }

    #[test]
    fn a_publish_goes_to_each_matching_subscriber_once() {
        let now = Instant::now();
        let mut m = table(8, 64);
        m.subscribe(now, &"s1", p("orders.>")).unwrap();
        m.subscribe(now, &"s1", p("orders.*.created")).unwrap();
        m.subscribe(now, &"s2", p("orders.eu.created")).unwrap();
        m.subscribe(now, &"s3", p("invoices.*")).unwrap();
        check(&m);
        assert_eq!(m.subscribers(now, &t("orders.eu.created")), ["s1", "s2"]);
        assert_eq!(m.subscribers(now, &t("orders.us")), ["s1"]);
        assert!(m.subscribers(now, &t("shipments.x")).is_empty());
        assert_eq!(m.patterns()[&p("orders.>")], 1);
    }

    #[test]
    fn leases_age_out_unless_renewed_on_a_virtual_clock() {
        let t0 = Instant::now();
        let mut m = table(8, 64);
        m.subscribe(t0, &"crashed", p("a.*")).unwrap();
        m.subscribe(t0, &"alive", p("a.*")).unwrap();
        assert_eq!(m.next_expiry(), Some(t0 + LEASE));
        // The live one renews half-way; the crashed one never does.
        let half = t0 + LEASE / 2;
        assert_eq!(m.subscribe(half, &"alive", p("a.*")), Ok(half + LEASE));
        check(&m);
        assert_eq!(m.len(), 2, "a renewal adds nothing");
        // Past the first lease the crashed one no longer receives, even before expire runs.
        let after = t0 + LEASE + Duration::from_millis(1);
        assert_eq!(m.subscribers(after, &t("a.b")), ["alive"]);
        assert_eq!(m.expire(after), vec![("crashed", p("a.*"))]);
        check(&m);
        assert_eq!(m.next_expiry(), Some(half + LEASE));
        assert!(m.expire(after).is_empty());
        assert_eq!(m.expire(half + LEASE), vec![("alive", p("a.*"))]);
        assert!(m.is_empty());
        check(&m);
    }

    #[test]
    fn unsubscribe_and_a_subscriber_leaving_end_at_once() {
        let now = Instant::now();
        let mut m = table(8, 64);
        m.subscribe(now, &"s", p("a")).unwrap();
        m.subscribe(now, &"s", p("b.>")).unwrap();
        m.subscribe(now, &"o", p("a")).unwrap();
        assert!(m.unsubscribe(&"s", &p("a")));
        assert!(!m.unsubscribe(&"s", &p("a")));
        check(&m);
        assert_eq!(m.subscribers(now, &t("a")), ["o"]);
        assert_eq!(m.remove_subscriber(&"s"), 1);
        assert_eq!(m.remove_subscriber(&"s"), 0);
        check(&m);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn the_table_is_bounded_per_subscriber_and_in_total() {
        let now = Instant::now();
        let mut m = table(2, 3);
        m.subscribe(now, &"s", p("a")).unwrap();
        m.subscribe(now, &"s", p("b")).unwrap();
        assert_eq!(m.subscribe(now, &"s", p("c")), Err(Refused::PerSubscriber));
        // A renewal at the bound is fine.
        assert!(m.subscribe(now, &"s", p("a")).is_ok());
        m.subscribe(now, &"o", p("a")).unwrap();
        assert_eq!(m.subscribe(now, &"x", p("a")), Err(Refused::Total));
        check(&m);
        assert_eq!(m.len(), 3);
        assert_eq!(m.held_by(&"s"), 2);
        // 200,000 announcements from one subscriber leave the table at its bound.
        for i in 0..200_000u32 {
            let _ = m.subscribe(now, &"flood", p(&format!("t{i}")));
        }
        assert_eq!(m.len(), 3);
        check(&m);
    }

    proptest::proptest! {
        /// Any sequence of announcements, unsubscribes, departures and expiries on a virtual
        /// clock keeps both indexes in step and the table within its bounds, and a publish
        /// reaches exactly the subscribers with a live matching pattern.
        #[test]
        fn any_sequence_keeps_the_table_consistent_and_bounded(
            ops in proptest::collection::vec((0u8..4, 0usize..4, 0usize..5, 0u64..20), 1..200)
        ) {
            let subscribers = ["s0", "s1", "s2", "s3"];
            let patterns = ["a", "a.*", "a.>", "b.c", "*"];
            let mut m = table(3, 8);
            let t0 = Instant::now();
            let mut now = t0;
            for (op, s, pat, step) in ops {
                now += Duration::from_secs(step);
                let (s, pat) = (subscribers[s], p(patterns[pat]));
                match op {
                    0 => { let _ = m.subscribe(now, &s, pat); }
                    1 => { m.unsubscribe(&s, &pat); }
                    2 => { m.remove_subscriber(&s); }
                    _ => {
                        for (_, pattern) in m.expire(now) {
                            proptest::prop_assert!(TopicPattern::new(pattern.as_str()).is_ok());
                        }
                        proptest::prop_assert!(m.next_expiry().is_none_or(|at| at > now));
                    }
                }
                check(&m);
                for s in subscribers {
                    proptest::prop_assert!(m.held_by(&s) <= 3);
                }
                for topic in ["a", "a.x", "a.x.y", "b.c", "z"] {
                    let topic = t(topic);
                    let expected: Vec<&str> = subscribers
                        .into_iter()
                        .filter(|s| {
                            m.by_subscriber.get(s).is_some_and(|ps| {
                                ps.iter().any(|(pattern, until)| *until > now && pattern.matches(&topic))
                            })
                        })
                        .collect();
                    proptest::prop_assert_eq!(m.subscribers(now, &topic), expected);
                }
            }
        }
    }
}
