-- Citadel store, schema version 7 (PostgreSQL): signed ledger checkpoints. Each row vouches for
-- the ledger head (seq, row hash) at signing time, signed by the CA's ledger key, which never
-- lives here in the clear: whoever rewrites every ledger row and the head cannot make a
-- checkpoint for the rewritten chain. One checkpoint per seq (replicas racing on one head keep
-- the first). Hashes, key ids and signatures are lowercase hex; times are unix seconds.
CREATE TABLE ledger_checkpoints (
    seq        BIGINT NOT NULL PRIMARY KEY,
    head_hash  TEXT   NOT NULL CHECK (head_hash ~ '^[0-9a-f]{64}$'),
    signed_at  BIGINT NOT NULL,
    key_id     TEXT   NOT NULL CHECK (key_id ~ '^[0-9a-f]{64}$'),
    signature  TEXT   NOT NULL
);
