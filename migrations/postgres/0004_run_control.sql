-- Operator control of runs (`ddpm-trainer runs cancel|restart|delete`, and the same
-- under /v1/runs/{id}/… on the server).
--
-- 'cancelled': a run an operator stopped for good. It is never claimed again; a
-- restart puts it back in the queue.
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('queued', 'running', 'completed', 'failed', 'interrupted', 'cancelled'));

-- When an operator asked a running run to stop (unix milliseconds, database
-- clock): its worker sees it in the answer to its next heartbeat, saves a
-- training state and ends the run as 'cancelled'. NULL: nobody asked.
ALTER TABLE runs ADD COLUMN cancel_requested_at BIGINT;
