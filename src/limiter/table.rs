//! Bounded keyed tables: per-source and per-username buckets, and the decision caches. Keys are
//! already keyed hashes (so the map needs no hashing of its own and cannot be flooded into
//! collisions); every value knows when it stops mattering, and the table forgets such values
//! first. A hard cap bounds memory whatever the input.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use super::gcra::{self, Limit, Params};

/// Hashes of keyed SipHash outputs are the values themselves.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map<V> = DashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

/// Entries looked at to estimate the eviction threshold of a full map.
const SAMPLE: usize = 4096;

/// A value that stops mattering at some time (nanoseconds since the limiter epoch).
pub trait Expiring {
    /// When the entry can be forgotten without changing any decision.
    fn expires(&self) -> u64;
}

impl Expiring for AtomicU64 {
    /// A bucket whose TAT has passed is full again: forgetting it changes nothing.
    fn expires(&self) -> u64 {
        self.load(Ordering::Acquire)
    }
}

/// A map with a hard cap: when full, expired entries go first, then the 10 % that expire
/// soonest (the longest idle).
pub struct BoundedMap<V> {
    map: Map<V>,
    cap: usize,
    evicted: AtomicU64,
}

impl<V> std::fmt::Debug for BoundedMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedMap")
            .field("len", &self.map.len())
            .field("cap", &self.cap)
            .finish()
    }
}

impl<V: Expiring> BoundedMap<V> {
    /// An empty map holding at most `cap` entries. Its table is sized for the cap at once: no
    /// rehash copies (and the fragmentation they leave) while a flood fills it, and untouched
    /// pages cost no resident memory.
    pub fn new(cap: usize) -> Self {
        Self {
            map: Map::with_capacity_and_hasher(cap.max(1), BuildHasherDefault::default()),
            cap: cap.max(1),
            evicted: AtomicU64::new(0),
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The hard cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Entries removed to stay under the cap or because they expired.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Run `f` on the entry for `key`, creating it with `make` when absent (making room first
    /// when the map is full).
    pub fn with<R>(
        &self,
        key: u64,
        now: u64,
        make: impl FnOnce() -> V,
        f: impl FnOnce(&V) -> R,
    ) -> R {
        if let Some(v) = self.map.get(&key) {
            return f(&v);
        }
        if self.map.len() >= self.cap {
            self.make_room(now);
        }
        let v = self.map.entry(key).or_insert_with(make);
        f(&v)
    }

    /// Run `f` on the entry for `key` if present and not expired.
    pub fn get<R>(&self, key: u64, now: u64, f: impl FnOnce(&V) -> R) -> Option<R> {
        let v = self.map.get(&key)?;
        (v.expires() > now).then(|| f(&v))
    }

    /// Insert or replace.
    pub fn insert(&self, key: u64, now: u64, value: V) {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            self.make_room(now);
        }
        self.map.insert(key, value);
    }

    /// Remove an entry.
    pub fn remove(&self, key: u64) {
        self.map.remove(&key);
    }

    /// Remove every expired entry; returns how many went.
    pub fn sweep(&self, now: u64) -> usize {
        self.sweep_with(now, |_| {})
    }

    /// Remove every expired entry, showing each to `gone` first; returns how many went.
    pub fn sweep_with(&self, now: u64, gone: impl Fn(&V)) -> usize {
        let before = self.map.len();
        self.map.retain(|_, v| {
            let keep = v.expires() > now;
            if !keep {
                gone(v);
            }
            keep
        });
        let gone = before.saturating_sub(self.map.len());
        self.evicted.fetch_add(gone as u64, Ordering::Relaxed);
        gone
    }

    fn make_room(&self, now: u64) {
        if self.sweep(now) > 0 && self.map.len() < self.cap {
            return;
        }
        // Still full of live entries: drop about the tenth that expires soonest, its threshold
        // estimated from a sample (no copy of a million entries).
        let step = (self.map.len() / SAMPLE).max(1);
        let mut ages: Vec<u64> = self
            .map
            .iter()
            .step_by(step)
            .map(|e| e.value().expires())
            .collect();
        if ages.is_empty() {
            return;
        }
        let k = (ages.len() / 10).max(1) - 1;
        let (_, threshold, _) = ages.select_nth_unstable(k);
        let threshold = *threshold;
        let before = self.map.len();
        self.map.retain(|_, v| v.expires() > threshold);
        let gone = before.saturating_sub(self.map.len());
        self.evicted.fetch_add(gone as u64, Ordering::Relaxed);
        tracing::warn!(
            cap = self.cap,
            evicted = gone,
            "bounded table full of live entries: the longest idle were forgotten"
        );
    }
}

/// Buckets sharing one limit, one per key (source IP, SIP username).
pub struct KeyedBuckets {
    params: Params,
    buckets: BoundedMap<AtomicU64>,
}

impl KeyedBuckets {
    /// A table of buckets with `limit`, at most `cap` of them.
    pub fn new(limit: Limit, cap: usize) -> Self {
        Self {
            params: Params::new(limit),
            buckets: BoundedMap::new(cap),
        }
    }

    /// Admit one cell for `key` at `now` (ns).
    pub fn try_acquire(&self, key: u64, now: u64) -> Result<(), Duration> {
        self.buckets.with(
            key,
            now,
            || AtomicU64::new(0),
            |tat| gcra::acquire(tat, &self.params, now),
        )
    }

    /// The earliest time (ns) at which `key` would conform.
    pub fn earliest(&self, key: u64, now: u64) -> u64 {
        self.buckets.with(
            key,
            now,
            || AtomicU64::new(0),
            |tat| gcra::earliest(tat, &self.params, now),
        )
    }

    /// Take one cell of `key` at `t` if it conforms then; the TAT it left.
    pub fn take_at(&self, key: u64, now: u64, t: u64) -> Option<(u64, u64)> {
        self.buckets.with(
            key,
            now,
            || AtomicU64::new(0),
            |tat| gcra::take_at(tat, &self.params, t),
        )
    }

    /// Give back the cell of `key` a `take_at` took if none was taken after it.
    pub fn release(&self, key: u64, cell: (u64, u64)) -> bool {
        self.buckets
            .get(key, 0, |tat| gcra::release(tat, cell))
            .unwrap_or(false)
    }

    /// Undo one admitted cell of `key`.
    pub fn refund(&self, key: u64) {
        let _ = self
            .buckets
            .get(key, 0, |tat| gcra::refund(tat, &self.params));
    }

    /// Change the shared limit on reload. Debts are kept as time owed, not rescaled per key
    /// (a key owes at most one burst, and rescaling a million keys would stall the reload).
    pub fn set_limit(&self, limit: Limit) {
        self.params.set(limit);
    }

    /// The table itself (size, cap, evictions, sweeping).
    pub fn table(&self) -> &BoundedMap<AtomicU64> {
        &self.buckets
    }

    /// The limit every key gets.
    pub fn limit(&self) -> Limit {
        self.params.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Until(u64);
    impl Expiring for Until {
        fn expires(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn full_map_forgets_expired_then_longest_idle() {
        let m = BoundedMap::new(10);
        for k in 0..10u64 {
            m.insert(k, 0, Until(100 + k));
        }
        // Nothing expired at 50: the soonest-expiring tenth goes.
        m.insert(99, 50, Until(1000));
        assert_eq!(m.len(), 10);
        assert!(m.get(0, 50, |_| ()).is_none());
        assert!(m.get(9, 50, |_| ()).is_some());
        // At 200 everything but 99 has expired: all of it goes at once.
        m.insert(100, 200, Until(1000));
        assert_eq!(m.len(), 2);
        assert!(m.evicted() >= 9);
    }

    #[test]
    fn keyed_buckets_are_independent_and_bounded() {
        let t = KeyedBuckets::new(
            Limit {
                rate: 1.0,
                burst: 1,
            },
            100,
        );
        assert!(t.try_acquire(1, 0).is_ok());
        assert!(t.try_acquire(1, 0).is_err());
        assert!(t.try_acquire(2, 0).is_ok());
        t.refund(1);
        assert!(t.try_acquire(1, 0).is_ok());
        for k in 0..10_000u64 {
            let _ = t.try_acquire(k, 5_000_000_000 + k);
        }
        assert!(t.table().len() <= 100);
    }

    #[test]
    fn a_released_reservation_goes_back_exactly_even_after_a_limit_change() {
        const MS: u64 = 1_000_000;
        let t = KeyedBuckets::new(
            Limit {
                rate: 10.0,
                burst: 1,
            },
            100,
        );
        assert_eq!(t.take_at(7, 0, 0), Some((0, 100 * MS)));
        let second = t.take_at(7, 0, 100 * MS).expect("conforms at 100 ms");
        // A slower rate, then the second booking is cancelled: the bucket goes back to where
        // that booking found it (next cell at 100 ms), not one new interval (1 s) back.
        t.set_limit(Limit {
            rate: 1.0,
            burst: 1,
        });
        assert!(t.release(7, second));
        assert_eq!(t.earliest(7, 0), 100 * MS);
        // Only once: the TAT is no longer the one it left.
        assert!(!t.release(7, second));
    }
}
