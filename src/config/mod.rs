//! Configuration: the TOML file ([`raw`]) is validated into [`Config`]. Every problem is reported at
//! once, each with its line, key and bad value; nothing is bound before the file is valid.

mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::routing::Cidr;
use crate::sip::Transport;

/// Default cap on one SIP message (header section plus body), bytes.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Local addresses to serve.
    pub listeners: Vec<Listener>,
    /// Proxy-wide behaviour.
    pub proxy: ProxySettings,
    /// UDP socket options.
    pub udp: UdpSettings,
    /// TCP limits.
    pub tcp: TcpSettings,
    /// Where requests from carriers go.
    pub pbx: Option<Target>,
    /// Source networks of the PBX (its address when not given): its in-dialog requests are
    /// trusted even when it matches no trunk.
    pub pbx_sources: Vec<Cidr>,
    /// Carrier endpoints.
    pub upstreams: Vec<Upstream>,
    /// Parent accounts (pooled limits).
    pub accounts: Vec<Account>,
    /// Trunks, in match order.
    pub trunks: Vec<Trunk>,
    /// The stages beyond trunks and accounts.
    pub limits: Limits,
    /// The answer to a call over a limit.
    pub reply: Reply,
    /// The admin listener, when `[admin]` is present.
    pub admin: Option<Admin>,
    /// The alert webhook, when `[alerts]` is present.
    pub alerts: Option<AlertSettings>,
    /// The traffic profile.
    pub usage: UsageSettings,
    /// Shared buckets in Redis, when `[cluster]` is present.
    pub cluster: Option<ClusterConfig>,
    /// The per-source packet-rate guard, when `[flood]` is present.
    pub flood: Option<FloodSettings>,
    /// A digest of the file's text (shown by the admin API, changes with every edit).
    pub digest: String,
    /// Legal but risky choices, logged at start and printed by `check-config`.
    pub warnings: Vec<String>,
}

/// `[flood]`: sources sending more packets than this are dropped for a while, before any
/// parsing and without any answer (Kamailio's pike, in front of everything).
#[derive(Debug, Clone, PartialEq)]
pub struct FloodSettings {
    /// Packets per second per source IP (datagrams, or messages on a connection).
    pub rate: u32,
    /// Packets a source may send back to back.
    pub burst: u32,
    /// How long a source that went over is dropped.
    pub block: std::time::Duration,
    /// Most sources tracked at once (buckets and blocks each).
    pub table_size: usize,
    /// Sources never guarded: the carriers' `sources` and the PBX's, plus `exempt` (an entry
    /// with a port exempts that exact source only).
    pub exempt: Vec<Cidr>,
}

/// `[cluster]`: buckets shared with other gates through Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Redis servers, in order of preference (each a `redis://` URL).
    pub urls: Vec<String>,
    /// Longest a call waits for Redis before the failure policy decides.
    pub timeout: std::time::Duration,
    /// What decides while Redis does not answer.
    pub on_failure: FailurePolicy,
    /// Gates expected to share the pools (`local_share` enforces rate ÷ instances here).
    pub instances: u32,
    /// Prefix of the Redis keys (`<prefix>account:<name>`, `<prefix>trunk:<name>`).
    pub key_prefix: String,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A Redis password in a URL never reaches a log line.
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| crate::cluster::redact(u))
            .collect();
        f.debug_struct("ClusterConfig")
            .field("urls", &urls)
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .field("instances", &self.instances)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// `cluster.on_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Each gate enforces its share of the limit (rate ÷ instances) locally.
    LocalShare,
    /// Admit without the shared check (the local stages still apply).
    Open,
    /// Refuse calls that need the shared check.
    Closed,
}

impl FailurePolicy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::LocalShare => "local_share",
            FailurePolicy::Open => "open",
            FailurePolicy::Closed => "closed",
        }
    }
}

/// `[usage]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSettings {
    /// Period of the per-second peaks and their 95th percentile, seconds.
    pub period_secs: u64,
    /// Most calls followed at once for ASR/ACD (admitted, not yet ended).
    pub dialog_table_size: usize,
    /// A call followed longer than this is forgotten (its BYE never came).
    pub max_call_secs: u64,
}

/// `[alerts]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    /// The webhook URL as written (for logs).
    pub url: String,
    /// Its host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Its path (with query).
    pub path: String,
    /// At most one start event per key per this interval; also the quiet time that ends an
    /// episode.
    pub debounce: std::time::Duration,
    /// Per attempt.
    pub timeout: std::time::Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// Events waiting for delivery before new ones are dropped.
    pub queue: usize,
}

/// `[admin]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where the HTTP admin API listens.
    pub address: SocketAddr,
    /// Bearer token for the mutating endpoints; without one they are refused.
    pub token: Option<String>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token never reaches a log line.
        f.debug_struct("Admin")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Per-source-IP limit for traffic on no trunk (`unknown_sources = "limit"`).
    pub unknown_source: Limit,
    /// Per-SIP-username limit, if any.
    pub username: Option<Limit>,
    /// Global protection limit, if any.
    pub global: Option<Limit>,
    /// Cap of the per-source and per-username tables (each).
    pub table_size: usize,
    /// Cap of the decision cache (retransmissions, CANCEL, auth retries).
    pub decision_cache_size: usize,
    /// Charge an INVITE re-sent with credentials after a 401/407 again.
    pub charge_auth_retry: bool,
}

/// `[reply]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code (default 503).
    pub code: u16,
    /// Reason phrase per stage, in `limiter::Stage::ALL` order.
    pub reasons: [String; 5],
    /// `Retry-After` range in seconds, when configured.
    pub retry_after: Option<(u32, u32)>,
}

/// One local address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Name used in logs.
    pub name: String,
    /// Address to bind (port 0 picks a free port).
    pub address: SocketAddr,
    /// Serve UDP here.
    pub udp: bool,
    /// Serve TCP here.
    pub tcp: bool,
    /// Host and port written into Via and Record-Route instead of the bound address (for
    /// `0.0.0.0` binds and NAT).
    pub advertise: Option<(String, Option<u16>)>,
}

/// What to do with requests from a source that matches no trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownSources {
    /// Answer `403 Forbidden` (the toll-fraud guard).
    Reject,
    /// Forward to `default_upstream`.
    Forward,
    /// Forward to `default_upstream` under a per-source-IP limit (`[limits] unknown_source`).
    Limit,
}

/// `[proxy]`.
#[derive(Clone, PartialEq)]
pub struct ProxySettings {
    /// Key for branch and To-tag hashing; random per start when absent.
    pub secret: Option<String>,
    /// Extra host names that mean this proxy in Route and Request-URI.
    pub aliases: Vec<String>,
    /// Policy for unmatched sources.
    pub unknown_sources: UnknownSources,
    /// Upstream index for `unknown_sources = "forward"`.
    pub default_upstream: Option<usize>,
    /// Insert Record-Route on dialog-creating requests.
    pub record_route: bool,
    /// Largest accepted message.
    pub max_message_size: usize,
    /// How long the gate drains after SIGTERM/SIGINT (new calls get 503, existing ones are
    /// relayed) before it stops.
    pub shutdown_grace: std::time::Duration,
}

impl fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret keys every branch and To-tag: it never reaches a log line.
        f.debug_struct("ProxySettings")
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("aliases", &self.aliases)
            .field("unknown_sources", &self.unknown_sources)
            .field("default_upstream", &self.default_upstream)
            .field("record_route", &self.record_route)
            .field("max_message_size", &self.max_message_size)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// `[udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// SO_RCVBUF in bytes.
    pub recv_buffer: usize,
    /// SO_SNDBUF in bytes.
    pub send_buffer: usize,
}

/// `[tcp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSettings {
    /// Close a connection with no traffic for this long.
    pub idle_timeout: std::time::Duration,
    /// Give up an outbound connect after this long.
    pub connect_timeout: std::time::Duration,
    /// Most open inbound connections; outbound connections have a pool of the same size of
    /// their own.
    pub max_connections: usize,
    /// Most open inbound connections from one source IP (one peer cannot take every slot).
    pub max_connections_per_source: usize,
    /// Longest a message may take to arrive once its first byte has (a trickle that keeps a
    /// connection from idling out is cut here: slowloris).
    pub message_timeout: std::time::Duration,
    /// Most bytes waiting to be written to one connection; a message that would pass it is
    /// dropped and counted (`queue_full`).
    pub send_queue: usize,
}

/// A destination: host (IP literal or name resolved at start) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host as written.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Transport to use.
    pub transport: Transport,
    /// Listener (index) to send from; the first one that fits when not given.
    pub listener: Option<usize>,
}

/// `[[upstream]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Name referenced by trunks.
    pub name: String,
    /// Where to send.
    pub target: Target,
    /// Source networks this carrier sends from (its address when not given).
    pub sources: Vec<Cidr>,
}

pub use crate::limiter::Limit;

/// `[[account]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// Name referenced by trunks.
    pub name: String,
    /// The pooled limit.
    pub limit: Limit,
    /// `on_limit = "queue"`: the pacing its trunks take unless they set their own `on_limit`.
    pub pacing: Option<Pacing>,
    /// `shared = true`: one pool for every gate of the cluster, kept in Redis.
    pub shared: bool,
}

/// How a trunk is recognised; every given criterion must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrunkMatch {
    /// Source networks.
    pub sources: Vec<Cidr>,
    /// SIP username (Authorization/Proxy-Authorization username, else From user).
    pub username: Option<String>,
    /// A header (name, exact value).
    pub header: Option<(String, String)>,
}

/// `[[trunk]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trunk {
    /// Name.
    pub name: String,
    /// Parent account index.
    pub account: Option<usize>,
    /// Upstream index.
    pub upstream: usize,
    /// The trunk's own limit.
    pub limit: Limit,
    /// How it is recognised.
    pub matcher: TrunkMatch,
    /// `on_limit = "queue"`: pace calls over the limit instead of refusing them.
    pub pacing: Option<Pacing>,
    /// `shared = true`: one bucket for every gate of the cluster, kept in Redis.
    pub shared: bool,
}

/// Pacing of a trunk (`on_limit = "queue"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Longest a call may wait for its slot; beyond it the call is refused.
    pub max_delay: std::time::Duration,
    /// Most calls waiting at once; beyond it the call is refused.
    pub max_queue: usize,
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line (0 when not tied to a line).
    pub line: usize,
    /// Dotted key, e.g. `trunk[2].rate`.
    pub key: String,
    /// The offending value as written (may be empty).
    pub value: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        write!(f, "{}", self.key)?;
        if !self.value.is_empty() {
            write!(f, " = {}", self.value)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file, for messages.
    pub source_name: String,
    /// The problems, in file order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} error(s) in configuration",
            self.source_name,
            self.errors.len()
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::validate(&Self::read(path)?, &path.display().to_string(), true)
    }

    fn read(path: &Path) -> Result<String, ConfigErrors> {
        std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source_name: path.display().to_string(),
            errors: vec![ConfigError {
                line: 0,
                key: String::new(),
                value: String::new(),
                message: format!("cannot read file: {e}"),
            }],
        })
    }

    /// Read and validate a file for a replay (`cpsgate plan`): secrets named by `*_env` keys
    /// may be unset (a replay uses none of them); everything else is checked as for `run`.
    pub fn load_for_replay(path: &Path) -> Result<Self, ConfigErrors> {
        Self::validate(&Self::read(path)?, &path.display().to_string(), false)
    }

    /// Validate TOML text; `source_name` labels the messages.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, ConfigErrors> {
        Self::validate(text, source_name, true)
    }

    fn validate(text: &str, source_name: &str, need_secrets: bool) -> Result<Self, ConfigErrors> {
        let mut v = Validator {
            text,
            errors: Vec::new(),
            need_secrets,
        };
        let cfg = v.document();
        if v.errors.is_empty() {
            Ok(cfg.expect("a document without errors yields a config"))
        } else {
            v.errors.sort_by_key(|e| e.line);
            Err(ConfigErrors {
                source_name: source_name.to_owned(),
                errors: v.errors,
            })
        }
    }
}

struct Validator<'t> {
    text: &'t str,
    errors: Vec<ConfigError>,
    /// False for a replay: an unset `*_env` secret is no error.
    need_secrets: bool,
}

/// Raw sections collected from the document.
#[derive(Default)]
struct RawDoc {
    listen: Vec<raw::Listen>,
    proxy: raw::Proxy,
    udp: raw::Udp,
    tcp: raw::Tcp,
    pbx: Option<raw::Pbx>,
    upstream: Vec<raw::Upstream>,
    account: Vec<raw::Account>,
    trunk: Vec<raw::Trunk>,
    limits: raw::Limits,
    reply: raw::Reply,
    admin: Option<raw::Admin>,
    alerts: Option<raw::Alerts>,
    usage: raw::Usage,
    cluster: Option<raw::Cluster>,
    flood: Option<raw::Flood>,
}

impl<'t> Validator<'t> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        value: impl fmt::Display,
        msg: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            line: self.line(&span),
            key: key.into(),
            value: value.to_string(),
            message: msg.into(),
        });
    }

    fn err_at<T: fmt::Debug>(
        &mut self,
        s: &Spanned<T>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) {
        let value = format!("{:?}", s.get_ref());
        self.err(s.span(), key, value, msg);
    }

    fn section<T: for<'de> Deserialize<'de>>(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Option<T> {
        match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(t) => Some(t),
            Err(e) => {
                let span = e.span().unwrap_or_else(|| value.span());
                let snippet = self.text.get(span.clone()).unwrap_or("").trim();
                let snippet = if snippet.len() > 60 || snippet.contains('\n') {
                    ""
                } else {
                    snippet
                };
                self.err(span, key, snippet, e.message().trim().to_owned());
                None
            }
        }
    }

    fn array<T: for<'de> Deserialize<'de>>(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<T> {
        let Some(items) = value.get_ref().as_array() else {
            self.err(
                value.span(),
                key,
                "",
                format!("must be an array of tables ([[{key}]])"),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(t) = self.section(&format!("{key}[{i}]"), item) {
                out.push(t);
            }
        }
        out
    }

    fn document(&mut self) -> Option<Config> {
        let (root, syntax) = DeTable::parse_recoverable(self.text);
        for e in syntax {
            let span = e.span().unwrap_or(0..0);
            self.err(span, "(syntax)", "", e.message().trim().to_owned());
        }
        if !self.errors.is_empty() {
            return None;
        }
        let mut doc = RawDoc::default();
        for (k, v) in root.get_ref().iter() {
            let key = k.get_ref().as_ref();
            match key {
                "listen" => doc.listen = self.array(key, v),
                "upstream" => doc.upstream = self.array(key, v),
                "account" => doc.account = self.array(key, v),
                "trunk" => doc.trunk = self.array(key, v),
                "proxy" => doc.proxy = self.section(key, v).unwrap_or_default(),
                "udp" => doc.udp = self.section(key, v).unwrap_or_default(),
                "tcp" => doc.tcp = self.section(key, v).unwrap_or_default(),
                "pbx" => doc.pbx = self.section(key, v),
                "limits" => doc.limits = self.section(key, v).unwrap_or_default(),
                "reply" => doc.reply = self.section(key, v).unwrap_or_default(),
                "admin" => doc.admin = Some(self.section(key, v).unwrap_or_default()),
                "alerts" => doc.alerts = self.section(key, v),
                "usage" => doc.usage = self.section(key, v).unwrap_or_default(),
                "cluster" => doc.cluster = self.section(key, v),
                "flood" => doc.flood = self.section(key, v),
                other => self.err(
                    k.span(),
                    other,
                    "",
                    "unknown section (expected listen, proxy, udp, tcp, pbx, upstream, account, trunk, limits, reply, admin, alerts, usage, cluster, flood)",
                ),
            }
        }
        self.validate(doc)
    }

    fn validate(&mut self, doc: RawDoc) -> Option<Config> {
        let listeners = self.listeners(&doc.listen);
        let upstreams: Vec<Upstream> = doc
            .upstream
            .iter()
            .enumerate()
            .filter_map(|(i, u)| self.upstream(i, u, &listeners))
            .collect();
        self.unique("upstream", doc.upstream.iter().map(|u| &u.name));
        let accounts: Vec<Account> = doc
            .account
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let key = format!("account[{i}]");
                let pacing = self.pacing(
                    &key,
                    &a.name,
                    a.on_limit.as_ref(),
                    a.max_delay.as_ref(),
                    a.max_queue.as_ref(),
                );
                let limit = self.limit(&key, &a.rate, a.burst.as_ref())?;
                Some(Account {
                    name: a.name.get_ref().clone(),
                    limit,
                    pacing,
                    shared: a.shared.as_ref().is_some_and(|s| *s.get_ref()),
                })
            })
            .collect();
        self.unique("account", doc.account.iter().map(|a| &a.name));
        let trunks: Vec<Trunk> = doc
            .trunk
            .iter()
            .enumerate()
            .filter_map(|(i, t)| self.trunk(i, t, &doc, &accounts))
            .collect();
        self.unique("trunk", doc.trunk.iter().map(|t| &t.name));
        let proxy = self.proxy(&doc.proxy, &doc.upstream);
        let udp = UdpSettings {
            recv_buffer: self.size(
                "udp.recv_buffer",
                doc.udp.recv_buffer.as_ref(),
                4 << 20,
                4096..=1 << 30,
            ),
            send_buffer: self.size(
                "udp.send_buffer",
                doc.udp.send_buffer.as_ref(),
                4 << 20,
                4096..=1 << 30,
            ),
        };
        let tcp = TcpSettings {
            idle_timeout: std::time::Duration::from_secs(self.size(
                "tcp.idle_timeout_secs",
                doc.tcp.idle_timeout_secs.as_ref(),
                300,
                1..=86_400,
            ) as u64),
            connect_timeout: std::time::Duration::from_millis(self.size(
                "tcp.connect_timeout_ms",
                doc.tcp.connect_timeout_ms.as_ref(),
                2000,
                10..=60_000,
            ) as u64),
            max_connections: self.size(
                "tcp.max_connections",
                doc.tcp.max_connections.as_ref(),
                1024,
                1..=1_000_000,
            ),
            max_connections_per_source: self.size(
                "tcp.max_connections_per_source",
                doc.tcp.max_connections_per_source.as_ref(),
                64,
                1..=1_000_000,
            ),
            message_timeout: std::time::Duration::from_secs(self.size(
                "tcp.message_timeout_secs",
                doc.tcp.message_timeout_secs.as_ref(),
                10,
                1..=3600,
            ) as u64),
            send_queue: self.size(
                "tcp.send_queue_kib",
                doc.tcp.send_queue_kib.as_ref(),
                1024,
                16..=1_048_576,
            ) * 1024,
        };
        let pbx = doc.pbx.as_ref().and_then(|p| {
            self.target(
                "pbx",
                &p.address,
                p.transport.as_ref(),
                p.listener.as_ref(),
                &listeners,
            )
        });
        let pbx_sources = match (&doc.pbx, &pbx) {
            (
                Some(raw::Pbx {
                    sources: Some(list),
                    ..
                }),
                _,
            ) => self.cidrs("pbx.sources", list),
            (_, Some(t)) => t
                .host
                .parse::<std::net::IpAddr>()
                .map(Cidr::host)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        self.check_listener_overlap(&listeners, &doc.listen);
        let limits = self.limits(&doc.limits);
        let reply = self.reply(&doc.reply);
        let admin = doc.admin.as_ref().map(|a| self.admin(a));
        let alerts = doc.alerts.as_ref().and_then(|a| self.alerts(a));
        let cluster = doc.cluster.as_ref().and_then(|c| self.cluster(c));
        self.check_shared(&doc, &accounts, &trunks, cluster.is_some());
        let usage = UsageSettings {
            period_secs: self.size(
                "usage.period_secs",
                doc.usage.period_secs.as_ref(),
                3600,
                1..=86_400,
            ) as u64,
            dialog_table_size: self.size(
                "usage.dialog_table_size",
                doc.usage.dialog_table_size.as_ref(),
                100_000,
                1..=10_000_000,
            ),
            max_call_secs: self.size(
                "usage.max_call_secs",
                doc.usage.max_call_secs.as_ref(),
                14_400,
                60..=604_800,
            ) as u64,
        };
        let flood = doc
            .flood
            .as_ref()
            .map(|f| self.flood(f, &upstreams, &pbx_sources));
        if !self.errors.is_empty() {
            return None;
        }
        let warnings = warnings(&upstreams, &trunks);
        Some(Config {
            listeners,
            proxy: proxy?,
            udp,
            tcp,
            pbx,
            pbx_sources,
            upstreams,
            accounts,
            trunks,
            limits,
            reply,
            admin,
            alerts,
            usage,
            cluster,
            flood,
            digest: digest(self.text),
            warnings,
        })
    }

    /// `[flood]`: the guard's limits; the carriers' and the PBX's sources are always exempt.
    fn flood(
        &mut self,
        f: &raw::Flood,
        upstreams: &[Upstream],
        pbx_sources: &[Cidr],
    ) -> FloodSettings {
        let rate = self.size("flood.rate", Some(&f.rate), 1, 1..=10_000_000) as u32;
        // Two seconds of the rate by default: a retransmission burst of a busy peer is no flood.
        let burst = self.size(
            "flood.burst",
            f.burst.as_ref(),
            (rate as usize).saturating_mul(2),
            1..=10_000_000,
        ) as u32;
        let block_secs = self.size("flood.block_secs", f.block_secs.as_ref(), 30, 1..=86_400);
        let table_size = self.size(
            "flood.table_size",
            f.table_size.as_ref(),
            100_000,
            1..=10_000_000,
        );
        let mut exempt: Vec<Cidr> = upstreams
            .iter()
            .flat_map(|u| u.sources.iter().cloned())
            .chain(pbx_sources.iter().cloned())
            .collect();
        exempt.extend(self.cidrs("flood.exempt", &f.exempt));
        FloodSettings {
            rate,
            burst,
            block: std::time::Duration::from_secs(block_secs as u64),
            table_size,
            exempt,
        }
    }

    /// A secret given inline (`key`) or by environment variable (`key_env`), at least 16
    /// characters; its value never appears in an error.
    fn secret(
        &mut self,
        key: &str,
        value: Option<&Spanned<String>>,
        env: Option<&Spanned<String>>,
    ) -> Option<String> {
        let secret = match (value, env) {
            (Some(v), None) => Some(v.get_ref().clone()),
            (None, Some(var)) => match std::env::var(var.get_ref()) {
                Ok(v) if !v.is_empty() => Some(v),
                _ if !self.need_secrets => None,
                _ => {
                    self.err_at(var, format!("{key}_env"), "environment variable is not set");
                    None
                }
            },
            (None, None) => None,
            (Some(v), Some(_)) => {
                let leaf = key.rsplit('.').next().unwrap_or(key);
                self.err(
                    v.span(),
                    key,
                    "(hidden)",
                    format!("give {leaf} or {leaf}_env, not both"),
                );
                None
            }
        };
        if let Some(s) = &secret
            && s.len() < 16
        {
            let span = value.or(env).map_or(0..0, |s| s.span());
            self.err(span, key, "(hidden)", "must be at least 16 characters");
        }
        secret
    }

    fn admin(&mut self, a: &raw::Admin) -> Admin {
        let address = match &a.address {
            None => SocketAddr::from(([127, 0, 0, 1], 9090)),
            Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
                self.err_at(
                    s,
                    "admin.address",
                    "must be IP:port, e.g. \"127.0.0.1:9090\"",
                );
                SocketAddr::from(([127, 0, 0, 1], 9090))
            }),
        };
        let token = self.secret("admin.token", a.token.as_ref(), a.token_env.as_ref());
        Admin { address, token }
    }

    fn alerts(&mut self, a: &raw::Alerts) -> Option<AlertSettings> {
        let url = a.webhook.get_ref().clone();
        // Nothing that could split the request line or a header.
        let clean = url.bytes().all(|b| b.is_ascii_graphic());
        let parsed = url
            .strip_prefix("http://")
            .filter(|_| clean)
            .and_then(|rest| {
                let (hostport, path) = rest
                    .split_once('/')
                    .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
                let (host, port) = split_host_port(hostport)?;
                Some((host, port.unwrap_or(80), path))
            });
        let debounce = self.size(
            "alerts.debounce_secs",
            a.debounce_secs.as_ref(),
            60,
            1..=86_400,
        );
        let timeout = self.size(
            "alerts.timeout_ms",
            a.timeout_ms.as_ref(),
            2000,
            10..=60_000,
        );
        let retries = self.size("alerts.retries", a.retries.as_ref(), 2, 0..=10);
        let queue = self.size("alerts.queue", a.queue.as_ref(), 256, 1..=100_000);
        match parsed {
            Some((host, port, path)) => Some(AlertSettings {
                url,
                host,
                port,
                path,
                debounce: std::time::Duration::from_secs(debounce as u64),
                timeout: std::time::Duration::from_millis(timeout as u64),
                retries: retries as u32,
                queue,
            }),
            None => {
                self.err_at(
                    &a.webhook,
                    "alerts.webhook",
                    "must be an http:// URL (for HTTPS, point it at a local relay)",
                );
                None
            }
        }
    }

    fn cluster(&mut self, c: &raw::Cluster) -> Option<ClusterConfig> {
        let mut urls = Vec::new();
        for (i, u) in c.urls.get_ref().iter().enumerate() {
            let url = u.get_ref();
            let scheme_ok = url.starts_with("redis://") || url.starts_with("redis+unix://");
            if !scheme_ok || redis::Client::open(url.as_str()).is_err() {
                // The value may hold a password: shown without it.
                self.err(
                    u.span(),
                    format!("cluster.urls[{i}]"),
                    format!("{:?}", crate::cluster::redact(url)),
                    "must be a redis:// URL, e.g. \"redis://127.0.0.1:6379/0\"",
                );
            } else {
                urls.push(url.clone());
            }
        }
        if c.urls.get_ref().is_empty() {
            self.err(
                c.urls.span(),
                "cluster.urls",
                "[]",
                "must name at least one Redis server",
            );
        }
        let timeout = self.size("cluster.timeout_ms", c.timeout_ms.as_ref(), 20, 1..=1000);
        let instances = self.size("cluster.instances", c.instances.as_ref(), 2, 1..=64);
        let on_failure = match c.on_failure.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("local_share") => FailurePolicy::LocalShare,
            Some("open") => FailurePolicy::Open,
            Some("closed") => FailurePolicy::Closed,
            Some(_) => {
                let s = c.on_failure.as_ref().expect("matched Some");
                self.err_at(
                    s,
                    "cluster.on_failure",
                    "must be \"local_share\", \"open\" or \"closed\"",
                );
                FailurePolicy::LocalShare
            }
        };
        let key_prefix = match &c.key_prefix {
            None => "cpsgate:".to_owned(),
            Some(p) => {
                let ok = !p.get_ref().is_empty()
                    && p.get_ref().len() <= 64
                    && p.get_ref().bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    self.err_at(
                        p,
                        "cluster.key_prefix",
                        "must be 1 to 64 printable characters without spaces",
                    );
                }
                p.get_ref().clone()
            }
        };
        (!urls.is_empty()).then(|| ClusterConfig {
            urls,
            timeout: std::time::Duration::from_millis(timeout as u64),
            on_failure,
            instances: instances as u32,
            key_prefix,
        })
    }

    /// `shared = true` needs `[cluster]`; a paced trunk cannot book a slot in a shared bucket.
    fn check_shared(
        &mut self,
        doc: &RawDoc,
        accounts: &[Account],
        trunks: &[Trunk],
        cluster: bool,
    ) {
        let shared_flags = doc
            .account
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("account[{i}].shared"), &a.shared))
            .chain(
                doc.trunk
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (format!("trunk[{i}].shared"), &t.shared)),
            );
        let mut flagged = Vec::new();
        for (key, flag) in shared_flags {
            if let Some(f) = flag
                && *f.get_ref()
            {
                flagged.push((key, f.span()));
            }
        }
        if !cluster && doc.cluster.is_none() {
            for (key, span) in flagged {
                self.err(
                    span,
                    key,
                    "true",
                    "needs a [cluster] section (the Redis servers)",
                );
            }
        }
        for t in trunks {
            let account_shared = t
                .account
                .and_then(|a| accounts.get(a))
                .is_some_and(|a| a.shared);
            if t.pacing.is_some() && (t.shared || account_shared) {
                let i = doc
                    .trunk
                    .iter()
                    .position(|r| r.name.get_ref() == &t.name)
                    .unwrap_or(0);
                let span = doc.trunk.get(i).map_or(0..0, |r| r.name.span());
                self.err(
                    span,
                    format!("trunk[{i}].on_limit"),
                    "\"queue\"",
                    "pacing books a slot ahead in every bucket of the call, which a shared bucket cannot do yet: use on_limit = \"reject\" on trunks whose bucket or account is shared",
                );
            }
        }
    }

    fn rate(&mut self, key: &str, r: Option<&raw::Rate>) -> Option<Limit> {
        r.and_then(|r| self.limit(key, &r.rate, r.burst.as_ref()))
    }

    fn limits(&mut self, l: &raw::Limits) -> Limits {
        Limits {
            unknown_source: self
                .rate("limits.unknown_source", l.unknown_source.as_ref())
                .unwrap_or(Limit {
                    rate: 20.0,
                    burst: 1,
                }),
            username: self.rate("limits.username", l.username.as_ref()),
            global: self.rate("limits.global", l.global.as_ref()),
            table_size: self.size(
                "limits.table_size",
                l.table_size.as_ref(),
                1_000_000,
                1..=100_000_000,
            ),
            decision_cache_size: self.size(
                "limits.decision_cache_size",
                l.decision_cache_size.as_ref(),
                100_000,
                1..=100_000_000,
            ),
            charge_auth_retry: l.charge_auth_retry.unwrap_or(false),
        }
    }

    fn reply(&mut self, r: &raw::Reply) -> Reply {
        let code = match &r.code {
            None => 503,
            Some(c) if (400..=699).contains(c.get_ref()) => *c.get_ref() as u16,
            Some(c) => {
                self.err_at(
                    c,
                    "reply.code",
                    "must be a final error status between 400 and 699",
                );
                503
            }
        };
        let mut reason = |key: &str, v: &Option<Spanned<String>>, default: &str| match v {
            None => default.to_owned(),
            Some(s) if !s.get_ref().is_empty() && s.get_ref().chars().all(|c| !c.is_control()) => {
                s.get_ref().clone()
            }
            Some(s) => {
                self.err_at(
                    s,
                    format!("reply.reasons.{key}"),
                    "must be a non-empty phrase without control characters",
                );
                default.to_owned()
            }
        };
        let reasons = [
            reason("trunk", &r.reasons.trunk, "CPS Limit reached"),
            reason("source", &r.reasons.source, "Source CPS Limit reached"),
            reason(
                "username",
                &r.reasons.username,
                "Username CPS Limit reached",
            ),
            reason("account", &r.reasons.account, "Account CPS Limit reached"),
            reason("global", &r.reasons.global, "Global CPS Limit reached"),
        ];
        let retry_after = r.retry_after.as_ref().and_then(|ra| {
            let (min, max) = (*ra.min.get_ref(), *ra.max.get_ref());
            if !(1..=3600).contains(&min) {
                self.err_at(
                    &ra.min,
                    "reply.retry_after.min",
                    "must be between 1 and 3600 seconds",
                );
                return None;
            }
            if !(min..=3600).contains(&max) {
                self.err_at(
                    &ra.max,
                    "reply.retry_after.max",
                    "must be between min and 3600 seconds",
                );
                return None;
            }
            Some((min as u32, max as u32))
        });
        Reply {
            code,
            reasons,
            retry_after,
        }
    }

    /// Two listeners on one port and family where one binds every interface cannot both bind.
    fn check_listener_overlap(&mut self, listeners: &[Listener], raw: &[raw::Listen]) {
        for (i, a) in listeners.iter().enumerate() {
            for b in &listeners[..i] {
                let same_port = a.address.port() == b.address.port() && a.address.port() != 0;
                let same_family = a.address.is_ipv4() == b.address.is_ipv4();
                let clash = a.address == b.address
                    || a.address.ip().is_unspecified()
                    || b.address.ip().is_unspecified();
                let shared = (a.udp && b.udp) || (a.tcp && b.tcp);
                if same_port && same_family && clash && shared {
                    self.err_at(
                        &raw[i].address,
                        format!("listen[{i}].address"),
                        format!("overlaps listener {} on the same port (one of them binds every interface)", b.name),
                    );
                }
            }
        }
    }

    fn unique<'a>(&mut self, what: &str, names: impl Iterator<Item = &'a Spanned<String>>) {
        let mut seen = std::collections::HashSet::new();
        for (i, n) in names.enumerate() {
            if n.get_ref().is_empty() {
                self.err_at(n, format!("{what}[{i}].name"), "must not be empty");
            } else if !seen.insert(n.get_ref().clone()) {
                self.err_at(
                    n,
                    format!("{what}[{i}].name"),
                    format!("duplicate {what} name"),
                );
            }
        }
    }

    fn size(
        &mut self,
        key: &str,
        v: Option<&Spanned<i64>>,
        default: usize,
        range: std::ops::RangeInclusive<i64>,
    ) -> usize {
        match v {
            None => default,
            Some(s) if range.contains(s.get_ref()) => *s.get_ref() as usize,
            Some(s) => {
                self.err_at(
                    s,
                    key,
                    format!("must be between {} and {}", range.start(), range.end()),
                );
                default
            }
        }
    }

    fn limit(
        &mut self,
        key: &str,
        rate: &Spanned<f64>,
        burst: Option<&Spanned<i64>>,
    ) -> Option<Limit> {
        let r = *rate.get_ref();
        let mut ok = true;
        if !(r.is_finite() && (0.001..=1_000_000.0).contains(&r)) {
            self.err_at(
                rate,
                format!("{key}.rate"),
                "must be a number of calls per second between 0.001 and 1000000",
            );
            ok = false;
        }
        let b = match burst {
            None => 1,
            Some(b) if (1..=1_000_000).contains(b.get_ref()) => *b.get_ref() as u32,
            Some(b) => {
                self.err_at(
                    b,
                    format!("{key}.burst"),
                    "must be a whole number of calls between 1 and 1000000",
                );
                ok = false;
                1
            }
        };
        ok.then_some(Limit { rate: r, burst: b })
    }

    fn listeners(&mut self, raw: &[raw::Listen]) -> Vec<Listener> {
        if raw.is_empty() {
            self.err(
                0..0,
                "listen",
                "",
                "at least one [[listen]] address is required",
            );
        }
        let mut out = Vec::new();
        for (i, l) in raw.iter().enumerate() {
            let key = format!("listen[{i}]");
            let address = match l.address.get_ref().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.err_at(
                        &l.address,
                        format!("{key}.address"),
                        "must be IP:port, e.g. \"0.0.0.0:5060\" or \"[::]:5060\"",
                    );
                    continue;
                }
            };
            let (mut udp, mut tcp) = (false, false);
            match &l.transports {
                None => (udp, tcp) = (true, true),
                Some(list) => {
                    for t in list {
                        match t.get_ref().to_ascii_lowercase().as_str() {
                            "udp" => udp = true,
                            "tcp" => tcp = true,
                            _ => self.err_at(
                                t,
                                format!("{key}.transports"),
                                "must be \"udp\" or \"tcp\"",
                            ),
                        }
                    }
                    if list.is_empty() {
                        self.err(
                            0..0,
                            format!("{key}.transports"),
                            "[]",
                            "must name at least one transport",
                        );
                    }
                }
            }
            // `advertise_env`: one config for several replicas, each told its own address.
            let from_env = l.advertise_env.as_ref().and_then(|var| {
                if l.advertise.is_some() {
                    self.err_at(
                        var,
                        format!("{key}.advertise_env"),
                        "give advertise or advertise_env, not both",
                    );
                    return None;
                }
                match std::env::var(var.get_ref()) {
                    Ok(v) if !v.is_empty() => Some(toml::Spanned::new(var.span(), v)),
                    _ => {
                        self.err_at(
                            var,
                            format!("{key}.advertise_env"),
                            "environment variable is not set",
                        );
                        None
                    }
                }
            });
            let advertise = l.advertise.as_ref().or(from_env.as_ref()).and_then(|a| {
                match split_host_port(a.get_ref()) {
                    Some((h, p)) => Some((h, p)),
                    None => {
                        self.err_at(a, format!("{key}.advertise"), "must be host or host:port");
                        None
                    }
                }
            });
            let env_missing = l.advertise_env.is_some() && advertise.is_none();
            if address.ip().is_unspecified() && advertise.is_none() && !env_missing {
                self.err_at(&l.address, format!("{key}.advertise"), "required when binding an unspecified address (Via and Record-Route need a reachable host)");
            }
            out.push(Listener {
                name: l
                    .name
                    .as_ref()
                    .map_or_else(|| format!("listen{i}"), |n| n.get_ref().clone()),
                address,
                udp,
                tcp,
                advertise,
            });
        }
        out
    }

    fn target(
        &mut self,
        key: &str,
        address: &Spanned<String>,
        transport: Option<&Spanned<String>>,
        listener: Option<&Spanned<String>>,
        listeners: &[Listener],
    ) -> Option<Target> {
        let listener = match listener {
            None => None,
            Some(name) => match listeners.iter().position(|l| &l.name == name.get_ref()) {
                Some(i) => Some(i),
                None => {
                    self.err_at(
                        name,
                        format!("{key}.listener"),
                        "no [[listen]] has this name",
                    );
                    return None;
                }
            },
        };
        let t = match transport {
            None => Transport::Udp,
            Some(t) => match t.get_ref().to_ascii_lowercase().as_str() {
                "udp" => Transport::Udp,
                "tcp" => Transport::Tcp,
                _ => {
                    self.err_at(t, format!("{key}.transport"), "must be \"udp\" or \"tcp\"");
                    return None;
                }
            },
        };
        match split_host_port(address.get_ref()) {
            Some((host, port)) => Some(Target {
                host,
                port: port.unwrap_or(5060),
                transport: t,
                listener,
            }),
            None => {
                self.err_at(address, format!("{key}.address"), "must be host:port, e.g. \"sip.carrier.example:5060\" or \"[2001:db8::1]:5060\"");
                None
            }
        }
    }

    fn cidrs(&mut self, key: &str, list: &[Spanned<String>]) -> Vec<Cidr> {
        list.iter()
            .filter_map(|s| match s.get_ref().parse::<Cidr>() {
                Ok(c) => Some(c),
                Err(_) => {
                    self.err_at(
                        s,
                        key,
                        "must be an IP address, a CIDR or ip:port, e.g. \"203.0.113.0/24\"",
                    );
                    None
                }
            })
            .collect()
    }

    fn upstream(
        &mut self,
        i: usize,
        u: &raw::Upstream,
        listeners: &[Listener],
    ) -> Option<Upstream> {
        let key = format!("upstream[{i}]");
        let target = self.target(
            &key,
            &u.address,
            u.transport.as_ref(),
            u.listener.as_ref(),
            listeners,
        )?;
        let sources = match &u.sources {
            Some(list) => self.cidrs(&format!("{key}.sources"), list),
            None if target.host.parse::<std::net::IpAddr>().is_err() => {
                // Without its networks a carrier's inbound calls would look like a stranger's.
                self.err_at(
                    &u.address,
                    format!("{key}.sources"),
                    "required when the address is a host name (the networks the carrier sends from)",
                );
                Vec::new()
            }
            None => target
                .host
                .parse::<std::net::IpAddr>()
                .map(Cidr::host)
                .into_iter()
                .collect(),
        };
        Some(Upstream {
            name: u.name.get_ref().clone(),
            target,
            sources,
        })
    }

    fn trunk(
        &mut self,
        i: usize,
        t: &raw::Trunk,
        doc: &RawDoc,
        accounts: &[Account],
    ) -> Option<Trunk> {
        let key = format!("trunk[{i}]");
        let upstream = doc
            .upstream
            .iter()
            .position(|u| u.name.get_ref() == t.upstream.get_ref());
        if upstream.is_none() {
            self.err_at(
                &t.upstream,
                format!("{key}.upstream"),
                "no [[upstream]] has this name",
            );
        }
        let account = match &t.account {
            None => None,
            Some(a) => match doc
                .account
                .iter()
                .position(|x| x.name.get_ref() == a.get_ref())
            {
                Some(idx) => Some(idx),
                None => {
                    self.err_at(a, format!("{key}.account"), "no [[account]] has this name");
                    return None;
                }
            },
        };
        let limit = self.limit(&key, &t.rate, t.burst.as_ref());
        let m = t.matcher.get_ref();
        let matcher = TrunkMatch {
            sources: m
                .sources
                .as_deref()
                .map(|l| self.cidrs(&format!("{key}.match.sources"), l))
                .unwrap_or_default(),
            username: m.username.as_ref().map(|u| u.get_ref().clone()),
            header: m
                .header
                .as_ref()
                .map(|h| (h.name.get_ref().clone(), h.value.get_ref().clone())),
        };
        if let Some(h) = &m.header
            && (h.name.get_ref().is_empty()
                || !h
                    .name
                    .get_ref()
                    .bytes()
                    .all(crate::sip::scan::is_token_char))
        {
            self.err_at(
                &h.name,
                format!("{key}.match.header.name"),
                "must be a header name",
            );
        }
        if m.sources.as_ref().is_none_or(Vec::is_empty)
            && m.username.is_none()
            && m.header.is_none()
        {
            self.err(
                t.matcher.span(),
                format!("{key}.match"),
                "",
                "must give at least one of sources, username, header",
            );
        }
        // A trunk without its own on_limit takes its account's (each trunk queues on its own).
        let pacing = match (&t.on_limit, account) {
            (None, Some(a)) if t.max_delay.is_none() && t.max_queue.is_none() => {
                accounts.get(a).and_then(|a| a.pacing)
            }
            _ => self.pacing(
                &key,
                &t.name,
                t.on_limit.as_ref(),
                t.max_delay.as_ref(),
                t.max_queue.as_ref(),
            ),
        };
        Some(Trunk {
            name: t.name.get_ref().clone(),
            account,
            upstream: upstream?,
            limit: limit?,
            matcher,
            pacing,
            shared: t.shared.as_ref().is_some_and(|s| *s.get_ref()),
        })
    }

    /// `on_limit`, `max_delay`, `max_queue` of a trunk or an account: `None` for reject, the
    /// pacing for queue.
    fn pacing(
        &mut self,
        key: &str,
        name: &toml::Spanned<String>,
        on_limit: Option<&toml::Spanned<String>>,
        max_delay: Option<&toml::Spanned<f64>>,
        max_queue: Option<&toml::Spanned<i64>>,
    ) -> Option<Pacing> {
        match on_limit.map(|s| s.get_ref().as_str()) {
            None | Some("reject") => {
                for (set, field) in [
                    (max_delay.is_some(), "max_delay"),
                    (max_queue.is_some(), "max_queue"),
                ] {
                    if set {
                        self.err(
                            name.span(),
                            format!("{key}.{field}"),
                            "",
                            "only applies with on_limit = \"queue\"",
                        );
                    }
                }
                None
            }
            Some("queue") => {
                let max_delay = match max_delay {
                    None => 5.0,
                    Some(d) if (0.001..=300.0).contains(d.get_ref()) => *d.get_ref(),
                    Some(d) => {
                        self.err_at(
                            d,
                            format!("{key}.max_delay"),
                            "must be seconds between 0.001 and 300",
                        );
                        5.0
                    }
                };
                Some(Pacing {
                    max_delay: std::time::Duration::from_secs_f64(max_delay),
                    max_queue: self.size(&format!("{key}.max_queue"), max_queue, 1000, 1..=100_000),
                })
            }
            Some(_) => {
                let s = on_limit.expect("matched Some");
                self.err_at(
                    s,
                    format!("{key}.on_limit"),
                    "must be \"reject\" or \"queue\"",
                );
                None
            }
        }
    }

    fn proxy(&mut self, p: &raw::Proxy, upstreams: &[raw::Upstream]) -> Option<ProxySettings> {
        let unknown_sources = match &p.unknown_sources {
            None => UnknownSources::Reject,
            Some(s) => match s.get_ref().as_str() {
                "reject" => UnknownSources::Reject,
                "forward" => UnknownSources::Forward,
                "limit" => UnknownSources::Limit,
                _ => {
                    self.err_at(
                        s,
                        "proxy.unknown_sources",
                        "must be \"reject\", \"forward\" or \"limit\"",
                    );
                    UnknownSources::Reject
                }
            },
        };
        let default_upstream = match &p.default_upstream {
            None => None,
            Some(d) => {
                let idx = upstreams
                    .iter()
                    .position(|u| u.name.get_ref() == d.get_ref());
                if idx.is_none() {
                    self.err_at(d, "proxy.default_upstream", "no [[upstream]] has this name");
                }
                idx
            }
        };
        if unknown_sources != UnknownSources::Reject && p.default_upstream.is_none() {
            let span = p.unknown_sources.as_ref().map_or(0..0, |s| s.span());
            self.err(
                span,
                "proxy.default_upstream",
                "",
                "required when unknown_sources is \"forward\" or \"limit\"",
            );
        }
        let secret = self.secret("proxy.secret", p.secret.as_ref(), p.secret_env.as_ref());
        let max_message_size = self.size(
            "proxy.max_message_size",
            p.max_message_size.as_ref(),
            DEFAULT_MAX_MESSAGE,
            1024..=1 << 20,
        );
        let grace = self.size(
            "proxy.shutdown_grace_secs",
            p.shutdown_grace_secs.as_ref(),
            5,
            0..=300,
        );
        Some(ProxySettings {
            shutdown_grace: std::time::Duration::from_secs(grace as u64),
            secret,
            aliases: p
                .aliases
                .iter()
                .map(|a| a.get_ref().to_ascii_lowercase())
                .collect(),
            unknown_sources,
            default_upstream,
            record_route: p.record_route.unwrap_or(true),
            max_message_size,
        })
    }
}

/// 16 hex digits identifying a configuration text.
fn digest(text: &str) -> String {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x636f_6e66, 0x6967);
    h.write(text.as_bytes());
    format!("{:016x}", h.finish())
}

/// Legal but risky settings an operator should know about.
fn warnings(upstreams: &[Upstream], trunks: &[Trunk]) -> Vec<String> {
    let mut out = Vec::new();
    for t in trunks {
        if t.matcher.sources.is_empty() {
            out.push(format!(
                "trunk {}: matched without source networks, so any address that sends its {} can use it",
                t.name,
                if t.matcher.username.is_some() { "username" } else { "header" }
            ));
        }
    }
    for (i, t) in trunks.iter().enumerate() {
        if t.matcher.username.is_none() && t.matcher.header.is_none() {
            continue;
        }
        // CANCEL and the ACK of a failed INVITE carry neither credentials nor the INVITE's
        // extension headers, so they fall back to the first trunk holding their source.
        let other = trunks.iter().enumerate().find(|&(j, o)| {
            j != i
                && o.upstream != t.upstream
                && o.matcher.username.is_none()
                && o.matcher.header.is_none()
                && o.matcher.sources.iter().any(|n| {
                    t.matcher.sources.is_empty() || t.matcher.sources.iter().any(|m| m.overlaps(n))
                })
        });
        if let Some((_, o)) = other {
            out.push(format!(
                "trunk {} shares source networks with trunk {} on another upstream: a CANCEL for a call on {} that has rung longer than 32 s (the decision cache's memory) is routed by source, to {}'s upstream",
                t.name, o.name, t.name, o.name
            ));
        }
    }
    for u in upstreams {
        for t in trunks {
            // An exact ip:port carrier source is a deliberate carve-out (e.g. on loopback).
            let overlap = u
                .sources
                .iter()
                .filter(|c| !c.has_port())
                .any(|c| t.matcher.sources.iter().any(|n| n.overlaps(c)));
            if overlap {
                out.push(format!(
                    "upstream {} and trunk {}: overlapping source networks; requests from the overlap are taken as the carrier's",
                    u.name, t.name
                ));
            }
        }
    }
    out
}

/// Split `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']')?;
        let host = &rest[..close];
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let tail = &rest[close + 1..];
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0)?),
            None if tail.is_empty() => None,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().ok().filter(|&p| p != 0)?)),
        None => (s, None),
    };
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    valid.then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[[upstream]]
name = "carrier"
address = "127.0.0.1:5080"

[[account]]
name = "acme"
rate = 20

[[trunk]]
name = "east"
account = "acme"
upstream = "carrier"
rate = 10
burst = 5
match = { sources = ["10.0.0.0/8"] }
"#;

    #[test]
    fn good_config_validates() {
        let c = Config::parse(GOOD, "t").unwrap();
        assert_eq!(c.trunks[0].account, Some(0));
        assert_eq!(
            c.trunks[0].limit,
            Limit {
                rate: 10.0,
                burst: 5
            }
        );
        assert_eq!(c.accounts[0].limit.burst, 1);
        assert_eq!(c.proxy.unknown_sources, UnknownSources::Reject);
        assert!(c.listeners[0].udp && c.listeners[0].tcp);
    }

    #[test]
    fn cluster_section_with_defaults_and_shared_buckets() {
        let text = GOOD.replace("rate = 20\n", "rate = 20\nshared = true\n")
            + "\n[cluster]\nurls = [\"redis://10.0.0.9:6379/0\"]\n";
        let c = Config::parse(&text, "t").unwrap();
        assert!(c.accounts[0].shared && !c.trunks[0].shared);
        let cl = c.cluster.expect("cluster");
        assert_eq!(cl.urls, ["redis://10.0.0.9:6379/0"]);
        assert_eq!(cl.timeout, std::time::Duration::from_millis(20));
        assert_eq!(cl.on_failure, FailurePolicy::LocalShare);
        assert_eq!((cl.instances, cl.key_prefix.as_str()), (2, "cpsgate:"));
    }

    #[test]
    fn flood_section_defaults_and_exempts_the_carriers_and_the_pbx() {
        let text = GOOD.replace(
            "address = \"127.0.0.1:5080\"\n",
            "address = \"127.0.0.1:5080\"\nsources = [\"192.0.2.0/24\"]\n",
        ) + "\n[pbx]\naddress = \"10.1.1.1:5060\"\n\n[flood]\nrate = 300\nexempt = [\"198.51.100.7\"]\n";
        let c = Config::parse(&text, "t").unwrap();
        let f = c.flood.expect("flood");
        assert_eq!((f.rate, f.burst, f.table_size), (300, 600, 100_000));
        assert_eq!(f.block, std::time::Duration::from_secs(30));
        let exempt: Vec<Cidr> = ["192.0.2.0/24", "10.1.1.1", "198.51.100.7"]
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect();
        assert_eq!(f.exempt, exempt);
        assert!(Config::parse(GOOD, "t").unwrap().flood.is_none());
    }

    #[test]
    fn tcp_abuse_limits_have_defaults_and_bounds() {
        let c = Config::parse(GOOD, "t").unwrap();
        assert_eq!(c.tcp.max_connections_per_source, 64);
        assert_eq!(c.tcp.message_timeout, std::time::Duration::from_secs(10));
        assert_eq!(c.tcp.send_queue, 1024 * 1024);
        let text = format!(
            "{GOOD}\n[tcp]\nmax_connections_per_source = 0\nmessage_timeout_secs = 0\nsend_queue_kib = 8\n"
        );
        let e = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(
            e.contains("line 22: tcp.max_connections_per_source = 0"),
            "{e}"
        );
        assert!(e.contains("line 23: tcp.message_timeout_secs = 0"), "{e}");
        assert!(e.contains("line 24: tcp.send_queue_kib = 8"), "{e}");
        let text = format!("{GOOD}\n[tcp]\nsend_queue_kib = 64\n");
        assert_eq!(Config::parse(&text, "t").unwrap().tcp.send_queue, 64 * 1024);
    }

    #[test]
    fn secrets_never_show_in_the_debug_form() {
        let text = GOOD.replace("rate = 20\n", "rate = 20\nshared = true\n")
            + "\n[proxy]\nsecret = \"proxy-secret-0123456789\"\n\n[admin]\ntoken = \"admin-token-0123456789\"\n\n[cluster]\nurls = [\"redis://cpsgate:redis-pass-0123@10.0.0.9:6379/0\"]\n";
        let c = Config::parse(&text, "t").unwrap();
        assert_eq!(c.proxy.secret.as_deref(), Some("proxy-secret-0123456789"));
        let shown = format!("{c:?}");
        for secret in [
            "proxy-secret-0123456789",
            "admin-token-0123456789",
            "redis-pass-0123",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(
            shown.contains("redis://cpsgate:***@10.0.0.9:6379/0"),
            "{shown}"
        );
    }

    #[test]
    fn flood_errors_name_the_key_the_value_and_the_line() {
        let text = format!(
            "{GOOD}\n[flood]\nrate = 0\nburst = -1\nblock_secs = 100000\nexempt = [\"not-a-net\"]\n"
        );
        let e = Config::parse(&text, "t").unwrap_err().to_string();
        for want in [
            "line 22: flood.rate = 0",
            "line 23: flood.burst = -1",
            "line 24: flood.block_secs = 100000",
            "line 25: flood.exempt = \"not-a-net\"",
        ] {
            assert!(e.contains(want), "{want} missing from:\n{e}");
        }
        let e = Config::parse(&format!("{GOOD}\n[flood]\nburst = 10\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("flood") && e.contains("rate"), "{e}");
    }

    #[test]
    fn cluster_errors_name_the_key_the_value_and_the_line() {
        // shared without [cluster]
        let text = GOOD.replace("rate = 20\n", "rate = 20\nshared = true\n");
        let e = Config::parse(&text, "t").unwrap_err();
        let err = e
            .errors
            .iter()
            .find(|e| e.key == "account[0].shared")
            .expect("named");
        assert_eq!((err.line, err.value.as_str()), (12, "true"));
        assert!(err.message.contains("[cluster]"), "{err}");
        // bad values in [cluster]; the password of a URL is never shown
        let text = format!(
            "{GOOD}\n[cluster]\nurls = [\"http://u:hunter2@x\"]\ntimeout_ms = 0\non_failure = \"retry\"\ninstances = 0\n"
        );
        let e = Config::parse(&text, "t").unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        for want in [
            "line 22: cluster.urls[0] = \"http://u:***@x\": must be a redis:// URL",
            "line 23: cluster.timeout_ms = 0",
            "line 24: cluster.on_failure = \"retry\": must be \"local_share\", \"open\" or \"closed\"",
            "line 25: cluster.instances = 0",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        // a paced trunk cannot book ahead in a shared pool
        let text = GOOD
            .replace("rate = 20\n", "rate = 20\nshared = true\n")
            .replace("burst = 5\n", "burst = 5\non_limit = \"queue\"\n")
            + "\n[cluster]\nurls = [\"redis://127.0.0.1/\"]\n";
        let e = Config::parse(&text, "t").unwrap_err();
        assert!(
            e.to_string()
                .contains("trunk[0].on_limit = \"queue\": pacing books a slot ahead"),
            "{e}"
        );
    }

    #[test]
    fn pacing_per_trunk_and_inherited_from_the_account() {
        use std::time::Duration;
        let c = Config::parse(GOOD, "t").unwrap();
        assert_eq!(c.trunks[0].pacing, None, "reject is the default");
        let queued = GOOD.replace(
            "burst = 5\n",
            "burst = 5\non_limit = \"queue\"\nmax_delay = 2.5\nmax_queue = 40\n",
        );
        let c = Config::parse(&queued, "t").unwrap();
        assert_eq!(
            c.trunks[0].pacing,
            Some(Pacing {
                max_delay: Duration::from_millis(2500),
                max_queue: 40
            })
        );
        // An account's on_limit is the default of its trunks; a trunk's own wins.
        let by_account = GOOD.replace("rate = 20\n", "rate = 20\non_limit = \"queue\"\n");
        let c = Config::parse(&by_account, "t").unwrap();
        let inherited = Some(Pacing {
            max_delay: Duration::from_secs(5),
            max_queue: 1000,
        });
        assert_eq!(c.accounts[0].pacing, inherited);
        assert_eq!(c.trunks[0].pacing, inherited);
        let overridden = by_account.replace("burst = 5\n", "burst = 5\non_limit = \"reject\"\n");
        assert_eq!(
            Config::parse(&overridden, "t").unwrap().trunks[0].pacing,
            None
        );
    }

    #[test]
    fn pacing_errors_name_the_key_and_value() {
        let bad = GOOD
            .replace("burst = 5\n", "burst = 5\non_limit = \"hold\"\n")
            .replace("rate = 20\n", "rate = 20\nmax_delay = 3.0\n");
        let text = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(
            text.contains("trunk[0].on_limit = \"hold\": must be \"reject\" or \"queue\""),
            "{text}"
        );
        assert!(
            text.contains("account[0].max_delay") && text.contains("only applies with on_limit"),
            "{text}"
        );
        let bad = GOOD.replace(
            "burst = 5\n",
            "burst = 5\non_limit = \"queue\"\nmax_delay = 900.0\nmax_queue = 0\n",
        );
        let text = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(
            text.contains("trunk[0].max_delay = 900") && text.contains("trunk[0].max_queue = 0"),
            "{text}"
        );
    }

    #[test]
    fn every_error_is_reported_with_line_key_and_value() {
        let bad = GOOD
            .replace("rate = 10", "rate = -1")
            .replace("account = \"acme\"", "account = \"nobody\"")
            .replace(
                "address = \"127.0.0.1:5080\"",
                "address = \"127.0.0.1:5080\"\nbogus = 1",
            );
        let e = Config::parse(&bad, "t").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("trunk[0].account = \"nobody\": no [[account]] has this name"),
            "{text}"
        );
        assert!(text.contains("upstream[0]"), "{text}");
        assert!(text.contains("bogus"), "{text}");
        let acct = e
            .errors
            .iter()
            .find(|e| e.key == "trunk[0].account")
            .unwrap();
        assert_eq!(acct.line, 16);
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = GOOD
            .replace("burst = 5", "burst = 0")
            .replace("10.0.0.0/8", "10.0.0.0/33");
        let e = Config::parse(&bad, "t").unwrap_err();
        let keys: Vec<_> = e.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["trunk[0].burst", "trunk[0].match.sources"]);
    }

    #[test]
    fn unknown_section_and_syntax_errors() {
        let e = Config::parse("[nope]\n", "t").unwrap_err();
        assert_eq!(e.errors[0].key, "nope");
        let e = Config::parse("[[listen]\n", "t").unwrap_err();
        assert_eq!(e.errors[0].key, "(syntax)");
        assert_eq!(e.errors[0].line, 1);
    }

    #[test]
    fn host_name_upstream_needs_its_source_networks() {
        let bad = GOOD.replace(
            "address = \"127.0.0.1:5080\"",
            "address = \"sip.carrier.example\"",
        );
        let e = Config::parse(&bad, "t").unwrap_err();
        assert_eq!(e.errors[0].key, "upstream[0].sources");
        let ok = bad.replace(
            "name = \"carrier\"",
            "name = \"carrier\"\nsources = [\"192.0.2.0/24\"]",
        );
        assert!(Config::parse(&ok, "t").is_ok());
    }

    #[test]
    fn risky_but_legal_choices_are_warned_about() {
        let c = Config::parse(GOOD, "t").unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let open = GOOD.replace(
            "match = { sources = [\"10.0.0.0/8\"] }",
            "match = { username = \"u\" }",
        );
        let c = Config::parse(&open, "t").unwrap();
        assert!(
            c.warnings[0].contains("trunk east: matched without source networks"),
            "{:?}",
            c.warnings
        );
        let overlap = GOOD.replace("10.0.0.0/8", "127.0.0.0/8");
        let c = Config::parse(&overlap, "t").unwrap();
        assert!(
            c.warnings[0].contains("overlapping source networks"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn a_wildcard_listener_cannot_share_a_port_with_another() {
        let two = GOOD.replace(
            "[[listen]]\naddress = \"127.0.0.1:5060\"\n",
            "[[listen]]\naddress = \"127.0.0.1:5060\"\n[[listen]]\naddress = \"0.0.0.0:5060\"\nadvertise = \"a.example\"\n",
        );
        let e = Config::parse(&two, "t").unwrap_err();
        assert!(
            e.to_string()
                .contains("listen[1].address = \"0.0.0.0:5060\": overlaps listener listen0"),
            "{e}"
        );
        let other_port = two.replace("0.0.0.0:5060", "0.0.0.0:5062");
        assert!(Config::parse(&other_port, "t").is_ok());
    }

    #[test]
    fn header_trunk_sharing_sources_with_another_upstream_is_warned_about() {
        let cfg = format!(
            "{GOOD}\n[[upstream]]\nname = \"other\"\naddress = \"192.0.2.9:5060\"\n\n[[trunk]]\nname = \"tagged\"\nupstream = \"other\"\nrate = 1\nmatch = {{ sources = [\"10.1.0.0/16\"], header = {{ name = \"X-C\", value = \"o\" }} }}\n"
        );
        let c = Config::parse(&cfg, "t").unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("trunk tagged shares source networks with trunk east")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn secrets_are_checked_and_never_echoed() {
        let short = GOOD.replace("[[account]]", "[proxy]\nsecret = \"short\"\n\n[[account]]");
        let e = Config::parse(&short, "t").unwrap_err().to_string();
        assert!(
            e.contains("proxy.secret = (hidden): must be at least 16 characters"),
            "{e}"
        );
        assert!(!e.contains("short"), "{e}");
        let both = format!("{GOOD}\n[admin]\ntoken = \"0123456789abcdef0\"\ntoken_env = \"X\"\n");
        let e = Config::parse(&both, "t").unwrap_err().to_string();
        assert!(
            e.contains("admin.token = (hidden): give token or token_env, not both"),
            "{e}"
        );
        let missing = format!("{GOOD}\n[admin]\ntoken_env = \"CPSGATE_TEST_UNSET_VARIABLE\"\n");
        let e = Config::parse(&missing, "t").unwrap_err().to_string();
        assert!(e.contains("admin.token_env"), "{e}");
    }

    #[test]
    fn alert_webhooks_are_plain_http_urls_without_spaces() {
        let with = |url: &str| format!("{GOOD}\n[alerts]\nwebhook = \"{url}\"\n");
        let ok = Config::parse(&with("http://127.0.0.1:8088/hook?x=1"), "t").unwrap();
        let a = ok.alerts.expect("alerts");
        assert_eq!(
            (a.host.as_str(), a.port, a.path.as_str()),
            ("127.0.0.1", 8088, "/hook?x=1")
        );
        for bad in [
            "https://example.com/x",
            "http://h/a b",
            "http://h/a\\r\\nX: y",
            "ftp://h",
        ] {
            let e = Config::parse(&with(bad), "t").unwrap_err();
            assert_eq!(e.errors[0].key, "alerts.webhook", "{bad}");
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("a.example:5080"),
            Some(("a.example".into(), Some(5080)))
        );
        assert_eq!(split_host_port("[::1]:5"), Some(("::1".into(), Some(5))));
        assert_eq!(split_host_port("h"), Some(("h".into(), None)));
        assert_eq!(split_host_port("h:0"), None);
        assert_eq!(split_host_port("h h"), None);
    }
}
