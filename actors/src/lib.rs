//! CareTwin's deciding code: the twins, their policies, and the ports they act through.
//!
//! This crate never does I/O of its own: no sockets, no files, no clocks, no spawned tasks
//! of its own making. Time comes in as `now`, storage through the [`store::Store`] port,
//! and every outbound effect is returned to the caller or written through a port. That is
//! what lets the same code run in unit tests, in the cluster and in deterministic
//! simulation.
//!
//! # Layout
//! - [`model`] — the shared vocabulary: ids, directions, consent scopes, insights.
//! - [`catalogue`] — device models: signals, consumables, parts, failure modes, playbooks.
//! - [`reasoning`] — streaming per-signal detectors with constant memory.
//! - [`rul`] — remaining-useful-life estimation, fitted offline, applied per reading.
//! - [`host`] — hosting twins: many per ractor shard actor, activation, passivation,
//!   write-through snapshots, durable timers.
//! - [`mail`] — messages between twins and to the outside, carried by durable outboxes.
//! - [`placement`] — which live member hosts which shard (rendezvous hashing), who is
//!   alive (member leases), and each member's round of shard leases.
//! - [`policy`] — customer preferences, consent, value tiers, and the notification rule.
//! - [`twins`] — the device and customer twins.
//! - [`services`] — the tenant's desks: parts, repair scheduling, handoff to humans.
//! - [`system`] — everything above wired together on one node, with the mail router.
//! - [`store`] — the storage port: snapshots with versions, fences and leases, high-water
//!   marks, logs, idempotency records, the outbox.
//! - [`settings`] — layered configuration (TOML text plus environment overrides), as pure
//!   functions the binaries call.
//! - `conformance` (feature `conformance`) — the suite every storage backend must pass.
//! - [`error`] — the crate's error type.

#![forbid(unsafe_code)]

pub mod catalogue;
pub mod error;
pub mod host;
pub mod mail;
pub mod model;
pub mod placement;
pub mod policy;
pub mod reasoning;
mod rng;
pub mod rul;
pub mod services;
pub mod settings;
pub mod store;
pub mod system;
pub mod twins;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use error::{Error, Result};
