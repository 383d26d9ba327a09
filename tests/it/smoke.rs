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
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait");
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "{status:?}");
}
