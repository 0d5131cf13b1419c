//! Group commit for the ledger: many concurrent issuances, few transactions.
//!
//! One writer task owns the appends. It waits for a request, takes whatever else is already
//! queued (up to `max_batch`), appends the lot with one [`LedgerStore::append_issuances`] call and
//! answers each waiter. A waiter is answered only after its row is committed; if the
//! transaction fails, every waiter of that batch gets the error and nothing was written.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::StoreError;
use crate::model::{LedgerEntry, NewIssuance};
use crate::store::LedgerStore;

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
    pub fn spawn(store: Arc<dyn LedgerStore>, max_batch: usize) -> GroupCommitLedger {
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

async fn run_writer(
    store: Arc<dyn LedgerStore>,
    mut queue: mpsc::Receiver<Request>,
    max_batch: usize,
) {
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
    use crate::memory::MemoryStore;
    use crate::model::{LedgerFilter, LedgerVerification};

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
    impl LedgerStore for RecordingStore {
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
        impl LedgerStore for ShortStore {
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
        }

        let ledger = GroupCommitLedger::spawn(Arc::new(ShortStore), 4);
        assert!(matches!(
            ledger.record(issuance(1)).await,
            Err(StoreError::Corrupt(_))
        ));
    }
}
