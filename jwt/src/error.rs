//! Why a token or a key set is refused. The texts are those of Envoy's JWT library
//! (`source/common/jwt/status.cc`), because the proxy sends them as its 401 body.

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// `nbf` is in the future (beyond the leeway).
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// `exp` is in the past (beyond the leeway).
    #[error("Jwt is expired")]
    Expired,
    /// Not three dot-separated parts.
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    /// The header is not base64url.
    #[error("Jwt header is an invalid Base64url encoded")]
    HeaderBadBase64,
    /// The header is not a JSON object.
    #[error("Jwt header is an invalid JSON")]
    HeaderBadJson,
    /// `alg` is missing or not a string.
    #[error("Jwt header [alg] field is required and must be a string")]
    HeaderBadAlg,
    /// `alg` names no known algorithm (`none` included).
    #[error("Jwt header [alg] is not supported")]
    HeaderNotImplementedAlg,
    /// `kid` is not a string.
    #[error("Jwt header [kid] field is not a string")]
    HeaderBadKid,
    /// The payload is not base64url.
    #[error("Jwt payload is an invalid Base64url encoded")]
    PayloadBadBase64,
    /// The payload is not a JSON object.
    #[error("Jwt payload is an invalid JSON")]
    PayloadBadJson,
    /// `iss` is not a string.
    #[error("Jwt payload [iss] field is not a string")]
    IssNotString,
    /// `sub` is not a string.
    #[error("Jwt payload [sub] field is not a string")]
    SubNotString,
    /// `iat`, `nbf` or `exp` is not a number.
    #[error("Jwt payload [{0}] field is not an integer")]
    TimeNotInteger(&'static str),
    /// `iat`, `nbf` or `exp` is negative, fractional or too large.
    #[error("Jwt payload [{0}] field is not a positive 64 bit integer")]
    TimeOutOfRange(&'static str),
    /// `aud` is neither a string nor a list of strings.
    #[error("Jwt payload [aud] field is not a string or string list")]
    AudNotString,
    /// The signature is not base64url.
    #[error("Jwt signature is an invalid Base64url encoded")]
    SignatureBadBase64,
    /// The token's issuer is not the one configured.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    /// None of the token's audiences is accepted.
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    /// A key matched by `kid`/`alg`, but the signature does not verify.
    #[error("Jwt verification fails")]
    VerificationFail,
    /// No key of the set has the token's `kid` and suits its `alg`.
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    KidAlgMismatch,
    /// A claim the caller requires is absent (Citadel's own check, not Envoy's).
    #[error("Jwt payload [{0}] field is missing")]
    MissingClaim(&'static str),
}

/// Why a JWKS document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not JSON.
    #[error("Jwks is an invalid JSON")]
    BadJson,
    /// No `keys`.
    #[error("Jwks does not have [keys] field")]
    NoKeys,
    /// `keys` is not a list.
    #[error("[keys] in Jwks is not an array")]
    BadKeys,
    /// No key Citadel can use (RSA, or EC on P-256/P-384).
    #[error("Jwks doesn't have any valid public key")]
    NoValidKeys,
}
