//! Guarantee 1 across real processes: a reading the edge accepted reaches its twin once,
//! whatever is killed in between.
//!
//! A cluster node and an edge with simulated devices run as separate processes over QUIC
//! with mutual TLS. The edge is killed with SIGKILL mid-stream and restarted; the cluster is
//! killed with SIGKILL and restarted on the same address. When the edge reports its outbox
//! drained, both stop, and for every device the twin's applied high-water mark must equal
//! the last sequence number the edge assigned — every accepted reading applied, none twice
//! (the mark only moves by compare-and-set in the same write as the reading's effect).

use caretwin_actors::store::{Key, Store};
use caretwin_cluster::grpc::auth::{Scope, TokensFile, mint};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use caretwin_edge::outbox::{Outbox, OutboxConfig};
use caretwin_proto::v1::{self, case_service_client::CaseServiceClient};
use caretwin_tests::{Process, bin, log_field, strip_ansi};
use std::path::Path;

const SITE: &str = "t1:home-1";
const DEVICES: usize = 1000;

fn device(i: usize) -> String {
    format!("t1:coffee-{i}")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Starts the cluster on `listen`; returns it and the address it bound.
fn start_cluster(dir: &Path, listen: &str) -> (Process, String) {
    let (p, addr, _) = start_cluster_grpc(dir, listen);
    (p, addr)
}

/// [`start_cluster`], also returning the address of its gRPC endpoint (integrator tokens
/// from `tokens.toml` in `dir`, when there is one).
fn start_cluster_grpc(dir: &Path, listen: &str) -> (Process, String, String) {
    let config = dir.join("cluster.toml");
    let certs = dir.join("certs");
    write(
        &config,
        &format!(
            r#"
tick = "50ms"
provision = "{provision}"
[store.embedded]
path = "{store}"
[sync]
heartbeat = "1s"
listen = "{listen}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[grpc]
listen = "127.0.0.1:0"
tokens = "{tokens}"
"#,
            tokens = dir.join("tokens.toml").display(),
            provision = dir.join("devices.toml").display(),
            store = dir.join("cluster-data").display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join("cluster.pem").display(),
            key = certs.join("cluster.key").display(),
        ),
    );
    let mut p = Process::start(
        &bin("caretwin-cluster"),
        &["--config", config.to_str().unwrap(), "run"],
        &[],
    )
    .unwrap();
    let addr_of = |line: String| log_field(&line, "addr").expect("the bound address is logged");
    let addr = addr_of(p.wait_for("sync listening").unwrap());
    let grpc = addr_of(p.wait_for("gRPC listening").unwrap());
    (p, addr, grpc)
}

fn start_edge(dir: &Path, cluster: &str) -> Process {
    start_edge_with(dir, cluster, "sim.toml", "3s")
}

fn start_edge_with(dir: &Path, cluster: &str, sim: &str, simulate_for: &str) -> Process {
    let config = dir.join("edge.toml");
    let certs = dir.join("certs");
    write(
        &config,
        &format!(
            r#"
site_id = "{SITE}"
cluster_addr = "{cluster}"
server_name = "localhost"
data_dir = "{data}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
simulator = "{sim}"
simulate_for = "{simulate_for}"
"#,
            data = dir.join("edge-data").display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join("site-t1+home-1.pem").display(),
            key = certs.join("site-t1+home-1.key").display(),
            sim = dir.join(sim).display(),
        ),
    );
    Process::start(
        &bin("caretwin-edge"),
        &["--config", config.to_str().unwrap(), "run"],
        &[],
    )
    .unwrap()
}

/// A working directory with a development PKI for [`SITE`], made by the real binary.
fn dev_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let args = ["dev", "--out", out.to_str().unwrap(), "--site", SITE];
    let mut dev = Process::start(&bin("caretwin-cluster"), &args, &[]).unwrap();
    assert!(dev.wait().unwrap().success(), "{}", dev.transcript());
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_reading_is_applied_once_across_sigkills() {
    let dir = dev_certs();
    let d = dir.path();

    let mut provision = String::new();
    let mut sim = String::from("seed = 7\n");
    for i in 0..DEVICES {
        provision.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nsite = \"{SITE}\"\ncustomer = \"t1:alice\"\nmodel = \"coffee.barista-200\"\n",
            device(i)
        ));
        sim.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nmodel = \"coffee.barista-200\"\nreading_interval = \"1s\"\n",
            device(i)
        ));
    }
    write(&d.join("devices.toml"), &provision);
    write(&d.join("sim.toml"), &sim);

    let (mut cluster, addr) = start_cluster(d, "127.0.0.1:0");
    let mut edge = start_edge(d, &addr);
    edge.wait_for("sync session open").unwrap();

    // The edge dies mid-stream, without a chance to flush or say goodbye.
    edge.kill().unwrap();
    edge.wait().unwrap();
    let mut edge = start_edge(d, &addr);
    edge.wait_for("sync session open").unwrap();

    // Then the cluster dies; the edge keeps accepting readings while it is away.
    cluster.kill().unwrap();
    cluster.wait().unwrap();
    let (mut cluster, again) = start_cluster(d, &addr);
    assert_eq!(again, addr);

    // The edge reconnects by itself and catches up.
    edge.wait_for("outbox drained").unwrap();
    if std::env::var_os("CARETWIN_TEST_VERBOSE").is_some() {
        eprintln!(
            "--- edge\n{}\n--- cluster\n{}",
            edge.transcript(),
            cluster.transcript()
        );
    }
    edge.terminate().unwrap();
    assert!(edge.wait().unwrap().success(), "{}", edge.transcript());
    cluster.terminate().unwrap();
    assert!(
        cluster.wait().unwrap().success(),
        "{}",
        cluster.transcript()
    );

    let outbox = Outbox::open(&OutboxConfig::at(d.join("edge-data").join("outbox"))).unwrap();
    let store = EmbeddedStore::open(&EmbeddedConfig::at(d.join("cluster-data"))).unwrap();
    let mut total = 0;
    for i in 0..DEVICES {
        let last = outbox.last_seq(&device(i)).await;
        let applied = store.high_water(&Key::new(device(i))).await.unwrap();
        assert!(last > 0, "device {i} produced nothing");
        assert_eq!(
            applied, last,
            "device {i}: the edge accepted {last}, the twin applied {applied}"
        );
        total += last;
    }
    assert_eq!(outbox.stats().backlog_items, 0);
    assert!(total > 1000, "only {total} readings went through");
}

/// Guarantee 4 and story 3: smoke while the site is offline. The edge acts locally at
/// once; when the link returns, the alarm reaches the cluster and a person gets the case at
/// safety priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_while_offline_is_acted_on_locally_then_reaches_a_person() {
    let dir = dev_certs();
    let d = dir.path();
    write(
        &d.join("devices.toml"),
        &format!(
            "[[devices]]\nid = \"t1:hub-1\"\nsite = \"{SITE}\"\ncustomer = \"t1:alice\"\nmodel = \"hub.guardian-1\"\n"
        ),
    );
    write(
        &d.join("hub.toml"),
        "[[devices]]\nid = \"t1:hub-1\"\nmodel = \"hub.guardian-1\"\nreading_interval = \"1s\"\n\n[[events]]\ndevice = \"t1:hub-1\"\nat = \"1s\"\nevent = \"smoke\"\n",
    );
    // The cluster is not there: reserve an address for it, then start the edge alone.
    let (mut cluster, addr) = start_cluster(d, "127.0.0.1:0");
    cluster.terminate().unwrap();
    assert!(cluster.wait().unwrap().success());
    let mut edge = start_edge_with(d, &addr, "hub.toml", "2s");
    let local = edge.wait_for("SAFETY ALARM: acting locally").unwrap();
    assert!(strip_ansi(&local).contains("siren"), "{local}");

    // The link returns: the alarm goes up, and the case is handed to a person, who gets it
    // on the agent desk's gRPC stream with what the edge did.
    let (token, entry) = mint("desk", "t1", vec![Scope::CasesRead, Scope::CasesHandle]);
    let tokens = TokensFile {
        tokens: vec![entry],
    };
    write(&d.join("tokens.toml"), &toml::to_string(&tokens).unwrap());
    let (mut cluster, _, grpc) = start_cluster_grpc(d, &addr);
    let ca = std::fs::read(d.join("certs").join("ca.pem")).unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut desk = CaseServiceClient::new(channel);
    let mut subscribe = tonic::Request::new(v1::SubscribeCasesRequest {
        subscriber_id: "desk".into(),
        ..Default::default()
    });
    subscribe
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = desk.subscribe_cases(subscribe).await.unwrap().into_inner();
    let delivery = tokio::time::timeout(std::time::Duration::from_secs(60), stream.message())
        .await
        .expect("the case reaches the desk")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.event, v1::CaseEventKind::HandedOff as i32);
    let case = delivery.case.unwrap();
    assert_eq!(case.priority, v1::Priority::Safety as i32);
    assert_eq!(case.handoff_reason, v1::HandoffReason::SafetyAlarm as i32);
    assert_eq!(case.devices[0].device_id, "t1:hub-1");
    assert!(
        format!("{case:?}").contains("siren"),
        "the desk sees what the edge did: {case:?}"
    );
    edge.wait_for("outbox drained").unwrap();
    cluster.wait_for("Safety").unwrap(); // the safety notification goes out
    if std::env::var_os("CARETWIN_TEST_VERBOSE").is_some() {
        eprintln!(
            "--- edge\n{}\n--- cluster\n{}",
            edge.transcript(),
            cluster.transcript()
        );
    }
    edge.terminate().unwrap();
    edge.wait().unwrap();
    cluster.terminate().unwrap();
    assert!(
        cluster.wait().unwrap().success(),
        "{}",
        cluster.transcript()
    );

    let store = EmbeddedStore::open(&EmbeddedConfig::at(d.join("cluster-data"))).unwrap();
    let log = store
        .read_log(&caretwin_actors::services::handoff::cases_log("t1"), 1, 100)
        .await
        .unwrap();
    let events: Vec<serde_json::Value> = log
        .iter()
        .map(|e| serde_json::from_slice(&e.value).unwrap())
        .collect();
    let handed: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "handed_off")
        .collect();
    assert_eq!(handed.len(), 1, "{events:?}");
    assert_eq!(handed[0]["priority"], "safety");
    let insights = handed[0]["context"]["insights"].to_string();
    assert!(
        insights.contains("siren"),
        "the local action travels with the case: {insights}"
    );
}
