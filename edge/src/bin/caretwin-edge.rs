//! `caretwin-edge`: parses flags, reads the configuration, calls the library.

use anyhow::Context;
use caretwin_edge::config::EdgeConfig;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// A CareTwin edge node: collects readings from the devices of one site, keeps them on
/// disk while offline, syncs them to the cluster over QUIC with mutual TLS, and carries
/// commands back down.
///
/// Configuration comes from a TOML file (`--config`), overridden by environment variables
/// named CARETWIN_EDGE__<FIELD> (e.g. CARETWIN_EDGE__SITE_ID=store-42).
/// Logs go to stderr; RUST_LOG sets the filter (default: info).
///
#[derive(Parser)]
#[command(name = "caretwin-edge", version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, env = "CARETWIN_EDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge: accept device readings into the durable outbox (from the built-in
    /// simulator when `simulator` is configured), act locally on safety alarms, and sync
    /// with the cluster over QUIC with mutual TLS, reconnecting until Ctrl-C or SIGTERM.
    Run,
    /// Check the configuration and print it as it takes effect (file, then environment
    /// overrides) as TOML. Exits non-zero with the reason if it is invalid.
    Config,
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
    let text = match &cli.config {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read configuration {}", p.display()))?,
        None => String::new(),
    };
    let config = EdgeConfig::load(&text, std::env::vars())?;
    match cli.command {
        Command::Config => print!("{}", toml::to_string(&config)?),
        Command::Run => caretwin_edge::node::run(config, shutdown_signal()).await?,
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled: a SIGTERM that arrives while the node is still starting
/// must stop it cleanly too, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        let term = async {
            match term {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            () = term => {},
        }
        tracing::info!("shutdown requested");
    }
}
