//! Sharing what this node watches with its peers: the deciding half, with no I/O.
//!
//! Twin watches (`WatchTwins`) run on the node a client is connected to, while a twin is
//! written on the node hosting its shard. So each node tells every peer which snapshot
//! keys it watches — its whole set, with a version, each time the set changes — and the
//! peers relay commits of those keys back. [`Sharing`] decides when to tell whom:
//!
//! - every live peer gets the latest set until it acknowledges it; a failed send is
//!   retried with backoff while the peer is in the view;
//! - every [`RESYNC_MS`] the set is told again even if unchanged, so a peer that forgot it
//!   (it dropped this node from its view for a while) learns it again;
//! - a peer's answer says whether the set was new to it (`fresh`: it restarted, joined,
//!   or had forgotten): then every watcher here looks again at everything
//!   ([`Action::RelookAll`]), since what that peer committed before it knew was never
//!   relayed;
//! - when every live peer knows version `v`, keys first watched up to `v` are looked at
//!   once more ([`Action::Synced`]): a watch's first look may have been before a change
//!   that the peer did not relay because it did not know yet;
//! - a peer absent from the view for [`FORGET_AFTER_MS`] is forgotten (its interest and
//!   queued changes are dropped); a short absence (a late lease renewal) forgets nothing.
//!
//! The node's own incarnation is an `epoch` carried with each set; a peer's set from a
//! new epoch replaces the old one there, and hearing a peer's new epoch here means it
//! restarted and must be told again.

use std::collections::BTreeMap;

/// How often the set is told again though unchanged.
pub const RESYNC_MS: u64 = 10_000;
/// How long a peer may be absent from the view before its interest is forgotten.
pub const FORGET_AFTER_MS: u64 = 30_000;
/// First retry after a failed send; doubles up to [`MAX_RETRY_MS`].
const FIRST_RETRY_MS: u64 = 50;
/// Longest wait between retries.
const MAX_RETRY_MS: u64 = 2_000;

/// A peer's answer to a set it was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The peer's incarnation.
    pub epoch: u64,
    /// Nothing of this node's incarnation was known there before.
    pub fresh: bool,
}

/// What the node does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell `peer` (at `addr`) the set of keys watched here (the latest; it is at least
    /// `version`).
    Send {
        /// The peer's node id.
        peer: String,
        /// Where it listens.
        addr: String,
        /// The version decided on.
        version: u64,
    },
    /// Every live peer knows the set up to `version`; `relook`: look again at the keys
    /// first watched up to it (false when there are no peers to have missed anything).
    Synced {
        /// The version every live peer acknowledged.
        version: u64,
        /// Whether to look again.
        relook: bool,
    },
    /// A peer learnt the set afresh: every watcher looks at everything again.
    RelookAll,
    /// `peer` left the cluster: drop its interest and what is queued for it.
    Forget {
        /// The peer's node id.
        peer: String,
    },
}

#[derive(Debug)]
struct Peer {
    addr: String,
    /// Its incarnation, when known (from its answers or its own sets).
    epoch: Option<u64>,
    /// The version it acknowledged (of its current incarnation).
    told: Option<u64>,
    /// A send in flight.
    sending: bool,
    failures: u32,
    retry_at_ms: u64,
    told_at_ms: u64,
    /// Since when it is missing from the view.
    absent_since_ms: Option<u64>,
}

/// Who knows which version of this node's watched keys (see the module doc).
#[derive(Debug, Default)]
pub struct Sharing {
    version: u64,
    synced: u64,
    peers: BTreeMap<String, Peer>,
}

impl Sharing {
    /// The live members other than this node, `(node id, address)`, at `now_ms`.
    pub fn view<'a>(
        &mut self,
        live: impl IntoIterator<Item = (&'a str, &'a str)>,
        now_ms: u64,
    ) -> Vec<Action> {
        let live: BTreeMap<&str, &str> = live.into_iter().collect();
        for (id, addr) in &live {
            match self.peers.get_mut(*id) {
                Some(p) => {
                    p.absent_since_ms = None;
                    if p.addr != *addr {
                        // A new address is a new process, most likely: tell it again.
                        p.addr = (*addr).to_owned();
                        p.told = None;
                        p.epoch = None;
                    }
                }
                None => {
                    self.peers.insert(
                        (*id).to_owned(),
                        Peer {
                            addr: (*addr).to_owned(),
                            epoch: None,
                            told: None,
                            sending: false,
                            failures: 0,
                            retry_at_ms: 0,
                            told_at_ms: 0,
                            absent_since_ms: None,
                        },
                    );
                }
            }
        }
        let mut out = Vec::new();
        self.peers.retain(|id, p| {
            if live.contains_key(id.as_str()) {
                return true;
            }
            let since = *p.absent_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= FORGET_AFTER_MS {
                out.push(Action::Forget { peer: id.clone() });
                return false;
            }
            true
        });
        out
    }

    /// The set watched here is at `version` now.
    pub fn interest(&mut self, version: u64) {
        self.version = self.version.max(version);
    }

    /// `peer` told this node its own set, from incarnation `epoch`: a new incarnation has
    /// not heard this node's set.
    pub fn heard(&mut self, peer: &str, epoch: u64) {
        if let Some(p) = self.peers.get_mut(peer)
            && p.epoch != Some(epoch)
        {
            p.epoch = None;
            p.told = None;
        }
    }

    /// A send of `version` to `peer` ended: acknowledged (`Some`) or failed (`None`).
    pub fn sent(&mut self, peer: &str, version: u64, ack: Option<Ack>, now_ms: u64) -> Vec<Action> {
        let Some(p) = self.peers.get_mut(peer) else {
            return Vec::new();
        };
        p.sending = false;
        match ack {
            Some(ack) => {
                p.epoch = Some(ack.epoch);
                p.told = Some(p.told.map_or(version, |t| t.max(version)));
                p.failures = 0;
                p.retry_at_ms = now_ms;
                p.told_at_ms = now_ms;
                if ack.fresh {
                    return vec![Action::RelookAll];
                }
                Vec::new()
            }
            None => {
                p.failures = p.failures.saturating_add(1);
                let wait = FIRST_RETRY_MS
                    .saturating_mul(1 << p.failures.min(16).saturating_sub(1))
                    .min(MAX_RETRY_MS);
                p.retry_at_ms = now_ms + wait;
                Vec::new()
            }
        }
    }

    /// What to do at `now_ms`: the sends due, and whether every live peer now knows a
    /// newer version.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        for (id, p) in &mut self.peers {
            if p.absent_since_ms.is_some() || p.sending || now_ms < p.retry_at_ms {
                continue;
            }
            let behind = p.told.is_none_or(|t| t < self.version);
            let stale = now_ms >= p.told_at_ms + RESYNC_MS;
            if behind || stale {
                p.sending = true;
                out.push(Action::Send {
                    peer: id.clone(),
                    addr: p.addr.clone(),
                    version: self.version,
                });
            }
        }
        let present = self.peers.values().filter(|p| p.absent_since_ms.is_none());
        let mut any = false;
        let mut synced = self.version;
        for p in present {
            any = true;
            synced = synced.min(p.told.unwrap_or(0));
        }
        if synced > self.synced {
            self.synced = synced;
            out.push(Action::Synced {
                version: synced,
                relook: any,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(actions: &[Action]) -> Vec<(&str, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { peer, version, .. } => Some((peer.as_str(), *version)),
                _ => None,
            })
            .collect()
    }

    const ACK: Ack = Ack {
        epoch: 7,
        fresh: false,
    };

    #[test]
    fn every_live_peer_is_told_each_new_version_until_it_acknowledges() {
        let mut s = Sharing::default();
        assert!(s.view([("b", "b:1"), ("c", "c:1")], 0).is_empty());
        // Version 0 (nothing watched) is told too: it is how a peer learns this epoch.
        assert_eq!(sends(&s.poll(0)), [("b", 0), ("c", 0)]);
        assert!(sends(&s.poll(1)).is_empty(), "one send in flight per peer");
        s.sent("b", 0, Some(ACK), 2);
        s.sent("c", 0, Some(ACK), 2);
        assert!(sends(&s.poll(3)).is_empty(), "both know version 0");
        s.interest(1);
        let a = s.poll(4);
        assert_eq!(sends(&a), [("b", 1), ("c", 1)]);
        assert!(!a.iter().any(|a| matches!(a, Action::Synced { .. })));
        s.sent("b", 1, Some(ACK), 5);
        assert!(
            !s.poll(5).iter().any(|a| matches!(a, Action::Synced { .. })),
            "c does not know version 1 yet"
        );
        s.sent("c", 1, Some(ACK), 6);
        assert_eq!(
            s.poll(6),
            [Action::Synced {
                version: 1,
                relook: true
            }]
        );
        assert!(s.poll(7).is_empty(), "synced once");
    }

    #[test]
    fn failures_back_off_and_a_fresh_answer_makes_everyone_look_again() {
        let mut s = Sharing::default();
        s.interest(3);
        s.view([("b", "b:1")], 0);
        assert_eq!(sends(&s.poll(0)), [("b", 3)]);
        s.sent("b", 3, None, 10);
        assert!(sends(&s.poll(59)).is_empty(), "first retry after 50 ms");
        assert_eq!(sends(&s.poll(60)), [("b", 3)]);
        s.sent("b", 3, None, 60);
        assert!(sends(&s.poll(159)).is_empty(), "then 100 ms");
        assert_eq!(sends(&s.poll(160)), [("b", 3)]);
        let fresh = Ack {
            epoch: 9,
            fresh: true,
        };
        assert_eq!(s.sent("b", 3, Some(fresh), 170), [Action::RelookAll]);
        for _ in 0..20 {
            s.sent("b", 3, None, 0);
        }
        assert!(
            s.peers["b"].retry_at_ms <= MAX_RETRY_MS,
            "the backoff is capped"
        );
    }

    #[test]
    fn a_restarted_peer_is_told_again_and_an_unchanged_set_is_resent_now_and_then() {
        let mut s = Sharing::default();
        s.interest(2);
        s.view([("b", "b:1")], 0);
        s.poll(0);
        s.sent("b", 2, Some(ACK), 0);
        s.poll(0);
        assert!(sends(&s.poll(RESYNC_MS - 1)).is_empty());
        assert_eq!(sends(&s.poll(RESYNC_MS)), [("b", 2)], "told again");
        s.sent("b", 2, Some(ACK), RESYNC_MS);
        // The same incarnation tells its own set: nothing to do.
        s.heard("b", 7);
        assert!(sends(&s.poll(RESYNC_MS + 1)).is_empty());
        // A new incarnation: it knows nothing of this node.
        s.heard("b", 8);
        assert_eq!(sends(&s.poll(RESYNC_MS + 2)), [("b", 2)]);
        // Someone not in the view: nothing (it is told once it is).
        s.heard("z", 1);
        assert!(!s.peers.contains_key("z"));
    }

    #[test]
    fn a_short_absence_forgets_nothing_a_long_one_forgets_the_peer() {
        let mut s = Sharing::default();
        s.interest(1);
        s.view([("b", "b:1"), ("c", "c:1")], 0);
        s.poll(0);
        s.sent("b", 1, Some(ACK), 0);
        // c is slow to answer and drops out of the view: b alone decides what is synced.
        assert!(s.view([("b", "b:1")], 100).is_empty());
        assert_eq!(
            s.poll(100),
            [Action::Synced {
                version: 1,
                relook: true
            }]
        );
        s.interest(2);
        assert_eq!(sends(&s.poll(101)), [("b", 2)], "not to the absent c");
        // c comes back within the grace: it is told what it missed.
        s.sent("c", 1, None, 150);
        assert!(s.view([("b", "b:1"), ("c", "c:1")], 200).is_empty());
        assert_eq!(sends(&s.poll(200)), [("c", 2)]);
        // c goes for good.
        s.view([("b", "b:1")], 300);
        assert_eq!(
            s.view([("b", "b:1")], 300 + FORGET_AFTER_MS),
            [Action::Forget { peer: "c".into() }]
        );
        // A new address is a new process: told again, even the same version.
        s.sent("b", 2, Some(ACK), 301);
        s.view([("b", "b:2")], 302 + FORGET_AFTER_MS);
        assert_eq!(sends(&s.poll(303 + FORGET_AFTER_MS)), [("b", 2)]);
    }

    #[test]
    fn with_no_peers_every_version_is_synced_without_looking_again() {
        let mut s = Sharing::default();
        s.interest(4);
        assert_eq!(
            s.poll(0),
            [Action::Synced {
                version: 4,
                relook: false
            }]
        );
    }
}
