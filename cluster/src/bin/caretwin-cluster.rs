//! `caretwin-cluster`: parses flags, reads the configuration, calls the library.

use anyhow::Context;
use caretwin_actors::store::{Key, Op, WriteBatch};
use caretwin_cluster::{ClusterConfig, node};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

/// A CareTwin cluster node: hosts device and customer twins, syncs with edge sites and
/// serves integrators.
///
/// Configuration comes from a TOML file (`--config`), overridden by environment variables
/// named CARETWIN_CLUSTER__<SECTION>__<FIELD> (e.g. CARETWIN_CLUSTER__STORE__EMBEDDED__PATH=/data).
/// Logs go to stderr; RUST_LOG sets the filter (default: info, storage engine at warn).
#[derive(Parser)]
#[command(name = "caretwin-cluster", version)]
struct Cli {
    /// Configuration file (TOML). Without it, defaults apply: node `node-1`, embedded
    /// store in ./data/cluster.
    #[arg(long, short, global = true, env = "CARETWIN_CLUSTER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node: open its store, register it in the membership table under a lease,
    /// renew the lease, and on Ctrl-C or SIGTERM release it and close the store cleanly.
    /// Refuses to start if another live process holds the same node id.
    Run,
    /// Print the effective configuration (file, then environment overrides) as TOML.
    Config,
    /// Check the store: durably write a probe record under `probe/<node-id>`, read it
    /// back, and print how long that took. Exits non-zero if either step fails.
    CheckStore,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<ClusterConfig> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read configuration {}", p.display()))?,
        None => String::new(),
    };
    Ok(ClusterConfig::load(&text, std::env::vars())?)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fjall=warn,lsm_tree=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main().await {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

async fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = load_config(cli.config.as_ref())?;
    match cli.command {
        Command::Run => node::run(config, shutdown_signal()).await?,
        Command::Config => print!("{}", toml::to_string(&config)?),
        Command::CheckStore => check_store(&config).await?,
    }
    Ok(())
}

async fn check_store(config: &ClusterConfig) -> anyhow::Result<()> {
    let store = caretwin_cluster::store::open(&config.store)?;
    let key = Key::new(format!("probe/{}", config.node_id));
    let started = Instant::now();
    let current = store.snapshot(&key).await?.map_or(0, |v| v.version);
    let written = node::now_ms().to_be_bytes().to_vec();
    store
        .commit(WriteBatch::new().with(Op::PutSnapshot {
            key: key.clone(),
            expected_version: current,
            value: written.clone(),
        }))
        .await?;
    let read = store
        .snapshot(&key)
        .await?
        .context("probe record missing right after it was acknowledged")?;
    anyhow::ensure!(
        read.value == written && read.version == current + 1,
        "probe record read back differs from what was written"
    );
    println!(
        "store ok: wrote and read back {key} (version {}) in {:.1} ms",
        read.version,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested");
}
