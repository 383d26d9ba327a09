//! Counters and the traffic profile of one trunk or account: what carriers bill and judge.
//! Admissions per second (the last whole second, the peak and the 95th percentile over a
//! period — Telnyx's CPS surcharge measure), and the outcome of admitted calls: ASR (answered /
//! attempted), ACD (answer to BYE) and the share of calls of 12 s or less — compared with
//! Twilio's thresholds for granting higher CPS (ACD > 30 s, ≤ 10 % short calls, ASR > 70 %).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Stage;

/// Seconds of admission history kept per key (one day).
const HISTORY: usize = 86_400;
/// Calls this short or shorter count as short (Twilio's measure).
pub const SHORT_CALL_SECS: u64 = 12;

/// Counters of one trunk or account, kept across reloads with its bucket.
#[derive(Debug, Default)]
pub struct KeyStats {
    admitted: AtomicU64,
    rejected: [AtomicU64; Stage::ALL.len()],
    /// The current second, the calls admitted in it, and the count of the one before.
    second: AtomicU64,
    this_second: AtomicU64,
    last_second: AtomicU64,
    /// (second, admitted) of past seconds that admitted anything, oldest first.
    history: Mutex<VecDeque<(u64, u32)>>,
    answered: AtomicU64,
    failed: AtomicU64,
    completed: AtomicU64,
    short: AtomicU64,
    talk_ns: AtomicU64,
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
    fn roll(&self, second: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let seen = self.second.load(Acquire);
        if seen != second
            && self
                .second
                .compare_exchange(seen, second, AcqRel, Acquire)
                .is_ok()
        {
            let n = self.this_second.swap(0, AcqRel);
            // A gap of more than a second means the last full second had nothing.
            self.last_second
                .store(if second == seen + 1 { n } else { 0 }, Ordering::Release);
            if n > 0 {
                let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
                if h.len() >= HISTORY {
                    h.pop_front();
                }
                h.push_back((seen, u32::try_from(n).unwrap_or(u32::MAX)));
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
        self.talk_ns.fetch_add(talk_ns, Ordering::Relaxed);
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

    /// The traffic profile over the `period_secs` whole seconds before `now_ns`.
    pub fn usage(&self, now_ns: u64, period_secs: u64) -> Usage {
        let now_s = now_ns / 1_000_000_000;
        self.roll(now_s);
        let period = period_secs.max(1);
        let mut counts: Vec<u32> = {
            let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            h.iter()
                .filter(|(s, _)| *s < now_s && now_s - s <= period)
                .map(|(_, n)| *n)
                .collect()
        };
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
        let (completed, short, talk) = (
            load(&self.completed),
            load(&self.short),
            load(&self.talk_ns),
        );
        let ended = answered + failed;
        let asr = (ended > 0).then(|| answered as f64 / ended as f64);
        let acd = (completed > 0).then(|| talk as f64 / 1e9 / completed as f64);
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
        let k = KeyStats::default();
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
        let u = k.usage(100 * S, 100);
        assert_eq!(u.peak_cps, 30);
        // Sorted: 5 zeros, 90 tens, 5 thirties; the 95th of 100 is a ten.
        assert_eq!(u.p95_cps, 10);
        let u = k.usage(100 * S, 10);
        assert_eq!((u.peak_cps, u.p95_cps), (30, 30));
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
        let u = k.usage(0, 60);
        assert_eq!(u.asr, Some(0.7));
        assert!((u.acd_secs.expect("acd") - 30.0).abs() < 1e-9);
        assert_eq!(u.short_call_share, Some(2.0 / 7.0));
        assert_eq!(u.meets_asr, Some(false), "70 % is not above 70 %");
        assert_eq!(u.meets_acd, Some(false), "30 s is not above 30 s");
        assert_eq!(u.meets_short_calls, Some(false));
    }
}
