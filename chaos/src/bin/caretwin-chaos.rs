//! `caretwin-chaos`: parses flags, reads the configuration, runs a scenario.

use anyhow::Context;
use caretwin_chaos::config::ChaosConfig;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// CareTwin's chaos tool: runs fault scenarios against real processes and stores, and
/// checks the system's guarantees afterwards. Exits non-zero when a guarantee broke.
///
/// Configuration comes from a TOML file (`--config`), overridden by environment variables
/// named CARETWIN_CHAOS__<FIELD> (e.g. CARETWIN_CHAOS__WORK_DIR=/tmp/chaos).
/// Logs go to stderr; RUST_LOG sets the filter (default: info).
#[derive(Parser)]
#[command(name = "caretwin-chaos", version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, env = "CARETWIN_CHAOS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Kill a process writing to an embedded store with SIGKILL mid-stream, reopen the
    /// store, and check that every write it acknowledged is there, complete and once.
    CrashStore {
        /// Kill the writer after this many acknowledged writes.
        #[arg(long, default_value_t = 5_000)]
        kill_after: usize,
        /// Print the report as one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration (file, then environment overrides) as TOML.
    Config,
    /// The writer process of `crash-store`: commits writes forever and prints `ack <id>`
    /// for each acknowledged one. Started by the scenario, not by hand.
    #[command(hide = true)]
    StoreWriter {
        /// Directory of the embedded store.
        #[arg(long)]
        dir: PathBuf,
    },
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
    match real_main().await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Ok(false)` means a guarantee broke.
async fn real_main() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let text = match &cli.config {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read configuration {}", p.display()))?,
        None => String::new(),
    };
    let config = ChaosConfig::load(&text, std::env::vars())?;
    match cli.command {
        Command::Config => print!("{}", toml::to_string(&config)?),
        Command::StoreWriter { dir } => {
            caretwin_chaos::crash::store_writer(&dir, config.writers).await?;
        }
        Command::CrashStore { kill_after, json } => {
            anyhow::ensure!(kill_after > 0, "--kill-after must be at least 1");
            std::fs::create_dir_all(&config.work_dir)
                .with_context(|| format!("cannot create {}", config.work_dir.display()))?;
            let run = tempfile::Builder::new()
                .prefix("crash-store-")
                .tempdir_in(&config.work_dir)?;
            let exe = std::env::current_exe()?;
            let report = caretwin_chaos::crash::crash_store(&exe, run.path(), kill_after).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "crash-store: {} acknowledged, {} survived, {} lost, {} duplicated, {} log entries",
                    report.acknowledged,
                    report.survived,
                    report.lost.len(),
                    report.duplicated,
                    report.log_entries
                );
            }
            return Ok(report.ok());
        }
    }
    Ok(true)
}
