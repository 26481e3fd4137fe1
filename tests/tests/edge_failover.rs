//! An edge that knows several cluster nodes moves to another when its node dies, across
//! real processes: two `caretwin-cluster` nodes on one PostgreSQL database, a
//! `caretwin-edge` with simulated devices over QUIC with mutual TLS.
//!
//! - Configured with both nodes, the edge is connected to one; that node is killed with
//!   SIGKILL; the edge opens a session on the other and its readings keep being
//!   acknowledged there.
//! - Configured with one seed, the edge learns the other node from the `Welcome`, keeps
//!   it on disk, moves to it when the seed dies, and reaches it again after a restart of
//!   its own while the seed is still dead.
//!
//! Whichever node an integrator asks, the site is online while its edge is connected to
//! any of them, and offline once it is gone.
//!
//! Either way nothing is lost and nothing applied twice: at the end every device's twin
//! high-water mark in the database equals the last sequence number the edge assigned,
//! and the edge's outbox is empty.

use caretwin_actors::store::{Key, Store};
use caretwin_cluster::grpc::auth::{Scope, TokensFile, mint};
use caretwin_cluster::store::{PostgresConfig, PostgresStore};
use caretwin_edge::outbox::{Outbox, OutboxConfig};
use caretwin_proto::v1;
use caretwin_proto::v1::twin_service_client::TwinServiceClient;
use caretwin_tests::postgres as pg;
use caretwin_tests::{Process, bin, log_field};
use std::path::Path;

const SITE: &str = "t1:home-1";
const DEVICES: usize = 40;

fn device(i: usize) -> String {
    format!("t1:coffee-{i}")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A working directory with a development PKI for [`SITE`], the devices provisioned for
/// the nodes and the simulator's devices for the edge.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("certs");
    let args = ["dev", "--out", out.to_str().unwrap(), "--site", SITE];
    let mut dev = Process::start(&bin("caretwin-cluster"), &args, &[]).unwrap();
    assert!(dev.wait().unwrap().success(), "{}", dev.transcript());
    let mut provision = String::new();
    let mut sim = String::from("seed = 5\n");
    for i in 0..DEVICES {
        provision.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nsite = \"{SITE}\"\ncustomer = \"t1:alice\"\nmodel = \"coffee.barista-200\"\n",
            device(i)
        ));
        sim.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nmodel = \"coffee.barista-200\"\nreading_interval = \"250ms\"\n",
            device(i)
        ));
    }
    write(&d.join("devices.toml"), &provision);
    write(&d.join("sim.toml"), &sim);
    let (token, entry) = mint("ops", "t1", vec![Scope::TwinsRead]);
    let tokens = TokensFile {
        tokens: vec![entry],
    };
    write(&d.join("tokens.toml"), &toml::to_string(&tokens).unwrap());
    write(&d.join("token"), &token);
    dir
}

/// Whether node `grpc` reports the site of device 0 online, asked over gRPC.
async fn site_online(dir: &Path, grpc: &str) -> bool {
    let ca = std::fs::read(dir.join("certs").join("ca.pem")).unwrap();
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
    let token = std::fs::read_to_string(dir.join("token")).unwrap();
    let mut req = tonic::Request::new(v1::GetTwinRequest {
        device_id: device(0),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let twin = TwinServiceClient::new(channel)
        .get_twin(req)
        .await
        .unwrap()
        .into_inner();
    twin.site_online
}

/// Waits until node `grpc` reports the site `online` (or not).
async fn wait_site_online(dir: &Path, grpc: &str, online: bool) {
    let deadline = std::time::Instant::now() + caretwin_tests::DEADLINE;
    while site_online(dir, grpc).await != online {
        assert!(
            std::time::Instant::now() < deadline,
            "node {grpc} never reported the site online = {online}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Starts node `id` on the database; returns it, its sync address (which it announces:
/// it listens on a specific IP) and its gRPC address.
fn start_node(dir: &Path, id: &str, db_url: &str) -> (Process, String, String) {
    let config = dir.join(format!("{id}.toml"));
    let certs = dir.join("certs");
    write(
        &config,
        &format!(
            r#"
node_id = "{id}"
lease_ttl = "1s"
renew_every = "100ms"
tick = "50ms"
provision = "{provision}"
[host]
shards = 16
[store]
backend = "postgres"
[store.postgres]
url = "{db_url}"
[sync]
heartbeat = "500ms"
listen = "127.0.0.1:0"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[grpc]
listen = "127.0.0.1:0"
tokens = "{tokens}"
[cluster]
enabled = true
"#,
            tokens = dir.join("tokens.toml").display(),
            provision = dir.join("devices.toml").display(),
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
    let line = p.wait_for("sync listening").unwrap();
    let addr = log_field(&line, "addr").expect("the bound address is logged");
    let line = p.wait_for("gRPC listening").unwrap();
    let grpc = log_field(&line, "addr").expect("the gRPC address is logged");
    p.wait_for("joined the cluster").unwrap();
    (p, addr, grpc)
}

/// Starts the edge with `nodes` as its `cluster_addrs`, simulating for `simulate_for`.
fn start_edge(dir: &Path, nodes: &[&str], simulate_for: &str) -> Process {
    let config = dir.join("edge.toml");
    let certs = dir.join("certs");
    let nodes: Vec<String> = nodes.iter().map(|n| format!("{n:?}")).collect();
    write(
        &config,
        &format!(
            r#"
site_id = "{SITE}"
cluster_addrs = [{nodes}]
server_name = "localhost"
data_dir = "{data}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
simulator = "{sim}"
simulate_for = "{simulate_for}"
"#,
            nodes = nodes.join(", "),
            data = dir.join("edge-data").display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join("site-t1+home-1.pem").display(),
            key = certs.join("site-t1+home-1.key").display(),
            sim = dir.join("sim.toml").display(),
        ),
    );
    Process::start(
        &bin("caretwin-edge"),
        &["--config", config.to_str().unwrap(), "run"],
        &[],
    )
    .unwrap()
}

/// The node address of the edge's `sync session open` line.
fn session_addr(line: &str) -> String {
    log_field(line, "addr").expect("the session's node address is logged")
}

/// Every device's twin high-water mark equals the edge's last sequence number, and the
/// outbox is empty; returns the readings that went through.
async fn nothing_lost_nothing_doubled(dir: &Path, db_url: &str) -> u64 {
    let store = PostgresStore::open(&PostgresConfig::at(db_url.to_owned()))
        .await
        .unwrap();
    let outbox = Outbox::open(&OutboxConfig::at(dir.join("edge-data").join("outbox"))).unwrap();
    let mut total = 0;
    for i in 0..DEVICES {
        let last = outbox.last_seq(&device(i)).await;
        let applied = store.high_water(&Key::new(device(i))).await.unwrap();
        assert!(last > 0, "device {} produced nothing", device(i));
        assert_eq!(
            applied,
            last,
            "{}: the edge accepted {last}, the twin applied {applied}",
            device(i)
        );
        total += last;
    }
    assert_eq!(outbox.stats().backlog_items, 0);
    total
}

/// Readings applied so far, over every device.
async fn applied(store: &PostgresStore) -> u64 {
    let mut sum = 0;
    for i in 0..DEVICES {
        sum += store.high_water(&Key::new(device(i))).await.unwrap();
    }
    sum
}

fn stop(p: &mut Process) {
    p.terminate().unwrap();
    assert!(p.wait().unwrap().success(), "{}", p.transcript());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_moves_to_the_other_node_when_its_node_dies_and_loses_nothing() {
    let dir = setup();
    let d = dir.path();
    let server = pg::server_url(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("postgres"));
    let (_, db_url) = pg::fresh_database(&server).await.unwrap();
    let (n1, a1, g1) = start_node(d, "n1", &db_url);
    let (n2, a2, g2) = start_node(d, "n2", &db_url);
    let mut nodes = [(n1, a1.clone(), g1), (n2, a2.clone(), g2)];

    let mut edge = start_edge(d, &[&a1, &a2], "8s");
    let first = session_addr(&edge.wait_for("sync session open").unwrap());
    let (victim, survivor) = if first == a1 { (0, 1) } else { (1, 0) };
    assert_eq!(
        first, nodes[victim].1,
        "the edge dialled a node it was not given"
    );
    // Online as either node sees it, though connected to one.
    wait_site_online(d, &nodes[victim].2, true).await;
    wait_site_online(d, &nodes[survivor].2, true).await;
    // Readings are applied through the first node.
    let store = PostgresStore::open(&PostgresConfig::at(db_url.clone()))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + caretwin_tests::DEADLINE;
    loop {
        if applied(&store).await > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "nothing applied");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The edge's node dies without a word, while devices keep producing.
    nodes[victim].0.kill().unwrap();
    nodes[victim].0.wait().unwrap();
    let at_kill = applied(&store).await;
    let moved = edge
        .wait_for(&format!("sync session open addr={}", nodes[survivor].1))
        .unwrap();
    assert!(moved.contains("node=n"), "{moved}");

    wait_site_online(d, &nodes[survivor].2, true).await;

    // Everything generated, before and after the kill, is acknowledged by the survivor.
    edge.wait_for("outbox drained").unwrap();
    stop(&mut edge);
    wait_site_online(d, &nodes[survivor].2, false).await;
    stop(&mut nodes[survivor].0);
    let total = nothing_lost_nothing_doubled(d, &db_url).await;
    assert!(total > 500, "only {total} readings went through");
    assert!(
        total > at_kill,
        "nothing was applied after the kill ({at_kill} before it)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_with_one_seed_learns_the_other_node_and_fails_over_to_it_even_after_a_restart() {
    let dir = setup();
    let d = dir.path();
    let server = pg::server_url(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("postgres"));
    let (_, db_url) = pg::fresh_database(&server).await.unwrap();
    let (mut seed, seed_addr, _) = start_node(d, "n1", &db_url);
    let (mut other, other_addr, other_grpc) = start_node(d, "n2", &db_url);

    let mut edge = start_edge(d, &[&seed_addr], "12s");
    let open = edge.wait_for("sync session open").unwrap();
    assert_eq!(session_addr(&open), seed_addr);
    // Connected to the seed, online as the other node sees it too.
    wait_site_online(d, &other_grpc, true).await;
    // The seed's Welcome names both nodes; the edge keeps them on disk.
    let learned = edge.wait_for("cluster nodes learned").unwrap();
    assert!(learned.contains(&other_addr), "{learned}");
    let kept = std::fs::read_to_string(d.join("edge-data").join("cluster-nodes")).unwrap();
    assert!(kept.lines().any(|l| l == other_addr), "{kept}");

    // The seed dies: the edge moves to the node it learned.
    seed.kill().unwrap();
    seed.wait().unwrap();
    edge.wait_for(&format!("sync session open addr={other_addr}"))
        .unwrap();

    // The edge restarts while its only configured node is still dead: what it kept on
    // disk takes it to the other node.
    edge.kill().unwrap();
    edge.wait().unwrap();
    let mut edge = start_edge(d, &[&seed_addr], "4s");
    let known = edge
        .wait_for("cluster nodes known from the last run")
        .unwrap();
    assert!(known.contains(&other_addr), "{known}");
    edge.wait_for(&format!("sync session open addr={other_addr}"))
        .unwrap();
    edge.wait_for("outbox drained").unwrap();
    stop(&mut edge);
    stop(&mut other);
    let total = nothing_lost_nothing_doubled(d, &db_url).await;
    assert!(total > 500, "only {total} readings went through");
}
