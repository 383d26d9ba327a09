//! Splicing edits into the original bytes. A forwarded message is the received message with a few
//! byte ranges replaced; everything else — unknown headers, folding, compact names, the body —
//! passes unchanged.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// One edit: replace `range` of the original with `text` (a range of [`Edits::bytes`]). An
/// empty range inserts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edit {
    range: Range<usize>,
    text: Range<usize>,
}

/// A set of non-overlapping edits against one buffer, kept in position order. The inserted
/// bytes of every edit live in one buffer: a forwarded message costs one allocation for its
/// edits, not one per header touched.
#[derive(Debug, Default)]
pub struct Edits {
    edits: Vec<Edit>,
    bytes: Vec<u8>,
}

/// A copy with the usual room to grow: a request's Via edits are copied and then added to.
impl Clone for Edits {
    fn clone(&self) -> Self {
        let mut edits = Vec::with_capacity(self.edits.len().max(TYPICAL_EDITS));
        edits.extend_from_slice(&self.edits);
        let mut bytes = Vec::with_capacity(self.bytes.len().max(TYPICAL_BYTES));
        bytes.extend_from_slice(&self.bytes);
        Self { edits, bytes }
    }
}

/// Room reserved at the first edit: a Via, a Record-Route and a few small edits.
const TYPICAL_BYTES: usize = 512;
/// Edits reserved at the first edit.
const TYPICAL_EDITS: usize = 8;

impl Edits {
    /// No edits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert bytes at `pos`. Insertions at one position keep the order they were added in.
    pub fn insert(&mut self, pos: usize, bytes: impl AsRef<[u8]>) {
        self.replace(pos..pos, bytes);
    }

    /// Insert at `pos` what `write` appends to the buffer it is given.
    pub fn insert_with(&mut self, pos: usize, write: impl FnOnce(&mut Vec<u8>)) {
        self.replace_with(pos..pos, write);
    }

    /// Remove a range.
    pub fn remove(&mut self, range: Range<usize>) {
        self.replace(range, []);
    }

    /// Replace a range with bytes.
    pub fn replace(&mut self, range: Range<usize>, bytes: impl AsRef<[u8]>) {
        self.replace_with(range, |out| out.extend_from_slice(bytes.as_ref()));
    }

    /// Replace a range with what `write` appends to the buffer it is given (it must only
    /// append).
    pub fn replace_with(&mut self, range: Range<usize>, write: impl FnOnce(&mut Vec<u8>)) {
        if self.edits.capacity() == 0 {
            self.edits.reserve(TYPICAL_EDITS);
            self.bytes.reserve(TYPICAL_BYTES);
        }
        let start = self.bytes.len();
        write(&mut self.bytes);
        let text = start..self.bytes.len();
        // Keep position order; after every edit at the same place (inserts there keep the order
        // they were added in). Edits mostly arrive in order, so this looks at one or two.
        let key = (range.start, range.end);
        let at = self
            .edits
            .iter()
            .rposition(|e| (e.range.start, e.range.end) <= key)
            .map_or(0, |i| i + 1);
        self.edits.insert(at, Edit { range, text });
    }

    /// True when nothing is to change.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Apply every edit to `buf[..end]` (bytes past `end` — datagram padding past Content-Length
    /// — are dropped) and return the new message.
    pub fn apply(&self, buf: &[u8], end: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(end + self.bytes.len());
        self.apply_range(buf, 0..end, &mut out);
        out.freeze()
    }

    /// Write `buf[range]` with the edits that fall inside `range` applied.
    pub fn apply_range(&self, buf: &[u8], range: Range<usize>, out: &mut impl BufMut) {
        let mut pos = range.start;
        for e in &self.edits {
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
            out.put_slice(&self.bytes[e.text.clone()]);
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
    fn insert_with_writes_in_place_and_orders_by_position() {
        let buf = b"abcdef";
        let mut e = Edits::new();
        e.insert_with(5, |o| o.extend_from_slice(b"<5>"));
        e.replace_with(1..3, |o| o.extend_from_slice(b"[12]"));
        e.insert(0, "^");
        e.insert_with(5, |o| o.push(b'!'));
        assert_eq!(&e.apply(buf, buf.len())[..], b"^a[12]de<5>!f");
    }

    proptest::proptest! {
        /// Edits given in any order apply as if sorted by position, inserts at one position in
        /// the order they were given.
        #[test]
        fn any_order_applies_like_sorted(
            cuts in proptest::collection::btree_set(0usize..40, 0..12),
            order in proptest::collection::vec(proptest::num::usize::ANY, 0..12),
        ) {
            let buf: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
            // Disjoint edits: pairs of cut points become replaced ranges, single ones inserts.
            let cuts: Vec<usize> = cuts.into_iter().collect();
            let list: Vec<(std::ops::Range<usize>, Vec<u8>)> = cuts
                .chunks(2)
                .enumerate()
                .map(|(i, c)| {
                    let r = if c.len() == 2 { c[0]..c[1] } else { c[0]..c[0] };
                    (r, format!("<{i}>").into_bytes())
                })
                .collect();
            // An extra insert at the start of each range, given later than the range itself.
            let extra: Vec<_> = list.iter().map(|(r, _)| (r.start..r.start, b"+".to_vec())).collect();
            let mut shuffled = list.clone();
            for (i, o) in order.iter().enumerate().take(shuffled.len()) {
                let j = o % shuffled.len();
                shuffled.swap(i, j);
            }
            let mut e = Edits::new();
            for (r, t) in shuffled.iter().chain(extra.iter()) {
                e.replace(r.clone(), t);
            }
            // Reference: the edits in the order given, stably sorted by (start, end) (an insert
            // sorts before a replacement starting at the same place).
            let mut sorted: Vec<_> = shuffled.iter().chain(extra.iter()).cloned().collect();
            sorted.sort_by_key(|(r, _)| (r.start, r.end));
            let mut expect = Vec::new();
            let mut pos = 0;
            for (r, t) in &sorted {
                expect.extend_from_slice(&buf[pos..r.start]);
                expect.extend_from_slice(t);
                pos = r.end;
            }
            expect.extend_from_slice(&buf[pos..]);
            proptest::prop_assert_eq!(&e.apply(&buf, buf.len())[..], &expect[..]);
        }
    }

    #[test]
    fn apply_cuts_at_end() {
        let e = Edits::new();
        assert_eq!(&e.apply(b"abcXXX", 3)[..], b"abc");
    }
}
