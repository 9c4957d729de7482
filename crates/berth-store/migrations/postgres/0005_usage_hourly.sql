-- Usage summed per hour and (tenant, box, session, model), kept by a trigger as usage rows are
-- inserted (by the ledger, `store copy`, anything), so that a sum over a long window reads
-- hours, not requests: `usage_sums` takes the window's whole hours from here and only its
-- partial first and last hours from `usage`.
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour_ms BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    box_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_creation_5m_tokens BIGINT NOT NULL,
    cache_creation_1h_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hour_ms, tenant, box_id, session_id, model)
);
CREATE INDEX IF NOT EXISTS usage_hourly_by_tenant ON usage_hourly (tenant, hour_ms);
CREATE INDEX IF NOT EXISTS usage_hourly_by_session ON usage_hourly (session_id);

-- One grouped upsert per INSERT statement (a batch of the ledger is one statement). The hour of
-- a row: ts_ms rounded down to a multiple of 3,600,000 (also below zero). Rows are upserted in
-- key order, so two servers' batches lock shared hours in the same order (no deadlock).
CREATE OR REPLACE FUNCTION usage_hourly_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_hourly AS h (hour_ms, tenant, box_id, session_id, model, requests,
        input_tokens, output_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens,
        cache_read_tokens, cost_usd)
    SELECT ts_ms - ((ts_ms % 3600000) + 3600000) % 3600000 AS hr, tenant, box_id, session_id,
        model, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cache_creation_5m_tokens),
        SUM(cache_creation_1h_tokens), SUM(cache_read_tokens), SUM(cost_usd)
    FROM new_rows GROUP BY hr, tenant, box_id, session_id, model
    ORDER BY hr, tenant, box_id, session_id, model
    ON CONFLICT (hour_ms, tenant, box_id, session_id, model) DO UPDATE SET
        requests = h.requests + excluded.requests,
        input_tokens = h.input_tokens + excluded.input_tokens,
        output_tokens = h.output_tokens + excluded.output_tokens,
        cache_creation_5m_tokens = h.cache_creation_5m_tokens + excluded.cache_creation_5m_tokens,
        cache_creation_1h_tokens = h.cache_creation_1h_tokens + excluded.cache_creation_1h_tokens,
        cache_read_tokens = h.cache_read_tokens + excluded.cache_read_tokens,
        cost_usd = h.cost_usd + excluded.cost_usd;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS usage_hourly_add ON usage;
CREATE TRIGGER usage_hourly_add AFTER INSERT ON usage REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_hourly_add();

-- Deleted rows leave the sums (no server deletes usage; an operator or a test may).
CREATE OR REPLACE FUNCTION usage_hourly_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE usage_hourly AS h SET
        requests = h.requests - o.n,
        input_tokens = h.input_tokens - o.i,
        output_tokens = h.output_tokens - o.o,
        cache_creation_5m_tokens = h.cache_creation_5m_tokens - o.c5,
        cache_creation_1h_tokens = h.cache_creation_1h_tokens - o.c1,
        cache_read_tokens = h.cache_read_tokens - o.cr,
        cost_usd = h.cost_usd - o.usd
    FROM (SELECT ts_ms - ((ts_ms % 3600000) + 3600000) % 3600000 AS hr, tenant, box_id,
            session_id, model, COUNT(*) AS n, SUM(input_tokens) AS i, SUM(output_tokens) AS o,
            SUM(cache_creation_5m_tokens) AS c5, SUM(cache_creation_1h_tokens) AS c1,
            SUM(cache_read_tokens) AS cr, SUM(cost_usd) AS usd
          FROM old_rows GROUP BY hr, tenant, box_id, session_id, model) o
    WHERE h.hour_ms = o.hr AND h.tenant = o.tenant AND h.box_id = o.box_id
        AND h.session_id = o.session_id AND h.model = o.model;
    DELETE FROM usage_hourly WHERE requests <= 0;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS usage_hourly_remove ON usage;
CREATE TRIGGER usage_hourly_remove AFTER DELETE ON usage REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_hourly_remove();

-- The rows already there (the table is new: nothing to merge with).
INSERT INTO usage_hourly (hour_ms, tenant, box_id, session_id, model, requests, input_tokens,
    output_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, cache_read_tokens, cost_usd)
SELECT ts_ms - ((ts_ms % 3600000) + 3600000) % 3600000 AS hr, tenant, box_id, session_id, model,
    COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cache_creation_5m_tokens),
    SUM(cache_creation_1h_tokens), SUM(cache_read_tokens), SUM(cost_usd)
FROM usage GROUP BY hr, tenant, box_id, session_id, model;
