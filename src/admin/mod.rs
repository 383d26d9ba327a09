//! The admin HTTP API (axum) on its own address: liveness, readiness, Prometheus metrics, and a
//! JSON API under `/v1` to inspect limits, change a trunk's or account's rate at runtime, and
//! reload the configuration. Mutating endpoints need the bearer token; the API as a whole is
//! limited to 30 requests/s with bursts to 150 (answering 429 with Retry-After).

pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::limiter::{Epoch, Gcra, Limit};
use crate::proxy::{LimitKind, Proxy};
use crate::telemetry::Stats;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Longest trunk or account name in a path.
const MAX_ID: usize = 191;
/// The admin API's own limit (Twilio's Proxy API semantics: 30/s sustained, bursts to 5×).
const API_LIMIT: Limit = Limit {
    rate: 30.0,
    burst: 150,
};

/// Reloads the configuration file; the error text lists what is wrong with it.
pub type Reloader = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the handlers share.
pub struct AdminState {
    proxy: Arc<Proxy>,
    stats: Arc<Stats>,
    token: Option<String>,
    ready: Arc<AtomicBool>,
    started: Instant,
    reloader: Option<Reloader>,
    limiter: Gcra,
    alerts: Option<Arc<crate::alerts::Alerts>>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl AdminState {
    /// State for the router. `ready` turns true once every SIP listener serves.
    pub fn new(
        proxy: Arc<Proxy>,
        stats: Arc<Stats>,
        token: Option<String>,
        ready: Arc<AtomicBool>,
        reloader: Option<Reloader>,
    ) -> Arc<Self> {
        Self::with_alerts(proxy, stats, token, ready, reloader, None)
    }

    /// This state with the cluster client, whose counters `/metrics` then exports.
    pub fn with_cluster(
        self: Arc<Self>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Arc<Self> {
        match Arc::try_unwrap(self) {
            Ok(mut s) => {
                s.cluster = cluster;
                Arc::new(s)
            }
            Err(shared) => shared,
        }
    }

    /// [`AdminState::new`] with the alert handle, whose counters `/metrics` then exports.
    pub fn with_alerts(
        proxy: Arc<Proxy>,
        stats: Arc<Stats>,
        token: Option<String>,
        ready: Arc<AtomicBool>,
        reloader: Option<Reloader>,
        alerts: Option<Arc<crate::alerts::Alerts>>,
    ) -> Arc<Self> {
        let started = Instant::now();
        Arc::new(Self {
            proxy,
            stats,
            token,
            ready,
            started,
            reloader,
            limiter: Gcra::new(API_LIMIT, Epoch::new(started)),
            alerts,
            cluster: None,
        })
    }
}

/// The API's routes.
pub fn router(state: Arc<AdminState>) -> Router {
    // Probes and scrapes are not rate limited: a busy API must not fail a liveness check.
    let probes = Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(state.clone());
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/trunks", get(trunks))
        .route("/v1/accounts", get(accounts))
        .route("/v1/trunks/{name}", put(put_trunk).get(get_trunk))
        .route("/v1/accounts/{name}", put(put_account).get(get_account))
        .route("/v1/usage", get(usage))
        .route("/v1/reload", post(reload))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit))
        .with_state(state)
        .merge(probes)
}

/// Serve until `cancel`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, cancel: CancellationToken) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// A JSON error naming the offending field.
fn error(code: StatusCode, field: &str, message: &str) -> Response {
    (
        code,
        axum::Json(json!({ "error": message, "field": field })),
    )
        .into_response()
}

/// An error on its way to becoming a response (small, so `Result`s stay cheap).
struct ApiError {
    code: StatusCode,
    field: String,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, field: &str, message: &str) -> Self {
        Self {
            code,
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = error(self.code, &self.field, &self.message);
        if self.code == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

async fn rate_limit(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    // A declared body over the limit is refused before it is read (the body limit layer stops
    // undeclared ones).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return error(StatusCode::BAD_REQUEST, "body", "must be at most 64 KiB");
    }
    match s.limiter.try_acquire(Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "",
                "admin API rate limit: 30 requests/s",
            );
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            r
        }
    }
}

/// Equal strings in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Ok` when the request carries the configured bearer token.
fn authorize(s: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "authorization",
            "changes are disabled: no [admin] token configured",
        ));
    };
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let given = headers.get(header::AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
    });
    match given {
        Some(g) if same(g, token.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization",
            "a valid bearer token is required",
        )),
    }
}

async fn ready(State(s): State<Arc<AdminState>>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics_text(State(s): State<Arc<AdminState>>) -> Response {
    let mut body = metrics::render(&s.stats, &s.proxy, Instant::now());
    if let Some(a) = &s.alerts {
        metrics::render_alerts(&mut body, a);
    }
    if let Some(c) = &s.cluster {
        metrics::render_cluster(&mut body, c);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn status(State(s): State<Arc<AdminState>>) -> Response {
    let snap = s.proxy.snapshot(Instant::now());
    let listeners: Vec<String> = s
        .proxy
        .listeners()
        .iter()
        .map(|l| l.bound.to_string())
        .collect();
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": s.started.elapsed().as_secs(),
        "config_digest": snap.digest,
        "listeners": listeners,
        "ready": s.ready.load(Ordering::Acquire),
        "draining": snap.draining,
        "tables": snap.tables,
        "refused_by_stage": crate::limiter::Stage::ALL
            .iter()
            .map(|st| (st.as_str(), s.stats.rejected(*st)))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "messages_received": s.stats.received.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn trunks(State(s): State<Arc<AdminState>>) -> Response {
    axum::Json(s.proxy.snapshot(Instant::now()).trunks).into_response()
}

async fn accounts(State(s): State<Arc<AdminState>>) -> Response {
    axum::Json(s.proxy.snapshot(Instant::now()).accounts).into_response()
}

async fn usage(State(s): State<Arc<AdminState>>) -> Response {
    let snap = s.proxy.snapshot(Instant::now());
    let row = |k: &crate::proxy::KeyView| json!({ "name": k.name, "admitted": k.admitted, "usage": k.usage });
    axum::Json(json!({
        "trunks": snap.trunks.iter().map(|t| row(&t.limits)).collect::<Vec<_>>(),
        "accounts": snap.accounts.iter().map(row).collect::<Vec<_>>(),
        "thresholds": { "asr_above": 0.70, "acd_above_secs": 30, "short_call_secs": 12, "short_share_at_most": 0.10 },
    }))
    .into_response()
}

fn check_id(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_ID {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "name",
            "must be 1 to 191 characters",
        ));
    }
    Ok(())
}

async fn get_trunk(State(s): State<Arc<AdminState>>, Path(name): Path<String>) -> Response {
    if let Err(r) = check_id(&name) {
        return r.into_response();
    }
    match s
        .proxy
        .snapshot(Instant::now())
        .trunks
        .into_iter()
        .find(|t| t.limits.name == name)
    {
        Some(t) => axum::Json(t).into_response(),
        None => error(StatusCode::NOT_FOUND, "name", "no such trunk"),
    }
}

async fn get_account(State(s): State<Arc<AdminState>>, Path(name): Path<String>) -> Response {
    if let Err(r) = check_id(&name) {
        return r.into_response();
    }
    match s
        .proxy
        .snapshot(Instant::now())
        .accounts
        .into_iter()
        .find(|a| a.name == name)
    {
        Some(a) => axum::Json(a).into_response(),
        None => error(StatusCode::NOT_FOUND, "name", "no such account"),
    }
}

/// Parse `{"rate": number, "burst": integer?}` with every problem named.
fn parse_limit(body: &[u8], current_burst: u32) -> Result<Limit, ApiError> {
    let bad = |field: &str, message: &str| ApiError::new(StatusCode::BAD_REQUEST, field, message);
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad("body", &format!("not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(bad("body", "must be a JSON object"));
    };
    if let Some(k) = obj.keys().find(|k| *k != "rate" && *k != "burst") {
        return Err(bad(k, "unknown field (expected rate, burst)"));
    }
    let rate = obj
        .get("rate")
        .and_then(Value::as_f64)
        .filter(|r| (0.001..=1_000_000.0).contains(r))
        .ok_or_else(|| bad("rate", "must be a number between 0.001 and 1000000"))?;
    let burst = match obj.get("burst") {
        None => current_burst,
        Some(b) => b
            .as_u64()
            .filter(|b| (1..=1_000_000).contains(b))
            .map(|b| b as u32)
            .ok_or_else(|| bad("burst", "must be a whole number between 1 and 1000000"))?,
    };
    Ok(Limit { rate, burst })
}

async fn put_limit(
    s: &AdminState,
    kind: LimitKind,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if let Err(r) = authorize(s, headers).and_then(|()| check_id(name)) {
        return r.into_response();
    }
    let snap = s.proxy.snapshot(Instant::now());
    let current = match kind {
        LimitKind::Trunk => snap
            .trunks
            .iter()
            .map(|t| &t.limits)
            .find(|k| k.name == name),
        LimitKind::Account => snap.accounts.iter().find(|k| k.name == name),
    };
    let Some(current) = current else {
        return error(StatusCode::NOT_FOUND, "name", "no such trunk or account");
    };
    let limit = match parse_limit(body, current.burst) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    if s.proxy
        .set_limit(kind, name, limit, Instant::now())
        .is_err()
    {
        return error(StatusCode::NOT_FOUND, "name", "no such trunk or account");
    }
    tracing::info!(
        name,
        rate = limit.rate,
        burst = limit.burst,
        "limit changed through the admin API"
    );
    axum::Json(json!({
        "name": name,
        "rate": limit.rate,
        "burst": limit.burst,
        "note": "in force until the next reload, which restores the configured values; the cells already used stay used",
    }))
    .into_response()
}

async fn put_trunk(
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    put_limit(&s, LimitKind::Trunk, &name, &headers, &body).await
}

async fn put_account(
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    put_limit(&s, LimitKind::Account, &name, &headers, &body).await
}

async fn reload(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let Some(reloader) = s.reloader.clone() else {
        return error(
            StatusCode::CONFLICT,
            "config",
            "the gate was not started from a file",
        );
    };
    match tokio::task::spawn_blocking(move || reloader()).await {
        Ok(Ok(())) => axum::Json(json!({ "reloaded": true, "config_digest": s.proxy.snapshot(Instant::now()).digest })).into_response(),
        Ok(Err(errors)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({ "reloaded": false, "error": "the file is invalid; the running configuration stays", "field": "config", "details": errors })),
        )
            .into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "config", "reload task failed"),
    }
}

/// Where the admin API listens, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("listening on http {addr} (admin)")
}

#[cfg(test)]
mod tests;
