//! The TOML file as written: every struct denies unknown fields, and values that validation may
//! refuse keep their span so the error names the line.

use serde::Deserialize;
use toml::Spanned;

/// `[[listen]]`: one local address and the transports served on it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub name: Option<Spanned<String>>,
    pub address: Spanned<String>,
    pub transports: Option<Vec<Spanned<String>>>,
    pub advertise: Option<Spanned<String>>,
    pub advertise_env: Option<Spanned<String>>,
}

/// `[proxy]`: proxy-wide behaviour.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    pub secret: Option<Spanned<String>>,
    pub secret_env: Option<Spanned<String>>,
    #[serde(default)]
    pub aliases: Vec<Spanned<String>>,
    pub unknown_sources: Option<Spanned<String>>,
    pub default_upstream: Option<Spanned<String>>,
    pub record_route: Option<bool>,
    pub max_message_size: Option<Spanned<i64>>,
    pub shutdown_grace_secs: Option<Spanned<i64>>,
}

/// `[udp]`: socket options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Udp {
    pub recv_buffer: Option<Spanned<i64>>,
    pub send_buffer: Option<Spanned<i64>>,
}

/// `[tcp]`: stream limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tcp {
    pub idle_timeout_secs: Option<Spanned<i64>>,
    pub connect_timeout_ms: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_source: Option<Spanned<i64>>,
    pub message_timeout_secs: Option<Spanned<i64>>,
    pub send_queue_kib: Option<Spanned<i64>>,
}

/// `[pbx]`: where requests from carriers go.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pbx {
    pub address: Spanned<String>,
    pub transport: Option<Spanned<String>>,
    pub listener: Option<Spanned<String>>,
    pub sources: Option<Vec<Spanned<String>>>,
}

/// `[[upstream]]`: a carrier endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub transport: Option<Spanned<String>>,
    pub listener: Option<Spanned<String>>,
    pub sources: Option<Vec<Spanned<String>>>,
}

/// `[[account]]`: a parent account whose pool its trunks share.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub name: Spanned<String>,
    pub rate: Spanned<f64>,
    pub burst: Option<Spanned<i64>>,
    pub on_limit: Option<Spanned<String>>,
    pub max_delay: Option<Spanned<f64>>,
    pub max_queue: Option<Spanned<i64>>,
    pub shared: Option<Spanned<bool>>,
}

/// `[trunk.match.header]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: Spanned<String>,
    pub value: Spanned<String>,
}

/// `[trunk.match]`: every given criterion must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub sources: Option<Vec<Spanned<String>>>,
    pub username: Option<Spanned<String>>,
    pub header: Option<HeaderMatch>,
}

/// `[[trunk]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trunk {
    pub name: Spanned<String>,
    pub account: Option<Spanned<String>>,
    pub upstream: Spanned<String>,
    pub rate: Spanned<f64>,
    pub burst: Option<Spanned<i64>>,
    pub on_limit: Option<Spanned<String>>,
    pub max_delay: Option<Spanned<f64>>,
    pub max_queue: Option<Spanned<i64>>,
    pub shared: Option<Spanned<bool>>,
    #[serde(rename = "match")]
    pub matcher: Spanned<Match>,
}

/// `{ rate = …, burst = … }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub rate: Spanned<f64>,
    pub burst: Option<Spanned<i64>>,
}

/// `[limits]`: the stages beyond trunks and accounts, and the tables behind them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub unknown_source: Option<Rate>,
    pub username: Option<Rate>,
    pub global: Option<Rate>,
    pub table_size: Option<Spanned<i64>>,
    pub decision_cache_size: Option<Spanned<i64>>,
    pub charge_auth_retry: Option<bool>,
}

/// `[reply.reasons]`: reason phrase per refusing stage.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reasons {
    pub trunk: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub account: Option<Spanned<String>>,
    pub global: Option<Spanned<String>>,
}

/// `[reply.retry_after]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryAfter {
    pub min: Spanned<i64>,
    pub max: Spanned<i64>,
}

/// `[reply]`: the answer to a call over a limit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub code: Option<Spanned<i64>>,
    #[serde(default)]
    pub reasons: Reasons,
    pub retry_after: Option<RetryAfter>,
}

/// `[admin]`: the HTTP admin listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Option<Spanned<String>>,
    pub token: Option<Spanned<String>>,
    pub token_env: Option<Spanned<String>>,
}

/// `[alerts]`: the webhook told when limits start and stop refusing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    pub webhook: Spanned<String>,
    pub debounce_secs: Option<Spanned<i64>>,
    pub timeout_ms: Option<Spanned<i64>>,
    pub retries: Option<Spanned<i64>>,
    pub queue: Option<Spanned<i64>>,
}

/// `[usage]`: the traffic profile.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub period_secs: Option<Spanned<i64>>,
    pub dialog_table_size: Option<Spanned<i64>>,
    pub max_call_secs: Option<Spanned<i64>>,
}

/// `[flood]`: the per-source packet-rate guard.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flood {
    pub rate: Spanned<i64>,
    pub burst: Option<Spanned<i64>>,
    pub block_secs: Option<Spanned<i64>>,
    pub table_size: Option<Spanned<i64>>,
    #[serde(default)]
    pub exempt: Vec<Spanned<String>>,
}

/// `[cluster]`: shared buckets in Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub urls: Spanned<Vec<Spanned<String>>>,
    pub timeout_ms: Option<Spanned<i64>>,
    pub on_failure: Option<Spanned<String>>,
    pub instances: Option<Spanned<i64>>,
    pub key_prefix: Option<Spanned<String>>,
}
