//! A cluster of `caretwin-cluster` processes sharing a PostgreSQL database, with sites of
//! simulated devices syncing over QUIC: what the cluster process tests share.
//!
//! - [`Fixture`] — a directory with the dev PKI, the devices provisioned and each site's
//!   simulation; starts nodes and edges on it, and checks at the end that every reading
//!   an edge accepted was applied once ([`Fixture::assert_every_reading_applied_once`]).
//! - [`Record`] — a node's `shard hosted` / `shard stopped` log line (shard, fencing
//!   token, the node's wall-clock time); [`hosting`], [`wait_for_records`] and
//!   [`assert_single_activation`] read them. The nodes run on one machine, so their
//!   `at_ms` compare on one clock.

use crate::{DEADLINE, Process, Stream, bin, log_field};
use caretwin_actors::placement;
use caretwin_actors::store::{Key, Store};
use caretwin_cluster::store::{PostgresConfig, PostgresStore};
use caretwin_edge::outbox::{Outbox, OutboxConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a node's shard leases last (`lease_ttl`): short, so failover is quick.
pub const LEASE_TTL: Duration = Duration::from_secs(1);
/// How often a node renews its leases and runs a membership round (`renew_every`).
pub const RENEW_EVERY: Duration = Duration::from_millis(100);

/// Wall-clock Unix milliseconds, as the nodes log them (`at_ms`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

/// A directory with certificates, provisioning and simulations for `sites`, each with
/// `devices_per_site` coffee machines reading every `reading_interval`.
pub struct Fixture {
    dir: tempfile::TempDir,
    sites: Vec<String>,
    devices_per_site: usize,
    shards: u32,
}

impl Fixture {
    /// Issues the dev PKI (cluster, node and site certificates) and writes the devices'
    /// provisioning and one simulation per site.
    pub fn new(
        sites: &[&str],
        devices_per_site: usize,
        reading_interval: Duration,
        shards: u32,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("certs");
        let mut args = vec!["dev", "--out", out.to_str().expect("a UTF-8 path")];
        for s in sites {
            args.extend(["--site", s]);
        }
        let mut dev = Process::start(&bin("caretwin-cluster"), &args, &[])?;
        anyhow::ensure!(dev.wait()?.success(), "{}", dev.transcript());

        let mut provision = String::new();
        for (s, site) in sites.iter().enumerate() {
            let mut sim = String::from("seed = 11\n");
            for i in 0..devices_per_site {
                provision.push_str(&format!(
                    "[[devices]]\nid = \"{}\"\nsite = \"{site}\"\ncustomer = \"t1:cust-{s}\"\nmodel = \"coffee.barista-200\"\n",
                    Self::device(s, i)
                ));
                sim.push_str(&format!(
                    "[[devices]]\nid = \"{}\"\nmodel = \"coffee.barista-200\"\nreading_interval = \"{}ms\"\n",
                    Self::device(s, i),
                    reading_interval.as_millis()
                ));
            }
            std::fs::write(dir.path().join(format!("sim-{s}.toml")), sim)?;
        }
        std::fs::write(dir.path().join("devices.toml"), provision)?;
        Ok(Self {
            dir,
            sites: sites.iter().map(|s| (*s).to_owned()).collect(),
            devices_per_site,
            shards,
        })
    }

    /// Device `i` of site number `site`.
    pub fn device(site: usize, i: usize) -> String {
        format!("t1:s{site}-dev-{i}")
    }

    /// The fixture's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Starts node `id` on database `db_url` (peer channel on 127.0.0.1) and waits until
    /// it joined; returns it with its sync (QUIC) address.
    pub fn start_node(&self, id: &str, db_url: &str) -> anyhow::Result<(Process, String)> {
        self.start_node_with(id, db_url, IpAddr::V4(Ipv4Addr::LOCALHOST), |exe| {
            Command::new(exe)
        })
    }

    /// Like [`Fixture::start_node`], with the peer channel on `peer_ip` (bound there, any
    /// port, and advertised as bound) and the binary started by `command` (given its path:
    /// e.g. in another network namespace).
    pub fn start_node_with(
        &self,
        id: &str,
        db_url: &str,
        peer_ip: IpAddr,
        command: impl FnOnce(&Path) -> Command,
    ) -> anyhow::Result<(Process, String)> {
        let config = self.dir.path().join(format!("{id}.toml"));
        let certs = self.certs();
        std::fs::write(
            &config,
            format!(
                r#"
node_id = "{id}"
lease_ttl = "{ttl}ms"
renew_every = "{renew}ms"
tick = "50ms"
provision = "{provision}"
[host]
shards = {shards}
[store]
backend = "postgres"
[store.postgres]
url = "{db_url}"
[sync]
heartbeat = "1s"
listen = "127.0.0.1:0"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[grpc]
listen = "127.0.0.1:0"
tokens = "{tokens}"
[cluster]
enabled = true
listen = "{peer}"
"#,
                ttl = LEASE_TTL.as_millis(),
                renew = RENEW_EVERY.as_millis(),
                shards = self.shards,
                tokens = self.dir.path().join("no-tokens.toml").display(),
                provision = self.dir.path().join("devices.toml").display(),
                ca = certs.join("ca.pem").display(),
                cert = certs.join("cluster.pem").display(),
                key = certs.join("cluster.key").display(),
                peer = std::net::SocketAddr::new(peer_ip, 0),
            ),
        )?;
        let mut cmd = command(&bin("caretwin-cluster"));
        cmd.args(["--config", config.to_str().expect("a UTF-8 path"), "run"]);
        let mut p = Process::spawn(&format!("caretwin-cluster {id}"), cmd)?;
        let line = p.wait_for("sync listening")?;
        let addr = log_field(&line, "addr").expect("the bound address is logged");
        p.wait_for("joined the cluster")?;
        Ok((p, addr))
    }

    /// Starts the edge of site number `site`, syncing with the node at `cluster`; its
    /// devices read for `simulate_for`, then it says "outbox drained" once all is
    /// acknowledged.
    pub fn start_edge(
        &self,
        site: usize,
        cluster: &str,
        simulate_for: Duration,
    ) -> anyhow::Result<Process> {
        let name = &self.sites[site];
        let stem = format!("site-{}", name.replace(':', "+"));
        let config = self.dir.path().join(format!("edge-{site}.toml"));
        let certs = self.certs();
        std::fs::write(
            &config,
            format!(
                r#"
site_id = "{name}"
cluster_addr = "{cluster}"
server_name = "localhost"
data_dir = "{data}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
simulator = "{sim}"
simulate_for = "{simulate}ms"
"#,
                data = self.edge_data(site).display(),
                ca = certs.join("ca.pem").display(),
                cert = certs.join(format!("{stem}.pem")).display(),
                key = certs.join(format!("{stem}.key")).display(),
                sim = self.dir.path().join(format!("sim-{site}.toml")).display(),
                simulate = simulate_for.as_millis(),
            ),
        )?;
        Process::start(
            &bin("caretwin-edge"),
            &["--config", config.to_str().expect("a UTF-8 path"), "run"],
            &[],
        )
    }

    fn edge_data(&self, site: usize) -> PathBuf {
        self.dir.path().join(format!("edge-data-{site}"))
    }

    /// With the edges stopped: every device's twin high-water mark in the database equals
    /// the last sequence number its edge assigned (no acknowledged reading lost, none
    /// applied twice) and every outbox is empty. Returns the readings in all.
    pub async fn assert_every_reading_applied_once(&self, db_url: &str) -> u64 {
        let store = PostgresStore::open(&PostgresConfig::at(db_url.to_owned()))
            .await
            .expect("the database opens");
        let mut total = 0;
        for s in 0..self.sites.len() {
            let outbox = Outbox::open(&OutboxConfig::at(self.edge_data(s).join("outbox")))
                .expect("the edge's outbox opens");
            for i in 0..self.devices_per_site {
                let device = Self::device(s, i);
                let last = outbox.last_seq(&device).await;
                let applied = store.high_water(&Key::new(device.clone())).await.unwrap();
                assert!(last > 0, "device {device} produced nothing");
                assert_eq!(
                    applied, last,
                    "{device}: the edge accepted {last}, the twin applied {applied}"
                );
                total += last;
            }
            assert_eq!(outbox.stats().backlog_items, 0, "site {s} has a backlog");
        }
        total
    }
}

/// Waits until every edge has had all its readings acknowledged ("outbox drained"), then
/// stops them; each must exit cleanly.
pub fn stop_edges(edges: Vec<Process>) {
    for mut e in edges {
        e.wait_for("outbox drained").unwrap();
        e.terminate().unwrap();
        assert!(e.wait().unwrap().success(), "{}", e.transcript());
    }
}

/// Stops every node in `nodes` (SIGTERM: it hands its shards over); each must exit
/// cleanly. Returns when each ended (Unix ms), where its open hosting intervals end.
pub fn stop_nodes(nodes: &mut BTreeMap<String, Process>) -> BTreeMap<String, u64> {
    let mut ends = BTreeMap::new();
    for (id, p) in nodes.iter_mut() {
        p.terminate().unwrap();
        assert!(p.wait().unwrap().success(), "{id}: {}", p.transcript());
        ends.insert(id.clone(), now_ms());
    }
    ends
}

/// One `shard hosted` or `shard stopped` record of a node's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The node that logged it.
    pub node: String,
    /// Hosted (else stopped).
    pub hosted: bool,
    /// The shard.
    pub shard: u32,
    /// The shard lease's fencing token.
    pub token: u64,
    /// When, by the node's wall clock (Unix ms).
    pub at_ms: u64,
    /// Why it stopped (`why=`), empty for a hosted record.
    pub why: String,
}

/// The shard records of node `node` in what process `p` printed so far.
pub fn records(node: &str, p: &Process) -> Vec<Record> {
    p.output(Stream::Stdout)
        .into_iter()
        .chain(p.output(Stream::Stderr))
        .filter_map(|l| {
            let hosted = if l.contains("shard hosted") {
                true
            } else if l.contains("shard stopped") {
                false
            } else {
                return None;
            };
            Some(Record {
                node: node.to_owned(),
                hosted,
                shard: log_field(l, "shard")?.parse().ok()?,
                token: log_field(l, "token")?.parse().ok()?,
                at_ms: log_field(l, "at_ms")?.parse().ok()?,
                why: if hosted { String::new() } else { why(l) },
            })
        })
        .collect()
}

/// The `why` of a `shard stopped` line: a quoted phrase (`why="lease lost"`) or a word.
fn why(line: &str) -> String {
    let line = crate::strip_ansi(line);
    let Some((_, rest)) = line.split_once("why=") else {
        return String::new();
    };
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or_default().to_owned(),
        None => rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The records of every node in `nodes` (by id), in time order.
pub fn all_records<'a>(nodes: impl IntoIterator<Item = (&'a String, &'a Process)>) -> Vec<Record> {
    let mut all: Vec<Record> = nodes
        .into_iter()
        .flat_map(|(id, p)| records(id, p))
        .collect();
    all.sort_by_key(|r| r.at_ms);
    all
}

/// The shards each node hosts after `records` (in time order): node → shard → token.
pub fn hosting(records: &[Record]) -> BTreeMap<String, BTreeMap<u32, u64>> {
    let mut out: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    for r in records {
        let held = out.entry(r.node.clone()).or_default();
        if r.hosted {
            held.insert(r.shard, r.token);
        } else {
            held.remove(&r.shard);
        }
    }
    out
}

/// Lines of each node's log a failed wait shows.
const TAIL: usize = 40;

/// Watches `nodes`' logs until `done` holds for their records (in time order) and
/// returns them; fails with `what` and the records after [`DEADLINE`].
pub fn wait_for_records(
    nodes: &mut BTreeMap<String, Process>,
    what: &str,
    done: impl Fn(&[Record]) -> bool,
) -> anyhow::Result<Vec<Record>> {
    let until = Instant::now() + DEADLINE;
    loop {
        for p in nodes.values_mut() {
            p.poll();
        }
        let all = all_records(nodes.iter());
        if done(&all) {
            return Ok(all);
        }
        if Instant::now() >= until {
            let tails: String = nodes
                .iter()
                .map(|(id, p)| {
                    let t = p.transcript();
                    let lines: Vec<&str> = t.lines().collect();
                    let tail = lines[lines.len().saturating_sub(TAIL)..].join("\n");
                    format!("\n--- {id}, last {TAIL} lines:\n{tail}")
                })
                .collect();
            anyhow::bail!(
                "not within {DEADLINE:?}: {what}; the nodes host {:?}{tails}",
                hosting(&all)
            );
        }
        // Log lines arrive on their own; this only paces the re-reading.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Who owns each of `shards` shards among `members` (rendezvous placement, as the nodes
/// compute it): shard → node.
pub fn owners(members: &[&str], shards: u32) -> BTreeMap<u32, String> {
    (0..shards)
        .map(|s| {
            let owner = placement::owner(s, members.iter().copied()).expect("a member");
            (s, owner.to_owned())
        })
        .collect()
}

/// Whether every node hosts exactly the shards `owners` (shard → node) gives it, and
/// nothing else is hosted anywhere.
pub fn placed(records: &[Record], owners: &BTreeMap<u32, String>) -> bool {
    let now = hosting(records);
    let mut want: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for (s, n) in owners {
        want.entry(n.as_str()).or_default().insert(*s);
    }
    now.iter().all(|(n, held)| {
        held.keys()
            .copied()
            .eq(want.get(n.as_str()).into_iter().flatten().copied())
    }) && want.iter().all(|(n, shards)| {
        now.get(*n)
            .is_some_and(|h| h.keys().copied().eq(shards.iter().copied()))
    })
}

/// Single activation over a whole run: for every shard, the hosting intervals of all
/// nodes (one still open ends at `ends[node]`: its kill, or the end of the test) never
/// overlap, and each new host holds a higher fencing token than the one before (a node
/// that stopped a shard and hosts it again under the same lease, still its own, keeps
/// the token).
pub fn assert_single_activation(all: &[Record], ends: &BTreeMap<String, u64>) {
    let mut open: BTreeMap<(String, u32), (u64, u64)> = BTreeMap::new();
    let mut by_shard: BTreeMap<u32, Vec<(String, u64, u64, u64)>> = BTreeMap::new();
    for r in all {
        let key = (r.node.clone(), r.shard);
        if r.hosted {
            assert!(
                open.insert(key, (r.token, r.at_ms)).is_none(),
                "{r:?} hosted twice"
            );
        } else if let Some((token, from)) = open.remove(&key) {
            by_shard
                .entry(r.shard)
                .or_default()
                .push((r.node.clone(), token, from, r.at_ms));
        }
    }
    for ((node, shard), (token, from)) in open {
        let to = ends[&node];
        by_shard
            .entry(shard)
            .or_default()
            .push((node, token, from, to));
    }
    for (shard, mut iv) in by_shard {
        iv.sort_by_key(|i| i.2);
        for w in iv.windows(2) {
            let ((a, ta, _, a_to), (b, tb, b_from, _)) = (&w[0], &w[1]);
            assert!(
                b_from >= a_to,
                "shard {shard} hosted on {b} from {b_from} while on {a} until {a_to}"
            );
            assert!(
                tb > ta || (a == b && tb == ta),
                "shard {shard}: {b}'s token {tb} is not above {a}'s {ta}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(node: &str, hosted: bool, shard: u32, token: u64, at_ms: u64) -> Record {
        Record {
            node: node.into(),
            hosted,
            shard,
            token,
            at_ms,
            why: String::new(),
        }
    }

    #[test]
    fn the_stop_reason_is_read_quoted_or_bare() {
        assert_eq!(
            why("INFO shard stopped shard=3 token=2 at_ms=5 why=\"lease lost\""),
            "lease lost"
        );
        assert_eq!(why("INFO shard stopped why=killed shard=3"), "killed");
        assert_eq!(why("INFO shard hosted shard=3"), "");
    }

    #[test]
    fn hosting_follows_the_records() {
        let all = [
            r("n1", true, 1, 1, 10),
            r("n1", true, 2, 1, 11),
            r("n1", false, 1, 1, 20),
            r("n2", true, 1, 2, 21),
        ];
        let h = hosting(&all);
        assert_eq!(h["n1"].keys().copied().collect::<Vec<_>>(), [2]);
        assert_eq!(h["n2"][&1], 2);
        let owners = BTreeMap::from([(1, "n2".to_owned()), (2, "n1".to_owned())]);
        assert!(placed(&all, &owners));
        let owners = BTreeMap::from([(1, "n1".to_owned()), (2, "n1".to_owned())]);
        assert!(!placed(&all, &owners));
    }

    #[test]
    fn single_activation_holds_for_a_clean_handover() {
        let all = [
            r("n1", true, 1, 1, 10),
            r("n1", false, 1, 1, 20),
            r("n2", true, 1, 2, 20),
        ];
        let ends = BTreeMap::from([("n1".to_owned(), 30), ("n2".to_owned(), 30)]);
        assert_single_activation(&all, &ends);
    }

    #[test]
    #[should_panic(expected = "hosted on n2 from 15 while on n1 until 20")]
    fn an_overlap_is_caught() {
        let all = [
            r("n1", true, 1, 1, 10),
            r("n2", true, 1, 2, 15),
            r("n1", false, 1, 1, 20),
        ];
        let ends = BTreeMap::from([("n1".to_owned(), 30), ("n2".to_owned(), 30)]);
        assert_single_activation(&all, &ends);
    }

    #[test]
    fn a_node_may_host_again_under_its_own_lease() {
        let all = [
            r("n1", true, 1, 2, 10),
            r("n1", false, 1, 2, 20),
            r("n1", true, 1, 2, 25),
        ];
        let ends = BTreeMap::from([("n1".to_owned(), 30)]);
        assert_single_activation(&all, &ends);
    }

    #[test]
    #[should_panic(expected = "is not above")]
    fn a_token_that_does_not_rise_is_caught() {
        let all = [
            r("n1", true, 1, 2, 10),
            r("n1", false, 1, 2, 20),
            r("n2", true, 1, 2, 21),
        ];
        let ends = BTreeMap::from([("n1".to_owned(), 30), ("n2".to_owned(), 30)]);
        assert_single_activation(&all, &ends);
    }
}
