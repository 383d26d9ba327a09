//! CPS limits through a running gate: refusals, retransmissions, ACK and CANCEL around them,
//! in-dialog requests unmetered, auth retries, and a reload that changes a rate in place.

use std::time::Duration;

/// Wait (bounded) for a condition the gate reaches asynchronously.
async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 5 s");
}

use cpsgate::limiter::Stage;

use crate::harness::*;

fn limited_config(
    pbx: std::net::SocketAddr,
    carrier: std::net::SocketAddr,
    rate: u32,
    burst: u32,
) -> String {
    config(pbx, "udp", carrier, "udp").replace(
        "rate = 1000\nburst = 1000\nmatch",
        &format!("rate = {rate}\nburst = {burst}\nmatch"),
    )
}

/// Send an INVITE and return what came back to the PBX, or what reached the carrier.
enum Outcome {
    Forwarded(String),
    Answered(String),
}

async fn offer(pbx: &UdpPeer, carrier: &UdpPeer, gate: &TestGate, msg: &str) -> Outcome {
    pbx.send(gate.udp, msg).await;
    tokio::select! {
        (r, _) = pbx.recv() => Outcome::Answered(r),
        (f, _) = carrier.recv() => Outcome::Forwarded(f),
    }
}

fn answered(o: Outcome) -> String {
    match o {
        Outcome::Answered(r) => r,
        Outcome::Forwarded(f) => panic!("forwarded instead of answered:\n{f}"),
    }
}

fn forwarded(o: Outcome) -> String {
    match o {
        Outcome::Forwarded(f) => f,
        Outcome::Answered(r) => panic!("answered instead of forwarded:\n{r}"),
    }
}

#[tokio::test]
async fn over_the_limit_retransmission_ack_and_cancel() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&limited_config(pbx.addr, carrier.addr, 1, 1)).await;
    forwarded(
        offer(
            &pbx,
            &carrier,
            &gate,
            &invite(pbx.addr, "UDP", "ok-1", "z9hG4bKok1", ""),
        )
        .await,
    );
    let refused = invite(pbx.addr, "UDP", "over-1", "z9hG4bKover1", "");
    let first = answered(offer(&pbx, &carrier, &gate, &refused).await);
    assert!(
        first.starts_with("SIP/2.0 503 CPS Limit reached\r\n"),
        "{first}"
    );
    assert!(
        first.contains("\r\nReason: SIP;cause=503;text=\"trunk CPS limit (t1)\"\r\n"),
        "{first}"
    );
    // The UDP retransmission gets the byte-identical answer.
    let again = answered(offer(&pbx, &carrier, &gate, &refused).await);
    assert_eq!(first, again);
    assert_eq!(gate.stats.rejected(Stage::Trunk), 1);
    assert_eq!(
        gate.stats
            .retransmissions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The CANCEL of the refused INVITE is answered here.
    let cancel = refused
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    let ok = answered(offer(&pbx, &carrier, &gate, &cancel).await);
    assert_eq!(gate.proxy.cancels_answered(), 1);
    assert!(
        ok.starts_with("SIP/2.0 200 OK\r\n") && ok.contains("CSeq: 1 CANCEL"),
        "{ok}"
    );
    // Its ACK is absorbed: the next thing the carrier sees is the next forwarded request.
    let to = header(&first, "To").expect("to").to_owned();
    let ack = format!(
        "ACK sip:+15551234567@carrier.example SIP/2.0\r\nVia: SIP/2.0/UDP {p};branch=z9hG4bKover1;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+15550001111@pbx.example>;tag=from-over-1\r\nTo: {to}\r\n\
         Call-ID: over-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        p = pbx.addr
    );
    pbx.send(gate.udp, &ack).await;
    // A re-INVITE in an existing dialog is not metered, even with the trunk empty.
    let reinvite = invite(pbx.addr, "UDP", "ok-1", "z9hG4bKre1", "").replace(
        "To: <sip:+15551234567@carrier.example>",
        "To: <sip:+15551234567@carrier.example>;tag=c",
    );
    let f = forwarded(offer(&pbx, &carrier, &gate, &reinvite).await);
    assert!(
        f.starts_with("INVITE "),
        "the ACK never reached the carrier: {f}"
    );
    assert_eq!(
        gate.stats
            .absorbed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    gate.stop().await;
}

#[tokio::test]
async fn an_auth_retry_is_not_charged_twice() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let gate = TestGate::start(&limited_config(pbx.addr, carrier.addr, 1, 1)).await;
    let first = forwarded(
        offer(
            &pbx,
            &carrier,
            &gate,
            &invite(pbx.addr, "UDP", "auth-1", "z9hG4bKa1", ""),
        )
        .await,
    );
    // The carrier challenges; the PBX re-sends with credentials (new branch, CSeq 2).
    carrier
        .send(
            gate.udp,
            &respond(&first, 407, "Proxy Authentication Required", "c", None),
        )
        .await;
    assert_eq!(status(&pbx.recv().await.0), 407);
    let retry = invite(
        pbx.addr,
        "UDP",
        "auth-1",
        "z9hG4bKa2",
        "Proxy-Authorization: Digest username=\"pbx\", realm=\"c\"\r\n",
    )
    .replace("CSeq: 1 INVITE", "CSeq: 2 INVITE");
    forwarded(offer(&pbx, &carrier, &gate, &retry).await);
    // A different call in the same second is still refused: the retry took no cell.
    let other = invite(pbx.addr, "UDP", "auth-2", "z9hG4bKa3", "");
    assert!(answered(offer(&pbx, &carrier, &gate, &other).await).starts_with("SIP/2.0 503"));
    gate.stop().await;
}

/// A reload raises the rate in place: the cells used stay used (no fresh burst), the new rate
/// applies from then on.
#[tokio::test]
async fn reload_changes_a_rate_without_a_fresh_burst() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let path = std::env::temp_dir().join(format!("cpsgate-reload-{}.toml", std::process::id()));
    std::fs::write(&path, limited_config(pbx.addr, carrier.addr, 1, 3)).expect("write");
    let gate = TestGate::start_file(&path).await;
    for n in 0..3 {
        let msg = invite(
            pbx.addr,
            "UDP",
            &format!("r-{n}"),
            &format!("z9hG4bKr{n}"),
            "",
        );
        forwarded(offer(&pbx, &carrier, &gate, &msg).await);
    }
    let over = invite(pbx.addr, "UDP", "r-over", "z9hG4bKrover", "");
    assert!(answered(offer(&pbx, &carrier, &gate, &over).await).starts_with("SIP/2.0 503"));
    // Double the burst (and the rate): the 3 used cells stay used, 3 of 6 remain — not 6.
    std::fs::write(&path, limited_config(pbx.addr, carrier.addr, 2, 6)).expect("write");
    gate.reload.notify_one();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(|| count(&gate.stats.reloads) >= 1).await;
    let trunk_limit = || gate.proxy.chain().trunk(0).limit();
    assert_eq!(trunk_limit().burst, 6, "reloaded");
    let mut admitted = 0;
    for n in 0..6 {
        let msg = invite(
            pbx.addr,
            "UDP",
            &format!("after-{n}"),
            &format!("z9hG4bKafter{n}"),
            "",
        );
        if let Outcome::Forwarded(_) = offer(&pbx, &carrier, &gate, &msg).await {
            admitted += 1;
        }
    }
    assert!(
        (3..=4).contains(&admitted),
        "{admitted} admitted after the reload: a fresh burst would give 6"
    );
    // An invalid file is refused; the running configuration stays.
    std::fs::write(&path, "[[listen]]\naddress = 'nonsense'\n").expect("write");
    gate.reload.notify_one();
    wait_until(|| count(&gate.stats.reload_failures) >= 1).await;
    assert_eq!(trunk_limit().burst, 6);
    let _ = std::fs::remove_file(&path);
    gate.stop().await;
}

/// Pacing through a running gate: a call over the rate waits with 100 Trying and goes out when
/// its slot comes; a waiting call the caller CANCELs gets 200 and 487, never reaches the
/// carrier, and its slot goes to the next call.
#[tokio::test]
async fn a_queued_call_goes_out_at_its_slot_and_a_cancelled_one_never_does() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let cfg = limited_config(pbx.addr, carrier.addr, 2, 1).replace(
        "burst = 1\nmatch",
        "burst = 1\non_limit = \"queue\"\nmax_delay = 5.0\nmatch",
    );
    let gate = TestGate::start(&cfg).await;
    let first = invite(pbx.addr, "UDP", "q-0", "z9hG4bKq0", "");
    forwarded(offer(&pbx, &carrier, &gate, &first).await);
    // The next call's slot is 500 ms away: the caller hears 100 Trying at once.
    let waiting = invite(pbx.addr, "UDP", "q-1", "z9hG4bKq1", "");
    let sent = tokio::time::Instant::now();
    let trying = answered(offer(&pbx, &carrier, &gate, &waiting).await);
    assert!(trying.starts_with("SIP/2.0 100 Trying\r\n"), "{trying}");
    // ... and the carrier gets it when the slot comes, not before.
    let (out, _) = carrier.recv().await;
    let waited = sent.elapsed();
    assert!(out.contains("Call-ID: q-1\r\n"), "{out}");
    assert!(
        waited >= Duration::from_millis(400),
        "forwarded after {waited:?}, before its slot"
    );
    // A third call waits; its caller gives up.
    let doomed = invite(pbx.addr, "UDP", "q-2", "z9hG4bKq2", "");
    let trying = answered(offer(&pbx, &carrier, &gate, &doomed).await);
    assert!(trying.starts_with("SIP/2.0 100 Trying\r\n"), "{trying}");
    let cancel = doomed
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    pbx.send(gate.udp, &cancel).await;
    let mut answers = [pbx.recv().await.0, pbx.recv().await.0];
    answers.sort_by_key(|m| status(m));
    assert!(
        answers[0].starts_with("SIP/2.0 200 OK\r\n") && answers[0].contains("CSeq: 1 CANCEL"),
        "{}",
        answers[0]
    );
    assert!(
        answers[1].starts_with("SIP/2.0 487 Request Terminated\r\n")
            && answers[1].contains("CSeq: 1 INVITE"),
        "{}",
        answers[1]
    );
    // The freed slot goes to the next call; the carrier never sees the cancelled one.
    let next = invite(pbx.addr, "UDP", "q-3", "z9hG4bKq3", "");
    pbx.send(gate.udp, &next).await;
    let (out, _) = carrier.recv().await;
    assert!(
        out.contains("Call-ID: q-3\r\n"),
        "the cancelled call went out: {out}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(800), carrier.recv())
            .await
            .is_err(),
        "nothing else reaches the carrier"
    );
    assert_eq!(gate.proxy.queue_len(), 0);
    gate.stop().await;
}

/// On shutdown, a waiting call whose slot comes within the grace period still goes out at its
/// slot; one whose slot is later is answered 503 at once. None is silently lost.
#[tokio::test]
async fn shutdown_sends_the_waiting_calls_due_in_the_grace_period_and_refuses_the_rest() {
    let pbx = UdpPeer::bind().await;
    let carrier = UdpPeer::bind().await;
    let cfg = limited_config(pbx.addr, carrier.addr, 1, 1)
        .replace(
            "burst = 1\nmatch",
            "burst = 1\non_limit = \"queue\"\nmax_delay = 10.0\nmatch",
        )
        .replace("shutdown_grace_secs = 0", "shutdown_grace_secs = 2");
    let mut gate = TestGate::start(&cfg).await;
    let now = invite(pbx.addr, "UDP", "s-0", "z9hG4bKs0", "");
    forwarded(offer(&pbx, &carrier, &gate, &now).await);
    // Slots at +1 s (within the 2 s grace) and +2 s, +3 s (the last one beyond it).
    for n in 1..=3 {
        let msg = invite(
            pbx.addr,
            "UDP",
            &format!("s-{n}"),
            &format!("z9hG4bKs{n}"),
            "",
        );
        let trying = answered(offer(&pbx, &carrier, &gate, &msg).await);
        assert!(trying.starts_with("SIP/2.0 100 Trying\r\n"), "{trying}");
    }
    gate.begin_stop();
    // The call beyond the grace period is refused at once.
    let (refused, _) = pbx.recv().await;
    assert!(
        refused.starts_with("SIP/2.0 503 Service Unavailable (Shutting Down)\r\n")
            && refused.contains("Call-ID: s-3\r\n"),
        "{refused}"
    );
    // The other two go out at their slots.
    for n in 1..=2 {
        let (out, _) = carrier.recv().await;
        assert!(out.contains(&format!("Call-ID: s-{n}\r\n")), "{out}");
    }
    gate.stop().await;
}
