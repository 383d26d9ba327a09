//! The async shell around the core: UDP receive loops, TCP accept and connection tasks, the
//! connection table, and sending what the core decided. It never decides policy.

pub mod batch;
pub mod framing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{Cluster, Failure, Outcome};
use crate::config::TcpSettings;
use crate::flood::{FloodGuard, Verdict};
use crate::proxy::{Action, ConnId, Inbound, NextHop, Outbound, Proxy};
use crate::sip::Transport;
use crate::telemetry::{LineBudget, Stats, TransportDrop};
use batch::RecvBatch;
use framing::{Frame, Framer};

/// Most bytes of queued messages a TCP writer joins into one write.
const WRITE_BATCH: usize = 64 * 1024;
/// Name lookups under way at once.
const MAX_LOOKUPS: usize = 64;
/// Largest UDP datagram we read.
const UDP_BUF: usize = 65_535;
/// A write that makes no progress for this long ends the connection (a peer that stopped
/// reading must not hold a task, a connection slot and the shutdown).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The answer to requests queued for a connection that was refused (RFC 3261 §16.9).
const UNREACHABLE: (u16, &str) = (503, "Service Unavailable (Next Hop Unreachable)");
/// The answer to requests queued for a connection that did not come up in time.
const CONNECT_TIMEOUT: (u16, &str) = (408, "Request Timeout (Next Hop Did Not Answer)");
/// How long a resolved next-hop name is reused (also keeps a transaction on one address).
const DNS_TTL: Duration = Duration::from_secs(60);
/// Most cached names; the cache is emptied when it would grow past this.
const DNS_CACHE_MAX: usize = 4096;

/// UDP datagrams decided from one batch, waiting to go out together: the listener to send
/// from, and the destination and bytes.
#[derive(Default)]
struct Outbox {
    listeners: Vec<usize>,
    items: Vec<(SocketAddr, Bytes)>,
}

impl Outbox {
    /// Keep `out` when it is a UDP datagram to an address; anything else comes back to be sent
    /// at once.
    fn hold(&mut self, out: Outbound) -> Option<Outbound> {
        match (out.transport, &out.to) {
            (Transport::Udp, NextHop::Addr(addr)) => {
                self.listeners.push(out.listener);
                self.items.push((*addr, out.data));
                None
            }
            _ => Some(out),
        }
    }
}

/// The sending end of a TCP connection's queue: bounded in bytes (`tcp.send_queue_kib`), so a
/// busy carrier connection gets room for many small messages and a stalled one holds at most the
/// budget.
#[derive(Clone)]
struct ConnTx {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    budget: usize,
}

/// The writer's end: takes messages and gives their bytes back to the budget.
struct ConnRx {
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// A connection's queue holding at most `budget` bytes (a lone message larger than the budget
/// still goes when the queue is empty).
fn conn_queue(budget: usize) -> (ConnTx, ConnRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        ConnTx {
            tx,
            queued: queued.clone(),
            budget,
        },
        ConnRx { rx, queued },
    )
}

impl ConnTx {
    /// Queue `b`, or give it back when the budget is spent or the writer is gone.
    fn try_send(&self, b: Bytes) -> Result<(), Bytes> {
        let n = b.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        if before > 0 && before + n > self.budget {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Err(b);
        }
        self.tx.send(b).map_err(|e| {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            e.0
        })
    }
}

impl ConnRx {
    /// The next message, waiting for one; `None` once every sender is gone and it is empty.
    async fn recv(&mut self) -> Option<Bytes> {
        let b = self.rx.recv().await?;
        self.queued.fetch_sub(b.len(), Ordering::AcqRel);
        Some(b)
    }

    /// The next message if one is queued.
    fn try_recv(&mut self) -> Option<Bytes> {
        let b = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(b.len(), Ordering::AcqRel);
        Some(b)
    }

    fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// No more messages may be queued (what is queued can still be taken).
    fn close(&mut self) {
        self.rx.close();
    }
}

struct ConnHandle {
    tx: ConnTx,
    peer: SocketAddr,
}

/// Open TCP connections, by id and by peer address (for reuse). Ids start at a random point per
/// process, so a response carrying a stale `;i=` from before a restart finds no connection
/// rather than someone else's.
struct ConnTable {
    next: AtomicU64,
    by_id: DashMap<ConnId, ConnHandle>,
    by_peer: DashMap<SocketAddr, ConnId>,
}

impl Default for ConnTable {
    fn default() -> Self {
        use std::hash::BuildHasher;
        let epoch = std::collections::hash_map::RandomState::new().hash_one(0u8) & 0xffff_ffff;
        Self {
            next: AtomicU64::new(epoch << 32),
            by_id: DashMap::new(),
            by_peer: DashMap::new(),
        }
    }
}

impl ConnTable {
    fn insert(&self, peer: SocketAddr, tx: ConnTx) -> ConnId {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.by_id.insert(id, ConnHandle { tx, peer });
        self.by_peer.insert(peer, id);
        id
    }

    fn remove(&self, id: ConnId) {
        if let Some((_, h)) = self.by_id.remove(&id) {
            self.by_peer.remove_if(&h.peer, |_, v| *v == id);
        }
    }

    fn sender(&self, id: ConnId) -> Option<ConnTx> {
        self.by_id.get(&id).map(|h| h.tx.clone())
    }

    fn sender_to(&self, peer: SocketAddr) -> Option<ConnTx> {
        let id = *self.by_peer.get(&peer)?;
        self.sender(id)
    }
}

/// The optional parts the shell works with, each present when its section is configured.
#[derive(Default)]
pub struct Helpers {
    /// `[alerts]`: refusals are reported to it.
    pub alerts: Option<Arc<crate::alerts::Alerts>>,
    /// `[cluster]`: shared buckets are asked of it.
    pub cluster: Option<Arc<Cluster>>,
    /// `[flood]`: every packet passes it first.
    pub flood: Option<Arc<FloodGuard>>,
}

/// One open inbound connection of a source IP, counted while it lives.
struct SourceSlot {
    table: Arc<DashMap<std::net::IpAddr, usize>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    /// A slot for `ip`, unless it has `cap` connections open already.
    fn take(
        table: &Arc<DashMap<std::net::IpAddr, usize>>,
        ip: std::net::IpAddr,
        cap: usize,
    ) -> Option<Self> {
        let mut open = table.entry(ip).or_insert(0);
        if *open >= cap {
            return None;
        }
        *open += 1;
        Some(Self {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        // The last connection of a source removes its entry: the table holds open IPs only.
        self.table.remove_if_mut(&self.ip, |_, open| {
            *open = open.saturating_sub(1);
            *open == 0
        });
    }
}

/// Everything the transport tasks share.
pub struct Shell {
    proxy: Arc<Proxy>,
    stats: Arc<Stats>,
    udp: Vec<Option<Arc<UdpSocket>>>,
    conns: ConnTable,
    tcp: TcpSettings,
    max_message: usize,
    /// Inbound and outbound connections have separate pools, so a flood of inbound
    /// connections cannot stop the gate from reaching its carriers.
    inbound_slots: Arc<Semaphore>,
    /// Open inbound connections per source IP (only IPs with one open).
    inbound_per_source: Arc<DashMap<std::net::IpAddr, usize>>,
    outbound_slots: Arc<Semaphore>,
    lookups: Arc<Semaphore>,
    dns: DashMap<(String, u16), (SocketAddr, Instant)>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    alerts: Option<Arc<crate::alerts::Alerts>>,
    cluster: Option<Arc<Cluster>>,
    flood: Option<Arc<FloodGuard>>,
    /// A dead carrier fails every connection attempt: one warning a second says so.
    connect_log: LineBudget,
}

impl Shell {
    /// Build the shell. `udp[i]` is listener `i`'s UDP socket, if it serves UDP; the limits are
    /// the TCP settings and the largest message.
    pub fn new(
        proxy: Arc<Proxy>,
        stats: Arc<Stats>,
        udp: Vec<Option<Arc<UdpSocket>>>,
        (tcp, max_message): (TcpSettings, usize),
        cancel: CancellationToken,
        tracker: TaskTracker,
        Helpers {
            alerts,
            cluster,
            flood,
        }: Helpers,
    ) -> Arc<Self> {
        Arc::new(Self {
            proxy,
            stats,
            udp,
            conns: ConnTable::default(),
            inbound_slots: Arc::new(Semaphore::new(tcp.max_connections)),
            inbound_per_source: Arc::new(DashMap::new()),
            outbound_slots: Arc::new(Semaphore::new(tcp.max_connections)),
            dns: DashMap::new(),
            tcp,
            max_message,
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            cancel,
            tracker,
            alerts,
            cluster,
            flood,
            connect_log: LineBudget::new(1),
        })
    }

    /// The flood guard, when `[flood]` is configured.
    pub fn flood(&self) -> Option<&Arc<FloodGuard>> {
        self.flood.as_ref()
    }

    /// The flood guard's verdict on a packet from `src`; a drop is counted (with a debug log).
    fn flooding(&self, src: SocketAddr) -> bool {
        let Some(guard) = &self.flood else {
            return false;
        };
        match guard.check(src, Instant::now()) {
            Verdict::Pass => false,
            Verdict::Drop => {
                self.stats.transport_drop(TransportDrop::Flood, src);
                true
            }
            Verdict::Block => {
                self.stats.flood_blocks.fetch_add(1, Ordering::Relaxed);
                self.stats.transport_drop(TransportDrop::Flood, src);
                true
            }
        }
    }

    /// Count and log one decision, and tell the alert monitor about refusals.
    fn observe(&self, action: &Action, peer: SocketAddr, transport: Transport) {
        self.stats.record(action, peer, transport);
        if let (Some(a), Action::Reject(r, _)) = (&self.alerts, action)
            && !r.retransmission
        {
            a.notify(r);
        }
    }

    /// Number of open TCP connections.
    pub fn connection_count(&self) -> usize {
        self.conns.by_id.len()
    }

    /// Receive datagrams on listener `listener` until cancelled. Each wake reads what the socket
    /// holds (up to a batch, one system call), decides every datagram, then sends the batch's
    /// UDP answers and forwards together.
    pub async fn run_udp(self: Arc<Self>, listener: usize, sock: Arc<UdpSocket>) {
        let mut batch = RecvBatch::new(UDP_BUF);
        let mut outbox = Outbox::default();
        // Arrival times of the batch's datagrams that caused a send, for the transit histogram.
        let mut arrivals = Vec::with_capacity(batch::BATCH);
        if let Err(e) = batch::enable_timestamps(&sock) {
            tracing::debug!(error = %e, "no receive timestamps: the transit histogram stays empty");
        }
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = sock.readable() => if let Err(e) = r {
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                },
            }
            let n = match batch.recv(&sock) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on Linux; keep serving.
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                }
            };
            for i in 0..n {
                let (data, src) = batch.get(i);
                // Before anything else: a flooding source costs a hash and a table lookup, and
                // gets no answer.
                if self.flooding(src) {
                    continue;
                }
                let inb = Inbound {
                    data,
                    source: src,
                    transport: Transport::Udp,
                    listener,
                    conn: None,
                };
                let action = if data.len() > self.max_message {
                    self.stats.transport_drop(TransportDrop::Oversize, src);
                    self.proxy.refuse_raw(&inb, 513, "Message Too Large")
                } else {
                    self.decide(&inb)
                };
                self.observe(&action, src, Transport::Udp);
                let held = outbox.items.len();
                self.execute_held(action, &mut outbox).await;
                if outbox.items.len() > held
                    && let Some(t) = batch.arrived(i)
                {
                    arrivals.push(t);
                }
            }
            self.flush(&mut outbox).await;
            if !arrivals.is_empty() {
                let now = batch::wall_ns();
                for t in arrivals.drain(..) {
                    self.stats.transit.0.observe(now.saturating_sub(t));
                }
            }
        }
    }

    /// [`Shell::execute`], except that a UDP datagram to an address goes into `outbox`, to be
    /// sent with the rest of its batch by [`Shell::flush`].
    async fn execute_held(self: &Arc<Self>, action: Action, outbox: &mut Outbox) {
        match action {
            Action::Forward(out) | Action::Reply(_, out) | Action::Reject(_, out) => {
                if let Some(out) = outbox.hold(out) {
                    self.send(out).await;
                }
            }
            Action::Cancelled(ok, terminated) => {
                for out in [ok, terminated] {
                    if let Some(out) = outbox.hold(out) {
                        self.send(out).await;
                    }
                }
            }
            other => self.execute(other).await,
        }
    }

    /// Send what `outbox` holds, in order: each run of datagrams from one listener's socket in
    /// as few system calls as the kernel allows; what a full socket buffer leaves waits for the
    /// socket to be writable, as a single send would.
    async fn flush(self: &Arc<Self>, outbox: &mut Outbox) {
        let mut start = 0;
        while start < outbox.items.len() {
            let listener = outbox.listeners[start];
            let end = start
                + outbox.listeners[start..]
                    .iter()
                    .take_while(|&&l| l == listener)
                    .count();
            let run = &outbox.items[start..end];
            start = end;
            let Some(sock) = self.udp.get(listener).and_then(Option::as_ref) else {
                for (addr, _) in run {
                    self.stats.transport_drop(TransportDrop::SendFailed, *addr);
                }
                continue;
            };
            let sent = batch::send(sock, run, |addr, e| self.udp_send_failed(addr, e));
            for (addr, data) in &run[sent.done..] {
                if let Err(e) = sock.send_to(data, *addr).await {
                    self.udp_send_failed(*addr, &e);
                }
            }
        }
        outbox.listeners.clear();
        outbox.items.clear();
    }

    fn udp_send_failed(&self, addr: SocketAddr, e: &std::io::Error) {
        tracing::debug!(error = %e, %addr, "udp send failed");
        self.stats.transport_drop(TransportDrop::SendFailed, addr);
    }

    /// Accept TCP connections on listener `listener` until `stop` (or the shell) is cancelled.
    pub async fn run_tcp(
        self: Arc<Self>,
        listener: usize,
        sock: TcpListener,
        stop: CancellationToken,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.cancel.cancelled() => return,
                r = sock.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "tcp accept error");
                        tokio::select! {
                            _ = self.cancel.cancelled() => return,
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        }
                    }
                },
            };
            // A new connection counts as a packet of its source; a flooding one is closed.
            if self.flooding(peer) {
                continue;
            }
            let Ok(permit) = self.inbound_slots.clone().try_acquire_owned() else {
                self.stats.transport_drop(TransportDrop::Capacity, peer);
                continue;
            };
            let Some(source_slot) = SourceSlot::take(
                &self.inbound_per_source,
                peer.ip(),
                self.tcp.max_connections_per_source,
            ) else {
                self.stats.transport_drop(TransportDrop::Capacity, peer);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (tx, rx) = conn_queue(self.tcp.send_queue);
            let id = self.conns.insert(peer, tx);
            self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let shell = self.clone();
            self.tracker.spawn(async move {
                shell.serve_conn(stream, id, peer, listener, rx).await;
                drop((permit, source_slot));
            });
        }
    }

    /// Answer `503` to every waiting call whose slot lies after `deadline` (shutdown; those due
    /// by then go out at their slots).
    pub async fn flush_queue(self: &Arc<Self>, deadline: Instant) {
        for out in self.proxy.flush_queue(Instant::now(), deadline) {
            self.send(out).await;
        }
    }

    /// Run the core on one message, timing it for the latency histogram.
    fn decide(&self, inb: &Inbound<'_>) -> Action {
        let start = Instant::now();
        let action = self.proxy.handle(start, inb);
        self.stats
            .latency
            .observe(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        action
    }

    /// Carry out one decision of the core.
    pub async fn execute(self: &Arc<Self>, action: Action) {
        match action {
            Action::Forward(out) | Action::Reply(_, out) | Action::Reject(_, out) => {
                self.send(out).await
            }
            Action::Cancelled(ok, terminated) => {
                self.send(ok).await;
                self.send(terminated).await;
            }
            Action::Queue(q) => {
                self.send(q.trying).await;
                let shell = self.clone();
                let at = tokio::time::Instant::from_std(q.at);
                self.tracker.spawn(async move {
                    tokio::select! {
                        // Shutdown: a call whose slot has come still goes; the gate answers
                        // the rest (see `flush_queue`).
                        _ = shell.cancel.cancelled() => {
                            if Instant::now() < q.at {
                                return;
                            }
                        }
                        _ = tokio::time::sleep_until(at) => {}
                    }
                    if let Some(out) = shell.proxy.release(q.key, Instant::now()) {
                        shell.send(out).await;
                    }
                });
            }
            Action::Consult(c) => {
                let shell = self.clone();
                self.tracker.spawn(async move {
                    let (source, transport) = c.origin();
                    let outcome = match &shell.cluster {
                        Some(cluster) => cluster.take(&c.buckets).await,
                        None => Outcome::Unavailable(Failure::Error),
                    };
                    let settled = shell.proxy.settle(*c, outcome, Instant::now());
                    if let Some(cluster) = &shell.cluster {
                        if let Some(f) = settled.fallback {
                            cluster.stats.fallback(f);
                        }
                        if let Some(buckets) = settled.refund {
                            // A later local stage refused: the shared cells go back, on their
                            // own (the refusal does not wait for it).
                            let cluster = cluster.clone();
                            shell
                                .tracker
                                .spawn(async move { cluster.refund(&buckets).await });
                        }
                    }
                    shell.observe(&settled.action, source, transport);
                    // A forward, a refusal or a 487 (never another consult).
                    if let Action::Forward(out) | Action::Reject(_, out) | Action::Reply(_, out) =
                        settled.action
                    {
                        shell.send(out).await;
                    }
                });
            }
            Action::Absorb | Action::Drop(_) => {}
        }
    }

    async fn send(self: &Arc<Self>, out: Outbound) {
        let addr = match &out.to {
            NextHop::Addr(a) => *a,
            NextHop::Name { host, port } => {
                self.spawn_lookup(host.clone(), *port, out);
                return;
            }
        };
        self.send_to(addr, out).await;
    }

    async fn send_to(self: &Arc<Self>, addr: SocketAddr, out: Outbound) {
        match out.transport {
            Transport::Udp => {
                let Some(sock) = self.udp.get(out.listener).and_then(Option::as_ref) else {
                    self.stats.transport_drop(TransportDrop::SendFailed, addr);
                    return;
                };
                if let Err(e) = sock.send_to(&out.data, addr).await {
                    self.udp_send_failed(addr, &e);
                }
            }
            Transport::Tcp => {
                let tx = out
                    .conn
                    .and_then(|c| self.conns.sender(c))
                    .or_else(|| self.conns.sender_to(addr));
                match tx {
                    Some(tx) => {
                        if tx.try_send(out.data).is_err() {
                            self.stats.transport_drop(TransportDrop::QueueFull, addr);
                        }
                    }
                    None => self.connect(addr, out.listener, out.data, out.udp_fallback),
                }
            }
            _ => self.stats.transport_drop(TransportDrop::SendFailed, addr),
        }
    }

    fn spawn_lookup(self: &Arc<Self>, host: String, port: u16, out: Outbound) {
        let unresolved: SocketAddr = ([0, 0, 0, 0], port).into();
        let key = (host, port);
        if let Some(hit) = self.dns.get(&key).filter(|e| e.1.elapsed() < DNS_TTL) {
            let addr = hit.0;
            drop(hit);
            let shell = self.clone();
            self.tracker
                .spawn(async move { shell.send_to(addr, out).await });
            return;
        }
        let Ok(permit) = self.lookups.clone().try_acquire_owned() else {
            self.stats
                .transport_drop(TransportDrop::Capacity, unresolved);
            return;
        };
        let shell = self.clone();
        self.tracker.spawn(async move {
            let found = tokio::time::timeout(
                shell.tcp.connect_timeout,
                tokio::net::lookup_host((key.0.clone(), key.1)),
            )
            .await;
            drop(permit);
            // The egress socket decides the family; the destination must be one we may use.
            let want_v4 = shell
                .proxy
                .listeners()
                .get(out.listener)
                .is_none_or(|l| l.bound.is_ipv4());
            let addr = match found {
                Ok(Ok(addrs)) => addrs
                    .filter(|a| a.is_ipv4() == want_v4)
                    .find(|a| shell.proxy.is_safe(*a)),
                _ => None,
            };
            let Some(addr) = addr else {
                tracing::debug!(host = %key.0, port = key.1, "next hop did not resolve to a usable address");
                shell.stats.transport_drop(TransportDrop::ResolveFailed, unresolved);
                return;
            };
            if shell.dns.len() >= DNS_CACHE_MAX {
                shell.dns.clear();
            }
            shell.dns.insert(key, (addr, Instant::now()));
            shell.send_to(addr, out).await;
        });
    }

    /// Open an outbound connection from the listener's address; messages queue in its channel
    /// while it connects. When the connection cannot be made, `udp_fallback` (a request moved to
    /// TCP only because of its size) goes out over UDP instead (RFC 3261 §18.1.1).
    fn connect(
        self: &Arc<Self>,
        peer: SocketAddr,
        listener: usize,
        first: Bytes,
        udp_fallback: Option<(usize, Bytes)>,
    ) {
        let Ok(permit) = self.outbound_slots.clone().try_acquire_owned() else {
            self.stats.transport_drop(TransportDrop::Capacity, peer);
            return;
        };
        let local = self
            .proxy
            .listeners()
            .get(listener)
            .map(|l| l.bound.ip())
            .filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == peer.is_ipv4());
        let (tx, mut rx) = conn_queue(self.tcp.send_queue);
        // The message this connection is opened for is queued first, before anyone else can
        // find the connection: if it fails, the first queued message is that one.
        let _ = tx.try_send(first);
        let id = self.conns.insert(peer, tx);
        let shell = self.clone();
        self.tracker.spawn(async move {
            let connected =
                tokio::time::timeout(shell.tcp.connect_timeout, connect_from(local, peer)).await;
            match connected {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    shell.stats.connections.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, id, "tcp connected");
                    shell.serve_conn(s, id, peer, listener, rx).await;
                }
                failed => {
                    let (why, answer) = match failed {
                        Ok(Err(e)) => (e.to_string(), UNREACHABLE),
                        _ => ("timed out".to_owned(), CONNECT_TIMEOUT),
                    };
                    match shell.connect_log.admit(Instant::now()) {
                        Some(left_out) => tracing::warn!(
                            %peer,
                            error = %why,
                            other_failures_not_logged = left_out,
                            "tcp connect failed"
                        ),
                        None => tracing::debug!(%peer, error = %why, "tcp connect failed"),
                    }
                    shell.conns.remove(id);
                    shell
                        .stats
                        .transport_drop(TransportDrop::ConnectFailed, peer);
                    // What was queued for the connection: requests are answered as if the next
                    // hop had answered them (RFC 3261 §16.9); the first one, which opened the
                    // connection, goes over UDP instead when it can.
                    rx.close();
                    let mut skip = udp_fallback.is_some();
                    while let Some(queued) = rx.try_recv() {
                        if std::mem::take(&mut skip) {
                            continue;
                        }
                        let (code, reason) = answer;
                        if let Some(action) =
                            shell
                                .proxy
                                .undeliverable(Instant::now(), &queued, code, reason)
                        {
                            shell.observe(&action, peer, Transport::Tcp);
                            shell.execute(action).await;
                        }
                    }
                    if let Some((l, data)) = udp_fallback {
                        let out = Outbound {
                            to: NextHop::Addr(peer),
                            transport: Transport::Udp,
                            listener: l,
                            conn: None,
                            data,
                            udp_fallback: None,
                        };
                        shell.send_to(peer, out).await;
                    }
                }
            }
            drop(permit);
        });
    }

    /// Read, frame and handle messages of one connection; a writer task drains its queue. The
    /// connection ends on idle timeout, peer close, a framing error, or shutdown.
    async fn serve_conn(
        self: Arc<Self>,
        stream: TcpStream,
        id: ConnId,
        peer: SocketAddr,
        listener: usize,
        mut rx: ConnRx,
    ) {
        let (mut rd, mut wr) = stream.into_split();
        // The writer cancels `dead` when it gives up, so the reader stops too.
        let dead = CancellationToken::new();
        let dead_guard = dead.clone().drop_guard();
        let writer = self.tracker.spawn(async move {
            let _dead = dead_guard;
            // What is queued when the writer wakes goes out in one write (one system call, and
            // with TCP_NODELAY as few segments as the bytes need), up to WRITE_BATCH bytes.
            let mut out = BytesMut::new();
            while let Some(first) = rx.recv().await {
                let pending = gather(&first, &mut rx, &mut out);
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(pending)).await {
                    Ok(Ok(())) => {}
                    _ => {
                        tracing::debug!(%peer, id, "tcp write failed or stalled; closing");
                        return;
                    }
                }
            }
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
        });
        let mut buf = BytesMut::with_capacity(4096);
        let mut framer = Framer::default();
        // When the first byte of the message being read arrived (none while between messages).
        let mut started: Option<Instant> = None;
        'conn: loop {
            loop {
                match framer.next_frame(&mut buf, self.max_message) {
                    Ok(Some(Frame::Message(m))) => {
                        started = None;
                        // A connection whose source floods is closed: its messages would only
                        // be dropped.
                        if self.flooding(peer) {
                            break 'conn;
                        }
                        let inb = Inbound {
                            data: &m,
                            source: peer,
                            transport: Transport::Tcp,
                            listener,
                            conn: Some(id),
                        };
                        let action = self.decide(&inb);
                        self.observe(&action, peer, Transport::Tcp);
                        self.execute(action).await;
                    }
                    Ok(Some(Frame::Ping)) => {
                        self.stats.pings.fetch_add(1, Ordering::Relaxed);
                        if let Some(tx) = self.conns.sender(id) {
                            let _ = tx.try_send(Bytes::from_static(b"\r\n"));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let kind = if e.code == 413 {
                            TransportDrop::Oversize
                        } else {
                            TransportDrop::BadFraming
                        };
                        self.stats.transport_drop(kind, peer);
                        let inb = Inbound {
                            data: &e.head,
                            source: peer,
                            transport: Transport::Tcp,
                            listener,
                            conn: Some(id),
                        };
                        let action = self.proxy.refuse_raw(&inb, e.code, e.reason);
                        self.observe(&action, peer, Transport::Tcp);
                        self.execute(action).await;
                        break 'conn;
                    }
                }
            }
            // A message under way must complete within the message timeout, however slowly
            // its bytes keep coming; between messages only the idle timeout applies.
            let now = Instant::now();
            // (Once a message is under way the buffer is not looked through again.)
            // Only CR and LF come between messages (keep-alives); any other byte starts one.
            let partial = started.is_some() || buf.iter().any(|b| !matches!(b, b'\r' | b'\n'));
            let wait = if partial {
                let t0 = *started.get_or_insert(now);
                (t0 + self.tcp.message_timeout)
                    .saturating_duration_since(now)
                    .min(self.tcp.idle_timeout)
            } else {
                started = None;
                self.tcp.idle_timeout
            };
            let read = tokio::select! {
                _ = self.cancel.cancelled() => break,
                // A writer that gave up means the connection is dead.
                _ = dead.cancelled() => break,
                r = tokio::time::timeout(wait, rd.read_buf(&mut buf)) => r,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) if started.is_some_and(|t0| t0.elapsed() >= self.tcp.message_timeout) => {
                    self.stats.transport_drop(TransportDrop::SlowMessage, peer);
                    break;
                }
                Err(_) => {
                    tracing::debug!(%peer, id, "tcp idle timeout");
                    break;
                }
            }
        }
        // Dropping the table's sender lets the writer flush what is queued, then close.
        self.conns.remove(id);
        let _ = writer.await;
    }
}

/// One write's worth for a TCP writer: `first`, and behind it what is already queued on `rx`
/// until [`WRITE_BATCH`] bytes (joined in `out`; `first` alone when nothing waits).
fn gather<'a>(first: &'a Bytes, rx: &mut ConnRx, out: &'a mut BytesMut) -> &'a [u8] {
    if rx.is_empty() {
        return first;
    }
    out.clear();
    out.extend_from_slice(first);
    while out.len() < WRITE_BATCH {
        let Some(more) = rx.try_recv() else { break };
        out.extend_from_slice(&more);
    }
    out
}

/// Connect to `peer`, from `local` when given (so carriers see the listener's address).
async fn connect_from(
    local: Option<std::net::IpAddr>,
    peer: SocketAddr,
) -> std::io::Result<TcpStream> {
    let sock = if peer.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    sock.connect(peer).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tcp_writer_joins_what_is_queued_into_one_write_up_to_its_budget() {
        let (tx, mut rx) = conn_queue(1 << 20);
        let mut out = BytesMut::new();
        // Nothing behind the first: it goes alone.
        let lone = Bytes::from_static(b"INVITE");
        assert_eq!(gather(&lone, &mut rx, &mut out), b"INVITE");
        // Three queued: one write of all three, in order.
        for m in ["a", "bb", "ccc"] {
            assert!(tx.try_send(Bytes::from(m)).is_ok());
        }
        let first = rx.recv().await.expect("first");
        assert_eq!(gather(&first, &mut rx, &mut out), b"abbccc");
        assert!(rx.is_empty());
        // Past the budget the rest waits for the next write.
        let big = Bytes::from(vec![b'x'; WRITE_BATCH / 2 + 1]);
        for _ in 0..3 {
            assert!(tx.try_send(big.clone()).is_ok());
        }
        let first = rx.recv().await.expect("first");
        assert_eq!(gather(&first, &mut rx, &mut out).len(), 2 * big.len());
        let first = rx.recv().await.expect("the third is still queued");
        assert_eq!(gather(&first, &mut rx, &mut out).len(), big.len());
    }

    #[tokio::test]
    async fn a_connection_queue_is_bounded_in_bytes_not_messages() {
        let (tx, mut rx) = conn_queue(1000);
        // Many small messages fit where a count of 256 would have refused them.
        for _ in 0..500 {
            assert!(tx.try_send(Bytes::from_static(b"a")).is_ok());
        }
        assert!(tx.try_send(Bytes::from(vec![b'b'; 500])).is_ok());
        // 1 000 bytes queued: one more byte is refused, and given back.
        let refused = tx
            .try_send(Bytes::from_static(b"c"))
            .expect_err("over budget");
        assert_eq!(refused, Bytes::from_static(b"c"));
        // What the writer takes frees its bytes.
        assert_eq!(rx.recv().await.expect("queued"), Bytes::from_static(b"a"));
        assert!(tx.try_send(Bytes::from_static(b"c")).is_ok());
        while rx.try_recv().is_some() {}
        // A lone message larger than the budget still goes on an empty queue, not behind one.
        let huge = Bytes::from(vec![b'h'; 5000]);
        assert!(tx.try_send(huge.clone()).is_ok());
        assert!(tx.try_send(Bytes::from_static(b"d")).is_err());
        assert_eq!(rx.recv().await.expect("queued"), huge);
        // A closed queue refuses.
        rx.close();
        assert!(tx.try_send(Bytes::from_static(b"e")).is_err());
    }
}
