-- One row per model request the gateway metered.
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    tenant TEXT NOT NULL,
    box_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model TEXT NOT NULL,
    status INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_creation_5m_tokens INTEGER NOT NULL,
    cache_creation_1h_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_session ON usage (session_id);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage (tenant, ts);
