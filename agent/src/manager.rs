//! The certificate manager: one slot per workload identity in demand, each
//! driven by one task that issues on first demand, renews at half-life with
//! jitter, backs off on CA errors while the valid certificate keeps being
//! served, and goes away after its last subscriber has left.
//!
//! One task per identity is what makes issuance single-flight: however many
//! streams wait for an identity, at most one CSR for it is in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_identity::{Backoff, Escaped, SpiffeId, until_renewal, verify_chain};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::bundle::{BundleState, BundleWatch};
use crate::ca_client::{CaError, CertificateAuthority, SignRequest};
use crate::metrics::AgentMetrics;
use crate::svid::{
    PendingKey, WorkloadSvid, accept_chain, signed_by_another_authority, signer_authority_id,
};
use crate::{random_unit, unix_now};

/// The certificate of an identity as its subscribers see it: `None` until
/// the first issuance succeeds (and again if it expires unrenewed).
pub type CertWatch = watch::Receiver<Option<Arc<WorkloadSvid>>>;

/// Resolves when the watched certificate changes; never, when there is none
/// to watch (a stream that has not asked for a certificate).
pub async fn cert_changed(rx: &mut Option<CertWatch>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(c) => c.changed().await,
        None => futures::future::pending().await,
    }
}

/// Manager settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The lifetime requested for workload certificates.
    pub workload_ttl: Duration,
    /// How long an identity with no subscribers is kept (a proxy that
    /// reconnects at once keeps its certificate).
    pub idle_linger: Duration,
    /// Retry schedule after CA errors.
    pub backoff: Backoff,
    /// When the CA activates a new authority, each certificate signed by another one is
    /// re-issued at a random moment within this window.
    pub reissue_window: Duration,
}

/// Default of `--reissue-window`.
pub const DEFAULT_REISSUE_WINDOW: Duration = Duration::from_secs(60);

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            workload_ttl: Duration::from_secs(24 * 3600),
            idle_linger: Duration::from_secs(30),
            backoff: Backoff::default(),
            reissue_window: DEFAULT_REISSUE_WINDOW,
        }
    }
}

/// Whether `cert` must be re-issued because `bundle` names another active authority (pure
/// but for parsing).
pub fn needs_reissue(cert: &WorkloadSvid, bundle: &BundleState) -> bool {
    let signer = signer_authority_id(cert, bundle.bundle.roots());
    signed_by_another_authority(signer.as_deref(), &bundle.active_authority)
}

/// A random moment within `window` (uniform; `unit` in `[0, 1)`), so the agents of a mesh
/// do not all re-issue at once after an activation.
pub fn reissue_delay(window: Duration, unit: f64) -> Duration {
    window.mul_f64(unit.clamp(0.0, 1.0))
}

struct Slot {
    cert: watch::Sender<Option<Arc<WorkloadSvid>>>,
    subscribers: watch::Sender<usize>,
}

struct Inner {
    slots: Mutex<HashMap<SpiffeId, Arc<Slot>>>,
    ca: Arc<dyn CertificateAuthority>,
    bundle: BundleWatch,
    config: ManagerConfig,
    metrics: AgentMetrics,
    rotate: watch::Sender<u64>,
    csrs_sent: AtomicU64,
}

/// Holds and rotates workload certificates. Cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

/// A stream's claim on an identity's certificate; the identity is kept while
/// any subscription is alive.
pub struct CertSubscription {
    /// The certificate of the moment.
    pub cert: CertWatch,
    slot: Arc<Slot>,
}

impl Drop for CertSubscription {
    fn drop(&mut self) {
        self.slot
            .subscribers
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl CertManager {
    /// A manager issuing through `ca`, validating against `bundle`.
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        bundle: BundleWatch,
        config: ManagerConfig,
        metrics: AgentMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                slots: Mutex::new(HashMap::new()),
                ca,
                bundle,
                config,
                metrics,
                rotate: watch::Sender::new(0),
                csrs_sent: AtomicU64::new(0),
            }),
        }
    }

    /// Subscribes to `id`'s certificate, starting its issuance if it is not
    /// held yet.
    pub fn subscribe(&self, id: &SpiffeId) -> CertSubscription {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(id) {
            slot.subscribers.send_modify(|n| *n += 1);
            return CertSubscription {
                cert: slot.cert.subscribe(),
                slot: slot.clone(),
            };
        }
        let slot = Arc::new(Slot {
            cert: watch::Sender::new(None),
            subscribers: watch::Sender::new(1),
        });
        slots.insert(id.clone(), slot.clone());
        self.inner.metrics.certificates_held(slots.len());
        drop(slots);
        let span = tracing::info_span!("identity", spiffe_id = %id);
        tokio::spawn(run_slot(self.inner.clone(), id.clone(), slot.clone()).instrument(span));
        CertSubscription {
            cert: slot.cert.subscribe(),
            slot,
        }
    }

    /// Renews every held certificate now (operator request).
    pub fn rotate_all(&self) {
        self.inner.rotate.send_modify(|n| *n += 1);
    }

    /// The identities in demand now.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.keys().cloned().collect()
    }

    /// CSRs sent to the CA so far (for tests and benchmarks).
    pub fn csrs_sent(&self) -> u64 {
        self.inner.csrs_sent.load(Ordering::Relaxed)
    }

    /// Refreshes the seconds-to-expiry gauges at `now` (called on scrape).
    pub fn refresh_expiry_metrics(&self, now: i64) {
        let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        for (id, slot) in slots.iter() {
            if let Some(cert) = slot.cert.borrow().as_ref() {
                self.inner
                    .metrics
                    .expiry(id.as_str(), (cert.not_after - now) as f64);
            }
        }
    }
}

async fn run_slot(inner: Arc<Inner>, id: SpiffeId, slot: Arc<Slot>) {
    let mut failures = 0u32;
    let mut bundle_rx = inner.bundle.clone();
    let mut rotate_rx = inner.rotate.subscribe();
    let mut subscribers_rx = slot.subscribers.subscribe();
    rotate_rx.mark_unchanged();
    // When the next CSR is due (at once for a new identity), and since when
    // nobody has subscribed. Both outlive single waits: a backoff retry or a
    // rotation must neither restart the idle linger nor send a CSR for an
    // identity nobody wants.
    let mut next_due = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        let bundle = match wait_for_bundle(&mut bundle_rx, &mut subscribers_rx, &inner).await {
            Some(b) => b,
            // Idle while waiting: leave, unless someone subscribed meanwhile.
            None if remove_if_idle(&inner, &id, &slot) => return,
            None => continue,
        };
        if *subscribers_rx.borrow_and_update() == 0 {
            idle_since.get_or_insert_with(Instant::now);
        } else {
            idle_since = None;
        }
        if idle_since.is_none() && Instant::now() >= next_due {
            next_due = Instant::now()
                + match issue(&inner, &id, &bundle).await {
                    Ok(svid) => {
                        failures = 0;
                        inner.metrics.issuance(true);
                        tracing::info!(serial = %svid.serial_hex, not_after = svid.not_after, "certificate issued");
                        // The usable lifetime starts on receipt: the CA
                        // backdates notBefore to absorb clock skew, which
                        // must not pull the renewal of a short-lived
                        // certificate forward.
                        let now = unix_now();
                        let mut due = until_renewal(
                            svid.not_before.max(now),
                            svid.not_after,
                            now,
                            random_unit(),
                        );
                        if let Some(b) = bundle_rx.borrow().as_deref()
                            && needs_reissue(&svid, b)
                        {
                            // The CA replica that answered has not switched yet.
                            due =
                                due.min(reissue_delay(inner.config.reissue_window, random_unit()));
                        }
                        slot.cert.send_replace(Some(Arc::new(svid)));
                        due
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        inner.metrics.issuance(false);
                        if let IssueError::Ca(ca) = &e {
                            inner.metrics.ca_error(&ca.code_label());
                        }
                        let delay = inner.config.backoff.delay(failures, random_unit());
                        tracing::warn!(error = %Escaped(&e), retry_in_ms = delay.as_millis() as u64, "certificate issuance failed");
                        delay
                    }
                };
        }
        // Wait for the next attempt (only while someone subscribes), an
        // operator rotation, a bundle that no longer verifies the
        // certificate, expiry, or the end of the idle linger.
        loop {
            let expiry = slot.cert.borrow().as_ref().map(|c| {
                Instant::now() + Duration::from_secs((c.not_after - unix_now()).max(0) as u64)
            });
            let linger_end = idle_since.map(|t| t + inner.config.idle_linger);
            tokio::select! {
                _ = tokio::time::sleep_until(next_due), if idle_since.is_none() => break,
                _ = rotate_rx.changed() => {
                    tracing::info!("rotation requested");
                    next_due = Instant::now();
                    break;
                }
                changed = bundle_rx.changed() => {
                    if changed.is_err() { return; }
                    if !held_cert_verifies(&slot, &bundle_rx) {
                        tracing::info!("trust bundle no longer verifies the certificate; re-issuing");
                        // Spread the re-issuance of every identity a little.
                        next_due = Instant::now() + Duration::from_millis((random_unit() * 2_000.0) as u64);
                        break;
                    }
                    if held_cert_needs_reissue(&slot, &bundle_rx) {
                        let at = Instant::now() + reissue_delay(inner.config.reissue_window, random_unit());
                        if at < next_due {
                            tracing::info!(in_ms = (at - Instant::now()).as_millis() as u64, "a new authority is active; re-issuing the certificate within the re-issue window");
                            next_due = at;
                            break;
                        }
                    }
                }
                _ = sleep_until_if(expiry) => {
                    tracing::warn!("certificate expired before it could be renewed; withdrawn");
                    slot.cert.send_replace(None);
                }
                changed = subscribers_rx.changed() => {
                    if changed.is_err() { return; }
                    if *subscribers_rx.borrow_and_update() == 0 {
                        idle_since.get_or_insert_with(Instant::now);
                    } else {
                        idle_since = None;
                    }
                }
                _ = sleep_until_if(linger_end) => {
                    if remove_if_idle(&inner, &id, &slot) { return; }
                    idle_since = None;
                }
            }
        }
    }
}

/// Sleeps until `at`; forever when there is no such time.
async fn sleep_until_if(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

/// Removes the slot if it still has no subscriber (checked under the map
/// lock, so a concurrent subscribe either finds it or creates a new one).
fn remove_if_idle(inner: &Inner, id: &SpiffeId, slot: &Arc<Slot>) -> bool {
    let mut slots = inner.slots.lock().unwrap_or_else(|p| p.into_inner());
    if *slot.subscribers.borrow() != 0 {
        return false;
    }
    if slots.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
        slots.remove(id);
    }
    inner.metrics.certificates_held(slots.len());
    inner.metrics.forget(id.as_str());
    tracing::info!(spiffe_id = %id, "identity no longer requested; certificate dropped");
    true
}

fn held_cert_needs_reissue(slot: &Slot, bundle_rx: &BundleWatch) -> bool {
    let cert = slot.cert.borrow().clone();
    let bundle = bundle_rx.borrow().clone();
    match (cert, bundle) {
        (Some(c), Some(b)) => needs_reissue(&c, &b),
        _ => false,
    }
}

fn held_cert_verifies(slot: &Slot, bundle_rx: &BundleWatch) -> bool {
    let cert = slot.cert.borrow().clone();
    let bundle = bundle_rx.borrow().clone();
    match (cert, bundle) {
        (Some(c), Some(b)) => {
            let mut chain = c.chain.clone();
            chain.extend(b.bundle.roots().iter().cloned());
            verify_chain(&chain, &b.bundle, unix_now().max(0) as u64).is_ok()
        }
        _ => true,
    }
}

/// Waits until a bundle is known; `None` if the identity lost its last
/// subscriber meanwhile and lingered out.
async fn wait_for_bundle(
    bundle_rx: &mut BundleWatch,
    subscribers_rx: &mut watch::Receiver<usize>,
    inner: &Inner,
) -> Option<Arc<BundleState>> {
    loop {
        if let Some(b) = bundle_rx.borrow_and_update().clone() {
            return Some(b);
        }
        tokio::select! {
            changed = bundle_rx.changed() => { changed.ok()?; }
            _ = tokio::time::sleep(inner.config.idle_linger) => {
                if *subscribers_rx.borrow() == 0 { return None; }
            }
        }
    }
}

/// Why one issuance attempt failed.
#[derive(Debug, thiserror::Error)]
enum IssueError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    KeyGen(#[from] crate::svid::KeyGenError),
    #[error("CA answer refused: {0}")]
    Rejected(#[from] crate::svid::ChainRejected),
}

async fn issue(
    inner: &Inner,
    id: &SpiffeId,
    bundle: &BundleState,
) -> Result<WorkloadSvid, IssueError> {
    let pending = PendingKey::generate(Some(id))?;
    inner.csrs_sent.fetch_add(1, Ordering::Relaxed);
    let chain = inner
        .ca
        .sign(SignRequest {
            csr_pem: pending.csr_pem.clone(),
            ttl: inner.config.workload_ttl,
            impersonate: Some(id.clone()),
        })
        .await?;
    // Check against the bundle of the moment (it may have changed while
    // the request was in flight).
    let current = inner.bundle.borrow().clone();
    let bundle = current.as_deref().unwrap_or(bundle);
    Ok(accept_chain(
        &pending,
        Some(id),
        &chain,
        &bundle.bundle,
        unix_now(),
    )?)
}
