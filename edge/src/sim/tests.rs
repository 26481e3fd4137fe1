use super::*;
use caretwin_actors::model::{DAY_MS, HOUR_MS};
use std::collections::HashSet;
use std::sync::OnceLock;

const T0: u64 = 1_795_392_000_000;

fn catalogue() -> &'static Catalogue {
    static CATALOGUE: OnceLock<Catalogue> = OnceLock::new();
    CATALOGUE.get_or_init(Catalogue::builtin)
}

fn sim(toml: &str) -> Simulator {
    let config = SimConfig::from_toml(toml).unwrap();
    Simulator::new(catalogue(), &config, T0).unwrap()
}

fn refused(toml: &str) -> SimError {
    let config = SimConfig::from_toml(toml).unwrap();
    Simulator::new(catalogue(), &config, T0).unwrap_err()
}

/// `(ts_ms, value)` of one signal's readings.
fn readings(out: &[SimOutput], device: &str, signal: &str) -> Vec<(u64, f64)> {
    out.iter()
        .filter(|o| o.device == device)
        .filter_map(|o| match &o.kind {
            ItemKind::Reading { signal: s, value } if s == signal => Some((o.ts_ms, *value)),
            _ => None,
        })
        .collect()
}

fn normal(model: &str, signal: &str) -> caretwin_actors::catalogue::NormalRange {
    catalogue()
        .model(model)
        .unwrap()
        .signal(signal)
        .unwrap()
        .normal
        .unwrap()
}

const COFFEE_SCALING: &str = r#"
[[devices]]
id = "coffee"
model = "coffee.barista-200"
reading_interval = "1h"
profile = [
  { degrading = { signal = "brew_pressure", rate_per_hour = -0.02 } },
  { degrading = { signal = "heating_time", rate_per_hour = 0.3 } },
]
"#;

#[test]
fn coffee_brew_pressure_crosses_its_threshold_when_the_drift_says() {
    let mut s = sim(COFFEE_SCALING);
    let out = s.advance(T0 + 120 * HOUR_MS);
    let pressure = readings(&out, "coffee", "brew_pressure");
    assert_eq!(
        pressure.len(),
        121,
        "one reading an hour, the first at the start"
    );
    // From the centre of 8.5..10 bar to the 7.5 bar threshold at 0.02 bar/h: 87.5 h.
    let expected = (9.25 - 7.5) / 0.02;
    let first = pressure.iter().find(|(_, v)| *v <= 7.5).unwrap();
    let hours = (first.0 - T0) as f64 / HOUR_MS as f64;
    assert!(
        (hours - expected).abs() <= 0.05 * expected,
        "crossed at {hours} h, expected {expected} h ± 5 %"
    );
    // The noise is bounded, so well past the expected time every reading is below it.
    assert!(
        pressure
            .iter()
            .filter(|(t, _)| *t >= T0 + 95 * HOUR_MS)
            .all(|(_, v)| *v < 7.5)
    );
    // Falling, not jumping: hour to hour it moves by the drift plus noise only.
    for w in pressure.windows(2) {
        assert!((w[1].1 - w[0].1).abs() < 0.3, "{w:?}");
    }
}

#[test]
fn descale_restores_brew_pressure_and_heating_time() {
    let mut s = sim(COFFEE_SCALING);
    let out = s.advance(T0 + 100 * HOUR_MS);
    let last = |sig| readings(&out, "coffee", sig).last().unwrap().1;
    assert!(last("brew_pressure") < 7.5);
    assert!(last("heating_time") > 45.0);

    let result = s
        .command("coffee", "cmd-1", "descale", T0 + 100 * HOUR_MS + 1)
        .unwrap();
    let ItemKind::CommandResult {
        command_id,
        succeeded,
        detail,
        ..
    } = &result.kind
    else {
        panic!("{result:?}")
    };
    assert_eq!(command_id, "cmd-1");
    assert!(succeeded, "{detail}");
    assert!(detail.contains("brew_pressure"), "{detail}");

    let out = s.advance(T0 + 110 * HOUR_MS);
    for signal in ["brew_pressure", "heating_time"] {
        let after = readings(&out, "coffee", signal);
        assert_eq!(after.len(), 10);
        let range = normal("coffee.barista-200", signal);
        assert!(
            after.iter().all(|(_, v)| range.contains(*v)),
            "{signal} after descaling: {after:?}"
        );
    }
    // Scale builds up again from there, at the same rate.
    let out = s.advance(T0 + 200 * HOUR_MS);
    assert!(readings(&out, "coffee", "brew_pressure").last().unwrap().1 < 8.0);
}

#[test]
fn counters_only_grow_and_consumption_sets_their_rate() {
    let mut s = sim(r#"
        [[devices]]
        id = "coffee"
        model = "coffee.barista-200"
        reading_interval = "10s"
        profile = [
          { consumption = { signal = "water_through", rate_per_hour = 0.5 } },
          { consumption = { signal = "cups_brewed", rate_per_hour = 4.0 } },
        ]
    "#);
    let mut out = Vec::new();
    for minute in 0..=600 {
        out.extend(s.advance(T0 + minute * 60_000));
    }
    for (signal, per_hour) in [("water_through", 0.5), ("cups_brewed", 4.0)] {
        let values = readings(&out, "coffee", signal);
        assert_eq!(values.len(), 3601);
        assert!(values.windows(2).all(|w| w[1].1 >= w[0].1), "{signal} fell");
        let used = values.last().unwrap().1 - values[0].1;
        let expected = per_hour * 10.0;
        assert!(
            (used - expected).abs() < 0.2 * expected,
            "{signal}: {used} in 10 h, expected about {expected}"
        );
    }
    let cups = readings(&out, "coffee", "cups_brewed");
    assert!(cups.iter().all(|(_, v)| v.fract() == 0.0), "cups are whole");
}

#[test]
fn fails_at_steps_past_the_threshold_and_reports_its_code() {
    let mut s = sim(r#"
        [[devices]]
        id = "boiler"
        model = "boiler.combi-30"
        reading_interval = "1h"
        profile = { fails_at = { at = "36h", signal = "system_pressure", code = "F22" } }
    "#);
    let out = s.advance(T0 + 48 * HOUR_MS);
    let range = normal("boiler.combi-30", "system_pressure");
    for (t, v) in readings(&out, "boiler", "system_pressure") {
        if t < T0 + 36 * HOUR_MS {
            assert!(range.contains(v), "healthy before: {v} at {t}");
        } else {
            assert!(v <= 0.5, "failed from 36 h: {v} at {t}");
        }
    }
    let codes: Vec<_> = out
        .iter()
        .filter(|o| matches!(&o.kind, ItemKind::Diagnostic { code } if code == "F22"))
        .map(|o| o.ts_ms)
        .collect();
    assert_eq!(codes, [T0 + 36 * HOUR_MS]);

    // A hard fault survives a restart (reset, for a boiler).
    let r = s
        .command("boiler", "c1", "reset", T0 + 48 * HOUR_MS)
        .unwrap();
    assert!(
        matches!(&r.kind, ItemKind::CommandResult { succeeded: true, detail, .. }
        if detail.contains("system_pressure persists"))
    );
    let out = s.advance(T0 + 50 * HOUR_MS);
    assert!(
        readings(&out, "boiler", "system_pressure")
            .iter()
            .all(|(_, v)| *v <= 0.5)
    );
}

#[test]
fn restart_clears_a_transient_fault() {
    let mut s = sim(r#"
        [[devices]]
        id = "coffee"
        model = "coffee.barista-200"
        reading_interval = "1m"
        profile = { fails_at = { at = "1h", signal = "boiler_temperature", transient = true, code = "E03" } }
    "#);
    let out = s.advance(T0 + 2 * HOUR_MS);
    assert!(
        readings(&out, "coffee", "boiler_temperature")
            .last()
            .unwrap()
            .1
            >= 105.0
    );
    let failed_test = s
        .command("coffee", "c0", "descale", T0 + 2 * HOUR_MS)
        .unwrap();
    assert!(matches!(
        failed_test.kind,
        ItemKind::CommandResult {
            succeeded: true,
            ..
        }
    ));
    let r = s
        .command("coffee", "c1", "restart", T0 + 2 * HOUR_MS)
        .unwrap();
    assert!(
        matches!(&r.kind, ItemKind::CommandResult { succeeded: true, detail, .. }
            if detail.contains("cleared the fault on boiler_temperature")),
        "{r:?}"
    );
    let out = s.advance(T0 + 3 * HOUR_MS);
    let range = normal("coffee.barista-200", "boiler_temperature");
    let after = readings(&out, "coffee", "boiler_temperature");
    assert_eq!(after.len(), 60);
    assert!(after.iter().all(|(_, v)| range.contains(*v)), "{after:?}");
}

#[test]
fn smoke_event_raises_an_alarm_at_its_time_and_the_siren_reports_back() {
    let mut s = sim(r#"
        [[devices]]
        id = "hub"
        model = "hub.guardian-1"
        reading_interval = "30s"

        [[events]]
        device = "hub"
        at = "2h"
        event = "smoke"

        [[events]]
        device = "hub"
        at = "3h"
        event = "alarm:leak"
    "#);
    let before = s.advance(T0 + 2 * HOUR_MS - 1);
    assert!(
        !before
            .iter()
            .any(|o| matches!(o.kind, ItemKind::Alarm { .. }))
    );
    let out = s.advance(T0 + 2 * HOUR_MS);
    let alarms: Vec<_> = out
        .iter()
        .filter(|o| matches!(o.kind, ItemKind::Alarm { .. }))
        .collect();
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0].ts_ms, T0 + 2 * HOUR_MS);
    assert_eq!(
        alarms[0].kind,
        ItemKind::Alarm {
            kind: "smoke".into(),
            local_action: None
        }
    );

    // The edge sounds the siren; the hub says so, and reports its new state.
    let r = s
        .command("hub", "local-1", "siren_on", T0 + 2 * HOUR_MS + 5)
        .unwrap();
    assert!(matches!(
        r.kind,
        ItemKind::CommandResult {
            succeeded: true,
            ..
        }
    ));
    let out = s.advance(T0 + 4 * HOUR_MS);
    assert!(out.iter().any(|o| o.ts_ms == T0 + 2 * HOUR_MS + 5
        && o.kind
            == ItemKind::Reported {
                fields: vec![("siren".into(), "on".into())]
            }));
    assert!(out.iter().any(|o| o.ts_ms == T0 + 3 * HOUR_MS
        && matches!(&o.kind, ItemKind::Alarm { kind, .. } if kind == "leak")));
    assert!(
        out.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms),
        "time order"
    );
}

#[test]
fn fridge_asks_its_question_and_seal_check_reflects_the_seal() {
    let config = r#"
        [[devices]]
        id = "fridge-ok"
        model = "fridge.coolline-350"
        reading_interval = "5m"

        [[devices]]
        id = "fridge-leaky"
        model = "fridge.coolline-350"
        reading_interval = "5m"
        profile = [
          { degrading = { signal = "cabinet_temperature", rate_per_hour = 0.1, after = "6h" } },
          { command_fails = { command = "seal_check" } },
        ]

        [[events]]
        device = "fridge-leaky"
        at = "20h"
        event = "question:door-seal-check"
    "#;
    let mut s = sim(config);
    let out = s.advance(T0 + DAY_MS);
    let questions: Vec<_> = out
        .iter()
        .filter_map(|o| match &o.kind {
            ItemKind::Question { question_id } => Some((o.device.as_str(), o.ts_ms, question_id)),
            _ => None,
        })
        .collect();
    assert_eq!(
        questions,
        [(
            "fridge-leaky",
            T0 + 20 * HOUR_MS,
            &"door-seal-check".to_string()
        )]
    );
    let cabinet = readings(&out, "fridge-leaky", "cabinet_temperature");
    assert!(cabinet.last().unwrap().1 > 5.0, "warming since 6 h");

    let check = |s: &mut Simulator, device| match s
        .command(device, "seal-1", "seal_check", T0 + DAY_MS)
        .unwrap()
        .kind
    {
        ItemKind::CommandResult { succeeded, .. } => succeeded,
        other => panic!("{other:?}"),
    };
    assert!(check(&mut s, "fridge-ok"));
    assert!(!check(&mut s, "fridge-leaky"));
}

#[test]
fn unknown_commands_fail_with_a_reason_and_repeats_act_once() {
    let mut s = sim(r#"
        [[devices]]
        id = "coffee"
        model = "coffee.barista-200"
    "#);
    assert_eq!(s.command("nobody", "c1", "restart", T0), None);
    let r = s
        .command("coffee", "c1", "repressurise_prompt", T0)
        .unwrap();
    let ItemKind::CommandResult {
        succeeded, detail, ..
    } = r.kind
    else {
        panic!()
    };
    assert!(!succeeded);
    assert!(
        detail.contains("unknown command \"repressurise_prompt\""),
        "{detail}"
    );

    let first = s
        .command("coffee", "fw-1", "firmware_update", T0 + 10)
        .unwrap();
    let again = s
        .command("coffee", "fw-1", "firmware_update", T0 + 20)
        .unwrap();
    assert_eq!(
        first.kind, again.kind,
        "a redelivered command gets the same result"
    );
    let out = s.advance(T0 + HOUR_MS);
    let versions: Vec<_> = out
        .iter()
        .filter_map(|o| match &o.kind {
            ItemKind::Reported { fields } => fields
                .iter()
                .find(|(f, _)| f == "firmware")
                .map(|(_, v)| v.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(versions, ["1.0.0", "1.0.1"], "updated once");
}

#[test]
fn healthy_devices_of_every_model_stay_in_their_normal_ranges() {
    let mut config = SimConfig::default();
    for model in catalogue().models() {
        config.devices.push(DeviceSpec {
            id: model.id().to_owned(),
            model: model.id().to_owned(),
            profile: Profiles::default(),
            reading_interval: "10m".into(),
            seed: None,
            noise: 1.0,
        });
    }
    let mut s = Simulator::new(catalogue(), &config, T0).unwrap();
    let out = s.advance(T0 + 7 * DAY_MS);
    let mut seen = 0;
    for o in &out {
        if let ItemKind::Reading { signal, value } = &o.kind {
            let def = catalogue()
                .model(&o.device)
                .unwrap()
                .signal(signal)
                .unwrap();
            assert!(value.is_finite());
            if let Some(range) = def.normal {
                assert!(range.contains(*value), "{} {signal} = {value}", o.device);
            }
            seen += 1;
        }
    }
    let signals: usize = catalogue().models().iter().map(|m| m.signals().len()).sum();
    assert_eq!(seen, signals * (7 * 144 + 1));
}

#[test]
fn a_fleet_makes_n_devices_of_valid_models_with_unique_ids() {
    let s = sim(r#"
        seed = 9
        [[fleets]]
        prefix = "store-42"
        count = 200
        models = ["retail.freezer-rf700", "retail.hvac-rt12", "coffee.barista-200"]
        weights = [6, 1, 3]
        reading_interval = "1s"

        [[devices]]
        id = "store-42-alarm-hub"
        model = "hub.guardian-1"
    "#);
    assert_eq!(s.len(), 201);
    let ids: HashSet<&str> = s.devices().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 201, "unique ids");
    let count = |model| s.devices().filter(|(_, m)| *m == model).count();
    assert_eq!(count("retail.freezer-rf700"), 120);
    assert_eq!(count("retail.hvac-rt12"), 20);
    assert_eq!(count("coffee.barista-200"), 60);
    assert!(s.devices().all(|(_, m)| catalogue().model(m).is_some()));
    assert!(ids.contains("store-42-retail.freezer-rf700-001"));
    assert!(ids.contains("store-42-coffee.barista-200-060"));

    // Uneven weights still add up.
    let s = sim(r#"
        [[fleets]]
        prefix = "p"
        count = 7
        models = ["retail.freezer-rf700", "retail.hvac-rt12", "coffee.barista-200"]
    "#);
    assert_eq!(s.len(), 7);
    assert_eq!(
        s.devices()
            .filter(|(_, m)| *m == "retail.freezer-rf700")
            .count(),
        3
    );
}

#[test]
fn bad_configurations_name_the_device_and_field() {
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.nope""#,
            Some("x"),
            "model",
            "unknown model \"coffee.nope\"",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.barista-200"
               profile = { degrading = { signal = "brew_presure", rate_per_hour = -0.02 } }"#,
            Some("x"),
            "profile[0].signal",
            "no signal \"brew_presure\"",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.barista-200"
               profile = { degrading = { signal = "brew_pressure", rate_per_hour = 0.02 } }"#,
            Some("x"),
            "profile[0].rate_per_hour",
            "away from its failure threshold",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.barista-200"
               profile = { degrading = { signal = "cups_brewed", rate_per_hour = 1.0 } }"#,
            Some("x"),
            "profile[0].signal",
            "cumulative counter",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "boiler.combi-30"
               profile = { fails_at = { at = "2h", signal = "return_temperature" } }"#,
            Some("x"),
            "profile[0].signal",
            "no failure threshold",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "boiler.combi-30"
               profile = ["healthy", { fails_at = { at = "2 h", signal = "system_pressure" } }]"#,
            Some("x"),
            "profile[1].at",
            "\"2 h\"",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.barista-200"
               profile = { command_fails = { command = "seal_check" } }"#,
            Some("x"),
            "profile[0].command",
            "no command \"seal_check\"",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.barista-200"
               reading_interval = "0s""#,
            Some("x"),
            "reading_interval",
            "positive",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.barista-200"
               [[devices]]
               id = "x"
               model = "hub.guardian-1""#,
            Some("x"),
            "id",
            "another device",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "coffee.barista-200"
               [[events]]
               device = "x"
               at = "1h"
               event = "smoke""#,
            Some("x"),
            "events[0].event",
            "unknown event \"smoke\"",
        ),
        (
            r#"[[devices]]
               id = "x"
               model = "fridge.coolline-350"
               [[events]]
               device = "x"
               at = "1h"
               event = "question:door-open""#,
            Some("x"),
            "events[0].event",
            "no question \"door-open\"",
        ),
        (
            r#"[[events]]
               device = "ghost"
               at = "1h"
               event = "smoke""#,
            Some("ghost"),
            "events[0].device",
            "no such device",
        ),
        (
            r#"[[fleets]]
               prefix = "s"
               count = 3
               models = ["retail.freezer-rf700", "retail.fridge"]"#,
            None,
            "fleets[0].models[1]",
            "unknown model \"retail.fridge\"",
        ),
        (
            r#"[[fleets]]
               prefix = "s"
               count = 3
               models = ["retail.freezer-rf700"]
               weights = [1, 2]"#,
            None,
            "fleets[0].weights",
            "2 entries for 1 models",
        ),
    ];
    for (toml, device, field, message) in cases {
        let e = refused(toml);
        assert_eq!(e.device.as_deref(), *device, "{e}");
        assert_eq!(e.field, *field, "{e}");
        assert!(e.message.contains(message), "{e}");
        assert!(e.to_string().contains(field), "{e}");
    }
    // The shape is checked when the TOML is read.
    let e = SimConfig::from_toml(
        r#"[[devices]]
           id = "x"
           model = "coffee.barista-200"
           profile = { degrading = { signal = "brew_pressure", rate = -0.02 } }"#,
    )
    .unwrap_err();
    assert!(e.message.contains("unknown field `rate`"), "{e}");
    assert_eq!(e.field, "line 4", "{e}");
}

fn run(config: &SimConfig, steps: &[u64]) -> Vec<SimOutput> {
    let mut s = Simulator::new(catalogue(), config, T0).unwrap();
    let mut out = Vec::new();
    for &t in steps {
        out.extend(s.advance(t));
        if t == T0 + 30 * HOUR_MS {
            out.extend(s.command("coffee", "c1", "descale", t));
        }
    }
    out
}

#[test]
fn same_config_seed_and_calls_give_the_same_outputs() {
    let text = format!(
        "{COFFEE_SCALING}\n{}",
        r#"
        [[fleets]]
        prefix = "shop"
        count = 5
        models = ["retail.freezer-rf700", "retail.hvac-rt12"]
        reading_interval = "10m"
        [[events]]
        device = "shop-retail.hvac-rt12-001"
        at = "90m"
        event = "code:LP"
    "#
    );
    let config = SimConfig::from_toml(&text).unwrap();
    let hourly: Vec<u64> = (0..=48).map(|h| T0 + h * HOUR_MS).collect();
    let a = run(&config, &hourly);
    assert!(a == run(&config, &hourly), "same calls, same outputs");
    assert!(a.len() > 1000);
    assert!(
        a.iter()
            .any(|o| matches!(&o.kind, ItemKind::Diagnostic { code } if code == "LP"))
    );

    // Advancing in other steps changes nothing but how the outputs are split.
    let mut steps: Vec<u64> = (0..=48 * 7).map(|k| T0 + k * HOUR_MS / 7).collect();
    steps.push(T0 + 30 * HOUR_MS);
    steps.sort();
    steps.dedup();
    let mut b = run(&config, &steps);
    let mut a_sorted = a.clone();
    let key = |o: &SimOutput| (o.ts_ms, o.device.clone(), format!("{:?}", o.kind));
    a_sorted.sort_by_key(key);
    b.sort_by_key(key);
    assert_eq!(a_sorted.len(), b.len());
    assert!(
        a_sorted == b,
        "advancing in other steps changed the outputs"
    );

    // Another seed, other noise.
    let mut other = config.clone();
    other.seed = 2;
    assert_ne!(a, run(&other, &hourly));
}

#[test]
fn the_documented_example_builds() {
    let doc = include_str!("config.rs");
    let example: String = doc
        .lines()
        .skip_while(|l| !l.starts_with("//! ```toml"))
        .skip(1)
        .take_while(|l| !l.starts_with("//! ```"))
        .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
        .collect::<Vec<_>>()
        .join("\n");
    let config = SimConfig::from_toml(&example).unwrap();
    let s = Simulator::new(catalogue(), &config, T0).unwrap();
    assert_eq!(s.len(), 203);
    // And it round-trips through TOML, a device without a profile too.
    let mut config = config;
    config.devices[2].profile = Profiles::default();
    let again = SimConfig::from_toml(&toml::to_string(&config).unwrap()).unwrap();
    assert_eq!(again, config);
}
