//! Joined nodes and their credentials: which node certificate is accepted, eviction, and the
//! issuances that change a node's credentials (a join and a renewal).
//!
//! # Two serials per node
//! A node agent renews its own certificate with that certificate. To make a copy of the
//! certificate and key useless once the genuine agent has renewed, the store keeps the
//! serial of the node's latest certificate. Because a renewal's answer can be lost on the
//! way back, it keeps two: `current_serial` (the certificate in use) and `pending_serial`
//! (the newest issued, not used yet). Either is accepted; the first use of the pending one
//! makes it current and from then on the old current one is refused. A join sets current,
//! clears pending and any eviction; eviction refuses every certificate of the node until it
//! joins again.

use std::fmt;

use crate::agents::JoinTokenRefusal;
use crate::model::LedgerEntry;

/// How far behind `last_seen` may fall before a use of a node certificate records it again.
pub const LAST_SEEN_GRANULARITY_SECS: i64 = 60;

/// A joined node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node name (the last segment of its agent's identity `…/citadel/node/<name>`).
    pub name: String,
    /// SPIFFE IDs its agent may request for its workloads (from its latest join token).
    pub allowed_ids: Vec<String>,
    /// When it last joined, unix seconds.
    pub joined_at: i64,
    /// Serial (lowercase hex) of the node certificate in use; `None` before any is known.
    pub current_serial: Option<String>,
    /// notAfter of the certificate with `current_serial`, unix seconds.
    pub current_not_after: Option<i64>,
    /// Serial of the newest node certificate, issued by a renewal and not used yet.
    pub pending_serial: Option<String>,
    /// notAfter of the certificate with `pending_serial`, unix seconds.
    pub pending_not_after: Option<i64>,
    /// When a node certificate of this node was last accepted (or the node joined), unix
    /// seconds.
    pub last_seen: Option<i64>,
    /// When the node was evicted, unix seconds; `None` while it is active.
    pub evicted_at: Option<i64>,
}

/// Which of a node's recorded certificates was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeCertificateRole {
    /// The certificate in use.
    Current,
    /// The newest one, used for the first time: it becomes current.
    Pending,
}

/// Why a node certificate (or a renewal with it) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRefusal {
    /// No node of that name has joined.
    Unknown,
    /// The node was evicted; only a new join token admits it again.
    Evicted,
    /// The certificate is neither the node's current nor its pending one: a newer one has
    /// been issued and used since.
    Superseded,
}

impl fmt::Display for NodeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRefusal::Unknown => "the node has not joined",
            NodeRefusal::Evicted => "the node has been evicted",
            NodeRefusal::Superseded => "the node certificate has been superseded by a newer one",
        })
    }
}

impl NodeRecord {
    /// Whether a node certificate with serial `serial_hex` is accepted for this node, and
    /// as which (pure). Eviction refuses every certificate.
    pub fn judge_certificate(&self, serial_hex: &str) -> Result<NodeCertificateRole, NodeRefusal> {
        if self.evicted_at.is_some() {
            Err(NodeRefusal::Evicted)
        } else if self.current_serial.as_deref() == Some(serial_hex) {
            Ok(NodeCertificateRole::Current)
        } else if self.pending_serial.as_deref() == Some(serial_hex) {
            Ok(NodeCertificateRole::Pending)
        } else {
            Err(NodeRefusal::Superseded)
        }
    }

    /// This record after an accepted use of a certificate in `role` at `now` (pure): a
    /// pending certificate becomes current; `last_seen` is `now`.
    pub fn after_use(&self, role: NodeCertificateRole, now: i64) -> NodeRecord {
        let mut next = self.clone();
        if role == NodeCertificateRole::Pending {
            next.current_serial = next.pending_serial.take();
            next.current_not_after = next.pending_not_after.take();
        }
        next.last_seen = Some(now);
        next
    }

    /// Whether an accepted use in `role` at `now` must be written (pure): a promotion always
    /// is; `last_seen` only once it is [`LAST_SEEN_GRANULARITY_SECS`] old, so a node agent
    /// asking for many workload certificates at once does not become as many write
    /// transactions.
    pub fn use_needs_write(&self, role: NodeCertificateRole, now: i64) -> bool {
        role == NodeCertificateRole::Pending
            || self
                .last_seen
                .is_none_or(|seen| now.saturating_sub(seen) >= LAST_SEEN_GRANULARITY_SECS)
    }

    /// The state of the node: `active` or `evicted`.
    pub fn state(&self) -> &'static str {
        if self.evicted_at.is_some() {
            "evicted"
        } else {
            "active"
        }
    }
}

/// Outcome of [`crate::NodeStore::use_node_certificate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCertificateUse {
    /// Accepted; `last_seen` is updated, and a pending certificate is now current.
    Accepted(NodeCertificateRole),
    /// Refused; nothing was changed.
    Refused(NodeRefusal),
}

/// What entitles an issuance of a node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeGrant {
    /// First contact (or re-join): the join token with this SHA-256, consumed by the issuance.
    Join {
        /// SHA-256 of the token text.
        token_sha256: [u8; 32],
    },
    /// Renewal by the node agent with its current node certificate.
    Renewal {
        /// Serial (lowercase hex) of the certificate the agent authenticated with.
        presented_serial: String,
    },
}

/// Outcome of [`crate::NodeStore::append_node_issuance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIssuanceOutcome {
    /// The ledger row is committed together with the node's new serial (and, for a join, the
    /// spent token).
    Recorded(Box<LedgerEntry>),
    /// The join token cannot be used; nothing was written.
    TokenRefused(JoinTokenRefusal),
    /// The renewal is refused; nothing was written.
    NodeRefused(NodeRefusal),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(current: Option<&str>, pending: Option<&str>, evicted_at: Option<i64>) -> NodeRecord {
        NodeRecord {
            name: "node-a".into(),
            allowed_ids: vec![],
            joined_at: 1,
            current_serial: current.map(str::to_owned),
            current_not_after: current.map(|_| 100),
            pending_serial: pending.map(str::to_owned),
            pending_not_after: pending.map(|_| 200),
            last_seen: None,
            evicted_at,
        }
    }

    #[test]
    fn a_use_is_written_only_to_promote_or_to_refresh_a_stale_last_seen() {
        let mut n = node(Some("aa"), Some("bb"), None);
        assert!(
            n.use_needs_write(NodeCertificateRole::Current, 1_000),
            "never seen"
        );
        n.last_seen = Some(1_000);
        assert!(!n.use_needs_write(NodeCertificateRole::Current, 1_000 + 59));
        assert!(n.use_needs_write(
            NodeCertificateRole::Current,
            1_000 + LAST_SEEN_GRANULARITY_SECS
        ));
        assert!(
            n.use_needs_write(NodeCertificateRole::Pending, 1_000),
            "promotion"
        );
    }

    #[test]
    fn current_and_pending_certificates_are_accepted_others_superseded() {
        let n = node(Some("aa"), Some("bb"), None);
        assert_eq!(n.judge_certificate("aa"), Ok(NodeCertificateRole::Current));
        assert_eq!(n.judge_certificate("bb"), Ok(NodeCertificateRole::Pending));
        assert_eq!(n.judge_certificate("cc"), Err(NodeRefusal::Superseded));
        assert_eq!(n.judge_certificate(""), Err(NodeRefusal::Superseded));
        let fresh = node(None, None, None);
        assert_eq!(fresh.judge_certificate("aa"), Err(NodeRefusal::Superseded));
    }

    #[test]
    fn eviction_refuses_every_certificate() {
        let n = node(Some("aa"), Some("bb"), Some(5));
        for serial in ["aa", "bb", "cc"] {
            assert_eq!(n.judge_certificate(serial), Err(NodeRefusal::Evicted));
        }
        assert_eq!(n.state(), "evicted");
        assert_eq!(node(Some("aa"), None, None).state(), "active");
    }

    #[test]
    fn first_use_of_the_pending_certificate_promotes_it_and_supersedes_the_old_one() {
        let n = node(Some("aa"), Some("bb"), None).after_use(NodeCertificateRole::Pending, 50);
        assert_eq!(n.current_serial.as_deref(), Some("bb"));
        assert_eq!(n.current_not_after, Some(200));
        assert_eq!(n.pending_serial, None);
        assert_eq!(n.pending_not_after, None);
        assert_eq!(n.last_seen, Some(50));
        assert_eq!(n.judge_certificate("aa"), Err(NodeRefusal::Superseded));
        assert_eq!(n.judge_certificate("bb"), Ok(NodeCertificateRole::Current));
    }

    #[test]
    fn use_of_the_current_certificate_keeps_the_pending_one() {
        let n = node(Some("aa"), Some("bb"), None).after_use(NodeCertificateRole::Current, 60);
        assert_eq!(n.current_serial.as_deref(), Some("aa"));
        assert_eq!(n.pending_serial.as_deref(), Some("bb"));
        assert_eq!(n.last_seen, Some(60));
    }
}
