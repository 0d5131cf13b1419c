-- Citadel store, schema version 3 (PostgreSQL): revocable node credentials. Each joined node keeps
-- the serial of its node certificate in use (`current_serial`) and of the newest one issued
-- by a renewal and not used yet (`pending_serial`), with their notAfter; when a node
-- certificate was last accepted; and whether (since when) the node is evicted. Serials are
-- lowercase hex, times unix seconds.
ALTER TABLE nodes ADD COLUMN current_serial TEXT;
ALTER TABLE nodes ADD COLUMN current_not_after BIGINT;
ALTER TABLE nodes ADD COLUMN pending_serial TEXT;
ALTER TABLE nodes ADD COLUMN pending_not_after BIGINT;
ALTER TABLE nodes ADD COLUMN last_seen BIGINT;
ALTER TABLE nodes ADD COLUMN evicted_at BIGINT;

-- Nodes that joined before this version: their latest node certificate in the ledger becomes
-- pending and the one before it current, so the agent keeps working with either (whichever
-- it holds) and the first use of the latest one supersedes all older ones.
UPDATE nodes SET
    pending_serial = (
        SELECT i.serial_hex FROM issuances i
        WHERE i.node = nodes.name AND i.spiffe_id LIKE ('%/citadel/node/' || nodes.name)
        ORDER BY i.seq DESC LIMIT 1),
    pending_not_after = (
        SELECT i.not_after FROM issuances i
        WHERE i.node = nodes.name AND i.spiffe_id LIKE ('%/citadel/node/' || nodes.name)
        ORDER BY i.seq DESC LIMIT 1),
    current_serial = (
        SELECT i.serial_hex FROM issuances i
        WHERE i.node = nodes.name AND i.spiffe_id LIKE ('%/citadel/node/' || nodes.name)
        ORDER BY i.seq DESC LIMIT 1 OFFSET 1),
    current_not_after = (
        SELECT i.not_after FROM issuances i
        WHERE i.node = nodes.name AND i.spiffe_id LIKE ('%/citadel/node/' || nodes.name)
        ORDER BY i.seq DESC LIMIT 1 OFFSET 1),
    last_seen = joined_at;
