//! NotificationService over real tonic with TLS on a real socket: a customer twin's
//! notification is recorded once and streamed to a gateway with its cursor, redelivered
//! after a disconnect until acknowledged, its delivery reported, and the customer's answer
//! reaches the customer twin, whose case moves on.

use caretwin_actors::host::clock::ManualClock;
use caretwin_actors::host::dispatch::Router;
use caretwin_actors::mail::{Address, Body, Mail};
use caretwin_actors::model::{HOUR_MS, Priority};
use caretwin_actors::system::System;
use caretwin_actors::twins::customer::{CustomerMsg, CustomerReply};
use caretwin_actors::twins::device::{DeviceItem, DeviceMsg, DeviceReply, ItemKind};
use caretwin_cluster::grpc::auth::Scope;
use caretwin_cluster::grpc::notifications::Recorder;
use caretwin_cluster::pii::{Contact, Vault};
use caretwin_proto::v1::{self, notification_service_client::NotificationServiceClient};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

mod common;
use common::{Outside, TestNode, with};

/// Only turns a hang into a failure; every wait ends on an observed event.
const DEADLINE: Duration = Duration::from_secs(30);
/// 2026-11-23 (a Monday) 10:00 UTC: outside quiet hours.
const NOW: u64 = 1_795_392_000_000 + 10 * HOUR_MS;
const FRIDGE: &str = "fridge.coolline-350";
const CLOSED_IT: &str = "It was open, I closed it";

struct Node {
    _node: TestNode,
    /// The clock of the twins, the recorder and the services.
    clock: Arc<ManualClock>,
    system: Arc<System>,
    recorder: Arc<Recorder>,
    outside: Arc<Outside>,
    client: NotificationServiceClient<Channel>,
    /// t1: notifications:gateway.
    gateway: String,
    /// t1: twins:read.
    viewer: String,
    /// t2: admin.
    other: String,
}

async fn customer_with_fridge(system: &System, vault: &Vault, customer: &str, fridge: &str) {
    vault
        .update_personal(customer, |r| {
            r.contact_points = ["push", "email", "sms"]
                .into_iter()
                .map(|c| Contact {
                    channel: c.into(),
                    address: format!("{c}-address-of-{customer}"),
                    verified: true,
                })
                .collect();
            r.locale = "fr-FR".into();
        })
        .await
        .unwrap();
    let add = CustomerMsg::AddDevice {
        device: fridge.into(),
        model: FRIDGE.into(),
    };
    assert_eq!(
        system.customers().call(customer, add).await.unwrap(),
        CustomerReply::Ok
    );
    let tenant = customer.split(':').next().unwrap();
    let prov = DeviceMsg::Provision {
        customer: customer.into(),
        site: format!("{tenant}:home-of-{customer}"),
        model: FRIDGE.into(),
    };
    assert_eq!(
        system.devices().call(fridge, prov).await.unwrap(),
        DeviceReply::Ok
    );
}

async fn node() -> Node {
    let b = TestNode::builder(NOW);
    let (b, gateway) = b.token("gateway", "t1", vec![Scope::NotificationsGateway]);
    let (b, viewer) = b.token("viewer", "t1", vec![Scope::TwinsRead]);
    let (b, other) = b.token("other", "t2", vec![Scope::Admin]);
    let n = b.start().await;
    customer_with_fridge(&n.system, &n.vault, "t1:alice", "t1:fridge-1").await;
    customer_with_fridge(&n.system, &n.vault, "t1:bob", "t1:fridge-2").await;
    customer_with_fridge(&n.system, &n.vault, "t2:carol", "t2:fridge-1").await;
    Node {
        clock: n.clock.clone(),
        system: n.system.clone(),
        recorder: n.recorder.clone(),
        outside: n.outside.clone(),
        client: NotificationServiceClient::new(n.channel.clone()),
        gateway,
        viewer,
        other,
        _node: n,
    }
}

/// The fridge asks whether its door is closed: its customer twin opens a case and asks
/// the customer, a notification with two one-tap answers.
async fn door_seal_question(n: &Node, fridge: &str) {
    let item = DeviceItem {
        seq: 1,
        ts_ms: NOW,
        kind: ItemKind::Question {
            question_id: "door-seal-check".into(),
        },
    };
    match n
        .system
        .devices()
        .call(fridge, DeviceMsg::Apply(vec![item]))
        .await
        .unwrap()
    {
        DeviceReply::Applied(r) => assert_eq!(r.applied, 1, "{r:?}"),
        other => panic!("{other:?}"),
    }
    n.system.settle(20).await.unwrap();
}

async fn subscribe(n: &mut Node, after: Option<u64>) -> tonic::Streaming<v1::NotificationDelivery> {
    let gateway = n.gateway.clone();
    n.client
        .subscribe_notifications(with(
            &gateway,
            v1::SubscribeNotificationsRequest {
                subscriber_id: "gw-1".into(),
                after_cursor: after,
                channels: Vec::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut tonic::Streaming<v1::NotificationDelivery>) -> v1::NotificationDelivery {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a delivery in time")
        .unwrap()
        .expect("the stream is open")
}

async fn alice_actions(n: &Node) -> Vec<String> {
    n.system
        .customers()
        .inspect("t1:alice", |c| {
            c.unwrap()
                .cases()
                .iter()
                .flat_map(|c| c.actions.clone())
                .collect()
        })
        .await
        .unwrap()
}

fn answer(id: &str, option: &str, key: &str) -> v1::RecordResponseRequest {
    v1::RecordResponseRequest {
        notification_id: id.into(),
        response: Some(v1::CustomerResponse {
            option_id: option.into(),
            free_text: String::new(),
            responded_at_ms: NOW as i64,
        }),
        idempotency_key: key.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_reaches_the_gateway_and_the_answer_moves_the_case_on() {
    let mut n = node().await;
    let gateway = n.gateway.clone();
    door_seal_question(&n, "t1:fridge-1").await;
    // Recorded, and the node's outside router still sees it.
    let seen: Vec<Mail> = n.outside.0.lock().unwrap().clone();
    let notify = seen
        .iter()
        .find(|m| matches!(m.body, Body::Notify { .. }))
        .expect("the outside router saw the notification")
        .clone();
    let mut stream = subscribe(&mut n, None).await;
    let d = next(&mut stream).await;
    let note = d.notification.clone().unwrap();
    assert_eq!(note.notification_id, notify.id);
    assert_eq!(note.customer_id, "t1:alice");
    assert!(note.case_id.starts_with("t1:alice/"), "{note:?}");
    assert!(note.body.contains("door"), "{note:?}");
    let options: Vec<&str> = note.options.iter().map(|o| o.option_id.as_str()).collect();
    assert_eq!(options, [CLOSED_IT, "It was already closed"]);
    assert_eq!(note.state, v1::NotificationState::Pending as i32);
    let recipient = note.recipient.clone().unwrap();
    assert!(
        recipient.address.ends_with("-address-of-t1:alice"),
        "{recipient:?}"
    );
    assert!(
        alice_actions(&n)
            .await
            .iter()
            .any(|a| a.contains("asked the customer"))
    );
    // A redelivery of the same mail records nothing new.
    n.recorder.deliver(notify.clone()).await.unwrap();
    let list = n
        .client
        .list_notifications(with(&gateway, v1::ListNotificationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.notifications.len(), 1);
    // The gateway reports it, forward only.
    let report = |state: v1::NotificationState| v1::ReportDeliveryRequest {
        notification_id: note.notification_id.clone(),
        state: state as i32,
        at_ms: NOW as i64,
        detail: String::new(),
        idempotency_key: format!("{state:?}"),
    };
    for s in [
        v1::NotificationState::Sent,
        v1::NotificationState::Delivered,
    ] {
        let got = n
            .client
            .report_delivery(with(&gateway, report(s)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.state, s as i32);
    }
    let e = n
        .client
        .report_delivery(with(&gateway, report(v1::NotificationState::Sent)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = n
        .client
        .report_delivery(with(&gateway, report(v1::NotificationState::Pending)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A report from far in the future (it would also hold the entry past its retention).
    let e = n
        .client
        .report_delivery(with(
            &gateway,
            v1::ReportDeliveryRequest {
                at_ms: (NOW + 24 * HOUR_MS) as i64,
                ..report(v1::NotificationState::Read)
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Bad answers change nothing.
    for bad in [
        v1::RecordResponseRequest {
            response: Some(v1::CustomerResponse {
                responded_at_ms: (NOW + 24 * HOUR_MS) as i64,
                ..answer(&note.notification_id, CLOSED_IT, "k1")
                    .response
                    .unwrap()
            }),
            ..answer(&note.notification_id, CLOSED_IT, "k1")
        },
        answer(&note.notification_id, "Maybe", "k1"),
        answer(&note.notification_id, CLOSED_IT, ""),
        v1::RecordResponseRequest {
            response: None,
            ..answer(&note.notification_id, CLOSED_IT, "k1")
        },
    ] {
        let e = n
            .client
            .record_response(with(&gateway, bad.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    assert!(
        !alice_actions(&n)
            .await
            .iter()
            .any(|a| a.contains("customer answered"))
    );
    // The customer taps an answer: the twin takes it and its playbook goes on (the fridge
    // is asked to test its seal again).
    let mut tapped = answer(&note.notification_id, CLOSED_IT, "k1");
    tapped.response.as_mut().unwrap().free_text = "the kids left it open".into();
    let answered = n
        .client
        .record_response(with(&gateway, tapped.clone()))
        .await
        .unwrap()
        .into_inner();
    let response = answered.response.unwrap();
    assert_eq!(response.option_id, CLOSED_IT);
    // Sealed in the log with the customer's key, read back in clear.
    assert_eq!(response.free_text, "the kids left it open");
    let actions = alice_actions(&n).await;
    let at = actions
        .iter()
        .position(|a| a.contains("customer answered") && a.contains(CLOSED_IT))
        .unwrap_or_else(|| panic!("{actions:?}"));
    assert!(
        actions[at + 1..].iter().any(|a| a.contains("seal_check")),
        "{actions:?}"
    );
    // A retry with the same key is the same answer, once; another answer is refused.
    let again = n
        .client
        .record_response(with(&gateway, tapped))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.response.unwrap().free_text, "the kids left it open");
    assert_eq!(alice_actions(&n).await, actions);
    let e = n
        .client
        .record_response(with(
            &gateway,
            answer(&note.notification_id, "It was already closed", "k2"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_notifications_are_delivered_again_after_a_disconnect() {
    let mut n = node().await;
    let gateway = n.gateway.clone();
    door_seal_question(&n, "t1:fridge-1").await;
    let mut stream = subscribe(&mut n, None).await;
    let first = next(&mut stream).await;
    drop(stream);
    // Not acknowledged: delivered again, same cursor.
    let mut stream = subscribe(&mut n, None).await;
    let again = next(&mut stream).await;
    assert_eq!(again.cursor, first.cursor);
    assert_eq!(again.notification, first.notification);
    let acked = n
        .client
        .acknowledge_notifications(with(
            &gateway,
            v1::AcknowledgeNotificationsRequest {
                subscriber_id: "gw-1".into(),
                cursor: first.cursor,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.acknowledged_cursor, first.cursor);
    drop(stream);
    // Acknowledged: the next subscription starts after it, with what came since.
    door_seal_question(&n, "t1:fridge-2").await;
    let mut stream = subscribe(&mut n, None).await;
    let d = next(&mut stream).await;
    assert!(d.cursor > first.cursor);
    assert_eq!(d.notification.unwrap().customer_id, "t1:bob");
    // A live stream gets new ones as they are recorded.
    let mut from_start = subscribe(&mut n, Some(0)).await;
    assert_eq!(next(&mut from_start).await.cursor, first.cursor);
    assert_eq!(next(&mut from_start).await.cursor, d.cursor);
    // Acknowledging beyond the log is refused; a cursor never moves back.
    let ack = |cursor| v1::AcknowledgeNotificationsRequest {
        subscriber_id: "gw-1".into(),
        cursor,
    };
    let e = n
        .client
        .acknowledge_notifications(with(&gateway, ack(d.cursor + 1000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let kept = n
        .client
        .acknowledge_notifications(with(&gateway, ack(0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.acknowledged_cursor, first.cursor);
    // Listing: newest first, filtered.
    let list = n
        .client
        .list_notifications(with(&gateway, v1::ListNotificationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let customers: Vec<&str> = list
        .notifications
        .iter()
        .map(|x| x.customer_id.as_str())
        .collect();
    assert_eq!(customers, ["t1:bob", "t1:alice"]);
    let alice = n
        .client
        .list_notifications(with(
            &gateway,
            v1::ListNotificationsRequest {
                customer_id: "t1:alice".into(),
                states: vec![v1::NotificationState::Pending as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice.notifications.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_tenants_and_bad_input_are_checked() {
    let mut n = node().await;
    let (gateway, viewer, other) = (n.gateway.clone(), n.viewer.clone(), n.other.clone());
    door_seal_question(&n, "t1:fridge-1").await;
    door_seal_question(&n, "t2:fridge-1").await;
    let mine = n
        .client
        .list_notifications(with(&gateway, v1::ListNotificationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.notifications.len(), 1, "t1 sees only its own");
    let id = mine.notifications[0].notification_id.clone();
    // Another tenant: its own only; t1's notification is unknown to it.
    let theirs = n
        .client
        .list_notifications(with(&other, v1::ListNotificationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.notifications.len(), 1);
    assert_eq!(theirs.notifications[0].customer_id, "t2:carol");
    let e = n
        .client
        .record_response(with(&other, answer(&id, CLOSED_IT, "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = n
        .client
        .report_delivery(with(
            &other,
            v1::ReportDeliveryRequest {
                notification_id: id.clone(),
                state: v1::NotificationState::Sent as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut t2_stream = n
        .client
        .subscribe_notifications(with(
            &other,
            v1::SubscribeNotificationsRequest {
                subscriber_id: "gw-1".into(),
                after_cursor: Some(0),
                channels: Vec::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let d = next(&mut t2_stream).await;
    assert_eq!(d.notification.unwrap().customer_id, "t2:carol");
    // Scope.
    let e = n
        .client
        .list_notifications(with(&viewer, v1::ListNotificationsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = n
        .client
        .subscribe_notifications(with(
            &viewer,
            v1::SubscribeNotificationsRequest {
                subscriber_id: "gw-1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Bad input.
    for bad in [
        v1::SubscribeNotificationsRequest::default(),
        v1::SubscribeNotificationsRequest {
            subscriber_id: "x".repeat(65),
            ..Default::default()
        },
        v1::SubscribeNotificationsRequest {
            subscriber_id: "gw".into(),
            channels: vec![0],
            ..Default::default()
        },
    ] {
        let e = n
            .client
            .subscribe_notifications(with(&gateway, bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    for bad in [
        v1::ListNotificationsRequest {
            states: vec![42],
            ..Default::default()
        },
        v1::ListNotificationsRequest {
            page: Some(v1::PageRequest {
                page_size: 1,
                page_token: "x".into(),
            }),
            ..Default::default()
        },
    ] {
        let e = n
            .client
            .list_notifications(with(&gateway, bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // A notification with no question takes no answer.
    let mail = Mail {
        id: "t1:alice/9999".into(),
        from: Address::Customer("t1:alice".into()),
        to: Address::Notifier("t1".into()),
        body: Body::Notify {
            customer: "t1:alice".into(),
            channel: "email".into(),
            text: "Your filter is on its way".into(),
            priority: Priority::Low,
            question_id: None,
        },
    };
    n.recorder.deliver(mail).await.unwrap();
    let e = n
        .client
        .record_response(with(&gateway, answer("t1:alice/9999", "yes", "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = n
        .client
        .record_response(with(&gateway, answer("t1:nothing/1", "yes", "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_expire_unanswerable_and_undelivered_and_the_log_keeps_seven_days() {
    use caretwin_cluster::grpc::notifications::ANSWER_TTL_MS;
    use v1::NotificationState as S;
    let mut n = node().await;
    let gateway = n.gateway.clone();
    door_seal_question(&n, "t1:fridge-1").await;
    let mut stream = subscribe(&mut n, None).await;
    let first = next(&mut stream).await;
    let note = first.notification.clone().unwrap();
    // Its expiry by its kind (a question waits as long as the twin waits), its title and
    // the customer's language.
    assert_eq!(note.expires_at_ms, Some(NOW as i64 + ANSWER_TTL_MS as i64));
    assert_eq!(note.locale, "fr-FR");
    assert_eq!(note.title, "A question about your product");
    drop(stream);

    // Past its expiry: shown EXPIRED, an answer is refused, and nothing changes.
    n.clock.set(NOW + ANSWER_TTL_MS);
    let late = n
        .client
        .record_response(with(
            &gateway,
            answer(&note.notification_id, CLOSED_IT, "late-1"),
        ))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("expired"), "{late:?}");
    let list = |n: &mut Node| {
        let mut client = n.client.clone();
        let gateway = gateway.clone();
        async move {
            client
                .list_notifications(with(&gateway, v1::ListNotificationsRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .notifications
        }
    };
    let shown = list(&mut n).await;
    let expired = shown
        .iter()
        .find(|x| x.notification_id == note.notification_id)
        .expect("still listed");
    assert_eq!(expired.state, S::Expired as i32);
    assert!(expired.response.is_none());
    // A gateway subscribing from the start is not given the expired one: the first it
    // gets is the next notification (bob's, asked now).
    door_seal_question(&n, "t1:fridge-2").await;
    let mut stream = subscribe(&mut n, Some(0)).await;
    let bob = loop {
        let d = next(&mut stream).await;
        assert_ne!(
            d.cursor, first.cursor,
            "an expired notification is not delivered"
        );
        if d.notification.as_ref().unwrap().customer_id == "t1:bob" {
            break d;
        }
    };
    drop(stream);

    // Seven days on, both are past the retention: the log is trimmed, the list is empty,
    // and resuming before the first entry kept is OUT_OF_RANGE, naming where to resume.
    n.clock.set(NOW + ANSWER_TTL_MS + 8 * 24 * HOUR_MS);
    let kept = list(&mut n).await;
    assert!(
        !kept
            .iter()
            .any(|x| x.notification_id == note.notification_id
                || Some(&x.notification_id)
                    == bob.notification.as_ref().map(|b| &b.notification_id)),
        "{kept:?}"
    );
    let gone = n
        .client
        .subscribe_notifications(with(
            &gateway,
            v1::SubscribeNotificationsRequest {
                subscriber_id: "gw-1".into(),
                after_cursor: Some(first.cursor),
                channels: Vec::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::OutOfRange, "{gone:?}");
    assert!(
        gone.message().contains("resume with after_cursor"),
        "{gone:?}"
    );
}
