//! An in-memory [`crate::Store`] for tests: same semantics as the SQL backends (it passes the same
//! conformance suite), nothing durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::agents::{
    BundleAck, JoinTokenRecord, JoinTokenRefusal, PolicyAck, check_policy_version,
};
use crate::chain::{ChainVerifier, GENESIS_HASH, chain_batch};
use crate::checkpoint::{CheckpointStore, LedgerCheckpoint};
use crate::error::StoreError;
use crate::lease::{Lease, LeaseStore};
use crate::model::{
    AuthorityRecord, AuthorityState, LedgerEntry, LedgerFilter, LedgerVerification, NewIssuance,
};
use crate::nodes::{
    NodeCertificateRole, NodeCertificateUse, NodeGrant, NodeIssuanceOutcome, NodeRecord,
    NodeRefusal,
};
use crate::store::{AckStore, AuthorityStore, HealthStore, LedgerStore, NodeStore};

/// A [`crate::Store`] held in memory, for tests of code that uses a store. Not durable.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    leases: Mutex<BTreeMap<String, Lease>>,
    checkpoints: Mutex<BTreeMap<i64, LedgerCheckpoint>>,
}

#[derive(Debug)]
struct State {
    authorities: Vec<AuthorityRecord>,
    rows: Vec<LedgerEntry>,
    head: Option<(i64, [u8; 32])>,
    bundle_sequence: u64,
    join_tokens: HashMap<[u8; 32], JoinTokenRecord>,
    nodes: BTreeMap<String, NodeRecord>,
    acks: BTreeMap<String, BundleAck>,
    policy_acks: BTreeMap<String, PolicyAck>,
}

impl Default for State {
    fn default() -> Self {
        State {
            authorities: Vec::new(),
            rows: Vec::new(),
            head: Some((0, GENESIS_HASH)),
            bundle_sequence: 0,
            join_tokens: HashMap::new(),
            nodes: BTreeMap::new(),
            policy_acks: BTreeMap::new(),
            acks: BTreeMap::new(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `edit` the raw ledger rows, to simulate tampering "behind the store's back" in
    /// tests. The chain head is left as it was. Only with the `test-util` feature: no release
    /// build can rewrite its ledger.
    #[cfg(any(test, feature = "test-util"))]
    pub fn tamper_with_ledger(&self, edit: impl FnOnce(&mut Vec<LedgerEntry>)) {
        edit(&mut self.lock().rows);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated (every method
        // validates before it mutates), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Appends `batch` all or nothing (everything is checked before anything changes).
    fn append(&mut self, batch: &[NewIssuance]) -> Result<Vec<LedgerEntry>, StoreError> {
        let (last_seq, last_hash) = self
            .head
            .ok_or_else(|| StoreError::Corrupt("the ledger head row is missing".into()))?;
        let mut seen = std::collections::HashSet::new();
        for i in batch {
            let key = (i.authority_id.as_str(), i.serial_hex.as_str());
            let stored = self.rows.iter().any(|r| {
                (
                    r.issuance.authority_id.as_str(),
                    r.issuance.serial_hex.as_str(),
                ) == key
            });
            if stored || !seen.insert(key) {
                return Err(StoreError::Conflict(
                    "an issuance in the batch repeats a serial number of its authority".into(),
                ));
            }
        }
        let entries = chain_batch(last_seq, last_hash, batch);
        if let Some(last) = entries.last() {
            self.head = Some((last.seq, last.row_hash));
        }
        self.rows.extend(entries.iter().cloned());
        Ok(entries)
    }
}

fn matches(filter: &LedgerFilter, e: &LedgerEntry) -> bool {
    let i = &e.issuance;
    filter.spiffe_id.as_ref().is_none_or(|s| *s == i.spiffe_id)
        && filter
            .authority_id
            .as_ref()
            .is_none_or(|a| *a == i.authority_id)
        && filter
            .live_at
            .is_none_or(|t| i.not_before <= t && t < i.not_after)
}

#[async_trait::async_trait]
impl HealthStore for MemoryStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl AuthorityStore for MemoryStore {
    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        let mut out = self.lock().authorities.clone();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn insert_authority(&self, rec: &AuthorityRecord) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.authorities.iter().any(|a| a.id == rec.id) {
            return Err(StoreError::Conflict(format!(
                "authority {} already exists",
                rec.id
            )));
        }
        let active = state
            .authorities
            .iter()
            .find(|a| a.state == AuthorityState::Active);
        if let (AuthorityState::Active, Some(other)) = (rec.state, active) {
            return Err(StoreError::Conflict(format!(
                "authority {} is already active",
                other.id
            )));
        }
        state.authorities.push(rec.clone());
        state.bundle_sequence += 1;
        Ok(())
    }

    async fn set_authority_state(
        &self,
        id: &str,
        new_state: AuthorityState,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if !state.authorities.iter().any(|a| a.id == id) {
            return Err(StoreError::NotFound(format!("authority {id}")));
        }
        let mut changed = false;
        for a in state.authorities.iter_mut() {
            let next = if a.id == id {
                new_state
            } else if new_state == AuthorityState::Active && a.state == AuthorityState::Active {
                AuthorityState::Retired
            } else {
                a.state
            };
            changed |= next != a.state;
            a.state = next;
        }
        if changed {
            state.bundle_sequence += 1;
        }
        Ok(())
    }

    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        Ok(self.lock().bundle_sequence)
    }
}

#[async_trait::async_trait]
impl LedgerStore for MemoryStore {
    async fn append_issuances(
        &self,
        batch: &[NewIssuance],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.lock().append(batch)
    }

    async fn list_issuances(&self, filter: &LedgerFilter) -> Result<Vec<LedgerEntry>, StoreError> {
        let state = self.lock();
        let mut rows: Vec<&LedgerEntry> =
            state.rows.iter().filter(|e| matches(filter, e)).collect();
        rows.sort_by_key(|e| e.seq);
        let limit = filter.limit.map_or(usize::MAX, |l| l as usize);
        Ok(rows.into_iter().take(limit).cloned().collect())
    }

    async fn verify_ledger(&self) -> Result<LedgerVerification, StoreError> {
        let state = self.lock();
        let mut rows: Vec<&LedgerEntry> = state.rows.iter().collect();
        rows.sort_by_key(|e| e.seq);
        let mut verifier = ChainVerifier::new();
        for row in rows {
            if !verifier.check(row.seq, Ok(row.clone())) {
                break;
            }
        }
        Ok(verifier.finish(state.head))
    }

    async fn live_counts_by_authority(&self, now: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let state = self.lock();
        let mut counts = std::collections::BTreeMap::<String, u64>::new();
        for e in state.rows.iter().filter(|e| e.issuance.not_after > now) {
            *counts.entry(e.issuance.authority_id.clone()).or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }
}

#[async_trait::async_trait]
impl NodeStore for MemoryStore {
    async fn insert_join_token(&self, rec: &JoinTokenRecord) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.join_tokens.contains_key(&rec.token_sha256) {
            return Err(StoreError::Conflict(
                "a join token with the same hash exists".into(),
            ));
        }
        state.join_tokens.insert(rec.token_sha256, rec.clone());
        Ok(())
    }

    async fn find_join_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        Ok(self.lock().join_tokens.get(token_sha256).cloned())
    }

    async fn append_node_issuance(
        &self,
        node_name: &str,
        grant: &NodeGrant,
        issuance: &NewIssuance,
        now: i64,
    ) -> Result<NodeIssuanceOutcome, StoreError> {
        let mut state = self.lock();
        // Decide everything on a copy of what changes, then append (which checks before it
        // writes), then commit the copy: a refusal or an error leaves the state untouched.
        let (token, node) = match grant {
            NodeGrant::Join { token_sha256 } => {
                let Some(rec) = state.join_tokens.get(token_sha256) else {
                    return Ok(NodeIssuanceOutcome::TokenRefused(JoinTokenRefusal::Unknown));
                };
                if rec.node_name != node_name {
                    return Err(StoreError::Conflict(format!(
                        "the join token admits node {}, not node {node_name}",
                        rec.node_name
                    )));
                }
                if let Some(refusal) = rec.refusal_at(now) {
                    return Ok(NodeIssuanceOutcome::TokenRefused(refusal));
                }
                let token = JoinTokenRecord {
                    used_at: Some(now),
                    ..rec.clone()
                };
                let node = NodeRecord {
                    name: node_name.to_string(),
                    allowed_ids: rec.allowed_ids.clone(),
                    joined_at: now,
                    current_serial: Some(issuance.serial_hex.clone()),
                    current_not_after: Some(issuance.not_after),
                    pending_serial: None,
                    pending_not_after: None,
                    last_seen: Some(now),
                    evicted_at: None,
                };
                (Some(token), node)
            }
            NodeGrant::Renewal { presented_serial } => {
                let Some(node) = state.nodes.get(node_name) else {
                    return Ok(NodeIssuanceOutcome::NodeRefused(NodeRefusal::Unknown));
                };
                match node.judge_certificate(presented_serial) {
                    Ok(NodeCertificateRole::Current) => {}
                    Ok(NodeCertificateRole::Pending) => {
                        return Ok(NodeIssuanceOutcome::NodeRefused(NodeRefusal::Superseded));
                    }
                    Err(refusal) => return Ok(NodeIssuanceOutcome::NodeRefused(refusal)),
                }
                let node = NodeRecord {
                    pending_serial: Some(issuance.serial_hex.clone()),
                    pending_not_after: Some(issuance.not_after),
                    last_seen: Some(now),
                    ..node.clone()
                };
                (None, node)
            }
        };
        let entry = state
            .append(std::slice::from_ref(issuance))?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("the ledger append returned no entry".into()))?;
        if let Some(token) = token {
            state.join_tokens.insert(token.token_sha256, token);
        }
        state.nodes.insert(node_name.to_string(), node);
        Ok(NodeIssuanceOutcome::Recorded(Box::new(entry)))
    }

    async fn use_node_certificate(
        &self,
        node_name: &str,
        serial_hex: &str,
        now: i64,
    ) -> Result<NodeCertificateUse, StoreError> {
        let mut state = self.lock();
        let Some(node) = state.nodes.get_mut(node_name) else {
            return Ok(NodeCertificateUse::Refused(NodeRefusal::Unknown));
        };
        match node.judge_certificate(serial_hex) {
            Ok(role) => {
                if node.use_needs_write(role, now) {
                    *node = node.after_use(role, now);
                }
                Ok(NodeCertificateUse::Accepted(role))
            }
            Err(refusal) => Ok(NodeCertificateUse::Refused(refusal)),
        }
    }

    async fn evict_node(&self, node_name: &str, now: i64) -> Result<bool, StoreError> {
        let mut state = self.lock();
        let node = state
            .nodes
            .get_mut(node_name)
            .ok_or_else(|| StoreError::NotFound(format!("node {node_name}")))?;
        if node.evicted_at.is_some() {
            return Ok(false);
        }
        node.evicted_at = Some(now);
        Ok(true)
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.lock().nodes.values().cloned().collect())
    }

    async fn node_allowed_ids(&self, node_name: &str) -> Result<Option<Vec<String>>, StoreError> {
        Ok(self
            .lock()
            .nodes
            .get(node_name)
            .map(|node| node.allowed_ids.clone()))
    }
}

#[async_trait::async_trait]
impl AckStore for MemoryStore {
    async fn record_bundle_ack(
        &self,
        agent_id: &str,
        sequence: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        if i64::try_from(sequence).is_err() {
            return Err(StoreError::Conflict(format!(
                "bundle sequence {sequence} is out of range"
            )));
        }
        let mut state = self.lock();
        let ack = state
            .acks
            .entry(agent_id.to_string())
            .or_insert_with(|| BundleAck {
                agent_id: agent_id.to_string(),
                sequence,
                acked_at: now,
            });
        ack.sequence = ack.sequence.max(sequence);
        ack.acked_at = now;
        Ok(())
    }

    async fn list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError> {
        Ok(self.lock().acks.values().cloned().collect())
    }

    async fn record_policy_ack(
        &self,
        agent_id: &str,
        version: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        check_policy_version(version).map_err(StoreError::Conflict)?;
        self.lock().policy_acks.insert(
            agent_id.to_string(),
            PolicyAck {
                agent_id: agent_id.to_string(),
                version: version.to_string(),
                acked_at: now,
            },
        );
        Ok(())
    }

    async fn list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError> {
        Ok(self.lock().policy_acks.values().cloned().collect())
    }
}

#[async_trait::async_trait]
impl LeaseStore for MemoryStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if leases
            .get(name)
            .is_some_and(|l| !l.takeable_by(holder, now))
        {
            return Ok(false);
        }
        leases.insert(
            name.to_owned(),
            Lease {
                name: name.to_owned(),
                holder: holder.to_owned(),
                expires_at,
            },
        );
        Ok(true)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if leases.get(name).is_some_and(|l| l.holder == holder) {
            leases.remove(name);
            return Ok(true);
        }
        Ok(false)
    }

    async fn get_lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        Ok(self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned())
    }
}

#[async_trait::async_trait]
impl CheckpointStore for MemoryStore {
    async fn insert_checkpoint(&self, checkpoint: &LedgerCheckpoint) -> Result<bool, StoreError> {
        let mut checkpoints = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        if checkpoints.contains_key(&checkpoint.seq) {
            return Ok(false);
        }
        checkpoints.insert(checkpoint.seq, checkpoint.clone());
        Ok(true)
    }

    async fn latest_checkpoint(&self) -> Result<Option<LedgerCheckpoint>, StoreError> {
        let checkpoints = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        Ok(checkpoints.values().next_back().cloned())
    }

    async fn ledger_head(&self) -> Result<(i64, [u8; 32]), StoreError> {
        self.lock()
            .head
            .ok_or_else(|| StoreError::Corrupt("the ledger head row is missing".into()))
    }

    async fn ledger_row_hash(&self, seq: i64) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(self
            .lock()
            .rows
            .iter()
            .find(|r| r.seq == seq)
            .map(|r| r.row_hash))
    }
}
