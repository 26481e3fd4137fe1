//! The edge sync over real QUIC sockets, cluster and edge in one process: commands that
//! wait for an offline edge, authorization by certificate, and bad frames.

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
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_cluster::sync::dev::{DevPki, generate};
use caretwin_cluster::sync::server::SyncServer;
use caretwin_cluster::sync::tls::{SiteIdentity, server_config_from_files};
use caretwin_edge::outbox::{Item, ItemKind, Outbox, OutboxConfig};
use caretwin_edge::sync::client::{ClientSettings, Downlink, SyncClient};
use caretwin_edge::sync::tls::client_config_from_files;
use caretwin_edge::sync::transport::{FrameReader, client_endpoint, connect, send_frame};
use caretwin_proto::v1::{
    self, ClusterFrame, EdgeFrame, ErrorCode, Hello, Reading, ReadingBatch, cluster_frame,
    edge_frame,
};
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
    system: Arc<System>,
    store: Arc<dyn Store>,
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
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path().join("data"))).unwrap());
    let signals = Arc::new(CommandSignals::default());
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_795_392_000_000));
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
        system,
        store,
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
    let (cert, key) = site_files(&c.certs(), site);
    let config = client_config_from_files(&c.certs().join("ca.pem"), &cert, &key).unwrap();
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let conn = connect(&endpoint, c.addr, "localhost").await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = EdgeFrame {
        body: Some(edge_frame::Body::Hello(Hello {
            protocol_version: v1::SyncProtocolVersion::V1 as u32,
            ..Default::default()
        })),
    };
    send_frame(&mut send, &hello).await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 20);
    let welcome = reader.next::<ClusterFrame>().await.unwrap().unwrap();
    assert!(matches!(
        welcome.body,
        Some(cluster_frame::Body::Welcome(_))
    ));
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
    // The same session, and another site, are still served.
    let reply = exchange(&home, &caretwin_proto::frame::encode(&batch(DEVICE, 1))).await;
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
    outbox: Arc<Outbox>,
    new_items: Arc<tokio::sync::Notify>,
    downlink: tokio::sync::mpsc::Receiver<Downlink>,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
}

fn start_edge(c: &Cluster) -> Edge {
    let outbox =
        Arc::new(Outbox::open(&OutboxConfig::at(c.dir.path().join("edge/outbox"))).unwrap());
    let (cert, key) = site_files(&c.certs(), "t1:home-1");
    let config = client_config_from_files(&c.certs().join("ca.pem"), &cert, &key).unwrap();
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let new_items = Arc::new(tokio::sync::Notify::new());
    let (tx, downlink) = tokio::sync::mpsc::channel(16);
    let client = SyncClient::new(
        ClientSettings {
            site_id: "t1:home-1".into(),
            cluster: c.addr,
            server_name: "localhost".into(),
            max_backoff: Duration::from_millis(500),
            compress: true,
        },
        endpoint,
        outbox.clone(),
        new_items.clone(),
        tx,
    );
    let stats = client.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        client
            .run(async move {
                let _ = stopped.await;
            })
            .await
    });
    Edge {
        stats,
        outbox,
        new_items,
        downlink,
        stop,
        running,
    }
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

    // The device runs it; the result travels up as an item of the device's log.
    outbox
        .accept(vec![Item::new(
            DEVICE,
            1_795_392_000_000,
            ItemKind::CommandResult {
                command_id: got.command_id.clone(),
                succeeded: true,
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
