//! Signed ledger checkpoints with the real binary and a real SQLite database: a ledger whose
//! every row and head were rewritten consistently passes the hash chain but not the checkpoint,
//! and a checkpoint altered in the database does not verify.

use std::path::Path;
use std::process::Command;

use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::process::{CaProcess, citadel};
use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};

/// Rewrites every ledger row's SPIFFE ID and recomputes the whole chain and the head exactly as
/// the store does (the encoding of `store/src/chain.rs`), so the hash chain is consistent again.
const REWRITE_LEDGER: &str = r#"
import hashlib, sqlite3, struct, sys
db = sqlite3.connect(sys.argv[1])
def s(x):
    b = x.encode()
    return struct.pack(">Q", len(b)) + b
prev = bytes(32)
rows = db.execute("select seq, serial_hex, spiffe_id, authority_id, not_before, not_after, requester, node, der_sha256, issued_at from issuances order by seq").fetchall()
for (seq, serial, spiffe, auth, nb, na, req, node, der, issued) in rows:
    if spiffe.startswith("spiffe://"):
        spiffe = "spiffe://cluster.local/ns/evil/sa/evil"
    m = s("citadel.ledger.row.v1") + struct.pack(">q", seq) + prev + s(serial) + s(spiffe) + s(auth)
    m += struct.pack(">q", nb) + struct.pack(">q", na) + s(req)
    m += b"\x00" if node is None else b"\x01" + s(node)
    m += bytes.fromhex(der) + struct.pack(">q", issued)
    h = hashlib.sha256(m).digest()
    db.execute("update issuances set spiffe_id = ?, prev_hash = ?, row_hash = ? where seq = ?", (spiffe, prev.hex(), h.hex(), seq))
    prev = h
db.execute("update ledger_head set last_seq = ?, last_hash = ? where id = 1", (len(rows), prev.hex()))
db.commit()
print(len(rows))
"#;

fn python(args: &[&str]) -> String {
    let out = Command::new("python3").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sql(db: &Path, statement: &str) {
    let script = format!(
        "import sqlite3; c = sqlite3.connect({:?}); c.execute({statement:?}); c.commit()",
        db.display().to_string()
    );
    python(&["-c", &script]);
}

fn verify(data: &Path) -> (bool, String) {
    let out = citadel(&[
        "ledger",
        "verify",
        "--data-dir",
        &data.display().to_string(),
    ])
    .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A CA that issued three workload certificates and stopped cleanly (which signs a last
/// checkpoint); returns the data directory.
async fn ledger_with_a_checkpoint(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, tokens.jwks()).unwrap();
    let flags = [
        "--jwt-issuer",
        TEST_ISSUER,
        "--jwt-jwks",
        jwks.to_str().unwrap(),
    ];
    let mut ca = CaProcess::start(&data, &flags).await.unwrap();
    let bundle = ca.bundle_pem().unwrap();
    let mut client = connect(ca.grpc_addr, &bundle, None).await.unwrap();
    for sa in ["a", "b", "c"] {
        let id = format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        let csr = p256_csr(&[&id]).unwrap();
        create(
            &mut client,
            request(&csr.pem, 0, Some(&tokens.token("shop", sa)), None),
        )
        .await
        .unwrap();
    }
    assert!(ca.stop().await.unwrap().success());
    data
}

#[tokio::test]
async fn ledger_verify_detects_a_fully_rewritten_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let data = ledger_with_a_checkpoint(tmp.path()).await;
    let (ok, out) = verify(&data);
    assert!(ok, "{out}");
    // The clean shutdown checkpointed the last row: serving certificate + 3 workloads.
    assert!(out.contains("signed checkpoint at row 4"), "{out}");

    let db = data.join("citadel.db");
    let rewritten = python(&["-c", REWRITE_LEDGER, db.to_str().unwrap()]);
    assert_eq!(rewritten.trim(), "4");
    let (ok, out) = verify(&data);
    assert!(!ok, "a fully rewritten ledger passed: {out}");
    // The chain alone is consistent again: only the checkpoint tells.
    assert!(out.contains("self-consistent"), "{out}");
    assert!(
        out.contains("row 4 does not carry the hash signed in its checkpoint"),
        "{out}"
    );

    // Moving the checkpoint onto the rewritten chain breaks its signature instead.
    let head: String = python(&[
        "-c",
        &format!(
            "import sqlite3; print(sqlite3.connect({:?}).execute('select last_hash from ledger_head').fetchone()[0])",
            db.display().to_string()
        ),
    ]);
    sql(
        &db,
        &format!(
            "update ledger_checkpoints set head_hash = '{}' where seq = 4",
            head.trim()
        ),
    );
    let (ok, out) = verify(&data);
    assert!(
        !ok,
        "a checkpoint moved onto the rewritten chain passed: {out}"
    );
    assert!(out.contains("does not verify"), "{out}");

    // And without any checkpoint the rewritten ledger is still refused.
    sql(&db, "delete from ledger_checkpoints");
    let (ok, out) = verify(&data);
    assert!(!ok, "{out}");
    assert!(out.contains("no signed checkpoint"), "{out}");
}

#[tokio::test]
async fn ledger_verify_refuses_a_checkpoint_whose_signature_was_altered() {
    let tmp = tempfile::tempdir().unwrap();
    let data = ledger_with_a_checkpoint(tmp.path()).await;
    let db = data.join("citadel.db");
    // Flip the last hex digit of the newest checkpoint's signature.
    sql(
        &db,
        "update ledger_checkpoints set signature = substr(signature, 1, length(signature) - 1) \
         || case substr(signature, -1) when '0' then '1' else '0' end \
         where seq = (select max(seq) from ledger_checkpoints)",
    );
    let (ok, out) = verify(&data);
    assert!(!ok, "an altered checkpoint signature passed: {out}");
    assert!(out.contains("forged or altered"), "{out}");
}

#[tokio::test]
async fn ledger_verify_without_the_pinned_key_refuses_to_vouch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = ledger_with_a_checkpoint(tmp.path()).await;
    let pinned = data.join("ledger-key.pub.pem");
    let copy = tmp.path().join("auditor.pub.pem");
    std::fs::rename(&pinned, &copy).unwrap();
    let (ok, out) = verify(&data);
    assert!(!ok, "{out}");
    assert!(out.contains("UNVERIFIED"), "{out}");
    // An auditor's copy of the key works in its place.
    let out = citadel(&[
        "ledger",
        "verify",
        "--data-dir",
        data.to_str().unwrap(),
        "--ledger-public-key",
        copy.to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn a_ca_whose_ledger_key_differs_from_the_pinned_one_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = ledger_with_a_checkpoint(tmp.path()).await;
    // Someone replaced the ledger key in the key store.
    let key = data.join("keys").join("ledger-checkpoint.key.pem");
    std::fs::remove_file(&key).unwrap();
    let err = CaProcess::start(&data, &[])
        .await
        .err()
        .expect("the CA started with another ledger key");
    assert!(err.to_string().contains("exited early"), "{err:#}");
}
