//! Wiring: bind every listener, build the core, spawn the transport tasks, and shut down in one
//! direction (shutdown future → cancel → loops stop → in-flight work finishes → grace timeout).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Listener};
use crate::proxy::{LocalListener, Proxy};
use crate::sip::Transport;
use crate::telemetry::Stats;
use crate::transport::Shell;

/// After the drain, how long queued TCP writes may take to flush.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Tries to find a port free for both UDP and TCP when a listener asks for port 0.
const PORT_ATTEMPTS: usize = 16;

/// A gate whose sockets are bound but not yet served.
pub struct Gate {
    alerts: Option<Arc<crate::alerts::Alerts>>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    proxy: Arc<Proxy>,
    admin: Option<(TcpListener, Option<String>)>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    listeners: Vec<Listener>,
    config_path: Option<PathBuf>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    reload: Arc<Notify>,
    shell: Arc<Shell>,
    stats: Arc<Stats>,
    udp: Vec<(usize, Arc<UdpSocket>)>,
    tcp: Vec<(usize, TcpListener)>,
    addrs: Vec<(Transport, SocketAddr)>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    grace: std::time::Duration,
}

impl Gate {
    /// Bind every configured listener and build the core. Errors name the address.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Self> {
        for w in &cfg.warnings {
            tracing::warn!("config: {w}");
        }
        if cfg.proxy.secret.is_none() {
            tracing::info!(
                "no [proxy] secret: branch and To-tag keys are random for this run (set one when several instances serve the same peers)"
            );
        }
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut locals = Vec::new();
        let mut addrs = Vec::new();
        for (i, l) in cfg.listeners.iter().enumerate() {
            let (u, t, bound) = bind_listener(l, cfg).await?;
            if let Some(u) = u {
                addrs.push((Transport::Udp, bound));
                udp.push((i, Arc::new(u)));
            }
            if let Some(t) = t {
                addrs.push((Transport::Tcp, bound));
                tcp.push((i, t));
            }
            let (host, port) = match &l.advertise {
                Some((h, p)) => (h.clone(), p.unwrap_or(bound.port())),
                None => (bound.ip().to_string(), bound.port()),
            };
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            locals.push(LocalListener {
                bound,
                host,
                port,
                udp: l.udp,
                tcp: l.tcp,
            });
        }
        let proxy = Arc::new(Proxy::new(cfg, locals).context("building the proxy core")?);
        let stats = Arc::new(Stats::default());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut udp_by_listener = vec![None; cfg.listeners.len()];
        for (i, s) in &udp {
            udp_by_listener[*i] = Some(s.clone());
        }
        let alerts = cfg
            .alerts
            .clone()
            .map(|a| crate::alerts::Alerts::start(a, proxy.clone(), cancel.clone(), &tracker));
        // Redis is connected lazily: a gate starts (under its failure policy) without it.
        let cluster = match &cfg.cluster {
            Some(c) => Some(crate::cluster::Cluster::start(c)?),
            None => None,
        };
        let flood = cfg
            .flood
            .as_ref()
            .map(|f| Arc::new(crate::flood::FloodGuard::new(f, Instant::now())));
        let shell = Shell::new(
            proxy.clone(),
            stats.clone(),
            udp_by_listener,
            (cfg.tcp, cfg.proxy.max_message_size),
            cancel.clone(),
            tracker.clone(),
            crate::transport::Helpers {
                alerts: alerts.clone(),
                cluster: cluster.clone(),
                flood,
            },
        );
        let admin = match &cfg.admin {
            Some(a) => Some((
                TcpListener::bind(a.address)
                    .await
                    .with_context(|| format!("binding the admin listener {}", a.address))?,
                a.token.clone(),
            )),
            None => None,
        };
        Ok(Self {
            alerts,
            cluster,
            proxy,
            admin,
            ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            listeners: cfg.listeners.clone(),
            config_path: None,
            #[cfg(unix)]
            hangup: None,
            reload: Arc::new(Notify::new()),
            shell,
            stats,
            udp,
            tcp,
            addrs,
            cancel,
            tracker,
            grace: cfg.proxy.shutdown_grace,
        })
    }

    /// Reload the configuration from `path` on SIGHUP, when the file changes (checked every
    /// two seconds), or when [`Gate::reload_trigger`] is notified.
    pub fn watch(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        // Installed now, not when the watcher task first runs: a SIGHUP that comes early must
        // not meet the default action (terminate).
        #[cfg(unix)]
        {
            self.hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        }
        self
    }

    fn reload_targets(&self) -> ReloadTargets {
        ReloadTargets {
            proxy: self.proxy.clone(),
            stats: self.stats.clone(),
            listeners: self.listeners.clone(),
            flood: self.shell.flood().cloned(),
        }
    }

    /// Notify this to reload the configuration file now.
    pub fn reload_trigger(&self) -> Arc<Notify> {
        self.reload.clone()
    }

    /// The Redis client, when `[cluster]` is configured (for its counters).
    pub fn cluster(&self) -> Option<Arc<crate::cluster::Cluster>> {
        self.cluster.clone()
    }

    /// The alert handle, when `[alerts]` is configured (for its counters).
    pub fn alerts(&self) -> Option<Arc<crate::alerts::Alerts>> {
        self.alerts.clone()
    }

    /// The proxy core (for inspection).
    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    /// The admin API's bound address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The bound addresses, by transport, in config order.
    pub fn local_addrs(&self) -> &[(Transport, SocketAddr)] {
        &self.addrs
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serve until `shutdown` completes, then drain: for the grace period new calls are turned
    /// away with 503 (so PBXs fail over), new TCP connections are refused, and everything that
    /// belongs to existing calls — responses, ACK, CANCEL, BYE — is still relayed. Then every
    /// loop stops and queued TCP writes get a last moment to flush.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        // Logged here, once every signal handler is in place: whoever waits for these lines may
        // signal the process at once.
        for (t, a) in &self.addrs {
            tracing::info!("listening on {} {a}", t.as_via().to_ascii_lowercase());
        }
        let targets = self.reload_targets();
        let accept_stop = CancellationToken::new();
        for (i, s) in self.udp {
            self.tracker.spawn(self.shell.clone().run_udp(i, s));
        }
        for (i, l) in self.tcp {
            self.tracker
                .spawn(self.shell.clone().run_tcp(i, l, accept_stop.clone()));
        }
        if let Some((listener, token)) = self.admin.take() {
            if let Ok(a) = listener.local_addr() {
                tracing::info!("{}", crate::admin::describe(a));
            }
            let reloader: Option<crate::admin::Reloader> = self.config_path.clone().map(|path| {
                let targets = targets.clone();
                let f: crate::admin::Reloader =
                    Arc::new(move || reload(&path, &targets, "admin API"));
                f
            });
            let state = crate::admin::AdminState::with_alerts(
                self.proxy.clone(),
                self.stats.clone(),
                token,
                self.ready.clone(),
                reloader,
                self.alerts.clone(),
            )
            .with_cluster(self.cluster.clone());
            self.tracker
                .spawn(crate::admin::serve(listener, state, self.cancel.clone()));
        }
        // Every SIP listener is bound (in `bind`) and now served.
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        self.tracker.spawn(sweep_tables(
            self.proxy.clone(),
            self.shell.flood().cloned(),
            self.cancel.clone(),
        ));
        if let Some(path) = self.config_path.clone() {
            #[cfg(unix)]
            let hangup = self.hangup.take();
            #[cfg(not(unix))]
            let hangup = None;
            self.tracker.spawn(watch_config(
                path,
                hangup,
                targets,
                self.reload.clone(),
                self.cancel.clone(),
            ));
        }
        shutdown.await;
        tracing::info!(
            grace_secs = self.grace.as_secs(),
            "draining: new calls get 503, existing calls are still relayed"
        );
        self.proxy.start_draining();
        // Load balancers stop sending new calls here.
        self.ready
            .store(false, std::sync::atomic::Ordering::Release);
        accept_stop.cancel();
        // Paced calls due within the grace period go out at their slots; the later ones are
        // answered 503 now, and whatever is still waiting at the end as well.
        self.shell.flush_queue(Instant::now() + self.grace).await;
        tokio::time::sleep(self.grace).await;
        self.shell.flush_queue(Instant::now()).await;
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(FLUSH_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not flush in time");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// How often idle table entries are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Forget idle buckets and old decisions regularly, and log the table sizes against their caps.
async fn sweep_tables(
    proxy: Arc<Proxy>,
    flood: Option<Arc<crate::flood::FloodGuard>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let t = proxy.sweep(Instant::now());
        if let Some(f) = &flood {
            f.sweep(Instant::now());
            tracing::debug!(
                tracked = f.tracked(),
                blocked = f.blocked_now(),
                dropped = f.dropped(),
                "flood guard swept"
            );
        }
        tracing::debug!(
            sources = t.sources.0,
            sources_cap = t.sources.1,
            sources_evicted = t.sources.2,
            usernames = t.usernames.map_or(0, |u| u.0),
            decisions = t.decisions.0,
            decisions_cap = t.decisions.1,
            "tables swept"
        );
        // Near the cap, evictions start to cost accuracy: say so where operators look.
        if t.sources.0 * 10 >= t.sources.1 * 9 || t.decisions.0 * 10 >= t.decisions.1 * 9 {
            tracing::warn!(
                sources = t.sources.0,
                sources_cap = t.sources.1,
                decisions = t.decisions.0,
                decisions_cap = t.decisions.1,
                "bounded tables are over 90 % full"
            );
        }
    }
}

/// How often the config file's modification time is checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Reload on SIGHUP, on a change of the file, or on `trigger`, until cancelled. An invalid file
/// is refused with its errors logged; the running configuration stays.
async fn watch_config(
    path: PathBuf,
    #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))] _hup: Option<()>,
    targets: ReloadTargets,
    trigger: Arc<Notify>,
    cancel: CancellationToken,
) {
    let stamp = |p: &PathBuf| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
    };
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let why = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = hangup => "SIGHUP",
            _ = trigger.notified() => "request",
            _ = tick.tick() => {
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                "file changed"
            }
        };
        // Reading the file and resolving names block: off the async workers.
        let (p, t) = (path.clone(), targets.clone());
        let _ = tokio::task::spawn_blocking(move || reload(&p, &t, why)).await;
    }
}

/// True when the new configuration was applied.
/// Reload from `path`, log the outcome and count it; the error lists what is wrong.
fn reload(path: &std::path::Path, targets: &ReloadTargets, why: &str) -> Result<(), String> {
    let stats = &targets.stats;
    let result = apply(path, targets);
    match &result {
        Ok(n) => {
            tracing::info!(
                reason = why,
                trunks = n.0,
                accounts = n.1,
                "config reloaded"
            );
            stats
                .reloads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => {
            tracing::error!(
                reason = why,
                "config reload refused, the running configuration stays:\n{e}"
            );
            stats
                .reload_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    result.map(|_| ())
}

fn apply(path: &std::path::Path, targets: &ReloadTargets) -> Result<(usize, usize), String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    if cfg.listeners != targets.listeners {
        tracing::warn!("[[listen]] changes take effect at the next start only");
    }
    // These are read once at start; a reload applies everything else.
    tracing::debug!(
        "[admin], [alerts], [flood] limits, proxy.secret, limits.table_size, limits.decision_cache_size, [usage], cluster.urls and cluster.timeout_ms take effect at the next start"
    );
    for w in &cfg.warnings {
        tracing::warn!("config: {w}");
    }
    targets
        .proxy
        .reload(&cfg, Instant::now())
        .map_err(|e| e.to_string())?;
    // The flood guard follows the new carriers and PBX (its limits are read at start).
    if let (Some(guard), Some(f)) = (&targets.flood, &cfg.flood) {
        guard.set_exempt(f.exempt.clone());
    }
    Ok((cfg.trunks.len(), cfg.accounts.len()))
}

/// What a reload changes and reports to.
#[derive(Clone)]
struct ReloadTargets {
    proxy: Arc<Proxy>,
    stats: Arc<Stats>,
    listeners: Vec<Listener>,
    flood: Option<Arc<crate::flood::FloodGuard>>,
}

async fn bind_listener(
    l: &Listener,
    cfg: &Config,
) -> anyhow::Result<(Option<UdpSocket>, Option<TcpListener>, SocketAddr)> {
    let attempts = if l.address.port() == 0 && l.udp && l.tcp {
        PORT_ATTEMPTS
    } else {
        1
    };
    let mut last_err = None;
    for _ in 0..attempts {
        let udp = if l.udp {
            Some(bind_udp(l.address, cfg).with_context(|| format!("binding udp {}", l.address))?)
        } else {
            None
        };
        let addr = match &udp {
            Some(u) => u.local_addr()?,
            None => l.address,
        };
        if !l.tcp {
            return Ok((udp, None, addr));
        }
        match bind_tcp(addr) {
            Ok(t) => {
                let bound = t.local_addr()?;
                return Ok((udp, Some(t), bound));
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.expect("at least one attempt"))
        .with_context(|| format!("binding tcp {}", l.address))
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // IPv6 listeners serve IPv6 only, like their UDP twins, so `0.0.0.0` and `[::]` can both
    // be configured on one port.
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

fn bind_udp(addr: SocketAddr, cfg: &Config) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // Large buffers absorb bursts; the kernel may cap them (net.core.rmem_max), which is fine.
    let _ = sock.set_recv_buffer_size(cfg.udp.recv_buffer);
    let _ = sock.set_send_buffer_size(cfg.udp.send_buffer);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, before the
/// future is first polled, so call it before anything announces that the gate is up.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        let int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
        async move {
            let (mut term, mut int) = (term, int);
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
