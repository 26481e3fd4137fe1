//! Outbound integrations: the node's gRPC clients of a parts supplier and of a
//! field-service scheduler (contract: `caretwin/v1/integrations.proto`), wrapped as a
//! [`Router`] for the mail the desks send out.
//!
//! # Exactly once across crashes
//! Mail reaches [`Integrations`] at least once (the dispatcher removes it from its outbox
//! only after a delivery succeeded). Each effect has an idempotency record in the store,
//! `integration/supplier/<tenant>/<key>` or `integration/field-service/<tenant>/<key>`:
//!
//! 1. **Intent**, written before the call: which mail (attempt) is calling.
//! 2. The call, under the effect's idempotency key, retried with backoff while the
//!    partner is unavailable.
//! 3. **Outcome**, written over the intent once the partner answered.
//! 4. The answer goes to the desk (parts) or the customer (bookings) as mail.
//!
//! A crash after 3 replays the recorded outcome on redelivery, with no call. A crash
//! between 1 and 3 (or the partner's crash after it recorded but before it answered)
//! calls again with the same key, which the partner must honour (the contract says so):
//! one order, one visit, however often the mail comes. If the partner stays unavailable
//! the mail is given back (`Err`), and delivered again on a later round.
//!
//! A business "no" (out of stock) is an answer: the desk gets `SupplierResult { accepted:
//! false }` and its own backoff, on durable timers, decides when to order again. A request
//! the partner refuses outright (INVALID_ARGUMENT, ALREADY_EXISTS, credentials) is
//! answered the same way, so it cannot block the desk's outbox.
//!
//! # Layout
//! - [`Integrations`] — the router; [`start`] builds it from `[integrations]`.
//! - [`client`] — channels, tokens, retries.
//! - [`supplier`] — [`supplier::InProcessSupplier`], the built-in supplier.
//! - [`field_service`] — [`field_service::InProcessFieldService`], the built-in field
//!   service (the scheduler desk's deciding code behind gRPC).

pub mod client;
pub mod field_service;
pub mod supplier;

use crate::config::{FieldServiceChoice, IntegrationsConfig, SupplierChoice};
use crate::{Error, Result};
use caretwin_actors::host::clock::Clock;
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::mail::{Address, Body, Mail, PartnerVisit, tenant_of};
use caretwin_actors::services::scheduler::SchedulerConfig;
use caretwin_actors::services::{MAX_KEY_LEN, Status, Tenants};
use caretwin_actors::store::{IdempotencyMode, Key, Op, Store, WriteBatch};
use caretwin_actors::system::System;
use caretwin_actors::twins::customer::{CustomerMsg, CustomerReply};
use caretwin_proto::v1::field_service_server::FieldServiceServer;
use caretwin_proto::v1::parts_supplier_server::PartsSupplierServer;
use caretwin_proto::v1::{
    BookFieldAppointmentRequest, PlaceOrderRequest, TimeSlot, book_field_appointment_response,
    place_order_response,
};
use client::{CallError, FieldServiceLink, Link, SupplierLink};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};

/// An idempotency record: the attempt that called, and what the partner answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "O: Deserialize<'de>"))]
struct Record<O> {
    /// Id of the mail (the desk's attempt) that made the latest call.
    mail: String,
    /// `None`: the intent only; the call's outcome is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<O>,
}

/// What the supplier answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderOutcome {
    accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    arrives_at_ms: Option<u64>,
    detail: String,
}

/// What the field service answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BookingOutcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    technician: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slot: Option<(u64, u64)>,
    detail: String,
}

/// What the field service answered to a cancellation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CancelOutcome {
    cancelled: bool,
    detail: String,
}

/// The store key of an effect's idempotency record.
pub fn record_key(partner: &str, tenant: &str, key: &str) -> Key {
    Key::new(format!("integration/{partner}/{tenant}/{key}"))
}

/// Routes supplier orders (and, when configured, bookings) to the partners over gRPC;
/// everything else to `rest`.
pub struct Integrations {
    store: Arc<dyn Store>,
    supplier: Option<SupplierLink>,
    field_service: Option<FieldServiceLink>,
    rest: Arc<dyn Router>,
    /// The desks that take the answers; bound once the system runs (it is built with
    /// this router inside, hence the late, weak link).
    desks: OnceLock<Weak<System>>,
}

impl Integrations {
    /// A router that records effects in `store` and sends what it does not handle to
    /// `rest`; with no link added it handles nothing.
    pub fn new(store: Arc<dyn Store>, rest: Arc<dyn Router>) -> Self {
        Self {
            store,
            supplier: None,
            field_service: None,
            rest,
            desks: OnceLock::new(),
        }
    }

    /// Sends `SupplierOrder` mail to this supplier.
    pub fn with_supplier(mut self, link: Link) -> Self {
        self.supplier = Some(SupplierLink(link));
        self
    }

    /// Sends `Book` mail to this field service.
    pub fn with_field_service(mut self, link: Link) -> Self {
        self.field_service = Some(FieldServiceLink(link));
        self
    }

    /// Whether bookings go to a field service (then give this router to
    /// [`System::start_with_field_service`]).
    pub fn books_visits(&self) -> bool {
        self.field_service.is_some()
    }

    /// Binds the desks that take the partners' answers. Until then (and after the system
    /// is gone) deliveries fail and are retried later.
    pub fn bind(&self, system: &Arc<System>) {
        let _ = self.desks.set(Arc::downgrade(system));
    }

    fn system(&self) -> caretwin_actors::Result<Arc<System>> {
        self.desks
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| caretwin_actors::Error::Host("the desks are not running".into()))
    }

    async fn read<O: for<'de> Deserialize<'de>>(
        &self,
        key: &Key,
    ) -> caretwin_actors::Result<Option<Record<O>>> {
        let Some(bytes) = self.store.idempotency(key).await? else {
            return Ok(None);
        };
        // A record this version cannot read is treated as an intent: calling again with
        // the same key is always safe.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    async fn write<O: Serialize>(
        &self,
        key: &Key,
        record: &Record<O>,
    ) -> caretwin_actors::Result<()> {
        let value = serde_json::to_vec(record).expect("records are plain data");
        self.store
            .commit(WriteBatch::new().with(Op::PutIdempotency {
                key: key.clone(),
                value,
                mode: IdempotencyMode::Overwrite,
            }))
            .await?;
        Ok(())
    }

    /// Intent, call, outcome: the recorded outcome if there is one that answers this
    /// mail, else a call whose outcome is recorded; `Err` if the partner is unavailable.
    async fn once<O, F, Fut>(
        &self,
        key: &Key,
        mail_id: &str,
        replay: impl Fn(&Record<O>) -> bool,
        call: F,
    ) -> caretwin_actors::Result<O>
    where
        O: Clone + Serialize + for<'de> Deserialize<'de>,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<O, String>>,
    {
        if let Some(record) = self.read::<O>(key).await?
            && let Some(outcome) = &record.outcome
            && replay(&record)
        {
            tracing::debug!(record = %key, mail = mail_id, "outcome replayed, no call");
            return Ok(outcome.clone());
        }
        let intent = Record::<O> {
            mail: mail_id.to_owned(),
            outcome: None,
        };
        self.write(key, &intent).await?;
        let outcome = call().await.map_err(caretwin_actors::Error::Host)?;
        let record = Record {
            mail: mail_id.to_owned(),
            outcome: Some(outcome.clone()),
        };
        self.write(key, &record).await?;
        Ok(outcome)
    }

    async fn place_order(
        &self,
        link: &SupplierLink,
        mail: Mail,
    ) -> caretwin_actors::Result<Delivery> {
        let Body::SupplierOrder {
            key,
            part_number,
            quantity,
            device,
        } = &mail.body
        else {
            return Ok(Delivery::Rejected(format!(
                "the supplier takes orders only, not mail {}",
                mail.id
            )));
        };
        let tenant = mail.to.tenant().to_owned();
        if let Err(why) = check_key(key) {
            return Ok(Delivery::Rejected(why));
        }
        let record = record_key("supplier", &tenant, key);
        let request = PlaceOrderRequest {
            idempotency_key: key.clone(),
            tenant: tenant.clone(),
            part_number: part_number.clone(),
            quantity: *quantity,
            deliver_to: self.site_of(&tenant, device).await?,
        };
        // An acceptance is final for the key, whichever attempt got it; a refusal
        // answers only the attempt that asked (the desk's next attempt asks again).
        let replay = |r: &Record<OrderOutcome>| {
            r.mail == mail.id || r.outcome.as_ref().is_some_and(|o| o.accepted)
        };
        let outcome = self
            .once(&record, &mail.id, replay, || async {
                match link.place_order(request).await {
                    Ok(answer) => Ok(order_outcome(answer.outcome)),
                    Err(CallError::Unavailable(why)) => Err(format!("supplier: {why}")),
                    Err(e @ CallError::Refused { .. }) => {
                        tracing::warn!(tenant = %tenant, key = %key, error = %e, "the supplier refused the request");
                        Ok(OrderOutcome {
                            accepted: false,
                            arrives_at_ms: None,
                            detail: format!("the supplier refused the request: {e}"),
                        })
                    }
                }
            })
            .await?;
        tracing::info!(tenant = %tenant, key = %key, accepted = outcome.accepted, detail = %outcome.detail, "supplier answered");
        let answer = Mail {
            // One answer per attempt: the desk tells a late answer of an earlier attempt
            // from the current one by this id.
            id: format!("{tenant}/supplier/{}", mail.id),
            from: Address::Supplier(tenant.clone()),
            to: Address::Parts(tenant.clone()),
            body: Body::SupplierResult {
                key: key.clone(),
                accepted: outcome.accepted,
                arrives_at_ms: outcome.arrives_at_ms,
                detail: outcome.detail,
            },
        };
        match self.system()?.parts().call(&tenant, answer).await {
            Ok(Status::Refused(why)) => Ok(Delivery::Rejected(why)),
            Ok(_) | Err(caretwin_actors::Error::IdempotencyExists { .. }) => {
                Ok(Delivery::Delivered)
            }
            Err(e) => Err(e),
        }
    }

    /// Where the supplier delivers an order for `device`: its site, as the device twin
    /// knows it (a pseudonymous reference the supplier resolves, no address); empty (the
    /// tenant's default depot) when the device is unknown, of another tenant, or
    /// detached by an erasure.
    async fn site_of(&self, tenant: &str, device: &str) -> caretwin_actors::Result<String> {
        if device.is_empty() || tenant_of(device) != tenant {
            return Ok(String::new());
        }
        let device = device.to_owned();
        let site = self
            .system()?
            .devices()
            .inspect(&device, |d| {
                d.and_then(|d| d.site())
                    .map(str::to_owned)
                    .unwrap_or_default()
            })
            .await?;
        Ok(site)
    }

    async fn book(&self, link: &FieldServiceLink, mail: Mail) -> caretwin_actors::Result<Delivery> {
        let Body::Book {
            key,
            customer,
            case_id,
            skill,
            region,
            not_before_ms,
            windows,
            duration_ms,
            confirmed,
        } = &mail.body
        else {
            return Ok(Delivery::Rejected(format!(
                "the field service takes bookings only, not mail {}",
                mail.id
            )));
        };
        let tenant = mail.to.tenant().to_owned();
        if let Err(why) = check_key(key) {
            return Ok(Delivery::Rejected(why));
        }
        if tenant_of(customer) != tenant || !customer.contains(':') {
            return Ok(Delivery::Rejected(format!(
                "booking {key:?} is for customer {customer:?}, not one of tenant {tenant}"
            )));
        }
        let record = record_key("field-service", &tenant, key);
        let clamp = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
        let request = BookFieldAppointmentRequest {
            idempotency_key: key.clone(),
            tenant: tenant.clone(),
            skill: skill.clone(),
            region: region.clone(),
            not_before_ms: clamp(*not_before_ms),
            windows: windows
                .iter()
                .map(|&(s, e)| TimeSlot {
                    start_at_ms: clamp(s),
                    end_at_ms: clamp(e),
                })
                .collect(),
            duration_ms: clamp(*duration_ms),
            customer_ref: customer.clone(),
            case_ref: case_id.clone(),
        };
        // A booking's answer, success or failure, is final for its key.
        let outcome = self
            .once(&record, &mail.id, |_| true, || async {
                match link.book(request).await {
                    Ok(answer) => Ok(booking_outcome(answer.outcome)),
                    Err(CallError::Unavailable(why)) => Err(format!("field service: {why}")),
                    Err(e @ CallError::Refused { .. }) => {
                        tracing::warn!(tenant = %tenant, key = %key, error = %e, "the field service refused the request");
                        Ok(BookingOutcome {
                            technician: None,
                            slot: None,
                            detail: format!("the field service refused the request: {e}"),
                        })
                    }
                }
            })
            .await?;
        tracing::info!(tenant = %tenant, key = %key, technician = ?outcome.technician, detail = %outcome.detail, "field service answered");
        if let (Some(technician), Some(slot)) = (&outcome.technician, outcome.slot) {
            // The tenant's appointments include the partner's visits (and a cancellation
            // there comes back here as `CancelVisit`); kept before the customer is told,
            // so a confirmation finds it.
            let booked = Mail {
                id: format!("{tenant}/field-service/{key}/booked"),
                from: Address::FieldService(tenant.clone()),
                to: Address::Scheduler(tenant.clone()),
                body: Body::PartnerBooked(PartnerVisit {
                    key: key.clone(),
                    customer: customer.clone(),
                    case_id: case_id.clone(),
                    technician: technician.clone(),
                    slot,
                    reference: outcome.detail.clone(),
                    confirmed: *confirmed,
                }),
            };
            match self.system()?.scheduler().call(&tenant, booked).await {
                Ok(Status::Refused(why)) => {
                    tracing::warn!(tenant = %tenant, key = %key, reason = %why, "the scheduler did not keep the partner's visit");
                }
                Ok(_) | Err(caretwin_actors::Error::IdempotencyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let answer = Mail {
            // Not of the `sender/number` form, so the customer twin does not track a
            // sequence per booking; its Booking handling is idempotent by key.
            id: format!("{tenant}/field-service/{key}/booking"),
            from: Address::Scheduler(tenant.clone()),
            to: Address::Customer(customer.clone()),
            body: Body::Booking {
                key: key.clone(),
                technician: outcome.technician,
                slot: outcome.slot,
                detail: outcome.detail,
            },
        };
        let reply = self
            .system()?
            .customers()
            .call(customer, CustomerMsg::Mail(answer))
            .await;
        match reply {
            Ok(CustomerReply::Rejected(why)) => Ok(Delivery::Rejected(why)),
            Ok(CustomerReply::Ok) | Err(caretwin_actors::Error::IdempotencyExists { .. }) => {
                Ok(Delivery::Delivered)
            }
            Err(e) => Err(e),
        }
    }
}

impl Integrations {
    /// Cancels at the partner a visit it booked (the scheduler's `CancelVisit`): intent,
    /// call, outcome like a booking, so the partner is asked again only while no answer
    /// is recorded, and frees the slot once per key whatever the retries.
    async fn cancel_visit(
        &self,
        link: &FieldServiceLink,
        mail: Mail,
    ) -> caretwin_actors::Result<Delivery> {
        let Body::CancelVisit { key, reason } = &mail.body else {
            return Ok(Delivery::Rejected(format!(
                "the field service takes cancellations only, not mail {}",
                mail.id
            )));
        };
        let tenant = mail.to.tenant().to_owned();
        if let Err(why) = check_key(key) {
            return Ok(Delivery::Rejected(why));
        }
        let record = record_key("field-service-cancel", &tenant, key);
        let outcome = self
            .once(
                &record,
                &mail.id,
                |_| true,
                || async {
                    match link.cancel(&tenant, key).await {
                        Ok(answer) => Ok(CancelOutcome {
                            cancelled: answer.cancelled,
                            detail: answer.detail,
                        }),
                        Err(CallError::Unavailable(why)) => Err(format!("field service: {why}")),
                        // NOT_FOUND (the partner forgot the key) and other refusals are
                        // answers: asking again will not help.
                        Err(e @ CallError::Refused { .. }) => Ok(CancelOutcome {
                            cancelled: false,
                            detail: format!("the field service refused the cancellation: {e}"),
                        }),
                    }
                },
            )
            .await?;
        tracing::info!(tenant = %tenant, key = %key, reason = %reason, cancelled = outcome.cancelled, detail = %outcome.detail, "field service cancelled a visit");
        Ok(Delivery::Delivered)
    }
}

fn check_key(key: &str) -> std::result::Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.contains('\0') {
        return Err(format!(
            "idempotency key of {} bytes must be 1..={MAX_KEY_LEN} without NUL",
            key.len()
        ));
    }
    Ok(())
}

fn order_outcome(outcome: Option<place_order_response::Outcome>) -> OrderOutcome {
    match outcome {
        Some(place_order_response::Outcome::Accepted(order)) => OrderOutcome {
            accepted: true,
            arrives_at_ms: u64::try_from(order.arrives_at_ms).ok().filter(|&t| t > 0),
            detail: if order.supplier_reference.is_empty() {
                "accepted by the supplier".to_owned()
            } else {
                order.supplier_reference
            },
        },
        Some(place_order_response::Outcome::Refused(r)) => OrderOutcome {
            accepted: false,
            arrives_at_ms: None,
            detail: r.reason,
        },
        None => OrderOutcome {
            accepted: false,
            arrives_at_ms: None,
            detail: "the supplier answered neither accepted nor refused".to_owned(),
        },
    }
}

fn booking_outcome(outcome: Option<book_field_appointment_response::Outcome>) -> BookingOutcome {
    let failed = |detail: String| BookingOutcome {
        technician: None,
        slot: None,
        detail,
    };
    match outcome {
        Some(book_field_appointment_response::Outcome::Booked(a)) => {
            let slot = a.slot.and_then(|s| {
                let (start, end) = (
                    u64::try_from(s.start_at_ms).ok()?,
                    u64::try_from(s.end_at_ms).ok()?,
                );
                (start < end).then_some((start, end))
            });
            match slot {
                Some(slot) if !a.technician.is_empty() => BookingOutcome {
                    technician: Some(a.technician),
                    slot: Some(slot),
                    detail: a.work_order_ref,
                },
                _ => failed("the field service booked no technician or no valid slot".into()),
            }
        }
        Some(book_field_appointment_response::Outcome::FailureReason(why)) => failed(why),
        None => failed("the field service answered neither booked nor failed".into()),
    }
}

#[async_trait::async_trait]
impl Router for Integrations {
    async fn deliver(&self, mail: Mail) -> caretwin_actors::Result<Delivery> {
        match (&mail.to, &self.supplier, &self.field_service) {
            (Address::Supplier(_), Some(link), _) => self.place_order(link, mail).await,
            (Address::Scheduler(_), _, Some(link)) if matches!(mail.body, Body::Book { .. }) => {
                self.book(link, mail).await
            }
            (Address::FieldService(_), _, Some(link)) => self.cancel_visit(link, mail).await,
            _ => self.rest.deliver(mail).await,
        }
    }
}

/// A stand-in served on loopback; it stops when this is dropped.
pub struct Loopback {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Loopback {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serves `routes` over plain gRPC on 127.0.0.1 (any free port) until the returned
/// handle is dropped.
pub async fn serve_loopback(routes: tonic::service::Routes) -> Result<Loopback> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| Error::Config(format!("loopback endpoint: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("loopback endpoint: {e}")))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(%addr, error = %e, "built-in partner endpoint failed");
        }
    });
    Ok(Loopback { addr, _stop: stop })
}

/// The integrations of a node, built from `[integrations]`.
pub struct Started {
    /// The router: give it to the system as `outside` (and as field service when
    /// [`Integrations::books_visits`]), then [`Integrations::bind`] the system.
    pub router: Arc<Integrations>,
    /// The built-in supplier, when it serves.
    pub supplier: Option<Arc<supplier::InProcessSupplier>>,
    /// The built-in field service, when it serves.
    pub field_service: Option<Arc<field_service::InProcessFieldService>>,
    /// The built-in partners' endpoints; they stop when this is dropped.
    pub servers: Vec<Loopback>,
}

impl Started {
    /// The router to give the system as its field service
    /// ([`System::start_with_field_service`]), when visits are booked with a partner.
    pub fn booking_router(&self) -> Option<Arc<dyn Router>> {
        self.router
            .books_visits()
            .then(|| self.router.clone() as Arc<dyn Router>)
    }
}

/// Starts the built-in partners that `config` chooses and builds the router, with `rest`
/// for the mail it does not handle. The field service's built-in books with `technicians`
/// (the scheduler desk's settings).
pub async fn start(
    config: &IntegrationsConfig,
    technicians: &Tenants<SchedulerConfig>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    rest: Arc<dyn Router>,
) -> Result<Started> {
    config.validate()?;
    let mut servers = Vec::new();
    let mut builtin_supplier = None;
    let supplier_link = match &config.supplier {
        SupplierChoice::Builtin => {
            let s = Arc::new(supplier::InProcessSupplier::new(
                config.builtin_supplier.clone(),
                clock.clone(),
            ));
            let server = serve_loopback(tonic::service::Routes::new(
                PartsSupplierServer::from_arc(s.clone()),
            ))
            .await?;
            tracing::info!(addr = %server.addr(), "built-in supplier serving on loopback");
            let link = Link::loopback_connected("supplier", server.addr(), &config.retry).await?;
            builtin_supplier = Some(s);
            servers.push(server);
            link
        }
        SupplierChoice::Remote(remote) => Link::remote("supplier", remote, &config.retry)?,
    };
    let mut router = Integrations::new(store, rest).with_supplier(supplier_link);
    let mut builtin_field_service = None;
    let field_service_link = match &config.field_service {
        FieldServiceChoice::Desk => None,
        FieldServiceChoice::Builtin => {
            let fs = Arc::new(field_service::InProcessFieldService::new(
                technicians.clone(),
                clock,
            ));
            let server = serve_loopback(tonic::service::Routes::new(FieldServiceServer::from_arc(
                fs.clone(),
            )))
            .await?;
            tracing::info!(addr = %server.addr(), "built-in field service serving on loopback");
            let link =
                Link::loopback_connected("field_service", server.addr(), &config.retry).await?;
            builtin_field_service = Some(fs);
            servers.push(server);
            Some(link)
        }
        FieldServiceChoice::Remote(remote) => {
            Some(Link::remote("field_service", remote, &config.retry)?)
        }
    };
    if let Some(link) = field_service_link {
        router = router.with_field_service(link);
    }
    Ok(Started {
        router: Arc::new(router),
        supplier: builtin_supplier,
        field_service: builtin_field_service,
        servers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rest;

    #[async_trait::async_trait]
    impl Router for Rest {
        async fn deliver(&self, _: Mail) -> caretwin_actors::Result<Delivery> {
            Ok(Delivery::Delivered)
        }
    }

    #[tokio::test]
    async fn the_configuration_chooses_the_partners() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::EmbeddedStore::open(&crate::store::EmbeddedConfig::at(dir.path()))
                .unwrap(),
        );
        let clock: Arc<dyn Clock> = Arc::new(caretwin_actors::host::clock::ManualClock::new(0));
        let technicians = Tenants::<SchedulerConfig>::default();
        let defaults = IntegrationsConfig::default();
        let s = start(
            &defaults,
            &technicians,
            store.clone(),
            clock.clone(),
            Arc::new(Rest),
        )
        .await
        .unwrap();
        assert!(s.supplier.is_some() && s.field_service.is_none());
        assert!(!s.router.books_visits(), "the desk books by default");
        assert_eq!(s.servers.len(), 1);
        let both = IntegrationsConfig {
            field_service: FieldServiceChoice::Builtin,
            ..IntegrationsConfig::default()
        };
        let s = start(&both, &technicians, store, clock, Arc::new(Rest))
            .await
            .unwrap();
        assert!(s.field_service.is_some() && s.router.books_visits());
        assert_ne!(s.servers[0].addr(), s.servers[1].addr());
    }

    #[test]
    fn records_round_trip_and_outcomes_map() {
        let r = Record {
            mail: "t1/parts/3".into(),
            outcome: Some(OrderOutcome {
                accepted: true,
                arrives_at_ms: Some(7),
                detail: "SO-1".into(),
            }),
        };
        let bytes = serde_json::to_vec(&r).unwrap();
        assert_eq!(
            serde_json::from_slice::<Record<OrderOutcome>>(&bytes).unwrap(),
            r
        );
        let intent: Record<OrderOutcome> =
            serde_json::from_slice(br#"{"mail":"t1/parts/3"}"#).unwrap();
        assert_eq!(intent.outcome, None);
        assert_eq!(
            record_key("supplier", "t1", "case-1/PUMP").as_str(),
            "integration/supplier/t1/case-1/PUMP"
        );

        assert!(!order_outcome(None).accepted);
        let bad = booking_outcome(Some(book_field_appointment_response::Outcome::Booked(
            caretwin_proto::v1::FieldAppointment {
                technician: "tech-1".into(),
                slot: Some(TimeSlot {
                    start_at_ms: 10,
                    end_at_ms: 5,
                }),
                work_order_ref: "wo".into(),
            },
        )));
        assert_eq!(bad.slot, None, "an empty slot is no booking");
        assert!(check_key("").is_err() && check_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
    }
}
