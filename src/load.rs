//! `cpsgate load`: a load generator that plays both ends of a gate. As the PBX (UAC) it sends
//! INVITEs at a target rate and completes each call (INVITE → ACK → BYE after a 2xx; INVITE →
//! final ≥ 300 → ACK otherwise); as the carrier (UAS) it answers 100/180/200 and 200 to the BYE.
//! Many calls are under way at once on one socket (or connection) per side, so it can offer far
//! more than SIPp. It never retransmits: a call without a final answer by the end is lost.
//!
//! Live view: one line per second (offered, reached the carrier, refused by code, answers
//! outstanding, latency p50/p99 from INVITE to its first answer). The summary is printed at the
//! end, and written as JSON with `--json`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::transport::batch::{self, RecvBatch};
use crate::transport::framing::{Frame, Framer};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadArgs {
    /// The gate's SIP address.
    pub gate: SocketAddr,
    /// Over TCP instead of UDP.
    pub tcp: bool,
    /// Target calls per second.
    pub cps: f64,
    /// How many calls (the duration decides when not given).
    pub calls: Option<u64>,
    /// Seconds of offered load (default 10 when `calls` is not given).
    pub duration: Option<f64>,
    /// Local address of the UAC (the PBX side).
    pub uac: SocketAddr,
    /// Local address of the UAS (the carrier side), when this tool plays the carrier too.
    pub uas: Option<SocketAddr>,
    /// How long to wait for late answers after the last INVITE.
    pub drain: Duration,
    /// Print the per-second lines.
    pub live: bool,
}

/// One second of the run, as the live view shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Second {
    /// Seconds since the start (1 = the first second).
    pub t: u64,
    /// INVITEs sent.
    pub offered: u64,
    /// INVITEs that reached the carrier (counted by the UAS; 0 without a UAS).
    pub reached: u64,
    /// Calls answered 2xx.
    pub answered: u64,
    /// Calls refused, by status code.
    pub refused: BTreeMap<u16, u64>,
    /// Median latency from INVITE to its first answer, ms.
    pub p50_ms: f64,
    /// 99th percentile of the same, ms.
    pub p99_ms: f64,
}

/// The result of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Target rate.
    pub target_cps: f64,
    /// Transport.
    pub transport: &'static str,
    /// Seconds from the first to the last INVITE.
    pub seconds: f64,
    /// INVITEs sent.
    pub offered: u64,
    /// Offered rate actually achieved.
    pub offered_cps: f64,
    /// INVITEs that reached the carrier (0 without a UAS).
    pub reached: u64,
    /// Calls answered 2xx.
    pub answered: u64,
    /// Calls whose BYE was answered 200.
    pub completed: u64,
    /// Calls refused, by status code.
    pub refused: BTreeMap<u16, u64>,
    /// Calls without a final answer by the end.
    pub lost: u64,
    /// Latency from INVITE to its first answer, ms.
    pub p50_ms: f64,
    /// 99th percentile of the same, ms.
    pub p99_ms: f64,
    /// Per second.
    pub per_second: Vec<Second>,
}

/// Where a side sends.
#[derive(Clone)]
enum Tx {
    Udp(Arc<UdpSocket>, SocketAddr),
    Tcp(mpsc::Sender<Bytes>),
}

impl Tx {
    async fn send(&self, data: Bytes) {
        match self {
            Tx::Udp(sock, to) => {
                let _ = sock.send_to(&data, *to).await;
            }
            Tx::Tcp(tx) => {
                let _ = tx.send(data).await;
            }
        }
    }
}

const FINAL_NONE: u64 = 0;

/// Shared run state: one slot per call (sent and first-answer times, final code), counters.
struct State {
    start: Instant,
    sent: Vec<AtomicU64>,
    first: Vec<AtomicU64>,
    finals: Vec<AtomicU64>,
    offered: AtomicU64,
    reached: AtomicU64,
    answered: AtomicU64,
    completed: AtomicU64,
    refused: Vec<AtomicU64>,
    latencies: std::sync::Mutex<Vec<u32>>,
    run: u64,
}

impl State {
    fn ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// The value of the first header named `name` (long form, case-insensitive).
fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    let head = msg.split("\r\n\r\n").next()?;
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn headers<'a>(msg: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let head = msg.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n").skip(1).filter_map(move |l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The call number in a Call-ID of this run (`load-<run>-<n>`).
fn call_number(msg: &str, run: u64) -> Option<usize> {
    let id = header(msg, "Call-ID")?;
    let rest = id.strip_prefix("load-")?;
    let (r, n) = rest.split_once('-')?;
    (r.parse::<u64>().ok()? == run).then_some(())?;
    n.parse().ok()
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn via(tcp: bool, local: SocketAddr, branch: &str) -> String {
    let t = if tcp { "TCP" } else { "UDP" };
    format!("Via: SIP/2.0/{t} {local};branch={branch};rport\r\n")
}

fn invite(args: &LoadArgs, local: SocketAddr, run: u64, n: usize) -> Bytes {
    let t = if args.tcp { ";transport=tcp" } else { "" };
    Bytes::from(format!(
        "INVITE sip:+15551234567@carrier.example SIP/2.0\r\n{}\
         Max-Forwards: 70\r\n\
         From: <sip:+15550001111@pbx.example>;tag=f{n}\r\n\
         To: <sip:+15551234567@carrier.example>\r\n\
         Call-ID: load-{run}-{n}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:load@{local}{t}>\r\n\
         Content-Length: 0\r\n\r\n",
        via(args.tcp, local, &format!("z9hG4bK-{run}-{n}"))
    ))
}

/// The ACK of a non-2xx answer (same branch, hop by hop) or the ACK/BYE of a 2xx (routed by the
/// Record-Route set to the answerer's Contact).
fn in_dialog(args: &LoadArgs, local: SocketAddr, resp: &str, method: &str, n: usize) -> Bytes {
    let run_branch = header(resp, "Via")
        .and_then(|v| v.split(";branch=").nth(1))
        .map(|b| b.split(';').next().unwrap_or(b).to_owned())
        .unwrap_or_default();
    let to = header(resp, "To").unwrap_or_default();
    let from = header(resp, "From").unwrap_or_default();
    let call_id = header(resp, "Call-ID").unwrap_or_default();
    let two_xx = resp.as_bytes().get(8) == Some(&b'2');
    let (ruri, branch, routes, cseq) = if two_xx {
        let contact = header(resp, "Contact").unwrap_or_default();
        let ruri = contact
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap_or_default()
            .to_owned();
        // RFC 3261 §12.1.2: the UAC's route set is the Record-Route list in reverse.
        let mut rr: Vec<&str> = headers(resp, "Record-Route")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        rr.reverse();
        let routes: String = rr.iter().map(|r| format!("Route: {r}\r\n")).collect();
        let cseq = if method == "BYE" { 2 } else { 1 };
        (ruri, format!("z9hG4bK-{method}-{n}"), routes, cseq)
    } else {
        (
            "sip:+15551234567@carrier.example".to_owned(),
            run_branch,
            String::new(),
            1,
        )
    };
    Bytes::from(format!(
        "{method} {ruri} SIP/2.0\r\n{}{routes}Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\n\
         Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n",
        via(args.tcp, local, &branch)
    ))
}

/// A response to `req` (Via, Record-Route, From, To with our tag, Call-ID, CSeq copied).
fn respond(req: &str, code: u16, reason: &str, contact: Option<&str>) -> Bytes {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for name in ["Via", "Record-Route"] {
        for v in headers(req, name) {
            out.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    for name in ["From", "Call-ID", "CSeq"] {
        if let Some(v) = header(req, name) {
            out.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    let to = header(req, "To").unwrap_or_default();
    if to.contains(";tag=") {
        out.push_str(&format!("To: {to}\r\n"));
    } else {
        out.push_str(&format!("To: {to};tag=uas\r\n"));
    }
    if let Some(c) = contact {
        out.push_str(&format!("Contact: <{c}>\r\n"));
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    Bytes::from(out)
}

/// The carrier: answer INVITEs 100/180/200, BYEs 200 (into `out`); absorb ACKs.
fn uas_message(state: &State, msg: &str, contact: &str, out: &mut Vec<Bytes>) {
    let method = msg.split(' ').next().unwrap_or_default();
    match method {
        "INVITE" => {
            state.reached.fetch_add(1, Ordering::Relaxed);
            out.push(respond(msg, 100, "Trying", None));
            out.push(respond(msg, 180, "Ringing", Some(contact)));
            out.push(respond(msg, 200, "OK", Some(contact)));
        }
        "BYE" => out.push(respond(msg, 200, "OK", None)),
        _ => {}
    }
}

/// The PBX side: note the answers, and put the ACK (and BYE) each call needs into `out`.
fn uac_message(state: &State, args: &LoadArgs, local: SocketAddr, msg: &str, out: &mut Vec<Bytes>) {
    let Some(code) = msg
        .strip_prefix("SIP/2.0 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
    else {
        return;
    };
    let Some(n) = call_number(msg, state.run).filter(|n| *n < state.sent.len()) else {
        return;
    };
    let method = header(msg, "CSeq")
        .and_then(|c| c.split_whitespace().nth(1))
        .unwrap_or_default();
    if method == "BYE" {
        if code == 200 {
            state.completed.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    if method != "INVITE" {
        return;
    }
    let now = state.ns();
    if state.first[n]
        .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
    {
        let sent = state.sent[n].load(Ordering::Acquire);
        let us = now.saturating_sub(sent) / 1000;
        if let Ok(mut l) = state.latencies.lock() {
            l.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }
    if code < 200
        || state.finals[n]
            .compare_exchange(
                FINAL_NONE,
                u64::from(code),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
    {
        return;
    }
    if code < 300 {
        state.answered.fetch_add(1, Ordering::Relaxed);
        out.push(in_dialog(args, local, msg, "ACK", n));
        out.push(in_dialog(args, local, msg, "BYE", n));
    } else {
        if let Some(c) = state.refused.get(usize::from(code)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        out.push(in_dialog(args, local, msg, "ACK", n));
    }
}

/// One UDP side: read datagrams in batches, let `handle` put what each calls for into the
/// out list, and send the batch's list together.
async fn udp_side(
    sock: Arc<UdpSocket>,
    mut handle: impl FnMut(&str, SocketAddr, &mut Vec<(SocketAddr, Bytes)>) + Send,
) {
    let mut batch = RecvBatch::new(65_535);
    let mut out = Vec::new();
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let n = match batch.recv(&sock) {
            Ok(n) => n,
            // Nothing after all, or an ICMP error of an earlier send: read on.
            Err(_) => continue,
        };
        for i in 0..n {
            let (data, from) = batch.get(i);
            handle(&String::from_utf8_lossy(data), from, &mut out);
        }
        let sent = batch::send(&sock, &out, |_, _| {});
        for (to, data) in &out[sent.done..] {
            let _ = sock.send_to(data, *to).await;
        }
        out.clear();
    }
}

/// Read a TCP stream into messages for `handle`.
async fn read_stream(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut handle: impl FnMut(Bytes) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut framer = Framer::default();
    loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while let Ok(Some(frame)) = framer.next_frame(&mut buf, 65_535) {
            if let Frame::Message(m) = frame {
                handle(m).await;
            }
        }
    }
}

fn writer(mut wr: tokio::net::tcp::OwnedWriteHalf) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(65_536);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = BytesMut::from(&first[..]);
            while let Ok(more) = rx.try_recv() {
                batch.extend_from_slice(&more);
                if batch.len() > 256 * 1024 {
                    break;
                }
            }
            if wr.write_all(&batch).await.is_err() {
                return;
            }
        }
    });
    tx
}

/// Run the load. Returns the summary (also printed by the command).
pub async fn run(args: LoadArgs) -> anyhow::Result<Summary> {
    let duration = args.duration.unwrap_or(10.0);
    let total = args
        .calls
        .unwrap_or_else(|| (args.cps * duration).round() as u64)
        .max(1);
    let total_usize = usize::try_from(total)?;
    let slots = |_| AtomicU64::new(0);
    let state = Arc::new(State {
        start: Instant::now(),
        sent: (0..total_usize).map(slots).collect(),
        first: (0..total_usize).map(slots).collect(),
        finals: (0..total_usize).map(slots).collect(),
        offered: AtomicU64::new(0),
        reached: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        refused: (0..700).map(|_| AtomicU64::new(0)).collect(),
        latencies: std::sync::Mutex::new(Vec::new()),
        run: u64::from(std::process::id()) << 16 | u64::from(rand_u16()),
    });
    let args = Arc::new(args);

    // The carrier side first, so the first INVITE finds it.
    if let Some(uas) = args.uas {
        let contact = format!(
            "sip:uas@{uas}{}",
            if args.tcp { ";transport=tcp" } else { "" }
        );
        if args.tcp {
            let l = TcpListener::bind(uas).await?;
            let (state, contact) = (state.clone(), contact.clone());
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    let (rd, wr) = s.into_split();
                    let tx = Tx::Tcp(writer(wr));
                    let (state, contact) = (state.clone(), contact.clone());
                    tokio::spawn(read_stream(rd, move |m| {
                        let (state, tx, contact) = (state.clone(), tx.clone(), contact.clone());
                        Box::pin(async move {
                            let mut out = Vec::new();
                            uas_message(&state, &String::from_utf8_lossy(&m), &contact, &mut out);
                            for m in out {
                                tx.send(m).await;
                            }
                        })
                    }));
                }
            });
        } else {
            let sock = Arc::new(bind_udp(uas)?);
            let state = state.clone();
            let mut answers = Vec::new();
            tokio::spawn(udp_side(sock, move |msg, from, out| {
                uas_message(&state, msg, &contact, &mut answers);
                out.extend(answers.drain(..).map(|a| (from, a)));
            }));
        }
    }

    // The PBX side.
    let (tx, local) = if args.tcp {
        let s = TcpStream::connect(args.gate).await?;
        s.set_nodelay(true)?;
        let local = s.local_addr()?;
        let (rd, wr) = s.into_split();
        let tx = Tx::Tcp(writer(wr));
        let (st, a, t) = (state.clone(), args.clone(), tx.clone());
        tokio::spawn(read_stream(rd, move |m| {
            let (st, a, t) = (st.clone(), a.clone(), t.clone());
            Box::pin(async move {
                let mut out = Vec::new();
                uac_message(&st, &a, local, &String::from_utf8_lossy(&m), &mut out);
                for m in out {
                    t.send(m).await;
                }
            })
        }));
        (tx, local)
    } else {
        let sock = Arc::new(bind_udp(args.uac)?);
        let local = sock.local_addr()?;
        let tx = Tx::Udp(sock.clone(), args.gate);
        let (st, a, gate) = (state.clone(), args.clone(), args.gate);
        let reader = sock.clone();
        let mut requests = Vec::new();
        tokio::spawn(udp_side(reader, move |msg, _, out| {
            uac_message(&st, &a, local, msg, &mut requests);
            out.extend(requests.drain(..).map(|r| (gate, r)));
        }));
        (tx, local)
    };

    // The live view.
    let per_second = Arc::new(std::sync::Mutex::new(Vec::<Second>::new()));
    let ticker = {
        let (state, per_second, live) = (state.clone(), per_second.clone(), args.live);
        tokio::spawn(async move {
            let mut last = Second::default();
            let mut last_refused = vec![0u64; 700];
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            for t in 1.. {
                tick.tick().await;
                let mut lat = state
                    .latencies
                    .lock()
                    .map(|mut l| std::mem::take(&mut *l))
                    .unwrap_or_default();
                lat.sort_unstable();
                let now = Second {
                    t,
                    offered: state.offered.load(Ordering::Relaxed),
                    reached: state.reached.load(Ordering::Relaxed),
                    answered: state.answered.load(Ordering::Relaxed),
                    refused: BTreeMap::new(),
                    p50_ms: percentile(&lat, 0.5),
                    p99_ms: percentile(&lat, 0.99),
                };
                let mut refused = BTreeMap::new();
                for (code, c) in state.refused.iter().enumerate() {
                    let v = c.load(Ordering::Relaxed);
                    if v > last_refused[code] {
                        refused.insert(code as u16, v - last_refused[code]);
                    }
                    last_refused[code] = v;
                }
                let second = Second {
                    t,
                    offered: now.offered - last.offered,
                    reached: now.reached - last.reached,
                    answered: now.answered - last.answered,
                    refused,
                    p50_ms: now.p50_ms,
                    p99_ms: now.p99_ms,
                };
                if live {
                    let finals: u64 = now.answered
                        + state
                            .refused
                            .iter()
                            .map(|c| c.load(Ordering::Relaxed))
                            .sum::<u64>();
                    println!(
                        "{t:>4}s  offered {:>7}  reached {:>7}  answered {:>7}  refused {:<18} outstanding {:>6}  p50 {:>7.3} ms  p99 {:>7.3} ms",
                        second.offered,
                        second.reached,
                        second.answered,
                        format!("{:?}", second.refused),
                        now.offered.saturating_sub(finals),
                        second.p50_ms,
                        second.p99_ms
                    );
                }
                if let Ok(mut p) = per_second.lock() {
                    p.push(second);
                }
                last = now;
            }
        })
    };

    // Offer the calls: call n is due at n / cps.
    let interval = Duration::from_secs_f64(1.0 / args.cps);
    let mut n = 0usize;
    while n < total_usize {
        let due = ((state.start.elapsed().as_secs_f64() * args.cps) as usize + 1).min(total_usize);
        while n < due {
            state.sent[n].store(state.ns(), Ordering::Release);
            tx.send(invite(&args, local, state.run, n)).await;
            state.offered.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
        if n < total_usize {
            tokio::time::sleep(interval.min(Duration::from_millis(1))).await;
        }
    }
    let seconds = state.start.elapsed().as_secs_f64();
    // Late answers.
    let deadline = Instant::now() + args.drain;
    while Instant::now() < deadline {
        let decided = state
            .finals
            .iter()
            .filter(|f| f.load(Ordering::Relaxed) != FINAL_NONE)
            .count();
        let done = state.completed.load(Ordering::Relaxed)
            + state
                .refused
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u64>();
        if decided == total_usize && done >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ticker.abort();
    let mut lat: Vec<u32> = state
        .sent
        .iter()
        .zip(&state.first)
        .filter_map(|(s, f)| {
            let (s, f) = (s.load(Ordering::Relaxed), f.load(Ordering::Relaxed));
            (f != 0).then(|| u32::try_from(f.saturating_sub(s) / 1000).unwrap_or(u32::MAX))
        })
        .collect();
    lat.sort_unstable();
    let refused: BTreeMap<u16, u64> = state
        .refused
        .iter()
        .enumerate()
        .filter_map(|(code, c)| {
            let v = c.load(Ordering::Relaxed);
            (v > 0).then_some((code as u16, v))
        })
        .collect();
    let lost = state
        .finals
        .iter()
        .filter(|f| f.load(Ordering::Relaxed) == FINAL_NONE)
        .count() as u64;
    let offered = state.offered.load(Ordering::Relaxed);
    Ok(Summary {
        target_cps: args.cps,
        transport: if args.tcp { "tcp" } else { "udp" },
        seconds,
        offered,
        offered_cps: offered as f64 / seconds.max(1e-9),
        reached: state.reached.load(Ordering::Relaxed),
        answered: state.answered.load(Ordering::Relaxed),
        completed: state.completed.load(Ordering::Relaxed),
        refused,
        lost,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        per_second: per_second.lock().map(|p| p.clone()).unwrap_or_default(),
    })
}

fn rand_u16() -> u16 {
    use std::hash::BuildHasher;
    (std::collections::hash_map::RandomState::new().hash_one(0u8) & 0xffff) as u16
}

/// A UDP socket with 4 MiB buffers (as far as the kernel allows): at tens of thousands of
/// messages a second the default 208 KiB overflows while the tool's task waits its turn, and the
/// drops would be counted against the gate.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(LOAD_SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(LOAD_SOCKET_BUFFER);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

const LOAD_SOCKET_BUFFER: usize = 4 << 20;
