//! The shipped catalogue, the lookups, and one test per validation rule.

use super::*;
use crate::model::{ConsentScope, DAY_MS, Direction, HOUR_MS, InsightKind, Priority};

// ---------------------------------------------------------------- the shipped catalogue

fn builtin_model<'c>(catalogue: &'c Catalogue, id: &str) -> &'c DeviceModel {
    catalogue
        .model(id)
        .unwrap_or_else(|| panic!("builtin catalogue lacks {id}"))
}

#[test]
fn builtin_catalogue_is_valid() {
    if let Err(e) = Catalogue::from_sources(Catalogue::builtin_sources()) {
        panic!("{e}");
    }
    let catalogue = Catalogue::builtin();
    assert_eq!(catalogue.len(), Catalogue::builtin_sources().len());
    for id in [
        "coffee.barista-200",
        "boiler.combi-30",
        "fridge.coolline-350",
        "hub.guardian-1",
        "turbofan.cmapss-fd001",
        "retail.freezer-rf700",
        "retail.hvac-rt12",
    ] {
        builtin_model(&catalogue, id);
    }
}

#[test]
fn every_builtin_playbook_can_reach_a_person() {
    let catalogue = Catalogue::builtin();
    for model in catalogue.models() {
        for mode in model.failure_modes() {
            assert!(
                mode.playbook
                    .iter()
                    .any(|s| matches!(s.action, Action::Handoff { .. })),
                "{} {}",
                model.id(),
                mode.id
            );
        }
    }
}

#[test]
fn coffee_machine_descales_and_reorders_descaler() {
    let catalogue = Catalogue::builtin();
    let coffee = builtin_model(&catalogue, "coffee.barista-200");

    let pressure = coffee.signal_index("brew_pressure").unwrap();
    let failure = coffee.signals()[pressure].failure.unwrap();
    assert_eq!(failure.direction, Direction::Falling);
    assert!(failure.crossed(7.0) && !failure.crossed(9.0));
    let heating = coffee.signal("heating_time").unwrap();
    assert_eq!(heating.failure.unwrap().direction, Direction::Rising);

    // Drift in brew pressure points to scale, whose first remedy is a remote descale.
    let scale = coffee
        .mode_for_insight(pressure, InsightKind::Drift)
        .unwrap();
    assert_eq!(scale.id, "scale");
    assert!(matches!(
        &scale.playbook[0],
        Step { when: Condition::Always, action: Action::RemoteCommand { command, wait_ms, .. } }
            if command == "descale" && *wait_ms == 6 * HOUR_MS
    ));
    assert!(scale.playbook.iter().any(|s| matches!(
        &s.action,
        Action::OrderConsumable { consumable, .. } if consumable == "descaler"
    ) && s.when == Condition::Always));

    let descaler = coffee.consumable("descaler").unwrap();
    assert_eq!(descaler.gauge, Gauge::Usage);
    assert!(descaler.auto_order);
    assert_eq!(descaler.signal, "water_through");
    assert!(coffee.signals()[descaler.signal_index].cumulative);
    assert_eq!(
        coffee.signals()[descaler.signal_index].scope,
        ConsentScope::UsageAnalytics
    );
    assert!((descaler.reorder_level() - 12.0).abs() < 1e-9);
    assert!(coffee.part(&descaler.part).is_some());
    // One counter feeds both the descaler and the water filter.
    assert_eq!(coffee.consumables_gauged_by(descaler.signal_index).len(), 2);
    assert!(coffee.consumables_gauged_by(pressure).is_empty());

    let pump = coffee.mode_for_code("E07").unwrap();
    assert_eq!(pump.id, "pump-wear");
    assert_eq!(pump.parts, ["PUMP-12"]);
    let actions: Vec<_> = pump.playbook.iter().map(|s| s.action.name()).collect();
    assert_eq!(
        actions,
        [
            "order_part",
            "book_technician",
            "notify_customer",
            "handoff"
        ]
    );
    let part = coffee.part("PUMP-12").unwrap();
    assert_eq!(part.lead_time_ms, 5 * DAY_MS);
    assert_eq!(
        part.price,
        Some(Price {
            minor_units: 8900,
            currency: "EUR".into()
        })
    );
}

#[test]
fn boiler_has_falling_pressure_and_error_codes() {
    let catalogue = Catalogue::builtin();
    let boiler = builtin_model(&catalogue, "boiler.combi-30");

    let pressure = boiler.signal("system_pressure").unwrap();
    let failure = pressure.failure.unwrap();
    assert_eq!(failure.direction, Direction::Falling);
    assert!(failure.threshold < pressure.normal.unwrap().min);

    assert_eq!(boiler.mode_for_code("F28").unwrap().id, "ignition-failure");
    assert_eq!(boiler.mode_for_code("F29").unwrap().id, "ignition-failure");
    assert_eq!(boiler.diagnostic_code("F29").unwrap().confidence, 0.8);
    assert!(boiler.mode_for_code("F99").is_none());

    // Story 2: part ordered, technician after the part arrives, one-tap confirmation.
    let index = boiler.signal_index("system_pressure").unwrap();
    let leak = boiler
        .mode_for_insight(index, InsightKind::Forecast)
        .unwrap();
    assert_eq!(leak.id, "pressure-loss");
    assert_eq!(leak.skill.as_deref(), Some("gas-safe"));
    let order = leak
        .playbook
        .iter()
        .position(|s| matches!(s.action, Action::OrderPart { .. }))
        .unwrap();
    let book = leak
        .playbook
        .iter()
        .position(|s| {
            matches!(
                &s.action,
                Action::BookTechnician { skill, after_part_arrives: true, .. } if skill == "gas-safe"
            )
        })
        .unwrap();
    assert!(order < book);
    // The booking itself asks for the one-tap confirmation; no answer goes to a person.
    assert!(
        leak.playbook[book..]
            .iter()
            .any(|s| matches!(s.action, Action::Handoff { .. }))
    );

    let co = boiler.mode_for_alarm("co").unwrap();
    assert!(co.is_safety());
    assert_eq!(boiler.alarm("co").unwrap().local_actions, ["lockout"]);
}

#[test]
fn fridge_relays_its_door_seal_question() {
    let catalogue = Catalogue::builtin();
    let fridge = builtin_model(&catalogue, "fridge.coolline-350");

    let question = fridge.question("door-seal-check").unwrap();
    let mode = fridge.mode_for_question("door-seal-check").unwrap();
    assert_eq!(mode.id, "door-seal");
    match &mode.playbook[0].action {
        Action::AskCustomer {
            question_id,
            text,
            options,
            ..
        } => {
            assert_eq!(question_id.as_deref(), Some("door-seal-check"));
            assert_eq!(text, &question.text);
            assert_eq!(options, &question.options);
        }
        other => panic!("first step is {other:?}"),
    }
    assert!(
        mode.playbook
            .iter()
            .any(|s| s.when == Condition::NoAnswer && matches!(s.action, Action::Handoff { .. }))
    );

    let doors = fridge.signal("door_openings").unwrap();
    assert_eq!(doors.scope, ConsentScope::UsageAnalytics);
    assert!(doors.cumulative);
    let duty = fridge.signal_index("compressor_duty").unwrap();
    assert_eq!(
        fridge.signals()[duty].failure.unwrap().direction,
        Direction::Rising
    );
    assert_eq!(
        fridge
            .mode_for_insight(duty, InsightKind::Drift)
            .unwrap()
            .id,
        "compressor-wear"
    );
    // Cabinet drift is the seal, a cabinet past its threshold is a cooling failure.
    let cabinet = fridge.signal_index("cabinet_temperature").unwrap();
    assert_eq!(
        fridge
            .mode_for_insight(cabinet, InsightKind::Drift)
            .unwrap()
            .id,
        "door-seal"
    );
    assert_eq!(
        fridge
            .mode_for_insight(cabinet, InsightKind::FailureNow)
            .unwrap()
            .id,
        "cooling-failure"
    );
}

#[test]
fn alarm_hub_alarms_are_safety_with_local_actions() {
    let catalogue = Catalogue::builtin();
    let hub = builtin_model(&catalogue, "hub.guardian-1");
    for kind in ["smoke", "co", "leak", "break_in", "freeze"] {
        let mode = hub.mode_for_alarm(kind).unwrap();
        assert!(mode.is_safety(), "{kind}");
        assert!(!hub.alarm(kind).unwrap().local_actions.is_empty(), "{kind}");
        assert!(mode.playbook.iter().any(|s| s.when == Condition::Always
            && matches!(
                s.action,
                Action::NotifyCustomer {
                    priority: Priority::Safety,
                    ..
                }
            )));
    }
    assert_eq!(hub.alarm("smoke").unwrap().local_actions, ["siren_on"]);
    assert!(
        hub.alarm("leak")
            .unwrap()
            .local_actions
            .contains(&"close_valve".to_string())
    );
    for alarm in hub.alarms() {
        for action in &alarm.local_actions {
            assert!(hub.has_command(action));
        }
    }
    let battery = hub.consumable("sensor_batteries").unwrap();
    assert_eq!(battery.gauge, Gauge::Level);
    assert_eq!(battery.reorder_level(), 20.0);
    assert!(!hub.signals()[battery.signal_index].cumulative);
}

#[test]
fn turbofan_fits_cmapss_fd001() {
    let catalogue = Catalogue::builtin();
    let engine = builtin_model(&catalogue, "turbofan.cmapss-fd001");
    let names: Vec<&str> = engine.signals().iter().map(|s| s.name.as_str()).collect();
    let mut expected = vec!["setting1".to_string(), "setting2".into(), "setting3".into()];
    expected.extend((1..=21).map(|i| format!("s{i}")));
    assert_eq!(names, expected);
    // Healthy first-cycle readings of engine 1 in train_FD001 lie in the normal ranges.
    let engine1 = [
        -0.0007, -0.0004, 100.0, 518.67, 641.82, 1589.7, 1400.6, 14.62, 21.61, 554.36, 2388.06,
        9046.19, 1.3, 47.47, 521.66, 2388.02, 8138.62, 8.4195, 0.03, 392.0, 2388.0, 100.0, 39.06,
        23.419,
    ];
    for (signal, value) in engine.signals().iter().zip(engine1) {
        assert!(signal.normal.unwrap().contains(value), "{}", signal.name);
    }

    let rul = engine.rul().unwrap();
    assert_eq!(rul.unit, "cycles");
    assert_eq!(rul.maintenance_at, 30.0);
    assert_eq!(rul.inputs.len(), 14);
    // The shipped entry carries the parameters fitted on train_FD001, and they load.
    let params = rul.params.clone().expect("fitted RUL parameters shipped");
    let model: crate::rul::RulModel = params.try_into().expect("parameters load");
    assert!(model.trees() > 0);
    for (name, &index) in rul.inputs.iter().zip(&rul.input_indices) {
        assert_eq!(&engine.signals()[index].name, name);
    }
    let mode = engine.mode_for_rul().unwrap();
    assert_eq!(mode.id, "hpc-degradation");
    let actions: Vec<_> = mode.playbook.iter().map(|s| s.action.name()).collect();
    assert_eq!(actions, ["book_technician", "order_part", "handoff"]);
    assert!(matches!(
        &mode.playbook[0].action,
        Action::BookTechnician { skill, .. } if skill == "turbofan-mro"
    ));
}

#[test]
fn retail_products_are_shipped() {
    let catalogue = Catalogue::builtin();
    let freezer = builtin_model(&catalogue, "retail.freezer-rf700");
    assert_eq!(freezer.category(), "commercial_freezer");
    let hvac = builtin_model(&catalogue, "retail.hvac-rt12");
    assert_eq!(hvac.consumable("air_filter").unwrap().gauge, Gauge::Usage);
    assert_eq!(hvac.mode_for_code("LP").unwrap().id, "refrigerant-leak");
}

// ---------------------------------------------------------------- validation rules

/// A small valid model that each rule test breaks in one place.
const BASE: &str = r#"
id = "test.kettle"
name = "Test kettle"
category = "kettle"
commands = ["descale", "siren_on"]

[[signals]]
name = "pressure"
unit = "bar"
normal = { min = 1.0, max = 2.0 }
failure = { threshold = 0.5, direction = "falling" }
scope = "diagnostics"

[[signals]]
name = "temperature"
unit = "°C"
normal = { min = 80.0, max = 100.0 }
scope = "diagnostics"

[[signals]]
name = "water"
unit = "l"
scope = "usage_analytics"
cumulative = true

[[parts]]
number = "PUMP-12"
name = "Pump"
lead_time = "3d"
price = { amount = 10.5, currency = "EUR" }

[[parts]]
number = "DESC-1"
name = "Descaler"
lead_time = "1d"

[[consumables]]
name = "descaler"
capacity = 50
usage_signal = "water"
reorder_at = { fraction = 0.2 }
part = "DESC-1"

[[failure_modes]]
id = "scale"
name = "Scale"
severity = "normal"
skill = "kettle-service"
parts = ["PUMP-12"]
indicators = [{ signal = "pressure" }]
playbook = [
  { do = "remote_command", command = "descale", args = { strength = 2, eco = true }, wait = "6h" },
  { do = "order_consumable", consumable = "descaler", when = "standing_approval" },
  { do = "order_part", part = "PUMP-12", when = "remedy_failed" },
  { do = "book_technician", duration = "2h", after_part_arrives = true, when = "remedy_failed" },
  { do = "ask_customer", question = "Is the lid closed?", options = ["yes", "no"], timeout = "1h" },
  { do = "handoff", reason = "still scaled", when = { any = ["no_answer", { answer = "yes" }] } },
]

[[failure_modes]]
id = "fire"
name = "Fire"
severity = "safety"
playbook = [
  { do = "notify_customer", template = "fire", priority = "safety" },
  { do = "handoff", reason = "fire" },
]

[[diagnostic_codes]]
code = "F28"
description = "Ignition"
failure_mode = "scale"

[[questions]]
id = "lid-check"
text = "Is the lid closed?"
options = ["yes", "no"]
failure_mode = "scale"

[[alarms]]
kind = "smoke"
failure_mode = "fire"
local_actions = ["siren_on"]

[rul]
unit = "hours"
inputs = ["pressure", "temperature"]
maintenance_at = 30
failure_mode = "scale"
params = { slope = 0.5, weights = [1.0, 2.0] }
"#;

/// `BASE` with `old` (which must occur exactly once) replaced by `new`.
fn with(old: &str, new: &str) -> String {
    assert_eq!(
        BASE.matches(old).count(),
        1,
        "{old:?} must occur once in BASE"
    );
    BASE.replacen(old, new, 1)
}

/// The error text for a model that must be refused.
fn refused(text: &str) -> String {
    match Catalogue::from_sources(&[("kettle.toml", text)]) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts the error names the source, the model, and every fragment given.
fn assert_names(err: &str, fragments: &[&str]) {
    assert!(
        err.contains("kettle.toml: model \"test.kettle\": "),
        "error does not name source and model: {err}"
    );
    for fragment in fragments {
        assert!(err.contains(fragment), "missing {fragment:?} in: {err}");
    }
}

#[test]
fn base_model_is_valid_and_indexed() {
    let catalogue = Catalogue::from_toml(BASE).unwrap();
    let kettle = catalogue.model("test.kettle").unwrap();
    assert_eq!(kettle.source(), "catalogue");
    assert_eq!(kettle.signal_index("water"), Some(2));
    assert_eq!(kettle.signal_index("nope"), None);
    assert_eq!(kettle.consumables_gauged_by(2), [0]);
    assert_eq!(kettle.consumables_gauged_by(99), [] as [usize; 0]);
    assert_eq!(
        kettle
            .part("PUMP-12")
            .unwrap()
            .price
            .as_ref()
            .unwrap()
            .minor_units,
        1050
    );
    assert_eq!(kettle.failure_mode_index("fire"), Some(1));
    assert_eq!(kettle.mode_for_code("F28").unwrap().id, "scale");
    assert_eq!(kettle.mode_for_question("lid-check").unwrap().id, "scale");
    assert_eq!(kettle.mode_for_alarm("smoke").unwrap().id, "fire");
    assert_eq!(kettle.mode_for_rul().unwrap().id, "scale");
    // A signal with a threshold indicates by every kind it can raise, by default.
    for kind in [
        InsightKind::Anomaly,
        InsightKind::Drift,
        InsightKind::Forecast,
        InsightKind::FailureNow,
    ] {
        assert_eq!(kettle.mode_for_insight(0, kind).unwrap().id, "scale");
    }
    assert!(kettle.mode_for_insight(0, InsightKind::Alarm).is_none());
    assert!(kettle.mode_for_insight(1, InsightKind::Drift).is_none());
    assert!(kettle.mode_for_insight(99, InsightKind::Drift).is_none());
    let signal = &kettle.signals()[0];
    assert_eq!(signal.detector, DetectorTuning::default());
    assert!(kettle.has_command("descale") && !kettle.has_command("boil"));
    let params: std::collections::BTreeMap<String, toml::Value> = kettle
        .rul()
        .unwrap()
        .params
        .clone()
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(params["slope"].as_float(), Some(0.5));
    match &kettle.failure_mode("scale").unwrap().playbook[0].action {
        Action::RemoteCommand { args, .. } => {
            assert_eq!(args["strength"], ArgValue::Integer(2));
            assert_eq!(args["eco"], ArgValue::Bool(true));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_fields_are_refused() {
    let err = refused(&with("unit = \"bar\"", "unit = \"bar\"\ncolour = \"red\""));
    assert_names(&err, &["line ", "unknown field `colour`"]);
    let err = refused(&with(
        "{ do = \"handoff\", reason = \"fire\" }",
        "{ do = \"handoff\", reason = \"fire\", urgent = true }",
    ));
    assert_names(&err, &["unknown field `urgent`"]);
    let err = refused(&with(
        "{ do = \"handoff\", reason = \"fire\" }",
        "{ do = \"escalate\", reason = \"fire\" }",
    ));
    assert_names(&err, &["escalate"]);
    let err = refused(&format!("bogus_section = 1\n{BASE}"));
    assert_names(&err, &["bogus_section"]);
}

#[test]
fn syntax_errors_name_the_source_and_line() {
    let err = Catalogue::from_sources(&[("broken.toml", "id = \"x\"\nname = \n")])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("broken.toml: model \"x\": line 2, column 8: "),
        "{err}"
    );
}

#[test]
fn missing_fields_are_refused() {
    let err = refused(&with("unit = \"bar\"\n", ""));
    assert_names(&err, &["missing field `unit`"]);
}

#[test]
fn ids_and_names_are_unique() {
    let err = refused(&with("name = \"temperature\"", "name = \"pressure\""));
    assert_names(
        &err,
        &["signals[1] \"pressure\": name \"pressure\" duplicates signals[0]"],
    );
    let err = refused(&with("number = \"DESC-1\"", "number = \"PUMP-12\""));
    assert_names(
        &err,
        &["parts[1] \"PUMP-12\": number \"PUMP-12\" duplicates parts[0]"],
    );
    let err = refused(&with("id = \"fire\"", "id = \"scale\""));
    assert_names(
        &err,
        &["failure_modes[1] \"scale\": id \"scale\" duplicates failure_modes[0]"],
    );
    let err = refused(
        &(BASE.to_owned()
            + "\n[[diagnostic_codes]]\ncode = \"F28\"\ndescription = \"again\"\nfailure_mode = \"scale\"\n"),
    );
    assert_names(
        &err,
        &["diagnostic_codes[1] \"F28\": code \"F28\" duplicates diagnostic_codes[0]"],
    );

    // Model ids are unique across sources, and the error names both.
    let err = Catalogue::from_sources(&[("a.toml", BASE), ("b.toml", BASE)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("b.toml: model \"test.kettle\": id: is already defined in a.toml"),
        "{err}"
    );
    let a = Catalogue::from_toml(BASE).unwrap();
    let err = a.clone().merge(a).unwrap_err().to_string();
    assert!(err.contains("is already defined"), "{err}");
}

#[test]
fn merge_joins_catalogues() {
    let a = Catalogue::from_toml(BASE).unwrap();
    let b = Catalogue::from_toml(&BASE.replace("test.kettle", "test.kettle-2")).unwrap();
    let merged = a.merge(b).unwrap();
    assert_eq!(merged.len(), 2);
    assert!(merged.model("test.kettle-2").is_some());
    assert!(Catalogue::default().is_empty());
}

#[test]
fn identifiers_are_checked() {
    let err = refused(&with("id = \"test.kettle\"", "id = \"test kettle\""));
    assert!(
        err.contains("id \"test kettle\" must be 1 to 64 characters"),
        "{err}"
    );
    let err = refused(&with("skill = \"kettle-service\"", "skill = \"\""));
    assert_names(
        &err,
        &["failure_modes[0] \"scale\": skill \"\" must be 1 to 64"],
    );
}

#[test]
fn normal_min_is_below_max() {
    let err = refused(&with("min = 1.0, max = 2.0", "min = 2.0, max = 1.0"));
    assert_names(
        &err,
        &["signals[0] \"pressure\": normal.min 2.0 must be below normal.max 1.0"],
    );
    let err = refused(&with("normal = { min = 80.0, max = 100.0 }\n", ""));
    assert_names(
        &err,
        &["signals[1] \"temperature\": normal is required unless the signal is cumulative"],
    );
}

#[test]
fn numbers_are_finite() {
    let err = refused(&with("threshold = 0.5", "threshold = nan"));
    assert_names(
        &err,
        &["signals[0] \"pressure\": failure.threshold NaN is not a finite number"],
    );
    let err = refused(&with("capacity = 50", "capacity = inf"));
    assert_names(
        &err,
        &["consumables[0] \"descaler\": capacity inf is not a finite number"],
    );
    let err = refused(&with("min = 80.0", "min = -inf"));
    assert_names(&err, &["normal.min -inf is not a finite number"]);
    let err = refused(&with("weights = [1.0, 2.0]", "weights = [1.0, nan]"));
    assert_names(&err, &["rul: params.weights[1] NaN is not a finite number"]);
    let err = refused(&with("strength = 2", "strength = inf"));
    assert_names(
        &err,
        &["playbook step 1 (remote_command): args.strength inf is not a finite number"],
    );
    let err = refused(&with("amount = 10.5", "amount = 10.555"));
    assert_names(
        &err,
        &["parts[0] \"PUMP-12\": price.amount 10.555 has more than two decimals"],
    );
}

#[test]
fn threshold_lies_beyond_the_normal_range() {
    let err = refused(&with("threshold = 0.5", "threshold = 1.5"));
    assert_names(
        &err,
        &[
            "signals[0] \"pressure\": failure.threshold 1.5 lies inside the normal range 1.0..=2.0 for direction falling",
        ],
    );
    let err = refused(&with("threshold = 0.5", "threshold = 2.5"));
    assert_names(
        &err,
        &["failure.threshold 2.5 lies above the normal range 1.0..=2.0 for direction falling"],
    );
    let err = refused(&with(
        "threshold = 0.5, direction = \"falling\"",
        "threshold = 0.5, direction = \"rising\"",
    ));
    assert_names(
        &err,
        &["failure.threshold 0.5 lies below the normal range 1.0..=2.0 for direction rising"],
    );
}

#[test]
fn scopes_are_reading_scopes() {
    let err = refused(&with(
        "scope = \"usage_analytics\"",
        "scope = \"marketing\"",
    ));
    assert_names(
        &err,
        &["signals[2] \"water\": scope marketing is not a scope readings fall under"],
    );
}

#[test]
fn detector_tuning_is_in_range() {
    let err = refused(&with(
        "unit = \"bar\"",
        "unit = \"bar\"\ndetector = { ewma_alpha = 1.5, persistence = 0, anomaly_z = -1.0 }",
    ));
    assert_names(
        &err,
        &[
            "detector.ewma_alpha 1.5 must lie in (0, 1]",
            "detector.persistence must be at least 1",
            "detector.anomaly_z -1.0 must be positive",
        ],
    );
}

#[test]
fn references_resolve() {
    let err = refused(&with(
        "part = \"PUMP-12\", when",
        "part = \"PUMP-99\", when",
    ));
    assert_names(
        &err,
        &[
            "failure_modes[0] \"scale\": playbook step 3 (order_part): order_part names unknown part \"PUMP-99\"",
        ],
    );
    let err = refused(&with("consumable = \"descaler\"", "consumable = \"beans\""));
    assert_names(
        &err,
        &["playbook step 2 (order_consumable): consumable \"beans\" is not among"],
    );
    let err = refused(&with("command = \"descale\"", "command = \"boil\""));
    assert_names(
        &err,
        &["playbook step 1 (remote_command): command \"boil\" is not among the model's commands"],
    );
    let err = refused(&with("signal = \"pressure\"", "signal = \"flow\""));
    assert_names(
        &err,
        &["failure_modes[0] \"scale\": indicators[0]: signal \"flow\" is not among"],
    );
    let err = refused(&with(
        "description = \"Ignition\"\nfailure_mode = \"scale\"",
        "description = \"Ignition\"\nfailure_mode = \"leak\"",
    ));
    assert_names(
        &err,
        &[
            "diagnostic_codes[0] \"F28\": failure_mode \"leak\" is not among the model's failure_modes",
        ],
    );
    let err = refused(&with("part = \"DESC-1\"", "part = \"DESC-2\""));
    assert_names(
        &err,
        &["consumables[0] \"descaler\": part \"DESC-2\" is not among the model's parts"],
    );
    let err = refused(&with(
        "parts = [\"PUMP-12\"]",
        "parts = [\"PUMP-12\", \"GEAR-1\"]",
    ));
    assert_names(
        &err,
        &["failure_modes[0] \"scale\": parts[1] \"GEAR-1\" is not among"],
    );
    let err = refused(&with(
        "local_actions = [\"siren_on\"]",
        "local_actions = [\"strobe\"]",
    ));
    assert_names(
        &err,
        &["alarms[0] \"smoke\": local_actions[0] \"strobe\" is not among the model's commands"],
    );
    let err = refused(&with(
        "inputs = [\"pressure\", \"temperature\"]",
        "inputs = [\"pressure\", \"rpm\"]",
    ));
    assert_names(
        &err,
        &["rul: inputs[1] \"rpm\" is not among the model's signals"],
    );
    let err = refused(&with(
        "question = \"Is the lid closed?\", options = [\"yes\", \"no\"]",
        "relay = \"lid-chek\"",
    ));
    assert_names(
        &err,
        &["playbook step 5 (ask_customer): relay \"lid-chek\" is not among the model's questions"],
    );
}

#[test]
fn ordered_parts_are_listed_on_the_mode() {
    let err = refused(&with("parts = [\"PUMP-12\"]", "parts = []"));
    assert_names(
        &err,
        &["playbook step 3 (order_part): part \"PUMP-12\" is not in the failure mode's parts"],
    );
}

#[test]
fn technicians_have_a_skill() {
    let err = refused(&with("skill = \"kettle-service\"\n", ""));
    assert_names(
        &err,
        &["failure_modes[0] \"scale\": playbook step 4 (book_technician): skill is missing"],
    );
    // A step's own skill is enough.
    let text = with("skill = \"kettle-service\"\n", "").replace(
        "{ do = \"book_technician\", duration",
        "{ do = \"book_technician\", skill = \"plumber\", duration",
    );
    let catalogue = Catalogue::from_toml(&text).unwrap();
    let mode = catalogue
        .model("test.kettle")
        .unwrap()
        .failure_mode("scale")
        .unwrap();
    assert!(
        matches!(&mode.playbook[3].action, Action::BookTechnician { skill, .. } if skill == "plumber")
    );
}

#[test]
fn consumable_usage_signal_is_cumulative() {
    let err = refused(&with(
        "usage_signal = \"water\"",
        "usage_signal = \"temperature\"",
    ));
    assert_names(
        &err,
        &["consumables[0] \"descaler\": usage_signal \"temperature\" is not cumulative"],
    );
    let err = refused(&with(
        "usage_signal = \"water\"",
        "level_signal = \"water\"",
    ));
    assert_names(&err, &["level_signal \"water\" is cumulative"]);
    let err = refused(&with(
        "usage_signal = \"water\"",
        "usage_signal = \"water\"\nlevel_signal = \"temperature\"",
    ));
    assert_names(
        &err,
        &["exactly one of usage_signal and level_signal is required"],
    );
}

#[test]
fn cumulative_signals_have_no_failure_threshold() {
    let err = refused(&with(
        "cumulative = true",
        "cumulative = true\nfailure = { threshold = 100.0, direction = \"rising\" }",
    ));
    assert_names(
        &err,
        &["signals[2] \"water\": failure: a cumulative signal"],
    );
}

#[test]
fn durations_are_positive_and_well_formed() {
    let err = refused(&with("wait = \"6h\"", "wait = \"0h\""));
    assert_names(
        &err,
        &["playbook step 1 (remote_command): wait: duration \"0h\" must be positive"],
    );
    let err = refused(&with("lead_time = \"3d\"", "lead_time = \"5x\""));
    assert_names(
        &err,
        &["parts[0] \"PUMP-12\": lead_time: duration \"5x\" has unknown unit"],
    );
    let err = refused(&with("timeout = \"1h\"", "timeout = \"1.5h\""));
    assert_names(
        &err,
        &["playbook step 5 (ask_customer): timeout: duration \"1.5h\""],
    );
    let err = refused(&with(
        "duration = \"2h\"",
        "duration = \"99999999999999999d\"",
    ));
    assert_names(
        &err,
        &[
            "playbook step 4 (book_technician): duration: duration \"99999999999999999d\" is too large",
        ],
    );
}

#[test]
fn playbooks_are_not_empty_and_reach_a_handoff() {
    let fire_playbook = "playbook = [\n  { do = \"notify_customer\", template = \"fire\", priority = \"safety\" },\n  { do = \"handoff\", reason = \"fire\" },\n]";
    let err = refused(&with(fire_playbook, "playbook = []"));
    assert_names(&err, &["failure_modes[1] \"fire\": playbook is empty"]);

    let err = refused(&with(
        "{ do = \"handoff\", reason = \"still scaled\", when = { any = [\"no_answer\", { answer = \"yes\" }] } },",
        "",
    ));
    assert_names(
        &err,
        &["failure_modes[0] \"scale\": playbook never hands off"],
    );

    let err = refused(&with(
        "{ do = \"handoff\", reason = \"fire\" },",
        "{ do = \"handoff\", reason = \"fire\" },\n  { do = \"notify_customer\", template = \"later\", priority = \"low\" },",
    ));
    assert_names(
        &err,
        &[
            "failure_modes[1] \"fire\": playbook step 3 (notify_customer): is unreachable: step 2 hands off unconditionally",
        ],
    );
}

#[test]
fn conditions_refer_to_earlier_steps() {
    // remedy_failed before any remote command.
    let err = refused(&with(
        "{ do = \"remote_command\", command = \"descale\", args = { strength = 2, eco = true }, wait = \"6h\" },",
        "",
    ));
    assert_names(
        &err,
        &["playbook step 2 (order_part): when remedy_failed needs an earlier remote_command step"],
    );
    // An answer the question does not offer.
    let err = refused(&with("{ answer = \"yes\" }", "{ answer = \"maybe\" }"));
    assert_names(
        &err,
        &[
            "playbook step 6 (handoff): when any[1] answer \"maybe\" is not an option of the question in step 5",
        ],
    );
    // no_answer before any question.
    let err = refused(&with(
        "when = \"standing_approval\"",
        "when = \"no_answer\"",
    ));
    assert_names(
        &err,
        &["playbook step 2 (order_consumable): when no_answer needs an earlier ask_customer step"],
    );
    // Standing approvals are about orders, not about handoffs.
    let err = refused(&with(
        "{ do = \"handoff\", reason = \"fire\" }",
        "{ do = \"handoff\", reason = \"fire\", when = \"standing_approval\" }",
    ));
    assert_names(
        &err,
        &["playbook step 2 (handoff): when: standing approvals apply only to"],
    );
    // after_part_arrives needs a part ordered first.
    let err = refused(&with(
        "{ do = \"order_part\", part = \"PUMP-12\", when = \"remedy_failed\" },",
        "",
    ));
    assert_names(
        &err,
        &["playbook step 3 (book_technician): after_part_arrives needs an earlier order_part step"],
    );
    // Empty combinators.
    let err = refused(&with("when = \"standing_approval\"", "when = { all = [] }"));
    assert_names(&err, &["when all must not be empty"]);
}

#[test]
fn confidences_and_fractions_lie_in_zero_to_one() {
    let err = refused(&with("fraction = 0.2", "fraction = 1.5"));
    assert_names(
        &err,
        &["consumables[0] \"descaler\": reorder_at.fraction 1.5 must lie in 0..=1"],
    );
    let err = refused(&with(
        "when = \"standing_approval\"",
        "when = { confidence_below = 1.2 }",
    ));
    assert_names(
        &err,
        &["playbook step 2 (order_consumable): when confidence_below 1.2 must lie in 0..=1"],
    );
    let err = refused(&with(
        "description = \"Ignition\"",
        "description = \"Ignition\"\nconfidence = -0.1",
    ));
    assert_names(
        &err,
        &["diagnostic_codes[0] \"F28\": confidence -0.1 must lie in 0..=1"],
    );
    let err = refused(&with("fraction = 0.2", "remaining = 50.0"));
    assert_names(&err, &["reorder_at.remaining 50.0 must lie in 0..50.0"]);
}

#[test]
fn alarms_point_to_safety_modes() {
    let err = refused(&with(
        "kind = \"smoke\"\nfailure_mode = \"fire\"",
        "kind = \"smoke\"\nfailure_mode = \"scale\"",
    ));
    assert_names(
        &err,
        &[
            "alarms[0] \"smoke\": failure_mode \"scale\" has severity normal; an alarm must point to a safety failure mode",
        ],
    );
    let err = refused(&with(
        "local_actions = [\"siren_on\"]",
        "local_actions = []",
    ));
    assert_names(
        &err,
        &["alarms[0] \"smoke\": local_actions must name at least one command"],
    );
}

#[test]
fn safety_modes_notify_and_hand_off_unconditionally() {
    let err = refused(&with(
        "{ do = \"handoff\", reason = \"fire\" }",
        "{ do = \"handoff\", reason = \"fire\", when = { confidence_at_least = 0.5 } }",
    ));
    assert_names(
        &err,
        &[
            "failure_modes[1] \"fire\": a safety failure mode's playbook must hand off unconditionally",
        ],
    );
    let err = refused(&with(
        "template = \"fire\", priority = \"safety\"",
        "template = \"fire\", priority = \"high\"",
    ));
    assert_names(
        &err,
        &["must notify_customer with priority safety unconditionally"],
    );
    // And only safety modes may use priority safety.
    let err = refused(&with(
        "{ do = \"order_consumable\"",
        "{ do = \"notify_customer\", template = \"loud\", priority = \"safety\" },\n  { do = \"order_consumable\"",
    ));
    assert_names(
        &err,
        &["playbook step 2 (notify_customer): priority safety overrides quiet hours"],
    );
}

#[test]
fn every_mode_is_indicated_by_something() {
    let text = with(
        "kind = \"smoke\"\nfailure_mode = \"fire\"\nlocal_actions = [\"siren_on\"]",
        "",
    )
    .replace("[[alarms]]", "");
    let err = refused(&text);
    assert_names(
        &err,
        &["failure_modes[1] \"fire\": nothing indicates this failure mode"],
    );
}

#[test]
fn one_mode_per_signal_and_insight() {
    let text = with(
        "severity = \"safety\"\n",
        "severity = \"safety\"\nindicators = [{ signal = \"pressure\", insights = [\"anomaly\"] }]\n",
    );
    let err = refused(&text);
    assert_names(
        &err,
        &[
            "failure_modes[1] \"fire\": indicators: signal \"pressure\" with insight anomaly already indicates failure mode \"scale\"",
        ],
    );
    // Splitting the kinds between modes is fine.
    let text = text.replace(
        "indicators = [{ signal = \"pressure\" }]",
        "indicators = [{ signal = \"pressure\", insights = [\"drift\", \"forecast\"] }]",
    );
    let catalogue = Catalogue::from_toml(&text).unwrap();
    let kettle = catalogue.model("test.kettle").unwrap();
    assert_eq!(
        kettle.mode_for_insight(0, InsightKind::Anomaly).unwrap().id,
        "fire"
    );
    assert_eq!(
        kettle.mode_for_insight(0, InsightKind::Drift).unwrap().id,
        "scale"
    );
    assert!(
        kettle
            .mode_for_insight(0, InsightKind::FailureNow)
            .is_none()
    );
}

#[test]
fn insights_fit_their_signal() {
    let err = refused(&with(
        "indicators = [{ signal = \"pressure\" }]",
        "indicators = [{ signal = \"temperature\", insights = [\"forecast\"] }]",
    ));
    assert_names(
        &err,
        &[
            "indicators[0]: insights[0] forecast needs a failure threshold, and signal \"temperature\" has none",
        ],
    );
    let err = refused(&with(
        "indicators = [{ signal = \"pressure\" }]",
        "indicators = [{ signal = \"pressure\", insights = [\"alarm\"] }]",
    ));
    assert_names(&err, &["insights[0] alarm is not raised by a signal"]);
    let err = refused(&with(
        "indicators = [{ signal = \"pressure\" }]",
        "indicators = [{ signal = \"water\" }]",
    ));
    assert_names(
        &err,
        &["signal \"water\" is cumulative (a counter) and cannot indicate"],
    );
}

#[test]
fn ask_customer_offers_real_choices() {
    let err = refused(&with(
        "options = [\"yes\", \"no\"], timeout",
        "options = [\"yes\"], timeout",
    ));
    assert_names(
        &err,
        &["playbook step 5 (ask_customer): options must offer at least two answers"],
    );
    let err = refused(&with(
        "question = \"Is the lid closed?\", options = [\"yes\", \"no\"]",
        "question = \"Is the lid closed?\"",
    ));
    assert_names(&err, &["give either question and options, or relay"]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = with("threshold = 0.5", "threshold = 1.5")
        .replace("lead_time = \"3d\"", "lead_time = \"0d\"");
    let err =
        Catalogue::from_sources(&[("kettle.toml", &text), ("other.toml", "id = 3")]).unwrap_err();
    assert_eq!(err.problems.len(), 3, "{err}");
    assert_eq!(err.to_string().lines().count(), 3);
    assert!(err.problems.iter().any(|p| p.source == "other.toml"));
}
