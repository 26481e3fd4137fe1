//! The right to be forgotten, end to end: a real node process with its embedded store, an
//! edge sending a customer's readings and a smoke alarm over QUIC, an agent's notes on the
//! handed-off case over gRPC, a work order and a part order, the smoke notification, an
//! export that holds everything, then an erasure — after
//! which no gRPC read shows anything personal, a restart with the same provisioning file
//! does not bring the customer back, and no byte of the store (every keyspace, every key
//! and value, and every file on disk) holds any of the customer's personal strings.

use caretwin_cluster::grpc::auth::{Scope, TokensFile, mint};
use caretwin_cluster::store::EmbeddedStore;
use caretwin_cluster::sync::dev::{DevPki, generate, site_file_stem};
use caretwin_cluster::sync::tls::SiteIdentity;
use caretwin_edge::outbox::{Item, ItemKind, Outbox, OutboxConfig};
use caretwin_edge::sync::client::{ClientSettings, SyncClient};
use caretwin_edge::sync::tls::client_config_from_files;
use caretwin_edge::sync::transport::client_endpoint;
use caretwin_proto::v1::case_service_client::CaseServiceClient;
use caretwin_proto::v1::customer_service_client::CustomerServiceClient;
use caretwin_proto::v1::notification_service_client::NotificationServiceClient;
use caretwin_proto::v1::twin_service_client::TwinServiceClient;
use caretwin_proto::v1::work_service_client::WorkServiceClient;
use caretwin_proto::v1::{self, export_customer_chunk::Item as Chunk};
use caretwin_tests::{Process, strip_ansi};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

mod common;
use common::with;

/// Only turns a hang into a failure; every wait ends on an observed event.
const DEADLINE: Duration = Duration::from_secs(60);
const SITE: &str = "t1:home-zq";
const CUSTOMER: &str = "t1:cust-zq";
const OTHER: &str = "t1:cust-other";
const COFFEE: &str = "t1:coffee-zq";
const HUB: &str = "t1:hub-zq";

// The customer's personal data: strings found nowhere else.
const NAME: &str = "Zephyrine Quillfeather";
const EMAIL: &str = "zephyrine.q@erasure-test.example";
const PHONE: &str = "+447700900123";
const ADDRESS: &str = "17 Marigold Crescent, Lower Bramblewick";
const CRM: &str = "CRM-ZQ-4471";
const PERSONAL: [&str; 5] = [NAME, EMAIL, PHONE, ADDRESS, CRM];

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

struct Tokens {
    /// t1: customers:read.
    reader: String,
    /// t1: customers:read + customers:pii.
    pii: String,
    /// t1: customers:export.
    exporter: String,
    /// t1: customers:erase.
    eraser: String,
    /// t1: cases:read + cases:handle + twins:read.
    desk: String,
    /// t2: admin.
    other_tenant: String,
    /// t1: customers:write.
    writer: String,
    /// t1: work:read + work:write.
    work: String,
    /// t1: notifications:gateway.
    gateway: String,
}

fn tokens(d: &Path) -> Tokens {
    let (reader, e1) = mint("reader", "t1", vec![Scope::CustomersRead]);
    let (pii, e2) = mint("pii", "t1", vec![Scope::CustomersRead, Scope::CustomersPii]);
    let (exporter, e3) = mint("exporter", "t1", vec![Scope::CustomersExport]);
    let (eraser, e4) = mint("eraser", "t1", vec![Scope::CustomersErase]);
    let (desk, e5) = mint(
        "desk",
        "t1",
        vec![Scope::CasesRead, Scope::CasesHandle, Scope::TwinsRead],
    );
    let (other_tenant, e6) = mint("other", "t2", vec![Scope::Admin]);
    let (writer, e7) = mint("writer", "t1", vec![Scope::CustomersWrite]);
    let (work, e8) = mint("work", "t1", vec![Scope::WorkRead, Scope::WorkWrite]);
    let (gateway, e9) = mint("gateway", "t1", vec![Scope::NotificationsGateway]);
    let file = TokensFile {
        tokens: vec![e1, e2, e3, e4, e5, e6, e7, e8, e9],
    };
    write(&d.join("tokens.toml"), &toml::to_string(&file).unwrap());
    Tokens {
        reader,
        pii,
        exporter,
        eraser,
        desk,
        other_tenant,
        writer,
        work,
        gateway,
    }
}

fn provisioning(d: &Path) {
    write(
        &d.join("provision.toml"),
        &format!(
            r#"
[[customers]]
id = "{CUSTOMER}"
display_name = "{NAME}"
external_ref = "{CRM}"
locale = "en-GB"
tier = "premium"
contacts = [
  {{ channel = "email", address = "{EMAIL}", verified = true }},
  {{ channel = "sms", address = "{PHONE}" }},
]

[[customers]]
id = "{OTHER}"
display_name = "Other Person"

[[devices]]
id = "{COFFEE}"
site = "{SITE}"
customer = "{CUSTOMER}"
model = "coffee.barista-200"

[[devices]]
id = "{HUB}"
site = "{SITE}"
customer = "{CUSTOMER}"
model = "hub.guardian-1"
"#
        ),
    );
}

/// Starts the node; returns it and its sync and gRPC addresses.
fn start_node(d: &Path) -> (Process, String, String) {
    let certs = d.join("certs");
    write(
        &d.join("cluster.toml"),
        &format!(
            r#"
tick = "50ms"
provision = "{provision}"
[store.embedded]
path = "{store}"
[sync]
listen = "127.0.0.1:0"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[grpc]
listen = "127.0.0.1:0"
tokens = "{tokens}"
"#,
            provision = d.join("provision.toml").display(),
            store = d.join("cluster-data").display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join("cluster.pem").display(),
            key = certs.join("cluster.key").display(),
            tokens = d.join("tokens.toml").display(),
        ),
    );
    let config = d.join("cluster.toml");
    let mut node = Process::start(
        Path::new(env!("CARGO_BIN_EXE_caretwin-cluster")),
        &["--config", config.to_str().unwrap(), "run"],
        &[("RUST_LOG", "warn,caretwin_cluster=info")],
    )
    .unwrap();
    let addr_of = |line: String| {
        strip_ansi(&line)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("the bound address is logged")
            .to_owned()
    };
    let sync = addr_of(node.wait_for("sync listening").unwrap());
    let grpc = addr_of(node.wait_for("gRPC listening").unwrap());
    (node, sync, grpc)
}

fn stop(mut node: Process) {
    node.terminate().unwrap();
    let status = node.wait().unwrap();
    assert!(status.success(), "{}", node.transcript());
}

async fn channel(d: &Path, grpc: &str) -> Channel {
    common::connect(&d.join("certs"), grpc).await
}

/// Everything the strings of `x` (its debug form) contain that is personal.
fn personal_in(x: &impl std::fmt::Debug) -> Vec<&'static str> {
    let text = format!("{x:?}");
    PERSONAL.into_iter().filter(|s| text.contains(s)).collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_customer_leaves_nothing_personal_in_any_read_or_any_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    generate(&DevPki {
        out: certs.clone(),
        cluster_name: "localhost".into(),
        sites: vec![SiteIdentity::new(SITE).unwrap()],
        force: false,
    })
    .unwrap();
    let t = tokens(d);
    provisioning(d);
    let (node, sync_addr, grpc_addr) = start_node(d);
    let ch = channel(d, &grpc_addr).await;
    let mut customers = CustomerServiceClient::new(ch.clone());
    let mut cases = CaseServiceClient::new(ch.clone());
    let mut twins = TwinServiceClient::new(ch.clone());
    let mut work = WorkServiceClient::new(ch.clone());
    let mut gateway = NotificationServiceClient::new(ch);

    // The edge: readings of the coffee machine, then smoke at the hub.
    let outbox = Arc::new(Outbox::open(&OutboxConfig::at(d.join("edge"))).unwrap());
    let stem = site_file_stem(&SiteIdentity::new(SITE).unwrap());
    let tls = client_config_from_files(
        &certs.join("ca.pem"),
        &certs.join(format!("{stem}.pem")),
        &certs.join(format!("{stem}.key")),
    )
    .unwrap();
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap(), tls).unwrap();
    let new_items = Arc::new(tokio::sync::Notify::new());
    let (tx, mut downlink) = tokio::sync::mpsc::channel(1024);
    let client = Arc::new(SyncClient::new(
        ClientSettings {
            site_id: SITE.into(),
            nodes: vec![sync_addr.to_string()],
            server_name: "localhost".into(),
            max_backoff: Duration::from_secs(1),
            compress: true,
        },
        endpoint,
        outbox.clone(),
        new_items.clone(),
        tx,
    ));
    tokio::spawn(async move { while downlink.recv().await.is_some() {} });
    let (stop_edge, edge_stopped) = tokio::sync::oneshot::channel::<()>();
    let edge = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .run(async move {
                    let _ = edge_stopped.await;
                })
                .await
        })
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut items: Vec<Item> = (0..5)
        .map(|i| {
            Item::new(
                COFFEE,
                now + i,
                ItemKind::Reading {
                    signal: "brew_pressure".into(),
                    value: 9.0,
                },
            )
        })
        .collect();
    items.push(Item::new(
        HUB,
        now + 10,
        ItemKind::Alarm {
            kind: "smoke".into(),
            local_action: Some("siren".into()),
        },
    ));
    let mut sub = with(
        &t.desk,
        v1::SubscribeCasesRequest {
            subscriber_id: "desk".into(),
            kinds: vec![v1::CaseEventKind::HandedOff as i32],
            ..Default::default()
        },
    );
    sub.set_timeout(DEADLINE);
    let mut stream = cases.subscribe_cases(sub).await.unwrap().into_inner();
    outbox.accept(items).await.unwrap();
    new_items.notify_waiters();
    let case_id = loop {
        let delivery = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("the alarm's case in time")
            .unwrap()
            .unwrap();
        let case = delivery.case.unwrap();
        if case.devices.iter().any(|dev| dev.device_id == HUB) {
            break case.case_id;
        }
    };
    drop(stream);
    // The hub's twin told the customer about the smoke: the notification is recorded for
    // the gateways.
    let mut sub = with(
        &t.gateway,
        v1::SubscribeNotificationsRequest {
            subscriber_id: "gw".into(),
            ..Default::default()
        },
    );
    sub.set_timeout(DEADLINE);
    let mut stream = gateway
        .subscribe_notifications(sub)
        .await
        .unwrap()
        .into_inner();
    let notification = loop {
        let delivery = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("the smoke notification in time")
            .unwrap()
            .unwrap();
        let n = delivery.notification.unwrap();
        if n.customer_id == CUSTOMER {
            break n;
        }
    };
    drop(stream);
    assert!(
        !notification.body.is_empty() && !notification.body.starts_with("ct-sealed"),
        "the gateway reads the text: {notification:?}"
    );
    // A work order and a part order for the customer's coffee machine.
    let wo = work
        .create_work_order(with(
            &t.work,
            v1::CreateWorkOrderRequest {
                idempotency_key: "wo-1".into(),
                device_id: COFFEE.into(),
                failure_mode_id: "pump-wear".into(),
                description: "replace the pump".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wo.customer_id, CUSTOMER);
    let po = work
        .create_part_order(with(
            &t.work,
            v1::CreatePartOrderRequest {
                idempotency_key: "po-1".into(),
                item_kind: v1::OrderItemKind::Part as i32,
                part_number: "FILTER-CL".into(),
                quantity: 1,
                device_id: COFFEE.into(),
                work_order_id: wo.work_order_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(po.customer_id, CUSTOMER);
    // The readings went through too (they were sent before the alarm, in order).
    let coffee = twins
        .get_twin(with(
            &t.desk,
            v1::GetTwinRequest {
                device_id: COFFEE.into(),
                view: v1::TwinView::Full as i32,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(coffee.applied_seq, 5, "{coffee:?}");
    assert_eq!(coffee.customer_id, CUSTOMER);

    // The agent takes the case and writes about the person, as agents do.
    let accept = v1::AcceptCaseRequest {
        case_id: case_id.clone(),
        agent_id: "agent-7".into(),
        idempotency_key: "a1".into(),
    };
    cases.accept_case(with(&t.desk, accept)).await.unwrap();
    let note = v1::AddNoteRequest {
        case_id: case_id.clone(),
        author_id: "agent-7".into(),
        text: format!("Called {NAME} at {PHONE}; smoke from toaster at {ADDRESS}"),
        visibility: v1::NoteVisibility::Internal as i32,
        idempotency_key: "n1".into(),
    };
    let added = cases
        .add_note(with(&t.desk, note))
        .await
        .unwrap()
        .into_inner();
    assert!(added.text.contains(NAME), "the agent reads the note back");
    let resolve = v1::ResolveCaseRequest {
        case_id: case_id.clone(),
        agent_id: "agent-7".into(),
        code: v1::ResolutionCode::Other as i32,
        summary: format!("False alarm; confirmed by e-mail to {EMAIL}"),
        ..Default::default()
    };
    cases.resolve_case(with(&t.desk, resolve)).await.unwrap();
    let case = cases
        .get_case(with(
            &t.desk,
            v1::GetCaseRequest {
                case_id: case_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        case.customer.as_ref().unwrap().display_name,
        NAME,
        "the context names the customer"
    );
    assert!(case.resolution.as_ref().unwrap().summary.contains(EMAIL));

    // The customer: contact points only with customers:pii; other tenants see nothing.
    let get = |id: &str| v1::GetCustomerRequest {
        customer_id: id.into(),
    };
    let plain = customers
        .get_customer(with(&t.reader, get(CUSTOMER)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.display_name, NAME);
    assert!(plain.contact_points.is_empty(), "{plain:?}");
    assert_eq!(plain.value_tier, v1::ValueTier::Premium as i32);
    assert_eq!(plain.device_ids, [COFFEE, HUB]);
    let full = customers
        .get_customer(with(&t.pii, get(CUSTOMER)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(personal_in(&full.contact_points), [EMAIL, PHONE]);
    for (token, id, code) in [
        (&t.other_tenant, CUSTOMER, Code::NotFound),
        (&t.exporter, CUSTOMER, Code::PermissionDenied),
        (&t.reader, "t1:nobody", Code::NotFound),
        (&t.reader, "", Code::InvalidArgument),
        (&t.reader, "t1:bad\u{7}id", Code::InvalidArgument),
    ] {
        let e = customers
            .get_customer(with(token, get(id)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{id:?}: {e:?}");
    }
    let listed = customers
        .list_customers(with(&t.reader, v1::ListCustomersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .customers
        .iter()
        .map(|c| c.customer_id.as_str())
        .collect();
    assert_eq!(ids, [OTHER, CUSTOMER], "by customer id");
    let foreign = customers
        .list_customers(with(&t.other_tenant, v1::ListCustomersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        foreign.customers.is_empty(),
        "another tenant lists none of t1's"
    );

    // Preferences: bad input changes nothing; a masked update changes only its fields.
    let prefs = |tz: &str, expected: Option<u64>| {
        with(
            &t.writer,
            v1::UpdatePreferencesRequest {
                customer_id: CUSTOMER.into(),
                preferences: Some(v1::Preferences {
                    quiet_hours: Some(v1::QuietHours {
                        start_minute: 1320,
                        end_minute: 420,
                        timezone: tz.into(),
                    }),
                    notification_budget_per_week: 99,
                    ..Default::default()
                }),
                update_mask: vec!["quiet_hours".into()],
                expected_version: expected,
                idempotency_key: "p1".into(),
            },
        )
    };
    // The resolution reaches the customer twin as mail, after the desk's answer: wait for
    // it (the case leaves the customer's open cases), so nothing else moves the customer's
    // version while the bad updates below are tried.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let before = loop {
        let c = customers
            .get_customer(with(&t.reader, get(CUSTOMER)))
            .await
            .unwrap()
            .into_inner();
        if !c.open_case_ids.contains(&case_id) {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the resolution never reached the customer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (tz, expected, code) in [
        ("Mars/Olympus", None, Code::InvalidArgument),
        (
            "UTC+01:00",
            Some(before.version + 100),
            Code::FailedPrecondition,
        ),
    ] {
        let e = customers
            .update_preferences(prefs(tz, expected))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    let e = customers
        .update_preferences(with(&t.reader, v1::UpdatePreferencesRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let unchanged = customers
        .get_customer(with(&t.reader, get(CUSTOMER)))
        .await
        .unwrap()
        .into_inner();
    // (The customer's version may move meanwhile: mail from the case reaches the twin in
    // the background. What the bad calls must not touch is the preferences.)
    assert_eq!(
        unchanged.preferences, before.preferences,
        "bad input changed nothing"
    );
    // A good update at the version read: as a client would, read again if mail moved the
    // customer between the read and the write.
    let mut tries = 0;
    let updated = loop {
        let read = customers
            .get_customer(with(&t.reader, get(CUSTOMER)))
            .await
            .unwrap()
            .into_inner();
        match customers
            .update_preferences(prefs("UTC+01:00", Some(read.version)))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::FailedPrecondition && tries < 20 => tries += 1,
            Err(e) => panic!("{e:?}"),
        }
    };
    let p = updated.preferences.unwrap();
    assert_eq!(p.quiet_hours.unwrap().timezone, "UTC+01:00");
    assert_eq!(p.notification_budget_per_week, 3, "not in the mask");
    assert!(updated.version > before.version);

    // Consent: withdrawn through the twin, in effect when the call returns.
    let consent = v1::UpdateConsentRequest {
        customer_id: CUSTOMER.into(),
        withdraw: vec![v1::ConsentScope::Marketing as i32],
        source: v1::ConsentSource::Customer as i32,
        evidence: "form-881".into(),
        idempotency_key: "c1".into(),
        ..Default::default()
    };
    let both = v1::UpdateConsentRequest {
        grant: vec![v1::ConsentScope::Marketing as i32],
        ..consent.clone()
    };
    let e = customers
        .update_consent(with(&t.writer, both))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let changed = customers
        .update_consent(with(&t.writer, consent))
        .await
        .unwrap()
        .into_inner();
    let marketing = changed
        .consents
        .iter()
        .find(|g| g.scope == v1::ConsentScope::Marketing as i32)
        .unwrap();
    assert!(!marketing.granted);
    assert_eq!(marketing.source, v1::ConsentSource::Customer as i32);

    // The export holds everything, the customer first and the manifest last.
    let export = |token: &str| {
        with(
            token,
            v1::ExportCustomerRequest {
                customer_id: CUSTOMER.into(),
                include_readings: true,
            },
        )
    };
    for (token, code) in [
        (&t.other_tenant, Code::NotFound),
        (&t.reader, Code::PermissionDenied),
    ] {
        let e = customers.export_customer(export(token)).await.unwrap_err();
        assert_eq!(e.code(), code);
    }
    let mut chunks = Vec::new();
    let mut s = customers
        .export_customer(export(&t.exporter))
        .await
        .unwrap()
        .into_inner();
    while let Some(c) = s.message().await.unwrap() {
        chunks.push(c.item.unwrap());
    }
    assert!(matches!(chunks.first(), Some(Chunk::Customer(_))));
    let Some(Chunk::Manifest(manifest)) = chunks.last() else {
        panic!("no manifest last: {chunks:?}");
    };
    assert_eq!(personal_in(&chunks), PERSONAL, "the export holds it all");
    assert!(
        chunks
            .iter()
            .any(|c| matches!(c, Chunk::Device(t) if t.device_id == COFFEE))
    );
    assert!(
        chunks
            .iter()
            .any(|c| matches!(c, Chunk::Case(c) if c.case_id == case_id))
    );
    assert!(chunks.iter().any(
        |c| matches!(c, Chunk::Readings(r) if r.device_id == COFFEE && r.signal == "brew_pressure")
    ));
    assert_eq!(manifest.counts.get("device"), Some(&2));
    assert_eq!(manifest.counts.get("customer"), Some(&1));
    assert_eq!(manifest.counts.get("consent_history"), Some(&1));
    // What the desks and the notification log hold about them is in it too.
    assert!(
        chunks
            .iter()
            .any(|c| matches!(c, Chunk::WorkOrder(w) if w.work_order_id == wo.work_order_id)),
        "{chunks:?}"
    );
    assert!(chunks.iter().any(
        |c| matches!(c, Chunk::PartOrder(o) if o.part_order_id == po.part_order_id
            && o.work_order_id == wo.work_order_id)
    ));
    assert!(chunks.iter().any(
        |c| matches!(c, Chunk::Notification(n) if n.notification_id == notification.notification_id
            && n.body == notification.body)
    ));
    for kind in ["work_order", "part_order", "notification"] {
        let counted = manifest.counts.get(kind).copied().unwrap_or_default();
        let sent = chunks
            .iter()
            .filter(|c| match kind {
                "work_order" => matches!(c, Chunk::WorkOrder(_)),
                "part_order" => matches!(c, Chunk::PartOrder(_)),
                _ => matches!(c, Chunk::Notification(_)),
            })
            .count() as u64;
        assert!(counted >= 1 && counted == sent, "{kind}: {manifest:?}");
    }

    // Erasure: only with the scope, only within the tenant.
    let erase = |token: &str| {
        with(
            token,
            v1::EraseCustomerRequest {
                customer_id: CUSTOMER.into(),
                reason: "customer request".into(),
                idempotency_key: "e1".into(),
            },
        )
    };
    for (token, code) in [
        (&t.other_tenant, Code::NotFound),
        (&t.exporter, Code::PermissionDenied),
    ] {
        let e = customers.erase_customer(erase(token)).await.unwrap_err();
        assert_eq!(e.code(), code);
    }
    let e = customers
        .erase_customer(with(
            &t.eraser,
            v1::EraseCustomerRequest {
                customer_id: "t1:nobody".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let report = customers
        .erase_customer(erase(&t.eraser))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.customer_id, CUSTOMER);
    assert_eq!(report.detached_device_ids, [COFFEE, HUB]);
    assert!(
        report
            .erased
            .iter()
            .any(|e| e.store.contains("case-log") && e.count == 2)
    );
    assert!(report.retained.iter().any(|r| r.category == "cases"));
    assert!(
        report
            .erased
            .iter()
            .any(|e| e.store == "notification-log" && e.count >= 1),
        "{report:?}"
    );
    for category in [
        "notifications",
        "part orders, work orders and technician bookings",
    ] {
        let r = report.retained.iter().find(|r| r.category == category);
        assert!(
            r.is_some_and(|r| !r.reason.starts_with('0')),
            "{category} counted: {report:?}"
        );
    }
    let again = customers
        .erase_customer(erase(&t.eraser))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, report, "repeating the call returns the first report");

    // (1) No read shows anything personal.
    for token in [&t.reader, &t.pii] {
        let e = customers
            .get_customer(with(token, get(CUSTOMER)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let e = customers
        .export_customer(export(&t.exporter))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let listed = customers
        .list_customers(with(&t.pii, v1::ListCustomersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .customers
        .iter()
        .map(|c| c.customer_id.as_str())
        .collect();
    assert_eq!(ids, [OTHER], "the other customer is untouched");
    let case = cases
        .get_case(with(
            &t.desk,
            v1::GetCaseRequest {
                case_id: case_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(personal_in(&case), Vec::<&str>::new(), "{case:?}");
    assert_eq!(case.notes[0].text, "[erased]");
    assert_eq!(case.customer.as_ref().unwrap().customer_id, "");
    let all = cases
        .list_cases(with(&t.desk, v1::ListCasesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(personal_in(&all), Vec::<&str>::new());
    let theirs = cases
        .list_cases(with(
            &t.desk,
            v1::ListCasesRequest {
                customer_id: CUSTOMER.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.cases.is_empty(), "no case is tied to them any more");
    // Nothing personal is written about them again.
    let note = v1::AddNoteRequest {
        case_id: case_id.clone(),
        author_id: "agent-7".into(),
        text: format!("{NAME} called back"),
        visibility: v1::NoteVisibility::Internal as i32,
        idempotency_key: "n2".into(),
    };
    let e = cases.add_note(with(&t.desk, note)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    for device in [COFFEE, HUB] {
        let twin = twins
            .get_twin(with(
                &t.desk,
                v1::GetTwinRequest {
                    device_id: device.into(),
                    view: v1::TwinView::Full as i32,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((twin.customer_id.as_str(), twin.site_id.as_str()), ("", ""));
        assert!(twin.reported.is_empty(), "{twin:?}");
    }

    // The notification stays as a delivery record: no text, no recipient, no customer.
    let listed = gateway
        .list_notifications(with(&t.gateway, v1::ListNotificationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(personal_in(&listed), Vec::<&str>::new());
    let kept = listed
        .notifications
        .iter()
        .find(|n| n.notification_id == notification.notification_id)
        .expect("the delivery record stays");
    assert_eq!(kept.body, "[erased]");
    assert_eq!(kept.customer_id, "");
    let theirs = gateway
        .list_notifications(with(
            &t.gateway,
            v1::ListNotificationsRequest {
                customer_id: CUSTOMER.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        theirs.notifications.is_empty(),
        "none is tied to them any more"
    );
    // The desks' records keep only the pseudonymous id.
    let wo_after = work
        .get_work_order(with(
            &t.work,
            v1::GetWorkOrderRequest {
                work_order_id: wo.work_order_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(personal_in(&wo_after), Vec::<&str>::new());
    let po_after = work
        .get_part_order(with(
            &t.work,
            v1::GetPartOrderRequest {
                part_order_id: po.part_order_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(personal_in(&po_after), Vec::<&str>::new());

    let _ = stop_edge.send(());
    let _ = edge.await;
    stop(node);

    // A restart with the same provisioning file does not bring the customer back.
    let (node, _, grpc_addr) = start_node(d);
    let mut customers = CustomerServiceClient::new(channel(d, &grpc_addr).await);
    let e = customers
        .get_customer(with(&t.pii, get(CUSTOMER)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    stop(node);

    // (2) Not a byte of the store holds anything personal: every key and value of every
    // keyspace, read raw...
    let dump = EmbeddedStore::dump_raw(&d.join("cluster-data")).unwrap();
    assert!(
        dump.iter()
            .any(|(_, k, v)| contains(k, COFFEE) || contains(v, COFFEE)),
        "the dump sees the store (the device is still registered)"
    );
    assert!(
        dump.iter()
            .any(|(ks, k, _)| ks == "logs" && contains(k, "cases/t1")),
        "the case log is still there"
    );
    for (keyspace, k, v) in &dump {
        for s in PERSONAL {
            assert!(
                !contains(k, s) && !contains(v, s),
                "{s:?} in keyspace {keyspace}, key {:?}",
                String::from_utf8_lossy(k)
            );
        }
    }
    // ...and every file of the database on disk, journal and tables included (old
    // versions live there until compaction: the personal data was never written in clear).
    let mut all = Vec::new();
    files(&d.join("cluster-data"), &mut all);
    assert!(!all.is_empty());
    for f in all {
        let bytes = std::fs::read(&f).unwrap();
        for s in PERSONAL {
            assert!(!contains(&bytes, s), "{s:?} in {}", f.display());
        }
    }
}
