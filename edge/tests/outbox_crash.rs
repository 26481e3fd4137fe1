//! Guarantee 1 at the edge: an item whose `accept` returned survives a SIGKILL of the edge
//! process, keeps its place in its device log, and numbering continues after it.
//!
//! The test runs itself as the child: it re-executes this test binary with only
//! [`crash_child`] selected and [`CHILD_ENV`] set on that one command. The child accepts
//! items from several tasks and prints `acked <device> <seq>` after each `accept` returned
//! (and `trimming`/`trimmed <device> <seq>` around each `acknowledge`); the parent SIGKILLs it
//! after enough lines, twice, then reopens the outbox and checks every printed line.

use caretwin_edge::outbox::{Item, Outbox, OutboxConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

/// Set on the child only: the directory of the outbox it writes.
const CHILD_ENV: &str = "CARETWIN_OUTBOX_CRASH_CHILD";
/// Devices the child writes; several tasks share each, so `seq` assignment is contended.
const DEVICES: [&str; 3] = ["fridge-1", "freezer-2", "smoke-3"];
/// Acks the parent waits for before each kill.
const ACKS_BEFORE_KILL: usize = 1500;
/// Crashes in a row, each child reopening what the last one left.
const ROUNDS: usize = 2;

/// What the children printed.
#[derive(Default)]
struct Printed {
    acked: BTreeMap<String, BTreeSet<u64>>,
    /// Highest watermark whose `acknowledge` returned, per device.
    trimmed: BTreeMap<String, u64>,
    /// Highest watermark whose `acknowledge` was started, per device.
    trimming: BTreeMap<String, u64>,
}

#[test]
fn accepted_items_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut printed = Printed::default();
    for round in 0..ROUNDS {
        run_and_kill(dir.path(), round, &mut printed);
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let outbox = Outbox::open(&OutboxConfig::at(dir.path())).expect("reopen after crash");
        let backlog = outbox.devices().await.unwrap();
        for device in DEVICES {
            let acked = &printed.acked[device];
            let max_acked = *acked.last().unwrap();
            let last = outbox.last_seq(device).await;
            assert!(
                last >= max_acked,
                "{device}: last seq {last} < acked {max_acked}"
            );
            let first = backlog
                .iter()
                .find(|b| b.device == device)
                .map_or(last + 1, |b| b.first_pending_seq);
            // A returned acknowledge is durable too, and nothing is trimmed that the
            // child did not start to acknowledge.
            let trimmed = printed.trimmed.get(device).copied().unwrap_or(0);
            let trimming = printed.trimming.get(device).copied().unwrap_or(0);
            assert!(
                (trimmed..=trimming).contains(&(first - 1)),
                "{device}: trimmed to {}, acknowledged {trimmed} to {trimming}",
                first - 1
            );
            let held = outbox.pending(device, 0, usize::MAX).await.unwrap();
            let seqs: Vec<u64> = held.iter().map(|s| s.seq).collect();
            assert_eq!(
                seqs,
                (first..=last).collect::<Vec<_>>(),
                "{device}: log is not contiguous"
            );
            assert!(held.iter().all(|s| s.item.device == device));
            for seq in acked.range(first..) {
                assert!(
                    seqs.binary_search(seq).is_ok(),
                    "{device}: acked {seq} lost"
                );
            }
            let next = outbox
                .accept(vec![Item::reading(device, 1, "check", 0.0)])
                .await
                .unwrap();
            assert_eq!(
                next[0].seq,
                last + 1,
                "{device}: numbering does not continue"
            );
        }
    });
}

/// Starts a child on `dir`, reads its lines until it has printed enough acks, SIGKILLs it,
/// and collects what it printed up to its death.
fn run_and_kill(dir: &Path, round: usize, printed: &mut Printed) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().unwrap();
    let mut acks = 0;
    let mut killed = false;
    // Lines already in the pipe when the kill lands are still read: they were printed
    // after their accept returned, so they count.
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let mut words = line.split(' ');
        let (Some(verb), Some(device), Some(seq)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Ok(seq) = seq.parse::<u64>() else {
            continue;
        };
        match verb {
            "acked" => {
                let fresh = printed.acked.entry(device.into()).or_default().insert(seq);
                assert!(fresh, "{device} {seq} acked twice (round {round})");
                acks += 1;
            }
            "trimmed" | "trimming" => {
                let marks = match verb {
                    "trimmed" => &mut printed.trimmed,
                    _ => &mut printed.trimming,
                };
                let t = marks.entry(device.into()).or_default();
                *t = (*t).max(seq);
            }
            _ => continue,
        }
        if acks >= ACKS_BEFORE_KILL && !killed {
            child.kill().expect("SIGKILL the child");
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        killed,
        "round {round}: the child stopped after {acks} acks: {status}"
    );
    assert_eq!(status.signal(), Some(9), "round {round}: {status}");
}

/// Not a test on its own: the child process of [`accepted_items_survive_sigkill`]. Does
/// nothing unless [`CHILD_ENV`] is set; then accepts items until it is killed.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let outbox = Arc::new(Outbox::open(&OutboxConfig::at(dir)).expect("open"));
        let tasks: Vec<_> = (0..4)
            .map(|task| tokio::spawn(accept_forever(outbox.clone(), task)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

async fn accept_forever(outbox: Arc<Outbox>, task: usize) {
    let mut out = std::io::stdout();
    for i in 0usize.. {
        let device = DEVICES[(task + i) % DEVICES.len()];
        let items: Vec<Item> = (0..=i % 3)
            .map(|k| match (i + k) % 7 {
                0 => Item::alarm(device, 1_700_000_000_000, "smoke", Some("siren on")),
                _ => Item::reading(
                    device,
                    1_700_000_000_000 + i as u64,
                    "temperature",
                    k as f64,
                ),
            })
            .collect();
        let accepted = outbox.accept(items).await.expect("accept");
        for a in &accepted {
            // Straight to the process's stdout (line-buffered), not the test harness's
            // capture: the line is in the pipe before the next accept starts.
            writeln!(out, "acked {} {}", a.device, a.seq).unwrap();
        }
        if task == 0 && i % 10 == 9 {
            // Trim the device's log up to a seq this task saw accepted. Announced before
            // and confirmed after, so the parent knows the least and most it may find
            // trimmed.
            let last = &accepted[accepted.len() - 1];
            writeln!(out, "trimming {} {}", last.device, last.seq).unwrap();
            outbox
                .acknowledge(&last.device, last.seq)
                .await
                .expect("ack");
            writeln!(out, "trimmed {} {}", last.device, last.seq).unwrap();
        }
    }
}
