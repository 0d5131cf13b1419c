//! The CA in-process over real TLS and gRPC, shared by the integration tests of this crate.
//! Each test binary uses part of it, hence `dead_code` is allowed here.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
use citadel_proto::citadel::v1::policy_service_client::PolicyServiceClient;
use citadel_proto::citadel::v1::trust_bundle_service_client::TrustBundleServiceClient;
use citadel_store::{
    AuthorityRecord, AuthorityState, BundleAck, JoinTokenRecord, LedgerEntry, LedgerFilter,
    LedgerVerification, NewIssuance, NodeCertificateUse, NodeGrant, NodeIssuanceOutcome,
    NodeRecord, PolicyAck, Store, StoreError,
};
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
            key_encryption_key_file: None,
            lifetime: LifetimePolicy::default(),
            root_lifetime_secs: 10 * 365 * 86_400,
            jwt: Some(JwtConfig {
                issuer: TEST_ISSUER.into(),
                audiences: vec!["istio-ca".into()],
                jwks: JwksSource::File(jwks_path),
                trust_domain: td,
                refresh_interval: citadel_ca::auth::jwt::DEFAULT_JWKS_REFRESH,
                extra_roots: None,
            }),
            bundle_poll_interval: Duration::from_millis(100),
            policies_dir: None,
            policies_poll_interval: Duration::from_millis(100),
            root_namespace: "istio-system".into(),
            policy_jwks: Default::default(),
            root_renewal: None,
            kubernetes: None,
            limits: Default::default(),
            ledger_checkpoint_interval: Duration::from_secs(60),
        };
        configure(&mut config);
        // `configure` may point several harnesses at one data directory (replicas).
        let data_dir = config.data_dir.clone();
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

    /// Renews node `node`'s certificate over a connection authenticated with `identity`
    /// (chain PEM, key PEM): the new (chain PEM, key PEM), or the refusal.
    pub async fn renew_node(
        &self,
        node: &str,
        identity: (&str, &str),
    ) -> Result<(String, String), tonic::Status> {
        let csr = p256_csr(&[&format!("spiffe://cluster.local/citadel/node/{node}")]).unwrap();
        let mut client = connect(self.addr(), &self.bundle_pem, Some(identity))
            .await
            .unwrap();
        let resp = create(&mut client, request(&csr.pem, 0, None, None)).await?;
        Ok((resp.cert_chain.concat(), csr.key.serialize_pem()))
    }

    /// Asks for `target`'s certificate as a node agent authenticated with `identity`: the
    /// chain, or the refusal.
    pub async fn impersonate(
        &self,
        identity: (&str, &str),
        target: &str,
    ) -> Result<Vec<String>, tonic::Status> {
        let csr = p256_csr(&[]).unwrap();
        let mut client = connect(self.addr(), &self.bundle_pem, Some(identity))
            .await
            .unwrap();
        create(&mut client, request(&csr.pem, 0, None, Some(target)))
            .await
            .map(|resp| resp.cert_chain)
    }

    /// A trust-bundle client, with an optional client certificate (PEM chain, PEM key).
    pub async fn bundle_client(
        &self,
        client_identity: Option<(&str, &str)>,
    ) -> TrustBundleServiceClient<Channel> {
        TrustBundleServiceClient::new(self.channel(client_identity).await)
    }

    /// A policy-stream client, with an optional client certificate (PEM chain, PEM key).
    pub async fn policy_client(
        &self,
        client_identity: Option<(&str, &str)>,
    ) -> PolicyServiceClient<Channel> {
        PolicyServiceClient::new(self.channel(client_identity).await)
    }

    /// A TLS channel to the CA, with an optional client certificate (PEM chain, PEM key).
    pub async fn channel(&self, client_identity: Option<(&str, &str)>) -> Channel {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.bundle_pem))
            .domain_name("localhost");
        if let Some((chain, key)) = client_identity {
            tls = tls.identity(Identity::from_pem(chain, key));
        }
        Channel::from_shared(format!("https://{}", self.addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
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

/// A store whose ledger writes (plain and node issuances) and pings fail while `down` is set,
/// as when the database is unreachable at that moment; everything else passes through.
pub struct FlakyStore {
    /// The store wrapped.
    pub inner: Arc<dyn Store>,
    /// Fail while true.
    pub down: Arc<AtomicBool>,
}

impl FlakyStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl citadel_store::LeaseStore for FlakyStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        self.inner
            .acquire_lease(name, holder, now, expires_at)
            .await
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        self.inner.release_lease(name, holder).await
    }
    async fn get_lease(&self, name: &str) -> Result<Option<citadel_store::Lease>, StoreError> {
        self.inner.get_lease(name).await
    }
}

#[async_trait::async_trait]
impl citadel_store::HealthStore for FlakyStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
}

#[async_trait::async_trait]
impl citadel_store::AuthorityStore for FlakyStore {
    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        self.inner.list_authorities().await
    }
    async fn insert_authority(&self, rec: &AuthorityRecord) -> Result<(), StoreError> {
        self.inner.insert_authority(rec).await
    }
    async fn set_authority_state(&self, id: &str, state: AuthorityState) -> Result<(), StoreError> {
        self.inner.set_authority_state(id, state).await
    }
    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        self.inner.bundle_sequence().await
    }
}

#[async_trait::async_trait]
impl citadel_store::CheckpointStore for FlakyStore {
    async fn insert_checkpoint(
        &self,
        checkpoint: &citadel_store::LedgerCheckpoint,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.insert_checkpoint(checkpoint).await
    }
    async fn latest_checkpoint(
        &self,
    ) -> Result<Option<citadel_store::LedgerCheckpoint>, StoreError> {
        self.inner.latest_checkpoint().await
    }
    async fn ledger_head(&self) -> Result<(i64, [u8; 32]), StoreError> {
        self.check()?;
        self.inner.ledger_head().await
    }
    async fn ledger_row_hash(&self, seq: i64) -> Result<Option<[u8; 32]>, StoreError> {
        self.inner.ledger_row_hash(seq).await
    }
}

#[async_trait::async_trait]
impl citadel_store::LedgerStore for FlakyStore {
    async fn append_issuances(
        &self,
        batch: &[NewIssuance],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.check()?;
        self.inner.append_issuances(batch).await
    }
    async fn list_issuances(&self, filter: &LedgerFilter) -> Result<Vec<LedgerEntry>, StoreError> {
        self.inner.list_issuances(filter).await
    }
    async fn verify_ledger(&self) -> Result<LedgerVerification, StoreError> {
        self.inner.verify_ledger().await
    }
    async fn live_counts_by_authority(&self, now: i64) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.live_counts_by_authority(now).await
    }
}

#[async_trait::async_trait]
impl citadel_store::NodeStore for FlakyStore {
    async fn insert_join_token(&self, rec: &JoinTokenRecord) -> Result<(), StoreError> {
        self.inner.insert_join_token(rec).await
    }
    async fn find_join_token(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        self.inner.find_join_token(hash).await
    }
    async fn append_node_issuance(
        &self,
        node: &str,
        grant: &NodeGrant,
        issuance: &NewIssuance,
        now: i64,
    ) -> Result<NodeIssuanceOutcome, StoreError> {
        self.check()?;
        self.inner
            .append_node_issuance(node, grant, issuance, now)
            .await
    }
    async fn use_node_certificate(
        &self,
        node: &str,
        serial: &str,
        now: i64,
    ) -> Result<NodeCertificateUse, StoreError> {
        self.inner.use_node_certificate(node, serial, now).await
    }
    async fn evict_node(&self, node: &str, now: i64) -> Result<bool, StoreError> {
        self.inner.evict_node(node, now).await
    }
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.list_nodes().await
    }
    async fn node_allowed_ids(&self, node: &str) -> Result<Option<Vec<String>>, StoreError> {
        self.inner.node_allowed_ids(node).await
    }
}

#[async_trait::async_trait]
impl citadel_store::AckStore for FlakyStore {
    async fn record_bundle_ack(&self, agent: &str, seq: u64, now: i64) -> Result<(), StoreError> {
        self.inner.record_bundle_ack(agent, seq, now).await
    }
    async fn list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError> {
        self.inner.list_bundle_acks().await
    }
    async fn record_policy_ack(
        &self,
        agent: &str,
        version: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.record_policy_ack(agent, version, now).await
    }
    async fn list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError> {
        self.inner.list_policy_acks().await
    }
}

/// A store that counts join-token lookups (to show which requests never reach it).
pub struct CountingStore {
    /// The store wrapped.
    pub inner: Arc<dyn Store>,
    /// `find_join_token` calls so far.
    pub join_token_lookups: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl citadel_store::LeaseStore for CountingStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        self.inner
            .acquire_lease(name, holder, now, expires_at)
            .await
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        self.inner.release_lease(name, holder).await
    }
    async fn get_lease(&self, name: &str) -> Result<Option<citadel_store::Lease>, StoreError> {
        self.inner.get_lease(name).await
    }
}

#[async_trait::async_trait]
impl citadel_store::HealthStore for CountingStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[async_trait::async_trait]
impl citadel_store::AuthorityStore for CountingStore {
    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        self.inner.list_authorities().await
    }
    async fn insert_authority(&self, rec: &AuthorityRecord) -> Result<(), StoreError> {
        self.inner.insert_authority(rec).await
    }
    async fn set_authority_state(&self, id: &str, state: AuthorityState) -> Result<(), StoreError> {
        self.inner.set_authority_state(id, state).await
    }
    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        self.inner.bundle_sequence().await
    }
}

#[async_trait::async_trait]
impl citadel_store::CheckpointStore for CountingStore {
    async fn insert_checkpoint(
        &self,
        checkpoint: &citadel_store::LedgerCheckpoint,
    ) -> Result<bool, StoreError> {
        self.inner.insert_checkpoint(checkpoint).await
    }
    async fn latest_checkpoint(
        &self,
    ) -> Result<Option<citadel_store::LedgerCheckpoint>, StoreError> {
        self.inner.latest_checkpoint().await
    }
    async fn ledger_head(&self) -> Result<(i64, [u8; 32]), StoreError> {
        self.inner.ledger_head().await
    }
    async fn ledger_row_hash(&self, seq: i64) -> Result<Option<[u8; 32]>, StoreError> {
        self.inner.ledger_row_hash(seq).await
    }
}

#[async_trait::async_trait]
impl citadel_store::LedgerStore for CountingStore {
    async fn append_issuances(
        &self,
        batch: &[NewIssuance],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.inner.append_issuances(batch).await
    }
    async fn list_issuances(&self, filter: &LedgerFilter) -> Result<Vec<LedgerEntry>, StoreError> {
        self.inner.list_issuances(filter).await
    }
    async fn verify_ledger(&self) -> Result<LedgerVerification, StoreError> {
        self.inner.verify_ledger().await
    }
    async fn live_counts_by_authority(&self, now: i64) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.live_counts_by_authority(now).await
    }
}

#[async_trait::async_trait]
impl citadel_store::NodeStore for CountingStore {
    async fn insert_join_token(&self, rec: &JoinTokenRecord) -> Result<(), StoreError> {
        self.inner.insert_join_token(rec).await
    }
    async fn find_join_token(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        self.join_token_lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.find_join_token(hash).await
    }
    async fn append_node_issuance(
        &self,
        node: &str,
        grant: &NodeGrant,
        issuance: &NewIssuance,
        now: i64,
    ) -> Result<NodeIssuanceOutcome, StoreError> {
        self.inner
            .append_node_issuance(node, grant, issuance, now)
            .await
    }
    async fn use_node_certificate(
        &self,
        node: &str,
        serial: &str,
        now: i64,
    ) -> Result<NodeCertificateUse, StoreError> {
        self.inner.use_node_certificate(node, serial, now).await
    }
    async fn evict_node(&self, node: &str, now: i64) -> Result<bool, StoreError> {
        self.inner.evict_node(node, now).await
    }
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.list_nodes().await
    }
    async fn node_allowed_ids(&self, node: &str) -> Result<Option<Vec<String>>, StoreError> {
        self.inner.node_allowed_ids(node).await
    }
}

#[async_trait::async_trait]
impl citadel_store::AckStore for CountingStore {
    async fn record_bundle_ack(&self, agent: &str, seq: u64, now: i64) -> Result<(), StoreError> {
        self.inner.record_bundle_ack(agent, seq, now).await
    }
    async fn list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError> {
        self.inner.list_bundle_acks().await
    }
    async fn record_policy_ack(
        &self,
        agent: &str,
        version: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.record_policy_ack(agent, version, now).await
    }
    async fn list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError> {
        self.inner.list_policy_acks().await
    }
}
