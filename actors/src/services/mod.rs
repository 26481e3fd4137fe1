//! The service actors, hosted as twins, one per tenant (twin id = the tenant id, `t1`).
//!
//! Device and customer twins never act on the world themselves: they send [`Mail`] to these
//! desks, which keep the tenant-wide books (stock and supplier orders, technicians'
//! calendars, cases handed to humans) and answer with mail of their own.
//!
//! Every desk follows the same rules:
//! - **Tenant walls.** Mail from another tenant, mail addressed to another desk, and body
//!   types a desk does not handle are refused: nothing changes and the reply is
//!   [`Status::Refused`].
//! - **Exactly-once effects from at-least-once mail.** Each request carries an idempotency
//!   key (order key, booking key, case id); a request whose key is known changes nothing
//!   (at most the current answer is sent again). Each new key is also claimed with a
//!   create-only idempotency record in the same batch, so even a key the desk has since
//!   forgotten (see `retain` and `max_records`) can never take effect twice: the batch is
//!   refused with [`crate::Error::IdempotencyExists`].
//! - **Own mail ids** are `{tenant}/{kind}/{counter}` (`t1/parts/7`), unique across the
//!   three desks of a tenant even though they share the twin id.
//! - **Compact snapshots.** Records are kept in JSON with short field names; finished
//!   records are forgotten after `retain`, and the oldest finished ones first when a desk
//!   holds `max_records` or its records pass [`SNAPSHOT_BUDGET`] bytes, so a snapshot
//!   stays under the store's value limit. Open records are never forgotten: when they
//!   alone fill the desk, new requests are refused.
//!
//! # Layout
//! - [`parts`] — the parts desk: local stock, supplier orders with retries.
//! - [`scheduler`] — the repair scheduler: technicians, working hours, earliest slot.
//! - [`handoff`] — the handoff queue: cases to human agents, SLA escalation.
//! - [`Tenants`], [`Span`], [`Status`] — what the three share.

pub mod handoff;
pub mod parts;
pub mod scheduler;

use crate::host::Ctx;
use crate::mail::{Address, Body, Mail};
use crate::model::{DAY_MS, HOUR_MS};
use crate::store::{IdempotencyMode, Key, Op};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a desk answers to one mail, once its effects are durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Acted on: state changed and/or mail went out.
    Done,
    /// Already known by its key: nothing new happened (the current answer may have been
    /// sent again).
    Duplicate,
    /// Well-formed but nothing to do (a late or repeated result, an unknown case).
    Ignored,
    /// Refused: another tenant, another desk's mail, an unexpected body, bad input.
    Refused(String),
}

/// Per-tenant settings of one desk: `default` for every tenant without its own entry.
///
/// ```toml
/// [default]
/// max_attempts = 5
/// [tenant.t1]
/// max_attempts = 3
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenants<C> {
    /// Settings of tenants not listed under `tenant`.
    #[serde(default)]
    pub default: C,
    /// Settings by tenant id. Keep technicians and stock here: a tenant's desk must never
    /// share them with another tenant's.
    #[serde(default)]
    pub tenant: BTreeMap<String, C>,
}

/// A desk's settings, checked once when they are loaded.
pub trait Settings {
    /// Refuses values that parse but make no sense, naming the field.
    fn validate(&self) -> Result<()>;
}

impl<C: Settings> Tenants<C> {
    /// Checks the default and every tenant's settings; errors name the tenant.
    pub fn validate(&self) -> Result<()> {
        self.default
            .validate()
            .map_err(|e| Error::Config(format!("default: {}", unwrap_config(e))))?;
        for (tenant, c) in &self.tenant {
            tenant_id("service", tenant).map_err(|_| {
                Error::Config(format!("tenant id {tenant:?} must not hold ':' or '/'"))
            })?;
            c.validate()
                .map_err(|e| Error::Config(format!("tenant {tenant}: {}", unwrap_config(e))))?;
        }
        Ok(())
    }
}

fn unwrap_config(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

impl<C> Tenants<C> {
    /// The same settings for every tenant.
    pub fn all(config: C) -> Self {
        Self {
            default: config,
            tenant: BTreeMap::new(),
        }
    }

    /// The settings of `tenant`.
    pub fn get(&self, tenant: &str) -> &C {
        self.tenant.get(tenant).unwrap_or(&self.default)
    }
}

/// A length of time written as a whole number and a unit, `"90s"`, `"30m"`, `"4h"`,
/// `"1d"`, held in milliseconds.
///
/// Strict on purpose (no fractions, spaces or compound forms), like the catalogue's
/// durations: a typo in a hand-written file must be refused, not guessed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span(pub u64);

impl Span {
    /// `n` minutes.
    pub const fn minutes(n: u64) -> Self {
        Self(n * 60_000)
    }

    /// `n` hours.
    pub const fn hours(n: u64) -> Self {
        Self(n * HOUR_MS)
    }

    /// `n` days.
    pub const fn days(n: u64) -> Self {
        Self(n * DAY_MS)
    }

    /// Milliseconds.
    pub const fn ms(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for Span {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config(format!("duration {text:?} {why}"));
        let end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(end);
        if digits.is_empty() {
            return Err(bad("must be a whole number followed by s, m, h or d"));
        }
        let unit_ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => HOUR_MS,
            "d" => DAY_MS,
            _ => return Err(bad("must end in s, m, h or d")),
        };
        let n: u64 = digits.parse().map_err(|_| bad("is too large"))?;
        if n == 0 {
            return Err(bad("must be positive"));
        }
        n.checked_mul(unit_ms)
            .map(Span)
            .ok_or_else(|| bad("is too large"))
    }
}

impl TryFrom<String> for Span {
    type Error = Error;

    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<Span> for String {
    fn from(s: Span) -> String {
        let ms = s.0;
        if ms.is_multiple_of(DAY_MS) {
            format!("{}d", ms / DAY_MS)
        } else if ms.is_multiple_of(HOUR_MS) {
            format!("{}h", ms / HOUR_MS)
        } else if ms.is_multiple_of(60_000) {
            format!("{}m", ms / 60_000)
        } else {
            // Whole seconds are all the grammar can say; configs never hold less.
            format!("{}s", ms.div_ceil(1_000))
        }
    }
}

/// Longest idempotency key, case id or foreign mail id a desk accepts, in bytes: keys are
/// embedded in store keys and timer tags, which the store limits to 1 KiB.
pub const MAX_KEY_LEN: usize = 256;

/// Checks an idempotency key, case id or id from outside.
pub(crate) fn check_key(what: &str, key: &str) -> std::result::Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.contains('\0') {
        return Err(format!(
            "{what} {:?} must be 1..={MAX_KEY_LEN} bytes without NUL",
            key.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

/// The tenant a desk serves: its twin id, which must not hold a `:` (that would make it a
/// device or customer id).
pub(crate) fn tenant_id(kind: &str, id: &str) -> Result<String> {
    if id.is_empty() || id.contains(':') || id.contains('/') {
        return Err(Error::Twin {
            id: id.to_owned(),
            reason: format!("a {kind} desk's id is its tenant id, without ':' or '/'"),
        });
    }
    Ok(id.to_owned())
}

pub(crate) use crate::host::decode_snapshot;

/// Refuses mail that is not for `me` or comes from another tenant.
pub(crate) fn admit(me: &Address, mail: &Mail) -> std::result::Result<(), String> {
    if mail.to != *me {
        return Err(format!("mail {} is addressed to {:?}", mail.id, mail.to));
    }
    if mail.from.tenant() != me.tenant() {
        return Err(format!(
            "mail {} comes from tenant {:?}",
            mail.id,
            mail.from.tenant()
        ));
    }
    Ok(())
}

/// The name of a body's type (its serde tag), for refusals.
pub(crate) fn body_name(body: &Body) -> String {
    serde_json::to_value(body)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Logs a refusal and turns it into the reply.
pub(crate) fn refuse(kind: &str, tenant: &str, mail_id: &str, why: String) -> Status {
    tracing::warn!(desk = kind, tenant, mail = mail_id, reason = %why, "mail refused");
    Status::Refused(why)
}

/// Emits mail from a desk, numbering it with the desk's counter.
pub(crate) fn send(
    ctx: &mut Ctx,
    seq: &mut u64,
    from: &Address,
    kind: &str,
    to: Address,
    body: Body,
) {
    *seq += 1;
    let mail = Mail {
        id: format!("{}/{kind}/{seq}", from.tenant()),
        from: from.clone(),
        to,
        body,
    };
    ctx.emit(mail.encode());
    ctx.changed();
}

/// Claims `key` once and for all, in the same batch as the effect it guards.
pub(crate) fn claim(ctx: &mut Ctx, kind: &str, tenant: &str, key: &str) {
    ctx.op(Op::PutIdempotency {
        key: Key::new(format!("{kind}/{tenant}/{key}")),
        value: ctx.now().to_string().into_bytes(),
        mode: IdempotencyMode::CreateOnly,
    });
}

/// Bytes a desk's records may take in its snapshot before finished ones are forgotten
/// early: two thirds of the store's value limit, the rest is headroom for the record being
/// added and for open records that grow.
pub const SNAPSHOT_BUDGET: usize = 64 * 1024;

/// What [`make_room`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Room {
    /// Some records were forgotten (the snapshot changed).
    pub forgot: bool,
    /// A new record may be added: fewer than `max` records and within
    /// [`SNAPSHOT_BUDGET`].
    pub fits: bool,
}

/// Makes room for one new record: forgets records finished before `now - retain`, then
/// the oldest finished ones while `max` or more remain or the records take more than
/// [`SNAPSHOT_BUDGET`] bytes.
///
/// `finished` gives, for a finished record, when it finished; open records are never
/// forgotten (if they alone fill the desk, `fits` is false).
pub(crate) fn make_room<V: Serialize>(
    records: &mut BTreeMap<String, V>,
    now: u64,
    retain: Span,
    max: usize,
    finished: impl Fn(&V) -> Option<u64>,
) -> Room {
    make_room_within(records, now, retain, max, finished, SNAPSHOT_BUDGET)
}

/// [`make_room`] for a desk that keeps more than one kind of record in its snapshot: each
/// kind gets its share `budget` of [`SNAPSHOT_BUDGET`] bytes.
pub(crate) fn make_room_within<V: Serialize>(
    records: &mut BTreeMap<String, V>,
    now: u64,
    retain: Span,
    max: usize,
    finished: impl Fn(&V) -> Option<u64>,
    budget: usize,
) -> Room {
    debug_assert!(budget <= SNAPSHOT_BUDGET);
    let before = records.len();
    let cutoff = now.saturating_sub(retain.ms());
    records.retain(|_, v| finished(v).is_none_or(|at| at >= cutoff));
    let mut done: Vec<(u64, String)> = records
        .iter()
        .filter_map(|(k, v)| finished(v).map(|at| (at, k.clone())))
        .collect();
    // Oldest last, so they pop first.
    done.sort_unstable_by(|a, b| b.cmp(a));
    while records.len() >= max
        && let Some((_, k)) = done.pop()
    {
        records.remove(&k);
    }
    let bytes = |r: &BTreeMap<String, V>| serde_json::to_vec(r).map_or(usize::MAX, |b| b.len());
    let mut fits_bytes = bytes(records) <= budget;
    while !fits_bytes && let Some((_, k)) = done.pop() {
        records.remove(&k);
        fits_bytes = bytes(records) <= budget;
    }
    Room {
        forgot: records.len() != before,
        fits: records.len() < max && fits_bytes,
    }
}

/// Default for `retain`: finished records are forgotten after 30 days.
pub(crate) fn default_retain() -> Span {
    Span::days(30)
}

/// Default for `max_records`: keeps a desk's snapshot far below the 96 KiB value limit.
pub(crate) fn default_max_records() -> usize {
    400
}

/// Checks the settings every desk has.
pub(crate) fn check_limits(max_records: usize) -> Result<()> {
    if max_records < 2 {
        return Err(Error::Config(format!(
            "max_records must be at least 2, got {max_records}"
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the desks' unit tests.

    use super::*;

    /// A step context at `now`.
    pub fn ctx(now: u64) -> Ctx {
        Ctx::new(now, "t1", Key::new("timers/x"), Key::new("outbox/x"))
    }

    /// The mail a step emitted.
    pub fn sent(ctx: &Ctx) -> Vec<Mail> {
        ctx.ops()
            .iter()
            .filter_map(|op| match op {
                Op::Enqueue { value, .. } => Some(Mail::decode(value).unwrap()),
                _ => None,
            })
            .collect()
    }

    /// Mail from `from` to `to`.
    pub fn mail(id: &str, from: Address, to: Address, body: Body) -> Mail {
        Mail {
            id: id.into(),
            from,
            to,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_strictly_and_print_back() {
        assert_eq!("90s".parse::<Span>().unwrap(), Span(90_000));
        assert_eq!("30m".parse::<Span>().unwrap(), Span::minutes(30));
        assert_eq!("4h".parse::<Span>().unwrap(), Span::hours(4));
        assert_eq!("1d".parse::<Span>().unwrap(), Span::days(1));
        for bad in [
            "",
            "0m",
            "1.5h",
            "6 h",
            "6hr",
            "-1m",
            "1h30m",
            "99999999999999999999d",
        ] {
            let err = bad.parse::<Span>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        for s in ["90s", "30m", "4h", "2d"] {
            assert_eq!(String::from(s.parse::<Span>().unwrap()), s);
        }
    }

    #[test]
    fn tenants_fall_back_to_the_default() {
        #[derive(Debug, Default, PartialEq, Deserialize)]
        struct C {
            n: u32,
        }
        let t: Tenants<C> = toml::from_str("[default]\nn = 1\n[tenant.t2]\nn = 2\n").unwrap();
        assert_eq!(t.get("t1").n, 1);
        assert_eq!(t.get("t2").n, 2);
    }

    #[test]
    fn making_room_forgets_old_finished_records_first_and_never_open_ones() {
        let mut r: BTreeMap<String, Option<u64>> = BTreeMap::new();
        r.insert("open".into(), None);
        r.insert("old".into(), Some(10));
        r.insert("mid".into(), Some(500));
        r.insert("new".into(), Some(900));
        // Retention: `old` finished before now - retain.
        let room = make_room(&mut r, 1_000, Span(600), 100, |v| *v);
        assert_eq!(
            room,
            Room {
                forgot: true,
                fits: true
            }
        );
        assert!(!r.contains_key("old"));
        // Count: the oldest finished goes to make room for one more.
        let room = make_room(&mut r, 1_000, Span(600), 3, |v| *v);
        assert_eq!(
            room,
            Room {
                forgot: true,
                fits: true
            }
        );
        assert_eq!(r.keys().collect::<Vec<_>>(), ["new", "open"]);
        // Only open records: nothing to forget, no room.
        let mut open: BTreeMap<String, Option<u64>> =
            [("a".to_string(), None), ("b".to_string(), None)].into();
        let room = make_room(&mut open, 1_000, Span(1), 2, |v| *v);
        assert_eq!(
            room,
            Room {
                forgot: false,
                fits: false
            }
        );
        assert_eq!(open.len(), 2);
    }

    #[test]
    fn making_room_keeps_the_records_within_the_snapshot_budget() {
        // 100 finished records of 1 KiB each: 100 KiB, over the budget though under the count.
        let mut r: BTreeMap<String, (Option<u64>, String)> = (0..100u64)
            .map(|i| (format!("k{i:03}"), (Some(i), "x".repeat(1024))))
            .collect();
        r.insert("open".into(), (None, "y".repeat(1024)));
        let room = make_room(&mut r, 1_000, Span::days(1), 1_000, |v| v.0);
        assert!(room.forgot && room.fits);
        assert!(serde_json::to_vec(&r).unwrap().len() <= SNAPSHOT_BUDGET);
        assert!(r.contains_key("open") && r.contains_key("k099") && !r.contains_key("k000"));
        // Open records alone over the budget: no room, and nothing open is dropped.
        let mut open: BTreeMap<String, (Option<u64>, String)> = (0..100u64)
            .map(|i| (format!("k{i:03}"), (None, "x".repeat(1024))))
            .collect();
        let room = make_room(&mut open, 1_000, Span::days(1), 1_000, |v| v.0);
        assert_eq!(
            room,
            Room {
                forgot: false,
                fits: false
            }
        );
        assert_eq!(open.len(), 100);
    }
}
