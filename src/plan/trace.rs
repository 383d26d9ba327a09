//! Reading a trace: CSV rows or captured SIP packets become [`Attempt`]s, each classified and
//! keyed by the proxy's own code (trunk match, per-source and per-username keys, retransmission
//! and auth re-send detection), in time order. Everything streams: the reader holds one row or
//! packet, a bounded reordering window and the proxy's bounded retransmission cache.

use std::collections::VecDeque;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use crate::config::{Config, UnknownSources};
use crate::limiter::{Ask, BoundedMap, Expiring};
use crate::proxy::admission::{self, DECISION_LABEL, Keys};
use crate::routing::{Origin, Routes};
use crate::sip::{HeaderName, Message, Method, RequestView};

/// How long the proxy remembers a decided INVITE, so its retransmissions are not new calls
/// (64·T1 and then some; the proxy's decision cache uses the same span).
pub const RETRANSMISSION_WINDOW_NS: u64 = 32_000_000_000;

/// Rows may come out of time order by this much (captures merged from two interfaces, CSV
/// written by several workers); the reader puts them back in order.
pub const REORDER_WINDOW_NS: u64 = 2_000_000_000;

/// A row this far after the one before is a wrong timestamp, not a quiet spell.
pub const MAX_GAP_NS: u64 = 7 * 86_400 * 1_000_000_000;

/// The SIP port assumed for a CSV source given without one.
pub const DEFAULT_PORT: u16 = 5060;

/// One call attempt as the admission chain sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Nanoseconds since the trace's first attempt (after `--speedup`).
    pub at: u64,
    /// What it must pass.
    pub ask: Ask,
    /// Its Call-ID and From-tag key (auth re-sends share it).
    pub attempt: u64,
    /// Its CSeq number.
    pub cseq: u32,
    /// True when it carries (Proxy-)Authorization: it may be an uncharged re-send after a
    /// challenge.
    pub credentials: bool,
}

/// A trace format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `timestamp, source_ip, sip_username, trunk, call_id`.
    Csv,
    /// A pcap or pcapng capture of SIP over UDP.
    Pcap,
}

impl Format {
    /// The format of `path`: pcap and pcapng by their magic number, anything else is CSV.
    pub fn detect(path: &Path) -> std::io::Result<Self> {
        let mut magic = [0u8; 4];
        let mut f = std::fs::File::open(path)?;
        let n = f.read(&mut magic)?;
        let pcap = n == 4
            && matches!(
                u32::from_le_bytes(magic),
                0xa1b2_c3d4 | 0xd4c3_b2a1 | 0xa1b2_3c4d | 0x4d3c_b2a1 | 0x0a0d_0d0a
            );
        Ok(if pcap { Self::Pcap } else { Self::Csv })
    }
}

/// A trace that cannot be read, with where.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file cannot be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The trace.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A CSV row that is not a call attempt.
    #[error("line {line}: {message}")]
    Row {
        /// 1-based line.
        line: u64,
        /// What is wrong, with the value.
        message: String,
    },
    /// A packet or block the capture reader cannot make sense of.
    #[error("packet {packet}: {message}")]
    Packet {
        /// 1-based packet number (as Wireshark counts).
        packet: u64,
        /// What is wrong.
        message: String,
    },
    /// A capture that is not pcap or pcapng.
    #[error("not a pcap or pcapng capture: {0}")]
    Capture(String),
}

/// What the reader saw besides the attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TraceStats {
    /// CSV rows, or packets.
    pub records: u64,
    /// Initial INVITEs that reach admission (re-sends with credentials after a challenge
    /// included: the replay finds which of them are free).
    pub attempts: u64,
    /// Retransmissions of an INVITE seen before (a CSV row repeating a Call-ID): not new calls.
    pub retransmissions: u64,
    /// Initial INVITEs from carriers (inbound calls): never metered.
    pub from_carriers: u64,
    /// INVITEs sent from one of the configuration's listen addresses: the gate's own forwarded
    /// copies, in a capture taken on a gate.
    pub from_gate: u64,
    /// Initial INVITEs from the PBX on no trunk, or from unknown sources, that the proxy would
    /// not meter (`unknown_sources` is "reject" or "forward").
    pub unmetered: u64,
    /// Packets that are not UDP over IP (other protocols and link types), keep-alives, and
    /// pcapng packets without a timestamp.
    pub skipped_packets: u64,
    /// UDP payloads that are not SIP messages the scanner accepts, INVITEs the proxy would
    /// answer 400, fragments of datagrams over the MTU, and frames with inconsistent headers.
    pub unparsable: u64,
    /// The first few packet numbers of those.
    pub unparsable_examples: Vec<u64>,
    /// SIP messages other than initial INVITEs (responses, ACK, BYE, re-INVITEs...).
    pub other_sip: u64,
    /// True when every timestamp was a whole second (a CDR export): each second's attempts
    /// were spread evenly over it, or a second's worth would arrive at one instant.
    pub spread_whole_seconds: bool,
    /// Nanoseconds since the Unix epoch of the first attempt.
    pub start_unix_ns: u64,
    /// Nanoseconds from the first attempt to the last (after `--speedup`).
    pub span_ns: u64,
}

/// Turns rows and packets into attempts with the proxy's classification and keys.
pub struct Classifier {
    routes: Routes,
    keys: Keys,
    unknown_sources: UnknownSources,
    per_username: bool,
    trunk_names: Vec<String>,
    seen: BoundedMap<Seen>,
    speedup: f64,
    /// Attempts waiting for the reorder window, in time order: (Unix ns, attempt).
    pending: VecDeque<(u64, Attempt)>,
    latest: u64,
    start: Option<u64>,
    /// The listen addresses: what comes from them is the gate's own.
    own: Vec<SocketAddr>,
    /// A timestamp with a fraction of a second was seen.
    fractional: bool,
    /// Decided at the first attempt out: spread each whole second's attempts over it.
    spread: Option<bool>,
    /// What was seen.
    pub stats: TraceStats,
}

struct Seen(u64);

impl Expiring for Seen {
    fn expires(&self) -> u64 {
        self.0
    }
}

impl Classifier {
    /// A classifier for `cfg`; `speedup` divides the trace's time axis.
    pub fn new(cfg: &Config, speedup: f64) -> Self {
        Self {
            routes: Routes::new(cfg),
            keys: Keys::new(Some("cpsgate plan")),
            unknown_sources: cfg.proxy.unknown_sources,
            per_username: cfg.limits.username.is_some(),
            trunk_names: cfg.trunks.iter().map(|t| t.name.clone()).collect(),
            seen: BoundedMap::new(cfg.limits.decision_cache_size),
            speedup,
            pending: VecDeque::new(),
            latest: 0,
            start: None,
            own: cfg
                .listeners
                .iter()
                .map(|l| l.address)
                .filter(|a| !a.ip().is_unspecified())
                .collect(),
            fractional: false,
            spread: None,
            stats: TraceStats::default(),
        }
    }

    /// True the first time a transaction key is seen within the retransmission window.
    fn is_new(&mut self, key: u64, unix_ns: u64) -> bool {
        if self.seen.get(key, unix_ns, |_| ()).is_some() {
            self.stats.retransmissions += 1;
            return false;
        }
        self.seen.insert(
            key,
            unix_ns,
            Seen(unix_ns.saturating_add(RETRANSMISSION_WINDOW_NS)),
        );
        true
    }

    /// Queue an attempt at `unix_ns`; `Err` says why not: further out of order than the reorder
    /// window allows, or too far after the row before.
    fn push(&mut self, unix_ns: u64, a: Attempt) -> Result<(), String> {
        if unix_ns.saturating_add(REORDER_WINDOW_NS) < self.latest {
            return Err(format!(
                "{:.3} s earlier than a row before it (more than the {} s the reader reorders); sort the trace by time",
                (self.latest - unix_ns) as f64 / 1e9,
                REORDER_WINDOW_NS / 1_000_000_000
            ));
        }
        if self.latest > 0 && unix_ns > self.latest.saturating_add(MAX_GAP_NS) {
            return Err(format!(
                "{} is {:.1} days after the row before it ({}): a wrong timestamp?",
                format_timestamp(unix_ns),
                (unix_ns - self.latest) as f64 / 86_400e9,
                format_timestamp(self.latest)
            ));
        }
        self.fractional |= !unix_ns.is_multiple_of(1_000_000_000);
        self.latest = self.latest.max(unix_ns);
        // Rows in order go to the back; a late one after every row not later than it.
        if self.pending.back().is_none_or(|b| b.0 <= unix_ns) {
            self.pending.push_back((unix_ns, a));
        } else {
            let at = self.pending.partition_point(|p| p.0 <= unix_ns);
            self.pending.insert(at, (unix_ns, a));
        }
        Ok(())
    }

    /// Attempts whose place in time is settled (all of them with `all`), in time order.
    pub fn drain(&mut self, all: bool, mut out: impl FnMut(Attempt)) {
        while let Some(&(t, _)) = self.pending.front() {
            if !all && t.saturating_add(REORDER_WINDOW_NS) > self.latest {
                break;
            }
            let spread = *self.spread.get_or_insert(!self.fractional);
            self.stats.spread_whole_seconds = spread;
            // Whole-second timestamps: the second's attempts (all here: the window is past it)
            // are spread evenly over it.
            let n = if spread {
                self.pending.iter().take_while(|p| p.0 == t).count() as u64
            } else {
                1
            };
            for i in 0..n {
                let Some((t, a)) = self.pending.pop_front() else {
                    break;
                };
                let t = if spread {
                    t + (2 * i + 1) * 1_000_000_000 / (2 * n)
                } else {
                    t
                };
                let start = *self.start.get_or_insert(t);
                if self.stats.attempts == 0 {
                    self.stats.start_unix_ns = t;
                }
                // Attempts never go back in time (the span is the last one's time so far).
                let at = (((t - start) as f64 / self.speedup) as u64).max(self.stats.span_ns);
                self.stats.span_ns = at;
                self.stats.attempts += 1;
                out(Attempt { at, ..a });
            }
        }
    }

    /// One CSV row (already split into fields), at 1-based `line`.
    pub fn row(&mut self, line: u64, fields: &csv::ByteRecord) -> Result<(), TraceError> {
        self.stats.records += 1;
        let bad = |message: String| TraceError::Row { line, message };
        let field = |i: usize| fields.get(i).map(trim).unwrap_or_default();
        let (ts, src, user, trunk, call_id) = match fields.len() {
            5 => (field(0), field(1), field(2), field(3), field(4)),
            4 => (field(0), field(1), field(2), &b""[..], field(3)),
            n => {
                return Err(bad(format!(
                    "{n} fields; want timestamp, source_ip, sip_username, trunk (may be empty), call_id"
                )));
            }
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let unix_ns = parse_timestamp(ts).ok_or_else(|| {
            bad(format!(
                "timestamp {:?} is neither Unix seconds (1732000000.125) nor RFC 3339 (2024-11-19T07:06:40.125Z)",
                text(ts)
            ))
        })?;
        let src = parse_source(src).ok_or_else(|| {
            bad(format!(
                "source_ip {:?} is not an IP address (or ip:port)",
                text(src)
            ))
        })?;
        if call_id.is_empty() {
            return Err(bad("call_id is empty".into()));
        }
        let user = (!user.is_empty()).then_some(user);
        let origin = if trunk.is_empty() {
            // A CSV row has no headers: trunks matched by a header need the trunk column.
            self.routes.classify_with(src, || user, |_, _| false)
        } else {
            let name = std::str::from_utf8(trunk).unwrap_or_default();
            match self.trunk_names.iter().position(|n| n == name) {
                Some(t) => Origin::Trunk(t),
                None => {
                    return Err(bad(format!(
                        "trunk {:?} is not a [[trunk]] of the configuration",
                        text(trunk)
                    )));
                }
            }
        };
        let key = self.keys.hash(b'c', call_id);
        if !self.is_new(key, unix_ns) {
            return Ok(());
        }
        self.metered(unix_ns, origin, src.ip(), user, key, 0, false)
            .map_err(bad)
    }

    /// One captured packet: `data` from the link layer on, `linktype` as the capture says,
    /// `truncated` when the capture kept less than the whole frame.
    pub fn packet(
        &mut self,
        number: u64,
        unix_ns: u64,
        linktype: i32,
        data: &[u8],
        truncated: bool,
    ) -> Result<(), TraceError> {
        self.stats.records += 1;
        let bad = |message: String| TraceError::Packet {
            packet: number,
            message,
        };
        let unparsable = |s: &mut Self, why: &str| {
            s.stats.unparsable += 1;
            if s.stats.unparsable_examples.len() < 10 {
                s.stats.unparsable_examples.push(number);
            }
            tracing::debug!(
                packet = number,
                why,
                "not a SIP message the proxy would take"
            );
        };
        let (src, payload) = match udp_payload(linktype, data) {
            Ok(Frame::Udp(src, payload)) => (src, payload),
            Ok(Frame::Other) => {
                self.stats.skipped_packets += 1;
                return Ok(());
            }
            // A datagram over the MTU: the first fragment holds the start of the message, but
            // not all of it.
            Ok(Frame::Fragment) => {
                unparsable(self, "fragmented datagram (not reassembled)");
                return Ok(());
            }
            Err(why) if truncated => {
                return Err(bad(format!(
                    "{why}: the capture kept only {} bytes of it (capture with a full snap length, e.g. tcpdump -s 0)",
                    data.len()
                )));
            }
            Err(why) => {
                unparsable(self, why);
                return Ok(());
            }
        };
        if self.own.contains(&src) {
            self.stats.from_gate += 1;
            return Ok(());
        }
        // Keep-alives (CRLF) and other non-SIP UDP on the same ports.
        if payload.iter().all(|b| b.is_ascii_whitespace()) || !payload.contains(&b'\n') {
            self.stats.skipped_packets += 1;
            return Ok(());
        }
        let Ok(msg) = Message::scan(payload) else {
            unparsable(self, "the scanner refuses it");
            return Ok(());
        };
        if msg.is_response() || msg.method() != Some(b"INVITE") {
            self.stats.other_sip += 1;
            return Ok(());
        }
        let req = match RequestView::parse(&msg) {
            Ok(r) if msg.defect().is_none() => r,
            _ => {
                unparsable(self, "an INVITE the proxy would answer 400");
                return Ok(());
            }
        };
        if req.method != Method::Invite || req.to_tag(payload).is_some() {
            self.stats.other_sip += 1;
            return Ok(());
        }
        let key = self.keys.transaction(DECISION_LABEL, &msg, &req.top_via);
        if !self.is_new(key, unix_ns) {
            return Ok(());
        }
        let origin = self.routes.classify(src, &msg, &req);
        let user = crate::routing::sip_username(&msg, &req);
        let attempt = self.keys.attempt(&msg, &req);
        let cseq = req.cseq.as_ref().map_or(0, |c| c.0);
        let credentials = msg.first(HeaderName::Authorization).is_some()
            || msg.first(HeaderName::ProxyAuthorization).is_some();
        self.metered(unix_ns, origin, src.ip(), user, attempt, cseq, credentials)
            .map_err(bad)
    }

    #[allow(clippy::too_many_arguments)]
    fn metered(
        &mut self,
        unix_ns: u64,
        origin: Origin,
        ip: IpAddr,
        user: Option<&[u8]>,
        attempt: u64,
        cseq: u32,
        credentials: bool,
    ) -> Result<(), String> {
        let ask = admission::ask(
            &self.keys,
            &self.routes,
            self.unknown_sources,
            self.per_username,
            origin,
            ip,
            || user,
        );
        match (ask, origin) {
            (Some(ask), _) => self.push(
                unix_ns,
                Attempt {
                    at: 0,
                    ask,
                    attempt,
                    cseq,
                    credentials,
                },
            ),
            (None, Origin::Carrier(_)) => {
                self.stats.from_carriers += 1;
                Ok(())
            }
            (None, _) => {
                self.stats.unmetered += 1;
                Ok(())
            }
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// `ip`, `ip:port` or `[v6]:port`; the port defaults to 5060.
fn parse_source(b: &[u8]) -> Option<SocketAddr> {
    let s = std::str::from_utf8(b).ok()?;
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    s.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
}

/// Unix seconds with an optional fraction, or RFC 3339 (`2024-11-19T07:06:40.125Z`, `+01:00`
/// offsets, a space instead of `T`), as nanoseconds since the Unix epoch.
pub fn parse_timestamp(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let digits = |p: &str| p.bytes().all(|c| c.is_ascii_digit());
        if whole.is_empty() || frac.len() > 9 || !digits(whole) || !digits(frac) {
            return None;
        }
        let secs: u64 = whole.parse().ok()?;
        let mut ns = 0u64;
        for (i, d) in frac.bytes().enumerate() {
            ns += u64::from(d - b'0') * 10u64.pow(8 - i as u32);
        }
        return secs.checked_mul(1_000_000_000)?.checked_add(ns);
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut ns = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        for (k, d) in digits.bytes().take(9).enumerate() {
            ns += i64::from(d - b'0') * 10i64.pow(8 - k as u32);
        }
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6
            && matches!(tz.as_bytes()[0], b'+' | b'-')
            && tz.as_bytes()[3] == b':' =>
        {
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            let sign = if tz.as_bytes()[0] == b'-' { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let total = i128::from(secs) * 1_000_000_000 + i128::from(ns);
    u64::try_from(total).ok()
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The RFC 3339 form (UTC, milliseconds) of nanoseconds since the Unix epoch.
pub fn format_timestamp(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let ms = (unix_ns / 1_000_000) % 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// What a captured frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole UDP datagram: its source and payload.
    Udp(SocketAddr, &'a [u8]),
    /// A fragment of a larger IP datagram.
    Fragment,
    /// Anything else: another protocol, another link type.
    Other,
}

/// The UDP datagram of a captured frame; `Err` for a frame whose headers are cut short or
/// inconsistent (the caller knows whether the capture cut it).
pub fn udp_payload(linktype: i32, data: &[u8]) -> Result<Frame<'_>, &'static str> {
    const SHORT: &str = "frame cut short before the end of its headers";
    // (ethertype, offset of the network header)
    let (ethertype, mut off) = match linktype {
        // Ethernet, with up to two VLAN tags.
        1 => {
            let mut off = 12;
            let mut et;
            loop {
                et = u16::from_be_bytes([
                    *data.get(off).ok_or(SHORT)?,
                    *data.get(off + 1).ok_or(SHORT)?,
                ]);
                off += 2;
                if !matches!(et, 0x8100 | 0x88a8) || off > 20 {
                    break;
                }
                off += 2;
            }
            (et, off)
        }
        // BSD loopback: a 4-byte address family in host order.
        0 | 108 => {
            let fam = data.get(..4).ok_or(SHORT)?;
            let le = u32::from_le_bytes([fam[0], fam[1], fam[2], fam[3]]);
            let be = u32::from_be_bytes([fam[0], fam[1], fam[2], fam[3]]);
            let et = match (le.min(be), le.max(be)) {
                (2, _) => 0x0800,
                (24 | 28 | 30, _) => 0x86dd,
                _ => return Ok(Frame::Other),
            };
            (et, 4)
        }
        // Raw IP.
        101 | 228 | 229 => match data.first().map(|b| b >> 4) {
            Some(4) => (0x0800, 0),
            Some(6) => (0x86dd, 0),
            Some(_) => return Ok(Frame::Other),
            None => return Err(SHORT),
        },
        // Linux cooked capture v1 and v2.
        113 => (
            u16::from_be_bytes([*data.get(14).ok_or(SHORT)?, *data.get(15).ok_or(SHORT)?]),
            16,
        ),
        276 => (
            u16::from_be_bytes([*data.first().ok_or(SHORT)?, *data.get(1).ok_or(SHORT)?]),
            20,
        ),
        _ => return Ok(Frame::Other),
    };
    let (src_ip, proto, l4) = match ethertype {
        0x0800 => {
            let ip = data.get(off..off + 20).ok_or(SHORT)?;
            if ip[0] >> 4 != 4 {
                return Err("IPv4 ethertype but not an IPv4 header");
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ihl < 20 || total < ihl {
                return Err("IPv4 header length or total length is wrong");
            }
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if frag & 0x3fff != 0 {
                // An offset, or more fragments to come.
                return Ok(Frame::Fragment);
            }
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let end = (off + total).min(data.len());
            let proto = ip[9];
            off += ihl;
            (src, proto, data.get(off..end).ok_or(SHORT)?)
        }
        0x86dd => {
            let ip = data.get(off..off + 40).ok_or(SHORT)?;
            let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let mut src = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            let mut next = ip[6];
            off += 40;
            let end = (off + payload_len).min(data.len());
            // Hop-by-hop, routing and destination options; a fragment header ends the walk.
            let mut hops = 0;
            while matches!(next, 0 | 43 | 60) && hops < 8 {
                let h = data.get(off..off + 2).ok_or(SHORT)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
                hops += 1;
            }
            if next == 44 {
                return Ok(Frame::Fragment);
            }
            (
                IpAddr::V6(Ipv6Addr::from(src)),
                next,
                data.get(off..end.max(off)).ok_or(SHORT)?,
            )
        }
        _ => return Ok(Frame::Other),
    };
    if proto != 17 {
        return Ok(Frame::Other);
    }
    let udp = l4.get(..8).ok_or(SHORT)?;
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if len < 8 {
        return Err("UDP length below 8");
    }
    if len > l4.len() {
        return Err("UDP datagram longer than its IP packet");
    }
    Ok(Frame::Udp(SocketAddr::new(src_ip, sport), &l4[8..len]))
}

/// Read a CSV trace: every row through `classifier`, every settled attempt to `out`.
pub fn read_csv(
    path: &Path,
    classifier: &mut Classifier,
    mut out: impl FnMut(Attempt),
) -> Result<(), TraceError> {
    let io = |source| TraceError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .buffer_capacity(1 << 16)
        .from_reader(file);
    let mut rec = csv::ByteRecord::new();
    let mut first = true;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                return Err(TraceError::Row {
                    line,
                    message: e.to_string(),
                });
            }
        }
        let line = rec.position().map_or(0, |p| p.line());
        // A byte-order mark (spreadsheet exports) before the first field.
        if first && let Some(f) = rec.get(0).and_then(|f| f.strip_prefix(b"\xef\xbb\xbf")) {
            let mut clean = csv::ByteRecord::new();
            clean.push_field(f);
            for f in rec.iter().skip(1) {
                clean.push_field(f);
            }
            rec = clean;
        }
        // A header row names the columns.
        if first
            && rec
                .get(0)
                .is_some_and(|f| trim(f).eq_ignore_ascii_case(b"timestamp"))
        {
            first = false;
            continue;
        }
        first = false;
        if rec.iter().all(|f| trim(f).is_empty()) {
            continue;
        }
        classifier.row(line, &rec)?;
        classifier.drain(false, &mut out);
    }
    classifier.drain(true, &mut out);
    Ok(())
}

/// Read a pcap or pcapng capture: every UDP packet through `classifier`, every settled attempt
/// to `out`.
pub fn read_pcap(
    path: &Path,
    classifier: &mut Classifier,
    mut out: impl FnMut(Attempt),
) -> Result<(), TraceError> {
    use pcap_parser::pcapng::Block;
    use pcap_parser::{PcapBlockOwned, PcapError};
    let io = |source| TraceError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = pcap_parser::create_reader(1 << 20, file)
        .map_err(|e| TraceError::Capture(format!("{e:?}")))?;
    // Legacy: (linktype, nanosecond timestamps); pcapng: per interface (linktype, units per
    // second, offset seconds).
    let mut legacy = (1i32, false);
    let mut interfaces: Vec<(i32, u64, i64)> = Vec::new();
    let mut number = 0u64;
    let mut stalled = 0;
    loop {
        match reader.next() {
            Ok((offset, block)) => {
                stalled = 0;
                let packet = match block {
                    PcapBlockOwned::LegacyHeader(h) => {
                        legacy = (h.network.0, h.is_nanosecond_precision());
                        None
                    }
                    PcapBlockOwned::Legacy(b) => {
                        let frac = if legacy.1 {
                            u64::from(b.ts_usec)
                        } else {
                            u64::from(b.ts_usec) * 1000
                        };
                        let ns = u64::from(b.ts_sec) * 1_000_000_000 + frac;
                        let len = (b.caplen as usize).min(b.data.len());
                        Some((ns, legacy.0, &b.data[..len], b.caplen < b.origlen))
                    }
                    PcapBlockOwned::NG(Block::SectionHeader(_)) => {
                        interfaces.clear();
                        None
                    }
                    PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                        // if_tsresol: 10^-n seconds, or 2^-n with the top bit set.
                        let r = idb.if_tsresol;
                        let res = if r & 0x80 == 0 {
                            10u64.checked_pow(u32::from(r))
                        } else {
                            1u64.checked_shl(u32::from(r & 0x7f))
                        };
                        let Some(res) = res.filter(|&r| r > 0) else {
                            return Err(TraceError::Packet {
                                packet: number + 1,
                                message: format!(
                                    "interface {} has an invalid timestamp resolution (if_tsresol {r:#x})",
                                    interfaces.len()
                                ),
                            });
                        };
                        interfaces.push((idb.linktype.0, res, idb.ts_offset()));
                        None
                    }
                    PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                        let Some(&(lt, res, off)) = interfaces.get(epb.if_id as usize) else {
                            return Err(TraceError::Packet {
                                packet: number + 1,
                                message: format!(
                                    "names interface {} that no interface block describes",
                                    epb.if_id
                                ),
                            });
                        };
                        let ts = (u64::from(epb.ts_high) << 32) | u64::from(epb.ts_low);
                        let frac = (u128::from(ts % res) * 1_000_000_000 / u128::from(res)) as u64;
                        let ns = i64::try_from(ts / res)
                            .ok()
                            .and_then(|s| s.checked_add(off))
                            .and_then(|s| u64::try_from(s).ok())
                            .and_then(|s| s.checked_mul(1_000_000_000))
                            .and_then(|s| s.checked_add(frac));
                        let Some(ns) = ns else {
                            return Err(TraceError::Packet {
                                packet: number + 1,
                                message: "timestamp before 1970 or past 2554".into(),
                            });
                        };
                        let len = (epb.caplen as usize).min(epb.data.len());
                        Some((ns, lt, &epb.data[..len], epb.caplen < epb.origlen))
                    }
                    PcapBlockOwned::NG(Block::SimplePacket(_)) => {
                        // No timestamp: it cannot be placed in time.
                        number += 1;
                        classifier.stats.records += 1;
                        classifier.stats.skipped_packets += 1;
                        None
                    }
                    PcapBlockOwned::NG(_) => None,
                };
                if let Some((ns, lt, data, truncated)) = packet {
                    number += 1;
                    classifier.packet(number, ns, lt, data, truncated)?;
                    classifier.drain(false, &mut out);
                }
                reader.consume(offset);
            }
            Err(PcapError::Eof) => break,
            Err(PcapError::Incomplete(_)) if stalled < 2 => {
                stalled += 1;
                reader.refill().map_err(|e| TraceError::Packet {
                    packet: number + 1,
                    message: format!("cannot read the capture on: {e:?}"),
                })?;
            }
            Err(PcapError::UnexpectedEof | PcapError::Incomplete(_)) => {
                return Err(TraceError::Packet {
                    packet: number + 1,
                    message: "the capture ends inside this packet (truncated file)".into(),
                });
            }
            Err(e) => {
                return Err(TraceError::Packet {
                    packet: number + 1,
                    message: format!("malformed block: {e:?}"),
                });
            }
        }
    }
    classifier.drain(true, &mut out);
    Ok(())
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        /// Any bytes: a timestamp or `None`, never a panic; what the formatter writes reads back.
        #[test]
        fn timestamps_never_panic_and_round_trip(b in proptest::collection::vec(proptest::num::u8::ANY, 0..40), ms in 0u64..16_000_000_000_000) {
            let _ = super::parse_timestamp(&b);
            let ns = ms * 1_000_000;
            proptest::prop_assert_eq!(super::parse_timestamp(super::format_timestamp(ns).as_bytes()), Some(ns));
            let unix = format!("{}.{:03}", ms / 1000, ms % 1000);
            proptest::prop_assert_eq!(super::parse_timestamp(unix.as_bytes()), Some(ns));
        }

        /// Any frame under any link type — random bytes, or a real UDP frame with one header
        /// byte changed and cut anywhere: a datagram, a skip or an error, never a panic; a
        /// datagram's payload lies inside the frame.
        #[test]
        fn frames_never_panic(
            link in proptest::sample::select(vec![0, 1, 101, 108, 113, 228, 229, 276]),
            b in proptest::collection::vec(proptest::num::u8::ANY, 0..120),
            at in 0usize..42,
            byte in proptest::num::u8::ANY,
            cut in 0usize..60,
        ) {
            let mut real = ipv4_udp([10, 0, 0, 1], 5060, b"INVITE sip:x SIP/2.0");
            real[at] = byte;
            real.truncate(real.len().saturating_sub(cut));
            for frame in [&b[..], &real[..], &real[real.len().min(14)..]] {
                if let Ok(super::Frame::Udp(_, p)) = super::udp_payload(link, frame) {
                    let start = p.as_ptr() as usize - frame.as_ptr() as usize;
                    proptest::prop_assert!(start + p.len() <= frame.len());
                }
            }
        }
    }

    use super::*;

    #[test]
    fn timestamps_in_unix_seconds_and_rfc_3339() {
        assert_eq!(
            parse_timestamp(b"1732000000"),
            Some(1_732_000_000_000_000_000)
        );
        assert_eq!(
            parse_timestamp(b"1732000000.125"),
            Some(1_732_000_000_125_000_000)
        );
        assert_eq!(parse_timestamp(b"0.000000001"), Some(1));
        assert_eq!(
            parse_timestamp(b"2024-11-19T07:06:40Z"),
            Some(1_732_000_000_000_000_000)
        );
        assert_eq!(
            parse_timestamp(b"2024-11-19 07:06:40.125Z"),
            Some(1_732_000_000_125_000_000)
        );
        assert_eq!(
            parse_timestamp(b"2024-11-19T08:06:40.125+01:00"),
            Some(1_732_000_000_125_000_000)
        );
        assert_eq!(
            parse_timestamp(b"2000-02-29T00:00:00Z"),
            Some(951_782_400_000_000_000)
        );
        for bad in [
            &b"1764576000.1.5"[..],
            b"1764576000..",
            &b""[..],
            b".5",
            b"1.0000000001",
            b"12:00",
            b"2024-13-01T00:00:00Z",
            b"2024-11-19T07:06:40",
            b"2024-11-19T25:00:00Z",
            b"1e9",
        ] {
            assert_eq!(
                parse_timestamp(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            format_timestamp(1_732_000_000_125_000_000),
            "2024-11-19T07:06:40.125Z"
        );
        assert_eq!(
            format_timestamp(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn sources_with_and_without_a_port() {
        assert_eq!(
            parse_source(b"10.0.0.1"),
            Some("10.0.0.1:5060".parse().unwrap())
        );
        assert_eq!(
            parse_source(b"10.0.0.1:5080"),
            Some("10.0.0.1:5080".parse().unwrap())
        );
        assert_eq!(
            parse_source(b"2001:db8::1"),
            Some("[2001:db8::1]:5060".parse().unwrap())
        );
        assert_eq!(
            parse_source(b"[2001:db8::1]:7"),
            Some("[2001:db8::1]:7".parse().unwrap())
        );
        assert_eq!(parse_source(b"pbx.example"), None);
    }

    fn ipv4_udp(src: [u8; 4], sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
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
        f.extend_from_slice(&src);
        f.extend_from_slice(&[192, 0, 2, 1]);
        let len = (8 + payload.len()) as u16;
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&5060u16.to_be_bytes());
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn udp_payloads_from_ethernet_frames() {
        let f = ipv4_udp([10, 1, 0, 5], 5062, b"hello");
        let src = "10.1.0.5:5062".parse().unwrap();
        assert_eq!(udp_payload(1, &f), Ok(Frame::Udp(src, b"hello")));
        // Raw IP: the same without the Ethernet header.
        assert_eq!(udp_payload(101, &f[14..]), Ok(Frame::Udp(src, b"hello")));
        // Cut short by the snap length: an error, not a silent skip.
        assert!(udp_payload(1, &f[..f.len() - 2]).is_err());
        assert!(udp_payload(1, &f[..20]).is_err());
        // TCP, ARP and later fragments are skipped.
        let mut tcp = f.clone();
        tcp[14 + 9] = 6;
        assert_eq!(udp_payload(1, &tcp), Ok(Frame::Other));
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(udp_payload(1, &arp), Ok(Frame::Other));
        // Fragments: a later one, and the first of several (more-fragments flag).
        let mut frag = f.clone();
        frag[14 + 7] = 0x10;
        assert_eq!(udp_payload(1, &frag), Ok(Frame::Fragment));
        let mut first = f.clone();
        first[14 + 6] = 0x20;
        assert_eq!(udp_payload(1, &first), Ok(Frame::Fragment));
        // An unknown link type is skipped.
        assert_eq!(udp_payload(147, &f), Ok(Frame::Other));
    }

    #[test]
    fn udp_payloads_over_ipv6_and_cooked_captures() {
        let payload = b"INVITE";
        let mut v6 = vec![0x60, 0, 0, 0];
        v6.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        // Next header: hop-by-hop options (8 bytes), then UDP.
        v6.extend_from_slice(&[0, 64]);
        let src: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
        v6.extend_from_slice(&src.octets());
        v6.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 0]);
        v6[5] += 8;
        v6.extend_from_slice(&5070u16.to_be_bytes());
        v6.extend_from_slice(&5060u16.to_be_bytes());
        v6.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        v6.extend_from_slice(&[0, 0]);
        v6.extend_from_slice(payload);
        let want = Frame::Udp("[2001:db8::5]:5070".parse().unwrap(), payload);
        // Raw IPv6.
        assert_eq!(udp_payload(229, &v6), Ok(want));
        // Linux cooked capture v1: 16 bytes, the protocol last.
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x86, 0xdd]);
        sll.extend_from_slice(&v6);
        assert_eq!(udp_payload(113, &sll), Ok(want));
        // v2: 20 bytes, the protocol first.
        let mut sll2 = vec![0x86, 0xdd];
        sll2.extend_from_slice(&[0u8; 18]);
        sll2.extend_from_slice(&v6);
        assert_eq!(udp_payload(276, &sll2), Ok(want));
        // A fragment header: not reassembled.
        let mut frag = v6.clone();
        frag[6] = 44;
        assert_eq!(udp_payload(229, &frag), Ok(Frame::Fragment));
    }
}
