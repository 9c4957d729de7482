-- The node running a session's agent (also in the session's document): an existing session
-- is written only by that node or by the node holding its box now (see `PUT_SESSION`).
ALTER TABLE sessions ADD COLUMN node TEXT;
