//! The `caretwin-cluster` binary as an operator runs it.

use caretwin_tests::{Process, Stream};

const EXE: &str = env!("CARGO_BIN_EXE_caretwin-cluster");

#[test]
fn node_runs_refuses_a_twin_process_and_stops_cleanly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_str().unwrap();
    let env = [("CARETWIN_CLUSTER__STORE__EMBEDDED__PATH", path)];

    let mut node = Process::start(EXE.as_ref(), &["run"], &env)?;
    node.wait_for("node registered")?;

    // A second process on the same store is refused with a clear reason.
    let mut twin = Process::start(EXE.as_ref(), &["run"], &env)?;
    let status = twin.wait()?;
    assert!(!status.success(), "second node on one store must fail");
    let err = twin.output(Stream::Stderr).join("\n");
    assert!(err.contains("in use by another process"), "{err}");

    // SIGTERM: the node releases its lease and closes the store, then exits 0.
    node.terminate()?;
    let status = node.wait()?;
    assert!(status.success(), "{status}: {}", node.transcript());
    node.wait_for("node left the cluster")?;

    // The store is free again and holds what the node wrote.
    let mut check = Process::start(EXE.as_ref(), &["check-store"], &env)?;
    assert!(check.wait()?.success(), "{}", check.transcript());
    let out = check.output(Stream::Stdout).join("\n");
    assert!(
        out.contains("store ok") && out.contains("version 1"),
        "{out}"
    );
    Ok(())
}

#[test]
fn bad_configuration_is_refused_with_its_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "lease_ttl = \"2s\"\nrenew_every = \"5s\"\n")?;
    let mut p = Process::start(
        EXE.as_ref(),
        &["--config", cfg.to_str().unwrap(), "run"],
        &[],
    )?;
    assert!(!p.wait()?.success());
    let err = p.output(Stream::Stderr).join("\n");
    assert!(err.contains("renew_every"), "{err}");

    let mut p = Process::start(
        EXE.as_ref(),
        &["config"],
        &[("CARETWIN_CLUSTER__NODE_ID", "n9")],
    )?;
    assert!(p.wait()?.success());
    assert!(
        p.output(Stream::Stdout).contains(&"node_id = \"n9\""),
        "{}",
        p.transcript()
    );
    Ok(())
}
