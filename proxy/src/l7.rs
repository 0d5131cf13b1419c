//! HTTP inbound ports: after the transport rule and mTLS, each connection is
//! served with hyper (HTTP/1.1, or HTTP/2 by ALPN or its preface), and each
//! request is decided on its own with the policies of the moment. Allowed
//! requests go to the application over kept-alive HTTP/1.1 connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use citadel_identity::Escaped;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::decide::{ConnFacts, admit_request, http_attributes};
use crate::framing::{HeadVerdict, Tracker};
use crate::inbound::Inbound;
use crate::request_auth::{self, Refused};

/// The body of every response the proxy sends.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The body of a denial.
pub const RBAC_DENIED: &str = "RBAC: access denied";

/// `x-forwarded-client-cert`.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Limits of HTTP serving.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time a client has to send a whole request head (HTTP/1).
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes (431 beyond it).
    pub max_header_bytes: usize,
    /// Time to connect to the application.
    pub connect_timeout: Duration,
}

/// The server and client halves shared by every HTTP connection.
pub struct HttpServing {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    client: Client<HttpConnector, Incoming>,
    limits: HttpLimits,
}

impl HttpServing {
    /// Builds the server (with its header limits and timeout) and the pooled client.
    pub fn new(limits: HttpLimits) -> Self {
        Self::with_source(limits, None)
    }

    /// As [`Self::new`], the client connecting from `source` (IPv4, IPv6) when given.
    pub fn with_source(
        limits: HttpLimits,
        source: Option<(std::net::Ipv4Addr, std::net::Ipv6Addr)>,
    ) -> Self {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
            .max_header_size(limits.max_header_bytes);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.set_nodelay(true);
        if let Some((v4, v6)) = source {
            connector.set_local_addresses(v4, v6);
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            h1,
            h2,
            client,
            limits,
        }
    }
}

/// A connection's stream whose received bytes also feed a [`Tracker`].
struct Tracked<S> {
    inner: S,
    tracker: Arc<Mutex<Tracker>>,
}

fn lock(t: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && let Some(new) = buf.filled().get(before..)
        {
            lock(&self.tracker).feed(new);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response made by the proxy itself.
pub fn local_response(status: StatusCode, text: &'static str, close: bool) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The answer to a request refused by request authentication: Envoy's status, words
/// and `www-authenticate`.
fn request_auth_refusal(refused: Refused, close: bool) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(refused.body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = refused.status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some(v) = refused.www_authenticate {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Removes hop-by-hop headers: the fixed list and every name `Connection` lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The `x-forwarded-client-cert` value for an mTLS peer, as Istio sets it.
pub fn xfcc(this_workload: &str, peer_id: &str) -> String {
    format!("By={this_workload};URI={peer_id}")
}

/// Serves one HTTP connection until it ends: HTTP/2 when `h2` (ALPN `h2`, or the
/// preface), else HTTP/1.1. Allowed requests go to the application at `app`.
pub async fn serve_connection<S>(
    inbound: Arc<Inbound>,
    io: S,
    facts: ConnFacts,
    peer: SocketAddr,
    app: SocketAddr,
    h2: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tracker = Arc::new(Mutex::new(Tracker::new(
        inbound.http.limits.max_header_bytes,
    )));
    let io = Tracked {
        inner: io,
        tracker: tracker.clone(),
    };
    let facts = Arc::new(facts);
    let shared = inbound.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let (inbound, facts, tracker) = (shared.clone(), facts.clone(), tracker.clone());
        async move { Ok::<_, Infallible>(handle(&inbound, req, &facts, app, &tracker).await) }
    });
    let io = TokioIo::new(io);
    let served = if h2 {
        inbound.http.h2.serve_connection(io, service).await
    } else {
        inbound.http.h1.serve_connection(io, service).await
    };
    if let Err(e) = served {
        tracing::debug!(%peer, error = %Escaped(&e), "HTTP connection ended with an error");
    }
}

async fn handle(
    inbound: &Inbound,
    req: Request<Incoming>,
    facts: &ConnFacts,
    app: SocketAddr,
    tracker: &Mutex<Tracker>,
) -> Response<Body> {
    let mut close = false;
    if req.version() < Version::HTTP_2 {
        match lock(tracker).next_verdict() {
            HeadVerdict::Clean => {}
            HeadVerdict::Untracked => close = true,
            HeadVerdict::Smuggling(why) => {
                tracing::warn!(
                    source = facts.peer_id.as_deref().unwrap_or("plaintext"),
                    port = facts.app_port,
                    method = %Escaped(req.method()),
                    path = %Escaped(req.uri().path()),
                    "request refused (400): {why}"
                );
                inbound
                    .metrics
                    .request(facts.principal.as_deref(), facts.app_port, "bad_request");
                return local_response(StatusCode::BAD_REQUEST, "Bad Request", true);
            }
        }
    }
    let Some(state) = inbound.policy.borrow().clone() else {
        return local_response(StatusCode::SERVICE_UNAVAILABLE, "no policy yet", true);
    };
    // End-user authentication first (Envoy runs jwt_authn before RBAC); its edits
    // (token removed, claim headers set) are what authorization and the app see.
    let (mut parts, body) = req.into_parts();
    let authn = match request_auth::authenticate_request(&state, &parts, crate::unix_now()) {
        Ok(passed) => passed,
        Err(refused) => {
            tracing::warn!(source = facts.peer_id.as_deref().unwrap_or("plaintext"),
                destination = %state.spiffe_id, port = facts.app_port, method = %Escaped(&parts.method),
                path = %Escaped(parts.uri.path()), status = refused.status.as_u16(), reason = %Escaped(&refused.body),
                "request refused by request authentication");
            inbound.metrics.request(
                facts.principal.as_deref(),
                facts.app_port,
                "unauthenticated",
            );
            return request_auth_refusal(refused, close);
        }
    };
    authn.apply(&mut parts);
    let mut attrs = http_attributes(&parts.method, &parts.uri, &parts.headers);
    attrs.jwt = authn.jwt;
    let admission = admit_request(&state, facts, Some(&attrs));
    let source = facts.peer_id.as_deref().unwrap_or("plaintext");
    if let Some(dry_run) = &admission.dry_run {
        tracing::info!(source, destination = %state.spiffe_id, port = facts.app_port,
            method = %Escaped(&attrs.method), path = %Escaped(&attrs.path), dry_run = %dry_run, "dry-run policies would decide");
    }
    if !admission.allowed() {
        tracing::warn!(
            source,
            source_ip = ?facts.source_ip,
            destination = %state.spiffe_id,
            port = facts.app_port,
            method = %Escaped(&attrs.method),
            path = %Escaped(&attrs.path),
            policy_version = %state.version,
            reason = %admission.reason,
            "request denied"
        );
        inbound
            .metrics
            .request(facts.principal.as_deref(), facts.app_port, "deny");
        return local_response(StatusCode::FORBIDDEN, RBAC_DENIED, close);
    }
    inbound
        .metrics
        .request(facts.principal.as_deref(), facts.app_port, "allow");

    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(XFCC);
    if let Some(peer_id) = &facts.peer_id
        && let Ok(v) = HeaderValue::from_str(&xfcc(&state.spiffe_id, peer_id))
    {
        parts.headers.insert(XFCC, v);
    }
    if !parts.headers.contains_key(header::HOST)
        && let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, v);
    }
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri = match Uri::try_from(format!("http://{app}{pq}")) {
        Ok(u) => u,
        Err(_) => return local_response(StatusCode::BAD_REQUEST, "Bad Request", true),
    };
    parts.version = Version::HTTP_11;
    match inbound
        .http
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if close {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Response::from_parts(parts, body.boxed())
        }
        Err(e) if e.is_connect() => {
            tracing::warn!(source, port = facts.app_port, error = %e, "the application refused the connection (503)");
            local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error",
                close,
            )
        }
        Err(e) => {
            tracing::warn!(source, port = facts.app_port, error = %e, "the application failed the request (502)");
            local_response(StatusCode::BAD_GATEWAY, "upstream error", close)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-secret", "1"),
            ("x-kept", "1"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn xfcc_names_this_workload_and_the_peer_like_istio() {
        assert_eq!(
            xfcc(
                "spiffe://cluster.local/ns/shop/sa/api",
                "spiffe://cluster.local/ns/shop/sa/web"
            ),
            "By=spiffe://cluster.local/ns/shop/sa/api;URI=spiffe://cluster.local/ns/shop/sa/web"
        );
    }

    #[test]
    fn a_denial_is_403_rbac_access_denied_in_text() {
        let r = local_response(StatusCode::FORBIDDEN, RBAC_DENIED, false);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");
        assert!(r.headers().get(header::CONNECTION).is_none());
    }
}
