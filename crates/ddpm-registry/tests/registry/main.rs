//! The registry's integration tests: one binary; every test in a module that
//! calls `both_backends!` runs on SQLite and on PostgreSQL (see `helpers`).

#[macro_use]
mod helpers;

mod checkpoints;
mod connect;
mod control;
mod metrics;
mod queue;
mod runs;
mod scores;
mod store;
