//! The twin host on the real embedded store: activation, write-through, passivation,
//! durable timers, fencing, one-at-a-time handling — in virtual time.

use caretwin_actors::host::clock::ManualClock;
use caretwin_actors::host::registry::{HostConfig, Registry};
use caretwin_actors::host::{Ctx, Twin};
use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use std::sync::Arc;

/// A twin that counts what it is sent, and pings itself after a delay when asked.
#[derive(Debug, Default)]
struct Counter {
    total: u64,
    pings: u64,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
enum CounterMsg {
    Add(u64),
    PingIn(u64),
    Reject,
}

impl Twin for Counter {
    type Msg = CounterMsg;
    type Reply = u64;
    type Env = ();
    const KIND: &'static str = "counter";

    fn create(_id: &str, _env: &()) -> caretwin_actors::Result<Self> {
        Ok(Self::default())
    }

    fn restore(id: &str, snapshot: &[u8], _env: &()) -> caretwin_actors::Result<Self> {
        let bad = || caretwin_actors::Error::Twin {
            id: id.into(),
            reason: "corrupt snapshot".into(),
        };
        let b: [u8; 16] = snapshot.try_into().map_err(|_| bad())?;
        Ok(Self {
            total: u64::from_be_bytes(b[..8].try_into().unwrap()),
            pings: u64::from_be_bytes(b[8..].try_into().unwrap()),
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        [self.total.to_be_bytes(), self.pings.to_be_bytes()].concat()
    }

    fn handle(&mut self, msg: CounterMsg, ctx: &mut Ctx, _env: &()) -> u64 {
        match msg {
            CounterMsg::Add(n) => {
                self.total += n;
                ctx.changed();
                ctx.emit(format!("added {n}").into_bytes());
            }
            CounterMsg::PingIn(ms) => ctx.arm(ctx.now() + ms, "ping"),
            // Writes something the store refuses: a key that is too long.
            CounterMsg::Reject => {
                self.total += 1_000_000;
                ctx.changed();
                ctx.op(Op::Append {
                    log: Key::new("x".repeat(5_000)),
                    value: vec![1],
                });
            }
        }
        self.total
    }

    fn on_timer(&mut self, tag: &str, ctx: &mut Ctx, _env: &()) {
        assert_eq!(tag, "ping");
        self.pings += 1;
        ctx.changed();
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
    Fixture {
        _dir: dir,
        store,
        clock: Arc::new(ManualClock::new(1_000_000)),
    }
}

async fn registry(f: &Fixture, idle_ms: u64) -> Registry<Counter> {
    let config = HostConfig { shards: 4, idle_ms };
    Registry::start(config, f.store.clone(), f.clock.clone(), Arc::new(()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_passivation_and_restart() {
    let f = fixture();
    let reg = registry(&f, 60_000).await;
    assert_eq!(reg.call("a", CounterMsg::Add(5)).await.unwrap(), 5);
    assert_eq!(reg.call("a", CounterMsg::Add(2)).await.unwrap(), 7);
    assert_eq!(reg.stats().await.unwrap().active, 1);

    // Idle past the limit: dropped from memory, and restored from the store on demand.
    f.clock.advance(60_001);
    reg.tick().await.unwrap();
    let s = reg.stats().await.unwrap();
    assert_eq!((s.active, s.passivations), (0, 1));
    assert_eq!(reg.call("a", CounterMsg::Add(1)).await.unwrap(), 8);
    assert_eq!(reg.stats().await.unwrap().activations, 2);

    // A new host over the same store (a restarted node) sees the same state.
    reg.stop().await;
    let reg = registry(&f, 60_000).await;
    assert_eq!(
        reg.inspect("a", |t| t.map(|c| c.total)).await.unwrap(),
        Some(8)
    );
    assert_eq!(
        reg.inspect("never", |t| t.map(|c| c.total)).await.unwrap(),
        None
    );
    // Every step's effect went to the durable outbox of the twin's shard, in order.
    let shard = caretwin_actors::host::shard_of("a", 4);
    let outbox = f
        .store
        .read_outbox(&Key::new(format!("outbox/counter/{shard}")), 1, 100)
        .await
        .unwrap();
    let effects: Vec<String> = outbox
        .iter()
        .map(|e| String::from_utf8(e.value.clone()).unwrap())
        .collect();
    assert_eq!(effects, ["added 5", "added 2", "added 1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_when_due_even_after_passivation_and_restart() {
    let f = fixture();
    let reg = registry(&f, 1_000).await;
    reg.call("b", CounterMsg::PingIn(3_600_000)).await.unwrap();
    f.clock.advance(1_800_000);
    reg.tick().await.unwrap(); // not due yet; the idle twin is passivated
    assert_eq!(reg.stats().await.unwrap().active, 0);
    assert_eq!(
        reg.inspect("b", |t| t.map(|c| c.pings)).await.unwrap(),
        None,
        "nothing stored yet"
    );

    reg.stop().await; // the node restarts while the timer is armed
    let reg = registry(&f, 1_000).await;
    f.clock.advance(1_799_999);
    reg.tick().await.unwrap();
    assert_eq!(
        reg.stats().await.unwrap().timers_fired,
        0,
        "one millisecond early"
    );
    f.clock.advance(1);
    reg.tick().await.unwrap();
    assert_eq!(reg.stats().await.unwrap().timers_fired, 1);
    assert_eq!(
        reg.inspect("b", |t| t.map(|c| c.pings)).await.unwrap(),
        Some(1)
    );
    // Fired once: a later tick does not fire it again.
    f.clock.advance(10_000_000);
    reg.tick().await.unwrap();
    assert_eq!(
        reg.inspect("b", |t| t.map(|c| c.pings)).await.unwrap(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_step_leaves_no_trace_in_memory() {
    let f = fixture();
    let reg = registry(&f, 60_000).await;
    reg.call("c", CounterMsg::Add(3)).await.unwrap();
    let err = reg.call("c", CounterMsg::Reject).await.unwrap_err();
    assert!(err.to_string().contains("invalid key"), "{err}");
    // The in-memory +1,000,000 was dropped with the refused batch.
    assert_eq!(reg.call("c", CounterMsg::Add(1)).await.unwrap(), 4);
    assert_eq!(reg.stats().await.unwrap().refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_to_one_twin_are_handled_one_at_a_time() {
    let f = fixture();
    let reg = Arc::new(registry(&f, 60_000).await);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            reg.call("d", CounterMsg::Add(1)).await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap().unwrap());
    }
    replies.sort_unstable();
    // Each message saw its own distinct total: no lost update, no interleaving.
    assert_eq!(replies, (1..=200).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_elsewhere_makes_the_hosted_twin_reload() {
    // Another owner (e.g. after a takeover) wrote the twin behind this host's back: the
    // host's next write conflicts on the snapshot version, is refused, and the twin reloads.
    let f = fixture();
    let reg = registry(&f, 60_000).await;
    reg.call("e", CounterMsg::Add(1)).await.unwrap();
    let key = Key::new("counter/e");
    let v = f.store.snapshot(&key).await.unwrap().unwrap().version;
    let foreign = [100u64.to_be_bytes(), 0u64.to_be_bytes()].concat();
    f.store
        .commit(WriteBatch::new().with(Op::PutSnapshot {
            key,
            expected_version: v,
            value: foreign,
        }))
        .await
        .unwrap();
    assert!(
        reg.call("e", CounterMsg::Add(1)).await.is_err(),
        "stale version refused"
    );
    assert_eq!(reg.call("e", CounterMsg::Add(1)).await.unwrap(), 101);
}
