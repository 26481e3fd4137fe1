//! The outbox dispatcher on the real embedded store: order, retries, no loss, no block.

use caretwin_actors::host::dispatch::{Delivery, Dispatcher, Router};
use caretwin_actors::mail::{Address, Body, Mail};
use caretwin_actors::store::{Key, Op, Store, WriteBatch};
use caretwin_cluster::store::{EmbeddedConfig, EmbeddedStore};
use std::sync::{Arc, Mutex};

/// Records what it is given; fails (transiently) while `down` is set.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<String>>,
    down: Mutex<bool>,
}

#[async_trait::async_trait]
impl Router for Recorder {
    async fn deliver(&self, mail: Mail) -> caretwin_actors::Result<Delivery> {
        if *self.down.lock().unwrap() {
            return Err(caretwin_actors::Error::Host("receiver unreachable".into()));
        }
        if mail.id.ends_with("reject") {
            return Ok(Delivery::Rejected("receiver does not know this".into()));
        }
        self.got.lock().unwrap().push(mail.id);
        Ok(Delivery::Delivered)
    }
}

fn mail(id: &str, from_tenant: &str, to_tenant: &str) -> Vec<u8> {
    Mail {
        id: id.into(),
        from: Address::Customer(format!("{from_tenant}:c1")),
        to: Address::Parts(to_tenant.into()),
        body: Body::CustomerAnswer {
            question_id: "q".into(),
            answer: "yes".into(),
        },
    }
    .encode()
}

async fn enqueue(store: &dyn Store, queue: &str, value: Vec<u8>) {
    store
        .commit(WriteBatch::new().with(Op::Enqueue {
            queue: Key::from(queue),
            value,
        }))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_is_delivered_in_order_after_failures_and_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&EmbeddedConfig::at(dir.path())).unwrap());
    let router = Arc::new(Recorder::default());
    let queues = vec![
        Key::from("outbox/customer/0"),
        Key::from("outbox/customer/1"),
    ];
    let d = Dispatcher::new(store.clone(), router.clone(), queues.clone());

    enqueue(&*store, "outbox/customer/0", mail("m1", "t1", "t1")).await;
    enqueue(&*store, "outbox/customer/0", b"garbage".to_vec()).await;
    enqueue(&*store, "outbox/customer/0", mail("m2-cross", "t1", "t2")).await;
    enqueue(&*store, "outbox/customer/0", mail("m3-reject", "t1", "t1")).await;
    enqueue(&*store, "outbox/customer/1", mail("n1", "t1", "t1")).await;

    // The receiver is down: nothing is lost, both queues stall.
    *router.down.lock().unwrap() = true;
    let r = d.pump().await.unwrap();
    assert_eq!((r.delivered, r.stalled), (0, 2));
    assert_eq!(store.read_outbox(&queues[0], 1, 10).await.unwrap().len(), 4);

    *router.down.lock().unwrap() = false;
    enqueue(&*store, "outbox/customer/0", mail("m4", "t1", "t1")).await;
    let r = d.pump().await.unwrap();
    assert_eq!((r.delivered, r.dropped, r.stalled), (3, 3, 0));
    let mut got = router.got.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, ["m1", "m4", "n1"]);
    for q in &queues {
        assert!(
            store.read_outbox(q, 1, 10).await.unwrap().is_empty(),
            "{q} drained"
        );
    }

    // A dispatcher started afresh (a restarted node) finds nothing to redeliver.
    let again = Dispatcher::new(store.clone(), router.clone(), queues);
    assert_eq!(again.pump().await.unwrap().delivered, 0);
}
