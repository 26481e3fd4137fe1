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
//! # Cost
//! The search walks day by day up to the horizon and, within a day, jumps from one
//! obstacle to the next (the end of an overlapping visit, the start of the next customer
//! window) instead of stepping slot by slot: per request about `horizon days ×
//! technicians × (visits that day + windows)` steps, with binary searches into each
//! technician's calendar, which is kept sorted.

use super::{
    Settings, Span, Status, Tenants, admit, body_name, check_key, check_limits, claim,
    decode_snapshot, default_max_records, default_retain, make_room, refuse, send, tenant_id,
};
use crate::host::{Ctx, Twin};
use crate::mail::{Address, Body, Mail, tenant_of};
use crate::model::{DAY_MS, TimeMs};
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
}

impl Booking {
    fn body(&self, key: &str) -> Body {
        Body::Booking {
            key: key.to_owned(),
            technician: self.technician.clone(),
            slot: self.slot,
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
    /// Each technician's visits, sorted and disjoint: derived from `bookings`.
    #[serde(skip)]
    calendars: BTreeMap<String, Vec<(TimeMs, TimeMs)>>,
}

impl State {
    fn rebuild_calendars(&mut self) {
        self.calendars.clear();
        for b in self.bookings.values() {
            if let (Some(t), Some(slot)) = (&b.technician, b.slot) {
                self.calendars.entry(t.clone()).or_default().push(slot);
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
    skill: String,
    region: String,
    not_before_ms: TimeMs,
    windows: Vec<(TimeMs, TimeMs)>,
    duration_ms: u64,
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

    /// Every booking the scheduler still keeps, by key.
    pub fn bookings(&self) -> impl Iterator<Item = (&str, &Booking)> {
        self.state.bookings.iter().map(|(k, b)| (k.as_str(), b))
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

    /// Cancels booking `key`: its technician's slot is freed and the customer is told
    /// (`Booking` with no technician, detail `cancelled`). A failed, cancelled or unknown
    /// booking is left alone.
    ///
    /// Not reachable by mail yet: it needs a `Body::CancelBooking { key }` variant.
    pub fn cancel(&mut self, key: &str, ctx: &mut Ctx) -> Status {
        let Some(b) = self.state.bookings.get_mut(key) else {
            return Status::Ignored;
        };
        let (Some(tech), Some(slot)) = (b.technician.take(), b.slot.take()) else {
            return Status::Duplicate;
        };
        b.detail = format!("cancelled ({})", b.detail);
        b.at = ctx.now();
        if let Some(cal) = self.state.calendars.get_mut(&tech)
            && let Ok(i) = cal.binary_search(&slot)
        {
            cal.remove(i);
        }
        let (to, body) = (Address::Customer(b.customer.clone()), b.body(key));
        send(ctx, &mut self.state.seq, &self.me, Self::KIND, to, body);
        Status::Done
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
            skill,
            region,
            not_before_ms,
            windows,
            duration_ms,
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
        let visit_over = |b: &Booking| match b.slot {
            Some((_, end)) => (end <= now).then_some(end),
            None => Some(b.at),
        };
        let room = make_room(
            &mut self.state.bookings,
            now,
            config.retain,
            config.max_records,
            visit_over,
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
                    detail: format!("{}/wo-{}", self.tenant, self.state.work_orders),
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
                case_id: _,
                skill,
                region,
                not_before_ms,
                windows,
                duration_ms,
            } => {
                let ask = Ask {
                    key,
                    customer,
                    skill,
                    region,
                    not_before_ms,
                    windows,
                    duration_ms,
                };
                self.book(ctx, env.get(&self.tenant), ask)
            }
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
            Body::Booking { detail, .. } => assert_eq!(detail, "t1/wo-1"),
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
        assert_eq!(s.cancel("a", &mut c), Status::Done);
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
        assert_eq!(s.cancel("a", &mut ctx(MON)), Status::Duplicate);
        assert_eq!(s.cancel("nope", &mut ctx(MON)), Status::Ignored);
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
