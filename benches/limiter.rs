//! The limiter's hot path: one GCRA acquire, the whole chain, and the keyed per-source table
//! under two threads against the naive alternative, a `Mutex<HashMap>` of buckets; the flood
//! guard's per-packet check.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cpsgate::limiter::{Ask, Chain, ChainSpec, Epoch, First, Gcra, KeyedBuckets, Limit};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const KEYS: u64 = 100_000;
const PER_THREAD: u64 = 20_000;

/// A plain token bucket per key behind one lock: what one writes first.
struct Naive {
    map: Mutex<HashMap<u64, (f64, Instant)>>,
    rate: f64,
    burst: f64,
}

impl Naive {
    fn try_acquire(&self, key: u64, now: Instant) -> bool {
        let mut m = self.map.lock().expect("lock");
        let (tokens, last) = m.entry(key).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn two_threads(f: impl Fn(u64, u64) + Sync) {
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let f = &f;
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    f(t, i);
                }
            });
        }
    });
}

fn bench(c: &mut Criterion) {
    let t0 = Instant::now();
    let limit = Limit {
        rate: 1e6,
        burst: 1_000_000,
    };
    let mut g = c.benchmark_group("limiter");
    g.throughput(Throughput::Elements(1));
    let bucket = Gcra::new(limit, Epoch::new(t0));
    // Time advances one cell per call, so every acquire is admitted (the path that matters).
    let mut n = 0u64;
    g.bench_function("gcra_try_acquire", |b| {
        b.iter(|| {
            n += 1;
            let ok = bucket.try_acquire(t0 + Duration::from_micros(n)).is_ok();
            assert!(ok);
        })
    });
    let spec = ChainSpec {
        trunks: vec![("t".into(), limit)],
        accounts: vec![("a".into(), limit)],
        source: limit,
        username: Some(limit),
        global: Some(limit),
        table_cap: 1_000_000,
        usage_period: 3600,
    };
    let chain = Chain::new(&spec, Epoch::new(t0));
    let ask = Ask {
        first: First::Trunk(0),
        username: Some(42),
        account: Some(0),
    };
    let mut n = 0u64;
    g.bench_function("chain_trunk_username_account_global", |b| {
        b.iter(|| {
            n += 1;
            let ok = chain.admit(t0 + Duration::from_micros(n), &ask).is_ok();
            assert!(ok);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("keyed_table_2_threads");
    g.throughput(Throughput::Elements(2 * PER_THREAD));
    let keyed = KeyedBuckets::new(
        Limit {
            rate: 20.0,
            burst: 20,
        },
        1_000_000,
    );
    g.bench_function("cpsgate_keyed_buckets", |b| {
        b.iter(|| {
            two_threads(|t, i| {
                let key = (i * 2 + t) % KEYS;
                let _ = keyed.try_acquire(key.wrapping_mul(0x9e37_79b9_7f4a_7c15), i * 1000);
            })
        })
    });
    let naive = Naive {
        map: Mutex::new(HashMap::new()),
        rate: 20.0,
        burst: 20.0,
    };
    let clock = std::sync::atomic::AtomicU64::new(0);
    g.bench_function("naive_mutex_hashmap", |b| {
        b.iter(|| {
            let base = clock.fetch_add(PER_THREAD * 1_000, std::sync::atomic::Ordering::Relaxed);
            two_threads(|t, i| {
                let key = (i * 2 + t) % KEYS;
                let _ = naive.try_acquire(key, t0 + Duration::from_nanos((base + i * 1_000) * 50));
            })
        })
    });
    g.finish();

    // The flood guard's check on every packet: a source within its rate among 10 000, and one
    // that is blocked; the exempt list holds two carriers.
    let mut g = c.benchmark_group("flood");
    g.throughput(Throughput::Elements(1));
    let start = Instant::now();
    let guard = cpsgate::flood::FloodGuard::new(
        &cpsgate::config::FloodSettings {
            rate: 1_000_000,
            burst: 1_000_000,
            block: Duration::from_secs(3600),
            table_size: 100_000,
            exempt: vec![
                "192.0.2.0/24".parse().expect("cidr"),
                "198.51.100.80:5060".parse().expect("cidr"),
            ],
        },
        start,
    );
    let sources: Vec<std::net::SocketAddr> = (0..10_000u32)
        .map(|i| (std::net::Ipv4Addr::from(0x0a00_0000 + i), 5060).into())
        .collect();
    let mut i = 0usize;
    g.bench_function("check_passing_source", |b| {
        b.iter(|| {
            i = (i + 1) % sources.len();
            guard.check(sources[i], start)
        })
    });
    let tight = cpsgate::flood::FloodGuard::new(
        &cpsgate::config::FloodSettings {
            rate: 1,
            burst: 1,
            block: Duration::from_secs(3600),
            table_size: 100_000,
            exempt: Vec::new(),
        },
        start,
    );
    let flooder: std::net::SocketAddr = "203.0.113.9:5060".parse().expect("addr");
    tight.check(flooder, start);
    tight.check(flooder, start);
    g.bench_function("check_blocked_source", |b| {
        b.iter(|| tight.check(flooder, start))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
