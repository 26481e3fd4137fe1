//! The twins driven step by step in virtual time, with their mail read back from the
//! step's operations.

use super::customer::{CaseState, CustomerEnv, CustomerMsg, CustomerReply, CustomerTwin, Profile};
use super::device::{
    DeviceEnv, DeviceItem, DeviceMsg, DeviceReply, DeviceTwin, ItemKind, RejectKind,
};
use crate::catalogue::Catalogue;
use crate::host::{Ctx, Twin};
use crate::mail::{Address, Body, Mail};
use crate::model::{ConsentScope, DAY_MS, HOUR_MS, Insight, InsightKind, Priority, TimeMs};
use crate::policy::{Consent, Preferences};
use crate::store::{Key, Op};
use std::sync::{Arc, OnceLock};

/// 2026-11-23 (a Monday) 10:00 UTC.
const T0: TimeMs = 1_795_392_000_000 + 10 * HOUR_MS;
const DEVICE: &str = "t1:coffee-1";
const CUSTOMER: &str = "t1:alice";

fn catalogue() -> Arc<Catalogue> {
    static C: OnceLock<Arc<Catalogue>> = OnceLock::new();
    C.get_or_init(|| Arc::new(Catalogue::builtin())).clone()
}

fn device_env() -> DeviceEnv {
    DeviceEnv::new(catalogue()).unwrap()
}

fn customer_env() -> CustomerEnv {
    CustomerEnv {
        catalogue: catalogue(),
    }
}

fn ctx(now: TimeMs, id: &str) -> Ctx {
    Ctx::new(now, id, Key::new("timers/t"), Key::new("outbox/t"))
}

/// The mail a step emitted.
fn mail_of(ctx: &Ctx) -> Vec<Mail> {
    ctx.ops()
        .iter()
        .filter_map(|op| match op {
            Op::Enqueue { value, .. } => Some(Mail::decode(value).unwrap()),
            _ => None,
        })
        .collect()
}

/// Timers a step armed, as (due, tag-carrying item).
fn armed(ctx: &Ctx) -> Vec<u64> {
    ctx.ops()
        .iter()
        .filter_map(|op| match op {
            Op::Schedule { due_ms, .. } => Some(*due_ms),
            _ => None,
        })
        .collect()
}

fn coffee(env: &DeviceEnv) -> DeviceTwin {
    let mut d = DeviceTwin::create(DEVICE, env).unwrap();
    let mut c = ctx(T0, DEVICE);
    let r = d.handle(
        DeviceMsg::Provision {
            customer: CUSTOMER.into(),
            site: "t1:home-1".into(),
            model: "coffee.barista-200".into(),
        },
        &mut c,
        env,
    );
    assert_eq!(r, DeviceReply::Ok);
    d
}

fn reading(seq: u64, ts: TimeMs, signal: &str, value: f64) -> DeviceItem {
    DeviceItem {
        seq,
        ts_ms: ts,
        kind: ItemKind::Reading {
            signal: signal.into(),
            value,
        },
    }
}

fn applied(r: DeviceReply) -> super::device::ApplyReport {
    match r {
        DeviceReply::Applied(a) => a,
        other => panic!("expected an apply report, got {other:?}"),
    }
}

/// Deterministic noise in [-1, 1].
fn noise(i: u64) -> f64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    (x as f64 / u64::MAX as f64) * 2.0 - 1.0
}

// ---------------------------------------------------------------- device twin

#[test]
fn a_replay_changes_nothing_and_emits_nothing() {
    let env = device_env();
    let mut d = coffee(&env);
    let items: Vec<DeviceItem> = (1..=48)
        .map(|i| reading(i, T0 + i * HOUR_MS, "brew_pressure", 9.2 + 0.05 * noise(i)))
        .collect();
    let now = T0 + 49 * HOUR_MS;
    let mut c = ctx(now, DEVICE);
    let first = applied(d.handle(DeviceMsg::Apply(items.clone()), &mut c, &env));
    assert_eq!((first.applied, first.high_water), (48, 48));
    assert!(c.is_changed());
    assert!(c.ops().iter().any(|op| matches!(
        op,
        Op::AdvanceHighWater {
            from: 0,
            to: 48,
            ..
        }
    )));
    let before = d.snapshot();

    let mut c = ctx(now, DEVICE);
    let again = applied(d.handle(DeviceMsg::Apply(items), &mut c, &env));
    assert_eq!((again.applied, again.duplicates), (0, 48));
    assert!(!c.is_changed(), "a replay must not rewrite the twin");
    assert!(
        c.ops().is_empty(),
        "a replay must not emit or advance anything"
    );
    assert_eq!(d.snapshot(), before);
}

#[test]
fn a_gap_is_noted_and_nothing_after_it_is_applied() {
    let env = device_env();
    let mut d = coffee(&env);
    let now = T0 + DAY_MS;
    let mut c = ctx(now, DEVICE);
    let r = applied(d.handle(
        DeviceMsg::Apply(vec![
            reading(1, T0 + 1, "brew_pressure", 9.1),
            reading(2, T0 + 2, "brew_pressure", 9.1),
            reading(4, T0 + 4, "brew_pressure", 9.1),
            reading(5, T0 + 5, "brew_pressure", 9.1),
        ]),
        &mut c,
        &env,
    ));
    assert_eq!((r.applied, r.gap_at, r.high_water), (2, Some(3), 2));
    assert_eq!(d.gaps(), 1);
    let mut c = ctx(now, DEVICE);
    let r = applied(
        d.handle(
            DeviceMsg::Apply(
                (3..=5)
                    .map(|i| reading(i, T0 + i, "brew_pressure", 9.1))
                    .collect(),
            ),
            &mut c,
            &env,
        ),
    );
    assert_eq!((r.applied, r.gap_at, r.high_water), (3, None, 5));
}

#[test]
fn bad_items_are_refused_and_change_no_state() {
    let env = device_env();
    let mut d = coffee(&env);
    let now = T0 + DAY_MS;
    let mut c = ctx(now, DEVICE);
    applied(d.handle(
        DeviceMsg::Apply(vec![reading(1, T0, "brew_pressure", 9.0)]),
        &mut c,
        &env,
    ));
    let reported_before = d.reported().to_vec();
    let bad = vec![
        reading(2, T0 + 1, "brew_pressure", f64::NAN),
        reading(3, T0 + 2, "brew_pressure", f64::INFINITY),
        reading(4, now + 2 * DAY_MS, "brew_pressure", 9.0),
        reading(5, T0 + 3, "no_such_signal", 1.0),
        DeviceItem {
            seq: 6,
            ts_ms: T0 + 4,
            kind: ItemKind::Alarm {
                kind: "martians".into(),
                local_action: None,
            },
        },
        DeviceItem {
            seq: 7,
            ts_ms: T0 + 5,
            kind: ItemKind::Diagnostic { code: "E99".into() },
        },
    ];
    let mut c = ctx(now, DEVICE);
    let r = applied(d.handle(DeviceMsg::Apply(bad), &mut c, &env));
    assert_eq!(r.applied, 0);
    let reasons: Vec<&str> = r.rejected.iter().map(|x| x.reason.as_str()).collect();
    let kinds: Vec<RejectKind> = r.rejected.iter().map(|x| x.kind).collect();
    use RejectKind::*;
    assert_eq!(
        kinds,
        [
            InvalidValue,
            InvalidValue,
            TimestampInFuture,
            UnknownSignal,
            UnknownEvent,
            UnknownEvent
        ]
    );
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    assert!(
        reasons[0].contains("not finite") && reasons[1].contains("not finite"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("future"), "{reasons:?}");
    assert!(reasons[3].contains("unknown signal"), "{reasons:?}");
    assert!(reasons[4].contains("unknown alarm"), "{reasons:?}");
    assert!(reasons[5].contains("unknown diagnostic"), "{reasons:?}");
    // The mark moved past them (a device is never stuck), but no state changed.
    assert_eq!(r.high_water, 7);
    assert_eq!(d.reported(), reported_before.as_slice());
    assert!(mail_of(&c).is_empty());
    // An oversized batch is refused whole.
    let huge: Vec<DeviceItem> = (8..8 + 10_001)
        .map(|i| reading(i, T0 + i, "brew_pressure", 9.0))
        .collect();
    let mut c = ctx(now, DEVICE);
    assert!(matches!(
        d.handle(DeviceMsg::Apply(huge), &mut c, &env),
        DeviceReply::Rejected(_)
    ));
    assert!(c.ops().is_empty());
}

/// Story 1's signal: brew pressure falls slowly as scale builds up.
fn scaling_pressure(hours: u64) -> Vec<DeviceItem> {
    // From 9.3 bar, −0.02 bar/h: the 7.5 bar threshold is crossed after 90 h.
    (1..=hours)
        .map(|h| {
            reading(
                h,
                T0 + h * HOUR_MS,
                "brew_pressure",
                9.3 - 0.02 * h as f64 + 0.03 * noise(h),
            )
        })
        .collect()
}

#[test]
fn scale_build_up_is_forecast_once_with_its_failure_mode() {
    let env = device_env();
    let mut d = coffee(&env);
    let mut forecasts: Vec<(u64, Insight)> = Vec::new();
    for item in scaling_pressure(60) {
        let h = item.seq;
        let mut c = ctx(item.ts_ms, DEVICE);
        applied(d.handle(DeviceMsg::Apply(vec![item]), &mut c, &env));
        for m in mail_of(&c) {
            assert_eq!(m.to, Address::Customer(CUSTOMER.into()));
            if let Body::Insight { insight, .. } = m.body
                && insight.kind == InsightKind::Forecast
            {
                forecasts.push((h, insight));
            }
        }
    }
    assert!(
        !forecasts.is_empty(),
        "a 0.02 bar/h decline must be forecast within 60 h"
    );
    let (h, first) = &forecasts[0];
    assert_eq!(first.failure_mode.as_deref(), Some("scale"));
    // True crossing: 90 h after T0. The forecast's ETA is within 15 % of it.
    let truth = T0 + 90 * HOUR_MS;
    let eta = first.eta_ms.unwrap();
    let err = (eta as f64 - truth as f64).abs() / (truth - (T0 + h * HOUR_MS)) as f64;
    assert!(err < 0.15, "ETA off by {:.0} %", err * 100.0);
    // Not raised on every reading: the latch re-raises only on a material change.
    assert!(
        forecasts.len() <= 5,
        "{} forecasts in 60 readings",
        forecasts.len()
    );
}

#[test]
fn usage_data_is_used_only_with_consent() {
    let env = device_env();
    let mut d = coffee(&env);
    let now = T0 + DAY_MS;
    let mut c = ctx(now, DEVICE);
    let r = applied(d.handle(
        DeviceMsg::Apply(vec![reading(1, T0, "water_through", 10.0)]),
        &mut c,
        &env,
    ));
    assert_eq!((r.applied, r.withheld, r.high_water), (0, 1, 1));
    assert!(
        d.reported()[4].is_none(),
        "usage data not stored without consent"
    );

    let grant = Mail {
        id: format!("{CUSTOMER}/1"),
        from: Address::Customer(CUSTOMER.into()),
        to: Address::Device(DEVICE.into()),
        body: Body::ConsentChanged {
            allowed: vec![ConsentScope::Diagnostics, ConsentScope::UsageAnalytics],
        },
    };
    assert_eq!(
        d.handle(
            DeviceMsg::Mail(Box::new(grant)),
            &mut ctx(now, DEVICE),
            &env
        ),
        DeviceReply::Ok
    );
    let r = applied(d.handle(
        DeviceMsg::Apply(vec![reading(2, T0 + 1, "water_through", 11.0)]),
        &mut ctx(now, DEVICE),
        &env,
    ));
    assert_eq!((r.applied, r.withheld), (1, 0));
    assert!(d.reported()[4].is_some());

    // Consent changes come only from the device's own customer.
    let forged = Mail {
        id: "t1:mallory/1".into(),
        from: Address::Customer("t1:mallory".into()),
        to: Address::Device(DEVICE.into()),
        body: Body::ConsentChanged { allowed: vec![] },
    };
    assert!(matches!(
        d.handle(
            DeviceMsg::Mail(Box::new(forged)),
            &mut ctx(now, DEVICE),
            &env
        ),
        DeviceReply::Rejected(_)
    ));
}

#[test]
fn an_alarm_reaches_the_customer_twin_at_once() {
    let env = device_env();
    let mut d = DeviceTwin::create("t1:hub-1", &env).unwrap();
    let prov = DeviceMsg::Provision {
        customer: CUSTOMER.into(),
        site: "t1:home-1".into(),
        model: "hub.guardian-1".into(),
    };
    assert_eq!(
        d.handle(prov, &mut ctx(T0, "t1:hub-1"), &env),
        DeviceReply::Ok
    );
    let alarm = DeviceItem {
        seq: 1,
        ts_ms: T0,
        kind: ItemKind::Alarm {
            kind: "smoke".into(),
            local_action: Some("siren_on".into()),
        },
    };
    let mut c = ctx(T0 + 1, "t1:hub-1");
    applied(d.handle(DeviceMsg::Apply(vec![alarm]), &mut c, &env));
    let mail = mail_of(&c);
    assert_eq!(mail.len(), 1);
    let Body::Insight { insight, .. } = &mail[0].body else {
        panic!("{mail:?}")
    };
    assert_eq!(insight.kind, InsightKind::Alarm);
    assert!(insight.failure_mode.is_some());
    assert!(insight.subject.contains("siren_on"));
}

#[test]
fn another_tenants_customer_cannot_own_a_device() {
    let env = device_env();
    let mut d = DeviceTwin::create(DEVICE, &env).unwrap();
    let r = d.handle(
        DeviceMsg::Provision {
            customer: "t2:eve".into(),
            site: "t2:home".into(),
            model: "coffee.barista-200".into(),
        },
        &mut ctx(T0, DEVICE),
        &env,
    );
    assert!(matches!(r, DeviceReply::Rejected(_)));
}

#[test]
fn a_site_writes_only_its_own_provisioned_devices() {
    let env = device_env();
    let mut d = coffee(&env); // of site t1:home-1
    let items = vec![reading(1, T0, "brew_pressure", 9.2)];
    let from = |site: &str| DeviceMsg::FromSite {
        site: site.into(),
        items: items.clone(),
    };
    let mut c = ctx(T0, DEVICE);
    assert_eq!(
        d.handle(from("t1:shop-7"), &mut c, &env),
        DeviceReply::NotOwner
    );
    assert!(c.ops().is_empty() && !c.is_changed());
    assert_eq!(d.high_water(), 0);
    let r = applied(d.handle(from("t1:home-1"), &mut ctx(T0, DEVICE), &env));
    assert_eq!(r.high_water, 1);
    // A device nobody provisioned cannot be written into existence.
    let mut stranger = DeviceTwin::create("t1:nobody", &env).unwrap();
    let mut c = ctx(T0, "t1:nobody");
    assert_eq!(
        stranger.handle(from("t1:home-1"), &mut c, &env),
        DeviceReply::UnknownDevice
    );
    assert!(c.ops().is_empty() && !c.is_changed());
}

#[test]
fn desired_state_versions_and_delta_to_reported() {
    let env = device_env();
    let mut d = coffee(&env);
    let set = |field: &str, value: &str, expected| DeviceMsg::SetDesired {
        field: field.into(),
        value: value.into(),
        expected_version: expected,
    };
    let mut c = ctx(T0, DEVICE);
    assert_eq!(
        d.handle(set("brew_temp", "93", None), &mut c, &env),
        DeviceReply::Version(1)
    );
    let sent = mail_of(&c);
    assert_eq!(
        sent[0].to,
        Address::Edge("t1:home-1".into()),
        "desired state goes to the edge"
    );
    // The cloud's latest version wins; a writer with a stale version is refused.
    assert_eq!(
        d.handle(set("brew_temp", "94", Some(1)), &mut ctx(T0, DEVICE), &env),
        DeviceReply::Version(2)
    );
    assert!(matches!(
        d.handle(set("brew_temp", "90", Some(1)), &mut ctx(T0, DEVICE), &env),
        DeviceReply::Rejected(_)
    ));
    assert_eq!(d.delta(), vec![("brew_temp", "94", None)]);
    // The device reports the field: by its own sequence, its latest wins.
    let report = |seq, v: &str| DeviceItem {
        seq,
        ts_ms: T0,
        kind: ItemKind::Reported {
            fields: vec![("brew_temp".into(), v.into())],
        },
    };
    applied(d.handle(
        DeviceMsg::Apply(vec![report(2, "94"), report(1, "93")]),
        &mut ctx(T0, DEVICE),
        &env,
    ));
    assert_eq!(
        d.reported_fields()["brew_temp"].value,
        "94",
        "sequence order, not arrival order"
    );
    assert!(d.delta().is_empty());
    assert!(matches!(
        d.handle(set("", "x", None), &mut ctx(T0, DEVICE), &env),
        DeviceReply::Rejected(_)
    ));
}

// ---------------------------------------------------------------- customer twin

fn alice(env: &CustomerEnv, prefs: Preferences) -> CustomerTwin {
    let mut t = CustomerTwin::create(CUSTOMER, env).unwrap();
    let profile = Profile {
        region: "north".into(),
        preferences: prefs,
        consent: Consent::of(&[ConsentScope::Diagnostics, ConsentScope::Contact]),
        ..Profile::default()
    };
    assert_eq!(
        t.handle(
            CustomerMsg::SetProfile(profile),
            &mut ctx(T0, CUSTOMER),
            env
        ),
        CustomerReply::Ok
    );
    let add = CustomerMsg::AddDevice {
        device: DEVICE.into(),
        model: "coffee.barista-200".into(),
    };
    assert_eq!(
        t.handle(add, &mut ctx(T0, CUSTOMER), env),
        CustomerReply::Ok
    );
    t
}

struct MailFrom {
    sender: Address,
    seq: u64,
}

impl MailFrom {
    fn device() -> Self {
        Self {
            sender: Address::Device(DEVICE.into()),
            seq: 0,
        }
    }

    fn of(sender: Address) -> Self {
        Self { sender, seq: 0 }
    }

    fn next(&mut self, body: Body) -> CustomerMsg {
        self.seq += 1;
        let id = match &self.sender {
            Address::Device(i)
            | Address::Customer(i)
            | Address::Parts(i)
            | Address::Scheduler(i)
            | Address::Handoff(i) => i.clone(),
            _ => "x".into(),
        };
        CustomerMsg::Mail(Mail {
            id: format!("{id}/{}", self.seq),
            from: self.sender.clone(),
            to: Address::Customer(CUSTOMER.into()),
            body,
        })
    }
}

fn insight(
    kind: InsightKind,
    subject: &str,
    mode: &str,
    confidence: f64,
    scope: ConsentScope,
) -> Body {
    Body::Insight {
        device: DEVICE.into(),
        model: "coffee.barista-200".into(),
        insight: Insight {
            kind,
            subject: subject.into(),
            failure_mode: Some(mode.into()),
            confidence,
            eta_ms: Some(T0 + 5 * DAY_MS),
            eta_band_ms: Some((T0 + 4 * DAY_MS, T0 + 6 * DAY_MS)),
            value: 8.4,
            raised_at_ms: T0,
            scope,
        },
    }
}

fn standing_descaler() -> Preferences {
    Preferences {
        standing_approvals: vec!["DESC-250".into()],
        ..Preferences::default()
    }
}

/// Story 1 end to end at the customer twin: forecast → descale → judged → one order →
/// one notification inside allowed hours → case closed.
#[test]
fn descaling_story_runs_the_playbook_in_order_once() {
    let env = customer_env();
    let mut t = alice(&env, standing_descaler());
    let mut dev = MailFrom::device();
    let scale = || {
        insight(
            InsightKind::Forecast,
            "brew_pressure",
            "scale",
            0.8,
            ConsentScope::Diagnostics,
        )
    };

    let mut c = ctx(T0, CUSTOMER);
    assert_eq!(t.handle(dev.next(scale()), &mut c, &env), CustomerReply::Ok);
    let sent = mail_of(&c);
    assert_eq!(sent.len(), 1);
    let Body::Command(cmd) = &sent[0].body else {
        panic!("{sent:?}")
    };
    assert_eq!(
        (cmd.name.as_str(), sent[0].to.clone()),
        ("descale", Address::Device(DEVICE.into()))
    );
    assert_eq!(
        armed(&c),
        vec![T0 + 6 * HOUR_MS],
        "remedy judged after the playbook's 6 h"
    );

    // The same root cause again (another forecast): no second case, no second command.
    let mut c = ctx(T0 + HOUR_MS, CUSTOMER);
    t.handle(dev.next(scale()), &mut c, &env);
    assert!(mail_of(&c).is_empty());
    assert_eq!(t.cases().len(), 1);

    // The descale cycle worked: the device reports the concern cleared.
    let cleared = Body::InsightCleared {
        device: DEVICE.into(),
        subject: "brew_pressure".into(),
        failure_mode: Some("scale".into()),
    };
    t.handle(
        dev.next(cleared),
        &mut ctx(T0 + 3 * HOUR_MS, CUSTOMER),
        &env,
    );
    let mut c = ctx(T0 + 6 * HOUR_MS, CUSTOMER);
    t.on_timer(&format!("case:{CUSTOMER}/case-1:remedy"), &mut c, &env);
    let sent = mail_of(&c);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let Body::OrderPart {
        key, part_number, ..
    } = &sent[0].body
    else {
        panic!("{sent:?}")
    };
    assert_eq!(part_number, "DESC-250");
    assert_eq!(sent[0].to, Address::Parts("t1".into()));

    // The desk confirms; the customer is told once, at 16:00 (inside allowed hours).
    let mut desk = MailFrom::of(Address::Parts("t1".into()));
    let placed = Body::PartOrderUpdate {
        key: key.clone(),
        placed: true,
        arrives_at_ms: Some(T0 + 2 * DAY_MS),
        detail: "PO-1".into(),
    };
    let mut c = ctx(T0 + 6 * HOUR_MS, CUSTOMER);
    t.handle(desk.next(placed.clone()), &mut c, &env);
    let sent = mail_of(&c);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(matches!(
        &sent[0].body,
        Body::Notify {
            priority: Priority::Normal,
            ..
        }
    ));
    assert!(t.cases().is_empty(), "case closed after the playbook");
    assert_eq!(t.history().last().unwrap().state, CaseState::Closed);

    // The desk's confirmation redelivered: nothing new.
    let mut c = ctx(T0 + 7 * HOUR_MS, CUSTOMER);
    let redelivered = CustomerMsg::Mail(Mail {
        id: "t1/1".into(),
        from: Address::Parts("t1".into()),
        to: Address::Customer(CUSTOMER.into()),
        body: placed,
    });
    t.handle(redelivered, &mut c, &env);
    assert!(mail_of(&c).is_empty());
}

#[test]
fn without_a_standing_approval_the_order_waits_for_one_tap() {
    let env = customer_env();
    let mut t = alice(&env, Preferences::default()); // no standing approval
    let mut dev = MailFrom::device();
    t.handle(
        dev.next(insight(
            InsightKind::Forecast,
            "brew_pressure",
            "scale",
            0.8,
            ConsentScope::Diagnostics,
        )),
        &mut ctx(T0, CUSTOMER),
        &env,
    );
    let cleared = Body::InsightCleared {
        device: DEVICE.into(),
        subject: "brew_pressure".into(),
        failure_mode: Some("scale".into()),
    };
    t.handle(dev.next(cleared), &mut ctx(T0 + HOUR_MS, CUSTOMER), &env);
    let mut c = ctx(T0 + 6 * HOUR_MS, CUSTOMER);
    t.on_timer(&format!("case:{CUSTOMER}/case-1:remedy"), &mut c, &env);
    let sent = mail_of(&c);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let Body::Notify {
        question_id: Some(q),
        text,
        ..
    } = &sent[0].body
    else {
        panic!("a one-tap approval request, not an order: {sent:?}")
    };
    assert!(text.contains("tap to order"), "{text}");

    // The customer taps "Order": now, and only now, the order goes out.
    let tap = CustomerMsg::Mail(Mail {
        id: "t1/notifier/1".into(),
        from: Address::Notifier("t1".into()),
        to: Address::Customer(CUSTOMER.into()),
        body: Body::CustomerAnswer {
            question_id: q.clone(),
            answer: super::customer::APPROVE.into(),
        },
    });
    let mut c = ctx(T0 + 8 * HOUR_MS, CUSTOMER);
    assert_eq!(t.handle(tap, &mut c, &env), CustomerReply::Ok);
    let sent = mail_of(&c);
    assert!(
        matches!(&sent[..], [Mail { body: Body::OrderPart { part_number, .. }, .. }] if part_number == "DESC-250"),
        "{sent:?}"
    );
}

#[test]
fn a_failed_remedy_goes_to_a_person_with_its_context() {
    let env = customer_env();
    let mut t = alice(&env, Preferences::default()); // no standing approval
    let mut dev = MailFrom::device();
    t.handle(
        dev.next(insight(
            InsightKind::Forecast,
            "brew_pressure",
            "scale",
            0.8,
            ConsentScope::Diagnostics,
        )),
        &mut ctx(T0, CUSTOMER),
        &env,
    );
    // Nothing cleared by the time the remedy is judged.
    let mut c = ctx(T0 + 6 * HOUR_MS, CUSTOMER);
    t.on_timer(&format!("case:{CUSTOMER}/case-1:remedy"), &mut c, &env);
    let sent = mail_of(&c);
    assert_eq!(
        sent.len(),
        1,
        "no order without approval, straight to a person: {sent:?}"
    );
    let Body::Handoff {
        context, priority, ..
    } = &sent[0].body
    else {
        panic!("{sent:?}")
    };
    assert_eq!(*priority, Priority::Normal);
    assert_eq!(context.root_cause, "scale");
    assert_eq!(context.insights.len(), 1);
    assert!(
        context.actions.iter().any(|a| a.contains("descale")),
        "{:?}",
        context.actions
    );
    assert!(
        context.actions.iter().any(|a| a.contains("Failed")),
        "{:?}",
        context.actions
    );
    assert!(context.withheld.contains(&ConsentScope::UsageAnalytics));
    assert_eq!(t.cases()[0].state, CaseState::HandedOff);
}

/// Pump wear at Alice's (with `prefs`): the part is ordered, placed, the technician
/// requested after it arrives and booked by the scheduler. Returns the twin, the booking
/// key, the `Book` mail's `confirmed` and the mail sent on the booking's answer.
fn pump_visit_booked(
    env: &CustomerEnv,
    prefs: Preferences,
) -> (CustomerTwin, String, bool, Vec<Mail>) {
    let mut t = alice(env, prefs);
    let mut dev = MailFrom::device();
    let mut c = ctx(T0, CUSTOMER);
    t.handle(
        dev.next(insight(
            InsightKind::Forecast,
            "pump_current",
            "pump-wear",
            0.9,
            ConsentScope::Diagnostics,
        )),
        &mut c,
        env,
    );
    let sent = mail_of(&c);
    let Body::OrderPart {
        key,
        part_number,
        device,
        ..
    } = &sent[0].body
    else {
        panic!("{sent:?}")
    };
    assert_eq!(part_number, "PUMP-12");
    assert_eq!(device, "t1:coffee-1", "the order names the device");

    let arrives = T0 + 5 * DAY_MS;
    let mut desk = MailFrom::of(Address::Parts("t1".into()));
    let mut c = ctx(T0 + HOUR_MS, CUSTOMER);
    t.handle(
        desk.next(Body::PartOrderUpdate {
            key: key.clone(),
            placed: true,
            arrives_at_ms: Some(arrives),
            detail: "PO-7".into(),
        }),
        &mut c,
        env,
    );
    let sent = mail_of(&c);
    let Body::Book {
        key: visit,
        not_before_ms,
        skill,
        region,
        confirmed,
        ..
    } = &sent[0].body
    else {
        panic!("{sent:?}")
    };
    assert_eq!(
        (*not_before_ms, skill.as_str(), region.as_str()),
        (arrives, "coffee-service", "north")
    );

    let mut sched = MailFrom::of(Address::Scheduler("t1".into()));
    let mut c = ctx(T0 + 2 * HOUR_MS, CUSTOMER);
    t.handle(
        sched.next(Body::Booking {
            key: visit.clone(),
            technician: Some("tech-3".into()),
            slot: Some((arrives + DAY_MS, arrives + DAY_MS + HOUR_MS)),
            detail: "WO-1".into(),
        }),
        &mut c,
        env,
    );
    (t, visit.clone(), *confirmed, mail_of(&c))
}

fn kinds(mail: &[Mail]) -> Vec<&'static str> {
    mail.iter()
        .map(|m| match &m.body {
            Body::Notify { .. } => "notify",
            Body::Handoff { .. } => "handoff",
            Body::ConfirmVisit { .. } => "confirm",
            Body::CancelVisit { .. } => "cancel",
            _ => "other",
        })
        .collect()
}

#[test]
fn a_booked_visit_is_proposed_and_the_customers_yes_confirms_it() {
    let env = customer_env();
    let (mut t, visit, confirmed, sent) = pump_visit_booked(&env, Preferences::default());
    assert!(
        !confirmed,
        "no standing approval: the visit is held as proposed"
    );
    // One tap to confirm, and the case waits for it.
    let [
        Mail {
            body:
                Body::Notify {
                    text,
                    question_id: Some(qid),
                    ..
                },
            ..
        },
    ] = &sent[..]
    else {
        panic!("{sent:?}")
    };
    assert!(text.ends_with("[Confirm / Decline]"), "{text}");
    assert_eq!(*qid, format!("{visit}/confirm"));
    let answer = |answer: &str| {
        MailFrom::of(Address::Notifier("t1".into())).next(Body::CustomerAnswer {
            question_id: qid.clone(),
            answer: answer.into(),
        })
    };
    let mut c = ctx(T0 + 3 * HOUR_MS, CUSTOMER);
    t.handle(answer("Confirm"), &mut c, &env);
    let sent = mail_of(&c);
    // The scheduler confirms it; the playbook goes on: its notification, then the handoff.
    assert_eq!(kinds(&sent), ["confirm", "notify", "handoff"]);
    assert_eq!(sent[0].to, Address::Scheduler("t1".into()));
    assert_eq!(sent[0].body, Body::ConfirmVisit { key: visit.clone() });
    // A second answer finds nothing waiting.
    let mut c = ctx(T0 + 4 * HOUR_MS, CUSTOMER);
    t.handle(answer("Decline"), &mut c, &env);
    assert!(mail_of(&c).is_empty());
}

#[test]
fn a_declined_visit_is_cancelled_and_goes_to_a_person() {
    let env = customer_env();
    let (mut t, visit, _, sent) = pump_visit_booked(&env, Preferences::default());
    let Body::Notify {
        question_id: Some(qid),
        ..
    } = &sent[0].body
    else {
        panic!("{sent:?}")
    };
    let mut c = ctx(T0 + 3 * HOUR_MS, CUSTOMER);
    let no = MailFrom::of(Address::Notifier("t1".into())).next(Body::CustomerAnswer {
        question_id: qid.clone(),
        answer: "Decline".into(),
    });
    t.handle(no, &mut c, &env);
    let sent = mail_of(&c);
    assert_eq!(kinds(&sent), ["cancel", "handoff"]);
    assert!(matches!(&sent[0].body, Body::CancelVisit { key, .. } if *key == visit));
    assert_eq!(t.cases()[0].state, CaseState::HandedOff);
}

#[test]
fn a_standing_visit_approval_books_it_confirmed_without_asking() {
    let env = customer_env();
    let prefs = Preferences {
        visit_approvals: vec!["coffee-service".into()],
        ..Preferences::default()
    };
    let (_, _, confirmed, sent) = pump_visit_booked(&env, prefs);
    assert!(confirmed, "booked confirmed");
    // Told, not asked; the playbook goes straight on.
    assert_eq!(kinds(&sent), ["notify", "notify", "handoff"]);
    assert!(
        matches!(&sent[0].body, Body::Notify { question_id: None, text, .. } if text.starts_with("A technician visits on")),
        "{sent:?}"
    );
}

#[test]
fn insights_without_consent_open_no_case() {
    let env = customer_env();
    let mut t = alice(&env, standing_descaler());
    let mut dev = MailFrom::device();
    let mut c = ctx(T0, CUSTOMER);
    t.handle(
        dev.next(insight(
            InsightKind::ConsumableLow,
            "water_through",
            "scale",
            0.9,
            ConsentScope::UsageAnalytics,
        )),
        &mut c,
        &env,
    );
    assert!(mail_of(&c).is_empty());
    assert!(t.cases().is_empty());
    assert_eq!(t.withheld(), 1);
}

#[test]
fn a_safety_alarm_reaches_customer_and_a_person_even_at_night() {
    let env = customer_env();
    let mut t = alice(&env, Preferences::default()); // quiet 22:00–07:00 UTC
    let add = CustomerMsg::AddDevice {
        device: "t1:hub-1".into(),
        model: "hub.guardian-1".into(),
    };
    t.handle(add, &mut ctx(T0, CUSTOMER), &env);
    // Withdraw consent to contact: a safety alarm still gets through.
    let withdraw = CustomerMsg::SetConsent {
        grant: vec![],
        withdraw: vec![ConsentScope::Contact],
    };
    t.handle(withdraw, &mut ctx(T0, CUSTOMER), &env);
    let night = T0 + 15 * HOUR_MS; // 01:00
    let model = catalogue();
    let hub = model.model("hub.guardian-1").unwrap();
    let mode = hub.mode_for_alarm("smoke").unwrap().id.clone();
    let mut dev = MailFrom::of(Address::Device("t1:hub-1".into()));
    let mut c = ctx(night, CUSTOMER);
    t.handle(
        dev.next(Body::Insight {
            device: "t1:hub-1".into(),
            model: "hub.guardian-1".into(),
            insight: Insight {
                kind: InsightKind::Alarm,
                subject: "smoke".into(),
                failure_mode: Some(mode),
                confidence: 1.0,
                eta_ms: None,
                eta_band_ms: None,
                value: 1.0,
                raised_at_ms: night,
                scope: ConsentScope::Diagnostics,
            },
        }),
        &mut c,
        &env,
    );
    let sent = mail_of(&c);
    assert!(
        sent.iter().any(|m| matches!(
            &m.body,
            Body::Notify {
                priority: Priority::Safety,
                ..
            }
        )),
        "{sent:?}"
    );
    let handoffs: Vec<&Mail> = sent
        .iter()
        .filter(|m| matches!(m.body, Body::Handoff { .. }))
        .collect();
    assert_eq!(handoffs.len(), 1, "exactly one handoff: {sent:?}");
    assert!(matches!(
        handoffs[0].body,
        Body::Handoff {
            priority: Priority::Safety,
            ..
        }
    ));
}

#[test]
fn mail_from_another_tenant_is_refused() {
    let env = customer_env();
    let mut t = alice(&env, Preferences::default());
    let mut c = ctx(T0, CUSTOMER);
    let mut evil = MailFrom::of(Address::Device("t2:dev".into()));
    let r = t.handle(
        evil.next(insight(
            InsightKind::Forecast,
            "brew_pressure",
            "scale",
            0.9,
            ConsentScope::Diagnostics,
        )),
        &mut c,
        &env,
    );
    assert!(matches!(r, CustomerReply::Rejected(_)));
    assert!(c.ops().is_empty() && t.cases().is_empty());
}

#[test]
fn an_erased_customer_forgets_everything_and_takes_no_more_mail() {
    let env = customer_env();
    let prefs = Preferences {
        standing_approvals: vec!["DESCALER-7".into()],
        ..Preferences::default()
    };
    let mut t = alice(&env, prefs);
    let add = CustomerMsg::AddDevice {
        device: DEVICE.into(),
        model: "coffee.barista-200".into(),
    };
    t.handle(add, &mut ctx(T0, CUSTOMER), &env);
    let mut dev = MailFrom::of(Address::Device(DEVICE.into()));
    t.handle(
        dev.next(insight(
            InsightKind::Forecast,
            "brew_pressure",
            "scale",
            0.9,
            ConsentScope::Diagnostics,
        )),
        &mut ctx(T0, CUSTOMER),
        &env,
    );
    assert!(!t.cases().is_empty() || t.history().next().is_some());

    let mut c = ctx(T0 + 1, CUSTOMER);
    assert_eq!(
        t.handle(CustomerMsg::Erase, &mut c, &env),
        CustomerReply::Ok
    );
    assert!(
        c.is_changed(),
        "the tombstone is written over the old state"
    );
    assert!(t.is_erased());
    assert!(t.cases().is_empty() && t.history().next().is_none());
    assert_eq!(t.devices().count(), 0);
    assert!(t.profile().preferences.standing_approvals.is_empty());
    let snapshot = String::from_utf8(t.snapshot()).unwrap();
    assert!(!snapshot.contains("DESCALER-7") && !snapshot.contains(DEVICE));

    // Later mail, timers and changes bring nothing back.
    let mut c = ctx(T0 + 2, CUSTOMER);
    let late = dev.next(insight(
        InsightKind::Forecast,
        "brew_pressure",
        "scale",
        0.95,
        ConsentScope::Diagnostics,
    ));
    assert_eq!(t.handle(late, &mut c, &env), CustomerReply::Ok);
    t.on_timer("case:x:remedy", &mut c, &env);
    assert!(c.ops().is_empty() && !c.is_changed());
    let add = CustomerMsg::AddDevice {
        device: DEVICE.into(),
        model: "coffee.barista-200".into(),
    };
    assert!(matches!(
        t.handle(add, &mut c, &env),
        CustomerReply::Rejected(_)
    ));
    assert!(matches!(
        t.handle(CustomerMsg::SetProfile(Profile::default()), &mut c, &env),
        CustomerReply::Rejected(_)
    ));
    assert_eq!(
        t.handle(CustomerMsg::Erase, &mut c, &env),
        CustomerReply::Ok
    );
    assert!(
        c.ops().is_empty() && !c.is_changed(),
        "erasing again is free"
    );
    let restored = CustomerTwin::restore(CUSTOMER, &t.snapshot(), &env).unwrap();
    assert!(restored.is_erased());
}

#[test]
fn a_detached_device_forgets_its_owner_and_site_but_not_its_high_water() {
    let env = device_env();
    let mut d = coffee(&env);
    let mut c = ctx(T0, DEVICE);
    d.handle(
        DeviceMsg::Apply(vec![reading(1, T0, "brew_pressure", 9.0)]),
        &mut c,
        &env,
    );
    let seen = d.high_water();
    assert!(seen >= 1);
    // Another customer's detach changes nothing.
    let mut c = ctx(T0, DEVICE);
    let other = DeviceMsg::Detach {
        customer: "t1:bob".into(),
    };
    assert_eq!(d.handle(other, &mut c, &env), DeviceReply::Ok);
    assert!(!c.is_changed() && d.customer() == Some(CUSTOMER));

    let mut c = ctx(T0, DEVICE);
    let detach = DeviceMsg::Detach {
        customer: CUSTOMER.into(),
    };
    assert_eq!(d.handle(detach, &mut c, &env), DeviceReply::Ok);
    assert!(c.is_changed());
    assert_eq!((d.customer(), d.site()), (None, None));
    assert_eq!(d.model(), Some("coffee.barista-200"));
    assert_eq!(d.high_water(), seen, "a replay is still refused");
    assert!(d.reported().iter().all(Option::is_none));
    let snapshot = String::from_utf8(d.snapshot()).unwrap();
    assert!(!snapshot.contains(CUSTOMER) && !snapshot.contains("t1:home-1"));
    // The old site can no longer write to it.
    let from_site = DeviceMsg::FromSite {
        site: "t1:home-1".into(),
        items: vec![reading(2, T0 + 1, "brew_pressure", 9.0)],
    };
    assert_eq!(
        d.handle(from_site, &mut ctx(T0, DEVICE), &env),
        DeviceReply::UnknownDevice
    );
}

/// The command transitions a step appended to the tenant's command log.
fn command_events(ctx: &Ctx) -> Vec<super::device::CommandEvent> {
    ctx.ops()
        .iter()
        .filter_map(|op| match op {
            Op::Append { log, value } if *log == super::device::commands_log("t1") => {
                Some(serde_json::from_slice(value).unwrap())
            }
            _ => None,
        })
        .collect()
}

/// The index entries a step appended.
fn index_entries(ctx: &Ctx) -> Vec<super::device::DeviceIndexEntry> {
    ctx.ops()
        .iter()
        .filter_map(|op| match op {
            Op::Append { log, value } if log.as_str().starts_with("device-index/t1/") => {
                Some(serde_json::from_slice(value).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn issued(id: &str, name: &str) -> DeviceMsg {
    DeviceMsg::Issue(Box::new(super::device::IssuedCommand {
        command: crate::mail::DeviceCommand {
            command_id: id.into(),
            device: DEVICE.into(),
            name: name.into(),
            args: vec![],
            expires_at_ms: T0 + HOUR_MS,
            priority: Default::default(),
            action: None,
        },
        key: "k-1".into(),
        issued_by: "crm".into(),
        priority: Priority::High,
        case_id: String::new(),
        reason: "descale now".into(),
    }))
}

#[test]
fn an_integrators_command_is_logged_queued_once_and_cancelled_before_the_edge_has_it() {
    let env = device_env();
    let mut d = coffee(&env);
    let mut c = ctx(T0, DEVICE);
    assert_eq!(
        d.handle(issued("t1:cmd/k-1", "descale"), &mut c, &env),
        DeviceReply::Ok
    );
    let events = command_events(&c);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].state, "queued");
    let info = events[0].info.as_ref().unwrap();
    assert_eq!(
        (info.site.as_str(), info.issued_by.as_str()),
        ("t1:home-1", "crm")
    );
    assert_eq!(info.priority, Priority::High);
    assert!(
        c.ops()
            .iter()
            .any(|op| matches!(op, Op::PutIdempotency { .. })),
        "the key is claimed with the command"
    );
    assert!(matches!(
        mail_of(&c)[..],
        [Mail {
            to: Address::Edge(_),
            body: Body::Command(_),
            ..
        }]
    ));
    // A retry: nothing new.
    let mut c = ctx(T0 + 1, DEVICE);
    assert_eq!(
        d.handle(issued("t1:cmd/k-1", "descale"), &mut c, &env),
        DeviceReply::Ok
    );
    assert!(c.ops().is_empty());
    // Unknown remedy, another tenant's id: refused.
    for bad in [
        issued("t1:cmd/k-2", "self-destruct"),
        issued("t2:cmd/k-2", "descale"),
    ] {
        let mut c = ctx(T0, DEVICE);
        assert!(matches!(
            d.handle(bad, &mut c, &env),
            DeviceReply::Rejected(_)
        ));
        assert!(c.ops().is_empty());
    }
    let cancel = || DeviceMsg::CancelCommand {
        command_id: "t1:cmd/k-1".into(),
        reason: "not needed".into(),
        key: String::new(),
    };
    let mut c = ctx(T0 + 2, DEVICE);
    assert_eq!(d.handle(cancel(), &mut c, &env), DeviceReply::Ok);
    let events = command_events(&c);
    assert_eq!(
        (events[0].state.as_str(), events[0].detail.as_str()),
        ("cancelled", "not needed")
    );
    assert!(c.ops().iter().any(|op| matches!(op, Op::Unschedule { .. })));
    let mut c = ctx(T0 + 3, DEVICE);
    assert_eq!(d.handle(cancel(), &mut c, &env), DeviceReply::Ok);
    assert!(command_events(&c).is_empty());
    // A late report from the edge does not revive it.
    let mut c = ctx(T0 + 4, DEVICE);
    let status = DeviceMsg::CommandStatus {
        site: "t1:home-1".into(),
        command_id: "t1:cmd/k-1".into(),
        state: "sent_to_edge".into(),
    };
    assert_eq!(d.handle(status, &mut c, &env), DeviceReply::Ok);
    assert!(command_events(&c).is_empty());
    assert_eq!(d.commands()[0].state, "cancelled");
}

#[test]
fn every_transition_of_a_command_is_logged() {
    let env = device_env();
    let mut d = coffee(&env);
    d.handle(issued("t1:cmd/k-1", "descale"), &mut ctx(T0, DEVICE), &env);
    let mut states = Vec::new();
    for s in ["sent_to_edge", "sent_to_edge", "delivered_to_device"] {
        let mut c = ctx(T0 + 1, DEVICE);
        let status = DeviceMsg::CommandStatus {
            site: "t1:home-1".into(),
            command_id: "t1:cmd/k-1".into(),
            state: s.into(),
        };
        assert_eq!(d.handle(status, &mut c, &env), DeviceReply::Ok);
        states.extend(command_events(&c).into_iter().map(|e| e.state));
    }
    let mut c = ctx(T0 + 2, DEVICE);
    let result = DeviceItem {
        seq: 1,
        ts_ms: T0 + 2,
        kind: ItemKind::CommandResult {
            command_id: "t1:cmd/k-1".into(),
            succeeded: true,
            expired: false,
            cancelled: false,
            detail: "descaled".into(),
        },
    };
    applied(d.handle(DeviceMsg::Apply(vec![result]), &mut c, &env));
    let events = command_events(&c);
    states.extend(events.iter().map(|e| e.state.clone()));
    assert_eq!(states, ["sent_to_edge", "delivered_to_device", "succeeded"]);
    assert_eq!(events[0].detail, "descaled");
    // Cancelling a command that ran is refused.
    let mut c = ctx(T0 + 3, DEVICE);
    let cancel = DeviceMsg::CancelCommand {
        command_id: "t1:cmd/k-1".into(),
        reason: "late".into(),
        key: String::new(),
    };
    assert!(matches!(
        d.handle(cancel, &mut c, &env),
        DeviceReply::Rejected(_)
    ));
}

fn status(state: &str) -> DeviceMsg {
    DeviceMsg::CommandStatus {
        site: "t1:home-1".into(),
        command_id: "t1:cmd/k-1".into(),
        state: state.into(),
    }
}

fn result(seq: u64, succeeded: bool, cancelled: bool, detail: &str) -> DeviceMsg {
    DeviceMsg::Apply(vec![DeviceItem {
        seq,
        ts_ms: T0 + 5,
        kind: ItemKind::CommandResult {
            command_id: "t1:cmd/k-1".into(),
            succeeded,
            expired: false,
            cancelled,
            detail: detail.into(),
        },
    }])
}

fn cancel_k1() -> DeviceMsg {
    DeviceMsg::CancelCommand {
        command_id: "t1:cmd/k-1".into(),
        reason: "not needed".into(),
        key: String::new(),
    }
}

/// The cancels of a step, as mail to the edge.
fn cancels_to_edge(c: &Ctx) -> Vec<String> {
    mail_of(c)
        .into_iter()
        .filter_map(|m| match (m.to, m.body) {
            (Address::Edge(_), Body::CancelCommand { command_id, .. }) => Some(command_id),
            _ => None,
        })
        .collect()
}

#[test]
fn command_states_only_move_forward_and_cancels_follow_them() {
    use super::device::{CancelStep, cancel_step, command_rank};
    let order = ["queued", "sent_to_edge", "delivered_to_device", "succeeded"];
    assert!(
        order
            .windows(2)
            .all(|w| command_rank(w[0]) < command_rank(w[1]))
    );
    for end in ["succeeded", "failed", "expired", "cancelled"] {
        assert_eq!(command_rank(end), 3);
    }
    assert_eq!(cancel_step("queued", false), CancelStep::EndNow);
    assert_eq!(cancel_step("sent_to_edge", false), CancelStep::AskEdge);
    assert_eq!(cancel_step("sent_to_edge", true), CancelStep::Nothing);
    assert_eq!(cancel_step("cancelled", false), CancelStep::Nothing);
    for late in ["delivered_to_device", "succeeded", "failed", "expired"] {
        assert_eq!(cancel_step(late, false), CancelStep::Refuse, "{late}");
        assert_eq!(cancel_step(late, true), CancelStep::Refuse, "{late}");
    }
}

#[test]
fn a_cancel_of_a_command_on_the_edge_asks_the_edge_once_and_ends_with_its_answer() {
    let env = device_env();
    let mut d = coffee(&env);
    d.handle(issued("t1:cmd/k-1", "descale"), &mut ctx(T0, DEVICE), &env);
    d.handle(status("sent_to_edge"), &mut ctx(T0 + 1, DEVICE), &env);
    // Asked of the edge: the command is still on the edge, and the request is logged in
    // that state, so the record shows it is waiting for the edge's answer.
    let mut c = ctx(T0 + 2, DEVICE);
    assert_eq!(d.handle(cancel_k1(), &mut c, &env), DeviceReply::Ok);
    let events = command_events(&c);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].state.as_str(), events[0].detail.as_str()),
        ("sent_to_edge", "cancel requested: not needed")
    );
    assert_eq!(events[0].cancel.as_deref(), Some(""));
    assert_eq!(cancels_to_edge(&c), ["t1:cmd/k-1"]);
    assert_eq!(d.commands()[0].state, "sent_to_edge");
    assert!(d.commands()[0].cancel_requested);
    // Asked again: nothing new goes out.
    let mut c = ctx(T0 + 3, DEVICE);
    assert_eq!(d.handle(cancel_k1(), &mut c, &env), DeviceReply::Ok);
    assert!(c.ops().is_empty() && mail_of(&c).is_empty());
    // A repeated SENT_TO_EDGE changes nothing either.
    let mut c = ctx(T0 + 3, DEVICE);
    assert_eq!(
        d.handle(status("sent_to_edge"), &mut c, &env),
        DeviceReply::Ok
    );
    assert!(command_events(&c).is_empty());
    // The edge answers CANCELLED: the command ends, the customer hears it once.
    let mut c = ctx(T0 + 4, DEVICE);
    applied(d.handle(
        result(1, false, true, "cancelled: not needed"),
        &mut c,
        &env,
    ));
    let events = command_events(&c);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].state.as_str(), events[0].detail.as_str()),
        ("cancelled", "cancelled: not needed")
    );
    assert_eq!(d.commands()[0].state, "cancelled");
    assert!(!d.commands()[0].cancel_requested);
    // Cancelling a cancelled command: unchanged, nothing sent.
    let mut c = ctx(T0 + 5, DEVICE);
    assert_eq!(d.handle(cancel_k1(), &mut c, &env), DeviceReply::Ok);
    assert!(c.ops().is_empty() && mail_of(&c).is_empty());
    // A late status does not revive it.
    let mut c = ctx(T0 + 6, DEVICE);
    d.handle(status("delivered_to_device"), &mut c, &env);
    assert!(command_events(&c).is_empty());
    assert_eq!(d.commands()[0].state, "cancelled");
}

#[test]
fn a_cancel_that_loses_the_race_to_the_device_ends_with_the_devices_outcome() {
    let env = device_env();
    let mut d = coffee(&env);
    d.handle(issued("t1:cmd/k-1", "descale"), &mut ctx(T0, DEVICE), &env);
    d.handle(status("sent_to_edge"), &mut ctx(T0 + 1, DEVICE), &env);
    assert_eq!(
        d.handle(cancel_k1(), &mut ctx(T0 + 2, DEVICE), &env),
        DeviceReply::Ok
    );
    // The device got it before the edge read the cancel.
    let mut c = ctx(T0 + 3, DEVICE);
    d.handle(status("delivered_to_device"), &mut c, &env);
    assert_eq!(command_events(&c)[0].state, "delivered_to_device");
    // Now a cancel is refused, and a SENT_TO_EDGE resent late does not go back.
    let mut c = ctx(T0 + 4, DEVICE);
    assert!(matches!(
        d.handle(cancel_k1(), &mut c, &env),
        DeviceReply::Rejected(_)
    ));
    assert!(c.ops().is_empty());
    let mut c = ctx(T0 + 4, DEVICE);
    d.handle(status("sent_to_edge"), &mut c, &env);
    assert!(command_events(&c).is_empty());
    assert_eq!(d.commands()[0].state, "delivered_to_device");
    let mut c = ctx(T0 + 5, DEVICE);
    applied(d.handle(result(1, true, false, "descaled"), &mut c, &env));
    assert_eq!(command_events(&c)[0].state, "succeeded");
    assert_eq!(d.commands()[0].state, "succeeded");
}

#[test]
fn a_queued_command_cancelled_at_once_is_cancelled_on_the_edge_too_and_stays_cancelled() {
    let env = device_env();
    let mut d = coffee(&env);
    d.handle(issued("t1:cmd/k-1", "descale"), &mut ctx(T0, DEVICE), &env);
    let mut c = ctx(T0 + 1, DEVICE);
    assert_eq!(d.handle(cancel_k1(), &mut c, &env), DeviceReply::Ok);
    assert_eq!(command_events(&c)[0].state, "cancelled");
    // The edge may have stored it while its confirmation was on the way: it is told.
    assert_eq!(cancels_to_edge(&c), ["t1:cmd/k-1"]);
    // Its answer (or a device that ran it anyway) does not change the first ending.
    for (seq, succeeded, cancelled) in [(1, false, true), (2, true, false)] {
        let mut c = ctx(T0 + 2, DEVICE);
        applied(d.handle(result(seq, succeeded, cancelled, ""), &mut c, &env));
        assert!(command_events(&c).is_empty());
        assert!(
            mail_of(&c).is_empty(),
            "the customer heard the outcome once"
        );
    }
    assert_eq!(d.commands()[0].state, "cancelled");
}

#[test]
fn the_device_index_gets_an_entry_whenever_owner_site_or_model_change_only() {
    use super::device::{DEVICE_INDEX_PAGES, device_index_log, device_index_page};
    let env = device_env();
    let mut d = DeviceTwin::create(DEVICE, &env).unwrap();
    let provision = |site: &str| DeviceMsg::Provision {
        customer: CUSTOMER.into(),
        site: site.into(),
        model: "coffee.barista-200".into(),
    };
    let mut c = ctx(T0, DEVICE);
    assert_eq!(
        d.handle(provision("t1:home-1"), &mut c, &env),
        DeviceReply::Ok
    );
    let entries = index_entries(&c);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].site.as_deref(), Some("t1:home-1"));
    assert_eq!(entries[0].customer.as_deref(), Some(CUSTOMER));
    assert!(device_index_page(DEVICE) < DEVICE_INDEX_PAGES);
    assert!(c.ops().iter().any(|op| matches!(op, Op::Append { log, .. }
        if *log == device_index_log("t1", device_index_page(DEVICE)))));
    // The same provisioning again, and readings, append nothing.
    let mut c = ctx(T0, DEVICE);
    d.handle(provision("t1:home-1"), &mut c, &env);
    d.handle(
        DeviceMsg::Apply(vec![reading(1, T0, "brew_pressure", 9.0)]),
        &mut c,
        &env,
    );
    assert!(index_entries(&c).is_empty());
    // A move to another site does; so does the erasure's detach.
    let mut c = ctx(T0, DEVICE);
    d.handle(provision("t1:home-2"), &mut c, &env);
    assert_eq!(index_entries(&c)[0].site.as_deref(), Some("t1:home-2"));
    let mut c = ctx(T0, DEVICE);
    d.handle(
        DeviceMsg::Detach {
            customer: CUSTOMER.into(),
        },
        &mut c,
        &env,
    );
    let e = &index_entries(&c)[0];
    assert_eq!((e.site.as_deref(), e.customer.as_deref()), (None, None));
    assert_eq!(e.model.as_deref(), Some("coffee.barista-200"));
}

fn issued_action(id: &str, action: crate::mail::CommandAction) -> DeviceMsg {
    let DeviceMsg::Issue(mut issued) = issued(id, action.name()) else {
        unreachable!()
    };
    issued.command.action = Some(action);
    DeviceMsg::Issue(issued)
}

#[test]
fn a_configuration_command_sets_the_desired_state_all_or_nothing_and_succeeds_when_reported() {
    use crate::mail::CommandAction;
    let env = device_env();
    let mut d = coffee(&env);
    let configure = |fields: &[(&str, &str, u64)]| CommandAction::Configure {
        fields: fields
            .iter()
            .map(|(f, v, n)| ((*f).to_owned(), (*v).to_owned(), *n))
            .collect(),
    };
    // A version that is not the next one refuses the whole command: nothing changes.
    let mut c = ctx(T0, DEVICE);
    let bad = configure(&[("brew_temp", "94", 0), ("grind", "fine", 7)]);
    assert!(matches!(
        d.handle(issued_action("t1:cmd/k-0", bad), &mut c, &env),
        DeviceReply::Rejected(why) if why.contains("is at version 0")
    ));
    assert!(d.desired().is_empty() && c.ops().is_empty() && mail_of(&c).is_empty());
    // Accepted: both fields desired in one step, the desired state goes to the edge (no
    // command does), and the command is logged queued with what it sets.
    let mut c = ctx(T0, DEVICE);
    let good = configure(&[("brew_temp", "94", 0), ("grind", "fine", 1)]);
    assert_eq!(
        d.handle(issued_action("t1:cmd/k-1", good), &mut c, &env),
        DeviceReply::Ok
    );
    assert_eq!(d.desired()["brew_temp"].version, 1);
    assert_eq!(d.desired()["grind"].value, "fine");
    let mail = mail_of(&c);
    assert!(
        mail.iter()
            .any(|m| matches!(&m.body, Body::DesiredState { fields, .. } if fields.len() == 2))
    );
    assert!(!mail.iter().any(|m| matches!(m.body, Body::Command(_))));
    let events = command_events(&c);
    assert_eq!(events.len(), 1);
    let info = events[0].info.as_ref().unwrap();
    assert_eq!(
        info.action,
        Some(configure(&[("brew_temp", "94", 1), ("grind", "fine", 1)]))
    );
    // One field reported: still waiting; both: succeeded, once.
    let report = |seq, f: &str, v: &str| DeviceItem {
        seq,
        ts_ms: T0,
        kind: ItemKind::Reported {
            fields: vec![(f.into(), v.into())],
        },
    };
    let mut c = ctx(T0 + 1, DEVICE);
    applied(d.handle(
        DeviceMsg::Apply(vec![report(1, "brew_temp", "94")]),
        &mut c,
        &env,
    ));
    assert!(command_events(&c).is_empty());
    let mut c = ctx(T0 + 2, DEVICE);
    applied(d.handle(
        DeviceMsg::Apply(vec![report(2, "grind", "fine"), report(3, "grind", "fine")]),
        &mut c,
        &env,
    ));
    let events = command_events(&c);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].state, "succeeded");
    assert_eq!(d.commands()[0].state, "succeeded");
}

#[test]
fn firmware_and_answers_go_to_the_edge_as_commands_and_an_unknown_question_is_refused() {
    use crate::mail::CommandAction;
    let env = device_env();
    let mut d = coffee(&env);
    let firmware = CommandAction::Firmware {
        version: "2.1.0".into(),
        url: "https://fw.example/2.1.0.bin".into(),
        sha256: "a".repeat(64),
        size_bytes: 1 << 20,
    };
    let mut c = ctx(T0, DEVICE);
    assert_eq!(
        d.handle(issued_action("t1:cmd/k-1", firmware.clone()), &mut c, &env),
        DeviceReply::Ok
    );
    let sent: Vec<_> = mail_of(&c)
        .into_iter()
        .filter_map(|m| match m.body {
            Body::Command(cmd) => Some(cmd),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].name.as_str(), sent[0].action.as_ref()),
        ("firmware_update", Some(&firmware))
    );
    let answer = CommandAction::Answer {
        question_id: "no-such-question".into(),
        option_id: "yes".into(),
    };
    let mut c = ctx(T0, DEVICE);
    assert!(matches!(
        d.handle(issued_action("t1:cmd/k-2", answer), &mut c, &env),
        DeviceReply::Rejected(_)
    ));
    assert!(c.ops().is_empty() && mail_of(&c).is_empty());
}
