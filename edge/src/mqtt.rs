//! MQTT ingest for devices on the site's LAN: a small MQTT 3.1.1 server inside the edge.
//!
//! Devices connect (plain TCP, no login: the LAN is trusted as for [`crate::http`]) and
//! publish at QoS 0, 1 or 2:
//!
//! - `caretwin/<device-id>/readings` with a JSON array of readings:
//!
//!   ```json
//!   [{"signal": "brew_pressure", "value": 9.1, "ts_ms": 1795392000000}]
//!   ```
//!
//! - `caretwin/<device-id>/alarms` with `{"kind": "smoke", "ts_ms": 1795392000000}`: always
//!   accepted (alarms are never refused for space).
//!
//! The device id is the topic's middle level (so it cannot hold `/`; `:` is fine) and is
//! checked as the HTTP ingest checks it. Each publish is one call to
//! [`Outbox::accept`]: all of its readings are taken or none is. On success the sync is
//! woken; a refusal is published back on `caretwin/<device-id>/errors` as
//! `{"error": "…", "code": 400|507}`, with the same meaning as the HTTP status codes:
//!
//! - `400`: malformed JSON, NaN or infinite values, an empty or over-long id, an unknown
//!   topic under `caretwin/<device-id>/`, none or more than [`MAX_READINGS`] readings;
//!   nothing of the publish is accepted;
//! - `507`: the outbox is full; nothing is accepted, and the device should keep the
//!   readings and publish them again later;
//! - `503`: the outbox cannot write (a storage failure, the edge stopping); the edge also
//!   closes the connection without acknowledging the publish, so an MQTT client sends it
//!   again after reconnecting.
//!
//! Devices that care about refusals (every device that keeps readings it could not hand
//! over) subscribe to their errors topic; errors are delivered at QoS 0 (the SUBACK grants
//! QoS 0), to every connection subscribed to a matching filter.
//!
//! # Acknowledgement and durability
//! MQTT 3.1.1's PUBACK cannot carry a refusal, so the server does the next best thing
//! and orders what it writes to the connection: a QoS 1 PUBACK (QoS 2 PUBREC) is sent
//! only once the publish was either **durably accepted** (on disk in the outbox, as for
//! HTTP's `202`) or refused with its error already queued ahead of the PUBACK on the
//! same connection. So a device subscribed to its errors topic on the connection it
//! publishes from knows, when the PUBACK arrives, that no error before it means the
//! readings are on disk, as strict as the HTTP path. Without that subscription, a PUBACK
//! only means "handled". A publish whose PUBACK is lost (the connection drops) is sent
//! again by the client and accepted again: delivery into the outbox is at least once, as
//! with a retried HTTP POST. QoS 0 publishes get no answer but refusals.
//!
//! # What the server is not
//! An ingest endpoint, not a general broker: device publishes go to the outbox, not to
//! other subscribers; only the edge publishes (the errors topics). No sessions are kept
//! (CONNACK always says no session is present, so clients subscribe again), retained
//! messages and wills are ignored, MQTT 5 clients are refused with "unacceptable protocol
//! version". A second connection with a client id already connected takes over and
//! closes the first, as MQTT requires.
//!
//! # Why a server of our own and not an embedded broker
//! rumqttd 0.20 (with `default-features = false`) was tried first and does not fit:
//! `Server::start` binds its listener itself and never reveals the bound address (no
//! port 0 in tests, nothing to log); neither the router thread nor the servers can be
//! stopped; the broker sends the QoS 1 PUBACK as soon as its in-memory log has the
//! publish, before the edge could persist it, and that log drops old segments when a
//! subscriber lags, so an acknowledged reading could be lost (our first guarantee); and it
//! still pulls in axum 0.7, hyper 0.14, a Prometheus exporter and `config` with five
//! formats (~65 crates). What devices need here is a handful of packet types, so the
//! server is this module over a well-kept codec: the MQTT 3.1.1 packets of `rumqttc`
//! (`rumqttc::mqttbytes`, the successor of the `mqttbytes` crate, from the same project
//! as rumqttd), built without TLS so it links no crypto. The same crate is the devices'
//! client in the tests.

use crate::http::MAX_READINGS;
use crate::outbox::{Item, ItemKind, Outbox, OutboxError};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// Largest packet a device may send (its remaining length), in bytes: the HTTP body limit.
pub const MAX_PACKET_BYTES: usize = crate::http::MAX_BODY_BYTES;
/// How long a new connection has to send its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, once stopping, the server waits for connections to finish what they are
/// doing before it drops them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Packets queued for one connection; an error for a connection whose queue is full is
/// dropped (QoS 0), except for the connection that published, which waits.
const OUTGOING_QUEUE: usize = 64;

/// One reading as a device publishes it (the device is in the topic).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedReading {
    /// The signal's name in the catalogue.
    pub signal: String,
    /// The value.
    pub value: f64,
    /// The device's clock, Unix ms.
    pub ts_ms: u64,
}

/// An alarm as a device publishes it (the device is in the topic).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedAlarm {
    /// The alarm kind (`smoke`, `leak`…).
    pub kind: String,
    /// The device's clock, Unix ms.
    pub ts_ms: u64,
}

/// What the edge publishes on `caretwin/<device-id>/errors` when it refuses a publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// What was wrong, for people.
    pub error: String,
    /// As the HTTP status: 400 bad input, 507 outbox full, 503 the outbox cannot write.
    pub code: u16,
}

/// The topic the edge publishes a device's refusals on.
pub fn errors_topic(device: &str) -> String {
    format!("caretwin/{device}/errors")
}

// ---- reading a publish (pure) -------------------------------------------------------------

/// A device's publish, read: its device and the items for the outbox.
#[derive(Debug, Clone, PartialEq)]
struct Publication {
    device: String,
    items: Vec<Item>,
}

/// Why a publish is refused before the outbox sees it.
#[derive(Debug, Clone, PartialEq)]
enum Unreadable {
    /// The topic is not `caretwin/<device-id>/<kind>`: there is no device to tell.
    NotOurs,
    /// Bad input from `device`, told on its errors topic.
    Bad { device: String, error: String },
}

/// Reads a device's publish into outbox items.
fn read_publish(topic: &str, payload: &[u8]) -> Result<Publication, Unreadable> {
    let mut levels = topic.split('/');
    let (Some("caretwin"), Some(device), Some(kind), None) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return Err(Unreadable::NotOurs);
    };
    let bad = |error: String| Unreadable::Bad {
        device: device.to_owned(),
        error,
    };
    let items = match kind {
        "readings" => {
            let readings: Vec<PublishedReading> = serde_json::from_slice(payload)
                .map_err(|e| bad(format!("malformed readings: {e}")))?;
            if readings.is_empty() || readings.len() > MAX_READINGS {
                return Err(bad(format!(
                    "{} readings: send 1..={MAX_READINGS}",
                    readings.len()
                )));
            }
            readings
                .into_iter()
                .map(|r| {
                    Item::new(
                        device,
                        r.ts_ms,
                        ItemKind::Reading {
                            signal: r.signal,
                            value: r.value,
                        },
                    )
                })
                .collect()
        }
        "alarms" => {
            let a: PublishedAlarm = serde_json::from_slice(payload)
                .map_err(|e| bad(format!("malformed alarm: {e}")))?;
            vec![Item::alarm(device, a.ts_ms, &a.kind, None)]
        }
        other => {
            return Err(bad(format!(
                "unknown topic {topic:?}: publish to caretwin/<device-id>/readings or /alarms, not /{other}"
            )));
        }
    };
    Ok(Publication {
        device: device.to_owned(),
        items,
    })
}

// ---- taking a publish into the outbox -----------------------------------------------------

/// What became of a publish.
#[derive(Debug)]
enum Outcome {
    /// On disk in the outbox.
    Accepted,
    /// Refused; the publish is handled (acknowledged) after the error is sent.
    Refused { device: String, report: ErrorReport },
    /// Outside `caretwin/<device-id>/…`; dropped, no one to tell.
    Ignored,
    /// The outbox cannot take anything; the publish must not be acknowledged.
    Unavailable { device: String, report: ErrorReport },
}

struct Ingest {
    outbox: Arc<Outbox>,
    new_items: Arc<Notify>,
}

impl Ingest {
    async fn take(&self, topic: &str, payload: &[u8]) -> Outcome {
        let p = match read_publish(topic, payload) {
            Ok(p) => p,
            Err(Unreadable::NotOurs) => return Outcome::Ignored,
            Err(Unreadable::Bad { device, error }) => {
                return Outcome::Refused {
                    device,
                    report: ErrorReport { error, code: 400 },
                };
            }
        };
        if let [item] = p.items.as_slice()
            && let ItemKind::Alarm { kind, .. } = &item.kind
        {
            tracing::warn!(device = %p.device, alarm = %kind, "SAFETY ALARM from the LAN");
        }
        let device = p.device;
        match self.outbox.accept(p.items).await {
            Ok(_) => {
                self.new_items.notify_waiters();
                Outcome::Accepted
            }
            Err(OutboxError::Full { used, limit }) => Outcome::Refused {
                device,
                report: ErrorReport {
                    error: format!(
                        "edge outbox full ({used} of {limit} bytes): keep the readings and retry later"
                    ),
                    code: 507,
                },
            },
            Err(
                e @ (OutboxError::InvalidItem { .. }
                | OutboxError::TooManyItems { .. }
                | OutboxError::InvalidArgument(_)),
            ) => Outcome::Refused {
                device,
                report: ErrorReport {
                    error: e.to_string(),
                    code: 400,
                },
            },
            Err(e) => Outcome::Unavailable {
                device,
                report: ErrorReport {
                    error: e.to_string(),
                    code: 503,
                },
            },
        }
    }
}

// ---- connections and subscriptions --------------------------------------------------------

struct Connected {
    client_id: String,
    filters: Vec<String>,
    outgoing: mpsc::Sender<Packet>,
    /// Fired when another connection takes this client id over.
    take_over: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    connections: HashMap<u64, Connected>,
    by_client: HashMap<String, u64>,
}

struct Shared {
    ingest: Ingest,
    registry: Mutex<Registry>,
}

impl Shared {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry's maps stay consistent at every step, so a panic elsewhere while
        // holding the lock leaves nothing half done.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection of `client_id`, closing an earlier one of the same id.
    fn register(
        &self,
        client_id: &str,
        outgoing: mpsc::Sender<Packet>,
    ) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut r = self.registry();
        let id = r.next_id;
        r.next_id += 1;
        if let Some(old) = r.by_client.insert(client_id.to_owned(), id)
            && let Some(mut c) = r.connections.remove(&old)
            && let Some(t) = c.take_over.take()
        {
            tracing::info!(client = %client_id, "MQTT client id taken over by a new connection");
            let _ = t.send(());
        }
        r.connections.insert(
            id,
            Connected {
                client_id: client_id.to_owned(),
                filters: Vec::new(),
                outgoing,
                take_over: Some(tx),
            },
        );
        (id, rx)
    }

    fn unregister(&self, id: u64) {
        let mut r = self.registry();
        if let Some(c) = r.connections.remove(&id)
            && r.by_client.get(&c.client_id) == Some(&id)
        {
            r.by_client.remove(&c.client_id);
        }
    }

    fn subscribe(&self, id: u64, filter: &str) {
        if let Some(c) = self.registry().connections.get_mut(&id)
            && !c.filters.iter().any(|f| f == filter)
        {
            c.filters.push(filter.to_owned());
        }
    }

    fn unsubscribe(&self, id: u64, filter: &str) {
        if let Some(c) = self.registry().connections.get_mut(&id) {
            c.filters.retain(|f| f != filter);
        }
    }

    /// Publishes `report` on `device`'s errors topic to every matching subscriber, at QoS
    /// 0. The connection `from` (which published what is refused) gets it queued ahead of
    /// anything it is sent later, waiting for room if need be; others get it if their
    /// queue has room.
    async fn tell(&self, from: u64, device: &str, report: &ErrorReport) {
        let topic = errors_topic(device);
        let payload = Bytes::from(serde_json::to_vec(report).unwrap_or_default());
        let packet = Packet::Publish(Publish::from_bytes(
            topic.as_str(),
            QoS::AtMostOnce,
            payload,
        ));
        let mut own = None;
        for (&id, c) in &self.registry().connections {
            if !c.filters.iter().any(|f| mqttbytes::matches(&topic, f)) {
                continue;
            }
            if id == from {
                own = Some(c.outgoing.clone());
            } else if c.outgoing.try_send(packet.clone()).is_err() {
                tracing::debug!(client = %c.client_id, %topic, "MQTT subscriber behind: error dropped");
            }
        }
        if let Some(own) = own {
            let _ = own.send(packet).await;
        }
    }
}

/// Serves MQTT on `listener`, taking publishes into `outbox` and waking the sync with
/// `new_items`, until `shutdown` resolves. Then it stops accepting, lets every connection
/// finish the publish it is handling (at most [`DRAIN_TIMEOUT`]), closes them and returns.
pub async fn serve(
    listener: TcpListener,
    outbox: Arc<Outbox>,
    new_items: Arc<Notify>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let shared = Arc::new(Shared {
        ingest: Ingest { outbox, new_items },
        registry: Mutex::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(connection(stream, peer, shared.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: let connections finish rather
                    // than spin on the error.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "MQTT connection task failed");
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "MQTT connections still busy at shutdown: closing them"
        );
        connections.shutdown().await;
    }
    tracing::info!("MQTT ingest stopped");
}

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("peer closed the connection")]
    Eof,
    #[error("no packet for {0:?}")]
    Idle(Duration),
    #[error("malformed packet: {0}")]
    Codec(#[from] mqttbytes::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("outbox unavailable: {0}")]
    Unavailable(String),
    #[error("outgoing queue closed")]
    Writer,
}

/// Reads whole packets from a connection.
struct Reader {
    read: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// The next packet. Cancel-safe: bytes read so far stay in the buffer.
    async fn next(&mut self) -> Result<Packet, Closed> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET_BYTES) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(n)) => {
                    self.buf.reserve(n);
                    if self.read.read_buf(&mut self.buf).await? == 0 {
                        return Err(Closed::Eof);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next packet, if one comes within `limit`.
    async fn next_within(&mut self, limit: Option<Duration>) -> Result<Packet, Closed> {
        match limit {
            Some(d) => tokio::time::timeout(d, self.next())
                .await
                .map_err(|_| Closed::Idle(d))?,
            None => self.next().await,
        }
    }
}

/// Writes what is queued for a connection, in order, then closes its sending side.
async fn write_packets(mut write: OwnedWriteHalf, mut queue: mpsc::Receiver<Packet>) {
    let mut buf = BytesMut::with_capacity(4096);
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        // Whatever else is already queued goes out in the same write.
        while let Some(p) = next {
            if let Err(e) = p.write(&mut buf, usize::MAX) {
                tracing::warn!(error = %e, "MQTT packet not encodable: dropped");
            }
            next = if buf.len() < 64 * 1024 {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = write.write_all(&buf).await {
            // Dropping the queue makes the reading side stop too.
            tracing::debug!(error = %e, "MQTT write failed");
            return;
        }
        buf.clear();
    }
    let _ = write.shutdown().await;
}

#[tracing::instrument(name = "mqtt", skip_all, fields(%peer, client = tracing::field::Empty))]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
    let reader = Reader {
        read,
        buf: BytesMut::with_capacity(4096),
    };
    let ((), ()) = tokio::join!(
        async move {
            match session(reader, outgoing, &shared, stop, peer).await {
                Ok(()) | Err(Closed::Eof) => tracing::debug!("MQTT connection closed"),
                Err(e) => tracing::info!(error = %e, "MQTT connection closed"),
            }
        },
        write_packets(write, queue),
    );
}

/// Removes a connection from the registry however its session ends.
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

async fn session(
    mut reader: Reader,
    outgoing: mpsc::Sender<Packet>,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) -> Result<(), Closed> {
    let connect = match reader.next_within(Some(CONNECT_TIMEOUT)).await? {
        Packet::Connect(c) => c,
        other => {
            return Err(Closed::Protocol(format!("expected CONNECT, got {other:?}")));
        }
    };
    let send = |p: Packet| {
        let outgoing = outgoing.clone();
        async move { outgoing.send(p).await.map_err(|_| Closed::Writer) }
    };
    if connect.protocol != Protocol::V4 {
        send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::RefusedProtocolVersion,
            false,
        )))
        .await?;
        return Err(Closed::Protocol("MQTT 5 is not served: use 3.1.1".into()));
    }
    let client_id = if connect.client_id.is_empty() {
        if !connect.clean_session {
            send(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::BadClientId,
                false,
            )))
            .await?;
            return Err(Closed::Protocol(
                "an empty client id needs a clean session".into(),
            ));
        }
        // Unique while this connection lasts, which is all a clean session needs.
        format!("caretwin-edge-{peer}")
    } else {
        connect.client_id
    };
    tracing::Span::current().record("client", client_id.as_str());
    let (id, mut taken_over) = shared.register(&client_id, outgoing.clone());
    let _registered = Registered { shared, id };
    // No session is kept, so none is ever present.
    send(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    )))
    .await?;

    // MQTT 3.1.1 §3.1.2.10: one and a half keep-alive periods without a packet end it.
    let idle = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    // QoS 2 publishes taken and answered with PUBREC, awaiting their PUBREL.
    let mut awaiting_release: HashSet<u16> = HashSet::new();
    loop {
        let packet = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = &mut taken_over => return Ok(()),
            p = reader.next_within(idle) => p?,
        };
        // Handled to the end, whatever `stop` says meanwhile: this is the drain.
        match packet {
            Packet::Publish(p) => {
                if mqttbytes::has_wildcards(&p.topic) {
                    return Err(Closed::Protocol(format!(
                        "wildcard in publish topic {:?}",
                        p.topic
                    )));
                }
                if p.qos == QoS::ExactlyOnce && awaiting_release.contains(&p.pkid) {
                    // A resend of a publish already taken: answer it again, take it once.
                    send(Packet::PubRec(PubRec::new(p.pkid))).await?;
                    continue;
                }
                match shared.ingest.take(&p.topic, &p.payload).await {
                    Outcome::Accepted => {}
                    Outcome::Ignored => {
                        tracing::debug!(topic = %p.topic, "MQTT publish outside caretwin/<device-id>/: dropped");
                    }
                    Outcome::Refused { device, report } => {
                        tracing::debug!(%device, code = report.code, error = %report.error, "MQTT publish refused");
                        shared.tell(id, &device, &report).await;
                    }
                    Outcome::Unavailable { device, report } => {
                        tracing::warn!(%device, error = %report.error, "MQTT publish not taken: outbox unavailable");
                        shared.tell(id, &device, &report).await;
                        return Err(Closed::Unavailable(report.error));
                    }
                }
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => send(Packet::PubAck(PubAck::new(p.pkid))).await?,
                    QoS::ExactlyOnce => {
                        awaiting_release.insert(p.pkid);
                        send(Packet::PubRec(PubRec::new(p.pkid))).await?;
                    }
                }
            }
            Packet::PubRel(r) => {
                awaiting_release.remove(&r.pkid);
                send(Packet::PubComp(PubComp::new(r.pkid))).await?;
            }
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|f| {
                        if mqttbytes::valid_filter(&f.path) {
                            shared.subscribe(id, &f.path);
                            SubscribeReasonCode::Success(QoS::AtMostOnce)
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                send(Packet::SubAck(SubAck::new(s.pkid, codes))).await?;
            }
            Packet::Unsubscribe(u) => {
                for t in &u.topics {
                    shared.unsubscribe(id, t);
                }
                send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await?;
            }
            Packet::PingReq => send(Packet::PingResp).await?,
            Packet::Disconnect => return Ok(()),
            // Acknowledgements of QoS 0 deliveries cannot come; nothing to do if they do.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            other @ (Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => {
                return Err(Closed::Protocol(format!("unexpected {other:?}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(device: &str) -> impl Fn(Result<Publication, Unreadable>) -> bool + '_ {
        move |r| matches!(r, Err(Unreadable::Bad { device: d, .. }) if d == device)
    }

    #[test]
    fn readings_come_from_the_topic_and_the_payload() {
        let p = read_publish(
            "caretwin/t1:c1/readings",
            br#"[{"signal":"brew_pressure","value":9.1,"ts_ms":5},{"signal":"temp","value":90,"ts_ms":6}]"#,
        )
        .unwrap();
        assert_eq!(p.device, "t1:c1");
        assert_eq!(
            p.items,
            vec![
                Item::reading("t1:c1", 5, "brew_pressure", 9.1),
                Item::reading("t1:c1", 6, "temp", 90.0),
            ]
        );
        let a = read_publish("caretwin/t1:hub/alarms", br#"{"kind":"smoke","ts_ms":7}"#).unwrap();
        assert_eq!(a.items, vec![Item::alarm("t1:hub", 7, "smoke", None)]);
    }

    #[test]
    fn bad_payloads_and_topics_are_refused_naming_the_device() {
        let many = format!(
            "[{}]",
            vec![r#"{"signal":"s","value":1,"ts_ms":1}"#; MAX_READINGS + 1].join(",")
        );
        for (topic, payload) in [
            ("caretwin/d/readings", "not json"),
            ("caretwin/d/readings", "[]"),
            ("caretwin/d/readings", many.as_str()),
            (
                "caretwin/d/readings",
                r#"[{"signal":"s","value":1e999,"ts_ms":1}]"#,
            ),
            (
                "caretwin/d/readings",
                r#"[{"signal":"s","value":"NaN","ts_ms":1}]"#,
            ),
            (
                "caretwin/d/readings",
                r#"[{"signal":"s","value":1,"ts_ms":1,"x":1}]"#,
            ),
            ("caretwin/d/alarms", r#"{"kind":"smoke"}"#),
            ("caretwin/d/commands", "{}"),
        ] {
            assert!(
                bad("d")(read_publish(topic, payload.as_bytes())),
                "{topic} {payload}"
            );
        }
    }

    #[test]
    fn topics_outside_caretwin_devices_are_not_ours() {
        for topic in [
            "other/d/readings",
            "caretwin/d",
            "caretwin/d/readings/x",
            "",
        ] {
            assert_eq!(
                read_publish(topic, b"[]"),
                Err(Unreadable::NotOurs),
                "{topic}"
            );
        }
    }
}
