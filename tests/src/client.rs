//! A client of Istio's CSR API, speaking exactly the protocol istio-agent
//! and ztunnel speak: gRPC over TLS, bearer token, `clusterid` header.

use std::net::SocketAddr;

use citadel_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use citadel_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use citadel_proto::prost_types;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Connects to the CA at `addr`, trusting the roots in `bundle_pem`, with an
/// optional client certificate (PEM chain, PEM key).
pub async fn connect(
    addr: SocketAddr,
    bundle_pem: &str,
    client_identity: Option<(&str, &str)>,
) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle_pem))
        .domain_name("localhost");
    if let Some((chain, key)) = client_identity {
        tls = tls.identity(Identity::from_pem(chain, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IstioCertificateServiceClient::new(channel).max_decoding_message_size(1 << 20))
}

/// Builds a request the way istio-agent does.
pub fn request(
    csr_pem: &str,
    ttl_secs: i64,
    token: Option<&str>,
    impersonate: Option<&str>,
) -> tonic::Request<IstioCertificateRequest> {
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_owned())),
            },
        )]
        .into_iter()
        .collect(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem.to_owned(),
        validity_duration: ttl_secs,
        metadata,
    });
    if let Some(Ok(v)) = token.map(|t| format!("Bearer {t}").parse()) {
        req.metadata_mut().insert("authorization", v);
    }
    req.metadata_mut().insert(
        "clusterid",
        tonic::metadata::MetadataValue::from_static("Kubernetes"),
    );
    req
}

/// Sends one request.
pub async fn create(
    client: &mut IstioCertificateServiceClient<Channel>,
    req: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, tonic::Status> {
    client.create_certificate(req).await.map(|r| r.into_inner())
}
