use super::*;
use crate::keystore::MemoryKeyStore;
use citadel_store::LedgerStore;
use citadel_store::memory::MemoryStore;

fn signer() -> LedgerSigner {
    LedgerSigner::generate().unwrap().0
}

#[test]
fn a_checkpoint_signed_by_the_ledger_key_verifies() {
    let s = signer();
    let c = s.sign(42, [7; 32], 1_700_000_000).unwrap();
    assert_eq!(
        (c.seq, c.head_hash, c.signed_at),
        (42, [7; 32], 1_700_000_000)
    );
    assert_eq!(c.key_id, s.public().key_id());
    verify_signature(s.public(), &c).unwrap();
}

#[test]
fn rejects_a_checkpoint_whose_signature_was_tampered() {
    let s = signer();
    let good = s.sign(42, [7; 32], 1_700_000_000).unwrap();
    let mut flipped = good.clone();
    let last = flipped.signature.len() - 1;
    flipped.signature[last] ^= 1;
    let reason = verify_signature(s.public(), &flipped).unwrap_err();
    assert!(reason.contains("does not verify"), "{reason}");
    // A signature that is not DER at all.
    let mut garbage = good.clone();
    garbage.signature = vec![0xff; 3];
    assert!(verify_signature(s.public(), &garbage).is_err());
    // judge() turns it into a broken ledger, even when the row matches.
    assert!(matches!(
        judge(s.public(), Some(&flipped), Some([7; 32]), 42),
        CheckpointVerdict::Broken(_)
    ));
}

#[test]
fn rejects_a_checkpoint_whose_fields_were_changed_under_its_signature() {
    let s = signer();
    let good = s.sign(42, [7; 32], 1_700_000_000).unwrap();
    let mut variants = Vec::new();
    let mut c = good.clone();
    c.head_hash[0] ^= 1;
    variants.push(c);
    let mut c = good.clone();
    c.seq += 1;
    variants.push(c);
    let mut c = good.clone();
    c.signed_at += 1;
    variants.push(c);
    for c in &variants {
        assert!(verify_signature(s.public(), c).is_err(), "{c:?}");
    }
}

#[test]
fn rejects_a_checkpoint_signed_by_another_key() {
    let pinned = signer();
    let other = signer();
    let c = other.sign(3, [1; 32], 10).unwrap();
    let reason = verify_signature(pinned.public(), &c).unwrap_err();
    assert!(reason.contains("not the pinned key"), "{reason}");
    // Claiming the pinned key's id does not help: the signature is checked with the pinned key.
    let mut claimed = c.clone();
    claimed.key_id = pinned.public().key_id();
    assert!(
        verify_signature(pinned.public(), &claimed)
            .unwrap_err()
            .contains("does not verify")
    );
}

#[test]
fn judge_requires_the_checkpointed_row_to_carry_the_signed_hash() {
    let s = signer();
    let c = s.sign(5, [9; 32], 100).unwrap();
    assert_eq!(
        judge(s.public(), Some(&c), Some([9; 32]), 7),
        CheckpointVerdict::Vouched(c.clone())
    );
    let CheckpointVerdict::Broken(rewritten) = judge(s.public(), Some(&c), Some([8; 32]), 7) else {
        panic!("a rewritten row passed");
    };
    assert!(rewritten.contains("row 5"), "{rewritten}");
    assert!(rewritten.contains("rewritten"), "{rewritten}");
    let CheckpointVerdict::Broken(missing) = judge(s.public(), Some(&c), None, 4) else {
        panic!("a truncated ledger passed");
    };
    assert!(missing.contains("missing"), "{missing}");
}

#[test]
fn judge_accepts_an_empty_ledger_and_refuses_rows_without_any_checkpoint() {
    let s = signer();
    assert_eq!(judge(s.public(), None, None, 0), CheckpointVerdict::Empty);
    assert!(matches!(
        judge(s.public(), None, None, 3),
        CheckpointVerdict::Broken(r) if r.contains("no signed checkpoint")
    ));
}

#[test]
fn checkpoint_message_covers_every_field_unambiguously() {
    let base = checkpoint_message(1, &[2; 32], 3, &[4; 32]);
    assert_ne!(base, checkpoint_message(2, &[2; 32], 3, &[4; 32]));
    assert_ne!(base, checkpoint_message(1, &[5; 32], 3, &[4; 32]));
    assert_ne!(base, checkpoint_message(1, &[2; 32], 4, &[4; 32]));
    assert_ne!(base, checkpoint_message(1, &[2; 32], 3, &[5; 32]));
    assert!(base.starts_with(&(DOMAIN_TAG.len() as u64).to_be_bytes()));
}

#[test]
fn keys_round_trip_through_pem_and_other_curves_are_refused() {
    let (s, pem) = LedgerSigner::generate().unwrap();
    let again = LedgerSigner::from_key_pem(&pem).unwrap();
    assert_eq!(again.public(), s.public());
    let public = LedgerPublicKey::from_pem(&s.public().to_pem()).unwrap();
    assert_eq!(&public, s.public());
    // A P-384 key, and a private key offered as a public one.
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    assert!(LedgerPublicKey::from_pem(&p384.public_key_pem()).is_err());
    assert!(LedgerSigner::from_key_pem(&KeyPem::new(p384.serialize_pem())).is_err());
    assert!(LedgerPublicKey::from_pem(pem.expose()).is_err());
    assert!(!format!("{s:?}").contains("PRIVATE"));
}

#[tokio::test]
async fn the_ledger_key_is_created_once_and_then_loaded() {
    let keys = MemoryKeyStore::default();
    let first = load_or_create_signer(&keys).await.unwrap();
    let second = load_or_create_signer(&keys).await.unwrap();
    assert_eq!(first.public(), second.public());
}

#[test]
fn a_pinned_key_refuses_another_ledger_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = signer();
    pin_public_key(dir.path(), a.public()).unwrap();
    pin_public_key(dir.path(), a.public()).unwrap();
    let err = pin_public_key(dir.path(), signer().public()).unwrap_err();
    assert!(format!("{err:#}").contains("not the one pinned"), "{err:#}");
}

#[tokio::test]
async fn the_checkpointer_signs_the_head_once_per_new_seq() {
    let store = Arc::new(MemoryStore::new());
    let cp = Checkpointer::new(store.clone(), signer());
    // Nothing to vouch for on an empty ledger.
    assert_eq!(cp.checkpoint_now(10).await.unwrap(), None);
    let issuance = |n: u8| citadel_store::NewIssuance {
        serial_hex: format!("{n:02x}"),
        spiffe_id: "spiffe://td/a".into(),
        authority_id: "a".into(),
        not_before: 1,
        not_after: 2,
        requester: "r".into(),
        node: None,
        der_sha256: [n; 32],
        issued_at: 1,
    };
    let rows = store
        .append_issuances(&[issuance(1), issuance(2)])
        .await
        .unwrap();
    let c = cp.checkpoint_now(11).await.unwrap().unwrap();
    assert_eq!((c.seq, c.head_hash), (2, rows[1].row_hash));
    assert_eq!(cp.checkpoint_now(12).await.unwrap(), None);
    store.append_issuances(&[issuance(3)]).await.unwrap();
    assert_eq!(cp.checkpoint_now(13).await.unwrap().unwrap().seq, 3);
    assert_eq!(store.latest_checkpoint().await.unwrap().unwrap().seq, 3);
}

#[tokio::test]
async fn the_checkpointer_refuses_to_sign_over_a_ledger_that_fails_the_newest_checkpoint() {
    let store = Arc::new(MemoryStore::new());
    let cp = Checkpointer::new(store.clone(), signer());
    let issuance = |n: u8| citadel_store::NewIssuance {
        serial_hex: format!("{n:02x}"),
        spiffe_id: "spiffe://td/a".into(),
        authority_id: "a".into(),
        not_before: 1,
        not_after: 2,
        requester: "r".into(),
        node: None,
        der_sha256: [n; 32],
        issued_at: 1,
    };
    store.append_issuances(&[issuance(1)]).await.unwrap();
    cp.checkpoint_now(10).await.unwrap().unwrap();
    // Row 1 rewritten with a consistent chain and head, then the ledger grows.
    store.tamper_with_ledger(|rows| {
        let row = rows.iter_mut().find(|r| r.seq == 1).unwrap();
        row.issuance.spiffe_id = "spiffe://td/evil".into();
        row.row_hash = citadel_store::row_hash(1, &row.prev_hash, &row.issuance);
    });
    store.append_issuances(&[issuance(2)]).await.unwrap();
    let err = cp.checkpoint_now(11).await.unwrap_err();
    assert!(err.to_string().contains("rewritten"), "{err}");
    assert_eq!(store.latest_checkpoint().await.unwrap().unwrap().seq, 1);
}
