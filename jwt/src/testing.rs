//! Token makers for tests (feature `test-util`): signers whose public keys are
//! published as a JWKS, and the hostile tokens (`alg: none`, HS256 with the public
//! key as the secret) the verifier must refuse. Test material only.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

/// A 2048-bit RSA key (PKCS#8 PEM); test material only.
const RSA_TEST_KEY: &str = include_str!("../testdata/rsa-test-key.pem");

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum Key {
    Ec(EcdsaKeyPair, &'static str, usize),
    Rsa(RsaKeyPair),
}

/// A signing key with a `kid`.
pub struct TestSigner {
    kid: String,
    key: Key,
}

impl TestSigner {
    /// A fresh P-256 key.
    pub fn es256(kid: &str) -> Self {
        Self::ec(
            kid,
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            "P-256",
            32,
        )
    }

    /// A fresh P-384 key.
    pub fn es384(kid: &str) -> Self {
        Self::ec(
            kid,
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            "P-384",
            48,
        )
    }

    fn ec(
        kid: &str,
        alg: &'static signature::EcdsaSigningAlgorithm,
        crv: &'static str,
        len: usize,
    ) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate EC key");
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("load EC key");
        Self {
            kid: kid.to_owned(),
            key: Key::Ec(pair, crv, len),
        }
    }

    /// The fixed 2048-bit RSA test key.
    pub fn rsa(kid: &str) -> Self {
        let body: String = RSA_TEST_KEY
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = STANDARD.decode(body).expect("test key is base64");
        Self {
            kid: kid.to_owned(),
            key: Key::Rsa(RsaKeyPair::from_pkcs8(&der).expect("test key is PKCS#8 RSA")),
        }
    }

    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (no `alg`, so one RSA key serves RS* and PS*).
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Ec(pair, crv, len) => {
                let point = pair.public_key().as_ref();
                let (x, y) = point[1..].split_at(*len);
                json!({"kty": "EC", "crv": crv, "kid": self.kid, "use": "sig", "x": b64(x), "y": b64(y)})
            }
            Key::Rsa(pair) => {
                let c: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "n": b64(&c.n), "e": b64(&c.e)})
            }
        }
    }

    /// The public key bytes (DER `RSAPublicKey`, or the EC point): what an attacker
    /// would use as an HMAC secret.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        match &self.key {
            Key::Ec(pair, ..) => pair.public_key().as_ref().to_vec(),
            Key::Rsa(pair) => pair.public_key().as_ref().to_vec(),
        }
    }

    /// Signs `claims` with `alg` (RS*/PS* for RSA keys, ES256/ES384 for EC keys) under
    /// this key's `kid`.
    pub fn sign(&self, alg: &str, claims: &Value) -> String {
        self.sign_with_header(&json!({"alg": alg, "typ": "JWT", "kid": self.kid}), claims)
    }

    /// Signs with an explicit header (e.g. another `kid`, or none).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let alg = header["alg"].as_str().unwrap_or_default();
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match &self.key {
            Key::Ec(pair, ..) => pair
                .sign(&rng, input.as_bytes())
                .expect("EC sign")
                .as_ref()
                .to_vec(),
            Key::Rsa(pair) => {
                let enc: &'static dyn signature::RsaEncoding = match alg {
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(enc, &rng, input.as_bytes(), &mut sig)
                    .expect("RSA sign");
                sig
            }
        };
        format!("{input}.{}", b64(&sig))
    }
}

/// A JWKS document holding the signers' public keys.
pub fn jwks(signers: &[&TestSigner]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

/// An unsigned token (`alg: none`, empty signature).
pub fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// An HS256 token whose HMAC secret is `secret` (an attacker's guess that the
/// verifier will use the issuer's public key as an HMAC key), with `kid`.
pub fn hs256(secret: &[u8], kid: &str, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(json!({"alg": "HS256", "typ": "JWT", "kid": kid})
            .to_string()
            .as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}
