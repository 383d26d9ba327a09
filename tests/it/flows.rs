//! Whole call flows through a running gate: UDP and TCP, both directions, local answers, drops.

use cpsgate::proxy::DropReason;
use cpsgate::telemetry::TransportDrop;
use tokio::net::TcpListener;

use crate::harness::*;

/// INVITE → 100/180/200 → ACK → BYE (from the callee) → 200, all through the gate over UDP.
#[tokio::test]
async fn udp_call_is_relayed_both_ways_and_stays_on_the_record_route() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;

    let inv = invite(pbx.addr, "UDP", "call-1", "z9hG4bKpbx1", "");
    pbx.send(gate.udp, &inv).await;
    let (fwd, from) = carrier.recv().await;
    assert_eq!(from, gate.udp, "forwarded from the gate's listening socket");
    let vias = headers(&fwd, "Via");
    assert_eq!(vias.len(), 2);
    assert!(
        vias[0].starts_with(&format!("SIP/2.0/UDP {};branch=z9hG4bKcg", gate.udp)),
        "{}",
        vias[0]
    );
    assert_eq!(
        vias[1],
        format!(
            "SIP/2.0/UDP {};branch=z9hG4bKpbx1;rport={};received=127.0.0.1",
            pbx.addr,
            pbx.addr.port()
        )
    );
    assert_eq!(header(&fwd, "Max-Forwards"), Some("69"));
    let rr = header(&fwd, "Record-Route").expect("record-routed");
    assert!(rr.starts_with(&format!("<sip:{};lr;cg=", gate.udp)), "{rr}");
    assert!(fwd.ends_with("m=audio 4000 RTP/AVP 0\r\n"), "body intact");

    // The carrier answers along the Via path.
    let carrier_contact = format!("sip:carrier@{}", carrier.addr);
    for (code, reason) in [(100, "Trying"), (180, "Ringing"), (200, "OK")] {
        let contact = (code > 100).then_some(carrier_contact.as_str());
        carrier
            .send(gate.udp, &respond(&fwd, code, reason, "callee", contact))
            .await;
        let (resp, from) = pbx.recv().await;
        assert_eq!(from, gate.udp);
        assert_eq!(status(&resp), code);
        let vias = headers(&resp, "Via");
        assert_eq!(vias.len(), 1, "our Via popped: {resp}");
        assert!(vias[0].contains("branch=z9hG4bKpbx1"));
        if code == 200 {
            assert_eq!(header(&resp, "Record-Route"), Some(rr));
        }
    }

    // The PBX ACKs the 2xx along the route set: Route = our Record-Route, R-URI = callee contact.
    let ack = format!(
        "ACK {carrier_contact} SIP/2.0\r\nVia: SIP/2.0/UDP {p};branch=z9hG4bKpbxack;rport\r\n\
         Route: {rr}\r\nMax-Forwards: 70\r\nFrom: <sip:+15550001111@pbx.example>;tag=from-call-1\r\n\
         To: <sip:+15551234567@carrier.example>;tag=callee\r\nCall-ID: call-1\r\nCSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n",
        p = pbx.addr
    );
    pbx.send(gate.udp, &ack).await;
    let (ack_fwd, _) = carrier.recv().await;
    assert!(ack_fwd.starts_with("ACK "));
    assert!(header(&ack_fwd, "Route").is_none(), "our Route removed");

    // The callee hangs up: BYE to the PBX contact via our Record-Route.
    let bye = format!(
        "BYE sip:pbx@{p};transport=udp SIP/2.0\r\nVia: SIP/2.0/UDP {c};branch=z9hG4bKbye1\r\n\
         Route: {rr}\r\nMax-Forwards: 70\r\nFrom: <sip:+15551234567@carrier.example>;tag=callee\r\n\
         To: <sip:+15550001111@pbx.example>;tag=from-call-1\r\nCall-ID: call-1\r\nCSeq: 7 BYE\r\n\
         Content-Length: 0\r\n\r\n",
        p = pbx.addr,
        c = carrier.addr
    );
    carrier.send(gate.udp, &bye).await;
    let (bye_fwd, _) = pbx.recv().await;
    assert!(bye_fwd.starts_with("BYE "));
    assert_eq!(headers(&bye_fwd, "Via").len(), 2);
    pbx.send(gate.udp, &respond(&bye_fwd, 200, "OK", "x", None))
        .await;
    let (ok, _) = carrier.recv().await;
    assert_eq!(status(&ok), 200);
    assert_eq!(header(&ok, "CSeq"), Some("7 BYE"));
    gate.stop().await;
}

/// An inbound call from the carrier (no Route) goes to the configured PBX.
#[tokio::test]
async fn initial_invite_from_carrier_goes_to_the_pbx() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;
    carrier
        .send(
            gate.udp,
            &invite(carrier.addr, "UDP", "in-1", "z9hG4bKin1", ""),
        )
        .await;
    let (fwd, _) = pbx.recv().await;
    assert!(fwd.starts_with("INVITE "));
    assert_eq!(headers(&fwd, "Via").len(), 2);
    gate.stop().await;
}

#[tokio::test]
async fn max_forwards_zero_gets_483_and_is_not_forwarded() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;
    let inv = invite(pbx.addr, "UDP", "mf0", "z9hG4bKmf0", "")
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    pbx.send(gate.udp, &inv).await;
    let (resp, _) = pbx.recv().await;
    assert_eq!(status(&resp), 483);
    assert!(header(&resp, "To").expect("To").contains(";tag=cg"));
    assert_eq!(header(&resp, "Call-ID"), Some("mf0"));
    // The carrier got nothing: the next forwarded message is the one sent after.
    pbx.send(
        gate.udp,
        &invite(pbx.addr, "UDP", "after", "z9hG4bKafter", ""),
    )
    .await;
    let (fwd, _) = carrier.recv().await;
    assert_eq!(header(&fwd, "Call-ID"), Some("after"));
    gate.stop().await;
}

#[tokio::test]
async fn malformed_request_gets_400_naming_the_problem() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;
    let inv = invite(pbx.addr, "UDP", "bad", "z9hG4bKbad", "")
        .replace("CSeq: 1 INVITE", "CSeq: one INVITE");
    pbx.send(gate.udp, &inv).await;
    let (resp, _) = pbx.recv().await;
    assert!(
        resp.starts_with("SIP/2.0 400 Bad Request (Malformed CSeq)\r\n"),
        "{resp}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn unknown_source_gets_403() {
    let pbx = UdpPeer::bind().await;
    let stranger = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;
    stranger
        .send(
            gate.udp,
            &invite(stranger.addr, "UDP", "fraud", "z9hG4bKf", ""),
        )
        .await;
    let (resp, _) = stranger.recv().await;
    assert_eq!(status(&resp), 403);
    // Its ACK is absorbed, not forwarded (RFC 3261 §17.1.1.3: same branch, our To-tag).
    let to = header(&resp, "To").expect("To").to_owned();
    let ack = format!(
        "ACK sip:+15551234567@carrier.example SIP/2.0\r\nVia: SIP/2.0/UDP {s};branch=z9hG4bKf;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+15550001111@pbx.example>;tag=from-fraud\r\nTo: {to}\r\n\
         Call-ID: fraud\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        s = stranger.addr
    );
    stranger.send(gate.udp, &ack).await;
    pbx.send(gate.udp, &invite(pbx.addr, "UDP", "legit", "z9hG4bKl", ""))
        .await;
    let (fwd, _) = carrier.recv().await;
    assert_eq!(
        header(&fwd, "Call-ID"),
        Some("legit"),
        "the ACK never reached the carrier"
    );
    assert_eq!(
        gate.stats
            .absorbed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    gate.stop().await;
}

#[tokio::test]
async fn response_with_a_foreign_top_via_is_dropped_and_counted() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;
    let foreign = format!(
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKother\r\nVia: SIP/2.0/UDP {p};branch=z9hG4bKx\r\n\
         From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>;tag=2\r\nCall-ID: foreign\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        p = pbx.addr
    );
    carrier.send(gate.udp, &foreign).await;
    // A message sent after it is processed after it on the same socket loop.
    pbx.send(gate.udp, &invite(pbx.addr, "UDP", "next", "z9hG4bKn", ""))
        .await;
    let (fwd, _) = carrier.recv().await;
    assert_eq!(header(&fwd, "Call-ID"), Some("next"));
    assert_eq!(gate.stats.drops(DropReason::ForeignVia), 1);
    gate.stop().await;
}

/// PBX over TCP, carrier over TCP: the INVITE goes out on a new connection, responses come back
/// on the PBX's own connection (found through `;i=` in our Via); split and pipelined writes.
#[tokio::test]
async fn tcp_call_uses_the_connections_both_ways() {
    let (pbx_sock, pbx_addr) = TcpPeer::socket();
    let carrier_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let carrier_addr = carrier_l.local_addr().expect("addr");
    let gate = TestGate::start(&config(pbx_addr, "tcp", carrier_addr, "tcp")).await;
    let mut pbx = TcpPeer::connect(pbx_sock, gate.tcp).await;

    let inv = invite(pbx_addr, "TCP", "tcp-1", "z9hG4bKt1", "");
    let (a, b) = inv.as_bytes().split_at(inv.len() / 2);
    pbx.send(a).await;
    pbx.send(b).await;
    let mut carrier = TcpPeer::accept(&carrier_l).await;
    let fwd = carrier.recv().await;
    let vias = headers(&fwd, "Via");
    assert!(
        vias[0].starts_with(&format!("SIP/2.0/TCP {};branch=z9hG4bKcg", gate.tcp)),
        "{}",
        vias[0]
    );
    assert!(
        vias[0].contains(";i="),
        "connection id carried: {}",
        vias[0]
    );
    let rr = header(&fwd, "Record-Route").expect("record-routed");
    assert!(
        rr.starts_with(&format!("<sip:{};transport=tcp;lr;cg=", gate.tcp)),
        "{rr}"
    );

    carrier
        .send(respond(&fwd, 180, "Ringing", "c1", Some("sip:c@127.0.0.1")).as_bytes())
        .await;
    let r = pbx.recv().await;
    assert_eq!(status(&r), 180);

    // Two requests in one write both arrive (pipelining), in order.
    let opt = |n: u32| {
        format!(
            "OPTIONS sip:carrier.example SIP/2.0\r\nVia: SIP/2.0/TCP {pbx_addr};branch=z9hG4bKo{n}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:p@x>;tag=o{n}\r\nTo: <sip:c@y>\r\nCall-ID: opt-{n}\r\n\
             CSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
    };
    pbx.send(format!("{}{}", opt(1), opt(2)).as_bytes()).await;
    assert_eq!(header(&carrier.recv().await, "Call-ID"), Some("opt-1"));
    assert_eq!(header(&carrier.recv().await, "Call-ID"), Some("opt-2"));

    // CRLF keep-alive: a CRLFCRLF ping gets a CRLF pong.
    pbx.send(b"\r\n\r\n").await;
    assert_eq!(pbx.recv().await, "");
    gate.stop().await;
}

/// A UDP PBX and a TCP carrier: the transport changes, so two Record-Route entries.
#[tokio::test]
async fn transport_change_inserts_two_record_routes() {
    let pbx = UdpPeer::bind().await;
    let carrier_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let carrier_addr = carrier_l.local_addr().expect("addr");
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier_addr, "tcp")).await;
    pbx.send(gate.udp, &invite(pbx.addr, "UDP", "x-1", "z9hG4bKx1", ""))
        .await;
    let mut carrier = TcpPeer::accept(&carrier_l).await;
    let fwd = carrier.recv().await;
    let rr = headers(&fwd, "Record-Route");
    assert_eq!(rr.len(), 2, "{rr:?}");
    assert!(
        rr[0].starts_with(&format!("<sip:{};transport=tcp;lr;cg=", gate.tcp)),
        "{rr:?}"
    );
    assert!(
        rr[1].starts_with(&format!("<sip:{};lr;cg=", gate.udp)),
        "{rr:?}"
    );
    // The 200 comes back over TCP and leaves over UDP to the PBX.
    carrier
        .send(respond(&fwd, 200, "OK", "c", Some("sip:c@127.0.0.1")).as_bytes())
        .await;
    let (ok, _) = pbx.recv().await;
    assert_eq!(status(&ok), 200);
    gate.stop().await;
}

#[tokio::test]
async fn oversize_tcp_message_gets_413_and_the_connection_closes() {
    let (pbx_sock, pbx_addr) = TcpPeer::socket();
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx_addr, "tcp", carrier.addr, "udp")).await;
    let mut pbx = TcpPeer::connect(pbx_sock, gate.tcp).await;
    let inv = invite(pbx_addr, "TCP", "big", "z9hG4bKbig", "")
        .replace("Content-Length: ", "X-Ignored: ")
        .replace("Content-Type", "Content-Length: 100000\r\nContent-Type");
    pbx.send(inv.as_bytes()).await;
    let r = pbx.recv().await;
    assert_eq!(status(&r), 413);
    assert!(pbx.closed().await, "connection closed after 413");
    assert_eq!(gate.stats.transport_drops(TransportDrop::Oversize), 1);
    gate.stop().await;
}

#[tokio::test]
async fn tcp_message_without_content_length_gets_400_and_close() {
    let (pbx_sock, pbx_addr) = TcpPeer::socket();
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx_addr, "tcp", carrier.addr, "udp")).await;
    let mut pbx = TcpPeer::connect(pbx_sock, gate.tcp).await;
    let opt = format!(
        "OPTIONS sip:c SIP/2.0\r\nVia: SIP/2.0/TCP {pbx_addr};branch=z9hG4bKncl\r\nFrom: <sip:p@x>;tag=1\r\n\
         To: <sip:c@y>\r\nCall-ID: ncl\r\nCSeq: 1 OPTIONS\r\n\r\n"
    );
    pbx.send(opt.as_bytes()).await;
    let r = pbx.recv().await;
    assert!(
        r.starts_with("SIP/2.0 400 Bad Request (Missing Content-Length)"),
        "{r}"
    );
    assert!(pbx.closed().await);
    gate.stop().await;
}

#[tokio::test]
async fn idle_tcp_connection_is_closed() {
    let (pbx_sock, pbx_addr) = TcpPeer::socket();
    let carrier = UdpPeer::bind().await;
    let cfg = config(pbx_addr, "tcp", carrier.addr, "udp")
        .replace("idle_timeout_secs = 30", "idle_timeout_secs = 1");
    let gate = TestGate::start(&cfg).await;
    let mut pbx = TcpPeer::connect(pbx_sock, gate.tcp).await;
    assert!(pbx.closed().await, "closed after the idle timeout");
    gate.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_and_the_rest_keep_working() {
    let (pbx_sock, pbx_addr) = TcpPeer::socket();
    let carrier = UdpPeer::bind().await;
    let cfg = config(pbx_addr, "tcp", carrier.addr, "udp")
        .replace("[tcp]\n", "[tcp]\nmax_connections = 1\n");
    let gate = TestGate::start(&cfg).await;
    let mut first = TcpPeer::connect(pbx_sock, gate.tcp).await;
    // The first connection is registered once a message on it has been handled.
    first
        .send(invite(pbx_addr, "TCP", "cap-1", "z9hG4bKcap1", "").as_bytes())
        .await;
    assert_eq!(header(&carrier.recv().await.0, "Call-ID"), Some("cap-1"));
    let (second_sock, _) = TcpPeer::socket();
    let mut second = TcpPeer::connect(second_sock, gate.tcp).await;
    assert!(second.closed().await, "over the cap: closed at once");
    first
        .send(invite(pbx_addr, "TCP", "cap-2", "z9hG4bKcap2", "").as_bytes())
        .await;
    assert_eq!(header(&carrier.recv().await.0, "Call-ID"), Some("cap-2"));
    assert_eq!(gate.stats.transport_drops(TransportDrop::Capacity), 1);
    gate.stop().await;
}

#[tokio::test]
async fn outbound_tcp_connection_is_reused() {
    let pbx = UdpPeer::bind().await;
    let carrier_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let carrier_addr = carrier_l.local_addr().expect("addr");
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier_addr, "tcp")).await;
    pbx.send(gate.udp, &invite(pbx.addr, "UDP", "r-1", "z9hG4bKr1", ""))
        .await;
    let mut carrier = TcpPeer::accept(&carrier_l).await;
    assert_eq!(header(&carrier.recv().await, "Call-ID"), Some("r-1"));
    pbx.send(gate.udp, &invite(pbx.addr, "UDP", "r-2", "z9hG4bKr2", ""))
        .await;
    assert_eq!(
        header(&carrier.recv().await, "Call-ID"),
        Some("r-2"),
        "same connection"
    );
    assert_eq!(
        gate.stats
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    gate.stop().await;
}

/// IPv6 listeners, sources and Via hosts (skipped where the host has no IPv6 loopback).
#[tokio::test]
async fn ipv6_call_over_udp() {
    let Ok(pbx_sock) = tokio::net::UdpSocket::bind("[::1]:0").await else {
        eprintln!("no IPv6 loopback here; nothing to test");
        return;
    };
    let pbx = UdpPeer {
        addr: pbx_sock.local_addr().expect("addr"),
        sock: pbx_sock,
    };
    let carrier_sock = tokio::net::UdpSocket::bind("[::1]:0").await.expect("bind");
    let carrier = UdpPeer {
        addr: carrier_sock.local_addr().expect("addr"),
        sock: carrier_sock,
    };
    let cfg = config(pbx.addr, "udp", carrier.addr, "udp").replace("127.0.0.1:0", "[::1]:0");
    let gate = TestGate::start(&cfg).await;
    pbx.send(gate.udp, &invite(pbx.addr, "UDP", "v6", "z9hG4bKv6", ""))
        .await;
    let (fwd, _) = carrier.recv().await;
    let vias = headers(&fwd, "Via");
    assert!(
        vias[0].starts_with(&format!("SIP/2.0/UDP {};branch=z9hG4bKcg", gate.udp)),
        "{}",
        vias[0]
    );
    let rr = header(&fwd, "Record-Route").expect("record-routed");
    assert!(rr.starts_with(&format!("<sip:{};lr;cg=", gate.udp)), "{rr}");
    carrier
        .send(
            gate.udp,
            &respond(
                &fwd,
                200,
                "OK",
                "c",
                Some(&format!("sip:c@{}", carrier.addr)),
            ),
        )
        .await;
    let (ok, _) = pbx.recv().await;
    assert_eq!(status(&ok), 200);
    gate.stop().await;
}

/// Set up a dialog through the gate (INVITE from the PBX, forwarded to the carrier) and return
/// the Record-Route value the gate inserted, which carries the dialog's mark.
async fn dialog_route(pbx: &UdpPeer, carrier: &UdpPeer, gate: &TestGate, call_id: &str) -> String {
    pbx.send(
        gate.udp,
        &invite(pbx.addr, "UDP", call_id, &format!("z9hG4bK{call_id}"), ""),
    )
    .await;
    let (fwd, _) = carrier.recv().await;
    header(&fwd, "Record-Route")
        .expect("record-routed")
        .to_owned()
}

/// A BYE from the PBX in the dialog `call_id`, along `route`, to `target`, padded by `pad` bytes.
fn in_dialog_bye(
    from: std::net::SocketAddr,
    route: &str,
    call_id: &str,
    target: &str,
    pad: usize,
) -> String {
    format!(
        "BYE {target} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bKbye-{pad};rport\r\n\
         Route: {route}\r\nMax-Forwards: 70\r\nFrom: <sip:+15550001111@pbx.example>;tag=from-{call_id}\r\n\
         To: <sip:+15551234567@carrier.example>;tag=2\r\nCall-ID: {call_id}\r\nCSeq: 2 BYE\r\nX-Pad: {}\r\n\
         Content-Length: 0\r\n\r\n",
        "p".repeat(pad)
    )
}

/// A next hop given by host name is resolved (A/AAAA, the egress listener's family).
#[tokio::test]
async fn host_name_next_hop_is_resolved() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;
    let route = dialog_route(&pbx, &carrier, &gate, "dns-1").await;
    let target = format!("sip:callee@localhost:{}", carrier.addr.port());
    pbx.send(
        gate.udp,
        &in_dialog_bye(pbx.addr, &route, "dns-1", &target, 1),
    )
    .await;
    let (bye, _) = carrier.recv().await;
    assert!(bye.starts_with(&format!("BYE {target} SIP/2.0")), "{bye}");
    gate.stop().await;
}

/// RFC 3261 §18.1.1: a request over 1300 bytes goes over TCP; when the next hop takes no TCP
/// connection, the UDP version is sent instead.
#[tokio::test]
async fn large_request_falls_back_to_udp_when_tcp_is_refused() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&config(pbx.addr, "udp", carrier.addr, "udp")).await;
    // Nothing listens on TCP at the carrier's UDP port, so the connect is refused.
    let route = dialog_route(&pbx, &carrier, &gate, "big-1").await;
    let target = format!("sip:callee@{}", carrier.addr);
    pbx.send(
        gate.udp,
        &in_dialog_bye(pbx.addr, &route, "big-1", &target, 1400),
    )
    .await;
    let (bye, from) = carrier.recv().await;
    assert_eq!(from, gate.udp);
    assert!(headers(&bye, "Via")[0].starts_with("SIP/2.0/UDP "), "{bye}");
    assert_eq!(gate.stats.transport_drops(TransportDrop::ConnectFailed), 1);
    gate.stop().await;
}

/// SIGTERM drains: new calls get 503 so the PBX tries another gate, while responses for calls
/// already forwarded are still relayed; then the gate stops within its grace period.
#[tokio::test]
async fn draining_turns_away_new_calls_and_relays_existing_ones() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let cfg = config(pbx.addr, "udp", carrier.addr, "udp")
        .replace("shutdown_grace_secs = 0", "shutdown_grace_secs = 2");
    let mut gate = TestGate::start(&cfg).await;
    pbx.send(
        gate.udp,
        &invite(pbx.addr, "UDP", "ringing", "z9hG4bKring", ""),
    )
    .await;
    let (ringing, _) = carrier.recv().await;
    gate.begin_stop();
    // New INVITEs until the drain shows: each is either forwarded (before) or answered 503.
    let mut refused = None;
    for n in 0..200 {
        pbx.send(
            gate.udp,
            &invite(
                pbx.addr,
                "UDP",
                &format!("new-{n}"),
                &format!("z9hG4bKn{n}"),
                "",
            ),
        )
        .await;
        tokio::select! {
            (r, _) = pbx.recv() => { refused = Some(r); break; }
            _ = carrier.recv() => {}
        }
    }
    let refused = refused.expect("new calls are refused while draining");
    assert!(
        refused.starts_with("SIP/2.0 503 Service Unavailable (Shutting Down)\r\n"),
        "{refused}"
    );
    // The call that was ringing still gets its answer through the gate.
    carrier
        .send(
            gate.udp,
            &respond(
                &ringing,
                200,
                "OK",
                "c",
                Some(&format!("sip:c@{}", carrier.addr)),
            ),
        )
        .await;
    let (ok, _) = pbx.recv().await;
    assert_eq!(status(&ok), 200);
    assert_eq!(header(&ok, "Call-ID"), Some("ringing"));
    gate.stop().await;
}
