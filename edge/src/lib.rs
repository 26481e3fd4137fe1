//! The CareTwin edge node: the small agent at a home or store that collects device
//! readings, keeps them safe while the site is offline, syncs them to the cluster over
//! QUIC, acts locally on safety alarms, and carries commands down to devices.
//!
//! It must never drop a reading it has accepted: a reading is accepted only once it is on
//! disk, and deleted only once the cluster acknowledged it as durably applied.
//!
//! # Layout
//! - [`config`] — the edge node's configuration (TOML plus environment overrides).
//!
//! Device adapters, the durable outbox and the sync protocol come with the edge sync work.

#![forbid(unsafe_code)]

pub mod config;
