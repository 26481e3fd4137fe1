//! Crash scenarios: kill a process that is writing, with SIGKILL, and check that every
//! write it acknowledged survived.
//!
//! The writer is this binary itself (`caretwin-chaos store-writer`), started as a child:
//! it commits writes to an embedded store from many concurrent tasks and prints
//! `ack <id>` on stdout for each one the store acknowledged. The scenario kills it after a
//! number of acknowledgements, reads the acknowledgements that made it to the pipe,
//! reopens the store and looks for every one of them.

use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use serde::Serialize;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The key of write `id`'s twin snapshot and high-water mark.
fn device(id: u64) -> Key {
    Key::new(format!("chaos/device/{id}"))
}

const LOG: &str = "chaos/log";

/// The child's side: writes forever from `concurrency` tasks, printing each acknowledged
/// id. Returns only on a store error.
pub async fn store_writer(dir: &Path, concurrency: usize) -> anyhow::Result<()> {
    let store = Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir))?);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (store, next) = (store.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                let batch = WriteBatch::new()
                    .with(Op::PutSnapshot {
                        key: device(id),
                        expected_version: 0,
                        value: format!("state-{id}").into_bytes(),
                    })
                    .with(Op::AdvanceHighWater {
                        device: device(id),
                        from: 0,
                        to: id + 1,
                    })
                    .with(Op::Append {
                        log: LOG.into(),
                        value: id.to_be_bytes().to_vec(),
                    });
                store.commit(batch).await?;
                // One write per line, flushed: the parent counts what reached the pipe.
                let mut out = std::io::stdout().lock();
                writeln!(out, "ack {id}")?;
                out.flush()?;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// What a crash scenario found.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CrashReport {
    /// Writes the child acknowledged before it was killed.
    pub acknowledged: usize,
    /// Acknowledged writes found complete after reopening.
    pub survived: usize,
    /// Acknowledged writes missing or incomplete after reopening (must be 0).
    pub lost: Vec<u64>,
    /// Entries in the shared log after reopening (≥ acknowledged: some writes may have
    /// been durable but not yet acknowledged when the kill came).
    pub log_entries: usize,
    /// Log entries that appear more than once (must be 0).
    pub duplicated: usize,
}

impl CrashReport {
    /// True when nothing acknowledged was lost or duplicated.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.duplicated == 0 && self.survived == self.acknowledged
    }
}

/// Runs the writer `exe store-writer` against `dir`, kills it with SIGKILL after
/// `kill_after` acknowledgements, then checks the store.
pub async fn crash_store(exe: &Path, dir: &Path, kill_after: usize) -> anyhow::Result<CrashReport> {
    let mut child = Command::new(exe)
        .arg("store-writer")
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut acked = BTreeSet::new();
    let mut lines = BufReader::new(stdout).lines();
    let mut killed = false;
    // Reading continues after the kill: acknowledgements already in the pipe count.
    for line in lines.by_ref() {
        let line = line?;
        let id: u64 = line
            .strip_prefix("ack ")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unexpected line from the writer: {line:?}"))?;
        acked.insert(id);
        if !killed && acked.len() >= kill_after {
            child.kill()?; // SIGKILL on Unix: no destructor, no flush, no goodbye.
            killed = true;
        }
    }
    let status = child.wait()?;
    anyhow::ensure!(
        killed,
        "writer exited by itself ({status}) after {} acks",
        acked.len()
    );
    tracing::info!(
        acknowledged = acked.len(),
        "writer killed, reopening the store"
    );
    verify(dir, &acked).await
}

async fn verify(dir: &Path, acked: &BTreeSet<u64>) -> anyhow::Result<CrashReport> {
    let store = EmbeddedStore::open(&EmbeddedConfig::at(dir))?;
    let mut lost = Vec::new();
    for &id in acked {
        let snap = store.snapshot(&device(id)).await?;
        let hwm = store.high_water(&device(id)).await?;
        let complete =
            snap.is_some_and(|s| s.value == format!("state-{id}").into_bytes()) && hwm == id + 1;
        if !complete {
            lost.push(id);
        }
    }
    let mut seen = BTreeSet::new();
    let mut duplicated = 0;
    let mut from = 1;
    loop {
        let page = store.read_log(&LOG.into(), from, 10_000).await?;
        let Some(last) = page.last() else { break };
        from = last.index + 1;
        for e in &page {
            let id = u64::from_be_bytes(e.value.as_slice().try_into()?);
            if !seen.insert(id) {
                duplicated += 1;
            }
        }
    }
    for &id in acked {
        if !seen.contains(&id) && !lost.contains(&id) {
            lost.push(id);
        }
    }
    Ok(CrashReport {
        acknowledged: acked.len(),
        survived: acked.len() - lost.len(),
        lost,
        log_entries: seen.len() + duplicated,
        duplicated,
    })
}
