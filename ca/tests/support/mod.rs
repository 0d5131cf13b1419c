//! The CA in-process over real TLS and gRPC, shared by the integration tests of this crate.
//! Each test binary uses part of it, hence `dead_code` is allowed here.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use citadel_ca::auth::jwt::{JwksSource, JwtConfig};
use citadel_ca::join_token::{self, validate_grant};
use citadel_ca::serve::{RunningCa, ServeConfig, start_with_store};
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};
use citadel_e2e::unix_now;
use citadel_identity::TrustDomain;
use citadel_identity::lifetime::LifetimePolicy;
use citadel_proto::citadel::v1::trust_bundle_service_client::TrustBundleServiceClient;
use citadel_store::{LedgerFilter, Store};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A workload identity used throughout.
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// A running CA with its store, its JWT issuer and the trust bundle it wrote.
pub struct Harness {
    /// The CA (taken by [`Harness::stop`]).
    pub ca: Option<RunningCa>,
    /// Plays the Kubernetes service-account issuer.
    pub tokens: TokenIssuer,
    /// `bundle.pem` as written at start-up.
    pub bundle_pem: String,
    /// The CA's store (unwrapped).
    pub store: Arc<dyn Store>,
    /// The CA's data directory.
    pub data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A CA with default settings (bundle polled every 100 ms).
    pub async fn start() -> Self {
        Self::start_custom(|s| s, |_| {}).await
    }

    /// Starts with the store wrapped by `wrap` (to inject faults).
    pub async fn start_with(wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>) -> Self {
        Self::start_custom(wrap, |_| {}).await
    }

    /// Starts with the store wrapped by `wrap` and the configuration changed by `configure`.
    pub async fn start_custom(
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, tokens.jwks()).unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let data_dir: PathBuf = dir.path().join("data");
        let mut config = ServeConfig {
            data_dir: data_dir.clone(),
            database_url: None,
            trust_domain: td.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            dns_names: vec!["localhost".into()],
            ip_addresses: vec!["127.0.0.1".parse().unwrap()],
            ca_dir: None,
            lifetime: LifetimePolicy::default(),
            root_lifetime_secs: 10 * 365 * 86_400,
            jwt: Some(JwtConfig {
                issuer: TEST_ISSUER.into(),
                audiences: vec!["istio-ca".into()],
                jwks: JwksSource::File(jwks_path),
                trust_domain: td,
            }),
            bundle_poll_interval: Duration::from_millis(100),
        };
        configure(&mut config);
        let url = config.store_url();
        std::fs::create_dir_all(&data_dir).unwrap();
        let store = citadel_store::connect(&url).await.unwrap();
        let ca = start_with_store(config, wrap(store.clone())).await.unwrap();
        let bundle_pem = std::fs::read_to_string(data_dir.join("bundle.pem")).unwrap();
        Harness {
            ca: Some(ca),
            tokens,
            bundle_pem,
            store,
            data_dir,
            _dir: dir,
        }
    }

    /// The CA's gRPC address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.ca.as_ref().unwrap().grpc_addr
    }

    /// The trust domain of the CA.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    /// Rows in the ledger.
    pub async fn ledger_len(&self) -> usize {
        self.store
            .list_issuances(&LedgerFilter::default())
            .await
            .unwrap()
            .len()
    }

    /// Sends a request that must fail with `code`, and checks that the
    /// ledger did not change.
    pub async fn expect_refusal(
        &self,
        req: tonic::Request<citadel_proto::istio::v1::auth::IstioCertificateRequest>,
        code: Code,
    ) -> String {
        self.expect_refusal_as(req, code, None).await
    }

    /// [`Harness::expect_refusal`] over a connection with a client certificate.
    pub async fn expect_refusal_as(
        &self,
        req: tonic::Request<citadel_proto::istio::v1::auth::IstioCertificateRequest>,
        code: Code,
        client_identity: Option<(&str, &str)>,
    ) -> String {
        let before = self.ledger_len().await;
        let mut client = connect(self.addr(), &self.bundle_pem, client_identity)
            .await
            .unwrap();
        let err = create(&mut client, req)
            .await
            .expect_err("request must be refused");
        assert_eq!(err.code(), code, "unexpected status: {err:?}");
        assert_eq!(
            self.ledger_len().await,
            before,
            "a refused request changed the ledger"
        );
        err.message().to_owned()
    }

    /// Sends a valid CSR with `token`, which must be refused as unauthenticated.
    pub async fn refuse_token(&self, token: &str) -> String {
        let csr = p256_csr(&[]).unwrap();
        self.expect_refusal(
            request(&csr.pem, 0, Some(token), None),
            Code::Unauthenticated,
        )
        .await
    }

    /// Creates a join token for `node` allowing `allow`, as `citadel token create` does.
    pub async fn join_token(&self, node: &str, allow: &[&str]) -> String {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let grant = validate_grant(&self.trust_domain(), node, &allow, 3600).unwrap();
        join_token::create(self.store.as_ref(), &grant, unix_now())
            .await
            .unwrap()
            .0
    }

    /// Joins `node` with a fresh join token: (certificate chain PEM, key PEM) of the node agent.
    pub async fn join(&self, node: &str, allow: &[&str]) -> (String, String) {
        let token = self.join_token(node, allow).await;
        let csr = p256_csr(&[&format!("spiffe://cluster.local/citadel/node/{node}")]).unwrap();
        let mut client = connect(self.addr(), &self.bundle_pem, None).await.unwrap();
        let resp = create(&mut client, request(&csr.pem, 0, Some(&token), None))
            .await
            .unwrap();
        (resp.cert_chain.concat(), csr.key.serialize_pem())
    }

    /// A trust-bundle client, with an optional client certificate (PEM chain, PEM key).
    pub async fn bundle_client(
        &self,
        client_identity: Option<(&str, &str)>,
    ) -> TrustBundleServiceClient<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.bundle_pem))
            .domain_name("localhost");
        if let Some((chain, key)) = client_identity {
            tls = tls.identity(Identity::from_pem(chain, key));
        }
        let channel = Channel::from_shared(format!("https://{}", self.addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        TrustBundleServiceClient::new(channel)
    }

    /// Stops the CA.
    pub async fn stop(mut self) {
        if let Some(ca) = self.ca.take() {
            ca.shutdown().await;
        }
    }
}

/// PEM certificates to DER.
pub fn chain_der(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
        .collect()
}
