//! The trust bundle the agent serves: received from the CA's
//! `citadel.v1.TrustBundleService` stream, applied, then acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use citadel_identity::{Backoff, Escaped, TrustBundle, TrustDomain};
use citadel_proto::citadel::v1::trust_bundle_service_client::TrustBundleServiceClient;
use citadel_proto::citadel::v1::{TrustBundleAck, TrustBundleUpdate};
use futures::StreamExt;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

use crate::ca_client::GrpcCa;
use crate::metrics::AgentMetrics;
use crate::propagation::Propagation;
use crate::random_unit;

/// A trust bundle and the CA's sequence number for it, with the forms it is
/// served in made once per bundle (not once per stream and push).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleState {
    /// The roots.
    pub bundle: TrustBundle,
    /// The CA's sequence; increases on every change.
    pub sequence: u64,
    /// The authority that signs now (empty: not said). Certificates signed by another
    /// authority are re-issued over the re-issue window.
    pub active_authority: String,
    pem: String,
    der: Vec<u8>,
    trust_domain_id: String,
}

impl BundleState {
    /// `bundle` at `sequence`, with no active authority named.
    pub fn new(bundle: TrustBundle, sequence: u64) -> BundleState {
        Self::with_active(bundle, sequence, String::new())
    }

    /// `bundle` at `sequence`, `active_authority` signing.
    pub fn with_active(
        bundle: TrustBundle,
        sequence: u64,
        active_authority: String,
    ) -> BundleState {
        BundleState {
            active_authority,
            pem: bundle.to_pem(),
            der: bundle.to_concatenated_der(),
            trust_domain_id: bundle.trust_domain().id().to_string(),
            bundle,
            sequence,
        }
    }

    /// The roots as PEM (SDS `ROOTCA`).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The roots as concatenated DER (Workload API).
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The bundle as the Workload API's map key: the trust domain's SPIFFE
    /// ID (`spiffe://<td>`).
    pub fn trust_domain_id(&self) -> &str {
        &self.trust_domain_id
    }
}

/// The bundle of the moment; `None` until the CA has sent one.
pub type BundleWatch = watch::Receiver<Option<Arc<BundleState>>>;

/// Why an update was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleUpdateError {
    /// The trust domain is not a valid one.
    #[error("update names an invalid trust domain {0:?}")]
    TrustDomain(String),
    /// The roots do not form a bundle.
    #[error("update's roots are unusable: {0}")]
    Roots(String),
    /// The update is older than the bundle in force.
    #[error("update sequence {got} is not newer than the applied {applied}")]
    Stale {
        /// Received.
        got: u64,
        /// Applied.
        applied: u64,
    },
}

/// Decides whether to apply `update` on top of `current` (pure).
pub fn apply_update(
    current: Option<&BundleState>,
    update: &TrustBundleUpdate,
) -> Result<BundleState, BundleUpdateError> {
    if let Some(cur) = current
        && update.sequence < cur.sequence
    {
        return Err(BundleUpdateError::Stale {
            got: update.sequence,
            applied: cur.sequence,
        });
    }
    let td = TrustDomain::new(&update.trust_domain)
        .map_err(|_| BundleUpdateError::TrustDomain(update.trust_domain.clone()))?;
    let roots = update
        .x509_authorities
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let bundle =
        TrustBundle::new(td, roots).map_err(|e| BundleUpdateError::Roots(e.to_string()))?;
    Ok(BundleState::with_active(
        bundle,
        update.sequence,
        update.active_authority_id.clone(),
    ))
}

/// The file in the agent's data directory holding the last bundle it
/// applied (PEM), trusted on the next start beside `--ca-bundle`: a root
/// rotation that happened while the agent was down does not strand it.
pub const SAVED_BUNDLE_FILE: &str = "bundle.pem";

/// The roots of the bundle saved in `data_dir`, if any (PEM).
pub fn load_saved_roots(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(SAVED_BUNDLE_FILE)).ok()?;
    text.contains("-----BEGIN CERTIFICATE-----").then_some(text)
}

/// Saves `state`'s roots as [`SAVED_BUNDLE_FILE`] in `data_dir`, atomically.
pub fn save_roots(data_dir: &Path, state: &BundleState) -> anyhow::Result<()> {
    crate::files::ensure_private_dir(data_dir)?;
    crate::files::write_atomic(
        &data_dir.join(SAVED_BUNDLE_FILE),
        state.pem().as_bytes(),
        0o644,
    )
}

/// How often the agent repeats its latest acknowledgement, so the CA sees it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `tx` up to date from the CA's bundle stream, reconnecting with
/// backoff; also points the CA client at the new roots, and saves each new
/// bundle in `data_dir`. Acknowledges a sequence only once it has reached
/// every open consumer ([`Propagation`]), and repeats the latest
/// acknowledgement every [`HEARTBEAT_INTERVAL`].
pub async fn follow_ca_bundle(
    ca: Arc<GrpcCa>,
    tx: watch::Sender<Option<Arc<BundleState>>>,
    metrics: AgentMetrics,
    data_dir: PathBuf,
    propagation: Propagation,
) {
    let backoff = Backoff::default();
    let mut failures = 0u32;
    let mut acked = 0u64;
    loop {
        let mut follower = Follower {
            ca: &ca,
            tx: &tx,
            metrics: &metrics,
            data_dir: &data_dir,
            propagation: &propagation,
            acked: &mut acked,
        };
        match follower.follow_once(&mut failures).await {
            Ok(()) => tracing::info!("trust bundle stream ended; reconnecting"),
            Err(status) => {
                metrics.ca_error(&format!("{:?}", status.code()));
                tracing::warn!(code = ?status.code(), message = %Escaped(status.message()), "trust bundle stream failed");
            }
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff.delay(failures, random_unit())).await;
    }
}

struct Follower<'a> {
    ca: &'a GrpcCa,
    tx: &'a watch::Sender<Option<Arc<BundleState>>>,
    metrics: &'a AgentMetrics,
    data_dir: &'a Path,
    propagation: &'a Propagation,
    /// The highest sequence acknowledged to the CA (kept across reconnects).
    acked: &'a mut u64,
}

impl Follower<'_> {
    async fn follow_once(&mut self, failures: &mut u32) -> Result<(), tonic::Status> {
        let (ack_tx, ack_rx) = mpsc::channel::<TrustBundleAck>(4);
        // The first message says what has propagated, so the HTTP/2 stream opens at once.
        let _ = ack_tx.try_send(TrustBundleAck {
            applied_sequence: *self.acked,
        });
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(ack_rx));
        self.ca.authorize(&mut request)?;
        let mut client = TrustBundleServiceClient::new(self.ca.channel());
        let mut updates = client.watch_trust_bundle(request).await?.into_inner();
        let mut delivered = self.propagation.subscribe();
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            let send_now = tokio::select! {
                update = updates.next() => {
                    let Some(update) = update else { return Ok(()) };
                    let update = update?;
                    *failures = 0;
                    self.apply(&update);
                    false
                }
                changed = delivered.changed() => {
                    if changed.is_err() { return Ok(()); }
                    false
                }
                _ = heartbeat.tick() => true,
            };
            let applied = self.tx.borrow().as_ref().map_or(0, |b| b.sequence);
            let reached = self.propagation.propagated(applied);
            if reached > *self.acked {
                tracing::info!(
                    sequence = reached,
                    "trust bundle reached every consumer; acknowledging"
                );
                *self.acked = reached;
            } else if !send_now {
                continue;
            }
            let ack = TrustBundleAck {
                applied_sequence: *self.acked,
            };
            if ack_tx.send(ack).await.is_err() {
                return Ok(());
            }
        }
    }

    fn apply(&self, update: &TrustBundleUpdate) {
        let current = self.tx.borrow().clone();
        match apply_update(current.as_deref(), update) {
            Ok(state) => {
                if current.as_deref() == Some(&state) {
                    return;
                }
                tracing::info!(
                    sequence = state.sequence,
                    roots = state.bundle.roots().len(),
                    active_authority = %Escaped(&state.active_authority),
                    "applied trust bundle"
                );
                if let Err(e) = self.ca.set_roots(state.pem().to_owned()) {
                    tracing::warn!(error = %e, "cannot use the new roots for the CA connection");
                }
                if let Err(e) = save_roots(self.data_dir, &state) {
                    tracing::warn!(error = %format!("{e:#}"), "cannot save the trust bundle; a restart will rely on --ca-bundle");
                }
                self.metrics.bundle_sequence(state.sequence);
                self.tx.send_replace(Some(Arc::new(state)));
            }
            Err(e) => {
                tracing::error!(error = %Escaped(&e), "refusing trust bundle update");
            }
        }
    }
}
