//! `citadel-load`: a load generator for the CA's CSR API.
//!
//! It starts a real `citadel serve` (the binary next to this one) on
//! loopback with a fresh data directory and a JWKS it controls, then drives
//! N concurrent clients, each sending real CSRs with valid service-account
//! JWTs over TLS, and prints certificates per second and latency
//! percentiles. Beside that it measures, in this process on one core, the
//! crypto ceiling of an issuance (verify one CSR signature, sign one leaf),
//! and then `cfssl serve` driven by `wrk` at the same concurrency (see
//! [`citadel_e2e::cfssl_bench`]; skipped with a message when either is not
//! installed), and prints both ratios.
//!
//! ```text
//! cargo build --release -p citadel-ca -p citadel-e2e
//! target/release/citadel-load --requests 10000 --concurrency 64
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel_e2e::cfssl_bench::{self, missing_tool};
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::process::CaProcess;
use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};
use clap::Parser;
use x509_parser::prelude::FromDer;

/// Load generator for the Citadel CA.
#[derive(Parser, Debug)]
#[command(name = "citadel-load", about)]
struct Args {
    /// Total certificate requests.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC connections the clients share (HTTP/2 multiplexes the rest).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Distinct CSRs to cycle through (made before the clock starts).
    #[arg(long, default_value_t = 256)]
    distinct_csrs: usize,
    /// Seconds spent measuring the crypto ceiling.
    #[arg(long, default_value_t = 3.0)]
    ceiling_seconds: f64,
    /// Store of the CA under test (default: SQLite in a temporary data directory).
    #[arg(long)]
    database_url: Option<String>,
    /// Seconds `wrk` drives `cfssl serve` for the comparison.
    #[arg(long, default_value_t = 5)]
    cfssl_seconds: u64,
    /// Skip the comparison with `cfssl serve`.
    #[arg(long)]
    no_cfssl: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// One issuance's crypto on this thread: verify a CSR's signature, sign a
/// leaf of the CA's profile with a P-256 authority. Returns operations/s.
fn crypto_ceiling(seconds: f64) -> anyhow::Result<f64> {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let csr = p256_csr(&["spiffe://cluster.local/ns/bench/sa/bench"])?;
    let der = rustls_pki_types::CertificateSigningRequestDer::from(
        pem_body(&csr.pem).ok_or_else(|| anyhow::anyhow!("csr pem"))?,
    );
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut ops = 0u64;
    while Instant::now() < deadline {
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        req.verify_signature().map_err(|e| anyhow::anyhow!("{e}"))?;
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(req.certification_request_info.subject_pki.raw)?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/bench/sa/bench".try_into()?,
        )];
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&ops.to_be_bytes()));
        std::hint::black_box(p.signed_by(&spki, &issuer)?);
        ops += 1;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.concurrency > 0 && args.connections > 0 && args.distinct_csrs > 0,
        "counts must be positive"
    );

    let ceiling = tokio::task::spawn_blocking({
        let s = args.ceiling_seconds;
        move || crypto_ceiling(s)
    })
    .await??;
    println!("crypto ceiling (1 core, CSR verify + leaf sign, P-256): {ceiling:.0} ops/s");

    let tmp = tempfile::tempdir()?;
    let tokens = TokenIssuer::new(TEST_ISSUER)?;
    let jwks = tmp.path().join("jwks.json");
    std::fs::write(&jwks, tokens.jwks())?;
    let mut flags = vec![
        "--jwt-issuer".to_string(),
        TEST_ISSUER.into(),
        "--jwt-jwks".into(),
        jwks.display().to_string(),
    ];
    if let Some(url) = &args.database_url {
        flags.push("--database-url".into());
        flags.push(url.clone());
    }
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ca = CaProcess::start(&tmp.path().join("data"), &flag_refs).await?;
    let bundle = ca.bundle_pem()?;

    let mut csrs = Vec::with_capacity(args.distinct_csrs);
    for i in 0..args.distinct_csrs {
        csrs.push(p256_csr(&[&format!("spiffe://cluster.local/ns/load/sa/w{}", i % 64)])?.pem);
    }
    let csrs = Arc::new(csrs);
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(connect(ca.grpc_addr, &bundle, None).await?);
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let mut client = clients[w % clients.len()].clone();
        let csrs = csrs.clone();
        let next = next.clone();
        let total = args.requests;
        // Each worker is one workload identity with its own token.
        let sa = format!("w{}", w % 64);
        let token = tokens.token("load", &sa);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                // A CSR whose URI matches this worker's identity.
                let csr = &csrs[(i / 64 * 64 + w % 64) % csrs.len()];
                let t = Instant::now();
                match create(&mut client, request(csr, 0, Some(&token), None)).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("request failed: {e}");
                        }
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(args.requests);
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let ok = latencies.len();
    let rate = ok as f64 / elapsed.as_secs_f64();
    println!(
        "issued {ok} certificates ({errors} errors) in {:.2} s with {} in flight over {} connections",
        elapsed.as_secs_f64(),
        args.concurrency,
        args.connections
    );
    println!(
        "throughput: {rate:.0} certs/s end to end (TLS, JWT check, CSR verify, sign, ledger durable)"
    );
    println!(
        "latency: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.90).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    drop(ca);
    // cfssl runs after the CA has stopped: each server has the machine to itself.
    let cfssl = if args.no_cfssl {
        println!("cfssl serve: skipped (--no-cfssl)");
        None
    } else if let Some(tool) = missing_tool(&["cfssl", "wrk"]) {
        println!(
            "cfssl serve: skipped ({tool} not found on PATH; install the Debian packages golang-cfssl and wrk)"
        );
        None
    } else {
        let run = cfssl_bench::measure(&csrs[0], args.concurrency, args.cfssl_seconds).await?;
        let ms = |v: Option<f64>| v.map_or_else(|| "?".to_owned(), |v| format!("{v:.1}"));
        println!(
            "cfssl serve: {:.0} certs/s ({} errors; wrk, {} connections, {} s; plain HTTP, no auth, no ledger); p50 {} ms, p99 {} ms",
            run.certs_per_sec,
            run.errors,
            args.concurrency,
            args.cfssl_seconds,
            ms(run.p50_ms),
            ms(run.p99_ms)
        );
        Some(run)
    };
    println!(
        "ratio citadel / one-core crypto ceiling: {:.2} (client and CA share this machine's {cores} cores)",
        rate / ceiling
    );
    match cfssl {
        Some(run) => println!(
            "ratio citadel / cfssl serve:             {:.2}",
            rate / run.certs_per_sec
        ),
        None => println!("ratio citadel / cfssl serve:             (not measured)"),
    }
    anyhow::ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}
