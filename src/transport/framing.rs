//! Stream framing (RFC 3261 §18.3): a message ends Content-Length bytes after its empty line;
//! on a stream Content-Length is mandatory. CRLFs before a start line are skipped (§7.5) and a
//! double CRLF is a keep-alive ping answered with one CRLF (RFC 5626 §3.5.1).

use bytes::{Bytes, BytesMut};

use crate::sip::HeaderName;

/// One unit taken off the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A whole message.
    Message(Bytes),
    /// A CRLFCRLF keep-alive ping; answer with CRLF.
    Ping,
}

/// A stream that cannot be framed any further; the connection must close. `head` holds what
/// was read of the offending message's header section, so a request can still be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// Status code to answer with.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// The header bytes read so far (at most the size limit).
    pub head: Bytes,
}

/// Take the next frame from `buf`, or `None` when more bytes are needed (no memory of earlier
/// calls: fine for a peer's own reads, see [`Framer`] for a connection).
pub fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    Framer::default().next_frame(buf, max)
}

/// Framing state of one connection: how far the header section has been searched, and the
/// length of a message whose body is still arriving, so each byte is scanned once however the
/// peer splits its writes.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    searched: usize,
    pending: Option<usize>,
}

impl Framer {
    /// Take the next frame from `buf`, or `None` when more bytes are needed.
    pub fn next_frame(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Option<Frame>, FrameError> {
        if let Some(total) = self.pending {
            if buf.len() < total {
                return Ok(None);
            }
            return Ok(Some(self.take(buf, total)));
        }
        if self.searched == 0 {
            loop {
                if buf.starts_with(b"\r\n\r\n") {
                    let _ = buf.split_to(4);
                    return Ok(Some(Frame::Ping));
                }
                if matches!(buf.as_ref(), b"\r\n" | b"\r\n\r" | b"\r") {
                    // Could still become a ping; wait.
                    return Ok(None);
                }
                if buf.starts_with(b"\r\n") {
                    let _ = buf.split_to(2);
                } else if buf.starts_with(b"\n") {
                    let _ = buf.split_to(1);
                } else {
                    break;
                }
            }
            if buf.is_empty() {
                return Ok(None);
            }
        }
        // An end marker may straddle the previous search's end: look back three bytes.
        let from = self.searched.saturating_sub(3);
        let Some(head_end) = header_end(&buf[from..]).map(|e| e + from) else {
            if buf.len() > max {
                return Err(error(413, "Message Too Large", &buf[..max]));
            }
            self.searched = buf.len();
            return Ok(None);
        };
        if head_end > max {
            return Err(error(413, "Message Too Large", &buf[..max]));
        }
        let body_len = match content_length(&buf[..head_end]) {
            Ok(Some(n)) => n,
            Ok(None) => {
                return Err(error(
                    400,
                    "Bad Request (Missing Content-Length)",
                    &buf[..head_end],
                ));
            }
            Err(()) => return Err(error(400, "Bad Content-Length", &buf[..head_end])),
        };
        let total = head_end.saturating_add(body_len);
        if total > max {
            return Err(error(413, "Message Too Large", &buf[..head_end]));
        }
        if buf.len() < total {
            self.pending = Some(total);
            return Ok(None);
        }
        Ok(Some(self.take(buf, total)))
    }

    fn take(&mut self, buf: &mut BytesMut, total: usize) -> Frame {
        *self = Self::default();
        Frame::Message(buf.split_to(total).freeze())
    }
}

fn error(code: u16, reason: &'static str, head: &[u8]) -> FrameError {
    FrameError {
        code,
        reason,
        head: Bytes::copy_from_slice(head),
    }
}

/// Offset just past the empty line ending the header section.
fn header_end(buf: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The Content-Length of a header section (long or compact name); `Err` when malformed or
/// when two values disagree.
fn content_length(head: &[u8]) -> Result<Option<usize>, ()> {
    let mut found: Option<usize> = None;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let name = crate::sip::scan::trim_lws(&line[..colon]);
        if HeaderName::from_bytes(name) != HeaderName::ContentLength {
            continue;
        }
        let n = crate::sip::scan::parse_decimal(&line[colon + 1..]).ok_or(())?;
        if found.is_some_and(|f| f != n) {
            return Err(());
        }
        found = Some(n);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"OPTIONS sip:a SIP/2.0\r\nl: 2\r\n\r\nok";

    #[test]
    fn split_and_pipelined_messages() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&MSG[..10]);
        assert_eq!(next_frame(&mut buf, 1024), Ok(None));
        buf.extend_from_slice(&MSG[10..]);
        buf.extend_from_slice(MSG);
        assert_eq!(
            next_frame(&mut buf, 1024),
            Ok(Some(Frame::Message(Bytes::from_static(MSG))))
        );
        assert_eq!(
            next_frame(&mut buf, 1024),
            Ok(Some(Frame::Message(Bytes::from_static(MSG))))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_framer_fed_byte_by_byte_finds_every_message() {
        let mut f = Framer::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let stream: Vec<u8> = [MSG, b"\r\n\r\n", MSG].concat();
        for &b in &stream {
            buf.extend_from_slice(&[b]);
            while let Some(frame) = f.next_frame(&mut buf, 1024).expect("frames") {
                got.push(frame);
            }
        }
        assert_eq!(
            got,
            [
                Frame::Message(Bytes::from_static(MSG)),
                Frame::Ping,
                Frame::Message(Bytes::from_static(MSG))
            ]
        );
    }

    #[test]
    fn keepalive_ping_and_stray_crlf() {
        let mut buf = BytesMut::from(&b"\r\n"[..]);
        assert_eq!(next_frame(&mut buf, 1024), Ok(None));
        buf.extend_from_slice(b"\r\n");
        assert_eq!(next_frame(&mut buf, 1024), Ok(Some(Frame::Ping)));
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(MSG);
        assert!(matches!(
            next_frame(&mut buf, 1024),
            Ok(Some(Frame::Message(_)))
        ));
    }

    #[test]
    fn missing_or_bad_content_length_and_oversize() {
        let mut buf = BytesMut::from(&b"OPTIONS sip:a SIP/2.0\r\nCall-ID: x\r\n\r\n"[..]);
        assert_eq!(next_frame(&mut buf, 1024).unwrap_err().code, 400);
        let mut buf = BytesMut::from(&b"OPTIONS sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n"[..]);
        assert_eq!(next_frame(&mut buf, 1024).unwrap_err().code, 400);
        let mut buf = BytesMut::from(&b"OPTIONS sip:a SIP/2.0\r\nl: 5000\r\n\r\n"[..]);
        assert_eq!(next_frame(&mut buf, 1024).unwrap_err().code, 413);
        let mut buf = BytesMut::from(vec![b'a'; 2000].as_slice());
        let e = next_frame(&mut buf, 1024).unwrap_err();
        assert_eq!((e.code, e.head.len()), (413, 1024));
    }
}
