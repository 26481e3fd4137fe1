//! Which sites have a sync session open anywhere in the cluster.
//!
//! A site's edge keeps one session with one node (any node: edges spread over the
//! members). What the gRPC endpoint reports as `site_online` must not depend on which
//! node the integrator asked, so each member publishes the sites connected to it in the
//! store (`_cluster/presence/<node>`, a snapshot it alone writes, rewritten only when the
//! set changes) and reads the other live members' each membership round. A dead member's
//! sites drop out with it (only live members are read); a site that moves to another node
//! is online there by that node's next round. Staleness is at most a round or two.

use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock, RwLock};

/// The sites connected to this node now (its sync endpoint's sessions).
pub type LocalSites = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// The key under which member `node` publishes its sites.
pub fn key(node: &str) -> Key {
    Key::new(format!("_cluster/presence/{node}"))
}

/// The sites online in the cluster as this node knows them: its own sessions now, and the
/// other live members' as of the last membership round.
#[derive(Default)]
pub struct Presence {
    local: OnceLock<LocalSites>,
    remote: RwLock<BTreeSet<String>>,
    /// What this node last published, and the version it holds (0: nothing yet).
    published: tokio::sync::Mutex<Option<(Vec<String>, u64)>>,
}

impl Presence {
    /// Where this node's own sessions are read from (set once, when the sync endpoint
    /// exists; until then the node has none).
    pub fn set_local(&self, sites: LocalSites) {
        if self.local.set(sites).is_err() {
            tracing::warn!("the local sites were already set; kept the first");
        }
    }

    fn local(&self) -> Vec<String> {
        let mut v = self.local.get().map(|f| f()).unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Every site with a session on some live member, sorted.
    pub fn online(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self.remote.read().expect("presence lock").clone();
        all.extend(self.local());
        all.into_iter().collect()
    }

    /// Publishes this node's sites if they changed since the last time (one
    /// compare-and-set write; the version is read first after a start or a conflict).
    pub async fn publish(&self, store: &dyn Store, me: &str) -> caretwin_actors::Result<()> {
        let now = self.local();
        let mut published = self.published.lock().await;
        let version = match &*published {
            Some((sites, _)) if *sites == now => return Ok(()),
            Some((_, version)) => *version,
            None => store.snapshot(&key(me)).await?.map_or(0, |v| v.version),
        };
        let value = serde_json::to_vec(&now).expect("a list of strings serializes");
        let batch = WriteBatch::new().with(Op::PutSnapshot {
            key: key(me),
            expected_version: version,
            value,
        });
        match store.commit(batch).await {
            Ok(_) => {
                *published = Some((now, version + 1));
                Ok(())
            }
            Err(e) => {
                // Read the version again next time (a conflict, or an unknown outcome).
                *published = None;
                Err(e)
            }
        }
    }

    /// Reads the sites of `others` (live members but this one) and keeps their union.
    pub async fn read(&self, store: &dyn Store, others: &[String]) -> caretwin_actors::Result<()> {
        let reads = others
            .iter()
            .map(|id| async move { store.snapshot(&key(id)).await });
        let mut remote = BTreeSet::new();
        for (id, r) in others.iter().zip(futures::future::join_all(reads).await) {
            if let Some(v) = r? {
                match serde_json::from_slice::<Vec<String>>(&v.value) {
                    Ok(sites) => remote.extend(sites),
                    Err(e) => tracing::warn!(node = %id, error = %e, "unreadable presence skipped"),
                }
            }
        }
        *self.remote.write().expect("presence lock") = remote;
        Ok(())
    }

    /// Forgets the other members' sites (this node left or lost the store).
    pub fn clear_remote(&self) {
        self.remote.write().expect("presence lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedConfig, EmbeddedStore};
    use std::sync::Mutex;

    fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(&EmbeddedConfig::at(dir.path().join("data"))).unwrap()
    }

    fn sites(v: &[&str]) -> LocalSites {
        let v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
        Arc::new(move || v.clone())
    }

    #[tokio::test]
    async fn a_site_on_any_live_member_is_online_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let (n1, n2) = (Presence::default(), Presence::default());
        let at_n2 = Arc::new(Mutex::new(vec!["t1:home-2".to_owned()]));
        n1.set_local(sites(&["t1:home-1"]));
        let shared = at_n2.clone();
        n2.set_local(Arc::new(move || shared.lock().unwrap().clone()));
        n1.publish(&store, "n1").await.unwrap();
        n2.publish(&store, "n2").await.unwrap();
        // Before a round, each node knows only its own.
        assert_eq!(n1.online(), vec!["t1:home-1"]);
        n1.read(&store, &["n2".into()]).await.unwrap();
        assert_eq!(n1.online(), vec!["t1:home-1", "t1:home-2"]);

        // The site leaves n2: gone from n1's view after n2 publishes and n1 reads again.
        at_n2.lock().unwrap().clear();
        n2.publish(&store, "n2").await.unwrap();
        n1.read(&store, &["n2".into()]).await.unwrap();
        assert_eq!(n1.online(), vec!["t1:home-1"]);

        // A member that is not live any more is not read: its sites are not online.
        at_n2.lock().unwrap().push("t1:home-3".into());
        n2.publish(&store, "n2").await.unwrap();
        n1.read(&store, &[]).await.unwrap();
        assert_eq!(n1.online(), vec!["t1:home-1"]);
    }

    #[tokio::test]
    async fn publishing_writes_only_changes_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let n1 = Presence::default();
        n1.set_local(sites(&["t1:a"]));
        n1.publish(&store, "n1").await.unwrap();
        n1.publish(&store, "n1").await.unwrap();
        // Unchanged: one write.
        assert_eq!(
            store.snapshot(&key("n1")).await.unwrap().unwrap().version,
            1
        );
        // Restarted under the same id: reads the version, then writes over it.
        let again = Presence::default();
        again.set_local(sites(&["t1:b"]));
        again.publish(&store, "n1").await.unwrap();
        let v = store.snapshot(&key("n1")).await.unwrap().unwrap();
        assert_eq!(v.version, 2);
        assert_eq!(
            serde_json::from_slice::<Vec<String>>(&v.value).unwrap(),
            vec!["t1:b"]
        );
    }
}
