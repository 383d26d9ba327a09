//! The decision core on any bytes from any kind of peer, over UDP or TCP: never a panic, and
//! what it sends is never empty.
#![no_main]

mod common;

use std::time::Instant;

use cpsgate::proxy::{Action, Inbound};
use cpsgate::sip::Transport;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, msg)) = data.split_first() else {
        return;
    };
    let source = [common::PBX, common::CARRIER, common::STRANGER][usize::from(pick % 3)];
    let transport = if pick & 4 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let p = common::proxy();
    let action = p.handle(
        Instant::now(),
        &Inbound {
            data: msg,
            source: source.parse().expect("addr"),
            transport,
            listener: 0,
            conn: (transport == Transport::Tcp).then_some(7),
        },
    );
    match action {
        Action::Forward(o) | Action::Reply(_, o) | Action::Reject(_, o) => {
            assert!(!o.data.is_empty());
        }
        _ => {}
    }
});
