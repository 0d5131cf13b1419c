//! JWT parsing, claim checks and signature verification against a fixed JWKS
//! (an ES256 and an RS256 key), in the order the CA and the proxy run them; and
//! `Jwks::parse` on arbitrary documents, whose keys then verify a valid token.
#![no_main]

use citadel_jwt::{Jwks, Jwt, Validation, verify};
use libfuzzer_sys::fuzz_target;

const JWKS: &str = include_str!("../fixtures/jwks.json");
const VALID_ES256: &str = include_str!("../fixtures/es256.jwt");
const NOW: i64 = 1_800_000_000;

fn validations() -> [Validation; 2] {
    [
        Validation::any_issuer(),
        Validation {
            required: vec!["exp", "sub"],
            ..Validation::new("https://issuer.example", vec!["citadel".into()])
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(fixed) = Jwks::parse(JWKS) else {
        return;
    };
    if mode & 1 == 0 {
        // A token from a peer (bearer metadata, Authorization header).
        for v in validations() {
            if let Ok(jwt) = verify(text, &fixed, &v, NOW) {
                let _ = jwt.principal();
            }
        }
        if let Ok(jwt) = Jwt::parse(text) {
            let _ = jwt.principal();
            let _ = jwt.payload_b64();
            let _ = jwt.check_time(NOW, 60);
            let _ = jwt.audience_allowed(&["citadel".into(), "https://citadel/".into()]);
            let _ = jwt.verify_signature(&fixed);
        }
    } else if let Ok(mut keys) = Jwks::parse(text) {
        // A JWKS document from an issuer's endpoint.
        let _ = keys.has_kid("ec1");
        let _ = verify(VALID_ES256.trim(), &keys, &Validation::any_issuer(), NOW);
        keys.extend(&fixed);
        let _ = keys.skipped();
    }
});
