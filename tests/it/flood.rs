//! The flood guard (`[flood]`) in front of the gate: a source over its packet rate gets its
//! burst through and then nothing — no answer at all — while the exempt carrier, on the same
//! address, keeps being served.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cpsgate::telemetry::TransportDrop;

use crate::harness::{TcpPeer, TestGate, UdpPeer, invite, respond};

fn flood_toml(carrier: SocketAddr) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:0"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[[upstream]]
name = "carrier"
address = "{carrier}"
sources = ["{carrier}"]

[[trunk]]
name = "t1"
upstream = "carrier"
rate = 1000
burst = 1000
match = {{ sources = ["127.0.0.0/8"] }}

[flood]
rate = 5
burst = 10
block_secs = 60
"#
    )
}

/// Every datagram that arrives at `peer` until it has been quiet for `quiet`.
async fn drain(peer: &UdpPeer, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_535];
    while let Ok(Ok((n, _))) = tokio::time::timeout(quiet, peer.sock.recv_from(&mut buf)).await {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[tokio::test]
async fn a_udp_flood_gets_its_burst_through_then_silence_and_the_carrier_is_still_served() {
    let carrier = UdpPeer::bind().await;
    let flooder = UdpPeer::bind().await;
    let gate = TestGate::start(&flood_toml(carrier.addr)).await;
    for i in 0..40 {
        let m = invite(
            flooder.addr,
            "UDP",
            &format!("flood-{i}"),
            &format!("z9hG4bK-flood-{i}"),
            "",
        );
        flooder.send(gate.udp, &m).await;
    }
    let forwarded = drain(&carrier, Duration::from_millis(500)).await;
    assert_eq!(forwarded.len(), 10, "the burst, and nothing after it");
    assert_eq!(gate.stats.transport_drops(TransportDrop::Flood), 30);
    assert_eq!(gate.stats.flood_blocks.load(Ordering::Relaxed), 1);
    // Nothing was answered to the flooder: no 503, no 100.
    assert!(drain(&flooder, Duration::from_millis(300)).await.is_empty());

    // The carrier shares the flooder's IP address but is exempt by its exact address: its
    // answer is relayed back (sending to a blocked source is not what the guard stops).
    let ok = respond(&forwarded[0], 200, "OK", "c1", Some("sip:uas@127.0.0.1"));
    carrier.send(gate.udp, &ok).await;
    let back = drain(&flooder, Duration::from_millis(500)).await;
    assert_eq!(back.len(), 1);
    assert!(back[0].starts_with("SIP/2.0 200 OK"), "{}", back[0]);

    // Still blocked: a well-paced INVITE from the flooder goes nowhere.
    tokio::time::sleep(Duration::from_millis(300)).await;
    flooder
        .send(
            gate.udp,
            &invite(flooder.addr, "UDP", "late", "z9hG4bK-late", ""),
        )
        .await;
    assert!(drain(&carrier, Duration::from_millis(300)).await.is_empty());
    assert_eq!(gate.stats.transport_drops(TransportDrop::Flood), 31);
    gate.stop().await;
}

#[tokio::test]
async fn a_tcp_connection_that_floods_is_closed_after_its_burst() {
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&flood_toml(carrier.addr)).await;
    let (s, local) = TcpPeer::socket();
    let mut flooder = TcpPeer::connect(s, gate.tcp).await;
    let mut all = Vec::new();
    for i in 0..40 {
        all.extend_from_slice(
            invite(
                local,
                "TCP",
                &format!("tflood-{i}"),
                &format!("z9hG4bK-tflood-{i}"),
                "",
            )
            .as_bytes(),
        );
    }
    // The connection itself is the first packet of the source, then ten messages' worth.
    flooder.send(&all).await;
    assert!(
        flooder.closed().await,
        "the gate closes a flooding connection"
    );
    let forwarded = drain(&carrier, Duration::from_millis(500)).await;
    assert_eq!(forwarded.len(), 9);
    assert!(gate.stats.transport_drops(TransportDrop::Flood) >= 1);
    gate.stop().await;
}
