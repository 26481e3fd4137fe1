//! The built-in field-service scheduler: a `FieldService` gRPC server on loopback that
//! books with the very deciding code of the scheduler desk
//! ([`caretwin_actors::services::scheduler::Scheduler`], one per tenant, in memory), so
//! slot finding exists once. It serves `field_service = "builtin"`, and tests of the
//! booking path over gRPC.

use caretwin_actors::host::clock::Clock;
use caretwin_actors::host::{Ctx, Twin};
use caretwin_actors::mail::{Address, Body, Mail};
use caretwin_actors::services::scheduler::{Scheduler, SchedulerConfig};
use caretwin_actors::services::{MAX_KEY_LEN, Status as DeskStatus, Tenants};
use caretwin_actors::store::{Key, Op};
use caretwin_proto::v1::field_service_server::FieldService;
use caretwin_proto::v1::{
    BookFieldAppointmentRequest, BookFieldAppointmentResponse, CancelFieldAppointmentRequest,
    CancelFieldAppointmentResponse, FieldAppointment, TimeSlot, book_field_appointment_response,
};
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

/// One tenant's calendar and the requests its keys were first sent with.
struct Desk {
    scheduler: Scheduler,
    requests: BTreeMap<String, Vec<u8>>,
    mail_seq: u64,
}

/// The built-in field-service scheduler.
pub struct InProcessFieldService {
    clock: Arc<dyn Clock>,
    config: Tenants<SchedulerConfig>,
    desks: Mutex<BTreeMap<String, Desk>>,
    fail: AtomicU32,
    calls: AtomicU64,
    cancel_calls: AtomicU64,
    cancellations: AtomicU64,
}

impl InProcessFieldService {
    /// A field service with the technicians of `config`, booking at `clock`'s now.
    pub fn new(config: Tenants<SchedulerConfig>, clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            config,
            desks: Mutex::new(BTreeMap::new()),
            fail: AtomicU32::new(0),
            calls: AtomicU64::new(0),
            cancel_calls: AtomicU64::new(0),
            cancellations: AtomicU64::new(0),
        }
    }

    /// The next `n` calls (`BookAppointment` or `CancelAppointment`) fail with
    /// UNAVAILABLE and change nothing.
    pub fn fail_next(&self, n: u32) {
        self.fail.store(n, Ordering::SeqCst);
    }

    /// `BookAppointment` calls received, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// `CancelAppointment` calls received, failed ones included.
    pub fn cancel_calls(&self) -> u64 {
        self.cancel_calls.load(Ordering::SeqCst)
    }

    /// Visits a `CancelAppointment` call cancelled (their slots freed).
    pub fn cancellations(&self) -> u64 {
        self.cancellations.load(Ordering::SeqCst)
    }

    /// Takes one injected failure, if any is left.
    fn injected_fault(&self) -> Result<(), Status> {
        match self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            Ok(_) => Err(Status::unavailable("field service busy (injected fault)")),
            Err(_) => Ok(()),
        }
    }

    /// Visits booked for `tenant` (cancelled ones not counted).
    pub fn visits(&self, tenant: &str) -> usize {
        let desks = self.desks.lock().expect("desks lock");
        desks.get(tenant).map_or(0, |d| {
            d.scheduler
                .bookings()
                .filter(|(_, b)| b.slot.is_some() && !b.cancelled)
                .count()
        })
    }

    /// Runs one step of the tenant's scheduler and returns the `Booking` it answered.
    fn step(
        &self,
        desk: &mut Desk,
        tenant: &str,
        f: impl FnOnce(&mut Scheduler, &mut Ctx, &Tenants<SchedulerConfig>) -> DeskStatus,
    ) -> Result<(DeskStatus, Option<Body>), Status> {
        // The desk's batch (its claim, its outbox) has no store here: what matters is the
        // answer it mailed.
        let mut ctx = Ctx::new(
            self.clock.now_ms(),
            tenant,
            Key::new("field-service/timers"),
            Key::new("field-service/outbox"),
        );
        let status = f(&mut desk.scheduler, &mut ctx, &self.config);
        if let DeskStatus::Refused(why) = status {
            return Err(Status::invalid_argument(why));
        }
        let answer = ctx.ops().iter().find_map(|op| match op {
            Op::Enqueue { value, .. } => Mail::decode(value).ok().map(|m| m.body),
            _ => None,
        });
        Ok((status, answer))
    }
}

fn check_ids(tenant: &str, key: &str) -> Result<(), Status> {
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

fn non_negative(name: &str, v: i64) -> Result<u64, Status> {
    u64::try_from(v).map_err(|_| Status::invalid_argument(format!("{name} is negative: {v}")))
}

#[tonic::async_trait]
impl FieldService for InProcessFieldService {
    async fn book_appointment(
        &self,
        request: Request<BookFieldAppointmentRequest>,
    ) -> Result<Response<BookFieldAppointmentResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = request.into_inner();
        check_ids(&r.tenant, &r.idempotency_key)?;
        let windows = r
            .windows
            .iter()
            .map(|w| {
                Ok((
                    non_negative("window start", w.start_at_ms)?,
                    non_negative("window end", w.end_at_ms)?,
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let not_before_ms = non_negative("not_before_ms", r.not_before_ms)?;
        let duration_ms = non_negative("duration_ms", r.duration_ms)?;
        self.injected_fault()?;
        let mut desks = self.desks.lock().expect("desks lock");
        if !desks.contains_key(&r.tenant) {
            let scheduler = Scheduler::create(&r.tenant, &self.config)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let desk = Desk {
                scheduler,
                requests: BTreeMap::new(),
                mail_seq: 0,
            };
            desks.insert(r.tenant.clone(), desk);
        }
        let desk = desks.get_mut(&r.tenant).expect("inserted above");
        let fingerprint = r.encode_to_vec();
        match desk.requests.get(&r.idempotency_key) {
            Some(first) if *first != fingerprint => {
                return Err(Status::already_exists(format!(
                    "key {:?} was first sent with another request",
                    r.idempotency_key
                )));
            }
            _ => {}
        }
        desk.mail_seq += 1;
        let mail = Mail {
            id: format!("{}/field-service/{}", r.customer_ref, desk.mail_seq),
            from: Address::Customer(r.customer_ref.clone()),
            to: Address::Scheduler(r.tenant.clone()),
            body: Body::Book {
                key: r.idempotency_key.clone(),
                customer: r.customer_ref.clone(),
                case_id: r.case_ref.clone(),
                skill: r.skill.clone(),
                region: r.region.clone(),
                not_before_ms,
                windows,
                duration_ms,
                confirmed: false,
            },
        };
        let (_, answer) = self.step(desk, &r.tenant, |s, ctx, env| s.handle(mail, ctx, env))?;
        desk.requests
            .entry(r.idempotency_key.clone())
            .or_insert(fingerprint);
        let outcome = match answer {
            Some(Body::Booking {
                technician: Some(technician),
                slot: Some((start, end)),
                detail,
                ..
            }) => book_field_appointment_response::Outcome::Booked(FieldAppointment {
                technician,
                slot: Some(TimeSlot {
                    start_at_ms: start as i64,
                    end_at_ms: end as i64,
                }),
                work_order_ref: detail,
            }),
            Some(Body::Booking { detail, .. }) => {
                book_field_appointment_response::Outcome::FailureReason(detail)
            }
            other => {
                return Err(Status::internal(format!(
                    "the scheduler answered {other:?}"
                )));
            }
        };
        Ok(Response::new(BookFieldAppointmentResponse {
            outcome: Some(outcome),
        }))
    }

    async fn cancel_appointment(
        &self,
        request: Request<CancelFieldAppointmentRequest>,
    ) -> Result<Response<CancelFieldAppointmentResponse>, Status> {
        self.cancel_calls.fetch_add(1, Ordering::SeqCst);
        let r = request.into_inner();
        check_ids(&r.tenant, &r.idempotency_key)?;
        self.injected_fault()?;
        let mut desks = self.desks.lock().expect("desks lock");
        let unknown =
            || Status::not_found(format!("no appointment for key {:?}", r.idempotency_key));
        let desk = desks.get_mut(&r.tenant).ok_or_else(unknown)?;
        let key = r.idempotency_key.clone();
        let (status, answer) = self.step(desk, &r.tenant, |s, ctx, _| {
            s.cancel(&key, "cancelled by CareTwin", ctx)
        })?;
        let detail = match answer {
            Some(Body::Booking { detail, .. }) => detail,
            _ => "already cancelled, or never booked".to_owned(),
        };
        if status == DeskStatus::Done {
            self.cancellations.fetch_add(1, Ordering::SeqCst);
        }
        match status {
            DeskStatus::Ignored => Err(unknown()),
            status => Ok(Response::new(CancelFieldAppointmentResponse {
                cancelled: status == DeskStatus::Done,
                detail,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caretwin_actors::host::clock::ManualClock;
    use caretwin_actors::services::scheduler::TechnicianConfig;

    /// Monday 2024-01-01 00:00 UTC.
    const MON: u64 = 1_704_067_200_000;

    fn service() -> InProcessFieldService {
        let config = Tenants::all(SchedulerConfig {
            technicians: vec![TechnicianConfig {
                id: "tech-ana".into(),
                skills: vec!["boiler".into()],
                regions: vec!["north".into()],
                days: vec![caretwin_actors::services::scheduler::Weekday::Mon],
                start: caretwin_actors::services::scheduler::TimeOfDay(8 * 60),
                end: caretwin_actors::services::scheduler::TimeOfDay(17 * 60),
            }],
            ..SchedulerConfig::default()
        });
        InProcessFieldService::new(config, Arc::new(ManualClock::new(MON)))
    }

    fn book(key: &str, skill: &str) -> Request<BookFieldAppointmentRequest> {
        Request::new(BookFieldAppointmentRequest {
            idempotency_key: key.into(),
            tenant: "t1".into(),
            skill: skill.into(),
            region: "north".into(),
            duration_ms: 3_600_000,
            customer_ref: "t1:cust-1".into(),
            case_ref: "case-1".into(),
            ..Default::default()
        })
    }

    fn booked(r: BookFieldAppointmentResponse) -> FieldAppointment {
        match r.outcome {
            Some(book_field_appointment_response::Outcome::Booked(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn books_once_per_key_like_the_desk_and_cancels() {
        let fs = service();
        let first = booked(
            fs.book_appointment(book("k1", "boiler"))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(first.technician, "tech-ana");
        assert_eq!(
            first.slot.unwrap().start_at_ms,
            (MON + 8 * 3_600_000) as i64
        );
        let again = booked(
            fs.book_appointment(book("k1", "boiler"))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(again, first);
        let second = booked(
            fs.book_appointment(book("k2", "boiler"))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(
            second.slot.unwrap().start_at_ms,
            (MON + 9 * 3_600_000) as i64,
            "the first visit's slot is taken"
        );
        assert_eq!(fs.visits("t1"), 2);
        match fs
            .book_appointment(book("k3", "hvac"))
            .await
            .unwrap()
            .into_inner()
            .outcome
        {
            Some(book_field_appointment_response::Outcome::FailureReason(why)) => {
                assert!(why.contains("no technician"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        let reused = fs.book_appointment(book("k1", "hvac")).await.unwrap_err();
        assert_eq!(reused.code(), tonic::Code::AlreadyExists);
        let mut foreign = book("k9", "boiler");
        foreign.get_mut().customer_ref = "t2:cust-1".into();
        let e = fs.book_appointment(foreign).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);

        let cancel = |key: &str| {
            Request::new(CancelFieldAppointmentRequest {
                tenant: "t1".into(),
                idempotency_key: key.into(),
            })
        };
        let c = fs
            .cancel_appointment(cancel("k1"))
            .await
            .unwrap()
            .into_inner();
        assert!(c.cancelled && c.detail.contains("cancelled"), "{c:?}");
        let c = fs
            .cancel_appointment(cancel("k1"))
            .await
            .unwrap()
            .into_inner();
        assert!(!c.cancelled);
        let e = fs.cancel_appointment(cancel("nope")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert_eq!(fs.visits("t1"), 1);

        fs.fail_next(1);
        let e = fs.book_appointment(book("k4", "boiler")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(fs.calls(), 7);
    }
}
