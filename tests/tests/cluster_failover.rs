//! The cluster across real processes on PostgreSQL: three nodes, two sites with simulated
//! devices syncing over QUIC; a node is killed with SIGKILL, a fourth joins.
//!
//! - Its twins are active elsewhere within 2 s: every shard the killed node hosted is
//!   hosted by a survivor within 2 s of the kill (from the nodes' own `shard hosted` and
//!   `shard stopped` records, which carry the wall-clock time of one machine).
//! - No acknowledged reading is lost, none applied twice: at the end every device's twin
//!   high-water mark in the database equals the last sequence number its edge assigned.
//! - No twin is ever active in two places: for every shard, the hosting intervals of all
//!   nodes (the killed node's ending at the kill) never overlap, and each new host holds a
//!   higher fencing token.

use caretwin_actors::store::{Key, Store};
use caretwin_cluster::store::{PostgresConfig, PostgresStore};
use caretwin_edge::outbox::{Outbox, OutboxConfig};
use caretwin_tests::postgres as pg;
use caretwin_tests::{Process, bin, log_field};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SITES: [&str; 2] = ["t1:home-1", "t1:home-2"];
const DEVICES_PER_SITE: usize = 100;
const SHARDS: u32 = 32;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn device(site: usize, i: usize) -> String {
    format!("t1:s{site}-dev-{i}")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn start_node(dir: &Path, id: &str, db_url: &str) -> (Process, String) {
    let config = dir.join(format!("{id}.toml"));
    let certs = dir.join("certs");
    write(
        &config,
        &format!(
            r#"
node_id = "{id}"
lease_ttl = "1s"
renew_every = "100ms"
tick = "50ms"
provision = "{provision}"
[host]
shards = {SHARDS}
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
"#,
            tokens = dir.join("no-tokens.toml").display(),
            provision = dir.join("devices.toml").display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join("cluster.pem").display(),
            key = certs.join("cluster.key").display(),
        ),
    );
    let mut p = Process::start(
        &bin("caretwin-cluster"),
        &["--config", config.to_str().unwrap(), "run"],
        &[],
    )
    .unwrap();
    let line = p.wait_for("sync listening").unwrap();
    let addr = log_field(&line, "addr").expect("the bound address is logged");
    p.wait_for("joined the cluster").unwrap();
    (p, addr)
}

fn start_edge(dir: &Path, site: usize, cluster: &str) -> Process {
    let name = SITES[site];
    let stem = format!("site-{}", name.replace(':', "+"));
    let config = dir.join(format!("edge-{site}.toml"));
    let certs = dir.join("certs");
    write(
        &config,
        &format!(
            r#"
site_id = "{name}"
cluster_addr = "{cluster}"
server_name = "localhost"
data_dir = "{data}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
simulator = "{sim}"
simulate_for = "8s"
"#,
            data = dir.join(format!("edge-data-{site}")).display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join(format!("{stem}.pem")).display(),
            key = certs.join(format!("{stem}.key")).display(),
            sim = dir.join(format!("sim-{site}.toml")).display(),
        ),
    );
    Process::start(
        &bin("caretwin-edge"),
        &["--config", config.to_str().unwrap(), "run"],
        &[],
    )
    .unwrap()
}

/// One `shard hosted` or `shard stopped` record of a node's log.
#[derive(Debug, Clone)]
struct Record {
    node: String,
    hosted: bool,
    shard: u32,
    token: u64,
    at_ms: u64,
}

fn records(node: &str, p: &Process) -> Vec<Record> {
    p.output(caretwin_tests::Stream::Stdout)
        .into_iter()
        .chain(p.output(caretwin_tests::Stream::Stderr))
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
            })
        })
        .collect()
}

/// Hosting intervals per shard: (node, token, from, to); an interval still open ends at
/// `ends[node]` (the kill, or the end of the test).
fn intervals(
    all: &[Record],
    ends: &BTreeMap<String, u64>,
) -> BTreeMap<u32, Vec<(String, u64, u64, u64)>> {
    let mut open: BTreeMap<(String, u32), (u64, u64)> = BTreeMap::new();
    let mut out: BTreeMap<u32, Vec<(String, u64, u64, u64)>> = BTreeMap::new();
    for r in all {
        let key = (r.node.clone(), r.shard);
        if r.hosted {
            assert!(
                open.insert(key, (r.token, r.at_ms)).is_none(),
                "{r:?} hosted twice"
            );
        } else if let Some((token, from)) = open.remove(&key) {
            out.entry(r.shard)
                .or_default()
                .push((r.node.clone(), token, from, r.at_ms));
        }
    }
    for ((node, shard), (token, from)) in open {
        let to = ends[&node];
        out.entry(shard).or_default().push((node, token, from, to));
    }
    for v in out.values_mut() {
        v.sort_by_key(|i| i.2);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_twins_move_within_2s_and_no_reading_is_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("certs");
    let mut args = vec!["dev", "--out", out.to_str().unwrap()];
    for s in SITES {
        args.extend(["--site", s]);
    }
    let mut dev = Process::start(&bin("caretwin-cluster"), &args, &[]).unwrap();
    assert!(dev.wait().unwrap().success(), "{}", dev.transcript());

    let mut provision = String::new();
    for (s, site) in SITES.iter().enumerate() {
        let mut sim = String::from("seed = 11\n");
        for i in 0..DEVICES_PER_SITE {
            provision.push_str(&format!(
                "[[devices]]\nid = \"{}\"\nsite = \"{site}\"\ncustomer = \"t1:cust-{s}\"\nmodel = \"coffee.barista-200\"\n",
                device(s, i)
            ));
            sim.push_str(&format!(
                "[[devices]]\nid = \"{}\"\nmodel = \"coffee.barista-200\"\nreading_interval = \"500ms\"\n",
                device(s, i)
            ));
        }
        write(&d.join(format!("sim-{s}.toml")), &sim);
    }
    write(&d.join("devices.toml"), &provision);

    let server = pg::server_url(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("postgres"));
    let (_, db_url) = pg::fresh_database(&server).await.unwrap();

    let mut nodes: BTreeMap<String, Process> = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for id in ["n1", "n2", "n3"] {
        let (p, addr) = start_node(d, id, &db_url);
        nodes.insert(id.into(), p);
        addrs.insert(id.to_owned(), addr);
    }
    // The sites sync with n1 and n3; n2 hosts twins of both, reached by forwarding.
    let mut edges = vec![
        start_edge(d, 0, &addrs["n1"]),
        start_edge(d, 1, &addrs["n3"]),
    ];
    for e in &mut edges {
        if let Err(err) = e.wait_for("sync session open") {
            for (id, n) in &nodes {
                eprintln!("--- {id}\n{}", n.transcript());
            }
            panic!("{err:#}");
        }
    }
    // Readings flow for a while, then n2 dies without a word.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut victim = nodes.remove("n2").unwrap();
    victim.kill().unwrap();
    let killed_at = now_ms();
    victim.wait().unwrap();
    let before_kill = records("n2", &victim);
    let victim_shards: Vec<u32> = {
        let mut open = BTreeMap::new();
        for r in &before_kill {
            if r.hosted {
                open.insert(r.shard, r.token);
            } else {
                open.remove(&r.shard);
            }
        }
        open.into_keys().collect()
    };
    assert!(!victim_shards.is_empty(), "n2 hosted nothing");

    // A fourth node joins while the sites keep sending.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n4, _) = start_node(d, "n4", &db_url);
    nodes.insert("n4".into(), n4);

    for e in &mut edges {
        e.wait_for("outbox drained").unwrap();
    }
    for mut e in edges {
        e.terminate().unwrap();
        assert!(e.wait().unwrap().success(), "{}", e.transcript());
    }
    let mut all = before_kill;
    let mut ends = BTreeMap::new();
    ends.insert("n2".to_owned(), killed_at);
    for (id, mut p) in nodes {
        p.terminate().unwrap();
        assert!(p.wait().unwrap().success(), "{id}: {}", p.transcript());
        ends.insert(id.clone(), now_ms());
        all.extend(records(&id, &p));
    }
    all.sort_by_key(|r| r.at_ms);

    // Failover: each of n2's shards hosted by a survivor within 2 s of the kill.
    let mut failover = 0;
    for s in &victim_shards {
        let taken = all
            .iter()
            .find(|r| r.hosted && r.shard == *s && r.node != "n2" && r.at_ms >= killed_at)
            .unwrap_or_else(|| panic!("shard {s} was never hosted again"));
        failover = failover.max(taken.at_ms - killed_at);
    }
    eprintln!(
        "failover: {} shards of the killed node hosted again within {failover} ms",
        victim_shards.len()
    );
    assert!(failover <= 2_000, "failover took {failover} ms");

    // Single activation: no overlap, tokens rise.
    for (shard, iv) in intervals(&all, &ends) {
        for w in iv.windows(2) {
            let ((a, ta, _, a_to), (b, tb, b_from, _)) = (&w[0], &w[1]);
            assert!(
                b_from >= a_to,
                "shard {shard} hosted on {b} from {b_from} while on {a} until {a_to}"
            );
            assert!(
                tb > ta,
                "shard {shard}: {b}'s token {tb} is not above {a}'s {ta}"
            );
        }
    }
    let n4_hosted = all.iter().any(|r| r.node == "n4" && r.hosted);
    assert!(n4_hosted, "the fourth node took no shard");

    // Nothing acknowledged lost, nothing applied twice.
    let store = PostgresStore::open(&PostgresConfig::at(db_url.clone()))
        .await
        .unwrap();
    let mut total = 0;
    for s in 0..SITES.len() {
        let outbox = Outbox::open(&OutboxConfig::at(
            d.join(format!("edge-data-{s}")).join("outbox"),
        ))
        .unwrap();
        for i in 0..DEVICES_PER_SITE {
            let last = outbox.last_seq(&device(s, i)).await;
            let applied = store.high_water(&Key::new(device(s, i))).await.unwrap();
            assert!(last > 0, "device {} produced nothing", device(s, i));
            assert_eq!(
                applied,
                last,
                "{}: the edge accepted {last}, the twin applied {applied}",
                device(s, i)
            );
            total += last;
        }
        assert_eq!(outbox.stats().backlog_items, 0);
    }
    assert!(total > 1_000, "only {total} readings went through");
}
