//! The decision core: `Proxy::handle(now, inbound) -> Action`. It reads no clock and touches no
//! socket; the transport shell carries out the action it returns. Every rule cites its RFC.
//!
//! Phases of one request: scan → validate (§16.3) → route preprocessing (§16.4) → choose the
//! next hop (Route set, else by origin: PBX side → trunk upstream, carrier → PBX) → rewrite
//! (§16.6: Max-Forwards, Record-Route, Via) → forward. Responses: check and pop our Via, send to
//! the next one (§16.7, §18.2.2).

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use siphasher::sip::SipHasher13;

use crate::config::{Config, FailurePolicy, Target, UnknownSources};
use crate::limiter::{Ask, BoundedMap, Chain, ChainSpec, Epoch, Expiring, First, Stage, Stages};
use crate::routing::{Origin, Routes, sip_username};
use crate::sip::{
    Edits, HeaderName, Host, Message, Method, NameAddr, RequestView, ResponseSpec, Rport, Scheme,
    Transport, Uri, Via, build_response, elements, remove_element, remove_elements,
};

pub mod admission;

use admission::{Admitted, DECISION_LABEL, Keys};

/// Our branches: cookie + this marker + 16 hex digits.
const BRANCH_PREFIX: &str = "z9hG4bKcg";
/// Our To-tags: this marker + 16 hex digits.
const TAG_PREFIX: &str = "cg";
/// Most consecutive Route values of ours removed from one request.
const MAX_OWN_ROUTES: usize = 4;
/// RFC 3261 §18.1.1: requests larger than this go over TCP when the path MTU is unknown.
const UDP_SIZE_LIMIT: usize = 1300;
/// RFC 3261 §16.6 step 3: the Max-Forwards a proxy adds when there is none.
const DEFAULT_MAX_FORWARDS: u8 = 70;

/// A connection of the TCP table.
pub type ConnId = u64;

/// One received message and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// The message bytes (a datagram, or one framed stream message).
    pub data: &'a [u8],
    /// The transport source address (never the Via sent-by, RFC 3261 §18.2.1).
    pub source: SocketAddr,
    /// The transport it came over.
    pub transport: Transport,
    /// Index of the listener (local address) it came in on.
    pub listener: usize,
    /// The TCP connection it came on.
    pub conn: Option<ConnId>,
}

/// Where to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextHop {
    /// A resolved address.
    Addr(SocketAddr),
    /// A host name the shell must resolve (A/AAAA) before sending.
    Name {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Destination.
    pub to: NextHop,
    /// Transport.
    pub transport: Transport,
    /// Listener to send from (its UDP socket; for TCP, the local side of a new connection).
    pub listener: usize,
    /// Existing connection to prefer (TCP).
    pub conn: Option<ConnId>,
    /// The bytes.
    pub data: Bytes,
    /// For a request moved to TCP by size (RFC 3261 §18.1.1): the listener and bytes to send
    /// over UDP instead when the connection cannot be made.
    pub udp_fallback: Option<(usize, Bytes)>,
}

/// What the shell must do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Relay to the next hop.
    Forward(Outbound),
    /// Answer locally (the code is kept for counting).
    Reply(u16, Outbound),
    /// A call refused by a CPS limit, with its answer.
    Reject(Rejection, Outbound),
    /// A call paced: send `trying` now, and at `at` ask [`Proxy::release`] for the INVITE.
    Queue(QueuedCall),
    /// A waiting call cancelled: the CANCEL's `200` and the INVITE's `487` (RFC 3261 §9.2).
    Cancelled(Outbound, Outbound),
    /// Swallowed on purpose: the ACK for one of our own final responses (RFC 3261 §8.2.7, §17.2.1).
    Absorb,
    /// Not processed; count it.
    Drop(DropReason),
    /// A call whose local stages admitted it and whose shared buckets must be asked in Redis:
    /// ask (within the decision timeout), then give the outcome to [`Proxy::settle`].
    Consult(Box<Consult>),
}

/// A call waiting for its shared-bucket decision. Everything needed to finish it travels with
/// it, including the configuration it was decided on.
#[derive(Debug, Clone)]
pub struct Consult {
    /// The shared buckets to take one cell in, all or none, in chain order.
    pub buckets: Vec<crate::cluster::Bucket>,
    forward: Outbound,
    pending: Pending,
}

impl Consult {
    /// Where the INVITE came from, and over what.
    pub fn origin(&self) -> (SocketAddr, Transport) {
        (self.pending.source, self.pending.transport)
    }
}

impl PartialEq for Consult {
    fn eq(&self, other: &Self) -> bool {
        self.buckets == other.buckets
            && self.forward == other.forward
            && self.pending.key == other.pending.key
    }
}

impl Eq for Consult {}

#[derive(Debug, Clone)]
struct Pending {
    core: Option<Arc<Core>>,
    ask: Ask,
    /// Stages kept in Redis, and the local ones already taken.
    shared: Stages,
    taken: Stages,
    key: u64,
    target: CompactTarget,
    origin: Origin,
    invite: Bytes,
    source: SocketAddr,
    transport: Transport,
    listener: usize,
    conn: Option<ConnId>,
}

/// What [`Proxy::settle`] decided for a [`Consult`].
#[derive(Debug)]
pub struct Settled {
    /// What to send: the forward, or the refusal.
    pub action: Action,
    /// The failure policy's decision, when Redis gave no answer.
    pub fallback: Option<crate::cluster::Fallback>,
    /// Cells Redis gave that must go back (a later local stage refused): send them with cost −1.
    pub refund: Option<Vec<crate::cluster::Bucket>>,
}

/// A paced INVITE the shell must release at its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedCall {
    /// Its key in the queue.
    pub key: u64,
    /// When its slot comes.
    pub at: Instant,
    /// The `100 Trying` to send at once (stops UDP retransmissions, lets the caller CANCEL).
    pub trying: Outbound,
}

/// Why a message was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a SIP message at all.
    NotSip,
    /// A malformed request that cannot be answered (no usable Via, or an ACK).
    Unanswerable,
    /// A malformed response (never answered, RFC 3261 §16.7).
    BadResponse,
    /// A response whose top Via is not ours (RFC 3261 §16.11).
    ForeignVia,
    /// A response with no Via left after ours.
    NoNextVia,
    /// A destination that must never be sent to (port 0, unspecified, broadcast, multicast,
    /// ourselves).
    UnsafeDestination,
    /// An unsupported transport in the next hop.
    UnsupportedTransport,
    /// A retransmission of an INVITE whose shared-pool decision is under way (the answer to
    /// the first copy is coming).
    Pending,
}

impl DropReason {
    /// Every reason, for metric registration.
    pub const ALL: [DropReason; 8] = [
        Self::NotSip,
        Self::Unanswerable,
        Self::BadResponse,
        Self::ForeignVia,
        Self::NoNextVia,
        Self::UnsafeDestination,
        Self::UnsupportedTransport,
        Self::Pending,
    ];

    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotSip => "not_sip",
            Self::Unanswerable => "unanswerable",
            Self::BadResponse => "bad_response",
            Self::ForeignVia => "foreign_via",
            Self::NoNextVia => "no_next_via",
            Self::UnsafeDestination => "unsafe_destination",
            Self::UnsupportedTransport => "unsupported_transport",
            Self::Pending => "pending",
        }
    }
}

/// One local address as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalListener {
    /// The bound socket address.
    pub bound: SocketAddr,
    /// Host written in Via/Record-Route (IPv6 in brackets).
    pub host: String,
    /// Port written in Via/Record-Route.
    pub port: u16,
    /// UDP served.
    pub udp: bool,
    /// TCP served.
    pub tcp: bool,
}

impl LocalListener {
    /// The host it writes, when that is an IP address.
    fn host_ip(&self) -> Option<IpAddr> {
        self.host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    }

    /// True when `ip` reaches this listener: its bound address, the host it writes (`host_ip`,
    /// from [`LocalListener::host_ip`]: the per-message checks use the copy `Shared` keeps), or,
    /// for a listener bound to every interface, loopback.
    fn is_own_ip_given(&self, host_ip: Option<IpAddr>, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        canonical_ip(self.bound.ip()) == ip
            || (self.bound.ip().is_unspecified() && ip.is_loopback())
            || host_ip.is_some_and(|h| canonical_ip(h) == ip)
    }

    /// True when sending to `a` would reach this listener.
    fn is_self(&self, a: SocketAddr) -> bool {
        self.is_self_given(self.host_ip(), a)
    }

    fn is_self_given(&self, host_ip: Option<IpAddr>, a: SocketAddr) -> bool {
        (a.port() == self.bound.port() || a.port() == self.port)
            && self.is_own_ip_given(host_ip, a.ip())
    }

    fn serves(&self, t: Transport) -> bool {
        match t {
            Transport::Udp => self.udp,
            Transport::Tcp => self.tcp,
            _ => false,
        }
    }
}

/// A configured destination resolved to an address, with its egress listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resolved {
    addr: SocketAddr,
    transport: Transport,
    listener: usize,
}

/// Why the core cannot be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A configured host does not resolve.
    #[error("{what}: cannot resolve {host}:{port}: {reason}")]
    Resolve {
        /// Which target.
        what: String,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Resolver message.
        reason: String,
    },
    /// A configured target is one of our own listeners, or an address never sent to.
    #[error("{what}: {addr} is this proxy itself or an address cpsgate never sends to")]
    SelfTarget {
        /// Which target.
        what: String,
        /// Target address.
        addr: SocketAddr,
    },
    /// No listener can send to a configured target.
    #[error("{what}: no [[listen]] serves {transport} for {addr}")]
    NoListener {
        /// Which target.
        what: String,
        /// Transport needed.
        transport: &'static str,
        /// Target address.
        addr: SocketAddr,
    },
    /// A reload that adds or removes `[cluster]` or changes its servers: the Redis client is
    /// built at start.
    #[error(
        "[cluster] cannot be added, removed or pointed at other servers by a reload (cluster.urls take effect at the next start)"
    )]
    ClusterChanged,
}

/// What outlives a reload: listeners (bound once), hash keys, the draining flag, the decision
/// caches and the limiter's time base.
#[derive(Debug)]
struct Shared {
    listeners: Vec<LocalListener>,
    /// Each listener's written host as an IP address, parsed once.
    listener_ips: Vec<Option<IpAddr>>,
    keys: Keys,
    draining: std::sync::atomic::AtomicBool,
    decisions: BoundedMap<Decision>,
    admitted: BoundedMap<Admitted>,
    dialogs: BoundedMap<Followed>,
    max_call_ns: u64,
    cancels_answered: std::sync::atomic::AtomicU64,
    queue: dashmap::DashMap<u64, Waiting>,
    /// The Redis servers the gate started with (its client is built once).
    cluster_urls: Option<Vec<String>>,
    /// Calls whose shared buckets are being asked in Redis: cancelled meanwhile?, since (ns).
    pending: dashmap::DashMap<u64, (bool, u64)>,
}

impl Shared {
    /// Not a destination we must never send to, and not one of our own listeners.
    fn is_safe(&self, a: SocketAddr) -> bool {
        is_safe_destination(a)
            && !self
                .listeners
                .iter()
                .zip(&self.listener_ips)
                .any(|(l, h)| l.is_self_given(*h, a))
    }
}

/// The stateless proxy core, as seen through one configuration. A reload builds a new one (its
/// buckets carried over by name) and swaps it in; messages in flight finish on the old one.
#[derive(Debug)]
struct Core {
    shared: Arc<Shared>,
    aliases: Vec<String>,
    routes: Routes,
    upstreams: Vec<Resolved>,
    pbx: Option<Resolved>,
    unknown_sources: UnknownSources,
    default_upstream: Option<usize>,
    record_route: bool,
    chain: Arc<Chain>,
    reply_cfg: crate::config::Reply,
    charge_auth_retry: bool,
    trunk_names: Vec<Arc<str>>,
    upstream_names: Vec<Arc<str>>,
    digest: String,
    account_names: Vec<Arc<str>>,
    cluster: Option<ClusterSpec>,
}

/// The buckets of this configuration kept in Redis, and what decides when it does not answer.
#[derive(Debug)]
struct ClusterSpec {
    policy: FailurePolicy,
    instances: u32,
    trunks: Vec<Option<Arc<SharedBucket>>>,
    accounts: Vec<Option<Arc<SharedBucket>>>,
}

/// A bucket kept in Redis: its key and its cluster-wide limit (changed in place by the API).
#[derive(Debug)]
struct SharedBucket {
    key: Arc<str>,
    params: crate::limiter::Params,
}

impl SharedBucket {
    fn bucket(&self) -> crate::cluster::Bucket {
        let (interval, tolerance) = self.params.get();
        // Rounded to the nearest microsecond (truncating would over-admit high rates), and the
        // tolerance kept a whole number of intervals.
        let interval_us = ((interval + 500) / 1000).max(1);
        crate::cluster::Bucket {
            key: self.key.clone(),
            interval_us,
            tolerance_us: interval_us * (tolerance / interval.max(1)),
        }
    }
}

impl ClusterSpec {
    fn new(cfg: &Config) -> Option<Self> {
        let c = cfg.cluster.as_ref()?;
        let bucket = |kind: &str, name: &str, limit: crate::limiter::Limit| {
            Arc::new(SharedBucket {
                key: format!("{}{kind}:{name}", c.key_prefix).into(),
                params: crate::limiter::Params::new(limit),
            })
        };
        Some(Self {
            policy: c.on_failure,
            instances: c.instances,
            trunks: cfg
                .trunks
                .iter()
                .map(|t| t.shared.then(|| bucket("trunk", &t.name, t.limit)))
                .collect(),
            accounts: cfg
                .accounts
                .iter()
                .map(|a| a.shared.then(|| bucket("account", &a.name, a.limit)))
                .collect(),
        })
    }

    /// The stages of `ask` kept in Redis, and their buckets in chain order.
    fn shared(&self, ask: &Ask) -> (Stages, Vec<crate::cluster::Bucket>) {
        let mut stages = Stages::NONE;
        let mut buckets = Vec::new();
        if let First::Trunk(t) = ask.first
            && let Some(b) = &self.trunks[t]
        {
            stages = stages.with(Stage::Trunk);
            buckets.push(b.bucket());
        }
        if let Some(a) = ask.account
            && let Some(b) = &self.accounts[a]
        {
            stages = stages.with(Stage::Account);
            buckets.push(b.bucket());
        }
        (stages, buckets)
    }
}

/// The part of a shared limit one gate enforces on its own while Redis does not answer
/// (`local_share`): the rate ÷ the expected instances, the burst likewise (at least 1).
pub fn local_share(limit: crate::limiter::Limit, instances: u32) -> crate::limiter::Limit {
    let n = instances.max(1);
    crate::limiter::Limit {
        rate: limit.rate / f64::from(n),
        burst: limit.burst.div_ceil(n).max(1),
    }
}

/// How a request is routed after route preprocessing.
enum Hop {
    /// A URI (remaining Route or the Request-URI), the listener named by the last Route entry of
    /// ours that was removed, and that entry's transport when it asked for TCP.
    Uri(Uri, Option<usize>, Option<Transport>),
    /// A configured destination.
    Target(Resolved),
}

/// A local answer short-circuiting the request.
struct Refusal {
    code: u16,
    reason: std::borrow::Cow<'static, str>,
    extra: Vec<(&'static str, String)>,
}

fn trying() -> Refusal {
    Refusal {
        code: 100,
        reason: "Trying".into(),
        extra: Vec::new(),
    }
}

/// The answer to a new call while the gate drains before exit.
const SHUTTING_DOWN: &str = "Service Unavailable (Shutting Down)";

fn shutting_down() -> Refusal {
    refuse(503, SHUTTING_DOWN)
}

fn refuse(code: u16, reason: &'static str) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
        extra: Vec::new(),
    }
}

/// What the decision cache remembers of an initial INVITE for 64·T1 (RFC 3261 §17.2.3 key:
/// top-Via branch and sent-by). Kept small: a flood fills the cache to its cap.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    /// Forwarded there: retransmissions and the CANCEL follow, uncharged.
    Forwarded(CompactTarget),
    /// Refused at this stage: retransmissions get the same answer, the CANCEL a 200.
    Rejected(Stage),
    /// Waiting for its slot (pacing): retransmissions get `100 Trying`, a CANCEL ends it.
    Queued,
    /// Cancelled while waiting: retransmissions get the `487` again, a CANCEL a 200.
    Terminated,
    /// Answered 503 while waiting, at shutdown: retransmissions get it again, a CANCEL a 200.
    ShutDown,
    /// Its shared buckets are being asked in Redis: retransmissions wait for the answer, a
    /// CANCEL is answered and the INVITE then gets 487. Known by `Shared.pending`, never
    /// stored in the decision cache.
    Pending,
}

/// A [`Resolved`] target in 22 bytes.
#[derive(Debug, Clone, Copy)]
struct CompactTarget {
    ip: [u8; 16],
    port: u16,
    v6: bool,
    tcp: bool,
    listener: u16,
}

impl CompactTarget {
    fn from_resolved(r: Resolved) -> Self {
        let (ip, v6) = match r.addr.ip() {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), false),
            IpAddr::V6(v6) => (v6.octets(), true),
        };
        Self {
            ip,
            port: r.addr.port(),
            v6,
            tcp: r.transport == Transport::Tcp,
            listener: r.listener as u16,
        }
    }

    fn resolved(self) -> Resolved {
        let v6 = std::net::Ipv6Addr::from(self.ip);
        let ip = match (self.v6, v6.to_ipv4_mapped()) {
            (false, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        Resolved {
            addr: SocketAddr::new(ip, self.port),
            transport: if self.tcp {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            listener: usize::from(self.listener),
        }
    }
}

#[derive(Debug)]
struct Decision {
    /// Nanoseconds since the limiter epoch: fine-grained, so a full cache evicts by count, not
    /// whole seconds at a time.
    expires: u64,
    verdict: Verdict,
}

impl Expiring for Decision {
    fn expires(&self) -> u64 {
        self.expires
    }
}

/// An admitted call followed until it ends, for ASR and ACD.
#[derive(Debug)]
struct Followed {
    /// Until answered: the arrival plus Timer C (RFC 3261 §16.6 step 11, 3 minutes); once
    /// answered: the arrival plus `usage.max_call_secs`.
    expires: std::sync::atomic::AtomicU64,
    arrived: u64,
    /// Nanoseconds since the epoch + 1 when answered; 0 before.
    answered_at: std::sync::atomic::AtomicU64,
    trunk: Arc<crate::limiter::KeyStats>,
    account: Option<Arc<crate::limiter::KeyStats>>,
}

impl Followed {
    fn each(&self, f: impl Fn(&crate::limiter::KeyStats)) {
        f(&self.trunk);
        if let Some(a) = &self.account {
            f(a);
        }
    }
}

impl Expiring for Followed {
    fn expires(&self) -> u64 {
        self.expires.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A paced INVITE waiting for its slot.
#[derive(Debug)]
struct Waiting {
    since: u64,
    at: u64,
    /// Its entry in the followed calls (ASR/ACD), forgotten if it never reaches the carrier.
    dialog: Option<u64>,
    forward: Outbound,
    /// The INVITE as received, for the 487 or 503 that may answer it instead.
    invite: Bytes,
    source: SocketAddr,
    transport: Transport,
    listener: usize,
    conn: Option<ConnId>,
    target: Resolved,
    /// The chain it reserved in, and the cells it took, to give the slot back.
    chain: Arc<Chain>,
    ask: Ask,
    taken: Vec<(crate::limiter::Stage, (u64, u64))>,
    trunk: Arc<crate::limiter::KeyStats>,
    account: Option<Arc<crate::limiter::KeyStats>>,
}

/// RFC 3261 Timer C: a proxy gives up on an INVITE with no final answer after 3 minutes.
const TIMER_C: Duration = Duration::from_secs(180);

/// How long a decision is remembered: 64·T1 (RFC 3261 §17.1.1.2 Timer B).
const DECISION_TTL: Duration = Duration::from_secs(32);

/// Which kind of bucket [`Proxy::set_limit`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// A trunk's own limit.
    Trunk,
    /// An account's pool.
    Account,
}

/// No trunk or account has that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no such trunk or account")]
pub struct UnknownName;

/// One trunk's or account's limit and counters.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyView {
    /// Name.
    pub name: String,
    /// Calls per second.
    pub rate: f64,
    /// Burst cells.
    pub burst: u32,
    /// Cells that could go back to back now (not known here for a bucket kept in Redis).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available: Option<u32>,
    /// Kept in Redis, one limit for every gate (`rate` and `burst` are the cluster-wide
    /// ones; this gate's own share applies only while Redis does not answer).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Calls admitted in the last whole second.
    pub cps: u64,
    /// Calls admitted since start.
    pub admitted: u64,
    /// Calls refused, by stage (stages with none left out).
    pub rejected: std::collections::BTreeMap<&'static str, u64>,
    /// The traffic profile: per-second peaks, ASR, ACD, short calls.
    pub usage: crate::limiter::Usage,
    /// Paced calls waiting now.
    pub waiting: u64,
    /// Paced calls ever queued.
    pub queued: u64,
    /// Pacing delays of released calls, per bucket of `limiter::QUEUE_DELAY_BOUNDS_MS`
    /// (not cumulative; the last is above them all).
    pub queue_delays: Vec<u64>,
}

/// A trunk as the admin API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrunkView {
    /// Parent account.
    pub account: Option<String>,
    /// Carrier it sends to.
    pub upstream: String,
    /// Limit and counters.
    #[serde(flatten)]
    pub limits: KeyView,
}

/// The state of every limit at one instant.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Snapshot {
    /// Digest of the configuration text in force.
    pub digest: String,
    /// Trunks in config order.
    pub trunks: Vec<TrunkView>,
    /// Accounts in config order.
    pub accounts: Vec<KeyView>,
    /// Bounded tables.
    pub tables: TableSizes,
    /// True once a shutdown has started.
    pub draining: bool,
}

/// (entries, cap, evicted so far) of each bounded table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TableSizes {
    /// Per-source buckets.
    pub sources: (usize, usize, u64),
    /// Per-username buckets, when configured.
    pub usernames: Option<(usize, usize, u64)>,
    /// The decision cache.
    pub decisions: (usize, usize, u64),
    /// Calls followed for ASR and ACD.
    pub dialogs: (usize, usize, u64),
}

/// A call refused by a limit: what the shell logs and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The stage that refused.
    pub stage: Stage,
    /// The trunk, when the call was on one.
    pub trunk: Option<Arc<str>>,
    /// The trunk's account, when it has one.
    pub account: Option<Arc<str>>,
    /// When the refusing stage would admit.
    pub retry_after: Duration,
    /// True for a retransmission answered from the decision cache (nothing was charged).
    pub retransmission: bool,
    /// The Call-ID.
    pub call_id: String,
    /// The SIP username, if any.
    pub username: Option<String>,
}

/// The decision core behind a swappable configuration: `handle(now, inbound) -> Action`.
#[derive(Debug)]
pub struct Proxy {
    core: arc_swap::ArcSwap<Core>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Build the core from a validated config and the bound listeners. Configured host names are
    /// resolved here, once per (re)load.
    pub fn new(cfg: &Config, listeners: Vec<LocalListener>) -> Result<Self, BuildError> {
        Self::new_at(cfg, listeners, Instant::now())
    }

    /// [`Proxy::new`] with an explicit start of the limiter's time base (tests use hand-set
    /// instants after it).
    pub fn new_at(
        cfg: &Config,
        listeners: Vec<LocalListener>,
        start: Instant,
    ) -> Result<Self, BuildError> {
        let keys = Keys::new(cfg.proxy.secret.as_deref());
        let shared = Arc::new(Shared {
            listener_ips: listeners.iter().map(LocalListener::host_ip).collect(),
            listeners,
            keys,
            draining: std::sync::atomic::AtomicBool::new(false),
            decisions: BoundedMap::new(cfg.limits.decision_cache_size),
            admitted: BoundedMap::new(cfg.limits.decision_cache_size),
            dialogs: BoundedMap::new(cfg.usage.dialog_table_size),
            max_call_ns: cfg.usage.max_call_secs * 1_000_000_000,
            cancels_answered: std::sync::atomic::AtomicU64::new(0),
            queue: dashmap::DashMap::new(),
            cluster_urls: cfg.cluster.as_ref().map(|c| c.urls.clone()),
            pending: dashmap::DashMap::new(),
        });
        let chain = Arc::new(Chain::new(&chain_spec(cfg), Epoch::new(start)));
        let core = Core::build(cfg, shared.clone(), chain)?;
        Ok(Self {
            core: arc_swap::ArcSwap::from_pointee(core),
            shared,
        })
    }

    /// Apply a new configuration: routes, targets and limits change; buckets of trunks and
    /// accounts that keep their name keep their state (the cells used stay used, the rate and
    /// burst change in place); new ones start full. Listeners and the hash secret are fixed at
    /// start. On error nothing changes.
    pub fn reload(&self, cfg: &Config, now: Instant) -> Result<(), BuildError> {
        if cfg.cluster.as_ref().map(|c| &c.urls) != self.shared.cluster_urls.as_ref() {
            return Err(BuildError::ClusterChanged);
        }
        let old = self.core.load();
        // Everything that can fail (name resolution, listener fit) first, on the old chain;
        // only then are the live buckets rescaled.
        let probe = Core::build(cfg, self.shared.clone(), old.chain.clone())?;
        let chain = Arc::new(old.chain.reload(&chain_spec(cfg), now));
        self.core.store(Arc::new(Core { chain, ..probe }));
        Ok(())
    }

    /// Decide what to do with one message. `now` is the instant of arrival; admission control
    /// reads it, nothing else does.
    pub fn handle(&self, now: Instant, inb: &Inbound<'_>) -> Action {
        let core = self.core.load();
        let mut action = core.handle(now, inb);
        if let Action::Consult(c) = &mut action {
            // Finished on the configuration it was decided on, even across a reload.
            c.pending.core = Some(Arc::clone(&core));
        }
        action
    }

    /// Finish a call handed out as [`Action::Consult`] once Redis has answered (or not): the
    /// forward, or the refusal naming the stage, with the decision cache and counters updated.
    /// When Redis gave no answer the failure policy decides: `local_share` takes a cell from
    /// this gate's share of each shared bucket, `open` admits, `closed` refuses.
    pub fn settle(&self, c: Consult, outcome: crate::cluster::Outcome, now: Instant) -> Settled {
        let core = match &c.pending.core {
            Some(core) => core.clone(),
            None => self.core.load_full(),
        };
        core.settle(c, outcome, now)
    }

    /// The answer to a request the gate forwarded but could not deliver (an outbound
    /// connection refused or timed out): `code` goes back to the previous hop as if the next
    /// hop had answered (RFC 3261 §16.9: a transport error counts as a 503), with the To-tag
    /// the gate gives its own answers, so the ACK of it is absorbed here. `None` for what needs
    /// no answer: responses, ACKs, and messages without our Via on top.
    pub fn undeliverable(
        &self,
        now: Instant,
        forwarded: &[u8],
        code: u16,
        reason: &str,
    ) -> Option<Action> {
        let core = self.core.load();
        let msg = Message::scan(forwarded).ok()?;
        if msg.is_response() || msg.method() == Some(b"ACK".as_slice()) {
            return None;
        }
        let vias = elements(&msg, HeaderName::Via);
        let ours = Via::parse(forwarded, vias.first()?.value.clone()).ok()?;
        if vias.len() < 2 || !core.is_our_via(forwarded, &ours) {
            return None;
        }
        // The request as the previous hop sent it (its Via with received/rport as we marked
        // it): the To-tag is the one the gate would give it, and its ACK finds it.
        let mut e = Edits::new();
        remove_element(&msg, &vias, 0, &mut e);
        let original = e.apply(forwarded, msg.body_range().end);
        let orig = Message::scan(&original).ok()?;
        let orig_top = top_via(&orig)?;
        let tag = core.to_tag(&orig, &orig_top);
        let answer = build_response(
            &msg,
            &Edits::new(),
            &ResponseSpec {
                code,
                reason,
                to_tag: &tag,
                extra: &[],
            },
        );
        let answer = Message::scan(&answer).ok()?;
        // Back the way a real answer goes: our Via popped, to the Via below it.
        match core.route_response(now, &answer) {
            Action::Forward(out) => Some(Action::Reply(code, out)),
            _ => None,
        }
    }

    /// Answer a request that could not be taken whole (see [`Core::refuse_raw`]).
    pub fn refuse_raw(&self, inb: &Inbound<'_>, code: u16, reason: &str) -> Action {
        self.core.load().refuse_raw(inb, code, reason)
    }

    /// The local listeners.
    pub fn listeners(&self) -> &[LocalListener] {
        &self.shared.listeners
    }

    /// True when a destination may be used (see [`Core::is_safe`]).
    pub fn is_safe(&self, a: SocketAddr) -> bool {
        self.shared.is_safe(a)
    }

    /// Turn away new calls from now on (503), while relaying everything else: the first step of
    /// a graceful stop.
    pub fn start_draining(&self) {
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The admission chain of the current configuration.
    pub fn chain(&self) -> Arc<Chain> {
        self.core.load().chain.clone()
    }

    /// The slot of a paced INVITE has come: take it out of the queue and return it to send
    /// (`None` when a CANCEL took it first).
    pub fn release(&self, key: u64, now: Instant) -> Option<Outbound> {
        let core = self.core.load();
        let now_ns = core.chain.epoch().ns(now);
        let (_, w) = self.shared.queue.remove(&key)?;
        w.trunk.dequeued(now_ns.saturating_sub(w.since), true);
        w.trunk.admitted_at(now_ns);
        if let Some(a) = &w.account {
            a.admitted_at(now_ns);
        }
        self.shared.decisions.insert(
            key,
            now_ns,
            Decision {
                expires: now_ns.saturating_add(DECISION_TTL.as_nanos() as u64),
                verdict: Verdict::Forwarded(CompactTarget::from_resolved(w.target)),
            },
        );
        Some(w.forward)
    }

    /// On shutdown: every waiting call whose slot comes after `deadline` is answered `503` now
    /// (never silently lost); those due by then stay for their timers. Returns the answers.
    pub fn flush_queue(&self, now: Instant, deadline: Instant) -> Vec<Outbound> {
        let core = self.core.load();
        let now_ns = core.chain.epoch().ns(now);
        let until = core.chain.epoch().ns(deadline);
        let late: Vec<u64> = self
            .shared
            .queue
            .iter()
            .filter(|e| e.value().at > until)
            .map(|e| *e.key())
            .collect();
        late.into_iter()
            .filter_map(|key| core.end_waiting(key, now_ns, Verdict::ShutDown, 503, SHUTTING_DOWN))
            .collect()
    }

    /// Calls waiting for their slot now.
    pub fn queue_len(&self) -> usize {
        self.shared.queue.len()
    }

    /// CANCELs of refused INVITEs answered here (never forwarded).
    pub fn cancels_answered(&self) -> u64 {
        self.shared
            .cancels_answered
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Entries in the decision cache.
    pub fn decision_cache_len(&self) -> usize {
        self.shared.decisions.len()
    }

    /// Forget every entry that no longer matters at `now`: full per-source and per-username
    /// buckets, decisions older than 64·T1. Returns the table sizes after the sweep.
    pub fn sweep(&self, now: Instant) -> TableSizes {
        let core = self.core.load();
        let ns = core.chain.epoch().ns(now);
        core.chain.sources().table().sweep(ns);
        if let Some(u) = core.chain.usernames() {
            u.table().sweep(ns);
        }
        self.shared.decisions.sweep(ns);
        self.shared.admitted.sweep(ns);
        // Settled within the decision timeout; anything older lost its task (shutdown).
        let ttl = DECISION_TTL.as_nanos() as u64;
        self.shared
            .pending
            .retain(|_, (_, since)| ns.saturating_sub(*since) < ttl);
        // A followed call that reached Timer C without a final answer failed (a carrier that
        // never answers must not leave ASR at 100 %).
        self.shared.dialogs.sweep_with(ns, |d| {
            if d.answered_at.load(std::sync::atomic::Ordering::Acquire) == 0 {
                d.each(|s| s.failed());
            }
        });
        self.table_sizes()
    }

    /// Sizes, caps and evictions of the bounded tables.
    pub fn table_sizes(&self) -> TableSizes {
        let core = self.core.load();
        let sources = core.chain.sources().table();
        let usernames = core.chain.usernames().map(|u| u.table());
        TableSizes {
            sources: (sources.len(), sources.cap(), sources.evicted()),
            usernames: usernames.map(|t| (t.len(), t.cap(), t.evicted())),
            decisions: (
                self.shared.decisions.len(),
                self.shared.decisions.cap(),
                self.shared.decisions.evicted(),
            ),
            dialogs: (
                self.shared.dialogs.len(),
                self.shared.dialogs.cap(),
                self.shared.dialogs.evicted(),
            ),
        }
    }

    /// What the admin API shows: every trunk and account with its limit, what it has left, the
    /// calls it admitted in the last second and its counters.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let core = self.core.load();
        let ns = core.chain.epoch().ns(now);
        let view = |k: &crate::limiter::Keyed, shared: Option<&Arc<SharedBucket>>| KeyView {
            name: k.name.clone(),
            rate: shared.map_or(k.bucket.limit(), |b| b.params.limit()).rate,
            burst: shared.map_or(k.bucket.limit(), |b| b.params.limit()).burst,
            available: shared.is_none().then(|| k.bucket.available(now)),
            shared: shared.is_some(),
            cps: k.stats.cps(ns),
            admitted: k.stats.admitted(),
            usage: k.stats.usage(ns),
            waiting: k.stats.waiting(),
            queued: k.stats.queued_total(),
            queue_delays: k.stats.queue_delays(),
            rejected: Stage::ALL
                .iter()
                .map(|s| (s.as_str(), k.stats.rejected(*s)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        };
        Snapshot {
            digest: core.digest.clone(),
            trunks: core
                .chain
                .trunks()
                .iter()
                .zip(core.routes.trunks())
                .enumerate()
                .map(|(i, (k, t))| TrunkView {
                    account: t.account.map(|a| core.account_names[a].to_string()),
                    upstream: core.upstream_names[t.upstream].to_string(),
                    limits: view(k, core.shared_bucket(LimitKind::Trunk, i)),
                })
                .collect(),
            accounts: core
                .chain
                .accounts()
                .iter()
                .enumerate()
                .map(|(i, k)| view(k, core.shared_bucket(LimitKind::Account, i)))
                .collect(),
            tables: self.table_sizes(),
            draining: self
                .shared
                .draining
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Change a trunk's or account's rate and burst in place, until the next reload (which
    /// sets the configured values again). The cells used stay used.
    pub fn set_limit(
        &self,
        kind: LimitKind,
        name: &str,
        limit: crate::limiter::Limit,
        now: Instant,
    ) -> Result<(), UnknownName> {
        let core = self.core.load();
        let list = match kind {
            LimitKind::Trunk => core.chain.trunks(),
            LimitKind::Account => core.chain.accounts(),
        };
        let i = list
            .iter()
            .position(|k| k.name == name)
            .ok_or(UnknownName)?;
        // A shared bucket: the cluster-wide limit this gate asks Redis for (each gate has its
        // own; set it on every one), and the local share.
        match (core.shared_bucket(kind, i), &core.cluster) {
            (Some(b), Some(c)) => {
                b.params.set(limit);
                list[i].bucket.rescale(now, local_share(limit, c.instances));
            }
            _ => list[i].bucket.rescale(now, limit),
        }
        Ok(())
    }

    /// A trunk's or account's limit: the cluster-wide one for a bucket kept in Redis.
    pub fn limit(&self, kind: LimitKind, name: &str) -> Option<crate::limiter::Limit> {
        let core = self.core.load();
        let list = match kind {
            LimitKind::Trunk => core.chain.trunks(),
            LimitKind::Account => core.chain.accounts(),
        };
        let i = list.iter().position(|k| k.name == name)?;
        Some(
            core.shared_bucket(kind, i)
                .map_or(list[i].bucket.limit(), |b| b.params.limit()),
        )
    }

    /// The `;cg=` dialog mark our Record-Route carries for this message's Call-ID.
    pub fn dialog_mark(&self, msg: &Message<'_>) -> String {
        self.core.load().dialog_mark(msg).as_str().to_owned()
    }
}

impl Core {
    fn build(cfg: &Config, shared: Arc<Shared>, chain: Arc<Chain>) -> Result<Self, BuildError> {
        let listeners = &shared.listeners;
        let resolve = |what: String, t: &Target| -> Result<Resolved, BuildError> {
            let addrs = resolve_target(t).map_err(|reason| BuildError::Resolve {
                what: what.clone(),
                host: t.host.clone(),
                port: t.port,
                reason,
            })?;
            let listener_for = |addr: SocketAddr| {
                let fits = |l: &LocalListener| {
                    l.serves(t.transport) && l.bound.is_ipv4() == addr.is_ipv4()
                };
                match t.listener {
                    Some(i) => Some(i).filter(|&i| listeners.get(i).is_some_and(fits)),
                    None => listeners.iter().position(fits),
                }
            };
            // A name may resolve to several families: take the first address a listener can
            // reach.
            let addr = addrs
                .iter()
                .copied()
                .find(|&a| listener_for(a).is_some())
                .unwrap_or(addrs[0]);
            if !is_safe_destination(addr) || listeners.iter().any(|l| l.is_self(addr)) {
                return Err(BuildError::SelfTarget { what, addr });
            }
            let listener = listener_for(addr).ok_or(BuildError::NoListener {
                what,
                transport: t.transport.as_via(),
                addr,
            })?;
            Ok(Resolved {
                addr,
                transport: t.transport,
                listener,
            })
        };
        let upstreams = cfg
            .upstreams
            .iter()
            .map(|u| resolve(format!("upstream {}", u.name), &u.target))
            .collect::<Result<Vec<_>, _>>()?;
        let pbx = cfg
            .pbx
            .as_ref()
            .map(|p| resolve("pbx".to_owned(), p))
            .transpose()?;
        Ok(Self {
            aliases: cfg.proxy.aliases.clone(),
            routes: Routes::new(cfg),
            upstreams,
            pbx,
            unknown_sources: cfg.proxy.unknown_sources,
            default_upstream: cfg.proxy.default_upstream,
            record_route: cfg.proxy.record_route,
            shared,
            chain,
            reply_cfg: cfg.reply.clone(),
            charge_auth_retry: cfg.limits.charge_auth_retry,
            upstream_names: cfg
                .upstreams
                .iter()
                .map(|u| Arc::from(u.name.as_str()))
                .collect(),
            digest: cfg.digest.clone(),
            trunk_names: cfg
                .trunks
                .iter()
                .map(|t| Arc::from(t.name.as_str()))
                .collect(),
            account_names: cfg
                .accounts
                .iter()
                .map(|a| Arc::from(a.name.as_str()))
                .collect(),
            cluster: ClusterSpec::new(cfg),
        })
    }

    /// True for an OPTIONS whose Request-URI is the gate itself (no user part, no Route left
    /// to follow).
    fn is_options_for_us(&self, buf: &[u8], req: &RequestView, ruri: &Uri) -> bool {
        req.method == Method::Options
            && req.routes.is_empty()
            && req.to_tag(buf).is_none()
            && ruri.user.is_none()
            && self.is_us(buf, ruri).is_some()
    }

    fn handle(&self, now: Instant, inb: &Inbound<'_>) -> Action {
        let msg = match Message::scan(inb.data) {
            Ok(m) => m,
            Err(_) => return Action::Drop(DropReason::NotSip),
        };
        if msg.is_response() {
            self.route_response(now, &msg)
        } else {
            self.route_request(now, &msg, inb)
        }
    }

    /// Answer a request that could not be taken whole (malformed, oversize, unframeable) with
    /// `code`, from what can be read of it; ACKs (§17.2.1), responses (§16.7) and messages with
    /// no Via at all are dropped instead.
    pub fn refuse_raw(&self, inb: &Inbound<'_>, code: u16, reason: &str) -> Action {
        let Ok(msg) = Message::scan(inb.data) else {
            return Action::Drop(DropReason::NotSip);
        };
        // The first token decides even when the start line is malformed (`ACK  sip:x`).
        let first_token = msg.buf()[msg.start_line_range()]
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default();
        if msg.is_response() || first_token == b"ACK" || msg.first(HeaderName::Via).is_none() {
            return Action::Drop(DropReason::Unanswerable);
        }
        self.reply_with(&msg, top_via(&msg).as_ref(), inb, code, reason)
    }

    fn route_request(&self, now: Instant, msg: &Message<'_>, inb: &Inbound<'_>) -> Action {
        let buf = msg.buf();
        // RFC 3261 §8.2.2 / §16.3 step 1: a syntax problem earns a 400 naming it.
        if let Some(d) = msg.defect() {
            return self.refuse_raw(inb, 400, d.reason());
        }
        let req = match RequestView::parse(msg) {
            Ok(r) => r,
            Err(e) => return self.refuse_raw(inb, 400, &format!("Bad Request ({e})")),
        };
        let ruri = match self.validate(msg, &req) {
            Ok(u) => u,
            // §17.2.1: an ACK is never answered.
            Err(_) if req.method == Method::Ack => return Action::Drop(DropReason::Unanswerable),
            Err(r) => return self.reply(msg, &req, inb, r),
        };
        // RFC 3261 §8.2.7/§17.2.1: the ACK for a final response we generated ends here. Our To-tag
        // is a keyed hash of the transaction, so no state is needed to recognise it.
        if req.method == Method::Ack
            && req.to_tag(buf) == Some(self.to_tag(msg, &req.top_via).as_bytes())
        {
            return Action::Absorb;
        }
        // RFC 3261 §11: an OPTIONS addressed to the gate itself (a carrier's keep-alive ping) is
        // answered here, for known peers.
        if self.is_options_for_us(buf, &req, &ruri) {
            let known = !matches!(self.origin(msg, &req, inb), Origin::Unknown);
            let answer = if known || self.unknown_sources == UnknownSources::Forward {
                refuse(200, "OK")
            } else {
                refuse(403, "Forbidden")
            };
            return self.reply(msg, &req, inb, answer);
        }
        // While draining before exit, new calls are turned away so the PBX tries another gate;
        // everything that belongs to existing calls still passes.
        // A retransmission of an INVITE decided before (forwarded, or waiting for its slot) is
        // not a new call: it gets what its first copy got.
        if self
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
            && req.method.creates_dialog()
            && req.to_tag(buf).is_none()
            && !self.known_transaction(now, msg, &req)
        {
            return self.reply(msg, &req, inb, shutting_down());
        }
        // The forward's edits; the top Via's `received`/`rport` join them once the request is
        // known to go on (an answer made here derives its own from the request).
        let mut edits = Edits::new();
        let (mut hop, origin) = match self.next_hop(msg, &req, inb, ruri, &mut edits) {
            Ok(h) => h,
            // §17.2.1: an ACK is never answered.
            Err(_) if req.method == Method::Ack => return Action::Drop(DropReason::Unanswerable),
            Err(r) => return self.reply(msg, &req, inb, r),
        };
        // A BYE that will be forwarded ends a followed call (ACD).
        if req.method == Method::Bye {
            self.follow_bye(now, msg);
        }
        // Admission: initial INVITEs only; the decision cache answers retransmissions, and sends
        // a CANCEL and the ACK of a failed INVITE where the INVITE went.
        let initial_invite = req.method == Method::Invite && req.to_tag(buf).is_none();
        let mut paced = None;
        let mut consult = None;
        if (initial_invite || matches!(req.method, Method::Cancel | Method::Ack))
            && let Some(done) = self.admit(
                now,
                msg,
                &req,
                inb,
                origin,
                &mut hop,
                &mut paced,
                &mut consult,
            )
        {
            return done;
        }
        add_received(&mut edits, &req.top_via, inb.source);
        // A configured target's transport is the operator's choice; a URI without `transport`
        // leaves it to us (RFC 3261 §18.1.1).
        let mut transport_chosen = true;
        let hop_target = match &hop {
            Hop::Target(t) => Some(CompactTarget::from_resolved(*t)),
            Hop::Uri(..) => None,
        };
        let (to, mut transport, egress) = match hop {
            Hop::Target(t) => (NextHop::Addr(t.addr), t.transport, t.listener),
            Hop::Uri(uri, named_egress, recorded) => {
                match self.uri_destination(buf, &uri, named_egress, recorded) {
                    Ok(d) => {
                        transport_chosen = uri.transport(buf).is_some() || recorded.is_some();
                        d
                    }
                    Err(_) if req.method == Method::Ack => {
                        return Action::Drop(DropReason::UnsupportedTransport);
                    }
                    Err(r) => return self.reply(msg, &req, inb, r),
                }
            }
        };
        // A slot booked (or cells taken) for a call that goes nowhere is given back, and the
        // call not followed.
        let unbook = |paced: Option<(crate::limiter::Reservation, Ask)>,
                      consult: Option<(Ask, Stages, Stages)>| {
            if let Some((booked, ask)) = &paced {
                self.chain.release(ask, &booked.taken);
            }
            if let Some((ask, _, taken)) = &consult {
                self.chain.refund_stages(ask, *taken);
                self.shared.pending.remove(&self.transaction_hash(
                    DECISION_LABEL,
                    msg,
                    &req.top_via,
                ));
            }
            if (paced.is_some() || consult.is_some()) && self.record_route {
                self.shared.dialogs.remove(self.dialog_key(msg));
            }
        };
        if let NextHop::Addr(a) = &to
            && !self.is_safe(*a)
        {
            unbook(paced, consult);
            return Action::Drop(DropReason::UnsafeDestination);
        }
        // Sending a request straight back to where it came from is a loop (§16.3 step 4).
        if to == NextHop::Addr(inb.source) && req.method != Method::Ack {
            unbook(paced, consult);
            return self.reply(msg, &req, inb, refuse(482, "Loop Detected"));
        }
        // RFC 3261 §18.1.1: a request larger than 1300 bytes (path MTU unknown) MUST go over a
        // congestion-controlled transport when the next hop did not fix the transport — only on
        // the same interface: another one may not reach the next hop. Our additions stay well
        // under 600 bytes: only a message near the limit that could move to TCP keeps a copy of
        // the edits for that rewrite.
        let may_move =
            transport == Transport::Udp && !transport_chosen && self.shared.listeners[egress].tcp;
        let unrewritten = (may_move && buf.len() + 600 > UDP_SIZE_LIMIT).then(|| edits.clone());
        self.rewrite_request(msg, &req, inb, &mut edits, transport, egress);
        let mut data = edits.apply(buf, msg.body_range().end);
        let mut fallback = None;
        if let Some(mut e) = unrewritten
            && data.len() > UDP_SIZE_LIMIT
        {
            // §18.1.1: when the connection cannot be made, the UDP version is sent instead.
            fallback = Some((egress, data));
            transport = Transport::Tcp;
            self.rewrite_request(msg, &req, inb, &mut e, transport, egress);
            data = e.apply(buf, msg.body_range().end);
        }
        let forward = Outbound {
            to,
            transport,
            listener: egress,
            conn: None,
            data,
            udp_fallback: fallback,
        };
        if let Some((ask, shared, taken)) = consult {
            // Only a call sent to a configured target is admitted (`admit` returns early for
            // any other hop), so there is always one here.
            let Some(target) = hop_target else {
                unbook(None, Some((ask, shared, taken)));
                return Action::Drop(DropReason::Unanswerable);
            };
            let buckets = self
                .cluster
                .as_ref()
                .map(|c| c.shared(&ask).1)
                .unwrap_or_default();
            return Action::Consult(Box::new(Consult {
                buckets,
                forward,
                pending: Pending {
                    core: None,
                    ask,
                    shared,
                    taken,
                    key: self.transaction_hash(DECISION_LABEL, msg, &req.top_via),
                    target,
                    origin,
                    invite: Bytes::copy_from_slice(inb.data),
                    source: inb.source,
                    transport: inb.transport,
                    listener: inb.listener,
                    conn: inb.conn,
                },
            }));
        }
        match paced {
            None => Action::Forward(forward),
            Some((booked, ask)) => self.enqueue(now, msg, &req, inb, forward, booked, ask),
        }
    }

    /// Put a paced INVITE in the queue and answer `100 Trying` (RFC 3261 §17.2.1: a stateful
    /// element answers an INVITE it will not answer within 200 ms).
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        now: Instant,
        msg: &Message<'_>,
        req: &RequestView,
        inb: &Inbound<'_>,
        forward: Outbound,
        booked: crate::limiter::Reservation,
        ask: Ask,
    ) -> Action {
        let wait = booked.wait;
        let now_ns = self.chain.epoch().ns(now);
        let key = self.transaction_hash(DECISION_LABEL, msg, &req.top_via);
        let First::Trunk(t) = ask.first else {
            unreachable!("only trunks pace");
        };
        let target = match &forward.to {
            NextHop::Addr(a) => Resolved {
                addr: *a,
                transport: forward.transport,
                listener: forward.listener,
            },
            NextHop::Name { .. } => unreachable!("initial requests go to configured targets"),
        };
        let at = now_ns + u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        let (_, trying) = self.answer(msg, req, inb, &trying());
        let slot = match self.shared.queue.entry(key) {
            // A copy of it is already waiting (a retransmission that raced the first): one
            // slot is enough.
            dashmap::Entry::Occupied(_) => {
                self.chain.release(&ask, &booked.taken);
                return Action::Reply(100, trying);
            }
            dashmap::Entry::Vacant(slot) => slot,
        };
        let trunk = self.chain.trunks()[t].stats.clone();
        trunk.queued();
        let entry = slot.insert(Waiting {
            since: now_ns,
            at,
            dialog: self.record_route.then(|| self.dialog_key(msg)),
            forward,
            invite: Bytes::copy_from_slice(msg.buf()),
            source: inb.source,
            transport: inb.transport,
            listener: inb.listener,
            conn: inb.conn,
            target,
            chain: self.chain.clone(),
            ask,
            taken: booked.taken,
            trunk,
            account: ask.account.map(|a| self.chain.accounts()[a].stats.clone()),
        });
        // Remembered until well past its slot (max_delay may exceed 64·T1); written while the
        // entry is still held, so a CANCEL or the shutdown flush, which remove the entry
        // before they write their own verdict, always come after this one.
        self.shared.decisions.insert(
            key,
            now_ns,
            Decision {
                expires: at.saturating_add(DECISION_TTL.as_nanos() as u64),
                verdict: Verdict::Queued,
            },
        );
        drop(entry);
        Action::Queue(QueuedCall {
            key,
            at: now + wait,
            trying,
        })
    }

    /// Take a waiting call out of the queue for CANCEL: its slot goes back, and the 487 for
    /// the INVITE is returned. `None` when it already left.
    fn cancel_waiting(&self, key: u64, now_ns: u64) -> Option<Outbound> {
        self.end_waiting(key, now_ns, Verdict::Terminated, 487, "Request Terminated")
    }

    /// A waiting call leaves the queue without reaching the carrier: its cells go back (if
    /// nothing is booked behind them), it is counted and no longer followed, `verdict` answers
    /// its retransmissions and CANCEL, and the answer to the INVITE is returned. `None` when
    /// it already left.
    fn end_waiting(
        &self,
        key: u64,
        now_ns: u64,
        verdict: Verdict,
        code: u16,
        reason: &'static str,
    ) -> Option<Outbound> {
        let (_, w) = self.shared.queue.remove(&key)?;
        w.chain.release(&w.ask, &w.taken);
        w.trunk.dequeued(now_ns.saturating_sub(w.since), false);
        if let Some(d) = w.dialog {
            self.shared.dialogs.remove(d);
        }
        self.shared.decisions.insert(
            key,
            now_ns,
            Decision {
                expires: now_ns.saturating_add(DECISION_TTL.as_nanos() as u64),
                verdict,
            },
        );
        self.answer_waiting(&w, code, reason)
    }

    /// Whether this request's transaction was decided before (its retransmissions get what the
    /// first copy got).
    fn known_transaction(&self, now: Instant, msg: &Message<'_>, req: &RequestView) -> bool {
        let key = self.transaction_hash(DECISION_LABEL, msg, &req.top_via);
        self.shared.queue.contains_key(&key)
            || self.shared.pending.contains_key(&key)
            || self
                .shared
                .decisions
                .get(key, self.chain.epoch().ns(now), |d| d.verdict)
                .is_some()
    }

    /// The Redis bucket of trunk or account `i`, when it is shared.
    fn shared_bucket(&self, kind: LimitKind, i: usize) -> Option<&Arc<SharedBucket>> {
        let c = self.cluster.as_ref()?;
        match kind {
            LimitKind::Trunk => c.trunks.get(i)?.as_ref(),
            LimitKind::Account => c.accounts.get(i)?.as_ref(),
        }
    }

    /// The key of a call attempt across its auth retries: Call-ID and From-tag.
    fn attempt_key(&self, msg: &Message<'_>, req: &RequestView) -> u64 {
        self.shared.keys.attempt(msg, req)
    }

    /// The second half of admission for a call with shared buckets (see [`Proxy::settle`]).
    /// The call's `pending` entry stays locked until its verdict is written, so a CANCEL either
    /// finds it still pending (and this answers the INVITE 487) or finds the verdict.
    fn settle(&self, c: Consult, outcome: crate::cluster::Outcome, now: Instant) -> Settled {
        use dashmap::mapref::entry::Entry;
        let entry = self.shared.pending.entry(c.pending.key);
        let cancelled = matches!(&entry, Entry::Occupied(e) if e.get().0);
        let settled = if cancelled {
            self.terminate(c, outcome, now)
        } else {
            self.decide(c, outcome, now)
        };
        if let Entry::Occupied(e) = entry {
            e.remove();
        }
        settled
    }

    /// Answer a call that asked Redis and was not admitted, from its stored bytes; it is not
    /// followed, and gets no free auth retries.
    fn answer_unadmitted(
        &self,
        p: &Pending,
        answer: impl FnOnce(&Message<'_>, &RequestView, &Inbound<'_>) -> Action,
    ) -> Action {
        let inb = Inbound {
            data: &p.invite,
            source: p.source,
            transport: p.transport,
            listener: p.listener,
            conn: p.conn,
        };
        let Ok(msg) = Message::scan(&p.invite) else {
            return Action::Drop(DropReason::NotSip);
        };
        let Ok(req) = RequestView::parse(&msg) else {
            return Action::Drop(DropReason::Unanswerable);
        };
        if self.record_route {
            self.shared.dialogs.remove(self.dialog_key(&msg));
        }
        self.shared.admitted.remove(self.attempt_key(&msg, &req));
        answer(&msg, &req, &inb)
    }

    /// A call cancelled while Redis was asked: its cells go back (Redis's too, when it gave
    /// them) and the INVITE is answered 487 (RFC 3261 §9.2).
    fn terminate(&self, c: Consult, outcome: crate::cluster::Outcome, now: Instant) -> Settled {
        let p = c.pending;
        let now_ns = self.chain.epoch().ns(now);
        self.chain.refund_stages(&p.ask, p.taken);
        self.shared.decisions.insert(
            p.key,
            now_ns,
            Decision {
                expires: now_ns.saturating_add(DECISION_TTL.as_nanos() as u64),
                verdict: Verdict::Terminated,
            },
        );
        let action = self.answer_unadmitted(&p, |msg, req, inb| {
            self.reply(msg, req, inb, refuse(487, "Request Terminated"))
        });
        Settled {
            action,
            fallback: None,
            refund: (outcome == crate::cluster::Outcome::Admitted).then_some(c.buckets),
        }
    }

    fn decide(&self, c: Consult, outcome: crate::cluster::Outcome, now: Instant) -> Settled {
        use crate::cluster::{Fallback, Outcome};
        let Consult {
            buckets,
            forward,
            pending: p,
        } = c;
        let now_ns = self.chain.epoch().ns(now);
        let in_redis: Vec<Stage> = Stage::ALL
            .into_iter()
            .filter(|s| p.shared.has(*s))
            .collect();
        let last_shared = in_redis.last().copied().unwrap_or(Stage::Account);
        let policy = self
            .cluster
            .as_ref()
            .map_or(FailurePolicy::Closed, |c| c.policy);
        let mut fallback = None;
        let mut refund = None;
        let mut verdict = match outcome {
            Outcome::Admitted => Ok(()),
            Outcome::Refused { index, retry_after } => Err((
                in_redis.get(index).copied().unwrap_or(last_shared),
                retry_after,
            )),
            Outcome::Unavailable(_) => match policy {
                FailurePolicy::Open => {
                    fallback = Some(Fallback::Open);
                    Ok(())
                }
                FailurePolicy::Closed => {
                    fallback = Some(Fallback::Closed);
                    Err((last_shared, Duration::ZERO))
                }
                FailurePolicy::LocalShare => match self.chain.admit_stages(now, &p.ask, p.shared) {
                    Ok(()) => {
                        fallback = Some(Fallback::LocalShareAdmitted);
                        Ok(())
                    }
                    Err(r) => {
                        fallback = Some(Fallback::LocalShareRefused);
                        Err((r.stage, r.retry_after))
                    }
                },
            },
        };
        // The global stage comes after the shared ones; what they gave goes back if it refuses.
        if verdict.is_ok()
            && let Err(r) = self
                .chain
                .admit_stages(now, &p.ask, Stages::of(Stage::Global))
        {
            match fallback {
                None => refund = Some(buckets),
                Some(Fallback::LocalShareAdmitted) => self.chain.refund_stages(&p.ask, p.shared),
                _ => {}
            }
            verdict = Err((r.stage, r.retry_after));
        }
        let counters = |f: &dyn Fn(&crate::limiter::KeyStats)| {
            if let First::Trunk(t) = p.ask.first {
                f(&self.chain.trunks()[t].stats);
            }
            if let Some(a) = p.ask.account {
                f(&self.chain.accounts()[a].stats);
            }
        };
        let expires = now_ns.saturating_add(DECISION_TTL.as_nanos() as u64);
        let (stage, retry_after) = match verdict {
            Ok(()) => {
                counters(&|s| s.admitted_at(now_ns));
                self.shared.decisions.insert(
                    p.key,
                    now_ns,
                    Decision {
                        expires,
                        verdict: Verdict::Forwarded(p.target),
                    },
                );
                return Settled {
                    action: Action::Forward(forward),
                    fallback,
                    refund,
                };
            }
            Err(x) => x,
        };
        // Refused: the local stages give their cells back, and the call is not followed.
        self.chain.refund_stages(&p.ask, p.taken);
        counters(&|s| s.rejected_at(stage));
        self.shared.decisions.insert(
            p.key,
            now_ns,
            Decision {
                expires,
                verdict: Verdict::Rejected(stage),
            },
        );
        let action = self.answer_unadmitted(&p, |msg, req, inb| {
            self.reject(msg, req, inb, p.origin, stage, Some(retry_after), p.key)
        });
        Settled {
            action,
            fallback,
            refund,
        }
    }

    /// Answer a waiting INVITE from its stored bytes.
    fn answer_waiting(&self, w: &Waiting, code: u16, reason: &'static str) -> Option<Outbound> {
        let msg = Message::scan(&w.invite).ok()?;
        let req = RequestView::parse(&msg).ok()?;
        let inb = Inbound {
            data: &w.invite,
            source: w.source,
            transport: w.transport,
            listener: w.listener,
            conn: w.conn,
        };
        Some(self.answer(&msg, &req, &inb, &refuse(code, reason)).1)
    }

    /// RFC 3261 §16.3 request validation (syntax was checked by the scanner and the view).
    /// Returns the parsed Request-URI.
    fn validate(&self, msg: &Message<'_>, req: &RequestView) -> Result<Uri, Refusal> {
        let buf = msg.buf();
        // §16.3 step 1 via §8.2.2: only SIP/2.0 is served (RFC 4475 §3.1.2.16 badvers → 505).
        if !msg.version().eq_ignore_ascii_case(b"SIP/2.0") {
            return Err(refuse(505, "Version Not Supported"));
        }
        // §16.3 step 2: a URI scheme the proxy does not understand → 416.
        let ruri_range = msg
            .request_uri_range()
            .expect("requests have a Request-URI");
        let ruri = match Uri::parse(buf, ruri_range) {
            None => return Err(refuse(400, "Bad Request (Malformed Request-URI)")),
            Some(u) if u.scheme == Scheme::Other => {
                return Err(refuse(416, "Unsupported URI Scheme"));
            }
            // RFC 4475 §3.1.2.11: headers in a Request-URI must never be forwarded or applied.
            Some(u) if u.headers.is_some() => {
                return Err(refuse(400, "Bad Request (Headers in Request-URI)"));
            }
            Some(u) if u.scheme == Scheme::Sips => {
                // We do not serve TLS, so we cannot keep a sips request on a secure path (§26.2.2).
                return Err(refuse(416, "Unsupported URI Scheme (sips needs TLS)"));
            }
            Some(u) => u,
        };
        // §16.3 step 3: Max-Forwards of zero → 483 Too Many Hops (an OPTIONS for the gate itself
        // is answered by the gate instead).
        if req.max_forwards == Some(0) && !self.is_options_for_us(buf, req, &ruri) {
            return Err(refuse(483, "Too Many Hops"));
        }
        // §16.3 step 6: we support no extensions, so any Proxy-Require option is refused with
        // 420 and the options listed in Unsupported (§20.40).
        if let Some(v) = msg.value(HeaderName::ProxyRequire) {
            let list = String::from_utf8_lossy(crate::sip::scan::trim_lws(v)).into_owned();
            return Err(Refusal {
                code: 420,
                reason: "Bad Extension".into(),
                extra: vec![("Unsupported", list)],
            });
        }
        Ok(ruri)
    }

    /// Who sent the request. CANCEL and the ACK of a non-2xx answer carry none of the INVITE's
    /// credentials or extension headers (RFC 3261 §9.1, §17.1.1.3), so when they match no trunk
    /// they fall back to the first trunk whose source networks hold the sender.
    fn origin(&self, msg: &Message<'_>, req: &RequestView, inb: &Inbound<'_>) -> Origin {
        match self.routes.classify(inb.source, msg, req) {
            Origin::Unknown | Origin::Pbx if matches!(req.method, Method::Cancel | Method::Ack) => {
                self.routes.classify_by_source(inb.source)
            }
            o => o,
        }
    }

    /// RFC 3261 §16.4 route preprocessing and the next-hop choice.
    ///
    /// Our Record-Route URIs carry `;cg=` + a keyed hash of the Call-ID. An in-dialog request
    /// whose removed Route of ours carries the right mark belongs to a dialog this gate admitted:
    /// it follows its route set. Everything else — initial requests, CANCEL, the ACK of a failed
    /// INVITE (which repeats a Route the PBX preloaded), requests not routed through us — goes by
    /// origin, and an unknown origin is refused before any Route is followed (RFC 3261 §26.1:
    /// no open relay).
    fn next_hop(
        &self,
        msg: &Message<'_>,
        req: &RequestView,
        inb: &Inbound<'_>,
        mut ruri: Uri,
        edits: &mut Edits,
    ) -> Result<(Hop, Origin), Refusal> {
        let buf = msg.buf();
        let routes: Vec<Uri> = req
            .routes
            .iter()
            .map(|e| {
                NameAddr::parse(buf, e.value.clone())
                    .ok()
                    .and_then(|n| n.parse_uri(buf))
            })
            .collect::<Option<_>>()
            .ok_or(refuse(400, "Bad Request (Malformed Route)"))?;
        let ruri_range = msg
            .request_uri_range()
            .expect("requests have a Request-URI");
        let mark = self.dialog_mark(msg);
        let mut new_ruri = None;
        let mut removed = Vec::new();
        let mut usable = routes.len();
        // The last entry of ours removed: it names the egress listener and its transport.
        let mut ours: Option<(usize, Uri)> = None;
        let mut marked = false;
        // §16.4: a strict router before us put one of our Record-Route URIs (no user part) in the
        // Request-URI and the real target in the last Route: restore it and drop that Route.
        if ruri.user.is_none()
            && !routes.is_empty()
            && self.is_us(buf, &routes[0]).is_none()
            && let Some(l) = self.is_us(buf, &ruri)
        {
            usable -= 1;
            marked |= has_mark(buf, &ruri, &mark);
            ours = Some((l, ruri));
            ruri = routes[usable].clone();
            new_ruri = Some(ruri.clone());
            removed.push(usable);
        }
        // §16.4: remove the Route values that are us (double record-routing gives two, an
        // outbound-proxy Route a third).
        let mut popped = 0;
        while popped < usable.min(MAX_OWN_ROUTES)
            && let Some(l) = self.is_us(buf, &routes[popped])
        {
            marked |= has_mark(buf, &routes[popped], &mark);
            ours = Some((l, routes[popped].clone()));
            removed.push(popped);
            popped += 1;
        }
        let in_dialog = marked && req.to_tag(buf).is_some() && req.method != Method::Cancel;
        let origin = self.origin(msg, req, inb);
        if !in_dialog {
            remove_elements(msg, &req.routes, &removed, edits);
            if let Some(u) = new_ruri {
                edits.replace(ruri_range, &buf[u.range]);
            }
            let target = match origin {
                Origin::Carrier(_) => self
                    .pbx
                    .ok_or(refuse(403, "Forbidden (No PBX Destination)"))?,
                Origin::Trunk(t) => self.upstreams[self.routes.trunks()[t].upstream],
                Origin::Pbx | Origin::Unknown => {
                    match (self.unknown_sources, self.default_upstream) {
                        (UnknownSources::Forward | UnknownSources::Limit, Some(u)) => {
                            self.upstreams[u]
                        }
                        _ => return Err(refuse(403, "Forbidden")),
                    }
                }
            };
            return Ok((Hop::Target(target), origin));
        }
        // A dialog we admitted: the rest of the route set, else the Request-URI.
        let next = match routes[popped..usable].first() {
            Some(first) if !first.is_loose(buf) => {
                // §16.6 step 6: the next hop is a strict router: the Request-URI becomes the last
                // Route value and the first Route value becomes the Request-URI.
                let current = new_ruri.as_ref().map_or(&ruri_range, |u| &u.range);
                let last_line = &msg.headers()[req.routes[usable - 1].header].line;
                let route = format!(
                    "Route: <{}>\r\n",
                    String::from_utf8_lossy(&buf[current.clone()])
                );
                edits.insert(last_line.end, route);
                removed.push(popped);
                new_ruri = Some(first.clone());
                first.clone()
            }
            Some(first) => first.clone(),
            None => ruri,
        };
        remove_elements(msg, &req.routes, &removed, edits);
        if let Some(u) = new_ruri {
            edits.replace(ruri_range, &buf[u.range]);
        }
        if self.is_us(buf, &next).is_some() {
            return Err(refuse(482, "Loop Detected"));
        }
        let (egress, ours_uri) = ours.expect("a marked request removed an entry of ours");
        // The entry of ours faced the next hop: its transport is the one to keep.
        let transport = ours_uri.transport(buf).filter(|t| *t == Transport::Tcp);
        Ok((Hop::Uri(next, Some(egress), transport), origin))
    }

    /// The decision cache and the admission chain for an initial INVITE or a CANCEL. `None`
    /// lets the request go on to `hop` (possibly replaced by the cached destination); `Some` is
    /// the answer instead.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        now: Instant,
        msg: &Message<'_>,
        req: &RequestView,
        inb: &Inbound<'_>,
        origin: Origin,
        hop: &mut Hop,
        paced: &mut Option<(crate::limiter::Reservation, Ask)>,
        consult: &mut Option<(Ask, Stages, Stages)>,
    ) -> Option<Action> {
        let now_ns = self.chain.epoch().ns(now);
        // RFC 3261 §17.2.3: a CANCEL and the retransmissions of an INVITE carry its top-Via
        // branch and sent-by.
        let key = self.transaction_hash(DECISION_LABEL, msg, &req.top_via);
        // A waiting call is known by the queue itself, whatever the cache has forgotten.
        let cached = if self.shared.queue.contains_key(&key) {
            Some(Verdict::Queued)
        } else if self.shared.pending.contains_key(&key) {
            Some(Verdict::Pending)
        } else {
            self.shared.decisions.get(key, now_ns, |d| d.verdict)
        };
        if req.method == Method::Ack {
            // The ACK of a non-2xx answer carries the INVITE's branch (§17.1.1.3).
            if let Some(Verdict::Forwarded(res)) = cached {
                *hop = Hop::Target(res.resolved());
            }
            return None;
        }
        if req.method == Method::Cancel {
            return match cached {
                // §9.2: the INVITE was already answered; the CANCEL has no effect but gets a 200.
                Some(Verdict::Rejected(_)) => {
                    self.shared
                        .cancels_answered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Some(self.reply(msg, req, inb, refuse(200, "OK")))
                }
                Some(Verdict::Forwarded(res)) => {
                    *hop = Hop::Target(res.resolved());
                    None
                }
                Some(Verdict::Terminated | Verdict::ShutDown) => {
                    Some(self.reply(msg, req, inb, refuse(200, "OK")))
                }
                // §9.2: answered at once; `settle` then answers the INVITE 487.
                Some(Verdict::Pending) => {
                    let marked = self
                        .shared
                        .pending
                        .get_mut(&key)
                        .map(|mut e| e.0 = true)
                        .is_some();
                    match marked {
                        true => Some(self.reply(msg, req, inb, refuse(200, "OK"))),
                        // Decided a moment ago: like any decided INVITE.
                        false => match self.shared.decisions.get(key, now_ns, |d| d.verdict) {
                            Some(Verdict::Forwarded(res)) => {
                                *hop = Hop::Target(res.resolved());
                                None
                            }
                            Some(_) => Some(self.reply(msg, req, inb, refuse(200, "OK"))),
                            None => None,
                        },
                    }
                }
                Some(Verdict::Queued) => match self.cancel_waiting(key, now_ns) {
                    Some(terminated) => {
                        let (_, ok) = self.answer(msg, req, inb, &refuse(200, "OK"));
                        Some(Action::Cancelled(ok, terminated))
                    }
                    // It left the queue a moment ago: released (the CANCEL follows the
                    // INVITE), or answered here (the CANCEL gets a 200).
                    None => match self.shared.decisions.get(key, now_ns, |d| d.verdict) {
                        Some(Verdict::Forwarded(res)) => {
                            *hop = Hop::Target(res.resolved());
                            None
                        }
                        Some(Verdict::Terminated | Verdict::ShutDown) => {
                            Some(self.reply(msg, req, inb, refuse(200, "OK")))
                        }
                        _ => None,
                    },
                },
                None => None,
            };
        }
        match cached {
            Some(Verdict::Forwarded(res)) => {
                *hop = Hop::Target(res.resolved());
                return None;
            }
            Some(Verdict::Rejected(stage)) => {
                return Some(self.reject(msg, req, inb, origin, stage, None, key));
            }
            // A retransmission of a waiting INVITE gets the 100 again (§17.2.1).
            Some(Verdict::Queued) => {
                return Some(self.reply(msg, req, inb, trying()));
            }
            Some(Verdict::Terminated) => {
                return Some(self.reply(msg, req, inb, refuse(487, "Request Terminated")));
            }
            Some(Verdict::ShutDown) => {
                return Some(self.reply(msg, req, inb, shutting_down()));
            }
            Some(Verdict::Pending) => return Some(Action::Drop(DropReason::Pending)),
            None => {}
        }
        // Initial requests go by origin, so the hop is a configured target.
        let Hop::Target(target) = *hop else {
            return None;
        };
        let expires = now_ns.saturating_add(DECISION_TTL.as_nanos() as u64);
        if let Some(ask) = self.ask(msg, req, inb, origin) {
            let attempt = self.attempt_key(msg, req);
            let has_credentials = msg.first(HeaderName::Authorization).is_some()
                || msg.first(HeaderName::ProxyAuthorization).is_some();
            // An INVITE re-sent with credentials (and a higher CSeq) after a 401/407 of an
            // admitted attempt; each admitted attempt has a couple of such re-sends, no more.
            let cseq = req.cseq.as_ref().map_or(0, |c| c.0);
            let auth_retry = !self.charge_auth_retry
                && has_credentials
                && admission::free_auth_retry(&self.shared.admitted, attempt, cseq, now_ns);
            let counters = |f: &dyn Fn(&crate::limiter::KeyStats)| {
                if let First::Trunk(t) = ask.first {
                    f(&self.chain.trunks()[t].stats);
                }
                if let Some(a) = ask.account {
                    f(&self.chain.accounts()[a].stats);
                }
            };
            // Pacing: reserve the next slot every stage has within max_delay instead of
            // refusing; a call whose slot is now goes at once.
            let pacing = match ask.first {
                First::Trunk(t) => self.routes.trunks()[t].pacing,
                First::Source(_) => None,
            };
            // Buckets kept in Redis are asked by the shell after the local stages before them
            // (trunk or source, username, account when local); the global stage comes after.
            let (shared, _) = self
                .cluster
                .as_ref()
                .map_or((Stages::NONE, Vec::new()), |c| c.shared(&ask));
            // Ok(None): admitted now; Ok(Some): a slot booked ahead.
            let outcome = if auth_retry {
                Ok(None)
            } else if !shared.is_empty() {
                let mut before = Stages::ALL.without(Stage::Global);
                for s in Stage::ALL {
                    if shared.has(s) {
                        before = before.without(s);
                    }
                }
                self.chain.admit_stages(now, &ask, before).map(|()| {
                    *consult = Some((ask, shared, before));
                    None
                })
            } else {
                self.chain
                    .decide(now, &ask, pacing.map(|p| (p.max_delay, p.max_queue)))
            };
            if !auth_retry {
                if let Err(refused) = outcome {
                    counters(&|s| s.rejected_at(refused.stage));
                    self.shared.decisions.insert(
                        key,
                        now_ns,
                        Decision {
                            expires,
                            verdict: Verdict::Rejected(refused.stage),
                        },
                    );
                    return Some(self.reject(
                        msg,
                        req,
                        inb,
                        origin,
                        refused.stage,
                        Some(refused.retry_after),
                        key,
                    ));
                }
                match outcome {
                    Ok(Some(booked)) => *paced = Some((booked, ask)),
                    // Counted when Redis has answered.
                    _ if consult.is_some() => {}
                    _ => counters(&|s| s.admitted_at(now_ns)),
                }
                // Follow the call for ASR and ACD (a bounded table; calls that never end are
                // forgotten after usage.max_call_secs).
                // (Without Record-Route the BYE never passes: nothing to follow.)
                if let First::Trunk(t) = ask.first
                    && self.record_route
                {
                    self.shared.dialogs.insert(
                        self.dialog_key(msg),
                        now_ns,
                        Followed {
                            expires: std::sync::atomic::AtomicU64::new(
                                now_ns.saturating_add(TIMER_C.as_nanos() as u64),
                            ),
                            arrived: now_ns,
                            answered_at: std::sync::atomic::AtomicU64::new(0),
                            trunk: self.chain.trunks()[t].stats.clone(),
                            account: ask.account.map(|a| self.chain.accounts()[a].stats.clone()),
                        },
                    );
                }
                self.shared
                    .admitted
                    .insert(attempt, now_ns, Admitted::new(cseq, expires));
            }
        }
        // A paced call's verdict is written by `enqueue`, once it is in the queue; a call asked
        // in Redis is known by `pending` until `settle` writes its verdict.
        if consult.is_some() {
            self.shared.pending.insert(key, (false, now_ns));
        } else if paced.is_none() {
            self.shared.decisions.insert(
                key,
                now_ns,
                Decision {
                    expires,
                    verdict: Verdict::Forwarded(CompactTarget::from_resolved(target)),
                },
            );
        }
        None
    }

    /// The stages an initial INVITE from `origin` must pass; `None` when it is not metered
    /// (calls from carriers and the PBX, and unknown sources under `"forward"`).
    fn ask(
        &self,
        msg: &Message<'_>,
        req: &RequestView,
        inb: &Inbound<'_>,
        origin: Origin,
    ) -> Option<Ask> {
        admission::ask(
            &self.shared.keys,
            &self.routes,
            self.unknown_sources,
            self.chain.usernames().is_some(),
            origin,
            inb.source.ip(),
            || sip_username(msg, req),
        )
    }

    /// The answer to a call over a limit: the configured code, the stage's reason phrase, a
    /// `Reason` header naming the stage and its key, and `Retry-After` when configured — all
    /// derived from the request, so a retransmission gets the same bytes.
    #[allow(clippy::too_many_arguments)]
    fn reject(
        &self,
        msg: &Message<'_>,
        req: &RequestView,
        inb: &Inbound<'_>,
        origin: Origin,
        stage: Stage,
        retry_after: Option<Duration>,
        key: u64,
    ) -> Action {
        let buf = msg.buf();
        let (trunk, account) = match origin {
            Origin::Trunk(t) => (
                Some(self.trunk_names[t].clone()),
                self.routes.trunks()[t]
                    .account
                    .map(|a| self.account_names[a].clone()),
            ),
            _ => (None, None),
        };
        let username = sip_username(msg, req).map(|u| String::from_utf8_lossy(u).into_owned());
        let subject = match stage {
            Stage::Trunk => trunk.as_deref().map(str::to_owned),
            Stage::Account => account.as_deref().map(str::to_owned),
            Stage::Source => Some(canonical_ip(inb.source.ip()).to_string()),
            Stage::Username => username.clone(),
            Stage::Global => None,
        };
        let code = self.reply_cfg.code;
        let mut text = format!("{} CPS limit", stage.as_str());
        if let Some(s) = &subject {
            text.push_str(" (");
            text.extend(
                s.chars()
                    .filter(|c| !matches!(c, '"' | '\\') && !c.is_control()),
            );
            text.push(')');
        }
        let mut extra = vec![("Reason", format!("SIP;cause={code};text=\"{text}\""))];
        if let Some((min, max)) = self.reply_cfg.retry_after {
            // Random in [min, max], but the same for a retransmission (§21.5.4: short and
            // jittered, so PBXs do not all come back at once).
            let span = u64::from(max - min) + 1;
            extra.push((
                "Retry-After",
                (u64::from(min) + (key >> 8) % span).to_string(),
            ));
        }
        let refusal = Refusal {
            code,
            reason: self.reply_cfg.reasons[stage.index()].clone().into(),
            extra,
        };
        let (_, out) = self.answer(msg, req, inb, &refusal);
        Action::Reject(
            Rejection {
                stage,
                trunk,
                account,
                retry_after: retry_after.unwrap_or_default(),
                retransmission: retry_after.is_none(),
                call_id: String::from_utf8_lossy(req.call_id(buf)).into_owned(),
                username,
            },
            out,
        )
    }

    /// The key of a followed call: its Call-ID.
    fn dialog_key(&self, msg: &Message<'_>) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.shared.keys.0, self.shared.keys.1);
        h.write_u8(b'g');
        h.write(msg.value(HeaderName::CallId).unwrap_or_default());
        h.finish()
    }

    /// A final answer to a followed INVITE: answered (2xx) or ended (≥ 300, except the 401/407
    /// of a challenge, which the caller answers with a new attempt of the same call).
    fn follow_response(&self, now: Instant, msg: &Message<'_>) {
        let Some(code) = msg.status().filter(|c| *c >= 200) else {
            return;
        };
        if code == 401 || code == 407 {
            return;
        }
        let invite = msg
            .value(HeaderName::CSeq)
            .and_then(|v| crate::sip::header::parse_cseq(v).ok())
            .is_some_and(|(_, m)| m == b"INVITE");
        if !invite {
            return;
        }
        let ns = self.chain.epoch().ns(now);
        let key = self.dialog_key(msg);
        let ended = self.shared.dialogs.get(key, ns, |d| {
            use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
            let answered = d.answered_at.load(Acquire) != 0;
            if code < 300 {
                // The first 2xx answers the call; retransmitted 2xx change nothing.
                if d.answered_at
                    .compare_exchange(0, ns + 1, AcqRel, Acquire)
                    .is_ok()
                {
                    d.each(|s| s.answered());
                    let until = d.arrived.saturating_add(self.shared.max_call_ns);
                    d.expires.store(until, Release);
                }
                false
            } else if answered {
                // A failed re-INVITE (491, or 488 on a refresh) does not end an answered call.
                false
            } else {
                d.each(|s| s.failed());
                true
            }
        });
        if ended == Some(true) {
            self.shared.dialogs.remove(key);
        }
    }

    /// A BYE ends a followed, answered call: its talk time counts for ACD.
    fn follow_bye(&self, now: Instant, msg: &Message<'_>) {
        let ns = self.chain.epoch().ns(now);
        let key = self.dialog_key(msg);
        let found = self.shared.dialogs.get(key, ns, |d| {
            let answered = d.answered_at.load(std::sync::atomic::Ordering::Acquire);
            if answered > 0 {
                let talk = ns.saturating_sub(answered - 1);
                d.each(|s| s.completed(talk));
            }
        });
        if found.is_some() {
            self.shared.dialogs.remove(key);
        }
    }

    /// The `;cg=` value of our Record-Route for this Call-ID.
    fn dialog_mark(&self, msg: &Message<'_>) -> Mark {
        let mut h = SipHasher13::new_with_keys(self.shared.keys.0, self.shared.keys.1);
        h.write_u8(b'r');
        h.write(msg.value(HeaderName::CallId).unwrap_or_default());
        let n = h.finish();
        let mut mark = [0u8; 12];
        for (i, d) in mark.iter_mut().enumerate() {
            *d = HEX_DIGITS[((n >> (4 * (11 - i))) & 0xf) as usize];
        }
        Mark(mark)
    }

    /// Resolve a URI next hop: address, transport and egress listener (RFC 3263 without DNS
    /// SRV: the URI's host, port and `transport` parameter).
    fn uri_destination(
        &self,
        buf: &[u8],
        uri: &Uri,
        named_egress: Option<usize>,
        recorded: Option<Transport>,
    ) -> Result<(NextHop, Transport, usize), Refusal> {
        if uri.scheme == Scheme::Sips {
            return Err(refuse(416, "Unsupported URI Scheme (sips needs TLS)"));
        }
        let transport = uri.transport(buf).or(recorded).unwrap_or(Transport::Udp);
        if !matches!(transport, Transport::Udp | Transport::Tcp) {
            return Err(refuse(502, "Bad Gateway (Unsupported Transport)"));
        }
        let port = uri.port.unwrap_or(5060);
        let (to, v4) = match (&uri.host, &uri.host_range) {
            (Some(Host::Ip(ip)), _) => (NextHop::Addr(SocketAddr::new(*ip, port)), ip.is_ipv4()),
            (Some(Host::Name(r)), _) => (
                NextHop::Name {
                    host: String::from_utf8_lossy(&buf[r.clone()]).into_owned(),
                    port,
                },
                true,
            ),
            _ => return Err(refuse(416, "Unsupported URI Scheme")),
        };
        let fits = |i: usize| {
            let l = &self.shared.listeners[i];
            l.serves(transport) && l.bound.is_ipv4() == v4
        };
        let egress = named_egress
            .filter(|&i| fits(i))
            .or_else(|| (0..self.shared.listeners.len()).find(|&i| fits(i)))
            .ok_or(refuse(
                503,
                "Service Unavailable (No Listener For Next Hop)",
            ))?;
        Ok((to, transport, egress))
    }

    /// RFC 3261 §16.6 steps 3, 4, 8 and 9: Max-Forwards, Record-Route, Via, Content-Length.
    fn rewrite_request(
        &self,
        msg: &Message<'_>,
        req: &RequestView,
        inb: &Inbound<'_>,
        edits: &mut Edits,
        out_transport: Transport,
        egress: usize,
    ) {
        let buf = msg.buf();
        // Step 3: decrement, or add 70 when absent.
        match msg.first(HeaderName::MaxForwards) {
            Some(h) => {
                let mf = req.max_forwards.unwrap_or(DEFAULT_MAX_FORWARDS);
                edits.replace(h.value.clone(), itoa(u64::from(mf - 1)).as_bytes());
            }
            None => edits.insert(
                msg.headers_end(),
                format!("Max-Forwards: {DEFAULT_MAX_FORWARDS}\r\n"),
            ),
        }
        // Step 4: Record-Route with ;lr on dialog-creating requests, before existing entries;
        // two entries when the interface or transport changes (egress first, as the callee
        // reads the list top-down).
        if self.record_route && req.method.creates_dialog() && req.to_tag(buf).is_none() {
            let pos = msg
                .first(HeaderName::RecordRoute)
                .map_or(msg.headers_end(), |h| h.line.start);
            let mark = self.dialog_mark(msg);
            edits.insert_with(pos, |rr| {
                self.push_record_route(rr, egress, out_transport, &mark);
                if egress != inb.listener || out_transport != inb.transport {
                    self.push_record_route(rr, inb.listener, inb.transport, &mark);
                }
            });
        }
        // Step 8: our Via on top, with a branch derived from the received one (§16.11) and the
        // ingress listener and connection so the response finds its way back.
        let first_via = &msg.headers()[req.via_elements[0].header];
        let l = &self.shared.listeners[egress];
        let branch = self.transaction_hash(b'b', msg, &req.top_via);
        edits.insert_with(first_via.line.start, |via| {
            via.extend_from_slice(b"Via: SIP/2.0/");
            via.extend_from_slice(out_transport.as_via().as_bytes());
            via.push(b' ');
            via.extend_from_slice(l.host.as_bytes());
            via.push(b':');
            via.extend_from_slice(itoa(u64::from(l.port)).as_bytes());
            via.extend_from_slice(b";branch=");
            via.extend_from_slice(BRANCH_PREFIX.as_bytes());
            push_hex(via, branch, 16);
            if let Some(c) = inb.conn {
                via.extend_from_slice(b";i=");
                push_hex_trimmed(via, c);
            }
            via.extend_from_slice(b";ln=");
            via.extend_from_slice(itoa(inb.listener as u64).as_bytes());
            via.extend_from_slice(b"\r\n");
        });
        // Step 9: a stream needs Content-Length.
        if out_transport == Transport::Tcp && msg.first(HeaderName::ContentLength).is_none() {
            edits.insert(
                msg.headers_end(),
                format!("Content-Length: {}\r\n", msg.body_range().len()),
            );
        }
    }

    fn push_record_route(&self, out: &mut Vec<u8>, listener: usize, t: Transport, mark: &Mark) {
        let l = &self.shared.listeners[listener];
        out.extend_from_slice(b"Record-Route: <sip:");
        out.extend_from_slice(l.host.as_bytes());
        out.push(b':');
        out.extend_from_slice(itoa(u64::from(l.port)).as_bytes());
        if t == Transport::Tcp {
            out.extend_from_slice(b";transport=tcp");
        }
        out.extend_from_slice(b";lr;cg=");
        out.extend_from_slice(&mark.0);
        out.extend_from_slice(b">\r\n");
    }

    /// RFC 3261 §16.7 / §16.11 response handling.
    fn route_response(&self, now: Instant, msg: &Message<'_>) -> Action {
        let buf = msg.buf();
        if msg.defect().is_some() {
            return Action::Drop(DropReason::BadResponse);
        }
        let vias = elements(msg, HeaderName::Via);
        let Some(top) = vias
            .first()
            .and_then(|e| Via::parse(buf, e.value.clone()).ok())
        else {
            return Action::Drop(DropReason::BadResponse);
        };
        if !self.is_our_via(buf, &top) {
            return Action::Drop(DropReason::ForeignVia);
        }
        let Some(next) = vias.get(1) else {
            return Action::Drop(DropReason::NoNextVia);
        };
        let Ok(next) = Via::parse(buf, next.value.clone()) else {
            return Action::Drop(DropReason::BadResponse);
        };
        // Our branch is a keyed hash of the Via below it: a response forged around a Via that
        // merely looks like ours is not relayed (only checkable when that Via has the cookie).
        if let Some(h) = self.cookie_hash(b'b', buf, &next)
            && !top.branch(buf).is_some_and(|b| is_our_branch(b, h))
        {
            return Action::Drop(DropReason::ForeignVia);
        }
        // Only a response that passed the checks above counts toward ASR and ACD.
        self.follow_response(now, msg);
        let listener = top
            .param(buf, b"ln")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
            .filter(|&l| l < self.shared.listeners.len());
        let Some(listener) = listener else {
            return Action::Drop(DropReason::ForeignVia);
        };
        let conn = top
            .param(buf, b"i")
            .and_then(|v| u64::from_str_radix(std::str::from_utf8(v).ok()?, 16).ok());
        let Some((to, transport)) = via_destination(buf, &next) else {
            return Action::Drop(DropReason::UnsupportedTransport);
        };
        if let NextHop::Addr(a) = &to
            && !self.is_safe(*a)
        {
            return Action::Drop(DropReason::UnsafeDestination);
        }
        let mut edits = Edits::new();
        remove_element(msg, &vias, 0, &mut edits);
        // RFC 3261 §18.3: a response that came over UDP without Content-Length needs one on a
        // stream.
        if transport == Transport::Tcp && msg.first(HeaderName::ContentLength).is_none() {
            edits.insert(
                msg.headers_end(),
                format!("Content-Length: {}\r\n", msg.body_range().len()),
            );
        }
        Action::Forward(Outbound {
            to,
            transport,
            listener,
            conn: conn.filter(|_| transport == Transport::Tcp),
            udp_fallback: None,
            data: edits.apply(buf, msg.body_range().end),
        })
    }

    fn is_our_via(&self, buf: &[u8], via: &Via) -> bool {
        let branch_ok = via
            .branch(buf)
            .is_some_and(|b| b.starts_with(BRANCH_PREFIX.as_bytes()));
        branch_ok && self.is_local_hostport(buf, &via.host, via.port.unwrap_or(5060))
    }

    /// The listener a URI points at, if it is one of ours (by advertised or bound address, or an
    /// alias with a matching port).
    fn is_us(&self, buf: &[u8], uri: &Uri) -> Option<usize> {
        let host = uri.host.as_ref()?;
        let default = if uri.scheme == Scheme::Sips {
            5061
        } else {
            5060
        };
        self.local_listener(buf, host, uri.port.unwrap_or(default))
    }

    fn is_local_hostport(&self, buf: &[u8], host: &Host, port: u16) -> bool {
        self.local_listener(buf, host, port).is_some()
    }

    fn local_listener(&self, buf: &[u8], host: &Host, port: u16) -> Option<usize> {
        let ips = &self.shared.listener_ips;
        self.shared.listeners.iter().zip(ips).position(|(l, own)| {
            let host_ok = match host {
                Host::Ip(ip) => l.is_own_ip_given(*own, *ip),
                Host::Name(r) => {
                    let name = &buf[r.clone()];
                    name.eq_ignore_ascii_case(l.host.as_bytes())
                        || self
                            .aliases
                            .iter()
                            .any(|a| name.eq_ignore_ascii_case(a.as_bytes()))
                }
            };
            host_ok && (port == l.port || port == l.bound.port())
        })
    }

    /// Never send to port 0, an unspecified, broadcast, multicast or link-local address (cloud
    /// metadata services live at 169.254.169.254), or ourselves.
    pub fn is_safe(&self, a: SocketAddr) -> bool {
        self.shared.is_safe(a)
    }

    /// The branch key of a Via whose branch carries the magic cookie (and more than it: a bare
    /// cookie identifies nothing, RFC 4475 §3.2.1).
    fn cookie_hash(&self, label: u8, buf: &[u8], via: &Via) -> Option<u64> {
        self.shared.keys.cookie(label, buf, via)
    }

    /// See [`Keys::transaction`].
    fn transaction_hash(&self, label: u8, msg: &Message<'_>, via: &Via) -> u64 {
        self.shared.keys.transaction(label, msg, via)
    }

    /// The To-tag of our own responses to a request with this top Via (RFC 3261 §8.2.7: the same
    /// request always gets the same tag).
    pub fn to_tag(&self, msg: &Message<'_>, via: &Via) -> String {
        let mut h = self.transaction_hash(b't', msg, via);
        h ^= {
            let mut c = SipHasher13::new_with_keys(self.shared.keys.1, self.shared.keys.0);
            c.write(msg.value(HeaderName::CallId).unwrap_or_default());
            c.finish()
        };
        tag_text(h)
    }

    fn reply(&self, msg: &Message<'_>, req: &RequestView, inb: &Inbound<'_>, r: Refusal) -> Action {
        let (code, out) = self.answer(msg, req, inb, &r);
        Action::Reply(code, out)
    }

    /// Build a local answer to a parsed request.
    fn answer(
        &self,
        msg: &Message<'_>,
        req: &RequestView,
        inb: &Inbound<'_>,
        r: &Refusal,
    ) -> (u16, Outbound) {
        // A 100 Trying carries no To-tag (it creates no dialog state, RFC 3261 §8.2.6.1).
        let tag = if r.code == 100 {
            String::new()
        } else {
            self.to_tag(msg, &req.top_via)
        };
        let extra: Vec<(&str, &str)> = r.extra.iter().map(|(n, v)| (*n, v.as_str())).collect();
        // The top Via as RFC 3261 §18.2.1 and RFC 3581 have it answered: `received`, `rport`.
        let data = build_response(
            msg,
            &received_edits(&req.top_via, inb.source),
            &ResponseSpec {
                code: r.code,
                reason: &r.reason,
                to_tag: &tag,
                extra: &extra,
            },
        );
        (r.code, self.reply_outbound(Some(&req.top_via), inb, data))
    }

    /// Answer a request whose headers did not validate, from what can be read of it. With an
    /// unreadable top Via the answer goes to the transport source as is (RFC 4475 §3.1.2.1).
    fn reply_with(
        &self,
        msg: &Message<'_>,
        via: Option<&Via>,
        inb: &Inbound<'_>,
        code: u16,
        reason: &str,
    ) -> Action {
        let edits = via.map_or_else(Edits::new, |v| received_edits(v, inb.source));
        let tag = match via {
            Some(v) => self.to_tag(msg, v),
            None => {
                let mut h = SipHasher13::new_with_keys(self.shared.keys.0, self.shared.keys.1);
                h.write(msg.value(HeaderName::Via).unwrap_or_default());
                h.write(msg.value(HeaderName::CallId).unwrap_or_default());
                tag_text(h.finish())
            }
        };
        let data = build_response(
            msg,
            &edits,
            &ResponseSpec {
                code,
                reason,
                to_tag: &tag,
                extra: &[],
            },
        );
        Action::Reply(code, self.reply_outbound(via, inb, data))
    }

    /// RFC 3261 §18.2.2 with RFC 3581 §4: over a stream, the same connection; over UDP, the
    /// source address with `rport`, else the sent-by port at the source IP (which is what
    /// `received` holds).
    fn reply_outbound(&self, via: Option<&Via>, inb: &Inbound<'_>, data: Bytes) -> Outbound {
        let port = match via {
            _ if inb.transport == Transport::Tcp => inb.source.port(),
            Some(Via {
                rport: Rport::Requested(_),
                ..
            })
            | None => inb.source.port(),
            Some(v) => v.port.unwrap_or(5060),
        };
        Outbound {
            to: NextHop::Addr(SocketAddr::new(inb.source.ip(), port)),
            transport: inb.transport,
            listener: inb.listener,
            conn: inb.conn,
            data,
            udp_fallback: None,
        }
    }
}

/// True when a URI of ours carries this dialog's mark.
fn has_mark(buf: &[u8], uri: &Uri, mark: &Mark) -> bool {
    crate::sip::header::find_param(buf, &uri.params, b"cg")
        .and_then(|p| p.value.clone())
        .is_some_and(|v| buf[v] == mark.0)
}

/// Our To-tag for hash `h`: the prefix and 16 hex digits.
fn tag_text(h: u64) -> String {
    let mut out = Vec::with_capacity(TAG_PREFIX.len() + 16);
    out.extend_from_slice(TAG_PREFIX.as_bytes());
    push_hex(&mut out, h, 16);
    String::from_utf8(out).unwrap_or_default()
}

/// The `;cg=` dialog mark: 12 lower-case hex digits of a keyed hash of the Call-ID.
struct Mark([u8; 12]);

impl Mark {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Addresses no message may go to, whoever asks: port 0, unspecified, broadcast, multicast and
/// link-local addresses.
fn is_safe_destination(a: SocketAddr) -> bool {
    let ip = canonical_ip(a.ip());
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    let bad_ip = ip.is_unspecified()
        || ip.is_multicast()
        || link_local
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    a.port() != 0 && !bad_ip
}

/// A small decimal formatter for the hot path (ports, counters) that allocates nothing.
struct Decimal {
    buf: [u8; 20],
    start: usize,
}

impl Decimal {
    /// The digits, for writing into a message (no UTF-8 check).
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa(mut n: u64) -> Decimal {
    let mut d = Decimal {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

/// The limiter's view of a configuration.
pub fn chain_spec(cfg: &Config) -> ChainSpec {
    // A bucket kept in Redis has, locally, this gate's share of it (used while Redis does not
    // answer, under `local_share`).
    let local = |shared: bool, limit| match &cfg.cluster {
        Some(c) if shared => local_share(limit, c.instances),
        _ => limit,
    };
    ChainSpec {
        trunks: cfg
            .trunks
            .iter()
            .map(|t| (t.name.clone(), local(t.shared, t.limit)))
            .collect(),
        accounts: cfg
            .accounts
            .iter()
            .map(|a| (a.name.clone(), local(a.shared, a.limit)))
            .collect(),
        source: cfg.limits.unknown_source,
        username: cfg.limits.username,
        global: cfg.limits.global,
        table_cap: cfg.limits.table_size,
        usage_period: cfg.usage.period_secs,
    }
}

/// Append `n` as `width` lower-case hex digits (the low `4 * width` bits), without the fmt
/// machinery: this runs for every forwarded request.
fn push_hex(out: &mut Vec<u8>, n: u64, width: u32) {
    for i in (0..width).rev() {
        out.push(HEX_DIGITS[((n >> (4 * i)) & 0xf) as usize]);
    }
}

/// True when `branch` is the branch we write for hash `h`: the prefix and 16 hex digits.
fn is_our_branch(branch: &[u8], h: u64) -> bool {
    let mut want = [0u8; BRANCH_PREFIX.len() + 16];
    want[..BRANCH_PREFIX.len()].copy_from_slice(BRANCH_PREFIX.as_bytes());
    for (i, d) in want[BRANCH_PREFIX.len()..].iter_mut().enumerate() {
        *d = HEX_DIGITS[((h >> (4 * (15 - i))) & 0xf) as usize];
    }
    branch == want
}

/// `n` in lower-case hex without leading zeros (as `{:x}` writes it).
fn push_hex_trimmed(out: &mut Vec<u8>, n: u64) {
    let width = (64 - n.leading_zeros()).div_ceil(4).max(1);
    push_hex(out, n, width);
}

/// An IP address as text, IPv4 without the formatting machinery (it is on every request's
/// path, in `received=`).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(itoa(u64::from(o)).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// The top Via of a message, if it parses.
fn top_via(msg: &Message<'_>) -> Option<Via> {
    let e = elements(msg, HeaderName::Via).into_iter().next()?;
    Via::parse(msg.buf(), e.value).ok()
}

/// RFC 3261 §18.2.1 and RFC 3581 §4: add `received` when the sent-by host is not the source IP
/// (always when `rport` is present) and fill an empty `rport` with the source port.
fn received_edits(via: &Via, src: SocketAddr) -> Edits {
    let mut e = Edits::new();
    add_received(&mut e, via, src);
    e
}

/// Add [`received_edits`] to `e`.
fn add_received(e: &mut Edits, via: &Via, src: SocketAddr) {
    let ip = canonical_ip(src.ip());
    let sent_by_is_src = matches!(via.host, Host::Ip(h) if canonical_ip(h) == ip);
    let rport = !matches!(via.rport, Rport::Absent);
    if let Rport::Requested(r) = &via.rport {
        e.replace_with(r.clone(), |v| {
            v.extend_from_slice(b"rport=");
            v.extend_from_slice(itoa(u64::from(src.port())).as_bytes());
        });
    }
    if !sent_by_is_src || rport {
        match &via.received {
            Some(r) => e.replace_with(r.clone(), |v| push_ip(v, ip)),
            None => e.insert_with(via.range.end, |v| {
                v.extend_from_slice(b";received=");
                push_ip(v, ip);
            }),
        }
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// RFC 3261 §18.2.2 / RFC 3581 §4: where a response goes, from the Via below ours.
fn via_destination(buf: &[u8], via: &Via) -> Option<(NextHop, Transport)> {
    if !matches!(via.transport, Transport::Udp | Transport::Tcp) {
        return None;
    }
    let received = via
        .received
        .clone()
        .and_then(|r| std::str::from_utf8(&buf[r]).ok()?.parse::<IpAddr>().ok());
    let port = match (&via.rport, via.transport) {
        (Rport::Port(p), Transport::Udp) => *p,
        _ => via.port.unwrap_or(5060),
    };
    let to = match (received, &via.host) {
        (Some(ip), _) => NextHop::Addr(SocketAddr::new(ip, port)),
        (None, Host::Ip(ip)) => NextHop::Addr(SocketAddr::new(*ip, port)),
        (None, Host::Name(r)) => NextHop::Name {
            host: String::from_utf8_lossy(&buf[r.clone()]).into_owned(),
            port,
        },
    };
    Some((to, via.transport))
}

/// Resolve a configured target once (IP literals need no lookup).
fn resolve_target(t: &Target) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = t.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, t.port)]);
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .collect();
    if addrs.is_empty() {
        return Err("no address".to_owned());
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests;
