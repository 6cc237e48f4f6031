-- Data-parallel training: a run's attempt may train on several rank processes, and a
-- launcher (torchrun-like) may start those processes itself and restart them.
--
-- The world of the run's newest attempt: how many rank processes it trains on
-- (`world_size`) and the device of each, by rank (`rank_devices`, a JSON array of
-- device strings such as ["cuda:0","cuda:1"] or ["cpu","cpu"]). Each attempt records
-- its own at its start and overwrites the previous attempt's: it is the run's current
-- shape, not a history. NULL for both: no attempt has recorded one (every row from
-- before this migration, and a run not yet claimed).
ALTER TABLE runs ADD COLUMN world_size BIGINT;
ALTER TABLE runs ADD COLUMN rank_devices TEXT;

-- The key a launcher created the run under (its job or rendezvous id), so that each of
-- its rank processes, and each restart of them, finds the one run instead of queueing
-- another. Unique where set; NULL (a run submitted or trained by hand) any number of
-- times, which a unique index allows on both backends.
ALTER TABLE runs ADD COLUMN launch_key TEXT;
CREATE UNIQUE INDEX runs_launch_key ON runs (launch_key);
