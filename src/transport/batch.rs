//! Several UDP datagrams per system call: `recvmmsg` reads what is queued on a socket in one
//! call, `sendmmsg` sends a run of answers and forwards in one call (Linux). Each datagram still
//! costs the kernel its trip through the network stack; what a batch saves is the system call
//! entry, the socket lookup and, on the receive side, the tokio readiness round per datagram
//! (docs/performance.md has the figures). Nothing waits to fill a batch: a receive takes what
//! the socket holds now, a send goes out once the datagrams read together are decided.
//!
//! On other systems the same interface reads and sends one datagram per call.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most datagrams read or sent by one system call.
pub const BATCH: usize = 32;

/// Receive buffers for one socket and what the last [`RecvBatch::recv`] put in them.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    got: Vec<(usize, SocketAddr)>,
    /// Per datagram, when the kernel received it (ns since the Unix epoch), when the socket
    /// reports it ([`enable_timestamps`]); else 0.
    arrived: Vec<u64>,
    /// Datagrams the next receive asks for: doubled while receives come back full, set to
    /// twice what the last one found when it came back short. The system call's headers are
    /// built per call for this many, so a quiet socket does not pay for a whole batch.
    want: usize,
}

impl RecvBatch {
    /// [`BATCH`] buffers of `size` bytes each (the pages are touched only as datagrams fill them).
    pub fn new(size: usize) -> Self {
        Self {
            bufs: (0..BATCH).map(|_| vec![0u8; size]).collect(),
            got: Vec::with_capacity(BATCH),
            arrived: Vec::with_capacity(BATCH),
            want: 2,
        }
    }

    /// Read what `sock` holds now, up to [`BATCH`] datagrams (fewer while the socket has been
    /// holding fewer), without waiting: the number read, or `WouldBlock` when there is none
    /// (which clears the socket's readiness).
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        self.arrived.clear();
        let want = self.want;
        let (bufs, got, arrived) = (&mut self.bufs[..want], &mut self.got, &mut self.arrived);
        sock.try_io(Interest::READABLE, || recv_into(sock, bufs, got, arrived))?;
        let n = self.got.len();
        self.want = if n == want {
            (want * 2).min(BATCH)
        } else {
            (n * 2).clamp(2, BATCH)
        };
        if n < want {
            // The kernel stopped short of a full batch because the socket ran empty: say so to
            // the runtime now rather than with one more system call that finds it empty. A
            // datagram arriving from here on raises a new readiness event.
            let _ = sock.try_io(Interest::READABLE, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
        Ok(self.got.len())
    }

    /// Datagram `i` of the last receive and its source.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let (n, src) = self.got[i];
        (&self.bufs[i][..n], src)
    }

    /// When the kernel received datagram `i` of the last receive (ns since the Unix epoch), if
    /// the socket reports it.
    pub fn arrived(&self, i: usize) -> Option<u64> {
        self.arrived.get(i).copied().filter(|&t| t > 0)
    }
}

/// Ask the kernel to stamp each datagram `sock` receives with its arrival time (SO_TIMESTAMPNS),
/// which [`RecvBatch::arrived`] reports (Linux; elsewhere an `Unsupported` error).
#[cfg(target_os = "linux")]
pub fn enable_timestamps(sock: &UdpSocket) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimestampns};
    Ok(setsockopt(sock, ReceiveTimestampns, &true)?)
}

#[cfg(not(target_os = "linux"))]
pub fn enable_timestamps(_sock: &UdpSocket) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// The wall clock now in ns since the Unix epoch (the clock of the kernel's receive stamps).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(target_os = "linux")]
fn recv_into(
    sock: &UdpSocket,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<(usize, SocketAddr)>,
    arrived: &mut Vec<u64>,
) -> io::Result<()> {
    use nix::sys::socket::{
        ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg,
    };
    use nix::sys::time::TimeSpec;
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd;

    // Rebuilt per call: the headers hold raw pointers, so they cannot live in a task's state
    // across an await; a few small allocations per batch.
    let mut headers =
        MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), Some(nix::cmsg_space!(TimeSpec)));
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [IoSliceMut::new(b.as_mut_slice())])
        .collect();
    let msgs = recvmmsg(
        sock.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    for m in msgs {
        let src = m.address.as_ref().and_then(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(SocketAddr::V4((*v4).into()))
            } else {
                a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
            }
        });
        // A datagram without an IP source cannot come from a UDP/IP socket; keep the slot so
        // buffer `i` stays datagram `i`, with an address no check will accept.
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        got.push((m.bytes, src.unwrap_or(unspecified)));
        let stamp = m.cmsgs().ok().and_then(|mut c| {
            c.find_map(|c| match c {
                ControlMessageOwned::ScmTimestampns(t) => Some(t),
                _ => None,
            })
        });
        arrived.push(stamp.map_or(0, |t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        }));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn recv_into(
    sock: &UdpSocket,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<(usize, SocketAddr)>,
    arrived: &mut Vec<u64>,
) -> io::Result<()> {
    let (n, src) = sock.try_recv_from(&mut bufs[0])?;
    got.push((n, src));
    arrived.push(0);
    Ok(())
}

/// What [`send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams sent or refused by the kernel, from the start of the list; the rest wait for
    /// the socket to be writable.
    pub done: usize,
    /// System calls made.
    pub calls: usize,
}

/// Send `out` (destination, bytes) from `sock` in order, as many per system call as the kernel
/// takes, without waiting. A datagram the kernel refuses (other than for a full buffer) is
/// reported to `failed` and skipped; a full buffer, or a socket the runtime does not know to be
/// writable yet, ends the call early, the rest for the caller to send when it is writable.
pub fn send(
    sock: &UdpSocket,
    out: &[(SocketAddr, Bytes)],
    mut failed: impl FnMut(SocketAddr, &io::Error),
) -> Sent {
    let mut sent = Sent { done: 0, calls: 0 };
    while sent.done < out.len() {
        let r = sock.try_io(Interest::WRITABLE, || {
            sent.calls += 1;
            send_some(sock, &out[sent.done..])
        });
        match r {
            Ok(n) => sent.done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // sendmmsg reports an error only for the first datagram of the call.
            Err(e) => {
                failed(out[sent.done].0, &e);
                sent.done += 1;
            }
        }
    }
    sent
}

#[cfg(target_os = "linux")]
fn send_some(sock: &UdpSocket, out: &[(SocketAddr, Bytes)]) -> io::Result<usize> {
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, sendmmsg, sendto};
    use std::io::IoSlice;

    if let [(addr, data)] = out {
        // One datagram: a plain sendto, without building the headers.
        sendto(sock, data, SendFlags::DONTWAIT, addr)?;
        return Ok(1);
    }
    let out = &out[..out.len().min(BATCH)];
    let addrs: Vec<SocketAddrAny> = out.iter().map(|(a, _)| SocketAddrAny::from(*a)).collect();
    let iovs: Vec<[IoSlice<'_>; 1]> = out.iter().map(|(_, d)| [IoSlice::new(d)]).collect();
    let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
        out.iter().map(|_| SendAncillaryBuffer::default()).collect();
    let mut msgs: Vec<MMsgHdr<'_>> = addrs
        .iter()
        .zip(&iovs)
        .zip(controls.iter_mut())
        .map(|((a, iov), c)| MMsgHdr::new_with_addr(a, iov, c))
        .collect();
    Ok(sendmmsg(sock, &mut msgs, SendFlags::DONTWAIT)?)
}

#[cfg(not(target_os = "linux"))]
fn send_some(sock: &UdpSocket, out: &[(SocketAddr, Bytes)]) -> io::Result<usize> {
    let (addr, data) = &out[0];
    sock.try_send_to(data, *addr).map(|_| 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two sockets on loopback, each known to the runtime as writable (a fresh socket is not
    /// until the runtime has polled it, and `send` does not wait).
    async fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        a.writable().await.expect("writable");
        b.writable().await.expect("writable");
        (a, b)
    }

    /// Wait until `sock` has something to read (bounded), so a test does not race the kernel.
    async fn readable(sock: &UdpSocket) {
        tokio::time::timeout(Duration::from_secs(5), sock.readable())
            .await
            .expect("datagrams arrive")
            .expect("readable");
    }

    #[tokio::test]
    async fn one_receive_takes_every_queued_datagram_in_order_up_to_a_batch() {
        let (rx, tx) = pair().await;
        let (tx2, _) = pair().await;
        let to = rx.local_addr().expect("addr");
        // 40 datagrams of different sizes from two sources.
        for i in 0..40usize {
            let from = if i % 3 == 0 { &tx2 } else { &tx };
            from.send_to(&vec![b'a' + (i % 26) as u8; 10 + i * 37], to)
                .await
                .expect("send");
        }
        let mut batch = RecvBatch::new(2048);
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        while seen.len() < 40 {
            readable(&rx).await;
            let n = match batch.recv(&rx) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("receive: {e}"),
            };
            sizes.push(n);
            for i in 0..n {
                let (data, src) = batch.get(i);
                seen.push((data.to_vec(), src));
            }
        }
        // Everything was queued before the first read: each receive took as many as it asked
        // for, asking twice as many each time up to a batch, and the last took the rest.
        assert_eq!(sizes, vec![2, 4, 8, 16, 10]);
        for (i, (data, src)) in seen.iter().enumerate() {
            assert_eq!(data.len(), 10 + i * 37, "datagram {i} whole and in order");
            assert!(data.iter().all(|&b| b == b'a' + (i % 26) as u8));
            let from = if i % 3 == 0 { &tx2 } else { &tx };
            assert_eq!(
                *src,
                from.local_addr().expect("addr"),
                "datagram {i} source"
            );
        }
        assert_eq!(
            batch.recv(&rx).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "an empty socket says so"
        );
        // After a short receive the next asks for twice what it found (20): 25 queued come in
        // as 20, then 5.
        for i in 0..25u8 {
            tx.send_to(&[i], to).await.expect("send");
        }
        let mut sizes = Vec::new();
        let mut next = 0u8;
        while next < 25 {
            readable(&rx).await;
            let Ok(n) = batch.recv(&rx) else { continue };
            sizes.push(n);
            for i in 0..n {
                assert_eq!(batch.get(i).0, [next]);
                next += 1;
            }
        }
        assert_eq!(sizes, vec![20, 5]);
    }

    #[tokio::test]
    async fn each_datagram_carries_the_time_the_kernel_received_it() {
        let (rx, tx) = pair().await;
        let to = rx.local_addr().expect("addr");
        let mut batch = RecvBatch::new(64);
        // Without the option there is no stamp.
        tx.send_to(b"plain", to).await.expect("send");
        readable(&rx).await;
        assert_eq!(batch.recv(&rx).expect("receive"), 1);
        assert_eq!(batch.arrived(0), None);
        if let Err(e) = enable_timestamps(&rx) {
            // Only where the system has no SO_TIMESTAMPNS.
            assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
            return;
        }
        // The kernel turns stamping on at arrival a moment later (until then it stamps a
        // datagram when it is read): wait until a datagram read 20 ms after it was sent
        // carries its sending time.
        let mut on = false;
        for _ in 0..100 {
            let sent = wall_ns();
            tx.send_to(b"probe", to).await.expect("send");
            tokio::time::sleep(Duration::from_millis(20)).await;
            readable(&rx).await;
            assert_eq!(batch.recv(&rx).expect("receive"), 1);
            if batch.arrived(0).expect("stamped") < sent + 10_000_000 {
                on = true;
                break;
            }
        }
        assert!(on, "the kernel stamps datagrams at arrival");
        let before = wall_ns();
        tx.send_to(b"one", to).await.expect("send");
        tokio::time::sleep(Duration::from_millis(30)).await;
        tx.send_to(b"two", to).await.expect("send");
        readable(&rx).await;
        let mut stamps = Vec::new();
        while stamps.len() < 2 {
            readable(&rx).await;
            let Ok(n) = batch.recv(&rx) else { continue };
            stamps.extend((0..n).map(|i| batch.arrived(i).expect("stamped")));
        }
        let after = wall_ns();
        assert!(
            before <= stamps[0] && stamps[1] <= after,
            "{before} {stamps:?} {after}"
        );
        // The second was stamped when it arrived (30 ms later), not when it was read.
        assert!(
            stamps[1].saturating_sub(stamps[0]) >= 25_000_000,
            "{stamps:?}"
        );
    }

    #[tokio::test]
    async fn a_send_delivers_each_datagram_to_its_own_destination_in_order() {
        let (sock, a) = pair().await;
        let (b, c) = pair().await;
        let dests = [
            a.local_addr().expect("addr"),
            b.local_addr().expect("addr"),
            c.local_addr().expect("addr"),
        ];
        // More than one system call's worth, to three destinations.
        let out: Vec<(SocketAddr, Bytes)> = (0..BATCH + 9)
            .map(|i| (dests[i % 3], Bytes::from(format!("message {i}"))))
            .collect();
        let mut failures = 0;
        let sent = send(&sock, &out, |_, _| failures += 1);
        assert_eq!(failures, 0);
        // Linux: one system call per batch; elsewhere one per datagram.
        let calls = if cfg!(target_os = "linux") {
            2
        } else {
            out.len()
        };
        assert_eq!(
            sent,
            Sent {
                done: out.len(),
                calls
            }
        );
        for (k, r) in [&a, &b, &c].into_iter().enumerate() {
            let mut buf = [0u8; 64];
            for i in (k..out.len()).step_by(3) {
                let (n, from) = tokio::time::timeout(Duration::from_secs(5), r.recv_from(&mut buf))
                    .await
                    .expect("delivered")
                    .expect("receive");
                assert_eq!(&buf[..n], format!("message {i}").as_bytes());
                assert_eq!(from, sock.local_addr().expect("addr"));
            }
        }
    }

    #[tokio::test]
    async fn a_datagram_the_kernel_refuses_is_reported_and_the_rest_still_go() {
        let (sock, a) = pair().await;
        let to = a.local_addr().expect("addr");
        // An IPv6 destination from an IPv4 socket: refused by the kernel for that datagram.
        let bad: SocketAddr = "[::1]:9".parse().expect("addr");
        let out = vec![
            (to, Bytes::from_static(b"one")),
            (bad, Bytes::from_static(b"lost")),
            (to, Bytes::from_static(b"two")),
        ];
        let mut failed = Vec::new();
        assert_eq!(send(&sock, &out, |a, _| failed.push(a)).done, 3);
        assert_eq!(failed, vec![bad]);
        let mut buf = [0u8; 16];
        for want in [&b"one"[..], b"two"] {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), a.recv_from(&mut buf))
                .await
                .expect("delivered")
                .expect("receive");
            assert_eq!(&buf[..n], want);
        }
    }
}
