//! The edge sync end to end, in one process: edges (each its own durable outbox and
//! `SyncClient` with its own site certificate) send readings over QUIC with mutual TLS on
//! 127.0.0.1 to one cluster node (twins on the real host, the embedded store), which
//! applies them, makes them durable and acknowledges them; the edges then trim them.
//!
//! Two measurements:
//! 1. **Throughput with 1, 10 and 100 sites** of [`DEVICES_PER_SITE`] coffee machines, the
//!    same number of readings in all for each row, every reading accepted at the edge →
//!    applied by the twins, durable → acknowledged → trimmed:
//!    - *cold*: the readings are accepted while every site is offline, then every site
//!      connects at once (a reconnect storm) and the clock runs until every outbox is empty;
//!    - *warm*: with every site connected and idle, each accepts as many readings again
//!      (1,000 per call, waking its client after each) until every outbox is empty: the
//!      edges' own intake runs in this process too;
//!    - *live frames*: each site then accepts one reading per device every [`PROBE_EVERY`]
//!      and times `Outbox::accept` returning → its outbox empty again (one frame, its twin
//!      steps, the ack and the trim; polled every millisecond, so ±1–2 ms), and the
//!      clients' own acknowledgement latency: a frame written → its `Ack` read
//!      (`ClientStats`), which is the protocol's p99 figure.
//! 2. **Catch-up**: one site of [`CATCH_UP_DEVICES`] machines accepts 1,000,000 readings
//!    while offline ([`CATCH_UP_ADAPTERS`] adapters, 1,000 readings per call: the edge's
//!    own durable intake rate), then connects; readings/s until its outbox is empty.
//!
//! The cluster, the edges and the bench share one process and one 2-worker tokio runtime;
//! every store is a directory under `CARGO_TARGET_TMPDIR` (the real disk: an fsync costs
//! what it costs), so 100 edges share one disk that in a deployment would be 100 disks.
//! CPU time per thread (from `/proc/self/task`) says who used the cores; UDP datagrams
//! dropped for a full receive buffer (from `/proc/net`) say whether QUIC had to recover.
//! Warnings of the node and the clients go to stderr.
//!
//! Run: `cargo bench -p caretwin-cluster --bench sync`; `-- --quick` for a short run,
//! `-- --no-compress` to send frames uncompressed (zstd is on by default, as in the edge),
//! `-- --only throughput` or `-- --only catch-up` for one of them (profiling), `-- --edge-dir
//! /dev/shm` to put the outboxes where an fsync is free (a diagnostic: what the shared disk
//! costs).

use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::mail::Mail;
use caretwin_actors::model::DAY_MS;
use caretwin_actors::store::Store;
use caretwin_actors::system::{Components, LocalSupplier, ServicesConfig, System};
use caretwin_actors::twins::customer::{CustomerMsg, CustomerReply};
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use caretwin_cluster::ingest::{CommandSignals, EdgeGateway, Ingest};
use caretwin_cluster::node::{SystemClock, now_ms};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_cluster::sync::dev::{DevPki, generate, site_file_stem};
use caretwin_cluster::sync::server::SyncServer;
use caretwin_cluster::sync::tls::{SiteIdentity, server_config_from_files};
use caretwin_edge::outbox::{Item, Outbox, OutboxConfig};
use caretwin_edge::sync::client::{ClientSettings, Downlink, SyncClient};
use caretwin_edge::sync::tls::client_config_from_files;
use caretwin_edge::sync::transport::client_endpoint;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Coffee machines per site in the throughput rows.
const DEVICES_PER_SITE: usize = 10;
/// Coffee machines of the catch-up site.
const CATCH_UP_DEVICES: usize = 100;
/// Concurrent device adapters filling the catch-up site's outbox.
const CATCH_UP_ADAPTERS: usize = 4;
/// Readings per call to `Outbox::accept` when filling an outbox.
const READINGS_PER_CALL: u64 = 1_000;
/// How often each site accepts one reading per device while latency is probed.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// The node's default tick (`ClusterConfig::tick`): timers, then mail.
const TICK: Duration = Duration::from_millis(200);
/// Only turns a hang into a failure.
const DEADLINE: Duration = Duration::from_secs(600);
const MODEL: &str = "coffee.barista-200";
/// The four diagnostics-scope signals (consented by default, so every reading is reasoned
/// about) and a healthy value of each.
const SIGNALS: [(&str, f64); 4] = [
    ("brew_pressure", 9.2),
    ("heating_time", 35.0),
    ("boiler_temperature", 92.0),
    ("pump_current", 1.1),
];

/// Accepts what the system sends outside (notifications), as the node's `LogOutside` does.
struct Outside;

#[async_trait::async_trait]
impl Router for Outside {
    async fn deliver(&self, _mail: Mail) -> caretwin_actors::Result<Delivery> {
        Ok(Delivery::Delivered)
    }
}

/// A site: its id, customer and devices.
#[derive(Clone)]
struct Site {
    id: String,
    customer: String,
    devices: Vec<String>,
}

fn throughput_sites(n: usize) -> Vec<Site> {
    (0..n)
        .map(|i| Site {
            id: format!("t1:site-{i:03}"),
            customer: format!("t1:household-{i:03}"),
            devices: (0..DEVICES_PER_SITE)
                .map(|j| format!("t1:s{i:03}-coffee-{j:02}"))
                .collect(),
        })
        .collect()
}

fn catch_up_site() -> Site {
    Site {
        id: "t1:depot".into(),
        customer: "t1:depot-owner".into(),
        devices: (0..CATCH_UP_DEVICES)
            .map(|j| format!("t1:depot-coffee-{j:03}"))
            .collect(),
    }
}

fn bench_dir(prefix: &str, parent: &Path) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .expect("bench directory")
}

fn target_tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

// ---- the cluster node, wired as `caretwin_cluster::node::run` wires it ---------------------

struct Cluster {
    system: Arc<System>,
    store: Arc<EmbeddedStore>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    serving: JoinHandle<()>,
    ticking: JoinHandle<()>,
    /// Mail delivered by the dispatcher (insights and the like) while the node ran.
    mail: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

async fn start_cluster(certs: &Path, sites: &[Site]) -> Cluster {
    let dir = bench_dir("sync-cluster-", target_tmp());
    let store = Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).expect("store"));
    let dyn_store: Arc<dyn Store> = store.clone();
    let signals = Arc::new(CommandSignals::default());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mail = Arc::new(AtomicU64::new(0));
    let outside = Arc::new(EdgeGateway::new(
        dyn_store.clone(),
        signals.clone(),
        Arc::new(Outside),
    ));
    let system = Arc::new(
        System::start(Components {
            store: dyn_store.clone(),
            clock: clock.clone(),
            catalogue: Arc::new(Catalogue::builtin()),
            device_env: None,
            services: ServicesConfig::default(),
            host: HostConfig::default(),
            outside,
            local_supplier: Some(Arc::new(LocalSupplier::new(2 * DAY_MS))),
        })
        .await
        .expect("system"),
    );
    // Sites in parallel; within a site as `node::provision` does: the customer learns its
    // devices one at a time, then the devices are provisioned together.
    futures::stream::iter(sites)
        .map(|site| provision(&system, site))
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    // Deliver what provisioning sent (customers learning of their devices), so the mail
    // counted later is what the readings caused.
    while system.pump().await.expect("mail").delivered > 0 {}

    let config = server_config_from_files(
        &certs.join("ca.pem"),
        &certs.join("cluster.pem"),
        &certs.join("cluster.key"),
    )
    .expect("server TLS");
    let (endpoint, addr) =
        caretwin_cluster::sync::transport::bind("127.0.0.1:0".parse().expect("addr"), config)
            .expect("bind");
    let ingest = Arc::new(Ingest::new(system.clone(), dyn_store, "node-1"));
    let server = SyncServer::new(ingest, signals, clock);
    let (stop, mut stopped) = watch::channel(false);
    let serving = tokio::spawn(server.serve(endpoint, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let ticking = {
        let (system, mail) = (system.clone(), mail.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                system.tick().await.expect("timers");
                let r = system.pump().await.expect("mail");
                mail.fetch_add(r.delivered as u64, Ordering::Relaxed);
            }
        })
    };
    Cluster {
        system,
        store,
        addr,
        stop,
        serving,
        ticking,
        mail,
        _dir: dir,
    }
}

async fn provision(system: &System, site: &Site) {
    for d in &site.devices {
        let add = CustomerMsg::AddDevice {
            device: d.clone(),
            model: MODEL.into(),
        };
        let r = system.customers().call(&site.customer, add).await;
        assert!(
            !matches!(r, Ok(CustomerReply::Rejected(_)) | Err(_)),
            "{d}: {r:?}"
        );
    }
    let calls = site.devices.iter().map(|d| {
        let prov = DeviceMsg::Provision {
            customer: site.customer.clone(),
            site: site.id.clone(),
            model: MODEL.into(),
        };
        system.devices().call(d, prov)
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.expect("provision"), DeviceReply::Ok);
    }
}

impl Cluster {
    /// Twin steps and fsync groups of the node's store so far.
    fn store_counts(&self) -> (u64, u64) {
        let s = self.store.stats();
        (
            s.requests.load(Ordering::Relaxed),
            s.groups.load(Ordering::Relaxed),
        )
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.serving.await.expect("server");
        self.ticking.abort();
        let _ = self.ticking.await;
        match Arc::try_unwrap(self.system) {
            Ok(system) => system.stop().await,
            Err(_) => panic!("twins still referenced at the end"),
        }
    }
}

// ---- an edge: outbox + sync client ----------------------------------------------------------

struct Edge {
    site: Site,
    outbox: Arc<Outbox>,
    new_items: Arc<Notify>,
    client: Arc<SyncClient>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    _commands: mpsc::Receiver<Downlink>,
    _dir: tempfile::TempDir,
}

impl Edge {
    fn open(certs: &Path, site: &Site, cluster: SocketAddr, opts: &Options) -> Self {
        let parent = opts.edge_dir.as_path();
        let dir = bench_dir("sync-edge-", parent);
        let outbox = Arc::new(Outbox::open(&OutboxConfig::at(dir.path())).expect("outbox"));
        let stem = site_file_stem(&SiteIdentity::new(site.id.clone()).expect("site id"));
        let config = client_config_from_files(
            &certs.join("ca.pem"),
            &certs.join(format!("{stem}.pem")),
            &certs.join(format!("{stem}.key")),
        )
        .expect("client TLS");
        let endpoint =
            client_endpoint("127.0.0.1:0".parse().expect("addr"), config).expect("client endpoint");
        let new_items = Arc::new(Notify::new());
        let (tx, commands) = mpsc::channel(1024);
        let client = Arc::new(SyncClient::new(
            ClientSettings {
                site_id: site.id.clone(),
                nodes: vec![cluster.to_string()],
                server_name: "localhost".into(),
                max_backoff: Duration::from_secs(5),
                compress: opts.compress,
            },
            endpoint,
            outbox.clone(),
            new_items.clone(),
            tx,
        ));
        Self {
            site: site.clone(),
            outbox,
            new_items,
            client,
            running: None,
            _commands: commands,
            _dir: dir,
        }
    }

    fn connect(&mut self) {
        let (stop, stopped) = oneshot::channel::<()>();
        let client = self.client.clone();
        let task = tokio::spawn(async move {
            client
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        self.running = Some((stop, task));
    }

    async fn disconnect(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.await.expect("sync client");
        }
    }
}

/// Reading number `i` of a run over `devices`: cycle `i / (4 × devices)`, then device, then
/// signal. A cycle is one reading per signal, a second after the previous cycle; values
/// vary by ±2 % around healthy ones, so the twins reason without raising anything.
fn reading(devices: &[String], i: u64, t0: u64) -> Item {
    let per_cycle = (devices.len() * SIGNALS.len()) as u64;
    let cycle = i / per_cycle;
    let rest = (i % per_cycle) as usize;
    let (d, s) = (rest / SIGNALS.len(), rest % SIGNALS.len());
    let (signal, base) = SIGNALS[s];
    let wobble = ((cycle * 7 + d as u64 * 13) % 11) as f64 / 5.0 - 1.0;
    Item::reading(
        devices[d].clone(),
        t0 + cycle * 1_000,
        signal,
        base * (1.0 + 0.02 * wobble),
    )
}

/// Accepts readings `range` of `devices` (see [`reading`]) into `outbox`,
/// [`READINGS_PER_CALL`] per call, one call at a time (so each device's readings get their
/// `seq` in time order), waking the sync client after each call if `wake` is given.
async fn fill(
    outbox: &Outbox,
    devices: &[String],
    range: std::ops::Range<u64>,
    t0: u64,
    wake: Option<&Notify>,
) {
    let mut i = range.start;
    while i < range.end {
        let end = (i + READINGS_PER_CALL).min(range.end);
        let items = (i..end).map(|k| reading(devices, k, t0)).collect();
        outbox.accept(items).await.expect("accept");
        if let Some(w) = wake {
            w.notify_waiters();
        }
        i = end;
    }
}

/// A start time so that `cycles` cycles a second apart end a minute ago.
fn start_time(cycles: u64) -> u64 {
    now_ms() - cycles * 1_000 - 60_000
}

// ---- measuring ------------------------------------------------------------------------------

/// CPU time so far, in seconds: the whole process, and per kind of thread alive now.
fn cpu() -> (f64, BTreeMap<&'static str, f64>) {
    // USER_HZ is 100 on every Linux this runs on.
    const TICK_S: f64 = 0.01;
    let ticks = |stat: &str| -> Option<(String, u64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat[open + 1..close].to_owned();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the name.
        Some((
            name,
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    };
    let total = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0.0, |(_, t)| t as f64 * TICK_S);
    let mut by_kind = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let Some((name, t)) = std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| ticks(&s))
            else {
                continue;
            };
            let kind = match name.as_str() {
                "bench-rt" => "tokio (2 workers + blocking pool)",
                "store-writer" => "cluster store writer",
                "outbox-writer" => "edge outbox writers",
                n if n.starts_with("fjall") => "fjall background (all stores)",
                _ => "other",
            };
            *by_kind.entry(kind).or_insert(0.0) += t as f64 * TICK_S;
        }
    }
    (total, by_kind)
}

/// `RcvbufErrors` of `/proc/net/snmp`: UDP datagrams dropped because a socket's receive
/// buffer was full, counted for the whole machine.
fn udp_receive_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Datagrams dropped so far at the UDP socket bound to 127.0.0.1:`port` (the `drops`
/// column of `/proc/net/udp`).
fn socket_drops(port: u16) -> u64 {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()))
                .then(|| f.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// Cores busy between two `cpu()` readings over `wall` seconds, per kind of thread.
fn cores(
    before: &(f64, BTreeMap<&'static str, f64>),
    after: &(f64, BTreeMap<&'static str, f64>),
    wall: f64,
) -> (f64, Vec<(&'static str, f64)>) {
    let kinds = after
        .1
        .iter()
        .map(|(k, v)| (*k, (v - before.1.get(k).unwrap_or(&0.0)) / wall))
        .collect();
    ((after.0 - before.0) / wall, kinds)
}

struct Drain {
    /// Until every outbox was empty.
    total: Duration,
    /// Per site, until its outbox was empty.
    per_site: Vec<Duration>,
    /// Per site, until its first session was open (handshake, Hello, Welcome).
    to_session: Vec<Duration>,
    /// UDP datagrams the kernel dropped for a full receive buffer: on the machine, and at
    /// the cluster's socket.
    udp_drops: u64,
    cluster_socket_drops: u64,
    /// Readings trimmed in each whole second.
    per_second: Vec<u64>,
    /// Cores busy, in all and per kind of thread.
    cores: (f64, Vec<(&'static str, f64)>),
    /// Twin steps (store requests) and fsync groups at the cluster.
    cluster_steps: u64,
    cluster_groups: u64,
    /// Write requests (acknowledgements) and fsync groups of the outboxes.
    edge_requests: u64,
    edge_groups: u64,
    /// Mail the dispatcher delivered meanwhile (insights raised by the readings).
    mail: u64,
    /// Sessions the clients opened (one per site unless one had to reconnect).
    sessions: u64,
}

/// How a measured phase starts.
#[derive(Clone, Copy)]
enum Start {
    /// Every site, its readings already in its outbox, connects now: a reconnect storm.
    Cold,
    /// Every site is connected and idle; each accepts readings `from..to` of its devices
    /// now, as fast as its outbox takes them, waking its client after every call.
    Warm { from: u64, to: u64, t0: u64 },
}

/// Starts the phase and waits until every site has accepted everything and its outbox is
/// empty again.
async fn measure(cluster: &Cluster, edges: &mut [Edge], start: Start) -> Drain {
    let acknowledged = |edges: &[Edge]| -> u64 {
        edges
            .iter()
            .map(|e| e.client.stats().acknowledged.load(Ordering::Relaxed))
            .sum()
    };
    let edge_counts = |edges: &[Edge]| -> (u64, u64) {
        edges.iter().fold((0, 0), |(r, g), e| {
            let s = e.outbox.stats();
            (r + s.requests, g + s.fsync_groups)
        })
    };
    let (steps0, groups0) = cluster.store_counts();
    let (req0, eg0) = edge_counts(edges);
    let mail0 = cluster.mail.load(Ordering::Relaxed);
    let drops0 = udp_receive_drops();
    let cluster_drops0 = socket_drops(cluster.addr.port());
    let cpu0 = cpu();
    let started = Instant::now();
    let feeds: Vec<Option<JoinHandle<()>>> = match start {
        Start::Cold => {
            for e in edges.iter_mut() {
                e.connect();
            }
            edges.iter().map(|_| None).collect()
        }
        Start::Warm { from, to, t0 } => edges
            .iter()
            .map(|e| {
                let (outbox, devices, wake) = (
                    e.outbox.clone(),
                    e.site.devices.clone(),
                    e.new_items.clone(),
                );
                Some(tokio::spawn(async move {
                    fill(&outbox, &devices, from..to, t0, Some(&wake)).await;
                }))
            })
            .collect(),
    };
    let mut per_site = vec![None; edges.len()];
    let mut to_session = vec![None; edges.len()];
    let mut per_second = Vec::new();
    let mut last = (acknowledged(edges), 1u64);
    loop {
        let now = started.elapsed();
        for (i, e) in edges.iter().enumerate() {
            let fed = feeds[i].as_ref().is_none_or(JoinHandle::is_finished);
            if per_site[i].is_none() && fed && e.outbox.stats().backlog_items == 0 {
                per_site[i] = Some(now);
            }
            if to_session[i].is_none() && e.client.stats().sessions.load(Ordering::Relaxed) > 0 {
                to_session[i] = Some(now);
            }
        }
        if now.as_secs() >= last.1 {
            let a = acknowledged(edges);
            per_second.push(a - last.0);
            last = (a, last.1 + 1);
        }
        if per_site.iter().chain(&to_session).all(Option::is_some) {
            break;
        }
        assert!(now < DEADLINE, "outboxes not drained in {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let total = started.elapsed();
    let cores = cores(&cpu0, &cpu(), total.as_secs_f64());
    for f in feeds.into_iter().flatten() {
        f.await.expect("adapter");
    }
    let (steps1, groups1) = cluster.store_counts();
    let (req1, eg1) = edge_counts(edges);
    Drain {
        total,
        per_site: per_site.into_iter().map(Option::unwrap).collect(),
        to_session: to_session.into_iter().map(Option::unwrap).collect(),
        udp_drops: udp_receive_drops() - drops0,
        cluster_socket_drops: socket_drops(cluster.addr.port()) - cluster_drops0,
        per_second,
        cores,
        cluster_steps: steps1 - steps0,
        cluster_groups: groups1 - groups0,
        edge_requests: req1 - req0,
        edge_groups: eg1 - eg0,
        mail: cluster.mail.load(Ordering::Relaxed) - mail0,
        sessions: edges
            .iter()
            .map(|e| e.client.stats().sessions.load(Ordering::Relaxed))
            .sum(),
    }
}

/// Every site accepts one reading per device each [`PROBE_EVERY`] for `length`; each time
/// from `accept` returning until its outbox is empty again is recorded (µs).
async fn probe(edges: &[Edge], length: Duration) -> (Histogram<u64>, Histogram<u64>) {
    for e in edges {
        e.client.stats().reset_ack_latency();
    }
    let n = edges.len() as u32;
    let mut tasks = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let (outbox, new_items, devices) = (
            e.outbox.clone(),
            e.new_items.clone(),
            e.site.devices.clone(),
        );
        // Spread the sites over the period so they do not all send at the same instant.
        let offset = PROBE_EVERY * i as u32 / n;
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            tokio::time::sleep(offset).await;
            let started = Instant::now();
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut k = 0usize;
            while started.elapsed() < length {
                tick.tick().await;
                let ts = now_ms();
                let (signal, base) = SIGNALS[k % SIGNALS.len()];
                k += 1;
                let items = devices
                    .iter()
                    .map(|d| Item::reading(d.clone(), ts, signal, base))
                    .collect();
                outbox.accept(items).await.expect("accept");
                let sent = Instant::now();
                new_items.notify_waiters();
                while outbox.stats().backlog_items > 0 {
                    assert!(sent.elapsed() < DEADLINE, "probe never acknowledged");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                hist.record(sent.elapsed().as_micros() as u64)
                    .expect("record");
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        hist.add(t.await.expect("probe")).expect("merge");
    }
    let mut acks = Histogram::<u64>::new(3).expect("histogram");
    for e in edges {
        if let Some(h) = e.client.stats().ack_histogram() {
            acks.add(h).expect("merge");
        }
    }
    (hist, acks)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpu_line(cores: &(f64, Vec<(&'static str, f64)>)) -> String {
    let parts: Vec<String> = cores
        .1
        .iter()
        .filter(|(_, c)| *c >= 0.005)
        .map(|(k, c)| format!("{k} {c:.2}"))
        .collect();
    format!("{:.2} cores busy: {}", cores.0, parts.join(", "))
}

// ---- the two measurements -------------------------------------------------------------------

struct ThroughputRow {
    sites: usize,
    /// Readings per phase, all sites together.
    readings: u64,
    fill: Duration,
    cold: Drain,
    warm: Drain,
    probe: Histogram<u64>,
    /// Frame written → ack read, as the clients measured it during the probe.
    acks: Histogram<u64>,
}

async fn throughput(opts: &Options, certs: &Path, sites: usize) -> ThroughputRow {
    let sites = throughput_sites(sites);
    let cluster = start_cluster(certs, &sites).await;
    let mut edges: Vec<Edge> = sites
        .iter()
        .map(|s| Edge::open(certs, s, cluster.addr, opts))
        .collect();
    // Whole cycles per device, the same at every site; the warm phase continues where the
    // cold one ended, in device time too.
    let cycle = (DEVICES_PER_SITE * SIGNALS.len()) as u64;
    let per_site = opts.readings / sites.len() as u64 / cycle * cycle;
    let t0 = start_time(2 * per_site / cycle);
    let started = Instant::now();
    futures::stream::iter(edges.iter())
        .map(|e| fill(&e.outbox, &e.site.devices, 0..per_site, t0, None))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let fill = started.elapsed();
    let cold = measure(&cluster, &mut edges, Start::Cold).await;
    let warm = Start::Warm {
        from: per_site,
        to: 2 * per_site,
        t0,
    };
    let warm = measure(&cluster, &mut edges, warm).await;
    let (probe, acks) = probe(&edges, opts.probe_for).await;
    for e in &mut edges {
        e.disconnect().await;
    }
    drop(edges);
    cluster.stop().await;
    ThroughputRow {
        sites: sites.len(),
        readings: per_site * sites.len() as u64,
        fill,
        cold,
        warm,
        probe,
        acks,
    }
}

struct CatchUp {
    readings: u64,
    fill: Duration,
    fill_groups: u64,
    drain: Drain,
}

async fn catch_up(opts: &Options, certs: &Path) -> CatchUp {
    let site = catch_up_site();
    let cluster = start_cluster(certs, std::slice::from_ref(&site)).await;
    let mut edge = Edge::open(certs, &site, cluster.addr, opts);
    // Each adapter owns a quarter of the devices and accepts whole cycles of them.
    let owned = CATCH_UP_DEVICES / CATCH_UP_ADAPTERS;
    let cycle = (owned * SIGNALS.len()) as u64;
    let per_adapter = opts.catch_up_readings / CATCH_UP_ADAPTERS as u64 / cycle * cycle;
    let t0 = start_time(per_adapter / cycle);
    let groups0 = edge.outbox.stats().fsync_groups;
    let started = Instant::now();
    let adapters = site.devices.chunks(owned).map(|devices| {
        let outbox = edge.outbox.clone();
        let devices = devices.to_vec();
        tokio::spawn(async move { fill(&outbox, &devices, 0..per_adapter, t0, None).await })
    });
    for a in futures::future::join_all(adapters).await {
        a.expect("adapter");
    }
    let fill = started.elapsed();
    let fill_groups = edge.outbox.stats().fsync_groups - groups0;
    let drain = measure(&cluster, std::slice::from_mut(&mut edge), Start::Cold).await;
    edge.disconnect().await;
    drop(edge);
    cluster.stop().await;
    CatchUp {
        readings: per_adapter * CATCH_UP_ADAPTERS as u64,
        fill,
        fill_groups,
        drain,
    }
}

/// What to run, from the command line.
struct Options {
    /// Readings in all per throughput row, split evenly over the sites.
    readings: u64,
    /// How long latency is probed per throughput row.
    probe_for: Duration,
    /// Readings buffered before the catch-up.
    catch_up_readings: u64,
    /// Where the edges' outboxes go (`--edge-dir DIR`; default `CARGO_TARGET_TMPDIR`, like
    /// the cluster's store). A diagnostic: on a real deployment every edge has its own disk.
    edge_dir: PathBuf,
    /// `--only throughput` or `--only catch-up`, for profiling one of them.
    only: Option<String>,
    /// Offer zstd (default; `--no-compress` to send frames as they are).
    compress: bool,
}

impl Options {
    fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let quick = args.iter().any(|a| a == "--quick");
        Self {
            readings: if quick { 40_000 } else { 1_000_000 },
            probe_for: Duration::from_secs(if quick { 1 } else { 5 }),
            catch_up_readings: if quick { 100_000 } else { 1_000_000 },
            edge_dir: value("--edge-dir").map_or_else(|| target_tmp().to_owned(), PathBuf::from),
            only: value("--only"),
            compress: !args.iter().any(|a| a == "--no-compress"),
        }
    }

    fn runs(&self, what: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == what)
    }
}

fn main() {
    // Warnings of the node and the clients (a session that ended, a refused frame) go to
    // stderr: a run that had them is not a clean run.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let opts = Options::from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-rt")
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(opts));
}

async fn run(opts: Options) {
    println!("# edge sync over QUIC: throughput and catch-up, end to end");
    println!("machine: {}", caretwin_tests::machine());
    println!(
        "frames: {}",
        if opts.compress {
            "zstd when agreed"
        } else {
            "uncompressed (--no-compress)"
        }
    );
    println!(
        "one process: the cluster node (64 shards, embedded store in {}) and every edge \
         (outbox in {}, SyncClient with its own site certificate) share a 2-worker tokio \
         runtime; QUIC with mutual TLS over 127.0.0.1",
        target_tmp().display(),
        opts.edge_dir.display()
    );

    let pki = bench_dir("sync-pki-", target_tmp());
    let certs: PathBuf = pki.path().join("certs");
    let mut sites: Vec<SiteIdentity> = throughput_sites(100)
        .iter()
        .chain([catch_up_site()].iter())
        .map(|s| SiteIdentity::new(s.id.clone()).expect("site id"))
        .collect();
    sites.sort();
    generate(&DevPki {
        out: certs.clone(),
        cluster_name: "localhost".into(),
        sites,
        force: false,
    })
    .expect("dev PKI");

    let mut rows = Vec::new();
    if opts.runs("throughput") {
        for n in [1, 10, 100] {
            let row = throughput(&opts, &certs, n).await;
            let what = format!("{n} site(s) × {DEVICES_PER_SITE} devices");
            println!(
                "\n{what}: {} readings accepted offline in {:.2} s ({} /s)",
                row.readings,
                row.fill.as_secs_f64(),
                thousands(row.readings as f64 / row.fill.as_secs_f64())
            );
            print_details("cold (every site connects)", &row.cold, row.readings);
            print_details("warm (connected; accepted now)", &row.warm, row.readings);
            rows.push(row);
        }
    }
    let caught = if opts.runs("catch-up") {
        let c = catch_up(&opts, &certs).await;
        println!(
            "\ncatch-up, 1 site × {CATCH_UP_DEVICES} devices: {} readings accepted offline in \
             {:.2} s ({} /s; {CATCH_UP_ADAPTERS} adapters, {READINGS_PER_CALL} per call, {} \
             fsyncs)",
            c.readings,
            c.fill.as_secs_f64(),
            thousands(c.readings as f64 / c.fill.as_secs_f64()),
            c.fill_groups
        );
        print_details("cold (the site connects)", &c.drain, c.readings);
        Some(c)
    } else {
        None
    };

    if !rows.is_empty() {
        println!("\n## Throughput, {DEVICES_PER_SITE} devices per site\n");
        println!(
            "| sites | readings | cold: sessions open p50 / max | cold: readings/s | warm: \
             readings/s | live: frame → ack p50 / p99 (frames) | live: accept → trimmed p50 / \
             p99 / max | readings per cluster commit (warm) | cores busy cold / warm |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            let mut to_session = r.cold.to_session.clone();
            to_session.sort();
            let rate = |d: &Drain| thousands(r.readings as f64 / d.total.as_secs_f64());
            println!(
                "| {} | {} | {:.2} s / {:.2} s | {} | {} | {} / {} ({}) | {} / {} / {} | {:.0} | \
                 {:.2} / {:.2} |",
                r.sites,
                thousands(r.readings as f64),
                percentile(&to_session, 0.5).as_secs_f64(),
                percentile(&to_session, 1.0).as_secs_f64(),
                rate(&r.cold),
                rate(&r.warm),
                ms(r.acks.value_at_quantile(0.5)),
                ms(r.acks.value_at_quantile(0.99)),
                r.acks.len(),
                ms(r.probe.value_at_quantile(0.5)),
                ms(r.probe.value_at_quantile(0.99)),
                ms(r.probe.max()),
                r.readings as f64 / r.warm.cluster_steps.max(1) as f64,
                r.cold.cores.0,
                r.warm.cores.0
            );
        }
    }
    if let Some(c) = caught {
        let d = &c.drain;
        let rate = c.readings as f64 / d.total.as_secs_f64();
        println!(
            "\n## Catch-up after {} buffered readings (one site, {CATCH_UP_DEVICES} devices)\n",
            thousands(c.readings as f64)
        );
        println!(
            "| edge intake (accept) readings/s | catch-up time | catch-up readings/s | \
             slowest / fastest whole second | readings per cluster commit | cores busy | of the \
             ≥ 200,000/s aim |"
        );
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {} | {:.2} s | {} | {} / {} | {:.0} | {:.2} | {:.0} % |",
            thousands(c.readings as f64 / c.fill.as_secs_f64()),
            d.total.as_secs_f64(),
            thousands(rate),
            d.per_second
                .iter()
                .min()
                .map_or("-".into(), |x| thousands(*x as f64)),
            d.per_second
                .iter()
                .max()
                .map_or("-".into(), |x| thousands(*x as f64)),
            c.readings as f64 / d.cluster_steps.max(1) as f64,
            d.cores.0,
            100.0 * rate / 200_000.0
        );
    }
}

fn print_details(what: &str, d: &Drain, readings: u64) {
    let mut per_site = d.per_site.clone();
    per_site.sort();
    let mut to_session = d.to_session.clone();
    to_session.sort();
    println!(
        "  {what}: {} readings/s, all empty after {:.2} s (per site p50 {:.2} s, max {:.2} s; \
         session open after p50 {:.2} s, max {:.2} s); readings acknowledged per whole \
         second: {:?}",
        thousands(readings as f64 / d.total.as_secs_f64()),
        d.total.as_secs_f64(),
        percentile(&per_site, 0.5).as_secs_f64(),
        percentile(&per_site, 1.0).as_secs_f64(),
        percentile(&to_session, 0.5).as_secs_f64(),
        percentile(&to_session, 1.0).as_secs_f64(),
        d.per_second
    );
    println!(
        "    cluster: {} store commits in {} fsyncs ({:.0} readings per commit); edges: {} \
         writes in {} fsyncs; sessions {}; UDP receive-buffer drops {} (at the cluster's socket {}); mail \
         delivered {}; {}",
        d.cluster_steps,
        d.cluster_groups,
        readings as f64 / d.cluster_steps.max(1) as f64,
        d.edge_requests,
        d.edge_groups,
        d.sessions,
        d.udp_drops,
        d.cluster_socket_drops,
        d.mail,
        cpu_line(&d.cores)
    );
}
