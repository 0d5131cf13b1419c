//! Group commit for the ledger: many concurrent issuances, few transactions.
//!
//! One writer task owns the appends. It waits for a request, takes whatever else is already
//! queued (up to `max_batch`), appends the lot with one [`Store::append_issuances`] call and
//! answers each waiter. A waiter is answered only after its row is committed; if the
//! transaction fails, every waiter of that batch gets the error and nothing was written.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::StoreError;
use crate::model::{LedgerEntry, NewIssuance};
use crate::store::Store;

/// Upper bound on `max_batch`, which also bounds the request queue.
const MAX_BATCH_LIMIT: usize = 4096;

type Reply = oneshot::Sender<Result<LedgerEntry, StoreError>>;

struct Request {
    issuance: NewIssuance,
    reply: Reply,
}

/// Handle to the ledger's writer task. Cheap to clone; the task ends when every handle is
/// dropped (after finishing the requests already queued).
#[derive(Debug, Clone)]
pub struct GroupCommitLedger {
    requests: mpsc::Sender<Request>,
}

impl GroupCommitLedger {
    /// Spawns the writer task on the current Tokio runtime (so it must be called from within
    /// one). Each transaction carries at most `max_batch` issuances (clamped to 1..=4096); up
    /// to twice that many requests wait in the queue before `record` callers wait to enqueue.
    pub fn spawn(store: Arc<dyn Store>, max_batch: usize) -> GroupCommitLedger {
        let max_batch = max_batch.clamp(1, MAX_BATCH_LIMIT);
        let (requests, queue) = mpsc::channel(max_batch * 2);
        tokio::spawn(run_writer(store, queue, max_batch));
        GroupCommitLedger { requests }
    }

    /// Records one issuance; returns only once its row is committed.
    pub async fn record(&self, issuance: NewIssuance) -> Result<LedgerEntry, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { issuance, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the ledger writer has stopped".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("the ledger writer stopped before answering".into())
        })?
    }
}

/// Takes the first waiting request, then whatever is already queued, up to `max_batch`.
/// `None` once every handle is dropped and the queue is empty.
async fn next_batch(queue: &mut mpsc::Receiver<Request>, max_batch: usize) -> Option<Vec<Request>> {
    let first = queue.recv().await?;
    let mut batch = Vec::with_capacity(max_batch.min(64));
    batch.push(first);
    while batch.len() < max_batch {
        match queue.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn run_writer(store: Arc<dyn Store>, mut queue: mpsc::Receiver<Request>, max_batch: usize) {
    while let Some(batch) = next_batch(&mut queue, max_batch).await {
        let (issuances, replies): (Vec<NewIssuance>, Vec<Reply>) =
            batch.into_iter().map(|r| (r.issuance, r.reply)).unzip();
        match store.append_issuances(&issuances).await {
            Ok(entries) if entries.len() == replies.len() => {
                for (reply, entry) in replies.into_iter().zip(entries) {
                    // A waiter that gave up has dropped its receiver; its row stays recorded.
                    let _ = reply.send(Ok(entry));
                }
            }
            Ok(entries) => {
                let err = StoreError::Corrupt(format!(
                    "the store returned {} ledger entries for {} issuances",
                    entries.len(),
                    replies.len()
                ));
                tracing::error!(error = %err, "ledger group commit");
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, batch = replies.len(), "ledger group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::agents::{BundleAck, JoinTokenRecord, PolicyAck};
    use crate::memory::MemoryStore;
    use crate::model::{AuthorityRecord, AuthorityState, LedgerFilter, LedgerVerification};
    use crate::nodes::{NodeCertificateUse, NodeGrant, NodeIssuanceOutcome, NodeRecord};

    /// A store that delegates to [`MemoryStore`], records the size of every append, takes
    /// (virtual) time per append, and fails appends on demand.
    struct RecordingStore {
        inner: MemoryStore,
        batches: Mutex<Vec<usize>>,
        /// Fail the n-th append (1-based), before writing anything.
        fail_call: Mutex<Option<usize>>,
    }

    impl RecordingStore {
        fn new() -> Arc<Self> {
            Arc::new(RecordingStore {
                inner: MemoryStore::new(),
                batches: Mutex::new(Vec::new()),
                fail_call: Mutex::new(None),
            })
        }

        fn batches(&self) -> Vec<usize> {
            self.batches.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl crate::LeaseStore for RecordingStore {
        async fn acquire_lease(
            &self,
            name: &str,
            holder: &str,
            now: i64,
            expires_at: i64,
        ) -> Result<bool, StoreError> {
            self.inner
                .acquire_lease(name, holder, now, expires_at)
                .await
        }
        async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
            self.inner.release_lease(name, holder).await
        }
        async fn get_lease(&self, name: &str) -> Result<Option<crate::Lease>, StoreError> {
            self.inner.get_lease(name).await
        }
    }

    #[async_trait::async_trait]
    impl Store for RecordingStore {
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
            self.inner.list_authorities().await
        }
        async fn insert_authority(&self, rec: &AuthorityRecord) -> Result<(), StoreError> {
            self.inner.insert_authority(rec).await
        }
        async fn set_authority_state(
            &self,
            id: &str,
            state: AuthorityState,
        ) -> Result<(), StoreError> {
            self.inner.set_authority_state(id, state).await
        }
        async fn append_issuances(
            &self,
            batch: &[NewIssuance],
        ) -> Result<Vec<LedgerEntry>, StoreError> {
            let call = {
                let mut batches = self.batches.lock().unwrap();
                batches.push(batch.len());
                batches.len()
            };
            // A commit takes time; on the paused clock this lets every runnable task queue up.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if *self.fail_call.lock().unwrap() == Some(call) {
                return Err(StoreError::Unavailable("injected failure".into()));
            }
            self.inner.append_issuances(batch).await
        }
        async fn list_issuances(
            &self,
            filter: &LedgerFilter,
        ) -> Result<Vec<LedgerEntry>, StoreError> {
            self.inner.list_issuances(filter).await
        }
        async fn verify_ledger(&self) -> Result<LedgerVerification, StoreError> {
            self.inner.verify_ledger().await
        }
        async fn live_counts_by_authority(
            &self,
            now: i64,
        ) -> Result<Vec<(String, u64)>, StoreError> {
            self.inner.live_counts_by_authority(now).await
        }
        async fn bundle_sequence(&self) -> Result<u64, StoreError> {
            self.inner.bundle_sequence().await
        }
        async fn insert_join_token(&self, rec: &JoinTokenRecord) -> Result<(), StoreError> {
            self.inner.insert_join_token(rec).await
        }
        async fn find_join_token(
            &self,
            hash: &[u8; 32],
        ) -> Result<Option<JoinTokenRecord>, StoreError> {
            self.inner.find_join_token(hash).await
        }
        async fn append_node_issuance(
            &self,
            node: &str,
            grant: &NodeGrant,
            issuance: &NewIssuance,
            now: i64,
        ) -> Result<NodeIssuanceOutcome, StoreError> {
            self.inner
                .append_node_issuance(node, grant, issuance, now)
                .await
        }
        async fn use_node_certificate(
            &self,
            node: &str,
            serial: &str,
            now: i64,
        ) -> Result<NodeCertificateUse, StoreError> {
            self.inner.use_node_certificate(node, serial, now).await
        }
        async fn evict_node(&self, node: &str, now: i64) -> Result<bool, StoreError> {
            self.inner.evict_node(node, now).await
        }
        async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
            self.inner.list_nodes().await
        }
        async fn node_allowed_ids(&self, node: &str) -> Result<Option<Vec<String>>, StoreError> {
            self.inner.node_allowed_ids(node).await
        }
        async fn record_bundle_ack(
            &self,
            agent_id: &str,
            sequence: u64,
            now: i64,
        ) -> Result<(), StoreError> {
            self.inner.record_bundle_ack(agent_id, sequence, now).await
        }
        async fn list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError> {
            self.inner.list_bundle_acks().await
        }
        async fn record_policy_ack(
            &self,
            agent_id: &str,
            version: &str,
            now: i64,
        ) -> Result<(), StoreError> {
            self.inner.record_policy_ack(agent_id, version, now).await
        }
        async fn list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError> {
            self.inner.list_policy_acks().await
        }
    }

    fn issuance(n: usize) -> NewIssuance {
        NewIssuance {
            serial_hex: format!("{n:032x}"),
            spiffe_id: format!("spiffe://cluster.local/ns/default/sa/w{n}"),
            authority_id: "auth-1".into(),
            not_before: 1_000,
            not_after: 90_000,
            requester: "spiffe://cluster.local/ns/citadel/sa/citadel-agent".into(),
            node: Some("node-1".into()),
            der_sha256: [n as u8; 32],
            issued_at: 1_120,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_records_share_few_transactions() {
        let store = RecordingStore::new();
        let ledger = GroupCommitLedger::spawn(store.clone(), 64);
        let tasks: Vec<_> = (0..100)
            .map(|n| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.record(issuance(n)).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap().unwrap().seq);
        }
        seqs.sort();
        assert_eq!(seqs, (1..=100).collect::<Vec<i64>>());

        let batches = store.batches();
        assert_eq!(batches.iter().sum::<usize>(), 100);
        assert!(
            batches.len() <= 3,
            "100 records took {} transactions: {batches:?}",
            batches.len()
        );
        assert!(
            batches.iter().all(|&b| b <= 64),
            "batch above max_batch: {batches:?}"
        );
        assert!(store.verify_ledger().await.unwrap().is_valid());
    }

    #[tokio::test(start_paused = true)]
    async fn record_returns_the_committed_entry() {
        let store = RecordingStore::new();
        let ledger = GroupCommitLedger::spawn(store.clone(), 8);
        let entry = ledger.record(issuance(7)).await.unwrap();
        assert_eq!(entry.seq, 1);
        assert_eq!(entry.issuance, issuance(7));
        let stored = store
            .list_issuances(&LedgerFilter::default())
            .await
            .unwrap();
        assert_eq!(stored, vec![entry]);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_batch_writes_nothing_and_fails_every_waiter() {
        let store = RecordingStore::new();
        *store.fail_call.lock().unwrap() = Some(2);
        let ledger = GroupCommitLedger::spawn(store.clone(), 64);

        // A first record occupies the writer (its commit takes 10 ms of virtual time) ...
        let first = {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.record(issuance(0)).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        // ... while ten more queue up behind it and form the second batch, which fails.
        let queued: Vec<_> = (1..=10)
            .map(|n| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.record(issuance(n)).await })
            })
            .collect();
        assert_eq!(first.await.unwrap().unwrap().seq, 1);
        for task in queued {
            assert_eq!(
                task.await.unwrap(),
                Err(StoreError::Unavailable("injected failure".into()))
            );
        }
        assert_eq!(store.batches(), vec![1, 10]);
        let rows = store
            .list_issuances(&LedgerFilter::default())
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "the failed batch left rows behind");

        // The writer carries on: the next record continues the chain.
        let next = ledger.record(issuance(11)).await.unwrap();
        assert_eq!(next.seq, 2);
        assert!(store.verify_ledger().await.unwrap().is_valid());
    }

    #[tokio::test(start_paused = true)]
    async fn writer_task_ends_when_every_handle_is_dropped() {
        let store = RecordingStore::new();
        let ledger = GroupCommitLedger::spawn(store.clone(), 8);
        let other = ledger.clone();
        ledger.record(issuance(1)).await.unwrap();
        drop(ledger);
        other.record(issuance(2)).await.unwrap();
        assert_eq!(
            Arc::strong_count(&store),
            2,
            "the writer holds the store while a handle lives"
        );
        drop(other);
        for _ in 0..10 {
            if Arc::strong_count(&store) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "the writer task is still running"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn record_fails_cleanly_when_the_store_returns_the_wrong_count() {
        struct ShortStore;
        #[async_trait::async_trait]
        impl crate::LeaseStore for ShortStore {
            async fn acquire_lease(
                &self,
                _: &str,
                _: &str,
                _: i64,
                _: i64,
            ) -> Result<bool, StoreError> {
                Ok(false)
            }
            async fn release_lease(&self, _: &str, _: &str) -> Result<bool, StoreError> {
                Ok(false)
            }
            async fn get_lease(&self, _: &str) -> Result<Option<crate::Lease>, StoreError> {
                Ok(None)
            }
        }
        #[async_trait::async_trait]
        impl Store for ShortStore {
            async fn ping(&self) -> Result<(), StoreError> {
                Ok(())
            }
            async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
                Ok(Vec::new())
            }
            async fn insert_authority(&self, _: &AuthorityRecord) -> Result<(), StoreError> {
                Ok(())
            }
            async fn set_authority_state(
                &self,
                _: &str,
                _: AuthorityState,
            ) -> Result<(), StoreError> {
                Ok(())
            }
            async fn append_issuances(
                &self,
                _: &[NewIssuance],
            ) -> Result<Vec<LedgerEntry>, StoreError> {
                Ok(Vec::new())
            }
            async fn list_issuances(
                &self,
                _: &LedgerFilter,
            ) -> Result<Vec<LedgerEntry>, StoreError> {
                Ok(Vec::new())
            }
            async fn verify_ledger(&self) -> Result<LedgerVerification, StoreError> {
                Ok(LedgerVerification {
                    rows_checked: 0,
                    first_bad: None,
                })
            }
            async fn live_counts_by_authority(
                &self,
                _: i64,
            ) -> Result<Vec<(String, u64)>, StoreError> {
                Ok(Vec::new())
            }
            async fn bundle_sequence(&self) -> Result<u64, StoreError> {
                Ok(0)
            }
            async fn insert_join_token(&self, _: &JoinTokenRecord) -> Result<(), StoreError> {
                Ok(())
            }
            async fn find_join_token(
                &self,
                _: &[u8; 32],
            ) -> Result<Option<JoinTokenRecord>, StoreError> {
                Ok(None)
            }
            async fn append_node_issuance(
                &self,
                _: &str,
                _: &NodeGrant,
                _: &NewIssuance,
                _: i64,
            ) -> Result<NodeIssuanceOutcome, StoreError> {
                Err(StoreError::Unavailable("not implemented".into()))
            }
            async fn use_node_certificate(
                &self,
                _: &str,
                _: &str,
                _: i64,
            ) -> Result<NodeCertificateUse, StoreError> {
                Err(StoreError::Unavailable("not implemented".into()))
            }
            async fn evict_node(&self, _: &str, _: i64) -> Result<bool, StoreError> {
                Ok(false)
            }
            async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
                Ok(Vec::new())
            }
            async fn node_allowed_ids(&self, _: &str) -> Result<Option<Vec<String>>, StoreError> {
                Ok(None)
            }
            async fn record_bundle_ack(&self, _: &str, _: u64, _: i64) -> Result<(), StoreError> {
                Ok(())
            }
            async fn list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError> {
                Ok(Vec::new())
            }
            async fn record_policy_ack(&self, _: &str, _: &str, _: i64) -> Result<(), StoreError> {
                Ok(())
            }
            async fn list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError> {
                Ok(Vec::new())
            }
        }
        let ledger = GroupCommitLedger::spawn(Arc::new(ShortStore), 4);
        assert!(matches!(
            ledger.record(issuance(1)).await,
            Err(StoreError::Corrupt(_))
        ));
    }
}
