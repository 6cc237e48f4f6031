-- Two more values per metrics row, both written by the trainer once per logging
-- window. Nullable with no default: rows logged before this migration read back
-- as "not computed", and NULL also stands for NaN as in the other loss columns.
-- Adding nullable columns without a default only changes the catalog, so this is
-- instant even on a long series.

ALTER TABLE metrics
    -- exponential moving average of the per-step loss (bias-corrected), as of
    -- the row's step
    ADD COLUMN loss_smoothed DOUBLE PRECISION,
    -- mean ε-MSE over the window's samples whose diffusion timestep t lies in
    -- one quarter of [0, T): q1 = [0, T/4) (least noise) … q4 = [3T/4, T) (most
    -- noise); NULL when no sample of the window fell in that quarter
    ADD COLUMN loss_t_q1 DOUBLE PRECISION,
    ADD COLUMN loss_t_q2 DOUBLE PRECISION,
    ADD COLUMN loss_t_q3 DOUBLE PRECISION,
    ADD COLUMN loss_t_q4 DOUBLE PRECISION;
