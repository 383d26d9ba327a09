#![allow(dead_code)]
//! The fixed gate every target runs: one loopback listener, a PBX, one carrier, one trunk for
//! the PBX's network, unknown sources limited per IP.

use std::sync::OnceLock;
use std::time::Instant;

use cpsgate::config::Config;
use cpsgate::proxy::{LocalListener, Proxy};

pub const PBX: &str = "10.0.0.5:5062";
pub const CARRIER: &str = "192.0.2.80:5060";
pub const STRANGER: &str = "203.0.113.9:5060";

const CONFIG: &str = r#"
[[listen]]
address = "127.0.0.1:5060"

[proxy]
unknown_sources = "limit"
default_upstream = "carrier"
secret = "fuzzing-secret-0123456789"

[pbx]
address = "10.0.0.5:5062"

[[upstream]]
name = "carrier"
address = "192.0.2.80:5060"
sources = ["192.0.2.80:5060"]

[[account]]
name = "pool"
rate = 50
burst = 10

[[trunk]]
name = "pbx"
account = "pool"
upstream = "carrier"
rate = 20
burst = 5
match = { sources = ["10.0.0.0/24"] }
"#;

pub fn proxy() -> &'static Proxy {
    static P: OnceLock<Proxy> = OnceLock::new();
    P.get_or_init(|| {
        let cfg = Config::parse(CONFIG, "fuzz").expect("fuzz config");
        Proxy::new_at(
            &cfg,
            vec![LocalListener {
                bound: "127.0.0.1:5060".parse().expect("addr"),
                host: "127.0.0.1".into(),
                port: 5060,
                udp: true,
                tcp: true,
            }],
            Instant::now(),
        )
        .expect("fuzz proxy")
    })
}
