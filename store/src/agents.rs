//! The records node agents leave in the store: join tokens, joined nodes and trust-bundle
//! acknowledgements.

use std::fmt;

/// A one-time join token as stored: its SHA-256, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// SHA-256 of the token text (stored as lowercase hex).
    pub token_sha256: [u8; 32],
    /// The node the token admits.
    pub node_name: String,
    /// SPIFFE IDs the node's agent may request on behalf of its workloads.
    pub allowed_ids: Vec<String>,
    /// When the token was created, unix seconds.
    pub created_at: i64,
    /// The token is refused from this instant on, unix seconds.
    pub expires_at: i64,
    /// When the token was consumed, unix seconds; `None` while unused.
    pub used_at: Option<i64>,
}

impl JoinTokenRecord {
    /// Why this token cannot be used at `now`, or `None` when it can (pure). A used token is
    /// reported as used even when it has expired since.
    pub fn refusal_at(&self, now: i64) -> Option<JoinTokenRefusal> {
        if self.used_at.is_some() {
            Some(JoinTokenRefusal::AlreadyUsed)
        } else if self.expires_at <= now {
            Some(JoinTokenRefusal::Expired)
        } else {
            None
        }
    }
}

/// Why a join token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinTokenRefusal {
    /// No token with that hash was ever created.
    Unknown,
    /// The token was consumed before.
    AlreadyUsed,
    /// The token's lifetime is over.
    Expired,
}

impl fmt::Display for JoinTokenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JoinTokenRefusal::Unknown => "join token is unknown",
            JoinTokenRefusal::AlreadyUsed => "join token has already been used",
            JoinTokenRefusal::Expired => "join token has expired",
        })
    }
}

/// An agent's latest trust-bundle acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleAck {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// The highest bundle sequence it has acknowledged applying.
    pub sequence: u64,
    /// When it last acknowledged anything, unix seconds.
    pub acked_at: i64,
}

/// An agent's latest policy-set acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyAck {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// The version of the policy set it last acknowledged applying.
    pub version: String,
    /// When it acknowledged it, unix seconds.
    pub acked_at: i64,
}

/// Longest policy version accepted (a SHA-256 in hex is 64 characters).
pub const MAX_POLICY_VERSION_LEN: usize = 128;

/// Checks a policy version before it is stored: non-empty, at most
/// [`MAX_POLICY_VERSION_LEN`] characters, ASCII letters, digits, `-`, `_`, `.` or `:` (pure).
pub fn check_policy_version(version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err("policy version is empty".into());
    }
    if version.len() > MAX_POLICY_VERSION_LEN {
        return Err(format!(
            "policy version is longer than {MAX_POLICY_VERSION_LEN} characters"
        ));
    }
    if !version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err("policy version has characters other than letters, digits, - _ . :".into());
    }
    Ok(())
}

/// Encodes a list of SPIFFE IDs for a text column (a JSON array of strings).
pub(crate) fn encode_ids(ids: &[String]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_string())
}

/// Decodes [`encode_ids`] output; anything else is corrupt data.
pub(crate) fn decode_ids(text: &str, column: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(text).map_err(|_| format!("{column} is not a JSON array of strings"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_at: i64, used_at: Option<i64>) -> JoinTokenRecord {
        JoinTokenRecord {
            token_sha256: [7; 32],
            node_name: "node-a".into(),
            allowed_ids: vec![],
            created_at: 0,
            expires_at,
            used_at,
        }
    }

    #[test]
    fn token_is_usable_until_it_expires_or_is_used() {
        assert_eq!(token(100, None).refusal_at(99), None);
        assert_eq!(
            token(100, None).refusal_at(100),
            Some(JoinTokenRefusal::Expired)
        );
        assert_eq!(
            token(100, Some(50)).refusal_at(60),
            Some(JoinTokenRefusal::AlreadyUsed)
        );
        assert_eq!(
            token(100, Some(50)).refusal_at(200),
            Some(JoinTokenRefusal::AlreadyUsed)
        );
    }

    #[test]
    fn id_lists_round_trip_through_their_column_encoding() {
        let ids = vec![
            "spiffe://td/ns/a/sa/b".to_string(),
            "spiffe://td/x,\"y\"".to_string(),
        ];
        assert_eq!(decode_ids(&encode_ids(&ids), "c"), Ok(ids));
        assert_eq!(decode_ids(&encode_ids(&[]), "c"), Ok(vec![]));
        assert!(decode_ids("a,b", "c").is_err());
    }
}
