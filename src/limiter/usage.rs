//! Counters and the traffic profile of one trunk or account: what carriers bill and judge.
//! Admissions per second (the last whole second, the peak and the 95th percentile over a
//! period — Telnyx's CPS surcharge measure), and the outcome of admitted calls: ASR (answered /
//! attempted), ACD (answer to BYE) and the share of calls of 12 s or less — compared with
//! Twilio's thresholds for granting higher CPS (ACD > 30 s, ≤ 10 % short calls, ASR > 70 %).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Stage;

/// Bits of a history slot that hold the count (the rest hold the second it belongs to).
const COUNT_BITS: u32 = 24;
/// Calls this short or shorter count as short (Twilio's measure).
pub const SHORT_CALL_SECS: u64 = 12;

/// Counters of one trunk or account, kept across reloads with its bucket.
#[derive(Debug)]
pub struct KeyStats {
    admitted: AtomicU64,
    rejected: [AtomicU64; Stage::ALL.len()],
    /// The current second, the calls admitted in it, and the count of the one before.
    second: AtomicU64,
    this_second: AtomicU64,
    last_second: AtomicU64,
    /// One slot per second of the usage period (`second % period`), each holding the second
    /// it belongs to and its admissions: no lock, bounded by the period.
    history: Box<[AtomicU64]>,
    answered: AtomicU64,
    failed: AtomicU64,
    completed: AtomicU64,
    short: AtomicU64,
    /// Talk time in milliseconds (nanoseconds would wrap within weeks on a busy account).
    talk_ms: AtomicU64,
    /// Calls waiting for their slot now (pacing), and ever queued.
    waiting: AtomicU64,
    queued: AtomicU64,
    /// Waits of paced calls, by [`QUEUE_DELAY_BOUNDS_MS`] bucket (last: above them all).
    queue_delay: [AtomicU64; QUEUE_DELAY_BOUNDS_MS.len() + 1],
}

/// Upper bounds (ms) of the pacing-delay histogram buckets.
pub const QUEUE_DELAY_BOUNDS_MS: [u64; 9] = [10, 50, 100, 250, 500, 1_000, 2_000, 5_000, 30_000];

impl Default for KeyStats {
    fn default() -> Self {
        Self::new(3600)
    }
}

/// A key's traffic profile.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Usage {
    /// The period the peaks are taken over, seconds.
    pub period_secs: u64,
    /// Most calls admitted in one second of the period.
    pub peak_cps: u32,
    /// 95th percentile of the per-second admissions over the period (seconds without any
    /// count as zero).
    pub p95_cps: u32,
    /// Admitted calls answered (2xx).
    pub answered: u64,
    /// Admitted calls that ended without an answer (final ≥ 300 other than 401/407).
    pub failed: u64,
    /// Answered / (answered + failed), when any call ended.
    pub asr: Option<f64>,
    /// Mean answer-to-BYE duration of completed calls, seconds.
    pub acd_secs: Option<f64>,
    /// Share of completed calls of 12 s or less.
    pub short_call_share: Option<f64>,
    /// Twilio's thresholds for higher CPS: ASR > 70 %, ACD > 30 s, ≤ 10 % short calls.
    pub meets_asr: Option<bool>,
    /// ACD above 30 s.
    pub meets_acd: Option<bool>,
    /// At most 10 % short calls.
    pub meets_short_calls: Option<bool>,
}

impl KeyStats {
    /// Counters keeping `period_secs` seconds of admission history.
    pub fn new(period_secs: u64) -> Self {
        Self {
            admitted: AtomicU64::new(0),
            rejected: Default::default(),
            second: AtomicU64::new(0),
            this_second: AtomicU64::new(0),
            last_second: AtomicU64::new(0),
            history: (0..period_secs.max(1)).map(|_| AtomicU64::new(0)).collect(),
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            short: AtomicU64::new(0),
            talk_ms: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queue_delay: Default::default(),
        }
    }

    /// A call starts waiting for its slot.
    pub fn queued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// A waiting call left the queue (sent, cancelled or refused) after `waited_ns`; `sent`
    /// says whether it went out (only those count in the delay histogram).
    pub fn dequeued(&self, waited_ns: u64, sent: bool) {
        let _ = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
        if sent {
            let ms = waited_ns / 1_000_000;
            let i = QUEUE_DELAY_BOUNDS_MS
                .iter()
                .position(|&b| ms <= b)
                .unwrap_or(QUEUE_DELAY_BOUNDS_MS.len());
            self.queue_delay[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Calls waiting now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Calls ever queued.
    pub fn queued_total(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Per-bucket counts of the pacing delays (not cumulative; last is +Inf).
    pub fn queue_delays(&self) -> Vec<u64> {
        self.queue_delay
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// Move to `second` if it is later than the current one (arrival instants of different
    /// workers are not ordered: an earlier one counts in the current second, never backwards).
    fn roll(&self, second: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let mut seen = self.second.load(Acquire);
        while second > seen {
            match self
                .second
                .compare_exchange_weak(seen, second, AcqRel, Acquire)
            {
                Ok(_) => {
                    let n = self.this_second.swap(0, AcqRel);
                    // A gap of more than a second means the last full second had nothing.
                    self.last_second
                        .store(if second == seen + 1 { n } else { 0 }, Ordering::Release);
                    let slot = &self.history[(seen % self.history.len() as u64) as usize];
                    slot.store(
                        (seen << COUNT_BITS) | n.min((1 << COUNT_BITS) - 1),
                        Ordering::Release,
                    );
                    return;
                }
                Err(actual) => seen = actual,
            }
        }
    }

    /// Count an admitted call at `now_ns`.
    pub fn admitted_at(&self, now_ns: u64) {
        self.roll(now_ns / 1_000_000_000);
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.this_second.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a call refused at `stage`.
    pub fn rejected_at(&self, stage: Stage) {
        self.rejected[stage.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// An admitted call was answered.
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// An admitted call ended without an answer.
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// An answered call ended (BYE) after `talk_ns`.
    pub fn completed(&self, talk_ns: u64) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.talk_ms
            .fetch_add(talk_ns / 1_000_000, Ordering::Relaxed);
        if talk_ns <= SHORT_CALL_SECS * 1_000_000_000 {
            self.short.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Calls admitted so far.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Calls refused at `stage` so far.
    pub fn rejected(&self, stage: Stage) -> u64 {
        self.rejected[stage.index()].load(Ordering::Relaxed)
    }

    /// Calls admitted in the last whole second before `now_ns`.
    pub fn cps(&self, now_ns: u64) -> u64 {
        self.roll(now_ns / 1_000_000_000);
        self.last_second.load(Ordering::Acquire)
    }

    /// The traffic profile over the whole seconds of the history period before `now_ns`.
    pub fn usage(&self, now_ns: u64) -> Usage {
        let now_s = now_ns / 1_000_000_000;
        self.roll(now_s);
        let period = self.history.len() as u64;
        let mut counts: Vec<u32> = self
            .history
            .iter()
            .map(|slot| slot.load(Ordering::Acquire))
            .filter(|v| {
                let s = v >> COUNT_BITS;
                *v != 0 && s < now_s && now_s - s <= period
            })
            .map(|v| (v & ((1 << COUNT_BITS) - 1)) as u32)
            .filter(|n| *n > 0)
            .collect();
        counts.sort_unstable();
        let peak = counts.last().copied().unwrap_or(0);
        // Rank of the 95th percentile among `period` seconds, the missing ones being zeros.
        let rank = (period as f64 * 0.95).ceil() as u64;
        let zeros = period.saturating_sub(counts.len() as u64);
        let p95 = if rank <= zeros {
            0
        } else {
            counts[usize::try_from(rank - zeros - 1)
                .unwrap_or(0)
                .min(counts.len() - 1)]
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (answered, failed) = (load(&self.answered), load(&self.failed));
        let (completed, short, talk_ms) = (
            load(&self.completed),
            load(&self.short),
            load(&self.talk_ms),
        );
        let ended = answered + failed;
        let asr = (ended > 0).then(|| answered as f64 / ended as f64);
        let acd = (completed > 0).then(|| talk_ms as f64 / 1e3 / completed as f64);
        let short_share = (completed > 0).then(|| short as f64 / completed as f64);
        Usage {
            period_secs: period,
            peak_cps: peak,
            p95_cps: p95,
            answered,
            failed,
            asr,
            acd_secs: acd,
            short_call_share: short_share,
            meets_asr: asr.map(|a| a > 0.70),
            meets_acd: acd.map(|a| a > 30.0),
            meets_short_calls: short_share.map(|s| s <= 0.10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn peak_and_95th_percentile_over_the_period() {
        let k = KeyStats::new(100);
        // 100 seconds: 90 with 10 calls, 5 with 30, 5 with nothing.
        for sec in 0..100u64 {
            let n = match sec {
                0..90 => 10,
                90..95 => 30,
                _ => 0,
            };
            for i in 0..n {
                k.admitted_at(sec * S + i * 1000);
            }
        }
        let u = k.usage(100 * S);
        assert_eq!(u.peak_cps, 30);
        // Sorted: 5 zeros, 90 tens, 5 thirties; the 95th of 100 is a ten.
        assert_eq!(u.p95_cps, 10);
        // 150 s later the period holds nothing.
        assert_eq!(k.usage(250 * S).peak_cps, 0);
    }

    #[test]
    fn a_late_arrival_never_moves_the_second_backwards() {
        let k = KeyStats::new(10);
        k.admitted_at(5 * S);
        k.admitted_at(6 * S);
        k.admitted_at(5 * S + 999_999_999); // stamped earlier, counted now
        assert_eq!(k.cps(7 * S), 2);
    }

    #[test]
    fn asr_acd_and_short_calls_against_twilio_thresholds() {
        let k = KeyStats::default();
        for _ in 0..7 {
            k.answered();
        }
        for _ in 0..3 {
            k.failed();
        }
        for secs in [5, 8, 40, 40, 40, 40, 37] {
            k.completed(secs * S);
        }
        let u = k.usage(0);
        assert_eq!(u.asr, Some(0.7));
        assert!((u.acd_secs.expect("acd") - 30.0).abs() < 1e-9);
        assert_eq!(u.short_call_share, Some(2.0 / 7.0));
        assert_eq!(u.meets_asr, Some(false), "70 % is not above 70 %");
        assert_eq!(u.meets_acd, Some(false), "30 s is not above 30 s");
        assert_eq!(u.meets_short_calls, Some(false));
    }
}
