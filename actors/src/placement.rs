//! Placement: which live member of the cluster hosts which shard.
//!
//! Twins map to a fixed number of virtual shards by a stable hash of their id
//! ([`crate::host::shard_of`]); shards map to live members by rendezvous
//! (highest-random-weight) hashing: every member scores every shard, the highest score
//! wins. A member joining takes only the shards it now scores highest on (about
//! `1/(n+1)` of them); a member leaving gives up only its own. No table is stored: every
//! node with the same view of the members computes the same owners.
//!
//! Membership itself is a lease per member in the store (`member/<id>`, renewed by its
//! holder, the model of Orleans' membership table) plus an append-only log of joins
//! (`members`) that says which leases to look at. [`live_members`] decides who is alive
//! from those records and `now`; it does no I/O.
//!
//! Everything here is pure: the node's membership loop (`caretwin-cluster`) reads the
//! records, asks this module, and acts (acquire, renew and release shard leases; host and
//! drop shards).

use crate::store::Lease;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The log members append themselves to when they join.
pub const MEMBERS_LOG: &str = "members";

/// The lease a member holds while it is alive.
pub fn member_lease(node_id: &str) -> String {
    format!("member/{node_id}")
}

/// The lease a member holds while it hosts shard `shard`; its token fences every write of
/// the shard's twins.
pub fn shard_lease(shard: u32) -> String {
    format!("shard/{shard}")
}

/// A member as it announced itself when it joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The node's id.
    pub node_id: String,
    /// Where its peers reach it (its peer endpoint, `host:port`).
    pub peer_addr: String,
}

/// A live member.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// The node's id.
    pub node_id: String,
    /// Where its peers reach it.
    pub peer_addr: String,
}

/// The rendezvous score of `member` for `shard`.
fn score(shard: u32, member: &str) -> u64 {
    let mut buf = Vec::with_capacity(member.len() + 5);
    buf.extend_from_slice(member.as_bytes());
    buf.push(0);
    buf.extend_from_slice(&shard.to_be_bytes());
    xxhash_rust::xxh3::xxh3_64(&buf)
}

/// The member that hosts `shard` among `members` (ids), or `None` when there is none.
/// Ties (astronomically rare) go to the smaller id, so every node agrees.
pub fn owner<'a>(shard: u32, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    members
        .into_iter()
        .map(|m| (score(shard, m), std::cmp::Reverse(m)))
        .max()
        .map(|(_, std::cmp::Reverse(m))| m)
}

/// The shards of `0..shards` that `me` hosts among `members`.
pub fn shards_of<'a>(
    me: &str,
    shards: u32,
    members: impl IntoIterator<Item = &'a str> + Clone,
) -> BTreeSet<u32> {
    (0..shards)
        .filter(|&s| owner(s, members.clone()) == Some(me))
        .collect()
}

/// The members alive at `now`: those announced in the members log whose member lease is
/// held by them and not expired. `leases` maps a node id to its member lease as read.
/// Later announcements of the same node (a restart on a new address) win.
pub fn live_members(
    announced: &[Announce],
    leases: &BTreeMap<String, Lease>,
    now_ms: u64,
) -> Vec<Member> {
    let mut latest: BTreeMap<&str, &str> = BTreeMap::new();
    for a in announced {
        latest.insert(&a.node_id, &a.peer_addr);
    }
    latest
        .into_iter()
        .filter(|(id, _)| {
            leases
                .get(*id)
                .is_some_and(|l| l.holder == *id && l.expires_at_ms > now_ms)
        })
        .map(|(id, addr)| Member {
            node_id: id.to_owned(),
            peer_addr: addr.to_owned(),
        })
        .collect()
}

/// Whether an announced member is still worth watching at `now_ms`: its member lease
/// exists and ran out (or was released, which leaves it expired at 0) less than
/// `forget_after_ms` ago. A member that fails this is removed from the view for good:
/// nobody reads its lease each round any more, so nodes that come and go under new ids
/// (rolling deploys) cost nothing once they are gone. A removed node that comes back
/// announces itself again (on restart, or when it finds its own lease had lapsed).
pub fn remembered(lease: Option<&Lease>, now_ms: u64, forget_after_ms: u64) -> bool {
    lease.is_some_and(|l| l.expires_at_ms.saturating_add(forget_after_ms) > now_ms)
}

/// What a member does with its shards in one round of its membership loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Shards it should host and does not hold: try to acquire their leases.
    pub acquire: Vec<u32>,
    /// Shards it holds and should keep: renew their leases.
    pub renew: Vec<u32>,
    /// Shards it holds and should give up (another member owns them now): stop hosting
    /// them after what is queued, then release their leases.
    pub hand_over: Vec<u32>,
    /// Shards whose lease it can no longer count on (expired by its clock, or about to be,
    /// without a renewal): stop acting for them at once.
    pub drop: Vec<u32>,
}

/// Decides one round for member `me`: `held` maps each shard it holds to its lease's
/// expiry (as the store last granted it); `margin_ms` is how long before that expiry a
/// member stops acting when it could not renew (its lease may run out before the next
/// round, and another member may take over as soon as it has). `live` is the live members
/// (it includes `me` when `me` is healthy; a member that finds itself not live holds
/// nothing).
pub fn round(
    me: &str,
    shards: u32,
    live: &[Member],
    held: &BTreeMap<u32, u64>,
    now_ms: u64,
    margin_ms: u64,
) -> Round {
    let ids: Vec<&str> = live.iter().map(|m| m.node_id.as_str()).collect();
    let mine = if ids.contains(&me) {
        shards_of(me, shards, ids.iter().copied())
    } else {
        BTreeSet::new()
    };
    let mut r = Round::default();
    for (&s, &expires_at_ms) in held {
        if now_ms.saturating_add(margin_ms) >= expires_at_ms {
            r.drop.push(s);
        } else if mine.contains(&s) {
            r.renew.push(s);
        } else {
            r.hand_over.push(s);
        }
    }
    r.acquire = mine.into_iter().filter(|s| !held.contains_key(s)).collect();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node-{i}")).collect()
    }

    fn owners(shards: u32, members: &[String]) -> Vec<String> {
        (0..shards)
            .map(|s| {
                owner(s, members.iter().map(String::as_str))
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn every_shard_has_one_owner_and_the_load_is_spread() {
        let m = ids(4);
        let o = owners(1024, &m);
        for id in &m {
            let n = o.iter().filter(|x| *x == id).count();
            assert!((180..330).contains(&n), "{id} owns {n} of 1024");
        }
        assert_eq!(owner(7, std::iter::empty()), None);
    }

    #[test]
    fn owners_do_not_depend_on_the_order_members_are_listed() {
        let m = ids(5);
        let mut rev = m.clone();
        rev.reverse();
        assert_eq!(owners(256, &m), owners(256, &rev));
    }

    #[test]
    fn a_join_moves_only_the_shards_the_newcomer_takes() {
        let three = ids(3);
        let four = ids(4);
        let (before, after) = (owners(1024, &three), owners(1024, &four));
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(a, "node-4", "a shard moved between old members");
                moved += 1;
            }
        }
        assert!((180..330).contains(&moved), "{moved} of 1024 moved");
    }

    #[test]
    fn a_leave_moves_only_the_leavers_shards() {
        let four = ids(4);
        let three: Vec<String> = four.iter().filter(|m| *m != "node-2").cloned().collect();
        let (before, after) = (owners(1024, &four), owners(1024, &three));
        for (b, a) in before.iter().zip(&after) {
            if b != "node-2" {
                assert_eq!(b, a, "a shard of a staying member moved");
            }
        }
    }

    fn lease(holder: &str, expires_at_ms: u64) -> Lease {
        Lease {
            name: member_lease(holder).into(),
            holder: holder.into(),
            token: 1,
            expires_at_ms,
        }
    }

    #[test]
    fn members_dead_for_longer_than_forget_after_are_removed() {
        let forget = 10_000;
        // live, or dead for less than forget_after: still watched (it may come back)
        assert!(remembered(Some(&lease("a", 5_000)), 1_000, forget));
        assert!(remembered(Some(&lease("a", 5_000)), 14_999, forget));
        // dead for forget_after: removed
        assert!(!remembered(Some(&lease("a", 5_000)), 15_000, forget));
        // left (released: expired at 0) or no lease at all: removed once forget_after
        // has passed since the epoch, i.e. at once
        assert!(!remembered(Some(&lease("a", 0)), 15_000, forget));
        assert!(!remembered(None, 0, forget));
    }

    #[test]
    fn live_members_hold_their_unexpired_lease() {
        let announced = vec![
            Announce {
                node_id: "a".into(),
                peer_addr: "10.0.0.1:1".into(),
            },
            Announce {
                node_id: "b".into(),
                peer_addr: "10.0.0.2:1".into(),
            },
            Announce {
                node_id: "c".into(),
                peer_addr: "10.0.0.3:1".into(),
            },
            // a restarted elsewhere
            Announce {
                node_id: "a".into(),
                peer_addr: "10.0.0.9:1".into(),
            },
        ];
        let mut leases = BTreeMap::new();
        leases.insert("a".to_owned(), lease("a", 2_000));
        leases.insert("b".to_owned(), lease("b", 1_000)); // expired at now = 1_000
        // c never took its lease (or it was deleted): not live
        let live = live_members(&announced, &leases, 1_000);
        assert_eq!(
            live,
            vec![Member {
                node_id: "a".into(),
                peer_addr: "10.0.0.9:1".into()
            }]
        );
    }

    fn members(ids: &[&str]) -> Vec<Member> {
        ids.iter()
            .map(|id| Member {
                node_id: (*id).into(),
                peer_addr: String::new(),
            })
            .collect()
    }

    #[test]
    fn a_round_acquires_renews_hands_over_and_drops() {
        let live = members(&["a", "b"]);
        let ids = ["a", "b"];
        let mine = shards_of("a", 16, ids);
        let theirs: Vec<u32> = (0..16).filter(|s| !mine.contains(s)).collect();
        let (keep, lapsing) = {
            let mut it = mine.iter().copied();
            (it.next().unwrap(), it.next().unwrap())
        };
        let mut held = BTreeMap::new();
        held.insert(keep, 10_000);
        held.insert(lapsing, 1_200); // within the margin of now = 1_000
        held.insert(theirs[0], 10_000);
        let r = round("a", 16, &live, &held, 1_000, 300);
        assert_eq!(r.renew, vec![keep]);
        assert_eq!(r.drop, vec![lapsing]);
        assert_eq!(r.hand_over, vec![theirs[0]]);
        let want: Vec<u32> = mine
            .iter()
            .copied()
            .filter(|s| *s != keep && *s != lapsing)
            .collect();
        assert_eq!(r.acquire, want);
    }

    #[test]
    fn a_member_that_is_not_live_holds_nothing() {
        let mut held = BTreeMap::new();
        held.insert(3, 10_000);
        let r = round("a", 16, &members(&["b"]), &held, 1_000, 300);
        assert_eq!(r.hand_over, vec![3]);
        assert!(r.acquire.is_empty() && r.renew.is_empty());
    }
}
