//! The replica choice: which of a taberna's candidates a send goes to ([`choose`]).
//!
//! Pure policy (STYLE 16): the caller passes in which candidates it can reach and one random
//! number, so the same inputs give the same choice and tests reach every branch without a
//! network, a clock or luck. It must not read a clock, draw randomness, take a lock, do IO or
//! allocate: the domus calls it on every send to a taberna with several candidates.

use super::Candidate;

/// Chooses the candidate a send goes to, the way a DNS SRV client does:
///
/// 1. **Reachable first.** Only the candidates `reachable` accepts are considered — unless
///    none is, and then all are (the send must go somewhere; the domus then dials the one
///    chosen and reports why it cannot be reached, or the send waits for it within its
///    deadline).
/// 2. **Lowest priority.** Among those, only the lowest `priority` present.
/// 3. **By weight.** Among that priority, a candidate is chosen with probability `weight / W`,
///    `W` the sum of their weights: the one whose share of `0..W` holds `random % W`, shares
///    laid out in list order. A candidate of weight 0 is never chosen while another of its
///    priority has a weight; when every weight there is 0, each is equally likely
///    (`random % count`, in list order).
///
/// `None` only when `candidates` is empty. `reachable` may be asked more than once about a
/// candidate and must answer the same each time: pass a view taken once (of a peer table, say),
/// not a live look-up. `random` should be uniform over `u64`; the bias of `% W` is below
/// 2⁻⁴⁰ for any list shorter than 2⁸ entries (`W` < 2²⁴).
///
/// ```
/// use vicus::resolve::{Candidate, DomusAddr, Route, choose};
///
/// let at = |port, priority, weight| Candidate {
///     route: Route { addr: DomusAddr::tcp(([10, 0, 0, 5], port)), identity: None },
///     priority,
///     weight,
/// };
/// let replicas = [at(7000, 0, 1), at(7001, 0, 3), at(7002, 1, 1)];
/// let up = |_: &Candidate| true;
/// // Weights 1 and 3 at priority 0: random % 4 gives 7000 for 0, 7001 for 1, 2 and 3.
/// assert_eq!(choose(&replicas, up, 4), Some(&replicas[0]));
/// assert_eq!(choose(&replicas, up, 6), Some(&replicas[1]));
/// // Priority 0 cannot be reached: priority 1 takes every send.
/// let backup_only = |c: &Candidate| c.priority == 1;
/// assert_eq!(choose(&replicas, backup_only, 4), Some(&replicas[2]));
/// assert_eq!(choose(&[], up, 4), None);
/// ```
pub fn choose(
    candidates: &[Candidate],
    reachable: impl Fn(&Candidate) -> bool,
    random: u64,
) -> Option<&Candidate> {
    let any_reachable = candidates.iter().any(&reachable);
    let considered = |c: &Candidate| !any_reachable || reachable(c);
    let best = candidates
        .iter()
        .filter(|c| considered(c))
        .map(|c| c.priority)
        .min()?;
    let tier = || {
        candidates
            .iter()
            .filter(move |c| c.priority == best && considered(c))
    };
    let total: u64 = tier().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        // `best` exists, so the tier holds at least one candidate.
        let count = tier().count() as u64;
        return tier().nth(usize::try_from(random % count).ok()?);
    }
    let mut left = random % total;
    tier().find(|c| {
        let weight = u64::from(c.weight);
        if left < weight {
            true
        } else {
            left -= weight;
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::a0_transport::DomusAddr;
    use crate::resolve::Route;

    /// A candidate told apart by its port.
    fn at(port: u16, priority: u16, weight: u16) -> Candidate {
        Candidate {
            route: Route {
                addr: DomusAddr::tcp(([127, 0, 0, 1], port)),
                identity: None,
            },
            priority,
            weight,
        }
    }

    fn port(c: &Candidate) -> u16 {
        match &c.route.addr {
            DomusAddr::Tcp(a) => a.port(),
            other => panic!("the tests build TCP candidates only, got {other}"),
        }
    }

    fn all(_: &Candidate) -> bool {
        true
    }

    fn none(_: &Candidate) -> bool {
        false
    }

    /// The port chosen for each of `randoms`, counted.
    fn tally(
        candidates: &[Candidate],
        reachable: impl Fn(&Candidate) -> bool,
        randoms: impl Iterator<Item = u64>,
    ) -> HashMap<u16, u64> {
        let mut counts = HashMap::new();
        for random in randoms {
            let chosen = choose(candidates, &reachable, random).expect("a non-empty list");
            *counts.entry(port(chosen)).or_insert(0) += 1;
        }
        counts
    }

    /// SplitMix64: well-spread fixed "random" values, the same on every run.
    fn spread(seed: u64, n: usize) -> impl Iterator<Item = u64> {
        let mut state = seed;
        std::iter::repeat_with(move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
        .take(n)
    }

    #[test]
    fn an_empty_list_chooses_nothing() {
        assert_eq!(choose(&[], all, 0), None);
        assert_eq!(choose(&[], none, u64::MAX), None);
    }

    #[test]
    fn one_candidate_is_chosen_reachable_or_not_whatever_its_weight() {
        for (weight, reachable) in [(1, true), (0, true), (1, false), (0, false)] {
            let only = [at(1, 7, weight)];
            for random in [0, 1, u64::MAX] {
                let chosen = choose(&only, |_| reachable, random);
                assert_eq!(
                    chosen,
                    Some(&only[0]),
                    "weight {weight}, reachable {reachable}"
                );
            }
        }
    }

    #[test]
    fn weights_share_the_choices_exactly_over_one_cycle_of_random_values() {
        // Weights 1, 3, 6 (W = 10) and a weight-0 candidate: every residue of random % 10
        // once per cycle, so 1,000 cycles give exactly 1,000 / 3,000 / 6,000 / 0. Values near
        // u64::MAX are included to show the arithmetic does not overflow.
        let candidates = [at(1, 0, 1), at(2, 0, 3), at(3, 0, 0), at(4, 0, 6)];
        let counts = tally(&candidates, all, 0..10_000);
        assert_eq!(counts.get(&1), Some(&1_000));
        assert_eq!(counts.get(&2), Some(&3_000));
        assert_eq!(counts.get(&3), None);
        assert_eq!(counts.get(&4), Some(&6_000));
        // u64::MAX % 10 == 5: the share of port 2 is 1..4, of port 4 is 4..10.
        assert_eq!(choose(&candidates, all, u64::MAX).map(port), Some(4));
        assert_eq!(choose(&candidates, all, u64::MAX - 2).map(port), Some(2));
    }

    #[test]
    fn weights_share_the_choices_in_proportion_over_spread_random_values() {
        let candidates = [at(1, 0, 1), at(2, 0, 3), at(3, 0, 6)];
        let n = 100_000;
        let counts = tally(&candidates, all, spread(21, n));
        // Fixed inputs, so the counts never change between runs; the bound (2 % of all
        // choices, about 14 standard deviations) only says the spread matches the weights.
        for (port, weight) in [(1, 1), (2, 3), (3, 6)] {
            let expected = n as u64 * weight / 10;
            let got = counts.get(&port).copied().unwrap_or(0);
            assert!(
                got.abs_diff(expected) < n as u64 / 50,
                "port {port} (weight {weight}): {got} of {n}, expected about {expected}"
            );
        }
    }

    #[test]
    fn the_lowest_priority_with_a_reachable_candidate_takes_every_choice() {
        // Listed out of priority order on purpose: the order of the list is not the priority.
        let candidates = [at(3, 2, 5), at(1, 0, 1), at(2, 1, 1), at(4, 0, 1)];
        let up = |ports: &'static [u16]| move |c: &Candidate| ports.contains(&port(c));

        let counts = tally(&candidates, all, 0..1_000);
        assert_eq!(counts.get(&1), Some(&500));
        assert_eq!(counts.get(&4), Some(&500));

        // One candidate of priority 0 down: the other takes all of priority 0's choices.
        let counts = tally(&candidates, up(&[2, 3, 4]), 0..1_000);
        assert_eq!(counts.get(&4), Some(&1_000));

        // Priority 0 down: priority 1, although priority 2 has the larger weight.
        let counts = tally(&candidates, up(&[2, 3]), 0..1_000);
        assert_eq!(counts.get(&2), Some(&1_000));

        // Only priority 2 is up.
        let counts = tally(&candidates, up(&[3]), 0..1_000);
        assert_eq!(counts.get(&3), Some(&1_000));
    }

    #[test]
    fn an_unreachable_candidate_is_skipped_however_large_its_weight() {
        let candidates = [at(1, 0, u16::MAX), at(2, 0, 1)];
        let counts = tally(&candidates, |c| port(c) != 1, spread(5, 1_000));
        assert_eq!(counts.get(&2), Some(&1_000));
    }

    #[test]
    fn zero_weights_are_chosen_only_when_their_whole_priority_has_none_and_then_evenly() {
        // Priority 0 has a weighted candidate: its weight-0 one is never chosen.
        let mixed = [at(1, 0, 0), at(2, 0, 2), at(3, 1, 9)];
        let counts = tally(&mixed, all, 0..1_000);
        assert_eq!(counts.get(&2), Some(&1_000));

        // Every weight of priority 0 is 0: each is equally likely (one of three per cycle),
        // and priority 1's weight does not pull the choice there.
        let zeros = [at(1, 0, 0), at(2, 0, 0), at(3, 0, 0), at(4, 1, 9)];
        let counts = tally(&zeros, all, 0..3_000);
        for p in [1, 2, 3] {
            assert_eq!(counts.get(&p), Some(&1_000), "port {p}: {counts:?}");
        }
        assert_eq!(counts.get(&4), None);

        // The weighted candidate of priority 0 is down: the weight-0 one is used rather than
        // a lower priority.
        let counts = tally(&mixed, |c| port(c) != 2, 0..1_000);
        assert_eq!(counts.get(&1), Some(&1_000));
    }

    #[test]
    fn when_none_is_reachable_every_candidate_is_chosen_among_by_the_same_rule() {
        let candidates = [at(1, 1, 1), at(2, 0, 1), at(3, 0, 3)];
        let down = tally(&candidates, none, 0..4_000);
        let up = tally(&candidates, all, 0..4_000);
        assert_eq!(down, up);
        assert_eq!(down.get(&2), Some(&1_000));
        assert_eq!(down.get(&3), Some(&3_000));
        assert_eq!(down.get(&1), None);
    }

    #[test]
    fn the_same_inputs_give_the_same_choice() {
        let candidates = [at(1, 0, 2), at(2, 0, 5), at(3, 0, 1)];
        for random in spread(99, 200) {
            let first = choose(&candidates, all, random).map(port);
            let again = choose(&candidates, all, random).map(port);
            assert_eq!(first, again, "random {random}");
        }
    }

    proptest! {
        /// Whatever the list: a candidate is chosen iff the list is non-empty, it is reachable
        /// when any is, no candidate it could have skipped for has a lower priority, and it
        /// has a weight when any of its priority (among those considered) has one.
        #[test]
        fn the_choice_keeps_the_rule_on_any_list(
            raw in proptest::collection::vec((0u16..4, 0u16..4, any::<bool>()), 0..12),
            random in any::<u64>(),
        ) {
            let candidates: Vec<Candidate> = raw
                .iter()
                .enumerate()
                .map(|(i, &(priority, weight, _))| at(i as u16 + 1, priority, weight))
                .collect();
            let up = |c: &Candidate| raw[usize::from(port(c)) - 1].2;
            let chosen = choose(&candidates, up, random);
            prop_assert_eq!(chosen.is_some(), !candidates.is_empty());
            let Some(chosen) = chosen else { return Ok(()) };
            let any_up = candidates.iter().any(up);
            let considered: Vec<&Candidate> =
                candidates.iter().filter(|c| !any_up || up(c)).collect();
            prop_assert!(considered.iter().any(|c| std::ptr::eq(*c, chosen)));
            prop_assert!(considered.iter().all(|c| c.priority >= chosen.priority));
            let tier_weighted = considered
                .iter()
                .any(|c| c.priority == chosen.priority && c.weight > 0);
            prop_assert_eq!(chosen.weight > 0, tier_weighted);
        }
    }
}
