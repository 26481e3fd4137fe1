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
    /// Run the whole system in one process, in fast time: a cluster node on the embedded
    /// store, homes with simulated devices syncing over QUIC, and a human agents' desk
    /// subscribed to cases over gRPC. Shows predictions, remote remedies, part orders,
    /// visits and handed-off cases as they happen, then a summary. Ctrl-C ends it.
    Demo {
        /// How long the devices run, in real time (`30s`, `2m`).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// How much faster than real time the shared clock runs (3600: an hour a second).
        #[arg(long, default_value_t = 3600.0)]
        speed: f64,
        /// Homes, each with a customer and five devices.
        #[arg(long, default_value_t = 2)]
        sites: usize,
        /// Keep the store, certificates and outboxes here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print nothing while running; print one JSON object with the counts at the end.
        #[arg(long)]
        json: bool,
    },
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
    /// Run a command in a network namespace of its own and cut it off from this machine
    /// for a while: every packet between them dropped, both ways, nobody told — a real
    /// partition of one process (a cluster node, say). Inside, it reaches the machine only
    /// at the host-side address printed at the start (bind what it must reach there, or
    /// on 0.0.0.0), and is reached at the namespace's. Needs root, `ip` and `nft`; the
    /// namespace and its rules are removed at the end. Exits with the command's status.
    Partition {
        /// Cut after this long (`10s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        cut_after: std::time::Duration,
        /// Heal this long after the cut (`20s`); without it the cut lasts until the end.
        #[arg(long, value_parser = humantime::parse_duration)]
        heal_after: Option<std::time::Duration>,
        /// The command and its arguments, after `--`.
        #[arg(required = true, last = true)]
        command: Vec<String>,
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
    // The demo talks to a person on stdout: its parts only log problems.
    let quiet = std::env::args().nth(1).is_some_and(|a| a == "demo");
    let default_filter = if quiet {
        "error"
    } else {
        "info,fjall=warn,lsm_tree=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
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
        Command::Demo {
            duration,
            speed,
            sites,
            dir,
            json,
        } => {
            let options = caretwin_chaos::demo::DemoOptions {
                duration,
                speed,
                sites,
                dir,
            };
            return demo(options, json).await;
        }
        Command::Config => print!("{}", toml::to_string(&config)?),
        Command::Partition {
            cut_after,
            heal_after,
            command,
        } => return partition(cut_after, heal_after, &command).await,
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

/// Runs `command` in a new namespace, cuts it after `cut_after` and heals it `heal_after`
/// later; an error when the command failed.
async fn partition(
    cut_after: std::time::Duration,
    heal_after: Option<std::time::Duration>,
    command: &[String],
) -> anyhow::Result<bool> {
    let mut ns = caretwin_chaos::netns::Netns::create_unique("ctc")?;
    println!(
        "partition: namespace {}; inside at {}, the machine at {}",
        ns.name(),
        ns.ns_addr(),
        ns.host_addr()
    );
    let mut cmd = ns.command(&command[0]);
    cmd.args(&command[1..]);
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {:?}", command[0]))?;
    let cut = tokio::time::sleep(cut_after);
    let heal = tokio::time::sleep(cut_after + heal_after.unwrap_or_default());
    tokio::pin!(cut, heal);
    let (mut was_cut, mut healed) = (false, false);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            () = &mut cut, if !was_cut => {
                ns.cut()?;
                was_cut = true;
                println!("partition: cut");
            }
            () = &mut heal, if was_cut && !healed && heal_after.is_some() => {
                ns.heal()?;
                healed = true;
                println!("partition: healed");
            }
            _ = tokio::signal::ctrl_c() => {
                child.kill().await?;
                break child.wait().await?;
            }
        }
    };
    anyhow::ensure!(status.success(), "the command failed ({status})");
    println!("partition: the command ended ({status})");
    Ok(true)
}

/// Runs the demo, printing what happens (or, with `json`, only the counts at the end);
/// `Ok(false)` when an effect was taken twice.
async fn demo(options: caretwin_chaos::demo::DemoOptions, json: bool) -> anyhow::Result<bool> {
    use caretwin_chaos::demo::{Event, hours_since};
    let start =
        caretwin_actors::host::clock::Clock::now_ms(&caretwin_actors::host::clock::SystemClock);
    if !json {
        println!(
            "CareTwin demo: {} homes, {} s of real time at {}x ({:.0} h of device time). Ctrl-C ends it.\n",
            options.sites,
            options.duration.as_secs(),
            options.speed,
            options.duration.as_secs_f64() * options.speed / 3600.0
        );
    }
    // Ctrl-C (or SIGTERM) ends the demo early, cleanly, with its summary.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let ctrl_c = async move {
        let term = async {
            match term {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            () = term => {},
        }
    };
    let summary = caretwin_chaos::demo::run(options, ctrl_c, |e| {
        if json {
            return;
        }
        let h = |at: u64| format!("[{:>6.1} h]", hours_since(start, at));
        match e {
            Event::Prediction { at_ms, case_id, device, mode, insight } => {
                println!("{} PREDICTION  {device}: {mode} — {insight} (case {case_id})", h(*at_ms));
            }
            Event::Action { at_ms, case_id, what } => {
                println!("{}   action    {case_id}: {what}", h(*at_ms));
            }
            Event::PartOrder { at_ms, key, part_number, state } => {
                println!("{} PART ORDER  {part_number} — {state} (key {key})", h(*at_ms));
            }
            Event::Appointment { at_ms, key, technician, start_ms, work_order } => {
                println!(
                    "{} VISIT       {technician} booked for +{:.1} h, work order {work_order} (key {key})",
                    h(*at_ms),
                    hours_since(start, *start_ms)
                );
            }
            Event::Notification { at_ms, customer, text } => {
                println!("{} NOTIFY      {customer}: {text}", h(*at_ms));
            }
            Event::DeskCase { at_ms, case } => {
                let cause = case.root_cause.as_ref();
                println!(
                    "{} DESK        case {} ({:?}) for {}: {}",
                    h(*at_ms),
                    case.case_id,
                    case.priority(),
                    case.customer.as_ref().map_or("?", |c| c.customer_id.as_str()),
                    case.handoff_detail
                );
                if let Some(c) = cause {
                    println!("              root cause {} on {} (confidence {:.2})", c.failure_mode_id, c.device_id, c.confidence);
                }
                for d in &case.devices {
                    println!("              device {} {} health {:.2}", d.device_id, d.model_id, d.health_index);
                }
                for i in &case.insights {
                    println!("              insight {:?} {} {}", i.kind(), i.signal, i.message);
                }
                for a in &case.actions {
                    println!("              tried {}", a.description);
                }
                if let Some(s) = &case.suggested_next_step {
                    println!("              next step: {}", s.description);
                }
            }
        }
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("\nSummary");
        println!(
            "  simulated        {:.0} h on {} devices at {} homes",
            summary.simulated_hours, summary.devices, summary.sites
        );
        println!(
            "  readings         {} accepted at the edges, {} applied by the twins, {} withheld (no consent), {} pending",
            summary.readings_accepted,
            summary.readings_applied,
            summary.readings_withheld,
            summary.readings_pending
        );
        println!("  predictions      {} cases opened", summary.predictions);
        println!("  part orders      {}", summary.part_orders);
        println!(
            "  work orders      {} ({} visits booked)",
            summary.work_orders, summary.appointments
        );
        println!("  notifications    {}", summary.notifications);
        println!(
            "  handed off       {} cases; the desk received {}",
            summary.cases_handed_off, summary.cases_received_by_desk
        );
        println!("  duplicate effects {}", summary.duplicate_effects);
        for d in &summary.duplicates {
            println!("    {d}");
        }
    }
    Ok(summary.duplicate_effects == 0)
}
