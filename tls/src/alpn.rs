//! ALPN values of mesh connections (`wire-facts.md` §8.3/§8.4).
//!
//! A citadel-proxy originating mTLS offers [`CLIENT`]: our own value first, so
//! a citadel-proxy server knows its peer is a proxy, then Istio's `istio`, so
//! an Istio sidecar's PERMISSIVE listener takes the connection on its mTLS
//! chain. A server accepts [`SERVER`], in that order of preference. On a
//! PERMISSIVE port a TLS client that offers none of [`MESH`] is not a mesh
//! peer: its bytes pass through to the application, as Istio does.

/// Our own ALPN value: the TLS session is between two citadel-proxies.
pub const CITADEL: &[u8] = b"citadel/1";
/// Istio's generic mesh value (TCP chains).
pub const ISTIO: &[u8] = b"istio";
/// HTTP/2.
pub const H2: &[u8] = b"h2";
/// HTTP/1.1.
pub const HTTP11: &[u8] = b"http/1.1";

/// What a citadel-proxy offers when it originates mTLS.
pub const CLIENT: [&[u8]; 2] = [CITADEL, ISTIO];

/// What a citadel-proxy server selects, in its order of preference. Never
/// `istio-peer-exchange`: selecting it would promise Istio's metadata preamble.
pub const SERVER: [&[u8]; 4] = [CITADEL, H2, HTTP11, ISTIO];

/// The values that mark a mesh client: ours and the ones Istio's sidecars offer
/// (`istio-http/1.0`, `istio-http/1.1`, `istio-h2`, `istio-peer-exchange`, `istio`).
pub const MESH: [&[u8]; 6] = [
    CITADEL,
    b"istio-http/1.0",
    b"istio-http/1.1",
    b"istio-h2",
    b"istio-peer-exchange",
    ISTIO,
];

/// Whether a ClientHello offering `offered` comes from a mesh client.
pub fn is_mesh<'a>(offered: impl IntoIterator<Item = &'a [u8]>) -> bool {
    offered.into_iter().any(|p| MESH.contains(&p))
}

/// Whether a server offering [`SERVER`] can select one of `offered` (rustls
/// fails a handshake whose client offers ALPN values the server has none of).
pub fn server_can_select<'a>(offered: impl IntoIterator<Item = &'a [u8]>) -> bool {
    offered.into_iter().any(|p| SERVER.contains(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_sidecar_offers_are_mesh_and_plain_ones_are_not() {
        assert!(is_mesh([b"istio-http/1.1".as_slice(), ISTIO, HTTP11]));
        assert!(is_mesh([b"istio-peer-exchange".as_slice(), ISTIO]));
        assert!(is_mesh(CLIENT));
        assert!(!is_mesh([H2, HTTP11]));
        assert!(!is_mesh(std::iter::empty()));
    }

    #[test]
    fn server_selects_ours_first_and_never_peer_exchange() {
        assert!(server_can_select([ISTIO]));
        assert!(!server_can_select([b"istio-peer-exchange".as_slice()]));
        assert_eq!(SERVER.first(), Some(&CITADEL));
    }
}
