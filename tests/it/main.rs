//! Integration tests: one binary. `harness` starts the gate in-process on ephemeral loopback
//! ports with fake PBX and carrier peers.

mod harness;
mod flows;
mod interop;
mod smoke;
