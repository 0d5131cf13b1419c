//! Public keys from a JWKS document (RFC 7517): RSA keys, and EC keys on P-256 and
//! P-384. Symmetric (`oct`) keys are never loaded, whatever the document says: a
//! verifier that held one would accept any token made with the secret, and an
//! issuer's *public* JWKS has no business carrying one. Nor are keys whose `use` is
//! anything but `sig` (an encryption key is not a signing key, RFC 7517 §4.2), and a key
//! that pins an `alg` verifies only tokens whose header names that `alg`.

use serde_json::Value;

use crate::error::JwksError;
use crate::token::{Alg, b64_decode};

/// One usable public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// `kid`, when the key has one.
    pub kid: Option<String>,
    /// `alg`, when the key pins one.
    pub alg: Option<Alg>,
    pub(crate) key: PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublicKey {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed point `04 || x || y` on P-256.
    P256(Vec<u8>),
    /// Uncompressed point `04 || x || y` on P-384.
    P384(Vec<u8>),
}

impl Jwk {
    /// Whether this key can verify a token signed with `alg`.
    pub(crate) fn suits(&self, alg: Alg) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        matches!(
            (&self.key, alg),
            (
                PublicKey::Rsa { .. },
                Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512
            ) | (PublicKey::P256(_), Alg::ES256)
                | (PublicKey::P384(_), Alg::ES384)
        )
    }
}

/// A set of public keys. `Default` is the empty set, which verifies nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
    skipped: usize,
}

impl Jwks {
    /// Reads a JWKS document. Keys Citadel cannot use (`oct`, `OKP`, P-521, malformed)
    /// are skipped; a document with no usable key at all is an error.
    pub fn parse(json: &str) -> Result<Self, JwksError> {
        let doc: Value = serde_json::from_str(json).map_err(|_| JwksError::BadJson)?;
        let keys = doc
            .as_object()
            .ok_or(JwksError::BadJson)?
            .get("keys")
            .ok_or(JwksError::NoKeys)?
            .as_array()
            .ok_or(JwksError::BadKeys)?;
        let mut out = Self::default();
        for k in keys {
            match parse_key(k) {
                Some(jwk) => out.keys.push(jwk),
                None => out.skipped += 1,
            }
        }
        if out.keys.is_empty() {
            return Err(JwksError::NoValidKeys);
        }
        Ok(out)
    }

    /// The usable keys.
    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }

    /// How many keys of the document were skipped as unusable.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// True when the set has a key with this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Adds the keys of `other` (the union of two rules' key sets).
    pub fn extend(&mut self, other: &Jwks) {
        self.keys.extend(other.keys.iter().cloned());
        self.skipped += other.skipped;
    }
}

fn field(k: &serde_json::Map<String, Value>, name: &str) -> Option<Vec<u8>> {
    b64_decode(k.get(name)?.as_str()?)
}

fn parse_key(v: &Value) -> Option<Jwk> {
    let k = v.as_object()?;
    let kid = match k.get("kid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return None,
    };
    // Only signature keys verify signatures; a key marked for encryption is skipped.
    match k.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(_) => return None,
    }
    let alg = match k.get("alg") {
        None => None,
        Some(Value::String(s)) => Some(Alg::parse(s)?),
        Some(_) => return None,
    };
    let key = match k.get("kty")?.as_str()? {
        "RSA" => {
            let strip = |b: Vec<u8>| -> Vec<u8> { b.into_iter().skip_while(|x| *x == 0).collect() };
            let n = strip(field(k, "n")?);
            let e = strip(field(k, "e")?);
            if n.is_empty() || e.is_empty() {
                return None;
            }
            PublicKey::Rsa { n, e }
        }
        "EC" => {
            let (x, y) = (field(k, "x")?, field(k, "y")?);
            let len = match k.get("crv")?.as_str()? {
                "P-256" => 32,
                "P-384" => 48,
                _ => return None,
            };
            if x.len() != len || y.len() != len {
                return None;
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if len == 32 {
                PublicKey::P256(point)
            } else {
                PublicKey::P384(point)
            }
        }
        _ => return None,
    };
    let jwk = Jwk { kid, alg, key };
    // A key pinned to an algorithm of another family (an RSA key with `alg: HS256`)
    // could never verify anything: skip it like Envoy refuses it.
    if let Some(a) = jwk.alg
        && !jwk.suits(a)
    {
        return None;
    }
    Some(jwk)
}
