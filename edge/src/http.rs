//! HTTP/JSON ingest for devices on the site's LAN.
//!
//! `POST /v1/readings` with a JSON array of readings:
//!
//! ```json
//! [{"device": "t1:coffee-1", "signal": "brew_pressure", "value": 9.1, "ts_ms": 1795392000000}]
//! ```
//!
//! - `202 Accepted` with `{"accepted": [{"device": …, "seq": …}]}` once every reading is on
//!   disk in the outbox (and so will reach the cluster);
//! - `400 Bad Request` with `{"error": …}` for malformed JSON, NaN or infinite values,
//!   empty or over-long ids, a batch of more than [`MAX_READINGS`]: nothing is accepted;
//! - `507 Insufficient Storage` when the outbox is full: nothing is accepted, and the
//!   device should keep the readings and retry later;
//! - `POST /v1/alarms` with `{"device", "kind", "ts_ms"}` takes an alarm, always accepted
//!   (alarms are never refused for space).
//!
//! The server only translates HTTP to outbox calls; validation and durability are the
//! outbox's.

use crate::outbox::{Item, ItemKind, Outbox, OutboxError};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::Notify;

/// Most readings in one request.
pub const MAX_READINGS: usize = 10_000;
/// Largest request body, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// One reading as a device posts it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostedReading {
    /// The device id.
    pub device: String,
    /// The signal's name in the catalogue.
    pub signal: String,
    /// The value.
    pub value: f64,
    /// The device's clock, Unix ms.
    pub ts_ms: u64,
}

/// An alarm as a device posts it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostedAlarm {
    /// The device id.
    pub device: String,
    /// The alarm kind (`smoke`, `leak`…).
    pub kind: String,
    /// The device's clock, Unix ms.
    pub ts_ms: u64,
}

#[derive(Serialize)]
struct AcceptedJson {
    accepted: Vec<Seq>,
}

#[derive(Serialize)]
struct Seq {
    device: String,
    seq: u64,
}

#[derive(Serialize)]
struct ErrorJson {
    error: String,
}

#[derive(Clone)]
struct Ingest {
    outbox: Arc<Outbox>,
    new_items: Arc<Notify>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorJson {
            error: message.into(),
        }),
    )
        .into_response()
}

impl Ingest {
    async fn accept(&self, items: Vec<Item>) -> Response {
        match self.outbox.accept(items).await {
            Ok(accepted) => {
                self.new_items.notify_waiters();
                let accepted = accepted
                    .into_iter()
                    .map(|a| Seq {
                        device: a.device,
                        seq: a.seq,
                    })
                    .collect();
                (StatusCode::ACCEPTED, Json(AcceptedJson { accepted })).into_response()
            }
            Err(OutboxError::Full { used, limit }) => error(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "edge outbox full ({used} of {limit} bytes): keep the readings and retry later"
                ),
            ),
            Err(
                e @ (OutboxError::InvalidItem { .. }
                | OutboxError::TooManyItems { .. }
                | OutboxError::InvalidArgument(_)),
            ) => error(StatusCode::BAD_REQUEST, e.to_string()),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

async fn readings(
    State(s): State<Ingest>,
    body: Result<Json<Vec<PostedReading>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(readings) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if readings.is_empty() || readings.len() > MAX_READINGS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{} readings: send 1..={MAX_READINGS}", readings.len()),
        );
    }
    let items = readings
        .into_iter()
        .map(|r| {
            Item::new(
                r.device,
                r.ts_ms,
                ItemKind::Reading {
                    signal: r.signal,
                    value: r.value,
                },
            )
        })
        .collect();
    s.accept(items).await
}

async fn alarms(
    State(s): State<Ingest>,
    body: Result<Json<PostedAlarm>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(a) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    tracing::warn!(device = %a.device, alarm = %a.kind, "SAFETY ALARM from the LAN");
    s.accept(vec![Item::alarm(a.device, a.ts_ms, &a.kind, None)])
        .await
}

/// The ingest routes, taking readings into `outbox` and waking the sync with `new_items`.
pub fn router(outbox: Arc<Outbox>, new_items: Arc<Notify>) -> Router {
    Router::new()
        .route("/v1/readings", post(readings))
        .route("/v1/alarms", post(alarms))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Ingest { outbox, new_items })
}
