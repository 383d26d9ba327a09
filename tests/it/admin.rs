//! The admin API against real SIP traffic: its numbers equal the decisions made, a PUT changes
//! the admitted rate at once, an invalid reload leaves the old configuration serving.

use crate::harness::*;

const TOKEN: &str = "test-admin-token-0123456789";

fn admin_config(pbx: std::net::SocketAddr, carrier: std::net::SocketAddr) -> String {
    config(pbx, "udp", carrier, "udp").replace(
        "rate = 1000\nburst = 1000\nmatch",
        "rate = 2\nburst = 2\nmatch",
    ) + &format!("\n[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

/// Offer `n` new calls at once; (forwarded, refused).
async fn offer_calls(
    pbx: &UdpPeer,
    carrier: &UdpPeer,
    gate: &TestGate,
    tag: &str,
    n: u32,
) -> (u32, u32) {
    let (mut fwd, mut refused) = (0, 0);
    for i in 0..n {
        let msg = invite(
            pbx.addr,
            "UDP",
            &format!("{tag}-{i}"),
            &format!("z9hG4bK{tag}{i}"),
            "",
        );
        pbx.send(gate.udp, &msg).await;
        tokio::select! {
            (r, _) = pbx.recv() => { assert!(r.starts_with("SIP/2.0 503"), "{r}"); refused += 1; }
            _ = carrier.recv() => fwd += 1,
        }
    }
    (fwd, refused)
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or_else(
            || panic!("no metric {line_start} in:\n{text}"),
            |v| v as u64,
        )
}

#[tokio::test]
async fn metrics_and_v1_equal_the_decisions_made() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&admin_config(pbx.addr, carrier.addr)).await;
    let admin = gate.admin.expect("admin listener");
    assert_eq!(http(admin, "GET", "/ready", None, "").await.0, 200);
    let (fwd, refused) = offer_calls(&pbx, &carrier, &gate, "m", 5).await;
    assert_eq!((fwd, refused), (2, 3));
    let (code, text) = http(admin, "GET", "/metrics", None, "").await;
    assert_eq!(code, 200);
    assert_eq!(
        metric(
            &text,
            "cpsgate_invites_total{trunk=\"t1\",account=\"acct\",outcome=\"forwarded\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &text,
            "cpsgate_invites_total{trunk=\"t1\",account=\"acct\",outcome=\"rejected\",stage=\"trunk\"}"
        ),
        3
    );
    assert_eq!(
        metric(&text, "cpsgate_refusals_by_stage_total{stage=\"trunk\"}"),
        3
    );
    assert_eq!(metric(&text, "cpsgate_decision_seconds_count"), 5);
    // Each of the five datagrams caused a send at once (forward or 503): each has a transit
    // time, from the kernel's receive stamp (Linux) to the send.
    if cfg!(target_os = "linux") {
        assert_eq!(metric(&text, "cpsgate_udp_transit_seconds_count"), 5);
        assert_eq!(
            metric(&text, "cpsgate_udp_transit_seconds_bucket{le=\"+Inf\"}"),
            5
        );
    }
    let (_, body) = http(admin, "GET", "/v1/trunks/t1", None, "").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["admitted"], 2);
    assert_eq!(v["rejected"]["trunk"], 3);
    assert_eq!(v["rate"], 2.0);
    gate.stop().await;
}

#[tokio::test]
async fn a_put_changes_the_admitted_rate_at_once() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&admin_config(pbx.addr, carrier.addr)).await;
    let admin = gate.admin.expect("admin listener");
    assert_eq!(offer_calls(&pbx, &carrier, &gate, "a", 4).await, (2, 2));
    let (code, body) = http(
        admin,
        "PUT",
        "/v1/trunks/t1",
        None,
        r#"{"rate": 5, "burst": 50}"#,
    )
    .await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = http(
        admin,
        "PUT",
        "/v1/trunks/t1",
        Some(TOKEN),
        r#"{"rate": 5, "burst": 50}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // The two cells used stay used: 48 of the new 50 go through right away. (At 5 CPS, the
    // time the 50 offers take refills no cell on a loaded machine, as 100 CPS could.)
    assert_eq!(offer_calls(&pbx, &carrier, &gate, "b", 50).await.0, 48);
    gate.stop().await;
}

#[tokio::test]
async fn an_invalid_reload_leaves_the_old_config_serving() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let path = std::env::temp_dir().join(format!("cpsgate-admin-{}.toml", std::process::id()));
    std::fs::write(&path, admin_config(pbx.addr, carrier.addr)).expect("write");
    let gate = TestGate::start_file(&path).await;
    let admin = gate.admin.expect("admin listener");
    std::fs::write(&path, "[[trunk]]\nname = 1\n").expect("write");
    let (code, body) = http(admin, "POST", "/v1/reload", Some(TOKEN), "").await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("trunk[0]"), "{body}");
    // Still the old limits: 2 of 3 calls.
    assert_eq!(offer_calls(&pbx, &carrier, &gate, "r", 3).await, (2, 1));
    let _ = std::fs::remove_file(&path);
    gate.stop().await;
}

#[tokio::test]
async fn ready_turns_false_when_the_drain_starts() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let cfg = admin_config(pbx.addr, carrier.addr)
        .replace("shutdown_grace_secs = 0", "shutdown_grace_secs = 2");
    let mut gate = TestGate::start(&cfg).await;
    let admin = gate.admin.expect("admin listener");
    assert_eq!(http(admin, "GET", "/ready", None, "").await.0, 200);
    gate.begin_stop();
    let mut code = 200;
    for _ in 0..200 {
        code = http(admin, "GET", "/ready", None, "").await.0;
        if code == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(code, 503, "not ready while draining");
    assert_eq!(
        http(admin, "GET", "/live", None, "").await.0,
        200,
        "still alive"
    );
    gate.stop().await;
}
