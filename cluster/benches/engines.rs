//! Embedded storage engines on CareTwin's write pattern, with group commit.
//!
//! Measures fjall (an LSM-tree) against redb (a copy-on-write B-tree) for the write a twin
//! makes when it applies a batch of readings. One *logical write* atomically puts
//!
//! - a ~600-byte snapshot under `snap/<tenant>/<device-id>`, an update of one of 100,000
//!   pre-loaded devices chosen uniformly at random,
//! - the device's applied-sequence high-water mark (8-byte big-endian `u64`) under
//!   `hwm/<tenant>/<device-id>`,
//! - in 1 of 10 logical writes, a ~200-byte event appended under
//!   `log/<log-id>/<u64 big-endian index>`.
//!
//! Each key family lives in its own fjall keyspace or redb table of one database.
//!
//! Group commit: a producer thread submits logical writes at full speed through a bounded
//! channel to one writer thread, which takes up to G of them, applies them as one atomic unit
//! (one fjall write batch, one redb write transaction), makes that unit durable with ONE fsync,
//! and only then acknowledges every write in it. For G = 1, 64 and 1024 it reports logical
//! writes per second, the submit-to-acknowledge latency (p50, p99) and the number of fsyncs
//! (groups committed). Each configuration runs 3 times on a fresh database; the table shows
//! the median run by writes per second.
//!
//! Run it with `cargo bench -p caretwin-cluster --bench engines`; pass `--quick` (after `--`)
//! or set `BENCH_QUICK=1` for a short smoke run, and `fjall` or `redb` to run one engine.
//!
//! Files live under Cargo's `CARGO_TARGET_TMPDIR`, on the same disk as the target directory,
//! because an fsync on tmpfs costs nothing and would hide exactly what is measured here.

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

/// Devices whose snapshots are pre-loaded and then updated.
const DEVICES: u32 = 100_000;
/// Tenants the devices are spread over; each tenant also owns one event log.
const TENANTS: u32 = 16;
/// Bytes of one twin snapshot.
const SNAPSHOT_BYTES: usize = 600;
/// Bytes of one event-log entry.
const LOG_ENTRY_BYTES: usize = 200;
/// One logical write in this many also appends to an event log.
const LOG_EVERY: u64 = 10;
/// Group sizes: logical writes per atomic commit and fsync.
const GROUP_SIZES: [usize; 3] = [1, 64, 1024];
/// Logical writes per commit while pre-loading the devices.
const PRELOAD_CHUNK: usize = 10_000;

fn main() -> Result<()> {
    // Cargo passes `--bench` to a `harness = false` bench: flags we don't know are ignored
    // rather than refused. A bare word is a filter on the engine name, as with libtest.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|arg| arg == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let filters: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let plan = if quick {
        Plan {
            runs: 1,
            duration: Duration::from_millis(500),
        }
    } else {
        Plan {
            runs: 3,
            duration: Duration::from_secs(3),
        }
    };

    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
    print_header(root, &plan)?;

    let workload = Workload::new();
    let mut rows = Vec::new();
    let engines = [EngineKind::Fjall, EngineKind::Redb]
        .into_iter()
        .filter(|engine| filters.is_empty() || filters.iter().any(|f| engine.name().contains(f)));
    for engine in engines {
        for group_size in GROUP_SIZES {
            let mut runs = Vec::with_capacity(plan.runs);
            for _ in 0..plan.runs {
                runs.push(run_once(engine, group_size, &workload, &plan, root)?);
            }
            // Median by throughput; its latencies and fsync count come from the same run so
            // the row describes one real run, not a mix.
            runs.sort_by(|a, b| a.writes_per_sec().total_cmp(&b.writes_per_sec()));
            let all: Vec<String> = runs
                .iter()
                .map(|r| format!("{:.0}", r.writes_per_sec()))
                .collect();
            let median = runs.swap_remove(runs.len() / 2);
            rows.push(Row {
                engine,
                group_size,
                all_runs: all.join(" / "),
                result: median,
            });
        }
    }
    print_results(&rows);
    Ok(())
}

/// How long and how often each configuration runs.
struct Plan {
    /// Runs per configuration; the median is reported.
    runs: usize,
    /// Measured time per run, after pre-loading.
    duration: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EngineKind {
    Fjall,
    Redb,
}

impl EngineKind {
    fn name(self) -> &'static str {
        match self {
            EngineKind::Fjall => "fjall",
            EngineKind::Redb => "redb",
        }
    }
}

/// Keys and value bytes built once, so the writer thread spends its time in the engine and
/// not in formatting keys or generating values.
struct Workload {
    snap_keys: Vec<Vec<u8>>,
    hwm_keys: Vec<Vec<u8>>,
    /// `log/<log-id>/`, one per tenant; the big-endian index is appended per entry.
    log_prefixes: Vec<Vec<u8>>,
    /// Random bytes that values are sliced from. Random, hence incompressible: fjall
    /// compresses with LZ4 and redb does not compress, so compressible filler would flatter
    /// fjall beyond what serialized twin state gives it.
    pool: Vec<u8>,
}

impl Workload {
    fn new() -> Self {
        let tenant = |device: u32| format!("tenant-{:02}", device % TENANTS);
        let snap_keys = (0..DEVICES)
            .map(|d| format!("snap/{}/dev-{d:06}", tenant(d)).into_bytes())
            .collect();
        let hwm_keys = (0..DEVICES)
            .map(|d| format!("hwm/{}/dev-{d:06}", tenant(d)).into_bytes())
            .collect();
        let log_prefixes = (0..TENANTS)
            .map(|t| format!("log/{}/", tenant(t)).into_bytes())
            .collect();
        let mut rng = SplitMix64(0x00C0_FFEE);
        let pool = (0..(1 << 20) / 8)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect();
        Self {
            snap_keys,
            hwm_keys,
            log_prefixes,
            pool,
        }
    }

    fn snapshot(&self, write: &LogicalWrite) -> &[u8] {
        &self.pool[write.value_at..write.value_at + SNAPSHOT_BYTES]
    }

    fn log_entry(&self, write: &LogicalWrite) -> &[u8] {
        &self.pool[write.value_at..write.value_at + LOG_ENTRY_BYTES]
    }

    fn log_key(&self, append: &LogAppend) -> Vec<u8> {
        let mut key = self.log_prefixes[append.log as usize].clone();
        key.extend_from_slice(&append.index.to_be_bytes());
        key
    }
}

/// What a twin hands the storage writer: small and `Copy`, the bytes live in [`Workload`].
#[derive(Clone, Copy)]
struct LogicalWrite {
    submitted: Instant,
    device: u32,
    /// New applied-sequence high-water mark of the device.
    seq: u64,
    /// Offset into [`Workload::pool`] of the snapshot (and log entry) bytes.
    value_at: usize,
    log: Option<LogAppend>,
}

#[derive(Clone, Copy)]
struct LogAppend {
    log: u32,
    index: u64,
}

/// A storage engine as the writer thread sees it.
trait Engine {
    /// Applies `group` atomically and returns only once it is durable (one fsync).
    fn commit_group(&mut self, workload: &Workload, group: &[LogicalWrite]) -> Result<()>;

    /// Brings the pre-loaded state to where a long-running node would have it on disk.
    fn settle(&mut self) -> Result<()> {
        Ok(())
    }
}

struct Fjall {
    db: fjall::Database,
    snap: fjall::Keyspace,
    hwm: fjall::Keyspace,
    log: fjall::Keyspace,
}

impl Fjall {
    /// Opens with fjall's defaults (background workers = min(cores, 4)), as a node would.
    fn open(dir: &Path) -> Result<Self> {
        let db = fjall::Database::builder(dir).open()?;
        let snap = db.keyspace("snap", fjall::KeyspaceCreateOptions::default)?;
        let hwm = db.keyspace("hwm", fjall::KeyspaceCreateOptions::default)?;
        let log = db.keyspace("log", fjall::KeyspaceCreateOptions::default)?;
        Ok(Self { db, snap, hwm, log })
    }
}

impl Engine for Fjall {
    fn commit_group(&mut self, workload: &Workload, group: &[LogicalWrite]) -> Result<()> {
        // One batch is written to the journal as one atomic unit across keyspaces. With a
        // durability mode set, `commit` flushes and syncs the journal before it returns, under
        // the journal lock; `SyncData` (fdatasync) matches what redb issues for its commits.
        let mut batch = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for write in group {
            let device = write.device as usize;
            batch.insert(
                &self.snap,
                workload.snap_keys[device].as_slice(),
                workload.snapshot(write),
            );
            batch.insert(
                &self.hwm,
                workload.hwm_keys[device].as_slice(),
                write.seq.to_be_bytes(),
            );
            if let Some(append) = &write.log {
                batch.insert(
                    &self.log,
                    workload.log_key(append),
                    workload.log_entry(write),
                );
            }
        }
        batch.commit()?;
        Ok(())
    }

    fn settle(&mut self) -> Result<()> {
        // The pre-load would otherwise still sit in the memtables and be flushed during the
        // measured run, charging fjall for writing the preload, which redb already did inside
        // its pre-load commits. `rotate_memtable_and_wait` is public but doc-hidden (fjall uses
        // it in its own tests); there is no documented way to flush on demand.
        for keyspace in [&self.snap, &self.hwm, &self.log] {
            keyspace.rotate_memtable_and_wait()?;
        }
        Ok(())
    }
}

const SNAP: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("snap");
const HWM: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("hwm");
const LOG: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("log");

struct Redb {
    db: redb::Database,
}

impl Redb {
    /// Opens with redb's defaults (1 GiB page cache), as a node would.
    fn open(dir: &Path) -> Result<Self> {
        let db = redb::Database::create(dir.join("caretwin.redb"))?;
        Ok(Self { db })
    }
}

impl Engine for Redb {
    fn commit_group(&mut self, workload: &Workload, group: &[LogicalWrite]) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        // Immediate is redb's default; set it so the durability being measured is explicit.
        // redb commits in one phase (checksummed header), i.e. one fdatasync per commit.
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut snap = txn.open_table(SNAP)?;
            let mut hwm = txn.open_table(HWM)?;
            let mut log = txn.open_table(LOG)?;
            for write in group {
                let device = write.device as usize;
                snap.insert(
                    workload.snap_keys[device].as_slice(),
                    workload.snapshot(write),
                )?;
                hwm.insert(
                    workload.hwm_keys[device].as_slice(),
                    write.seq.to_be_bytes().as_slice(),
                )?;
                if let Some(append) = &write.log {
                    log.insert(
                        workload.log_key(append).as_slice(),
                        workload.log_entry(write),
                    )?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// Outcome of one measured run.
struct RunResult {
    writes: u64,
    groups: u64,
    elapsed: Duration,
    /// Submit-to-acknowledge latency of every logical write, in microseconds.
    latency_us: Histogram<u64>,
    /// Bytes of all files in the database directory after the run.
    disk_bytes: u64,
    /// Process CPU time during the run, all threads (engine workers included).
    cpu: Duration,
}

impl RunResult {
    fn writes_per_sec(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }
}

/// Opens a fresh database, pre-loads the devices, then measures group commits of `group_size`.
fn run_once(
    kind: EngineKind,
    group_size: usize,
    workload: &Workload,
    plan: &Plan,
    root: &Path,
) -> Result<RunResult> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("engines-{}-", kind.name()))
        .tempdir_in(root)?;
    let mut engine: Box<dyn Engine> = match kind {
        EngineKind::Fjall => Box::new(Fjall::open(dir.path())?),
        EngineKind::Redb => Box::new(Redb::open(dir.path())?),
    };
    preload(engine.as_mut(), workload)?;
    engine.settle()?;

    let mut result = measure(engine.as_mut(), group_size, workload, plan.duration)?;
    result.disk_bytes = dir_bytes(dir.path())?;
    // Close the database before its directory is removed.
    drop(engine);
    Ok(result)
}

/// Puts a snapshot and a high-water mark of 0 for every device, in durable chunks.
fn preload(engine: &mut dyn Engine, workload: &Workload) -> Result<()> {
    let now = Instant::now();
    let writes: Vec<LogicalWrite> = (0..DEVICES)
        .map(|device| LogicalWrite {
            submitted: now,
            device,
            seq: 0,
            value_at: (device as usize * 97) % (workload.pool.len() - SNAPSHOT_BYTES),
            log: None,
        })
        .collect();
    for chunk in writes.chunks(PRELOAD_CHUNK) {
        engine.commit_group(workload, chunk)?;
    }
    Ok(())
}

/// Runs a full-speed producer against the group-committing writer for `duration`.
fn measure(
    engine: &mut dyn Engine,
    group_size: usize,
    workload: &Workload,
    duration: Duration,
) -> Result<RunResult> {
    // Room for one group to form while the previous one commits. A deeper queue would only
    // add queueing delay proportional to its depth, measuring the channel, not the engine.
    // Under this saturating load a write therefore waits for the group being committed, then
    // its own group (and, for the one write stamped while the producer is blocked, one more):
    // latency is about two to three group commit times by construction.
    let (tx, rx) = mpsc::sync_channel(group_size);
    let stop = &AtomicBool::new(false);
    let pool_len = workload.pool.len();
    let cpu_before = process_cpu()?;
    let started = Instant::now();

    let (writes, groups, latency_us) = std::thread::scope(|scope| {
        // The producer owns the sender, so the channel closes when it returns.
        scope.spawn(move || produce(tx, stop, pool_len));
        write_groups(engine, workload, rx, group_size, stop, started, duration)
    })?;
    let elapsed = started.elapsed();
    Ok(RunResult {
        writes,
        groups,
        elapsed,
        latency_us,
        disk_bytes: 0,
        cpu: process_cpu()?.saturating_sub(cpu_before),
    })
}

/// Submits logical writes as fast as the channel takes them until told to stop.
fn produce(tx: SyncSender<LogicalWrite>, stop: &AtomicBool, pool_len: usize) {
    let mut rng = SplitMix64(0x7717_CA5E);
    // Pre-load wrote sequence 0 for every device.
    let mut device_seq = vec![0u64; DEVICES as usize];
    let mut log_len = vec![0u64; TENANTS as usize];
    while !stop.load(Ordering::Relaxed) {
        let device = (rng.next_u64() % u64::from(DEVICES)) as u32;
        let seq = &mut device_seq[device as usize];
        *seq += 1;
        let log = rng.next_u64().is_multiple_of(LOG_EVERY).then(|| {
            let log = device % TENANTS;
            let index = &mut log_len[log as usize];
            *index += 1;
            LogAppend { log, index: *index }
        });
        let write = LogicalWrite {
            // Stamped before `send`: time spent blocked on a full queue is part of what the
            // twin waits for, so it belongs in the latency.
            submitted: Instant::now(),
            device,
            seq: *seq,
            value_at: (rng.next_u64() % (pool_len - SNAPSHOT_BYTES) as u64) as usize,
            log,
        };
        if tx.send(write).is_err() {
            return;
        }
    }
}

/// The single writer: drains up to `group_size` writes, commits them with one fsync, then
/// acknowledges each. Returns (writes, groups, latency histogram) once the producer is done.
fn write_groups(
    engine: &mut dyn Engine,
    workload: &Workload,
    rx: Receiver<LogicalWrite>,
    group_size: usize,
    stop: &AtomicBool,
    started: Instant,
    duration: Duration,
) -> Result<(u64, u64, Histogram<u64>)> {
    // 1 µs to 10 min at 3 significant digits; anything slower is clamped, not dropped.
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut group = Vec::with_capacity(group_size);
    let (mut writes, mut groups) = (0u64, 0u64);
    // Blocks for the first write of a group only: a group commits with whatever has arrived
    // rather than waiting to fill, as a real group committer must.
    while let Ok(first) = rx.recv() {
        group.clear();
        group.push(first);
        while group.len() < group_size {
            match rx.try_recv() {
                Ok(write) => group.push(write),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        engine.commit_group(workload, &group)?;
        let acked = Instant::now();
        for write in &group {
            let us = acked.duration_since(write.submitted).as_micros();
            latency_us.saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
        }
        writes += group.len() as u64;
        groups += 1;
        // Keep draining after the deadline so the producer, perhaps blocked in `send`, sees
        // the flag and hangs up; the few writes still queued are committed and counted.
        if started.elapsed() >= duration {
            stop.store(true, Ordering::Relaxed);
        }
    }
    if writes == 0 {
        bail!("no write was committed");
    }
    Ok((writes, groups, latency_us))
}

/// One row of the report: the median run of one configuration.
struct Row {
    engine: EngineKind,
    group_size: usize,
    /// Writes/s of every run, slowest first.
    all_runs: String,
    result: RunResult,
}

fn print_header(root: &Path, plan: &Plan) -> Result<()> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown", |(_, model)| model.trim());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/version").unwrap_or_default();
    let kernel: Vec<&str> = kernel.split_whitespace().take(3).collect();
    let lock = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock");
    let lock = std::fs::read_to_string(lock).with_context(|| format!("read {lock}"))?;
    let (fs, device) = filesystem_of(root);

    println!("# Storage engines on the CareTwin write pattern, group commit\n");
    // Other work on the machine (a build, say) skews results on few cores: show it.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "- machine: {cpu}, {cores} cores, {}; load average {} at start",
        kernel.join(" "),
        load.join(" ")
    );
    println!(
        "- engines: fjall {} (lsm-tree {}), redb {}",
        locked_version(&lock, "fjall"),
        locked_version(&lock, "lsm-tree"),
        locked_version(&lock, "redb"),
    );
    println!("- files: {} ({fs} on {device})", root.display());
    if matches!(fs.as_str(), "tmpfs" | "ramfs") {
        println!("- WARNING: {fs} makes fsync free; these numbers do not measure durability");
    }
    println!(
        "- workload: {DEVICES} pre-loaded devices updated uniformly at random; per logical \
         write a {SNAPSHOT_BYTES} B snapshot + 8 B high-water mark, and a {LOG_ENTRY_BYTES} B \
         log append in 1 of {LOG_EVERY}"
    );
    println!(
        "- each configuration: {} run(s) of {:.1} s on a fresh database, median by writes/s",
        plan.runs,
        plan.duration.as_secs_f64()
    );
    println!();
    Ok(())
}

fn print_results(rows: &[Row]) {
    println!("| engine | writes per fsync | writes/s | p50 latency | p99 latency | fsyncs |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        let r = &row.result;
        println!(
            "| {} | {} (mean {:.1}) | {:.0} | {} | {} | {} |",
            row.engine.name(),
            row.group_size,
            r.writes as f64 / r.groups as f64,
            r.writes_per_sec(),
            format_us(r.latency_us.value_at_quantile(0.50)),
            format_us(r.latency_us.value_at_quantile(0.99)),
            r.groups,
        );
    }

    let ratios: Vec<String> = GROUP_SIZES
        .iter()
        .filter_map(|&g| {
            let rate = |engine| {
                rows.iter()
                    .find(|row| row.engine == engine && row.group_size == g)
                    .map(|row| row.result.writes_per_sec())
            };
            Some(format!(
                "G={g}: {:.2}x",
                rate(EngineKind::Fjall)? / rate(EngineKind::Redb)?
            ))
        })
        .collect();
    if !ratios.is_empty() {
        println!("\nfjall/redb writes/s: {}", ratios.join(", "));
    }

    println!("\nMedian runs in detail (CPU is all threads, engine workers included):\n");
    for row in rows {
        let r = &row.result;
        println!(
            "- {} G={}: runs {} writes/s; {} writes in {:.2} s; CPU {:.0}% of one core; \
             {:.1} MiB on disk",
            row.engine.name(),
            row.group_size,
            row.all_runs,
            r.writes,
            r.elapsed.as_secs_f64(),
            100.0 * r.cpu.as_secs_f64() / r.elapsed.as_secs_f64(),
            r.disk_bytes as f64 / (1024.0 * 1024.0),
        );
    }
}

fn format_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else {
        format!("{:.2} ms", us as f64 / 1_000.0)
    }
}

/// Version(s) of `package` pinned in a Cargo.lock.
fn locked_version(lock: &str, package: &str) -> String {
    let name_line = format!("name = \"{package}\"");
    let mut lines = lock.lines();
    let mut versions = Vec::new();
    while let Some(line) = lines.next() {
        if line == name_line
            && let Some(version) = lines
                .next()
                .and_then(|l| l.strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
        {
            versions.push(version);
        }
    }
    if versions.is_empty() {
        "unknown".to_owned()
    } else {
        versions.join("+")
    }
}

/// (filesystem type, device) of the mount holding `path`, from `/proc/mounts`.
fn filesystem_of(path: &Path) -> (String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, mount, fs) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), fs.to_owned(), device.to_owned()))
        })
        .max_by_key(|(len, _, _)| *len)
        .map_or_else(
            || ("unknown".to_owned(), "unknown".to_owned()),
            |(_, fs, device)| (fs, device),
        )
}

/// Total bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// User + system CPU time of this process so far, from `/proc/self/stat`.
fn process_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .context("short /proc/self/stat")?
            .parse::<u64>()?)
    };
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// SplitMix64: a tiny, fast, seedable generator, enough to pick devices and value offsets
/// deterministically without another dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
