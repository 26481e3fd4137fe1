//! The storage conformance suite: what every [`Store`] backend must do.
//!
//! A backend's tests implement [`Harness`] and expand [`store_conformance!`](crate::store_conformance),
//! which makes one test per case below, so a failure names the broken property:
//!
//! ```ignore
//! caretwin_actors::store_conformance!(MyHarness::new());
//! ```
//!
//! The tests need a multi-threaded tokio runtime (the macro asks for one).

use crate::Error;
use crate::store::{
    Applied, Entry, Fence, IdempotencyMode, Key, MAX_BATCH_BYTES, MAX_BATCH_OPS, MAX_KEY_BYTES,
    MAX_VALUE_BYTES, Op, Store, WriteBatch,
};
use async_trait::async_trait;
use std::sync::Arc;

/// How the suite opens the backend under test.
#[async_trait]
pub trait Harness: Send + 'static {
    /// Opens the store. Called again after every handle was dropped, it must open the
    /// same data (the same directory, database or cluster).
    async fn open(&mut self) -> Arc<dyn Store>;

    /// Ends the store without a clean shutdown: whatever was not acknowledged may be lost,
    /// whatever was acknowledged must survive. The default drops the handle, which is as
    /// unclean as an in-process test can be for most backends; the process-level test
    /// (SIGKILL of a writer) lives with the binaries.
    async fn crash(&mut self, store: Arc<dyn Store>) {
        drop(store);
    }
}

fn put(key: &str, expected_version: u64, value: &[u8]) -> Op {
    Op::PutSnapshot {
        key: key.into(),
        expected_version,
        value: value.to_vec(),
    }
}

fn append(log: &str, value: &[u8]) -> Op {
    Op::Append {
        log: log.into(),
        value: value.to_vec(),
    }
}

/// Compare-and-set on snapshots: the version must match, versions count up from 1.
pub async fn snapshot_compare_and_set(mut h: impl Harness) {
    let s = h.open().await;
    let k = Key::from("t1/device/cas");
    assert_eq!(s.snapshot(&k).await.unwrap(), None);
    let applied = s
        .commit(WriteBatch::new().with(put(k.as_str(), 0, b"v1")))
        .await;
    assert_eq!(applied.unwrap(), vec![Applied::Snapshot { version: 1 }]);
    let err = s
        .commit(WriteBatch::new().with(put(k.as_str(), 0, b"again")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::VersionConflict {
                expected: 0,
                actual: 1,
                ..
            }
        ),
        "{err}"
    );
    s.commit(WriteBatch::new().with(put(k.as_str(), 1, b"v2")))
        .await
        .unwrap();
    let got = s.snapshot(&k).await.unwrap().unwrap();
    assert_eq!((got.version, got.value.as_slice()), (2, &b"v2"[..]));
    // Delete needs the current version too.
    let stale_delete = Op::DeleteSnapshot {
        key: k.clone(),
        expected_version: 1,
    };
    assert!(
        s.commit(WriteBatch::new().with(stale_delete))
            .await
            .is_err()
    );
    let delete = Op::DeleteSnapshot {
        key: k.clone(),
        expected_version: 2,
    };
    assert_eq!(
        s.commit(WriteBatch::new().with(delete)).await.unwrap(),
        vec![Applied::Deleted]
    );
    assert_eq!(s.snapshot(&k).await.unwrap(), None);
}

/// Two writers race with the same expected version: exactly one wins, every time.
pub async fn racing_writers_exactly_one_wins(mut h: impl Harness) {
    let s = h.open().await;
    for round in 0..50u64 {
        let key = format!("t1/device/race-{round}");
        let mut tasks = Vec::new();
        for writer in 0..2u8 {
            let s = s.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                s.commit(WriteBatch::new().with(put(&key, 0, &[writer])))
                    .await
            }));
        }
        let mut wins = 0;
        let mut winner_value = None;
        for (writer, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(_) => {
                    wins += 1;
                    winner_value = Some(writer as u8);
                }
                Err(Error::VersionConflict { .. }) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: {wins} writers won");
        let stored = s.snapshot(&Key::from(key)).await.unwrap().unwrap();
        assert_eq!(
            stored.value,
            vec![winner_value.unwrap()],
            "winner's value is stored"
        );
    }
}

/// A writer whose lease was taken over is fenced off, even racing the new owner.
pub async fn stale_fence_is_refused(mut h: impl Harness) {
    let s = h.open().await;
    for round in 0..20u64 {
        let lease = Key::new(format!("shard/{round}"));
        let t0 = round * 1_000;
        let old = s.acquire_lease(&lease, "node-a", 100, t0).await.unwrap();
        let key = format!("t1/device/fenced-{round}");
        s.commit(WriteBatch::fenced(old.fence()).with(put(&key, 0, b"a")))
            .await
            .unwrap();
        // node-a stalls past its expiry; node-b takes the shard over.
        let new = s
            .acquire_lease(&lease, "node-b", 100, t0 + 200)
            .await
            .unwrap();
        assert!(new.token > old.token, "token must grow on takeover");
        let (a, b) = tokio::join!(
            {
                let s = s.clone();
                let f = old.fence();
                let key = key.clone();
                tokio::spawn(async move {
                    s.commit(WriteBatch::fenced(f).with(put(&key, 1, b"stale")))
                        .await
                })
            },
            {
                let s = s.clone();
                let f = new.fence();
                let key = key.clone();
                tokio::spawn(async move {
                    s.commit(WriteBatch::fenced(f).with(put(&key, 1, b"owner")))
                        .await
                })
            }
        );
        let a = a.unwrap();
        assert!(
            matches!(a, Err(Error::StaleFence { .. })),
            "stale owner's write must be refused, got {a:?}"
        );
        b.unwrap().unwrap();
        let stored = s.snapshot(&Key::new(key)).await.unwrap().unwrap();
        assert_eq!(stored.value, b"owner");
        // The old owner cannot renew or release either.
        assert!(matches!(
            s.renew_lease(&old, 100, t0 + 210).await,
            Err(Error::LeaseLost { .. })
        ));
        assert!(s.release_lease(&old).await.is_err());
    }
    // A fence on a lease that never existed is stale too.
    let never = Fence {
        lease: "shard/never".into(),
        token: 1,
    };
    let err = s
        .commit(WriteBatch::fenced(never).with(put("t1/x", 0, b"x")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StaleFence { current: 0, .. }), "{err}");
    assert_eq!(s.snapshot(&"t1/x".into()).await.unwrap(), None);
}

/// High-water marks move forward by compare-and-set only; a replay is refused.
pub async fn high_water_marks_only_move_forward(mut h: impl Harness) {
    let s = h.open().await;
    let d = Key::from("t1/device/hwm");
    assert_eq!(s.high_water(&d).await.unwrap(), 0);
    let advance = |from, to| Op::AdvanceHighWater {
        device: d.clone(),
        from,
        to,
    };
    assert_eq!(
        s.commit(WriteBatch::new().with(advance(0, 5)))
            .await
            .unwrap(),
        vec![Applied::HighWater { seq: 5 }]
    );
    // The same readings replayed: refused, nothing applied twice.
    let err = s
        .commit(
            WriteBatch::new()
                .with(advance(0, 5))
                .with(append("t1/log/hwm", b"effect")),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::HighWaterConflict {
                expected: 0,
                actual: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        s.read_log(&"t1/log/hwm".into(), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.commit(WriteBatch::new().with(advance(5, 3)))
            .await
            .is_err()
    );
    s.commit(WriteBatch::new().with(advance(5, 9)))
        .await
        .unwrap();
    assert_eq!(s.high_water(&d).await.unwrap(), 9);
}

/// A batch applies all of its operations or none: one failing condition undoes the rest.
pub async fn batches_are_atomic(mut h: impl Harness) {
    let s = h.open().await;
    s.commit(WriteBatch::new().with(put("t1/device/atomic-b", 0, b"b1")))
        .await
        .unwrap();
    let batch = WriteBatch::new()
        .with(put("t1/device/atomic-a", 0, b"a1"))
        .with(append("t1/log/atomic", b"e1"))
        .with(Op::Enqueue {
            queue: "q/atomic".into(),
            value: b"order".to_vec(),
        })
        .with(Op::AdvanceHighWater {
            device: "t1/device/atomic-a".into(),
            from: 0,
            to: 3,
        })
        // Fails: atomic-b is at version 1.
        .with(put("t1/device/atomic-b", 0, b"b-again"));
    assert!(matches!(
        s.commit(batch).await,
        Err(Error::VersionConflict { .. })
    ));
    assert_eq!(
        s.snapshot(&"t1/device/atomic-a".into()).await.unwrap(),
        None
    );
    assert!(
        s.read_log(&"t1/log/atomic".into(), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.read_outbox(&"q/atomic".into(), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.high_water(&"t1/device/atomic-a".into()).await.unwrap(), 0);
    let b = s
        .snapshot(&"t1/device/atomic-b".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((b.version, b.value), (1, b"b1".to_vec()));
    // Operations inside one batch see the ones before them.
    let chained = WriteBatch::new()
        .with(put("t1/device/chain", 0, b"1"))
        .with(put("t1/device/chain", 1, b"2"));
    assert_eq!(
        s.commit(chained).await.unwrap(),
        vec![
            Applied::Snapshot { version: 1 },
            Applied::Snapshot { version: 2 }
        ]
    );
}

/// Logs hand out contiguous indexes from 1 and range reads return them in order.
pub async fn logs_read_in_order(mut h: impl Harness) {
    let s = h.open().await;
    let (l1, l2) = (Key::from("t1/log/one"), Key::from("t1/log/two"));
    for i in 1..=120u64 {
        let mut batch = WriteBatch::new();
        batch.push(append(l1.as_str(), format!("one-{i}").as_bytes()));
        if i % 3 == 0 {
            batch.push(append(l2.as_str(), format!("two-{}", i / 3).as_bytes()));
        }
        let applied = s.commit(batch).await.unwrap();
        assert_eq!(applied[0], Applied::Index { index: i });
    }
    let all = s.read_log(&l1, 1, 1000).await.unwrap();
    assert_eq!(all.len(), 120);
    for (n, Entry { index, value }) in all.iter().enumerate() {
        assert_eq!(*index, n as u64 + 1);
        assert_eq!(value, format!("one-{index}").as_bytes());
    }
    let page = s.read_log(&l1, 50, 7).await.unwrap();
    let idx: Vec<u64> = page.iter().map(|e| e.index).collect();
    assert_eq!(idx, (50..57).collect::<Vec<_>>());
    let two = s.read_log(&l2, 1, 1000).await.unwrap();
    assert_eq!(two.len(), 40);
    assert_eq!(two[39].value, b"two-40");
    assert!(s.read_log(&l1, 121, 10).await.unwrap().is_empty());
    // A log whose name is a prefix of another's must not see the other's entries.
    s.commit(WriteBatch::new().with(append("t1/log/on", b"x")))
        .await
        .unwrap();
    assert_eq!(
        s.read_log(&"t1/log/on".into(), 1, 1000)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Trimming drops a log's old entries and only those; indexes are never reused, and a
/// trim in the same batch as appends sees them.
pub async fn logs_trim_old_entries(mut h: impl Harness) {
    let s = h.open().await;
    let (log, other) = (Key::from("t1/trim/log"), Key::from("t1/trim/log2"));
    for i in 1..=30u64 {
        s.commit(
            WriteBatch::new()
                .with(append(log.as_str(), format!("e{i}").as_bytes()))
                .with(append(other.as_str(), b"x")),
        )
        .await
        .unwrap();
    }
    let trim = |log: &Key, before| Op::TrimLog {
        log: log.clone(),
        before,
    };
    let applied = s.commit(WriteBatch::new().with(trim(&log, 11))).await;
    assert_eq!(applied.unwrap(), vec![Applied::Trimmed]);
    let kept = s.read_log(&log, 1, 1000).await.unwrap();
    assert_eq!(kept.first().map(|e| e.index), Some(11));
    assert_eq!(kept.len(), 20);
    assert_eq!(kept[0].value, b"e11");
    assert_eq!(s.read_log(&other, 1, 1000).await.unwrap().len(), 30);
    // Again, and below what is gone: harmless.
    s.commit(WriteBatch::new().with(trim(&log, 11)).with(trim(&log, 3)))
        .await
        .unwrap();
    // Appends go on from the last index, even after everything was trimmed.
    s.commit(WriteBatch::new().with(trim(&log, 31)))
        .await
        .unwrap();
    assert!(s.read_log(&log, 1, 1000).await.unwrap().is_empty());
    let applied = s
        .commit(
            WriteBatch::new()
                .with(append(log.as_str(), b"e31"))
                .with(append(log.as_str(), b"e32"))
                .with(trim(&log, 32)),
        )
        .await
        .unwrap();
    assert_eq!(applied[0], Applied::Index { index: 31 });
    let kept = s.read_log(&log, 1, 1000).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!((kept[0].index, kept[0].value.as_slice()), (32, &b"e32"[..]));
    // A refused batch trims nothing.
    let err = s
        .commit(
            WriteBatch::new()
                .with(trim(&other, 31))
                .with(put("t1/trim/snap", 5, b"no")),
        )
        .await;
    assert!(err.is_err());
    assert_eq!(s.read_log(&other, 1, 1000).await.unwrap().len(), 30);
    // Trimming before 0 is refused.
    assert!(
        s.commit(WriteBatch::new().with(trim(&log, 0)))
            .await
            .is_err()
    );
}

/// Leases expire on the caller's clock, change hands with a new token, and are exclusive.
pub async fn leases_expire_and_fence(mut h: impl Harness) {
    let s = h.open().await;
    let name = Key::from("shard/lease-test");
    assert_eq!(s.lease(&name).await.unwrap(), None);
    let a = s
        .acquire_lease(&name, "node-a", 1_000, 10_000)
        .await
        .unwrap();
    assert_eq!(a.expires_at_ms, 11_000);
    let held = s.acquire_lease(&name, "node-b", 1_000, 10_500).await;
    assert!(matches!(held, Err(Error::LeaseHeld { .. })), "{held:?}");
    let a = s.renew_lease(&a, 1_000, 10_900).await.unwrap();
    assert_eq!(a.expires_at_ms, 11_900);
    assert!(
        s.acquire_lease(&name, "node-b", 1_000, 11_899)
            .await
            .is_err()
    );
    let b = s
        .acquire_lease(&name, "node-b", 1_000, 11_900)
        .await
        .unwrap();
    assert!(b.token > a.token);
    assert_eq!(s.lease(&name).await.unwrap(), Some(b.clone()));
    assert!(matches!(
        s.renew_lease(&a, 1_000, 11_950).await,
        Err(Error::LeaseLost { .. })
    ));
    s.release_lease(&b).await.unwrap();
    let c = s
        .acquire_lease(&name, "node-c", 1_000, 11_950)
        .await
        .unwrap();
    assert!(
        c.token > b.token,
        "a released lease changes hands with a new token"
    );
    assert!(s.release_lease(&b).await.is_err(), "double release");
}

/// Idempotency records: create-only claims an effect once; overwrite records its outcome.
pub async fn idempotency_records_claim_once(mut h: impl Harness) {
    let s = h.open().await;
    let k = Key::from("t1/idem/part-order/case-1");
    let claim = |v: &[u8]| Op::PutIdempotency {
        key: k.clone(),
        value: v.to_vec(),
        mode: IdempotencyMode::CreateOnly,
    };
    s.commit(WriteBatch::new().with(claim(b"intent")).with(Op::Enqueue {
        queue: "q/orders".into(),
        value: b"order-1".to_vec(),
    }))
    .await
    .unwrap();
    // A retry of the same effect is refused as a whole: no second order is enqueued.
    let retry = WriteBatch::new().with(claim(b"intent")).with(Op::Enqueue {
        queue: "q/orders".into(),
        value: b"order-1".to_vec(),
    });
    assert!(matches!(
        s.commit(retry).await,
        Err(Error::IdempotencyExists { .. })
    ));
    assert_eq!(
        s.read_outbox(&"q/orders".into(), 1, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    s.commit(WriteBatch::new().with(Op::PutIdempotency {
        key: k.clone(),
        value: b"placed:PO-7".to_vec(),
        mode: IdempotencyMode::Overwrite,
    }))
    .await
    .unwrap();
    assert_eq!(
        s.idempotency(&k).await.unwrap(),
        Some(b"placed:PO-7".to_vec())
    );
    assert_eq!(s.idempotency(&"t1/idem/none".into()).await.unwrap(), None);
}

/// The outbox hands out entries oldest first until they are acknowledged.
pub async fn outbox_delivers_until_acknowledged(mut h: impl Harness) {
    let s = h.open().await;
    let q = Key::from("q/effects");
    for i in 1..=5u64 {
        let applied = s
            .commit(WriteBatch::new().with(Op::Enqueue {
                queue: q.clone(),
                value: format!("effect-{i}").into_bytes(),
            }))
            .await
            .unwrap();
        assert_eq!(applied, vec![Applied::Index { index: i }]);
    }
    let dequeue = |index| Op::Dequeue {
        queue: q.clone(),
        index,
    };
    s.commit(WriteBatch::new().with(dequeue(2)).with(dequeue(4)))
        .await
        .unwrap();
    // A retried acknowledgement is harmless.
    s.commit(WriteBatch::new().with(dequeue(2))).await.unwrap();
    let pending: Vec<u64> = s
        .read_outbox(&q, 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.index)
        .collect();
    assert_eq!(pending, vec![1, 3, 5]);
    let from_two: Vec<u64> = s
        .read_outbox(&q, 2, 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.index)
        .collect();
    assert_eq!(from_two, vec![3]);
    // Indexes are never reused, even after the newest entry is removed.
    s.commit(WriteBatch::new().with(dequeue(5))).await.unwrap();
    let applied = s
        .commit(WriteBatch::new().with(Op::Enqueue {
            queue: q.clone(),
            value: b"effect-6".to_vec(),
        }))
        .await
        .unwrap();
    assert_eq!(applied, vec![Applied::Index { index: 6 }]);
}

/// Timers come back earliest first, only once due, and stay until disarmed.
pub async fn timers_come_due_in_order(mut h: impl Harness) {
    let s = h.open().await;
    let sched = Key::from("timers/shard-1");
    let arm = |due_ms, item: &str| Op::Schedule {
        schedule: sched.clone(),
        due_ms,
        item: item.as_bytes().to_vec(),
    };
    s.commit(
        WriteBatch::new()
            .with(arm(3_000, "twin-c"))
            .with(arm(1_000, "twin-b"))
            .with(arm(1_000, "twin-a"))
            .with(arm(9_000, "twin-d"))
            .with(arm(1_000, "twin-a")),
    )
    .await
    .unwrap();
    // Another schedule whose name extends this one's must stay separate.
    s.commit(WriteBatch::new().with(Op::Schedule {
        schedule: "timers/shard-10".into(),
        due_ms: 500,
        item: b"other".to_vec(),
    }))
    .await
    .unwrap();
    let due = |until, limit| {
        let s = s.clone();
        let sched = sched.clone();
        async move {
            s.read_due(&sched, until, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|d| (d.due_ms, String::from_utf8(d.item).unwrap()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(due(999, 10).await, vec![]);
    assert_eq!(
        due(3_000, 10).await,
        vec![
            (1_000, "twin-a".to_string()),
            (1_000, "twin-b".to_string()),
            (3_000, "twin-c".to_string())
        ]
    );
    assert_eq!(due(u64::MAX, 2).await.len(), 2);
    s.commit(WriteBatch::new().with(Op::Unschedule {
        schedule: sched.clone(),
        due_ms: 1_000,
        item: b"twin-a".to_vec(),
    }))
    .await
    .unwrap();
    assert_eq!(due(u64::MAX, 10).await.len(), 3);
    assert!(s.read_due(&sched, 0, 0).await.is_err());
    let empty_item = Op::Schedule {
        schedule: sched.clone(),
        due_ms: 1,
        item: Vec::new(),
    };
    assert!(s.commit(WriteBatch::new().with(empty_item)).await.is_err());
}

/// Many concurrent writers are all acknowledged and all visible (group commit must not
/// lose or mix up anybody's write).
pub async fn concurrent_commits_all_land(mut h: impl Harness) {
    let s = h.open().await;
    let mut tasks = Vec::new();
    for w in 0..500u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("t1/device/conc-{w}");
            s.commit(
                WriteBatch::new()
                    .with(put(&key, 0, &w.to_be_bytes()))
                    .with(Op::AdvanceHighWater {
                        device: key.as_str().into(),
                        from: 0,
                        to: w + 1,
                    })
                    .with(append("t1/log/shared", &w.to_be_bytes())),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for w in 0..500u64 {
        let key = Key::new(format!("t1/device/conc-{w}"));
        let snap = s.snapshot(&key).await.unwrap().unwrap();
        assert_eq!(snap.value, w.to_be_bytes());
        assert_eq!(s.high_water(&key).await.unwrap(), w + 1);
    }
    let log = s.read_log(&"t1/log/shared".into(), 1, 1000).await.unwrap();
    assert_eq!(log.len(), 500);
    let mut seen: Vec<u64> = log
        .iter()
        .map(|e| u64::from_be_bytes(e.value.as_slice().try_into().unwrap()))
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..500).collect::<Vec<_>>(),
        "every append exactly once"
    );
}

/// Everything acknowledged before a crash is there after reopening.
pub async fn acknowledged_writes_survive_crash(mut h: impl Harness) {
    let s = h.open().await;
    let lease = s
        .acquire_lease(&"shard/crash".into(), "node-a", 60_000, 1)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..200u64 {
        let s = s.clone();
        let fence = lease.fence();
        tasks.push(tokio::spawn(async move {
            let key = format!("t1/device/crash-{w}");
            s.commit(
                WriteBatch::fenced(fence)
                    .with(put(&key, 0, format!("state-{w}").as_bytes()))
                    .with(Op::AdvanceHighWater {
                        device: key.as_str().into(),
                        from: 0,
                        to: 10,
                    })
                    .with(append("t1/log/crash", &w.to_be_bytes()))
                    .with(Op::Enqueue {
                        queue: "q/crash".into(),
                        value: w.to_be_bytes().to_vec(),
                    })
                    .with(Op::PutIdempotency {
                        key: format!("t1/idem/crash-{w}").into(),
                        value: b"done".to_vec(),
                        mode: IdempotencyMode::CreateOnly,
                    }),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    h.crash(s).await;
    let s = h.open().await;
    for w in 0..200u64 {
        let key = Key::new(format!("t1/device/crash-{w}"));
        let snap = s.snapshot(&key).await.unwrap();
        assert_eq!(
            snap.map(|v| v.value),
            Some(format!("state-{w}").into_bytes()),
            "acknowledged snapshot {w} lost"
        );
        assert_eq!(s.high_water(&key).await.unwrap(), 10);
        assert!(
            s.idempotency(&format!("t1/idem/crash-{w}").into())
                .await
                .unwrap()
                .is_some()
        );
    }
    assert_eq!(
        s.read_log(&"t1/log/crash".into(), 1, 1000)
            .await
            .unwrap()
            .len(),
        200
    );
    assert_eq!(
        s.read_outbox(&"q/crash".into(), 1, 1000)
            .await
            .unwrap()
            .len(),
        200
    );
    assert_eq!(
        s.lease(&"shard/crash".into()).await.unwrap(),
        Some(lease.clone())
    );
    // Counters continue after recovery instead of starting over.
    let applied = s
        .commit(WriteBatch::fenced(lease.fence()).with(append("t1/log/crash", b"after")))
        .await
        .unwrap();
    assert_eq!(applied, vec![Applied::Index { index: 201 }]);
}

/// Bad input gets a clear error and changes nothing.
pub async fn bad_input_is_refused(mut h: impl Harness) {
    let s = h.open().await;
    s.commit(WriteBatch::new().with(put("t1/device/bad", 0, b"good")))
        .await
        .unwrap();
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);
    let cases: Vec<(&str, WriteBatch)> = vec![
        ("empty batch", WriteBatch::new()),
        ("empty key", WriteBatch::new().with(put("", 0, b"x"))),
        ("long key", WriteBatch::new().with(put(&long_key, 0, b"x"))),
        ("NUL in key", WriteBatch::new().with(put("a\0b", 0, b"x"))),
        (
            "oversized value",
            WriteBatch::new().with(put("t1/device/bad", 1, &vec![7; MAX_VALUE_BYTES + 1])),
        ),
        (
            "too many ops",
            WriteBatch {
                fence: None,
                ops: vec![append("t1/log/bad", b"x"); MAX_BATCH_OPS + 1],
            },
        ),
        (
            "too many bytes",
            WriteBatch {
                fence: None,
                ops: vec![
                    append("t1/log/bad", &vec![1; MAX_VALUE_BYTES]);
                    MAX_BATCH_BYTES / MAX_VALUE_BYTES + 1
                ],
            },
        ),
        (
            "good op then bad op",
            WriteBatch::new()
                .with(put("t1/device/bad", 1, b"overwritten"))
                .with(append("", b"x")),
        ),
    ];
    for (what, batch) in cases {
        let err = s.commit(batch).await.expect_err(what);
        assert!(
            !err.to_string().is_empty(),
            "{what}: error says what failed"
        );
        assert!(
            matches!(
                err,
                Error::InvalidKey { .. }
                    | Error::ValueTooLarge { .. }
                    | Error::InvalidBatch { .. }
                    | Error::InvalidArgument { .. }
            ),
            "{what}: {err}"
        );
    }
    assert!(s.snapshot(&"".into()).await.is_err());
    assert!(s.read_log(&"t1/log/bad".into(), 0, 10).await.is_err());
    assert!(s.read_log(&"t1/log/bad".into(), 1, 0).await.is_err());
    assert!(
        s.acquire_lease(&"shard/bad".into(), "", 100, 0)
            .await
            .is_err()
    );
    assert!(
        s.acquire_lease(&"shard/bad".into(), "n", 0, 0)
            .await
            .is_err()
    );
    // Nothing changed.
    let snap = s.snapshot(&"t1/device/bad".into()).await.unwrap().unwrap();
    assert_eq!((snap.version, snap.value), (1, b"good".to_vec()));
    assert!(
        s.read_log(&"t1/log/bad".into(), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.lease(&"shard/bad".into()).await.unwrap(), None);
}

/// Expands to one `#[tokio::test]` per conformance case, each opening its own store with
/// the given harness expression (evaluated once per test). Attributes after the harness
/// go on every test, e.g. `#[ignore = "needs a cluster"]` for a backend that needs a
/// service the machine may not have.
#[macro_export]
macro_rules! store_conformance {
    ($harness:expr $(, $(#[$attr:meta])*)?) => {
        $crate::store_conformance!(@cases [$($(#[$attr])*)?] $harness;
            snapshot_compare_and_set,
            racing_writers_exactly_one_wins,
            stale_fence_is_refused,
            high_water_marks_only_move_forward,
            batches_are_atomic,
            logs_read_in_order,
            logs_trim_old_entries,
            leases_expire_and_fence,
            idempotency_records_claim_once,
            outbox_delivers_until_acknowledged,
            timers_come_due_in_order,
            concurrent_commits_all_land,
            acknowledged_writes_survive_crash,
            bad_input_is_refused,
        );
    };
    (@cases $attrs:tt $harness:expr;) => {};
    (@cases [$(#[$attr:meta])*] $harness:expr; $case:ident, $($rest:ident,)*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $case() {
            $crate::conformance::$case($harness).await;
        }
        $crate::store_conformance!(@cases [$(#[$attr])*] $harness; $($rest,)*);
    };
}
