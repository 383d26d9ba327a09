//! RFC 4475 torture messages (`tests/torture/*.dat`, exact bytes) through the scanner, the header
//! views and the decision core, checked against what the RFC expects (`expected.tsv`).
//!
//! One table-driven test reports every message that is not handled as the RFC says, in one panic
//! message (name, expected, got, details), so a single run shows the whole picture.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use cpsgate::config::Config;
use cpsgate::proxy::{Action, DropReason, Inbound, LocalListener, NextHop, Outbound, Proxy};
use cpsgate::sip::{HeaderName, Message, NameAddr, Transport, Via, elements, header};

/// The proxy configuration every core test in this module (and the differential and round-trip
/// modules) uses: unknown sources are forwarded to the carrier.
pub(crate) const CONFIG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"
[proxy]
unknown_sources = "forward"
default_upstream = "carrier"
[pbx]
address = "127.0.0.1:5090"
[[upstream]]
name = "carrier"
address = "127.0.0.1:5080"
sources = ["127.0.0.1:5080"]
"#;

/// Where the torture messages come from (an unknown source: the PBX side).
pub(crate) const CLIENT: &str = "127.0.0.1:5070";
/// The configured carrier.
pub(crate) const CARRIER: &str = "127.0.0.1:5080";

/// Our branch prefix (RFC 3261 magic cookie + the proxy's marker).
pub(crate) const OUR_BRANCH: &[u8] = b"z9hG4bKcg";

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

/// The core built from [`CONFIG`] with one UDP+TCP listener on 127.0.0.1:5060.
pub(crate) fn proxy() -> Proxy {
    let cfg = Config::parse(CONFIG, "test").unwrap_or_else(|e| panic!("test config: {e}"));
    Proxy::new(
        &cfg,
        vec![LocalListener {
            bound: addr("127.0.0.1:5060"),
            host: "127.0.0.1".into(),
            port: 5060,
            udp: true,
            tcp: true,
        }],
    )
    .expect("proxy builds from the test config")
}

/// Hand `data` to the core as a UDP datagram from `source` on listener 0.
pub(crate) fn handle_from(p: &Proxy, data: &[u8], source: &str) -> Action {
    p.handle(
        Instant::now(),
        &Inbound {
            data,
            source: addr(source),
            transport: Transport::Udp,
            listener: 0,
            conn: None,
        },
    )
}

pub(crate) fn torture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/torture")
}

/// `(name, verdict, note)` rows of `expected.tsv`, in file order.
pub(crate) fn expected_rows() -> Vec<(String, String, String)> {
    let path = torture_dir().join("expected.tsv");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut cols = l.splitn(3, '\t');
            let mut col = || cols.next().unwrap_or_default().to_owned();
            (col(), col(), col())
        })
        .collect()
}

/// Every torture message named in `expected.tsv`, exact bytes.
pub(crate) fn torture_messages() -> Vec<(String, Vec<u8>)> {
    expected_rows()
        .into_iter()
        .map(|(name, _, _)| {
            let path = torture_dir().join(format!("{name}.dat"));
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (name, bytes)
        })
        .collect()
}

/// A one-line description of an action for failure messages.
pub(crate) fn describe(a: &Action) -> String {
    match a {
        Action::Forward(o) => format!("Forward to {:?} over {:?}", o.to, o.transport),
        Action::Reply(code, o) => {
            let first = o.data.split(|&b| b == b'\r').next().unwrap_or_default();
            format!("Reply {code} ({:?})", String::from_utf8_lossy(first))
        }
        Action::Reject(r, _) => format!("Reject at the {} stage", r.stage.as_str()),
        Action::Queue(_) => "Queue".to_owned(),
        Action::Cancelled(..) => "Cancelled".to_owned(),
        Action::Consult(c) => format!("Consult {} shared bucket(s)", c.buckets.len()),
        Action::Absorb => "Absorb".to_owned(),
        Action::Drop(r) => format!("Drop({r:?})"),
    }
}

/// Every header line (continuations included) of a message, in order.
pub(crate) fn header_lines<'a>(m: &Message<'a>) -> Vec<&'a [u8]> {
    m.headers()
        .iter()
        .map(|h| m.slice(h.line.clone()))
        .collect()
}

/// True when `needles` occur in `hay` in the same order (not necessarily adjacent).
pub(crate) fn is_subsequence(needles: &[&[u8]], hay: &[&[u8]]) -> bool {
    let mut it = hay.iter();
    needles.iter().all(|n| it.any(|h| h == n))
}

/// What the RFC (and the proxy role) expects for one message.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A valid request the proxy must forward.
    Forward,
    /// Must be answered locally with one of these codes.
    Reply(&'static [u16]),
    /// The RFC allows a liberal forward or a local answer with one of these codes.
    ForwardOr(&'static [u16]),
    /// A response that is not ours (or is malformed): dropped, never answered.
    DropResponse,
}

/// Facts from the notes of `expected.tsv` that the scanner and views must report.
#[derive(Debug, Clone, Copy, Default)]
struct Facts {
    method: Option<&'static [u8]>,
    status: Option<u16>,
    call_id: Option<&'static [u8]>,
    vias: Option<usize>,
    body: Option<usize>,
    cseq: Option<u32>,
    max_forwards: Option<u8>,
}

/// Message-specific extra check, run on the action the core chose.
type Extra = fn(&Proxy, &[u8], &Action) -> Result<(), String>;

struct Case {
    name: &'static str,
    expect: Expect,
    facts: Facts,
    extra: Option<Extra>,
}

const fn f() -> Facts {
    Facts {
        method: None,
        status: None,
        call_id: None,
        vias: None,
        body: None,
        cseq: None,
        max_forwards: None,
    }
}

impl Facts {
    const fn method(mut self, m: &'static [u8]) -> Self {
        self.method = Some(m);
        self
    }
    const fn status(mut self, s: u16) -> Self {
        self.status = Some(s);
        self
    }
    const fn call_id(mut self, c: &'static [u8]) -> Self {
        self.call_id = Some(c);
        self
    }
    const fn vias(mut self, n: usize) -> Self {
        self.vias = Some(n);
        self
    }
    const fn body(mut self, n: usize) -> Self {
        self.body = Some(n);
        self
    }
    const fn cseq(mut self, n: u32) -> Self {
        self.cseq = Some(n);
        self
    }
    const fn mf(mut self, n: u8) -> Self {
        self.max_forwards = Some(n);
        self
    }
}

const fn case(name: &'static str, expect: Expect, facts: Facts) -> Case {
    Case {
        name,
        expect,
        facts,
        extra: None,
    }
}

const fn case_x(name: &'static str, expect: Expect, facts: Facts, extra: Extra) -> Case {
    Case {
        name,
        expect,
        facts,
        extra: Some(extra),
    }
}

const LONGREQ_CALL_ID: &[u8] = b"longreq.onereallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallylongcallid";

fn cases() -> Vec<Case> {
    use Expect::*;
    vec![
        // §3.1.1 valid messages: a proxy forwards them.
        // wsinv carries a pre-loaded Route (services.example.com), which the proxy follows.
        case(
            "wsinv",
            Forward,
            f().method(b"INVITE")
                .call_id(b"wsinv.ndaksdj@192.0.2.1")
                .vias(3)
                .mf(68)
                .cseq(9)
                .body(150),
        ),
        // RFC: "proxy forwards or 404"; the Request-URI user part contains a literal '?', which
        // is legal in userinfo (RFC 3261 §25.1 user-unreserved).
        case(
            "intmeth",
            ForwardOr(&[404]),
            f().method(b"!interesting-Method0123456789_*+`.%indeed'~")
                .call_id(b"intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{")
                .vias(1)
                .cseq(139122385)
                .mf(255)
                .body(0),
        ),
        case(
            "esc01",
            Forward,
            f().method(b"INVITE")
                .call_id(b"esc01.239409asdfakjkn23onasd0-3234")
                .vias(1)
                .body(150)
                .mf(87),
        ),
        case(
            "escnull",
            Forward,
            f().method(b"REGISTER")
                .call_id(b"escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd")
                .vias(1)
                .body(0),
        ),
        // RE%47IST%45R is an unknown method (not REGISTER): proxied like any request.
        case(
            "esc02",
            Forward,
            f().method(b"RE%47IST%45R")
                .call_id(b"esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf")
                .cseq(29344)
                .vias(1)
                .mf(70),
        ),
        case(
            "lwsdisp",
            Forward,
            f().method(b"OPTIONS")
                .call_id(b"lwsdisp.1234abcd@funky.example.com")
                .vias(1)
                .body(0),
        ),
        case(
            "longreq",
            Forward,
            f().method(b"INVITE")
                .call_id(LONGREQ_CALL_ID)
                .vias(34)
                .cseq(3882340)
                .mf(70)
                .body(150),
        ),
        case_x(
            "dblreq",
            Forward,
            f().method(b"REGISTER")
                .call_id(b"dblreq.0ha0isndaksdj99sdfafnl3lk233412")
                .vias(1)
                .cseq(8)
                .body(0)
                .mf(8),
            dblreq_extra,
        ),
        case(
            "semiuri",
            Forward,
            f().method(b"OPTIONS")
                .call_id(b"semiuri.0ha0isndaksdj")
                .vias(1)
                .mf(3),
        ),
        case(
            "transports",
            Forward,
            f().method(b"OPTIONS")
                .call_id(b"transports.kijh4akdnaqjkwendsasfdj")
                .vias(5)
                .mf(70),
        ),
        case(
            "mpart01",
            Forward,
            f().method(b"MESSAGE")
                .call_id(b"3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..")
                .vias(1)
                .body(553),
        ),
        // Responses whose top Via is not ours: dropped (RFC 3261 §16.7 / §16.11).
        case(
            "unreason",
            DropResponse,
            f().status(200)
                .call_id(b"unreason.1234ksdfak3j2erwedfsASdf")
                .cseq(35)
                .vias(1)
                .body(154),
        ),
        case(
            "noreason",
            DropResponse,
            f().status(100)
                .call_id(b"noreason.asndj203insdf99223ndf")
                .vias(1)
                .body(0),
        ),
        // §3.1.2 invalid messages.
        case(
            "badinv01",
            Reply(&[400]),
            f().method(b"INVITE")
                .call_id(b"badinv01.0ha0isndaksdjasdf3234nas")
                .body(152),
        ),
        case(
            "clerr",
            Reply(&[400]),
            f().method(b"INVITE")
                .call_id(b"clerr.0ha0isndaksdjweiafasdk3")
                .vias(1),
        ),
        case(
            "ncl",
            Reply(&[400]),
            f().method(b"INVITE")
                .call_id(b"ncl.0ha0isndaksdj2193423r542w35"),
        ),
        case(
            "scalar02",
            Reply(&[400]),
            f().method(b"REGISTER")
                .call_id(b"scalar02.23o0pd9vanlq3wnrlnewofjas9ui32")
                .vias(1),
        ),
        case(
            "scalarlg",
            DropResponse,
            f().status(503)
                .call_id(b"scalarlg.noase0of0234hn2qofoaf0232aewf2394r")
                .vias(1),
        ),
        case(
            "quotbal",
            Reply(&[400]),
            f().method(b"INVITE").call_id(b"quotbal.aksdj").vias(1),
        ),
        case(
            "ltgtruri",
            Reply(&[400]),
            f().method(b"INVITE")
                .call_id(b"ltgtruri.1@192.0.2.5")
                .vias(1),
        ),
        // The scanner marks the start line defective (LWS in the URI); 400 is what the RFC asks.
        case(
            "lwsruri",
            Reply(&[400]),
            f().call_id(b"lwsruri.asdfasdoeoi2323-asdfwrn23-asd834rk423")
                .vias(1)
                .body(159),
        ),
        case_x(
            "lwsstart",
            ForwardOr(&[400]),
            f().call_id(b"lwsstart.dfknq234oi243099adsdfnawe3@example.com")
                .vias(1)
                .body(150),
            normalised_start_line,
        ),
        case_x(
            "trws",
            ForwardOr(&[400]),
            f().call_id(b"trws.oicu34958239neffasdhr2345r").vias(1),
            normalised_start_line,
        ),
        case_x(
            "escruri",
            ForwardOr(&[400]),
            f().method(b"INVITE")
                .call_id(b"escruri.23940-asdfhj-aje3br-234q098w-fawerh2q-h4n5")
                .vias(1)
                .body(150)
                .mf(7),
            escruri_extra,
        ),
        case(
            "baddate",
            ForwardOr(&[400]),
            f().method(b"INVITE")
                .call_id(b"baddate.239423mnsadf3j23lj42--sedfnm234")
                .vias(1),
        ),
        // The Contact is the registrar's business; a proxy forwards it untouched or rejects.
        case(
            "regbadct",
            ForwardOr(&[400]),
            f().method(b"REGISTER")
                .call_id(b"regbadct.k345asrl3fdbv@10.0.0.1")
                .vias(1),
        ),
        case(
            "badaspec",
            ForwardOr(&[400]),
            f().method(b"OPTIONS")
                .call_id(b"badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3")
                .vias(1),
        ),
        // A proxy must not propagate the unquoted display name: forwarding verbatim is out.
        case(
            "baddn",
            Reply(&[400]),
            f().method(b"OPTIONS")
                .call_id(b"baddn.31415@c.example.com")
                .vias(1),
        ),
        case(
            "badvers",
            Reply(&[505]),
            f().method(b"OPTIONS")
                .call_id(b"badvers.31417@c.example.com")
                .vias(1),
        ),
        case(
            "mismatch01",
            Reply(&[400]),
            f().method(b"OPTIONS")
                .call_id(b"mismatch01.dj0234sxdfl3")
                .cseq(8)
                .vias(1),
        ),
        // 501 preferred (especially for proxies), 400 acceptable.
        case(
            "mismatch02",
            Reply(&[400, 501]),
            f().method(b"NEWMETHOD")
                .call_id(b"mismatch02.dj0234sxdfl3")
                .vias(1)
                .body(138),
        ),
        // A status line with code 4294967301: simply drop it; never answer a response.
        case(
            "bigcode",
            DropResponse,
            f().call_id(b"bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i")
                .vias(1),
        ),
        // §3.2.1: reject 400 or fall back to RFC 2543 transaction matching.
        case_x(
            "badbranch",
            ForwardOr(&[400]),
            f().method(b"OPTIONS")
                .call_id(b"badbranch.sadonfo23i420jv0as0derf3j3n")
                .cseq(8)
                .vias(1)
                .mf(3),
            badbranch_extra,
        ),
        // §3.3 application-level cases.
        case(
            "insuf",
            Reply(&[400]),
            f().method(b"INVITE").cseq(193942).vias(1).body(152),
        ),
        case(
            "unkscm",
            Reply(&[416]),
            f().method(b"OPTIONS")
                .call_id(b"unkscm.nasdfasser0q239nwsdfasdkl34")
                .vias(1),
        ),
        // 416 when the scheme is never accepted (a SIP proxy never routes soap.beep).
        case(
            "novelsc",
            Reply(&[416, 404]),
            f().method(b"OPTIONS")
                .call_id(b"novelsc.asdfasser0q239nwsdfasdkl34")
                .vias(1),
        ),
        case(
            "unksm2",
            Forward,
            f().method(b"REGISTER")
                .call_id(b"unksm2.daksdj@hyphenated-host.example.com")
                .vias(1),
        ),
        case_x(
            "bext01",
            Reply(&[420]),
            f().method(b"OPTIONS")
                .call_id(b"bext01.0ha0isndaksdj")
                .cseq(8)
                .vias(1)
                .mf(6),
            bext01_extra,
        ),
        case(
            "invut",
            Forward,
            f().method(b"INVITE")
                .call_id(b"invut.0ha0isndaksdjadsfij34n23d")
                .vias(1)
                .body(40),
        ),
        // The Authorization line must pass unmodified (checked for every forward).
        case(
            "regaut01",
            Forward,
            f().method(b"REGISTER")
                .call_id(b"regaut01.0ha0isndaksdj")
                .vias(1)
                .body(0),
        ),
        case(
            "multi01",
            Reply(&[400]),
            f().method(b"INVITE")
                .call_id(b"multi01.98asdh@192.0.2.1")
                .vias(1)
                .body(154),
        ),
        case(
            "mcl01",
            Reply(&[400]),
            f().method(b"OPTIONS")
                .call_id(b"mcl01.fhn2323orihawfdoa3o4r52o3irsdf")
                .vias(1),
        ),
        case_x(
            "bcast",
            DropResponse,
            f().status(200)
                .call_id(b"bcast.0384840201234ksdfak3j2erwedfsASdf")
                .vias(2)
                .body(154),
            bcast_extra,
        ),
        case(
            "zeromf",
            Reply(&[483]),
            f().method(b"OPTIONS")
                .call_id(b"zeromf.jfasdlfnm2o2l43r5u0asdfas")
                .cseq(39234321)
                .mf(0),
        ),
        // Registrar behaviour (contact-param vs uri-param, escaped Route in a Contact) is not the
        // proxy's business: it forwards the Contact untouched (checked for every forward).
        case(
            "cparam01",
            Forward,
            f().method(b"REGISTER")
                .call_id(b"cparam01.70710@saturn.example.com")
                .vias(1),
        ),
        case(
            "cparam02",
            Forward,
            f().method(b"REGISTER")
                .call_id(b"cparam02.70710@saturn.example.com")
                .vias(1),
        ),
        case(
            "regescrt",
            Forward,
            f().method(b"REGISTER")
                .call_id(b"regescrt.k345asrl3fdbv@192.0.2.1")
                .vias(1)
                .body(0),
        ),
        // 406 is the UAS's answer; a proxy does not look at Accept.
        case(
            "sdp01",
            Forward,
            f().method(b"INVITE")
                .call_id(b"sdp01.ndaksdj9342dasdd")
                .vias(1)
                .mf(5),
        ),
        // No Max-Forwards (the proxy adds 70), no Content-Length (body = rest of datagram).
        case(
            "inv2543",
            Forward,
            f().method(b"INVITE")
                .call_id(b"inv2543.1717@ift.client.example.com")
                .cseq(56)
                .vias(1)
                .body(105),
        ),
    ]
}

fn check_facts(m: &Message<'_>, facts: &Facts) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(want) = facts.method
        && m.method() != Some(want)
    {
        p.push(format!(
            "method: want {:?}, scanner says {:?}",
            String::from_utf8_lossy(want),
            m.method().map(String::from_utf8_lossy)
        ));
    }
    if let Some(want) = facts.status
        && m.status() != Some(want)
    {
        p.push(format!(
            "status: want {want}, scanner says {:?}",
            m.status()
        ));
    }
    if let Some(want) = facts.call_id {
        let got = m.value(HeaderName::CallId);
        if got != Some(want) {
            p.push(format!(
                "Call-ID: want {:?}, got {:?}",
                String::from_utf8_lossy(want),
                got.map(String::from_utf8_lossy)
            ));
        }
    }
    if let Some(want) = facts.vias {
        let got = elements(m, HeaderName::Via).len();
        if got != want {
            p.push(format!("Via values: want {want}, got {got}"));
        }
    }
    if let Some(want) = facts.body
        && m.body().len() != want
    {
        p.push(format!("body length: want {want}, got {}", m.body().len()));
    }
    if let Some(want) = facts.cseq {
        let got = m
            .value(HeaderName::CSeq)
            .and_then(|v| header::parse_cseq(v).ok())
            .map(|(n, _)| n);
        if got != Some(want) {
            p.push(format!("CSeq number: want {want}, got {got:?}"));
        }
    }
    if let Some(want) = facts.max_forwards {
        let got = m
            .value(HeaderName::MaxForwards)
            .and_then(|v| header::parse_max_forwards(v).ok());
        if got != Some(want) {
            p.push(format!("Max-Forwards: want {want}, got {got:?}"));
        }
    }
    p
}

/// Checks every forwarded request must pass (RFC 3261 §16.6).
pub(crate) fn check_forward(orig: &Message<'_>, out: &Outbound) -> Vec<String> {
    let mut p = Vec::new();
    let fwd = match Message::scan(&out.data) {
        Ok(m) => m,
        Err(e) => return vec![format!("forwarded bytes do not scan: {e}")],
    };
    if let Some(d) = fwd.defect() {
        p.push(format!("forwarded message has a defect: {d:?}"));
    }
    if fwd.is_response() || fwd.method() != orig.method() {
        p.push("forwarded message is not the same request method".to_owned());
    }
    if fwd.slice(fwd.start_line_range()) != orig.slice(orig.start_line_range()) {
        p.push(format!(
            "start line changed: {:?} -> {:?}",
            String::from_utf8_lossy(orig.slice(orig.start_line_range())),
            String::from_utf8_lossy(fwd.slice(fwd.start_line_range()))
        ));
    }
    // One more Via, ours on top, the received ones below in order.
    let ov = elements(orig, HeaderName::Via);
    let fv = elements(&fwd, HeaderName::Via);
    if fv.len() != ov.len() + 1 {
        p.push(format!(
            "Via values: {} in, {} out (want one more)",
            ov.len(),
            fv.len()
        ));
    }
    match fv.first().map(|e| Via::parse(fwd.buf(), e.value.clone())) {
        Some(Ok(top)) => {
            if !top
                .branch(fwd.buf())
                .is_some_and(|b| b.starts_with(OUR_BRANCH))
            {
                p.push(format!(
                    "top Via branch does not start with z9hG4bKcg: {:?}",
                    top.branch(fwd.buf()).map(String::from_utf8_lossy)
                ));
            }
            if fwd.slice(top.host_range.clone()) != b"127.0.0.1" || top.port != Some(5060) {
                p.push("top Via sent-by is not 127.0.0.1:5060".to_owned());
            }
        }
        _ => p.push("forwarded top Via missing or malformed".to_owned()),
    }
    if let (Some(o), Some(f)) = (ov.first(), fv.get(1)) {
        let (o, f) = (orig.slice(o.value.clone()), fwd.slice(f.value.clone()));
        if !f.starts_with(o) {
            p.push(format!(
                "received top Via not kept (only received/rport may be added): {:?} -> {:?}",
                String::from_utf8_lossy(o),
                String::from_utf8_lossy(f)
            ));
        }
    }
    for (i, o) in ov.iter().enumerate().skip(1) {
        let same = fv
            .get(i + 1)
            .is_some_and(|f| fwd.slice(f.value.clone()) == orig.slice(o.value.clone()));
        if !same {
            p.push(format!("Via value {i} changed or moved"));
        }
    }
    // Max-Forwards decremented, or 70 added (§16.6 step 3).
    let mf = |m: &Message<'_>| {
        m.value(HeaderName::MaxForwards)
            .map(|v| header::parse_max_forwards(v).ok())
    };
    match (mf(orig), mf(&fwd)) {
        (Some(Some(a)), Some(Some(b))) if b + 1 == a => {}
        (None, Some(Some(70))) => {}
        (a, b) => p.push(format!("Max-Forwards: in {a:?}, out {b:?}")),
    }
    if fwd.all(HeaderName::MaxForwards).count() != orig.all(HeaderName::MaxForwards).count().max(1)
    {
        p.push("number of Max-Forwards headers changed".to_owned());
    }
    if fwd.body() != orig.body() {
        p.push(format!(
            "body differs ({} bytes in, {} out)",
            orig.body().len(),
            fwd.body().len()
        ));
    }
    if fwd.body_range().end != out.data.len() {
        p.push(format!(
            "{} bytes after the body were forwarded",
            out.data.len() - fwd.body_range().end
        ));
    }
    if fwd.value(HeaderName::CallId) != orig.value(HeaderName::CallId)
        || fwd.value(HeaderName::CSeq) != orig.value(HeaderName::CSeq)
    {
        p.push("Call-ID or CSeq changed".to_owned());
    }
    // Every other header line passes byte for byte, in order.
    let top_via_line = ov.first().map(|e| e.header);
    let kept: Vec<&[u8]> = orig
        .headers()
        .iter()
        .enumerate()
        .filter(|(i, h)| Some(*i) != top_via_line && h.name != HeaderName::MaxForwards)
        .map(|(_, h)| orig.slice(h.line.clone()))
        .collect();
    let out_lines = header_lines(&fwd);
    if !is_subsequence(&kept, &out_lines) {
        let missing: Vec<String> = kept
            .iter()
            .filter(|l| !out_lines.contains(l))
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        p.push(format!(
            "header lines not forwarded verbatim/in order: {missing:?}"
        ));
    }
    p
}

/// Checks every local answer must pass (RFC 3261 §8.2.6.2): a response with the request's Via
/// lines, Call-ID and CSeq, a To-tag, sent back to the source over its transport.
fn check_reply(orig: &Message<'_>, code: u16, out: &Outbound) -> Vec<String> {
    let mut p = Vec::new();
    let r = match Message::scan(&out.data) {
        Ok(m) => m,
        Err(e) => return vec![format!("reply does not scan: {e}")],
    };
    if !r.is_response() || r.status() != Some(code) || r.defect().is_some() {
        p.push(format!(
            "reply is not a clean {code} response: status {:?}, defect {:?}",
            r.status(),
            r.defect()
        ));
    }
    if r.value(HeaderName::CallId) != orig.value(HeaderName::CallId) {
        p.push(format!(
            "reply Call-ID {:?} != request's {:?}",
            r.value(HeaderName::CallId).map(String::from_utf8_lossy),
            orig.value(HeaderName::CallId).map(String::from_utf8_lossy)
        ));
    }
    if r.value(HeaderName::CSeq) != orig.value(HeaderName::CSeq) {
        p.push("reply CSeq differs from the request's".to_owned());
    }
    let ov = elements(orig, HeaderName::Via);
    let rv = elements(&r, HeaderName::Via);
    if ov.len() != rv.len() {
        p.push(format!(
            "reply has {} Via values, request {}",
            rv.len(),
            ov.len()
        ));
    }
    if let (Some(o), Some(x)) = (ov.first(), rv.first())
        && !r
            .slice(x.value.clone())
            .starts_with(orig.slice(o.value.clone()))
    {
        p.push("reply top Via is not the request's (plus received/rport)".to_owned());
    }
    let top_line = ov.first().map(|e| e.header);
    let via_lines: Vec<&[u8]> = orig
        .headers()
        .iter()
        .enumerate()
        .filter(|(i, h)| h.name == HeaderName::Via && Some(*i) != top_line)
        .map(|(_, h)| orig.slice(h.line.clone()))
        .collect();
    if !is_subsequence(&via_lines, &header_lines(&r)) {
        p.push("reply does not copy the request's Via lines in order".to_owned());
    }
    let to_parses = orig
        .first(HeaderName::To)
        .is_some_and(|h| NameAddr::parse(orig.buf(), h.value.clone()).is_ok());
    if to_parses {
        let tagged = r
            .first(HeaderName::To)
            .and_then(|h| NameAddr::parse(r.buf(), h.value.clone()).ok())
            .is_some_and(|n| n.tag(r.buf()).is_some());
        if !tagged {
            p.push("reply To has no tag".to_owned());
        }
    }
    match &out.to {
        NextHop::Addr(a) if a.ip() == addr(CLIENT).ip() => {}
        other => p.push(format!("reply sent to {other:?}, not back to the source")),
    }
    if out.transport != Transport::Udp {
        p.push("reply not sent over the request's transport (UDP)".to_owned());
    }
    p
}

fn forwarded(a: &Action) -> Option<Message<'_>> {
    match a {
        Action::Forward(o) => Message::scan(&o.data).ok(),
        _ => None,
    }
}

fn dblreq_extra(_: &Proxy, _: &[u8], a: &Action) -> Result<(), String> {
    match a {
        Action::Forward(o) if memchr_find(&o.data, b"INVITE").is_some() => {
            Err("the trailing INVITE octets were forwarded".to_owned())
        }
        _ => Ok(()),
    }
}

/// A liberal element may ignore extra SP on the request line but must not forward them.
fn normalised_start_line(_: &Proxy, _: &[u8], a: &Action) -> Result<(), String> {
    let Some(m) = forwarded(a) else { return Ok(()) };
    let line = m.slice(m.start_line_range());
    let text = String::from_utf8_lossy(line);
    if text.contains("  ") || text.trim_end_matches("\r\n").ends_with(' ') {
        return Err(format!("forwarded the malformed request line {text:?}"));
    }
    Ok(())
}

/// RFC 4475 §3.1.2.11: if a proxy accepts the request, the escaped headers MUST NOT appear in
/// the forwarded Request-URI, nor as real headers.
fn escruri_extra(_: &Proxy, raw: &[u8], a: &Action) -> Result<(), String> {
    let Some(m) = forwarded(a) else { return Ok(()) };
    let ruri = m.request_uri().unwrap_or_default();
    if ruri.contains(&b'?') {
        return Err(format!(
            "forwarded Request-URI keeps the escaped headers: {:?}",
            String::from_utf8_lossy(ruri)
        ));
    }
    let orig = Message::scan(raw).map_err(|e| e.to_string())?;
    if m.all(HeaderName::Route).count() != orig.all(HeaderName::Route).count() {
        return Err("escaped Route was turned into a real Route header".to_owned());
    }
    Ok(())
}

/// RFC 4475 §3.2.1: with a branch that is only the magic cookie, RFC 3261 matching cannot work;
/// a proxy that does not reject must fall back to RFC 2543 identification, so two different
/// transactions from this client must not get the same branch (RFC 3261 §16.11), while a
/// retransmission must get the same one.
fn badbranch_extra(p: &Proxy, raw: &[u8], a: &Action) -> Result<(), String> {
    let Some(first) = forwarded(a) else {
        return Ok(());
    };
    let branch_of = |m: &Message<'_>| -> Option<Vec<u8>> {
        let e = elements(m, HeaderName::Via).into_iter().next()?;
        Some(Via::parse(m.buf(), e.value).ok()?.branch(m.buf())?.to_vec())
    };
    let b1 = branch_of(&first).ok_or("no branch in forwarded Via")?;
    let again = handle_from(p, raw, CLIENT);
    let b_again = forwarded(&again).and_then(|m| branch_of(&m));
    if b_again.as_deref() != Some(&b1[..]) {
        return Err("a retransmission got a different branch".to_owned());
    }
    let other = String::from_utf8_lossy(raw)
        .replace(
            "badbranch.sadonfo23i420jv0as0derf3j3n",
            "badbranch.another-transaction",
        )
        .replace("CSeq: 8 OPTIONS", "CSeq: 9 OPTIONS");
    let other_action = handle_from(p, other.as_bytes(), CLIENT);
    match forwarded(&other_action).and_then(|m| branch_of(&m)) {
        Some(b2) if b2 == b1 => Err(format!(
            "a different transaction (new Call-ID and CSeq, same cookie-only branch) got the same \
             branch {:?}: RFC 3261 matching used on a cookie-only branch",
            String::from_utf8_lossy(&b1)
        )),
        Some(_) => Ok(()),
        None => Err(format!(
            "the second transaction was not forwarded: {}",
            describe(&other_action)
        )),
    }
}

/// RFC 3261 §20.40: the 420 lists the unsupported Proxy-Require options.
fn bext01_extra(_: &Proxy, _: &[u8], a: &Action) -> Result<(), String> {
    let Action::Reply(420, o) = a else {
        return Ok(());
    };
    let r = Message::scan(&o.data).map_err(|e| e.to_string())?;
    let unsupported = r
        .headers()
        .iter()
        .find(|h| {
            r.slice(h.name_range.clone())
                .eq_ignore_ascii_case(b"Unsupported")
        })
        .map(|h| String::from_utf8_lossy(r.slice(h.value.clone())).into_owned())
        .ok_or("420 without an Unsupported header")?;
    for opt in ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"] {
        if !unsupported.contains(opt) {
            return Err(format!("Unsupported {unsupported:?} does not list {opt}"));
        }
    }
    Ok(())
}

/// RFC 4475 §3.3.10: a proxy must never forward to the broadcast address. Put a genuine Via of
/// ours on top (the one the core writes when it forwards a request whose top Via is the
/// 255.255.255.255 one), so the core really routes the response to the broadcast Via below it.
fn bcast_extra(p: &Proxy, raw: &[u8], _: &Action) -> Result<(), String> {
    let text = String::from_utf8_lossy(raw);
    let theirs = "Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23\r\n";
    let request = format!(
        "OPTIONS sip:x@192.0.2.1 SIP/2.0\r\n{theirs}From: <sip:a@b>;tag=1\r\nTo: <sip:x@c>\r\n\
         Call-ID: bcast-probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    let Action::Forward(out) = handle_from(p, request.as_bytes(), CLIENT) else {
        return Err("the probe request was not forwarded".to_owned());
    };
    let forwarded = String::from_utf8_lossy(&out.data).into_owned();
    let ours = forwarded
        .split("\r\n")
        .nth(1)
        .filter(|l| l.starts_with("Via: "))
        .ok_or("the forwarded probe has no Via of ours")?;
    let variant = text.replacen(
        "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\r\n",
        &format!("{ours}\r\n"),
        1,
    );
    if variant == text {
        return Err("bcast.dat does not have the expected first Via".to_owned());
    }
    match handle_from(p, variant.as_bytes(), CARRIER) {
        Action::Drop(DropReason::UnsafeDestination) => Ok(()),
        other => Err(format!(
            "response whose next Via is 255.255.255.255: want Drop(UnsafeDestination), got {}",
            describe(&other)
        )),
    }
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn expect_text(e: &Expect) -> String {
    match e {
        Expect::Forward => "Forward".to_owned(),
        Expect::Reply(c) => format!("Reply {c:?}"),
        Expect::ForwardOr(c) => format!("Forward or Reply {c:?}"),
        Expect::DropResponse => "Drop(ForeignVia|BadResponse)".to_owned(),
    }
}

#[test]
fn every_torture_message_is_handled_as_rfc_4475_says() {
    let p = proxy();
    let rows = expected_rows();
    let table = cases();
    let mut failures: Vec<String> = Vec::new();
    // The table covers exactly the archive.
    for (name, _, _) in &rows {
        if !table.iter().any(|c| c.name == name) {
            failures.push(format!(
                "{name}: listed in expected.tsv but not in the test table"
            ));
        }
    }
    let on_disk: Vec<String> = std::fs::read_dir(torture_dir())
        .expect("torture dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|n| n.strip_suffix(".dat").map(str::to_owned))
        .collect();
    for n in &on_disk {
        if !rows.iter().any(|(name, _, _)| name == n) {
            failures.push(format!("{n}.dat is not listed in expected.tsv"));
        }
    }
    let mut checked = 0;
    for c in &table {
        let Some((_, verdict, note)) = rows.iter().find(|(n, _, _)| n == c.name) else {
            failures.push(format!("{}: in the table but not in expected.tsv", c.name));
            continue;
        };
        // Valid messages must be forwarded (or, for responses, dropped as not ours).
        if verdict == "valid" && matches!(c.expect, Expect::Reply(_)) {
            failures.push(format!(
                "{}: table refuses a message the RFC calls valid",
                c.name
            ));
        }
        let path = torture_dir().join(format!("{}.dat", c.name));
        let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut problems = Vec::new();
        let msg = match Message::scan(&raw) {
            Ok(m) => Some(m),
            Err(e) => {
                problems.push(format!("scanner refused to index it: {e}"));
                None
            }
        };
        if let Some(m) = &msg {
            problems.extend(check_facts(m, &c.facts));
        }
        let action = handle_from(&p, &raw, CLIENT);
        let outcome_ok = match (&c.expect, &action) {
            (Expect::Forward | Expect::ForwardOr(_), Action::Forward(o)) => {
                if let Some(m) = &msg {
                    problems.extend(check_forward(m, o));
                }
                true
            }
            (Expect::Reply(codes) | Expect::ForwardOr(codes), Action::Reply(code, o))
                if codes.contains(code) =>
            {
                if let Some(m) = &msg {
                    problems.extend(check_reply(m, *code, o));
                }
                true
            }
            (
                Expect::DropResponse,
                Action::Drop(DropReason::ForeignVia | DropReason::BadResponse),
            ) => true,
            _ => false,
        };
        if !outcome_ok {
            problems.insert(0, format!("wrong action: got {}", describe(&action)));
        }
        if let Some(extra) = c.extra
            && let Err(e) = extra(&p, &raw, &action)
        {
            problems.push(e);
        }
        if !problems.is_empty() {
            let note: String = note.chars().take(90).collect();
            failures.push(format!(
                "{} ({verdict}; {note}…)\n      expected: {}\n      got:      {}\n      - {}",
                c.name,
                expect_text(&c.expect),
                describe(&action),
                problems.join("\n      - ")
            ));
        }
        checked += 1;
    }
    assert_eq!(checked, rows.len(), "not every torture message was checked");
    assert!(
        failures.is_empty(),
        "{} of {} torture messages not handled as RFC 4475 says:\n  {}",
        failures.len(),
        rows.len(),
        failures.join("\n  ")
    );
}

#[test]
fn dblreq_trailing_invite_is_not_forwarded() {
    let p = proxy();
    let raw = std::fs::read(torture_dir().join("dblreq.dat")).expect("dblreq.dat");
    let m = Message::scan(&raw).expect("dblreq scans");
    // The datagram really carries a second request after the empty body.
    let tail = &raw[m.body_range().end..];
    assert!(
        memchr_find(tail, b"INVITE sip:joe@example.com SIP/2.0").is_some(),
        "fixture: the trailing INVITE is where RFC 4475 puts it"
    );
    assert!(m.body().is_empty(), "Content-Length: 0 bounds the body");
    let Action::Forward(out) = handle_from(&p, &raw, CLIENT) else {
        panic!("dblreq's REGISTER must be forwarded");
    };
    for needle in [
        &b"INVITE"[..],
        b"dblreq.0ha0isnda977644900765@192.0.2.15",
        b"z9hG4bKkdjuw380234",
        b"v=0",
    ] {
        assert!(
            memchr_find(&out.data, needle).is_none(),
            "forwarded REGISTER carries trailing octets {:?}:\n{}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&out.data)
        );
    }
    let fwd = Message::scan(&out.data).expect("forwarded scans");
    assert_eq!(fwd.method(), Some(&b"REGISTER"[..]));
    assert!(
        out.data.ends_with(b"\r\n\r\n"),
        "ends right after the empty body"
    );
    assert_eq!(fwd.body_range().end, out.data.len());
}

/// No amplification: whatever the gate answers by itself to a message — every RFC 4475 message
/// and each of them cut short — is never much larger than what it answers (the status line, our
/// To-tag and the `received`/`rport` marks are all it adds), so a spoofed request cannot make
/// the gate send its victim more than it was sent.
#[test]
fn local_answers_are_never_much_larger_than_the_request() {
    let p = proxy();
    let mut answered = 0;
    for entry in std::fs::read_dir(torture_dir()).expect("torture dir") {
        let raw = std::fs::read(entry.expect("entry").path()).expect("read");
        let cuts = [raw.len(), raw.len() * 3 / 4, raw.len() / 2, raw.len() / 4];
        for cut in cuts {
            let msg = &raw[..cut];
            if let Action::Reply(_, out) | Action::Reject(_, out) = handle_from(&p, msg, CLIENT) {
                answered += 1;
                assert!(
                    out.data.len() <= msg.len() + 192,
                    "{} bytes answered to {} bytes:\n{}",
                    out.data.len(),
                    msg.len(),
                    String::from_utf8_lossy(&out.data)
                );
            }
        }
    }
    assert!(answered > 20, "only {answered} local answers checked");
}
