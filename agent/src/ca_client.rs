//! Talking to the CA: the [`CertificateAuthority`] seam, and its gRPC
//! implementation over Istio's CSR API with the node's credential.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use citadel_identity::SpiffeId;
use citadel_proto::istio::v1::auth::IstioCertificateRequest;
use citadel_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use citadel_proto::prost_types;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// One certificate request.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// The CSR, PEM.
    pub csr_pem: String,
    /// Requested lifetime.
    pub ttl: Duration,
    /// The workload identity asked for on behalf of a workload
    /// (`ImpersonatedIdentity`); `None` asks for the caller's own identity.
    pub impersonate: Option<SpiffeId>,
}

/// A failed CA call: the gRPC code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CA answered {code:?}: {message}")]
pub struct CaError {
    /// gRPC status code (`Unavailable` for transport failures).
    pub code: tonic::Code,
    /// The CA's message.
    pub message: String,
}

impl CaError {
    /// The code as a short label for metrics.
    pub fn code_label(&self) -> String {
        format!("{:?}", self.code)
    }
}

impl From<tonic::Status> for CaError {
    fn from(s: tonic::Status) -> Self {
        CaError {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// Signs certificate requests. The gRPC client is the real one; tests use
/// [`crate::fake::FakeCa`].
#[async_trait]
pub trait CertificateAuthority: Send + Sync + 'static {
    /// The chain the CA returns (`cert_chain`: PEM entries, leaf first).
    async fn sign(&self, req: SignRequest) -> Result<Vec<String>, CaError>;
}

/// How the agent proves who it is to the CA.
#[derive(Clone)]
pub enum NodeCredential {
    /// A single-use join token, sent as a bearer token.
    JoinToken(String),
    /// The node's certificate chain and key (PEM), used as a TLS client
    /// certificate.
    Certificate {
        /// Chain, PEM, leaf first.
        chain_pem: String,
        /// Key, PEM.
        key_pem: String,
    },
}

impl std::fmt::Debug for NodeCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeCredential::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
            NodeCredential::Certificate { .. } => f.write_str("Certificate(<key redacted>)"),
        }
    }
}

/// Where the CA is and which roots its serving certificate chains to.
#[derive(Debug, Clone)]
pub struct CaEndpoint {
    /// `host:port`.
    pub address: String,
    /// The name to verify the CA's certificate against.
    pub server_name: String,
    /// Trusted roots for the CA's serving certificate, PEM.
    pub roots_pem: String,
}

struct Connection {
    channel: Channel,
    credential: NodeCredential,
}

/// The CA over gRPC. The channel is rebuilt when the node credential or the
/// trusted roots change (both rare: node renewal, root rotation).
pub struct GrpcCa {
    endpoint: RwLock<CaEndpoint>,
    current: RwLock<Arc<Connection>>,
}

impl GrpcCa {
    /// A client for `endpoint` authenticating with `credential`. Connects
    /// lazily: the CA may be down now.
    pub fn new(endpoint: CaEndpoint, credential: NodeCredential) -> Result<GrpcCa, CaError> {
        let channel = build_channel(&endpoint, &credential)?;
        Ok(GrpcCa {
            endpoint: RwLock::new(endpoint),
            current: RwLock::new(Arc::new(Connection {
                channel,
                credential,
            })),
        })
    }

    fn connection(&self) -> Arc<Connection> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Switches to a new node credential (after joining or renewal).
    pub fn set_credential(&self, credential: NodeCredential) -> Result<(), CaError> {
        let endpoint = self
            .endpoint
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let channel = build_channel(&endpoint, &credential)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Connection {
            channel,
            credential,
        });
        Ok(())
    }

    /// Trusts a new set of roots for the CA's serving certificate (after a
    /// trust-bundle change).
    pub fn set_roots(&self, roots_pem: String) -> Result<(), CaError> {
        let endpoint = {
            let mut e = self.endpoint.write().unwrap_or_else(|p| p.into_inner());
            if e.roots_pem == roots_pem {
                return Ok(());
            }
            e.roots_pem = roots_pem;
            e.clone()
        };
        let credential = self.connection().credential.clone();
        let channel = build_channel(&endpoint, &credential)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Connection {
            channel,
            credential,
        });
        Ok(())
    }

    /// The channel of the moment, for other services on the CA.
    pub fn channel(&self) -> Channel {
        self.connection().channel.clone()
    }

    /// Attaches the bearer token, if the credential is one.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) {
        if let NodeCredential::JoinToken(token) = &self.connection().credential
            && let Ok(v) = format!("Bearer {token}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
    }
}

fn build_channel(endpoint: &CaEndpoint, credential: &NodeCredential) -> Result<Channel, CaError> {
    let config_error = |e: tonic::transport::Error| CaError {
        code: tonic::Code::InvalidArgument,
        message: format!("CA client configuration: {e}"),
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&endpoint.roots_pem))
        .domain_name(endpoint.server_name.clone());
    if let NodeCredential::Certificate { chain_pem, key_pem } = credential {
        tls = tls.identity(Identity::from_pem(chain_pem, key_pem));
    }
    let channel = Endpoint::from_shared(format!("https://{}", endpoint.address))
        .map_err(config_error)?
        .tls_config(tls)
        .map_err(config_error)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_lazy();
    Ok(channel)
}

#[async_trait]
impl CertificateAuthority for GrpcCa {
    async fn sign(&self, req: SignRequest) -> Result<Vec<String>, CaError> {
        let metadata = req.impersonate.as_ref().map(|id| prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: req.csr_pem,
            validity_duration: i64::try_from(req.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        self.authorize(&mut request);
        let mut client = IstioCertificateServiceClient::new(self.channel());
        let response = client.create_certificate(request).await?;
        Ok(response.into_inner().cert_chain)
    }
}
