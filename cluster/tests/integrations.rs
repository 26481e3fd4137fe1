//! Outbound integrations over real gRPC on loopback: the parts desk's supplier orders and
//! the customers' bookings go through `Integrations` to the built-in partners, with the
//! intent recorded before each call and the outcome after it. Desk timers run in virtual
//! time; the partners' clients retry with millisecond backoff, so nothing sleeps.

use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::ManualClock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::host::registry::HostConfig;
use caretwin_actors::host::shard_of;
use caretwin_actors::mail::{Address, Body, Mail};
use caretwin_actors::model::HOUR_MS;
use caretwin_actors::services::parts::{OrderState, PartsConfig};
use caretwin_actors::services::scheduler::{SchedulerConfig, TechnicianConfig};
use caretwin_actors::services::{Status, Tenants};
use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use caretwin_actors::system::{Components, ServicesConfig, System};
use caretwin_cluster::config::{BuiltinStock, BuiltinSupplierConfig, RetryConfig};
use caretwin_cluster::integrations::client::{CallError, FieldServiceLink, Link, SupplierLink};
use caretwin_cluster::integrations::field_service::InProcessFieldService;
use caretwin_cluster::integrations::supplier::InProcessSupplier;
use caretwin_cluster::integrations::{Integrations, Loopback, record_key, serve_loopback};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_proto::v1::field_service_server::FieldServiceServer;
use caretwin_proto::v1::parts_supplier_server::PartsSupplierServer;
use std::sync::Arc;
use std::time::Duration;

mod common;

/// Monday 2024-01-01 00:00 UTC.
const MON: u64 = 1_704_067_200_000;
const SHARDS: u32 = 4;
const KEY: &str = "case-7/PUMP-9";

/// Mail to anything but the partners: none is expected in these tests.
struct Nowhere;

#[async_trait::async_trait]
impl Router for Nowhere {
    async fn deliver(&self, mail: Mail) -> caretwin_actors::Result<Delivery> {
        Ok(Delivery::Rejected(format!("nowhere takes {}", mail.id)))
    }
}

/// What outlives a "crash": the store, the clock and the partners.
struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    supplier: Arc<InProcessSupplier>,
    supplier_server: Loopback,
    field_service: Arc<InProcessFieldService>,
    field_service_server: Loopback,
}

fn retry(attempts: u32) -> RetryConfig {
    RetryConfig {
        first: Duration::from_millis(1),
        max: Duration::from_millis(4),
        attempts,
        pause: Duration::ZERO,
    }
}

fn technicians() -> Tenants<SchedulerConfig> {
    Tenants::all(SchedulerConfig {
        technicians: vec![TechnicianConfig {
            id: "tech-ana".into(),
            skills: vec!["pump".into()],
            regions: vec!["north".into()],
            days: vec![caretwin_actors::services::scheduler::Weekday::Mon],
            start: caretwin_actors::services::scheduler::TimeOfDay(8 * 60),
            end: caretwin_actors::services::scheduler::TimeOfDay(17 * 60),
        }],
        ..SchedulerConfig::default()
    })
}

async fn world(stock: Vec<BuiltinStock>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
    let clock = Arc::new(ManualClock::new(MON));
    let supplier = Arc::new(InProcessSupplier::new(
        BuiltinSupplierConfig {
            inventory: stock,
            ..BuiltinSupplierConfig::default()
        },
        clock.clone(),
    ));
    let supplier_server = serve_loopback(tonic::service::Routes::new(
        PartsSupplierServer::from_arc(supplier.clone()),
    ))
    .await
    .unwrap();
    let field_service = Arc::new(InProcessFieldService::new(technicians(), clock.clone()));
    let field_service_server = serve_loopback(tonic::service::Routes::new(
        FieldServiceServer::from_arc(field_service.clone()),
    ))
    .await
    .unwrap();
    World {
        _dir: dir,
        store,
        clock,
        supplier,
        supplier_server,
        field_service,
        field_service_server,
    }
}

/// One life of the node: its desks and its router to the partners.
struct Node {
    system: Arc<System>,
    router: Arc<Integrations>,
}

impl World {
    fn router(&self, attempts: u32, bookings: bool) -> Integrations {
        let r = Integrations::new(self.store.clone(), Arc::new(Nowhere)).with_supplier(
            Link::loopback("supplier", self.supplier_server.addr(), &retry(attempts)).unwrap(),
        );
        if bookings {
            let link = Link::loopback(
                "field_service",
                self.field_service_server.addr(),
                &retry(attempts),
            )
            .unwrap();
            r.with_field_service(link)
        } else {
            r
        }
    }

    /// Starts the desks with a router of `attempts` calls per delivery.
    async fn start(&self, attempts: u32, bookings: bool) -> Node {
        let router = Arc::new(self.router(attempts, bookings));
        let field_service = bookings.then(|| router.clone() as Arc<dyn Router>);
        let system = System::start_with_field_service(
            Components {
                store: self.store.clone(),
                clock: self.clock.clone(),
                catalogue: Arc::new(Catalogue::builtin()),
                device_env: None,
                services: ServicesConfig {
                    parts: Tenants::all(PartsConfig::default()),
                    scheduler: technicians(),
                    ..ServicesConfig::default()
                },
                host: HostConfig {
                    shards: SHARDS,
                    idle_ms: HOUR_MS,
                },
                outside: router.clone(),
                local_supplier: None,
            },
            field_service,
        )
        .await
        .unwrap();
        let system = Arc::new(system);
        router.bind(&system);
        Node { system, router }
    }
}

impl Node {
    /// The process dies: its memory is gone, the store and the partners remain.
    async fn crash(self) {
        let Node { system, router } = self;
        drop(router);
        match Arc::try_unwrap(system) {
            Ok(system) => system.stop().await,
            Err(_) => panic!("the system is still referenced"),
        }
    }

    async fn order(&self, state: impl Fn(&OrderState) -> bool + Send + 'static) -> bool {
        self.system
            .parts()
            .inspect("t1", move |d| {
                d.and_then(|d| d.order(KEY))
                    .is_some_and(|o| state(&o.state))
            })
            .await
            .unwrap()
    }

    async fn placed_detail(&self) -> Option<String> {
        self.system
            .parts()
            .inspect("t1", |d| {
                match d.and_then(|d| d.order(KEY)).map(|o| &o.state) {
                    Some(OrderState::Placed { detail, .. }) => Some(detail.clone()),
                    _ => None,
                }
            })
            .await
            .unwrap()
    }
}

fn order_part() -> Mail {
    Mail {
        id: "t1:cust-1/1".into(),
        from: Address::Customer("t1:cust-1".into()),
        to: Address::Parts("t1".into()),
        body: Body::OrderPart {
            key: KEY.into(),
            part_number: "PUMP-9".into(),
            quantity: 1,
            customer: "t1:cust-1".into(),
            case_id: "case-7".into(),
            device: String::new(),
        },
    }
}

/// The mail waiting in `kind`'s outbox (tenant t1's shard) that `wanted` picks.
async fn waiting(store: &dyn Store, kind: &str, wanted: fn(&Body) -> bool) -> Vec<Mail> {
    let queue = Key::new(format!("outbox/{kind}/{}", shard_of("t1", SHARDS)));
    store
        .read_outbox(&queue, 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| Mail::decode(&e.value).unwrap())
        .filter(|m| wanted(&m.body))
        .collect()
}

/// The supplier orders waiting in the parts desk's outbox.
async fn supplier_orders(store: &dyn Store) -> Vec<Mail> {
    waiting(store, "parts", |b| matches!(b, Body::SupplierOrder { .. })).await
}

async fn record(store: &dyn Store, partner: &str, key: &str) -> serde_json::Value {
    let bytes = store
        .idempotency(&record_key(partner, "t1", key))
        .await
        .unwrap()
        .expect("a record");
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_placed_once_however_often_its_mail_is_redelivered() {
    let w = world(vec![]).await;
    let node = w.start(3, false).await;
    assert_eq!(
        node.system.parts().call("t1", order_part()).await.unwrap(),
        Status::Done
    );
    let mail = supplier_orders(&*w.store).await.remove(0);
    let report = node.system.pump().await.unwrap();
    assert_eq!((report.dropped, report.stalled), (0, 0));
    let detail = node.placed_detail().await.expect("placed");
    assert_eq!(detail, "SO-000001");
    assert_eq!(w.supplier.calls(), 1);

    // The dispatcher may deliver the same mail again (a crash before its dequeue): the
    // recorded outcome answers, with no call.
    for _ in 0..5 {
        assert_eq!(
            node.router.deliver(mail.clone()).await.unwrap(),
            Delivery::Delivered
        );
    }
    assert_eq!(w.supplier.calls(), 1, "replayed from the record");
    let r = record(&*w.store, "supplier", KEY).await;
    assert_eq!(r["outcome"]["accepted"], true, "{r}");
    assert_eq!(r["mail"], mail.id.as_str());

    // A router whose record is lost (another store) calls again with the same key: the
    // supplier honours it.
    let elsewhere = world(vec![]).await;
    let lost = Integrations::new(elsewhere.store.clone(), Arc::new(Nowhere))
        .with_supplier(Link::loopback("supplier", w.supplier_server.addr(), &retry(3)).unwrap());
    lost.bind(&node.system);
    assert_eq!(lost.deliver(mail).await.unwrap(), Delivery::Delivered);
    assert_eq!(w.supplier.calls(), 2);
    assert_eq!(w.supplier.orders_placed(), 1, "one order for the key");
    assert_eq!(node.placed_detail().await.unwrap(), detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_backoff_and_the_order_placed_once() {
    let w = world(vec![]).await;
    let node = w.start(4, false).await;
    w.supplier.fail_next(3);
    node.system.parts().call("t1", order_part()).await.unwrap();
    let report = node.system.pump().await.unwrap();
    assert_eq!(report.stalled, 0, "placed within one delivery");
    assert_eq!(w.supplier.calls(), 4, "three failures, then the order");
    assert_eq!(w.supplier.orders_placed(), 1);
    assert!(node.order(|s| matches!(s, OrderState::Placed { .. })).await);

    // Failing longer than the retries: the mail is given back and stays in the outbox
    // (the queue stalls) until a later round succeeds.
    let other = Mail {
        id: "t1:cust-1/2".into(),
        body: Body::OrderPart {
            key: "case-8/PUMP-9".into(),
            part_number: "PUMP-9".into(),
            quantity: 1,
            customer: "t1:cust-1".into(),
            case_id: "case-8".into(),
            device: String::new(),
        },
        ..order_part()
    };
    node.system.settle(5).await.unwrap();
    w.supplier.fail_next(4);
    node.system.parts().call("t1", other).await.unwrap();
    let report = node.system.pump().await.unwrap();
    assert_eq!((report.delivered, report.stalled), (0, 1));
    assert_eq!(supplier_orders(&*w.store).await.len(), 1, "kept for later");
    let r = record(&*w.store, "supplier", "case-8/PUMP-9").await;
    assert!(r.get("outcome").is_none(), "the intent only: {r}");
    let report = node.system.pump().await.unwrap();
    assert_eq!(report.stalled, 0);
    assert!(supplier_orders(&*w.store).await.is_empty());
    assert_eq!(w.supplier.orders_placed(), 2);
    assert_eq!(w.supplier.calls(), 4 + 4 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_suppliers_acceptance_and_our_record_places_one_order() {
    let w = world(vec![]).await;
    let node = w.start(3, false).await;
    // The supplier records the order on the first call, but no answer ever reaches us.
    w.supplier.crash_after_recording_next(3);
    node.system.parts().call("t1", order_part()).await.unwrap();
    let report = node.system.pump().await.unwrap();
    assert_eq!((report.delivered, report.stalled), (0, 1));
    assert_eq!(
        w.supplier.orders_placed(),
        1,
        "the supplier holds the order"
    );
    let r = record(&*w.store, "supplier", KEY).await;
    assert!(r.get("outcome").is_none(), "only the intent is ours: {r}");
    assert!(node.order(|s| *s == OrderState::Waiting).await);
    node.crash().await;

    // Restarted from the same store: the mail is delivered again, the intent says a call
    // may have happened, so it goes with the same key.
    let node = w.start(3, false).await;
    let report = node.system.pump().await.unwrap();
    assert_eq!(report.stalled, 0);
    assert_eq!(w.supplier.orders_placed(), 1, "not placed twice");
    // Asked over gRPC, the supplier holds exactly the one order the desk was told of.
    let link =
        SupplierLink(Link::loopback("supplier", w.supplier_server.addr(), &retry(1)).unwrap());
    let held = link.get_order("t1", KEY).await.unwrap();
    let reference = held.supplier_reference;
    assert_eq!(node.placed_detail().await.unwrap(), reference, "not lost");
    match link.get_order("t2", KEY).await {
        Err(CallError::Refused { code, .. }) => assert_eq!(code, tonic::Code::NotFound),
        other => panic!("another tenant's order: {other:?}"),
    }
    let r = record(&*w.store, "supplier", KEY).await;
    assert_eq!(r["outcome"]["detail"], reference.as_str());
    assert_eq!(w.supplier.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_our_record_replays_the_outcome_without_a_call() {
    let w = world(vec![]).await;
    // The desks are down when the answer comes (the process dies before handing it on).
    let node = w.start(3, false).await;
    node.system.parts().call("t1", order_part()).await.unwrap();
    let mail = supplier_orders(&*w.store).await.remove(0);
    let unbound = w.router(3, false);
    assert!(
        unbound.deliver(mail).await.is_err(),
        "no desk took the answer"
    );
    assert_eq!(w.supplier.calls(), 1);
    let r = record(&*w.store, "supplier", KEY).await;
    assert_eq!(r["outcome"]["accepted"], true);

    node.system.pump().await.unwrap();
    assert_eq!(
        w.supplier.calls(),
        1,
        "the recorded outcome, no second call"
    );
    assert_eq!(node.placed_detail().await.unwrap(), "SO-000001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_backs_off_on_the_desks_timer_then_is_accepted() {
    let w = world(vec![BuiltinStock {
        part_number: "PUMP-9".into(),
        quantity: 0,
        lead_time: Some(Duration::from_secs(86_400)),
    }])
    .await;
    let node = w.start(3, false).await;
    node.system.parts().call("t1", order_part()).await.unwrap();
    node.system.pump().await.unwrap();
    assert!(
        node.order(|s| matches!(s, OrderState::Backoff { .. }))
            .await
    );
    assert_eq!(w.supplier.orders_placed(), 0);
    let r = record(&*w.store, "supplier", KEY).await;
    assert_eq!(r["outcome"]["accepted"], false, "{r}");

    // Restocked; the desk's retry is due a minute later, in virtual time.
    w.supplier.restock("PUMP-9", 1);
    w.clock.advance(30_000);
    node.system.settle(5).await.unwrap();
    assert!(
        node.order(|s| matches!(s, OrderState::Backoff { .. }))
            .await
    );
    assert_eq!(w.supplier.calls(), 1, "not before the backoff is over");
    w.clock.advance(30_000);
    node.system.settle(5).await.unwrap();
    assert!(node.order(|s| matches!(s, OrderState::Placed { .. })).await);
    assert_eq!(w.supplier.calls(), 2);
    assert_eq!(w.supplier.orders_placed(), 1);
    let arrives = node
        .system
        .parts()
        .inspect("t1", |d| match d.unwrap().order(KEY).unwrap().state {
            OrderState::Placed { arrives, .. } => arrives,
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(arrives, Some(MON + 60_000 + 86_400_000));
}

fn book(id: &str) -> Mail {
    Mail {
        id: id.into(),
        from: Address::Customer("t1:cust-1".into()),
        to: Address::Scheduler("t1".into()),
        body: Body::Book {
            key: "case-7/visit".into(),
            customer: "t1:cust-1".into(),
            case_id: "case-7".into(),
            skill: "pump".into(),
            region: "north".into(),
            not_before_ms: MON,
            windows: vec![],
            duration_ms: HOUR_MS,
            confirmed: false,
        },
    }
}

/// Puts mail in the customer twin's outbox, as the twin would.
async fn send_from_customer(store: &dyn Store, mail: &Mail) {
    let queue = Key::new(format!("outbox/customer/{}", shard_of("t1:cust-1", SHARDS)));
    store
        .commit(WriteBatch::new().with(Op::Enqueue {
            queue,
            value: mail.encode(),
        }))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_go_to_the_field_service_over_grpc_once_across_a_crash() {
    let w = world(vec![]).await;
    let node = w.start(2, true).await;
    // Unavailable for longer than one delivery's retries: given back.
    w.field_service.fail_next(2);
    send_from_customer(&*w.store, &book("t1:cust-1/1")).await;
    let report = node.system.pump().await.unwrap();
    assert_eq!((report.delivered, report.stalled), (0, 1));
    assert_eq!(w.field_service.visits("t1"), 0);
    node.crash().await;

    let node = w.start(2, true).await;
    let report = node.system.pump().await.unwrap();
    assert_eq!(
        (report.stalled, report.dropped),
        (0, 0),
        "the customer took the answer"
    );
    assert_eq!(w.field_service.visits("t1"), 1);
    assert_eq!(w.field_service.calls(), 3);
    let r = record(&*w.store, "field-service", "case-7/visit").await;
    assert_eq!(r["outcome"]["technician"], "tech-ana", "{r}");
    assert_eq!(
        r["outcome"]["slot"][0],
        MON + 8 * HOUR_MS,
        "Monday 08:00, the first slot"
    );

    // The customer's outbox delivers it again, or the twin asks again: one visit.
    send_from_customer(&*w.store, &book("t1:cust-1/1")).await;
    send_from_customer(&*w.store, &book("t1:cust-1/2")).await;
    node.system.pump().await.unwrap();
    assert_eq!(w.field_service.calls(), 3, "answered from the record");
    assert_eq!(w.field_service.visits("t1"), 1);
    let (kept, calendar) = node
        .system
        .scheduler()
        .inspect("t1", |d| {
            let d = d.unwrap();
            let kept: Vec<_> = d
                .bookings()
                .map(|(k, b)| (k.to_owned(), b.partner))
                .collect();
            (kept, d.calendar("tech-ana").len())
        })
        .await
        .unwrap();
    assert_eq!(
        (kept, calendar),
        (vec![("case-7/visit".to_owned(), true)], 0),
        "the desk keeps the partner's visit as an appointment, and books nothing itself"
    );

    // The visit can be cancelled over gRPC, once.
    let link = FieldServiceLink(
        Link::loopback("field_service", w.field_service_server.addr(), &retry(1)).unwrap(),
    );
    assert!(link.cancel("t1", "case-7/visit").await.unwrap().cancelled);
    assert!(!link.cancel("t1", "case-7/visit").await.unwrap().cancelled);
    assert_eq!(w.field_service.visits("t1"), 0);
}

/// The `CancelVisit` mail waiting in the scheduler desk's outbox.
async fn cancellations(store: &dyn Store) -> Vec<Mail> {
    waiting(store, "scheduler", |b| {
        matches!(b, Body::CancelVisit { .. })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partners_visit_cancelled_at_the_desk_frees_the_partners_slot_once() {
    let w = world(vec![]).await;
    let node = w.start(2, true).await;
    send_from_customer(&*w.store, &book("t1:cust-1/1")).await;
    node.system.pump().await.unwrap();
    assert_eq!(w.field_service.visits("t1"), 1);
    let appointment = node
        .system
        .scheduler()
        .inspect("t1", |d| {
            d.unwrap().booking("case-7/visit").unwrap().id.clone()
        })
        .await
        .unwrap();

    // Cancelled at the desk (an integrator's CancelAppointment) while the partner is down
    // for longer than one delivery's retries: the cancellation waits in the outbox.
    w.field_service.fail_next(2);
    let cancel = Mail {
        id: "t1/api/1".into(),
        from: Address::Scheduler("t1".into()),
        to: Address::Scheduler("t1".into()),
        body: Body::CancelBooking {
            appointment_id: appointment,
            reason: "the customer moved out".into(),
        },
    };
    assert_eq!(
        node.system
            .scheduler()
            .call("t1", cancel.clone())
            .await
            .unwrap(),
        Status::Done
    );
    let report = node.system.pump().await.unwrap();
    assert_eq!(report.stalled, 1, "given back while the partner is down");
    assert_eq!(w.field_service.visits("t1"), 1);
    assert_eq!(w.field_service.cancel_calls(), 2);
    let mail = cancellations(&*w.store).await.remove(0);
    node.crash().await;

    // After a restart it goes through: the slot is freed.
    let node = w.start(2, true).await;
    let report = node.system.pump().await.unwrap();
    assert_eq!((report.stalled, report.dropped), (0, 0));
    assert_eq!(w.field_service.visits("t1"), 0);
    assert_eq!(w.field_service.cancellations(), 1);
    let r = record(&*w.store, "field-service-cancel", "case-7/visit").await;
    assert_eq!(r["outcome"]["cancelled"], true, "{r}");
    let calls = w.field_service.cancel_calls();

    // Redelivered: answered from the record, no call.
    assert_eq!(
        node.router.deliver(mail.clone()).await.unwrap(),
        Delivery::Delivered
    );
    assert_eq!(w.field_service.cancel_calls(), calls);
    // A crash between the call and its outcome leaves the intent only: called again with
    // the same key, the partner frees nothing a second time.
    let intent = serde_json::json!({ "mail": mail.id });
    w.store
        .commit(WriteBatch::new().with(Op::PutIdempotency {
            key: record_key("field-service-cancel", "t1", "case-7/visit"),
            value: serde_json::to_vec(&intent).unwrap(),
            mode: caretwin_actors::store::IdempotencyMode::Overwrite,
        }))
        .await
        .unwrap();
    assert_eq!(
        node.router.deliver(mail).await.unwrap(),
        Delivery::Delivered
    );
    assert_eq!(w.field_service.cancel_calls(), calls + 1);
    assert_eq!(
        w.field_service.cancellations(),
        1,
        "the slot was freed once"
    );
    // A second cancellation at the desk changes nothing and sends nothing.
    assert_eq!(
        node.system.scheduler().call("t1", cancel).await.unwrap(),
        Status::Duplicate
    );
    assert!(cancellations(&*w.store).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_field_service_the_desk_books() {
    let w = world(vec![]).await;
    let node = w.start(2, false).await;
    send_from_customer(&*w.store, &book("t1:cust-1/1")).await;
    node.system.pump().await.unwrap();
    assert_eq!(w.field_service.calls(), 0);
    let desk_bookings = node
        .system
        .scheduler()
        .inspect("t1", |d| d.map_or(0, |d| d.bookings().count()))
        .await
        .unwrap();
    assert_eq!(desk_bookings, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_is_reached_over_tls_with_its_ca_and_our_token() {
    use caretwin_cluster::config::RemoteService;
    use caretwin_proto::v1::PlaceOrderRequest;
    use tonic::transport::{Server, ServerTlsConfig};

    let dir = tempfile::tempdir().unwrap();
    let certs = common::dev_pki(dir.path());
    let identity =
        caretwin_cluster::grpc::identity(&certs.join("cluster.pem"), &certs.join("cluster.key"))
            .unwrap();
    let supplier = Arc::new(InProcessSupplier::new(
        BuiltinSupplierConfig::default(),
        Arc::new(ManualClock::new(MON)),
    ));
    let check = |request: tonic::Request<()>| match request.metadata().get("authorization") {
        Some(v) if v == "Bearer s3cret" => Ok(request),
        _ => Err(tonic::Status::unauthenticated("unknown token")),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                PartsSupplierServer::from_arc(supplier.clone()),
                check,
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stopped.await;
                },
            ),
    );
    let link = |token: &str| {
        let remote = RemoteService {
            endpoint: format!("https://localhost:{port}"),
            ca: Some(certs.join("ca.pem")),
            token: Some(token.into()),
            timeout: Duration::from_secs(5),
        };
        SupplierLink(Link::remote("supplier", &remote, &retry(2)).unwrap())
    };
    let request = PlaceOrderRequest {
        idempotency_key: KEY.into(),
        tenant: "t1".into(),
        part_number: "PUMP-9".into(),
        quantity: 1,
        deliver_to: String::new(),
    };
    let answer = link("s3cret").place_order(request.clone()).await.unwrap();
    assert!(answer.outcome.is_some());
    assert_eq!(supplier.orders_placed(), 1);
    // A wrong token is refused, not retried: retrying cannot help.
    match link("wrong").place_order(request).await {
        Err(CallError::Refused { code, .. }) => assert_eq!(code, tonic::Code::Unauthenticated),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        supplier.calls(),
        1,
        "the refused call never reached the service"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
