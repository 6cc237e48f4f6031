-- Two more values per metrics row: the smoothed loss and the loss by timestep
-- quarter. Same columns and meaning as migrations/postgres; see the comments there.
-- SQLite adds one column per ALTER TABLE; nullable columns without a default
-- leave the existing rows untouched (they read back as NULL).

ALTER TABLE metrics ADD COLUMN loss_smoothed REAL;
ALTER TABLE metrics ADD COLUMN loss_t_q1 REAL;
ALTER TABLE metrics ADD COLUMN loss_t_q2 REAL;
ALTER TABLE metrics ADD COLUMN loss_t_q3 REAL;
ALTER TABLE metrics ADD COLUMN loss_t_q4 REAL;
