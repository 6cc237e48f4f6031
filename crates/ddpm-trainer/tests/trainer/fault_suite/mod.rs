//! The fault-injection suite: real `ddpm-trainer` processes, a real database (SQLite and
//! PostgreSQL), real files, and the faults an operator meets:
//!
//! - `kills`: 20 SIGKILLs at random moments of one run, half of them at named points
//!   inside checkpoint writes and registrations (the binary is built with the
//!   `failpoints` feature, see `ddpm_registry::failpoint`); after the last resume the
//!   series, the checkpoints and the files are audited, and the weights compared with an
//!   uninterrupted run's.
//! - `pause`: a daemon frozen with SIGSTOP past `stale_after` loses its run to a second
//!   one; thawed, it writes nothing and exits.
//! - `disk`: the checkpoint store fills up mid-run: the run is deferred, not failed.
//!
//! Compiled only with the `failpoints` feature; run it alone, one test at a time:
//! `cargo test -p ddpm-trainer --features failpoints --test trainer -- fault_suite::
//! --test-threads 1` (`scripts/test.sh` does).

mod disk;
mod kills;
mod pause;
