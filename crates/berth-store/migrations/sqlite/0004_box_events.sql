-- A box's own event log (state changes, egress decisions); seq per box, append-only.
CREATE TABLE IF NOT EXISTS box_events (
    box_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (box_id, seq)
) WITHOUT ROWID;
