-- When a deferred run may next be tried (unix milliseconds, database clock). A
-- worker that cannot resume a run for a reason that may pass (the checkpoint
-- store not mounted yet, a training state file missing) puts it back as
-- 'interrupted' with this set, instead of restarting it or failing it; claims
-- skip it until then, so it neither spins nor blocks the runs behind it. NULL:
-- no delay (every row from before this migration). A nullable column without a
-- default only changes the catalog.

ALTER TABLE runs ADD COLUMN retry_at BIGINT;

-- How many times the run was taken over from a worker that stopped
-- heartbeating (a crash, an OOM kill): a daemon fails a run that keeps killing
-- its workers instead of taking it up forever. Clean interrupts and deferrals
-- do not count.

ALTER TABLE runs ADD COLUMN crashes BIGINT NOT NULL DEFAULT 0;
