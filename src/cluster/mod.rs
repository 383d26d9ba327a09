//! Cluster mode: buckets shared by several gates through Redis.
//!
//! A shared bucket is one Redis key holding its GCRA TAT in integer microseconds of the Redis
//! server's clock (`TIME`), so the gates' clocks do not matter. One Lua script ([`SCRIPT`])
//! checks and takes every shared bucket of a call at once, all or none, and with a negative cost
//! gives cells back. It is loaded once and called by SHA (`EVALSHA`, loaded again on
//! `NOSCRIPT` after a Redis restart).
//!
//! The decision core never waits: it hands a call that needs a shared bucket to the shell as
//! [`crate::proxy::Action::Consult`]; the shell asks [`Cluster::take`] (bounded by the decision
//! timeout) and gives the [`Outcome`] back to the core, which applies the failure policy when
//! Redis did not answer. While Redis is unreachable the client does not wait on it at all: a
//! health task pings it every [`PROBE_EVERY`], and the shared mode resumes with the first
//! answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Semaphore;

use crate::config::ClusterConfig;

/// The GCRA script (see the file for its contract).
pub const SCRIPT: &str = include_str!("gcra.lua");

/// While Redis is down, how often the health task pings it (calls go straight to the policy).
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Timeouts in a row that mark Redis down (a single slow answer does not).
const TIMEOUTS_TO_DOWN: u64 = 3;
/// Round trips under way at once; beyond this a call goes to the failure policy rather than
/// queueing behind a stalled connection.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Upper bounds (µs) of the round-trip histogram buckets.
pub const ROUNDTRIP_BOUNDS_US: [u64; 10] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
];

/// One shared bucket of a call: its Redis key and its cluster-wide limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// The Redis key.
    pub key: Arc<str>,
    /// Emission interval, µs.
    pub interval_us: u64,
    /// Tolerance, µs.
    pub tolerance_us: u64,
}

/// What Redis said about a call, or why it said nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every shared bucket took its cell.
    Admitted,
    /// Bucket `index` (in the order asked) refused; it would admit after `retry_after`.
    Refused {
        /// Which bucket.
        index: usize,
        /// Time until it would admit.
        retry_after: Duration,
    },
    /// No answer: the failure policy decides.
    Unavailable(Failure),
}

/// Why Redis gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No answer within the decision timeout.
    Timeout,
    /// A connection or server error.
    Error,
    /// Known down (a recent failure); not asked.
    Down,
    /// Too many round trips under way.
    Busy,
}

impl Failure {
    /// Every failure, in counter order.
    pub const ALL: [Failure; 4] = [
        Failure::Timeout,
        Failure::Error,
        Failure::Down,
        Failure::Busy,
    ];

    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Error => "error",
            Failure::Down => "down",
            Failure::Busy => "busy",
        }
    }
}

/// What the failure policy did with a call Redis did not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// `local_share`: admitted by this gate's share of the limit.
    LocalShareAdmitted,
    /// `local_share`: refused by this gate's share of the limit.
    LocalShareRefused,
    /// `open`: admitted unchecked.
    Open,
    /// `closed`: refused.
    Closed,
}

impl Fallback {
    /// Every fallback, in counter order.
    pub const ALL: [Fallback; 4] = [
        Fallback::LocalShareAdmitted,
        Fallback::LocalShareRefused,
        Fallback::Open,
        Fallback::Closed,
    ];

    /// (policy, outcome) labels.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Fallback::LocalShareAdmitted => ("local_share", "admitted"),
            Fallback::LocalShareRefused => ("local_share", "refused"),
            Fallback::Open => ("open", "admitted"),
            Fallback::Closed => ("closed", "refused"),
        }
    }
}

/// Counters of the cluster client.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Calls Redis admitted.
    pub admitted: AtomicU64,
    /// Calls Redis refused.
    pub refused: AtomicU64,
    /// Refunds delivered (cells given back).
    pub refunds: AtomicU64,
    /// Refunds that could not be delivered.
    pub refund_failures: AtomicU64,
    failures: [AtomicU64; Failure::ALL.len()],
    fallbacks: [AtomicU64; Fallback::ALL.len()],
    roundtrips: [AtomicU64; ROUNDTRIP_BOUNDS_US.len() + 1],
    roundtrip_sum_us: AtomicU64,
    /// 1 while Redis answers.
    pub up: AtomicBool,
    /// Times the shared mode resumed after Redis came back.
    pub recoveries: AtomicU64,
}

impl ClusterStats {
    /// Calls Redis did not decide, for `f`.
    pub fn failures(&self, f: Failure) -> u64 {
        self.failures[f as usize].load(Ordering::Relaxed)
    }

    /// Calls the failure policy decided, for `f`.
    pub fn fallbacks(&self, f: Fallback) -> u64 {
        self.fallbacks[f as usize].load(Ordering::Relaxed)
    }

    /// Count one decision of the failure policy.
    pub fn fallback(&self, f: Fallback) {
        self.fallbacks[f as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Round-trip histogram: per-bucket counts (the last is +Inf) and the sum in µs.
    pub fn roundtrips(&self) -> (Vec<u64>, u64) {
        (
            self.roundtrips
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            self.roundtrip_sum_us.load(Ordering::Relaxed),
        )
    }

    fn roundtrip(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = ROUNDTRIP_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(ROUNDTRIP_BOUNDS_US.len());
        self.roundtrips[i].fetch_add(1, Ordering::Relaxed);
        self.roundtrip_sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// The Redis client of a gate: one auto-reconnecting connection per configured URL, the loaded
/// script, and the up/down state.
///
/// Calls go to the current server while Redis is up. A connection error, or
/// [`TIMEOUTS_TO_DOWN`] timeouts in a row, mark it down: from then on calls go straight to the
/// failure policy, and a health task (started with the client) pings the servers, the first
/// URL first, every [`PROBE_EVERY`]; the first to answer is used and the shared mode resumes.
/// While on a later URL, the health task tries the first one every [`FAILBACK_EVERY`] and goes
/// back to it as soon as it answers, so gates do not stay split across servers.
pub struct Cluster {
    servers: Vec<(String, ConnectionManager)>,
    current: AtomicUsize,
    script: redis::Script,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    start: Instant,
    timeouts_in_row: AtomicU64,
    /// Second (since `start`) of the last failure log line, and lines left out since.
    last_log: AtomicU64,
    suppressed: AtomicU64,
    /// The counters.
    pub stats: ClusterStats,
}

/// While on a later URL, how often the first one is tried again.
pub const FAILBACK_EVERY: Duration = Duration::from_secs(2);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field(
                "servers",
                &self.servers.iter().map(|s| &s.0).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Cluster {
    /// A client for `cfg`, with its health task (which ends when the client is dropped). Must
    /// run inside a tokio runtime. Nothing waits for Redis here: the first ping and the first
    /// call connect. A URL that does not parse is an error.
    pub fn start(cfg: &ClusterConfig) -> anyhow::Result<Arc<Self>> {
        let cluster = Arc::new(Self::new(cfg)?);
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            let mut failback_at = Instant::now();
            loop {
                let Some(c) = weak.upgrade() else { return };
                if !c.stats.up.load(Ordering::Acquire) {
                    c.recover().await;
                } else if c.current.load(Ordering::Relaxed) != 0 && Instant::now() >= failback_at {
                    failback_at = Instant::now() + FAILBACK_EVERY;
                    if c.ping(0).await {
                        c.current.store(0, Ordering::Release);
                        tracing::info!(server = %c.servers[0].0, "cluster: back on the first Redis server");
                    }
                }
                drop(c);
                tokio::time::sleep(PROBE_EVERY).await;
            }
        });
        Ok(cluster)
    }

    /// The client alone, without a health task: [`Cluster::start`] is what a gate uses.
    fn new(cfg: &ClusterConfig) -> anyhow::Result<Self> {
        let mut servers = Vec::with_capacity(cfg.urls.len());
        for url in &cfg.urls {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| anyhow::anyhow!("cluster.urls: {}: {e}", redact(url)))?;
            // Reconnection is the manager's: a few quick tries, every operation bounded (the
            // decision timeout bounds it again).
            let config = ConnectionManagerConfig::new()
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(PROBE_EVERY)
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_secs(1)));
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| anyhow::anyhow!("cluster.urls: {}: {e}", redact(url)))?;
            servers.push((redact(url), manager));
        }
        let stats = ClusterStats::default();
        // Up until shown otherwise (the health task pings at once).
        stats.up.store(true, Ordering::Relaxed);
        Ok(Self {
            servers,
            current: AtomicUsize::new(0),
            script: redis::Script::new(SCRIPT),
            timeout: cfg.timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            start: Instant::now(),
            timeouts_in_row: AtomicU64::new(0),
            last_log: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
            stats,
        })
    }

    /// The decision timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Take one cell in every bucket, all or none, within the decision timeout.
    pub async fn take(&self, buckets: &[Bucket]) -> Outcome {
        if !self.stats.up.load(Ordering::Acquire) {
            return self.failed(Failure::Down, None);
        }
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return self.failed(Failure::Busy, None);
        };
        let server = self.current.load(Ordering::Acquire);
        let sent = Instant::now();
        match self.invoke(server, buckets, 1).await {
            Ok(Ok((ok, index, wait_us))) => {
                self.stats.roundtrip(sent.elapsed());
                self.timeouts_in_row.store(0, Ordering::Relaxed);
                if ok == 1 {
                    self.stats.admitted.fetch_add(1, Ordering::Relaxed);
                    Outcome::Admitted
                } else {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    Outcome::Refused {
                        index: usize::try_from(index - 1)
                            .unwrap_or(0)
                            .min(buckets.len().saturating_sub(1)),
                        retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
                    }
                }
            }
            Ok(Err(e)) => {
                // Only a connection problem means Redis is away; a server or script error
                // (a key of the wrong type, a read-only replica) fails this call only.
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                    self.down(server);
                }
                self.failed(Failure::Error, Some(&e.to_string()))
            }
            Err(_) => {
                let n = self.timeouts_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= TIMEOUTS_TO_DOWN {
                    self.down(server);
                }
                self.failed(Failure::Timeout, None)
            }
        }
    }

    /// Give back one cell in every bucket (a later local stage refused the call). Sent on its
    /// own, after the call was answered; tried twice; it never changes the up/down state (a
    /// refund that cannot be delivered only leaves a cell used until it refills).
    pub async fn refund(&self, buckets: &[Bucket]) {
        let server = self.current.load(Ordering::Acquire);
        for _ in 0..2 {
            if let Ok(Ok(_)) = self.invoke(server, buckets, -1).await {
                self.stats.refunds.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.stats.refund_failures.fetch_add(1, Ordering::Relaxed);
    }

    async fn invoke(
        &self,
        server: usize,
        buckets: &[Bucket],
        cost: i64,
    ) -> Result<redis::RedisResult<(i64, i64, i64)>, tokio::time::error::Elapsed> {
        let mut conn = self.servers[server % self.servers.len()].1.clone();
        let mut call = self.script.prepare_invoke();
        call.arg(cost);
        for b in buckets {
            call.key(&*b.key).arg(b.interval_us).arg(b.tolerance_us);
        }
        tokio::time::timeout(self.timeout, call.invoke_async(&mut conn)).await
    }

    /// True when server `i` answers a PING within a second.
    async fn ping(&self, i: usize) -> bool {
        let mut conn = self.servers[i].1.clone();
        let ping = redis::cmd("PING");
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                ping.query_async::<String>(&mut conn)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// While down: the first server (in `urls` order) that answers becomes current, and the
    /// shared mode resumes.
    async fn recover(&self) {
        for i in 0..self.servers.len() {
            if self.ping(i).await {
                self.current.store(i, Ordering::Release);
                self.timeouts_in_row.store(0, Ordering::Relaxed);
                self.stats.up.store(true, Ordering::Release);
                self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
                tracing::info!(server = %self.servers[i].0, "cluster: Redis answers again; shared pools are enforced through it");
                return;
            }
        }
    }

    /// Mark Redis down: no call waits on it until the health task finds a server answering.
    fn down(&self, server: usize) {
        if self.stats.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(server = %self.servers[server % self.servers.len()].0, "cluster: Redis unavailable; the failure policy applies to shared pools until it answers again");
        }
    }

    /// Count a failure, and log it at most once a second with the number left out.
    fn failed(&self, f: Failure, error: Option<&str>) -> Outcome {
        self.stats.failures[f as usize].fetch_add(1, Ordering::Relaxed);
        let second = self.start.elapsed().as_secs();
        let last = self.last_log.load(Ordering::Relaxed);
        if last != second
            && self
                .last_log
                .compare_exchange(last, second, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                failure = f.as_str(),
                error = error.unwrap_or(""),
                suppressed,
                "cluster: a shared-pool decision went to the failure policy"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Unavailable(f)
    }
}

/// A URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: String) -> ClusterConfig {
        ClusterConfig {
            urls: vec![url],
            timeout: Duration::from_millis(200),
            on_failure: crate::config::FailurePolicy::Closed,
            instances: 2,
            key_prefix: "t:".into(),
        }
    }

    #[tokio::test]
    async fn a_refused_connection_marks_redis_down_and_later_calls_do_not_wait() {
        // A loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let c = Cluster::start(&config(format!("redis://127.0.0.1:{port}/"))).expect("client");
        let b = [Bucket {
            key: "t:account:a".into(),
            interval_us: 1000,
            tolerance_us: 0,
        }];
        assert_eq!(c.take(&b).await, Outcome::Unavailable(Failure::Error));
        assert!(!c.stats.up.load(Ordering::Relaxed));
        // Down: answered at once, without a round trip.
        let t = Instant::now();
        assert_eq!(c.take(&b).await, Outcome::Unavailable(Failure::Down));
        assert!(t.elapsed() < Duration::from_millis(50));
        assert_eq!(
            (
                c.stats.failures(Failure::Error),
                c.stats.failures(Failure::Down)
            ),
            (1, 1)
        );
        // A refund that cannot be delivered is counted, and changes no state.
        c.refund(&b).await;
        assert_eq!(c.stats.refund_failures.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats.recoveries.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn passwords_are_not_logged() {
        assert_eq!(
            redact("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redact("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn the_script_never_prints_a_number_with_tostring() {
        let code: Vec<&str> = SCRIPT
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect();
        assert!(code.iter().all(|l| !l.contains("tostring")));
        assert!(code.iter().any(|l| l.contains("redis.call('TIME')")));
    }
}
