//! Conversions between the deciding code's types and the protobuf contracts. Plain data
//! mapping, no decisions.

use caretwin_actors::model::{ConsentScope, Insight, InsightKind, Priority};
use caretwin_proto::v1;

/// A priority on the wire.
pub fn priority(p: Priority) -> v1::Priority {
    match p {
        Priority::Low => v1::Priority::Low,
        Priority::Normal => v1::Priority::Normal,
        Priority::High => v1::Priority::High,
        Priority::Safety => v1::Priority::Safety,
    }
}

/// A consent scope on the wire.
pub fn consent_scope(s: ConsentScope) -> v1::ConsentScope {
    match s {
        ConsentScope::Diagnostics => v1::ConsentScope::Diagnostics,
        ConsentScope::UsageAnalytics => v1::ConsentScope::UsageAnalytics,
        ConsentScope::Marketing => v1::ConsentScope::Marketing,
        ConsentScope::Contact => v1::ConsentScope::Contact,
    }
}

/// An insight kind on the wire. Alarms and diagnostics have no kind of their own in the
/// contract: they are reported as failures now.
pub fn insight_kind(k: InsightKind) -> v1::InsightKind {
    match k {
        InsightKind::Anomaly => v1::InsightKind::Anomaly,
        InsightKind::Drift => v1::InsightKind::Drift,
        InsightKind::Forecast => v1::InsightKind::Forecast,
        InsightKind::ConsumableLow => v1::InsightKind::ConsumableDepletion,
        InsightKind::RemainingLife => v1::InsightKind::RemainingUsefulLife,
        InsightKind::FailureNow | InsightKind::Alarm | InsightKind::Diagnostic => {
            v1::InsightKind::FailureNow
        }
    }
}

/// An insight of `device` on the wire; `n` makes its id unique within a case.
pub fn insight(device: &str, n: usize, i: &Insight) -> v1::Insight {
    let is_signal = matches!(
        i.kind,
        InsightKind::Anomaly | InsightKind::Drift | InsightKind::Forecast | InsightKind::FailureNow
    );
    let message = match (i.kind, i.eta_ms) {
        (InsightKind::Forecast, Some(eta)) => {
            format!(
                "{} crosses its failure threshold around {} UTC",
                i.subject,
                caretwin_actors::policy::civil_time(eta, 0)
            )
        }
        (InsightKind::ConsumableLow, Some(eta)) => format!(
            "{} runs out around {} UTC",
            i.subject,
            caretwin_actors::policy::civil_time(eta, 0)
        ),
        (InsightKind::RemainingLife, _) => format!("{:.0} left", i.value),
        (InsightKind::Alarm, _) => format!("{} alarm", i.subject),
        (kind, _) => format!("{kind:?} on {}", i.subject).to_lowercase(),
    };
    v1::Insight {
        id: format!("{device}/{}/{}/{n}", i.subject, i.raised_at_ms),
        device_id: device.to_owned(),
        kind: insight_kind(i.kind) as i32,
        signal: if is_signal {
            i.subject.clone()
        } else {
            String::new()
        },
        confidence: i.confidence,
        eta_ms: i.eta_ms.map(|t| t as i64),
        remaining_life: (i.kind == InsightKind::RemainingLife).then_some(i.value),
        remaining_life_unit: String::new(),
        failure_mode_id: i.failure_mode.clone().unwrap_or_default(),
        consumable_id: if i.kind == InsightKind::ConsumableLow {
            i.subject.clone()
        } else {
            String::new()
        },
        message,
        state: v1::InsightState::Open as i32,
        created_at_ms: i.raised_at_ms as i64,
        updated_at_ms: i.raised_at_ms as i64,
        superseded_by: String::new(),
    }
}

/// A command's payload on the wire: the remedy `name` with `args`, or its `action`.
pub fn command_payload(
    name: &str,
    args: &[(String, String)],
    action: Option<&caretwin_actors::mail::CommandAction>,
) -> v1::CommandPayload {
    use caretwin_actors::mail::CommandAction;
    use v1::command_payload::Kind;
    let kind = match action {
        None => Kind::RemoteRemedy(v1::RemoteRemedy {
            name: name.to_owned(),
            args: args.iter().cloned().collect(),
        }),
        Some(CommandAction::Configure { fields }) => Kind::Configuration(v1::Configuration {
            entries: fields
                .iter()
                .map(|(f, value, version)| {
                    let entry = v1::ConfigurationEntry {
                        value: Some(v1::SignalValue {
                            value: Some(v1::signal_value::Value::Text(value.clone())),
                        }),
                        version: *version,
                    };
                    (f.clone(), entry)
                })
                .collect(),
        }),
        Some(CommandAction::Firmware {
            version,
            url,
            sha256,
            size_bytes,
        }) => Kind::FirmwareUpdate(v1::FirmwareUpdate {
            version: version.clone(),
            url: url.clone(),
            sha256: sha256.clone(),
            size_bytes: *size_bytes,
        }),
        Some(CommandAction::Answer {
            question_id,
            option_id,
        }) => Kind::AnswerQuestion(v1::AnswerQuestion {
            question_id: question_id.clone(),
            option_id: option_id.clone(),
        }),
    };
    v1::CommandPayload { kind: Some(kind) }
}
