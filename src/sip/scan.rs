//! The zero-copy scanner: one pass over a message that records where the start line, each header and
//! the body are. Nothing is copied or decoded here; views in [`crate::sip::header`] parse single values
//! on demand.
//!
//! Tolerance follows what carriers and PBXs really send (RFC 3261 §7.3.1, §7.5): leading CRLFs are
//! skipped, bare LF line ends are accepted, whitespace may precede the colon, continuation lines fold
//! into the previous header, names are case-insensitive and may be compact.

use std::ops::Range;

use super::header::HeaderName;

/// Most messages carry fewer headers than this; the index grows past it when needed.
const TYPICAL_HEADERS: usize = 24;

/// A scanned SIP message: the original bytes plus an index of byte ranges into them.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    start: StartLine,
    start_line: Range<usize>,
    headers: Vec<Header>,
    /// Offset where the empty line that ends the header section begins.
    headers_end: usize,
    body: Range<usize>,
    defect: Option<Defect>,
}

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// `Method SP Request-URI SP SIP-Version`.
    Request {
        /// Method token range.
        method: Range<usize>,
        /// Request-URI range.
        uri: Range<usize>,
        /// SIP-Version range.
        version: Range<usize>,
    },
    /// `SIP-Version SP Status-Code SP Reason-Phrase`.
    Response {
        /// SIP-Version range.
        version: Range<usize>,
        /// The three-digit status code.
        code: u16,
        /// Reason-Phrase range (may be empty).
        reason: Range<usize>,
    },
}

/// One header field: its name and value ranges and the whole line (continuations and line end
/// included), so a rewriter can remove or copy it verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The recognised name (compact forms mapped to the full name).
    pub name: HeaderName,
    /// The name as written.
    pub name_range: Range<usize>,
    /// The value, without leading/trailing whitespace; may span folded lines.
    pub value: Range<usize>,
    /// The whole field including its line end(s).
    pub line: Range<usize>,
}

/// A problem found while scanning that still leaves the message indexed, so a request can be
/// answered with `400` (RFC 3261 §8.2.2, §16.3) instead of being dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// The start line is not `Method SP URI SP Version` or `Version SP Code SP Reason`.
    StartLine,
    /// A header line has no colon, or a name with characters outside `token`.
    HeaderLine,
    /// A continuation line before the first header.
    Continuation,
    /// The header section does not end with an empty line.
    NoEmptyLine,
    /// Content-Length is not a number, or two Content-Length fields disagree.
    ContentLength,
    /// Content-Length announces more bytes than the datagram carries (RFC 3261 §18.3).
    BodyTooShort,
}

impl Defect {
    /// The reason phrase of the `400` this defect earns.
    pub fn reason(self) -> &'static str {
        match self {
            Defect::StartLine => "Bad Request Line",
            Defect::HeaderLine => "Malformed Header Line",
            Defect::Continuation => "Misplaced Continuation Line",
            Defect::NoEmptyLine => "Missing Empty Line After Headers",
            Defect::ContentLength => "Bad Content-Length",
            Defect::BodyTooShort => "Body Shorter Than Content-Length",
        }
    }
}

/// Why a buffer could not be indexed at all. Such input is never answered, only counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// Nothing but whitespace.
    #[error("empty message")]
    Empty,
    /// The first line is neither a request line nor a status line.
    #[error("not a SIP start line")]
    NotSip,
}

impl<'a> Message<'a> {
    /// Index a whole message. The body is cut at Content-Length when present (RFC 3261 §18.3:
    /// extra datagram bytes are discarded), otherwise it runs to the end of the buffer.
    pub fn scan(buf: &'a [u8]) -> Result<Self, ScanError> {
        let mut pos = 0;
        while pos < buf.len() && matches!(buf[pos], b'\r' | b'\n') {
            pos += 1;
        }
        if pos == buf.len() {
            return Err(ScanError::Empty);
        }
        let (line_end, next) = line_bounds(buf, pos);
        let mut defect = None;
        let start = match parse_start_line(buf, pos..line_end) {
            Some(s) => s,
            None => {
                let line = &buf[pos..line_end];
                // A line that merely looks like SIP (it names the version) is still indexed: a
                // request can be answered with 400, a response is dropped (RFC 4475 §3.1.2.19).
                if !looks_like_sip(line) {
                    return Err(ScanError::NotSip);
                }
                defect = Some(Defect::StartLine);
                if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
                    StartLine::Response {
                        version: pos..pos,
                        code: 0,
                        reason: pos..pos,
                    }
                } else {
                    StartLine::Request {
                        method: pos..pos,
                        uri: pos..pos,
                        version: pos..pos,
                    }
                }
            }
        };
        let start_line = pos..next;
        let mut msg = Message {
            buf,
            start,
            start_line,
            headers: Vec::with_capacity(TYPICAL_HEADERS),
            headers_end: buf.len(),
            body: buf.len()..buf.len(),
            defect,
        };
        msg.index_headers(next);
        msg.bound_body();
        Ok(msg)
    }

    fn index_headers(&mut self, mut pos: usize) {
        let buf = self.buf;
        loop {
            if pos >= buf.len() {
                self.headers_end = buf.len();
                self.body = buf.len()..buf.len();
                self.note(Defect::NoEmptyLine);
                return;
            }
            let (end, next) = line_bounds(buf, pos);
            if end == pos {
                self.headers_end = pos;
                self.body = next..buf.len();
                return;
            }
            if matches!(buf[pos], b' ' | b'\t') {
                // RFC 3261 §7.3.1: a continuation line belongs to the header above it.
                match self.headers.last_mut() {
                    Some(h) => {
                        let value_end = trim_end(buf, pos, end);
                        if value_end > pos {
                            if h.value.is_empty() {
                                h.value = skip_ws(buf, pos, end)..value_end;
                            } else {
                                h.value.end = value_end;
                            }
                        }
                        h.line.end = next;
                    }
                    None => self.note(Defect::Continuation),
                }
                pos = next;
                continue;
            }
            match parse_header_line(buf, pos, end, next) {
                Some(h) => self.headers.push(h),
                None => self.note(Defect::HeaderLine),
            }
            pos = next;
        }
    }

    fn bound_body(&mut self) {
        let mut declared: Option<usize> = None;
        for h in self
            .headers
            .iter()
            .filter(|h| h.name == HeaderName::ContentLength)
        {
            match parse_decimal(&self.buf[h.value.clone()]) {
                Some(n) if declared.is_none_or(|d| d == n) => declared = Some(n),
                _ => {
                    self.note(Defect::ContentLength);
                    return;
                }
            }
        }
        if let Some(n) = declared {
            let available = self.body.len();
            if n > available {
                self.note(Defect::BodyTooShort);
            } else {
                self.body.end = self.body.start + n;
            }
        }
    }

    fn note(&mut self, d: Defect) {
        self.defect.get_or_insert(d);
    }

    /// The bytes the message was scanned from.
    pub fn buf(&self) -> &'a [u8] {
        self.buf
    }

    /// The parsed start line.
    pub fn start(&self) -> &StartLine {
        &self.start
    }

    /// Range of the start line including its line end.
    pub fn start_line_range(&self) -> Range<usize> {
        self.start_line.clone()
    }

    /// Every header, in order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Offset of the empty line ending the header section (where new header lines may go).
    pub fn headers_end(&self) -> usize {
        self.headers_end
    }

    /// The body range (cut at Content-Length).
    pub fn body_range(&self) -> Range<usize> {
        self.body.clone()
    }

    /// The body bytes.
    pub fn body(&self) -> &'a [u8] {
        &self.buf[self.body.clone()]
    }

    /// The first problem found, if any.
    pub fn defect(&self) -> Option<Defect> {
        self.defect
    }

    /// True for a status line.
    pub fn is_response(&self) -> bool {
        matches!(self.start, StartLine::Response { .. })
    }

    /// The request method, or `None` for a response.
    pub fn method(&self) -> Option<&'a [u8]> {
        match &self.start {
            StartLine::Request { method, .. } => Some(&self.buf[method.clone()]),
            StartLine::Response { .. } => None,
        }
    }

    /// The Request-URI bytes of a request.
    pub fn request_uri(&self) -> Option<&'a [u8]> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(&self.buf[uri.clone()]),
            StartLine::Response { .. } => None,
        }
    }

    /// The Request-URI range of a request.
    pub fn request_uri_range(&self) -> Option<Range<usize>> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri.clone()),
            StartLine::Response { .. } => None,
        }
    }

    /// The SIP-Version bytes.
    pub fn version(&self) -> &'a [u8] {
        match &self.start {
            StartLine::Request { version, .. } | StartLine::Response { version, .. } => {
                &self.buf[version.clone()]
            }
        }
    }

    /// The status code of a response.
    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// Headers with the given name, in order.
    pub fn all(&self, name: HeaderName) -> impl Iterator<Item = &Header> + '_ {
        self.headers.iter().filter(move |h| h.name == name)
    }

    /// The first header with the given name.
    pub fn first(&self, name: HeaderName) -> Option<&Header> {
        self.headers.iter().find(|h| h.name == name)
    }

    /// The value bytes of the first header with the given name.
    pub fn value(&self, name: HeaderName) -> Option<&'a [u8]> {
        self.first(name).map(|h| &self.buf[h.value.clone()])
    }

    /// The bytes of a range of the message.
    pub fn slice(&self, r: Range<usize>) -> &'a [u8] {
        &self.buf[r]
    }
}

/// End of the line content (before CR LF or LF) and the start of the next line.
fn line_bounds(buf: &[u8], pos: usize) -> (usize, usize) {
    match memchr::memchr(b'\n', &buf[pos..]) {
        Some(i) => {
            let nl = pos + i;
            let end = if nl > pos && buf[nl - 1] == b'\r' {
                nl - 1
            } else {
                nl
            };
            (end, nl + 1)
        }
        None => (buf.len(), buf.len()),
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t')
}

fn skip_ws(buf: &[u8], mut pos: usize, end: usize) -> usize {
    while pos < end && is_ws(buf[pos]) {
        pos += 1;
    }
    pos
}

fn trim_end(buf: &[u8], start: usize, mut end: usize) -> usize {
    while end > start && is_ws(buf[end - 1]) {
        end -= 1;
    }
    end
}

/// RFC 3261 §25.1 `token` characters, as a table: the scanner asks for every name byte.
const TOKEN: [bool; 256] = {
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
    t
};

/// RFC 3261 §25.1 `token` characters.
pub(crate) fn is_token_char(b: u8) -> bool {
    TOKEN[usize::from(b)]
}

fn looks_like_sip(line: &[u8]) -> bool {
    memchr::memmem::find(&line.to_ascii_uppercase(), b"SIP/").is_some()
}

fn parse_start_line(buf: &[u8], r: Range<usize>) -> Option<StartLine> {
    let line = &buf[r.clone()];
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase (RFC 3261 §7.2).
        let sp1 = memchr::memchr(b' ', line)?;
        let rest = &line[sp1 + 1..];
        if rest.len() < 3 || !rest[..3].iter().all(u8::is_ascii_digit) {
            return None;
        }
        if rest.len() > 3 && rest[3] != b' ' {
            return None;
        }
        let code = rest[..3]
            .iter()
            .fold(0u16, |a, d| a * 10 + u16::from(d - b'0'));
        if !(100..=699).contains(&code) {
            return None;
        }
        let reason_start = (r.start + sp1 + 5).min(r.end);
        return Some(StartLine::Response {
            version: r.start..r.start + sp1,
            code,
            reason: reason_start..r.end,
        });
    }
    // Request-Line = Method SP Request-URI SP SIP-Version (RFC 3261 §7.1): exactly one SP each,
    // and the URI contains no whitespace (RFC 4475 §3.1.2.5 lwsruri, §3.1.2.6 lwsstart).
    let sp1 = memchr::memchr(b' ', line)?;
    let sp2 = memchr::memrchr(b' ', line)?;
    if sp1 == 0 || sp2 <= sp1 + 1 || sp2 + 1 >= line.len() {
        return None;
    }
    let method = &line[..sp1];
    let uri = &line[sp1 + 1..sp2];
    let version = &line[sp2 + 1..];
    if !method.iter().all(|&b| is_token_char(b))
        || uri.iter().any(|&b| b <= b' ' || b == 0x7f)
        || !(version.len() >= 4 && version[..4].eq_ignore_ascii_case(b"SIP/"))
    {
        return None;
    }
    Some(StartLine::Request {
        method: r.start..r.start + sp1,
        uri: r.start + sp1 + 1..r.start + sp2,
        version: r.start + sp2 + 1..r.end,
    })
}

fn parse_header_line(buf: &[u8], pos: usize, end: usize, next: usize) -> Option<Header> {
    // An iterator, not indexing: no bounds check per name byte.
    let name_end = pos
        + buf[pos..end]
            .iter()
            .position(|&b| !is_token_char(b))
            .unwrap_or(end - pos);
    if name_end == pos {
        return None;
    }
    let i = skip_ws(buf, name_end, end);
    if i >= end || buf[i] != b':' {
        return None;
    }
    let vstart = skip_ws(buf, i + 1, end);
    let vend = trim_end(buf, vstart, end);
    Some(Header {
        name: HeaderName::from_bytes(&buf[pos..name_end]),
        name_range: pos..name_end,
        value: vstart..vend,
        line: pos..next,
    })
}

/// A non-negative decimal with optional surrounding linear whitespace; `None` when it overflows.
pub(crate) fn parse_decimal(v: &[u8]) -> Option<usize> {
    let v = trim_lws(v);
    if v.is_empty() || v.len() > 12 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = v.iter().fold(0u64, |a, d| a * 10 + u64::from(d - b'0'));
    usize::try_from(n).ok()
}

/// Trim spaces, tabs and the CR/LF of folded lines from both ends.
pub(crate) fn trim_lws(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if first.is_ascii_whitespace() {
            v = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = v {
        if last.is_ascii_whitespace() {
            v = rest;
        } else {
            break;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_request_line_and_headers() {
        let m = Message::scan(b"\r\n\r\nINVITE sip:a@b SIP/2.0\r\nVia : SIP/2.0/UDP h;branch=z9hG4bK1\r\nv: SIP/2.0/TCP x\r\nl: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(m.method(), Some(&b"INVITE"[..]));
        assert_eq!(m.request_uri(), Some(&b"sip:a@b"[..]));
        assert_eq!(m.all(HeaderName::Via).count(), 2);
        assert_eq!(m.body(), b"abc");
        assert_eq!(m.defect(), None);
    }

    #[test]
    fn folds_continuation_lines_into_the_header_above() {
        let m = Message::scan(b"OPTIONS sip:a SIP/2.0\r\nSubject: one\r\n  two\r\n\ttwo-b\r\n\r\n")
            .unwrap();
        let h = &m.headers()[0];
        assert_eq!(m.slice(h.value.clone()), b"one\r\n  two\r\n\ttwo-b");
        assert_eq!(h.line.end, m.headers_end());
    }

    #[test]
    fn short_body_is_a_defect() {
        let m = Message::scan(b"INVITE sip:a SIP/2.0\r\nContent-Length: 10\r\n\r\nab").unwrap();
        assert_eq!(m.defect(), Some(Defect::BodyTooShort));
    }

    #[test]
    fn conflicting_content_lengths_are_a_defect() {
        let m =
            Message::scan(b"INVITE sip:a SIP/2.0\r\nl: 1\r\nContent-Length: 2\r\n\r\nab").unwrap();
        assert_eq!(m.defect(), Some(Defect::ContentLength));
    }

    #[test]
    fn bare_lf_line_ends_are_accepted() {
        let m = Message::scan(b"SIP/2.0 200 OK\nCall-ID: x\n\n").unwrap();
        assert_eq!(m.status(), Some(200));
        assert_eq!(m.value(HeaderName::CallId), Some(&b"x"[..]));
    }

    #[test]
    fn garbage_is_not_sip() {
        assert_eq!(Message::scan(b"\r\n\r\n").unwrap_err(), ScanError::Empty);
        assert_eq!(
            Message::scan(b"GET / HTTP/1.1\r\n\r\n").unwrap_err(),
            ScanError::NotSip
        );
    }

    #[test]
    fn whitespace_in_request_uri_is_a_start_line_defect() {
        let m = Message::scan(b"INVITE sip:a b@c SIP/2.0\r\nCall-ID: x\r\n\r\n").unwrap();
        assert_eq!(m.defect(), Some(Defect::StartLine));
    }
}
