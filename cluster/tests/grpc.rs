//! The integrator gRPC endpoint over real tonic with TLS on a real socket: tokens and
//! scopes, tenant isolation, health and reflection for stock clients, and the handoff
//! stream of cases with its resume cursor.

use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::mail::{Address, Body, CaseContext, Mail};
use caretwin_actors::model::{ConsentScope, HOUR_MS, Insight, InsightKind, Priority};
use caretwin_actors::services::Status as DeskStatus;
use caretwin_actors::system::System;
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use caretwin_cluster::grpc::auth::Scope;
use caretwin_proto::v1::twin_service_client::TwinServiceClient;
use caretwin_proto::v1::{self, case_service_client::CaseServiceClient};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request};

mod common;
use common::{TestNode, with};

/// Only turns a hang into a failure; every wait ends on an observed event.
const DEADLINE: Duration = Duration::from_secs(30);
const T0: u64 = 1_795_392_000_000;

/// A node's twins and its gRPC endpoint, with tokens for three integrators.
struct Node {
    _node: TestNode,
    system: Arc<System>,
    channel: Channel,
    /// t1: cases:read + cases:handle.
    desk: String,
    /// t1: twins:read only.
    viewer: String,
    /// t2: admin.
    other_tenant: String,
}

async fn node() -> Node {
    let b = TestNode::builder(T0);
    let (b, desk) = b.token("desk", "t1", vec![Scope::CasesRead, Scope::CasesHandle]);
    let (b, viewer) = b.token("viewer", "t1", vec![Scope::TwinsRead]);
    let (b, other_tenant) = b.token("other", "t2", vec![Scope::Admin]);
    let n = b.start().await;
    let prov = DeviceMsg::Provision {
        customer: "t1:alice".into(),
        site: "t1:home-1".into(),
        model: "coffee.barista-200".into(),
    };
    assert_eq!(
        n.system.devices().call("t1:coffee-1", prov).await.unwrap(),
        DeviceReply::Ok
    );
    Node {
        system: n.system.clone(),
        channel: n.channel.clone(),
        desk,
        viewer,
        other_tenant,
        _node: n,
    }
}

/// Hands a case to the tenant's queue as the customer twin does.
async fn hand_off(n: &Node, case_id: &str, priority: Priority) {
    let context = CaseContext {
        customer: "t1:alice".into(),
        devices: vec!["t1:coffee-1".into()],
        root_cause: "pump_wear".into(),
        insights: vec![Insight {
            kind: InsightKind::Forecast,
            subject: "brew_pressure".into(),
            failure_mode: Some("pump_wear".into()),
            confidence: 0.9,
            eta_ms: Some(T0 + 5 * 24 * HOUR_MS),
            eta_band_ms: None,
            value: 8.4,
            raised_at_ms: T0,
            scope: ConsentScope::Diagnostics,
        }],
        actions: vec!["remote descale: failed".into()],
        suggested_next_step: "book a technician".into(),
        withheld: vec![ConsentScope::UsageAnalytics],
    };
    let mail = Mail {
        id: format!("t1:alice/{case_id}"),
        from: Address::Customer("t1:alice".into()),
        to: Address::Handoff("t1".into()),
        body: Body::Handoff {
            case_id: case_id.into(),
            priority,
            reason: "every remedy failed".into(),
            context,
        },
    };
    assert_eq!(
        n.system.handoff().call("t1", mail).await.unwrap(),
        DeskStatus::Done
    );
}

async fn next(stream: &mut tonic::Streaming<v1::CaseDelivery>) -> v1::CaseDelivery {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a delivery in time")
        .unwrap()
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_work_for_stock_clients() {
    let n = node().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(n.channel.clone());
    for service in [
        "",
        "caretwin.v1.CaseService",
        "caretwin.v1.TwinService",
        "caretwin.v1.CatalogueService",
        "caretwin.v1.WorkService",
        "caretwin.v1.CommandService",
        "caretwin.v1.NotificationService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(n.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("expected a service list, got {reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "caretwin.v1.CaseService",
        "caretwin.v1.TwinService",
        "caretwin.v1.CatalogueService",
        "caretwin.v1.NotificationService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|s| s == want), "{want} in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_and_tenants_are_checked_on_every_call() {
    let n = node().await;
    let mut twins = TwinServiceClient::new(n.channel.clone());
    let get = |device: &str| v1::GetTwinRequest {
        device_id: device.into(),
        view: v1::TwinView::Full as i32,
    };
    // No token, a wrong token.
    let e = twins
        .get_twin(Request::new(get("t1:coffee-1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = twins
        .get_twin(with("ct_not-a-token", get("t1:coffee-1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // A token without the scope.
    let e = twins
        .get_twin(with(&n.desk, get("t1:coffee-1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The right scope: the twin.
    let twin = twins
        .get_twin(with(&n.viewer, get("t1:coffee-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(twin.device_id, "t1:coffee-1");
    assert_eq!(twin.model_id, "coffee.barista-200");
    assert_eq!(twin.site_id, "t1:home-1");
    assert_eq!(twin.customer_id, "t1:alice");
    // Another tenant, even with admin, does not see it: not found, like a missing one.
    let e = twins
        .get_twin(with(&n.other_tenant, get("t1:coffee-1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = twins
        .get_twin(with(&n.viewer, get("t1:no-such-device")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Writing needs twins:write.
    let set = v1::SetDesiredRequest {
        device_id: "t1:coffee-1".into(),
        fields: [(
            "brew_temp".to_owned(),
            v1::DesiredFieldChange {
                value: Some(v1::SignalValue {
                    value: Some(v1::signal_value::Value::Number(93.0)),
                }),
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        idempotency_key: "k1".into(),
    };
    let e = twins
        .set_desired(with(&n.viewer, set.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Cases: another tenant's case is not found; reading needs cases:read.
    let mut cases = CaseServiceClient::new(n.channel.clone());
    hand_off(&n, "t1:alice/case-1", Priority::High).await;
    let e = cases
        .get_case(with(
            &n.other_tenant,
            v1::GetCaseRequest {
                case_id: "t1:alice/case-1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = cases
        .get_case(with(
            &n.viewer,
            v1::GetCaseRequest {
                case_id: "t1:alice/case-1".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let case = cases
        .get_case(with(
            &n.desk,
            v1::GetCaseRequest {
                case_id: "t1:alice/case-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(case.state, v1::CaseState::HandedOff as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_stream_with_context_and_resume_after_a_disconnect() {
    let n = node().await;
    let mut cases = CaseServiceClient::new(n.channel.clone());
    let subscribe = |after: Option<u64>| v1::SubscribeCasesRequest {
        subscriber_id: "crm-eu".into(),
        after_cursor: after,
        ..Default::default()
    };
    let mut stream = cases
        .subscribe_cases(with(&n.desk, subscribe(None)))
        .await
        .unwrap()
        .into_inner();
    // A case handed off after the subscription arrives, with what the agent needs.
    hand_off(&n, "t1:alice/case-1", Priority::High).await;
    let d1 = next(&mut stream).await;
    assert_eq!(d1.case_id, "t1:alice/case-1");
    assert_eq!(d1.event, v1::CaseEventKind::HandedOff as i32);
    let case = d1.case.clone().unwrap();
    assert_eq!(case.state, v1::CaseState::HandedOff as i32);
    assert_eq!(case.priority, v1::Priority::High as i32);
    assert_eq!(case.customer.unwrap().customer_id, "t1:alice");
    assert_eq!(case.devices[0].device_id, "t1:coffee-1");
    assert_eq!(case.devices[0].model_id, "coffee.barista-200");
    assert_eq!(case.site_id, "t1:home-1");
    assert_eq!(case.insights[0].signal, "brew_pressure");
    assert_eq!(case.actions[0].description, "remote descale: failed");
    assert_eq!(
        case.suggested_next_step.unwrap().description,
        "book a technician"
    );
    assert_eq!(
        case.withheld_scopes,
        [v1::ConsentScope::UsageAnalytics as i32]
    );
    assert_eq!(
        case.handoff_reason,
        v1::HandoffReason::RemediesExhausted as i32
    );
    // High priority: an agent must take it within the SLA (30 minutes by default).
    assert_eq!(case.sla_accept_by_ms, Some((T0 + HOUR_MS / 2) as i64));

    // An agent takes it; the stream says so. Another agent cannot take it any more.
    let accept = |agent: &str| v1::AcceptCaseRequest {
        case_id: "t1:alice/case-1".into(),
        agent_id: agent.into(),
        idempotency_key: format!("accept-{agent}"),
    };
    let taken = cases
        .accept_case(with(&n.desk, accept("agent-ann")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(taken.assigned_agent_id, "agent-ann");
    let again = cases
        .accept_case(with(&n.desk, accept("agent-ann")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.version, taken.version,
        "accepting twice changes nothing"
    );
    let e = cases
        .accept_case(with(&n.desk, accept("agent-bob")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let d2 = next(&mut stream).await;
    assert_eq!(d2.event, v1::CaseEventKind::Accepted as i32);
    assert!(d2.cursor > d1.cursor);
    let accepted = d2.case.unwrap();
    assert_eq!(accepted.assigned_agent_id, "agent-ann");
    assert_eq!(
        accepted.sla_accept_by_ms, None,
        "accepted: no deadline runs"
    );

    // The desk acknowledges the first delivery only, then disconnects; meanwhile a new
    // case arrives.
    let acked = cases
        .acknowledge_delivery(with(
            &n.desk,
            v1::AcknowledgeDeliveryRequest {
                subscriber_id: "crm-eu".into(),
                cursor: d1.cursor,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.acknowledged_cursor, d1.cursor);
    drop(stream);
    hand_off(&n, "t1:alice/case-2", Priority::Safety).await;

    // Resuming without a cursor: everything after the acknowledged one, again, in order.
    let mut stream = cases
        .subscribe_cases(with(&n.desk, subscribe(None)))
        .await
        .unwrap()
        .into_inner();
    let r1 = next(&mut stream).await;
    assert_eq!(
        (r1.cursor, r1.event),
        (d2.cursor, d2.event),
        "unacknowledged: delivered again"
    );
    let r2 = next(&mut stream).await;
    assert_eq!(r2.case_id, "t1:alice/case-2");
    assert_eq!(r2.event, v1::CaseEventKind::HandedOff as i32);
    assert!(r2.cursor > r1.cursor);
    // An explicit cursor wins over the stored one; filters apply.
    let mut safety_only = cases
        .subscribe_cases(with(
            &n.desk,
            v1::SubscribeCasesRequest {
                subscriber_id: "crm-eu".into(),
                after_cursor: Some(0),
                priorities: vec![v1::Priority::Safety as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut safety_only).await.case_id, "t1:alice/case-2");

    // Resolving: the stream says so, and the case is resolved for everyone.
    let resolved = cases
        .resolve_case(with(
            &n.desk,
            v1::ResolveCaseRequest {
                case_id: "t1:alice/case-1".into(),
                agent_id: "agent-ann".into(),
                code: v1::ResolutionCode::RepairedOnSite as i32,
                summary: "pump replaced".into(),
                idempotency_key: "resolve-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.state, v1::CaseState::Resolved as i32);
    let resolution = resolved.resolution.unwrap();
    assert_eq!(resolution.code, v1::ResolutionCode::RepairedOnSite as i32);
    assert_eq!(resolution.summary, "pump replaced");
    assert_eq!(resolution.resolved_by, "agent-ann");
    let r3 = next(&mut stream).await;
    assert_eq!(r3.event, v1::CaseEventKind::Resolved as i32);

    // Notes: kept once per idempotency key, delivered as an update, in the case for all.
    let note = |key: &str| v1::AddNoteRequest {
        case_id: "t1:alice/case-2".into(),
        author_id: "agent-bob".into(),
        text: "called the store; the alarm was a test".into(),
        visibility: v1::NoteVisibility::Internal as i32,
        idempotency_key: key.into(),
    };
    let n1 = cases
        .add_note(with(&n.desk, note("n-1")))
        .await
        .unwrap()
        .into_inner();
    let again = cases
        .add_note(with(&n.desk, note("n-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n1, again, "a retried note is the same note");
    let r4 = next(&mut stream).await;
    assert_eq!(r4.event, v1::CaseEventKind::Updated as i32);
    assert_eq!(r4.case.unwrap().notes, std::slice::from_ref(&n1));
    let case2 = cases
        .get_case(with(
            &n.desk,
            v1::GetCaseRequest {
                case_id: "t1:alice/case-2".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(case2.notes, [n1]);
    let mut empty = note("n-2");
    empty.text.clear();
    let e = cases.add_note(with(&n.desk, empty)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let listed = cases
        .list_cases(with(
            &n.desk,
            v1::ListCasesRequest {
                states: vec![v1::CaseState::HandedOff as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed.cases.iter().map(|c| c.case_id.as_str()).collect();
    assert_eq!(ids, ["t1:alice/case-2"]);
    // A cursor beyond the log is refused; nothing moves.
    let e = cases
        .acknowledge_delivery(with(
            &n.desk,
            v1::AcknowledgeDeliveryRequest {
                subscriber_id: "crm-eu".into(),
                cursor: 1_000_000,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_lists_every_model_with_its_playbooks() {
    use caretwin_proto::v1::catalogue_service_client::CatalogueServiceClient;
    let n = node().await;
    let mut catalogue = CatalogueServiceClient::new(n.channel.clone());
    // Scope catalogue:read (or admin) is needed.
    let e = catalogue
        .list_device_models(with(&n.desk, v1::ListDeviceModelsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = catalogue
            .list_device_models(with(
                &n.other_tenant,
                v1::ListDeviceModelsRequest {
                    category: String::new(),
                    page: Some(v1::PageRequest {
                        page_size: 3,
                        page_token: token.clone(),
                    }),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.models.len() <= 3);
        ids.extend(page.models.into_iter().map(|m| m.model_id));
        token = page.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let builtin: Vec<String> = Catalogue::builtin()
        .models()
        .iter()
        .map(|m| m.id().to_owned())
        .collect();
    assert_eq!(ids.len(), builtin.len(), "{ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "by model id, no repeats"
    );
    let coffee = catalogue
        .get_device_model(with(
            &n.other_tenant,
            v1::GetDeviceModelRequest {
                model_id: "coffee.barista-200".into(),
                revision: None,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let pressure = coffee
        .signals
        .iter()
        .find(|s| s.name == "brew_pressure")
        .unwrap();
    assert!(pressure.failure_threshold.is_some());
    assert!(
        coffee.failure_modes.iter().any(|f| !f.playbook.is_empty()),
        "playbooks travel with the model"
    );
    let e = catalogue
        .get_device_model(with(
            &n.other_tenant,
            v1::GetDeviceModelRequest {
                model_id: "no.such-model".into(),
                revision: None,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}
