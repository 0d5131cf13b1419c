//! HTTP inbound ports in-process over real TCP and TLS on 127.0.0.1: certificates
//! from a test CA, policies fed directly (no agent), a small HTTP application that
//! answers with the request it saw and counts requests and connections.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use citadel_proxy::config::parse_inbound;
use citadel_proxy::decide::PolicyState;
use citadel_tls::testing::TestCa;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use support::{
    API, OTHER, Proxy, WEB, client_with, closed_by_peer, dead_port, local_config, start_proxy,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// The Istio docs' AuthorizationPolicy example (ALLOW GET on `/info*` from one
/// principal), for the `api` workload and the `web` principal.
const GET_INFO_FROM_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-info, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
"#;

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"#;

fn state(version: &str, yaml: &str) -> Arc<PolicyState> {
    support::state(API, "api", version, yaml)
}

/// What the application saw.
#[derive(Default)]
struct AppSeen {
    requests: AtomicUsize,
    connections: AtomicUsize,
}

/// An HTTP/1.1 application answering `METHOD PATH` and every header it got, one
/// per line; returns its port and its counters.
async fn http_app() -> (u16, Arc<AppSeen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(AppSeen::default());
    let counters = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            counters.connections.fetch_add(1, Ordering::SeqCst);
            let counters = counters.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let counters = counters.clone();
                    async move {
                        counters.requests.fetch_add(1, Ordering::SeqCst);
                        let mut text = format!("{} {}\n", req.method(), req.uri());
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        let big = req.uri().path() == "/big";
                        let _ = req.into_body().collect().await;
                        if big {
                            text = "x".repeat(1 << 20);
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(text),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

/// The api workload's proxy with one HTTP inbound port in front of `app`.
async fn proxy(ca: &TestCa, yaml: &str, app: u16) -> Proxy {
    let mut config = local_config("/nonexistent".into());
    config.handshake_timeout = Duration::from_secs(2);
    config.header_read_timeout = Duration::from_secs(1);
    let mut spec = parse_inbound(&format!("1:{app}:http")).unwrap();
    spec.port = 0;
    config.inbound = vec![spec];
    start_proxy(ca, API, "api", yaml, config).await
}

/// A mesh client for `id`, expecting the server to be API, offering `alpn` then
/// Istio's `istio` (as Istio's sidecars do: a mesh client on a PERMISSIVE port).
fn client(ca: &TestCa, id: &str, alpn: &[&[u8]]) -> TlsConnector {
    let mut offered = alpn.to_vec();
    offered.push(citadel_tls::alpn::ISTIO);
    client_with(ca, ca, id, &offered)
}

async fn mtls(addr: SocketAddr, c: &TlsConnector) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    c.connect(ServerName::try_from("api").unwrap(), tcp)
        .await
        .unwrap()
}

/// One HTTP/1.1 response: status, headers (lower-case names), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response with a Content-Length body; `None` if the connection ends
/// first or nothing comes within 5 s.
async fn read_answer<S: AsyncRead + Unpin>(s: &mut S) -> Option<Answer> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut headers);
                resp.parse(&buf[..end + 4]).ok()?;
                let status = resp.code?;
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = buf[end + 4..].to_vec();
                while body.len() < len {
                    let n = s.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                return Some(Answer {
                    status,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

/// Sends `GET`-style requests on a kept-alive connection and reads the answer.
async fn ask<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, method: &str, path: &str) -> Answer {
    ask_with(s, method, path, "").await
}

async fn ask_with<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    method: &str,
    path: &str,
    extra_headers: &str,
) -> Answer {
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: api.shop\r\n{extra_headers}Content-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_answer(s).await.expect("no answer")
}

/// Sends raw bytes on a new plaintext connection; the answer, if any.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<Answer> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    read_answer(&mut s).await
}

async fn plain_get_ok(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let a = ask(&mut s, "GET", "/ok").await;
    assert_eq!(a.status, 200, "{a:?}");
}

#[tokio::test]
async fn http_request_allowed_by_path_and_method() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, seen) = http_app().await;
    let p = proxy(&ca, GET_INFO_FROM_WEB, app).await;
    let mut s = mtls(p.inbound(), &client(&ca, WEB, &[])).await;
    let a = ask(&mut s, "GET", "/info/v1?x=1").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.starts_with("GET /info/v1?x=1\n"), "{}", a.body);
    assert!(a.body.contains("host: api.shop\n"), "{}", a.body);
    // Same connection: another path, another method.
    assert_eq!(ask(&mut s, "GET", "/admin").await.status, 403);
    assert_eq!(ask(&mut s, "POST", "/info").await.status, 403);
    assert_eq!(ask(&mut s, "GET", "/info").await.status, 200);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2);
    // Forwarded over one kept-alive connection to the application.
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn istio_docs_example_policy_allows_get_info_from_web_and_403s_the_rest() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, _) = http_app().await;
    let p = proxy(&ca, GET_INFO_FROM_WEB, app).await;
    let mut web = mtls(p.inbound(), &client(&ca, WEB, &[])).await;
    let mut other = mtls(p.inbound(), &client(&ca, OTHER, &[])).await;
    let mut plain = TcpStream::connect(p.inbound()).await.unwrap();
    for (who, method, path, want) in [
        ("web", "GET", "/info", 200),
        ("web", "GET", "/information", 200),
        ("web", "PUT", "/info", 403),
        ("web", "DELETE", "/info", 403),
        ("web", "GET", "/", 403),
        ("other", "GET", "/info", 403),
        ("plaintext", "GET", "/info", 403),
    ] {
        let a = match who {
            "web" => ask(&mut web, method, path).await,
            "other" => ask(&mut other, method, path).await,
            _ => ask(&mut plain, method, path).await,
        };
        assert_eq!(a.status, want, "{who} {method} {path}: {a:?}");
    }
}

#[tokio::test]
async fn http_request_denied_gets_403_rbac_access_denied() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, seen) = http_app().await;
    let p = proxy(&ca, GET_INFO_FROM_WEB, app).await;
    let mut s = mtls(p.inbound(), &client(&ca, OTHER, &[])).await;
    let a = ask(&mut s, "GET", "/info").await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "RBAC: access denied");
    assert_eq!(a.header("content-type"), Some("text/plain"));
    // The connection stays up for the next request.
    assert_eq!(ask(&mut s, "GET", "/info").await.status, 403);
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        0,
        "a denied request reached the app"
    );
    let m = p.running.metrics.encode();
    assert!(
        m.contains(
            r#"citadel_proxy_inbound_requests_total{source_principal="cluster.local/ns/shop/sa/other",destination_port=""#
        ) && m.contains(r#"decision="deny"} 2"#),
        "{m}"
    );
}

#[tokio::test]
async fn http2_request_is_authorized_per_request() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, seen) = http_app().await;
    let p = proxy(&ca, &format!("{GET_INFO_FROM_WEB}---\n{DENY_ADMIN}"), app).await;
    // h2 chosen by ALPN over mTLS.
    let tls = mtls(p.inbound(), &client(&ca, WEB, &[b"h2", b"http/1.1"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut status = |path: &'static str| {
        let req = hyper::Request::get(format!("https://api.shop{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let fut = send.send_request(req);
        async move {
            let r = fut.await.unwrap();
            let code = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (code, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (code, body) = status("/info").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("host: api.shop\n"), "{body}");
    assert_eq!(
        status("/admin").await,
        (403, "RBAC: access denied".to_owned())
    );
    assert_eq!(status("/info/2").await.0, 200);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 2);

    // ALPN http/1.1 over mTLS: HTTP/1.1, decided the same way.
    let mut h1 = mtls(p.inbound(), &client(&ca, WEB, &[b"http/1.1"])).await;
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(ask(&mut h1, "GET", "/info").await.status, 200);
    assert_eq!(ask(&mut h1, "GET", "/admin").await.status, 403);

    // HTTP/2 with prior knowledge over plaintext: parsed, and denied (no principal).
    let tcp = TcpStream::connect(p.inbound()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = send
        .send_request(
            hyper::Request::get("http://api.shop/info")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"RBAC: access denied");
}

#[tokio::test]
async fn policy_change_applies_to_the_next_request_on_a_kept_alive_connection() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, _) = http_app().await;
    let p = proxy(&ca, "", app).await;
    let mut s = mtls(p.inbound(), &client(&ca, WEB, &[])).await;
    assert_eq!(ask(&mut s, "GET", "/admin").await.status, 200);
    p.policy.send_replace(Some(state("v2", DENY_ADMIN)));
    assert_eq!(ask(&mut s, "GET", "/admin").await.status, 403);
    assert_eq!(ask(&mut s, "GET", "/info").await.status, 200);
    p.policy.send_replace(Some(state("v3", "")));
    assert_eq!(ask(&mut s, "GET", "/admin").await.status, 200);
}

#[tokio::test]
async fn smuggling_with_content_length_and_transfer_encoding_is_400_and_not_forwarded() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, seen) = http_app().await;
    let p = proxy(&ca, "", app).await;
    for smuggled in [
        &b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    ] {
        let a = raw(p.inbound(), smuggled).await.expect("no answer");
        assert_eq!(a.status, 400, "{a:?}");
    }
    // Also after a clean request on the same connection.
    let mut s = TcpStream::connect(p.inbound()).await.unwrap();
    assert_eq!(ask(&mut s, "GET", "/first").await.status, 200);
    let a = ask_with(&mut s, "POST", "/second", "Transfer-Encoding: chunked\r\n").await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        1,
        "a smuggled request reached the app"
    );
    plain_get_ok(p.inbound()).await;
}

#[tokio::test]
async fn two_different_content_lengths_are_400() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, seen) = http_app().await;
    let p = proxy(&ca, "", app).await;
    for smuggled in [
        &b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\nab",
    ] {
        let a = raw(p.inbound(), smuggled).await.expect("no answer");
        assert_eq!(a.status, 400, "{a:?}");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
    plain_get_ok(p.inbound()).await;
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, seen) = http_app().await;
    let p = proxy(&ca, "", app).await;
    let big = "a".repeat(70 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let a = raw(p.inbound(), req.as_bytes()).await.expect("no answer");
    assert_eq!(a.status, 431, "{a:?}");
    // Just under the limit is served.
    let fine = "a".repeat(32 * 1024);
    let mut s = TcpStream::connect(p.inbound()).await.unwrap();
    let a = ask_with(&mut s, "GET", "/", &format!("X-Big: {fine}\r\n")).await;
    assert_eq!(a.status, 200);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, seen) = http_app().await;
    let p = proxy(&ca, "", app).await;
    let mut slow = TcpStream::connect(p.inbound()).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let dribble = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"X-A: b\r\n").await.is_err() {
                break;
            }
        }
    };
    let ((), ()) = tokio::join!(dribble, plain_get_ok(p.inbound()));
    // The header read timeout is 1 s: the dribbling client was cut off.
    assert!(
        closed_by_peer(&mut slow, 3).await,
        "the slow client was not closed"
    );
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_stall_others() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, _) = http_app().await;
    let p = proxy(&ca, "", app).await;
    // Pipelined requests for 1 MiB answers, never read.
    let mut stuck = TcpStream::connect(p.inbound()).await.unwrap();
    let many = "GET /big HTTP/1.1\r\nHost: a\r\n\r\n".repeat(32);
    let _ = tokio::time::timeout(Duration::from_secs(2), stuck.write_all(many.as_bytes())).await;
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(5), plain_get_ok(p.inbound()))
            .await
            .expect("stalled by a client that never reads");
    }
    drop(stuck);
}

#[tokio::test]
async fn app_refusing_connections_is_503() {
    let ca = TestCa::new("cluster.local", "root");
    let app = dead_port().await;
    let p = proxy(&ca, "", app).await;
    let mut s = mtls(p.inbound(), &client(&ca, WEB, &[])).await;
    let a = ask(&mut s, "GET", "/").await;
    assert_eq!(a.status, 503, "{a:?}");
    // The client's connection is kept; the proxy keeps serving.
    assert_eq!(ask(&mut s, "GET", "/").await.status, 503);
}

#[tokio::test]
async fn xfcc_carries_the_peer_identity_and_client_xfcc_is_stripped() {
    let ca = TestCa::new("cluster.local", "root");
    let (app, _) = http_app().await;
    let p = proxy(&ca, "", app).await;
    let forged = "X-Forwarded-Client-Cert: By=spiffe://evil/x;URI=spiffe://cluster.local/ns/shop/sa/admin\r\n";
    let hop = "Connection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\n";
    let mut s = mtls(p.inbound(), &client(&ca, WEB, &[])).await;
    let a = ask_with(&mut s, "GET", "/", &format!("{forged}{hop}")).await;
    assert_eq!(a.status, 200);
    let xfcc: Vec<&str> = a
        .body
        .lines()
        .filter(|l| l.starts_with("x-forwarded-client-cert:"))
        .collect();
    assert_eq!(
        xfcc,
        vec![format!("x-forwarded-client-cert: By={API};URI={WEB}")],
        "{}",
        a.body
    );
    assert!(a.body.contains("x-kept: 1\n"), "{}", a.body);
    for hop_by_hop in ["x-hop:", "keep-alive:", "connection:"] {
        assert!(
            !a.body.contains(hop_by_hop),
            "{hop_by_hop} forwarded: {}",
            a.body
        );
    }
    // Plaintext: no identity to vouch for, and the forged header is still stripped.
    let mut plain = TcpStream::connect(p.inbound()).await.unwrap();
    let a = ask_with(&mut plain, "GET", "/", forged).await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("x-forwarded-client-cert"), "{}", a.body);
}
