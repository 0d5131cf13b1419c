//! The two sample services (`citadel-mesh sample-app frontend|backend`),
//! tiny HTTP/1.1 servers that sit behind their proxies:
//!
//! - backend answers every request with its method, path and the caller's
//!   identity, read from the `x-forwarded-client-cert` header its proxy sets
//!   for mutual-TLS callers;
//! - frontend relays every request (method and path) to backend through its
//!   proxy's outbound listener and hands back backend's status and body
//!   unchanged, so a proxy's `403 RBAC: access denied` reaches the user as is.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Which sample, and where.
#[derive(Clone, Debug)]
pub enum SampleApp {
    /// Relays to `backend` (frontend's proxy outbound).
    Frontend {
        /// Where to listen.
        listen: SocketAddr,
        /// Frontend's proxy outbound to backend.
        backend: SocketAddr,
    },
    /// Answers with the caller's identity.
    Backend {
        /// Where to listen.
        listen: SocketAddr,
    },
}

/// Largest body frontend relays back.
const MAX_RELAYED_BODY: usize = 1 << 20;
/// How long frontend waits for backend.
const RELAY_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until the process is stopped.
pub async fn run(app: SampleApp) -> std::io::Result<()> {
    let listen = match &app {
        SampleApp::Frontend { listen, .. } | SampleApp::Backend { listen } => *listen,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("sample app listening on {listen}");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

async fn handle(app: &SampleApp, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    match app {
        SampleApp::Backend { .. } => {
            let xfcc = req
                .headers()
                .get("x-forwarded-client-cert")
                .and_then(|v| v.to_str().ok());
            let body = backend_answer(req.method().as_str(), &path, xfcc);
            eprintln!("{}", body.lines().next().unwrap_or_default());
            text(StatusCode::OK, body)
        }
        SampleApp::Frontend { backend, .. } => {
            let method = req.method().clone();
            match tokio::time::timeout(RELAY_TIMEOUT, relay(*backend, method.clone(), &path)).await
            {
                Ok(Ok((status, body))) => {
                    eprintln!("{method} {path} -> backend answered {status}");
                    let mut resp = Response::new(Full::new(body));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain"),
                    );
                    resp
                }
                Ok(Err(e)) => {
                    eprintln!("{method} {path} -> backend unreachable: {e}");
                    text(
                        StatusCode::BAD_GATEWAY,
                        format!("frontend: backend unreachable through {backend}: {e}\n"),
                    )
                }
                Err(_) => text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("frontend: backend did not answer within {RELAY_TIMEOUT:?}\n"),
                ),
            }
        }
    }
}

/// Backend's answer: what was asked, and who asked (from XFCC, which the
/// proxy sets only for callers that proved an identity over mutual TLS).
pub fn backend_answer(method: &str, path: &str, xfcc: Option<&str>) -> String {
    let caller = xfcc.and_then(xfcc_uri);
    match caller {
        Some(id) => format!(
            "backend: {method} {path}\ncaller: {id} (verified over mutual TLS by backend's proxy)\n"
        ),
        None => format!("backend: {method} {path}\ncaller: no verified identity (plaintext)\n"),
    }
}

/// The `URI=` of an `x-forwarded-client-cert` value (`By=…;URI=…`).
pub fn xfcc_uri(xfcc: &str) -> Option<&str> {
    // The last element is the nearest hop (each proxy appends its own).
    let last = xfcc.rsplit(',').next()?;
    last.split(';')
        .find_map(|kv| kv.trim().strip_prefix("URI="))
        .map(|v| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// `METHOD path` to backend through `outbound`: (status, body).
async fn relay(
    outbound: SocketAddr,
    method: http::Method,
    path: &str,
) -> Result<(StatusCode, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(outbound)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "backend")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RELAYED_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_the_verified_caller() {
        let xfcc = "By=spiffe://cluster.local/ns/demo/sa/backend;URI=spiffe://cluster.local/ns/demo/sa/frontend";
        assert_eq!(
            xfcc_uri(xfcc),
            Some("spiffe://cluster.local/ns/demo/sa/frontend")
        );
        let a = backend_answer("GET", "/api/hello", Some(xfcc));
        assert!(a.starts_with(
            "backend: GET /api/hello\ncaller: spiffe://cluster.local/ns/demo/sa/frontend "
        ));
        assert!(backend_answer("GET", "/", None).contains("no verified identity"));
        assert_eq!(xfcc_uri("By=x;URI="), None);
        assert_eq!(xfcc_uri(""), None);
    }

    #[tokio::test]
    async fn frontend_relays_backends_status_and_body() {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let backend = free();
        let frontend = free();
        tokio::spawn(run(SampleApp::Backend { listen: backend }));
        tokio::spawn(run(SampleApp::Frontend {
            listen: frontend,
            backend,
        }));
        let mut answer = None;
        for _ in 0..50 {
            if let Ok((status, body)) = relay(frontend, http::Method::GET, "/api/x?y=1").await {
                answer = Some((status, body));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, body) = answer.expect("frontend answers");
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.starts_with(b"backend: GET /api/x?y=1\ncaller: no verified identity"),
            "{body:?}"
        );
        // Backend gone: frontend says so with a 502 instead of failing.
        let unreachable = free();
        let lone = free();
        tokio::spawn(run(SampleApp::Frontend {
            listen: lone,
            backend: unreachable,
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, _) = relay(lone, http::Method::GET, "/").await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
}
