//! Several nodes sharing one store: placement, forwarding over the peer channel, single
//! activation, rebalancing on join and leave, failover after a crash, a partition.
//!
//! The nodes run in one process on one embedded store ([`caretwin_chaos::cluster`]); a
//! monitor checks that no shard is ever hosted on two nodes at once and that every new
//! host holds a newer fencing token.

use caretwin_actors::store::{Key, Op, WriteBatch};
use caretwin_actors::twins::device::{DeviceItem, DeviceMsg, DeviceReply, ItemKind};
use caretwin_chaos::cluster::{Cluster, Cut};
use caretwin_cluster::node::Node;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const SHARDS: u32 = 16;

fn device(i: usize) -> String {
    format!("t1:dev-{i}")
}

async fn provision(node: &Node, i: usize) {
    let r = node
        .system()
        .devices()
        .call(
            &device(i),
            DeviceMsg::Provision {
                customer: "t1:alice".into(),
                site: "t1:home".into(),
                model: "coffee.barista-200".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(r, DeviceReply::Ok);
}

async fn reading(node: &Node, i: usize, seq: u64) -> DeviceReply {
    node.system()
        .devices()
        .call(
            &device(i),
            DeviceMsg::FromSite {
                site: "t1:home".into(),
                items: vec![DeviceItem {
                    seq,
                    ts_ms: 1_700_000_000_000 + seq * 60_000,
                    kind: ItemKind::Reading {
                        signal: "brew_pressure".into(),
                        value: 9.0,
                    },
                }],
            },
        )
        .await
        .unwrap()
}

async fn high_water(node: &Node, i: usize) -> u64 {
    node.system()
        .devices()
        .inspect(&device(i), |t| t.map_or(0, |t| t.high_water()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_share_the_shards_forward_calls_and_rebalance_without_losing_a_reading() {
    let mut c = Cluster::new(SHARDS).await;
    for id in ["n1", "n2", "n3"] {
        c.start(id).await;
    }
    let placed = c.wait_balanced(Duration::from_secs(10)).await;
    for id in ["n1", "n2", "n3"] {
        assert!(
            placed.values().any(|h| h == id),
            "{id} hosts no shard of {SHARDS}"
        );
    }

    // Any node reaches any twin: provisioned through n1, read through n2 and n3.
    const DEVICES: usize = 40;
    for i in 0..DEVICES {
        provision(c.node("n1"), i).await;
    }
    let names = ["n1", "n2", "n3"];
    for i in 0..DEVICES {
        let r = reading(c.node(names[i % 3]), i, 1).await;
        assert!(
            matches!(r, DeviceReply::Applied(ref a) if a.applied == 1),
            "{r:?}"
        );
    }
    for i in 0..DEVICES {
        assert_eq!(high_water(c.node(names[(i + 1) % 3]), i).await, 1);
    }

    // A fourth node joins while readings keep arriving: shards move to it, and every
    // acknowledged reading is applied exactly once (the twins' marks say so).
    let sender = {
        let n1 = c.nodes.remove("n1").unwrap();
        let n1 = Arc::new(n1);
        let n = n1.clone();
        let task = tokio::spawn(async move {
            let mut acked = vec![1u64; DEVICES];
            for seq in 2..=6u64 {
                for (i, mark) in acked.iter_mut().enumerate() {
                    let r = reading(&n, i, seq).await;
                    assert!(
                        matches!(r, DeviceReply::Applied(ref a) if a.applied == 1),
                        "{r:?}"
                    );
                    *mark = seq;
                }
            }
            acked
        });
        (n1, task)
    };
    c.start("n4").await;
    let acked = sender.1.await.unwrap();
    c.nodes
        .insert("n1".into(), Arc::try_unwrap(sender.0).ok().unwrap());
    let placed = c.wait_balanced(Duration::from_secs(10)).await;
    assert!(placed.values().any(|h| h == "n4"), "n4 took no shard");
    for (i, mark) in acked.iter().enumerate() {
        assert_eq!(high_water(c.node("n4"), i).await, *mark, "device {i}");
    }

    // A member leaving hands its shards over; nothing it acknowledged is lost.
    let n2 = c.nodes.remove("n2").unwrap();
    n2.stop().await.unwrap();
    c.wait_balanced(Duration::from_secs(10)).await;
    for i in 0..DEVICES {
        let r = reading(c.node("n3"), i, 7).await;
        assert!(
            matches!(r, DeviceReply::Applied(ref a) if a.applied == 1),
            "{r:?}"
        );
        assert_eq!(high_water(c.node("n1"), i).await, 7);
    }
    assert_eq!(c.violations(), Vec::<String>::new());
    for (_, n) in std::mem::take(&mut c.nodes) {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_nodes_shards_are_hosted_elsewhere_after_its_leases_run_out() {
    let mut c = Cluster::new(SHARDS).await;
    for id in ["n1", "n2", "n3"] {
        c.start(id).await;
    }
    let placed = c.wait_balanced(Duration::from_secs(10)).await;
    const DEVICES: usize = 24;
    for i in 0..DEVICES {
        provision(c.node("n1"), i).await;
        reading(c.node("n1"), i, 1).await;
    }
    let victim_shards: Vec<u32> = placed
        .iter()
        .filter(|(_, h)| *h == "n2")
        .map(|(s, _)| *s)
        .collect();
    assert!(!victim_shards.is_empty());

    c.nodes.remove("n2").unwrap().kill().await;
    // Calls for its twins wait for their shards to move, then land.
    for i in 0..DEVICES {
        let r = reading(c.node("n3"), i, 2).await;
        assert!(
            matches!(r, DeviceReply::Applied(ref a) if a.applied == 1),
            "{r:?}"
        );
    }
    c.wait_balanced(Duration::from_secs(10)).await;
    for i in 0..DEVICES {
        assert_eq!(high_water(c.node("n1"), i).await, 2);
    }
    assert_eq!(c.violations(), Vec::<String>::new());
    for (_, n) in std::mem::take(&mut c.nodes) {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_node_stops_acting_before_its_shards_move_and_its_stale_writes_are_refused() {
    partitioned(false).await;
}

/// As on a real network cut, where the store's packets vanish: its calls neither answer
/// nor fail. The node must still stop by its own clock (`tests/tests/cluster_partition.rs`
/// does this with processes and a real cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_store_goes_silent_stops_acting_before_its_shards_move() {
    partitioned(true).await;
}

/// n2 is cut off from the store; `silent`: its calls hang instead of failing.
async fn partitioned(silent: bool) {
    let mut c = Cluster::new(SHARDS).await;
    let cut = Cut::new(c.store.clone());
    c.start("n1").await;
    c.start_on("n2", cut.clone()).await;
    let placed = c.wait_balanced(Duration::from_secs(10)).await;
    const DEVICES: usize = 16;
    for i in 0..DEVICES {
        provision(c.node("n1"), i).await;
    }
    let theirs: Vec<u32> = placed
        .iter()
        .filter(|(_, h)| *h == "n2")
        .map(|(s, _)| *s)
        .collect();
    let shard = theirs[0];
    let stale = c
        .store
        .lease(&Key::new(caretwin_actors::placement::shard_lease(shard)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale.holder, "n2");

    if silent {
        cut.silence(true);
    } else {
        cut.set(true);
    }
    // n2 can renew nothing: it drops its shards before their leases run out, and n1 takes
    // them over only after (the monitor would record two hosts at once otherwise).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !theirs
        .iter()
        .all(|s| c.node("n1").system().hosted_shards().contains(s))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n1 never took n2's shards"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        c.node("n2").system().hosted_shards().is_empty(),
        "the partitioned node still hosts shards"
    );
    let now = c
        .store
        .lease(&Key::new(caretwin_actors::placement::shard_lease(shard)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.holder, "n1");
    assert!(now.token > stale.token);
    // A write n2 might still have had on its way, under its old fence: refused.
    let err = c
        .store
        .commit(WriteBatch::fenced(stale.fence()).with(Op::Append {
            log: Key::new("t1/stale-writes"),
            value: b"from n2".to_vec(),
        }))
        .await
        .unwrap_err();
    assert!(
        matches!(err, caretwin_actors::Error::StaleFence { .. }),
        "{err}"
    );
    // Every twin answers from n1 now.
    for i in 0..DEVICES {
        let r = reading(c.node("n1"), i, 1).await;
        assert!(
            matches!(r, DeviceReply::Applied(ref a) if a.applied == 1),
            "{r:?}"
        );
    }
    assert_eq!(c.violations(), Vec::<String>::new());
    c.nodes.remove("n1").unwrap().stop().await.unwrap();
    // n2 fails to stop cleanly (its store is gone); its end is what matters here. A silent
    // way is healed first: the node's stop would otherwise wait for answers.
    if silent {
        cut.silence(false);
    }
    let _ = c.nodes.remove("n2").unwrap().stop().await;
}

/// Waits until `node` sees `live` and still watches `known`; fails after `within`.
async fn wait_members(node: &Node, live: &[&str], known: &[&str], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = node.members().expect("a cluster member");
        if m.live == live && m.known == known {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "members {m:?} after {within:?}, want live {live:?}, known {known:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_gone_for_long_is_removed_and_comes_back_when_its_partition_heals() {
    let mut c = Cluster::new(SHARDS).await;
    let cut = Cut::new(c.store.clone());
    c.start("n1").await;
    c.start_on("n2", cut.clone()).await;
    c.wait_balanced(Duration::from_secs(10)).await;
    const DEVICES: usize = 8;
    for i in 0..DEVICES {
        provision(c.node("n1"), i).await;
        let r = reading(c.node("n1"), i, 1).await;
        assert!(
            matches!(r, DeviceReply::Applied(ref a) if a.applied == 1),
            "{r:?}"
        );
    }
    wait_members(
        c.node("n1"),
        &["n1", "n2"],
        &["n1", "n2"],
        Duration::from_secs(5),
    )
    .await;

    cut.set(true);
    // Suspected first: no longer live once its lease runs out (1 s), still watched.
    wait_members(
        c.node("n1"),
        &["n1"],
        &["n1", "n2"],
        Duration::from_secs(10),
    )
    .await;
    // Removed ten lease lifetimes later: its lease is not read any more.
    wait_members(c.node("n1"), &["n1"], &["n1"], Duration::from_secs(30)).await;
    assert!(c.node("n2").system().hosted_shards().is_empty());

    // Healed: n2 finds its lease lapsed, announces itself again, and takes its shards
    // back from n1 (handed over, never hosted twice).
    cut.set(false);
    wait_members(
        c.node("n1"),
        &["n1", "n2"],
        &["n1", "n2"],
        Duration::from_secs(10),
    )
    .await;
    c.wait_balanced(Duration::from_secs(10)).await;
    for i in 0..DEVICES {
        let r = reading(c.node("n1"), i, 2).await;
        assert!(
            matches!(r, DeviceReply::Applied(ref a) if a.applied == 1),
            "{r:?}"
        );
        assert_eq!(high_water(c.node("n2"), i).await, 2);
    }
    assert_eq!(c.violations(), Vec::<String>::new());
    for (_, n) in std::mem::take(&mut c.nodes) {
        n.stop().await.unwrap();
    }
}

/// A peer endpoint of our own pointed at `node`, presenting `cert`/`key`.
fn intruder(dir: &Path, node: &Node, cert: &str, key: &str) -> caretwin_cluster::peer::Peers {
    let certs = dir.join("certs");
    let tls = caretwin_cluster::peer::PeerTls::from_files(
        &certs.join("ca.pem"),
        &certs.join(cert),
        &certs.join(key),
        "localhost",
    )
    .unwrap();
    let view = caretwin_cluster::peer::View {
        live: vec![caretwin_actors::placement::Member {
            node_id: "n1".into(),
            peer_addr: node.peer_addr().unwrap().to_string(),
        }],
        known: vec!["n1".into()],
    };
    caretwin_cluster::peer::Peers::bind(
        "intruder",
        "127.0.0.1:0".parse().unwrap(),
        tls,
        Arc::new(std::sync::RwLock::new(view)),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_cluster_nodes_may_forward_calls_a_site_certificate_is_refused() {
    use caretwin_actors::host::remote::{Elsewhere, decode_answer, encode};
    let mut c = Cluster::new(SHARDS).await;
    c.start("n1").await;
    c.wait_balanced(Duration::from_secs(10)).await;
    provision(c.node("n1"), 0).await;
    let id = device(0);
    let shard = caretwin_actors::host::shard_of(&id, SHARDS);
    let msg = DeviceMsg::FromSite {
        site: "t1:home".into(),
        items: vec![DeviceItem {
            seq: 1,
            ts_ms: 1_700_000_000_000,
            kind: ItemKind::Reading {
                signal: "brew_pressure".into(),
                value: 9.0,
            },
        }],
    };
    // A site's certificate (same CA) cannot open the peer channel.
    let site = intruder(
        c.dir.path(),
        c.node("n1"),
        "site-t1+home.pem",
        "site-t1+home.key",
    );
    let err = site
        .forward("device", shard, &id, encode(&msg).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, caretwin_actors::Error::NotHosted { .. }),
        "{err}"
    );
    assert_eq!(
        high_water(c.node("n1"), 0).await,
        0,
        "nothing reached the twin"
    );
    // A node's certificate can (the same call, so the refusal above was the certificate).
    let node = intruder(c.dir.path(), c.node("n1"), "cluster.pem", "cluster.key");
    let answer = node
        .forward("device", shard, &id, encode(&msg).unwrap())
        .await
        .unwrap();
    let reply: DeviceReply = decode_answer("device", shard, &answer).unwrap();
    assert!(
        matches!(reply, DeviceReply::Applied(ref a) if a.applied == 1),
        "{reply:?}"
    );
    assert_eq!(high_water(c.node("n1"), 0).await, 1);
    c.nodes.remove("n1").unwrap().stop().await.unwrap();
}
