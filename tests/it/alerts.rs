//! Alerts through a running gate: the webhook hears when a trunk starts refusing and when it
//! recovers; a webhook that hangs never slows the SIP path.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::*;

fn alert_config(
    pbx: std::net::SocketAddr,
    carrier: std::net::SocketAddr,
    hook: std::net::SocketAddr,
    timeout_ms: u32,
) -> String {
    config(pbx, "udp", carrier, "udp").replace(
        "rate = 1000\nburst = 1000\nmatch",
        "rate = 1\nburst = 1\nmatch",
    ) + &format!(
        "\n[alerts]\nwebhook = \"http://{hook}/hook\"\ndebounce_secs = 1\ntimeout_ms = {timeout_ms}\nretries = 0\n\n[admin]\naddress = \"127.0.0.1:0\"\n"
    )
}

/// A webhook that answers 200 and hands over each body.
fn answering_webhook(l: TcpListener) -> tokio::sync::mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read until the body announced by Content-Length is in.
            loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        if let Ok(v) = serde_json::from_str(&body[..len]) {
                            let _ = tx.send(v).await;
                        }
                        break;
                    }
                }
            }
        }
    });
    rx
}

async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<serde_json::Value>) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event in time")
        .expect("event")
}

async fn offer(pbx: &UdpPeer, carrier: &UdpPeer, gate: &TestGate, call_id: &str) -> bool {
    pbx.send(
        gate.udp,
        &invite(pbx.addr, "UDP", call_id, &format!("z9hG4bK{call_id}"), ""),
    )
    .await;
    tokio::select! {
        (r, _) = pbx.recv() => { assert!(r.starts_with("SIP/2.0 503"), "{r}"); false }
        _ = carrier.recv() => true,
    }
}

#[tokio::test]
async fn the_webhook_hears_a_trunk_start_refusing_and_recover() {
    let hook = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook_addr = hook.local_addr().expect("addr");
    let mut events = answering_webhook(hook);
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&alert_config(pbx.addr, carrier.addr, hook_addr, 2000)).await;
    assert!(offer(&pbx, &carrier, &gate, "a-0").await);
    assert!(!offer(&pbx, &carrier, &gate, "a-1").await);
    assert!(!offer(&pbx, &carrier, &gate, "a-2").await);
    let start = next_event(&mut events).await;
    assert_eq!(start["event"], "limit_reached");
    assert_eq!(start["stage"], "trunk");
    assert_eq!(start["key"], "t1");
    assert_eq!(start["limit_rate"], 1.0);
    assert_eq!(start["first_call_id"], "a-1");
    // A second quiet for the debounce interval ends the episode.
    let end = next_event(&mut events).await;
    assert_eq!(end["event"], "recovered");
    assert_eq!(end["refused"], 2);
    let (_, metrics) = http(gate.admin.expect("admin"), "GET", "/metrics", None, "").await;
    assert!(
        metrics.contains("cpsgate_alerts_total{result=\"delivered\"} "),
        "{metrics}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn a_hanging_webhook_never_slows_the_sip_path() {
    // Accepts connections and never answers.
    let hook = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook_addr = hook.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = hook.accept().await {
            conns.push(s);
        }
    });
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&alert_config(pbx.addr, carrier.addr, hook_addr, 60_000)).await;
    let started = Instant::now();
    let mut refused = 0;
    for i in 0..200 {
        let t = Instant::now();
        if !offer(&pbx, &carrier, &gate, &format!("h-{i}")).await {
            refused += 1;
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "call {i} waited {:?}",
            t.elapsed()
        );
    }
    assert!(refused >= 190, "{refused}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?} for 200 calls",
        started.elapsed()
    );
    // Shutdown does not wait for the hung delivery either.
    tokio::time::timeout(Duration::from_secs(5), gate.stop())
        .await
        .expect("the gate stops despite the hung webhook");
    held.abort();
}
