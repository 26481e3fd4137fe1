//! The CareTwin edge node: the small agent at a home or store that collects device
//! readings, keeps them safe while the site is offline, syncs them to the cluster over
//! QUIC, acts locally on safety alarms, and carries commands down to devices.
//!
//! It must never drop a reading it has accepted: a reading is accepted only once it is on
//! disk, and deleted only once the cluster acknowledged it as durably applied.
//!
//! # Layout
//! - [`error`] — the crate's [`Error`] and [`Result`].
//! - [`http`] — HTTP/JSON ingest for devices on the site's LAN.
//! - [`mqtt`] — MQTT 3.1.1 ingest for devices on the site's LAN (a small embedded server).
//! - [`node`] — the edge's lifecycle: outbox, device adapters, local safety actions, sync.
//! - [`config`] — the edge node's configuration (TOML plus environment overrides).
//! - [`outbox`] — the durable outbox: per-device logs on disk (fjall, group commit), the
//!   disk budget by priority, trimming by the cluster's watermarks, stored commands.
//! - [`sim`] — the built-in device simulator: the catalogue's products with degradation,
//!   faults, consumables, alarms and questions, reacting to commands (pure, no I/O).
//! - [`sync`] — the sync's QUIC and mutual TLS glue: client configuration, connecting,
//!   frames on streams.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod http;
pub mod mqtt;
pub mod node;
pub mod outbox;
pub mod sim;
pub mod sync;

pub use error::{Error, Result};
