//! Exponential backoff with jitter, shared by everything that retries: reconnecting to
//! brokers, reopening serial ports, polling dead Modbus slaves, the Storage
//! Integration, central sync and restarting a failed source.
//!
//! The n-th consecutive retry waits up to `min(max, initial · 2ⁿ)` (the ceiling). How
//! the actual wait is drawn below that ceiling is the [`Jitter`]: full jitter spreads a
//! fleet that lost a server at the same moment, so it does not come back in one spike.

use rand::Rng;
use std::time::Duration;

/// How a wait is drawn from its ceiling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    /// Exactly the ceiling.
    None,
    /// The ceiling ± this fraction (e.g. 0.2), never above `max`.
    Spread(f64),
    /// Uniform between the floor (0 unless [`Backoff::with_floor`]) and the ceiling.
    Full,
}

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    floor: Duration,
    jitter: Jitter,
    attempt: u32,
}

impl Backoff {
    /// Full jitter between 0 and the ceiling.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            floor: Duration::ZERO,
            jitter: Jitter::Full,
            attempt: 0,
        }
    }

    pub fn with_jitter(mut self, jitter: Jitter) -> Backoff {
        self.jitter = jitter;
        self
    }

    /// The shortest wait drawn by [`Jitter::Full`] (also returned while the ceiling is
    /// not above it).
    pub fn with_floor(mut self, floor: Duration) -> Backoff {
        self.floor = floor.min(self.max);
        self
    }

    /// The ceiling of the next wait (for messages).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The wait before the next retry; the one after is drawn from a doubled ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Spread(fraction) => {
                let factor = rand::thread_rng().gen_range((1.0 - fraction)..=(1.0 + fraction));
                ceiling.mul_f64(factor.max(0.0)).min(self.max)
            }
            Jitter::Full if ceiling <= self.floor => self.floor,
            Jitter::Full => rand::thread_rng().gen_range(self.floor..=ceiling),
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Retries since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}
