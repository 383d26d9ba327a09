//! The forwarding rewrite: whatever a PBX sends, a forwarded request scans again, carries the
//! body unchanged and one Via more than it came with.
#![no_main]

mod common;

use std::time::Instant;

use cpsgate::proxy::{Action, Inbound};
use cpsgate::sip::{HeaderName, Message, Transport, elements};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::proxy();
    let Ok(input) = Message::scan(data) else {
        return;
    };
    let action = p.handle(
        Instant::now(),
        &Inbound {
            data,
            source: common::PBX.parse().expect("addr"),
            transport: Transport::Udp,
            listener: 0,
            conn: None,
        },
    );
    let Action::Forward(out) = action else {
        return;
    };
    let output = Message::scan(&out.data).expect("a forwarded message scans");
    assert_eq!(
        &out.data[output.body_range()],
        &data[input.body_range()],
        "the body is never changed"
    );
    if input.is_response() {
        return;
    }
    let (before, after) = (
        elements(&input, HeaderName::Via).len(),
        elements(&output, HeaderName::Via).len(),
    );
    assert_eq!(after, before + 1, "exactly our Via is added");
});
