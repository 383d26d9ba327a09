//! Alerts: a JSON event to a webhook when a trunk, an account pool or the global limit starts
//! refusing calls, and when it recovers. The SIP path only `try_send`s a small signal into a
//! bounded channel; a monitor task keeps per-key state and debounces; a delivery task posts
//! events with a timeout and retries from its own bounded queue. A slow or dead webhook fills
//! that queue (later events are counted and dropped) and never touches the SIP path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::AlertSettings;
use crate::limiter::Stage;
use crate::proxy::{Proxy, Rejection};

/// Signals waiting for the monitor; beyond this the SIP path drops them (counted).
const SIGNAL_QUEUE: usize = 1024;
/// Keys the monitor tracks at once.
const MAX_KEYS: usize = 10_000;

/// What the SIP path tells the monitor.
#[derive(Debug)]
struct Signal {
    stage: Stage,
    key: String,
    call_id: String,
}

/// One webhook event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// `limit_reached` or `recovered`.
    pub event: &'static str,
    /// `trunk`, `account` or `global`.
    pub stage: &'static str,
    /// The trunk or account name (`global` for the global limit).
    pub key: String,
    /// Its rate, calls per second.
    pub limit_rate: f64,
    /// Its burst.
    pub limit_burst: u32,
    /// Calls admitted in the last whole second.
    pub observed_cps: u64,
    /// The first Call-ID refused in this episode.
    pub first_call_id: String,
    /// Calls refused in this episode so far.
    pub refused: u64,
    /// Seconds since the Unix epoch.
    pub timestamp: u64,
}

/// The handle the SIP path holds.
#[derive(Debug)]
pub struct Alerts {
    tx: mpsc::Sender<Signal>,
    /// Signals or events dropped because a queue was full.
    pub dropped: Arc<AtomicU64>,
    /// Events delivered to the webhook.
    pub delivered: Arc<AtomicU64>,
    /// Events given up after every retry.
    pub failed: Arc<AtomicU64>,
}

impl Alerts {
    /// Start the monitor and the delivery task (stopped by `cancel`).
    pub fn start(
        cfg: AlertSettings,
        proxy: Arc<Proxy>,
        cancel: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(SIGNAL_QUEUE);
        let (etx, erx) = mpsc::channel(cfg.queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let delivered = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        tracker.spawn(monitor(
            rx,
            etx,
            cfg.clone(),
            proxy,
            dropped.clone(),
            cancel.clone(),
        ));
        tracker.spawn(deliver(erx, cfg, delivered.clone(), failed.clone(), cancel));
        Arc::new(Self {
            tx,
            dropped,
            delivered,
            failed,
        })
    }

    /// Note a refusal (never blocks; a full queue drops the signal and counts it).
    pub fn notify(&self, r: &Rejection) {
        let key = match r.stage {
            Stage::Trunk => r.trunk.as_deref(),
            Stage::Account => r.account.as_deref(),
            Stage::Global => Some("global"),
            Stage::Source | Stage::Username => None,
        };
        let Some(key) = key else { return };
        let signal = Signal {
            stage: r.stage,
            key: key.to_owned(),
            call_id: r.call_id.clone(),
        };
        if self.tx.try_send(signal).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A key's refusal episode (kept after it ends, for debouncing the next one).
struct Episode {
    stage: Stage,
    active: bool,
    announced: bool,
    first_call_id: String,
    refused: u64,
    last_refusal: Instant,
    last_sent: Option<Instant>,
}

async fn monitor(
    mut rx: mpsc::Receiver<Signal>,
    events: mpsc::Sender<Event>,
    cfg: AlertSettings,
    proxy: Arc<Proxy>,
    dropped: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut episodes: HashMap<(Stage, String), Episode> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let emit = |event: &'static str, stage: Stage, key: &str, ep: &Episode| {
        let (rate, burst, cps) = limit_of(&proxy, stage, key);
        let e = Event {
            event,
            stage: stage.as_str(),
            key: key.to_owned(),
            limit_rate: rate,
            limit_burst: burst,
            observed_cps: cps,
            first_call_id: ep.first_call_id.clone(),
            refused: ep.refused,
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        tracing::info!(
            event,
            stage = stage.as_str(),
            key,
            refused = ep.refused,
            "alert"
        );
        if events.try_send(e).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            s = rx.recv() => {
                let Some(s) = s else { return };
                let now = Instant::now();
                let k = (s.stage, s.key);
                if !episodes.contains_key(&k) && episodes.len() >= MAX_KEYS {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let ep = episodes.entry(k.clone()).or_insert_with(|| Episode {
                    stage: s.stage,
                    active: false,
                    announced: false,
                    first_call_id: String::new(),
                    refused: 0,
                    last_refusal: now,
                    last_sent: None,
                });
                if !ep.active {
                    ep.active = true;
                    ep.refused = 0;
                    ep.first_call_id = s.call_id;
                    // At most one start event per key per debounce interval.
                    ep.announced = ep.last_sent.is_none_or(|t| now.duration_since(t) >= cfg.debounce);
                    if ep.announced {
                        ep.last_sent = Some(now);
                    }
                }
                ep.refused += 1;
                ep.last_refusal = now;
                if ep.announced && ep.refused == 1 {
                    emit("limit_reached", ep.stage, &k.1, ep);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                for (k, ep) in episodes.iter_mut() {
                    // Quiet for a whole debounce interval: the episode is over.
                    if ep.active && now.duration_since(ep.last_refusal) >= cfg.debounce {
                        ep.active = false;
                        if ep.announced {
                            emit("recovered", ep.stage, &k.1, ep);
                        }
                    }
                }
                episodes.retain(|_, e| e.active || now.duration_since(e.last_refusal) < cfg.debounce * 10);
            }
        }
    }
}

/// (rate, burst, last second's admissions) of a key, for the event, looked up directly (no
/// full snapshot).
fn limit_of(proxy: &Proxy, stage: Stage, key: &str) -> (f64, u32, u64) {
    let chain = proxy.chain();
    let now = chain.epoch().ns(Instant::now());
    let keyed = match stage {
        Stage::Trunk => chain.trunks().iter().find(|k| k.name == key),
        Stage::Account => chain.accounts().iter().find(|k| k.name == key),
        Stage::Global => {
            return chain
                .global()
                .map_or((0.0, 0, 0), |g| (g.limit().rate, g.limit().burst, 0));
        }
        _ => None,
    };
    keyed.map_or((0.0, 0, 0), |k| {
        // A shared pool reports its cluster-wide limit, not this gate's share.
        let kind = match stage {
            Stage::Trunk => crate::proxy::LimitKind::Trunk,
            _ => crate::proxy::LimitKind::Account,
        };
        let l = proxy.limit(kind, key).unwrap_or_else(|| k.bucket.limit());
        (l.rate, l.burst, k.stats.cps(now))
    })
}

async fn deliver(
    mut rx: mpsc::Receiver<Event>,
    cfg: AlertSettings,
    delivered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let body = serde_json::to_string(&event).unwrap_or_default();
        let mut sent = false;
        for attempt in 0..=cfg.retries {
            if attempt > 0 {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))) => {}
                }
            }
            let post = tokio::time::timeout(cfg.timeout, post_json(&cfg, &body));
            let ok = tokio::select! {
                _ = cancel.cancelled() => return,
                r = post => matches!(r, Ok(Ok(true))),
            };
            if ok {
                sent = true;
                break;
            }
        }
        if sent {
            delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            failed.fetch_add(1, Ordering::Relaxed);
            // The URL may carry a secret: name only where it points.
            tracing::warn!(host = %cfg.host, port = cfg.port, "alert not delivered after retries");
        }
    }
}

/// POST `body` to the webhook over plain HTTP/1.1; true for a 2xx answer.
async fn post_json(cfg: &AlertSettings, body: &str) -> std::io::Result<bool> {
    let mut s = tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: cpsgate\r\n\r\n{body}",
        cfg.path,
        cfg.host,
        cfg.port,
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    Ok(head.starts_with(b"HTTP/1.") && head[9] == b'2')
}
