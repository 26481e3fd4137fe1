//! Hosting cost of device twins: resident bytes per active twin, and messages per second
//! through the real host (shards on ractor, write-through to the embedded store).
//!
//! Activates N coffee-machine twins (6 signals each), measures the process's resident
//! memory before and after, then drives batches of readings at random twins from many
//! concurrent callers and reports messages/s and readings/s, with the machine.
//!
//! Run: `cargo bench -p caretwin-cluster --bench twins` (`-- --quick` for a short run,
//! `-- --twins N` to choose N).

use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::Twin;
use caretwin_actors::host::clock::ManualClock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::mail::Mail;
use caretwin_actors::model::HOUR_MS;
use caretwin_actors::system::{Components, ServicesConfig, System};
use caretwin_actors::twins::device::{DeviceItem, DeviceMsg, DeviceReply, ItemKind};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const T0: u64 = 1_795_392_000_000;
const SIGNALS: [(&str, f64); 4] = [
    ("brew_pressure", 9.2),
    ("heating_time", 35.0),
    ("boiler_temperature", 92.0),
    ("pump_current", 1.1),
];

struct Nowhere;

#[async_trait::async_trait]
impl Router for Nowhere {
    async fn deliver(&self, _mail: Mail) -> caretwin_actors::Result<Delivery> {
        Ok(Delivery::Delivered)
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let twins = arg("--twins").unwrap_or(if quick { 10_000 } else { 100_000 });
    let duration = Duration::from_secs(if quick { 2 } else { 10 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(twins, duration));
}

async fn run(twins: u64, duration: Duration) {
    let dir = tempfile::Builder::new()
        .prefix("twins-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("bench directory");
    let store = Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).expect("store"));
    let clock = Arc::new(ManualClock::new(T0));
    let system = Arc::new(
        System::start(Components {
            store,
            clock: clock.clone(),
            catalogue: Arc::new(Catalogue::builtin()),
            device_env: None,
            services: ServicesConfig::default(),
            host: HostConfig {
                shards: 64,
                idle_ms: u64::MAX,
            },
            outside: Arc::new(Nowhere),
            local_supplier: None,
        })
        .await
        .expect("system"),
    );
    println!("# device twins: memory and throughput through the host");
    println!("machine: {}", caretwin_tests::machine());

    // Activate: provision every twin (one durable write each), from 512 concurrent callers.
    let before = rss_bytes();
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..512 {
        let (system, next) = (system.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= twins {
                    break;
                }
                let msg = DeviceMsg::Provision {
                    customer: format!("t1:c{i}"),
                    site: "t1:s".into(),
                    model: "coffee.barista-200".into(),
                };
                let r = system
                    .devices()
                    .call(&format!("t1:d{i}"), msg)
                    .await
                    .expect("provision");
                assert_eq!(r, DeviceReply::Ok);
            }
        }));
    }
    for t in tasks {
        t.await.expect("provisioner");
    }
    let activation_s = started.elapsed().as_secs_f64();
    let active = system.devices().stats().await.expect("stats").active as u64;
    let after = rss_bytes();
    println!(
        "\nactivated {active} twins in {activation_s:.1} s ({:.0} activations/s)",
        active as f64 / activation_s
    );
    println!(
        "resident memory: {:.1} MiB before, {:.1} MiB after: {:.0} bytes per active twin \
         (including the store's caches)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        (after.saturating_sub(before)) as f64 / active as f64
    );

    let snapshot = system
        .devices()
        .inspect("t1:d0", |t| t.map(|t| t.snapshot().len()))
        .await
        .expect("inspect")
        .unwrap_or(0);
    println!(
        "size_of DeviceTwin: {} bytes (plus its per-signal vectors on the heap); snapshot {snapshot} bytes (JSON)",
        std::mem::size_of::<caretwin_actors::twins::device::DeviceTwin>()
    );

    // Drive: each message is one batch of 4 readings (one per signal) for a random twin.
    let messages = Arc::new(AtomicU64::new(0));
    let seqs: Arc<Vec<AtomicU64>> = Arc::new((0..twins).map(|_| AtomicU64::new(0)).collect());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..256u64 {
        let (system, messages, seqs) = (system.clone(), messages.clone(), seqs.clone());
        tasks.push(tokio::spawn(async move {
            // Each caller owns the twins congruent to it, so sequence numbers stay in order.
            let mut k = w;
            while started.elapsed() < duration {
                let d = k % twins;
                k += 256;
                if d % 256 != w % 256 {
                    continue;
                }
                let base = seqs[d as usize].fetch_add(SIGNALS.len() as u64, Ordering::Relaxed);
                let ts = T0 + (base / 4 + 1) * HOUR_MS;
                let items = SIGNALS
                    .iter()
                    .enumerate()
                    .map(|(j, (s, v))| DeviceItem {
                        seq: base + j as u64 + 1,
                        ts_ms: ts,
                        kind: ItemKind::Reading {
                            signal: (*s).into(),
                            value: *v,
                        },
                    })
                    .collect();
                let r = system
                    .devices()
                    .call(&format!("t1:d{d}"), DeviceMsg::Apply(items))
                    .await
                    .expect("apply");
                assert!(matches!(r, DeviceReply::Applied(_)), "{r:?}");
                messages.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    clock.set(T0 + 1_000_000 * HOUR_MS);
    for t in tasks {
        t.await.expect("driver");
    }
    let secs = started.elapsed().as_secs_f64();
    let m = messages.load(Ordering::Relaxed) as f64;
    println!(
        "\n{:.0} messages/s ({:.0} readings/s, 4 per message), {:.0} messages/s per core, \
         each applied, reasoned about and written through to the store",
        m / secs,
        4.0 * m / secs,
        m / secs / 2.0
    );
}
