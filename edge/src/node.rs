//! The edge node's lifecycle: the outbox, the device adapters, the sync client.
//!
//! This is the I/O edge of the edge node: it owns the clock, the outbox on disk, the
//! simulator's pacing and the QUIC endpoint.
//!
//! Safety first: an alarm from a device is acted on locally at once (the catalogue's
//! `local_actions` for that alarm: a siren, closing a water valve) and recorded with the
//! action taken, whether or not the cluster can be reached; it reaches the cluster when
//! the link allows.

use crate::config::EdgeConfig;
use crate::error::{Error, Result};
use crate::outbox::{FieldValue, Item, ItemKind, Outbox, OutboxConfig};
use crate::sim::{SimConfig, SimOutput, Simulator};
use crate::sync::client::{ClientSettings, Downlink, SyncClient};
use caretwin_actors::catalogue::Catalogue;
use caretwin_actors::host::clock::{Clock, SystemClock};
use caretwin_actors::twins::device::ItemKind as DeviceKind;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// How often the simulator is advanced.
const SIM_STEP: Duration = Duration::from_millis(100);

/// A running edge node: its outbox, adapters and sync client.
pub struct Edge {
    outbox: Arc<Outbox>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Runs the edge until `shutdown` resolves (see [`Edge::start`]).
pub async fn run(
    config: EdgeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    Edge::start(config, Arc::new(SystemClock))
        .await?
        .run_until(shutdown)
        .await
}

impl Edge {
    /// What the outbox holds and has taken since the edge started.
    pub fn stats(&self) -> crate::outbox::OutboxStats {
        self.outbox.stats()
    }

    /// Serves until `shutdown` resolves, then stops; returns early if the edge fails.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::select! {
            () = shutdown => self.stop().await,
            r = &mut self.task => r?,
        }
    }

    /// Stops the edge: the sync session ends, the adapters stop, the outbox is closed with
    /// everything accepted kept on disk.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }

    /// Starts the edge: opens its outbox, starts the device adapters (HTTP, MQTT, the
    /// simulator) and the sync client. Device time comes from `clock` (the wall clock, or
    /// the demo's scaled clock shared with the cluster).
    pub async fn start(config: EdgeConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        config.validate().map_err(Error::Config)?;
        let outbox = Arc::new(Outbox::open(&OutboxConfig {
            limit_bytes: config.outbox_limit_mib * 1024 * 1024,
            ..OutboxConfig::at(config.data_dir.join("outbox"))
        })?);
        let catalogue = Arc::new(Catalogue::builtin());
        let new_items = Arc::new(Notify::new());
        let (cmd_tx, cmd_rx) = mpsc::channel::<Downlink>(1024);

        let client_config =
            crate::sync::tls::client_config_from_files(&config.ca, &config.cert, &config.key)?;
        // One endpoint per address family (quinn's advice: dual-stack sockets differ by
        // platform): IPv4 always, IPv6 where the machine has it. Each node's address is
        // resolved at every attempt and dialled with the endpoint of its family.
        let v4 = SocketAddr::from(([0, 0, 0, 0], 0));
        let endpoint = crate::sync::transport::client_endpoint(v4, client_config.clone())?;
        let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
        let endpoint_v6 = match crate::sync::transport::client_endpoint(v6, client_config) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::debug!(error = %e, "no IPv6 endpoint; IPv4 only");
                None
            }
        };
        let mut client = SyncClient::new(
            ClientSettings {
                site_id: config.site_id.clone(),
                nodes: config.cluster_addrs.clone(),
                server_name: config.server_name.clone(),
                max_backoff: Duration::from_secs(5),
                compress: config.compress,
            },
            endpoint.clone(),
            outbox.clone(),
            new_items.clone(),
            cmd_tx,
        )
        .with_known_nodes(config.data_dir.join("cluster-nodes"))
        .with_clock(clock.clone());
        if let Some(e) = &endpoint_v6 {
            client = client.with_endpoint(e.clone());
        }

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let http = match config.http_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::io(format!("cannot listen for HTTP on {addr}"), e))?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| Error::io("no local address", e))?;
                tracing::info!(addr = %bound, "HTTP ingest listening");
                let app = crate::http::router(outbox.clone(), new_items.clone());
                let mut stop = stop_rx.clone();
                Some(tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop.changed().await;
                        })
                        .await
                }))
            }
            None => None,
        };
        let mqtt = match config.mqtt_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::io(format!("cannot listen for MQTT on {addr}"), e))?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| Error::io("no local address", e))?;
                tracing::info!(addr = %bound, "MQTT ingest listening");
                let mut stop = stop_rx.clone();
                Some(tokio::spawn(crate::mqtt::serve(
                    listener,
                    outbox.clone(),
                    new_items.clone(),
                    async move {
                        let _ = stop.changed().await;
                    },
                )))
            }
            None => None,
        };
        let adapters = match &config.simulator {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::io(
                        format!("cannot read simulator config {}", path.display()),
                        e,
                    )
                })?;
                let sim_config = SimConfig::from_toml(&text)?;
                let sim = Simulator::new(&catalogue, &sim_config, clock.now_ms())?;
                tracing::info!(devices = sim.len(), "simulator started");
                let task = simulate(
                    sim,
                    catalogue.clone(),
                    outbox.clone(),
                    Wake {
                        new_items: new_items.clone(),
                        progress: client.command_progress(),
                    },
                    cmd_rx,
                    Pace {
                        clock: clock.clone(),
                        simulate_for: config.simulate_for,
                    },
                    stop_rx.clone(),
                );
                Some(tokio::spawn(task))
            }
            None => None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let box_ = outbox.clone();
        let task = tokio::spawn(async move {
            client
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
            let _ = stop_tx.send(true);
            if let Some(a) = adapters {
                a.await??;
            }
            if let Some(h) = http {
                h.await?.map_err(|e| Error::io("HTTP ingest failed", e))?;
            }
            if let Some(m) = mqtt {
                m.await?;
            }
            // Flush the close, so the cluster ends the session now rather than after its
            // timeout.
            for e in std::iter::once(&endpoint).chain(&endpoint_v6) {
                e.close(quinn::VarInt::from_u32(0), b"edge shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
            }
            tracing::info!(backlog = box_.stats().backlog_items, "edge stopped");
            Ok(())
        });
        Ok(Self { outbox, stop, task })
    }
}

/// Whom a device adapter wakes: the sync client, for new items and for commands that
/// reached their device.
struct Wake {
    new_items: Arc<Notify>,
    progress: Arc<Notify>,
}

/// The simulator's time: device time from `clock`, generating for `simulate_for` of it.
struct Pace {
    clock: Arc<dyn Clock>,
    simulate_for: Option<Duration>,
}

/// The simulator as a device adapter: readings into the outbox, commands to the devices.
async fn simulate(
    mut sim: Simulator,
    catalogue: Arc<Catalogue>,
    outbox: Arc<Outbox>,
    wake: Wake,
    mut commands: mpsc::Receiver<Downlink>,
    pace: Pace,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let Wake {
        new_items,
        progress,
    } = wake;
    let models: std::collections::HashMap<String, String> = sim
        .devices()
        .map(|(d, m)| (d.to_owned(), m.to_owned()))
        .collect();
    let Pace {
        clock,
        simulate_for,
    } = pace;
    let started = clock.now_ms();
    let until = simulate_for.map(|d| started + d.as_millis() as u64);
    let mut step = tokio::time::interval(SIM_STEP);
    let mut drained_said = false;
    // Desired versions each simulated device holds.
    let mut applied: std::collections::HashMap<String, std::collections::HashMap<String, u64>> =
        std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            Some(down) = commands.recv() => {
                let now = clock.now_ms();
                match down {
                    Downlink::Command(cmd) => {
                        // Handed to the device: recorded, then the cluster is told. Not if
                        // it ended meanwhile (cancelled by the cluster): it never runs.
                        let handed = match outbox
                            .set_command_state(&cmd.command_id, crate::outbox::CommandState::DeliveredToDevice)
                            .await
                        {
                            Ok(handed) => handed,
                            // Ended and already forgotten (cancelled, its result acknowledged).
                            Err(crate::outbox::OutboxError::UnknownCommand { .. }) => false,
                            Err(e) => return Err(e.into()),
                        };
                        if !handed {
                            tracing::info!(command = %cmd.command_id, device = %cmd.device, "command ended before the device got it");
                            continue;
                        }
                        progress.notify_one();
                        if let Some(out) = sim.command(&cmd.device, &cmd.command_id, &cmd.name, now) {
                            accept(&outbox, &catalogue, &models, vec![out]).await?;
                            new_items.notify_waiters();
                        }
                    }
                    Downlink::Desired { device, fields } => {
                        // Simulated devices take any configuration at once and report it.
                        let held = applied.entry(device.clone()).or_default();
                        let mut items: Vec<Item> = Vec::new();
                        for (field, value, version) in fields {
                            if held.get(&field).is_some_and(|h| version <= *h) {
                                continue;
                            }
                            held.insert(field.clone(), version);
                            let kind = ItemKind::Reported { field, value: FieldValue::Text(value) };
                            items.push(Item::new(device.clone(), now, kind));
                        }
                        if !items.is_empty() && models.contains_key(&device) {
                            outbox.accept(items).await?;
                            new_items.notify_waiters();
                        }
                    }
                }
            }
            _ = step.tick() => {
                let now = clock.now_ms();
                if until.is_none_or(|u| now < u) {
                    let out = sim.advance(until.map_or(now, |u| now.min(u)));
                    if !out.is_empty() {
                        accept(&outbox, &catalogue, &models, out).await?;
                        new_items.notify_waiters();
                    }
                } else if !drained_said && outbox.stats().backlog_items == 0 {
                    // Everything generated is in the cluster: tests and demos wait for this.
                    tracing::info!("outbox drained");
                    drained_said = true;
                }
            }
        }
    }
}

/// Turns device output into outbox items, acting on alarms locally first.
async fn accept(
    outbox: &Outbox,
    catalogue: &Catalogue,
    models: &std::collections::HashMap<String, String>,
    outputs: Vec<SimOutput>,
) -> Result<()> {
    let items = outputs
        .into_iter()
        .map(|o| {
            let kind = match o.kind {
                DeviceKind::Reading { signal, value } => ItemKind::Reading { signal, value },
                DeviceKind::Alarm { kind, .. } => {
                    let actions = models
                        .get(&o.device)
                        .and_then(|m| catalogue.model(m))
                        .and_then(|m| m.alarm(&kind))
                        .map(|a| a.local_actions.join(","))
                        .unwrap_or_default();
                    // The local rule: act now, whatever the link.
                    tracing::warn!(device = %o.device, alarm = %kind, local_action = %actions, "SAFETY ALARM: acting locally");
                    ItemKind::Alarm {
                        kind,
                        local_action: (!actions.is_empty()).then_some(actions),
                    }
                }
                DeviceKind::Diagnostic { code } => ItemKind::Diagnostic {
                    code,
                    text: String::new(),
                },
                DeviceKind::Question { question_id } => ItemKind::Question { question_id },
                DeviceKind::CommandResult {
                    command_id,
                    succeeded,
                    expired,
                    cancelled,
                    detail,
                } => ItemKind::CommandResult {
                    command_id,
                    succeeded,
                    expired,
                    cancelled,
                    detail,
                },
                DeviceKind::Reported { fields } => {
                    let (field, value) = fields.into_iter().next().unwrap_or_default();
                    ItemKind::Reported {
                        field,
                        value: FieldValue::Text(value),
                    }
                }
            };
            Item::new(o.device, o.ts_ms, kind)
        })
        .collect();
    match outbox.accept(items).await {
        Ok(_) => Ok(()),
        // The outbox is full: the device is told (here, the log says so) and the readings
        // are not taken; nothing accepted earlier is lost.
        Err(crate::outbox::OutboxError::Full { used, limit }) => {
            tracing::warn!(used, limit, "outbox full: readings refused");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
