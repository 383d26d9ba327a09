//! Cluster mode against a real `redis-server` (Debian package `redis-server`), started on an
//! ephemeral loopback port with its own temporary directory and stopped by PID.
//! Ignored in plain `cargo test`; `.ci/run` installs Redis and runs them with
//! `--include-ignored`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpsgate::cluster::{Bucket, Cluster, Failure, Fallback, Outcome};
use cpsgate::config::{ClusterConfig, FailurePolicy};
use tokio::net::UdpSocket;

use crate::harness::{TestGate, invite, status};

/// A `redis-server` child on a loopback port, without persistence.
struct RedisServer {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("cpsgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut r = Self {
            port,
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian package redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL by PID: no goodbye to the clients.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty, as after a crash without persistence).
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client(url: &str, timeout_ms: u64) -> Arc<Cluster> {
    Cluster::start(&ClusterConfig {
        urls: vec![url.to_owned()],
        timeout: Duration::from_millis(timeout_ms),
        on_failure: FailurePolicy::Closed,
        instances: 1,
        key_prefix: "t:".into(),
    })
    .expect("client")
}

#[tokio::test]
#[ignore = "needs redis-server (Debian redis-server); run by .ci/run"]
async fn the_script_is_a_gcra_on_the_server_clock_in_integer_microseconds() {
    let redis = RedisServer::start();
    // Generous: the first call connects.
    let c = client(&redis.url(), 1000);
    // 1 CPS, burst 3.
    let b = vec![Bucket {
        key: "t:account:a".into(),
        interval_us: 1_000_000,
        tolerance_us: 2_000_000,
    }];
    for _ in 0..3 {
        assert_eq!(c.take(&b).await, Outcome::Admitted);
    }
    let Outcome::Refused { index, retry_after } = c.take(&b).await else {
        panic!("the fourth cell of a burst of 3 is refused");
    };
    assert_eq!(index, 0);
    assert!(
        retry_after > Duration::from_millis(900) && retry_after <= Duration::from_secs(1),
        "{retry_after:?}"
    );
    // The TAT is written as an integer number of microseconds (16 digits today), never in
    // Lua's %.14g.
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let tat: String = redis::cmd("GET")
        .arg("t:account:a")
        .query_async(&mut conn)
        .await
        .expect("get");
    assert!(
        tat.len() >= 16 && tat.bytes().all(|b| b.is_ascii_digit()),
        "{tat}"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("t:account:a")
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(
        (2_900..=4_000).contains(&ttl),
        "the key lives until the bucket is full: {ttl}"
    );
    // A refund (cost -1) gives one cell back.
    c.refund(&b).await;
    assert_eq!(c.take(&b).await, Outcome::Admitted);
    assert!(matches!(c.take(&b).await, Outcome::Refused { .. }));
    // Two keys, all or none: the full one refuses and the other is left untouched.
    let two = vec![
        Bucket {
            key: "t:trunk:x".into(),
            interval_us: 1_000_000,
            tolerance_us: 0,
        },
        b[0].clone(),
    ];
    let Outcome::Refused { index, .. } = c.take(&two).await else {
        panic!("the pool is full");
    };
    assert_eq!(index, 1);
    let exists: i64 = redis::cmd("EXISTS")
        .arg("t:trunk:x")
        .query_async(&mut conn)
        .await
        .expect("exists");
    assert_eq!(exists, 0, "nothing taken on a refusal");
    // A Redis that lost its scripts (restart, SCRIPT FLUSH) gets it loaded again by SHA miss.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    let fresh = vec![Bucket {
        key: "t:account:fresh".into(),
        interval_us: 1000,
        tolerance_us: 0,
    }];
    assert_eq!(c.take(&fresh).await, Outcome::Admitted);
    assert_eq!(c.stats.admitted.load(Ordering::Relaxed), 5);
    assert_eq!(c.stats.refunds.load(Ordering::Relaxed), 1);
}

fn gate_toml(pbx: SocketAddr, carrier: SocketAddr, redis: &str, policy: &str) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:0"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[pbx]
address = "{pbx}"

[[upstream]]
name = "carrier"
address = "{carrier}"
sources = ["{carrier}"]

[[account]]
name = "pool"
rate = 100
burst = 10
shared = true

[[trunk]]
name = "t1"
account = "pool"
upstream = "carrier"
rate = 1000
burst = 1000
match = {{ sources = ["{pbx}"] }}

[cluster]
urls = ["{redis}"]
instances = 3
on_failure = "{policy}"
"#
    )
}

/// Three gates sharing one pool, each offered `cps` by its own PBX; one carrier behind them.
struct Cluster3 {
    gates: Vec<TestGate>,
    pbxs: Vec<Arc<UdpSocket>>,
    carrier: Arc<UdpSocket>,
}

impl Cluster3 {
    async fn start(redis: &str, policy: &str) -> Self {
        let carrier = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let mut gates = Vec::new();
        let mut pbxs = Vec::new();
        for _ in 0..3 {
            let pbx = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
            let toml = gate_toml(
                pbx.local_addr().expect("addr"),
                carrier.local_addr().expect("addr"),
                redis,
                policy,
            );
            gates.push(TestGate::start(&toml).await);
            pbxs.push(pbx);
        }
        Self {
            gates,
            pbxs,
            carrier,
        }
    }

    /// Offer `cps` per gate for `secs`; returns the carrier's arrival times (since the start),
    /// the refusals and the INVITEs sent. `during` runs at the given offsets (kill, restart).
    async fn run(
        &self,
        cps: u32,
        secs: u64,
        events: Vec<(Duration, Box<dyn FnOnce() + Send>)>,
    ) -> (Vec<Duration>, u64, u64) {
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let carrier = self.carrier.clone();
        let arrivals = tokio::spawn(async move {
            let mut at = Vec::new();
            let mut buf = vec![0u8; 65_535];
            let quiet = Duration::from_millis(1500);
            while let Ok(Ok((n, _))) =
                tokio::time::timeout_at((end + quiet).into(), carrier.recv_from(&mut buf)).await
            {
                if buf[..n].starts_with(b"INVITE ") {
                    at.push(start.elapsed());
                }
            }
            at
        });
        let refused = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (g, pbx) in self.gates.iter().zip(&self.pbxs) {
            let (gate, pbx) = (g.udp, pbx.clone());
            let (refused, sent) = (refused.clone(), sent.clone());
            let rx = pbx.clone();
            let r = refused.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                let quiet = Duration::from_millis(1500);
                while let Ok(Ok((n, _))) =
                    tokio::time::timeout_at((end + quiet).into(), rx.recv_from(&mut buf)).await
                {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if status(&text) == 503 {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
            tasks.push(tokio::spawn(async move {
                let me = pbx.local_addr().expect("addr");
                let mut tick = tokio::time::interval(Duration::from_secs(1) / cps);
                let mut n = 0u64;
                while Instant::now() < end {
                    tick.tick().await;
                    let id = format!("{}-{n}", me.port());
                    let msg = invite(me, "UDP", &id, &format!("z9hG4bK{id}"), "");
                    pbx.send_to(msg.as_bytes(), gate).await.expect("send");
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                let _ = refused;
            }));
        }
        for (offset, f) in events {
            tokio::time::sleep_until((start + offset).into()).await;
            tokio::task::spawn_blocking(f).await.expect("event");
        }
        for t in tasks {
            t.await.expect("task");
        }
        let at = arrivals.await.expect("carrier");
        (
            at,
            refused.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed),
        )
    }
}

fn in_window(at: &[Duration], from: f64, to: f64) -> usize {
    at.iter()
        .filter(|t| (from..to).contains(&t.as_secs_f64()))
        .count()
}

/// The most arrivals in any 1-second window.
fn max_per_second(at: &[Duration]) -> usize {
    let mut max = 0;
    let mut lo = 0;
    for hi in 0..at.len() {
        while at[hi] - at[lo] >= Duration::from_secs(1) {
            lo += 1;
        }
        max = max.max(hi - lo + 1);
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian redis-server); run by .ci/run"]
async fn three_gates_hold_one_shared_pool_within_2_percent() {
    let redis = RedisServer::start();
    let c = Cluster3::start(&redis.url(), "closed").await;
    // Each gate offered 80 CPS (240 in all) for 20 s against a pool of 100 CPS, burst 10.
    let (mut at, refused, sent) = c.run(80, 20, Vec::new()).await;
    at.sort();
    let steady = in_window(&at, 2.0, 19.0) as f64 / 17.0;
    let max = max_per_second(&at);
    println!(
        "shared pool of 100 CPS, 3 gates x 80 CPS for 20 s: {} admitted, {refused} refused, {sent} sent; steady state {steady:.2} CPS; busiest 1-s window {max}",
        at.len()
    );
    assert!(
        (98.0..=102.0).contains(&steady),
        "steady state {steady:.2} CPS"
    );
    assert!(max <= 110, "a 1-s window held {max} > rate + burst");
    assert_eq!(
        at.len() as u64 + refused,
        sent,
        "every call forwarded or refused"
    );
    for g in &c.gates {
        let st = &g.cluster.as_ref().expect("cluster").stats;
        println!(
            "gate {}: Redis admitted {}, refused {}",
            g.udp,
            st.admitted.load(Ordering::Relaxed),
            st.refused.load(Ordering::Relaxed)
        );
        assert!(
            st.admitted.load(Ordering::Relaxed) > 0,
            "each gate asked Redis"
        );
        assert_eq!(
            Failure::ALL.iter().map(|f| st.failures(*f)).sum::<u64>(),
            0,
            "no decision went to the failure policy"
        );
    }
}

/// Redis killed at 4 s and back at 8 s, under `policy`; returns the admitted rate per phase
/// (before, down, after), after checking that no call was lost.
async fn redis_outage(policy: &str) -> (f64, f64, f64) {
    let redis = Arc::new(std::sync::Mutex::new(RedisServer::start()));
    let url = redis.lock().expect("lock").url();
    let c = Cluster3::start(&url, policy).await;
    let (k, r) = (redis.clone(), redis.clone());
    let events: Vec<(Duration, Box<dyn FnOnce() + Send>)> = vec![
        (
            Duration::from_secs(4),
            Box::new(move || k.lock().expect("lock").kill()),
        ),
        (
            Duration::from_secs(8),
            Box::new(move || r.lock().expect("lock").restart()),
        ),
    ];
    let (mut at, refused, sent) = c.run(80, 13, events).await;
    at.sort();
    assert_eq!(
        at.len() as u64 + refused,
        sent,
        "{policy}: every call forwarded or refused, none lost"
    );
    let before = in_window(&at, 1.0, 4.0) as f64 / 3.0;
    let down = in_window(&at, 4.5, 8.0) as f64 / 3.5;
    let after = in_window(&at, 9.5, 13.0) as f64 / 3.5;
    println!(
        "{policy}: admitted CPS before {before:.1}, Redis down {down:.1}, back {after:.1} ({} admitted, {refused} refused, {sent} sent)",
        at.len()
    );
    for g in &c.gates {
        let st = &g.cluster.as_ref().expect("cluster").stats;
        assert!(st.up.load(Ordering::Relaxed), "{policy}: Redis is up again");
        assert!(
            st.recoveries.load(Ordering::Relaxed) >= 1,
            "{policy}: the shared mode resumed by itself"
        );
        let decided: u64 = Fallback::ALL.iter().map(|f| st.fallbacks(*f)).sum();
        assert!(
            decided > 0,
            "{policy}: the policy decided while Redis was down"
        );
    }
    (before, down, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian redis-server); run by .ci/run"]
async fn a_redis_outage_applies_each_policy_and_the_shared_mode_returns() {
    // local_share: each gate a third of the pool; the total stays at or under the pool rate.
    let (before, down, after) = redis_outage("local_share").await;
    assert!((95.0..=105.0).contains(&before), "{before}");
    assert!(
        down <= 100.0 + 1.0,
        "local_share held {down} CPS over a 100 CPS pool"
    );
    assert!(
        down >= 85.0,
        "local_share still admits about the pool rate: {down}"
    );
    assert!(
        (95.0..=105.0).contains(&after),
        "shared mode resumed: {after}"
    );
    // open: the pool is not checked while Redis is down (the trunks still are).
    let (_, down, after) = redis_outage("open").await;
    assert!(down >= 230.0, "open admits what is offered: {down}");
    assert!((95.0..=105.0).contains(&after), "{after}");
    // closed: nothing needing the pool is admitted while Redis is down.
    let (_, down, after) = redis_outage("closed").await;
    assert!(down <= 1.0, "closed admitted {down} CPS without Redis");
    assert!((95.0..=105.0).contains(&after), "{after}");
}

#[tokio::test]
#[ignore = "needs redis-server (Debian redis-server); run by .ci/run"]
async fn a_second_url_takes_over_and_the_first_is_used_again_when_back() {
    let mut first = RedisServer::start();
    let second = RedisServer::start();
    let c = Cluster::start(&ClusterConfig {
        urls: vec![first.url(), second.url()],
        timeout: Duration::from_millis(500),
        on_failure: FailurePolicy::Closed,
        instances: 1,
        key_prefix: "t:".into(),
    })
    .expect("client");
    let b = vec![Bucket {
        key: "t:account:f".into(),
        interval_us: 1_000_000,
        tolerance_us: 1_000_000_000,
    }];
    let holds = |r: &RedisServer| {
        let url = r.url();
        async move {
            let mut conn = redis::Client::open(url)
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            redis::cmd("EXISTS")
                .arg("t:account:f")
                .query_async::<i64>(&mut conn)
                .await
                .expect("exists")
                == 1
        }
    };
    assert_eq!(c.take(&b).await, Outcome::Admitted);
    assert!(holds(&first).await && !holds(&second).await);
    first.kill();
    // Until the health task finds the second server, calls go to the policy; then to it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.take(&b).await != Outcome::Admitted {
        assert!(Instant::now() < deadline, "the second server took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(holds(&second).await);
    first.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(c.take(&b).await, Outcome::Admitted);
        if holds(&first).await {
            break;
        }
        assert!(Instant::now() < deadline, "back on the first server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.stats.recoveries.load(Ordering::Relaxed) >= 1);
}
