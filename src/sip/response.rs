//! Responses built from a request's own header lines (RFC 3261 §8.2.6.2): every Via, From, To,
//! Call-ID and CSeq line is copied as received — compact names and folding included — so a
//! compact-form request gets a reply it can match. The To line gains a tag when it has none.

use bytes::{BufMut, Bytes, BytesMut};

use super::header::{HeaderName, NameAddr};
use super::rewrite::Edits;
use super::scan::Message;

/// What goes into a locally generated response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseSpec<'a> {
    /// Status code.
    pub code: u16,
    /// Reason phrase.
    pub reason: &'a str,
    /// The To-tag to add when the request's To has none.
    pub to_tag: &'a str,
    /// Extra header lines (`name`, `value`), e.g. `Unsupported` for a 420.
    pub extra: &'a [(&'a str, &'a str)],
}

/// Build a response to `req`. `via_edits` are the edits already decided for the received top Via
/// (`received`/`rport`, RFC 3581 §4), so the response travels back to the real source.
pub fn build_response(req: &Message<'_>, via_edits: &Edits, spec: &ResponseSpec<'_>) -> Bytes {
    let buf = req.buf();
    let mut out = BytesMut::with_capacity(256 + req.headers_end() / 2);
    out.put_slice(b"SIP/2.0 ");
    out.put_slice(spec.code.to_string().as_bytes());
    out.put_u8(b' ');
    out.put_slice(spec.reason.as_bytes());
    out.put_slice(b"\r\n");
    let mut seen_to = false;
    let (mut seen_from, mut seen_call, mut seen_cseq) = (false, false, false);
    for h in req.headers() {
        let keep = match h.name {
            HeaderName::Via => true,
            HeaderName::From => !std::mem::replace(&mut seen_from, true),
            HeaderName::CallId => !std::mem::replace(&mut seen_call, true),
            HeaderName::CSeq => !std::mem::replace(&mut seen_cseq, true),
            HeaderName::To => {
                if std::mem::replace(&mut seen_to, true) {
                    continue;
                }
                let has_tag = NameAddr::parse(buf, h.value.clone())
                    .map(|n| n.tag(buf).is_some())
                    .unwrap_or(true);
                let mut e = Edits::new();
                // An empty tag means none: a 100 Trying carries no To-tag.
                if !has_tag && !spec.to_tag.is_empty() {
                    e.insert(h.value.end, format!(";tag={}", spec.to_tag));
                }
                e.apply_range(buf, h.line.clone(), &mut out);
                ensure_line_end(&mut out);
                continue;
            }
            _ => false,
        };
        if keep {
            via_edits.apply_range(buf, h.line.clone(), &mut out);
            ensure_line_end(&mut out);
        }
    }
    for (name, value) in spec.extra {
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"Content-Length: 0\r\n\r\n");
    out.freeze()
}

/// A copied line whose original ended with a bare LF, or the last line of a truncated header
/// section, still ends with CR LF in our output.
fn ensure_line_end(out: &mut BytesMut) {
    if out.ends_with(b"\r\n") {
        return;
    }
    if out.ends_with(b"\n") {
        out.truncate(out.len() - 1);
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_gets_a_matching_reply_with_to_tag() {
        let req = b"INVITE sip:b@h SIP/2.0\r\nv: SIP/2.0/UDP a;branch=z9hG4bK1\r\nv: SIP/2.0/UDP c\r\nf: <sip:a@h>;tag=1\r\nt: <sip:b@h>\r\ni: cid\r\nCSeq: 1 INVITE\r\nX: y\r\nl: 0\r\n\r\n";
        let m = Message::scan(req).unwrap();
        let spec = ResponseSpec {
            code: 403,
            reason: "Forbidden",
            to_tag: "abc",
            extra: &[],
        };
        let r = build_response(&m, &Edits::new(), &spec);
        assert_eq!(
            &r[..],
            &b"SIP/2.0 403 Forbidden\r\nv: SIP/2.0/UDP a;branch=z9hG4bK1\r\nv: SIP/2.0/UDP c\r\nf: <sip:a@h>;tag=1\r\nt: <sip:b@h>;tag=abc\r\ni: cid\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"[..]
        );
    }

    #[test]
    fn existing_to_tag_is_kept() {
        let req = b"BYE sip:b@h SIP/2.0\nVia: SIP/2.0/UDP a\nTo: <sip:b@h>;tag=9\n\n";
        let m = Message::scan(req).unwrap();
        let spec = ResponseSpec {
            code: 483,
            reason: "Too Many Hops",
            to_tag: "abc",
            extra: &[("Warning", "399 x")],
        };
        let r = build_response(&m, &Edits::new(), &spec);
        assert_eq!(
            &r[..],
            &b"SIP/2.0 483 Too Many Hops\r\nVia: SIP/2.0/UDP a\r\nTo: <sip:b@h>;tag=9\r\nWarning: 399 x\r\nContent-Length: 0\r\n\r\n"[..]
        );
    }
}
