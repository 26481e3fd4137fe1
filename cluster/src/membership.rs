//! The membership loop: the I/O around [`caretwin_actors::placement`].
//!
//! Each round (every `[cluster] round`, 200 ms by default) a node reads who announced
//! themselves in the `members` log and whose member lease is live, publishes that view to
//! its router ([`crate::peer::View`]), asks `placement::round` what to do with its
//! shards, and does it:
//!
//! - **acquire** the lease `shard/<n>` of each shard it now owns and nobody holds, then
//!   host the shard with the lease's fence (every write of its twins carries the token);
//! - **renew** the leases it keeps (all at once; one store call each);
//! - **hand over** shards another member owns now: stop hosting after what is queued
//!   (nothing in flight is lost), then release the lease, so the new owner can take it at
//!   once instead of waiting for it to expire;
//! - **drop** shards whose lease it could not renew in time: stop at once, `margin` before
//!   the lease runs out by its own clock, so it has stopped acting before anyone else may
//!   take the lease (leases change hands only after they expire or are released). Should
//!   a write still be on its way, the store refuses it: its fence is stale.
//!
//! A node that is cut off from the store therefore drops every shard within
//! `lease_ttl - margin` of its last renewal, and another node takes them over after
//! `lease_ttl`. That holds only if the loop keeps its own time: on a real network cut the
//! store's packets vanish and a call waits until TCP gives up, minutes later. So every
//! round first drops what is about to lapse, by the node's clock alone, and its store
//! calls may take until the next lease must be dropped (at least one round), no longer: a
//! call that has not answered by then counts as failed (`store_deadline`).
//!
//! A node also announces the address edges reach its sync endpoint at (`[sync]
//! advertise`), beside its peer address in the same `members` entry; each round
//! publishes the live members' sync addresses ([`SyncAddrs`]), which the sync endpoint
//! tells every edge in its `Welcome`, so an edge configured with one node learns the
//! others and can move to them. The field is optional JSON: nodes that predate it read
//! the entry as before, and their own entries simply announce no sync address.

use crate::peer::View;
use crate::{Error, Result};
use caretwin_actors::placement::{self, Announce};
use caretwin_actors::store::{Key, Lease, Store};
use caretwin_actors::system::System;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Appends a node's announcement to the members log.
async fn announce_self(store: &dyn Store, announcement: &[u8]) -> Result<()> {
    store
        .commit(caretwin_actors::store::WriteBatch::new().with(
            caretwin_actors::store::Op::Append {
                log: Key::new(placement::MEMBERS_LOG),
                value: announcement.to_vec(),
            },
        ))
        .await?;
    Ok(())
}

/// Entries of the members log read per call.
const READ_CHUNK: usize = 1_000;

/// Where a joining node is reached.
#[derive(Debug, Clone)]
pub struct Addresses {
    /// Its peer endpoint, `host:port`, for the other nodes.
    pub peer: String,
    /// Its sync endpoint, `host:port`, as edges reach it; `None` announces none (edges
    /// then only know the nodes they were configured with).
    pub sync: Option<String>,
}

/// A `members` log entry: the placement's [`Announce`] and the sync address, if any.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Entry {
    #[serde(flatten)]
    announce: Announce,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sync_addr: Option<String>,
}

/// The live members' sync addresses as of the last round, for the sync endpoint.
#[derive(Debug, Default)]
pub struct SyncAddrs(RwLock<Vec<String>>);

impl SyncAddrs {
    /// The addresses, in the members' id order.
    pub fn get(&self) -> Vec<String> {
        self.0.read().expect("sync addrs lock").clone()
    }

    fn set(&self, addrs: Vec<String>) {
        let mut cur = self.0.write().expect("sync addrs lock");
        if *cur != addrs {
            tracing::info!(sync_addrs = ?addrs, "members' sync addresses");
            *cur = addrs;
        }
    }
}

/// Timing of the membership loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a shard lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How often a round runs.
    pub round: Duration,
    /// How long before its lease runs out a node stops acting for a shard it could not
    /// renew.
    pub margin: Duration,
    /// How long after its member lease ran out a member is removed from the view (its
    /// lease no longer read each round; `placement::remembered`).
    pub forget_after: Duration,
}

/// One node's membership: what it announced, what it sees, what it holds.
pub struct Membership {
    me: String,
    store: Arc<dyn Store>,
    system: Arc<System>,
    view: Arc<RwLock<View>>,
    timing: Timing,
    clock: fn() -> u64,
    announced: Vec<Announce>,
    /// This node's own announcement as appended to the members log, appended again
    /// when its member lease had lapsed (the others may have removed it meanwhile).
    announcement: Vec<u8>,
    /// Each announced node's sync address, from its latest entry.
    sync_of: BTreeMap<String, Option<String>>,
    sync_addrs: Arc<SyncAddrs>,
    /// The sites connected to each live member ([`crate::presence`]).
    presence: Arc<crate::presence::Presence>,
    next_entry: u64,
    held: BTreeMap<u32, Lease>,
    /// The node's member lease, renewed every round (also while the node is still
    /// starting: provisioning may take longer than a lease lasts).
    member: Lease,
}

impl Membership {
    /// Announces `me` at `addrs` in the members log (the node holds its member lease
    /// already) and returns the loop's state.
    pub async fn join(
        me: &str,
        addrs: &Addresses,
        store: Arc<dyn Store>,
        system: Arc<System>,
        view: Arc<RwLock<View>>,
        timing: Timing,
    ) -> Result<Self> {
        let entry = Entry {
            announce: Announce {
                node_id: me.to_owned(),
                peer_addr: addrs.peer.clone(),
            },
            sync_addr: addrs.sync.clone(),
        };
        let member = store
            .lease(&Key::new(placement::member_lease(me)))
            .await?
            .filter(|l| l.holder == me && l.expires_at_ms != 0)
            .ok_or_else(|| {
                Error::Config(format!("node {me} holds no member lease; register first"))
            })?;
        let announcement = serde_json::to_vec(&entry).map_err(|e| Error::Config(e.to_string()))?;
        announce_self(&*store, &announcement).await?;
        Ok(Self {
            me: me.to_owned(),
            store,
            system,
            view,
            timing,
            clock: crate::node::now_ms,
            announced: Vec::new(),
            announcement,
            sync_of: BTreeMap::new(),
            sync_addrs: Arc::new(SyncAddrs::default()),
            presence: Arc::default(),
            next_entry: 1,
            held: BTreeMap::new(),
            member,
        })
    }

    /// The live members' sync addresses, kept up to date by every round.
    pub fn sync_addrs(&self) -> Arc<SyncAddrs> {
        self.sync_addrs.clone()
    }

    /// The sites online across the cluster, kept up to date by every round.
    pub fn presence(&self) -> Arc<crate::presence::Presence> {
        self.presence.clone()
    }

    fn ttl_ms(&self) -> u64 {
        self.timing.lease_ttl.as_millis() as u64
    }

    /// Until when the store calls of a round begun at `now` may run: until the first held
    /// shard lease is due to be dropped (`margin` before it runs out), or with none held
    /// for `lease_ttl - margin`; at least one round, so a slow store still gets answers.
    fn store_deadline(&self, now: u64) -> tokio::time::Instant {
        let margin = self.timing.margin.as_millis() as u64;
        let budget = self
            .held
            .values()
            .map(|l| l.expires_at_ms.saturating_sub(margin).saturating_sub(now))
            .min()
            .unwrap_or_else(|| self.ttl_ms().saturating_sub(margin));
        let budget = Duration::from_millis(budget).max(self.timing.round);
        tokio::time::Instant::now() + budget
    }

    /// Reads the members log's new entries and every announced member's lease.
    async fn read_view(&mut self, now: u64) -> Result<Vec<placement::Member>> {
        loop {
            let entries = self
                .store
                .read_log(
                    &Key::new(placement::MEMBERS_LOG),
                    self.next_entry,
                    READ_CHUNK,
                )
                .await?;
            let n = entries.len();
            for e in entries {
                self.next_entry = e.index + 1;
                match serde_json::from_slice::<Entry>(&e.value) {
                    Ok(Entry {
                        announce,
                        sync_addr,
                    }) => {
                        self.sync_of.insert(announce.node_id.clone(), sync_addr);
                        self.announced.push(announce);
                    }
                    Err(err) => {
                        tracing::warn!(index = e.index, error = %err, "unreadable member announcement skipped")
                    }
                }
            }
            if n < READ_CHUNK {
                break;
            }
        }
        let mut ids: Vec<&str> = self.announced.iter().map(|a| a.node_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let reads = ids.iter().map(|id| {
            let key = Key::new(placement::member_lease(id));
            let store = &self.store;
            async move { (id.to_string(), store.lease(&key).await) }
        });
        let mut leases = BTreeMap::new();
        for (id, lease) in futures::future::join_all(reads).await {
            if let Some(l) = lease? {
                leases.insert(id, l);
            }
        }
        let forget_ms = self.timing.forget_after.as_millis() as u64;
        let removed: Vec<String> = ids
            .iter()
            .filter(|id| {
                **id != self.me && !placement::remembered(leases.get(**id), now, forget_ms)
            })
            .map(|id| (*id).to_owned())
            .collect();
        if !removed.is_empty() {
            tracing::info!(members = ?removed, "members removed: their leases ran out long ago");
            self.announced.retain(|a| !removed.contains(&a.node_id));
        }
        Ok(placement::live_members(&self.announced, &leases, now))
    }

    /// One round: read the view, then acquire, renew, hand over and drop shards.
    pub async fn round(&mut self) -> Result<()> {
        let now = (self.clock)();
        let lapsed = self.member.expires_at_ms <= now;
        // Before asking the store anything, which may not answer: what is about to lapse
        // stops now.
        self.drop_lapsing(now).await;
        let deadline = self.store_deadline(now);
        match in_time(
            deadline,
            self.store.renew_lease(&self.member, self.ttl_ms(), now),
        )
        .await
        {
            Ok(l) => {
                self.member = l;
                if lapsed {
                    // Cut off for a while: the others may have removed this node from
                    // their view. Announce it again; it is live as of this renewal.
                    tracing::warn!("member lease had lapsed; announcing this node again");
                    if let Err(e) =
                        in_time(deadline, announce_self(&*self.store, &self.announcement)).await
                    {
                        tracing::warn!(error = %e, "announcement not written; next round retries");
                        self.member.expires_at_ms = 0;
                    }
                }
            }
            Err(e @ caretwin_actors::Error::LeaseLost { .. }) => {
                // Declared dead (its lease ran out and was taken): it acts for nothing.
                tracing::error!(error = %e, "member lease lost; every shard dropped");
                for s in self.held() {
                    self.stop_hosting(s, false, "member lease lost").await;
                }
                return Err(e.into());
            }
            Err(e) => tracing::warn!(error = %e, "member lease not renewed this round"),
        }
        let live = match in_time(deadline, self.read_view(now)).await {
            Ok(live) => live,
            Err(e) => {
                // Without a view the node keeps what it holds while its leases last.
                tracing::warn!(error = %e, "membership view unreadable this round");
                self.drop_lapsing((self.clock)()).await;
                return Err(e);
            }
        };
        {
            let mut view = self.view.write().expect("view lock");
            view.live = live.clone();
            view.known = self.announced.iter().map(|a| a.node_id.clone()).collect();
            view.known.sort_unstable();
            view.known.dedup();
        }
        self.sync_addrs.set(
            live.iter()
                .filter_map(|m| self.sync_of.get(&m.node_id).cloned().flatten())
                .collect(),
        );
        let others: Vec<String> = live
            .iter()
            .filter(|m| m.node_id != self.me)
            .map(|m| m.node_id.clone())
            .collect();
        let presence = async {
            self.presence.publish(&*self.store, &self.me).await?;
            self.presence.read(&*self.store, &others).await
        };
        if let Err(e) = in_time(deadline, presence).await {
            tracing::warn!(error = %e, "sites online not exchanged this round");
        }
        let expiries = self
            .held
            .iter()
            .map(|(&s, l)| (s, l.expires_at_ms))
            .collect();
        let plan = placement::round(
            &self.me,
            self.system.shard_count(),
            &live,
            &expiries,
            now,
            self.timing.margin.as_millis() as u64,
        );
        for s in plan.drop {
            self.stop_hosting(s, false, "lease about to run out unrenewed")
                .await;
        }
        for s in plan.hand_over {
            if let Some(lease) = self.stop_hosting(s, true, "handed over").await
                && let Err(e) = in_time(deadline, self.store.release_lease(&lease)).await
            {
                tracing::warn!(shard = s, error = %e, "shard lease not released; it will expire");
            }
        }
        let ttl = self.ttl_ms();
        let renewals = plan.renew.iter().map(|s| {
            let lease = self.held[s].clone();
            let store = &self.store;
            async move { (*s, store.renew_lease(&lease, ttl, now).await) }
        });
        // Not all answered in time: kept while the leases last; the next round drops what
        // runs out.
        let renewed = all_in_time(deadline, renewals, "shard leases not renewed").await;
        for (s, r) in renewed {
            match r {
                Ok(l) => {
                    self.held.insert(s, l);
                }
                Err(e @ caretwin_actors::Error::LeaseLost { .. }) => {
                    tracing::warn!(shard = s, error = %e, "shard lease lost");
                    self.stop_hosting(s, false, "lease lost").await;
                }
                Err(e) => {
                    // Kept while the lease lasts; dropped by a later round if it runs out.
                    tracing::warn!(shard = s, error = %e, "shard lease not renewed this round");
                }
            }
        }
        let acquisitions = plan.acquire.iter().map(|s| {
            let store = &self.store;
            let me = &self.me;
            async move {
                let name = Key::new(placement::shard_lease(*s));
                (*s, store.acquire_lease(&name, me, ttl, now).await)
            }
        });
        // Not all answered in time: a lease taken without our hearing of it is ours again
        // next round (same holder, same token), or runs out.
        let acquired = all_in_time(deadline, acquisitions, "shard leases not acquired").await;
        for (s, r) in acquired {
            match r {
                Ok(lease) => {
                    let at_ms = (self.clock)();
                    if let Err(e) = self.system.host_shard(s, Some(lease.fence())).await {
                        tracing::warn!(shard = s, error = %e, "cannot host shard");
                        let _ = self.store.release_lease(&lease).await;
                        continue;
                    }
                    tracing::info!(shard = s, token = lease.token, at_ms, "shard hosted");
                    self.held.insert(s, lease);
                }
                // Its previous owner still holds it (handing over, or dead until it expires).
                Err(caretwin_actors::Error::LeaseHeld { .. }) => {}
                Err(e) => tracing::warn!(shard = s, error = %e, "shard lease not acquired"),
            }
        }
        Ok(())
    }

    /// Stops hosting shard `s` (drained or at once) and forgets its lease; logs when
    /// nothing of it runs here any more (`shard stopped`, with its token and the time,
    /// which the process-level single-activation check reads).
    async fn stop_hosting(&mut self, s: u32, drain: bool, why: &'static str) -> Option<Lease> {
        let lease = self.held.remove(&s);
        self.system.drop_shard(s, drain).await;
        let token = lease.as_ref().map_or(0, |l| l.token);
        tracing::info!(
            shard = s,
            token,
            at_ms = (self.clock)(),
            why,
            "shard stopped"
        );
        lease
    }

    /// Stops every shard whose lease runs out within `margin` of `now` (no store call).
    async fn drop_lapsing(&mut self, now: u64) {
        let margin = self.timing.margin.as_millis() as u64;
        let lapsing: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, l)| now.saturating_add(margin) >= l.expires_at_ms)
            .map(|(&s, _)| s)
            .collect();
        for s in lapsing {
            self.stop_hosting(s, false, "lease about to run out unrenewed")
                .await;
        }
    }

    /// Runs rounds until `shutdown`, then hands every shard over (drained, leases
    /// released) so the other members take them at once. On `kill` it stops at once like
    /// a process killed: shards stop without draining and their leases are left to run
    /// out (the chaos tools' in-process crash).
    pub async fn run(
        mut self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        mut kill: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut every = tokio::time::interval(self.timing.round);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = async { let _ = kill.wait_for(|s| *s).await; } => {
                    for s in self.held() {
                        self.stop_hosting(s, false, "killed").await;
                    }
                    return;
                }
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                _ = every.tick() => {
                    if let Err(e) = self.round().await {
                        tracing::debug!(error = %e, "membership round failed");
                    }
                }
            }
        }
        self.leave().await;
    }

    /// Hands every held shard over: drained, then its lease released.
    pub async fn leave(&mut self) {
        // A store that does not answer must not hold the node's shutdown: unreleased
        // leases run out.
        let deadline = tokio::time::Instant::now() + self.timing.lease_ttl;
        for s in self.held() {
            if let Some(lease) = self.stop_hosting(s, true, "leaving").await
                && let Err(e) = in_time(deadline, self.store.release_lease(&lease)).await
            {
                tracing::warn!(shard = s, error = %e, "shard lease not released; it will expire");
            }
        }
        self.view.write().expect("view lock").live.clear();
        self.sync_addrs.set(Vec::new());
        self.presence.clear_remote();
    }

    /// The shards held now.
    pub fn held(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// Rounds until this node holds every shard it owns in its view and no other, or
    /// `timeout` passes; returns whether it got there.
    pub async fn settle(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let _ = self.round().await;
            let ids: Vec<String> = self
                .view
                .read()
                .expect("view lock")
                .live
                .iter()
                .map(|m| m.node_id.clone())
                .collect();
            let want = placement::shards_of(
                &self.me,
                self.system.shard_count(),
                ids.iter().map(String::as_str),
            );
            if want.iter().copied().eq(self.held.keys().copied()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(self.timing.round.min(Duration::from_millis(50))).await;
        }
    }
}

/// `call`'s result, or a backend error if it has not answered by `deadline` (the call is
/// dropped; what it had sent may still be applied, which every caller here tolerates: a
/// renewal or acquisition we did not hear of only keeps the lease ours a little longer).
async fn in_time<T, E: From<caretwin_actors::Error>>(
    deadline: tokio::time::Instant,
    call: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, E> {
    tokio::time::timeout_at(deadline, call)
        .await
        .unwrap_or_else(|_| {
            Err(caretwin_actors::Error::Backend("the store did not answer in time".into()).into())
        })
}

/// The answers of `calls`, run together, or none if they have not all answered by
/// `deadline` (logged: `what` this round).
async fn all_in_time<F: std::future::Future>(
    deadline: tokio::time::Instant,
    calls: impl IntoIterator<Item = F>,
    what: &'static str,
) -> Vec<F::Output> {
    tokio::time::timeout_at(deadline, futures::future::join_all(calls))
        .await
        .unwrap_or_else(|_| {
            tracing::warn!(what, "store calls unanswered in time this round");
            Vec::new()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_entries_read_both_ways_across_versions() {
        // An entry of a node that predates sync addresses: no sync address.
        let old = br#"{"node_id":"n1","peer_addr":"10.0.0.1:7300"}"#;
        let e: Entry = serde_json::from_slice(old).unwrap();
        assert_eq!(e.announce.node_id, "n1");
        assert_eq!(e.sync_addr, None);
        // A new entry, as such a node reads it: the placement's fields, the rest ignored.
        let new = serde_json::to_vec(&Entry {
            announce: Announce {
                node_id: "n2".into(),
                peer_addr: "10.0.0.2:7300".into(),
            },
            sync_addr: Some("n2.example:7400".into()),
        })
        .unwrap();
        let a: Announce = serde_json::from_slice(&new).unwrap();
        assert_eq!(a.peer_addr, "10.0.0.2:7300");
        let e: Entry = serde_json::from_slice(&new).unwrap();
        assert_eq!(e.sync_addr.as_deref(), Some("n2.example:7400"));
        // None announced: the entry is exactly the old shape.
        let none = serde_json::to_string(&Entry {
            announce: a,
            sync_addr: None,
        })
        .unwrap();
        assert_eq!(none, r#"{"node_id":"n2","peer_addr":"10.0.0.2:7300"}"#);
    }
}
