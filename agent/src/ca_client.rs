//! Talking to the CA: the [`CertificateAuthority`] seam, and its gRPC
//! implementation over Istio's CSR API with the node's credential.

use std::path::{Path, PathBuf};
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
/// `fake::FakeCa` (feature `test-util`).
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
    /// A projected service-account token file (Kubernetes), sent as a
    /// bearer token and read again for every request: the kubelet replaces
    /// the file before the token expires, so a token is never cached here.
    /// Its audience is the token's business (the pod spec asks for
    /// `istio-ca`); the agent never parses or logs it.
    TokenFile(PathBuf),
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
            NodeCredential::TokenFile(path) => write!(f, "TokenFile({})", path.display()),
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

    /// Attaches the bearer token, if the credential is one. A token file
    /// that cannot be read (or holds no usable token) fails the request
    /// before it is sent: sending it without a token would only earn an
    /// `Unauthenticated` that hides the cause.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), tonic::Status> {
        let token = match &self.connection().credential {
            NodeCredential::JoinToken(token) => token.clone(),
            NodeCredential::TokenFile(path) => read_token_file(path)?,
            NodeCredential::Certificate { .. } => return Ok(()),
        };
        let value = format!("Bearer {token}").parse().map_err(|_| {
            tonic::Status::failed_precondition(
                "the node credential is not a valid bearer token (not shown)",
            )
        })?;
        req.metadata_mut().insert("authorization", value);
        Ok(())
    }
}

/// The most a token file may hold; projected tokens are about 1 KiB.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Reads a token file now. Synchronous on purpose: the file is a small one
/// on the kubelet's tmpfs, and reading it costs less than a task hop. The
/// error names the file and the cause, never the contents.
pub fn read_token_file(path: &Path) -> Result<String, tonic::Status> {
    use std::io::Read;
    let fail = |why: String| {
        tonic::Status::failed_precondition(format!("token file {}: {why}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(fail(format!("larger than {MAX_TOKEN_FILE_BYTES} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|_| fail("not UTF-8".to_owned()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(fail("empty".to_owned()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(fail(
            "not a single token (whitespace or control characters inside)".to_owned(),
        ));
    }
    Ok(token.to_owned())
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
        self.authorize(&mut request)?;
        let mut client = IstioCertificateServiceClient::new(self.channel());
        let response = client.create_certificate(request).await?;
        Ok(response.into_inner().cert_chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(credential: NodeCredential) -> GrpcCa {
        GrpcCa::new(
            CaEndpoint {
                address: "127.0.0.1:1".into(),
                server_name: "localhost".into(),
                roots_pem: String::new(),
            },
            credential,
        )
        .unwrap()
    }

    fn bearer(ca: &GrpcCa) -> Result<Option<String>, tonic::Status> {
        let mut req = tonic::Request::new(());
        ca.authorize(&mut req)?;
        Ok(req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()))
    }

    #[tokio::test]
    async fn token_file_is_read_again_for_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("citadel-token");
        std::fs::write(&path, "first.token.jwt").unwrap();
        let ca = client(NodeCredential::TokenFile(path.clone()));
        assert_eq!(
            bearer(&ca).unwrap().as_deref(),
            Some("Bearer first.token.jwt")
        );
        // The kubelet swaps the file (a symlink flip in reality) before expiry.
        std::fs::write(&path, "second.token.jwt\n").unwrap();
        assert_eq!(
            bearer(&ca).unwrap().as_deref(),
            Some("Bearer second.token.jwt")
        );
    }

    #[tokio::test]
    async fn unreadable_token_file_fails_the_request_instead_of_sending_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing");
        let ca = client(NodeCredential::TokenFile(path.clone()));
        let err = bearer(&ca).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("missing"), "{}", err.message());
        std::fs::write(&path, "  \n").unwrap();
        assert!(bearer(&ca).unwrap_err().message().contains("empty"));
    }

    #[tokio::test]
    async fn token_file_contents_never_appear_in_errors_or_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "secret-part one\tsecret-part-two").unwrap();
        let credential = NodeCredential::TokenFile(path.clone());
        assert!(!format!("{credential:?}").contains("secret"));
        let err = bearer(&client(credential)).unwrap_err();
        assert!(!err.message().contains("secret"), "{}", err.message());
        std::fs::write(&path, vec![b'a'; 70 * 1024]).unwrap();
        let err = read_token_file(&path).unwrap_err();
        assert!(err.message().contains("larger than"), "{}", err.message());
    }

    #[tokio::test]
    async fn switching_credentials_changes_what_is_sent() {
        let ca = client(NodeCredential::JoinToken("join".into()));
        assert_eq!(bearer(&ca).unwrap().as_deref(), Some("Bearer join"));
        ca.set_credential(NodeCredential::TokenFile("/nonexistent/t".into()))
            .unwrap();
        assert!(bearer(&ca).is_err());
    }
}
