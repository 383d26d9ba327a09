//! The parts of admitting an initial INVITE that do not depend on sockets or on the proxy's
//! state: the keyed hashes calls are known by, the [`Ask`] a call must pass, and the auth-retry
//! allowance. The proxy and the capacity planner (`cpsgate plan`) both run them, so a replayed
//! trace is judged by the same code as live traffic.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use siphasher::sip::SipHasher13;

use crate::config::UnknownSources;
use crate::limiter::{Ask, BoundedMap, Expiring, First};
use crate::routing::{Origin, Routes};
use crate::sip::{HeaderName, Message, Method, NameAddr, RequestView, Via};

/// RFC 3261 §8.1.1.7 magic cookie.
const COOKIE: &str = "z9hG4bK";

/// Re-sends with credentials an admitted INVITE may make uncharged (a 401 and then a 407).
pub const FREE_AUTH_RETRIES: u8 = 2;

/// The SipHash keys every keyed hash of the gate uses: from `proxy.secret` (so every gate of a
/// cluster derives the same keys), else random per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys(pub(super) u64, pub(super) u64);

impl Keys {
    /// Keys for `secret`, or random ones without it.
    pub fn new(secret: Option<&str>) -> Self {
        match secret {
            Some(s) => {
                let mut h = SipHasher13::new_with_keys(0x6370_7367_6174_6501, 0x6b65_7973);
                h.write(s.as_bytes());
                let a = h.finish();
                h.write_u8(1);
                Self(a, h.finish())
            }
            None => {
                let r = std::collections::hash_map::RandomState::new();
                Self(r.hash_one(1u8), r.hash_one(2u8))
            }
        }
    }

    #[inline]
    pub(super) fn hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.0, self.1)
    }

    /// A keyed hash of `bytes` under a one-byte `label` (labels keep the kinds of keys apart).
    pub fn hash(&self, label: u8, bytes: &[u8]) -> u64 {
        let mut h = self.hasher();
        h.write_u8(label);
        h.write(bytes);
        h.finish()
    }

    /// The per-source bucket key of a source address: the IPv4 address, or the /64 of an IPv6
    /// one (one subscriber holds a whole /64: limit the prefix, or it walks around the limit,
    /// and fills the table, address by address).
    pub fn source(&self, ip: IpAddr) -> u64 {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let mut h = self.hasher();
        h.write_u8(b's');
        match ip {
            IpAddr::V4(v4) => h.write(&v4.octets()),
            IpAddr::V6(v6) => h.write(&v6.octets()[..8]),
        }
        h.finish()
    }

    /// The per-username bucket key of a SIP username.
    pub fn username(&self, user: &[u8]) -> u64 {
        self.hash(b'u', user)
    }

    /// The key of a call attempt across its auth retries: Call-ID and From-tag.
    pub fn attempt(&self, msg: &Message<'_>, req: &RequestView) -> u64 {
        let buf = msg.buf();
        let mut h = self.hasher();
        h.write_u8(b'a');
        for field in [req.call_id(buf), req.from_tag(buf).unwrap_or_default()] {
            h.write_usize(field.len());
            h.write(field);
        }
        h.finish()
    }

    /// RFC 3261 §17.2.3: the key of a transaction whose top Via has a magic-cookie branch.
    #[inline]
    pub(super) fn cookie(&self, label: u8, buf: &[u8], via: &Via) -> Option<u64> {
        let b = via
            .branch(buf)
            .filter(|b| b.starts_with(COOKIE.as_bytes()) && b.len() > COOKIE.len())?;
        let mut h = self.hasher();
        h.write_u8(label);
        // Lengths first: field boundaries cannot be shifted to forge a collision.
        h.write_usize(b.len());
        h.write(b);
        h.write_usize(via.host_range.len());
        h.write(&buf[via.host_range.clone()]);
        h.write_u16(via.port.unwrap_or(0));
        Some(h.finish())
    }

    /// A keyed hash of the fields that stay the same across retransmissions of one request and
    /// the CANCEL and non-2xx ACK that belong to it (RFC 3261 §16.11; Kamailio excludes the
    /// To-tag for INVITE/ACK/CANCEL for the same reason). Reads the fields leniently, so a
    /// request that failed validation gets the same key as its well-formed ACK.
    #[inline]
    pub fn transaction(&self, label: u8, msg: &Message<'_>, via: &Via) -> u64 {
        let buf = msg.buf();
        if let Some(h) = self.cookie(label, buf, via) {
            return h;
        }
        // RFC 2543 peer: the top Via, From-tag, Call-ID, CSeq number and Request-URI.
        let tag_of = |name| {
            msg.first(name)
                .and_then(|h| NameAddr::parse(buf, h.value.clone()).ok())
                .and_then(|n| n.tag(buf).map(<[u8]>::to_vec))
                .unwrap_or_default()
        };
        let method = Method::from_bytes(msg.method().unwrap_or_default());
        let mut h = self.hasher();
        h.write_u8(label);
        let call_id = msg.value(HeaderName::CallId).unwrap_or_default();
        let from_tag = tag_of(HeaderName::From);
        for field in [&buf[via.range.clone()], &from_tag[..], call_id] {
            h.write_usize(field.len());
            h.write(field);
        }
        let cseq = msg
            .value(HeaderName::CSeq)
            .and_then(|v| crate::sip::header::parse_cseq(v).ok());
        h.write_u32(cseq.map_or(0, |c| c.0));
        h.write(msg.request_uri().unwrap_or_default());
        if !matches!(method, Method::Invite | Method::Ack | Method::Cancel) {
            h.write(&tag_of(HeaderName::To));
        }
        h.finish()
    }
}

/// The label of the decision cache's transaction keys (an INVITE, its retransmissions, its
/// CANCEL and the ACK of its failure share one).
pub const DECISION_LABEL: u8 = b'd';

/// The stages an initial INVITE from `origin` (sent from `ip`) must pass; `None` when it is not
/// metered: calls from carriers and the PBX, and unknown sources unless they are limited.
/// `username` is asked only when per-username limits are on.
#[inline]
pub fn ask<'a>(
    keys: &Keys,
    routes: &Routes,
    unknown_sources: UnknownSources,
    per_username: bool,
    origin: Origin,
    ip: IpAddr,
    username: impl FnOnce() -> Option<&'a [u8]>,
) -> Option<Ask> {
    let (first, account) = match origin {
        Origin::Trunk(t) => (First::Trunk(t), routes.trunks()[t].account),
        Origin::Unknown | Origin::Pbx if unknown_sources == UnknownSources::Limit => {
            (First::Source(keys.source(ip)), None)
        }
        _ => return None,
    };
    let username = if per_username {
        username().map(|u| keys.username(u))
    } else {
        None
    };
    Some(Ask {
        first,
        username,
        account,
    })
}

/// An admitted call (keyed by Call-ID and From-tag): its re-sends with credentials after a
/// 401/407 — each with a higher CSeq — are not charged again, up to [`FREE_AUTH_RETRIES`].
#[derive(Debug)]
pub struct Admitted {
    expires: u64,
    cseq: AtomicU32,
    free: AtomicU8,
}

impl Admitted {
    /// An attempt admitted with CSeq number `cseq`, remembered until `expires`.
    pub fn new(cseq: u32, expires: u64) -> Self {
        Self {
            expires,
            cseq: AtomicU32::new(cseq),
            free: AtomicU8::new(FREE_AUTH_RETRIES),
        }
    }
}

impl Expiring for Admitted {
    fn expires(&self) -> u64 {
        self.expires
    }
}

/// True when an INVITE with credentials and CSeq `cseq` re-sends an admitted `attempt` after a
/// challenge and still has a free re-send left (which this spends).
pub fn free_auth_retry(admitted: &BoundedMap<Admitted>, attempt: u64, cseq: u32, now: u64) -> bool {
    admitted
        .get(attempt, now, |a| {
            if cseq <= a.cseq.load(Ordering::Acquire) {
                return false;
            }
            let spent = a
                .free
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| f.checked_sub(1));
            if spent.is_ok() {
                a.cseq.fetch_max(cseq, Ordering::AcqRel);
            }
            spent.is_ok()
        })
        .unwrap_or(false)
}
