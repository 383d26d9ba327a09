//! Integration tests: one binary. `harness` starts the gate in-process on ephemeral loopback
//! ports with fake PBX and carrier peers.

mod abuse;
mod admin;
mod alerts;
mod cluster;
mod differential;
mod faults;
mod flood;
mod flows;
mod harness;
mod interop;
mod limits;
mod load;
mod plan;
mod roundtrip;
mod smoke;
mod torture;
