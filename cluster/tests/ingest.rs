//! The cluster's side of the edge sync, without the transport: authorization, exactly-once
//! application, protocol error codes, and commands that wait for a site to come back.

use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::ManualClock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::mail::{Address, Body, DeviceCommand, Mail};
use caretwin_actors::model::HOUR_MS;
use caretwin_actors::store::{Key, Store};
use caretwin_actors::system::{Components, ServicesConfig, System};
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use caretwin_cluster::ingest::{CommandSignals, EdgeGateway, Ingest, SiteId};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_proto::v1::{
    self, Ack, ClusterFrame, DeviceEvent, DeviceResume, EdgeFrame, ErrorCode, Hello, Reading,
    ReadingBatch, cluster_frame, device_event, edge_frame,
};
use std::sync::Arc;

const T0: u64 = 1_795_392_000_000 + 10 * HOUR_MS;
const DEVICE: &str = "t1:coffee-1";

struct Nowhere;

#[async_trait::async_trait]
impl Router for Nowhere {
    async fn deliver(&self, _m: Mail) -> caretwin_actors::Result<Delivery> {
        Ok(Delivery::Delivered)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    system: Arc<System>,
    ingest: Ingest,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
    let gateway = Arc::new(EdgeGateway::new(
        store.clone(),
        Arc::new(CommandSignals::default()),
        Arc::new(Nowhere),
    ));
    let system = Arc::new(
        System::start(Components {
            store: store.clone(),
            clock: Arc::new(ManualClock::new(T0)),
            catalogue: Arc::new(Catalogue::builtin()),
            device_env: None,
            services: ServicesConfig::default(),
            host: HostConfig {
                shards: 4,
                idle_ms: HOUR_MS,
            },
            outside: gateway,
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
    let ingest = Ingest::new(system.clone(), store.clone(), "node-1");
    Fixture {
        _dir: dir,
        store,
        system,
        ingest,
    }
}

fn site(s: &str) -> SiteId {
    SiteId { site: s.into() }
}

fn batch(id: u64, device: &str, seqs: std::ops::RangeInclusive<u64>, value: f64) -> EdgeFrame {
    EdgeFrame {
        body: Some(edge_frame::Body::Batch(ReadingBatch {
            batch_id: id,
            readings: seqs
                .map(|seq| Reading {
                    device_id: device.into(),
                    signal: "brew_pressure".into(),
                    value,
                    device_time_ms: (T0 - 1_000_000 + seq * 1000) as i64,
                    seq,
                    unit: None,
                })
                .collect(),
        })),
    }
}

fn ack(f: ClusterFrame) -> Ack {
    match f.body {
        Some(cluster_frame::Body::Ack(a)) => a,
        other => panic!("expected an ack, got {other:?}"),
    }
}

fn codes(a: &Ack) -> Vec<ErrorCode> {
    a.rejections
        .iter()
        .map(|r| ErrorCode::try_from(r.code).unwrap())
        .collect()
}

fn watermark(a: &Ack, device: &str) -> Option<u64> {
    a.watermarks
        .iter()
        .find(|w| w.device_id == device)
        .map(|w| w.persisted_seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_apply_once_and_the_watermark_says_so() {
    let f = fixture().await;
    let home = site("t1:home-1");
    let a = ack(f
        .ingest
        .data_frame(&home, batch(1, DEVICE, 1..=10, 9.2))
        .await);
    assert_eq!((watermark(&a, DEVICE), a.accepted_count), (Some(10), 10));
    assert!(a.rejections.is_empty() && a.frame_error.is_none());
    // The same batch again (the ack was lost): skipped, the watermark unchanged.
    let a = ack(f
        .ingest
        .data_frame(&home, batch(2, DEVICE, 1..=10, 9.2))
        .await);
    assert_eq!(
        (watermark(&a, DEVICE), a.duplicate_count, a.accepted_count),
        (Some(10), 10, 0)
    );
    assert_eq!(codes(&a), [ErrorCode::Duplicate]);
    // A gap: nothing past it is applied; the edge is told where to resume.
    let a = ack(f
        .ingest
        .data_frame(&home, batch(3, DEVICE, 12..=13, 9.2))
        .await);
    assert_eq!(watermark(&a, DEVICE), Some(10));
    assert_eq!(codes(&a), [ErrorCode::SequenceGap]);
    assert_eq!(a.rejections[0].seq, Some(11));
    // Reconnecting, the edge learns the watermark from Welcome.
    let hello = Hello {
        protocol_version: v1::SyncProtocolVersion::V1 as u32,
        devices: vec![
            DeviceResume {
                device_id: DEVICE.into(),
                last_seq: 13,
            },
            DeviceResume {
                device_id: "t2:foreign".into(),
                last_seq: 5,
            },
        ],
        ..Default::default()
    };
    let w = f.ingest.hello(&home, "s2", &hello, T0).await.unwrap();
    assert_eq!(w.site_id, "t1:home-1");
    assert_eq!(w.tenant_id, "t1");
    assert_eq!(
        w.watermarks.len(),
        1,
        "another tenant's devices are not looked up"
    );
    assert_eq!(w.watermarks[0].persisted_seq, 10);
    let old = Hello {
        protocol_version: 99,
        ..hello
    };
    assert!(f.ingest.hello(&home, "s3", &old, T0).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cannot_write_what_is_not_its_own_and_nothing_changes() {
    let f = fixture().await;
    let before = f.store.high_water(&Key::new(DEVICE)).await.unwrap();
    let shop = site("t1:shop-7");
    let a = ack(f
        .ingest
        .data_frame(&shop, batch(1, DEVICE, 1..=3, 9.2))
        .await);
    assert_eq!(codes(&a), [ErrorCode::NotOwner]);
    let a = ack(f
        .ingest
        .data_frame(&shop, batch(2, "t1:nobody", 1..=3, 9.2))
        .await);
    assert_eq!(codes(&a), [ErrorCode::UnknownDevice]);
    let a = ack(f
        .ingest
        .data_frame(&site("t2:home"), batch(3, DEVICE, 1..=3, 9.2))
        .await);
    assert_eq!(codes(&a), [ErrorCode::NotOwner]);
    assert_eq!(f.store.high_water(&Key::new(DEVICE)).await.unwrap(), before);
    // The unknown device was not written into existence.
    assert_eq!(
        f.store
            .snapshot(&Key::new("device/t1:nobody"))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_get_their_codes_and_oversized_batches_are_refused_whole() {
    let f = fixture().await;
    let home = site("t1:home-1");
    let mut frame = batch(1, DEVICE, 1..=4, 9.2);
    if let Some(edge_frame::Body::Batch(b)) = &mut frame.body {
        b.readings[0].value = f64::NAN;
        b.readings[1].value = f64::INFINITY;
        b.readings[2].device_time_ms = (T0 + 24 * HOUR_MS) as i64;
        b.readings[3].signal = "flux_capacitor".into();
    }
    let a = ack(f.ingest.data_frame(&home, frame).await);
    assert_eq!(
        codes(&a),
        [
            ErrorCode::InvalidValue,
            ErrorCode::InvalidValue,
            ErrorCode::TimestampInFuture,
            ErrorCode::UnknownSignal
        ]
    );
    assert_eq!(watermark(&a, DEVICE), Some(4), "recorded and moved past");
    let reported = f
        .system
        .devices()
        .inspect(DEVICE, |t| t.unwrap().reported()[0])
        .await
        .unwrap();
    assert_eq!(reported, None, "no bad value reached the twin's state");

    let max = f.ingest.limits().max_batch_readings as u64;
    let a = ack(f
        .ingest
        .data_frame(&home, batch(2, DEVICE, 5..=5 + max, 9.2))
        .await);
    assert_eq!(
        a.frame_error.map(|e| ErrorCode::try_from(e.code).unwrap()),
        Some(ErrorCode::BatchTooLarge)
    );
    assert!(a.watermarks.is_empty());
    assert_eq!(f.store.high_water(&Key::new(DEVICE)).await.unwrap(), 4);
    // A frame that does not belong on a data stream.
    let hb = EdgeFrame {
        body: Some(edge_frame::Body::Heartbeat(Default::default())),
    };
    assert!(matches!(
        f.ingest.data_frame(&home, hb).await.body,
        Some(cluster_frame::Body::Error(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_waits_in_the_sites_log_and_its_state_is_truthful() {
    let f = fixture().await;
    let home = site("t1:home-1");
    // The customer twin sends a descale command while the site is offline.
    let cmd = Mail {
        id: "t1:alice/1".into(),
        from: Address::Customer("t1:alice".into()),
        to: Address::Device(DEVICE.into()),
        body: Body::Command(DeviceCommand {
            command_id: "t1:alice/case-1/step-0".into(),
            device: DEVICE.into(),
            name: "descale".into(),
            args: vec![],
            expires_at_ms: T0 + 6 * HOUR_MS,
            priority: Default::default(),
            action: None,
        }),
    };
    let r = f
        .system
        .devices()
        .call(DEVICE, DeviceMsg::Mail(Box::new(cmd)))
        .await
        .unwrap();
    assert_eq!(r, DeviceReply::Ok);
    f.system.settle(5).await.unwrap();
    let state = |f: &Fixture| {
        let sys = f.system.clone();
        async move {
            sys.devices()
                .inspect(DEVICE, |t| t.unwrap().commands()[0].state.clone())
                .await
                .unwrap()
        }
    };
    assert_eq!(
        state(&f).await,
        "queued",
        "not delivered while the site is away"
    );

    // The site reconnects having seen no command: it gets this one, at position 1.
    let (frames, last) = f.ingest.commands_after(&home, 0, T0).await.unwrap();
    assert_eq!((frames.len(), last), (1, 1));
    let Some(cluster_frame::Body::Command(c)) = &frames[0].body else {
        panic!()
    };
    assert_eq!((c.device_id.as_str(), c.position), (DEVICE, 1));
    assert!(
        f.ingest
            .commands_after(&home, 1, T0)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert!(
        f.ingest
            .commands_after(&site("t1:shop-7"), 0, T0)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    // Expired commands are not sent.
    assert!(
        f.ingest
            .commands_after(&home, 0, T0 + 7 * HOUR_MS)
            .await
            .unwrap()
            .0
            .is_empty()
    );

    // The edge stored it; then the device ran it.
    let status = EdgeFrame {
        body: Some(edge_frame::Body::CommandStatus(v1::CommandStatus {
            command_id: c.command_id.clone(),
            position: 1,
            state: v1::CommandState::SentToEdge as i32,
            ..Default::default()
        })),
    };
    assert!(f.ingest.control_frame(&home, status, T0).await.is_none());
    assert_eq!(state(&f).await, "sent_to_edge");
    let result = EdgeFrame {
        body: Some(edge_frame::Body::Event(DeviceEvent {
            device_id: DEVICE.into(),
            seq: 1,
            device_time_ms: T0 as i64,
            kind: Some(device_event::Kind::CommandResult(v1::CommandResult {
                command_id: c.command_id.clone(),
                outcome: v1::CommandOutcome::Succeeded as i32,
                detail: "cycle complete".into(),
                finished_at_ms: T0 as i64,
            })),
        })),
    };
    let a = ack(f.ingest.data_frame(&home, result).await);
    assert_eq!(watermark(&a, DEVICE), Some(1));
    assert_eq!(state(&f).await, "succeeded");

    // A second command reaches the edge too late to start: the edge ends it as expired,
    // and a progress report arriving after that does not undo it.
    let cmd = Mail {
        id: "t1:alice/2".into(),
        from: Address::Customer("t1:alice".into()),
        to: Address::Device(DEVICE.into()),
        body: Body::Command(DeviceCommand {
            command_id: "t1:alice/case-1/step-1".into(),
            device: DEVICE.into(),
            name: "descale".into(),
            args: vec![],
            expires_at_ms: T0 + HOUR_MS,
            priority: Default::default(),
            action: None,
        }),
    };
    f.system
        .devices()
        .call(DEVICE, DeviceMsg::Mail(Box::new(cmd)))
        .await
        .unwrap();
    f.system.settle(5).await.unwrap();
    let second = |f: &Fixture| {
        let sys = f.system.clone();
        async move {
            sys.devices()
                .inspect(DEVICE, |t| t.unwrap().commands()[1].state.clone())
                .await
                .unwrap()
        }
    };
    let expired = EdgeFrame {
        body: Some(edge_frame::Body::Event(DeviceEvent {
            device_id: DEVICE.into(),
            seq: 2,
            device_time_ms: T0 as i64,
            kind: Some(device_event::Kind::CommandResult(v1::CommandResult {
                command_id: "t1:alice/case-1/step-1".into(),
                outcome: v1::CommandOutcome::Expired as i32,
                detail: "expired before it reached the device".into(),
                finished_at_ms: T0 as i64,
            })),
        })),
    };
    let a = ack(f.ingest.data_frame(&home, expired).await);
    assert_eq!(watermark(&a, DEVICE), Some(2));
    assert_eq!(second(&f).await, "expired");
    let late = EdgeFrame {
        body: Some(edge_frame::Body::CommandStatus(v1::CommandStatus {
            command_id: "t1:alice/case-1/step-1".into(),
            position: 2,
            state: v1::CommandState::DeliveredToDevice as i32,
            ..Default::default()
        })),
    };
    assert!(f.ingest.control_frame(&home, late, T0).await.is_none());
    assert_eq!(second(&f).await, "expired", "an outcome is final");
}
