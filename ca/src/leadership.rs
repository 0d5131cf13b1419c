//! Which replica runs the once-per-cluster jobs (automatic root renewal, and on Kubernetes
//! the trust-bundle ConfigMaps): one narrow seam, [`Leadership`], held by a lease in the
//! store off Kubernetes ([`StoreLease`]) or by a `coordination.k8s.io/v1` Lease on
//! Kubernetes ([`crate::k8s::lease::KubeLease`]).

use std::sync::Arc;

use async_trait::async_trait;
use citadel_store::Store;

/// Leadership could not be decided (the lease's backend is unreachable).
#[derive(Debug, Clone, thiserror::Error)]
#[error("leadership undecided: {0}")]
pub struct LeadershipError(pub String);

/// A lease one replica at a time holds.
#[async_trait]
pub trait Leadership: Send + Sync {
    /// Takes or renews the lease at `now` (Unix seconds): whether this replica leads until
    /// its next call.
    async fn lead(&self, now: i64) -> Result<bool, LeadershipError>;
    /// Gives the lease up (on shutdown), so another replica can take over at once.
    async fn step_down(&self);
    /// Who this replica is, for logs.
    fn holder(&self) -> &str;
}

/// A lease row in the store.
pub struct StoreLease {
    store: Arc<dyn Store>,
    name: &'static str,
    holder: String,
    lease_secs: i64,
}

impl StoreLease {
    /// Lease `name` in `store`, held `lease_secs` per call by `holder`.
    pub fn new(store: Arc<dyn Store>, name: &'static str, holder: String, lease_secs: i64) -> Self {
        Self {
            store,
            name,
            holder,
            lease_secs,
        }
    }
}

#[async_trait]
impl Leadership for StoreLease {
    async fn lead(&self, now: i64) -> Result<bool, LeadershipError> {
        self.store
            .acquire_lease(
                self.name,
                &self.holder,
                now,
                now.saturating_add(self.lease_secs),
            )
            .await
            .map_err(|e| LeadershipError(e.to_string()))
    }

    async fn step_down(&self) {
        match self.store.release_lease(self.name, &self.holder).await {
            Ok(true) => {
                tracing::info!(holder = %self.holder, lease = self.name, "released the lease")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, lease = self.name, "cannot release the lease; it lapses by itself")
            }
        }
    }

    fn holder(&self) -> &str {
        &self.holder
    }
}
