//! CareTwin's chaos tools: fault injection, scenarios with invariant checks, and (in
//! later work) a deterministic simulation of the whole system.
//!
//! Scenarios drive real processes and real stores; every scenario ends with a check of
//! the guarantees it exercises and reports what it found.
//!
//! # Layout
//! - [`cluster`] — nodes of one process sharing a store, with a single-activation
//!   monitor, crash and partition: the cluster tests and benchmark.
//! - [`config`] — the chaos tool's configuration.
//! - [`crash`] — SIGKILL a writing process, reopen its store, find every acknowledged
//!   write.
//! - [`demo`] — a node, sites with simulated devices and an agents' desk, in fast time.
//! - [`netns`] — a real network partition: a Linux network namespace on a veth pair that
//!   is cut and healed (root, `ip` and `nft`).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod crash;
pub mod demo;
pub mod netns;
