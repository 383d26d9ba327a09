//! `cpsgate load` against an in-process gate: every call accounted for, the trunk's limit seen
//! from the PBX side, and calls completed through the gate's Record-Route.

use std::net::SocketAddr;
use std::time::Duration;

use cpsgate::load::{LoadArgs, run};

use crate::harness::TestGate;

fn free_port(tcp: bool) -> u16 {
    if tcp {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    } else {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    }
}

fn gate_toml(carrier: SocketAddr, transport: &str) -> String {
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
transport = "{transport}"
sources = ["{carrier}"]

[[trunk]]
name = "pbx"
upstream = "carrier"
rate = 50
burst = 10
match = {{ sources = ["127.0.0.0/8"] }}
"#
    )
}

async fn load_through_a_50_cps_trunk(tcp: bool) {
    let transport = if tcp { "tcp" } else { "udp" };
    let carrier: SocketAddr = format!("127.0.0.1:{}", free_port(tcp))
        .parse()
        .expect("addr");
    let gate = TestGate::start(&gate_toml(carrier, transport)).await;
    let s = run(LoadArgs {
        gate: if tcp { gate.tcp } else { gate.udp },
        tcp,
        cps: 200.0,
        calls: Some(200),
        duration: None,
        uac: "127.0.0.1:0".parse().expect("addr"),
        uas: Some(carrier),
        drain: Duration::from_secs(3),
        live: false,
    })
    .await
    .expect("load runs");
    let refused: u64 = s.refused.values().sum();
    assert_eq!(s.offered, 200, "{s:?}");
    assert_eq!(s.lost, 0, "{s:?}");
    assert_eq!(s.answered + refused, 200, "{s:?}");
    assert_eq!(
        s.refused.keys().copied().collect::<Vec<_>>(),
        [503],
        "{s:?}"
    );
    // About a second of offered load through 50 CPS with a burst of 10.
    assert!((50..=70).contains(&s.answered), "{s:?}");
    assert_eq!(s.reached, s.answered, "{s:?}");
    assert_eq!(
        s.completed, s.answered,
        "every answered call's BYE went through: {s:?}"
    );
    assert!(s.p99_ms > 0.0 && s.p50_ms <= s.p99_ms, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_accounts_for_every_call_over_udp() {
    load_through_a_50_cps_trunk(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_accounts_for_every_call_over_tcp() {
    load_through_a_50_cps_trunk(true).await;
}

#[test]
fn bad_load_arguments_get_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cpsgate"))
        .args(["load", "--gate", "127.0.0.1:9", "--cps", "0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cps must be a rate above 0"));
}
