//! Log setup and the counters every event feeds. An event is one structured log line plus one
//! counter increment; counters are plain atomics created at start, never looked up per packet.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::proxy::{Action, DropReason};

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
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless; the first subscriber stays.
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
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
}

impl TransportDrop {
    const COUNT: usize = 7;

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
}

impl Stats {
    /// Count one decision of the core, and log drops at debug level.
    pub fn record(&self, action: &Action, source: std::net::SocketAddr) {
        self.received.fetch_add(1, Ordering::Relaxed);
        match action {
            Action::Forward(_) => {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            Action::Reply(code, _) => {
                let class = usize::from(code / 100).min(6);
                self.replies[class].fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%source, code, "answered locally");
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

    /// Transport drops of one reason so far.
    pub fn transport_drops(&self, why: TransportDrop) -> u64 {
        self.transport_drops[why.index()].load(Ordering::Relaxed)
    }
}
