//! The demo: one cluster node on the embedded store, sites with simulated devices syncing
//! over QUIC, and a human agents' desk subscribed to cases over gRPC, all real parts in one
//! process, sharing a clock that runs fast (by default an hour a second), so that days of
//! wear fit in a minute.
//!
//! Every home has a coffee machine whose pump wears out (a part order, a technician's
//! visit, a case for a person), an espresso machine that uses up its descaler and water
//! filter (consumables re-ordered under a standing approval), a boiler losing pressure (a
//! remote prompt that does not help, a part and a visit), a fridge asking its owner a
//! question nobody answers, and an alarm hub that smokes.
//!
//! What it prints comes from the real parts: the customer twins' cases (predictions and
//! what was done), the parts desk's orders, the scheduler's bookings, notifications leaving
//! the cluster and the cases as the desk receives them over gRPC. The summary's counts are
//! read the same way, and `duplicate_effects` looks for any effect taken twice.

use anyhow::Context as _;
use caretwin_actors::host::clock::{Clock, ScaledClock};
use caretwin_actors::host::dispatch::{Delivery, Router};
use caretwin_actors::mail::{Body, Mail};
use caretwin_actors::model::{ConsentScope, HOUR_MS};
use caretwin_actors::policy::{Consent, Preferences};
use caretwin_actors::system::{ServicesConfig, System};
use caretwin_actors::twins::customer::{Case, CaseState, CustomerMsg, CustomerReply, Profile};
use caretwin_cluster::config::{ClusterConfig, GrpcConfig, SyncConfig};
use caretwin_cluster::grpc::auth::{Scope, TokensFile, mint};
use caretwin_cluster::node::{Node, NodeOptions};
use caretwin_cluster::store::StoreConfig;
use caretwin_cluster::sync::dev::{DevPki, generate};
use caretwin_cluster::sync::tls::SiteIdentity;
use caretwin_edge::config::EdgeConfig;
use caretwin_edge::node::Edge;
use caretwin_proto::v1;
use caretwin_proto::v1::case_service_client::CaseServiceClient;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The demo's tenant.
const TENANT: &str = "t1";

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the sites generate readings, in real time.
    pub duration: Duration,
    /// How much faster than real time the shared clock runs.
    pub speed: f64,
    /// Homes, each with its customer and five devices.
    pub sites: usize,
    /// Where the node's store, certificates and outboxes go (a temporary directory, removed
    /// at the end, when `None`).
    pub dir: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(60),
            speed: 3600.0,
            sites: 2,
            dir: None,
        }
    }
}

/// Something a person watching the demo should see.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A customer twin opened a case from a device twin's insight.
    Prediction {
        /// Device time.
        at_ms: u64,
        /// The case.
        case_id: String,
        /// The device.
        device: String,
        /// The failure mode.
        mode: String,
        /// What the device twin concluded.
        insight: String,
    },
    /// A case took a step (a remote command, an order, a booking, a handoff).
    Action {
        /// Device time.
        at_ms: u64,
        /// The case.
        case_id: String,
        /// What was done.
        what: String,
    },
    /// The parts desk placed an order.
    PartOrder {
        /// Device time.
        at_ms: u64,
        /// The order's idempotency key.
        key: String,
        /// The part.
        part_number: String,
        /// Where it stands.
        state: String,
    },
    /// The scheduler booked a visit.
    Appointment {
        /// Device time.
        at_ms: u64,
        /// The booking's key.
        key: String,
        /// The technician.
        technician: String,
        /// When the visit starts.
        start_ms: u64,
        /// The work order.
        work_order: String,
    },
    /// A notification left the cluster for the customer.
    Notification {
        /// Device time.
        at_ms: u64,
        /// The customer.
        customer: String,
        /// The text.
        text: String,
    },
    /// The desk received a case over gRPC.
    DeskCase {
        /// Device time.
        at_ms: u64,
        /// The case as the agent sees it.
        case: Box<v1::Case>,
    },
}

/// The counts the demo ends with (`--json` prints them as one object).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Sites (homes) that took part.
    pub sites: usize,
    /// Simulated devices.
    pub devices: usize,
    /// Device time the demo covered, hours.
    pub simulated_hours: f64,
    /// Readings the edges durably accepted from their devices.
    pub readings_accepted: u64,
    /// Readings the device twins applied.
    pub readings_applied: u64,
    /// Readings the twins set aside unused for lack of the customer's consent (0 in the
    /// demo: every customer consents before the devices speak).
    pub readings_withheld: u64,
    /// Readings still waiting at the edges at the end (0 when every one reached its twin).
    pub readings_pending: u64,
    /// Cases the customer twins opened from predictions and alarms.
    pub predictions: usize,
    /// Work orders: visits the scheduler was asked for.
    pub work_orders: usize,
    /// Part and consumable orders the parts desk took.
    pub part_orders: usize,
    /// Visits booked with a technician.
    pub appointments: usize,
    /// Notifications sent to customers.
    pub notifications: usize,
    /// Cases handed to the human agents' queue.
    pub cases_handed_off: usize,
    /// Distinct cases the desk received over gRPC.
    pub cases_received_by_desk: usize,
    /// Effects taken twice: the same part ordered twice for one case, two visits for one
    /// case, two open cases for one device and failure mode, an acknowledged case delivered
    /// to the desk as new again. Must be 0.
    pub duplicate_effects: usize,
    /// What the duplicates were, if any.
    pub duplicates: Vec<String>,
}

/// Notifications leaving the cluster: counted and shown.
struct Outside {
    clock: Arc<dyn Clock>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    sent: Mutex<BTreeSet<String>>,
}

#[async_trait::async_trait]
impl Router for Outside {
    async fn deliver(&self, mail: Mail) -> caretwin_actors::Result<Delivery> {
        if let Body::Notify { customer, text, .. } = &mail.body {
            // Mail is delivered at least once: a notification is one per mail id.
            if self.sent.lock().expect("lock").insert(mail.id.clone()) {
                let _ = self.events.send(Event::Notification {
                    at_ms: self.clock.now_ms(),
                    customer: customer.clone(),
                    text: text.clone(),
                });
            }
        }
        Ok(Delivery::Delivered)
    }
}

/// Runs the demo until its duration is over or `shutdown` resolves, calling `on_event`
/// for everything worth showing; returns the summary.
pub async fn run(
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
    mut on_event: impl FnMut(&Event),
) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        (1..=50).contains(&options.sites),
        "--sites must be between 1 and 50"
    );
    anyhow::ensure!(
        options.speed.is_finite() && (1.0..=100_000.0).contains(&options.speed),
        "--speed must be between 1 and 100000"
    );
    let temp = tempfile::Builder::new()
        .prefix("caretwin-demo-")
        .tempdir()?;
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let sites: Vec<Site> = (1..=options.sites).map(Site::new).collect();

    // Certificates for the node and every site, and the desk's token.
    let certs = dir.join("certs");
    generate(&DevPki {
        out: certs.clone(),
        cluster_name: "localhost".into(),
        sites: sites
            .iter()
            .map(|s| SiteIdentity::new(&s.id))
            .collect::<Result<_, _>>()?,
        force: true,
    })?;
    let (token, entry) = mint(
        "demo-desk",
        TENANT,
        vec![Scope::CasesRead, Scope::CasesHandle, Scope::TwinsRead],
    );
    let tokens = certs.join("tokens.toml");
    std::fs::write(
        &tokens,
        toml::to_string(&TokensFile {
            tokens: vec![entry],
        })?,
    )?;
    let provision = dir.join("devices.toml");
    std::fs::write(&provision, provisioning(&sites))?;

    let clock: Arc<ScaledClock> = Arc::new(ScaledClock::new(
        caretwin_actors::host::clock::SystemClock.now_ms(),
        options.speed,
    ));
    let start_ms = clock.now_ms();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let outside = Arc::new(Outside {
        clock: clock.clone(),
        events: events_tx.clone(),
        sent: Mutex::new(BTreeSet::new()),
    });
    let config = ClusterConfig {
        store: StoreConfig::embedded_at(dir.join("data")),
        sync: SyncConfig {
            listen: "127.0.0.1:0".parse()?,
            ca: certs.join("ca.pem"),
            cert: certs.join("cluster.pem"),
            key: certs.join("cluster.key"),
            ..SyncConfig::default()
        },
        grpc: GrpcConfig {
            listen: "127.0.0.1:0".parse()?,
            tokens,
            ..Default::default()
        },
        services: toml::from_str::<ServicesConfig>(SERVICES)?,
        provision: Some(provision),
        tick: Duration::from_millis(100),
        ..ClusterConfig::default()
    };
    let node = Node::start(
        config,
        NodeOptions {
            clock: clock.clone(),
            outside,
            ..NodeOptions::default()
        },
    )
    .await
    .context("starting the cluster node")?;
    for site in &sites {
        let reply = node
            .system()
            .customers()
            .call(&site.customer, CustomerMsg::SetProfile(profile()))
            .await?;
        anyhow::ensure!(
            reply == CustomerReply::Ok,
            "customer {}: {reply:?}",
            site.customer
        );
    }
    // The customer twins tell their devices what they may use: that mail is delivered
    // before any device speaks, or their first usage readings would be set aside.
    node.system().settle(20).await?;

    // The desk connects before any device speaks: it must see every case.
    let desk = Desk::connect(node.grpc_addr(), &certs.join("ca.pem"), token).await?;
    let desk_seen = desk.seen.clone();
    let desk_task = tokio::spawn(desk.run(clock.clone(), events_tx.clone()));

    let simulate_for = Duration::from_secs_f64(options.duration.as_secs_f64() * options.speed);
    let mut edges = Vec::new();
    // Device time after which no edge generates any more.
    let mut generating_until = 0;
    for site in &sites {
        let sim = dir.join(format!("sim-{}.toml", site.home));
        std::fs::write(&sim, site.simulation())?;
        let file = site.id.replace(':', "+");
        let config = EdgeConfig {
            site_id: site.id.clone(),
            cluster_addrs: vec![node.sync_addr().to_string()],
            data_dir: dir.join(format!("edge-{}", site.home)),
            server_name: "localhost".into(),
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("site-{file}.pem")),
            key: certs.join(format!("site-{file}.key")),
            simulator: Some(sim),
            simulate_for: Some(simulate_for),
            ..EdgeConfig::default()
        };
        edges.push(
            Edge::start(config, clock.clone())
                .await
                .with_context(|| format!("starting the edge of {}", site.id))?,
        );
        generating_until = clock.now_ms() + simulate_for.as_millis() as u64;
    }

    // Watch the twins and desks until the time is up (or Ctrl-C), then let what is in
    // flight land: every edge's backlog synced, every handed-off case at the desk.
    let mut watch = Watcher::default();
    let deadline = tokio::time::Instant::now() + options.duration;
    let mut every = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    let mut interrupted = false;
    loop {
        tokio::select! {
            () = &mut shutdown => { interrupted = true; break; }
            () = tokio::time::sleep_until(deadline) => break,
            Some(e) = events.recv() => { watch.note(&e); on_event(&e); }
            _ = every.tick() => {
                for e in watch.poll(node.system(), &sites, clock.now_ms()).await? {
                    on_event(&e);
                }
            }
        }
    }
    if !interrupted {
        let settle = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut accepted_before = None;
        loop {
            while let Ok(e) = events.try_recv() {
                watch.note(&e);
                on_event(&e);
            }
            for e in watch.poll(node.system(), &sites, clock.now_ms()).await? {
                on_event(&e);
            }
            // Settled: the devices stopped, every reading reached its twin, every handed-off
            // case reached the desk.
            let backlog: u64 = edges.iter().map(|e| e.stats().backlog_items).sum();
            let accepted: u64 = edges.iter().map(|e| e.stats().readings_accepted).sum();
            let handed = watch.handed_off(node.system()).await?;
            let received = desk_seen.lock().expect("lock").len();
            let stopped = clock.now_ms() > generating_until && accepted_before == Some(accepted);
            if (stopped && backlog == 0 && received >= handed)
                || tokio::time::Instant::now() > settle
            {
                break;
            }
            accepted_before = Some(accepted);
            tokio::select! {
                () = &mut shutdown => break,
                Some(e) = events.recv() => { watch.note(&e); on_event(&e); }
                _ = every.tick() => {}
            }
        }
    }

    let supplied = node.builtin_supplier().map(|s| s.orders_placed());
    let mut summary = watch.summary(node.system(), supplied, &sites).await?;
    summary.simulated_hours = (clock.now_ms() - start_ms) as f64 / HOUR_MS as f64;
    summary.readings_accepted = edges.iter().map(|e| e.stats().readings_accepted).sum();
    summary.readings_pending = edges.iter().map(|e| e.stats().backlog_items).sum();
    summary.readings_applied = node.readings_applied();
    summary.readings_withheld = node.readings_withheld();
    {
        let seen = desk_seen.lock().expect("lock");
        summary.cases_received_by_desk = seen.len();
        for (case, n) in seen.iter().filter(|(_, n)| **n > 1) {
            summary.duplicates.push(format!(
                "case {case} delivered to the desk as new {n} times"
            ));
        }
    }
    summary.duplicate_effects = summary.duplicates.len();
    for edge in edges {
        edge.stop().await?;
    }
    desk_task.abort();
    node.stop().await?;
    drop(temp);
    Ok(summary)
}

/// One home: its site, customer and devices.
struct Site {
    home: String,
    id: String,
    customer: String,
    n: usize,
}

impl Site {
    fn new(n: usize) -> Self {
        let home = format!("home-{n}");
        Self {
            id: format!("{TENANT}:{home}"),
            customer: format!("{TENANT}:cust-{n}"),
            home,
            n,
        }
    }

    /// Device id and model of each device of the home.
    fn devices(&self) -> Vec<(String, &'static str)> {
        let n = self.n;
        vec![
            (format!("{TENANT}:coffee-{n}"), "coffee.barista-200"),
            (format!("{TENANT}:espresso-{n}"), "coffee.barista-200"),
            (format!("{TENANT}:boiler-{n}"), "boiler.combi-30"),
            (format!("{TENANT}:fridge-{n}"), "fridge.coolline-350"),
            (format!("{TENANT}:hub-{n}"), "hub.guardian-1"),
        ]
    }

    /// The edge's simulator configuration: each home a little different.
    fn simulation(&self) -> String {
        let n = self.n;
        let wear = 0.05 + 0.01 * (n % 4) as f64;
        let smoke = 2 + (n % 5);
        format!(
            r#"seed = {n}

[[devices]]
id = "{TENANT}:coffee-{n}"
model = "coffee.barista-200"
reading_interval = "10m"
profile = {{ degrading = {{ signal = "pump_current", rate_per_hour = {wear}, cured_by = [] }} }}

[[devices]]
id = "{TENANT}:espresso-{n}"
model = "coffee.barista-200"
reading_interval = "10m"
profile = {{ consumption = {{ signal = "water_through", rate_per_hour = 3.0 }} }}

[[devices]]
id = "{TENANT}:boiler-{n}"
model = "boiler.combi-30"
reading_interval = "10m"
profile = {{ degrading = {{ signal = "system_pressure", rate_per_hour = -0.06, cured_by = [] }} }}

[[devices]]
id = "{TENANT}:fridge-{n}"
model = "fridge.coolline-350"
reading_interval = "10m"

[[devices]]
id = "{TENANT}:hub-{n}"
model = "hub.guardian-1"
reading_interval = "30m"

[[events]]
device = "{TENANT}:hub-{n}"
at = "{smoke}h"
event = "smoke"

[[events]]
device = "{TENANT}:fridge-{n}"
at = "4h"
event = "question:door-seal-check"
"#
        )
    }
}

fn provisioning(sites: &[Site]) -> String {
    let mut out = String::new();
    for s in sites {
        for (id, model) in s.devices() {
            out.push_str(&format!(
                "[[devices]]\nid = \"{id}\"\nsite = \"{}\"\ncustomer = \"{}\"\nmodel = \"{model}\"\n\n",
                s.id, s.customer
            ));
        }
    }
    out
}

/// Every demo customer: in the north, consenting to diagnostics, contact and usage data
/// (consumables are predicted from usage), with standing approvals for consumables and
/// technician visits (nobody in the demo taps a confirmation, so visits are booked
/// confirmed and the cases go on to the agents at once).
fn profile() -> Profile {
    Profile {
        region: "north".into(),
        preferences: Preferences {
            standing_approvals: vec!["DESC-250".into(), "FILTER-CL".into()],
            visit_approvals: vec!["*".into()],
            ..Preferences::default()
        },
        consent: Consent::of(&[
            ConsentScope::Diagnostics,
            ConsentScope::Contact,
            ConsentScope::UsageAnalytics,
        ]),
        ..Profile::default()
    }
}

/// The desks of the demo tenant: consumables in stock, parts from the supplier, two
/// technicians who cover every skill the demo needs, every day.
const SERVICES: &str = r#"
[parts.tenant.t1]
inventory = [
  { part_number = "DESC-250", quantity = 50, local_lead_time = "6h" },
  { part_number = "FILTER-CL", quantity = 50, local_lead_time = "6h" },
]

[scheduler.tenant.t1]
slot = "30m"
horizon = "30d"
[[scheduler.tenant.t1.technicians]]
id = "tech-ana"
skills = ["coffee-service", "gas-safe", "refrigeration"]
regions = ["north"]
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "08:00"
end = "18:00"
[[scheduler.tenant.t1.technicians]]
id = "tech-ben"
skills = ["coffee-service", "gas-safe", "refrigeration"]
regions = ["north"]
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "08:00"
end = "18:00"
"#;

/// The human agents' desk: subscribed to the tenant's cases over gRPC; accepts each new
/// case and acknowledges every delivery.
struct Desk {
    cases: CaseServiceClient<Channel>,
    token: String,
    /// Case id → times it was delivered as newly handed off after being acknowledged.
    seen: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl Desk {
    async fn connect(addr: std::net::SocketAddr, ca: &Path, token: String) -> anyhow::Result<Self> {
        let ca = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        let channel = Channel::from_shared(format!("https://{addr}"))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )?
            .connect()
            .await
            .context("the desk cannot reach the gRPC endpoint")?;
        Ok(Self {
            cases: CaseServiceClient::new(channel),
            token,
            seen: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = format!("Bearer {}", self.token).parse() {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    async fn run(
        mut self,
        clock: Arc<ScaledClock>,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> anyhow::Result<()> {
        let subscribe = v1::SubscribeCasesRequest {
            subscriber_id: "demo-desk".into(),
            after_cursor: None,
            priorities: Vec::new(),
            kinds: vec![v1::CaseEventKind::HandedOff as i32],
        };
        let mut stream = self
            .cases
            .subscribe_cases(self.request(subscribe))
            .await?
            .into_inner();
        while let Some(delivery) = stream.message().await? {
            let Some(case) = delivery.case else { continue };
            let first = {
                let mut seen = self.seen.lock().expect("lock");
                let n = seen.entry(delivery.case_id.clone()).or_insert(0);
                *n += 1;
                *n == 1
            };
            if first {
                let _ = events.send(Event::DeskCase {
                    at_ms: clock.now_ms(),
                    case: Box::new(case),
                });
                let accept = v1::AcceptCaseRequest {
                    case_id: delivery.case_id.clone(),
                    agent_id: "agent-demo".into(),
                    idempotency_key: format!("accept/{}", delivery.case_id),
                };
                self.cases.accept_case(self.request(accept)).await?;
            }
            let ack = v1::AcknowledgeDeliveryRequest {
                subscriber_id: "demo-desk".into(),
                cursor: delivery.cursor,
            };
            self.cases.acknowledge_delivery(self.request(ack)).await?;
        }
        Ok(())
    }
}

/// What has been shown already, so each thing is shown once.
#[derive(Default)]
struct Watcher {
    cases: BTreeMap<String, usize>,
    orders: BTreeSet<String>,
    bookings: BTreeSet<String>,
    notifications: usize,
}

impl Watcher {
    fn note(&mut self, e: &Event) {
        if matches!(e, Event::Notification { .. }) {
            self.notifications += 1;
        }
    }

    async fn customer_cases(system: &System, customer: &str) -> anyhow::Result<Vec<Case>> {
        Ok(system
            .customers()
            .inspect(customer, |t| {
                t.map(|t| t.cases().iter().chain(t.history()).cloned().collect())
                    .unwrap_or_default()
            })
            .await?)
    }

    async fn poll(
        &mut self,
        system: &System,
        sites: &[Site],
        now: u64,
    ) -> anyhow::Result<Vec<Event>> {
        let mut out = Vec::new();
        for site in sites {
            for case in Self::customer_cases(system, &site.customer).await? {
                let shown = self.cases.entry(case.id.clone()).or_insert_with(|| {
                    let insight = case.insights.first().map_or_else(String::new, |i| {
                        format!(
                            "{:?} on {} (confidence {:.2}{})",
                            i.kind,
                            i.subject,
                            i.confidence,
                            i.eta_ms
                                .map(|eta| format!(
                                    ", failure in ~{:.0} h",
                                    eta.saturating_sub(now) as f64 / HOUR_MS as f64
                                ))
                                .unwrap_or_default()
                        )
                    });
                    out.push(Event::Prediction {
                        at_ms: now,
                        case_id: case.id.clone(),
                        device: case.device.clone(),
                        mode: case.mode.clone(),
                        insight,
                    });
                    0
                });
                for what in case.actions.iter().skip(*shown) {
                    out.push(Event::Action {
                        at_ms: now,
                        case_id: case.id.clone(),
                        what: what.clone(),
                    });
                }
                *shown = (*shown).max(case.actions.len());
            }
        }
        let orders = system
            .parts()
            .inspect(TENANT, |d| {
                d.map(|d| {
                    d.orders()
                        .map(|(k, o)| (k.to_owned(), o.part_number.clone(), o.state.clone()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .await?;
        for (key, part_number, state) in orders {
            use caretwin_actors::services::parts::OrderState;
            let placed = match &state {
                OrderState::Placed { arrives, detail } => Some(format!(
                    "placed ({detail}), arrives in ~{:.0} h",
                    arrives.map_or(0.0, |a| a.saturating_sub(now) as f64 / HOUR_MS as f64)
                )),
                OrderState::Failed { detail } => Some(format!("failed: {detail}")),
                _ => None,
            };
            if let Some(state) = placed
                && self.orders.insert(key.clone())
            {
                out.push(Event::PartOrder {
                    at_ms: now,
                    key,
                    part_number,
                    state,
                });
            }
        }
        let bookings = system
            .scheduler()
            .inspect(TENANT, |s| {
                s.map(|s| {
                    s.bookings()
                        .map(|(k, b)| (k.to_owned(), b.clone()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .await?;
        for (key, b) in bookings {
            if let (Some(technician), Some((start_ms, _))) = (b.technician, b.slot)
                && !b.cancelled
                && self.bookings.insert(key.clone())
            {
                out.push(Event::Appointment {
                    at_ms: now,
                    key,
                    technician,
                    start_ms,
                    work_order: b.detail,
                });
            }
        }
        Ok(out)
    }

    async fn handed_off(&self, system: &System) -> anyhow::Result<usize> {
        Ok(system
            .handoff()
            .inspect(TENANT, |q| q.map_or(0, |q| q.cases().count()))
            .await?)
    }

    /// The counts, read from the twins and desks, and every duplicate effect found.
    /// `supplied`: the orders the built-in supplier placed, when it serves.
    async fn summary(
        &self,
        system: &System,
        supplied: Option<u64>,
        sites: &[Site],
    ) -> anyhow::Result<Summary> {
        let mut s = Summary {
            sites: sites.len(),
            devices: sites.iter().map(|s| s.devices().len()).sum(),
            notifications: self.notifications,
            cases_handed_off: self.handed_off(system).await?,
            ..Summary::default()
        };
        // Cases: one open case per device and failure mode at a time.
        for site in sites {
            let cases = Self::customer_cases(system, &site.customer).await?;
            s.predictions += cases.len();
            let mut open: BTreeMap<(String, String), usize> = BTreeMap::new();
            for c in cases.iter().filter(|c| c.state != CaseState::Closed) {
                *open.entry((c.device.clone(), c.mode.clone())).or_default() += 1;
            }
            for ((device, mode), n) in open.into_iter().filter(|(_, n)| *n > 1) {
                s.duplicates
                    .push(format!("{n} open cases for {device} and {mode}"));
            }
        }
        // Orders: one per case and part (the key is `case/part`).
        let orders = system
            .parts()
            .inspect(TENANT, |d| {
                d.map(|d| {
                    d.orders()
                        .map(|(k, o)| (k.to_owned(), o.part_number.clone()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .await?;
        s.part_orders = orders.len();
        let mut per_case: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (key, part) in &orders {
            let case = key.rsplit_once('/').map_or(key.as_str(), |(c, _)| c);
            *per_case.entry((case.to_owned(), part.clone())).or_default() += 1;
        }
        for ((case, part), n) in per_case.into_iter().filter(|(_, n)| *n > 1) {
            s.duplicates
                .push(format!("{n} orders of {part} for case {case}"));
        }
        if let Some(placed) = supplied {
            let desk_keys = orders.len();
            if placed > desk_keys as u64 {
                s.duplicates.push(format!(
                    "the supplier placed {placed} orders for {desk_keys} desk orders"
                ));
            }
        }
        // Visits: one booked visit per case.
        let bookings = system
            .scheduler()
            .inspect(TENANT, |d| {
                d.map(|d| {
                    d.bookings()
                        .map(|(k, b)| (k.to_owned(), b.slot.is_some() && !b.cancelled))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .await?;
        s.work_orders = bookings.len();
        s.appointments = bookings.iter().filter(|(_, booked)| *booked).count();
        let mut visits: BTreeMap<String, usize> = BTreeMap::new();
        for (key, _) in bookings.iter().filter(|(_, booked)| *booked) {
            let case = key.rsplit_once('/').map_or(key.as_str(), |(c, _)| c);
            *visits.entry(case.to_owned()).or_default() += 1;
        }
        for (case, n) in visits.into_iter().filter(|(_, n)| *n > 1) {
            s.duplicates
                .push(format!("{n} visits booked for case {case}"));
        }
        Ok(s)
    }
}

/// Device time as the console shows it: hours since the demo started.
pub fn hours_since(start_ms: u64, at_ms: u64) -> f64 {
    at_ms.saturating_sub(start_ms) as f64 / HOUR_MS as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_site_simulation_and_the_desks_parse() {
        let catalogue = caretwin_actors::catalogue::Catalogue::builtin();
        for n in 1..=3 {
            let site = Site::new(n);
            let sim = caretwin_edge::sim::SimConfig::from_toml(&site.simulation()).unwrap();
            caretwin_edge::sim::Simulator::new(&catalogue, &sim, 0).unwrap();
            assert_eq!(sim.devices.len(), site.devices().len());
        }
        let services: ServicesConfig = toml::from_str(SERVICES).unwrap();
        assert_eq!(services.scheduler.tenant["t1"].technicians.len(), 2);
        let file: caretwin_cluster::node::ProvisionFile =
            toml::from_str(&provisioning(&[Site::new(1), Site::new(2)])).unwrap();
        assert_eq!(file.devices.len(), 10);
    }
}
