//! TCP abuse: a message trickled byte by byte (slowloris), a Content-Length larger than what
//! follows, and one source opening connection after connection. Each is bounded and closed, and
//! the listener keeps serving everyone else.

use std::time::{Duration, Instant};

use cpsgate::telemetry::TransportDrop;
use tokio::io::AsyncWriteExt;

use crate::harness::{TcpPeer, TestGate, UdpPeer, header, invite, loopback_trunk_config};

fn toml(carrier: std::net::SocketAddr, tcp: &str) -> String {
    loopback_trunk_config(carrier, &format!("[tcp]\nidle_timeout_secs = 30\n{tcp}\n"))
}

/// A fresh connection sends one INVITE; the carrier must see it.
async fn served(gate: &TestGate, carrier: &UdpPeer, call_id: &str) {
    let (s, local) = TcpPeer::socket();
    let mut c = TcpPeer::connect(s, gate.tcp).await;
    c.send(invite(local, "TCP", call_id, &format!("z9hG4bK-{call_id}"), "").as_bytes())
        .await;
    assert_eq!(header(&carrier.recv().await.0, "Call-ID"), Some(call_id));
}

#[tokio::test]
async fn a_message_trickled_byte_by_byte_is_cut_at_the_message_timeout() {
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&toml(carrier.addr, "message_timeout_secs = 1")).await;
    let (s, local) = TcpPeer::socket();
    let mut slow = TcpPeer::connect(s, gate.tcp).await;
    let msg = invite(local, "TCP", "slow", "z9hG4bK-slow", "");
    let t0 = Instant::now();
    // One byte every 100 ms: never idle for long, never finishing (the INVITE is 500+ bytes).
    let mut closed_after = None;
    for b in msg.as_bytes() {
        if slow.stream.write_all(&[*b]).await.is_err() {
            closed_after = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t0.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    match closed_after {
        // Writes fail once the gate has closed its side.
        Some(t) => assert!(t < Duration::from_secs(3), "{t:?}"),
        None => assert!(
            slow.closed().await,
            "the gate closes the trickling connection"
        ),
    }
    assert_eq!(gate.stats.transport_drops(TransportDrop::SlowMessage), 1);
    // Everyone else is served meanwhile and after.
    served(&gate, &carrier, "after-slow").await;
    gate.stop().await;
}

#[tokio::test]
async fn a_content_length_larger_than_what_follows_is_cut_at_the_message_timeout() {
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&toml(carrier.addr, "message_timeout_secs = 1")).await;
    let (s, local) = TcpPeer::socket();
    let mut short = TcpPeer::connect(s, gate.tcp).await;
    let msg = invite(local, "TCP", "short", "z9hG4bK-short", "");
    let (head, _) = msg.split_once("Content-Length: ").expect("length");
    let lying = format!("{head}Content-Length: 1000\r\n\r\nv=0\r\n");
    short.send(lying.as_bytes()).await;
    let t0 = Instant::now();
    assert!(
        short.closed().await,
        "closed, not held open waiting for 1000 bytes"
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(gate.stats.transport_drops(TransportDrop::SlowMessage), 1);
    served(&gate, &carrier, "after-short").await;
    gate.stop().await;
}

#[tokio::test]
async fn one_source_cannot_take_every_connection_slot() {
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&toml(carrier.addr, "max_connections_per_source = 3")).await;
    // Three connections from this address are served.
    let mut open = Vec::new();
    for i in 0..3 {
        let (s, local) = TcpPeer::socket();
        let mut c = TcpPeer::connect(s, gate.tcp).await;
        let id = format!("per-src-{i}");
        c.send(invite(local, "TCP", &id, &format!("z9hG4bK-{id}"), "").as_bytes())
            .await;
        assert_eq!(
            header(&carrier.recv().await.0, "Call-ID"),
            Some(id.as_str())
        );
        open.push(c);
    }
    // The fourth is closed at once, and counted.
    let (s, _) = TcpPeer::socket();
    let mut fourth = TcpPeer::connect(s, gate.tcp).await;
    assert!(fourth.closed().await, "over the per-source cap: closed");
    assert_eq!(gate.stats.transport_drops(TransportDrop::Capacity), 1);
    // Closing one frees its slot for a new connection.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    served(&gate, &carrier, "per-src-again").await;
    gate.stop().await;
}
