//! The visits and part orders the twins make, end to end over real gRPC: a failing pump's
//! customer twin orders the part (priced from the catalogue, delivered to the device's
//! site by the built-in supplier), books a technician after it arrives and asks the
//! customer to confirm; the answer recorded through the `NotificationService` confirms
//! or cancels the appointment the `WorkService` shows. With the built-in field-service
//! partner, an integrator's cancellation frees the partner's slot once.

mod common;

use caretwin_actors::mail::{Address, Body, Mail};
use caretwin_actors::model::{ConsentScope, DAY_MS, HOUR_MS, Insight, InsightKind};
use caretwin_actors::policy::Preferences;
use caretwin_actors::services::Tenants;
use caretwin_actors::services::scheduler::{SchedulerConfig, TechnicianConfig, TimeOfDay, Weekday};
use caretwin_actors::twins::customer::{CaseState, CustomerMsg, CustomerReply, Profile};
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use caretwin_cluster::config::{FieldServiceChoice, IntegrationsConfig, RetryConfig};
use caretwin_cluster::grpc::auth::Scope;
use caretwin_cluster::pii::Contact;
use caretwin_proto::v1::notification_service_client::NotificationServiceClient;
use caretwin_proto::v1::{self, work_service_client::WorkServiceClient};
use common::{TestNode, with};
use std::time::Duration;

/// Monday 2026-11-23 10:00 UTC: inside the default allowed hours.
const T0: u64 = 1_795_392_000_000 + 10 * HOUR_MS;
const CUSTOMER: &str = "t1:alice";
const COFFEE: &str = "t1:coffee-1";
const SITE: &str = "t1:home-1";

struct Visits {
    node: TestNode,
    work: WorkServiceClient<tonic::transport::Channel>,
    notes: NotificationServiceClient<tonic::transport::Channel>,
    /// t1: work:read + work:write.
    planner: String,
    /// t1: notifications:gateway.
    gateway: String,
}

fn technicians() -> Tenants<SchedulerConfig> {
    Tenants::all(SchedulerConfig {
        technicians: vec![TechnicianConfig {
            id: "ana".into(),
            skills: vec!["coffee-service".into()],
            regions: vec!["north".into()],
            days: vec![
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri,
            ],
            start: TimeOfDay(8 * 60),
            end: TimeOfDay(17 * 60),
        }],
        ..SchedulerConfig::default()
    })
}

/// A node with the built-in supplier (and the built-in field service if `partner`),
/// Alice in the north with her coffee machine at home, with `prefs`.
async fn visits(partner: bool, prefs: Preferences) -> Visits {
    let integrations = IntegrationsConfig {
        field_service: if partner {
            FieldServiceChoice::Builtin
        } else {
            FieldServiceChoice::Desk
        },
        retry: RetryConfig {
            first: Duration::from_millis(1),
            max: Duration::from_millis(4),
            attempts: 3,
            pause: Duration::ZERO,
        },
        ..IntegrationsConfig::default()
    };
    let b = TestNode::builder(T0)
        .scheduler(technicians())
        .integrations(integrations);
    let (b, planner) = b.token("planner", "t1", vec![Scope::WorkRead, Scope::WorkWrite]);
    let (b, gateway) = b.token("gateway", "t1", vec![Scope::NotificationsGateway]);
    let node = b.start().await;
    node.vault
        .update_personal(CUSTOMER, |r| {
            r.contact_points = vec![Contact {
                channel: "push".into(),
                address: "alice-phone".into(),
                verified: true,
            }];
        })
        .await
        .unwrap();
    let profile = Profile {
        region: "north".into(),
        preferences: prefs,
        ..Profile::default()
    };
    let customers = node.system.customers();
    for msg in [
        CustomerMsg::SetProfile(profile),
        CustomerMsg::AddDevice {
            device: COFFEE.into(),
            model: "coffee.barista-200".into(),
        },
    ] {
        assert_eq!(
            customers.call(CUSTOMER, msg).await.unwrap(),
            CustomerReply::Ok
        );
    }
    let prov = DeviceMsg::Provision {
        customer: CUSTOMER.into(),
        site: SITE.into(),
        model: "coffee.barista-200".into(),
    };
    assert_eq!(
        node.system.devices().call(COFFEE, prov).await.unwrap(),
        DeviceReply::Ok
    );
    Visits {
        work: WorkServiceClient::new(node.channel.clone()),
        notes: NotificationServiceClient::new(node.channel.clone()),
        node,
        planner,
        gateway,
    }
}

impl Visits {
    /// The pump wears out: the customer twin opens a case, orders the pump, and once the
    /// supplier placed it, books a technician for after it arrives.
    async fn pump_wears(&self) {
        let mail = Mail {
            id: format!("{COFFEE}/1"),
            from: Address::Device(COFFEE.into()),
            to: Address::Customer(CUSTOMER.into()),
            body: Body::Insight {
                device: COFFEE.into(),
                model: "coffee.barista-200".into(),
                insight: Insight {
                    kind: InsightKind::Forecast,
                    subject: "pump_current".into(),
                    failure_mode: Some("pump-wear".into()),
                    confidence: 0.9,
                    eta_ms: Some(T0 + 10 * DAY_MS),
                    eta_band_ms: None,
                    value: 1.9,
                    raised_at_ms: T0,
                    scope: ConsentScope::Diagnostics,
                },
            },
        };
        let customers = self.node.system.customers();
        assert_eq!(
            customers
                .call(CUSTOMER, CustomerMsg::Mail(mail))
                .await
                .unwrap(),
            CustomerReply::Ok
        );
        self.settle().await;
    }

    async fn settle(&self) {
        self.node.system.settle(50).await.unwrap();
    }

    /// The tenant's work orders (newest first).
    async fn work_orders(&self) -> Vec<v1::WorkOrder> {
        let mut work = self.work.clone();
        work.list_work_orders(with(&self.planner, v1::ListWorkOrdersRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .work_orders
    }

    /// The one appointment of the one work order.
    async fn appointment(&self) -> v1::Appointment {
        let orders = self.work_orders().await;
        assert_eq!(orders.len(), 1, "one work order: {orders:?}");
        let wo = &orders[0];
        assert_eq!(
            (wo.customer_id.as_str(), wo.case_id.starts_with(CUSTOMER)),
            (CUSTOMER, true),
            "{wo:?}"
        );
        let mut work = self.work.clone();
        let got = work
            .get_work_order(with(
                &self.planner,
                v1::GetWorkOrderRequest {
                    work_order_id: wo.work_order_id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.appointment, wo.appointment, "get and list agree");
        got.appointment.expect("an appointment")
    }

    /// The notifications recorded for the gateways.
    async fn notifications(&self) -> Vec<v1::Notification> {
        let mut notes = self.notes.clone();
        notes
            .list_notifications(with(&self.gateway, v1::ListNotificationsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .notifications
    }

    /// The question asking Alice to confirm the visit.
    async fn confirmation(&self) -> v1::Notification {
        let asked: Vec<_> = self
            .notifications()
            .await
            .into_iter()
            .filter(|n| !n.options.is_empty())
            .collect();
        assert_eq!(asked.len(), 1, "{asked:?}");
        asked[0].clone()
    }

    /// Alice taps `option` on notification `id`.
    async fn answer(&self, id: &str, option: &str) {
        let mut notes = self.notes.clone();
        notes
            .record_response(with(
                &self.gateway,
                v1::RecordResponseRequest {
                    notification_id: id.into(),
                    response: Some(v1::CustomerResponse {
                        option_id: option.into(),
                        free_text: String::new(),
                        responded_at_ms: T0 as i64,
                    }),
                    idempotency_key: format!("tap-{option}"),
                },
            ))
            .await
            .unwrap();
        self.settle().await;
    }

    async fn case_state(&self) -> CaseState {
        self.node
            .system
            .customers()
            .inspect(CUSTOMER, |c| c.unwrap().cases()[0].state)
            .await
            .unwrap()
    }
}

fn options(n: &v1::Notification) -> Vec<&str> {
    n.options.iter().map(|o| o.option_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twins_visit_is_proposed_until_the_customer_confirms_it() {
    let v = visits(false, Preferences::default()).await;
    v.pump_wears().await;

    // The part order names the device, is priced from the catalogue (PUMP-12 lists at
    // 89.00 EUR) and goes to the device's site.
    let mut work = v.work.clone();
    let orders = work
        .list_part_orders(with(&v.planner, v1::ListPartOrdersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .part_orders;
    assert_eq!(orders.len(), 1, "{orders:?}");
    let order = &orders[0];
    assert_eq!(
        (order.device_id.as_str(), order.part_number.as_str()),
        (COFFEE, "PUMP-12")
    );
    assert_eq!(
        order.price,
        Some(v1::Money {
            currency: "EUR".into(),
            amount_minor: 8_900,
        })
    );
    assert_eq!(order.state, v1::PartOrderState::Confirmed as i32);
    let supplier = v.node.partners.as_ref().unwrap().supplier.clone().unwrap();
    assert_eq!(
        supplier.deliver_to("t1", &order.idempotency_key).as_deref(),
        Some(SITE)
    );

    // Booked after the part arrives, held as proposed, and Alice is asked.
    let proposed = v.appointment().await;
    assert_eq!(proposed.state, v1::AppointmentState::Proposed as i32);
    assert_eq!(proposed.technician_id, "ana");
    assert!(
        proposed.slot.unwrap().start_at_ms >= order.expected_delivery_at_ms.unwrap(),
        "after the part arrives"
    );
    let question = v.confirmation().await;
    assert_eq!(options(&question), ["Confirm", "Decline"]);
    assert_eq!(question.customer_id, CUSTOMER);

    v.answer(&question.notification_id, "Confirm").await;
    let confirmed = v.appointment().await;
    assert_eq!(confirmed.state, v1::AppointmentState::Confirmed as i32);
    assert_eq!(confirmed.appointment_id, proposed.appointment_id);
    assert_eq!(confirmed.slot, proposed.slot, "the same visit");
    assert!(confirmed.confirmed_at_ms.is_some());
    let wo = &v.work_orders().await[0];
    assert_eq!(wo.state, v1::WorkOrderState::Scheduled as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_visit_is_cancelled_its_slot_freed_and_the_case_goes_to_a_person() {
    let v = visits(false, Preferences::default()).await;
    v.pump_wears().await;
    let proposed = v.appointment().await;
    let slot = proposed.slot.unwrap();
    let free = |v: &Visits| {
        let mut work = v.work.clone();
        let planner = v.planner.clone();
        async move {
            work.list_technician_slots(with(
                &planner,
                v1::ListTechnicianSlotsRequest {
                    technician_id: "ana".into(),
                    from_ms: slot.start_at_ms,
                    to_ms: slot.end_at_ms,
                    free_only: true,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .slots
            .len()
        }
    };
    assert_eq!(free(&v).await, 0, "the proposed visit holds its slot");

    let question = v.confirmation().await;
    v.answer(&question.notification_id, "Decline").await;
    // The visit is cancelled, and with it the work order it stood for.
    let orders = v.work_orders().await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0].state, v1::WorkOrderState::Cancelled as i32);
    assert_eq!(orders[0].appointment, None, "no visit that holds a slot");
    assert!(free(&v).await > 0, "the slot is free again");
    assert_eq!(v.case_state().await, CaseState::HandedOff);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partners_visit_approved_in_advance_is_confirmed_and_cancelled_at_the_partner_once() {
    let prefs = Preferences {
        visit_approvals: vec!["*".into()],
        ..Preferences::default()
    };
    let v = visits(true, prefs).await;
    v.pump_wears().await;
    let partner = v
        .node
        .partners
        .as_ref()
        .unwrap()
        .field_service
        .clone()
        .unwrap();
    assert_eq!(partner.visits("t1"), 1, "booked with the partner");
    // Booked confirmed: Alice is told, not asked.
    let booked = v.appointment().await;
    assert_eq!(booked.state, v1::AppointmentState::Confirmed as i32);
    assert_eq!(booked.technician_id, "ana");
    assert!(
        v.notifications().await.iter().all(|n| n.options.is_empty()),
        "nothing to confirm"
    );

    // The integrator cancels; the partner is down for the first call, which is retried.
    partner.fail_next(1);
    let mut work = v.work.clone();
    let cancel = v1::CancelAppointmentRequest {
        appointment_id: booked.appointment_id.clone(),
        reason: "the customer moved".into(),
        idempotency_key: "cancel-1".into(),
    };
    let cancelled = work
        .cancel_appointment(with(&v.planner, cancel.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::AppointmentState::Cancelled as i32);
    v.settle().await;
    assert_eq!(partner.visits("t1"), 0, "the partner's slot is free");
    assert_eq!(partner.cancel_calls(), 2, "one failed call, one retry");
    assert_eq!(partner.cancellations(), 1);
    // The integrator retries its call: nothing more reaches the partner.
    let again = work
        .cancel_appointment(with(&v.planner, cancel))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, v1::AppointmentState::Cancelled as i32);
    v.settle().await;
    assert_eq!(partner.cancel_calls(), 2);
    assert_eq!(partner.cancellations(), 1);
}
