//! The cluster node's lifecycle: open the store, register, serve, drain.
//!
//! This is the I/O edge around the deciding code: it owns the clock, the store handle and
//! the tasks.

use crate::config::ClusterConfig;
use crate::{Error, Result};
use caretwin_actors::store::{Key, Lease, Store};
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The membership lease's name for a node.
pub fn member_key(node_id: &str) -> Key {
    Key::new(format!("member/{node_id}"))
}

/// Runs a node until `shutdown` resolves: opens its store, takes its membership lease
/// (refusing to start if another process is live under the same id), renews it, and on
/// shutdown releases it and closes the store cleanly.
pub async fn run(config: ClusterConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    config.validate()?;
    let store = crate::store::open(&config.store)?;
    let lease = register(&*store, &config).await?;
    tracing::info!(node = %config.node_id, token = lease.token, "node registered");
    let lease = serve(&*store, &config, lease, shutdown).await?;
    store.release_lease(&lease).await?;
    tracing::info!(node = %config.node_id, "node left the cluster");
    drain(store);
    Ok(())
}

async fn register(store: &dyn Store, config: &ClusterConfig) -> Result<Lease> {
    let ttl = config.lease_ttl.as_millis() as u64;
    store
        .acquire_lease(&member_key(&config.node_id), &config.node_id, ttl, now_ms())
        .await
        .map_err(|e| match e {
            caretwin_actors::Error::LeaseHeld {
                holder,
                expires_at_ms,
                ..
            } => Error::NodeIdTaken {
                node_id: config.node_id.clone(),
                holder,
                expires_at_ms,
            },
            e => e.into(),
        })
}

async fn serve(
    store: &dyn Store,
    config: &ClusterConfig,
    mut lease: Lease,
    shutdown: impl Future<Output = ()>,
) -> Result<Lease> {
    let ttl = config.lease_ttl.as_millis() as u64;
    let mut renew = tokio::time::interval(config.renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(lease),
            _ = renew.tick() => {
                lease = store.renew_lease(&lease, ttl, now_ms()).await?;
                tracing::debug!(node = %config.node_id, expires_at_ms = lease.expires_at_ms, "lease renewed");
            }
        }
    }
}

/// Drops the last handle of the store, which lets its writer finish what is queued.
fn drain(store: Arc<dyn Store>) {
    drop(store);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[tokio::test]
    async fn node_registers_and_releases_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let config = ClusterConfig {
            store: StoreConfig::embedded_at(dir.path()),
            ..ClusterConfig::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let node = tokio::spawn(run(config.clone(), async move {
            let _ = rx.await;
        }));
        // The embedded database is locked while the node runs, so the lease is checked
        // after shutdown: taken once (token 1), then released.
        tx.send(()).unwrap();
        node.await.unwrap().unwrap();
        let store = crate::store::open(&config.store).unwrap();
        let lease = store.lease(&member_key("node-1")).await.unwrap().unwrap();
        assert_eq!(lease.expires_at_ms, 0, "released on shutdown");
        assert_eq!(lease.token, 1);
    }
}
