//! End-user authentication end to end: the real CA fetches a RequestAuthentication's
//! `jwksUri` from an HTTPS issuer served by this test (its own test root), ships the keys
//! with the policy set through the real agent, and api's real `citadel-proxy` verifies
//! each request's JWT on its `http` port. Tokens are made here: valid, expired, wrong
//! issuer, wrong audience, unknown `kid`, `alg: none`, HS256 with the public key as the
//! secret; the answers are Istio's (200, 401 with Envoy's words, 403). Then the issuer
//! rotates its key and the proxy follows without a restart; then the issuer goes away and
//! the last good keys stay. Needs root (the proxies run as other uids).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citadel_e2e::mesh::{TwoProxies, is_root};
use citadel_e2e::process::http_get;
use citadel_jwt::testing::{TestSigner, alg_none, hs256, jwks};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ISS: &str = "https://idp.test";

/// What the test issuer serves: `Some(jwks)`, or `None` to answer 503.
type Served = Arc<Mutex<Option<String>>>;

/// An HTTPS server for `/jwks.json`, with a certificate for 127.0.0.1 from a fresh
/// test root; its address and the root (PEM).
async fn https_issuer(served: Served) -> (SocketAddr, String) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test issuer root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &root_issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, served) = (acceptor.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let doc = served.lock().unwrap().clone();
                let answer = match doc {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                };
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, root.pem())
}

/// An HTTP/1.1 application answering each request with 200 and the request head it got.
async fn echo_head_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        buf.drain(..end + 4);
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
                            head.len()
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

/// One request on a new connection to web's outbound; status, `www-authenticate`, body.
async fn request(port: u16, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: api.shop\r\n{auth}x-user: forged\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let www = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("www-authenticate")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, www, body.to_owned())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn claims(sub: &str) -> Value {
    let now = unix_now();
    json!({"iss": ISS, "sub": sub, "aud": ["shop-api"], "iat": now, "exp": now + 600, "groups": ["staff"]})
}

fn policies(jwks_uri: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api-jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: {ISS}
    audiences: [shop-api]
    jwksUri: {jwks_uri}
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-users, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules:
  - from: [{{source: {{requestPrincipals: [\"{ISS}/alice\", \"{ISS}/carol\"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-deny-interns, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules:
  - when: [{{key: \"request.auth.claims[groups]\", values: [interns]}}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_requests_through_citadel_proxy_get_istios_answers_and_follow_key_rotation() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "running proxies as other uids needs root"
        );
        eprintln!("skipped: running proxies as other uids needs root");
        return;
    }
    let rsa = TestSigner::rsa("key-1");
    let served: Served = Arc::new(Mutex::new(Some(jwks(&[&rsa]))));
    let (issuer, root_pem) = https_issuer(served.clone()).await;
    let roots = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(roots.path(), root_pem).unwrap();
    let roots_arg = roots.path().display().to_string();
    let jwks_uri = format!("https://{issuer}/jwks.json");
    let app = echo_head_app().await;
    let mesh = TwoProxies::start(
        "jwt.yaml",
        &policies(&jwks_uri),
        &[
            "--jwks-extra-roots",
            &roots_arg,
            "--jwks-refresh-interval",
            "1s",
            "--jwks-retry-interval",
            "1s",
        ],
        &format!("{app}:http"),
    )
    .await;
    let out = mesh.web_out;
    let logs = || mesh.logs();

    // Valid: reaches the app, principal allowed; the token is stripped and x-user is the
    // claim, not what the client sent.
    let alice = rsa.sign("RS256", &claims("alice"));
    let (status, _, body) = request(out, "/orders", Some(&alice)).await;
    assert_eq!(status, 200, "{body}\n{}", logs());
    assert!(body.contains("x-user: alice"), "{body}");
    assert!(!body.contains("forged"), "{body}");
    assert!(!body.contains("authorization:"), "token forwarded: {body}");
    // PS256 from the same key works too.
    let (status, _, _) = request(out, "/", Some(&rsa.sign("PS256", &claims("carol")))).await;
    assert_eq!(status, 200, "{}", logs());

    // Valid but not an allowed principal, or no token at all: authorization says 403.
    let bob = rsa.sign("RS256", &claims("bob"));
    assert_eq!(
        request(out, "/", Some(&bob)).await,
        (403, String::new(), "RBAC: access denied".into())
    );
    assert_eq!(request(out, "/", None).await.0, 403);
    let mut intern = claims("alice");
    intern["groups"] = json!(["staff", "interns"]);
    assert_eq!(
        request(out, "/", Some(&rsa.sign("RS256", &intern))).await.0,
        403
    );

    // Invalid tokens: 401 with Envoy's words (403 for the audience), before authorization.
    let realm = "Bearer realm=\"http://api.shop/\", error=\"invalid_token\"";
    let mut expired = claims("alice");
    expired["exp"] = json!(unix_now() - 3600);
    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = json!("https://evil.test");
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = json!("bank-api");
    let stranger = TestSigner::rsa("key-unknown");
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            rsa.sign("RS256", &expired),
            401,
            "Jwt is expired",
        ),
        (
            "wrong issuer",
            rsa.sign("RS256", &wrong_iss),
            401,
            "Jwt issuer is not configured",
        ),
        (
            "wrong audience",
            rsa.sign("RS256", &wrong_aud),
            403,
            "Audiences in Jwt are not allowed",
        ),
        (
            "unknown kid",
            stranger.sign("RS256", &claims("alice")),
            401,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "alg none",
            alg_none(&claims("alice")),
            401,
            "Jwt header [alg] is not supported",
        ),
        (
            "HS256 with the public key as secret",
            hs256(&rsa.public_key_bytes(), "key-1", &claims("alice")),
            401,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
    ];
    for (what, token, want_status, want_body) in &cases {
        let (status, www, body) = request(out, "/", Some(token)).await;
        assert_eq!(
            (status, body.as_str()),
            (*want_status, *want_body),
            "{what}\n{}",
            logs()
        );
        if *want_status == 401 {
            assert_eq!(www, realm, "{what}");
        }
    }
    let api_log = mesh.api.log_text();
    assert!(
        api_log.contains("request refused by request authentication")
            && api_log.contains("Jwt is expired"),
        "{api_log}"
    );
    assert!(!api_log.contains(&alice), "a token was logged");

    // Rotation at the issuer: key-2 replaces key-1; the CA picks it up on its schedule
    // and the proxy follows, without a restart.
    let rotated = TestSigner::es256("key-2");
    *served.lock().unwrap() = Some(jwks(&[&rotated]));
    let new_token = rotated.sign("ES256", &claims("alice"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = request(out, "/", Some(&new_token)).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated key not picked up within 30 s: {status} {body}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        request(out, "/", Some(&alice)).await.2,
        "Jwks doesn't have key to match kid or alg from Jwt",
        "the retired key still verifies"
    );

    // The issuer goes away: the last good keys stay, the CA reports it.
    *served.lock().unwrap() = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = http_get(mesh.ca.http_addr, "/metrics").await.unwrap();
        if metrics.contains("citadel_policy_jwks_stale 1") {
            assert!(
                metrics.contains("citadel_policy_jwks_fetch_errors_total"),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no stale JWKS reported:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        request(out, "/", Some(&new_token)).await.0,
        200,
        "{}",
        logs()
    );
}
