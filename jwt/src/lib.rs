//! `citadel-jwt`: verification of JSON Web Tokens against a JWKS, shared by the CA's
//! token authenticator and the proxy's request authentication, so there is one
//! implementation of the checks that matter.
//!
//! Pure: no I/O, no clock. The caller passes `now` (Unix seconds) and the keys.
//!
//! - Signatures: RS256/384/512, PS256/384/512, ES256, ES384, verified with `ring`.
//! - `alg: none` is refused when the token is read (`Jwt header [alg] is not supported`).
//! - HMAC (`HS*`) tokens parse, but no JWKS key can ever verify them: symmetric keys
//!   are never loaded from a JWKS, so a token "signed" with the issuer's public key as an
//!   HMAC secret finds no key (`Jwks doesn't have key to match kid or alg from Jwt`).
//!   ES512 and EdDSA are treated the same way (recognised, never verified).
//! - Checks run in Envoy's `jwt_authn` order (issuer, time, audience, signature), and
//!   every error's text is the string Envoy's JWT library uses, because the proxy
//!   answers with it.
//!
//! ```
//! use citadel_jwt::{Jwks, JwtError, Validation, verify};
//! let jwks = Jwks::parse(r#"{"keys":[]}"#);
//! assert!(jwks.is_err());
//! assert_eq!(
//!     verify("not-a-jwt", &Jwks::default(), &Validation::any_issuer(), 0).unwrap_err(),
//!     JwtError::BadFormat
//! );
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
mod jwks;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
mod token;

pub use error::{JwksError, JwtError};
pub use jwks::{Jwk, Jwks};
pub use token::{Alg, Jwt};

/// Envoy's default clock skew for `exp` and `nbf`, seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 60;

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Required `iss`; `None` accepts any issuer.
    pub issuer: Option<String>,
    /// Accepted audiences (one of `aud` must be among them); empty accepts any.
    pub audiences: Vec<String>,
    /// Tolerated clock skew on `exp` and `nbf`, seconds.
    pub leeway_secs: u64,
    /// Claims that must be present (e.g. `exp`, `sub`).
    pub required: Vec<&'static str>,
}

impl Validation {
    /// Any issuer, any audience, the default leeway, nothing required.
    pub fn any_issuer() -> Self {
        Self {
            issuer: None,
            audiences: Vec::new(),
            leeway_secs: DEFAULT_LEEWAY_SECS,
            required: Vec::new(),
        }
    }

    /// One issuer, the given audiences (empty = any), the default leeway.
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>) -> Self {
        Self {
            issuer: Some(issuer.into()),
            audiences,
            ..Self::any_issuer()
        }
    }
}

/// Parses and verifies `token` in Envoy's order: format, issuer, required claims,
/// time (`nbf`, `exp` with leeway), audience, then the signature with a key of
/// `jwks` chosen by `kid` and `alg`. Returns the verified token.
pub fn verify(token: &str, jwks: &Jwks, v: &Validation, now: i64) -> Result<Jwt, JwtError> {
    let jwt = Jwt::parse(token)?;
    jwt.check_claims(v, now)?;
    jwt.verify_signature(jwks)?;
    Ok(jwt)
}

/// Envoy compares audiences without an `http://`/`https://` scheme and a trailing `/`.
fn normalize_audience(a: &str) -> &str {
    let a = a
        .strip_prefix("https://")
        .or_else(|| a.strip_prefix("http://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

#[cfg(test)]
mod tests;
