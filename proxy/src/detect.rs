//! Pure decisions of transparent capture: the ALPN a ClientHello offers (read
//! from peeked bytes, nothing consumed), the application protocol of a
//! connection's first bytes, where a captured outbound connection goes, and
//! whether a captured connection is the proxy's own (a redirect loop).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use citadel_identity::SpiffeId;

use crate::cidr::Cidr;
use crate::decide::H2_PREFACE;

/// What peeked bytes say about a TLS ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A whole ClientHello, with the ALPN values it offers (none: empty).
    Alpn(Vec<Vec<u8>>),
    /// Not a whole ClientHello yet.
    NeedMore,
    /// Not a ClientHello rustls can read: the handshake will fail on it.
    Invalid,
}

/// Reads the ALPN offer of the ClientHello at the start of `peeked`, as
/// Envoy's tls_inspector does with `MSG_PEEK`: a fresh rustls acceptor is fed a
/// copy of the bytes, so the real handshake later starts from the same bytes.
pub fn client_hello_alpn(peeked: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = peeked;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::Invalid,
        }
    }
    match acceptor.accept() {
        Ok(None) => Hello::NeedMore,
        Ok(Some(accepted)) => Hello::Alpn(
            accepted
                .client_hello()
                .alpn()
                .map(|it| it.map(<[u8]>::to_vec).collect())
                .unwrap_or_default(),
        ),
        Err(_) => Hello::Invalid,
    }
}

/// The application protocol of a connection, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
    /// Anything else: opaque TCP.
    Opaque,
    /// Too few bytes to tell.
    NeedMore,
}

/// The request methods that mark HTTP/1 (CONNECT is left out: tunnels are not
/// served on HTTP ports, so they stay opaque TCP).
const METHODS: [&[u8]; 8] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// HTTP/1 when the bytes start with a method and a space, HTTP/2 on the whole
/// preface, opaque as soon as they can be neither.
pub fn app_protocol(first: &[u8]) -> AppProtocol {
    let mut could_be_more = false;
    for m in METHODS.iter().chain(std::iter::once(&H2_PREFACE)) {
        let n = first.len().min(m.len());
        if first.get(..n) == m.get(..n) {
            if first.len() >= m.len() {
                return if *m == H2_PREFACE {
                    AppProtocol::Http2
                } else {
                    AppProtocol::Http1
                };
            }
            could_be_more = true;
        }
    }
    if could_be_more || first.is_empty() {
        AppProtocol::NeedMore
    } else {
        AppProtocol::Opaque
    }
}

/// Where a captured outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Inside the mesh: originate mTLS; the server must present exactly this
    /// SPIFFE ID (from `--peers`) or, when `None`, any SVID of our trust domain.
    Mesh(Option<SpiffeId>),
    /// Outside the mesh: the bytes pass through unchanged.
    Passthrough,
}

/// Routes a captured outbound connection to `dst`: a `--peers` address or an
/// address in a `--mesh-cidr` range is a mesh peer; everything else passes through.
pub fn route(dst: IpAddr, mesh: &[Cidr], peers: &HashMap<IpAddr, SpiffeId>) -> Route {
    if let Some(id) = peers.get(&dst) {
        return Route::Mesh(Some(id.clone()));
    }
    if mesh.iter().any(|c| c.contains(dst)) {
        Route::Mesh(None)
    } else {
        Route::Passthrough
    }
}

/// Why a captured connection is refused as a redirect loop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Loop {
    /// The original destination is one of the proxy's own capture listeners:
    /// forwarding would connect the proxy to itself.
    #[error("its original destination {0} is a capture listener of this proxy")]
    ToCaptureListener(SocketAddr),
    /// The connection comes from a socket the proxy opened itself: its own
    /// traffic was captured again (the rules do not exclude the proxy's uid).
    #[error("it comes from {0}, a connection this proxy opened itself")]
    OwnTraffic(SocketAddr),
}

/// Refuses the two shapes of a redirect loop. `local` is the address the
/// connection was accepted on, `capture_ports` the ports of both capture
/// listeners, `own` whether `peer` is a socket the proxy opened.
pub fn check_loop(
    original_dst: SocketAddr,
    local: SocketAddr,
    peer: SocketAddr,
    capture_ports: &[u16],
    own: bool,
) -> Result<(), Loop> {
    if own {
        return Err(Loop::OwnTraffic(peer));
    }
    let to_self = original_dst == local
        || (capture_ports.contains(&original_dst.port())
            && (original_dst.ip().is_loopback()
                || original_dst.ip() == local.ip()
                || original_dst.ip().is_unspecified()));
    if to_self {
        return Err(Loop::ToCaptureListener(original_dst));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(alpn: &[&[u8]]) -> Vec<u8> {
        // A real ClientHello from rustls, captured from a client connection.
        let provider = citadel_tls::provider();
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut c = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            "mesh.local".try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_alpn_offer_of_a_peeked_client_hello() {
        let bytes = hello(&[b"citadel/1", b"istio"]);
        assert_eq!(
            client_hello_alpn(&bytes),
            Hello::Alpn(vec![b"citadel/1".to_vec(), b"istio".to_vec()])
        );
        assert_eq!(client_hello_alpn(&hello(&[])), Hello::Alpn(vec![]));
        let half = bytes.get(..bytes.len() / 2).unwrap();
        assert_eq!(client_hello_alpn(half), Hello::NeedMore);
        assert_eq!(client_hello_alpn(&[]), Hello::NeedMore);
    }

    #[test]
    fn rejects_garbage_after_a_tls_record_header_as_invalid() {
        let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x05];
        garbage.extend_from_slice(b"hello");
        assert_eq!(client_hello_alpn(&garbage), Hello::Invalid);
    }

    #[test]
    fn tells_http1_http2_and_opaque_bytes_apart() {
        assert_eq!(app_protocol(b"GET / HTTP/1.1\r\n"), AppProtocol::Http1);
        assert_eq!(app_protocol(b"DELETE /x"), AppProtocol::Http1);
        assert_eq!(app_protocol(H2_PREFACE), AppProtocol::Http2);
        assert_eq!(app_protocol(b"PRI * HT"), AppProtocol::NeedMore);
        assert_eq!(app_protocol(b"GE"), AppProtocol::NeedMore);
        assert_eq!(app_protocol(b""), AppProtocol::NeedMore);
        assert_eq!(app_protocol(b"GET/"), AppProtocol::Opaque);
        assert_eq!(app_protocol(b"\x00\x01binary"), AppProtocol::Opaque);
        assert_eq!(app_protocol(b"CONNECT x:1"), AppProtocol::Opaque);
        assert_eq!(app_protocol(b"SSH-2.0-OpenSSH"), AppProtocol::Opaque);
    }

    #[test]
    fn routes_mesh_ranges_and_peers_and_passes_the_rest_through() {
        let mesh: Vec<Cidr> = vec!["10.244.0.0/16".parse().unwrap()];
        let api = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
        let peers = HashMap::from([("10.244.1.7".parse().unwrap(), api.clone())]);
        assert_eq!(
            route("10.244.1.7".parse().unwrap(), &mesh, &peers),
            Route::Mesh(Some(api))
        );
        assert_eq!(
            route("10.244.1.8".parse().unwrap(), &mesh, &peers),
            Route::Mesh(None)
        );
        assert_eq!(
            route("93.184.216.34".parse().unwrap(), &mesh, &peers),
            Route::Passthrough
        );
    }

    #[test]
    fn rejects_redirect_loops_by_construction() {
        let local: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let peer: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let ports = [15001, 15006];
        // A connection made straight to the capture port: no NAT happened.
        assert_eq!(
            check_loop(local, local, peer, &ports, false),
            Err(Loop::ToCaptureListener(local))
        );
        let other_capture: SocketAddr = "127.0.0.1:15006".parse().unwrap();
        assert!(check_loop(other_capture, local, peer, &ports, false).is_err());
        // The proxy's own upstream connection captured again.
        let app: SocketAddr = "10.0.0.3:8080".parse().unwrap();
        assert_eq!(
            check_loop(app, local, peer, &ports, true),
            Err(Loop::OwnTraffic(peer))
        );
        assert_eq!(check_loop(app, local, peer, &ports, false), Ok(()));
        // Port 15001 of another pod is a real destination.
        let remote: SocketAddr = "10.0.0.9:15001".parse().unwrap();
        assert_eq!(check_loop(remote, local, peer, &ports, false), Ok(()));
    }
}
