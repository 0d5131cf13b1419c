-- Citadel store, schema version 6 (SQLite): leases, so that one CA replica at a time runs a
-- singleton task (the automatic root renewal). A row names the lease, its holder and when it
-- lapses (unix seconds); it is taken or renewed with one conditional upsert and deleted when
-- the holder stops. (Version 5 belongs to the key store.)
CREATE TABLE leases (
    name        TEXT    NOT NULL PRIMARY KEY,
    holder      TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;
