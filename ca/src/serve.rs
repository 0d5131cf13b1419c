//! `citadel serve`: assembles the CA from its configuration and runs it.

use crate::clock::unix_now;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use citadel_identity::TrustDomain;
use citadel_identity::lifetime::{LifetimePolicy, leaf_validity};
use citadel_proto::citadel::v1::policy_service_server::PolicyServiceServer;
use citadel_proto::citadel::v1::trust_bundle_service_server::TrustBundleServiceServer;
use citadel_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use citadel_store::{GroupCommitLedger, NewIssuance, Store};
use rcgen::PublicKeyData;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::client_cert::ClientCertAuthenticator;
use crate::auth::join_token::JoinTokenAuthenticator;
use crate::auth::jwt::{JwtAuthenticator, JwtConfig};
use crate::auth::token_review::{TokenReviewAuthenticator, TokenReviewConfig};
use crate::auth::{AuthChain, Authenticator};
use crate::authorities;
use crate::authorities::AuthorityLoader;
use crate::authority::{Authority, LeafSpec, random_serial};
use crate::authority_manager::StoreFollower;
use crate::bundle_service::{MAX_ACK_BYTES, TrustBundleStreamService};
use crate::bundle_watch::load_snapshot;
use crate::checkpoint::Checkpointer;
use crate::csr::KeyKind;
use crate::http::{OpsState, router};
use crate::issuer::CertificateIssuer;
use crate::k8s::{PodIndex, PodIndexAuthorizer};
use crate::keystore::KeyStore;
use crate::leadership::{Leadership, StoreLease};
use crate::metrics::CaMetrics;
use crate::node_authz::{AllowListAuthorizer, NodeAuthorizer, NodeAuthorizers};
use crate::policy_service::{MAX_POLICY_ACK_BYTES, PolicyStreamService};
use crate::policy_set::PolicySnapshot;
use crate::policy_source::{DirectorySource, PolicyPoller, PolicySource, load_initial};
use crate::sealed_keystore::open_key_store;
use crate::service::{IstioCaService, MAX_REQUEST_BYTES};
use crate::tls::{CertResolver, provider, server_config};

/// How long shutdown waits for open connections to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default time between two reads of the trust-bundle sequence.
pub const DEFAULT_BUNDLE_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Default time between two reads of the policy directory.
pub const DEFAULT_POLICIES_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Everything `citadel serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory (SQLite database, keys, bundle.pem); created 0700.
    pub data_dir: PathBuf,
    /// Store URL; `None` = SQLite in the data directory.
    pub database_url: Option<String>,
    /// Trust domain of every identity issued.
    pub trust_domain: TrustDomain,
    /// CSR API address.
    pub listen: SocketAddr,
    /// Metrics and health address.
    pub http_listen: SocketAddr,
    /// DNS names of the CA's serving certificate.
    pub dns_names: Vec<String>,
    /// IP addresses of the CA's serving certificate.
    pub ip_addresses: Vec<IpAddr>,
    /// Operator CA directory (plug-in mode).
    pub ca_dir: Option<PathBuf>,
    /// Key-encryption key file: authority keys are sealed into the store under it (so every
    /// replica can load them) instead of written to `<data_dir>/keys`; keys already there are
    /// still read (see [`crate::sealed_keystore`]). `None` = the file key store.
    pub key_encryption_key_file: Option<PathBuf>,
    /// Leaf lifetime rules.
    pub lifetime: LifetimePolicy,
    /// Lifetime of a self-signed root.
    pub root_lifetime_secs: i64,
    /// Local JWT verification, if configured.
    pub jwt: Option<JwtConfig>,
    /// Time between two reads of the trust-bundle sequence (changes reach the trust-bundle
    /// streams and client-certificate checks within this delay).
    pub bundle_poll_interval: Duration,
    /// Directory of PeerAuthentication/AuthorizationPolicy files to serve to node agents;
    /// `None` = the empty set.
    pub policies_dir: Option<PathBuf>,
    /// Time between two reads of the policy directory.
    pub policies_poll_interval: Duration,
    /// The mesh root namespace (policies there apply mesh-wide).
    pub root_namespace: String,
    /// How RequestAuthentication JWKS are fetched to ride with the policy set.
    pub policy_jwks: crate::policy_jwks::PolicyJwksConfig,
    /// Automatic renewal of a self-signed root (run every `bundle_poll_interval` by the one
    /// replica holding the lease; new roots live `root_lifetime_secs`); `None` = off.
    pub root_renewal: Option<crate::rotation::RenewalPolicy>,
    /// `--kubernetes`: TokenReview authentication and node authorization from the pod index;
    /// `None` = off Kubernetes.
    pub kubernetes: Option<crate::k8s::KubernetesConfig>,
    /// Resource limits of the CSR API port (see [`crate::limits`]).
    pub limits: crate::limits::Limits,
    /// Time between two signed ledger checkpoints ([`crate::checkpoint`]); one is also signed
    /// at start-up and at clean shutdown.
    pub ledger_checkpoint_interval: Duration,
}

impl ServeConfig {
    /// The store URL in effect.
    pub fn store_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("citadel.db").display()))
    }
}

/// A running CA.
pub struct RunningCa {
    /// Bound CSR API address.
    pub grpc_addr: SocketAddr,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    checkpointer: Arc<Checkpointer>,
}

impl RunningCa {
    /// Stops accepting, lets in-flight requests finish for up to
    /// [`SHUTDOWN_GRACE`], then drops whatever is left and signs a last ledger checkpoint.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let aborts: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
            tracing::warn!("connections still open after the grace period; closing them");
            for a in aborts {
                a.abort();
            }
        }
        // After the requests: the checkpoint covers everything this process recorded.
        self.checkpointer.log_checkpoint("shutdown").await;
    }
}

/// Creates the data directory (0700).
pub fn prepare_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set permissions of {}", dir.display()))?;
    Ok(())
}

/// Issues the CA's own serving certificate and installs it; returns its notBefore/notAfter.
async fn refresh_serving_cert(
    authority: &Authority,
    config: &ServeConfig,
    resolver: &CertResolver,
    ledger: &GroupCommitLedger,
) -> anyhow::Result<(i64, i64)> {
    let now = unix_now();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let validity = leaf_validity(&config.lifetime, 0, authority.window(), now)?;
    let leaf = authority.sign(&LeafSpec {
        spiffe_id: None,
        dns_names: &config.dns_names,
        ip_addresses: &config.ip_addresses,
        common_name: Some("citadel"),
        spki_der: &key.subject_public_key_info(),
        key_kind: KeyKind::EcdsaP256,
        validity,
        serial: random_serial()?,
    })?;
    ledger
        .record(NewIssuance {
            serial_hex: leaf.serial_hex.clone(),
            spiffe_id: format!("dns:{}", config.dns_names.join(",")),
            authority_id: authority.id().to_owned(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            requester: "citadel".into(),
            node: None,
            der_sha256: leaf.der_sha256,
            issued_at: now,
        })
        .await
        .context("recording the serving certificate")?;
    let mut chain = vec![leaf.der.clone()];
    if authority.signer() != authority.root() {
        chain.push(authority.signer().clone());
    }
    chain.extend(authority.intermediates().iter().cloned());
    resolver.set(chain, key.serialize_der())?;
    Ok((leaf.not_before, leaf.not_after))
}

/// The shortest wait between two renewals of the serving certificate.
pub const MIN_SERVING_RENEWAL_SECS: i64 = 5;

/// When to renew the serving certificate valid `not_before..not_after` under a signer valid
/// until `signer_not_after`, at `now` (pure): at half of its lifetime, but never more often
/// than every [`MIN_SERVING_RENEWAL_SECS`]; `None` (wait for a new authority) when the
/// certificate already reaches the signer's end, since renewing under the same signer
/// could only give an ever shorter certificate. Rotation and renewal of the root are what
/// extend it.
pub fn serving_renewal_wait(
    not_before: i64,
    not_after: i64,
    signer_not_after: i64,
    now: i64,
) -> Option<Duration> {
    if not_after >= signer_not_after {
        return None;
    }
    let half = not_before + (not_after - not_before) / 2;
    let wait = (half - now).clamp(MIN_SERVING_RENEWAL_SECS, 86_400 * 365);
    Some(Duration::from_secs(wait.unsigned_abs()))
}

async fn sleep_if(wait: Option<Duration>) {
    match wait {
        Some(w) => tokio::time::sleep(w).await,
        None => futures::future::pending().await,
    }
}

/// Starts the CA: store, authority, bundle, TLS, gRPC and HTTP servers.
pub async fn start(config: ServeConfig) -> anyhow::Result<RunningCa> {
    prepare_data_dir(&config.data_dir)?;
    let store: Arc<dyn Store> = citadel_store::connect(&config.store_url())
        .await
        .context("opening the store")?;
    start_with_store(config, store).await
}

/// Starts the CA on an already opened store (tests wrap the store to inject faults).
pub async fn start_with_store(
    config: ServeConfig,
    store: Arc<dyn Store>,
) -> anyhow::Result<RunningCa> {
    prepare_data_dir(&config.data_dir)?;
    let keys: Arc<dyn KeyStore> = match (&config.kubernetes, &config.key_encryption_key_file) {
        // On Kubernetes without a key-encryption key: a Secret every replica reads.
        (Some(k8s), None) => {
            let client = k8s
                .connection
                .client()
                .await
                .context("connecting to the Kubernetes API server")?;
            tracing::info!(
                namespace = %k8s.ca_namespace,
                secret = crate::k8s::secret_keystore::SECRET_NAME,
                "authority keys are kept in a Kubernetes Secret"
            );
            Arc::new(crate::k8s::secret_keystore::SecretKeyStore::new(
                client,
                &k8s.ca_namespace,
            ))
        }
        _ => {
            open_key_store(
                &config.data_dir,
                &config.store_url(),
                config.key_encryption_key_file.as_deref(),
                true,
            )
            .await?
        }
    };
    // The ledger key is kept like the authority keys; its public half is pinned in the data
    // directory, where `citadel ledger verify` trusts it from.
    let ledger_signer = crate::checkpoint::load_or_create_signer(keys.as_ref()).await?;
    crate::checkpoint::pin_public_key(&config.data_dir, ledger_signer.public())?;
    let checkpointer = Arc::new(Checkpointer::new(store.clone(), ledger_signer));
    let loader = AuthorityLoader {
        keys: keys.clone(),
        ca_dir: config.ca_dir.clone(),
    };
    let now = unix_now();
    let authority = Arc::new(
        authorities::load_or_create(
            store.as_ref(),
            &loader,
            &config.trust_domain,
            config.root_lifetime_secs,
            now,
        )
        .await?,
    );
    let mut snapshot = load_snapshot(store.as_ref(), &config.trust_domain).await?;
    // Agents are told which authority this replica really signs with.
    snapshot.active_authority_id = authority.id().to_owned();
    let bundle_file = config.data_dir.join("bundle.pem");
    authorities::write_bundle(&bundle_file, &snapshot.bundle)?;
    let (authority_tx, authority_rx) = watch::channel(authority.clone());
    let (bundle_tx, bundle_rx) = watch::channel(snapshot.bundle.clone());
    let bundle_for_configmaps = bundle_tx.subscribe();
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(snapshot));

    let ledger = GroupCommitLedger::spawn(store.clone(), 256);
    let mut authenticators: Vec<Arc<dyn Authenticator>> = vec![
        Arc::new(ClientCertAuthenticator::new(
            bundle_rx,
            store.clone(),
            config.trust_domain.clone(),
        )),
        Arc::new(JoinTokenAuthenticator::new(
            store.clone(),
            config.trust_domain.clone(),
        )),
    ];
    match &config.jwt {
        // Local verification first: no API-server round trip when it can decide.
        Some(jwt) => authenticators.push(
            JwtAuthenticator::start(jwt.clone())
                .await
                .context("configuring JWT verification")?,
        ),
        None if config.kubernetes.is_none() => tracing::warn!(
            "no JWT authenticator configured (--jwt-issuer/--jwt-jwks): only client certificates and join tokens will be accepted"
        ),
        None => {}
    }
    let mut node_authorizers: Vec<Arc<dyn NodeAuthorizer>> = vec![Arc::new(
        AllowListAuthorizer::new(store.clone(), config.trust_domain.clone()),
    )];
    let mut pod_index_task = None;
    // This replica's name in leases (store or Kubernetes).
    let holder = crate::rotation_driver::new_holder_id();
    let mut kube_lease: Option<Arc<dyn Leadership>> = None;
    let mut lease_duration_secs = crate::k8s::lease::DEFAULT_LEASE_DURATION_SECS;
    if let Some(k8s) = &config.kubernetes {
        let client = k8s
            .connection
            .client()
            .await
            .context("connecting to the Kubernetes API server")?;
        let mut review = TokenReviewConfig::new(
            k8s.token_review_audiences.clone(),
            config.trust_domain.clone(),
        );
        review.timeout = k8s.token_review_timeout;
        authenticators.push(Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            review,
        )));
        let index = Arc::new(std::sync::RwLock::new(PodIndex::default()));
        node_authorizers.push(Arc::new(PodIndexAuthorizer::new(
            index.clone(),
            k8s.trusted_agents.clone(),
            config.trust_domain.clone(),
        )));
        kube_lease = Some(Arc::new(crate::k8s::lease::KubeLease::new(
            client.clone(),
            &k8s.ca_namespace,
            holder.clone(),
            k8s.lease_duration_secs,
        )) as Arc<dyn Leadership>);
        lease_duration_secs = k8s.lease_duration_secs;
        pod_index_task = Some((client, index));
        tracing::info!(
            audiences = ?k8s.token_review_audiences,
            trusted_agents = %k8s.trusted_agents.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            ca_namespace = %k8s.ca_namespace,
            "Kubernetes mode: TokenReview authentication, node authorization from the pod index"
        );
    }
    let auth = AuthChain::new(authenticators);
    let metrics = Arc::new(CaMetrics::new());

    // Policies: an invalid set at start-up is an error (there is no last good set to keep).
    let mesh = citadel_policy::MeshConfig {
        root_namespace: config.root_namespace.clone(),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // On Kubernetes without --policies, the security.istio.io custom resources.
    let crd_client = match (&config.policies_dir, &pod_index_task) {
        (None, Some((client, _))) => Some(client.clone()),
        _ => None,
    };
    let mut policy_source: Option<Box<dyn PolicySource>> = match (&config.policies_dir, crd_client)
    {
        (Some(dir), _) => Some(Box::new(DirectorySource::new(dir.clone()))),
        (None, Some(client)) => Some(Box::new(crate::k8s::policy_crds::CrdSource::start(
            client,
            mesh.clone(),
            metrics.clone(),
            shutdown_rx.clone(),
        ))),
        (None, None) => None,
    };
    let policies = match policy_source.as_mut() {
        Some(source) => load_initial(source.as_mut(), &mesh).await?,
        None => PolicySnapshot::empty(),
    };
    metrics
        .policy_objects
        .set(i64::try_from(policies.objects.len()).unwrap_or(i64::MAX));
    tracing::info!(
        version = %policies.version,
        objects = policies.objects.len(),
        source = %policy_source.as_ref().map_or_else(|| "none".to_owned(), |s| s.describe()),
        "policy set loaded"
    );
    let (policy_tx, policy_rx) = watch::channel(Arc::new(policies));
    let issuer = Arc::new(
        CertificateIssuer::new(
            config.trust_domain.clone(),
            authority_rx.clone(),
            auth.clone(),
            NodeAuthorizers::new(node_authorizers),
            store.clone(),
            ledger.clone(),
            config.lifetime,
            metrics.clone(),
        )
        .with_gate(Arc::new(crate::limits::RequestGate::new(
            &config.limits,
            metrics.clone(),
        ))),
    );

    let provider = provider();
    let resolver = Arc::new(CertResolver::new(provider.clone()));
    let serving_validity = refresh_serving_cert(&authority, &config, &resolver, &ledger).await?;
    let tls = TlsAcceptor::from(Arc::new(server_config(provider, resolver.clone())?));
    checkpointer.log_checkpoint("start-up").await;
    let checkpoint_task = checkpointer
        .clone()
        .run(config.ledger_checkpoint_interval, shutdown_rx.clone());

    let grpc_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(checkpoint_task));
    if let Some((client, index)) = pod_index_task {
        tasks.push(tokio::spawn(crate::k8s::run_pod_index(
            client.clone(),
            index,
            shutdown_rx.clone(),
        )));
        let resync = config
            .kubernetes
            .as_ref()
            .map_or(crate::k8s::root_configmap::DEFAULT_RESYNC, |k| {
                k.configmap_resync
            });
        let (leader_tx, leader_rx) = watch::channel(false);
        if let Some(lease) = kube_lease.clone() {
            let every = Duration::from_millis(
                u64::try_from(lease_duration_secs)
                    .unwrap_or(15)
                    .saturating_mul(1000)
                    / 3,
            );
            tasks.push(tokio::spawn(crate::k8s::lease::run_leader_flag(
                lease,
                every,
                leader_tx,
                shutdown_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(
            crate::k8s::root_configmap::run_root_configmaps(
                client,
                bundle_for_configmaps,
                leader_rx,
                resync,
                shutdown_rx.clone(),
            ),
        ));
    }
    let join_lookups = Arc::new(crate::limits::JoinLookupGate::new(
        &config.limits,
        metrics.clone(),
    ));
    let svc = IstioCertificateServiceServer::new(
        IstioCaService::new(issuer).with_join_lookup_gate(join_lookups),
    )
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    // Bundle streams end by themselves on shutdown, so the graceful shutdown below does not
    // wait the whole grace period for agents that never hang up.
    // RequestAuthentication keys ride with the set: agents get it with the fetched JWKS.
    let policy_rx = crate::policy_jwks::start(
        policy_rx,
        config.policy_jwks.clone(),
        metrics.clone(),
        shutdown_rx.clone(),
    )
    .await?;
    // On Kubernetes, trusted agents' tokens also open the node-agent streams.
    let k8s_agents = config
        .kubernetes
        .as_ref()
        .map(|k| crate::k8s::KubernetesAgents {
            trust_domain: config.trust_domain.clone(),
            trusted: k.trusted_agents.clone(),
        });
    let policy_svc = PolicyServiceServer::new(
        PolicyStreamService::new(auth.clone(), store.clone(), policy_rx, shutdown_rx.clone())
            .with_kubernetes_agents(k8s_agents.clone()),
    )
    .max_decoding_message_size(MAX_POLICY_ACK_BYTES);
    let bundle_svc = TrustBundleServiceServer::new(
        TrustBundleStreamService::new(auth, store.clone(), snapshot_rx, shutdown_rx.clone())
            .with_kubernetes_agents(k8s_agents),
    )
    .max_decoding_message_size(MAX_ACK_BYTES);
    let mut rx = shutdown_rx.clone();
    let conn_tracker = Arc::new(crate::conn_limits::ConnTracker::default());
    let incoming = crate::conn_limits::limited_incoming(
        grpc_listener,
        tls,
        &config.limits,
        conn_tracker.clone(),
        metrics.clone(),
    );
    let grpc_server =
        crate::conn_limits::configure(tonic::transport::Server::builder(), &config.limits)
            .layer(crate::conn_limits::TrackLayer::new(conn_tracker));
    tasks.push(tokio::spawn(async move {
        let result = { grpc_server }
            .add_service(svc)
            .add_service(bundle_svc)
            .add_service(policy_svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));

    let metrics_for_policies = metrics.clone();
    let ca_dir_rejected = metrics.ca_dir_rejected.clone();
    let ops = router(OpsState {
        metrics,
        store: store.clone(),
        authority: authority_rx.clone(),
    });
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let result = axum::serve(http_listener, ops)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));

    // Renew the serving certificate at half of its lifetime, and at once when the signing
    // authority changes (rotation).
    let mut rx = shutdown_rx.clone();
    let renew_config = config.clone();
    let mut authority_changes = authority_rx.clone();
    authority_changes.mark_unchanged();
    tasks.push(tokio::spawn(async move {
        let (mut not_before, mut not_after) = serving_validity;
        loop {
            let signer_not_after = authority_changes.borrow().window().not_after;
            let wait = serving_renewal_wait(not_before, not_after, signer_not_after, unix_now());
            tokio::select! {
                _ = sleep_if(wait) => {}
                changed = authority_changes.changed() => {
                    if changed.is_err() { return; }
                    tracing::info!("signing authority changed; re-issuing the serving certificate");
                }
                _ = rx.wait_for(|stop| *stop) => return,
            }
            let authority = authority_changes.borrow_and_update().clone();
            match refresh_serving_cert(&authority, &renew_config, &resolver, &ledger).await {
                Ok(v) => (not_before, not_after) = v,
                Err(e) => {
                    tracing::warn!(error = %e, "serving certificate renewal failed; retrying in 30 s");
                    (not_before, not_after) = (unix_now() - 1, unix_now() + 60);
                }
            }
        }
    }));

    tasks.push(tokio::spawn(
        StoreFollower {
            store: store.clone(),
            trust_domain: config.trust_domain.clone(),
            interval: config.bundle_poll_interval,
            bundle_file: Some(bundle_file),
            loader,
            authority: authority_tx,
            snapshots: snapshot_tx,
            bundles: bundle_tx,
        }
        .run(shutdown_rx.clone()),
    ));

    // One task owns the root lifecycle: automatic renewal and the watched --ca-dir.
    if config.root_renewal.is_some() || config.ca_dir.is_some() {
        // On Kubernetes the leader Lease decides; off it, a lease in the store.
        let leadership: Arc<dyn Leadership> = match kube_lease {
            Some(lease) => lease,
            None => Arc::new(StoreLease::new(
                store.clone(),
                crate::rotation_driver::RENEWAL_LEASE,
                holder.clone(),
                crate::rotation_driver::lease_secs(config.bundle_poll_interval),
            )),
        };
        tracing::info!(prepare_at = ?config.root_renewal.map(|p| p.prepare_at), ca_dir = ?config.ca_dir, holder = %leadership.holder(), "root renewal task on");
        tasks.push(tokio::spawn(
            crate::rotation_driver::RenewalDriver {
                store: store.clone(),
                keys,
                trust_domain: config.trust_domain.clone(),
                policy: config.root_renewal,
                ca_dir: config
                    .ca_dir
                    .clone()
                    .map(|dir| crate::ca_dir_watch::CaDirWatch::new(dir, ca_dir_rejected.clone())),
                root_lifetime_secs: config.root_lifetime_secs,
                stale_after_secs: crate::rotation::DEFAULT_STALE_AFTER_SECS,
                interval: config.bundle_poll_interval,
                leadership,
            }
            .run(shutdown_rx.clone()),
        ));
    }

    if let Some(source) = policy_source {
        tasks.push(tokio::spawn(
            PolicyPoller {
                source,
                mesh,
                interval: config.policies_poll_interval,
                snapshots: policy_tx,
                metrics: metrics_for_policies,
            }
            .run(shutdown_rx.clone()),
        ));
    } else {
        // No source: the empty set stays; keep the sender so streams stay open.
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = policy_tx;
            let _ = rx.wait_for(|stop| *stop).await;
        }));
    }

    tracing::info!(%grpc_addr, %http_addr, trust_domain = %config.trust_domain, "citadel CA serving");
    Ok(RunningCa {
        grpc_addr,
        http_addr,
        shutdown: shutdown_tx,
        tasks,
        checkpointer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_certificate_renews_at_half_life_with_a_floor() {
        assert_eq!(
            serving_renewal_wait(1_000, 2_000, 10_000, 1_000),
            Some(Duration::from_secs(500))
        );
        assert_eq!(
            serving_renewal_wait(1_000, 2_000, 10_000, 1_499),
            Some(Duration::from_secs(MIN_SERVING_RENEWAL_SECS as u64))
        );
    }

    #[test]
    fn a_serving_certificate_cut_short_by_its_signer_is_not_renewed_under_that_signer() {
        // Renewing would only give shorter and shorter certificates; wait for rotation.
        assert_eq!(serving_renewal_wait(1_000, 2_000, 2_000, 1_600), None);
    }
}
