//! Reading a compact JWS (`header.payload.signature`) and the checks on it.

use base64::Engine;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

use crate::error::JwtError;
use crate::jwks::{Jwks, PublicKey};
use crate::{Validation, normalize_audience};

/// base64url, padded or not (JWTs use no padding; some producers add it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub(crate) fn b64_decode(s: &str) -> Option<Vec<u8>> {
    B64.decode(s).ok()
}

/// A JWS algorithm name that Envoy accepts in a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    /// Recognised, never verified (no P-521 keys are loaded).
    ES512,
    /// Recognised, never verified (HMAC keys are never loaded).
    HS256,
    /// Recognised, never verified.
    HS384,
    /// Recognised, never verified.
    HS512,
    /// Recognised, never verified (Ed25519 keys are not loaded).
    EdDSA,
}

impl Alg {
    /// The algorithm of a header `alg` value; `None` for `none` and anything unknown.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            "ES512" => Self::ES512,
            "HS256" => Self::HS256,
            "HS384" => Self::HS384,
            "HS512" => Self::HS512,
            "EdDSA" => Self::EdDSA,
            _ => return None,
        })
    }
}

/// A parsed (not yet verified) token.
#[derive(Debug, Clone, PartialEq)]
pub struct Jwt {
    /// Header `alg`.
    pub alg: Alg,
    /// Header `kid`.
    pub kid: Option<String>,
    /// `iss`.
    pub iss: Option<String>,
    /// `sub`.
    pub sub: Option<String>,
    /// `aud`, a single string read as a one-element list.
    pub aud: Vec<String>,
    /// `exp`, Unix seconds.
    pub exp: Option<u64>,
    /// `nbf`, Unix seconds.
    pub nbf: Option<u64>,
    /// Every claim of the payload.
    pub claims: Map<String, Value>,
    signing_input_len: usize,
    header_len: usize,
    raw: String,
    signature: Vec<u8>,
}

fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or(JwtError::TimeOutOfRange(name)),
        Some(_) => Err(JwtError::TimeNotInteger(name)),
    }
}

impl Jwt {
    /// Reads a compact token without verifying anything but its shape.
    pub fn parse(token: &str) -> Result<Self, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::BadFormat);
        };
        let header = b64_decode(h).ok_or(JwtError::HeaderBadBase64)?;
        let header: Map<String, Value> =
            serde_json::from_slice(&header).map_err(|_| JwtError::HeaderBadJson)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(JwtError::HeaderBadAlg)?;
        let alg = Alg::parse(alg).ok_or(JwtError::HeaderNotImplementedAlg)?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(JwtError::HeaderBadKid),
        };
        let payload = b64_decode(p).ok_or(JwtError::PayloadBadBase64)?;
        let claims: Map<String, Value> =
            serde_json::from_slice(&payload).map_err(|_| JwtError::PayloadBadJson)?;
        let string = |name: &str, err: JwtError| match claims.get(name) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(err),
        };
        let iss = string("iss", JwtError::IssNotString)?;
        let sub = string("sub", JwtError::SubNotString)?;
        time_claim(&claims, "iat")?;
        let nbf = time_claim(&claims, "nbf")?;
        let exp = time_claim(&claims, "exp")?;
        let aud = match claims.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|a| a.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(JwtError::AudNotString)?,
            Some(_) => return Err(JwtError::AudNotString),
        };
        let signature = b64_decode(s).ok_or(JwtError::SignatureBadBase64)?;
        Ok(Self {
            alg,
            kid,
            iss,
            sub,
            aud,
            exp,
            nbf,
            claims,
            signing_input_len: h.len() + 1 + p.len(),
            header_len: h.len(),
            raw: token.to_owned(),
            signature,
        })
    }

    /// The payload as it appears in the token (base64url): what Envoy forwards in
    /// `forward_payload_header`.
    pub fn payload_b64(&self) -> &str {
        self.raw
            .get(self.header_len + 1..self.signing_input_len)
            .unwrap_or_default()
    }

    /// `<iss>/<sub>`, Istio's request principal (empty parts when absent).
    pub fn principal(&self) -> String {
        format!(
            "{}/{}",
            self.iss.as_deref().unwrap_or_default(),
            self.sub.as_deref().unwrap_or_default()
        )
    }

    /// `nbf` and `exp` against `now` with `leeway` seconds of skew either way.
    pub fn check_time(&self, now: i64, leeway: u64) -> Result<(), JwtError> {
        let now = i128::from(now);
        let leeway = i128::from(leeway);
        if let Some(nbf) = self.nbf
            && now + leeway < i128::from(nbf)
        {
            return Err(JwtError::NotYetValid);
        }
        if let Some(exp) = self.exp
            && now > i128::from(exp) + leeway
        {
            return Err(JwtError::Expired);
        }
        Ok(())
    }

    /// True when `allowed` is empty or names one of the token's audiences (compared
    /// without scheme and trailing slash, as Envoy does).
    pub fn audience_allowed(&self, allowed: &[String]) -> bool {
        allowed.is_empty()
            || self.aud.iter().any(|a| {
                allowed
                    .iter()
                    .any(|b| normalize_audience(a) == normalize_audience(b))
            })
    }

    /// Everything but the signature, in Envoy's order: issuer, (required claims),
    /// time, audience.
    pub fn check_claims(&self, v: &Validation, now: i64) -> Result<(), JwtError> {
        if let Some(issuer) = &v.issuer
            && self.iss.as_deref() != Some(issuer.as_str())
        {
            return Err(JwtError::UnknownIssuer);
        }
        for &name in &v.required {
            if !self.claims.contains_key(name) {
                return Err(JwtError::MissingClaim(name));
            }
        }
        self.check_time(now, v.leeway_secs)?;
        if !self.audience_allowed(&v.audiences) {
            return Err(JwtError::AudienceNotAllowed);
        }
        Ok(())
    }

    /// Verifies the signature with the keys of `jwks` that match the token's `kid`
    /// (when both name one) and suit its `alg`.
    pub fn verify_signature(&self, jwks: &Jwks) -> Result<(), JwtError> {
        let message = self
            .raw
            .as_bytes()
            .get(..self.signing_input_len)
            .ok_or(JwtError::BadFormat)?;
        let mut matched = false;
        for key in jwks.keys() {
            if let (Some(want), Some(have)) = (&self.kid, &key.kid)
                && want != have
            {
                continue;
            }
            if !key.suits(self.alg) {
                continue;
            }
            matched = true;
            if verify_with(&key.key, self.alg, message, &self.signature) {
                return Ok(());
            }
        }
        Err(if matched {
            JwtError::VerificationFail
        } else {
            JwtError::KidAlgMismatch
        })
    }
}

fn verify_with(key: &PublicKey, alg: Alg, message: &[u8], sig: &[u8]) -> bool {
    match key {
        PublicKey::Rsa { n, e } => {
            let params: &signature::RsaParameters = match alg {
                Alg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                Alg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                Alg::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                Alg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                Alg::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                Alg::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
                _ => return false,
            };
            RsaPublicKeyComponents { n, e }
                .verify(params, message, sig)
                .is_ok()
        }
        PublicKey::P256(point) => {
            alg == Alg::ES256
                && UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
        }
        PublicKey::P384(point) => {
            alg == Alg::ES384
                && UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
        }
    }
}
