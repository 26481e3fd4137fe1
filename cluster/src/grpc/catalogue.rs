//! `CatalogueService`: the device model catalogue, read-only. The catalogue is the same for
//! every tenant (configuration shipped with the node); the call still needs a token with
//! `catalogue:read`.

use super::auth::{Principal, Scope};
use super::convert;
use caretwin_actors::catalogue::{Action, Catalogue, DeviceModel};
use caretwin_actors::model::Direction;
use caretwin_proto::v1::{self, catalogue_service_server::CatalogueService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC face of the catalogue.
#[derive(Clone)]
pub struct CatalogueApi {
    catalogue: Arc<Catalogue>,
}

impl CatalogueApi {
    /// The service over `catalogue`.
    pub fn new(catalogue: Arc<Catalogue>) -> Self {
        Self { catalogue }
    }
}

/// Every model has revision 1: the catalogue is loaded whole at start and not versioned
/// per model yet.
const REVISION: u32 = 1;

fn to_model(m: &DeviceModel) -> v1::DeviceModel {
    v1::DeviceModel {
        model_id: m.id().to_owned(),
        revision: REVISION,
        name: m.name().to_owned(),
        manufacturer: String::new(),
        category: m.category().to_owned(),
        signals: m
            .signals()
            .iter()
            .map(|s| v1::SignalSpec {
                name: s.name.clone(),
                description: s.description.clone().unwrap_or_default(),
                unit: s.unit.clone(),
                normal_min: s.normal.map(|n| n.min),
                normal_max: s.normal.map(|n| n.max),
                failure_threshold: s.failure.map(|f| f.threshold),
                failure_direction: match s.failure.map(|f| f.direction) {
                    Some(Direction::Rising) => v1::ThresholdDirection::Above,
                    Some(Direction::Falling) => v1::ThresholdDirection::Below,
                    None => v1::ThresholdDirection::Unspecified,
                } as i32,
                expected_interval_ms: 0,
                consent_scope: convert::consent_scope(s.scope) as i32,
            })
            .collect(),
        consumables: m
            .consumables()
            .iter()
            .map(|c| v1::ConsumableSpec {
                consumable_id: c.name.clone(),
                name: c.name.clone(),
                part_number: c.part.clone(),
                capacity: c.capacity,
                usage_signal: c.signal.clone(),
                reorder_at_fraction: c.reorder_level() / c.capacity.max(f64::MIN_POSITIVE),
                ..Default::default()
            })
            .collect(),
        parts: m
            .parts()
            .iter()
            .map(|p| v1::PartSpec {
                part_number: p.number.clone(),
                name: p.name.clone(),
                lead_time_ms: p.lead_time_ms as i64,
                supplier_id: String::new(),
                unit_price: p.price.as_ref().map(|price| v1::Money {
                    currency: price.currency.clone(),
                    amount_minor: i64::try_from(price.minor_units).unwrap_or(i64::MAX),
                }),
            })
            .collect(),
        failure_modes: m
            .failure_modes()
            .iter()
            .map(|f| v1::FailureMode {
                failure_mode_id: f.id.clone(),
                name: f.name.clone(),
                description: String::new(),
                signals: f.indicators.iter().map(|i| i.signal.clone()).collect(),
                priority: convert::priority(f.severity) as i32,
                part_numbers: f.parts.clone(),
                playbook: f
                    .playbook
                    .iter()
                    .enumerate()
                    .map(|(n, step)| playbook_step(&f.id, n, &step.action))
                    .collect(),
            })
            .collect(),
        remedies: m
            .commands()
            .iter()
            .map(|c| v1::RemedySpec {
                name: c.clone(),
                ..Default::default()
            })
            .collect(),
        config_fields: Vec::new(),
        recommended_firmware: String::new(),
        updated_at_ms: 0,
    }
}

fn playbook_step(mode: &str, n: usize, action: &Action) -> v1::PlaybookStep {
    let (kind, target, wait, confirm) = match action {
        Action::RemoteCommand {
            command, wait_ms, ..
        } => (
            v1::PlaybookAction::RemoteRemedy,
            command.clone(),
            *wait_ms,
            false,
        ),
        Action::OrderConsumable { consumable, .. } => (
            v1::PlaybookAction::OrderConsumable,
            consumable.clone(),
            0,
            false,
        ),
        Action::OrderPart { part, .. } => (v1::PlaybookAction::OrderPart, part.clone(), 0, false),
        Action::BookTechnician { skill, .. } => {
            (v1::PlaybookAction::BookTechnician, skill.clone(), 0, true)
        }
        Action::AskCustomer {
            question_id,
            timeout_ms,
            ..
        } => (
            v1::PlaybookAction::AskCustomer,
            question_id.clone().unwrap_or_default(),
            *timeout_ms,
            false,
        ),
        Action::NotifyCustomer { template, .. } => (
            v1::PlaybookAction::NotifyCustomer,
            template.clone(),
            0,
            false,
        ),
        Action::Handoff { reason } => (v1::PlaybookAction::Handoff, reason.clone(), 0, false),
    };
    v1::PlaybookStep {
        step_id: format!("{mode}/{n}"),
        action: kind as i32,
        target,
        condition: String::new(),
        max_attempts: 1,
        wait_for_effect_ms: wait as i64,
        requires_customer_confirmation: confirm,
        description: action.name().replace('_', " "),
    }
}

#[tonic::async_trait]
impl CatalogueService for CatalogueApi {
    async fn list_device_models(
        &self,
        req: Request<v1::ListDeviceModelsRequest>,
    ) -> Result<Response<v1::ListDeviceModelsResponse>, Status> {
        Principal::of(&req)?.require(Scope::CatalogueRead)?;
        let r = req.into_inner();
        let page = r.page.unwrap_or_default();
        let size = match page.page_size {
            0 => 50,
            n => n.min(1000),
        } as usize;
        // The token is the last model id of the previous page.
        let mut models: Vec<&DeviceModel> = self
            .catalogue
            .models()
            .iter()
            .filter(|m| r.category.is_empty() || m.category() == r.category)
            .filter(|m| page.page_token.is_empty() || m.id() > page.page_token.as_str())
            .collect();
        models.sort_by(|a, b| a.id().cmp(b.id()));
        let next = if models.len() > size {
            models[size - 1].id().to_owned()
        } else {
            String::new()
        };
        Ok(Response::new(v1::ListDeviceModelsResponse {
            models: models.into_iter().take(size).map(to_model).collect(),
            page: Some(v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn get_device_model(
        &self,
        req: Request<v1::GetDeviceModelRequest>,
    ) -> Result<Response<v1::DeviceModel>, Status> {
        Principal::of(&req)?.require(Scope::CatalogueRead)?;
        let r = req.into_inner();
        let not_found = || Status::not_found(format!("device model {:?} not found", r.model_id));
        if r.revision.is_some_and(|v| v != REVISION) {
            return Err(not_found());
        }
        let model = self.catalogue.model(&r.model_id).ok_or_else(not_found)?;
        Ok(Response::new(to_model(model)))
    }
}
