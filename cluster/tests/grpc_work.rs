//! `WorkService` and `CommandService` over real tonic with TLS on a real socket: part
//! orders and work orders created once per idempotency key, booking a technician's free
//! slot, scopes, tenant walls and bad input; commands queued for a site without an edge,
//! listed, watched and cancelled.

use caretwin_actors::model::{DAY_MS, HOUR_MS};
use caretwin_actors::services::Tenants;
use caretwin_actors::services::scheduler::{SchedulerConfig, TechnicianConfig, TimeOfDay, Weekday};
use caretwin_actors::store::Store;
use caretwin_actors::system::System;
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use caretwin_cluster::grpc::auth::Scope;
use caretwin_cluster::ingest::{Ingest, SiteId, command_log};
use caretwin_proto::v1::command_service_client::CommandServiceClient;
use caretwin_proto::v1::{self, work_service_client::WorkServiceClient};
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::{Code, Request};

mod common;
use common::{TestNode, with};

/// Monday 2026-11-23 00:00 UTC.
const T0: u64 = 1_795_392_000_000;

/// A node's twins and its gRPC endpoint, with tokens for several integrators.
struct Node {
    _node: TestNode,
    system: Arc<System>,
    store: Arc<dyn Store>,
    channel: Channel,
    /// t1: commands:read + commands:write.
    operator: String,
    /// t1: work:read + work:write.
    planner: String,
    /// t1: work:read.
    reader: String,
    /// t1: parts:write + work:read.
    supplier: String,
    /// t1: twins:read only.
    viewer: String,
    /// t2: admin.
    other_tenant: String,
}

fn scheduler_config() -> Tenants<SchedulerConfig> {
    let mut t = Tenants::default();
    t.tenant.insert(
        "t1".into(),
        SchedulerConfig {
            technicians: vec![
                TechnicianConfig {
                    id: "ana".into(),
                    skills: vec!["coffee".into()],
                    regions: vec!["north".into()],
                    days: vec![Weekday::Mon, Weekday::Tue],
                    start: TimeOfDay(8 * 60),
                    end: TimeOfDay(17 * 60),
                },
                TechnicianConfig {
                    id: "ben".into(),
                    skills: vec!["boiler".into()],
                    regions: vec!["south".into()],
                    days: vec![Weekday::Mon],
                    start: TimeOfDay(9 * 60),
                    end: TimeOfDay(12 * 60),
                },
            ],
            ..SchedulerConfig::default()
        },
    );
    t
}

async fn node() -> Node {
    let b = TestNode::builder(T0).scheduler(scheduler_config());
    let (b, planner) = b.token("planner", "t1", vec![Scope::WorkRead, Scope::WorkWrite]);
    let (b, reader) = b.token("reader", "t1", vec![Scope::WorkRead]);
    let (b, supplier) = b.token("supplier", "t1", vec![Scope::PartsWrite, Scope::WorkRead]);
    let (b, viewer) = b.token("viewer", "t1", vec![Scope::TwinsRead]);
    let (b, other_tenant) = b.token("other", "t2", vec![Scope::Admin]);
    let (b, operator) = b.token(
        "operator",
        "t1",
        vec![Scope::CommandsRead, Scope::CommandsWrite],
    );
    let n = b.start().await;
    for (device, customer, site) in [
        ("t1:coffee-1", "t1:alice", "t1:home-1"),
        ("t2:coffee-9", "t2:bob", "t2:home-9"),
    ] {
        let prov = DeviceMsg::Provision {
            customer: customer.into(),
            site: site.into(),
            model: "coffee.barista-200".into(),
        };
        assert_eq!(
            n.system.devices().call(device, prov).await.unwrap(),
            DeviceReply::Ok
        );
    }
    Node {
        system: n.system.clone(),
        store: n.store.clone(),
        channel: n.channel.clone(),
        operator,
        planner,
        reader,
        supplier,
        viewer,
        other_tenant,
        _node: n,
    }
}

fn part_order(key: &str, device: &str, part: &str, quantity: u32) -> v1::CreatePartOrderRequest {
    v1::CreatePartOrderRequest {
        idempotency_key: key.into(),
        item_kind: v1::OrderItemKind::Part as i32,
        part_number: part.into(),
        quantity,
        device_id: device.into(),
        ..Default::default()
    }
}

fn work_order(key: &str, device: &str) -> v1::CreateWorkOrderRequest {
    v1::CreateWorkOrderRequest {
        idempotency_key: key.into(),
        device_id: device.into(),
        failure_mode_id: "pump-wear".into(),
        description: "replace the pump".into(),
        priority: v1::Priority::High as i32,
        ..Default::default()
    }
}

fn at(day: u64, h: u64, m: u64) -> i64 {
    (T0 + day * DAY_MS + h * HOUR_MS + m * 60_000) as i64
}

fn slot(from: i64, to: i64) -> Option<v1::TimeSlot> {
    Some(v1::TimeSlot {
        start_at_ms: from,
        end_at_ms: to,
    })
}

async fn part_orders(c: &mut WorkServiceClient<Channel>, token: &str) -> Vec<v1::PartOrder> {
    c.list_part_orders(with(token, v1::ListPartOrdersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .part_orders
}

async fn work_orders(c: &mut WorkServiceClient<Channel>, token: &str) -> Vec<v1::WorkOrder> {
    c.list_work_orders(with(token, v1::ListWorkOrdersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .work_orders
}

async fn free_slots(c: &mut WorkServiceClient<Channel>, token: &str, tech: &str) -> Vec<i64> {
    let req = v1::ListTechnicianSlotsRequest {
        technician_id: tech.into(),
        from_ms: at(0, 0, 0),
        to_ms: at(1, 0, 0),
        free_only: true,
        page: Some(v1::PageRequest {
            page_size: 1000,
            ..Default::default()
        }),
        ..Default::default()
    };
    c.list_technician_slots(with(token, req))
        .await
        .unwrap()
        .into_inner()
        .slots
        .into_iter()
        .map(|s| {
            assert_eq!(s.state, v1::SlotState::Free as i32);
            s.slot.unwrap().start_at_ms
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_orders_are_created_once_listed_and_moved_forward_by_the_supplier() {
    let n = node().await;
    let mut c = WorkServiceClient::new(n.channel.clone());
    let first = c
        .create_part_order(with(
            &n.planner,
            part_order("po-1", "t1:coffee-1", "PUMP-12", 1),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.part_order_id, "t1:po-1");
    assert_eq!(first.idempotency_key, "po-1");
    assert_eq!(first.state, v1::PartOrderState::Requested as i32);
    assert_eq!(
        (first.customer_id.as_str(), first.device_id.as_str()),
        ("t1:alice", "t1:coffee-1")
    );
    // Retried, even with other values: the first order, and only one.
    for _ in 0..3 {
        let again = c
            .create_part_order(with(
                &n.planner,
                part_order("po-1", "t1:coffee-1", "HEATER-1300", 3),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again, first);
    }
    assert_eq!(
        part_orders(&mut c, &n.reader).await,
        std::slice::from_ref(&first)
    );
    let mut consumable = part_order("po-2", "t1:coffee-1", "DESC-250", 2);
    consumable.item_kind = v1::OrderItemKind::Consumable as i32;
    let second = c
        .create_part_order(with(&n.planner, consumable))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.part_order_id, "t1:po-2");
    assert_eq!(second.item_kind, v1::OrderItemKind::Consumable as i32);
    let listed: Vec<String> = part_orders(&mut c, &n.reader)
        .await
        .into_iter()
        .map(|o| o.part_order_id)
        .collect();
    assert_eq!(listed, ["t1:po-2", "t1:po-1"], "newest first");
    let got = c
        .get_part_order(with(
            &n.reader,
            v1::GetPartOrderRequest {
                part_order_id: "t1:po-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, first);
    // Paging: one at a time.
    let page = c
        .list_part_orders(with(
            &n.reader,
            v1::ListPartOrdersRequest {
                page: Some(v1::PageRequest {
                    page_size: 1,
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.part_orders.len(), 1);
    let token = page.page.unwrap().next_page_token;
    let rest = c
        .list_part_orders(with(
            &n.reader,
            v1::ListPartOrdersRequest {
                page: Some(v1::PageRequest {
                    page_size: 1,
                    page_token: token,
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.part_orders[0].part_order_id, "t1:po-1");
    assert!(rest.page.unwrap().next_page_token.is_empty());

    // The supplier moves it forward; never back.
    let update = |state: v1::PartOrderState, tracking: &str| v1::UpdatePartOrderStateRequest {
        part_order_id: "t1:po-1".into(),
        state: state as i32,
        tracking_reference: tracking.into(),
        expected_delivery_at_ms: Some(at(3, 12, 0)),
        idempotency_key: "u1".into(),
        ..Default::default()
    };
    let e = c
        .update_part_order_state(with(&n.planner, update(v1::PartOrderState::Shipped, "")))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "suppliers need parts:write"
    );
    let shipped = c
        .update_part_order_state(with(
            &n.supplier,
            update(v1::PartOrderState::Shipped, "TRK-9"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shipped.state, v1::PartOrderState::Shipped as i32);
    assert_eq!(shipped.tracking_reference, "TRK-9");
    assert_eq!(shipped.expected_delivery_at_ms, Some(at(3, 12, 0)));
    for back in [v1::PartOrderState::Confirmed, v1::PartOrderState::Cancelled] {
        let e = c
            .update_part_order_state(with(&n.supplier, update(back, "")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{back:?}: {e:?}");
    }
    let shipped_only: Vec<String> = c
        .list_part_orders(with(
            &n.reader,
            v1::ListPartOrdersRequest {
                states: vec![v1::PartOrderState::Shipped as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .part_orders
        .into_iter()
        .map(|o| o.part_order_id)
        .collect();
    assert_eq!(shipped_only, ["t1:po-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_order_books_a_free_slot_which_cancelling_frees_again() {
    let n = node().await;
    let mut c = WorkServiceClient::new(n.channel.clone());
    let wo = c
        .create_work_order(with(&n.planner, work_order("wo-1", "t1:coffee-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wo.work_order_id, "t1:wo-1");
    assert_eq!(wo.state, v1::WorkOrderState::Open as i32);
    assert_eq!(wo.site_id, "t1:home-1");
    assert_eq!(wo.priority, v1::Priority::High as i32);
    let again = c
        .create_work_order(with(&n.planner, work_order("wo-1", "t1:coffee-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, wo);
    assert_eq!(
        work_orders(&mut c, &n.reader).await,
        std::slice::from_ref(&wo)
    );

    let techs = c
        .list_technicians(with(
            &n.reader,
            v1::ListTechniciansRequest {
                skill: "coffee".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .technicians;
    assert_eq!(
        techs
            .iter()
            .map(|t| t.technician_id.as_str())
            .collect::<Vec<_>>(),
        ["ana"]
    );
    // ana works Monday 08:00-17:00: 18 free half hours.
    let free = free_slots(&mut c, &n.reader, "ana").await;
    assert_eq!(free.len(), 18);
    assert_eq!(free[0], at(0, 8, 0));

    let book = |key: &str, wo: &str, from: i64, to: i64| v1::BookAppointmentRequest {
        idempotency_key: key.into(),
        work_order_id: wo.into(),
        technician_id: "ana".into(),
        slot: slot(from, to),
        part_order_ids: vec![],
        confirmed: true,
    };
    let e = c
        .book_appointment(with(
            &n.reader,
            book("b-1", "t1:wo-1", at(0, 10, 0), at(0, 10, 30)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let a = c
        .book_appointment(with(
            &n.planner,
            book("b-1", "t1:wo-1", at(0, 10, 0), at(0, 10, 30)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.state, v1::AppointmentState::Confirmed as i32);
    assert_eq!(a.work_order_id, "t1:wo-1");
    let free = free_slots(&mut c, &n.reader, "ana").await;
    assert_eq!(free.len(), 17);
    assert!(
        !free.contains(&at(0, 10, 0)),
        "the booked slot is no longer free"
    );
    let scheduled = c
        .get_work_order(with(
            &n.reader,
            v1::GetWorkOrderRequest {
                work_order_id: "t1:wo-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scheduled.state, v1::WorkOrderState::Scheduled as i32);
    assert_eq!(scheduled.appointment.as_ref(), Some(&a));
    // The same key again: the same appointment. Another for the same order, or another
    // order in the same slot: refused.
    let again = c
        .book_appointment(with(
            &n.planner,
            book("b-1", "t1:wo-1", at(0, 10, 0), at(0, 10, 30)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, a);
    let e = c
        .book_appointment(with(
            &n.planner,
            book("b-2", "t1:wo-1", at(0, 14, 0), at(0, 14, 30)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.create_work_order(with(&n.planner, work_order("wo-2", "t1:coffee-1")))
        .await
        .unwrap();
    let e = c
        .book_appointment(with(
            &n.planner,
            book("b-3", "t1:wo-2", at(0, 10, 0), at(0, 10, 30)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // By technician.
    let by_ana = c
        .list_work_orders(with(
            &n.reader,
            v1::ListWorkOrdersRequest {
                technician_id: "ana".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .work_orders;
    assert_eq!(by_ana.len(), 1);
    assert_eq!(by_ana[0].work_order_id, "t1:wo-1");

    let cancelled = c
        .cancel_appointment(with(
            &n.planner,
            v1::CancelAppointmentRequest {
                appointment_id: a.appointment_id.clone(),
                reason: "customer away".into(),
                idempotency_key: "c-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::AppointmentState::Cancelled as i32);
    assert_eq!(free_slots(&mut c, &n.reader, "ana").await.len(), 18);
    let open = c
        .get_work_order(with(
            &n.reader,
            v1::GetWorkOrderRequest {
                work_order_id: "t1:wo-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open.state, v1::WorkOrderState::Open as i32);
    assert!(open.appointment.is_none());
    // The slot is free for the other order now; the technician brings a part.
    let pump = c
        .create_part_order(with(
            &n.planner,
            part_order("pump", "t1:coffee-1", "PUMP-12", 1),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut with_part = book("b-3", "t1:wo-2", at(0, 10, 0), at(0, 10, 30));
    with_part.part_order_ids = vec![pump.part_order_id.clone()];
    let a2 = c
        .book_appointment(with(&n.planner, with_part))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a2.parts.len(), 1);
    assert_eq!(
        (
            a2.parts[0].part_number.as_str(),
            a2.parts[0].quantity,
            a2.parts[0].reserved
        ),
        ("PUMP-12", 1, false)
    );

    // From the field: forward only.
    let update = |state: v1::WorkOrderState| v1::UpdateWorkOrderStateRequest {
        work_order_id: "t1:wo-2".into(),
        state: state as i32,
        notes: "pump replaced".into(),
        idempotency_key: "f-1".into(),
    };
    let done = c
        .update_work_order_state(with(&n.planner, update(v1::WorkOrderState::InProgress)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, v1::WorkOrderState::InProgress as i32);
    let done = c
        .update_work_order_state(with(&n.planner, update(v1::WorkOrderState::Completed)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, v1::WorkOrderState::Completed as i32);
    assert_eq!(done.completion_notes, "pump replaced");
    assert_eq!(
        done.appointment.unwrap().state,
        v1::AppointmentState::Completed as i32
    );
    let e = c
        .update_work_order_state(with(&n.planner, update(v1::WorkOrderState::InProgress)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .update_work_order_state(with(&n.planner, update(v1::WorkOrderState::Open)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_tenant_walls_hold() {
    let n = node().await;
    let mut c = WorkServiceClient::new(n.channel.clone());
    let e = c
        .create_work_order(with(&n.reader, work_order("wo-1", "t1:coffee-1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .list_work_orders(with(&n.viewer, v1::ListWorkOrdersRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .list_part_orders(Request::new(v1::ListPartOrdersRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    c.create_work_order(with(&n.planner, work_order("wo-1", "t1:coffee-1")))
        .await
        .unwrap();
    c.create_part_order(with(
        &n.planner,
        part_order("po-1", "t1:coffee-1", "PUMP-12", 1),
    ))
    .await
    .unwrap();
    // t2 with admin sees none of it, and cannot write through t1's ids.
    let t2 = &n.other_tenant;
    assert!(work_orders(&mut c, t2).await.is_empty());
    assert!(part_orders(&mut c, t2).await.is_empty());
    let e = c
        .get_work_order(with(
            t2,
            v1::GetWorkOrderRequest {
                work_order_id: "t1:wo-1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_part_order(with(
            t2,
            v1::GetPartOrderRequest {
                part_order_id: "t1:po-1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .create_part_order(with(t2, part_order("x", "t1:coffee-1", "PUMP-12", 1)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .update_work_order_state(with(
            t2,
            v1::UpdateWorkOrderStateRequest {
                work_order_id: "t1:wo-1".into(),
                state: v1::WorkOrderState::Cancelled as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // t2's own order, with the same key, is its own; t1 never sees it.
    let theirs = c
        .create_part_order(with(t2, part_order("po-1", "t2:coffee-9", "PUMP-12", 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.part_order_id, "t2:po-1");
    let e = c
        .get_part_order(with(
            &n.reader,
            v1::GetPartOrderRequest {
                part_order_id: "t2:po-1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mine = part_orders(&mut c, &n.reader).await;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].part_order_id, "t1:po-1");
    // t2 has no technicians configured.
    let none = c
        .list_technicians(with(t2, v1::ListTechniciansRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .technicians;
    assert!(none.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let n = node().await;
    let mut c = WorkServiceClient::new(n.channel.clone());
    c.create_work_order(with(&n.planner, work_order("wo-1", "t1:coffee-1")))
        .await
        .unwrap();
    let mut kindless = part_order("k", "t1:coffee-1", "PUMP-12", 1);
    kindless.item_kind = 0;
    let mut bad_wo = part_order("k", "t1:coffee-1", "PUMP-12", 1);
    bad_wo.work_order_id = "t1:wo-99".into();
    for (req, code) in [
        (
            part_order("", "t1:coffee-1", "PUMP-12", 1),
            Code::InvalidArgument,
        ),
        (
            part_order("k", "t1:coffee-1", "PUMP-12", 0),
            Code::InvalidArgument,
        ),
        (
            part_order("k", "t1:coffee-1", "NO-SUCH-PART", 1),
            Code::InvalidArgument,
        ),
        (kindless, Code::InvalidArgument),
        (
            part_order("k", "t1:no-such-device", "PUMP-12", 1),
            Code::NotFound,
        ),
        (bad_wo, Code::NotFound),
    ] {
        let e = c
            .create_part_order(with(&n.planner, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
    }
    let mut unknown_mode = work_order("w", "t1:coffee-1");
    unknown_mode.failure_mode_id = "gremlins".into();
    let mut bad_priority = work_order("w", "t1:coffee-1");
    bad_priority.priority = 99;
    for req in [unknown_mode, bad_priority, work_order("", "t1:coffee-1")] {
        let e = c
            .create_work_order(with(&n.planner, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{req:?}: {e:?}");
    }
    // Slots outside working hours, on a day off, in the wrong order, of nobody.
    for (tech, from, to) in [
        ("ana", at(0, 7, 0), at(0, 8, 30)),
        ("ana", at(2, 10, 0), at(2, 10, 30)),
        ("ana", at(0, 11, 0), at(0, 10, 0)),
        ("nobody", at(0, 10, 0), at(0, 10, 30)),
    ] {
        let e = c
            .book_appointment(with(
                &n.planner,
                v1::BookAppointmentRequest {
                    idempotency_key: "b".into(),
                    work_order_id: "t1:wo-1".into(),
                    technician_id: tech.into(),
                    slot: slot(from, to),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{tech} {from} {to}: {e:?}");
    }
    let e = c
        .list_technician_slots(with(
            &n.reader,
            v1::ListTechnicianSlotsRequest {
                from_ms: at(0, 0, 0),
                to_ms: at(61, 0, 0),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .list_part_orders(with(
            &n.reader,
            v1::ListPartOrdersRequest {
                page: Some(v1::PageRequest {
                    page_size: 1,
                    page_token: "not-a-token".into(),
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Nothing changed.
    assert!(part_orders(&mut c, &n.reader).await.is_empty());
    let wos = work_orders(&mut c, &n.reader).await;
    assert_eq!(wos.len(), 1);
    assert_eq!(wos[0].state, v1::WorkOrderState::Open as i32);
    assert_eq!(free_slots(&mut c, &n.reader, "ana").await.len(), 18);
}

fn descale(key: &str, device: &str) -> v1::SendCommandRequest {
    v1::SendCommandRequest {
        idempotency_key: key.into(),
        device_id: device.into(),
        payload: Some(v1::CommandPayload {
            kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
                name: "descale".into(),
                args: [("strength".to_owned(), "2".to_owned())].into(),
            })),
        }),
        priority: v1::Priority::High as i32,
        reason: "scale builds up".into(),
        ..Default::default()
    }
}

/// Only turns a hang into a failure; every wait ends on an observed event.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

async fn next(s: &mut tonic::Streaming<v1::CommandTransition>) -> Option<v1::CommandTransition> {
    tokio::time::timeout(DEADLINE, s.message())
        .await
        .expect("a transition or the end in time")
        .unwrap()
}

/// The commands the site's edge would be sent now.
async fn pending_for_site(n: &Node) -> Vec<String> {
    let ingest = Ingest::new(n.system.clone(), n.store.clone(), "node-1");
    let site = SiteId {
        site: "t1:home-1".into(),
    };
    let (frames, _) = ingest.commands_after(&site, 0, T0).await.unwrap();
    frames
        .into_iter()
        .filter_map(|f| match f.body {
            Some(v1::cluster_frame::Body::Command(c)) => Some(c.command_id),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_an_offline_site_stays_queued_until_cancelled() {
    let n = node().await;
    let mut c = CommandServiceClient::new(n.channel.clone());
    let sent = c
        .send_command(with(&n.operator, descale("cmd-1", "t1:coffee-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.command_id, "t1:cmd/cmd-1");
    assert_eq!(sent.state, v1::CommandState::Queued as i32);
    assert_eq!(
        (
            sent.site_id.as_str(),
            sent.issued_by.as_str(),
            sent.idempotency_key.as_str()
        ),
        ("t1:home-1", "operator", "cmd-1")
    );
    assert_eq!(sent.priority, v1::Priority::High as i32);
    assert_eq!(
        sent.expires_at_ms,
        (T0 + DAY_MS) as i64,
        "24 hours by default"
    );
    assert_eq!(sent.history.len(), 1);
    // Retried: the first command, and only one.
    let again = c
        .send_command(with(&n.operator, descale("cmd-1", "t1:coffee-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, sent);
    // The twin's mail goes out as on a node: into the site's command log. No edge is
    // connected, so it stays queued.
    n.system.settle(10).await.unwrap();
    let logged = n
        .store
        .read_log(&command_log("t1:home-1"), 1, 10)
        .await
        .unwrap();
    assert_eq!(logged.len(), 1);
    assert_eq!(pending_for_site(&n).await, ["t1:cmd/cmd-1"]);
    let got = c
        .get_command(with(
            &n.operator,
            v1::GetCommandRequest {
                command_id: sent.command_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, sent);
    let listed = c
        .list_commands(with(
            &n.operator,
            v1::ListCommandsRequest {
                device_id: "t1:coffee-1".into(),
                states: vec![v1::CommandState::Queued as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert_eq!(listed, std::slice::from_ref(&sent));

    // A watcher sees the history, then the cancel, then the end of the stream.
    let mut watch = c
        .watch_command(with(
            &n.operator,
            v1::WatchCommandRequest {
                command_id: sent.command_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut watch).await.unwrap();
    assert_eq!(first.state, v1::CommandState::Queued as i32);
    let cancel = v1::CancelCommandRequest {
        command_id: sent.command_id.clone(),
        reason: "descaled by hand".into(),
        idempotency_key: "x-1".into(),
    };
    let cancelled = c
        .cancel_command(with(&n.operator, cancel.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::CommandState::Cancelled as i32);
    let t = next(&mut watch).await.unwrap();
    assert_eq!(
        (t.state, t.detail.as_str()),
        (v1::CommandState::Cancelled as i32, "descaled by hand")
    );
    assert!(
        next(&mut watch).await.is_none(),
        "the stream ends after a final state"
    );
    // Cancelling again returns it unchanged; the edge is never sent it.
    let again = c
        .cancel_command(with(&n.operator, cancel))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, cancelled);
    assert!(pending_for_site(&n).await.is_empty());
    let queued = c
        .list_commands(with(
            &n.operator,
            v1::ListCommandsRequest {
                states: vec![v1::CommandState::Queued as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert!(queued.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_check_scopes_tenants_and_input() {
    let n = node().await;
    let mut c = CommandServiceClient::new(n.channel.clone());
    let e = c
        .send_command(with(&n.planner, descale("k", "t1:coffee-1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut unknown = descale("k", "t1:coffee-1");
    unknown.payload = Some(v1::CommandPayload {
        kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
            name: "self-destruct".into(),
            args: Default::default(),
        })),
    });
    let mut past = descale("k", "t1:coffee-1");
    past.expires_at_ms = Some(T0 as i64 - 1);
    let mut no_payload = descale("k", "t1:coffee-1");
    no_payload.payload = None;
    let mut firmware = descale("k", "t1:coffee-1");
    firmware.payload = Some(v1::CommandPayload {
        kind: Some(v1::command_payload::Kind::FirmwareUpdate(
            v1::FirmwareUpdate::default(),
        )),
    });
    for (req, code) in [
        (firmware, Code::InvalidArgument),
        (unknown, Code::InvalidArgument),
        (past, Code::InvalidArgument),
        (no_payload, Code::InvalidArgument),
        (descale("", "t1:coffee-1"), Code::InvalidArgument),
        (descale("k", "t1:no-such-device"), Code::NotFound),
        (descale("k", "t2:coffee-9"), Code::NotFound),
    ] {
        let e = c
            .send_command(with(&n.operator, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
    }
    let none = c
        .list_commands(with(&n.operator, v1::ListCommandsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert!(none.is_empty(), "nothing was queued");
    c.send_command(with(&n.operator, descale("k", "t1:coffee-1")))
        .await
        .unwrap();
    // Another tenant sees nothing of it.
    let t2 = &n.other_tenant;
    let e = c
        .get_command(with(
            t2,
            v1::GetCommandRequest {
                command_id: "t1:cmd/k".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .cancel_command(with(
            t2,
            v1::CancelCommandRequest {
                command_id: "t1:cmd/k".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let theirs = c
        .list_commands(with(t2, v1::ListCommandsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert!(theirs.is_empty());
    // t2's own command with the same key is its own.
    let mine = c
        .send_command(with(t2, descale("k", "t2:coffee-9")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.command_id, "t2:cmd/k");
}
