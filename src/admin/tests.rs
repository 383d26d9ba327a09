//! Router tests: every endpoint, its auth, its validation errors, the API's own 429.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::config::Config;
use crate::proxy::LocalListener;

const TOKEN: &str = "0123456789abcdef-admin";

const CFG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"
[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"
[[account]]
name = "acme"
rate = 20
burst = 20
[[trunk]]
name = "east"
account = "acme"
upstream = "carrier"
rate = 10
burst = 10
match = { sources = ["10.0.0.0/24"] }
"#;

fn state(token: Option<&str>, reloader: Option<Reloader>) -> Arc<AdminState> {
    let cfg = Config::parse(CFG, "test").expect("valid");
    let proxy = Proxy::new(
        &cfg,
        vec![LocalListener {
            bound: "127.0.0.1:5060".parse().expect("addr"),
            host: "127.0.0.1".into(),
            port: 5060,
            udp: true,
            tcp: true,
        }],
    )
    .expect("proxy");
    AdminState::new(
        Arc::new(proxy),
        Arc::new(Stats::default()),
        token.map(str::to_owned),
        Arc::new(AtomicBool::new(true)),
        reloader,
    )
}

async fn call(
    s: &Arc<AdminState>,
    method: &str,
    uri: &str,
    auth: Option<&str>,
    body: &str,
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header("authorization", format!("Bearer {a}"));
    }
    let resp = router(s.clone())
        .oneshot(req.body(Body::from(body.to_owned())).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn live_ready_and_metrics() {
    let s = state(None, None);
    assert_eq!(call(&s, "GET", "/live", None, "").await.0, StatusCode::OK);
    assert_eq!(call(&s, "GET", "/ready", None, "").await.0, StatusCode::OK);
    s.ready.store(false, Ordering::Release);
    assert_eq!(
        call(&s, "GET", "/ready", None, "").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (code, text) = call(&s, "GET", "/metrics", None, "").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        text.contains("# TYPE cpsgate_invites_total counter"),
        "{text}"
    );
    assert!(
        text.contains("cpsgate_limit_rate{kind=\"trunk\",name=\"east\"} 10"),
        "{text}"
    );
    assert!(
        text.contains("cpsgate_decision_seconds_bucket{le=\"+Inf\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn status_trunks_and_accounts() {
    let s = state(None, None);
    let (code, body) = call(&s, "GET", "/v1/status", None, "").await;
    assert_eq!(code, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["config_digest"].as_str().map(str::len), Some(16));
    let (_, body) = call(&s, "GET", "/v1/trunks", None, "").await;
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v[0]["name"], "east");
    assert_eq!(v[0]["account"], "acme");
    assert_eq!(v[0]["upstream"], "carrier");
    assert_eq!(v[0]["rate"], 10.0);
    let (code, body) = call(&s, "GET", "/v1/accounts/acme", None, "").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert!(body.contains("\"burst\":20"));
    assert_eq!(
        call(&s, "GET", "/v1/trunks/nope", None, "").await.0,
        StatusCode::NOT_FOUND
    );
    let long = "x".repeat(192);
    let (code, body) = call(&s, "GET", &format!("/v1/trunks/{long}"), None, "").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(body.contains("\"field\":\"name\""), "{body}");
}

#[tokio::test]
async fn put_needs_the_token_and_valid_numbers() {
    let s = state(Some(TOKEN), None);
    let put = |auth, body: &'static str| {
        let s = s.clone();
        async move { call(&s, "PUT", "/v1/trunks/east", auth, body).await }
    };
    assert_eq!(
        put(None, r#"{"rate": 5}"#).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        put(Some("wrong-token-xxxxxxxxx"), r#"{"rate": 5}"#).await.0,
        StatusCode::UNAUTHORIZED
    );
    for (body, field) in [
        (r#"{"rate": 0}"#, "rate"),
        (r#"{"rate": "fast"}"#, "rate"),
        (r#"{"rate": 5, "burst": 0}"#, "burst"),
        (r#"{"rate": 5, "speed": 1}"#, "speed"),
        (r#"not json"#, "body"),
        (r#"[1]"#, "body"),
    ] {
        let (code, text) = put(Some(TOKEN), body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert!(
            text.contains(&format!("\"field\":\"{field}\"")),
            "{body}: {text}"
        );
    }
    let (code, text) = put(Some(TOKEN), r#"{"rate": 5, "burst": 3}"#).await;
    assert_eq!(code, StatusCode::OK, "{text}");
    assert!(text.contains("until the next reload"), "{text}");
    let (_, body) = call(&s, "GET", "/v1/trunks/east", None, "").await;
    assert!(
        body.contains("\"rate\":5.0") && body.contains("\"burst\":3"),
        "{body}"
    );
    let (code, _) = call(
        &s,
        "PUT",
        "/v1/accounts/nope",
        Some(TOKEN),
        r#"{"rate": 5}"#,
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let big = format!("{{\"rate\": 5, \"pad\": \"{}\"}}", "x".repeat(70_000));
    let mut req = Request::builder()
        .method("PUT")
        .uri("/v1/accounts/acme")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-length", big.len());
    req = req.header("content-type", "application/json");
    let resp = router(s.clone())
        .oneshot(req.body(Body::from(big)).expect("request"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&bytes).contains("\"field\":\"body\""));
}

#[tokio::test]
async fn without_a_token_changes_are_refused() {
    let s = state(None, None);
    let (code, body) = call(&s, "PUT", "/v1/trunks/east", Some(TOKEN), r#"{"rate": 5}"#).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    assert!(body.contains("no [admin] token"), "{body}");
}

#[tokio::test]
async fn reload_reports_success_and_refusal() {
    let ok: Reloader = Arc::new(|| Ok(()));
    let s = state(Some(TOKEN), Some(ok));
    assert_eq!(
        call(&s, "POST", "/v1/reload", None, "").await.0,
        StatusCode::UNAUTHORIZED
    );
    let (code, body) = call(&s, "POST", "/v1/reload", Some(TOKEN), "").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let bad: Reloader = Arc::new(|| Err("line 3: trunk[0].rate = 0.0: must be ...".to_owned()));
    let s = state(Some(TOKEN), Some(bad));
    let (code, body) = call(&s, "POST", "/v1/reload", Some(TOKEN), "").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("trunk[0].rate"), "{body}");
    let s = state(Some(TOKEN), None);
    assert_eq!(
        call(&s, "POST", "/v1/reload", Some(TOKEN), "").await.0,
        StatusCode::CONFLICT
    );
}

#[tokio::test]
async fn the_api_has_its_own_rate_limit() {
    let s = state(None, None);
    let mut limited = None;
    for i in 0..400 {
        let r = router(s.clone())
            .oneshot(
                Request::builder()
                    .uri("/v1/status")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some((i, r.headers().get("retry-after").cloned()));
            break;
        }
    }
    let (i, retry) = limited.expect("429 after the burst");
    assert!((150..=170).contains(&i), "limited after {i} requests");
    assert_eq!(retry.expect("Retry-After"), "1");
    // Probes stay answered while the API is limited.
    assert_eq!(call(&s, "GET", "/live", None, "").await.0, StatusCode::OK);
    assert_eq!(
        call(&s, "GET", "/metrics", None, "").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = state(Some(TOKEN), None);
    let resp = router(s.clone())
        .oneshot(
            Request::builder()
                .method("PUT")
                .uri("/v1/trunks/east")
                .header("authorization", format!("bearer {TOKEN}"))
                .body(Body::from(r#"{"rate": 5}"#))
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Every metric the shipped Grafana dashboard queries exists in `/metrics`.
#[tokio::test]
async fn the_dashboard_queries_only_metrics_we_export() {
    let dashboard: Value = serde_json::from_str(include_str!("../../docs/grafana-dashboard.json"))
        .expect("dashboard JSON");
    let s = state(None, None);
    let (_, text) = call(&s, "GET", "/metrics", None, "").await;
    let mut checked = 0;
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("cpsgate_"))
            {
                let family = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(
                    text.contains(&format!("# TYPE {family} ")),
                    "{name} is not exported"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10);
}

#[tokio::test]
async fn usage_lists_every_trunk_and_account_with_the_thresholds() {
    let s = state(None, None);
    let (code, body) = call(&s, "GET", "/v1/usage", None, "").await;
    assert_eq!(code, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["trunks"][0]["name"], "east");
    assert_eq!(v["accounts"][0]["name"], "acme");
    assert_eq!(v["trunks"][0]["usage"]["period_secs"], 3600);
    assert_eq!(
        v["trunks"][0]["usage"]["asr"],
        Value::Null,
        "no call ended yet"
    );
    assert_eq!(v["thresholds"]["acd_above_secs"], 30);
}

#[tokio::test]
async fn cluster_counters_are_exported_with_the_failure_policy_labels() {
    let cluster = crate::cluster::Cluster::start(&crate::config::ClusterConfig {
        urls: vec!["redis://127.0.0.1:1/".into()],
        timeout: std::time::Duration::from_millis(20),
        on_failure: crate::config::FailurePolicy::LocalShare,
        instances: 2,
        key_prefix: "x:".into(),
    })
    .expect("client");
    cluster
        .stats
        .fallback(crate::cluster::Fallback::LocalShareRefused);
    let mut out = String::new();
    metrics::render_cluster(&mut out, &cluster);
    for line in [
        "cpsgate_cluster_refunds_total{result=\"failed\"} 0",
        "cpsgate_cluster_fallback_total{policy=\"local_share\",outcome=\"refused\"} 1",
        "cpsgate_cluster_failures_total{reason=\"timeout\"} 0",
        "cpsgate_cluster_decisions_total{result=\"admitted\"} 0",
        "cpsgate_cluster_roundtrip_seconds_bucket{le=\"+Inf\"} 0",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
    }
}
