//! Customer policy: who the customer is to the system (preferences, consent, value tier),
//! and the decisions that protect them — when a notification may go out, and which data
//! may be used.
//!
//! Nobody wants something bleeping at them: a notification goes out only with consent to
//! contact, outside quiet hours, and within a weekly budget. Safety alarms are the
//! exception to all three: fire, CO, leaks and break-ins must get through.

use crate::model::{ConsentScope, DAY_MS, Priority, TimeMs};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// A way to reach a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// App push notification.
    Push,
    /// Text message.
    Sms,
    /// E-mail.
    Email,
    /// A phone call (by a human or a voice bot).
    Phone,
}

impl Channel {
    /// The channel's name as used in mail.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Push => "push",
            Channel::Sms => "sms",
            Channel::Email => "email",
            Channel::Phone => "phone",
        }
    }
}

/// Quiet hours in the customer's local time, minutes after midnight; may wrap midnight
/// (22:00–07:00 is `start = 1320, end = 420`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Start, minutes after local midnight.
    pub start_min: u16,
    /// End, minutes after local midnight.
    pub end_min: u16,
}

/// A weekly window when the customer is available for a technician visit, local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Availability {
    /// Day of week, 0 = Monday.
    pub weekday: u8,
    /// Start, minutes after local midnight.
    pub start_min: u16,
    /// End, minutes after local midnight (after start).
    pub end_min: u16,
}

/// What the customer told us about how to reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preferences {
    /// Channels in order of preference.
    pub channels: Vec<Channel>,
    /// When not to be disturbed.
    pub quiet_hours: Option<QuietHours>,
    /// The customer's offset from UTC, minutes (e.g. 60 for CET).
    pub utc_offset_min: i16,
    /// Most notifications in any 7 days (safety alarms do not count).
    pub budget_per_week: u8,
    /// When a technician may come.
    pub availability: Vec<Availability>,
    /// Consumables the customer approved ordering without asking (part numbers), the
    /// standing approval of story 1.
    pub standing_approvals: Vec<String>,
    /// Technician visits the customer approved booking without asking: skills (`gas-safe`),
    /// or `*` for any. Such a visit is booked confirmed; any other is held as proposed
    /// until the customer confirms it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub visit_approvals: Vec<String>,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            channels: vec![Channel::Push, Channel::Email],
            quiet_hours: Some(QuietHours {
                start_min: 22 * 60,
                end_min: 7 * 60,
            }),
            utc_offset_min: 0,
            budget_per_week: 3,
            availability: Vec::new(),
            standing_approvals: Vec::new(),
            visit_approvals: Vec::new(),
        }
    }
}

/// What the customer consented to, as a small bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent(u8);

impl Consent {
    fn bit(scope: ConsentScope) -> u8 {
        match scope {
            ConsentScope::Diagnostics => 1,
            ConsentScope::UsageAnalytics => 2,
            ConsentScope::Marketing => 4,
            ConsentScope::Contact => 8,
        }
    }

    /// Consent to `scopes`.
    pub fn of(scopes: &[ConsentScope]) -> Self {
        Self(scopes.iter().fold(0, |acc, s| acc | Self::bit(*s)))
    }

    /// Whether `scope` is granted.
    pub fn allows(self, scope: ConsentScope) -> bool {
        self.0 & Self::bit(scope) != 0
    }

    /// Grants `scope`.
    pub fn grant(&mut self, scope: ConsentScope) {
        self.0 |= Self::bit(scope);
    }

    /// Withdraws `scope`.
    pub fn withdraw(&mut self, scope: ConsentScope) {
        self.0 &= !Self::bit(scope);
    }

    /// Scopes not granted.
    pub fn missing(self) -> Vec<ConsentScope> {
        [
            ConsentScope::Diagnostics,
            ConsentScope::UsageAnalytics,
            ConsentScope::Marketing,
            ConsentScope::Contact,
        ]
        .into_iter()
        .filter(|s| !self.allows(*s))
        .collect()
    }
}

/// Service levels differ by what the customer pays for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueTier {
    /// The standard service.
    #[default]
    Standard,
    /// Faster response, human follow-up sooner.
    Plus,
    /// Fastest response, a human on every case.
    Premium,
}

impl ValueTier {
    /// Days within which a technician visit should happen.
    pub fn visit_within_days(self) -> u64 {
        match self {
            ValueTier::Standard => 14,
            ValueTier::Plus => 7,
            ValueTier::Premium => 2,
        }
    }

    /// Whether every case goes to a human as well, not only the unusual ones.
    pub fn human_on_every_case(self) -> bool {
        self == ValueTier::Premium
    }
}

/// When notifications went out, for the weekly budget: at most `budget` entries kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentLog(VecDeque<TimeMs>);

impl SentLog {
    /// Records a notification sent at `now`, keeping only what the budget can look at.
    pub fn record(&mut self, now: TimeMs, budget: u8) {
        self.0.push_back(now);
        while self.0.len() > usize::from(budget.max(1)) {
            self.0.pop_front();
        }
    }

    /// Notifications sent in the 7 days before `now`.
    pub fn in_last_week(&self, now: TimeMs) -> usize {
        self.0.iter().filter(|&&t| t + 7 * DAY_MS > now).count()
    }

    /// When the oldest notification in the window leaves it.
    fn frees_at(&self, now: TimeMs) -> Option<TimeMs> {
        self.0
            .iter()
            .find(|&&t| t + 7 * DAY_MS > now)
            .map(|t| t + 7 * DAY_MS)
    }
}

/// What to do with a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyDecision {
    /// Send it now through this channel.
    Send(Channel),
    /// Hold it until then (quiet hours, or the budget frees up).
    DeferUntil(TimeMs),
    /// Do not send it; the reason says why.
    Suppress(&'static str),
}

/// Local minutes after midnight and weekday (0 = Monday) of `now` for a UTC offset.
pub fn local_time(now: TimeMs, utc_offset_min: i16) -> (u16, u8) {
    let local_ms = now as i64 + i64::from(utc_offset_min) * 60_000;
    let day = local_ms.div_euclid(DAY_MS as i64);
    let min = (local_ms.rem_euclid(DAY_MS as i64) / 60_000) as u16;
    // 1970-01-01 was a Thursday (weekday 3).
    let weekday = (day + 3).rem_euclid(7) as u8;
    (min, weekday)
}

/// A time as a person reads it, in their local time: `Thu 3 Dec 2026 14:30`.
pub fn civil_time(at: TimeMs, utc_offset_min: i16) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let local_ms = at as i64 + i64::from(utc_offset_min) * 60_000;
    let days = local_ms.div_euclid(DAY_MS as i64);
    let (min, weekday) = local_time(at, utc_offset_min);
    // Days since 1970-01-01 to (year, month, day): Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{} {day} {} {year} {:02}:{:02}",
        DAYS[usize::from(weekday)],
        MONTHS[(month - 1) as usize],
        min / 60,
        min % 60
    )
}

/// If `now` is inside the quiet hours, when they end.
fn quiet_until(now: TimeMs, prefs: &Preferences) -> Option<TimeMs> {
    let q = prefs.quiet_hours?;
    if q.start_min == q.end_min {
        return None;
    }
    let (min, _) = local_time(now, prefs.utc_offset_min);
    let inside = if q.start_min < q.end_min {
        (q.start_min..q.end_min).contains(&min)
    } else {
        min >= q.start_min || min < q.end_min
    };
    if !inside {
        return None;
    }
    let minutes_left = (i32::from(q.end_min) - i32::from(min)).rem_euclid(24 * 60) as u64;
    // To the start of the end minute.
    let into_minute = now % 60_000;
    Some(now - into_minute + minutes_left * 60_000)
}

/// Decides whether a notification of `priority` may go out at `now`.
///
/// Safety alarms go out at once on the first channel, whatever the hour, the budget or the
/// contact consent: they protect life and property. Everything else needs consent to
/// contact, waits for quiet hours to end, and respects the weekly budget (low-priority
/// notes are dropped when it is spent; the rest wait until it frees).
pub fn decide_notification(
    prefs: &Preferences,
    consent: Consent,
    sent: &SentLog,
    priority: Priority,
    now: TimeMs,
) -> NotifyDecision {
    let Some(&channel) = prefs.channels.first() else {
        return NotifyDecision::Suppress("no channel to reach the customer");
    };
    if priority == Priority::Safety {
        return NotifyDecision::Send(channel);
    }
    if !consent.allows(ConsentScope::Contact) {
        return NotifyDecision::Suppress("no consent to contact");
    }
    if sent.in_last_week(now) >= usize::from(prefs.budget_per_week) {
        return match (priority, sent.frees_at(now)) {
            (Priority::Low, _) | (_, None) => {
                NotifyDecision::Suppress("weekly notification budget spent")
            }
            (_, Some(t)) => NotifyDecision::DeferUntil(quiet_until(t, prefs).unwrap_or(t)),
        };
    }
    match quiet_until(now, prefs) {
        Some(until) => NotifyDecision::DeferUntil(until),
        None => NotifyDecision::Send(channel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HOUR_MS;

    /// 2026-11-23 (a Monday) 00:00 UTC.
    const MONDAY: TimeMs = 1_795_392_000_000;

    fn contact() -> Consent {
        Consent::of(&[ConsentScope::Contact, ConsentScope::Diagnostics])
    }

    #[test]
    fn civil_time_reads_like_a_calendar() {
        assert_eq!(civil_time(MONDAY, 0), "Mon 23 Nov 2026 00:00");
        assert_eq!(civil_time(0, 0), "Thu 1 Jan 1970 00:00");
        // 2024-02-29 12:34 UTC, a leap day; an hour east it is 13:34.
        assert_eq!(civil_time(1_709_210_040_000, 60), "Thu 29 Feb 2024 13:34");
        // West of UTC, 2027-01-01 00:30 UTC is New Year's Eve.
        assert_eq!(civil_time(1_798_763_400_000, -300), "Thu 31 Dec 2026 19:30");
    }

    #[test]
    fn local_time_and_weekday() {
        assert_eq!(local_time(MONDAY, 0), (0, 0));
        assert_eq!(local_time(MONDAY + 13 * HOUR_MS, 60), (14 * 60, 0));
        // West of UTC, Monday 00:30 UTC is Sunday evening.
        assert_eq!(local_time(MONDAY + 30 * 60_000, -300), (19 * 60 + 30, 6));
    }

    #[test]
    fn quiet_hours_defer_to_their_end_in_local_time() {
        let prefs = Preferences {
            utc_offset_min: 60,
            ..Preferences::default()
        }; // quiet 22:00–07:00 local = 21:00–06:00 UTC
        let at_2330_local = MONDAY + 22 * HOUR_MS + 30 * 60_000;
        assert_eq!(
            decide_notification(
                &prefs,
                contact(),
                &SentLog::default(),
                Priority::Normal,
                at_2330_local
            ),
            NotifyDecision::DeferUntil(MONDAY + 30 * HOUR_MS) // Tuesday 07:00 local
        );
        let at_noon = MONDAY + 11 * HOUR_MS;
        assert_eq!(
            decide_notification(
                &prefs,
                contact(),
                &SentLog::default(),
                Priority::Normal,
                at_noon
            ),
            NotifyDecision::Send(Channel::Push)
        );
    }

    #[test]
    fn safety_gets_through_everything() {
        let prefs = Preferences {
            budget_per_week: 1,
            ..Preferences::default()
        };
        let mut sent = SentLog::default();
        sent.record(MONDAY, 1);
        let night = MONDAY + 3 * HOUR_MS;
        // Quiet hours, budget spent, no consent to contact: still sent.
        assert_eq!(
            decide_notification(&prefs, Consent::default(), &sent, Priority::Safety, night),
            NotifyDecision::Send(Channel::Push)
        );
        assert!(matches!(
            decide_notification(&prefs, Consent::default(), &sent, Priority::High, night),
            NotifyDecision::Suppress("no consent to contact")
        ));
    }

    #[test]
    fn weekly_budget_is_never_exceeded() {
        let prefs = Preferences {
            quiet_hours: None,
            budget_per_week: 3,
            ..Preferences::default()
        };
        let mut sent = SentLog::default();
        let mut now = MONDAY;
        let mut delivered = Vec::new();
        // Something to say every hour for four weeks: at most 3 in any 7-day window.
        for _ in 0..(28 * 24) {
            if let NotifyDecision::Send(_) =
                decide_notification(&prefs, contact(), &sent, Priority::Normal, now)
            {
                sent.record(now, prefs.budget_per_week);
                delivered.push(now);
            }
            now += HOUR_MS;
        }
        for (i, &t) in delivered.iter().enumerate() {
            let in_window = delivered[i..]
                .iter()
                .filter(|&&u| u < t + 7 * DAY_MS)
                .count();
            assert!(
                in_window <= 3,
                "{in_window} notifications in the week from {t}"
            );
        }
        assert_eq!(delivered.len(), 12, "3 a week for 4 weeks");
        // Spent: normal waits for the oldest to age out, low is dropped.
        let mut full = SentLog::default();
        for h in 0..3 {
            full.record(MONDAY + h * HOUR_MS, 3);
        }
        let later = MONDAY + 10 * HOUR_MS;
        assert_eq!(
            decide_notification(&prefs, contact(), &full, Priority::Normal, later),
            NotifyDecision::DeferUntil(MONDAY + 7 * DAY_MS)
        );
        assert!(matches!(
            decide_notification(&prefs, contact(), &full, Priority::Low, later),
            NotifyDecision::Suppress(_)
        ));
    }

    #[test]
    fn consent_bits() {
        let mut c = Consent::of(&[ConsentScope::UsageAnalytics]);
        assert!(c.allows(ConsentScope::UsageAnalytics) && !c.allows(ConsentScope::Contact));
        c.grant(ConsentScope::Contact);
        c.withdraw(ConsentScope::UsageAnalytics);
        assert!(!c.allows(ConsentScope::UsageAnalytics) && c.allows(ConsentScope::Contact));
        assert_eq!(c.missing().len(), 3);
    }
}
