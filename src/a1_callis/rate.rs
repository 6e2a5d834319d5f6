//! [`RateWindow`]: how much a peer did within the current second, against a budget — the one
//! rate rule behind the frame flood limit, the refusal limit and the blob cancel limit.
//!
//! Pure: time comes in as `now`. A window starts at the first event after the previous one
//! ended and lasts one second; within it, costs add up. No IO, no clock.

use std::time::{Duration, Instant};

/// A one-second window and what was spent in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateWindow {
    start: Option<Instant>,
    spent: u64,
}

impl RateWindow {
    /// A window that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spends `cost` at `now`; false once the window's total passes `budget` (the event that
    /// crosses it is refused, and so is every later one in the same second).
    pub fn admit(&mut self, now: Instant, cost: u64, budget: u64) -> bool {
        let over = self
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if over {
            self.start = Some(now);
            self.spent = 0;
        }
        self.spent = self.spent.saturating_add(cost);
        self.spent <= budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_lasts_one_second_and_costs_add_up_within_it() {
        let t0 = Instant::now();
        let mut w = RateWindow::new();
        assert!(w.admit(t0, 2, 5));
        assert!(w.admit(t0 + Duration::from_millis(500), 3, 5), "5 of 5");
        assert!(!w.admit(t0 + Duration::from_millis(999), 1, 5), "6 of 5");
        assert!(
            !w.admit(t0 + Duration::from_millis(999), 0, 5),
            "still over"
        );
        assert!(w.admit(t0 + Duration::from_secs(1), 5, 5), "a new second");
        assert!(!w.admit(t0 + Duration::from_millis(1500), 1, 5));
    }
}
