//! How far the trust bundle has reached the agent's consumers.
//!
//! An agent acknowledges a bundle sequence to the CA only once the bundle has reached the
//! workloads' proxies: every open SDS stream that asked for `ROOTCA` has ACKed (xDS ACK:
//! same `version_info` and `response_nonce`, no `error_detail`) the response carrying it,
//! and every open Workload API stream has been sent it. Each such stream registers a
//! [`Consumer`] and confirms the sequences it delivered; the agent acknowledges
//! [`Propagation::propagated`] of the sequence it applied. That is what lets
//! `citadel root activate` refuse until a new root is trusted by every proxy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The highest sequence that has reached everyone (pure): the applied sequence, unless an
/// open consumer has confirmed less.
pub fn propagated(applied: u64, confirmed: impl IntoIterator<Item = u64>) -> u64 {
    confirmed.into_iter().fold(applied, u64::min)
}

#[derive(Default)]
struct Inner {
    consumers: Mutex<HashMap<u64, u64>>,
    next_id: AtomicU64,
    changed: watch::Sender<u64>,
}

impl Inner {
    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The open consumers of the bundle and what each has confirmed. Cheap to clone.
#[derive(Clone, Default)]
pub struct Propagation {
    inner: Arc<Inner>,
}

/// One open stream that must receive every bundle; unregistered when dropped.
pub struct Consumer {
    id: u64,
    inner: Arc<Inner>,
}

impl Propagation {
    /// A tracker with no consumer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a stream that has confirmed nothing yet.
    pub fn register(&self) -> Consumer {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, 0);
        self.inner.notify();
        Consumer {
            id,
            inner: self.inner.clone(),
        }
    }

    /// The highest sequence at most `applied` that every open consumer has confirmed.
    pub fn propagated(&self, applied: u64) -> u64 {
        propagated(applied, self.lock().values().copied())
    }

    /// Changes whenever a consumer registers, confirms or goes away.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Open consumers (for metrics and tests).
    pub fn consumers(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Consumer {
    /// This stream's client now holds bundle `sequence` (confirmations only grow).
    pub fn confirm(&self, sequence: u64) {
        let mut consumers = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = consumers.get_mut(&self.id)
            && sequence > *c
        {
            *c = sequence;
            drop(consumers);
            self.inner.notify();
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let mut consumers = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        consumers.remove(&self.id);
        drop(consumers);
        self.inner.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_no_consumer_the_applied_sequence_has_propagated() {
        assert_eq!(propagated(7, []), 7);
        assert_eq!(Propagation::new().propagated(7), 7);
    }

    #[test]
    fn the_slowest_consumer_holds_the_acknowledgement_back() {
        assert_eq!(propagated(7, [7, 5, 9]), 5);
    }

    #[test]
    fn a_consumer_counts_until_it_confirms_and_not_after_it_closed() {
        let p = Propagation::new();
        let mut changes = p.subscribe();
        let a = p.register();
        let b = p.register();
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(p.propagated(3), 0, "a fresh stream has confirmed nothing");
        a.confirm(3);
        assert_eq!(p.propagated(3), 0);
        b.confirm(2);
        assert_eq!(p.propagated(3), 2);
        b.confirm(1);
        assert_eq!(p.propagated(3), 2, "confirmations never go back");
        assert!(changes.has_changed().unwrap());
        drop(b);
        assert_eq!(p.propagated(3), 3);
        assert_eq!(p.consumers(), 1);
    }
}
