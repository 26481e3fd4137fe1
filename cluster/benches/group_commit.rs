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

use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const DEVICES_PER_WRITER: u64 = 100;
const SNAPSHOT_BYTES: usize = 600;

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
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..group as u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            // Each writer owns its devices, so compare-and-set never conflicts.
            let mut versions = vec![0u64; DEVICES_PER_WRITER as usize];
            let value = vec![0x5a; SNAPSHOT_BYTES];
            let mut step = 0u64;
            while started.elapsed() < duration {
                let d = (step % DEVICES_PER_WRITER) as usize;
                let key = Key::new(format!("t1/device/{w}-{d}"));
                let mut batch = WriteBatch::new()
                    .with(Op::PutSnapshot {
                        key: key.clone(),
                        expected_version: versions[d],
                        value: value.clone(),
                    })
                    .with(Op::AdvanceHighWater {
                        device: key,
                        from: versions[d] * 10,
                        to: versions[d] * 10 + 10,
                    });
                if step.is_multiple_of(10) {
                    batch.push(Op::Append {
                        log: Key::new(format!("t1/log/{w}")),
                        value: vec![1; 200],
                    });
                }
                let t = Instant::now();
                store.commit(batch).await.expect("commit");
                hist.record(t.elapsed().as_micros() as u64).expect("record");
                versions[d] += 1;
                step += 1;
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        hist.add(t.await.expect("writer")).expect("merge");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let groups = store.stats().groups.load(Ordering::Relaxed).max(1);
    Run {
        writes_per_s: hist.len() as f64 / elapsed,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        per_fsync: hist.len() as f64 / groups as f64,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let duration = Duration::from_millis(if quick { 500 } else { 3000 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
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
