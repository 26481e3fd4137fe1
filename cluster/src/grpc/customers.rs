//! `CustomerService`: customers as integrators see them — profile, preferences, consent —
//! and the data-protection rights to export and erase.
//!
//! A customer is made of three things, each kept where it belongs:
//! - the **customer twin** (`customer/<id>`): tier, region, preferences, consent, devices,
//!   cases; what the deciding code needs, nothing that names the person;
//! - the **personal record** in the [`Vault`]: name, CRM reference, contact points,
//!   locale, consent history, sealed with the customer's data key;
//! - the tenant's **customer index** in the vault, which lists them.
//!
//! Erasure tells the twin to become a tombstone, detaches the devices (their twins forget
//! owner, site and what they learnt), then destroys the personal record and the data key in
//! one batch that also writes the erasure report. Agents' notes and resolution summaries,
//! which stay in the append-only case log, were sealed with that key (see
//! [`super::cases`]), so they are unreadable from then on: crypto-shredding.

use super::auth::{Principal, Scope};
use super::cases::Cases;
use super::convert;
use super::notifications::Notifications;
use super::work;
use crate::node::now_ms;
use crate::pii::{ConsentChange, Contact, PersonalRecord, Vault};
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::model::ConsentScope;
use caretwin_actors::policy::{self, Availability, Channel, QuietHours, ValueTier};
use caretwin_actors::store::{Key, Store};
use caretwin_actors::system::System;
use caretwin_actors::twins::customer::{
    Case as TwinCase, CaseState as TwinCaseState, CustomerMsg, CustomerReply, Profile,
};
use caretwin_actors::twins::device::{DeviceMsg, DeviceReply};
use caretwin_proto::v1::{self, customer_service_server::CustomerService};
use futures::Stream;
use prost::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Longest customer id, in bytes.
const MAX_ID_BYTES: usize = 256;
/// Longest idempotency key, evidence or reason, in bytes.
const MAX_TEXT_BYTES: usize = 1024;
/// Every consent scope, in the contract's order.
const SCOPES: [ConsentScope; 4] = [
    ConsentScope::Diagnostics,
    ConsentScope::UsageAnalytics,
    ConsentScope::Marketing,
    ConsentScope::Contact,
];
/// The `Preferences` fields an update mask may name.
const PREFERENCE_FIELDS: [&str; 7] = [
    "channels",
    "preferred_channel",
    "quiet_hours",
    "notification_budget_per_week",
    "locale",
    "availability",
    "standing_approvals",
];

use super::internal;

fn not_found(id: &str) -> Status {
    Status::not_found(format!("customer {id:?} not found"))
}

/// The gRPC face of the customers.
#[derive(Clone)]
pub struct CustomerApi {
    system: Arc<System>,
    store: Arc<dyn Store>,
    vault: Arc<Vault>,
    cases: Arc<Cases>,
    catalogue: Arc<Catalogue>,
    /// The notification log's projection; `None`: exports hold no notifications.
    notifications: Option<Arc<Notifications>>,
}

/// What the tenant's desks hold about one customer, as the contract shows it.
struct DeskRecords {
    work_orders: Vec<v1::WorkOrder>,
    appointments: Vec<v1::Appointment>,
    part_orders: Vec<v1::PartOrder>,
}

/// What the customer twin says about a customer.
struct TwinView {
    profile: Profile,
    devices: Vec<String>,
    cases: Vec<TwinCase>,
    erased: bool,
}

impl CustomerApi {
    /// Customers of `system`, their personal data in `vault`, their cases in `cases`, their
    /// devices' models in `catalogue`.
    pub fn new(
        system: Arc<System>,
        store: Arc<dyn Store>,
        vault: Arc<Vault>,
        cases: Arc<Cases>,
        catalogue: Arc<Catalogue>,
    ) -> Self {
        Self {
            system,
            store,
            vault,
            cases,
            catalogue,
            notifications: None,
        }
    }

    /// Exports the customer's notifications from `notifications` (and counts them in
    /// the erasure report).
    pub fn with_notifications(mut self, notifications: Arc<Notifications>) -> Self {
        self.notifications = Some(notifications);
        self
    }

    /// The notifications sent to customer `id`, oldest first.
    async fn notifications_of(&self, id: &str) -> Result<Vec<v1::Notification>, Status> {
        match &self.notifications {
            Some(n) => n.of_customer(id).await,
            None => Ok(Vec::new()),
        }
    }

    /// The caller's customer `id`, checked: INVALID_ARGUMENT when malformed, NOT_FOUND when
    /// of another tenant.
    fn own<'a>(p: &Principal, id: &'a str) -> Result<&'a str, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("customer_id is required"));
        }
        if id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "customer_id must be at most {MAX_ID_BYTES} bytes of printable text"
            )));
        }
        p.own("customer", id)
    }

    /// The customer's index entry; NOT_FOUND when unknown or erased.
    async fn known(&self, id: &str) -> Result<crate::pii::IndexEntry, Status> {
        let tenant = caretwin_actors::mail::tenant_of(id);
        self.vault
            .index(tenant)
            .await
            .map_err(internal)?
            .customers
            .get(id)
            .copied()
            .ok_or_else(|| not_found(id))
    }

    async fn twin(&self, id: &str) -> Result<TwinView, Status> {
        self.system
            .customers()
            .inspect(id, |t| match t {
                Some(t) => TwinView {
                    profile: t.profile().clone(),
                    devices: t.devices().map(|(d, _)| d.to_owned()).collect(),
                    cases: t.cases().iter().chain(t.history()).cloned().collect(),
                    erased: t.is_erased(),
                },
                None => TwinView {
                    profile: Default::default(),
                    devices: Vec::new(),
                    cases: Vec::new(),
                    erased: false,
                },
            })
            .await
            .map_err(internal)
    }

    /// The twin's snapshot version: increased on every change of the customer twin.
    async fn version(&self, id: &str) -> Result<u64, Status> {
        Ok(self
            .store
            .snapshot(&Key::new(format!("customer/{id}")))
            .await
            .map_err(internal)?
            .map_or(0, |v| v.version))
    }

    /// The customer as the contract shows it; contact points only when `pii`.
    async fn customer(&self, id: &str, pii: bool) -> Result<v1::Customer, Status> {
        let entry = self.known(id).await?;
        let twin = self.twin(id).await?;
        if twin.erased {
            return Err(not_found(id));
        }
        let personal = self
            .vault
            .personal(id)
            .await
            .map_err(internal)?
            .unwrap_or_default();
        Ok(v1::Customer {
            customer_id: id.to_owned(),
            tenant_id: caretwin_actors::mail::tenant_of(id).to_owned(),
            external_ref: personal.external_ref.clone(),
            display_name: personal.display_name.clone(),
            value_tier: tier(twin.profile.tier) as i32,
            preferences: Some(preferences(&twin.profile.preferences, &personal.locale)),
            contact_points: if pii {
                personal.contact_points.iter().map(contact_point).collect()
            } else {
                Vec::new()
            },
            consents: consents(twin.profile.consent, &personal),
            device_ids: twin.devices,
            open_case_ids: twin
                .cases
                .iter()
                .filter(|c| c.state != TwinCaseState::Closed)
                .map(|c| c.id.clone())
                .collect(),
            created_at_ms: entry.created_at_ms as i64,
            updated_at_ms: entry.updated_at_ms as i64,
            version: self.version(id).await?,
        })
    }

    /// Delivers the mail the twins wrote (a consent change to the devices) before the call
    /// returns, so the change is in effect when the caller hears of it.
    async fn settle(&self) -> Result<(), Status> {
        for _ in 0..8 {
            let r = self.system.pump().await.map_err(internal)?;
            if r.delivered == 0 {
                break;
            }
        }
        Ok(())
    }

    /// What the tenant's desks hold about customer `id`: their work orders (each with its
    /// current appointment), the appointments not shown inside a work order (cancelled or
    /// replaced visits), and their part orders.
    async fn desk_records(&self, id: &str) -> Result<DeskRecords, Status> {
        let tenant = caretwin_actors::mail::tenant_of(id).to_owned();
        let part_orders: Vec<v1::PartOrder> = {
            let (tenant, id) = (tenant.clone(), id.to_owned());
            let catalogue = self.catalogue.clone();
            self.system
                .parts()
                .inspect(&tenant.clone(), move |d| {
                    d.map(|d| {
                        d.orders()
                            .filter(|(_, o)| o.customer == id)
                            .map(|(k, o)| work::to_part_order(&catalogue, &tenant, k, o))
                            .collect()
                    })
                    .unwrap_or_default()
                })
                .await
                .map_err(internal)?
        };
        let (mut work_orders, mut appointments) = {
            let id = id.to_owned();
            self.system
                .scheduler()
                .inspect(&tenant, move |s| {
                    let Some(s) = s else {
                        return (Vec::new(), Vec::new());
                    };
                    let work_orders: Vec<v1::WorkOrder> = s
                        .work_orders()
                        .into_iter()
                        .filter(|(_, w)| w.customer == id)
                        .map(|(wid, w)| work::to_work_order(s, &wid, &w))
                        .collect();
                    let shown: Vec<&str> = work_orders
                        .iter()
                        .filter_map(|w| w.appointment.as_ref())
                        .map(|a| a.appointment_id.as_str())
                        .collect();
                    // Bookings that never became a visit have no appointment to show;
                    // what they said is in the work order or the case.
                    let appointments: Vec<v1::Appointment> = s
                        .bookings()
                        .filter(|(_, b)| {
                            b.customer == id && !b.id.is_empty() && !shown.contains(&b.id.as_str())
                        })
                        .map(|(_, b)| work::to_appointment(b, s.work_order(&b.work_order).as_ref()))
                        .collect();
                    (work_orders, appointments)
                })
                .await
                .map_err(internal)?
        };
        let by_id: HashMap<String, v1::PartOrder> = part_orders
            .iter()
            .map(|o| (o.part_order_id.clone(), o.clone()))
            .collect();
        let (at, mut current): (Vec<usize>, Vec<v1::Appointment>) = work_orders
            .iter_mut()
            .enumerate()
            .filter_map(|(i, w)| w.appointment.take().map(|a| (i, a)))
            .unzip();
        work::fill_reservations(&by_id, &mut current);
        work::fill_reservations(&by_id, &mut appointments);
        for (i, a) in at.into_iter().zip(current) {
            work_orders[i].appointment = Some(a);
        }
        Ok(DeskRecords {
            work_orders,
            appointments,
            part_orders,
        })
    }

    async fn export(
        &self,
        id: &str,
        include_readings: bool,
    ) -> Result<Vec<v1::ExportCustomerChunk>, Status> {
        use v1::export_customer_chunk::Item;
        let tenant = caretwin_actors::mail::tenant_of(id).to_owned();
        let customer = self.customer(id, true).await?;
        let personal = self
            .vault
            .personal(id)
            .await
            .map_err(internal)?
            .unwrap_or_default();
        let twin = self.twin(id).await?;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut items = vec![Item::Customer(customer)];
        for c in &personal.consent_history {
            items.push(Item::ConsentHistory(consent_change(c)));
        }
        for device in &twin.devices {
            let catalogue = self.system.devices();
            let found = catalogue
                .inspect(device, {
                    let tenant = tenant.clone();
                    move |t| {
                        t.map(|t| {
                            let mut twin = super::twins::to_twin(t, &tenant, &[], true);
                            twin.device_id = String::new();
                            let commands: Vec<_> = t.commands().to_vec();
                            let reported: Vec<_> = t.reported().to_vec();
                            (twin, commands, reported, t.model().map(str::to_owned))
                        })
                    }
                })
                .await
                .map_err(internal)?;
            let Some((mut dtwin, commands, reported, model)) = found else {
                continue;
            };
            dtwin.device_id = device.clone();
            items.push(Item::Device(dtwin));
            for c in commands {
                items.push(Item::Command(v1::CommandRecord {
                    command_id: c.id.clone(),
                    device_id: device.clone(),
                    payload: Some(v1::CommandPayload {
                        kind: Some(v1::command_payload::Kind::RemoteRemedy(v1::RemoteRemedy {
                            name: c.name.clone(),
                            args: Default::default(),
                        })),
                    }),
                    state: command_state(&c.state) as i32,
                    expires_at_ms: c.expires_at_ms as i64,
                    case_id: c
                        .id
                        .rsplit_once('/')
                        .map(|(case, _)| case.to_owned())
                        .unwrap_or_default(),
                    ..Default::default()
                }));
            }
            if include_readings {
                // The node keeps each signal's latest reading (the twins learn from the
                // stream and do not store it): that is the reading history held.
                let signals = model
                    .as_deref()
                    .and_then(|m| self.catalogue_signals(m))
                    .unwrap_or_default();
                for ((name, unit), r) in signals.into_iter().zip(reported) {
                    if let Some(r) = r {
                        items.push(Item::Readings(v1::SignalSeries {
                            device_id: device.clone(),
                            signal: name,
                            unit,
                            samples: vec![v1::SignalSample {
                                value: r.value,
                                device_time_ms: r.ts_ms as i64,
                                seq: r.seq,
                            }],
                        }));
                    }
                }
            }
        }
        let logged = self.cases.of_customer(&tenant, id).await?;
        let in_log: Vec<String> = logged.iter().map(|c| c.case_id.clone()).collect();
        for c in logged {
            items.push(Item::Case(c));
        }
        // Cases the twin ran alone, never handed to a person, are only in the twin.
        for c in twin.cases.iter().filter(|c| !in_log.contains(&c.id)) {
            items.push(Item::Case(twin_case(&tenant, c)));
        }
        let desks = self.desk_records(id).await?;
        items.extend(desks.work_orders.into_iter().map(Item::WorkOrder));
        items.extend(desks.appointments.into_iter().map(Item::Appointment));
        items.extend(desks.part_orders.into_iter().map(Item::PartOrder));
        items.extend(
            self.notifications_of(id)
                .await?
                .into_iter()
                .map(Item::Notification),
        );
        for item in &items {
            let name = match item {
                Item::Customer(_) => "customer",
                Item::ConsentHistory(_) => "consent_history",
                Item::Device(_) => "device",
                Item::Case(_) => "case",
                Item::Notification(_) => "notification",
                Item::WorkOrder(_) => "work_order",
                Item::PartOrder(_) => "part_order",
                Item::Command(_) => "command",
                Item::Readings(_) => "readings",
                Item::Appointment(_) => "appointment",
                Item::Manifest(_) => "manifest",
            };
            *counts.entry(name.to_owned()).or_default() += 1;
        }
        items.push(Item::Manifest(v1::ExportManifest {
            exported_at_ms: now_ms() as i64,
            counts: counts.into_iter().collect(),
        }));
        Ok(items
            .into_iter()
            .map(|item| v1::ExportCustomerChunk { item: Some(item) })
            .collect())
    }

    /// The (name, unit) of every signal of `model`, in the twin's order.
    fn catalogue_signals(&self, model: &str) -> Option<Vec<(String, String)>> {
        self.catalogue.model(model).map(|m| {
            m.signals()
                .iter()
                .map(|s| (s.name.clone(), s.unit.clone()))
                .collect()
        })
    }

    async fn erase(
        &self,
        p: &Principal,
        id: &str,
        reason: &str,
    ) -> Result<v1::EraseCustomerResponse, Status> {
        if let Some(report) = self.vault.erasure(id).await.map_err(internal)? {
            return v1::EraseCustomerResponse::decode(report.as_slice()).map_err(internal);
        }
        self.known(id).await?;
        let twin = self.twin(id).await?;
        let tenant = caretwin_actors::mail::tenant_of(id);
        let cases = self.cases.of_customer(tenant, id).await?;
        let notes: usize = cases
            .iter()
            .map(|c| {
                c.notes.len()
                    + usize::from(c.resolution.as_ref().is_some_and(|r| !r.summary.is_empty()))
            })
            .sum();
        let desks = self.desk_records(id).await?;
        let notifications = self.notifications_of(id).await?;
        let answers = notifications
            .iter()
            .filter(|n| n.response.as_ref().is_some_and(|r| !r.free_text.is_empty()))
            .count();
        // The twins first (each step idempotent), the tombstone last: a failure halfway is
        // finished by a retry, and a retry after the tombstone returns the first report.
        match self
            .system
            .customers()
            .call(id, CustomerMsg::Erase)
            .await
            .map_err(internal)?
        {
            CustomerReply::Ok => {}
            CustomerReply::Rejected(why) => return Err(internal(why)),
        }
        for device in &twin.devices {
            let detach = DeviceMsg::Detach {
                customer: id.to_owned(),
            };
            match self
                .system
                .devices()
                .call(device, detach)
                .await
                .map_err(internal)?
            {
                DeviceReply::Ok => {}
                other => return Err(internal(format!("device {device}: {other:?}"))),
            }
        }
        let now = now_ms();
        let erased_item = |category: &str, store: &str, count: u64| v1::ErasedItem {
            category: category.to_owned(),
            store: store.to_owned(),
            count,
        };
        let personal = self.vault.personal(id).await.map_err(internal)?;
        let mut report = v1::EraseCustomerResponse {
            erasure_id: format!("{id}/erasure/{now}"),
            customer_id: id.to_owned(),
            erased: vec![
                erased_item(
                    "profile (name, CRM reference, contact points, locale, consent history)",
                    "twin-store: personal record",
                    u64::from(personal.is_some()),
                ),
                erased_item(
                    "preferences, consents, value tier, region, device links, cases, notification history",
                    "twin-store: customer twin (a tombstone remains)",
                    1,
                ),
                erased_item(
                    "device owner, site, reported state, reasoning state, commands",
                    "twin-store: device twins",
                    twin.devices.len() as u64,
                ),
                erased_item(
                    "agent notes and resolution summaries (sealed; their key is destroyed)",
                    "case-log",
                    notes as u64,
                ),
                erased_item(
                    "notification texts and customers' free-text answers (sealed; their key \
                     is destroyed)",
                    "notification-log",
                    (notifications.len() + answers) as u64,
                ),
                erased_item("data key", "twin-store: key record", 1),
                erased_item("customer index entry", "twin-store: customer index", 1),
            ],
            retained: vec![
                v1::RetainedItem {
                    category: "cases".into(),
                    reason: format!(
                        "{} case(s) stay in the append-only case log as the devices' service \
                         history, anonymised: they keep a pseudonymous customer id, no longer \
                         shown, and machine-written context; what agents wrote is unreadable",
                        cases.len()
                    ),
                    retained_until_ms: 0,
                },
                v1::RetainedItem {
                    category: "part orders, work orders and technician bookings".into(),
                    reason: format!(
                        "{} part order(s), {} work order(s) and {} further appointment(s) are \
                         kept by the parts desk and the scheduler for warranty and accounting; \
                         they name the customer only by the pseudonymous id, with no contact \
                         data, but keep the device, site, fault description and technicians' \
                         completion notes as written, and are forgotten with the desks' \
                         retention",
                        desks.part_orders.len(),
                        desks.work_orders.len(),
                        desks.appointments.len()
                    ),
                    retained_until_ms: 0,
                },
                v1::RetainedItem {
                    category: "notifications".into(),
                    reason: format!(
                        "{} notification(s) stay in the append-only notification log as \
                         delivery records: channel, priority, delivery state, times, the \
                         one-tap options (template text) and a pseudonymous customer id, no \
                         longer shown; their text and the customer's answers are unreadable \
                         and shown as erased",
                        notifications.len()
                    ),
                    retained_until_ms: 0,
                },
                v1::RetainedItem {
                    category: "erasure report".into(),
                    reason: format!(
                        "proof of the erasure (accountability), holding only the customer id; \
                         reason given: {reason}"
                    ),
                    retained_until_ms: 0,
                },
            ],
            detached_device_ids: twin.devices.clone(),
            completed_at_ms: now as i64,
        };
        // The reason may name the person ("request of Ann …"): it is not kept in clear.
        if reason.chars().any(char::is_alphanumeric) {
            let proof = report
                .retained
                .iter_mut()
                .find(|r| r.category == "erasure report")
                .expect("the report lists itself");
            proof.reason = "proof of the erasure (accountability), holding only \
                                         the customer id; the reason given is not kept"
                .into();
        }
        let done = self
            .vault
            .erase(id, report.encode_to_vec())
            .await
            .map_err(internal)?;
        if !done.data_key && !done.personal_record && !done.indexed {
            // Another erasure of the same customer won the race: its report stands.
            if let Some(first) = self.vault.erasure(id).await.map_err(internal)? {
                return v1::EraseCustomerResponse::decode(first.as_slice()).map_err(internal);
            }
        }
        tracing::info!(tenant = %p.tenant, customer = id, by = %p.name, devices = twin.devices.len(), "customer erased");
        Ok(report)
    }
}

fn tier(t: ValueTier) -> v1::ValueTier {
    match t {
        // The contract has no tier between standard and premium.
        ValueTier::Standard | ValueTier::Plus => v1::ValueTier::Standard,
        ValueTier::Premium => v1::ValueTier::Premium,
    }
}

fn channel(c: Channel) -> v1::Channel {
    match c {
        Channel::Push => v1::Channel::Push,
        Channel::Sms => v1::Channel::Sms,
        Channel::Email => v1::Channel::Email,
        Channel::Phone => v1::Channel::Voice,
    }
}

fn channel_in(c: i32) -> Result<Channel, Status> {
    match v1::Channel::try_from(c) {
        Ok(v1::Channel::Push) => Ok(Channel::Push),
        Ok(v1::Channel::Sms) => Ok(Channel::Sms),
        Ok(v1::Channel::Email) => Ok(Channel::Email),
        Ok(v1::Channel::Voice) => Ok(Channel::Phone),
        _ => Err(Status::invalid_argument(format!(
            "channel {c} is not one the twins can use (email, sms, push, voice)"
        ))),
    }
}

fn channel_name(c: i32) -> String {
    v1::Channel::try_from(c)
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("CHANNEL_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn contact_point(c: &Contact) -> v1::ContactPoint {
    let ch = v1::Channel::from_str_name(&format!("CHANNEL_{}", c.channel.to_ascii_uppercase()))
        .unwrap_or(v1::Channel::Unspecified);
    v1::ContactPoint {
        channel: ch as i32,
        address: c.address.clone(),
        verified: c.verified,
    }
}

/// A fixed offset as a time zone name: `UTC`, `UTC+01:00`.
fn zone_name(offset_min: i16) -> String {
    if offset_min == 0 {
        return "UTC".into();
    }
    let sign = if offset_min < 0 { '-' } else { '+' };
    let m = offset_min.unsigned_abs();
    format!("UTC{sign}{:02}:{:02}", m / 60, m % 60)
}

/// The offset of a time zone. The node has no time zone database: only UTC and fixed
/// offsets (`UTC+01:00`, `Etc/GMT-1`) are known.
fn zone_offset(name: &str) -> Result<i16, Status> {
    let unknown = || {
        Status::invalid_argument(format!(
            "unknown time zone {name:?}: use UTC, a fixed offset like UTC+01:00, or Etc/GMT±N"
        ))
    };
    match name {
        "" | "UTC" | "Etc/UTC" | "GMT" | "Etc/GMT" => return Ok(0),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("Etc/GMT") {
        // POSIX-style: Etc/GMT-1 is one hour ahead of UTC.
        let hours: i16 = rest.parse().map_err(|_| unknown())?;
        if !(-14..=12).contains(&hours) {
            return Err(unknown());
        }
        return Ok(-hours * 60);
    }
    let rest = name.strip_prefix("UTC").ok_or_else(unknown)?;
    let (sign, hm) = match rest.split_at_checked(1) {
        Some(("+", hm)) => (1, hm),
        Some(("-", hm)) => (-1, hm),
        _ => return Err(unknown()),
    };
    let (h, m) = hm.split_once(':').ok_or_else(unknown)?;
    let (h, m): (i16, i16) = (
        h.parse().map_err(|_| unknown())?,
        m.parse().map_err(|_| unknown())?,
    );
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(unknown());
    }
    Ok(sign * (h * 60 + m))
}

fn preferences(p: &policy::Preferences, locale: &str) -> v1::Preferences {
    v1::Preferences {
        channels: p.channels.iter().map(|c| channel(*c) as i32).collect(),
        preferred_channel: p
            .channels
            .first()
            .map_or(v1::Channel::Unspecified, |c| channel(*c)) as i32,
        quiet_hours: Some(match p.quiet_hours {
            Some(q) => v1::QuietHours {
                start_minute: q.start_min.into(),
                end_minute: q.end_min.into(),
                timezone: zone_name(p.utc_offset_min),
            },
            None => v1::QuietHours {
                start_minute: 0,
                end_minute: 0,
                timezone: zone_name(p.utc_offset_min),
            },
        }),
        notification_budget_per_week: p.budget_per_week.into(),
        locale: locale.to_owned(),
        availability: p
            .availability
            .iter()
            .map(|a| v1::AvailabilityWindow {
                weekday: i32::from(a.weekday) + 1,
                start_minute: a.start_min.into(),
                end_minute: a.end_min.into(),
            })
            .collect(),
        standing_approvals: p
            .standing_approvals
            .iter()
            .map(|part| v1::StandingApproval {
                kind: v1::ApprovalKind::ConsumableOrder as i32,
                subject: part.clone(),
                ..Default::default()
            })
            .chain(p.visit_approvals.iter().map(|skill| v1::StandingApproval {
                kind: v1::ApprovalKind::TechnicianVisit as i32,
                subject: skill.clone(),
                ..Default::default()
            }))
            .collect(),
    }
}

/// Applies the masked fields of `new` to `current` (and the locale); INVALID_ARGUMENT
/// for anything the contract or the twins do not allow.
fn apply_preferences(
    current: &mut policy::Preferences,
    locale: &mut String,
    new: &v1::Preferences,
    mask: &[String],
) -> Result<(), Status> {
    for m in mask {
        if !PREFERENCE_FIELDS.contains(&m.as_str()) {
            return Err(Status::invalid_argument(format!(
                "update_mask names {m:?}, not a Preferences field"
            )));
        }
    }
    let all = mask.is_empty();
    let masked = |f: &str| all || mask.iter().any(|m| m == f);
    if masked("channels") {
        let mut channels = Vec::new();
        for c in &new.channels {
            let c = channel_in(*c)?;
            if !channels.contains(&c) {
                channels.push(c);
            }
        }
        current.channels = channels;
    }
    if masked("preferred_channel") && new.preferred_channel != v1::Channel::Unspecified as i32 {
        let preferred = channel_in(new.preferred_channel)?;
        let Some(pos) = current.channels.iter().position(|c| *c == preferred) else {
            return Err(Status::invalid_argument(format!(
                "preferred_channel {} is not among the channels",
                channel_name(new.preferred_channel)
            )));
        };
        let c = current.channels.remove(pos);
        current.channels.insert(0, c);
    }
    if masked("quiet_hours") {
        match &new.quiet_hours {
            None => current.quiet_hours = None,
            Some(q) => {
                if q.start_minute > 1439 || q.end_minute > 1439 {
                    return Err(Status::invalid_argument(format!(
                        "quiet hours {}..{} are outside 0..=1439 minutes",
                        q.start_minute, q.end_minute
                    )));
                }
                current.utc_offset_min = zone_offset(&q.timezone)?;
                current.quiet_hours = (q.start_minute != q.end_minute).then_some(QuietHours {
                    start_min: q.start_minute as u16,
                    end_min: q.end_minute as u16,
                });
            }
        }
    }
    if masked("notification_budget_per_week") {
        current.budget_per_week = u8::try_from(new.notification_budget_per_week).map_err(|_| {
            Status::invalid_argument(format!(
                "notification_budget_per_week {} is over 255",
                new.notification_budget_per_week
            ))
        })?;
    }
    if masked("locale") {
        if new.locale.len() > 35
            || new
                .locale
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(Status::invalid_argument(format!(
                "locale {:?} is not a BCP 47 tag",
                new.locale
            )));
        }
        *locale = new.locale.clone();
    }
    if masked("availability") {
        let mut windows = Vec::new();
        for a in &new.availability {
            if !(1..=7).contains(&a.weekday)
                || a.start_minute > 1439
                || a.end_minute > 1440
                || a.end_minute <= a.start_minute
            {
                return Err(Status::invalid_argument(format!(
                    "availability window (weekday {}, {}..{}) is invalid: weekday 1..=7, \
                     start 0..=1439, end after start and at most 1440",
                    a.weekday, a.start_minute, a.end_minute
                )));
            }
            windows.push(Availability {
                weekday: (a.weekday - 1) as u8,
                start_min: a.start_minute as u16,
                end_min: a.end_minute as u16,
            });
        }
        current.availability = windows;
    }
    if masked("standing_approvals") {
        let (mut parts, mut visits) = (Vec::new(), Vec::new());
        for a in &new.standing_approvals {
            let kind = v1::ApprovalKind::try_from(a.kind).unwrap_or(v1::ApprovalKind::Unspecified);
            let into = match kind {
                v1::ApprovalKind::ConsumableOrder | v1::ApprovalKind::PartOrder => &mut parts,
                // Visits of a skill (`gas-safe`), or `*` for any: booked confirmed.
                v1::ApprovalKind::TechnicianVisit => &mut visits,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "standing approval of kind {} is not supported: the twins take \
                         consumable order, part order and technician visit approvals",
                        kind.as_str_name()
                    )));
                }
            };
            if a.subject.is_empty() || a.subject.len() > 128 {
                return Err(Status::invalid_argument(
                    "a standing approval's subject is a part number, a skill or * of 1 to 128 bytes",
                ));
            }
            into.push(a.subject.clone());
        }
        current.standing_approvals = parts;
        current.visit_approvals = visits;
    }
    Ok(())
}

fn scope_in(s: i32) -> Result<ConsentScope, Status> {
    match v1::ConsentScope::try_from(s) {
        Ok(v1::ConsentScope::Diagnostics) => Ok(ConsentScope::Diagnostics),
        Ok(v1::ConsentScope::UsageAnalytics) => Ok(ConsentScope::UsageAnalytics),
        Ok(v1::ConsentScope::Marketing) => Ok(ConsentScope::Marketing),
        Ok(v1::ConsentScope::Contact) => Ok(ConsentScope::Contact),
        _ => Err(Status::invalid_argument(format!(
            "invalid consent scope {s}"
        ))),
    }
}

fn source_name(s: i32) -> String {
    v1::ConsentSource::try_from(s)
        .unwrap_or(v1::ConsentSource::Unspecified)
        .as_str_name()
        .trim_start_matches("CONSENT_SOURCE_")
        .to_ascii_lowercase()
}

fn source_in(name: &str) -> v1::ConsentSource {
    v1::ConsentSource::from_str_name(&format!("CONSENT_SOURCE_{}", name.to_ascii_uppercase()))
        .unwrap_or(v1::ConsentSource::Unspecified)
}

fn consent_change(c: &ConsentChange) -> v1::ConsentGrant {
    v1::ConsentGrant {
        scope: convert::consent_scope(c.scope) as i32,
        granted: c.granted,
        changed_at_ms: c.at_ms as i64,
        source: source_in(&c.source) as i32,
    }
}

fn consents(consent: policy::Consent, personal: &PersonalRecord) -> Vec<v1::ConsentGrant> {
    SCOPES
        .iter()
        .map(|s| {
            let last = personal
                .consent_history
                .iter()
                .rev()
                .find(|c| c.scope == *s);
            v1::ConsentGrant {
                scope: convert::consent_scope(*s) as i32,
                granted: consent.allows(*s),
                changed_at_ms: last.map_or(0, |c| c.at_ms as i64),
                source: last.map_or(v1::ConsentSource::Unspecified, |c| source_in(&c.source))
                    as i32,
            }
        })
        .collect()
}

fn command_state(s: &str) -> v1::CommandState {
    match s {
        "queued" => v1::CommandState::Queued,
        "sent_to_edge" => v1::CommandState::SentToEdge,
        "delivered_to_device" => v1::CommandState::DeliveredToDevice,
        "succeeded" => v1::CommandState::Succeeded,
        "failed" => v1::CommandState::Failed,
        "expired" => v1::CommandState::Expired,
        _ => v1::CommandState::Unspecified,
    }
}

/// A case the customer twin ran, as the contract shows it.
fn twin_case(tenant: &str, c: &TwinCase) -> v1::Case {
    v1::Case {
        case_id: c.id.clone(),
        tenant_id: tenant.to_owned(),
        state: match c.state {
            TwinCaseState::Open => v1::CaseState::Open,
            TwinCaseState::HandedOff => v1::CaseState::HandedOff,
            TwinCaseState::Closed => v1::CaseState::Resolved,
        } as i32,
        priority: convert::priority(c.priority) as i32,
        title: format!("{} on {}", c.mode, c.device),
        root_cause: Some(v1::RootCause {
            failure_mode_id: c.mode.clone(),
            device_id: c.device.clone(),
            description: c.mode.clone(),
            confidence: c.confidence,
        }),
        insights: c
            .insights
            .iter()
            .enumerate()
            .map(|(n, i)| convert::insight(&c.device, n, i))
            .collect(),
        actions: c
            .actions
            .iter()
            .enumerate()
            .map(|(n, a)| v1::ActionRecord {
                action_id: format!("{}/action-{n}", c.id),
                description: a.clone(),
                actor: v1::Actor::Twin as i32,
                ..Default::default()
            })
            .collect(),
        opened_at_ms: c.opened_at as i64,
        ..Default::default()
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<v1::ExportCustomerChunk, Status>> + Send>>;

#[tonic::async_trait]
impl CustomerService for CustomerApi {
    type ExportCustomerStream = ExportStream;

    async fn get_customer(
        &self,
        req: Request<v1::GetCustomerRequest>,
    ) -> Result<Response<v1::Customer>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CustomersRead)?;
        let r = req.into_inner();
        let id = Self::own(&p, &r.customer_id)?;
        Ok(Response::new(
            self.customer(id, p.has(Scope::CustomersPii)).await?,
        ))
    }

    async fn list_customers(
        &self,
        req: Request<v1::ListCustomersRequest>,
    ) -> Result<Response<v1::ListCustomersResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CustomersRead)?;
        let r = req.into_inner();
        let page = r.page.clone().unwrap_or_default();
        let size = match page.page_size {
            0 => 50,
            n => n.min(1000),
        } as usize;
        if page.page_token.len() > MAX_ID_BYTES {
            return Err(Status::invalid_argument("invalid page_token"));
        }
        if r.value_tier != 0 && v1::ValueTier::try_from(r.value_tier).is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid value_tier {}",
                r.value_tier
            )));
        }
        let index = self.vault.index(&p.tenant).await.map_err(internal)?;
        let pii = p.has(Scope::CustomersPii);
        let mut out = Vec::new();
        let mut next = String::new();
        // By customer id; the token is the last id of the previous page.
        let after = page.page_token.clone();
        for (id, entry) in index
            .customers
            .iter()
            .filter(|(id, _)| after.is_empty() || id.as_str() > after.as_str())
        {
            if r.updated_after_ms
                .is_some_and(|t| (entry.updated_at_ms as i64) < t)
            {
                continue;
            }
            let Ok(c) = self.customer(id, pii).await else {
                continue; // erased meanwhile
            };
            if r.value_tier != 0 && c.value_tier != r.value_tier {
                continue;
            }
            if !r.external_ref.is_empty() && c.external_ref != r.external_ref {
                continue;
            }
            if !r.site_id.is_empty() {
                let mut at_site = false;
                for d in &c.device_ids {
                    let site = self
                        .system
                        .devices()
                        .inspect(d, |t| t.and_then(|t| t.site().map(str::to_owned)))
                        .await
                        .map_err(internal)?;
                    at_site |= site.as_deref() == Some(r.site_id.as_str());
                }
                if !at_site {
                    continue;
                }
            }
            if out.len() == size {
                next = out
                    .last()
                    .map(|c: &v1::Customer| c.customer_id.clone())
                    .unwrap_or_default();
                break;
            }
            out.push(c);
        }
        Ok(Response::new(v1::ListCustomersResponse {
            customers: out,
            page: Some(v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn update_preferences(
        &self,
        req: Request<v1::UpdatePreferencesRequest>,
    ) -> Result<Response<v1::Customer>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CustomersWrite)?;
        let r = req.into_inner();
        let id = Self::own(&p, &r.customer_id)?;
        if r.idempotency_key.len() > MAX_TEXT_BYTES {
            return Err(Status::invalid_argument("idempotency_key is too long"));
        }
        let new = r
            .preferences
            .ok_or_else(|| Status::invalid_argument("preferences are required"))?;
        self.known(id).await?;
        let twin = self.twin(id).await?;
        if twin.erased {
            return Err(not_found(id));
        }
        if let Some(expected) = r.expected_version {
            let version = self.version(id).await?;
            if version != expected {
                return Err(Status::failed_precondition(format!(
                    "customer {id:?} is at version {version}, not {expected}"
                )));
            }
        }
        let personal = self
            .vault
            .personal(id)
            .await
            .map_err(internal)?
            .unwrap_or_default();
        let mut profile = twin.profile.clone();
        let mut locale = personal.locale.clone();
        // Everything is checked before anything changes.
        apply_preferences(&mut profile.preferences, &mut locale, &new, &r.update_mask)?;
        if profile != twin.profile {
            match self
                .system
                .customers()
                .call(id, CustomerMsg::SetProfile(profile))
                .await
                .map_err(internal)?
            {
                CustomerReply::Ok => {}
                CustomerReply::Rejected(why) => return Err(Status::failed_precondition(why)),
            }
        }
        if locale != personal.locale
            && !self
                .vault
                .update_personal(id, |rec| rec.locale = locale.clone())
                .await
                .map_err(internal)?
        {
            return Err(not_found(id));
        }
        self.vault.touch(id, now_ms()).await.map_err(internal)?;
        Ok(Response::new(
            self.customer(id, p.has(Scope::CustomersPii)).await?,
        ))
    }

    async fn update_consent(
        &self,
        req: Request<v1::UpdateConsentRequest>,
    ) -> Result<Response<v1::UpdateConsentResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CustomersWrite)?;
        let r = req.into_inner();
        let id = Self::own(&p, &r.customer_id)?;
        if r.idempotency_key.len() > MAX_TEXT_BYTES || r.evidence.len() > MAX_TEXT_BYTES {
            return Err(Status::invalid_argument(
                "idempotency_key and evidence are at most 1024 bytes",
            ));
        }
        let grant = r
            .grant
            .iter()
            .map(|s| scope_in(*s))
            .collect::<Result<Vec<_>, _>>()?;
        let withdraw = r
            .withdraw
            .iter()
            .map(|s| scope_in(*s))
            .collect::<Result<Vec<_>, _>>()?;
        if grant.is_empty() && withdraw.is_empty() {
            return Err(Status::invalid_argument("nothing to grant or withdraw"));
        }
        if let Some(both) = grant.iter().find(|s| withdraw.contains(s)) {
            return Err(Status::invalid_argument(format!(
                "scope {} is both granted and withdrawn",
                convert::consent_scope(*both).as_str_name()
            )));
        }
        if v1::ConsentSource::try_from(r.source).is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid source {}",
                r.source
            )));
        }
        self.known(id).await?;
        if self.twin(id).await?.erased {
            return Err(not_found(id));
        }
        let msg = CustomerMsg::SetConsent {
            grant: grant.clone(),
            withdraw: withdraw.clone(),
        };
        match self
            .system
            .customers()
            .call(id, msg)
            .await
            .map_err(internal)?
        {
            CustomerReply::Ok => {}
            CustomerReply::Rejected(why) => return Err(Status::failed_precondition(why)),
        }
        // The devices stop using withdrawn data before the caller hears back.
        self.settle().await?;
        let now = now_ms();
        let source = source_name(r.source);
        let evidence = r.evidence.clone();
        self.vault
            .update_personal(id, |rec| {
                for (s, granted) in grant
                    .iter()
                    .map(|s| (*s, true))
                    .chain(withdraw.iter().map(|s| (*s, false)))
                {
                    rec.record_consent(ConsentChange {
                        at_ms: now,
                        scope: s,
                        granted,
                        source: source.clone(),
                        evidence: evidence.clone(),
                    });
                }
            })
            .await
            .map_err(internal)?;
        self.vault.touch(id, now).await.map_err(internal)?;
        let customer = self.customer(id, false).await?;
        tracing::info!(tenant = %p.tenant, customer = id, granted = grant.len(), withdrawn = withdraw.len(), "consent changed");
        Ok(Response::new(v1::UpdateConsentResponse {
            consents: customer.consents,
            effective_at_ms: now as i64,
        }))
    }

    async fn export_customer(
        &self,
        req: Request<v1::ExportCustomerRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CustomersExport)?;
        let r = req.into_inner();
        let id = Self::own(&p, &r.customer_id)?;
        let chunks = self.export(id, r.include_readings).await?;
        tracing::info!(tenant = %p.tenant, customer = id, by = %p.name, chunks = chunks.len(), "customer exported");
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn erase_customer(
        &self,
        req: Request<v1::EraseCustomerRequest>,
    ) -> Result<Response<v1::EraseCustomerResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::CustomersErase)?;
        let r = req.into_inner();
        let id = Self::own(&p, &r.customer_id)?;
        if r.idempotency_key.len() > MAX_TEXT_BYTES || r.reason.len() > MAX_TEXT_BYTES {
            return Err(Status::invalid_argument(
                "idempotency_key and reason are at most 1024 bytes",
            ));
        }
        Ok(Response::new(self.erase(&p, id, &r.reason).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_zones_are_fixed_offsets_or_refused() {
        assert_eq!(zone_offset("UTC").unwrap(), 0);
        assert_eq!(zone_offset("UTC+01:00").unwrap(), 60);
        assert_eq!(zone_offset("UTC-05:30").unwrap(), -330);
        assert_eq!(zone_offset("Etc/GMT-2").unwrap(), 120);
        assert_eq!(zone_name(60), "UTC+01:00");
        assert_eq!(zone_offset(&zone_name(-330)).unwrap(), -330);
        for bad in ["Mars/Olympus", "UTC+25:00", "UTC+1", "Etc/GMT+99"] {
            let e = zone_offset(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn preferences_apply_by_mask_and_refuse_bad_input_whole() {
        let mut prefs = policy::Preferences::default();
        let mut locale = String::new();
        let new = v1::Preferences {
            channels: vec![v1::Channel::Email as i32, v1::Channel::Sms as i32],
            preferred_channel: v1::Channel::Sms as i32,
            notification_budget_per_week: 9,
            ..Default::default()
        };
        apply_preferences(
            &mut prefs,
            &mut locale,
            &new,
            &["channels".into(), "preferred_channel".into()],
        )
        .unwrap();
        assert_eq!(prefs.channels, [Channel::Sms, Channel::Email]);
        assert_eq!(prefs.budget_per_week, 3, "not in the mask");
        let before = prefs.clone();
        let bad = v1::Preferences {
            channels: vec![v1::Channel::Email as i32],
            preferred_channel: v1::Channel::Push as i32,
            ..Default::default()
        };
        let mut copy = prefs.clone();
        let e = apply_preferences(&mut copy, &mut locale, &bad, &[]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(prefs, before);
        let e = apply_preferences(&mut copy, &mut locale, &bad, &["nope".into()]).unwrap_err();
        assert!(e.message().contains("nope"));
    }

    #[test]
    fn standing_approvals_of_orders_and_visits_round_trip() {
        let approval = |kind: v1::ApprovalKind, subject: &str| v1::StandingApproval {
            kind: kind as i32,
            subject: subject.into(),
            ..Default::default()
        };
        let new = v1::Preferences {
            standing_approvals: vec![
                approval(v1::ApprovalKind::ConsumableOrder, "DESC-250"),
                approval(v1::ApprovalKind::TechnicianVisit, "gas-safe"),
            ],
            ..Default::default()
        };
        let (mut prefs, mut locale) = (policy::Preferences::default(), String::new());
        let mask = ["standing_approvals".into()];
        apply_preferences(&mut prefs, &mut locale, &new, &mask).unwrap();
        assert_eq!(prefs.standing_approvals, ["DESC-250"]);
        assert_eq!(prefs.visit_approvals, ["gas-safe"]);
        assert_eq!(
            preferences(&prefs, "").standing_approvals,
            new.standing_approvals
        );
        let remote = v1::Preferences {
            standing_approvals: vec![approval(v1::ApprovalKind::RemoteRemedy, "reset")],
            ..Default::default()
        };
        let before = prefs.clone();
        let e = apply_preferences(&mut prefs, &mut locale, &remote, &mask).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(prefs, before, "a refused change changes nothing");
    }
}
