//! The plain-HTTP operations port: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use citadel_store::HealthStore;
use tokio::sync::watch;

use crate::authority::Authority;
use crate::metrics::CaMetrics;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct OpsState {
    /// The metrics registry.
    pub metrics: Arc<CaMetrics>,
    /// The store, pinged by `/readyz`.
    pub store: Arc<dyn HealthStore>,
    /// The active authority, for the expiry gauges.
    pub authority: watch::Receiver<Arc<Authority>>,
}

/// The router of the operations port.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let now = crate::clock::unix_now();
    let authority = state.authority.borrow().clone();
    state
        .metrics
        .root_expiry_seconds
        .set(authority.root_not_after() - now);
    state
        .metrics
        .signer_expiry_seconds
        .set(authority.window().not_after - now);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store: {e}\n"),
        ),
    }
}
