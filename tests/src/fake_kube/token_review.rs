//! TokenReview in the fake API server: the test registers which tokens are
//! valid, for which user and audiences; `POST …/tokenreviews` answers as the
//! API server's token authenticator does.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

/// Audiences of the fake API server itself (used when a review names none).
pub const API_AUDIENCES: [&str; 1] = ["https://kubernetes.default.svc.cluster.local"];

/// What the fake knows about one valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// `system:serviceaccount:<ns>:<sa>` for service-account tokens.
    pub username: String,
    /// The service account's UID.
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
    /// `extra` (pod name/uid, node name, credential id).
    pub extra: BTreeMap<String, Vec<String>>,
    /// The token's `aud`.
    pub audiences: Vec<String>,
}

/// Registered tokens and review counters.
#[derive(Debug, Default)]
pub struct TokenReviews {
    tokens: HashMap<String, TokenInfo>,
    /// Reviews answered.
    pub calls: usize,
    /// Mimic an API server that ignores `spec.audiences`: it checks the token against its own
    /// audiences and reports those (test control for the caller's audience check).
    pub ignore_requested_audiences: bool,
}

fn intersect(a: &[String], b: &[String]) -> Vec<String> {
    a.iter().filter(|x| b.contains(x)).cloned().collect()
}

impl TokenReviews {
    /// Registers (or replaces) a valid token.
    pub fn insert(&mut self, token: &str, info: TokenInfo) {
        self.tokens.insert(token.to_owned(), info);
    }

    /// Makes a token invalid (its pod was deleted, it was revoked).
    pub fn revoke(&mut self, token: &str) {
        self.tokens.remove(token);
    }

    /// Answers one TokenReview request body with the full TokenReview object.
    pub fn review(&mut self, body: &Value) -> Value {
        self.calls += 1;
        let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
        let token = spec
            .get("token")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let requested: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let api: Vec<String> = API_AUDIENCES.iter().map(|s| (*s).to_owned()).collect();
        let target = if requested.is_empty() || self.ignore_requested_audiences {
            api
        } else {
            requested
        };
        let status = match self.tokens.get(token) {
            None => {
                json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
            }
            Some(info) => {
                let common = intersect(&info.audiences, &target);
                if common.is_empty() && !self.ignore_requested_audiences {
                    json!({"user": {}, "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                        info.audiences, target)})
                } else {
                    json!({
                        "authenticated": true,
                        "user": {
                            "username": info.username,
                            "uid": info.uid,
                            "groups": info.groups,
                            "extra": info.extra,
                        },
                        "audiences": if self.ignore_requested_audiences { target } else { common },
                    })
                }
            }
        };
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        })
    }
}
