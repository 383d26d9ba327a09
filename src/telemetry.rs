//! Log setup and the counters every event feeds. An event is one structured log line plus one
//! counter increment; counters are plain atomics created at start, never looked up per packet.

use std::sync::atomic::{AtomicU64, Ordering};

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::time::Instant;

use dashmap::DashMap;

use crate::limiter::Stage;
use crate::proxy::{Action, DropReason, Rejection};
use crate::sip::Transport;

/// Distinct rejection log keys remembered for suppression before the memory is cleared.
const LOG_KEYS_MAX: usize = 10_000;
/// Refusal lines per second across all keys (a flood from many sources stays cheap to log).
const LOG_LINES_PER_SEC: u64 = 50;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Install the global subscriber. `filter` wins over `RUST_LOG`; both default to `info`.
pub fn init_logging(format: LogFormat, filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log write that fails (disk full, closed pipe) is lost, nothing more: reporting it
        // would write to stderr again, and a failed `eprintln!` panics.
        .log_internal_errors(false);
    // A second init (tests) is harmless; the first subscriber stays.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// At most `per_second` log lines a second for one kind of event; the rest are counted, and the
/// next line that goes out says how many were left out.
#[derive(Debug)]
pub struct LineBudget {
    per_second: u64,
    start: Instant,
    /// The current second in the high bits, the lines logged in it in the low 16.
    window: AtomicU64,
    since_last: AtomicU64,
    suppressed: AtomicU64,
}

impl LineBudget {
    /// A budget of `per_second` lines (at most 65 535).
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second: per_second.min(0xffff),
            start: Instant::now(),
            window: AtomicU64::new(0),
            since_last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one that went out)` when a line may go out at `now`.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let second = now.saturating_duration_since(self.start).as_secs() + 1;
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (s, n) = (cur >> 16, cur & 0xffff);
            // A caller with a slightly older clock reading counts in the window already open.
            let next = if s >= second {
                if n >= self.per_second {
                    self.since_last.fetch_add(1, Ordering::Relaxed);
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                cur + 1
            } else {
                (second << 16) | 1
            };
            match self
                .window
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.since_last.swap(0, Ordering::Relaxed)),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Lines left out since the start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// Why the transport layer dropped something before or after the core saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportDrop {
    /// A datagram or stream message over the size limit that could not be answered.
    Oversize,
    /// A TCP peer's send queue was full.
    QueueFull,
    /// An outbound TCP connection failed.
    ConnectFailed,
    /// A socket send failed.
    SendFailed,
    /// A next-hop name did not resolve.
    ResolveFailed,
    /// Too many connections or lookups under way.
    Capacity,
    /// A stream that could not be framed (no or bad Content-Length).
    BadFraming,
    /// From a source over the flood guard's packet rate (`[flood]`), dropped unanswered.
    Flood,
    /// A TCP connection closed because a message did not complete within
    /// `tcp.message_timeout_secs` of its first byte.
    SlowMessage,
}

impl TransportDrop {
    const COUNT: usize = 9;

    /// Every reason, for metrics.
    pub const ALL: [TransportDrop; 9] = [
        Self::Oversize,
        Self::QueueFull,
        Self::ConnectFailed,
        Self::SendFailed,
        Self::ResolveFailed,
        Self::Capacity,
        Self::BadFraming,
        Self::Flood,
        Self::SlowMessage,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::QueueFull => "queue_full",
            Self::ConnectFailed => "connect_failed",
            Self::SendFailed => "send_failed",
            Self::ResolveFailed => "resolve_failed",
            Self::Capacity => "capacity",
            Self::BadFraming => "bad_framing",
            Self::Flood => "flood",
            Self::SlowMessage => "slow_message",
        }
    }
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages handed to the core.
    pub received: AtomicU64,
    /// Requests and responses relayed.
    pub forwarded: AtomicU64,
    /// Local answers, by class (index = code / 100).
    pub replies: [AtomicU64; 7],
    /// ACKs for our own answers that were absorbed.
    pub absorbed: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    transport_drops: [AtomicU64; TransportDrop::COUNT],
    /// CRLF keep-alive pings answered.
    pub pings: AtomicU64,
    /// TCP connections opened (in and out).
    pub connections: AtomicU64,
    /// Calls refused, by stage (in `Stage::ALL` order).
    rejected: [AtomicU64; Stage::ALL.len()],
    /// Retransmissions of refused INVITEs answered from the decision cache.
    pub retransmissions: AtomicU64,
    /// Rejection log lines left out by the per-key limit.
    pub suppressed_logs: AtomicU64,
    /// Responses relayed, by class (index = code / 100).
    pub responses: [AtomicU64; 7],
    /// Time the core took per message.
    pub latency: Histogram,
    /// Time from a UDP datagram's arrival at the gate's socket (the kernel's receive
    /// timestamp) to what it caused leaving the gate, for datagrams answered or relayed at once.
    pub transit: Transit,
    /// INVITEs paced (queued for their slot).
    pub queued: AtomicU64,
    /// Configuration reloads applied.
    pub reloads: AtomicU64,
    /// Configuration reloads refused (invalid file, unresolvable target).
    pub reload_failures: AtomicU64,
    /// Sources the flood guard blocked (a source blocked twice counts twice).
    pub flood_blocks: AtomicU64,
    reject_log: RejectLog,
}

/// Upper bounds (ns) of the decision-latency histogram buckets.
pub const LATENCY_BOUNDS_NS: [u64; 9] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000,
];

/// Upper bounds (ns) of the UDP transit histogram buckets: from a datagram's arrival at the
/// gate's socket to its forward or answer leaving the gate.
pub const TRANSIT_BOUNDS_NS: [u64; 12] = [
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];

/// Most buckets of a [`Histogram`] (its bounds and +Inf).
const MAX_BUCKETS: usize = 16;

/// A fixed-bucket histogram of nanosecond durations (Prometheus `le` buckets, cumulative at
/// render time).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    buckets: [AtomicU64; MAX_BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    /// The decision-latency histogram.
    fn default() -> Self {
        Self::new(&LATENCY_BOUNDS_NS)
    }
}

impl Histogram {
    /// An empty histogram with these bucket upper bounds (ns, ascending, at most 15).
    pub const fn new(bounds: &'static [u64]) -> Self {
        assert!(bounds.len() < MAX_BUCKETS);
        Self {
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// The bucket upper bounds (ns).
    pub fn bounds(&self) -> &'static [u64] {
        self.bounds
    }

    /// Count one observation.
    pub fn observe(&self, ns: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative; the last is +Inf) and the sum in ns.
    pub fn read(&self) -> (Vec<u64>, u64) {
        (
            self.buckets[..=self.bounds.len()]
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            self.sum_ns.load(Ordering::Relaxed),
        )
    }
}

/// The UDP transit histogram ([`TRANSIT_BOUNDS_NS`]).
#[derive(Debug)]
pub struct Transit(pub Histogram);

impl Default for Transit {
    fn default() -> Self {
        Self(Histogram::new(&TRANSIT_BOUNDS_NS))
    }
}

/// At most one rejection line per key (stage and trunk, account, source or username) per
/// second; the next line says how many were left out, so logging cannot become the bottleneck
/// under a flood.
#[derive(Debug, Default)]
struct RejectLog {
    keys: DashMap<u64, (u64, u64)>,
    line_second: AtomicU64,
    lines: AtomicU64,
    start: std::sync::OnceLock<Instant>,
    hasher: std::collections::hash_map::RandomState,
}

impl RejectLog {
    /// `Some(n suppressed since the last line)` when this event may be logged now.
    fn admit(&self, r: &Rejection, source: SocketAddr) -> Option<u64> {
        let second = self.start.get_or_init(Instant::now).elapsed().as_secs();
        self.admit_at(r, source, second)
    }

    fn admit_at(&self, r: &Rejection, source: SocketAddr, second: u64) -> Option<u64> {
        let mut h = self.hasher.build_hasher();
        r.stage.hash(&mut h);
        match r.stage {
            Stage::Trunk => r.trunk.hash(&mut h),
            Stage::Account => r.account.hash(&mut h),
            Stage::Source => source.ip().hash(&mut h),
            Stage::Username => r.username.hash(&mut h),
            Stage::Global => {}
        }
        let key = h.finish();
        if self.keys.len() >= LOG_KEYS_MAX && !self.keys.contains_key(&key) {
            let forgotten: u64 = self.keys.iter().map(|e| e.value().1).sum();
            self.keys.clear();
            if forgotten > 0 {
                tracing::info!(
                    suppressed_similar = forgotten,
                    "refusal lines left out for keys no longer tracked"
                );
            }
        }
        let mut e = self.keys.entry(key).or_insert((u64::MAX, 0));
        if e.0 == second || !self.take_line(second) {
            e.1 += 1;
            return None;
        }
        e.0 = second;
        Some(std::mem::take(&mut e.1))
    }

    /// One line of this second's overall budget.
    fn take_line(&self, second: u64) -> bool {
        if self.line_second.swap(second, Ordering::AcqRel) != second {
            self.lines.store(0, Ordering::Release);
        }
        self.lines.fetch_add(1, Ordering::AcqRel) < LOG_LINES_PER_SEC
    }
}

impl Stats {
    /// Count one decision of the core; log refusals (rate-limited per key) and drops (debug).
    pub fn record(&self, action: &Action, source: SocketAddr, transport: Transport) {
        // A call sent to Redis is counted once, with what was finally done with it.
        if matches!(action, Action::Consult(_)) {
            return;
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        match action {
            Action::Consult(_) => {}
            Action::Forward(out) => {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
                if let Some(rest) = out.data.strip_prefix(b"SIP/2.0 ")
                    && let Some(d) = rest.first().filter(|d| d.is_ascii_digit())
                {
                    self.responses[usize::from(d - b'0').min(6)].fetch_add(1, Ordering::Relaxed);
                }
            }
            Action::Reply(code, _) => {
                let class = usize::from(code / 100).min(6);
                self.replies[class].fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%source, code, "answered locally");
            }
            Action::Reject(r, _) => {
                if r.retransmission {
                    self.retransmissions.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.rejected[r.stage.index()].fetch_add(1, Ordering::Relaxed);
                match self.reject_log.admit(r, source) {
                    Some(suppressed) => tracing::info!(
                        %source,
                        transport = transport.as_via(),
                        stage = r.stage.as_str(),
                        trunk = r.trunk.as_deref().unwrap_or("-"),
                        account = r.account.as_deref().unwrap_or("-"),
                        username = r.username.as_deref().unwrap_or("-"),
                        call_id = %r.call_id,
                        retry_after_ms = r.retry_after.as_millis() as u64,
                        suppressed_similar = suppressed,
                        "call refused by CPS limit"
                    ),
                    None => {
                        self.suppressed_logs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Action::Queue(_) => {
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            Action::Cancelled(..) => {
                self.replies[2].fetch_add(1, Ordering::Relaxed);
                self.replies[4].fetch_add(1, Ordering::Relaxed);
            }
            Action::Absorb => {
                self.absorbed.fetch_add(1, Ordering::Relaxed);
            }
            Action::Drop(r) => {
                let i = DropReason::ALL
                    .iter()
                    .position(|x| x == r)
                    .expect("ALL lists every reason");
                self.drops[i].fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%source, reason = r.as_str(), "dropped message");
            }
        }
    }

    /// Count a transport-level drop, with a debug log.
    pub fn transport_drop(&self, why: TransportDrop, peer: std::net::SocketAddr) {
        self.transport_drops[why.index()].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, reason = why.as_str(), "transport drop");
    }

    /// Drops of one reason so far.
    pub fn drops(&self, r: DropReason) -> u64 {
        let i = DropReason::ALL
            .iter()
            .position(|x| *x == r)
            .expect("ALL lists every reason");
        self.drops[i].load(Ordering::Relaxed)
    }

    /// Calls refused at `stage` so far (retransmissions not included).
    pub fn rejected(&self, stage: Stage) -> u64 {
        self.rejected[stage.index()].load(Ordering::Relaxed)
    }

    /// Local answers so far, by class (index = code / 100).
    pub fn replies(&self, class: usize) -> u64 {
        self.replies[class.min(6)].load(Ordering::Relaxed)
    }

    /// Transport drops of one reason so far.
    pub fn transport_drops(&self, why: TransportDrop) -> u64 {
        self.transport_drops[why.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(stage: Stage, trunk: &str) -> Rejection {
        Rejection {
            stage,
            trunk: Some(trunk.into()),
            account: None,
            retry_after: std::time::Duration::ZERO,
            retransmission: false,
            call_id: "c".into(),
            username: None,
        }
    }

    #[test]
    fn refusal_lines_are_limited_per_key_and_summarised() {
        let log = RejectLog::default();
        let src: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let east = rejection(Stage::Trunk, "east");
        assert_eq!(log.admit_at(&east, src, 0), Some(0));
        for _ in 0..99 {
            assert_eq!(log.admit_at(&east, src, 0), None);
        }
        // Another key has its own allowance.
        assert_eq!(
            log.admit_at(&rejection(Stage::Trunk, "west"), src, 0),
            Some(0)
        );
        assert_eq!(
            log.admit_at(&rejection(Stage::Account, "east"), src, 0),
            Some(0)
        );
        // The next second's line tells how many were left out.
        assert_eq!(log.admit_at(&east, src, 1), Some(99));
        assert_eq!(log.admit_at(&east, src, 1), None);
        assert_eq!(log.admit_at(&east, src, 5), Some(1));
    }

    #[test]
    fn a_line_budget_lets_its_lines_through_each_second_and_counts_the_rest() {
        let b = LineBudget::new(3);
        let t0 = Instant::now();
        let seen: Vec<Option<u64>> = (0..5).map(|_| b.admit(t0)).collect();
        assert_eq!(seen, [Some(0), Some(0), Some(0), None, None]);
        // The next second: the first line says two were left out.
        let t1 = t0 + std::time::Duration::from_millis(1500);
        assert_eq!(b.admit(t1), Some(2));
        assert_eq!(b.admit(t1), Some(0));
        assert_eq!(b.suppressed(), 2);
    }

    #[test]
    fn a_flood_from_many_keys_is_held_to_an_overall_budget() {
        let log = RejectLog::default();
        let logged = (0..1000u32)
            .filter(|i| {
                let src: SocketAddr = format!("10.0.{}.{}:5060", i / 250, i % 250)
                    .parse()
                    .unwrap();
                log.admit_at(&rejection(Stage::Source, "-"), src, 7)
                    .is_some()
            })
            .count() as u64;
        assert_eq!(logged, LOG_LINES_PER_SEC);
    }
}
