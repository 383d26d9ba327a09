//! Smoke tests of the real binary: config checking, startup log, SIGTERM.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cpsgate::config::Config;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cpsgate")
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// SIGTERM to the running gate, and its exit status within its grace period.
async fn terminate(child: &mut tokio::process::Child, pid: &str) -> std::process::ExitStatus {
    let killed = std::process::Command::new("kill")
        .args(["-TERM", pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait")
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("cpsgate-{}-{name}", std::process::id()));
    std::fs::write(&p, text).expect("write temp config");
    p
}

#[test]
fn shipped_default_config_loads() {
    let c = Config::load(&repo("config/cpsgate.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.listeners[0].address,
        "127.0.0.1:5060".parse().expect("addr")
    );
    assert_eq!(c.upstreams[0].target.port, 5080);
    assert!(c.listeners[0].udp && c.listeners[0].tcp);
}

#[test]
fn check_config_accepts_the_shipped_files() {
    let out = std::process::Command::new(bin())
        .args(["check-config", "config/cpsgate.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The cluster example (docker-compose.yml) checks too (Redis is not needed to check it);
    // each replica's advertised address comes from its environment.
    let check_cluster = |advertise: Option<&str>| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["check-config", "config/examples/cluster.toml"])
            .env("CPSGATE_SECRET", "an-example-secret-of-enough-length")
            .env_remove("CPSGATE_ADVERTISE")
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(a) = advertise {
            cmd.env("CPSGATE_ADVERTISE", a);
        }
        cmd.output().expect("run")
    };
    let out = check_cluster(Some("cpsgate-a:5060"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check_cluster(None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "listen[0].advertise_env = \"CPSGATE_ADVERTISE\": environment variable is not set"
            ),
        "{err}"
    );
    // The multi-carrier example reads its secret from the environment.
    let out = std::process::Command::new(bin())
        .args(["check-config", "config/examples/multi-carrier.toml"])
        .env("CPSGATE_SECRET", "an-example-secret-of-enough-length")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 listener(s), 2 upstream(s), 2 account(s), 6 trunk(s)"),
        "{text}"
    );
}

#[test]
fn check_config_reports_every_error_with_line_and_exits_2() {
    let bad = std::fs::read_to_string(repo("config/cpsgate.toml"))
        .expect("read")
        .replace("rate = 10      # calls per second", "rate = 0")
        .replace("upstream = \"carrier\"", "upstream = \"nowhere\"")
        .replace(
            "unknown_sources = \"reject\"",
            "unknown_sources = \"maybe\"",
        );
    let path = temp_file("bad.toml", &bad);
    let out = std::process::Command::new(bin())
        .args(["check-config", path.to_str().expect("utf8 path")])
        .output()
        .expect("run");
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 error(s)"), "{err}");
    assert!(err.contains("proxy.unknown_sources = \"maybe\""), "{err}");
    assert!(err.contains("account[0].rate = 0.0"), "{err}");
    assert!(
        err.contains("trunk[0].upstream = \"nowhere\": no [[upstream]] has this name"),
        "{err}"
    );
    assert!(
        err.lines()
            .skip(1)
            .all(|l| l.trim_start().starts_with("line ")),
        "{err}"
    );
}

#[tokio::test]
async fn run_logs_bound_addresses_and_exits_cleanly_on_sigterm() {
    let cfg = std::fs::read_to_string(repo("config/cpsgate.toml"))
        .expect("read")
        .replace("address = \"127.0.0.1:5060\"", "address = \"127.0.0.1:0\"")
        .replace("shutdown_grace_secs = 5", "shutdown_grace_secs = 1")
        .replace("address = \"127.0.0.1:9090\"", "address = \"127.0.0.1:0\"");
    let path = temp_file("run.toml", &cfg);
    let mut child = Command::new(bin())
        .args([
            "run",
            "--config",
            path.to_str().expect("utf8 path"),
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("startup log in time")
            .expect("read")
            .expect("the gate logs before exiting");
        if line.contains("listening on") {
            seen.push(line);
        }
    }
    assert!(
        seen[0].contains("listening on udp 127.0.0.1:"),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].contains("listening on tcp 127.0.0.1:"),
        "{}",
        seen[1]
    );
    assert!(
        seen[2].contains("listening on http 127.0.0.1:"),
        "{}",
        seen[2]
    );
    let pid = child.id().expect("pid").to_string();
    // SIGHUP reloads the file (unchanged here, so the file watcher stays quiet).
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(hup.success());
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("reload logged in time")
            .expect("read")
            .expect("the gate logs before exiting");
        assert!(!line.contains("reload refused"), "{line}");
        if line.contains("config reloaded") {
            assert!(line.contains("SIGHUP"), "{line}");
            break;
        }
    }
    let status = terminate(&mut child, &pid).await;
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "{status:?}");
}

/// Logs to a full disk: every log write fails (`/dev/full`: ENOSPC), the SIP path goes on, and
/// SIGTERM still ends the process cleanly.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_full_disk_for_logs_does_not_stop_the_sip_path() {
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    };
    let cfg = std::fs::read_to_string(repo("config/cpsgate.toml"))
        .expect("read")
        .replace(
            "address = \"127.0.0.1:5060\"",
            &format!("address = \"127.0.0.1:{port}\""),
        )
        .replace("shutdown_grace_secs = 5", "shutdown_grace_secs = 1")
        .replace("address = \"127.0.0.1:9090\"", "address = \"127.0.0.1:0\"");
    let path = temp_file("full.toml", &cfg);
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full")
    };
    let mut child = Command::new(bin())
        .args([
            "run",
            "--config",
            path.to_str().expect("utf8 path"),
            "--log",
            "debug",
        ])
        .stdout(Stdio::from(full()))
        .stderr(Stdio::from(full()))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let gate: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let me = sock.local_addr().expect("addr");
    // Keep-alive OPTIONS to the gate itself until it answers (it may still be starting).
    let mut answered = 0;
    let mut buf = vec![0u8; 65_535];
    for n in 0..50 {
        let ping = format!(
            "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-full-{n}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:probe@x>;tag=p{n}\r\nTo: <sip:127.0.0.1:{port}>\r\n\
             Call-ID: full-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        );
        sock.send_to(ping.as_bytes(), gate).await.expect("send");
        if let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
        {
            assert!(
                buf[..len].starts_with(b"SIP/2.0 200 "),
                "{}",
                String::from_utf8_lossy(&buf[..len])
            );
            answered += 1;
            if answered == 5 {
                break;
            }
        }
    }
    assert_eq!(answered, 5, "the gate answers with every log write failing");
    // A second gate on the same port cannot start: it says so with its exit code (1), even
    // though the message itself cannot be written.
    let second = Command::new(bin())
        .args(["run", "--config", path.to_str().expect("utf8 path")])
        .stdout(Stdio::from(full()))
        .stderr(Stdio::from(full()))
        .status()
        .await
        .expect("second gate");
    assert_eq!(second.code(), Some(1), "{second:?}");
    let pid = child.id().expect("pid").to_string();
    let status = terminate(&mut child, &pid).await;
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "{status:?}");
}
