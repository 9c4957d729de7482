-- Triggers (webhook and cron). The webhook secret sits beside the document, never in it, so
-- listing triggers cannot leak it.
CREATE TABLE IF NOT EXISTS triggers (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    doc TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS triggers_by_tenant ON triggers (tenant, created_at);
