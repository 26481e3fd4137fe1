//! Twin reads over the integrator gRPC endpoint: `GetTwin` throughput and latency, and
//! `QueryTwins` latency.
//!
//! A node started in this process (`Node::start`: embedded store, TLS gRPC on loopback)
//! with [`DEVICES`] devices of two models at [`SITES`] sites, provisioned from a file;
//! every twin is read once to activate it. Then [`CLIENTS`] concurrent callers, each on its
//! own HTTP/2 connection, call `TwinService/GetTwin` (SUMMARY view) on random devices for
//! [`SECONDS`] s; the figures are reads per second and the latency of each call as the
//! caller sees it (TLS, token check, the twin's inspection, encoding). Then one caller runs
//! queries one after another, [`QUERIES`] of each kind: a site's twins (100 of them, one
//! page of 100), a model's twins across the tenant (first page of 100), and the site's
//! twins of one model in poor health (every twin of the site inspected).
//!
//! Run: `cargo bench -p caretwin-cluster --bench grpc` (`-- --quick` for 2 s).

use caretwin_cluster::config::{ClusterConfig, GrpcConfig, SyncConfig};
use caretwin_cluster::grpc::auth::{Scope, TokensFile, mint};
use caretwin_cluster::node::{Node, NodeOptions};
use caretwin_cluster::store::StoreConfig;
use caretwin_cluster::sync::dev::{DevPki, generate};
use caretwin_proto::v1::{self, twin_service_client::TwinServiceClient};
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Builds the `n`th query of a kind.
type Query = fn(usize) -> v1::QueryTwinsRequest;

/// Devices provisioned.
const DEVICES: usize = 2_000;
/// Sites they are spread over.
const SITES: usize = 20;
/// Concurrent callers.
const CLIENTS: usize = 16;
/// How long the callers read.
const SECONDS: u64 = 10;
/// Queries of each kind.
const QUERIES: usize = 200;

fn device(i: usize) -> String {
    format!("t1:dev-{i:05}")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(if quick { 2 } else { SECONDS }));
}

async fn run(seconds: u64) {
    println!("# twin reads over gRPC (GetTwin, SUMMARY view)");
    println!("machine: {}", caretwin_tests::machine());
    let dir = tempfile::Builder::new()
        .prefix("grpc-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let d = dir.path();
    let certs = d.join("certs");
    generate(&DevPki {
        out: certs.clone(),
        cluster_name: "localhost".into(),
        sites: Vec::new(),
        force: false,
    })
    .expect("dev PKI");
    let mut provision = String::new();
    for i in 0..DEVICES {
        let model = if i % 2 == 0 {
            "coffee.barista-200"
        } else {
            "hub.guardian-1"
        };
        provision.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nsite = \"t1:site-{:02}\"\ncustomer = \"t1:cust-{:04}\"\nmodel = \"{model}\"\n",
            device(i),
            i % SITES,
            i / 2
        ));
    }
    std::fs::write(d.join("devices.toml"), provision).expect("write");
    let (token, entry) = mint("reader", "t1", vec![Scope::TwinsRead]);
    std::fs::write(
        d.join("tokens.toml"),
        toml::to_string(&TokensFile {
            tokens: vec![entry],
        })
        .expect("tokens"),
    )
    .expect("write");
    let config = ClusterConfig {
        store: StoreConfig::embedded_at(d.join("data")),
        sync: SyncConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ca: certs.join("ca.pem"),
            cert: certs.join("cluster.pem"),
            key: certs.join("cluster.key"),
            ..SyncConfig::default()
        },
        grpc: GrpcConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            tokens: d.join("tokens.toml"),
            ..Default::default()
        },
        provision: Some(d.join("devices.toml")),
        ..ClusterConfig::default()
    };
    let started = Instant::now();
    let node = Node::start(config, NodeOptions::default())
        .await
        .expect("node");
    println!(
        "{DEVICES} devices at {SITES} sites provisioned in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ca = std::fs::read(certs.join("ca.pem")).expect("ca");
    let connect = || async {
        let channel = Channel::from_shared(format!("https://{}", node.grpc_addr()))
            .expect("uri")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca.clone()))
                    .domain_name("localhost"),
            )
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        TwinServiceClient::new(channel)
    };
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {token}").parse().expect("header");
    let bearer_for_get = bearer.clone();
    let request = move |id: String| {
        let mut r = tonic::Request::new(v1::GetTwinRequest {
            device_id: id,
            view: v1::TwinView::Summary as i32,
        });
        r.metadata_mut()
            .insert("authorization", bearer_for_get.clone());
        r
    };
    // Activate every twin once.
    let mut warm = connect().await;
    for i in 0..DEVICES {
        warm.get_twin(request(device(i))).await.expect("get twin");
    }

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut callers = Vec::new();
    for c in 0..CLIENTS {
        let mut client = connect().await;
        let request = request.clone();
        callers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            // A cheap per-caller sequence that visits devices in a scattered order.
            let mut x = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = device((x % DEVICES as u64) as usize);
                let t = Instant::now();
                client.get_twin(request(id)).await.expect("get twin");
                hist.record(t.elapsed().as_micros() as u64).expect("record");
            }
            hist
        }));
    }
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for c in callers {
        all.add(c.await.expect("caller")).expect("merge");
    }
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    println!(
        "\n| callers | reads | reads/s | p50 | p99 | max |\n|---|---|---|---|---|---|\n| {CLIENTS} | {} | {:.0} | {} | {} | {} |",
        all.len(),
        all.len() as f64 / seconds as f64,
        ms(all.value_at_quantile(0.5)),
        ms(all.value_at_quantile(0.99)),
        ms(all.max()),
    );

    // Queries, one at a time.
    let mut client = connect().await;
    println!("\n| query | pages | twins per page | p50 | p99 | max |\n|---|---|---|---|---|---|");
    let kinds: [(&str, Query); 3] = [
        ("site (100 twins)", |n| v1::QueryTwinsRequest {
            site_id: format!("t1:site-{:02}", n % SITES),
            page: Some(v1::PageRequest {
                page_size: 100,
                page_token: String::new(),
            }),
            ..Default::default()
        }),
        ("model, tenant-wide (first 100)", |_| {
            v1::QueryTwinsRequest {
                model_id: "hub.guardian-1".into(),
                page: Some(v1::PageRequest {
                    page_size: 100,
                    page_token: String::new(),
                }),
                ..Default::default()
            }
        }),
        ("site + model + poor health", |n| v1::QueryTwinsRequest {
            site_id: format!("t1:site-{:02}", n % SITES),
            model_id: "coffee.barista-200".into(),
            health: vec![v1::Health::AtRisk as i32, v1::Health::Failed as i32],
            page: Some(v1::PageRequest {
                page_size: 100,
                page_token: String::new(),
            }),
            ..Default::default()
        }),
    ];
    for (name, query) in kinds {
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        let mut returned = 0;
        for n in 0..QUERIES {
            let mut r = tonic::Request::new(query(n));
            r.metadata_mut().insert("authorization", bearer.clone());
            let t = Instant::now();
            let page = client.query_twins(r).await.expect("query").into_inner();
            hist.record(t.elapsed().as_micros() as u64).expect("record");
            returned += page.twins.len();
        }
        println!(
            "| {name} | {} | {:.0} | {} | {} | {} |",
            hist.len(),
            returned as f64 / QUERIES as f64,
            ms(hist.value_at_quantile(0.5)),
            ms(hist.value_at_quantile(0.99)),
            ms(hist.max()),
        );
    }
    node.stop().await.expect("stop");
}
