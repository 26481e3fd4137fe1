//! Which cluster node the edge dials next, and after how long: a pure state machine.
//!
//! Any node of a cluster serves any site's session (the twins' high-water marks are in
//! the shared store, and calls reach the twins' hosts over the peer channel), so an edge
//! that knows several nodes need never wait for one to come back. This module decides;
//! the sync client ([`super::client`]) resolves names, dials, and reports back. No
//! sockets, no clock, no randomness of its own: times come in as `now_ms`, jitter from a
//! seed the caller chooses, so the whole policy is unit-tested.
//!
//! The policy:
//! - **Order.** Each site ranks the addresses it knows by rendezvous hashing,
//!   `xxh3(site ‖ address)`, highest first. Sites spread evenly over the nodes (not
//!   everyone on the first of the list), a site's first choice is stable across restarts
//!   and list edits (adding a node moves only the sites that now rank it first), and
//!   when a node dies its sites move to their *own* next choices, spread over the
//!   survivors rather than all onto the node after it in a list.
//! - **Moving on.** A failed attempt (no answer, a failed handshake, a refusal, no
//!   `Welcome` in time) and a session that ended both move to the next address in the
//!   site's order. A session is never moved while it works: the edge stays where it is
//!   until that node fails it.
//! - **Waiting.** Before the next attempt the edge waits `base × 2^round`, capped at
//!   `max`, where `round` counts how many times every known address has failed in a row:
//!   trying the other nodes after one dies costs one short pause each, while a cluster
//!   that is down entirely is retried ever more slowly. Every wait is jittered (between
//!   half and all of it) so the sites of a dead node do not all arrive at once. A
//!   session that lasted `healthy_after` counts as success and starts the count again;
//!   a shorter one (a node that accepts and then drops every session) keeps counting.
//! - **Learning.** The cluster may list its live members' sync addresses in `Welcome`
//!   ([`Dialer::learn`]); they join the configured ones. The configured addresses are
//!   always kept; the learned ones are replaced by each new non-empty list.
//!
//! Backoff crates (`backon`, `backoff`) draw their jitter and time from inside, and
//! know nothing of rotating addresses; the arithmetic here is three lines.

use std::time::Duration;

/// The timing of reconnection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The pause before trying the next node while the round is not complete.
    pub base: Duration,
    /// The longest pause.
    pub max: Duration,
    /// A session that lasted this long counts as a success: the next failure starts
    /// with a short pause again.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            max: Duration::from_secs(5),
            healthy_after: Duration::from_secs(10),
        }
    }
}

/// The next attempt: wait `wait`, then dial `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    /// A node's sync address, `host:port`.
    pub addr: String,
    /// How long to wait first.
    pub wait: Duration,
}

/// The reconnection state of one edge.
#[derive(Debug, Clone)]
pub struct Dialer {
    site: String,
    configured: Vec<String>,
    learned: Vec<String>,
    /// `configured ∪ learned`, in the site's rendezvous order.
    order: Vec<String>,
    /// The address of the attempt or session under way.
    current: Option<String>,
    /// When the session on `current` opened, if it did.
    opened_at_ms: Option<u64>,
    /// Attempts that failed in a row since the last healthy session.
    failures: u32,
    backoff: Backoff,
    seed: u64,
    draws: u64,
}

/// The rendezvous score of `addr` for `site`: stable across processes and versions.
fn score(site: &str, addr: &str) -> u64 {
    let mut buf = Vec::with_capacity(site.len() + addr.len() + 1);
    buf.extend_from_slice(site.as_bytes());
    buf.push(0);
    buf.extend_from_slice(addr.as_bytes());
    xxhash_rust::xxh3::xxh3_64(&buf)
}

impl Dialer {
    /// A dialer for `site` over the `configured` addresses (at least one; checked by the
    /// configuration), jittered from `seed` (different per edge process).
    pub fn new(site: &str, configured: Vec<String>, backoff: Backoff, seed: u64) -> Self {
        debug_assert!(!configured.is_empty(), "an edge needs a node to dial");
        let mut d = Self {
            site: site.to_owned(),
            configured,
            learned: Vec::new(),
            order: Vec::new(),
            current: None,
            opened_at_ms: None,
            failures: 0,
            backoff,
            seed,
            draws: 0,
        };
        d.reorder();
        d
    }

    fn reorder(&mut self) {
        let mut all: Vec<String> = self.configured.clone();
        for a in &self.learned {
            if !all.contains(a) {
                all.push(a.clone());
            }
        }
        let site = &self.site;
        all.sort_by_cached_key(|a| (std::cmp::Reverse(score(site, a)), a.clone()));
        self.order = all;
    }

    /// Every address known, in this site's order (its first choice first).
    pub fn known(&self) -> &[String] {
        &self.order
    }

    /// The addresses learned from the cluster (kept on disk by the client).
    pub fn learned(&self) -> &[String] {
        &self.learned
    }

    /// Takes the cluster's list of its members' sync addresses. Invalid entries are
    /// skipped, at most [`crate::config::MAX_CLUSTER_ADDRS`] are kept, and an empty list
    /// (a cluster that does not announce them, or an older one) changes nothing. Returns
    /// whether the learned addresses changed.
    pub fn learn(&mut self, addrs: &[String]) -> bool {
        let mut learned: Vec<String> = Vec::new();
        for a in addrs {
            if crate::config::check_node_addr(a).is_ok()
                && !learned.contains(a)
                && learned.len() < crate::config::MAX_CLUSTER_ADDRS
            {
                learned.push(a.clone());
            }
        }
        if learned.is_empty() || learned == self.learned {
            return false;
        }
        self.learned = learned;
        self.reorder();
        true
    }

    /// The first attempt: this site's first choice, at once.
    pub fn first(&mut self) -> Dial {
        let addr = self.order[0].clone();
        self.current = Some(addr.clone());
        self.opened_at_ms = None;
        Dial {
            addr,
            wait: Duration::ZERO,
        }
    }

    /// The attempt on the current address opened a session (its `Welcome` arrived).
    pub fn opened(&mut self, now_ms: u64) {
        self.opened_at_ms = Some(now_ms);
    }

    /// The attempt failed or the session ended at `now_ms`: the next address, and how
    /// long to wait before dialling it.
    pub fn ended(&mut self, now_ms: u64) -> Dial {
        let healthy = self.opened_at_ms.is_some_and(|at| {
            now_ms.saturating_sub(at) >= self.backoff.healthy_after.as_millis() as u64
        });
        if healthy {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        let addr = self.after(self.current.as_deref());
        self.current = Some(addr.clone());
        self.opened_at_ms = None;
        // Every address failed `round` times in a row before this attempt.
        let round = self.failures / self.order.len() as u32;
        let full = self
            .backoff
            .base
            .saturating_mul(1u32.checked_shl(round.min(31)).unwrap_or(u32::MAX))
            .min(self.backoff.max);
        Dial {
            addr,
            wait: full / 2 + full.mul_f64(0.5 * self.noise()),
        }
    }

    /// The address after `addr` in the site's order (the first after the last), also
    /// when `addr` is no longer known: rendezvous scores place it all the same.
    fn after(&self, addr: Option<&str>) -> String {
        let Some(addr) = addr else {
            return self.order[0].clone();
        };
        let key = |a: &str| (std::cmp::Reverse(score(&self.site, a)), a.to_owned());
        let at = key(addr);
        self.order
            .iter()
            .find(|a| key(a) > at)
            .unwrap_or(&self.order[0])
            .clone()
    }

    /// A number in `[0, 1)`, a different one at every draw, fixed by the seed.
    fn noise(&mut self) -> f64 {
        self.draws += 1;
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(&self.draws.to_le_bytes(), self.seed);
        (h >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const B: Backoff = Backoff {
        base: Duration::from_millis(200),
        max: Duration::from_secs(5),
        healthy_after: Duration::from_secs(10),
    };

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7400")).collect()
    }

    #[test]
    fn sites_spread_over_the_nodes_whatever_the_order_of_the_list() {
        let mut firsts: BTreeMap<String, usize> = BTreeMap::new();
        for s in 0..3000 {
            let site = format!("t1:home-{s}");
            let a = Dialer::new(&site, addrs(3), B, 1).first().addr;
            let mut reversed = addrs(3);
            reversed.reverse();
            let b = Dialer::new(&site, reversed, B, 2).first().addr;
            assert_eq!(a, b, "{site}: the first choice depends on the list's order");
            *firsts.entry(a).or_default() += 1;
        }
        assert_eq!(firsts.len(), 3);
        for (addr, n) in firsts {
            assert!((850..=1150).contains(&n), "{addr} is first for {n} of 3000");
        }
    }

    #[test]
    fn a_failure_moves_to_the_next_node_and_every_node_is_tried_before_any_again() {
        let mut d = Dialer::new("t1:home-1", addrs(4), B, 7);
        let first = d.first();
        assert_eq!(first.wait, Duration::ZERO);
        let mut seen = vec![first.addr.clone()];
        for _ in 0..3 {
            let next = d.ended(0);
            assert!(!seen.contains(&next.addr), "{} again too soon", next.addr);
            seen.push(next.addr);
        }
        assert_eq!(seen, d.known());
        // The round is complete: the next is the first choice again.
        assert_eq!(d.ended(0).addr, first.addr);
    }

    #[test]
    fn the_sites_of_a_dead_node_spread_over_the_survivors() {
        let nodes = addrs(4);
        let mut moved: BTreeMap<String, usize> = BTreeMap::new();
        for s in 0..4000 {
            let mut d = Dialer::new(&format!("t1:home-{s}"), nodes.clone(), B, s);
            if d.first().addr == nodes[0] {
                *moved.entry(d.ended(0).addr).or_default() += 1;
            }
        }
        assert_eq!(moved.len(), 3, "{moved:?}");
        let total: usize = moved.values().sum();
        for (addr, n) in &moved {
            assert!(
                *n * 3 > total * 2 / 3 && *n * 3 < total * 4 / 3,
                "{addr} took {n} of {total}"
            );
        }
    }

    #[test]
    fn waits_are_short_while_other_nodes_remain_then_double_per_round_up_to_the_cap() {
        let mut d = Dialer::new("t1:home-1", addrs(3), B, 3);
        d.first();
        let mut waits = Vec::new();
        for _ in 0..30 {
            waits.push(d.ended(0).wait);
        }
        let within = |w: Duration, full: Duration| w >= full / 2 && w <= full;
        let ms = Duration::from_millis;
        // Round 0: the two other nodes, one short pause each.
        assert!(
            within(waits[0], ms(200)) && within(waits[1], ms(200)),
            "{waits:?}"
        );
        // Every node failed once: 400 ms; twice: 800 ms; …
        for w in &waits[2..5] {
            assert!(within(*w, ms(400)), "{waits:?}");
        }
        for w in &waits[5..8] {
            assert!(within(*w, ms(800)), "{waits:?}");
        }
        // … never above the cap, and at the cap in the end.
        assert!(waits.iter().all(|w| *w <= B.max), "{waits:?}");
        assert!(within(waits[29], B.max), "{waits:?}");
        // Jittered: not all the same.
        assert!(waits[20..].windows(2).any(|w| w[0] != w[1]), "{waits:?}");
    }

    #[test]
    fn one_node_alone_backs_off_from_the_first_failure() {
        let mut d = Dialer::new("t1:home-1", addrs(1), B, 3);
        let a = d.first().addr;
        let w: Vec<Dial> = (0..3).map(|_| d.ended(0)).collect();
        assert!(w.iter().all(|x| x.addr == a));
        assert!(w[0].wait >= Duration::from_millis(200), "{w:?}");
        assert!(w[1].wait >= Duration::from_millis(400), "{w:?}");
    }

    #[test]
    fn a_healthy_session_starts_the_count_again_a_short_one_does_not() {
        let mut d = Dialer::new("t1:home-1", addrs(2), B, 5);
        d.first();
        for _ in 0..19 {
            d.ended(0);
        }
        // Backed off by now.
        assert!(d.ended(0).wait > Duration::from_secs(2));
        // A session that opened and dropped after a second: still backing off.
        d.opened(100_000);
        assert!(d.ended(101_000).wait > Duration::from_secs(2));
        // One that lasted: the next node after a short pause.
        d.opened(200_000);
        let before = d.current.clone().unwrap();
        let next = d.ended(260_000);
        assert_ne!(next.addr, before);
        assert!(next.wait <= Duration::from_millis(200), "{next:?}");
    }

    #[test]
    fn the_same_seed_decides_the_same_waits_another_seed_others() {
        let run = |seed| {
            let mut d = Dialer::new("t1:home-1", addrs(2), B, seed);
            d.first();
            (0..10).map(|_| d.ended(0).wait).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn learned_addresses_join_the_configured_ones_and_bad_ones_are_skipped() {
        let seed = vec!["10.0.0.1:7400".to_owned()];
        let mut d = Dialer::new("t1:home-1", seed.clone(), B, 1);
        assert_eq!(d.first().addr, seed[0]);
        let list: Vec<String> = [
            "10.0.0.1:7400",
            "10.0.0.2:7400",
            "not an address",
            "10.0.0.3:0",
            "10.0.0.2:7400",
        ]
        .map(String::from)
        .to_vec();
        assert!(d.learn(&list));
        assert_eq!(d.learned(), ["10.0.0.1:7400", "10.0.0.2:7400"]);
        assert_eq!(d.known().len(), 2);
        // The seed failed: the learned node is next.
        assert_eq!(d.ended(0).addr, "10.0.0.2:7400");
        // The same list again, or an empty one, changes nothing.
        assert!(!d.learn(&list));
        assert!(!d.learn(&[]));
        assert_eq!(d.known().len(), 2);
        // A new list replaces the learned addresses; the configured seed stays.
        assert!(d.learn(&["10.0.0.3:7400".to_owned()]));
        let mut known = d.known().to_vec();
        known.sort();
        assert_eq!(known, ["10.0.0.1:7400", "10.0.0.3:7400"]);
        // The node dialled last is gone from the list: the next is still well defined.
        let next = d.ended(0).addr;
        assert!(known.contains(&next), "{next}");
    }

    #[test]
    fn at_most_the_limit_of_learned_addresses_is_kept() {
        let mut d = Dialer::new("t1:home-1", addrs(1), B, 1);
        let many: Vec<String> = (0..200).map(|i| format!("n{i}.example:7400")).collect();
        assert!(d.learn(&many));
        assert_eq!(d.learned().len(), crate::config::MAX_CLUSTER_ADDRS);
    }
}
