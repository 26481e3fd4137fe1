//! The service desks (parts, scheduler, handoff) hosted as twins on the real embedded store,
//! in virtual time: exactly-once effects across retries and restarts, durable timers.

use caretwin_actors::host::clock::ManualClock;
use caretwin_actors::host::registry::{HostConfig, Registry};
use caretwin_actors::host::{Twin, shard_of};
use caretwin_actors::mail::{Address, Body, CaseContext, Mail};
use caretwin_actors::model::Priority;
use caretwin_actors::services::handoff::{
    CaseEvent, CaseEventKind, HandoffConfig, HandoffQueue, cases_log,
};
use caretwin_actors::services::parts::{PartsConfig, PartsDesk, StockConfig};
use caretwin_actors::services::scheduler::{Scheduler, SchedulerConfig, TechnicianConfig};
use caretwin_actors::services::{Span, Status, Tenants};
use caretwin_actors::store::{Key, Store};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use std::sync::Arc;

/// Monday 2024-01-01 00:00 UTC.
const MON: u64 = 1_704_067_200_000;
const MIN: u64 = 60_000;
const SHARDS: u32 = 4;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
    Fixture {
        _dir: dir,
        store,
        clock: Arc::new(ManualClock::new(MON)),
    }
}

async fn host<T: Twin>(f: &Fixture, env: T::Env) -> Registry<T> {
    let config = HostConfig {
        shards: SHARDS,
        idle_ms: 1_000,
    };
    Registry::start(config, f.store.clone(), f.clock.clone(), Arc::new(env))
        .await
        .unwrap()
}

/// Everything in the outbox of the shard holding tenant `t1`'s desk of kind `T`.
async fn outbox<T: Twin>(f: &Fixture) -> Vec<Mail> {
    let queue = Key::new(format!("outbox/{}/{}", T::KIND, shard_of("t1", SHARDS)));
    f.store
        .read_outbox(&queue, 1, 1_000)
        .await
        .unwrap()
        .iter()
        .map(|e| Mail::decode(&e.value).unwrap())
        .collect()
}

fn from_customer(id: &str, to: Address, body: Body) -> Mail {
    Mail {
        id: id.into(),
        from: Address::Customer("t1:cust-1".into()),
        to,
        body,
    }
}

fn order_part(attempt: u32) -> Mail {
    from_customer(
        // Each retry of the customer twin's outbox is the same mail; a new decision would be
        // a new mail with the same key. Both must order once.
        &format!("t1:cust-1/{}", 10 + attempt % 2),
        Address::Parts("t1".into()),
        Body::OrderPart {
            key: "case-7/VALVE-22".into(),
            part_number: "VALVE-22".into(),
            quantity: 1,
            customer: "t1:cust-1".into(),
            case_id: "case-7".into(),
            device: "t1:dev-1".into(),
        },
    )
}

fn supplier_result(id: &str, accepted: bool) -> Mail {
    Mail {
        id: id.into(),
        from: Address::Supplier("t1".into()),
        to: Address::Parts("t1".into()),
        body: Body::SupplierResult {
            key: "case-7/VALVE-22".into(),
            accepted,
            arrives_at_ms: accepted.then_some(MON + 3 * 86_400_000),
            detail: if accepted { "SUP-1001" } else { "back-ordered" }.into(),
        },
    }
}

fn count(mails: &[Mail], f: impl Fn(&Body) -> bool) -> usize {
    mails.iter().filter(|m| f(&m.body)).count()
}

fn is_supplier_order(b: &Body) -> bool {
    matches!(b, Body::SupplierOrder { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_part_order_reaches_the_supplier_once_across_restarts() {
    let f = fixture();
    let env = || Tenants::all(PartsConfig::default());
    let reg = host::<PartsDesk>(&f, env()).await;
    assert_eq!(reg.call("t1", order_part(0)).await.unwrap(), Status::Done);
    assert_eq!(
        reg.call("t1", order_part(1)).await.unwrap(),
        Status::Duplicate
    );

    // The node restarts (and the desk was passivated before that).
    f.clock.advance(5_000);
    reg.tick().await.unwrap();
    assert_eq!(reg.stats().await.unwrap().active, 0);
    reg.stop().await;
    let reg = host::<PartsDesk>(&f, env()).await;
    for attempt in 2..5 {
        assert_eq!(
            reg.call("t1", order_part(attempt)).await.unwrap(),
            Status::Duplicate
        );
    }
    let mails = outbox::<PartsDesk>(&f).await;
    assert_eq!(count(&mails, is_supplier_order), 1, "{mails:#?}");
    assert_eq!(mails[0].to, Address::Supplier("t1".into()));
    assert_eq!(
        mails.len(),
        1,
        "nothing else while the supplier has not answered"
    );
    assert!(
        f.store
            .idempotency(&Key::new("parts/t1/case-7/VALVE-22"))
            .await
            .unwrap()
            .is_some(),
        "the key is claimed in the store"
    );

    // The supplier refuses; the retry timer survives another restart and orders again,
    // with the same key.
    assert_eq!(
        reg.call("t1", supplier_result("sup/1", false))
            .await
            .unwrap(),
        Status::Done
    );
    reg.stop().await;
    let reg = host::<PartsDesk>(&f, env()).await;
    f.clock.advance(MIN - 1);
    reg.tick().await.unwrap();
    assert_eq!(
        count(&outbox::<PartsDesk>(&f).await, is_supplier_order),
        1,
        "1 ms early"
    );
    f.clock.advance(1);
    reg.tick().await.unwrap();
    let mails = outbox::<PartsDesk>(&f).await;
    assert_eq!(count(&mails, is_supplier_order), 2);
    assert_eq!(mails[0].body, mails[1].body, "the same order, the same key");

    // Accepted; the acceptance redelivered and the order retried change nothing.
    assert_eq!(
        reg.call("t1", supplier_result("sup/2", true))
            .await
            .unwrap(),
        Status::Done
    );
    assert_eq!(
        reg.call("t1", supplier_result("sup/2", true))
            .await
            .unwrap(),
        Status::Ignored
    );
    assert_eq!(
        reg.call("t1", order_part(9)).await.unwrap(),
        Status::Duplicate
    );
    let mails = outbox::<PartsDesk>(&f).await;
    assert_eq!(count(&mails, is_supplier_order), 2);
    let updates: Vec<&Mail> = mails
        .iter()
        .filter(|m| matches!(m.body, Body::PartOrderUpdate { .. }))
        .collect();
    assert_eq!(updates.len(), 2, "the outcome, and once more for the retry");
    assert_eq!(updates[0].body, updates[1].body);
    assert_eq!(updates[0].to, Address::Customer("t1:cust-1".into()));
    assert!(matches!(
        &updates[0].body,
        Body::PartOrderUpdate { placed: true, detail, .. } if detail == "SUP-1001"
    ));
    let mut ids: Vec<&str> = mails.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), mails.len(), "every mail has its own id");
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_order_key_still_cannot_order_twice() {
    let f = fixture();
    let env = Tenants::all(PartsConfig {
        inventory: vec![StockConfig {
            part_number: "VALVE-22".into(),
            quantity: 10,
            local_lead_time: Span::days(1),
        }],
        retain: Span::days(1),
        ..PartsConfig::default()
    });
    let reg = host::<PartsDesk>(&f, env).await;
    assert_eq!(reg.call("t1", order_part(0)).await.unwrap(), Status::Done);
    // Two days later another order makes the desk forget the first (finished) one.
    f.clock.advance(2 * 86_400_000);
    let other = from_customer(
        "t1:cust-1/99",
        Address::Parts("t1".into()),
        Body::OrderPart {
            key: "case-8/VALVE-22".into(),
            part_number: "VALVE-22".into(),
            quantity: 1,
            customer: "t1:cust-1".into(),
            case_id: "case-8".into(),
            device: "t1:dev-1".into(),
        },
    );
    assert_eq!(reg.call("t1", other).await.unwrap(), Status::Done);
    assert!(
        reg.inspect("t1", |d| d.unwrap().order("case-7/VALVE-22").is_none())
            .await
            .unwrap()
    );
    // The old key comes back: the store's idempotency record refuses the whole step.
    let err = reg.call("t1", order_part(0)).await.unwrap_err();
    assert!(err.to_string().contains("already recorded"), "{err}");
    assert_eq!(
        reg.inspect("t1", |d| d.unwrap().stock("VALVE-22"))
            .await
            .unwrap(),
        8
    );
    assert_eq!(
        outbox::<PartsDesk>(&f).await.len(),
        2,
        "one update per order, no more"
    );
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_survive_a_restart_and_never_double_book() {
    let f = fixture();
    let env = || {
        Tenants::all(SchedulerConfig {
            technicians: vec![TechnicianConfig {
                id: "tech-ana".into(),
                skills: vec!["boiler".into()],
                regions: vec!["north".into()],
                days: vec![caretwin_actors::services::scheduler::Weekday::Mon],
                start: "08:00".to_owned().try_into().unwrap(),
                end: "10:00".to_owned().try_into().unwrap(),
            }],
            ..SchedulerConfig::default()
        })
    };
    let book = |key: &str| {
        from_customer(
            &format!("t1:cust-1/{key}"),
            Address::Scheduler("t1".into()),
            Body::Book {
                key: key.into(),
                customer: "t1:cust-1".into(),
                case_id: "case-7".into(),
                skill: "boiler".into(),
                region: "north".into(),
                not_before_ms: MON,
                windows: vec![],
                duration_ms: 60 * MIN,
                confirmed: false,
            },
        )
    };
    let slot_of = |m: &Mail| match &m.body {
        Body::Booking { slot, .. } => *slot,
        other => panic!("{other:?}"),
    };
    let reg = host::<Scheduler>(&f, env()).await;
    assert_eq!(reg.call("t1", book("a")).await.unwrap(), Status::Done);
    reg.stop().await;
    let reg = host::<Scheduler>(&f, env()).await;
    assert_eq!(reg.call("t1", book("a")).await.unwrap(), Status::Duplicate);
    assert_eq!(reg.call("t1", book("b")).await.unwrap(), Status::Done);
    assert_eq!(reg.call("t1", book("c")).await.unwrap(), Status::Done);
    let mails = outbox::<Scheduler>(&f).await;
    let slots: Vec<_> = mails.iter().map(slot_of).collect();
    let hour = 60 * MIN;
    assert_eq!(
        slots,
        [
            Some((MON + 8 * hour, MON + 9 * hour)),
            Some((MON + 8 * hour, MON + 9 * hour)),
            Some((MON + 9 * hour, MON + 10 * hour)),
            Some((
                MON + 7 * 24 * hour + 8 * hour,
                MON + 7 * 24 * hour + 9 * hour
            )),
        ],
        "a: booked, then the same answer; b: the next hour; c: the next Monday"
    );
    reg.stop().await;
}

fn handoff_mail() -> Mail {
    from_customer(
        "t1:cust-1/42",
        Address::Handoff("t1".into()),
        Body::Handoff {
            case_id: "case-smoke".into(),
            priority: Priority::High,
            reason: "smoke alarm while the store was offline".into(),
            context: CaseContext {
                customer: "t1:cust-1".into(),
                devices: vec!["t1:smoke-3".into()],
                root_cause: "smoke".into(),
                insights: vec![],
                actions: vec!["edge sounded the alarm locally".into()],
                suggested_next_step: "call the store manager".into(),
                withheld: vec![],
            },
        },
    )
}

async fn case_events(f: &Fixture) -> Vec<(CaseEventKind, u32)> {
    f.store
        .read_log(&cases_log("t1"), 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            let ev: CaseEvent = serde_json::from_slice(&e.value).unwrap();
            (ev.event, ev.escalation_level)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sla_timer_fires_after_passivation_and_restart_and_stops_on_accept() {
    let f = fixture();
    let env = || Tenants::all(HandoffConfig::default());
    let reg = host::<HandoffQueue>(&f, env()).await;
    assert_eq!(reg.call("t1", handoff_mail()).await.unwrap(), Status::Done);
    assert_eq!(
        reg.call("t1", handoff_mail()).await.unwrap(),
        Status::Duplicate
    );
    assert_eq!(case_events(&f).await, [(CaseEventKind::HandedOff, 0)]);

    // Idle: passivated. Then the node restarts while the SLA clock runs.
    f.clock.advance(10 * MIN);
    reg.tick().await.unwrap();
    assert_eq!(reg.stats().await.unwrap().active, 0);
    reg.stop().await;
    let reg = host::<HandoffQueue>(&f, env()).await;
    f.clock.advance(20 * MIN - 1);
    reg.tick().await.unwrap();
    assert_eq!(
        reg.stats().await.unwrap().timers_fired,
        0,
        "1 ms before the high-priority SLA"
    );
    f.clock.advance(1);
    reg.tick().await.unwrap();
    assert_eq!(reg.stats().await.unwrap().timers_fired, 1);
    assert_eq!(
        case_events(&f).await,
        [(CaseEventKind::HandedOff, 0), (CaseEventKind::Escalated, 1)]
    );
    let mails = outbox::<HandoffQueue>(&f).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, Address::Customer("t1:cust-1".into()));
    assert!(matches!(&mails[0].body, Body::HandoffUpdate { state, .. } if state == "escalated"));

    // An agent accepts (through the gRPC service, as mail of the tenant): the clock stops.
    let accepted = Mail {
        id: "grpc/agent-7/1".into(),
        from: Address::Handoff("t1".into()),
        to: Address::Handoff("t1".into()),
        body: Body::HandoffUpdate {
            case_id: "case-smoke".into(),
            state: "accepted".into(),
            agent: Some("agent-7".into()),
        },
    };
    f.clock.advance(5 * MIN);
    assert_eq!(reg.call("t1", accepted).await.unwrap(), Status::Done);
    reg.stop().await;
    let reg = host::<HandoffQueue>(&f, env()).await;
    f.clock.advance(10 * 60 * MIN);
    reg.tick().await.unwrap();
    assert_eq!(
        reg.stats().await.unwrap().timers_fired,
        0,
        "nothing left armed"
    );
    assert_eq!(
        case_events(&f).await,
        [
            (CaseEventKind::HandedOff, 0),
            (CaseEventKind::Escalated, 1),
            (CaseEventKind::Accepted, 1)
        ]
    );
    let mails = outbox::<HandoffQueue>(&f).await;
    assert_eq!(mails.len(), 2);
    assert!(
        matches!(&mails[1].body, Body::HandoffUpdate { state, agent: Some(a), .. } if state == "accepted" && a == "agent-7")
    );
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_mail_changes_nothing() {
    let f = fixture();
    let reg = host::<HandoffQueue>(&f, Tenants::all(HandoffConfig::default())).await;
    let mut foreign = handoff_mail();
    foreign.from = Address::Customer("t2:cust-1".into());
    assert!(matches!(
        reg.call("t1", foreign).await.unwrap(),
        Status::Refused(_)
    ));
    assert!(case_events(&f).await.is_empty());
    let known = reg
        .inspect("t1", |q| q.and_then(|q| q.case("case-smoke")).is_some())
        .await
        .unwrap();
    assert!(!known);
    reg.stop().await;
}
