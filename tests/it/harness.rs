//! Test harness: a gate started in-process on ephemeral loopback ports, fake SIP peers over UDP
//! and TCP, and small message builders that do not use the code under test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cpsgate::app::Gate;
use cpsgate::config::Config;
use cpsgate::sip::Transport;
use cpsgate::telemetry::Stats;
use cpsgate::transport::framing::{Frame, next_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for a message that must arrive.
pub const WAIT: Duration = Duration::from_secs(5);

/// A running gate.
pub struct TestGate {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub stats: Arc<Stats>,
    pub proxy: Arc<cpsgate::proxy::Proxy>,
    pub reload: Arc<tokio::sync::Notify>,
    pub admin: Option<SocketAddr>,
    pub cluster: Option<Arc<cpsgate::cluster::Cluster>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestGate {
    /// Start a gate on `toml` (with `127.0.0.1:0` listeners).
    pub async fn start(toml: &str) -> Self {
        let cfg = Config::parse(toml, "test").unwrap_or_else(|e| panic!("{e}"));
        Self::launch(Gate::bind(&cfg).await.expect("gate binds")).await
    }

    /// Start a gate on a config file it watches for reloads.
    pub async fn start_file(path: &std::path::Path) -> Self {
        let cfg = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        let gate = Gate::bind(&cfg)
            .await
            .expect("gate binds")
            .watch(path.to_owned());
        Self::launch(gate).await
    }

    async fn launch(gate: Gate) -> Self {
        let find = |t: Transport| {
            gate.local_addrs()
                .iter()
                .find(|(x, _)| *x == t)
                .map(|(_, a)| *a)
                .expect("listener bound")
        };
        let (udp, tcp) = (find(Transport::Udp), find(Transport::Tcp));
        let stats = gate.stats();
        let proxy = gate.proxy();
        let reload = gate.reload_trigger();
        let admin = gate.admin_addr();
        let cluster = gate.cluster();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gate.run(async move {
            let _ = rx.await;
        }));
        Self {
            udp,
            tcp,
            stats,
            proxy,
            reload,
            admin,
            cluster,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Signal the gate to stop (it drains for its grace period) without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stop the gate and wait for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("gate stops within its grace period")
                .expect("gate task")
                .expect("gate run");
        }
    }
}

impl Drop for TestGate {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The usual test config: one listener, a PBX trunk matched by the PBX's exact address, a
/// carrier recognised by its exact address.
pub fn config(pbx: SocketAddr, pbx_t: &str, carrier: SocketAddr, carrier_t: &str) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:0"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[tcp]
idle_timeout_secs = 30

[pbx]
address = "{pbx}"
transport = "{pbx_t}"

[[upstream]]
name = "carrier"
address = "{carrier}"
transport = "{carrier_t}"
sources = ["{carrier}"]

[[account]]
name = "acct"
rate = 1000
burst = 1000

[[trunk]]
name = "t1"
account = "acct"
upstream = "carrier"
rate = 1000
burst = 1000
match = {{ sources = ["{pbx}"] }}
"#
    )
}

/// A gate whose one trunk takes every loopback source (so several test sockets can call) to one
/// carrier, with `tail` (more sections) appended.
pub fn loopback_trunk_config(carrier: SocketAddr, tail: &str) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:0"

[proxy]
unknown_sources = "reject"
shutdown_grace_secs = 0

[[upstream]]
name = "carrier"
address = "{carrier}"
sources = ["{carrier}"]

[[trunk]]
name = "t1"
upstream = "carrier"
rate = 1000
burst = 1000
match = {{ sources = ["127.0.0.0/8"] }}

{tail}
"#
    )
}

/// A UDP peer.
pub struct UdpPeer {
    pub sock: UdpSocket,
    pub addr: SocketAddr,
}

impl UdpPeer {
    pub async fn bind() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = sock.local_addr().expect("addr");
        Self { sock, addr }
    }

    pub async fn send(&self, to: SocketAddr, msg: &str) {
        self.sock.send_to(msg.as_bytes(), to).await.expect("send");
    }

    /// The next datagram; panics after [`WAIT`].
    pub async fn recv(&self) -> (String, SocketAddr) {
        let mut buf = vec![0u8; 65_535];
        let (n, from) = tokio::time::timeout(WAIT, self.sock.recv_from(&mut buf))
            .await
            .expect("a message arrives in time")
            .expect("recv");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
    }
}

/// A TCP peer connected to somewhere, reading framed messages.
pub struct TcpPeer {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl TcpPeer {
    /// A socket bound to an ephemeral port, before connecting (so its address can go into the
    /// gate's config).
    pub fn socket() -> (TcpSocket, SocketAddr) {
        let s = TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let a = s.local_addr().expect("addr");
        (s, a)
    }

    pub async fn connect(s: TcpSocket, to: SocketAddr) -> Self {
        let stream = s.connect(to).await.expect("connect");
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn accept(l: &TcpListener) -> Self {
        let (stream, _) = tokio::time::timeout(WAIT, l.accept())
            .await
            .expect("the gate connects in time")
            .expect("accept");
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, msg: &[u8]) {
        self.stream.write_all(msg).await.expect("write");
    }

    /// The next framed message (pongs are returned as an empty string).
    pub async fn recv(&mut self) -> String {
        loop {
            match next_frame(&mut self.buf, 1 << 20).expect("peer framing") {
                Some(Frame::Message(m)) => return String::from_utf8_lossy(&m).into_owned(),
                Some(Frame::Ping) => return String::new(),
                None => {}
            }
            if self.buf.as_ref() == b"\r\n" {
                self.buf.clear();
                return String::new();
            }
            let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a message arrives in time")
                .expect("read");
            assert!(n > 0, "connection closed while waiting for a message");
        }
    }

    /// True when the peer closed the connection (reads hit EOF) within [`WAIT`].
    pub async fn closed(&mut self) -> bool {
        let mut scratch = [0u8; 4096];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// An INVITE from the PBX at `from` (sent to the gate at `gate`).
pub fn invite(from: SocketAddr, t: &str, call_id: &str, branch: &str, extra: &str) -> String {
    let body = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    format!(
        "INVITE sip:+15551234567@carrier.example SIP/2.0\r\n\
         Via: SIP/2.0/{t} {from};branch={branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:+15550001111@pbx.example>;tag=from-{call_id}\r\n\
         To: <sip:+15551234567@carrier.example>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:pbx@{from};transport={tl}>\r\n\
         {extra}\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len(),
        tl = t.to_ascii_lowercase()
    )
}

/// All values of a header (long name), in order, one per line.
pub fn headers<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    let head = msg.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

/// The first value of a header.
pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    headers(msg, name).into_iter().next()
}

/// The status line's code.
pub fn status(msg: &str) -> u16 {
    assert!(msg.starts_with("SIP/2.0 "), "not a response: {msg}");
    msg[8..11].parse().expect("status code")
}

/// A response to `req` as a UAS would build it (RFC 3261 §8.2.6): Via, From, To (+tag),
/// Call-ID, CSeq and Record-Route copied; `contact` added when given.
pub fn respond(req: &str, code: u16, reason: &str, to_tag: &str, contact: Option<&str>) -> String {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    let head = req.split("\r\n\r\n").next().unwrap_or_default();
    for line in head.split("\r\n").skip(1) {
        let name = line
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match name.as_str() {
            "via" | "from" | "call-id" | "cseq" | "record-route" => {
                out.push_str(line);
                out.push_str("\r\n");
            }
            "to" => {
                out.push_str(line);
                if !line.contains(";tag=") {
                    out.push_str(";tag=");
                    out.push_str(to_tag);
                }
                out.push_str("\r\n");
            }
            _ => {}
        }
    }
    if let Some(c) = contact {
        out.push_str(&format!("Contact: <{c}>\r\n"));
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

/// One HTTP/1.1 request to the admin API; (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("admin answers in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (code, body)
}
