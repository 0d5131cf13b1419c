//! `citadel`: the Citadel CA server and operator CLI.
#![forbid(unsafe_code)]

mod policy_cmd;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use citadel_ca::auth::jwt::{JwksSource, JwtConfig};
use citadel_ca::cli::StoreArgs;
use citadel_ca::clock::unix_now;
use citadel_ca::duration::parse_duration_secs;
use citadel_ca::join_token;
use citadel_ca::serve::ServeConfig;
use citadel_identity::TrustDomain;
use citadel_identity::lifetime::LifetimePolicy;
use clap::{Parser, Subcommand};

/// Citadel: a certificate authority and identity service for service meshes.
#[derive(Parser, Debug)]
#[command(name = "citadel", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "CITADEL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the CA: Istio's CSR API over TLS, metrics and health over HTTP.
    Serve(Box<ServeArgs>),
    /// Inspect and rotate the signing authorities and the trust bundle.
    Root {
        #[command(subcommand)]
        command: RootCommand,
    },
    /// Check the issuance ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// List issued certificates from the ledger.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Validate and explain Istio PeerAuthentication and AuthorizationPolicy files.
    Policy(Box<policy_cmd::PolicyArgs>),
    /// Manage one-time join tokens for node agents off Kubernetes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Inspect and evict joined node agents.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List joined nodes: state, allowed IDs, node-certificate expiry, last seen, and the
    /// trust-bundle sequence and policy version each agent acknowledged.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Trust domain of the node identities (to find their bundle acknowledgements).
        #[arg(long, env = "CITADEL_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Evict a node: its node certificates can no longer renew, request workload
    /// certificates or watch the trust bundle, until it joins again with a new token.
    Evict {
        #[command(flatten)]
        store: StoreArgs,
        /// The node name.
        #[arg(value_name = "NAME")]
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a one-time join token for a node; prints the token alone on stdout.
    ///
    /// The node's agent sends it once as `authorization: Bearer <token>` to get its node
    /// certificate; afterwards it may request certificates for the --allow identities on
    /// behalf of its workloads. Only the token's SHA-256 is stored.
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// Node the token admits: lowercase letters, digits, '-' and '.' (at most 253).
        #[arg(long)]
        node: String,
        /// A SPIFFE ID the node's agent may request for its workloads (repeatable; at least one).
        #[arg(long = "allow", value_name = "SPIFFE_ID")]
        allow: Vec<String>,
        /// Lifetime of the token (at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_duration_secs)]
        ttl: i64,
        /// Trust domain of the allowed identities.
        #[arg(long, env = "CITADEL_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
    },
}

/// Flags every `citadel root` command shares.
#[derive(clap::Args, Debug)]
struct RootCommon {
    #[command(flatten)]
    store: StoreArgs,
    /// Trust domain of the bundle and of new roots.
    #[arg(long, env = "CITADEL_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Print JSON (one object; JSON lines for `rotate`).
    #[arg(long)]
    json: bool,
}

/// Where `root prepare` and `root rotate` put the new authority's key.
#[derive(clap::Args, Debug)]
struct RootKeyArgs {
    /// Seal the new authority's key into the store under the key-encryption key in this file
    /// (base64 of 32 random bytes, mode 0600), as `citadel serve --key-encryption-key-file`
    /// reads it; without it the key goes to <data-dir>/keys.
    #[arg(long, env = "CITADEL_KEY_ENCRYPTION_KEY_FILE", value_name = "PATH")]
    key_encryption_key_file: Option<PathBuf>,
    /// Put the new key into the Kubernetes Secret citadel-ca-keys in --ca-namespace, as
    /// `citadel serve --kubernetes` without a key-encryption key reads it (in-cluster service
    /// account or KUBECONFIG).
    #[arg(long, env = "CITADEL_KUBERNETES")]
    kubernetes: bool,
    /// Namespace of the key Secret.
    #[arg(long, env = "CITADEL_CA_NAMESPACE", default_value = citadel_ca::k8s::DEFAULT_CA_NAMESPACE, value_name = "NS")]
    ca_namespace: String,
}

#[derive(Subcommand, Debug)]
enum RootCommand {
    /// Show each authority (ID, state, subject, expiry, live certificates it signed), the
    /// trust-bundle sequence, each agent (live or stale, the sequence it acknowledged), the
    /// next rotation step, and the trust bundle.
    Status {
        #[command(flatten)]
        common: RootCommon,
        /// An agent not heard from for longer than this is stale (listed, never blocking).
        #[arg(long, default_value = "60s", value_parser = parse_duration_secs)]
        stale_after: i64,
    },
    /// Add a new authority to the trust bundle as `prepared` (not signing yet) and print
    /// its ID: a new self-signed root, or the operator's CA from --ca-dir (checked with a
    /// probe certificate). Its key goes to <data-dir>/keys, or sealed into the store with
    /// --key-encryption-key-file (where replicas with other data directories load it).
    Prepare {
        #[command(flatten)]
        common: RootCommon,
        #[command(flatten)]
        keys: RootKeyArgs,
        /// Import this CA directory (Istio cacerts layout or tls.crt/tls.key/ca.crt).
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
        /// Lifetime of a new self-signed root.
        #[arg(long, default_value = "10y", value_parser = parse_duration_secs)]
        root_ttl: i64,
    },
    /// Make a prepared authority the signer; the active one is retired in the same step.
    /// Refused (exit 1, naming every blocking agent) until every live agent has
    /// acknowledged the bundle holding its root from all its proxies; stale agents are
    /// listed but do not block.
    Activate {
        #[command(flatten)]
        common: RootCommon,
        /// The authority ID (from `root status` or `root prepare`).
        id: String,
        /// Activate even though live agents have not acknowledged the bundle.
        #[arg(long)]
        force: bool,
        /// An agent not heard from for longer than this is stale.
        #[arg(long, default_value = "60s", value_parser = parse_duration_secs)]
        stale_after: i64,
    },
    /// Retire a prepared authority: it never signs and stays in the bundle until removed.
    /// (The active authority is retired by activating its successor.)
    Retire {
        #[command(flatten)]
        common: RootCommon,
        /// The authority ID.
        id: String,
    },
    /// Take an authority's root out of the trust bundle. Refused (exit 1) while a
    /// certificate it signed is neither expired nor superseded (the same identity
    /// re-issued to the same requester by the active authority).
    Remove {
        #[command(flatten)]
        common: RootCommon,
        /// The authority ID.
        id: String,
        /// Remove even though live certificates of it remain.
        #[arg(long)]
        force: bool,
    },
    /// Rotate the root: prepare, wait for propagation, activate, wait until every
    /// certificate is re-issued under the new authority, remove the old one. Resumable: the
    /// state is the store's, so a second run continues where the first stopped. Progress as
    /// text on a terminal, JSON lines otherwise (or with --json).
    Rotate {
        #[command(flatten)]
        common: RootCommon,
        #[command(flatten)]
        keys: RootKeyArgs,
        /// Stop (exit 1, naming what blocks) when one phase waits longer than this.
        #[arg(long, default_value = "30m", value_parser = parse_duration_secs)]
        timeout: i64,
        /// An agent not heard from for longer than this is stale.
        #[arg(long, default_value = "60s", value_parser = parse_duration_secs)]
        stale_after: i64,
        /// Lifetime of the new self-signed root.
        #[arg(long, default_value = "10y", value_parser = parse_duration_secs)]
        root_ttl: i64,
        /// Time between two reads of the store.
        #[arg(long, default_value = "1s", value_parser = parse_duration_secs)]
        poll_interval: i64,
    },
}

impl RootCommon {
    fn trust_domain(&self) -> anyhow::Result<TrustDomain> {
        TrustDomain::new(&self.trust_domain).context("--trust-domain")
    }

    async fn keys(
        &self,
        args: &RootKeyArgs,
    ) -> anyhow::Result<std::sync::Arc<dyn citadel_ca::keystore::KeyStore>> {
        if args.kubernetes && args.key_encryption_key_file.is_none() {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API server")?;
            return Ok(std::sync::Arc::new(
                citadel_ca::k8s::secret_keystore::SecretKeyStore::new(client, &args.ca_namespace),
            ));
        }
        // These commands only save new keys: no read-through to the data directory.
        citadel_ca::sealed_keystore::open_key_store(
            &self.store.data_dir,
            &self.store.url(),
            args.key_encryption_key_file.as_deref(),
            false,
        )
        .await
    }
}

fn outcome_code(outcome: citadel_ca::root_cmd::Outcome) -> ExitCode {
    match outcome {
        citadel_ca::root_cmd::Outcome::Blocked => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

async fn run_root(command: RootCommand, stdout: &mut dyn Write) -> anyhow::Result<ExitCode> {
    use citadel_ca::root_cmd;
    match command {
        RootCommand::Status {
            common,
            stale_after,
        } => {
            let td = common.trust_domain()?;
            let store = common.store.open().await?;
            root_cmd::status(store.as_ref(), &td, stale_after, common.json, stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
        RootCommand::Prepare {
            common,
            keys,
            ca_dir,
            root_ttl,
        } => {
            let td = common.trust_domain()?;
            let store = common.store.open().await?;
            let keys = common.keys(&keys).await?;
            let args = root_cmd::PrepareArgs {
                trust_domain: &td,
                ca_dir: ca_dir.as_deref(),
                root_lifetime_secs: root_ttl,
            };
            let id = root_cmd::prepare(store.as_ref(), keys.as_ref(), &args, unix_now()).await?;
            if common.json {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({"result": "prepared", "authority": id})
                )?;
            } else {
                eprintln!(
                    "prepared authority {id}: its root is in the trust bundle; it does not sign until `citadel root activate {id}`"
                );
                writeln!(stdout, "{id}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        RootCommand::Activate {
            common,
            id,
            force,
            stale_after,
        } => {
            let store = common.store.open().await?;
            let outcome =
                root_cmd::activate(store.as_ref(), &id, force, stale_after, common.json, stdout)
                    .await?;
            Ok(outcome_code(outcome))
        }
        RootCommand::Retire { common, id } => {
            let store = common.store.open().await?;
            let outcome = root_cmd::retire(store.as_ref(), &id, common.json, stdout).await?;
            Ok(outcome_code(outcome))
        }
        RootCommand::Remove { common, id, force } => {
            let store = common.store.open().await?;
            let outcome = root_cmd::remove(store.as_ref(), &id, force, common.json, stdout).await?;
            Ok(outcome_code(outcome))
        }
        RootCommand::Rotate {
            common,
            keys,
            timeout,
            stale_after,
            root_ttl,
            poll_interval,
        } => {
            use std::io::IsTerminal;
            anyhow::ensure!(
                timeout > 0 && poll_interval > 0,
                "--timeout and --poll-interval must be at least 1s"
            );
            let td = common.trust_domain()?;
            let store = common.store.open().await?;
            let keys = common.keys(&keys).await?;
            let opts = root_cmd::RotateOptions {
                timeout: std::time::Duration::from_secs(timeout.unsigned_abs()),
                poll: std::time::Duration::from_secs(poll_interval.unsigned_abs()),
                stale_after_secs: stale_after,
                root_lifetime_secs: root_ttl,
                json: common.json || !std::io::stdout().is_terminal(),
            };
            tokio::select! {
                end = root_cmd::rotate(store.as_ref(), keys.as_ref(), &td, &opts, stdout) => match end? {
                    root_cmd::RotateEnd::Completed => Ok(ExitCode::SUCCESS),
                    root_cmd::RotateEnd::TimedOut(_) => Ok(ExitCode::FAILURE),
                },
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("interrupted; the rotation's state is in the store: run `citadel root rotate` again to continue");
                    Ok(ExitCode::from(130))
                }
            }
        }
    }
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Recompute the hash chain and check it against the newest signed checkpoint; exit 1 and
    /// say why if either fails.
    ///
    /// The checkpoint's signature is checked with the ledger public key pinned in the CA's
    /// data directory (ledger-key.pub.pem), or the one given with --ledger-public-key.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// The ledger public key (PEM) to check checkpoints with; default: the one pinned in
        /// --data-dir.
        #[arg(long, value_name = "FILE")]
        ledger_public_key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// List issuances, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only certificates still valid now.
        #[arg(long)]
        live: bool,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Flags of `citadel serve`.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Trust domain of every identity issued.
    #[arg(long, env = "CITADEL_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Address of the CSR API (gRPC over TLS).
    #[arg(long, env = "CITADEL_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long, env = "CITADEL_HTTP_LISTEN", default_value = "0.0.0.0:15014")]
    http_listen: SocketAddr,
    /// Time between two signed ledger checkpoints (one is also signed at start-up and at
    /// clean shutdown); see `citadel ledger verify`.
    #[arg(long, default_value = "60s", value_parser = parse_duration_secs)]
    ledger_checkpoint_interval: i64,
    /// DNS names in the CA's serving certificate (repeatable).
    #[arg(long = "dns-name", default_values = ["citadel.citadel-system.svc", "localhost"])]
    dns_names: Vec<String>,
    /// IP addresses in the CA's serving certificate (repeatable); the listen
    /// address is added when it is not a wildcard.
    #[arg(long = "ip-address", default_values = ["127.0.0.1"])]
    ip_addresses: Vec<IpAddr>,
    /// Sign with the operator's CA from this directory (Istio cacerts layout:
    /// ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem; or tls.crt, tls.key, ca.crt).
    /// Watched while running: a replaced set enters the bundle as prepared and takes over
    /// once every live agent holds its root; a bad set is logged and ignored.
    #[arg(long, env = "CITADEL_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Seal authority keys into the store (AES-256-GCM) under the key-encryption key in this
    /// file, so every replica sharing the database can sign (base64 of 32 random bytes, mode
    /// 0600). Keys already in <data-dir>/keys are still read, and sealed into the store on first
    /// use. Without it, keys are files in <data-dir>/keys (single node).
    #[arg(long, env = "CITADEL_KEY_ENCRYPTION_KEY_FILE", value_name = "PATH")]
    key_encryption_key_file: Option<PathBuf>,
    /// Leaf lifetime when the request asks for none.
    #[arg(long, default_value = "24h", value_parser = parse_duration_secs)]
    default_ttl: i64,
    /// Longest leaf lifetime a request may ask for (longer requests are rejected).
    #[arg(long, default_value = "90d", value_parser = parse_duration_secs)]
    max_ttl: i64,
    /// Lifetime of a self-signed root created on first start, and of each root the
    /// automatic renewal creates.
    #[arg(long, default_value = "10y", value_parser = parse_duration_secs)]
    root_ttl: i64,
    /// Renew a self-signed root automatically once this fraction of its lifetime has passed
    /// (a decimal or a ratio, strictly between 0 and 1): a new root is prepared, activated
    /// once every live agent's proxies hold it, and the old one removed once no live
    /// certificate depends on it (the gated steps of `citadel root rotate`). One replica at a
    /// time runs it (a lease in the store). Operator (--ca-dir) CAs are never renewed.
    #[arg(long, env = "CITADEL_ROOT_RENEWAL_AT", default_value = "2/3", value_parser = parse_fraction, value_name = "FRACTION")]
    root_renewal_at: f64,
    /// Turn the automatic root renewal off (rotate with `citadel root rotate`).
    #[arg(long, env = "CITADEL_NO_ROOT_RENEWAL")]
    no_root_renewal: bool,
    /// Expected `iss` of service-account JWTs (enables local JWT verification).
    #[arg(long, env = "CITADEL_JWT_ISSUER", requires = "jwt_jwks")]
    jwt_issuer: Option<String>,
    /// The issuer's JWKS: a file path or an https:// URL.
    #[arg(long, env = "CITADEL_JWT_JWKS", requires = "jwt_issuer")]
    jwt_jwks: Option<String>,
    /// Accepted JWT audiences (repeatable).
    #[arg(long = "jwt-audience", default_values = ["istio-ca"])]
    jwt_audiences: Vec<String>,
    /// How often the --jwt-jwks keys are loaded again: a key the issuer removed stops being
    /// trusted within this interval (an unknown kid also triggers a reload, at most every 30s).
    #[arg(long, env = "CITADEL_JWT_JWKS_REFRESH_INTERVAL", default_value = "5m", value_parser = parse_duration_secs)]
    jwt_jwks_refresh_interval: i64,
    /// How often to check the store for trust-bundle changes (pushed to node agents).
    #[arg(long, env = "CITADEL_BUNDLE_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration_secs)]
    bundle_poll_interval: i64,
    /// Directory of Istio PeerAuthentication and AuthorizationPolicy files (YAML or JSON,
    /// searched recursively, as `citadel policy validate` reads them) streamed to node
    /// agents. Without it the CA serves the empty set. An invalid set refuses start-up; a
    /// later invalid change keeps the last good set in force.
    #[arg(long, env = "CITADEL_POLICIES", value_name = "DIR")]
    policies: Option<PathBuf>,
    /// How often to re-read --policies for changes.
    #[arg(long, env = "CITADEL_POLICIES_POLL_INTERVAL", default_value = "2s", value_parser = parse_duration_secs)]
    policies_poll_interval: i64,
    /// The mesh root namespace: its namespace-wide policies apply mesh-wide.
    #[arg(long, default_value = "istio-system", env = "CITADEL_ROOT_NAMESPACE")]
    root_namespace: String,
    /// How often the JWKS of RequestAuthentication rules (jwksUri) are fetched again.
    #[arg(long, env = "CITADEL_JWKS_REFRESH_INTERVAL", default_value = "20m", value_parser = parse_duration_secs)]
    jwks_refresh_interval: i64,
    /// How soon a failed JWKS fetch is tried again (the last good keys stay meanwhile).
    #[arg(long, env = "CITADEL_JWKS_RETRY_INTERVAL", default_value = "1m", value_parser = parse_duration_secs)]
    jwks_retry_interval: i64,
    /// PEM file of CA certificates trusted for JWKS fetches (--jwt-jwks and jwksUri),
    /// besides the webpki roots.
    #[arg(long, env = "CITADEL_JWKS_EXTRA_ROOTS", value_name = "PEM")]
    jwks_extra_roots: Option<PathBuf>,
    /// Run on Kubernetes: check bearer tokens with the API server's TokenReview (after
    /// local JWT verification, when configured); let trusted node agents ask only for the
    /// identities of pods on their own node; publish the trust bundle as ConfigMap
    /// istio-ca-root-cert in every namespace and run root renewal on the replica holding the
    /// Lease citadel-ca-leader; serve the security.istio.io policy custom resources (unless
    /// --policies is given). Connects with the in-cluster service account, or KUBECONFIG.
    #[arg(long, env = "CITADEL_KUBERNETES")]
    kubernetes: bool,
    /// Audience asked for in TokenReviews (repeatable); tokens must carry one of them.
    #[arg(long = "token-review-audience", default_values = ["istio-ca"], value_name = "AUD", requires = "kubernetes")]
    token_review_audiences: Vec<String>,
    /// Service account of the node agents, NAMESPACE/NAME (repeatable): its pods may ask for
    /// the identities of pods running on their own node.
    #[arg(long = "trusted-agent", default_values = [citadel_ca::k8s::DEFAULT_TRUSTED_AGENT], value_name = "NS/SA", requires = "kubernetes")]
    trusted_agents: Vec<String>,
    /// Namespace the CA runs in (its Secret and Lease live there).
    #[arg(long, env = "CITADEL_CA_NAMESPACE", default_value = citadel_ca::k8s::DEFAULT_CA_NAMESPACE, value_name = "NS")]
    ca_namespace: String,
    #[command(flatten)]
    limits: citadel_ca::limits::LimitsArgs,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<ServeConfig> {
        let trust_domain = TrustDomain::new(&self.trust_domain)
            .with_context(|| format!("--trust-domain {:?}", self.trust_domain))?;
        let lifetime = LifetimePolicy {
            default_ttl_secs: self.default_ttl,
            max_ttl_secs: self.max_ttl,
            ..LifetimePolicy::default()
        };
        citadel_identity::lifetime::validate_policy(&lifetime)
            .context("--default-ttl/--max-ttl")?;
        anyhow::ensure!(
            self.root_ttl > self.max_ttl,
            "--root-ttl must be longer than --max-ttl"
        );
        anyhow::ensure!(
            self.bundle_poll_interval > 0,
            "--bundle-poll-interval must be at least 1s"
        );
        anyhow::ensure!(
            self.policies_poll_interval > 0,
            "--policies-poll-interval must be at least 1s"
        );
        let jwt = match (self.jwt_issuer, self.jwt_jwks) {
            (Some(issuer), Some(jwks)) => Some(JwtConfig {
                issuer,
                audiences: self.jwt_audiences,
                jwks: JwksSource::parse(&jwks).map_err(anyhow::Error::msg)?,
                trust_domain: trust_domain.clone(),
                refresh_interval: std::time::Duration::from_secs(
                    self.jwt_jwks_refresh_interval.max(1).unsigned_abs(),
                ),
                extra_roots: self.jwks_extra_roots.clone(),
            }),
            _ => None,
        };
        let kubernetes = if self.kubernetes {
            anyhow::ensure!(
                !self.token_review_audiences.is_empty(),
                "--token-review-audience needs at least one audience"
            );
            let trusted_agents = self
                .trusted_agents
                .iter()
                .map(|a| citadel_ca::k8s::TrustedAgent::parse(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)
                .context("--trusted-agent")?;
            let mut k8s =
                citadel_ca::k8s::KubernetesConfig::new(citadel_ca::k8s::KubeConnection::Infer);
            k8s.token_review_audiences = self.token_review_audiences;
            k8s.trusted_agents = trusted_agents;
            k8s.ca_namespace = self.ca_namespace;
            Some(k8s)
        } else {
            None
        };
        let limits = self
            .limits
            .into_limits()
            .map_err(anyhow::Error::msg)
            .context("resource limits")?;
        let mut ip_addresses = self.ip_addresses;
        if !self.listen.ip().is_unspecified() && !ip_addresses.contains(&self.listen.ip()) {
            ip_addresses.push(self.listen.ip());
        }
        Ok(ServeConfig {
            data_dir: self.store.data_dir,
            database_url: self.store.database_url,
            trust_domain,
            listen: self.listen,
            http_listen: self.http_listen,
            dns_names: self.dns_names,
            ip_addresses,
            ca_dir: self.ca_dir,
            key_encryption_key_file: self.key_encryption_key_file,
            lifetime,
            root_lifetime_secs: self.root_ttl,
            jwt,
            bundle_poll_interval: std::time::Duration::from_secs(
                self.bundle_poll_interval.unsigned_abs(),
            ),
            policies_dir: self.policies,
            policies_poll_interval: std::time::Duration::from_secs(
                self.policies_poll_interval.unsigned_abs(),
            ),
            root_namespace: self.root_namespace,
            kubernetes,
            limits,
            ledger_checkpoint_interval: std::time::Duration::from_secs(
                self.ledger_checkpoint_interval.max(1).unsigned_abs(),
            ),
            root_renewal: (!self.no_root_renewal)
                .then(|| citadel_ca::rotation::RenewalPolicy::new(self.root_renewal_at))
                .transpose()
                .map_err(anyhow::Error::msg)
                .context("--root-renewal-at")?,
            policy_jwks: citadel_ca::policy_jwks::PolicyJwksConfig {
                refresh_interval: std::time::Duration::from_secs(
                    self.jwks_refresh_interval.max(1).unsigned_abs(),
                ),
                retry_interval: std::time::Duration::from_secs(
                    self.jwks_retry_interval.max(1).unsigned_abs(),
                ),
                extra_roots: self.jwks_extra_roots,
            },
        })
    }
}

/// A fraction strictly between 0 and 1, as a decimal (`0.75`) or a ratio (`2/3`).
fn parse_fraction(text: &str) -> Result<f64, String> {
    let value = match text.split_once('/') {
        Some((n, d)) => {
            let n: f64 = n
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a ratio"))?;
            let d: f64 = d
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a ratio"))?;
            n / d
        }
        None => text
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a number"))?,
    };
    citadel_ca::rotation::RenewalPolicy::new(value).map(|p| p.prepare_at)
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Serve(args) => {
            let config = args.into_config()?;
            tracing::info!(
                data_dir = %config.data_dir.display(),
                store = %redact_url(&config.store_url()),
                trust_domain = %config.trust_domain,
                listen = %config.listen,
                http_listen = %config.http_listen,
                default_ttl_secs = config.lifetime.default_ttl_secs,
                max_ttl_secs = config.lifetime.max_ttl_secs,
                jwt = config.jwt.is_some(),
                kubernetes = config.kubernetes.is_some(),
                bundle_poll_interval_secs = config.bundle_poll_interval.as_secs(),
                policies = ?config.policies_dir,
                policies_poll_interval_secs = config.policies_poll_interval.as_secs(),
                root_namespace = %config.root_namespace,
                limits = ?config.limits,
                "starting"
            );
            let ca = citadel_ca::serve::start(config).await?;
            wait_for_signal().await;
            tracing::info!("shutting down");
            ca.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Root { command } => run_root(command, &mut stdout).await,
        Command::Ledger {
            command:
                LedgerCommand::Verify {
                    store,
                    ledger_public_key,
                },
        } => {
            let key_file = ledger_public_key
                .unwrap_or_else(|| store.data_dir.join(citadel_ca::checkpoint::PINNED_KEY_FILE));
            let store = store.open().await?;
            let ok = citadel_ca::cli::ledger_verify(
                store.as_ref(),
                store.as_ref(),
                &key_file,
                &mut stdout,
            )
            .await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Certs {
            command:
                CertsCommand::List {
                    store,
                    spiffe_id,
                    live,
                    limit,
                    json,
                },
        } => {
            let store = store.open().await?;
            let filter = citadel_store::LedgerFilter {
                spiffe_id,
                live_at: live.then(unix_now),
                limit,
                ..Default::default()
            };
            citadel_ca::cli::certs_list(store.as_ref(), &filter, json, &mut stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(args) => policy_cmd::run(*args),
        Command::Node {
            command:
                NodeCommand::List {
                    store,
                    trust_domain,
                    json,
                },
        } => {
            let td = TrustDomain::new(&trust_domain).context("--trust-domain")?;
            let store = store.open().await?;
            citadel_ca::cli::node_list(store.as_ref(), &td, json, &mut stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node {
            command: NodeCommand::Evict { store, node },
        } => {
            // Validate before opening the store: a bad name never touches it.
            citadel_ca::node::validate_node_name(&node)?;
            let store = store.open().await?;
            citadel_ca::cli::node_evict(store.as_ref(), &node, unix_now(), &mut stdout).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    store,
                    node,
                    allow,
                    ttl,
                    trust_domain,
                },
        } => {
            let td = TrustDomain::new(&trust_domain).context("--trust-domain")?;
            // Validate before opening the store: bad input never touches it.
            let grant = join_token::validate_grant(&td, &node, &allow, ttl)?;
            let store = store.open().await?;
            let (token, record) = join_token::create(store.as_ref(), &grant, unix_now()).await?;
            eprintln!(
                "join token for node {} (allows {}), expires {}; it is shown only once",
                record.node_name,
                record.allowed_ids.join(", "),
                citadel_ca::cli::fmt_time(record.expires_at)
            );
            writeln!(stdout, "{token}")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A store URL without its password, for logs.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_database_password() {
        assert_eq!(
            redact_url("postgres://user:secret@db:5432/x"),
            "postgres://user:***@db:5432/x"
        );
        assert_eq!(redact_url("sqlite:///a/b.db"), "sqlite:///a/b.db");
    }

    #[test]
    fn renewal_fraction_parses_decimals_and_ratios_and_rejects_the_rest() {
        assert_eq!(parse_fraction("2/3"), Ok(2.0 / 3.0));
        assert_eq!(parse_fraction("0.75"), Ok(0.75));
        for bad in ["1", "0", "3/2", "1/0", "x", "1/x", "-0.5"] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
