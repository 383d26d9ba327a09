//! The decision core's `handle()` per message kind, each a new transaction (no decision-cache
//! shortcut): an INVITE admitted and forwarded (scan, route, chain, rewrite), an INVITE refused
//! (the 503 built from its own lines), a response relayed back (our Via popped), and an
//! in-dialog BYE following our Record-Route. `Throughput::Elements(1)`: one message each.

use std::time::{Duration, Instant};

use cpsgate::config::Config;
use cpsgate::proxy::{Action, Inbound, LocalListener, Proxy};
use cpsgate::sip::{Message, Transport};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CALLS: usize = 4096;
/// Between cycles over the same calls the clock moves past the decision cache's 32 s.
const CYCLE: Duration = Duration::from_secs(40);

fn invite(n: usize) -> String {
    invite_with(n, "")
}

/// An INVITE of about 1.1 KB, as PBXs send them: the SDP lists its codecs one per line.
fn large_invite(n: usize) -> String {
    invite_with(
        n,
        "a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:9 G722/8000\r\na=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=maxptime:150\r\na=sendrecv\r\na=rtcp:4001 IN IP4 10.0.0.5\r\na=ssrc:1234567890 cname:pbx-core-bench\r\na=label:1\r\nm=video 4002 RTP/AVP 96 97\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 profile-level-id=42e01f;packetization-mode=1\r\na=rtpmap:97 VP8/90000\r\na=rtcp-fb:* nack\r\na=rtcp-fb:* ccm fir\r\na=sendrecv\r\na=candidate:1 1 UDP 2130706431 10.0.0.5 4000 typ host\r\na=candidate:2 1 UDP 1694498815 198.51.100.5 4000 typ srflx raddr 10.0.0.5 rport 4000\r\n",
    )
}

fn invite_with(n: usize, more_sdp: &str) -> String {
    let body = format!(
        "v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n{more_sdp}"
    );
    format!(
        "INVITE sip:+15551234567@carrier.example SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK-core-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:+15550001111@pbx.example>;tag=f{n}\r\n\
         To: <sip:+15551234567@carrier.example>\r\n\
         Call-ID: core-{n}@10.0.0.5\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:+15550001111@10.0.0.5:5062>\r\n\
         Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n\
         User-Agent: bench\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn config(rate: &str) -> String {
    let burst = if rate == "0.001" { "1" } else { "1000000" };
    format!(
        r#"
[[listen]]
address = "127.0.0.1:5060"
[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"
sources = ["192.0.2.80:5060"]
[[account]]
name = "pool"
rate = {rate}
burst = {burst}
[[trunk]]
name = "t"
account = "pool"
upstream = "carrier"
rate = {rate}
burst = {burst}
match = {{ sources = ["10.0.0.0/24"] }}
"#
    )
}

fn proxy(rate: &str, t0: Instant) -> Proxy {
    let cfg = Config::parse(&config(rate), "bench").expect("config");
    Proxy::new_at(
        &cfg,
        vec![LocalListener {
            bound: "127.0.0.1:5060".parse().expect("addr"),
            host: "127.0.0.1".into(),
            port: 5060,
            udp: true,
            tcp: true,
        }],
        t0,
    )
    .expect("proxy")
}

fn inbound<'a>(data: &'a [u8], from: &str) -> Inbound<'a> {
    Inbound {
        data,
        source: from.parse().expect("addr"),
        transport: Transport::Udp,
        listener: 0,
        conn: None,
    }
}

/// Run `f` over the calls in cycles, the clock moving on each cycle; `f` gets call `i % CALLS`.
fn cycle(iters: u64, next: &mut u64, t0: Instant, mut f: impl FnMut(usize, Instant)) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let i = *next;
        let now = t0 + CYCLE * u32::try_from(i / CALLS as u64).unwrap_or(u32::MAX);
        f((i % CALLS as u64) as usize, now);
        *next += 1;
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let calls: Vec<String> = (0..CALLS).map(invite).collect();
    let t0 = Instant::now();
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));

    let open = proxy("1000000", t0);
    let mut next = 0;
    g.bench_function("invite_admitted", |b| {
        b.iter_custom(|iters| {
            cycle(iters, &mut next, t0, |i, now| {
                let a = open.handle(now, &inbound(calls[i].as_bytes(), "10.0.0.5:5062"));
                assert!(matches!(a, Action::Forward(_)), "{a:?}");
            })
        })
    });

    // The same with a 1.1 KB INVITE: near the §18.1.1 size limit, on a trunk whose transport
    // is configured.
    let large: Vec<String> = (0..CALLS).map(large_invite).collect();
    assert!(large[0].len() > 1000, "{}", large[0].len());
    let open_large = proxy("1000000", t0);
    let mut next = 0;
    g.bench_function("invite_admitted_large", |b| {
        b.iter_custom(|iters| {
            cycle(iters, &mut next, t0, |i, now| {
                let a = open_large.handle(now, &inbound(large[i].as_bytes(), "10.0.0.5:5062"));
                assert!(matches!(a, Action::Forward(_)), "{a:?}");
            })
        })
    });

    // 0.001 CPS: after the first call every INVITE is refused at the trunk.
    let shut = proxy("0.001", t0);
    let _ = shut.handle(t0, &inbound(invite(CALLS).as_bytes(), "10.0.0.5:5062"));
    let mut next = 0;
    let mut armed = 0;
    g.bench_function("invite_rejected", |b| {
        b.iter_custom(|iters| {
            cycle(iters, &mut next, t0, |i, now| {
                // Each cycle starts with a new call that re-arms the bucket (admitted once
                // the 1000 s interval has passed), so every measured INVITE is refused.
                if i == 0 {
                    armed += 1;
                    let arm = invite(CALLS + armed);
                    let _ = shut.handle(now, &inbound(arm.as_bytes(), "10.0.0.5:5062"));
                }
                let a = shut.handle(now, &inbound(calls[i].as_bytes(), "10.0.0.5:5062"));
                assert!(matches!(a, Action::Reject(..)), "{a:?}");
            })
        })
    });

    // The carrier's 180 to a forwarded INVITE, relayed back to the PBX.
    let Action::Forward(fwd) = open.handle(t0, &inbound(invite(0).as_bytes(), "10.0.0.5:5062"))
    else {
        panic!("forwarded");
    };
    let sent = String::from_utf8(fwd.data.to_vec()).expect("utf8");
    let head = sent.split("\r\n\r\n").next().expect("head");
    let mut ringing = String::from("SIP/2.0 180 Ringing\r\n");
    for line in head.split("\r\n").skip(1) {
        let name = line.split(':').next().unwrap_or_default();
        if ["Via", "Record-Route", "From", "Call-ID", "CSeq"].contains(&name) {
            ringing.push_str(line);
            ringing.push_str("\r\n");
        } else if name == "To" {
            ringing.push_str(line);
            ringing.push_str(";tag=carrier\r\n");
        }
    }
    ringing.push_str("Contact: <sip:c@192.0.2.80:5060>\r\nContent-Length: 0\r\n\r\n");
    assert!(matches!(
        open.handle(t0, &inbound(ringing.as_bytes(), "192.0.2.80:5060")),
        Action::Forward(_)
    ));
    g.bench_function("response_relayed", |b| {
        b.iter(|| open.handle(t0, &inbound(ringing.as_bytes(), "192.0.2.80:5060")))
    });

    // The PBX's BYE, routed by the Record-Route the gate put in (with its dialog mark).
    let rr = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Record-Route: "))
        .expect("record-route")
        .to_owned();
    let bye = format!(
        "BYE sip:c@192.0.2.80:5060 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK-bye;rport\r\n\
         Route: {rr}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:+15550001111@pbx.example>;tag=f0\r\n\
         To: <sip:+15551234567@carrier.example>;tag=carrier\r\n\
         Call-ID: core-0@10.0.0.5\r\n\
         CSeq: 2 BYE\r\n\
         Content-Length: 0\r\n\r\n"
    );
    assert!(Message::scan(bye.as_bytes()).is_ok());
    assert!(matches!(
        open.handle(t0, &inbound(bye.as_bytes(), "10.0.0.5:5062")),
        Action::Forward(_)
    ));
    g.bench_function("bye_in_dialog", |b| {
        b.iter(|| open.handle(t0, &inbound(bye.as_bytes(), "10.0.0.5:5062")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
