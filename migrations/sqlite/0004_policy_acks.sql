-- Citadel store, schema version 4 (SQLite): the policy-set version each agent last
-- acknowledged applying. Versions are content hashes (64-character lowercase hex), not ordered:
-- the latest acknowledgement replaces the previous one. Times are unix seconds.
CREATE TABLE policy_acks (
    agent_id  TEXT    NOT NULL PRIMARY KEY,
    version   TEXT    NOT NULL,
    acked_at  INTEGER NOT NULL
) STRICT;
