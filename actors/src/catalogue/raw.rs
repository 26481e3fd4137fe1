//! The catalogue as written in TOML, before validation. Every table denies unknown
//! fields, so a misspelt key is an error rather than a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::playbook::{ArgValue, Condition};
use super::types::{DetectorTuning, FailureThreshold, NormalRange, ReorderPoint};
use crate::model::{ConsentScope, InsightKind, Priority};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub id: String,
    pub name: String,
    pub category: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub commands: Vec<String>,
    #[serde(default)]
    pub signals: Vec<RawSignal>,
    #[serde(default)]
    pub consumables: Vec<RawConsumable>,
    #[serde(default)]
    pub parts: Vec<RawPart>,
    #[serde(default)]
    pub failure_modes: Vec<RawFailureMode>,
    #[serde(default)]
    pub diagnostic_codes: Vec<RawDiagnosticCode>,
    #[serde(default)]
    pub questions: Vec<RawQuestion>,
    #[serde(default)]
    pub alarms: Vec<RawAlarm>,
    #[serde(default)]
    pub rul: Option<RawRul>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSignal {
    pub name: String,
    pub unit: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub normal: Option<NormalRange>,
    #[serde(default)]
    pub failure: Option<FailureThreshold>,
    pub scope: ConsentScope,
    #[serde(default)]
    pub detector: DetectorTuning,
    #[serde(default)]
    pub cumulative: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsumable {
    pub name: String,
    pub capacity: f64,
    #[serde(default)]
    pub usage_signal: Option<String>,
    #[serde(default)]
    pub level_signal: Option<String>,
    pub reorder_at: ReorderPoint,
    pub part: String,
    #[serde(default)]
    pub auto_order: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPart {
    pub number: String,
    pub name: String,
    pub lead_time: String,
    #[serde(default)]
    pub price: Option<RawPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub amount: f64,
    pub currency: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailureMode {
    pub id: String,
    pub name: String,
    pub severity: Priority,
    #[serde(default)]
    pub skill: Option<String>,
    #[serde(default)]
    pub parts: Vec<String>,
    #[serde(default)]
    pub indicators: Vec<RawIndicator>,
    #[serde(default)]
    pub playbook: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIndicator {
    pub signal: String,
    #[serde(default)]
    pub insights: Option<Vec<InsightKind>>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum RawStep {
    RemoteCommand {
        command: String,
        #[serde(default)]
        args: BTreeMap<String, ArgValue>,
        wait: String,
        #[serde(default)]
        when: Condition,
    },
    OrderConsumable {
        consumable: String,
        #[serde(default = "one")]
        quantity: u32,
        #[serde(default)]
        when: Condition,
    },
    OrderPart {
        part: String,
        #[serde(default = "one")]
        quantity: u32,
        #[serde(default)]
        when: Condition,
    },
    BookTechnician {
        #[serde(default)]
        skill: Option<String>,
        duration: String,
        #[serde(default)]
        after_part_arrives: bool,
        #[serde(default)]
        when: Condition,
    },
    AskCustomer {
        #[serde(default)]
        question: Option<String>,
        #[serde(default)]
        options: Option<Vec<String>>,
        #[serde(default)]
        relay: Option<String>,
        timeout: String,
        #[serde(default)]
        when: Condition,
    },
    NotifyCustomer {
        template: String,
        priority: Priority,
        #[serde(default)]
        when: Condition,
    },
    Handoff {
        reason: String,
        #[serde(default)]
        when: Condition,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiagnosticCode {
    pub code: String,
    pub description: String,
    pub failure_mode: String,
    #[serde(default = "certain")]
    pub confidence: f64,
}

fn certain() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuestion {
    pub id: String,
    pub text: String,
    pub options: Vec<String>,
    pub failure_mode: String,
    #[serde(default = "certain")]
    pub confidence: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlarm {
    pub kind: String,
    pub failure_mode: String,
    pub local_actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRul {
    pub unit: String,
    pub inputs: Vec<String>,
    pub maintenance_at: f64,
    pub failure_mode: String,
    #[serde(default)]
    pub params: Option<toml::Value>,
}
