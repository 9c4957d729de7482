-- Usage summed per hour and (tenant, box, session, model), kept by a trigger as usage rows are
-- inserted (by the ledger, `store copy`, anything), so that a sum over a long window reads
-- hours, not requests: `usage_sums` takes the window's whole hours from here and only its
-- partial first and last hours from `usage`.
CREATE TABLE IF NOT EXISTS usage_hourly (
    hour_ms INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    box_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_creation_5m_tokens INTEGER NOT NULL,
    cache_creation_1h_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    PRIMARY KEY (hour_ms, tenant, box_id, session_id, model)
);
CREATE INDEX IF NOT EXISTS usage_hourly_by_tenant ON usage_hourly (tenant, hour_ms);
CREATE INDEX IF NOT EXISTS usage_hourly_by_session ON usage_hourly (session_id);

-- The hour of a row: ts_ms rounded down to a multiple of 3,600,000 (also below zero).
CREATE TRIGGER IF NOT EXISTS usage_hourly_add AFTER INSERT ON usage BEGIN
    INSERT INTO usage_hourly (hour_ms, tenant, box_id, session_id, model, requests, input_tokens,
        output_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, cache_read_tokens,
        cost_usd)
    VALUES (NEW.ts_ms - ((NEW.ts_ms % 3600000) + 3600000) % 3600000, NEW.tenant, NEW.box_id,
        NEW.session_id, NEW.model, 1, NEW.input_tokens, NEW.output_tokens,
        NEW.cache_creation_5m_tokens, NEW.cache_creation_1h_tokens, NEW.cache_read_tokens,
        NEW.cost_usd)
    ON CONFLICT (hour_ms, tenant, box_id, session_id, model) DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        cache_creation_5m_tokens = cache_creation_5m_tokens + excluded.cache_creation_5m_tokens,
        cache_creation_1h_tokens = cache_creation_1h_tokens + excluded.cache_creation_1h_tokens,
        cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
        cost_usd = cost_usd + excluded.cost_usd;
END;

-- A deleted row leaves the sums (no server deletes usage; an operator or a test may).
CREATE TRIGGER IF NOT EXISTS usage_hourly_remove AFTER DELETE ON usage BEGIN
    UPDATE usage_hourly SET
        requests = requests - 1,
        input_tokens = input_tokens - OLD.input_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        cache_creation_5m_tokens = cache_creation_5m_tokens - OLD.cache_creation_5m_tokens,
        cache_creation_1h_tokens = cache_creation_1h_tokens - OLD.cache_creation_1h_tokens,
        cache_read_tokens = cache_read_tokens - OLD.cache_read_tokens,
        cost_usd = cost_usd - OLD.cost_usd
    WHERE hour_ms = OLD.ts_ms - ((OLD.ts_ms % 3600000) + 3600000) % 3600000
        AND tenant = OLD.tenant AND box_id = OLD.box_id AND session_id = OLD.session_id
        AND model = OLD.model;
    DELETE FROM usage_hourly
    WHERE hour_ms = OLD.ts_ms - ((OLD.ts_ms % 3600000) + 3600000) % 3600000
        AND tenant = OLD.tenant AND box_id = OLD.box_id AND session_id = OLD.session_id
        AND model = OLD.model AND requests <= 0;
END;

-- The rows already there.
INSERT INTO usage_hourly (hour_ms, tenant, box_id, session_id, model, requests, input_tokens,
    output_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, cache_read_tokens, cost_usd)
SELECT ts_ms - ((ts_ms % 3600000) + 3600000) % 3600000 AS h, tenant, box_id, session_id, model,
    COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cache_creation_5m_tokens),
    SUM(cache_creation_1h_tokens), SUM(cache_read_tokens), SUM(cost_usd)
FROM usage GROUP BY h, tenant, box_id, session_id, model;
