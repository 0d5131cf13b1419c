//! JWKS hygiene of the CA's local JWT authenticator, against an HTTPS issuer this test
//! controls: scheduled refresh, HTTPS only, no redirect, a size limit enforced while
//! reading.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_ca::auth::jwt::{JwksSource, JwtAuthenticator, JwtConfig, MAX_JWKS_BYTES};
use citadel_ca::auth::{Authenticator, Credentials};
use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};
use citadel_e2e::unix_now;
use citadel_identity::TrustDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the test issuer answers.
#[derive(Clone)]
enum Reply {
    /// 200 with this JWKS.
    Jwks(String),
    /// 302 to this location.
    Redirect(String),
    /// 200 without a length, more bytes than the limit, then silence (never closes).
    Endless,
}

type Shared = Arc<Mutex<Reply>>;

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// An HTTPS issuer on 127.0.0.1 with a certificate from a fresh test root: its address
/// and the root's PEM file.
async fn https_issuer(reply: Shared) -> (SocketAddr, tempfile::NamedTempFile) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &root_issuer)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, reply) = (acceptor.clone(), reply.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if !read_head(&mut tls).await {
                    return;
                }
                let reply = reply.lock().unwrap().clone();
                match reply {
                    Reply::Jwks(body) => {
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = tls.write_all(answer.as_bytes()).await;
                    }
                    Reply::Redirect(to) => {
                        let answer = format!(
                            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        let _ = tls.write_all(answer.as_bytes()).await;
                    }
                    Reply::Endless => {
                        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"keys\":[";
                        let _ = tls.write_all(head.as_bytes()).await;
                        let pad = vec![b' '; 64 * 1024];
                        for _ in 0..(2 * MAX_JWKS_BYTES / pad.len()) {
                            if tls.write_all(&pad).await.is_err() {
                                return;
                            }
                        }
                        let _ = tls.flush().await;
                        // Never finish: a reader that waits for the end waits forever.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    let mut pem = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut pem, root.pem().as_bytes()).unwrap();
    (addr, pem)
}

fn config(jwks: JwksSource, roots: Option<&tempfile::NamedTempFile>) -> JwtConfig {
    JwtConfig {
        issuer: TEST_ISSUER.into(),
        audiences: vec!["istio-ca".into()],
        jwks,
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        refresh_interval: Duration::from_secs(1),
        extra_roots: roots.map(|f| f.path().to_owned()),
    }
}

async fn accepts(auth: &JwtAuthenticator, token: &str) -> bool {
    auth.authenticate(&Credentials {
        bearer_token: Some(token),
        peer_chain: None,
        now: unix_now(),
    })
    .await
    .is_ok_and(|c| c.is_some())
}

/// The issuer's JWKS without its EC (ES256) key.
fn without_ec_key(jwks: &str) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(jwks).unwrap();
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kty"] != "EC");
    doc.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_jwks_key_stops_being_trusted_after_refresh() {
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let reply: Shared = Arc::new(Mutex::new(Reply::Jwks(tokens.jwks())));
    let (addr, root) = https_issuer(reply.clone()).await;
    let url = format!("https://{addr}/jwks.json");
    let auth = JwtAuthenticator::start(config(JwksSource::Url(url), Some(&root)))
        .await
        .unwrap();
    let es256 = tokens.token("shop", "web");
    let rs256 = tokens.sign_rs256(&tokens.claims("shop", "web", "istio-ca", unix_now(), 3600));
    assert!(accepts(&auth, &es256).await);
    // The issuer drops its EC key; within the refresh interval it is no longer trusted.
    *reply.lock().unwrap() = Reply::Jwks(without_ec_key(&tokens.jwks()));
    let mut refused = false;
    for _ in 0..300 {
        if !accepts(&auth, &es256).await {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "a removed key was still trusted after 30 s");
    assert!(
        accepts(&auth, &rs256).await,
        "the remaining key is still trusted"
    );
}

#[tokio::test]
async fn refuses_plain_http_jwks_uri() {
    let err = JwksSource::parse("http://127.0.0.1:1/jwks.json").unwrap_err();
    assert!(err.contains("must use https"), "{err}");
    // Even built directly, an http URL is never fetched.
    let err = JwtAuthenticator::new(config(
        JwksSource::Url("http://127.0.0.1:1/jwks.json".into()),
        None,
    ))
    .await
    .err()
    .expect("an http JWKS URL must be refused");
    assert!(err.to_string().contains("not an https URL"), "{err}");
}

#[tokio::test]
async fn refuses_redirect_to_http() {
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    // A plain-HTTP server with good keys, counting who comes.
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    let visits = Arc::new(AtomicUsize::new(0));
    let (count, body) = (visits.clone(), tokens.jwks());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = plain.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            if read_head(&mut tcp).await {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        }
    });
    let reply: Shared = Arc::new(Mutex::new(Reply::Redirect(format!(
        "http://{plain_addr}/jwks.json"
    ))));
    let (addr, root) = https_issuer(reply).await;
    let err = JwtAuthenticator::new(config(
        JwksSource::Url(format!("https://{addr}/jwks.json")),
        Some(&root),
    ))
    .await
    .err()
    .expect("a redirect must not be followed");
    assert!(
        err.to_string().contains("redirects are not followed"),
        "{err}"
    );
    assert_eq!(
        visits.load(Ordering::SeqCst),
        0,
        "the plain-HTTP target was fetched"
    );
}

#[tokio::test]
async fn oversized_jwks_is_rejected_while_reading() {
    let reply: Shared = Arc::new(Mutex::new(Reply::Endless));
    let (addr, root) = https_issuer(reply).await;
    // The body never ends: only a reader that counts as it goes can answer before the
    // fetch deadline, and say why.
    let err = JwtAuthenticator::new(config(
        JwksSource::Url(format!("https://{addr}/jwks.json")),
        Some(&root),
    ))
    .await
    .err()
    .expect("an oversized JWKS must be refused");
    assert!(
        err.to_string()
            .contains(&format!("larger than {MAX_JWKS_BYTES} bytes")),
        "{err}"
    );
    // The same limit holds for a file.
    let mut big = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut big, &vec![b' '; MAX_JWKS_BYTES + 1]).unwrap();
    let err = JwtAuthenticator::new(config(JwksSource::File(big.path().to_owned()), None))
        .await
        .err()
        .expect("an oversized JWKS file must be refused");
    assert!(err.to_string().contains("larger than"), "{err}");
}
