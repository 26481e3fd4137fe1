//! MQTT ingest over a real socket, with a real MQTT client as the device: publishes taken
//! into the outbox in order and acknowledged only once on disk, bad input and a full outbox
//! told on the device's errors topic ahead of the PUBACK, alarms always taken, and a clean
//! stop.

use caretwin_edge::mqtt::{ErrorReport, errors_topic};
use caretwin_edge::outbox::{ItemKind, Outbox, OutboxConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

/// Generous: only a broken server waits this long.
const DEADLINE: Duration = Duration::from_secs(20);

struct Edge {
    _dir: tempfile::TempDir,
    outbox: Arc<Outbox>,
    new_items: Arc<Notify>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

async fn serve(limit_bytes: u64) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(
        Outbox::open(&OutboxConfig {
            limit_bytes,
            ..OutboxConfig::at(dir.path().join("outbox"))
        })
        .unwrap(),
    );
    let new_items = Arc::new(Notify::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(caretwin_edge::mqtt::serve(
        listener,
        outbox.clone(),
        new_items.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    Edge {
        _dir: dir,
        outbox,
        new_items,
        addr,
        stop: Some(stop),
        server,
    }
}

/// A device: an MQTT client whose incoming packets the test reads in order.
struct Device {
    client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<Result<Packet, String>>,
}

impl Device {
    /// Connects as `id`, subscribed to every device's errors topic.
    async fn connect(addr: SocketAddr, id: &str) -> Self {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 64);
        let (tx, incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let next = match events.poll().await {
                    Ok(Event::Incoming(p)) => Ok(p),
                    Ok(Event::Outgoing(_)) => continue,
                    // The client would reconnect; the tests want to see the break instead.
                    Err(e) => Err(e.to_string()),
                };
                let end = next.is_err();
                if tx.send(next).is_err() || end {
                    return;
                }
            }
        });
        let mut d = Device { client, incoming };
        assert!(matches!(d.next().await, Packet::ConnAck(_)));
        d.client
            .subscribe("caretwin/+/errors", QoS::AtLeastOnce)
            .await
            .unwrap();
        assert!(matches!(d.next().await, Packet::SubAck(_)));
        d
    }

    /// The next packet from the edge.
    async fn next(&mut self) -> Packet {
        match tokio::time::timeout(DEADLINE, self.incoming.recv()).await {
            Ok(Some(Ok(p))) => p,
            other => panic!("no packet from the edge: {other:?}"),
        }
    }

    async fn publish(&self, topic: &str, qos: QoS, payload: &str) {
        self.client
            .publish(topic, qos, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    /// Publishes at QoS 1 and returns the errors published to this device before the
    /// PUBACK came.
    async fn publish_acked(&mut self, topic: &str, payload: &str) -> Vec<(String, ErrorReport)> {
        self.publish(topic, QoS::AtLeastOnce, payload).await;
        let mut errors = Vec::new();
        loop {
            match self.next().await {
                Packet::PubAck(_) => return errors,
                Packet::Publish(p) => errors.push((
                    p.topic.clone(),
                    serde_json::from_slice(&p.payload).unwrap_or_else(|e| {
                        panic!("error report {:?} is not JSON: {e}", p.payload)
                    }),
                )),
                Packet::PingResp => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn reading(value: &str) -> String {
    format!(r#"{{"signal":"brew_pressure","value":{value},"ts_ms":1795392000000}}"#)
}

#[tokio::test]
async fn readings_are_taken_in_order_and_acknowledged_once_on_disk() {
    let edge = serve(1 << 30).await;
    let mut device = Device::connect(edge.addr, "t1:c1").await;
    let topic = "caretwin/t1:c1/readings";

    let errors = device
        .publish_acked(topic, &format!("[{},{}]", reading("9.1"), reading("9.2")))
        .await;
    assert_eq!(errors, vec![]);
    // The PUBACK came after the write: the readings are there now, no waiting.
    assert_eq!(edge.outbox.last_seq("t1:c1").await, 2);
    let errors = device
        .publish_acked(topic, &format!("[{}]", reading("9.3")))
        .await;
    assert_eq!(errors, vec![]);

    // QoS 2: PUBREC once taken, then the release handshake; taken once.
    device
        .publish(topic, QoS::ExactlyOnce, &format!("[{}]", reading("9.4")))
        .await;
    assert!(matches!(device.next().await, Packet::PubRec(_)));
    assert_eq!(edge.outbox.last_seq("t1:c1").await, 4);
    assert!(matches!(device.next().await, Packet::PubComp(_)));

    // QoS 0 has no answer: the sync's wake-up says it is in.
    let woken = edge.new_items.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    device
        .publish(topic, QoS::AtMostOnce, &format!("[{}]", reading("9.5")))
        .await;
    tokio::time::timeout(DEADLINE, woken)
        .await
        .expect("the sync was not woken");

    let items = edge.outbox.pending("t1:c1", 0, 100).await.unwrap();
    let got: Vec<(u64, f64)> = items
        .iter()
        .map(|s| match &s.item.kind {
            ItemKind::Reading { value, .. } => (s.seq, *value),
            other => panic!("not a reading: {other:?}"),
        })
        .collect();
    assert_eq!(got, vec![(1, 9.1), (2, 9.2), (3, 9.3), (4, 9.4), (5, 9.5)]);
}

#[tokio::test]
async fn bad_input_is_refused_whole_and_told_on_the_errors_topic() {
    let edge = serve(1 << 30).await;
    let mut device = Device::connect(edge.addr, "t1:c1").await;
    let long_id = "d".repeat(129);
    let long_topic = format!("caretwin/{long_id}/readings");
    let good = reading("9.1");
    for (topic, payload, device_id) in [
        ("caretwin/t1:c1/readings", "not json".to_owned(), "t1:c1"),
        ("caretwin/t1:c1/readings", "[]".to_owned(), "t1:c1"),
        (
            "caretwin/t1:c1/readings",
            format!("[{}]", reading("1e999")),
            "t1:c1",
        ),
        (
            "caretwin/t1:c1/readings",
            format!("[{}]", reading(r#""NaN""#)),
            "t1:c1",
        ),
        (
            "caretwin/t1:c1/readings",
            r#"[{"signal":"brew_pressure","value":1,"ts_ms":0}]"#.to_owned(),
            "t1:c1",
        ),
        (
            "caretwin/t1:c1/readings",
            format!(r#"[{good},{{"signal":"x","value":1,"ts_ms":1,"extra":1}}]"#),
            "t1:c1",
        ),
        (
            "caretwin/t1:c1/alarms",
            r#"{"kind":"smoke"}"#.to_owned(),
            "t1:c1",
        ),
        ("caretwin/t1:c1/commands", format!("[{good}]"), "t1:c1"),
        ("caretwin//readings", format!("[{good}]"), ""),
        (long_topic.as_str(), format!("[{good}]"), long_id.as_str()),
    ] {
        let errors = device.publish_acked(topic, &payload).await;
        assert_eq!(errors.len(), 1, "{topic} {payload}: {errors:?}");
        let (on, report) = &errors[0];
        assert_eq!(on, &errors_topic(device_id), "{topic} {payload}");
        assert_eq!(report.code, 400, "{topic} {payload}: {report:?}");
        assert!(!report.error.is_empty());
    }
    assert_eq!(edge.outbox.last_seq("t1:c1").await, 0, "nothing accepted");
    assert_eq!(edge.outbox.stats().backlog_items, 0, "nothing accepted");

    // The connection is still good for readings afterwards.
    assert_eq!(
        device
            .publish_acked("caretwin/t1:c1/readings", &format!("[{good}]"))
            .await,
        vec![]
    );
    assert_eq!(edge.outbox.last_seq("t1:c1").await, 1);
}

#[tokio::test]
async fn a_full_outbox_refuses_readings_with_507_but_takes_alarms() {
    let edge = serve(1).await;
    let mut device = Device::connect(edge.addr, "t1:hub").await;
    let errors = device
        .publish_acked("caretwin/t1:c1/readings", &format!("[{}]", reading("9.1")))
        .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "caretwin/t1:c1/errors");
    assert_eq!(errors[0].1.code, 507);
    assert!(errors[0].1.error.contains("full"), "{errors:?}");
    assert_eq!(edge.outbox.last_seq("t1:c1").await, 0);

    let errors = device
        .publish_acked(
            "caretwin/t1:hub/alarms",
            r#"{"kind":"smoke","ts_ms":1795392000000}"#,
        )
        .await;
    assert_eq!(errors, vec![]);
    assert_eq!(edge.outbox.last_seq("t1:hub").await, 1);
}

#[tokio::test]
async fn errors_reach_other_subscribers_and_stop_closes_connections() {
    let mut edge = serve(1 << 30).await;
    let mut watcher = Device::connect(edge.addr, "site-monitor").await;
    let mut device = Device::connect(edge.addr, "t1:c1").await;
    device.publish_acked("caretwin/t1:c1/readings", "[]").await;
    match watcher.next().await {
        Packet::Publish(p) => assert_eq!(p.topic, "caretwin/t1:c1/errors"),
        other => panic!("unexpected {other:?}"),
    }

    let _ = edge.stop.take().unwrap().send(());
    tokio::time::timeout(DEADLINE, &mut edge.server)
        .await
        .expect("the server did not stop")
        .unwrap();
    for d in [&mut watcher, &mut device] {
        match tokio::time::timeout(DEADLINE, d.incoming.recv()).await {
            Ok(Some(Err(_)) | None) => {}
            other => panic!("connection still open after stop: {other:?}"),
        }
    }
    assert!(
        tokio::net::TcpStream::connect(edge.addr).await.is_err(),
        "still listening after stop"
    );
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let edge = serve(1 << 30).await;
    let mut first = Device::connect(edge.addr, "t1:c1").await;
    let mut second = Device::connect(edge.addr, "t1:c1").await;
    match tokio::time::timeout(DEADLINE, first.incoming.recv()).await {
        Ok(Some(Err(_)) | None) => {}
        other => panic!("first connection still open: {other:?}"),
    }
    assert_eq!(
        second
            .publish_acked("caretwin/t1:c1/readings", &format!("[{}]", reading("9.1")))
            .await,
        vec![]
    );
    assert_eq!(edge.outbox.last_seq("t1:c1").await, 1);
}
