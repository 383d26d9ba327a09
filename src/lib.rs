//! cpsgate: a stateless SIP proxy that sits between a PBX and its carriers and enforces their
//! calls-per-second contracts.
//!
//! The path of one message: a transport task ([`transport`]) receives bytes and hands them to
//! the synchronous decision core ([`proxy::Proxy::handle`]), which scans them ([`sip`]),
//! classifies the message, routes it ([`routing`]) and returns an [`proxy::Action`]: forward
//! (the original bytes with our Via, Record-Route and Max-Forwards spliced in), reply, absorb or
//! drop. The core takes `now` as an argument and never touches a socket, so it is tested
//! without I/O. [`app`] binds and wires everything; [`config`] turns the TOML file into a
//! validated [`config::Config`] before anything is bound.

pub mod admin;
pub mod alerts;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod flood;
pub mod limiter;
pub mod load;
pub mod plan;
pub mod proxy;
pub mod routing;
pub mod sip;
pub mod telemetry;
pub mod transport;
