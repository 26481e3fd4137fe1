//! The edge sync over real QUIC sockets, cluster and edge in one process: commands that
//! wait for an offline edge, authorization by certificate, bad frames, compression,
//! back-pressure from a cluster that does not acknowledge, and a connection that changes
//! its address.

use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::{Clock, ManualClock};
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::mail::{Address, Body, DeviceCommand, Mail};
use caretwin_actors::model::HOUR_MS;
use caretwin_actors::store::{Key, Store};
use caretwin_actors::system::{Components, ServicesConfig, System};
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use caretwin_cluster::ingest::{CommandSignals, EdgeGateway, Ingest};
use caretwin_cluster::store::watch::{LogSignals, Watched};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_cluster::sync::dev::{DevPki, generate};
use caretwin_cluster::sync::server::SyncServer;
use caretwin_cluster::sync::tls::{SiteIdentity, server_config_from_files};
use caretwin_edge::outbox::{Item, ItemKind, Outbox, OutboxConfig};
use caretwin_edge::sync::client::{ClientSettings, Downlink, SyncClient};
use caretwin_edge::sync::tls::client_config_from_files;
use caretwin_edge::sync::transport::{FrameReader, client_endpoint, connect, send_frame};
use caretwin_proto::frame::Codec;
use caretwin_proto::v1::{
    self, ClusterFrame, EdgeFrame, ErrorCode, Hello, Reading, ReadingBatch, cluster_frame,
    edge_frame,
};
use prost::Message as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICE: &str = "t1:coffee-1";
/// Only turns a hang into a failure; every wait below ends on an observed event.
const DEADLINE: Duration = Duration::from_secs(30);

struct Nowhere;

#[async_trait::async_trait]
impl Router for Nowhere {
    async fn deliver(&self, _m: Mail) -> caretwin_actors::Result<Delivery> {
        Ok(Delivery::Delivered)
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    system: Arc<System>,
    store: Arc<dyn Store>,
    /// Appends to the tenants' command logs, as on a node.
    log_signals: Arc<LogSignals>,
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Cluster {
    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    generate(&DevPki {
        out: certs.clone(),
        cluster_name: "localhost".into(),
        sites: vec![
            SiteIdentity::new("t1:home-1").unwrap(),
            SiteIdentity::new("t1:shop-7").unwrap(),
        ],
        force: false,
    })
    .unwrap();
    let backend: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path().join("data"))).unwrap());
    let watched = Watched::new(backend, &["commands/"]);
    let log_signals = watched.signals();
    let store: Arc<dyn Store> = Arc::new(watched);
    let signals = Arc::new(CommandSignals::default());
    let manual = Arc::new(ManualClock::new(1_795_392_000_000));
    let clock: Arc<dyn Clock> = manual.clone();
    let system = Arc::new(
        System::start(Components {
            store: store.clone(),
            clock: clock.clone(),
            catalogue: Arc::new(Catalogue::builtin()),
            device_env: None,
            services: ServicesConfig::default(),
            host: HostConfig {
                shards: 4,
                idle_ms: HOUR_MS,
            },
            outside: Arc::new(EdgeGateway::new(
                store.clone(),
                signals.clone(),
                Arc::new(Nowhere),
            )),
            local_supplier: None,
        })
        .await
        .unwrap(),
    );
    let prov = DeviceMsg::Provision {
        customer: "t1:alice".into(),
        site: "t1:home-1".into(),
        model: "coffee.barista-200".into(),
    };
    assert_eq!(
        system.devices().call(DEVICE, prov).await.unwrap(),
        DeviceReply::Ok
    );
    let config = server_config_from_files(
        &certs.join("ca.pem"),
        &certs.join("cluster.pem"),
        &certs.join("cluster.key"),
    )
    .unwrap();
    let (endpoint, addr) =
        caretwin_cluster::sync::transport::bind("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let ingest = Arc::new(Ingest::new(system.clone(), store.clone(), "node-1"));
    let server = SyncServer::new(ingest, signals, clock);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(endpoint, async move {
        let _ = stopped.await;
    }));
    Cluster {
        dir,
        clock: manual,
        system,
        store,
        log_signals,
        addr,
        _stop: stop,
    }
}

fn site_files(certs: &Path, site: &str) -> (PathBuf, PathBuf) {
    let stem = format!("site-{}", site.replace(':', "+"));
    (
        certs.join(format!("{stem}.pem")),
        certs.join(format!("{stem}.key")),
    )
}

/// A raw QUIC session as `site`: control stream open, Hello sent, Welcome read. The
/// control stream is returned with the connection: dropping it would end the session.
async fn raw_session(
    c: &Cluster,
    site: &str,
) -> (quinn::Connection, quinn::SendStream, FrameReader) {
    raw_session_offering(c, site, Vec::new()).await
}

/// [`raw_session`] offering `compression` in its Hello.
async fn raw_session_offering(
    c: &Cluster,
    site: &str,
    compression: Vec<i32>,
) -> (quinn::Connection, quinn::SendStream, FrameReader) {
    let (cert, key) = site_files(&c.certs(), site);
    let config = client_config_from_files(&c.certs().join("ca.pem"), &cert, &key).unwrap();
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let conn = connect(&endpoint, c.addr, "localhost").await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = EdgeFrame {
        body: Some(edge_frame::Body::Hello(Hello {
            protocol_version: v1::SyncProtocolVersion::V1 as u32,
            compression: compression.clone(),
            ..Default::default()
        })),
    };
    send_frame(&mut send, &hello).await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 20);
    let welcome = reader.next::<ClusterFrame>().await.unwrap().unwrap();
    let Some(cluster_frame::Body::Welcome(w)) = welcome.body else {
        panic!("expected Welcome, got {welcome:?}")
    };
    let expected = if compression.contains(&(v1::Compression::Zstd as i32)) {
        v1::Compression::Zstd
    } else {
        v1::Compression::None
    };
    assert_eq!(
        w.compression, expected as i32,
        "the cluster agrees on what was offered"
    );
    (conn, send, reader)
}

/// Sends raw bytes on a new data stream and reads the one frame that answers.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> ClusterFrame {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 20);
    tokio::time::timeout(DEADLINE, reader.next::<ClusterFrame>())
        .await
        .expect("an answer")
        .unwrap()
        .expect("a frame")
}

fn batch(device: &str, seq: u64) -> EdgeFrame {
    EdgeFrame {
        body: Some(edge_frame::Body::Batch(ReadingBatch {
            batch_id: seq,
            readings: vec![Reading {
                device_id: device.into(),
                signal: "brew_pressure".into(),
                value: 9.1,
                device_time_ms: 1_795_392_000_000,
                seq,
                unit: None,
            }],
        })),
    }
}

/// A batch of `n` readings of `device` from `first`.
fn many_readings(device: &str, first: u64, n: u64) -> EdgeFrame {
    EdgeFrame {
        body: Some(edge_frame::Body::Batch(ReadingBatch {
            batch_id: first,
            readings: (first..first + n)
                .map(|seq| Reading {
                    device_id: device.into(),
                    signal: "brew_pressure".into(),
                    value: 9.0 + (seq % 7) as f64 * 0.01,
                    device_time_ms: 1_795_392_000_000 + seq as i64,
                    seq,
                    unit: None,
                })
                .collect(),
        })),
    }
}

fn code(frame: &ClusterFrame) -> Vec<ErrorCode> {
    match &frame.body {
        Some(cluster_frame::Body::Ack(a)) => a
            .rejections
            .iter()
            .chain(&a.frame_error)
            .map(|r| ErrorCode::try_from(r.code).unwrap())
            .collect(),
        Some(cluster_frame::Body::Error(e)) => vec![ErrorCode::try_from(e.code).unwrap()],
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cannot_write_another_sites_device_over_quic() {
    let c = cluster().await;
    let (shop, _control, _reader) = raw_session(&c, "t1:shop-7").await;
    let reply = exchange(&shop, &caretwin_proto::frame::encode(&batch(DEVICE, 1))).await;
    assert_eq!(code(&reply), [ErrorCode::NotOwner]);
    assert_eq!(c.store.high_water(&Key::new(DEVICE)).await.unwrap(), 0);
    // The owner can.
    let (home, _control, _reader) = raw_session(&c, "t1:home-1").await;
    let reply = exchange(&home, &caretwin_proto::frame::encode(&batch(DEVICE, 1))).await;
    assert!(code(&reply).is_empty(), "{reply:?}");
    assert_eq!(c.store.high_water(&Key::new(DEVICE)).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_their_codes_and_the_node_keeps_serving() {
    let c = cluster().await;
    let (home, _control, _reader) = raw_session(&c, "t1:home-1").await;
    // Not protobuf.
    let reply = exchange(&home, &[5, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(code(&reply), [ErrorCode::MalformedFrame]);
    // A length prefix far beyond the limit: refused before anything is buffered.
    let mut huge = Vec::new();
    prost::encoding::encode_varint(1 << 30, &mut huge);
    let reply = exchange(&home, &huge).await;
    assert_eq!(code(&reply), [ErrorCode::FrameTooLarge]);
    // A control frame on a data stream.
    let hb = EdgeFrame {
        body: Some(edge_frame::Body::Heartbeat(Default::default())),
    };
    let reply = exchange(&home, &caretwin_proto::frame::encode(&hb)).await;
    assert_eq!(code(&reply), [ErrorCode::ProtocolViolation]);
    // A compressed frame in a session that did not agree on compression.
    let mut zstd = Codec::new(v1::Compression::Zstd, 1 << 20);
    let big = many_readings(DEVICE, 1, 200);
    let compressed = zstd.encode(&big);
    assert!(compressed.len() < caretwin_proto::frame::encode(&big).len());
    let reply = exchange(&home, &compressed).await;
    assert_eq!(code(&reply), [ErrorCode::UnsupportedCompression]);
    assert_eq!(c.store.high_water(&Key::new(DEVICE)).await.unwrap(), 0);
    // In a session that did: a payload that inflates beyond its declared size.
    let (zhome, _zcontrol, _zreader) =
        raw_session_offering(&c, "t1:home-1", vec![v1::Compression::Zstd as i32]).await;
    let plain = big.encode_to_vec();
    let bomb = EdgeFrame {
        body: Some(edge_frame::Body::Compressed(v1::CompressedFrame {
            algorithm: v1::Compression::Zstd as i32,
            uncompressed_size: 64,
            payload: zstd::bulk::compress(&plain, 1).unwrap().into(),
        })),
    };
    let reply = exchange(&zhome, &caretwin_proto::frame::encode(&bomb)).await;
    assert_eq!(code(&reply), [ErrorCode::MalformedFrame]);
    assert_eq!(c.store.high_water(&Key::new(DEVICE)).await.unwrap(), 0);
    // The honest compressed frame is applied whole.
    let reply = exchange(&zhome, &compressed).await;
    assert!(code(&reply).is_empty(), "{reply:?}");
    assert_eq!(c.store.high_water(&Key::new(DEVICE)).await.unwrap(), 200);
    // The same site's newer session, and another site, are still served.
    let reply = exchange(
        &zhome,
        &caretwin_proto::frame::encode(&many_readings(DEVICE, 201, 1)),
    )
    .await;
    assert!(code(&reply).is_empty(), "{reply:?}");
    let (shop, _shop_control, _shop_reader) = raw_session(&c, "t1:shop-7").await;
    let reply = exchange(
        &shop,
        &caretwin_proto::frame::encode(&batch("t1:nobody", 1)),
    )
    .await;
    assert_eq!(code(&reply), [ErrorCode::UnknownDevice]);
}

/// Waits until `check` holds, polling the system; fails after [`DEADLINE`].
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let until = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An edge for site t1:home-1: its outbox, the downlink it hands to devices, and a stop.
struct Edge {
    stats: Arc<caretwin_edge::sync::client::ClientStats>,
    progress: Arc<tokio::sync::Notify>,
    outbox: Arc<Outbox>,
    new_items: Arc<tokio::sync::Notify>,
    downlink: tokio::sync::mpsc::Receiver<Downlink>,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
}

fn start_edge(c: &Cluster) -> Edge {
    start_edge_at(c.addr, &c.certs(), &c.dir.path().join("edge"), true).0
}

/// An edge of t1:home-1 syncing with the cluster at `cluster`, its outbox under `dir`,
/// offering compression or not; with its QUIC endpoint.
fn start_edge_at(
    cluster: SocketAddr,
    certs: &Path,
    dir: &Path,
    compress: bool,
) -> (Edge, quinn::Endpoint) {
    let outbox = Arc::new(Outbox::open(&OutboxConfig::at(dir.join("outbox"))).unwrap());
    let (cert, key) = site_files(certs, "t1:home-1");
    let config = client_config_from_files(&certs.join("ca.pem"), &cert, &key).unwrap();
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let new_items = Arc::new(tokio::sync::Notify::new());
    let (tx, downlink) = tokio::sync::mpsc::channel(16);
    let client = SyncClient::new(
        ClientSettings {
            site_id: "t1:home-1".into(),
            nodes: vec![cluster.to_string()],
            server_name: "localhost".into(),
            max_backoff: Duration::from_millis(500),
            compress,
        },
        endpoint.clone(),
        outbox.clone(),
        new_items.clone(),
        tx,
    );
    let stats = client.stats();
    let progress = client.command_progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        client
            .run(async move {
                let _ = stopped.await;
            })
            .await
    });
    let edge = Edge {
        stats,
        progress,
        outbox,
        new_items,
        downlink,
        stop,
        running,
    };
    (edge, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_set_while_offline_reaches_the_device_and_the_delta_closes() {
    let c = cluster().await;
    let set = |value: &str, expected| DeviceMsg::SetDesired {
        field: "brew_temp".into(),
        value: value.into(),
        expected_version: expected,
    };
    assert_eq!(
        c.system
            .devices()
            .call(DEVICE, set("93", None))
            .await
            .unwrap(),
        DeviceReply::Version(1)
    );
    assert_eq!(
        c.system
            .devices()
            .call(DEVICE, set("94", Some(1)))
            .await
            .unwrap(),
        DeviceReply::Version(2)
    );
    c.system.settle(5).await.unwrap();

    let mut edge = start_edge(&c);
    // Both snapshots arrive, in order; the device keeps the newest version.
    let mut newest = (String::new(), 0);
    while newest.1 < 2 {
        let down = tokio::time::timeout(DEADLINE, edge.downlink.recv())
            .await
            .unwrap()
            .unwrap();
        let Downlink::Desired { device, fields } = down else {
            panic!("expected desired state, got {down:?}")
        };
        assert_eq!(device, DEVICE);
        let (f, v, version) = fields.into_iter().next().unwrap();
        assert_eq!(f, "brew_temp");
        assert!(version > newest.1, "versions only move forward");
        newest = (v, version);
    }
    assert_eq!(newest.0, "94", "the cloud's latest version wins");

    // The device applies it and reports it; the reported state flows up and the delta closes.
    let delta = || {
        let sys = c.system.clone();
        async move {
            sys.devices()
                .inspect(DEVICE, |t| t.unwrap().delta().len())
                .await
                .unwrap()
        }
    };
    assert_eq!(delta().await, 1);
    edge.outbox
        .accept(vec![Item::new(
            DEVICE,
            1_795_392_000_000,
            ItemKind::Reported {
                field: "brew_temp".into(),
                value: caretwin_edge::outbox::FieldValue::Text("94".into()),
            },
        )])
        .await
        .unwrap();
    edge.new_items.notify_waiters();
    eventually("the delta to close", || async { delta().await == 0 }).await;
    // The twin applies the report before the cluster acks it: the edge may read the ack
    // a moment after the delta closed.
    let stats = edge.stats.clone();
    eventually("the report's ack", || async {
        stats.ack_latency().is_some()
    })
    .await;
    let (frames, p50, p99) = edge
        .stats
        .ack_latency()
        .expect("the report's ack was timed");
    assert!(frames >= 1 && p50 <= p99, "{frames} {p50:?} {p99:?}");
    let _ = edge.stop.send(());
    edge.running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_while_the_edge_is_offline_arrives_after_it_connects() {
    let c = cluster().await;
    // The customer twin asks for a descale while the edge is away.
    let cmd = Mail {
        id: "t1:alice/1".into(),
        from: Address::Customer("t1:alice".into()),
        to: Address::Device(DEVICE.into()),
        body: Body::Command(DeviceCommand {
            command_id: "t1:alice/case-1/step-0".into(),
            device: DEVICE.into(),
            name: "descale".into(),
            args: vec![],
            expires_at_ms: u64::MAX / 2,
            priority: Default::default(),
            action: None,
        }),
    };
    let r = c
        .system
        .devices()
        .call(DEVICE, DeviceMsg::Mail(Box::new(cmd)))
        .await
        .unwrap();
    assert_eq!(r, DeviceReply::Ok);
    c.system.settle(5).await.unwrap();
    let state = || {
        let sys = c.system.clone();
        async move {
            sys.devices()
                .inspect(DEVICE, |t| t.unwrap().commands()[0].state.clone())
                .await
                .unwrap()
        }
    };
    assert_eq!(
        state().await,
        "queued",
        "never claimed delivered while the edge is away"
    );

    // The edge comes online.
    let mut edge = start_edge(&c);
    let outbox = edge.outbox.clone();
    let down = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
        .unwrap();
    let Downlink::Command(got) = down else {
        panic!("expected the command, got {down:?}")
    };
    assert_eq!(
        (got.device.as_str(), got.name.as_str()),
        (DEVICE, "descale")
    );
    eventually("sent_to_edge", || async { state().await == "sent_to_edge" }).await;
    assert_eq!(
        outbox.commands_pending().await.unwrap().len(),
        1,
        "stored durably at the edge"
    );
    // The adapter hands it to the device and says so; the cluster hears it.
    assert!(
        outbox
            .set_command_state(
                &got.command_id,
                caretwin_edge::outbox::CommandState::DeliveredToDevice
            )
            .await
            .unwrap()
    );
    edge.progress.notify_one();
    eventually("delivered_to_device", || async {
        state().await == "delivered_to_device"
    })
    .await;

    // The device runs it; the result travels up as an item of the device's log.
    outbox
        .accept(vec![Item::new(
            DEVICE,
            1_795_392_000_000,
            ItemKind::CommandResult {
                command_id: got.command_id.clone(),
                succeeded: true,
                expired: false,
                cancelled: false,
                detail: "cycle complete".into(),
            },
        )])
        .await
        .unwrap();
    edge.new_items.notify_waiters();
    eventually("succeeded", || async { state().await == "succeeded" }).await;
    eventually("the result trimmed from the outbox", || async {
        outbox.stats().backlog_items == 0
    })
    .await;
    let _ = edge.stop.send(());
    edge.running.await.unwrap();
}

/// Provisions `devices` coffee machines `t1:coffee-<prefix><n>` on t1:home-1 and puts
/// `per_device` readings of each in `outbox`.
async fn provision_and_fill(
    c: &Cluster,
    outbox: &Outbox,
    prefix: &str,
    devices: usize,
    per_device: usize,
) {
    for d in 0..devices {
        let device = format!("t1:coffee-{prefix}{d}");
        let prov = DeviceMsg::Provision {
            customer: "t1:alice".into(),
            site: "t1:home-1".into(),
            model: "coffee.barista-200".into(),
        };
        assert_eq!(
            c.system.devices().call(&device, prov).await.unwrap(),
            DeviceReply::Ok
        );
        let items = (0..per_device)
            .map(|i| {
                Item::new(
                    device.clone(),
                    1_795_392_000_000 + i as u64 * 1000,
                    ItemKind::Reading {
                        signal: "brew_pressure".into(),
                        value: 9.0 + (i % 13) as f64 * 0.01,
                    },
                )
            })
            .collect();
        outbox.accept(items).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_sessions_send_fewer_bytes_for_the_same_readings() {
    let c = cluster().await;
    let mut sent = Vec::new();
    for (n, compress) in [false, true].into_iter().enumerate() {
        let dir = c.dir.path().join(format!("edge-{n}"));
        let (edge, _endpoint) = start_edge_at(c.addr, &c.certs(), &dir, compress);
        // Each run its own 20 devices (names of the same length) x 300 readings.
        let prefix = ["a", "b"][n];
        provision_and_fill(&c, &edge.outbox, prefix, 20, 300).await;
        edge.new_items.notify_waiters();
        let outbox = edge.outbox.clone();
        eventually("every reading acknowledged", || async {
            outbox.stats().backlog_items == 0
        })
        .await;
        for d in 0..20 {
            let hw = c
                .store
                .high_water(&Key::new(format!("t1:coffee-{prefix}{d}")))
                .await
                .unwrap();
            assert_eq!(hw, 300, "device {prefix}{d}");
        }
        sent.push(
            edge.stats
                .bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let _ = edge.stop.send(());
        edge.running.await.unwrap();
    }
    let (plain, compressed) = (sent[0], sent[1]);
    assert!(
        compressed * 3 < plain,
        "zstd frames: {compressed} bytes, plain: {plain} bytes"
    );
}

/// A stand-in cluster on a real QUIC endpoint that speaks the protocol but acknowledges
/// only when the test says so: what the edge sends while the cluster is slow.
struct SlowCluster {
    addr: SocketAddr,
    /// Frames as they arrive: (data stream index, the frame).
    frames: tokio::sync::mpsc::UnboundedReceiver<(usize, EdgeFrame)>,
    /// Heartbeats seen on the control stream.
    heartbeats: tokio::sync::mpsc::UnboundedReceiver<()>,
    /// Every other frame of the control stream.
    control: tokio::sync::mpsc::UnboundedReceiver<EdgeFrame>,
    /// Acks to send, per data stream, in order.
    acks: Vec<tokio::sync::mpsc::UnboundedSender<ClusterFrame>>,
    _endpoint: quinn::Endpoint,
}

async fn slow_cluster(certs: &Path, limits: v1::SessionLimits) -> SlowCluster {
    slow_cluster_sending(certs, limits, Vec::new()).await
}

/// [`slow_cluster`] that sends `commands` on the control stream after its Welcome.
async fn slow_cluster_sending(
    certs: &Path,
    limits: v1::SessionLimits,
    commands: Vec<v1::Command>,
) -> SlowCluster {
    let config = server_config_from_files(
        &certs.join("ca.pem"),
        &certs.join("cluster.pem"),
        &certs.join("cluster.key"),
    )
    .unwrap();
    let (endpoint, addr) =
        caretwin_cluster::sync::transport::bind("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let (frame_tx, frames) = tokio::sync::mpsc::unbounded_channel();
    let (hb_tx, heartbeats) = tokio::sync::mpsc::unbounded_channel();
    let (control_tx, control) = tokio::sync::mpsc::unbounded_channel();
    let lanes = limits.max_data_streams as usize;
    let (ack_txs, mut ack_rxs): (Vec<_>, Vec<_>) = (0..lanes)
        .map(|_| tokio::sync::mpsc::unbounded_channel::<ClusterFrame>())
        .unzip();
    let server = endpoint.clone();
    tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut csend, crecv) = conn.accept_bi().await.unwrap();
        let mut creader = FrameReader::new(crecv, 1 << 20);
        let _hello = creader.next::<EdgeFrame>().await.unwrap().unwrap();
        let welcome = ClusterFrame {
            body: Some(cluster_frame::Body::Welcome(v1::Welcome {
                site_id: "t1:home-1".into(),
                limits: Some(limits),
                ..Default::default()
            })),
        };
        send_frame(&mut csend, &welcome).await.unwrap();
        for c in commands {
            let frame = ClusterFrame {
                body: Some(cluster_frame::Body::Command(c)),
            };
            send_frame(&mut csend, &frame).await.unwrap();
        }
        tokio::spawn(async move {
            // Alive, just slow: heartbeats are answered, or the edge would leave.
            while let Ok(Some(f)) = creader.next::<EdgeFrame>().await {
                if let Some(edge_frame::Body::Heartbeat(h)) = f.body {
                    let ack = ClusterFrame {
                        body: Some(cluster_frame::Body::HeartbeatAck(v1::HeartbeatAck {
                            echo_sent_at_ms: h.sent_at_ms,
                            server_time_ms: h.sent_at_ms,
                        })),
                    };
                    send_frame(&mut csend, &ack).await.unwrap();
                    let _ = hb_tx.send(());
                } else {
                    let _ = control_tx.send(f);
                }
            }
        });
        for lane in 0..lanes {
            let (mut send, recv) = conn.accept_bi().await.unwrap();
            let frame_tx = frame_tx.clone();
            let mut acks = ack_rxs.remove(0);
            tokio::spawn(async move {
                let mut reader = FrameReader::new(recv, 1 << 20);
                while let Ok(Some(f)) = reader.next::<EdgeFrame>().await {
                    let _ = frame_tx.send((lane, f));
                }
            });
            tokio::spawn(async move {
                while let Some(ack) = acks.recv().await {
                    send_frame(&mut send, &ack).await.unwrap();
                }
            });
        }
        conn.closed().await;
    });
    SlowCluster {
        addr,
        frames,
        heartbeats,
        control,
        acks: ack_txs,
        _endpoint: endpoint,
    }
}

async fn next_frame(slow: &mut SlowCluster) -> (usize, EdgeFrame) {
    tokio::time::timeout(DEADLINE, slow.frames.recv())
        .await
        .expect("a frame")
        .unwrap()
}

/// The ack a durable cluster would send for `frame`: every device's last seq in it.
fn ack_for(frame: &EdgeFrame) -> ClusterFrame {
    let mut marks: std::collections::BTreeMap<String, u64> = Default::default();
    match &frame.body {
        Some(edge_frame::Body::Batch(b)) => {
            for r in &b.readings {
                marks.insert(r.device_id.clone(), r.seq);
            }
        }
        Some(edge_frame::Body::Event(e)) => {
            marks.insert(e.device_id.clone(), e.seq);
        }
        _ => {}
    }
    ClusterFrame {
        body: Some(cluster_frame::Body::Ack(v1::Ack {
            watermarks: marks
                .into_iter()
                .map(|(device_id, persisted_seq)| v1::DeviceWatermark {
                    device_id,
                    persisted_seq,
                })
                .collect(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_does_not_ack_holds_the_edge_to_its_window() {
    let c = cluster().await;
    let limits = v1::SessionLimits {
        max_batch_readings: 10,
        max_frame_bytes: 1 << 20,
        heartbeat_interval_ms: 100,
        max_data_streams: 2,
        max_in_flight_frames: 3,
        max_clock_skew_ms: 60_000,
    };
    let mut slow = slow_cluster(&c.certs(), limits).await;
    let (edge, _endpoint) = start_edge_at(slow.addr, &c.certs(), &c.dir.path().join("edge"), false);
    // 40 devices x 50 readings = 200 frames of 10: far more than the window.
    provision_and_fill(&c, &edge.outbox, "x", 40, 50).await;
    edge.new_items.notify_waiters();
    let total = edge.outbox.stats().backlog_items;
    assert_eq!(total, 2000);

    // A full window on both streams, and then nothing: the edge waits for acks.
    let mut unacked: Vec<std::collections::VecDeque<EdgeFrame>> = vec![Default::default(); 2];
    for _ in 0..6 {
        let (lane, f) = next_frame(&mut slow).await;
        unacked[lane].push_back(f);
    }
    assert_eq!(unacked[0].len(), 3, "each stream holds exactly its window");
    assert_eq!(unacked[1].len(), 3);
    // Several heartbeats later (the edge is alive and had every chance to send), still 6.
    for _ in 0..5 {
        tokio::time::timeout(DEADLINE, slow.heartbeats.recv())
            .await
            .unwrap()
            .unwrap();
    }
    assert!(
        slow.frames.try_recv().is_err(),
        "no frame beyond the window"
    );
    assert_eq!(
        edge.stats
            .frames_sent
            .load(std::sync::atomic::Ordering::Relaxed),
        6
    );
    assert_eq!(
        edge.outbox.stats().backlog_items,
        total,
        "nothing trimmed without an ack"
    );

    // Each ack opens the window by one frame on its stream; acked items leave the outbox.
    let mut acked_items = 0;
    for round in 0..10 {
        let lane = round % 2;
        let f = unacked[lane].pop_front().unwrap();
        if let Some(edge_frame::Body::Batch(b)) = &f.body {
            acked_items += b.readings.len() as u64;
        }
        slow.acks[lane].send(ack_for(&f)).unwrap();
        let (got_lane, f) = next_frame(&mut slow).await;
        assert_eq!(
            got_lane, lane,
            "the freed slot is refilled on its own stream"
        );
        unacked[lane].push_back(f);
        assert!(unacked.iter().all(|q| q.len() <= 3));
    }
    let outbox = edge.outbox.clone();
    eventually("acked items trimmed", || async {
        outbox.stats().backlog_items == total - acked_items
    })
    .await;
    let _ = edge.stop.send(());
    edge.running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_survives_the_edge_changing_its_address() {
    let c = cluster().await;
    let (edge, endpoint) = start_edge_at(c.addr, &c.certs(), &c.dir.path().join("edge"), true);
    provision_and_fill(&c, &edge.outbox, "x", 4, 100).await;
    edge.new_items.notify_waiters();
    let outbox = edge.outbox.clone();
    eventually("the first readings acknowledged", || async {
        outbox.stats().backlog_items == 0
    })
    .await;
    let before = endpoint.local_addr().unwrap();

    // The site's router gives it a new port (a NAT rebinding, a Wi-Fi to LTE failover).
    endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    assert_ne!(endpoint.local_addr().unwrap(), before);
    let items = (0..4)
        .flat_map(|d| {
            (0..100).map(move |i| {
                Item::new(
                    format!("t1:coffee-x{d}"),
                    1_795_392_100_000 + i as u64 * 1000,
                    ItemKind::Reading {
                        signal: "brew_pressure".into(),
                        value: 9.05,
                    },
                )
            })
        })
        .collect();
    edge.outbox.accept(items).await.unwrap();
    edge.new_items.notify_waiters();
    eventually("the readings after the move acknowledged", || async {
        outbox.stats().backlog_items == 0
    })
    .await;
    for d in 0..4 {
        let hw = c
            .store
            .high_water(&Key::new(format!("t1:coffee-x{d}")))
            .await
            .unwrap();
        assert_eq!(hw, 200);
    }
    assert_eq!(
        edge.stats
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the same QUIC connection carried on: no new session"
    );
    let _ = edge.stop.send(());
    edge.running.await.unwrap();
}

/// A command of the customer twin for `DEVICE`, expiring at `expires_at_ms`.
async fn queue_command(c: &Cluster, n: u32, expires_at_ms: u64) {
    let cmd = Mail {
        id: format!("t1:alice/{n}"),
        from: Address::Customer("t1:alice".into()),
        to: Address::Device(DEVICE.into()),
        body: Body::Command(DeviceCommand {
            command_id: format!("t1:alice/case-1/step-{n}"),
            device: DEVICE.into(),
            name: "descale".into(),
            args: vec![],
            expires_at_ms,
            priority: Default::default(),
            action: None,
        }),
    };
    let r = c
        .system
        .devices()
        .call(DEVICE, DeviceMsg::Mail(Box::new(cmd)))
        .await
        .unwrap();
    assert_eq!(r, DeviceReply::Ok);
    c.system.settle(5).await.unwrap();
}

async fn command_state(c: &Cluster, n: usize) -> String {
    c.system
        .devices()
        .inspect(DEVICE, move |t| t.unwrap().commands()[n].state.clone())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_whose_time_runs_out_end_as_expired_never_as_delivered() {
    let c = cluster().await;
    let t0 = c.clock.now_ms();
    // 1. Queued while the site is offline, and the site stays away past the deadline: the
    //    twin ends it itself, and the edge never receives it.
    queue_command(&c, 1, t0 + HOUR_MS).await;
    assert_eq!(command_state(&c, 0).await, "queued");
    c.clock.advance(2 * HOUR_MS);
    c.system.settle(5).await.unwrap();
    assert_eq!(command_state(&c, 0).await, "expired");

    // The edge never got it: nothing was sent while it was queued past its deadline.
    let edge = start_edge(&c);
    let outbox = edge.outbox.clone();
    eventually("a session", || async {
        edge.stats
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    assert!(outbox.commands_pending().await.unwrap().is_empty());
    assert_eq!(command_state(&c, 0).await, "expired");
    let _ = edge.stop.send(());
    edge.running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_ends_a_command_it_received_too_late_as_expired() {
    let c = cluster().await;
    let limits = v1::SessionLimits {
        max_batch_readings: 100,
        max_frame_bytes: 1 << 20,
        heartbeat_interval_ms: 100,
        max_data_streams: 1,
        max_in_flight_frames: 4,
        max_clock_skew_ms: 60_000,
    };
    let late = v1::Command {
        command_id: "t1:alice/case-9/step-0".into(),
        position: 1,
        device_id: DEVICE.into(),
        payload: Some(v1::CommandPayload {
            kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
                name: "descale".into(),
                ..Default::default()
            })),
        }),
        priority: v1::Priority::Normal as i32,
        issued_at_ms: 1_000,
        // Long past by the edge's clock.
        expires_at_ms: 2_000,
    };
    let mut slow = slow_cluster_sending(&c.certs(), limits, vec![late]).await;
    let (mut edge, _endpoint) =
        start_edge_at(slow.addr, &c.certs(), &c.dir.path().join("edge"), false);
    // Stored, confirmed as SENT_TO_EDGE (the cluster must stop resending it) ...
    let status = tokio::time::timeout(DEADLINE, slow.control.recv())
        .await
        .unwrap()
        .unwrap();
    let Some(edge_frame::Body::CommandStatus(st)) = status.body else {
        panic!("expected a command status, got {status:?}")
    };
    assert_eq!(st.state, v1::CommandState::SentToEdge as i32);
    // ... never handed to the device, and ended in the device's log as EXPIRED.
    let (lane, frame) = next_frame(&mut slow).await;
    let Some(edge_frame::Body::Event(e)) = &frame.body else {
        panic!("expected the result event, got {frame:?}")
    };
    let Some(v1::device_event::Kind::CommandResult(r)) = &e.kind else {
        panic!("expected a command result, got {e:?}")
    };
    assert_eq!(r.command_id, "t1:alice/case-9/step-0");
    assert_eq!(r.outcome, v1::CommandOutcome::Expired as i32);
    assert!(
        edge.downlink.try_recv().is_err(),
        "nothing reached the device"
    );
    slow.acks[lane].send(ack_for(&frame)).unwrap();
    let outbox = edge.outbox.clone();
    eventually("the result acknowledged", || async {
        outbox.commands_pending().await.unwrap().is_empty() && outbox.stats().backlog_items == 0
    })
    .await;
    let _ = edge.stop.send(());
    edge.running.await.unwrap();
}

/// The next state a command watch reports; `None` once the stream ended.
async fn next_state(
    watch: &mut std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<v1::CommandTransition, tonic::Status>> + Send>,
    >,
) -> Option<v1::CommandState> {
    use futures::StreamExt as _;
    tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("a transition in time")
        .map(|t| v1::CommandState::try_from(t.unwrap().state).unwrap())
}

/// A call as the gRPC interceptor hands it to a service: from an integrator of t1 that
/// may send and read commands.
fn call<T>(msg: T) -> tonic::Request<T> {
    use caretwin_cluster::grpc::auth::{Principal, Scope};
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(Principal {
        name: "crm".into(),
        tenant: "t1".into(),
        scopes: [Scope::CommandsRead, Scope::CommandsWrite].into(),
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integrators_command_is_watched_from_queued_to_succeeded_through_a_real_edge() {
    use caretwin_cluster::grpc::commands::{CommandApi, Commands};
    use caretwin_proto::v1::command_service_server::CommandService;
    let c = cluster().await;
    let api = CommandApi(Arc::new(Commands::new(
        c.system.clone(),
        c.store.clone(),
        c.log_signals.clone(),
        Arc::new(Catalogue::builtin()),
        c.clock.clone(),
    )));
    // The edge judges expiry by its own (wall) clock: the cluster's must agree.
    c.clock.set(caretwin_cluster::node::now_ms());
    let sent = api
        .send_command(call(v1::SendCommandRequest {
            idempotency_key: "descale-1".into(),
            device_id: DEVICE.into(),
            payload: Some(v1::CommandPayload {
                kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
                    name: "descale".into(),
                    args: Default::default(),
                })),
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    c.system.settle(5).await.unwrap();
    let mut watch = api
        .watch_command(call(v1::WatchCommandRequest {
            command_id: sent.command_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_state(&mut watch).await, Some(v1::CommandState::Queued));

    // The edge comes online and stores it: the watcher hears it.
    let mut edge = start_edge(&c);
    let down = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
        .unwrap();
    let Downlink::Command(got) = down else {
        panic!("expected the command, got {down:?}")
    };
    assert_eq!(got.command_id, sent.command_id);
    assert_eq!(
        next_state(&mut watch).await,
        Some(v1::CommandState::SentToEdge)
    );
    assert!(
        edge.outbox
            .set_command_state(
                &got.command_id,
                caretwin_edge::outbox::CommandState::DeliveredToDevice
            )
            .await
            .unwrap()
    );
    edge.progress.notify_one();
    assert_eq!(
        next_state(&mut watch).await,
        Some(v1::CommandState::DeliveredToDevice)
    );
    edge.outbox
        .accept(vec![Item::new(
            DEVICE,
            1_795_392_000_000,
            ItemKind::CommandResult {
                command_id: got.command_id.clone(),
                succeeded: true,
                expired: false,
                cancelled: false,
                detail: "cycle complete".into(),
            },
        )])
        .await
        .unwrap();
    edge.new_items.notify_waiters();
    assert_eq!(
        next_state(&mut watch).await,
        Some(v1::CommandState::Succeeded)
    );
    assert_eq!(
        next_state(&mut watch).await,
        None,
        "the stream ends after the final state"
    );
    let record = api
        .get_command(call(v1::GetCommandRequest {
            command_id: sent.command_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state, v1::CommandState::Succeeded as i32);
    assert_eq!(record.history.len(), 4);
    assert_eq!(record.history[3].detail, "cycle complete");
    let _ = edge.stop.send(());
    let _ = edge.running.await;
}

/// The command service over `c`'s twins, its clock set to the wall clock (the edge judges
/// expiry by its own).
fn command_api(c: &Cluster) -> caretwin_cluster::grpc::commands::CommandApi {
    use caretwin_cluster::grpc::commands::{CommandApi, Commands};
    c.clock.set(caretwin_cluster::node::now_ms());
    CommandApi(Arc::new(Commands::new(
        c.system.clone(),
        c.store.clone(),
        c.log_signals.clone(),
        Arc::new(Catalogue::builtin()),
        c.clock.clone(),
    )))
}

/// Sends a descale to `DEVICE` with `key`, at `priority`.
async fn send_descale(
    c: &Cluster,
    api: &caretwin_cluster::grpc::commands::CommandApi,
    key: &str,
    priority: v1::Priority,
) -> v1::CommandRecord {
    use caretwin_proto::v1::command_service_server::CommandService;
    let sent = api
        .send_command(call(v1::SendCommandRequest {
            idempotency_key: key.into(),
            device_id: DEVICE.into(),
            payload: Some(v1::CommandPayload {
                kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
                    name: "descale".into(),
                    args: Default::default(),
                })),
            }),
            priority: priority as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    c.system.settle(5).await.unwrap();
    sent
}

async fn cancel(
    c: &Cluster,
    api: &caretwin_cluster::grpc::commands::CommandApi,
    id: &str,
) -> Result<v1::CommandRecord, tonic::Status> {
    cancel_with_key(c, api, id, "").await
}

async fn cancel_with_key(
    c: &Cluster,
    api: &caretwin_cluster::grpc::commands::CommandApi,
    id: &str,
    key: &str,
) -> Result<v1::CommandRecord, tonic::Status> {
    use caretwin_proto::v1::command_service_server::CommandService;
    let r = api
        .cancel_command(call(v1::CancelCommandRequest {
            command_id: id.into(),
            reason: "customer called".into(),
            idempotency_key: key.into(),
        }))
        .await
        .map(tonic::Response::into_inner);
    c.system.settle(5).await.unwrap();
    r
}

async fn record(api: &caretwin_cluster::grpc::commands::CommandApi, id: &str) -> v1::CommandRecord {
    use caretwin_proto::v1::command_service_server::CommandService;
    api.get_command(call(v1::GetCommandRequest {
        command_id: id.into(),
    }))
    .await
    .unwrap()
    .into_inner()
}

fn states(r: &v1::CommandRecord) -> Vec<v1::CommandState> {
    r.history
        .iter()
        .map(|t| v1::CommandState::try_from(t.state).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_held_on_the_edge_is_cancelled_at_both_ends_and_never_reaches_the_device() {
    use v1::CommandState as S;
    let c = cluster().await;
    let api = command_api(&c);
    let sent = send_descale(&c, &api, "descale-1", v1::Priority::High).await;
    let mut edge = start_edge(&c);
    // The edge stores it and hands it to the adapter, which holds it (the device is busy).
    let down = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
        .unwrap();
    let Downlink::Command(got) = down else {
        panic!("expected the command, got {down:?}")
    };
    assert_eq!(got.command_id, sent.command_id);
    let stored = edge.outbox.commands_pending().await.unwrap();
    assert_eq!(
        stored[0].priority,
        caretwin_edge::outbox::Priority::High,
        "the command's priority travels to the edge"
    );
    eventually("sent_to_edge", || async {
        record(&api, &sent.command_id).await.state == S::SentToEdge as i32
    })
    .await;

    // Cancelled after SENT_TO_EDGE: the answer is the command as it stands; the edge is told.
    let r = cancel(&c, &api, &sent.command_id).await.unwrap();
    assert_eq!(r.state, S::SentToEdge as i32);
    // Asked again (the edge may have answered meanwhile): the edge is told only once.
    let r = cancel(&c, &api, &sent.command_id).await.unwrap();
    assert!(
        [S::SentToEdge as i32, S::Cancelled as i32].contains(&r.state),
        "{r:?}"
    );
    eventually("cancelled at the cluster", || async {
        record(&api, &sent.command_id).await.state == S::Cancelled as i32
    })
    .await;
    let r = record(&api, &sent.command_id).await;
    assert_eq!(
        states(&r),
        [S::Queued, S::SentToEdge, S::SentToEdge, S::Cancelled],
        "the request is in the history, logged once however often it was asked"
    );
    assert_eq!(r.history[2].detail, "cancel requested: customer called");
    assert_eq!(
        r.history[3].detail, "cancelled: customer called",
        "ended by the edge's answer"
    );
    // At the edge: ended (and forgotten once the cluster has the result), so the adapter
    // that now gets round to it must not hand it over.
    let late = edge
        .outbox
        .set_command_state(
            &got.command_id,
            caretwin_edge::outbox::CommandState::DeliveredToDevice,
        )
        .await;
    assert!(
        matches!(
            late,
            Ok(false) | Err(caretwin_edge::outbox::OutboxError::UnknownCommand { .. })
        ),
        "the device never gets a cancelled command: {late:?}"
    );
    let outbox = edge.outbox.clone();
    eventually("the cancelled result acknowledged at the edge", || async {
        outbox.commands_pending().await.unwrap().is_empty() && outbox.stats().backlog_items == 0
    })
    .await;
    // A repeated cancel changes nothing.
    let again = cancel(&c, &api, &sent.command_id).await.unwrap();
    assert_eq!(again.state, S::Cancelled as i32);
    assert_eq!(again.history, r.history);
    assert!(edge.downlink.try_recv().is_err(), "nothing else went down");
    assert_eq!(
        edge.stats
            .cancels
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one cancel reached the edge"
    );
    assert_eq!(command_state(&c, 0).await, "cancelled");
    let _ = edge.stop.send(());
    let _ = edge.running.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_comes_after_the_device_got_the_command_ends_with_the_devices_result() {
    use v1::CommandState as S;
    let c = cluster().await;
    let api = command_api(&c);
    let sent = send_descale(&c, &api, "descale-2", v1::Priority::Normal).await;
    let mut edge = start_edge(&c);
    let down = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
        .unwrap();
    let Downlink::Command(got) = down else {
        panic!("expected the command, got {down:?}")
    };
    eventually("sent_to_edge", || async {
        record(&api, &sent.command_id).await.state == S::SentToEdge as i32
    })
    .await;
    // The adapter hands it to the device; the cluster has not heard yet when the cancel
    // comes, so the cancel is accepted and goes to the edge, where it is too late.
    assert!(
        edge.outbox
            .set_command_state(
                &got.command_id,
                caretwin_edge::outbox::CommandState::DeliveredToDevice
            )
            .await
            .unwrap()
    );
    let r = cancel_with_key(&c, &api, &sent.command_id, "race-1")
        .await
        .unwrap();
    assert_eq!(r.state, S::SentToEdge as i32);
    let stats = edge.stats.clone();
    eventually("the edge handled the cancel", || async {
        stats.cancels.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    // Too late there: no result was written for it, the device keeps it.
    assert_eq!(edge.outbox.stats().backlog_items, 0);
    assert_eq!(edge.outbox.commands_pending().await.unwrap().len(), 1);
    edge.progress.notify_one();
    eventually("delivered_to_device", || async {
        record(&api, &sent.command_id).await.state == S::DeliveredToDevice as i32
    })
    .await;
    // Now a cancel is refused, and changes nothing.
    let refused = cancel(&c, &api, &sent.command_id).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    // The device's outcome is the command's.
    edge.outbox
        .accept(vec![Item::new(
            DEVICE,
            1_795_392_000_000,
            ItemKind::CommandResult {
                command_id: got.command_id.clone(),
                succeeded: true,
                expired: false,
                cancelled: false,
                detail: "cycle complete".into(),
            },
        )])
        .await
        .unwrap();
    edge.new_items.notify_waiters();
    eventually("succeeded", || async {
        record(&api, &sent.command_id).await.state == S::Succeeded as i32
    })
    .await;
    let r = record(&api, &sent.command_id).await;
    assert_eq!(
        states(&r),
        [
            S::Queued,
            S::SentToEdge,
            S::SentToEdge, // the cancel asked of the edge
            S::DeliveredToDevice,
            S::Succeeded
        ]
    );
    assert!(r.cancel_requested_at_ms.is_some());
    let refused = cancel(&c, &api, &sent.command_id).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(record(&api, &sent.command_id).await.history, r.history);
    // The first cancel retried with its key: answered (the command as it ended), not
    // refused, and nothing more logged.
    let retried = cancel_with_key(&c, &api, &sent.command_id, "race-1")
        .await
        .unwrap();
    assert_eq!(retried, r);
    let _ = edge.stop.send(());
    let _ = edge.running.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_asked_while_the_edge_is_away_reaches_it_when_it_reconnects() {
    use v1::CommandState as S;
    let c = cluster().await;
    let api = command_api(&c);
    let sent = send_descale(&c, &api, "descale-3", v1::Priority::Normal).await;
    let mut edge = start_edge(&c);
    let Some(Downlink::Command(_)) = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
    else {
        panic!("expected the command")
    };
    eventually("sent_to_edge", || async {
        record(&api, &sent.command_id).await.state == S::SentToEdge as i32
    })
    .await;
    // The edge goes away with the command stored and not yet handed to the device.
    let _ = edge.stop.send(());
    edge.running.await.unwrap();
    drop(edge.outbox); // its lock, for the edge that comes back
    let r = cancel_with_key(&c, &api, &sent.command_id, "cancel-1")
        .await
        .unwrap();
    assert_eq!(r.state, S::SentToEdge as i32, "waits for the edge");
    // The request is visible while the edge is away: in the record and in its history.
    assert!(r.cancel_requested_at_ms.is_some(), "{r:?}");
    assert_eq!(states(&r), [S::Queued, S::SentToEdge, S::SentToEdge]);
    assert_eq!(r.history[2].detail, "cancel requested: customer called");
    // A retry with the same key: the same answer, nothing asked or logged again.
    let retry = cancel_with_key(&c, &api, &sent.command_id, "cancel-1")
        .await
        .unwrap();
    assert_eq!(retry, r);
    // Back again: the session sends the cancel logged after the edge's last command.
    let mut edge = start_edge(&c);
    eventually("cancelled at the cluster", || async {
        record(&api, &sent.command_id).await.state == S::Cancelled as i32
    })
    .await;
    let done = record(&api, &sent.command_id).await;
    assert_eq!(
        states(&done),
        [S::Queued, S::SentToEdge, S::SentToEdge, S::Cancelled]
    );
    // The key's retry after the end: the command as it ended, still one request logged.
    let retry = cancel_with_key(&c, &api, &sent.command_id, "cancel-1")
        .await
        .unwrap();
    assert_eq!(retry, done);
    // The restarted edge handed the stored command to its adapter again; the adapter that
    // gets round to it now finds it ended.
    let Some(Downlink::Command(again)) = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
    else {
        panic!("expected the stored command handed over again")
    };
    let late = edge
        .outbox
        .set_command_state(
            &again.command_id,
            caretwin_edge::outbox::CommandState::DeliveredToDevice,
        )
        .await;
    assert!(
        matches!(
            late,
            Ok(false) | Err(caretwin_edge::outbox::OutboxError::UnknownCommand { .. })
        ),
        "{late:?}"
    );
    let _ = edge.stop.send(());
    let _ = edge.running.await;
}

/// A `SendCommand` of `payload` to `DEVICE` with `key`.
async fn send(
    c: &Cluster,
    api: &caretwin_cluster::grpc::commands::CommandApi,
    key: &str,
    payload: v1::command_payload::Kind,
    expires_at_ms: Option<i64>,
) -> Result<v1::CommandRecord, tonic::Status> {
    use caretwin_proto::v1::command_service_server::CommandService;
    let r = api
        .send_command(call(v1::SendCommandRequest {
            idempotency_key: key.into(),
            device_id: DEVICE.into(),
            payload: Some(v1::CommandPayload {
                kind: Some(payload),
            }),
            expires_at_ms,
            ..Default::default()
        }))
        .await
        .map(tonic::Response::into_inner);
    c.system.settle(5).await.unwrap();
    r
}

fn configuration(fields: &[(&str, v1::signal_value::Value, u64)]) -> v1::command_payload::Kind {
    v1::command_payload::Kind::Configuration(v1::Configuration {
        entries: fields
            .iter()
            .map(|(f, v, version)| {
                let entry = v1::ConfigurationEntry {
                    value: Some(v1::SignalValue {
                        value: Some(v.clone()),
                    }),
                    version: *version,
                };
                ((*f).to_owned(), entry)
            })
            .collect(),
    })
}

fn firmware(url: &str, sha256: &str, size_bytes: u64) -> v1::command_payload::Kind {
    v1::command_payload::Kind::FirmwareUpdate(v1::FirmwareUpdate {
        version: "2.1.0".into(),
        url: url.into(),
        sha256: sha256.into(),
        size_bytes,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_and_firmware_commands_reach_a_real_edge_and_bad_ones_change_nothing() {
    use v1::CommandState as S;
    use v1::signal_value::Value;
    let c = cluster().await;
    let api = command_api(&c);
    let sha = "0123456789abcdef".repeat(4);
    // Bad input: INVALID_ARGUMENT, and nothing is stored or sent.
    let far = caretwin_cluster::node::now_ms() as i64 + 365 * 24 * HOUR_MS as i64;
    let bad = [
        (
            "nan",
            configuration(&[("brew_temp", Value::Number(f64::NAN), 0)]),
            None,
        ),
        (
            "inf",
            configuration(&[("brew_temp", Value::Number(f64::INFINITY), 0)]),
            None,
        ),
        ("empty", configuration(&[]), None),
        (
            "long",
            configuration(&[("brew_temp", Value::Text("x".repeat(300)), 0)]),
            None,
        ),
        (
            "http",
            firmware("http://fw.example/a.bin", &sha, 1024),
            None,
        ),
        (
            "sha",
            firmware("https://fw.example/a.bin", "ABC", 1024),
            None,
        ),
        ("size", firmware("https://fw.example/a.bin", &sha, 0), None),
        (
            "far",
            firmware("https://fw.example/a.bin", &sha, 1024),
            Some(far),
        ),
    ];
    for (key, payload, expires) in bad {
        let refused = send(&c, &api, key, payload, expires).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "{key}: {refused:?}"
        );
    }
    let answer = v1::command_payload::Kind::AnswerQuestion(v1::AnswerQuestion {
        question_id: "not-asked-by-this-model".into(),
        option_id: "yes".into(),
    });
    let refused = send(&c, &api, "q", answer, None).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let untouched = c
        .system
        .devices()
        .inspect(DEVICE, |t| {
            let t = t.unwrap();
            (t.desired().len(), t.commands().len())
        })
        .await
        .unwrap();
    assert_eq!(untouched, (0, 0), "a refused command changes nothing");

    // A configuration: the desired state (as TwinService.SetDesired sets it), then the
    // command succeeds once the device reports the values.
    let config = configuration(&[
        ("brew_temp", Value::Number(94.0), 0),
        ("eco", Value::Flag(true), 1),
    ]);
    let sent = send(&c, &api, "config-1", config, None).await.unwrap();
    assert_eq!(sent.state, S::Queued as i32);
    let Some(v1::command_payload::Kind::Configuration(shown)) =
        sent.payload.as_ref().and_then(|p| p.kind.clone())
    else {
        panic!("the record shows its configuration: {sent:?}")
    };
    assert_eq!(shown.entries["brew_temp"].version, 1, "the version it got");
    // A retry with the key: the same command, the desired state not bumped again.
    let again = send(&c, &api, "config-1", configuration(&[]), None)
        .await
        .unwrap();
    assert_eq!(again.command_id, sent.command_id);
    let mut edge = start_edge(&c);
    let down = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
        .unwrap();
    let Downlink::Desired { device, fields } = down else {
        panic!("expected the desired state, got {down:?}")
    };
    assert_eq!(device, DEVICE);
    let mut fields = fields;
    fields.sort();
    assert_eq!(
        fields,
        [
            ("brew_temp".to_owned(), "94".to_owned(), 1),
            ("eco".to_owned(), "true".to_owned(), 1)
        ]
    );
    let report = |field: &str, value: &str| {
        Item::new(
            DEVICE,
            1_795_392_000_000,
            ItemKind::Reported {
                field: field.into(),
                value: caretwin_edge::outbox::FieldValue::Text(value.into()),
            },
        )
    };
    edge.outbox
        .accept(vec![report("brew_temp", "94"), report("eco", "true")])
        .await
        .unwrap();
    edge.new_items.notify_waiters();
    eventually("the configuration to succeed", || async {
        record(&api, &sent.command_id).await.state == S::Succeeded as i32
    })
    .await;

    // Firmware: carried to the edge as a command, which stores and confirms it.
    let fw = send(
        &c,
        &api,
        "fw-1",
        firmware("https://fw.example/2.1.0.bin", &sha, 4 << 20),
        None,
    )
    .await
    .unwrap();
    let down = tokio::time::timeout(DEADLINE, edge.downlink.recv())
        .await
        .unwrap()
        .unwrap();
    let Downlink::Command(got) = down else {
        panic!("expected the firmware command, got {down:?}")
    };
    assert_eq!(got.command_id, fw.command_id);
    assert_eq!(got.name, "firmware_update");
    assert_eq!(got.args["sha256"], sha);
    assert_eq!(got.args["size_bytes"], (4u64 << 20).to_string());
    eventually("the firmware stored on the edge", || async {
        record(&api, &fw.command_id).await.state == S::SentToEdge as i32
    })
    .await;
    let r = record(&api, &fw.command_id).await;
    assert!(matches!(
        r.payload.and_then(|p| p.kind),
        Some(v1::command_payload::Kind::FirmwareUpdate(f)) if f.sha256 == sha
    ));
    let _ = edge.stop.send(());
    let _ = edge.running.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_commands_past_their_retention_are_trimmed_and_a_rebuild_keeps_the_rest() {
    use caretwin_cluster::grpc::commands::{CommandApi, Commands};
    use caretwin_cluster::grpc::projection::Retention;
    use caretwin_proto::v1::command_service_server::CommandService;
    use v1::CommandState as S;
    let c = cluster().await;
    let api_over = |c: &Cluster| {
        CommandApi(Arc::new(
            Commands::new(
                c.system.clone(),
                c.store.clone(),
                c.log_signals.clone(),
                Arc::new(Catalogue::builtin()),
                c.clock.clone(),
            )
            .with_retention(Retention::days(1)),
        ))
    };
    let api = api_over(&c);
    let t0 = 1_795_392_000_000;
    let descale = || {
        v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
            name: "descale".into(),
            args: Default::default(),
        })
    };
    // a: finished (cancelled while queued); b: live for 29 days; c: finished after b.
    let a = send(&c, &api, "a", descale(), None).await.unwrap();
    cancel(&c, &api, &a.command_id).await.unwrap();
    let live_until = t0 as i64 + 29 * 24 * HOUR_MS as i64;
    let b = send(&c, &api, "b", descale(), Some(live_until))
        .await
        .unwrap();
    let cc = send(&c, &api, "c", descale(), None).await.unwrap();
    cancel(&c, &api, &cc.command_id).await.unwrap();
    assert_eq!(record(&api, &a.command_id).await.state, S::Cancelled as i32);

    // Two days on: a is past the retention and before the live b, so it goes; c is past
    // it too but after b (the log is trimmed as a prefix), so it stays for now.
    c.clock.set(t0 + 2 * 24 * HOUR_MS);
    let get = |api: &CommandApi, id: &str| {
        let api = api.clone();
        let id = id.to_owned();
        async move {
            api.get_command(call(v1::GetCommandRequest { command_id: id }))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let gone = get(&api, &a.command_id).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let log = c
        .store
        .read_log(&Key::new("commands/t1"), 1, 100)
        .await
        .unwrap();
    assert_eq!(
        log.first().map(|e| e.index),
        Some(3),
        "a's two entries trimmed from the store"
    );
    // A projection rebuilt from the trimmed log: b whole (what it is and where it
    // stands), c whole, a unknown.
    let rebuilt = api_over(&c);
    let b_again = get(&rebuilt, &b.command_id).await.unwrap();
    assert_eq!(b_again.state, S::Queued as i32);
    assert_eq!(b_again.expires_at_ms, live_until);
    assert!(matches!(
        b_again.payload.and_then(|p| p.kind),
        Some(v1::command_payload::Kind::RemoteRemedy(r)) if r.name == "descale"
    ));
    assert_eq!(
        get(&rebuilt, &cc.command_id).await.unwrap().state,
        S::Cancelled as i32
    );
    assert_eq!(
        get(&rebuilt, &a.command_id).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    // b ends; a day later everything has finished past the retention: all is trimmed.
    cancel(&c, &rebuilt, &b.command_id).await.unwrap();
    c.clock.set(t0 + 4 * 24 * HOUR_MS);
    let listed = rebuilt
        .list_commands(call(v1::ListCommandsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.commands.is_empty(), "{listed:?}");
    let log = c
        .store
        .read_log(&Key::new("commands/t1"), 1, 100)
        .await
        .unwrap();
    assert!(log.is_empty(), "{log:?}");
}
