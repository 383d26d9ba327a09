//! Decision-core tests: hand-built messages, a fixed `now`, no sockets.

use std::net::SocketAddr;
use std::time::Instant;

use super::*;
use crate::config::Config;

const CFG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[[listen]]
name = "outside"
address = "192.0.2.10:5060"
transports = ["udp"]

[proxy]
unknown_sources = "reject"
aliases = ["sbc.example.com"]
secret = "0123456789abcdef-test"

[pbx]
address = "127.0.0.1:5070"

[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"
listener = "outside"

[[upstream]]
name = "tcp-carrier"
address = "127.0.0.1:5090"
transport = "tcp"
sources = ["127.0.0.1:5090"]

[[trunk]]
name = "by-source"
upstream = "carrier"
rate = 1000
burst = 1000
match = { sources = ["10.0.0.0/24"] }

[[trunk]]
name = "by-header"
upstream = "tcp-carrier"
rate = 1000
burst = 1000
match = { header = { name = "X-Trunk", value = "blue" } }

[[trunk]]
name = "by-user"
upstream = "tcp-carrier"
rate = 1000
burst = 1000
match = { username = "alice" }
"#;

fn test_listeners() -> Vec<LocalListener> {
    vec![
        LocalListener {
            bound: "127.0.0.1:5060".parse().expect("addr"),
            host: "127.0.0.1".into(),
            port: 5060,
            udp: true,
            tcp: true,
        },
        LocalListener {
            bound: "192.0.2.10:5060".parse().expect("addr"),
            host: "192.0.2.10".into(),
            port: 5060,
            udp: true,
            tcp: false,
        },
    ]
}

fn proxy_with(cfg: &str) -> Proxy {
    let cfg = Config::parse(cfg, "test").expect("valid test config");
    Proxy::new(&cfg, test_listeners()).expect("proxy builds")
}

fn proxy() -> Proxy {
    proxy_with(CFG)
}

const PBX: &str = "10.0.0.5:5062";
const CARRIER: &str = "192.0.2.80:5060";

fn req(method: &str, extra: &str) -> String {
    format!(
        "{method} sip:+15551234567@carrier.example SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKabc;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:pbx@pbx.example>;tag=f1\r\n\
         To: <sip:+15551234567@carrier.example>\r\n\
         Call-ID: cid-1\r\n\
         CSeq: 1 {method}\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

fn handle_from(p: &Proxy, msg: &str, src: &str, t: Transport, conn: Option<ConnId>) -> Action {
    p.handle(
        Instant::now(),
        &Inbound {
            data: msg.as_bytes(),
            source: src.parse().expect("addr"),
            transport: t,
            listener: 0,
            conn,
        },
    )
}

/// `msg` with our Route/Request-URI entries carrying the dialog mark of its Call-ID, as the
/// Record-Route we inserted would.
fn marked(p: &Proxy, msg: &str) -> String {
    let scanned = Message::scan(msg.as_bytes()).expect("scans");
    let m = p.dialog_mark(&scanned);
    msg.replace(
        "sip:127.0.0.1:5060;lr",
        &format!("sip:127.0.0.1:5060;lr;cg={m}"),
    )
    .replace(
        "sip:192.0.2.10:5060;lr",
        &format!("sip:192.0.2.10:5060;lr;cg={m}"),
    )
    .replace(
        "sip:sbc.example.com SIP/2.0",
        &format!("sip:sbc.example.com;cg={m} SIP/2.0"),
    )
}

fn handle(p: &Proxy, msg: &str, src: &str) -> Action {
    handle_from(p, msg, src, Transport::Udp, None)
}

fn forwarded(a: Action) -> (Outbound, String) {
    match a {
        Action::Forward(o) => {
            let s = String::from_utf8(o.data.to_vec()).expect("utf8");
            (o, s)
        }
        other => panic!("expected a forward, got {other:?}"),
    }
}

fn replied(a: Action) -> (u16, Outbound, String) {
    match a {
        Action::Reply(code, o) => {
            let s = String::from_utf8(o.data.to_vec()).expect("utf8");
            (code, o, s)
        }
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn top_branch(s: &str) -> String {
    let v = s
        .split("\r\n")
        .find(|l| l.starts_with("Via:"))
        .expect("via");
    v.split("branch=")
        .nth(1)
        .expect("branch")
        .split(';')
        .next()
        .expect("b")
        .to_owned()
}

#[test]
fn trunk_by_source_goes_to_its_upstream_with_rfc_16_6_rewrites() {
    let p = proxy();
    let (o, s) = forwarded(handle(&p, &req("INVITE", ""), PBX));
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
    assert_eq!(o.transport, Transport::Udp);
    assert_eq!(
        o.listener, 1,
        "egress on the interface that reaches the carrier"
    );
    let lines: Vec<&str> = s.split("\r\n").collect();
    assert!(lines[1].starts_with("Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcg"));
    assert!(lines[1].ends_with(";ln=0"));
    // RFC 3581: rport filled, received added.
    assert_eq!(
        lines[2],
        "Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKabc;rport=5062;received=10.0.0.5"
    );
    assert!(s.contains("\r\nMax-Forwards: 69\r\n"));
    // Interface change: two Record-Routes, egress first.
    let m = p.dialog_mark(&Message::scan(req("INVITE", "").as_bytes()).expect("scans"));
    assert!(s.contains(&format!(
        "Record-Route: <sip:192.0.2.10:5060;lr;cg={m}>\r\nRecord-Route: <sip:127.0.0.1:5060;lr;cg={m}>\r\n"
    )));
}

#[test]
fn retransmission_cancel_and_non_2xx_ack_get_the_same_branch() {
    let p = proxy();
    let inv = req("INVITE", "");
    let (_, a) = forwarded(handle(&p, &inv, PBX));
    let (_, b) = forwarded(handle(&p, &inv, PBX));
    assert_eq!(a, b, "a retransmission is forwarded byte for byte the same");
    let (o, cancel) = forwarded(handle(&p, &req("CANCEL", ""), PBX));
    assert_eq!(top_branch(&cancel), top_branch(&a));
    assert_eq!(
        o.to,
        NextHop::Addr(CARRIER.parse().expect("addr")),
        "same destination"
    );
    let ack = req("ACK", "").replace(
        "To: <sip:+15551234567@carrier.example>",
        "To: <sip:+15551234567@carrier.example>;tag=remote",
    );
    let (_, ack) = forwarded(handle(&p, &ack, PBX));
    assert_eq!(top_branch(&ack), top_branch(&a));
    // A different transaction gets a different branch.
    let other = inv.replace("z9hG4bKabc", "z9hG4bKabd");
    let (_, c) = forwarded(handle(&p, &other, PBX));
    assert_ne!(top_branch(&c), top_branch(&a));
}

#[test]
fn rfc2543_requests_without_cookie_get_a_stable_branch_excluding_the_to_tag() {
    let p = proxy();
    let inv = req("INVITE", "").replace("branch=z9hG4bKabc;", "");
    let (_, a) = forwarded(handle(&p, &inv, PBX));
    let ack = req("ACK", "")
        .replace("branch=z9hG4bKabc;", "")
        .replace("carrier.example>\r\nCall", "carrier.example>;tag=x\r\nCall");
    let (_, b) = forwarded(handle(&p, &ack, PBX));
    assert_eq!(top_branch(&a), top_branch(&b));
}

#[test]
fn missing_max_forwards_is_added_as_70() {
    let p = proxy();
    let (_, s) = forwarded(handle(
        &p,
        &req("INVITE", "").replace("Max-Forwards: 70\r\n", ""),
        PBX,
    ));
    assert!(s.contains("\r\nMax-Forwards: 70\r\n"), "{s}");
}

#[test]
fn validation_answers_483_416_420_505_and_400() {
    let p = proxy();
    let cases = [
        (
            req("INVITE", "").replace("Max-Forwards: 70", "Max-Forwards: 0"),
            483,
        ),
        (
            req("INVITE", "").replace("INVITE sip:+1555", "INVITE http:+1555"),
            416,
        ),
        (
            req("INVITE", "").replace("INVITE sip:+1555", "INVITE sips:+1555"),
            416,
        ),
        (req("INVITE", "Proxy-Require: foo, bar\r\n"), 420),
        (
            req("INVITE", "").replace("SIP/2.0\r\nVia", "SIP/3.0\r\nVia"),
            505,
        ),
        (req("INVITE", "").replace("Call-ID: cid-1\r\n", ""), 400),
        (
            req("INVITE", "").replace("Max-Forwards: 70", "Max-Forwards: 999"),
            400,
        ),
        (
            req("INVITE", "").replace("Content-Length: 0", "Content-Length: 10"),
            400,
        ),
        (req("INVITE", "Route: <sip:[::1>\r\n"), 400),
    ];
    for (msg, want) in cases {
        let (code, o, s) = replied(handle(&p, &msg, PBX));
        assert_eq!(code, want, "{msg}");
        assert!(s.starts_with(&format!("SIP/2.0 {want} ")));
        // RFC 3261 §18.2.2 + RFC 3581: rport → back to the source port.
        assert_eq!(o.to, NextHop::Addr(PBX.parse().expect("addr")));
        assert!(s.contains(";rport=5062;received=10.0.0.5\r\n"), "{s}");
        if want == 420 {
            assert!(s.contains("\r\nUnsupported: foo, bar\r\n"));
        }
    }
}

#[test]
fn without_rport_the_reply_goes_to_the_sent_by_port() {
    let p = proxy();
    let msg = req("INVITE", "")
        .replace(";rport", "")
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    let (_, o, _) = replied(handle(&p, &msg, "10.0.0.5:40000"));
    assert_eq!(o.to, NextHop::Addr("10.0.0.5:5062".parse().expect("addr")));
}

#[test]
fn reply_to_tag_is_stable_and_its_ack_is_absorbed() {
    let p = proxy();
    let stranger = "203.0.113.9:5060";
    let (code, _, a) = replied(handle(&p, &req("INVITE", ""), stranger));
    assert_eq!(code, 403);
    let (_, _, b) = replied(handle(&p, &req("INVITE", ""), stranger));
    assert_eq!(a, b, "a retransmission gets a byte-identical answer");
    let to = a
        .split("\r\n")
        .find(|l| l.starts_with("To:"))
        .expect("to")
        .to_owned();
    let ack = req("ACK", "").replace("To: <sip:+15551234567@carrier.example>", &to);
    assert_eq!(handle(&p, &ack, stranger), Action::Absorb);
    // An ACK with someone else's tag is routed, not absorbed (here: refused source → dropped).
    let other = req("ACK", "").replace(
        "carrier.example>\r\nCall",
        "carrier.example>;tag=cgdeadbeef\r\nCall",
    );
    assert_eq!(
        handle(&p, &other, stranger),
        Action::Drop(DropReason::Unanswerable)
    );
}

#[test]
fn trunks_match_by_header_and_by_username() {
    let p = proxy();
    let (o, s) = forwarded(handle(
        &p,
        &req("INVITE", "x-trunk: blue\r\n"),
        "198.51.100.1:5060",
    ));
    assert_eq!(o.to, NextHop::Addr("127.0.0.1:5090".parse().expect("addr")));
    assert_eq!(o.transport, Transport::Tcp);
    assert!(s.contains("\r\nContent-Length: 0\r\n"));
    // From user alice → by-user trunk.
    let alice = req("INVITE", "").replace("sip:pbx@pbx.example", "sip:alice@pbx.example");
    let (o, _) = forwarded(handle(&p, &alice, "198.51.100.1:5060"));
    assert_eq!(o.to, NextHop::Addr("127.0.0.1:5090".parse().expect("addr")));
    // Proxy-Authorization username wins over the From user.
    let msg = alice.replace(
        "Content-Length",
        "Proxy-Authorization: Digest username=\"mallory\", realm=\"x\"\r\nContent-Length",
    );
    let (code, _, _) = replied(handle(&p, &msg, "198.51.100.1:5060"));
    assert_eq!(code, 403);
}

#[test]
fn tcp_egress_adds_content_length_when_absent() {
    let p = proxy();
    let msg = req("OPTIONS", "X-Trunk: blue\r\n").replace("Content-Length: 0\r\n", "");
    let (_, s) = forwarded(handle(&p, &msg, "198.51.100.1:5060"));
    assert!(s.ends_with("\r\nContent-Length: 0\r\n\r\n"), "{s}");
}

#[test]
fn unknown_sources_forward_to_the_default_upstream() {
    let cfg = CFG.replace(
        "unknown_sources = \"reject\"",
        "unknown_sources = \"forward\"\ndefault_upstream = \"carrier\"",
    );
    let p = proxy_with(&cfg);
    let (o, _) = forwarded(handle(&p, &req("INVITE", ""), "203.0.113.9:5060"));
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
}

#[test]
fn carrier_requests_go_to_the_pbx() {
    let p = proxy();
    let (o, _) = forwarded(handle(&p, &req("INVITE", ""), CARRIER));
    assert_eq!(o.to, NextHop::Addr("127.0.0.1:5070".parse().expect("addr")));
    assert_eq!(o.listener, 0);
}

#[test]
fn loose_route_to_us_is_removed_and_the_next_route_followed() {
    let p = proxy();
    let msg = req(
        "BYE",
        "Route: <sip:127.0.0.1:5060;lr>, <sip:192.0.2.99:5080;lr>\r\n",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, s) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(
        o.to,
        NextHop::Addr("192.0.2.99:5080".parse().expect("addr"))
    );
    assert!(s.contains("\r\nRoute: <sip:192.0.2.99:5080;lr>\r\n"), "{s}");
    assert!(
        !s.contains("Record-Route"),
        "no Record-Route on in-dialog requests"
    );
}

#[test]
fn double_record_route_names_the_egress_listener() {
    let p = proxy();
    // Carrier-side BYE carrying both of our entries: pop both, leave on the second's listener.
    let msg = req(
        "BYE",
        "Route: <sip:192.0.2.10:5060;lr>\r\nRoute: <sip:127.0.0.1:5060;lr>\r\n",
    )
    .replace(
        "BYE sip:+15551234567@carrier.example",
        "BYE sip:pbx@127.0.0.1:5070",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, s) = forwarded(handle(&p, &msg, CARRIER));
    assert_eq!(o.to, NextHop::Addr("127.0.0.1:5070".parse().expect("addr")));
    assert_eq!(o.listener, 0);
    assert!(!s.contains("Route:"), "{s}");
}

#[test]
fn strict_router_request_uri_is_restored_from_the_last_route() {
    let p = proxy();
    let msg = req("BYE", "Route: <sip:callee@192.0.2.99:5080>\r\n")
        .replace(
            "BYE sip:+15551234567@carrier.example",
            "BYE sip:sbc.example.com",
        )
        .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, s) = forwarded(handle(&p, &msg, PBX));
    assert!(
        s.starts_with("BYE sip:callee@192.0.2.99:5080 SIP/2.0\r\n"),
        "{s}"
    );
    assert!(!s.contains("Route:"));
    assert_eq!(
        o.to,
        NextHop::Addr("192.0.2.99:5080".parse().expect("addr"))
    );
}

#[test]
fn route_back_to_ourselves_is_a_loop() {
    let p = proxy();
    let msg = req("BYE", "Route: <sip:127.0.0.1:5060;lr>\r\n")
        .replace(
            "BYE sip:+15551234567@carrier.example",
            "BYE sip:127.0.0.1:5060",
        )
        .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (code, _, _) = replied(handle(&p, &msg, PBX));
    assert_eq!(code, 482);
}

#[test]
fn host_name_next_hops_are_left_to_the_resolver() {
    let p = proxy();
    let msg = req(
        "BYE",
        "Route: <sip:127.0.0.1:5060;lr>, <sip:edge.carrier.example;lr;transport=tcp>\r\n",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, _) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(
        o.to,
        NextHop::Name {
            host: "edge.carrier.example".into(),
            port: 5060
        }
    );
    assert_eq!(o.transport, Transport::Tcp);
}

fn response_to(forwarded: &str, code: u16) -> String {
    let head = forwarded.split("\r\n\r\n").next().expect("head");
    let mut out = format!("SIP/2.0 {code} X\r\n");
    for l in head.split("\r\n").skip(1) {
        if l.starts_with("Via:")
            || l.starts_with("From:")
            || l.starts_with("Call-ID:")
            || l.starts_with("CSeq:")
        {
            out.push_str(l);
            out.push_str("\r\n");
        } else if l.starts_with("To:") {
            out.push_str(l);
            out.push_str(";tag=r\r\n");
        }
    }
    out + "Content-Length: 0\r\n\r\n"
}

#[test]
fn responses_pop_our_via_and_follow_rport_and_received() {
    let p = proxy();
    let (_, fwd) = forwarded(handle(&p, &req("INVITE", ""), PBX));
    let resp = response_to(&fwd, 180);
    let (o, s) = forwarded(handle(&p, &resp, CARRIER));
    assert_eq!(o.to, NextHop::Addr(PBX.parse().expect("addr")));
    assert_eq!(
        o.listener, 0,
        "leaves on the listener the request came in on"
    );
    assert!(s.starts_with("SIP/2.0 180 X\r\nVia: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKabc;rport=5062;received=10.0.0.5\r\n"), "{s}");
}

#[test]
fn responses_over_tcp_return_on_the_request_connection() {
    let p = proxy();
    let msg = req("INVITE", "X-Trunk: blue\r\n").replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    let (_, fwd) = forwarded(handle_from(
        &p,
        &msg,
        "198.51.100.1:40001",
        Transport::Tcp,
        Some(0x2a),
    ));
    assert!(fwd.contains(";i=2a;ln=0\r\n"), "{fwd}");
    let (o, _) = forwarded(handle_from(
        &p,
        &response_to(&fwd, 200),
        "127.0.0.1:5090",
        Transport::Tcp,
        Some(7),
    ));
    assert_eq!(o.conn, Some(0x2a));
    assert_eq!(o.transport, Transport::Tcp);
}

#[test]
fn responses_that_are_not_ours_or_unsafe_are_dropped_never_answered() {
    let p = proxy();
    let foreign = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\nVia: SIP/2.0/UDP 10.0.0.5\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(
        handle(&p, foreign, CARRIER),
        Action::Drop(DropReason::ForeignVia)
    );
    let (_, fwd) = forwarded(handle(&p, &req("INVITE", ""), PBX));
    let only_ours: String = response_to(&fwd, 200)
        .split("\r\n")
        .filter(|l| !l.contains("z9hG4bKabc"))
        .collect::<Vec<_>>()
        .join("\r\n");
    assert_eq!(
        handle(&p, &only_ours, CARRIER),
        Action::Drop(DropReason::NoNextVia)
    );
    for bad in ["255.255.255.255", "0.0.0.0", "224.0.0.1"] {
        let r = response_to(&fwd, 200).replace("received=10.0.0.5", &format!("received={bad}"));
        assert_eq!(
            handle(&p, &r, CARRIER),
            Action::Drop(DropReason::UnsafeDestination),
            "{bad}"
        );
    }
    let r = response_to(&fwd, 200).replace("rport=5062", "rport=0");
    assert_eq!(
        handle(&p, &r, CARRIER),
        Action::Drop(DropReason::UnsafeDestination)
    );
    let garbage = "SIP/2.0 200 OK\r\nVia: nonsense\r\n\r\n";
    assert_eq!(
        handle(&p, garbage, CARRIER),
        Action::Drop(DropReason::BadResponse)
    );
    assert_eq!(
        handle(&p, "\x16\x03\x01 hello", CARRIER),
        Action::Drop(DropReason::NotSip)
    );
}

#[test]
fn sent_by_hostname_gets_received_and_compact_forms_are_served() {
    let p = proxy();
    let msg = "INVITE sip:+1555@carrier.example SIP/2.0\r\nv: SIP/2.0/UDP pbx.example.com:5062;branch=z9hG4bKq\r\n\
               f: <sip:pbx@pbx.example>;tag=1\r\nt: <sip:+1555@carrier.example>\r\ni: compact\r\nCSeq: 2 INVITE\r\nl: 0\r\n\r\n";
    let (_, s) = forwarded(handle(&p, msg, PBX));
    assert!(
        s.contains("\r\nv: SIP/2.0/UDP pbx.example.com:5062;branch=z9hG4bKq;received=10.0.0.5\r\n"),
        "{s}"
    );
    let (code, _, r) = replied(handle(
        &p,
        &msg.replace("SIP/2.0\r\nv:", "SIP/2.0\r\nMax-Forwards: 0\r\nv:"),
        PBX,
    ));
    assert_eq!(code, 483);
    assert!(
        r.contains("\r\nt: <sip:+1555@carrier.example>;tag=cg"),
        "{r}"
    );
    assert!(r.contains("\r\ni: compact\r\n"));
}

#[test]
fn request_without_via_is_dropped_and_malformed_ack_never_answered() {
    let p = proxy();
    let no_via = "OPTIONS sip:x SIP/2.0\r\nCall-ID: c\r\n\r\n";
    assert_eq!(
        handle(&p, no_via, PBX),
        Action::Drop(DropReason::Unanswerable)
    );
    let ack = req("ACK", "").replace("Max-Forwards: 70", "Max-Forwards: 0");
    assert_eq!(
        handle(&p, &ack, PBX),
        Action::Drop(DropReason::Unanswerable)
    );
}

#[test]
fn ipv6_sources_and_next_hops() {
    let p = proxy();
    let msg = req(
        "BYE",
        "Route: <sip:127.0.0.1:5060;lr>, <sip:[2001:db8::7]:5080;lr>\r\n",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    // No IPv6 listener in this config: the next hop is refused with 503, not sent from IPv4.
    let (code, _, _) = replied(handle(&p, &msg, PBX));
    assert_eq!(code, 503);
    let v6: SocketAddr = "[2001:db8::5]:5062".parse().expect("addr");
    let msg = req("INVITE", "").replace("10.0.0.5:5062", "[2001:db8::5]:5062");
    let (code, o, s) = replied(handle(&p, &msg, &v6.to_string()));
    assert_eq!(code, 403);
    assert_eq!(o.to, NextHop::Addr(v6));
    assert!(s.contains("rport=5062;received=2001:db8::5"), "{s}");
}

#[test]
fn large_request_to_a_uri_without_transport_switches_to_tcp() {
    let p = proxy();
    let big = format!("X-Pad: {}\r\n", "a".repeat(1400));
    let msg = req(
        "BYE",
        &format!("Route: <sip:127.0.0.1:5060;lr>, <sip:192.0.2.99:5080;lr>\r\n{big}"),
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, s) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(o.transport, Transport::Tcp, "RFC 3261 §18.1.1");
    assert!(s.contains("\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;"));
    let (l, udp) = o.udp_fallback.expect("a UDP version for a failed connect");
    assert_eq!(l, 0);
    assert!(String::from_utf8_lossy(&udp).contains("\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;"));
    // A configured UDP upstream stays UDP: the operator chose the transport.
    let (o, _) = forwarded(handle(&p, &req("INVITE", &big), PBX));
    assert_eq!(o.transport, Transport::Udp);
    // An explicit transport=udp in the URI is respected too.
    let explicit = msg.replace("192.0.2.99:5080;lr", "192.0.2.99:5080;transport=udp;lr");
    let (o, _) = forwarded(handle(&p, &explicit, PBX));
    assert_eq!(o.transport, Transport::Udp);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever arrives, the core answers with an action and never panics.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        let p = proxy();
        let _ = p.handle(Instant::now(), &Inbound {
            data: &data,
            source: PBX.parse().expect("addr"),
            transport: Transport::Udp,
            listener: 0,
            conn: None,
        });
    }

    /// Valid messages cut or corrupted at any point never panic the core either.
    #[test]
    fn corrupted_messages_never_panic(cut in 0usize..400, at in 0usize..400, byte in proptest::prelude::any::<u8>()) {
        let p = proxy();
        for base in [req("INVITE", "Route: <sip:127.0.0.1:5060;lr>\r\n"), response_to(&req("INVITE", ""), 200)] {
            let mut data = base.into_bytes();
            if at < data.len() {
                data[at] = byte;
            }
            data.truncate(cut.max(1));
            for src in [PBX, CARRIER] {
                let _ = p.handle(Instant::now(), &Inbound {
                    data: &data,
                    source: src.parse().expect("addr"),
                    transport: Transport::Tcp,
                    listener: 0,
                    conn: Some(1),
                });
            }
        }
    }
}

#[test]
fn unknown_sources_cannot_relay_through_a_route_set() {
    let p = proxy();
    let stranger = "203.0.113.9:5060";
    // Pretending to be in a dialog routed through us, or preloading a Route to the carrier.
    let via_us = req("INVITE", "Route: <sip:127.0.0.1:5060;lr>\r\n").replace(
        "INVITE sip:+15551234567@carrier.example",
        "INVITE sip:+882123@192.0.2.80",
    );
    let preloaded = req("INVITE", "Route: <sip:192.0.2.80;lr>\r\n");
    let in_dialog = req(
        "BYE",
        "Route: <sip:127.0.0.1:5060;lr>, <sip:10.0.0.7:6379;transport=tcp;lr>\r\n",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    for msg in [via_us, preloaded, in_dialog] {
        let (code, _, _) = replied(handle(&p, &msg, stranger));
        assert_eq!(code, 403, "{msg}");
    }
}

#[test]
fn unmarked_in_dialog_requests_from_unknown_sources_go_to_the_default_upstream() {
    let cfg = CFG.replace(
        "unknown_sources = \"reject\"",
        "unknown_sources = \"forward\"\ndefault_upstream = \"carrier\"",
    );
    let p = proxy_with(&cfg);
    let stranger = "203.0.113.9:5060";
    let internal = req(
        "BYE",
        "Route: <sip:127.0.0.1:5060;lr>, <sip:10.0.0.7:6379;lr>\r\n",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let (o, _) = forwarded(handle(&p, &internal, stranger));
    assert_eq!(
        o.to,
        NextHop::Addr(CARRIER.parse().expect("addr")),
        "not to 10.0.0.7"
    );
    // With the mark of a dialog the gate admitted, the route set is followed.
    let (o, _) = forwarded(handle(&p, &marked(&p, &internal), stranger));
    assert_eq!(o.to, NextHop::Addr("10.0.0.7:6379".parse().expect("addr")));
}

#[test]
fn initial_request_from_a_trunk_preloading_our_route_goes_to_the_trunk_upstream() {
    let p = proxy();
    // A PBX using the gate as outbound proxy: R-URI names the callee, Route names us.
    let msg = req("INVITE", "Route: <sip:127.0.0.1:5060;lr>\r\n");
    let (o, s) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
    assert!(!s.contains("\r\nRoute:"), "{s}");
    assert!(s.starts_with("INVITE sip:+15551234567@carrier.example SIP/2.0\r\n"));
    // Our address in the R-URI with a user part is not a strict router's doing.
    let msg = req("INVITE", "Route: <sip:127.0.0.1:5060;lr>\r\n").replace(
        "INVITE sip:+15551234567@carrier.example",
        "INVITE sip:+15551234567@127.0.0.1:5060",
    );
    let (o, s) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
    assert!(s.starts_with("INVITE sip:+15551234567@127.0.0.1:5060 SIP/2.0\r\n"));
}

#[test]
fn both_of_our_routes_on_one_comma_joined_line_are_removed() {
    let p = proxy();
    let msg = req(
        "BYE",
        "Route: <sip:192.0.2.10:5060;lr>, <sip:127.0.0.1:5060;lr>\r\n",
    )
    .replace(
        "BYE sip:+15551234567@carrier.example",
        "BYE sip:pbx@127.0.0.1:5070",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, s) = forwarded(handle(&p, &msg, CARRIER));
    assert!(!s.contains("Route:"), "{s}");
    assert_eq!(o.to, NextHop::Addr("127.0.0.1:5070".parse().expect("addr")));
    assert_eq!(o.listener, 0);
}

#[test]
fn a_single_route_names_the_egress_listener() {
    let p = proxy();
    let msg = req("BYE", "Route: <sip:192.0.2.10:5060;lr>\r\n")
        .replace(
            "BYE sip:+15551234567@carrier.example",
            "BYE sip:c@192.0.2.80",
        )
        .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, _) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(o.listener, 1);
}

#[test]
fn cancel_without_the_invites_headers_reaches_the_same_upstream() {
    let cfg = CFG.replace(
        "match = { header = { name = \"X-Trunk\", value = \"blue\" } }",
        "match = { sources = [\"198.51.100.0/24\"], header = { name = \"X-Trunk\", value = \"blue\" } }",
    );
    let p = proxy_with(&cfg);
    let src = "198.51.100.1:5060";
    let (inv, _) = forwarded(handle(&p, &req("INVITE", "X-Trunk: blue\r\n"), src));
    let (cancel, _) = forwarded(handle(&p, &req("CANCEL", ""), src));
    assert_eq!(cancel.to, inv.to);
    let ack = req("ACK", "").replace("carrier.example>\r\nCall", "carrier.example>;tag=r\r\nCall");
    let (ack, _) = forwarded(handle(&p, &ack, src));
    assert_eq!(ack.to, inv.to);
}

#[test]
fn strict_next_hop_gets_the_request_uri_as_its_last_route() {
    let p = proxy();
    // §16.6 step 7: the next Route lacks ;lr.
    let msg = req(
        "BYE",
        "Route: <sip:127.0.0.1:5060;lr>, <sip:192.0.2.99:5080>\r\nRoute: <sip:192.0.2.98;lr>\r\n",
    )
    .replace(
        "BYE sip:+15551234567@carrier.example",
        "BYE sip:callee@192.0.2.50",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let msg = marked(&p, &msg);
    let (o, s) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(
        o.to,
        NextHop::Addr("192.0.2.99:5080".parse().expect("addr"))
    );
    assert!(s.starts_with("BYE sip:192.0.2.99:5080 SIP/2.0\r\n"), "{s}");
    assert!(
        s.contains("\r\nRoute: <sip:192.0.2.98;lr>\r\nRoute: <sip:callee@192.0.2.50>\r\n"),
        "{s}"
    );
    assert!(!s.contains("5060;lr>"), "our Route removed: {s}");
}

#[test]
fn a_response_around_a_forged_copy_of_our_via_is_not_relayed() {
    let p = proxy();
    let (_, fwd) = forwarded(handle(&p, &req("INVITE", ""), PBX));
    let genuine = response_to(&fwd, 200);
    assert!(matches!(handle(&p, &genuine, CARRIER), Action::Forward(_)));
    // Same Via of ours, but the Via below it (where the response would go) was swapped.
    let forged = genuine.replace(
        "10.0.0.5:5062;branch=z9hG4bKabc",
        "198.51.100.66:5062;branch=z9hG4bKabc",
    );
    assert_eq!(
        handle(&p, &forged, CARRIER),
        Action::Drop(DropReason::ForeignVia)
    );
}

#[test]
fn responses_leaving_over_tcp_get_a_content_length() {
    let p = proxy();
    let msg = req("INVITE", "X-Trunk: blue\r\n").replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    let (_, fwd) = forwarded(handle_from(
        &p,
        &msg,
        "198.51.100.1:40001",
        Transport::Tcp,
        Some(9),
    ));
    let resp = response_to(&fwd, 180).replace("Content-Length: 0\r\n", "");
    let (o, s) = forwarded(handle(&p, &resp, "127.0.0.1:5090"));
    assert_eq!(o.transport, Transport::Tcp);
    assert!(s.ends_with("\r\nContent-Length: 0\r\n\r\n"), "{s}");
}

#[test]
fn link_local_and_self_destinations_are_never_used() {
    let p = proxy();
    let (_, fwd) = forwarded(handle(&p, &req("INVITE", ""), PBX));
    for bad in ["169.254.169.254", "fe80::1", "127.0.0.1"] {
        let r = response_to(&fwd, 200)
            .replace("received=10.0.0.5", &format!("received={bad}"))
            .replace("rport=5062", "rport=5060");
        assert_eq!(
            handle(&p, &r, CARRIER),
            Action::Drop(DropReason::UnsafeDestination),
            "{bad}"
        );
    }
    let to_self = CFG.replace(
        "address = \"127.0.0.1:5070\"",
        "address = \"127.0.0.1:5060\"",
    );
    let cfg = Config::parse(&to_self, "test").expect("valid");
    let err = Proxy::new(&cfg, test_listeners()).expect_err("the PBX target is the gate itself");
    assert!(
        err.to_string()
            .contains("pbx: 127.0.0.1:5060 is this proxy itself"),
        "{err}"
    );
}

#[test]
fn the_ack_of_our_400_is_absorbed_and_a_malformed_ack_never_answered() {
    let p = proxy();
    let bad = req("INVITE", "").replace("Content-Length: 0", "Content-Length: 5");
    let (code, _, r) = replied(handle(&p, &bad, PBX));
    assert_eq!(code, 400);
    let to = r
        .split("\r\n")
        .find(|l| l.starts_with("To:"))
        .expect("to")
        .to_owned();
    let ack = req("ACK", "").replace("To: <sip:+15551234567@carrier.example>", &to);
    assert_eq!(handle(&p, &ack, PBX), Action::Absorb);
    let odd = req("ACK", "").replace("ACK sip:", "ACK  sip:");
    assert_eq!(
        handle(&p, &odd, PBX),
        Action::Drop(DropReason::Unanswerable)
    );
}

#[test]
fn the_ack_of_a_failed_invite_repeating_a_preloaded_route_follows_the_invite() {
    let p = proxy();
    // PBX using the gate as outbound proxy: the INVITE and the ACK of its 486 both carry the
    // preloaded (unmarked) Route and the R-URI of the callee; the ACK also has a To-tag.
    let inv = req("INVITE", "Route: <sip:127.0.0.1:5060;lr>\r\n");
    let (inv_out, _) = forwarded(handle(&p, &inv, PBX));
    let ack = req("ACK", "Route: <sip:127.0.0.1:5060;lr>\r\n").replace(
        "carrier.example>\r\nCall",
        "carrier.example>;tag=busy\r\nCall",
    );
    let (ack_out, _) = forwarded(handle(&p, &ack, PBX));
    assert_eq!(ack_out.to, inv_out.to);
    assert_eq!(ack_out.transport, inv_out.transport);
}

#[test]
fn the_pbx_is_trusted_in_its_dialogs_but_starts_no_call_without_a_trunk() {
    let p = proxy();
    let pbx = "127.0.0.1:5070";
    let bye = req("BYE", "Route: <sip:127.0.0.1:5060;lr>\r\n")
        .replace(
            "BYE sip:+15551234567@carrier.example",
            "BYE sip:c@192.0.2.80",
        )
        .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let (o, _) = forwarded(handle(&p, &marked(&p, &bye), pbx));
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
    let (code, _, _) = replied(handle(&p, &req("INVITE", ""), pbx));
    assert_eq!(code, 403);
}

#[test]
fn in_dialog_requests_keep_the_transport_our_record_route_recorded() {
    let p = proxy();
    let msg = req("BYE", "Route: <sip:127.0.0.1:5060;transport=tcp;lr>\r\n")
        .replace(
            "BYE sip:+15551234567@carrier.example",
            "BYE sip:c@127.0.0.1:5090",
        )
        .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let m = p.dialog_mark(&Message::scan(msg.as_bytes()).expect("scans"));
    let msg = msg.replace(";transport=tcp;lr>", &format!(";transport=tcp;lr;cg={m}>"));
    let (o, s) = forwarded(handle(&p, &msg, PBX));
    assert_eq!(o.transport, Transport::Tcp);
    assert!(s.contains("\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;"), "{s}");
}

#[test]
fn strict_router_repair_and_a_strict_next_hop_together() {
    let p = proxy();
    // R-URI is our Record-Route URI (a strict router before us); the remaining first Route is a
    // strict router too; the last Route is the real target.
    let msg = req(
        "BYE",
        "Route: <sip:192.0.2.99:5080>\r\nRoute: <sip:callee@192.0.2.50>\r\n",
    )
    .replace(
        "BYE sip:+15551234567@carrier.example",
        "BYE sip:sbc.example.com",
    )
    .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let (o, s) = forwarded(handle(&p, &marked(&p, &msg), PBX));
    assert_eq!(
        o.to,
        NextHop::Addr("192.0.2.99:5080".parse().expect("addr"))
    );
    assert!(s.starts_with("BYE sip:192.0.2.99:5080 SIP/2.0\r\n"), "{s}");
    assert!(s.contains("\r\nRoute: <sip:callee@192.0.2.50>\r\n"), "{s}");
    assert_eq!(s.matches("Route:").count(), 1, "{s}");
}

#[test]
fn a_request_is_never_sent_back_to_its_sender() {
    let p = proxy();
    // The carrier sends an inbound call while being the configured PBX as well (a misrouting
    // peer): the gate refuses instead of reflecting it.
    let cfg = CFG.replace(
        "address = \"127.0.0.1:5070\"",
        "address = \"192.0.2.80:5060\"",
    );
    let looped = proxy_with(&cfg);
    let (code, _, _) = replied(handle(&looped, &req("INVITE", ""), CARRIER));
    assert_eq!(code, 482);
    let (o, _) = forwarded(handle(&p, &req("INVITE", ""), CARRIER));
    assert_eq!(o.to, NextHop::Addr("127.0.0.1:5070".parse().expect("addr")));
}

#[test]
fn options_for_the_gate_itself_is_answered_for_known_peers() {
    let p = proxy();
    let ping = req("OPTIONS", "").replace(
        "OPTIONS sip:+15551234567@carrier.example",
        "OPTIONS sip:127.0.0.1:5060",
    );
    let (code, o, s) = replied(handle(&p, &ping, CARRIER));
    assert_eq!(code, 200);
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
    assert!(s.contains(";tag=cg"), "{s}");
    // Max-Forwards 0 is no obstacle for a request the gate answers itself (§16.3 step 3).
    let zero = ping.replace("Max-Forwards: 70", "Max-Forwards: 0");
    assert_eq!(replied(handle(&p, &zero, PBX)).0, 200);
    // Strangers learn nothing.
    assert_eq!(replied(handle(&p, &ping, "203.0.113.9:5060")).0, 403);
    // An OPTIONS for someone else is proxied.
    let (o, _) = forwarded(handle(&p, &req("OPTIONS", ""), PBX));
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
}

#[test]
fn draining_refuses_new_calls_and_relays_the_rest() {
    let p = proxy();
    let (_, fwd) = forwarded(handle(&p, &req("INVITE", ""), PBX));
    p.start_draining();
    let (code, _, s) = replied(handle(
        &p,
        &req("INVITE", "").replace("z9hG4bKabc", "z9hG4bKnew"),
        PBX,
    ));
    assert_eq!(code, 503);
    assert!(s.starts_with("SIP/2.0 503 Service Unavailable (Shutting Down)\r\n"));
    assert!(
        !s.contains("Retry-After"),
        "the PBX must not blacklist the address"
    );
    assert!(matches!(
        handle(&p, &response_to(&fwd, 180), CARRIER),
        Action::Forward(_)
    ));
    assert!(matches!(
        handle(&p, &req("CANCEL", ""), PBX),
        Action::Forward(_)
    ));
}

#[test]
fn an_upstream_name_resolves_to_an_address_a_listener_can_reach() {
    let cfg = CFG.replace(
        "address = \"127.0.0.1:5090\"\ntransport = \"tcp\"\nsources = [\"127.0.0.1:5090\"]",
        "address = \"localhost:5091\"\ntransport = \"tcp\"\nsources = [\"127.0.0.1:5091\"]",
    );
    assert!(cfg.contains("localhost:5091"));
    let p = proxy_with(&cfg);
    let (o, _) = forwarded(handle(
        &p,
        &req("INVITE", "X-Trunk: blue\r\n"),
        "198.51.100.1:5060",
    ));
    // localhost may resolve to ::1 first; only IPv4 listeners exist here.
    assert_eq!(o.to, NextHop::Addr("127.0.0.1:5091".parse().expect("addr")));
}

const LIMITED: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[proxy]
unknown_sources = "limit"
default_upstream = "carrier"
secret = "0123456789abcdef-test"

[limits]
unknown_source = { rate = 1, burst = 1 }

[reply]
retry_after = { min = 2, max = 9 }

[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"

[[account]]
name = "acme"
rate = 2
burst = 2

[[trunk]]
name = "east"
account = "acme"
upstream = "carrier"
rate = 1
burst = 1
match = { sources = ["10.0.0.0/24"] }

[[trunk]]
name = "west"
account = "acme"
upstream = "carrier"
rate = 10
burst = 10
match = { sources = ["10.0.1.0/24"] }
"#;

fn limited(t0: Instant) -> Proxy {
    let cfg = Config::parse(LIMITED, "test").expect("valid");
    Proxy::new_at(&cfg, test_listeners()[..1].to_vec(), t0).expect("builds")
}

fn at(p: &Proxy, msg: &str, src: &str, now: Instant) -> Action {
    p.handle(
        now,
        &Inbound {
            data: msg.as_bytes(),
            source: src.parse().expect("addr"),
            transport: Transport::Udp,
            listener: 0,
            conn: None,
        },
    )
}

fn call(n: u32) -> String {
    req("INVITE", "")
        .replace("z9hG4bKabc", &format!("z9hG4bKcall{n}"))
        .replace("cid-1", &format!("cid-{n}"))
}

fn rejected(a: Action) -> (Rejection, String) {
    match a {
        Action::Reject(r, o) => (r, String::from_utf8(o.data.to_vec()).expect("utf8")),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_call_over_the_trunk_rate_gets_503_naming_the_stage() {
    let t0 = Instant::now();
    let p = limited(t0);
    assert!(matches!(at(&p, &call(1), PBX, t0), Action::Forward(_)));
    let (r, s) = rejected(at(&p, &call(2), PBX, t0));
    assert_eq!(r.stage, Stage::Trunk);
    assert_eq!(r.trunk.as_deref(), Some("east"));
    assert_eq!(r.account.as_deref(), Some("acme"));
    assert_eq!(r.retry_after, Duration::from_secs(1));
    assert!(!r.retransmission);
    assert!(s.starts_with("SIP/2.0 503 CPS Limit reached\r\n"), "{s}");
    assert!(
        s.contains("\r\nReason: SIP;cause=503;text=\"trunk CPS limit (east)\"\r\n"),
        "{s}"
    );
    assert!(s.contains(";tag=cg"));
    let ra: u32 = s
        .split("Retry-After: ")
        .nth(1)
        .expect("retry-after")
        .split("\r\n")
        .next()
        .expect("v")
        .parse()
        .expect("n");
    assert!((2..=9).contains(&ra));
    // One second later the trunk admits again.
    assert!(matches!(
        at(&p, &call(3), PBX, t0 + Duration::from_secs(1)),
        Action::Forward(_)
    ));
}

#[test]
fn the_account_pool_refuses_when_trunks_together_exceed_it() {
    let t0 = Instant::now();
    let p = limited(t0);
    let west = "10.0.1.5:5062";
    assert!(matches!(at(&p, &call(1), west, t0), Action::Forward(_)));
    assert!(matches!(at(&p, &call(2), west, t0), Action::Forward(_)));
    let (r, s) = rejected(at(&p, &call(3), west, t0));
    assert_eq!(r.stage, Stage::Account);
    assert!(
        s.starts_with("SIP/2.0 503 Account CPS Limit reached\r\n"),
        "{s}"
    );
    assert!(s.contains("text=\"account CPS limit (acme)\""), "{s}");
    // The refused call consumed nothing on its trunk: 8 of 10 cells left, not 7.
    assert_eq!(p.chain().trunk(1).available(t0), 8);
}

#[test]
fn a_retransmitted_refusal_is_identical_and_charges_nothing() {
    let t0 = Instant::now();
    let p = limited(t0);
    assert!(matches!(at(&p, &call(1), PBX, t0), Action::Forward(_)));
    let (_, first) = rejected(at(&p, &call(2), PBX, t0));
    // The retransmission comes when the trunk would admit again: it still gets the 503.
    let later = t0 + Duration::from_millis(1500);
    let (r, again) = rejected(at(&p, &call(2), PBX, later));
    assert!(r.retransmission);
    assert_eq!(first, again, "byte-identical");
    assert_eq!(p.chain().trunk(0).available(later), 1, "nothing charged");
    // Its ACK is absorbed, its CANCEL answered 200 here.
    let to = first
        .split("\r\n")
        .find(|l| l.starts_with("To:"))
        .expect("to")
        .to_owned();
    let ack = call(2)
        .replace("INVITE sip:", "ACK sip:")
        .replace("1 INVITE", "1 ACK")
        .replace("To: <sip:+15551234567@carrier.example>", &to);
    assert_eq!(at(&p, &ack, PBX, later), Action::Absorb);
    let cancel = call(2)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    let (code, _, s) = replied(at(&p, &cancel, PBX, later));
    assert_eq!(code, 200);
    assert!(s.contains("CSeq: 1 CANCEL"));
}

#[test]
fn a_retransmitted_forward_is_forwarded_again_uncharged_and_its_cancel_follows() {
    let t0 = Instant::now();
    let p = limited(t0);
    let (o1, first) = forwarded(at(&p, &call(1), PBX, t0));
    let (o2, again) = forwarded(at(&p, &call(1), PBX, t0 + Duration::from_millis(500)));
    assert_eq!((o1.to.clone(), first), (o2.to, again));
    assert_eq!(p.chain().trunk(0).available(t0), 0, "charged once");
    let cancel = call(1)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    let (oc, _) = forwarded(at(&p, &cancel, PBX, t0));
    assert_eq!(oc.to, o1.to);
}

#[test]
fn in_dialog_requests_are_not_metered() {
    let t0 = Instant::now();
    let p = limited(t0);
    assert!(matches!(at(&p, &call(1), PBX, t0), Action::Forward(_)));
    // A re-INVITE (To-tag) and an OPTIONS while the trunk is empty.
    let reinvite = call(2).replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    assert!(matches!(at(&p, &reinvite, PBX, t0), Action::Forward(_)));
    let options = req("OPTIONS", "").replace("z9hG4bKabc", "z9hG4bKopt");
    assert!(matches!(at(&p, &options, PBX, t0), Action::Forward(_)));
}

#[test]
fn an_auth_retry_is_charged_once() {
    let t0 = Instant::now();
    let p = limited(t0);
    assert!(matches!(at(&p, &call(1), PBX, t0), Action::Forward(_)));
    // The carrier answered 407; the PBX re-sends with credentials: new branch, CSeq 2.
    let retry = call(1)
        .replace("z9hG4bKcall1", "z9hG4bKcall1-auth")
        .replace("CSeq: 1 INVITE", "CSeq: 2 INVITE")
        .replace(
            "Content-Length",
            "Proxy-Authorization: Digest username=\"pbx\", realm=\"c\"\r\nContent-Length",
        );
    assert!(
        matches!(at(&p, &retry, PBX, t0), Action::Forward(_)),
        "not charged again"
    );
    // Without credentials a new attempt of the same Call-ID is a new call.
    let again = call(1).replace("z9hG4bKcall1", "z9hG4bKcall1-b");
    assert_eq!(rejected(at(&p, &again, PBX, t0)).0.stage, Stage::Trunk);
    // charge_auth_retry = true charges it.
    let cfg = LIMITED.replace("[limits]\n", "[limits]\ncharge_auth_retry = true\n");
    let strict = Proxy::new_at(
        &Config::parse(&cfg, "t").expect("valid"),
        test_listeners()[..1].to_vec(),
        t0,
    )
    .expect("builds");
    assert!(matches!(at(&strict, &call(1), PBX, t0), Action::Forward(_)));
    assert_eq!(rejected(at(&strict, &retry, PBX, t0)).0.stage, Stage::Trunk);
}

#[test]
fn unknown_sources_under_limit_get_a_bucket_per_ip() {
    let t0 = Instant::now();
    let p = limited(t0);
    let a = "198.51.100.7:5060";
    let (o, _) = forwarded(at(&p, &call(1), a, t0));
    assert_eq!(o.to, NextHop::Addr(CARRIER.parse().expect("addr")));
    // Another port of the same IP shares the bucket.
    let (r, s) = rejected(at(&p, &call(2), "198.51.100.7:5070", t0));
    assert_eq!(r.stage, Stage::Source);
    assert!(s.starts_with("SIP/2.0 503 Source CPS Limit reached\r\n"));
    assert!(
        s.contains("text=\"source CPS limit (198.51.100.7)\""),
        "{s}"
    );
    assert!(matches!(
        at(&p, &call(3), "198.51.100.8:5060", t0),
        Action::Forward(_)
    ));
}

#[test]
fn decisions_are_forgotten_after_64_t1() {
    let t0 = Instant::now();
    let p = limited(t0);
    assert!(matches!(at(&p, &call(1), PBX, t0), Action::Forward(_)));
    assert!(rejected(at(&p, &call(2), PBX, t0)).1.contains("503"));
    // 33 s later the same branch is a new transaction as far as the cache knows: evaluated
    // afresh (and admitted, the trunk being full again).
    assert!(matches!(
        at(&p, &call(2), PBX, t0 + Duration::from_secs(33)),
        Action::Forward(_)
    ));
}

#[test]
fn sweeping_forgets_full_buckets_and_old_decisions() {
    let t0 = Instant::now();
    let p = limited(t0);
    for n in 0..5u32 {
        let _ = at(&p, &call(n), &format!("198.51.100.{n}:5060"), t0);
    }
    let t = p.table_sizes();
    assert_eq!(t.sources.0, 5);
    assert_eq!(t.decisions.0, 5);
    // Two seconds on the per-source buckets (1/s) are full again; decisions live 32 s.
    let t = p.sweep(t0 + Duration::from_secs(2));
    assert_eq!((t.sources.0, t.decisions.0), (0, 5));
    let t = p.sweep(t0 + Duration::from_secs(33));
    assert_eq!(t.decisions.0, 0);
}

#[test]
fn cancel_and_ack_follow_a_header_matched_invite_even_when_another_trunk_holds_the_source() {
    // The INVITE picks the TCP carrier by header; the source alone would pick the other one.
    let cfg = CFG.replace(
        "match = { header = { name = \"X-Trunk\", value = \"blue\" } }",
        "match = { sources = [\"10.0.0.0/24\"], header = { name = \"X-Trunk\", value = \"blue\" } }",
    );
    // Put by-header before by-source, so the INVITE with the header matches it first.
    let i = cfg.find("[[trunk]]\nname = \"by-source\"").expect("trunk");
    let j = cfg.find("[[trunk]]\nname = \"by-header\"").expect("trunk");
    let k = cfg.find("[[trunk]]\nname = \"by-user\"").expect("trunk");
    let cfg = format!("{}{}{}{}", &cfg[..i], &cfg[j..k], &cfg[i..j], &cfg[k..]);
    let p = proxy_with(&cfg);
    let (inv, _) = forwarded(handle(&p, &req("INVITE", "X-Trunk: blue\r\n"), PBX));
    assert_eq!(
        inv.to,
        NextHop::Addr("127.0.0.1:5090".parse().expect("addr"))
    );
    let (cancel, _) = forwarded(handle(&p, &req("CANCEL", ""), PBX));
    assert_eq!(cancel.to, inv.to);
    let ack = req("ACK", "").replace(
        "carrier.example>\r\nCall",
        "carrier.example>;tag=busy\r\nCall",
    );
    let (ack, _) = forwarded(handle(&p, &ack, PBX));
    assert_eq!((ack.to, ack.transport), (inv.to, Transport::Tcp));
}

#[test]
fn auth_retries_are_free_only_with_a_higher_cseq_and_only_twice() {
    let t0 = Instant::now();
    let p = limited(t0);
    assert!(matches!(at(&p, &call(1), PBX, t0), Action::Forward(_)));
    let with_creds = |cseq: u32, branch: &str| {
        call(1)
            .replace("z9hG4bKcall1", branch)
            .replace("CSeq: 1 INVITE", &format!("CSeq: {cseq} INVITE"))
            .replace(
                "Content-Length",
                "Authorization: Digest username=\"pbx\", realm=\"c\"\r\nContent-Length",
            )
    };
    // 401, then 407: two re-sends with credentials pass uncharged.
    assert!(matches!(
        at(&p, &with_creds(2, "z9hG4bKr2"), PBX, t0),
        Action::Forward(_)
    ));
    // Same CSeq again (a forged re-send, not a retransmission: new branch) is charged.
    assert_eq!(
        rejected(at(&p, &with_creds(2, "z9hG4bKr2b"), PBX, t0))
            .0
            .stage,
        Stage::Trunk
    );
    assert!(matches!(
        at(&p, &with_creds(3, "z9hG4bKr3"), PBX, t0),
        Action::Forward(_)
    ));
    // A third is charged like any new call.
    assert_eq!(
        rejected(at(&p, &with_creds(4, "z9hG4bKr4"), PBX, t0))
            .0
            .stage,
        Stage::Trunk
    );
}

#[test]
fn a_reload_that_fails_changes_nothing() {
    let t0 = Instant::now();
    let p = limited(t0);
    let bad = LIMITED
        .replace(
            "address = \"192.0.2.80:5060\"",
            "address = \"no-such-host.invalid:5060\"\nsources = [\"192.0.2.80\"]",
        )
        .replace(
            "rate = 1\nburst = 1\nmatch",
            "rate = 100\nburst = 100\nmatch",
        );
    let cfg = Config::parse(&bad, "t").expect("valid on paper");
    assert!(p.reload(&cfg, t0).is_err());
    assert_eq!(
        p.chain().trunk(0).limit(),
        crate::limiter::Limit {
            rate: 1.0,
            burst: 1
        }
    );
    assert!(matches!(at(&p, &call(1), PBX, t0), Action::Forward(_)));
    assert_eq!(rejected(at(&p, &call(2), PBX, t0)).0.stage, Stage::Trunk);
}

/// A scripted call mix with known answer rate and durations gives the known usage figures.
#[test]
fn usage_follows_answers_failures_and_byes() {
    let t0 = Instant::now();
    let cfg = Config::parse(CFG, "test").expect("valid");
    let p = Proxy::new_at(&cfg, test_listeners(), t0).expect("builds");
    let s = |secs: u64| t0 + Duration::from_secs(secs);
    // 7 answered calls with these talk times, 3 ended with 486, 480, 503; one 407 on the way.
    let talk = [5u64, 8, 40, 40, 40, 40, 37];
    for n in 0..10u32 {
        let inv = call(n);
        let (_, fwd) = forwarded(at(&p, &inv, PBX, s(u64::from(n))));
        let _ = at(&p, &response_to(&fwd, 180), CARRIER, s(u64::from(n)));
        if n == 0 {
            // A challenge is not the end of the call.
            let _ = at(&p, &response_to(&fwd, 407), CARRIER, s(0));
        }
        let code = match n {
            7 => 486,
            8 => 480,
            9 => 503,
            _ => 200,
        };
        let _ = at(&p, &response_to(&fwd, code), CARRIER, s(u64::from(n) + 1));
        if code == 200 {
            // A retransmitted 200 changes nothing.
            let _ = at(&p, &response_to(&fwd, 200), CARRIER, s(u64::from(n) + 2));
            let bye = req("BYE", "Route: <sip:192.0.2.10:5060;lr>\r\n")
                .replace(
                    "BYE sip:+15551234567@carrier.example",
                    "BYE sip:c@192.0.2.80",
                )
                .replace("cid-1", &format!("cid-{n}"))
                .replace("z9hG4bKabc", &format!("z9hG4bKbye{n}"))
                .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
            let end = s(u64::from(n) + 1 + talk[n as usize]);
            assert!(matches!(
                at(&p, &marked(&p, &bye), PBX, end),
                Action::Forward(_)
            ));
        }
    }
    let snap = p.snapshot(s(100));
    let u = snap.trunks[0].limits.usage;
    assert_eq!((u.answered, u.failed), (7, 3));
    assert_eq!(u.asr, Some(0.7));
    assert!((u.acd_secs.expect("acd") - 30.0).abs() < 1e-6, "{u:?}");
    assert_eq!(u.short_call_share, Some(2.0 / 7.0));
    assert_eq!(u.peak_cps, 1);
    assert_eq!(p.table_sizes().dialogs.0, 0, "every followed call ended");
    // A call that never gets a final answer fails at Timer C (3 minutes).
    let _ = forwarded(at(&p, &call(10), PBX, s(20)));
    p.sweep(s(20 + 179));
    assert_eq!(p.snapshot(s(200)).trunks[0].limits.usage.failed, 3);
    p.sweep(s(20 + 181));
    assert_eq!(p.snapshot(s(202)).trunks[0].limits.usage.failed, 4);
    // A failed re-INVITE does not end an answered call: its BYE still counts.
    let (_, fwd) = forwarded(at(&p, &call(11), PBX, s(300)));
    let _ = at(&p, &response_to(&fwd, 200), CARRIER, s(301));
    let _ = at(&p, &response_to(&fwd, 491), CARRIER, s(320));
    let bye = req("BYE", "Route: <sip:192.0.2.10:5060;lr>\r\n")
        .replace(
            "BYE sip:+15551234567@carrier.example",
            "BYE sip:c@192.0.2.80",
        )
        .replace("cid-1", "cid-11")
        .replace("z9hG4bKabc", "z9hG4bKbye11")
        .replace("carrier.example>\r\nCall", "carrier.example>;tag=t\r\nCall");
    let _ = at(&p, &marked(&p, &bye), PBX, s(361));
    let u = p.snapshot(s(400)).trunks[0].limits.usage;
    assert_eq!((u.answered, u.failed), (8, 4));
    assert!(
        (u.acd_secs.expect("acd") - 270.0 / 8.0).abs() < 1e-6,
        "{u:?}"
    );
}

const PACED: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[proxy]
secret = "0123456789abcdef-test"

[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"

[[trunk]]
name = "paced"
upstream = "carrier"
rate = 10
burst = 1
on_limit = "queue"
max_delay = 1.0
max_queue = 5
match = { sources = ["10.0.0.0/24"] }
"#;

fn paced(t0: Instant) -> Proxy {
    let cfg = Config::parse(PACED, "test").expect("valid");
    Proxy::new_at(&cfg, test_listeners()[..1].to_vec(), t0).expect("builds")
}

fn queued(a: Action) -> (QueuedCall, String) {
    match a {
        Action::Queue(q) => {
            let s = String::from_utf8(q.trying.data.to_vec()).expect("utf8");
            (q, s)
        }
        other => panic!("expected a queued call, got {other:?}"),
    }
}

#[test]
fn a_call_over_the_rate_waits_for_its_slot_with_100_trying() {
    let t0 = Instant::now();
    let p = paced(t0);
    assert!(matches!(at(&p, &call(0), PBX, t0), Action::Forward(_)));
    let (q, trying) = queued(at(&p, &call(1), PBX, t0));
    assert_eq!(q.at, t0 + Duration::from_millis(100));
    assert!(trying.starts_with("SIP/2.0 100 Trying\r\n"), "{trying}");
    assert!(
        trying.contains("\r\nTo: <sip:+15551234567@carrier.example>\r\n"),
        "no To-tag on a 100: {trying}"
    );
    // A retransmission while it waits gets the 100 again; nothing is charged.
    let (code, _, _) = replied(at(&p, &call(1), PBX, t0 + Duration::from_millis(50)));
    assert_eq!(code, 100);
    // Its slot comes: the INVITE goes out, and is the same forward a retransmission gets.
    let out = p
        .release(q.key, t0 + Duration::from_millis(100))
        .expect("released");
    let (again, _) = forwarded(at(&p, &call(1), PBX, t0 + Duration::from_millis(150)));
    assert_eq!(out.data, again.data);
    assert!(
        p.release(q.key, t0 + Duration::from_millis(200)).is_none(),
        "released once"
    );
}

#[test]
fn a_cancelled_waiting_call_gets_200_and_487_and_frees_its_slot() {
    let t0 = Instant::now();
    let p = paced(t0);
    assert!(matches!(at(&p, &call(0), PBX, t0), Action::Forward(_)));
    let (q, _) = queued(at(&p, &call(1), PBX, t0));
    let cancel = call(1)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    let Action::Cancelled(ok, terminated) = at(&p, &cancel, PBX, t0 + Duration::from_millis(10))
    else {
        panic!("the CANCEL ends the waiting call");
    };
    let ok = String::from_utf8(ok.data.to_vec()).expect("utf8");
    let term = String::from_utf8(terminated.data.to_vec()).expect("utf8");
    assert!(
        ok.starts_with("SIP/2.0 200 OK\r\n") && ok.contains("CSeq: 1 CANCEL"),
        "{ok}"
    );
    assert!(
        term.starts_with("SIP/2.0 487 Request Terminated\r\n") && term.contains("CSeq: 1 INVITE"),
        "{term}"
    );
    assert!(
        p.release(q.key, t0 + Duration::from_millis(100)).is_none(),
        "nothing reaches the carrier"
    );
    // Its slot is free again: the next call takes it.
    let (q2, _) = queued(at(&p, &call(2), PBX, t0 + Duration::from_millis(20)));
    assert_eq!(q2.at, t0 + Duration::from_millis(100));
    // The ACK of the 487 is absorbed; a retransmitted INVITE gets the 487 again.
    let to = term
        .split("\r\n")
        .find(|l| l.starts_with("To:"))
        .expect("to")
        .to_owned();
    let ack = call(1)
        .replace("INVITE sip:", "ACK sip:")
        .replace("1 INVITE", "1 ACK")
        .replace("To: <sip:+15551234567@carrier.example>", &to);
    assert_eq!(
        at(&p, &ack, PBX, t0 + Duration::from_millis(30)),
        Action::Absorb
    );
    let (code, _, _) = replied(at(&p, &call(1), PBX, t0 + Duration::from_millis(40)));
    assert_eq!(code, 487);
}

#[test]
fn beyond_max_delay_or_max_queue_calls_are_refused() {
    let t0 = Instant::now();
    let p = paced(t0);
    assert!(matches!(at(&p, &call(0), PBX, t0), Action::Forward(_)));
    // Slots at 100..=500 ms: five waiting calls fill the queue.
    for n in 1..=5 {
        let (q, _) = queued(at(&p, &call(n), PBX, t0));
        assert_eq!(q.at, t0 + Duration::from_millis(100 * u64::from(n)));
    }
    let (r, s) = rejected(at(&p, &call(6), PBX, t0));
    assert_eq!(r.stage, Stage::Trunk);
    assert!(s.starts_with("SIP/2.0 503 CPS Limit reached\r\n"));
    // Nothing was taken by the refused call: once the five go out, the next slot is 600 ms.
    for n in 1..=5u32 {
        let _ = p.release(p_key(&p, n), t0);
    }
    let (q, _) = queued(at(&p, &call(7), PBX, t0));
    assert_eq!(q.at, t0 + Duration::from_millis(600));
    // A slot more than max_delay (1 s) away is refused.
    for n in 8..=11 {
        let _ = at(&p, &call(n), PBX, t0);
    }
    let (r, _) = rejected(at(&p, &call(12), PBX, t0));
    assert_eq!(r.stage, Stage::Trunk);
    assert!(r.retry_after > Duration::ZERO);
}

/// The queue key of call `n` (the transaction key of its INVITE).
fn p_key(p: &Proxy, n: u32) -> u64 {
    let inv = call(n);
    let m = Message::scan(inv.as_bytes()).expect("scans");
    let r = RequestView::parse(&m).expect("parses");
    p.core.load().transaction_hash(b'd', &m, &r.top_via)
}

#[test]
fn on_shutdown_waiting_calls_go_out_in_time_or_get_503() {
    let t0 = Instant::now();
    let p = paced(t0);
    assert!(matches!(at(&p, &call(0), PBX, t0), Action::Forward(_)));
    for n in 1..=4 {
        let _ = queued(at(&p, &call(n), PBX, t0));
    }
    // A drain of 250 ms: the slots at 100 and 200 ms stay, those at 300 and 400 ms get 503.
    let answers = p.flush_queue(t0, t0 + Duration::from_millis(250));
    assert_eq!(answers.len(), 2);
    for a in &answers {
        assert!(
            a.data
                .starts_with(b"SIP/2.0 503 Service Unavailable (Shutting Down)\r\n")
        );
    }
    assert_eq!(p.queue_len(), 2);
}

#[test]
fn draining_spares_retransmissions_and_answers_the_cancel_of_a_flushed_call() {
    let t0 = Instant::now();
    let p = paced(t0);
    let (first, _) = forwarded(at(&p, &call(0), PBX, t0));
    let _ = queued(at(&p, &call(1), PBX, t0));
    let _ = queued(at(&p, &call(2), PBX, t0));
    p.start_draining();
    let late = t0 + Duration::from_millis(10);
    // A new call is turned away; copies of calls decided before are not.
    let (code, _, _) = replied(at(&p, &call(3), PBX, late));
    assert_eq!(code, 503);
    let (again, _) = forwarded(at(&p, &call(0), PBX, late));
    assert_eq!(
        again.data, first.data,
        "the forwarded call's retransmission"
    );
    let (code, _, _) = replied(at(&p, &call(1), PBX, late));
    assert_eq!(code, 100, "the waiting call's retransmission");
    // The call at 200 ms is beyond a 150 ms drain: answered 503. Its retransmission gets the
    // 503 again, its CANCEL a 200 — never forwarded to a carrier that never saw the INVITE.
    assert_eq!(
        p.flush_queue(late, t0 + Duration::from_millis(150)).len(),
        1
    );
    let (code, _, _) = replied(at(&p, &call(2), PBX, late));
    assert_eq!(code, 503);
    let cancel = call(2)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    let (code, _, _) = replied(at(&p, &cancel, PBX, late));
    assert_eq!(code, 200);
}

#[test]
fn a_call_waiting_longer_than_the_decision_cache_remembers_is_still_known() {
    let t0 = Instant::now();
    // One call per 50 s: the second waits 50 s, longer than 64·T1 (32 s).
    let cfg = PACED
        .replace("rate = 10\n", "rate = 0.02\n")
        .replace("max_delay = 1.0", "max_delay = 120.0");
    let p = Proxy::new_at(
        &Config::parse(&cfg, "test").expect("valid"),
        test_listeners()[..1].to_vec(),
        t0,
    )
    .expect("builds");
    assert!(matches!(at(&p, &call(0), PBX, t0), Action::Forward(_)));
    let (q, _) = queued(at(&p, &call(1), PBX, t0));
    assert_eq!(q.at, t0 + Duration::from_secs(50));
    let t40 = t0 + Duration::from_secs(40);
    p.sweep(t40);
    let (code, _, _) = replied(at(&p, &call(1), PBX, t40));
    assert_eq!(code, 100, "a retransmission at 40 s is not a new call");
    let cancel = call(1)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    assert!(
        matches!(at(&p, &cancel, PBX, t40), Action::Cancelled(..)),
        "a CANCEL at 40 s ends the waiting call"
    );
    assert!(p.release(q.key, q.at).is_none());
}

const CLUSTERED: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[proxy]
secret = "0123456789abcdef-test"

[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"

[[account]]
name = "pool"
rate = 100
burst = 10
shared = true

[[trunk]]
name = "t1"
account = "pool"
upstream = "carrier"
rate = 50
burst = 2
match = { sources = ["10.0.0.0/24"] }

[cluster]
urls = ["redis://127.0.0.1:1/"]
instances = 4
on_failure = "POLICY"
"#;

fn clustered(t0: Instant, policy: &str, extra: &str) -> Proxy {
    let text = format!("{}{extra}", CLUSTERED.replace("POLICY", policy));
    let cfg = Config::parse(&text, "test").expect("valid");
    Proxy::new_at(&cfg, test_listeners()[..1].to_vec(), t0).expect("builds")
}

fn consult(a: Action) -> Consult {
    match a {
        Action::Consult(c) => *c,
        other => panic!("expected a consult, got {other:?}"),
    }
}

use crate::cluster::{Failure, Fallback, Outcome};

#[test]
fn a_shared_pool_is_asked_in_redis_after_the_local_trunk() {
    let t0 = Instant::now();
    let p = clustered(t0, "closed", "");
    let c = consult(at(&p, &call(0), PBX, t0));
    // The local trunk (burst 2) took its cell before Redis is asked.
    assert_eq!(p.chain().trunk(0).available(t0), 1);
    assert_eq!(c.buckets.len(), 1);
    assert_eq!(&*c.buckets[0].key, "cpsgate:account:pool");
    // 100 CPS, burst 10, in integer microseconds.
    assert_eq!(
        (c.buckets[0].interval_us, c.buckets[0].tolerance_us),
        (10_000, 90_000)
    );
    // A retransmission while Redis is asked waits for the first copy's answer.
    assert!(matches!(
        at(&p, &call(0), PBX, t0),
        Action::Drop(DropReason::Pending)
    ));
    let s = p.settle(c, Outcome::Admitted, t0);
    assert!(s.fallback.is_none() && s.refund.is_none());
    let (out, _) = forwarded(s.action);
    assert_eq!(out.to, NextHop::Addr(CARRIER.parse().expect("addr")));
    // Decided: a retransmission follows it, uncharged and without asking Redis again.
    assert!(matches!(at(&p, &call(0), PBX, t0), Action::Forward(_)));
    assert_eq!(p.snapshot(t0).trunks[0].limits.admitted, 1);
    // A call the local trunk refuses never costs a round trip.
    let _ = consult(at(&p, &call(1), PBX, t0));
    let (r, _) = rejected(at(&p, &call(2), PBX, t0));
    assert_eq!(r.stage, Stage::Trunk);
}

#[test]
fn a_refusal_in_redis_gives_the_local_cells_back_and_names_the_pool() {
    let t0 = Instant::now();
    let p = clustered(t0, "closed", "");
    // The trunk's burst is 2: were refused calls charged, the third would be refused locally.
    for n in 0..3 {
        let c = consult(at(&p, &call(n), PBX, t0));
        let s = p.settle(
            c,
            Outcome::Refused {
                index: 0,
                retry_after: Duration::from_millis(7),
            },
            t0,
        );
        let (r, text) = rejected(s.action);
        assert_eq!(r.stage, Stage::Account);
        assert_eq!(r.retry_after, Duration::from_millis(7));
        assert!(text.starts_with("SIP/2.0 503 "), "{text}");
        assert!(text.contains("account CPS limit (pool)"), "{text}");
    }
    // The refusal is cached: a retransmission gets the same answer without Redis.
    let (r, _) = rejected(at(&p, &call(0), PBX, t0));
    assert!(r.retransmission);
    // A refused call leaves no trunk cell used.
    assert_eq!(p.chain().trunk(0).available(t0), 2);
}

#[test]
fn each_failure_policy_decides_as_documented() {
    let t0 = Instant::now();
    let down = Outcome::Unavailable(Failure::Timeout);
    // open: admitted unchecked.
    let p = clustered(t0, "open", "");
    let s = p.settle(consult(at(&p, &call(0), PBX, t0)), down, t0);
    assert_eq!(s.fallback, Some(Fallback::Open));
    assert!(matches!(s.action, Action::Forward(_)));
    // closed: refused at the pool, with the trunk cell given back.
    let p = clustered(t0, "closed", "");
    let s = p.settle(consult(at(&p, &call(0), PBX, t0)), down, t0);
    assert_eq!(s.fallback, Some(Fallback::Closed));
    assert_eq!(rejected(s.action).0.stage, Stage::Account);
    assert_eq!(p.chain().trunk(0).available(t0), 2);
    // local_share: this gate's quarter of the pool, 25 CPS with burst ceil(10 / 4) = 3.
    let p = clustered(t0, "local_share", "");
    assert_eq!(p.chain().account(0).limit().burst, 3);
    let mut admitted = 0;
    // One call every 10 ms for a second: the trunk (50 CPS) lets half through, the local
    // share of the pool 25 + 3 of them.
    for n in 0..100u32 {
        let now = t0 + Duration::from_millis(u64::from(n) * 10);
        match at(&p, &call(n), PBX, now) {
            Action::Consult(c) => {
                let s = p.settle(*c, down, now);
                match s.action {
                    Action::Forward(_) => {
                        assert_eq!(s.fallback, Some(Fallback::LocalShareAdmitted));
                        admitted += 1;
                    }
                    Action::Reject(r, _) => {
                        assert_eq!(s.fallback, Some(Fallback::LocalShareRefused));
                        assert_eq!(r.stage, Stage::Account);
                    }
                    other => panic!("{other:?}"),
                }
            }
            Action::Reject(r, _) => assert_eq!(r.stage, Stage::Trunk),
            other => panic!("{other:?}"),
        }
    }
    assert!((27..=28).contains(&admitted), "{admitted}");
}

#[test]
fn a_later_local_stage_refusing_returns_the_shared_cell() {
    let t0 = Instant::now();
    let p = clustered(
        t0,
        "closed",
        "\n[limits]\nglobal = { rate = 1, burst = 1 }\n",
    );
    let s = p.settle(consult(at(&p, &call(0), PBX, t0)), Outcome::Admitted, t0);
    assert!(s.refund.is_none());
    assert!(matches!(s.action, Action::Forward(_)));
    // The global bucket is empty now: Redis admits, global refuses, Redis gets its cell back.
    let c = consult(at(&p, &call(1), PBX, t0));
    let buckets = c.buckets.clone();
    let s = p.settle(c, Outcome::Admitted, t0);
    assert_eq!(rejected(s.action).0.stage, Stage::Global);
    assert_eq!(s.refund, Some(buckets));
    // Under local_share the cell taken from this gate's share goes back instead.
    let p = clustered(
        t0,
        "local_share",
        "\n[limits]\nglobal = { rate = 1, burst = 1 }\n",
    );
    let down = Outcome::Unavailable(Failure::Error);
    let s = p.settle(consult(at(&p, &call(0), PBX, t0)), down, t0);
    assert!(matches!(s.action, Action::Forward(_)));
    assert_eq!(p.chain().account(0).available(t0), 2);
    let s = p.settle(consult(at(&p, &call(1), PBX, t0)), down, t0);
    assert_eq!(rejected(s.action).0.stage, Stage::Global);
    assert!(s.refund.is_none());
    assert_eq!(
        p.chain().account(0).available(t0),
        2,
        "the share's cell went back"
    );
    assert_eq!(p.chain().trunk(0).available(t0), 1, "and the trunk's");
}

#[test]
fn a_shared_trunk_and_its_shared_pool_go_to_redis_together() {
    let t0 = Instant::now();
    let text = CLUSTERED
        .replace("POLICY", "closed")
        .replace("burst = 2\n", "burst = 2\nshared = true\n");
    let cfg = Config::parse(&text, "test").expect("valid");
    let p = Proxy::new_at(&cfg, test_listeners()[..1].to_vec(), t0).expect("builds");
    let c = consult(at(&p, &call(0), PBX, t0));
    let keys: Vec<&str> = c.buckets.iter().map(|b| &*b.key).collect();
    assert_eq!(keys, ["cpsgate:trunk:t1", "cpsgate:account:pool"]);
    let s = p.settle(
        c,
        Outcome::Refused {
            index: 0,
            retry_after: Duration::ZERO,
        },
        t0,
    );
    assert_eq!(rejected(s.action).0.stage, Stage::Trunk);
    // The second key is the pool.
    let s = p.settle(
        consult(at(&p, &call(1), PBX, t0)),
        Outcome::Refused {
            index: 1,
            retry_after: Duration::ZERO,
        },
        t0,
    );
    assert_eq!(rejected(s.action).0.stage, Stage::Account);
}

#[test]
fn a_cancel_while_redis_is_asked_is_answered_and_the_invite_gets_487() {
    let t0 = Instant::now();
    let p = clustered(t0, "closed", "");
    let c = consult(at(&p, &call(0), PBX, t0));
    let buckets = c.buckets.clone();
    let cancel = call(0)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    let (code, _, _) = replied(at(&p, &cancel, PBX, t0));
    assert_eq!(code, 200);
    // Redis admitted it meanwhile: the call is not forwarded, Redis gets its cell back, and
    // so does the trunk.
    let s = p.settle(c, Outcome::Admitted, t0);
    let (code, _, text) = replied(s.action);
    assert_eq!(code, 487, "{text}");
    assert_eq!(s.refund, Some(buckets));
    assert_eq!(p.chain().trunk(0).available(t0), 2);
    // Retransmissions: the CANCEL gets its 200 again, the INVITE its 487.
    assert_eq!(replied(at(&p, &cancel, PBX, t0)).0, 200);
    assert_eq!(replied(at(&p, &call(0), PBX, t0)).0, 487);
}

#[test]
fn a_cancel_after_the_verdict_follows_the_forwarded_invite() {
    let t0 = Instant::now();
    let p = clustered(t0, "closed", "");
    let c = consult(at(&p, &call(0), PBX, t0));
    let _ = forwarded(p.settle(c, Outcome::Admitted, t0).action);
    let cancel = call(0)
        .replace("INVITE sip:", "CANCEL sip:")
        .replace("1 INVITE", "1 CANCEL");
    let (out, _) = forwarded(at(&p, &cancel, PBX, t0));
    assert_eq!(out.to, NextHop::Addr(CARRIER.parse().expect("addr")));
}

#[test]
fn a_reload_cannot_add_or_move_the_cluster_but_can_share_another_pool() {
    let t0 = Instant::now();
    let p = clustered(t0, "closed", "");
    let parse = |t: &str| Config::parse(t, "test").expect("valid");
    let moved = CLUSTERED
        .replace("POLICY", "closed")
        .replace("127.0.0.1:1/", "127.0.0.1:2/");
    assert!(matches!(
        p.reload(&parse(&moved), t0),
        Err(BuildError::ClusterChanged)
    ));
    let plain = proxy_with(CFG);
    let added = format!("{CFG}\n[cluster]\nurls = [\"redis://127.0.0.1:1/\"]\n");
    assert!(matches!(
        plain.reload(&parse(&added), t0),
        Err(BuildError::ClusterChanged)
    ));
    // The same servers: the policy and the shared flags change with the reload.
    let unshared = CLUSTERED
        .replace("POLICY", "open")
        .replace("shared = true\n", "");
    p.reload(&parse(&unshared), t0).expect("reloads");
    assert!(matches!(at(&p, &call(0), PBX, t0), Action::Forward(_)));
}

#[test]
fn a_shared_pool_shows_its_cluster_wide_limit_and_put_changes_both() {
    let t0 = Instant::now();
    let p = clustered(t0, "local_share", "");
    let a = &p.snapshot(t0).accounts[0];
    assert_eq!(
        (a.rate, a.burst, a.available, a.shared),
        (100.0, 10, None, true)
    );
    let t = &p.snapshot(t0).trunks[0].limits;
    assert_eq!((t.available, t.shared), (Some(2), false));
    p.set_limit(
        LimitKind::Account,
        "pool",
        crate::limiter::Limit {
            rate: 200.0,
            burst: 8,
        },
        t0,
    )
    .expect("known");
    assert_eq!(
        p.limit(LimitKind::Account, "pool")
            .map(|l| (l.rate, l.burst)),
        Some((200.0, 8))
    );
    // Redis is asked for the new limit; this gate's share is a quarter of it.
    let c = consult(at(&p, &call(0), PBX, t0));
    assert_eq!(
        (c.buckets[0].interval_us, c.buckets[0].tolerance_us),
        (5000, 35_000)
    );
    assert_eq!(p.chain().account(0).limit().burst, 2);
    assert!((p.chain().account(0).limit().rate - 50.0).abs() < 1e-9);
}

#[test]
fn hand_written_ip_and_hex_match_the_formatter() {
    for ip in [
        "0.0.0.0",
        "10.0.0.5",
        "255.255.255.255",
        "192.168.100.9",
        "::1",
        "2001:db8::5",
    ] {
        let ip: std::net::IpAddr = ip.parse().expect("ip");
        let mut out = Vec::new();
        super::push_ip(&mut out, ip);
        assert_eq!(String::from_utf8(out).expect("utf8"), ip.to_string());
    }
    for n in [0u64, 1, 0xf, 0x10, 0xabc, 0x1_0000_0000, u64::MAX] {
        let mut out = Vec::new();
        super::push_hex_trimmed(&mut out, n);
        assert_eq!(String::from_utf8(out).expect("utf8"), format!("{n:x}"));
        assert_eq!(super::tag_text(n), format!("{TAG_PREFIX}{n:016x}"));
    }
}

#[test]
fn our_branch_check_matches_the_written_form() {
    for h in [0u64, 1, 0xdead_beef, u64::MAX] {
        let written = format!("{BRANCH_PREFIX}{h:016x}");
        assert!(super::is_our_branch(written.as_bytes(), h));
        assert!(!super::is_our_branch(written.as_bytes(), h ^ 1));
        assert!(!super::is_our_branch(
            &written.as_bytes()[..written.len() - 1],
            h
        ));
    }
}

#[test]
fn an_undeliverable_request_is_answered_to_the_previous_hop_and_nothing_else_is() {
    let p = proxy();
    let (_, fwd) = forwarded(handle(&p, &req("INVITE", ""), PBX));
    let a = p
        .undeliverable(Instant::now(), fwd.as_bytes(), 503, "Service Unavailable")
        .expect("a request gets an answer");
    let (code, o, s) = replied(a);
    assert_eq!(code, 503);
    assert_eq!(o.to, NextHop::Addr(PBX.parse().expect("addr")));
    assert!(
        s.starts_with("SIP/2.0 503 Service Unavailable\r\nVia: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKabc;rport=5062;received=10.0.0.5\r\n"),
        "{s}"
    );
    // The To-tag is the one the gate gives its own answer to that request: its ACK is absorbed.
    let tag = s
        .split("\r\n")
        .find(|l| l.starts_with("To:"))
        .and_then(|l| l.split(";tag=").nth(1))
        .expect("tag")
        .to_owned();
    let ack = req("ACK", "").replace(
        "To: <sip:+15551234567@carrier.example>",
        &format!("To: <sip:+15551234567@carrier.example>;tag={tag}"),
    );
    assert_eq!(handle(&p, &ack, PBX), Action::Absorb);
    // Responses, ACKs and requests without our Via on top get nothing.
    let resp = response_to(&fwd, 180);
    assert!(
        p.undeliverable(Instant::now(), resp.as_bytes(), 503, "x")
            .is_none()
    );
    let (_, fwd_ack) = forwarded(handle(&p, &req("ACK", ""), PBX));
    assert!(
        p.undeliverable(Instant::now(), fwd_ack.as_bytes(), 503, "x")
            .is_none()
    );
    let foreign = req("BYE", "");
    assert!(
        p.undeliverable(Instant::now(), foreign.as_bytes(), 503, "x")
            .is_none()
    );
}
