//! The ledger's hash chain: the row hash and the pure chain verifier.
//!
//! # Row hash encoding (version 1)
//!
//! `row_hash` is SHA-256 over the concatenation of, in this order:
//!
//! | item             | encoding                                                   |
//! |------------------|------------------------------------------------------------|
//! | domain tag       | `str("citadel.ledger.row.v1")`                             |
//! | `seq`            | 8 bytes, two's complement, big-endian                      |
//! | `prev_hash`      | 32 raw bytes                                               |
//! | `serial_hex`     | `str`                                                      |
//! | `spiffe_id`      | `str`                                                      |
//! | `authority_id`   | `str`                                                      |
//! | `not_before`     | 8 bytes, big-endian                                        |
//! | `not_after`      | 8 bytes, big-endian                                        |
//! | `requester`      | `str`                                                      |
//! | `node`           | `0x00` when absent; `0x01` followed by `str(node)`         |
//! | `der_sha256`     | 32 raw bytes                                               |
//! | `issued_at`      | 8 bytes, big-endian                                        |
//!
//! where `str(s)` is the byte length of the UTF-8 encoding of `s` as 8 bytes big-endian,
//! followed by those bytes. Every variable-length item carries its length and every optional
//! item a presence byte, so no two different rows encode to the same bytes.

use ring::digest;

use crate::model::{LedgerEntry, LedgerFault, LedgerVerification, NewIssuance};

/// The `prev_hash` of the first row (seq 1).
pub const GENESIS_HASH: [u8; 32] = [0; 32];

const DOMAIN_TAG: &str = "citadel.ledger.row.v1";

/// The hash of ledger row `seq` whose predecessor hashed to `prev_hash`. Pure; the encoding
/// is documented in this module.
pub fn row_hash(seq: i64, prev_hash: &[u8; 32], issuance: &NewIssuance) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let put_str = |ctx: &mut digest::Context, s: &str| {
        ctx.update(&(s.len() as u64).to_be_bytes());
        ctx.update(s.as_bytes());
    };
    put_str(&mut ctx, DOMAIN_TAG);
    ctx.update(&seq.to_be_bytes());
    ctx.update(prev_hash);
    put_str(&mut ctx, &issuance.serial_hex);
    put_str(&mut ctx, &issuance.spiffe_id);
    put_str(&mut ctx, &issuance.authority_id);
    ctx.update(&issuance.not_before.to_be_bytes());
    ctx.update(&issuance.not_after.to_be_bytes());
    put_str(&mut ctx, &issuance.requester);
    match &issuance.node {
        None => ctx.update(&[0]),
        Some(node) => {
            ctx.update(&[1]);
            put_str(&mut ctx, node);
        }
    }
    ctx.update(&issuance.der_sha256);
    ctx.update(&issuance.issued_at.to_be_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Links `batch` onto a chain whose last row is `last_seq` with hash `last_hash`.
/// Returns the new entries; the new head is the last one's `(seq, row_hash)`.
pub(crate) fn chain_batch(
    last_seq: i64,
    last_hash: [u8; 32],
    batch: &[NewIssuance],
) -> Vec<LedgerEntry> {
    let mut prev = last_hash;
    let mut out = Vec::with_capacity(batch.len());
    for (i, issuance) in batch.iter().enumerate() {
        let seq = last_seq + 1 + i as i64;
        let hash = row_hash(seq, &prev, issuance);
        out.push(LedgerEntry {
            seq,
            issuance: issuance.clone(),
            prev_hash: prev,
            row_hash: hash,
        });
        prev = hash;
    }
    out
}

/// Checks ledger rows one at a time, in seq order, so a backend can stream them.
///
/// Feed every row to [`ChainVerifier::check`] (a row that could not be decoded is passed as
/// `Err(reason)`), stop when it returns `false`, then call [`ChainVerifier::finish`] with the
/// head row.
#[derive(Debug)]
pub(crate) struct ChainVerifier {
    expected_seq: i64,
    prev_hash: [u8; 32],
    rows_checked: u64,
    fault: Option<LedgerFault>,
}

impl ChainVerifier {
    pub(crate) fn new() -> Self {
        ChainVerifier {
            expected_seq: 1,
            prev_hash: GENESIS_HASH,
            rows_checked: 0,
            fault: None,
        }
    }

    /// Checks the next row; returns whether the chain is still intact.
    pub(crate) fn check(&mut self, seq: i64, row: Result<LedgerEntry, String>) -> bool {
        if self.fault.is_some() {
            return false;
        }
        self.rows_checked += 1;
        let reason = match row {
            Err(reason) => Some(format!("row cannot be decoded: {reason}")),
            Ok(_) if seq != self.expected_seq => Some(format!(
                "sequence gap: expected {}, found {seq}",
                self.expected_seq
            )),
            Ok(entry) if row_hash(seq, &entry.prev_hash, &entry.issuance) != entry.row_hash => {
                Some("row hash does not match its contents".to_string())
            }
            Ok(entry) if entry.prev_hash != self.prev_hash => {
                Some("prev_hash does not match the previous row's hash".to_string())
            }
            Ok(entry) => {
                self.prev_hash = entry.row_hash;
                self.expected_seq += 1;
                None
            }
        };
        match reason {
            Some(reason) => {
                self.fault = Some(LedgerFault { seq, reason });
                false
            }
            None => true,
        }
    }

    /// Compares the head row (`Some((last_seq, last_hash))`, `None` when it is missing) with
    /// the last row checked, and returns the verdict.
    pub(crate) fn finish(self, head: Option<(i64, [u8; 32])>) -> LedgerVerification {
        let last_seq = self.expected_seq - 1;
        let fault = self.fault.or_else(|| match head {
            None => Some(LedgerFault {
                seq: last_seq,
                reason: "the ledger head row is missing".to_string(),
            }),
            Some((head_seq, _)) if head_seq != last_seq => Some(LedgerFault {
                seq: head_seq,
                reason: format!("head records seq {head_seq} but the last row is {last_seq}"),
            }),
            Some((head_seq, head_hash)) if head_hash != self.prev_hash => Some(LedgerFault {
                seq: head_seq,
                reason: "head hash does not match the last row's hash".to_string(),
            }),
            Some(_) => None,
        });
        LedgerVerification {
            rows_checked: self.rows_checked,
            first_bad: fault,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuance(n: u8) -> NewIssuance {
        NewIssuance {
            serial_hex: format!("{n:02x}"),
            spiffe_id: format!("spiffe://cluster.local/ns/default/sa/sa{n}"),
            authority_id: "auth".into(),
            not_before: 1_000,
            not_after: 2_000,
            requester: "spiffe://cluster.local/ns/citadel/sa/citadel-agent".into(),
            node: Some("node-a".into()),
            der_sha256: [n; 32],
            issued_at: 1_060,
        }
    }

    fn verify(rows: &[LedgerEntry], head: Option<(i64, [u8; 32])>) -> LedgerVerification {
        let mut v = ChainVerifier::new();
        for row in rows {
            if !v.check(row.seq, Ok(row.clone())) {
                break;
            }
        }
        v.finish(head)
    }

    fn head_of(rows: &[LedgerEntry]) -> Option<(i64, [u8; 32])> {
        Some(
            rows.last()
                .map_or((0, GENESIS_HASH), |r| (r.seq, r.row_hash)),
        )
    }

    #[test]
    fn row_hash_encoding_is_pinned() {
        // Changing the encoding breaks every existing ledger: this value must never change.
        // It was computed independently (Python hashlib) from the encoding documented above.
        let h = row_hash(1, &GENESIS_HASH, &issuance(7));
        assert_eq!(
            hex::encode(h),
            "02c9543a9ffa877bd0ec13073019f894ed6bf62f0f0426ac0476fbeb0fc9bc95"
        );
    }

    #[test]
    fn row_hash_covers_every_field() {
        let base = issuance(1);
        let h = row_hash(5, &GENESIS_HASH, &base);
        let mut variants: Vec<NewIssuance> = Vec::new();
        let mut v = base.clone();
        v.serial_hex.push('0');
        variants.push(v);
        let mut v = base.clone();
        v.spiffe_id.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.authority_id.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.not_before += 1;
        variants.push(v);
        let mut v = base.clone();
        v.not_after += 1;
        variants.push(v);
        let mut v = base.clone();
        v.requester.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.node = None;
        variants.push(v);
        let mut v = base.clone();
        v.der_sha256[31] ^= 1;
        variants.push(v);
        let mut v = base.clone();
        v.issued_at += 1;
        variants.push(v);
        for v in &variants {
            assert_ne!(row_hash(5, &GENESIS_HASH, v), h, "{v:?}");
        }
        assert_ne!(row_hash(6, &GENESIS_HASH, &base), h);
        assert_ne!(row_hash(5, &[1; 32], &base), h);
    }

    #[test]
    fn row_hash_is_unambiguous_across_field_boundaries() {
        let mut a = issuance(1);
        let mut b = issuance(1);
        a.serial_hex = "ab".into();
        a.spiffe_id = "c".into();
        b.serial_hex = "a".into();
        b.spiffe_id = "bc".into();
        assert_ne!(
            row_hash(1, &GENESIS_HASH, &a),
            row_hash(1, &GENESIS_HASH, &b)
        );

        let mut absent = issuance(1);
        let mut empty = issuance(1);
        absent.node = None;
        empty.node = Some(String::new());
        assert_ne!(
            row_hash(1, &GENESIS_HASH, &absent),
            row_hash(1, &GENESIS_HASH, &empty)
        );
    }

    #[test]
    fn chain_batch_links_each_row_to_the_previous() {
        let rows = chain_batch(0, GENESIS_HASH, &[issuance(1), issuance(2), issuance(3)]);
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rows[0].prev_hash, GENESIS_HASH);
        assert_eq!(rows[1].prev_hash, rows[0].row_hash);
        assert_eq!(rows[2].prev_hash, rows[1].row_hash);
        let more = chain_batch(3, rows[2].row_hash, &[issuance(4)]);
        assert_eq!(more[0].seq, 4);
        assert_eq!(more[0].prev_hash, rows[2].row_hash);
    }

    #[test]
    fn verifier_accepts_an_intact_chain_and_an_empty_one() {
        let rows = chain_batch(0, GENESIS_HASH, &[issuance(1), issuance(2), issuance(3)]);
        let out = verify(&rows, head_of(&rows));
        assert_eq!(out.first_bad, None);
        assert_eq!(out.rows_checked, 3);
        let empty = verify(&[], Some((0, GENESIS_HASH)));
        assert!(empty.is_valid());
        assert_eq!(empty.rows_checked, 0);
    }

    #[test]
    fn verifier_detects_edited_contents() {
        let mut rows = chain_batch(0, GENESIS_HASH, &[issuance(1), issuance(2), issuance(3)]);
        let head = head_of(&rows);
        rows[1].issuance.spiffe_id = "spiffe://cluster.local/ns/evil/sa/evil".into();
        let fault = verify(&rows, head).first_bad.unwrap();
        assert_eq!(fault.seq, 2);
        assert_eq!(fault.reason, "row hash does not match its contents");
    }

    #[test]
    fn verifier_detects_a_rehashed_row_by_the_next_link() {
        let mut rows = chain_batch(0, GENESIS_HASH, &[issuance(1), issuance(2), issuance(3)]);
        let head = head_of(&rows);
        rows[1].issuance.requester = "someone else".into();
        rows[1].row_hash = row_hash(2, &rows[1].prev_hash, &rows[1].issuance);
        let fault = verify(&rows, head).first_bad.unwrap();
        assert_eq!(fault.seq, 3);
        assert!(fault.reason.contains("prev_hash"), "{}", fault.reason);
    }

    #[test]
    fn verifier_detects_a_missing_middle_row() {
        let mut rows = chain_batch(0, GENESIS_HASH, &[issuance(1), issuance(2), issuance(3)]);
        let head = head_of(&rows);
        rows.remove(1);
        let out = verify(&rows, head);
        let fault = out.first_bad.unwrap();
        assert_eq!(fault.seq, 3);
        assert_eq!(fault.reason, "sequence gap: expected 2, found 3");
        assert_eq!(out.rows_checked, 2);
    }

    #[test]
    fn verifier_detects_a_missing_tail() {
        let mut rows = chain_batch(0, GENESIS_HASH, &[issuance(1), issuance(2), issuance(3)]);
        let head = head_of(&rows);
        rows.pop();
        let fault = verify(&rows, head).first_bad.unwrap();
        assert_eq!(fault.seq, 3);
        assert_eq!(fault.reason, "head records seq 3 but the last row is 2");
    }

    #[test]
    fn verifier_detects_a_missing_or_wrong_head() {
        let rows = chain_batch(0, GENESIS_HASH, &[issuance(1)]);
        assert!(verify(&rows, None).first_bad.is_some());
        let fault = verify(&rows, Some((1, [9; 32]))).first_bad.unwrap();
        assert_eq!(fault.seq, 1);
        assert!(fault.reason.contains("head hash"), "{}", fault.reason);
    }

    #[test]
    fn verifier_reports_undecodable_rows() {
        let mut v = ChainVerifier::new();
        assert!(!v.check(1, Err("bad hex in row_hash".into())));
        let fault = v.finish(Some((1, GENESIS_HASH))).first_bad.unwrap();
        assert_eq!(fault.seq, 1);
        assert!(fault.reason.contains("bad hex"));
    }

    #[test]
    fn verifier_requires_the_chain_to_start_at_one() {
        let rows = chain_batch(1, GENESIS_HASH, &[issuance(1)]);
        let fault = verify(&rows, head_of(&rows)).first_bad.unwrap();
        assert_eq!(fault.reason, "sequence gap: expected 1, found 2");
    }
}
