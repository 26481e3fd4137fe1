//! The port to other nodes: a message for a twin whose shard is hosted elsewhere is
//! forwarded through [`Elsewhere`], and its answer comes back in wire form.
//!
//! Messages and answers travel as MessagePack (self-describing, so the twins' serde
//! attributes work, and it carries NaN and infinities, which a twin must see to refuse).
//! Errors travel as [`WireError`]: the kinds the callers act on keep their meaning
//! (retry a shard that is not hosted, treat a claimed idempotency key as done, refuse bad
//! input for good); the rest arrive as transient host errors.

use crate::{Error, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Where messages for twins hosted on other nodes go (the cluster's peer channel).
#[async_trait]
pub trait Elsewhere: Send + Sync + 'static {
    /// Delivers `msg` (a twin message in wire form) to twin `id` of kind `kind`, whose
    /// shard is `shard`, on the node that hosts that shard; returns the answer in wire
    /// form ([`decode_answer`]). Fails with [`Error::NotHosted`] when no node hosts it now.
    async fn forward(
        &self,
        kind: &'static str,
        shard: u32,
        id: &str,
        msg: Vec<u8>,
    ) -> Result<Vec<u8>>;
}

/// Who learns when a shard starts and stops being hosted here (the single-activation
/// monitor of the chaos tests, metrics).
pub trait Monitor: Send + Sync + 'static {
    /// Shard `shard` of `kind` is hosted from now on, under lease token `token` (0: no
    /// lease, a single node).
    fn hosted(&self, kind: &'static str, shard: u32, token: u64);
    /// Shard `shard` of `kind` is no longer hosted: nothing of it runs here any more.
    fn unhosted(&self, kind: &'static str, shard: u32, token: u64);
}

/// An error as it crosses between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireError {
    /// The shard is not hosted there (any more).
    NotHosted {
        /// Why.
        reason: String,
    },
    /// The effect was claimed already.
    IdempotencyExists {
        /// The key.
        key: String,
    },
    /// The twin refused the message for good.
    Twin {
        /// The twin.
        id: String,
        /// Why.
        reason: String,
    },
    /// Bad input, refused for good.
    Invalid(String),
    /// A compare-and-set lost (the caller may read again and retry).
    Conflict(String),
    /// Anything else: transient.
    Failed(String),
}

impl WireError {
    /// The wire form of `e`.
    pub fn from_error(e: &Error) -> Self {
        match e {
            Error::NotHosted { reason, .. } => Self::NotHosted {
                reason: reason.clone(),
            },
            Error::IdempotencyExists { key } => Self::IdempotencyExists { key: key.clone() },
            Error::Twin { id, reason } => Self::Twin {
                id: id.clone(),
                reason: reason.clone(),
            },
            Error::InvalidKey { .. }
            | Error::ValueTooLarge { .. }
            | Error::InvalidBatch { .. }
            | Error::InvalidArgument { .. } => Self::Invalid(e.to_string()),
            Error::VersionConflict { .. } | Error::HighWaterConflict { .. } => {
                Self::Conflict(e.to_string())
            }
            other => Self::Failed(other.to_string()),
        }
    }

    /// The error it stands for, for a message to twin `kind`/`shard`.
    pub fn into_error(self, kind: &str, shard: u32) -> Error {
        match self {
            Self::NotHosted { reason } => Error::NotHosted {
                kind: kind.to_owned(),
                shard,
                reason,
            },
            Self::IdempotencyExists { key } => Error::IdempotencyExists { key },
            Self::Twin { id, reason } => Error::Twin { id, reason },
            Self::Invalid(reason) => Error::InvalidBatch { reason },
            Self::Conflict(reason) | Self::Failed(reason) => {
                Error::Host(format!("on the hosting node: {reason}"))
            }
        }
    }
}

/// Encodes a twin message or answer.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| Error::Host(format!("cannot encode message: {e}")))
}

/// Decodes a twin message.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::InvalidBatch {
        reason: format!("undecodable forwarded message: {e}"),
    })
}

/// Encodes the outcome of a twin call for the way back.
pub fn encode_answer<R: Serialize>(answer: &Result<R>) -> Vec<u8> {
    let wire: std::result::Result<&R, WireError> = match answer {
        Ok(r) => Ok(r),
        Err(e) => Err(WireError::from_error(e)),
    };
    rmp_serde::to_vec_named(&wire).unwrap_or_else(|e| {
        let failed: std::result::Result<(), WireError> =
            Err(WireError::Failed(format!("cannot encode the answer: {e}")));
        rmp_serde::to_vec_named(&failed).expect("a plain error always encodes")
    })
}

/// Decodes the outcome of a call forwarded for twin `kind`/`shard`.
pub fn decode_answer<R: serde::de::DeserializeOwned>(
    kind: &str,
    shard: u32,
    bytes: &[u8],
) -> Result<R> {
    let wire: std::result::Result<R, WireError> = rmp_serde::from_slice(bytes)
        .map_err(|e| Error::Host(format!("undecodable answer from a peer: {e}")))?;
    wire.map_err(|e| e.into_error(kind, shard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twins::device::{DeviceItem, DeviceMsg, ItemKind};

    #[test]
    fn messages_cross_with_their_nan_intact() {
        let msg = DeviceMsg::FromSite {
            site: "t1:home".into(),
            items: vec![DeviceItem {
                seq: 4,
                ts_ms: 9,
                kind: ItemKind::Reading {
                    signal: "temp".into(),
                    value: f64::NAN,
                },
            }],
        };
        let back: DeviceMsg = decode(&encode(&msg).unwrap()).unwrap();
        let DeviceMsg::FromSite { items, .. } = back else {
            panic!("wrong variant");
        };
        assert!(matches!(items[0].kind, ItemKind::Reading { value, .. } if value.is_nan()));
    }

    #[test]
    fn errors_keep_the_meaning_callers_act_on() {
        let answer: Result<u64> = Err(Error::IdempotencyExists { key: "k".into() });
        let back: Result<u64> = decode_answer("device", 3, &encode_answer(&answer));
        assert_eq!(back, Err(Error::IdempotencyExists { key: "k".into() }));
        let answer: Result<u64> = Err(Error::NotHosted {
            kind: "device".into(),
            shard: 3,
            reason: "moving".into(),
        });
        let back: Result<u64> = decode_answer("device", 3, &encode_answer(&answer));
        assert!(matches!(back, Err(Error::NotHosted { shard: 3, .. })));
        let answer: Result<u64> = Err(Error::InvalidArgument {
            name: "field",
            reason: "too long".into(),
        });
        let back: Result<u64> = decode_answer("device", 3, &encode_answer(&answer));
        assert!(matches!(back, Err(Error::InvalidBatch { reason }) if reason.contains("too long")));
        let ok: Result<u64> = Ok(7);
        assert_eq!(
            decode_answer::<u64>("device", 3, &encode_answer(&ok)),
            Ok(7)
        );
        assert!(decode::<DeviceMsg>(b"\xc1 not msgpack").is_err());
    }
}
