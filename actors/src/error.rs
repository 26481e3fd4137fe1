//! The crate's error type.

/// Everything that can fail in the deciding code and at its ports.
///
/// Messages are lowercase, with no trailing period, and name the value that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A key was empty, too long or held a forbidden byte.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given (truncated to 64 bytes when long).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value was larger than [`crate::store::MAX_VALUE_BYTES`].
    #[error("value for key {key:?} is {len} bytes, the limit is {max}")]
    ValueTooLarge {
        /// The key whose value was refused.
        key: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A write batch was empty, held too many operations or too many bytes.
    #[error("write batch refused: {reason}")]
    InvalidBatch {
        /// Why the batch was refused.
        reason: String,
    },
    /// An argument other than a key or value was out of range.
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A compare-and-set on a twin snapshot found another version.
    #[error("version conflict on {key:?}: expected version {expected}, found {actual}")]
    VersionConflict {
        /// The snapshot's key.
        key: String,
        /// The version the writer expected (0: absent).
        expected: u64,
        /// The version the store holds (0: absent).
        actual: u64,
    },
    /// A fenced write carried a token that is no longer the lease's current one.
    #[error("stale fence on lease {lease:?}: presented token {presented}, current token {current}")]
    StaleFence {
        /// The lease the fence refers to.
        lease: String,
        /// The token the writer presented.
        presented: u64,
        /// The lease's current token (0: never granted).
        current: u64,
    },
    /// An applied-sequence high-water mark was not where the writer expected it.
    #[error("high-water conflict on device {device:?}: expected {expected}, found {actual}")]
    HighWaterConflict {
        /// The device.
        device: String,
        /// The mark the writer expected.
        expected: u64,
        /// The mark the store holds.
        actual: u64,
    },
    /// A create-only idempotency record already exists.
    #[error("idempotency key {key:?} already recorded")]
    IdempotencyExists {
        /// The idempotency key.
        key: String,
    },
    /// A lease is held by another holder and has not expired.
    #[error("lease {name:?} is held by {holder:?} until {expires_at_ms} ms")]
    LeaseHeld {
        /// The lease.
        name: String,
        /// Its current holder.
        holder: String,
        /// When it expires (Unix ms).
        expires_at_ms: u64,
    },
    /// A renewal or release named a lease token that is no longer current.
    #[error("lease {name:?} lost: token {token} is no longer current")]
    LeaseLost {
        /// The lease.
        name: String,
        /// The token the caller held.
        token: u64,
    },
    /// The backend failed (I/O, connection, corruption); the message says how.
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// The store has been shut down.
    #[error("store is closed")]
    Closed,
    /// The twin host failed (a shard stopped or did not answer).
    #[error("twin host: {0}")]
    Host(String),
    /// A twin refused a message or its snapshot could not be read.
    #[error("twin {id:?}: {reason}")]
    Twin {
        /// The twin.
        id: String,
        /// Why.
        reason: String,
    },
    /// No node hosts the twin's shard right now (it is moving, or its node failed and
    /// its lease has not run out yet); the caller may try again.
    #[error("shard {shard} of {kind} is not hosted here or anywhere reachable: {reason}")]
    NotHosted {
        /// The kind of twin.
        kind: String,
        /// The shard.
        shard: u32,
        /// Why.
        reason: String,
    },
    /// A configuration text could not be parsed or has a wrong value.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
