//! Round trips through the decision core: a request is forwarded with only the RFC 3261 §16.6
//! edits (our Via, Max-Forwards, Record-Route, received/rport on the received top Via) and every
//! other byte intact; the response to the forwarded request comes back with exactly our Via
//! removed (§16.7 step 3). Messages are split into lines here, without the scanner, so the checks
//! do not share its assumptions.

use proptest::prelude::*;

use cpsgate::proxy::{Action, NextHop, Outbound, Proxy};
use cpsgate::sip::{HeaderName, Message};

use crate::torture::{CARRIER, CLIENT, addr, describe, is_subsequence, proxy};

/// A CRLF message split without the scanner.
struct Split<'a> {
    start: &'a [u8],
    /// Header lines, continuation lines folded in, each with its CRLF.
    lines: Vec<&'a [u8]>,
    body: &'a [u8],
}

fn split(raw: &[u8]) -> Split<'_> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("message has an empty line")
        + 2;
    let line_end = |from: usize| -> usize {
        raw[from..end]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(end, |i| from + i + 2)
    };
    let start_end = line_end(0);
    let mut lines: Vec<&[u8]> = Vec::new();
    let (mut pos, mut cur) = (start_end, start_end);
    while pos < end {
        let next = line_end(pos);
        if pos > cur && !matches!(raw[pos], b' ' | b'\t') {
            lines.push(&raw[cur..pos]);
            cur = pos;
        }
        pos = next;
    }
    if end > cur {
        lines.push(&raw[cur..end]);
    }
    Split {
        start: &raw[..start_end],
        lines,
        body: &raw[end + 2..],
    }
}

/// The canonical (lower-case, compact forms expanded) name of a header line.
fn line_name(line: &[u8]) -> String {
    let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
    let name = String::from_utf8_lossy(&line[..colon])
        .trim()
        .to_ascii_lowercase();
    match name.as_str() {
        "v" => "via".to_owned(),
        "f" => "from".to_owned(),
        "t" => "to".to_owned(),
        "i" => "call-id".to_owned(),
        "l" => "content-length".to_owned(),
        "m" => "contact".to_owned(),
        _ => name,
    }
}

fn is_our_via(line: &[u8]) -> bool {
    line.starts_with(b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKcg")
}

/// A 200 OK to `fwd` built the way a UAS does (RFC 3261 §8.2.6.2): its Via lines in order, From,
/// To with a tag, Call-ID and CSeq, then `extra` lines and `body`.
fn response_to(fwd: &[u8], extra: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let s = split(fwd);
    let mut out = b"SIP/2.0 200 OK\r\n".to_vec();
    for l in &s.lines {
        match line_name(l).as_str() {
            "via" | "from" | "call-id" | "cseq" => out.extend_from_slice(l),
            "to" => {
                let l = &l[..l.len() - 2];
                out.extend_from_slice(l);
                if !String::from_utf8_lossy(l)
                    .to_ascii_lowercase()
                    .contains(";tag=")
                {
                    out.extend_from_slice(b";tag=carrier-77");
                }
                out.extend_from_slice(b"\r\n");
            }
            _ => {}
        }
    }
    for l in extra {
        out.extend_from_slice(l);
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// `raw` without the first line for which `pred` holds.
fn without_line(raw: &[u8], pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let s = split(raw);
    let mut out = s.start.to_vec();
    let mut removed = false;
    for l in &s.lines {
        if !removed && pred(l) {
            removed = true;
            continue;
        }
        out.extend_from_slice(l);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(s.body);
    out
}

fn forward(p: &Proxy, raw: &[u8], source: &str) -> Outbound {
    match crate::torture::handle_from(p, raw, source) {
        Action::Forward(o) => o,
        other => panic!(
            "expected a forward, got {}\n{}",
            describe(&other),
            String::from_utf8_lossy(raw)
        ),
    }
}

fn binary_body() -> Vec<u8> {
    let mut b: Vec<u8> = (0..=255u8).collect();
    b.extend_from_slice(b"\r\n\r\nINVITE sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP evil\r\n\r\n");
    b.extend_from_slice(b"\0\0\0\r\n\0\r\r\n\n");
    b.extend((0..=255u8).rev());
    b
}

const TOP_VIA: &[u8] = b"Via: SIP/2.0/UDP 10.0.0.5:5070;branch=z9hG4bK-rt-top;rport\r\n";
const TOP_VIA_AFTER: &[u8] =
    b"Via: SIP/2.0/UDP 10.0.0.5:5070;branch=z9hG4bK-rt-top;rport=5070;received=127.0.0.1\r\n";

fn odd_invite() -> (Vec<Vec<u8>>, Vec<u8>) {
    let body = binary_body();
    let lines: Vec<Vec<u8>> = vec![
        TOP_VIA.to_vec(),
        b"v: SIP/2.0/TCP 10.0.0.9:5062;branch=z9hG4bK-rt-below , SIP/2.0/UDP 10.0.0.10;branch=z9hG4bK-rt-bottom\r\n".to_vec(),
        b"Max-Forwards: 70\r\n".to_vec(),
        b"f: \"Alice\" <sip:alice@pbx.example.com>;tag=a1\r\n".to_vec(),
        b"t: <sip:+15551234567@carrier.example.com>\r\n".to_vec(),
        b"i: rt-binary-1@pbx.example.com\r\n".to_vec(),
        b"CSeq: 1 INVITE\r\n".to_vec(),
        b"m: <sip:alice@10.0.0.5:5070>\r\n".to_vec(),
        b"Subject: first part\r\n  second part\r\n\tthird part\r\n".to_vec(),
        b"X-Odd: \xff\xfe\x80 caf\xe9 \x01\x7f \xc3\x28 end\r\n".to_vec(),
        b"s: compact subject\r\n".to_vec(),
        b"k: timer, 100rel\r\n".to_vec(),
        b"c: application/octet-stream\r\n".to_vec(),
        format!("l: {}\r\n", body.len()).into_bytes(),
    ];
    let mut raw = b"INVITE sip:+15551234567@carrier.example.com SIP/2.0\r\n".to_vec();
    for l in &lines {
        raw.extend_from_slice(l);
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(&body);
    (lines, raw)
}

#[test]
fn odd_invite_is_forwarded_with_every_other_byte_intact() {
    let p = proxy();
    let (lines, raw) = odd_invite();
    let out = forward(&p, &raw, CLIENT);
    assert_eq!(
        out.to,
        NextHop::Addr(addr(CARRIER)),
        "unknown source goes to the carrier"
    );
    let o = split(&out.data);
    let orig = split(&raw);
    assert_eq!(o.start, orig.start, "start line unchanged");
    assert_eq!(o.body, &binary_body()[..], "body byte-identical");
    assert!(
        is_our_via(o.lines[0]),
        "our Via on top: {:?}",
        String::from_utf8_lossy(o.lines[0])
    );
    assert_eq!(
        o.lines[1], TOP_VIA_AFTER,
        "received top Via gains rport=<source port> and received=<source ip>, nothing else"
    );
    assert!(
        o.lines.contains(&&b"Max-Forwards: 69\r\n"[..]),
        "Max-Forwards decremented"
    );
    // Every other line unchanged and in order.
    let kept: Vec<&[u8]> = lines
        .iter()
        .map(Vec::as_slice)
        .filter(|l| *l != TOP_VIA && !l.starts_with(b"Max-Forwards"))
        .collect();
    assert!(
        is_subsequence(&kept, &o.lines),
        "header lines changed or reordered:\n{}",
        String::from_utf8_lossy(&out.data)
    );
    // Undo exactly the allowed edits: the result is the original message, byte for byte.
    let mut undone = o.start.to_vec();
    for l in &o.lines {
        // Ours: the Via and the Record-Route of a dialog-creating request (§16.6 step 4).
        if is_our_via(l) || l.starts_with(b"Record-Route: <sip:127.0.0.1:5060;lr;cg=") {
            continue;
        }
        match *l {
            l if l == TOP_VIA_AFTER => undone.extend_from_slice(TOP_VIA),
            b"Max-Forwards: 69\r\n" => undone.extend_from_slice(b"Max-Forwards: 70\r\n"),
            l => undone.extend_from_slice(l),
        }
    }
    undone.extend_from_slice(b"\r\n");
    undone.extend_from_slice(o.body);
    assert!(
        undone == raw,
        "forwarded message differs beyond the §16.6 edits:\n{}",
        String::from_utf8_lossy(&out.data)
    );
    // The scanner agrees on the framing of what we send.
    let m = Message::scan(&out.data).expect("forwarded scans");
    assert_eq!(m.defect(), None);
    assert_eq!(m.body(), &binary_body()[..]);
}

#[test]
fn response_to_the_forwarded_invite_loses_only_our_via() {
    let p = proxy();
    let (_, raw) = odd_invite();
    let fwd = forward(&p, &raw, CLIENT);
    let body = binary_body();
    let resp = response_to(
        &fwd.data,
        &[
            b"m: <sip:+15551234567@198.51.100.7:5060>\r\n",
            b"X-Odd: \xff\x00\xfe trailing\r\n",
            b"c: application/octet-stream\r\n",
        ],
        &body,
    );
    let back = forward(&p, &resp, CARRIER);
    // rport=5070 and received=127.0.0.1 on the PBX's Via (RFC 3581 §4).
    assert_eq!(
        back.to,
        NextHop::Addr(addr(CLIENT)),
        "response goes back to the PBX"
    );
    assert_eq!(back.transport, cpsgate::sip::Transport::Udp);
    let want = without_line(&resp, is_our_via);
    assert_ne!(want, resp, "the built response carries our Via");
    assert!(
        back.data[..] == want[..],
        "response changed beyond the removal of our Via:\n--- want\n{}\n--- got\n{}",
        String::from_utf8_lossy(&want),
        String::from_utf8_lossy(&back.data)
    );
    let m = Message::scan(&back.data).expect("scans");
    assert_eq!(m.body(), &body[..]);
    assert_eq!(cpsgate::sip::elements(&m, HeaderName::Via).len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Property: requests generated from parts.

#[derive(Debug, Clone)]
struct ViaSpec {
    name: &'static str,
    transport: &'static str,
    host: String,
    port: u16,
    branch: String,
    rport: bool,
    /// Written on the same line as the previous value, after a comma.
    joined: bool,
}

impl ViaSpec {
    fn value(&self) -> String {
        format!(
            "SIP/2.0/{} {}:{};branch=z9hG4bK{}{}",
            self.transport,
            self.host,
            self.port,
            self.branch,
            if self.rport { ";rport" } else { "" }
        )
    }
}

#[derive(Debug, Clone)]
struct Parts {
    method: &'static str,
    vias: Vec<ViaSpec>,
    via_pos: usize,
    names: [&'static str; 4],
    call_id: String,
    cseq: u32,
    to_tag: Option<String>,
    max_forwards: Option<u8>,
    extra: Vec<String>,
    content_length: Option<&'static str>,
    body: Vec<u8>,
}

fn via_spec() -> impl Strategy<Value = ViaSpec> {
    (
        prop::sample::select(vec!["Via", "v", "VIA", "via", "V"]),
        prop::sample::select(vec!["UDP", "TCP", "udp", "tcp"]),
        prop_oneof![
            "[a-z]{1,10}(\\.[a-z]{2,8}){0,2}",
            (1u8..=223, any::<u8>(), any::<u8>(), 1u8..=254)
                .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        ],
        (1024u16..=65535).prop_filter("not the proxy's port", |p| *p != 5060),
        "[A-Za-z0-9.!%*_+`'~-]{1,16}",
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(name, transport, host, port, branch, rport, joined)| ViaSpec {
                name,
                transport,
                host,
                port,
                branch,
                rport,
                joined,
            },
        )
}

fn extra_line() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            "X-[A-Za-z0-9-]{1,12}",
            prop::sample::select(vec![
                "s", "k", "c", "e", "o", "u", "m", "a", "b", "j", "r", "x", "y", "d", "n", "S",
                "K", "C",
            ])
            .prop_map(str::to_owned),
            prop::sample::select(vec![
                "Subject",
                "User-Agent",
                "Allow",
                "Supported",
                "Accept",
                "P-Asserted-Identity",
                "Diversion",
                "Contact",
                "Content-Type",
            ])
            .prop_map(str::to_owned),
        ],
        prop::sample::select(vec![":", ": ", " : ", ":\t", "  :  "]),
        "[ -~]{0,40}",
        proptest::option::of("[!-~][ -~]{0,20}"),
    )
        .prop_map(|(name, sep, value, cont)| {
            let mut line = format!("{name}{sep}{value}");
            if let Some(c) = cont {
                line.push_str("\r\n ");
                line.push_str(&c);
            }
            line.push_str("\r\n");
            line
        })
}

fn parts() -> impl Strategy<Value = Parts> {
    (
        prop::sample::select(vec![
            "INVITE",
            "OPTIONS",
            "MESSAGE",
            "REGISTER",
            "INFO",
            "UPDATE",
            "ACK",
            "BYE",
            "CANCEL",
            "SUBSCRIBE",
            "NOTIFY",
            "PUBLISH",
            "X-CUSTOM",
        ]),
        prop::collection::vec(via_spec(), 1..=4),
        any::<usize>(),
        (
            prop::sample::select(vec!["From", "f", "FROM"]),
            prop::sample::select(vec!["To", "t", "to"]),
            prop::sample::select(vec!["Call-ID", "i", "call-id", "Call-Id"]),
            prop::sample::select(vec!["CSeq", "cseq", "CSEQ"]),
        ),
        "[A-Za-z0-9.!%*_+`'~()<>:\\\\\"/\\[\\]?{}-]{1,30}(@[a-z0-9.]{1,20})?",
        0u32..(1 << 31),
        proptest::option::of("[A-Za-z0-9.-]{1,12}"),
        proptest::option::of(1u8..=255),
        prop::collection::vec(extra_line(), 0..6).prop_shuffle(),
        prop::sample::select(vec![
            None,
            Some("Content-Length"),
            Some("l"),
            Some("content-length"),
        ]),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(
                method,
                vias,
                via_pos,
                names,
                call_id,
                cseq,
                to_tag,
                max_forwards,
                extra,
                cl,
                body,
            )| {
                Parts {
                    method,
                    vias,
                    via_pos,
                    names: [names.0, names.1, names.2, names.3],
                    call_id,
                    cseq,
                    to_tag,
                    max_forwards,
                    extra,
                    content_length: cl,
                    body,
                }
            },
        )
}

impl Parts {
    /// The Via block: lines of one or more comma-joined values.
    fn via_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        for (i, v) in self.vias.iter().enumerate() {
            match lines.last_mut() {
                Some(l) if v.joined && i > 0 => {
                    l.push_str(" , ");
                    l.push_str(&v.value());
                }
                _ => lines.push(format!("{}: {}", v.name, v.value())),
            }
        }
        lines.into_iter().map(|l| l + "\r\n").collect()
    }

    /// All header lines in message order; index of the first Via line.
    fn lines(&self) -> (Vec<String>, usize) {
        let [from, to, call_id, cseq] = self.names;
        let mut other = vec![
            format!("{from}: <sip:alice@pbx.example.com>;tag=pf1\r\n"),
            match &self.to_tag {
                Some(t) => format!("{to}: <sip:bob@carrier.example.com>;tag={t}\r\n"),
                None => format!("{to}: <sip:bob@carrier.example.com>\r\n"),
            },
            format!("{call_id}: {}\r\n", self.call_id),
            format!("{cseq}: {} {}\r\n", self.cseq, self.method),
        ];
        if let Some(n) = self.max_forwards {
            other.push(format!("Max-Forwards: {n}\r\n"));
        }
        other.extend(self.extra.iter().cloned());
        if let Some(cl) = self.content_length {
            other.push(format!("{cl}: {}\r\n", self.body.len()));
        }
        let at = self.via_pos % (other.len() + 1);
        other.splice(at..at, self.via_lines());
        (other, at)
    }

    fn build(&self) -> (Vec<u8>, Vec<String>, usize) {
        let (lines, top) = self.lines();
        let mut raw =
            format!("{} sip:bob@carrier.example.com SIP/2.0\r\n", self.method).into_bytes();
        for l in &lines {
            raw.extend_from_slice(l.as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(&self.body);
        (raw, lines, top)
    }

    /// Where the response must go: the top Via's received (127.0.0.1: the source is never the
    /// generated sent-by, or it is 127.0.0.1 itself) and rport (UDP) or sent-by port.
    fn response_destination(&self) -> NextHop {
        let v = &self.vias[0];
        let port = if v.rport && v.transport.eq_ignore_ascii_case("udp") {
            addr(CLIENT).port()
        } else {
            v.port
        };
        NextHop::Addr(std::net::SocketAddr::new(addr(CLIENT).ip(), port))
    }
}

fn check_round_trip(p: &Proxy, parts: &Parts) -> Result<(), TestCaseError> {
    let (raw, lines, top) = parts.build();
    let shown = || String::from_utf8_lossy(&raw).into_owned();
    let action = crate::torture::handle_from(p, &raw, CLIENT);
    let Action::Forward(out) = action else {
        return Err(TestCaseError::fail(format!(
            "not forwarded: {}\n{}",
            describe(&action),
            shown()
        )));
    };
    prop_assert_eq!(&out.to, &NextHop::Addr(addr(CARRIER)));
    let m = Message::scan(&out.data)
        .map_err(|e| TestCaseError::fail(format!("forwarded does not scan: {e}")))?;
    prop_assert_eq!(m.defect(), None, "forwarded has a defect:\n{}", shown());
    prop_assert_eq!(m.body(), &parts.body[..], "scanner body differs");
    let o = split(&out.data);
    prop_assert_eq!(o.body, &parts.body[..], "body differs");
    prop_assert!(o.lines.iter().any(|l| is_our_via(l)), "no Via of ours");
    // Every non-Via, non-Max-Forwards, non-Record-Route line verbatim and in order; the Via
    // lines below the received top one, too.
    let kept: Vec<&[u8]> = lines
        .iter()
        .enumerate()
        .filter(|(i, l)| {
            let name = line_name(l.as_bytes());
            *i != top && name != "max-forwards" && name != "record-route"
        })
        .map(|(_, l)| l.as_bytes())
        .collect();
    prop_assert!(
        is_subsequence(&kept, &o.lines),
        "input lines not forwarded verbatim:\n{}\n--- out\n{}",
        shown(),
        String::from_utf8_lossy(&out.data)
    );
    let mf = o
        .lines
        .iter()
        .find(|l| line_name(l) == "max-forwards")
        .map(|l| String::from_utf8_lossy(l).into_owned());
    let want_mf = format!(
        "Max-Forwards: {}\r\n",
        parts.max_forwards.map_or(70, |n| n - 1)
    );
    prop_assert_eq!(mf.as_deref(), Some(want_mf.as_str()));

    // The response to what we sent comes back with our Via popped, nothing else changed.
    let resp = response_to(&out.data, &[b"X-Back: yes\r\n"], &parts.body);
    let action = crate::torture::handle_from(p, &resp, CARRIER);
    let Action::Forward(back) = action else {
        return Err(TestCaseError::fail(format!(
            "response not forwarded: {}\n{}",
            describe(&action),
            String::from_utf8_lossy(&resp)
        )));
    };
    prop_assert_eq!(&back.to, &parts.response_destination());
    let want = without_line(&resp, is_our_via);
    prop_assert!(
        back.data[..] == want[..],
        "response changed beyond our Via:\n--- want\n{}\n--- got\n{}",
        String::from_utf8_lossy(&want),
        String::from_utf8_lossy(&back.data)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_requests_round_trip(parts in parts()) {
        let p = proxy();
        check_round_trip(&p, &parts)?;
    }
}
