//! `WorkService`: work orders, appointments, part orders and technicians over gRPC.
//!
//! The books are the tenant's desks: the repair scheduler keeps work orders, bookings
//! (appointments) and technicians' calendars, the parts desk keeps part orders. Reads look
//! at a desk's state; every change is mail to the desk, which decides (this module only
//! checks the request first, so a refusal names what is wrong with the right code). An
//! integrator's idempotency key becomes the desk's key (`api/<key>`, so it can never meet
//! a twin's key): a retried create finds the record made the first time.

use super::auth::{Principal, Scope};
use super::convert;
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::Twin;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::mail::{
    Address, Body, Mail, OrderProgress, PartOrderRequest, SlotRequest, SupplierState,
    WorkOrderRequest, WorkOrderState,
};
use caretwin_actors::model::{DAY_MS, Priority};
use caretwin_actors::services::Status as DeskStatus;
use caretwin_actors::services::Tenants;
use caretwin_actors::services::parts::{Order, OrderState, PartsDesk};
use caretwin_actors::services::scheduler::{
    Booking, MAX_PARTS, MAX_TEXT, Scheduler, SchedulerConfig, SlotError, SlotQuery, WorkOrder,
};
use caretwin_actors::system::System;
use caretwin_proto::v1::{self, work_service_server::WorkService};
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Longest idempotency key an integrator may give, in bytes.
const MAX_KEY: usize = 128;
/// Most units in one part order.
const MAX_QUANTITY: u32 = 1_000;
/// Longest range of a slot listing.
const MAX_RANGE_MS: u64 = 60 * DAY_MS;

/// The gRPC face of the tenant's parts desk and repair scheduler.
#[derive(Clone)]
pub struct WorkApi {
    system: Arc<System>,
    catalogue: Arc<Catalogue>,
    scheduler: Arc<Tenants<SchedulerConfig>>,
    clock: Arc<dyn Clock>,
}

use super::internal;

fn check_text(what: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {max} printable bytes, got {:?}",
            s.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// The desk's key of an integrator's idempotency key.
fn api_key(kind: &str, key: &str) -> String {
    format!("api/{kind}/{key}")
}

/// The integrator's key back from a desk's key (a twin's key is shown as it is).
fn shown_key(key: &str) -> String {
    key.strip_prefix("api/")
        .and_then(|k| k.split_once('/'))
        .map_or(key, |(_, k)| k)
        .to_owned()
}

fn priority_in(p: i32) -> Result<Priority, Status> {
    match v1::Priority::try_from(p) {
        Ok(v1::Priority::Unspecified | v1::Priority::Normal) => Ok(Priority::Normal),
        Ok(v1::Priority::Low) => Ok(Priority::Low),
        Ok(v1::Priority::High) => Ok(Priority::High),
        Ok(v1::Priority::Safety) => Ok(Priority::Safety),
        Err(_) => Err(Status::invalid_argument(format!("invalid priority {p}"))),
    }
}

fn work_state(s: WorkOrderState) -> v1::WorkOrderState {
    match s {
        WorkOrderState::Open => v1::WorkOrderState::Open,
        WorkOrderState::Scheduled => v1::WorkOrderState::Scheduled,
        WorkOrderState::InProgress => v1::WorkOrderState::InProgress,
        WorkOrderState::Completed => v1::WorkOrderState::Completed,
        WorkOrderState::Cancelled => v1::WorkOrderState::Cancelled,
    }
}

fn part_state(s: &OrderState) -> v1::PartOrderState {
    match s {
        OrderState::Waiting | OrderState::Backoff { .. } => v1::PartOrderState::Requested,
        OrderState::Placed { .. } => v1::PartOrderState::Confirmed,
        OrderState::Shipped { .. } => v1::PartOrderState::Shipped,
        OrderState::Delivered { .. } => v1::PartOrderState::Delivered,
        OrderState::Cancelled { .. } => v1::PartOrderState::Cancelled,
        OrderState::Failed { .. } => v1::PartOrderState::Failed,
    }
}

/// The tenant's supplier, as integrators name it.
fn supplier_id(tenant: &str) -> String {
    format!("{tenant}:supplier")
}

/// The price of `quantity` × `part_number` from the catalogue's list price (the first
/// model listing the part), if it has one and the total fits.
pub(crate) fn price(catalogue: &Catalogue, part_number: &str, quantity: u32) -> Option<v1::Money> {
    let unit = catalogue
        .models()
        .iter()
        .find_map(|m| m.part(part_number)?.price.as_ref())?;
    let total = unit.minor_units.checked_mul(u64::from(quantity))?;
    Some(v1::Money {
        currency: unit.currency.clone(),
        amount_minor: i64::try_from(total).ok()?,
    })
}

/// A part order as the contract shows it (`key` is the desk's key of the order), priced
/// from `catalogue`'s list prices.
pub(crate) fn to_part_order(
    catalogue: &Catalogue,
    tenant: &str,
    key: &str,
    o: &Order,
) -> v1::PartOrder {
    let (reference, arrives) = match &o.state {
        OrderState::Placed { arrives, detail } | OrderState::Shipped { arrives, detail } => {
            (detail.clone(), *arrives)
        }
        OrderState::Delivered { detail } => (detail.clone(), None),
        _ => (String::new(), None),
    };
    v1::PartOrder {
        part_order_id: o.id.clone(),
        idempotency_key: shown_key(key),
        item_kind: if o.consumable {
            v1::OrderItemKind::Consumable
        } else {
            v1::OrderItemKind::Part
        } as i32,
        part_number: o.part_number.clone(),
        quantity: o.quantity,
        device_id: o.device.clone(),
        customer_id: o.customer.clone(),
        case_id: o.case_id.clone(),
        work_order_id: o.work_order_id.clone(),
        supplier_id: supplier_id(tenant),
        supplier_reference: reference,
        state: part_state(&o.state) as i32,
        price: price(catalogue, &o.part_number, o.quantity),
        expected_delivery_at_ms: arrives.map(|t| t as i64),
        tracking_reference: o.tracking.clone(),
        // Orders kept from before orders recorded their creation show their last change.
        created_at_ms: if o.created == 0 { o.at } else { o.created } as i64,
        updated_at_ms: o.at as i64,
    }
}

/// A booking as the contract's appointment; `wo` is the work order it serves.
pub(crate) fn to_appointment(b: &Booking, wo: Option<&WorkOrder>) -> v1::Appointment {
    let state = if b.cancelled {
        v1::AppointmentState::Cancelled
    } else if wo.is_some_and(|w| w.state == WorkOrderState::Completed) {
        v1::AppointmentState::Completed
    } else if b.confirmed {
        v1::AppointmentState::Confirmed
    } else {
        v1::AppointmentState::Proposed
    };
    v1::Appointment {
        appointment_id: b.id.clone(),
        work_order_id: b.work_order.clone(),
        technician_id: b.technician.clone().unwrap_or_default(),
        slot: b.slot.map(|(s, e)| v1::TimeSlot {
            start_at_ms: s as i64,
            end_at_ms: e as i64,
        }),
        state: state as i32,
        parts: b
            .parts
            .iter()
            .map(|p| v1::PartReservation {
                part_order_id: p.clone(),
                ..Default::default()
            })
            .collect(),
        confirmed_at_ms: b.confirmed.then_some(b.at as i64),
    }
}

/// A work order as the contract shows it, with its current appointment.
pub(crate) fn to_work_order(s: &Scheduler, id: &str, w: &WorkOrder) -> v1::WorkOrder {
    let appointment = w
        .appointment
        .as_deref()
        .and_then(|k| s.booking(k))
        .map(|b| to_appointment(b, Some(w)));
    v1::WorkOrder {
        work_order_id: id.to_owned(),
        idempotency_key: shown_key(&w.key),
        case_id: w.case_id.clone(),
        customer_id: w.customer.clone(),
        device_id: w.device.clone(),
        site_id: w.site.clone(),
        failure_mode_id: w.failure_mode.clone(),
        description: w.description.clone(),
        priority: convert::priority(w.priority) as i32,
        state: work_state(w.state) as i32,
        appointment,
        part_order_ids: w.part_orders.clone(),
        created_at_ms: w.created as i64,
        updated_at_ms: w.updated as i64,
        completion_notes: w.notes.clone(),
    }
}

/// Fills in the parts of `appointments` from `orders` (part orders by id): part number,
/// quantity, expected arrival, and whether it has arrived (delivered).
pub(crate) fn fill_reservations(
    orders: &HashMap<String, v1::PartOrder>,
    appointments: &mut [v1::Appointment],
) {
    for r in appointments.iter_mut().flat_map(|a| a.parts.iter_mut()) {
        if let Some(o) = orders.get(&r.part_order_id) {
            r.part_number = o.part_number.clone();
            r.quantity = o.quantity;
            r.expected_arrival_at_ms = o.expected_delivery_at_ms.unwrap_or_default();
            r.reserved = o.state == v1::PartOrderState::Delivered as i32;
        }
    }
}

/// One page of `items` (already in order) by an offset token.
fn page<T>(
    items: Vec<T>,
    req: Option<v1::PageRequest>,
) -> Result<(Vec<T>, v1::PageResponse), Status> {
    let req = req.unwrap_or_default();
    let size = match req.page_size {
        0 => 50,
        n => n.min(1000),
    } as usize;
    let from: usize = if req.page_token.is_empty() {
        0
    } else {
        req.page_token
            .parse()
            .map_err(|_| Status::invalid_argument("invalid page_token"))?
    };
    let total = items.len();
    let out: Vec<T> = items.into_iter().skip(from).take(size).collect();
    let next = from + out.len();
    Ok((
        out,
        v1::PageResponse {
            next_page_token: if next < total {
                next.to_string()
            } else {
                String::new()
            },
        },
    ))
}

/// A device's customer, site and model, if it is provisioned.
struct DeviceInfo {
    customer: String,
    site: String,
    model: String,
}

impl WorkApi {
    /// Work over `system`'s desks; `scheduler` must be the settings the schedulers run
    /// with (technicians and working hours), `catalogue` the one devices are checked
    /// against, `clock` the system's clock.
    pub fn new(
        system: Arc<System>,
        catalogue: Arc<Catalogue>,
        scheduler: Arc<Tenants<SchedulerConfig>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            system,
            catalogue,
            scheduler,
            clock,
        }
    }

    async fn device(&self, p: &Principal, device: &str) -> Result<DeviceInfo, Status> {
        p.own("device", device)?;
        if device.len() > 256 {
            return Err(Status::invalid_argument("device_id is over 256 bytes"));
        }
        self.system
            .devices()
            .inspect(device, |t| {
                let t = t?;
                Some(DeviceInfo {
                    customer: t.customer()?.to_owned(),
                    site: t.site()?.to_owned(),
                    model: t.model()?.to_owned(),
                })
            })
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("device {device:?} not found")))
    }

    /// Looks at the tenant's scheduler (an empty one if it never existed).
    async fn scheduler<R: Send + 'static>(
        &self,
        tenant: &str,
        f: impl FnOnce(&Scheduler) -> R + Send + 'static,
    ) -> Result<R, Status> {
        let id = tenant.to_owned();
        self.system
            .scheduler()
            .inspect(tenant, move |s| match s {
                Some(s) => Ok(f(s)),
                // A tenant id no desk can have (tokens allow more than desks do).
                None => Scheduler::create(&id, &Tenants::default())
                    .map(|s| f(&s))
                    .map_err(|e| Status::failed_precondition(e.to_string())),
            })
            .await
            .map_err(internal)?
    }

    /// Looks at the tenant's parts desk (`None` if it never existed).
    async fn parts<R: Send + 'static>(
        &self,
        tenant: &str,
        f: impl FnOnce(Option<&PartsDesk>) -> R + Send + 'static,
    ) -> Result<R, Status> {
        self.system
            .parts()
            .inspect(tenant, f)
            .await
            .map_err(internal)
    }

    async fn work_order(&self, p: &Principal, id: &str) -> Result<v1::WorkOrder, Status> {
        p.own("work order", id)?;
        let wanted = id.to_owned();
        let mut wo = self
            .scheduler(&p.tenant, move |s| {
                s.work_order(&wanted).map(|w| to_work_order(s, &wanted, &w))
            })
            .await?
            .ok_or_else(|| Status::not_found(format!("work order {id:?} not found")))?;
        if let Some(a) = wo.appointment.as_mut() {
            self.fill_parts(&p.tenant, std::slice::from_mut(a)).await?;
        }
        Ok(wo)
    }

    /// Fills in the parts the technicians bring from the parts desk's orders: part number,
    /// quantity, expected arrival, and whether it has arrived (delivered).
    async fn fill_parts(
        &self,
        tenant: &str,
        appointments: &mut [v1::Appointment],
    ) -> Result<(), Status> {
        if appointments.iter().all(|a| a.parts.is_empty()) {
            return Ok(());
        }
        let orders: HashMap<String, v1::PartOrder> = {
            let (tenant, catalogue) = (tenant.to_owned(), self.catalogue.clone());
            self.parts(&tenant.clone(), move |d| {
                d.map(|d| {
                    d.orders()
                        .map(|(k, o)| (o.id.clone(), to_part_order(&catalogue, &tenant, k, o)))
                        .collect()
                })
                .unwrap_or_default()
            })
            .await?
        };
        fill_reservations(&orders, appointments);
        Ok(())
    }

    async fn part_order(&self, p: &Principal, id: &str) -> Result<v1::PartOrder, Status> {
        p.own("part order", id)?;
        let (wanted, tenant) = (id.to_owned(), p.tenant.clone());
        let catalogue = self.catalogue.clone();
        self.parts(&p.tenant, move |d| {
            d?.order_by_id(&wanted)
                .map(|(k, o)| to_part_order(&catalogue, &tenant, k, o))
        })
        .await?
        .ok_or_else(|| Status::not_found(format!("part order {id:?} not found")))
    }

    async fn appointment(&self, p: &Principal, id: &str) -> Result<v1::Appointment, Status> {
        p.own("appointment", id)?;
        let wanted = id.to_owned();
        let mut a = self
            .scheduler(&p.tenant, move |s| {
                s.appointment(&wanted)
                    .map(|(_, b)| to_appointment(b, s.work_order(&b.work_order).as_ref()))
            })
            .await?
            .ok_or_else(|| Status::not_found(format!("appointment {id:?} not found")))?;
        self.fill_parts(&p.tenant, std::slice::from_mut(&mut a))
            .await?;
        Ok(a)
    }

    /// Sends `body` to one of the tenant's desks (`to`), from `from`; the desk's answer as
    /// the call's status.
    async fn tell(
        &self,
        p: &Principal,
        what: String,
        from: Address,
        to: Address,
        body: Body,
    ) -> Result<(), Status> {
        let mail = Mail {
            id: format!("grpc/{}/{what}", p.name),
            from,
            to: to.clone(),
            body,
        };
        let r = match to {
            Address::Parts(t) => self.system.parts().call(&t, mail).await,
            Address::Scheduler(t) => self.system.scheduler().call(&t, mail).await,
            other => return Err(internal(format!("no desk at {other:?}"))),
        };
        match r {
            Ok(DeskStatus::Refused(why)) => Err(Status::invalid_argument(why)),
            Ok(DeskStatus::Ignored) => Err(Status::failed_precondition(
                "the request no longer fits the record's state",
            )),
            Ok(DeskStatus::Done | DeskStatus::Duplicate) => Ok(()),
            Err(caretwin_actors::Error::IdempotencyExists { .. }) => Err(Status::already_exists(
                "the idempotency key was used for a request that is no longer kept",
            )),
            Err(e) => Err(internal(e)),
        }
    }
}

#[tonic::async_trait]
impl WorkService for WorkApi {
    async fn create_work_order(
        &self,
        req: Request<v1::CreateWorkOrderRequest>,
    ) -> Result<Response<v1::WorkOrder>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkWrite)?;
        let r = req.into_inner();
        check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        let priority = priority_in(r.priority)?;
        if r.description.len() > MAX_TEXT {
            return Err(Status::invalid_argument(format!(
                "description is over {MAX_TEXT} bytes"
            )));
        }
        if !r.case_id.is_empty() {
            p.own("case", &r.case_id)?;
        }
        let key = api_key("wo", &r.idempotency_key);
        let existing = {
            let key = key.clone();
            self.scheduler(&p.tenant, move |s| {
                s.work_order_by_key(&key)
                    .map(|(id, w)| to_work_order(s, &id, &w))
            })
            .await?
        };
        if let Some(wo) = existing {
            return Ok(Response::new(wo));
        }
        let device = self.device(&p, &r.device_id).await?;
        if !r.failure_mode_id.is_empty()
            && self
                .catalogue
                .model(&device.model)
                .and_then(|m| m.failure_mode(&r.failure_mode_id))
                .is_none()
        {
            return Err(Status::invalid_argument(format!(
                "model {} has no failure mode {:?}",
                device.model, r.failure_mode_id
            )));
        }
        let body = Body::OpenWorkOrder(WorkOrderRequest {
            key: key.clone(),
            customer: device.customer,
            device: r.device_id,
            site: device.site,
            case_id: r.case_id,
            failure_mode: r.failure_mode_id,
            description: r.description,
            priority,
        });
        let desk = Address::Scheduler(p.tenant.clone());
        self.tell(&p, key.clone(), desk.clone(), desk, body).await?;
        let wo = self
            .scheduler(&p.tenant, move |s| {
                s.work_order_by_key(&key)
                    .map(|(id, w)| to_work_order(s, &id, &w))
            })
            .await?
            .ok_or_else(|| internal("the work order was taken but is not kept"))?;
        tracing::info!(tenant = %p.tenant, work_order = %wo.work_order_id, "work order created");
        Ok(Response::new(wo))
    }

    async fn get_work_order(
        &self,
        req: Request<v1::GetWorkOrderRequest>,
    ) -> Result<Response<v1::WorkOrder>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkRead)?;
        let r = req.into_inner();
        Ok(Response::new(self.work_order(&p, &r.work_order_id).await?))
    }

    async fn list_work_orders(
        &self,
        req: Request<v1::ListWorkOrdersRequest>,
    ) -> Result<Response<v1::ListWorkOrdersResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkRead)?;
        let r = req.into_inner();
        if let Some(s) = r
            .states
            .iter()
            .find(|s| v1::WorkOrderState::try_from(**s).is_err())
        {
            return Err(Status::invalid_argument(format!("invalid state {s}")));
        }
        let page_req = r.page.clone();
        let mut all = self
            .scheduler(&p.tenant, move |s| {
                s.work_orders()
                    .into_iter()
                    .map(|(id, w)| to_work_order(s, &id, &w))
                    .filter(|w| {
                        (r.states.is_empty() || r.states.contains(&w.state))
                            && (r.device_id.is_empty() || w.device_id == r.device_id)
                            && (r.customer_id.is_empty() || w.customer_id == r.customer_id)
                            && (r.case_id.is_empty() || w.case_id == r.case_id)
                            && (r.technician_id.is_empty()
                                || w.appointment
                                    .as_ref()
                                    .is_some_and(|a| a.technician_id == r.technician_id))
                            && r.updated_after_ms.is_none_or(|t| w.updated_at_ms >= t)
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        all.sort_by(|a, b| {
            (b.created_at_ms, &b.work_order_id).cmp(&(a.created_at_ms, &a.work_order_id))
        });
        let (mut work_orders, page) = page(all, page_req)?;
        let (at, mut appointments): (Vec<usize>, Vec<v1::Appointment>) = work_orders
            .iter_mut()
            .enumerate()
            .filter_map(|(i, w)| w.appointment.take().map(|a| (i, a)))
            .unzip();
        self.fill_parts(&p.tenant, &mut appointments).await?;
        for (i, a) in at.into_iter().zip(appointments) {
            work_orders[i].appointment = Some(a);
        }
        Ok(Response::new(v1::ListWorkOrdersResponse {
            work_orders,
            page: Some(page),
        }))
    }

    async fn update_work_order_state(
        &self,
        req: Request<v1::UpdateWorkOrderStateRequest>,
    ) -> Result<Response<v1::WorkOrder>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkWrite)?;
        let r = req.into_inner();
        let current = self.work_order(&p, &r.work_order_id).await?;
        let state = match v1::WorkOrderState::try_from(r.state) {
            Ok(v1::WorkOrderState::InProgress) => WorkOrderState::InProgress,
            Ok(v1::WorkOrderState::Completed) => WorkOrderState::Completed,
            Ok(v1::WorkOrderState::Cancelled) => WorkOrderState::Cancelled,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "state must be IN_PROGRESS, COMPLETED or CANCELLED, not {}",
                    r.state
                )));
            }
        };
        if r.notes.len() > MAX_TEXT {
            return Err(Status::invalid_argument(format!(
                "notes are over {MAX_TEXT} bytes"
            )));
        }
        if !r.idempotency_key.is_empty() {
            check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        }
        if current.state == work_state(state) as i32 {
            return Ok(Response::new(current));
        }
        let final_now = matches!(
            v1::WorkOrderState::try_from(current.state),
            Ok(v1::WorkOrderState::Completed | v1::WorkOrderState::Cancelled)
        );
        if final_now || current.state > work_state(state) as i32 {
            return Err(Status::failed_precondition(format!(
                "work order {:?} is {}, it cannot go back to {}",
                r.work_order_id,
                v1::WorkOrderState::try_from(current.state).map_or("unknown", |s| s.as_str_name()),
                work_state(state).as_str_name()
            )));
        }
        let body = Body::WorkOrderProgress {
            work_order_id: r.work_order_id.clone(),
            state,
            notes: r.notes,
        };
        let desk = Address::Scheduler(p.tenant.clone());
        let what = format!("{}/{}", r.work_order_id, r.idempotency_key);
        self.tell(&p, what, desk.clone(), desk, body).await?;
        Ok(Response::new(self.work_order(&p, &r.work_order_id).await?))
    }

    async fn book_appointment(
        &self,
        req: Request<v1::BookAppointmentRequest>,
    ) -> Result<Response<v1::Appointment>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkWrite)?;
        let r = req.into_inner();
        check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        let key = api_key("ap", &r.idempotency_key);
        let booked = {
            let key = key.clone();
            self.scheduler(&p.tenant, move |s| {
                s.booking(&key)
                    .map(|b| to_appointment(b, s.work_order(&b.work_order).as_ref()))
            })
            .await?
        };
        if let Some(mut a) = booked {
            self.fill_parts(&p.tenant, std::slice::from_mut(&mut a))
                .await?;
            return Ok(Response::new(a));
        }
        let wo = self.work_order(&p, &r.work_order_id).await?;
        check_text("technician_id", &r.technician_id, 256)?;
        let slot = r
            .slot
            .filter(|s| s.start_at_ms >= 0 && s.end_at_ms > s.start_at_ms)
            .map(|s| (s.start_at_ms as u64, s.end_at_ms as u64))
            .ok_or_else(|| Status::invalid_argument("slot must be set, start before end"))?;
        if r.part_order_ids.len() > MAX_PARTS {
            return Err(Status::invalid_argument(format!(
                "{} part orders, the limit is {MAX_PARTS}",
                r.part_order_ids.len()
            )));
        }
        for id in &r.part_order_ids {
            self.part_order(&p, id).await?;
        }
        if wo.state != v1::WorkOrderState::Open as i32 || wo.appointment.is_some() {
            return Err(Status::failed_precondition(format!(
                "work order {:?} is not open for booking",
                r.work_order_id
            )));
        }
        let config = self.scheduler.clone();
        let (tenant, tech, now) = (
            p.tenant.clone(),
            r.technician_id.clone(),
            self.clock.now_ms(),
        );
        let fits = self
            .scheduler(&p.tenant, move |s| {
                s.check_slot(config.get(&tenant), &tech, slot, now)
            })
            .await?;
        match fits {
            Ok(()) => {}
            Err(SlotError::Invalid(why)) => return Err(Status::invalid_argument(why)),
            Err(SlotError::Busy(why)) => {
                return Err(Status::failed_precondition(format!(
                    "slot is not free: {why}"
                )));
            }
        }
        let body = Body::BookSlot(SlotRequest {
            key: key.clone(),
            work_order_id: r.work_order_id,
            technician: r.technician_id,
            slot,
            part_orders: r.part_order_ids,
            confirmed: r.confirmed,
        });
        let desk = Address::Scheduler(p.tenant.clone());
        self.tell(&p, key.clone(), desk.clone(), desk, body).await?;
        let a = self
            .scheduler(&p.tenant, move |s| {
                s.booking(&key)
                    .map(|b| to_appointment(b, s.work_order(&b.work_order).as_ref()))
            })
            .await?
            .ok_or_else(|| internal("the appointment was taken but is not kept"))?;
        let mut a = a;
        self.fill_parts(&p.tenant, std::slice::from_mut(&mut a))
            .await?;
        tracing::info!(tenant = %p.tenant, appointment = %a.appointment_id, "appointment booked");
        Ok(Response::new(a))
    }

    async fn cancel_appointment(
        &self,
        req: Request<v1::CancelAppointmentRequest>,
    ) -> Result<Response<v1::Appointment>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkWrite)?;
        let r = req.into_inner();
        let current = self.appointment(&p, &r.appointment_id).await?;
        if r.reason.len() > MAX_TEXT {
            return Err(Status::invalid_argument(format!(
                "reason is over {MAX_TEXT} bytes"
            )));
        }
        if !r.idempotency_key.is_empty() {
            check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        }
        if current.state == v1::AppointmentState::Cancelled as i32 {
            return Ok(Response::new(current));
        }
        let body = Body::CancelBooking {
            appointment_id: r.appointment_id.clone(),
            reason: r.reason,
        };
        let desk = Address::Scheduler(p.tenant.clone());
        let what = format!("{}/cancel/{}", r.appointment_id, r.idempotency_key);
        self.tell(&p, what, desk.clone(), desk, body).await?;
        Ok(Response::new(
            self.appointment(&p, &r.appointment_id).await?,
        ))
    }

    async fn create_part_order(
        &self,
        req: Request<v1::CreatePartOrderRequest>,
    ) -> Result<Response<v1::PartOrder>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkWrite)?;
        let r = req.into_inner();
        check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        let key = api_key("po", &r.idempotency_key);
        let by_key = |key: String, tenant: String| {
            let catalogue = self.catalogue.clone();
            move |d: Option<&PartsDesk>| {
                d?.order(&key)
                    .map(|o| to_part_order(&catalogue, &tenant, &key, o))
            }
        };
        if let Some(o) = self
            .parts(&p.tenant, by_key(key.clone(), p.tenant.clone()))
            .await?
        {
            return Ok(Response::new(o));
        }
        let consumable = match v1::OrderItemKind::try_from(r.item_kind) {
            Ok(v1::OrderItemKind::Part) => false,
            Ok(v1::OrderItemKind::Consumable) => true,
            _ => {
                return Err(Status::invalid_argument(
                    "item_kind must be PART or CONSUMABLE",
                ));
            }
        };
        check_text("part_number", &r.part_number, 256)?;
        if r.quantity == 0 || r.quantity > MAX_QUANTITY {
            return Err(Status::invalid_argument(format!(
                "quantity must be 1 to {MAX_QUANTITY}, not {}",
                r.quantity
            )));
        }
        let device = self.device(&p, &r.device_id).await?;
        let known = self.catalogue.model(&device.model).is_some_and(|m| {
            m.part(&r.part_number).is_some()
                || m.consumables().iter().any(|c| c.part == r.part_number)
        });
        if !known {
            return Err(Status::invalid_argument(format!(
                "model {} has no part {:?}",
                device.model, r.part_number
            )));
        }
        if !r.case_id.is_empty() {
            p.own("case", &r.case_id)?;
        }
        if !r.work_order_id.is_empty() {
            self.work_order(&p, &r.work_order_id).await?;
        }
        let body = Body::PlaceOrder(PartOrderRequest {
            key: key.clone(),
            part_number: r.part_number,
            quantity: r.quantity,
            customer: device.customer,
            device: r.device_id,
            case_id: r.case_id,
            work_order_id: r.work_order_id,
            consumable,
        });
        let desk = Address::Parts(p.tenant.clone());
        self.tell(&p, key.clone(), desk.clone(), desk, body).await?;
        let o = self
            .parts(&p.tenant, by_key(key, p.tenant.clone()))
            .await?
            .ok_or_else(|| internal("the part order was taken but is not kept"))?;
        tracing::info!(tenant = %p.tenant, part_order = %o.part_order_id, "part order created");
        Ok(Response::new(o))
    }

    async fn get_part_order(
        &self,
        req: Request<v1::GetPartOrderRequest>,
    ) -> Result<Response<v1::PartOrder>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkRead)?;
        let r = req.into_inner();
        Ok(Response::new(self.part_order(&p, &r.part_order_id).await?))
    }

    async fn list_part_orders(
        &self,
        req: Request<v1::ListPartOrdersRequest>,
    ) -> Result<Response<v1::ListPartOrdersResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkRead)?;
        let r = req.into_inner();
        if let Some(s) = r
            .states
            .iter()
            .find(|s| v1::PartOrderState::try_from(**s).is_err())
        {
            return Err(Status::invalid_argument(format!("invalid state {s}")));
        }
        let page_req = r.page.clone();
        let (tenant, catalogue) = (p.tenant.clone(), self.catalogue.clone());
        let mut all = self
            .parts(&p.tenant, move |d| {
                let Some(d) = d else { return Vec::new() };
                d.orders()
                    .map(|(k, o)| to_part_order(&catalogue, &tenant, k, o))
                    .filter(|o| {
                        (r.states.is_empty() || r.states.contains(&o.state))
                            && (r.supplier_id.is_empty() || o.supplier_id == r.supplier_id)
                            && (r.device_id.is_empty() || o.device_id == r.device_id)
                            && (r.case_id.is_empty() || o.case_id == r.case_id)
                            && r.updated_after_ms.is_none_or(|t| o.updated_at_ms >= t)
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        all.sort_by(|a, b| {
            (b.created_at_ms, &b.part_order_id).cmp(&(a.created_at_ms, &a.part_order_id))
        });
        let (part_orders, page) = page(all, page_req)?;
        Ok(Response::new(v1::ListPartOrdersResponse {
            part_orders,
            page: Some(page),
        }))
    }

    async fn update_part_order_state(
        &self,
        req: Request<v1::UpdatePartOrderStateRequest>,
    ) -> Result<Response<v1::PartOrder>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::PartsWrite)?;
        let r = req.into_inner();
        let current = self.part_order(&p, &r.part_order_id).await?;
        let state = match v1::PartOrderState::try_from(r.state) {
            Ok(v1::PartOrderState::Confirmed) => SupplierState::Confirmed,
            Ok(v1::PartOrderState::Shipped) => SupplierState::Shipped,
            Ok(v1::PartOrderState::Delivered) => SupplierState::Delivered,
            Ok(v1::PartOrderState::Cancelled) => SupplierState::Cancelled,
            Ok(v1::PartOrderState::Failed) => SupplierState::Failed,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "state must be CONFIRMED, SHIPPED, DELIVERED, CANCELLED or FAILED, not {}",
                    r.state
                )));
            }
        };
        for (what, v) in [
            ("supplier_reference", &r.supplier_reference),
            ("tracking_reference", &r.tracking_reference),
        ] {
            if !v.is_empty() {
                check_text(what, v, 256)?;
            }
        }
        if !r.idempotency_key.is_empty() {
            check_text("idempotency_key", &r.idempotency_key, MAX_KEY)?;
        }
        let expected = match r.expected_delivery_at_ms {
            Some(t) if t < 0 => {
                return Err(Status::invalid_argument(
                    "expected_delivery_at_ms is negative",
                ));
            }
            t => t.map(|t| t as u64),
        };
        // Requested 1 … delivered 4; cancelled and failed end an order (cancelled only
        // before shipping), as the desk decides; checked here to say why.
        let rank = |s: i32| match v1::PartOrderState::try_from(s) {
            Ok(v1::PartOrderState::Cancelled | v1::PartOrderState::Failed) => 5,
            _ => s,
        };
        let (from, to) = (rank(current.state), rank(r.state));
        let same = current.state == r.state;
        let late_cancel = state == SupplierState::Cancelled && from > 2;
        if !same && (to <= from || late_cancel) {
            return Err(Status::failed_precondition(format!(
                "part order {:?} is {}, it cannot move to {}",
                r.part_order_id,
                v1::PartOrderState::try_from(current.state).map_or("unknown", |s| s.as_str_name()),
                v1::PartOrderState::try_from(r.state).map_or("unknown", |s| s.as_str_name()),
            )));
        }
        let body = Body::SupplierProgress(OrderProgress {
            part_order_id: r.part_order_id.clone(),
            state,
            supplier_reference: r.supplier_reference,
            expected_delivery_at_ms: expected,
            tracking_reference: r.tracking_reference,
        });
        let what = format!("{}/{}", r.part_order_id, r.idempotency_key);
        self.tell(
            &p,
            what,
            Address::Supplier(p.tenant.clone()),
            Address::Parts(p.tenant.clone()),
            body,
        )
        .await?;
        Ok(Response::new(self.part_order(&p, &r.part_order_id).await?))
    }

    async fn list_technicians(
        &self,
        req: Request<v1::ListTechniciansRequest>,
    ) -> Result<Response<v1::ListTechniciansResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkRead)?;
        let r = req.into_inner();
        let mut all: Vec<v1::Technician> = self
            .scheduler
            .get(&p.tenant)
            .technicians
            .iter()
            .filter(|t| r.skill.is_empty() || t.skills.contains(&r.skill))
            .filter(|t| r.region.is_empty() || t.regions.contains(&r.region))
            .map(|t| v1::Technician {
                technician_id: t.id.clone(),
                name: t.id.clone(),
                skills: t.skills.clone(),
                region: t.regions.join(","),
                active: true,
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let (technicians, page) = page(all, r.page)?;
        Ok(Response::new(v1::ListTechniciansResponse {
            technicians,
            page: Some(page),
        }))
    }

    async fn list_technician_slots(
        &self,
        req: Request<v1::ListTechnicianSlotsRequest>,
    ) -> Result<Response<v1::ListTechnicianSlotsResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::WorkRead)?;
        let r = req.into_inner();
        if r.from_ms < 0 || r.to_ms <= r.from_ms || (r.to_ms - r.from_ms) as u64 > MAX_RANGE_MS {
            return Err(Status::invalid_argument(
                "to_ms must be after from_ms, by at most 60 days",
            ));
        }
        let config = self.scheduler.clone();
        let (tenant, now) = (p.tenant.clone(), self.clock.now_ms());
        let page_req = r.page.clone();
        let slots = self
            .scheduler(&p.tenant, move |s| {
                let q = SlotQuery {
                    technician: (!r.technician_id.is_empty()).then_some(r.technician_id.as_str()),
                    skill: (!r.skill.is_empty()).then_some(r.skill.as_str()),
                    from: r.from_ms as u64,
                    to: r.to_ms as u64,
                    now,
                    free_only: r.free_only,
                };
                s.slots(config.get(&tenant), &q)
                    .into_iter()
                    .map(|e| v1::CalendarSlot {
                        technician_id: e.technician,
                        slot: Some(v1::TimeSlot {
                            start_at_ms: e.slot.0 as i64,
                            end_at_ms: e.slot.1 as i64,
                        }),
                        state: match (&e.appointment, e.confirmed) {
                            (None, _) => v1::SlotState::Free,
                            (Some(_), true) => v1::SlotState::Booked,
                            (Some(_), false) => v1::SlotState::Held,
                        } as i32,
                        appointment_id: e.appointment.unwrap_or_default(),
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        let (slots, page) = page(slots, page_req)?;
        Ok(Response::new(v1::ListTechnicianSlotsResponse {
            slots,
            page: Some(page),
        }))
    }
}
