//! Memory under a flood of distinct sources: one INVITE from each of N source IPs through the
//! real decision path (`unknown_sources = "limit"`, so each gets a per-source bucket and a
//! decision-cache entry), then the process's peak resident set. Run with
//! `cargo bench --bench memory` (N = 1 000 000; `CPSGATE_FLOOD_SOURCES` changes it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use cpsgate::config::Config;
use cpsgate::proxy::{Action, Inbound, LocalListener, Proxy};
use cpsgate::sip::Transport;

const CFG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"
[proxy]
unknown_sources = "limit"
default_upstream = "carrier"
[limits]
unknown_source = { rate = 20, burst = 20 }
[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"
"#;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let n: u32 = std::env::var("CPSGATE_FLOOD_SOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
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
    let before = status_kib("VmRSS:");
    let start = Instant::now();
    let mut forwarded = 0u32;
    for i in 0..n {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let msg = format!(
            "INVITE sip:+15551234567@carrier.example SIP/2.0\r\n\
             Via: SIP/2.0/UDP {ip}:5060;branch=z9hG4bKflood{i}\r\n\
             From: <sip:dialer@pbx.example>;tag={i}\r\nTo: <sip:+15551234567@carrier.example>\r\n\
             Call-ID: flood-{i}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        );
        let inb = Inbound {
            data: msg.as_bytes(),
            source: SocketAddr::new(ip, 5060),
            transport: Transport::Udp,
            listener: 0,
            conn: None,
        };
        // Arrivals 1 µs apart: the whole flood lands within a second or so of gate time.
        if let Action::Forward(_) = proxy.handle(start + Duration::from_micros(u64::from(i)), &inb)
        {
            forwarded += 1;
        }
    }
    let elapsed = start.elapsed();
    let t = proxy.table_sizes();
    println!(
        "{n} distinct sources, {forwarded} forwarded in {:.2} s ({:.0} INVITEs/s through the whole decision)",
        elapsed.as_secs_f64(),
        f64::from(n) / elapsed.as_secs_f64()
    );
    println!(
        "tables: sources {} (cap {}, evicted {}), decisions {} (cap {}, evicted {})",
        t.sources.0, t.sources.1, t.sources.2, t.decisions.0, t.decisions.1, t.decisions.2
    );
    println!(
        "resident set: {} MiB before, {} MiB now, {} MiB peak (whole process)",
        before / 1024,
        status_kib("VmRSS:") / 1024,
        status_kib("VmHWM:") / 1024
    );
}
