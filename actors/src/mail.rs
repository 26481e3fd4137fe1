//! Mail: the messages twins send each other and the outside world, through durable
//! outboxes.
//!
//! A twin never calls another twin. It emits [`Mail`] into its shard's outbox, atomically
//! with the state change that caused it; a dispatcher delivers the mail and only then
//! removes it. Delivery is therefore at least once, and every receiver de-duplicates by
//! [`Mail::id`] (or by the idempotency key inside the body), so the effect is exactly once.
//!
//! Every address is tenant-scoped: a twin id always starts with its tenant (`t1:…`), and the
//! dispatcher refuses mail whose sender and receiver are of different tenants.

use crate::model::{ConsentScope, Insight, Priority, TimeMs};
use serde::{Deserialize, Serialize};

/// Where mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Address {
    /// A device twin, by id (`tenant:device`).
    Device(String),
    /// A customer twin, by id (`tenant:customer`).
    Customer(String),
    /// The tenant's parts desk (inventory and supplier orders).
    Parts(String),
    /// The tenant's repair scheduler (technicians and their calendars).
    Scheduler(String),
    /// The tenant's handoff queue to human agents.
    Handoff(String),
    /// Outside: the edge node of a site (commands to devices).
    Edge(String),
    /// Outside: the tenant's notification channels (push, SMS, e-mail).
    Notifier(String),
    /// Outside: the tenant's parts supplier.
    Supplier(String),
    /// Outside: the tenant's field-service partner (cancelling the visits it booked).
    FieldService(String),
}

impl Address {
    /// The tenant the address belongs to (the part of the id before the first `:`).
    pub fn tenant(&self) -> &str {
        let id = match self {
            Address::Device(id)
            | Address::Customer(id)
            | Address::Parts(id)
            | Address::Scheduler(id)
            | Address::Handoff(id)
            | Address::Edge(id)
            | Address::Notifier(id)
            | Address::Supplier(id)
            | Address::FieldService(id) => id,
        };
        id.split_once(':').map_or(id.as_str(), |(t, _)| t)
    }
}

/// The tenant of a twin id (`tenant:rest`).
pub fn tenant_of(id: &str) -> &str {
    id.split_once(':').map_or(id, |(t, _)| t)
}

/// A message in an outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mail {
    /// Unique per sender and message: the receiver's de-duplication key.
    pub id: String,
    /// Who sent it.
    pub from: Address,
    /// Where it goes.
    pub to: Address,
    /// What it says.
    pub body: Body,
}

impl Mail {
    /// Encodes the mail for an outbox.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("mail is plain data and always serialises")
    }

    /// Decodes mail from an outbox entry.
    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| crate::Error::Host(format!("undecodable mail: {e}")))
    }
}

/// A remote command for a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceCommand {
    /// Unique command id (idempotency at the edge).
    pub command_id: String,
    /// The device.
    pub device: String,
    /// The remedy or action name from the catalogue (`descale`, `reset`).
    pub name: String,
    /// Arguments.
    pub args: Vec<(String, String)>,
    /// When it expires if not delivered.
    pub expires_at_ms: TimeMs,
    /// Urgency: the edge delivers SAFETY commands first (absent in older mail: normal).
    #[serde(default)]
    pub priority: Priority,
    /// What the command does when it is not the remedy `name` (absent: a remedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<CommandAction>,
}

/// A command other than a named remedy (`name` then says which kind it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CommandAction {
    /// Set configuration fields: they become the device's desired state, and the command
    /// succeeds once the device reports every value.
    Configure {
        /// (field, value, desired-state version) per field.
        fields: Vec<(String, String, u64)>,
    },
    /// Install a firmware image.
    Firmware {
        /// The version, as the manufacturer names it.
        version: String,
        /// HTTPS address of the image.
        url: String,
        /// SHA-256 of the image, lowercase hexadecimal.
        sha256: String,
        /// Size of the image in bytes.
        size_bytes: u64,
    },
    /// Pass the customer's answer to a question the product asked.
    Answer {
        /// The question.
        question_id: String,
        /// The chosen option.
        option_id: String,
    },
}

impl CommandAction {
    /// The command's name for this kind (the remedy's name otherwise).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Configure { .. } => "configure",
            Self::Firmware { .. } => "firmware_update",
            Self::Answer { .. } => "answer_question",
        }
    }
}

/// The context a human agent gets with a case, so nobody asks the customer again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseContext {
    /// The customer.
    pub customer: String,
    /// The customer's devices concerned.
    pub devices: Vec<String>,
    /// The root cause (failure mode or signal).
    pub root_cause: String,
    /// What the twins concluded, oldest first, filtered by consent.
    pub insights: Vec<Insight>,
    /// What was tried, with outcomes, oldest first.
    pub actions: Vec<String>,
    /// What the system suggests next.
    pub suggested_next_step: String,
    /// Scopes the customer has not consented to, whose data was withheld.
    pub withheld: Vec<ConsentScope>,
}

/// An agent's work on a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AgentWork {
    /// A note on the case.
    Note {
        /// Unique within the case; a note with a known id is a retry and changes nothing.
        note_id: String,
        /// The note: 1 to 10,000 characters from the agent, stored as given or sealed with
        /// the customer's key (then up to `MAX_STORED_NOTE_BYTES`).
        text: String,
        /// Whether the customer may see it.
        customer_visible: bool,
    },
    /// The case is resolved.
    Resolve {
        /// How (`repaired_on_site`, `fixed_remotely`, …).
        code: String,
        /// What was done, for people.
        summary: String,
    },
}

/// An integrator's order of a part or consumable (the gRPC `WorkService`): what the parts
/// desk needs, with the references a twin's [`Body::OrderPart`] does not carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartOrderRequest {
    /// Idempotency key: one order however often this is sent.
    pub key: String,
    /// The part number or consumable SKU.
    pub part_number: String,
    /// How many, at least 1.
    pub quantity: u32,
    /// Who it is for (the device's customer).
    pub customer: String,
    /// The device it is for.
    pub device: String,
    /// The case it belongs to, if any (empty: none).
    pub case_id: String,
    /// The work order it belongs to, if any (empty: none).
    pub work_order_id: String,
    /// A consumable sent to the customer rather than a spare part for a repair.
    pub consumable: bool,
}

/// Where a supplier says an order stands (the gRPC `UpdatePartOrderState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SupplierState {
    /// The supplier accepted it.
    Confirmed,
    /// On its way.
    Shipped,
    /// Delivered.
    Delivered,
    /// Cancelled before shipping.
    Cancelled,
    /// The supplier cannot fulfil it.
    Failed,
}

/// A supplier's report of an order's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderProgress {
    /// The order's id (`tenant:po-N`).
    pub part_order_id: String,
    /// Its new state; states only move forward.
    pub state: SupplierState,
    /// The supplier's reference, if newly known (empty: unchanged).
    pub supplier_reference: String,
    /// Expected delivery, if newly known.
    pub expected_delivery_at_ms: Option<TimeMs>,
    /// Tracking reference, if newly known (empty: unchanged).
    pub tracking_reference: String,
}

/// Where a work order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkOrderState {
    /// Created, no appointment yet.
    Open,
    /// An appointment is booked.
    Scheduled,
    /// The technician is on site.
    InProgress,
    /// The work is done.
    Completed,
    /// Cancelled; not done.
    Cancelled,
}

impl WorkOrderState {
    /// Whether the work order can never change again.
    pub fn is_final(self) -> bool {
        matches!(self, WorkOrderState::Completed | WorkOrderState::Cancelled)
    }
}

/// An integrator's new work order (the gRPC `WorkService`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkOrderRequest {
    /// Idempotency key: one work order however often this is sent.
    pub key: String,
    /// The device's customer.
    pub customer: String,
    /// The device to repair.
    pub device: String,
    /// The device's site.
    pub site: String,
    /// The case it belongs to, if any (empty: none).
    pub case_id: String,
    /// Failure mode from the catalogue, if known (empty: unknown).
    pub failure_mode: String,
    /// What to do, for the technician.
    pub description: String,
    /// Urgency.
    pub priority: Priority,
}

/// Book a given slot of a given technician for a work order (the gRPC `BookAppointment`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotRequest {
    /// Idempotency key: one appointment however often this is sent.
    pub key: String,
    /// The work order.
    pub work_order_id: String,
    /// The technician.
    pub technician: String,
    /// The visit, `[start, end)` Unix ms.
    pub slot: (TimeMs, TimeMs),
    /// Part orders whose parts the technician brings.
    pub part_orders: Vec<String>,
    /// Booked confirmed (true) or held until the customer confirms.
    pub confirmed: bool,
}

/// A visit the field-service partner booked, for the scheduler's books.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartnerVisit {
    /// The booking's idempotency key.
    pub key: String,
    /// The customer.
    pub customer: String,
    /// The case.
    pub case_id: String,
    /// The partner's technician.
    pub technician: String,
    /// The visit, `[start, end)` Unix ms.
    pub slot: (TimeMs, TimeMs),
    /// The partner's work order reference.
    pub reference: String,
    /// Booked confirmed (the customer's standing approval).
    pub confirmed: bool,
}

/// What mail says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Body {
    // ---- device twin → customer twin
    /// A device twin concluded something.
    Insight {
        /// The device.
        device: String,
        /// Its model.
        model: String,
        /// The conclusion.
        insight: Insight,
    },
    /// A condition the device twin reported earlier has cleared.
    InsightCleared {
        /// The device.
        device: String,
        /// The subject that cleared (signal, consumable).
        subject: String,
        /// The failure mode, if the insight named one.
        failure_mode: Option<String>,
    },
    /// A remote command finished on the device.
    CommandOutcome {
        /// The device.
        device: String,
        /// The command.
        command_id: String,
        /// Whether it succeeded.
        succeeded: bool,
        /// What the device said.
        detail: String,
    },
    /// The customer answered a question or an approval request.
    CustomerAnswer {
        /// The question or approval.
        question_id: String,
        /// The answer.
        answer: String,
    },

    // ---- customer twin → device twin / edge
    /// Send a remote command to a device.
    Command(DeviceCommand),
    /// Device twin → edge: cancel a command the edge may hold, unless the device already
    /// has it (then it runs to its outcome).
    CancelCommand {
        /// The device.
        device: String,
        /// The command.
        command_id: String,
        /// Why, for the edge's logs.
        reason: String,
    },
    /// The desired state of a device's fields, for its edge to apply (each field only if
    /// its version is newer than the one the edge holds).
    DesiredState {
        /// The device.
        device: String,
        /// (field, value, version) for every desired field.
        fields: Vec<(String, String, u64)>,
    },
    /// The customer's consent changed: the device twin stops using data of withdrawn
    /// scopes at once.
    ConsentChanged {
        /// Scopes now allowed.
        allowed: Vec<ConsentScope>,
    },

    // ---- customer twin → parts desk, and back
    /// Order a part or consumable, once per key.
    OrderPart {
        /// Idempotency key (`case/part`): one order however often this is sent.
        key: String,
        /// The part number.
        part_number: String,
        /// How many.
        quantity: u32,
        /// Who it is for.
        customer: String,
        /// The case it belongs to.
        case_id: String,
        /// The device it is for (absent in older mail: unknown).
        #[serde(default)]
        device: String,
    },
    /// What became of an order.
    PartOrderUpdate {
        /// The order's idempotency key.
        key: String,
        /// Placed (with an arrival estimate) or failed.
        placed: bool,
        /// When the part arrives.
        arrives_at_ms: Option<TimeMs>,
        /// Order reference or failure reason.
        detail: String,
    },

    /// The supplier's answer to a [`Body::SupplierOrder`].
    SupplierResult {
        /// The order's idempotency key.
        key: String,
        /// Accepted, or refused (e.g. out of stock, try later).
        accepted: bool,
        /// When the part arrives, if accepted.
        arrives_at_ms: Option<TimeMs>,
        /// Supplier reference or reason.
        detail: String,
    },

    // ---- customer twin → scheduler, and back
    /// Book a technician, once per key.
    Book {
        /// Idempotency key (`case/visit`).
        key: String,
        /// The customer.
        customer: String,
        /// The case.
        case_id: String,
        /// The skill needed.
        skill: String,
        /// The customer's region.
        region: String,
        /// Not before this (e.g. the part's arrival).
        not_before_ms: TimeMs,
        /// Windows the customer is available, as (start, end) Unix ms.
        windows: Vec<(TimeMs, TimeMs)>,
        /// How long the visit takes.
        duration_ms: u64,
        /// Book it confirmed (the customer's standing approval of visits); otherwise it is
        /// held as proposed until the customer confirms (absent in older mail: held).
        #[serde(default)]
        confirmed: bool,
    },
    /// What became of a booking.
    Booking {
        /// The booking's idempotency key.
        key: String,
        /// The technician, if booked.
        technician: Option<String>,
        /// The slot, if booked.
        slot: Option<(TimeMs, TimeMs)>,
        /// Work order id or failure reason.
        detail: String,
    },
    /// The customer confirmed the visit booked under `key`.
    ConfirmVisit {
        /// The booking's idempotency key.
        key: String,
    },
    /// Cancel the visit booked under `key`: from the customer twin to the scheduler (the
    /// customer declined it), and from the scheduler to the field-service partner that
    /// booked it (its slot there is freed).
    CancelVisit {
        /// The booking's idempotency key.
        key: String,
        /// Why, for people.
        reason: String,
    },
    /// The field-service partner booked a visit: the scheduler keeps it with the tenant's
    /// appointments (the partner's calendar holds the slot).
    PartnerBooked(PartnerVisit),

    // ---- integrators (gRPC WorkService) → parts desk and scheduler
    /// Order a part or consumable for an integrator, once per key.
    PlaceOrder(PartOrderRequest),
    /// A supplier reports an order's progress.
    SupplierProgress(OrderProgress),
    /// Open a work order, once per key.
    OpenWorkOrder(WorkOrderRequest),
    /// Move a work order forward, from the field.
    WorkOrderProgress {
        /// The work order.
        work_order_id: String,
        /// Its new state: in progress, completed or cancelled.
        state: WorkOrderState,
        /// The technician's report or the reason, for people.
        notes: String,
    },
    /// Book a given technician slot for a work order, once per key.
    BookSlot(SlotRequest),
    /// Cancel an appointment: its slot is free again, its work order open again.
    CancelBooking {
        /// The appointment (`tenant:ap-N`).
        appointment_id: String,
        /// Why, for people.
        reason: String,
    },

    // ---- customer twin → handoff queue, and back
    /// Hand a case to a human.
    Handoff {
        /// The case.
        case_id: String,
        /// How urgent.
        priority: Priority,
        /// Why a human is needed.
        reason: String,
        /// Everything the agent needs.
        context: CaseContext,
    },
    /// A human agent's work on a handed-off case (from the gRPC service): a note, or the
    /// resolution with how and what was done.
    CaseWork {
        /// The case.
        case_id: String,
        /// The agent.
        agent: String,
        /// What the agent did.
        work: AgentWork,
    },
    /// A human agent picked up or closed a handed-off case.
    HandoffUpdate {
        /// The case.
        case_id: String,
        /// `accepted`, `escalated`, `resolved`.
        state: String,
        /// The agent, if any.
        agent: Option<String>,
    },

    // ---- to the outside
    /// Tell the customer something through a channel.
    Notify {
        /// The customer.
        customer: String,
        /// The channel (`push`, `sms`, `email`).
        channel: String,
        /// The text.
        text: String,
        /// How urgent.
        priority: Priority,
        /// A question or approval the customer can answer with one tap, if any.
        question_id: Option<String>,
    },
    /// Place an order with the supplier, once per key.
    SupplierOrder {
        /// Idempotency key, passed to the supplier.
        key: String,
        /// The part number.
        part_number: String,
        /// How many.
        quantity: u32,
        /// The device it is for, if known: the supplier delivers to its site (absent in
        /// older mail: the tenant's default depot).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        device: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_round_trips_and_names_its_tenant() {
        let m = Mail {
            id: "t1:cust-1/7".into(),
            from: Address::Customer("t1:cust-1".into()),
            to: Address::Parts("t1".into()),
            body: Body::OrderPart {
                key: "case-1/DESCALER".into(),
                part_number: "DESCALER".into(),
                quantity: 1,
                customer: "t1:cust-1".into(),
                case_id: "case-1".into(),
                device: "t1:dev-1".into(),
            },
        };
        assert_eq!(Mail::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.from.tenant(), "t1");
        assert_eq!(m.to.tenant(), "t1");
        assert_eq!(tenant_of("t2:dev-9"), "t2");
        assert!(Mail::decode(b"{not mail").is_err());
    }
}
