//! The cluster on this machine: readings/s with 1 and 3 nodes, the cost of forwarding a
//! call to the node hosting its twin, and failover time after a node is killed.
//!
//! `cargo bench -p caretwin-chaos --bench cluster` (`-- --quick` for a short run). The
//! nodes run in one process (`caretwin_chaos::cluster`), over real QUIC between them, on
//! one embedded store, or with `-- --postgres` on one PostgreSQL database, each node with
//! its own connection pool (the server: `CARETWIN_TEST_PG_URL` if set, else a throwaway
//! one started through `scripts/postgres.sh`, on the same cores). What 2 cores allow is
//! printed with the figures.

use caretwin_actors::store::Store;
use caretwin_actors::twins::device::{DeviceItem, DeviceMsg, DeviceReply, ItemKind};
use caretwin_chaos::cluster::Cluster;
use caretwin_cluster::store::{PostgresConfig, PostgresStore};
use caretwin_tests::postgres as pg;
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SHARDS: u32 = 64;
const DEVICES: usize = 512;
const CALLERS: usize = 32;

fn device(i: usize) -> String {
    format!("t1:bench-{i}")
}

fn reading(seq: u64) -> DeviceMsg {
    DeviceMsg::FromSite {
        site: "t1:home".into(),
        items: vec![DeviceItem {
            seq,
            ts_ms: 1_700_000_000_000 + seq * 1_000,
            kind: ItemKind::Reading {
                signal: "brew_pressure".into(),
                value: 9.0,
            },
        }],
    }
}

/// Where the nodes keep their state.
#[derive(Clone)]
enum Backend {
    /// One embedded store in the process, shared by the nodes.
    Embedded,
    /// A PostgreSQL server: each cluster gets a fresh database, each node its own pool.
    Postgres(String),
}

async fn cluster(nodes: usize, backend: &Backend) -> Cluster {
    let mut c = Cluster::new(SHARDS).await;
    let database = match backend {
        Backend::Embedded => None,
        Backend::Postgres(server) => Some(pg::fresh_database(server).await.expect("database").1),
    };
    for n in 1..=nodes {
        let id = format!("n{n}");
        match &database {
            None => c.start(&id).await,
            Some(url) => {
                let store: Arc<dyn Store> = Arc::new(
                    PostgresStore::open(&PostgresConfig::at(url.clone()))
                        .await
                        .expect("open PostgreSQL"),
                );
                c.start_on(&id, store).await;
            }
        }
    }
    c.wait_balanced(Duration::from_secs(20)).await;
    let n1 = c.node("n1").system().clone();
    let provisions = (0..DEVICES).map(|i| {
        let n1 = n1.clone();
        async move {
            n1.devices()
                .call(
                    &device(i),
                    DeviceMsg::Provision {
                        customer: "t1:alice".into(),
                        site: "t1:home".into(),
                        model: "coffee.barista-200".into(),
                    },
                )
                .await
                .expect("provisioned")
        }
    });
    futures::future::join_all(provisions).await;
    c
}

struct Run {
    per_sec: f64,
    local: Histogram<u64>,
    forwarded: Histogram<u64>,
}

/// `CALLERS` callers, each sending one reading at a time to its own devices, through
/// the nodes in turn, for `secs`.
async fn load(c: &Cluster, secs: f64, seqs: &Arc<Vec<AtomicU64>>) -> Run {
    let systems: Vec<_> = c.nodes.values().map(|n| n.system().clone()).collect();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let systems = systems.clone();
        let done = done.clone();
        let seqs = seqs.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new(3).unwrap();
            let mut forwarded = Histogram::<u64>::new(3).unwrap();
            let mine: Vec<usize> = (caller..DEVICES).step_by(CALLERS).collect();
            // Each run goes on from where the last left off (a device's sequence numbers
            // are contiguous; a repeated one would be a duplicate, skipped unwritten).
            let seqs = seqs.clone();
            let mut k = 0usize;
            while Instant::now() < deadline {
                let j = k % mine.len();
                let system = &systems[k % systems.len()];
                let id = device(mine[j]);
                let seq = seqs[mine[j]].fetch_add(1, Ordering::Relaxed) + 1;
                let here = system
                    .hosted_shards()
                    .contains(&caretwin_actors::host::shard_of(&id, SHARDS));
                let t = Instant::now();
                let r = system.devices().call(&id, reading(seq)).await;
                let us = t.elapsed().as_micros() as u64;
                assert!(
                    matches!(r, Ok(DeviceReply::Applied(ref a)) if a.applied == 1),
                    "{r:?}"
                );
                if here {
                    local.record(us).unwrap();
                } else {
                    forwarded.record(us).unwrap();
                }
                done.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            (local, forwarded)
        }));
    }
    let start = Instant::now();
    let mut local = Histogram::<u64>::new(3).unwrap();
    let mut forwarded = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        let (l, f) = t.await.unwrap();
        local.add(l).unwrap();
        forwarded.add(f).unwrap();
    }
    Run {
        per_sec: done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        local,
        forwarded,
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "-".into()
    } else {
        format!("{:.2}", h.value_at_quantile(q) as f64 / 1000.0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn machine() {
    println!("- machine: {}", caretwin_tests::machine());
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (secs, runs) = if quick { (2.0, 1) } else { (5.0, 3) };
    let backend = if std::env::args().any(|a| a == "--postgres") {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("postgres");
        Backend::Postgres(pg::server_url(&dir))
    } else {
        Backend::Embedded
    };
    let store = match backend {
        Backend::Embedded => "one embedded store",
        Backend::Postgres(_) => {
            "one PostgreSQL database on the same machine, a pool of 16 per node"
        }
    };
    println!("# The cluster on this machine\n");
    machine();
    println!(
        "- {DEVICES} devices, {SHARDS} shards, {CALLERS} callers each sending one reading at a time \
         through the nodes in turn; nodes in one process on {store}, peers over QUIC \
         on loopback; {runs} run(s) of {secs} s per configuration, median shown\n"
    );
    println!("| nodes | readings/s | local p50 / p99 ms | forwarded p50 / p99 ms |");
    println!("|---|---|---|---|");
    for nodes in [1usize, 3] {
        let c = cluster(nodes, &backend).await;
        let mut rates = Vec::new();
        let mut last = None;
        let seqs: Arc<Vec<AtomicU64>> = Arc::new((0..DEVICES).map(|_| AtomicU64::new(0)).collect());
        for _ in 0..runs {
            let r = load(&c, secs, &seqs).await;
            rates.push(r.per_sec);
            last = Some(r);
        }
        let r = last.unwrap();
        println!(
            "| {nodes} | {:.0} | {} / {} | {} / {} |",
            median(rates),
            ms(&r.local, 0.5),
            ms(&r.local, 0.99),
            ms(&r.forwarded, 0.5),
            ms(&r.forwarded, 0.99),
        );
        for (_, n) in c.nodes {
            n.stop().await.expect("node stops");
        }
    }

    // Failover: a node of three is killed; how long until every shard is hosted again,
    // and until a call to one of its twins is answered.
    let trials = if quick { 1 } else { 5 };
    let (mut placed, mut answered) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let mut c = cluster(3, &backend).await;
        let victim_twin = (0..DEVICES)
            .map(device)
            .find(|id| {
                c.node("n2")
                    .system()
                    .hosted_shards()
                    .contains(&caretwin_actors::host::shard_of(id, SHARDS))
            })
            .expect("n2 hosts a twin");
        let killed = Instant::now();
        c.nodes.remove("n2").unwrap().kill().await;
        let r = c
            .node("n1")
            .system()
            .devices()
            .call(&victim_twin, reading(1))
            .await;
        answered.push(killed.elapsed().as_secs_f64() * 1000.0);
        assert!(matches!(r, Ok(DeviceReply::Applied(_))), "{r:?}");
        c.wait_balanced(Duration::from_secs(20)).await;
        placed.push(killed.elapsed().as_secs_f64() * 1000.0);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
        for (_, n) in c.nodes {
            n.stop().await.expect("node stops");
        }
    }
    println!(
        "\nFailover after a node of 3 is killed (leases 1 s, rounds every 100 ms), {trials} trial(s), median: \
         a call to one of its twins answered after {:.0} ms; every shard hosted again after {:.0} ms",
        median(answered),
        median(placed)
    );
}
