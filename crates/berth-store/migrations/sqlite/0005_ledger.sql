-- The ledger: priced usage rows with a numeric time, container running time per box, and a
-- table the readiness probe writes to (to prove the store takes writes).
-- Rows written before this migration carry no price (cost_usd 0).
ALTER TABLE usage ADD COLUMN ts_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cost_usd REAL NOT NULL DEFAULT 0;
UPDATE usage SET ts_ms = CAST((julianday(ts) - 2440587.5) * 86400000 AS INTEGER);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (ts_ms);

-- One row per span a box was running; end_ms is NULL while it runs. seen_ms is the last
-- time the server knew it running (a heartbeat), so a span left open by a crash is closed
-- there rather than charged until the restart.
CREATE TABLE IF NOT EXISTS box_time (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    box_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER,
    seen_ms INTEGER NOT NULL,
    cpus REAL NOT NULL,
    memory_mib INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS box_time_by_box ON box_time (box_id);
CREATE INDEX IF NOT EXISTS box_time_by_tenant ON box_time (tenant, start_ms);

CREATE TABLE IF NOT EXISTS ready_probe (x INTEGER);
