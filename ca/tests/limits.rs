//! Resource limits of the public port, against the CA in-process over real TLS and gRPC:
//! connection cap, handshake deadline, idle timeout, per-caller rate limit, join-token
//! lookups bounded before the store, and a flood that does not starve a legitimate client.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use citadel_ca::admission::Rate;
use citadel_ca::limits::Limits;
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use support::{CountingStore, Harness};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;

async fn start(limits: Limits) -> Harness {
    Harness::start_custom(|s| s, move |c| c.limits = limits).await
}

async fn metrics(h: &Harness) -> String {
    let http = h.ca.as_ref().unwrap().http_addr;
    citadel_e2e::process::http_get(http, "/metrics")
        .await
        .unwrap()
        .1
}

fn rejections(metrics: &str, limit: &str) -> u64 {
    let key = format!("citadel_ca_limit_rejections_total{{limit=\"{limit}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (generously: CI is slow) until `limit` has been counted.
async fn wait_for_rejection(h: &Harness, limit: &str) -> u64 {
    for _ in 0..200 {
        let n = rejections(&metrics(h).await, limit);
        if n > 0 {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {limit} rejection counted");
}

#[tokio::test]
async fn rate_limited_caller_gets_resource_exhausted() {
    let h = start(Limits {
        caller_rate: Rate {
            per_sec: 0.01,
            burst: 3.0,
        },
        ..Limits::default()
    })
    .await;
    let csr = p256_csr(&[]).unwrap();
    let token = h.tokens.token("shop", "web");
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    for _ in 0..3 {
        create(&mut client, request(&csr.pem, 0, Some(&token), None))
            .await
            .unwrap();
    }
    let msg = h
        .expect_refusal(
            request(&csr.pem, 0, Some(&token), None),
            Code::ResourceExhausted,
        )
        .await;
    assert!(msg.contains("rate limit"), "{msg}");
    assert!(
        msg.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{msg}"
    );
    // Another caller has its own budget.
    let other = h.tokens.token("shop", "cart");
    create(&mut client, request(&csr.pem, 0, Some(&other), None))
        .await
        .unwrap();
    assert_eq!(rejections(&metrics(&h).await, "caller_rate"), 1);
    h.stop().await;
}

#[tokio::test]
async fn excess_connections_are_refused() {
    let h = start(Limits {
        max_connections: 2,
        handshake_timeout: Duration::from_secs(120),
        ..Limits::default()
    })
    .await;
    let held = fill_two_places_and_see_a_third_closed(&h).await;
    assert!(connect(h.addr(), &h.bundle_pem, None).await.is_err());
    assert!(rejections(&metrics(&h).await, "connections") >= 2);
    // Once they go, the slots are free again.
    drop(held);
    assert!(served_again(&h).await, "slots were not given back");
    h.stop().await;
}

#[tokio::test]
async fn excess_connections_from_one_address_are_refused_while_others_are_served() {
    let h = start(Limits {
        max_connections_per_address: 2,
        handshake_timeout: Duration::from_secs(120),
        ..Limits::default()
    })
    .await;
    // The two silent connections come from 127.0.0.1 and hold that address's share.
    let held = fill_two_places_and_see_a_third_closed(&h).await;
    assert!(rejections(&metrics(&h).await, "connections_per_address") >= 1);
    // A client from another address (127.0.0.2 is loopback too) still gets a place.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let from_other = socket.connect(h.addr()).await;
    assert!(from_other.is_ok(), "{from_other:?}");
    wait_for_open_connections(&h, 3).await;
    drop(from_other);
    // Once the first address's sockets go, it is served again.
    drop(held);
    assert!(
        served_again(&h).await,
        "the address's places were not given back"
    );
    h.stop().await;
}

/// Opens two connections that never say a word (they hold both places the limit under
/// test allows), then checks that a third is closed at once: the client sees the
/// connection end, not a hang. Returns the two held sockets.
async fn fill_two_places_and_see_a_third_closed(h: &Harness) -> [TcpStream; 2] {
    let held = [
        TcpStream::connect(h.addr()).await.unwrap(),
        TcpStream::connect(h.addr()).await.unwrap(),
    ];
    wait_for_open_connections(h, 2).await;
    let mut third = TcpStream::connect(h.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(30), third.read(&mut buf))
        .await
        .expect("an excess connection must be closed promptly");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    held
}

/// Whether a TLS client gets through within 10 s (freed places come back asynchronously).
async fn served_again(h: &Harness) -> bool {
    for _ in 0..100 {
        if connect(h.addr(), &h.bundle_pem, None).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn wait_for_open_connections(h: &Harness, n: u64) {
    let line = format!("citadel_ca_open_connections {n}");
    for _ in 0..200 {
        if metrics(h).await.lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never saw {line}");
}

#[tokio::test]
async fn handshake_that_never_completes_is_closed() {
    let h = start(Limits {
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let mut silent = TcpStream::connect(h.addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut buf))
        .await
        .expect("a connection without a handshake must be closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(wait_for_rejection(&h, "handshake_timeout").await, 1);
    wait_for_open_connections(&h, 0).await;
    h.stop().await;
}

#[tokio::test]
async fn idle_connection_is_closed_but_an_open_stream_keeps_its_connection() {
    let h = start(Limits {
        idle_timeout: Some(Duration::from_secs(1)),
        ..Limits::default()
    })
    .await;
    let csr = p256_csr(&[]).unwrap();
    let token = h.tokens.token("shop", "web");
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    wait_for_rejection(&h, "idle_timeout").await;
    drop(client);
    wait_for_open_connections(&h, 0).await;
    // A trust-bundle stream is a request in flight for as long as it is open.
    let (chain, key) = h.join("node-a", &[support::WEB]).await;
    let mut bundles = h.bundle_client(Some((&chain, &key))).await;
    let (_acks, rx) = tokio::sync::mpsc::channel::<citadel_proto::citadel::v1::TrustBundleAck>(1);
    let mut stream = bundles
        .watch_trust_bundle(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for_open_connections(&h, 1).await;
    drop(stream);
    h.stop().await;
}

#[tokio::test]
async fn join_token_lookups_are_bounded_before_the_database() {
    let lookups = Arc::new(AtomicUsize::new(0));
    let counter = lookups.clone();
    let limits = Limits {
        join_token_rate: Rate {
            per_sec: 0.01,
            burst: 3.0,
        },
        ..Limits::default()
    };
    let h = Harness::start_custom(
        move |inner| {
            Arc::new(CountingStore {
                inner,
                join_token_lookups: counter,
            })
        },
        move |c| c.limits = limits,
    )
    .await;
    // Malformed: refused without a lookup, and without spending the address's budget.
    for _ in 0..5 {
        let msg = h.refuse_token("citadel-join.not-a-token").await;
        assert!(msg.contains("malformed join token"), "{msg}");
    }
    assert_eq!(lookups.load(Ordering::SeqCst), 0);
    // Well-formed but unknown: looked up while the address has budget, then refused first.
    let unknown = "citadel-join.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for _ in 0..3 {
        let msg = h.refuse_token(unknown).await;
        assert!(msg.contains("unknown"), "{msg}");
    }
    assert_eq!(lookups.load(Ordering::SeqCst), 3);
    let csr = p256_csr(&[]).unwrap();
    for _ in 0..20 {
        let msg = h
            .expect_refusal(
                request(&csr.pem, 0, Some(unknown), None),
                Code::ResourceExhausted,
            )
            .await;
        assert!(msg.contains("too many join-token attempts"), "{msg}");
    }
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        3,
        "rate-limited lookups reached the store"
    );
    let m = metrics(&h).await;
    assert_eq!(rejections(&m, "join_token_rate"), 20, "{m}");
    assert_eq!(rejections(&m, "join_token_format"), 5, "{m}");
    h.stop().await;
}

/// A caller floods the CA (many connections, many requests, silent sockets) while a
/// legitimate workload asks for its certificate: it is served within its deadline, and
/// the flood is answered `ResourceExhausted` instead of being queued without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_does_not_starve_a_legitimate_client() {
    let h = Arc::new(
        start(Limits {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(2),
            caller_rate: Rate {
                per_sec: 5.0,
                burst: 10.0,
            },
            admission: citadel_ca::admission::AdmissionLimits {
                max_in_flight: 4,
                max_renewals_in_flight: 3,
                max_queued: 16,
                max_wait: Duration::from_secs(2),
            },
            ..Limits::default()
        })
        .await,
    );
    let flood_token = h.tokens.token("flood", "flood");
    let csr = Arc::new(p256_csr(&[]).unwrap());
    // Sockets that never handshake, below the cap.
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(TcpStream::connect(h.addr()).await.unwrap());
    }
    let exhausted = Arc::new(AtomicUsize::new(0));
    let issued = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for _ in 0..8 {
        let (h, token, csr) = (h.clone(), flood_token.clone(), csr.clone());
        let (exhausted, issued) = (exhausted.clone(), issued.clone());
        flooders.push(tokio::spawn(async move {
            let client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
            let mut calls = Vec::new();
            for _ in 0..40 {
                let mut client = client.clone();
                let (token, csr) = (token.clone(), csr.clone());
                let (exhausted, issued) = (exhausted.clone(), issued.clone());
                calls.push(tokio::spawn(async move {
                    match create(&mut client, request(&csr.pem, 0, Some(&token), None)).await {
                        Ok(_) => issued.fetch_add(1, Ordering::SeqCst),
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            exhausted.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(s) => panic!("unexpected answer to the flood: {s:?}"),
                    };
                }));
            }
            for c in calls {
                c.await.unwrap();
            }
        }));
    }
    // The legitimate workload, while the flood is on.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let legit_csr = p256_csr(&[]).unwrap();
    let legit_token = h.tokens.token("shop", "web");
    let mut req = request(&legit_csr.pem, 0, Some(&legit_token), None);
    req.set_timeout(Duration::from_secs(20));
    let legit = tokio::time::timeout(Duration::from_secs(30), async {
        let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
        create(&mut client, req).await
    })
    .await
    .expect("the legitimate client was not answered within its deadline");
    assert!(legit.is_ok(), "{legit:?}");
    tokio::time::timeout(Duration::from_secs(120), async {
        for f in flooders {
            f.await.unwrap();
        }
    })
    .await
    .expect("the flood was not answered in bounded time");
    let (exhausted, issued) = (
        exhausted.load(Ordering::SeqCst),
        issued.load(Ordering::SeqCst),
    );
    assert_eq!(exhausted + issued, 320);
    assert!(
        exhausted > 200,
        "the flood was not limited: {issued} issued"
    );
    drop(silent);
    let h = Arc::into_inner(h).unwrap();
    h.stop().await;
}
