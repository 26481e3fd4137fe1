//! `NotificationService`: customer notifications handed to channel gateways, their
//! delivery reports, and the customers' answers going back to their twins.
//!
//! The customer twin decides a notification (consent, quiet hours, budget) and mails
//! `Body::Notify` to `Address::Notifier(tenant)`. [`Recorder`], on the node's outbound
//! path, makes it durable: it appends a `created` event to the tenant's notification log
//! (`notifications/<tenant>`), with a create-only idempotency record of the mail id in
//! the same batch, so the at-least-once delivery of mail records each notification once;
//! then it hands the mail on to the node's `outside` router as before. Gateways' reports
//! and customers' answers are appended to the same log as further events. The log is the
//! truth; [`Notifications`] keeps a projection of it per tenant, caught up when the log
//! grows (the node's [`Watched`](crate::store::watch::Watched) store signals appends), as
//! the case service does with the case log. A delivery's cursor is the log index of the
//! notification's `created` event.
//!
//! An answer is recorded in the log and then mailed to the customer twin as
//! `Body::CustomerAnswer`, with a mail id made of the answer event's log index, so a
//! retried call re-sends the same mail and the twin takes it once. Contact addresses are
//! never logged: they are read from the customer's personal record when a notification is
//! shown, so erasing the customer removes them.

use super::auth::{Principal, Scope};
use super::convert;
use super::projection::{Book, Fold, Projection, Retention, Span};
use crate::pii::Vault;
use crate::store::watch::LogSignals;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::mail::{Address, Body, Mail, tenant_of};
use caretwin_actors::model::{DAY_MS, Priority};
use caretwin_actors::store::{IdempotencyMode, Key, Op, Store, WriteBatch};
use caretwin_actors::system::System;
use caretwin_actors::twins::customer::{CustomerMsg, CustomerReply};
use caretwin_proto::v1::{self, notification_service_server::NotificationService};
use futures::Stream;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

/// Deliveries buffered per subscriber before the stream waits for the client.
const STREAM_BUFFER: usize = 256;
/// Notifications are read for 7 days (the contract's retention), then trimmed.
pub const NOTIFICATION_RETENTION: Retention = Retention::days(7);
/// How far ahead of the node's clock a gateway's timestamp may be.
const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// Longest free-text answer or delivery detail, in characters.
pub const MAX_TEXT_CHARS: usize = 2_000;

/// The key of a tenant's notification log.
pub fn notifications_log(tenant: &str) -> Key {
    Key::new(format!("notifications/{tenant}"))
}

fn recorded_key(tenant: &str, mail_id: &str) -> Key {
    Key::new(format!("notification-mail/{tenant}/{mail_id}"))
}

fn subscriber_key(tenant: &str, subscriber: &str) -> Key {
    Key::new(format!("grpc/notifications-cursor/{tenant}/{subscriber}"))
}

use super::internal;

/// One event of a tenant's notification log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum NotificationEvent {
    /// A customer twin's notification, as its mail said it.
    Created {
        /// The notification (the mail's id, which starts with the tenant).
        notification_id: String,
        /// The customer.
        customer: String,
        /// The channel (`push`, `sms`, `email`, `phone`).
        channel: String,
        /// The text, without its one-tap options.
        text: String,
        /// The one-tap options, in order.
        options: Vec<String>,
        /// How urgent.
        priority: Priority,
        /// The question or approval it asks, if any (`<case id>/<question>`).
        question_id: Option<String>,
        /// When recorded, Unix ms.
        at_ms: u64,
        /// After this an answer is not taken and an unsent notification expires, Unix ms
        /// (absent: never); see [`expiry`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at_ms: Option<u64>,
    },
    /// A gateway reported how far it got.
    Delivery {
        /// The notification.
        notification_id: String,
        /// The state's number in the contract (`NotificationState`).
        state: i32,
        /// When, Unix ms.
        at_ms: u64,
        /// The channel's explanation.
        detail: String,
    },
    /// The customer answered.
    Answered {
        /// The notification.
        notification_id: String,
        /// The chosen option (empty for free text).
        option_id: String,
        /// Free text.
        free_text: String,
        /// When the customer answered, Unix ms.
        at_ms: u64,
        /// The caller's idempotency key, so a retry is recognised.
        idempotency_key: String,
    },
}

impl NotificationEvent {
    /// The notification the event is about.
    fn notification_id(&self) -> &str {
        match self {
            Self::Created {
                notification_id, ..
            }
            | Self::Delivery {
                notification_id, ..
            }
            | Self::Answered {
                notification_id, ..
            } => notification_id,
        }
    }

    /// When it happened, Unix ms.
    fn at_ms(&self) -> u64 {
        match self {
            Self::Created { at_ms, .. }
            | Self::Delivery { at_ms, .. }
            | Self::Answered { at_ms, .. } => *at_ms,
        }
    }
}

/// How long a question waits for its answer: as long as the customer twin waits before it
/// moves on without one (its approval timeout).
pub const ANSWER_TTL_MS: u64 = 2 * DAY_MS;
/// How long a plain notice may wait for a gateway: a day-old "descaling done" is noise.
pub const NOTICE_TTL_MS: u64 = DAY_MS;

/// When a notification created at `at_ms` expires, by its kind: a question or an approval
/// (an appointment proposal, an order to approve) once its answer no longer counts; a
/// notice after a day; a safety notification never (it must get through).
pub fn expiry(priority: Priority, question_id: Option<&str>, at_ms: u64) -> Option<u64> {
    match (priority, question_id) {
        (_, Some(_)) => Some(at_ms + ANSWER_TTL_MS),
        (Priority::Safety, None) => None,
        (_, None) => Some(at_ms + NOTICE_TTL_MS),
    }
}

/// The title of a notification, by its kind (none for SMS, which has no subject).
fn title(channel: v1::Channel, priority: Priority, question_id: Option<&str>) -> String {
    if channel == v1::Channel::Sms {
        return String::new();
    }
    let question = question_id.and_then(|q| q.rsplit_once('/')).map(|(_, q)| q);
    match (priority, question) {
        (Priority::Safety, _) => "Safety alert",
        (_, Some("confirm-visit")) => "Please confirm your technician visit",
        (_, Some(q)) if q.starts_with("approve-") => "Your approval is needed",
        (_, Some(_)) => "A question about your product",
        (_, None) => "About your product",
    }
    .to_owned()
}

/// Splits a notification's text from its one-tap options: the customer twin writes them
/// at the end, as `text [option / option]`.
fn split_options(text: &str) -> (String, Vec<String>) {
    if let Some(stripped) = text.strip_suffix(']')
        && let Some((body, opts)) = stripped.rsplit_once(" [")
    {
        let options: Vec<String> = opts
            .split(" / ")
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect();
        if !options.is_empty() {
            return (body.to_owned(), options);
        }
    }
    (text.to_owned(), Vec::new())
}

/// Records customer notifications in their tenant's log, once per mail, and passes all
/// mail on to the next router.
pub struct Recorder {
    store: Arc<dyn Store>,
    next: Arc<dyn Router>,
    now: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Where the text is sealed with the customer's key; `None`: kept in clear.
    vault: Option<Arc<Vault>>,
}

impl Recorder {
    /// Records into `store`, then hands every mail to `next`; `now` stamps the records.
    pub fn new(
        store: Arc<dyn Store>,
        next: Arc<dyn Router>,
        now: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        Self {
            store,
            next,
            now,
            vault: None,
        }
    }

    /// Seals each notification's text with its customer's key in `vault` before it goes
    /// into the append-only log: the text is about the person (their device, their
    /// visit), so erasing the customer (destroying the key) makes it unreadable.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
        self
    }
}

#[async_trait::async_trait]
impl Router for Recorder {
    async fn deliver(&self, mail: Mail) -> caretwin_actors::Result<Delivery> {
        if let (
            Address::Notifier(tenant),
            Body::Notify {
                customer,
                channel,
                text,
                priority,
                question_id,
            },
        ) = (&mail.to, &mail.body)
        {
            if tenant_of(customer) != tenant || !mail.id.starts_with(&format!("{tenant}:")) {
                return Ok(Delivery::Rejected(format!(
                    "notification {} is not of tenant {tenant}",
                    mail.id
                )));
            }
            let (text, options) = split_options(text);
            let now = (self.now)();
            let text = match &self.vault {
                None => text,
                Some(v) => v
                    .seal(customer, &text)
                    .await
                    .map_err(|e| match e {
                        crate::Error::Store(e) => e,
                        other => caretwin_actors::Error::Host(other.to_string()),
                    })?
                    // Erased meanwhile: nothing about them is written again.
                    .unwrap_or_else(|| crate::pii::ERASED.to_owned()),
            };
            let event = NotificationEvent::Created {
                notification_id: mail.id.clone(),
                customer: customer.clone(),
                channel: channel.clone(),
                text,
                options,
                priority: *priority,
                question_id: question_id.clone(),
                at_ms: now,
                expires_at_ms: expiry(*priority, question_id.as_deref(), now),
            };
            let batch = WriteBatch::new()
                .with(Op::PutIdempotency {
                    key: recorded_key(tenant, &mail.id),
                    value: Vec::new(),
                    mode: IdempotencyMode::CreateOnly,
                })
                .with(Op::Append {
                    log: notifications_log(tenant),
                    value: serde_json::to_vec(&event).expect("an event is plain data"),
                });
            match self.store.commit(batch).await {
                Ok(_) => {
                    tracing::debug!(tenant = %tenant, notification = %mail.id, "notification recorded");
                }
                // A redelivery of mail already recorded.
                Err(caretwin_actors::Error::IdempotencyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.next.deliver(mail).await
    }
}

/// One notification as its events tell it.
#[derive(Debug, Clone)]
struct Item {
    /// Log index of its `created` event: its cursor.
    cursor: u64,
    created: NotificationEvent,
    state: i32,
    response: Option<v1::CustomerResponse>,
    /// The answer's log index and idempotency key, once answered.
    answer: Option<(u64, String)>,
    /// Log index and time of its latest event.
    last: (u64, u64),
}

/// One tenant's notifications.
#[derive(Debug, Default)]
pub(crate) struct NotificationBook {
    items: HashMap<String, Item>,
    /// Cursor → notification id.
    order: BTreeMap<u64, String>,
}

impl Fold for NotificationBook {
    type Event = NotificationEvent;
    const WHAT: &'static str = "notification event";

    fn spans(&self) -> Vec<Span> {
        self.items
            .values()
            .map(|i| Span {
                first: i.cursor,
                last: i.last.0,
                last_at_ms: i.last.1,
                // Nothing waits on a notification beyond its retention.
                finished: true,
            })
            .collect()
    }

    fn forget_before(&mut self, from: u64) {
        self.items.retain(|_, i| i.last.0 >= from);
        self.order = self.order.split_off(&from);
    }

    fn apply(&mut self, index: u64, ev: NotificationEvent) {
        let at = ev.at_ms();
        if let Some(i) = self.items.get_mut(ev.notification_id()) {
            i.last = (index, i.last.1.max(at));
        }
        match &ev {
            NotificationEvent::Created {
                notification_id, ..
            } => {
                self.order.insert(index, notification_id.clone());
                self.items.insert(
                    notification_id.clone(),
                    Item {
                        cursor: index,
                        created: ev.clone(),
                        state: v1::NotificationState::Pending as i32,
                        response: None,
                        answer: None,
                        last: (index, at),
                    },
                );
            }
            NotificationEvent::Delivery {
                notification_id,
                state,
                ..
            } => {
                if let Some(i) = self.items.get_mut(notification_id)
                    && advances(i.state, *state)
                {
                    i.state = *state;
                }
            }
            NotificationEvent::Answered {
                notification_id,
                option_id,
                free_text,
                at_ms,
                idempotency_key,
            } => {
                if let Some(i) = self.items.get_mut(notification_id)
                    && i.response.is_none()
                {
                    i.response = Some(v1::CustomerResponse {
                        option_id: option_id.clone(),
                        free_text: free_text.clone(),
                        responded_at_ms: *at_ms as i64,
                    });
                    i.answer = Some((index, idempotency_key.clone()));
                }
            }
        }
    }
}

/// Whether a delivery state may follow `from`: states only move forward (pending, sent,
/// delivered, read), and a failure ends anything not yet delivered.
fn advances(from: i32, to: i32) -> bool {
    use v1::NotificationState as S;
    let rank = |s: i32| match S::try_from(s) {
        Ok(S::Pending) => 1,
        Ok(S::Sent) => 2,
        Ok(S::Delivered) => 3,
        Ok(S::Read) => 4,
        _ => 0,
    };
    if to == S::Failed as i32 {
        return rank(from) > 0 && rank(from) < 3;
    }
    rank(to) > rank(from) && rank(from) > 0
}

/// The projection of every tenant's notification log, and what acts on it.
pub struct Notifications {
    system: Arc<System>,
    signals: Arc<LogSignals>,
    vault: Option<Arc<Vault>>,
    log: Projection<NotificationBook>,
    /// Serialises the read-decide-append of acknowledgements, reports and answers, so a
    /// cursor never moves back and a notification is answered once.
    writes: Mutex<()>,
    closing: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Notifications {
    /// The service over `store`'s notification logs; `signals` must be those of the store
    /// the twins write through. Answers go to `system`'s customer twins.
    pub fn new(system: Arc<System>, store: Arc<dyn Store>, signals: Arc<LogSignals>) -> Self {
        Self {
            system,
            signals,
            vault: None,
            log: Projection::new(store, notifications_log, NOTIFICATION_RETENTION),
            writes: Mutex::new(()),
            closing: None,
        }
    }

    /// Reads recipients' addresses from the customers' personal records in `vault`.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = Some(vault);
        self
    }

    /// Ends every subscription stream when `closing` becomes true (the node's shutdown).
    pub fn with_shutdown(mut self, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    /// Ages notifications on `clock` (the node's): their expiry and their retention
    /// (without a clock neither is judged).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.log.set_clock(clock);
        self
    }

    async fn catch_up(&self, tenant: &str) -> Result<Arc<Mutex<Book<NotificationBook>>>, Status> {
        self.log.catch_up(tenant).await
    }

    /// Where `item` stands now: a pending notification past its expiry is EXPIRED.
    fn state(&self, item: &Item) -> i32 {
        if item.state == v1::NotificationState::Pending as i32 && self.expired(item) {
            v1::NotificationState::Expired as i32
        } else {
            item.state
        }
    }

    /// Whether `item`'s expiry has passed.
    fn expired(&self, item: &Item) -> bool {
        let Some(now) = self.log.aging_now() else {
            return false; // no clock to judge it by
        };
        matches!(&item.created, NotificationEvent::Created { expires_at_ms: Some(t), .. } if now >= *t)
    }

    async fn item(&self, tenant: &str, id: &str) -> Result<Option<Item>, Status> {
        let book = self.catch_up(tenant).await?;
        let b = &book.lock().await.state;
        Ok(b.items.get(id).cloned())
    }

    /// The contract's notification.
    async fn show(&self, item: &Item) -> Result<v1::Notification, Status> {
        let NotificationEvent::Created {
            notification_id,
            customer,
            channel,
            text,
            options,
            priority,
            question_id,
            at_ms,
            expires_at_ms,
        } = &item.created
        else {
            return Err(Status::internal("a notification starts with its creation"));
        };
        let channel_kind = channel_of(channel);
        let mut locale = String::new();
        let mut address = String::new();
        let mut verified = false;
        let mut text = text.clone();
        let mut response = item.response.clone();
        let mut customer_id = customer.clone();
        if let Some(vault) = &self.vault {
            text = vault.reveal(customer, &text).await.map_err(internal)?;
            if let Some(r) = response.as_mut() {
                r.free_text = vault
                    .reveal(customer, &r.free_text)
                    .await
                    .map_err(internal)?;
            }
            match vault.personal(customer).await.map_err(internal)? {
                Some(p) => {
                    locale = p.locale;
                    if let Some(c) = p
                        .contact_points
                        .iter()
                        .find(|c| channel_of(&c.channel) == channel_kind)
                    {
                        address = c.address.clone();
                        verified = c.verified;
                    }
                }
                // Erased: the entry stays in the log, but whose it was is not shown (as
                // for cases).
                None if vault.is_erased(customer).await.map_err(internal)? => {
                    customer_id.clear();
                    // Sealed text is unreadable already; text recorded before sealing
                    // began is hidden from every read all the same.
                    text = crate::pii::ERASED.to_owned();
                    if let Some(r) = response.as_mut()
                        && !r.free_text.is_empty()
                    {
                        r.free_text = crate::pii::ERASED.to_owned();
                    }
                }
                None => {}
            }
        }
        Ok(v1::Notification {
            notification_id: notification_id.clone(),
            customer_id,
            case_id: question_id
                .as_deref()
                .and_then(|q| q.rsplit_once('/'))
                .map(|(case, _)| case.to_owned())
                .unwrap_or_default(),
            recipient: Some(v1::ContactPoint {
                channel: channel_kind as i32,
                address,
                verified,
            }),
            priority: convert::priority(*priority) as i32,
            locale,
            title: title(channel_kind, *priority, question_id.as_deref()),
            body: text,
            options: options
                .iter()
                .map(|o| v1::ResponseOption {
                    option_id: o.clone(),
                    label: o.clone(),
                })
                .collect(),
            expires_at_ms: expires_at_ms.map(|t| t as i64),
            created_at_ms: *at_ms as i64,
            state: self.state(item),
            response,
        })
    }

    /// Every notification sent to `customer`, oldest first, as the contract shows it.
    pub(crate) async fn of_customer(
        &self,
        customer: &str,
    ) -> Result<Vec<v1::Notification>, Status> {
        let book = self.catch_up(tenant_of(customer)).await?;
        let items: Vec<Item> = {
            let b = &book.lock().await.state;
            b.order
                .values()
                .filter_map(|id| b.items.get(id))
                .filter(|i| {
                    matches!(&i.created, NotificationEvent::Created { customer: c, .. } if c == customer)
                })
                .cloned()
                .collect()
        };
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            out.push(self.show(item).await?);
        }
        Ok(out)
    }

    /// `text` as it goes into the log: sealed for `customer` when there is a vault, the
    /// erased marker when the customer is gone.
    async fn seal(&self, customer: &str, text: String) -> Result<String, Status> {
        match &self.vault {
            None => Ok(text),
            Some(_) if text.is_empty() => Ok(text),
            Some(v) => Ok(v
                .seal(customer, &text)
                .await
                .map_err(internal)?
                .unwrap_or_else(|| crate::pii::ERASED.to_owned())),
        }
    }

    async fn append(&self, tenant: &str, ev: &NotificationEvent) -> Result<u64, Status> {
        self.log.append(tenant, ev).await
    }

    /// Mails the customer's answer to their twin, which continues its playbook.
    async fn tell_customer(
        &self,
        tenant: &str,
        item: &Item,
        index: u64,
        answer: String,
    ) -> Result<(), Status> {
        let NotificationEvent::Created {
            customer,
            question_id: Some(question_id),
            ..
        } = &item.created
        else {
            return Ok(()); // nothing was asked: the answer is only recorded
        };
        let mail = Mail {
            // Numbered by the answer's log index: a retry re-sends the same mail, which
            // the twin takes once.
            id: format!("{tenant}:notifier/{index}"),
            from: Address::Notifier(tenant.to_owned()),
            to: Address::Customer(customer.clone()),
            body: Body::CustomerAnswer {
                question_id: question_id.clone(),
                answer,
            },
        };
        match self
            .system
            .customers()
            .call(customer, CustomerMsg::Mail(mail))
            .await
        {
            Ok(CustomerReply::Ok) => Ok(()),
            Ok(CustomerReply::Rejected(why)) => Err(Status::failed_precondition(why)),
            Err(e) => Err(internal(e)),
        }
    }
}

fn channel_of(name: &str) -> v1::Channel {
    match name {
        "email" => v1::Channel::Email,
        "sms" => v1::Channel::Sms,
        "push" => v1::Channel::Push,
        "phone" | "voice" => v1::Channel::Voice,
        "in_app" => v1::Channel::InApp,
        _ => v1::Channel::Unspecified,
    }
}

/// A caller's timestamp: not negative, and not ahead of `now` by more than a clock's skew
/// (a time in the future would also hold the entry past its retention).
fn check_time(what: &str, at_ms: i64, now: u64) -> Result<(), Status> {
    if at_ms < 0 || at_ms as u64 > now + MAX_SKEW_MS {
        return Err(Status::invalid_argument(format!(
            "{what} {at_ms} must be between 0 and now plus {MAX_SKEW_MS} ms"
        )));
    }
    Ok(())
}

fn check_name(what: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {max} printable characters, got {s:?}"
        )));
    }
    Ok(())
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<v1::NotificationDelivery, Status>> + Send>>;

/// The gRPC face of [`Notifications`].
#[derive(Clone)]
pub struct NotificationApi(pub Arc<Notifications>);

impl NotificationApi {
    async fn current(&self, p: &Principal, id: &str) -> Result<Item, Status> {
        p.own("notification", id)?;
        self.0
            .item(&p.tenant, id)
            .await?
            .ok_or_else(|| Status::not_found(format!("notification {id:?} not found")))
    }
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    type SubscribeNotificationsStream = DeliveryStream;

    async fn subscribe_notifications(
        &self,
        req: Request<v1::SubscribeNotificationsRequest>,
    ) -> Result<Response<DeliveryStream>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::NotificationsGateway)?;
        let r = req.into_inner();
        check_name("subscriber_id", &r.subscriber_id, 64)?;
        for c in &r.channels {
            if !matches!(v1::Channel::try_from(*c), Ok(ch) if ch != v1::Channel::Unspecified) {
                return Err(Status::invalid_argument(format!("invalid channel {c}")));
            }
        }
        let n = self.0.clone();
        let after = n
            .log
            .resume_after(
                &p.tenant,
                r.after_cursor,
                &subscriber_key(&p.tenant, &r.subscriber_id),
            )
            .await?;
        let channels = r.channels.clone();
        let log = notifications_log(&p.tenant);
        // Subscribe before the first read, so an append in between wakes the loop.
        let grew = n.signals.subscribe(&log);
        tracing::info!(tenant = %p.tenant, subscriber = %r.subscriber_id, after, "notification subscription");
        let tenant = p.tenant.clone();
        let (lister, shower) = (n.clone(), n.clone());
        let pending = move |cursor: u64| {
            let (n, tenant) = (lister.clone(), tenant.clone());
            async move {
                let book = n.catch_up(&tenant).await?;
                let b = &book.lock().await.state;
                Ok(b.order
                    .range(cursor + 1..)
                    .filter_map(|(i, id)| Some((*i, b.items.get(id)?.clone())))
                    .collect())
            }
        };
        let deliver = move |cursor: u64, item: Item| {
            let (n, channels) = (shower.clone(), channels.clone());
            async move {
                // Past its expiry and never taken: not delivered any more.
                if n.state(&item) == v1::NotificationState::Expired as i32 {
                    return Ok(None);
                }
                let shown = n.show(&item).await?;
                let channel = shown.recipient.as_ref().map_or(0, |c| c.channel);
                if !channels.is_empty() && !channels.contains(&channel) {
                    return Ok(None);
                }
                Ok(Some(v1::NotificationDelivery {
                    cursor,
                    notification: Some(shown),
                }))
            }
        };
        let rx = super::stream::follow(
            grew,
            n.closing.clone(),
            after,
            STREAM_BUFFER,
            pending,
            deliver,
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn acknowledge_notifications(
        &self,
        req: Request<v1::AcknowledgeNotificationsRequest>,
    ) -> Result<Response<v1::AcknowledgeNotificationsResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::NotificationsGateway)?;
        let r = req.into_inner();
        check_name("subscriber_id", &r.subscriber_id, 64)?;
        let acknowledged = self
            .0
            .log
            .acknowledge(
                &p.tenant,
                subscriber_key(&p.tenant, &r.subscriber_id),
                r.cursor,
            )
            .await?;
        Ok(Response::new(v1::AcknowledgeNotificationsResponse {
            acknowledged_cursor: acknowledged,
        }))
    }

    async fn report_delivery(
        &self,
        req: Request<v1::ReportDeliveryRequest>,
    ) -> Result<Response<v1::Notification>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::NotificationsGateway)?;
        let r = req.into_inner();
        use v1::NotificationState as S;
        match S::try_from(r.state) {
            Ok(S::Sent | S::Delivered | S::Read | S::Failed) => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "state must be SENT, DELIVERED, READ or FAILED, not {}",
                    r.state
                )));
            }
        }
        if r.detail.chars().count() > MAX_TEXT_CHARS {
            return Err(Status::invalid_argument(format!(
                "detail is over {MAX_TEXT_CHARS} characters"
            )));
        }
        check_time("at_ms", r.at_ms, self.0.log.now_ms())?;
        if r.idempotency_key.len() > 128 {
            return Err(Status::invalid_argument(
                "idempotency_key is over 128 bytes",
            ));
        }
        let _one_at_a_time = self.0.writes.lock().await;
        let item = self.current(&p, &r.notification_id).await?;
        let state = self.0.state(&item);
        if state != r.state {
            if !advances(state, r.state) {
                return Err(Status::failed_precondition(format!(
                    "notification {:?} is {}: states only move forward",
                    r.notification_id,
                    S::try_from(state).map_or("unknown", |s| s.as_str_name())
                )));
            }
            let at = if r.at_ms > 0 {
                r.at_ms as u64
            } else {
                self.0.log.now_ms()
            };
            let ev = NotificationEvent::Delivery {
                notification_id: r.notification_id.clone(),
                state: r.state,
                at_ms: at,
                detail: r.detail,
            };
            self.0.append(&p.tenant, &ev).await?;
        }
        let item = self.current(&p, &r.notification_id).await?;
        Ok(Response::new(self.0.show(&item).await?))
    }

    async fn record_response(
        &self,
        req: Request<v1::RecordResponseRequest>,
    ) -> Result<Response<v1::Notification>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::NotificationsGateway)?;
        let r = req.into_inner();
        check_name("idempotency_key", &r.idempotency_key, 128)?;
        let response = r
            .response
            .ok_or_else(|| Status::invalid_argument("response is required"))?;
        check_time(
            "responded_at_ms",
            response.responded_at_ms,
            self.0.log.now_ms(),
        )?;
        if response.free_text.chars().count() > MAX_TEXT_CHARS {
            return Err(Status::invalid_argument(format!(
                "free_text is over {MAX_TEXT_CHARS} characters"
            )));
        }
        let _one_at_a_time = self.0.writes.lock().await;
        let item = self.current(&p, &r.notification_id).await?;
        // A retry of the answer already taken: the same result, and the mail again (the
        // twin takes it once), in case the first call ended before it was sent.
        if let Some((index, key)) = &item.answer {
            if *key != r.idempotency_key {
                return Err(Status::failed_precondition(format!(
                    "notification {:?} was already answered",
                    r.notification_id
                )));
            }
            let shown = self.0.show(&item).await?;
            let answer = shown
                .response
                .as_ref()
                .map(|a| {
                    if a.option_id.is_empty() {
                        a.free_text.clone()
                    } else {
                        a.option_id.clone()
                    }
                })
                .unwrap_or_default();
            self.0
                .tell_customer(&p.tenant, &item, *index, answer)
                .await?;
            return Ok(Response::new(shown));
        }
        let NotificationEvent::Created {
            options,
            expires_at_ms,
            ..
        } = &item.created
        else {
            return Err(Status::internal("a notification starts with its creation"));
        };
        if let Some(t) = expires_at_ms
            && self.0.expired(&item)
        {
            return Err(Status::failed_precondition(format!(
                "notification {:?} expired at {t}: the answer is no longer taken",
                r.notification_id
            )));
        }
        if options.is_empty() {
            return Err(Status::failed_precondition(format!(
                "notification {:?} expects no answer",
                r.notification_id
            )));
        }
        let answer = if response.option_id.is_empty() {
            if response.free_text.trim().is_empty() {
                return Err(Status::invalid_argument(
                    "an answer needs an option_id or free_text",
                ));
            }
            response.free_text.clone()
        } else if options.contains(&response.option_id) {
            response.option_id.clone()
        } else {
            return Err(Status::invalid_argument(format!(
                "option_id {:?} is not one of {options:?}",
                response.option_id
            )));
        };
        let at = if response.responded_at_ms > 0 {
            response.responded_at_ms as u64
        } else {
            self.0.log.now_ms()
        };
        let NotificationEvent::Created { customer, .. } = &item.created else {
            return Err(Status::internal("a notification starts with its creation"));
        };
        // The customer's own words: sealed like the notification's text.
        let free_text = self.0.seal(customer, response.free_text).await?;
        let ev = NotificationEvent::Answered {
            notification_id: r.notification_id.clone(),
            option_id: response.option_id,
            free_text,
            at_ms: at,
            idempotency_key: r.idempotency_key,
        };
        let index = self.0.append(&p.tenant, &ev).await?;
        self.0
            .tell_customer(&p.tenant, &item, index, answer)
            .await?;
        let item = self.current(&p, &r.notification_id).await?;
        Ok(Response::new(self.0.show(&item).await?))
    }

    async fn list_notifications(
        &self,
        req: Request<v1::ListNotificationsRequest>,
    ) -> Result<Response<v1::ListNotificationsResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::NotificationsGateway)?;
        let r = req.into_inner();
        for s in &r.states {
            if !matches!(v1::NotificationState::try_from(*s), Ok(st) if st != v1::NotificationState::Unspecified)
            {
                return Err(Status::invalid_argument(format!("invalid state {s}")));
            }
        }
        let page = r.page.clone().unwrap_or_default();
        let size = match page.page_size {
            0 => 50,
            n => n.min(1000),
        } as usize;
        // Newest first: the token is the cursor to continue below.
        let below: u64 = if page.page_token.is_empty() {
            u64::MAX
        } else {
            page.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("invalid page_token"))?
        };
        let book = self.0.catch_up(&p.tenant).await?;
        let items: Vec<Item> = {
            let b = &book.lock().await.state;
            b.order
                .range(..below)
                .rev()
                .filter_map(|(_, id)| b.items.get(id).cloned())
                .collect()
        };
        let mut out = Vec::new();
        let mut next_page_token = String::new();
        for item in items {
            if out.len() == size {
                next_page_token = (item.cursor + 1).to_string();
                break;
            }
            let n = self.0.show(&item).await?;
            if (r.customer_id.is_empty() || n.customer_id == r.customer_id)
                && (r.case_id.is_empty() || n.case_id == r.case_id)
                && (r.states.is_empty() || r.states.contains(&n.state))
            {
                out.push(n);
            }
        }
        Ok(Response::new(v1::ListNotificationsResponse {
            notifications: out,
            page: Some(v1::PageResponse { next_page_token }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_split_from_the_text() {
        let (text, options) = split_options(
            "Is the fridge door closed properly? [It was open, I closed it / It was already closed]",
        );
        assert_eq!(text, "Is the fridge door closed properly?");
        assert_eq!(
            options,
            ["It was open, I closed it", "It was already closed"]
        );
        let (text, options) = split_options("Descaling done [sic");
        assert_eq!((text.as_str(), options.len()), ("Descaling done [sic", 0));
    }

    #[test]
    fn delivery_states_only_move_forward() {
        use v1::NotificationState as S;
        let a = |f: S, t: S| advances(f as i32, t as i32);
        assert!(a(S::Pending, S::Sent) && a(S::Sent, S::Delivered) && a(S::Delivered, S::Read));
        assert!(a(S::Pending, S::Delivered), "a skipped report is fine");
        assert!(!a(S::Read, S::Delivered) && !a(S::Delivered, S::Sent));
        assert!(a(S::Sent, S::Failed) && !a(S::Delivered, S::Failed) && !a(S::Failed, S::Sent));
    }
}
