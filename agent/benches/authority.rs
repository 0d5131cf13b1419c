//! Cost of reading a client's bytes through the `:authority` rewrite,
//! against copying them unchanged (the baseline, measured in the same run).
//!
//! The input is what a busy gRPC client sends on one connection: the
//! preface, SETTINGS, then 200 requests (HEADERS with an HPACK block using
//! the dynamic table, as real clients' encoders do, and a small DATA frame).
//!
//! `cargo bench -p citadel-agent --bench authority`

use citadel_agent::authority::AuthorityRewriter;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("small frame");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn client_bytes(requests: u32) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut encoder = loona_hpack::Encoder::new();
    for i in 0..requests {
        let stream = 2 * i + 1;
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"%2Fvar%2Frun%2Fcitadel%2Fagent.sock"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-accept-encoding", b"identity,deflate,gzip"),
            (
                b"user-agent",
                b"grpc-python/1.85.1 grpc-c/51.0.0 (linux; chttp2)",
            ),
            (b"workload.spiffe.io", b"true"),
        ]);
        frame(&mut out, 0x1, 0x4, stream, &block);
        frame(&mut out, 0x0, 0x1, stream, &[0, 0, 0, 0, 0]);
    }
    out
}

fn bench(c: &mut Criterion) {
    let input = client_bytes(200);
    let mut group = c.benchmark_group("client_to_server_bytes");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("copy_unchanged", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(input.len());
            for chunk in input.chunks(8192) {
                out.extend_from_slice(std::hint::black_box(chunk));
            }
            out
        })
    });
    group.bench_function("authority_rewrite", |b| {
        b.iter(|| {
            let mut rewriter = AuthorityRewriter::new();
            let mut out = Vec::with_capacity(input.len() * 2);
            for chunk in input.chunks(8192) {
                rewriter
                    .feed(std::hint::black_box(chunk), &mut out)
                    .expect("valid input");
            }
            out
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
