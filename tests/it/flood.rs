//! The flood guard (`[flood]`) in front of the gate: a source over its packet rate gets its
//! burst through and then nothing — no answer at all — while the exempt carrier, on the same
//! address, keeps being served.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cpsgate::telemetry::TransportDrop;

use crate::harness::{TcpPeer, TestGate, UdpPeer, invite, loopback_trunk_config, respond};

fn flood_toml(carrier: SocketAddr) -> String {
    loopback_trunk_config(carrier, "[flood]\nrate = 5\nburst = 10\nblock_secs = 60\n")
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

#[tokio::test]
async fn a_carrier_added_by_a_reload_is_exempt_at_once() {
    let carrier = UdpPeer::bind().await;
    let newcomer = UdpPeer::bind().await;
    let path =
        std::env::temp_dir().join(format!("cpsgate-flood-reload-{}.toml", std::process::id()));
    let text = flood_toml(carrier.addr).replace("rate = 5\nburst = 10", "rate = 1\nburst = 2");
    std::fs::write(&path, &text).expect("write");
    let gate = TestGate::start_file(&path).await;
    // Pings to the gate itself: the first two are answered, the rest dropped (blocked).
    let ping = |n: usize| {
        format!(
            "OPTIONS sip:{g} SIP/2.0\r\nVia: SIP/2.0/UDP {a};branch=z9hG4bK-nc-{n}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:probe@x>;tag=n{n}\r\nTo: <sip:{g}>\r\n\
             Call-ID: nc-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            g = gate.udp,
            a = newcomer.addr
        )
    };
    for n in 0..5 {
        newcomer.send(gate.udp, &ping(n)).await;
    }
    assert_eq!(drain(&newcomer, Duration::from_millis(300)).await.len(), 2);
    // The newcomer becomes a carrier: exempt from the next packet on, though still blocked.
    let added = text.replace(
        "[[trunk]]",
        &format!(
            "[[upstream]]\nname = \"second\"\naddress = \"{a}\"\nsources = [\"{a}\"]\n\n[[trunk]]",
            a = newcomer.addr
        ),
    );
    std::fs::write(&path, added).expect("write");
    gate.reload.notify_one();
    for _ in 0..500 {
        if gate.stats.reloads.load(Ordering::Relaxed) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gate.stats.reloads.load(Ordering::Relaxed), 1);
    for n in 5..10 {
        newcomer.send(gate.udp, &ping(n)).await;
    }
    assert_eq!(drain(&newcomer, Duration::from_millis(300)).await.len(), 5);
    gate.stop().await;
    let _ = std::fs::remove_file(&path);
}
