//! Per-client write budgets: a token bucket per key, with time passed in so the arithmetic is tested
//! without waiting.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Writes a node may make in a burst (a restart reports endpoints and routes, a `set` repeats them).
const BURST: f64 = 10.0;
/// Writes a second a node may keep up: far above an honest node (a change of address or of its routes),
/// far below what would make every node re-poll without pause.
const PER_SECOND: f64 = 1.0;
/// Keys idle this long are forgotten, so the table does not grow with every node that ever wrote.
const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct WriteLimiter<K> {
    buckets: HashMap<K, (f64, Instant)>,
    last_sweep: Option<Instant>,
    burst: f64,
    per_second: f64,
}

impl<K> Default for WriteLimiter<K> {
    fn default() -> Self {
        Self::new(BURST, PER_SECOND)
    }
}

impl<K> WriteLimiter<K> {
    /// `burst` at once, then `per_second` (the console's sign-ins use it with a smaller budget).
    pub fn new(burst: f64, per_second: f64) -> Self {
        Self { buckets: HashMap::new(), last_sweep: None, burst, per_second }
    }
}

impl<K: Hash + Eq> WriteLimiter<K> {
    /// Whether `key` may write at `now`; takes a token if so.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if self.last_sweep.is_none_or(|t| now.saturating_duration_since(t) >= FORGET_AFTER) {
            self.buckets.retain(|_, (_, at)| now.saturating_duration_since(*at) < FORGET_AFTER);
            self.last_sweep = Some(now);
        }
        let (tokens, at) = self.buckets.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_one_write_a_second() {
        let start = Instant::now();
        let mut limiter = WriteLimiter::default();
        assert!((0..10).all(|_| limiter.allow(1u64, start)));
        assert!(!limiter.allow(1, start), "the eleventh write of a burst");
        assert!(limiter.allow(2, start), "another node has its own budget");
        assert!(!limiter.allow(1, start + Duration::from_millis(500)));
        assert!(limiter.allow(1, start + Duration::from_millis(1500)));
        assert!(!limiter.allow(1, start + Duration::from_millis(1600)));
        // Idle long enough, the whole burst is back.
        let later = start + Duration::from_secs(120);
        assert!((0..10).all(|_| limiter.allow(1, later)));
        assert_eq!(limiter.buckets.len(), 1, "node 2, idle for two minutes, was forgotten");
    }
}
