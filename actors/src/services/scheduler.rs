//! The repair scheduler: a tenant's technicians, their working hours and calendars.
//!
//! [`Body::Book`] asks for the **earliest** slot at or after `not_before_ms` (and not in
//! the past) that a technician with the skill, covering the region, can take inside their
//! working hours, inside one of the customer's availability windows (none given: any
//! time), without overlapping that technician's other visits. Slots start on a grid of
//! `slot` from the start of the working day. Among technicians free at the same earliest
//! time, the one with fewest bookings is chosen, then the smallest id. Nothing within
//! `horizon` → a failed [`Body::Booking`] saying why.
//!
//! A booking is known by its key: a repeated `Book` gets the same answer (success or
//! failure) and books nothing. To try again after a failure, ask with a new key.
//!
//! # Work orders
//! Integrators open work orders ([`Body::OpenWorkOrder`], once per key), book a given
//! technician slot for one ([`Body::BookSlot`]: it must be free, [`Scheduler::check_slot`]),
//! cancel the appointment ([`Body::CancelBooking`]: the slot is free again, the order open
//! again) and move the order forward from the field ([`Body::WorkOrderProgress`]). A twin's
//! successful `Book` is a scheduled work order too; it is derived from the booking (not
//! kept twice in the snapshot) until a change from the field makes it a record.
//!
//! # Cost
//! The search walks day by day up to the horizon and, within a day, jumps from one
//! obstacle to the next (the end of an overlapping visit, the start of the next customer
//! window) instead of stepping slot by slot: per request about `horizon days ×
//! technicians × (visits that day + windows)` steps, with binary searches into each
//! technician's calendar, which is kept sorted.

use super::{
    SNAPSHOT_BUDGET, Settings, Span, Status, Tenants, admit, body_name, check_key, check_limits,
    claim, decode_snapshot, default_max_records, default_retain, make_room_within, refuse, send,
    tenant_id,
};
use crate::host::{Ctx, Twin};
use crate::mail::{
    Address, Body, Mail, PartnerVisit, SlotRequest, WorkOrderRequest, WorkOrderState, tenant_of,
};
use crate::model::{DAY_MS, Priority, TimeMs};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most availability windows one request may give.
pub const MAX_WINDOWS: usize = 256;

/// A scheduler's settings (per tenant, see [`Tenants`]).
///
/// ```toml
/// slot = "30m"
/// horizon = "60d"
/// [[technicians]]
/// id = "tech-ana"
/// skills = ["boiler", "hvac"]
/// regions = ["north"]
/// days = ["mon", "tue", "wed", "thu", "fri"]
/// start = "08:00"
/// end = "17:00"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// The tenant's technicians.
    #[serde(default)]
    pub technicians: Vec<TechnicianConfig>,
    /// Visits start on this grid, counted from the start of each working day.
    #[serde(default = "default_slot")]
    pub slot: Span,
    /// How far past `not_before` (or now, if later) a visit may start; beyond it the
    /// request fails.
    #[serde(default = "default_horizon")]
    pub horizon: Span,
    /// Bookings are forgotten this long after their visit ended (failures: after they
    /// were answered); a repeat of a forgotten key is still refused by its idempotency
    /// record.
    #[serde(default = "default_retain")]
    pub retain: Span,
    /// Most bookings kept; beyond it the oldest finished ones are forgotten, and new
    /// requests are refused while this many visits are still ahead.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
}

/// One technician.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TechnicianConfig {
    /// Unique within the tenant; named in bookings.
    pub id: String,
    /// Skills, matched exactly against a request's `skill`.
    pub skills: Vec<String>,
    /// Regions covered, matched exactly against a request's `region`.
    pub regions: Vec<String>,
    /// Working days (UTC).
    #[serde(default = "default_days")]
    pub days: Vec<Weekday>,
    /// Start of the working day, `HH:MM` UTC.
    #[serde(default = "default_start")]
    pub start: TimeOfDay,
    /// End of the working day, `HH:MM` UTC, after `start` (`24:00` at most: no shift
    /// crosses midnight). A visit ends by then.
    #[serde(default = "default_end")]
    pub end: TimeOfDay,
}

fn default_slot() -> Span {
    Span::minutes(30)
}
fn default_horizon() -> Span {
    Span::days(60)
}
fn default_days() -> Vec<Weekday> {
    vec![
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
    ]
}
fn default_start() -> TimeOfDay {
    TimeOfDay(8 * 60)
}
fn default_end() -> TimeOfDay {
    TimeOfDay(17 * 60)
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            technicians: Vec::new(),
            slot: default_slot(),
            horizon: default_horizon(),
            retain: default_retain(),
            max_records: default_max_records(),
        }
    }
}

impl Settings for SchedulerConfig {
    fn validate(&self) -> Result<()> {
        check_limits(self.max_records)?;
        if self.slot.ms() > DAY_MS {
            return Err(Error::Config(format!(
                "slot {} is longer than a day",
                String::from(self.slot)
            )));
        }
        let mut ids = std::collections::BTreeSet::new();
        for t in &self.technicians {
            check_key("technician id", &t.id).map_err(Error::Config)?;
            if !ids.insert(&t.id) {
                return Err(Error::Config(format!(
                    "technician {:?} is listed twice",
                    t.id
                )));
            }
            if t.start >= t.end {
                return Err(Error::Config(format!(
                    "technician {:?}: start {} is not before end {}",
                    t.id,
                    String::from(t.start),
                    String::from(t.end)
                )));
            }
        }
        Ok(())
    }
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Weekday {
    /// The weekday of a day counted from the Unix epoch (UTC); 1970-01-01 was a Thursday.
    pub fn of_epoch_day(day: u64) -> Self {
        const WEEK: [Weekday; 7] = [
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
            Weekday::Sat,
            Weekday::Sun,
        ];
        WEEK[((day + 3) % 7) as usize]
    }
}

/// A time of day in minutes after midnight UTC, written `HH:MM` (`00:00`..=`24:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeOfDay(pub u16);

impl TimeOfDay {
    /// Milliseconds after midnight.
    pub fn ms(self) -> u64 {
        u64::from(self.0) * 60_000
    }
}

impl TryFrom<String> for TimeOfDay {
    type Error = Error;

    fn try_from(text: String) -> Result<Self> {
        let bad = || {
            Error::Config(format!(
                "time of day {text:?} must be HH:MM, 00:00 to 24:00"
            ))
        };
        let (h, m) = text.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()))
        {
            return Err(bad());
        }
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || h > 24 || (h == 24 && m > 0) {
            return Err(bad());
        }
        Ok(Self(h * 60 + m))
    }
}

impl From<TimeOfDay> for String {
    fn from(t: TimeOfDay) -> String {
        format!("{:02}:{:02}", t.0 / 60, t.0 % 60)
    }
}

/// A booking, known by its key: what the customer was told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Booking {
    /// The customer twin told about it.
    #[serde(rename = "c")]
    pub customer: String,
    /// When it was decided (or cancelled).
    #[serde(rename = "t")]
    pub at: TimeMs,
    /// The technician, if booked.
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub technician: Option<String>,
    /// The visit, `[start, end)` Unix ms, if booked.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<(TimeMs, TimeMs)>,
    /// Work order id, or why there is no visit.
    #[serde(rename = "d")]
    pub detail: String,
    /// The appointment's id, `tenant:ap-N`, if booked.
    #[serde(rename = "i", default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The work order it serves, if booked.
    #[serde(rename = "w", default, skip_serializing_if = "String::is_empty")]
    pub work_order: String,
    /// Part orders whose parts the technician brings.
    #[serde(rename = "p", default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<String>,
    /// Confirmed (by an integrator); otherwise held until the customer confirms.
    #[serde(rename = "f", default, skip_serializing_if = "is_false")]
    pub confirmed: bool,
    /// Cancelled: the slot is free again (technician and slot are kept for the record).
    #[serde(rename = "x", default, skip_serializing_if = "is_false")]
    pub cancelled: bool,
    /// The case a twin booked it for, if any.
    #[serde(rename = "z", default, skip_serializing_if = "String::is_empty")]
    pub case_id: String,
    /// Booked by the field-service partner: its calendar holds the slot, not this desk's,
    /// and a cancellation is sent on to it.
    #[serde(rename = "e", default, skip_serializing_if = "is_false")]
    pub partner: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Whether a booking holds its technician's slot.
fn holds_slot(b: &Booking) -> Option<(&str, (TimeMs, TimeMs))> {
    match (&b.technician, b.slot) {
        (Some(t), Some(slot)) if !b.cancelled => Some((t.as_str(), slot)),
        _ => None,
    }
}

/// Whether a booking holds a slot of this desk's calendars (a partner's visit is in the
/// partner's).
fn holds_desk_slot(b: &Booking) -> Option<(&str, (TimeMs, TimeMs))> {
    holds_slot(b).filter(|_| !b.partner)
}

/// A piece of repair work on a device: opened by an integrator, or by a twin's booking
/// (then already scheduled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkOrder {
    /// The idempotency key it was created with (a twin's booking key for twins' work).
    #[serde(rename = "k")]
    pub key: String,
    /// The customer.
    #[serde(rename = "c")]
    pub customer: String,
    /// The device to repair, if known.
    #[serde(rename = "v", default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    /// The device's site, if known.
    #[serde(rename = "s", default, skip_serializing_if = "String::is_empty")]
    pub site: String,
    /// The case it belongs to, if any.
    #[serde(rename = "z", default, skip_serializing_if = "String::is_empty")]
    pub case_id: String,
    /// Failure mode, if known.
    #[serde(rename = "m", default, skip_serializing_if = "String::is_empty")]
    pub failure_mode: String,
    /// What to do, for the technician.
    #[serde(rename = "x", default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Urgency.
    #[serde(rename = "u")]
    pub priority: Priority,
    /// Where it stands.
    #[serde(rename = "st")]
    pub state: WorkOrderState,
    /// Key of its booking that is not cancelled, if any.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub appointment: Option<String>,
    /// Part orders for this work.
    #[serde(rename = "o", default, skip_serializing_if = "Vec::is_empty")]
    pub part_orders: Vec<String>,
    /// When created.
    #[serde(rename = "t0")]
    pub created: TimeMs,
    /// When last changed.
    #[serde(rename = "t")]
    pub updated: TimeMs,
    /// The technician's report or the reason, once given.
    #[serde(rename = "n", default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
}

/// Longest description or notes of a work order, in bytes (they live in the desk's
/// snapshot).
pub const MAX_TEXT: usize = 1024;
/// The scheduler keeps bookings and work orders in one snapshot: their shares of
/// [`SNAPSHOT_BUDGET`] bytes.
const BOOKINGS_BUDGET: usize = SNAPSHOT_BUDGET * 5 / 8;
const ORDERS_BUDGET: usize = SNAPSHOT_BUDGET - BOOKINGS_BUDGET;
/// Most part orders named by one appointment.
pub const MAX_PARTS: usize = 16;

/// Why a given slot cannot be booked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotError {
    /// The request makes no sense (unknown technician, empty visit, past, outside working
    /// hours).
    Invalid(String),
    /// Another visit holds (part of) the slot.
    Busy(String),
}

/// Which calendar slots to list.
#[derive(Debug, Clone)]
pub struct SlotQuery<'a> {
    /// Only this technician's, if set.
    pub technician: Option<&'a str>,
    /// Only technicians with this skill, if set.
    pub skill: Option<&'a str>,
    /// Start of the range, Unix ms.
    pub from: TimeMs,
    /// End of the range, Unix ms (exclusive).
    pub to: TimeMs,
    /// Now: free slots start no earlier.
    pub now: TimeMs,
    /// Only free slots.
    pub free_only: bool,
}

/// One slot of a technician's calendar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarEntry {
    /// The technician.
    pub technician: String,
    /// `[start, end)` Unix ms: a grid slot when free, the visit when held or booked.
    pub slot: (TimeMs, TimeMs),
    /// The appointment holding it, if any.
    pub appointment: Option<String>,
    /// Whether that appointment is confirmed.
    pub confirmed: bool,
}

/// Most calendar slots one query returns.
pub const MAX_SLOTS: usize = 20_000;

impl Booking {
    fn body(&self, key: &str) -> Body {
        let held = holds_slot(self).is_some();
        Body::Booking {
            key: key.to_owned(),
            technician: self.technician.clone().filter(|_| held),
            slot: self.slot.filter(|_| held),
            detail: self.detail.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Mail counter.
    #[serde(rename = "n")]
    seq: u64,
    /// Work order counter.
    #[serde(rename = "w")]
    work_orders: u64,
    /// Bookings by key.
    #[serde(rename = "b")]
    bookings: BTreeMap<String, Booking>,
    /// Appointment counter.
    #[serde(rename = "a", default)]
    appointments: u64,
    /// Work orders by id.
    #[serde(rename = "o", default, skip_serializing_if = "BTreeMap::is_empty")]
    orders: BTreeMap<String, WorkOrder>,
    /// Each technician's visits, sorted and disjoint: derived from `bookings`.
    #[serde(skip)]
    calendars: BTreeMap<String, Vec<(TimeMs, TimeMs)>>,
}

impl State {
    fn rebuild_calendars(&mut self) {
        self.calendars.clear();
        for b in self.bookings.values() {
            if let Some((t, slot)) = holds_desk_slot(b) {
                self.calendars.entry(t.to_owned()).or_default().push(slot);
            }
        }
        for cal in self.calendars.values_mut() {
            cal.sort_unstable();
            debug_assert!(
                cal.windows(2).all(|w| w[0].1 <= w[1].0),
                "overlapping visits"
            );
        }
    }
}

/// What a request asks for, checked.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The skill needed.
    pub skill: &'a str,
    /// The customer's region.
    pub region: &'a str,
    /// Earliest start (already no earlier than now).
    pub from: TimeMs,
    /// Visit length, ms (> 0).
    pub duration: u64,
    /// The customer's windows, sorted, merged, none ending before `from`; empty = any time.
    pub windows: Vec<(TimeMs, TimeMs)>,
}

/// Sorts and merges windows that overlap or touch, dropping those ending by `from`.
fn merge_windows(mut windows: Vec<(TimeMs, TimeMs)>, from: TimeMs) -> Vec<(TimeMs, TimeMs)> {
    windows.sort_unstable();
    let mut out: Vec<(TimeMs, TimeMs)> = Vec::with_capacity(windows.len());
    for (s, e) in windows {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.retain(|w| w.1 > from);
    out
}

/// The first point of the grid `base + k·slot` at or after `t`.
fn grid_ceil(t: TimeMs, base: TimeMs, slot: u64) -> TimeMs {
    if t <= base {
        base
    } else {
        base.saturating_add((t - base).div_ceil(slot).saturating_mul(slot))
    }
}

/// The earliest start in one working day `[ws, we)` for a technician with calendar `cal`.
fn earliest_in_day(
    cal: &[(TimeMs, TimeMs)],
    (ws, we): (TimeMs, TimeMs),
    slot: u64,
    req: &Request<'_>,
    limit: TimeMs,
) -> Option<TimeMs> {
    let mut t = grid_ceil(req.from, ws, slot);
    loop {
        let end = t.saturating_add(req.duration);
        if t > limit || end > we || end == TimeMs::MAX {
            return None;
        }
        if !req.windows.is_empty() {
            // The first window that could still hold the visit; windows are disjoint, so
            // their ends increase and no earlier one can hold it now or later.
            let i = req.windows.partition_point(|w| w.1 < end);
            let &(a, _) = req.windows.get(i)?;
            if a > t {
                t = grid_ceil(a, ws, slot);
                continue;
            }
        }
        // The first visit ending after t is the only one that can overlap [t, end): the
        // calendar is sorted and disjoint, so later visits start after it ends.
        let j = cal.partition_point(|v| v.1 <= t);
        if let Some(&(vs, ve)) = cal.get(j)
            && vs < end
        {
            t = grid_ceil(ve, ws, slot);
            continue;
        }
        return Some(t);
    }
}

/// A `Book` request's fields.
struct Ask {
    key: String,
    customer: String,
    case_id: String,
    skill: String,
    region: String,
    not_before_ms: TimeMs,
    windows: Vec<(TimeMs, TimeMs)>,
    duration_ms: u64,
    confirmed: bool,
}

/// The repair scheduler of one tenant (twin id = tenant id).
#[derive(Debug)]
pub struct Scheduler {
    tenant: String,
    me: Address,
    state: State,
}

impl Scheduler {
    /// A booking, by key.
    pub fn booking(&self, key: &str) -> Option<&Booking> {
        self.state.bookings.get(key)
    }

    /// A technician's visits, sorted by start.
    pub fn calendar(&self, technician: &str) -> &[(TimeMs, TimeMs)] {
        self.state
            .calendars
            .get(technician)
            .map_or(&[], Vec::as_slice)
    }

    /// The earliest fitting (technician, start), or `None` if nothing fits by the horizon.
    pub fn find_slot(
        &self,
        config: &SchedulerConfig,
        req: &Request<'_>,
    ) -> Option<(String, TimeMs)> {
        let slot = config.slot.ms().max(1);
        let limit = req.from.saturating_add(config.horizon.ms());
        let techs: Vec<&TechnicianConfig> = config
            .technicians
            .iter()
            .filter(|t| t.skills.iter().any(|s| s == req.skill))
            .filter(|t| t.regions.iter().any(|r| r == req.region))
            .filter(|t| t.start < t.end)
            .collect();
        for day in req.from / DAY_MS..=limit / DAY_MS {
            let base = day * DAY_MS;
            if req.windows.last().is_some_and(|w| w.1 <= base) {
                break;
            }
            let weekday = Weekday::of_epoch_day(day);
            let mut best: Option<(TimeMs, usize, &str)> = None;
            for t in techs.iter().filter(|t| t.days.contains(&weekday)) {
                let cal = self.calendar(&t.id);
                let hours = (
                    base.saturating_add(t.start.ms()),
                    base.saturating_add(t.end.ms()),
                );
                if let Some(start) = earliest_in_day(cal, hours, slot, req, limit) {
                    let candidate = (start, cal.len(), t.id.as_str());
                    if best.is_none_or(|b| candidate < b) {
                        best = Some(candidate);
                    }
                }
            }
            if let Some((start, _, id)) = best {
                return Some((id.to_owned(), start));
            }
        }
        None
    }

    /// Cancels booking `key` for `reason`: its technician's slot is freed (a partner's
    /// visit by [`Body::CancelVisit`] mail to the partner, which calls it), its work order
    /// is open again, and the customer is told (`Booking` with no technician, detail
    /// `cancelled: reason (…)`). A failed, cancelled or unknown booking is left alone.
    pub fn cancel(&mut self, key: &str, reason: &str, ctx: &mut Ctx) -> Status {
        let now = ctx.now();
        let state = &mut self.state;
        let Some(b) = state.bookings.get_mut(key) else {
            return Status::Ignored;
        };
        let Some((tech, slot)) = holds_slot(b).map(|(t, s)| (t.to_owned(), s)) else {
            return Status::Duplicate;
        };
        b.cancelled = true;
        b.detail = format!("cancelled: {reason} ({})", b.detail);
        b.at = now;
        if b.partner {
            // In the same batch as the cancellation: the outbox delivers it at least once,
            // and the partner frees the slot once per key.
            let body = Body::CancelVisit {
                key: key.to_owned(),
                reason: reason.to_owned(),
            };
            let to = Address::FieldService(self.tenant.clone());
            send(ctx, &mut state.seq, &self.me, Self::KIND, to, body);
        } else if let Some(cal) = state.calendars.get_mut(&tech)
            && let Ok(i) = cal.binary_search(&slot)
        {
            cal.remove(i);
        }
        if let Some(wo) = state.orders.get_mut(&b.work_order)
            && wo.appointment.as_deref() == Some(key)
        {
            wo.appointment = None;
            if wo.state == WorkOrderState::Scheduled {
                wo.state = WorkOrderState::Open;
            }
            wo.updated = now;
        }
        let (to, body) = (Address::Customer(b.customer.clone()), b.body(key));
        send(ctx, &mut state.seq, &self.me, Self::KIND, to, body);
        Status::Done
    }

    /// Every booking, by key.
    pub fn bookings(&self) -> impl Iterator<Item = (&str, &Booking)> {
        self.state.bookings.iter().map(|(k, b)| (k.as_str(), b))
    }

    /// A booking by its appointment id (`tenant:ap-N`), with its key.
    pub fn appointment(&self, id: &str) -> Option<(&str, &Booking)> {
        self.bookings().find(|(_, b)| b.id == id)
    }

    /// The work order a twin's booking stands for, while no record of its own is kept
    /// (only a change from the field makes one): derived, so the snapshot does not hold
    /// every booking twice.
    fn derived(&self, key: &str, b: &Booking) -> Option<(String, WorkOrder)> {
        if b.work_order.is_empty() || self.state.orders.contains_key(&b.work_order) {
            return None;
        }
        let order = WorkOrder {
            key: key.to_owned(),
            customer: b.customer.clone(),
            device: String::new(),
            site: String::new(),
            case_id: b.case_id.clone(),
            failure_mode: String::new(),
            description: String::new(),
            priority: Priority::Normal,
            state: if b.cancelled {
                WorkOrderState::Cancelled
            } else {
                WorkOrderState::Scheduled
            },
            appointment: (!b.cancelled).then(|| key.to_owned()),
            part_orders: b.parts.clone(),
            created: b.at,
            updated: b.at,
            notes: String::new(),
        };
        Some((b.work_order.clone(), order))
    }

    /// Every work order with its id: those kept, and those twins' bookings stand for.
    pub fn work_orders(&self) -> Vec<(String, WorkOrder)> {
        self.state
            .orders
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .chain(
                self.state
                    .bookings
                    .iter()
                    .filter_map(|(k, b)| self.derived(k, b)),
            )
            .collect()
    }

    /// A work order, by id (`tenant:wo-N`).
    pub fn work_order(&self, id: &str) -> Option<WorkOrder> {
        if let Some(w) = self.state.orders.get(id) {
            return Some(w.clone());
        }
        self.state
            .bookings
            .iter()
            .filter(|(_, b)| b.work_order == id)
            .find_map(|(k, b)| self.derived(k, b))
            .map(|(_, w)| w)
    }

    /// A work order, by the idempotency key it was created with, with its id.
    pub fn work_order_by_key(&self, key: &str) -> Option<(String, WorkOrder)> {
        if let Some((id, w)) = self.state.orders.iter().find(|(_, w)| w.key == key) {
            return Some((id.clone(), w.clone()));
        }
        self.state
            .bookings
            .get(key)
            .and_then(|b| self.derived(key, b))
    }

    /// Whether `technician` can take the visit `slot` at `now`: a technician of the
    /// tenant, not in the past, inside one working day's hours, overlapping no other
    /// visit.
    pub fn check_slot(
        &self,
        config: &SchedulerConfig,
        technician: &str,
        (start, end): (TimeMs, TimeMs),
        now: TimeMs,
    ) -> std::result::Result<(), SlotError> {
        let Some(t) = config.technicians.iter().find(|t| t.id == technician) else {
            return Err(SlotError::Invalid(format!(
                "unknown technician {technician:?}"
            )));
        };
        if end <= start || end - start > DAY_MS {
            return Err(SlotError::Invalid(format!(
                "slot [{start}, {end}) must last 1 ms to a day"
            )));
        }
        if start < now {
            return Err(SlotError::Invalid(format!(
                "slot starts at {start}, in the past (now {now})"
            )));
        }
        let base = start / DAY_MS * DAY_MS;
        let works = t.days.contains(&Weekday::of_epoch_day(start / DAY_MS));
        if !works || start < base + t.start.ms() || end > base + t.end.ms() {
            return Err(SlotError::Invalid(format!(
                "slot [{start}, {end}) is outside {technician}'s working hours"
            )));
        }
        let cal = self.calendar(technician);
        let j = cal.partition_point(|v| v.1 <= start);
        if let Some(&(vs, ve)) = cal.get(j)
            && vs < end
        {
            return Err(SlotError::Busy(format!(
                "{technician} has a visit at [{vs}, {ve})"
            )));
        }
        Ok(())
    }

    /// The calendar slots `q` asks for, by start then technician: free grid slots found
    /// with the earliest-slot search, and (unless `free_only`) the visits that hold or
    /// book slots. At most [`MAX_SLOTS`].
    pub fn slots(&self, config: &SchedulerConfig, q: &SlotQuery<'_>) -> Vec<CalendarEntry> {
        let slot = config.slot.ms().max(1);
        let techs = config
            .technicians
            .iter()
            .filter(|t| q.technician.is_none_or(|id| t.id == id))
            .filter(|t| q.skill.is_none_or(|s| t.skills.iter().any(|x| x == s)))
            .filter(|t| t.start < t.end);
        let mut out = Vec::new();
        let from = q.from.max(q.now);
        for t in techs {
            let cal = self.calendar(&t.id);
            if q.to < from.saturating_add(slot) {
                break;
            }
            let limit = q.to - slot;
            for day in from / DAY_MS..=limit / DAY_MS {
                if !t.days.contains(&Weekday::of_epoch_day(day)) {
                    continue;
                }
                let base = day * DAY_MS;
                let hours = (base + t.start.ms(), base + t.end.ms());
                let mut next = from;
                loop {
                    let req = Request {
                        skill: "",
                        region: "",
                        from: next,
                        duration: slot,
                        windows: Vec::new(),
                    };
                    let Some(start) = earliest_in_day(cal, hours, slot, &req, limit) else {
                        break;
                    };
                    out.push(CalendarEntry {
                        technician: t.id.clone(),
                        slot: (start, start + slot),
                        appointment: None,
                        confirmed: false,
                    });
                    if out.len() >= MAX_SLOTS {
                        break;
                    }
                    next = start + slot;
                }
            }
            if !q.free_only {
                for b in self.state.bookings.values() {
                    if let Some((tech, (s, e))) = holds_desk_slot(b)
                        && tech == t.id
                        && s < q.to
                        && e > q.from
                    {
                        out.push(CalendarEntry {
                            technician: t.id.clone(),
                            slot: (s, e),
                            appointment: Some(b.id.clone()),
                            confirmed: b.confirmed,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.slot.0, &a.technician).cmp(&(b.slot.0, &b.technician)));
        out.truncate(MAX_SLOTS);
        out
    }

    /// Makes room for one more work order (see [`make_room`]): one is finished when it is
    /// completed or cancelled, or when its visit is over.
    fn room_for_order(&mut self, now: TimeMs, config: &SchedulerConfig) -> super::Room {
        let ended: BTreeMap<&str, TimeMs> = self
            .state
            .bookings
            .iter()
            .filter_map(|(k, b)| match b.slot {
                Some((_, end)) if end <= now => Some((k.as_str(), end)),
                _ => None,
            })
            .collect();
        let keys: std::collections::BTreeSet<&str> =
            self.state.bookings.keys().map(String::as_str).collect();
        make_room_within(
            &mut self.state.orders,
            now,
            config.retain,
            config.max_records,
            |w: &WorkOrder| match &w.appointment {
                _ if w.state.is_final() => Some(w.updated),
                Some(k) if !keys.contains(k.as_str()) => Some(w.updated),
                Some(k) => ended.get(k.as_str()).copied(),
                None => None,
            },
            ORDERS_BUDGET,
        )
    }

    fn open_work_order(
        &mut self,
        ctx: &mut Ctx,
        config: &SchedulerConfig,
        req: WorkOrderRequest,
    ) -> std::result::Result<Status, String> {
        check_key("work order key", &req.key)?;
        if tenant_of(&req.customer) != self.tenant || !req.customer.contains(':') {
            return Err(format!(
                "work order {:?} is for customer {:?}, not one of tenant {}",
                req.key, req.customer, self.tenant
            ));
        }
        check_key("device", &req.device)?;
        for (what, v) in [
            ("site", &req.site),
            ("case_id", &req.case_id),
            ("failure_mode", &req.failure_mode),
        ] {
            if !v.is_empty() {
                check_key(what, v)?;
            }
        }
        if req.description.len() > MAX_TEXT {
            return Err(format!("description is over {MAX_TEXT} bytes"));
        }
        if self.work_order_by_key(&req.key).is_some() {
            return Ok(Status::Duplicate);
        }
        let now = ctx.now();
        let room = self.room_for_order(now, config);
        if room.forgot {
            ctx.changed();
        }
        if !room.fits {
            return Err(format!(
                "the desk is full: {} work orders are open",
                self.state.orders.len()
            ));
        }
        claim(ctx, Self::KIND, &self.tenant, &req.key);
        self.state.work_orders += 1;
        let id = format!("{}:wo-{}", self.tenant, self.state.work_orders);
        let order = WorkOrder {
            key: req.key,
            customer: req.customer,
            device: req.device,
            site: req.site,
            case_id: req.case_id,
            failure_mode: req.failure_mode,
            description: req.description,
            priority: req.priority,
            state: WorkOrderState::Open,
            appointment: None,
            part_orders: Vec::new(),
            created: now,
            updated: now,
            notes: String::new(),
        };
        tracing::info!(tenant = %self.tenant, work_order = %id, "work order opened");
        self.state.orders.insert(id, order);
        ctx.changed();
        Ok(Status::Done)
    }

    fn work_order_progress(
        &mut self,
        ctx: &mut Ctx,
        config: &SchedulerConfig,
        id: &str,
        state: WorkOrderState,
        notes: String,
    ) -> std::result::Result<Status, String> {
        if !matches!(
            state,
            WorkOrderState::InProgress | WorkOrderState::Completed | WorkOrderState::Cancelled
        ) {
            return Err(format!(
                "a work order is moved to in progress, completed or cancelled, not {state:?}"
            ));
        }
        if notes.len() > MAX_TEXT {
            return Err(format!("notes are over {MAX_TEXT} bytes"));
        }
        if !self.state.orders.contains_key(id) {
            // A twin's booking: the change makes its work order a record of its own.
            let Some(wo) = self.work_order(id) else {
                return Err(format!("unknown work order {id:?}"));
            };
            if wo.state == state {
                return Ok(Status::Duplicate);
            }
            if wo.state.is_final() || state < wo.state {
                return Ok(Status::Ignored);
            }
            let room = self.room_for_order(ctx.now(), config);
            if !room.fits {
                return Err(format!(
                    "the desk is full: {} work orders are open",
                    self.state.orders.len()
                ));
            }
            self.state.orders.insert(id.to_owned(), wo);
        }
        let wo = &self.state.orders[id];
        if wo.state == state {
            return Ok(Status::Duplicate);
        }
        // Forward only: the states are declared in the order work goes.
        if wo.state.is_final() || state < wo.state {
            return Ok(Status::Ignored);
        }
        if state == WorkOrderState::Cancelled
            && let Some(key) = wo.appointment.clone()
        {
            self.cancel(&key, "the work order is cancelled", ctx);
        }
        let wo = self.state.orders.get_mut(id).expect("found above");
        wo.state = state;
        wo.updated = ctx.now();
        if !notes.is_empty() {
            wo.notes = notes;
        }
        ctx.changed();
        Ok(Status::Done)
    }

    fn book_slot(
        &mut self,
        ctx: &mut Ctx,
        config: &SchedulerConfig,
        req: SlotRequest,
    ) -> std::result::Result<Status, String> {
        check_key("booking key", &req.key)?;
        if self.state.bookings.contains_key(&req.key) {
            return Ok(Status::Duplicate);
        }
        if req.part_orders.len() > MAX_PARTS {
            return Err(format!(
                "{} part orders, the limit is {MAX_PARTS}",
                req.part_orders.len()
            ));
        }
        for p in &req.part_orders {
            check_key("part order id", p)?;
        }
        let Some(wo) = self.state.orders.get(&req.work_order_id) else {
            return Err(format!("unknown work order {:?}", req.work_order_id));
        };
        if wo.state != WorkOrderState::Open || wo.appointment.is_some() {
            return Ok(Status::Ignored);
        }
        let customer = wo.customer.clone();
        let now = ctx.now();
        match self.check_slot(config, &req.technician, req.slot, now) {
            Ok(()) => {}
            Err(SlotError::Invalid(why)) => return Err(why),
            Err(SlotError::Busy(_)) => return Ok(Status::Ignored),
        }
        self.room_for_booking(ctx, config)?;
        claim(ctx, Self::KIND, &self.tenant, &req.key);
        self.state.appointments += 1;
        let id = format!("{}:ap-{}", self.tenant, self.state.appointments);
        let cal = self
            .state
            .calendars
            .entry(req.technician.clone())
            .or_default();
        let i = cal.partition_point(|v| v.0 < req.slot.0);
        cal.insert(i, req.slot);
        let wo = self
            .state
            .orders
            .get_mut(&req.work_order_id)
            .expect("found above");
        wo.state = WorkOrderState::Scheduled;
        wo.appointment = Some(req.key.clone());
        for p in &req.part_orders {
            if !wo.part_orders.contains(p) {
                wo.part_orders.push(p.clone());
            }
        }
        wo.updated = now;
        self.state.bookings.insert(
            req.key,
            Booking {
                customer,
                at: now,
                technician: Some(req.technician),
                slot: Some(req.slot),
                detail: req.work_order_id.clone(),
                id,
                work_order: req.work_order_id,
                parts: req.part_orders,
                confirmed: req.confirmed,
                cancelled: false,
                case_id: String::new(),
                partner: false,
            },
        );
        ctx.changed();
        Ok(Status::Done)
    }

    /// Makes room for one more booking: visits that are over, and cancelled or failed
    /// bookings, are forgotten first (see [`make_room_within`]); `Err` when the desk is
    /// still full.
    fn room_for_booking(
        &mut self,
        ctx: &mut Ctx,
        config: &SchedulerConfig,
    ) -> std::result::Result<(), String> {
        let now = ctx.now();
        let room = make_room_within(
            &mut self.state.bookings,
            now,
            config.retain,
            config.max_records,
            |b: &Booking| match b.slot {
                Some((_, end)) if !b.cancelled => (end <= now).then_some(end),
                _ => Some(b.at),
            },
            BOOKINGS_BUDGET,
        );
        if room.forgot {
            self.state.rebuild_calendars();
            ctx.changed();
        }
        if !room.fits {
            return Err(format!(
                "the desk is full: {} visits are ahead",
                self.state.bookings.len()
            ));
        }
        Ok(())
    }

    /// Whether `from` is the customer twin booking `key` is for (only they confirm or
    /// decline it).
    fn customers_booking(&self, from: &Address, key: &str) -> std::result::Result<(), String> {
        match self.state.bookings.get(key) {
            Some(b) if *from == Address::Customer(b.customer.clone()) => Ok(()),
            Some(_) => Err(format!("booking {key:?} is not {from:?}'s to answer")),
            None => Err(format!("unknown booking {key:?}")),
        }
    }

    /// The customer confirmed booking `key`: a visit that still holds its slot becomes
    /// confirmed (once); a cancelled or failed one stays as it is.
    fn confirm(&mut self, key: &str, ctx: &mut Ctx) -> Status {
        let Some(b) = self.state.bookings.get_mut(key) else {
            return Status::Ignored;
        };
        if holds_slot(b).is_none() {
            return Status::Ignored;
        }
        if b.confirmed {
            return Status::Duplicate;
        }
        b.confirmed = true;
        b.at = ctx.now();
        ctx.changed();
        Status::Done
    }

    /// Keeps a visit the field-service partner booked with the tenant's appointments
    /// (its own appointment and work order ids; the partner's calendar holds the slot).
    fn partner_booked(
        &mut self,
        ctx: &mut Ctx,
        config: &SchedulerConfig,
        v: PartnerVisit,
    ) -> std::result::Result<Status, String> {
        check_key("booking key", &v.key)?;
        check_key("technician", &v.technician)?;
        if tenant_of(&v.customer) != self.tenant || !v.customer.contains(':') {
            return Err(format!(
                "booking {:?} is for customer {:?}, not one of tenant {}",
                v.key, v.customer, self.tenant
            ));
        }
        if v.slot.0 >= v.slot.1 || v.reference.len() > MAX_TEXT {
            return Err(format!(
                "partner booking {:?} has an empty slot or an overlong reference",
                v.key
            ));
        }
        if self.state.bookings.contains_key(&v.key) {
            return Ok(Status::Duplicate);
        }
        let now = ctx.now();
        self.room_for_booking(ctx, config)?;
        claim(ctx, Self::KIND, &self.tenant, &v.key);
        self.state.work_orders += 1;
        self.state.appointments += 1;
        let wo = format!("{}:wo-{}", self.tenant, self.state.work_orders);
        let detail = if v.reference.is_empty() {
            wo.clone()
        } else {
            format!("{wo}, partner's {}", v.reference)
        };
        let booking = Booking {
            customer: v.customer,
            at: now,
            technician: Some(v.technician),
            slot: Some(v.slot),
            detail,
            id: format!("{}:ap-{}", self.tenant, self.state.appointments),
            work_order: wo,
            parts: Vec::new(),
            confirmed: v.confirmed,
            cancelled: false,
            case_id: v.case_id,
            partner: true,
        };
        self.state.bookings.insert(v.key, booking);
        ctx.changed();
        Ok(Status::Done)
    }

    fn book(
        &mut self,
        ctx: &mut Ctx,
        config: &SchedulerConfig,
        ask: Ask,
    ) -> std::result::Result<Status, String> {
        let Ask {
            key,
            customer,
            case_id,
            skill,
            region,
            not_before_ms,
            windows,
            duration_ms,
            confirmed,
        } = ask;
        check_key("booking key", &key)?;
        if tenant_of(&customer) != self.tenant || !customer.contains(':') {
            return Err(format!(
                "booking {key:?} is for customer {customer:?}, not one of tenant {}",
                self.tenant
            ));
        }
        if let Some(b) = self.state.bookings.get(&key) {
            let (to, body) = (Address::Customer(b.customer.clone()), b.body(&key));
            send(ctx, &mut self.state.seq, &self.me, Self::KIND, to, body);
            return Ok(Status::Duplicate);
        }
        if duration_ms == 0 || duration_ms > DAY_MS {
            return Err(format!(
                "booking {key:?} lasts {duration_ms} ms, not 1 ms to a day"
            ));
        }
        if windows.len() > MAX_WINDOWS {
            return Err(format!(
                "booking {key:?} gives {} windows, the limit is {MAX_WINDOWS}",
                windows.len()
            ));
        }
        if let Some(w) = windows.iter().find(|w| w.0 >= w.1) {
            return Err(format!("booking {key:?} has an empty window {w:?}"));
        }
        let now = ctx.now();
        self.room_for_booking(ctx, config)?;
        let from = not_before_ms.max(now);
        let gave_windows = !windows.is_empty();
        let req = Request {
            skill: &skill,
            region: &region,
            from,
            duration: duration_ms,
            windows: merge_windows(windows, from),
        };
        // Windows given but all past must not read as "any time".
        let all_past = gave_windows && req.windows.is_empty();
        claim(ctx, Self::KIND, &self.tenant, &key);
        let found = if all_past {
            None
        } else {
            self.find_slot(config, &req)
        };
        let booking = match found {
            Some((tech, start)) => {
                self.state.work_orders += 1;
                self.state.appointments += 1;
                let wo = format!("{}:wo-{}", self.tenant, self.state.work_orders);
                let slot = (start, start + duration_ms);
                let cal = self.state.calendars.entry(tech.clone()).or_default();
                let i = cal.partition_point(|v| v.0 < start);
                debug_assert!(i == 0 || cal[i - 1].1 <= slot.0);
                debug_assert!(cal.get(i).is_none_or(|v| slot.1 <= v.0));
                cal.insert(i, slot);
                Booking {
                    customer,
                    at: now,
                    technician: Some(tech),
                    slot: Some(slot),
                    detail: wo.clone(),
                    id: format!("{}:ap-{}", self.tenant, self.state.appointments),
                    work_order: wo,
                    parts: Vec::new(),
                    confirmed,
                    cancelled: false,
                    case_id,
                    partner: false,
                }
            }
            None => {
                let detail = if !config
                    .technicians
                    .iter()
                    .any(|t| t.skills.contains(&skill) && t.regions.contains(&region))
                {
                    format!("no technician with skill {skill:?} covers region {region:?}")
                } else if all_past {
                    "every availability window has passed".to_owned()
                } else {
                    format!(
                        "no free {} min slot with skill {skill:?} in region {region:?} within {} of {from}",
                        duration_ms / 60_000,
                        String::from(config.horizon)
                    )
                };
                Booking {
                    customer,
                    at: now,
                    technician: None,
                    slot: None,
                    detail,
                    id: String::new(),
                    work_order: String::new(),
                    parts: Vec::new(),
                    confirmed: false,
                    cancelled: false,
                    case_id,
                    partner: false,
                }
            }
        };
        let (to, body) = (
            Address::Customer(booking.customer.clone()),
            booking.body(&key),
        );
        self.state.bookings.insert(key, booking);
        send(ctx, &mut self.state.seq, &self.me, Self::KIND, to, body);
        Ok(Status::Done)
    }
}

impl Twin for Scheduler {
    type Msg = Mail;
    type Reply = Status;
    type Env = Tenants<SchedulerConfig>;
    const KIND: &'static str = "scheduler";

    fn create(id: &str, _env: &Self::Env) -> Result<Self> {
        let tenant = tenant_id(Self::KIND, id)?;
        Ok(Self {
            me: Address::Scheduler(tenant.clone()),
            tenant,
            state: State::default(),
        })
    }

    fn restore(id: &str, snapshot: &[u8], _env: &Self::Env) -> Result<Self> {
        let tenant = tenant_id(Self::KIND, id)?;
        let mut state: State = decode_snapshot(id, snapshot)?;
        state.rebuild_calendars();
        Ok(Self {
            me: Address::Scheduler(tenant.clone()),
            tenant,
            state,
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).expect("plain data always serialises")
    }

    fn handle(&mut self, mail: Mail, ctx: &mut Ctx, env: &Self::Env) -> Status {
        if let Err(why) = admit(&self.me, &mail) {
            return refuse(Self::KIND, &self.tenant, &mail.id, why);
        }
        let id = mail.id;
        let out = match mail.body {
            Body::Book {
                key,
                customer,
                case_id,
                skill,
                region,
                not_before_ms,
                windows,
                duration_ms,
                confirmed,
            } => {
                let ask = Ask {
                    key,
                    customer,
                    case_id,
                    skill,
                    region,
                    not_before_ms,
                    windows,
                    duration_ms,
                    confirmed,
                };
                self.book(ctx, env.get(&self.tenant), ask)
            }
            Body::OpenWorkOrder(req) => self.open_work_order(ctx, env.get(&self.tenant), req),
            Body::WorkOrderProgress {
                work_order_id,
                state,
                notes,
            } => self.work_order_progress(ctx, env.get(&self.tenant), &work_order_id, state, notes),
            Body::BookSlot(req) => self.book_slot(ctx, env.get(&self.tenant), req),
            Body::CancelBooking {
                appointment_id,
                reason,
            } => match self.appointment(&appointment_id).map(|(k, _)| k.to_owned()) {
                Some(key) => Ok(self.cancel(&key, &reason, ctx)),
                None => Err(format!("unknown appointment {appointment_id:?}")),
            },
            Body::ConfirmVisit { key } => self
                .customers_booking(&mail.from, &key)
                .map(|()| self.confirm(&key, ctx)),
            Body::CancelVisit { key, reason } => self
                .customers_booking(&mail.from, &key)
                .map(|()| self.cancel(&key, &reason, ctx)),
            Body::PartnerBooked(_) if mail.from != Address::FieldService(self.tenant.clone()) => {
                Err(format!(
                    "a partner's booking comes from its field service, not {:?}",
                    mail.from
                ))
            }
            Body::PartnerBooked(visit) => self.partner_booked(ctx, env.get(&self.tenant), visit),
            other => Err(format!("the scheduler does not take {}", body_name(&other))),
        };
        out.unwrap_or_else(|why| refuse(Self::KIND, &self.tenant, &id, why))
    }

    fn on_timer(&mut self, tag: &str, _ctx: &mut Ctx, _env: &Self::Env) {
        tracing::warn!(tenant = %self.tenant, tag, "the scheduler arms no timers");
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, mail, sent};
    use super::*;
    use crate::model::HOUR_MS;
    use crate::store::Op;

    /// Monday 2024-01-01 00:00 UTC.
    const MON: u64 = 1_704_067_200_000;
    const MIN: u64 = 60_000;

    fn at(day: u64, h: u64, m: u64) -> u64 {
        MON + day * DAY_MS + h * HOUR_MS + m * MIN
    }

    fn tech(
        id: &str,
        skills: &[&str],
        regions: &[&str],
        days: &[Weekday],
        start: &str,
        end: &str,
    ) -> TechnicianConfig {
        TechnicianConfig {
            id: id.into(),
            skills: skills.iter().map(|s| (*s).into()).collect(),
            regions: regions.iter().map(|s| (*s).into()).collect(),
            days: days.to_vec(),
            start: TimeOfDay::try_from(start.to_owned()).unwrap(),
            end: TimeOfDay::try_from(end.to_owned()).unwrap(),
        }
    }

    fn env() -> Tenants<SchedulerConfig> {
        use Weekday::*;
        let weekdays = [Mon, Tue, Wed, Thu, Fri];
        Tenants::all(SchedulerConfig {
            technicians: vec![
                tech("ana", &["boiler"], &["north"], &weekdays, "08:00", "17:00"),
                tech(
                    "ben",
                    &["boiler", "hvac"],
                    &["north", "south"],
                    &weekdays,
                    "10:00",
                    "18:00",
                ),
                tech("cy", &["hvac"], &["north"], &[Sat, Sun], "08:00", "12:00"),
            ],
            ..SchedulerConfig::default()
        })
    }

    fn book(
        key: &str,
        skill: &str,
        region: &str,
        not_before: u64,
        windows: &[(u64, u64)],
        minutes: u64,
    ) -> Mail {
        mail(
            &format!("t1:cust-1/{key}"),
            Address::Customer("t1:cust-1".into()),
            Address::Scheduler("t1".into()),
            Body::Book {
                key: key.into(),
                customer: "t1:cust-1".into(),
                case_id: "case-1".into(),
                skill: skill.into(),
                region: region.into(),
                not_before_ms: not_before,
                windows: windows.to_vec(),
                duration_ms: minutes * MIN,
                confirmed: false,
            },
        )
    }

    /// One step, then a restore from the snapshot (calendars rebuilt), as after a restart.
    fn step(
        s: &mut Scheduler,
        env: &Tenants<SchedulerConfig>,
        now: u64,
        m: Mail,
    ) -> (Status, Vec<Mail>, Ctx) {
        let mut c = ctx(now);
        let status = s.handle(m, &mut c, env);
        if c.is_changed() {
            *s = Scheduler::restore("t1", &s.snapshot(), env).unwrap();
        }
        let mails = sent(&c);
        (status, mails, c)
    }

    fn booked(
        s: &mut Scheduler,
        env: &Tenants<SchedulerConfig>,
        now: u64,
        m: Mail,
    ) -> Option<(String, (u64, u64))> {
        let (status, mails, _) = step(s, env, now, m);
        assert_eq!(status, Status::Done);
        match &mails[..] {
            [
                Mail {
                    body:
                        Body::Booking {
                            technician,
                            slot,
                            detail,
                            ..
                        },
                    to,
                    ..
                },
            ] => {
                assert_eq!(*to, Address::Customer("t1:cust-1".into()));
                assert_eq!(technician.is_some(), slot.is_some(), "{detail}");
                technician.clone().zip(*slot)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn weekdays_count_from_a_thursday() {
        assert_eq!(Weekday::of_epoch_day(0), Weekday::Thu);
        assert_eq!(Weekday::of_epoch_day(MON / DAY_MS), Weekday::Mon);
        assert_eq!(Weekday::of_epoch_day(MON / DAY_MS + 5), Weekday::Sat);
    }

    #[test]
    fn the_earliest_slot_honours_skill_region_hours_windows_and_not_before() {
        let env = env();
        // (what, request, expected (technician, start, minutes))
        type Case = (&'static str, Mail, Option<(&'static str, u64, u64)>);
        let cases: Vec<Case> = vec![
            (
                "first slot of the day",
                book("a", "boiler", "north", MON, &[], 60),
                Some(("ana", at(0, 8, 0), 60)),
            ),
            (
                "not_before on the grid",
                book("b", "boiler", "north", at(0, 9, 10), &[], 60),
                Some(("ana", at(0, 9, 30), 60)),
            ),
            (
                "region: only ben covers south",
                book("c", "boiler", "south", MON, &[], 60),
                Some(("ben", at(0, 10, 0), 60)),
            ),
            (
                "skill: hvac on a weekday is ben's",
                book("d", "hvac", "north", MON, &[], 30),
                Some(("ben", at(0, 10, 0), 30)),
            ),
            (
                "hours: 2 h from 16:00 only fits ben",
                book("e", "boiler", "north", at(0, 16, 0), &[], 120),
                Some(("ben", at(0, 16, 0), 120)),
            ),
            (
                "hours: 3 h from 16:00 fits nobody until Tuesday",
                book("f", "boiler", "north", at(0, 16, 0), &[], 180),
                Some(("ana", at(1, 8, 0), 180)),
            ),
            (
                "weekend: cy",
                book("g", "hvac", "north", at(5, 0, 0), &[], 60),
                Some(("cy", at(5, 8, 0), 60)),
            ),
            (
                "Friday evening rolls to Monday",
                book("h", "boiler", "south", at(4, 18, 0), &[], 60),
                Some(("ben", at(7, 10, 0), 60)),
            ),
            (
                "windows: the first grid point inside one",
                book(
                    "i",
                    "boiler",
                    "north",
                    MON,
                    &[(at(3, 12, 15), at(3, 14, 0)), (at(1, 20, 0), at(1, 23, 0))],
                    60,
                ),
                Some(("ana", at(3, 12, 30), 60)),
            ),
            (
                "windows: too short ones are skipped",
                book(
                    "j",
                    "boiler",
                    "north",
                    MON,
                    &[(at(1, 9, 0), at(1, 9, 45)), (at(2, 9, 0), at(2, 11, 0))],
                    60,
                ),
                Some(("ana", at(2, 9, 0), 60)),
            ),
            (
                "windows: touching ones merge",
                book(
                    "k",
                    "boiler",
                    "north",
                    MON,
                    &[(at(1, 9, 0), at(1, 9, 30)), (at(1, 9, 30), at(1, 10, 0))],
                    60,
                ),
                Some(("ana", at(1, 9, 0), 60)),
            ),
            (
                "no such skill",
                book("l", "plumbing", "north", MON, &[], 60),
                None,
            ),
            (
                "no such region",
                book("m", "hvac", "south-east", MON, &[], 60),
                None,
            ),
            (
                "longer than any working day",
                book("n", "boiler", "north", MON, &[], 10 * 60),
                None,
            ),
            (
                "windows all past",
                book(
                    "o",
                    "boiler",
                    "north",
                    at(2, 0, 0),
                    &[(MON, at(1, 0, 0))],
                    60,
                ),
                None,
            ),
            (
                "windows beyond the horizon",
                book(
                    "p",
                    "boiler",
                    "north",
                    MON,
                    &[(at(70, 0, 0), at(71, 0, 0))],
                    60,
                ),
                None,
            ),
        ];
        for (what, m, want) in cases {
            // A fresh scheduler per case: only the constraints decide.
            let mut s = Scheduler::create("t1", &env).unwrap();
            let got = booked(&mut s, &env, MON, m);
            let want = want.map(|(t, start, min)| (t.to_owned(), (start, start + min * MIN)));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn failures_say_why() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let cases = [
            (
                book("a", "plumbing", "north", MON, &[], 60),
                "no technician",
            ),
            (
                book(
                    "b",
                    "boiler",
                    "north",
                    at(2, 0, 0),
                    &[(MON, at(1, 0, 0))],
                    60,
                ),
                "window has passed",
            ),
            (
                book("c", "boiler", "north", MON, &[], 10 * 60),
                "within 60d",
            ),
        ];
        for (m, want) in cases {
            let (_, mails, _) = step(&mut s, &env, MON, m);
            match &mails[0].body {
                Body::Booking {
                    technician: None,
                    detail,
                    ..
                } => assert!(detail.contains(want), "{detail}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn ties_go_to_the_technician_with_fewest_bookings_then_by_id() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        // Both free at 10:00 Monday: ana and ben have 0 bookings; ana by id.
        let w = [(at(0, 10, 0), at(0, 11, 0))];
        assert_eq!(
            booked(&mut s, &env, MON, book("a", "boiler", "north", MON, &w, 60))
                .unwrap()
                .0,
            "ana"
        );
        // Tuesday 10:00: ana has one booking, ben none → ben.
        let w = [(at(1, 10, 0), at(1, 11, 0))];
        assert_eq!(
            booked(&mut s, &env, MON, book("b", "boiler", "north", MON, &w, 60))
                .unwrap()
                .0,
            "ben"
        );
        // Wednesday 10:00: one each → ana by id.
        let w = [(at(2, 10, 0), at(2, 11, 0))];
        assert_eq!(
            booked(&mut s, &env, MON, book("c", "boiler", "north", MON, &w, 60))
                .unwrap()
                .0,
            "ana"
        );
    }

    #[test]
    fn the_past_is_never_booked() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let got = booked(
            &mut s,
            &env,
            at(0, 9, 5),
            book("a", "boiler", "north", MON, &[], 60),
        );
        assert_eq!(got, Some(("ana".into(), (at(0, 9, 30), at(0, 10, 30)))));
    }

    #[test]
    fn a_booking_is_made_once_however_often_it_is_asked_for() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let (status, first, c) = step(
            &mut s,
            &env,
            MON,
            book("case-1/visit", "boiler", "north", MON, &[], 60),
        );
        assert_eq!(status, Status::Done);
        assert_eq!(
            c.ops()
                .iter()
                .filter(|op| matches!(op, Op::PutIdempotency { .. }))
                .count(),
            1
        );
        match &first[0].body {
            Body::Booking { detail, .. } => assert_eq!(detail, "t1:wo-1"),
            other => panic!("{other:?}"),
        }
        for i in 1..=5 {
            // Even asked differently: the key decides.
            let (status, again, c) = step(
                &mut s,
                &env,
                MON + i,
                book("case-1/visit", "hvac", "south", MON, &[], 120),
            );
            assert_eq!(status, Status::Duplicate);
            assert_eq!(again[0].body, first[0].body);
            assert_ne!(again[0].id, first[0].id, "new mail, same answer");
            assert!(
                !c.ops()
                    .iter()
                    .any(|op| matches!(op, Op::PutIdempotency { .. }))
            );
        }
        assert_eq!(s.calendar("ana").len() + s.calendar("ben").len(), 1);
        // A failure is remembered just the same.
        let (_, failed, _) = step(
            &mut s,
            &env,
            MON,
            book("x", "plumbing", "north", MON, &[], 60),
        );
        let (status, again, _) = step(
            &mut s,
            &env,
            MON,
            book("x", "plumbing", "north", MON, &[], 60),
        );
        assert_eq!(
            (status, &again[0].body),
            (Status::Duplicate, &failed[0].body)
        );
    }

    /// The obvious search: every grid point of every working day, every constraint
    /// checked directly. The scheduler must agree with it on every request.
    fn brute_force(
        s: &Scheduler,
        config: &SchedulerConfig,
        req: &Request<'_>,
    ) -> Option<(String, u64)> {
        let slot = config.slot.ms();
        let limit = req.from + config.horizon.ms();
        let mut best: Option<(u64, usize, String)> = None;
        for t in &config.technicians {
            if !t.skills.iter().any(|x| x == req.skill)
                || !t.regions.iter().any(|x| x == req.region)
            {
                continue;
            }
            let cal = s.calendar(&t.id);
            for day in req.from / DAY_MS..=limit / DAY_MS {
                if !t.days.contains(&Weekday::of_epoch_day(day)) {
                    continue;
                }
                let (ws, we) = (day * DAY_MS + t.start.ms(), day * DAY_MS + t.end.ms());
                let mut start = ws;
                while start + req.duration <= we {
                    let end = start + req.duration;
                    let ok = start >= req.from
                        && start <= limit
                        && (req.windows.is_empty()
                            || req.windows.iter().any(|w| w.0 <= start && end <= w.1))
                        && cal.iter().all(|v| v.1 <= start || end <= v.0);
                    if ok {
                        let c = (start, cal.len(), t.id.clone());
                        if best.as_ref().is_none_or(|b| c < *b) {
                            best = Some(c);
                        }
                        break;
                    }
                    start += slot;
                }
            }
        }
        best.map(|(start, _, id)| (id, start))
    }

    #[test]
    fn many_bookings_match_the_obvious_search_and_never_overlap() {
        use Weekday::*;
        let all = [Mon, Tue, Wed, Thu, Fri, Sat, Sun];
        let env = Tenants::all(SchedulerConfig {
            technicians: vec![
                tech(
                    "t-a",
                    &["boiler"],
                    &["n", "s"],
                    &[Mon, Tue, Wed, Thu, Fri],
                    "08:00",
                    "17:00",
                ),
                tech(
                    "t-b",
                    &["boiler", "hvac"],
                    &["n"],
                    &[Mon, Wed, Fri, Sat],
                    "07:30",
                    "15:30",
                ),
                tech("t-c", &["hvac"], &["s", "n"], &all, "12:00", "22:00"),
                tech("t-d", &["boiler"], &["s"], &[Tue, Thu], "09:00", "13:00"),
            ],
            slot: Span::minutes(15),
            horizon: Span::days(21),
            max_records: 1_000,
            ..SchedulerConfig::default()
        });
        let config = env.get("t1");
        let mut s = Scheduler::create("t1", &env).unwrap();
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut booked_count = 0;
        for i in 0..400 {
            let skill = ["boiler", "hvac"][next(2) as usize];
            let region = ["n", "s"][next(2) as usize];
            let not_before = MON + next(10 * DAY_MS / MIN) * MIN;
            let minutes = [15, 30, 45, 60, 90, 120, 240][next(7) as usize];
            let windows: Vec<(u64, u64)> = (0..next(4))
                .map(|_| {
                    let a = MON + next(20 * DAY_MS / MIN) * MIN;
                    (a, a + (30 + next(600)) * MIN)
                })
                .collect();
            let now = MON + i * 1_000;
            let from = not_before.max(now);
            let req = Request {
                skill,
                region,
                from,
                duration: minutes * MIN,
                windows: merge_windows(windows.clone(), from),
            };
            // Windows given but all past: no slot (not "any time").
            let all_past = !windows.is_empty() && req.windows.is_empty();
            let want = if all_past {
                None
            } else {
                brute_force(&s, config, &req)
            };
            let m = book(
                &format!("k{i}"),
                skill,
                region,
                not_before,
                &windows,
                minutes,
            );
            let mut c = ctx(now);
            assert_eq!(s.handle(m, &mut c, &env), Status::Done);
            let got = match &sent(&c)[0].body {
                Body::Booking {
                    technician, slot, ..
                } => technician.clone().zip(slot.map(|s| s.0)),
                other => panic!("{other:?}"),
            };
            assert_eq!(got, want, "request {i}: {req:?}");
            booked_count += usize::from(got.is_some());
        }
        assert!(
            booked_count > 200,
            "the test must exercise crowded calendars: {booked_count}"
        );
        // The restored scheduler sees the same calendars, each sorted with no overlap.
        let restored = Scheduler::restore("t1", &s.snapshot(), &env).unwrap();
        for t in &config.technicians {
            let cal = restored.calendar(&t.id);
            assert_eq!(cal, s.calendar(&t.id));
            assert!(
                cal.windows(2).all(|w| w[0].1 <= w[1].0),
                "{}: {cal:?}",
                t.id
            );
        }
        let total: usize = config
            .technicians
            .iter()
            .map(|t| restored.calendar(&t.id).len())
            .sum();
        assert_eq!(total, booked_count);
    }

    #[test]
    fn a_cancelled_visit_frees_its_slot() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let a = booked(
            &mut s,
            &env,
            MON,
            book("a", "boiler", "north", MON, &[], 60),
        )
        .unwrap();
        assert_eq!(a, ("ana".into(), (at(0, 8, 0), at(0, 9, 0))));
        let b = booked(
            &mut s,
            &env,
            MON,
            book("b", "boiler", "north", MON, &[], 60),
        )
        .unwrap();
        assert_eq!(b.1.0, at(0, 9, 0));
        let mut c = ctx(MON);
        assert_eq!(s.cancel("a", "plans changed", &mut c), Status::Done);
        match &sent(&c)[..] {
            [
                Mail {
                    body:
                        Body::Booking {
                            technician: None,
                            slot: None,
                            detail,
                            ..
                        },
                    ..
                },
            ] => {
                assert!(detail.starts_with("cancelled"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.cancel("a", "plans changed", &mut ctx(MON)),
            Status::Duplicate
        );
        assert_eq!(
            s.cancel("nope", "plans changed", &mut ctx(MON)),
            Status::Ignored
        );
        let c2 = booked(
            &mut s,
            &env,
            MON,
            book("c", "boiler", "north", MON, &[], 60),
        )
        .unwrap();
        assert_eq!(c2.1.0, at(0, 8, 0), "the freed slot is taken again");
    }

    #[test]
    fn the_customer_confirms_or_declines_a_proposed_visit_and_only_their_own() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let customer = Address::Customer("t1:cust-1".into());
        let desk = Address::Scheduler("t1".into());
        for key in ["a", "b"] {
            booked(
                &mut s,
                &env,
                MON,
                book(key, "boiler", "north", MON, &[], 60),
            )
            .unwrap();
        }
        assert!(!s.booking("a").unwrap().confirmed, "held as proposed");
        let confirm = |id: &str, from: &Address, key: &str| {
            mail(
                id,
                from.clone(),
                desk.clone(),
                Body::ConfirmVisit { key: key.into() },
            )
        };
        // Only the customer it is for answers for it.
        let stranger = Address::Customer("t1:cust-2".into());
        let (st, _, _) = step(&mut s, &env, MON, confirm("t1:cust-2/1", &stranger, "a"));
        assert!(matches!(st, Status::Refused(_)), "{st:?}");
        assert!(!s.booking("a").unwrap().confirmed);
        let (st, _, _) = step(
            &mut s,
            &env,
            MON + 1,
            confirm("t1:cust-1/9", &customer, "a"),
        );
        assert_eq!(st, Status::Done);
        let a = s.booking("a").unwrap();
        assert!(a.confirmed && a.at == MON + 1, "{a:?}");
        let (st, _, _) = step(
            &mut s,
            &env,
            MON + 2,
            confirm("t1:cust-1/10", &customer, "a"),
        );
        assert_eq!(st, Status::Duplicate);
        // A decline cancels: the slot is free again, the customer told.
        let decline = mail(
            "t1:cust-1/11",
            customer.clone(),
            desk.clone(),
            Body::CancelVisit {
                key: "b".into(),
                reason: "declined by the customer".into(),
            },
        );
        let (st, out, _) = step(&mut s, &env, MON, decline);
        assert_eq!(st, Status::Done);
        assert!(s.booking("b").unwrap().cancelled);
        assert!(
            matches!(&out[..], [Mail { body: Body::Booking { technician: None, detail, .. }, .. }] if detail.contains("declined")),
            "{out:?}"
        );
        assert_eq!(
            s.calendar("ana").len(),
            1,
            "only the confirmed visit holds a slot"
        );
        // A cancelled visit is not confirmed any more.
        let (st, _, _) = step(&mut s, &env, MON, confirm("t1:cust-1/12", &customer, "b"));
        assert_eq!(st, Status::Ignored);
    }

    #[test]
    fn a_partners_visit_is_kept_outside_the_calendars_and_its_cancel_goes_to_the_partner() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let partner = Address::FieldService("t1".into());
        let desk = Address::Scheduler("t1".into());
        let visit = |from: &Address| {
            mail(
                "t1/field-service/k1/booked",
                from.clone(),
                desk.clone(),
                Body::PartnerBooked(PartnerVisit {
                    key: "k1".into(),
                    customer: "t1:cust-1".into(),
                    case_id: "case-1".into(),
                    technician: "ana".into(),
                    slot: (at(0, 8, 0), at(0, 9, 0)),
                    reference: "FS-7".into(),
                    confirmed: false,
                }),
            )
        };
        let customer = Address::Customer("t1:cust-1".into());
        let (st, _, _) = step(&mut s, &env, MON, visit(&customer));
        assert!(
            matches!(st, Status::Refused(_)),
            "only the partner reports its visits"
        );
        let (st, out, _) = step(&mut s, &env, MON, visit(&partner));
        assert_eq!((st, out.len()), (Status::Done, 0));
        let (st, _, _) = step(&mut s, &env, MON, visit(&partner));
        assert_eq!(st, Status::Duplicate);
        let (key, b) = s.appointment("t1:ap-1").unwrap();
        assert_eq!(
            (key, b.partner, b.work_order.as_str()),
            ("k1", true, "t1:wo-1")
        );
        assert!(
            s.calendar("ana").is_empty(),
            "the partner's calendar holds it"
        );
        assert!(s.work_order("t1:wo-1").is_some(), "a scheduled work order");
        // Cancelled here: the partner is told to free its slot, in the same step.
        let cancel = mail(
            "t1/api/1",
            desk.clone(),
            desk.clone(),
            Body::CancelBooking {
                appointment_id: "t1:ap-1".into(),
                reason: "plans changed".into(),
            },
        );
        let (st, out, _) = step(&mut s, &env, MON, cancel);
        assert_eq!(st, Status::Done);
        let to_partner: Vec<_> = out.iter().filter(|m| m.to == partner).collect();
        assert!(
            matches!(&to_partner[..], [Mail { body: Body::CancelVisit { key, .. }, .. }] if key == "k1"),
            "{out:?}"
        );
    }

    #[test]
    fn past_visits_are_forgotten_future_ones_kept() {
        let env = Tenants::all(SchedulerConfig {
            max_records: 3,
            ..env().default
        });
        let mut s = Scheduler::create("t1", &env).unwrap();
        for k in ["a", "b", "c"] {
            assert!(booked(&mut s, &env, MON, book(k, "boiler", "north", MON, &[], 60)).is_some());
        }
        // Three visits ahead: full.
        let (status, _, _) = step(
            &mut s,
            &env,
            MON,
            book("d", "boiler", "north", MON, &[], 60),
        );
        assert!(matches!(status, Status::Refused(_)), "{status:?}");
        // Monday 09:00: the 08:00 visit is over and makes room.
        let d = booked(
            &mut s,
            &env,
            at(0, 9, 0),
            book("d", "boiler", "north", MON, &[], 60),
        )
        .unwrap();
        assert!(s.booking("a").is_none());
        assert!(d.1.0 >= at(0, 9, 0));
        assert!(s.calendar("ana").iter().all(|v| v.1 > at(0, 9, 0)));
    }

    #[test]
    fn foreign_and_unexpected_mail_is_refused() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let mut foreign = book("a", "boiler", "north", MON, &[], 60);
        foreign.from = Address::Customer("t2:cust-1".into());
        let mut for_other = book("a", "boiler", "north", MON, &[], 60);
        if let Body::Book { customer, .. } = &mut for_other.body {
            *customer = "t2:cust-1".into();
        }
        let mut to_parts = book("a", "boiler", "north", MON, &[], 60);
        to_parts.to = Address::Parts("t1".into());
        let unexpected = mail(
            "m",
            Address::Customer("t1:cust-1".into()),
            Address::Scheduler("t1".into()),
            Body::HandoffUpdate {
                case_id: "c".into(),
                state: "accepted".into(),
                agent: None,
            },
        );
        let empty_window = book(
            "a",
            "boiler",
            "north",
            MON,
            &[(at(1, 9, 0), at(1, 9, 0))],
            60,
        );
        let zero = book("a", "boiler", "north", MON, &[], 0);
        for m in [foreign, for_other, to_parts, unexpected, empty_window, zero] {
            let mut c = ctx(MON);
            let status = s.handle(m.clone(), &mut c, &env);
            assert!(matches!(status, Status::Refused(_)), "{m:?}");
            assert!(c.ops().is_empty() && !c.is_changed(), "{m:?}");
        }
        assert!(s.booking("a").is_none());
    }

    fn work_mail(body: Body) -> Mail {
        mail(
            "grpc/x",
            Address::Scheduler("t1".into()),
            Address::Scheduler("t1".into()),
            body,
        )
    }

    fn open(key: &str) -> Mail {
        work_mail(Body::OpenWorkOrder(WorkOrderRequest {
            key: key.into(),
            customer: "t1:cust-1".into(),
            device: "t1:boiler-1".into(),
            site: "t1:home-1".into(),
            case_id: String::new(),
            failure_mode: "pump_wear".into(),
            description: "replace the pump".into(),
            priority: Priority::High,
        }))
    }

    fn slot_request(key: &str, wo: &str, tech: &str, slot: (u64, u64)) -> Mail {
        work_mail(Body::BookSlot(SlotRequest {
            key: key.into(),
            work_order_id: wo.into(),
            technician: tech.into(),
            slot,
            part_orders: vec!["t1:po-1".into()],
            confirmed: true,
        }))
    }

    fn free(s: &Scheduler, env: &Tenants<SchedulerConfig>, tech: &str, day: u64) -> Vec<u64> {
        let q = SlotQuery {
            technician: Some(tech),
            skill: None,
            from: at(day, 0, 0),
            to: at(day + 1, 0, 0),
            now: MON,
            free_only: true,
        };
        s.slots(env.get("t1"), &q)
            .into_iter()
            .map(|e| e.slot.0)
            .collect()
    }

    #[test]
    fn a_work_order_is_opened_once_booked_into_a_free_slot_and_cancelled_back_to_open() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        let (status, mails, c) = step(&mut s, &env, MON, open("api/k1"));
        assert_eq!((status, mails.len()), (Status::Done, 0));
        assert_eq!(
            c.ops()
                .iter()
                .filter(|op| matches!(op, Op::PutIdempotency { .. }))
                .count(),
            1,
            "the key is claimed with the work order"
        );
        for _ in 0..3 {
            let (status, _, c) = step(&mut s, &env, MON + 1, open("api/k1"));
            assert_eq!((status, c.ops().len()), (Status::Duplicate, 0));
        }
        assert_eq!(s.work_orders().len(), 1);
        let (id, wo) = s.work_order_by_key("api/k1").unwrap();
        assert_eq!(id, "t1:wo-1");
        assert_eq!(wo.state, WorkOrderState::Open);

        // ana works 08:00-17:00 in 30 min slots: 18 free on Monday.
        assert_eq!(free(&s, &env, "ana", 0).len(), 18);
        let visit = (at(0, 10, 0), at(0, 11, 0));
        let (status, _, _) = step(&mut s, &env, MON, slot_request("ap/1", &id, "ana", visit));
        assert_eq!(status, Status::Done);
        let free_now = free(&s, &env, "ana", 0);
        assert_eq!(free_now.len(), 16);
        assert!(!free_now.contains(&at(0, 10, 0)) && !free_now.contains(&at(0, 10, 30)));
        let wo = s.work_order(&id).unwrap();
        assert_eq!(wo.state, WorkOrderState::Scheduled);
        assert_eq!(wo.part_orders, ["t1:po-1"]);
        let (key, b) = s.appointment("t1:ap-1").unwrap();
        assert_eq!((key, b.slot, b.confirmed), ("ap/1", Some(visit), true));
        // Listed with its appointment when not only free slots are asked for.
        let q = SlotQuery {
            technician: Some("ana"),
            skill: Some("boiler"),
            from: at(0, 0, 0),
            to: at(1, 0, 0),
            now: MON,
            free_only: false,
        };
        let all = s.slots(env.get("t1"), &q);
        assert_eq!(all.len(), 17);
        assert_eq!(all[4].appointment.as_deref(), Some("t1:ap-1"));
        // The same key again books nothing; a second booking of the order is refused.
        let (status, _, c) = step(&mut s, &env, MON, slot_request("ap/1", &id, "ana", visit));
        assert_eq!((status, c.ops().len()), (Status::Duplicate, 0));
        let other = (at(0, 14, 0), at(0, 15, 0));
        let (status, _, c) = step(&mut s, &env, MON, slot_request("ap/2", &id, "ana", other));
        assert_eq!((status, c.ops().len()), (Status::Ignored, 0));

        let cancel = work_mail(Body::CancelBooking {
            appointment_id: "t1:ap-1".into(),
            reason: "customer away".into(),
        });
        let (status, mails, _) = step(&mut s, &env, MON, cancel.clone());
        assert_eq!(status, Status::Done);
        assert!(matches!(
            mails[..],
            [Mail {
                body: Body::Booking {
                    technician: None,
                    ..
                },
                ..
            }]
        ));
        assert_eq!(free(&s, &env, "ana", 0).len(), 18, "the slot is free again");
        let wo = s.work_order(&id).unwrap();
        assert_eq!(
            (wo.state, wo.appointment.clone()),
            (WorkOrderState::Open, None)
        );
        let (_, b) = s.appointment("t1:ap-1").unwrap();
        assert!(b.cancelled && b.slot == Some(visit), "kept for the record");
        assert_eq!(step(&mut s, &env, MON, cancel).0, Status::Duplicate);
        // Open again: it can be booked again.
        let (status, _, _) = step(&mut s, &env, MON, slot_request("ap/3", &id, "ana", visit));
        assert_eq!(status, Status::Done);
    }

    #[test]
    fn slots_that_are_taken_past_or_outside_hours_are_not_booked() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        step(&mut s, &env, MON, open("a"));
        step(&mut s, &env, MON, open("b"));
        let visit = (at(0, 10, 0), at(0, 11, 0));
        step(
            &mut s,
            &env,
            MON,
            slot_request("x1", "t1:wo-1", "ana", visit),
        );
        let config = env.get("t1");
        let overlapping = (at(0, 10, 30), at(0, 11, 30));
        assert!(matches!(
            s.check_slot(config, "ana", overlapping, MON),
            Err(SlotError::Busy(_))
        ));
        let (status, _, c) = step(
            &mut s,
            &env,
            MON,
            slot_request("x2", "t1:wo-2", "ana", overlapping),
        );
        assert_eq!((status, c.ops().len()), (Status::Ignored, 0));
        for (tech, slot, now) in [
            ("nobody", visit, MON),
            ("ana", (at(0, 7, 0), at(0, 8, 30)), MON),
            ("ana", (at(0, 16, 30), at(0, 17, 30)), MON),
            ("ana", (at(5, 10, 0), at(5, 11, 0)), MON),
            ("ana", (at(1, 10, 0), at(1, 10, 0)), MON),
            ("ana", (at(1, 10, 0), at(1, 11, 0)), at(1, 12, 0)),
        ] {
            let mut c = ctx(now);
            let status = s.handle(slot_request("x3", "t1:wo-2", tech, slot), &mut c, &env);
            assert!(
                matches!(status, Status::Refused(_)),
                "{tech} {slot:?}: {status:?}"
            );
            assert!(c.ops().is_empty());
        }
        // Another visit of ben does not touch ana's calendar.
        let (status, _, _) = step(
            &mut s,
            &env,
            MON,
            slot_request("x4", "t1:wo-2", "ben", visit),
        );
        assert_eq!(status, Status::Done);
        // Free slots never start in the past.
        let q = SlotQuery {
            technician: Some("ana"),
            skill: None,
            from: at(0, 0, 0),
            to: at(1, 0, 0),
            now: at(0, 15, 10),
            free_only: true,
        };
        let starts: Vec<u64> = s.slots(config, &q).iter().map(|e| e.slot.0).collect();
        assert_eq!(starts, [at(0, 15, 30), at(0, 16, 0), at(0, 16, 30)]);
    }

    #[test]
    fn work_orders_move_only_forward_and_cancelling_frees_the_slot() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        step(&mut s, &env, MON, open("a"));
        let visit = (at(0, 10, 0), at(0, 11, 0));
        step(
            &mut s,
            &env,
            MON,
            slot_request("v", "t1:wo-1", "ana", visit),
        );
        let progress = |state| {
            work_mail(Body::WorkOrderProgress {
                work_order_id: "t1:wo-1".into(),
                state,
                notes: "on it".into(),
            })
        };
        let (status, _, _) = step(&mut s, &env, MON, progress(WorkOrderState::InProgress));
        assert_eq!(status, Status::Done);
        assert_eq!(
            step(&mut s, &env, MON, progress(WorkOrderState::InProgress)).0,
            Status::Duplicate
        );
        let mut c = ctx(MON);
        assert!(matches!(
            s.handle(progress(WorkOrderState::Open), &mut c, &env),
            Status::Refused(_)
        ));
        assert_eq!(
            step(&mut s, &env, MON, progress(WorkOrderState::Cancelled)).0,
            Status::Done
        );
        assert!(
            s.calendar("ana").is_empty(),
            "a cancelled order frees its visit"
        );
        assert_eq!(
            step(&mut s, &env, MON, progress(WorkOrderState::Completed)).0,
            Status::Ignored,
            "cancelled is final"
        );
        assert_eq!(s.work_order("t1:wo-1").unwrap().notes, "on it");
    }

    #[test]
    fn work_orders_and_bookings_together_stay_within_a_snapshot() {
        let env = Tenants::all(SchedulerConfig {
            max_records: 10_000,
            ..env().default
        });
        let mut s = Scheduler::create("t1", &env).unwrap();
        let mut refused = false;
        for i in 0..1_000 {
            let mut m = open(&format!("api/wo/{i}"));
            if let Body::OpenWorkOrder(r) = &mut m.body {
                r.description = "x".repeat(MAX_TEXT);
            }
            if matches!(s.handle(m, &mut ctx(MON), &env), Status::Refused(_)) {
                refused = true;
                break;
            }
        }
        assert!(
            refused,
            "open work orders alone fill their share, then are refused"
        );
        for i in 0..1_000 {
            let m = book(&format!("b{i}"), "boiler", "north", MON, &[], 30);
            if matches!(s.handle(m, &mut ctx(MON), &env), Status::Refused(_)) {
                break;
            }
        }
        let bytes = s.snapshot().len();
        assert!(
            bytes <= crate::store::MAX_VALUE_BYTES,
            "{bytes} bytes do not fit a store value"
        );
    }

    #[test]
    fn a_twins_booking_is_a_scheduled_work_order() {
        let env = env();
        let mut s = Scheduler::create("t1", &env).unwrap();
        booked(
            &mut s,
            &env,
            MON,
            book("case-1/visit-2", "boiler", "north", MON, &[], 60),
        )
        .unwrap();
        let (id, wo) = s.work_order_by_key("case-1/visit-2").unwrap();
        assert_eq!(id, "t1:wo-1");
        assert_eq!(wo.state, WorkOrderState::Scheduled);
        assert_eq!(wo.case_id, "case-1");
        let (key, b) = s.appointment("t1:ap-1").unwrap();
        assert_eq!((key, b.work_order.as_str()), ("case-1/visit-2", "t1:wo-1"));
        // A change from the field makes it a record of its own.
        let progress = work_mail(Body::WorkOrderProgress {
            work_order_id: "t1:wo-1".into(),
            state: WorkOrderState::InProgress,
            notes: String::new(),
        });
        assert_eq!(step(&mut s, &env, MON, progress).0, Status::Done);
        let wo = s.work_order("t1:wo-1").unwrap();
        assert_eq!(
            (wo.state, wo.appointment.as_deref()),
            (WorkOrderState::InProgress, Some("case-1/visit-2"))
        );
        assert_eq!(s.work_orders().len(), 1, "not listed twice");
    }

    #[test]
    fn settings_load_from_toml_and_bad_values_are_named() {
        let text = r#"
            [tenant.t1]
            slot = "15m"
            [[tenant.t1.technicians]]
            id = "tech-ana"
            skills = ["boiler"]
            regions = ["north"]
            [[tenant.t1.technicians]]
            id = "tech-ben"
            skills = ["hvac"]
            regions = ["south"]
            days = ["sat", "sun"]
            start = "06:30"
            end = "24:00"
        "#;
        let t: Tenants<SchedulerConfig> = toml::from_str(text).unwrap();
        t.validate().unwrap();
        let c = t.get("t1");
        assert_eq!(c.slot, Span::minutes(15));
        assert_eq!(c.horizon, Span::days(60));
        assert_eq!(c.technicians[0].days, default_days());
        assert_eq!(
            (c.technicians[0].start.0, c.technicians[0].end.0),
            (480, 1020)
        );
        assert_eq!(
            (c.technicians[1].start.0, c.technicians[1].end.0),
            (390, 1440)
        );
        assert!(t.get("t2").technicians.is_empty());

        for bad in ["25:00", "8:00", "08:60", "24:01", "0800"] {
            let text = format!(
                "[[default.technicians]]\nid = \"a\"\nskills = []\nregions = []\nstart = \"{bad}\"\n"
            );
            let err = toml::from_str::<Tenants<SchedulerConfig>>(&text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(bad), "{err}");
        }
        let text =
            "[[tenant.t1.technicians]]\nid = \"a\"\nskills = []\nregions = []\nstart = \"18:00\"\n";
        let err = toml::from_str::<Tenants<SchedulerConfig>>(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenant t1") && err.contains("\"a\""), "{err}");
    }
}
