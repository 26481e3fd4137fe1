//! gRPC streams in a cluster: a client may connect to any node, whichever node hosts the
//! twins it follows. Real nodes in one process on one embedded store, real QUIC between
//! them, real tonic clients.
//!
//! Each test first checks that the twins producing the changes are hosted on another node
//! than the one serving the stream, and makes the stream read its log (or take its first
//! look) before the change it then waits for: nothing but a signal from the hosting node
//! over the peer channel can wake it (the streams do not poll).

use caretwin_actors::host::shard_of;
use caretwin_actors::twins::customer::{CustomerMsg, CustomerReply};
use caretwin_actors::twins::device::{DeviceItem, DeviceMsg, DeviceReply, ItemKind};
use caretwin_chaos::cluster::Cluster;
use caretwin_cluster::grpc::auth::{Scope, TokensFile, mint};
use caretwin_cluster::node::{Node, NodeOptions, now_ms};
use caretwin_proto::v1;
use caretwin_proto::v1::case_service_client::CaseServiceClient;
use caretwin_proto::v1::command_service_client::CommandServiceClient;
use caretwin_proto::v1::notification_service_client::NotificationServiceClient;
use caretwin_proto::v1::twin_service_client::TwinServiceClient;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const SHARDS: u32 = 16;
/// An update of a twin elsewhere must arrive well within this (it takes the watch's
/// `min_interval` plus milliseconds; this is far above that, for a loaded machine, and
/// below the peers' periodic re-telling of their watches).
const PROMPT: Duration = Duration::from_secs(5);
/// Only turns a hang into a failure; every wait ends on an observed event.
const DEADLINE: Duration = Duration::from_secs(30);
const HUB: &str = "hub.guardian-1";
const COFFEE: &str = "coffee.barista-200";
const SITE: &str = "t1:home";

/// Nodes sharing a store, each serving gRPC with one admin token of tenant `t1`.
struct World {
    c: Cluster,
    tokens: PathBuf,
    token: String,
}

impl World {
    async fn new(nodes: &[&str]) -> Self {
        let c = Cluster::new(SHARDS).await;
        let (token, entry) = mint("ops", "t1", vec![Scope::Admin]);
        let tokens = c.dir.path().join("tokens.toml");
        let file = TokensFile {
            tokens: vec![entry],
        };
        std::fs::write(&tokens, toml::to_string(&file).unwrap()).unwrap();
        let mut w = Self { c, tokens, token };
        for id in nodes {
            w.start(id).await;
        }
        w.c.wait_balanced(DEADLINE).await;
        w
    }

    async fn start(&mut self, id: &str) {
        let mut config = self.c.config(id);
        config.grpc.tokens = self.tokens.clone();
        let node = Node::start(
            config,
            NodeOptions {
                store: Some(self.c.store.clone()),
                ..NodeOptions::default()
            },
        )
        .await
        .expect("node starts");
        self.c.nodes.insert(id.into(), node);
    }

    async fn stop(&mut self, id: &str) {
        self.c.nodes.remove(id).unwrap().stop().await.unwrap();
    }

    fn node(&self, id: &str) -> &Node {
        self.c.node(id)
    }

    /// The node placement gives twin `id` among the running nodes.
    fn owner(&self, id: &str) -> String {
        let ids = self.c.nodes.keys().map(String::as_str);
        caretwin_actors::placement::owner(shard_of(id, SHARDS), ids)
            .unwrap()
            .to_owned()
    }

    /// Asserts twin `id` is hosted on `node` and nowhere else right now.
    fn assert_hosted(&self, id: &str, node: &str) {
        let shard = shard_of(id, SHARDS);
        for (n, handle) in &self.c.nodes {
            assert_eq!(
                handle.system().hosted_shards().contains(&shard),
                n == node,
                "twin {id} (shard {shard}) should be hosted on {node} only; {n} disagrees"
            );
        }
    }

    /// The first `n` ids `prefix<i>` whose twins placement puts on `node`.
    fn ids_on(&self, prefix: &str, node: &str, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .filter(|id| self.owner(id) == node)
            .take(n)
            .collect()
    }

    async fn channel(&self, node: &str) -> Channel {
        let ca = std::fs::read(self.c.dir.path().join("certs/ca.pem")).unwrap();
        Channel::from_shared(format!("https://{}", self.node(node).grpc_addr()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn with<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        r
    }

    /// Provisions `device` of `model` for `customer` (through node `via`).
    async fn provision(&self, via: &str, customer: &str, device: &str, model: &str) {
        let system = self.node(via).system();
        let add = CustomerMsg::AddDevice {
            device: device.into(),
            model: model.into(),
        };
        assert_eq!(
            system.customers().call(customer, add).await.unwrap(),
            CustomerReply::Ok
        );
        let prov = DeviceMsg::Provision {
            customer: customer.into(),
            site: SITE.into(),
            model: model.into(),
        };
        assert_eq!(
            system.devices().call(device, prov).await.unwrap(),
            DeviceReply::Ok
        );
    }

    /// The site reports `kind` from `device` as item `seq` (through node `via`).
    async fn report(&self, via: &str, device: &str, seq: u64, kind: ItemKind) {
        let msg = DeviceMsg::FromSite {
            site: SITE.into(),
            items: vec![DeviceItem {
                seq,
                ts_ms: now_ms() - 1_000,
                kind,
            }],
        };
        match self.node(via).system().devices().call(device, msg).await {
            Ok(DeviceReply::Applied(r)) => assert_eq!(r.applied, 1, "{r:?}"),
            other => panic!("{device} seq {seq}: {other:?}"),
        }
    }

    async fn stop_all(mut self) {
        for (_, n) in std::mem::take(&mut self.c.nodes) {
            n.stop().await.unwrap();
        }
    }
}

fn smoke() -> ItemKind {
    ItemKind::Alarm {
        kind: "smoke".into(),
        local_action: Some("siren_on".into()),
    }
}

fn brew_pressure(value: f64) -> ItemKind {
    ItemKind::Reading {
        signal: "brew_pressure".into(),
        value,
    }
}

async fn next<T>(stream: &mut tonic::Streaming<T>, what: &str) -> T {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what} in time"))
        .unwrap()
        .unwrap_or_else(|| panic!("the stream ended before {what}"))
}

/// The next handed-off case about `device`: its id.
async fn case_about(stream: &mut tonic::Streaming<v1::CaseDelivery>, device: &str) -> String {
    loop {
        let d = next(stream, &format!("the case of {device}")).await;
        let case = d.case.unwrap();
        if case.devices.iter().any(|x| x.device_id == device) {
            return case.case_id;
        }
    }
}

/// The next notification that speaks of `device`.
async fn notification_about(
    stream: &mut tonic::Streaming<v1::NotificationDelivery>,
    device: &str,
) -> v1::Notification {
    loop {
        let n = next(stream, &format!("the notification about {device}"))
            .await
            .notification
            .unwrap();
        if n.body.contains(device) {
            return n;
        }
    }
}

/// A case and the customer's notification, both logged by twins hosted on node B, reach
/// the desk's and the gateway's streams on node A.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cases_and_notifications_logged_on_one_node_reach_streams_on_another() {
    let w = World::new(&["n1", "n2"]).await;
    // B hosts the tenant's handoff queue (it appends the case log), and the customer's
    // twin (its mail to the notifier is recorded where it is delivered: on B too).
    let b = w.owner("t1");
    let a = if b == "n1" { "n2" } else { "n1" }.to_owned();
    let customer = w.ids_on("t1:alice-", &b, 1).remove(0);
    let hubs = w.ids_on("t1:hub-", &b, 2);
    for hub in &hubs {
        w.provision(&a, &customer, hub, HUB).await;
    }
    for id in ["t1", customer.as_str(), hubs[0].as_str(), hubs[1].as_str()] {
        w.assert_hosted(id, &b);
    }

    let mut cases = CaseServiceClient::new(w.channel(&a).await);
    let mut cases = cases
        .subscribe_cases(w.with(v1::SubscribeCasesRequest {
            subscriber_id: "desk".into(),
            kinds: vec![v1::CaseEventKind::HandedOff as i32],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut gateway = NotificationServiceClient::new(w.channel(&a).await);
    let mut notes = gateway
        .subscribe_notifications(w.with(v1::SubscribeNotificationsRequest {
            subscriber_id: "gateway".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();

    // The first alarm: once its case and notification arrived, both streams have read
    // their logs and wait for them to grow.
    w.report(&b, &hubs[0], 1, smoke()).await;
    let first = case_about(&mut cases, &hubs[0]).await;
    let note = notification_about(&mut notes, &hubs[0]).await;
    assert_eq!(note.priority, v1::Priority::Safety as i32);

    // The second: only B's word that the logs grew can wake A's streams.
    let raised = Instant::now();
    w.report(&b, &hubs[1], 1, smoke()).await;
    let second = case_about(&mut cases, &hubs[1]).await;
    let case_ms = raised.elapsed().as_millis();
    let note = notification_about(&mut notes, &hubs[1]).await;
    let note_ms = raised.elapsed().as_millis();
    assert_ne!(first, second);
    assert_eq!(note.customer_id, customer);
    eprintln!("alarm on {b} → case on {a}'s stream in {case_ms} ms, notification in {note_ms} ms");
    // Nothing moved meanwhile: the logs really grew on B.
    for id in ["t1", customer.as_str(), hubs[1].as_str()] {
        w.assert_hosted(id, &b);
    }
    drop((cases, notes));
    w.stop_all().await;
}

/// `WatchCommand` on node A follows a command whose device twin (which logs every
/// transition) is hosted on node B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_watched_on_one_node_follows_its_twin_on_another() {
    let w = World::new(&["n1", "n2"]).await;
    let b = "n2";
    let a = "n1";
    let device = w.ids_on("t1:coffee-", b, 1).remove(0);
    w.provision(a, "t1:alice", &device, COFFEE).await;
    w.assert_hosted(&device, b);

    let mut on_a = CommandServiceClient::new(w.channel(a).await);
    let mut on_b = CommandServiceClient::new(w.channel(b).await);
    let sent = on_a
        .send_command(w.with(v1::SendCommandRequest {
            idempotency_key: "cmd-1".into(),
            device_id: device.clone(),
            payload: Some(v1::CommandPayload {
                kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
                    name: "descale".into(),
                    args: Default::default(),
                })),
            }),
            priority: v1::Priority::High as i32,
            reason: "scale builds up".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.state, v1::CommandState::Queued as i32);
    let mut watch = on_a
        .watch_command(w.with(v1::WatchCommandRequest {
            command_id: sent.command_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    // Its history so far: the watch has read the log and waits for it to grow.
    let queued = next(&mut watch, "the queued transition").await;
    assert_eq!(queued.state, v1::CommandState::Queued as i32);

    // Cancelled through B: the twin on B logs it, and A's watch must be told.
    let asked = Instant::now();
    let cancelled = on_b
        .cancel_command(w.with(v1::CancelCommandRequest {
            command_id: sent.command_id.clone(),
            reason: "descaled by hand".into(),
            idempotency_key: "cancel-1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::CommandState::Cancelled as i32);
    let last = next(&mut watch, "the cancelled transition").await;
    eprintln!(
        "cancel on {b} → transition on {a}'s watch in {} ms",
        asked.elapsed().as_millis()
    );
    assert_eq!(last.state, v1::CommandState::Cancelled as i32);
    assert!(
        tokio::time::timeout(DEADLINE, watch.message())
            .await
            .expect("the end in time")
            .unwrap()
            .is_none(),
        "a final state ends the watch"
    );
    w.assert_hosted(&device, b);
    w.stop_all().await;
}

/// Waits for the watch's update showing `seq` applied; returns how long after `since`.
async fn update_with(
    stream: &mut tonic::Streaming<v1::TwinUpdate>,
    seq: u64,
    since: Instant,
) -> Duration {
    loop {
        let u = next(stream, &format!("the update with seq {seq}")).await;
        let applied = u.twin.as_ref().unwrap().applied_seq;
        assert!(applied <= seq, "{u:?}");
        if applied == seq {
            assert!(
                u.changes.contains(&(v1::TwinChange::Reported as i32)),
                "{u:?}"
            );
            return since.elapsed();
        }
    }
}

/// A twin watch's stream and what it saw.
struct Follow {
    device: &'static str,
    stream: tonic::Streaming<v1::TwinUpdate>,
    seq: u64,
    /// (hosting node, reading applied → update received).
    latencies: Vec<(String, Duration)>,
}

impl Follow {
    /// Three readings through node `via`, each waited for on the stream (a single stray
    /// wake-up cannot pass for them all), with the twin hosted on `host` throughout.
    async fn readings(&mut self, w: &World, via: &str, host: &str) {
        for _ in 0..3 {
            self.seq += 1;
            w.report(via, self.device, self.seq, brew_pressure(9.0))
                .await;
            let applied = Instant::now();
            let took = update_with(&mut self.stream, self.seq, applied).await;
            // Prompt, not found by some later sweep (the peers re-tell watches every 10 s).
            assert!(
                took < PROMPT,
                "seq {} on {host} took {took:?} to reach the watch",
                self.seq
            );
            self.latencies.push((host.to_owned(), took));
            w.assert_hosted(self.device, host);
        }
    }
}

/// `WatchTwins` on node A gets every change of a twin hosted on node B, and keeps getting
/// them on the same stream when B leaves (the shard moves to C) and when B joins again
/// (the shard moves back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twin_watched_on_one_node_is_followed_on_another_across_shard_moves() {
    let mut w = World::new(&["n1", "n2", "n3"]).await;
    let device = "t1:coffee-watched";
    // B hosts it; of the two others, C takes it when B leaves, and A watches.
    let b = w.owner(device);
    let others: Vec<String> = w.c.nodes.keys().filter(|n| **n != b).cloned().collect();
    let c = caretwin_actors::placement::owner(
        shard_of(device, SHARDS),
        others.iter().map(String::as_str),
    )
    .unwrap()
    .to_owned();
    let a = others.iter().find(|n| **n != c).unwrap().clone();
    w.provision(&c, "t1:alice", device, COFFEE).await;
    w.assert_hosted(device, &b);

    const MIN_INTERVAL_MS: u32 = 100;
    let mut twins = TwinServiceClient::new(w.channel(&a).await);
    let mut stream = twins
        .watch_twins(w.with(v1::WatchTwinsRequest {
            device_ids: vec![device.into()],
            send_initial: true,
            min_interval_ms: MIN_INTERVAL_MS,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    // The first look is taken: from now on A learns of changes only from their host.
    let initial = next(&mut stream, "the initial state").await;
    assert_eq!(initial.changes, [v1::TwinChange::Initial as i32]);
    assert_eq!(initial.twin.unwrap().applied_seq, 0);

    let mut f = Follow {
        device,
        stream,
        seq: 0,
        latencies: Vec::new(),
    };
    f.readings(&w, &b, &b).await;

    // B leaves: its shards are handed over, this twin's to C. The stream goes on.
    w.stop(&b).await;
    w.c.wait_balanced(DEADLINE).await;
    w.assert_hosted(device, &c);
    f.readings(&w, &a, &c).await;

    // B joins again and takes the shard back.
    w.start(&b).await;
    w.c.wait_balanced(DEADLINE).await;
    w.assert_hosted(device, &b);
    f.readings(&w, &c, &b).await;

    eprintln!("watch on {a}, min_interval {MIN_INTERVAL_MS} ms; reading applied → update:");
    for (host, l) in &f.latencies {
        eprintln!("  twin on {host}: {} ms", l.as_millis());
    }
    drop(f);
    w.stop_all().await;
}
