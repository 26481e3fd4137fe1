//! Playbooks: what to do about a failure mode, step by step, and when.
//!
//! # How a playbook runs
//! The policy walks the steps in order, once per case:
//! 1. A step whose [`Condition`] does not hold when the walk reaches it is skipped.
//! 2. `remote_command` sends the command, then waits `wait_ms`; afterwards the twin judges
//!    whether the mode's indication cleared, and that outcome ([`Remedy`]) is what later
//!    `remedy_failed` / `remedy_succeeded` conditions see.
//! 3. `ask_customer` waits for an answer up to `timeout_ms`; the answer, or its absence,
//!    ([`Reply`]) is what later `answer` / `no_answer` conditions see. With several
//!    questions, conditions see the most recent one.
//! 4. `order_part`, `order_consumable` and `book_technician` each cause one idempotent
//!    effect per case; `book_technician` with `after_part_arrives` books the earliest
//!    slot after the part ordered earlier in the playbook is due.
//! 5. A `handoff` that runs ends the playbook: the case goes to a person with its whole
//!    context. A walk that reaches the end without one closes the case as handled.
//!
//! Validation guarantees every playbook is non-empty, contains a `handoff`, has nothing
//! after an unconditional `handoff`, and that every condition refers to something an
//! earlier step produces (an answer offered by an earlier question, a remote command
//! before `remedy_failed`, an `order_part` before `after_part_arrives`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Priority;

/// One step of a playbook: what to do, and when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// When the step runs; [`Condition::Always`] unless the catalogue says otherwise.
    pub when: Condition,
    /// What it does.
    pub action: Action,
}

/// The answer that confirms a proposed technician visit.
pub const CONFIRM_VISIT: &str = "Confirm";
/// The answer that declines a proposed technician visit (it is cancelled).
pub const DECLINE_VISIT: &str = "Decline";

/// What a playbook step does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum Action {
    /// Send a command to the device and give it `wait_ms` to take effect.
    RemoteCommand {
        /// One of the model's commands (`descale`, `reset`).
        command: String,
        /// Arguments passed with it.
        args: BTreeMap<String, ArgValue>,
        /// How long to wait before judging whether it worked.
        wait_ms: u64,
    },
    /// Order a consumable (its part number comes from the consumable's entry).
    OrderConsumable {
        /// The consumable's name.
        consumable: String,
        /// How many (≥ 1).
        quantity: u32,
    },
    /// Order a spare part.
    OrderPart {
        /// Part number, one of the model's parts and of the failure mode's `parts`.
        part: String,
        /// How many (≥ 1).
        quantity: u32,
    },
    /// Book a technician visit. Unless the customer approved such visits in advance, the
    /// visit is proposed and the customer asked to confirm it ([`CONFIRM_VISIT`] /
    /// [`DECLINE_VISIT`]): later steps may use the answer, or `no_answer`, like an
    /// `ask_customer` step's.
    BookTechnician {
        /// The skill needed (the step's, else the failure mode's).
        skill: String,
        /// How long the visit takes.
        duration_ms: u64,
        /// Book the earliest slot after the part ordered earlier in the playbook arrives.
        after_part_arrives: bool,
    },
    /// Ask the customer a question, through their preferred channel.
    AskCustomer {
        /// The product question relayed, when the step relays one (`door-seal-check`).
        question_id: Option<String>,
        /// The question as put to the customer.
        text: String,
        /// The answers offered (at least two, distinct).
        options: Vec<String>,
        /// How long to wait for an answer.
        timeout_ms: u64,
    },
    /// Tell the customer something (inside their budget and quiet hours, unless the
    /// priority is `Safety`, which only safety failure modes may use).
    NotifyCustomer {
        /// Message template id.
        template: String,
        /// How urgent.
        priority: Priority,
    },
    /// Hand the case to a person; ends the playbook.
    Handoff {
        /// Why, for the person who picks it up.
        reason: String,
    },
}

impl Action {
    /// The action's name as the catalogue writes it (`remote_command`, `handoff`…).
    pub fn name(&self) -> &'static str {
        match self {
            Action::RemoteCommand { .. } => "remote_command",
            Action::OrderConsumable { .. } => "order_consumable",
            Action::OrderPart { .. } => "order_part",
            Action::BookTechnician { .. } => "book_technician",
            Action::AskCustomer { .. } => "ask_customer",
            Action::NotifyCustomer { .. } => "notify_customer",
            Action::Handoff { .. } => "handoff",
        }
    }
}

/// A value passed with a remote command. In TOML a plain value: `args = { temp = 60 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ArgValue {
    /// `true` / `false`.
    Bool(bool),
    /// A whole number.
    Integer(i64),
    /// A finite number.
    Float(f64),
    /// Text.
    Text(String),
}

/// When a step runs. In TOML a name or a one-key table:
/// `when = "remedy_failed"`, `when = { confidence_below = 0.6 }`,
/// `when = { answer = "it was already closed" }`,
/// `when = { any = ["no_answer", { answer = "change the date" }] }`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Always (the default when a step has no `when`).
    #[default]
    Always,
    /// The most recent remote command did not clear the indication.
    RemedyFailed,
    /// The most recent remote command cleared the indication.
    RemedySucceeded,
    /// The customer has a standing approval for this step's order or booking (only on
    /// `order_consumable`, `order_part` and `book_technician` steps).
    StandingApproval,
    /// The customer has no standing approval for this step's order or booking.
    NoStandingApproval,
    /// The case's confidence is below this value (in `0..=1`).
    ConfidenceBelow(f64),
    /// The case's confidence is at least this value (in `0..=1`).
    ConfidenceAtLeast(f64),
    /// The customer gave this answer to the most recent question.
    Answer(String),
    /// The most recent question timed out unanswered.
    NoAnswer,
    /// Every one of these holds (non-empty).
    All(Vec<Condition>),
    /// At least one of these holds (non-empty).
    Any(Vec<Condition>),
}

/// What the policy knows when it reaches a step, for [`Condition::holds`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts<'a> {
    /// The case's confidence in its failure mode, `0..=1`.
    pub confidence: f64,
    /// Outcome of the most recent remote command.
    pub remedy: Remedy,
    /// The customer's reply to the most recent question.
    pub reply: Reply<'a>,
    /// Whether the customer has a standing approval for this step's order or booking.
    pub standing_approval: bool,
}

/// Outcome of the most recent remote command in a playbook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remedy {
    /// No remote command has been judged yet.
    NotTried,
    /// The indication cleared.
    Succeeded,
    /// The indication persisted.
    Failed,
}

/// The customer's reply to the most recent question in a playbook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Nothing has been asked yet.
    NotAsked,
    /// The question timed out.
    NoAnswer,
    /// The customer picked this option.
    Answered(&'a str),
}

impl Condition {
    /// Whether the condition holds for these facts.
    pub fn holds(&self, facts: &Facts<'_>) -> bool {
        match self {
            Condition::Always => true,
            Condition::RemedyFailed => facts.remedy == Remedy::Failed,
            Condition::RemedySucceeded => facts.remedy == Remedy::Succeeded,
            Condition::StandingApproval => facts.standing_approval,
            Condition::NoStandingApproval => !facts.standing_approval,
            Condition::ConfidenceBelow(x) => facts.confidence < *x,
            Condition::ConfidenceAtLeast(x) => facts.confidence >= *x,
            Condition::Answer(a) => facts.reply == Reply::Answered(a),
            Condition::NoAnswer => facts.reply == Reply::NoAnswer,
            Condition::All(cs) => cs.iter().all(|c| c.holds(facts)),
            Condition::Any(cs) => cs.iter().any(|c| c.holds(facts)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts<'static> {
        Facts {
            confidence: 0.7,
            remedy: Remedy::NotTried,
            reply: Reply::NotAsked,
            standing_approval: false,
        }
    }

    #[test]
    fn conditions_hold_on_the_facts_they_name() {
        let f = facts();
        assert!(Condition::Always.holds(&f));
        assert!(!Condition::RemedyFailed.holds(&f));
        assert!(!Condition::RemedySucceeded.holds(&f));
        let failed = Facts {
            remedy: Remedy::Failed,
            ..f
        };
        assert!(Condition::RemedyFailed.holds(&failed));
        assert!(Condition::ConfidenceBelow(0.8).holds(&f));
        assert!(!Condition::ConfidenceBelow(0.7).holds(&f));
        assert!(Condition::ConfidenceAtLeast(0.7).holds(&f));
        assert!(Condition::NoStandingApproval.holds(&f));
        let approved = Facts {
            standing_approval: true,
            ..f
        };
        assert!(Condition::StandingApproval.holds(&approved));
        let answered = Facts {
            reply: Reply::Answered("yes"),
            ..f
        };
        assert!(Condition::Answer("yes".into()).holds(&answered));
        assert!(!Condition::Answer("no".into()).holds(&answered));
        assert!(!Condition::NoAnswer.holds(&answered));
        let silent = Facts {
            reply: Reply::NoAnswer,
            ..f
        };
        assert!(Condition::NoAnswer.holds(&silent));
        let any = Condition::Any(vec![Condition::NoAnswer, Condition::Answer("no".into())]);
        assert!(any.holds(&silent));
        assert!(!any.holds(&answered));
        let all = Condition::All(vec![Condition::RemedyFailed, Condition::StandingApproval]);
        assert!(!all.holds(&failed));
        assert!(all.holds(&Facts {
            remedy: Remedy::Failed,
            standing_approval: true,
            ..f
        }));
    }
}
