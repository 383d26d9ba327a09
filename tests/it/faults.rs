//! Faults on the carrier side: a next hop over TCP that refuses the connection or never
//! accepts it. The calls queued for it are answered as if the next hop had answered (RFC 3261
//! §16.9) — 503 for a refusal, 408 for a timeout — to the PBX, with the gate's To-tag, and the
//! ACK of that answer is absorbed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cpsgate::telemetry::TransportDrop;

use crate::harness::{TestGate, UdpPeer, config, header, headers, invite, status};

fn ack_for(answer: &str, pbx: std::net::SocketAddr, call_id: &str, branch: &str) -> String {
    let to = header(answer, "To").expect("to");
    format!(
        "ACK sip:+15551234567@carrier.example SIP/2.0\r\nVia: SIP/2.0/UDP {pbx};branch={branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+15550001111@pbx.example>;tag=from-{call_id}\r\nTo: {to}\r\n\
         Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    )
}

#[tokio::test]
async fn a_refused_connection_to_the_carrier_answers_the_call_503_and_absorbs_its_ack() {
    // A port nothing listens on: bound, then closed.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let pbx = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", dead, "tcp")).await;
    pbx.send(
        gate.udp,
        &invite(pbx.addr, "UDP", "dead-1", "z9hG4bK-dead-1", ""),
    )
    .await;
    let (answer, from) = pbx.recv().await;
    assert_eq!(from, gate.udp);
    assert_eq!(status(&answer), 503, "{answer}");
    assert!(answer.contains("Next Hop Unreachable"), "{answer}");
    // Only the PBX's own Via comes back, with what the gate saw of it.
    let vias = headers(&answer, "Via");
    assert_eq!(vias.len(), 1, "{answer}");
    assert!(
        vias[0].contains("z9hG4bK-dead-1") && vias[0].contains("rport="),
        "{answer}"
    );
    let to = header(&answer, "To").expect("to");
    assert!(to.contains(";tag=cg"), "{answer}");
    assert_eq!(gate.stats.transport_drops(TransportDrop::ConnectFailed), 1);
    // The ACK of the 503 stays here: no second connection attempt, counted as absorbed.
    let absorbed = gate.stats.absorbed.load(Ordering::Relaxed);
    pbx.send(
        gate.udp,
        &ack_for(&answer, pbx.addr, "dead-1", "z9hG4bK-dead-1"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gate.stats.absorbed.load(Ordering::Relaxed), absorbed + 1);
    assert_eq!(gate.stats.transport_drops(TransportDrop::ConnectFailed), 1);
    gate.stop().await;
}

#[tokio::test]
async fn a_connection_the_carrier_never_accepts_answers_the_call_408() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so the gate's
    // connection attempt times out.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let carrier = sock.local_addr().expect("addr");
    let listener = sock.listen(1).expect("listen");
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(carrier),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let pbx = UdpPeer::bind().await;
    let toml = config(pbx.addr, "udp", carrier, "tcp").replace(
        "idle_timeout_secs = 30",
        "idle_timeout_secs = 30\nconnect_timeout_ms = 300",
    );
    let gate = TestGate::start(&toml).await;
    pbx.send(
        gate.udp,
        &invite(pbx.addr, "UDP", "slow-1", "z9hG4bK-slow-1", ""),
    )
    .await;
    let (answer, _) = pbx.recv().await;
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(answer.contains("Next Hop Did Not Answer"), "{answer}");
    assert_eq!(headers(&answer, "Via").len(), 1, "{answer}");
    gate.stop().await;
    drop((listener, fillers));
}

#[tokio::test]
async fn a_carrier_port_closed_on_udp_does_not_stop_the_gate() {
    // Datagrams to a closed port draw ICMP port unreachable; whatever the socket reports back,
    // the receive loop goes on serving.
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr")
    };
    let pbx = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", dead, "udp")).await;
    for i in 0..20 {
        let m = invite(
            pbx.addr,
            "UDP",
            &format!("icmp-{i}"),
            &format!("z9hG4bK-icmp-{i}"),
            "",
        );
        pbx.send(gate.udp, &m).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still serving: an OPTIONS to the gate itself is answered.
    let ping = format!(
        "OPTIONS sip:{g} SIP/2.0\r\nVia: SIP/2.0/UDP {p};branch=z9hG4bK-icmp-ping\r\n\
         Max-Forwards: 70\r\nFrom: <sip:probe@x>;tag=p\r\nTo: <sip:{g}>\r\n\
         Call-ID: icmp-ping\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        g = gate.udp,
        p = pbx.addr
    );
    pbx.send(gate.udp, &ping).await;
    let (answer, _) = pbx.recv().await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(gate.stats.forwarded.load(Ordering::Relaxed), 20);
    gate.stop().await;
}
