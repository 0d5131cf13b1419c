-- Citadel store, schema version 1 (SQLite): signing authorities and the issuance ledger.
-- Times are unix seconds; hashes are 64-character lowercase hex.
-- Later migrations add agents and join tokens; nothing here assumes they are absent.

-- Signing authorities: certificates and state only. Private keys never live here;
-- `key_ref` names the key in the key store.
CREATE TABLE authorities (
    id          TEXT    NOT NULL PRIMARY KEY,
    state       TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'retired', 'removed')),
    cert_pem    TEXT    NOT NULL,
    chain_pem   TEXT    NOT NULL,
    root_pem    TEXT    NOT NULL,
    not_before  INTEGER NOT NULL,
    not_after   INTEGER NOT NULL,
    key_ref     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

-- At most one authority signs at any time, even with several replicas racing.
CREATE UNIQUE INDEX authorities_single_active ON authorities (state) WHERE state = 'active';

-- The issuance ledger: append-only, each row hash-chained to the previous one.
CREATE TABLE issuances (
    seq           INTEGER NOT NULL PRIMARY KEY,
    serial_hex    TEXT    NOT NULL,
    spiffe_id     TEXT    NOT NULL,
    authority_id  TEXT    NOT NULL,
    not_before    INTEGER NOT NULL,
    not_after     INTEGER NOT NULL,
    requester     TEXT    NOT NULL,
    node          TEXT,
    der_sha256    TEXT    NOT NULL CHECK (length(der_sha256) = 64 AND der_sha256 NOT GLOB '*[^0-9a-f]*'),
    issued_at     INTEGER NOT NULL,
    prev_hash     TEXT    NOT NULL CHECK (length(prev_hash) = 64 AND prev_hash NOT GLOB '*[^0-9a-f]*'),
    row_hash      TEXT    NOT NULL CHECK (length(row_hash) = 64 AND row_hash NOT GLOB '*[^0-9a-f]*')
) STRICT;

-- A serial number is unique per issuer (RFC 5280 4.1.2.2).
CREATE UNIQUE INDEX issuances_authority_serial ON issuances (authority_id, serial_hex);
CREATE INDEX issuances_spiffe_id ON issuances (spiffe_id, seq);
CREATE INDEX issuances_not_after ON issuances (not_after, authority_id);

-- The chain head: one row, locked first by every append so that concurrent writers
-- (threads or replicas) form one chain. Its presence also reveals a deleted tail.
CREATE TABLE ledger_head (
    id         INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    last_seq   INTEGER NOT NULL,
    last_hash  TEXT    NOT NULL CHECK (length(last_hash) = 64 AND last_hash NOT GLOB '*[^0-9a-f]*')
) STRICT;

INSERT INTO ledger_head (id, last_seq, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
