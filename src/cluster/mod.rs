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
//! Redis did not answer. While Redis is unreachable the client does not wait on it at all: one
//! probe at a time tests it every [`PROBE_EVERY`], and the shared mode resumes with the first
//! answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Semaphore;

use crate::config::ClusterConfig;

/// The GCRA script (see the file for its contract).
pub const SCRIPT: &str = include_str!("gcra.lua");

/// While Redis is down, how often one call probes it (the others go straight to the policy).
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
    /// Refunds sent (cells given back).
    pub refunds: AtomicU64,
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

/// The Redis client of a gate: one auto-reconnecting connection per configured URL (the first
/// that answers is used; on failure the next one is probed), the loaded script, and the
/// up/down state.
pub struct Cluster {
    servers: Vec<(String, ConnectionManager)>,
    current: AtomicUsize,
    script: redis::Script,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    start: Instant,
    /// Nanoseconds since `start` before which a down Redis is not probed again.
    retry_at: AtomicU64,
    probing: AtomicBool,
    timeouts_in_row: AtomicU64,
    /// Second (since `start`) of the last failure log line, and lines left out since.
    last_log: AtomicU64,
    suppressed: AtomicU64,
    /// The counters.
    pub stats: ClusterStats,
}

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
    /// A client for `cfg`. Nothing is connected yet (the first call connects); a URL that does
    /// not parse is an error.
    pub fn new(cfg: &ClusterConfig) -> anyhow::Result<Self> {
        let mut servers = Vec::with_capacity(cfg.urls.len());
        for url in &cfg.urls {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| anyhow::anyhow!("cluster.urls: {}: {e}", redact(url)))?;
            // Reconnection is the manager's; it must not outlast a probe by much, so a few
            // quick tries, and every operation bounded (the decision timeout bounds it again).
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
        Ok(Self {
            servers,
            current: AtomicUsize::new(0),
            script: redis::Script::new(SCRIPT),
            timeout: cfg.timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            start: Instant::now(),
            retry_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            timeouts_in_row: AtomicU64::new(0),
            last_log: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
            stats: ClusterStats::default(),
        })
    }

    /// The decision timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Take `cost` cells (or give back `-cost`) in every bucket, all or none, within the
    /// decision timeout.
    pub async fn take(&self, buckets: &[Bucket], cost: i64) -> Outcome {
        let now = self.ns();
        // Down: one caller probes, the others go straight to the policy.
        let probe =
            !self.stats.up.load(Ordering::Acquire) && self.retry_at.load(Ordering::Acquire) != 0;
        if probe
            && (now < self.retry_at.load(Ordering::Acquire)
                || self.probing.swap(true, Ordering::AcqRel))
        {
            return self.failed(Failure::Down, None);
        }
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            if probe {
                self.probing.store(false, Ordering::Release);
            }
            return self.failed(Failure::Busy, None);
        };
        let server = self.current.load(Ordering::Relaxed) % self.servers.len();
        let mut conn = self.servers[server].1.clone();
        let mut call = self.script.prepare_invoke();
        call.arg(cost);
        for b in buckets {
            call.key(&*b.key).arg(b.interval_us).arg(b.tolerance_us);
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            self.timeout,
            call.invoke_async::<(i64, i64, i64)>(&mut conn),
        )
        .await;
        if probe {
            self.probing.store(false, Ordering::Release);
        }
        match answer {
            Ok(Ok((ok, index, wait_us))) => {
                self.stats.roundtrip(sent.elapsed());
                self.timeouts_in_row.store(0, Ordering::Relaxed);
                if !self.stats.up.swap(true, Ordering::AcqRel) {
                    if self.retry_at.load(Ordering::Acquire) != 0 {
                        self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(server = %self.servers[server].0, "cluster: Redis answers; shared pools are enforced through it");
                }
                if cost < 0 {
                    self.stats.refunds.fetch_add(1, Ordering::Relaxed);
                    return Outcome::Admitted;
                }
                if ok == 1 {
                    self.stats.admitted.fetch_add(1, Ordering::Relaxed);
                    Outcome::Admitted
                } else {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    Outcome::Refused {
                        index: usize::try_from(index - 1)
                            .unwrap_or(0)
                            .min(buckets.len() - 1),
                        retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
                    }
                }
            }
            Ok(Err(e)) => {
                self.down(now, server);
                self.failed(Failure::Error, Some(&e.to_string()))
            }
            Err(_) => {
                let n = self.timeouts_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= TIMEOUTS_TO_DOWN || probe {
                    self.down(now, server);
                }
                self.failed(Failure::Timeout, None)
            }
        }
    }

    fn ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Mark Redis down: no call waits on it until the next probe, which goes to the next
    /// configured server.
    fn down(&self, now: u64, server: usize) {
        let next = now + u64::try_from(PROBE_EVERY.as_nanos()).unwrap_or(u64::MAX);
        self.retry_at.store(next, Ordering::Release);
        if self.stats.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(server = %self.servers[server].0, "cluster: Redis unavailable; the failure policy applies to shared pools until it answers again");
        }
        let _ = self.current.compare_exchange(
            server,
            (server + 1) % self.servers.len(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
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
