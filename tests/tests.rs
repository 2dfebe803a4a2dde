//! The integration tests, as one binary (as ripgrep's `tests/tests.rs`): each file
//! below is a module that attacks one part of the contract (docs/guarantees.md
//! names the tests behind every guarantee), and the support modules are written
//! once for all of them. `cargo test` runs them all; `cargo test --test tests
//! explore::` one module.

// Support, shared by the modules below.
mod client_support;
mod common;
mod daemon_support;
mod faults;
mod powercut_support;
mod s3_support;

mod access;
mod alerts;
mod attack;
mod client;
mod crash_loop;
mod daemon;
mod e2e_client;
mod engine_basic;
mod engine_faults;
mod engine_multi;
mod engine_prop;
mod engine_recovery;
mod engine_tree;
mod explore;
mod fuzz_decoders;
mod health;
mod idallocctl_cli;
mod idallocd_cli;
mod journald;
mod lease_model;
mod logs_reload;
mod never_twice;
mod power_cut;
mod s3_daemons;
mod s3_faults;
mod s3_moto;
mod store_check;
mod tls;
