//! The scanner and the header views on any bytes: never a panic, every range inside the input.
#![no_main]

use cpsgate::sip::{Message, RequestView};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::scan(data) else {
        return;
    };
    for h in m.headers() {
        assert!(h.line.end <= data.len() && h.value.start <= h.value.end);
        let _ = &data[h.value.clone()];
    }
    let body = m.body_range();
    assert!(body.start <= body.end && body.end <= data.len());
    let _ = RequestView::parse(&m);
});
