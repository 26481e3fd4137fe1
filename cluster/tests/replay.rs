//! `caretwin-cluster fit` and `replay` on C-MAPSS files, as an operator runs them.

use caretwin_tests::{Process, Stream};
use std::fmt::Write as _;
use std::path::Path;

const EXE: &str = env!("CARGO_BIN_EXE_caretwin-cluster");

/// A C-MAPSS-shaped file: `units` engines whose informative sensors drift as they wear,
/// each ending `cut` cycles before its failure (0: run to failure). Deterministic.
fn synthetic_cmapss(units: u32, cut: u32) -> String {
    let informative = [4, 5, 6, 9, 10, 11, 13, 14, 15, 16, 17, 19, 22, 23];
    let mut text = String::new();
    for unit in 1..=units {
        let life = 90 + (unit * 37) % 60;
        for cycle in 1..=life - cut {
            let wear = (f64::from(cycle) / f64::from(life)).powi(2);
            let _ = write!(text, "{unit} {cycle}");
            for ch in 0..24u32 {
                let mut v = 100.0 + f64::from(ch);
                if informative.contains(&(ch as usize)) {
                    // A small deterministic wobble stands in for noise.
                    let wobble = f64::from((unit * 7 + cycle * 13 + ch * 3) % 11) / 50.0;
                    v += 4.0 * wear * if ch % 2 == 0 { 1.0 } else { -1.0 } + wobble;
                }
                let _ = write!(text, " {v:.4}");
            }
            text.push_str("\r\n");
        }
    }
    text
}

fn run(args: &[&str]) -> anyhow::Result<(bool, Vec<String>, String)> {
    let mut p = Process::start(EXE.as_ref(), args, &[])?;
    let ok = p.wait()?.success();
    let out = p
        .output(Stream::Stdout)
        .iter()
        .map(|l| l.to_string())
        .collect();
    Ok((ok, out, p.output(Stream::Stderr).join("\n")))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Checks the report: header, then one `unit,last_cycle,rul` line per unit, in unit
/// order, with the recording's last cycles and estimates in 0..=cap.
fn check_report(lines: &[String], last_cycles: &[u32]) {
    assert_eq!(lines[0], "unit,last_cycle,predicted_rul", "{lines:?}");
    assert_eq!(lines.len(), 1 + last_cycles.len(), "{lines:?}");
    for (i, (line, &last)) in lines[1..].iter().zip(last_cycles).enumerate() {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols.len(), 3, "{line}");
        assert_eq!(cols[0].parse::<usize>().unwrap(), i + 1, "{line}");
        assert_eq!(cols[1].parse::<u32>().unwrap(), last, "{line}");
        let rul: f64 = cols[2].parse().unwrap();
        assert!((0.0..=125.0).contains(&rul), "{line}");
        assert_eq!(
            cols[2].split('.').nth(1).map(str::len),
            Some(1),
            "one decimal: {line}"
        );
    }
}

#[test]
fn fit_then_replay_reports_every_unit_at_its_last_cycle() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let train = dir.path().join("train.txt");
    let test = dir.path().join("test.txt");
    let params = dir.path().join("params.toml");
    std::fs::write(&train, synthetic_cmapss(12, 0))?;
    std::fs::write(&test, synthetic_cmapss(4, 30))?;
    let last_cycles: Vec<u32> = (1..=4).map(|u| 90 + (u * 37) % 60 - 30).collect();

    // fit prints the table; with --out it writes it.
    let (ok, out, err) = run(&["fit", "--format", "cmapss", path(&train), "--trees", "40"])?;
    assert!(ok, "{err}");
    let printed = out.join("\n");
    assert!(printed.contains("feature_version = 1") && printed.contains("leaves = ["));
    let (ok, out, err) = run(&[
        "fit",
        "--format",
        "cmapss",
        path(&train),
        "--trees",
        "40",
        "--out",
        path(&params),
    ])?;
    assert!(ok && out.is_empty(), "{err}");
    assert_eq!(std::fs::read_to_string(&params)?.trim(), printed.trim());

    // replay with the written parameters, and with --train: the same fit, the same report.
    let (ok, with_params, err) = run(&[
        "replay",
        "--format",
        "cmapss",
        "--params",
        path(&params),
        path(&test),
    ])?;
    assert!(ok, "{err}");
    check_report(&with_params, &last_cycles);
    let (ok, with_train, err) = run(&[
        "replay",
        "--format",
        "cmapss",
        "--train",
        path(&train),
        "--trees",
        "40",
        path(&test),
    ])?;
    assert!(ok, "{err}");
    assert_eq!(with_train, with_params);

    // Engines cut 30 cycles before failure are not reported as new.
    for line in &with_params[1..] {
        let rul: f64 = line.rsplit(',').next().unwrap().parse()?;
        assert!(rul < 100.0, "{line}");
    }
    Ok(())
}

#[test]
fn malformed_input_is_refused_naming_the_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let train = dir.path().join("train.txt");
    let good = synthetic_cmapss(2, 0);
    let mut lines: Vec<&str> = good.lines().collect();

    // A short row on line 5.
    let short = lines[4].rsplit_once(' ').unwrap().0.to_owned();
    lines[4] = &short;
    std::fs::write(&train, lines.join("\n"))?;
    let (ok, _, err) = run(&["fit", "--format", "cmapss", path(&train)])?;
    assert!(!ok);
    assert!(err.contains("line 5: expected 26 columns"), "{err}");
    assert!(err.contains("train.txt"), "names the file: {err}");

    // A NaN on line 3, given to replay.
    let mut lines: Vec<&str> = good.lines().collect();
    let mut fields: Vec<&str> = lines[2].split(' ').collect();
    fields[6] = "NaN";
    let nan = fields.join(" ");
    lines[2] = &nan;
    std::fs::write(&train, lines.join("\n"))?;
    let (ok, out, err) = run(&[
        "replay",
        "--format",
        "cmapss",
        "--params",
        "/nonexistent",
        path(&train),
    ])?;
    assert!(!ok && out.is_empty());
    assert!(err.contains("/nonexistent"), "{err}");

    let params = dir.path().join("params.toml");
    std::fs::write(dir.path().join("ok.txt"), &good)?;
    let (ok, _, err) = run(&[
        "fit",
        "--format",
        "cmapss",
        path(&dir.path().join("ok.txt")),
        "--trees",
        "5",
        "--out",
        path(&params),
    ])?;
    assert!(ok, "{err}");
    let (ok, out, err) = run(&[
        "replay",
        "--format",
        "cmapss",
        "--params",
        path(&params),
        path(&train),
    ])?;
    assert!(!ok && out.is_empty());
    assert!(err.contains("line 3: column 7 (s2) is NaN"), "{err}");

    // Cycles going backwards within a unit.
    let mut lines: Vec<&str> = good.lines().collect();
    lines.swap(6, 7);
    std::fs::write(&train, lines.join("\n"))?;
    let (ok, _, err) = run(&["fit", "--format", "cmapss", path(&train)])?;
    assert!(!ok);
    assert!(
        err.contains("line 8: unit 1 cycle 7 comes after its cycle 8"),
        "{err}"
    );

    // Broken parameters are refused with the reason.
    std::fs::write(&params, "feature_version = 1\ncap = 125.0\n")?;
    let (ok, _, err) = run(&[
        "replay",
        "--format",
        "cmapss",
        "--params",
        path(&params),
        path(&dir.path().join("ok.txt")),
    ])?;
    assert!(!ok);
    assert!(
        err.contains("rul params") && err.contains("missing field"),
        "{err}"
    );
    Ok(())
}

#[test]
fn replay_without_parameters_says_what_to_pass() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let test = dir.path().join("test.txt");
    std::fs::write(&test, synthetic_cmapss(1, 10))?;
    let (ok, out, err) = run(&["replay", "--format", "cmapss", path(&test)])?;
    if ok {
        // The built-in catalogue holds fitted turbofan parameters: they are used.
        check_report(&out, &[90 + 37 - 10]);
    } else {
        assert!(
            err.contains("no fitted RUL parameters: pass --train or --params"),
            "{err}"
        );
    }
    Ok(())
}

/// The real FD001 files, when present beside the repository: 100 test units reported.
/// About a second in release, longer in debug, hence ignored by default:
/// `cargo test -p caretwin-cluster --test replay -- --ignored`.
#[test]
#[ignore = "fits on the full FD001 training file"]
fn replays_test_fd001() -> anyhow::Result<()> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cmapss");
    let (train, test) = (data.join("train_FD001.txt"), data.join("test_FD001.txt"));
    if !train.exists() || !test.exists() {
        eprintln!("skipped: no FD001 files in {}", data.display());
        return Ok(());
    }
    let (ok, out, err) = run(&[
        "replay",
        "--format",
        "cmapss",
        "--train",
        path(&train),
        path(&test),
    ])?;
    assert!(ok, "{err}");
    assert_eq!(out.len(), 101);
    assert_eq!(
        out[1].split(',').nth(1),
        Some("31"),
        "unit 1 ends at cycle 31"
    );
    Ok(())
}
