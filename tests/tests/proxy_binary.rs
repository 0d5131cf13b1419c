//! Two workloads through two real `citadel-proxy` processes over mutual TLS, with
//! certificates and policies from the real agent and CA: `citadel serve --policies DIR`,
//! a join token, `citadel-agent` mapping two uids to `shop/web` and `shop/api`, each
//! proxy run as its uid, a TCP echo application behind api's inbound, and the client
//! going through web's outbound. Needs root (to run the proxies as other uids).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use citadel_e2e::mesh::{
    MESH_API, MESH_WEB, TwoProxies, allow_sa_to_api_strict, deny_sa_to_api, echo_app, is_root,
};
use citadel_e2e::process::{binary, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WEB: &str = MESH_WEB;
const API: &str = MESH_API;

/// The Istio docs' example: ALLOW GET on `/info*` from one principal, on an HTTP port.
const GET_INFO_FROM_WEB: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-get-info, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/web]
    to:
    - operation:
        methods: [GET]
        paths: [/info*]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

async fn echo(s: &mut TcpStream) -> Result<(), String> {
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(()),
        Ok(Ok(_)) => Err(format!("echoed {buf:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no echo within 5 s".to_owned()),
    }
}

async fn through(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    echo(&mut s).await?;
    Ok(s)
}

async fn closed_by_peer(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 64];
    let until_closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), until_closed)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_allow_then_deny_web_to_api_over_mtls() {
    if !is_root() {
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let app = echo_app().await.port();
    let mesh = TwoProxies::start(
        "allow.yaml",
        &allow_sa_to_api_strict("web"),
        &["--policies-poll-interval", "1s"],
        &app.to_string(),
    )
    .await;
    let (api, api_in, web_out) = (&mesh.api, mesh.api_in, mesh.web_out);
    let logs = || mesh.logs();

    // Allowed: web → (plain) web's outbound → mTLS → api's inbound → app, and back.
    let web_out_addr: SocketAddr = format!("127.0.0.1:{web_out}").parse().unwrap();
    let mut open = through(web_out_addr)
        .await
        .unwrap_or_else(|e| panic!("web → api refused: {e}\n{}", logs()));
    // STRICT: plaintext straight to api's inbound is refused.
    let api_in_addr: SocketAddr = format!("127.0.0.1:{api_in}").parse().unwrap();
    assert!(through(api_in_addr).await.is_err(), "plaintext got through");

    // A DENY policy in the CA's directory: the open connection is closed and new ones refused.
    std::fs::write(mesh.policies.join("deny.yaml"), deny_sa_to_api("web")).unwrap();
    assert!(
        closed_by_peer(&mut open, 20).await,
        "the open connection was not closed\n{}",
        logs()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while through(web_out_addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "web → api still allowed 20 s after the DENY policy\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api_log = api.log_text();
    assert!(
        api_log.contains("connection denied") && api_log.contains("shop/api-deny-web"),
        "{api_log}"
    );
    let (_, metrics) = http_get(api.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"source_principal="cluster.local/ns/shop/sa/web""#)
            && metrics.contains(r#"decision="deny""#),
        "{metrics}"
    );
}

/// A keep-alive HTTP/1.1 application answering every request head with 200 and the
/// request line and XFCC it got.
async fn http_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let line = head.lines().next().unwrap_or("").to_owned();
                        let xfcc = head
                            .lines()
                            .find(|l| {
                                l.to_ascii_lowercase()
                                    .starts_with("x-forwarded-client-cert:")
                            })
                            .unwrap_or("")
                            .to_owned();
                        let body = format!("{line}\n{xfcc}\n");
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    port
}

/// Sends `GET path` on `s` and reads one answer: status and body.
async fn get(s: &mut TcpStream, path: &str) -> Result<(u16, String), String> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: api.shop\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("bad status line: {head}"))?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())
                            .flatten()
                    })
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("closed mid-body".to_owned());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return Ok((status, body));
            }
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before an answer".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_serve_http_200_when_allowed_and_403_rbac_access_denied_otherwise() {
    if !is_root() {
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let app = http_app().await;
    let mesh = TwoProxies::start(
        "get-info.yaml",
        GET_INFO_FROM_WEB,
        &[],
        &format!("{app}:http"),
    )
    .await;
    let (api, api_in, web_out) = (&mesh.api, mesh.api_in, mesh.web_out);
    let logs = || mesh.logs();

    // web → web's outbound → mTLS → api's HTTP inbound → app, several requests on
    // one kept-alive connection, each decided on its own.
    let mut s = TcpStream::connect(("127.0.0.1", web_out)).await.unwrap();
    let (status, body) = get(&mut s, "/info/v1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(status, 200, "{body}\n{}", logs());
    assert!(body.starts_with("GET /info/v1 HTTP/1.1\n"), "{body}");
    assert!(
        body.contains(&format!("By={API};URI={WEB}")),
        "XFCC: {body}"
    );
    let (status, body) = get(&mut s, "/admin").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "{}",
        logs()
    );
    assert_eq!(get(&mut s, "/info").await.unwrap().0, 200);

    // STRICT: plaintext straight to the HTTP port is refused before any HTTP.
    let mut plain = TcpStream::connect(("127.0.0.1", api_in)).await.unwrap();
    assert!(
        get(&mut plain, "/info").await.is_err(),
        "plaintext got an answer"
    );

    let api_log = api.log_text();
    assert!(
        api_log.contains("request denied")
            && api_log.contains("path=/admin")
            && api_log.contains("no ALLOW policy matched"),
        "{api_log}"
    );
    let (_, metrics) = http_get(api.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("citadel_proxy_inbound_requests_total")
            && metrics.contains(r#"decision="deny""#)
            && metrics.contains(r#"decision="allow""#),
        "{metrics}"
    );
}

#[test]
fn malformed_listener_flags_are_refused_with_the_expected_form() {
    let out = Command::new(binary("citadel-proxy"))
        .args([
            "run",
            "--agent-socket",
            "/nonexistent/agent.sock",
            "--outbound",
            "9000=api:15006",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("LOCAL_PORT=HOST:PORT,SPIFFE_ID"),
        "{stderr}"
    );
}
