CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    admin INTEGER NOT NULL,
    created_at TEXT NOT NULL
);

-- Whole objects are kept as JSON documents; the columns beside them are what queries filter on.
CREATE TABLE IF NOT EXISTS boxes (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS boxes_by_tenant ON boxes (tenant, created_at);
CREATE INDEX IF NOT EXISTS boxes_by_state ON boxes (state);

CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    box_id TEXT NOT NULL,
    state TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions (tenant, created_at);
CREATE INDEX IF NOT EXISTS sessions_by_box ON sessions (box_id);
CREATE INDEX IF NOT EXISTS sessions_by_state ON sessions (state);

-- Append-only; seq is per session, assigned by the session's owner task.
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
