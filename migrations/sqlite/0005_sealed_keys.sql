-- Citadel store, schema version 5 (SQLite): authority private keys sealed (AES-256-GCM) under a
-- key-encryption key the database never sees, so that every CA replica sharing the database can
-- sign with any authority. `sealed` is the text the CA's sealed key store wrote (format version,
-- KEK identifier, nonce and ciphertext); never a plaintext key. A key is written once and never
-- replaced. Times are unix seconds.
CREATE TABLE sealed_keys (
    key_ref     TEXT    NOT NULL PRIMARY KEY,
    sealed      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
