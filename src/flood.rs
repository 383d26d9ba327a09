//! The flood guard: a packet-rate limit per source IP, checked before any parsing (Kamailio's
//! pike, in front of everything). A source that sends more than `rate` packets a second (after a
//! `burst`) is dropped, silently, for `block` — no answer, so the gate is no reflector or
//! amplifier — and then starts over. The carriers' and the PBX's sources are never guarded.
//! Both tables are bounded: a flood of spoofed sources costs at most `table_size` entries each.

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use siphasher::sip::SipHasher13;

use crate::config::FloodSettings;
use crate::limiter::{BoundedMap, Epoch, Expiring, KeyedBuckets, Limit};
use crate::routing::Cidr;
use crate::telemetry::LineBudget;

/// At most this many "source blocked" lines a second; the rest are counted.
const LOGS_PER_SECOND: u64 = 10;

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit (or exempt): process it.
    Pass,
    /// From a blocked source: drop it without a word.
    Drop,
    /// This packet put its source over the limit: drop it, and the source is now blocked.
    Block,
}

/// A blocked source: until when, and how many packets it lost meanwhile.
struct Blocked {
    until: AtomicU64,
    dropped: AtomicU64,
}

impl Expiring for Blocked {
    fn expires(&self) -> u64 {
        self.until.load(Ordering::Relaxed)
    }
}

/// The guard. Shared by every receive task.
pub struct FloodGuard {
    buckets: KeyedBuckets,
    blocked: BoundedMap<Blocked>,
    block: Duration,
    /// Replaced on reload: carriers and the PBX of the running configuration.
    exempt: arc_swap::ArcSwap<Vec<Cidr>>,
    epoch: Epoch,
    keys: (u64, u64),
    dropped: AtomicU64,
    blocks: AtomicU64,
    log: LineBudget,
}

impl FloodGuard {
    /// A guard with `settings`, its clock starting at `start`.
    pub fn new(settings: &FloodSettings, start: Instant) -> Self {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new();
        Self {
            buckets: KeyedBuckets::new(
                Limit {
                    rate: f64::from(settings.rate),
                    burst: settings.burst,
                },
                settings.table_size,
            ),
            blocked: BoundedMap::new(settings.table_size),
            block: settings.block,
            exempt: arc_swap::ArcSwap::from_pointee(settings.exempt.clone()),
            epoch: Epoch::new(start),
            keys: (seed.hash_one(1u8), seed.hash_one(2u8)),
            dropped: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            log: LineBudget::new(LOGS_PER_SECOND),
        }
    }

    /// Judge one packet from `src` at `now`. Exempt entries with a port exempt that exact
    /// source only; the limit itself is per IP address.
    pub fn check(&self, src: SocketAddr, now: Instant) -> Verdict {
        if self.exempt.load().iter().any(|c| c.matches(src)) {
            return Verdict::Pass;
        }
        let ip = match src.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(src.ip(), IpAddr::V4),
            v4 => v4,
        };
        let key = self.key(ip);
        let ns = self.epoch.ns(now);
        if self
            .blocked
            .get(key, ns, |b| b.dropped.fetch_add(1, Ordering::Relaxed))
            .is_some()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Verdict::Drop;
        }
        if self.buckets.try_acquire(key, ns).is_ok() {
            return Verdict::Pass;
        }
        let until = ns.saturating_add(u64::try_from(self.block.as_nanos()).unwrap_or(u64::MAX));
        self.blocked.insert(
            key,
            ns,
            Blocked {
                until: AtomicU64::new(until),
                dropped: AtomicU64::new(1),
            },
        );
        self.blocks.fetch_add(1, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(left_out) = self.log.admit(now) {
            let limit = self.buckets.limit();
            tracing::warn!(
                source = %ip,
                rate = limit.rate,
                burst = limit.burst,
                block_secs = self.block.as_secs(),
                other_blocks_not_logged = left_out,
                "source over the flood limit: its packets are dropped unanswered for a while"
            );
        }
        Verdict::Block
    }

    /// Take the exemptions of a reloaded configuration (its carriers' and PBX's sources and
    /// `exempt`); the limits themselves are read at start only.
    pub fn set_exempt(&self, exempt: Vec<Cidr>) {
        self.exempt.store(std::sync::Arc::new(exempt));
    }

    /// Packets dropped since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sources blocked since the start (a source blocked twice counts twice).
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Relaxed)
    }

    /// "Source blocked" log lines left out to keep the log readable.
    pub fn logs_suppressed(&self) -> u64 {
        self.log.suppressed()
    }

    /// Sources blocked now (blocks that have run out but were not swept yet included).
    pub fn blocked_now(&self) -> usize {
        self.blocked.len()
    }

    /// Sources with a bucket now.
    pub fn tracked(&self) -> usize {
        self.buckets.table().len()
    }

    /// Forget ended blocks and full buckets.
    pub fn sweep(&self, now: Instant) {
        let ns = self.epoch.ns(now);
        self.blocked.sweep(ns);
        self.buckets.table().sweep(ns);
    }

    fn key(&self, ip: IpAddr) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        match ip {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()),
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(rate: u32, burst: u32, block_secs: u64, exempt: &[&str]) -> (FloodGuard, Instant) {
        let t0 = Instant::now();
        let g = FloodGuard::new(
            &FloodSettings {
                rate,
                burst,
                block: Duration::from_secs(block_secs),
                table_size: 1000,
                exempt: exempt.iter().map(|c| c.parse().expect("cidr")).collect(),
            },
            t0,
        );
        (g, t0)
    }

    fn ip(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn nth(i: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 5060))
    }

    #[test]
    fn a_source_over_its_rate_is_blocked_for_the_block_time_then_starts_over() {
        let (g, t0) = guard(10, 5, 30, &[]);
        let a = ip("198.51.100.7:5060");
        // The burst passes back to back, the next packet blocks the source.
        for _ in 0..5 {
            assert_eq!(g.check(a, t0), Verdict::Pass);
        }
        assert_eq!(g.check(a, t0), Verdict::Block);
        // Blocked: everything dropped, even at a rate that would conform.
        for s in 1..30 {
            assert_eq!(g.check(a, t0 + Duration::from_secs(s)), Verdict::Drop);
        }
        assert_eq!(g.blocks(), 1);
        assert_eq!(g.dropped(), 30);
        // After the block, a fresh burst.
        let later = t0 + Duration::from_secs(31);
        for _ in 0..5 {
            assert_eq!(g.check(a, later), Verdict::Pass);
        }
    }

    #[test]
    fn a_source_at_its_rate_is_never_blocked() {
        let (g, t0) = guard(10, 2, 30, &[]);
        let a = ip("198.51.100.7:5060");
        for i in 0..1000u64 {
            let at = t0 + Duration::from_millis(100 * i);
            assert_eq!(g.check(a, at), Verdict::Pass, "packet {i}");
        }
        assert_eq!(g.dropped(), 0);
    }

    #[test]
    fn sources_are_independent_and_exempt_ones_never_count() {
        let (g, t0) = guard(1, 1, 30, &["192.0.2.0/24", "198.51.100.9:5080"]);
        let (a, b, carrier) = (
            ip("198.51.100.7:5060"),
            ip("198.51.100.8:5060"),
            ip("192.0.2.80:5060"),
        );
        assert_eq!(g.check(a, t0), Verdict::Pass);
        assert_eq!(g.check(a, t0), Verdict::Block);
        assert_eq!(g.check(b, t0), Verdict::Pass);
        for _ in 0..1000 {
            assert_eq!(g.check(carrier, t0), Verdict::Pass);
        }
        // An IPv4-mapped IPv6 source is the same source; another port of it too.
        assert_eq!(g.check(ip("[::ffff:198.51.100.7]:5060"), t0), Verdict::Drop);
        assert_eq!(g.check(ip("198.51.100.7:6000"), t0), Verdict::Drop);
        // An exemption with a port covers that source only.
        for _ in 0..10 {
            assert_eq!(g.check(ip("198.51.100.9:5080"), t0), Verdict::Pass);
        }
        assert_eq!(g.check(ip("198.51.100.9:5060"), t0), Verdict::Pass);
        assert_eq!(g.check(ip("198.51.100.9:5060"), t0), Verdict::Block);
        assert_eq!(g.check(ip("198.51.100.9:5080"), t0), Verdict::Pass);
        assert_eq!(g.tracked(), 3);
    }

    #[test]
    fn a_flood_of_distinct_sources_stays_within_the_tables() {
        let (g, t0) = guard(1, 1, 30, &[]);
        for i in 0..20_000u32 {
            g.check(nth(i), t0);
            g.check(nth(i), t0);
        }
        assert!(g.tracked() <= 1000, "{}", g.tracked());
        assert!(g.blocked_now() <= 1000, "{}", g.blocked_now());
        assert_eq!(g.blocks(), 20_000);
    }

    #[test]
    fn block_lines_are_limited_per_second() {
        let (g, t0) = guard(1, 1, 30, &[]);
        for i in 0..50u32 {
            g.check(nth(i), t0);
            g.check(nth(i), t0);
        }
        assert_eq!(g.logs_suppressed(), 40);
        // A new second logs again.
        let a = ip("203.0.113.1:5060");
        g.check(a, t0 + Duration::from_secs(2));
        g.check(a, t0 + Duration::from_secs(2));
        assert_eq!(g.logs_suppressed(), 40);
    }
}
