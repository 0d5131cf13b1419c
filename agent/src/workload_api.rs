//! The SPIFFE Workload API (X.509 profile): `FetchX509SVID` and
//! `FetchX509Bundles` streams, full state on every message.

use std::sync::Arc;

use citadel_proto::spiffe_workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use citadel_proto::spiffe_workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::bundle::BundleState;
use crate::server::AgentState;
use crate::svid::WorkloadSvid;

/// The metadata key every Workload API request must carry, with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Rejects a request without `workload.spiffe.io: true` (the spec's guard
/// against a browser or SSRF reaching the endpoint).
pub fn check_security_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request: send metadata \"workload.spiffe.io: true\"",
        )),
    }
}

/// The `FetchX509SVID` message for a certificate and bundle.
pub fn svid_response(cert: &WorkloadSvid, bundle: &BundleState) -> X509svidResponse {
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: cert.spiffe_id.to_string(),
            x509_svid: cert.chain_der(),
            x509_svid_key: cert.key.pkcs8_der().to_vec(),
            bundle: bundle.bundle.to_concatenated_der(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: Default::default(),
    }
}

/// The `FetchX509Bundles` message for a bundle.
pub fn bundles_response(bundle: &BundleState) -> X509BundlesResponse {
    X509BundlesResponse {
        crl: Vec::new(),
        bundles: [(
            bundle.trust_domain_id(),
            bundle.bundle.to_concatenated_der(),
        )]
        .into_iter()
        .collect(),
    }
}

/// The Workload API service of the agent.
pub struct WorkloadApiService {
    state: Arc<AgentState>,
}

impl WorkloadApiService {
    /// The service over the agent's shared state.
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

type ResponseStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const JWT_UNIMPLEMENTED: &str = "JWT-SVIDs are not issued by this agent yet";

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_security_header(&request)?;
        let (peer, workload) = self.state.attest_peer(&request).await?;
        let subscription = self.state.manager.subscribe(&workload.spiffe_id);
        let mut cert_rx = subscription.cert.clone();
        let mut bundle_rx = self.state.bundle.clone();
        let (tx, rx) = mpsc::channel(1);
        let guard = self.state.metrics.stream_opened("workload_api");
        let state = self.state.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _subscription = subscription;
            let mut changes = state.attestation_changed.clone();
            let mut shutdown = state.shutdown.clone();
            let end = state.stream_end(&peer, &workload.spiffe_id, &mut changes, &mut shutdown);
            tokio::pin!(end);
            loop {
                let cert = cert_rx.borrow_and_update().clone();
                let bundle = bundle_rx.borrow_and_update().clone();
                if let (Some(c), Some(b)) = (cert, bundle)
                    && tx.send(Ok(svid_response(&c, &b))).await.is_err()
                {
                    return;
                }
                tokio::select! {
                    r = cert_rx.changed() => if r.is_err() { return },
                    r = bundle_rx.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    why = &mut end => {
                        let _ = tx.send(Err(why.into_status())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_security_header(&request)?;
        let (peer, workload) = self.state.attest_peer(&request).await?;
        let mut bundle_rx = self.state.bundle.clone();
        let (tx, rx) = mpsc::channel(1);
        let guard = self.state.metrics.stream_opened("workload_api");
        let state = self.state.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let mut changes = state.attestation_changed.clone();
            let mut shutdown = state.shutdown.clone();
            let end = state.stream_end(&peer, &workload.spiffe_id, &mut changes, &mut shutdown);
            tokio::pin!(end);
            loop {
                let bundle = bundle_rx.borrow_and_update().clone();
                if let Some(b) = bundle
                    && tx.send(Ok(bundles_response(&b))).await.is_err()
                {
                    return;
                }
                tokio::select! {
                    r = bundle_rx.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    why = &mut end => {
                        let _ = tx.send(Err(why.into_status())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_security_header(&request)?;
        Err(Status::unimplemented(JWT_UNIMPLEMENTED))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_security_header(&request)?;
        Err(Status::unimplemented(JWT_UNIMPLEMENTED))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_security_header(&request)?;
        Err(Status::unimplemented(JWT_UNIMPLEMENTED))
    }
}
