//! The store keeps every acknowledged write when its process is killed with SIGKILL.

use std::process::Command;

#[test]
fn sigkilled_writer_loses_no_acknowledged_write() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_caretwin-chaos"))
        .args(["crash-store", "--kill-after", "3000", "--json"])
        .env("CARETWIN_CHAOS__WORK_DIR", work.path())
        .env("CARETWIN_CHAOS__WRITERS", "32")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {}: {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let acknowledged = report["acknowledged"].as_u64().unwrap();
    assert!(acknowledged >= 3000, "{report}");
    assert_eq!(report["survived"].as_u64(), Some(acknowledged), "{report}");
    assert_eq!(report["lost"].as_array().map(Vec::len), Some(0), "{report}");
    assert_eq!(report["duplicated"].as_u64(), Some(0), "{report}");
    assert!(
        report["log_entries"].as_u64().unwrap() >= acknowledged,
        "{report}"
    );
}
