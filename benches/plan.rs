//! The capacity planner's speed, in attempts per second: reading and classifying a CSV trace and
//! a pcap capture, one replay as configured (per-second figures on), one replay of a search step
//! (one trunk, counts only), and the whole report (every scenario: as configured, the searches,
//! the recommendation, pacing). The traffic: 200 000 calls over 10 minutes on four trunks in two
//! pools, a third of the time over the limits.

use std::path::PathBuf;

use cpsgate::limiter::Limit;
use cpsgate::plan::{Options, Planner};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CALLS: u64 = 200_000;
const SECONDS: u64 = 600;

const CONFIG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[pbx]
address = "10.0.0.20:5060"

[[upstream]]
name = "carrier"
address = "192.0.2.50:5060"
sources = ["192.0.2.48/28"]

[[account]]
name = "office"
rate = 200
burst = 50

[[account]]
name = "dialer"
rate = 250
burst = 50

[[trunk]]
name = "east"
account = "office"
upstream = "carrier"
rate = 100
burst = 20
match = { sources = ["10.1.0.0/24"] }

[[trunk]]
name = "west"
account = "office"
upstream = "carrier"
rate = 100
burst = 20
match = { sources = ["10.2.0.0/24"] }

[[trunk]]
name = "dialer-a"
account = "dialer"
upstream = "carrier"
rate = 120
burst = 20
match = { sources = ["10.9.0.11"] }

[[trunk]]
name = "dialer-b"
account = "dialer"
upstream = "carrier"
rate = 120
burst = 20
match = { sources = ["10.9.0.12"] }
"#;

const SOURCES: [&str; 4] = ["10.1.0.5", "10.2.0.5", "10.9.0.11", "10.9.0.12"];

/// Call `i`: its time (ns from the start, bunched into bursts a third of the time) and source.
fn call(i: u64) -> (u64, &'static str) {
    let span = SECONDS * 1_000_000_000;
    let even = i * span / CALLS;
    // Every third minute runs at 1.5× the mean rate; the others make up for it.
    let minute = even / 60_000_000_000;
    let at = if minute.is_multiple_of(3) {
        even - even % 60_000_000_000 + (even % 60_000_000_000) * 2 / 3
    } else {
        even
    };
    (at, SOURCES[(i % 4) as usize])
}

fn files() -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("cpsgate-bench-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("cpsgate.toml");
    std::fs::write(&cfg, CONFIG).expect("config");
    let mut rows: Vec<(u64, String)> = (0..CALLS)
        .map(|i| {
            let (at, src) = call(i);
            (
                at,
                format!(
                    "{}.{:09},{src},,,c{i}\n",
                    1_764_576_000 + at / 1_000_000_000,
                    at % 1_000_000_000
                ),
            )
        })
        .collect();
    rows.sort();
    let csv = dir.join("trace.csv");
    std::fs::write(&csv, rows.into_iter().map(|r| r.1).collect::<String>()).expect("csv");
    // The same calls as SIP INVITEs in a pcap.
    let mut pcap = Vec::new();
    for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
        pcap.extend_from_slice(&v.to_le_bytes());
    }
    let mut calls: Vec<(u64, u64, &str)> = (0..CALLS).map(|i| (call(i).0, i, call(i).1)).collect();
    calls.sort();
    for (at, i, src) in calls {
        let sip = format!(
            "INVITE sip:+15551230000@192.0.2.50 SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5060;branch=z9hG4bK{i}\r\nMax-Forwards: 70\r\nFrom: <sip:pbx@pbx.example>;tag={i}\r\nTo: <sip:+15551230000@192.0.2.50>\r\nCall-ID: c{i}\r\nCSeq: 1 INVITE\r\nContact: <sip:pbx@{src}:5060>\r\nContent-Type: application/sdp\r\nContent-Length: 0\r\n\r\n"
        );
        let ip: std::net::Ipv4Addr = src.parse().expect("ip");
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (28 + sip.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ]);
        f.extend_from_slice(&ip.octets());
        f.extend_from_slice(&[192, 0, 2, 50]);
        f.extend_from_slice(&5060u16.to_be_bytes());
        f.extend_from_slice(&5060u16.to_be_bytes());
        f.extend_from_slice(&((8 + sip.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(sip.as_bytes());
        let ts = 1_764_576_000_000_000 + at / 1000;
        for v in [
            (ts / 1_000_000) as u32,
            (ts % 1_000_000) as u32,
            f.len() as u32,
            f.len() as u32,
        ] {
            pcap.extend_from_slice(&v.to_le_bytes());
        }
        pcap.extend_from_slice(&f);
    }
    let cap = dir.join("trace.pcap");
    std::fs::write(&cap, pcap).expect("pcap");
    (cfg, csv, cap)
}

fn plan(c: &mut Criterion) {
    let (cfg, csv, cap) = files();
    let mut g = c.benchmark_group("plan");
    g.sample_size(10);
    g.throughput(Throughput::Elements(CALLS));
    g.bench_function("read_csv", |b| {
        b.iter(|| Planner::load(Options::new(&cfg, &csv)).expect("load"));
    });
    g.bench_function("read_pcap", |b| {
        b.iter(|| Planner::load(Options::new(&cfg, &cap)).expect("load"));
    });
    let planner = Planner::load(Options::new(&cfg, &csv)).expect("load");
    assert_eq!(planner.store().len(), CALLS);
    let configured = planner.as_configured();
    g.bench_function("replay_as_configured", |b| {
        b.iter(|| planner.replay(&configured).expect("replay"));
    });
    // A search step replays every attempt and keeps one trunk's.
    g.bench_function("replay_search_step", |b| {
        b.iter(|| {
            planner
                .trunk_share(
                    0,
                    Limit {
                        rate: 90.0,
                        burst: 20,
                    },
                )
                .expect("replay")
        });
    });
    g.bench_function("whole_report", |b| {
        b.iter(|| planner.report().expect("report"));
    });
    g.finish();
    let _ = std::fs::remove_dir_all(cfg.parent().expect("dir"));
}

criterion_group!(benches, plan);
criterion_main!(benches);
