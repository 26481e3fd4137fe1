//! TwinService's QueryTwins and WatchTwins over real tonic with TLS on a real socket: the
//! device index behind queries (filters, paging, tenants), and watch streams that start
//! with the current state, wake on each change, coalesce bursts and end on shutdown.

use caretwin_actors::model::HOUR_MS;
use caretwin_actors::system::System;
use caretwin_actors::twins::device::{DeviceItem, DeviceMsg, DeviceReply, ItemKind};
use caretwin_cluster::grpc::auth::Scope;
use caretwin_proto::v1::{self, twin_service_client::TwinServiceClient};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;

mod common;
use common::{TestNode, with};

/// Only turns a hang into a failure; every wait ends on an observed event.
const DEADLINE: Duration = Duration::from_secs(30);
const T0: u64 = 1_795_392_000_000;
const COFFEE: &str = "coffee.barista-200";
const FRIDGE: &str = "fridge.coolline-350";

struct Node {
    node: TestNode,
    system: Arc<System>,
    twins: TwinServiceClient<Channel>,
    /// t1: twins:read.
    viewer: String,
    /// t2: admin.
    other: String,
    /// t1: cases:read only.
    desk: String,
}

async fn provision(system: &System, device: &str, customer: &str, site: &str, model: &str) {
    let prov = DeviceMsg::Provision {
        customer: customer.into(),
        site: site.into(),
        model: model.into(),
    };
    assert_eq!(
        system.devices().call(device, prov).await.unwrap(),
        DeviceReply::Ok
    );
}

/// t1: five coffee machines and a fridge at home-1 (alice), two fridges at home-2 (bob);
/// t2: one coffee machine.
async fn node() -> Node {
    let b = TestNode::builder(T0);
    let (b, viewer) = b.token("viewer", "t1", vec![Scope::TwinsRead]);
    let (b, other) = b.token("other", "t2", vec![Scope::Admin]);
    let (b, desk) = b.token("desk", "t1", vec![Scope::CasesRead]);
    let n = b.start().await;
    for i in 1..=5 {
        let d = format!("t1:coffee-{i}");
        provision(&n.system, &d, "t1:alice", "t1:home-1", COFFEE).await;
    }
    provision(&n.system, "t1:fridge-1", "t1:alice", "t1:home-1", FRIDGE).await;
    provision(&n.system, "t1:fridge-2", "t1:bob", "t1:home-2", FRIDGE).await;
    provision(&n.system, "t1:fridge-3", "t1:bob", "t1:home-2", FRIDGE).await;
    provision(&n.system, "t2:coffee-1", "t2:carol", "t2:home-1", COFFEE).await;
    Node {
        system: n.system.clone(),
        twins: TwinServiceClient::new(n.channel.clone()),
        viewer,
        other,
        desk,
        node: n,
    }
}

fn reading(seq: u64, signal: &str, value: f64) -> DeviceItem {
    DeviceItem {
        seq,
        // One a minute, before the node's clock (device time may not run ahead of it).
        ts_ms: T0 - HOUR_MS + seq * 60_000,
        kind: ItemKind::Reading {
            signal: signal.into(),
            value,
        },
    }
}

async fn apply(n: &Node, device: &str, items: Vec<DeviceItem>) {
    match n
        .system
        .devices()
        .call(device, DeviceMsg::Apply(items))
        .await
        .unwrap()
    {
        DeviceReply::Applied(r) => assert!(r.rejected.is_empty(), "{r:?}"),
        other => panic!("not applied: {other:?}"),
    }
}

async fn query(n: &mut Node, token: &str, q: v1::QueryTwinsRequest) -> v1::QueryTwinsResponse {
    n.twins
        .query_twins(with(token, q))
        .await
        .unwrap()
        .into_inner()
}

fn ids(r: &v1::QueryTwinsResponse) -> Vec<&str> {
    r.twins.iter().map(|t| t.device_id.as_str()).collect()
}

async fn next(stream: &mut tonic::Streaming<v1::TwinUpdate>) -> v1::TwinUpdate {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("an update in time")
        .unwrap()
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_by_site_model_customer_with_paging_within_the_tenant() {
    let mut n = node().await;
    let viewer = n.viewer.clone();
    // Everything of the tenant, by device id, in pages of 3.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = query(
            &mut n,
            &viewer,
            v1::QueryTwinsRequest {
                page: Some(v1::PageRequest {
                    page_size: 3,
                    page_token: token.clone(),
                }),
                ..Default::default()
            },
        )
        .await;
        pages += 1;
        assert!(r.twins.len() <= 3);
        seen.extend(r.twins.iter().map(|t| t.device_id.clone()));
        token = r.page.unwrap().next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let want: Vec<String> = [
        "t1:coffee-1",
        "t1:coffee-2",
        "t1:coffee-3",
        "t1:coffee-4",
        "t1:coffee-5",
        "t1:fridge-1",
        "t1:fridge-2",
        "t1:fridge-3",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(
        seen, want,
        "ordered, complete, no duplicates, no other tenant"
    );
    assert_eq!(pages, 3);
    // By site, by model, by customer, combined.
    let by_site = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            site_id: "t1:home-2".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&by_site), ["t1:fridge-2", "t1:fridge-3"]);
    let t = &by_site.twins[0];
    assert_eq!(
        (t.tenant_id.as_str(), t.customer_id.as_str()),
        ("t1", "t1:bob")
    );
    assert_eq!(t.health, v1::Health::Ok as i32);
    let by_model = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            model_id: FRIDGE.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids(&by_model),
        ["t1:fridge-1", "t1:fridge-2", "t1:fridge-3"]
    );
    let combined = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            model_id: FRIDGE.into(),
            customer_id: "t1:alice".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&combined), ["t1:fridge-1"]);
    // Paging a filtered query, and a token of another filter is refused.
    let first = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            site_id: "t1:home-1".into(),
            page: Some(v1::PageRequest {
                page_size: 4,
                page_token: String::new(),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(first.twins.len(), 4);
    let token = first.page.unwrap().next_page_token;
    let second = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            site_id: "t1:home-1".into(),
            page: Some(v1::PageRequest {
                page_size: 4,
                page_token: token.clone(),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&second), ["t1:coffee-5", "t1:fridge-1"]);
    assert!(second.page.unwrap().next_page_token.is_empty());
    let e = n
        .twins
        .query_twins(with(
            &viewer,
            v1::QueryTwinsRequest {
                site_id: "t1:home-2".into(),
                page: Some(v1::PageRequest {
                    page_size: 4,
                    page_token: token,
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Summary leaves the maps empty; FULL has them.
    n.system
        .devices()
        .call(
            "t1:coffee-1",
            DeviceMsg::SetDesired {
                field: "brew_temp".into(),
                value: "93".into(),
                expected_version: None,
            },
        )
        .await
        .unwrap();
    for (view, has_desired) in [(v1::TwinView::Summary, false), (v1::TwinView::Full, true)] {
        let r = query(
            &mut n,
            &viewer,
            v1::QueryTwinsRequest {
                site_id: "t1:home-1".into(),
                view: view as i32,
                page: Some(v1::PageRequest {
                    page_size: 1,
                    page_token: String::new(),
                }),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(r.twins[0].desired.contains_key("brew_temp"), has_desired);
    }
    // The other tenant sees only its own, and a filter naming t1's site finds nothing.
    let other = n.other.clone();
    let theirs = query(&mut n, &other, v1::QueryTwinsRequest::default()).await;
    assert_eq!(ids(&theirs), ["t2:coffee-1"]);
    let probing = query(
        &mut n,
        &other,
        v1::QueryTwinsRequest {
            site_id: "t1:home-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(probing.twins.is_empty());
    // A device moved to another site leaves the first site's results.
    provision(&n.system, "t1:coffee-5", "t1:bob", "t1:home-2", COFFEE).await;
    let moved = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            site_id: "t1:home-2".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&moved), ["t1:coffee-5", "t1:fridge-2", "t1:fridge-3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_by_health_and_open_insight_reads_the_live_twins() {
    let mut n = node().await;
    let viewer = n.viewer.clone();
    // coffee-3's boiler overheats: its health falls and its customer opens a case.
    let items = (1..=6)
        .map(|s| reading(s, "boiler_temperature", 120.0))
        .collect();
    apply(&n, "t1:coffee-3", items).await;
    n.system.settle(20).await.unwrap();
    let sick = n
        .twins
        .get_twin(with(
            &viewer,
            v1::GetTwinRequest {
                device_id: "t1:coffee-3".into(),
                view: v1::TwinView::Summary as i32,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(sick.health, v1::Health::Ok as i32, "{sick:?}");
    assert!(!sick.open_insights.is_empty(), "{sick:?}");
    let kind = sick.open_insights[0].kind;
    let by_health = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            health: vec![sick.health],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&by_health), ["t1:coffee-3"]);
    let healthy = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            health: vec![v1::Health::Ok as i32],
            model_id: COFFEE.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids(&healthy),
        ["t1:coffee-1", "t1:coffee-2", "t1:coffee-4", "t1:coffee-5"]
    );
    let by_insight = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            has_open_insight: kind,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&by_insight), ["t1:coffee-3"]);
    assert_eq!(by_insight.twins[0].open_insights[0].kind, kind);
    // Live filters page too: one match per page of one.
    let first = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            health: vec![v1::Health::Ok as i32],
            page: Some(v1::PageRequest {
                page_size: 1,
                page_token: String::new(),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&first), ["t1:coffee-1"]);
    let second = query(
        &mut n,
        &viewer,
        v1::QueryTwinsRequest {
            health: vec![v1::Health::Ok as i32],
            page: Some(v1::PageRequest {
                page_size: 1,
                page_token: first.page.unwrap().next_page_token,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&second), ["t1:coffee-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_and_scopes_are_refused() {
    let mut n = node().await;
    let viewer = n.viewer.clone();
    let bad = [
        v1::QueryTwinsRequest {
            health: vec![0],
            ..Default::default()
        },
        v1::QueryTwinsRequest {
            health: vec![99],
            ..Default::default()
        },
        v1::QueryTwinsRequest {
            has_open_insight: 42,
            ..Default::default()
        },
        v1::QueryTwinsRequest {
            view: 7,
            ..Default::default()
        },
        v1::QueryTwinsRequest {
            site_id: "home-1".into(),
            ..Default::default()
        },
        v1::QueryTwinsRequest {
            customer_id: "t1:".into(),
            ..Default::default()
        },
        v1::QueryTwinsRequest {
            page: Some(v1::PageRequest {
                page_size: 2,
                page_token: "garbage".into(),
            }),
            ..Default::default()
        },
    ];
    for q in bad {
        let e = n
            .twins
            .query_twins(with(&viewer, q.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{q:?}: {e:?}");
    }
    let watch_bad = [
        v1::WatchTwinsRequest::default(),
        v1::WatchTwinsRequest {
            device_ids: vec!["t1:coffee-1".into()],
            site_id: "t1:home-1".into(),
            ..Default::default()
        },
        v1::WatchTwinsRequest {
            device_ids: (0..1001).map(|i| format!("t1:d-{i}")).collect(),
            ..Default::default()
        },
        v1::WatchTwinsRequest {
            site_id: "t1:home-1".into(),
            view: 9,
            ..Default::default()
        },
    ];
    for w in watch_bad {
        let e = n
            .twins
            .watch_twins(with(&viewer, w.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{w:?}: {e:?}");
    }
    // Another tenant's device or site looks like an unknown one.
    for w in [
        v1::WatchTwinsRequest {
            device_ids: vec!["t2:coffee-1".into()],
            ..Default::default()
        },
        v1::WatchTwinsRequest {
            device_ids: vec!["t1:no-such-device".into()],
            ..Default::default()
        },
        v1::WatchTwinsRequest {
            site_id: "t2:home-1".into(),
            ..Default::default()
        },
    ] {
        let e = n
            .twins
            .watch_twins(with(&viewer, w.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{w:?}: {e:?}");
    }
    // Scopes.
    let desk = n.desk.clone();
    let e = n
        .twins
        .query_twins(with(&desk, v1::QueryTwinsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = n
        .twins
        .watch_twins(with(
            &desk,
            v1::WatchTwinsRequest {
                site_id: "t1:home-1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sends_the_current_state_then_each_change_coalesced() {
    let mut n = node().await;
    let viewer = n.viewer.clone();
    let mut stream = n
        .twins
        .watch_twins(with(
            &viewer,
            v1::WatchTwinsRequest {
                device_ids: vec!["t1:coffee-1".into(), "t1:fridge-1".into()],
                send_initial: true,
                min_interval_ms: 500,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut initial = [next(&mut stream).await, next(&mut stream).await];
    initial.sort_by(|a, b| {
        a.twin
            .as_ref()
            .unwrap()
            .device_id
            .cmp(&b.twin.as_ref().unwrap().device_id)
    });
    for (u, id) in initial.iter().zip(["t1:coffee-1", "t1:fridge-1"]) {
        assert_eq!(u.changes, [v1::TwinChange::Initial as i32]);
        let t = u.twin.as_ref().unwrap();
        assert_eq!(t.device_id, id);
        assert_eq!(t.applied_seq, 0);
    }
    // One reading: one update, saying what changed.
    apply(&n, "t1:coffee-1", vec![reading(1, "brew_pressure", 9.2)]).await;
    let u = next(&mut stream).await;
    let t = u.twin.as_ref().unwrap();
    assert_eq!((t.device_id.as_str(), t.applied_seq), ("t1:coffee-1", 1));
    assert!(
        u.changes.contains(&(v1::TwinChange::Reported as i32)),
        "{u:?}"
    );
    // A burst of 40 readings, each its own write: far fewer updates, the last one with
    // the latest state.
    for s in 2..=41 {
        apply(&n, "t1:coffee-1", vec![reading(s, "brew_pressure", 9.2)]).await;
    }
    let mut updates = 0;
    loop {
        let u = next(&mut stream).await;
        updates += 1;
        if u.twin.unwrap().applied_seq == 41 {
            break;
        }
    }
    assert!(updates <= 4, "{updates} updates for a burst of 40 readings");
    // A desired change of the other twin.
    n.system
        .devices()
        .call(
            "t1:fridge-1",
            DeviceMsg::SetDesired {
                field: "mode".into(),
                value: "eco".into(),
                expected_version: None,
            },
        )
        .await
        .unwrap();
    let u = next(&mut stream).await;
    assert_eq!(u.twin.as_ref().unwrap().device_id, "t1:fridge-1");
    assert_eq!(u.changes, [v1::TwinChange::Desired as i32]);
    // The node shuts down: the stream ends.
    n.node.closing.send(true).unwrap();
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the stream ends in time");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_watch_follows_devices_joining_and_leaving() {
    let mut n = node().await;
    let viewer = n.viewer.clone();
    let mut stream = n
        .twins
        .watch_twins(with(
            &viewer,
            v1::WatchTwinsRequest {
                site_id: "t1:home-2".into(),
                send_initial: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut first = [
        next(&mut stream).await.twin.unwrap().device_id,
        next(&mut stream).await.twin.unwrap().device_id,
    ];
    first.sort();
    assert_eq!(first, ["t1:fridge-2", "t1:fridge-3"]);
    // A device joins the site: it is watched from now on.
    provision(&n.system, "t1:fridge-9", "t1:bob", "t1:home-2", FRIDGE).await;
    let u = next(&mut stream).await;
    assert_eq!(u.twin.as_ref().unwrap().device_id, "t1:fridge-9");
    apply(
        &n,
        "t1:fridge-9",
        vec![reading(1, "cabinet_temperature", 4.0)],
    )
    .await;
    let u = next(&mut stream).await;
    let t = u.twin.unwrap();
    assert_eq!((t.device_id.as_str(), t.applied_seq), ("t1:fridge-9", 1));
    // One leaves: a last update says so, and no more follow for it.
    provision(&n.system, "t1:fridge-2", "t1:bob", "t1:home-3", FRIDGE).await;
    let u = next(&mut stream).await;
    assert_eq!(u.twin.as_ref().unwrap().device_id, "t1:fridge-2");
    assert_eq!(u.changes, [v1::TwinChange::Removed as i32]);
    apply(
        &n,
        "t1:fridge-2",
        vec![reading(1, "cabinet_temperature", 4.0)],
    )
    .await;
    apply(
        &n,
        "t1:fridge-3",
        vec![reading(1, "cabinet_temperature", 4.0)],
    )
    .await;
    let u = next(&mut stream).await;
    assert_eq!(
        u.twin.unwrap().device_id,
        "t1:fridge-3",
        "nothing more about the device that left"
    );
}
