//! The built-in parts supplier: a `PartsSupplier` gRPC server the node runs on loopback
//! when no partner is configured, so part orders always take the real client path.
//!
//! It keeps its books in memory (a real supplier keeps them; this one starts empty with
//! the node), honours idempotency keys as the contract demands, takes stock and lead
//! times from `[integrations.builtin_supplier]`, and can be told to fail, for tests.

use crate::config::BuiltinSupplierConfig;
use caretwin_actors::host::clock::Clock;
use caretwin_actors::services::MAX_KEY_LEN;
use caretwin_proto::v1::parts_supplier_server::PartsSupplier;
use caretwin_proto::v1::{
    GetOrderRequest, OrderRefusal, PlaceOrderRequest, PlaceOrderResponse, SupplierOrder,
    place_order_response,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::{Request, Response, Status};

/// What the supplier holds.
#[derive(Default)]
struct Books {
    /// Accepted orders by (tenant, key).
    orders: BTreeMap<(String, String), SupplierOrder>,
    /// Where each accepted order goes, by (tenant, key): as the first request said.
    deliver_to: BTreeMap<(String, String), String>,
    /// Units left of the parts with limited stock.
    stock: BTreeMap<String, u32>,
    /// Orders placed in all: the reference counter.
    placed: u64,
}

/// Failures to inject, each for the next so many `PlaceOrder` calls.
#[derive(Default)]
struct Faults {
    /// Answer UNAVAILABLE without doing anything.
    fail: u32,
    /// Place the order, then answer UNAVAILABLE as if the supplier crashed before its
    /// answer left.
    crash_after_recording: u32,
}

/// The built-in supplier.
pub struct InProcessSupplier {
    clock: Arc<dyn Clock>,
    config: BuiltinSupplierConfig,
    books: Mutex<Books>,
    faults: Mutex<Faults>,
    calls: AtomicU64,
}

impl InProcessSupplier {
    /// A supplier with `config`'s stock, dating orders by `clock`.
    pub fn new(config: BuiltinSupplierConfig, clock: Arc<dyn Clock>) -> Self {
        let books = Books {
            stock: config
                .inventory
                .iter()
                .map(|s| (s.part_number.clone(), s.quantity))
                .collect(),
            ..Books::default()
        };
        Self {
            clock,
            config,
            books: Mutex::new(books),
            faults: Mutex::new(Faults::default()),
            calls: AtomicU64::new(0),
        }
    }

    /// The next `n` `PlaceOrder` calls fail with UNAVAILABLE and change nothing.
    pub fn fail_next(&self, n: u32) {
        self.faults.lock().expect("faults lock").fail = n;
    }

    /// The next `n` `PlaceOrder` calls place the order (if new) and then fail with
    /// UNAVAILABLE, as a supplier that crashed after recording but before answering.
    pub fn crash_after_recording_next(&self, n: u32) {
        self.faults
            .lock()
            .expect("faults lock")
            .crash_after_recording = n;
    }

    /// Adds `units` of a part with limited stock.
    pub fn restock(&self, part_number: &str, units: u32) {
        let mut books = self.books.lock().expect("books lock");
        let n = books.stock.entry(part_number.to_owned()).or_insert(0);
        *n = n.saturating_add(units);
    }

    /// `PlaceOrder` calls received, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Orders placed in all (each key once).
    pub fn orders_placed(&self) -> u64 {
        self.books.lock().expect("books lock").placed
    }

    /// The order `key` placed for `tenant`, if any.
    pub fn order(&self, tenant: &str, key: &str) -> Option<SupplierOrder> {
        let books = self.books.lock().expect("books lock");
        books
            .orders
            .get(&(tenant.to_owned(), key.to_owned()))
            .cloned()
    }

    /// Where the order `key` placed for `tenant` is delivered (empty: the tenant's
    /// default depot), if it was placed.
    pub fn deliver_to(&self, tenant: &str, key: &str) -> Option<String> {
        let books = self.books.lock().expect("books lock");
        books
            .deliver_to
            .get(&(tenant.to_owned(), key.to_owned()))
            .cloned()
    }

    fn lead_time_ms(&self, part_number: &str) -> u64 {
        self.config
            .inventory
            .iter()
            .find(|s| s.part_number == part_number)
            .and_then(|s| s.lead_time)
            .unwrap_or(self.config.lead_time)
            .as_millis() as u64
    }

    /// Decides one order: the same answer for a known key, else from stock.
    fn decide(&self, r: PlaceOrderRequest) -> Result<place_order_response::Outcome, Status> {
        let mut books = self.books.lock().expect("books lock");
        let id = (r.tenant.clone(), r.idempotency_key.clone());
        if let Some(order) = books.orders.get(&id) {
            if order.part_number != r.part_number || order.quantity != r.quantity {
                return Err(Status::already_exists(format!(
                    "key {:?} already placed an order of {} x {}",
                    r.idempotency_key, order.quantity, order.part_number
                )));
            }
            return Ok(place_order_response::Outcome::Accepted(order.clone()));
        }
        if let Some(left) = books.stock.get_mut(&r.part_number) {
            if *left < r.quantity {
                return Ok(place_order_response::Outcome::Refused(OrderRefusal {
                    reason: format!(
                        "out of stock: {} units of {} left, {} asked",
                        left, r.part_number, r.quantity
                    ),
                }));
            }
            *left -= r.quantity;
        }
        books.placed += 1;
        let now = self.clock.now_ms();
        let order = SupplierOrder {
            supplier_reference: format!("SO-{:06}", books.placed),
            arrives_at_ms: now.saturating_add(self.lead_time_ms(&r.part_number)) as i64,
            placed_at_ms: now as i64,
            idempotency_key: r.idempotency_key,
            tenant: r.tenant,
            part_number: r.part_number,
            quantity: r.quantity,
        };
        tracing::info!(tenant = %order.tenant, key = %order.idempotency_key, reference = %order.supplier_reference, "built-in supplier placed an order");
        books.deliver_to.insert(id.clone(), r.deliver_to);
        books.orders.insert(id, order.clone());
        Ok(place_order_response::Outcome::Accepted(order))
    }
}

/// Checks the fields every request names.
fn check_key(tenant: &str, key: &str) -> Result<(), Status> {
    if tenant.is_empty() || tenant.contains(':') || tenant.contains('/') {
        return Err(Status::invalid_argument(format!(
            "tenant {tenant:?} must be a tenant id (no ':' or '/')"
        )));
    }
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Status::invalid_argument(format!(
            "idempotency_key must be 1..={MAX_KEY_LEN} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl PartsSupplier for InProcessSupplier {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = request.into_inner();
        check_key(&r.tenant, &r.idempotency_key)?;
        if r.part_number.is_empty() || r.quantity == 0 {
            return Err(Status::invalid_argument(
                "part_number must be set and quantity at least 1",
            ));
        }
        let crash = {
            let mut faults = self.faults.lock().expect("faults lock");
            if faults.fail > 0 {
                faults.fail -= 1;
                return Err(Status::unavailable("supplier busy (injected fault)"));
            }
            let crash = faults.crash_after_recording > 0;
            faults.crash_after_recording = faults.crash_after_recording.saturating_sub(1);
            crash
        };
        let outcome = self.decide(r)?;
        if crash {
            return Err(Status::unavailable(
                "supplier crashed before answering (injected fault)",
            ));
        }
        Ok(Response::new(PlaceOrderResponse {
            outcome: Some(outcome),
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<SupplierOrder>, Status> {
        let r = request.into_inner();
        check_key(&r.tenant, &r.idempotency_key)?;
        self.order(&r.tenant, &r.idempotency_key)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no order for key {:?}", r.idempotency_key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BuiltinStock;
    use caretwin_actors::host::clock::ManualClock;

    fn request(key: &str, part: &str, quantity: u32) -> Request<PlaceOrderRequest> {
        Request::new(PlaceOrderRequest {
            idempotency_key: key.into(),
            tenant: "t1".into(),
            part_number: part.into(),
            quantity,
            deliver_to: String::new(),
        })
    }

    fn accepted(r: Result<Response<PlaceOrderResponse>, Status>) -> SupplierOrder {
        match r.unwrap().into_inner().outcome {
            Some(place_order_response::Outcome::Accepted(o)) => o,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn keys_are_honoured_stock_runs_out_and_faults_fire() {
        let config = BuiltinSupplierConfig {
            inventory: vec![BuiltinStock {
                part_number: "PUMP".into(),
                quantity: 1,
                lead_time: Some(std::time::Duration::from_secs(3600)),
            }],
            ..BuiltinSupplierConfig::default()
        };
        let s = InProcessSupplier::new(config, Arc::new(ManualClock::new(1_000)));
        let first = accepted(s.place_order(request("k1", "PUMP", 1)).await);
        assert_eq!(first.arrives_at_ms, 1_000 + 3_600_000);
        assert_eq!(
            accepted(s.place_order(request("k1", "PUMP", 1)).await),
            first
        );
        let other = s.place_order(request("k1", "PUMP", 2)).await.unwrap_err();
        assert_eq!(other.code(), tonic::Code::AlreadyExists);
        // Out of stock: refused, and the refusal holds nothing.
        match s
            .place_order(request("k2", "PUMP", 1))
            .await
            .unwrap()
            .into_inner()
            .outcome
        {
            Some(place_order_response::Outcome::Refused(r)) => {
                assert!(r.reason.contains("out of stock"), "{}", r.reason)
            }
            other => panic!("{other:?}"),
        }
        s.restock("PUMP", 1);
        accepted(s.place_order(request("k2", "PUMP", 1)).await);
        // Parts not listed are always in stock, at the default lead time.
        let o = accepted(s.place_order(request("k3", "VALVE", 9)).await);
        assert_eq!(o.arrives_at_ms, 1_000 + 2 * 86_400_000);

        s.fail_next(1);
        let e = s.place_order(request("k4", "VALVE", 1)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(
            s.order("t1", "k4").is_none(),
            "a failed call places nothing"
        );
        s.crash_after_recording_next(1);
        let e = s.place_order(request("k4", "VALVE", 1)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(s.order("t1", "k4").is_some(), "placed before the crash");
        accepted(s.place_order(request("k4", "VALVE", 1)).await);
        assert_eq!(s.orders_placed(), 4);
        assert_eq!(s.calls(), 9);

        let bad = s.place_order(request("", "VALVE", 1)).await.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let bad = s.place_order(request("k5", "VALVE", 0)).await.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let missing = s
            .get_order(Request::new(GetOrderRequest {
                tenant: "t2".into(),
                idempotency_key: "k1".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound, "tenants are apart");
    }
}
