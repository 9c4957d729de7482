-- Cluster nodes (servers sharing one database; with SQLite the one server lists itself).
-- `incarnation` grows each time a node (re)joins: a process holding an older one is
-- superseded. `lease_ms`: until when (Unix ms) the node's lease holds; past it any node may
-- declare it lost with one conditional UPDATE. The rest of the object is the JSON `doc`.
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    lease_ms INTEGER NOT NULL,
    reason TEXT,
    doc TEXT NOT NULL
);
-- The node holding a box (also in the box's document): a box's record is written only by it.
ALTER TABLE boxes ADD COLUMN node TEXT;
CREATE INDEX IF NOT EXISTS boxes_by_node ON boxes (node);
-- The last cron instant (Unix ms) a trigger fired for: the compare-and-set that makes a due
-- firing happen once however many nodes run the scheduler.
ALTER TABLE triggers ADD COLUMN cron_fired_ms INTEGER;
