//! The hot path: scanning an INVITE with our scanner versus `rsip`, and one whole forwarding
//! decision of the core (scan, validate, route, rewrite).

use std::time::Instant;

use cpsgate::config::Config;
use cpsgate::proxy::{Inbound, LocalListener, Proxy};
use cpsgate::sip::{Message, RequestView, Transport};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const INVITE: &str = "INVITE sip:+15551234567@carrier.example SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:+15550001111@pbx.example>;tag=1928301774\r\n\
To: <sip:+15551234567@carrier.example>\r\n\
Call-ID: a84b4c76e66710@10.0.0.5\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:+15550001111@10.0.0.5:5062>\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n\
User-Agent: bench\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 126\r\n\r\n\
v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n";

const CFG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"
[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"
[[trunk]]
name = "t"
upstream = "carrier"
rate = 10
match = { sources = ["10.0.0.0/24"] }
"#;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("invite");
    g.throughput(Throughput::Elements(1));
    g.bench_function("cpsgate_scan", |b| {
        b.iter(|| Message::scan(std::hint::black_box(INVITE.as_bytes())).expect("scans"))
    });
    g.bench_function("cpsgate_scan_and_view", |b| {
        b.iter(|| {
            let m = Message::scan(std::hint::black_box(INVITE.as_bytes())).expect("scans");
            RequestView::parse(&m).expect("valid")
        })
    });
    g.bench_function("rsip_parse", |b| {
        b.iter(|| rsip::SipMessage::try_from(std::hint::black_box(INVITE)).expect("parses"))
    });
    let cfg = Config::parse(CFG, "bench").expect("config");
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
    let now = Instant::now();
    let inb = Inbound {
        data: INVITE.as_bytes(),
        source: "10.0.0.5:5062".parse().expect("addr"),
        transport: Transport::Udp,
        listener: 0,
        conn: None,
    };
    // Measure the path that matters: the INVITE must really be forwarded.
    assert!(
        matches!(proxy.handle(now, &inb), cpsgate::proxy::Action::Forward(_)),
        "the benchmark INVITE is forwarded: {:?}",
        proxy.handle(now, &inb)
    );
    g.bench_function("cpsgate_forward_decision", |b| {
        b.iter(|| proxy.handle(now, std::hint::black_box(&inb)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
