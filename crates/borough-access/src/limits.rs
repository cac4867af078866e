//! Rate limits: token buckets per key, per tenant and per address, and the
//! throttle on failed sign-ins. Each table is bounded: when it is full, the
//! buckets idle longest go first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most buckets one table keeps.
const MAX_BUCKETS: usize = 100_000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by name: `rate` tokens a second, at most `burst` saved up.
pub struct Buckets {
    table: Mutex<HashMap<String, Bucket>>,
}

impl Default for Buckets {
    fn default() -> Self {
        Self::new()
    }
}

impl Buckets {
    pub fn new() -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `name`'s bucket; when it is empty, answers how
    /// long until one is there.
    pub fn take(&self, name: &str, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        if rate <= 0.0 {
            return Err(Duration::from_secs(1));
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= MAX_BUCKETS && !table.contains_key(name) {
            evict(&mut table);
        }
        let b = table.entry(name.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

/// Drops the entries that have been idle longest, down to three quarters.
fn evict<T: Copy + Into<Instant>>(table: &mut HashMap<String, T>) {
    let mut ages: Vec<(Instant, String)> = table
        .iter()
        .map(|(k, v)| ((*v).into(), k.clone()))
        .collect();
    ages.sort();
    let drop = table.len() - MAX_BUCKETS * 3 / 4;
    for (_, k) in ages.into_iter().take(drop) {
        table.remove(&k);
    }
}

impl From<Bucket> for Instant {
    fn from(b: Bucket) -> Instant {
        b.at
    }
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    since: Instant,
    blocked_until: Option<Instant>,
    at: Instant,
}

impl From<Failures> for Instant {
    fn from(f: Failures) -> Instant {
        f.at
    }
}

/// Failed sign-ins per address: after `max` failures within `window`, the
/// address is refused for `block` (a guess costs far more than it did).
pub struct FailedAuth {
    max: u32,
    window: Duration,
    block: Duration,
    table: Mutex<HashMap<String, Failures>>,
}

impl FailedAuth {
    pub fn new(max: u32, window: Duration, block: Duration) -> Self {
        Self {
            max,
            window,
            block,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// How long `addr` is still refused, if it is.
    pub fn blocked(&self, addr: &str, now: Instant) -> Option<Duration> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let until = table.get(addr)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failure; true when it made the address blocked.
    pub fn failed(&self, addr: &str, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= MAX_BUCKETS && !table.contains_key(addr) {
            evict(&mut table);
        }
        let f = table.entry(addr.to_string()).or_insert(Failures {
            count: 0,
            since: now,
            blocked_until: None,
            at: now,
        });
        f.at = now;
        if now.saturating_duration_since(f.since) > self.window {
            f.count = 0;
            f.since = now;
        }
        f.count += 1;
        if f.count >= self.max && f.blocked_until.is_none_or(|u| u <= now) {
            f.blocked_until = Some(now + self.block);
            f.count = 0;
            f.since = now;
            return true;
        }
        false
    }

    /// A success forgets the address's failures.
    pub fn succeeded(&self, addr: &str) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.get(addr).is_some_and(|f| f.blocked_until.is_none()) {
            table.remove(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_bursts_then_refill_at_their_rate() {
        let b = Buckets::new();
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(b.take("k", 2.0, 4.0, t0).is_ok());
        }
        let wait = b.take("k", 2.0, 4.0, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO);
        assert!(
            b.take("k", 2.0, 4.0, t0 + Duration::from_millis(500))
                .is_ok()
        );
        assert!(
            b.take("other", 2.0, 4.0, t0).is_ok(),
            "buckets are per name"
        );
    }

    #[test]
    fn repeated_failures_block_an_address_for_a_while() {
        let f = FailedAuth::new(3, Duration::from_secs(60), Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(!f.failed("a", t0));
        assert!(!f.failed("a", t0));
        assert!(f.blocked("a", t0).is_none());
        assert!(f.failed("a", t0));
        assert!(f.blocked("a", t0 + Duration::from_secs(10)).is_some());
        assert!(f.blocked("b", t0).is_none());
        assert!(f.blocked("a", t0 + Duration::from_secs(31)).is_none());
        // Failures far apart never add up.
        let g = FailedAuth::new(2, Duration::from_secs(1), Duration::from_secs(30));
        assert!(!g.failed("c", t0));
        assert!(!g.failed("c", t0 + Duration::from_secs(5)));
    }
}
