//! Wiring: bind every listener, build the core, spawn the transport tasks, and shut down in one
//! direction (shutdown future → cancel → loops stop → in-flight work finishes → grace timeout).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
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
    proxy: Arc<Proxy>,
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
                tracing::info!(listener = %l.name, "listening on udp {bound}");
                addrs.push((Transport::Udp, bound));
                udp.push((i, Arc::new(u)));
            }
            if let Some(t) = t {
                tracing::info!(listener = %l.name, "listening on tcp {bound}");
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
        let shell = Shell::new(
            proxy.clone(),
            stats.clone(),
            udp_by_listener,
            cfg.tcp,
            cfg.proxy.max_message_size,
            cancel.clone(),
            tracker.clone(),
        );
        Ok(Self {
            proxy,
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
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let accept_stop = CancellationToken::new();
        for (i, s) in self.udp {
            self.tracker.spawn(self.shell.clone().run_udp(i, s));
        }
        for (i, l) in self.tcp {
            self.tracker
                .spawn(self.shell.clone().run_tcp(i, l, accept_stop.clone()));
        }
        shutdown.await;
        tracing::info!(
            grace_secs = self.grace.as_secs(),
            "draining: new calls get 503, existing calls are still relayed"
        );
        self.proxy.start_draining();
        accept_stop.cancel();
        tokio::time::sleep(self.grace).await;
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

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
