-- Citadel store, schema version 2 (SQLite): join tokens, nodes, the trust-bundle sequence and
-- the agents' bundle acknowledgements. Times are unix seconds; hashes are 64-character
-- lowercase hex; lists of SPIFFE IDs are JSON arrays of strings.

-- One-time join tokens. Only the SHA-256 of a token is stored, never the token itself.
CREATE TABLE join_tokens (
    token_sha256  TEXT    NOT NULL PRIMARY KEY CHECK (length(token_sha256) = 64 AND token_sha256 NOT GLOB '*[^0-9a-f]*'),
    node_name     TEXT    NOT NULL,
    allowed_ids   TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER
) STRICT;

-- Nodes that have joined with a token: the identities their agent may request for workloads.
CREATE TABLE nodes (
    name         TEXT    NOT NULL PRIMARY KEY,
    allowed_ids  TEXT    NOT NULL,
    joined_at    INTEGER NOT NULL
) STRICT;

-- The trust-bundle sequence: one row, bumped in the same transaction as every change of the
-- authority set. Existing authorities count as changes already made, so a store upgraded from
-- version 1 starts above 0 exactly when it has a bundle.
CREATE TABLE bundle_state (
    id        INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    sequence  INTEGER NOT NULL CHECK (sequence >= 0)
) STRICT;

INSERT INTO bundle_state (id, sequence) SELECT 1, COUNT(*) FROM authorities;

-- The highest bundle sequence each agent has acknowledged applying, and when it last did.
CREATE TABLE bundle_acks (
    agent_id  TEXT    NOT NULL PRIMARY KEY,
    sequence  INTEGER NOT NULL CHECK (sequence >= 0),
    acked_at  INTEGER NOT NULL
) STRICT;
