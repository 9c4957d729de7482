-- The same schema as the SQLite store (migrations/sqlite, folded into one step): whole objects
-- as JSON documents beside the columns queries filter on.
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    -- A tenant's spending cap per calendar month (UTC), enforced by the gateway; NULL: none.
    budget_usd_month DOUBLE PRECISION
);

CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    admin BOOLEAN NOT NULL,
    created_at TEXT NOT NULL
);

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

-- Append-only; seq is per session, gapless (the store refuses a batch that does not continue
-- the log), assigned by the session's owner task.
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- A box's own event log (state changes, egress decisions); seq per box, append-only.
CREATE TABLE IF NOT EXISTS box_events (
    box_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (box_id, seq)
);

-- One row per model request the gateway metered, priced when recorded.
CREATE TABLE IF NOT EXISTS usage (
    id BIGSERIAL PRIMARY KEY,
    ts TEXT NOT NULL,
    ts_ms BIGINT NOT NULL DEFAULT 0,
    tenant TEXT NOT NULL,
    box_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model TEXT NOT NULL,
    status BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_creation_5m_tokens BIGINT NOT NULL,
    cache_creation_1h_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_by_session ON usage (session_id);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage (tenant, ts);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (ts_ms);

-- One row per span a box was running (see the SQLite migration 0005 for seen_ms).
CREATE TABLE IF NOT EXISTS box_time (
    id BIGSERIAL PRIMARY KEY,
    box_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT,
    seen_ms BIGINT NOT NULL,
    cpus DOUBLE PRECISION NOT NULL,
    memory_mib BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS box_time_by_box ON box_time (box_id);
CREATE INDEX IF NOT EXISTS box_time_by_tenant ON box_time (tenant, start_ms);

CREATE TABLE IF NOT EXISTS ready_probe (x INTEGER);

-- The webhook secret sits beside the document, never in it.
CREATE TABLE IF NOT EXISTS triggers (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    doc TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS triggers_by_tenant ON triggers (tenant, created_at);
