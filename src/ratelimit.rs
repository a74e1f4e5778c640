//! Rate-limited logging for frequent, expected failures (bad payloads, garbage on a
//! serial line): count every occurrence, log the first and then at most one line per
//! interval with how many were suppressed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed_since_last_log)` when this occurrence should be logged.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(Duration::from_secs(60))
    }
}

/// One [`LogLimiter`] per key (a rejection reason of one source): the first occurrence
/// of every key is logged, however busy the others are. Keys are `&'static str` from a
/// closed set, so the map stays small.
#[derive(Debug)]
pub struct KeyedLogLimiter {
    interval: Duration,
    by_key: BTreeMap<&'static str, LogLimiter>,
}

impl KeyedLogLimiter {
    pub fn new(interval: Duration) -> Self {
        KeyedLogLimiter {
            interval,
            by_key: BTreeMap::new(),
        }
    }

    /// `Some(suppressed_since_last_log_of_this_key)` when this occurrence should be logged.
    pub fn allow(&mut self, key: &'static str) -> Option<u64> {
        let interval = self.interval;
        self.by_key
            .entry(key)
            .or_insert_with(|| LogLimiter::new(interval))
            .allow()
    }
}

impl Default for KeyedLogLimiter {
    fn default() -> Self {
        KeyedLogLimiter::new(Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_then_suppresses() {
        let mut l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(l.allow(), Some(2));
    }

    #[test]
    fn each_key_logs_its_first_occurrence() {
        let mut l = KeyedLogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow("wrong_type"), Some(0));
        for _ in 0..9 {
            assert_eq!(l.allow("wrong_type"), None);
        }
        assert_eq!(l.allow("protobuf"), Some(0));
        assert_eq!(l.allow("protobuf"), None);
        if let Some(limiter) = l.by_key.get_mut("wrong_type") {
            limiter.last = Some(Instant::now() - Duration::from_secs(7200));
        }
        assert_eq!(l.allow("wrong_type"), Some(9));
    }
}
