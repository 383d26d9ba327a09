//! Replaying attempts through the admission chain in simulated time: the proxy's own
//! [`Chain::decide`] (GCRA buckets, all-or-none stages, pacing reservations and the queue cap)
//! and its auth re-send allowance, with `now` taken from the trace.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::limiter::{Ask, BoundedMap, Chain, ChainSpec, Epoch, First, Stage};
use crate::proxy::admission::{self, Admitted};

use super::trace::{Attempt, RETRANSMISSION_WINDOW_NS};

const NS: u64 = 1_000_000_000;

/// Attempts kept for the replays: in memory up to a budget, then in a temporary file that each
/// replay streams (a trace larger than memory).
pub struct Store {
    mem: Vec<Attempt>,
    budget: usize,
    spill: Option<Spill>,
    len: u64,
    last: u64,
    credentials: bool,
}

struct Spill {
    path: PathBuf,
    writer: Option<BufWriter<std::fs::File>>,
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bytes of one attempt in the spill file.
const RECORD: usize = 43;

impl Store {
    /// A store that keeps at most `budget` attempts in memory.
    pub fn new(budget: usize) -> Self {
        Self {
            mem: Vec::new(),
            budget,
            spill: None,
            len: 0,
            last: 0,
            credentials: false,
        }
    }

    /// Attempts held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the attempts went to a file.
    pub fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    /// Add an attempt; attempts come in time order (`InvalidInput` otherwise).
    pub fn push(&mut self, a: Attempt) -> std::io::Result<()> {
        if a.at < self.last {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "attempts out of time order",
            ));
        }
        self.last = a.at;
        self.len += 1;
        self.credentials |= a.credentials;
        if self.spill.is_none() && self.mem.len() < self.budget {
            self.mem.push(a);
            return Ok(());
        }
        if self.spill.is_none() {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "cpsgate-plan-{}-{}.bin",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            let mut spill = Spill {
                path,
                writer: Some(BufWriter::with_capacity(1 << 20, file)),
            };
            let w = spill.writer.as_mut().expect("just made");
            for a in self.mem.drain(..) {
                w.write_all(&encode(&a))?;
            }
            self.mem = Vec::new();
            self.spill = Some(spill);
        }
        let w = self
            .spill
            .as_mut()
            .and_then(|s| s.writer.as_mut())
            .expect("open while pushing");
        w.write_all(&encode(&a))
    }

    /// Done adding.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if let Some(w) = self.spill.as_mut().and_then(|s| s.writer.take()) {
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        Ok(())
    }

    /// Every attempt, in time order.
    pub fn for_each(&self, mut f: impl FnMut(&Attempt)) -> std::io::Result<()> {
        let Some(spill) = &self.spill else {
            self.mem.iter().for_each(f);
            return Ok(());
        };
        let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(&spill.path)?);
        let mut buf = [0u8; RECORD];
        for _ in 0..self.len {
            r.read_exact(&mut buf)?;
            f(&decode(&buf));
        }
        Ok(())
    }
}

fn encode(a: &Attempt) -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[0..8].copy_from_slice(&a.at.to_le_bytes());
    let (kind, first) = match a.ask.first {
        First::Trunk(t) => (0u8, t as u64),
        First::Source(k) => (1, k),
    };
    b[8] = kind;
    b[9..17].copy_from_slice(&first.to_le_bytes());
    b[17] = u8::from(a.ask.username.is_some());
    b[18..26].copy_from_slice(&a.ask.username.unwrap_or(0).to_le_bytes());
    let account = a.ask.account.map_or(u32::MAX, |x| x as u32);
    b[26..30].copy_from_slice(&account.to_le_bytes());
    b[30..38].copy_from_slice(&a.attempt.to_le_bytes());
    b[38..42].copy_from_slice(&a.cseq.to_le_bytes());
    b[42] = u8::from(a.credentials);
    b
}

fn decode(b: &[u8; RECORD]) -> Attempt {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let first = match b[8] {
        0 => First::Trunk(u64_at(9) as usize),
        _ => First::Source(u64_at(9)),
    };
    let account = u32_at(26);
    Attempt {
        at: u64_at(0),
        ask: Ask {
            first,
            username: (b[17] == 1).then(|| u64_at(18)),
            account: (account != u32::MAX).then_some(account as usize),
        },
        attempt: u64_at(30),
        cseq: u32_at(38),
        credentials: b[42] == 1,
    }
}

/// Which attempts a replay runs, and through which stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every attempt through every stage.
    All,
    /// One trunk's attempts through its own bucket only.
    Trunk(usize),
    /// One account's attempts through their trunks and the pool only.
    Account(usize),
    /// The attempts that pass a per-source, per-username or the global stage, through every
    /// stage (the caller leaves the others unbounded).
    Stage(Stage),
}

/// One what-if: limits, pacing, scope.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The limits.
    pub spec: ChainSpec,
    /// Per trunk: `(max_delay, max_queue)` when it paces.
    pub pacing: Vec<Option<(Duration, usize)>>,
    /// Which attempts, which stages.
    pub scope: Scope,
    /// `limits.charge_auth_retry`.
    pub charge_auth_retry: bool,
    /// The proxy's decision cache size (bounds the auth re-send table too).
    pub cache_size: usize,
    /// Per-second figures, delays and chart series (off for the searches).
    pub detail: bool,
}

/// Counts of one trunk, one account, or the traffic on no trunk.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Attempts.
    pub attempts: u64,
    /// Admitted (at once or paced).
    pub admitted: u64,
    /// Refused, by the stage that refused.
    pub rejected: [u64; 5],
    /// Admitted after a wait.
    pub delayed: u64,
    /// Waits of paced calls, 1-ms buckets (the last holds longer ones).
    pub delays_ms: Vec<u64>,
    /// Per-second figures (with `detail`).
    pub seconds: Option<Seconds>,
}

impl Tally {
    /// Calls refused at any stage.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    fn delay(&mut self, wait: Duration, detail: bool) {
        if wait.is_zero() {
            return;
        }
        self.delayed += 1;
        if detail {
            if self.delays_ms.is_empty() {
                self.delays_ms = vec![0; 300_001];
            }
            let ms = (wait.as_nanos() / 1_000_000) as usize;
            let last = self.delays_ms.len() - 1;
            self.delays_ms[ms.min(last)] += 1;
        }
    }

    /// The `q` quantile (0..=1) of the waits of every admitted call (zero for those admitted at
    /// once), milliseconds.
    pub fn delay_quantile_ms(&self, q: f64) -> f64 {
        if self.admitted == 0 {
            return 0.0;
        }
        let rank = ((q * self.admitted as f64).ceil() as u64).max(1);
        let immediate = self.admitted - self.delayed;
        if rank <= immediate {
            return 0.0;
        }
        let mut seen = immediate;
        for (ms, n) in self.delays_ms.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return ms as f64;
            }
        }
        0.0
    }
}

/// Per-second offered, admitted and refused calls of one key, closed second by second.
#[derive(Debug, Clone, Default)]
pub struct Seconds {
    /// Second index of `open[0]`.
    base: u64,
    /// Seconds still open (admissions of paced calls land ahead of `now`).
    open: VecDeque<[u32; 3]>,
    /// Number of seconds with each admitted count (seconds with none left out).
    pub admitted_hist: HashMap<u32, u64>,
    /// Number of seconds with each offered count.
    pub offered_hist: HashMap<u32, u64>,
    /// Busiest second for offered calls: (count, second).
    pub offered_peak: (u32, u64),
    /// Busiest second for admitted calls: (count, second).
    pub admitted_peak: (u32, u64),
    run: Option<(u64, u64)>,
    /// Longest stretch of consecutive seconds with refusals: (first second, seconds).
    pub longest_rejecting: Option<(u64, u64)>,
    /// Seconds with at least one refusal.
    pub rejecting_seconds: u64,
    /// Chart series: per bin, the busiest second's offered and admitted counts.
    pub series: Vec<[u32; 2]>,
    /// Seconds per series bin.
    pub bin: u64,
    bin_fill: u64,
}

/// Most bins of a chart series: beyond it, bins double in width.
pub const MAX_BINS: usize = 2048;

impl Seconds {
    fn new() -> Self {
        Self {
            bin: 1,
            ..Self::default()
        }
    }

    /// Count `what` (0 offered, 1 admitted, 2 refused) in second `sec` (≥ every closed one).
    fn add(&mut self, sec: u64, what: usize) {
        // Attempts come in time order and admissions never precede them: nothing lands in a
        // closed second.
        let i = sec.saturating_sub(self.base) as usize;
        if self.open.len() <= i {
            self.open.resize(i + 1, [0; 3]);
        }
        self.open[i][what] += 1;
    }

    /// Close every second before `sec`.
    fn advance(&mut self, sec: u64) {
        while self.base < sec {
            let Some(c) = self.open.pop_front() else {
                // Nothing open: the quiet seconds up to `sec` at once.
                self.quiet(sec - self.base);
                self.base = sec;
                return;
            };
            self.close(self.base, c);
            self.base += 1;
        }
    }

    /// Close `n` seconds without calls: they end a rejecting run and fill the chart with zeros,
    /// a bin at a time.
    fn quiet(&mut self, mut n: u64) {
        if n > 0 {
            self.run = None;
        }
        while n > 0 {
            if self.bin_fill == 0 {
                self.series.push([0, 0]);
            }
            let take = n.min(self.bin - self.bin_fill);
            self.bin_fill += take;
            n -= take;
            self.end_bin();
        }
    }

    fn end_bin(&mut self) {
        if self.bin_fill == self.bin {
            self.bin_fill = 0;
            if self.series.len() == MAX_BINS {
                self.series = self
                    .series
                    .chunks(2)
                    .map(|p| {
                        [
                            p.iter().map(|b| b[0]).max().unwrap_or(0),
                            p.iter().map(|b| b[1]).max().unwrap_or(0),
                        ]
                    })
                    .collect();
                self.bin *= 2;
            }
        }
    }

    fn close(&mut self, sec: u64, [offered, admitted, rejected]: [u32; 3]) {
        if offered > 0 {
            *self.offered_hist.entry(offered).or_default() += 1;
            if offered > self.offered_peak.0 {
                self.offered_peak = (offered, sec);
            }
        }
        if admitted > 0 {
            *self.admitted_hist.entry(admitted).or_default() += 1;
            if admitted > self.admitted_peak.0 {
                self.admitted_peak = (admitted, sec);
            }
        }
        if rejected > 0 {
            self.rejecting_seconds += 1;
            let run = match self.run {
                Some((start, len)) if start + len == sec => (start, len + 1),
                _ => (sec, 1),
            };
            self.run = Some(run);
            if self.longest_rejecting.is_none_or(|(_, l)| run.1 > l) {
                self.longest_rejecting = Some(run);
            }
        }
        // The chart series, bins doubling in width past MAX_BINS.
        if self.bin_fill == 0 {
            self.series.push([0, 0]);
        }
        let last = self.series.last_mut().expect("pushed");
        last[0] = last[0].max(offered);
        last[1] = last[1].max(admitted);
        self.bin_fill += 1;
        self.end_bin();
    }

    /// The nearest-rank `q` quantile of per-second counts over `span` seconds (seconds absent
    /// from `hist` count as zero).
    pub fn quantile(hist: &HashMap<u32, u64>, span: u64, q: f64) -> u32 {
        let mut counts: Vec<(u32, u64)> = hist.iter().map(|(&k, &v)| (k, v)).collect();
        counts.sort_unstable();
        let busy: u64 = counts.iter().map(|c| c.1).sum();
        let span = span.max(busy);
        let rank = ((q * span as f64).ceil() as u64).max(1);
        let mut seen = span - busy;
        if rank <= seen {
            return 0;
        }
        for (value, n) in counts {
            seen += n;
            if seen >= rank {
                return value;
            }
        }
        0
    }
}

/// A stage's traffic: calls that got to it, calls it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageCount {
    /// Calls that reached the stage.
    pub reached: u64,
    /// Calls it refused.
    pub rejected: u64,
}

/// What a replay gives.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Per trunk, in config order.
    pub trunks: Vec<Tally>,
    /// Per account, in config order.
    pub accounts: Vec<Tally>,
    /// Traffic on no trunk (the per-source stage).
    pub sources: Tally,
    /// Per stage, in chain order.
    pub stages: [StageCount; 5],
    /// INVITEs re-sent with credentials after a challenge: not charged.
    pub auth_resends: u64,
    /// Seconds from the first attempt to the last (rounded up).
    pub span_secs: u64,
}

impl Outcome {
    /// Attempts replayed.
    pub fn attempts(&self) -> u64 {
        self.trunks.iter().map(|t| t.attempts).sum::<u64>() + self.sources.attempts
    }

    /// Attempts refused at any stage.
    pub fn rejected(&self) -> u64 {
        self.trunks.iter().map(Tally::rejected_total).sum::<u64>() + self.sources.rejected_total()
    }
}

/// Replay `store` under `sc`.
pub fn replay(store: &Store, sc: &Scenario) -> std::io::Result<Outcome> {
    let base = Instant::now();
    let chain = Chain::new(&sc.spec, Epoch::new(base));
    let new_tally = || Tally {
        seconds: sc.detail.then(Seconds::new),
        ..Tally::default()
    };
    let mut out = Outcome {
        trunks: (0..sc.spec.trunks.len()).map(|_| new_tally()).collect(),
        accounts: (0..sc.spec.accounts.len()).map(|_| new_tally()).collect(),
        sources: new_tally(),
        ..Outcome::default()
    };
    let admitted = (store.credentials && !sc.charge_auth_retry)
        .then(|| BoundedMap::<Admitted>::new(sc.cache_size));
    // Paced calls waiting for their slot: (slot, trunk).
    let mut waiting: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = BinaryHeap::new();
    let has_usernames = chain.usernames().is_some();
    let has_global = chain.global().is_some();
    let mut last = 0u64;
    store.for_each(|a| {
        last = a.at;
        let ask = match (sc.scope, a.ask.first) {
            (Scope::All, _) => a.ask,
            (Scope::Trunk(t), First::Trunk(x)) if t == x => Ask {
                username: None,
                account: None,
                ..a.ask
            },
            (Scope::Account(acc), First::Trunk(_)) if a.ask.account == Some(acc) => Ask {
                username: None,
                ..a.ask
            },
            (Scope::Stage(Stage::Source), First::Source(_)) => a.ask,
            (Scope::Stage(Stage::Username), _) if a.ask.username.is_some() => a.ask,
            (Scope::Stage(Stage::Global), _) => a.ask,
            _ => return,
        };
        while let Some(&std::cmp::Reverse((slot, t))) = waiting.peek() {
            if slot > a.at {
                break;
            }
            waiting.pop();
            chain.trunks()[t].stats.dequeued(0, true);
        }
        let now = base + Duration::from_nanos(a.at);
        if let Some(map) = &admitted
            && a.credentials
            && admission::free_auth_retry(map, a.attempt, a.cseq, a.at)
        {
            out.auth_resends += 1;
            return;
        }
        let pacing = match ask.first {
            First::Trunk(t) => sc.pacing[t],
            First::Source(_) => None,
        };
        let decided = chain.decide(now, &ask, pacing);
        let sec = a.at / NS;
        let mut each = |f: &mut dyn FnMut(&mut Tally)| {
            match ask.first {
                First::Trunk(t) => f(&mut out.trunks[t]),
                First::Source(_) => f(&mut out.sources),
            }
            if let Some(acc) = ask.account {
                f(&mut out.accounts[acc]);
            }
        };
        each(&mut |t| {
            t.attempts += 1;
            if let Some(s) = &mut t.seconds {
                s.advance(sec);
                s.add(sec, 0);
            }
        });
        let stages = [
            (Stage::Trunk, matches!(ask.first, First::Trunk(_))),
            (Stage::Source, matches!(ask.first, First::Source(_))),
            (Stage::Username, ask.username.is_some() && has_usernames),
            (Stage::Account, ask.account.is_some()),
            (Stage::Global, has_global),
        ];
        match decided {
            Ok(booked) => {
                let wait = booked.as_ref().map_or(Duration::ZERO, |b| b.wait);
                if let (Some(_), First::Trunk(t)) = (&booked, ask.first) {
                    chain.trunks()[t].stats.queued();
                    waiting.push(std::cmp::Reverse((a.at + wait.as_nanos() as u64, t)));
                }
                let slot = (a.at + wait.as_nanos() as u64) / NS;
                each(&mut |t| {
                    t.admitted += 1;
                    t.delay(wait, sc.detail);
                    if let Some(s) = &mut t.seconds {
                        s.add(slot, 1);
                    }
                });
                for (s, on) in stages {
                    if on {
                        out.stages[s.index()].reached += 1;
                    }
                }
                if let Some(map) = &admitted {
                    map.insert(
                        a.attempt,
                        a.at,
                        Admitted::new(a.cseq, a.at + RETRANSMISSION_WINDOW_NS),
                    );
                }
            }
            Err(refused) => {
                each(&mut |t| {
                    t.rejected[refused.stage.index()] += 1;
                    if let Some(s) = &mut t.seconds {
                        s.add(sec, 2);
                    }
                });
                for (s, on) in stages {
                    if on && s.index() <= refused.stage.index() {
                        out.stages[s.index()].reached += 1;
                    }
                }
                out.stages[refused.stage.index()].rejected += 1;
            }
        }
    })?;
    let end = last / NS + 1;
    out.span_secs = end;
    for t in out
        .trunks
        .iter_mut()
        .chain(out.accounts.iter_mut())
        .chain([&mut out.sources])
    {
        if let Some(s) = &mut t.seconds {
            // Paced admissions may land up to max_delay past the last attempt.
            let open = s.base + s.open.len() as u64;
            s.advance(end.max(open));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_attempts_read_back_the_same() {
        let a = Attempt {
            at: 123_456_789_012,
            ask: Ask {
                first: First::Source(u64::MAX - 7),
                username: Some(42),
                account: Some(3),
            },
            attempt: 99,
            cseq: 7,
            credentials: true,
        };
        let b = Attempt {
            ask: Ask {
                first: First::Trunk(5),
                username: None,
                account: None,
            },
            credentials: false,
            ..a
        };
        assert_eq!(decode(&encode(&a)), a);
        assert_eq!(decode(&encode(&b)), b);
        let mut store = Store::new(1);
        store.push(a).unwrap();
        store.push(b).unwrap();
        store.finish().unwrap();
        assert!(store.spilled());
        let mut back = Vec::new();
        store.for_each(|x| back.push(*x)).unwrap();
        assert_eq!(back, vec![a, b]);
    }

    #[test]
    fn quantiles_count_quiet_seconds_as_zero() {
        let hist: HashMap<u32, u64> = [(10, 5), (30, 1)].into_iter().collect();
        // 100 seconds: 94 quiet, 5 at 10, 1 at 30.
        assert_eq!(Seconds::quantile(&hist, 100, 0.95), 10);
        assert_eq!(Seconds::quantile(&hist, 100, 0.94), 0);
        assert_eq!(Seconds::quantile(&hist, 100, 1.0), 30);
        assert_eq!(Seconds::quantile(&hist, 6, 0.5), 10);
    }

    #[test]
    fn rejecting_stretches_and_bins() {
        let mut s = Seconds::new();
        for sec in [3, 4, 5, 9, 10] {
            s.advance(sec);
            s.add(sec, 2);
        }
        s.advance(12);
        assert_eq!(s.longest_rejecting, Some((3, 3)));
        assert_eq!(s.rejecting_seconds, 5);
        let mut long = Seconds::new();
        for sec in 0..(MAX_BINS as u64 * 3) {
            long.advance(sec);
            long.add(sec, 0);
            if sec == 5000 {
                long.add(sec, 0);
            }
        }
        long.advance(MAX_BINS as u64 * 3);
        // 6144 s: halved at 2048 s and at 4096 s.
        assert_eq!(long.bin, 4);
        assert_eq!(long.series.len(), MAX_BINS * 3 / 4);
        assert_eq!(long.series[1250], [2, 0]);
        assert_eq!(long.series[1251], [1, 0]);
        assert_eq!(long.offered_peak, (2, 5000));
        // A quiet stretch of a year closes at once, and ends a rejecting run.
        let mut gap = Seconds::new();
        gap.add(0, 2);
        gap.advance(1);
        gap.advance(365 * 86_400);
        gap.add(365 * 86_400, 2);
        gap.advance(365 * 86_400 + 1);
        assert_eq!(gap.longest_rejecting, Some((0, 1)));
        assert_eq!(gap.rejecting_seconds, 2);
        assert!(gap.series.len() <= MAX_BINS && gap.bin >= 365 * 86_400 / MAX_BINS as u64);
        assert_eq!(gap.series.last(), Some(&[0, 0]));
    }
}
