//! The SPIFFE Workload API (X.509 profile): `FetchX509SVID` and
//! `FetchX509Bundles` streams, full state on every message.

use std::sync::Arc;

use citadel_proto::spiffe_workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use citadel_proto::spiffe_workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use tonic::{Request, Response, Status};

use citadel_identity::SpiffeId;

use crate::attest::PeerInfo;
use crate::bundle::BundleState;
use crate::manager::{CertSubscription, cert_changed};
use crate::response_stream::{ResponseStream, response_channel};
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
            x509_svid: cert.chain_der().to_vec(),
            x509_svid_key: cert.key.pkcs8_der().to_vec(),
            bundle: bundle.der().to_vec(),
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
        bundles: [(bundle.trust_domain_id().to_owned(), bundle.der().to_vec())]
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
        Ok(Response::new(full_state_stream(
            self.state.clone(),
            peer,
            workload.spiffe_id,
            Some(subscription),
            |cert, bundle| cert.map(|c| svid_response(c, bundle)),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_security_header(&request)?;
        let (peer, workload) = self.state.attest_peer(&request).await?;
        Ok(Response::new(full_state_stream(
            self.state.clone(),
            peer,
            workload.spiffe_id,
            None,
            |_, bundle| Some(bundles_response(bundle)),
        )))
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

/// A Workload API stream: the message `render` makes of the certificate (of
/// `subscription`, when given) and the bundle, now and after every change,
/// until the client leaves, the agent stops, or the caller loses its
/// identity. One message in flight at most; changes meanwhile collapse into
/// the latest state.
fn full_state_stream<T: Send + 'static>(
    state: Arc<AgentState>,
    peer: PeerInfo,
    own: SpiffeId,
    subscription: Option<CertSubscription>,
    render: impl Fn(Option<&WorkloadSvid>, &BundleState) -> Option<T> + Send + 'static,
) -> ResponseStream<T> {
    let (tx, rx) = response_channel();
    let guard = state.metrics.stream_opened("workload_api");
    // The bundle must reach this stream before the agent acknowledges it to the CA.
    let consumer = state.propagation.register();
    tokio::spawn(async move {
        let _guard = guard;
        let mut cert_rx = subscription.as_ref().map(|s| s.cert.clone());
        let mut bundle_rx = state.bundle.clone();
        let mut changes = state.attestation_changed.clone();
        let mut shutdown = state.shutdown.clone();
        let end = state.stream_end(&peer, &own, &mut changes, &mut shutdown);
        tokio::pin!(end);
        loop {
            let cert = cert_rx.as_mut().and_then(|c| c.borrow_and_update().clone());
            let bundle = bundle_rx.borrow_and_update().clone();
            if let Some(b) = bundle.as_deref()
                && let Some(msg) = render(cert.as_deref(), b)
            {
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                consumer.confirm(b.sequence);
            }
            tokio::select! {
                r = cert_changed(&mut cert_rx) => if r.is_err() { return },
                r = bundle_rx.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
                why = &mut end => {
                    let _ = tx.send(Err(why.into_status())).await;
                    return;
                }
            }
        }
    });
    rx
}
