//! A fake Kubernetes service-account token issuer: it signs JWTs shaped
//! like projected service-account tokens (ES256 or RS256) and publishes its
//! keys as a JWKS, the way a cluster's issuer does.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::PublicKeyData;
use serde_json::{Value, json};

/// Issuer used by default in tests.
pub const TEST_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A 2048-bit RSA key (PKCS#8 PEM) for RS256 tests; test material only.
const RSA_TEST_KEY: &str = include_str!("../fixtures/jwt-rsa-test-key.pem");

/// Signs service-account-shaped JWTs and publishes a JWKS.
pub struct TokenIssuer {
    issuer: String,
    ec_kid: String,
    ec_key: EncodingKey,
    ec_public: Vec<u8>,
    rsa_kid: String,
    rsa_key: EncodingKey,
    rsa_n: Vec<u8>,
    rsa_e: Vec<u8>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl TokenIssuer {
    /// A new issuer with a fresh ES256 key (and the fixed RS256 test key).
    pub fn new(issuer: &str) -> anyhow::Result<Self> {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ec_public = ec.public_key_raw().to_vec();
        let ec_key = EncodingKey::from_ec_der(&ec.serialize_der());
        let ec_kid = b64(&ring::digest::digest(
            &ring::digest::SHA256,
            &ec.subject_public_key_info(),
        )
        .as_ref()[..16]);
        let rsa_key = EncodingKey::from_rsa_pem(RSA_TEST_KEY.as_bytes())?;
        let rsa_pair = rcgen::KeyPair::from_pem(RSA_TEST_KEY)?;
        let (n, e) = rsa_public_numbers(&rsa_pair.subject_public_key_info())?;
        Ok(Self {
            issuer: issuer.to_owned(),
            ec_kid,
            ec_key,
            ec_public,
            rsa_kid: "rsa-test-key".into(),
            rsa_key,
            rsa_n: n,
            rsa_e: e,
        })
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The JWKS document with both keys.
    pub fn jwks(&self) -> String {
        let (x, y) = self.ec_public[1..].split_at(32);
        json!({
            "keys": [
                {"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.ec_kid, "x": b64(x), "y": b64(y)},
                {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.rsa_kid, "n": b64(&self.rsa_n), "e": b64(&self.rsa_e)},
            ]
        })
        .to_string()
    }

    /// Standard claims of a pod-bound service-account token.
    pub fn claims(&self, namespace: &str, sa: &str, audience: &str, now: i64, ttl: i64) -> Value {
        json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{namespace}:{sa}"),
            "aud": [audience],
            "iat": now, "nbf": now, "exp": now + ttl,
            "jti": format!("{namespace}-{sa}-{now}"),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": sa, "uid": "00000000-0000-0000-0000-000000000001"},
                "pod": {"name": format!("{sa}-pod"), "uid": "00000000-0000-0000-0000-000000000002"},
                "node": {"name": "node-1", "uid": "00000000-0000-0000-0000-000000000003"},
            }
        })
    }

    /// Signs `claims` with ES256 under the published kid.
    pub fn sign_es256(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.ec_kid.clone());
        jsonwebtoken::encode(&header, claims, &self.ec_key).unwrap_or_default()
    }

    /// Signs `claims` with RS256 under the published kid.
    pub fn sign_rs256(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.rsa_kid.clone());
        jsonwebtoken::encode(&header, claims, &self.rsa_key).unwrap_or_default()
    }

    /// Signs `claims` with ES256 but names another kid.
    pub fn sign_with_kid(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.ec_key).unwrap_or_default()
    }

    /// A valid token for `namespace/sa` with audience `istio-ca`, valid one hour.
    pub fn token(&self, namespace: &str, sa: &str) -> String {
        self.sign_es256(&self.claims(namespace, sa, "istio-ca", crate::unix_now(), 3600))
    }
}

/// Modulus and exponent of an RSA SubjectPublicKeyInfo.
fn rsa_public_numbers(spki: &[u8]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    use x509_parser::prelude::FromDer;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| anyhow::anyhow!("spki: {e}"))?;
    match info.parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
            let strip = |b: &[u8]| {
                b.iter()
                    .skip_while(|x| **x == 0)
                    .copied()
                    .collect::<Vec<u8>>()
            };
            Ok((strip(rsa.modulus), strip(rsa.exponent)))
        }
        _ => anyhow::bail!("not an RSA key"),
    }
}
