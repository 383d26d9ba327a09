//! The capacity planner (`cpsgate plan`): known traffic shapes give known answers, CSV and
//! captures of the same traffic give the same report, recommendations hold when replayed, and
//! bad traces are refused with where.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpsgate::limiter::Limit;
use cpsgate::plan::trace::Format;
use cpsgate::plan::{Options, PlanError, Planner, Report};

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("cpsgate-plan-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }

    fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two trunks in one pool by source network, a credential trunk by username, a carrier.
const CONFIG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[proxy]
unknown_sources = "reject"

[pbx]
address = "10.0.0.20:5060"

[[upstream]]
name = "carrier"
address = "192.0.2.50:5060"
sources = ["192.0.2.48/28"]

[[account]]
name = "pool"
rate = 30
burst = 10

[[trunk]]
name = "east"
account = "pool"
upstream = "carrier"
rate = 20
burst = 10
match = { sources = ["10.1.0.0/24"] }

[[trunk]]
name = "west"
account = "pool"
upstream = "carrier"
rate = 15
burst = 5
match = { sources = ["10.2.0.0/24"] }

[[trunk]]
name = "creds"
upstream = "carrier"
rate = 5
burst = 5
match = { username = "dialer", sources = ["10.0.0.0/8"] }
"#;

/// One INVITE of the synthetic traffic.
#[derive(Debug, Clone)]
struct Call {
    at_ns: u64,
    src: SocketAddr,
    user: String,
    call_id: String,
}

const T0: u64 = 1_732_000_000_000_000_000;

fn csv(calls: &[Call]) -> String {
    let mut s = String::from("timestamp,source_ip,sip_username,trunk,call_id\n");
    for c in calls {
        s.push_str(&format!(
            "{}.{:09},{},{},,{}\n",
            c.at_ns / 1_000_000_000,
            c.at_ns % 1_000_000_000,
            c.src,
            c.user,
            c.call_id
        ));
    }
    s
}

fn invite(c: &Call, branch: &str, cseq: u32, extra: &str) -> Vec<u8> {
    format!(
        "INVITE sip:+15551230000@192.0.2.50 SIP/2.0\r\n\
         Via: SIP/2.0/UDP {src};branch=z9hG4bK{branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:{user}@pbx.example>;tag=f-{tag}\r\n\
         To: <sip:+15551230000@192.0.2.50>\r\n\
         Call-ID: {id}\r\n\
         CSeq: {cseq} INVITE\r\n\
         Contact: <sip:{user}@{src}>\r\n\
         {extra}Content-Length: 0\r\n\r\n",
        src = c.src,
        user = if c.user.is_empty() { "pbx" } else { &c.user },
        id = c.call_id,
        tag = c.call_id.replace(['@', '.'], "-"),
    )
    .into_bytes()
}

/// An Ethernet/IPv4/UDP frame from `src` to the carrier.
fn frame(src: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(v4) = src else {
        panic!("IPv4 only")
    };
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = (20 + 8 + payload.len()) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    f.extend_from_slice(&v4.ip().octets());
    f.extend_from_slice(&[192, 0, 2, 50]);
    f.extend_from_slice(&v4.port().to_be_bytes());
    f.extend_from_slice(&5060u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A classic pcap (microsecond timestamps, Ethernet).
fn pcap(packets: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for (ns, f) in packets {
        out.extend_from_slice(&((ns / 1_000_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&((ns % 1_000_000_000 / 1000) as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// A pcapng capture (one Ethernet interface with nanosecond timestamps).
fn pcapng(packets: &[(u64, Vec<u8>)]) -> Vec<u8> {
    fn block(out: &mut Vec<u8>, kind: u32, body: &[u8]) {
        let mut body = body.to_vec();
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
        let len = (12 + body.len()) as u32;
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&len.to_le_bytes());
    }
    let mut out = Vec::new();
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    block(&mut out, 0x0a0d_0d0a, &shb);
    let mut idb = Vec::new();
    idb.extend_from_slice(&1u16.to_le_bytes());
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&0u32.to_le_bytes());
    // if_tsresol = 9 (nanoseconds), then the end of options.
    idb.extend_from_slice(&[9, 0, 1, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
    block(&mut out, 1, &idb);
    for (ns, f) in packets {
        let mut epb = Vec::new();
        epb.extend_from_slice(&0u32.to_le_bytes());
        epb.extend_from_slice(&((ns >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(*ns as u32).to_le_bytes());
        epb.extend_from_slice(&(f.len() as u32).to_le_bytes());
        epb.extend_from_slice(&(f.len() as u32).to_le_bytes());
        epb.extend_from_slice(f);
        while !epb.len().is_multiple_of(4) {
            epb.push(0);
        }
        block(&mut out, 6, &epb);
    }
    out
}

/// A small deterministic random source (the same traffic on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Minutes of bursty traffic on every trunk, at microsecond timestamps (what pcap keeps).
fn bursty(seconds: u64) -> Vec<Call> {
    let mut rng = Lcg(7);
    let mut calls = Vec::new();
    let mut n = 0;
    for (net, user, base, peak) in [
        ("10.1.0", "", 12.0, 32.0),
        ("10.2.0", "", 8.0, 25.0),
        ("10.3.0", "dialer", 3.0, 9.0),
    ] {
        let mut t = 0.0f64;
        while t < seconds as f64 {
            // Bursts in the third and the seventh tenth of the trace.
            let tenth = (t / seconds as f64 * 10.0) as u32;
            let rate = if tenth == 2 || tenth == 6 { peak } else { base };
            t += -(1.0 - rng.next()).ln() / rate;
            n += 1;
            calls.push(Call {
                at_ns: T0 + (t * 1e6) as u64 * 1000,
                src: format!("{net}.{}:5060", 2 + n % 40)
                    .parse()
                    .expect("address"),
                user: user.to_owned(),
                call_id: format!("c{n}@pbx"),
            });
        }
    }
    calls.sort_by_key(|c| c.at_ns);
    calls
}

fn planner(
    dir: &Scratch,
    config: &str,
    trace: &Path,
    tweak: impl FnOnce(&mut Options),
) -> Result<Planner, PlanError> {
    let cfg = dir.file("cpsgate.toml", config);
    let mut opts = Options::new(cfg, trace);
    tweak(&mut opts);
    Planner::load(opts)
}

fn report(dir: &Scratch, trace: &Path, tweak: impl FnOnce(&mut Options)) -> Report {
    planner(dir, CONFIG, trace, tweak)
        .unwrap_or_else(|e| panic!("{e}"))
        .report()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Evenly spaced calls on `src` at `cps` for `secs` seconds, both ends included.
fn even(src: &str, cps: u64, secs: u64) -> Vec<Call> {
    (0..=cps * secs)
        .map(|i| Call {
            at_ns: T0 + i * 1_000_000_000 / cps,
            src: src.parse().expect("address"),
            user: String::new(),
            call_id: format!("e{i}"),
        })
        .collect()
}

#[test]
fn a_burst_over_a_trunk_refuses_the_excess_over_rate_times_time_plus_burst() {
    let dir = Scratch::new("burst");
    // 30 CPS for 10 s (301 calls, at 0 s … 10 s) into east: 20 CPS, burst 10. A GCRA admits at
    // most rate·t + burst in any window of t seconds: 20·10 + 10 = 210, and a stream this dense
    // gets exactly that; the 91 others are refused.
    let calls = even("10.1.0.5:5060", 30, 10);
    let trace = dir.file("burst.csv", csv(&calls));
    let r = report(&dir, &trace, |_| {});
    let east = &r.trunks[0];
    assert_eq!(
        (east.attempts, east.admitted, east.rejected),
        (301, 210, 91)
    );
    assert_eq!(east.rejected_by_stage.get("trunk"), Some(&91));
    // The pool (30/10) saw only what the trunk let through, all of it within its rate.
    assert_eq!(r.accounts[0].attempts, 301);
    assert_eq!(
        r.stages
            .iter()
            .find(|s| s.stage == "account")
            .map(|s| s.rejected),
        Some(0)
    );
    // The first second admits its 30 (burst), then 20 a second; refusals every second from the
    // first on.
    assert_eq!(east.offered_peak_cps, 30);
    assert!(east.admitted_peak_cps <= 20 + 10, "{east:?}");
    assert!(
        east.longest_rejecting.is_some_and(|s| s.secs >= 9),
        "{:?}",
        east.longest_rejecting
    );
    // No refusal at all needs 30 CPS at burst 10 (20·t + 10 < 301 for 29), or burst 101 at 20 CPS.
    let rec = east.recommended.as_ref().expect("a recommendation");
    assert_eq!(rec.rate, Some(30.0));
    assert_eq!(rec.rejected_share, 0.0);
    assert_eq!(rec.one_step_lower.map(|(r, _)| r), Some(29.0));
    assert!(rec.one_step_lower.is_some_and(|(_, s)| s > 0.001));
    assert_eq!(rec.burst_at_configured_rate, Some(101));
    // Paced instead (max_delay 5 s): the last call waits 10.45 s − 10 s... every call goes out,
    // at most 4.55 s late.
    let p = east.pacing.as_ref().expect("pacing what-if");
    assert_eq!((p.admitted, p.rejected), (301, 0));
    assert!(
        p.delay_p99_ms <= 4550.0 && p.delay_p99_ms >= 4400.0,
        "{p:?}"
    );
    assert!(p.admitted_peak_cps <= 30, "{p:?}");
    // With 2 s of patience, the calls that would wait longer are still refused.
    let r2 = report(&dir, &trace, |o| o.max_delay = Duration::from_secs(2));
    let p2 = r2.trunks[0].pacing.as_ref().expect("pacing what-if");
    assert!(p2.rejected > 0 && p2.delay_p99_ms <= 2000.0, "{p2:?}");
}

#[test]
fn speedup_compresses_time() {
    let dir = Scratch::new("speedup");
    // 15 CPS fits east's 20; twice as fast it does not.
    let trace = dir.file("calm.csv", csv(&even("10.1.0.5:5060", 15, 10)));
    assert_eq!(report(&dir, &trace, |_| {}).trunks[0].rejected, 0);
    let fast = report(&dir, &trace, |o| o.speedup = 2.0);
    assert_eq!(fast.trunks[0].offered_peak_cps, 30);
    assert!(fast.trunks[0].rejected > 0);
    assert!((fast.trace.duration_secs - 5.0).abs() < 1e-6);
}

/// What a capture of `calls` holds besides the attempts: retransmissions of some INVITEs (same
/// branch), a re-send with credentials after a 407 (new branch, same Call-ID and From-tag, higher
/// CSeq), responses, a call from the carrier, keep-alives. (time, source, message), in time
/// order.
fn wire(calls: &[Call]) -> Vec<(u64, SocketAddr, Vec<u8>)> {
    let mut packets: Vec<(u64, SocketAddr, Vec<u8>)> = Vec::new();
    let carrier: SocketAddr = "192.0.2.50:5060".parse().expect("address");
    for (i, c) in calls.iter().enumerate() {
        let branch = format!("b{i}");
        let first = invite(c, &branch, 1, "");
        packets.push((c.at_ns, c.src, first.clone()));
        if i % 50 == 7 {
            packets.push((c.at_ns + 500_000_000, c.src, first));
        }
        if i % 97 == 3 {
            packets.push((c.at_ns + 1_000, c.src, b"\r\n\r\n".to_vec()));
            let trying = format!(
                "SIP/2.0 100 Trying\r\nVia: SIP/2.0/UDP {};branch=z9hG4bK{branch}\r\nFrom: <sip:pbx@pbx.example>;tag=f-{tag}\r\nTo: <sip:+15551230000@192.0.2.50>\r\nCall-ID: {id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
                c.src,
                id = c.call_id,
                tag = c.call_id.replace(['@', '.'], "-"),
            );
            packets.push((c.at_ns + 2_000, carrier, trying.into_bytes()));
        }
    }
    // The very first call of the trace is admitted under any limit: its re-send with
    // credentials is free in every replay, as the proxy makes it.
    let first = &calls[0];
    let user = if first.user.is_empty() {
        "pbx"
    } else {
        &first.user
    };
    let credentials = format!(
        "Proxy-Authorization: Digest username=\"{user}\", realm=\"c\", nonce=\"n\", uri=\"sip:x\", response=\"r\"\r\n"
    );
    let resend = invite(first, "auth0", 2, &credentials);
    packets.push((first.at_ns + 20_000_000, first.src, resend));
    let inbound = Call {
        at_ns: T0 + 3_000_000_000,
        src: carrier,
        user: "carrier".into(),
        call_id: "in1@carrier".into(),
    };
    packets.push((inbound.at_ns, carrier, invite(&inbound, "in1", 1, "")));
    packets.sort_by_key(|p| p.0);
    packets
}

#[test]
fn csv_pcap_and_pcapng_of_the_same_traffic_give_the_same_report() {
    let dir = Scratch::new("same");
    let calls = bursty(120);
    let csv_trace = dir.file("t.csv", csv(&calls));
    let packets: Vec<(u64, Vec<u8>)> = wire(&calls)
        .into_iter()
        .map(|(t, src, msg)| (t, frame(src, &msg)))
        .collect();
    let pcap_trace = dir.file("t.pcap", pcap(&packets));
    let ng_trace = dir.file("t.pcapng", pcapng(&packets));

    let from_csv = report(&dir, &csv_trace, |_| {});
    let from_pcap = report(&dir, &pcap_trace, |_| {});
    let from_ng = report(&dir, &ng_trace, |_| {});
    assert_eq!(from_csv.trace.format, Format::Csv);
    assert_eq!(from_pcap.trace.format, Format::Pcap);
    assert_eq!(from_ng.trace.format, Format::Pcap);
    let retransmitted = (0..calls.len()).filter(|i| i % 50 == 7).count() as u64;
    // The re-send with credentials reaches admission, which finds it free.
    assert_eq!(
        from_pcap.trace.stats.attempts,
        calls.len() as u64 + 1,
        "{:?}",
        from_pcap.trace
    );
    assert_eq!(from_pcap.trace.stats.retransmissions, retransmitted);
    assert_eq!(from_pcap.trace.auth_resends, 1);
    assert_eq!(from_pcap.trace.stats.from_carriers, 1);
    assert_eq!(from_csv.trace.stats.attempts, calls.len() as u64);
    // Everything but the description of the input is the same.
    let body = |r: &Report| {
        serde_json::json!([
            r.trunks,
            r.accounts,
            r.sources,
            r.stages,
            r.with_recommendations
        ])
    };
    assert_eq!(body(&from_csv), body(&from_pcap));
    assert_eq!(body(&from_pcap), body(&from_ng));
    // And the traffic was busy enough to say something.
    assert!(
        from_csv
            .trunks
            .iter()
            .all(|t| t.attempts > 0 && t.recommended.is_some())
    );
    assert!(from_csv.trunks[0].rejected > 0);
}

#[test]
fn recommended_rates_meet_the_target_and_one_step_lower_does_not() {
    let dir = Scratch::new("recommend");
    let calls = bursty(300);
    let trace = dir.file("t.csv", csv(&calls));
    for (target, step) in [(0.001, 1.0), (0.01, 0.5), (0.0, 2.0)] {
        let p = planner(&dir, CONFIG, &trace, |o| {
            o.target = target;
            o.step = step;
        })
        .unwrap();
        let r = p.report().unwrap();
        let mut trunk_limits = Vec::new();
        for (t, k) in r.trunks.iter().enumerate() {
            let rec = k.recommended.as_ref().expect("every trunk has traffic");
            let rate = rec.rate.expect("a rate meets the target");
            assert_eq!(rate % step, 0.0);
            let at = |rate: f64| {
                p.trunk_share(
                    t,
                    Limit {
                        rate,
                        burst: k.burst,
                    },
                )
                .unwrap()
            };
            assert!(at(rate) <= target, "{} at {rate}: {}", k.name, at(rate));
            if rate > step {
                assert!(at(rate - step) > target, "{} at {rate} − {step}", k.name);
                assert_eq!(rec.one_step_lower.map(|(r, _)| r), Some(rate - step));
            }
            if let Some(b) = rec.burst_at_configured_rate {
                let at_burst = |burst: u32| {
                    p.trunk_share(
                        t,
                        Limit {
                            rate: k.rate,
                            burst,
                        },
                    )
                    .unwrap()
                };
                assert!(
                    at_burst(b) <= target && (b == 1 || at_burst(b - 1) > target),
                    "{} burst {b}",
                    k.name
                );
            }
            trunk_limits.push(Limit {
                rate,
                burst: k.burst,
            });
        }
        // The pool, behind its trunks at their recommendations.
        let pool = &r.accounts[0];
        let rec = pool.recommended.as_ref().expect("the pool has traffic");
        let at = |rate: f64| {
            p.pool_share(
                0,
                &trunk_limits,
                Limit {
                    rate,
                    burst: pool.burst,
                },
            )
            .unwrap()
        };
        let rate = rec.rate.expect("a rate meets the target");
        assert!(at(rate) <= target);
        if rate > step {
            assert!(at(rate - step) > target);
        }
        // Everything at its recommendation refuses little more than the target overall.
        assert!(
            r.with_recommendations.rejected_share <= 3.0 * target + 0.002,
            "{:?}",
            r.with_recommendations
        );
    }
}

#[test]
fn a_trace_larger_than_the_memory_budget_is_streamed_with_the_same_result() {
    let dir = Scratch::new("stream");
    let trace = dir.file("t.csv", csv(&bursty(60)));
    let in_memory = report(&dir, &trace, |_| {});
    let streamed = report(&dir, &trace, |o| o.memory_attempts = 100);
    assert!(!in_memory.trace.streamed && streamed.trace.streamed);
    let body = |r: &Report| {
        serde_json::json!([
            r.trunks,
            r.accounts,
            r.sources,
            r.stages,
            r.with_recommendations
        ])
    };
    assert_eq!(body(&in_memory), body(&streamed));
}

#[test]
fn rows_are_classified_like_requests() {
    let dir = Scratch::new("classify");
    let row = |t: f64, src: &str, user: &str, trunk: &str, id: &str| {
        format!("{t},{src},{user},{trunk},{id}\n")
    };
    let mut text = String::new();
    text += &row(1.0, "10.1.0.9", "", "", "a"); // east by source
    text += &row(1.1, "10.3.0.9", "dialer", "", "b"); // creds by username
    text += &row(1.2, "10.3.0.9", "other", "", "c"); // no trunk: refused 403, not metered
    text += &row(1.3, "192.0.2.49", "", "", "d"); // the carrier: inbound
    text += &row(1.4, "10.9.9.9", "", "west", "e"); // the trunk column wins
    text += &row(1.5, "10.1.0.9", "", "", "a"); // the same Call-ID again: a retransmission
    text += &row(40.0, "10.1.0.9", "", "", "a"); // ... but not 32 s later
    let trace = dir.file("t.csv", text);
    let r = report(&dir, &trace, |_| {});
    let attempts: Vec<u64> = r.trunks.iter().map(|t| t.attempts).collect();
    assert_eq!(attempts, vec![2, 1, 1]);
    assert_eq!(r.trace.stats.retransmissions, 1);
    assert_eq!(r.trace.stats.unmetered, 1);
    assert_eq!(r.trace.stats.from_carriers, 1);
}

#[test]
fn bad_rows_and_packets_are_named() {
    let dir = Scratch::new("bad");
    let err = |name: &str, bytes: &[u8]| -> String {
        let trace = dir.file(name, bytes);
        match planner(&dir, CONFIG, &trace, |_| {}) {
            Ok(_) => panic!("{name} accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = err("ts.csv", b"timestamp,source_ip,sip_username,trunk,call_id\n1.0,10.1.0.1,,,a\nyesterday,10.1.0.1,,,b\n");
    assert!(e.contains("line 3") && e.contains("\"yesterday\""), "{e}");
    let e = err("ip.csv", b"1.0,10.1.0.1,,,a\n2.0,pbx.example,,,b\n");
    assert!(
        e.contains("line 2") && e.contains("source_ip") && e.contains("pbx.example"),
        "{e}"
    );
    let e = err("trunk.csv", b"1.0,10.1.0.1,,north,a\n");
    assert!(e.contains("line 1") && e.contains("\"north\""), "{e}");
    let e = err("fields.csv", b"1.0,10.1.0.1,a\n");
    assert!(e.contains("line 1") && e.contains("3 fields"), "{e}");
    let e = err("callid.csv", b"1.0,10.1.0.1,,,\n");
    assert!(e.contains("call_id is empty"), "{e}");
    let e = err(
        "order.csv",
        b"10.0,10.1.0.1,,,a\n11.0,10.1.0.1,,,b\n5.0,10.1.0.1,,,c\n",
    );
    assert!(e.contains("line 3") && e.contains("sort the trace"), "{e}");
    // Nothing to replay: said, with what the trace held instead.
    let e = err("inbound.csv", b"1.0,192.0.2.49,,,a\n2.0,10.7.0.1,,,b\n");
    assert!(
        e.contains("no call attempt")
            && e.contains("1 INVITEs from carriers")
            && e.contains("1 from sources the proxy would not meter"),
        "{e}"
    );
    // Slightly out of order (two capture points) is put back in order.
    let trace = dir.file("swap.csv", b"10.5,10.1.0.1,,,a\n10.0,10.1.0.1,,,b\n");
    assert!(planner(&dir, CONFIG, &trace, |_| {}).is_ok());

    let c = Call {
        at_ns: T0,
        src: "10.1.0.5:5060".parse().unwrap(),
        user: String::new(),
        call_id: "x".into(),
    };
    let f = frame(c.src, &invite(&c, "b1", 1, ""));
    // A capture with a small snap length cut the second packet.
    let mut cut = pcap(&[(T0, f.clone()), (T0 + 1, f.clone())]);
    let n = cut.len();
    cut.truncate(n - f.len() - 16);
    let mut rec = Vec::new();
    rec.extend_from_slice(&((T0 / 1_000_000_000) as u32).to_le_bytes());
    rec.extend_from_slice(&1u32.to_le_bytes());
    rec.extend_from_slice(&96u32.to_le_bytes());
    rec.extend_from_slice(&(f.len() as u32).to_le_bytes());
    rec.extend_from_slice(&f[..96]);
    cut.extend_from_slice(&rec);
    let e = err("snap.pcap", &cut);
    assert!(e.contains("packet 2") && e.contains("snap length"), "{e}");
    // A file that ends inside a packet.
    let whole = pcap(&[(T0, f.clone()), (T0 + 1, f.clone())]);
    let e = err("short.pcap", &whole[..whole.len() - 10]);
    assert!(e.contains("packet 2"), "{e}");
    // Not SIP at all on the wire: counted, not fatal.
    let junk = pcap(&[
        (T0, frame(c.src, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
        (T0 + 1, f.clone()),
    ]);
    let trace = dir.file("junk.pcap", junk);
    let r = planner(&dir, CONFIG, &trace, |_| {})
        .unwrap()
        .report()
        .unwrap();
    assert_eq!((r.trace.stats.unparsable, r.trace.stats.attempts), (1, 1));
    assert_eq!(r.trace.stats.unparsable_examples, vec![1]);
}

#[test]
fn the_command_writes_a_table_json_and_a_chart_per_trunk() {
    let dir = Scratch::new("cli");
    let out_dir = dir.0.join("out");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cpsgate"))
            .arg("plan")
            .args(args)
            .current_dir(root)
            .output()
            .expect("run")
    };
    let out = run(&[
        "--config".as_ref(),
        "config/examples/multi-carrier.toml".as_ref(),
        "--trace".as_ref(),
        "config/examples/plan-trace.csv".as_ref(),
        "--out".as_ref(),
        out_dir.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("acme-east") && stdout.contains("needs"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let trunks = json["trunks"].as_array().unwrap();
    let pools = json["accounts"].as_array().unwrap();
    let charted: Vec<&str> = trunks
        .iter()
        .chain(pools)
        .filter_map(|t| t["chart"].as_str())
        .collect();
    assert!(
        charted.contains(&"trunk-acme-east.svg") && charted.contains(&"pool-acme.svg"),
        "{charted:?}"
    );
    assert!(charted.len() >= 5, "{charted:?}");
    for c in charted {
        let svg = std::fs::read_to_string(out_dir.join(c)).unwrap();
        assert!(
            svg.starts_with("<svg")
                && svg.contains("admitted as configured")
                && svg.contains("<polyline"),
            "{c}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(out_dir.join("report.txt")).unwrap(),
        stdout
    );
    // A bad trace: exit 1 and where; a bad option: exit 2.
    let bad = dir.file("bad.csv", "1.0,10.1.0.1,,,a\nnope\n");
    let out = run(&[
        "-c".as_ref(),
        "config/examples/multi-carrier.toml".as_ref(),
        "--trace".as_ref(),
        bad.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
    let out = run(&[
        "-c".as_ref(),
        "config/examples/multi-carrier.toml".as_ref(),
        "--trace".as_ref(),
        bad.as_os_str(),
        "--target".as_ref(),
        "2".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// Telnyx style: no trunks, every source IP limited on its own, per-username limits, a global
/// ceiling.
const PER_SOURCE: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[proxy]
unknown_sources = "limit"
default_upstream = "carrier"

[pbx]
address = "10.0.0.20:5060"

[[upstream]]
name = "carrier"
address = "192.0.2.50:5060"
sources = ["192.0.2.48/28"]

[limits]
unknown_source = { rate = 10, burst = 5 }
username = { rate = 8, burst = 4 }
global = { rate = 40, burst = 10 }
"#;

#[test]
fn per_source_per_username_and_global_limits_are_planned_too() {
    let dir = Scratch::new("stages");
    // Three dialer IPs; two of them share a SIP username.
    let mut calls = Vec::new();
    let mut rng = Lcg(11);
    for (n, (ip, user, rate)) in [
        ("10.5.0.1", "blue", 9.0),
        ("10.5.0.2", "blue", 6.0),
        ("10.5.0.3", "green", 14.0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut t = 0.0f64;
        let mut i = 0;
        while t < 120.0 {
            t += -(1.0 - rng.next()).ln() / rate;
            i += 1;
            calls.push(Call {
                at_ns: T0 + (t * 1e6) as u64 * 1000,
                src: format!("{ip}:5060").parse().expect("address"),
                user: user.into(),
                call_id: format!("s{n}-{i}"),
            });
        }
    }
    calls.sort_by_key(|c| c.at_ns);
    let trace = dir.file("t.csv", csv(&calls));
    let p = planner(&dir, PER_SOURCE, &trace, |_| {}).unwrap();
    let r = p.report().unwrap();
    let sources = r.sources.as_ref().expect("traffic on no trunk");
    assert_eq!(sources.attempts, calls.len() as u64);
    assert!(r.trunks.is_empty());
    for (stage, name) in [
        (cpsgate::limiter::Stage::Source, "source"),
        (cpsgate::limiter::Stage::Username, "username"),
        (cpsgate::limiter::Stage::Global, "global"),
    ] {
        let s = r.stages.iter().find(|s| s.stage == name).expect(name);
        let (_, burst) = s.limit.expect("a limit");
        let rec = s.recommended.as_ref().expect("a recommendation");
        let at = |rate: f64| p.stage_share(stage, Limit { rate, burst }).unwrap();
        let rate = rec.rate.expect("a rate meets the target");
        assert!(at(rate) <= 0.001, "{name} at {rate}");
        assert!(at(rate - 1.0) > 0.001, "{name} at {rate} − 1");
    }
    // The busiest source (14 CPS) needs more than the 10 each it has; two sources sharing
    // "blue" (15 CPS together) need more than the username's 8 (with a burst of 4, random
    // arrivals need a rate well above their mean).
    let need = |name: &str| {
        r.stages
            .iter()
            .find(|s| s.stage == name)
            .and_then(|s| s.recommended.as_ref())
            .and_then(|r| r.rate)
            .unwrap()
    };
    assert!(
        need("source") > 14.0 && need("source") < 100.0,
        "{}",
        need("source")
    );
    assert!(
        need("username") > 15.0 && need("username") < 100.0,
        "{}",
        need("username")
    );
    assert!(need("global") > 29.0, "{}", need("global"));
}

#[test]
fn whole_second_timestamps_are_spread_over_their_second() {
    let dir = Scratch::new("whole");
    // A CDR export: 25 calls stamped with each second for 10 s, into east (20 CPS, burst 10).
    // At one instant 15 of each second's 25 would be refused; spread over the second, the
    // bucket sees 25 CPS and refuses only what exceeds rate·t + burst.
    let mut text = String::new();
    for sec in 0..10 {
        for i in 0..25 {
            text += &format!("{},10.1.0.5,,,w{sec}-{i}\n", 1_764_576_000 + sec);
        }
    }
    let trace = dir.file("whole.csv", text);
    let p = planner(&dir, CONFIG, &trace, |_| {}).unwrap();
    let mut first_second = Vec::new();
    p.store()
        .for_each(|a| {
            if a.at < 1_000_000_000 {
                first_second.push(a.at);
            }
        })
        .unwrap();
    let even: Vec<u64> = (0..25).map(|i| (2 * i + 1) * 1_000_000_000 / 50).collect();
    // Times count from the first attempt, itself moved to 20 ms into its second.
    assert_eq!(
        first_second,
        even.iter().map(|t| t - 20_000_000).collect::<Vec<_>>()
    );
    let r = p.report().unwrap();
    assert!(r.trace.stats.spread_whole_seconds);
    let east = &r.trunks[0];
    // 250 calls over 9.96 s: 20·9.96 + 10 = 209 at most pass.
    assert!(east.rejected >= 41 && east.rejected <= 45, "{east:?}");
}

#[test]
fn calls_at_one_instant_beyond_the_burst_have_no_rate_only_a_burst() {
    let dir = Scratch::new("instant");
    // Eight calls at the same microsecond into west (burst 5): no rate spaces them.
    let text: String = (0..8)
        .map(|i| format!("1764576000.250000,10.2.0.5,,,i{i}\n"))
        .collect();
    let trace = dir.file("instant.csv", text);
    let r = report(&dir, &trace, |_| {});
    let rec = r.trunks[1].recommended.as_ref().expect("searched");
    assert_eq!(rec.rate, None);
    assert_eq!(rec.burst_at_configured_rate, Some(8));
    assert!((rec.rejected_share - 3.0 / 8.0).abs() < 1e-9);
    assert!(report_table(&r).contains("none at burst 5"));
}

fn report_table(r: &Report) -> String {
    cpsgate::plan::table(r)
}

#[test]
fn a_capture_taken_on_a_gate_counts_only_what_reached_it() {
    let dir = Scratch::new("ongate");
    // Both legs: the PBX's INVITE to the gate, and the gate's copy (a new branch) sent from its
    // listen address, 127.0.0.1:5060 in CONFIG.
    let gate: SocketAddr = "127.0.0.1:5060".parse().expect("address");
    let mut packets = Vec::new();
    for (i, c) in even("10.1.0.5:5060", 10, 2).iter().enumerate() {
        packets.push((c.at_ns, frame(c.src, &invite(c, &format!("p{i}"), 1, ""))));
        let copy = Call {
            src: gate,
            ..c.clone()
        };
        packets.push((
            c.at_ns + 100_000,
            frame(gate, &invite(&copy, &format!("g{i}"), 1, "")),
        ));
    }
    let trace = dir.file("both.pcap", pcap(&packets));
    let r = report(&dir, &trace, |_| {});
    assert_eq!(r.trace.stats.attempts, 21);
    assert_eq!(r.trace.stats.from_gate, 21);
    assert_eq!(r.trunks[0].attempts, 21);
}

#[test]
fn odd_but_readable_traces() {
    let dir = Scratch::new("odd");
    // A spreadsheet's byte-order mark before the header.
    let trace = dir.file(
        "bom.csv",
        b"\xef\xbb\xbftimestamp,source_ip,sip_username,trunk,call_id\n1.5,10.1.0.1,,,a\n",
    );
    assert_eq!(report(&dir, &trace, |_| {}).trunks[0].attempts, 1);
    // The first fragment of an INVITE larger than the MTU: counted as not taken, not fatal.
    let c = Call {
        at_ns: T0,
        src: "10.1.0.5:5060".parse().expect("address"),
        user: String::new(),
        call_id: "big".into(),
    };
    let mut first_fragment = frame(c.src, &invite(&c, "f1", 1, ""));
    first_fragment[14 + 6] = 0x20;
    let ok = Call {
        call_id: "ok".into(),
        ..c.clone()
    };
    let cap = pcap(&[
        (T0, first_fragment),
        (T0 + 1_000, frame(ok.src, &invite(&ok, "f2", 1, ""))),
    ]);
    let trace = dir.file("frag.pcap", cap);
    let r = report(&dir, &trace, |_| {});
    assert_eq!((r.trace.stats.unparsable, r.trace.stats.attempts), (1, 1));
    // A wrong timestamp far ahead is named, not replayed as weeks of silence.
    let trace = dir.file(
        "jump.csv",
        b"1764576000,10.1.0.1,,,a\n1864576000,10.1.0.1,,,b\n",
    );
    let e = planner(&dir, CONFIG, &trace, |_| {})
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("line 2") && e.contains("days after"), "{e}");
}

#[test]
fn the_replay_decides_as_the_proxy_core_does() {
    use cpsgate::proxy::{Action, Inbound, LocalListener, Proxy};
    let dir = Scratch::new("differential");
    // The same capture fed to the proxy's decision core, message by message at its own
    // instant, and to the planner: every trunk's and pool's admitted and refused counts agree.
    // Pacing on one trunk too: its booked calls count as admitted in both.
    let config = CONFIG.replace(
        "name = \"west\"\naccount = \"pool\"\nupstream = \"carrier\"\nrate = 15\nburst = 5\n",
        "name = \"west\"\naccount = \"pool\"\nupstream = \"carrier\"\nrate = 15\nburst = 5\non_limit = \"queue\"\nmax_delay = 2.0\nmax_queue = 20\n",
    );
    assert_ne!(config, CONFIG);
    let calls = bursty(90);
    let messages = wire(&calls);
    let cfg = cpsgate::config::Config::parse(&config, "differential").expect("config");
    let t0 = std::time::Instant::now();
    let proxy = Proxy::new_at(
        &cfg,
        vec![LocalListener {
            bound: "127.0.0.1:5060".parse().expect("address"),
            host: "127.0.0.1".into(),
            port: 5060,
            udp: true,
            tcp: true,
        }],
        t0,
    )
    .expect("proxy");
    let (mut forwarded, mut refused, mut queued) = (0u64, 0u64, 0u64);
    // Paced calls, released at their slot as the transport shell does.
    let mut waiting: std::collections::BTreeMap<(std::time::Instant, u64), ()> = Default::default();
    let mut last = t0;
    for (ns, src, msg) in &messages {
        let now = t0 + Duration::from_nanos(ns - T0);
        last = now;
        while let Some((&(at, key), _)) = waiting.first_key_value() {
            if at > now {
                break;
            }
            waiting.pop_first();
            assert!(proxy.release(key, at).is_some());
        }
        let action = proxy.handle(
            now,
            &Inbound {
                data: msg,
                source: *src,
                transport: cpsgate::sip::Transport::Udp,
                listener: 0,
                conn: None,
            },
        );
        match action {
            Action::Forward(_) => forwarded += 1,
            Action::Reject(..) => refused += 1,
            Action::Queue(q) => {
                queued += 1;
                waiting.insert((q.at, q.key), ());
            }
            _ => {}
        }
    }
    assert!(
        refused > 0 && queued > 0,
        "the traffic exercises refusals and pacing"
    );
    assert!(forwarded > 0);
    let snapshot = proxy.snapshot(last);
    let trace = dir.file(
        "t.pcap",
        pcap(
            &messages
                .iter()
                .map(|(t, src, m)| (*t, frame(*src, m)))
                .collect::<Vec<_>>(),
        ),
    );
    let r = planner(&dir, &config, &trace, |_| {})
        .unwrap()
        .report()
        .unwrap();
    for (live, planned) in snapshot.trunks.iter().map(|t| &t.limits).zip(&r.trunks) {
        assert_eq!(live.name, planned.name);
        // A paced call is counted admitted by the proxy when its slot comes.
        let waiting = live.waiting;
        assert_eq!(
            live.admitted + waiting,
            planned.admitted,
            "{} live {:?} planned {:?} attempts {}",
            live.name,
            live.rejected,
            planned.rejected_by_stage,
            planned.attempts
        );
        assert_eq!(live.rejected, planned.rejected_by_stage, "{}", live.name);
    }
    for (live, planned) in snapshot.accounts.iter().zip(&r.accounts) {
        assert_eq!(live.name, planned.name);
        assert_eq!(live.rejected, planned.rejected_by_stage, "{}", live.name);
    }
}
