//! SIP URIs (RFC 3261 §19.1) and `hostport`, IPv6 references included (RFC 5118).

use std::net::{IpAddr, Ipv6Addr};
use std::ops::Range;

use super::header::{Param, Transport, find_param, parse_params};

/// A host: an IP literal or a name (kept as a range of the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An IPv4 address or a bracketed IPv6 reference.
    Ip(IpAddr),
    /// A domain name.
    Name(Range<usize>),
}

/// The scheme of a URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `sip:`
    Sip,
    /// `sips:`
    Sips,
    /// `tel:` (RFC 3966)
    Tel,
    /// Anything else; a proxy answers `416` (RFC 3261 §16.3 step 2).
    Other,
}

/// A parsed URI with absolute ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// The whole URI.
    pub range: Range<usize>,
    /// The scheme.
    pub scheme: Scheme,
    /// The user part (without password), for sip/sips; the number for tel.
    pub user: Option<Range<usize>>,
    /// The host (absent for tel and unknown schemes).
    pub host: Option<Host>,
    /// The host range (brackets included for IPv6).
    pub host_range: Option<Range<usize>>,
    /// The port.
    pub port: Option<u16>,
    /// URI parameters.
    pub params: Vec<Param>,
    /// The `?headers` part (after the `?`), if any.
    pub headers: Option<Range<usize>>,
}

impl Uri {
    /// Parse a URI; `None` when a sip/sips URI has no valid host. Unknown schemes parse with just
    /// their scheme so the caller can answer `416`.
    pub fn parse(buf: &[u8], r: Range<usize>) -> Option<Self> {
        let colon = memchr::memchr(b':', &buf[r.clone()])? + r.start;
        let scheme_bytes = &buf[r.start..colon];
        if scheme_bytes.is_empty()
            || !scheme_bytes[0].is_ascii_alphabetic()
            || !scheme_bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return None;
        }
        let scheme = if scheme_bytes.eq_ignore_ascii_case(b"sip") {
            Scheme::Sip
        } else if scheme_bytes.eq_ignore_ascii_case(b"sips") {
            Scheme::Sips
        } else if scheme_bytes.eq_ignore_ascii_case(b"tel") {
            Scheme::Tel
        } else {
            Scheme::Other
        };
        let mut uri = Uri {
            range: r.clone(),
            scheme,
            user: None,
            host: None,
            host_range: None,
            port: None,
            params: Vec::new(),
            headers: None,
        };
        let rest = colon + 1;
        match scheme {
            Scheme::Other => Some(uri),
            Scheme::Tel => {
                let end = memchr::memchr(b';', &buf[rest..r.end]).map_or(r.end, |i| rest + i);
                if end == rest {
                    return None;
                }
                uri.user = Some(rest..end);
                uri.params = parse_params(buf, end, r.end).0;
                Some(uri)
            }
            Scheme::Sip | Scheme::Sips => {
                // userinfo ends at the last '@': a user part may contain ';' and '?' (RFC 3261
                // §25.1 user-unreserved; RFC 4475 §3.1.1.2 intmeth, §3.1.1.9 semiuri), and a
                // '@' in the headers part must be escaped.
                let at = memchr::memrchr(b'@', &buf[rest..r.end]).map(|i| rest + i);
                let after_user = at.map_or(rest, |a| a + 1);
                let hp_end =
                    memchr::memchr(b'?', &buf[after_user..r.end]).map_or(r.end, |i| after_user + i);
                if hp_end < r.end {
                    uri.headers = Some(hp_end + 1..r.end);
                }
                let host_start = match at {
                    Some(at) => {
                        let user_end =
                            memchr::memchr(b':', &buf[rest..at]).map_or(at, |i| rest + i);
                        if user_end == rest {
                            return None;
                        }
                        uri.user = Some(rest..user_end);
                        at + 1
                    }
                    None => rest,
                };
                let (host, host_range, port, after) = parse_hostport(buf, host_start, hp_end)?;
                let (params, stop) = parse_params(buf, after, hp_end);
                if stop != hp_end {
                    return None;
                }
                uri.host = Some(host);
                uri.host_range = Some(host_range);
                uri.port = port;
                uri.params = params;
                Some(uri)
            }
        }
    }

    /// True when the URI carries `;lr` (a loose router, RFC 3261 §16.4).
    pub fn is_loose(&self, buf: &[u8]) -> bool {
        find_param(buf, &self.params, b"lr").is_some()
    }

    /// The `transport` parameter, if any.
    pub fn transport(&self, buf: &[u8]) -> Option<Transport> {
        find_param(buf, &self.params, b"transport")
            .and_then(|p| p.value.clone())
            .map(|v| Transport::from_bytes(&buf[v]))
    }

    /// The user part bytes.
    pub fn user<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        self.user.clone().map(|r| &buf[r])
    }
}

/// Parse `host [":" port]` from `pos`; returns the host, its range, the port and where it ended.
pub fn parse_hostport(
    buf: &[u8],
    pos: usize,
    end: usize,
) -> Option<(Host, Range<usize>, Option<u16>, usize)> {
    let mut p = pos;
    let host;
    if p < end && buf[p] == b'[' {
        let close = memchr::memchr(b']', &buf[p..end])? + p;
        let text = std::str::from_utf8(&buf[p + 1..close]).ok()?;
        host = Host::Ip(IpAddr::V6(text.parse::<Ipv6Addr>().ok()?));
        p = close + 1;
    } else {
        while p < end && (buf[p].is_ascii_alphanumeric() || matches!(buf[p], b'.' | b'-' | b'_')) {
            p += 1;
        }
        if p == pos {
            return None;
        }
        let text = &buf[pos..p];
        host = match parse_ipv4(text) {
            Some(v4) => Host::Ip(IpAddr::V4(v4)),
            None => {
                // A bare IPv6 address without brackets is not a valid SIP host (RFC 5118 §4.1).
                if text.iter().all(|&b| b.is_ascii_digit() || b == b'.') {
                    return None;
                }
                Host::Name(pos..p)
            }
        };
    }
    let host_range = pos..p;
    let mut port = None;
    // LWS may precede the port colon only in Via sent-by (RFC 3261 §20.42 uses COLON = LWS ":"
    // LWS); accept it in both places.
    let mut q = p;
    while q < end && buf[q].is_ascii_whitespace() {
        q += 1;
    }
    if q < end && buf[q] == b':' {
        q += 1;
        while q < end && buf[q].is_ascii_whitespace() {
            q += 1;
        }
        let s = q;
        while q < end && buf[q].is_ascii_digit() {
            q += 1;
        }
        if q == s || q - s > 5 {
            return None;
        }
        // At most five digits: no overflow of the u32.
        let n = buf[s..q]
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        port = Some(u16::try_from(n).ok()?);
        p = q;
    }
    Some((host, host_range, port, p))
}

/// A dotted-quad IPv4 address exactly as `Ipv4Addr::from_str` reads one (four decimal octets up
/// to 255, no leading zeros), without going through `str`: it is on every message's path.
fn parse_ipv4(b: &[u8]) -> Option<std::net::Ipv4Addr> {
    let mut out = [0u8; 4];
    let mut i = 0;
    for (k, octet) in out.iter_mut().enumerate() {
        if k > 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        let mut v = 0u32;
        while i < b.len() && i - start < 3 && b[i].is_ascii_digit() {
            v = v * 10 + u32::from(b[i] - b'0');
            i += 1;
        }
        if i == start || (i - start > 1 && b[start] == b'0') {
            return None;
        }
        *octet = u8::try_from(v).ok()?;
    }
    (i == b.len()).then(|| std::net::Ipv4Addr::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The byte parser accepts and reads exactly what the standard library does.
        #[test]
        fn ipv4_parser_agrees_with_std(s in "[0-9.]{0,17}") {
            proptest::prop_assert_eq!(parse_ipv4(s.as_bytes()), s.parse().ok());
        }

        /// Near-valid addresses: octets around 255, some written with leading zeros.
        #[test]
        fn ipv4_parser_agrees_with_std_on_quads(
            o in proptest::array::uniform4(0u32..300),
            padded in proptest::array::uniform4(proptest::bool::ANY),
        ) {
            let parts: Vec<String> = o
                .iter()
                .zip(padded)
                .map(|(n, p)| if p { format!("{n:03}") } else { n.to_string() })
                .collect();
            let s = parts.join(".");
            proptest::prop_assert_eq!(parse_ipv4(s.as_bytes()), s.parse().ok());
        }
    }

    #[test]
    fn ipv4_parser_edge_cases() {
        for s in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.5",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.",
            "1..3.4",
            "1.2.3.0004",
            "",
        ] {
            assert_eq!(parse_ipv4(s.as_bytes()), s.parse().ok(), "{s}");
        }
    }

    fn uri(s: &str) -> Option<Uri> {
        Uri::parse(s.as_bytes(), 0..s.len())
    }

    #[test]
    fn sip_uri_parts() {
        let s = "sip:+1555:pw@carrier.example:5080;transport=TCP;lr";
        let u = uri(s).unwrap();
        assert_eq!(u.scheme, Scheme::Sip);
        assert_eq!(u.user(s.as_bytes()), Some(&b"+1555"[..]));
        assert_eq!(u.port, Some(5080));
        assert_eq!(u.transport(s.as_bytes()), Some(Transport::Tcp));
        assert!(u.is_loose(s.as_bytes()));
    }

    #[test]
    fn ipv6_reference_and_bad_hosts() {
        let u = uri("sip:[2001:db8::10]:5070").unwrap();
        assert_eq!(u.host, Some(Host::Ip("2001:db8::10".parse().unwrap())));
        assert!(uri("sip:2001:db8::10").is_none());
        assert!(uri("sip:[2001:db8::10").is_none());
        assert!(uri("sip:a@").is_none());
        assert!(uri("sip:h:99999").is_none());
    }

    #[test]
    fn other_schemes_and_tel() {
        assert_eq!(uri("http://x").unwrap().scheme, Scheme::Other);
        let s = "tel:+15551234;phone-context=x";
        assert_eq!(uri(s).unwrap().user(s.as_bytes()), Some(&b"+15551234"[..]));
        assert!(uri("1sip:x").is_none());
    }

    #[test]
    fn question_marks_in_the_user_part_and_headers() {
        let s = "sip:crazy?,/;;*:&i@example.com;lr?Route=%3Csip:x%3E";
        let u = uri(s).unwrap();
        assert_eq!(u.user(s.as_bytes()), Some(&b"crazy?,/;;*"[..]));
        assert!(u.is_loose(s.as_bytes()));
        assert_eq!(&s[u.headers.unwrap()], "Route=%3Csip:x%3E");
    }
}
