//! The demo end to end: real QUIC sync from simulated sites, real gRPC to the desk, the
//! embedded store, in fast time. Waits end on observed state (the demo settles when every
//! reading reached its twin and every handed-off case reached the desk), not on sleeps.

use caretwin_chaos::demo::{DemoOptions, Event, run};
use std::collections::BTreeMap;
use std::time::Duration;

/// A wearing pump leads to exactly one part order, one visit and one case on the agent's
/// stream, carrying its context; nothing is done twice and no reading is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wearing_pump_gets_one_order_one_visit_and_one_case_with_context() {
    let options = DemoOptions {
        duration: Duration::from_secs(14),
        sites: 1,
        ..DemoOptions::default()
    };
    let mut events = Vec::new();
    let summary = run(options, std::future::pending(), |e| events.push(e.clone()))
        .await
        .unwrap();

    // The coffee machine's case: the one the customer twin opened for its pump.
    let pump_cases: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Prediction {
                case_id,
                device,
                mode,
                ..
            } if device == "t1:coffee-1" && mode == "pump-wear" => Some(case_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(pump_cases.len(), 1, "one case for the pump: {events:#?}");
    let case = pump_cases[0];
    let of_case = |key: &str| key.starts_with(&format!("{case}/"));
    let orders: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::PartOrder {
                key, part_number, ..
            } if of_case(key) => Some(part_number.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(orders, ["PUMP-12"], "one part order");
    // Not in the desk's stock: placed with the built-in supplier, over gRPC.
    let placed_by_supplier = events.iter().any(|e| {
        matches!(e, Event::PartOrder { key, state, .. }
            if of_case(key) && state.starts_with("placed (SO-"))
    });
    assert!(placed_by_supplier, "{events:#?}");
    let visits = events
        .iter()
        .filter(|e| matches!(e, Event::Appointment { key, .. } if of_case(key)))
        .count();
    assert_eq!(visits, 1, "one visit");
    let desk: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::DeskCase { case: c, .. } if c.case_id == case => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(desk.len(), 1, "one case on the agent stream");
    let c = desk[0];
    let cause = c.root_cause.as_ref().expect("a root cause");
    assert_eq!(
        (cause.failure_mode_id.as_str(), cause.device_id.as_str()),
        ("pump-wear", "t1:coffee-1")
    );
    assert_eq!(c.customer.as_ref().unwrap().customer_id, "t1:cust-1");
    assert!(c.devices.iter().any(|d| d.device_id == "t1:coffee-1"));
    assert!(!c.insights.is_empty(), "the insight history");
    let tried: Vec<&str> = c.actions.iter().map(|a| a.description.as_str()).collect();
    assert!(
        tried.iter().any(|a| a.contains("PUMP-12")) && tried.iter().any(|a| a.contains("booked")),
        "the actions taken: {tried:?}"
    );
    assert!(c.suggested_next_step.is_some());

    // The whole run: nothing twice, nothing lost, every handed-off case at the desk.
    assert_eq!(summary.duplicate_effects, 0, "{:?}", summary.duplicates);
    assert_eq!(summary.readings_pending, 0);
    assert!(summary.readings_accepted > 1_000, "{summary:?}");
    assert_eq!(
        summary.readings_withheld, 0,
        "consent reached the devices first"
    );
    assert_eq!(summary.readings_applied, summary.readings_accepted);
    assert!(
        summary.cases_handed_off >= 2,
        "the pump and the smoke alarm: {summary:?}"
    );
    assert_eq!(summary.cases_received_by_desk, summary.cases_handed_off);
    let mut per_case: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        if let Event::DeskCase { case, .. } = e {
            *per_case.entry(case.case_id.as_str()).or_default() += 1;
        }
    }
    assert!(per_case.values().all(|n| *n == 1), "{per_case:?}");
}

/// `demo --json` runs unattended and prints one JSON object with the counts.
#[test]
fn demo_json_prints_the_counts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caretwin-chaos"))
        .args(["demo", "--duration", "3s", "--sites", "1", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "readings_accepted",
        "readings_applied",
        "work_orders",
        "part_orders",
        "appointments",
        "cases_handed_off",
        "cases_received_by_desk",
        "duplicate_effects",
    ] {
        assert!(v[key].is_u64(), "{key} in {v}");
    }
    assert_eq!(v["duplicate_effects"], 0);
    assert!(v["readings_accepted"].as_u64().unwrap() > 0);
    assert_eq!(v["readings_applied"], v["readings_accepted"]);

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_caretwin-chaos"))
        .args(["demo", "--sites", "0", "--json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--sites"));
}

/// Ctrl-C ends a running demo cleanly: it stops at once, prints its summary and exits 0.
#[test]
fn ctrl_c_ends_the_demo_cleanly_with_a_summary() {
    let mut demo = caretwin_tests::Process::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_caretwin-chaos")),
        &["demo", "--duration", "10m", "--sites", "1"],
        &[],
    )
    .unwrap();
    // The smoke alarm reaches the desk within a few seconds of device time.
    demo.wait_for("DESK").unwrap();
    demo.interrupt().unwrap();
    demo.wait_for("duplicate effects 0").unwrap();
    let status = demo.wait().unwrap();
    assert!(status.success(), "{}", demo.transcript());
}
