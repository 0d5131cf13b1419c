//! The trust bundle of the moment, shared by every verifier built on it.

use std::sync::{Arc, RwLock};

use citadel_identity::TrustBundle;

/// A trust bundle that can be replaced while verifiers hold it: the next
/// handshake sees the new roots, open connections are untouched. Cheap to
/// clone (all clones see the same bundle).
#[derive(Debug, Clone, Default)]
pub struct SharedBundle {
    current: Arc<RwLock<Option<Arc<TrustBundle>>>>,
}

impl SharedBundle {
    /// Holding `bundle`.
    pub fn new(bundle: TrustBundle) -> Self {
        let shared = Self::default();
        shared.set(bundle);
        shared
    }

    /// Replaces the bundle.
    pub fn set(&self, bundle: TrustBundle) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(bundle));
    }

    /// The bundle now; `None` before one was set (every peer is refused).
    pub fn get(&self) -> Option<Arc<TrustBundle>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
