//! `TwinService`: device twins as integrators read, find and watch them, and set what
//! devices should be.
//!
//! # Finding twins
//! The store has no scan, so each tenant has a device index: the device twins append an
//! entry (device, site, customer, model) to one of [`DEVICE_INDEX_PAGES`] logs
//! (`device-index/<tenant>/<page>`, the page by the hash of the device id) in the same
//! batch as any change of those fields. [`Directory`] keeps a projection of a tenant's
//! pages in memory, read on first use and caught up when a page grows (the node's
//! [`Watched`](crate::store::watch::Watched) store signals appends). Identity filters
//! (site, model, customer) are answered from it; live ones (health, open insights) by
//! inspecting the candidate twins in device id order, [`INSPECT_CONCURRENCY`] at a time,
//! until the page is full or [`MAX_INSPECTED`] twins were looked at (then the page is
//! short and its token continues the search).
//!
//! # Watching twins
//! A watch registers the store keys of its twins' snapshots with the store's
//! [`SnapshotSignals`]: every committed write of one puts the twin in the stream's
//! [`Inbox`], a set, so a burst of readings costs one look. Each twin is sent at most once
//! per `min_interval_ms` (its latest state); a site watch also follows the index, so
//! devices that join the site are watched and those that leave get a final `REMOVED`.
//! The twin may be hosted on another node of the cluster: the peer channel then carries
//! the watched keys to the nodes that write them and their commits back into the inbox
//! (`crate::peer`), so a watch works the same on any node and across shard moves.

use super::auth::{Principal, Scope};
use super::convert;
use crate::store::watch::{Inbox, LogSignals, SnapshotSignals};
use caretwin_actors::host::Twin as _;
use caretwin_actors::store::Store;
use caretwin_actors::system::System;
use caretwin_actors::twins::customer::CaseState;
use caretwin_actors::twins::device::{
    DEVICE_INDEX_PAGES, DeviceIndexEntry, DeviceMsg, DeviceReply, DeviceTwin, device_index_log,
};
use caretwin_proto::v1::{self, twin_service_server::TwinService};
use futures::Stream;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

/// Twins inspected at once by a query or a watch.
pub const INSPECT_CONCURRENCY: usize = 16;
/// Most twins one query call inspects for its live filters before it returns a short page.
pub const MAX_INSPECTED: usize = 2_000;
/// Most devices one watch may name.
pub const MAX_WATCHED_DEVICES: usize = 1_000;
/// The server's minimum interval between two updates of one twin on one watch.
pub const MIN_INTERVAL_MS: u32 = 100;
/// Updates buffered per watch before the stream waits for the client (meanwhile changes
/// keep coalescing in the watch's inbox).
const STREAM_BUFFER: usize = 64;
/// Index entries read per store call while catching up.
const READ_CHUNK: usize = 10_000;

use super::internal;

/// One tenant's devices as its index tells them.
#[derive(Debug)]
struct Book {
    /// The next index of each page to read.
    next: Vec<u64>,
    /// Whether the pages were read once.
    loaded: bool,
    /// Wakes when any page of the tenant grows.
    grew: Option<tokio::sync::watch::Receiver<u64>>,
    /// Every device's latest entry, by device id.
    devices: BTreeMap<String, DeviceIndexEntry>,
    /// Site → its devices.
    by_site: HashMap<String, BTreeSet<String>>,
    /// Customer → their devices.
    by_customer: HashMap<String, BTreeSet<String>>,
}

impl Book {
    fn apply(&mut self, e: DeviceIndexEntry) {
        if let Some(old) = self.devices.get(&e.device) {
            if let Some(s) = old.site.as_ref().and_then(|s| self.by_site.get_mut(s)) {
                s.remove(&e.device);
            }
            if let Some(c) = old
                .customer
                .as_ref()
                .and_then(|c| self.by_customer.get_mut(c))
            {
                c.remove(&e.device);
            }
        }
        if let Some(s) = &e.site {
            self.by_site
                .entry(s.clone())
                .or_default()
                .insert(e.device.clone());
        }
        if let Some(c) = &e.customer {
            self.by_customer
                .entry(c.clone())
                .or_default()
                .insert(e.device.clone());
        }
        self.devices.insert(e.device.clone(), e);
    }
}

/// The projection of every tenant's device index.
pub struct Directory {
    store: Arc<dyn Store>,
    logs: Arc<LogSignals>,
    snapshots: Arc<SnapshotSignals>,
    books: std::sync::Mutex<HashMap<String, Arc<Mutex<Book>>>>,
}

impl Directory {
    /// The index in `store`; `logs` and `snapshots` must be the signals of the store the
    /// twins write through.
    pub fn new(
        store: Arc<dyn Store>,
        logs: Arc<LogSignals>,
        snapshots: Arc<SnapshotSignals>,
    ) -> Self {
        Self {
            store,
            logs,
            snapshots,
            books: Default::default(),
        }
    }

    fn family(tenant: &str) -> String {
        format!("device-index/{tenant}/")
    }

    /// The tenant's book, with everything its pages gained since the last call.
    async fn catch_up(&self, tenant: &str) -> Result<Arc<Mutex<Book>>, Status> {
        let book = self
            .books
            .lock()
            .expect("books lock")
            .entry(tenant.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Book {
                    next: vec![1; DEVICE_INDEX_PAGES as usize],
                    loaded: false,
                    grew: None,
                    devices: BTreeMap::new(),
                    by_site: HashMap::new(),
                    by_customer: HashMap::new(),
                }))
            })
            .clone();
        let mut b = book.lock().await;
        let grew = b
            .grew
            .get_or_insert_with(|| self.logs.subscribe_prefix(&Self::family(tenant)));
        // Marked seen before reading, so an append during the read is read next time.
        let changed = grew.has_changed().unwrap_or(true);
        grew.borrow_and_update();
        if b.loaded && !changed {
            return Ok(book.clone());
        }
        for page in 0..DEVICE_INDEX_PAGES {
            let log = device_index_log(tenant, page);
            loop {
                let from = b.next[page as usize];
                let entries = self
                    .store
                    .read_log(&log, from, READ_CHUNK)
                    .await
                    .map_err(internal)?;
                let Some(last) = entries.last().map(|e| e.index) else {
                    break;
                };
                for e in entries {
                    match serde_json::from_slice::<DeviceIndexEntry>(&e.value) {
                        Ok(entry) => b.apply(entry),
                        Err(err) => {
                            tracing::warn!(tenant, page, index = e.index, error = %err, "unreadable device index entry skipped");
                        }
                    }
                }
                b.next[page as usize] = last + 1;
            }
        }
        b.loaded = true;
        drop(b);
        Ok(book)
    }

    /// The devices at `site` now.
    async fn at_site(&self, tenant: &str, site: &str) -> Result<BTreeSet<String>, Status> {
        let book = self.catch_up(tenant).await?;
        let b = book.lock().await;
        Ok(b.by_site.get(site).cloned().unwrap_or_default())
    }
}

/// The gRPC face of the device twins.
#[derive(Clone)]
pub struct TwinApi {
    system: Arc<System>,
    sites_online: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    directory: Option<Arc<Directory>>,
    /// Becomes true when the node shuts down: every watch stream then ends.
    closing: Option<tokio::sync::watch::Receiver<bool>>,
}

impl TwinApi {
    /// Twins of `system`; `sites_online` says which sites have a sync session now.
    /// Without [`TwinApi::with_directory`], QueryTwins and WatchTwins are not served.
    pub fn new(
        system: Arc<System>,
        sites_online: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    ) -> Self {
        Self {
            system,
            sites_online,
            directory: None,
            closing: None,
        }
    }

    /// Finds and watches twins through `directory`.
    pub fn with_directory(mut self, directory: Arc<Directory>) -> Self {
        self.directory = Some(directory);
        self
    }

    /// Ends every watch stream when `closing` becomes true (the node's shutdown).
    pub fn with_shutdown(mut self, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        self.closing = Some(closing);
        self
    }

    fn directory(&self) -> Result<Arc<Directory>, Status> {
        self.directory
            .clone()
            .ok_or_else(|| Status::unimplemented("this node keeps no device index"))
    }

    /// The twin of `device` as the contract shows it (FULL view, with its open insights);
    /// `None` when it is not provisioned.
    async fn twin(&self, device: &str) -> Result<Option<v1::Twin>, Status> {
        look(&self.system, &(self.sites_online)(), device).await
    }
}

/// The twin of `device` as the contract shows it (FULL view, with its open insights from
/// its customer's open cases); `None` when it is not provisioned.
async fn look(
    system: &System,
    online: &[String],
    device: &str,
) -> Result<Option<v1::Twin>, Status> {
    let tenant = device.split(':').next().unwrap_or_default().to_owned();
    let online = online.to_vec();
    let twin = system
        .devices()
        .inspect(device, move |t| {
            t.filter(|t| t.model().is_some())
                .map(|t| to_twin(t, &tenant, &online, true))
        })
        .await
        .map_err(internal)?;
    let Some(mut twin) = twin else {
        return Ok(None);
    };
    twin.device_id = device.to_owned();
    if !twin.customer_id.is_empty() {
        let d = device.to_owned();
        let insights = system
            .customers()
            .inspect(&twin.customer_id, move |c| {
                c.map(|c| {
                    c.cases()
                        .iter()
                        .filter(|k| k.device == d && k.state != CaseState::Closed)
                        .flat_map(|k| k.insights.iter().cloned())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            })
            .await
            .map_err(internal)?;
        twin.open_insights = insights
            .iter()
            .enumerate()
            .map(|(n, i)| convert::insight(device, n, i))
            .collect();
    }
    Ok(Some(twin))
}

/// A FULL twin cut down to `view` (lists and watches default to SUMMARY).
fn cut(mut twin: v1::Twin, full: bool) -> v1::Twin {
    if !full {
        twin.reported.clear();
        twin.desired.clear();
        twin.delta.clear();
        twin.signals.clear();
    }
    twin
}

/// Whether the view asked for is FULL; INVALID_ARGUMENT for an unknown view.
fn full_view(view: i32, default_full: bool) -> Result<bool, Status> {
    match v1::TwinView::try_from(view) {
        Ok(v1::TwinView::Unspecified) => Ok(default_full),
        Ok(v1::TwinView::Summary) => Ok(false),
        Ok(v1::TwinView::Full) => Ok(true),
        Err(_) => Err(Status::invalid_argument(format!("invalid view {view}"))),
    }
}

/// A `tenant:rest` id of the caller's tenant given as a filter: `Ok(false)` when it is
/// another tenant's (nothing can match), INVALID_ARGUMENT when it is not an id at all.
fn own_filter(p: &Principal, what: &str, id: &str) -> Result<bool, Status> {
    match id.split_once(':') {
        Some((t, rest)) if !t.is_empty() && !rest.is_empty() && id.len() <= 256 => {
            Ok(t == p.tenant)
        }
        _ => Err(Status::invalid_argument(format!(
            "{what} {id:?} is not a tenant:id of at most 256 bytes"
        ))),
    }
}

fn text(v: &str) -> v1::SignalValue {
    v1::SignalValue {
        value: Some(v1::signal_value::Value::Text(v.to_owned())),
    }
}

/// The contract's twin (without its id, which the caller sets: the twin does not keep it
/// in a form the closure can borrow cheaply).
pub(crate) fn to_twin(t: &DeviceTwin, tenant: &str, online: &[String], full: bool) -> v1::Twin {
    let site = t.site().unwrap_or_default().to_owned();
    let mut twin = v1::Twin {
        device_id: String::new(),
        tenant_id: tenant.to_owned(),
        site_online: online.contains(&site),
        site_id: site,
        customer_id: t.customer().unwrap_or_default().to_owned(),
        model_id: t.model().unwrap_or_default().to_owned(),
        health_index: t.health(),
        health: health(t.health()) as i32,
        last_seen_at_ms: t.last_seen_ms() as i64,
        applied_seq: t.high_water(),
        version: t.high_water(),
        ..Default::default()
    };
    if full {
        twin.reported = t
            .reported_fields()
            .iter()
            .map(|(f, r)| {
                (
                    f.clone(),
                    v1::ReportedValue {
                        value: Some(text(&r.value)),
                        device_time_ms: r.ts_ms as i64,
                        seq: r.seq,
                    },
                )
            })
            .collect();
        twin.desired = t
            .desired()
            .iter()
            .map(|(f, d)| {
                (
                    f.clone(),
                    v1::DesiredValue {
                        value: Some(text(&d.value)),
                        version: d.version,
                        set_at_ms: 0,
                    },
                )
            })
            .collect();
        twin.delta = t
            .delta()
            .into_iter()
            .map(|(f, _, _)| {
                let desired = twin.desired.get(f).cloned();
                let reported = twin.reported.get(f).cloned();
                (f.to_owned(), v1::DeltaField { desired, reported })
            })
            .collect();
    }
    twin
}

/// The contract's health states from the health index.
fn health(index: f64) -> v1::Health {
    if index >= 0.8 {
        v1::Health::Ok
    } else if index >= 0.5 {
        v1::Health::Degraded
    } else if index > 0.0 {
        v1::Health::AtRisk
    } else {
        v1::Health::Failed
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::TwinUpdate, Status>> + Send>>;

/// A desired field's value as the device twin keeps it (text); INVALID_ARGUMENT for no
/// value or a number that is not finite. Shared by `SetDesired` and configuration
/// commands, which set the desired state the same way.
pub(crate) fn desired_value(field: &str, value: Option<v1::SignalValue>) -> Result<String, Status> {
    match value.and_then(|v| v.value) {
        Some(v1::signal_value::Value::Text(t)) => Ok(t),
        Some(v1::signal_value::Value::Number(n)) if n.is_finite() => Ok(n.to_string()),
        Some(v1::signal_value::Value::Number(n)) => Err(Status::invalid_argument(format!(
            "field {field:?}: {n} is not a finite number"
        ))),
        Some(v1::signal_value::Value::Integer(i)) => Ok(i.to_string()),
        Some(v1::signal_value::Value::Flag(b)) => Ok(b.to_string()),
        None => Err(Status::invalid_argument(format!(
            "field {field:?} has no value"
        ))),
    }
}

#[tonic::async_trait]
impl TwinService for TwinApi {
    type WatchTwinsStream = UpdateStream;

    async fn get_twin(
        &self,
        req: Request<v1::GetTwinRequest>,
    ) -> Result<Response<v1::Twin>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::TwinsRead)?;
        let r = req.into_inner();
        let device = p.own("device", &r.device_id)?;
        if device.len() > 256 {
            return Err(Status::invalid_argument("device_id is over 256 bytes"));
        }
        let full = r.view != v1::TwinView::Summary as i32;
        let twin = self
            .twin(device)
            .await?
            .ok_or_else(|| Status::not_found(format!("device {device:?} not found")))?;
        Ok(Response::new(cut(twin, full)))
    }

    async fn query_twins(
        &self,
        req: Request<v1::QueryTwinsRequest>,
    ) -> Result<Response<v1::QueryTwinsResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::TwinsRead)?;
        let r = req.into_inner();
        let directory = self.directory()?;
        let q = Query::parse(&p, &r)?;
        let full = full_view(r.view, false)?;
        let page = r.page.clone().unwrap_or_default();
        let size = match page.page_size {
            0 => 50,
            n => n.min(1000),
        } as usize;
        let after = q.resume(&p, &page.page_token)?;
        let empty = || {
            Response::new(v1::QueryTwinsResponse {
                twins: Vec::new(),
                page: Some(v1::PageResponse::default()),
            })
        };
        if q.foreign {
            return Ok(empty());
        }
        // Candidates by the identity filters, from the index, in device id order.
        let candidates: Vec<String> = {
            let book = directory.catch_up(&p.tenant).await?;
            let b = book.lock().await;
            let from = |set: Option<&BTreeSet<String>>| -> Vec<String> {
                set.map(|s| {
                    s.range::<String, _>((
                        std::ops::Bound::Excluded(&after),
                        std::ops::Bound::Unbounded,
                    ))
                    .cloned()
                    .collect()
                })
                .unwrap_or_default()
            };
            let ids: Vec<String> = if !q.site.is_empty() {
                from(b.by_site.get(&q.site))
            } else if !q.customer.is_empty() {
                from(b.by_customer.get(&q.customer))
            } else {
                b.devices
                    .range::<String, _>((
                        std::ops::Bound::Excluded(&after),
                        std::ops::Bound::Unbounded,
                    ))
                    .map(|(d, _)| d.clone())
                    .collect()
            };
            ids.into_iter()
                .filter(|d| b.devices.get(d).is_some_and(|e| q.identity_matches(e)))
                .collect()
        };
        let online = (self.sites_online)();
        let mut out = Vec::new();
        let mut last_looked = None;
        let mut looked = 0usize;
        'chunks: for chunk in candidates.chunks(INSPECT_CONCURRENCY) {
            if looked >= MAX_INSPECTED {
                break;
            }
            let twins =
                futures::future::join_all(chunk.iter().map(|d| look(&self.system, &online, d)))
                    .await;
            for (d, twin) in chunk.iter().zip(twins) {
                looked += 1;
                last_looked = Some(d.clone());
                // The twin is the truth: the index only chose the candidates.
                if let Some(t) = twin?
                    && q.matches(&t)
                {
                    out.push(cut(t, full));
                    if out.len() == size {
                        break 'chunks;
                    }
                }
            }
        }
        let more = last_looked
            .as_ref()
            .is_some_and(|l| candidates.last().is_some_and(|c| c > l));
        let next_page_token = match (&last_looked, more) {
            (Some(l), true) => q.token(l),
            _ => String::new(),
        };
        Ok(Response::new(v1::QueryTwinsResponse {
            twins: out,
            page: Some(v1::PageResponse { next_page_token }),
        }))
    }

    async fn watch_twins(
        &self,
        req: Request<v1::WatchTwinsRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::TwinsRead)?;
        let r = req.into_inner();
        let directory = self.directory()?;
        let full = full_view(r.view, false)?;
        let interval = Duration::from_millis(u64::from(r.min_interval_ms.max(MIN_INTERVAL_MS)));
        let site = match (r.device_ids.is_empty(), r.site_id.is_empty()) {
            (false, true) => None,
            (true, false) => {
                if !own_filter(&p, "site_id", &r.site_id)? {
                    return Err(Status::not_found(format!("site {:?} not found", r.site_id)));
                }
                Some(r.site_id.clone())
            }
            _ => {
                return Err(Status::invalid_argument(
                    "exactly one of device_ids and site_id must be set",
                ));
            }
        };
        let devices: BTreeSet<String> = match &site {
            Some(s) => directory.at_site(&p.tenant, s).await?,
            None => {
                if r.device_ids.len() > MAX_WATCHED_DEVICES {
                    return Err(Status::invalid_argument(format!(
                        "at most {MAX_WATCHED_DEVICES} device_ids, got {}",
                        r.device_ids.len()
                    )));
                }
                let mut set = BTreeSet::new();
                for d in &r.device_ids {
                    let d = p.own("device", d)?;
                    if d.len() > 256 {
                        return Err(Status::invalid_argument("device_id is over 256 bytes"));
                    }
                    if self.twin(d).await?.is_none() {
                        return Err(Status::not_found(format!("device {d:?} not found")));
                    }
                    set.insert(d.to_owned());
                }
                set
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let watch = Watch {
            api: self.clone(),
            directory,
            tenant: p.tenant.clone(),
            site,
            full,
            interval,
            inbox: Arc::new(Inbox::default()),
            tx,
            last: HashMap::new(),
            customers: BTreeSet::new(),
        };
        tracing::info!(tenant = %p.tenant, twins = devices.len(), site = ?watch.site, "twin watch");
        tokio::spawn(watch.run(devices, r.send_initial));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn set_desired(
        &self,
        req: Request<v1::SetDesiredRequest>,
    ) -> Result<Response<v1::SetDesiredResponse>, Status> {
        let p = Principal::of(&req)?.clone();
        p.require(Scope::TwinsWrite)?;
        let r = req.into_inner();
        let device = p.own("device", &r.device_id)?.to_owned();
        if r.fields.is_empty() || r.fields.len() > 256 {
            return Err(Status::invalid_argument("1 to 256 fields must be set"));
        }
        if self.twin(&device).await?.is_none() {
            return Err(Status::not_found(format!("device {device:?} not found")));
        }
        let mut versions = std::collections::BTreeMap::new();
        // The contract is all or nothing; the twin sets one field per message, so a call
        // with several fields is only accepted when none of them carries a condition that
        // could fail halfway.
        if r.fields.len() > 1 && r.fields.values().any(|c| c.expected_version.is_some()) {
            return Err(Status::invalid_argument(
                "expected_version is supported with one field per call",
            ));
        }
        for (field, change) in r.fields {
            if change.clear {
                return Err(Status::unimplemented("clearing a desired field"));
            }
            let value = desired_value(&field, change.value)?;
            let msg = DeviceMsg::SetDesired {
                field: field.clone(),
                value,
                expected_version: change.expected_version,
            };
            match self.system.devices().call(&device, msg).await {
                Ok(DeviceReply::Version(v)) => {
                    versions.insert(field, v);
                }
                Ok(DeviceReply::Rejected(why)) => {
                    return Err(if why.contains("version") {
                        Status::failed_precondition(why)
                    } else {
                        Status::invalid_argument(why)
                    });
                }
                Ok(other) => return Err(Status::internal(format!("unexpected reply {other:?}"))),
                Err(e) => return Err(Status::internal(e.to_string())),
            }
        }
        let twin = self.twin(&device).await?.unwrap_or_default();
        Ok(Response::new(v1::SetDesiredResponse {
            versions: versions.into_iter().collect(),
            twin: Some(twin),
        }))
    }
}

/// A query's filters, checked.
struct Query {
    site: String,
    model: String,
    customer: String,
    health: Vec<i32>,
    kind: i32,
    /// A filter names another tenant's site or customer: nothing matches.
    foreign: bool,
}

impl Query {
    fn parse(p: &Principal, r: &v1::QueryTwinsRequest) -> Result<Self, Status> {
        let mut foreign = false;
        if !r.site_id.is_empty() {
            foreign |= !own_filter(p, "site_id", &r.site_id)?;
        }
        if !r.customer_id.is_empty() {
            foreign |= !own_filter(p, "customer_id", &r.customer_id)?;
        }
        if r.model_id.len() > 256 || r.model_id.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "model_id is not a catalogue model id",
            ));
        }
        if r.health.len() > 8 {
            return Err(Status::invalid_argument("at most 8 health states"));
        }
        for h in &r.health {
            match v1::Health::try_from(*h) {
                Ok(v1::Health::Unspecified) | Err(_) => {
                    return Err(Status::invalid_argument(format!("invalid health {h}")));
                }
                Ok(_) => {}
            }
        }
        if v1::InsightKind::try_from(r.has_open_insight).is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid has_open_insight {}",
                r.has_open_insight
            )));
        }
        Ok(Self {
            site: r.site_id.clone(),
            model: r.model_id.clone(),
            customer: r.customer_id.clone(),
            health: r.health.clone(),
            kind: r.has_open_insight,
            foreign,
        })
    }

    /// The filters, for tying a page token to them.
    fn fingerprint(&self) -> u32 {
        let text = format!(
            "{}|{}|{}|{:?}|{}",
            self.site, self.model, self.customer, self.health, self.kind
        );
        caretwin_actors::host::shard_of(&text, u32::MAX)
    }

    /// The token continuing after `device`.
    fn token(&self, device: &str) -> String {
        format!("{:08x}.{device}", self.fingerprint())
    }

    /// The device id to continue after (empty: from the start).
    fn resume(&self, p: &Principal, token: &str) -> Result<String, Status> {
        if token.is_empty() {
            return Ok(String::new());
        }
        let bad = || Status::invalid_argument("invalid page_token for this filter");
        let (fp, device) = token.split_once('.').ok_or_else(bad)?;
        if u32::from_str_radix(fp, 16).ok() != Some(self.fingerprint())
            || p.own("device", device).is_err()
        {
            return Err(bad());
        }
        Ok(device.to_owned())
    }

    fn identity_matches(&self, e: &DeviceIndexEntry) -> bool {
        e.model.is_some()
            && (self.site.is_empty() || e.site.as_deref() == Some(self.site.as_str()))
            && (self.model.is_empty() || e.model.as_deref() == Some(self.model.as_str()))
            && (self.customer.is_empty() || e.customer.as_deref() == Some(self.customer.as_str()))
    }

    fn matches(&self, t: &v1::Twin) -> bool {
        (self.site.is_empty() || t.site_id == self.site)
            && (self.model.is_empty() || t.model_id == self.model)
            && (self.customer.is_empty() || t.customer_id == self.customer)
            && (self.health.is_empty() || self.health.contains(&t.health))
            && (self.kind == 0 || t.open_insights.iter().any(|i| i.kind == self.kind))
    }
}

/// One WatchTwins stream.
struct Watch {
    api: TwinApi,
    directory: Arc<Directory>,
    tenant: String,
    /// The watched site, or `None` for a fixed list of devices.
    site: Option<String>,
    full: bool,
    interval: Duration,
    inbox: Arc<Inbox>,
    tx: tokio::sync::mpsc::Sender<Result<v1::TwinUpdate, Status>>,
    /// Each watched twin's last state sent (FULL, for telling what changed), and when.
    last: HashMap<String, (Option<Instant>, v1::Twin)>,
    /// The customers of the watched twins: their open cases are the twins' open insights,
    /// so a change of a customer twin is a look at their watched devices.
    customers: BTreeSet<String>,
}

fn snapshot_key(device: &str) -> String {
    format!("{}/{device}", DeviceTwin::KIND)
}

fn customer_key(customer: &str) -> String {
    use caretwin_actors::twins::customer::CustomerTwin;
    format!("{}/{customer}", CustomerTwin::KIND)
}

impl Watch {
    /// Streams until the client goes away or the node shuts down.
    async fn run(mut self, devices: BTreeSet<String>, send_initial: bool) {
        let signals = self.directory.snapshots.clone();
        let mut closing = self.api.closing.clone();
        // The index's growth, for devices joining or leaving the site.
        let mut joined = self.site.as_ref().map(|_| {
            self.directory
                .logs
                .subscribe_prefix(&Directory::family(&self.tenant))
        });
        // Watch before the first look, so a change in between is not lost.
        for d in &devices {
            signals.watch(&snapshot_key(d), &self.inbox);
        }
        for d in devices {
            if !self.first(d, send_initial, &mut closing).await {
                return self.end(&signals);
            }
        }
        let mut pending: BTreeSet<String> = BTreeSet::new();
        loop {
            let deadline = pending
                .iter()
                .filter_map(|d| self.last.get(d).and_then(|(at, _)| *at))
                .map(|at| at + self.interval)
                .min();
            let node_closing = async {
                match closing.as_mut() {
                    Some(c) => drop(c.wait_for(|c| *c).await),
                    None => std::future::pending().await,
                }
            };
            let index_grew = async {
                match joined.as_mut() {
                    Some(j) => j.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let coalesced = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.inbox.changed() => {}
                grew = index_grew => {
                    if !grew || !self.follow_site(&signals, &mut pending, &mut closing).await {
                        return self.end(&signals);
                    }
                }
                () = coalesced => {}
                () = self.tx.closed() => return self.end(&signals),
                () = node_closing => return self.end(&signals),
            }
            for key in self.inbox.take() {
                match key.split_once('/') {
                    Some(("customer", c)) => pending.extend(
                        self.last
                            .iter()
                            .filter(|(_, (_, t))| t.customer_id == c)
                            .map(|(d, _)| d.clone()),
                    ),
                    Some((_, d)) => {
                        pending.insert(d.to_owned());
                    }
                    None => {}
                }
            }
            let now = Instant::now();
            let due: Vec<String> = pending
                .iter()
                .filter(|d| {
                    self.last
                        .get(*d)
                        .is_none_or(|(at, _)| at.is_none_or(|at| at + self.interval <= now))
                })
                .cloned()
                .collect();
            for chunk in due.chunks(INSPECT_CONCURRENCY) {
                let online = (self.api.sites_online)();
                let looks = futures::future::join_all(
                    chunk.iter().map(|d| look(&self.api.system, &online, d)),
                )
                .await;
                for (d, twin) in chunk.iter().zip(looks) {
                    pending.remove(d);
                    let twin = match twin {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = self.tx.send(Err(e)).await;
                            return self.end(&signals);
                        }
                    };
                    if !self.update(d, twin, &signals, &mut closing).await {
                        return self.end(&signals);
                    }
                }
            }
        }
    }

    /// A twin's first look: its baseline, sent when asked for.
    async fn first(
        &mut self,
        device: String,
        send: bool,
        closing: &mut Option<tokio::sync::watch::Receiver<bool>>,
    ) -> bool {
        let online = (self.api.sites_online)();
        let twin = match look(&self.api.system, &online, &device).await {
            Ok(Some(t)) => t,
            Ok(None) => v1::Twin {
                device_id: device.clone(),
                tenant_id: self.tenant.clone(),
                ..Default::default()
            },
            Err(e) => {
                let _ = self.tx.send(Err(e)).await;
                return false;
            }
        };
        let at = send.then(Instant::now);
        self.follow_customer(&twin.customer_id);
        self.last.insert(device, (at, twin.clone()));
        if !send {
            return true;
        }
        let update = v1::TwinUpdate {
            twin: Some(cut(twin, self.full)),
            changes: vec![v1::TwinChange::Initial as i32],
            changed_at_ms: crate::node::now_ms() as i64,
        };
        self.send(update, closing).await
    }

    /// Sends what changed in `device`'s twin since its last update, if anything did.
    async fn update(
        &mut self,
        device: &str,
        twin: Option<v1::Twin>,
        signals: &SnapshotSignals,
        closing: &mut Option<tokio::sync::watch::Receiver<bool>>,
    ) -> bool {
        let Some((_, before)) = self.last.get(device) else {
            return true; // no longer watched
        };
        let left = match (&twin, &self.site) {
            (None, _) => true,
            (Some(t), Some(site)) => t.site_id != *site,
            (Some(_), None) => false,
        };
        if left {
            let mut gone = before.clone();
            if let Some(t) = twin {
                gone = t;
            }
            self.last.remove(device);
            signals.unwatch(&snapshot_key(device), &self.inbox);
            let update = v1::TwinUpdate {
                twin: Some(cut(gone, self.full)),
                changes: vec![v1::TwinChange::Removed as i32],
                changed_at_ms: crate::node::now_ms() as i64,
            };
            return self.send(update, closing).await;
        }
        let twin = twin.expect("present when it did not leave");
        let changes = changes(before, &twin);
        self.follow_customer(&twin.customer_id);
        if changes.is_empty() {
            return true;
        }
        self.last
            .insert(device.to_owned(), (Some(Instant::now()), twin.clone()));
        let update = v1::TwinUpdate {
            twin: Some(cut(twin, self.full)),
            changes: changes.into_iter().map(|c| c as i32).collect(),
            changed_at_ms: crate::node::now_ms() as i64,
        };
        self.send(update, closing).await
    }

    /// The site's devices changed in the index: watch those that joined (their state goes
    /// out as a change), and let those that left be told by their next look.
    async fn follow_site(
        &mut self,
        signals: &SnapshotSignals,
        pending: &mut BTreeSet<String>,
        closing: &mut Option<tokio::sync::watch::Receiver<bool>>,
    ) -> bool {
        let Some(site) = self.site.clone() else {
            return true;
        };
        let now = match self.directory.at_site(&self.tenant, &site).await {
            Ok(n) => n,
            Err(e) => {
                let _ = self.tx.send(Err(e)).await;
                return false;
            }
        };
        for d in &now {
            if !self.last.contains_key(d) {
                signals.watch(&snapshot_key(d), &self.inbox);
                // Its state is new to the watcher: sent as it is now.
                if !self.first(d.clone(), true, closing).await {
                    return false;
                }
            }
        }
        pending.extend(self.last.keys().filter(|d| !now.contains(*d)).cloned());
        true
    }

    /// Sends one update, unless the client went away or the node is closing.
    async fn send(
        &self,
        update: v1::TwinUpdate,
        closing: &mut Option<tokio::sync::watch::Receiver<bool>>,
    ) -> bool {
        let node_closing = async {
            match closing.as_mut() {
                Some(c) => drop(c.wait_for(|c| *c).await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            sent = self.tx.send(Ok(update)) => sent.is_ok(),
            () = node_closing => false,
        }
    }

    fn follow_customer(&mut self, customer: &str) {
        if !customer.is_empty() && self.customers.insert(customer.to_owned()) {
            self.directory
                .snapshots
                .watch(&customer_key(customer), &self.inbox);
        }
    }

    fn end(&self, signals: &SnapshotSignals) {
        for d in self.last.keys() {
            signals.unwatch(&snapshot_key(d), &self.inbox);
        }
        for c in &self.customers {
            signals.unwatch(&customer_key(c), &self.inbox);
        }
    }
}

/// What changed between two FULL views of a twin.
fn changes(before: &v1::Twin, after: &v1::Twin) -> Vec<v1::TwinChange> {
    let mut out = Vec::new();
    if before.applied_seq != after.applied_seq
        || before.last_seen_at_ms != after.last_seen_at_ms
        || before.reported != after.reported
        || before.signals != after.signals
        || before.firmware_version != after.firmware_version
        || before.site_id != after.site_id
        || before.customer_id != after.customer_id
    {
        out.push(v1::TwinChange::Reported);
    }
    if before.desired != after.desired {
        out.push(v1::TwinChange::Desired);
    }
    if before.health != after.health
        || before.health_index != after.health_index
        || before.open_insights != after.open_insights
    {
        out.push(v1::TwinChange::Health);
    }
    if before.site_online != after.site_online {
        out.push(v1::TwinChange::Connectivity);
    }
    out
}
