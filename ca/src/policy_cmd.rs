//! `citadel policy …`: validate policy files and explain a decision.
//!
//! A thin shell: it reads files and directories (recursively, `.yaml`/`.yml`/`.json`,
//! in sorted order, with the same walk `citadel serve --policies` uses), hands their text to `citadel-policy`, and prints what comes back.
//! All semantics live in the policy crate.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use citadel_ca::policy_source::read_policy_files;
use citadel_policy::explain::{check, render_json, render_text};
use citadel_policy::{
    AuthnOutcome, Loader, MeshConfig, OwnedHttp, OwnedJwt, OwnedRequest, PolicySet,
    join_repeated_headers, parse_key_value, parse_labels, principal_from_spiffe_id,
};

/// Arguments of `citadel policy`.
#[derive(clap::Args, Debug)]
pub struct PolicyArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// The policy subcommands.
// Parsed once per process; boxing `CheckArgs` would only obscure the clap types.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate PeerAuthentication and AuthorizationPolicy files; exit 1 listing
    /// every error.
    Validate(ValidateArgs),
    /// Show the effective mTLS mode and the authorization decision for one
    /// connection or HTTP request, and the policy and rule that made it.
    Check(CheckArgs),
}

/// `citadel policy validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Files or directories (searched recursively for .yaml, .yml and .json).
    #[arg(required = true, value_name = "DIR_OR_FILE")]
    pub paths: Vec<PathBuf>,
    /// The mesh root namespace: its namespace-wide policies apply mesh-wide.
    #[arg(long, default_value = "istio-system", env = "CITADEL_ROOT_NAMESPACE")]
    pub root_namespace: String,
}

/// `citadel policy check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Policy files or directories (repeatable).
    #[arg(long, required = true, value_name = "DIR_OR_FILE")]
    pub policies: Vec<PathBuf>,
    /// The peer's SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>); omit for a plaintext peer.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub from: Option<String>,
    /// The peer's IP address (default: unknown; rules on source.ip then fail closed).
    #[arg(long, value_name = "IP")]
    pub from_ip: Option<IpAddr>,
    /// The original client IP (X-Forwarded-For); default: the peer IP.
    #[arg(long, value_name = "IP")]
    pub remote_ip: Option<IpAddr>,
    /// Namespace of the destination workload.
    #[arg(long, value_name = "NAMESPACE")]
    pub to_namespace: String,
    /// Labels of the destination workload: key=value,key=value.
    #[arg(long, value_name = "LABELS", default_value = "")]
    pub to_labels: String,
    /// The destination IP (default: unknown; rules on destination.ip then fail closed).
    #[arg(long, value_name = "IP")]
    pub to_ip: Option<IpAddr>,
    /// The destination workload port.
    #[arg(long)]
    pub port: u16,
    /// TLS SNI sent by the peer.
    #[arg(long)]
    pub sni: Option<String>,
    /// HTTP method (any HTTP flag makes this an HTTP request; default GET).
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP path (default /).
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP host (:authority).
    #[arg(long)]
    pub host: Option<String>,
    /// HTTP header name=value (repeatable; repeated names are joined with ",").
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Verified JWT principal <iss>/<sub> of the HTTP request.
    #[arg(long, value_name = "ISS/SUB", conflicts_with = "jwt")]
    pub request_principal: Option<String>,
    /// A claim of that verified JWT (repeatable; a list claim is given once per value;
    /// a nested claim as `a][b=v`, as it is written in `request.auth.claims[a][b]`).
    #[arg(
        long = "claim",
        value_name = "NAME=VALUE",
        requires = "request_principal"
    )]
    pub claims: Vec<String>,
    /// An end-user JWT as the client would send it (`Authorization: Bearer`): it is
    /// judged by the RequestAuthentications that apply to the destination, now, and its
    /// principal and claims go to authorization.
    #[arg(long, value_name = "TOKEN")]
    pub jwt: Option<String>,
    /// The JWKS document for a rule's jwksUri (the CA fetches these; repeatable).
    #[arg(long = "jwks-file", value_name = "URI=FILE", requires = "jwt")]
    pub jwks_files: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The mesh root namespace.
    #[arg(long, default_value = "istio-system", env = "CITADEL_ROOT_NAMESPACE")]
    pub root_namespace: String,
}

/// Runs `citadel policy …`.
pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        PolicyCommand::Validate(a) => validate(a),
        PolicyCommand::Check(a) => run_check(a),
    }
}

/// Reads every file into the loader.
fn load(paths: &[PathBuf], root_namespace: &str) -> anyhow::Result<(Loader, usize)> {
    let files = read_policy_files(paths)?;
    let mut loader = Loader::new(MeshConfig {
        root_namespace: root_namespace.to_owned(),
    });
    for f in &files {
        loader.add_source(&f.name, &f.text);
    }
    Ok((loader, files.len()))
}

fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let (loader, files) = load(&args.paths, &args.root_namespace)?;
    let objects = loader.objects().len();
    let result = loader.finish();
    let diagnostics = match &result {
        Ok((_, warnings)) => warnings,
        Err(e) => &e.diagnostics,
    };
    let mut err = std::io::stderr().lock();
    for d in diagnostics {
        writeln!(err, "{d}")?;
    }
    match result {
        Ok(_) => {
            println!(
                "ok: {objects} polic{} in {files} file(s)",
                if objects == 1 { "y" } else { "ies" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let n = e.diagnostics.iter().filter(|d| d.is_error()).count();
            writeln!(err, "{n} error(s)")?;
            Ok(ExitCode::from(1))
        }
    }
}

fn build_request(a: &CheckArgs) -> anyhow::Result<OwnedRequest> {
    let principal = a
        .from
        .as_deref()
        .map(principal_from_spiffe_id)
        .transpose()?;
    let is_http = a.method.is_some()
        || a.path.is_some()
        || a.host.is_some()
        || !a.headers.is_empty()
        || a.request_principal.is_some()
        || a.jwt.is_some();
    let headers = a
        .headers
        .iter()
        .map(|h| parse_key_value(h))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(OwnedRequest {
        principal,
        source_ip: a.from_ip,
        remote_ip: a.remote_ip,
        namespace: a.to_namespace.clone(),
        labels: parse_labels(&a.to_labels)?,
        destination_ip: a.to_ip,
        port: a.port,
        sni: a.sni.clone(),
        http: is_http.then_some(OwnedHttp {
            method: a.method.clone().unwrap_or_else(|| "GET".to_owned()),
            path: a.path.clone().unwrap_or_else(|| "/".to_owned()),
            host: a.host.clone().unwrap_or_default(),
            headers: join_repeated_headers(headers),
            jwt: match &a.request_principal {
                Some(p) => Some(OwnedJwt {
                    principal: p.clone(),
                    claims: a
                        .claims
                        .iter()
                        .map(|c| parse_key_value(c))
                        .collect::<Result<Vec<_>, _>>()?,
                    ..OwnedJwt::default()
                }),
                None => None,
            },
        }),
    })
}

fn run_check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut owned = build_request(&args)?;
    let (mut loader, _) = load(&args.policies, &args.root_namespace)?;
    for item in &args.jwks_files {
        let (uri, path) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--jwks-file {item:?} is not URI=FILE"))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--jwks-file {path}: {e}"))?;
        loader.add_remote_jwks(uri, &text);
    }
    let set: PolicySet = match loader.finish() {
        Ok((set, warnings)) => {
            let mut err = std::io::stderr().lock();
            for w in &warnings {
                writeln!(err, "{w}")?;
            }
            set
        }
        Err(e) => {
            let mut err = std::io::stderr().lock();
            for d in &e.diagnostics {
                writeln!(err, "{d}")?;
            }
            writeln!(err, "the policies are invalid; fix them before checking")?;
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(token) = &args.jwt {
        let labels: Vec<(&str, &str)> = owned
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let workload = citadel_policy::Workload {
            namespace: &owned.namespace,
            labels: &labels,
        };
        let providers = set.jwt_providers(&workload);
        let outcome = citadel_policy::authenticate(
            &providers,
            |_| Some(token.as_str()),
            citadel_ca::clock::unix_now(),
        );
        let (line, jwt) = match outcome {
            AuthnOutcome::NoPolicy => (
                "no RequestAuthentication applies: the token is not looked at (no request principal)".to_owned(),
                None,
            ),
            AuthnOutcome::Anonymous => ("no token".to_owned(), None),
            AuthnOutcome::Verified(v) => (
                format!("verified by {}: principal {}", v.provider.source, v.jwt.principal()),
                Some(OwnedJwt::from_verified(&v.jwt)),
            ),
            AuthnOutcome::Rejected(r) => {
                if args.json {
                    let out = serde_json::json!({
                        "request_authentication": {"status": r.status, "error": r.error.to_string()},
                        "decision": "DENY",
                    });
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    println!("request auth:  {} {} (refused before authorization)", r.status, r.error);
                    println!("decision:      DENY");
                }
                return Ok(ExitCode::SUCCESS);
            }
        };
        if !args.json {
            println!("request auth:  {line}");
        }
        if let Some(http) = owned.http.as_mut() {
            http.jwt = jwt;
        }
    }
    let parts = owned.parts();
    let request = parts.request();
    let report = check(&set, &request);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&render_json(&report))?);
    } else {
        print!("{}", render_text(&report, &request));
    }
    Ok(ExitCode::SUCCESS)
}
