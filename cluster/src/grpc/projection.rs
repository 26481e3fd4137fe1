//! One projection of a tenant's append-only log, shared by the case, command and
//! notification services: each folds its log (`cases/<tenant>`, `commands/<tenant>`,
//! `notifications/<tenant>`) into memory per tenant, on first use and then whenever the log
//! grew, and trims the log on its retention rule.
//!
//! # Retention
//! A log is a sequence of *items* (a case, a command, a notification), each spanning the
//! log indexes of its entries. An item is kept while it is live (an open case, a command
//! not yet in a final state) or while its latest entry is younger than the retention;
//! the log is trimmed before the first entry of the oldest kept item, moved further back
//! until no item is cut in two. So a rebuild from the trimmed log folds whole items, and
//! every kept item has its first entry (what it is) and its latest (where it stands). A
//! durable subscriber's cursor never holds the trim back: nothing younger than the
//! retention is trimmed, and the contracts let a cursor older than the retention fail
//! (OUT_OF_RANGE, see `Book::check_resume`). The trimming is lazy: at most once per
//! [`Retention::every_ms`] per tenant, when a read catches the projection up, on the
//! clock the service was given (without one nothing is trimmed).

use caretwin_actors::host::clock::Clock;
use caretwin_actors::model::{DAY_MS, HOUR_MS};
use caretwin_actors::store::{IdempotencyMode, Key, Op, Store, WriteBatch};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::Status;

/// Entries read from the log per store call while catching up.
const READ_CHUNK: usize = 1_000;

/// How long a log keeps finished items, and how often it is trimmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// A finished item is dropped once its latest entry is this old, ms.
    pub keep_ms: u64,
    /// Least time between two trims of one tenant's log, ms.
    pub every_ms: u64,
}

impl Retention {
    /// Finished items are kept for `keep`, trims at most hourly.
    pub fn keeping(keep: std::time::Duration) -> Self {
        Self {
            keep_ms: u64::try_from(keep.as_millis()).unwrap_or(u64::MAX),
            every_ms: HOUR_MS,
        }
    }

    /// Finished items are kept for `days`, trims at most hourly.
    pub const fn days(days: u64) -> Self {
        Self {
            keep_ms: days * DAY_MS,
            every_ms: HOUR_MS,
        }
    }
}

/// Where an item of a log lies and whether it may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// Log index of its first entry.
    pub first: u64,
    /// Log index of its latest entry.
    pub last: u64,
    /// When its latest entry happened, Unix ms.
    pub last_at_ms: u64,
    /// Whether it can change no more (a resolved case, a command in a final state); a
    /// live item is never trimmed.
    pub finished: bool,
}

/// The first log index to keep: every item before it is finished, older than the
/// retention and wholly before it. `next` is the log's next index (everything goes when
/// nothing is kept).
pub(crate) fn keep_from(spans: &[Span], next: u64, now_ms: u64, keep_ms: u64) -> u64 {
    let cutoff = now_ms.saturating_sub(keep_ms);
    let kept = |s: &Span| !s.finished || s.last_at_ms > cutoff;
    let mut from = spans
        .iter()
        .filter(|s| kept(s))
        .map(|s| s.first)
        .min()
        .unwrap_or(next);
    // Never cut an item in two: an item that starts before the point and ends at or after
    // it moves the point back to its start (and may make another one straddle).
    let mut by_first: Vec<&Span> = spans.iter().filter(|s| s.first < from).collect();
    by_first.sort_by_key(|s| std::cmp::Reverse(s.first));
    loop {
        let before = from;
        for s in &by_first {
            if s.first < from && s.last >= from {
                from = s.first;
            }
        }
        if from == before {
            return from;
        }
    }
}

/// What a log folds into.
pub(crate) trait Fold: Default + Send + 'static {
    /// One entry of the log.
    type Event: DeserializeOwned;
    /// What the entries are, for warnings.
    const WHAT: &'static str;
    /// Folds the entry at `index`.
    fn apply(&mut self, index: u64, event: Self::Event);
    /// Every item with where it lies.
    fn spans(&self) -> Vec<Span>;
    /// Forgets every item wholly before `from` (the log was trimmed there).
    fn forget_before(&mut self, from: u64);
}

/// One tenant's fold of its log.
#[derive(Debug)]
pub(crate) struct Book<F> {
    /// The next log index to read.
    pub next: u64,
    /// The first index the log still holds (1 until trimmed).
    pub first: u64,
    /// What the log says.
    pub state: F,
    /// When the log was last trimmed (0: never), Unix ms.
    trimmed_at_ms: u64,
}

impl<F> Book<F> {
    /// The newest index folded so far (0: none).
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    /// Refuses to resume after `cursor` when entries after it were trimmed:
    /// OUT_OF_RANGE, naming the cursor to resume from instead.
    pub fn check_resume(&self, cursor: u64) -> Result<(), Status> {
        if cursor + 1 < self.first {
            return Err(Status::out_of_range(format!(
                "cursor {cursor} is older than the retention: the oldest entry kept is {}, resume with after_cursor {}",
                self.first,
                self.first - 1
            )));
        }
        Ok(())
    }
}

/// Every tenant's fold of one family of logs.
pub(crate) struct Projection<F> {
    store: Arc<dyn Store>,
    log: fn(&str) -> Key,
    retention: Retention,
    /// What items are aged on; `None`: nothing ages (no trimming, no expiry).
    clock: Option<Arc<dyn Clock>>,
    books: std::sync::Mutex<HashMap<String, Arc<Mutex<Book<F>>>>>,
    /// Serialises acknowledgements, so a cursor never moves back.
    acks: Mutex<()>,
}

impl<F: Fold> Projection<F> {
    /// The fold of the logs `log(tenant)` of `store`, trimmed on `retention`.
    pub fn new(store: Arc<dyn Store>, log: fn(&str) -> Key, retention: Retention) -> Self {
        Self {
            store,
            log,
            retention,
            clock: None,
            books: Default::default(),
            acks: Mutex::new(()),
        }
    }

    /// Ages items on `clock` (the node's; a manual one in tests). Without one nothing
    /// ages: the log is never trimmed (a service built without the node's clock must
    /// not judge the twins' timestamps by another).
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = Some(clock);
    }

    /// Keeps finished items for `retention`.
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    /// The time on the clock items are aged on, `None` without one.
    pub fn aging_now(&self) -> Option<u64> {
        self.clock.as_ref().map(|c| c.now_ms())
    }

    /// The time to stamp entries with: the clock items are aged on, else the wall clock.
    pub fn now_ms(&self) -> u64 {
        self.aging_now().unwrap_or_else(crate::node::now_ms)
    }

    /// The tenant's log key.
    pub fn log(&self, tenant: &str) -> Key {
        (self.log)(tenant)
    }

    /// The tenant's book as folded so far, without reading the log.
    pub fn book(&self, tenant: &str) -> Arc<Mutex<Book<F>>> {
        self.books
            .lock()
            .expect("books lock")
            .entry(tenant.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Book {
                    next: 1,
                    first: 1,
                    state: F::default(),
                    trimmed_at_ms: 0,
                }))
            })
            .clone()
    }

    /// Folds what the tenant's log gained since the last call, and trims it when its
    /// time came.
    pub async fn catch_up(&self, tenant: &str) -> Result<Arc<Mutex<Book<F>>>, Status> {
        let book = self.book(tenant);
        {
            let mut b = book.lock().await;
            let log = self.log(tenant);
            loop {
                let entries = self
                    .store
                    .read_log(&log, b.next, READ_CHUNK)
                    .await
                    .map_err(internal)?;
                let Some(last) = entries.last().map(|e| e.index) else {
                    break;
                };
                // Entries were trimmed before we read them (a rebuild, or another node
                // trimmed past us): the log now starts further on.
                if let Some(first) = entries.first().map(|e| e.index)
                    && first > b.next
                {
                    b.state.forget_before(first);
                    b.first = b.first.max(first);
                }
                for e in entries {
                    match serde_json::from_slice::<F::Event>(&e.value) {
                        Ok(ev) => b.state.apply(e.index, ev),
                        Err(err) => {
                            tracing::warn!(tenant, index = e.index, error = %err, what = F::WHAT, "unreadable log entry skipped");
                        }
                    }
                }
                b.next = last + 1;
            }
            if let Some(now) = self.aging_now()
                && now.saturating_sub(b.trimmed_at_ms) >= self.retention.every_ms
            {
                self.trim(&mut b, &log, now).await?;
            }
        }
        Ok(book)
    }

    /// Drops from the log (and the book) every finished item past the retention.
    async fn trim(&self, b: &mut Book<F>, log: &Key, now: u64) -> Result<(), Status> {
        b.trimmed_at_ms = now;
        let from = keep_from(&b.state.spans(), b.next, now, self.retention.keep_ms);
        if from <= b.first {
            return Ok(());
        }
        self.store
            .commit(WriteBatch::new().with(Op::TrimLog {
                log: log.clone(),
                before: from,
            }))
            .await
            .map_err(internal)?;
        b.state.forget_before(from);
        tracing::info!(log = ?log, before = from, "log trimmed on its retention");
        b.first = from;
        Ok(())
    }

    /// Where a subscription of the tenant's log starts: after `after`, or else after the
    /// subscriber's durable cursor `key`; OUT_OF_RANGE when entries after it were trimmed.
    pub async fn resume_after(
        &self,
        tenant: &str,
        after: Option<u64>,
        key: &Key,
    ) -> Result<u64, Status> {
        let after = match after {
            Some(c) => c,
            None => super::stream::stored_cursor(&*self.store, key).await?,
        };
        self.catch_up(tenant)
            .await?
            .lock()
            .await
            .check_resume(after)?;
        Ok(after)
    }

    /// Appends `event` to the tenant's log; its index.
    pub async fn append(&self, tenant: &str, event: &impl serde::Serialize) -> Result<u64, Status> {
        let applied = self
            .store
            .commit(WriteBatch::new().with(Op::Append {
                log: self.log(tenant),
                value: serde_json::to_vec(event).expect("an event is plain data"),
            }))
            .await
            .map_err(internal)?;
        match applied.first() {
            Some(caretwin_actors::store::Applied::Index { index }) => Ok(*index),
            _ => Err(Status::internal("the append returned no index")),
        }
    }

    /// Moves the durable cursor `key` of a subscriber of the tenant's log to `cursor`
    /// (never back, never beyond the newest entry); the cursor after the call.
    pub async fn acknowledge(&self, tenant: &str, key: Key, cursor: u64) -> Result<u64, Status> {
        let _one_at_a_time = self.acks.lock().await;
        let stored = super::stream::stored_cursor(&*self.store, &key).await?;
        let last = self.catch_up(tenant).await?.lock().await.last();
        if cursor > last {
            return Err(Status::invalid_argument(format!(
                "cursor {cursor} is beyond the newest entry {last}"
            )));
        }
        if cursor > stored {
            let batch = WriteBatch::new().with(Op::PutIdempotency {
                key,
                value: cursor.to_be_bytes().to_vec(),
                mode: IdempotencyMode::Overwrite,
            });
            self.store.commit(batch).await.map_err(internal)?;
        }
        Ok(cursor.max(stored))
    }
}

use super::internal;

#[cfg(test)]
mod tests {
    use super::*;

    fn span(first: u64, last: u64, last_at_ms: u64, finished: bool) -> Span {
        Span {
            first,
            last,
            last_at_ms,
            finished,
        }
    }

    #[test]
    fn only_whole_finished_old_items_go() {
        let keep = 10;
        // 1..=3 finished long ago; 4..=6 live; 7 finished but young.
        let spans = [
            span(1, 3, 0, true),
            span(4, 6, 0, false),
            span(7, 7, 95, true),
        ];
        assert_eq!(keep_from(&spans, 8, 100, keep), 4);
        // Everything finished and old: all goes.
        let spans = [span(1, 3, 0, true), span(2, 5, 50, true)];
        assert_eq!(keep_from(&spans, 6, 100, keep), 6);
        // Nothing at all: nothing to keep.
        assert_eq!(keep_from(&[], 1, 100, keep), 1);
    }

    #[test]
    fn an_item_is_never_cut_in_two() {
        // A finished old item from 1 to 9 straddles the live one starting at 5: the log
        // is kept from 1. A chain of straddles moves the point back step by step.
        let spans = [span(1, 9, 0, true), span(5, 6, 0, false)];
        assert_eq!(keep_from(&spans, 10, 100, 10), 1);
        let spans = [
            span(1, 2, 0, true),
            span(3, 6, 0, true),
            span(5, 8, 0, true),
            span(7, 7, 0, false),
        ];
        assert_eq!(keep_from(&spans, 9, 100, 10), 3);
    }
}
