//! What the log-backed server streams share (cases, commands, notifications): waiting for
//! the next entry, and a subscriber's durable cursor.

use caretwin_actors::store::{Key, Store};
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// Waits until the log grew; `false` when the stream should end instead: the log's signal
/// is gone, the client hung up, or the node is closing (a node that went away without
/// saying so is closing too).
pub(crate) async fn more<T>(
    grew: &mut watch::Receiver<u64>,
    client: &mpsc::Sender<T>,
    closing: &mut Option<watch::Receiver<bool>>,
) -> bool {
    let node_closing = async {
        match closing.as_mut() {
            Some(c) => drop(c.wait_for(|c| *c).await),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        changed = grew.changed() => changed.is_ok(),
        () = client.closed() => false,
        () = node_closing => false,
    }
}

/// A subscriber's acknowledged cursor, kept in the idempotency record `key` (0: none yet).
pub(crate) async fn stored_cursor(store: &dyn Store, key: &Key) -> Result<u64, Status> {
    let raw = store
        .idempotency(key)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(raw
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}
