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

/// A log subscription's stream: on every wake of `grew`, `pending(cursor)` lists what the
/// log holds after the cursor (each with its index), and `deliver(index, item)` turns each
/// into a delivery (`None`: skipped by the subscription's filters); the cursor moves past
/// every item either way. Ends when the client hangs up, the node closes, or a step fails
/// (its error is the stream's last item).
pub(crate) fn follow<K, T, P, PF, D, DF>(
    mut grew: watch::Receiver<u64>,
    mut closing: Option<watch::Receiver<bool>>,
    after: u64,
    buffer: usize,
    pending: P,
    deliver: D,
) -> mpsc::Receiver<Result<T, Status>>
where
    K: Send + 'static,
    T: Send + 'static,
    P: Fn(u64) -> PF + Send + 'static,
    PF: std::future::Future<Output = Result<Vec<(u64, K)>, Status>> + Send,
    D: Fn(u64, K) -> DF + Send + 'static,
    DF: std::future::Future<Output = Result<Option<T>, Status>> + Send,
{
    let (tx, rx) = mpsc::channel(buffer);
    tokio::spawn(async move {
        let mut cursor = after;
        loop {
            grew.borrow_and_update();
            let items = match pending(cursor).await {
                Ok(items) => items,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for (index, item) in items {
                cursor = index;
                match deliver(index, item).await {
                    Ok(Some(d)) => {
                        if tx.send(Ok(d)).await.is_err() {
                            return; // the client went away
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            if !more(&mut grew, &tx, &mut closing).await {
                return;
            }
        }
    });
    rx
}
