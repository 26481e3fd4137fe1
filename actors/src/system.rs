//! The whole deciding system on one node: the twins' registries, the service desks, the
//! mail router and the dispatcher, over one store and one clock.
//!
//! What leaves the system — commands to edges, notifications, orders to a real supplier —
//! goes to an `outside` [`Router`] given by the caller (the cluster binary, a test, the
//! simulation). A built-in [`LocalSupplier`] stands in for a parts supplier when none is
//! configured: it honours idempotency keys, so an order retried any number of times is
//! placed once.

use crate::catalogue::Catalogue;
use crate::host::Twin;
use crate::host::clock::Clock;
use crate::host::dispatch::{Delivery, Dispatcher, PumpReport, Router};
use crate::host::registry::{HostConfig, Registry};
use crate::host::remote::{Elsewhere, Monitor};
use crate::mail::{Address, Body, Mail};
use crate::services::handoff::{HandoffConfig, HandoffQueue};
use crate::services::parts::{PartsConfig, PartsDesk};
use crate::services::scheduler::{Scheduler, SchedulerConfig};
use crate::services::{Status, Tenants};
use crate::store::{Fence, Key, Store};
use crate::twins::customer::{CustomerEnv, CustomerMsg, CustomerReply, CustomerTwin};
use crate::twins::device::{DeviceEnv, DeviceMsg, DeviceReply, DeviceTwin};
use crate::{Error, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Settings of the service desks, per tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    /// The parts desk.
    #[serde(default)]
    pub parts: Tenants<PartsConfig>,
    /// The repair scheduler.
    #[serde(default)]
    pub scheduler: Tenants<SchedulerConfig>,
    /// The handoff queue.
    #[serde(default)]
    pub handoff: Tenants<HandoffConfig>,
}

/// A stand-in parts supplier: accepts every order once per idempotency key and
/// answers with an arrival time `lead_ms` later.
pub struct LocalSupplier {
    lead_ms: u64,
    orders: Mutex<BTreeMap<String, u64>>,
    answers: Mutex<u64>,
}

impl LocalSupplier {
    /// A supplier that delivers `lead_ms` after the order.
    pub fn new(lead_ms: u64) -> Self {
        Self {
            lead_ms,
            orders: Mutex::new(BTreeMap::new()),
            answers: Mutex::new(0),
        }
    }

    /// Orders placed (distinct keys).
    pub fn orders_placed(&self) -> usize {
        self.orders.lock().expect("supplier lock").len()
    }

    /// Takes an order; the answer to route back to the parts desk.
    fn take(&self, mail: &Mail, now: u64) -> Option<Mail> {
        let Body::SupplierOrder { key, .. } = &mail.body else {
            return None;
        };
        let arrives = *self
            .orders
            .lock()
            .expect("supplier lock")
            .entry(key.clone())
            .or_insert(now + self.lead_ms);
        let mut n = self.answers.lock().expect("supplier lock");
        *n += 1;
        let tenant = mail.from.tenant().to_owned();
        Some(Mail {
            id: format!("{tenant}/supplier/{n}"),
            from: Address::Supplier(tenant.clone()),
            to: Address::Parts(tenant),
            body: Body::SupplierResult {
                key: key.clone(),
                accepted: true,
                arrives_at_ms: Some(arrives),
                detail: format!("SO-{key}"),
            },
        })
    }
}

/// Every registry on the node.
struct Registries {
    devices: Registry<DeviceTwin>,
    customers: Registry<CustomerTwin>,
    parts: Registry<PartsDesk>,
    scheduler: Registry<Scheduler>,
    handoff: Registry<HandoffQueue>,
}

/// Routes mail to the twin it names, or outside.
struct MailRouter {
    regs: Arc<Registries>,
    supplier: Option<Arc<LocalSupplier>>,
    clock: Arc<dyn Clock>,
    outside: Arc<dyn Router>,
    /// An external field-service scheduler that takes `Book` mail instead of the desk.
    field_service: Option<Arc<dyn Router>>,
}

/// Maps a registry call's outcome to a delivery verdict: store or host failures are
/// transient (retry); bad input is permanent; an effect already claimed is delivered.
fn verdict<R>(r: Result<R>, ok: impl FnOnce(R) -> Delivery) -> Result<Delivery> {
    match r {
        Ok(reply) => Ok(ok(reply)),
        Err(Error::IdempotencyExists { .. }) => Ok(Delivery::Delivered),
        Err(
            e @ (Error::InvalidKey { .. }
            | Error::ValueTooLarge { .. }
            | Error::InvalidBatch { .. }
            | Error::InvalidArgument { .. }
            | Error::Twin { .. }),
        ) => Ok(Delivery::Rejected(e.to_string())),
        Err(e) => Err(e),
    }
}

fn status(s: Status) -> Delivery {
    match s {
        Status::Done | Status::Duplicate | Status::Ignored => Delivery::Delivered,
        Status::Refused(why) => Delivery::Rejected(why),
    }
}

#[async_trait]
impl Router for MailRouter {
    async fn deliver(&self, mail: Mail) -> Result<Delivery> {
        let r = &self.regs;
        match mail.to.clone() {
            Address::Device(id) => verdict(
                r.devices.call(&id, DeviceMsg::Mail(Box::new(mail))).await,
                |x| match x {
                    DeviceReply::Rejected(why) => Delivery::Rejected(why),
                    _ => Delivery::Delivered,
                },
            ),
            Address::Customer(id) => verdict(
                r.customers.call(&id, CustomerMsg::Mail(mail)).await,
                |x| match x {
                    CustomerReply::Rejected(why) => Delivery::Rejected(why),
                    CustomerReply::Ok => Delivery::Delivered,
                },
            ),
            Address::Parts(t) => verdict(r.parts.call(&t, mail).await, status),
            Address::Scheduler(_)
                if matches!(mail.body, Body::Book { .. }) && self.field_service.is_some() =>
            {
                let field_service = self.field_service.as_ref().expect("checked above");
                field_service.deliver(mail).await
            }
            Address::Scheduler(t) => verdict(r.scheduler.call(&t, mail).await, status),
            Address::Handoff(t) => verdict(r.handoff.call(&t, mail).await, status),
            Address::Supplier(_) if self.supplier.is_some() => {
                let supplier = self.supplier.as_ref().expect("checked above");
                match supplier.take(&mail, self.clock.now_ms()) {
                    Some(answer) => {
                        let tenant = answer.to.tenant().to_owned();
                        verdict(r.parts.call(&tenant, answer).await, status)
                    }
                    None => Ok(Delivery::Rejected(format!(
                        "supplier does not take mail {}",
                        mail.id
                    ))),
                }
            }
            // A cancellation for the partner that booked the visit; with none configured
            // (any more) it goes outside like other partner mail.
            Address::FieldService(_) if self.field_service.is_some() => {
                let field_service = self.field_service.as_ref().expect("checked above");
                field_service.deliver(mail).await
            }
            Address::Edge(_)
            | Address::Notifier(_)
            | Address::Supplier(_)
            | Address::FieldService(_) => self.outside.deliver(mail).await,
        }
    }
}

/// The deciding system on one node.
pub struct System {
    regs: Arc<Registries>,
    dispatcher: tokio::sync::Mutex<Dispatcher>,
    supplier: Option<Arc<LocalSupplier>>,
}

/// What a [`System`] is made of.
pub struct Components {
    /// Where everything is kept.
    pub store: Arc<dyn Store>,
    /// Where `now` comes from.
    pub clock: Arc<dyn Clock>,
    /// The device models.
    pub catalogue: Arc<Catalogue>,
    /// The device twins' shared context (built from the catalogue if `None`).
    pub device_env: Option<DeviceEnv>,
    /// Desk settings.
    pub services: ServicesConfig,
    /// Shards and passivation.
    pub host: HostConfig,
    /// Where mail to edges, notifiers and an external supplier goes.
    pub outside: Arc<dyn Router>,
    /// A stand-in supplier (it outlives a node restart, as a real one would); `None`
    /// sends supplier orders outside.
    pub local_supplier: Option<Arc<LocalSupplier>>,
}

/// The outbox queues of shard `shard`, one per kind of twin.
fn shard_queues(shard: u32) -> impl Iterator<Item = Key> {
    [
        DeviceTwin::KIND,
        CustomerTwin::KIND,
        PartsDesk::KIND,
        Scheduler::KIND,
        HandoffQueue::KIND,
    ]
    .into_iter()
    .map(move |kind| Key::new(format!("outbox/{kind}/{shard}")))
}

/// Which shards a [`System`] hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hosting {
    /// Every shard, with no lease: one node.
    Everything,
    /// None at start: the node's membership loop hosts the shards it holds leases for.
    Placed,
}

impl System {
    /// Starts every registry and the dispatcher.
    pub async fn start(p: Components) -> Result<Self> {
        Self::start_with_field_service(p, None).await
    }

    /// Like [`System::start`], but when `field_service` is given, bookings (`Book` mail to
    /// a scheduler) go to it — an external field-service scheduler, which answers the
    /// customer with `Booking` mail — instead of the in-process scheduler desk.
    pub async fn start_with_field_service(
        p: Components,
        field_service: Option<Arc<dyn Router>>,
    ) -> Result<Self> {
        Self::start_hosting(p, field_service, Hosting::Everything).await
    }

    /// Starts the system with the given [`Hosting`]: everything here (one node), or
    /// nothing until the node's membership loop hosts shards ([`System::host_shard`]).
    pub async fn start_hosting(
        p: Components,
        field_service: Option<Arc<dyn Router>>,
        hosting: Hosting,
    ) -> Result<Self> {
        p.services.parts.validate()?;
        p.services.scheduler.validate()?;
        p.services.handoff.validate()?;
        let device_env = match p.device_env {
            Some(e) => e,
            None => DeviceEnv::new(p.catalogue.clone())?,
        };
        let h = p.host;
        let (store, clock) = (p.store.clone(), p.clock.clone());
        let regs = Arc::new(Registries {
            devices: Registry::start_placed(h, store.clone(), clock.clone(), Arc::new(device_env))?,
            customers: Registry::start_placed(
                h,
                store.clone(),
                clock.clone(),
                Arc::new(CustomerEnv {
                    catalogue: p.catalogue.clone(),
                }),
            )?,
            parts: Registry::start_placed(
                h,
                store.clone(),
                clock.clone(),
                Arc::new(p.services.parts),
            )?,
            scheduler: Registry::start_placed(
                h,
                store.clone(),
                clock.clone(),
                Arc::new(p.services.scheduler),
            )?,
            handoff: Registry::start_placed(
                h,
                store.clone(),
                clock.clone(),
                Arc::new(p.services.handoff),
            )?,
        });
        let supplier = p.local_supplier;
        let router = Arc::new(MailRouter {
            regs: regs.clone(),
            supplier: supplier.clone(),
            clock: clock.clone(),
            outside: p.outside,
            field_service,
        });
        let system = Self {
            regs,
            dispatcher: tokio::sync::Mutex::new(Dispatcher::new(store, router, Vec::new())),
            supplier,
        };
        if hosting == Hosting::Everything {
            for shard in 0..h.shards {
                system.host_shard(shard, None).await?;
            }
        }
        Ok(system)
    }

    /// The number of shards (the same for every kind of twin, and on every node).
    pub fn shard_count(&self) -> u32 {
        self.regs.devices.shard_count()
    }

    /// The shards hosted here now.
    pub fn hosted_shards(&self) -> Vec<u32> {
        self.regs.devices.hosted()
    }

    /// Hosts shard `shard` of every kind here, its writes fenced by `fence`, and delivers
    /// its outboxes' mail from now on.
    pub async fn host_shard(&self, shard: u32, fence: Option<Fence>) -> Result<()> {
        let r = &self.regs;
        r.devices.host(shard, fence.clone()).await?;
        r.customers.host(shard, fence.clone()).await?;
        r.parts.host(shard, fence.clone()).await?;
        r.scheduler.host(shard, fence.clone()).await?;
        r.handoff.host(shard, fence).await?;
        self.dispatcher.lock().await.add_queues(shard_queues(shard));
        Ok(())
    }

    /// Stops hosting shard `shard` here: its mail stops going out from here, then its
    /// twins stop — after what is queued for them (`drain`, a hand-over), or at once (its
    /// lease can no longer be counted on). Returns when nothing of it runs here.
    pub async fn drop_shard(&self, shard: u32, drain: bool) {
        self.dispatcher
            .lock()
            .await
            .remove_queues(&shard_queues(shard).collect::<Vec<_>>());
        let r = &self.regs;
        r.devices.unhost(shard, drain).await;
        r.customers.unhost(shard, drain).await;
        r.parts.unhost(shard, drain).await;
        r.scheduler.unhost(shard, drain).await;
        r.handoff.unhost(shard, drain).await;
    }

    /// Sets where calls for twins hosted on other nodes go, and who learns of shards
    /// hosted and dropped here; before any shard is hosted.
    pub fn connect(&self, elsewhere: Arc<dyn Elsewhere>, monitor: Option<Arc<dyn Monitor>>) {
        let r = &self.regs;
        r.devices.set_elsewhere(elsewhere.clone());
        r.customers.set_elsewhere(elsewhere.clone());
        r.parts.set_elsewhere(elsewhere.clone());
        r.scheduler.set_elsewhere(elsewhere.clone());
        r.handoff.set_elsewhere(elsewhere);
        if let Some(m) = monitor {
            r.devices.set_monitor(m.clone());
            r.customers.set_monitor(m.clone());
            r.parts.set_monitor(m.clone());
            r.scheduler.set_monitor(m.clone());
            r.handoff.set_monitor(m);
        }
    }

    /// Handles a call another node forwarded here (in wire form, see
    /// [`crate::host::remote`]): for twin `id` of kind `kind`, hosted here or refused with
    /// `NotHosted`. Returns the answer in wire form.
    pub async fn call_here(&self, kind: &str, id: &str, msg: &[u8]) -> Vec<u8> {
        let r = &self.regs;
        match kind {
            DeviceTwin::KIND => r.devices.call_here_wire(id, msg).await,
            CustomerTwin::KIND => r.customers.call_here_wire(id, msg).await,
            PartsDesk::KIND => r.parts.call_here_wire(id, msg).await,
            Scheduler::KIND => r.scheduler.call_here_wire(id, msg).await,
            HandoffQueue::KIND => r.handoff.call_here_wire(id, msg).await,
            other => crate::host::remote::encode_answer::<()>(&Err(Error::InvalidArgument {
                name: "kind",
                reason: format!("no twins of kind {other:?}"),
            })),
        }
    }

    /// The device twins.
    pub fn devices(&self) -> &Registry<DeviceTwin> {
        &self.regs.devices
    }

    /// The customer twins.
    pub fn customers(&self) -> &Registry<CustomerTwin> {
        &self.regs.customers
    }

    /// The parts desks.
    pub fn parts(&self) -> &Registry<PartsDesk> {
        &self.regs.parts
    }

    /// The repair schedulers.
    pub fn scheduler(&self) -> &Registry<Scheduler> {
        &self.regs.scheduler
    }

    /// The handoff queues.
    pub fn handoff(&self) -> &Registry<HandoffQueue> {
        &self.regs.handoff
    }

    /// The stand-in supplier, if configured.
    pub fn local_supplier(&self) -> Option<&LocalSupplier> {
        self.supplier.as_deref()
    }

    /// Delivers the mail waiting in every outbox, once over.
    pub async fn pump(&self) -> Result<PumpReport> {
        self.dispatcher.lock().await.pump().await
    }

    /// Fires due timers and passivates idle twins everywhere.
    pub async fn tick(&self) -> Result<()> {
        let r = &self.regs;
        r.devices.tick().await?;
        r.customers.tick().await?;
        r.parts.tick().await?;
        r.scheduler.tick().await?;
        r.handoff.tick().await
    }

    /// Ticks and delivers until nothing moves and no queue is stalled (or `rounds` rounds).
    /// Returns the totals.
    pub async fn settle(&self, rounds: usize) -> Result<PumpReport> {
        let mut total = PumpReport::default();
        for _ in 0..rounds {
            self.tick().await?;
            let r = self.pump().await?;
            total.delivered += r.delivered;
            total.dropped += r.dropped;
            total.stalled = r.stalled;
            // A queue that stalled on a transient failure is tried again next round.
            if r.delivered == 0 && r.dropped == 0 && r.stalled == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// Stops every registry after what is queued.
    pub async fn stop(self) {
        let System {
            regs, dispatcher, ..
        } = self;
        drop(dispatcher); // its router holds the other handle on the registries
        let Ok(regs) = Arc::try_unwrap(regs) else {
            return; // a caller still holds a registry; the shards stop when it is dropped
        };
        regs.devices.stop().await;
        regs.customers.stop().await;
        regs.parts.stop().await;
        regs.scheduler.stop().await;
        regs.handoff.stop().await;
    }
}
