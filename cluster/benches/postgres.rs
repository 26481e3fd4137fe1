//! The PostgreSQL backend, measured through the storage port with the embedded
//! group-commit bench's write pattern.
//!
//! With 1 and 64 closed-loop writers (a pool of as many connections), each writer commits
//! one "twin step" at a time (a 600-byte snapshot put with compare-and-set, a high-water
//! advance, and in one of ten steps a log append) and waits for its acknowledgement: one
//! PostgreSQL transaction per step, flushed before it is acknowledged. Prints writes/s and
//! p50/p99 acknowledgement latency; each configuration runs three times, in a fresh
//! database, and the median run is reported.
//!
//! The server: `CARETWIN_TEST_PG_URL` if set, else a throwaway one started through
//! `scripts/postgres.sh` (left running for the tests; `scripts/postgres.sh remove DIR`
//! stops it). On one machine the server and the bench share its cores.
//!
//! Run: `cargo bench -p caretwin-cluster --bench postgres` (add `-- --quick` for a short
//! run).

mod common;

use caretwin_cluster::store::{PostgresConfig, PostgresStore};
use caretwin_tests::postgres as pg;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

struct Run {
    writes_per_s: f64,
    p50_us: u64,
    p99_us: u64,
}

async fn run_once(server: &str, writers: u64, duration: Duration) -> Run {
    let (_, url) = pg::fresh_database(server).await.expect("bench database");
    let mut config = PostgresConfig::at(url);
    config.pool_size = writers as usize;
    let store = Arc::new(PostgresStore::open(&config).await.expect("open store"));
    let (hist, elapsed) = common::twin_steps(store, writers, duration).await;
    Run {
        writes_per_s: hist.len() as f64 / elapsed.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
    }
}

async fn server_version(server: &str) -> String {
    let (client, conn) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut out = Vec::new();
    for setting in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "shared_buffers",
    ] {
        let v: String = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("show")
            .get(0);
        out.push(format!("{setting} = {v}"));
    }
    out.join(", ")
}

fn main() {
    let duration = common::run_length();
    let runtime = common::runtime();
    let server = pg::server_url(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("postgres"));
    println!("# PostgreSQL backend through the Store port (one transaction per write)");
    println!("machine: {}", caretwin_tests::machine());
    println!("server: {}", runtime.block_on(server_version(&server)));
    println!("each configuration: 3 runs of {duration:?}, median run by writes/s\n");
    println!("| writers (= connections) | writes/s | p50 ack | p99 ack |");
    println!("|---|---|---|---|");
    for writers in [1u64, 64] {
        let mut runs: Vec<Run> = (0..3)
            .map(|_| runtime.block_on(run_once(&server, writers, duration)))
            .collect();
        runs.sort_by(|a, b| a.writes_per_s.total_cmp(&b.writes_per_s));
        let r = &runs[1];
        println!(
            "| {writers} | {:.0} | {:.2} ms | {:.2} ms |",
            r.writes_per_s,
            r.p50_us as f64 / 1e3,
            r.p99_us as f64 / 1e3
        );
    }
}
