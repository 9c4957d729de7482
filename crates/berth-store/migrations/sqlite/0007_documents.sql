-- Versioned JSON documents of features that need no columns of their own (the Managed Agents
-- API's agents, environments and sessions): one row per (kind, tenant, id, version); `seq`
-- keeps the order they were first written in.
CREATE TABLE IF NOT EXISTS documents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (kind, tenant, id, version)
);
CREATE INDEX IF NOT EXISTS documents_by_id ON documents (kind, tenant, id, version);
