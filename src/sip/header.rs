//! Views of single header values: names (with compact forms), Via, name-addr, CSeq and the
//! (Proxy-)Authorization username. Every view keeps absolute byte ranges into the message so the
//! rewriter can splice at exact positions. Linear whitespace, including the CR LF of folded lines,
//! is accepted wherever RFC 3261 §25.1 allows LWS.

use std::ops::Range;

use super::scan::{is_token_char, parse_decimal, trim_lws};
use super::uri::{Host, Uri};

/// Header names the proxy looks at; every other name is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderName {
    /// `Via` / `v`.
    Via,
    /// `From` / `f`.
    From,
    /// `To` / `t`.
    To,
    /// `Call-ID` / `i`.
    CallId,
    /// `CSeq`.
    CSeq,
    /// `Max-Forwards`.
    MaxForwards,
    /// `Route`.
    Route,
    /// `Record-Route`.
    RecordRoute,
    /// `Content-Length` / `l`.
    ContentLength,
    /// `Contact` / `m`.
    Contact,
    /// `Authorization`.
    Authorization,
    /// `Proxy-Authorization`.
    ProxyAuthorization,
    /// `Proxy-Require`.
    ProxyRequire,
    /// Anything else.
    Other,
}

impl HeaderName {
    /// Recognise a header name case-insensitively, compact forms included (RFC 3261 §7.3.3).
    pub fn from_bytes(name: &[u8]) -> Self {
        if name.len() == 1 {
            return match name[0].to_ascii_lowercase() {
                b'v' => Self::Via,
                b'f' => Self::From,
                b't' => Self::To,
                b'i' => Self::CallId,
                b'l' => Self::ContentLength,
                b'm' => Self::Contact,
                _ => Self::Other,
            };
        }
        // Dispatch on length first: one comparison per header line instead of a scan.
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            2 if is(b"to") => Self::To,
            3 if is(b"via") => Self::Via,
            4 if is(b"from") => Self::From,
            4 if is(b"cseq") => Self::CSeq,
            5 if is(b"route") => Self::Route,
            7 if is(b"call-id") => Self::CallId,
            7 if is(b"contact") => Self::Contact,
            12 if is(b"max-forwards") => Self::MaxForwards,
            12 if is(b"record-route") => Self::RecordRoute,
            13 if is(b"authorization") => Self::Authorization,
            13 if is(b"proxy-require") => Self::ProxyRequire,
            14 if is(b"content-length") => Self::ContentLength,
            19 if is(b"proxy-authorization") => Self::ProxyAuthorization,
            _ => Self::Other,
        }
    }
}

/// The full name of a compact header form: RFC 3261 §7.3.3 plus the IANA registry's later ones.
pub fn expand_compact(name: &str) -> Option<&'static str> {
    let [c] = name.as_bytes() else { return None };
    Some(match c.to_ascii_lowercase() {
        b'a' => "Accept-Contact",
        b'b' => "Referred-By",
        b'c' => "Content-Type",
        b'd' => "Request-Disposition",
        b'e' => "Content-Encoding",
        b'f' => "From",
        b'i' => "Call-ID",
        b'j' => "Reject-Contact",
        b'k' => "Supported",
        b'l' => "Content-Length",
        b'm' => "Contact",
        b'n' => "Identity-Info",
        b'o' => "Event",
        b'r' => "Refer-To",
        b's' => "Subject",
        b't' => "To",
        b'u' => "Allow-Events",
        b'v' => "Via",
        b'x' => "Session-Expires",
        b'y' => "Identity",
        _ => return None,
    })
}

/// True when the written header name means `full` (case-insensitive, compact forms expanded).
pub fn name_matches(written: &[u8], full: &str) -> bool {
    if written.eq_ignore_ascii_case(full.as_bytes()) {
        return true;
    }
    std::str::from_utf8(written)
        .ok()
        .and_then(expand_compact)
        .is_some_and(|f| f.eq_ignore_ascii_case(full))
}

/// Split a header value into its comma-separated elements (RFC 3261 §7.3.1), ignoring commas in
/// quoted strings and inside `<…>`. Ranges are absolute and trimmed of LWS.
pub fn split_commas(buf: &[u8], value: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(1);
    // Most values have one element and nothing to skip: one vectorised search settles it.
    if memchr::memchr3(b',', b'"', b'<', &buf[value.clone()]).is_none() {
        push_trimmed(buf, value, &mut out);
        return out;
    }
    split_commas_into(buf, value, out)
}

/// The byte-by-byte split behind [`split_commas`].
fn split_commas_into(
    buf: &[u8],
    value: Range<usize>,
    mut out: Vec<Range<usize>>,
) -> Vec<Range<usize>> {
    let mut start = value.start;
    let mut i = value.start;
    let (mut quoted, mut angle) = (false, false);
    while i < value.end {
        match buf[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'<' if !quoted => angle = true,
            b'>' if !quoted => angle = false,
            b',' if !quoted && !angle => {
                push_trimmed(buf, start..i, &mut out);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    push_trimmed(buf, start..value.end, &mut out);
    out
}

fn push_trimmed(buf: &[u8], r: Range<usize>, out: &mut Vec<Range<usize>>) {
    let t = trim_range(buf, r);
    if !t.is_empty() {
        out.push(t);
    }
}

/// Shrink a range so it starts and ends on non-whitespace.
pub fn trim_range(buf: &[u8], mut r: Range<usize>) -> Range<usize> {
    while r.start < r.end && buf[r.start].is_ascii_whitespace() {
        r.start += 1;
    }
    while r.end > r.start && buf[r.end - 1].is_ascii_whitespace() {
        r.end -= 1;
    }
    r
}

/// A transport named in a Via or URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS (recognised, not served).
    Tls,
    /// Anything else (SCTP, WS…).
    Other,
}

impl Transport {
    /// Parse a transport token case-insensitively.
    pub fn from_bytes(t: &[u8]) -> Self {
        if t.eq_ignore_ascii_case(b"udp") {
            Self::Udp
        } else if t.eq_ignore_ascii_case(b"tcp") {
            Self::Tcp
        } else if t.eq_ignore_ascii_case(b"tls") {
            Self::Tls
        } else {
            Self::Other
        }
    }

    /// The upper-case token used in a Via.
    pub fn as_via(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
            Self::Other => "OTHER",
        }
    }
}

/// One generic parameter `;name[=value]` with absolute ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The whole parameter, from its `;` to the end of its value.
    pub whole: Range<usize>,
    /// The name.
    pub name: Range<usize>,
    /// The value, when there is one (quotes kept).
    pub value: Option<Range<usize>>,
}

/// Parse `*( SEMI generic-param )` starting at `pos` up to `end`. Returns the parameters and where
/// parsing stopped (end of the parameter list).
pub fn parse_params(buf: &[u8], mut pos: usize, end: usize) -> (Vec<Param>, usize) {
    let mut params = Vec::new();
    loop {
        let p = skip_lws(buf, pos, end);
        if p >= end || buf[p] != b';' {
            return (params, pos);
        }
        let semi = p;
        let ns = skip_lws(buf, p + 1, end);
        let ne = span(buf, ns, end, &PARAM_NAME);
        if ne == ns {
            return (params, pos);
        }
        let mut after = ne;
        let mut value = None;
        let q = skip_lws(buf, ne, end);
        if q < end && buf[q] == b'=' {
            let vs = skip_lws(buf, q + 1, end);
            let ve = if vs < end && buf[vs] == b'"' {
                let mut ve = vs + 1;
                while ve < end && buf[ve] != b'"' {
                    if buf[ve] == b'\\' {
                        ve += 1;
                    }
                    ve += 1;
                }
                (ve + 1).min(end)
            } else {
                span(buf, vs, end, &PARAM_VALUE)
            };
            value = Some(vs..ve);
            after = ve;
        }
        params.push(Param {
            whole: semi..after,
            name: ns..ne,
            value,
        });
        pos = after;
    }
}

/// Bytes of a parameter name: token characters and the brackets of an IPv6 reference.
const PARAM_NAME: [bool; 256] = char_table(b"[]");
/// Bytes of an unquoted parameter value: token characters, brackets and colons (IPv6).
const PARAM_VALUE: [bool; 256] = char_table(b"[]:");

/// Token characters (RFC 3261 §25.1) plus `extra`, as a table.
const fn char_table(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        i += 1;
    }
    let mut j = 0;
    while j < extra.len() {
        t[extra[j] as usize] = true;
        j += 1;
    }
    t
}

/// The end of the run of bytes from `from` that `table` allows (at most `end`).
fn span(buf: &[u8], from: usize, end: usize, table: &[bool; 256]) -> usize {
    from + buf[from..end]
        .iter()
        .position(|&b| !table[usize::from(b)])
        .unwrap_or(end - from)
}

fn skip_lws(buf: &[u8], mut pos: usize, end: usize) -> usize {
    while pos < end && buf[pos].is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

/// Find a parameter by name (case-insensitive).
pub fn find_param<'p>(buf: &[u8], params: &'p [Param], name: &[u8]) -> Option<&'p Param> {
    params
        .iter()
        .find(|p| buf[p.name.clone()].eq_ignore_ascii_case(name))
}

/// The `rport` parameter of a Via (RFC 3581 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rport {
    /// Absent.
    Absent,
    /// Present without a value: the client asks us to fill it in; the range covers `rport`.
    Requested(Range<usize>),
    /// Present with a port number.
    Port(u16),
}

/// One Via value (`sent-protocol LWS sent-by *(SEMI via-params)`, RFC 3261 §20.42).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// The whole value range.
    pub range: Range<usize>,
    /// The transport of the sent-protocol.
    pub transport: Transport,
    /// sent-by host.
    pub host: Host,
    /// sent-by host range (brackets included for IPv6).
    pub host_range: Range<usize>,
    /// sent-by port.
    pub port: Option<u16>,
    /// The `branch` value range.
    pub branch: Option<Range<usize>>,
    /// The `received` value range.
    pub received: Option<Range<usize>>,
    /// The `rport` parameter.
    pub rport: Rport,
    /// All parameters.
    pub params: Vec<Param>,
}

/// Why a header value is malformed; the text becomes a `400` reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A Via value is malformed.
    #[error("Malformed Via")]
    Via,
    /// A From/To/Route/Record-Route/Contact value is malformed.
    #[error("Malformed Address")]
    Address,
    /// CSeq is not `number method`.
    #[error("Malformed CSeq")]
    CSeq,
    /// Max-Forwards is not a small number.
    #[error("Malformed Max-Forwards")]
    MaxForwards,
}

impl Via {
    /// Parse one Via value (an element of [`split_commas`]).
    pub fn parse(buf: &[u8], r: Range<usize>) -> Result<Self, HeaderError> {
        // sent-protocol = protocol-name SLASH protocol-version SLASH transport, LWS allowed
        // around each slash (RFC 4475 §3.1.1.1 wsinv shows `SIP  /   2.0   / UDP`).
        let end = r.end;
        let mut p = r.start;
        let mut parts: [Range<usize>; 3] = [0..0, 0..0, 0..0];
        for (i, part) in parts.iter_mut().enumerate() {
            p = skip_lws(buf, p, end);
            let s = p;
            while p < end && is_token_char(buf[p]) {
                p += 1;
            }
            if p == s {
                return Err(HeaderError::Via);
            }
            *part = s..p;
            if i < 2 {
                p = skip_lws(buf, p, end);
                if p >= end || buf[p] != b'/' {
                    return Err(HeaderError::Via);
                }
                p += 1;
            }
        }
        if !buf[parts[0].clone()].eq_ignore_ascii_case(b"SIP") {
            return Err(HeaderError::Via);
        }
        let transport = Transport::from_bytes(&buf[parts[2].clone()]);
        p = skip_lws(buf, p, end);
        let (host, host_range, port, after) =
            super::uri::parse_hostport(buf, p, end).ok_or(HeaderError::Via)?;
        let (params, stop) = parse_params(buf, after, end);
        if skip_lws(buf, stop, end) != end {
            // RFC 3261 allows a trailing comment only in some headers, never in Via.
            return Err(HeaderError::Via);
        }
        let branch = find_param(buf, &params, b"branch").and_then(|p| p.value.clone());
        let received = find_param(buf, &params, b"received").and_then(|p| p.value.clone());
        let rport = match find_param(buf, &params, b"rport") {
            None => Rport::Absent,
            Some(Param {
                value: None, name, ..
            }) => Rport::Requested(name.clone()),
            Some(Param { value: Some(v), .. }) => {
                match parse_decimal(&buf[v.clone()]).and_then(|n| u16::try_from(n).ok()) {
                    Some(port) => Rport::Port(port),
                    None => return Err(HeaderError::Via),
                }
            }
        };
        Ok(Via {
            range: r,
            transport,
            host,
            host_range,
            port,
            branch,
            received,
            rport,
            params,
        })
    }

    /// The branch bytes, if any.
    pub fn branch<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        self.branch.clone().map(|r| &buf[r])
    }

    /// The value of a parameter, if present with a value.
    pub fn param<'b>(&self, buf: &'b [u8], name: &[u8]) -> Option<&'b [u8]> {
        find_param(buf, &self.params, name)
            .and_then(|p| p.value.clone())
            .map(|r| &buf[r])
    }
}

/// A `name-addr` or `addr-spec` with header parameters: From, To, Contact, Route, Record-Route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// The whole element range.
    pub range: Range<usize>,
    /// The URI range (inside the angle brackets when present).
    pub uri: Range<usize>,
    /// The header parameters (after `>` or after an addr-spec).
    pub params: Vec<Param>,
}

impl NameAddr {
    /// Parse one element. RFC 3261 §20.10: without angle brackets the URI ends at the first `;`,
    /// whose parameters then belong to the header.
    pub fn parse(buf: &[u8], r: Range<usize>) -> Result<Self, HeaderError> {
        let end = r.end;
        let mut p = skip_lws(buf, r.start, end);
        let uri;
        if p < end && buf[p] == b'"' {
            p += 1;
            while p < end && buf[p] != b'"' {
                if buf[p] == b'\\' {
                    p += 1;
                }
                p += 1;
            }
            if p >= end {
                return Err(HeaderError::Address);
            }
            p += 1;
        }
        match memchr::memchr(b'<', &buf[p..end]) {
            Some(i) => {
                let lt = p + i;
                // Anything between a quoted display name and `<` must be LWS; an unquoted display
                // name is a sequence of tokens and LWS.
                if !buf[p..lt]
                    .iter()
                    .all(|&b| is_token_char(b) || b.is_ascii_whitespace() || b >= 0x80)
                {
                    return Err(HeaderError::Address);
                }
                let gt = memchr::memchr(b'>', &buf[lt..end]).ok_or(HeaderError::Address)? + lt;
                uri = lt + 1..gt;
                p = gt + 1;
            }
            None => {
                let s = p;
                while p < end && buf[p] != b';' && !buf[p].is_ascii_whitespace() {
                    p += 1;
                }
                if p == s {
                    return Err(HeaderError::Address);
                }
                uri = s..p;
            }
        }
        let (params, stop) = parse_params(buf, p, end);
        if skip_lws(buf, stop, end) != end || uri.is_empty() {
            return Err(HeaderError::Address);
        }
        Ok(NameAddr {
            range: r,
            uri,
            params,
        })
    }

    /// The `tag` parameter value.
    pub fn tag<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        find_param(buf, &self.params, b"tag")
            .and_then(|p| p.value.clone())
            .map(|r| &buf[r])
    }

    /// Parse the URI.
    pub fn parse_uri(&self, buf: &[u8]) -> Option<Uri> {
        Uri::parse(buf, self.uri.clone())
    }
}

/// Parse `CSeq: number method` (RFC 3261 §20.16); the number must fit 31 bits (§8.1.1.5).
pub fn parse_cseq(v: &[u8]) -> Result<(u32, &[u8]), HeaderError> {
    let v = trim_lws(v);
    let split = v
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .ok_or(HeaderError::CSeq)?;
    let n = parse_decimal(&v[..split])
        .filter(|&n| n < 1 << 31)
        .ok_or(HeaderError::CSeq)?;
    let method = trim_lws(&v[split..]);
    if method.is_empty() || !method.iter().all(|&b| is_token_char(b)) {
        return Err(HeaderError::CSeq);
    }
    Ok((n as u32, method))
}

/// Parse Max-Forwards (RFC 3261 §20.22: 0–255 in practice; anything over 255 is refused as
/// malformed, the torture test `scalar02` sends a 300-digit value).
pub fn parse_max_forwards(v: &[u8]) -> Result<u8, HeaderError> {
    parse_decimal(v)
        .and_then(|n| u8::try_from(n).ok())
        .ok_or(HeaderError::MaxForwards)
}

/// The `username` of a `Digest` (Proxy-)Authorization value, unquoted.
pub fn auth_username(v: &[u8]) -> Option<&[u8]> {
    let v = trim_lws(v);
    let sp = v.iter().position(|b| b.is_ascii_whitespace())?;
    let mut rest = &v[sp..];
    loop {
        rest = trim_lws(rest);
        let eq = rest.iter().position(|&b| b == b'=')?;
        let name = trim_lws(&rest[..eq]);
        let after = trim_lws(&rest[eq + 1..]);
        let (val, tail) = if let Some(body) = after.strip_prefix(b"\"") {
            let close = body.iter().position(|&b| b == b'"')?;
            (&body[..close], &body[close + 1..])
        } else {
            let e = after.iter().position(|&b| b == b',').unwrap_or(after.len());
            (trim_lws(&after[..e]), &after[e..])
        };
        if name.eq_ignore_ascii_case(b"username") {
            return Some(val);
        }
        let comma = tail.iter().position(|&b| b == b',')?;
        rest = &tail[comma + 1..];
    }
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        /// The one-search shortcut splits exactly as the byte-by-byte walk does.
        #[test]
        fn split_shortcut_agrees_with_the_walk(v in "[ a-z,;=<>\"\\\\]{0,40}") {
            let b = v.as_bytes();
            proptest::prop_assert_eq!(
                split_commas(b, 0..b.len()),
                split_commas_into(b, 0..b.len(), Vec::new())
            );
        }
    }

    use super::*;

    fn via(s: &str) -> Via {
        Via::parse(s.as_bytes(), 0..s.len()).unwrap()
    }

    #[test]
    fn compact_and_long_names_map_to_one_name() {
        for n in ["v", "V", "via", "VIA"] {
            assert_eq!(HeaderName::from_bytes(n.as_bytes()), HeaderName::Via);
        }
        assert_eq!(HeaderName::from_bytes(b"i"), HeaderName::CallId);
        assert_eq!(HeaderName::from_bytes(b"X-Foo"), HeaderName::Other);
        assert!(name_matches(b"k", "Supported"));
        assert!(name_matches(b"x-trunk", "X-Trunk"));
    }

    #[test]
    fn via_with_lws_around_slashes_and_ipv6() {
        let v = via(
            "SIP  /   2.0 /\r\n UDP [2001:db8::9:1]:5070;branch=z9hG4bKx;rport;received=1.2.3.4",
        );
        assert_eq!(v.transport, Transport::Udp);
        assert_eq!(v.port, Some(5070));
        assert_eq!(v.host, Host::Ip("2001:db8::9:1".parse().unwrap()));
        assert!(matches!(v.rport, Rport::Requested(_)));
        assert_eq!(v.param(b"SIP  /   2.0 /\r\n UDP [2001:db8::9:1]:5070;branch=z9hG4bKx;rport;received=1.2.3.4", b"received"), Some(&b"1.2.3.4"[..]));
    }

    #[test]
    fn via_rport_with_value_and_garbage_after_params() {
        assert_eq!(via("SIP/2.0/TCP h;rport=5062").rport, Rport::Port(5062));
        let s = "SIP/2.0/UDP h;branch=x junk";
        assert!(Via::parse(s.as_bytes(), 0..s.len()).is_err());
    }

    #[test]
    fn commas_split_outside_quotes_and_brackets() {
        let s = br#""a,b" <sip:x;y=1,2>;tag=1 , <sip:z>"#;
        let parts = split_commas(s, 0..s.len());
        assert_eq!(parts.len(), 2);
        assert_eq!(&s[parts[1].clone()], b"<sip:z>");
    }

    #[test]
    fn name_addr_forms() {
        let s = b"\"Al \\\"x\\\"\" <sip:al@h;transport=tcp>;tag=88";
        let n = NameAddr::parse(s, 0..s.len()).unwrap();
        assert_eq!(&s[n.uri.clone()], b"sip:al@h;transport=tcp");
        assert_eq!(n.tag(s), Some(&b"88"[..]));
        let s = b"sip:al@h;tag=99";
        let n = NameAddr::parse(s, 0..s.len()).unwrap();
        assert_eq!(&s[n.uri.clone()], b"sip:al@h");
        assert_eq!(n.tag(s), Some(&b"99"[..]));
    }

    #[test]
    fn cseq_and_max_forwards() {
        assert_eq!(
            parse_cseq(b"  42\r\n INVITE").unwrap(),
            (42, &b"INVITE"[..])
        );
        assert!(parse_cseq(b"4294967296 INVITE").is_err());
        assert_eq!(parse_max_forwards(b"70").unwrap(), 70);
        assert!(parse_max_forwards(b"256").is_err());
        assert!(parse_max_forwards(b"-1").is_err());
    }

    #[test]
    fn digest_username() {
        assert_eq!(
            auth_username(br#"Digest realm="x", username="acme-1", nonce="n""#),
            Some(&b"acme-1"[..])
        );
        assert_eq!(auth_username(b"Digest username=bob"), Some(&b"bob"[..]));
        assert_eq!(auth_username(b"Digest realm=\"x\""), None);
    }
}
