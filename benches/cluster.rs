//! Cluster mode: one admission decision with the account pool local, against the same decision
//! with the pool shared in Redis (the core's first half, one script round trip to a
//! `redis-server` on loopback, the core's second half), one call at a time (added latency) and
//! 64 calls under way at once (decisions per second).
//!
//! Starts its own `redis-server` (Debian package `redis-server`) on an ephemeral loopback port;
//! without one, only the local figure is measured.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpsgate::cluster::{Cluster, Outcome};
use cpsgate::config::Config;
use cpsgate::proxy::{Action, Inbound, LocalListener, Proxy};
use cpsgate::sip::Transport;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Distinct calls cycled through; the clock moves past the decision cache's memory (32 s)
/// between cycles, so every decision is a new call's.
const CALLS: usize = 4096;
const CYCLE: Duration = Duration::from_secs(40);
const IN_FLIGHT: u64 = 64;

fn invite(n: usize) -> Vec<u8> {
    let body = "v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n";
    format!(
        "INVITE sip:+15551234567@carrier.example SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK-bench-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:+15550001111@pbx.example>;tag=f{n}\r\n\
         To: <sip:+15551234567@carrier.example>\r\n\
         Call-ID: bench-{n}@10.0.0.5\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:+15550001111@10.0.0.5:5062>\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn config(shared: &str) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:5060"
[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"
[[account]]
name = "pool"
rate = 1000000
burst = 1000000
{shared}
[[trunk]]
name = "t"
account = "pool"
upstream = "carrier"
rate = 1000000
burst = 1000000
match = {{ sources = ["10.0.0.0/24"] }}
"#
    )
}

fn proxy(toml: &str, t0: Instant) -> Proxy {
    let cfg = Config::parse(toml, "bench").expect("config");
    Proxy::new_at(
        &cfg,
        vec![LocalListener {
            bound: "127.0.0.1:5060".parse().expect("addr"),
            host: "127.0.0.1".into(),
            port: 5060,
            udp: true,
            tcp: true,
        }],
        t0,
    )
    .expect("proxy")
}

fn inbound(data: &[u8]) -> Inbound<'_> {
    Inbound {
        data,
        source: "10.0.0.5:5062".parse().expect("addr"),
        transport: Transport::Udp,
        listener: 0,
        conn: None,
    }
}

struct Redis {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Redis {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("cpsgate-bench-redis-{port}"));
        std::fs::create_dir_all(&dir).ok()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child, dir, port })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One shared decision: the core's first half, Redis, the second half.
async fn shared_decision(p: &Proxy, cluster: &Cluster, data: &[u8], now: Instant) {
    match p.handle(now, &inbound(data)) {
        Action::Consult(c) => {
            let outcome = cluster.take(&c.buckets).await;
            assert_eq!(
                outcome,
                Outcome::Admitted,
                "the benchmark pool never refuses"
            );
            let s = p.settle(*c, outcome, now);
            assert!(matches!(s.action, Action::Forward(_)));
        }
        other => panic!("expected a consult, got {other:?}"),
    }
}

fn bench(c: &mut Criterion) {
    let calls: Vec<Vec<u8>> = (0..CALLS).map(invite).collect();
    let calls = Arc::new(calls);
    let t0 = Instant::now();
    let at = move |i: u64| t0 + CYCLE * u32::try_from(i / CALLS as u64).unwrap_or(u32::MAX);
    let mut g = c.benchmark_group("admission");
    g.throughput(Throughput::Elements(1));

    let local = proxy(&config(""), t0);
    let mut next = 0u64;
    g.bench_function("local_pool", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let data = &calls[(next % CALLS as u64) as usize];
                let a = local.handle(at(next), &inbound(data));
                assert!(matches!(a, Action::Forward(_)));
                next += 1;
            }
            start.elapsed()
        })
    });

    let Some(redis) = Redis::start() else {
        eprintln!("redis-server not found: the shared-pool benchmarks are skipped");
        g.finish();
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let toml = format!(
        "{}\n[cluster]\nurls = [\"{url}\"]\ntimeout_ms = 1000\non_failure = \"closed\"\n",
        config("shared = true")
    );
    let shared = Arc::new(proxy(&toml, t0));
    let cfg = Config::parse(&toml, "bench").expect("config");
    let cluster = {
        let _guard = rt.enter();
        Cluster::start(cfg.cluster.as_ref().expect("cluster")).expect("client")
    };
    let mut next = 0u64;
    g.bench_function("shared_pool_one_at_a_time", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let data = &calls[(next % CALLS as u64) as usize];
                    shared_decision(&shared, &cluster, data, at(next)).await;
                    next += 1;
                }
                start.elapsed()
            })
        })
    });
    // Here calls are formatted as they go (each one new, numbered past every earlier one), and
    // the clock is one shared counter moving 1 µs per decision, past every earlier instant:
    // tasks under way at once never see time go back by more than the buckets' tolerance.
    let clock = Arc::new(std::sync::atomic::AtomicU64::new(0));
    g.bench_function("shared_pool_64_under_way", |b| {
        b.iter_custom(|iters| {
            let base = next + 1_000_000_000;
            next += iters;
            let since = u64::try_from((at(next) - t0).as_nanos()).unwrap_or(u64::MAX);
            clock.fetch_max(since, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..IN_FLIGHT)
                    .map(|k| {
                        let (p, cl, clock) = (shared.clone(), cluster.clone(), clock.clone());
                        tokio::spawn(async move {
                            let mut i = k;
                            while i < iters {
                                let data = invite((base + i) as usize);
                                let ns =
                                    clock.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
                                shared_decision(&p, &cl, &data, t0 + Duration::from_nanos(ns))
                                    .await;
                                i += IN_FLIGHT;
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    drop(redis);
}

criterion_group!(benches, bench);
criterion_main!(benches);
