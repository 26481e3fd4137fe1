//! From a safety condition at the edge to the case on a human agent's gRPC stream.
//!
//! A real node (`caretwin-cluster run`, this build's binary, embedded store, default
//! 200 ms tick) with 2 × [`HUBS`] alarm hubs provisioned at one site; in this process an
//! edge (`Outbox` + `SyncClient` over QUIC with its site certificate) and an agent desk
//! subscribed to `CaseService/SubscribeCases` over TLS with a token. Two scenarios, one
//! hub at a time:
//! - **alarm**: the hub raises smoke (an alarm item);
//! - **threshold**: the hub's indoor temperature, steady at 20 °C, reads 1 °C — below the
//!   freezing threshold of 4 °C — for as many readings as the signal's detector needs
//!   (smoothing and persistence), accepted together; the twin's reasoning concludes
//!   "failure now" and the freeze playbook hands the case to a person.
//!
//! The clock starts when `Outbox::accept` returns (the edge has it on disk) and stops when
//! the desk receives that hub's `HANDED_OFF` delivery — the edge's frame, the twin's step,
//! the customer twin's decision, the handoff queue's log append, each durable, and the
//! stream. The product aims at < 50 ms p99.
//!
//! Run: `cargo bench -p caretwin-cluster --bench handoff` (`-- --quick` for 20 of each).

use caretwin_cluster::grpc::auth::{Scope, TokensFile, mint};
use caretwin_cluster::sync::dev::{DevPki, generate, site_file_stem};
use caretwin_cluster::sync::tls::SiteIdentity;
use caretwin_edge::outbox::{Item, ItemKind, Outbox, OutboxConfig};
use caretwin_edge::sync::client::{ClientSettings, SyncClient};
use caretwin_edge::sync::tls::client_config_from_files;
use caretwin_edge::sync::transport::client_endpoint;
use caretwin_proto::v1::{self, case_service_client::CaseServiceClient};
use caretwin_tests::{Process, strip_ansi};
use hdrhistogram::Histogram;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SITE: &str = "t1:shop-1";
/// Alarm hubs per scenario, each raising its condition once.
const HUBS: usize = 200;
/// Low temperature readings sent at once in the threshold scenario: enough for the
/// detector's smoothing (α 0.3 from 20 °C to under 4 °C takes 6) and persistence (3).
const LOW_READINGS: u64 = 12;
/// Healthy readings each hub starts with.
const BASELINE: u64 = 20;
/// Only turns a hang into a failure.
const DEADLINE: Duration = Duration::from_secs(60);

fn hub(i: usize) -> String {
    format!("t1:hub-{i:03}")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(if quick { 20 } else { HUBS }));
}

fn temperature(device: &str, ts: u64, celsius: f64) -> Item {
    Item::new(
        device.to_owned(),
        ts,
        ItemKind::Reading {
            signal: "indoor_temperature".into(),
            value: celsius,
        },
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

async fn run(alarms: usize) {
    println!("# safety alarm at the edge → case on the agent's gRPC stream");
    println!("machine: {}", caretwin_tests::machine());
    let dir = tempfile::Builder::new()
        .prefix("handoff-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let d = dir.path();
    let certs = d.join("certs");
    generate(&DevPki {
        out: certs.clone(),
        cluster_name: "localhost".into(),
        sites: vec![SiteIdentity::new(SITE).expect("site")],
        force: false,
    })
    .expect("dev PKI");
    let mut provision = String::new();
    for i in 0..2 * alarms {
        provision.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nsite = \"{SITE}\"\ncustomer = \"t1:cust-{i:03}\"\nmodel = \"hub.guardian-1\"\n",
            hub(i)
        ));
    }
    write(&d.join("devices.toml"), &provision);
    let (token, entry) = mint("desk", "t1", vec![Scope::CasesRead]);
    write(
        &d.join("tokens.toml"),
        &toml::to_string(&TokensFile {
            tokens: vec![entry],
        })
        .expect("tokens"),
    );
    write(
        &d.join("cluster.toml"),
        &format!(
            r#"
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
            provision = d.join("devices.toml").display(),
            store = d.join("cluster-data").display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join("cluster.pem").display(),
            key = certs.join("cluster.key").display(),
            tokens = d.join("tokens.toml").display(),
        ),
    );
    let exe = env!("CARGO_BIN_EXE_caretwin-cluster");
    let config = d.join("cluster.toml");
    let mut node = Process::start(
        Path::new(exe),
        &["--config", config.to_str().expect("path"), "run"],
        &[(
            "RUST_LOG",
            "warn,caretwin_cluster::node=info,caretwin_cluster=info",
        )],
    )
    .expect("node");
    let addr_of = |line: String| {
        strip_ansi(&line)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("the bound address is logged")
            .to_owned()
    };
    let sync_addr = addr_of(node.wait_for("sync listening").expect("sync endpoint"));
    let grpc_addr = addr_of(node.wait_for("gRPC listening").expect("gRPC endpoint"));

    // The edge.
    let outbox = Arc::new(Outbox::open(&OutboxConfig::at(d.join("edge"))).expect("outbox"));
    let stem = site_file_stem(&SiteIdentity::new(SITE).expect("site"));
    let tls = client_config_from_files(
        &certs.join("ca.pem"),
        &certs.join(format!("{stem}.pem")),
        &certs.join(format!("{stem}.key")),
    )
    .expect("client TLS");
    let endpoint = client_endpoint("127.0.0.1:0".parse().expect("addr"), tls).expect("endpoint");
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
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        })
    };

    // The desk.
    let ca = std::fs::read(certs.join("ca.pem")).expect("ca");
    let channel = tonic::transport::Channel::from_shared(format!("https://{grpc_addr}"))
        .expect("uri")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .expect("tls")
        .connect()
        .await
        .expect("gRPC connection");
    let mut desk = CaseServiceClient::new(channel);
    let mut subscribe = tonic::Request::new(v1::SubscribeCasesRequest {
        subscriber_id: "desk".into(),
        kinds: vec![v1::CaseEventKind::HandedOff as i32],
        ..Default::default()
    });
    subscribe.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let mut stream = desk
        .subscribe_cases(subscribe)
        .await
        .expect("subscription")
        .into_inner();

    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    // Every threshold hub starts with a steady, healthy temperature.
    let start = now_ms() - 60_000;
    for i in alarms..2 * alarms {
        let baseline = (0..BASELINE)
            .map(|k| temperature(&hub(i), start + k * 1_000, 20.0))
            .collect();
        outbox.accept(baseline).await.expect("accept");
    }
    new_items.notify_waiters();
    tokio::time::timeout(DEADLINE, async {
        while outbox.stats().backlog_items > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the baseline is applied");

    println!(
        "\n| scenario | cases | p50 | p90 | p99 | max | of the < 50 ms p99 aim |\n|---|---|---|---|---|---|---|"
    );
    for scenario in ["alarm", "threshold"] {
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        for n in 0..alarms {
            let i = if scenario == "alarm" { n } else { alarms + n };
            let now = now_ms();
            let items = if scenario == "alarm" {
                vec![Item::new(
                    hub(i),
                    now,
                    ItemKind::Alarm {
                        kind: "smoke".into(),
                        local_action: Some("siren".into()),
                    },
                )]
            } else {
                (0..LOW_READINGS)
                    .map(|k| temperature(&hub(i), now - LOW_READINGS + k, 1.0))
                    .collect()
            };
            outbox.accept(items).await.expect("accept");
            let started = Instant::now();
            new_items.notify_waiters();
            loop {
                let delivery = tokio::time::timeout(DEADLINE, stream.message())
                    .await
                    .expect("a case in time")
                    .expect("stream")
                    .expect("stream open");
                let case = delivery.case.expect("case");
                if case.devices.iter().any(|dev| dev.device_id == hub(i)) {
                    break;
                }
            }
            hist.record(started.elapsed().as_micros() as u64)
                .expect("record");
            // Let the node settle (the notification, the SLA timer) before the next one.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ms = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
        println!(
            "| {scenario} | {} | {} | {} | {} | {} | {} |",
            hist.len(),
            ms(hist.value_at_quantile(0.5)),
            ms(hist.value_at_quantile(0.9)),
            ms(hist.value_at_quantile(0.99)),
            ms(hist.max()),
            if hist.value_at_quantile(0.99) < 50_000 {
                "met"
            } else {
                "not met"
            }
        );
    }
    let _ = stop.send(());
    let _ = running.await;
    node.terminate().expect("terminate");
    let status = node.wait().expect("node exit");
    assert!(status.success(), "{}", node.transcript());
}
