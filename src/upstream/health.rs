//! A server's health with hysteresis (pingora's `consecutive_failure` /
//! `consecutive_success`, HAProxy's `fall` / `rise`): one lost probe or one refused
//! connection does not take a server out, and one lucky answer does not bring a flapping
//! one back. Every observation counts — active probes and the data path's own connections.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// How many observations in a row flip a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive failures that take an up server down.
    pub fall: u32,
    /// Consecutive successes that bring a down server back up.
    pub rise: u32,
}

impl Default for Thresholds {
    /// Down after two failures in a row (a probe and a refused connection, or two probes):
    /// a server that refuses connections is passed over within one more attempt, while a
    /// single dropped probe changes nothing. Up after two successes.
    fn default() -> Self {
        Self { fall: 2, rise: 2 }
    }
}

/// The counting, apart from any clock or lock, so that each rule is tested alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub up: bool,
    /// Anything observed yet: a server nobody has heard from counts as up but is tried
    /// after those known to answer (see [`Health::rank`]).
    pub observed: bool,
    /// Successes in a row (0 after a failure).
    pub successes: u32,
    /// Failures in a row (0 after a success).
    pub failures: u32,
}

impl Counter {
    /// A new server counts as up until observations say otherwise: traffic is not held
    /// back waiting for a first probe.
    pub fn new() -> Self {
        Self {
            up: true,
            observed: false,
            successes: 0,
            failures: 0,
        }
    }

    /// Takes one observation; returns the new state when it flipped.
    pub fn observe(&mut self, ok: bool, t: Thresholds) -> Option<bool> {
        self.observed = true;
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= t.rise.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= t.fall.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

/// What the admin API and status page show of one server.
#[derive(Debug, Clone)]
pub struct HealthView {
    pub up: bool,
    pub failures: u32,
    /// The latest failure's reason, kept after the server recovers (what went wrong last).
    pub last_error: Option<String>,
}

/// Where a server stands in the order its target's servers are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// Up, and has answered or been judged.
    Up,
    /// Nothing observed yet (a start-up probe still running): after the known ones.
    Unknown,
    Down,
}

struct Detail {
    counter: Counter,
    last_error: Option<String>,
}

/// One server's health, shared by the data path (reads `is_up` on every new connection)
/// and whoever observes it.
pub struct Health {
    /// Mirrors `detail.counter.up` for lock-free reads.
    up: AtomicBool,
    detail: Mutex<Detail>,
    thresholds: Thresholds,
}

impl Health {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            up: AtomicBool::new(true),
            detail: Mutex::new(Detail {
                counter: Counter::new(),
                last_error: None,
            }),
            thresholds,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records one observation (`Err` carries why it failed); returns whether the server
    /// is up now and whether this observation flipped it, both as of this observation.
    pub fn observe(&self, outcome: Result<(), &str>) -> (bool, bool) {
        let mut d = self.lock();
        let flipped = d.counter.observe(outcome.is_ok(), self.thresholds);
        if let Err(why) = outcome {
            d.last_error = Some(why.to_string());
        }
        if let Some(up) = flipped {
            self.up.store(up, Ordering::Relaxed);
        }
        (d.counter.up, flipped.is_some())
    }

    /// Where the server goes in the order of attempts.
    pub fn rank(&self) -> Rank {
        let d = self.lock();
        match (d.counter.up, d.counter.observed) {
            (false, _) => Rank::Down,
            (true, true) => Rank::Up,
            (true, false) => Rank::Unknown,
        }
    }

    pub fn view(&self) -> HealthView {
        let d = self.lock();
        HealthView {
            up: d.counter.up,
            failures: d.counter.failures,
            last_error: d.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { fall: 3, rise: 2 };

    #[test]
    fn down_after_n_failures_in_a_row() {
        let mut c = Counter::new();
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(false, T), None);
        assert!(c.up, "two failures of three: still up");
        assert_eq!(c.observe(false, T), Some(false));
        assert!(!c.up);
        assert_eq!(c.observe(false, T), None, "already down: no second flip");
    }

    #[test]
    fn a_success_resets_the_failure_run() {
        let mut c = Counter::new();
        c.observe(false, T);
        c.observe(false, T);
        c.observe(true, T);
        c.observe(false, T);
        c.observe(false, T);
        assert!(c.up, "failures were not consecutive");
        assert_eq!(c.observe(false, T), Some(false));
    }

    #[test]
    fn up_after_m_successes_in_a_row() {
        let mut c = Counter::new();
        for _ in 0..3 {
            c.observe(false, T);
        }
        assert_eq!(c.observe(true, T), None, "one success of two: still down");
        assert_eq!(c.observe(false, T), None);
        assert_eq!(c.observe(true, T), None, "the run started again");
        assert_eq!(c.observe(true, T), Some(true));
        assert!(c.up);
    }

    #[test]
    fn thresholds_of_zero_act_as_one() {
        let t = Thresholds { fall: 0, rise: 0 };
        let mut c = Counter::new();
        assert_eq!(c.observe(false, t), Some(false));
        assert_eq!(c.observe(true, t), Some(true));
    }

    #[test]
    fn health_ranks_and_keeps_the_last_error() {
        let h = Health::new(Thresholds { fall: 1, rise: 1 });
        assert!(h.is_up());
        assert_eq!(h.rank(), Rank::Unknown, "up, but nobody has heard from it");
        assert_eq!(h.observe(Err("connection refused")), (false, true));
        assert!(!h.is_up());
        assert_eq!(h.rank(), Rank::Down);
        assert_eq!(h.view().last_error.as_deref(), Some("connection refused"));
        assert_eq!(h.observe(Ok(())), (true, true));
        assert_eq!(h.observe(Ok(())), (true, false));
        assert!(h.is_up());
        assert_eq!(h.rank(), Rank::Up);
        assert_eq!(
            h.view().last_error.as_deref(),
            Some("connection refused"),
            "kept after recovery"
        );
    }
}
