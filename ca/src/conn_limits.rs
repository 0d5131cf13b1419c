//! Connection limits of the public port: a cap on open connections, a TLS handshake
//! deadline, an idle timeout, and the HTTP/2 settings (concurrent streams, keepalive).
//!
//! A connection takes a slot when it is accepted (before its handshake, so slow
//! handshakes count) and gives it back when it closes; without a free slot the socket is
//! closed at once. The same holds per client IP address, with a smaller cap, so that one
//! address holding silent sockets cannot lock every other client out. Idleness is "no request in flight": a tower layer counts the requests
//! of each connection (found by its peer address, which tonic puts in every request) until
//! their response bodies end, so an open trust-bundle stream keeps its connection, and the
//! connection's reader ends it once [`idle_deadline`] has passed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::limits::Limits;
use crate::metrics::CaMetrics;

/// When an idle connection is to be closed (pure): `idle_timeout` after it last had no
/// request in flight; `None` while a request is in flight.
pub fn idle_deadline(
    in_flight: usize,
    idle_since: Instant,
    idle_timeout: Duration,
) -> Option<Instant> {
    (in_flight == 0).then(|| idle_since + idle_timeout)
}

/// Requests in flight on one connection.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(now),
        }
    }

    fn deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        idle_deadline(self.in_flight.load(Ordering::SeqCst), since, idle_timeout)
    }
}

/// Ends one request's share of its connection's activity when dropped.
struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        // The idle clock restarts under the lock, so the reader never sees a count of zero
        // with a stale start.
        let mut since = self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = Instant::now();
        }
    }
}

/// The open connections of the public port, by peer address.
#[derive(Debug, Default)]
pub struct ConnTracker {
    conns: Mutex<HashMap<SocketAddr, Arc<Activity>>>,
}

impl ConnTracker {
    fn register(&self, peer: SocketAddr) -> Arc<Activity> {
        let activity = Arc::new(Activity::new(Instant::now()));
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, activity.clone());
        activity
    }

    fn remove(&self, peer: SocketAddr) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }

    fn begin(&self, peer: SocketAddr) -> Option<ActivityGuard> {
        let activity = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .cloned()?;
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(ActivityGuard(activity))
    }
}

/// Whether one more connection from an address that has `open` fits under `max` (pure).
pub fn admits_another(open: usize, max: usize) -> bool {
    open < max
}

/// Open connections per client IP address.
#[derive(Debug, Default)]
pub struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// Counts a connection from `ip` if it fits under `max`.
    fn try_take(&self, ip: IpAddr, max: usize) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_insert(0);
        if !admits_another(*count, max) {
            return false;
        }
        *count += 1;
        true
    }

    fn give_back(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Addresses that left take no memory.
                open.remove(&ip);
            }
        }
    }
}

/// What a connection holds until it closes: its slot under the cap, its count under the
/// per-address cap and its tracker entry.
struct Slot {
    _permit: OwnedSemaphorePermit,
    per_address: Arc<PerAddress>,
    tracker: Arc<ConnTracker>,
    peer: SocketAddr,
    metrics: Arc<CaMetrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.per_address.give_back(self.peer.ip());
        self.tracker.remove(self.peer);
        self.metrics.open_connections.dec();
    }
}

struct IdleWatch {
    timeout: Duration,
    activity: Arc<Activity>,
    sleep: Pin<Box<Sleep>>,
    expired: bool,
}

impl IdleWatch {
    /// True once the connection has been idle for the timeout; registers the wake-up.
    fn expired(&mut self, cx: &mut Context<'_>, metrics: &CaMetrics) -> bool {
        while !self.expired && self.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.activity.deadline(self.timeout) {
                Some(at) if at <= now => {
                    metrics.limited("idle_timeout");
                    self.expired = true;
                }
                Some(at) => self.sleep.as_mut().reset(at),
                None => self.sleep.as_mut().reset(now + self.timeout),
            }
        }
        self.expired
    }
}

/// A TLS connection of the public port under its limits.
pub struct LimitedIo {
    inner: TlsStream<TcpStream>,
    idle: Option<IdleWatch>,
    slot: Slot,
}

impl Connected for LimitedIo {
    // The TLS connection's own, so `Request::peer_certs` and `remote_addr` keep working.
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(idle) = &mut this.idle
            && idle.expired(cx, &this.slot.metrics)
        {
            // End of stream: the HTTP/2 connection ends with no request in flight.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections under the connection cap and completes TLS handshakes
/// concurrently within the handshake deadline, yielding only established sessions.
pub fn limited_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: &Limits,
    tracker: Arc<ConnTracker>,
    metrics: Arc<CaMetrics>,
) -> ReceiverStream<Result<LimitedIo, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let max_per_address = limits.max_connections_per_address;
    let handshake_timeout = limits.handshake_timeout;
    let idle_timeout = limits.idle_timeout;
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Closing at once costs the flood nothing to retry, but costs us nothing
                // either: no handshake, no buffers.
                metrics.limited("connections");
                tracing::debug!(%peer, "connection refused: --max-connections reached");
                drop(tcp);
                continue;
            };
            if !per_address.try_take(peer.ip(), max_per_address) {
                metrics.limited("connections_per_address");
                tracing::debug!(%peer, "connection refused: --max-connections-per-address reached");
                drop(tcp);
                continue;
            }
            let _ = tcp.set_nodelay(true);
            metrics.open_connections.inc();
            let slot = Slot {
                _permit: permit,
                per_address: per_address.clone(),
                tracker: tracker.clone(),
                peer,
                metrics: metrics.clone(),
            };
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            let tracker = tracker.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %citadel_identity::Escaped(&e), "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.limited("handshake_timeout");
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let activity = tracker.register(peer);
                let idle = idle_timeout.map(|timeout| IdleWatch {
                    timeout,
                    activity,
                    sleep: Box::pin(tokio::time::sleep(timeout)),
                    expired: false,
                });
                let _ = tx
                    .send(Ok(LimitedIo {
                        inner: stream,
                        idle,
                        slot,
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The HTTP/2 settings of the limits on a tonic server.
pub fn configure(server: tonic::transport::Server, limits: &Limits) -> tonic::transport::Server {
    server
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
}

/// Counts each connection's requests in flight (see the module documentation).
#[derive(Clone)]
pub struct TrackLayer {
    tracker: Arc<ConnTracker>,
}

impl TrackLayer {
    /// Counts into `tracker`.
    pub fn new(tracker: Arc<ConnTracker>) -> Self {
        Self { tracker }
    }
}

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            tracker: self.tracker.clone(),
        }
    }
}

/// The service of [`TrackLayer`].
#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    tracker: Arc<ConnTracker>,
}

impl<S, B> tower::Service<http::Request<B>> for Track<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.get_ref().remote_addr())
            .and_then(|peer| self.tracker.begin(peer));
        let response = self.inner.call(req);
        Box::pin(async move {
            let resp = response.await?;
            Ok(match guard {
                // In flight until the response body (a stream, perhaps) ends.
                Some(guard) => resp.map(|body| {
                    tonic::body::Body::new(body.map_frame(move |frame| {
                        let _held = &guard;
                        frame
                    }))
                }),
                None => resp,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_at_most_its_share_and_others_are_counted_apart() {
        let per = PerAddress::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(per.try_take(a, 2));
        assert!(per.try_take(a, 2));
        assert!(!per.try_take(a, 2), "a third connection from one address");
        assert!(per.try_take(b, 2), "another address is not held back");
        per.give_back(a);
        assert!(
            per.try_take(a, 2),
            "a closed connection gives its place back"
        );
        per.give_back(a);
        per.give_back(a);
        per.give_back(b);
        assert!(
            per.open.lock().unwrap().is_empty(),
            "addresses that left are forgotten"
        );
    }

    #[test]
    fn a_connection_is_idle_only_without_requests_in_flight() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(300);
        assert_eq!(idle_deadline(0, t0, timeout), Some(t0 + timeout));
        assert_eq!(idle_deadline(1, t0, timeout), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_restarts_when_the_last_request_ends() {
        let tracker = ConnTracker::default();
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let activity = tracker.register(peer);
        let timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        assert_eq!(activity.deadline(timeout), Some(t0 + timeout));
        let a = tracker.begin(peer).unwrap();
        let b = tracker.begin(peer).unwrap();
        tokio::time::advance(Duration::from_secs(20)).await;
        drop(a);
        assert_eq!(
            activity.deadline(timeout),
            None,
            "one request still in flight"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(b);
        assert_eq!(
            activity.deadline(timeout),
            Some(t0 + Duration::from_secs(25) + timeout)
        );
        tracker.remove(peer);
        assert!(
            tracker.begin(peer).is_none(),
            "a closed connection is not tracked"
        );
    }
}
