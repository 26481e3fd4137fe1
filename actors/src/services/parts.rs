//! The parts desk: a tenant's local stock and its orders with the supplier.
//!
//! An order is known by its idempotency key for as long as the desk keeps it: a repeated
//! [`Body::OrderPart`] never orders twice, it only gets the order's outcome again. A new
//! order is served from local stock when enough is there (placed at once, arriving after
//! the part's local lead time); otherwise a [`Body::SupplierOrder`] with the same key goes
//! to the supplier, who honours the key, so neither our retries nor the outbox's can make
//! two orders. A refusal is retried with exponential backoff on a durable timer, up to
//! `max_attempts` orders in all; then the order fails.
//!
//! ```text
//!  OrderPart ─► stock? ── yes ─► Placed ─► PartOrderUpdate{placed}
//!                 └─ no ─► Waiting ─► SupplierResult accepted ─► Placed ─► PartOrderUpdate{placed}
//!                             ▲   └─ refused ─► Backoff(timer) ─┘ or, after max_attempts,
//!                             └──── timer: SupplierOrder again ─┘    Failed ─► PartOrderUpdate{!placed}
//! ```

use super::{
    Settings, Span, Status, Tenants, admit, body_name, check_key, check_limits, claim,
    decode_snapshot, default_max_records, default_retain, make_room, refuse, send, tenant_id,
};
use crate::host::{Ctx, Twin};
use crate::mail::{Address, Body, Mail, OrderProgress, PartOrderRequest, SupplierState, tenant_of};
use crate::model::TimeMs;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A desk's settings (per tenant, see [`Tenants`]).
///
/// ```toml
/// max_attempts = 5
/// retry_first = "1m"
/// retry_max = "1h"
/// [[inventory]]
/// part_number = "DESCALER-250"
/// quantity = 40
/// local_lead_time = "1d"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartsConfig {
    /// Local stock: the desk starts with these quantities when it is first created, and
    /// takes a part number's quantity the first time it sees that part number here.
    /// Orders served from stock arrive after the part's `local_lead_time`.
    #[serde(default)]
    pub inventory: Vec<StockConfig>,
    /// Wait before ordering again after the supplier's first refusal; each further
    /// refusal doubles it.
    #[serde(default = "default_retry_first")]
    pub retry_first: Span,
    /// Longest wait between two supplier orders.
    #[serde(default = "default_retry_max")]
    pub retry_max: Span,
    /// Supplier orders in all (the first included) before an order is given up as failed.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Finished orders (placed or failed) are forgotten this long after they finished; a
    /// repeat of a forgotten key is still refused by its idempotency record.
    #[serde(default = "default_retain")]
    pub retain: Span,
    /// Most orders kept; beyond it the oldest finished ones are forgotten, and new orders
    /// are refused while this many are still open.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
}

/// One part number in local stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockConfig {
    /// The part number, as the catalogue and the supplier name it.
    pub part_number: String,
    /// Units in stock when the desk first sees this part number.
    pub quantity: u32,
    /// How long a part from local stock takes to reach the customer.
    #[serde(default = "default_lead_time")]
    pub local_lead_time: Span,
}

fn default_retry_first() -> Span {
    Span::minutes(1)
}
fn default_retry_max() -> Span {
    Span::hours(1)
}
fn default_max_attempts() -> u32 {
    5
}
fn default_lead_time() -> Span {
    Span::days(1)
}

impl Default for PartsConfig {
    fn default() -> Self {
        Self {
            inventory: Vec::new(),
            retry_first: default_retry_first(),
            retry_max: default_retry_max(),
            max_attempts: default_max_attempts(),
            retain: default_retain(),
            max_records: default_max_records(),
        }
    }
}

impl Settings for PartsConfig {
    fn validate(&self) -> Result<()> {
        check_limits(self.max_records)?;
        if self.max_attempts == 0 {
            return Err(Error::Config("max_attempts must be at least 1".into()));
        }
        if self.retry_max < self.retry_first {
            return Err(Error::Config(format!(
                "retry_max {} is shorter than retry_first {}",
                String::from(self.retry_max),
                String::from(self.retry_first)
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.inventory {
            check_key("part_number", &s.part_number).map_err(Error::Config)?;
            if !seen.insert(&s.part_number) {
                return Err(Error::Config(format!(
                    "part_number {:?} is listed twice in inventory",
                    s.part_number
                )));
            }
        }
        Ok(())
    }
}

impl PartsConfig {
    /// The wait after the supplier refused attempt `attempt` (1 = the first order).
    pub fn backoff(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(63);
        self.retry_first
            .ms()
            .saturating_mul(1u64 << doublings)
            .min(self.retry_max.ms())
    }

    fn lead_time(&self, part: &str) -> u64 {
        self.inventory
            .iter()
            .find(|s| s.part_number == part)
            .map_or(default_lead_time(), |s| s.local_lead_time)
            .ms()
    }
}

/// Where an order stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum OrderState {
    /// A supplier order is out; its result has not come yet.
    #[serde(rename = "w")]
    Waiting,
    /// The supplier refused; the next order goes out at `due` (a durable timer).
    #[serde(rename = "b")]
    Backoff {
        /// When the retry timer is due.
        due: TimeMs,
    },
    /// Placed, from stock or with the supplier.
    #[serde(rename = "p")]
    Placed {
        /// When the part arrives, if known.
        arrives: Option<TimeMs>,
        /// Where it comes from, or the supplier's reference.
        detail: String,
    },
    /// Given up after `max_attempts` refusals, or the supplier reported it cannot fulfil
    /// it.
    #[serde(rename = "f")]
    Failed {
        /// Why.
        detail: String,
    },
    /// On its way (the supplier said so).
    #[serde(rename = "s")]
    Shipped {
        /// When the part arrives, if known.
        arrives: Option<TimeMs>,
        /// The supplier's reference.
        detail: String,
    },
    /// Delivered (the supplier said so).
    #[serde(rename = "d")]
    Delivered {
        /// The supplier's reference.
        detail: String,
    },
    /// Cancelled before shipping (the supplier said so).
    #[serde(rename = "x")]
    Cancelled {
        /// Why, or the supplier's reference.
        detail: String,
    },
}

impl OrderState {
    /// How far the order got, for "states only move forward": requested 1, confirmed 2,
    /// shipped 3, delivered 4; cancelled and failed end it (5).
    pub fn rank(&self) -> u8 {
        match self {
            OrderState::Waiting | OrderState::Backoff { .. } => 1,
            OrderState::Placed { .. } => 2,
            OrderState::Shipped { .. } => 3,
            OrderState::Delivered { .. } => 4,
            OrderState::Failed { .. } | OrderState::Cancelled { .. } => 5,
        }
    }
}

/// One order, known by its idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The customer twin told about it.
    #[serde(rename = "c")]
    pub customer: String,
    /// The part number.
    #[serde(rename = "p")]
    pub part_number: String,
    /// How many.
    #[serde(rename = "q")]
    pub quantity: u32,
    /// Supplier orders sent so far (0: served from stock).
    #[serde(rename = "a")]
    pub attempts: u32,
    /// When it last changed.
    #[serde(rename = "t")]
    pub at: TimeMs,
    /// Where it stands.
    #[serde(rename = "s")]
    pub state: OrderState,
    /// Ids of the supplier results applied while the order is open, so a redelivered
    /// refusal of an earlier attempt is not taken for the answer to the current one.
    #[serde(rename = "r", default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<String>,
    /// The order's id, `tenant:po-N` (integrators name orders by it).
    #[serde(rename = "i", default)]
    pub id: String,
    /// When it was taken.
    #[serde(rename = "t0", default)]
    pub created: TimeMs,
    /// The device it is for, if known.
    #[serde(rename = "v", default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    /// The case it belongs to, if any.
    #[serde(rename = "z", default, skip_serializing_if = "String::is_empty")]
    pub case_id: String,
    /// The work order it belongs to, if any.
    #[serde(rename = "w", default, skip_serializing_if = "String::is_empty")]
    pub work_order_id: String,
    /// A consumable for the customer rather than a spare part.
    #[serde(rename = "k", default, skip_serializing_if = "is_false")]
    pub consumable: bool,
    /// The shipment's tracking reference, once the supplier gave one.
    #[serde(rename = "tr", default, skip_serializing_if = "String::is_empty")]
    pub tracking: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Order {
    fn finished_at(&self) -> Option<TimeMs> {
        (self.state.rank() > 1).then_some(self.at)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Mail counter.
    #[serde(rename = "n")]
    seq: u64,
    /// Units in local stock, by part number.
    #[serde(rename = "s")]
    stock: BTreeMap<String, u32>,
    /// Orders by idempotency key.
    #[serde(rename = "o")]
    orders: BTreeMap<String, Order>,
    /// Order id counter.
    #[serde(rename = "i", default)]
    ids: u64,
}

/// A `SupplierResult`'s fields.
struct Answer {
    key: String,
    accepted: bool,
    arrives_at_ms: Option<TimeMs>,
    detail: String,
}

/// The parts desk of one tenant (twin id = tenant id).
#[derive(Debug)]
pub struct PartsDesk {
    tenant: String,
    me: Address,
    state: State,
}

/// Timer tag of an order's retry.
fn retry_tag(key: &str) -> String {
    format!("retry/{key}")
}

impl PartsDesk {
    /// An order, by idempotency key.
    pub fn order(&self, key: &str) -> Option<&Order> {
        self.state.orders.get(key)
    }

    /// Every order the desk keeps, with its idempotency key.
    pub fn orders(&self) -> impl Iterator<Item = (&str, &Order)> {
        self.state.orders.iter().map(|(k, o)| (k.as_str(), o))
    }

    /// An order, by id (`tenant:po-N`), with its idempotency key.
    pub fn order_by_id(&self, id: &str) -> Option<(&str, &Order)> {
        self.orders().find(|(_, o)| o.id == id)
    }

    /// Gives orders kept before orders had ids one, in key order (the same ids on every
    /// restore until the next change writes them).
    fn number_orders(&mut self) {
        for o in self.state.orders.values_mut().filter(|o| o.id.is_empty()) {
            self.state.ids += 1;
            o.id = format!("{}:po-{}", self.tenant, self.state.ids);
        }
    }

    /// Units of `part_number` in local stock.
    pub fn stock(&self, part_number: &str) -> u32 {
        self.state.stock.get(part_number).copied().unwrap_or(0)
    }

    fn stock_up(&mut self, config: &PartsConfig) {
        for s in &config.inventory {
            self.state
                .stock
                .entry(s.part_number.clone())
                .or_insert(s.quantity);
        }
    }

    fn update_body(key: &str, order: &Order) -> Option<Body> {
        let (placed, arrives_at_ms, detail) = match &order.state {
            OrderState::Placed { arrives, detail } => (true, *arrives, detail.clone()),
            OrderState::Shipped { arrives, detail } => (true, *arrives, detail.clone()),
            OrderState::Delivered { detail } => (true, None, detail.clone()),
            OrderState::Failed { detail } | OrderState::Cancelled { detail } => {
                (false, None, detail.clone())
            }
            OrderState::Waiting | OrderState::Backoff { .. } => return None,
        };
        Some(Body::PartOrderUpdate {
            key: key.to_owned(),
            placed,
            arrives_at_ms,
            detail,
        })
    }

    fn tell_customer(&mut self, ctx: &mut Ctx, key: &str) {
        let order = &self.state.orders[key];
        if let Some(body) = Self::update_body(key, order) {
            let to = Address::Customer(order.customer.clone());
            send(ctx, &mut self.state.seq, &self.me, Self::KIND, to, body);
        }
    }

    fn order_supplier(&mut self, ctx: &mut Ctx, key: &str) {
        let order = self.state.orders.get_mut(key).expect("order exists");
        order.attempts += 1;
        order.state = OrderState::Waiting;
        order.at = ctx.now();
        let body = Body::SupplierOrder {
            key: key.to_owned(),
            part_number: order.part_number.clone(),
            quantity: order.quantity,
            device: order.device.clone(),
        };
        let to = Address::Supplier(self.tenant.clone());
        send(ctx, &mut self.state.seq, &self.me, Self::KIND, to, body);
    }

    fn order_part(
        &mut self,
        ctx: &mut Ctx,
        config: &PartsConfig,
        req: PartOrderRequest,
    ) -> std::result::Result<Status, String> {
        let PartOrderRequest {
            key,
            part_number,
            quantity,
            customer,
            device,
            case_id,
            work_order_id,
            consumable,
        } = req;
        check_key("order key", &key)?;
        check_key("part_number", &part_number)?;
        for (what, v) in [
            ("device", &device),
            ("case_id", &case_id),
            ("work_order_id", &work_order_id),
        ] {
            if !v.is_empty() {
                check_key(what, v)?;
            }
        }
        if quantity == 0 {
            return Err(format!("order {key:?} asks for 0 units"));
        }
        if tenant_of(&customer) != self.tenant || !customer.contains(':') {
            return Err(format!(
                "order {key:?} is for customer {customer:?}, not one of tenant {}",
                self.tenant
            ));
        }
        if self.state.orders.contains_key(&key) {
            // Idempotent: the outcome again if there is one; an open order answers later.
            self.tell_customer(ctx, &key);
            return Ok(Status::Duplicate);
        }
        let now = ctx.now();
        let room = make_room(
            &mut self.state.orders,
            now,
            config.retain,
            config.max_records,
            Order::finished_at,
        );
        if room.forgot {
            ctx.changed();
        }
        if !room.fits {
            return Err(format!(
                "the desk is full: {} orders are open",
                self.state.orders.len()
            ));
        }
        claim(ctx, Self::KIND, &self.tenant, &key);
        self.state.ids += 1;
        let id = format!("{}:po-{}", self.tenant, self.state.ids);
        let in_stock = self
            .state
            .stock
            .get_mut(&part_number)
            .filter(|n| **n >= quantity);
        let mut order = Order {
            customer,
            part_number,
            quantity,
            attempts: 0,
            at: now,
            state: OrderState::Waiting,
            results: Vec::new(),
            id,
            created: now,
            device,
            case_id,
            work_order_id,
            consumable,
            tracking: String::new(),
        };
        if let Some(units) = in_stock {
            *units -= quantity;
            order.state = OrderState::Placed {
                arrives: Some(now.saturating_add(config.lead_time(&order.part_number))),
                detail: "from local stock".into(),
            };
            self.state.orders.insert(key.clone(), order);
            self.tell_customer(ctx, &key);
        } else {
            self.state.orders.insert(key.clone(), order);
            self.order_supplier(ctx, &key);
        }
        ctx.changed();
        Ok(Status::Done)
    }

    fn supplier_result(
        &mut self,
        ctx: &mut Ctx,
        config: &PartsConfig,
        mail_id: String,
        answer: Answer,
    ) -> Status {
        let Answer {
            key,
            accepted,
            arrives_at_ms,
            detail,
        } = answer;
        let now = ctx.now();
        let Some(order) = self.state.orders.get_mut(&key) else {
            tracing::debug!(tenant = %self.tenant, key = %key, "supplier result for an unknown order");
            return Status::Ignored;
        };
        if order.results.contains(&mail_id) {
            return Status::Ignored;
        }
        match (&order.state, accepted) {
            (
                OrderState::Placed { .. }
                | OrderState::Shipped { .. }
                | OrderState::Delivered { .. }
                | OrderState::Cancelled { .. },
                _,
            )
            | (OrderState::Backoff { .. } | OrderState::Failed { .. }, false) => {
                return Status::Ignored;
            }
            // The supplier holds the order, whatever we had decided: a late acceptance of an
            // earlier attempt is still a placed order, and the customer must hear of it.
            (
                OrderState::Waiting | OrderState::Backoff { .. } | OrderState::Failed { .. },
                true,
            ) => {
                if let OrderState::Backoff { due } = order.state {
                    ctx.disarm(due, &retry_tag(&key));
                }
                order.state = OrderState::Placed {
                    arrives: arrives_at_ms,
                    detail,
                };
                order.results.clear();
                order.at = now;
                self.tell_customer(ctx, &key);
            }
            (OrderState::Waiting, false) => {
                order.at = now;
                if order.attempts >= config.max_attempts {
                    order.state = OrderState::Failed {
                        detail: format!(
                            "supplier refused {} times, last: {detail}",
                            order.attempts
                        ),
                    };
                    order.results.clear();
                    self.tell_customer(ctx, &key);
                } else {
                    let due = now.saturating_add(config.backoff(order.attempts));
                    order.state = OrderState::Backoff { due };
                    order.results.push(mail_id);
                    ctx.arm(due, &retry_tag(&key));
                }
            }
        }
        ctx.changed();
        Status::Done
    }
}

impl PartsDesk {
    /// A supplier's report of an order's progress: states only move forward (a cancel
    /// only before shipping); the same state again only adds references newly given.
    /// A backward move changes nothing and is [`Status::Ignored`].
    fn progress(&mut self, ctx: &mut Ctx, p: OrderProgress) -> std::result::Result<Status, String> {
        check_key("part order id", &p.part_order_id)?;
        for (what, v) in [
            ("supplier_reference", &p.supplier_reference),
            ("tracking_reference", &p.tracking_reference),
        ] {
            if v.len() > super::MAX_KEY_LEN {
                return Err(format!("{what} is over {} bytes", super::MAX_KEY_LEN));
            }
        }
        let Some(key) = self
            .order_by_id(&p.part_order_id)
            .map(|(k, _)| k.to_owned())
        else {
            return Err(format!("unknown part order {:?}", p.part_order_id));
        };
        let now = ctx.now();
        let order = self.state.orders.get_mut(&key).expect("found above");
        let target: u8 = match p.state {
            SupplierState::Confirmed => 2,
            SupplierState::Shipped => 3,
            SupplierState::Delivered => 4,
            SupplierState::Cancelled | SupplierState::Failed => 5,
        };
        let current = order.state.rank();
        let same = matches!(
            (&order.state, p.state),
            (OrderState::Placed { .. }, SupplierState::Confirmed)
                | (OrderState::Shipped { .. }, SupplierState::Shipped)
                | (OrderState::Delivered { .. }, SupplierState::Delivered)
                | (OrderState::Cancelled { .. }, SupplierState::Cancelled)
                | (OrderState::Failed { .. }, SupplierState::Failed)
        );
        let cancel_too_late = p.state == SupplierState::Cancelled && current > 2;
        if !same && (target <= current || cancel_too_late) {
            return Ok(Status::Ignored);
        }
        let mut changed = false;
        if !p.tracking_reference.is_empty() && order.tracking != p.tracking_reference {
            order.tracking = p.tracking_reference.clone();
            changed = true;
        }
        let old_detail = match &order.state {
            OrderState::Placed { detail, .. }
            | OrderState::Shipped { detail, .. }
            | OrderState::Delivered { detail }
            | OrderState::Cancelled { detail }
            | OrderState::Failed { detail } => detail.clone(),
            OrderState::Waiting | OrderState::Backoff { .. } => String::new(),
        };
        let old_arrives = match order.state {
            OrderState::Placed { arrives, .. } | OrderState::Shipped { arrives, .. } => arrives,
            _ => None,
        };
        let detail = if p.supplier_reference.is_empty() {
            old_detail
        } else {
            p.supplier_reference.clone()
        };
        let arrives = p.expected_delivery_at_ms.or(old_arrives);
        let next = match p.state {
            SupplierState::Confirmed => OrderState::Placed { arrives, detail },
            SupplierState::Shipped => OrderState::Shipped { arrives, detail },
            SupplierState::Delivered => OrderState::Delivered { detail },
            SupplierState::Cancelled => OrderState::Cancelled { detail },
            SupplierState::Failed => OrderState::Failed { detail },
        };
        if next != order.state {
            if let OrderState::Backoff { due } = order.state {
                ctx.disarm(due, &retry_tag(&key));
            }
            order.state = next;
            order.results.clear();
            changed = true;
        }
        if !changed {
            return Ok(Status::Duplicate);
        }
        order.at = now;
        if !same {
            self.tell_customer(ctx, &key);
        }
        ctx.changed();
        Ok(Status::Done)
    }
}

impl Twin for PartsDesk {
    type Msg = Mail;
    type Reply = Status;
    type Env = Tenants<PartsConfig>;
    const KIND: &'static str = "parts";

    fn create(id: &str, env: &Self::Env) -> Result<Self> {
        let tenant = tenant_id(Self::KIND, id)?;
        let mut desk = Self {
            me: Address::Parts(tenant.clone()),
            tenant,
            state: State::default(),
        };
        desk.stock_up(env.get(id));
        Ok(desk)
    }

    fn restore(id: &str, snapshot: &[u8], env: &Self::Env) -> Result<Self> {
        let tenant = tenant_id(Self::KIND, id)?;
        let mut desk = Self {
            me: Address::Parts(tenant.clone()),
            tenant,
            state: decode_snapshot(id, snapshot)?,
        };
        desk.number_orders();
        // Part numbers added to the configuration since: they start with their quantity.
        // Not written until the next change, and taken again on every restore till then.
        desk.stock_up(env.get(id));
        Ok(desk)
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).expect("plain data always serialises")
    }

    fn handle(&mut self, mail: Mail, ctx: &mut Ctx, env: &Self::Env) -> Status {
        let config = env.get(&self.tenant);
        if let Err(why) = admit(&self.me, &mail) {
            return refuse(Self::KIND, &self.tenant, &mail.id, why);
        }
        let supplier = Address::Supplier(self.tenant.clone());
        let out = match mail.body {
            Body::OrderPart {
                key,
                part_number,
                quantity,
                customer,
                case_id,
                device,
            } => {
                let req = PartOrderRequest {
                    key,
                    part_number,
                    quantity,
                    customer,
                    device,
                    case_id,
                    work_order_id: String::new(),
                    consumable: false,
                };
                self.order_part(ctx, config, req)
            }
            Body::PlaceOrder(req) => self.order_part(ctx, config, req),
            Body::SupplierProgress(_) if mail.from != supplier => Err(format!(
                "supplier progress comes from {supplier:?}, not {:?}",
                mail.from
            )),
            Body::SupplierProgress(p) => self.progress(ctx, p),
            Body::SupplierResult { .. } if mail.from != supplier => Err(format!(
                "supplier results come from {supplier:?}, not {:?}",
                mail.from
            )),
            Body::SupplierResult {
                key,
                accepted,
                arrives_at_ms,
                detail,
            } => check_key("mail id", &mail.id).map(|()| {
                let answer = Answer {
                    key,
                    accepted,
                    arrives_at_ms,
                    detail,
                };
                self.supplier_result(ctx, config, mail.id.clone(), answer)
            }),
            other => Err(format!(
                "the parts desk does not take {}",
                body_name(&other)
            )),
        };
        out.unwrap_or_else(|why| refuse(Self::KIND, &self.tenant, &mail.id, why))
    }

    fn on_timer(&mut self, tag: &str, ctx: &mut Ctx, _env: &Self::Env) {
        let Some(key) = tag.strip_prefix("retry/") else {
            tracing::warn!(tenant = %self.tenant, tag, "unknown timer");
            return;
        };
        match self.state.orders.get(key).map(|o| &o.state) {
            Some(OrderState::Backoff { due }) if *due <= ctx.now() => {
                self.order_supplier(ctx, key);
            }
            _ => tracing::debug!(tenant = %self.tenant, key, "stale retry timer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, mail, sent};
    use super::*;
    use crate::store::{IdempotencyMode, Op};

    const T0: u64 = 1_700_000_000_000;

    fn env(stock: &[(&str, u32)]) -> Tenants<PartsConfig> {
        Tenants::all(PartsConfig {
            inventory: stock
                .iter()
                .map(|(p, q)| StockConfig {
                    part_number: (*p).into(),
                    quantity: *q,
                    local_lead_time: Span::days(1),
                })
                .collect(),
            max_attempts: 4,
            ..PartsConfig::default()
        })
    }

    fn order(key: &str, part: &str, quantity: u32) -> Mail {
        mail(
            &format!("t1:cust-1/{key}"),
            Address::Customer("t1:cust-1".into()),
            Address::Parts("t1".into()),
            Body::OrderPart {
                key: key.into(),
                part_number: part.into(),
                quantity,
                customer: "t1:cust-1".into(),
                case_id: "case-1".into(),
                device: "t1:dev-1".into(),
            },
        )
    }

    fn result(id: &str, key: &str, accepted: bool) -> Mail {
        mail(
            id,
            Address::Supplier("t1".into()),
            Address::Parts("t1".into()),
            Body::SupplierResult {
                key: key.into(),
                accepted,
                arrives_at_ms: accepted.then_some(T0 + 3 * 86_400_000),
                detail: if accepted { "SUP-77" } else { "out of stock" }.into(),
            },
        )
    }

    /// Runs one step, then a restore from its snapshot, as the host would after a restart.
    fn step(
        desk: &mut PartsDesk,
        env: &Tenants<PartsConfig>,
        now: u64,
        m: Mail,
    ) -> (Status, Vec<Mail>, Ctx) {
        let mut c = ctx(now);
        let status = desk.handle(m, &mut c, env);
        if c.is_changed() {
            *desk = PartsDesk::restore("t1", &desk.snapshot(), env).unwrap();
        }
        let mails = sent(&c);
        (status, mails, c)
    }

    fn supplier_orders(mails: &[Mail]) -> usize {
        mails
            .iter()
            .filter(|m| matches!(m.body, Body::SupplierOrder { .. }))
            .count()
    }

    #[test]
    fn stock_serves_an_order_once_however_often_it_is_sent() {
        let env = env(&[("DESCALER", 2)]);
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        let (status, mails, c) = step(&mut desk, &env, T0, order("case-1/DESCALER", "DESCALER", 1));
        assert_eq!(status, Status::Done);
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].id, "t1/parts/1");
        assert_eq!(mails[0].from, Address::Parts("t1".into()));
        assert_eq!(mails[0].to, Address::Customer("t1:cust-1".into()));
        let update = mails[0].body.clone();
        assert_eq!(
            update,
            Body::PartOrderUpdate {
                key: "case-1/DESCALER".into(),
                placed: true,
                arrives_at_ms: Some(T0 + 86_400_000),
                detail: "from local stock".into(),
            }
        );
        let claims: Vec<_> = c
            .ops()
            .iter()
            .filter(|op| {
                matches!(
                    op,
                    Op::PutIdempotency {
                        mode: IdempotencyMode::CreateOnly,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(claims.len(), 1, "the key is claimed once, with the order");
        assert_eq!(desk.stock("DESCALER"), 1);

        for i in 0..5 {
            let (status, mails, c) = step(
                &mut desk,
                &env,
                T0 + i * 1000,
                order("case-1/DESCALER", "DESCALER", 1),
            );
            assert_eq!(status, Status::Duplicate);
            assert_eq!(mails.len(), 1, "the outcome again");
            assert_eq!(mails[0].body, update);
            assert!(
                !c.ops()
                    .iter()
                    .any(|op| matches!(op, Op::PutIdempotency { .. }))
            );
        }
        assert_eq!(desk.stock("DESCALER"), 1, "reserved once");
    }

    #[test]
    fn short_stock_goes_to_the_supplier_once() {
        let env = env(&[("PUMP", 1)]);
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        let (_, mails, _) = step(&mut desk, &env, T0, order("case-2/PUMP", "PUMP", 2));
        assert_eq!(
            mails.iter().map(|m| (&m.to, &m.body)).collect::<Vec<_>>(),
            [(
                &Address::Supplier("t1".into()),
                &Body::SupplierOrder {
                    key: "case-2/PUMP".into(),
                    part_number: "PUMP".into(),
                    quantity: 2,
                    // The supplier delivers to the device's site.
                    device: "t1:dev-1".into(),
                }
            )]
        );
        assert_eq!(desk.order("case-2/PUMP").unwrap().device, "t1:dev-1");
        assert_eq!(desk.stock("PUMP"), 1, "stock untouched");
        // Retried while the supplier has not answered: nothing new, nothing misleading.
        for _ in 0..5 {
            let (status, mails, _) = step(&mut desk, &env, T0 + 5, order("case-2/PUMP", "PUMP", 2));
            assert_eq!((status, mails.len()), (Status::Duplicate, 0));
        }
        let (status, mails, _) = step(
            &mut desk,
            &env,
            T0 + 10,
            result("sup/1", "case-2/PUMP", true),
        );
        assert_eq!(status, Status::Done);
        assert_eq!(
            mails[0].body,
            Body::PartOrderUpdate {
                key: "case-2/PUMP".into(),
                placed: true,
                arrives_at_ms: Some(T0 + 3 * 86_400_000),
                detail: "SUP-77".into()
            }
        );
        // The result again, or another acceptance: ignored. A result for no order: ignored.
        for (id, key) in [
            ("sup/1", "case-2/PUMP"),
            ("sup/2", "case-2/PUMP"),
            ("sup/3", "nope"),
        ] {
            let (status, mails, c) = step(&mut desk, &env, T0 + 20, result(id, key, true));
            assert_eq!(
                (status, mails.len(), c.ops().len()),
                (Status::Ignored, 0, 0)
            );
        }
        let (_, mails, _) = step(&mut desk, &env, T0 + 30, order("case-2/PUMP", "PUMP", 2));
        assert_eq!(supplier_orders(&mails), 0);
        assert!(matches!(
            mails[0].body,
            Body::PartOrderUpdate { placed: true, .. }
        ));
    }

    #[test]
    fn refusals_back_off_exponentially_then_fail() {
        let env = env(&[]);
        let config = env.get("t1");
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        let key = "case-3/BOARD";
        let (_, mails, _) = step(&mut desk, &env, T0, order(key, "BOARD", 1));
        assert_eq!(supplier_orders(&mails), 1);
        let mut now = T0;
        let mut waits = Vec::new();
        for attempt in 1..=3u32 {
            let (status, mails, c) = step(
                &mut desk,
                &env,
                now,
                result(&format!("sup/r{attempt}"), key, false),
            );
            assert_eq!((status, mails.len()), (Status::Done, 0));
            let armed: Vec<(u64, Vec<u8>)> = c
                .ops()
                .iter()
                .filter_map(|op| match op {
                    Op::Schedule { due_ms, item, .. } => Some((*due_ms, item.clone())),
                    _ => None,
                })
                .collect();
            assert_eq!(armed.len(), 1);
            let due = armed[0].0;
            assert_eq!(
                armed[0].1,
                crate::host::timer_item("t1", &format!("retry/{key}"))
            );
            waits.push(due - now);
            // The refusal again (redelivered) and a retried OrderPart change nothing meanwhile.
            let (status, _, c) = step(
                &mut desk,
                &env,
                now + 1,
                result(&format!("sup/r{attempt}"), key, false),
            );
            assert_eq!((status, c.ops().len()), (Status::Ignored, 0));
            let (_, mails, _) = step(&mut desk, &env, now + 1, order(key, "BOARD", 1));
            assert!(mails.is_empty());
            // A timer fired early (it cannot be, but a stale one might) does nothing.
            let mut c = ctx(due - 1);
            desk.on_timer(&format!("retry/{key}"), &mut c, &env);
            assert!(c.ops().is_empty());
            now = due;
            let mut c = ctx(now);
            desk.on_timer(&format!("retry/{key}"), &mut c, &env);
            assert_eq!(supplier_orders(&sent(&c)), 1, "attempt {}", attempt + 1);
            assert_eq!(desk.order(key).unwrap().attempts, attempt + 1);
            // A redelivered refusal of an earlier attempt is not this attempt's answer.
            let (status, _, _) = step(&mut desk, &env, now, result("sup/r1", key, false));
            assert_eq!(status, Status::Ignored);
        }
        assert_eq!(waits, [60_000, 120_000, 240_000]);
        assert_eq!(config.backoff(10), 3_600_000, "capped at retry_max");

        // The fourth refusal is the last allowed attempt: the order fails, the customer hears.
        let (status, mails, c) = step(&mut desk, &env, now, result("sup/r4", key, false));
        assert_eq!(status, Status::Done);
        assert!(!c.ops().iter().any(|op| matches!(op, Op::Schedule { .. })));
        match &mails[..] {
            [m] => match &m.body {
                Body::PartOrderUpdate {
                    placed: false,
                    detail,
                    ..
                } => {
                    assert!(detail.contains("refused 4 times"), "{detail}")
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        // Asked again: the failure again, and still no new supplier order.
        let (status, mails, _) = step(&mut desk, &env, now + 1, order(key, "BOARD", 1));
        assert_eq!(status, Status::Duplicate);
        assert!(matches!(
            mails[..],
            [Mail {
                body: Body::PartOrderUpdate { placed: false, .. },
                ..
            }]
        ));
    }

    #[test]
    fn an_acceptance_during_backoff_cancels_the_retry() {
        let env = env(&[]);
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        step(&mut desk, &env, T0, order("k", "BOARD", 1));
        let (_, _, c) = step(&mut desk, &env, T0, result("sup/1", "k", false));
        let due = match desk.order("k").unwrap().state {
            OrderState::Backoff { due } => due,
            ref s => panic!("{s:?}"),
        };
        assert!(
            c.ops()
                .iter()
                .any(|op| matches!(op, Op::Schedule { due_ms, .. } if *due_ms == due))
        );
        let (status, mails, c) = step(&mut desk, &env, T0 + 5, result("sup/2", "k", true));
        assert_eq!(status, Status::Done);
        assert!(
            c.ops()
                .iter()
                .any(|op| matches!(op, Op::Unschedule { due_ms, .. } if *due_ms == due))
        );
        assert!(matches!(
            mails[0].body,
            Body::PartOrderUpdate { placed: true, .. }
        ));
        let mut c = ctx(due);
        desk.on_timer("retry/k", &mut c, &env);
        assert!(c.ops().is_empty(), "a stale timer orders nothing");
    }

    #[test]
    fn foreign_misaddressed_forged_and_unknown_mail_is_refused() {
        let env = env(&[("DESCALER", 5)]);
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        let mut foreign = order("k", "DESCALER", 1);
        foreign.from = Address::Customer("t2:cust-1".into());
        let mut misaddressed = order("k", "DESCALER", 1);
        misaddressed.to = Address::Parts("t2".into());
        let mut other_customer = order("k", "DESCALER", 1);
        if let Body::OrderPart { customer, .. } = &mut other_customer.body {
            *customer = "t2:cust-9".into();
        }
        let mut forged = result("x", "k", true);
        forged.from = Address::Customer("t1:cust-1".into());
        let unknown = mail(
            "t1:cust-1/9",
            Address::Customer("t1:cust-1".into()),
            Address::Parts("t1".into()),
            Body::CustomerAnswer {
                question_id: "q".into(),
                answer: "yes".into(),
            },
        );
        for m in [
            foreign,
            misaddressed,
            other_customer,
            forged,
            unknown,
            order("", "X", 1),
            order("k", "X", 0),
        ] {
            let mut c = ctx(T0);
            let status = desk.handle(m.clone(), &mut c, &env);
            assert!(matches!(status, Status::Refused(_)), "{m:?}: {status:?}");
            assert!(c.ops().is_empty() && !c.is_changed(), "{m:?}");
        }
        assert_eq!(desk.stock("DESCALER"), 5);
        assert!(desk.order("k").is_none());
    }

    #[test]
    fn a_full_desk_forgets_finished_orders_and_refuses_when_all_are_open() {
        let env = Tenants::all(PartsConfig {
            max_records: 3,
            ..PartsConfig::default()
        });
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        for k in ["a", "b", "c"] {
            let (status, _, _) = step(&mut desk, &env, T0, order(k, "X", 1));
            assert_eq!(status, Status::Done);
        }
        // a, b, c wait for the supplier: a fourth cannot be taken.
        let (status, _, _) = step(&mut desk, &env, T0, order("d", "X", 1));
        assert!(matches!(status, Status::Refused(_)));
        step(&mut desk, &env, T0 + 1, result("s1", "a", true));
        let (status, _, _) = step(&mut desk, &env, T0 + 2, order("d", "X", 1));
        assert_eq!(status, Status::Done);
        assert!(desk.order("a").is_none(), "the finished order made room");
    }

    fn place(key: &str, part: &str) -> Mail {
        mail(
            "grpc/1",
            Address::Parts("t1".into()),
            Address::Parts("t1".into()),
            Body::PlaceOrder(PartOrderRequest {
                key: key.into(),
                part_number: part.into(),
                quantity: 1,
                customer: "t1:cust-1".into(),
                device: "t1:boiler-1".into(),
                case_id: String::new(),
                work_order_id: "t1:wo-1".into(),
                consumable: false,
            }),
        )
    }

    fn progress(id: &str, state: SupplierState, tracking: &str) -> Mail {
        mail(
            "grpc/2",
            Address::Supplier("t1".into()),
            Address::Parts("t1".into()),
            Body::SupplierProgress(OrderProgress {
                part_order_id: id.into(),
                state,
                supplier_reference: String::new(),
                expected_delivery_at_ms: None,
                tracking_reference: tracking.into(),
            }),
        )
    }

    #[test]
    fn an_integrators_order_is_placed_once_and_numbered() {
        let env = env(&[("PUMP", 1)]);
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        let (status, _, _) = step(&mut desk, &env, T0, place("api/a", "PUMP"));
        assert_eq!(status, Status::Done);
        let (status, _, c) = step(&mut desk, &env, T0 + 1, place("api/a", "PUMP"));
        assert_eq!(status, Status::Duplicate);
        assert!(
            !c.ops()
                .iter()
                .any(|op| matches!(op, Op::PutIdempotency { .. }))
        );
        let (_, mails, _) = step(&mut desk, &env, T0 + 2, place("api/b", "PUMP"));
        assert_eq!(supplier_orders(&mails), 1, "stock is used up");
        let ids: Vec<&str> = desk.orders().map(|(_, o)| o.id.as_str()).collect();
        assert_eq!(ids, ["t1:po-1", "t1:po-2"]);
        let (key, o) = desk.order_by_id("t1:po-1").unwrap();
        assert_eq!(key, "api/a");
        assert_eq!(
            (o.device.as_str(), o.work_order_id.as_str(), o.created),
            ("t1:boiler-1", "t1:wo-1", T0)
        );
        assert!(matches!(o.state, OrderState::Placed { .. }));
        assert!(matches!(
            desk.order("api/b").unwrap().state,
            OrderState::Waiting
        ));
    }

    #[test]
    fn supplier_progress_only_moves_forward() {
        let env = env(&[]);
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        step(&mut desk, &env, T0, place("api/a", "BOARD"));
        let id = "t1:po-1";
        let (status, mails, _) = step(
            &mut desk,
            &env,
            T0 + 1,
            progress(id, SupplierState::Shipped, "TRK-1"),
        );
        assert_eq!(status, Status::Done);
        assert!(matches!(
            mails[..],
            [Mail {
                body: Body::PartOrderUpdate { placed: true, .. },
                ..
            }]
        ));
        let o = desk.order("api/a").unwrap();
        assert!(matches!(o.state, OrderState::Shipped { .. }));
        assert_eq!(o.tracking, "TRK-1");
        // Again: nothing; backward or a cancel after shipping: ignored.
        let (status, _, c) = step(
            &mut desk,
            &env,
            T0 + 2,
            progress(id, SupplierState::Shipped, ""),
        );
        assert_eq!((status, c.ops().len()), (Status::Duplicate, 0));
        for back in [SupplierState::Confirmed, SupplierState::Cancelled] {
            let (status, _, c) = step(&mut desk, &env, T0 + 3, progress(id, back, ""));
            assert_eq!((status, c.ops().len()), (Status::Ignored, 0), "{back:?}");
        }
        let (status, _, _) = step(
            &mut desk,
            &env,
            T0 + 4,
            progress(id, SupplierState::Delivered, ""),
        );
        assert_eq!(status, Status::Done);
        // A late acceptance of the supplier order changes nothing any more.
        let (status, _, _) = step(&mut desk, &env, T0 + 5, result("sup/9", "api/a", true));
        assert_eq!(status, Status::Ignored);
        // Progress from anyone but the supplier, or for an unknown order, is refused.
        let mut forged = progress(id, SupplierState::Failed, "");
        forged.from = Address::Parts("t1".into());
        for m in [forged, progress("t1:po-9", SupplierState::Failed, "")] {
            let mut c = ctx(T0);
            assert!(matches!(desk.handle(m, &mut c, &env), Status::Refused(_)));
            assert!(c.ops().is_empty());
        }
    }

    #[test]
    fn a_cancel_in_backoff_disarms_the_retry() {
        let env = env(&[]);
        let mut desk = PartsDesk::create("t1", &env).unwrap();
        step(&mut desk, &env, T0, place("api/a", "BOARD"));
        step(&mut desk, &env, T0, result("sup/1", "api/a", false));
        let (status, _, c) = step(
            &mut desk,
            &env,
            T0 + 1,
            progress("t1:po-1", SupplierState::Cancelled, ""),
        );
        assert_eq!(status, Status::Done);
        assert!(c.ops().iter().any(|op| matches!(op, Op::Unschedule { .. })));
        assert!(matches!(
            desk.order("api/a").unwrap().state,
            OrderState::Cancelled { .. }
        ));
    }

    #[test]
    fn settings_load_from_toml_and_bad_values_are_named() {
        let text = r#"
            [default]
            max_attempts = 3
            [tenant.t1]
            retry_first = "30s"
            [[tenant.t1.inventory]]
            part_number = "DESCALER-250"
            quantity = 40
            local_lead_time = "2d"
        "#;
        let t: Tenants<PartsConfig> = toml::from_str(text).unwrap();
        t.validate().unwrap();
        assert_eq!(t.get("t9").max_attempts, 3);
        assert_eq!(
            t.get("t1").max_attempts,
            5,
            "a tenant's section starts from defaults"
        );
        assert_eq!(t.get("t1").inventory[0].local_lead_time, Span::days(2));
        assert_eq!(t.get("t1").retry_max, Span::hours(1));

        let bad: Tenants<PartsConfig> =
            toml::from_str("[tenant.t1]\nretry_first = \"2h\"\n").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("tenant t1") && err.contains("retry_max"),
            "{err}"
        );
        let err = toml::from_str::<Tenants<PartsConfig>>("[default]\nretry_first = \"1.5m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("1.5m"), "{err}");
    }
}
