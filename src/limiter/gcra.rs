//! GCRA (the generic cell rate algorithm, as a virtual scheduler): one atomic "theoretical
//! arrival time" (TAT) per bucket. A cell conforms when `max(TAT, now) - now <= tolerance`;
//! admitting it moves TAT one emission interval further. With `interval = 1/rate` and
//! `tolerance = (burst - 1) · interval`, any window of length `t` admits at most `rate·t + burst`
//! cells, from the first second on — no counter that resets, no 2× at a boundary.
//!
//! Time is nanoseconds since the limiter's epoch, passed in by the caller: nothing here reads a
//! clock. TAT 0 means "never used" (a full bucket).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Nanoseconds per second.
const NS: f64 = 1e9;

/// A rate limit: `rate` cells per second, `burst` cells back to back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Cells per second (> 0).
    pub rate: f64,
    /// Cells admitted back to back (≥ 1).
    pub burst: u32,
}

/// The limiter's time base: instants become nanoseconds since it.
#[derive(Debug, Clone, Copy)]
pub struct Epoch(Instant);

impl Epoch {
    /// Count time from `start`.
    pub fn new(start: Instant) -> Self {
        Self(start)
    }

    /// `now` as nanoseconds since the epoch (0 for earlier instants).
    pub fn ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.0).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Bits of the packed parameters that hold `burst - 1` (bursts up to 2^20).
const BURST_BITS: u32 = 20;

/// The parameters of a bucket, changeable in place. Interval and burst are packed into one
/// atomic word, so a reader never sees the new interval with the old burst.
#[derive(Debug)]
pub struct Params {
    packed: AtomicU64,
}

impl Params {
    /// Parameters for a limit.
    pub fn new(limit: Limit) -> Self {
        Self {
            packed: AtomicU64::new(Self::pack(limit)),
        }
    }

    fn pack(limit: Limit) -> u64 {
        // Intervals up to 2^44 ns (4.9 hours per cell) fit beside the burst.
        let interval = ((NS / limit.rate).round() as u64).clamp(1, (1 << (64 - BURST_BITS)) - 1);
        let extra = u64::from(limit.burst.max(1) - 1).min((1 << BURST_BITS) - 1);
        (interval << BURST_BITS) | extra
    }

    fn split(limit: Limit) -> (u64, u64) {
        Self::unpack(Self::pack(limit))
    }

    fn unpack(packed: u64) -> (u64, u64) {
        let interval = packed >> BURST_BITS;
        let extra = packed & ((1 << BURST_BITS) - 1);
        (interval, interval * extra)
    }

    /// (interval, tolerance) in nanoseconds.
    pub fn get(&self) -> (u64, u64) {
        Self::unpack(self.packed.load(Ordering::Acquire))
    }

    /// The limit these parameters express.
    pub fn limit(&self) -> Limit {
        let (i, t) = self.get();
        Limit {
            rate: NS / i as f64,
            burst: u32::try_from(t / i + 1).unwrap_or(u32::MAX),
        }
    }

    /// Change the parameters in place.
    pub(crate) fn set(&self, limit: Limit) {
        self.packed.store(Self::pack(limit), Ordering::Release);
    }
}

/// Admit one cell at `now` (ns) if it conforms; otherwise the wait until it would.
pub fn acquire(tat: &AtomicU64, p: &Params, now: u64) -> Result<(), Duration> {
    let (interval, tolerance) = p.get();
    let mut cur = tat.load(Ordering::Acquire);
    loop {
        let base = cur.max(now);
        let ahead = base - now;
        if ahead > tolerance {
            return Err(Duration::from_nanos(ahead - tolerance));
        }
        match tat.compare_exchange_weak(cur, base + interval, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(actual) => cur = actual,
        }
    }
}

/// The earliest time (ns, not before `now`) at which a cell would conform.
pub fn earliest(tat: &AtomicU64, p: &Params, now: u64) -> u64 {
    let (_, tolerance) = p.get();
    tat.load(Ordering::Acquire)
        .saturating_sub(tolerance)
        .max(now)
}

/// Take one cell at time `t` if it conforms then (a reservation for pacing: every stage of a
/// chain takes its cell at the same instant). Returns the TAT it found (or `t`, if later) and
/// the TAT it left, for [`release`].
pub fn take_at(tat: &AtomicU64, p: &Params, t: u64) -> Option<(u64, u64)> {
    let (interval, tolerance) = p.get();
    let mut cur = tat.load(Ordering::Acquire);
    loop {
        let base = cur.max(t);
        if base - t > tolerance {
            return None;
        }
        let next = base.saturating_add(interval);
        match tat.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some((base, next)),
            Err(actual) => cur = actual,
        }
    }
}

/// Give back a cell [`take_at`] took — only while the TAT is still the one it left (no cell
/// taken after it, no rescale), back to the one it found. Refunding a reservation with later ones booked behind it would let a new call
/// into the gap *and* keep the later ones at their slots: more than the rate for an instant.
/// A slot that cannot be given back is skipped (the stream runs one cell under the rate),
/// never doubled. True when the cell was given back.
pub fn release(tat: &AtomicU64, (found, left): (u64, u64)) -> bool {
    tat.compare_exchange(left, found, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Undo exactly one admitted cell (a later stage refused the call).
pub fn refund(tat: &AtomicU64, p: &Params) {
    let (interval, _) = p.get();
    let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
        Some(cur.saturating_sub(interval))
    });
}

/// True when the bucket is full again (nothing owed at `now`): it can be forgotten and
/// recreated without changing any decision.
pub fn is_idle(tat: &AtomicU64, now: u64) -> bool {
    tat.load(Ordering::Acquire) <= now
}

/// A single bucket with its own parameters.
#[derive(Debug)]
pub struct Gcra {
    epoch: Epoch,
    params: Params,
    tat: AtomicU64,
}

impl Gcra {
    /// A full bucket.
    pub fn new(limit: Limit, epoch: Epoch) -> Self {
        Self {
            epoch,
            params: Params::new(limit),
            tat: AtomicU64::new(0),
        }
    }

    /// Admit one cell, or say how long until one would conform.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        acquire(&self.tat, &self.params, self.epoch.ns(now))
    }

    /// Undo exactly one admitted cell.
    pub fn refund(&self) {
        refund(&self.tat, &self.params);
    }

    /// The earliest time (ns since the epoch, not before `now`) at which a cell would conform.
    pub fn earliest(&self, now: Instant) -> u64 {
        earliest(&self.tat, &self.params, self.epoch.ns(now))
    }

    /// Take one cell at `t` (ns since the epoch) if it conforms then; the TAT it left.
    pub fn take_at(&self, t: u64) -> Option<(u64, u64)> {
        take_at(&self.tat, &self.params, t)
    }

    /// Give back the cell a `take_at` took if none was taken after it (see [`release`]).
    pub fn release(&self, cell: (u64, u64)) -> bool {
        release(&self.tat, cell)
    }

    /// Change rate and burst in place, keeping the cells already used: the debt (TAT ahead of
    /// now) is rescaled from the old interval to the new one, so a reload never grants a fresh
    /// burst. With pacing reservations booked ahead (TAT beyond one burst from now), those
    /// calls keep their instants, so the TAT never moves earlier: new calls are booked after
    /// them, not among them.
    pub fn rescale(&self, now: Instant, limit: Limit) {
        let now = self.epoch.ns(now);
        let (old_interval, old_tolerance) = self.params.get();
        let (new_interval, _) = Params::split(limit);
        self.params.set(limit);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                if cur <= now {
                    return Some(cur);
                }
                let cells = (cur - now) as f64 / old_interval as f64;
                let rescaled = now + (cells * new_interval as f64).round() as u64;
                let booked_ahead = cur - now > old_tolerance + old_interval;
                Some(if booked_ahead {
                    rescaled.max(cur)
                } else {
                    rescaled
                })
            });
    }

    /// The current limit.
    pub fn limit(&self) -> Limit {
        self.params.limit()
    }

    /// Cells that could be admitted back to back at `now`.
    pub fn available(&self, now: Instant) -> u32 {
        let (interval, tolerance) = self.params.get();
        let now = self.epoch.ns(now);
        let ahead = self.tat.load(Ordering::Acquire).saturating_sub(now);
        u32::try_from((tolerance + interval).saturating_sub(ahead) / interval).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl Gcra {
        /// Book the next slot within `max_wait` the way `Chain::reserve` does for one stage
        /// (`earliest`, then `take_at` there): the delay until it, or the wait beyond.
        fn reserve(&self, now: Instant, max_wait: Duration) -> Result<Duration, Duration> {
            let now = self.epoch.ns(now);
            let at = earliest(&self.tat, &self.params, now);
            let wait = Duration::from_nanos(at - now);
            if wait > max_wait {
                return Err(wait);
            }
            take_at(&self.tat, &self.params, at).expect("conforms at its earliest instant");
            Ok(wait)
        }
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn burst_then_exact_spacing() {
        let t0 = Instant::now();
        let b = Gcra::new(
            Limit {
                rate: 10.0,
                burst: 3,
            },
            Epoch::new(t0),
        );
        for _ in 0..3 {
            assert!(b.try_acquire(t0).is_ok());
        }
        assert_eq!(b.try_acquire(t0), Err(Duration::from_millis(100)));
        assert!(b.try_acquire(at(t0, 99)).is_err());
        assert!(b.try_acquire(at(t0, 100)).is_ok());
        assert!(b.try_acquire(at(t0, 150)).is_err());
        assert!(b.try_acquire(at(t0, 200)).is_ok());
    }

    #[test]
    fn first_second_never_exceeds_rate_plus_burst() {
        let t0 = Instant::now();
        let b = Gcra::new(
            Limit {
                rate: 20.0,
                burst: 1,
            },
            Epoch::new(t0),
        );
        // 1000 attempts spread over the first second: 20 pass, not 40 as with a reset counter.
        let admitted = (0..1000)
            .filter(|i| b.try_acquire(at(t0, *i)).is_ok())
            .count();
        assert_eq!(admitted, 20);
    }

    #[test]
    fn a_rate_raised_while_calls_are_booked_ahead_books_after_them() {
        let t0 = Instant::now();
        let b = Gcra::new(
            Limit {
                rate: 10.0,
                burst: 1,
            },
            Epoch::new(t0),
        );
        // Slots at 0, 100, ..., 400 ms.
        for n in 0..5 {
            assert_eq!(
                b.reserve(t0, Duration::from_secs(1)),
                Ok(Duration::from_millis(n * 100))
            );
        }
        // Ten times the rate: the next call comes after the booked ones, not at 50 ms among
        // them (the booked calls plus 100 CPS of new ones would exceed 101 in that second).
        b.rescale(
            t0,
            Limit {
                rate: 100.0,
                burst: 1,
            },
        );
        assert_eq!(
            b.reserve(t0, Duration::from_secs(1)),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            b.reserve(t0, Duration::from_secs(1)),
            Ok(Duration::from_millis(510))
        );
    }

    #[test]
    fn reserve_gives_the_next_slot_within_max_wait() {
        let t0 = Instant::now();
        let b = Gcra::new(
            Limit {
                rate: 10.0,
                burst: 1,
            },
            Epoch::new(t0),
        );
        assert_eq!(b.reserve(t0, Duration::from_secs(1)), Ok(Duration::ZERO));
        assert_eq!(
            b.reserve(t0, Duration::from_secs(1)),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            b.reserve(t0, Duration::from_secs(1)),
            Ok(Duration::from_millis(200))
        );
        assert_eq!(
            b.reserve(t0, Duration::from_millis(250)),
            Err(Duration::from_millis(300))
        );
    }

    #[test]
    fn rescale_keeps_the_debt() {
        let t0 = Instant::now();
        let b = Gcra::new(
            Limit {
                rate: 10.0,
                burst: 10,
            },
            Epoch::new(t0),
        );
        for _ in 0..10 {
            assert!(b.try_acquire(t0).is_ok());
        }
        // Doubling rate and burst: the 10 used cells stay used; 10 of the new 20 remain.
        b.rescale(
            t0,
            Limit {
                rate: 20.0,
                burst: 20,
            },
        );
        assert_eq!(b.available(t0), 10);
        assert_eq!(
            b.limit(),
            Limit {
                rate: 20.0,
                burst: 20
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any arrival sequence: admitted cells in any window of length t ≤ rate·t + burst.
        #[test]
        fn admitted_never_exceed_rate_times_t_plus_burst(
            rate in 1u32..200,
            burst in 1u32..20,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..400),
        ) {
            let t0 = Instant::now();
            let b = Gcra::new(Limit { rate: f64::from(rate), burst }, Epoch::new(t0));
            let mut now = 0u64;
            let mut admitted = Vec::new();
            for g in gaps {
                now += g;
                if b.try_acquire(t0 + Duration::from_nanos(now)).is_ok() {
                    admitted.push(now);
                }
            }
            for (i, start) in admitted.iter().enumerate() {
                for (j, end) in admitted.iter().enumerate().skip(i) {
                    let t = (end - start) as f64 / 1e9;
                    let n = (j - i + 1) as f64;
                    // One nanosecond of rounding per cell in the interval.
                    prop_assert!(n <= f64::from(rate) * t + f64::from(burst) + 1e-6 * n,
                        "{n} cells in {t} s at rate {rate} burst {burst}");
                }
            }
        }

        /// A refund restores exactly one cell.
        #[test]
        fn refund_restores_exactly_one_cell(rate in 1u32..100, burst in 1u32..20, used in 0u32..40) {
            let t0 = Instant::now();
            let b = Gcra::new(Limit { rate: f64::from(rate), burst }, Epoch::new(t0));
            let mut admitted = 0;
            for _ in 0..used {
                if b.try_acquire(t0).is_ok() {
                    admitted += 1;
                }
            }
            let before = b.available(t0);
            if admitted > 0 {
                b.refund();
                prop_assert_eq!(b.available(t0), before + 1);
            }
        }

        /// A rescale never grants a fresh full burst.
        #[test]
        fn rescale_never_grants_a_fresh_burst(
            rate in 1u32..100, burst in 2u32..30, used in 1u32..30,
            new_rate in 1u32..100, new_burst in 2u32..30,
        ) {
            let t0 = Instant::now();
            let b = Gcra::new(Limit { rate: f64::from(rate), burst }, Epoch::new(t0));
            let mut admitted = 0u32;
            for _ in 0..used {
                if b.try_acquire(t0).is_ok() {
                    admitted += 1;
                }
            }
            b.rescale(t0, Limit { rate: f64::from(new_rate), burst: new_burst });
            let mut again = 0u32;
            while b.try_acquire(t0).is_ok() {
                again += 1;
            }
            // The cells used stay used in the new bucket (±1 for rounding).
            let allowed = new_burst.saturating_sub(admitted) + 1;
            prop_assert!(again <= allowed, "{again} > {allowed}");
            prop_assert!(admitted == 0 || again < new_burst, "a full fresh burst after using {admitted}");
        }
    }
}
