//! The records the store keeps: authorities and ledger rows.

use std::fmt;
use std::str::FromStr;

/// Lifecycle state of a signing authority (design §4, "Authorities and root rotation").
///
/// `prepared` (in the trust bundle, not signing) → `active` (signing; at most one) →
/// `retired` (in the bundle until everything it signed has expired) → `removed`.
/// The store enforces "at most one active"; the order of transitions is the CA's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthorityState {
    /// Published in the trust bundle, not yet signing.
    Prepared,
    /// The one authority that signs new certificates.
    Active,
    /// No longer signing; stays in the bundle while certificates it signed are live.
    Retired,
    /// Out of the bundle for good.
    Removed,
}

impl AuthorityState {
    /// Every state, in lifecycle order.
    pub const ALL: [AuthorityState; 4] = [
        AuthorityState::Prepared,
        AuthorityState::Active,
        AuthorityState::Retired,
        AuthorityState::Removed,
    ];

    /// The stored (and CLI) spelling: `prepared`, `active`, `retired` or `removed`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthorityState::Prepared => "prepared",
            AuthorityState::Active => "active",
            AuthorityState::Retired => "retired",
            AuthorityState::Removed => "removed",
        }
    }
}

impl fmt::Display for AuthorityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`AuthorityState`].
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("unknown authority state {0:?} (expected prepared, active, retired or removed)")]
pub struct ParseAuthorityStateError(pub String);

impl FromStr for AuthorityState {
    type Err = ParseAuthorityStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AuthorityState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseAuthorityStateError(s.to_string()))
    }
}

/// A signing authority as stored: certificates and state, never a private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityRecord {
    /// Stable id chosen by the CA (hex of the subject key identifier).
    pub id: String,
    /// Lifecycle state.
    pub state: AuthorityState,
    /// The signing certificate, PEM.
    pub cert_pem: String,
    /// Intermediates between the signing certificate and the root, PEM; may be empty.
    pub chain_pem: String,
    /// The root certificate, PEM (equal to `cert_pem` for a self-signed root).
    pub root_pem: String,
    /// notBefore of the signing certificate, unix seconds.
    pub not_before: i64,
    /// notAfter of the signing certificate, unix seconds.
    pub not_after: i64,
    /// Opaque reference understood by the key store (e.g. a file name); never key material.
    pub key_ref: String,
    /// When the CA created this record, unix seconds.
    pub created_at: i64,
}

/// One issued certificate, as handed to the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIssuance {
    /// Certificate serial number, lowercase hex.
    pub serial_hex: String,
    /// The SPIFFE ID in the certificate's URI SAN.
    pub spiffe_id: String,
    /// Id of the authority that signed it ([`AuthorityRecord::id`]).
    pub authority_id: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
    /// Who asked: the authenticated caller's identity.
    pub requester: String,
    /// The node the request came through, when known.
    pub node: Option<String>,
    /// SHA-256 of the certificate's DER encoding.
    pub der_sha256: [u8; 32],
    /// When it was issued, unix seconds.
    pub issued_at: i64,
}

/// A committed ledger row: the issuance, its place in the chain and the chain hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Position in the chain, from 1, without gaps.
    pub seq: i64,
    /// What was issued.
    pub issuance: NewIssuance,
    /// `row_hash` of the row before (the [`crate::GENESIS_HASH`] for seq 1).
    pub prev_hash: [u8; 32],
    /// [`crate::row_hash`] of this row.
    pub row_hash: [u8; 32],
}

/// Which ledger rows [`crate::LedgerStore::list_issuances`] returns; every set field must match.
/// The default selects every row. Rows come in `seq` order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerFilter {
    /// Only certificates for this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Only certificates signed by this authority.
    pub authority_id: Option<String>,
    /// Only certificates valid at this instant: `not_before <= t < not_after`.
    pub live_at: Option<i64>,
    /// At most this many rows (the lowest seqs that match).
    pub limit: Option<u32>,
}

/// Outcome of [`crate::LedgerStore::verify_ledger`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerVerification {
    /// Rows examined, including the first bad one if any.
    pub rows_checked: u64,
    /// The first problem found, or `None` when the chain is intact.
    pub first_bad: Option<LedgerFault>,
}

impl LedgerVerification {
    /// True when no fault was found.
    pub fn is_valid(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Where and why the ledger chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerFault {
    /// The seq of the row at fault (for a missing tail: the seq the head records).
    pub seq: i64,
    /// What is wrong, e.g. "row hash does not match its contents".
    pub reason: String,
}

impl fmt::Display for LedgerFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}: {}", self.seq, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_state_round_trips_through_its_spelling() {
        for state in AuthorityState::ALL {
            assert_eq!(state.as_str().parse::<AuthorityState>(), Ok(state));
            assert_eq!(state.to_string(), state.as_str());
        }
    }

    #[test]
    fn authority_state_rejects_other_spellings() {
        for bad in ["Active", "ACTIVE", "", "activ", " active", "deleted"] {
            assert!(bad.parse::<AuthorityState>().is_err(), "{bad:?}");
        }
    }
}
