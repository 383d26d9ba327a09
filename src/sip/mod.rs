//! SIP messages: the zero-copy scanner, header views, the splicing rewriter and the response
//! builder. This is the only SIP parsing code in the project; it imports nothing else of it.

pub mod header;
pub mod response;
pub mod rewrite;
pub mod scan;
pub mod uri;

use std::ops::Range;

pub use header::{HeaderError, HeaderName, NameAddr, Rport, Transport, Via};
pub use response::{ResponseSpec, build_response};
pub use rewrite::Edits;
pub use scan::{Defect, Message, ScanError, StartLine};
pub use uri::{Host, Scheme, Uri};

/// One comma-separated element of a multi-value header (Via, Route, Record-Route), located by the
/// header it sits in so it can be removed cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Index into [`Message::headers`].
    pub header: usize,
    /// Position of this element within its header line (0 = first).
    pub index: usize,
    /// Number of elements in that header line.
    pub count: usize,
    /// The element's value range.
    pub value: Range<usize>,
}

/// All elements of the headers named `name`, in order (RFC 3261 §7.3.1: repeated rows equal one
/// comma-joined row).
pub fn elements(msg: &Message<'_>, name: HeaderName) -> Vec<Element> {
    let mut out = Vec::new();
    for (i, h) in msg.headers().iter().enumerate() {
        if h.name != name {
            continue;
        }
        let parts = header::split_commas(msg.buf(), h.value.clone());
        let count = parts.len();
        out.extend(parts.into_iter().enumerate().map(|(index, value)| Element {
            header: i,
            index,
            count,
            value,
        }));
    }
    out
}

/// Record the removal of the elements `at` (indices into `list`, any order). Per header line:
/// the whole line when every element on it goes; otherwise each run of removed elements with one
/// adjoining comma, so several removals on one comma-joined line never overlap.
pub fn remove_elements(msg: &Message<'_>, list: &[Element], at: &[usize], edits: &mut Edits) {
    let gone = |i: usize| at.contains(&i);
    let mut i = 0;
    while i < list.len() {
        let line_start = i;
        let line_end = i + list[i].count;
        if (line_start..line_end).all(gone) {
            edits.remove(msg.headers()[list[i].header].line.clone());
            i = line_end;
            continue;
        }
        while i < line_end {
            if !gone(i) {
                i += 1;
                continue;
            }
            let run_start = i;
            while i < line_end && gone(i) {
                i += 1;
            }
            let range = if i < line_end {
                // Up to the start of the next kept element.
                list[run_start].value.start..list[i].value.start
            } else {
                // The run ends the line: from the end of the kept element before it.
                list[run_start - 1].value.end..list[i - 1].value.end
            };
            edits.remove(range);
        }
    }
}

/// Record the removal of element `at` of `list` (see [`remove_elements`]).
pub fn remove_element(msg: &Message<'_>, list: &[Element], at: usize, edits: &mut Edits) {
    remove_elements(msg, list, &[at], edits);
}

/// The method of a request as a small enum for the proxy's branches; extension methods are
/// `Other` and are proxied like any request (RFC 3261 §16.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// INVITE
    Invite,
    /// ACK
    Ack,
    /// CANCEL
    Cancel,
    /// BYE
    Bye,
    /// SUBSCRIBE (dialog-creating)
    Subscribe,
    /// REFER (dialog-creating)
    Refer,
    /// NOTIFY (may create a dialog)
    Notify,
    /// OPTIONS
    Options,
    /// Any other method.
    Other,
}

impl Method {
    /// Map a method token; methods are case-sensitive (RFC 3261 §7.1).
    pub fn from_bytes(m: &[u8]) -> Self {
        match m {
            b"INVITE" => Self::Invite,
            b"ACK" => Self::Ack,
            b"CANCEL" => Self::Cancel,
            b"BYE" => Self::Bye,
            b"SUBSCRIBE" => Self::Subscribe,
            b"REFER" => Self::Refer,
            b"NOTIFY" => Self::Notify,
            b"OPTIONS" => Self::Options,
            _ => Self::Other,
        }
    }

    /// Requests that may create a dialog and so get a Record-Route (RFC 3261 §16.6 step 4;
    /// RFC 6665 §4.1, RFC 3515).
    pub fn creates_dialog(self) -> bool {
        matches!(
            self,
            Self::Invite | Self::Subscribe | Self::Refer | Self::Notify
        )
    }
}

/// The headers of a request that the proxy needs, parsed once. Constructing it validates them.
#[derive(Debug, Clone)]
pub struct RequestView {
    /// The method.
    pub method: Method,
    /// Every Via element.
    pub via_elements: Vec<Element>,
    /// The top Via, parsed.
    pub top_via: Via,
    /// From.
    pub from: Option<NameAddr>,
    /// To.
    pub to: Option<NameAddr>,
    /// Call-ID value range.
    pub call_id: Option<Range<usize>>,
    /// CSeq number and method range.
    pub cseq: Option<(u32, Range<usize>)>,
    /// Max-Forwards, when present.
    pub max_forwards: Option<u8>,
    /// Route elements.
    pub routes: Vec<Element>,
}

/// Why a request cannot be processed. Every variant names the `400` reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No Via at all: nowhere to send an answer.
    #[error("Missing Via")]
    NoVia,
    /// A header value is malformed.
    #[error("{0}")]
    Header(#[from] HeaderError),
    /// A mandatory header is missing (RFC 3261 §8.1.1).
    #[error("Missing {0}")]
    Missing(&'static str),
    /// CSeq method differs from the request method (RFC 3261 §8.1.1.5, RFC 4475 §3.1.2.13).
    #[error("CSeq Method Mismatch")]
    CSeqMismatch,
    /// A mandatory header appears twice.
    #[error("Duplicate {0}")]
    Duplicate(&'static str),
}

impl RequestView {
    /// Parse the headers of a request the proxy relies on.
    pub fn parse(msg: &Message<'_>) -> Result<Self, RequestError> {
        let buf = msg.buf();
        let method = Method::from_bytes(msg.method().unwrap_or_default());
        let via_elements = elements(msg, HeaderName::Via);
        let first = via_elements.first().ok_or(RequestError::NoVia)?;
        let top_via = Via::parse(buf, first.value.clone())?;
        for v in &via_elements[1..] {
            Via::parse(buf, v.value.clone())?;
        }
        let single = |name: HeaderName, label: &'static str| -> Result<_, RequestError> {
            let mut it = msg.all(name);
            let first = it.next();
            if it.next().is_some() {
                return Err(RequestError::Duplicate(label));
            }
            Ok(first.map(|h| h.value.clone()))
        };
        let from = single(HeaderName::From, "From")?
            .map(|r| NameAddr::parse(buf, r))
            .transpose()?;
        let to = single(HeaderName::To, "To")?
            .map(|r| NameAddr::parse(buf, r))
            .transpose()?;
        let call_id = single(HeaderName::CallId, "Call-ID")?.filter(|r| !r.is_empty());
        let cseq = match single(HeaderName::CSeq, "CSeq")? {
            Some(r) => {
                let (n, m) = header::parse_cseq(&buf[r.clone()])?;
                let off = m.as_ptr() as usize - buf.as_ptr() as usize;
                Some((n, off..off + m.len()))
            }
            None => None,
        };
        let max_forwards = single(HeaderName::MaxForwards, "Max-Forwards")?
            .map(|r| header::parse_max_forwards(&buf[r]))
            .transpose()?;
        let view = RequestView {
            method,
            via_elements,
            top_via,
            from,
            to,
            call_id,
            cseq,
            max_forwards,
            routes: elements(msg, HeaderName::Route),
        };
        if view.from.is_none() {
            return Err(RequestError::Missing("From"));
        }
        if view.to.is_none() {
            return Err(RequestError::Missing("To"));
        }
        if view.call_id.is_none() {
            return Err(RequestError::Missing("Call-ID"));
        }
        match &view.cseq {
            None => return Err(RequestError::Missing("CSeq")),
            Some((_, m)) => {
                let cseq_method = &buf[m.clone()];
                let req_method = msg.method().unwrap_or_default();
                // An ACK or CANCEL carries the INVITE's number with its own method (§17.1.1.3).
                if cseq_method != req_method {
                    return Err(RequestError::CSeqMismatch);
                }
            }
        }
        Ok(view)
    }

    /// The To-tag, if any: its presence makes a request mid-dialog (RFC 3261 §12.2.2).
    pub fn to_tag<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        self.to.as_ref().and_then(|t| t.tag(buf))
    }

    /// The From-tag.
    pub fn from_tag<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        self.from.as_ref().and_then(|t| t.tag(buf))
    }

    /// The Call-ID bytes.
    pub fn call_id<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        self.call_id.clone().map_or(&[][..], |r| &buf[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_elements_keeps_other_values_on_the_line() {
        let raw = b"BYE sip:x SIP/2.0\r\nRoute: <sip:a;lr>, <sip:b;lr>\r\nRoute: <sip:c>\r\n\r\n";
        let m = Message::scan(raw).unwrap();
        let list = elements(&m, HeaderName::Route);
        assert_eq!(list.len(), 3);
        let drop_one = |i| {
            let mut e = Edits::new();
            remove_element(&m, &list, i, &mut e);
            String::from_utf8(e.apply(raw, raw.len()).to_vec()).unwrap()
        };
        assert!(drop_one(0).contains("\r\nRoute: <sip:b;lr>\r\nRoute: <sip:c>\r\n"));
        assert!(drop_one(1).contains("\r\nRoute: <sip:a;lr>\r\nRoute: <sip:c>\r\n"));
        assert_eq!(
            drop_one(2),
            "BYE sip:x SIP/2.0\r\nRoute: <sip:a;lr>, <sip:b;lr>\r\n\r\n"
        );
    }

    #[test]
    fn removing_several_elements_of_one_line_never_overlaps() {
        let raw = b"BYE sip:x SIP/2.0\r\nRoute: <sip:a;lr>, <sip:b;lr>, <sip:c;lr>\r\nRoute: <sip:d>\r\n\r\n";
        let m = Message::scan(raw).unwrap();
        let list = elements(&m, HeaderName::Route);
        let drop = |at: &[usize]| {
            let mut e = Edits::new();
            remove_elements(&m, &list, at, &mut e);
            let out = e.apply(raw, raw.len());
            String::from_utf8(out.to_vec()).unwrap()
        };
        let head = "BYE sip:x SIP/2.0\r\n";
        assert_eq!(
            drop(&[0, 1]),
            format!("{head}Route: <sip:c;lr>\r\nRoute: <sip:d>\r\n\r\n")
        );
        assert_eq!(
            drop(&[1, 2]),
            format!("{head}Route: <sip:a;lr>\r\nRoute: <sip:d>\r\n\r\n")
        );
        assert_eq!(
            drop(&[0, 2]),
            format!("{head}Route: <sip:b;lr>\r\nRoute: <sip:d>\r\n\r\n")
        );
        assert_eq!(drop(&[0, 1, 2, 3]), format!("{head}\r\n"));
        assert_eq!(
            drop(&[2, 3]),
            format!("{head}Route: <sip:a;lr>, <sip:b;lr>\r\n\r\n")
        );
    }

    #[test]
    fn request_view_requires_matching_cseq_method() {
        let raw = b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nFrom: <sip:a>;tag=1\r\nTo: <sip:b>\r\nCall-ID: c\r\nCSeq: 1 ACK\r\n\r\n";
        let m = Message::scan(raw).unwrap();
        assert_eq!(
            RequestView::parse(&m).unwrap_err(),
            RequestError::CSeqMismatch
        );
    }
}
