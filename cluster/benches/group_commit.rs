//! Group commit of the embedded store, measured through the storage port.
//!
//! For G = 1, 64 and 1024 writes per fsync, G closed-loop writers each commit one
//! "twin step" at a time (a snapshot put with compare-and-set, a high-water advance, and
//! in one of ten steps a log append) and wait for its acknowledgement, with the store's
//! group size capped at G. Prints writes/s, p50/p99 acknowledgement latency and the
//! observed writes per fsync; each configuration runs three times and the median run is
//! reported.
//!
//! Run: `cargo bench -p caretwin-cluster --bench group_commit` (add `-- --quick` for a
//! short run).

mod common;

use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

struct Run {
    writes_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    per_fsync: f64,
}

async fn run_once(group: usize, duration: Duration) -> Run {
    let dir = tempfile::Builder::new()
        .prefix("group-commit-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("bench directory");
    let mut config = EmbeddedConfig::at(dir.path());
    config.max_group = group;
    let store = Arc::new(EmbeddedStore::open(&config).expect("open store"));
    let (hist, elapsed) = common::twin_steps(store.clone(), group as u64, duration).await;
    let groups = store.stats().groups.load(Ordering::Relaxed).max(1);
    Run {
        writes_per_s: hist.len() as f64 / elapsed.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        per_fsync: hist.len() as f64 / groups as f64,
    }
}

fn main() {
    let duration = common::run_length();
    let runtime = common::runtime();
    println!("# group commit, embedded store (fjall) through the Store port");
    println!("machine: {}", caretwin_tests::machine());
    println!("each configuration: 3 runs of {duration:?}, median run by writes/s\n");
    println!(
        "| writes per fsync (cap) | writers | writes/s | p50 ack | p99 ack | observed writes per fsync |"
    );
    println!("|---|---|---|---|---|---|");
    for group in [1usize, 64, 1024] {
        let mut runs: Vec<Run> = (0..3)
            .map(|_| runtime.block_on(run_once(group, duration)))
            .collect();
        runs.sort_by(|a, b| a.writes_per_s.total_cmp(&b.writes_per_s));
        let r = &runs[1];
        println!(
            "| {group} | {group} | {:.0} | {:.2} ms | {:.2} ms | {:.1} |",
            r.writes_per_s,
            r.p50_us as f64 / 1e3,
            r.p99_us as f64 / 1e3,
            r.per_fsync
        );
    }
}
