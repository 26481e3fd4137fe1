//! The `caretwin-cluster` binary as an operator runs it.

use caretwin_tests::{Process, Stream};

const EXE: &str = env!("CARGO_BIN_EXE_caretwin-cluster");

#[test]
fn node_runs_refuses_a_twin_process_and_stops_cleanly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("data");
    let certs = dir.path().join("certs");
    let mut dev = Process::start(
        EXE.as_ref(),
        &[
            "dev",
            "--out",
            certs.to_str().unwrap(),
            "--site",
            "t1:home-1",
        ],
        &[],
    )?;
    assert!(dev.wait()?.success(), "{}", dev.transcript());
    let file = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    let (path, ca, cert, key) = (
        path.to_str().unwrap().to_owned(),
        file("ca.pem"),
        file("cluster.pem"),
        file("cluster.key"),
    );
    let env = [
        ("CARETWIN_CLUSTER__STORE__EMBEDDED__PATH", path.as_str()),
        ("CARETWIN_CLUSTER__SYNC__LISTEN", "127.0.0.1:0"),
        ("CARETWIN_CLUSTER__GRPC__LISTEN", "127.0.0.1:0"),
        ("CARETWIN_CLUSTER__SYNC__CA", ca.as_str()),
        ("CARETWIN_CLUSTER__SYNC__CERT", cert.as_str()),
        ("CARETWIN_CLUSTER__SYNC__KEY", key.as_str()),
    ];

    let mut node = Process::start(EXE.as_ref(), &["run"], &env)?;
    node.wait_for("sync listening")?;

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

#[test]
fn a_fresh_directory_runs_with_development_certificates() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let env = [
        ("CARETWIN_CLUSTER__SYNC__LISTEN", "127.0.0.1:0"),
        ("CARETWIN_CLUSTER__GRPC__LISTEN", "127.0.0.1:0"),
    ];
    let mut node = Process::start_in(Some(dir.path()), EXE.as_ref(), &["run"], &env)?;
    node.wait_for("DEVELOPMENT certificates created")?;
    node.wait_for("sync listening")?;
    node.terminate()?;
    assert!(node.wait()?.success(), "{}", node.transcript());
    for f in ["certs/ca.pem", "certs/cluster.pem", "certs/cluster.key"] {
        assert!(dir.path().join(f).exists(), "{f} created");
    }
    // Certificates configured elsewhere are never invented.
    let env = [
        ("CARETWIN_CLUSTER__SYNC__LISTEN", "127.0.0.1:0"),
        ("CARETWIN_CLUSTER__GRPC__LISTEN", "127.0.0.1:0"),
        ("CARETWIN_CLUSTER__SYNC__CA", "/nonexistent/ca.pem"),
    ];
    let mut node = Process::start_in(Some(dir.path()), EXE.as_ref(), &["run"], &env)?;
    assert!(!node.wait()?.success());
    assert!(
        node.output(Stream::Stderr)
            .join("\n")
            .contains("/nonexistent/ca.pem"),
        "{}",
        node.transcript()
    );
    Ok(())
}
