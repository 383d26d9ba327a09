//! What the kernel charges per datagram on loopback, one system call per datagram against the
//! gate's batches (`transport::batch`: `sendmmsg` and `recvmmsg`): 64 datagrams of a SIP
//! INVITE's size sent from one socket to another and read back, per iteration. No SIP work at
//! all: this is the floor under the gate's CPU per message (docs/performance.md).

use std::net::SocketAddr;

use bytes::Bytes;
use cpsgate::transport::batch::{self, RecvBatch};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::net::UdpSocket;

const N: usize = 64;
const SIZE: usize = 800;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let (tx, rx) = rt.block_on(async {
        let tx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let rx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        tx.writable().await.expect("writable");
        (tx, rx)
    });
    // As the gate does: the kernel stamps each datagram on arrival.
    let _ = batch::enable_timestamps(&rx);
    let to = rx.local_addr().expect("addr");
    let data = Bytes::from(vec![b'x'; SIZE]);
    let out: Vec<(SocketAddr, Bytes)> = (0..N).map(|_| (to, data.clone())).collect();
    let mut buf = vec![0u8; 2048];
    let mut batch = RecvBatch::new(2048);

    let mut g = c.benchmark_group("loopback_udp");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("one_datagram_per_call", |b| {
        b.iter(|| {
            rt.block_on(async {
                for (to, d) in &out {
                    tx.send_to(d, *to).await.expect("send");
                }
                for _ in 0..N {
                    rx.recv_from(&mut buf).await.expect("receive");
                }
            })
        })
    });
    g.bench_function("batched", |b| {
        b.iter(|| {
            rt.block_on(async {
                assert_eq!(batch::send(&tx, &out, |_, e| panic!("{e}")).done, N);
                let mut got = 0;
                while got < N {
                    rx.readable().await.expect("readable");
                    if let Ok(n) = batch.recv(&rx) {
                        got += n;
                    }
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
