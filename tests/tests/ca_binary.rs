//! The real `citadel` binary: first start on an empty data directory,
//! certificates that OpenSSL verifies against `bundle.pem`, the operator
//! commands, ledger tamper detection, plug-in CAs, clean shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::process::{CaProcess, citadel};
use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {args:?} failed: {text}");
    text
}

/// `openssl verify -CAfile CA_FILE EXTRA… leaf.pem` in `dir` must say OK.
fn openssl_verify(dir: &Path, ca_file: &Path, extra: &[&str]) {
    let mut args = vec!["verify", "-CAfile", ca_file.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push("leaf.pem");
    let out = openssl(dir, &args);
    assert!(out.contains("leaf.pem: OK"), "{out}");
}

/// Writes a JWKS for `tokens` and returns the serve flags that trust it.
fn jwt_flags(dir: &Path, tokens: &TokenIssuer) -> Vec<String> {
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, tokens.jwks()).unwrap();
    vec![
        "--jwt-issuer".into(),
        TEST_ISSUER.into(),
        "--jwt-jwks".into(),
        jwks.display().to_string(),
    ]
}

async fn issue(ca: &CaProcess, trust_pem: &str, tokens: &TokenIssuer, sa: &str) -> Vec<String> {
    let id = format!("spiffe://cluster.local/ns/shop/sa/{sa}");
    let csr = p256_csr(&[&id]).unwrap();
    let mut client = connect(ca.grpc_addr, trust_pem, None).await.unwrap();
    create(
        &mut client,
        request(&csr.pem, 0, Some(&tokens.token("shop", sa)), None),
    )
    .await
    .unwrap()
    .cert_chain
}

fn data_args(ca_dir: &Path) -> [String; 2] {
    ["--data-dir".into(), ca_dir.display().to_string()]
}

#[tokio::test]
async fn serve_on_empty_dir_issues_chains_openssl_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let flags = jwt_flags(tmp.path(), &tokens);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut ca = CaProcess::start(&data, &flags).await.unwrap();
    let bundle = ca.bundle_pem().unwrap();
    let chain = issue(&ca, &bundle, &tokens, "web").await;

    std::fs::write(tmp.path().join("leaf.pem"), &chain[0]).unwrap();
    openssl_verify(
        tmp.path(),
        &data.join("bundle.pem"),
        &["-purpose", "sslclient"],
    );
    let text = openssl(tmp.path(), &["x509", "-in", "leaf.pem", "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/shop/sa/web"),
        "{text}"
    );

    // Private material is private.
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("keys")), 0o700);
    for key in std::fs::read_dir(data.join("keys")).unwrap() {
        assert_eq!(mode(&key.unwrap().path()), 0o600);
    }
    assert_eq!(mode(&data.join("citadel.db")), 0o600);

    // Operator commands read the same store while the CA runs.
    let args = data_args(&data);
    let status = citadel(&["root", "status", &args[0], &args[1]]).unwrap();
    let status_out = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status_out}");
    assert!(status_out.contains("active"), "{status_out}");
    assert!(
        status_out.contains(bundle.trim()),
        "root status must print the bundle:\n{status_out}"
    );
    let list = citadel(&[
        "certs",
        "list",
        &args[0],
        &args[1],
        "--json",
        "--spiffe-id",
        "spiffe://cluster.local/ns/shop/sa/web",
    ])
    .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    let verify = citadel(&["ledger", "verify", &args[0], &args[1]]).unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // SIGTERM is a clean shutdown; a restart keeps the same root.
    assert!(ca.stop().await.unwrap().success());
    let ca2 = CaProcess::start(&data, &flags).await.unwrap();
    assert_eq!(ca2.bundle_pem().unwrap(), bundle);
    issue(&ca2, &bundle, &tokens, "api").await;
}

#[tokio::test]
async fn ledger_verify_names_the_tampered_row() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let flags = jwt_flags(tmp.path(), &tokens);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut ca = CaProcess::start(&data, &flags).await.unwrap();
    let bundle = ca.bundle_pem().unwrap();
    for sa in ["a", "b", "c"] {
        issue(&ca, &bundle, &tokens, sa).await;
    }
    assert!(ca.stop().await.unwrap().success());
    let args = data_args(&data);
    assert!(
        citadel(&["ledger", "verify", &args[0], &args[1]])
            .unwrap()
            .status
            .success()
    );

    // Row 3 (the second workload certificate; row 1 is the CA's serving
    // certificate) now claims another identity.
    let db = data.join("citadel.db");
    let script = format!(
        "import sqlite3; c = sqlite3.connect({:?}); \
         c.execute(\"update issuances set spiffe_id = 'spiffe://cluster.local/ns/shop/sa/evil' where seq = 3\"); \
         c.commit()",
        db.display().to_string()
    );
    let py = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let verify = citadel(&["ledger", "verify", &args[0], &args[1]]).unwrap();
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(!verify.status.success(), "tampering went unnoticed: {out}");
    assert!(out.contains("row 3"), "{out}");
}

/// An operator CA in Istio's `cacerts` layout, made with OpenSSL.
fn make_istio_cacerts(dir: &Path, rsa_pkcs1: bool) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root-key.pem",
            "-out",
            "root-cert.pem",
            "-days",
            "3650",
            "-subj",
            "/O=Operator/CN=Operator Root CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    if rsa_pkcs1 {
        openssl(
            dir,
            &["genrsa", "-traditional", "-out", "ca-key.pem", "2048"],
        );
    } else {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ca-key.pem",
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-out",
            "ca.csr",
            "-subj",
            "/O=Operator/CN=Operator Intermediate CA",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\nsubjectAltName=URI:spiffe://cluster.local\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-out",
            "ca-cert.pem",
            "-days",
            "365",
            "-extfile",
            "ext.cnf",
        ],
    );
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap(),
        std::fs::read_to_string(dir.join("root-cert.pem")).unwrap()
    );
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    std::fs::set_permissions(
        dir.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(dir.join("root-key.pem")).unwrap();
}

async fn plugin_round_trip(rsa_pkcs1: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    make_istio_cacerts(&cacerts, rsa_pkcs1);
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let mut flags = jwt_flags(tmp.path(), &tokens);
    flags.push("--ca-dir".into());
    flags.push(cacerts.display().to_string());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ca = CaProcess::start(&tmp.path().join("data"), &flags)
        .await
        .unwrap();
    let root = std::fs::read_to_string(cacerts.join("root-cert.pem")).unwrap();
    assert_eq!(
        ca.bundle_pem().unwrap().trim(),
        root.trim(),
        "bundle.pem holds the operator's root"
    );
    let chain = issue(&ca, &root, &tokens, "web").await;
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    std::fs::write(tmp.path().join("leaf.pem"), &chain[0]).unwrap();
    std::fs::write(tmp.path().join("untrusted.pem"), &chain[1]).unwrap();
    openssl_verify(
        tmp.path(),
        &cacerts.join("root-cert.pem"),
        &["-untrusted", "untrusted.pem"],
    );
}

#[tokio::test]
async fn plugin_ca_in_istio_cacerts_layout_signs_verifiable_chains() {
    plugin_round_trip(false).await;
}

#[tokio::test]
async fn plugin_ca_with_pkcs1_rsa_key_is_accepted() {
    plugin_round_trip(true).await;
}

/// Runs `citadel serve --ca-dir CACERTS`, which must exit with an error; returns stderr.
fn serve_must_fail(tmp: &Path, cacerts: &Path) -> String {
    let out = citadel(&[
        "serve",
        "--data-dir",
        tmp.join("data").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--ca-dir",
        cacerts.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        !out.status.success(),
        "citadel serve should have refused to start"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn incomplete_ca_dir_is_a_clear_startup_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    make_istio_cacerts(&cacerts, false);
    std::fs::remove_file(cacerts.join("cert-chain.pem")).unwrap();
    let err = serve_must_fail(tmp.path(), &cacerts);
    assert!(err.contains("cert-chain.pem is missing"), "{err}");
}

#[test]
fn ca_key_that_does_not_match_is_a_clear_startup_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    make_istio_cacerts(&cacerts, false);
    openssl(
        &cacerts,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ca-key.pem",
        ],
    );
    std::fs::set_permissions(
        cacerts.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let err = serve_must_fail(tmp.path(), &cacerts);
    assert!(err.contains("does not belong"), "{err}");
}

#[test]
fn bad_flags_are_rejected_with_a_clear_message() {
    let out = citadel(&["serve", "--max-ttl", "ten days"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-ttl"));
    let out = citadel(&[
        "serve",
        "--trust-domain",
        "Bad_Domain!",
        "--data-dir",
        "/nonexistent/x",
    ])
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust-domain"));
}
