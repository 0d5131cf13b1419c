-- Citadel store, schema version 7 (SQLite): signed ledger checkpoints. Each row vouches for the
-- ledger head (seq, row hash) at signing time, signed by the CA's ledger key, which never lives
-- here in the clear: whoever rewrites every ledger row and the head cannot make a checkpoint
-- for the rewritten chain. One checkpoint per seq (replicas racing on one head keep the first).
-- Hashes, key ids and signatures are lowercase hex; times are unix seconds.
CREATE TABLE ledger_checkpoints (
    seq        INTEGER NOT NULL PRIMARY KEY,
    head_hash  TEXT    NOT NULL CHECK (length(head_hash) = 64 AND head_hash NOT GLOB '*[^0-9a-f]*'),
    signed_at  INTEGER NOT NULL,
    key_id     TEXT    NOT NULL CHECK (length(key_id) = 64 AND key_id NOT GLOB '*[^0-9a-f]*'),
    signature  TEXT    NOT NULL
) STRICT;
