use serde_json::json;

use super::*;
use crate::testing::{TestSigner, alg_none, hs256, jwks};

const NOW: i64 = 1_800_000_000;
const ISS: &str = "https://issuer.example";

fn claims() -> serde_json::Value {
    json!({"iss": ISS, "sub": "alice", "aud": ["shop"], "iat": NOW, "exp": NOW + 600, "groups": ["dev"]})
}

fn v() -> Validation {
    Validation::new(ISS, vec!["shop".into()])
}

#[test]
fn accepts_every_supported_algorithm() {
    let rsa = TestSigner::rsa("r");
    let p256 = TestSigner::es256("e256");
    let p384 = TestSigner::es384("e384");
    let set = Jwks::parse(&jwks(&[&rsa, &p256, &p384])).unwrap();
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        let t = rsa.sign(alg, &claims());
        let jwt = verify(&t, &set, &v(), NOW).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(jwt.principal(), "https://issuer.example/alice");
    }
    verify(&p256.sign("ES256", &claims()), &set, &v(), NOW).unwrap();
    verify(&p384.sign("ES384", &claims()), &set, &v(), NOW).unwrap();
}

#[test]
fn rejects_alg_none() {
    let rsa = TestSigner::rsa("r");
    let set = Jwks::parse(&jwks(&[&rsa])).unwrap();
    let err = verify(&alg_none(&claims()), &set, &v(), NOW).unwrap_err();
    assert_eq!(err, JwtError::HeaderNotImplementedAlg);
    assert_eq!(err.to_string(), "Jwt header [alg] is not supported");
}

#[test]
fn rejects_hs256_signed_with_the_public_key_as_secret() {
    let rsa = TestSigner::rsa("r");
    let doc = jwks(&[&rsa]);
    let set = Jwks::parse(&doc).unwrap();
    for secret in [rsa.public_key_bytes(), doc.clone().into_bytes()] {
        let t = hs256(&secret, "r", &claims());
        let err = verify(&t, &set, &v(), NOW).unwrap_err();
        assert_eq!(err, JwtError::KidAlgMismatch, "{err}");
    }
    // Even a JWKS that offers an `oct` key never yields a usable HMAC key.
    let with_oct = json!({"keys": [rsa.jwk(), {"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]});
    let set = Jwks::parse(&with_oct.to_string()).unwrap();
    assert_eq!(set.keys().len(), 1);
    assert_eq!(set.skipped(), 1);
    let t = hs256(b"secret", "h", &claims());
    assert_eq!(
        verify(&t, &set, &v(), NOW).unwrap_err(),
        JwtError::KidAlgMismatch
    );
}

#[test]
fn rejects_a_tampered_payload() {
    let p = TestSigner::es256("k");
    let set = Jwks::parse(&jwks(&[&p])).unwrap();
    let t = p.sign("ES256", &claims());
    let mut parts: Vec<&str> = t.split('.').collect();
    let forged = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({"iss": ISS, "sub": "root", "aud": "shop"}).to_string(),
    );
    parts[1] = &forged;
    let err = verify(&parts.join("."), &set, &v(), NOW).unwrap_err();
    assert_eq!(err.to_string(), "Jwt verification fails");
}

#[test]
fn rejects_expired_and_not_yet_valid_tokens_beyond_the_leeway() {
    let p = TestSigner::es256("k");
    let set = Jwks::parse(&jwks(&[&p])).unwrap();
    let mut c = claims();
    c["exp"] = json!(NOW - 61);
    let err = verify(&p.sign("ES256", &c), &set, &v(), NOW).unwrap_err();
    assert_eq!(err.to_string(), "Jwt is expired");
    c["exp"] = json!(NOW - 59);
    verify(&p.sign("ES256", &c), &set, &v(), NOW).unwrap();
    let mut c = claims();
    c["nbf"] = json!(NOW + 61);
    let err = verify(&p.sign("ES256", &c), &set, &v(), NOW).unwrap_err();
    assert_eq!(err.to_string(), "Jwt not yet valid");
    c["nbf"] = json!(NOW + 30);
    verify(&p.sign("ES256", &c), &set, &v(), NOW).unwrap();
}

#[test]
fn rejects_wrong_issuer_and_audience_with_envoys_words() {
    let p = TestSigner::es256("k");
    let set = Jwks::parse(&jwks(&[&p])).unwrap();
    let mut c = claims();
    c["iss"] = json!("https://evil.example");
    let err = verify(&p.sign("ES256", &c), &set, &v(), NOW).unwrap_err();
    assert_eq!(err.to_string(), "Jwt issuer is not configured");
    let mut c = claims();
    c["aud"] = json!("bank");
    let err = verify(&p.sign("ES256", &c), &set, &v(), NOW).unwrap_err();
    assert_eq!(err.to_string(), "Audiences in Jwt are not allowed");
    // No configured audience accepts any; scheme and trailing slash are ignored.
    let any = Validation::new(ISS, vec![]);
    verify(&p.sign("ES256", &c), &set, &any, NOW).unwrap();
    let slash = Validation::new(ISS, vec!["https://bank/".into()]);
    verify(&p.sign("ES256", &c), &set, &slash, NOW).unwrap();
}

#[test]
fn rejects_unknown_kid() {
    let p = TestSigner::es256("k1");
    let other = TestSigner::es256("k2");
    let set = Jwks::parse(&jwks(&[&p])).unwrap();
    let t = other.sign("ES256", &claims());
    let err = verify(&t, &set, &v(), NOW).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Jwks doesn't have key to match kid or alg from Jwt"
    );
    // Without a kid, every key of a suitable type is tried.
    let t = p.sign_with_header(&json!({"alg": "ES256"}), &claims());
    verify(&t, &set, &v(), NOW).unwrap();
}

#[test]
fn key_selection_follows_kid_then_alg() {
    let a = TestSigner::es256("a");
    let b = TestSigner::es256("b");
    let set = Jwks::parse(&jwks(&[&a, &b])).unwrap();
    verify(&b.sign("ES256", &claims()), &set, &v(), NOW).unwrap();
    // b's signature under a's kid: the kid picks a, which does not verify.
    let t = b.sign_with_header(&json!({"alg": "ES256", "kid": "a"}), &claims());
    assert_eq!(
        verify(&t, &set, &v(), NOW).unwrap_err(),
        JwtError::VerificationFail
    );
    // An EC key never serves an RSA algorithm.
    let rsa = TestSigner::rsa("a");
    let t = rsa.sign("RS256", &claims());
    assert_eq!(
        verify(&t, &set, &v(), NOW).unwrap_err(),
        JwtError::KidAlgMismatch
    );
}

#[test]
fn rejects_malformed_tokens_with_envoys_words() {
    let set = Jwks::default();
    let any = Validation::any_issuer();
    let e = |t: &str| verify(t, &set, &any, NOW).unwrap_err().to_string();
    assert_eq!(
        e("a.b"),
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    );
    assert_eq!(e("a.b.c.d"), e("a.b"));
    assert_eq!(
        e("!!.e30.e30"),
        "Jwt header is an invalid Base64url encoded"
    );
    assert_eq!(
        e("e30.e30.e30"),
        "Jwt header [alg] field is required and must be a string"
    );
    let h = |v: serde_json::Value| {
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            v.to_string(),
        )
    };
    let es = h(json!({"alg": "ES256"}));
    assert_eq!(
        e(&format!("{es}.!!.e30")),
        "Jwt payload is an invalid Base64url encoded"
    );
    assert_eq!(
        e(&format!("{es}.{}.e30", h(json!({"exp": "soon"})))),
        "Jwt payload [exp] field is not an integer"
    );
    assert_eq!(
        e(&format!("{es}.{}.e30", h(json!({"aud": [1]})))),
        "Jwt payload [aud] field is not a string or string list"
    );
    assert_eq!(
        e(&format!("{}.e30.e30", h(json!({"alg": "ES256", "kid": 7})))),
        "Jwt header [kid] field is not a string"
    );
}

#[test]
fn rejects_missing_required_claims() {
    let p = TestSigner::es256("k");
    let set = Jwks::parse(&jwks(&[&p])).unwrap();
    let mut v = v();
    v.required = vec!["exp", "sub"];
    let t = p.sign("ES256", &json!({"iss": ISS, "aud": "shop", "exp": NOW + 5}));
    assert_eq!(
        verify(&t, &set, &v, NOW).unwrap_err(),
        JwtError::MissingClaim("sub")
    );
}

#[test]
fn rejects_jwks_without_usable_keys() {
    assert_eq!(Jwks::parse("nope"), Err(JwksError::BadJson));
    assert_eq!(Jwks::parse("{}"), Err(JwksError::NoKeys));
    assert_eq!(Jwks::parse(r#"{"keys":{}}"#), Err(JwksError::BadKeys));
    assert_eq!(
        Jwks::parse(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#),
        Err(JwksError::NoValidKeys)
    );
    assert_eq!(
        Jwks::parse(r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#),
        Err(JwksError::NoValidKeys)
    );
}

#[test]
fn rejects_jwk_with_use_enc() {
    let sig = TestSigner::es256("sig");
    let enc = TestSigner::es256("enc");
    let mut enc_jwk = enc.jwk();
    enc_jwk["use"] = json!("enc");
    let doc = json!({"keys": [sig.jwk(), enc_jwk]}).to_string();
    let set = Jwks::parse(&doc).unwrap();
    assert_eq!(set.keys().len(), 1, "the encryption key is not loaded");
    assert_eq!(set.skipped(), 1);
    assert_eq!(
        verify(&enc.sign("ES256", &claims()), &set, &v(), NOW).unwrap_err(),
        JwtError::KidAlgMismatch
    );
    // Nor is a key whose `use` is not a string; a key without `use` is a signing key.
    let mut odd = enc.jwk();
    odd["use"] = json!(["sig"]);
    let doc = json!({"keys": [sig.jwk(), odd]}).to_string();
    assert_eq!(Jwks::parse(&doc).unwrap().keys().len(), 1);
    let mut bare = enc.jwk();
    bare.as_object_mut().unwrap().remove("use");
    let set = Jwks::parse(&json!({"keys": [bare]}).to_string()).unwrap();
    verify(&enc.sign("ES256", &claims()), &set, &v(), NOW).unwrap();
}

#[test]
fn rejects_token_whose_alg_differs_from_jwk_alg() {
    // The RSA key is pinned to PS256: an RS256 signature by the very same key is refused.
    let rsa = TestSigner::rsa("r");
    let mut pinned = rsa.jwk();
    pinned["alg"] = json!("PS256");
    let set = Jwks::parse(&json!({"keys": [pinned]}).to_string()).unwrap();
    verify(&rsa.sign("PS256", &claims()), &set, &v(), NOW).unwrap();
    assert_eq!(
        verify(&rsa.sign("RS256", &claims()), &set, &v(), NOW).unwrap_err(),
        JwtError::KidAlgMismatch
    );
}
