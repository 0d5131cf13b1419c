//! Envoy's Secret Discovery Service (v3, state of the world).
//!
//! Names served: `default` (the caller's certificate and key), `ROOTCA` (the
//! trust bundle) and the caller's own SPIFFE ID (an alias of `default`). The
//! xDS rules are decided by [`SdsSession`], a pure state machine; the
//! service around it only moves messages.

use std::collections::BTreeSet;
use std::sync::Arc;

use citadel_identity::{Escaped, SpiffeId};
use citadel_proto::SECRET_TYPE_URL;
use citadel_proto::envoy::config::core::v3::{DataSource, data_source};
use citadel_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use citadel_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use citadel_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use citadel_proto::prost_types::Any;
use futures::StreamExt;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::attest::PeerInfo;
use crate::bundle::BundleState;
use crate::manager::cert_changed;
use crate::propagation::Consumer;
use crate::response_stream::{ResponseSender, ResponseStream, response_channel};
use crate::server::AgentState;
use crate::svid::WorkloadSvid;

/// The resource name of the caller's certificate and key.
pub const DEFAULT_NAME: &str = "default";
/// The resource name of the trust bundle.
pub const ROOTCA_NAME: &str = "ROOTCA";

/// What to do with a request on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the current state of every subscribed name (as soon as it is
    /// available).
    Respond,
    /// Nothing to send: an ACK, a NACK, or a stale request.
    Ignore,
}

/// The xDS state of one SotW stream.
#[derive(Debug, Default, Clone)]
pub struct SdsSession {
    names: BTreeSet<String>,
    last_nonce: Option<String>,
    nonces_issued: u64,
}

impl SdsSession {
    /// Applies a request and decides whether it needs an answer:
    /// - a nonce other than the last one sent is stale: ignored entirely;
    /// - the first request (no nonce) is answered;
    /// - a request adding names is answered;
    /// - otherwise it ACKs or NACKs the last response: no answer, so a NACK
    ///   never starts a loop (the next change will be pushed).
    pub fn on_request(&mut self, names: &[String], nonce: &str) -> Verdict {
        if !nonce.is_empty() && self.last_nonce.as_deref() != Some(nonce) {
            return Verdict::Ignore;
        }
        let new: BTreeSet<String> = names.iter().cloned().collect();
        let added = new.difference(&self.names).next().is_some();
        self.names = new;
        if nonce.is_empty() || added {
            Verdict::Respond
        } else {
            Verdict::Ignore
        }
    }

    /// The subscribed names.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// Whether any subscribed name needs the caller's certificate.
    pub fn wants_certificate(&self, own_id: &SpiffeId) -> bool {
        self.names
            .iter()
            .any(|n| n == DEFAULT_NAME || n == own_id.as_str())
    }

    /// Whether `ROOTCA` is subscribed.
    pub fn wants_bundle(&self) -> bool {
        self.names.contains(ROOTCA_NAME)
    }

    /// A fresh nonce for the next response; it becomes the only current one.
    pub fn next_nonce(&mut self) -> String {
        self.nonces_issued += 1;
        let nonce = self.nonces_issued.to_string();
        self.last_nonce = Some(nonce.clone());
        nonce
    }
}

/// Checks that `name` is one the caller may ask for.
pub fn check_entitlement(name: &str, own_id: &SpiffeId) -> Result<(), Status> {
    if name == DEFAULT_NAME || name == ROOTCA_NAME || name == own_id.as_str() {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{own_id} may not fetch secret {name:?}: only \"default\", \"ROOTCA\" and its own SPIFFE ID"
        )))
    }
}

/// The response for `names`, or `None` while something they need is not
/// available yet.
pub fn build_response(
    names: &BTreeSet<String>,
    own_id: &SpiffeId,
    cert: Option<&WorkloadSvid>,
    bundle: Option<&BundleState>,
    nonce: String,
) -> Option<DiscoveryResponse> {
    let mut resources = Vec::with_capacity(names.len());
    let mut version = Vec::new();
    for name in names {
        let secret = if name == ROOTCA_NAME {
            let b = bundle?;
            version.push(format!("b{}", b.sequence));
            Secret {
                name: name.clone(),
                r#type: Some(secret::Type::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: Some(inline(b.pem().as_bytes().to_vec())),
                        ..Default::default()
                    },
                )),
            }
        } else if name == DEFAULT_NAME || name == own_id.as_str() {
            let c = cert?;
            version.push(format!("c{}", c.serial_hex));
            Secret {
                name: name.clone(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: Some(inline(c.chain_pem().as_bytes().to_vec())),
                    private_key: Some(inline(c.key.pem().as_bytes().to_vec())),
                    ..Default::default()
                })),
            }
        } else {
            continue;
        };
        resources.push(Any {
            type_url: SECRET_TYPE_URL.to_owned(),
            value: secret.encode_to_vec(),
        });
    }
    version.dedup();
    Some(DiscoveryResponse {
        version_info: version.join("-"),
        resources,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce,
        ..Default::default()
    })
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        watched_directory: None,
    }
}

/// Refuses a request for another resource type than secrets.
pub fn check_type_url(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "this server serves only {SECRET_TYPE_URL}, not {type_url}"
        )))
    }
}

/// The SDS service of the agent.
pub struct SdsService {
    state: Arc<AgentState>,
}

impl SdsService {
    /// The service over the agent's shared state.
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "incremental SDS is not served; use StreamSecrets (state of the world)",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (peer, workload) = self.state.attest_peer(&request).await?;
        let inbound = request.into_inner();
        // One message in flight at most: a client that does not read holds
        // up only its own stream, and changes meanwhile collapse into the
        // latest state (watch channels keep only the newest value).
        let (tx, rx) = response_channel();
        let state = self.state.clone();
        let guard = state.metrics.stream_opened("sds");
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(status) = serve_stream(&state, &peer, workload.spiffe_id, inbound, &tx).await
            {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(rx))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let workload = self.state.attest(&request).await?;
        let req = request.into_inner();
        check_type_url(&req.type_url)?;
        for name in &req.resource_names {
            check_entitlement(name, &workload.spiffe_id)?;
        }
        let mut session = SdsSession::default();
        session.on_request(&req.resource_names, "");
        let sub = session
            .wants_certificate(&workload.spiffe_id)
            .then(|| self.state.manager.subscribe(&workload.spiffe_id));
        let mut bundle_rx = self.state.bundle.clone();
        let mut cert_rx = sub.as_ref().map(|s| s.cert.clone());
        let wait = async {
            loop {
                let cert = cert_rx.as_mut().and_then(|c| c.borrow_and_update().clone());
                let bundle = bundle_rx.borrow_and_update().clone();
                if let Some(resp) = build_response(
                    session.names(),
                    &workload.spiffe_id,
                    cert.as_deref(),
                    bundle.as_deref(),
                    String::new(),
                ) {
                    return Ok(resp);
                }
                tokio::select! {
                    r = cert_changed(&mut cert_rx) => r.map_err(|_| Status::unavailable("agent shutting down"))?,
                    r = bundle_rx.changed() => r.map_err(|_| Status::unavailable("agent shutting down"))?,
                }
            }
        };
        match tokio::time::timeout(self.state.fetch_timeout, wait).await {
            Ok(result) => result.map(Response::new),
            Err(_) => Err(Status::unavailable(
                "the certificate is not available yet; the CA may be unreachable",
            )),
        }
    }
}

/// The last response sent on a stream: what an ACK of it must repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Its nonce.
    pub nonce: String,
    /// Its `version_info`.
    pub version: String,
    /// The bundle sequence it carried in `ROOTCA`, if it did.
    pub bundle_sequence: Option<u64>,
}

impl Sent {
    /// The bundle sequence `req` acknowledges (pure): only an xDS ACK of this response
    /// (its nonce and version, no error detail) carrying a bundle confirms one.
    pub fn acked_bundle(&self, req: &DiscoveryRequest) -> Option<u64> {
        let ack = req.error_detail.is_none()
            && req.response_nonce == self.nonce
            && req.version_info == self.version;
        if ack { self.bundle_sequence } else { None }
    }
}

async fn serve_stream(
    state: &AgentState,
    peer: &PeerInfo,
    own_id: SpiffeId,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: &ResponseSender<DiscoveryResponse>,
) -> Result<(), Status> {
    let mut session = SdsSession::default();
    let mut subscription = None;
    let mut cert_rx: Option<crate::manager::CertWatch> = None;
    // While the stream asks for ROOTCA it is a consumer the bundle must reach before the
    // agent acknowledges it; it confirms a sequence when the client ACKs the response
    // that carried it.
    let mut bundle_consumer: Option<Consumer> = None;
    let mut sent: Option<Sent> = None;
    let mut bundle_rx = state.bundle.clone();
    let mut pending = false;
    let mut last_version: Option<String> = None;
    // A client that half-closes still gets pushes until it goes away.
    let mut inbound_open = true;
    let mut changes = state.attestation_changed.clone();
    let mut shutdown = state.shutdown.clone();
    let end = state.stream_end(peer, &own_id, &mut changes, &mut shutdown);
    tokio::pin!(end);
    loop {
        tokio::select! {
            why = &mut end => return Err(why.into_status()),
            _ = tx.closed() => return Ok(()),
            msg = inbound.next(), if inbound_open => {
                let req = match msg {
                    None => {
                        inbound_open = false;
                        continue;
                    }
                    Some(Err(status)) => {
                        tracing::debug!(status = %Escaped(&status), spiffe_id = %own_id, "SDS stream closed by the client");
                        return Ok(());
                    }
                    Some(Ok(req)) => req,
                };
                check_type_url(&req.type_url)?;
                if let Some(err) = &req.error_detail {
                    tracing::warn!(spiffe_id = %own_id, nonce = %Escaped(&req.response_nonce), message = %Escaped(&err.message), "Envoy rejected a secret (NACK)");
                } else if let (Some(sequence), Some(consumer)) = (
                    sent.as_ref().and_then(|s| s.acked_bundle(&req)),
                    bundle_consumer.as_ref(),
                ) {
                    consumer.confirm(sequence);
                }
                match session.on_request(&req.resource_names, &req.response_nonce) {
                    Verdict::Respond => {
                        for name in session.names() {
                            check_entitlement(name, &own_id)?;
                        }
                        pending = true;
                        // A request that must be answered is answered even
                        // if nothing changed since the last response.
                        last_version = None;
                    }
                    Verdict::Ignore => {}
                }
                if !session.wants_bundle() {
                    bundle_consumer = None;
                } else if bundle_consumer.is_none() {
                    bundle_consumer = Some(state.propagation.register());
                }
                if session.wants_certificate(&own_id) && subscription.is_none() {
                    let sub = state.manager.subscribe(&own_id);
                    cert_rx = Some(sub.cert.clone());
                    subscription = Some(sub);
                }
            }
            r = cert_changed(&mut cert_rx) => {
                if r.is_err() { return Ok(()); }
                pending |= session.wants_certificate(&own_id);
            }
            r = bundle_rx.changed() => {
                if r.is_err() { return Ok(()); }
                pending |= session.wants_bundle();
            }
        }
        if !pending {
            continue;
        }
        let cert = cert_rx.as_mut().and_then(|c| c.borrow_and_update().clone());
        let bundle = bundle_rx.borrow_and_update().clone();
        let Some(mut response) = build_response(
            session.names(),
            &own_id,
            cert.as_deref(),
            bundle.as_deref(),
            String::new(),
        ) else {
            continue; // wait until what the names need is available
        };
        pending = false;
        if last_version.as_deref() == Some(response.version_info.as_str()) {
            continue; // nothing new for this stream's names
        }
        response.nonce = session.next_nonce();
        last_version = Some(response.version_info.clone());
        sent = Some(Sent {
            nonce: response.nonce.clone(),
            version: response.version_info.clone(),
            bundle_sequence: bundle
                .as_deref()
                .filter(|_| session.wants_bundle())
                .map(|b| b.sequence),
        });
        tracing::debug!(spiffe_id = %own_id, version = %response.version_info, nonce = %response.nonce, "pushing secrets");
        if tx.send(Ok(response)).await.is_err() {
            return Ok(()); // the client went away
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn first_request_is_answered() {
        let mut s = SdsSession::default();
        assert_eq!(s.on_request(&names(&["default"]), ""), Verdict::Respond);
    }

    #[test]
    fn ack_of_current_nonce_is_not_answered() {
        let mut s = SdsSession::default();
        s.on_request(&names(&["default"]), "");
        let n = s.next_nonce();
        assert_eq!(s.on_request(&names(&["default"]), &n), Verdict::Ignore);
    }

    #[test]
    fn nack_is_never_answered_again() {
        let mut s = SdsSession::default();
        s.on_request(&names(&["default"]), "");
        let n = s.next_nonce();
        // A NACK carries the same names and the current nonce.
        assert_eq!(s.on_request(&names(&["default"]), &n), Verdict::Ignore);
        assert_eq!(s.on_request(&names(&["default"]), &n), Verdict::Ignore);
    }

    #[test]
    fn stale_nonce_is_ignored_even_with_new_names() {
        let mut s = SdsSession::default();
        s.on_request(&names(&["default"]), "");
        let old = s.next_nonce();
        let _new = s.next_nonce();
        assert_eq!(
            s.on_request(&names(&["default", "ROOTCA"]), &old),
            Verdict::Ignore
        );
        assert!(!s.wants_bundle());
    }

    #[test]
    fn new_names_are_answered_at_once() {
        let mut s = SdsSession::default();
        s.on_request(&names(&["default"]), "");
        let n = s.next_nonce();
        assert_eq!(
            s.on_request(&names(&["default", "ROOTCA"]), &n),
            Verdict::Respond
        );
        assert!(s.wants_bundle());
    }

    #[test]
    fn dropping_names_is_not_answered() {
        let mut s = SdsSession::default();
        s.on_request(&names(&["default", "ROOTCA"]), "");
        let n = s.next_nonce();
        assert_eq!(s.on_request(&names(&["default"]), &n), Verdict::Ignore);
        assert!(!s.wants_bundle());
    }

    #[test]
    fn own_spiffe_id_is_an_alias_of_default() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let mut s = SdsSession::default();
        s.on_request(&names(&["spiffe://td/ns/a/sa/b"]), "");
        assert!(s.wants_certificate(&id));
        assert!(check_entitlement("spiffe://td/ns/a/sa/b", &id).is_ok());
    }

    #[test]
    fn rejects_another_workloads_spiffe_id_as_resource_name() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let err = check_entitlement("spiffe://td/ns/a/sa/other", &id).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            check_entitlement("file-root:/etc/ssl/ca.pem", &id)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn no_response_until_the_certificate_exists() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let set: BTreeSet<String> = ["default".to_string()].into();
        assert!(build_response(&set, &id, None, None, "1".into()).is_none());
    }

    fn req(version: &str, nonce: &str, error: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            response_nonce: nonce.into(),
            error_detail: error.then(|| citadel_proto::google::rpc::Status {
                code: 3,
                message: "bad".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_an_ack_of_the_response_that_carried_the_bundle_confirms_it() {
        let sent = Sent {
            nonce: "4".into(),
            version: "b7".into(),
            bundle_sequence: Some(7),
        };
        assert_eq!(sent.acked_bundle(&req("b7", "4", false)), Some(7));
        // A NACK keeps the previous version and carries an error.
        assert_eq!(sent.acked_bundle(&req("b6", "4", true)), None);
        assert_eq!(sent.acked_bundle(&req("b7", "4", true)), None);
        // A stale nonce, or another version, is not this response's ACK.
        assert_eq!(sent.acked_bundle(&req("b7", "3", false)), None);
        assert_eq!(sent.acked_bundle(&req("b6", "4", false)), None);
        let cert_only = Sent {
            bundle_sequence: None,
            ..sent
        };
        assert_eq!(cert_only.acked_bundle(&req("b7", "4", false)), None);
    }

    #[test]
    fn rejects_foreign_type_url() {
        assert_eq!(
            check_type_url("type.googleapis.com/envoy.config.cluster.v3.Cluster")
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        assert!(check_type_url("").is_ok());
        assert!(check_type_url(SECRET_TYPE_URL).is_ok());
    }
}
