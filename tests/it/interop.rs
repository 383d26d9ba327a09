//! Interop with real SIPp (Debian `sip-tester`): `sipp -sn uac` → cpsgate → `sipp -sn uas`.
//! Ignored in plain `cargo test`; `.ci/run` installs sipp and runs them with `--include-ignored`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::process::Command;

use crate::harness::TestGate;

const CALLS: u32 = 500;

/// A port that was free a moment ago (SIPp needs an explicit port).
fn free_port(tcp: bool) -> u16 {
    if tcp {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    } else {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    }
}

fn gate_config(uas: SocketAddr, transport: &str) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:0"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[[upstream]]
name = "uas"
address = "{uas}"
transport = "{transport}"
sources = ["{uas}"]

[[trunk]]
name = "uac"
upstream = "uas"
rate = 1000
burst = 1000
match = {{ sources = ["127.0.0.1"] }}
"#
    )
}

/// Which SIPp scenarios play the caller and the callee.
#[derive(Clone, Copy)]
enum Scenarios {
    /// SIPp's built-in `uac` and `uas` (`-sn`).
    BuiltIn,
    /// `tests/interop/*_rr.xml`: the callee copies Record-Route and checks the INVITE has ours;
    /// the caller sends ACK and BYE along the route set; the callee checks the BYE came through
    /// the gate. A call fails when the gate does not record-route.
    RecordRoute,
}

impl Scenarios {
    fn args(self, role: &str) -> Vec<String> {
        match self {
            Scenarios::BuiltIn => vec!["-sn".into(), role.into()],
            Scenarios::RecordRoute => vec![
                "-sf".into(),
                format!("{}/tests/interop/{role}_rr.xml", env!("CARGO_MANIFEST_DIR")),
            ],
        }
    }
}

async fn sipp_calls_through_the_gate(transport: &str, scenarios: Scenarios) {
    let t = if transport == "tcp" { "t1" } else { "u1" };
    let tcp = transport == "tcp";
    let uas_port = free_port(tcp);
    let uas_addr: SocketAddr = ([127, 0, 0, 1], uas_port).into();
    let gate = TestGate::start(&gate_config(uas_addr, transport)).await;
    let gate_addr = if tcp { gate.tcp } else { gate.udp };

    let mut uas = Command::new("sipp")
        .args(scenarios.args("uas"))
        .args(["-i", "127.0.0.1", "-p", &uas_port.to_string(), "-t", t])
        .args(["-nostdin", "-timeout", "180s"])
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sipp is installed (Debian package sip-tester)");
    // Give the UAS a moment to bind; the UAC retries nothing, so wait until the port is taken.
    for _ in 0..100 {
        let taken = if tcp {
            std::net::TcpStream::connect(uas_addr).is_ok()
        } else {
            std::net::UdpSocket::bind(uas_addr).is_err()
        };
        if taken {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let uac_port = free_port(tcp);
    let uac = Command::new("sipp")
        .args(scenarios.args("uac"))
        .args([&gate_addr.to_string(), "-i", "127.0.0.1"])
        .current_dir(std::env::temp_dir())
        .args(["-p", &uac_port.to_string(), "-t", t])
        .args([
            "-m",
            &CALLS.to_string(),
            "-r",
            "100",
            "-l",
            "200",
            "-d",
            "10",
        ])
        .args([
            "-nostdin",
            "-timeout",
            "120s",
            "-timeout_error",
            "-trace_err",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(150), uac)
        .await
        .expect("sipp uac finishes")
        .expect("sipp uac runs");
    let _ = uas.kill().await;
    let forwarded = gate.stats.forwarded.load(Ordering::Relaxed);
    gate.stop().await;
    assert!(
        out.status.success(),
        "sipp uac over {transport} reported failed calls (exit {:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    // INVITE, 100, 180, 200, ACK, BYE, 200 per call pass the gate (100 Trying may be merged).
    assert!(
        forwarded >= u64::from(CALLS) * 6,
        "only {forwarded} messages forwarded for {CALLS} calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs sipp (Debian sip-tester); run by .ci/run"]
async fn sipp_uac_to_uas_over_udp_500_calls_no_failures() {
    sipp_calls_through_the_gate("udp", Scenarios::BuiltIn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs sipp (Debian sip-tester); run by .ci/run"]
async fn sipp_uac_to_uas_over_tcp_500_calls_no_failures() {
    sipp_calls_through_the_gate("tcp", Scenarios::BuiltIn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs sipp (Debian sip-tester); run by .ci/run"]
async fn sipp_calls_follow_the_record_route_over_udp() {
    sipp_calls_through_the_gate("udp", Scenarios::RecordRoute).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs sipp (Debian sip-tester); run by .ci/run"]
async fn sipp_calls_follow_the_record_route_over_tcp() {
    sipp_calls_through_the_gate("tcp", Scenarios::RecordRoute).await;
}
