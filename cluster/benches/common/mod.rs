//! What the storage benches share: closed-loop writers committing "twin steps" through
//! the storage port.

use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long each run lasts: 3 s, or 0.5 s with `--quick` on the command line.
pub fn run_length() -> Duration {
    let quick = std::env::args().any(|a| a == "--quick");
    Duration::from_millis(if quick { 500 } else { 3000 })
}

/// The runtime the benches drive the store from: two workers, as on the target machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

const DEVICES_PER_WRITER: u64 = 100;
const SNAPSHOT_BYTES: usize = 600;

/// Runs `writers` closed-loop writers for `duration`, each committing one twin step at a
/// time (a 600-byte snapshot put with compare-and-set, a high-water advance, and in one
/// step of ten a 200-byte log append) and waiting for its acknowledgement. Returns the
/// acknowledgement latencies in µs and the time taken.
pub async fn twin_steps<S: Store + ?Sized>(
    store: Arc<S>,
    writers: u64,
    duration: Duration,
) -> (Histogram<u64>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
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
    (hist, started.elapsed())
}
