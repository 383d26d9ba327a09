//! Splicing edits into the original bytes. A forwarded message is the received message with a few
//! byte ranges replaced; everything else — unknown headers, folding, compact names, the body —
//! passes unchanged.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// One edit: replace `range` of the original with `insert`. An empty range inserts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edit {
    range: Range<usize>,
    insert: Vec<u8>,
}

/// A set of non-overlapping edits against one buffer.
#[derive(Debug, Default, Clone)]
pub struct Edits {
    edits: Vec<Edit>,
}

impl Edits {
    /// No edits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert bytes at `pos`. Insertions at one position keep the order they were added in.
    pub fn insert(&mut self, pos: usize, bytes: impl Into<Vec<u8>>) {
        self.replace(pos..pos, bytes);
    }

    /// Remove a range.
    pub fn remove(&mut self, range: Range<usize>) {
        self.replace(range, Vec::new());
    }

    /// Replace a range with bytes.
    pub fn replace(&mut self, range: Range<usize>, bytes: impl Into<Vec<u8>>) {
        self.edits.push(Edit {
            range,
            insert: bytes.into(),
        });
    }

    /// True when nothing is to change.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    fn sorted(&self) -> Vec<&Edit> {
        let mut v: Vec<&Edit> = self.edits.iter().collect();
        // Stable sort: inserts at one position stay in insertion order.
        v.sort_by_key(|e| (e.range.start, e.range.end));
        v
    }

    /// Apply every edit to `buf[..end]` (bytes past `end` — datagram padding past Content-Length
    /// — are dropped) and return the new message.
    pub fn apply(&self, buf: &[u8], end: usize) -> Bytes {
        let grow: usize = self.edits.iter().map(|e| e.insert.len()).sum();
        let mut out = BytesMut::with_capacity(end + grow);
        self.apply_range(buf, 0..end, &mut out);
        out.freeze()
    }

    /// Write `buf[range]` with the edits that fall inside `range` applied.
    pub fn apply_range(&self, buf: &[u8], range: Range<usize>, out: &mut impl BufMut) {
        let mut pos = range.start;
        for e in self.sorted() {
            if e.range.start < range.start || e.range.end > range.end || e.range.start < pos {
                // Edits outside the range are not ours; overlapping edits are a caller bug that
                // the debug assertion catches in tests, and are skipped in release.
                debug_assert!(
                    e.range.start >= pos || e.range.start < range.start || e.range.end > range.end,
                    "overlapping edits"
                );
                continue;
            }
            out.put_slice(&buf[pos..e.range.start]);
            out.put_slice(&e.insert);
            pos = e.range.end;
        }
        out.put_slice(&buf[pos..range.end]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_apply_in_position_order_and_keep_the_rest() {
        let buf = b"0123456789";
        let mut e = Edits::new();
        e.replace(7..8, "x");
        e.insert(2, "A");
        e.insert(2, "B");
        e.remove(4..6);
        assert_eq!(&e.apply(buf, buf.len())[..], b"01AB236x89");
    }

    #[test]
    fn apply_range_ignores_edits_outside() {
        let buf = b"abcdef";
        let mut e = Edits::new();
        e.insert(1, "X");
        e.insert(4, "Y");
        let mut out = Vec::new();
        e.apply_range(buf, 3..6, &mut out);
        assert_eq!(out, b"dYef");
    }

    #[test]
    fn apply_cuts_at_end() {
        let e = Edits::new();
        assert_eq!(&e.apply(b"abcXXX", 3)[..], b"abc");
    }
}
