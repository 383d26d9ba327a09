//! Trunk identification and upstream selection: which trunk a request from the PBX side belongs
//! to, and whether a source is one of the carriers.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::config::{Config, Trunk};
use crate::sip::{HeaderName, Message, RequestView, header};

/// An IP network `address/prefix`, or one exact `ip:port` source (useful when a PBX and a
/// carrier share an address, as on loopback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
    port: Option<u16>,
}

impl Cidr {
    /// A single host.
    pub fn host(ip: IpAddr) -> Self {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        Self {
            net: ip,
            prefix,
            port: None,
        }
    }

    /// True for an exact `ip:port` source.
    pub fn has_port(&self) -> bool {
        self.port.is_some()
    }

    /// True when the two networks share an address (and a port, where both name one).
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let ports = match (self.port, other.port) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let shorter = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        let longer = if self.prefix <= other.prefix {
            other
        } else {
            self
        };
        ports && shorter.contains(longer.net)
    }

    /// True when the transport source `src` is inside the network (and has the port, if given).
    pub fn matches(&self, src: SocketAddr) -> bool {
        self.port.is_none_or(|p| p == src.port()) && self.contains(src.ip())
    }

    /// True when `ip` is inside the network (an IPv4-mapped IPv6 source matches IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A CIDR that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an IP address or CIDR")]
pub struct CidrError;

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(sa) = s.trim().parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(CidrError);
            }
            return Ok(Self {
                port: Some(sa.port()),
                ..Self::host(sa.ip())
            });
        }
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr.trim().parse().map_err(|_| CidrError)?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.trim().parse::<u8>().map_err(|_| CidrError)?,
        };
        if prefix > max {
            return Err(CidrError);
        }
        Ok(Self {
            net,
            prefix,
            port: None,
        })
    }
}

/// The trunk table, built once per config.
#[derive(Debug, Clone)]
pub struct Routes {
    trunks: Vec<Trunk>,
    /// (upstream index, networks it sends from).
    carriers: Vec<(usize, Vec<crate::routing::Cidr>)>,
    /// Networks the PBX sends from.
    pbx: Vec<Cidr>,
}

/// What is known about the sender of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A configured carrier (upstream index).
    Carrier(usize),
    /// The PBX side, on a known trunk (trunk index).
    Trunk(usize),
    /// The configured `[pbx]` on no trunk: trusted in its dialogs, but starts no call.
    Pbx,
    /// Matches no trunk.
    Unknown,
}

impl Routes {
    /// Build from a validated config.
    pub fn new(cfg: &Config) -> Self {
        Self {
            trunks: cfg.trunks.clone(),
            carriers: cfg
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| (i, u.sources.clone()))
                .collect(),
            pbx: cfg.pbx_sources.clone(),
        }
    }

    /// Classify a request by its transport source, username and headers. Carriers are checked
    /// first (their traffic is never metered as a trunk's); trunks match in file order.
    pub fn classify(&self, src: SocketAddr, msg: &Message<'_>, req: &RequestView) -> Origin {
        self.classify_with(
            src,
            || sip_username(msg, req),
            |name, value| {
                msg.headers().iter().any(|h| {
                    header::name_matches(msg.slice(h.name_range.clone()), name)
                        && msg.slice(h.value.clone()) == value.as_bytes()
                })
            },
        )
    }

    /// [`Routes::classify`] from the parts of a request: its source, its SIP username (asked
    /// once, only when a trunk matches by username) and whether it carries a header with a
    /// given name and value. The capacity planner classifies trace rows with it.
    #[inline]
    pub fn classify_with<'a>(
        &self,
        src: SocketAddr,
        username: impl FnOnce() -> Option<&'a [u8]>,
        has_header: impl Fn(&str, &str) -> bool,
    ) -> Origin {
        if let Some((i, _)) = self
            .carriers
            .iter()
            .find(|(_, nets)| nets.iter().any(|n| n.matches(src)))
        {
            return Origin::Carrier(*i);
        }
        let mut username = Some(username);
        let mut user: Option<Option<&[u8]>> = None;
        for (i, t) in self.trunks.iter().enumerate() {
            let m = &t.matcher;
            if !m.sources.is_empty() && !m.sources.iter().any(|n| n.matches(src)) {
                continue;
            }
            if let Some(want) = &m.username {
                if user.is_none() {
                    user = Some(username.take().and_then(|f| f()));
                }
                if user.flatten() != Some(want.as_bytes()) {
                    continue;
                }
            }
            if let Some((name, value)) = &m.header
                && !has_header(name, value)
            {
                continue;
            }
            return Origin::Trunk(i);
        }
        if self.pbx.iter().any(|n| n.matches(src)) {
            return Origin::Pbx;
        }
        Origin::Unknown
    }

    /// The first trunk whose source networks hold `src`, ignoring its other criteria; trunks
    /// without source networks are skipped. Used for CANCEL and non-2xx ACK, which carry neither
    /// credentials nor the INVITE's extension headers.
    pub fn classify_by_source(&self, src: SocketAddr) -> Origin {
        self.trunks
            .iter()
            .position(|t| t.matcher.sources.iter().any(|n| n.matches(src)))
            .map_or(Origin::Unknown, Origin::Trunk)
    }

    /// The trunks, in match order.
    pub fn trunks(&self) -> &[Trunk] {
        &self.trunks
    }
}

/// The SIP username of a request: the (Proxy-)Authorization username when credentials are
/// present, else the From URI user.
pub fn sip_username<'a>(msg: &Message<'a>, req: &RequestView) -> Option<&'a [u8]> {
    let buf = msg.buf();
    for name in [HeaderName::ProxyAuthorization, HeaderName::Authorization] {
        if let Some(u) = msg.value(name).and_then(header::auth_username) {
            return Some(u);
        }
    }
    req.from
        .as_ref()
        .and_then(|f| f.parse_uri(buf))
        .and_then(|u| u.user.map(|r| &buf[r]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(a.overlaps(&c) && c.overlaps(&a));
        assert!(!a.overlaps(&"192.0.2.0/24".parse().unwrap()));
        let p1: Cidr = "127.0.0.1:5080".parse().unwrap();
        assert!(!p1.overlaps(&"127.0.0.1:5070".parse().unwrap()));
        assert!(p1.overlaps(&"127.0.0.0/8".parse().unwrap()));
        let exact: Cidr = "127.0.0.1:5080".parse().unwrap();
        assert!(exact.matches("127.0.0.1:5080".parse().unwrap()));
        assert!(!exact.matches("127.0.0.1:5070".parse().unwrap()));
        assert!(
            "[::1]:5080"
                .parse::<Cidr>()
                .unwrap()
                .matches("[::1]:5080".parse().unwrap())
        );
    }
}
