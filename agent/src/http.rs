//! `/metrics`, `/healthz` and `/readyz`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::bundle::BundleWatch;
use crate::manager::CertManager;
use crate::metrics::AgentMetrics;
use crate::unix_now;

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to expose.
    pub metrics: AgentMetrics,
    /// For expiry gauges.
    pub manager: CertManager,
    /// Ready once a bundle is loaded.
    pub bundle: BundleWatch,
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    s.manager.refresh_expiry_metrics(unix_now());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.bundle.borrow().as_ref() {
        Some(b) => (
            StatusCode::OK,
            format!("ready: trust bundle sequence {}\n", b.sequence),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no trust bundle from the CA yet\n".to_owned(),
        ),
    }
}
