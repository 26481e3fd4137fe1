//! `caretwin-cluster`: parses flags, reads the configuration, calls the library.

use anyhow::Context;
use caretwin_actors::rul::{self, FitOptions, RulModel};
use caretwin_actors::store::{Key, Op, WriteBatch};
use caretwin_cluster::sync::dev;
use caretwin_cluster::sync::tls::SiteIdentity;
use caretwin_cluster::{ClusterConfig, node, replay};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
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
    /// Fit a remaining-useful-life model to run-to-failure records and print its
    /// parameters as a TOML table: the `params` of a catalogue entry's RUL section.
    Fit {
        /// Format of the training file.
        #[arg(long, value_enum)]
        format: DataFormat,
        /// Run-to-failure records: every unit's last row is the cycle it failed in.
        train: PathBuf,
        /// Write the table to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also score the fit by K-fold cross-validation over engines held out of
        /// fitting (each cut at a random cycle, as in the test files), printed to stderr.
        #[arg(long, default_value_t = 0)]
        cv_folds: usize,
        /// Cross-validate with seeds 1..=N (fold split and cut points) and report the
        /// median.
        #[arg(long, default_value_t = 1)]
        cv_seeds: u64,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Replay recorded cycles through a remaining-useful-life estimator per unit, in
    /// virtual time (cycle n at n hours after 2026-01-01), and print
    /// `unit,last_cycle,predicted_rul` for every unit at its last cycle.
    Replay {
        /// Format of the files.
        #[arg(long, value_enum)]
        format: DataFormat,
        /// Fit the model from these run-to-failure records first.
        #[arg(long, conflicts_with = "params")]
        train: Option<PathBuf>,
        /// Fitted parameters: the table `fit` writes, or a catalogue entry holding
        /// `[rul.params]`. Without this or --train, the built-in catalogue's turbofan
        /// parameters are used.
        #[arg(long)]
        params: Option<PathBuf>,
        /// The recording to replay.
        test: PathBuf,
        #[command(flatten)]
        tuning: Tuning,
    },
    /// Write a development PKI for the edge sync: a CA (`ca.pem`, `ca.dev-only.key`), the
    /// cluster's server certificate (`cluster.pem`, `cluster.key`) and one client
    /// certificate per site (`site-<id>.pem`, `site-<id>.key`, `:` written as `+`).
    /// Refuses to overwrite files without --force; with an existing CA in the directory,
    /// issues the new sites with it. For development and tests only.
    Dev {
        /// Directory to write to; created if missing.
        #[arg(long)]
        out: PathBuf,
        /// A site to issue a client certificate for, `tenant:site` (repeat for more).
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
        /// Name edges dial the cluster by (a DNS name or IP address); the server
        /// certificate also covers localhost and 127.0.0.1.
        #[arg(long, default_value = "localhost")]
        cluster_name: String,
        /// Replace existing files, including the CA.
        #[arg(long)]
        force: bool,
    },
    /// Mint an integrator token for the gRPC endpoint: prints the token (give it to the
    /// integrator; it is not stored) and appends its entry (a SHA-256, the tenant, the
    /// scopes) to the tokens file, creating it if missing.
    Token {
        /// A name for logs, for example crm-eu.
        #[arg(long)]
        name: String,
        /// The tenant the token acts for.
        #[arg(long)]
        tenant: String,
        /// A scope to grant (repeat for more): twins:read, twins:write, customers:read,
        /// customers:pii, customers:write, customers:export, customers:erase, cases:read,
        /// cases:handle, work:read, work:write, parts:write, commands:read,
        /// commands:write, catalogue:read, notifications:gateway, admin.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// The tokens file; the configuration's `grpc.tokens` when absent.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// Formats of recorded run data.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DataFormat {
    /// NASA C-MAPSS text: `unit cycle setting1..3 s1..s21` per row.
    Cmapss,
}

/// Fitting knobs; each defaults to `caretwin_actors::rul::FitOptions::default()`.
#[derive(clap::Args)]
struct Tuning {
    /// Boosted trees.
    #[arg(long)]
    trees: Option<usize>,
    /// Levels per tree.
    #[arg(long)]
    depth: Option<usize>,
    /// Shrinkage of each tree.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// RUL cap of the training target, in cycles.
    #[arg(long)]
    cap: Option<f64>,
    /// Seed of the fit.
    #[arg(long)]
    seed: Option<u64>,
}

impl Tuning {
    fn options(&self) -> FitOptions {
        let d = FitOptions::default();
        FitOptions {
            trees: self.trees.unwrap_or(d.trees),
            depth: self.depth.unwrap_or(d.depth),
            learning_rate: self.learning_rate.unwrap_or(d.learning_rate),
            cap: self.cap.unwrap_or(d.cap),
            seed: self.seed.unwrap_or(d.seed),
            ..d
        }
    }
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
        Command::Fit {
            format: DataFormat::Cmapss,
            train,
            out,
            cv_folds,
            cv_seeds,
            tuning,
        } => fit(
            &train,
            out.as_deref(),
            cv_folds,
            cv_seeds,
            &tuning.options(),
        )?,
        Command::Replay {
            format: DataFormat::Cmapss,
            train,
            params,
            test,
            tuning,
        } => {
            replay_cmd(
                train.as_deref(),
                params.as_deref(),
                &test,
                &tuning.options(),
            )
            .await?
        }
        Command::Dev {
            out,
            sites,
            cluster_name,
            force,
        } => dev(out, &sites, cluster_name, force)?,
        Command::Token {
            name,
            tenant,
            scopes,
            file,
        } => token(&name, &tenant, &scopes, &file.unwrap_or(config.grpc.tokens))?,
    }
    Ok(())
}

fn dev(out: PathBuf, sites: &[String], cluster_name: String, force: bool) -> anyhow::Result<()> {
    let sites = sites
        .iter()
        .map(|s| SiteIdentity::new(s.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let files = dev::generate(&dev::DevPki {
        out,
        cluster_name,
        sites,
        force,
    })?;
    for file in files {
        let action = match file.action {
            dev::FileAction::Written => "wrote",
            dev::FileAction::Kept => "kept ",
        };
        println!("{action} {}: {}", file.path.display(), file.what);
    }
    Ok(())
}

fn token(
    name: &str,
    tenant: &str,
    scopes: &[String],
    file: &std::path::Path,
) -> anyhow::Result<()> {
    use caretwin_cluster::grpc::auth::{Scope, Tokens, TokensFile, mint};
    let scopes = scopes
        .iter()
        .map(|s| Scope::parse(s).ok_or_else(|| anyhow::anyhow!("unknown scope {s:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (token, entry) = mint(name, tenant, scopes);
    let mut tokens: TokensFile = if file.exists() {
        toml::from_str(&std::fs::read_to_string(file)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
    } else {
        TokensFile::default()
    };
    tokens.tokens.push(entry);
    let text = toml::to_string(&tokens)?;
    // Every entry is checked before anything is written.
    Tokens::from_toml(&text, &file.display().to_string())?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(file, text)?;
    eprintln!(
        "added token {name:?} for tenant {tenant} to {}",
        file.display()
    );
    println!("{token}");
    Ok(())
}

async fn check_store(config: &ClusterConfig) -> anyhow::Result<()> {
    let store = caretwin_cluster::store::open(&config.store).await?;
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

fn read_cmapss(path: &Path) -> anyhow::Result<Vec<replay::CycleRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    replay::parse_cmapss(&text).with_context(|| format!("{}", path.display()))
}

fn fit_model(runs: &[rul::TrainingRun], options: &FitOptions) -> anyhow::Result<RulModel> {
    let started = Instant::now();
    let model = rul::fit(runs, options)?;
    tracing::info!(
        units = runs.len(),
        cycles = runs.iter().map(|r| r.readings.len()).sum::<usize>(),
        trees = model.trees(),
        parameters = model.parameter_count(),
        secs = started.elapsed().as_secs_f64(),
        "rul model fitted"
    );
    Ok(model)
}

fn fit(
    train: &Path,
    out: Option<&Path>,
    cv_folds: usize,
    cv_seeds: u64,
    options: &FitOptions,
) -> anyhow::Result<()> {
    let runs = replay::training_runs(&read_cmapss(train)?);
    if cv_folds > 0 {
        let mut scores = Vec::new();
        for seed in 1..=cv_seeds.max(1) {
            let v = rul::cross_validate(&runs, options, cv_folds, seed)?;
            eprintln!(
                "cross-validation seed {seed}: {} folds, {} held-out engines, rmse {:.2}, phm08 {:.1}",
                v.folds,
                v.holdouts.len(),
                v.rmse,
                v.phm08
            );
            scores.push((v.rmse, v.phm08));
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n.is_multiple_of(2) {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            } else {
                v[n / 2]
            }
        };
        eprintln!(
            "cross-validation median over {} seeds: rmse {:.2} (range {:.2}..{:.2}), phm08 {:.1}",
            scores.len(),
            median(scores.iter().map(|s| s.0).collect()),
            scores.iter().map(|s| s.0).fold(f64::INFINITY, f64::min),
            scores.iter().map(|s| s.0).fold(0.0, f64::max),
            median(scores.iter().map(|s| s.1).collect()),
        );
    }
    let model = fit_model(&runs, options)?;
    let table = format!(
        "# RUL model fitted by `caretwin-cluster fit` from {}: {} trees of depth {}, cap {} cycles.\n\
         # The `params` table of a turbofan catalogue entry's RUL section.\n[rul.params]\n{}",
        train.file_name().map_or_else(
            || train.display().to_string(),
            |n| n.to_string_lossy().into_owned()
        ),
        model.trees(),
        model.params().depth,
        model.cap(),
        model.to_toml()
    );
    match out {
        Some(path) => std::fs::write(path, table)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{table}"),
    }
    Ok(())
}

async fn replay_cmd(
    train: Option<&Path>,
    params: Option<&Path>,
    test: &Path,
    options: &FitOptions,
) -> anyhow::Result<()> {
    let model = match (train, params) {
        (Some(train), _) => fit_model(&replay::training_runs(&read_cmapss(train)?), options)?,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            replay::rul_model_from_toml(&text).with_context(|| format!("{}", path.display()))?
        }
        (None, None) => replay::builtin_rul_model()?
            .context("no fitted RUL parameters: pass --train or --params")?,
    };
    let rows = read_cmapss(test)?;
    let bar = ProgressBar::with_draw_target(Some(rows.len() as u64), ProgressDrawTarget::stderr())
        .with_style(
            ProgressStyle::with_template("replay {bar:40} {pos}/{len} cycles {per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    // Through real twins: one hosted device twin per engine, in virtual time.
    let mut sink = replay::TwinSink::start(model).await?;
    let started = Instant::now();
    let results = replay::replay(&rows, &mut sink, |n| bar.set_position(n as u64)).await;
    sink.close().await;
    let results = results?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        cycles = rows.len(),
        units = results.len(),
        secs,
        cycles_per_sec = (rows.len() as f64 / secs.max(1e-9)).round(),
        "replay done"
    );
    print!("{}", replay::to_csv(&results));
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
